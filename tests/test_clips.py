"""Clip sampling: temporal sampling, flow stacks, crops and flips, test views, model inputs.

Rows are built from real JPEG bytes. "Level" videos encode each frame's index as a constant
colour, so a test can read back which frames were sampled; "texture" videos repeat one smooth
random image in every RGB, u and v frame, so a test can check where a crop came from.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from stm.data import clips as C
from stm.data.shards import (
    FLOW_U,
    FLOW_V,
    HEIGHT,
    LABEL,
    NUM_FRAMES,
    RGB,
    VIDEO_ID,
    WIDTH,
    decode_jpeg,
)

H, W, N = 48, 64, 40
S = 32  # crop size for the tiny frames
L = 10


def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


# Frame index <-> constant level (each well inside [0, 255], 5 levels apart).
def rgb_level(i):
    return 10 + 5 * i  # R channel; B = 250 - 5 i; G = 128


def u_level(k):
    return 10 + 5 * k


def v_level(k):
    return 250 - 5 * k


def read_index(level: float, fn) -> int:
    """The index whose level is nearest to the measured one (asserting it is close)."""
    cands = np.arange(N)
    best = int(np.argmin(np.abs(fn(cands) - level)))
    assert abs(fn(best) - level) < 2.0, (level, best)
    return best


def level_row(n: int = N, video_id: str = "a/level", label: int = 3) -> dict:
    rgb = []
    for i in range(n):
        img = np.empty((H, W, 3), np.uint8)
        img[..., 0] = 250 - 5 * i  # OpenCV stores BGR: channel 0 is blue
        img[..., 1] = 128
        img[..., 2] = rgb_level(i)
        rgb.append(_jpeg(img))
    u = [_jpeg(np.full((H, W), u_level(k), np.uint8)) for k in range(n - 1)]
    v = [_jpeg(np.full((H, W), v_level(k), np.uint8)) for k in range(n - 1)]
    return {
        VIDEO_ID: video_id,
        LABEL: label,
        NUM_FRAMES: n,
        HEIGHT: H,
        WIDTH: W,
        RGB: rgb,
        FLOW_U: u,
        FLOW_V: v,
    }


def _texture(seed: int = 0) -> np.ndarray:
    """A smooth random gray image with no symmetry (values in ~[40, 215])."""
    g = np.random.default_rng(seed).uniform(40, 215, size=(4, 5)).astype(np.float32)
    return cv2.resize(g, (W, H), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def texture_row(n: int = N) -> dict:
    tex = _texture()
    rgb = _jpeg(cv2.cvtColor(tex, cv2.COLOR_GRAY2BGR))
    flow = _jpeg(tex)
    return {
        VIDEO_ID: "b/texture",
        LABEL: 1,
        NUM_FRAMES: n,
        HEIGHT: H,
        WIDTH: W,
        RGB: [rgb] * n,
        FLOW_U: [flow] * (n - 1),
        FLOW_V: [flow] * (n - 1),
    }


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


# --- temporal sampling ------------------------------------------------------------------------


def test_chunk_times_stride_in_range_and_increasing():
    rng = np.random.default_rng(0)
    strides, starts = [], []
    for _ in range(500):
        t = C.sample_chunk_times(200, 5, (5, 35), rng=rng)
        assert t.shape == (5,) and t.dtype == np.int64
        d = np.diff(t)
        assert (d == d[0]).all() and 5 <= d[0] <= 35
        assert t[0] >= 0 and t[-1] <= 199
        strides.append(d[0])
        starts.append(t[0])
    assert min(strides) <= 7 and max(strides) >= 33  # the whole range is used
    assert len(set(starts)) > 50


def test_chunk_times_short_videos():
    rng = np.random.default_rng(1)
    # stride 20 does not fit 30 frames x 5 chunks: the largest stride that fits is 29 // 4 = 7
    for _ in range(20):
        t = C.sample_chunk_times(30, 5, (20, 20), rng=rng)
        assert (np.diff(t) == 7).all() and t[0] >= 0 and t[-1] <= 29
    # exactly fits with stride 1
    assert C.sample_chunk_times(5, 5, (5, 35), rng=rng).tolist() == [0, 1, 2, 3, 4]
    # fewer frames than chunks: repeated frames, non-decreasing, the whole video used
    t = C.sample_chunk_times(3, 11, (5, 35), rng=rng)
    assert t.shape == (11,) and (np.diff(t) >= 0).all()
    assert t[0] == 0 and t[-1] == 2 and set(t.tolist()) == {0, 1, 2}
    assert C.sample_chunk_times(1, 5, rng=rng).tolist() == [0] * 5
    one = C.sample_chunk_times(10, 1, rng=rng)
    assert one.shape == (1,) and 0 <= one[0] <= 9


def test_flow_stack_indices_centred_and_clamped():
    assert C.flow_stack_indices(20, 39).tolist() == list(range(15, 25))  # t-5 .. t+4
    assert C.flow_stack_indices(2, 39).tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert C.flow_stack_indices(36, 39).tolist() == [31, 32, 33, 34, 35, 36, 37, 38, 38, 38]
    assert C.flow_stack_indices(39, 39).tolist() == [34, 35, 36, 37, 38, 38, 38, 38, 38, 38]
    assert C.flow_stack_indices(3, 1).tolist() == [0] * 10
    assert C.flow_stack_indices(10, 39, flow_length=4).tolist() == [8, 9, 10, 11]
    with pytest.raises(ValueError):
        C.flow_stack_indices(0, 0)


def test_test_chunk_times_uniform():
    t = C.test_chunk_times(N, 25)
    assert t.tolist() == np.round(np.linspace(0, N - 1, 25)).astype(int).tolist()
    assert t[0] == 0 and t[-1] == N - 1


# --- crop boxes -------------------------------------------------------------------------------


def _grid_place(offset: int, room: int) -> int | None:
    """0, 1, 2 when offset is flush left/top, centred, flush right/bottom in `room` free pixels."""
    places = [0, round(room / 2), room]
    return places.index(offset) if offset in places else None


def test_jitter_crop_box():
    rng = np.random.default_rng(2)
    positions = set()
    for _ in range(400):
        b = C.jitter_crop_box(256, 340, 224, rng=rng)
        assert 168 <= b.w <= 280 and 168 <= b.h <= 256  # +-25 %, height clipped to the frame
        assert b.y >= 0 and b.x >= 0 and b.y + b.h <= 256 and b.x + b.w <= 340
        px, py = _grid_place(b.x, 340 - b.w), _grid_place(b.y, 256 - b.h)
        assert px is not None and py is not None
        if b.h < 250:  # otherwise the vertical places coincide
            positions.add((py, px))
    assert len(positions) == 9  # corners, border centres and centre


def test_multiscale_corner_box():
    rng = np.random.default_rng(3)
    seen_sizes, seen_pos = set(), set()
    for _ in range(400):
        b = C.multiscale_corner_box(256, 340, 224, rng=rng)
        assert b.h in (256, 224, 192, 168) and b.w in (256, 224, 192, 168)
        assert b.y + b.h <= 256 and b.x + b.w <= 340
        seen_sizes.add((b.h, b.w))
        if b.h < 256:
            pos = (_grid_place(b.y, 256 - b.h), _grid_place(b.x, 340 - b.w))
            assert pos in {(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)}
            seen_pos.add(pos)
    assert len(seen_sizes) == 16 and len(seen_pos) == 5
    # sizes scale with the crop size and are clipped to small frames
    b = C.multiscale_corner_box(48, 64, 56, rng=rng)
    assert b.h <= 48 and b.w in (64, 56, 48, 42)


# --- train clips ------------------------------------------------------------------------------


def test_train_clip_samples_frames_and_interleaved_flow_stacks():
    row = level_row()
    for seed in range(5):
        out = C.train_clip(row, crop_size=S, flip_prob=0.0, rng=np.random.default_rng(seed))
        assert out["rgb"].shape == (5, 3, S, S) and out["rgb"].dtype == np.uint8
        assert out["flow"].shape == (5, 2 * L, S, S) and out["flow"].dtype == np.uint8
        assert out["label"] == 3
        for i, t in enumerate(out["times"]):
            # RGB order: channel 0 is red (R = 10 + 5 i), channel 2 blue (250 - 5 i)
            assert read_index(out["rgb"][i, 0].mean(), rgb_level) == t
            assert read_index(out["rgb"][i, 2].mean(), lambda j: 250 - 5 * j) == t
            expected = C.flow_stack_indices(int(t), N - 1)
            u = [read_index(out["flow"][i, 2 * k].mean(), u_level) for k in range(L)]
            v = [read_index(out["flow"][i, 2 * k + 1].mean(), v_level) for k in range(L)]
            assert u == expected.tolist() and v == expected.tolist()


def test_train_clip_flow_stack_clamped_at_video_ends():
    row = level_row()
    out = C.train_clip(
        row,
        crop_size=S,
        num_chunks=5,
        stride_range=(9, 9),
        flip_prob=0.0,
        rng=np.random.default_rng(0),
    )
    # 40 frames, 5 chunks, stride 9: span 37, start in 0..3; both ends get clamped stacks
    t0 = int(out["times"][0])
    u0 = [read_index(out["flow"][0, 2 * k].mean(), u_level) for k in range(L)]
    assert u0 == np.clip(np.arange(t0 - 5, t0 + 5), 0, N - 2).tolist()
    assert u0[0] == 0


def test_train_clip_flip_mirrors_and_inverts_u_only():
    row = texture_row()
    for crop in ("jitter", "multiscale"):
        a = C.train_clip(row, crop_size=S, crop=crop, flip_prob=0.0, rng=np.random.default_rng(7))
        b = C.train_clip(row, crop_size=S, crop=crop, flip_prob=1.0, rng=np.random.default_rng(7))
        assert not a["flip"] and b["flip"] and a["box"] == b["box"]
        np.testing.assert_array_equal(b["rgb"], a["rgb"][..., ::-1])
        np.testing.assert_array_equal(b["flow"][:, 0::2], 255 - a["flow"][:, 0::2][..., ::-1])
        np.testing.assert_array_equal(b["flow"][:, 1::2], a["flow"][:, 1::2][..., ::-1])
    # on level videos: flipped u reads as 255 - u, v unchanged
    out = C.train_clip(level_row(), crop_size=S, flip_prob=1.0, rng=np.random.default_rng(0))
    t = int(out["times"][2])
    idx = C.flow_stack_indices(t, N - 1)
    u = [read_index(out["flow"][2, 2 * k].mean(), lambda j: 255 - u_level(j)) for k in range(L)]
    v = [read_index(out["flow"][2, 2 * k + 1].mean(), v_level) for k in range(L)]
    assert u == idx.tolist() and v == idx.tolist()


@pytest.mark.parametrize("crop", ["jitter", "multiscale"])
def test_train_clip_same_crop_for_both_streams_and_all_chunks(crop):
    row = texture_row()
    tex = _texture()
    flips = set()
    for seed in range(12):
        out = C.train_clip(row, crop_size=S, crop=crop, rng=np.random.default_rng(seed))
        flips.add(out["flip"])
        box = out["box"]
        # the expected view from the (uncompressed) texture and the reported box
        ref = cv2.resize(
            tex[box.y : box.y + box.h, box.x : box.x + box.w],
            (S, S),
            interpolation=cv2.INTER_LINEAR,
        )
        if out["flip"]:
            ref = ref[:, ::-1]
        for i in range(out["rgb"].shape[0]):
            for c in range(3):
                assert mean_abs(out["rgb"][i, c], ref) < 2.0
            for k in range(L):
                u = out["flow"][i, 2 * k]
                assert mean_abs(255 - u if out["flip"] else u, ref) < 2.0
                assert mean_abs(out["flow"][i, 2 * k + 1], ref) < 2.0
    assert flips == {False, True}


def test_train_clip_decodes_only_needed_jpegs():
    class Recorder(list):
        def __init__(self, items):
            super().__init__(items)
            self.seen: list[int] = []

        def __getitem__(self, i):
            self.seen.append(int(i))
            return super().__getitem__(i)

    row = level_row()
    for col in (RGB, FLOW_U, FLOW_V):
        row[col] = Recorder(row[col])
    out = C.train_clip(row, crop_size=S, rng=np.random.default_rng(0))
    times = out["times"].tolist()
    stacks = {int(f) for t in times for f in C.flow_stack_indices(t, N - 1)}
    assert set(row[RGB].seen) == set(times) and len(row[RGB].seen) == len(set(times))
    assert set(row[FLOW_U].seen) == stacks and len(row[FLOW_U].seen) == len(stacks)
    assert set(row[FLOW_V].seen) == stacks


def test_train_clip_rejects_unknown_crop():
    with pytest.raises(ValueError, match="jitter"):
        C.train_clip(level_row(), crop="random", rng=np.random.default_rng(0))


def _noise_row(n: int = 12) -> dict:
    """A row whose RGB, u and v frames are all different random images (no symmetry)."""
    rng = np.random.default_rng(5)
    rgb = [_jpeg(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(n)]
    u = [_jpeg(rng.integers(0, 256, (H, W), dtype=np.uint8)) for _ in range(n - 1)]
    v = [_jpeg(rng.integers(0, 256, (H, W), dtype=np.uint8)) for _ in range(n - 1)]
    return {VIDEO_ID: "c/noise", LABEL: 0, NUM_FRAMES: n, RGB: rgb, FLOW_U: u, FLOW_V: v}


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(
    "box, out",
    [
        (C.CropBox(3, 5, 40, 50), (S, S)),  # shrink
        (C.CropBox(10, 20, 24, 30), (S, S)),  # enlarge, non-square crop
        (C.CropBox(0, 0, H, W), (H, W)),  # no resize (full-frame test view)
    ],
)
def test_chunk_flow_stack_matches_per_plane_reference(box, out, flip):
    """chunk resizes the flow planes into one preallocated stack, then mirrors the whole stack
    and inverts u in place: it must give the straightforward per-plane result (crop,
    INTER_LINEAR resize, mirror, u -> 255 - u on a flip), into a given array or a new one."""
    row = _noise_row()
    frames = C.FrameCache(row)
    idx = C.flow_stack_indices(6, row[NUM_FRAMES] - 1)  # clamped at the end: 1 .. 10
    out_h, out_w = out
    rgb, flow = C.chunk(frames, 6, idx, box, out_h, out_w, flip)
    assert rgb.shape == (3, out_h, out_w) and flow.shape == (2 * L, out_h, out_w)
    into = np.zeros((2, 2 * L, out_h, out_w), np.uint8)
    C.chunk(frames, 6, idx, box, out_h, out_w, flip, into[1])
    np.testing.assert_array_equal(into[1], flow)
    assert not into[0].any()

    def ref(img):
        crop = img[box.y : box.y + box.h, box.x : box.x + box.w]
        if crop.shape[:2] != (out_h, out_w):
            crop = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        return crop[:, ::-1] if flip else crop

    expected = np.empty_like(flow)
    for k, f in enumerate(idx):
        u = ref(decode_jpeg(row[FLOW_U][f], gray=True)).astype(np.int16)
        expected[2 * k] = 255 - u if flip else u
        expected[2 * k + 1] = ref(decode_jpeg(row[FLOW_V][f], gray=True))
    np.testing.assert_array_equal(flow, expected)
    np.testing.assert_array_equal(rgb, ref(decode_jpeg(row[RGB][6])).transpose(2, 0, 1))


# --- test views -------------------------------------------------------------------------------


def test_test_clip_full_frame_and_flip():
    out = C.test_clip(level_row(), mode="full")
    assert out["rgb"].shape == (2, 25, 3, H, W) and out["rgb"].dtype == np.uint8
    assert out["flow"].shape == (2, 25, 2 * L, H, W)
    assert out["label"] == 3
    times = np.round(np.linspace(0, N - 1, 25)).astype(int)
    assert out["times"].tolist() == times.tolist()
    for i, t in enumerate(times):
        assert read_index(out["rgb"][0, i, 0].mean(), rgb_level) == t
        u = [read_index(out["flow"][0, i, 2 * k].mean(), u_level) for k in range(L)]
        assert u == C.flow_stack_indices(int(t), N - 1).tolist()
    tex_out = C.test_clip(texture_row(), num_frames=4, mode="full")
    r, f = tex_out["rgb"], tex_out["flow"]
    np.testing.assert_array_equal(r[1], r[0][..., ::-1])
    np.testing.assert_array_equal(f[1, :, 0::2], 255 - f[0, :, 0::2][..., ::-1])
    np.testing.assert_array_equal(f[1, :, 1::2], f[0, :, 1::2][..., ::-1])
    assert mean_abs(r[0, 0, 0], _texture()) < 2.0  # the whole frame, unresized


def test_test_clip_ten_crop():
    out = C.test_clip(texture_row(), num_frames=3, mode="10crop", crop_size=S)
    r, f = out["rgb"], out["flow"]
    assert r.shape == (10, 3, 3, S, S) and f.shape == (10, 3, 2 * L, S, S)
    full = C.test_clip(texture_row(), num_frames=3, mode="full")["rgb"][0]  # (T, 3, H, W)
    corners = [(0, 0), (0, W - S), (H - S, 0), (H - S, W - S), ((H - S) // 2, (W - S) // 2)]
    for v, (y, x) in enumerate(corners):
        np.testing.assert_array_equal(r[v], full[..., y : y + S, x : x + S])
        np.testing.assert_array_equal(r[v + 5], r[v][..., ::-1])
        np.testing.assert_array_equal(f[v + 5, :, 0::2], 255 - f[v, :, 0::2][..., ::-1])
        np.testing.assert_array_equal(f[v + 5, :, 1::2], f[v, :, 1::2][..., ::-1])
    with pytest.raises(ValueError, match="full"):
        C.test_clip(texture_row(), mode="center")


# --- model inputs -----------------------------------------------------------------------------


def test_to_model_inputs():
    rgb = torch.zeros(2, 5, 3, 4, 4, dtype=torch.uint8)
    rgb[:, :, 0] = 255
    rgb[:, :, 1] = 0
    rgb[:, :, 2] = 128
    flow = torch.full((2, 5, 2 * L, 4, 4), 128, dtype=torch.uint8)
    flow[..., 0, 0] = 0
    flow[..., 0, 1] = 255
    r, f = C.to_model_inputs(rgb, flow)
    assert r.dtype == torch.float32 and f.dtype == torch.float32
    assert r.shape == rgb.shape and f.shape == flow.shape
    torch.testing.assert_close(r[:, :, 0], torch.full_like(r[:, :, 0], (1 - 0.485) / 0.229))
    torch.testing.assert_close(r[:, :, 1], torch.full_like(r[:, :, 1], (0 - 0.456) / 0.224))
    torch.testing.assert_close(r[:, :, 2], torch.full_like(r[:, :, 2], (128 / 255 - 0.406) / 0.225))
    assert (f[..., 1:, :] == 0).all() and (f[..., 0, 2:] == 0).all()
    assert (f[..., 0, 0] == -128).all() and (f[..., 0, 1] == 127).all()
    # any leading dims: a single chunk
    r1, f1 = C.to_model_inputs(rgb[0, 0], flow[0, 0])
    torch.testing.assert_close(r1, r[0, 0])
    torch.testing.assert_close(f1, f[0, 0])


# --- batch samplers ---------------------------------------------------------------------------


def _numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Like Ray's "numpy" batch format: list columns become object arrays of arrays."""
    out = {}
    for col in rows[0]:
        if isinstance(rows[0][col], list):
            arr = np.empty(len(rows), dtype=object)
            for i, r in enumerate(rows):
                arr[i] = np.array(r[col], dtype=object)
            out[col] = arr
        else:
            out[col] = np.array([r[col] for r in rows])
    return out


def test_train_clip_sampler_batch_reproducible_per_video_and_epoch():
    rows = [level_row(video_id="x/one", label=2), level_row(n=30, video_id="x/two", label=5)]
    batch = _numpy_batch(rows)
    sampler = C.TrainClipSampler(epoch=0, seed=11, crop_size=S)
    out = sampler(batch)
    assert out["rgb"].shape == (2, 5, 3, S, S) and out["rgb"].dtype == np.uint8
    assert out["flow"].shape == (2, 5, 2 * L, S, S) and out["flow"].dtype == np.uint8
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [2, 5]
    # reproducible, and independent of which other videos share the batch
    again = C.TrainClipSampler(epoch=0, seed=11, crop_size=S)(_numpy_batch(rows[1:]))
    np.testing.assert_array_equal(again["rgb"][0], out["rgb"][1])
    np.testing.assert_array_equal(again["flow"][0], out["flow"][1])
    # a pyarrow table gives the same result
    table = pa.Table.from_pylist(rows)
    np.testing.assert_array_equal(sampler(table)["flow"], out["flow"])

    # another epoch samples other chunks (read back the frame indices)
    def first_times(o):
        return [read_index(o["rgb"][b, 0, 0].mean(), rgb_level) for b in range(2)]

    epochs = {
        tuple(first_times(C.train_batch(batch, epoch=e, seed=11, crop_size=S))) for e in range(6)
    }
    assert len(epochs) > 1
    # seed=None: fresh randomness on every call
    fresh = {tuple(first_times(C.train_batch(batch, seed=None, crop_size=S))) for _ in range(6)}
    assert len(fresh) > 1


def test_arrow_batches_read_only_needed_jpegs_and_match_numpy_batches():
    """pyarrow Tables and RecordBatches give the clips of the numpy format, and their JPEG
    columns are not converted to Python bytes wholesale (only the needed elements are read)."""
    rows = [level_row(video_id="x/one", label=2), level_row(n=30, video_id="x/two", label=5)]
    table = pa.Table.from_pylist(rows)
    arrow_rows = C.batch_rows(table)
    assert [r[VIDEO_ID] for r in arrow_rows] == ["x/one", "x/two"]
    assert [r[NUM_FRAMES] for r in arrow_rows] == [N, 30]
    assert not isinstance(arrow_rows[0][RGB], list) and len(arrow_rows[1][FLOW_U]) == 29
    assert bytes(arrow_rows[1][FLOW_V][7]) == rows[1][FLOW_V][7]
    expected = C.train_batch(_numpy_batch(rows), epoch=1, seed=3, crop_size=S)
    for batch in (table, table.to_batches()[0]):
        got = C.train_batch(batch, epoch=1, seed=3, crop_size=S)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    expected = C.test_batch(_numpy_batch(rows), num_frames=3, mode="10crop", crop_size=S)
    got = C.test_batch(table, num_frames=3, mode="10crop", crop_size=S)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_shard_files_old_and_new_compression_give_the_same_clips(tmp_path):
    """write_table_atomic stores the JPEG columns uncompressed (the rest zstd); shards written
    before that (zstd everywhere) still read, with the same clips."""
    import pyarrow.parquet as pq

    from stm.data.shards import write_table_atomic
    from stm.storage import resolve

    rows = [level_row(video_id="x/one", label=2), level_row(n=30, video_id="x/two", label=5)]
    table = pa.Table.from_pylist(rows)
    fs, root = resolve(str(tmp_path))
    write_table_atomic(fs, f"{root}/new.parquet", table)
    pq.write_table(table, tmp_path / "old.parquet", row_group_size=1, compression="zstd")
    meta = pq.ParquetFile(tmp_path / "new.parquet").metadata.row_group(0)
    cols = [meta.column(i) for i in range(meta.num_columns)]
    codecs = {c.path_in_schema: c.compression for c in cols}
    assert codecs[f"{RGB}.list.element"] == "UNCOMPRESSED"
    assert codecs[f"{FLOW_U}.list.element"] == codecs[f"{FLOW_V}.list.element"] == "UNCOMPRESSED"
    assert codecs[VIDEO_ID] == codecs[LABEL] == "ZSTD"
    new, old = (
        C.train_batch(pq.read_table(tmp_path / f), epoch=0, seed=1, crop_size=S)
        for f in ("new.parquet", "old.parquet")
    )
    for k in new:
        np.testing.assert_array_equal(new[k], old[k])


def test_test_clip_sampler_batch():
    rows = [level_row(video_id="x/one", label=2), level_row(video_id="x/two", label=4)]
    out = C.TestClipSampler(num_frames=5, mode="10crop", crop_size=S)(_numpy_batch(rows))
    assert out["rgb"].shape == (2, 10, 5, 3, S, S)
    assert out["flow"].shape == (2, 10, 5, 2 * L, S, S)
    assert out["label"].tolist() == [2, 4] and out["label"].dtype == np.int64
    full = C.TestClipSampler(num_frames=5)(_numpy_batch(rows))
    assert full["rgb"].shape == (2, 2, 5, 3, H, W)
