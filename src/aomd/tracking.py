"""Where results go: the console, `metrics.json` in the job directory, and one W&B run per job."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
RETRIEVAL_KEYS = ("recall@", "map@", "r_precision")  # the prefixes of the test metrics in a record
TRAINING_SPEED_KEYS = ("epoch_seconds", "images_per_second")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"mode": 2}} -> {"loss.mode": 2}: W&B can plot and group by every key."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=True))
    os.replace(tmp, path)


class Tracker:
    """Records one job: a W&B run (when `logger.enabled` and mode is not disabled), the
    `metrics.json` file (rewritten after every epoch, so an unfinished job shows its progress)
    and a console line per epoch.

    metrics.json: {"status": running|finished|failed, "overrides": the job's command-line overrides,
    "runtime": the resolved device and precision, "best": record, "history": [record, ...],
    "dataset": {...}, "teacher": {...} (distillation only), "error": "..." (failed jobs)}, where a
    record holds "epoch", "recall@K", "map@r", the mean training "loss" and each term's "loss/<term>".
    """

    def __init__(self, cfg: DictConfig, out_dir: Path, job_type: str, dataset_summary: dict[str, int],
                 run_name: str | None = None, tags: list[str] | None = None,
                 overrides: list[str] | None = None, runtime: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = {"status": "running", "job_type": job_type, "overrides": overrides,
                                      "runtime": runtime, "best": None, "history": [], "dataset": dataset_summary}
        if runtime:
            log.info("Running on %s (%s), precision %s%s%s.", runtime["device"], runtime["device_name"], runtime["precision"],
                     ", channels_last" if runtime["channels_last"] else "", ", compiled" if runtime["compile"] else "")
        self.run = None
        logger = cfg.logger
        if logger.enabled and logger.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=logger.project,
                entity=logger.entity,
                group=logger.group,
                name=logger.name or run_name,
                job_type=job_type,
                tags=[*logger.tags, *(tags or [])],
                mode=logger.mode,
                dir=str(self.out_dir),
                config={**flatten(OmegaConf.to_container(cfg, resolve=True)),
                        **{f"runtime.{k}": v for k, v in (runtime or {}).items()}},
                reinit="finish_previous",
            )
            self.run.summary.update({f"dataset/{k}": v for k, v in dataset_summary.items()})
        self._save()

    def log_teacher(self, metrics: dict[str, float]) -> None:
        """The teacher's test metrics, once per job, next to the student's."""
        self.state["teacher"] = metrics
        log.info("teacher: %s", _format(metrics))
        if self.run is not None:
            self.run.summary.update({f"teacher/{k}": v for k, v in metrics.items()})
        self._save()

    def log_epoch(self, record: dict[str, Any], is_best: bool) -> None:
        """One evaluated epoch; `is_best` when it is the new best (the engine decides which epochs count)."""
        self.state["history"].append(record)
        if is_best:
            self.state["best"] = record
        log.info("epoch %d: %s", record["epoch"], _format({k: v for k, v in record.items() if k != "epoch"}))
        if self.run is not None:
            logged = {f"train/{k}": v for k, v in record.items() if k.startswith("loss") or k in TRAINING_SPEED_KEYS}
            logged.update({f"test/{k}": v for k, v in record.items() if k.startswith(RETRIEVAL_KEYS)})
            self.run.log({"epoch": record["epoch"], **logged}, step=record["epoch"])
            if is_best:
                self.run.summary.update({f"best/{k}": v for k, v in record.items()})
        self._save()

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        self.state["status"] = status
        if error:
            self.state["error"] = error
        self._save()
        if self.run is not None:
            self.run.summary["status"] = status
            self.run.finish(exit_code=0 if status == "finished" else 1)
            self.run = None

    def _save(self) -> None:
        write_json_atomic(self.out_dir / METRICS_FILE, self.state)

    def summary_table(self) -> str:
        """The per-epoch history as a fixed-width table, the best epoch marked with *."""
        history = self.state["history"]
        if not history:
            return "(no epoch evaluated)"
        metric_keys = [k for k in history[0] if k.startswith(RETRIEVAL_KEYS)]
        headers = ["epoch", "loss", *metric_keys]
        best_epoch = (self.state["best"] or {}).get("epoch")
        rows = []
        for r in history:
            loss = r.get("loss")
            rows.append([f"{r['epoch']}{'*' if r['epoch'] == best_epoch else ''}",
                         "-" if loss is None else f"{loss:.4f}", *(f"{100 * r[k]:.2f}" for k in metric_keys)])
        if "teacher" in self.state:
            t = self.state["teacher"]
            rows.append(["teacher", "-", *(f"{100 * t[k]:.2f}" if k in t else "-" for k in metric_keys)])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
        return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _format(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float) and (key.startswith(RETRIEVAL_KEYS)):
            parts.append(f"{key} {100 * value:.2f}")
        elif isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key} {value:.4g}")
    return ", ".join(parts)


def read_metrics(job_dir: str | Path) -> dict[str, Any] | None:
    """The metrics.json of a job directory, or None when there is none."""
    path = Path(job_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
