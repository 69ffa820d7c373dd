"""The reference recipe exactly: learning-rate milestones, weight decay on parameters no term
reaches, and model selection (test as the reference, last, or held-out validation classes)."""
import warnings

import numpy as np
import pytest
import torch

from aomd.build import build_objective
from aomd.config import validate
from aomd.data.splits import hold_out_validation
from aomd.data.synthetic import load_synthetic
from aomd.engine import TrainStep, fit, learning_rate
from aomd.models import EmbeddingNet
from aomd.runtime import Runtime
from conftest import TINY, compose, run_module, student_job, train
from wandb_files import read_offline_run

CPU = Runtime.resolve("cpu")


def reference_learning_rates(lr: float, milestones: list[int], gamma: float, epochs: int) -> list[float]:
    """What the reference does: MultiStepLR stepped at the start of every epoch, epochs from 1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma)
    rates = []
    for _ in range(1, epochs + 1):
        with warnings.catch_warnings():  # stepping before the optimiser is exactly what the reference does
            warnings.simplefilter("ignore")
            scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("milestones, epochs", [([2], 3), ([40, 60], 80), ([25, 30, 35], 40)])
def test_learning_rate_of_every_epoch_is_the_references(milestones, epochs):
    ours = [learning_rate(1e-4, milestones, 0.1, epoch) for epoch in range(1, epochs + 1)]
    assert ours == pytest.approx(reference_learning_rates(1e-4, milestones, 0.1, epochs), rel=1e-12)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32,
                          cache_dir=tmp_path_factory.mktemp("fidelity-cache"))


def test_the_trained_epochs_record_their_learning_rate(tiny_data, tmp_path):
    cfg = validate(compose(*TINY, "train.epochs=3", "train.lr_decay_epochs=[2]", "train.lr=1e-3",
                           "train.lr_decay_gamma=0.1", "logger=none"))
    student = EmbeddingNet("resnet18", 16, True, False)
    records = []
    fit(student, build_objective(cfg.loss, cfg.sampler, student, None, 32), tiny_data, cfg.train, cfg.eval, CPU,
        tmp_path, lambda record, is_best: records.append(record))
    assert [r.get("lr") for r in records] == pytest.approx([None, 1e-3, 1e-4, 1e-4])


@pytest.mark.parametrize("decay_unreached", [True, False])
def test_weight_decay_moves_a_parameter_no_term_reaches(tiny_data, decay_unreached):
    """AOMD alone never reaches the student's embedding layer: as in the reference it still decays
    (its gradient is zero, not missing), unless train.decay_unreached=false."""
    torch.manual_seed(0)
    student = EmbeddingNet("resnet18", 16, True, False)
    teacher = EmbeddingNet("resnet50", 32, True, False).eval()
    cfg = validate(compose(*TINY, "loss=aomd_mode2", "logger=none"))
    objective = build_objective(cfg.loss, cfg.sampler, student, teacher, 32)
    optimizer = torch.optim.Adam([*student.parameters(), *objective.parameters()], lr=1e-3, weight_decay=1e-5)
    step = TrainStep(student, objective, optimizer, CPU, 32, teacher=teacher, decay_unreached=decay_unreached)
    before = student.embedding.weight.detach().clone()
    images = torch.from_numpy(tiny_data.train.take(np.arange(16)))
    step(images, torch.from_numpy(tiny_data.train.labels[:16]))
    moved = (student.embedding.weight.detach() - before).abs()
    if decay_unreached:
        assert moved.mean() > 5e-4  # about lr per step (less where |w| is near Adam's eps), toward 0
        assert (student.embedding.weight.detach().abs() <= before.abs()).all()
    else:
        assert torch.equal(student.embedding.weight.detach(), before)


def test_validation_classes_are_held_out_of_the_train_split(tiny_data):
    data = hold_out_validation(tiny_data, 2, seed=0)
    train, val, test = (set(np.unique(s.labels).tolist()) for s in (data.train, data.val, data.test))
    assert len(val) == 2 and len(train) == 4 and not (train & val) and not (train & test) and not (val & test)
    assert train | val == set(np.unique(tiny_data.train.labels).tolist())
    assert len(data.train) + len(data.val) == len(tiny_data.train)
    assert data.summary()["val_classes"] == 2
    # both read the training split's images, which are not copied (SOP's are 11.8 GB in memory)
    assert all(split.images.images is tiny_data.train.images for split in (data.train, data.val))
    for split in (data.train, data.val):
        (positions,) = np.nonzero(np.isin(tiny_data.train.labels, np.unique(split.labels)))
        assert np.array_equal(split.take([2, 0, 2]), tiny_data.train.images[positions[[2, 0, 2]]])


def test_a_small_training_split_holds_out_two_validation_classes_by_default():
    """A fifth of 6 training classes rounds to 1, and one validation class scores 100% Recall every epoch."""
    from aomd.build import load_data

    cfg = validate(compose(*TINY, "eval.select=val"))
    data = load_data(cfg.dataset, cfg.train.batch_size, cfg.eval)
    assert data.summary()["val_classes"] == 2 and data.summary()["train_classes"] == 4


@pytest.mark.slow
def test_select_val_reports_the_test_metrics_of_the_best_validation_epoch(tmp_path):
    metrics = train(tmp_path, "train.epochs=3", "eval.select=val", "eval.val_classes=2", "dataset.num_classes=16")
    history = metrics["history"]
    assert all("val/recall@1" in h and "recall@1" in h for h in history)
    best_epoch = max(history, key=lambda h: h["val/recall@1"])["epoch"]  # the first of equals
    assert metrics["best"]["epoch"] == best_epoch
    assert metrics["best"]["recall@1"] == history[best_epoch]["recall@1"]
    assert metrics["last"] == history[-1]
    assert metrics["selection"] == {"select": "val", "metric": "val/recall@1"}
    assert metrics["dataset"]["val_classes"] == 2 and metrics["dataset"]["train_classes"] == 6
    report = run_module("aomd.report", str(tmp_path))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report.md").read_text()
    assert "validation Recall@K on held-out training classes" in text
    assert "selected epoch" in text and "val Recall@1" in text and "last epoch Recall@1" in text


def test_the_wandb_run_holds_what_was_logged_and_labels_the_selected_last_and_validation_metrics(tmp_path):
    metrics = train(tmp_path, "train.epochs=2", "eval.select=val", "eval.val_classes=2", "dataset.num_classes=16",
                    "logger=wandb", "logger.mode=offline", "logger.project=aomd-test", logger="",
                    env={"WANDB_MODE": "offline"})
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run["job_type"] == "student"
    assert "loss:triplet" in run["tags"] and "dataset:synthetic" in run["tags"]
    assert run["config"]["loss.triplet_ratio"] == 1.0 and run["config"]["train.epochs"] == 2
    tested = [h for h in run["history"] if "test/recall@1" in h]
    assert [h["epoch"] for h in tested] == [0, 1, 2]
    for h, expected in zip(tested, metrics["history"]):
        assert h["test/recall@1"] == pytest.approx(expected["recall@1"])
        assert h["test/map@r"] == pytest.approx(expected["map@r"])
    assert tested[1]["train/loss"] == pytest.approx(metrics["history"][1]["loss"])
    summary = run["summary"]
    assert summary["status"] == "finished"
    assert summary["selection/select"] == "val" and summary["selection/metric"] == "val/recall@1"
    assert summary["best/recall@1"] == pytest.approx(metrics["best"]["recall@1"])
    assert summary["best/val/recall@1"] == pytest.approx(metrics["best"]["val/recall@1"])
    assert summary["last/recall@1"] == pytest.approx(metrics["last"]["recall@1"])
    logged = [h for h in run["history"] if "val/recall@1" in h]
    assert [h["epoch"] for h in logged] == [0, 1, 2]
    assert [h.get("train/lr") for h in logged][1:] == pytest.approx([m["lr"] for m in metrics["history"][1:]])


def test_select_last_selects_the_last_epoch(tmp_path):
    from aomd.metrics import selection_metric

    cfg, runtime, student, objective = student_job("train.epochs=2", "eval.select=last")
    data = load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)
    chosen = []
    best = fit(student, objective, data, cfg.train, cfg.eval, runtime, tmp_path, lambda record, is_best: chosen.append(is_best))
    assert chosen == [True, True, True] and best["epoch"] == 2  # each epoch replaces the one before
    assert selection_metric(cfg.eval.recall_k, "last") == "recall@1"


def test_the_optuna_preset_tunes_on_validation_classes():
    cfg = validate(compose("preset=optuna_aomd"))
    assert cfg.eval.select == "val"


@pytest.mark.parametrize("overrides, message", [
    (["eval.select=best"], "eval.select must be test, last or val"),
    (["eval.select=val", "eval.val_classes=0"], "eval.val_classes"),
    (["eval.select=val", "eval.val_classes=1"], "one class scores 100% Recall"),
])
def test_selection_settings_are_checked(overrides, message):
    from aomd.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_a_teacher_worse_than_untrained_or_never_trained_is_warned_about(tmp_path):
    from aomd.models import EmbeddingNet, save_checkpoint
    from aomd.records import JobRecord
    from aomd.teachers import teacher_warnings

    run = tmp_path / "teacher"
    record = JobRecord(run, "teacher", {})
    record.add_epoch({"epoch": 0, "recall@1": 0.15}, True)
    record.add_epoch({"epoch": 1, "recall@1": 0.12}, False)
    net = EmbeddingNet("resnet18", 8, True, False)
    save_checkpoint(run / "checkpoints" / "best.pt", net, metrics={"epoch": 1, "recall@1": 0.12})
    (worse,) = teacher_warnings(run / "checkpoints" / "best.pt", {"recall@1": 0.12})
    assert "below its untrained network's 15.00" in worse
    assert teacher_warnings(run / "checkpoints" / "best.pt", {"recall@1": 0.20}) == []
    save_checkpoint(run / "checkpoints" / "best.pt", net, metrics={"epoch": 0, "recall@1": 0.15})
    assert "epoch 0, an untrained network" in teacher_warnings(run / "checkpoints" / "best.pt", {"recall@1": 0.15})[0]
