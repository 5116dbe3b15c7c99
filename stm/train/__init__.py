"""Training: the per-worker loop (plain PyTorch with Ray at the edges), ingest, MLflow, driver."""
