"""Train and test clip sampling from preprocessed videos (one Parquet row per video).

A clip is T temporal chunks of one video. Chunk i is RGB frame ``t_i`` (3 channels) for the
appearance stream and the stack of L optical-flow frames ``t_i - L//2 .. t_i - L//2 + L - 1`` for
the motion stream, with u and v interleaved (2L channels: u_0, v_0, u_1, v_1, ...). Chunk centres
lie where that whole stack exists (:func:`chunk_time_range`), as in the original code.

Training (Feichtenhofer, Pinz, Wildes, CVPR 2017, Sec. 4.1): T=5 chunks with one random temporal
stride in [5, 35] per video and epoch; one crop box and one horizontal flip per video, shared by
both streams and all chunks, so that the cross-stream gates and the temporal filters see aligned
inputs. Testing (Sec. 4.2): 25 uniformly spaced chunks, the whole frame and its flip (or the
10-crop protocol), scored fully convolutionally. Each recipe is one frozen value,
:class:`TrainClipSpec` / :class:`TestClipSpec`, built from a run's config once.

Only the JPEGs a clip needs are decoded; outputs stay uint8 (4x less to ship between Ray workers
and to the GPU) and become float on the device with :func:`stm.train.steps.to_model_inputs`.

Everything here is plain numpy / OpenCV / torch: it runs inside Ray Data workers but imports no Ray.
Randomness comes from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import logging
import typing
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import pyarrow as pa

from stm.config import TEST_MODES, TestMode, TrainConfig, UsageError, check_choice
from stm.data.shards import (
    CHECKSUMS,
    FLOW_U,
    FLOW_V,
    HEIGHT,
    JPEG_COLUMNS,
    LABEL,
    NUM_FRAMES,
    RGB,
    VIDEO_ID,
    WIDTH,
    CorruptVideo,
    check_jpeg,
)

logger = logging.getLogger(__name__)

# --- constants (paper Sec. 4.1 / 4.2 and the ImageNet-pretrained ResNets it starts from) -------
# Motion-stream crops: "W, H in {256, 224, 192, 168}, followed by resizing to 224x224" (Sec. 4.1);
# scaled by crop_size / 224 for other crop sizes.
MULTISCALE_SIZES = (256, 224, 192, 168)
# Appearance / fused crops: "jitter the width and height of the 224x224 input frame by +-25%".
JITTER_SCALE = (0.75, 1.25)
# Crop positions as fractions (fy, fx) of the free room (frame size - crop size) above / left.
# Jitter: corners, border centres and centre (a 3x3 grid: "crop it from a maximum of 25% distance
# from the image borders" read as a crop that touches a border or sits midway, see jitter_crop_box).
JITTER_POSITIONS = tuple((fy, fx) for fy in (0.0, 0.5, 1.0) for fx in (0.0, 0.5, 1.0))
# Multiscale: "randomly cropping from the borders and centre": the 4 corners and the centre.
CORNER_CENTRE_POSITIONS = ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0), (0.5, 0.5))

VIDEO_KEY = "video_key"  # int64 column of training batches: which video each clip comes from

CropMode = Literal["jitter", "multiscale"]
CROP_MODES = typing.get_args(CropMode)


# --- clip specs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainClipSpec:
    """How a training clip is drawn from a video (Sec. 4.1). Defaults are the paper's fused
    recipe; :func:`train_clip_spec` builds it from a ``TrainConfig``. Each field's comment says
    what it means and where the paper says so."""

    num_chunks: int = 5  # T: "we sample 5 inputs from a video" (Sec. 4.1; up to 11 in Sec. 5.2)
    flow_length: int = 10  # L: "optical flow stacks with L = 10 frames" (Sec. 4.1), 2L channels
    crop_size: int = 224  # S: crops are "resized to 224 x 224" (Sec. 4.1), output side in pixels
    # one stride per video and epoch, both ends included: "random temporal stride between 5 and
    # 35 frames" (Sec. 4.1)
    stride_range: tuple[int, int] = (5, 35)
    # jitter: "jitter the width and height of the 224x224 input frame by +-25%" (appearance and
    # fused model); multiscale: "W, H in {256, 224, 192, 168}" from corners and centre (motion
    # stream) (Sec. 4.1)
    crop: CropMode = "jitter"
    # horizontal flip of the whole clip, both streams: "the same augmentations as in [1, 39]"
    # (Sec. 4.1)
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        check_choice("crop", self.crop, CROP_MODES)
        stride = tuple(int(s) for s in self.stride_range)
        if len(stride) != 2 or not 1 <= stride[0] <= stride[1]:
            raise UsageError(f"invalid stride range {self.stride_range}: need 1 <= low <= high")
        object.__setattr__(self, "stride_range", stride)  # a list (from JSON) becomes a tuple
        _check_positive(self, "num_chunks", "flow_length", "crop_size")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise UsageError(f"invalid flip_prob {self.flip_prob:g}: need between 0 and 1")


@dataclass(frozen=True)
class TestClipSpec:
    """The test views of a video (Sec. 4.2). Defaults are the paper's protocol;
    :func:`test_clip_spec` builds it from a ``TrainConfig``."""

    __test__ = False  # not a pytest test class

    num_frames: int = 25  # T: "sampling 25 frames (and their horizontal flips)" (Sec. 4.2)
    flow_length: int = 10  # L: flow frames per stack, as in training (Sec. 4.1)
    # full: the whole frame (short side 256) and its flip, "fully convolutional testing"
    # (Sec. 4.2); 10crop: 5 crops of crop_size and their flips ("10-crop testing", Sec. 4.2)
    mode: TestMode = "full"
    crop_size: int = 224  # S: the crop side of the 10crop mode, in pixels (unused by full)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, TEST_MODES)
        _check_positive(self, "num_frames", "flow_length", "crop_size")


def _check_positive(spec: Any, *names: str) -> None:
    """A one-line ``UsageError`` for the first of the integer fields ``names`` below 1."""
    for name in names:
        if getattr(spec, name) < 1:
            raise UsageError(f"invalid {name} {getattr(spec, name)}: need at least 1")


def train_clip_spec(cfg: TrainConfig) -> TrainClipSpec:
    """The training clip recipe of a run."""
    return TrainClipSpec(
        num_chunks=cfg.num_chunks,
        flow_length=cfg.model.flow_length,
        crop_size=cfg.crop_size,
        stride_range=(cfg.stride_min, cfg.stride_max),
        crop=cfg.crop_mode,
    )


def test_clip_spec(cfg: TrainConfig) -> TestClipSpec:
    """The test views of a run."""
    return TestClipSpec(
        num_frames=cfg.test_frames,
        flow_length=cfg.model.flow_length,
        mode=cfg.test_mode,
        crop_size=cfg.crop_size,
    )


class CropBox(NamedTuple):
    """A crop in frame pixel coordinates: rows y .. y+h-1, columns x .. x+w-1."""

    y: int
    x: int
    h: int
    w: int


# --- temporal sampling ------------------------------------------------------------------------


def chunk_time_range(num_frames: int, flow_length: int) -> tuple[int, int]:
    """The chunk centres (RGB frame indices, both ends included) whose whole flow stack exists.

    A video of N RGB frames has N - 1 flow frames (flow frame k: from RGB frame k to k+1), and
    the stack of centre t is flow frames ``t - L//2 .. t - L//2 + L - 1`` (L=10: t-5 .. t+4).
    It lies inside 0 .. N-2 for ``L//2 <= t <= N - 1 - (L - L//2)``, i.e. N - L centres
    (L=10: 5 .. N-6, the 1-based 6 .. N-5 of the original code; L=3: 1 .. N-3). A video with
    fewer than L flow frames (N - 1 < L) has no such centre: then the whole video 0 .. N-1,
    whose stacks :func:`flow_stack_indices` clamps.

    Args:
        num_frames: N, the number of RGB frames of the video (>= 1).
        flow_length: L, the number of flow frames in a stack (>= 1).

    Returns:
        (first, last) centre.
    """
    if num_frames < 1:
        raise ValueError(f"need num_frames >= 1, got {num_frames}")
    first = flow_length // 2
    last = num_frames - 1 - (flow_length - first)
    if last < first:  # N - 1 < L
        return 0, num_frames - 1
    return first, last


def sample_chunk_times(
    num_frames: int, spec: TrainClipSpec, *, rng: np.random.Generator
) -> np.ndarray:
    """The RGB frame index of each of the ``spec.num_chunks`` training chunks.

    The chunks lie in the centres of :func:`chunk_time_range` (M of them from ``first``): one
    stride s is drawn uniformly from ``spec.stride_range`` (both ends included) and a start
    uniformly among those that keep all chunks inside that range; chunk i is at
    ``first + start + i * s``. When the range is too short for s, s shrinks to the largest
    stride that fits (at least 1). When even stride 1 does not fit (M < T), the chunks spread
    over the whole range with repeated frames (``first + floor(linspace(0, M-1, T))``,
    non-decreasing) rather than piling the repeats onto the last frame.

    Args:
        num_frames: N, the number of RGB frames of the video (>= 1).
        spec: T (num_chunks), the stride range and L (flow_length, for the range of centres).
        rng: the source of randomness.

    Returns:
        int64 array of shape (T,), non-decreasing (strictly increasing when M >= T).
    """
    first, last = chunk_time_range(num_frames, spec.flow_length)
    span, num_chunks = last - first + 1, spec.num_chunks  # M centres, T chunks
    lo, hi = spec.stride_range
    stride = int(rng.integers(lo, hi + 1))
    if num_chunks == 1:
        return np.array([first + rng.integers(0, span)], dtype=np.int64)
    if span < num_chunks:
        return first + np.floor(np.linspace(0, span - 1, num_chunks)).astype(np.int64)
    stride = min(stride, (span - 1) // (num_chunks - 1))  # (T-1)*s + 1 <= M
    start = int(rng.integers(0, span - (num_chunks - 1) * stride))
    return first + start + stride * np.arange(num_chunks, dtype=np.int64)


def flow_stack_indices(t: int | np.ndarray, num_flow: int, flow_length: int) -> np.ndarray:
    """The flow frame indices of the stack around RGB frame t: t - L//2 .. t - L//2 + L - 1.

    Flow frame k is the motion from RGB frame k to k+1, so L=10 gives t-5 .. t+4 (the original
    two-stream convention). Indices outside the video are clamped to [0, num_flow - 1], i.e. the
    first / last flow frame is repeated; that happens only for centres outside
    :func:`chunk_time_range`, which the samplers take only in videos too short for a stack.

    Args:
        t: the RGB frame index of the chunk, or an array of them.
        num_flow: the number of flow frames of the video (N - 1, >= 1).
        flow_length: L, the number of flow frames in the stack.

    Returns:
        int64 array of shape (L,), or (*t.shape, L) for an array t.
    """
    if num_flow < 1:
        raise ValueError(
            f"a flow stack needs at least one flow frame (a video of >= 2 frames), got {num_flow}"
        )
    t = np.asarray(t, dtype=np.int64)[..., None]
    idx = t + (np.arange(flow_length, dtype=np.int64) - flow_length // 2)
    return np.clip(idx, 0, num_flow - 1)


def test_chunk_times(num_frames: int, spec: TestClipSpec) -> np.ndarray:
    """``spec.num_frames`` uniformly spaced RGB frame indices over the centres of
    :func:`chunk_time_range` (Sec. 4.2; the original spreads its 25 frames over 6 .. N-5).

    Returns:
        int64 array of shape (T,): ``round(linspace(first, last, T))``.
    """
    first, last = chunk_time_range(num_frames, spec.flow_length)
    return np.round(np.linspace(first, last, spec.num_frames)).astype(np.int64)


# --- spatial crops ----------------------------------------------------------------------------


def _place(h: int, w: int, ch: int, cw: int, pos: tuple[float, float]) -> CropBox:
    """A ch x cw crop (clipped to the h x w frame) at position pos = (fy, fx) of the free room."""
    ch, cw = min(max(ch, 1), h), min(max(cw, 1), w)
    y = int(round(pos[0] * (h - ch)))
    x = int(round(pos[1] * (w - cw)))
    return CropBox(y, x, ch, cw)


def jitter_crop_box(h: int, w: int, crop_size: int, *, rng: np.random.Generator) -> CropBox:
    """The appearance / fused-model training crop (Sec. 4.1), to be resized to crop_size.

    "We randomly jitter the width and height of the 224x224 input frame by +-25% and also randomly
    crop it from a maximum of 25% distance from the image borders." The crop width and height are
    drawn independently and uniformly from [0.75, 1.25] * crop_size (clipped to the frame). The
    position is one of 9 equally likely places: the 4 corners, the 4 border centres and the centre
    (fractions {0, 1/2, 1} of the free room on each axis). The paper does not say how the position
    is drawn; a discrete grid follows the corner/centre style of its motion-stream recipe and of
    the MatConvNet code it builds on, and keeps every crop flush with a border or centred.

    Args:
        h, w: the frame size in pixels.
        crop_size: S, the nominal crop side (224 in the paper).
        rng: the source of randomness.
    """
    ch = int(round(rng.uniform(*JITTER_SCALE) * crop_size))
    cw = int(round(rng.uniform(*JITTER_SCALE) * crop_size))
    pos = JITTER_POSITIONS[int(rng.integers(len(JITTER_POSITIONS)))]
    return _place(h, w, ch, cw, pos)


def multiscale_corner_box(h: int, w: int, crop_size: int, *, rng: np.random.Generator) -> CropBox:
    """The motion-stream training crop (Sec. 4.1), to be resized to crop_size.

    W and H are drawn independently from {256, 224, 192, 168} * crop_size / 224 (clipped to the
    frame), the position uniformly among the 4 corners and the centre.

    Args:
        h, w: the frame size in pixels.
        crop_size: S, the output crop side (224 in the paper).
        rng: the source of randomness.
    """
    sizes = [int(round(s * crop_size / 224)) for s in MULTISCALE_SIZES]
    ch = sizes[int(rng.integers(len(sizes)))]
    cw = sizes[int(rng.integers(len(sizes)))]
    pos = CORNER_CENTRE_POSITIONS[int(rng.integers(len(CORNER_CENTRE_POSITIONS)))]
    return _place(h, w, ch, cw, pos)


_CROP_FNS = {"jitter": jitter_crop_box, "multiscale": multiscale_corner_box}


def ten_crop_boxes(h: int, w: int, crop_size: int) -> list[CropBox]:
    """The 5 crops of the 10-crop protocol: top-left, top-right, bottom-left, bottom-right, centre.

    Crops larger than the frame are clipped to it (and later resized up to crop_size).
    """
    return [_place(h, w, crop_size, crop_size, pos) for pos in CORNER_CENTRE_POSITIONS]


# --- decoding and per-image transforms --------------------------------------------------------


class FrameCache:
    """Decodes the JPEGs of one video lazily, each at most once (chunks' flow stacks overlap).

    Each JPEG is checked against its stored crc32 before it is decoded (when the row carries
    checksums); a mismatch or a JPEG that does not decode raises ``CorruptVideo``."""

    def __init__(self, row: Mapping[str, Any]):
        self._row = row
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def get(self, column: str, index: int) -> np.ndarray:
        key = (column, int(index))
        img = self._cache.get(key)
        if img is None:
            data = self.jpeg(column, index)
            buf = np.frombuffer(data, dtype=np.uint8)
            mode = cv2.IMREAD_COLOR if column == RGB else cv2.IMREAD_GRAYSCALE
            img = cv2.imdecode(buf, mode)  # (H, W, 3) BGR or (H, W)
            if img is None:
                raise CorruptVideo(self._video_id, f"{column}[{index}] is not a decodable JPEG")
            if column == RGB:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            self._cache[key] = img
        return img

    def jpeg(self, column: str, index: int) -> Any:
        """The stored bytes of JPEG ``column[index]``, checked against its checksum. ``column``
        is a list of JPEGs, or for a sparse row (``stm.data.preprocess.process_video_sparse``)
        a dict index -> JPEG."""
        index = int(index)
        jpegs = self._row[column]
        try:
            data = jpegs[index]
        except (IndexError, KeyError):
            raise CorruptVideo(self._video_id, f"{column} has no JPEG {index}") from None
        sums = self._row.get(CHECKSUMS[column])
        expected = None
        if sums is not None:
            if len(sums) != len(jpegs):
                problem = f"{column}: {len(sums)} checksums, {len(jpegs)} JPEGs"
                raise CorruptVideo(self._video_id, problem)
            expected = sums[index]
        check_jpeg(self._video_id, column, index, data, expected)
        return data

    @property
    def _video_id(self) -> str:
        return str(self._row.get(VIDEO_ID, "?"))


def crop_resize(img: np.ndarray, box: CropBox, out_h: int, out_w: int, flip: bool) -> np.ndarray:
    """Crop ``box`` from an (H, W[, C]) image, resize it to (out_h, out_w), mirror it if flip."""
    out = img[box.y : box.y + box.h, box.x : box.x + box.w]
    if out.shape[0] != out_h or out.shape[1] != out_w:
        out = cv2.resize(out, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    if flip:
        out = out[:, ::-1]
    return out


def chunk(
    frames: FrameCache,
    t: int,
    flow_idx: np.ndarray,
    box: CropBox,
    out_h: int,
    out_w: int,
    flip: bool,
    flow_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One chunk: the RGB frame t (3, H', W') and its flow stack (2L, H', W'), cropped alike.

    Flow values are resized as images, not rescaled with the crop's zoom, as in the original code.
    On a flip, u becomes 255 - u: the mirrored image moves the other way horizontally.

    Each flow plane is resized straight into its place in the stack (``flow_out``, a C-contiguous
    uint8 (2L, H', W') array, e.g. the caller's clip slice; allocated when None), then the whole
    stack is mirrored in one in-place ``cv2.flip`` and u inverted in place (255 - u == ~u).
    One ``cv2.resize`` of an (h, w, 2L) array gives the same values but was measured slower
    (docs/performance.md): the 2L-channel resize alone takes longer than 2L one-plane resizes.
    """
    rgb = crop_resize(frames.get(RGB, t), box, out_h, out_w, flip).transpose(2, 0, 1)  # (3,H',W')
    if flow_out is None:
        flow_out = np.empty((2 * len(flow_idx), out_h, out_w), dtype=np.uint8)  # (2L, H', W')
    elif not flow_out.flags.c_contiguous:  # the in-place flip below needs a reshape view
        raise ValueError("flow_out must be C-contiguous")
    ys, xs = slice(box.y, box.y + box.h), slice(box.x, box.x + box.w)
    resize = box.h != out_h or box.w != out_w
    for k, f in enumerate(flow_idx):
        for plane, column in ((2 * k, FLOW_U), (2 * k + 1, FLOW_V)):
            crop = frames.get(column, f)[ys, xs]
            if resize:
                cv2.resize(
                    crop, (out_w, out_h), dst=flow_out[plane], interpolation=cv2.INTER_LINEAR
                )
            else:
                flow_out[plane] = crop
    if flip:
        rows = flow_out.reshape(-1, out_w)  # a view: every row of every plane
        cv2.flip(rows, 1, dst=rows)
        u = flow_out[0::2]
        np.invert(u, out=u)  # 255 - u for uint8
    return rgb, flow_out


def _frame_shape(frames: FrameCache, t: int) -> tuple[int, int]:
    """(H, W) of the video, read from RGB frame t that the clip decodes anyway."""
    h, w = frames.get(RGB, t).shape[:2]
    return int(h), int(w)


# --- clips ------------------------------------------------------------------------------------


def video_key(video_id: str) -> int:
    """A video's number in clip batches (``VIDEO_KEY``): crc32 of its id, stable everywhere."""
    return zlib.crc32(str(video_id).encode())


def sample_train_plan(
    num_frames: int,
    frame_shape: Callable[[int], tuple[int, int]],
    spec: TrainClipSpec,
    *,
    rng: np.random.Generator,
) -> tuple[np.ndarray, CropBox, bool]:
    """The random choices of one training clip, in this order: the chunk times, the crop box,
    the flip. :func:`train_clip` and the device-decode path (``stm.data.device_clips``) both
    draw them here, so one generator gives both paths the same clip.

    Args:
        num_frames: N, the video's RGB frames.
        frame_shape: (H, W) of the video given the first chunk's frame index (a decoded frame's
            shape, or the shard's height / width columns).
        spec: the clip recipe.
        rng: the source of randomness.

    Returns:
        (times int64 (T,), crop box in frame pixels, flip).
    """
    times = sample_chunk_times(num_frames, spec, rng=rng)  # (T,)
    h, w = frame_shape(int(times[0]))
    box = _CROP_FNS[spec.crop](h, w, spec.crop_size, rng=rng)
    flip = bool(rng.random() < spec.flip_prob)
    return times, box, flip


def train_clip(
    row: Mapping[str, Any], spec: TrainClipSpec, *, rng: np.random.Generator
) -> dict[str, Any]:
    """One training clip of a video: T chunks, one crop box and one flip for everything.

    Args:
        row: a shard row (columns from ``stm.data.shards``): rgb, flow_u, flow_v JPEG lists,
            num_frames and label.
        spec: the clip recipe (chunks, stack length, crop, stride range, flip probability).
        rng: the source of randomness.

    Returns:
        {"rgb": uint8 (T, 3, S, S), "flow": uint8 (T, 2L, S, S) with u, v interleaved,
        "label": int, and for inspection "times": int64 (T,) the sampled RGB frame indices,
        "box": the CropBox in frame pixels, "flip": bool}.
    """
    n = int(row[NUM_FRAMES])
    frames = FrameCache(row)
    times, box, flip = sample_train_plan(n, lambda t: _frame_shape(frames, t), spec, rng=rng)
    s, length = spec.crop_size, spec.flow_length
    stacks = flow_stack_indices(times, n - 1, length)  # (T, L)
    rgb = np.empty((spec.num_chunks, 3, s, s), dtype=np.uint8)  # (T, 3, S, S)
    flow = np.empty((spec.num_chunks, 2 * length, s, s), dtype=np.uint8)  # (T, 2L, S, S)
    for i, t in enumerate(times):
        rgb[i] = chunk(frames, int(t), stacks[i], box, s, s, flip, flow[i])[0]
    return {
        "rgb": rgb,
        "flow": flow,
        "label": int(row[LABEL]),
        VIDEO_KEY: video_key(row[VIDEO_ID]) if VIDEO_ID in row else -1,
        "times": times,
        "box": box,
        "flip": flip,
    }


def test_clip(row: Mapping[str, Any], spec: TestClipSpec) -> dict[str, Any]:
    """The test views of a video (Sec. 4.2): deterministic, no randomness.

    T = ``spec.num_frames`` chunk centres from :func:`test_chunk_times`. Mode "full" (the
    paper's fully convolutional testing): V=2 views, the whole frame and its horizontal flip, at
    the stored resolution. Mode "10crop": V=10, crops of crop_size at top-left, top-right,
    bottom-left, bottom-right and centre, then the same 5 flipped. Flipped views have u
    inverted (255 - u).

    Returns:
        {"rgb": uint8 (V, T, 3, H', W'), "flow": uint8 (V, T, 2L, H', W'), "label": int,
        "times": int64 (T,)}, with (H', W') = (H, W) for "full" and (S, S) for "10crop".
    """
    n = int(row[NUM_FRAMES])
    frames = FrameCache(row)
    times = test_chunk_times(n, spec)  # (T,)
    stacks = flow_stack_indices(times, n - 1, spec.flow_length)  # (T, L)
    h, w = _frame_shape(frames, int(times[0]))
    if spec.mode == "full":
        boxes, out_h, out_w = [CropBox(0, 0, h, w)], h, w
    else:
        s = spec.crop_size
        boxes, out_h, out_w = ten_crop_boxes(h, w, s), s, s
    views = [(box, flip) for flip in (False, True) for box in boxes]
    t_count, length = spec.num_frames, spec.flow_length
    rgb = np.empty((len(views), t_count, 3, out_h, out_w), dtype=np.uint8)  # (V, T, 3, H', W')
    flow = np.empty((len(views), t_count, 2 * length, out_h, out_w), dtype=np.uint8)
    for i, t in enumerate(times):
        for v, (box, flip) in enumerate(views):
            rgb[v, i] = chunk(frames, int(t), stacks[i], box, out_h, out_w, flip, flow[v, i])[0]
    return {"rgb": rgb, "flow": flow, "label": int(row[LABEL]), "times": times}


# --- model inputs -----------------------------------------------------------------------------


# --- batch samplers for Ray Data map_batches --------------------------------------------------


class _ArrowList(Sequence):
    """The JPEGs of one video in an Arrow ``list<binary>`` cell, read lazily and without copies.

    Item k is a ``pyarrow.Buffer`` over element k's bytes (``np.frombuffer`` reads it in place),
    so a clip touches only the JPEGs it decodes, after its frame indices are sampled, instead of
    turning every frame of the video into Python bytes.
    """

    def __init__(self, values: pa.Array):
        self._values = values  # BinaryArray / LargeBinaryArray: this cell's elements (a view)

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, index: int) -> pa.Buffer:  # type: ignore[override]
        return self._values[int(index)].as_buffer()


_ROW_COLUMNS = (VIDEO_ID, LABEL, NUM_FRAMES, HEIGHT, WIDTH, *JPEG_COLUMNS, *CHECKSUMS.values())


def batch_rows(batch: Any) -> list[dict[str, Any]]:
    """Rows of a map_batches batch: a dict of column arrays ("numpy" format) or a pyarrow
    Table / RecordBatch. Arrow JPEG columns stay in Arrow memory (see :class:`_ArrowList`)."""
    if hasattr(batch, "to_pydict"):  # pyarrow.Table / RecordBatch
        names = set(batch.schema.names)
        columns = [c for c in _ROW_COLUMNS if c in names]
        data = {}
        for c in columns:
            col = batch.column(c)
            if c in JPEG_COLUMNS:
                data[c] = [_ArrowList(col[i].values) for i in range(batch.num_rows)]
            elif c in CHECKSUMS.values():  # null in shards written before checksums
                data[c] = [_checksum_array(col[i]) for i in range(batch.num_rows)]
            else:
                data[c] = col.to_pylist()
        return [{c: data[c][i] for c in columns} for i in range(batch.num_rows)]
    columns = [c for c in _ROW_COLUMNS if c in batch]
    size = len(batch[LABEL])
    return [{c: batch[c][i] for c in columns} for i in range(size)]


def _checksum_array(cell: pa.Scalar) -> np.ndarray | None:
    return cell.values.to_numpy(zero_copy_only=False) if cell.is_valid else None


def skipped(error: CorruptVideo) -> None:
    """The one warning for a stored video a sampler skips."""
    logger.warning(
        "skipping video %s: %s (counted in bad_videos; repair the dataset with "
        "python jobs/preprocess.py --verify and the options that made it)",
        error.video_id,
        error.problem,
    )


def video_seed(seed: int, epoch: int, video_id: str) -> np.random.SeedSequence:
    """The seed of one video's augmentation in one epoch: (seed, epoch, crc32(video_id)).

    crc32 is stable across processes and Python versions (unlike ``hash``), so a run is
    reproducible whichever Ray worker gets which video, in whatever batch.
    """
    return np.random.SeedSequence([int(seed), int(epoch), video_key(video_id)])


def rows_with_rngs(
    batch: Any, *, seed: int | None, epoch: int
) -> Iterator[tuple[dict[str, Any], np.random.Generator]]:
    """The rows of a batch (see :func:`batch_rows`), each with its augmentation generator:
    ``video_seed(seed, epoch, video_id)``, or with ``seed=None`` one generator of fresh OS
    entropy shared by the batch."""
    fresh = np.random.default_rng() if seed is None else None
    for row in batch_rows(batch):
        if fresh is not None:
            yield row, fresh
        else:
            yield row, np.random.default_rng(video_seed(seed, epoch, row[VIDEO_ID]))


def train_batch(
    batch: Any, spec: TrainClipSpec, *, epoch: int = 0, seed: int | None = 0
) -> dict[str, np.ndarray]:
    """Training clips of a batch of shard rows (a ``map_batches`` function).

    Randomness: with an integer ``seed``, video v in epoch e uses ``video_seed(seed, e, v)``:
    reproducible and independent of batching, and different every epoch as long as the caller
    passes the epoch number (rebuild the per-epoch pipeline with it). With ``seed=None``, every
    call draws fresh OS entropy (not reproducible).

    Args:
        batch: dict of column arrays (Ray "numpy" batch format) or a pyarrow Table, with the
            video_id, label, num_frames, rgb, flow_u and flow_v columns.
        spec: the clip recipe (see :func:`train_clip`).
        epoch, seed: see above.

    A video whose JPEGs fail their checksums or do not decode (``CorruptVideo``) is skipped
    with one warning: it has no row (the training loop counts the videos it did not get).

    Returns:
        {"rgb": uint8 (B, T, 3, S, S), "flow": uint8 (B, T, 2L, S, S), "label": int64 (B,),
        "video_key": int64 (B,) (:func:`video_key`)}.
    """
    clips = []
    for row, rng in rows_with_rngs(batch, seed=seed, epoch=epoch):
        try:
            clips.append(train_clip(row, spec, rng=rng))
        except CorruptVideo as e:
            skipped(e)
    size = (spec.crop_size, spec.crop_size)
    return stack_clips(clips, spec.num_chunks, spec.flow_length, size)


def test_batch(batch: Any, spec: TestClipSpec) -> dict[str, np.ndarray]:
    """Test views of a batch of shard rows (a ``map_batches`` function); see :func:`test_clip`.

    In "full" mode the videos of one batch must share a frame size (use batch_size=1 for
    datasets of mixed aspect ratios, e.g. HMDB51).

    A video whose JPEGs fail their checksums or do not decode is skipped with one warning (the
    evaluation counts the test videos it scored).

    Returns:
        {"rgb": uint8 (B, V, T, 3, H', W'), "flow": uint8 (B, V, T, 2L, H', W'),
        "label": int64 (B,)}.
    """
    clips = []
    for row in batch_rows(batch):
        try:
            clips.append(test_clip(row, spec))
        except CorruptVideo as e:
            skipped(e)
    shapes = {c["rgb"].shape for c in clips}
    if len(shapes) > 1:
        raise ValueError(
            f"videos of one test batch have different frame sizes {sorted(shapes)}; "
            "use batch_size=1 or mode='10crop'"
        )
    size = clips[0]["rgb"].shape[-2:] if clips else (spec.crop_size, spec.crop_size)
    views = 2 if spec.mode == "full" else 10
    return stack_clips(clips, spec.num_frames, spec.flow_length, size, views=views)


def stack_clips(
    clips: Sequence[dict[str, Any]],
    num_chunks: int,
    flow_length: int,
    size: tuple[int, int],
    views: int | None = None,
) -> dict[str, np.ndarray]:
    """Stack per-video clips into batch arrays (empty batches keep their trailing shape)."""
    lead = (num_chunks,) if views is None else (views, num_chunks)
    if not clips:
        out = {
            "rgb": np.zeros((0, *lead, 3, *size), dtype=np.uint8),
            "flow": np.zeros((0, *lead, 2 * flow_length, *size), dtype=np.uint8),
            "label": np.zeros((0,), dtype=np.int64),
        }
        if views is None:
            out[VIDEO_KEY] = np.zeros((0,), dtype=np.int64)
        return out
    out = {
        "rgb": np.stack([c["rgb"] for c in clips]),  # (B, [V,] T, 3, H, W)
        "flow": np.stack([c["flow"] for c in clips]),  # (B, [V,] T, 2L, H, W)
        "label": np.array([c["label"] for c in clips], dtype=np.int64),  # (B,)
    }
    if VIDEO_KEY in clips[0]:  # training clips: which video each comes from
        out[VIDEO_KEY] = np.array([c[VIDEO_KEY] for c in clips], dtype=np.int64)  # (B,)
    return out


class TrainClipSampler:
    """Callable class for ``Dataset.map_batches``: :func:`train_batch` with a fixed recipe.

    Args:
        spec: the clip recipe.
        epoch: the epoch number, part of each video's seed (build the per-epoch pipeline with it).
        seed: base seed; None for fresh, non-reproducible randomness on every call.
    """

    def __init__(self, spec: TrainClipSpec, *, epoch: int = 0, seed: int | None = 0):
        self.spec, self.epoch, self.seed = spec, epoch, seed

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        return train_batch(batch, self.spec, epoch=self.epoch, seed=self.seed)


# Their names start with "test": keep pytest from collecting them where a test module imports them.
test_chunk_times.__test__ = False  # type: ignore[attr-defined]
test_clip_spec.__test__ = False  # type: ignore[attr-defined]
test_clip.__test__ = False  # type: ignore[attr-defined]
test_batch.__test__ = False  # type: ignore[attr-defined]


class TestClipSampler:
    """Callable class for ``Dataset.map_batches``: :func:`test_batch` with a fixed spec."""

    __test__ = False  # not a pytest test class

    def __init__(self, spec: TestClipSpec):
        self.spec = spec

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        return test_batch(batch, self.spec)
