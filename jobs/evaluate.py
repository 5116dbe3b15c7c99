"""Rerun the paper's test protocol with a trained model on a split of a preprocessed dataset.

    python jobs/evaluate.py --data OUT --split 1       # models:/stm@best-<OUT's name>-split1
    python jobs/evaluate.py --model models:/stm/3 --data OUT --split 1
    python jobs/evaluate.py --run-id RUN --data OUT --split 2 --device cuda

Prints the video accuracy of the appearance stream, the motion stream and their fusion (the
paper's prediction) over the split's test list: 25 frames and their flips, whole frames; with the
model's test protocol, then every protocol (--test-pool window|global x --score-fusion
logits|softmax) from the same forward pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stm.cli import UsageError, fail, parse_config  # noqa: E402
from stm.config import EvaluateConfig  # noqa: E402

PROG = "evaluate.py"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PROG, __doc__, EvaluateConfig, argv, required=("data",))
    from stm.train.predict import run_evaluate

    try:
        loaded, result = run_evaluate(cfg)
    except UsageError as err:
        fail(PROG, str(err))
    accs = "  ".join(f"{k} {v:.1%}" for k, v in result.accuracy.items())
    fused = result.accuracy.get("fused", next(iter(result.accuracy.values())))
    print(f"model: {loaded.source}")
    print(
        f"split {cfg.split} of {cfg.data}: {result.videos} test videos in "
        f"{result.seconds:.0f} s; video accuracy ({result.protocol}): {accs}  "
        f"(error {100 * (1 - fused):.2f}%)"
    )
    for name, by_stream in result.protocols.items():  # test pool / score fusion
        line = "  ".join(f"{k} {v:.1%}" for k, v in by_stream.items())
        print(f"  test protocol {name}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
