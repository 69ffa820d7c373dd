"""Stopping a training job on a signal without losing the steps it trained.

A job can be asked to stop by SIGTERM (`kill`; SLURM's `scancel`, `scontrol requeue`, time limit
and, by default, preemption), SIGINT (Ctrl-C), the preemption signal SIGUSR2 (what SLURM sends
`signal_delay_s` before the time limit, on preemption where the cluster sets
`PreemptParameters=send_user_signal`, or with `scancel --signal=USR2`; submitit's
`SUBMITIT_PREEMPT_SIGNAL` names another) or SIGUSR1 (what many SLURM scripts of one's own ask for:
`#SBATCH --signal=B:USR1@90` with `exec python -m aomd.train ...`, or `--signal=USR1@90` for a job
started by `srun`). While `StopSignals` is active these signals only set
`requested`: the training loop finishes the step in progress (an epoch's evaluation stops at its
next batch, and the resumed job evaluates that epoch), writes `checkpoints/last.pt` (an exact
mid-epoch state, `aomd.engine.fit`) and calls `stop()`, which then does what the signal would have
done without the guard:

- a Python handler installed before is called: submitit's for SIGUSR2 checkpoints the call,
  requeues the SLURM job and exits; Python's for SIGINT raises KeyboardInterrupt;
- SIGTERM and SIGINT end the job even when that handler returns (submitit only logs SIGTERM:
  SLURM sends it when it ends the job, and SIGKILL follows `KillWait` seconds later);
- a signal without a Python handler ends the job with SystemExit(128 + signal number), so that
  `finally` blocks run and the job's record says it was interrupted.

A second signal while the first waits acts at once (the preemption signal first, whichever came
first, so that submitit requeues the job from the last saved state), except the preemption signal
after SIGTERM (submitit's own preemption sends both at once): the stop becomes a requeue, after
the save.
A signal that comes after the loop's last check is acted on when the guard exits. Signals the
process ignores stay ignored. DataLoader workers ignore the stop signals (`ignore_in_worker`): the
training process decides, and a worker that died of SIGTERM would make PyTorch raise in the
training process before it could save.
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


def preemption_signal() -> int | None:
    """Submitit's preemption signal: $SUBMITIT_PREEMPT_SIGNAL, SIGUSR2 by default."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper(), None)


def stop_signals() -> list[int]:
    """SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and submitit's preemption signal, where the platform has them."""
    found = {getattr(signal, name, None) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")} | {preemption_signal()}
    return sorted(found - {None})


def ignore_in_worker(_worker_id: int = 0) -> None:
    """`worker_init_fn` of the loaders: the stop signals are for the training process. (A worker
    stuck in a read then also ignores multiprocessing's terminate(); SLURM's SIGKILL still ends it.)"""
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)


Handler = Callable[[int, "FrameType | None"], Any] | int


class StopSignals:
    """Context manager: while active, a stop signal is recorded in `requested` (its number) and
    acted on when the owner calls `stop()`, after saving its state. A no-op outside the main
    thread, where Python cannot install signal handlers."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Handler] = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopSignals":
        self._install()
        return self

    def __exit__(self, exc_type, *exc_info: Any) -> None:
        global last_stop
        previous = self._uninstall()
        if self.requested is not None and exc_type is None:  # came after the owner's last check
            signum, self.requested = self.requested, None
            # for the job's record and the line saying how to continue it, as stop() sets it
            last_stop = (f"stopped by {signal.Signals(signum).name} after its last saved state; the job run again "
                         "in the same folder continues from there")
            _act(previous.get(signum, signal.SIG_DFL), signum, None)
            last_stop = None

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for signum in stop_signals():
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_IGN, None):  # ignored, or installed outside Python: left alone
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._request)

    def _uninstall(self) -> dict[int, Handler]:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        return previous

    def _request(self, signum: int, frame: FrameType | None) -> None:
        # no logging here: the signal may have interrupted a write to the same stream
        if os.getpid() != self._pid:  # a forked loader worker before its worker_init_fn ran
            return
        if self.requested is None:
            self.requested = signum
            return
        if signum == preemption_signal() and self.requested == signal.SIGTERM:
            # submitit's preemption (SIGTERM, then its signal at once) asks for a requeue, not for
            # haste: the stop becomes a requeue, still after the save
            self.requested = signum
            return
        # asked twice: no waiting for the step to end. The preemption signal goes first (submitit
        # requeues the job from the last saved state); a SIGTERM that followed it must not end the
        # job without that requeue
        urgent = preemption_signal() if preemption_signal() in (self.requested, signum) else signum
        pending, self.requested = self.requested, None
        _act(self._previous.get(urgent, signal.SIG_DFL), urgent, frame)
        self.requested = pending  # its handler let the job go on

    def stop(self, where: str, saved: str = "checkpoints/last.pt") -> None:
        """Act on the requested signal; the caller has saved its state (in the file `saved`), which
        `where` describes.
        Returns only if the signal's own handler lets the job go on (a SIGUSR2 handler that
        returns); otherwise raises SystemExit, KeyboardInterrupt or what that handler raises."""
        global last_stop
        assert self.requested is not None, "stop() without a requested stop"
        signum, self.requested = self.requested, None
        name = signal.Signals(signum).name
        last_stop = f"stopped by {name} {where}; the job run again in the same folder continues from there"
        log.warning("%s %s: saved %s; the job run again in the same folder (train.resume=auto) "
                    "continues from it.", name, where, saved)
        # while it acts, the previous handlers take the signals that come (SLURM's SIGTERM after
        # submitit requeued the job)
        previous = self._uninstall()
        _act(previous.get(signum, signal.SIG_DFL), signum, None)
        last_stop = None
        log.warning("%s's handler let the job go on.", name)
        self._install()


def _act(handler: Handler, signum: int, frame: FrameType | None) -> None:
    """What `signum` does with `handler` installed: see the module docstring."""
    if callable(handler):
        handler(signum, frame)
        if signum not in (signal.SIGTERM, signal.SIGINT):
            return
    raise SystemExit(128 + signum)
