"""What the tests share: the one tiny model every CPU test builds (two ResNet-18 streams, 2-frame
flow stacks, a few classes; STYLE.md: tests are tiny and check real properties; tests derive
variants with ``dataclasses.replace``), reading a job's own stderr lines, starting a job in its
own session and waiting for a run's first checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from stm.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

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


def wait_for_checkpoint(run_dir: Path, timeout: float = 300) -> None:
    """Until Ray Train has registered a checkpoint (its manager's snapshot names one)."""
    deadline = time.time() + timeout
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        if snapshot.is_file() and "checkpoint_" in snapshot.read_text():
            return
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint in {run_dir}")


def start_job(script: str, args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    """``python jobs/SCRIPT ARGS`` in its own session (so a test can SIGKILL its whole process
    group, as a lost driver dies), output merged into ``stdout``."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
