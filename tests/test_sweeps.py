"""Sweeps of the real entrypoint: loss configs, presets, W&B grouping, failures, reruns, launchers."""
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import TINY, run_module
from wandb_files import read_offline_run



def sweep(sweep_dir: Path, *overrides: str, logger="logger=none", timeout=900, returncode=0, env=None):
    """Run `python -m aomd.train -m ...` into `sweep_dir`; return {job number: metrics.json}."""
    result = run_module("aomd.train", "-m", *TINY, logger, f"hydra.sweep.dir={sweep_dir}", *overrides, timeout=timeout,
                        env=env)
    assert result.returncode == returncode, result.stderr[-3000:]
    jobs = {int(p.parent.name): json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}
    return jobs, result


def offline_runs(sweep_dir: Path) -> dict[int, dict]:
    return {int(run.parents[1].name): read_offline_run(run) for run in sweep_dir.glob("*/wandb/offline-run-*")}


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    jobs, result = sweep(tmp_path, "train.lr=-1,1e-3", returncode=1)  # the job after the failed one runs; exit status 1
    assert jobs[0]["status"] == "failed" and "train.lr must be positive" in jobs[0]["error"]
    assert jobs[1]["status"] == "finished"
    assert "1 of 2 jobs finished" in result.stdout and "job 0 failed" in result.stdout
    report = run_module("aomd.report", str(tmp_path))
    assert report.returncode == 0, report.stderr
    assert "train.lr must be positive" in (tmp_path / "report.md").read_text()


def test_the_summary_counts_job_folders_nested_by_their_overrides(tmp_path):
    """hydra.sweep.subdir=${hydra.job.override_dirname} with a value holding "/" (a path) nests
    the job folders: the summary still finds both jobs, and the failed one sets the exit status.
    The folders' names leave out the overrides that do not identify a job (logger.*, paths.*)."""
    cache = os.environ["AOMD_CACHE_DIR"]
    # a triplet job reads no teacher: teacher.checkpoint is only a value holding "/" that identifies the job
    _, result = sweep(tmp_path, "train.lr=-1,1e-3", "teacher.checkpoint=/teachers/best.pt", f"paths.cache_dir={cache}",
                      "logger.mode=disabled", "hydra.sweep.subdir=${hydra.job.override_dirname}", returncode=1)
    assert "1 of 2 jobs finished" in result.stdout
    assert re.search(r"job \S*teacher.checkpoint=/teachers/best.pt,\S*train.lr=-1 failed: ConfigError: train.lr must be positive",
                     result.stdout), result.stdout[-2000:]
    folders = [path.parent.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("metrics.json")]
    assert len(folders) == 2 and not any("paths." in folder or "logger." in folder for folder in folders), folders



@pytest.mark.slow
def test_rerunning_a_sweep_skips_finished_jobs(tmp_path):
    # the two losses no preset covers, so that every loss config runs end to end somewhere
    first, _ = sweep(tmp_path, "loss=triplet_l1,contrastive", env={"SLURM_JOB_ID": "77"})  # as in a SLURM job
    assert all(job["status"] == "finished" for job in first.values())
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/checkpoints/last.pt")}
    again, result = sweep(tmp_path, "loss=triplet_l1,contrastive")
    assert again == first and "Skipping" in result.stderr + result.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/checkpoints/last.pt")}
    # SLURM requeued the job that finished them (its time limit's signal came as it ended): skipped,
    # even where the sweep asked to run its jobs again
    requeued, result = sweep(tmp_path, "loss=triplet_l1,contrastive", "skip_finished=false",
                             env={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    assert requeued == first and "by this SLURM job, before it was requeued" in result.stderr + result.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/checkpoints/last.pt")}
    # another SLURM job, requeued before it reached them: it runs them again, as asked
    rerun, _ = sweep(tmp_path, "loss=triplet_l1,contrastive", "skip_finished=false",
                     env={"SLURM_JOB_ID": "78", "SLURM_RESTART_COUNT": "1"})
    assert stamps != {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/checkpoints/last.pt")}
    assert all(job["slurm_job_id"] == "78" for job in rerun.values())


@pytest.mark.slow
def test_baselines_preset_trains_every_loss_grouped_in_wandb(tmp_path):
    jobs, result = sweep(tmp_path, "preset=baselines", "logger.mode=offline", logger="logger=wandb")
    assert sorted(jobs) == list(range(8))
    assert all(job["status"] == "finished" for job in jobs.values()), {n: j.get("error") for n, j in jobs.items()}
    assert "8 of 8 jobs finished" in result.stdout
    # the distillation jobs share one teacher, trained once and evaluated in each job
    distilled = [job for job in jobs.values() if "teacher" in job]
    assert len(distilled) == 7 and len({json.dumps(job["teacher"]) for job in distilled}) == 1
    runs = offline_runs(tmp_path)
    assert sorted(runs) == list(range(8))
    assert len({run["group"] for run in runs.values()}) == 1 and runs[0]["group"]
    for number, run in runs.items():
        assert run["job_type"] == "student"
        assert "loss.aomd_ratio" in run["config"] and "loss.mode" in run["config"]
        assert run["summary"]["best/recall@1"] == pytest.approx(jobs[number]["best"]["recall@1"])
    names = {run["name"] for run in runs.values()}
    assert names == {f"loss={loss}" for loss in "triplet sp at fitnet darkrank rkd aomd_mode1 aomd_mode2".split()}
    aomd_run = next(r for r in runs.values() if r["name"] == "loss=aomd_mode1")
    assert aomd_run["config"]["loss.aomd_ratio"] == 200 and aomd_run["config"]["loss.mode"] == 1
    assert {"loss:aomd_mode1", "mode:1", "dataset:synthetic"} <= set(aomd_run["tags"])
    assert {n: r["config"]["choices.loss"] for n, r in runs.items()} == {n: r["name"][5:] for n, r in runs.items()}
    assert aomd_run["config"]["choices.dataset"] == "synthetic" and "choices.schema" not in aomd_run["config"]
    term_names = {key for job in jobs.values() for key in job["history"][1] if key.startswith("loss/")}
    assert term_names == {f"loss/{t}" for t in ("triplet", "aomd", "sp", "at", "fitnet", "dark", "dist", "angle")}
    report = run_module("aomd.report", str(tmp_path))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "baselines.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("preset, overrides, jobs_expected", [
    ("aomd_grid", [], 10),
    ("aomd_ablation", [], 6),
    ("seeds", ["loss=aomd_mode2"], 3),
])
def test_presets_run_unchanged_on_synthetic(tmp_path, preset, overrides, jobs_expected):
    jobs, _ = sweep(tmp_path, f"preset={preset}", *overrides, "logger.mode=offline", logger="logger=wandb")
    assert len(jobs) == jobs_expected and all(j["status"] == "finished" for j in jobs.values())
    runs = offline_runs(tmp_path)
    assert len(runs) == jobs_expected and len({r["group"] for r in runs.values()}) == 1
    if preset == "aomd_grid":
        assert {(r["config"]["loss.mode"], r["config"]["loss.aomd_ratio"]) for r in runs.values()} == {
            (m, r) for m in (1, 2) for r in (10, 50, 100, 200, 500)}
    if preset == "aomd_ablation":
        assert {(r["config"]["loss.global_weight"], r["config"]["loss.local_weight"]) for r in runs.values()} == {
            (1, 0), (0, 1), (1, 1)}
    if preset == "seeds":
        assert len({r["name"] for r in runs.values()}) == 1  # seeds of one configuration share a name
    report = run_module("aomd.report", str(tmp_path))
    assert report.returncode == 0, report.stderr


@pytest.mark.slow
def test_optuna_preset_maximises_recall_and_goes_on_after_a_failed_trial(tmp_path):
    """A trial that fails (here a sampled train.lr of -1) is a failed trial for Optuna, not the end
    of the search: the other trials run, and the best value is the finished trials' best."""
    jobs, result = sweep(tmp_path, "preset=optuna_aomd", "hydra.sweeper.n_trials=4", "train.lr=choice(-1.0,0.001)",
                         "logger.mode=offline", logger="logger=wandb", returncode=1)
    failed = [j for j in jobs.values() if j["status"] == "failed"]
    finished = [j for j in jobs.values() if j["status"] == "finished"]
    assert len(jobs) == 4 and failed and finished and all("train.lr must be positive" in j["error"] for j in failed)
    assert f"{len(finished)} of 4 jobs finished" in result.stdout
    # the task returns what the sweeper maximises: the selected epoch's validation Recall@1
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(j["best"]["val/recall@1"] for j in finished))
    runs = offline_runs(tmp_path)  # a trial refused before it trains has no W&B run
    assert len(runs) == len(finished) and len({r["group"] for r in runs.values()}) == 1
    for run in runs.values():
        assert 10 <= run["config"]["loss.aomd_ratio"] <= 1000 and run["config"]["loss.mode"] in (1, 2)
        assert "loss.aomd_ratio=" in run["name"] and "loss.mode=" in run["name"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    jobs, _ = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "loss=triplet,contrastive")
    assert sorted(jobs) == [0, 1] and all(j["status"] == "finished" for j in jobs.values())


@pytest.mark.slow
def test_distilled_and_triplet_students_end_above_the_untrained_student(tmp_path):
    """Longer runs than the other tests, on 64 px images: the students must learn from the teacher.

    The teacher here is a ResNet18-128 (two short epochs): a ResNet50 trained from scratch needs
    minutes of CPU before it beats its own initialisation, which the default recipe spends and a
    test should not.
    """
    longer = ["dataset.num_classes=40", "train.epochs=2", "train.iters_per_epoch=20", "train.batch_size=32",
              "train.images_per_class=4", "train.lr_decay_epochs=[]", "teacher.backbone=resnet18",
              "teacher.embedding_size=128", "teacher.train.epochs=2", "teacher.train.iters_per_epoch=30",
              "teacher.train.lr_decay_epochs=[]", "train.progress=false"]
    result = run_module("aomd.train", "-m", *longer, "logger=none", f"hydra.sweep.dir={tmp_path}",
                        "loss=triplet,aomd_mode1,aomd_mode2")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {int(p.parent.name): json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json")}
    assert sorted(jobs) == [0, 1, 2]
    assert jobs[1]["teacher"]["recall@1"] > jobs[1]["history"][0]["recall@1"], "the teacher learned"
    for number, job in jobs.items():
        untrained, final = job["history"][0]["recall@1"], job["history"][-1]["recall@1"]
        assert final > untrained, (number, untrained, final)


def test_the_summary_counts_the_jobs_of_this_sweep_only(tmp_path, capsys):
    """A sweep rerun into the folder of a larger one: the earlier sweep's job it did not run again
    (here 1, left unfinished) is not one of its jobs, so the sweep exits 0; its own unfinished job
    makes it exit 1."""
    import os
    import time

    from omegaconf import OmegaConf

    from aomd.cli import SweepSummary

    def job(number: int, status: str, age: float = 0.0) -> None:
        (tmp_path / str(number) / ".hydra").mkdir(parents=True)
        (tmp_path / str(number) / ".hydra" / "overrides.yaml").write_text(f"- train.seed={number}\n")
        (tmp_path / str(number) / "metrics.json").write_text(json.dumps({"status": status}))
        if age:
            os.utime(tmp_path / str(number) / ".hydra" / "overrides.yaml", (time.time() - age,) * 2)

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    summary = SweepSummary()
    job(1, "interrupted", age=3600)
    summary.on_multirun_start(config)
    job(0, "finished")
    summary.on_multirun_end(config)
    assert f"Sweep {tmp_path}: 1 of 1 jobs finished." in capsys.readouterr().out
    job(2, "failed")
    with pytest.raises(SystemExit) as stopped:
        summary.on_multirun_end(config)
    assert stopped.value.code == 1 and "1 of 2 jobs finished" in capsys.readouterr().out
