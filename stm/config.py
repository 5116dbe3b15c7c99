"""Typed, frozen configuration of every job, each validated where it is built.

Plain dicts (``asdict``) cross Ray boundaries; workers rebuild the dataclass on their first line
with ``from_dict``. Only ``build_model`` reads a ``ModelConfig``; modules take explicit arguments.

Each field's comment is its documentation: ``stm.cli`` turns it into the flag's help text, so a
comment says what the value means, its unit, and the paper's section where there is one. A field
typed ``Literal[...]`` has its choices next to it; every wrong value, a choice or a bound, is a
one-line ``UsageError`` raised in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar


class UsageError(ValueError):
    """A wrong command line or config value: one line, exit status 2 (never a traceback)."""


Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
Fusion = Literal["none", "direct_add", "direct_mul", "residual_add", "residual_mul"]
Direction = Literal["m2a", "a2m", "bi"]
Temporal = Literal["none", "residual_all", "residual_last", "skip_all"]
TemporalInit = Literal["center", "avg"]
TimePool = Literal["max", "avg"]
Stage = Literal["fused", "appearance", "motion"]
TestMode = Literal["full", "10crop"]
Crop = Literal["auto", "jitter", "multiscale"]
Decode = Literal["cpu", "device"]
Init = Literal["auto", "streams", "imagenet", "scratch"]
TestPool = Literal["window", "global"]
ScoreFusion = Literal["logits", "softmax"]
Source = Literal["ucf101", "hmdb51", "folder", "synthetic"]
Flow = Literal["tvl1", "tvl1-torch", "dis", "farneback"]  # stm.data.flow.FLOW_ESTIMATORS

ARCHS = typing.get_args(Arch)
FUSIONS = typing.get_args(Fusion)
DIRECTIONS = typing.get_args(Direction)
TEMPORALS = typing.get_args(Temporal)
TEMPORAL_INITS = typing.get_args(TemporalInit)
TIME_POOLS = typing.get_args(TimePool)
STAGES = typing.get_args(Stage)
TEST_MODES = typing.get_args(TestMode)
CROPS = typing.get_args(Crop)
DECODES = typing.get_args(Decode)
INITS = typing.get_args(Init)
TEST_POOLS = typing.get_args(TestPool)
SCORE_FUSIONS = typing.get_args(ScoreFusion)
SOURCES = typing.get_args(Source)
FLOWS = typing.get_args(Flow)

# The synthetic dataset of the embedded default (stm.data.synthetic renders it).
SYNTHETIC_NUM_VIDEOS = 120  # 20 per class: 16 train + 4 test
SYNTHETIC_WIDTH = 96
SYNTHETIC_HEIGHT = 72
SYNTHETIC_NUM_FRAMES = 32
DEFAULT_SHORT_SIDE = 256  # the paper's frame size for flow and for the stored frames
JPEG_QUALITY = 95  # RGB frames and flow u/v images of new datasets (the original's flow: 95)
JPEG_QUALITY_BEFORE = 90  # what datasets written before it recorded its quality used

MAX_FRAME_SIDE = 4096  # frame, crop and synthetic sizes above this do not fit a GPU batch
MAX_CHUNKS = 11  # chunks per training video: "5 inputs from a video", up to 11 (Sect. 4.1)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]{0,127}$")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a one-line ``UsageError`` naming the valid values when ``value`` is not one."""
    if value not in choices:
        raise UsageError(f"invalid {name} {value!r}: choose one of {', '.join(choices)}")


def check_name(what: str, value: str, *, empty: bool = False) -> None:
    """A name that becomes a folder (a run, a sweep, an experiment): letters, digits and
    ``_ . = , + -``, not starting with a dot, so it cannot leave its parent folder."""
    if value == "" and empty:
        return
    if not _NAME.match(value):
        raise UsageError(
            f"invalid {what} {value!r}: use 1-128 letters, digits and _ . = , + - "
            "(not starting with . or -)"
        )


def check_device(device: str) -> None:
    """ "" (CUDA when there is one), cpu, cuda or cuda:N; anything else is a one-line error."""
    if device and not re.match(r"^(cpu|cuda(:\d+)?)$", device):
        raise UsageError(f"invalid --device {device!r}: cpu, cuda or cuda:N")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bounds(cfg: Any, **rules: tuple[float | None, float | None]) -> None:
    """``name=(lo, hi)``: each field within [lo, hi] (None: unbounded; a None value passes)."""
    for name, (lo, hi) in rules.items():
        v = getattr(cfg, name)
        if v is None:
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            want = (
                f"between {lo:g} and {hi:g}"
                if lo is not None and hi is not None
                else (f"at least {lo:g}" if lo is not None else f"at most {hi:g}")
            )
            raise UsageError(f"invalid {_flag(name)} {v:g}: need {want}")


def _check_literals(cfg: Any) -> None:
    """Every ``Literal`` field of ``cfg`` holds one of its choices."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(hint) is Literal:
            check_choice(name, getattr(cfg, name), typing.get_args(hint))


@dataclass(frozen=True)
class ModelConfig:
    """The two-stream multiplier network. Defaults are the paper's final model (Sect. 4-5)."""

    num_classes: int = 101  # classes of the dataset (UCF101: 101, HMDB51: 51)
    appearance_arch: Arch = "resnet50"  # Table 4: ResNet-50 appearance stream
    motion_arch: Arch = "resnet152"  # Table 4: ResNet-152 motion stream
    flow_length: int = 10  # L: (u, v) pairs per flow stack, 2L input channels (Sect. 3.1)
    fusion: Fusion = "residual_mul"  # Table 2: multiplicative gate into the residual branch (eq. 5)
    direction: Direction = "m2a"  # Table 2: motion -> appearance, the reverse, or both (Fig. 2e)
    temporal: Temporal = "residual_all"  # Table 3: temporal filters in every stage's gated unit
    temporal_init: TemporalInit = "center"  # Table 3 / eq. 9: [0, 1, 0] or [1/3, 1/3, 1/3]
    time_pool: TimePool = "max"  # Table 3 / eq. 10: global pooling over time after the last block
    appearance_dropout: float = 0.0  # dropout before the appearance classifier (the paper: none)
    motion_dropout: float = 0.8  # Sect. 4.1: "dropout of 0.8 after the final classification layer"
    # Training from scratch (no ImageNet weights): zero the last BN scale of every residual unit
    # (Goyal et al. 2017; torchvision's zero_init_residual), so each unit starts as the identity.
    # Without it, small-batch SGD from scratch overshoots: the un-normalised 512-d features make
    # the classifiers' first steps huge. ImageNet or stream checkpoints overwrite it.
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        _check_literals(self)
        _bounds(self, num_classes=(2, 100_000), flow_length=(1, 64))
        for name in ("appearance_dropout", "motion_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise UsageError(f"invalid {name} {p}: need 0 <= p < 1")

    @property
    def variant(self) -> str:
        """A short name of the ablation variant, for tags and reports."""
        fusion = self.fusion if self.fusion == "none" else f"{self.fusion}/{self.direction}"
        temporal = "none" if self.temporal == "none" else f"{self.temporal}/{self.temporal_init}"
        return f"fusion={fusion} temporal={temporal} pool={self.time_pool}"


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the paper's values for real data (Sect. 4.1-4.2);
    ``embedded_default()`` gives the small synthetic run of ``python jobs/train.py``."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # data
    data: str = ""  # a preprocessed dataset (local path or s3:// / gs:// URI); "" = synthetic
    split: int = 1  # the official split to train and test on (1-based)
    stage: Stage = "fused"  # appearance | motion (each stream alone) | fused (Sect. 4.1)
    num_chunks: int = 5  # chunks per training video ("5 inputs from a video", up to 11)
    stride_min: int = 5  # random temporal stride between chunks in [min, max] (Sect. 4.1)
    stride_max: int = 35  # the upper end of the random temporal stride
    crop_size: int = 224  # training crop, pixels square
    crop: Crop = "auto"  # auto = multiscale corner crops for motion, +-25% jitter otherwise
    test_frames: int = 25  # Sect. 4.2: 25 uniformly spaced frames and their flips
    test_mode: TestMode = "full"  # full frame, fully convolutional | 10crop (MMAction2's protocol)
    # window: max over each run of --num-chunks consecutive test chunks (stride 1), then the mean
    # over the runs (the original's test, STMulNet.m PoolTime); global: one max over all chunks
    test_pool: TestPool = "window"
    # logits: average the classification layers' outputs over views, windows and streams (Sect.
    # 4.2 and 5.3, the original); softmax: average the streams' probabilities
    score_fusion: ScoreFusion = "logits"
    # the motion stream's weight in the fused test score (the paper's late fusion on HMDB51: 3)
    motion_weight: float = 1.0
    eval_every: int = 1  # evaluate on the test split every k epochs (and after the last)
    # cpu: Ray Data workers decode and augment clips; device: they only sample them and ship
    # the JPEGs, which the training loop decodes on its device (nvJPEG on a GPU)
    decode: Decode = "cpu"
    # the step's numerics and layout; unset: on for CUDA, off on the CPU (where bf16 autocast
    # works, for tests, but is emulated, and channels_last is slower)
    bf16: bool | None = None  # bf16 autocast of the forward passes (fp32 updates); unset: CUDA
    channels_last: bool | None = None  # NHWC convolutions (model.to_channels_last); unset: CUDA
    # optimisation
    epochs: int = 35  # passes over the training videos
    lr: float = 0.0  # learning rate; 0 = the stage's default: 1e-2 for a stream alone, 1e-3 fused
    lr_milestones: tuple[int, ...] = (20, 30)  # lr /10 after these epochs (Sect. 4.1: 20, 10 more)
    momentum: float = 0.9  # SGD momentum (Sect. 4.1)
    weight_decay: float = 5e-4  # SGD weight decay (Sect. 4.1)
    decay_all: bool = False  # weight decay on BatchNorm parameters and biases too (original: none)
    batch_size: int = 128  # videos per update, across all workers (Sect. 4.1)
    bn_batch: int = 4  # videos per forward/backward on one worker (BN batch; original: 4 x 5)
    frozen_bn: bool = False  # keep BatchNorm on its running statistics (partial BN)
    seed: int = 0  # model initialisation and augmentation
    # initialisation (Sect. 4.1): auto = the fused stage from the two stream runs (both needed),
    # a stream stage from ImageNet; streams | imagenet | scratch choose explicitly
    init: Init = "auto"
    appearance_init: str = ""  # checkpoint path or MLflow run id of an appearance-stage run
    motion_init: str = ""  # checkpoint path or MLflow run id of a motion-stage run
    imagenet_dir: str = ""  # where torchvision's ImageNet .pth files are ("" = torch's cache)
    # Ray
    num_workers: int = 1  # Ray Train workers (one per GPU)
    gpus_per_worker: float = 0.0  # GPUs per worker; below 1 only with one worker
    cpus_per_worker: float = 1.0  # CPUs per worker
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # checkpoints kept: the best k by fused test accuracy
    # stored videos that fail their checksums or do not decode are skipped, named in a warning
    # and counted (metric bad_videos); more than this many in one epoch stops the run
    max_bad_videos: int = 10
    # runs and checkpoints: a local path or s3:// / gs:// URI; "" = <home>/runs (stm.home:
    # $STM_HOME, else ~/stm_results)
    storage_path: str = ""
    name: str = ""  # run name ("" = stage, variant and time); reuse only to resume
    # MLflow
    mlflow_uri: str = ""  # tracking URI; "" = $MLFLOW_TRACKING_URI, else <home>/mlflow.db
    experiment: str = "stm"  # the MLflow experiment
    # register the best checkpoint as a version of this model ("" = do not); the alias
    # best-<dataset>-split<k> follows the best score per dataset and split, best the latest's
    model_name: str = "stm"

    def __post_init__(self) -> None:
        _check_literals(self)
        _bounds(
            self,
            split=(1, 10),
            num_chunks=(1, MAX_CHUNKS),
            stride_min=(1, None),
            crop_size=(16, MAX_FRAME_SIDE),
            test_frames=(1, 250),
            motion_weight=(0.0, 100.0),
            eval_every=(1, None),
            epochs=(1, 100_000),
            lr=(0.0, 10.0),
            momentum=(0.0, 0.999),
            weight_decay=(0.0, 1.0),
            batch_size=(1, 1_000_000),
            bn_batch=(1, 4096),
            seed=(0, 2**32 - 1),
            num_workers=(1, 100_000),
            gpus_per_worker=(0.0, 64.0),
            cpus_per_worker=(0.01, 1024.0),
            max_failures=(-1, 1000),  # -1: restart forever
            keep_checkpoints=(1, 1000),
            max_bad_videos=(0, None),
        )
        if self.stride_min > self.stride_max:
            raise UsageError(f"invalid stride range [{self.stride_min}, {self.stride_max}]")
        if any(m < 1 for m in self.lr_milestones):
            raise UsageError(f"invalid --lr-milestones {self.lr_milestones}: epochs from 1")
        check_name("--name", self.name, empty=True)
        check_name("--experiment", self.experiment)
        check_name("--model-name", self.model_name, empty=True)
        g = self.gpus_per_worker
        if self.num_workers > 1 and 0 < g < 1:
            raise UsageError(
                f"--gpus-per-worker {g:g} with {self.num_workers} workers would put several "
                "ranks on one GPU, which NCCL rejects: use whole GPUs per worker"
            )
        if g > 1 and g != int(g):
            raise UsageError(f"invalid --gpus-per-worker {g:g}: above 1, a whole number")
        if (self.appearance_init or self.motion_init) and self.init in ("imagenet", "scratch"):
            raise UsageError(f"--init {self.init} and --appearance-init/--motion-init disagree")
        if self.data:  # real data: the paper's start, or an explicit choice (the preset has none)
            self.check_stream_inits()
        per_worker, rest = divmod(self.batch_size, self.num_workers)
        if rest or per_worker % self.bn_batch:
            raise UsageError(
                f"--bn-batch {self.bn_batch} must divide the per-worker share of --batch-size "
                f"{self.batch_size} over {self.num_workers} workers"
            )

    @property
    def accum_steps(self) -> int:
        """Micro-batches per update on each worker."""
        return self.batch_size // self.num_workers // self.bn_batch

    @property
    def base_lr(self) -> float:
        return self.lr or (1e-3 if self.stage == "fused" else 1e-2)

    @property
    def resolved_init(self) -> str:
        """streams | imagenet | scratch: what ``init="auto"`` means for this stage."""
        if self.init != "auto":
            return self.init
        if self.stage == "fused" or self.appearance_init or self.motion_init:
            return "streams"
        return "imagenet"

    @property
    def crop_mode(self) -> str:
        if self.crop != "auto":
            return self.crop
        return "multiscale" if self.stage == "motion" else "jitter"

    def check_stream_inits(self) -> None:
        """One-line ``UsageError`` when the run starts from stream runs it was not given (the
        fused stage needs both)."""
        if self.resolved_init != "streams":
            return
        needed = ("appearance", "motion") if self.stage == "fused" else (self.stage,)
        missing = [f"--{s}-init" for s in needed if not getattr(self, f"{s}_init")]
        if missing:
            raise UsageError(
                f"the {self.stage} stage starts from the stream runs (Sect. 4.1): give "
                f"{' and '.join(missing)} (MLflow run ids or checkpoints), or choose "
                "--init imagenet or --init scratch"
            )

    def resolved(self) -> TrainConfig:
        """This config with its "choose for me" values made explicit (lr 0 -> the stage's,
        crop auto -> the stage's, init auto -> the stage's), as a run logs and checkpoints it."""
        return dataclasses.replace(
            self, lr=self.base_lr, crop=self.crop_mode, init=self.resolved_init
        )

    def use_bf16(self, device_type: str) -> bool:
        return device_type == "cuda" if self.bf16 is None else self.bf16

    def use_channels_last(self, device_type: str) -> bool:
        return device_type == "cuda" if self.channels_last is None else self.channels_last


@dataclass(frozen=True)
class PreprocessConfig:
    """What ``stm.data.preprocess.run_preprocess`` does: videos to Parquet/JPEG shards."""

    source: Source = "synthetic"  # the video source: split files, a folder per class, or generated
    root: str | None = None  # the videos; synthetic: where to write them (default OUT/videos)
    splits: str | None = None  # the split-file folder (ucf101, hmdb51); default: --root
    out: str = ""  # output folder or URI (s3://bucket/prefix); required
    flow: Flow = "tvl1"  # optical flow: OpenCV TV-L1 (the paper's), in PyTorch, DIS or Farneback
    short_side: int | None = None  # resize so min(H, W) = this; unset: 256, synthetic: native
    max_frames: int | None = None  # keep at most the first N frames of a video; unset: all
    max_failures: float = 0.01  # the job fails (exit 1) when more than this fraction fails
    num_videos: int = SYNTHETIC_NUM_VIDEOS  # synthetic only: videos to generate
    seed: int = 0  # synthetic only: the generator's seed
    synthetic_width: int = SYNTHETIC_WIDTH  # synthetic only: frame width
    synthetic_height: int = SYNTHETIC_HEIGHT  # synthetic only: frame height
    synthetic_frames: int = SYNTHETIC_NUM_FRAMES  # synthetic only: frames per video
    workers: int | None = None  # flow actors (1 CPU each), a fixed pool; unset: grow with cluster
    gpus_per_worker: float = 0.0  # GPUs per flow actor (tvl1-torch); >0: unset workers = GPUs/this
    videos_per_shard: int = 8  # videos per task and per shard file (also the resume granularity)
    retry_failed: bool = False  # process videos that failed in an earlier run again
    # first check every stored JPEG against its checksum (rows without checksums: decode it);
    # the videos that fail are removed from their shards and processed again
    verify: bool = False
    # JPEG quality of the stored RGB frames and flow images; unset: 95 for a new dataset, the
    # recorded quality when continuing one
    jpeg_quality: int | None = None
    # the longest a frame's long side may be: a frame whose long side would exceed it after the
    # short-side resize is resized so the long side is this instead (aspect kept; a warning
    # says so), e.g. a 1024x16 strip stays 1024x16 at short side 256, not 16384x256. 1024 keeps
    # every film and TV format (4:1 and narrower) at short side 256 and bounds a frame's memory
    # and flow time to 3x a 4:3 frame's; raise it with a short side above 256
    max_long_side: int = 1024

    def __post_init__(self) -> None:
        _check_literals(self)
        if not self.out:
            raise UsageError("--out is required")
        if self.source != "synthetic" and not self.root:
            raise UsageError(f"--root is required for --source {self.source}")
        _bounds(
            self,
            short_side=(8, MAX_FRAME_SIDE),
            max_frames=(2, None),
            max_failures=(0.0, 1.0),
            num_videos=(1, 1_000_000),
            seed=(0, 2**32 - 1),
            synthetic_width=(16, MAX_FRAME_SIDE),
            synthetic_height=(16, MAX_FRAME_SIDE),
            synthetic_frames=(2, 10_000),
            workers=(1, 100_000),
            gpus_per_worker=(0.0, 64.0),
            videos_per_shard=(1, 10_000),
            jpeg_quality=(1, 100),
            max_long_side=(16, MAX_FRAME_SIDE),
        )
        short = self.resolved_short_side()
        if short is not None and short > self.max_long_side:
            raise UsageError(
                f"--short-side {short} exceeds --max-long-side {self.max_long_side}: "
                "raise --max-long-side"
            )

    def resolved_short_side(self) -> int | None:
        """The short side actually used (None: frames keep their size)."""
        if self.short_side is not None:
            return self.short_side
        return None if self.source == "synthetic" else DEFAULT_SHORT_SIDE


@dataclass(frozen=True)
class SweepConfig:
    """How a grid is swept on Ray Tune (the training flags live in the ``TrainConfig``)."""

    grid: str = "table2"  # table2 | table3 | a YAML grid file (stm.train.grids.load_grid)
    only: tuple[str, ...] = ()  # run only these variants of the grid
    max_concurrent: int = 0  # trials at a time (0 = as many as the resources allow)
    trial_cpus: float = 1.0  # CPUs of each trial's driver process, on top of its Train workers
    asha: bool = False  # stop poor trials early (asynchronous successive halving on "score")
    asha_grace: int = 1  # epochs every trial runs before ASHA may stop it
    name: str = ""  # the sweep's name ("" = sweep-<grid>-<time>); reuse only with --resume
    retry_failed: bool = False  # on resume, run the failed trials again

    def __post_init__(self) -> None:
        _bounds(self, max_concurrent=(0, 10_000), trial_cpus=(0.0, 1024.0), asha_grace=(1, None))
        check_name("--name", self.name, empty=True)


@dataclass(frozen=True)
class ReproduceConfig:
    """The paper's whole recipe (``stm.train.reproduce.run_recipe``); the training flags live
    in the stages' ``TrainConfig``."""

    splits: tuple[int, ...] = ()  # the official splits to run (); () = 1, 2, 3 (those the data has)
    name: str = ""  # the recipe's name ("" = reproduce-<dataset>); the same command continues it
    # run both stream stages at once; unset: when the cluster has room for both now
    concurrent_streams: bool | None = None
    # the motion stream's weight in the late fusion of the two streams; unset: 3 on HMDB51
    # (Sect. 5.3), else 1
    late_fusion_weight: float | None = None
    root: str = ""  # a video root: preprocess it into --data first (then --source, --split-files)
    source: Source = "ucf101"  # with --root: ucf101 | hmdb51 | folder
    split_files: str = ""  # with --root: the folder of the official split files

    def __post_init__(self) -> None:
        _check_literals(self)
        check_name("--name", self.name, empty=True)
        if any(k < 1 or k > 10 for k in self.splits):
            raise UsageError(f"invalid --splits {','.join(map(str, self.splits))}: 1 to 10")
        if len(set(self.splits)) != len(self.splits):
            raise UsageError("--splits: each split once")
        _bounds(self, late_fusion_weight=(0.0, 100.0))


@dataclass(frozen=True)
class PredictConfig:
    """Classify one video with a trained model (``stm.train.predict.run_predict``)."""

    video: str = ""  # a video file (local path or s3:// / gs:// URI)
    # a registered model (models:/NAME@ALIAS, models:/NAME/N, models:/NAME/latest), a
    # checkpoint file or folder; "" = models:/stm@best (the best of the data trained last)
    model: str = ""
    run_id: str = ""  # an MLflow training run instead of --model
    mlflow_uri: str = ""  # tracking URI; "" = $MLFLOW_TRACKING_URI, else <home>/mlflow.db
    flow: Flow | None = None  # the flow estimator; unset: the one the model's data used
    # resize the video's short side to this; unset: as the model's data, 0 = native size
    short_side: int | None = None
    test_frames: int | None = None  # chunks per video; unset: the model's (25 in the paper)
    top_k: int = 5  # classes to print
    device: str = ""  # cpu | cuda; "" = cuda if available

    def __post_init__(self) -> None:
        if not self.video:
            raise UsageError("a video file is required")
        if self.flow is not None:
            check_choice("flow", self.flow, FLOWS)
        _bounds(self, short_side=(0, MAX_FRAME_SIDE), test_frames=(1, 250), top_k=(1, 100_000))
        check_device(self.device)


@dataclass(frozen=True)
class EvaluateConfig:
    """Test a trained model on a split of a dataset (``stm.train.predict.run_evaluate``)."""

    data: str = ""  # a preprocessed dataset (jobs/preprocess.py); required
    split: int = 1  # the official split to test on (1-based)
    # a registered model (models:/NAME@ALIAS, models:/NAME/N, ...), a checkpoint file or
    # folder; "" = models:/stm@best-<dataset>-split<k>, the best of this data and split
    model: str = ""
    run_id: str = ""  # an MLflow training run instead of --model
    mlflow_uri: str = ""  # tracking URI; "" = $MLFLOW_TRACKING_URI, else <home>/mlflow.db
    limit: int | None = None  # only the first N test videos; unset: all
    device: str = ""  # cpu | cuda; "" = cuda if available

    def __post_init__(self) -> None:
        if not self.data:
            raise UsageError("--data is required")
        _bounds(self, split=(1, 10), limit=(1, None))
        check_device(self.device)


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a (nested) config dataclass, safe to send through Ray or log to MLflow."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config dataclass from ``to_dict`` output; unknown keys are a one-line error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = hints[name]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def flat_fields(cls: type) -> dict[str, Any]:
    """Field name -> type hint of a config, nested config dataclasses flattened into it (what
    a command line or a sweep grid sets: ``--lr`` and ``--fusion`` alike)."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(flat_fields(hint))
        else:
            out[name] = hint
    return out


def with_changes(preset: T, changes: dict[str, Any]) -> T:
    """``preset`` with flat ``changes`` applied (nested model fields included): what a command
    line or a sweep variant asks for. A wrong value is a one-line ``UsageError``."""
    hints = typing.get_type_hints(type(preset))
    nested = [name for name, hint in hints.items() if dataclasses.is_dataclass(hint)]
    top: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        value = tuple(value) if isinstance(value, list) else value
        for name in nested:
            if key in flat_fields(hints[name]):
                inner.setdefault(name, {})[key] = value
                break
        else:
            top[key] = value
    try:
        for name, sub in inner.items():
            top[name] = with_changes(getattr(preset, name), sub)
        return dataclasses.replace(preset, **top)  # type: ignore[type-var]
    except TypeError as err:
        raise UsageError(str(err).splitlines()[0]) from None


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that also accepts nested ``model=dict(...)`` changes."""
    model = changes.pop("model", None)
    if isinstance(model, dict):
        changes["model"] = dataclasses.replace(cfg.model, **model)  # type: ignore[attr-defined]
    elif model is not None:
        changes["model"] = model
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def field_help(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source (the flag's help text): the comment on its
    line, else the comment lines right above it."""
    source = inspect.getsource(cls)
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        match = re.match(r"^(\w+)\s*:", stripped)
        if stripped.startswith("#"):
            above.append(comments.get(number, ""))
        elif match and match.group(1) in names:
            inline = comments.get(number, "")
            out[match.group(1)] = inline or " ".join(p for p in above if p)
            above = []
        else:
            above = []
    return out


# Each stream alone is a plain two-stream baseline (Sect. 4.1; the original
# base_streams/cnn_ucf101_{spatial,temporal}.m): no gates, no temporal filters, one sample per
# video, so nothing is pooled over time.
STREAM_STAGE = {"fusion": "none", "temporal": "none", "num_chunks": 1}
# The paper's recipe of each stage on real data, applied under every flag the user gives.
PAPER_RECIPES: dict[str, dict[str, Any]] = {
    "appearance": {
        **STREAM_STAGE,
        "appearance_arch": "resnet50",  # Table 4
        "batch_size": 256,  # the original: 256 frames per update, 32 per forward
        "crop": "jitter",  # +-25% jitter of the 224 crop
        "appearance_dropout": 0.0,  # the original: dr0
        "lr": 1e-2,  # lowered twice (Sect. 4.1); the original: 20 passes per lr step
        "epochs": 60,
        "lr_milestones": (20, 40),
    },
    "motion": {
        **STREAM_STAGE,
        "motion_arch": "resnet152",  # Table 4 (the original's test model: flow152)
        "batch_size": 128,  # the original: 32 stacks per forward
        "crop": "multiscale",  # W, H in {256, 224, 192, 168}, corners and centre
        "motion_dropout": 0.8,
        "lr": 1e-2,  # lowered twice (Sect. 4.1); the original: ~100 passes per lr step
        "epochs": 300,
        "lr_milestones": (100, 200),
    },
    "fused": {"lr": 1e-3},  # 128 videos x 5 chunks, lr /10 after 20 and 30 epochs: the defaults
}


STREAM_BN_BATCH = 32  # the original base streams' samples per forward pass


def stage_recipe(stage: str, real_data: bool, num_workers: int = 1) -> dict[str, Any]:
    """The flat config changes that ``--stage`` selects: the paper's whole recipe on real data,
    only the stream stages' structure (no gates, filters or pooling over time) on the small
    embedded run. A stream stage's BatchNorm batch is the original's 32 samples, or the largest
    divisor of each worker's share of the update below it."""
    check_choice("stage", stage, STAGES)
    if not real_data:
        return {"stage": stage, **(STREAM_STAGE if stage != "fused" else {})}
    recipe = {"stage": stage, **PAPER_RECIPES[stage]}
    if stage != "fused":
        share = max(1, recipe["batch_size"] // max(1, num_workers))
        recipe["bn_batch"] = max(d for d in range(1, STREAM_BN_BATCH + 1) if share % d == 0)
    return recipe


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
        init="scratch",  # no ImageNet weights on a laptop, no stream runs to start from
    )
    return replace(cfg, **overrides)
