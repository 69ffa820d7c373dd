"""Find, or train once, the teacher a distillation job needs.

Without `teacher.checkpoint`, the teacher of (dataset, teacher backbone, embedding size, image
size) lives at a fixed path under `paths.teachers_dir`. When it is missing and
`teacher.train_if_missing` is true it is trained first with the teacher recipe (`teacher.train`
over `train`), objective (`teacher.loss`: triplet) and sampler (`teacher.sampler`:
distance-weighted), under a file lock, so concurrent sweep jobs train it once and all reuse it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from aomd import resume
from aomd.build import build_objective
from aomd.config import schedule_warning
from aomd.data import RetrievalData
from aomd.errors import ConfigError, UserError, cannot_write
from aomd.jobs import train_network
from aomd.models import Architecture, EmbeddingNet, read_checkpoint
from aomd.models.checkpoint import CheckpointError, check_architecture
from aomd.records import content_digest, finished_record, read_record, unfinished_run_id
from aomd.runtime import Runtime
from aomd.tracking import RunInfo

log = logging.getLogger(__name__)


class TeacherTrainingFailed(UserError):
    """The managed teacher's training stopped on bad input (a diverged loss, device memory)."""


def teacher_architecture(cfg: DictConfig) -> Architecture:
    return Architecture(cfg.teacher.backbone, cfg.teacher.embedding_size, True)


def default_teacher_dir(cfg: DictConfig, files_digest: str = "") -> Path:
    """Where the teacher for this dataset, teacher architecture, image size and recipe lives.

    The folder name says dataset, backbone, embedding size, image size and initialisation; its
    hash covers the dataset's settings (root resolved), the files it was read from
    (`files_digest`, `RetrievalData.files_digest`) and the whole teacher recipe, so a changed
    recipe, or other files under the same root, trains a new teacher instead of reusing one trained
    differently: with class folders added under `dataset.root`, the split moves, and a teacher
    trained before could have learnt today's test classes.
    """
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    if dataset.get("root"):
        dataset["root"] = str(Path(dataset["root"]).expanduser().resolve())
    recipe = OmegaConf.to_container(teacher_recipe(cfg), resolve=True)
    # the teacher's objective and sampler are part of what it learns
    recipe.update(loss=OmegaConf.to_container(cfg.teacher.loss, resolve=True),
                  sampler=OmegaConf.to_container(cfg.teacher.sampler, resolve=True))
    identity = {
        "dataset": dataset,   # content_digest leaves out how and where it computes (records.NOT_CONTENT_KEYS)
        "recipe": recipe,
    }
    if files_digest:
        identity["files"] = files_digest
    if cfg.eval.select != "test":  # held-out classes change what the teacher trains on and how it is chosen
        identity["selection"] = {"select": cfg.eval.select, "val_classes": cfg.eval.val_classes}
    digest = content_digest(identity)[:8]
    name = dataset.get("_target_", "dataset").rsplit(".", 1)[-1].removeprefix("load_")
    pretrained = "imagenet" if cfg.teacher.pretrained else "scratch"
    t = cfg.teacher
    return Path(cfg.paths.teachers_dir).expanduser() / (
        f"{name}-{digest}-{t.backbone}-{t.embedding_size}-{cfg.dataset.image_size}px-{pretrained}"
    )


def teacher_recipe(cfg: DictConfig) -> DictConfig:
    """The teacher's training recipe: `teacher.train` (the keys it sets) merged over `train`."""
    return OmegaConf.merge(cfg.train, {k: v for k, v in cfg.teacher.train.items() if v is not None})


def train_teacher(cfg: DictConfig, data: RetrievalData, out_dir: Path, runtime: Runtime) -> None:
    """Train the teacher with its recipe, objective and sampler (the `teacher` node); its
    checkpoints land in `out_dir/checkpoints`."""
    teacher = cfg.teacher
    recipe = teacher_recipe(cfg)
    log.info("Training the teacher %s-%d on %s into %s (once; later jobs reuse it).",
             teacher.backbone, teacher.embedding_size, data.name, out_dir)
    warning = schedule_warning(recipe, "teacher.train")
    if warning:
        log.warning(warning)
    resume_from = resume.source("auto", out_dir)
    runtime.seed_everything(recipe.seed)
    # a resumed training's last.pt holds the whole network: no ImageNet weights to load (or download) first
    model = EmbeddingNet(teacher.backbone, teacher.embedding_size, True, teacher.pretrained and resume_from is None)
    objective = build_objective(teacher.loss, teacher.sampler, model, None, cfg.dataset.image_size)
    OmegaConf.save(teacher, out_dir / "config.yaml")
    # the recipe that runs, not teacher.train's keys (null where they follow train)
    config = {"teacher": {k: v for k, v in OmegaConf.to_container(teacher, resolve=True).items() if k != "train"},
              "train": OmegaConf.to_container(recipe, resolve=True),
              "dataset": OmegaConf.to_container(cfg.dataset, resolve=True)}
    run_id = None if resume_from else unfinished_run_id(read_record(out_dir))
    if resume_from is None:  # a teacher killed before its first last.pt: its earlier W&B folder goes
        resume.forget_earlier_run(out_dir, its_own=True, run_id=run_id)
    train_network(data, model, objective, runtime, OmegaConf.to_object(recipe), OmegaConf.to_object(cfg.eval), out_dir,
                  "teacher", RunInfo(cfg.logger, config, f"teacher-{teacher.backbone}-{teacher.embedding_size}",
                                     ["teacher", data.name]),
                  # an untrained network is no teacher: its BatchNorm statistics are those of its
                  # initialisation, and its features blow up in eval mode
                  best_from_epoch=1,
                  # a teacher training that was killed continues where it stopped
                  identity=f"teacher-{out_dir.name}", resume_from=resume_from,
                  run_id=run_id)


def teacher_checkpoint(cfg: DictConfig, data: RetrievalData, runtime: Runtime) -> Path:
    """Path of the teacher's best checkpoint, training the teacher first if needed and allowed."""
    if cfg.teacher.checkpoint:
        return Path(cfg.teacher.checkpoint).expanduser()
    out_dir = default_teacher_dir(cfg, data.files_digest)
    path = out_dir / "checkpoints" / "best.pt"
    if finished_teacher(out_dir):  # read without the lock: a group's shared teachers' folder may be read-only
        return path
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out_dir) + ".lock", mode=0o666)  # a lock file the group's other users can take too
        lock.acquire()
    except OSError as error:
        if not cannot_write(error):
            raise
        raise ConfigError(f"Cannot train the teacher in {out_dir.parent} ({error.strerror}); point paths.teachers_dir "
                          f"to a folder this user can write, or pass teacher.checkpoint=<path>.") from error
    try:
        if not finished_teacher(out_dir):  # absent, or an interrupted training: (re)train
            earlier = earlier_version_teacher(cfg, data.files_digest)
            hint = (f" A teacher that an earlier version trained without recording the dataset's files is at "
                    f"{earlier}: pass teacher.checkpoint={earlier} to use it if the files under dataset.root "
                    f"have not changed since." if earlier else "")
            if not cfg.teacher.train_if_missing:
                raise ConfigError(f"No teacher at {path} and teacher.train_if_missing=false; pass "
                                  f"teacher.checkpoint=<path> or allow training it.{hint}")
            if earlier:
                log.warning("Training a new teacher into %s.%s", out_dir, hint)
            try:
                train_teacher(cfg, data, out_dir, runtime)
            except UserError as error:  # its message names train.* keys: the teacher's are teacher.train.*
                raise TeacherTrainingFailed(f"Training the teacher into {out_dir} failed: {str(error).removesuffix('.')} "
                                            f"(the teacher's recipe is teacher.train.*, whose null keys follow train.*).") from error
    finally:
        lock.release()
    return path


def finished_teacher(folder: Path) -> Path | None:
    """The best.pt of the teacher whose training in `folder` ended, if there is one."""
    path = folder / "checkpoints" / "best.pt"
    return path if finished_record(folder) and path.is_file() else None


def earlier_version_teacher(cfg: DictConfig, files_digest: str) -> Path | None:
    """The best.pt of a finished teacher for this configuration in the folder versions before
    `files_digest` joined the teacher's identity gave it, if there is one: it may have been
    trained on other files, so it is named to the user, never used unasked."""
    return finished_teacher(default_teacher_dir(cfg)) if files_digest else None


def check_given_teacher(cfg: DictConfig) -> None:
    """Raise a clear error, before any data is read, when `teacher.checkpoint` is set but is not a
    checkpoint of the configured teacher architecture."""
    if not cfg.teacher.checkpoint:
        return
    path = Path(cfg.teacher.checkpoint).expanduser()
    try:
        payload = read_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"teacher.checkpoint: {error}") from None
    check_architecture(payload, teacher_architecture(cfg), "teacher", path)


def load_teacher(cfg: DictConfig, teacher: EmbeddingNet, data: RetrievalData, runtime: Runtime) -> Path:
    """Load the teacher's weights into `teacher` (built from the config), frozen, in eval mode and
    on the job's device; return the checkpoint path."""
    path = teacher_checkpoint(cfg, data, runtime)
    payload = read_checkpoint(path)
    check_architecture(payload, teacher_architecture(cfg), "teacher", path)
    teacher.load_state_dict(payload["model"])
    runtime.place(teacher).eval().requires_grad_(False)  # compiled (train.compile) by the training loop, for its steps
    return path


def teacher_warnings(path: Path, teacher_metrics: dict[str, float], metric: str = "recall@1") -> list[str]:
    """Why a distillation job's teacher may not be worth distilling: it was selected at epoch 0
    (never trained), or its test `metric` is below its untrained network's (its own job record,
    next to the checkpoint, holds epoch 0)."""
    warnings = []
    epoch = (read_checkpoint(path).get("metrics") or {}).get("epoch")
    if epoch == 0:
        warnings.append(f"The teacher {path} is its epoch 0, an untrained network; train it longer or choose another "
                        f"teacher.checkpoint.")
    history = (read_record(Path(path).parent.parent) or {}).get("history") or []
    untrained = history[0].get(metric) if history and history[0].get("epoch") == 0 else None
    if untrained is not None and metric in teacher_metrics and teacher_metrics[metric] < untrained:
        warnings.append(f"The teacher {path} has a test {metric} of {100 * teacher_metrics[metric]:.2f}, below its "
                        f"untrained network's {100 * untrained:.2f}: distilling it can only mislead the student; "
                        f"train it longer or with another recipe (teacher.train.*).")
    return warnings
