"""The Spatiotemporal Multiplier Network: two ResNet streams, cross-stream gates, temporal
filters and temporal pooling (Feichtenhofer, Pinz, Wildes, CVPR 2017).

Where things go (Table 1): in every stage conv2_x..conv5_x the *second* residual unit is the
one the gate ⊙ feeds, and the one whose 3x3 conv is followed by a temporal filter (‡ every
stage, § only conv5_x); † puts a temporal filter in the shortcut path of the stage's last unit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchvision.models import ResNet

from stm.config import ModelConfig
from stm.model.fusion import CrossStreamFusion, TemporalFilter
from stm.model.resnet import (
    STAGES,
    build_stream,
    relu,
    stem,
    unit_forward,
    unit_mid_channels,
    unit_out_channels,
)

GATED_UNIT = 1  # the second residual unit of each stage (Table 1, ⊙)
STREAMS = ("appearance", "motion")


class StreamScores(NamedTuple):
    """Class scores (logits) of each stream's own classifier, ``(B, num_classes)``."""

    appearance: torch.Tensor | None
    motion: torch.Tensor | None


def fuse_scores(
    scores: StreamScores, motion_weight: float = 1.0, how: str = "logits"
) -> torch.Tensor:
    """The paper's prediction from both streams, as class probabilities ``(B, num_classes)``:
    ``logits`` averages the classification layers' outputs ("by averaging the prediction layer
    outputs", Sect. 5.3; the original code), then takes the softmax; ``softmax`` averages the
    streams' probabilities. On HMDB51 the paper weights the motion scores by 3."""
    a, m = scores.appearance.float(), scores.motion.float()
    if how == "logits":
        return ((a + motion_weight * m) / (1.0 + motion_weight)).softmax(-1)
    return (a.softmax(-1) + motion_weight * m.softmax(-1)) / (1.0 + motion_weight)


def temporal_placements(temporal: str, stage_lengths: list[int]) -> list[tuple[str, int, str]]:
    """(stage, unit index, "mid" | "skip") of each temporal filter of one stream (Table 1)."""
    if temporal == "none":
        return []
    if temporal == "residual_all":  # ‡: after the 3x3 conv of the gated unit, every stage
        return [(s, GATED_UNIT, "mid") for s in STAGES]
    if temporal == "residual_last":  # §: the same, conv5_x only
        return [(STAGES[-1], GATED_UNIT, "mid")]
    if temporal == "skip_all":  # †: shortcut path of each stage's last unit
        return [(s, n - 1, "skip") for s, n in zip(STAGES, stage_lengths)]
    raise ValueError(f"invalid temporal {temporal!r}")


class TwoStreamNet(nn.Module):
    """Appearance (RGB) and motion (flow stack) ResNets processed stage by stage in lockstep.

    ``forward(rgb, flow)`` takes ``rgb (B, T, 3, H, W)`` and ``flow (B, T, 2L, H, W)``: T chunks
    per video, each an RGB frame and the flow stack around it. Chunks run through the 2D
    backbones as a batch of B*T images; temporal filters mix the T chunks of a video; after the
    last stage features are pooled over time (max or average, per location, eq. 10), then
    averaged over space, so any input size works (fully convolutional testing, Sect. 4.2).

    Without a cross-stream connection either input may be ``None`` to run one stream alone
    (the separate stream-training stages of Sect. 4.1).

    Args:
        appearance: the RGB stream (a torchvision ResNet; its ``fc`` is the classifier).
        motion: the flow stream, with 2L input channels.
        fusion: ``none`` or a ``CrossStreamFusion`` kind.
        direction: ``m2a``, ``a2m`` or ``bi``: which stream receives the gate.
        temporal: ``none``, ``residual_all``, ``residual_last`` or ``skip_all``.
        temporal_init: ``center`` or ``avg``.
        time_pool: ``max`` or ``avg``.
        appearance_dropout: dropout before the appearance classifier.
        motion_dropout: dropout before the motion classifier.
    """

    def __init__(
        self,
        appearance: ResNet,
        motion: ResNet,
        *,
        fusion: str = "residual_mul",
        direction: str = "m2a",
        temporal: str = "residual_all",
        temporal_init: str = "center",
        time_pool: str = "max",
        appearance_dropout: float = 0.0,
        motion_dropout: float = 0.8,
    ) -> None:
        super().__init__()
        self.appearance = appearance
        self.motion = motion
        self.fusion = None if fusion == "none" else CrossStreamFusion(fusion)
        self.into = {
            "appearance": self.fusion is not None and direction in ("m2a", "bi"),
            "motion": self.fusion is not None and direction in ("a2m", "bi"),
        }
        self.time_pool = time_pool
        self.dropout = nn.ModuleDict(
            {"appearance": nn.Dropout(appearance_dropout), "motion": nn.Dropout(motion_dropout)}
        )
        # Injected layers live here, keyed "<stage>_<unit>_<mid|skip>", so the streams keep
        # torchvision's parameter names.
        self.temporal = nn.ModuleDict()
        for name in STREAMS:
            net = self.stream(name)
            lengths = [len(getattr(net, s)) for s in STAGES]
            filters = nn.ModuleDict()
            for stage, i, where in temporal_placements(temporal, lengths):
                unit = getattr(net, stage)[i]
                c = unit_mid_channels(unit) if where == "mid" else unit_out_channels(unit)
                filters[f"{stage}_{i}_{where}"] = TemporalFilter(c, temporal_init)
            self.temporal[name] = filters

    def stream(self, name: str) -> ResNet:
        return self.appearance if name == "appearance" else self.motion

    def _unit(
        self,
        name: str,
        stage: str,
        i: int,
        branch_in: torch.Tensor,
        shortcut_in: torch.Tensor,
        t: int,
    ) -> torch.Tensor:
        filters = dict(self.temporal[name].items())
        return unit_forward(
            getattr(self.stream(name), stage)[i],
            branch_in,
            shortcut_in,
            mid_filter=filters.get(f"{stage}_{i}_mid"),
            shortcut_filter=filters.get(f"{stage}_{i}_skip"),
            num_chunks=t,
        )

    def forward(
        self, rgb: torch.Tensor | None, flow: torch.Tensor | None, window: int | None = None
    ) -> StreamScores:
        """Class scores of each stream. ``window``: pool over time with this window, stride 1,
        and average the windows (the original's test, with the training chunk count); None or
        a window of at least T chunks: one pooling over all chunks (eq. 10)."""
        features, b, t = self.features(rgb, flow)
        return self.scores(features, b, t, window)

    def features(
        self, rgb: torch.Tensor | None, flow: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], int, int]:
        """Each stream's last feature maps ``(B*T, C, h, w)``, with B and T."""
        inputs = {"appearance": rgb, "motion": flow}
        active = [n for n in STREAMS if inputs[n] is not None]
        if not active:
            raise ValueError("need at least one of rgb and flow")
        if self.fusion is not None and len(active) < 2:
            raise ValueError("a model with cross-stream connections needs both rgb and flow")
        b, t = inputs[active[0]].shape[:2]
        x = {n: stem(self.stream(n), inputs[n].flatten(0, 1)) for n in active}  # (B*T, C, H, W)

        for stage in STAGES:
            # Unit 0 of both streams; keep its pre-activation sums x_l for the gate.
            pre = {n: self._unit(n, stage, 0, x[n], x[n], t) for n in active}
            # Unit 1, where the other stream's signal enters (eq. 2 / eq. 5).
            other = {"appearance": "motion", "motion": "appearance"}
            for n in active:
                if self.into[n]:
                    branch_in, shortcut_in = self.fusion(pre[n], pre[other[n]])
                else:
                    branch_in = shortcut_in = relu(pre[n])
                x[n] = relu(self._unit(n, stage, GATED_UNIT, branch_in, shortcut_in, t))
            # The remaining units: each stream on its own (the depths may differ).
            for n in active:
                for i in range(GATED_UNIT + 1, len(getattr(self.stream(n), stage))):
                    x[n] = relu(self._unit(n, stage, i, x[n], x[n], t))
        return x, b, t

    def scores(
        self, features: dict[str, torch.Tensor], b: int, t: int, window: int | None = None
    ) -> StreamScores:
        """The classifiers on pooled ``features`` (see ``forward``)."""
        out = {n: self._head(n, x, b, t, window) for n, x in features.items()}
        return StreamScores(out.get("appearance"), out.get("motion"))

    def _head(self, name: str, x: torch.Tensor, b: int, t: int, window: int | None) -> torch.Tensor:
        x = x.reshape(b, t, *x.shape[1:])  # (B, T, C, h, w)
        if window is not None and window < t:
            x = x.unfold(1, window, 1)  # (B, T - window + 1, C, h, w, window)
            x = x.amax(-1) if self.time_pool == "max" else x.mean(-1)
            x = x.mean(1)  # the windows' average: the classifier is linear, so = mean of logits
        else:
            x = x.amax(1) if self.time_pool == "max" else x.mean(1)  # eq. 10, per location
        x = x.mean((-2, -1))  # global spatial average (pool5), (B, C): = mean over locations
        return self.stream(name).fc(self.dropout[name](x))

    @torch.no_grad()
    def predict(
        self, rgb: torch.Tensor, flow: torch.Tensor, motion_weight: float = 1.0
    ) -> torch.Tensor:
        """Fused class probabilities ``(B, num_classes)``, as the paper predicts (logits
        averaged over the streams)."""
        return fuse_scores(self(rgb, flow), motion_weight)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put ``model``'s convolution weights in the channels-last layouts, in place: 4-D weights
    (the 2-D ResNet convolutions) in ``channels_last``, 5-D ones (the temporal filters' Conv3d)
    in ``channels_last_3d``. Outputs are unchanged; convolutions then run NHWC, the layout
    tensor cores want under bf16.

    ``model.to(memory_format=torch.channels_last)`` cannot do this: it converts every 4-D *and*
    5-D parameter to the 4-D layout, and raises on the temporal filters' 5-D weights. Activations
    follow the weights: a convolution with a channels-last weight returns a channels-last output,
    and the temporal filter's (B*T, C, H, W) -> (B, C, T, H, W) view of an NHWC tensor is NDHWC.
    """
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    for module in model.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            fmt = formats.get(tensor.dim())
            if fmt is not None:
                tensor.data = tensor.data.contiguous(memory_format=fmt)
    return model


def build_model(cfg: ModelConfig) -> TwoStreamNet:
    """The only reader of ``ModelConfig``: builds both streams and connects them."""
    zero = cfg.zero_init_residual
    appearance = build_stream(cfg.appearance_arch, 3, cfg.num_classes, zero)
    motion = build_stream(cfg.motion_arch, 2 * cfg.flow_length, cfg.num_classes, zero)
    if cfg.fusion != "none":
        for stage in STAGES:
            ca = unit_out_channels(getattr(appearance, stage)[0])
            cm = unit_out_channels(getattr(motion, stage)[0])
            if ca != cm:
                raise ValueError(
                    f"fusion {cfg.fusion} needs equal widths in both streams, but "
                    f"{cfg.appearance_arch} has {ca} and {cfg.motion_arch} {cm} channels in "
                    f"{stage}: pair resnet18/34 with each other, resnet50/101/152 likewise"
                )
    return TwoStreamNet(
        appearance,
        motion,
        fusion=cfg.fusion,
        direction=cfg.direction,
        temporal=cfg.temporal,
        temporal_init=cfg.temporal_init,
        time_pool=cfg.time_pool,
        appearance_dropout=cfg.appearance_dropout,
        motion_dropout=cfg.motion_dropout,
    )
