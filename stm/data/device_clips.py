"""Training clips decoded on the training device (``--decode device``).

On the CPU path (:mod:`stm.data.clips`) Ray Data workers decode, crop, resize and flip every
clip and ship uint8 arrays to the training loop: ~21 JPEG decodes per chunk on a CPU core, the
largest cost of the ingest (docs/performance.md). Here the Ray Data workers only *plan* the clip,
drawing the same chunk times, crop box and flip as :func:`stm.data.clips.train_clip` would from
the same generator (:func:`stm.data.clips.sample_train_plan`), and ship the JPEG bytes the clip
needs: each flow frame once, however many of the clip's stacks share it. The training loop then
decodes a micro-batch's JPEGs in one batched ``torchvision.io.decode_jpeg`` call (nvJPEG on
CUDA) and crops, resizes, flips and inverts u on the device.

The clips are those of the CPU path up to the decoders' and the resizers' rounding: bilinear
resizing with half-pixel centres and no anti-aliasing, as ``cv2.INTER_LINEAR``, but in float
rather than OpenCV's 11-bit fixed point (a level at most, measured in tests/test_device_clips.py),
and nvJPEG's IDCT is not libjpeg-turbo's.

Plain numpy / pyarrow / torch / torchvision: no Ray, so the benchmarks run it on a bare GPU node.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from stm.data.clips import (
    VIDEO_KEY,
    FrameCache,
    TrainClipSampler,
    TrainClipSpec,
    _frame_shape,
    flow_stack_indices,
    rows_with_rngs,
    sample_train_plan,
    skipped,
    video_key,
)
from stm.data.shards import (
    FLOW_U,
    FLOW_V,
    HEIGHT,
    LABEL,
    NUM_FRAMES,
    RGB,
    VIDEO_ID,
    WIDTH,
    CorruptVideo,
)

# The columns of a planned batch (one row per video).
RGB_JPEG = "rgb_jpeg"  # list<binary>, T colour JPEGs: the chunks' RGB frames
FLOW_JPEG = "flow_jpeg"  # list<binary>, 2K grey JPEGs: u of the K distinct flow frames, then v
FLOW_INDEX = "flow_index"  # list<int32>, T*L: chunk i's stack is frames flow_index[i*L:(i+1)*L]
BOX = "box"  # list<int32>, the crop (y, x, h, w) in frame pixels
FLIP = "flip"  # bool

# A decoded batch made on a CUDA side stream carries the event that marks it done.
READY = "ready"

PLAN_SCHEMA = pa.schema(
    [
        pa.field(LABEL, pa.int64(), nullable=False),
        pa.field(RGB_JPEG, pa.list_(pa.binary()), nullable=False),
        pa.field(FLOW_JPEG, pa.list_(pa.binary()), nullable=False),
        pa.field(FLOW_INDEX, pa.list_(pa.int32()), nullable=False),
        pa.field(BOX, pa.list_(pa.int32()), nullable=False),
        pa.field(FLIP, pa.bool_(), nullable=False),
        pa.field(VIDEO_KEY, pa.int64(), nullable=False),
    ]
)


def plan_train_batch(
    batch: Any, spec: TrainClipSpec, *, epoch: int = 0, seed: int | None = 0
) -> pa.Table:
    """The planned training clips of a batch of shard rows (a ``map_batches`` function).

    Same arguments and the same randomness as :func:`stm.data.clips.train_batch` (video v in
    epoch e draws from ``video_seed(seed, e, v)``), so both give the same clips for one seed.

    Returns:
        A table of :data:`PLAN_SCHEMA`, one row per video; :class:`DeviceClipDecoder` turns it
        into the arrays ``train_batch`` returns.
    """
    cols: dict[str, list] = {name: [] for name in PLAN_SCHEMA.names}
    for row, rng in rows_with_rngs(batch, seed=seed, epoch=epoch):
        try:
            plan = _plan(row, spec, rng)
        except CorruptVideo as e:  # skipped: the training loop counts the videos it lacks
            skipped(e)
            continue
        for name, value in plan.items():
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=PLAN_SCHEMA)


def _plan(row: dict[str, Any], spec: TrainClipSpec, rng: np.random.Generator) -> dict[str, Any]:
    """One video's planned clip (a :data:`PLAN_SCHEMA` row); its JPEGs are checked against
    their checksums here, where they are read (the device decodes only verified bytes)."""
    n = int(row[NUM_FRAMES])
    frames = FrameCache(row)
    # (H, W) from the shard's size columns, else from the first chunk's decoded frame
    size = (int(row[HEIGHT]), int(row[WIDTH])) if HEIGHT in row and WIDTH in row else None
    frame_size = functools.partial(_frame_size, size, frames)
    times, box, flip = sample_train_plan(n, frame_size, spec, rng=rng)
    stacks = flow_stack_indices(times, n - 1, spec.flow_length)  # (T, L)
    distinct, index = np.unique(stacks, return_inverse=True)  # (K,), (T*L,)
    return {
        LABEL: int(row[LABEL]),
        RGB_JPEG: [_bytes(frames.jpeg(RGB, int(t))) for t in times],
        FLOW_JPEG: [_bytes(frames.jpeg(c, int(k))) for c in (FLOW_U, FLOW_V) for k in distinct],
        FLOW_INDEX: index.reshape(-1).astype(np.int32),
        BOX: list(box),
        FLIP: flip,
        VIDEO_KEY: video_key(row[VIDEO_ID]) if VIDEO_ID in row else -1,
    }


def _frame_size(size: tuple[int, int] | None, frames: FrameCache, t: int) -> tuple[int, int]:
    return size or _frame_shape(frames, t)


def _bytes(item: Any) -> bytes:
    return item.to_pybytes() if isinstance(item, pa.Buffer) else bytes(item)


class TrainPlanSampler(TrainClipSampler):
    """Callable class for ``Dataset.map_batches``: :func:`plan_train_batch` with a fixed recipe
    (the arguments of :class:`stm.data.clips.TrainClipSampler`)."""

    def __call__(self, batch: Any) -> pa.Table:  # type: ignore[override]
        return plan_train_batch(batch, self.spec, epoch=self.epoch, seed=self.seed)


class DeviceClipDecoder:
    """Planned clips (:data:`PLAN_SCHEMA` rows) -> the training batch, decoded on ``device``.

    ``spec`` is the recipe the clips were planned with (its crop size and stack length).

    ``decoder(table)`` returns {"rgb": uint8 (B, T, 3, S, S), "flow": uint8 (B, T, 2L, S, S),
    "label": int64 (B,)} on ``device`` and "video_key": int64 (B,) on the host: the arrays of
    :func:`stm.data.clips.train_batch`, in one batched ``decode_jpeg`` call per image mode for
    the whole micro-batch.

    On CUDA the work runs on a side stream of its own, so the next micro-batch decodes while
    the compute stream runs the current one; the batch then also carries a :data:`READY`
    event, which :func:`wait_ready` makes the consuming stream wait for. Nothing here waits for
    the device: the few host arrays (labels, flow indices) go up from pinned memory.
    """

    def __init__(self, spec: TrainClipSpec, device: str | torch.device = "cpu"):
        self.size = (spec.crop_size, spec.crop_size)
        self.flow_length = spec.flow_length
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> dict[str, Any]:
        if batch.num_rows == 0:
            raise ValueError("an empty batch of planned clips")
        if self.stream is None:
            return self._decode(batch)
        with torch.cuda.stream(self.stream):
            # torchvision's CUDA decode_jpeg allocates its outputs on the current stream but
            # writes them from a pool stream that does not wait for it (pytorch/vision#9606):
            # a block this stream freed while its kernels were still queued could be
            # overwritten early. Let this stream's own earlier work finish first (it is the
            # previous micro-batch's small crop/resize work, normally done long ago).
            self.stream.synchronize()
            out = self._decode(batch)
            out[READY] = self.stream.record_event()
        return out

    def _decode(self, batch: pa.Table | pa.RecordBatch) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_jpeg

        cols = {name: _array(batch.column(name)) for name in PLAN_SCHEMA.names}
        rgb_counts = cols[RGB_JPEG].value_lengths().to_pylist()
        flow_counts = cols[FLOW_JPEG].value_lengths().to_pylist()
        index_all = self._upload(cols[FLOW_INDEX].flatten().to_numpy().astype(np.int64))
        boxes, flips = cols[BOX].to_pylist(), cols[FLIP].to_pylist()
        labels = self._upload(cols[LABEL].to_numpy().astype(np.int64))
        rgb_all = decode_jpeg(_tensors(cols[RGB_JPEG]), mode=ImageReadMode.RGB, device=self.device)
        flow_all = decode_jpeg(
            _tensors(cols[FLOW_JPEG]), mode=ImageReadMode.GRAY, device=self.device
        )
        rgb_out, flow_out = [], []
        r0 = f0 = i0 = 0
        for b in range(batch.num_rows):
            nr, nf, ni = rgb_counts[b], flow_counts[b], rgb_counts[b] * self.flow_length
            y, x, h, w = boxes[b]
            # Crop, then stack in the decoder's memory order: on the CPU it returns (C, H, W)
            # views of (H, W, C) memory, and stacking those as (C, H, W) is far slower.
            rgb = torch.stack(
                [im.permute(1, 2, 0)[y : y + h, x : x + w] for im in rgb_all[r0 : r0 + nr]]
            )
            planes = torch.stack([im[0, y : y + h, x : x + w] for im in flow_all[f0 : f0 + nf]])
            rgb = self._resize(rgb.permute(0, 3, 1, 2))  # (T, 3, S, S)
            planes = self._resize(planes.unsqueeze(1))[:, 0]  # (2K, S, S)
            index = index_all[i0 : i0 + ni]  # (T*L,) into the K distinct flow frames
            u, v = planes[: nf // 2][index], planes[nf // 2 :][index]  # (T*L, S, S) each
            flow = torch.stack((u, v), dim=1).reshape(nr, 2 * self.flow_length, *self.size)
            if flips[b]:
                rgb, flow = rgb.flip(-1), flow.flip(-1)
                flow[:, 0::2] = 255 - flow[:, 0::2]  # mirrored motion: u -> -u
            rgb_out.append(rgb)
            flow_out.append(flow)
            r0, f0, i0 = r0 + nr, f0 + nf, i0 + ni
        keys = torch.from_numpy(cols[VIDEO_KEY].to_numpy().astype(np.int64))  # stays on the host
        return {
            "rgb": torch.stack(rgb_out),
            "flow": torch.stack(flow_out),
            "label": labels,
            VIDEO_KEY: keys,
        }

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device without waiting: pageable memory would make the copy
        blocking, so it goes through pinned memory on CUDA."""
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, h, w) -> (N, C, S, S): bilinear, half-pixel centres, no anti-aliasing
        (``cv2.INTER_LINEAR``), rounded back to uint8."""
        if tuple(x.shape[-2:]) == self.size:
            return x.contiguous()
        out = F.interpolate(x.float(), size=self.size, mode="bilinear", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _tensors(column: pa.Array) -> list[torch.Tensor]:
    """Every element of a list<binary> column as a 1-D uint8 tensor over Arrow's memory."""
    values = column.flatten()  # respects a sliced column's offset, unlike .values
    if len(values) == 0:
        return []
    width = np.int64 if pa.types.is_large_binary(values.type) else np.int32
    offsets = np.frombuffer(values.buffers()[1], dtype=width)  # positions in the data buffer
    offsets = offsets[values.offset : values.offset + len(values) + 1]
    with warnings.catch_warnings():  # Arrow memory is read-only; decode_jpeg only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = torch.from_numpy(np.frombuffer(values.buffers()[2], dtype=np.uint8))
    return [data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def wait_ready(batch: dict[str, Any]) -> None:
    """Make the current CUDA stream wait for a batch that :class:`DeviceClipDecoder` made on
    its side stream, and tell the caching allocator that this stream uses its tensors (so
    their memory is not reused before this stream is done with them). Other batches pass."""
    event = batch.pop(READY, None)
    if event is None:
        return
    stream = torch.cuda.current_stream()
    stream.wait_event(event)
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            value.record_stream(stream)
