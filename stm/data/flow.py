"""Optical flow estimators and the flow quantisation used for storage.

Each estimator is a callable class, built once per worker (OpenCV objects are not cheap to create
and hold no per-video state): ``flow = estimator(prev_gray, next_gray)`` with uint8 (H, W) inputs
and a float32 (H, W, 2) output of (u, v) pixel displacements from ``prev`` to ``next``
(u > 0: content moves right, v > 0: content moves down).

Storage follows the two-stream papers (Simonyan & Zisserman 2014; Feichtenhofer et al. 2016/2017):
displacements are clipped to +-20 px and mapped linearly to uint8 with
``q = round(255 * (d + 20) / 40)``, so zero motion is 128 (``FLOW_CENTER``).

Workers should call ``cv2.setNumThreads(1)``: parallelism comes from running one video per core.

``iter_flows(estimator, pairs)`` streams pairs through any estimator: one call a pair, or bounded
batches for a batched one (tvl1-torch), so a long video never holds more than a batch of frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import cv2
import numpy as np

from stm.data.shards import FLOW_BOUND

logger = logging.getLogger(__name__)


class TVL1Flow:
    """OpenCV contrib Dual TV-L1 (Zach et al. 2007) with OpenCV's default parameters.

    The flow the paper and the authors' code use. About 1.3 s per 320x240 pair on one core.
    """

    name = "tvl1"

    def __init__(self) -> None:
        self._tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return _check(self._tvl1.calc(prev, nxt, None), prev)


class DISFlow:
    """OpenCV DIS flow (Kroeger et al. 2016), the "medium" preset: ~100x faster than TV-L1."""

    name = "dis"

    def __init__(self, preset: int = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM) -> None:
        self._dis = cv2.DISOpticalFlow_create(preset)

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return _check(self._dis.calc(prev, nxt, None), prev)


class FarnebackFlow:
    """OpenCV Farneback flow with the parameters of OpenCV's own sample (dense, fast, smooth)."""

    name = "farneback"

    def __init__(
        self,
        pyr_scale: float = 0.5,
        levels: int = 3,
        winsize: int = 15,
        iterations: int = 3,
        poly_n: int = 5,
        poly_sigma: float = 1.2,
    ) -> None:
        self._args = (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, 0)

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return _check(cv2.calcOpticalFlowFarneback(prev, nxt, None, *self._args), prev)


def _torch_tvl1(**kwargs):
    """TV-L1 in PyTorch (``stm.data.flow_torch.TorchTVL1Flow``), imported on first use so that
    the OpenCV estimators need no torch; on CUDA when present, batched through ``compute``."""
    from stm.data.flow_torch import TorchTVL1Flow

    return TorchTVL1Flow(**kwargs)


# name -> estimator class or factory; a class itself is accepted wherever a name is (see
# ``make_estimator``).
FLOW_ESTIMATORS: dict[str, type | Callable] = {
    TVL1Flow.name: TVL1Flow,
    DISFlow.name: DISFlow,
    FarnebackFlow.name: FarnebackFlow,
    "tvl1-torch": _torch_tvl1,
}


def make_estimator(flow: str | type, **kwargs):
    """Build the estimator named ``flow`` (a key of ``FLOW_ESTIMATORS``) or of class ``flow``;
    ``kwargs`` go to its constructor (e.g. ``device`` for tvl1-torch)."""
    if isinstance(flow, type):
        return flow(**kwargs)
    if flow not in FLOW_ESTIMATORS:
        valid = ", ".join(sorted(FLOW_ESTIMATORS))
        raise ValueError(f"unknown flow algorithm {flow!r} (valid: {valid})")
    return FLOW_ESTIMATORS[flow](**kwargs)


# pairs per ``compute`` call of a batched estimator with neither ``iter_compute`` nor
# ``batch_size``: tvl1-torch's default (stm.data.flow_torch.BATCH_PAIRS)
DEFAULT_BATCH_PAIRS = 64


def iter_flows(estimator, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
    """The flow of each (prev, next) grayscale pair of ``pairs``, in order, pulling the pairs
    lazily: a pairwise estimator is called once per pair (one pair held at a time); a batched
    one (``batched = True``) through its ``iter_compute`` when it has one, else through
    ``compute`` in batches of its ``batch_size`` pairs (at most one batch of frames and flows
    held). Either way memory is bounded by the batch, not by the number of pairs."""
    if not getattr(estimator, "batched", False):
        for prev, nxt in pairs:
            yield estimator(prev, nxt)
        return
    if hasattr(estimator, "iter_compute"):
        yield from estimator.iter_compute(pairs)
        return
    size = max(1, int(getattr(estimator, "batch_size", DEFAULT_BATCH_PAIRS)))
    prevs: list[np.ndarray] = []
    nexts: list[np.ndarray] = []
    for prev, nxt in pairs:
        prevs.append(prev)
        nexts.append(nxt)
        if len(prevs) == size:
            yield from own_flows(estimator.compute(np.stack(prevs), np.stack(nexts)))
            prevs, nexts = [], []
    if prevs:
        yield from own_flows(estimator.compute(np.stack(prevs), np.stack(nexts)))


def own_flows(batch: np.ndarray) -> Iterator[np.ndarray]:
    """The flows of a batch, each a copy: a view would keep the whole batch alive while the
    caller still holds its last flow and the next batch is computed (two batches at once)."""
    for k in range(len(batch)):
        yield batch[k].copy()


def consecutive_pairs(frames: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(frame k, frame k + 1) for k = 0, 1, ...: the pairs of flow k, keeping one frame back."""
    prev = None
    for frame in frames:
        if prev is not None:
            yield prev, frame
        prev = frame


def _check(flow: np.ndarray, prev: np.ndarray) -> np.ndarray:
    if flow.shape != (*prev.shape[:2], 2):
        raise ValueError(f"flow of shape {flow.shape} for frames of shape {prev.shape}")
    return flow.astype(np.float32, copy=False)


def quantize_flow(flow: np.ndarray, bound: float = FLOW_BOUND) -> tuple[np.ndarray, np.ndarray]:
    """Clip (H, W, 2) displacements to +-bound and map them to uint8 (u, v) images.

    ``q = round(255 * (d + bound) / (2 * bound))``; zero motion maps to 128.
    """
    clipped = np.clip(flow, -bound, bound)
    q = np.round(255.0 * (clipped + bound) / (2.0 * bound)).astype(np.uint8)
    return q[..., 0], q[..., 1]


def dequantize(q: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """Invert ``quantize_flow`` for one uint8 image: pixel displacements as float32.

    The step is 40/255 = 0.157 px; displacements beyond +-bound come back as +-bound.
    """
    return (q.astype(np.float32) * (2.0 * bound / 255.0) - bound).astype(np.float32)
