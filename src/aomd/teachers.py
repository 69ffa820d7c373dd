"""Find, or train once, the teacher a distillation job needs.

Without `teacher.checkpoint`, the teacher of (dataset, teacher backbone, embedding size, image
size) lives at a fixed path under `paths.teachers_dir`. When it is missing and
`teacher.train_if_missing` is true it is trained first with the teacher recipe (`teacher.train`
over `train`, triplet loss, distance-weighted sampling), under a file lock, so concurrent sweep
jobs train it once and all reuse it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from aomd.config import LossSchema, teacher_train
from aomd.data import RetrievalData
from aomd.errors import ConfigError
from aomd.models import Architecture, EmbeddingNet, read_checkpoint
from aomd.models.checkpoint import check_architecture
from aomd.pipeline import build_objective, train_network
from aomd.runtime import Runtime
from aomd.tracking import read_metrics

log = logging.getLogger(__name__)

# the teacher recipe's objective and sampler (METHODS.md section 1)
TEACHER_LOSS = LossSchema(triplet_ratio=1.0, margin=0.2)
TEACHER_SAMPLER = {"_target_": "aomd.losses.DistanceWeightedNegatives"}
# dataset and train keys that change neither which images a dataset holds nor what a teacher learns
# (how and where a teacher computes is not what it learns)
_NOT_IDENTITY = {"cache_dir", "in_memory", "num_workers", "decode_workers", "pin_memory", "skip_bad_images",
                 "progress", "device", "precision", "channels_last", "compile", "deterministic"}


def teacher_architecture(cfg: DictConfig) -> Architecture:
    return Architecture(cfg.teacher.backbone, cfg.teacher.embedding_size, True)


def default_teacher_dir(cfg: DictConfig) -> Path:
    """Where the teacher for this dataset, teacher architecture, image size and recipe lives.

    The folder name says dataset, backbone, embedding size, image size and initialisation; its
    hash covers the dataset's settings (root resolved) and the whole teacher recipe, so a changed
    recipe trains a new teacher instead of reusing one trained differently.
    """
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    if dataset.get("root"):
        dataset["root"] = str(Path(dataset["root"]).expanduser().resolve())
    recipe = OmegaConf.to_container(teacher_train(cfg), resolve=True)
    identity = {
        "dataset": {k: v for k, v in dataset.items() if k not in _NOT_IDENTITY},
        "recipe": {k: v for k, v in recipe.items() if k not in _NOT_IDENTITY},
    }
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = dataset.get("_target_", "dataset").rsplit(".", 1)[-1].removeprefix("load_")
    pretrained = "imagenet" if cfg.teacher.pretrained else "scratch"
    t = cfg.teacher
    return Path(cfg.paths.teachers_dir).expanduser() / (
        f"{name}-{digest}-{t.backbone}-{t.embedding_size}-{cfg.dataset.image_size}px-{pretrained}"
    )


def teacher_job_config(cfg: DictConfig) -> DictConfig:
    """The config of the job that trains the teacher: the student's, with the teacher recipe."""
    teacher_cfg = OmegaConf.merge(cfg, {
        "backbone": {"name": cfg.teacher.backbone, "pretrained": cfg.teacher.pretrained},
        "embedding_size": cfg.teacher.embedding_size,
        "l2normalize": True,
        "train": teacher_train(cfg),
    })
    teacher_cfg.loss = TEACHER_LOSS
    teacher_cfg.sampler = TEACHER_SAMPLER
    return teacher_cfg


def train_teacher(cfg: DictConfig, data: RetrievalData, out_dir: Path, runtime: Runtime) -> None:
    """Train the teacher with the teacher recipe; its checkpoints land in `out_dir/checkpoints`."""
    teacher_cfg = teacher_job_config(cfg)
    log.info("Training the teacher %s-%d on %s into %s (once; later jobs reuse it).",
             cfg.teacher.backbone, cfg.teacher.embedding_size, data.name, out_dir)
    runtime.seed_everything(teacher_cfg.train.seed)
    model = EmbeddingNet(cfg.teacher.backbone, cfg.teacher.embedding_size, True, cfg.teacher.pretrained)
    objective = build_objective(teacher_cfg, model, None)
    OmegaConf.save(teacher_cfg, out_dir / "config.yaml")
    train_network(teacher_cfg, data, model, objective, runtime, out_dir, "teacher",
        run_name=f"teacher-{cfg.teacher.backbone}-{cfg.teacher.embedding_size}", tags=["teacher", data.name],
                  # an untrained network is no teacher: its BatchNorm statistics are those of its
                  # initialisation, and its features blow up in eval mode
                  best_from_epoch=1)


def teacher_checkpoint(cfg: DictConfig, data: RetrievalData, runtime: Runtime) -> Path:
    """Path of the teacher's best checkpoint, training the teacher first if needed and allowed."""
    if cfg.teacher.checkpoint:
        return Path(cfg.teacher.checkpoint).expanduser()
    out_dir = default_teacher_dir(cfg)
    path = out_dir / "checkpoints" / "best.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        finished = (read_metrics(out_dir) or {}).get("status") == "finished"
        if not (finished and path.is_file()):  # absent, or an interrupted training: (re)train
            if not cfg.teacher.train_if_missing:
                raise ConfigError(f"No teacher at {path} and teacher.train_if_missing=false; pass teacher.checkpoint=<path> or allow training it.")
            train_teacher(cfg, data, out_dir, runtime)
    return path


def load_teacher(cfg: DictConfig, teacher: EmbeddingNet, data: RetrievalData, runtime: Runtime) -> Path:
    """Load the teacher's weights into `teacher` (built from the config), frozen, in eval mode and
    on the job's device; return the checkpoint path."""
    path = teacher_checkpoint(cfg, data, runtime)
    payload = read_checkpoint(path)
    check_architecture(payload, teacher_architecture(cfg), "teacher", path)
    teacher.load_state_dict(payload["model"])
    runtime.prepare_network(teacher).eval().requires_grad_(False)
    return path
