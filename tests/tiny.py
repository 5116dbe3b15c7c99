"""What the tests share: the one tiny model every CPU test builds (two ResNet-18 streams, 2-frame
flow stacks, a few classes; STYLE.md: tests are tiny and check real properties; tests derive
variants with ``dataclasses.replace``), and reading a job's own stderr lines."""

from __future__ import annotations

import re

from stm.config import ModelConfig

K = 5  # classes
L = 2  # flow stack length: 2L = 4 flow channels

TINY = ModelConfig(
    num_classes=K,
    appearance_arch="resnet18",
    motion_arch="resnet18",
    flow_length=L,
    fusion="none",
    temporal="none",
    time_pool="avg",
    motion_dropout=0.0,
)


_RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\(\S.* pid=\d+")


def own_lines(stderr: str) -> list[str]:
    """The non-empty lines of a job run in this process, without the worker logs that Ray
    forwards from the session's cluster ("(MapWorker(...) pid=N) ...") whenever they arrive."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not _RAY_WORKER_LINE.match(ln)]
