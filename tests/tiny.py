"""The one tiny model every CPU test builds: two ResNet-18 streams, 2-frame flow stacks, a few
classes (STYLE.md: tests are tiny and check real properties). Tests derive variants from it with
``dataclasses.replace``."""

from __future__ import annotations

from stm.config import ModelConfig

K = 5  # classes
L = 2  # flow stack length: 2L = 4 flow channels

TINY = ModelConfig(
    num_classes=K,
    appearance_arch="resnet18",
    motion_arch="resnet18",
    flow_length=L,
    fusion="none",
    temporal="none",
    time_pool="avg",
    motion_dropout=0.0,
)
