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

from stm.config import ModelConfig, TrainConfig, UsageError
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


# --- clip specs -----------------------------------------------------------------------------


def train_spec(**changes) -> C.TrainClipSpec:
    """The paper's training recipe at the tiny crop size of these tests."""
    return C.TrainClipSpec(crop_size=S, **changes)


def test_specs_default_to_the_paper_and_validate():
    t = C.TrainClipSpec()
    assert (t.num_chunks, t.flow_length, t.crop_size, t.stride_range) == (5, 10, 224, (5, 35))
    assert (t.crop, t.flip_prob) == ("jitter", 0.5)
    v = C.TestClipSpec()
    assert (v.num_frames, v.flow_length, v.mode, v.crop_size) == (25, 10, "full", 224)
    assert C.TrainClipSpec(stride_range=[2, 4]).stride_range == (2, 4)  # e.g. from JSON
    assert hash(t) == hash(C.TrainClipSpec())  # frozen: a value
    bad = [
        lambda: C.TrainClipSpec(crop="random"),
        lambda: C.TrainClipSpec(stride_range=(0, 3)),
        lambda: C.TrainClipSpec(stride_range=(6, 5)),
        lambda: C.TrainClipSpec(stride_range=(5,)),
        lambda: C.TrainClipSpec(num_chunks=0),
        lambda: C.TrainClipSpec(flow_length=0),
        lambda: C.TrainClipSpec(flip_prob=1.5),
        lambda: C.TestClipSpec(mode="center"),
        lambda: C.TestClipSpec(num_frames=0),
    ]
    for make in bad:
        with pytest.raises(UsageError) as err:
            make()
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="jitter"):
        C.TrainClipSpec(crop="random")


def test_specs_from_a_train_config():
    cfg = TrainConfig(
        model=ModelConfig(flow_length=6),
        stage="motion",
        num_chunks=3,
        stride_min=2,
        stride_max=7,
        crop_size=48,
        test_frames=9,
        test_mode="10crop",
    )
    assert C.train_clip_spec(cfg) == C.TrainClipSpec(
        num_chunks=3, flow_length=6, crop_size=48, stride_range=(2, 7), crop="multiscale"
    )
    assert C.test_clip_spec(cfg) == C.TestClipSpec(
        num_frames=9, flow_length=6, mode="10crop", crop_size=48
    )
    assert C.train_clip_spec(TrainConfig()).crop == "jitter"  # the fused and appearance recipe


# --- temporal sampling ------------------------------------------------------------------------


def test_chunk_time_range_keeps_whole_flow_stacks():
    assert C.chunk_time_range(N, 10) == (5, N - 6)  # the original's 1-based 6 .. N-5
    assert C.chunk_time_range(11, 10) == (5, 5)  # 10 flow frames: one full stack
    assert C.chunk_time_range(10, 10) == (0, 9)  # 9 flow frames: none, the whole video
    assert C.chunk_time_range(N, 3) == (1, N - 3)  # stack t-1 .. t+1 in flow 0 .. N-2
    assert C.chunk_time_range(N, 1) == (0, N - 2)  # the last RGB frame has no flow
    assert C.chunk_time_range(1, 10) == (0, 0)
    with pytest.raises(ValueError):
        C.chunk_time_range(0, 10)


def test_chunk_times_stride_in_range_and_increasing():
    rng = np.random.default_rng(0)
    strides, starts = [], []
    for _ in range(500):
        t = C.sample_chunk_times(200, train_spec(), rng=rng)
        assert t.shape == (5,) and t.dtype == np.int64
        d = np.diff(t)
        assert (d == d[0]).all() and 5 <= d[0] <= 35
        assert t[0] >= 5 and t[-1] <= 194  # whole stacks t-5 .. t+4 of 199 flow frames
        strides.append(d[0])
        starts.append(t[0])
    assert min(strides) <= 7 and max(strides) >= 33  # the whole range is used
    assert len(set(starts)) > 50
    assert min(starts) == 5  # the first valid centre is drawn too


def test_chunk_times_short_videos():
    rng = np.random.default_rng(1)
    # 30 frames: centres 5 .. 24 (20 of them); stride 20 does not fit 5 chunks: the largest
    # stride that fits is 19 // 4 = 4
    for _ in range(20):
        t = C.sample_chunk_times(30, train_spec(stride_range=(20, 20)), rng=rng)
        assert (np.diff(t) == 4).all() and t[0] >= 5 and t[-1] <= 24
    # centres 5 .. 9 exactly fit 5 chunks with stride 1
    assert C.sample_chunk_times(15, train_spec(), rng=rng).tolist() == [5, 6, 7, 8, 9]
    # fewer centres (5 .. 7) than chunks: repeated frames, non-decreasing, all centres used
    t = C.sample_chunk_times(13, train_spec(num_chunks=11), rng=rng)
    assert t.shape == (11,) and (np.diff(t) >= 0).all()
    assert t[0] == 5 and t[-1] == 7 and set(t.tolist()) == {5, 6, 7}
    # too short for any whole stack: the whole video, as before
    t = C.sample_chunk_times(3, train_spec(num_chunks=11), rng=rng)
    assert t[0] == 0 and t[-1] == 2 and set(t.tolist()) == {0, 1, 2}
    assert C.sample_chunk_times(1, train_spec(), rng=rng).tolist() == [0] * 5
    one = C.sample_chunk_times(40, train_spec(num_chunks=1), rng=rng)
    assert one.shape == (1,) and 5 <= one[0] <= 34


def test_flow_stack_indices_centred_and_clamped():
    assert C.flow_stack_indices(20, 39, L).tolist() == list(range(15, 25))  # t-5 .. t+4
    assert C.flow_stack_indices(2, 39, L).tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert C.flow_stack_indices(36, 39, L).tolist() == [31, 32, 33, 34, 35, 36, 37, 38, 38, 38]
    assert C.flow_stack_indices(3, 1, L).tolist() == [0] * 10
    assert C.flow_stack_indices(10, 39, 4).tolist() == [8, 9, 10, 11]
    assert C.flow_stack_indices(10, 39, 3).tolist() == [9, 10, 11]  # odd L: t-1 .. t+1
    many = C.flow_stack_indices(np.array([5, 20]), 39, L)  # (T, L) for an array of centres
    assert many.shape == (2, L) and many[1].tolist() == list(range(15, 25))
    with pytest.raises(ValueError):
        C.flow_stack_indices(0, 0, L)


def test_test_chunk_times_uniform_over_whole_stacks():
    t = C.test_chunk_times(N, C.TestClipSpec())
    assert t.tolist() == np.round(np.linspace(5, N - 6, 25)).astype(int).tolist()
    assert t[0] == 5 and t[-1] == N - 6
    assert C.test_chunk_times(N, C.TestClipSpec(flow_length=3, num_frames=3)).tolist() == [
        1,
        19,
        37,
    ]
    assert C.test_chunk_times(6, C.TestClipSpec(num_frames=3)).tolist() == [0, 2, 5]  # too short


def _assert_whole_stacks(times: np.ndarray, n: int, length: int) -> None:
    """Every chunk's stack is flow frames t - L//2 .. t - L//2 + L - 1, none clamped."""
    stacks = C.flow_stack_indices(times, n - 1, length)  # (T, L)
    expected = times[:, None] - length // 2 + np.arange(length)
    np.testing.assert_array_equal(stacks, expected)
    assert stacks.min() >= 0 and stacks.max() <= n - 2


@pytest.mark.parametrize("length", [1, 2, 3, 9, 10])
def test_no_stack_repeats_a_flow_frame_in_videos_longer_than_a_stack(length):
    """Train and test chunk centres keep the whole stack inside the video, from the shortest
    video that has one (N - 1 = L flow frames) up, for odd and even L."""
    rng = np.random.default_rng(length)
    for n in (length + 1, length + 2, length + 6, 40, 301):
        for chunks, strides in ((1, (5, 35)), (5, (5, 35)), (5, (1, 1)), (11, (35, 35))):
            spec = train_spec(num_chunks=chunks, flow_length=length, stride_range=strides)
            for _ in range(30):
                _assert_whole_stacks(C.sample_chunk_times(n, spec, rng=rng), n, length)
        for frames in (1, 3, 25):
            spec = C.TestClipSpec(num_frames=frames, flow_length=length)
            _assert_whole_stacks(C.test_chunk_times(n, spec), n, length)


def _flow_read_back(flow: np.ndarray, length: int) -> list[list[int]]:
    """The flow frame indices of each chunk of a level video's (T, 2L, H', W') flow."""
    return [[read_index(c[2 * k].mean(), u_level) for k in range(length)] for c in flow]


@pytest.mark.parametrize("length", [3, 10])
def test_clips_of_the_shortest_valid_video_repeat_no_flow_frame(length):
    row = level_row(n=length + 1)  # one whole stack: flow frames 0 .. L-1, centre L // 2
    whole = list(range(length))
    for seed in range(4):
        spec = train_spec(flow_length=length, flip_prob=0.0)
        out = C.train_clip(row, spec, rng=np.random.default_rng(seed))
        assert out["times"].tolist() == [length // 2] * 5
        assert _flow_read_back(out["flow"], length) == [whole] * 5
    test = C.test_clip(row, C.TestClipSpec(num_frames=4, flow_length=length))
    assert test["flow"].shape == (2, 4, 2 * length, H, W)
    assert _flow_read_back(test["flow"][0], length) == [whole] * 4


def test_videos_too_short_for_a_stack_are_clamped_with_clips_of_the_right_shape():
    for n in (2, 5, L):  # 1 .. L-1 flow frames
        row = level_row(n=n)
        out = C.train_clip(row, train_spec(flip_prob=0.0), rng=np.random.default_rng(n))
        assert out["rgb"].shape == (5, 3, S, S) and out["flow"].shape == (5, 2 * L, S, S)
        assert out["times"].min() >= 0 and out["times"].max() <= n - 1
        for t, read in zip(out["times"], _flow_read_back(out["flow"], L)):
            assert read == np.clip(np.arange(t - 5, t + 5), 0, n - 2).tolist()
        test = C.test_clip(row, C.TestClipSpec(num_frames=25))
        assert test["rgb"].shape == (2, 25, 3, H, W) and test["flow"].shape == (2, 25, 2 * L, H, W)
        assert test["times"].tolist() == np.round(np.linspace(0, n - 1, 25)).astype(int).tolist()


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
        out = C.train_clip(row, train_spec(flip_prob=0.0), rng=np.random.default_rng(seed))
        assert out["rgb"].shape == (5, 3, S, S) and out["rgb"].dtype == np.uint8
        assert out["flow"].shape == (5, 2 * L, S, S) and out["flow"].dtype == np.uint8
        assert out["label"] == 3
        for i, t in enumerate(out["times"]):
            # RGB order: channel 0 is red (R = 10 + 5 i), channel 2 blue (250 - 5 i)
            assert read_index(out["rgb"][i, 0].mean(), rgb_level) == t
            assert read_index(out["rgb"][i, 2].mean(), lambda j: 250 - 5 * j) == t
            expected = C.flow_stack_indices(int(t), N - 1, L)
            u = [read_index(out["flow"][i, 2 * k].mean(), u_level) for k in range(L)]
            v = [read_index(out["flow"][i, 2 * k + 1].mean(), v_level) for k in range(L)]
            assert u == expected.tolist() and v == expected.tolist()


def test_train_clip_flip_mirrors_and_inverts_u_only():
    row = texture_row()
    for crop in ("jitter", "multiscale"):
        a = C.train_clip(row, train_spec(crop=crop, flip_prob=0.0), rng=np.random.default_rng(7))
        b = C.train_clip(row, train_spec(crop=crop, flip_prob=1.0), rng=np.random.default_rng(7))
        assert not a["flip"] and b["flip"] and a["box"] == b["box"]
        np.testing.assert_array_equal(b["rgb"], a["rgb"][..., ::-1])
        np.testing.assert_array_equal(b["flow"][:, 0::2], 255 - a["flow"][:, 0::2][..., ::-1])
        np.testing.assert_array_equal(b["flow"][:, 1::2], a["flow"][:, 1::2][..., ::-1])
    # on level videos: flipped u reads as 255 - u, v unchanged
    out = C.train_clip(level_row(), train_spec(flip_prob=1.0), rng=np.random.default_rng(0))
    t = int(out["times"][2])
    idx = C.flow_stack_indices(t, N - 1, L)
    u = [read_index(out["flow"][2, 2 * k].mean(), lambda j: 255 - u_level(j)) for k in range(L)]
    v = [read_index(out["flow"][2, 2 * k + 1].mean(), v_level) for k in range(L)]
    assert u == idx.tolist() and v == idx.tolist()


@pytest.mark.parametrize("crop", ["jitter", "multiscale"])
def test_train_clip_same_crop_for_both_streams_and_all_chunks(crop):
    row = texture_row()
    tex = _texture()
    flips = set()
    for seed in range(12):
        out = C.train_clip(row, train_spec(crop=crop), rng=np.random.default_rng(seed))
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
    out = C.train_clip(row, train_spec(), rng=np.random.default_rng(0))
    times = out["times"].tolist()
    stacks = {int(f) for t in times for f in C.flow_stack_indices(t, N - 1, L)}
    assert set(row[RGB].seen) == set(times) and len(row[RGB].seen) == len(set(times))
    assert set(row[FLOW_U].seen) == stacks and len(row[FLOW_U].seen) == len(stacks)
    assert set(row[FLOW_V].seen) == stacks


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
    idx = C.flow_stack_indices(6, row[NUM_FRAMES] - 1, L)  # clamped at the end: 1 .. 10
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
    out = C.test_clip(level_row(), C.TestClipSpec(mode="full"))
    assert out["rgb"].shape == (2, 25, 3, H, W) and out["rgb"].dtype == np.uint8
    assert out["flow"].shape == (2, 25, 2 * L, H, W)
    assert out["label"] == 3
    times = np.round(np.linspace(5, N - 6, 25)).astype(int)  # centres with whole stacks
    assert out["times"].tolist() == times.tolist()
    for i, t in enumerate(times):
        assert read_index(out["rgb"][0, i, 0].mean(), rgb_level) == t
        u = [read_index(out["flow"][0, i, 2 * k].mean(), u_level) for k in range(L)]
        assert u == C.flow_stack_indices(int(t), N - 1, L).tolist()
    tex_out = C.test_clip(texture_row(), C.TestClipSpec(num_frames=4, mode="full"))
    r, f = tex_out["rgb"], tex_out["flow"]
    np.testing.assert_array_equal(r[1], r[0][..., ::-1])
    np.testing.assert_array_equal(f[1, :, 0::2], 255 - f[0, :, 0::2][..., ::-1])
    np.testing.assert_array_equal(f[1, :, 1::2], f[0, :, 1::2][..., ::-1])
    assert mean_abs(r[0, 0, 0], _texture()) < 2.0  # the whole frame, unresized


def test_test_clip_ten_crop():
    out = C.test_clip(texture_row(), C.TestClipSpec(num_frames=3, mode="10crop", crop_size=S))
    r, f = out["rgb"], out["flow"]
    assert r.shape == (10, 3, 3, S, S) and f.shape == (10, 3, 2 * L, S, S)
    full = C.test_clip(texture_row(), C.TestClipSpec(num_frames=3))["rgb"][0]  # (T, 3, H, W)
    corners = [(0, 0), (0, W - S), (H - S, 0), (H - S, W - S), ((H - S) // 2, (W - S) // 2)]
    for v, (y, x) in enumerate(corners):
        np.testing.assert_array_equal(r[v], full[..., y : y + S, x : x + S])
        np.testing.assert_array_equal(r[v + 5], r[v][..., ::-1])
        np.testing.assert_array_equal(f[v + 5, :, 0::2], 255 - f[v, :, 0::2][..., ::-1])
        np.testing.assert_array_equal(f[v + 5, :, 1::2], f[v, :, 1::2][..., ::-1])


# --- model inputs -----------------------------------------------------------------------------


def test_to_model_inputs():
    from stm.train.steps import to_model_inputs

    rgb = torch.zeros(2, 5, 3, 4, 4, dtype=torch.uint8)
    rgb[:, :, 0] = 255
    rgb[:, :, 1] = 0
    rgb[:, :, 2] = 128
    flow = torch.full((2, 5, 2 * L, 4, 4), 128, dtype=torch.uint8)
    flow[..., 0, 0] = 0
    flow[..., 0, 1] = 255
    r, f = to_model_inputs(rgb, flow)
    assert r.dtype == torch.float32 and f.dtype == torch.float32
    assert r.shape == rgb.shape and f.shape == flow.shape
    torch.testing.assert_close(r[:, :, 0], torch.full_like(r[:, :, 0], (1 - 0.485) / 0.229))
    torch.testing.assert_close(r[:, :, 1], torch.full_like(r[:, :, 1], (0 - 0.456) / 0.224))
    torch.testing.assert_close(r[:, :, 2], torch.full_like(r[:, :, 2], (128 / 255 - 0.406) / 0.225))
    assert (f[..., 1:, :] == 0).all() and (f[..., 0, 2:] == 0).all()
    assert (f[..., 0, 0] == -128).all() and (f[..., 0, 1] == 127).all()
    # any leading dims: a single chunk
    r1, f1 = to_model_inputs(rgb[0, 0], flow[0, 0])
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
    sampler = C.TrainClipSampler(train_spec(), epoch=0, seed=11)
    out = sampler(batch)
    assert out["rgb"].shape == (2, 5, 3, S, S) and out["rgb"].dtype == np.uint8
    assert out["flow"].shape == (2, 5, 2 * L, S, S) and out["flow"].dtype == np.uint8
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [2, 5]
    # reproducible, and independent of which other videos share the batch
    again = C.TrainClipSampler(train_spec(), epoch=0, seed=11)(_numpy_batch(rows[1:]))
    np.testing.assert_array_equal(again["rgb"][0], out["rgb"][1])
    np.testing.assert_array_equal(again["flow"][0], out["flow"][1])
    # a pyarrow table gives the same result
    table = pa.Table.from_pylist(rows)
    np.testing.assert_array_equal(sampler(table)["flow"], out["flow"])

    # another epoch samples other chunks (read back the frame indices)
    def first_times(o):
        return [read_index(o["rgb"][b, 0, 0].mean(), rgb_level) for b in range(2)]

    epochs = {
        tuple(first_times(C.train_batch(batch, train_spec(), epoch=e, seed=11))) for e in range(6)
    }
    assert len(epochs) > 1
    # seed=None: fresh randomness on every call
    fresh = {tuple(first_times(C.train_batch(batch, train_spec(), seed=None))) for _ in range(6)}
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
    expected = C.train_batch(_numpy_batch(rows), train_spec(), epoch=1, seed=3)
    for batch in (table, table.to_batches()[0]):
        got = C.train_batch(batch, train_spec(), epoch=1, seed=3)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    ten_crop = C.TestClipSpec(num_frames=3, mode="10crop", crop_size=S)
    expected = C.test_batch(_numpy_batch(rows), ten_crop)
    got = C.test_batch(table, ten_crop)
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
        C.train_batch(pq.read_table(tmp_path / f), train_spec(), epoch=0, seed=1)
        for f in ("new.parquet", "old.parquet")
    )
    for k in new:
        np.testing.assert_array_equal(new[k], old[k])


def test_test_clip_sampler_batch():
    rows = [level_row(video_id="x/one", label=2), level_row(video_id="x/two", label=4)]
    ten_crop = C.TestClipSpec(num_frames=5, mode="10crop", crop_size=S)
    out = C.TestClipSampler(ten_crop)(_numpy_batch(rows))
    assert out["rgb"].shape == (2, 10, 5, 3, S, S)
    assert out["flow"].shape == (2, 10, 5, 2 * L, S, S)
    assert out["label"].tolist() == [2, 4] and out["label"].dtype == np.int64
    full = C.TestClipSampler(C.TestClipSpec(num_frames=5))(_numpy_batch(rows))
    assert full["rgb"].shape == (2, 2, 5, 3, H, W)


def test_a_batch_without_split_videos_is_an_empty_tensor_table() -> None:
    """Ray Data turns an empty (0, ...) clip array into pickled objects, with a warning each
    time; the ingest hands it a typed empty table instead (the schema of non-empty batches)."""
    from stm.train.ingest import empty_tensor_table

    table = empty_tensor_table(
        {
            "rgb": np.zeros((0, 3, 3, 8, 8), np.uint8),
            "flow": np.zeros((0, 3, 4, 8, 8), np.uint8),
            "label": np.zeros(0, np.int64),
        }
    )
    assert table.num_rows == 0 and table.schema.field("label").type == "int64"
    for name, shape in (("rgb", (3, 3, 8, 8)), ("flow", (3, 4, 8, 8))):
        kind = table.schema.field(name).type
        assert "ArrowTensorTypeV2" in type(kind).__name__ and tuple(kind.shape) == shape
