"""Does the flow-actor pool of ``jobs/preprocess.py`` (no ``--workers``) grow with its backlog?

Sixteen one-second stand-in groups on a local Ray, the pool starting at one actor as on an
autoscaling cluster with nothing at rest (``stm.data.preprocess.flow_actor_pool``), next to the
same pool with one group in flight per actor (what stm had before). Prints actors used and wall
time for each, and whether Ray Data warned that the pool cannot scale up.

    python benchmarks/flow_pool.py
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stm.data.preprocess import flow_actor_pool  # noqa: E402

GROUPS, MAX_ACTORS = 16, 8


class Group:
    def __call__(self, row: dict) -> dict:
        time.sleep(1.0)
        return {"pid": os.getpid()}


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    import ray
    from bench_ray import start_local_ray

    start_local_ray(2)
    ray.data.range(1).take_all()  # Ray Data sets up its logging at its first execution
    warned = Warnings()
    logging.getLogger("ray.data._internal.actor_autoscaler.default_actor_autoscaler").addHandler(
        warned
    )
    stm_pool, how = flow_actor_pool(None, 0.0, MAX_ACTORS, {"CPU": 1.0})
    one = ray.data.ActorPoolStrategy(
        min_size=1, max_size=MAX_ACTORS, max_tasks_in_flight_per_actor=1
    )
    for name, pool in (("stm (no --workers)", stm_pool), ("one group in flight", one)):
        warned.lines.clear()
        start = time.perf_counter()
        ds = ray.data.from_items([{"g": i} for i in range(GROUPS)], override_num_blocks=GROUPS)
        rows = ds.map(Group, compute=pool, num_cpus=0.25).take_all()
        cannot = any("will not allow it to scale up" in line for line in warned.lines)
        print(
            f"flow_pool: {name}: {GROUPS} one-second groups, pool 1..{MAX_ACTORS}: "
            f"{len({r['pid'] for r in rows})} actors, {time.perf_counter() - start:.1f} s, "
            f"Ray Data warned it cannot scale up: {cannot}"
        )
    print(f"flow_pool: stm's pool: {how}")


if __name__ == "__main__":
    main()
