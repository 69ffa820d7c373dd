"""Checkpoints that hold only tensors and plain data (loadable with `weights_only=True`)."""
from __future__ import annotations

import logging
import os
import signal
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from aomd.errors import UserError
from aomd.models.backbones import STAGES
from aomd.models.embedding import Architecture, EmbeddingNet

log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable or does not fit what it is used for."""


def save_checkpoint(path: str | Path, model: EmbeddingNet, **extra: Any) -> None:
    """Write `model` (state + architecture) and plain `extra` data atomically to `path`."""
    _write(Path(path), _payload(model, extra, copy=False))


class CheckpointWriter:
    """Writes checkpoints in a background thread, in the order they are asked for, so that
    serialising and writing them overlaps the training that follows (a distillation's last.pt
    and best.pt took 0.18 s of each 2.9 s epoch on an H200's local disk; a cluster's network file
    system is slower).

    `save` takes what `save_checkpoint` takes and returns once the payload's copies are queued
    (training goes on changing the tensors): CUDA tensors are copied asynchronously into
    page-locked memory on their device's current stream, so they hold the values of the moment of
    `save` whatever the training queues after, and the thread waits for those copies before
    writing; the training loop does not wait for them (with synchronous copies, the recipe's loop
    had waited 0.11 s per epoch for its checkpoints on an H100). The page-locked memory stays
    with PyTorch's caching host allocator for the process's life, reused by later checkpoints:
    up to twice what two or three checkpoints hold (it rounds blocks up to powers of two; a
    distilled ResNet18's last.pt, with Adam's moments and the adapters, holds about 150 MB).
    At most `max_pending` writes are queued; a write that failed raises at the next `save` or
    `wait`. `wait` returns once every checkpoint asked for is on disk. Used as a context manager,
    the writer waits on exit; when an exception is already on its way out, a failed write is
    logged instead, so that the exception keeps its meaning (a stop signal stays a stop). The stop signals are blocked in the writer's thread, so that they
    reach the training thread."""

    def __init__(self, max_pending: int = 2):
        assert max_pending >= 1
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aomd-checkpoint",
                                        initializer=_block_stop_signals)
        self._pending: deque[Future] = deque()
        self._failures: list[Exception] = []  # kept here: a stop signal may interrupt `wait` between two writes
        self._max_pending = max_pending

    def save(self, path: str | Path, model: EmbeddingNet, then_rename: tuple[Path, Path] | None = None,
             **extra: Any) -> None:
        """Queue the checkpoint; with `then_rename` (source, target), rename source to target
        once it is on disk."""
        copied_on: set[torch.device] = set()
        payload = _payload(model, extra, copy=True, copied_on=copied_on)
        # blocking: the writer's thread sleeps on them rather than spinning
        copies_done = [torch.cuda.current_stream(device).record_event(torch.cuda.Event(blocking=True))
                       for device in copied_on]
        while self._pending and (len(self._pending) >= self._max_pending or self._pending[0].done()):
            self._pending[0].result()  # a stop signal raising while this waits leaves the write queued
            self._pending.popleft()
        self._pending.append(self._pool.submit(_write, Path(path), payload, copies_done, then_rename))

    def wait(self) -> None:
        while self._pending:
            try:
                self._pending[0].result()
            except Exception as error:  # the later writes still go to disk
                self._failures.append(error)
            self._pending.popleft()
        if self._failures:
            first, self._failures = self._failures[0], []
            raise first

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: Any) -> None:
        try:
            self.wait()
        except Exception as error:
            if exc_type is None:
                raise
            log.error("A checkpoint could not be written: %s", error)
        finally:
            self._pool.shutdown(wait=True)


def _block_stop_signals() -> None:
    from aomd.preemption import stop_signals

    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())


def _payload(model: EmbeddingNet, extra: dict[str, Any], copy: bool,
             copied_on: set[torch.device] | None = None) -> dict[str, Any]:
    """The checkpoint's contents on the CPU; `copy`: no tensor or container shared with the
    caller's (CPU tensors are copied too); `copied_on`: see `_on_cpu`."""
    from aomd import __version__

    return _on_cpu({
        "model": model.state_dict(),
        "architecture": model.architecture.as_dict(),
        "aomd_version": __version__,
        **extra,
    }, copy, copied_on)


def _write(path: Path, payload: dict[str, Any], copies_done: Sequence[torch.cuda.Event] = (),
           then_rename: tuple[Path, Path] | None = None) -> None:
    for event in copies_done:  # the payload's asynchronous copies from the device (CheckpointWriter.save)
        event.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename: a node that crashes leaves the old file, not an empty one
        os.replace(tmp, path)  # readers never see a half-written checkpoint
    finally:
        tmp.unlink(missing_ok=True)  # a write that failed, or a `save_checkpoint` stopped half-way, leaves nothing
    if then_rename is not None:
        os.replace(*then_rename)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of `path` left by processes killed while saving (each requeued attempt of
    a job has another pid, and each file is as large as a checkpoint)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _on_cpu(tree: Any, copy: bool = False, copied_on: set[torch.device] | None = None) -> Any:
    """Every tensor in `tree` on the CPU: a checkpoint written on a GPU loads on any machine,
    also with a plain `torch.load`. Dicts, lists and tuples are rebuilt; `copy`: tensors already
    on the CPU are copied too. With `copied_on` (a set), CUDA tensors are copied asynchronously
    into page-locked memory on their device's current stream, and their devices are added to it:
    the caller waits for those copies before reading the result."""
    if isinstance(tree, torch.Tensor):
        tensor = tree.detach()
        if copied_on is not None and tensor.is_cuda:
            copied_on.add(tensor.device)
            return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor, non_blocking=True)
        return tensor.to("cpu", copy=copy)
    if isinstance(tree, dict):  # a state_dict keeps its type and its version metadata
        moved = type(tree)((key, _on_cpu(value, copy, copied_on)) for key, value in tree.items())
        if hasattr(tree, "_metadata"):
            moved._metadata = tree._metadata
        return moved
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(value, copy, copied_on) for value in tree)
    return tree


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents; a clear error if it is missing or not one of ours."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = next((p for p in (path / "checkpoints" / "best.pt", path / "best.pt") if p.is_file()), None)
        raise CheckpointError(f"Checkpoint {path} is a folder; pass a .pt file written by aomd.train"
                              + (f", e.g. {inside}." if inside else " (a run's checkpoints/best.pt)."))
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; pass the path of a .pt file written by aomd.train.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"Checkpoint {path} could not be read ({type(error).__name__}); it is not a file written by aomd.train.") from None
    if not isinstance(payload, dict) or "architecture" not in payload or "model" not in payload:
        raise CheckpointError(f"Checkpoint {path} has no model/architecture entries; it is not a file written by aomd.train.")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> EmbeddingNet:
    """The embedding network stored at `path`, in eval mode on `device`, ready to embed a batch.

    Input: float images [N, 3, H, W] normalised as in `aomd.data.augment` (ImageNet mean/std;
    `aomd.preprocess` makes them from files). `model.input` is what the network was trained on,
    as its checkpoint records it: `dataset`, `base_size`, `image_size`, `mean`, `std` (None for a
    checkpoint written before aomd recorded it). Rebuilt without downloading weights, with the
    recorded preprocessing (GoogLeNet's transform_input), so it computes what the trained network
    computed.
    """
    payload = read_checkpoint(path)
    backbone = payload["architecture"]["backbone"]
    if backbone not in STAGES:
        raise CheckpointError(f"Checkpoint {path} holds a {backbone} network, a backbone this process does not know; if a "
                              f"plugin registers it, name the plugin's module in AOMD_PLUGINS.")
    model = EmbeddingNet(**payload["architecture"], pretrained=False)
    model.load_state_dict(payload["model"])
    model.input = payload.get("input")
    return model.to(device).eval()


def check_architecture(payload: dict, expected: Architecture, what: str, path: str | Path) -> None:
    """Raise a clear error when a checkpoint's architecture is not `expected`."""
    found = Architecture(**payload["architecture"])
    if found != expected:
        def described(architecture: Architecture) -> str:
            norm = "" if architecture.l2normalize else ", not l2-normalised"
            return f"{architecture.backbone}-{architecture.embedding_size}{norm}"

        settings = [f"{what}.backbone={found.backbone}"] * (found.backbone != expected.backbone) + \
            [f"{what}.embedding_size={found.embedding_size}"] * (found.embedding_size != expected.embedding_size)
        raise CheckpointError(
            f"The {what} checkpoint {path} holds a {described(found)} but the configuration asks for a "
            f"{described(expected)}; pass a matching checkpoint"
            + (f", or {' '.join(settings)} to use this one." if settings else ".")
        )
