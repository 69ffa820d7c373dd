"""What the Hydra entrypoints share: user errors as one line, and failed sweep jobs recorded."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from aomd import preemption
from aomd.config import check_before_start, chooses_other_configs, config_dir
from aomd.errors import UserError
from aomd.records import FINISHED, RUNNING, override_key, read_record, record_failure
from aomd.report import find_job_dirs

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(task: Callable[[DictConfig], float], cfg: DictConfig, program: str) -> float | None:
    """Run a task function. A single run ends on bad input with one line on stderr and exit code 2;
    in a sweep, a failed job (bad value, NaN, out of memory, ...) is recorded in its metrics.json
    and returns None, so the other jobs go on (an Optuna sweep records it as a failed trial: a NaN
    would crash hydra-optuna-sweeper). Ctrl-C ends it with one line and exit code 130."""
    try:
        return task(cfg)
    except KeyboardInterrupt:  # Ctrl-C: one line instead of a traceback; a sweep ends too
        print(f"{program}: interrupted; {continuation()}.", file=sys.stderr, flush=True)
        sys.exit(130)
    except SystemExit:  # a stop signal acted after the job saved (aomd.preemption): where to continue it
        if preemption.last_stop:
            print(f"{program}: {preemption.last_stop.split(';')[0]}; {continuation()}.", file=sys.stderr, flush=True)
        raise
    except Exception as error:
        if in_multirun():
            job_dir = Path(HydraConfig.get().runtime.output_dir)
            record_failure(job_dir, error, list(HydraConfig.get().overrides.task))
            log.error("Job %s failed: %s: %s", HydraConfig.get().job.num, type(error).__name__, error,
                      exc_info=not isinstance(error, UserError))
            return None
        if isinstance(error, UserError):
            print(f"{program}: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


def continuation() -> str:
    """How a stopped job continues: "the same command with <override> continues it", the override
    that runs it again in its own folder (the default folders are named by the time of the
    command, so the same command alone would start over in a new one), with train.resume=auto in
    place of a train.resume=never that would start it over again (resume.own_unfinished_run: a
    train.resume=<folder> job goes on from its own folder)."""
    hydra_cfg = HydraConfig.get()
    folder = f"hydra.sweep.dir={hydra_cfg.sweep.dir}" if in_multirun() else f"hydra.run.dir={hydra_cfg.runtime.output_dir}"
    resume = [o.split("=", 1)[-1] for o in hydra_cfg.overrides.task if override_key(o) == "train.resume"]
    if resume and resume[-1] == "never":
        return f"the same command with {folder} train.resume=auto continues it"
    return f"the same command with {folder} continues it" + ("" if resume else " (train.resume=auto)")


def start(argv: list[str], config_name: str, program: str) -> None:
    """What an entrypoint does before Hydra starts: an unknown group option, a wrong type or an
    unknown key in any job of the command line ends it with one line and exit code 2."""
    check_group_options(argv, config_dir(), program)
    try:
        check_before_start(argv, config_name)
    except UserError as error:
        _exit(program, str(error))


def _search_path(argv: list[str], program: str) -> list[Path]:
    """Config folders added with `hydra.searchpath=[file:///...]` (a user's own group options).
    Hydra passes over an entry it cannot use without a word, and the options in it are then
    reported unknown: an entry without `file://` (or `pkg://`) or a folder that does not exist
    ends the command with one line that says so."""
    folders = []
    for arg in argv:
        if arg.startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("file://"):
                    folder = Path(entry[len("file://"):])
                    if not folder.is_dir():
                        _exit(program, f"hydra.searchpath folder {folder} does not exist; pass the folder that holds "
                                       f"your config groups, as file:///<absolute path>.")
                    folders.append(folder)
                elif entry and not entry.startswith("pkg://"):
                    _exit(program, f"hydra.searchpath entry {entry!r} needs a scheme: file://{entry} for a folder "
                                   f"(hydra.searchpath=[file:///<absolute path>]).")
    return folders


def _exit(program: str, message: str) -> NoReturn:
    """End the command with one line on stderr and exit code 2 (bad input)."""
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_group_options(argv: list[str], config_path: str, program: str) -> None:
    """Exit with one line when a `group=option` override names an option that does not exist.

    Hydra reports this too, over many lines; this says it in one, with the valid options
    (those of the package and of the folders added with `hydra.searchpath`).
    """
    if chooses_other_configs(argv):  # other config folders or names: Hydra checks their options
        return
    folders = [Path(config_path), *_search_path(argv, program)]
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        groups = [folder / key for folder in folders if (folder / key).is_dir()]
        if "." in key or "/" in key or not groups or any(c in value for c in "()[]{}$"):
            continue  # a key, a Hydra group such as hydra/launcher, or a sweep expression
        options = sorted({p.stem for group in groups for p in group.glob("*.yaml")})
        for option in value.split(","):
            if option not in options and option != "null":
                _exit(program, f"unknown {key} option {option!r}; choose one of: {', '.join(options)} (an option of your "
                               f"own: add its folder with hydra.searchpath=[file:///<folder>], README: Extending).")


class SweepSummary(Callback):
    """Hydra callback: at the end of a sweep, say how many of its jobs finished and which did not;
    a sweep with a job that did not finish exits with status 1, so a script can tell. Its jobs are
    the folders whose Hydra files this sweep wrote: job folders of an earlier sweep into the same
    directory that this one did not run again are not its own."""

    started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time() - 2  # coarse file-system clocks

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        written = [job / ".hydra" / "overrides.yaml" for job in find_job_dirs(sweep_dir)]  # nested subdirs too
        states = {path.parents[1].relative_to(sweep_dir).as_posix(): read_record(path.parents[1]) for path in written
                  if path.is_file() and path.stat().st_mtime >= self.started}
        unfinished = {name: s or {} for name, s in states.items() if (s or {}).get("status") != FINISHED}
        print(f"\nSweep {sweep_dir}: {len(states) - len(unfinished)} of {len(states)} jobs finished.", flush=True)
        for name, state in unfinished.items():
            status = "failed" if state.get("status") in (None, RUNNING) else state["status"]
            why = state.get("error") or ("ended without updating its metrics.json" if state else "no metrics.json")
            print(f"  job {name} {status}: {why}", flush=True)
        print(f"Compare the jobs with: python -m aomd.report {sweep_dir}", flush=True)
        if unfinished:
            sys.exit(1)
