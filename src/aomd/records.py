"""The job record: `metrics.json` in a job's directory, and the rule of what identifies a job.

metrics.json::

    {"status": "running" | "finished" | "failed" | "interrupted",
     "job_type": "student" | "teacher",
     "overrides": the job's command-line overrides that identify it (`identity_overrides`),
     "runtime": the resolved device and precision (aomd.runtime.Runtime.describe),
     "selection": {"select": "test" | "last" | "val", "metric": what chose `best`, e.g. "val/recall@1"},
     "best": the selected epoch's record, "last": the last epoch's record,
     "history": [record, ...] (one per evaluated epoch),
     "dataset": {"train_images", "test_images", "train_classes", "test_classes"},
     "teacher": the teacher's test metrics (distillation only),
     "wandb_run_id": the job's W&B run, written when it starts (a job run again before its first
                     last.pt was written continues this run instead of adding a second),
     "slurm_job_id": the SLURM job that ran it ($SLURM_JOB_ID; null elsewhere): a requeue of that
                     job skips the job it finished,
     "error": "Type: message" (failed jobs), or why it stopped (interrupted jobs)}

"interrupted": the job was asked to stop by a signal (SLURM preemption or time limit, `kill`,
Ctrl-C) and saved its state in `checkpoints/last.pt`; running the same job again continues it.

where a record holds "epoch", the test split's "recall@K", "map@r", "r_precision" (with
eval.select=val also the validation split's, as "val/recall@K", ...), and for trained epochs the
mean training "loss", each term's "loss/<term>", the epoch's "lr", "epoch_seconds" and
"images_per_second".
It is rewritten atomically after every epoch, so an unfinished job shows its progress. This
module alone writes and reads it: the tracker, the failure path of a sweep, skip-finished, the
managed teachers and the sweep report.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

METRICS_FILE = "metrics.json"
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
RETRIEVAL_KEYS = ("recall@", "map@", "r_precision")  # the prefixes of the test metrics in a record
TRAINING_SPEED_KEYS = ("epoch_seconds", "images_per_second")
TRAINING_KEYS = ("lr", *TRAINING_SPEED_KEYS)  # logged under train/ with the losses
VALIDATION_PREFIX = "val/"

# What identifies a job: its overrides, less those that change neither its data nor what it
# learns (logging, launching, skipping, where data and teachers are kept, how many processes read
# the data, how many images the evaluation embeds or compares at once, the preset's name: a
# preset's values are overrides too). Precision, device and compile stay: they move the results a
# little (a job's last.pt continues under another, `train.job_identity`). The evaluation's batch and
# chunk sizes change only the float rounding of its embeddings and distances, and a job stopped by
# an evaluation that ran out of memory continues with smaller ones.
SEED_KEY = "train.seed"
NOT_IDENTITY_KEYS = ("preset", "skip_finished", "logger", "train.progress", "train.num_workers", "train.pin_memory",
                     "train.resume", "dataset.in_memory", "dataset.decode_workers", "eval.keep_crops", "eval.batch_size",
                     "eval.chunk_size")
NOT_IDENTITY_PREFIXES = ("logger.", "hydra.", "hydra/", "paths.")


def override_key(override: str) -> str:
    """"+loss.x=1" -> "loss.x"; "~key" -> "key"; "hydra/launcher=joblib" -> "hydra/launcher"."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def identifies(key: str, with_seed: bool = True) -> bool:
    """Whether an override of `key` changes what a job is (the seed only `with_seed`)."""
    if key == SEED_KEY:
        return with_seed
    return key not in NOT_IDENTITY_KEYS and key != "hydra" and not key.startswith(NOT_IDENTITY_PREFIXES)


def identity_overrides(overrides: Iterable[str], with_seed: bool = True) -> list[str]:
    """The overrides that identify a job (`with_seed`) or its configuration (without), in order."""
    return [o for o in overrides if identifies(override_key(o), with_seed)]


def not_identity_keys() -> list[str]:
    """The keys Hydra's `override_dirname` leaves out (conf/train.yaml): those that do not
    identify a job. The seed stays, so `hydra.sweep.subdir=${hydra.job.override_dirname}` gives
    each seed a folder of its own. Hydra leaves out whole keys, not prefixes: the keys under
    `NOT_IDENTITY_PREFIXES` that the configuration has are listed one by one (`hydra.*` overrides
    never reach override_dirname)."""
    from dataclasses import fields

    from aomd.schema import LoggerSchema

    under_prefixes = [f"logger.{field.name}" for field in fields(LoggerSchema)] + ["paths.cache_dir", "paths.teachers_dir"]
    return [*NOT_IDENTITY_KEYS, "hydra/launcher", *under_prefixes]


if not OmegaConf.has_resolver("aomd.not_identity_keys"):
    OmegaConf.register_new_resolver("aomd.not_identity_keys", not_identity_keys)


# keys that say where and how a job computes or logs, not what it learns (content_digest skips them)
NOT_CONTENT_KEYS = frozenset({"cache_dir", "in_memory", "num_workers", "decode_workers", "pin_memory", "skip_bad_images",
                              "progress", "device", "precision", "channels_last", "compile", "deterministic", "cuda_graphs",
                              "fused_adapters", "resume", "keep_crops"})


def content_digest(tree: Any) -> str:
    """A short hash of what a job learns from (a plain config tree), keys of NOT_CONTENT_KEYS left out."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in NOT_CONTENT_KEYS}
        return node

    return hashlib.sha1(json.dumps(strip(tree), sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as file:
        file.write(json.dumps(payload, indent=2, allow_nan=True))
        file.flush()
        os.fsync(file.fileno())  # a node that crashes leaves the previous record, not an empty file
    os.replace(tmp, path)


def read_record(job_dir: str | Path) -> dict[str, Any] | None:
    """The metrics.json of a job directory, or None when there is none."""
    path = Path(job_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_record_of(record: dict[str, Any], overrides: Iterable[str]) -> bool:
    """Whether `record` was written by the job of these overrides, in any order. The record's list
    is filtered by today's rule too, so records written under an earlier rule still match their job."""
    written = record.get("overrides")

    def normal(items: Iterable[str]) -> list[str]:  # "+key=value" sets what "key=value" sets
        return sorted(o.lstrip("+") for o in identity_overrides(items))

    return written is not None and normal(written) == normal(overrides)


def finished_record(job_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any] | None:
    """The job's record if it finished (with the same identifying `overrides`, when given)."""
    record = read_record(job_dir)
    if not record or record.get("status") != FINISHED:
        return None
    if overrides is not None and not is_record_of(record, overrides):
        return None  # the same folder can hold another configuration when a sweep is rerun with other values
    return record


def requeued_by_slurm(record: dict[str, Any] | None) -> bool:
    """Whether this process is a requeue (SLURM_RESTART_COUNT > 0) of the SLURM job that wrote `record`."""
    job_id = os.environ.get("SLURM_JOB_ID")
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    return bool(record and requeued and job_id and record.get("slurm_job_id") == job_id)


def finished_by_this_slurm_job(record: dict[str, Any] | None) -> bool:
    """Whether `record` was finished by the SLURM job this process runs in, before SLURM requeued
    it (the time limit's signal came as the job ended): the requeued job has nothing left to do."""
    return requeued_by_slurm(record) and record.get("status") == FINISHED


def unfinished_run_id(record: dict[str, Any] | None, overrides: list[str] | None = None) -> str | None:
    """The W&B run of an unfinished `record` of this job (of these `overrides`, when given): a job
    stopped before it wrote its first last.pt (killed, out of memory, a lost node) starts again
    in that run, so a sweep shows one run per job."""
    if not record or record.get("status") == FINISHED or overrides is not None and not is_record_of(record, overrides):
        return None
    return record.get("wandb_run_id")


def claim_record(job_dir: Path, overrides: list[str], continues: bool, run_id: str | None = None) -> None:
    """Make the folder's metrics.json this job's before any work. A record another job left there
    (a sweep rerun with other values into the same folder numbers) would otherwise show that
    job's results under this job's overrides until this one's training starts, and for good if it
    is stopped before (e.g. while its teacher trains). Only a job that `continues` its own
    unfinished run keeps its record. `run_id`, the W&B run this start goes on in (an earlier
    start's, `unfinished_run_id`), stays in the new record: stopped again before its W&B run
    starts, the job would otherwise open a second run next time."""
    record = read_record(job_dir)
    if not (continues and record is not None and is_record_of(record, overrides)):
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(job_dir / METRICS_FILE, {**_fresh_record(overrides), **({"wandb_run_id": run_id} if run_id else {})})


def record_failure(job_dir: Path, error: BaseException, overrides: list[str] | None = None) -> None:
    """Make the job's metrics.json say it failed (the tracker already does once training started);
    a record another job of these `overrides`' folder left is replaced, not marked. A record this
    process finished stays: an error after it was written (W&B closing, submitit's
    UncompletedJobError as the time limit came) takes nothing from the results."""
    _record_stop(job_dir, FAILED, f"{type(error).__name__}: {error}", overrides)


def record_interruption(job_dir: Path, reason: str) -> None:
    """Make a job stopped by a signal before its own training started (e.g. while its teacher
    trained) say so in its metrics.json; once training started, the tracker does. A record this
    process finished stays (a signal as the W&B run closed)."""
    _record_stop(job_dir, INTERRUPTED, reason)


# the job folders whose record this process wrote as finished: an error or a stop after that (W&B
# closing) leaves it finished; a finished record found in the folder (an earlier run's, which a
# rerun with skip_finished=false failed to replace) does not stay finished
_FINISHED_HERE: set[Path] = set()


def _fresh_record(overrides: list[str] | None) -> dict[str, Any]:
    return {"status": RUNNING, "overrides": None if overrides is None else identity_overrides(overrides),
            "best": None, "history": []}


def _record_stop(job_dir: Path, status: str, error: str, overrides: list[str] | None = None) -> None:
    record = read_record(job_dir)
    if record is None or overrides is not None and not is_record_of(record, overrides):
        record = _fresh_record(overrides)
    finished_here = record.get("status") == FINISHED and Path(job_dir).resolve() in _FINISHED_HERE
    if record.get("status") != status and not finished_here:
        record.update(status=status, error=error)
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(job_dir / METRICS_FILE, record)


class JobRecord:
    """The metrics.json of one job being run (see the module docstring)."""

    def __init__(self, job_dir: Path, job_type: str, dataset: dict[str, int], overrides: list[str] | None = None,
                 runtime: dict[str, Any] | None = None, selection: dict[str, str] | None = None,
                 run_id: str | None = None):
        self.path = Path(job_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = {
            "status": RUNNING, "job_type": job_type, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "overrides": None if overrides is None else identity_overrides(overrides),
            "runtime": runtime, "selection": selection, "best": None, "last": None, "history": [], "dataset": dataset,
            # the W&B run this start goes on in, kept until the run starts (`claim_record`)
            **({"wandb_run_id": run_id} if run_id else {}),
        }
        self.save()

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.state["history"]

    @property
    def best(self) -> dict[str, Any] | None:
        return self.state["best"]

    def set_run_id(self, run_id: str) -> None:
        self.state["wandb_run_id"] = run_id
        self.save()

    def set_teacher(self, metrics: dict[str, float]) -> None:
        self.state["teacher"] = metrics
        self.save()

    def add_epoch(self, record: dict[str, Any], is_best: bool) -> None:
        self.state["history"].append(record)
        self.state["last"] = record
        if is_best:
            self.state["best"] = record
        self.save()

    def restore(self, history: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
        """The records of the epochs before a resume (from `last.pt`, which is written after them)."""
        self.state.update(history=list(history), best=best, last=history[-1] if history else None)
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        assert status in (FINISHED, FAILED, INTERRUPTED), status
        self.state["status"] = status
        if error:
            self.state["error"] = error
        self.save()
        if status == FINISHED:
            _FINISHED_HERE.add(self.path.parent.resolve())

    def save(self) -> None:
        write_json_atomic(self.path, self.state)
