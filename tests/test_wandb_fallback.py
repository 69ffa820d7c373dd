"""W&B never stops a run: an online run that cannot start (no API key, no server) becomes an
offline run with one warning, once per sweep. The server is a closed port on this machine."""
import json
import socket

import pytest

from wandb_files import read_offline_run

from conftest import TINY, run_module

WARNING = "W&B could not start an online run"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp_path, api_key: str | None) -> dict:
    env = {"HOME": str(tmp_path / "home"), "WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}",
           "WANDB_CONFIG_DIR": str(tmp_path / "home" / "wandb-config")}
    if api_key:
        env["WANDB_API_KEY"] = api_key
    return env


@pytest.mark.slow
@pytest.mark.parametrize("api_key", [None, "0" * 40], ids=["no API key", "unreachable server"])
def test_an_online_run_that_cannot_start_logs_offline_and_trains(tmp_path, api_key):
    result = run_module("aomd.train", *TINY, "logger=wandb", "logger.mode=online", "logger.init_timeout=5",
                        f"hydra.run.dir={tmp_path / 'run'}", env=offline_env(tmp_path, api_key))
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count(WARNING) == 1 and "wandb sync" in output
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "finished"
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    logged = read_offline_run(run)
    assert [(h["epoch"], h["test/recall@1"]) for h in logged["history"] if "test/recall@1" in h] == [
        (r["epoch"], r["recall@1"]) for r in record["history"]]
    assert logged["summary"]["best/recall@1"] == record["best"]["recall@1"] and logged["summary"]["status"] == "finished"


@pytest.mark.slow
def test_a_sweep_warns_once(tmp_path):
    result = run_module("aomd.train", "-m", *TINY, "logger=wandb", "logger.mode=online", "logger.init_timeout=5",
                        "loss=triplet,contrastive", f"hydra.sweep.dir={tmp_path}", env=offline_env(tmp_path, None))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(WARNING) + result.stderr.count(WARNING) == 1
    assert "2 of 2 jobs finished" in result.stdout
    runs = [read_offline_run(next((tmp_path / str(job) / "wandb").glob("offline-run-*"))) for job in (0, 1)]
    assert [run["name"] for run in runs] == ["loss=triplet", "loss=contrastive"]  # what the sweep varies
    assert runs[0]["group"] == runs[1]["group"] == "-".join(tmp_path.parts[-2:])
    for job, run in enumerate(runs):
        record = json.loads((tmp_path / str(job) / "metrics.json").read_text())
        assert run["summary"]["best/recall@1"] == record["best"]["recall@1"]


def test_a_wandb_error_mid_run_continues_in_an_offline_run_with_the_same_id(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from aomd.tracking import RunInfo, Tracker
    from wandb_files import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = SimpleNamespace(enabled=True, mode="offline", init_timeout=5, project="aomd-test", entity=None, group=None,
                             name=None, tags=[])
    tracker = Tracker(RunInfo(logger, {"train": {"lr": 0.1}}, "mid-run"), tmp_path, "student", {"train_images": 4})
    first_id = tracker.run_id
    tracker.log_epoch({"epoch": 0, "recall@1": 0.1}, True)

    def broken_log(*args, **kwargs):
        raise RuntimeError("the W&B service went away")

    monkeypatch.setattr(tracker.run, "log", broken_log)
    tracker.log_epoch({"epoch": 1, "loss": 0.5, "recall@1": 0.2}, True)  # fails, continues offline
    tracker.log_epoch({"epoch": 2, "loss": 0.4, "recall@1": 0.3}, True)
    assert tracker.run_id == first_id
    tracker.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # the run ids from the run files (folder names get a "-1" suffix when two start in the same second)
    assert len(runs) == 2 and {read_offline_run(run)["id"] for run in runs} == {first_id}
    # the offline run replaces the online one when synced, so it holds the epochs before the failure too
    offline = read_offline_run(runs[1])
    assert [(h["epoch"], h["test/recall@1"]) for h in offline["history"] if "test/recall@1" in h] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert offline["summary"]["best/recall@1"] == 0.3 and offline["summary"]["dataset/train_images"] == 4
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "finished" and [h["epoch"] for h in record["history"]] == [0, 1, 2]


class FakeRun:
    """What the tracker uses of a W&B run: its mode, whether W&B resumed it, log and summary."""

    def __init__(self, offline: bool, resumed: bool):
        self.offline, self.resumed, self.id = offline, resumed, "fake1234"
        self.logged, self.summary = [], {}

    def log(self, values, step):
        self.logged.append(step)


@pytest.mark.parametrize("offline, resumed, replayed", [
    (False, True, False),   # W&B resumed the online run: it holds the earlier epochs
    (False, False, True),   # an online run W&B did not know (the job ran offline before): they are logged again
    (True, False, True),    # an offline folder replaces the run when synced: it needs them all
])
def test_a_resumed_job_logs_its_earlier_epochs_again_where_the_run_lacks_them(tmp_path, offline, resumed, replayed):
    from types import SimpleNamespace

    from aomd.tracking import RunInfo, Tracker

    tracker = Tracker(RunInfo(SimpleNamespace(enabled=False), {}), tmp_path, "student", {"train_images": 4})
    tracker.run = run = FakeRun(offline, resumed)
    history = [{"epoch": 0, "recall@1": 0.1}, {"epoch": 1, "loss": 0.5, "recall@1": 0.2}]
    tracker.restore(history, history[1])
    assert run.logged == ([0, 1] if replayed else [])
    assert run.summary["best/recall@1"] == run.summary["last/recall@1"] == 0.2


def test_a_wandb_that_cannot_be_imported_leaves_the_job_running_without_it(tmp_path, monkeypatch, caplog):
    import sys
    from types import SimpleNamespace

    from aomd.tracking import RunInfo, Tracker

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    logger = SimpleNamespace(enabled=True, mode="offline", init_timeout=5, project="aomd-test", entity=None, group=None,
                             name=None, tags=[])
    with caplog.at_level("WARNING", logger="aomd.tracking"):
        tracker = Tracker(RunInfo(logger, {}), tmp_path, "student", {"train_images": 4})
    assert tracker.run is None
    assert "W&B cannot be imported (ModuleNotFoundError" in caplog.text and "logger=none turns W&B off" in caplog.text
    tracker.log_epoch({"epoch": 0, "recall@1": 0.1}, True)
    tracker.finish()
    assert json.loads((tmp_path / "metrics.json").read_text())["best"]["recall@1"] == 0.1


def test_online_mode_never_reaches_wandbs_login_prompt_without_a_key(tmp_path):
    """No API key anywhere: the check asks W&B without a prompt, which on a terminal would wait
    for an answer; with a key in the environment, online runs start as before."""
    import subprocess
    import sys

    check = "import wandb; from aomd.tracking import _has_credentials; print(_has_credentials(wandb))"
    env = {**offline_env(tmp_path, None), "NETRC": str(tmp_path / "no-netrc")}
    for api_key, expected in ((None, "False"), ("0" * 40, "True")):
        run_env = {**__import__("os").environ, **env}
        run_env.pop("WANDB_API_KEY", None)
        if api_key:
            run_env["WANDB_API_KEY"] = api_key
        result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=run_env,
                                stdin=subprocess.DEVNULL, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == expected, result.stdout


def test_wandb_dir_moves_the_run_files_out_of_the_job_folder(tmp_path, monkeypatch):
    """W&B's own WANDB_DIR (a scratch disk, say) is where the run files go; metrics.json stays."""
    from types import SimpleNamespace

    from aomd.tracking import RunInfo, Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "scratch"))
    logger = SimpleNamespace(enabled=True, mode="offline", init_timeout=5, project="aomd-test", entity=None, group=None,
                             name=None, tags=[])
    tracker = Tracker(RunInfo(logger, {"train": {"lr": 0.1}}, "scratch"), tmp_path / "job", "student", {"train_images": 4})
    tracker.log_epoch({"epoch": 0, "recall@1": 0.25}, True)
    run_id = tracker.run_id
    tracker.finish()
    (run,) = (tmp_path / "scratch" / "wandb").glob("offline-run-*")
    logged = read_offline_run(run)
    assert logged["id"] == run_id and logged["summary"]["best/recall@1"] == 0.25
    assert not (tmp_path / "job" / "wandb").exists()
    assert json.loads((tmp_path / "job" / "metrics.json").read_text())["wandb_run_id"] == run_id
