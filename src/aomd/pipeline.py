"""Builds the parts of a training job from a validated config and runs it (student or teacher)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from aomd.config import check_test_size
from aomd.data import RetrievalData
from aomd.engine import fit
from aomd.errors import ConfigError, UserError
from aomd.losses.objective import NetworkShape, Objective
from aomd.models import EmbeddingNet
from aomd.runtime import Runtime
from aomd.tracking import Tracker

log = logging.getLogger(__name__)


def build(node: DictConfig, what: str, **objects: Any) -> Any:
    """Instantiate a config group's `_target_` with `objects` (built Python objects) as extra
    arguments; a user's mistake in the group's keys is reported as a ConfigError."""
    try:
        # partial first: Hydra would turn the extra objects into configs if passed to instantiate
        factory = instantiate(node, _partial_=True, _convert_="all")
    except InstantiationException as error:
        raise ConfigError(f"The {what} config could not be built: {_first_line(error.__cause__ or error)}") from None
    try:
        return factory(**objects)
    except UserError:
        raise
    except (TypeError, ValueError) as error:  # unknown keys, impossible values
        raise ConfigError(f"The {what} config could not be built: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0]


def network_shape(model: EmbeddingNet, image_size: int) -> NetworkShape:
    return NetworkShape(tuple(model.stage_channels(image_size)), model.architecture.embedding_size)


def build_objective(cfg: DictConfig, student: EmbeddingNet, teacher: EmbeddingNet | None) -> Objective:
    """The `loss` group's Objective, with the `sampler` group's negative sampler."""
    image_size = cfg.dataset.image_size
    return build(
        cfg.loss, "loss",
        sampler=build(cfg.sampler, "sampler"),
        student=network_shape(student, image_size),
        teacher=None if teacher is None else network_shape(teacher, image_size),
    )


def load_data(cfg: DictConfig) -> RetrievalData:
    """The `dataset` group's data, with the test split checked against `eval.recall_k`."""
    data = build(cfg.dataset, "dataset")
    summary = data.summary()
    log.info("%s: %d train images of %d classes, %d test images of %d classes", data.name,
             summary["train_images"], summary["train_classes"], summary["test_images"], summary["test_classes"])
    if summary["train_images"] < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) is larger than the {data.name} train split "
                          f"({summary['train_images']} images); use a smaller batch.")
    if summary["train_classes"] < 2:
        raise ConfigError(f"The {data.name} train split has {summary['train_images']} images of "
                          f"{summary['train_classes']} classes; training needs at least 2 classes, check dataset.root and the dataset settings.")
    check_test_size(cfg.eval.recall_k, summary["test_images"])
    return data


def train_network(cfg: DictConfig, data: RetrievalData, model: EmbeddingNet, objective: Objective, runtime: Runtime,
                  out_dir: Path, job_type: str, teacher: EmbeddingNet | None = None, teacher_metrics: dict | None = None,
                  run_name: str | None = None, tags: list[str] | None = None,
                  overrides: list[str] | None = None, best_from_epoch: int = 0) -> dict[str, Any]:
    """Fit `model` on `runtime` and track the job (W&B run, metrics.json, console table); the best record."""
    tracker = Tracker(cfg, out_dir, job_type, data.summary(), run_name, tags, overrides, runtime.describe())
    try:
        if teacher_metrics is not None:
            tracker.log_teacher(teacher_metrics)
        best = fit(model, objective, data, cfg, runtime, out_dir, tracker.log_epoch, teacher, best_from_epoch)
    except BaseException as error:
        tracker.finish("failed", error=f"{type(error).__name__}: {error}")
        raise
    tracker.finish("finished")
    print(f"\n{job_type} {model.architecture.backbone}-{model.architecture.embedding_size} on {data.name} "
          f"(Recall@K and MAP@R in %, * = best):\n{tracker.summary_table()}\n", flush=True)
    return best
