"""The local report of a Hydra sweep: `python -m aomd.report <sweep dir> [--out DIR]`.

Reads every job of a multirun sweep directory and writes, into the sweep directory (or `--out`):

* `report.md`: one table row per configuration, with Recall@K, MAP@R and R-Precision in percent as
  "mean ± std" over the seeds (`train.seed`), best first; the jobs that did not finish
  (failed, still running, no metrics.json) are listed below it, never dropped;
* `recall_vs_aomd_ratio.png`: Recall@1 against `loss.aomd_ratio` (log axis), one line per
  configuration but its ratio, or points per `loss.mode` for a search (`ratio_series`; only when
  some job has a non-zero `aomd_ratio`);
* `baselines.png`: Recall@1 of every configuration as horizontal bars, in the table's order.

The table is printed to stdout as well. See docs/report.md for the user's side.

What is read, per job folder `<sweep dir>/<job>/` (a folder holding `.hydra/` or `metrics.json`,
not one of `aomd.prepare` or `aomd.evaluate`):
  `.hydra/overrides.yaml`  the job's command-line overrides (a YAML list of "key=value");
  `.hydra/config.yaml`     its resolved config (`loss.aomd_ratio`, `loss.mode`, `train.seed`);
  `.hydra/hydra.yaml`      `hydra.runtime.choices.loss` (the loss option) and `hydra.job.num`;
  `metrics.json`           written by `aomd.tracking.Tracker`: {"status", "best": {"recall@K", "map@r",
                           ...}, "history", "teacher" (distillation), "error" (failed jobs)}, values
                           are fractions in [0, 1].

The module is split so tests can call each stage directly: reading (`read_sweep`: sweep dir ->
`Job` records), aggregation (`aggregate`: jobs -> `ConfigRow`s), then rendering (`render_*`,
`plot_*`) and the CLI (`write_report`, `main`).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from aomd.errors import UserError
from aomd.records import (FINISHED, METRICS_FILE, RETRIEVAL_KEYS, SEED_KEY, VALIDATION_PREFIX, identity_overrides,
                           is_record_of, override_key, read_record)

PROGRAM = "aomd.report"
REPORT_FILE = "report.md"
LAST_PREFIX = "last/"  # the report's own key for the last epoch's test metric
RATIO_PLOT = "recall_vs_aomd_ratio.png"
BARS_PLOT = "baselines.png"

# metrics.json statuses, plus the two this module adds for jobs it cannot read a status from
MISSING = "missing"        # no metrics.json: the job crashed before training started, or never ran
UNREADABLE = "unreadable"  # a file of the job could not be parsed
NO_RESULT = "no result"    # finished, but no epoch was evaluated
OTHER_TASKS = ("prepare", "evaluate")  # entrypoints whose run folders hold no training job


class ReportError(UserError):
    """A bad argument to the report (no such directory, no jobs in it)."""


# --------------------------------------------------------------------------------------------
# reading: sweep dir -> jobs


@dataclass(frozen=True)
class Job:
    """One job folder of a sweep.

    `status` is the metrics.json status ("finished", "running", "failed", "interrupted") or one of "missing"
    (no metrics.json), "unreadable" (a file could not be parsed; `error` says which) and
    "no result" (finished without an evaluated epoch). `best` holds the metrics of the best epoch
    (fractions), `config_overrides` the overrides that identify its configuration (those that
    identify the job, `aomd.records`, less `train.seed`; in command-line order).
    """

    name: str
    path: Path
    status: str
    overrides: tuple[str, ...] = ()
    config_overrides: tuple[str, ...] = ()
    loss: str | None = None
    seed: Any = None
    aomd_ratio: float = 0.0
    mode: Any = None
    best: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    teacher: dict[str, Any] | None = None
    epochs_evaluated: int = 0
    error: str | None = None

    @property
    def config_key(self) -> tuple[str, ...]:
        """What makes two jobs the same configuration (order-insensitive)."""
        return tuple(sorted(self.config_overrides))


def config_overrides(overrides: Iterable[str]) -> tuple[str, ...]:
    """The overrides that identify a configuration (`aomd.records`: all that identify a job but the seed)."""
    return tuple(identity_overrides(overrides, with_seed=False))


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders under `sweep_dir` (Hydra's subdir is the job number by default, but may be any
    path): folders holding `.hydra/` or `metrics.json`, in natural order ("2" before "10").
    A single run's folder counts as a sweep of one job. Folders of `OTHER_TASKS` (`aomd.prepare`
    and `aomd.evaluate` write theirs under `outputs/` too) are not jobs."""
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        if ".hydra" in dirs or METRICS_FILE in files:
            if task_name(Path(root)) not in OTHER_TASKS:
                found.append(Path(root))
            dirs[:] = []  # jobs do not nest; do not walk their checkpoints and wandb folders
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def task_name(folder: Path) -> str | None:
    """The Hydra job name (the entrypoint: "train", "prepare", "evaluate") a run folder's
    `.hydra/hydra.yaml` records; None without a readable one."""
    try:
        return _get(_load_yaml(folder / ".hydra" / "hydra.yaml"), "hydra.job.name")
    except (OSError, yaml.YAMLError):
        return None  # read_job reports it


def _natural_key(text: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _get(tree: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _as_float(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0  # a value the report cannot read is treated as "no AOMD term"


def read_job(job_dir: Path, name: str) -> Job:
    """The `Job` record of one job folder; never raises for a broken job (it becomes "unreadable")."""
    hydra_dir = job_dir / ".hydra"
    try:
        overrides = [str(o) for o in (_load_yaml(hydra_dir / "overrides.yaml") or [])]
        config = _load_yaml(hydra_dir / "config.yaml") or {}
        hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml") or {}
    except (OSError, yaml.YAMLError) as error:
        return Job(name, job_dir, UNREADABLE, error=f"cannot read .hydra/: {_first_line(error)}")
    fields: dict[str, Any] = dict(
        overrides=tuple(overrides),
        config_overrides=config_overrides(overrides),
        loss=_get(hydra_cfg, "hydra.runtime.choices.loss"),
        seed=_get(config, SEED_KEY, _override_value(overrides, SEED_KEY)),
        aomd_ratio=_as_float(_get(config, "loss.aomd_ratio")),
        mode=_get(config, "loss.mode"),
    )
    metrics_path = job_dir / METRICS_FILE
    if not metrics_path.is_file():
        return Job(name, job_dir, MISSING, **fields)
    try:
        metrics = read_record(job_dir)
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        return Job(name, job_dir, UNREADABLE, error=f"cannot read {METRICS_FILE}: {_first_line(error)}", **fields)
    if not (hydra_dir / "overrides.yaml").is_file():
        # no .hydra/ (hydra.output_subdir=null, or results copied without it): the record's own
        # overrides say which configuration it is; pooling such jobs would mix configurations
        if isinstance(metrics.get("overrides"), list):
            fields.update(_fields_from_overrides([str(o) for o in metrics["overrides"]]))
        elif metrics.get("job_type") == "teacher":
            # a managed teacher's folder (under paths.teachers_dir): its name says which teacher it is
            fields.update(config_overrides=(f"teacher {job_dir.name}",), loss="triplet")
        else:
            return Job(name, job_dir, UNREADABLE, error=f"no .hydra/overrides.yaml, and {METRICS_FILE} does not "
                                                        "record the job's overrides: its configuration is unknown")
    if metrics.get("overrides") is not None and (hydra_dir / "overrides.yaml").is_file() and not is_record_of(metrics, overrides):
        # a sweep rerun with other values into this folder: the job of .hydra/ has not claimed it yet
        return Job(name, job_dir, MISSING, error=f"{METRICS_FILE} is another configuration's, "
                                                  f"{' '.join(metrics['overrides'] or []) or '(defaults)'}: not started yet", **fields)
    status = str(metrics.get("status", UNREADABLE))
    best = metrics.get("best") if isinstance(metrics.get("best"), dict) else None
    if status == FINISHED and best is None:
        status = NO_RESULT
    history = metrics.get("history") or []
    last = metrics.get("last") if isinstance(metrics.get("last"), dict) else (history[-1] if history else None)
    return Job(name, job_dir, status, best=best, last=last, teacher=metrics.get("teacher") or None,
               epochs_evaluated=len(metrics.get("history") or []), error=metrics.get("error"), **fields)


def _override_value(overrides: Sequence[str], key: str) -> Any:
    """The value `key=value` among `overrides` gives `key` (YAML-parsed, as Hydra reads it); None without one."""
    for override in overrides:
        if override_key(override) == key and "=" in override:
            text = override.split("=", 1)[1]
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                return text
    return None


def _fields_from_overrides(overrides: list[str]) -> dict[str, Any]:
    """A job's `Job` fields from its recorded overrides, with the config they compose to giving the
    values they leave at a default (a loss option's aomd_ratio and mode, the seed). Overrides this
    installation cannot compose (a plugin's option) give only what they set themselves."""
    from aomd.config import compose

    fields = dict(overrides=tuple(overrides), config_overrides=config_overrides(overrides))
    try:
        cfg = compose(overrides, with_hydra=True)
    except UserError:
        return {**fields, "loss": _override_value(overrides, "loss"), "seed": _override_value(overrides, SEED_KEY),
                "aomd_ratio": _as_float(_override_value(overrides, "loss.aomd_ratio")),
                "mode": _override_value(overrides, "loss.mode")}
    return {**fields, "loss": cfg.hydra.runtime.choices.get("loss"), "seed": cfg.train.seed,
            "aomd_ratio": _as_float(cfg.loss.get("aomd_ratio")), "mode": cfg.loss.get("mode")}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_sweep(sweep_dir: str | Path) -> list[Job]:
    """All jobs of a sweep directory, in job order. Raises ReportError when `sweep_dir` is not a
    directory or holds no job folder."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        raise ReportError(f"{sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory")
    job_dirs = find_job_dirs(sweep_dir)
    if not job_dirs:
        raise ReportError(f"no job folders (with .hydra/ or {METRICS_FILE}) in {sweep_dir}; "
                          "pass the directory of a Hydra multirun sweep (hydra.sweep.dir)")
    jobs = []
    for job_dir in job_dirs:
        relative = job_dir.relative_to(sweep_dir).as_posix()
        jobs.append(read_job(job_dir, sweep_dir.resolve().name if relative == "." else relative))
    return jobs


# --------------------------------------------------------------------------------------------
# aggregation: jobs -> configuration rows


@dataclass
class ConfigRow:
    """One configuration: the jobs sharing `key` (their overrides but the seed).

    `mean` and `std` map each metric of the finished jobs' best epoch ("recall@1", ..., "map@r";
    fractions) to its mean and sample standard deviation over those jobs (std 0 for one job).
    `n` is the number of finished seeds (a job repeating a seed counts once: `repeats`), `jobs`
    all jobs of the configuration, finished or not. `count` maps a metric to how many of those
    seeds measured it, when fewer than n did (jobs of older versions lack some metrics).
    """

    key: tuple[str, ...]
    label: str
    overrides: tuple[str, ...]
    loss: str | None
    aomd_ratio: float
    mode: Any
    jobs: list[Job] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> list[Job]:
        """The finished jobs the means count: one per seed, the first in job order (`repeats`)."""
        return self._by_seed()[0]

    @property
    def repeats(self) -> list[tuple[Job, Job]]:
        """(job, the earlier job of its seed): finished jobs of a seed this configuration already
        has (a folder holding one sweep twice, or a parent folder of two sweeps); counting them
        would make n count runs, not seeds, and shrink the std."""
        return self._by_seed()[1]

    def _by_seed(self) -> tuple[list[Job], list[tuple[Job, Job]]]:
        first_of_seed: dict[str, Job] = {}
        counted, repeats = [], []
        for job in (job for job in self.jobs if job.status == FINISHED):
            # a job without a seed (a managed teacher's folder) repeats nothing
            first = first_of_seed.get(str(job.seed)) if job.seed is not None else None
            if first is not None:
                repeats.append((job, first))
            else:
                counted.append(job)
                if job.seed is not None:
                    first_of_seed[str(job.seed)] = job
        return counted, repeats

    @property
    def n(self) -> int:
        return len(self.finished)

    @property
    def seeds(self) -> list[Any]:
        return [job.seed for job in self.finished]


def is_metric(key: str) -> bool:
    return key.startswith(RETRIEVAL_KEYS)


def metric_keys(rows: Iterable[ConfigRow]) -> list[str]:
    """The main table's metrics present in any row (the selected epoch's test metrics): recall@K
    by K, then map@R and R-Precision."""
    keys = {key for row in rows for key in row.mean if not key.startswith((VALIDATION_PREFIX, LAST_PREFIX))}

    def order(key: str) -> tuple:
        name, _, k = key.partition("@")
        return (name != "recall", int(k) if k.isdigit() else math.inf, key)

    return sorted(keys, key=order)


def selection_keys(rows: Sequence[ConfigRow]) -> list[str]:
    """The selection table's columns: the selected epoch's test Recall@K (smallest K), its
    validation Recall@K when the jobs selected on validation classes, the last epoch's test Recall@K."""
    primary = primary_metric(rows)
    keys = [primary, VALIDATION_PREFIX + primary, LAST_PREFIX + primary]
    return [key for key in keys if any(key in row.mean for row in rows)]


def primary_metric(rows: Iterable[ConfigRow]) -> str:
    """What rows are plotted by: recall@1, or the smallest recall@K the jobs evaluated."""
    recalls = [key for key in metric_keys(rows) if key.startswith("recall@")]
    return recalls[0] if recalls else "recall@1"


def ranking_metric(rows: Sequence[ConfigRow]) -> str:
    """What rows are ranked by: the primary metric on the held-out validation classes when the jobs
    selected their epoch on them (`eval.select=val`: what a sweeper tuned on, so that the ranking
    does not choose on the test classes), else the test one."""
    primary = primary_metric(rows)
    validation = VALIDATION_PREFIX + primary
    with_values = [row for row in rows if primary in row.mean]
    # every configuration with a result selected on validation classes: jobs of both kinds in one folder rank by test
    return validation if with_values and all(validation in row.mean for row in with_values) else primary


def display_override(override: str) -> str:
    """An override as a label shows it: a float value to 4 significant digits
    ("loss.aomd_ratio=125.20653814999464" -> "loss.aomd_ratio=125.2", as a sweeper draws them)."""
    key, equals, value = override.partition("=")
    if equals and "." in value and len(value) > 6:
        try:
            return f"{key}={float(value):.4g}"
        except ValueError:
            pass
    return override


def aggregate(jobs: Iterable[Job]) -> list[ConfigRow]:
    """Group jobs into configurations (same overrides apart from `train.seed`) and average the
    finished jobs' best metrics over seeds. Rows come best first by `ranking_metric` (mean), then
    the rows without a finished job; ties by label."""
    rows: dict[tuple[str, ...], ConfigRow] = {}
    for job in jobs:
        row = rows.get(job.config_key)
        if row is None:
            label = " ".join(map(display_override, job.config_overrides)) or job.loss or "(defaults)"
            row = rows[job.config_key] = ConfigRow(job.config_key, label, job.config_overrides, job.loss,
                                                   job.aomd_ratio, job.mode)
        row.jobs.append(job)
    for row in rows.values():
        values: dict[str, list[float]] = {}
        for job in row.finished:
            for key, value in job.best.items():  # the selected epoch: its test metrics, and its validation Recall@K
                if (is_metric(key) or key.startswith(f"{VALIDATION_PREFIX}recall@")) and isinstance(value, (int, float)):
                    values.setdefault(key, []).append(float(value))
            for key, value in (job.last or {}).items():  # the last epoch's test Recall@K
                if key.startswith("recall@") and isinstance(value, (int, float)):
                    values.setdefault(f"{LAST_PREFIX}{key}", []).append(float(value))
        row.mean = {key: statistics.fmean(v) for key, v in values.items()}
        # sample std (n - 1): the seeds are a sample of the runs one could get; NaN when a value
        # is not finite (statistics.stdev fails on NaN)
        row.std = {key: (statistics.stdev(v) if all(map(math.isfinite, v)) else math.nan) if len(v) > 1 else 0.0
                   for key, v in values.items()}
        row.count = {key: len(v) for key, v in values.items() if len(v) < row.n}
    ranked_by = ranking_metric(list(rows.values()))

    def rank(row: ConfigRow) -> tuple:
        value = row.mean.get(ranked_by)
        missing = value is None or math.isnan(value)
        return (missing, 0.0 if missing else -value, row.label)

    return sorted(rows.values(), key=rank)


def common_overrides(rows: Sequence[ConfigRow]) -> list[str]:
    """Overrides every configuration shares (e.g. `train.epochs=10`), in command-line order."""
    if len(rows) < 2:
        return []
    shared = set(rows[0].key).intersection(*(row.key for row in rows[1:]))
    return [o for o in rows[0].overrides if o in shared]


def short_labels(rows: Sequence[ConfigRow]) -> dict[tuple[str, ...], str]:
    """Row key -> its label without the overrides common to all rows (they are listed once in the
    report), so the table and plots show what differs; the loss option when nothing is left."""
    common = set(common_overrides(rows))

    def labelled(show: Callable[[str], str]) -> dict[tuple[str, ...], str]:
        return {row.key: " ".join(show(o) for o in row.overrides if o not in common) or row.loss or "(defaults)"
                for row in rows}

    labels = labelled(display_override)
    # two values that round alike (0.012341 and 0.012344) keep their digits
    return labels if len(set(labels.values())) == len(labels) else labelled(str)


def teachers(jobs: Iterable[Job]) -> list[tuple[dict[str, Any], int]]:
    """The distinct teacher results of the finished jobs (distillation), each with its job count."""
    found: list[tuple[dict[str, Any], int]] = []
    for job in jobs:
        if job.status != FINISHED or not isinstance(job.teacher, dict):
            continue
        for i, (teacher, count) in enumerate(found):
            if teacher == job.teacher:
                found[i] = (teacher, count + 1)
                break
        else:
            found.append((job.teacher, 1))
    return found


# --------------------------------------------------------------------------------------------
# rendering: Markdown


def metric_title(key: str) -> str:
    """"recall@1" -> "Recall@1", "map@r" -> "MAP@R", "r_precision" -> "R-Precision",
    "val/recall@1" -> "val Recall@1", "last/recall@1" -> "last-epoch Recall@1"."""
    for prefix, words in ((VALIDATION_PREFIX, "val "), (LAST_PREFIX, "last-epoch ")):
        if key.startswith(prefix):
            return words + metric_title(key[len(prefix):])
    name, _, k = key.partition("@")
    return f"Recall@{k}" if name == "recall" else {"map@r": "MAP@R", "r_precision": "R-Precision"}.get(key, key)


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def format_cell(row: ConfigRow, key: str) -> str:
    """"45.67 ± 1.23" (percent, 2 decimals); the mean alone for one seed; "-" when not measured;
    "(n=1)" after it when fewer seeds than the row's n measured it."""
    if key not in row.mean:
        return "-"
    count = row.count.get(key, row.n)
    text = percent(row.mean[key]) if count < 2 else f"{percent(row.mean[key])} ± {percent(row.std[key])}"
    return text if count == row.n else f"{text} (n={count})"


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _n_cell(row: ConfigRow) -> str:
    jobs = len(row.jobs) - len(row.repeats)
    return str(row.n) if row.n == jobs else f"{row.n} of {jobs}"


def render_selection(rows: Sequence[ConfigRow], labels: dict[tuple[str, ...], str]) -> str:
    """Per configuration (in the main table's order), the selected epoch's test Recall@K beside the
    last epoch's, and the validation Recall@K that selected the epoch when there is one."""
    keys = selection_keys(rows)
    lines = []
    for row in rows:
        if row.n:
            epochs = [job.best.get("epoch") for job in row.finished if job.best.get("epoch") is not None]
            # epoch 0 is the network before training: a short pilot run can select it
            which = (f" at the selected epoch{'s' * (len(epochs) > 1)} {', '.join(map(str, epochs))}"
                     f"{' (0: before training)' if 0 in epochs else ''}" if epochs else "")
            values = [f"{metric_title(key).replace('last-epoch ', 'last epoch ')} {format_cell(row, key)}" for key in keys[1:]]
            lines.append(f"- {_code(labels[row.key])}: {metric_title(keys[0])} {format_cell(row, keys[0])}{which}; "
                         + "; ".join(values))
    return "\n".join(lines)


def render_table(rows: Sequence[ConfigRow], labels: dict[tuple[str, ...], str] | None = None) -> str:
    """The Markdown table: rank, configuration, n (finished seeds; "2 of 3" when some job of the
    configuration did not finish), then each metric as mean ± std in percent."""
    labels = labels or {row.key: row.label for row in rows}
    ranked_by = ranking_metric(rows)
    keys = [ranked_by] * ranked_by.startswith(VALIDATION_PREFIX) + metric_keys(rows)  # what ranks the rows, first
    header = ["#", "configuration", "n", *map(metric_title, keys)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:", ":---", "---:"] + ["---:"] * len(keys)) + "|"]
    rank = 0
    for row in rows:
        ranked = math.isfinite(row.mean.get(ranked_by, math.nan))  # rows without a finite value come last, unranked
        rank += ranked
        cells = [str(rank) if ranked else "-", _code(labels[row.key]), _n_cell(row), *(format_cell(row, key) for key in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_unfinished(job: Job) -> str:
    """Why a job has no result, in one line."""
    if job.status == MISSING:
        return job.error or "no metrics.json (crashed before training started, or not started yet)"
    if job.status == "running":
        text = f"running, {job.epochs_evaluated} epoch(s) evaluated"
        recalls = sorted((k for k in (job.best or {}) if k.startswith("recall@") and k[7:].isdigit()), key=lambda k: int(k[7:]))
        if recalls and isinstance(job.best[recalls[0]], (int, float)):
            text += f", best {metric_title(recalls[0])} so far {percent(job.best[recalls[0]])}"
        return text + " (or killed without a record)"
    if job.status == NO_RESULT:
        return "finished without an evaluated epoch"
    error = (job.error or "").strip().splitlines()
    detail = error[0] if error else "no error message"
    return f"{job.status}: {detail[:300]}"


def render_unfinished(jobs: Sequence[Job], labels: dict[tuple[str, ...], str] | None = None) -> str:
    """The Markdown list of jobs that did not finish: job folder, configuration, seed, why."""
    unfinished = [job for job in jobs if job.status != FINISHED]
    if not unfinished:
        return ""
    lines = [f"## Jobs not finished ({len(unfinished)})", "",
             "Not in the means above; the row's n counts only finished seeds.", ""]
    for job in unfinished:
        label = (labels or {}).get(job.config_key) or " ".join(job.config_overrides) or job.loss or "(defaults)"
        seed = "" if job.seed is None else f", seed {job.seed}"
        lines.append(f"- job {_code(job.name)}: {_code(label)}{seed}: {describe_unfinished(job)}")
    return "\n".join(lines)


def render_repeats(rows: Sequence[ConfigRow], labels: dict[tuple[str, ...], str]) -> str:
    """The Markdown list of finished jobs that repeat a configuration and seed: job, the job it repeats."""
    repeats = [(row, job, first) for row in rows for job, first in row.repeats]
    if not repeats:
        return ""
    lines = [f"## Jobs repeating a seed ({len(repeats)})", "",
             "Each repeats the configuration and seed of an earlier job, which the means count instead.", ""]
    for row, job, first in repeats:
        lines.append(f"- job {_code(job.name)}: {_code(labels[row.key])}, seed {job.seed}: repeats job {_code(first.name)}")
    return "\n".join(lines)


def _selection_text(jobs: Sequence[Job]) -> str:
    """How the jobs chose their epoch, from their records ("best test Recall@1" for records
    written before the selection was recorded)."""
    texts = set()
    for job in jobs:
        selection = read_record(job.path).get("selection") if job.status == FINISHED and job.path else None
        select = (selection or {}).get("select", "test")
        texts.add({"test": "best test Recall@K, the reference's practice", "last": "the last epoch",
                   "val": "best validation Recall@K on held-out training classes"}[select])
    return "; ".join(sorted(texts)) or "best test Recall@K"


def render_report(sweep_dir: Path, jobs: Sequence[Job], rows: Sequence[ConfigRow],
                  plots: dict[str, str | None]) -> str:
    """The whole report.md. `plots` maps each PNG file name to None (written, linked) or the
    reason it was not drawn."""
    labels = short_labels(rows)
    counts: dict[str, int] = {}
    for job in jobs:
        # a MISSING job with an error holds another configuration's metrics.json: it is not started
        status = "not started" if job.status == MISSING and job.error else job.status
        counts[status] = counts.get(status, 0) + 1
    status_text = ", ".join(f"{count} {'without metrics.json' if status == MISSING else status}"
                            for status, count in sorted(counts.items(), key=lambda s: (s[0] != FINISHED, s[0])))
    primary = metric_title(primary_metric(rows))
    ranked_by = metric_title(ranking_metric(rows))
    parts = [f"# Sweep report: {sweep_dir}", "",
             f"{len(jobs)} job{'s' * (len(jobs) != 1)} ({status_text}) in {len(rows)} configuration{'s' * (len(rows) != 1)}.",
             f"Values are the test metrics of each job's selected epoch ({_selection_text(jobs)}) in percent, "
             f"mean ± sample std over the seeds (`{SEED_KEY}`; n = finished seeds, the mean alone for n = 1), "
             f"best {ranked_by} first. Below the table, the selected epoch's test {primary} beside the last "
             f"epoch's and, when the epoch was selected on held-out training classes, their {primary} (val).", ""]
    common = common_overrides(rows)
    if common:
        parts += ["Overrides common to all configurations: " + " ".join(map(_code, common)), ""]
    parts += [render_table(rows, labels), ""]
    if any(row.n for row in rows):
        parts += [f"{metric_title(primary_metric(rows))} of the selected epoch against the last epoch"
                  f"{' and the validation classes' if any(k.startswith(VALIDATION_PREFIX) for k in selection_keys(rows)) else ''}:",
                  "", render_selection(rows, labels), ""]
    for teacher, count in teachers(jobs):
        values = ", ".join(f"{metric_title(k)} {percent(v)}" for k, v in teacher.items()
                           if is_metric(k) and isinstance(v, (int, float)))
        parts += [f"Teacher ({count} job{'s' if count > 1 else ''}): {values}", ""]
    for section in (render_unfinished(jobs, labels), render_repeats(rows, labels)):
        if section:
            parts += [section, ""]
    parts += ["## Plots", ""]
    for name, title in ((RATIO_PLOT, f"{primary} against loss.aomd_ratio"), (BARS_PLOT, f"{primary} per configuration")):
        reason = plots.get(name, "not drawn")
        parts += [f"![{title}]({name})" if reason is None else f"- {title}: no plot ({reason})", ""]
    return "\n".join(parts).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# rendering: plots


def _figure(width: float, height: float):
    # the object-oriented API with no pyplot: no global backend or figure state, and it works
    # without a display (the Agg canvas renders PNGs)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _single_teacher_value(rows: Iterable[ConfigRow], key: str) -> float | None:
    found = teachers(job for row in rows for job in row.jobs)
    values = {t.get(key) for t, _ in found}
    value = values.pop() if len(values) == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def _plottable(row: ConfigRow, metric: str) -> bool:
    return metric in row.mean and math.isfinite(row.mean[metric]) and math.isfinite(row.std[metric])


MAX_LINES = 8  # more lines than this (or mostly one-point lines, as a search draws them): a scatter
MAX_RATIO_TICKS = 8  # more swept ratios than this: the log axis's own ticks (one label per ratio would overlap)


@dataclass
class RatioSeries:
    """One series of the ratio plot: `rows` (by aomd_ratio) drawn at x = ratio x `dodge`, joined
    by a line when `joined`."""

    label: str
    rows: list[ConfigRow]
    dodge: float = 1.0
    joined: bool = True


def ratio_series(points: Sequence[ConfigRow]) -> list[RatioSeries]:
    """The series of the ratio plot: a line per configuration but its aomd_ratio (labelled by
    loss.mode and the other overrides that differ between lines); when there are more than
    `MAX_LINES` or most would be one point (a search: `preset=optuna_aomd` gives each trial its
    own weights), unjoined points per loss.mode instead."""
    lines: dict[tuple, list[ConfigRow]] = {}
    for row in points:
        rest = tuple(o for o in row.key if override_key(o) != "loss.aomd_ratio")
        lines.setdefault((str(row.mode), rest), []).append(row)
    if len(lines) > MAX_LINES or 2 * sum(len(members) > 1 for members in lines.values()) < len(lines):
        by_mode: dict[str, list[ConfigRow]] = {}
        for row in points:
            by_mode.setdefault(str(row.mode), []).append(row)
        return [RatioSeries(f"mode {mode}", sorted(members, key=lambda r: r.aomd_ratio), joined=False)
                for mode, members in sorted(by_mode.items())]
    shared = set.intersection(*(set(rest) for _, rest in lines))
    # lines are shifted apart by a few percent of a ratio (5% either way at most) so equal points
    # and their error bars stay distinguishable; the ticks mark the true ratios
    step = min(0.03, 0.1 / max(len(lines) - 1, 1))
    series = []
    for i, ((mode, rest), members) in enumerate(sorted(lines.items())):
        extra = [display_override(o) for o in rest if o not in shared and override_key(o) != "loss.mode"]
        series.append(RatioSeries(f"mode {mode}" + (f" ({' '.join(extra)})" if extra else ""),
                                  sorted(members, key=lambda r: r.aomd_ratio), 1 + step * (i - (len(lines) - 1) / 2)))
    return series


def plot_recall_vs_ratio(rows: Sequence[ConfigRow], path: Path) -> str | None:
    """Recall@1 (mean, std error bars) against loss.aomd_ratio on a log axis, in the series of
    `ratio_series`. Writes `path` and returns None, or returns why there is nothing to plot."""
    metric = primary_metric(rows)
    points = [row for row in rows if row.aomd_ratio > 0 and _plottable(row, metric)]
    if not points:
        return "no finished job with a non-zero loss.aomd_ratio"
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    for series in ratio_series(points):
        ax.errorbar([r.aomd_ratio * series.dodge for r in series.rows], [100 * r.mean[metric] for r in series.rows],
                    yerr=[100 * r.std[metric] for r in series.rows], marker="o", capsize=4, label=series.label,
                    linestyle="-" if series.joined else "none")
    teacher = _single_teacher_value(points, metric)
    if teacher is not None:
        ax.axhline(100 * teacher, color="gray", linestyle="--", linewidth=1, label="teacher")
    ax.set_xscale("log")
    ratios = sorted({r.aomd_ratio for r in points})
    if len(ratios) <= MAX_RATIO_TICKS:
        # label the swept ratios themselves: log-axis decades alone hide which values were run
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

        ax.xaxis.set_major_locator(FixedLocator(ratios))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticklabels([f"{r:.4g}" for r in ratios])
    if len(ratios) == 1:
        ax.set_xlim(ratios[0] / 2, ratios[0] * 2)
    ax.set_xlabel("loss.aomd_ratio (log scale)")
    ax.set_ylabel(f"{metric_title(metric)} (%)")
    ax.set_title(f"{metric_title(metric)} against AOMD ratio (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    # outside the axes, right of them: it never hides a point
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, bbox_inches="tight")
    return None


def plot_configurations(rows: Sequence[ConfigRow], path: Path) -> str | None:
    """Recall@1 of each configuration with a finished job as horizontal bars (std error bars), in
    the table's order (best on top; by validation Recall@1 when the jobs selected on it, as the
    title then says); AOMD configurations (non-zero aomd_ratio) in another colour than the baselines.
    Writes `path` and returns None, or returns why there is nothing to plot."""
    metric = primary_metric(rows)
    shown = [row for row in rows if _plottable(row, metric)]
    if not shown:
        return "no finished job"
    labels = short_labels(rows)
    means = [100 * row.mean[metric] for row in shown]
    stds = [100 * row.std[metric] for row in shown]
    colors = ["tab:orange" if row.aomd_ratio > 0 else "tab:blue" for row in shown]
    fig = _figure(8.0, max(2.4, 0.38 * len(shown) + 1.4))
    ax = fig.add_subplot()
    positions = range(len(shown))
    ax.barh(positions, means, xerr=stds, color=colors, capsize=3, height=0.7)
    ax.set_yticks(list(positions))
    ax.set_yticklabels([labels[row.key] + ("" if row.n == len(row.jobs) == 1 else f"  (n={_n_cell(row)})")
                        for row in shown], fontsize="small")
    ax.invert_yaxis()  # rows are best first: best on top
    for y, (mean, std) in enumerate(zip(means, stds)):
        ax.text(mean + std + 0.5, y, f"{mean:.2f}", va="center", fontsize="x-small")
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=label) for color, label in (("tab:orange", "AOMD"), ("tab:blue", "other losses"))
               if color in colors]
    teacher = _single_teacher_value(shown, metric)
    if teacher is not None:
        handles.append(ax.axvline(100 * teacher, color="gray", linestyle="--", linewidth=1, label="teacher"))
    right = max([m + s for m, s in zip(means, stds)] + ([100 * teacher] if teacher is not None else []))
    ax.set_xlim(0, right * 1.12 + 3)  # room for the value labels
    ax.set_xlabel(f"{metric_title(metric)} (%)")
    ranked_by = ranking_metric(rows)
    order = "" if ranked_by == metric else f", ordered by {metric_title(ranked_by)}"  # the table's order: say so
    ax.set_title(f"{metric_title(metric)} per configuration (mean ± std over seeds{order})")
    ax.grid(True, axis="x", alpha=0.3)
    if len(handles) > 1:  # outside the axes, right of them: it never hides a bar
        ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, bbox_inches="tight")  # "tight": long configuration labels stay in the image
    return None


# --------------------------------------------------------------------------------------------
# CLI


@dataclass
class Report:
    """What `write_report` produced: the Markdown table and report, the files written."""

    jobs: list[Job]
    rows: list[ConfigRow]
    table: str
    markdown: str
    files: list[Path]


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Read the sweep, write report.md and the plots into `out_dir` (default: the sweep dir).
    A plot that has nothing to show is not written, and an old one of the same name is removed
    (so the folder never shows a plot of another sweep state). Raises ReportError on bad arguments."""
    sweep_dir = Path(sweep_dir)
    jobs = read_sweep(sweep_dir)
    rows = aggregate(jobs)
    out = Path(out_dir) if out_dir is not None else sweep_dir
    if out.exists() and not out.is_dir():
        raise ReportError(f"the output directory {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write(sweep_dir, out, jobs, rows)
    except OSError as error:  # e.g. a read-only sweep folder: say so, and that --out helps
        raise ReportError(f"cannot write the report into {out} ({_first_line(error)}); "
                          "choose another folder with --out") from None


def _write(sweep_dir: Path, out: Path, jobs: list[Job], rows: list[ConfigRow]) -> Report:
    files = []
    plots: dict[str, str | None] = {}
    for name, plot in ((RATIO_PLOT, plot_recall_vs_ratio), (BARS_PLOT, plot_configurations)):
        plots[name] = plot(rows, out / name)
        if plots[name] is None:
            files.append(out / name)
        elif (out / name).is_file():
            (out / name).unlink()
    markdown = render_report(sweep_dir, jobs, rows, plots)
    (out / REPORT_FILE).write_text(markdown, encoding="utf-8")
    files.insert(0, out / REPORT_FILE)
    return Report(jobs, rows, render_table(rows, short_labels(rows)), markdown, files)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROGRAM}",
        description="Summarise a Hydra multirun sweep of aomd.train: a Markdown table (one row per "
                    "configuration, mean ± std over train.seed, best first), the jobs that did not "
                    "finish, and PNG plots.")
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory (hydra.sweep.dir), holding one folder per job")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where to write report.md and the plots (default: the sweep directory)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir, args.out)
    except ReportError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr, flush=True)
        return 2
    text = report.table
    labels = short_labels(report.rows)
    for section in (render_unfinished(report.jobs, labels), render_repeats(report.rows, labels)):
        if section:
            text += "\n\n" + section
    common = common_overrides(report.rows)
    if common:
        text = "Overrides common to all configurations: " + " ".join(common) + "\n\n" + text
    _print(text)
    for path in report.files:
        print(f"{PROGRAM}: wrote {path}", file=sys.stderr)
    return 0


def _print(text: str) -> None:
    # "±" on a terminal that cannot encode it (e.g. LANG=C on old Pythons): replace, do not crash
    try:
        print(text, flush=True)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "ascii"
        print(text.encode(encoding, errors="replace").decode(encoding), flush=True)


if __name__ == "__main__":
    sys.exit(main())
