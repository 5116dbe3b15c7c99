"""Decode whole videos with PyAV, frame by frame, resized so the short side has a given length.

Frames are counted as they come out of the decoder, which is flushed at the end (codecs with
B-frames hold frames back); the container's declared frame count is never used.
Inputs are local paths or URIs (``s3://...``), the latter read through pyarrow's filesystems, so a
worker never relies on the driver's disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
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


def resized_shape(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(height, width) after scaling so that min(height, width) == short_side (None: unchanged)."""
    if not short_side or min(height, width) == short_side:
        return height, width
    scale = short_side / min(height, width)
    if height <= width:
        return short_side, max(1, round(width * scale))
    return max(1, round(height * scale)), short_side


def resize_short_side(frame: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resize an image so its short side is ``short_side`` (area filter down, bilinear up)."""
    h, w = frame.shape[:2]
    nh, nw = resized_shape(h, w, short_side)
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

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the container (and the file it holds)."""
        self._container.close()

    def frames(self, short_side: int | None = None, max_frames: int | None = None) -> Iterator:
        """Yield (H, W, 3) uint8 RGB frames, resized to ``short_side``, at most ``max_frames``.

        A decoding error after the first frame still raises: a truncated or corrupt video fails
        as a whole rather than silently losing its tail.
        """
        flushed = False
        try:
            for packet in self._container.demux(self._stream):
                flushed = packet.size == 0  # PyAV ends demuxing with a flush packet
                for frame in packet.decode():
                    yield resize_short_side(frame.to_ndarray(format="rgb24"), short_side)
                    self.num_decoded += 1
                    if max_frames and self.num_decoded >= max_frames:
                        return
            if not flushed:
                for frame in self._stream.codec_context.decode(None):
                    yield resize_short_side(frame.to_ndarray(format="rgb24"), short_side)
                    self.num_decoded += 1
                    if max_frames and self.num_decoded >= max_frames:
                        return
        except av.error.FFmpegError as e:
            raise DecodeError(
                f"decoding failed after {self.num_decoded} frames: {_reason(e)}"
            ) from e
        if self.num_decoded == 0:
            raise DecodeError("no decodable frames")


def decode_video(
    source: str, short_side: int | None = None, max_frames: int | None = None
) -> DecodedVideo:
    """Decode a whole video into memory (tests, benchmarks, small clips).

    The pipeline streams frames with ``VideoReader`` instead, keeping only JPEG bytes.
    """
    with VideoReader(source) as video:
        frames = list(video.frames(short_side, max_frames))
        return DecodedVideo(frames=np.stack(frames), fps=video.fps)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300]
