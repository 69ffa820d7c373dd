"""Checkpoints that hold only tensors and plain data (loadable with `weights_only=True`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from aomd.errors import UserError
from aomd.models.embedding import Architecture, EmbeddingNet


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable or does not fit what it is used for."""


def save_checkpoint(path: str | Path, model: EmbeddingNet, **extra: Any) -> None:
    """Write `model` (state + architecture) and plain `extra` data atomically to `path`."""
    from aomd import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _on_cpu({
        "model": model.state_dict(),
        "architecture": model.architecture.as_dict(),
        "aomd_version": __version__,
        **extra,
    })
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # readers never see a half-written checkpoint
    finally:
        tmp.unlink(missing_ok=True)  # a save stopped half-way (a second stop signal) leaves nothing


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


def _on_cpu(tree: Any) -> Any:
    """Every tensor in `tree` on the CPU: a checkpoint written on a GPU loads on any machine,
    also with a plain `torch.load`."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):  # a state_dict keeps its type and its version metadata
        moved = type(tree)((key, _on_cpu(value)) for key, value in tree.items())
        if hasattr(tree, "_metadata"):
            moved._metadata = tree._metadata
        return moved
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(value) for value in tree)
    return tree


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents; a clear error if it is missing or not one of ours."""
    path = Path(path).expanduser()
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

    Input: images [N, 3, H, W] normalised as in `aomd.data.augment` (ImageNet mean/std).
    Rebuilt without downloading weights, with the recorded preprocessing (GoogLeNet's
    transform_input), so it computes what the trained network computed.
    """
    payload = read_checkpoint(path)
    model = EmbeddingNet(**payload["architecture"], pretrained=False)
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


def check_architecture(payload: dict, expected: Architecture, what: str, path: str | Path) -> None:
    """Raise a clear error when a checkpoint's architecture is not `expected`."""
    found = Architecture(**payload["architecture"])
    if found != expected:
        raise CheckpointError(
            f"The {what} checkpoint {path} is a {found} but the configuration asks for {expected}; "
            f"pass a matching checkpoint or change the configuration to match it."
        )
