"""The job's runtime (device, precision, memory format, loaders) and the numerics of the loss terms
under mixed precision, on the CPU. The same paths on a CUDA device are the `gpu` tier (test_gpu.py)."""
import pytest
import torch

from aomd.losses import AOMDLoss, AttentionTransferLoss, FitNetLoss, Objective
from aomd.losses.objective import NetworkShape, StepOutputs
from aomd.losses.samplers import DistanceWeightedNegatives
from aomd.errors import ConfigError
from aomd.runtime import Runtime
from conftest import TINY, run_module
from test_config import assert_one_line_error


def test_cpu_defaults_keep_the_cpu_results_unchanged():
    runtime = Runtime.resolve("cpu")
    assert (runtime.precision, runtime.channels_last, runtime.num_workers, runtime.pin_memory) == ("fp32", False, 0, False)
    assert runtime.describe()["device"] == "cpu" and runtime.amp_dtype is None


def test_explicit_settings_are_honoured():
    runtime = Runtime.resolve("cpu", "bf16", channels_last=True, num_workers=3)
    assert runtime.amp_dtype == torch.bfloat16 and runtime.memory_format == torch.channels_last
    assert runtime.num_workers == 3
    assert torch.nn.Conv2d(3, 4, 1).to(memory_format=runtime.memory_format) is not None
    with runtime.autocast():
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.bfloat16


@pytest.mark.parametrize("compile, parameters_channels_last", [(False, True), (True, False)])
def test_channels_last_places_parameters_in_it_unless_compiled(compile, parameters_channels_last):
    """Compiled networks take channels_last batches but keep standard-layout parameters, which
    inductor's convolution backward needs; eager networks take both in channels_last."""
    runtime = Runtime.resolve("cpu", channels_last=True, compile=compile)
    assert runtime.memory_format == torch.channels_last  # the batches'
    conv = runtime.place(torch.nn.Conv2d(3, 8, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == parameters_channels_last
    assert conv.weight.is_contiguous() != parameters_channels_last


@pytest.mark.parametrize("allocated, workers", [(range(64), 8), (range(4), 3), (range(1), 1)])
def test_loader_workers_on_a_card_follow_the_cores_this_job_may_use(monkeypatch, allocated, workers):
    """A SLURM job on a 64-core node with 4 cores allocated (its CPU affinity) gets 3 loader
    processes, not 8: one core stays with the training loop."""
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allocated), raising=False)
    runtime = Runtime.resolve("cuda")
    assert runtime.num_workers == workers and runtime.pin_memory


@pytest.mark.parametrize("capability, precision", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32"), ((7, 0), "fp32")])
def test_auto_precision_is_bf16_only_on_cards_that_compute_in_it(monkeypatch, capability, precision):
    """A V100 (7.0) or T4 (7.5) emulates bf16, slower than fp32: auto picks fp32 there, and asking
    for bf16 is an error naming the card; the job's card decides, not the current one."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some card")
    assert Runtime.resolve("cuda:1").precision == precision and asked == [torch.device("cuda", 1)]
    if precision == "fp32":
        with pytest.raises(ConfigError, match="train.precision=bf16 but Some card does not support bfloat16"):
            Runtime.resolve("cuda:1", "bf16")


def test_the_frozen_teacher_copy_gives_the_autocast_outputs_without_the_weight_casts():
    """Weights stored in bf16 are what autocast casts them to: the teacher's outputs are the same
    bits, and the original network is untouched."""
    from aomd.models import EmbeddingNet

    runtime = Runtime.resolve("cpu", "bf16")
    torch.manual_seed(0)
    teacher = EmbeddingNet("resnet18", 16, True, False).eval()
    frozen = runtime.frozen_copy(teacher)
    assert frozen is not teacher and frozen.backbone.conv1.weight.dtype == torch.bfloat16
    assert teacher.backbone.conv1.weight.dtype == torch.float32 and frozen.backbone.bn1.weight.dtype == torch.float32
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), runtime.autocast():
        expected_embeddings, expected_stages = teacher.forward_with_stages(images)
        embeddings, stages = frozen.forward_with_stages(images)
    assert torch.equal(embeddings, expected_embeddings)
    assert all(torch.equal(a, b) for a, b in zip(stages, expected_stages))
    assert Runtime.resolve("cpu").frozen_copy(teacher) is teacher  # fp32: nothing to cast


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("overrides, words", [
    (["train.device=cuda"], ["train.device=cuda", "no CUDA device", "train.device=cpu"]),
    (["train.precision=fp64"], ["train.precision", "fp64", "bf16"]),
    (["train.num_workers=many"], ["train.num_workers", "many"]),
    (["train.cuda_graphs=true"], ["train.cuda_graphs=true", "CUDA", "train.cuda_graphs=false"]),
])
def test_a_runtime_it_cannot_honour_is_one_line_before_any_work(tmp_path, overrides, words):
    result = run_module("aomd.train", *TINY, "logger=none", f"hydra.run.dir={tmp_path}", *overrides)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "metrics.json").exists()


def _maps(dtype, *shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).abs().to(dtype) for shape in shapes]


@pytest.mark.parametrize("mode", [1, 2])
def test_aomd_of_bf16_maps_is_computed_in_float32_or_better(mode):
    """bf16 maps give the loss of the same (bf16-rounded) values computed in float64, to float32
    precision: the descriptors accumulate in float32 and mode 1's cancelling products in float64."""
    shapes = [(8, 16, 8, 8), (8, 32, 4, 4), (8, 64, 2, 2)]
    teacher, student = _maps(torch.bfloat16, *shapes, seed=0), _maps(torch.bfloat16, *shapes, seed=1)
    student = [s.requires_grad_() for s in student]
    loss = AOMDLoss(mode)(teacher, student)
    exact = AOMDLoss(mode)([t.double() for t in teacher], [s.detach().double() for s in student])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    loss.backward()
    assert all(s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all() for s in student)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_maps_get_channels_last_gradients_of_the_same_values(dtype):
    shapes = (4, 8, 4, 4), (4, 8, 2, 2)
    teacher = _maps(dtype, *shapes, seed=3)
    gradients = {}
    for memory_format in (torch.contiguous_format, torch.channels_last):
        maps = [m.contiguous(memory_format=memory_format).requires_grad_() for m in _maps(dtype, *shapes)]
        AOMDLoss(2)(teacher, maps).backward()
        assert all(m.grad.is_contiguous(memory_format=memory_format) for m in maps)
        gradients[memory_format] = [m.grad for m in maps]
    for standard, channels_last in zip(*gradients.values()):  # the means sum in another order: float rounding
        torch.testing.assert_close(channels_last, standard)


def test_stage_terms_keep_float32_arithmetic_on_bf16_maps():
    teacher, student = _maps(torch.bfloat16, (4, 8, 4, 4), seed=0), _maps(torch.bfloat16, (4, 8, 4, 4), seed=1)
    at = AttentionTransferLoss()(teacher, student)
    assert at.dtype == torch.float32
    assert at.item() == pytest.approx(AttentionTransferLoss()([teacher[0].double()], [student[0].double()]).item(), rel=1e-5)
    fitnet = FitNetLoss([8], [8])
    assert fitnet(teacher, student).dtype == torch.float32  # its regressor ran in bf16, its error in float32


def test_objective_values_are_float32_under_autocast():
    shape = NetworkShape((8, 16), 6)
    objective = Objective(DistanceWeightedNegatives(), shape, shape, triplet_ratio=1, aomd_ratio=1, sp_ratio=1)
    labels = torch.arange(8) // 2
    embeddings = torch.nn.functional.normalize(torch.randn(8, 6), dim=1).bfloat16()
    stages = _maps(torch.bfloat16, (8, 8, 4, 4), (8, 16, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = objective(StepOutputs(labels, embeddings, stages, embeddings.clone(), [s.clone() for s in stages]))
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())


def test_deterministic_kernels_are_a_setting():
    try:
        Runtime.resolve("cpu", deterministic=False).seed_everything(0)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        Runtime.resolve("cpu").seed_everything(0)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False


def test_how_a_job_computes_is_not_part_of_what_it_learns():
    """A run (or a managed teacher) started under one device setting resumes (or is reused) under another."""
    from aomd.records import content_digest

    recipe = {"train": {"lr": 1e-4, "device": "auto", "precision": "auto", "channels_last": None, "compile": False,
                        "deterministic": True, "cuda_graphs": None, "fused_adapters": None}}
    computed_elsewhere = {"train": {**recipe["train"], "device": "cuda:1", "precision": "bf16", "channels_last": True,
                                    "deterministic": False, "cuda_graphs": False, "fused_adapters": False}}
    assert content_digest(recipe) == content_digest(computed_elsewhere)
    assert content_digest({**recipe, "eval": {"keep_crops": None}}) == content_digest({**recipe, "eval": {"keep_crops": True}})
    assert content_digest(recipe) != content_digest({"train": {**recipe["train"], "lr": 1e-3}})


def test_a_config_saved_before_cuda_graphs_and_fused_adapters_still_resolves():
    from omegaconf import OmegaConf

    saved = OmegaConf.create({"device": "cpu", "precision": "auto", "channels_last": None, "compile": False,
                              "num_workers": "auto", "pin_memory": None, "deterministic": True})
    OmegaConf.set_struct(saved, True)
    runtime = Runtime.from_train(saved)
    assert runtime.cuda_graphs is False and runtime.fused_adapters is False  # as on the CPU today
