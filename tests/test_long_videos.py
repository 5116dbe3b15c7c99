"""Memory bounded by the work, not by the video: streaming preprocessing (byte-identical to the
in-memory path, transient memory independent of the length), tvl1-torch in bounded batches, the
long side of a frame bounded, and predict computing only the flow its 25 test stacks use.

Real videos written with PyAV (MPEG-4 part 2 in AVI, as the synthetic dataset); no Ray.
"""

from __future__ import annotations

import logging
import tracemalloc
from dataclasses import asdict

import cv2
import numpy as np
import pytest
import torch

from stm.config import JPEG_QUALITY, PreprocessConfig, UsageError, embedded_default
from stm.data import shards as S
from stm.data.decode import decode_video, resized_shape
from stm.data.flow import DISFlow, make_estimator, quantize_flow
from stm.data.preprocess import MAX_LONG_SIDE, process_video, process_video_sparse
from stm.data.sources import VideoItem
from stm.data.synthetic import SYNTHETIC_CLASSES, render_synthetic, synthetic_scene, write_video


def synthetic_video(path, num_frames: int, width: int = 96, height: int = 72, index: int = 1):
    """A video of the synthetic dataset (a textured disc moving over a textured background)."""
    write_video(str(path), render_synthetic(synthetic_scene(index, 0, width, height, num_frames)))
    return asdict(VideoItem("c/v", str(path), 0, "c", (1,), ()))


def in_memory_row(item: dict, estimator, short_side, max_long_side=MAX_LONG_SIDE) -> dict:
    """The row computed the plain way, every frame of the video in memory at once: all frames
    decoded, all grayscale frames, the flow of all pairs (one ``compute`` call for a batched
    estimator, as ``process_video`` did before it streamed), then quantised and encoded."""
    video = decode_video(item["path"], short_side, None, max_long_side)
    grays = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video.frames])
    if getattr(estimator, "batched", False):
        flows = estimator.compute(grays[:-1], grays[1:])
    else:
        flows = [estimator(grays[k], grays[k + 1]) for k in range(len(grays) - 1)]
    q = [quantize_flow(f) for f in flows]
    return {
        S.VIDEO_ID: item["video_id"],
        S.LABEL: item["label"],
        S.CLASS_NAME: item["class_name"],
        S.NUM_FRAMES: len(video.frames),
        S.FPS: video.fps,
        S.HEIGHT: video.frames.shape[1],
        S.WIDTH: video.frames.shape[2],
        S.RGB: [S.encode_jpeg(f, JPEG_QUALITY) for f in video.frames],
        S.FLOW_U: [S.encode_jpeg(u, JPEG_QUALITY) for u, _ in q],
        S.FLOW_V: [S.encode_jpeg(v, JPEG_QUALITY) for _, v in q],
        S.TRAIN_SPLITS: list(item["train_splits"]),
        S.TEST_SPLITS: list(item["test_splits"]),
    }


class BatchedDIS:
    """DIS behind the batched interface (``batched``, ``batch_size``, ``compute``), to see the
    memory of the batched path without TV-L1's cost; records the size of each call."""

    batched = True

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.calls, self._dis = batch_size, [], DISFlow()

    def compute(self, prevs: np.ndarray, nexts: np.ndarray) -> np.ndarray:
        self.calls.append(len(prevs))
        return np.stack([self._dis(p, n) for p, n in zip(prevs, nexts)])


# --- 1. streaming preprocessing ---------------------------------------------------------------
@pytest.mark.parametrize(
    "flow,size,frames,short_side",
    [("dis", (96, 72), 30, 64), ("farneback", (96, 72), 30, None), ("tvl1", (48, 32), 6, None)],
)
def test_streamed_row_is_byte_identical_to_the_in_memory_one(
    tmp_path, flow, size, frames, short_side
) -> None:
    cv2.setNumThreads(1)
    item = synthetic_video(tmp_path / "v.avi", frames, *size)
    est = make_estimator(flow)
    new, ref = process_video(item, est, short_side), in_memory_row(item, est, short_side)
    assert new == ref
    assert len(new[S.RGB]) == frames and len(new[S.FLOW_U]) == frames - 1


def _transient_bytes(fn) -> tuple[int, object]:
    """(peak - retained) bytes that Python and numpy allocated during ``fn()``, and its result:
    the memory a call needed beyond what it returns (tracemalloc sees numpy, OpenCV and PyAV
    arrays and bytes; not libav's or OpenCV's own buffers, which do not grow with a video)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current - base > 0
    return peak - current, out


def test_streaming_memory_does_not_grow_with_the_video(tmp_path) -> None:
    """Beyond its JPEG bytes, a video of 300 frames needs what one of 30 needs (a pairwise
    estimator: the previous frame; a batched one: one batch), where the in-memory path needs
    memory in proportion to the frames."""
    cv2.setNumThreads(1)
    short = synthetic_video(tmp_path / "short.avi", 30)
    long = synthetic_video(tmp_path / "long.avi", 300)
    frame = 72 * 96 * (3 + 1 + 8)  # RGB, grayscale, float flow of one frame
    for make in (DISFlow, lambda: BatchedDIS(batch_size=8)):
        est = make()
        t_short, _ = _transient_bytes(lambda est=est: process_video(short, est, None))
        t_long, row = _transient_bytes(lambda est=est: process_video(long, est, None))
        assert len(row[S.RGB]) == 300
        assert t_long < t_short + 4 * frame, (t_short, t_long)
        assert t_long < 24 * frame
        if isinstance(est, BatchedDIS):
            assert max(est.calls) == 8 and sum(est.calls) == 29 + 299  # batches of 8 at most
    t_ref, ref = _transient_bytes(lambda: in_memory_row(long, DISFlow(), None))
    assert ref == row  # the same bytes, for a fraction of the memory
    assert t_ref > 300 * frame // 2


# --- 2. tvl1-torch in bounded batches ---------------------------------------------------------
def test_tvl1_torch_streams_pairs_in_bounded_batches(tmp_path) -> None:
    """``iter_compute`` holds one batch at a time and gives the flow of one ``compute`` call of
    all pairs (float tolerance); ``process_video`` uses it: batches of ``batch_size`` pairs, and
    the same row as the in-memory path with the same batches, bit for bit."""
    from stm.data.flow_torch import BATCH_PAIRS, MAX_BATCH_PIXELS, TorchTVL1Flow

    item = synthetic_video(tmp_path / "v.avi", 6, 48, 32)
    grays = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in decode_video(item["path"]).frames]
    whole = TorchTVL1Flow(device="cpu", compile=False).compute(grays[:-1], grays[1:])
    est = TorchTVL1Flow(device="cpu", compile=False, batch_size=2)
    pulled = []

    def pairs():
        for k in range(len(grays) - 1):
            pulled.append(k)
            yield grays[k], grays[k + 1]

    flows = []
    for flow in est.iter_compute(pairs()):
        assert len(pulled) - len(flows) <= 2  # never more than one batch ahead
        flows.append(flow)
    np.testing.assert_allclose(np.stack(flows), whole, atol=1e-3)
    assert est.stats["pairs"] == 5 and est.stats["batches"] == 3  # 2 + 2 + 1

    sizes = []
    compute = est.compute
    est.compute = lambda p, n: sizes.append(len(p)) or compute(p, n)
    row = process_video(item, est, None)
    assert sizes == [2, 2, 1]
    del est.compute
    assert row == in_memory_row(item, est, None)  # one call of 5 pairs, chunked 2, 2, 1 inside
    # the bound also holds in pixels: 64 pairs of frames up to 16:9 at 256, fewer of larger ones
    default = TorchTVL1Flow(device="cpu")
    assert default.pairs_per_batch(256, 456) == BATCH_PAIRS == 64
    assert default.pairs_per_batch(256, 1024) == MAX_BATCH_PIXELS // (256 * 1024) == 28
    assert default.pairs_per_batch(4096, 4096) == 1


# --- 3. the long side bounded -----------------------------------------------------------------
def test_the_long_side_is_bounded(tmp_path, caplog) -> None:
    """A 1024x16 video at short side 256 would be 16384x256: it stays 1024x16 (the default
    bound, 1024), aspect kept, with a warning; other bounds scale it to their long side."""
    assert PreprocessConfig(out="x").max_long_side == MAX_LONG_SIDE == 1024
    assert resized_shape(16, 1024, 256) == (256, 16384)  # no bound
    assert resized_shape(16, 1024, 256, 1024) == (16, 1024)
    assert resized_shape(16, 1024, 256, 2048) == (32, 2048)
    assert resized_shape(1024, 16, 256, 512) == (512, 8)  # portrait
    assert resized_shape(240, 320, 256, 1024) == (256, 341)  # ordinary frames: unchanged
    assert resized_shape(1080, 1920, 256, 1024) == (256, 455)
    assert resized_shape(2160, 3840, None, 1024) == (576, 1024)  # native size, bounded too
    with pytest.raises(UsageError, match="--max-long-side"):
        PreprocessConfig(out="x", source="ucf101", root="r", short_side=2000)

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(16, 1100, 3)).astype(np.float32)
    strip = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 2), None, 0, 255, cv2.NORM_MINMAX)
    frames = np.stack([strip[:, 3 * t : 3 * t + 1024] for t in range(6)]).astype(np.uint8)
    path = tmp_path / "strip.avi"
    write_video(str(path), frames)
    item = asdict(VideoItem("c/strip", str(path), 0, "c", (1,), ()))
    with caplog.at_level(logging.WARNING, logger="stm.data.preprocess"):
        row = process_video(item, DISFlow(), 256)
    assert (row[S.HEIGHT], row[S.WIDTH]) == (16, 1024)
    assert S.decode_jpeg(row[S.RGB][0]).shape == (16, 1024, 3)
    assert S.decode_jpeg(row[S.FLOW_U][0], gray=True).shape == (16, 1024)
    assert "bounded to 1024" in caplog.text and "not 16384x256" in caplog.text
    row = process_video(item, DISFlow(), 256, max_long_side=2048)
    assert (row[S.HEIGHT], row[S.WIDTH]) == (32, 2048)


# --- 4. predict: only the flow of the test stacks ---------------------------------------------
@pytest.fixture(scope="module")
def loaded():
    """A random small two-stream network and what predict needs with it (DIS, native size)."""
    from stm.model import build_model
    from stm.train.predict import LoadedModel

    cfg = embedded_default(data="unused", test_frames=25)  # the paper's 25 test frames
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    pre = {"flow": "dis", "short_side": None, "jpeg_quality": JPEG_QUALITY}
    return LoadedModel(model, cfg, list(SYNTHETIC_CLASSES), pre, "test")


def full_path(loaded, video: str):
    """predict as it was: every frame and every flow of the video (``process_video``), then
    the test clip and the scores. Returns (clip, scores)."""
    from stm.data.clips import test_clip, test_clip_spec
    from stm.train.predict import _on_device, _stream_inputs
    from stm.train.steps import video_scores

    item = asdict(VideoItem("v", video, 0, "", (), ()))
    row = process_video(item, make_estimator("dis"), None, None, JPEG_QUALITY)
    clip = test_clip(row, test_clip_spec(loaded.cfg))
    cfg, cpu = loaded.cfg, torch.device("cpu")
    model, bf16 = _on_device(loaded, cpu)
    rgb, flw = _stream_inputs({k: clip[k][None] for k in ("rgb", "flow")}, cfg.stage, cpu)
    protocol = (cfg.test_pool, cfg.score_fusion)
    scores = video_scores(
        model, rgb, flw, bf16=bf16, window=cfg.num_chunks, protocols=(protocol,),
        motion_weight=cfg.motion_weight,
    )[protocol]  # fmt: skip
    return clip, {k: v[0].numpy() for k, v in scores.items()}


class CountingDIS(DISFlow):
    pairs = 0

    def __call__(self, prev, nxt):
        CountingDIS.pairs += 1
        return super().__call__(prev, nxt)


@pytest.mark.parametrize("num_frames", [8, 40, 600])
def test_predict_computes_only_the_flow_of_its_test_stacks(
    tmp_path, loaded, monkeypatch, num_frames
) -> None:
    """The same test clip and scores (1e-5) as the full path, from at most 25 x 10 flow pairs
    (8 frames: fewer flows than a stack, stacks clamped; 600 frames: 24 s at 25 fps)."""
    from stm.data import clips
    from stm.data import flow as flow_module
    from stm.train.predict import predict_video

    item = synthetic_video(tmp_path / "v.avi", num_frames, 64, 48)
    monkeypatch.setattr(flow_module, "make_estimator", lambda name, **kw: CountingDIS())
    CountingDIS.pairs = 0
    pred = predict_video(loaded, item["path"], device=torch.device("cpu"))
    spec = clips.test_clip_spec(loaded.cfg)
    times = clips.test_chunk_times(num_frames, spec)
    used = np.unique(clips.flow_stack_indices(times, num_frames - 1, spec.flow_length))
    assert CountingDIS.pairs == len(used) <= 25 * 10
    assert pred.frames == num_frames

    captured = {}
    real_test_clip = clips.test_clip
    monkeypatch.setattr(
        clips, "test_clip", lambda row, s: captured.setdefault("clip", real_test_clip(row, s))
    )
    predict_video(loaded, item["path"], device=torch.device("cpu"))
    clip, scores = full_path(loaded, item["path"])
    for key in ("rgb", "flow", "times"):
        np.testing.assert_array_equal(captured["clip"][key], clip[key])
    assert scores.keys() == pred.scores.keys()
    for k in scores:
        np.testing.assert_allclose(pred.scores[k], scores[k], atol=1e-5, rtol=0)
    if num_frames == 600:
        assert CountingDIS.pairs == 250 * 2  # no overlap; two predictions, nothing else


def test_sparse_rows_hold_the_streamed_bytes(tmp_path) -> None:
    """``process_video_sparse`` gives exactly the frames asked for, each the bytes
    ``process_video`` stores, and the whole video's frame count and size."""
    item = synthetic_video(tmp_path / "v.avi", 20)
    full = process_video(item, DISFlow(), 64)
    sparse = process_video_sparse(item, DISFlow(), 64, lambda n: ([0, 7, n - 1], [3, 4, n - 2]))
    assert sparse[S.NUM_FRAMES] == 20 and sparse[S.FPS] == full[S.FPS]
    assert (sparse[S.HEIGHT], sparse[S.WIDTH]) == (full[S.HEIGHT], full[S.WIDTH])
    assert sparse[S.RGB] == {k: full[S.RGB][k] for k in (0, 7, 19)}
    for col in (S.FLOW_U, S.FLOW_V):
        assert sparse[col] == {k: full[col][k] for k in (3, 4, 18)}
    with pytest.raises(ValueError, match="outside"):
        process_video_sparse(item, DISFlow(), 64, lambda n: ([0], [n - 1]))
