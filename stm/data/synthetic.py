"""The synthetic action dataset of the embedded default: real encoded videos (PyAV) whose classes
need both streams. Written UCF101-style, so ``stm.data.sources.list_videos("synthetic", root)``
reads it as one split.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

import av
import cv2
import numpy as np
import pyarrow.fs as pafs

from stm.config import (
    SYNTHETIC_HEIGHT,
    SYNTHETIC_NUM_FRAMES,
    SYNTHETIC_NUM_VIDEOS,
    SYNTHETIC_WIDTH,
    UsageError,
)
from stm.storage import resolve

logger = logging.getLogger(__name__)

# Classes = identity x motion. Identities differ only in hue, at the same grayscale luminance and
# the same outline, so flow (computed on grayscale) cannot tell them apart; a single frame cannot
# tell the motion (positions wrap around the frame, so where the object is says nothing). Motions
# are unchanged by a horizontal flip (training flips clips), so no class turns into another one.
SYNTHETIC_IDENTITIES = ("red", "teal")  # +chroma / -chroma at equal luminance
SYNTHETIC_MOTIONS = ("down", "sideways", "up")  # sideways = oscillating left-right
SYNTHETIC_CLASSES = tuple(f"{i}_{m}" for i in SYNTHETIC_IDENTITIES for m in SYNTHETIC_MOTIONS)
SYNTHETIC_FPS = 25
SYNTHETIC_TEST_EVERY = 5  # the k-th video of a class is a test video when k % 5 == 4

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as cv2.COLOR_RGB2GRAY and the codecs
_CHROMA_A = np.array([56.0, -21.0, -(0.299 * 56.0 - 0.587 * 21.0) / 0.114])  # luma 0, reddish
_CHROMA_B = np.cross(_LUMA, _CHROMA_A / np.linalg.norm(_CHROMA_A)) * 40.0  # luma 0, orthogonal
_MARKER = "synthetic.json"


@dataclass(frozen=True)
class SyntheticScene:
    """Everything random about one synthetic video (drawn from a seed, see ``synthetic_scene``)."""

    identity: str
    motion: str
    width: int
    height: int
    num_frames: int
    seed: int  # pixels (background, textures, noise) come from this seed
    radius: float  # the actor: a textured disc
    texture_blur: float  # the actor's texture: smoothed noise (aperiodic: no aliased flow)
    luma_base: float
    luma_amp: float
    chroma_scale: float
    x0: float
    y0: float
    speed: float  # px/frame for up/down
    amplitude: float  # px for sideways
    period: float  # frames for sideways
    phase: float
    distractor_size: float  # a textured square moving in any direction
    distractor_velocity: tuple[float, float]
    distractor_xy: tuple[float, float]
    distractor_chroma: tuple[float, float]  # coefficients on the two zero-luma colour axes


def synthetic_scene(
    index: int,
    seed: int = 0,
    width: int = SYNTHETIC_WIDTH,
    height: int = SYNTHETIC_HEIGHT,
    num_frames: int = SYNTHETIC_NUM_FRAMES,
) -> SyntheticScene:
    """The scene of video ``index``: class ``SYNTHETIC_CLASSES[index % 6]``, random parameters
    from (seed, index) only, so a video does not depend on how many others are generated.
    """
    rng = np.random.default_rng([seed, index])
    cls = SYNTHETIC_CLASSES[index % len(SYNTHETIC_CLASSES)]
    identity, motion = cls.split("_")
    size = min(width, height)
    angle = rng.uniform(0, 2 * np.pi)
    return SyntheticScene(
        identity=identity,
        motion=motion,
        width=width,
        height=height,
        num_frames=num_frames,
        seed=int(rng.integers(2**31)),
        radius=size * rng.uniform(0.15, 0.2),
        texture_blur=rng.uniform(1.0, 1.8),
        luma_base=rng.uniform(105, 145),
        luma_amp=rng.uniform(28, 40),
        chroma_scale=rng.uniform(0.8, 1.0),
        x0=rng.uniform(0, width),
        y0=rng.uniform(0, height),
        speed=rng.uniform(1.5, 3.0),
        amplitude=rng.uniform(6.0, 12.0),
        period=rng.uniform(10.0, 16.0),
        phase=rng.uniform(0, 2 * np.pi),
        distractor_size=size * rng.uniform(0.1, 0.16),
        distractor_velocity=(
            float(rng.uniform(0.5, 2.5) * np.cos(angle)),
            float(rng.uniform(0.5, 2.5) * np.sin(angle)),
        ),
        distractor_xy=(float(rng.uniform(0, width)), float(rng.uniform(0, height))),
        distractor_chroma=(float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-1.0, 1.0))),
    )


def render_synthetic(scene: SyntheticScene) -> np.ndarray:
    """Render a scene: (T, H, W, 3) uint8 RGB frames.

    Background: a random colour gradient with low-frequency texture and a small camera shake.
    Actor: a disc with a smooth random texture, hue set by its identity. Distractor: a smaller
    textured square of random hue moving in a random direction. Gaussian noise on every frame.
    """
    rng = np.random.default_rng(scene.seed)
    h, w, t_len = scene.height, scene.width, scene.num_frames
    pad = 2
    background = _background(rng, h + 2 * pad, w + 2 * pad)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sign = 1.0 if scene.identity == SYNTHETIC_IDENTITIES[0] else -1.0
    actor_chroma = sign * scene.chroma_scale * _CHROMA_A
    distractor_chroma = (
        scene.distractor_chroma[0] * _CHROMA_A + scene.distractor_chroma[1] * _CHROMA_B
    )
    half_tex = math.ceil(scene.radius) + 2
    noise = rng.normal(0.0, 1.0, size=(2 * half_tex + 1,) * 2).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), scene.texture_blur)
    noise = (noise - noise.mean()) / max(float(noise.std()), 1e-6)
    texture = np.clip(scene.luma_base + scene.luma_amp * noise, 60, 190).astype(np.float32)
    shake = np.zeros(2, dtype=int)
    frames = np.empty((t_len, h, w, 3), dtype=np.uint8)
    for t in range(t_len):
        shake = np.clip(shake + rng.integers(-1, 2, size=2) * (rng.random(2) < 0.3), -pad, pad)
        frame = background[pad + shake[1] : pad + shake[1] + h, pad + shake[0] : pad + shake[0] + w]
        frame = frame.copy()
        # distractor: a square with a checker texture, on a torus (wraps around the edges)
        dx0, dy0 = scene.distractor_xy
        vx, vy = scene.distractor_velocity
        ddx = _wrap(xs - (dx0 + vx * t), w)
        ddy = _wrap(ys - (dy0 + vy * t), h)
        half = scene.distractor_size / 2
        cover = np.clip(half + 0.5 - np.maximum(np.abs(ddx), np.abs(ddy)), 0.0, 1.0)
        checker = ((np.floor(ddx / 3) + np.floor(ddy / 3)) % 2) * 50 + 100
        _paint(frame, cover, checker, distractor_chroma)
        # actor: a textured disc, moving by its class's motion
        cx, cy = scene.x0, scene.y0
        if scene.motion == "up":
            cy -= scene.speed * t
        elif scene.motion == "down":
            cy += scene.speed * t
        else:
            cx += scene.amplitude * math.sin(2 * math.pi * t / scene.period + scene.phase)
        adx, ady = _wrap(xs - cx, w), _wrap(ys - cy, h)
        cover = np.clip(scene.radius + 0.5 - np.hypot(adx, ady), 0.0, 1.0)
        luma = cv2.remap(  # the texture moves with the disc (sub-pixel, bilinear)
            texture, (adx + half_tex).astype(np.float32), (ady + half_tex).astype(np.float32),
            cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT,
        ).astype(np.float64)  # fmt: skip
        _paint(frame, cover, luma, actor_chroma)
        frame += rng.normal(0.0, 4.0, size=frame.shape)
        frames[t] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
    return frames


def _wrap(d: np.ndarray, period: float) -> np.ndarray:
    return (d + period / 2) % period - period / 2


def _paint(frame: np.ndarray, cover: np.ndarray, luma: np.ndarray, chroma: np.ndarray) -> None:
    colour = luma[..., None] + chroma  # (H, W, 3); luminance of colour == luma
    frame *= 1.0 - cover[..., None]
    frame += cover[..., None] * colour


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1, c2 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w]
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / max(h, w)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    image = c1 + ramp[..., None] * (c2 - c1)
    coarse = rng.normal(0.0, 18.0, size=(6, 8))
    blobs = _upsample(coarse, h, w)
    return np.clip(image + blobs[..., None], 0, 255)


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    gy = np.linspace(0, grid.shape[0] - 1, h)
    gx = np.linspace(0, grid.shape[1] - 1, w)
    rows = np.array([np.interp(gx, np.arange(grid.shape[1]), r) for r in grid])
    return np.array([np.interp(gy, np.arange(grid.shape[0]), c) for c in rows.T]).T


def write_video(path: str, frames: np.ndarray, fps: int = SYNTHETIC_FPS) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames with PyAV: MPEG-4 part 2 in AVI (as UCF101's Xvid)."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        stream.codec_context.thread_count = 1
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def generate_synthetic(
    root: str,
    num_videos: int = SYNTHETIC_NUM_VIDEOS,
    seed: int = 0,
    width: int = SYNTHETIC_WIDTH,
    height: int = SYNTHETIC_HEIGHT,
    num_frames: int = SYNTHETIC_NUM_FRAMES,
) -> str:
    """Write the synthetic action dataset under ``root`` (a local folder) and return ``root``.

    Layout (UCF101-style, read back by ``list_videos("synthetic", root)``)::

        root/<class>/<class>_<k>.avi   k-th video of the class, MPEG-4 in AVI, ``fps`` 25
        root/classInd.txt, root/trainlist01.txt, root/testlist01.txt   one split
        root/synthetic.json            the parameters; written last, marks a complete dataset

    Six classes = 2 identities (same luminance, different hue) x 3 motions (up, down, sideways):
    the appearance stream sees identity, the motion stream sees motion, and only both together
    name the class. Video ``i`` has class ``SYNTHETIC_CLASSES[i % 6]``; every 5th video of a class
    is a test video. Deterministic for a seed; a complete dataset with the same parameters is
    kept as it is (no work).
    """
    if num_videos < 1 or width % 2 or height % 2 or num_frames < 2:
        raise UsageError("synthetic: need num_videos >= 1, even width/height, num_frames >= 2")
    params = {
        "num_videos": num_videos,
        "seed": seed,
        "width": width,
        "height": height,
        "num_frames": num_frames,
        "classes": list(SYNTHETIC_CLASSES),
    }
    fs, base = resolve(root)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise UsageError(f"synthetic videos are generated on a local disk, not {root}")
    marker = posixpath.join(base, _MARKER)
    if fs.get_file_info(marker).type == pafs.FileType.File:
        with fs.open_input_stream(marker) as f:
            if json.loads(f.read()) == params:
                logger.info("synthetic dataset already complete in %s", root)
                return root
        fs.delete_file(marker)
    train, test = [], []
    for i in range(num_videos):
        scene = synthetic_scene(i, seed, width, height, num_frames)
        cls = f"{scene.identity}_{scene.motion}"
        k = i // len(SYNTHETIC_CLASSES)
        rel = f"{cls}/{cls}_{k:03d}.avi"
        fs.create_dir(posixpath.join(base, cls), recursive=True)
        write_video(posixpath.join(base, rel), render_synthetic(scene))
        label = SYNTHETIC_CLASSES.index(cls) + 1
        (test if k % SYNTHETIC_TEST_EVERY == SYNTHETIC_TEST_EVERY - 1 else train).append(
            (rel, label)
        )
    _write_text(base, "classInd.txt", (f"{i + 1} {c}" for i, c in enumerate(SYNTHETIC_CLASSES)))
    _write_text(base, "trainlist01.txt", (f"{rel} {label}" for rel, label in train))
    _write_text(base, "testlist01.txt", (rel for rel, _ in test))
    _write_text(base, _MARKER, [json.dumps(params)])
    logger.info("wrote %d synthetic videos to %s", num_videos, root)
    return root


def _write_text(base: str, name: str, lines: Iterable[str]) -> None:
    with open(posixpath.join(base, name), "w") as f:
        f.writelines(line + "\n" for line in lines)
