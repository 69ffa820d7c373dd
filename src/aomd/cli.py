"""What the Hydra entrypoints share: user errors as one line, and failed sweep jobs recorded."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from aomd.errors import UserError
from aomd.tracking import read_metrics, write_json_atomic, METRICS_FILE

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(job_dir: Path, error: BaseException) -> None:
    """Make the job's metrics.json say it failed (the tracker already does once training started)."""
    state = read_metrics(job_dir) or {"best": None, "history": []}
    if state.get("status") != "failed":
        state.update(status="failed", error=f"{type(error).__name__}: {error}")
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(job_dir / METRICS_FILE, state)


def run_task(task: Callable[[DictConfig], float], cfg: DictConfig, program: str) -> float:
    """Run a task function. A single run ends on bad input with one line on stderr and exit code 2;
    in a sweep, a failed job (bad value, NaN, out of memory, ...) is recorded in its metrics.json
    and returns NaN, so the other jobs go on."""
    try:
        return task(cfg)
    except Exception as error:
        if in_multirun():
            job_dir = Path(HydraConfig.get().runtime.output_dir)
            record_failure(job_dir, error)
            log.error("Job %s failed: %s: %s", HydraConfig.get().job.num, type(error).__name__, error,
                      exc_info=not isinstance(error, UserError))
            return math.nan
        if isinstance(error, UserError):
            print(f"{program}: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


def check_group_options(argv: list[str], config_path: str, program: str) -> None:
    """Exit with one line when a `group=option` override names an option that does not exist.

    Hydra reports this too, over many lines; this says it in one, with the valid options.
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group = Path(config_path) / key
        if "." in key or "/" in key or not group.is_dir() or any(c in value for c in "()[]{}$"):
            continue  # a key, a Hydra group such as hydra/launcher, or a sweep expression
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):
            if option not in options and option != "null":
                print(f"{program}: error: unknown {key} option {option!r}; choose one of: {', '.join(options)}.",
                      file=sys.stderr, flush=True)
                sys.exit(2)


class SweepSummary(Callback):
    """Hydra callback: at the end of a sweep, say how many jobs finished and which failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        states = {job.parent.name: read_metrics(job.parent) for job in sorted(sweep_dir.glob("*/.hydra"))}
        failed = {name: s.get("error", "") for name, s in states.items() if (s or {}).get("status") != "finished"}
        print(f"\nSweep {sweep_dir}: {len(states) - len(failed)} of {len(states)} jobs finished.", flush=True)
        for name, error in failed.items():
            print(f"  job {name} failed: {error or 'no metrics.json'}", flush=True)
        print(f"Compare the jobs with: python -m aomd.report {sweep_dir}", flush=True)
