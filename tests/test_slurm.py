"""Sweeps through `hydra/launcher=slurm` on a real single-node SLURM cluster (slow tier).

The cluster is brought up on this machine by scripts/slurm_cluster.sh (Debian's slurm-wlm and munge,
installed when missing; the daemons run as root without systemd) and stopped at the end of the
module. Where it cannot start (not root, no apt-get, a daemon that does not come up) the tests skip
and say why. The node has no GPU, so the jobs ask for CPUs only, with the overrides a CPU-only
partition needs (documented in conf/hydra/launcher/slurm.yaml).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_module, strip_timing

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# five short epochs: long enough to requeue or cancel a job in the middle of its training
EPOCHS = ["train.epochs=5", "train.iters_per_epoch=6"]
CPU_ONLY = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
# submitit counts a SIGUSR2 as a time-out when the job ran 80% of its time, or all but 10 minutes of
# it: with 10 minutes every SIGUSR2 is a time-out, with 60 a preemption
SLURM = [*CPU_ONLY, "hydra.launcher.timeout_min=10"]
LOSSES = "loss=triplet,contrastive"
SWEEP_TIMEOUT = 600  # seconds: a sweep that takes longer hangs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, cache_dir) -> dict[str, str]:
    """Start the cluster; yield the environment (SLURM_CONF, PATH) the SLURM commands and sweeps need,
    with the test session's isolation (set here too: module fixtures run before the autouse one)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the SLURM tests start slurmctld, slurmd and munged: they need root on Linux")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install slurm-wlm and munge")
    state = tmp_path_factory.mktemp("slurm")
    try:
        started = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True,
                                 timeout=900)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=120)
        pytest.skip("scripts/slurm_cluster.sh start did not finish in 15 minutes")
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"cannot start a SLURM cluster: {reason}")
    try:
        shown = subprocess.run(["bash", "-c", '. "$1/env" && printf "%s\\0%s" "$SLURM_CONF" "$PATH"', "-", str(state)],
                               capture_output=True, text=True, check=True, timeout=30)
        slurm_conf, path = shown.stdout.split("\0")
        yield {"SLURM_CONF": slurm_conf, "PATH": path, "AOMD_CACHE_DIR": str(cache_dir), "WANDB_MODE": "disabled",
               "WANDB_SILENT": "true"}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=120)


def slurm(env: dict[str, str], *command: str) -> str:
    """Run a SLURM command on the test cluster; its stdout."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, env={**os.environ, **env})
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return result.stdout


def sweep_args(sweep_dir: Path, *overrides: str, launcher: list[str] = SLURM, epochs: list[str] = EPOCHS,
               losses: str = LOSSES) -> list[str]:
    return ["-m", *TINY, *epochs, "logger=none", *launcher, f"hydra.sweep.dir={sweep_dir}", losses, *overrides]


def start_sweep(sweep_dir: Path, env: dict[str, str], **options) -> subprocess.Popen:
    """`python -m aomd.train -m ...` through the slurm launcher, in the background (output in
    <sweep_dir>.log); `options` go to `sweep_args`."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    output = open(sweep_dir.parent / f"{sweep_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([sys.executable, "-m", "aomd.train", *sweep_args(sweep_dir, **options)], cwd=REPO,
                               env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT, text=True)
    process.output_file = output
    return process


def finish(process: subprocess.Popen, timeout: float = SWEEP_TIMEOUT) -> tuple[int, str]:
    """Wait for a background sweep; its exit status and output. Fails (killing it) when it hangs."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the sweep did not end in {timeout} s")
    finally:
        process.output_file.close()
    return process.returncode, Path(process.output_file.name).read_text()


def read_jobs(sweep_dir: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


def read_record(job_dir: Path) -> dict | None:
    try:
        return json.loads((job_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


def epochs_saved(job_dir: Path) -> int:
    """The epoch the job's last.pt was written after (-1 when there is none yet or it is being replaced)."""
    try:
        return torch.load(job_dir / "checkpoints" / "last.pt", weights_only=True)["training"]["epoch"]
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def slurm_job_id(env: dict[str, str], sweep_dir: Path, job_num: int, timeout: float = 120) -> str:
    """The SLURM id of sweep job `job_num` once it is running: `<array>_<job_num>`, a task of the
    sweep's own job array (submitit names its folders after it). Not the task's numeric job id: the
    array's id is the numeric id of one of its tasks, so `scancel <that number>` would cancel the
    whole array; and the earlier sweeps' tasks stay in squeue with the same task numbers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = {folder.name for folder in sweep_dir.glob(f".submitit/*_{job_num}")}
        running = slurm(env, "squeue", "-h", "-r", "-t", "running", "-o", "%i").split()
        for task in tasks.intersection(running):
            return task
        time.sleep(0.5)
    pytest.fail(f"sweep job {job_num} was not running on SLURM after {timeout} s")


def wait_until(ready, what: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the sweep ended before {what}"
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.2)


def stop_during_sweep(cluster: dict[str, str], sweep_dir: Path, job_num: int, ready, what: str, command: list[str],
                      **options) -> tuple[int, str]:
    """Start a sweep (`options` go to `sweep_args`), run the SLURM `command` on sweep job `job_num`
    (its id appended) once `ready()`, and wait for the sweep to end: its exit status and output."""
    process = start_sweep(sweep_dir, cluster, **options)
    try:
        job_id = slurm_job_id(cluster, sweep_dir, job_num)
        wait_until(ready, what, process)
        slurm(cluster, *command, job_id)
        return finish(process)
    finally:
        if process.poll() is None:
            process.kill()


def log_text(sweep_dir: Path) -> str:
    """Everything the jobs logged: their Hydra log files and submitit's stdout and stderr."""
    files = [p for pattern in ("*.log", "*.out", "*.err") for p in sweep_dir.rglob(pattern) if p.is_file()]
    return "\n".join(p.read_text(errors="replace") for p in files)


def job_log(sweep_dir: Path, job_num: int) -> str:
    """What sweep job `job_num` logged: its Hydra log and its array task's submitit output."""
    return log_text(sweep_dir / str(job_num)) + "".join(log_text(f) for f in sweep_dir.glob(f".submitit/*_{job_num}"))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> dict[int, dict]:
    """A two-job sweep through SLURM, run to the end: {job number: metrics.json}."""
    sweep_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_module("aomd.train", *sweep_args(sweep_dir), env=cluster, timeout=SWEEP_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 of 2 jobs finished" in result.stdout
    assert list(sweep_dir.glob(".submitit/*/*_log.out")), "the jobs did not run through submitit on SLURM"
    return read_jobs(sweep_dir)


def test_a_two_job_sweep_runs_on_slurm(uninterrupted):
    assert sorted(uninterrupted) == [0, 1]
    assert all(job["status"] == "finished" for job in uninterrupted.values()), \
        {n: job.get("error") for n, job in uninterrupted.items()}
    assert all(len(job["history"]) == 6 for job in uninterrupted.values())  # the evaluation before training + 5 epochs


def test_a_requeued_job_resumes_and_ends_as_if_never_stopped(cluster, uninterrupted, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # two evaluated epochs (the one before training and epoch 1) and the last.pt written after
    # epoch 1: four epochs still to go. SLURM sends SIGTERM: the job saves its place after the
    # current step and stops
    code, output = stop_during_sweep(
        cluster, sweep_dir, 0, lambda: len((read_record(sweep_dir / "0") or {}).get("history", [])) >= 2
        and epochs_saved(sweep_dir / "0") >= 1, "job 0 evaluated two epochs", ["scontrol", "requeue"])
    assert code == 0, output[-3000:]
    jobs = read_jobs(sweep_dir)
    assert all(job["status"] == "finished" for job in jobs.values()), {n: job.get("error") for n, job in jobs.items()}
    logs = job_log(sweep_dir, 0)
    assert f"saved {sweep_dir / '0' / 'checkpoints' / 'last.pt'}" in logs and "SIGTERM" in logs
    assert "Resuming" in logs, "job 0 was not resumed from its last.pt after the requeue"
    for number in (0, 1):
        assert strip_timing(jobs[number]["history"]) == strip_timing(uninterrupted[number]["history"])
        assert jobs[number]["best"]["epoch"] == uninterrupted[number]["best"]["epoch"]


def test_a_cancelled_job_ends_the_sweep_and_is_reported_unfinished(cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # the sweep ends (submitit reports the cancelled job as failed): the point is that it does not hang
    # once its first evaluation is recorded: the job's stop signals are its own from the start of the
    # training loop on (its folder's record is written earlier, when the job starts)
    stop_during_sweep(cluster, sweep_dir, 1, lambda: len((read_record(sweep_dir / "1") or {}).get("history", [])) >= 1,
                      "job 1 started training", ["scancel"])
    jobs = read_jobs(sweep_dir)
    assert jobs[0]["status"] == "finished"
    assert jobs[1]["status"] == "interrupted" and jobs[1]["error"].startswith("stopped by SIGTERM"), jobs[1]
    report = run_module("aomd.report", str(sweep_dir))
    assert report.returncode == 0, report.stderr
    text = (sweep_dir / "report.md").read_text()
    assert "## Jobs not finished (1)" in text
    unfinished = text.split("## Jobs not finished", 1)[1]
    assert "- job `1`:" in unfinished


def test_a_preempted_job_saves_its_epoch_is_requeued_and_ends_as_if_never_stopped(cluster, uninterrupted, tmp_path):
    """`scancel --signal=USR2` is how SLURM (and submitit's own tests) preempt a job: the job saves
    last.pt after its current step, submitit requeues it, and it continues from that step."""
    sweep_dir = tmp_path / "sweep"
    code, output = stop_during_sweep(cluster, sweep_dir, 0, lambda: epochs_saved(sweep_dir / "0") >= 1,
                                     "job 0 trained an epoch", ["scancel", "--signal=USR2"],
                                     launcher=[*CPU_ONLY, "hydra.launcher.timeout_min=60"])
    assert code == 0, output[-3000:]
    logs = job_log(sweep_dir, 0)
    assert "SIGUSR2" in logs and f"saved {sweep_dir / '0' / 'checkpoints' / 'last.pt'}" in logs  # after the step (or evaluation) in progress
    assert "this job is preempted" in logs and "Requeued job" in logs  # submitit's words
    assert "Resuming" in logs
    jobs = read_jobs(sweep_dir)
    for number in (0, 1):
        assert jobs[number]["status"] == "finished"
        assert strip_timing(jobs[number]["history"]) == strip_timing(uninterrupted[number]["history"])


def test_a_job_reaching_its_time_limit_is_requeued_as_often_as_max_num_timeout_allows(cluster, tmp_path):
    """Two single-job sweeps at once, each job given one minute: SLURM sends SIGUSR2
    `signal_delay_s` (plus up to its 30 s check interval) before the limit, 20 to 50 s after the
    job started. The job saves and submitit requeues it, at most `max_num_timeout` times: with 8
    the job trains about 50 s over several attempts and finishes; with 0 it is not requeued and
    its record says why."""
    one_minute = [*CPU_ONLY, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=10"]
    requeued, not_requeued = tmp_path / "requeued", tmp_path / "not-requeued"
    processes = [
        start_sweep(requeued, cluster, launcher=[*one_minute, "hydra.launcher.max_num_timeout=8"],
                    epochs=["train.epochs=10", "train.iters_per_epoch=50"], losses="loss=triplet"),
        start_sweep(not_requeued, cluster, launcher=[*one_minute, "hydra.launcher.max_num_timeout=0"],
                    epochs=["train.epochs=30", "train.iters_per_epoch=50"], losses="loss=triplet"),
    ]
    try:
        (code, output), (_, refused_output) = (finish(process) for process in processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert code == 0, output[-3000:]
    logs = job_log(requeued, 0)
    assert "this job is timed-out" in logs and "Requeued job" in logs and "Resuming" in logs
    record = read_jobs(requeued)[0]
    assert record["status"] == "finished" and [r["epoch"] for r in record["history"]] == list(range(11))

    logs = job_log(not_requeued, 0)
    assert "this job is timed-out" in logs and "Requeued job" not in logs
    record = read_jobs(not_requeued)[0]
    assert record["status"] == "failed" and "timed-out too many times" in record["error"], record.get("error")
    assert "job 0 failed: UncompletedJobError" in refused_output
    assert (not_requeued / "0" / "checkpoints" / "last.pt").is_file()  # a rerun of the sweep continues it
