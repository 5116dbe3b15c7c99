"""The Spatiotemporal Multiplier Network in plain PyTorch (no Ray here)."""

from stm.config import ModelConfig
from stm.model.imagenet import load_imagenet
from stm.model.two_stream import (
    StreamScores,
    TwoStreamNet,
    build_model,
    fuse_scores,
    to_channels_last,
)

__all__ = [
    "ModelConfig",
    "StreamScores",
    "TwoStreamNet",
    "build_model",
    "fuse_scores",
    "load_imagenet",
    "to_channels_last",
]
