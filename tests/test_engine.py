"""The epoch loop in-process: every student-side parameter of the objective is optimised."""
import copy

import pytest
import torch

from aomd.config import validate
from aomd.data.synthetic import load_synthetic
from aomd.engine import fit
from aomd.models import EmbeddingNet
from aomd.build import build_objective
from aomd.runtime import Runtime
from conftest import TINY, compose

CPU = Runtime.resolve("cpu")


@pytest.mark.parametrize("loss", ["fitnet", "aomd_mode1"])
def test_adapters_and_regressors_learn_with_the_student(tmp_path, loss):
    cfg = validate(compose(*TINY, f"loss={loss}", "logger=none"))
    data = load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)
    torch.manual_seed(0)
    student = EmbeddingNet("resnet18", 16, True, False)
    teacher = EmbeddingNet("resnet50", 32, True, False).eval()
    objective = build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)
    before = copy.deepcopy(objective.state_dict())
    assert before, "the objective has parameters of its own"
    records = []
    fit(student, objective, data, cfg.train, cfg.eval, CPU, tmp_path, lambda record, is_best: records.append(record), teacher)
    after = objective.state_dict()
    for name, value in before.items():
        assert not torch.equal(value, after[name]), f"{name} was not optimised"
    assert [r["epoch"] for r in records] == [0, 1]
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["objective"]
    assert all(torch.equal(saved[k], v) for k, v in after.items())


def test_best_can_be_chosen_among_trained_epochs_only(tmp_path):
    cfg = validate(compose(*TINY, "train.epochs=2", "logger=none"))
    data = load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)
    student = EmbeddingNet("resnet18", 16, True, False)
    objective = build_objective(cfg.loss, cfg.sampler, student, None, cfg.dataset.image_size)
    flags = []
    best = fit(student, objective, data, cfg.train, cfg.eval, CPU, tmp_path, lambda record, is_best: flags.append(is_best), None,
               best_from_epoch=1)
    assert flags[0] is False and flags[1] is True and best["epoch"] >= 1
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["metrics"]["epoch"] == best["epoch"]


@pytest.mark.parametrize("saved_fused", [True, False])
def test_a_resumed_optimiser_keeps_this_jobs_update_implementation(saved_fused):
    """A last.pt from a job with fused Adam (CUDA) resumes on the CPU with the for-loop update, and
    the other way round, with the saved moments and step count."""
    from aomd.engine import adam, load_optimizer_state

    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(4, 3))
    saved = torch.optim.Adam([weights], lr=0.1, weight_decay=1e-5, fused=saved_fused or None)
    weights.grad = torch.randn(4, 3)
    saved.step()
    state = saved.state_dict()
    resumed = adam([weights], 0.1, 1e-5, CPU) if saved_fused else torch.optim.Adam([weights], lr=0.1, weight_decay=1e-5, fused=True)
    load_optimizer_state(resumed, state)
    assert bool(resumed.param_groups[0]["fused"]) is (not saved_fused)
    assert torch.equal(resumed.state[weights]["exp_avg"], saved.state[weights]["exp_avg"])
    assert float(resumed.state[weights]["step"]) == 1.0
    resumed.step()  # the loaded state suits this implementation
    assert float(resumed.state[weights]["step"]) == 2.0
