"""TV-L1 in PyTorch (stm.data.flow_torch): agreement with OpenCV's TV-L1 after quantisation, a
batch equal to one pair at a time, known shifts recovered. Small frames, CPU."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

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
    from stm.data.sources import VideoItem
    from stm.data.synthetic import write_video

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


def small_pairs(n: int, h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """``n`` warped pairs cropped to h x w (40 x 48: every pyramid level has 2 H W <= 4096, so
    Inductor's C++ backend compiles one graph, not two)."""
    shifts = [(6, 1.3, -0.7, 1.0), (7, -2.6, 1.8, 0.0), (8, 0.5, 2.0, -1.0)][:n]
    pairs = [warped_pair(s, dx, dy, a)[:2] for s, dx, dy, a in shifts]
    return (
        np.stack([np.ascontiguousarray(p[:h, :w]) for p, _ in pairs]),
        np.stack([np.ascontiguousarray(q[:h, :w]) for _, q in pairs]),
    )


def test_sync_every_only_saves_work() -> None:
    """Checking for convergence every k inner iterations (or only once an outer iteration, as
    before) gives bit-identical flow: converged pairs are frozen by the steps themselves."""
    prevs, nexts = small_pairs(2)
    runs = {}
    for k in (1, 4, 10, 1000):
        est = TorchTVL1Flow(device="cpu", compile=False, sync_every=k)
        runs[k] = (est.compute(prevs, nexts), dict(est.stats))
    for k in (4, 10, 1000):
        assert np.array_equal(runs[k][0], runs[1][0])
    inner = {k: s["inner_iterations"] for k, (_, s) in runs.items()}
    assert inner[1] <= inner[4] <= inner[1000]
    assert inner[1000] <= 5 * 5 * 10 * 30  # warps x levels x outer x inner
    s = runs[10][1]
    assert s["pairs"] == 2 and s["batches"] == 1 and s["warps"] == 5 * len(s["level_warps"])
    assert sum(s["level_inner_iterations"].values()) == s["inner_iterations"]


def test_compiled_matches_eager() -> None:
    """torch.compile'd inner step (Inductor, the C++ backend here; fullgraph: no graph breaks).

    One step agrees with eager to float rounding (fused multiply-adds). Over a whole flow, such
    a rounding difference can move a pair's stopping test (error <= epsilon) by an iteration,
    after which the two runs differ where the flow is ill-posed: so the flow is compared after
    quantisation, and a batch still equals one pair at a time."""
    from stm.data.flow_torch import _compiled, _fused_step, _mark_unbacked

    gen = torch.Generator().manual_seed(0)
    n, h, w = 3, 20, 26
    u, g = torch.randn(n, 2, h, w, generator=gen), 10 * torch.randn(n, 2, h, w, generator=gen)
    p, rho_c = 0.1 * torch.randn(n, 2, 2, h, w, generator=gen), torch.randn(n, h, w, generator=gen)
    args = [u, p, g, (g * g).sum(1), rho_c, torch.tensor([True, False, True])]
    for t in args:
        _mark_unbacked(t, 0)
    with torch.no_grad():  # as in compute_tensor: grad mode is part of the compiled graph's key
        fused = _compiled(None)(*args, 0.045, 0.3, 0.25 / 0.3, 0.01)
        ref = _fused_step(*args, 0.045, 0.3, 0.25 / 0.3, 0.01)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    prevs, nexts = small_pairs(3)
    eager = TorchTVL1Flow(device="cpu", compile=False).compute(prevs, nexts)
    est = TorchTVL1Flow(device="cpu", compile=True)
    batch = est.compute(prevs, nexts)
    one = est.compute(prevs[1:2], nexts[1:2])[0]
    assert all(within_two_steps(batch[k], eager[k]) >= 0.99 for k in range(3))
    assert np.median(np.abs(batch - eager)) < 1e-3
    np.testing.assert_allclose(one, batch[1], atol=1e-5)


def test_a_failing_compile_falls_back_to_eager(caplog) -> None:
    """A node whose compiler toolchain fails still gets its flow (eagerly), with one warning."""
    prev, nxt, _ = warped_pair(3, 0.8, -1.1)
    eager = TorchTVL1Flow(device="cpu", compile=False)(prev, nxt)
    broken = TorchTVL1Flow(device="cpu", compile=True, compile_mode="no-such-mode")
    with caplog.at_level("WARNING", logger="stm.data.flow_torch"):
        flow = broken(prev, nxt)
    assert np.array_equal(flow, eager) and not broken.compile
    assert "running eagerly" in caplog.text and "no-such-mode" in caplog.text


def test_out_of_memory_is_raised_not_taken_for_a_compile_failure(monkeypatch) -> None:
    """A device out of memory on the first compiled call, bare or inside a compiler error, is
    raised as itself, and compilation stays on for the next call."""
    from torch._dynamo.exc import BackendCompilerFailed

    from stm.data.flow_torch import is_compile_failure

    prev, nxt, _ = warped_pair(3, 0.8, -1.1)
    est = TorchTVL1Flow(device="cpu", compile=True)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(est, "_compute", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        est(prev, nxt)
    assert est.compile

    oom = torch.OutOfMemoryError("CUDA out of memory")
    wrapped = BackendCompilerFailed.__new__(BackendCompilerFailed)
    wrapped.__cause__ = oom
    assert not is_compile_failure(oom) and not is_compile_failure(wrapped)
    compile_error = BackendCompilerFailed.__new__(BackendCompilerFailed)
    compile_error.__cause__ = RuntimeError("Failed to find C compiler")
    assert is_compile_failure(compile_error)
    assert not is_compile_failure(RuntimeError("an ordinary bug"))
