"""Runs a training job from its built parts: fit, track, summarise (a student's or a teacher's)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from aomd.data import RetrievalData
from aomd import preemption
from aomd.engine import fit, settle_next_best
from aomd.losses.objective import Objective
from aomd.metrics import selection_metric
from aomd.models import EmbeddingNet
from aomd.resume import Identity, current_identity, read_state
from aomd.runtime import Runtime
from aomd.schema import EvalSchema, TrainSchema
from aomd.tracking import RunInfo, Tracker

log = logging.getLogger(__name__)


def train_network(data: RetrievalData, model: EmbeddingNet, objective: Objective, runtime: Runtime,
                  recipe: TrainSchema, eval_spec: EvalSchema, out_dir: Path, job_type: str, run: RunInfo,
                  teacher: EmbeddingNet | None = None, teacher_metrics: dict | None = None,
                  best_from_epoch: int = 0, identity: Identity = "", resume_from: Path | None = None,
                  run_id: str | None = None) -> dict[str, Any]:
    """Fit `model` with `recipe` on `runtime` and track the job (job record, W&B run, console
    table); the best record. With `resume_from` (a `last.pt` of the job `identity`) the job
    continues where it stopped, in the same W&B run; `run_id` is the W&B run of an earlier start
    of this job that wrote no last.pt, which the job starts again in."""
    state = read_state(resume_from, identity) if resume_from is not None else None
    started_from = None  # the last.pt of another folder this run started from (train.resume=<folder>)
    if state is not None:
        settle_next_best(resume_from.parent, state)  # the run continued may have been killed as its best.pt changed
        copy_best_checkpoint(resume_from.parent / "best.pt", out_dir / "checkpoints" / "best.pt")
        own = resume_from.resolve() == (out_dir / "checkpoints" / "last.pt").resolve()
        started_from = state["training"].get("started_from") if own else str(resume_from.resolve())
    selection = {"select": eval_spec.select, "metric": selection_metric(eval_spec.recall_k, eval_spec.select)}
    tracker = Tracker(run, out_dir, job_type, data.summary(), runtime.describe(), selection,
                      resume_id=(state or {}).get("training", {}).get("wandb_run_id") or run_id)
    try:
        if teacher_metrics is not None:
            tracker.log_teacher(teacher_metrics)
        best = fit(model, objective, data, recipe, eval_spec, runtime, out_dir, tracker.log_epoch, teacher,
                   best_from_epoch, identity=current_identity(identity), resume=state, on_restore=tracker.restore,
                   # started_from: run again here, the job goes on from its own last.pt (resume.own_unfinished_run)
                   checkpoint_extra={"wandb_run_id": tracker.run_id, "started_from": started_from})
    except (SystemExit, KeyboardInterrupt) as stop:  # a signal (preemption, time limit, Ctrl-C): resumable
        tracker.interrupt(preemption.last_stop or f"stopped by {type(stop).__name__}")
        raise
    except BaseException as error:
        tracker.fail(error)
        raise
    tracker.finish()
    warning = untrained_selection(best, recipe.epochs, selection["metric"])
    if warning:
        log.warning(warning)
    print(f"\n{job_type} {model.architecture.backbone}-{model.architecture.embedding_size} on {data.name} "
          f"(Recall@K and MAP@R in %, * = best epoch, selected by {selection['metric']}):\n{tracker.summary_table()}\n", flush=True)
    return best


def untrained_selection(best: dict[str, Any] | None, epochs: int, metric: str) -> str | None:
    """A warning when a job that trained selected epoch 0, the network before training: its
    best.pt and reported results are then those of the untrained network (a short pilot run)."""
    if epochs == 0 or not best or best.get("epoch") != 0:
        return None
    return (f"The selected epoch is 0, the network before training: no trained epoch beat its {metric}, so best.pt and "
            f"the reported results are the untrained network's; train longer (train.epochs, train.iters_per_epoch) or "
            f"check train.lr.")


def copy_best_checkpoint(source: Path, target: Path) -> None:
    """A run continued in another folder (`train.resume=<run folder>`) starts with the best.pt of
    the run it continues: the engine writes best.pt only when an epoch beats the restored best."""
    if source.is_file() and not (target.is_file() and source.samefile(target)):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
