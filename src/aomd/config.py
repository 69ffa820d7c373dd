"""Composing the configuration and checking its values, before any data or model is built.

Hydra composes `conf/train.yaml` with its groups against the typed schema of `aomd.schema`
(types, unknown keys); `validate` then checks the value rules across keys. Both report a bad
value as a ConfigError: one sentence naming the key. `check_before_start` runs both for every
job of a command line before Hydra starts the first one.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
from pathlib import Path
from typing import Iterable

import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from aomd import records  # importing it registers the resolver conf/train.yaml uses
from aomd import schema
from aomd.errors import ConfigError
from aomd.losses.terms import TERMS, check_loss, distils
from aomd.models.backbones import BACKBONES
from aomd.metrics import SELECTIONS
from aomd.runtime import check_settings

MAX_JOBS_CHECKED = 256  # a sweep larger than this has its first jobs checked up front, the rest as they start


def config_dir() -> str:
    """Absolute path of the packaged Hydra configs (works installed, editable, or from a checkout)."""
    packaged = Path(__file__).resolve().parent / "conf"  # a regular install ships conf/ inside the package
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")  # editable install: the repository's conf/


def _option_targets(group: str) -> dict[str, str]:
    """{option: constructor} of a group's YAML files (a `dataset` option keeps it under `dataset:`)."""
    targets = {}
    for path in sorted((Path(config_dir()) / group).glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        target = (data.get(group) or {}).get("_target_") if isinstance(data.get(group), dict) else data.get("_target_")
        if target:
            targets[path.stem] = target
    return targets


# plugins first: the terms, datasets and backbones they register are part of the schema; a
# plugin that cannot be imported is reported by `compose`, as one line, not at import
try:
    schema.load_plugins()
    _plugin_error: ConfigError | None = None
except ConfigError as error:
    _plugin_error = error
schema.register(_option_targets("dataset"), _option_targets("sampler"))


def compose(overrides: Iterable[str] = (), config_name: str = "train", with_hydra: bool = False) -> DictConfig:
    """The config Hydra composes for `overrides` (not yet validated); a ConfigError names the key
    of a wrong type, an unknown key or an unknown option."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if _plugin_error is not None:
        raise _plugin_error
    initialized = GlobalHydra.instance().is_initialized()
    try:
        if initialized:  # inside a running Hydra app or another compose context
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as error:
        key = _unknown_key(error)
        close = _close_keys(key, list(overrides), config_name) if key else ""
        if close:
            raise ConfigError(f"`{key}` is not a key of this configuration; did you mean {close}? (`--cfg job` shows "
                              f"every key)") from None
        raise ConfigError(_composition_error(error)) from None
    except ValueError as error:  # e.g. `teacher=null`: a group every job needs, set to nothing
        raise ConfigError(f"{str(error).splitlines()[0].rstrip('.')}; a group can be set to another option, not to null "
                          f"(`--help` lists them).") from None


def _close_keys(key: str, overrides: list[str], config_name: str) -> str:
    """"`dataset`" for a misspelt `key` (`datset`): the keys beside it that read alike, from the
    config composed without the overrides of that key ("" when none is close)."""
    parent, _, name = key.rpartition(".")
    others = [o for o in overrides if not (records.override_key(o) + ".").startswith(key + ".")]
    try:
        node = compose(others, config_name)
    except ConfigError:
        return ""
    node = OmegaConf.select(node, parent) if parent else node
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(name, [str(k) for k in node.keys()], n=3, cutoff=0.75)
    return " or ".join(f"`{parent + '.' if parent else ''}{k}`" for k in close)


def _omegaconf_cause(error: BaseException) -> OmegaConfBaseException | None:
    """The OmegaConf error behind a composition error, if any."""
    cause = error
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    return cause if isinstance(cause, OmegaConfBaseException) else None


def _unknown_key(error: BaseException) -> str | None:
    """The key a composition error says is not in the configuration, if that is what it says."""
    cause = _omegaconf_cause(error)
    if cause is None:
        return None
    reason = (getattr(cause, "msg", None) or str(cause)).splitlines()[0]
    if "not in struct" in reason or "is not in" in reason or "Key '" in reason and "not" in reason:
        return str(getattr(cause, "full_key", None) or getattr(cause, "key", None))
    return None


def _composition_error(error: BaseException) -> str:
    """One sentence from Hydra's and OmegaConf's multi-line composition errors."""
    cause = _omegaconf_cause(error)
    if cause is not None:
        key = getattr(cause, "full_key", None) or getattr(cause, "key", None)
        if _unknown_key(error) is not None:
            return f"`{key}` is not a key of this configuration; check its spelling (`--cfg job` shows every key)."
        reason = (getattr(cause, "msg", None) or str(cause)).splitlines()[0].rstrip(".")
        return f"Invalid value for `{key}`: {reason}; fix it on the command line or in the config file."
    first = str(error).strip().splitlines()[0].rstrip(".")
    if first.startswith("Ambiguous value for argument"):  # Hydra's advice follows on lines of its own
        return f"{first}: add -m to sweep over the values, or write key=[a,b] for a list."
    override = re.fullmatch(r"Could not override '([\w.]+)'\. No match in the defaults list", first)
    if override:  # a group the defaults list does not name (an add-on such as ablation)
        return f"{first}: add the group with +{override.group(1)}=<option>."
    if "Could not load 'schema/" in first:  # a config file of one's own whose schema a plugin registers
        return (f"{first}: the schema it names is registered by a plugin of your own; name its module in "
                f"AOMD_PLUGINS (README: Extending).")
    return first + "."


def _unknown_keys(node, prefix: str = "") -> list[str]:
    """Keys of typed nodes (dataclass schemas) that their dataclass does not have, dotted."""
    found = []
    if not isinstance(node, DictConfig):
        return found
    schema_type = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(schema_type)} if dataclasses.is_dataclass(schema_type) else None
    for key in node.keys():
        if names is not None and key not in names:
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_missing(node, key):
            found += _unknown_keys(node._get_node(key), f"{prefix}{key}.")
    return found


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
    _require(all(epoch >= 1 for epoch in train.lr_decay_epochs),
             f"{prefix}.lr_decay_epochs must list epochs numbered from 1 (from each, the learning rate is "
             f"multiplied by lr_decay_gamma), got {list(train.lr_decay_epochs)}.")
    _require(train.images_per_class >= 2,
             f"{prefix}.images_per_class must be at least 2 so that batches hold positive pairs, got {train.images_per_class}.")
    _require(train.batch_size >= 2 * train.images_per_class,
             f"{prefix}.batch_size ({train.batch_size}) must be at least 2 x {prefix}.images_per_class "
             f"({2 * train.images_per_class}) so that every batch holds negatives.")
    _require(0 <= train.seed < 2**32, f"{prefix}.seed must be between 0 and 2**32 - 1 (NumPy's seeds), got {train.seed}.")
    _require(train.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", train.device) is not None,
             f"train.device must be auto, cpu, cuda or cuda:<index>, got {train.device!r}.")
    if prefix == "train":  # the runtime's settings are the student job's (the teacher trains with them too)
        check_settings(train.precision, train.num_workers, train.compile, train.cuda_graphs)


def schedule_warning(train, prefix: str = "train") -> str | None:
    """Why a recipe's learning-rate schedule will not do what it says, or None: decay epochs after
    its last epoch (a shortened run keeps the dataset's schedule), or a factor that raises the rate."""
    late = [epoch for epoch in train.lr_decay_epochs if epoch > train.epochs]
    if late and train.epochs > 0:
        return (f"{prefix}.lr_decay_epochs {list(train.lr_decay_epochs)}: epoch{'s' * (len(late) > 1)} "
                f"{', '.join(map(str, late))} come{'s' * (len(late) == 1)} after the last one ({prefix}.epochs="
                f"{train.epochs}), so the learning rate does not decay there; set {prefix}.lr_decay_epochs for this length.")
    if train.lr_decay_gamma > 1:
        return f"{prefix}.lr_decay_gamma is {train.lr_decay_gamma}: each decay epoch raises the learning rate."
    return None


def check_teacher_objective(teacher, recipe) -> None:
    """What a managed teacher is trained with: its own loss settings (a term on its own
    embeddings: it has no teacher), its sampler's settings, and at least one epoch."""
    for key, example in (("loss", "teacher.loss.margin=0.3"), ("sampler", "teacher.sampler.cutoff=0.6")):
        _require(isinstance(teacher[key], DictConfig),
                 f"teacher.{key} holds the settings of the teacher's own {key} (e.g. {example}), it is not an option of "
                 f"the {key} group; got teacher.{key}={teacher[key]!r}.")
    # first: the distillation terms' own rules would name the student's keys
    _require(not distils(teacher.loss),
             f"teacher.loss cannot distil ({', '.join(f'teacher.loss.{t.ratio_key}' for t in TERMS.values() if t.distils and teacher.loss.get(t.ratio_key, 0) > 0)}): "
             f"the teacher has no teacher of its own; set those ratios to 0.")
    check_loss(teacher.loss, recipe, prefix="teacher.loss")
    _require(recipe.epochs >= 1, f"teacher.train.epochs must be at least 1: an untrained network is no teacher, got {recipe.epochs}.")


def validate(cfg: DictConfig) -> DictConfig:
    """The composed config, resolved; raises ConfigError on the first value that breaks a rule."""
    try:
        cfg = cfg.copy()
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as error:
        raise ConfigError(_composition_error(error)) from None
    if "dataset.root" in missing:
        name = str(cfg.dataset.get("_target_", "")).rsplit(".", 1)[-1].removeprefix("load_") or "my_dataset"
        raise ConfigError(f"dataset.root is not set: pass the folder that holds the dataset, e.g. dataset.root=/data/{name} "
                          "(the layouts each dataset accepts are in docs/datasets.md).")
    if missing:
        raise ConfigError(f"`{missing[0]}` has no value; set it on the command line, e.g. {missing[0]}=<value>.")
    unknown = _unknown_keys(cfg)
    if unknown:  # keys added with `+key=value` to a typed node: composition lets them through
        raise ConfigError(f"`{unknown[0]}` is not a key of this configuration; check its spelling (`--cfg job` shows every key).")
    from aomd.teachers import teacher_recipe  # the teacher recipe is the teachers module's

    _require(cfg.backbone.name in BACKBONES,
             f"backbone.name must be one of {', '.join(BACKBONES)}, got {cfg.backbone.name!r}.")
    _require(cfg.teacher.backbone in BACKBONES,
             f"teacher.backbone must be one of {', '.join(BACKBONES)}, got {cfg.teacher.backbone!r}.")
    _require(cfg.embedding_size >= 1, f"embedding_size must be at least 1, got {cfg.embedding_size}.")
    _require(cfg.teacher.embedding_size >= 1, f"teacher.embedding_size must be at least 1, got {cfg.teacher.embedding_size}.")
    check_train(cfg.train)
    check_loss(cfg.loss, cfg.train)
    if distils(cfg.loss) and not cfg.teacher.checkpoint:  # the job may train its teacher: the recipe matters
        try:
            check_train(teacher_recipe(cfg), "teacher.train")
        except ConfigError as error:
            inherited = [key for key, value in cfg.teacher.train.items() if value is None]
            if not any(re.search(rf"teacher\.train\.{key}\b", str(error)) for key in inherited):
                raise
            raise ConfigError(f"{str(error).removesuffix('.')} (the keys teacher.train leaves null take train's values).") from None
        check_teacher_objective(cfg.teacher, teacher_recipe(cfg))
    trains_teacher = distils(cfg.loss) and not cfg.teacher.checkpoint
    for prefix, sampler in (("sampler", cfg.sampler), ("teacher.sampler", cfg.teacher.sampler)):
        if isinstance(sampler, DictConfig) and "cutoff" in sampler and "nonzero_loss_cutoff" in sampler:
            _require(0 <= sampler.cutoff < sampler.nonzero_loss_cutoff,
                     f"{prefix}.cutoff must be 0 or more and below {prefix}.nonzero_loss_cutoff, got {sampler.cutoff} "
                     f"and {sampler.nonzero_loss_cutoff}.")
        if isinstance(sampler, DictConfig) and (prefix == "sampler" or trains_teacher):
            _check_builds(sampler, prefix)
    _require(len(cfg.eval.recall_k) > 0 and all(k >= 1 for k in cfg.eval.recall_k),
             f"eval.recall_k must be a non-empty list of positive integers, got {list(cfg.eval.recall_k)}.")
    _require(cfg.eval.batch_size >= 1 and cfg.eval.chunk_size >= 1, "eval.batch_size and eval.chunk_size must be at least 1.")
    _require(cfg.eval.select in SELECTIONS, f"eval.select must be test, last or val, got {cfg.eval.select!r}.")
    _require(cfg.eval.val_classes is None or cfg.eval.val_classes >= 2,
             f"eval.val_classes must be at least 2 (one class scores 100% Recall at every epoch; or null: a fifth of the "
             f"training classes), got {cfg.eval.val_classes}.")
    # W&B's older names, which a WANDB_MODE set for other tools may still hold
    cfg.logger.mode = {"dryrun": "offline", "run": "online"}.get(cfg.logger.mode, cfg.logger.mode)
    from_environment = " (from the environment variable WANDB_MODE)" if os.environ.get("WANDB_MODE") == cfg.logger.mode else ""
    _require(cfg.logger.mode in ("online", "offline", "disabled"),
             f"logger.mode must be online, offline or disabled, got {cfg.logger.mode!r}{from_environment}.")
    _require(cfg.logger.init_timeout >= 0, f"logger.init_timeout must be 0 or more seconds, got {cfg.logger.init_timeout}.")
    image_size = cfg.dataset.get("image_size")
    _require(image_size is None or (isinstance(image_size, int) and image_size >= 32),
             f"dataset.image_size must be an integer of at least 32, got {image_size!r}.")
    base_size = cfg.dataset.get("base_size")
    _require(base_size is None or image_size is None or base_size >= image_size,
             f"dataset.image_size ({image_size}) cannot be larger than dataset.base_size ({base_size}), the stored size it is cropped from.")
    return cfg


def _check_builds(node: DictConfig, prefix: str) -> None:
    """A small node (a sampler) is built once now: a `_target_` changed to a class its keys do not
    fit would otherwise fail after the data is read, or a teacher trained."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__ or error
        advice = ("choose a sampler option (e.g. sampler=semihard) instead of setting sampler._target_" if prefix == "sampler"
                  else "the teacher's sampler is distance-weighted: set its keys (e.g. teacher.sampler.cutoff=0.6), not its _target_")
        raise ConfigError(f"{prefix} could not be built from its _target_ {node.get('_target_')!r} and its keys "
                          f"({str(cause).splitlines()[0]}); {advice}.") from None


def check_test_size(recall_k, test_images: int, split: str = "test") -> None:
    """Recall@K needs K other images for every query."""
    _require(max(recall_k) < test_images,
             f"eval.recall_k asks for K = {max(recall_k)} but the {split} split has only {test_images} images; "
             f"use values below {test_images}.")


# ----------------------------------------------------------------------------------------------
# before Hydra starts: every job of the command line composes

_HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc",
                     "--version", "--resolve", "-p", "--package")
# flags that choose other configs (or a run to repeat): the checks then leave the command line to Hydra
HYDRA_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")


def chooses_other_configs(argv: list[str]) -> bool:
    return any(arg.split("=", 1)[0] in HYDRA_CONFIG_FLAGS for arg in argv)


def is_multirun(argv: list[str]) -> bool:
    """Whether the command line starts a sweep: `-m`, `--multirun`, or Hydra's `hydra.mode=MULTIRUN`."""
    return bool({"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(argv))


def job_overrides(argv: list[str], config_name: str) -> list[list[str]]:
    """The overrides of every job `argv` starts: one list for a single run; for `-m`, the
    combinations of the command line's and the preset's sweeps (BasicSweeper's expansion);
    sweeps it cannot expand (an optimiser's search spaces) keep their non-swept overrides only."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [arg for arg in argv if not arg.startswith("-")]
    if not is_multirun(argv):
        return [overrides]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    swept_presets = [o.input_line for o in parsed if o.key_or_group == "preset" and o.is_sweep_override()]
    if swept_presets:  # each job would get one preset's fixed settings, and neither preset's sweep
        raise ConfigError(f"{swept_presets[0]} runs one job per preset with its fixed settings only, not the presets' "
                          f"sweeps; run one preset per command (-m preset=<name>).")
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose(fixed, config_name, with_hydra=True)
    params = base.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if isinstance(params, DictConfig) else {}
    # as BasicSweeper: the preset's params, then the command line, which replaces a param of the same key
    try:
        batches = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + parsed, None)
    except Exception:  # noqa: BLE001 - a sweeper's own syntax (interval, tag): leave those to it
        return [fixed]
    jobs = [list(job) for batch in batches for job in batch]
    return jobs or [fixed]


def check_before_start(argv: list[str], config_name: str = "train") -> None:
    """Compose every job `argv` would start (at most MAX_JOBS_CHECKED), so that a wrong type, an
    unknown key or option fails in one line before the first job runs. Value rules fail the
    command line only when every job breaks one (a value all of a sweep shares, say); a job of
    a sweep with an impossible value of its own is recorded as failed and the others run."""
    if set(argv) & set(_HYDRA_INFO_FLAGS) or chooses_other_configs(argv):
        return
    try:
        jobs = job_overrides(argv, config_name)
    except HydraException as error:  # a command line Hydra cannot parse
        raise ConfigError(_composition_error(error)) from None
    # a sweep whose job folders are named by their overrides: each name must fit the file system
    names_folders = is_multirun(argv) and any(arg.startswith("hydra.sweep.subdir=") for arg in argv)
    first_error = folder_error = None
    for number, overrides in enumerate(itertools.islice(jobs, MAX_JOBS_CHECKED)):
        composed = compose(overrides, config_name, with_hydra=names_folders)
        if names_folders:
            try:
                folder_error = folder_error or folder_name_error(str(composed.hydra.sweep.subdir), number)
            except OmegaConfBaseException:  # values only Hydra's running sweep resolves
                names_folders = False
            with open_dict(composed):
                del composed["hydra"]
        if first_error is not False:
            try:
                OmegaConf.resolve(composed)  # here, not in validate: a failure here is no value error
            except OmegaConfBaseException:  # ${hydra:...}, or an ${oc.env:...} of the job's environment
                first_error = False  # values only the job can resolve: the job checks them
                continue
            try:
                validate(composed)
                first_error = False  # one job can run: the others' value errors are theirs
            except ConfigError as error:
                first_error = first_error or error
    if first_error or folder_error:
        raise first_error or folder_error


def folder_name_error(subdir: str, number: int) -> ConfigError | None:
    """A job folder named by its overrides (`hydra.sweep.subdir=${hydra.job.override_dirname}`)
    must fit the file system's 255 bytes per name; Hydra would fail there with a traceback."""
    for name in Path(subdir).parts:
        if len(name.encode()) > 255:
            return ConfigError(f"hydra.sweep.subdir names job {number}'s folder with {len(name.encode())} characters "
                               f"({name[:40]}...), more than a file system allows (255); shorten the swept keys or "
                               f"values, or leave hydra.sweep.subdir at its default (the job's number).")
    return None
