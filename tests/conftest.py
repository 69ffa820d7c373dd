"""Shared test helpers: run the real entrypoints on a tiny synthetic dataset, compose configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# cuBLAS reads this when its first handle is made, which in a test process may come before any job
# sets it (aomd.runtime): set here, so that deterministic runs on a card repeat in every test process
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    """AOMD_TESTS_FIRST="word or word ...": the tests whose names hold one of the words are run
    first, the order otherwise kept. scripts/gpu_check.sh puts the tests of what no card has run
    yet first, so that a tier its time limit cuts short has run those."""
    words = [word.strip() for word in os.environ.get("AOMD_TESTS_FIRST", "").split(" or ") if word.strip()]
    if words:
        items.sort(key=lambda item: not any(word in item.name for word in words))


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
    """One dataset cache and teachers directory for the whole test session, shared by the
    processes of a parallel session (pytest-xdist, as `scripts/gpu_check.sh` runs the gpu tier) so
    that each managed teacher trains once: the caches build under file locks."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp("aomd-cache")
    shared = tmp_path_factory.getbasetemp().parent / "aomd-cache"  # the workers' base folders' parent
    shared.mkdir(exist_ok=True)
    return shared


def _isolate(patch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """Never touch the user's ~/.cache (aomd's datasets and teachers, W&B's logs and settings, the
    torch compiler's cache), never reach for the network."""
    patch.setenv("AOMD_CACHE_DIR", str(cache_dir))
    patch.setenv("WANDB_MODE", "disabled")
    patch.setenv("WANDB_SILENT", "true")
    patch.delenv("WANDB_DIR", raising=False)  # the tests read each job's runs from its folder
    for variable in ("XDG_CACHE_HOME", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        patch.setenv(variable, str(cache_dir / "home" / variable.lower()))
    # compilations go to the session's folder (unless one is given): a compilation killed part-way in
    # an earlier session can leave a damaged file in the machine's default /tmp/torchinductor_<user>
    patch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(cache_dir / "inductor"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(cache_dir):
    """The isolation for the session's and modules' fixtures, which are set up before any
    function-scoped fixture (a module's training run would otherwise pack ~/.cache/aomd)."""
    with pytest.MonkeyPatch.context() as patch:
        _isolate(patch, cache_dir)
        yield


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, cache_dir):
    _isolate(monkeypatch, cache_dir)  # again for each test: what a test before it changed is undone


_TORCH_SETTINGS_AT_START = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                            torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)


@pytest.fixture(autouse=True)
def _torch_settings_restored():
    """A job's `Runtime.seed_everything` sets torch's process-wide kernel choices: after each test
    they are those the process started with, whichever tests (or their fixtures) ran before."""
    yield
    deterministic, warn_only, fill, benchmark = _TORCH_SETTINGS_AT_START
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark = fill, benchmark


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


def strip_timing(history: list[dict]) -> list[dict]:
    """Epoch records without their wall-clock figures (which never repeat between runs)."""
    from aomd.records import TRAINING_SPEED_KEYS

    return [{k: v for k, v in record.items() if k not in TRAINING_SPEED_KEYS} for record in history]


def assert_histories_close(ours: list[dict], theirs: list[dict], rel: float, abs: float) -> None:
    """Two runs' epoch records (timing stripped) have the same keys and values within tolerance."""
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs):
        assert mine.keys() == other.keys()
        for key, value in other.items():
            assert mine[key] == pytest.approx(value, rel=rel, abs=abs), key


def student_job(*overrides: str):
    """(cfg, runtime, student, objective) of a job with the TINY recipe and `overrides` (a
    student-only loss: no teacher), seeded, on the runtime the config resolves to."""
    from aomd.build import build_objective
    from aomd.config import validate
    from aomd.models import EmbeddingNet
    from aomd.runtime import Runtime

    cfg = validate(compose(*TINY, "logger=none", *overrides))
    runtime = Runtime.from_train(cfg.train)
    runtime.seed_everything(0)
    student = EmbeddingNet("resnet18", cfg.embedding_size, cfg.l2normalize, False)
    return cfg, runtime, student, build_objective(cfg.loss, cfg.sampler, student, None, cfg.dataset.image_size)


def fit_records(data, run_dir: Path, *overrides: str) -> list[dict]:
    """The epoch records of `aomd.engine.fit` run in this process on `data` (`student_job`)."""
    from aomd.engine import fit

    cfg, runtime, student, objective = student_job(*overrides)
    records = []
    fit(student, objective, data, cfg.train, cfg.eval, runtime, run_dir, lambda record, is_best: records.append(record))
    return records


def compose(*overrides: str, config_name: str = "train"):
    """The composed (not yet validated) config, as Hydra would build it for the entrypoint."""
    from aomd.config import compose as compose_config

    return compose_config(overrides, config_name)
