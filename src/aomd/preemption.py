"""Stopping a training job on a signal without losing the steps it trained.

A job can be asked to stop by SIGTERM (`kill`, SLURM's `scancel`, `scontrol requeue` and time
limit), SIGINT (Ctrl-C) or the preemption signal SIGUSR2 (what SLURM sends `signal_delay_s`
before the time limit, on preemption, or with `scancel --signal=USR2`; submitit's
`SUBMITIT_PREEMPT_SIGNAL` names another). While `StopSignals` is active these signals only set
`requested`: the training loop finishes the step in progress, writes `checkpoints/last.pt` (an
exact mid-epoch state, `aomd.engine.fit`) and calls `stop()`, which then does what the signal
would have done without the guard:

- a Python handler installed before (submitit's: checkpoint the call, requeue the SLURM job, exit;
  Python's SIGINT handler: KeyboardInterrupt) is called;
- a signal whose action was to end the process ends it with SystemExit(128 + signal number), so
  `finally` blocks run and the job's record says it was interrupted.

A second signal while the first waits acts at once. Signals the process ignores stay ignored.
DataLoader workers ignore the stop signals (`ignore_in_worker`): the training process decides.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Callable

log = logging.getLogger(__name__)

last_stop: str | None = None  # why the last guarded job of this process stopped (for its record)


def stop_signals() -> list[signal.Signals]:
    """SIGTERM, SIGINT, SIGUSR2 and submitit's preemption signal, where the platform has them."""
    names = {"SIGTERM", "SIGINT", "SIGUSR2", "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()}
    return sorted({getattr(signal, name) for name in names if hasattr(signal, name)})


def ignore_in_worker(_worker_id: int = 0) -> None:
    """`worker_init_fn` of the loaders: a forked worker would otherwise run the parent's handlers
    (submitit's would requeue the job a second time) or die on a signal meant for the job."""
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)


class StopSignals:
    """Context manager: while active, a stop signal is recorded in `requested` (its number) and
    acted on when the owner calls `stop()`, after saving its state. A no-op outside the main
    thread, where Python cannot install signal handlers."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in stop_signals():
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_IGN, None):  # ignored, or installed outside Python: left alone
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _request(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            _act(self._previous.get(signum, signal.SIG_DFL), signum, frame)  # asked twice: no waiting
        self.requested = signum
        log.warning("Caught %s: stopping after the current step, once checkpoints/last.pt is written.",
                    signal.Signals(signum).name)

    def stop(self, where: str) -> None:
        """Act on the requested signal; the caller has saved its state, which `where` describes."""
        global last_stop
        assert self.requested is not None, "stop() without a requested stop"
        signum, self.requested = self.requested, None
        last_stop = f"stopped by {signal.Signals(signum).name} {where}; the next run of this job continues from there"
        log.warning("%s %s: saved checkpoints/last.pt; the next run of this job (train.resume=auto) continues from it.",
                    signal.Signals(signum).name, where)
        previous = self._previous.get(signum, signal.SIG_DFL)
        # while it acts, the previous handlers take the signals that come (SLURM's SIGTERM after
        # submitit requeued the job); if it returns, the job goes on, guarded again
        self.__exit__()
        _act(previous, signum, None)
        self.__enter__()


def _act(handler: Callable[[int, FrameType | None], Any] | int, signum: int, frame: FrameType | None) -> None:
    """What `signum` does with `handler` installed (SIG_DFL: the stop signals end the process)."""
    if callable(handler):
        handler(signum, frame)  # may return: submitit ignores SIGTERM, SLURM ends the job itself
        return
    raise SystemExit(128 + signum)
