"""A test hook loaded through AOMD_PLUGINS: at the start of one training step the training
process sends a signal to itself and its DataLoader workers, as SLURM does to every process of a
job. $AOMD_TEST_SIGNAL says which and when: "SIGTERM@7" is SIGTERM at the 7th training step this
process runs."""
import multiprocessing
import os
import signal

from aomd.engine import TrainStep

_name, _step = os.environ["AOMD_TEST_SIGNAL"].split("@")
_train_step = TrainStep.__call__
_calls = 0


def _signalling_step(self, images, labels):
    global _calls
    _calls += 1
    if _calls == int(_step):
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, getattr(signal, _name))
        os.kill(os.getpid(), getattr(signal, _name))  # its handler runs now, before the step's work
    return _train_step(self, images, labels)


TrainStep.__call__ = _signalling_step
