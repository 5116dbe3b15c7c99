"""Rerun the paper's test protocol with a trained model on a split of a preprocessed dataset.

    python jobs/evaluate.py --model models:/stm/latest --data OUT --split 1
    python jobs/evaluate.py --run-id RUN --data OUT --split 2 --device cuda

Prints the video accuracy of the appearance stream, the motion stream and their fusion (the
paper's prediction) over the split's test list: 25 frames and their flips, whole frames.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import OneLineParser, UsageError, fail  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="models:/NAME/latest, models:/NAME/N, ...")
    parser.add_argument("--run-id", default="", help="an MLflow run instead of --model")
    parser.add_argument("--data", required=True, help="a preprocessed dataset (jobs/preprocess.py)")
    parser.add_argument("--split", type=int, default=1)
    parser.add_argument(
        "--mlflow-uri", default="", help="default $MLFLOW_TRACKING_URI or ./mlflow.db"
    )
    parser.add_argument("--limit", type=int, help="only the first N test videos")
    parser.add_argument("--device", default="", help="cpu | cuda (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.split < 1:
        fail(parser.prog, f"--split {args.split}: need at least 1")

    import torch

    from stm.train.predict import evaluate_split, load_model_dir
    from stm.train.registry import fetch_model
    from stm.train.tracking import resolve_uri

    try:
        device = torch.device(args.device) if args.device else None
        folder, source = fetch_model(resolve_uri(args.mlflow_uri), args.model, args.run_id)
        loaded = load_model_dir(folder, source)
        result = evaluate_split(loaded, args.data, args.split, device=device, limit=args.limit)
    except UsageError as err:
        fail(parser.prog, str(err))
    except RuntimeError as err:
        fail(parser.prog, str(err).splitlines()[0])
    accs = "  ".join(f"{k} {v:.1%}" for k, v in result.accuracy.items())
    fused = result.accuracy.get("fused", next(iter(result.accuracy.values())))
    print(f"model: {loaded.source}")
    print(
        f"split {args.split} of {args.data}: {result.videos} test videos in "
        f"{result.seconds:.0f} s; video accuracy: {accs}  (error {100 * (1 - fused):.2f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
