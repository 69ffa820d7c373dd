"""A test hook loaded through AOMD_PLUGINS: the checkpoint writer's thread SIGKILLs the training
process at one point of an epoch's saving, as a lost node would. $AOMD_TEST_KILL says where:
"last@N" as last.pt of epoch N is about to be written (best.next.pt of epoch N is on disk),
"commit@N" as best.next.pt of epoch N is about to become best.pt (last.pt of epoch N is on disk)."""
import os
import signal

import torch

from aomd.models import checkpoint

_where, _epoch = os.environ["AOMD_TEST_KILL"].split("@")
_epoch = int(_epoch)
_write = checkpoint._write


def _killing_write(path, payload, copies_done=(), then_rename=None):
    training = payload.get("training") or {}
    if _where == "last" and path.name == "last.pt" and training.get("epoch") == _epoch and not training.get("partial"):
        os.kill(os.getpid(), signal.SIGKILL)
    _write(path, payload, copies_done)
    if then_rename is not None:
        source, target = then_rename
        assert (source.name, target.name) == ("best.next.pt", "best.pt")
        if _where == "commit" and torch.load(source, weights_only=True)["metrics"]["epoch"] == _epoch:
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(source, target)


checkpoint._write = _killing_write
