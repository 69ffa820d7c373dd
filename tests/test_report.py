"""aomd.report: reading a sweep directory, grouping jobs over seeds, the Markdown table, the plots
and the CLI. Most tests write small fake sweep directories (the files Hydra and aomd.train write);
the slow one runs a real tiny sweep."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aomd import report
from aomd.report import ConfigRow, aggregate, main, read_sweep, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_job(sweep: Path, name: str, overrides: list[str], *, loss: str = "triplet", seed: int = 0,
              aomd_ratio: float = 0.0, mode: int = 2, metrics: dict | None = None, status: str = "finished",
              error: str | None = None, teacher: dict | None = None, write_metrics: bool = True) -> Path:
    """One job folder as a multirun writes it: .hydra/{overrides,config,hydra}.yaml and metrics.json."""
    job = sweep / name
    hydra_dir = job / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"train": {"seed": seed, "epochs": 1}, "skip_finished": True,
              "loss": {"_target_": "aomd.losses.Objective", "aomd_ratio": aomd_ratio, "mode": mode},
              "dataset": {"_target_": "aomd.data.synthetic.load_synthetic"}}
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = {"hydra": {"runtime": {"choices": {"loss": loss, "dataset": "synthetic"}}, "job": {"name": "train", "num": name}}}
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if write_metrics:
        best = None if metrics is None else {"epoch": 3, "loss": 0.25, **metrics}
        # the last epoch scores lower than the selected one, so a table showing it would differ
        last = None if best is None else {**best, "epoch": 4, **{key: value - 0.05 for key, value in metrics.items()}}
        state = {"status": status, "job_type": "student", "best": best, "last": last, "history": [best, last] if best else [],
                 "dataset": {"train_images": 30, "test_images": 30, "train_classes": 5, "test_classes": 5}}
        if teacher is not None:
            state["teacher"] = teacher
        if error is not None:
            state["error"] = error
        (job / "metrics.json").write_text(json.dumps(state))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return job


def m(r1: float, r2: float, mapr: float) -> dict:
    return {"recall@1": r1, "recall@2": r2, "map@r": mapr}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """An AOMD sweep over aomd_ratio x mode with two seeds, a baseline, and three unfinished jobs."""
    root = tmp_path / "sweep"
    common = ["train.epochs=1"]
    num = 0
    values = {  # (mode, ratio) -> recall@1 per seed
        (1, 10): (0.50, 0.54), (1, 100): (0.56, 0.60),
        (2, 10): (0.52, 0.52), (2, 100): (0.61, 0.65),
    }
    for (mode, ratio), r1s in values.items():
        for seed, r1 in enumerate(r1s):
            write_job(root, str(num), ["loss=aomd_mode2", f"loss.aomd_ratio={ratio}", f"loss.mode={mode}",
                                       f"train.seed={seed}", *common],
                      loss="aomd_mode2", seed=seed, aomd_ratio=ratio, mode=mode,
                      metrics=m(r1, r1 + 0.1, r1 / 3), teacher=m(0.7, 0.8, 0.3))
            num += 1
    for seed, r1 in enumerate((0.40, 0.44)):
        write_job(root, str(num), ["loss=triplet", f"train.seed={seed}", *common], seed=seed, metrics=m(r1, 0.5, 0.1))
        num += 1
    # one seed of sp failed, the other finished; a running job; a job that crashed before metrics.json
    write_job(root, str(num), ["loss=sp", "train.seed=0", *common], loss="sp", seed=0, metrics=m(0.45, 0.5, 0.15))
    write_job(root, str(num + 1), ["loss=sp", "train.seed=1", *common], loss="sp", seed=1, status="failed",
              error="ValueError: loss is NaN at epoch 2\nTraceback ...")
    write_job(root, str(num + 2), ["loss=contrastive", "train.seed=0", *common], loss="contrastive", status="running",
              metrics=m(0.3, 0.4, 0.1))
    write_job(root, str(num + 3), ["loss=rkd", "train.seed=0", *common], loss="rkd", write_metrics=False)
    return root


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The data rows of the first Markdown table: configuration (no backticks) -> its cells."""
    rows = {}
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[1].strip("`")] = cells
    return rows


def expected_cell(values: list[float]) -> str:
    """What the table must show for these metrics.json values, computed independently."""
    mean = 100 * sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


# --------------------------------------------------------------------------------------------
# reading


def test_read_sweep_reads_every_job_in_job_order(sweep: Path):
    jobs = read_sweep(sweep)
    assert [j.name for j in jobs] == [str(i) for i in range(14)]  # "10" after "9", not after "1"
    first = jobs[0]
    assert first.status == "finished" and first.loss == "aomd_mode2" and first.seed == 0
    assert first.aomd_ratio == 10.0 and first.mode == 1
    assert first.config_overrides == ("loss=aomd_mode2", "loss.aomd_ratio=10", "loss.mode=1", "train.epochs=1")
    assert first.best["recall@1"] == 0.50 and first.teacher["recall@1"] == 0.7
    statuses = {j.name: j.status for j in jobs}
    assert (statuses["11"], statuses["12"], statuses["13"]) == ("failed", "running", "missing")
    assert jobs[11].error.startswith("ValueError: loss is NaN")


def test_config_overrides_drop_seed_skip_finished_and_hydra():
    overrides = ["loss=sp", "+train.seed=3", "skip_finished=false", "hydra.launcher.n_jobs=2",
                 "hydra/launcher=joblib", "loss.sp_ratio=20"]
    assert report.config_overrides(overrides) == ("loss=sp", "loss.sp_ratio=20")


def test_unreadable_files_make_an_unreadable_job_not_a_crash(tmp_path: Path):
    write_job(tmp_path, "0", ["loss=triplet"], metrics=m(0.5, 0.6, 0.2))
    (tmp_path / "0" / "metrics.json").write_text("{not json")
    write_job(tmp_path, "1", ["loss=sp"], metrics=m(0.5, 0.6, 0.2))
    (tmp_path / "1" / ".hydra" / "config.yaml").write_text("a: [unclosed")
    jobs = read_sweep(tmp_path)
    assert [j.status for j in jobs] == ["unreadable", "unreadable"]
    assert "metrics.json" in jobs[0].error and ".hydra" in jobs[1].error


def test_finished_without_evaluation_is_not_a_result(tmp_path: Path):
    write_job(tmp_path, "0", ["loss=triplet"], metrics=None, status="finished")
    (job,) = read_sweep(tmp_path)
    assert job.status == "no result"
    assert aggregate([job])[0].n == 0


def test_a_record_another_configuration_left_in_the_folder_is_not_this_jobs_result(tmp_path: Path):
    """A sweep rerun with other values into the same folders: job 0 is loss=sp now, and until it
    claims its folder the triplet job's finished record is still there."""
    job = write_job(tmp_path, "0", ["loss=sp"], loss="sp", metrics=m(0.5, 0.6, 0.2))
    record = json.loads((job / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps({**record, "overrides": ["loss=triplet"]}))
    write_job(tmp_path, "1", ["loss=rkd", "train.num_workers=2"], loss="rkd", metrics=m(0.4, 0.5, 0.1))
    record = json.loads((tmp_path / "1" / "metrics.json").read_text())  # written where num_workers still identified a job
    (tmp_path / "1" / "metrics.json").write_text(json.dumps({**record, "overrides": ["loss=rkd", "train.num_workers=2"]}))
    jobs = read_sweep(tmp_path)
    assert [j.status for j in jobs] == ["missing", "finished"]
    assert report.describe_unfinished(jobs[0]) == "metrics.json is another configuration's, loss=triplet: not started yet"
    rows = aggregate(jobs)
    assert [(r.label, r.n) for r in rows] == [("loss=rkd", 1), ("loss=sp", 0)]
    assert main([str(tmp_path)]) == 0  # the summary counts it as its own line does: not started
    assert "2 jobs (1 finished, 1 not started) in 2 configurations." in (tmp_path / "report.md").read_text()


def test_a_managed_teachers_folder_reads_as_a_finished_job(tmp_path: Path):
    """A teacher's record has no overrides (and its folder no .hydra/): nothing to compare."""
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.json").write_text(json.dumps(
        {"status": "finished", "job_type": "teacher", "overrides": None, "best": m(0.7, 0.8, 0.3), "history": []}))
    (job,) = read_sweep(tmp_path)
    assert job.status == "finished" and job.best["recall@1"] == 0.7


def test_a_metric_that_is_not_finite_does_not_stop_the_report(tmp_path: Path):
    for seed, recall in enumerate((float("nan"), 0.5)):
        write_job(tmp_path, str(seed), ["loss=triplet", f"train.seed={seed}"], seed=seed, metrics=m(recall, 0.6, 0.2))
    (row,) = aggregate(read_sweep(tmp_path))
    assert row.n == 2 and math.isnan(row.mean["recall@1"]) and math.isnan(row.std["recall@1"])
    assert row.mean["recall@2"] == pytest.approx(0.6) and row.std["recall@2"] == 0.0
    write_job(tmp_path, "2", ["loss=sp"], loss="sp", metrics=m(0.4, 0.6, 0.2))
    assert main([str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "report.md").read_text())
    # ranked: the rows with a finite value; the NaN row comes after them, unnumbered
    assert rows["loss=sp"][0] == "1" and rows["loss=triplet"][0] == "-" and rows["loss=triplet"][3] == "nan ± nan"


def test_a_metric_fewer_seeds_measured_says_how_many(tmp_path: Path):
    """A folder mixing records with and without a metric (an older version's): its mean comes from
    fewer seeds than the row's n, and a single value has no spread to show."""
    for seed in (0, 1):
        metrics = {**m(0.5 + seed / 10, 0.7, 0.2), **({"recall@4": 0.9} if seed else {})}
        write_job(tmp_path, str(seed), ["loss=sp", f"train.seed={seed}"], loss="sp", seed=seed, metrics=metrics)
    (row,) = aggregate(read_sweep(tmp_path))
    assert row.n == 2 and row.count == {"recall@4": 1, "last/recall@4": 1}
    assert report.format_cell(row, "recall@4") == "90.00 (n=1)"
    assert report.format_cell(row, "recall@1") == expected_cell([0.5, 0.6])


def test_read_sweep_rejects_a_missing_or_empty_directory(tmp_path: Path):
    with pytest.raises(report.ReportError, match="does not exist"):
        read_sweep(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(report.ReportError, match="no job folders"):
        read_sweep(tmp_path / "empty")


def test_run_folders_of_prepare_and_evaluate_are_not_jobs(tmp_path: Path):
    """`outputs/` holds the run folders of aomd.prepare and aomd.evaluate beside training runs:
    the report of `outputs/` lists the training runs alone, not the others as crashed jobs."""
    outputs = tmp_path / "outputs"
    write_job(outputs, "2026-11-27/10-00-00", ["loss=triplet"], metrics=m(0.5, 0.6, 0.2))
    for task, folder in (("prepare", "2026-11-27/09-00-00"), ("evaluate", "evaluate/2026-11-27/11-00-00")):
        job = write_job(outputs, folder, ["dataset.root=/data"], write_metrics=False)
        hydra = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())
        hydra["hydra"]["job"]["name"] = task
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    assert [job.name for job in read_sweep(outputs)] == ["2026-11-27/10-00-00"]
    with pytest.raises(report.ReportError, match="no job folders"):
        read_sweep(outputs / "evaluate")

def test_a_single_run_folder_is_a_sweep_of_one(tmp_path: Path):
    job = write_job(tmp_path, "run", ["loss=triplet"], metrics=m(0.5, 0.6, 0.2))
    (checkpoints := job / "checkpoints").mkdir()
    (checkpoints / "metrics.json").write_text("{}")  # inside a job: not another job
    jobs = read_sweep(job)
    assert [(j.name, j.status) for j in jobs] == [("run", "finished")]


# --------------------------------------------------------------------------------------------
# aggregation


def test_aggregate_groups_seeds_and_ranks_best_first(sweep: Path):
    rows = aggregate(read_sweep(sweep))
    labels = [row.label for row in rows]
    assert labels[:6] == [
        "loss=aomd_mode2 loss.aomd_ratio=100 loss.mode=2 train.epochs=1",  # 63
        "loss=aomd_mode2 loss.aomd_ratio=100 loss.mode=1 train.epochs=1",  # 58
        "loss=aomd_mode2 loss.aomd_ratio=10 loss.mode=1 train.epochs=1",   # 52 (tie broken by label)
        "loss=aomd_mode2 loss.aomd_ratio=10 loss.mode=2 train.epochs=1",   # 52
        "loss=sp train.epochs=1",                                          # 45, one of two seeds
        "loss=triplet train.epochs=1",                                     # 42
    ]
    # the configurations without a finished job come last, still present
    assert {row.label for row in rows[6:]} == {"loss=contrastive train.epochs=1", "loss=rkd train.epochs=1"}
    assert all(row.n == 0 and not row.mean for row in rows[6:])

    best = rows[0]
    assert best.n == 2 and sorted(best.seeds) == [0, 1] and best.mode == 2 and best.aomd_ratio == 100
    assert best.mean["recall@1"] == pytest.approx(0.63)
    assert best.std["recall@1"] == pytest.approx(statistics.stdev([0.61, 0.65]))
    assert best.mean["map@r"] == pytest.approx((0.61 + 0.65) / 6)
    sp = rows[4]
    assert sp.n == 1 and len(sp.jobs) == 2 and sp.std["recall@1"] == 0.0


def test_a_seed_run_twice_counts_once_and_is_listed(tmp_path: Path, capsys):
    """A parent folder of two copies of one sweep (or a sweep rerun into a folder that kept the
    old job folders): n counts seeds, not runs, and the repeats are named."""
    root = tmp_path / "sweeps"
    for sweep_name, r1 in (("first", 0.50), ("second", 0.70)):
        for seed in (0, 1):
            write_job(root / sweep_name, str(seed), ["loss=sp", f"train.seed={seed}"], loss="sp", seed=seed,
                      metrics=m(r1 + seed / 10, 0.8, 0.3))
    (row,) = aggregate(read_sweep(root))
    assert row.n == 2 and sorted(row.seeds) == [0, 1]
    assert row.mean["recall@1"] == pytest.approx(0.55)  # the first sweep's two seeds
    assert [(job.name, first.name) for job, first in row.repeats] == [("second/0", "first/0"), ("second/1", "first/1")]
    assert main([str(root)]) == 0
    report = (root / "report.md").read_text()
    assert "## Jobs repeating a seed (2)" in report and "- job `second/1`: `loss=sp`, seed 1: repeats job `first/1`" in report
    assert table_rows(report)["loss=sp"][2] == "2"  # n: two seeds, and no job reads as unfinished
    assert "## Jobs repeating a seed (2)" in capsys.readouterr().out

def without_hydra_folder(job: Path, record: dict) -> None:
    """A job folder as `hydra.output_subdir=null` or a copy without dot-folders leaves it: its
    metrics.json, updated with `record`, says what it is."""
    shutil.rmtree(job / ".hydra")
    metrics = json.loads((job / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps({**metrics, **record}))


def test_folders_without_hydra_are_grouped_by_their_records_overrides(tmp_path: Path):
    """No .hydra/: the overrides metrics.json records identify the job (pooling such folders
    mixed datasets and losses into one row); a managed teacher's folder is a row of its own."""
    jobs = [("sp-cub", ["loss=sp", "dataset=cub200", "train.seed=0"], 0.3),
            ("rkd-0", ["loss=rkd", "loss.aomd_ratio=10", "train.seed=0"], 0.5),
            ("rkd-1", ["loss=rkd", "loss.aomd_ratio=10", "train.seed=1"], 0.7),
            ("rkd-default-seed", ["loss=rkd", "loss.aomd_ratio=10"], 0.9),
            ("aomd-defaults", ["loss=aomd_mode1"], 0.4)]
    for name, overrides, r1 in jobs:
        job = write_job(tmp_path / "sweep", name, overrides, metrics=m(r1, 0.8, 0.2))
        without_hydra_folder(job, {"overrides": overrides, "job_type": "student"})
    rkd, aomd, sp = aggregate(read_sweep(tmp_path / "sweep"))
    assert sp.key == ("dataset=cub200", "loss=sp") and sp.n == 1 and sp.loss == "sp"
    # the values the overrides leave at their defaults come from the config they compose to
    assert (aomd.loss, aomd.aomd_ratio, aomd.mode, aomd.jobs[0].seed) == ("aomd_mode1", 200.0, 1, 0)
    assert rkd.key == ("loss.aomd_ratio=10", "loss=rkd") and rkd.aomd_ratio == 10.0
    # the job without a seed override ran conf/train.yaml's seed 0: a repeat of rkd-0
    assert rkd.n == 2 and sorted(rkd.seeds) == [0, 1] and rkd.mean["recall@1"] == pytest.approx(0.6)
    assert [(job.name, first.name) for job, first in rkd.repeats] == [("rkd-default-seed", "rkd-0")]
    for name in ("cub200-1a2b3c4d-resnet50-512-224px-imagenet", "cars196-5e6f7a8b-resnet50-512-224px-imagenet"):
        job = write_job(tmp_path / "teachers", name, [], metrics=m(0.6, 0.7, 0.2))
        without_hydra_folder(job, {"overrides": None, "job_type": "teacher"})
    teachers = aggregate(read_sweep(tmp_path / "teachers"))
    assert sorted(row.label for row in teachers) == ["teacher cars196-5e6f7a8b-resnet50-512-224px-imagenet",
                                                    "teacher cub200-1a2b3c4d-resnet50-512-224px-imagenet"]
    assert all(row.n == 1 and row.repeats == [] for row in teachers)
    # a record that does not say what it is is listed as unreadable, not pooled with others
    job = write_job(tmp_path / "unknown", "0", [], metrics=m(0.6, 0.7, 0.2))
    without_hydra_folder(job, {"overrides": None, "job_type": "student"})
    (unknown,) = read_sweep(tmp_path / "unknown")
    assert unknown.status == report.UNREADABLE and "configuration is unknown" in unknown.error


def test_metric_keys_order_recall_by_k_then_map():
    row = ConfigRow(("x",), "x", ("x",), "triplet", 0.0, 2,
                    mean={"map@r": 0.1, "recall@8": 0.4, "recall@16": 0.5, "recall@2": 0.3})
    assert report.metric_keys([row]) == ["recall@2", "recall@8", "recall@16", "map@r"]
    assert report.primary_metric([row]) == "recall@2"  # no recall@1 evaluated: the smallest K


def test_label_without_overrides_is_the_loss_choice(tmp_path: Path):
    write_job(tmp_path, "0", ["train.seed=0"], loss="sp", metrics=m(0.5, 0.6, 0.2))
    write_job(tmp_path, "1", ["train.seed=1"], loss="sp", metrics=m(0.6, 0.6, 0.2), seed=1)
    (row,) = aggregate(read_sweep(tmp_path))
    assert row.label == "sp" and row.n == 2


def test_short_labels_leave_out_common_overrides(sweep: Path):
    rows = aggregate(read_sweep(sweep))
    assert report.common_overrides(rows) == ["train.epochs=1"]
    labels = report.short_labels(rows)
    assert labels[rows[0].key] == "loss=aomd_mode2 loss.aomd_ratio=100 loss.mode=2"
    assert labels[rows[5].key] == "loss=triplet"


def test_jobs_that_selected_on_validation_classes_rank_by_them_with_short_labels(tmp_path: Path):
    """An Optuna sweep (eval.select=val): rows ranked by the validation Recall@1 the sweeper tuned
    on, shown first in the table, not by the test Recall@1; its drawn floats shown to 4 digits."""
    for num, (ratio, val, test) in enumerate([(125.20653814999464, 0.40, 0.70), (3.0000000000000004, 0.60, 0.50)]):
        write_job(tmp_path, str(num), ["preset=optuna_aomd", f"loss.aomd_ratio={ratio}"], loss="aomd_mode2",
                  aomd_ratio=ratio, metrics={**m(test, test, 0.2), "val/recall@1": val})
    rows = aggregate(read_sweep(tmp_path))
    assert [row.label for row in rows] == ["loss.aomd_ratio=3", "loss.aomd_ratio=125.2"]
    assert rows[0].key == ("loss.aomd_ratio=3.0000000000000004",)  # the label only is shortened
    text = write_report(tmp_path).markdown
    assert "| # | configuration | n | val Recall@1 | Recall@1 | Recall@2 | MAP@R |" in text and "best val Recall@1 first" in text
    assert table_rows(text)["loss.aomd_ratio=3"][3:5] == ["60.00", "50.00"]
    # a job that selected on test in the same folder: ranked by the test Recall@1, which all have
    write_job(tmp_path, "2", ["loss.aomd_ratio=125.20653814999999"], loss="aomd_mode2", metrics=m(0.65, 0.65, 0.2))
    rows = aggregate(read_sweep(tmp_path))
    assert report.ranking_metric(rows) == "recall@1" and [row.mean["recall@1"] for row in rows] == [0.70, 0.65, 0.50]
    assert sorted(report.short_labels(rows).values()) == [  # two values that round alike keep their digits
        "loss.aomd_ratio=125.20653814999464", "loss.aomd_ratio=125.20653814999999", "loss.aomd_ratio=3.0000000000000004"]


# --------------------------------------------------------------------------------------------
# the report: table values equal metrics.json, unfinished jobs listed, plots


def test_table_values_equal_the_jobs_metrics_json(sweep: Path, capsys):
    assert main([str(sweep)]) == 0
    markdown = (sweep / "report.md").read_text(encoding="utf-8")
    # expected cells straight from the metrics.json files, grouped by overrides minus the seed
    groups: dict[str, list[dict]] = {}
    for job_dir in sweep.iterdir():
        if not (job_dir / "metrics.json").is_file():
            continue
        state = json.loads((job_dir / "metrics.json").read_text())
        if state["status"] != "finished":
            continue
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        label = " ".join(o for o in overrides if not o.startswith(("train.seed=", "train.epochs=")))
        groups.setdefault(label, []).append(state["best"])
    rows = table_rows(markdown)
    assert set(groups) <= set(rows)
    for label, bests in groups.items():
        cells = rows[label]
        assert cells[2] == str(len(bests)) or cells[2].startswith(f"{len(bests)} of ")
        assert cells[3:] == [expected_cell([b[k] for b in bests]) for k in ("recall@1", "recall@2", "map@r")]
    assert rows["loss=aomd_mode2 loss.aomd_ratio=100 loss.mode=2"][3] == "63.00 ± 2.83"
    assert rows["loss=sp"][2:4] == ["1 of 2", "45.00"]  # one seed: the mean alone
    assert rows["loss=rkd"][0] == "-" and rows["loss=rkd"][3:] == ["-", "-", "-"]
    # the header, and the same table on stdout
    assert "| # | configuration | n | Recall@1 | Recall@2 | MAP@R |" in markdown
    stdout = capsys.readouterr().out
    assert table_rows(stdout) == rows
    # best first
    order = [cells[1].strip("`") for cells in rows.values()]
    assert order[0] == "loss=aomd_mode2 loss.aomd_ratio=100 loss.mode=2"


def test_unfinished_jobs_are_listed_not_dropped(sweep: Path, capsys):
    assert main([str(sweep)]) == 0
    markdown = (sweep / "report.md").read_text(encoding="utf-8")
    section = markdown.split("## Jobs not finished (3)", 1)[1].split("## Plots")[0]
    lines = [line for line in section.splitlines() if line.startswith("- job")]
    assert len(lines) == 3
    assert lines[0].startswith("- job `11`: `loss=sp`, seed 1: failed: ValueError: loss is NaN at epoch 2")
    assert "Traceback" not in section  # the first line of the error only
    assert lines[1].startswith("- job `12`: `loss=contrastive`, seed 0: running, 2 epoch(s) evaluated, best Recall@1 so far 30.00")
    assert lines[2].startswith("- job `13`: `loss=rkd`, seed 0: no metrics.json")
    assert "14 jobs (11 finished, 1 failed, 1 without metrics.json, 1 running)" in markdown
    assert "## Jobs not finished (3)" in capsys.readouterr().out
    assert "Teacher (8 jobs): Recall@1 70.00, Recall@2 80.00, MAP@R 30.00" in markdown


def test_plots_are_written_and_linked(sweep: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = write_report(sweep, out)
    assert [p.name for p in result.files] == ["report.md", "recall_vs_aomd_ratio.png", "baselines.png"]
    for name in ("recall_vs_aomd_ratio.png", "baselines.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "![Recall@1 against loss.aomd_ratio](recall_vs_aomd_ratio.png)" in markdown
    assert "![Recall@1 per configuration](baselines.png)" in markdown
    assert not (sweep / "report.md").exists()  # --out: nothing written into the sweep


def test_the_ratio_plot_draws_each_modes_means_and_deviations(sweep: Path, tmp_path: Path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = {}
    errorbar = Axes.errorbar

    def recorded(self, x, y, *args, **kwargs):
        if not str(kwargs.get("label", "_")).startswith("_"):  # matplotlib's own calls are unlabelled
            drawn[kwargs["label"]] = (list(x), list(y), list(kwargs.get("yerr") or []))
        return errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", recorded)
    write_report(sweep, tmp_path / "out")
    assert set(drawn) == {"mode 1", "mode 2"}
    for label, (x, y, yerr) in drawn.items():
        assert [round(v, -1) for v in x] == [10, 100]  # each ratio, shifted by a few percent to keep bars apart
        values = {"mode 1": ((0.50, 0.54), (0.56, 0.60)), "mode 2": ((0.52, 0.52), (0.61, 0.65))}[label]
        assert y == pytest.approx([100 * statistics.fmean(v) for v in values])
        assert yerr == pytest.approx([100 * statistics.stdev(v) for v in values])


def test_no_aomd_job_skips_the_ratio_plot_with_a_note(tmp_path: Path):
    sweep = tmp_path / "sweep"
    write_job(sweep, "0", ["loss=triplet"], metrics=m(0.5, 0.6, 0.2))
    write_job(sweep, "1", ["loss=sp"], loss="sp", metrics=m(0.4, 0.6, 0.2))
    (sweep / "recall_vs_aomd_ratio.png").write_bytes(PNG_MAGIC)  # from an earlier report
    write_report(sweep)
    markdown = (sweep / "report.md").read_text(encoding="utf-8")
    assert "Recall@1 against loss.aomd_ratio: no plot (no finished job with a non-zero loss.aomd_ratio)" in markdown
    assert not (sweep / "recall_vs_aomd_ratio.png").exists()
    assert (sweep / "baselines.png").read_bytes()[:8] == PNG_MAGIC


def test_no_finished_job_still_writes_a_report(tmp_path: Path):
    write_job(tmp_path, "0", ["loss=triplet"], status="failed", error="RuntimeError: out of memory")
    assert main([str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "failed: RuntimeError: out of memory" in markdown
    assert "per configuration: no plot (no finished job)" in markdown
    assert not list(tmp_path.glob("*.png"))


# --------------------------------------------------------------------------------------------
# CLI


def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aomd.report: error: ") and "does not exist" in err and err.count("\n") == 1
    assert main([str(tmp_path)]) == 2
    assert "no job folders" in capsys.readouterr().err


def test_python_m_entrypoint(sweep: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "aomd.report", str(sweep), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| # | configuration | n |" in done.stdout
    assert (tmp_path / "o" / "report.md").is_file()
    bad = subprocess.run([sys.executable, "-m", "aomd.report", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f"aomd.report: error: {tmp_path / 'nope'} does not exist"]


@pytest.mark.slow
def test_report_of_a_real_sweep(tmp_path: Path):
    """A real two-seed sweep of aomd.train: one row, n = 2, values equal to the jobs' metrics.json."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "AOMD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    subprocess.run(
        [sys.executable, "-m", "aomd.train", "-m", "loss=triplet", "train.seed=0,1", "train.epochs=1",
         "train.iters_per_epoch=1", "train.batch_size=8", "train.images_per_class=2", "dataset.num_classes=6",
         "dataset.images_per_class=4", "eval.recall_k=[1,2]", "logger=none", "train.progress=false",
         f"hydra.sweep.dir={sweep}"],
        check=True, capture_output=True, env=env, timeout=300, cwd=tmp_path)
    result = write_report(sweep)
    (row,) = result.rows
    assert row.n == 2 and sorted(row.seeds) == [0, 1]
    bests = [json.loads((sweep / str(i) / "metrics.json").read_text())["best"] for i in (0, 1)]
    cells = table_rows(result.markdown)[row.label]  # one configuration: its full override string
    assert cells[2] == "2"
    assert cells[3:] == [expected_cell([b[k] for b in bests]) for k in ("recall@1", "recall@2", "map@r", "r_precision")]
    assert "| # | configuration | n | Recall@1 | Recall@2 | MAP@R | R-Precision |" in result.markdown
    assert (sweep / "baselines.png").read_bytes()[:8] == PNG_MAGIC


def test_the_selection_lines_name_the_selected_epochs_and_the_untrained_one(tmp_path: Path):
    """A short pilot run can select epoch 0, the network before training: the report says so."""
    write_job(tmp_path, "0", ["loss=sp", "train.seed=0"], loss="sp", metrics={**m(0.375, 0.5, 0.1), "epoch": 0})
    write_job(tmp_path, "1", ["loss=sp", "train.seed=1"], loss="sp", seed=1, metrics=m(0.425, 0.5, 0.1))
    text = write_report(tmp_path).markdown
    assert "2 jobs (2 finished) in 1 configuration." in text
    assert "- `loss=sp`: Recall@1 40.00 ± 3.54 at the selected epochs 0, 3 (0: before training); " in text


def ratio_row(mode: int, ratio: float, *rest: str) -> ConfigRow:
    key = (f"loss.aomd_ratio={ratio}", f"loss.mode={mode}", *rest)
    return ConfigRow(key, " ".join(key), key, "aomd_mode2", ratio, mode, mean={"recall@1": 0.5}, std={"recall@1": 0.0})


def test_ratio_plot_draws_a_grid_as_lines_and_a_search_as_points_per_mode():
    """A grid (modes x ratios) is a line per mode, dodged a few percent; a search (each trial its
    own weights: lines of one point) would be a legend of trials and points dodged far off their
    ratio, so it is drawn as points per mode, at their true ratios."""
    grid = [ratio_row(mode, ratio) for mode in (1, 2) for ratio in (1, 10, 100)]
    lines = report.ratio_series(grid)
    assert [(s.label, [r.aomd_ratio for r in s.rows], s.joined) for s in lines] == [
        ("mode 1", [1, 10, 100], True), ("mode 2", [1, 10, 100], True)]
    assert [s.dodge for s in lines] == pytest.approx([0.985, 1.015])
    # other overrides that differ name the line, shortened as in the table; the dodge stays within 5%
    weights = [ratio_row(2, ratio, f"loss.local_weight={w}") for w in (0.123456789, 0.5, 1.5, 2.5, 3.5, 4.5)
               for ratio in (1, 10)]
    lines = report.ratio_series(weights)
    assert lines[0].label == "mode 2 (loss.local_weight=0.1235)"
    assert min(s.dodge for s in lines) == pytest.approx(0.95) and max(s.dodge for s in lines) == pytest.approx(1.05)
    search = [ratio_row(trial % 2 + 1, 10 + trial, f"loss.global_weight={trial / 7}") for trial in range(20)]
    points = report.ratio_series(search)
    assert [(s.label, len(s.rows), s.joined, s.dodge) for s in points] == [("mode 1", 10, False, 1.0),
                                                                             ("mode 2", 10, False, 1.0)]
    assert points[0].rows[0].aomd_ratio == 10


def test_the_ratio_plot_of_a_search_renders_its_points_with_the_axis_own_ticks(tmp_path: Path):
    """20 trials (more ratios than can each be labelled): the scatter and the log axis's ticks render."""
    search = [ratio_row(trial % 2 + 1, 10 + 5 * trial, f"loss.global_weight={trial / 7}") for trial in range(20)]
    assert report.plot_recall_vs_ratio(search, tmp_path / "search.png") is None
    assert (tmp_path / "search.png").read_bytes()[:8] == PNG_MAGIC
