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
    # Training from scratch (no ImageNet weights): zero the last BN scale of every residual unit
    # (Goyal et al. 2017; torchvision's zero_init_residual), so each unit starts as the identity.
    # Without it, small-batch SGD from scratch overshoots: the un-normalised 512-d features make
    # the classifiers' first steps huge. ImageNet or stream checkpoints overwrite it.
    zero_init_residual: bool = False

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


STAGES = ("fused", "appearance", "motion")
TEST_MODES = ("full", "10crop")
CROPS = ("auto", "jitter", "multiscale")
DECODES = ("cpu", "device")  # where training clips' JPEGs are decoded (stm.data.device_clips)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the paper's values for real data (Sect. 4.1-4.2);
    ``embedded_default()`` gives the small synthetic run of ``python jobs/train.py``."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # data
    data: str = ""  # a preprocessed dataset (local path or s3:// / gs:// URI); "" = synthetic
    split: int = 1  # the official split to train and test on (1-based)
    stage: str = "fused"  # appearance | motion (each stream alone) | fused (Sect. 4.1)
    num_chunks: int = 5  # chunks per video in training ("5 inputs from a video", up to 11)
    stride_min: int = 5  # random temporal stride in [stride_min, stride_max] (Sect. 4.1)
    stride_max: int = 35
    crop_size: int = 224
    crop: str = "auto"  # auto = multiscale corner crops for motion, +-25% jitter otherwise
    test_frames: int = 25  # Sect. 4.2: 25 uniformly spaced frames and their flips
    test_mode: str = "full"  # full frame, fully convolutional | 10crop (MMAction2's protocol)
    eval_every: int = 1  # evaluate on the test split every k epochs (and after the last)
    # cpu: Ray Data workers decode and augment clips; device: they only sample them and ship
    # the JPEGs, which the training loop decodes on its device (nvJPEG on a GPU)
    decode: str = "cpu"
    # the step's numerics and layout; None = on where it pays, on CUDA (bf16 autocast works on
    # the CPU too, for tests; channels_last is slower there)
    bf16: bool | None = None  # bf16 autocast of forward passes (losses and updates in fp32)
    channels_last: bool | None = None  # NHWC convolutions (stm.model.to_channels_last)
    # optimisation
    epochs: int = 35
    lr: float = 0.0  # 0 = the stage's default: 1e-2 for a stream alone, 1e-3 fused
    lr_milestones: tuple[int, ...] = (20, 30)  # /10 after 20 epochs and 10 more (Sect. 4.1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128  # videos per update, across all workers
    bn_batch: int = 4  # videos per forward/backward on one worker (BN batch; original: 4 x 5)
    frozen_bn: bool = False  # keep BatchNorm on its running statistics (partial BN)
    seed: int = 0
    # initialisation of the fused stage (Sect. 4.1: "the fused model starts from both")
    appearance_init: str = ""  # checkpoint path or MLflow run id of an appearance-stage run
    motion_init: str = ""  # the same for the motion stage
    imagenet_dir: str = ""  # where torchvision's ImageNet .pth files are ("" = torch's cache)
    # Ray
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # the best k by fused test accuracy
    storage_path: str = "runs"  # local path or s3:// / gs:// URI shared by all nodes
    name: str = ""  # run name ("" = stage, variant and time); reuse only to resume
    # MLflow
    mlflow_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "stm"

    def __post_init__(self) -> None:
        check_choice("stage", self.stage, STAGES)
        check_choice("test_mode", self.test_mode, TEST_MODES)
        check_choice("crop", self.crop, CROPS)
        check_choice("decode", self.decode, DECODES)
        positive = (
            "epochs",
            "batch_size",
            "bn_batch",
            "num_chunks",
            "crop_size",
            "test_frames",
            "eval_every",
        )
        for name in (*positive, "split", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name} {getattr(self, name)}: need at least 1")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError(
                f"invalid --gpus-per-worker {self.gpus_per_worker} / --cpus-per-worker "
                f"{self.cpus_per_worker}: need gpus >= 0 and cpus > 0"
            )
        g = self.gpus_per_worker
        if self.num_workers > 1 and 0 < g < 1:
            raise ValueError(
                f"--gpus-per-worker {g:g} with {self.num_workers} workers would put several "
                "ranks on one GPU, which NCCL rejects: use whole GPUs per worker"
            )
        if g > 1 and g != int(g):
            raise ValueError(f"invalid --gpus-per-worker {g:g}: above 1, a whole number")
        if not 1 <= self.stride_min <= self.stride_max:
            raise ValueError(f"invalid stride range [{self.stride_min}, {self.stride_max}]")
        if self.num_chunks > 11:
            raise ValueError(f"invalid num_chunks {self.num_chunks}: the paper uses up to 11")
        per_worker, rest = divmod(self.batch_size, self.num_workers)
        if rest or per_worker % self.bn_batch:
            raise ValueError(
                f"--bn-batch {self.bn_batch} must divide the per-worker share of --batch-size "
                f"{self.batch_size} over {self.num_workers} workers"
            )

    @property
    def accum_steps(self) -> int:
        """Micro-batches per update on each worker."""
        return self.batch_size // self.num_workers // self.bn_batch

    def use_bf16(self, device_type: str) -> bool:
        return device_type == "cuda" if self.bf16 is None else self.bf16

    def use_channels_last(self, device_type: str) -> bool:
        return device_type == "cuda" if self.channels_last is None else self.channels_last

    @property
    def base_lr(self) -> float:
        return self.lr or (1e-3 if self.stage == "fused" else 1e-2)

    @property
    def crop_mode(self) -> str:
        if self.crop != "auto":
            return self.crop
        return "multiscale" if self.stage == "motion" else "jitter"


def embedded_default(**overrides: Any) -> TrainConfig:
    """The run of ``python jobs/train.py`` with no arguments: the synthetic dataset, small
    streams on small frames, 2 CPU workers, a few minutes on a laptop."""
    model = ModelConfig(
        num_classes=6,
        appearance_arch="resnet18",
        motion_arch="resnet18",
        motion_dropout=0.0,  # 96 training videos underfit in 16 epochs; nothing to regularise
        zero_init_residual=True,  # from scratch: see ModelConfig
    )
    cfg = TrainConfig(
        model=model,
        num_chunks=3,
        stride_min=2,
        stride_max=6,
        crop_size=48,  # of 96x72 frames; the test runs on the whole frame
        test_frames=9,
        eval_every=4,
        epochs=16,
        lr=0.002,  # from scratch, 8 videos per update: 5x below the paper's stream lr of 1e-2
        lr_milestones=(13,),
        batch_size=8,
        bn_batch=4,
        num_workers=2,
        cpus_per_worker=0.5,
        keep_checkpoints=1,
    )
    return replace(cfg, **overrides)


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that also accepts nested ``model=dict(...)`` changes."""
    model = changes.pop("model", None)
    if isinstance(model, dict):
        changes["model"] = dataclasses.replace(cfg.model, **model)  # type: ignore[attr-defined]
    elif model is not None:
        changes["model"] = model
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
