"""Shared by the benchmarks that measure Ray: a local instance, started with retries."""

from __future__ import annotations


def start_local_ray(num_cpus: int | None) -> None:
    """``ray.init`` of a quiet local instance; a starved VM can miss Ray's fixed 30 s raylet
    start-up wait, so try three times before giving up with one line."""
    import ray

    for attempt in range(3):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001
            print(f"ray.init failed (attempt {attempt + 1} of 3): {e}")
            ray.shutdown()
    raise SystemExit("ray.init failed 3 times")
