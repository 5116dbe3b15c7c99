"""Dual TV-L1 optical flow (Zach, Pock & Bischof 2007) in PyTorch, batched over frame pairs.

It follows OpenCV contrib's ``DualTVL1OpticalFlow`` (the CPU path of ``tvl1flow.cpp``, itself
after Sanchez Perez et al.) step by step, so that its flow agrees with ``cv2.optflow``'s to within
the storage quantisation (see ``stm.data.flow.quantize_flow``):

- images as float32 in 0..255; a pyramid of ``nscales`` levels, each a bilinear resize by
  ``scale_step`` of the one above (``cv::resize`` INTER_LINEAR: half-pixel centres, no
  anti-aliasing, sizes rounded), stopping early at a level under 16 px;
- coarse to fine, the flow starting at zero; per level the dual variables start at zero and
  ``warps`` times: warp I1 and its centred gradient by the flow with bicubic interpolation
  (``cv::remap`` INTER_CUBIC, zero outside, map coordinates rounded to 1/32 px), linearise the
  data term (``grad``, ``rho_c``), then up to ``outer_iterations`` times: median-filter the flow
  (``median_filtering`` x ``median_filtering``, replicated borders), then up to
  ``inner_iterations`` times: thresholding step (lambda * theta), primal update with the
  divergence of the dual variables, dual update with forward differences (tau / theta); the warp
  stops when the summed squared flow change of an iteration falls to epsilon^2 * area;
- the flow is resized to the next finer level (bilinear) and scaled by 1 / scale_step.

Batching: every frame pair of a batch is one sample of the same tensors. The stopping rule is
applied per pair (a converged pair is frozen while the others go on), so a pair's flow does not
depend on the batch it is computed in. Batches are bounded (``BATCH_PAIRS``, ``MAX_BATCH_PIXELS``)
and ``iter_compute`` streams a video's pairs through them, so no call holds the flow of a whole
video. Plain PyTorch and numpy: no OpenCV, Ray or PyAV needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# A batch is at most BATCH_PAIRS pairs and at most MAX_BATCH_PIXELS pixels (pairs x H x W): the
# batch of 64 pairs the GPU throughput was tuned for (docs/performance.md) for every frame up to
# 16:9 at short side 256 (456x256), fewer pairs of larger frames (28 at 1024x256), so that a
# batch's memory, on the host and on the device, grows neither with the video nor the frame.
BATCH_PAIRS = 64
MAX_BATCH_PIXELS = BATCH_PAIRS * 456 * 256


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cv_round(x: float) -> int:
    return int(round(x))  # cvRound / saturate_cast<int>: round half to even, like Python's round


def _resize_linear(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] | None):
    """``cv::resize`` INTER_LINEAR of (N, C, H, W) to ``size`` = (h, w).

    ``scale`` = (sy, sx) source pixels per destination pixel; None: the size ratio (OpenCV's
    rule when a destination size is given). Out-of-range sources are clamped to the border.
    """
    n, _, h, w = x.shape
    oh, ow = size
    sy, sx = scale if scale is not None else (h / oh, w / ow)
    ys = (torch.arange(oh, device=x.device, dtype=torch.float64) + 0.5) * sy - 0.5
    xs = (torch.arange(ow, device=x.device, dtype=torch.float64) + 0.5) * sx - 0.5
    gy = (2.0 * ys / max(h - 1, 1) - 1.0).float()
    gx = (2.0 * xs / max(w - 1, 1) - 1.0).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
    grid = grid.unsqueeze(0).expand(n, oh, ow, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's centeredGradient of (N, H, W): half central differences, one-sided (halved) at
    the borders, i.e. central differences on the replicate-padded image."""
    p = F.pad(img.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    dx = 0.5 * (p[:, 1:-1, 2:] - p[:, 1:-1, :-2])
    dy = 0.5 * (p[:, 2:, 1:-1] - p[:, :-2, 1:-1])
    return dx, dy


def _forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of (..., H, W), zero in the last column (x) and last row (y)."""
    dx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward-difference divergence of (..., H, W) fields, the field taken as 0 before the
    first column and row (OpenCV's divergence; the adjoint of ``_forward_gradient``)."""
    return px - F.pad(px[..., :, :-1], (1, 0, 0, 0)) + py - F.pad(py[..., :-1, :], (0, 0, 1, 0))


def _median(u: torch.Tensor, k: int) -> torch.Tensor:
    """k x k median of (N, C, H, W) with replicated borders (``cv::medianBlur`` on float)."""
    n, c, h, w = u.shape
    p = F.pad(u, (k // 2,) * 4, mode="replicate")
    patches = p.unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H, W, k, k)
    return patches.reshape(n, c, h, w, k * k).median(dim=-1).values


def _remap_cubic(src: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample (N, C, H, W) at (x + u1, y + u2), bicubic (a = -0.75), zero outside, the sampling
    positions rounded to 1/32 px as ``cv::remap`` does with float maps."""
    n, _, h, w = src.shape
    ys = torch.arange(h, device=src.device, dtype=src.dtype).view(1, h, 1)
    xs = torch.arange(w, device=src.device, dtype=src.dtype).view(1, 1, w)
    mx = torch.round((xs + u[:, 0]) * 32.0) / 32.0
    my = torch.round((ys + u[:, 1]) * 32.0) / 32.0
    grid = torch.stack((2.0 * mx / (w - 1) - 1.0, 2.0 * my / (h - 1) - 1.0), dim=-1)
    return F.grid_sample(src, grid, mode="bicubic", padding_mode="zeros", align_corners=True)


class TorchTVL1Flow:
    """Dual TV-L1 flow as OpenCV's ``cv2.optflow.DualTVL1OpticalFlow_create()`` computes it.

    ``estimator(prev, next)`` for one uint8 (H, W) pair -> float32 (H, W, 2) (u, v), like the
    other estimators of ``stm.data.flow``; ``compute(prevs, nexts)`` for N pairs of one size at
    once -> (N, H, W, 2), in batches of ``pairs_per_batch(H, W)`` pairs (``batch_size``, fewer
    for frames over ``max_batch_pixels / batch_size`` pixels); ``iter_compute(pairs)`` streams
    pairs through the same batches, holding one batch of frames and flows at a time (what the
    preprocessing of a long video uses). The parameters and their defaults are OpenCV's
    (``lambda_`` for lambda). ``device``: "cuda" when available, else "cpu".

    ``sync_every``: inner iterations between the host's checks that some pair of the batch has
    not converged yet (a GPU sync each); the steps freeze converged pairs themselves, so it only
    trades wasted iterations (at most ``sync_every`` - 1 a warp) against syncs, never the flow.
    ``compile``: run the inner step ``torch.compile``'d (Inductor fuses its ~35 elementwise
    kernels into 5 loops and a reduction); None: on CUDA only, where launches and memory
    traffic decide the speed. On the CPU it is off by default although it runs 1.6-2x faster
    there (2-core VM, 340x256 and 320x240, 2 pairs): compiling costs ~45 s a process with a cold
    Inductor cache (two C++ graphs), a minute of work at 0.3 pairs/s, and the CPU's production
    estimator is OpenCV's ("tvl1"); pass compile=True for long CPU runs.
    ``compile_mode``: torch.compile's ``mode`` (e.g. "reduce-overhead", CUDA graphs: not
    measured yet). ``stats``: counters of the work done (see ``reset_stats``).
    """

    name = "tvl1-torch"
    batched = True  # ``compute`` takes many pairs at once (see stm.data.preprocess)

    def __init__(
        self,
        tau: float = 0.25,
        lambda_: float = 0.15,
        theta: float = 0.3,
        nscales: int = 5,
        warps: int = 5,
        epsilon: float = 0.01,
        inner_iterations: int = 30,
        outer_iterations: int = 10,
        scale_step: float = 0.8,
        gamma: float = 0.0,
        median_filtering: int = 5,
        device: str | torch.device | None = None,
        batch_size: int = BATCH_PAIRS,
        max_batch_pixels: int = MAX_BATCH_PIXELS,
        sync_every: int = 10,
        compile: bool | None = None,
        compile_mode: str | None = None,
    ) -> None:
        if gamma != 0.0:
            raise NotImplementedError("gamma != 0 (illumination term) is not implemented")
        if median_filtering > 1 and median_filtering % 2 == 0:
            raise ValueError("median_filtering must be odd")
        self.tau, self.lambda_, self.theta = tau, lambda_, theta
        self.nscales, self.warps, self.epsilon = nscales, warps, epsilon
        self.inner_iterations, self.outer_iterations = inner_iterations, outer_iterations
        self.scale_step, self.gamma, self.median_filtering = scale_step, gamma, median_filtering
        self.device = torch.device(device or default_device())
        self.batch_size = max(1, int(batch_size))
        self.max_batch_pixels = max(1, int(max_batch_pixels))
        self.sync_every = max(1, int(sync_every))
        self.compile = self.device.type == "cuda" if compile is None else bool(compile)
        self.compile_mode = compile_mode
        self._compiled_ran = False  # a compiled step has run (no fallback to eager after that)
        self.reset_stats()

    # --- public API -----------------------------------------------------------------------
    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return self.compute(prev[None], nxt[None])[0]

    def compute(
        self, prevs: np.ndarray | Sequence[np.ndarray], nexts: np.ndarray | Sequence[np.ndarray]
    ) -> np.ndarray:
        """Flow from ``prevs[i]`` to ``nexts[i]`` for N grayscale pairs of one size."""
        prevs, nexts = np.asarray(prevs), np.asarray(nexts)
        if prevs.shape != nexts.shape or prevs.ndim != 3:
            raise ValueError(f"expected two (N, H, W) stacks, got {prevs.shape}, {nexts.shape}")
        n, h, w = prevs.shape
        if h < 3 or w < 3:
            raise ValueError(f"frames of {h}x{w}: TV-L1 needs at least 3x3")
        out = np.empty((n, h, w, 2), dtype=np.float32)
        size = self.pairs_per_batch(h, w)
        for s in range(0, n, size):
            out[s : s + size] = self.compute_tensor(
                torch.from_numpy(prevs[s : s + size]), torch.from_numpy(nexts[s : s + size])
            ).cpu().numpy()  # fmt: skip
        return out

    def pairs_per_batch(self, height: int, width: int) -> int:
        """Pairs of (height, width) frames per batch: ``batch_size``, fewer when that many would
        exceed ``max_batch_pixels``; at least 1."""
        return max(1, min(self.batch_size, self.max_batch_pixels // max(1, height * width)))

    def iter_compute(self, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
        """Flow (H, W, 2) of each (prev, next) uint8 pair of ``pairs``, in order, computed in
        batches of ``pairs_per_batch`` pairs: the pairs are pulled one batch at a time, so at
        most one batch of frames and of flows is held, whatever the number of pairs. The
        batches are those ``compute`` makes of the same pairs (the same flow)."""
        prevs: list[np.ndarray] = []
        nexts: list[np.ndarray] = []
        size = 0
        for prev, nxt in pairs:
            if not prevs:
                size = self.pairs_per_batch(*prev.shape[:2])
            prevs.append(prev)
            nexts.append(nxt)
            if len(prevs) == size:
                yield from _own_flows(self.compute(np.stack(prevs), np.stack(nexts)))
                prevs, nexts = [], []
        if prevs:
            yield from _own_flows(self.compute(np.stack(prevs), np.stack(nexts)))

    @torch.no_grad()
    def compute_tensor(self, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
        """(N, H, W) tensors (uint8 0..255 or float 0..1, like OpenCV) -> (N, H, W, 2) flow on
        ``self.device``.

        If compiling the step fails before it has ever run (a node without a working compiler
        toolchain for Inductor, say), this warns once and goes on eagerly: the same flow up to
        rounding, only slower. Any other error, a CUDA out-of-memory above all (even one hit
        while compiling), is raised as it is: it is no reason to give up compilation for good.
        """
        if not self.compile or self._compiled_ran:
            return self._compute(i0, i1)
        try:
            out = self._compute(i0, i1)
        except Exception as err:
            if not is_compile_failure(err):
                raise
            logger.warning(
                "tvl1-torch: torch.compile of the inner step failed (%s: %s); running eagerly",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            self.compile = False
            self.reset_stats()
            return self._compute(i0, i1)
        self._compiled_ran = True
        return out

    def _compute(self, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if i0.dtype == torch.uint8 else 255.0
        i0 = i0.to(self.device).float() * scale
        i1 = i1.to(self.device).float() * scale
        n, h, w = i0.shape
        self.stats["pairs"] += n
        self.stats["batches"] += 1
        i0s, i1s = [i0], [i1]
        for _ in range(1, self.nscales):
            ph, pw = i0s[-1].shape[-2:]
            size = (_cv_round(ph * self.scale_step), _cv_round(pw * self.scale_step))
            if size[0] < 16 or size[1] < 16:
                break
            both = torch.stack((i0s[-1], i1s[-1]), dim=1)
            step = (1.0 / self.scale_step, 1.0 / self.scale_step)
            small = _resize_linear(both, size, step)
            i0s.append(small[:, 0])
            i1s.append(small[:, 1])
        u = torch.zeros((n, 2, *i0s[-1].shape[-2:]), device=self.device)
        for s in range(len(i0s) - 1, -1, -1):
            u = self._one_scale(i0s[s], i1s[s], u, s)
            if s > 0:
                u = _resize_linear(u, tuple(i0s[s - 1].shape[-2:]), None) * (1.0 / self.scale_step)
        return u.permute(0, 2, 3, 1).contiguous()

    # --- one pyramid level ------------------------------------------------------------------
    def _one_scale(
        self, i0: torch.Tensor, i1: torch.Tensor, u: torch.Tensor, level: int
    ) -> torch.Tensor:
        n, h, w = i0.shape
        eps = float(np.float32(self.epsilon * self.epsilon * h * w))
        l_t = self.lambda_ * self.theta
        taut = self.tau / self.theta
        theta = self.theta
        i1x, i1y = _centered_gradient(i1)
        src = torch.stack((i1, i1x, i1y), dim=1)
        p = torch.zeros((n, 2, 2, h, w), device=i0.device)  # p[:, k] = (p_k1, p_k2) for u_k
        k = self.sync_every
        step = _compiled(self.compile_mode) if self.compile else None
        stats, ran = self.stats, 0
        for _ in range(self.warps):
            warped = _remap_cubic(src, u)
            i1w, ix, iy = warped[:, 0], warped[:, 1], warped[:, 2]
            g = torch.stack((ix, iy), dim=1)  # (N, 2, H, W)
            grad = ix * ix + iy * iy
            rho_c = i1w - ix * u[:, 0] - iy * u[:, 1] - i0
            if step is None:  # eager: the constants once a warp (bit-identical to recomputing)
                c = _step_constants(g, grad, rho_c, l_t)
            active = torch.ones(n, dtype=torch.bool, device=i0.device)
            fresh = True
            for _ in range(self.outer_iterations):
                stats["syncs"] += 1
                if not bool(active.any()):
                    break
                stats["outer_iterations"] += 1
                if self.median_filtering > 1:
                    u = torch.where(active.view(n, 1, 1, 1), _median(u, self.median_filtering), u)
                done = 0
                while done < self.inner_iterations:
                    # k steps between host syncs: a converged pair is frozen by the steps
                    # themselves, so checking less often only costs work, never changes the flow
                    m = min(k, self.inner_iterations - done)
                    for _ in range(m):
                        if step is None:
                            u, p, active = _inner_step(u, p, c, active, theta, taut, eps)
                            continue
                        if fresh:  # only a call that may compile needs the marks (~3 us each)
                            for t in (u, p, g, grad, rho_c, active):
                                _mark_unbacked(t, 0)
                            fresh = False
                        u, p, active = step(u, p, g, grad, rho_c, active, l_t, theta, taut, eps)
                    done += m
                    if done < self.inner_iterations:
                        stats["syncs"] += 1
                        if not bool(active.any()):
                            break
                ran += done
        stats["warps"] += self.warps
        stats["inner_iterations"] += ran
        lw, li = stats["level_warps"], stats["level_inner_iterations"]
        lw[level] = lw.get(level, 0) + self.warps
        li[level] = li.get(level, 0) + ran
        return u

    def reset_stats(self) -> None:
        """Zero ``stats``: counters of the work done, updated on the host at the sync points.

        ``inner_iterations`` / ``warps``: inner iterations run per warp (for a whole batch: the
        work a GPU does), ``level_*``: the same per pyramid level (0 = full resolution);
        ``outer_iterations``; ``syncs``: host syncs (``active.any()``); ``pairs``, ``batches``.
        """
        self.stats = {
            "pairs": 0,
            "batches": 0,
            "warps": 0,
            "outer_iterations": 0,
            "inner_iterations": 0,
            "syncs": 0,
            "level_warps": {},
            "level_inner_iterations": {},
        }


def _own_flows(batch: np.ndarray) -> Iterator[np.ndarray]:
    """The flows of a batch, each a copy: a view would keep the whole batch alive while the
    caller still holds its last flow and the next batch is computed (two batches at once)."""
    for k in range(len(batch)):
        yield batch[k].copy()


def _step_constants(g, grad, rho_c, l_t: float):
    """What the inner iterations of one warp share: (rho_c, g, lambda theta grad, its negative,
    grad > FLT_EPSILON, grad or 1 where not, lambda theta g, its negative)."""
    big = grad > _FLT_EPS
    safe = torch.where(big, grad, torch.ones_like(grad)).unsqueeze(1)
    lg = (l_t * grad).unsqueeze(1)
    return rho_c, g, lg, -lg, big.unsqueeze(1), safe, l_t * g, -l_t * g


def _inner_step(u, p, c, active, theta: float, taut: float, eps: float):
    """One inner iteration for the pairs in ``active``; returns (u, p, still active). ``c``:
    ``_step_constants``."""
    rho_c, g, lg, neg_lg, big, safe, ltg, neg_ltg = c
    n = u.shape[0]
    # thresholding step: v = u + d
    rho = (rho_c + g[:, 0] * u[:, 0] + g[:, 1] * u[:, 1]).unsqueeze(1)
    d = torch.where(
        rho < neg_lg,
        ltg,
        torch.where(rho > lg, neg_ltg, torch.where(big, -rho / safe * g, 0.0)),
    )
    v = u + d
    # primal update; a frozen pair keeps its u (and p below): its derivatives are never used,
    # so they are taken of the selected u, which spares a plane of memory traffic
    a4 = active.view(n, 1, 1, 1)
    div = _divergence(p[:, :, 0], p[:, :, 1])  # (N, 2, H, W)
    u_new = torch.where(a4, v + theta * div, u)
    err = ((u_new - u) ** 2).sum(dim=(1, 2, 3))
    # dual update, one component at a time (no stacked gradient to store and read back)
    ux, uy = _forward_gradient(u_new)
    norm = 1.0 + taut * torch.sqrt(ux * ux + uy * uy)
    p1, p2 = p[:, :, 0], p[:, :, 1]
    p1 = torch.where(a4, (p1 + taut * ux) / norm, p1)
    p2 = torch.where(a4, (p2 + taut * uy) / norm, p2)
    p = torch.stack((p1, p2), dim=2)
    return u_new, p, active & (err > eps)


def _fused_step(u, p, g, grad, rho_c, active, l_t: float, theta: float, taut: float, eps: float):
    """``_inner_step`` with the warp's constants recomputed in it: what ``torch.compile`` fuses
    (a fused kernel reading g, grad and rho_c, 4 floats a pixel, instead of 8 planes)."""
    return _inner_step(u, p, _step_constants(g, grad, rho_c, l_t), active, theta, taut, eps)


class CompileSetupError(RuntimeError):
    """``torch.compile`` itself refused (a mode this torch does not know, say)."""


def is_compile_failure(err: BaseException) -> bool:
    """Whether ``err`` is torch.compile failing (Dynamo or Inductor, or ``torch.compile``
    itself), and not a device running out of memory, anywhere in its chain of causes."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    if any(isinstance(e, torch.OutOfMemoryError) for e in chain):
        return False
    from torch._dynamo.exc import TorchDynamoException  # Inductor's errors derive from it

    return any(isinstance(e, (TorchDynamoException, CompileSetupError)) for e in chain)


def _compiled(mode: str | None):
    """``_fused_step`` compiled (one per mode; Dynamo's cache lives on the code object anyway).

    Shapes change with the pyramid level, the frame size and the batch size; compiled for each
    (static shapes) that is 5 graphs per frame size and batch size, soon past Dynamo's limit of
    8 a code object, after which it silently runs eager. So dynamic=True (H and W symbolic) and
    the batch size unbacked (``_mark_unbacked`` before the first call of a warp: no 0/1
    specialisation, a single pair runs the same graph): one graph for every size (two on the
    CPU, where Inductor's C++ reductions guard on 2 H W <= 4096)."""
    if mode not in _COMPILED:
        try:
            _COMPILED[mode] = torch.compile(_fused_step, fullgraph=True, dynamic=True, mode=mode)
        except Exception as err:
            raise CompileSetupError(f"torch.compile(mode={mode!r}): {err}") from err
    return _COMPILED[mode]


def _mark_unbacked(t: torch.Tensor, dim: int) -> None:
    from torch._dynamo.decorators import mark_unbacked

    mark_unbacked(t, dim)


_COMPILED: dict = {}
logger = logging.getLogger(__name__)
_FLT_EPS = float(np.finfo(np.float32).eps)
