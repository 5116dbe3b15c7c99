"""The cross-stream connections (Sect. 3.2, Fig. 2) and the temporal filters (Sect. 3.3).

Both are small modules with explicit arguments; the two-stream model decides where they go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEMPORAL_FILTERS = {
    "center": (0.0, 1.0, 0.0),  # identity in time: the network's output is unchanged at init
    "avg": (1.0 / 3, 1.0 / 3, 1.0 / 3),
}


class CrossStreamFusion(nn.Module):
    """Injects one stream's signal into the other's residual unit (Fig. 2 a-d).

    With ``x`` the receiving stream's pre-activation sum of the previous unit and ``y`` the
    sending stream's one, the receiving unit computes

    - residual (Fig. 2c/d): ``f(x) + F(x ⊙ f(y))`` (eq. 5) or ``f(x) + F(x + f(y))`` (eq. 2):
      the residual branch is gated, the identity shortcut stays ``f(x)``;
    - direct (Fig. 2a/b): ``(f(x) ⊙ f(y)) + F(f(x))`` or with ``+``: the shortcut path itself
      carries the fused signal, which breaks the identity mapping (Sect. 5.1).

    The original code multiplies exactly the appearance pre-ReLU sum by the motion post-ReLU
    output, so gradients reach both streams (eq. 6-7).

    Args:
        kind: ``direct_add`` | ``direct_mul`` | ``residual_add`` | ``residual_mul``.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.into, op = kind.split("_")  # "direct" | "residual", "add" | "mul"
        self.multiplicative = op == "mul"

    def combine(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x * gate if self.multiplicative else x + gate

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(branch_in, shortcut_in)`` for the receiving unit."""
        fx, fy = F.relu(x), F.relu(y)
        if self.into == "residual":
            return self.combine(x, fy), fx
        return fx, self.combine(fx, fy)

    def extra_repr(self) -> str:
        return f"into={self.into}, multiplicative={self.multiplicative}"


class TemporalFilter(nn.Module):
    """A 1x1x3 convolution over time across all channels (eq. 8), initialised as
    ``W = 1 ⊗ f``: the identity between channels times the temporal filter ``f`` (eq. 9),
    bias 0, no BatchNorm after it. Zero padding keeps the number of chunks.

    Input and output are per-chunk feature maps ``(B*T, C, H, W)`` with the T chunks of a video
    consecutive; ``num_chunks`` (T) comes with each call.

    Args:
        channels: C, the feature channels at the injection point.
        init: ``center`` ([0, 1, 0]) or ``avg`` ([1/3, 1/3, 1/3]).
    """

    def __init__(self, channels: int, init: str = "center") -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        f = torch.tensor(TEMPORAL_FILTERS[self.init])
        eye = torch.eye(self.conv.out_channels)
        with torch.no_grad():
            # weight (C_out, C_in, 3, 1, 1) = eye (C_out, C_in) ⊗ f (3)
            self.conv.weight.copy_(torch.einsum("oi,t->oit", eye, f)[..., None, None])
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor, num_chunks: int) -> torch.Tensor:
        bt, c, h, w = x.shape
        t = num_chunks
        x = x.reshape(bt // t, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)
        x = self.conv(x)
        return x.transpose(1, 2).reshape(bt, c, h, w)  # (B*T, C, H, W)

    def extra_repr(self) -> str:
        return f"init={self.init}"
