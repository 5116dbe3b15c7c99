"""ImageNet initialisation of both streams from local files (nothing is ever downloaded).

Weights are torchvision's own ``.pth`` files, found in a directory the user names or in
torchvision's cache (``$TORCH_HOME/hub/checkpoints``, usually ``~/.cache/torch/hub/checkpoints``).
The motion stream's conv1 is the ImageNet conv1 averaged over the RGB channels and replicated
2L times (Sect. 3.1; the cross-modality initialisation of the two-stream literature).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torchvision import models
from torchvision.models import ResNet

from stm.model.two_stream import TwoStreamNet

log = logging.getLogger(__name__)

# torchvision's ImageNet weight files per architecture, the original (V1) recipe first.
WEIGHTS = {
    "resnet18": [models.ResNet18_Weights.IMAGENET1K_V1],
    "resnet34": [models.ResNet34_Weights.IMAGENET1K_V1],
    "resnet50": [models.ResNet50_Weights.IMAGENET1K_V1, models.ResNet50_Weights.IMAGENET1K_V2],
    "resnet101": [models.ResNet101_Weights.IMAGENET1K_V1, models.ResNet101_Weights.IMAGENET1K_V2],
    "resnet152": [models.ResNet152_Weights.IMAGENET1K_V1, models.ResNet152_Weights.IMAGENET1K_V2],
}


def weight_file_names(arch: str) -> list[str]:
    """torchvision's ImageNet weight file names for ``arch`` (e.g. resnet50-0676ba61.pth)."""
    return [w.url.rsplit("/", 1)[-1] for w in WEIGHTS[arch]]


def default_weight_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(arch: str, weights_dir: str | Path | None = None) -> Path:
    """The local ImageNet weight file of ``arch``; a one-line ``FileNotFoundError`` if none."""
    dirs = [Path(weights_dir)] if weights_dir else []
    dirs.append(default_weight_dir())
    names = weight_file_names(arch)
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(
        f"no ImageNet weights for {arch}: put torchvision's {names[0]} in "
        f"{dirs[0]} (or pass its folder as --imagenet-dir)"
    )


def stream_state_from_imagenet(state: dict[str, torch.Tensor], in_channels: int) -> dict:
    """An ImageNet ResNet state_dict adapted to a stream: the classifier dropped, conv1 averaged
    over RGB and replicated ``in_channels`` times when the input is not RGB."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if in_channels != 3:
        w = state["conv1.weight"]  # (64, 3, 7, 7)
        state["conv1.weight"] = w.mean(1, keepdim=True).repeat(1, in_channels, 1, 1)
    return state


def load_stream(net: ResNet, arch: str, weights_dir: str | Path | None = None) -> Path:
    """Load ImageNet weights into one stream (all but its classifier); returns the file used."""
    path = find_weights(arch, weights_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = stream_state_from_imagenet(state, net.conv1.in_channels)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise ValueError(f"{path} does not fit {arch}: missing {missing}, unexpected {unexpected}")
    log.info("loaded ImageNet weights for %s from %s", arch, path)
    return path


def load_imagenet(
    model: TwoStreamNet,
    appearance_arch: str,
    motion_arch: str,
    weights_dir: str | Path | None = None,
) -> None:
    """Initialise both streams from ImageNet (the injected layers keep their identity init)."""
    load_stream(model.appearance, appearance_arch, weights_dir)
    load_stream(model.motion, motion_arch, weights_dir)
