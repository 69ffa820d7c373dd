"""Train an embedding network: `python -m aomd.train [group=option ...] [key=value ...]`.

Composes the parts of a job from the validated config (the student, the teacher a distillation
loss needs, the objective, the data, the runtime), trains and evaluates; returns the selected
epoch's Recall@1 (test, or validation with eval.select=val) so Hydra sweepers can optimise it.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from aomd.build import build_objective, load_data
from aomd.cli import in_multirun, run_task, start
from aomd.config import config_dir, schedule_warning, validate
from aomd.engine import evaluate
from aomd.jobs import train_network
from aomd.losses.terms import distils
from aomd.metrics import selection_metric
from aomd.models import EmbeddingNet
from aomd import preemption, resume
from aomd.records import (NOT_IDENTITY_KEYS, claim_record, content_digest, finished_by_this_slurm_job, finished_record,
                          is_record_of, read_record, record_failure, record_interruption, unfinished_run_id)
from aomd.runtime import Runtime
from aomd.teachers import check_given_teacher, load_teacher, teacher_warnings
from aomd.tracking import RunInfo, run_name, swept_keys

log = logging.getLogger(__name__)


def run_info(cfg: DictConfig) -> RunInfo:
    """The job's W&B run: in a sweep its name is what this job sets of what the sweep varies;
    elsewhere the command line's identifying overrides (seeds excluded). Tags carry the loss,
    the AOMD mode and the dataset; the config, every key and the option of each group
    (`choices.loss`, `choices.dataset`, ...)."""
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    tags = [f"loss:{choices.get('loss')}", f"dataset:{choices.get('dataset')}"]
    if float(cfg.loss.get("aomd_ratio", 0) or 0):
        tags.append(f"mode:{cfg.loss.mode}")
    overrides = list(hydra_cfg.overrides.task)
    if in_multirun():
        swept = swept_keys(Path(hydra_cfg.sweep.dir), hydra_cfg.sweeper.get("params"))
        name = run_name(overrides, swept) or f"loss={choices.get('loss')}"
    else:
        name = run_name(overrides)
    # the options chosen of each group as config columns too: W&B groups runs by config, not by tags
    chosen = {group: option for group, option in choices.items()
              if option is not None and "/" not in group and group not in ("hydra", "schema")}
    return RunInfo(cfg.logger, {**OmegaConf.to_container(cfg, resolve=True), "choices": chosen}, name, tags, overrides)


def job_identity(cfg: DictConfig, evaluation_sizes_identify: bool = False) -> str:
    """What a resumed `last.pt` must have been written by: this student's network, objective,
    sampler, recipe, data, selection and teacher. The evaluation's keys that do not identify a
    job (`aomd.records.NOT_IDENTITY_KEYS`) are left out, unless `evaluation_sizes_identify` (the
    rule of aomd 0.1.0 before the evaluation's batch and chunk sizes stopped identifying a job)."""
    parts = {key: OmegaConf.to_container(cfg[key], resolve=True)
             for key in ("backbone", "loss", "sampler", "train", "dataset", "eval", "teacher")}
    if not evaluation_sizes_identify:
        for key in NOT_IDENTITY_KEYS:
            if key.startswith("eval."):
                parts["eval"].pop(key.removeprefix("eval."), None)
    return "student-" + content_digest({**parts, "embedding_size": cfg.embedding_size, "l2normalize": cfg.l2normalize})


def job_identities(cfg: DictConfig) -> tuple[str, ...]:
    """The job's identity, then the one it had under the earlier rule, so that a run saved before
    (a SLURM job requeued across an upgrade) continues."""
    return job_identity(cfg), job_identity(cfg, evaluation_sizes_identify=True)


def train(cfg: DictConfig) -> float:
    cfg = validate(cfg)
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    metric = selection_metric(cfg.eval.recall_k, cfg.eval.select)
    overrides = list(hydra_cfg.overrides.task)
    if not in_multirun() and hydra_cfg.runtime.choices.get("preset"):
        log.warning("preset=%s is a sweep, and without -m this runs one job with its fixed settings only; add -m to run "
                    "the sweep.", hydra_cfg.runtime.choices.get("preset"))
    previous = finished_record(out_dir, overrides)
    # a SLURM job requeued after it finished this job (the time limit's signal came as it ended)
    # is done, even where skip_finished=false or train.resume=never asked to run it again
    requeued_when_done = finished_by_this_slurm_job(previous)
    if previous and (requeued_when_done or in_multirun() and cfg.skip_finished or
                     not in_multirun() and cfg.train.resume == "auto"):
        log.info("Skipping %s: its metrics.json says finished (%s).", out_dir,
                 "by this SLURM job, before it was requeued" if requeued_when_done else
                 "skip_finished=false reruns it" if in_multirun() else "train.resume=never trains it again")
        return previous["best"][metric]
    identity = job_identities(cfg)
    resume_from = resume.job_source(cfg.train.resume, out_dir, overrides, identity, sweep_job=in_multirun())
    if in_multirun() and cfg.logger.group is None:
        cfg.logger.group = "-".join(Path(hydra_cfg.sweep.dir).parts[-2:])

    runtime = Runtime.from_train(cfg.train)  # the job's one device and precision, checked before any work
    if distils(cfg.loss):
        check_given_teacher(cfg)
    warning = schedule_warning(cfg.train)  # the teacher's recipe is warned of where it trains (aomd.teachers)
    if warning:
        log.warning(warning)
    # the data before the networks: a wrong dataset.root is reported before any weight download
    data = load_data(cfg.dataset, cfg.train.batch_size, cfg.eval)
    # after the checks of bad input, which leave the folder as it was
    earlier = read_record(out_dir)
    earlier_run = unfinished_run_id(earlier, overrides)  # an earlier start of this job that wrote no last.pt
    run_id = earlier_run if cfg.train.resume == "auto" else None  # which the job starts again in
    claim_record(out_dir, overrides, continues=resume_from is not None, run_id=run_id)
    try:
        if resume_from is None:
            # a folder without a record of this job holds another job's last.pt (or none): its W&B files stay
            resume.forget_earlier_run(out_dir, its_own=earlier is not None and is_record_of(earlier, overrides),
                                      run_id=earlier_run)
        runtime.seed_everything(cfg.train.seed)
        # a resumed job's last.pt holds the whole network: no ImageNet weights to load (or download) first
        student = EmbeddingNet(cfg.backbone.name, cfg.embedding_size, cfg.l2normalize,
                               cfg.backbone.pretrained and resume_from is None)
        teacher = None
        if distils(cfg.loss):
            # built without weights now for its shapes; the weights are loaded (or trained) below
            teacher = EmbeddingNet(cfg.teacher.backbone, cfg.teacher.embedding_size, True, False)
        objective = build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)

        teacher_metrics = None
        if teacher is not None:
            try:
                path = load_teacher(cfg, teacher, data, runtime)
            except (SystemExit, KeyboardInterrupt):  # stopped by a signal while the teacher trained
                record_interruption(out_dir, f"{preemption.last_stop or 'stopped'} (training its teacher)")
                raise
            log.info("Teacher: %s", path)
            teacher_metrics = evaluate(teacher, data.test, data.image_size, cfg.eval, runtime, cfg.train.progress)
            for warning in teacher_warnings(path, teacher_metrics, selection_metric(cfg.eval.recall_k)):
                log.warning(warning)
        best = train_network(data, student, objective, runtime, OmegaConf.to_object(cfg.train), OmegaConf.to_object(cfg.eval),
                             out_dir, "student", run_info(cfg), teacher, teacher_metrics,
                             identity=identity, resume_from=resume_from, run_id=run_id)
        return best[metric]
    except Exception as error:
        # the tracker records a failure once training started, and a sweep's every failure; a
        # single run's earlier failure (its teacher, its objective) would leave "running" for good
        record_failure(out_dir, error, overrides)
        raise
    except (SystemExit, KeyboardInterrupt):  # Ctrl-C or a signal before the tracker's own record
        record_interruption(out_dir, preemption.last_stop or "stopped before its training started")
        raise


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run_task(train, cfg, "aomd.train")


if __name__ == "__main__":
    start(sys.argv[1:], "train", "aomd.train")
    main()
