"""Shared test helpers: run the real entrypoints on a tiny synthetic dataset, compose configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# a synthetic dataset small enough for a training run in seconds (12 classes, 32 px crops)
TINY = [
    "dataset.num_classes=12",
    "dataset.images_per_class=8",
    "dataset.base_size=40",
    "dataset.image_size=32",
    "train.epochs=1",
    "train.iters_per_epoch=2",
    "train.batch_size=16",
    "train.images_per_class=4",
    "eval.recall_k=[1,2]",
    "train.progress=false",
    "teacher.train.epochs=1",
    "teacher.train.iters_per_epoch=2",
    "teacher.backbone=resnet50",  # the product's teacher (the synthetic demo's own is a ResNet18-512)
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset cache and teachers directory for the whole test session."""
    return tmp_path_factory.mktemp("aomd-cache")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, cache_dir):
    # never touch the user's ~/.cache/aomd, never reach for the network
    monkeypatch.setenv("AOMD_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_module(module: str, *overrides: str, cwd: Path | None = None, env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m <module> <overrides>` and return the finished process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


def signalled_at_step(signal_name: str, step: int | str) -> dict[str, str]:
    """The environment of a job that sends itself `signal_name` at its `step`-th training step
    (or with "evalN" at its N-th evaluation; tests/signal_plugin.py)."""
    # prepended: where aomd is installed by PYTHONPATH (the GPU check's wheel), it stays importable
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    return {"AOMD_PLUGINS": "signal_plugin", "PYTHONPATH": path, "AOMD_TEST_SIGNAL": f"{signal_name}@{step}"}


def train(run_dir: Path, *overrides: str, tiny: bool = True, logger: str = "logger=none", **kwargs):
    """Run a training job into `run_dir`; assert it succeeded; return its metrics.json."""
    args = [*(TINY if tiny else []), logger, f"hydra.run.dir={run_dir}", *overrides]
    result = run_module("aomd.train", *filter(None, args), **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def compose(*overrides: str, config_name: str = "train"):
    """The composed (not yet validated) config, as Hydra would build it for the entrypoint."""
    from aomd.config import compose as compose_config

    return compose_config(overrides, config_name)
