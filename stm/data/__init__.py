"""Data: sources, decoding, optical flow, Parquet shards and clip sampling."""
