"""The typed configuration schema, registered in Hydra's ConfigStore.

Composition itself checks every key's type and rejects unknown keys (on the command line, in a
config file, under `--cfg job`, in every job of a sweep): `conf/train.yaml` names the `schema`
group's `train` option first in its defaults, `conf/evaluate.yaml` overrides it with `evaluate`,
each `loss` option starts from the `objective` node, and each `dataset` and `sampler` option
names the schema of its constructor (`/schema/dataset/<option>`, `/schema/sampler/<option>`).
The defaults are those of these dataclasses and YAML files, never repeated in code.

Value rules across keys (a positive learning rate, a batch holding negatives, ...) are checked
after composition by `aomd.config.validate`.

Where they come from:
- `LossSchema` is generated from the loss-term registry (`aomd.losses.terms`), after the modules
  named in `AOMD_PLUGINS` (comma-separated) were imported, so that a term, dataset or backbone
  registered by a plugin is part of the schema;
- a dataset's or sampler's schema is generated from its constructor's signature
  (`constructor_schema`): its keyword arguments, their types and defaults.
"""
from __future__ import annotations

import importlib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from aomd.errors import ConfigError

PLUGINS_VARIABLE = "AOMD_PLUGINS"


def load_plugins() -> list[str]:
    """Import the modules named in $AOMD_PLUGINS (comma-separated), which register loss terms,
    datasets or backbones; a module that cannot be imported is a ConfigError."""
    names = [name.strip() for name in os.environ.get(PLUGINS_VARIABLE, "").split(",") if name.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"{PLUGINS_VARIABLE} names the module {name!r}, which cannot be imported ({error}); "
                              f"put it on PYTHONPATH or fix {PLUGINS_VARIABLE}.") from None
    return names


# Every value the YAML files give is MISSING here: the defaults live in conf/ alone, and a key
# the YAML forgets fails composition instead of silently taking a second default.


@dataclass
class BackboneSchema:
    name: str = MISSING
    pretrained: bool = MISSING


@dataclass
class TrainSchema:
    """The training recipe (`train`), and what `aomd.engine.fit` takes."""

    epochs: int = MISSING
    iters_per_epoch: int = MISSING
    batch_size: int = MISSING
    images_per_class: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    lr_decay_epochs: list[int] = MISSING
    lr_decay_gamma: float = MISSING
    decay_unreached: bool = MISSING
    seed: int = MISSING
    device: str = MISSING
    precision: str = MISSING
    channels_last: Optional[bool] = MISSING
    compile: bool = MISSING
    deterministic: bool = MISSING
    cuda_graphs: bool = MISSING
    fused_adapters: Optional[bool] = MISSING
    num_workers: Any = MISSING
    pin_memory: Optional[bool] = MISSING
    progress: bool = MISSING
    resume: str = MISSING


@dataclass
class EvalSchema:
    """What an evaluation computes (`eval`)."""

    recall_k: list[int] = MISSING
    batch_size: int = MISSING
    chunk_size: int = MISSING
    select: str = MISSING
    val_classes: Optional[int] = MISSING
    keep_crops: Optional[bool] = MISSING


@dataclass
class LoggerSchema:
    enabled: bool = MISSING
    mode: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    group: Optional[str] = MISSING
    name: Optional[str] = MISSING
    tags: list[str] = MISSING
    init_timeout: float = MISSING


# the keys of `train` that make a recipe (the rest says where and how it computes)
RECIPE_KEYS = ("epochs", "iters_per_epoch", "batch_size", "images_per_class", "lr", "weight_decay",
               "lr_decay_epochs", "lr_decay_gamma", "decay_unreached", "seed")
# The teacher recipe (`teacher.train`): what it sets overrides `train` when the teacher is
# trained; a key left at None takes the student's value. Its keys and types are TrainSchema's.
TeacherTrainSchema = make_dataclass("TeacherTrainSchema", [
    (name, Optional[kind], field(default=None))
    for name, kind in typing.get_type_hints(TrainSchema).items() if name in RECIPE_KEYS
])


def _python_type(annotation: Any) -> Any:
    """An annotation OmegaConf can type a field with: int, float, bool, str, lists of them,
    Optional of those; anything else (unions, paths) is Any."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float, bool, str):
        return annotation
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = _python_type(next(a for a in args if a is not type(None)))
        return Any if inner is Any else Optional[inner]
    if origin is list and len(args) == 1 and args[0] in (int, float, bool, str):
        return annotation
    return Any


def constructor_schema(target: str | Callable) -> type:
    """A dataclass with `_target_` and the keyword arguments of `target` (a dotted path or a
    callable), typed from its annotations, defaults from its signature (no default: MISSING)."""
    function = _locate(target) if isinstance(target, str) else target
    path = target if isinstance(target, str) else f"{function.__module__}.{function.__qualname__}"
    hints = typing.get_type_hints(function.__init__ if inspect.isclass(function) else function)
    fields = [("_target_", str, field(default=path))]
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        kind = _python_type(hints.get(name, Any))
        default = MISSING if parameter.default is inspect.Parameter.empty else parameter.default
        if isinstance(default, (list, dict)):
            fields.append((name, kind, field(default_factory=lambda d=default: type(d)(d))))
        else:
            fields.append((name, kind, field(default=default)))
    return make_dataclass(f"{function.__name__.title().replace('_', '')}Schema", fields)


def _locate(path: str) -> Callable:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def loss_schema() -> type:
    """The `loss` node: `_target_` Objective and every registered term's keys with their defaults."""
    from aomd.losses.terms import loss_defaults

    fields = [("_target_", str, field(default="aomd.losses.Objective"))]
    fields += [(key, type(default), field(default=default)) for key, default in loss_defaults().items()]
    return make_dataclass("LossSchema", fields)


def sampler_schema() -> dict[str, Any]:
    """The `sampler` node of the teacher recipe and of the student: any registered sampler."""
    return {"_target_": MISSING}


@dataclass
class TeacherSchema:
    backbone: str = MISSING
    embedding_size: int = MISSING
    pretrained: bool = MISSING
    checkpoint: Optional[str] = MISSING
    train_if_missing: bool = MISSING
    train: TeacherTrainSchema = field(default_factory=TeacherTrainSchema)
    loss: Any = MISSING       # typed by the `objective` node the teacher option starts from
    sampler: Any = MISSING    # typed by the sampler schema the teacher option names


@dataclass
class TrainConfigSchema:
    dataset: Any = MISSING    # typed by the constructor schema each dataset option names
    backbone: BackboneSchema = field(default_factory=BackboneSchema)
    sampler: Any = MISSING    # typed by the constructor schema each sampler option names
    loss: Any = MISSING       # typed by the `objective` node every loss option starts from
    teacher: TeacherSchema = field(default_factory=TeacherSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    embedding_size: int = MISSING
    l2normalize: bool = MISSING
    train: TrainSchema = field(default_factory=TrainSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    paths: dict[str, Any] = field(default_factory=dict)
    skip_finished: bool = MISSING
    preset: Any = None


@dataclass
class EvaluateConfigSchema(TrainConfigSchema):
    checkpoint: str = MISSING
    output: Optional[str] = MISSING


def register_constructor(group: str, option: str, target: str | Callable) -> None:
    """Register the schema of `target`, a `dataset` or `sampler` option's constructor, as
    `/schema/<group>/<option>` (what that option's YAML names in its defaults). The package's own
    options are registered from their YAML files; a plugin calls this for its own."""
    ConfigStore.instance().store(group=f"schema/{group}", name=option, node=constructor_schema(target))


def register(dataset_options: dict[str, str], sampler_options: dict[str, str]) -> None:
    """Register every schema in the ConfigStore (see the module docstring); `*_options` map a
    group option to its constructor."""
    store = ConfigStore.instance()
    store.store(group="schema", name="train", node=TrainConfigSchema, package="_global_")
    store.store(group="schema", name="evaluate", node=EvaluateConfigSchema, package="_global_")
    store.store(group="schema/loss", name="objective", node=loss_schema())
    for group, options in (("dataset", dataset_options), ("sampler", sampler_options)):
        for option, target in options.items():
            register_constructor(group, option, target)
