"""Classify a video with a trained model: the paper's test protocol, top-5 classes.

    python jobs/predict.py VIDEO --model models:/stm/latest      # the newest registered version
    python jobs/predict.py VIDEO --model models:/stm/3            # or @ALIAS, runs:/RUN/model
    python jobs/predict.py VIDEO --run-id RUN                     # a training or sweep trial run
    python jobs/predict.py VIDEO --model runs/NAME/checkpoint_x   # a local checkpoint

The video is decoded, resized and its optical flow computed as the training data was (the
model carries its dataset.json; --flow / --short-side override), then scored on 25 frames and
their flips, whole frames, both streams averaged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import OneLineParser, UsageError, fail  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from stm.data.flow import FLOW_ESTIMATORS

    parser = OneLineParser(prog="predict.py", description=__doc__.split("\n")[0])
    parser.add_argument("video", help="a video file (local path or s3:// / gs:// URI)")
    parser.add_argument("--model", default="", help="models:/NAME/latest, models:/NAME/N, ...")
    parser.add_argument("--run-id", default="", help="an MLflow run instead of --model")
    parser.add_argument(
        "--mlflow-uri", default="", help="default $MLFLOW_TRACKING_URI or ./mlflow.db"
    )
    parser.add_argument("--flow", choices=sorted(FLOW_ESTIMATORS), help="default: the model's data")
    parser.add_argument("--short-side", type=int, help="default: the model's data; 0 = native")
    parser.add_argument("--test-frames", type=int, help="default: the model's (25 in the paper)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", default="", help="cpu | cuda (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or (args.test_frames is not None and args.test_frames < 1):
        fail(parser.prog, "--top-k and --test-frames must be at least 1")

    import torch

    from stm.data.decode import DecodeError
    from stm.train.predict import load_model_dir, predict_video
    from stm.train.registry import fetch_model
    from stm.train.tracking import resolve_uri

    try:
        device = torch.device(args.device) if args.device else None
        folder, source = fetch_model(resolve_uri(args.mlflow_uri), args.model, args.run_id)
        loaded = load_model_dir(folder, source)
        pred = predict_video(
            loaded,
            args.video,
            flow=args.flow,
            short_side=args.short_side,
            top_k=args.top_k,
            test_frames=args.test_frames,
            device=device,
        )
    except (UsageError, DecodeError) as err:
        text = str(err)
        if isinstance(err, DecodeError) and args.video not in text:
            text = f"{args.video}: {text}"
        fail(parser.prog, text)
    except RuntimeError as err:  # e.g. an unknown --device
        fail(parser.prog, str(err).splitlines()[0])
    print(f"{args.video}: {pred.frames} frames; {loaded.source}; {pred.seconds:.1f} s")
    width = max(len(name) for name, _ in pred.top)
    for rank, (name, score) in enumerate(pred.top, start=1):
        print(f"{rank:>2}. {name:<{width}}  {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
