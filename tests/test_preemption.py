"""aomd.preemption.StopSignals: a stop signal waits for the training loop, then does what it would
have done without the guard (in-process; the end-to-end runs are in test_resume and test_slurm)."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from aomd import preemption
from aomd.data import images
from aomd.preemption import StopSignals


@pytest.fixture
def restore_handlers():
    saved = {signum: signal.getsignal(signum) for signum in preemption.stop_signals()}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_waits_for_stop_then_ends_the_process_as_its_default_would(restore_handlers):
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested == signal.SIGUSR2  # nothing else happened: the step can finish
        with pytest.raises(SystemExit) as stopped:
            stop.stop("in epoch 2 after step 3 of 4")
    assert stopped.value.code == 128 + signal.SIGUSR2
    assert preemption.last_stop.startswith("stopped by SIGUSR2 in epoch 2 after step 3 of 4")
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # put back on exit


class Requeued(Exception):
    """What submitit's SIGUSR2 handler does, in short: requeue the job, then leave."""


def submitit_like_handlers(calls: list) -> None:
    """Handlers shaped like submitit's: SIGUSR2 requeues and exits, SIGTERM is only logged."""
    def requeue(signum, frame):
        calls.append(signum)
        raise Requeued()

    signal.signal(signal.SIGUSR2, requeue)
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))


def test_the_previous_handler_acts_after_the_save(restore_handlers):
    calls = []
    submitit_like_handlers(calls)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [] and stop.requested == signal.SIGUSR2
        with pytest.raises(Requeued):
            stop.stop("in epoch 1 after step 2 of 4")
    assert calls == [signal.SIGUSR2]


def test_sigterm_ends_the_job_even_when_its_handler_returns(restore_handlers):
    calls = []
    submitit_like_handlers(calls)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit) as stopped:
            stop.stop("after epoch 1")
    assert calls == [signal.SIGTERM] and stopped.value.code == 128 + signal.SIGTERM


def test_a_handler_that_lets_the_job_go_on_leaves_it_guarded(restore_handlers):
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # submitit on a rank > 0
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        stop.stop("after epoch 1")
        assert calls == [signal.SIGUSR2] and stop.requested is None and preemption.last_stop is None
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested == signal.SIGUSR2 and calls == [signal.SIGUSR2]
        stop.stop("after epoch 2")


def test_a_second_signal_acts_at_once_and_a_sigterm_does_not_cancel_the_requeue(restore_handlers):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with StopSignals():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)
    calls = []
    submitit_like_handlers(calls)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)  # the time limit's warning, during a long evaluation ...
        with pytest.raises(Requeued):
            os.kill(os.getpid(), signal.SIGTERM)  # ... then SLURM ends the job: requeue now
        assert calls == [signal.SIGUSR2]
        stop.requested = None


def test_the_preemption_signal_after_sigterm_makes_the_stop_a_requeue_after_the_save(restore_handlers):
    """Submitit's preemption sends SIGTERM then SIGUSR2 at once: the job still saves first, then
    submitit requeues it (acting at once would lose the epoch's steps since the last save)."""
    calls = []
    submitit_like_handlers(calls)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [] and stop.requested == signal.SIGUSR2
        with pytest.raises(Requeued):
            stop.stop("in epoch 1 after step 2 of 4")
    assert calls == [signal.SIGUSR2]


def test_a_signal_after_the_last_check_acts_when_the_guard_exits(restore_handlers):
    """...and says why, as stop() does: the job's record and the line saying how to continue it read it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    seen = []
    signal.signal(signal.SIGUSR1, lambda *_: seen.append(preemption.last_stop))
    with pytest.raises(SystemExit):
        with StopSignals():
            os.kill(os.getpid(), signal.SIGTERM)
    with StopSignals():
        os.kill(os.getpid(), signal.SIGUSR1)
    assert seen == ["stopped by SIGUSR1 after its last saved state; the job run again in the same folder "
                    "continues from there"] and preemption.last_stop is None


def _signal_dispositions(paths, size):
    """A decode task that reports, as its "failures", what the worker does on each stop signal."""
    return (np.zeros((len(paths), size, size, 3), np.uint8),
            [(i, str(signal.getsignal(signum))) for i, signum in enumerate(preemption.stop_signals()[:len(paths)])])


def test_the_decode_workers_of_a_cache_build_ignore_the_stop_signals(restore_handlers, monkeypatch):
    """SLURM signals every process of the job: a decode worker forked with submitit's handler
    would requeue the job and write its checkpoint file too, racing the job's own."""
    for signum in preemption.stop_signals():
        signal.signal(signum, lambda *_: None)  # a Python handler, as submitit installs
    monkeypatch.setattr(images, "_decode_chunk", _signal_dispositions)
    chunks = list(images.decode_all([f"{n}.jpg" for n in range(8)], 4, workers=2, chunk_size=4))
    reasons = [reason for chunk in chunks for _, reason in chunk.failed]
    assert len(reasons) == 2 * len(preemption.stop_signals()[:4]) and set(reasons) == {str(signal.SIG_IGN)}


def test_an_ignored_signal_stays_ignored_and_other_threads_install_nothing(restore_handlers):
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested is None and signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    installed = []
    thread = threading.Thread(target=lambda: installed.append(StopSignals().__enter__()._previous))
    thread.start()
    thread.join()
    assert installed == [{}]


ORPHAN_SCRIPT = """
import os, sys, time
import numpy as np
from aomd.data import images

def slow_chunk(paths, size):
    time.sleep(120)
    return np.zeros((len(paths), size, size, 3), np.uint8), []

images._decode_chunk = slow_chunk
print(os.getpid(), flush=True)
for _ in images.decode_all([f"{n}.jpg" for n in range(8)], 4, workers=2, chunk_size=4):
    pass
"""


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, which a container's init may never reap, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_decode_workers_end_with_a_job_killed_by_its_stop_signal(tmp_path):
    """Ignoring the stop signals, a decode worker of a job killed by SIGTERM (a process group's
    `kill`, `timeout`) would wait for tasks for good, and a `... | tee` of the job never end."""
    job = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        pid = int(job.stdout.readline())
        children_file = f"/proc/{pid}/task/{pid}/children"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(open(children_file).read().split()) < 2:
            time.sleep(0.1)
        workers = [int(child) for child in open(children_file).read().split()]
        assert len(workers) == 2
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(map(_alive, workers)):
            time.sleep(0.1)
        assert not any(map(_alive, workers))
    finally:
        job.kill()
