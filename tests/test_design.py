"""Facts held in one place, and the small defects found on the way (one test each)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import aomd
from aomd import report
from aomd.build import instantiate_node
from aomd.config import validate
from aomd.errors import ConfigError
from aomd.losses.terms import TERMS, distillation_terms, loss_defaults
from aomd.records import (JobRecord, claim_record, finished_record, identity_overrides, not_identity_keys, read_record,
                          record_failure, record_interruption, unfinished_run_id)
from conftest import TINY, compose


def raises_value_error(size: int = 1):
    raise ValueError("a real error from inside the constructor")


def test_a_constructor_error_is_not_reported_as_a_bad_config():
    node = {"_target_": f"{__name__}.raises_value_error", "size": 2}
    with pytest.raises(ValueError, match="a real error from inside"):
        instantiate_node(node, "dataset")
    with pytest.raises(ConfigError, match="dataset config could not be built"):
        instantiate_node({**node, "colour": "red"}, "dataset")


def test_the_loss_schema_is_the_term_registry():
    cfg = compose()
    assert {k for k in cfg.loss if k != "_target_"} == set(loss_defaults())
    assert set(distillation_terms()) == {"aomd", "sp", "at", "fitnet", "dark", "dist", "angle"}
    assert all(cfg.loss[term.ratio_key] == 0 or name == "triplet" for name, term in TERMS.items())


def test_composition_itself_rejects_wrong_types_and_unknown_keys():
    with pytest.raises(ConfigError, match="`dataset.colour` is not a key"):
        compose("dataset.colour=red")
    with pytest.raises(ConfigError, match="`dataset.colour` is not a key"):  # `+` adds it; validation refuses it
        validate(compose("+dataset.colour=red"))
    with pytest.raises(ConfigError, match="sampler.cutoff"):
        compose("sampler.cutoff=far")


def test_a_sweep_with_a_wrong_type_fails_before_its_first_job(tmp_path):
    from conftest import run_module
    from test_config import assert_one_line_error

    result = run_module("aomd.train", "-m", *TINY, "logger=none", f"hydra.sweep.dir={tmp_path}", "train.lr=1e-3,fast")
    assert_one_line_error(result, "train.lr", "fast")
    assert not list(tmp_path.glob("*/metrics.json"))  # not even the first job ran


def test_one_rule_says_what_identifies_a_job(tmp_path):
    overrides = ["loss=sp", "train.seed=3", "logger=none", "logger.mode=offline", "preset=seeds", "skip_finished=false",
                 "hydra/launcher=parallel", "train.progress=false", "loss.sp_ratio=20", "train.num_workers=4",
                 "paths.cache_dir=/scratch", "eval.keep_crops=false", "train.precision=fp32", "eval.batch_size=512"]
    # precision stays: it moves results; the evaluation's batch size changes only their float rounding
    assert identity_overrides(overrides) == ["loss=sp", "train.seed=3", "loss.sp_ratio=20", "train.precision=fp32"]
    assert report.config_overrides(overrides) == ("loss=sp", "loss.sp_ratio=20", "train.precision=fp32")
    assert "train.seed" not in not_identity_keys() and "logger" in not_identity_keys()  # a folder per seed
    # a record written under an earlier rule (when train.num_workers still identified a job) still matches
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "finished", "overrides": [*overrides[:1], "train.num_workers=2",
                                                                                            *overrides[1:]]}))
    assert finished_record(tmp_path, overrides) and not finished_record(tmp_path, ["loss=sp"])
    assert finished_record(tmp_path, overrides[::-1])  # the same job, its overrides in another order
    # a rerun (skip_finished=false) that fails before it claims the folder: the earlier run's
    # results must not read as this run's
    record_failure(tmp_path, RuntimeError("boom"), overrides)
    assert read_record(tmp_path)["status"] == "failed" and finished_record(tmp_path) is None
    # an error or a signal after this process finished the job (as its W&B run closed; submitit's
    # UncompletedJobError as the time limit came) takes nothing from its results
    job = JobRecord(tmp_path / "job", "student", {}, overrides)
    job.finish("finished")
    record_failure(tmp_path / "job", RuntimeError("boom"), overrides)
    record_interruption(tmp_path / "job", "stopped by SIGUSR2 after its last saved state")
    assert finished_record(tmp_path / "job", overrides) and "error" not in read_record(tmp_path / "job")


def test_a_job_claims_its_folder_from_another_configurations_record(tmp_path):
    """A sweep rerun with other values into the same folder numbers, stopped while its teacher trains:
    the folder must not go on showing the earlier configuration's results under the new overrides."""
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "finished", "overrides": ["loss=triplet"],
                                                       "best": {"recall@1": 0.6}, "history": [{"recall@1": 0.6}]}))
    claim_record(tmp_path, ["loss=sp", "logger=none"], continues=False)
    assert read_record(tmp_path) == {"status": "running", "overrides": ["loss=sp"], "best": None, "history": []}
    record_interruption(tmp_path, "SIGTERM (training its teacher)")
    assert read_record(tmp_path) == {"status": "interrupted", "overrides": ["loss=sp"], "best": None, "history": [],
                                     "error": "SIGTERM (training its teacher)"}
    # the job's own unfinished record stays when the job continues it, and only then
    own = {"status": "interrupted", "overrides": ["loss=sp"], "best": {"recall@1": 0.5}, "history": [{"recall@1": 0.5}]}
    (tmp_path / "metrics.json").write_text(json.dumps(own))
    claim_record(tmp_path, ["loss=sp", "train.num_workers=2"], continues=True)
    assert read_record(tmp_path) == own
    claim_record(tmp_path, ["loss=sp"], continues=False)  # started over (train.resume=never)
    assert read_record(tmp_path)["history"] == []
    # a job started again in the W&B run of an earlier start that wrote no last.pt keeps naming it,
    # so a stop before its W&B run starts does not make the next start open a second one
    claim_record(tmp_path, ["loss=sp"], continues=False, run_id="2x7kq9")
    assert read_record(tmp_path) == {"status": "running", "overrides": ["loss=sp"], "best": None, "history": [],
                                     "wandb_run_id": "2x7kq9"}
    record_interruption(tmp_path, "stopped by SIGTERM before its training started")
    assert unfinished_run_id(read_record(tmp_path), ["loss=sp"]) == "2x7kq9"
    JobRecord(tmp_path, "student", {}, ["loss=sp"], run_id="2x7kq9")  # the tracker's record, before W&B starts
    assert read_record(tmp_path)["wandb_run_id"] == "2x7kq9"


def test_a_job_that_fails_before_claiming_its_folder_does_not_mark_another_jobs_record(tmp_path):
    """A sweep rerun into the same folders whose job 0 fails its validation: its failure is its own."""
    earlier = {"status": "finished", "overrides": ["train.lr=0.0001"], "best": {"recall@1": 0.6}, "history": []}
    (tmp_path / "metrics.json").write_text(json.dumps(earlier))
    record_failure(tmp_path, ValueError("train.lr must be positive, got -1.0."), ["train.lr=-1", "logger=none"])
    assert read_record(tmp_path) == {"status": "failed", "overrides": ["train.lr=-1"], "best": None, "history": [],
                                     "error": "ValueError: train.lr must be positive, got -1.0."}


def test_hydra_override_dirname_uses_the_same_rule():
    from aomd.config import compose as compose_config

    cfg = compose_config(["train.seed=2", "logger=none", "train.lr=0.01"], with_hydra=True)
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == not_identity_keys()


def test_the_report_names_the_metric_a_running_job_has():
    job = report.Job("3", None, "running", best={"recall@2": 0.25, "map@r": 0.1}, epochs_evaluated=2)
    assert "best Recall@2 so far 25.00" in report.describe_unfinished(job)


def test_prepare_returns_no_metric(tmp_path):
    from aomd.prepare import prepare

    cfg = compose("dataset.num_classes=12", "dataset.images_per_class=8", f"paths.cache_dir={tmp_path}",
                  "train.progress=false")
    assert prepare(cfg) is None


class HostReads(TorchDispatchMode):
    """Counts the values aomd's code reads back from tensors (`.item()`, `float()`, `bool()`, all
    `aten._local_scalar_dense`): on a card each makes the host wait for it. The optimiser's reads
    of its own CPU step counters are not aomd's. (Results sized by values, `nonzero` and boolean
    masks, wait for a card too, but on the CPU the labels' arithmetic, which stays on the host,
    cannot be told from the card's: the gpu tier's sync debug mode checks those.)"""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.package = str(Path(aomd.__file__).parent)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            where = self._aomd_caller()
            if where:
                self.reads.append(where)
        return func(*args, **(kwargs or {}))

    def _aomd_caller(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if f"{Path('torch', 'optim')}" in name:
                return None
            if name.startswith(self.package):
                return f"{Path(name).name}:{frame.f_lineno}"
            frame = frame.f_back
        return None


def test_progress_off_reads_nothing_from_the_device_per_step(tmp_path):
    """The values read back from tensors per epoch, each a wait for a card, do not grow with its steps."""
    from aomd.data.synthetic import load_synthetic
    from aomd.engine import fit
    from aomd.build import build_objective
    from aomd.models import EmbeddingNet
    from aomd.runtime import Runtime

    data = load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)
    reads = []
    for steps in (2, 12):  # the old code read the loss every 10 steps: 1 read against 2
        cfg = validate(compose(*TINY, f"train.iters_per_epoch={steps}", "logger=none"))
        student = EmbeddingNet("resnet18", 16, True, False)
        objective = build_objective(cfg.loss, cfg.sampler, student, None, 32)
        with HostReads() as counter:
            fit(student, objective, data, cfg.train, cfg.eval, Runtime.resolve("cpu"), tmp_path / str(steps), lambda *a: None)
        reads.append(counter.reads)
    from collections import Counter
    assert reads[0] and len(reads[0]) == len(reads[1]), Counter(reads[1]) - Counter(reads[0])  # it sees the per-epoch reads
