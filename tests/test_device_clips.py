"""``--decode device`` (stm.data.device_clips): clips planned in the data workers and decoded by
the training loop are those of the CPU path (stm.data.clips.train_batch) for the same seed, up to
a resize rounding level; only the JPEGs a clip needs travel, each flow frame once."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from stm.data import clips as C
from stm.data.device_clips import (
    FLOW_INDEX,
    FLOW_JPEG,
    PLAN_SCHEMA,
    RGB_JPEG,
    DeviceClipDecoder,
    TrainPlanSampler,
    plan_train_batch,
)
from stm.data.shards import FLOW_U, FLOW_V, HEIGHT, LABEL, NUM_FRAMES, RGB, VIDEO_ID, WIDTH

H, W, L = 48, 64, 10


def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def textured_row(seed: int, n: int, with_size: bool = True) -> dict:
    """A video whose every RGB frame and flow plane is a different smooth random texture, so a
    wrong frame, crop, flip or channel order shows."""
    rng = np.random.default_rng(seed)

    def tex(c: int) -> np.ndarray:
        g = rng.uniform(0, 255, size=(6, 8, c)).astype(np.float32)
        out = cv2.resize(g, (W, H), interpolation=cv2.INTER_CUBIC).clip(0, 255)
        return out.astype(np.uint8).reshape(H, W, c).squeeze(-1 if c == 1 else ())

    row = {
        VIDEO_ID: f"x/v{seed}",
        LABEL: seed % 3,
        NUM_FRAMES: n,
        RGB: [_jpeg(tex(3)) for _ in range(n)],
        FLOW_U: [_jpeg(tex(1)) for _ in range(n - 1)],
        FLOW_V: [_jpeg(tex(1)) for _ in range(n - 1)],
    }
    if with_size:
        row[HEIGHT], row[WIDTH] = H, W
    return row


@pytest.fixture(scope="module")
def table() -> pa.Table:
    # the last video has 5 flow frames, too few for a whole stack: clamped on both paths
    videos = ((0, 30), (1, 90), (2, 12), (3, 6))
    return pa.Table.from_pylist([textured_row(s, n) for s, n in videos])


def spec(**changes) -> C.TrainClipSpec:
    return C.TrainClipSpec(crop_size=32, **changes)


@pytest.mark.parametrize("crop,size", [("jitter", 32), ("multiscale", 48), ("jitter", 64)])
def test_device_decode_gives_the_cpu_clips(table, crop, size):
    recipe = C.TrainClipSpec(num_chunks=5, crop_size=size, crop=crop)
    cpu = C.train_batch(table, recipe, epoch=3, seed=7)
    got = DeviceClipDecoder(recipe, "cpu")(plan_train_batch(table, recipe, epoch=3, seed=7))
    assert got["rgb"].dtype == got["flow"].dtype == torch.uint8
    assert got["rgb"].shape == cpu["rgb"].shape and got["flow"].shape == cpu["flow"].shape
    assert got["label"].tolist() == cpu["label"].tolist()
    for k in ("rgb", "flow"):
        diff = np.abs(got[k].numpy().astype(int) - cpu[k].astype(int))
        # the same JPEG decoder (libjpeg-turbo); float bilinear vs OpenCV's fixed point
        assert diff.max() <= 1 and diff.mean() < 0.2, (k, diff.max(), diff.mean())


def test_flips_happen_and_match(table):
    """Across epochs both flip states occur, and flipped clips (u inverted) still match."""
    flips = set()
    for epoch in range(6):
        plan = plan_train_batch(table, spec(), epoch=epoch, seed=1)
        flips.update(plan.column("flip").to_pylist())
        cpu = C.train_batch(table, spec(), epoch=epoch, seed=1)
        got = DeviceClipDecoder(spec(), "cpu")(plan)
        assert np.abs(got["flow"].numpy().astype(int) - cpu["flow"].astype(int)).max() <= 1
    assert flips == {True, False}


def test_plan_ships_each_needed_flow_frame_once(table):
    plan = plan_train_batch(table, spec(), epoch=0, seed=0)
    assert plan.schema.equals(PLAN_SCHEMA)
    rgb = plan.column(RGB_JPEG).to_pylist()
    flow = plan.column(FLOW_JPEG).to_pylist()
    index = plan.column(FLOW_INDEX).to_pylist()
    rows = table.to_pylist()
    for r, jpegs, idx, row in zip(rgb, flow, index, rows):
        assert len(r) == 5 and len(idx) == 5 * L
        k = len(jpegs) // 2
        assert len(set(idx)) == k <= 5 * L  # distinct frames only, all of them used
        us, vs = jpegs[:k], jpegs[k:]
        assert len(set(us)) == k and set(us) <= set(row[FLOW_U]) and set(vs) <= set(row[FLOW_V])
        assert set(r) <= set(row[RGB])
    # the 12-frame video's stacks overlap: far fewer than 2 x T x L flow JPEGs travel
    assert len(flow[2]) <= 2 * 11


@pytest.mark.parametrize("length", [3, 10])
def test_planned_stacks_are_whole_in_videos_longer_than_a_stack(table, length):
    """Wherever a video has a whole stack, each chunk's stack is L consecutive flow frames (the
    plan ships the distinct frames sorted, so its indices count up by one); only a video with
    fewer than L flow frames repeats one."""
    sizes = table.column(NUM_FRAMES).to_pylist()
    for epoch in range(4):
        plan = plan_train_batch(table, spec(flow_length=length), epoch=epoch, seed=3)
        for n, index in zip(sizes, plan.column(FLOW_INDEX).to_pylist()):
            stacks = np.array(index).reshape(-1, length)  # (T, L) into the distinct frames
            if n - 1 >= length:
                assert (np.diff(stacks, axis=1) == 1).all(), (n, stacks)
            else:
                assert (np.diff(stacks, axis=1) == 0).any()  # clamped: a repeated frame


def test_size_from_columns_or_from_the_frame():
    """Rows without the height / width columns plan the same clips (size read from a frame)."""
    row = textured_row(4, 40)
    bare = {k: v for k, v in row.items() if k not in (HEIGHT, WIDTH)}
    a = plan_train_batch(pa.Table.from_pylist([row]), spec(), epoch=1, seed=2)
    b = plan_train_batch(pa.Table.from_pylist([bare]), spec(), epoch=1, seed=2)
    assert a.equals(b)


def test_sliced_and_chunked_batches_decode_like_whole_ones(table):
    """Ray hands over slices of bigger tables and multi-chunk tables: offsets must hold."""
    plan = TrainPlanSampler(spec(), epoch=0, seed=5)(table)
    decoder = DeviceClipDecoder(spec(), "cpu")
    whole = decoder(plan)
    chunked = pa.concat_tables([plan.slice(0, 1), plan.slice(1)])
    assert chunked.column(RGB_JPEG).num_chunks == 2
    part = decoder(plan.slice(1, 2))
    for k in ("rgb", "flow", "label"):
        assert torch.equal(decoder(chunked)[k], whole[k])
        assert torch.equal(part[k], whole[k][1:3])


def test_empty_selection_plans_an_empty_typed_table(table):
    plan = plan_train_batch(table.slice(0, 0), spec())
    assert plan.num_rows == 0 and plan.schema.equals(PLAN_SCHEMA)
    with pytest.raises(ValueError, match="empty"):
        DeviceClipDecoder(spec(), "cpu")(plan)
