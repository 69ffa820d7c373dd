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
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from aomd.cli import check_group_options, in_multirun, run_task
from aomd.config import config_dir, selection_metric, validate
from aomd.engine import evaluate
from aomd.losses.objective import Objective
from aomd.models import EmbeddingNet
from aomd.pipeline import build_objective, load_data, train_network
from aomd.runtime import Runtime
from aomd.teachers import load_teacher
from aomd.tracking import read_metrics

log = logging.getLogger(__name__)


def swept_keys() -> set[str]:
    """The keys a sweep varies: the sweeper's params and the sweep's `key=a,b` overrides."""
    hydra_cfg = HydraConfig.get()
    keys = set((hydra_cfg.sweeper.get("params") or {}).keys())
    multirun = Path(hydra_cfg.sweep.dir) / "multirun.yaml"  # written by the sweeper before any job
    if multirun.is_file():
        overrides = OverridesParser.create().parse_overrides(list(OmegaConf.load(multirun).hydra.overrides.task))
        keys.update(o.get_key_element() for o in overrides if o.is_sweep_override())
    return {key.lstrip("+~") for key in keys}


def job_identity(cfg: DictConfig) -> tuple[str | None, list[str]]:
    """W&B run name and tags. In a sweep the name is what this job sets of what the sweep varies
    (seeds excluded, so the seeds of one configuration share a name); elsewhere it is the
    command line's overrides. Tags carry the loss, the AOMD mode and the dataset."""
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    tags = [f"loss:{choices.get('loss')}", f"dataset:{choices.get('dataset')}"]
    if float(cfg.loss.get("aomd_ratio", 0) or 0):
        tags.append(f"mode:{cfg.loss.mode}")
    if not in_multirun():
        return hydra_cfg.job.override_dirname or None, tags
    varied = swept_keys() - {"train.seed"}
    parts = [o.lstrip("+~") for o in hydra_cfg.overrides.task if o.partition("=")[0].lstrip("+~") in varied]
    return " ".join(parts) or f"loss={choices.get('loss')}", tags


def train(cfg: DictConfig) -> float:
    cfg = validate(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    hydra_cfg = HydraConfig.get()
    # what defines the job's result: its overrides less those that do not change it (logging, launcher)
    ignored = set(hydra_cfg.job.config.override_dirname.exclude_keys) - {"train.seed"}
    overrides = [o for o in hydra_cfg.overrides.task if o.partition("=")[0].lstrip("+~") not in ignored]
    if in_multirun() and cfg.skip_finished:
        previous = read_metrics(out_dir)
        # the same job folder can hold another configuration when a sweep is rerun with other values
        if previous and previous.get("status") == "finished" and previous.get("overrides") == overrides:
            log.info("Skipping %s: its metrics.json says finished (skip_finished=false reruns it).", out_dir)
            return previous["best"][selection_metric(cfg.eval)]
    if in_multirun() and cfg.logger.group is None:
        cfg.logger.group = "-".join(Path(HydraConfig.get().sweep.dir).parts[-2:])

    runtime = Runtime.from_train(cfg.train)  # the job's one device and precision, checked before any work
    data = load_data(cfg)  # before the networks: a wrong dataset.root is reported before any weight download
    runtime.seed_everything(cfg.train.seed)
    student = EmbeddingNet(cfg.backbone.name, cfg.embedding_size, cfg.l2normalize, cfg.backbone.pretrained)
    teacher = None
    if Objective.distils(cfg.loss):
        # built without weights now for its shapes; the weights are loaded (or trained) below
        teacher = EmbeddingNet(cfg.teacher.backbone, cfg.teacher.embedding_size, True, False)
    objective = build_objective(cfg, student, teacher)

    teacher_metrics = None
    if teacher is not None:
        path = load_teacher(cfg, teacher, data, runtime)
        log.info("Teacher: %s", path)
        teacher_metrics = evaluate(teacher, data.test, data.image_size, cfg.eval, runtime, cfg.train.progress)
    run_name, tags = job_identity(cfg)
    best = train_network(cfg, data, student, objective, runtime, out_dir, "student", teacher, teacher_metrics,
                         run_name, tags, overrides)
    return best[selection_metric(cfg.eval)]


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_task(train, cfg, "aomd.train")


if __name__ == "__main__":
    check_group_options(sys.argv[1:], config_dir(), "aomd.train")
    main()
