"""Flow estimators and quantisation: sign and scale of known shifts, storage round trip, TV-L1 on
a tiny video written with PyAV."""

from __future__ import annotations

from dataclasses import asdict

import cv2
import numpy as np
import pytest

from stm.data import shards as S
from stm.data.decode import decode_video
from stm.data.flow import FLOW_ESTIMATORS, TVL1Flow, dequantize, make_estimator, quantize_flow
from stm.data.preprocess import process_video
from stm.data.sources import VideoItem
from stm.data.synthetic import write_video

H, W = 48, 64


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random grayscale texture (uint8)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(h, w)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 1.5)
    return cv2.normalize(smooth, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def shifted_pair(dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    """Two crops of one texture: the content of ``nxt`` is that of ``prev`` moved by (dx, dy)."""
    big = texture(H + 20, W + 20)
    y0, x0 = 10, 10
    prev = big[y0 : y0 + H, x0 : x0 + W]
    nxt = big[y0 - dy : y0 - dy + H, x0 - dx : x0 - dx + W]
    return np.ascontiguousarray(prev), np.ascontiguousarray(nxt)


def stored(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) in pixels after the storage path: clip, quantise, grayscale JPEG, dequantise."""
    u, v = quantize_flow(flow)
    u = S.decode_jpeg(S.encode_jpeg(u), gray=True)
    v = S.decode_jpeg(S.encode_jpeg(v), gray=True)
    return dequantize(u), dequantize(v)


@pytest.mark.parametrize("name", sorted(FLOW_ESTIMATORS))
@pytest.mark.parametrize("dx,dy", [(3, 0), (0, -2)])
def test_known_shift_gives_its_flow(name: str, dx: int, dy: int) -> None:
    cv2.setNumThreads(1)
    prev, nxt = shifted_pair(dx, dy)
    flow = make_estimator(name)(prev, nxt)
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32
    u, v = stored(flow)
    inner = (slice(8, -8), slice(8, -8))  # away from the borders, where content leaves the frame
    assert np.median(u[inner]) == pytest.approx(dx, abs=0.35)
    assert np.median(v[inner]) == pytest.approx(dy, abs=0.35)


def test_quantisation_matches_the_paper() -> None:
    d = np.array([-30.0, -20.0, -1.0, 0.0, 0.5, 20.0, 25.0], dtype=np.float32)
    flow = np.stack([d, -d], axis=-1)[None]  # (1, 7, 2)
    u, v = quantize_flow(flow)

    def expected(x):
        return np.round(255 * (np.clip(x, -20, 20) + 20) / 40).astype(np.uint8)

    np.testing.assert_array_equal(u[0], expected(d))
    np.testing.assert_array_equal(v[0], expected(-d))
    assert u[0, 3] == S.FLOW_CENTER  # zero motion
    back = dequantize(u[0])
    assert np.all(np.abs(back - np.clip(d, -20, 20)) <= 20 / 255 + 1e-6)


def test_unknown_estimator_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="dis, farneback, tvl1"):
        make_estimator("raft")
    assert isinstance(make_estimator(TVL1Flow), TVL1Flow)  # a class is accepted as well


def test_tvl1_on_a_tiny_video(tmp_path) -> None:
    """The default (TV-L1) path end to end: a PyAV-encoded video of a texture moving 2 px right
    per frame gives N RGB JPEGs, N - 1 flow JPEGs, and u close to 2 after dequantisation."""
    big = texture(H, W + 20, seed=1)
    n = 5
    frames = np.stack(
        [cv2.cvtColor(big[:, 10 - 2 * t : 10 - 2 * t + W], cv2.COLOR_GRAY2RGB) for t in range(n)]
    )
    path = str(tmp_path / "moving.avi")
    write_video(path, frames)
    assert decode_video(path).frames.shape == (n, H, W, 3)
    item = VideoItem("c/moving", path, 0, "c", (1,), ())
    row = process_video(asdict(item), TVL1Flow(), short_side=None)
    assert row[S.NUM_FRAMES] == n and len(row[S.RGB]) == n
    assert len(row[S.FLOW_U]) == len(row[S.FLOW_V]) == n - 1
    assert (row[S.HEIGHT], row[S.WIDTH]) == (H, W)
    assert S.decode_jpeg(row[S.RGB][0]).shape == (H, W, 3)
    u = np.stack([dequantize(S.decode_jpeg(b, gray=True)) for b in row[S.FLOW_U]])
    v = np.stack([dequantize(S.decode_jpeg(b, gray=True)) for b in row[S.FLOW_V]])
    assert np.median(u[:, 8:-8, 8:-8]) == pytest.approx(2.0, abs=0.4)
    assert np.median(v[:, 8:-8, 8:-8]) == pytest.approx(0.0, abs=0.4)
