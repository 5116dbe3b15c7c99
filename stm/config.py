"""Typed, frozen configuration. Plain dicts (``asdict``) cross Ray boundaries; workers rebuild
the dataclass on their first line with ``from_dict``.

Only ``build_model`` reads a ``ModelConfig``; modules take explicit arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
FUSIONS = ("none", "direct_add", "direct_mul", "residual_add", "residual_mul")
DIRECTIONS = ("m2a", "a2m", "bi")
TEMPORALS = ("none", "residual_all", "residual_last", "skip_all")
TEMPORAL_INITS = ("center", "avg")
TIME_POOLS = ("max", "avg")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a one-line ``ValueError`` naming the valid values when ``value`` is not one."""
    if value not in choices:
        raise ValueError(f"invalid {name} {value!r}: choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    """The two-stream multiplier network. Defaults are the paper's final model (Sect. 4-5)."""

    num_classes: int = 101  # UCF101
    appearance_arch: str = "resnet50"  # Table 4: ResNet-50 appearance
    motion_arch: str = "resnet152"  # Table 4: ResNet-152 motion
    flow_length: int = 10  # L: (u, v) pairs per stack, 2L input channels (Sect. 3.1)
    fusion: str = "residual_mul"  # Table 2: multiplicative gate into the residual branch (eq. 5)
    direction: str = "m2a"  # Table 2: motion -> appearance
    temporal: str = "residual_all"  # Table 3 best: in the residual units of every stage
    temporal_init: str = "center"  # Table 3 best: [0, 1, 0]
    time_pool: str = "max"  # Table 3 best: global max pooling over time (eq. 10)
    appearance_dropout: float = 0.0  # the paper names dropout only for the motion classifier
    motion_dropout: float = 0.8  # Sect. 4.1: "dropout of 0.8 after the final classification layer"

    def __post_init__(self) -> None:
        check_choice("appearance_arch", self.appearance_arch, ARCHS)
        check_choice("motion_arch", self.motion_arch, ARCHS)
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("temporal", self.temporal, TEMPORALS)
        check_choice("temporal_init", self.temporal_init, TEMPORAL_INITS)
        check_choice("time_pool", self.time_pool, TIME_POOLS)
        if self.num_classes < 2:
            raise ValueError(f"invalid num_classes {self.num_classes}: need at least 2")
        if self.flow_length < 1:
            raise ValueError(f"invalid flow_length {self.flow_length}: need at least 1")
        for name in ("appearance_dropout", "motion_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"invalid {name} {p}: need 0 <= p < 1")

    @property
    def variant(self) -> str:
        """A short name of the ablation variant, for tags and reports."""
        fusion = self.fusion if self.fusion == "none" else f"{self.fusion}/{self.direction}"
        temporal = "none" if self.temporal == "none" else f"{self.temporal}/{self.temporal_init}"
        return f"fusion={fusion} temporal={temporal} pool={self.time_pool}"


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a (nested) config dataclass, safe to send through Ray or log to MLflow."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config dataclass from ``to_dict`` output; unknown keys are a one-line error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        sub = fields[name].type
        sub_cls = globals().get(sub) if isinstance(sub, str) else sub
        if dataclasses.is_dataclass(sub_cls) and isinstance(value, dict):
            value = from_dict(sub_cls, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
