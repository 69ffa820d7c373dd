"""W&B never stops a run: an online run that cannot start (no API key, no server) becomes an
offline run with one warning, once per sweep. The server is a closed port on this machine."""
import json
import socket

import pytest

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
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_a_sweep_warns_once(tmp_path):
    result = run_module("aomd.train", "-m", *TINY, "logger=wandb", "logger.mode=online", "logger.init_timeout=5",
                        "loss=triplet,contrastive", f"hydra.sweep.dir={tmp_path}", env=offline_env(tmp_path, None))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(WARNING) + result.stderr.count(WARNING) == 1
    assert "2 of 2 jobs finished" in result.stdout
    assert all(list((tmp_path / str(job) / "wandb").glob("offline-run-*")) for job in (0, 1))
