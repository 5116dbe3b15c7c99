"""Decode videos with PyAV, frame by frame, resized so the short side has a given length (the
long side bounded: see ``resized_shape``).

Frames are counted as they come out of the decoder, which is flushed at the end (codecs with
B-frames hold frames back); the container's declared frame count is never used.
Inputs are local paths or URIs (``s3://...``), the latter read through pyarrow's filesystems, so a
worker never relies on the driver's disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import av
import cv2
import numpy as np
import pyarrow.fs as pafs

from stm.storage import resolve

logger = logging.getLogger(__name__)


class DecodeError(RuntimeError):
    """A video that cannot be decoded (missing, empty, corrupt, truncated, not a video)."""


@dataclass(frozen=True)
class DecodedVideo:
    """All frames of a video: ``frames`` is (N, H, W, 3) uint8 RGB."""

    frames: np.ndarray
    fps: float


def resized_shape(
    height: int, width: int, short_side: int | None, max_long_side: int | None = None
) -> tuple[int, int]:
    """(height, width) after scaling so that min(height, width) == short_side (None: unchanged),
    unless the long side would then exceed ``max_long_side``: then scaled so that
    max(height, width) == max_long_side instead (aspect preserved; None: no bound).

    The bound keeps a frame's memory and flow time bounded whatever its aspect ratio: a 1024x16
    strip at short side 256 would otherwise be 16384x256.
    """
    h, w = height, width
    if short_side and min(h, w) != short_side:
        scale = short_side / min(height, width)
        if height <= width:
            h, w = short_side, max(1, round(width * scale))
        else:
            h, w = max(1, round(height * scale)), short_side
    if max_long_side and max(h, w) > max_long_side:
        scale = max_long_side / max(height, width)
        if height >= width:
            h, w = max_long_side, max(1, round(width * scale))
        else:
            h, w = max(1, round(height * scale)), max_long_side
    return h, w


def resize_short_side(
    frame: np.ndarray, short_side: int | None, max_long_side: int | None = None
) -> np.ndarray:
    """Resize an image to ``resized_shape`` (area filter down, bilinear up)."""
    h, w = frame.shape[:2]
    nh, nw = resized_shape(h, w, short_side, max_long_side)
    if (nh, nw) == (h, w):
        return frame
    interp = cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR
    return cv2.resize(frame, (nw, nh), interpolation=interp)


def _open(source: str) -> av.container.InputContainer:
    fs, path = resolve(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DecodeError(f"file not found: {source}")
    if info.type != pafs.FileType.File:
        raise DecodeError(f"not a file: {source}")
    if info.size == 0:
        raise DecodeError("empty file (0 bytes)")
    if isinstance(fs, pafs.LocalFileSystem):
        return av.open(path, mode="r")
    return av.open(fs.open_input_file(path), mode="r")  # a seekable file object


class VideoReader:
    """A decoded video stream, read frame by frame.

    Use as a context manager::

        with VideoReader(path) as video:
            for rgb in video.frames(short_side=256):
                ...

    Raises ``DecodeError`` (with a one-line reason) for anything that is not a decodable video.
    """

    def __init__(self, source: str) -> None:
        try:
            self._container = _open(source)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise DecodeError(f"cannot open as a video: {_reason(e)}") from e
        if not self._container.streams.video:
            self._container.close()
            raise DecodeError("no video stream in the file")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "SLICE"  # one core per video: no frame-threading pool
        self._stream.codec_context.thread_count = 1
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.num_decoded = 0  # frames the decoder returned so far
        self.source_shape: tuple[int, int] | None = None  # (height, width) before resizing

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the container (and the file it holds)."""
        self._container.close()

    def _decoded(self, max_frames: int | None) -> Iterator[av.VideoFrame]:
        """The decoder's frames, not converted, at most ``max_frames``; counts them in
        ``num_decoded`` and records the first one's (height, width) in ``source_shape``.

        A decoding error after the first frame still raises: a truncated or corrupt video fails
        as a whole rather than silently losing its tail.
        """
        flushed = False
        try:
            for packet in self._container.demux(self._stream):
                flushed = packet.size == 0  # PyAV ends demuxing with a flush packet
                for frame in packet.decode():
                    if self.source_shape is None:
                        self.source_shape = (frame.height, frame.width)
                    yield frame
                    self.num_decoded += 1
                    if max_frames and self.num_decoded >= max_frames:
                        return
            if not flushed:
                for frame in self._stream.codec_context.decode(None):
                    if self.source_shape is None:
                        self.source_shape = (frame.height, frame.width)
                    yield frame
                    self.num_decoded += 1
                    if max_frames and self.num_decoded >= max_frames:
                        return
        except av.error.FFmpegError as e:
            raise DecodeError(
                f"decoding failed after {self.num_decoded} frames: {_reason(e)}"
            ) from e
        if self.num_decoded == 0:
            raise DecodeError("no decodable frames")

    def frames(
        self,
        short_side: int | None = None,
        max_frames: int | None = None,
        max_long_side: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield (H, W, 3) uint8 RGB frames, resized to ``short_side`` with the long side at
        most ``max_long_side`` (``resized_shape``), at most ``max_frames``; one at a time."""
        for frame in self._decoded(max_frames):
            yield resize_short_side(frame.to_ndarray(format="rgb24"), short_side, max_long_side)

    def count_frames(self, max_frames: int | None = None) -> int:
        """Decode the rest of the video without converting its frames; the frames decoded.

        What ``frames`` would yield, counted (the container's declared count is never used).
        """
        for _ in self._decoded(max_frames):
            pass
        return self.num_decoded

    def frames_at(
        self,
        indices: Iterable[int],
        short_side: int | None = None,
        max_long_side: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (k, frame k) for the frame indices ``indices`` only, in increasing order, frame
        k as ``frames`` yields it; the other frames are decoded but never converted, and
        decoding stops after the last index wanted. An index past the video's end is skipped."""
        wanted = set(int(k) for k in indices)
        if not wanted:
            return
        last = max(wanted)
        for k, frame in enumerate(self._decoded(last + 1)):
            if k in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                yield k, resize_short_side(rgb, short_side, max_long_side)


def decode_video(
    source: str,
    short_side: int | None = None,
    max_frames: int | None = None,
    max_long_side: int | None = None,
) -> DecodedVideo:
    """Decode a whole video into memory (tests, benchmarks, small clips).

    The pipeline streams frames with ``VideoReader`` instead, keeping only JPEG bytes.
    """
    with VideoReader(source) as video:
        frames = list(video.frames(short_side, max_frames, max_long_side))
        return DecodedVideo(frames=np.stack(frames), fps=video.fps)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300]
