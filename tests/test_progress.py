"""Progress without a terminal (a SLURM output file, `| tee`): tqdm's status lines reach the log."""
import io
import logging
import sys

import pytest

from aomd import progress
from aomd.engine import fit
from conftest import student_job
from test_engine import tiny_data


@pytest.fixture
def no_terminal(monkeypatch, caplog):
    """Standard error is a file, and the log records of aomd.progress are captured."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="aomd.progress")
    return caplog


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aomd.progress"]


def test_without_a_terminal_long_work_logs_its_count_rate_and_postfix(no_terminal, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # every update is "long"
    bar = progress.progress_bar(range(4), desc="epoch 1/3", total=4, unit="img", unit_scale=128, leave=False)
    for step in bar:
        bar.set_postfix(loss=f"{step / 10:.4f}", refresh=False)
    lines = progress_lines(no_terminal)
    assert lines, "nothing was logged"
    assert all("\r" not in line and line.startswith("epoch 1/3: ") for line in lines)
    assert "256/512 img (50%)" in "\n".join(lines) and "img/s, loss=0.1000]" in "\n".join(lines)


def test_without_a_terminal_short_or_disabled_work_logs_nothing(no_terminal):
    for _ in progress.progress_bar(range(100), desc="short", total=100):  # well under LOG_INTERVAL_S
        pass
    with progress.progress_bar(enabled=False, total=10, desc="off") as bar:
        bar.update(10)
    assert progress_lines(no_terminal) == []


def test_a_training_job_without_a_terminal_logs_its_epochs_and_evaluations(no_terminal, monkeypatch, tmp_path):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    cfg, runtime, student, objective = student_job("train.device=cpu", "train.epochs=1", "train.iters_per_epoch=22",
                                                   "train.progress=true")
    fit(student, objective, tiny_data(tmp_path), cfg.train, cfg.eval, runtime, tmp_path, lambda record, is_best: None)
    text = "\n".join(progress_lines(no_terminal))
    batch = cfg.train.batch_size
    assert f"epoch 1/1: {22 * batch}/{22 * batch} img (100%)" in text
    assert "loss=" in text  # the loss of ten steps before, shown from step 20
    assert "evaluate: " in text


def test_without_a_terminal_lines_are_plain_text_logged_once(no_terminal, monkeypatch):
    """Nested bars' cursor moves are not lines; work of unknown length shows its count and rate;
    a bar closing with the line it showed last does not log it twice."""
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    with progress.progress_bar(total=2, desc="outer", unit="img") as outer:
        for _ in progress.progress_bar((i for i in range(3)), desc="inner", unit="batch", position=1, leave=False):
            pass
        outer.update(2)
    lines = progress_lines(no_terminal)
    assert lines and not any("\x1b" in line for line in lines)
    assert "inner: 3 batch [" in "\n".join(lines)
    assert [line for line in lines if line.startswith("outer: 2/2 img (100%)")] and len(lines) == len(set(lines))
