"""The configuration schema and its validation, run before any data or model is built.

Hydra composes `conf/train.yaml` with its groups; `validate` then checks the result against the
typed schema below and the value rules, and raises `ConfigError` with one sentence naming the key.
Group configs that map to a constructor (`dataset`, `sampler`, `loss`) keep their own keys; the
constructors check those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aomd.errors import ConfigError
from aomd.models.backbones import BACKBONES
from aomd.runtime import PRECISIONS


def config_dir() -> str:
    """Absolute path of the packaged Hydra configs (works installed, editable, or from a checkout)."""
    packaged = Path(__file__).resolve().parent / "conf"  # a regular install ships conf/ inside the package
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")  # editable install: the repository's conf/


@dataclass
class BackboneSchema:
    name: str = MISSING
    pretrained: bool = False


@dataclass
class TrainSchema:
    epochs: int = MISSING
    iters_per_epoch: int = MISSING
    batch_size: int = MISSING
    images_per_class: int = MISSING
    lr: float = MISSING
    weight_decay: float = 0.0
    lr_decay_epochs: list[int] = field(default_factory=list)
    lr_decay_gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: Optional[bool] = None
    compile: bool = False
    deterministic: bool = True
    num_workers: Any = "auto"
    pin_memory: Optional[bool] = None
    progress: bool = True


@dataclass
class EvalSchema:
    recall_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 256
    chunk_size: int = 1024


@dataclass
class LoggerSchema:
    enabled: bool = True
    mode: str = "offline"
    project: str = "aomd"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TeacherTrainSchema:
    """The teacher recipe: what it sets overrides `train` when the teacher is trained."""

    epochs: Optional[int] = None
    iters_per_epoch: Optional[int] = None
    batch_size: Optional[int] = None
    images_per_class: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    lr_decay_epochs: Optional[list[int]] = None
    lr_decay_gamma: Optional[float] = None
    seed: Optional[int] = None


@dataclass
class TeacherSchema:
    backbone: str = "resnet50"
    embedding_size: int = 512
    pretrained: bool = False
    checkpoint: Optional[str] = None
    train_if_missing: bool = True
    train: TeacherTrainSchema = field(default_factory=TeacherTrainSchema)


@dataclass
class LossSchema:
    """The keys of `aomd.losses.Objective` (conf/objective.yaml): term ratios and hyperparameters."""

    _target_: str = "aomd.losses.Objective"
    triplet_ratio: float = 0.0
    triplet_p: int = 2
    contrastive_ratio: float = 0.0
    margin: float = 0.2
    aomd_ratio: float = 0.0
    mode: int = 2
    global_weight: float = 1.0
    local_weight: float = 1.0
    sp_ratio: float = 0.0
    at_ratio: float = 0.0
    fitnet_ratio: float = 0.0
    dark_ratio: float = 0.0
    dark_alpha: float = 2.0
    dark_beta: float = 3.0
    permute_len: int = 4
    dist_ratio: float = 0.0
    angle_ratio: float = 0.0


@dataclass
class TrainConfigSchema:
    dataset: Any = MISSING
    backbone: BackboneSchema = field(default_factory=BackboneSchema)
    sampler: Any = MISSING
    loss: LossSchema = field(default_factory=LossSchema)
    teacher: TeacherSchema = field(default_factory=TeacherSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    embedding_size: int = 128
    l2normalize: bool = True
    train: TrainSchema = field(default_factory=TrainSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    paths: dict[str, Any] = field(default_factory=dict)
    skip_finished: bool = True
    preset: Any = None


@dataclass
class EvaluateConfigSchema(TrainConfigSchema):
    checkpoint: str = MISSING
    output: Optional[str] = None


def _typed(cfg: DictConfig, schema: type) -> DictConfig:
    """`cfg` merged onto the schema: wrong types and unknown keys become a ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or getattr(error, "key", None)
        reason = getattr(error, "msg", None) or str(error)
        reason = reason.splitlines()[0].rstrip(".")
        raise ConfigError(f"Invalid value for `{key}`: {reason}; fix it on the command line or in the config file.") from None
    if "dataset.root" in missing:
        raise ConfigError("dataset.root is not set: pass the folder that holds the dataset, e.g. dataset.root=/data/cub200 "
                          "(the layouts each dataset accepts are in docs/datasets.md).")
    if missing:
        raise ConfigError(f"`{missing[0]}` has no value; set it on the command line, e.g. {missing[0]}=<value>.")
    return merged


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_train(train, prefix: str = "train") -> None:
    """Value rules of a `train` section (the student's, or the teacher recipe merged over it)."""
    _require(train.epochs >= 0, f"{prefix}.epochs must be 0 or more, got {train.epochs}.")
    _require(train.iters_per_epoch >= 1, f"{prefix}.iters_per_epoch must be at least 1, got {train.iters_per_epoch}.")
    _require(train.lr > 0, f"{prefix}.lr must be positive, got {train.lr}.")
    _require(train.weight_decay >= 0, f"{prefix}.weight_decay must be 0 or more, got {train.weight_decay}.")
    _require(train.lr_decay_gamma > 0, f"{prefix}.lr_decay_gamma must be positive, got {train.lr_decay_gamma}.")
    _require(train.images_per_class >= 2,
             f"{prefix}.images_per_class must be at least 2 so that batches hold positive pairs, got {train.images_per_class}.")
    _require(train.batch_size >= 2 * train.images_per_class,
             f"{prefix}.batch_size ({train.batch_size}) must be at least 2 x {prefix}.images_per_class "
             f"({2 * train.images_per_class}) so that every batch holds negatives.")
    _require(train.device in ("auto", "cpu", "cuda") or train.device.startswith("cuda:"),
             f"train.device must be auto, cpu or cuda, got {train.device!r}.")
    _require(train.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {train.precision!r}.")
    _require(train.num_workers == "auto" or (isinstance(train.num_workers, int) and not isinstance(train.num_workers, bool)
                                             and train.num_workers >= 0),
             f"train.num_workers must be auto or an integer of 0 or more, got {train.num_workers!r}.")


def teacher_train(cfg: DictConfig) -> DictConfig:
    """The teacher recipe: `teacher.train` (the keys it sets) merged over `train`."""
    return OmegaConf.merge(cfg.train, {k: v for k, v in cfg.teacher.train.items() if v is not None})


def check_loss(loss) -> None:
    """Value rules of the `loss` section."""
    ratios = {key: value for key, value in loss.items() if key.endswith("_ratio")}
    negative = [f"loss.{key}" for key, value in ratios.items() if value < 0]
    _require(not negative, f"{', '.join(negative)} must be 0 or more (0 switches a term off).")
    _require(any(value > 0 for value in ratios.values()),
             "Every loss.*_ratio is 0, so there is nothing to train; set one, e.g. loss.triplet_ratio=1.")
    _require(loss.mode in (1, 2), f"loss.mode must be 1 (full mapping) or 2 (pooled mapping), got {loss.mode}.")
    _require(loss.triplet_p in (1, 2), f"loss.triplet_p must be 1 (L1) or 2 (L2), got {loss.triplet_p}.")
    _require(loss.global_weight >= 0 and loss.local_weight >= 0, "loss.global_weight and loss.local_weight must be 0 or more.")
    _require(loss.aomd_ratio == 0 or loss.global_weight + loss.local_weight > 0,
             "loss.aomd_ratio is on but loss.global_weight and loss.local_weight are both 0; set one of them above 0.")
    _require(loss.permute_len >= 1, f"loss.permute_len must be at least 1, got {loss.permute_len}.")


def validate(cfg: DictConfig, schema: type = TrainConfigSchema) -> DictConfig:
    """The composed config, typed and resolved; raises ConfigError on the first bad value."""
    cfg = _typed(cfg, schema)
    _require(cfg.backbone.name in BACKBONES,
             f"backbone.name must be one of {', '.join(BACKBONES)}, got {cfg.backbone.name!r}.")
    _require(cfg.teacher.backbone in BACKBONES,
             f"teacher.backbone must be one of {', '.join(BACKBONES)}, got {cfg.teacher.backbone!r}.")
    _require(cfg.embedding_size >= 1, f"embedding_size must be at least 1, got {cfg.embedding_size}.")
    _require(cfg.teacher.embedding_size >= 1, f"teacher.embedding_size must be at least 1, got {cfg.teacher.embedding_size}.")
    check_train(cfg.train)
    check_train(teacher_train(cfg), "teacher.train")
    check_loss(cfg.loss)
    _require(cfg.loss.permute_len < cfg.train.batch_size,
             f"loss.permute_len ({cfg.loss.permute_len}) must be smaller than train.batch_size ({cfg.train.batch_size}).")
    _require(len(cfg.eval.recall_k) > 0 and all(k >= 1 for k in cfg.eval.recall_k),
             f"eval.recall_k must be a non-empty list of positive integers, got {list(cfg.eval.recall_k)}.")
    _require(cfg.eval.batch_size >= 1 and cfg.eval.chunk_size >= 1, "eval.batch_size and eval.chunk_size must be at least 1.")
    _require(cfg.logger.mode in ("online", "offline", "disabled"),
             f"logger.mode must be online, offline or disabled, got {cfg.logger.mode!r}.")
    image_size = cfg.dataset.get("image_size")
    _require(image_size is None or (isinstance(image_size, int) and image_size >= 32),
             f"dataset.image_size must be an integer of at least 32, got {image_size!r}.")
    base_size = cfg.dataset.get("base_size")
    _require(base_size is None or image_size is None or base_size >= image_size,
             f"dataset.image_size ({image_size}) cannot be larger than dataset.base_size ({base_size}), the stored size it is cropped from.")
    return cfg


def selection_metric(eval_cfg) -> str:
    """The metric that selects the best epoch and that a job returns: Recall@K at the smallest K."""
    return f"recall@{min(eval_cfg.recall_k)}"


def check_test_size(recall_k, test_images: int) -> None:
    """Recall@K needs K other images for every query."""
    _require(max(recall_k) < test_images,
             f"eval.recall_k asks for K = {max(recall_k)} but the test split has only {test_images} images; "
             f"use values below {test_images}.")
