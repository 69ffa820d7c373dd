"""Resuming an interrupted job from its `checkpoints/last.pt`.

`last.pt` is written atomically after every epoch, and in the middle of an epoch when the job is
asked to stop by a signal (SIGTERM, SIGINT, SIGUSR1, SLURM's SIGUSR2: `aomd.preemption`). Beyond the model
it holds, under `training`, what an exact continuation needs: the objective (adapters,
regressors), the optimiser and the gradient scaler, the last finished epoch, the selected
(`best`) record and the metrics history, the class-balanced sampler's and the augmentation's
generators, the Python, NumPy and torch (CPU and CUDA) random states, the job's identity and its
W&B run id; in the middle of an epoch also `partial`: the steps trained in it, their running loss
sums and seconds (the sampler's state is then the one at the start of that epoch, and the resumed
run skips the batches already trained on). A job resumed from it on the CPU ends with the same
history and the same `best.pt` as one that was never interrupted.

`train.resume`: `auto` (the default: continue the job folder's own unfinished run; a finished one
is not trained again; another configuration's run stops a single job and is replaced by a sweep
job: `job_source`), `never` (start over), or a run folder or `last.pt` to continue from.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aomd.data.sampler import ClassBalancedBatchSampler
from aomd.errors import UserError
from aomd.models import CheckpointError, read_checkpoint
from aomd.records import FINISHED, identity_overrides, is_record_of, override_key, read_record, requeued_by_slurm
from aomd.tracking import wandb_dir

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.pt"
# a managed teacher resumes whatever `train.resume` says: deleting the file is what starts it over
START_OVER = "Delete it to start over (a student job: or pass train.resume=never; or train.resume=<the right run folder>)."
# a run named by train.resume=<folder> is left alone: it may be a run the user keeps
OTHER_SOURCE = ("Pass train.resume=<a run folder of this configuration>, or train.resume=never to start over; a run "
                "continues only with what it learns unchanged (a longer or otherwise changed recipe is a new run).")


# a job's identity, or its identities under the rules of this and earlier versions (the first is
# what this version writes): a run saved before a rule changed still continues
Identity = str | tuple[str, ...]
OTHER_DEFAULTS = ("the same overrides, but other defaults: written by another aomd version, or with other "
                  "configuration files")


class ResumeError(UserError, ValueError):
    """A `last.pt` that cannot be continued from: truncated, or another job's."""


def sampler_state(sampler: ClassBalancedBatchSampler) -> dict[str, Any]:
    """The state of the batch sampler's generator now, as plain data."""
    return _plain(sampler.rng.bit_generator.state)


def random_states(sampler_state: dict[str, Any], augment_rng: torch.Generator) -> dict[str, Any]:
    """Every generator the training loop draws from, as tensors and plain data (`sampler_state`:
    from `sampler_state()`, taken at the start of the epoch when the state is saved in its middle)."""
    numpy_state = np.random.get_state()
    return {
        "sampler": sampler_state,
        "augment": augment_rng.get_state(),
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_random_states(states: dict[str, Any], sampler: ClassBalancedBatchSampler, augment_rng: torch.Generator) -> None:
    sampler.rng.bit_generator.state = _unplain(states["sampler"])
    augment_rng.set_state(states["augment"])
    random.setstate(_tuples(states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        # by index, over the cards this process sees: a run saved where it saw more cards (a node's
        # four, then a requeued job's one) resumes instead of failing on a card it cannot see
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def _plain(tree: Any) -> Any:
    """NumPy's generator state with its 128-bit integers as strings (a weights-only checkpoint
    holds 64-bit integers at most)."""
    if isinstance(tree, dict):
        return {key: _plain(value) for key, value in tree.items()}
    if isinstance(tree, int) and not -2**63 <= tree < 2**63:
        return f"int:{tree}"
    return tree


def _unplain(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _unplain(value) for key, value in tree.items()}
    if isinstance(tree, str) and tree.startswith("int:"):
        return int(tree[4:])
    return tree


def _tuples(tree: Any) -> Any:
    return tuple(_tuples(v) for v in tree) if isinstance(tree, (list, tuple)) else tree


def source(setting: str, out_dir: Path) -> Path | None:
    """The `last.pt` a job continues from under `train.resume` = `setting`, or None."""
    if setting == "never":
        return None
    if setting == "auto":
        path = Path(out_dir) / LAST
        return path if path.is_file() else None
    path = Path(setting).expanduser()
    path = path / LAST if path.is_dir() else path
    if not path.is_file():
        raise ResumeError(f"train.resume={setting} names no last.pt ({path} does not exist); pass a run folder or its "
                          f"checkpoints/last.pt, or train.resume=auto.")
    return path


def job_source(setting: str, out_dir: Path, overrides: list[str], identity: Identity, sweep_job: bool) -> Path | None:
    """The `last.pt` the job of `overrides` and `identity` continues from, in `out_dir`, under
    `train.resume` = `setting`; checked before any work.

    With `auto`, this job's unfinished run there (killed, preempted, requeued) continues, also when
    only settings that do not change what it learns differ (the device, the precision, the
    evaluation's batch size). A finished run does not continue. A run of another configuration
    (its record's overrides and its `last.pt` are another job's) is never continued: a sweep job
    (`sweep_job`: a sweep rerun with other values into the same folders) starts over in its place
    with a warning, and a single job stops with one line saying what differs, rather than discard
    a run the user may have pointed `hydra.run.dir` to by mistake."""
    if setting != "auto":
        own = own_unfinished_run(setting, out_dir, overrides, identity)
        if own is not None:
            return own
    path = source(setting, out_dir)
    if setting != "auto":
        if path is not None:  # another job's or damaged: said now, not after a teacher trains
            read_state(path, identity, overrides, advice=OTHER_SOURCE)
        return path
    record = read_record(out_dir)
    finished = record is not None and record.get("status") == FINISHED
    same_overrides = record is None or is_record_of(record, overrides)
    training = training_state(path) if path is not None else None  # read once: the file may be large
    if path is not None and not finished and is_written_by(training, identity):
        return path
    if not same_overrides and (finished or path is not None) or record is None and training is not None:
        status = (record or {}).get("status")
        what = f"{status} run" if status in (FINISHED, "interrupted", "failed") else "unfinished run"
        what = f"{'an' if what[0] in 'aeiou' else 'a'} {what}"
        if record is None:
            difference = "its last.pt was written by another job, and it has no metrics.json"
        elif record.get("overrides") is None:
            difference = "its metrics.json names no overrides"
        else:
            difference = changes(record["overrides"], overrides)
        if not sweep_job:
            raise ResumeError(f"{out_dir} holds {what} of another configuration ({difference}); pass train.resume=never "
                              f"to replace it, or another hydra.run.dir.")
        log.warning("%s held %s of another configuration (%s); this job starts over there.", out_dir, what, difference)
        return None
    if path is not None and not finished:
        read_state(path, identity, overrides)  # this job's run, but a damaged last.pt or another code's: said now
    return None if finished else path


def own_unfinished_run(setting: str, out_dir: Path, overrides: list[str], identity: Identity) -> Path | None:
    """The `last.pt` of the folder's own unfinished run of this job that a job run again in its
    folder continues although `train.resume` is not auto: with `<run folder>`, the run that
    started from that very last.pt (its `started_from`) or a SLURM requeue's (run again, the job
    would otherwise start from that folder again and discard its progress); with `never`, a SLURM
    requeue's (`requeued_by_slurm`), which would otherwise start over on every requeue and never
    finish a run longer than the time limit. None otherwise: an explicit train.resume wins over
    another run of the folder."""
    path = Path(out_dir) / LAST
    record = read_record(out_dir)
    if not path.is_file() or record is None or record.get("status") == FINISHED or not is_record_of(record, overrides):
        return None
    training = training_state(path)
    if not is_written_by(training, identity):
        return None
    if requeued_by_slurm(record):
        why = "this SLURM job's, requeued"
    elif setting != "never" and training.get("started_from") == str(source(setting, out_dir).resolve()):
        why = "it started from there"
    else:
        return None
    log.info("Continuing this folder's own unfinished run %s rather than train.resume=%s (%s).", path, setting, why)
    return path


def changes(earlier: list[str], overrides: list[str]) -> str:
    """What the identifying overrides `overrides` change against `earlier`, for a message:
    "train.lr: 0.001 -> 0.0005, eval.recall_k: default -> [1,2]"."""
    def values(items: list[str]) -> dict[str, str]:
        return {override_key(o): o.split("=", 1)[1] if "=" in o else "deleted" for o in identity_overrides(items)}

    before, after = values(earlier), values(overrides)
    keys = [*before, *(key for key in after if key not in before)]
    return ", ".join(f"{key}: {before.get(key, 'default')} -> {after.get(key, 'default')}"
                     for key in keys if before.get(key) != after.get(key)) or OTHER_DEFAULTS


def forget_earlier_run(out_dir: Path, its_own: bool, run_id: str | None = None) -> None:
    """Remove the folder's `last.pt` of an earlier run (one started over, or another job's) for a
    job that does not continue it: otherwise, stopped before it writes its own, the job would
    later resume that run (with a best.pt that no longer matches it), or refuse to run at all
    when the run was another configuration's. When the earlier run was this configuration's
    (`its_own`: started over), its W&B files go too (those of its run id only): `wandb sync` of
    the folder would otherwise upload the replaced run beside this one. Another configuration's
    W&B files stay: they may be the only copy of a result not yet uploaded. `run_id` is the W&B
    run of an earlier start of this job that wrote no last.pt (its metrics.json names it): the job
    starts that run again, and its earlier files go too."""
    last = Path(out_dir) / LAST
    training = training_state(last) if its_own and last.is_file() else None
    run_ids = {training.get("wandb_run_id") if training is not None else None, run_id if its_own else None} - {None}
    for files in (wandb_dir(Path(out_dir)) / "wandb").glob("*run-*") if run_ids else ():
        if files.is_dir() and files.name.rsplit("-", 1)[-1] in run_ids:
            log.info("Removing %s, the W&B files of the run this job replaces.", files)
            shutil.rmtree(files, ignore_errors=True)
    last.unlink(missing_ok=True)


def training_state(path: Path) -> dict[str, Any] | None:
    """The `training` state of the checkpoint at `path`, or None when it is damaged or holds
    none (which `read_state` reports)."""
    try:
        training = read_checkpoint(path).get("training")
    except CheckpointError:
        return None
    return training if isinstance(training, dict) else None


def current_identity(identity: Identity) -> str:
    """The identity this version writes into a job's `last.pt`."""
    return identity if isinstance(identity, str) else identity[0]


def is_written_by(training: Any, identity: Identity) -> bool:
    """Whether a `last.pt`'s training state was written by the job `identity` (its identity, or
    one of the identities it had under earlier rules: `Identity`)."""
    accepted = {identity} if isinstance(identity, str) else set(identity)
    return isinstance(training, dict) and training.get("identity") in accepted


def read_state(path: Path, identity: Identity, overrides: list[str] | None = None, advice: str = START_OVER) -> dict[str, Any]:
    """The checkpoint at `path` with its `training` state, checked to belong to the job `identity`
    (a refusal names the settings that differ from the `overrides` of the run that wrote it, then
    `advice`)."""
    try:
        payload = read_checkpoint(path)
    except CheckpointError as error:
        raise ResumeError(f"Cannot resume from {path}: {error} {advice}") from None
    training = payload.get("training")
    if not isinstance(training, dict):
        raise ResumeError(f"Cannot resume from {path}: it holds no training state (written by an older aomd). {advice}")
    if not is_written_by(training, identity):
        record = read_record(path.parent.parent) if path.parent.name == "checkpoints" else None
        difference = (changes(record["overrides"], overrides) if overrides is not None and record
                      and record.get("overrides") is not None
                      else f"{training.get('identity')!r}, this job is {current_identity(identity)!r}")
        raise ResumeError(f"Cannot resume from {path}: it belongs to another job ({difference}). {advice}")
    return payload
