"""One ResNet stream (torchvision's, unchanged parameter names) and the residual-unit forward
with the hooks the two-stream model needs: a different input for the residual branch and the
shortcut (cross-stream gates, eq. 2 and 5), a temporal filter after the unit's 3x3 conv
(Fig. 4b) and one in the shortcut path (Fig. 4a), and the pre-activation sum x_l (eq. 1).

The stream *is* a ``torchvision.models.ResNet``: an ImageNet state_dict loads into it with only
the classifier left out. Everything injected lives in the two-stream model, not here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

# Plain dict of constructors (timm style: the name resolves here, nowhere else).
RESNETS: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
    "resnet152": models.resnet152,
}

Unit = BasicBlock | Bottleneck
STAGES = ("layer1", "layer2", "layer3", "layer4")  # conv2_x .. conv5_x of Table 1


def build_stream(
    arch: str, in_channels: int, num_classes: int, zero_init_residual: bool = False
) -> models.ResNet:
    """A torchvision ResNet with ``in_channels`` inputs (3 for RGB, 2L for a flow stack).

    Args:
        arch: one of ``RESNETS``.
        in_channels: input channels of conv1.
        num_classes: outputs of the classifier ``fc``.
        zero_init_residual: zero the last BN scale of each unit (for training from scratch).
    """
    net = RESNETS[arch](
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
    )
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


def unit_mid_channels(unit: Unit) -> int:
    """Channels after the unit's 3x3 conv, where a residual temporal filter goes (Fig. 4b)."""
    return unit.conv2.out_channels if isinstance(unit, Bottleneck) else unit.conv1.out_channels


def unit_out_channels(unit: Unit) -> int:
    """Channels of the unit's output (and of its shortcut): 64..512 times the expansion."""
    return unit.conv3.out_channels if isinstance(unit, Bottleneck) else unit.conv2.out_channels


def stem(net: models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """conv1 + BN + ReLU + max pool (Table 1, conv1 and pool1)."""
    return net.maxpool(net.relu(net.bn1(net.conv1(x))))


def unit_forward(
    unit: Unit,
    branch_in: torch.Tensor,
    shortcut_in: torch.Tensor,
    mid_filter: nn.Module | None = None,
    shortcut_filter: nn.Module | None = None,
    num_chunks: int = 1,
) -> torch.Tensor:
    """One residual unit, returning its pre-activation sum ``shortcut + F(branch)`` (eq. 1
    without the final ``f``); the caller applies the ReLU.

    A plain unit has ``branch_in is shortcut_in``. A cross-stream gate changes one of them:
    residual fusion feeds the gated signal to the branch, direct fusion to the shortcut.

    Args:
        unit: a torchvision BasicBlock or Bottleneck (its parameters are used as they are).
        branch_in: input of the residual branch F.
        shortcut_in: input of the shortcut (identity or the unit's projection).
        mid_filter: optional temporal filter after the 3x3 conv's BN and ReLU (Fig. 4b, ‡ and §).
        shortcut_filter: optional temporal filter in the shortcut path (Fig. 4a, †).
        num_chunks: T, the chunks per video, consecutive along the batch dimension.
    """
    if isinstance(unit, Bottleneck):
        out = unit.relu(unit.bn1(unit.conv1(branch_in)))
        out = unit.relu(unit.bn2(unit.conv2(out)))  # the 3x3 conv
        if mid_filter is not None:
            out = mid_filter(out, num_chunks)
        out = unit.bn3(unit.conv3(out))
    else:
        out = unit.relu(unit.bn1(unit.conv1(branch_in)))  # the (first) 3x3 conv
        if mid_filter is not None:
            out = mid_filter(out, num_chunks)
        out = unit.bn2(unit.conv2(out))
    shortcut = shortcut_in if unit.downsample is None else unit.downsample(shortcut_in)
    if shortcut_filter is not None:
        shortcut = shortcut_filter(shortcut, num_chunks)
    return out + shortcut


def relu(x: torch.Tensor) -> torch.Tensor:
    """The ReLU ``f`` of eq. 1 (not in place: the pre-activation sum may still be needed)."""
    return F.relu(x)
