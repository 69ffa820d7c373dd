"""Where results go while a job runs: the console, its job record (metrics.json, `aomd.records`)
and one W&B run per job, named from what the sweep varies."""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from aomd.records import (FAILED, FINISHED, INTERRUPTED, RETRIEVAL_KEYS, TRAINING_KEYS, VALIDATION_PREFIX, JobRecord,
                           identity_overrides, override_key)

log = logging.getLogger(__name__)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"mode": 2}} -> {"loss.mode": 2}: W&B can plot and group by every key."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


@dataclass
class RunInfo:
    """What a job's W&B run is: the `logger` settings, the config it records (a plain tree),
    its name and tags, and the job's command-line overrides (for its record)."""

    logger: Any
    config: dict[str, Any]
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    overrides: list[str] | None = None


def run_name(task_overrides: list[str], swept: set[str] | None = None) -> str | None:
    """A job's W&B run name: its overrides that identify its configuration (seeds excluded, so the
    seeds of one configuration share a name); in a sweep only those of the keys it varies."""
    parts = [o.lstrip("+~") for o in identity_overrides(task_overrides, with_seed=False)
             if swept is None or override_key(o) in swept]
    return " ".join(parts) or None


def swept_keys(sweep_dir: Path, sweeper_params: dict | None) -> set[str]:
    """The keys a sweep varies: the sweeper's params and the sweep's `key=a,b` overrides
    (`multirun.yaml`, written by the sweeper before any job)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set((sweeper_params or {}).keys())
    multirun = Path(sweep_dir) / "multirun.yaml"
    if multirun.is_file():
        overrides = OverridesParser.create().parse_overrides(list(OmegaConf.load(multirun).hydra.overrides.task))
        keys.update(o.get_key_element() for o in overrides if o.is_sweep_override())
    return {key.lstrip("+~") for key in keys}


def wandb_dir(out_dir: Path) -> Path:
    """The folder whose `wandb/` holds a job's W&B run files: `$WANDB_DIR` when it is set (W&B's
    own setting, e.g. for a scratch disk), else the job's folder, beside its metrics.json."""
    return Path(os.environ["WANDB_DIR"]).expanduser() if os.environ.get("WANDB_DIR") else out_dir


class Tracker:
    """Records one job: its `JobRecord`, a W&B run (when `logger.enabled` and mode is not
    disabled) and a console line per epoch."""

    def __init__(self, run: RunInfo, out_dir: Path, job_type: str, dataset_summary: dict[str, int],
                 runtime: dict[str, Any] | None = None, selection: dict[str, str] | None = None,
                 resume_id: str | None = None):
        self.record = JobRecord(out_dir, job_type, dataset_summary, run.overrides, runtime, selection, resume_id)
        if runtime:
            log.info("Running on %s (%s), precision %s%s%s.", runtime["device"], runtime["device_name"], runtime["precision"],
                     ", channels_last" if runtime["channels_last"] else "", ", compiled" if runtime["compile"] else "")
        self.run = None
        logger = run.logger
        if logger.enabled and logger.mode != "disabled":
            self._init = dict(
                project=logger.project,
                entity=logger.entity,
                group=logger.group,
                name=logger.name or run.run_name,
                job_type=job_type,
                tags=[*logger.tags, *run.tags],
                dir=str(wandb_dir(out_dir)),
                config={**flatten(run.config), **{f"runtime.{k}": v for k, v in (runtime or {}).items()}},
                reinit="finish_previous",
            )
            self.run = _start_run(logger.mode, logger.init_timeout, wandb_dir(out_dir), id=resume_id,
                                  resume="allow" if resume_id else None,  # a resumed job continues its run
                                  **self._init)
            if self.run is not None:  # in metrics.json at once: a job killed before its first last.pt keeps its run
                self.record.set_run_id(self.run.id)
        # the run's summary beyond best/* and last/*, kept to give it again to a run that replaces this one
        self._summary = {f"dataset/{k}": v for k, v in dataset_summary.items()}
        if selection:  # what best/* is: the epoch chosen by this metric (best/val/* with select=val)
            self._summary.update({"selection/select": selection["select"], "selection/metric": selection["metric"]})
        self._wandb(lambda r: r.summary.update(self._summary))

    def _wandb(self, call) -> None:
        """`call(run)` on the W&B run. When W&B fails mid-run, the job goes on in an offline run
        with the same id (one warning, saying how to upload it); if that fails too, without W&B.
        W&B never stops a job."""
        if self.run is None:
            return
        try:
            call(self.run)
            return
        except Exception as error:  # noqa: BLE001 - whatever W&B raises, the training goes on
            run_id, failed = self.run.id, self.run
            log.warning("W&B failed (%s: %s); this job goes on in an offline run with the same id: upload it later "
                        "with `wandb sync %s/wandb/offline-run-*`.", type(error).__name__, _first_line(error),
                        self._init["dir"])
        self.run = None
        try:
            with contextlib.suppress(Exception):
                failed.finish(exit_code=1, quiet=True)
            import wandb

            self.run = wandb.init(mode="offline", id=run_id, resume="allow", **self._init)
            self._replay(self.run, with_history=True)  # the offline folder replaces the online run when synced
            call(self.run)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B failed again (%s: %s); this job goes on without it, its results are in metrics.json.",
                        type(error).__name__, _first_line(error))
            self.run = None

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def restore(self, history: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
        """A resumed job's earlier epochs: into its record and its W&B run. An online run that
        W&B resumed already has their history (the job continues it), and gets its summary again.
        An offline run is a new folder with the same id, and `wandb sync` of a run id replaces
        what the run held, so it gets the whole history too: the newest folder, synced last,
        leaves the run complete. So does an online run W&B did not know (the job ran offline
        before: its earlier folder, synced later, must not leave the run without these epochs)."""
        self.record.restore(history, best)
        self._wandb(lambda r: self._replay(r, with_history=r.offline or not getattr(r, "resumed", False)))

    def _replay(self, run, with_history: bool) -> None:
        """Give `run` this job's summary so far (and with `with_history` every epoch logged so far)."""
        if with_history:
            for record in self.record.history:
                _log_epoch(run, record)
        run.summary.update(self._summary)
        if self.record.history:
            run.summary.update({f"last/{k}": v for k, v in self.record.history[-1].items()})
        if self.record.best:
            run.summary.update({f"best/{k}": v for k, v in self.record.best.items()})

    def log_teacher(self, metrics: dict[str, float]) -> None:
        """The teacher's test metrics, once per job, next to the student's."""
        self.record.set_teacher(metrics)
        log.info("teacher: %s", _format(metrics))
        self._summary.update({f"teacher/{k}": v for k, v in metrics.items()})
        self._wandb(lambda r: r.summary.update(self._summary))

    def log_epoch(self, record: dict[str, Any], is_best: bool) -> None:
        """One evaluated epoch; `is_best` when it is the new best (the engine decides which epochs count)."""
        self.record.add_epoch(record, is_best)
        log.info("epoch %d: %s", record["epoch"], _format({k: v for k, v in record.items() if k != "epoch"}))
        self._wandb(lambda r: _log_epoch(r, record))
        self._wandb(lambda r: r.summary.update({f"last/{k}": v for k, v in record.items()}))
        if is_best:
            self._wandb(lambda r: r.summary.update({f"best/{k}": v for k, v in record.items()}))

    def finish(self, status: str = FINISHED, error: str | None = None) -> None:
        self.record.finish(status, error)
        if self.run is not None:
            self._wandb(lambda r: r.summary.update({"status": status}))
            if status == INTERRUPTED:  # W&B shows it as preempted until the job resumes the run
                self._wandb(lambda r: r.mark_preempting())
            self._wandb(lambda r: r.finish(exit_code=0 if status == FINISHED else 1))
            self.run = None

    def fail(self, error: BaseException) -> None:
        self.finish(FAILED, error=f"{type(error).__name__}: {error}")

    def interrupt(self, reason: str) -> None:
        """The job was stopped by a signal; its last.pt continues it."""
        self.finish(INTERRUPTED, error=reason)

    def summary_table(self) -> str:
        """The per-epoch history as a fixed-width table, the best epoch marked with *."""
        history = self.record.history
        if not history:
            return "(no epoch evaluated)"
        metric_keys = [k for k in history[0] if k.startswith(RETRIEVAL_KEYS)]
        metric_keys += [k for k in history[0] if k.startswith(VALIDATION_PREFIX + "recall@")][:1]
        headers = ["epoch", "loss", *metric_keys]
        best_epoch = (self.record.best or {}).get("epoch")
        rows = []
        for r in history:
            loss = r.get("loss")
            rows.append([f"{r['epoch']}{'*' if r['epoch'] == best_epoch else ''}",
                         "-" if loss is None else f"{loss:.4f}", *(f"{100 * r[k]:.2f}" for k in metric_keys)])
        if "teacher" in self.record.state:
            t = self.record.state["teacher"]
            rows.append(["teacher", "-", *(f"{100 * t[k]:.2f}" if k in t else "-" for k in metric_keys)])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
        return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


_online_failed = False  # once an online run could not start, later jobs of this process go offline at once


def _start_run(mode: str, init_timeout: float, files_dir: Path, **kwargs):
    """`wandb.init`; an online run that cannot start (no API key, no server) becomes an offline
    run with one warning saying how to upload it, so W&B never stops a job. In a sweep the
    warning comes once: the jobs after it start offline directly."""
    global _online_failed
    try:
        import wandb
    except Exception as error:  # noqa: BLE001 - not installed, or an import that breaks (a protobuf clash)
        log.warning("W&B cannot be imported (%s: %s); this job goes on without it, its results are in metrics.json "
                    "(logger=none turns W&B off).", type(error).__name__, _first_line(error))
        return None

    if mode == "online" and not _online_failed:
        try:
            if not _has_credentials(wandb):  # never W&B's interactive prompt, which would hold the job
                raise RuntimeError("no W&B API key (run `wandb login`, or set WANDB_API_KEY)")
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=init_timeout), **kwargs)
        except Exception as error:  # noqa: BLE001 - UsageError (no key), CommError (no server), timeouts
            _online_failed = True
            log.warning("W&B could not start an online run (%s: %s); logging offline instead: upload later with "
                        "`wandb sync %s/wandb/offline-run-*`.", type(error).__name__, _first_line(error), files_dir)
    elif mode == "online":
        log.info("W&B online was unavailable earlier in this process; logging offline to %s/wandb.", files_dir)
    try:
        return wandb.init(mode="offline" if mode == "online" else mode, **kwargs)
    except Exception as error:  # noqa: BLE001 - e.g. a value W&B refuses (a tag over 64 characters)
        log.warning("W&B could not start an offline run either (%s: %s); this job goes on without W&B, its results "
                    "are in metrics.json.", type(error).__name__, _first_line(error))
        return None


def _has_credentials(wandb) -> bool:
    """Whether W&B has an API key (or identity token) without asking for one: `wandb.init`
    would otherwise prompt on a terminal, and wait there, or fail on a closed stdin. Where
    `wandb.login` cannot tell (WANDB_MODE says offline or disabled, or a run is open), its init
    decides, as it did before this check."""
    if os.environ.get("WANDB_MODE", "online") not in ("online", "run") or wandb.run is not None:
        return True
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # a wandb without `prompt`
        return True


def _log_epoch(run, record: dict[str, Any]) -> None:
    """One epoch's record into a W&B run's history, at the epoch as its step."""
    logged = {f"train/{k}": v for k, v in record.items() if k.startswith("loss") or k in TRAINING_KEYS}
    logged.update({f"test/{k}": v for k, v in record.items() if k.startswith(RETRIEVAL_KEYS)})
    logged.update({k: v for k, v in record.items() if k.startswith(VALIDATION_PREFIX)})
    run.log({"epoch": record["epoch"], **logged}, step=record["epoch"])


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _format(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float) and key.removeprefix(VALIDATION_PREFIX).startswith(RETRIEVAL_KEYS):
            parts.append(f"{key} {100 * value:.2f}")
        elif isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key} {value:.4g}")
    return ", ".join(parts)
