"""A test hook loaded through AOMD_PLUGINS: the training process sends a signal to itself and
its DataLoader workers (as SLURM does to every process of a job) at the start of one training
step or one evaluation. $AOMD_TEST_SIGNAL says which and when: "SIGTERM@7" is SIGTERM at the 7th
training step this process runs, "SIGTERM@eval2" at its 2nd evaluation (the first is the one
before training)."""
import multiprocessing
import os
import signal

from aomd.engine import Evaluator, TrainStep

_name, _when = os.environ["AOMD_TEST_SIGNAL"].split("@")
_patched = Evaluator if _when.startswith("eval") else TrainStep
_original = _patched.__call__
_at = int(_when.removeprefix("eval"))
_calls = 0


def _signalling_call(self, *args, **kwargs):
    global _calls
    _calls += 1
    if _calls == _at:
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, getattr(signal, _name))
        os.kill(os.getpid(), getattr(signal, _name))  # its handler runs now, before the call's work
    return _original(self, *args, **kwargs)


_patched.__call__ = _signalling_call
