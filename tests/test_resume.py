"""A killed job continues from its last.pt and ends exactly as if it had never stopped (CPU)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aomd import resume
from aomd.config import validate
from aomd.records import FINISHED, finished_record
from aomd.train import job_identities, job_identity
from conftest import REPO, TINY, compose, run_module, signalled_at_step, strip_timing, train
from test_config import assert_one_line_error
from wandb_files import read_offline_run

FOUR_EPOCHS = [*TINY, "train.epochs=4", "train.iters_per_epoch=4", "train.lr_decay_epochs=[3]", "logger=none"]


def kill_when(run_dir: Path, args: list[str], ready, env: dict | None = None, timeout: float = 300,
              whole_job: bool = False) -> None:
    """Start `python -m aomd.train <args>` into `run_dir` and SIGKILL it as soon as `ready()`;
    `whole_job`: every process it started too (W&B's service), as SLURM ends a job."""
    process = subprocess.Popen([sys.executable, "-m", "aomd.train", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                               env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=whole_job)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "the job did not get far enough in time"
            time.sleep(0.02)
        if whole_job:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(signal.SIGKILL)
    finally:
        process.wait()


def epochs_saved(checkpoint: Path) -> int:
    """The epoch a last.pt was written after (-1 when there is none yet or it is being replaced)."""
    try:
        return torch.load(checkpoint, weights_only=True)["training"]["epoch"]
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def assert_same_checkpoint(a: Path, b: Path) -> None:
    first, second = (torch.load(p, weights_only=True) for p in (a, b))
    assert first["metrics"]["epoch"] == second["metrics"]["epoch"]
    for name in ("model", "objective"):
        assert first[name].keys() == second[name].keys()
        for key, value in first[name].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, second[name][key]), (name, key)


def leave_run(folder: Path, status: str | None, overrides: list[str], identity: str | None) -> Path:
    """A folder as an earlier job left it: its metrics.json (`status`, `overrides`) and a last.pt
    written by the job `identity` (none where None)."""
    if status is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"status": status, "overrides": overrides}))
    if identity is not None:
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({"architecture": {}, "model": {}, "training": {"identity": identity}}, folder / "checkpoints" / "last.pt")
    return folder / "checkpoints" / "last.pt"


EARLIER, NOW = ["train.lr=0.001", "train.num_workers=0"], ["train.lr=0.0005", "eval.recall_k=[1,2]", "eval.batch_size=64"]


@pytest.mark.parametrize("status, identity, message", [
    ("interrupted", "earlier", "holds an interrupted run of another configuration (train.lr: 0.001 -> 0.0005, "
                               "eval.recall_k: default -> [1,2]); pass train.resume=never to replace it, or another hydra.run.dir"),
    ("finished", None, "holds a finished run of another configuration (train.lr: 0.001 -> 0.0005, "
                       "eval.recall_k: default -> [1,2]); pass train.resume=never to replace it, or another hydra.run.dir"),
    (None, "earlier", "holds an unfinished run of another configuration (its last.pt was written by another job, and it "
                      "has no metrics.json)"),
])
def test_a_job_does_not_discard_another_configurations_run(status, identity, message, tmp_path, caplog):
    """A single job pointed (hydra.run.dir) to another configuration's run stops before any work,
    saying what differs; a sweep job (a sweep rerun with other values into the same folders)
    starts over there, with a warning."""
    leave_run(tmp_path, status, EARLIER, identity)
    with pytest.raises(resume.ResumeError, match=re.escape(f"{tmp_path} {message}")):
        resume.job_source("auto", tmp_path, NOW, "now", sweep_job=False)
    assert resume.job_source("auto", tmp_path, NOW, "now", sweep_job=True) is None
    assert f"{tmp_path} held {message.removeprefix('holds ').split('; pass')[0]}; this job starts over there" in caplog.text


def test_a_job_continues_its_run_whatever_changed_that_it_does_not_learn_from(tmp_path):
    """The same last.pt identity (what the job learns from) continues, whatever the record's
    overrides (precision, device); a run of another configuration with nothing to lose (failed
    before its first save) is replaced without a word; the evaluation's batch size does not
    identify a job."""
    last = leave_run(tmp_path / "same", "interrupted", ["train.precision=fp32"], "now")
    assert resume.job_source("auto", tmp_path / "same", NOW, "now", sweep_job=False) == last
    leave_run(tmp_path / "failed", "failed", EARLIER, None)
    assert resume.job_source("auto", tmp_path / "failed", NOW, "now", sweep_job=False) is None
    leave_run(tmp_path / "mine", FINISHED, ["eval.batch_size=256", "eval.chunk_size=64", *NOW], None)
    assert finished_record(tmp_path / "mine", [f"+{NOW[0]}", *NOW[1:]])  # the same job ("+key" or not): skipped as finished
    composed = [validate(compose(*TINY, f"eval.batch_size={size}", f"eval.chunk_size={size}")) for size in (64, 128)]
    assert job_identity(composed[0]) == job_identity(composed[1])
    assert job_identity(composed[0]) != job_identity(validate(compose(*TINY, "train.lr=0.0005")))


def test_a_run_saved_under_the_earlier_identity_rule_continues(tmp_path):
    """A last.pt written before the evaluation's sizes stopped identifying a job (a SLURM job
    requeued across the upgrade) continues; one of other defaults is refused, saying so."""
    cfg = validate(compose(*TINY))
    current, earlier = job_identities(cfg)
    assert current != earlier and current == job_identity(cfg)
    last = leave_run(tmp_path, "interrupted", NOW, earlier)
    assert resume.job_source("auto", tmp_path, NOW, (current, earlier), sweep_job=False) == last
    with pytest.raises(resume.ResumeError, match=re.escape("it belongs to another job (the same overrides, but other "
                                                           "defaults: written by another aomd version")):
        resume.job_source("auto", tmp_path, NOW, current, sweep_job=False)


def test_a_run_continued_from_another_folder_is_checked_before_any_work(tmp_path):
    """train.resume=<run folder> of another job: refused by job_source (before data, teacher,
    networks), naming what differs."""
    leave_run(tmp_path / "earlier", "interrupted", EARLIER, "earlier")
    with pytest.raises(resume.ResumeError, match=re.escape("it belongs to another job (train.lr: 0.001 -> 0.0005, ")) as error:
        resume.job_source(str(tmp_path / "earlier"), tmp_path / "now", NOW, "now", sweep_job=False)
    # the run named is not this job's to delete
    assert "Delete it" not in str(error.value) and str(error.value).endswith(resume.OTHER_SOURCE)


def test_a_job_run_again_in_its_folder_continues_its_own_progress_whatever_train_resume_says(tmp_path, monkeypatch):
    """Started from another folder (train.resume=<folder>) and stopped, a job requeued by SLURM (or
    run again as its stop line says) goes on from its own last.pt, not from that folder again;
    with train.resume=never, a SLURM requeue of the job that started over continues it too (it
    would otherwise start over on every requeue), and nothing else does."""
    source = leave_run(tmp_path / "source", "interrupted", NOW, "now")
    own = leave_run(tmp_path / "job", "interrupted", NOW, "now")
    # a run of this job the folder holds that did not start from there: the explicit source wins
    assert resume.job_source(str(tmp_path / "source"), tmp_path / "job", NOW, "now", sweep_job=False) == source
    torch.save({"architecture": {}, "model": {}, "training": {"identity": "now", "started_from": str(source.resolve())}}, own)
    assert resume.job_source(str(tmp_path / "source"), tmp_path / "job", NOW, "now", sweep_job=False) == own
    assert resume.job_source(str(source), tmp_path / "job", NOW, "now", sweep_job=False) == own  # named by its last.pt
    assert resume.job_source(str(tmp_path / "source"), tmp_path / "fresh", NOW, "now", sweep_job=False) == source
    leave_run(tmp_path / "other", "interrupted", EARLIER, "earlier")  # another job's run here: not continued
    assert resume.job_source(str(tmp_path / "source"), tmp_path / "other", NOW, "now", sweep_job=False) == source
    assert resume.job_source("never", tmp_path / "job", NOW, "now", sweep_job=False) is None
    record = json.loads((tmp_path / "job" / "metrics.json").read_text())
    (tmp_path / "job" / "metrics.json").write_text(json.dumps({**record, "slurm_job_id": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert resume.job_source("never", tmp_path / "job", NOW, "now", sweep_job=False) is None  # its first start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume.job_source("never", tmp_path / "job", NOW, "now", sweep_job=False) == own
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another SLURM job with train.resume=never: starts over
    assert resume.job_source("never", tmp_path / "job", NOW, "now", sweep_job=False) is None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run folder of FOUR_EPOCHS run to its end, once for the tests that stop the same job."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    train(folder, *FOUR_EPOCHS, tiny=False)
    return folder


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_history_and_best(uninterrupted, tmp_path):
    kill_when(tmp_path, FOUR_EPOCHS, lambda: epochs_saved(tmp_path / "checkpoints" / "last.pt") >= 2)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "running"
    assert_resumes_to(uninterrupted, tmp_path, FOUR_EPOCHS, "Resuming after epoch 2 of 4")


def assert_resumes_to(uninterrupted: Path, stopped: Path, args: list[str], message: str) -> None:
    """Running the job again into `stopped` says `message` and ends exactly as `uninterrupted` did:
    the same history, the same best.pt and last.pt."""
    result = run_module("aomd.train", *args, f"hydra.run.dir={stopped}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert message in result.stdout + result.stderr
    resumed, expected = (json.loads((folder / "metrics.json").read_text()) for folder in (stopped, uninterrupted))
    assert resumed["status"] == "finished"
    assert strip_timing(resumed["history"]) == strip_timing(expected["history"])
    assert resumed["best"]["epoch"] == expected["best"]["epoch"]
    for name in ("best.pt", "last.pt"):
        assert_same_checkpoint(uninterrupted / "checkpoints" / name, stopped / "checkpoints" / name)


TWO_EPOCHS_LAST = [*TINY, "train.epochs=2", "train.iters_per_epoch=4", "eval.select=last", "logger=none"]


def checkpoint_epochs(folder: Path) -> dict[str, int]:
    """{file name: epoch of its metrics} of the run's checkpoints."""
    return {path.name: torch.load(path, weights_only=True)["metrics"]["epoch"] for path in (folder / "checkpoints").glob("*.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("where, after_kill, message", [
    # best.next.pt of epoch 2 written, last.pt of epoch 2 not: best.pt stays the best last.pt records (1)
    ("last", {"best.pt": 1, "last.pt": 1, "best.next.pt": 2}, "Resuming after epoch 1 of 2"),
    # last.pt of epoch 2 written, best.next.pt not yet best.pt: the resumed job completes the step
    ("commit", {"best.pt": 1, "last.pt": 2, "best.next.pt": 2}, "Completing"),
])
def test_a_job_killed_while_its_best_pt_changes_resumes_with_the_best_pt_its_last_pt_records(where, after_kill, message, tmp_path):
    """eval.select=last makes every epoch the selected one. Killed as epoch 2's checkpoints are
    written, the folder never pairs a last.pt with a best.pt of an epoch it does not record as the
    best, and the resumed job ends as one never killed."""
    uninterrupted = tmp_path / "uninterrupted"
    train(uninterrupted, *TWO_EPOCHS_LAST, tiny=False)
    killed = tmp_path / "killed"
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    result = run_module("aomd.train", *TWO_EPOCHS_LAST, f"hydra.run.dir={killed}",
                        env={"AOMD_PLUGINS": "checkpoint_kill_plugin", "PYTHONPATH": path, "AOMD_TEST_KILL": f"{where}@2"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert checkpoint_epochs(killed) == after_kill
    assert_resumes_to(uninterrupted, killed, TWO_EPOCHS_LAST, message)
    assert checkpoint_epochs(killed) == {"best.pt": 2, "last.pt": 2}

def test_a_signal_in_the_middle_of_an_epoch_saves_it_and_the_run_resumes_exactly(uninterrupted, tmp_path):
    # step 7 of 4 x 4: the third step of epoch 2; the step finishes, then the job saves and stops
    result = run_module("aomd.train", *FOUR_EPOCHS, f"hydra.run.dir={tmp_path}", env=signalled_at_step("SIGTERM", 7))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert f"SIGTERM in epoch 2 after step 3 of 4: saved {tmp_path / 'checkpoints' / 'last.pt'}" in result.stdout + result.stderr
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "interrupted"
    assert record["error"].startswith("stopped by SIGTERM in epoch 2 after step 3 of 4")
    assert [r["epoch"] for r in record["history"]] == [0, 1]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["training"]
    assert state["epoch"] == 1 and state["partial"]["epoch"] == 2 and state["partial"]["steps"] == 3
    assert_resumes_to(uninterrupted, tmp_path, FOUR_EPOCHS, "Resuming in epoch 2 of 4 after step 3 of 4")


@pytest.mark.slow
def test_a_resumed_job_needs_no_imagenet_weights(tmp_path):
    """A job with backbone.pretrained=true loads ImageNet weights when it starts; resumed, its
    last.pt holds the whole network, so weights that are no longer there (a node without them,
    no network) do not stop it."""
    import torchvision

    torch_home = tmp_path / "torch"
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    stand_in = torch_home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    stand_in.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), stand_in)  # stands in for the download
    args = [*TINY, "train.epochs=2", "train.iters_per_epoch=4", "logger=none", "backbone.pretrained=true",
            f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_module("aomd.train", *args, env={**signalled_at_step("SIGTERM", 5), "TORCH_HOME": str(torch_home)})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    stand_in.unlink()
    result = run_module("aomd.train", *args, env={"TORCH_HOME": str(torch_home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming in epoch 2 of 2 after step 1 of 4" in result.stdout + result.stderr

@pytest.mark.slow
@pytest.mark.parametrize("signal_name, when, workers, where, resumed", [
    # the loader worker gets the signal too; the batches are drawn in the training process, so a
    # worker does not change the history. With a worker, each epoch's reading starts before the
    # evaluation of the one before (engine.epoch_batches): the sampler has drawn ahead when the
    # job stops in the epoch or in that evaluation
    ("SIGUSR2", "7", 1, "in epoch 2 after step 3 of 4", "Resuming in epoch 2 of 4 after step 3 of 4"),
    ("SIGINT", "7", 0, "in epoch 2 after step 3 of 4", "Resuming in epoch 2 of 4 after step 3 of 4"),
    ("SIGUSR1", "8", 0, "in epoch 2 after step 4 of 4", "Resuming in epoch 2 of 4 after step 4 of 4"),  # #SBATCH --signal=USR1@90
    # in an epoch's evaluation: its steps are saved, the resumed job evaluates it (an evaluation
    # can outlast the time SLURM gives between its signal and the end of the job)
    ("SIGTERM", "eval3", 1, "in the evaluation of epoch 2 (its 4 steps done)", "Resuming in epoch 2 of 4 after step 4 of 4"),
    ("SIGTERM", "eval3", 0, "in the evaluation of epoch 2 (its 4 steps done)", "Resuming in epoch 2 of 4 after step 4 of 4"),
    ("SIGTERM", "eval1", 0, "after the evaluation before training", "Resuming after epoch 0 of 4"),
])
def test_a_signal_anywhere_saves_and_the_run_resumes_exactly(signal_name, when, workers, where, resumed,
                                                            uninterrupted, tmp_path):
    args = [*FOUR_EPOCHS, f"train.num_workers={workers}"]
    result = run_module("aomd.train", *args, f"hydra.run.dir={tmp_path}", env=signalled_at_step(signal_name, when))
    assert result.returncode == 128 + getattr(signal, signal_name), result.stderr[-3000:]
    if signal_name == "SIGINT":  # Ctrl-C: a line, not a traceback
        assert f"interrupted; the same command with hydra.run.dir={tmp_path} continues it" in result.stderr
    else:  # the job's folder is timestamped by default: the line says which one continues it
        assert f"aomd.train: stopped by {signal_name} {where}; the same command with hydra.run.dir={tmp_path} continues it " \
               "(train.resume=auto)." in result.stderr
    assert "Traceback" not in result.stderr
    assert f"{signal_name} {where}: saved {tmp_path / 'checkpoints' / 'last.pt'}" in result.stdout + result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"
    assert_resumes_to(uninterrupted, tmp_path, args, resumed)


@pytest.mark.slow
def test_a_run_continued_in_another_folder_starts_there_with_its_best_pt(uninterrupted, tmp_path):
    stopped, other = tmp_path / "stopped", tmp_path / "other"
    result = run_module("aomd.train", *FOUR_EPOCHS, f"hydra.run.dir={stopped}", env=signalled_at_step("SIGTERM", 9))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    best_epoch = json.loads((uninterrupted / "metrics.json").read_text())["best"]["epoch"]
    assert best_epoch <= 2  # chosen before the stop: no epoch of the continued run writes best.pt
    # the fp16 gradient scaler is not part of the job: a run saved in fp32 continues with a fresh one
    assert_resumes_to(uninterrupted, other, [*FOUR_EPOCHS, f"train.resume={stopped}"], "Resuming in epoch 3 of 4 after step 1 of 4")
    # what a stop and a requeue here would go on from (resume.own_unfinished_run)
    training = torch.load(other / "checkpoints" / "last.pt", weights_only=True)["training"]
    assert training["started_from"] == str((stopped / "checkpoints" / "last.pt").resolve())


@pytest.mark.slow
def test_a_single_run_with_train_resume_never_requeued_after_it_finished_is_done(tmp_path):
    """The time limit's signal came as the run ended: SLURM's requeue of the same job runs the same
    command, whose train.resume=never would train it all again."""
    args = [*TINY, "logger=none", "train.resume=never", f"hydra.run.dir={tmp_path}"]
    result = run_module("aomd.train", *args, env={"SLURM_JOB_ID": "77"})
    assert result.returncode == 0, result.stderr[-3000:]
    stamp = (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns
    result = run_module("aomd.train", *args, env={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    assert result.returncode == 0 and "by this SLURM job, before it was requeued" in result.stdout + result.stderr
    assert (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_run_started_over_and_stopped_says_to_continue_it_with_train_resume_auto(tmp_path):
    """train.resume=never in the same command would start it over again: its stop line says so."""
    args = [*TINY, "logger=none", "train.epochs=2", "train.iters_per_epoch=3"]
    result = run_module("aomd.train", *args, "train.resume=never", f"hydra.run.dir={tmp_path}",
                        env=signalled_at_step("SIGTERM", 4))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert f"the same command with hydra.run.dir={tmp_path} train.resume=auto continues it" in result.stderr
    result = run_module("aomd.train", *args, "train.resume=auto", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0 and "Resuming in epoch 2 of 2 after step 1 of 3" in result.stdout + result.stderr, \
        result.stderr[-3000:]


@pytest.mark.slow
def test_a_run_started_over_and_killed_before_its_first_save_does_not_resume_the_old_one(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    result = run_module("aomd.train", *FOUR_EPOCHS, "train.resume=never", f"hydra.run.dir={tmp_path}",
                        env=signalled_at_step("SIGKILL", 1))
    assert result.returncode == -signal.SIGKILL
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # the old run's, which this run's best.pt no longer matches
    result = run_module("aomd.train", *FOUR_EPOCHS, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0 and "Resuming" not in result.stdout + result.stderr, result.stderr[-3000:]
    resumed, expected = (json.loads((folder / "metrics.json").read_text()) for folder in (tmp_path, uninterrupted))
    assert strip_timing(resumed["history"]) == strip_timing(expected["history"])
    assert_same_checkpoint(uninterrupted / "checkpoints" / "best.pt", tmp_path / "checkpoints" / "best.pt")


@pytest.mark.slow
def test_a_job_that_failed_after_claiming_another_jobs_folder_runs_when_started_again(uninterrupted, tmp_path):
    """The first try fails after the job took the folder over (its teachers' folder cannot be made):
    the earlier job's last.pt must not be taken for this job's on the next try."""
    job = tmp_path / "0"  # job 0 of a sweep rerun with other values into the folders of another
    shutil.copytree(uninterrupted, job)
    distil = ["-m", *TINY, "logger=none", "loss=sp", "teacher.backbone=resnet18", "teacher.embedding_size=32",
              "teacher.train.epochs=1", "teacher.train.iters_per_epoch=2", f"hydra.sweep.dir={tmp_path}"]
    result = run_module("aomd.train", *distil, "paths.teachers_dir=/dev/null/teachers")
    assert result.returncode == 1 and not (job / "checkpoints" / "last.pt").exists()
    assert "held a finished run of another configuration" in result.stdout + result.stderr
    result = run_module("aomd.train", *distil, f"paths.teachers_dir={tmp_path / 'teachers'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((job / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_a_finished_run_is_not_trained_again(tmp_path):
    train(tmp_path)
    stamp = (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns
    result = run_module("aomd.train", *TINY, "logger=none", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0 and "Skipping" in result.stderr + result.stdout
    assert (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_foreign_or_truncated_last_pt_is_refused_in_one_line(uninterrupted, tmp_path):
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(uninterrupted / "checkpoints" / "last.pt", other / "checkpoints" / "last.pt")
    result = run_module("aomd.train", *TINY, "logger=none", "train.lr=0.005", f"hydra.run.dir={other}")
    assert_one_line_error(result, "holds an unfinished run of another configuration", "written by another job",
                          "train.resume=never")
    (other / "metrics.json").write_text(json.dumps({**json.loads((uninterrupted / "metrics.json").read_text()),
                                                    "status": "interrupted"}))
    result = run_module("aomd.train", *TINY, "logger=none", "train.lr=0.005", f"hydra.run.dir={other}")
    assert_one_line_error(result, "holds an interrupted run of another configuration (train.epochs: 4 -> 1, "
                                  "train.iters_per_epoch: 4 -> 2, train.lr_decay_epochs: [3] -> default, "
                                  "train.lr: default -> 0.005)")
    (other / "metrics.json").unlink()
    (other / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    result = run_module("aomd.train", *TINY, "logger=none", "train.lr=0.005", f"hydra.run.dir={other}")
    assert_one_line_error(result, "Cannot resume", "Delete it", "train.resume=never")
    result = run_module("aomd.train", *TINY, "logger=none", "train.lr=0.005", "train.resume=never", f"hydra.run.dir={other}")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_a_sweep_rerun_with_other_values_starts_over_in_a_folder_another_configuration_left(uninterrupted, tmp_path):
    """Job N of a sweep rerun into the same hydra.sweep.dir with other values finds job N of the
    first sweep unfinished there: its record and its last.pt are another configuration's."""
    job = tmp_path / "0"
    shutil.copytree(uninterrupted / "checkpoints", job / "checkpoints")
    record = json.loads((uninterrupted / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps({**record, "status": "interrupted"}))
    result = run_module("aomd.train", "-m", *TINY, "logger=none", "train.lr=0.005", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0 and "Resuming" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert "held an interrupted run of another configuration (train.epochs: 4 -> 1" in result.stdout + result.stderr
    record = json.loads((job / "metrics.json").read_text())
    assert record["status"] == "finished" and "train.lr=0.005" in record["overrides"]
    assert [r["epoch"] for r in record["history"]] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_distillation_stopped_while_its_teacher_trains_resumes_exactly(stop, tmp_path):
    teacher = ["loss=aomd_mode2", "teacher.backbone=resnet18", "teacher.embedding_size=32", "teacher.train.epochs=4",
               "teacher.train.iters_per_epoch=4", "teacher.train.lr_decay_epochs=[3]"]
    args = [*FOUR_EPOCHS, *teacher]
    uninterrupted = train(tmp_path / "a", *args, tiny=False, env={"AOMD_CACHE_DIR": str(tmp_path / "cache-a")})
    cache = tmp_path / "cache-b"
    if stop == "SIGKILL":  # after the teacher's second epoch
        teacher_last = lambda: next(iter(sorted((cache / "teachers").glob("*/checkpoints/last.pt"))), Path("/nonexistent"))
        kill_when(tmp_path / "b", args, lambda: epochs_saved(teacher_last()) >= 2, env={"AOMD_CACHE_DIR": str(cache)})
    else:  # in the teacher's third epoch (the student has not trained yet): the student's record says so
        result = run_module("aomd.train", *args, f"hydra.run.dir={tmp_path / 'b'}",
                            env={"AOMD_CACHE_DIR": str(cache), **signalled_at_step("SIGTERM", 10)})
        assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
        record = json.loads((tmp_path / "b" / "metrics.json").read_text())
        assert record["status"] == "interrupted" and record["error"].startswith("stopped by SIGTERM in epoch 3 after step 2")
        assert record["error"].endswith("(training its teacher)")
    result = run_module("aomd.train", *args, f"hydra.run.dir={tmp_path / 'b'}", env={"AOMD_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Resuming after epoch 2" if stop == "SIGKILL" else "Resuming in epoch 3 of 4 after step 2") in result.stderr + result.stdout
    resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert resumed["teacher"] == uninterrupted["teacher"]
    assert strip_timing(resumed["history"]) == strip_timing(uninterrupted["history"])
    (teacher_a,), (teacher_b,) = ((tmp_path / c / "teachers").glob("*/checkpoints/best.pt") for c in ("cache-a", "cache-b"))
    assert_same_checkpoint(teacher_a, teacher_b)


@pytest.mark.slow
def test_a_job_killed_before_its_first_last_pt_starts_again_in_its_wandb_run(tmp_path):
    """Killed outright after its epoch-0 evaluation, before any last.pt: run again, the job starts
    over in the W&B run its metrics.json names (one run per job in the dashboard), and the earlier
    attempt's offline folder, which `wandb sync` would upload beside it, is gone."""
    args = [*FOUR_EPOCHS[:-1], "logger=wandb", "logger.mode=offline", "logger.project=aomd-test"]
    env = {"WANDB_MODE": "offline"}
    record = lambda: json.loads((tmp_path / "metrics.json").read_text()) if (tmp_path / "metrics.json").is_file() else {}
    kill_when(tmp_path, args, lambda: len(record().get("history", [])) >= 1, env=env, whole_job=True)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    run_id = record()["wandb_run_id"]
    (earlier,) = (tmp_path / "wandb").glob("offline-run-*")
    result = run_module("aomd.train", *args, f"hydra.run.dir={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not earlier.exists()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert len(list(run.glob("run-*.wandb"))) == 1, sorted(p.relative_to(tmp_path) for p in (tmp_path / "wandb").rglob("*"))
    logged = read_offline_run(run)
    assert logged["id"] == record()["wandb_run_id"] == run_id
    assert [h["epoch"] for h in logged["history"] if "test/recall@1" in h] == [0, 1, 2, 3, 4]
    # started again with train.resume=never, a job is a new run
    result = run_module("aomd.train", *args, "train.resume=never", f"hydra.run.dir={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert record()["wandb_run_id"] != run_id


@pytest.mark.slow
def test_a_resumed_job_continues_its_wandb_run(tmp_path):
    args = [*FOUR_EPOCHS[:-1], "logger=wandb", "logger.mode=offline", "logger.project=aomd-test"]
    env = {"WANDB_MODE": "offline"}
    # stopped by SIGTERM in epoch 3 (its first step)
    result = run_module("aomd.train", *args, f"hydra.run.dir={tmp_path}", env={**env, **signalled_at_step("SIGTERM", 9)})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    result = run_module("aomd.train", *args, f"hydra.run.dir={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    assert read_offline_run(runs[0])["summary"]["status"] == "interrupted"
    # one run per job in the dashboard: the same id (the end of an offline run folder's name)
    assert len({run.name.rsplit("-", 1)[1] for run in runs}) == 1
    first, second = read_offline_run(runs[0]), read_offline_run(runs[1])
    assert second["id"] == runs[0].name.rsplit("-", 1)[1]
    # `wandb sync` of a run id replaces what the run held, so the newest folder holds the whole job:
    # the earlier epochs again, then the ones after the resume (it continued, it did not start over)
    logged = lambda run: [(h["epoch"], h["test/recall@1"]) for h in run["history"] if "test/recall@1" in h]
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert logged(second) == [(r["epoch"], r["recall@1"]) for r in record["history"]]
    assert logged(second)[:len(logged(first))] == logged(first) and logged(second)[-1][0] == 4
    assert second["summary"]["best/recall@1"] == record["best"]["recall@1"]
    assert second["summary"]["best/epoch"] == record["best"]["epoch"]
    assert second["summary"]["dataset/train_images"] == record["dataset"]["train_images"]



def test_random_states_saved_where_more_cards_were_visible_restore_on_the_cards_there_are(monkeypatch):
    """A run saved on a node whose four cards it saw, resumed in a job that sees one."""
    import numpy as np

    from aomd.data.sampler import ClassBalancedBatchSampler
    from aomd.resume import random_states, restore_random_states, sampler_state

    sampler = ClassBalancedBatchSampler(np.repeat(np.arange(4), 2), 4, 2, 1)
    states = random_states(sampler_state(sampler), torch.Generator())
    states["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device: state}))
    restore_random_states(states, sampler, torch.Generator())
    assert list(restored) == [0] and torch.equal(restored[0], states["cuda"][0])


def test_a_job_starting_over_removes_the_earlier_runs_last_pt_and_its_wandb_files_only(tmp_path):
    """`wandb sync <folder>/wandb/offline-run-*` would otherwise upload the replaced run beside the new
    one; another configuration's W&B files stay (perhaps not uploaded yet)."""
    (tmp_path / "checkpoints").mkdir()
    torch.save({"architecture": {}, "model": {}, "training": {"identity": "earlier", "wandb_run_id": "abc123"}},
               tmp_path / "checkpoints" / "last.pt")
    replaced, other = (tmp_path / "wandb" / f"offline-run-20261127_070000-{run_id}" for run_id in ("abc123", "xyz789"))
    for files in (replaced, other):
        files.mkdir(parents=True)
        (files / f"run-{files.name[-6:]}.wandb").write_bytes(b"")
    resume.forget_earlier_run(tmp_path, its_own=False)  # another configuration's run: its W&B files may be all there is
    assert not (tmp_path / "checkpoints" / "last.pt").exists() and replaced.is_dir() and other.is_dir()
    torch.save({"architecture": {}, "model": {}, "training": {"identity": "earlier", "wandb_run_id": "abc123"}},
               tmp_path / "checkpoints" / "last.pt")
    resume.forget_earlier_run(tmp_path, its_own=True)  # this configuration's, started over
    assert not (tmp_path / "checkpoints" / "last.pt").exists() and not replaced.exists() and other.is_dir()
    resume.forget_earlier_run(tmp_path, its_own=True)  # nothing left to forget
