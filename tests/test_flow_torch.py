"""TV-L1 in PyTorch (stm.data.flow_torch): agreement with OpenCV's TV-L1 after quantisation, a
batch equal to one pair at a time, known shifts recovered. Small frames, CPU."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stm.data.flow import FLOW_ESTIMATORS, make_estimator, quantize_flow
from stm.data.flow_torch import TorchTVL1Flow

H, W = 48, 64


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(h, w)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 1.5)
    return cv2.normalize(smooth, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def warped_pair(seed: int, dx: float, dy: float, angle: float = 0.0):
    """(prev, next, true flow): ``next`` is ``prev`` rotated by ``angle`` degrees about the centre
    and moved by (dx, dy) (bicubic, sub-pixel), cropped away from the borders."""
    big = texture(H + 40, W + 40, seed)
    m = cv2.getRotationMatrix2D(((W + 40) / 2, (H + 40) / 2), angle, 1.0)
    m[:, 2] += (dx, dy)
    moved = cv2.warpAffine(big, m, (W + 40, H + 40), flags=cv2.INTER_CUBIC)
    ys, xs = np.mgrid[20 : 20 + H, 20 : 20 + W].astype(np.float64)
    true = np.stack(
        [m[0, 0] * xs + m[0, 1] * ys + m[0, 2] - xs, m[1, 0] * xs + m[1, 1] * ys + m[1, 2] - ys],
        axis=-1,
    )
    crop = (slice(20, 20 + H), slice(20, 20 + W))
    return np.ascontiguousarray(big[crop]), np.ascontiguousarray(moved[crop]), true


def within_two_steps(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels whose quantised u and v both differ by at most 2 steps."""
    qa = np.stack(quantize_flow(a)).astype(int)
    qb = np.stack(quantize_flow(b)).astype(int)
    return float((np.abs(qa - qb) <= 2).all(axis=0).mean())


def epe(flow: np.ndarray, true: np.ndarray) -> float:
    inner = (slice(8, -8), slice(8, -8))
    return float(np.linalg.norm(flow[inner] - true[inner], axis=-1).mean())


@pytest.fixture(scope="module")
def estimator() -> TorchTVL1Flow:
    return TorchTVL1Flow(device="cpu")


def test_defaults_are_opencvs() -> None:
    cv = cv2.optflow.DualTVL1OpticalFlow_create()
    ours = TorchTVL1Flow(device="cpu")
    assert ours.tau == cv.getTau() and ours.lambda_ == cv.getLambda()
    assert ours.theta == cv.getTheta() and ours.gamma == cv.getGamma()
    assert ours.nscales == cv.getScalesNumber() and ours.warps == cv.getWarpingsNumber()
    assert ours.epsilon == cv.getEpsilon() and ours.scale_step == cv.getScaleStep()
    assert ours.inner_iterations == cv.getInnerIterations()
    assert ours.outer_iterations == cv.getOuterIterations()
    assert ours.median_filtering == cv.getMedianFiltering()


@pytest.mark.parametrize("seed,dx,dy,angle", [(0, 1.3, -0.7, 1.0), (1, -2.6, 1.8, 0.0)])
def test_agrees_with_opencv(estimator, seed: int, dx: float, dy: float, angle: float) -> None:
    cv2.setNumThreads(1)
    prev, nxt, true = warped_pair(seed, dx, dy, angle)
    ref = cv2.optflow.DualTVL1OpticalFlow_create().calc(prev, nxt, None)
    ours = estimator(prev, nxt)
    assert ours.shape == (H, W, 2) and ours.dtype == np.float32
    assert within_two_steps(ours, ref) >= 0.9
    assert epe(ours, true) <= epe(ref, true) + 0.01


def test_batch_equals_one_pair_at_a_time(estimator) -> None:
    pairs = [
        warped_pair(s, dx, dy)[:2] for s, dx, dy in [(2, 0.5, 0.0), (3, -1.0, 2.0), (4, 3.0, 1.0)]
    ]
    prevs = np.stack([p for p, _ in pairs])
    nexts = np.stack([n for _, n in pairs])
    batch = estimator.compute(prevs, nexts)
    assert batch.shape == (3, H, W, 2)
    for k, (p, n) in enumerate(pairs):
        np.testing.assert_allclose(batch[k], estimator(p, n), atol=1e-3)


@pytest.mark.parametrize("dx,dy", [(3, 0), (0, -2)])
def test_known_shift(estimator, dx: int, dy: int) -> None:
    prev, nxt, true = warped_pair(5, dx, dy)
    flow = estimator(prev, nxt)
    inner = (slice(8, -8), slice(8, -8))
    assert np.median(flow[inner][..., 0]) == pytest.approx(dx, abs=0.1)
    assert np.median(flow[inner][..., 1]) == pytest.approx(dy, abs=0.1)
    assert epe(flow, true) < 0.3


def test_registered_as_tvl1_torch() -> None:
    assert "tvl1-torch" in FLOW_ESTIMATORS
    est = make_estimator("tvl1-torch")
    assert isinstance(est, TorchTVL1Flow) and est.batched


def test_process_video_batches_all_pairs(tmp_path, estimator) -> None:
    """The preprocessing sends all pairs of a video through ``compute`` at once."""
    pytest.importorskip("av")
    from dataclasses import asdict

    from stm.data import shards as S
    from stm.data.flow import dequantize
    from stm.data.preprocess import process_video
    from stm.data.sources import VideoItem, write_video

    big = texture(H, W + 20, seed=1)
    frames = np.stack(
        [cv2.cvtColor(big[:, 10 - 2 * t : 10 - 2 * t + W], cv2.COLOR_GRAY2RGB) for t in range(3)]
    )
    path = str(tmp_path / "moving.avi")
    write_video(path, frames)
    calls = []

    class Spy:
        batched = True

        def compute(self, prevs, nexts):
            calls.append(len(prevs))
            return estimator.compute(prevs, nexts)

    row = process_video(asdict(VideoItem("c/m", path, 0, "c", (1,), ())), Spy(), short_side=None)
    assert calls == [2] and len(row[S.FLOW_U]) == 2
    u = np.stack([dequantize(S.decode_jpeg(b, gray=True)) for b in row[S.FLOW_U]])
    assert np.median(u[:, 8:-8, 8:-8]) == pytest.approx(2.0, abs=0.4)
