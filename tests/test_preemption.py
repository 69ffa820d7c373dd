"""aomd.preemption.StopSignals: a stop signal waits for the training loop, then does what it would
have done without the guard (in-process; the end-to-end runs are in test_resume and test_slurm)."""
import os
import signal
import threading

import pytest

from aomd import preemption
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


def test_a_previous_handler_is_called_and_if_it_returns_the_job_goes_on_guarded(restore_handlers):
    calls = []
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # like submitit's SIGTERM bypass
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == []
        stop.stop("after epoch 1")
        assert calls == [signal.SIGTERM] and stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)  # guarded again
        assert stop.requested == signal.SIGTERM and calls == [signal.SIGTERM]


def test_a_second_signal_acts_at_once(restore_handlers):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with StopSignals():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)


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
