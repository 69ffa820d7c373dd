"""Train an embedding network: `python -m aomd.train [group=option ...] [key=value ...]`.

Validates the composed config, builds the student (and the teacher a distillation loss needs),
trains and evaluates; returns the best test Recall@1 so Hydra sweepers can optimise it.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from aomd.cli import check_group_options, in_multirun, run_task
from aomd.config import config_dir, validate
from aomd.engine import evaluate, resolve_device
from aomd.losses.objective import Objective
from aomd.pipeline import build_network, build_objective, load_data, seed_everything, train_network
from aomd.teachers import load_teacher
from aomd.tracking import read_metrics

log = logging.getLogger(__name__)


def job_identity(cfg: DictConfig) -> tuple[str | None, list[str]]:
    """W&B run name (what this sweep job overrides, seeds excluded) and tags (loss, mode, dataset)."""
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    tags = [f"loss:{choices.get('loss')}", f"dataset:{choices.get('dataset')}"]
    if float(cfg.loss.get("aomd_ratio", 0) or 0):
        tags.append(f"mode:{cfg.loss.mode}")
    name = hydra_cfg.job.override_dirname or None
    return name, tags


def train(cfg: DictConfig) -> float:
    cfg = validate(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if in_multirun() and cfg.skip_finished:
        previous = read_metrics(out_dir)
        if previous and previous.get("status") == "finished":
            log.info("Skipping %s: its metrics.json says finished (skip_finished=false reruns it).", out_dir)
            return previous["best"][f"recall@{min(cfg.eval.recall_k)}"]
    if in_multirun() and cfg.logger.group is None:
        cfg.logger.group = "-".join(Path(HydraConfig.get().sweep.dir).parts[-2:])

    seed_everything(cfg.train.seed)
    student = build_network(cfg.backbone.name, cfg.embedding_size, cfg.l2normalize, cfg.backbone.pretrained)
    teacher = None
    if Objective.distils(cfg.loss):
        # built without weights now for its shapes; the weights are loaded (or trained) below
        teacher = build_network(cfg.teacher.backbone, cfg.teacher.embedding_size, True, False)
    objective = build_objective(cfg, student, teacher)
    data = load_data(cfg)

    teacher_metrics = None
    if teacher is not None:
        path = load_teacher(cfg, teacher, data)
        log.info("Teacher: %s", path)
        teacher_metrics = evaluate(teacher, data.test, data.image_size, cfg.eval, resolve_device(cfg.train.device),
                                   cfg.train.num_workers, cfg.train.progress)
    run_name, tags = job_identity(cfg)
    best = train_network(cfg, data, student, objective, out_dir, "student", teacher, teacher_metrics, run_name, tags)
    return best[f"recall@{min(cfg.eval.recall_k)}"]


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_task(train, cfg, "aomd.train")


if __name__ == "__main__":
    check_group_options(sys.argv[1:], config_dir(), "aomd.train")
    main()
