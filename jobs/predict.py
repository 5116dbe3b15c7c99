"""Classify a video with a trained model: the paper's test protocol, top-5 classes.

    python jobs/predict.py VIDEO                                  # models:/stm@best
    python jobs/predict.py VIDEO --model models:/stm@best-ucf101-split1   # a dataset's best
    python jobs/predict.py VIDEO --model models:/stm/3            # a version, or /latest
    python jobs/predict.py VIDEO --run-id RUN                     # a training or sweep trial run
    python jobs/predict.py VIDEO --model ~/stm_results/runs/NAME/checkpoint_x/checkpoint.pt

The video is decoded, resized and its optical flow computed as the model's training data was
(its checkpoint carries the dataset's settings; --flow / --short-side override; a model that
does not say needs both), then scored on 25 frames and their flips, whole frames, both streams.
The store is the home's (~/stm_results/mlflow.db, $STM_HOME) unless --mlflow-uri or
$MLFLOW_TRACKING_URI say otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import UsageError, fail, parse_config  # noqa: E402
from stm.config import PredictConfig  # noqa: E402

PROG = "predict.py"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PROG, __doc__, PredictConfig, argv, positional=("video",))
    from stm.train.predict import run_predict

    try:
        loaded, pred = run_predict(cfg)
    except UsageError as err:
        fail(PROG, str(err))
    print(f"{cfg.video}: {pred.frames} frames; {loaded.source}; {pred.seconds:.1f} s")
    width = max(len(name) for name, _ in pred.top)
    for rank, (name, score) in enumerate(pred.top, start=1):
        print(f"{rank:>2}. {name:<{width}}  {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
