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
from conftest import TINY, assert_histories_close, compose, fit_records, strip_timing, student_job

CPU = Runtime.resolve("cpu")


@pytest.mark.parametrize("loss", ["fitnet", "aomd_mode1"])
def test_adapters_and_regressors_learn_with_the_student(tmp_path, loss):
    cfg = validate(compose(*TINY, f"loss={loss}", "logger=none"))
    data = load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)
    torch.manual_seed(0)
    student = EmbeddingNet("resnet18", 16, True, False)
    teacher = EmbeddingNet("resnet34", 32, True, False).eval()
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


def tiny_data(tmp_path):
    return load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)


def test_a_loss_that_becomes_nan_stops_the_job_in_one_sentence(tmp_path, monkeypatch):
    from aomd.engine import TrainingDiverged
    from aomd.errors import UserError

    cfg, runtime, student, objective = student_job("train.device=cpu")
    forward = type(objective).forward
    monkeypatch.setattr(type(objective), "forward", lambda self, outputs: (
        lambda total, terms: (total * float("nan"), terms))(*forward(self, outputs)))
    with pytest.raises(TrainingDiverged, match=r"^The training loss became nan in epoch 1; lower train.lr or the loss ratios.$") as error:
        fit(student, objective, tiny_data(tmp_path), cfg.train, cfg.eval, runtime, tmp_path, lambda record, is_best: None)
    assert isinstance(error.value, UserError)  # one line from the entrypoints; in a sweep, a failed job


@pytest.mark.parametrize("during, batch_key", [("training", "train.batch_size=16"), ("evaluation", "eval.batch_size=256")])
def test_running_out_of_device_memory_names_the_batch_size_to_lower(tmp_path, monkeypatch, during, batch_key):
    from aomd.engine import OutOfDeviceMemory, TrainStep

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg, runtime, student, objective = student_job("train.device=cpu")
    monkeypatch.setattr(TrainStep, "__call__", out_of_memory) if during == "training" else \
        monkeypatch.setattr(EmbeddingNet, "forward", out_of_memory)
    setting = batch_key.split("=")[0]
    with pytest.raises(OutOfDeviceMemory, match=rf"^cpu ran out of memory during {during} with {batch_key} \(fp32\); "
                                                rf"lower {setting}, or train.precision=bf16 to halve the activations.$"):
        fit(student, objective, tiny_data(tmp_path), cfg.train, cfg.eval, runtime, tmp_path, lambda record, is_best: None)


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


@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_a_resumed_optimiser_gives_its_moments_the_layout_of_this_jobs_parameters(saved_channels_last):
    """A run saved with channels_last parameters (a card's eager default) resumed with standard-layout
    ones (compiled, or the CPU), or the other way round: fused Adam gets moments in its parameters'
    layout (on CUDA it refuses others; on the CPU it would pair the wrong elements) and updates as
    the saving job would have."""
    from aomd.engine import load_optimizer_state

    torch.manual_seed(0)
    layouts = {True: torch.channels_last, False: torch.contiguous_format}
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=layouts[saved_channels_last])
    saved = torch.optim.Adam(conv.parameters(), lr=0.1, fused=True)
    gradients = [torch.randn(4, 3, 3, 3), torch.randn(4)]
    for parameter, gradient in zip(conv.parameters(), gradients):
        parameter.grad = torch.empty_like(parameter).copy_(gradient)
    saved.step()
    resumed_conv = copy.deepcopy(conv).to(memory_format=layouts[not saved_channels_last])
    assert resumed_conv.weight.stride() != conv.weight.stride()
    resumed = torch.optim.Adam(resumed_conv.parameters(), lr=0.1, fused=True)
    load_optimizer_state(resumed, copy.deepcopy(saved.state_dict()))  # as read back from last.pt
    for parameter in resumed_conv.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed.state[parameter][key].stride() == parameter.stride(), key
    for optimizer, network in ((saved, conv), (resumed, resumed_conv)):
        for parameter, gradient in zip(network.parameters(), gradients):
            parameter.grad = torch.empty_like(parameter).copy_(gradient)  # in the parameter's layout, as autograd gives it
        optimizer.step()
    torch.testing.assert_close(resumed_conv.weight, conv.weight, rtol=1e-6, atol=0)  # vector lanes differ with the layout


def test_kept_crops_evaluate_like_the_loader_and_skip_it_after_the_first_evaluation(tmp_path, monkeypatch):
    """`eval.keep_crops=true`: the same history as reading the test split every evaluation, and
    the split is read once, in the evaluation at epoch 0 (the training split as before)."""
    from aomd.data.splits import ImageSplit

    data = load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)
    reads = []
    take = ImageSplit.take
    monkeypatch.setattr(ImageSplit, "take", lambda split, indices: reads.append(split is data.test) or take(split, indices))

    def history(keep_crops):
        return strip_timing(fit_records(data, tmp_path / str(keep_crops), "train.device=cpu", "train.epochs=2",
                                        f"eval.keep_crops={keep_crops}", "eval.batch_size=10"))

    batches_per_evaluation = -(-len(data.test) // 10)  # eval.batch_size: a short last batch too
    assert batches_per_evaluation > 1 and len(data.test) % 10
    read_again = history(False)
    assert sum(reads) == 3 * batches_per_evaluation  # epochs 0, 1, 2
    reads.clear()
    kept = history(True)
    assert sum(reads) == batches_per_evaluation and len(reads) > sum(reads)  # the training batches are still read
    assert kept == read_again and len(kept) == 3


def test_crops_are_kept_by_default_on_a_card_they_fit_and_never_on_the_cpu(monkeypatch):
    from types import SimpleNamespace

    from aomd.engine import keeps_crops

    test = [None] * 8_131  # Cars196's test split: 8,131 crops of 224 px are 1.22 GB
    card = Runtime(device=torch.device("cuda", 0))
    for total_gb, kept in ((24, True), (9, False)):  # up to an eighth of the card
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total_gb * 2**30))
        assert keeps_crops(None, [test], 224, card) is kept
    assert keeps_crops(None, [test, test[:2_000]], 224, card) is False  # with a validation split: both count
    assert keeps_crops(False, [test], 224, card) is False
    assert keeps_crops(None, [test], 224, CPU) is False and keeps_crops(True, [test], 224, CPU) is True


def test_a_compiled_distillation_compiles_each_network_once_per_batch_shape(tmp_path, monkeypatch):
    """`train.compile=true`: one graph for the student's training batches, one for its evaluation
    batches (the short last one padded, not compiled again), one for the teacher's forward in the
    training step; a one-off evaluation (`engine.evaluate`, the teacher's) compiles nothing. The
    history equals the uncompiled run's."""
    from aomd.engine import evaluate

    graphs = []

    def counting_backend(graph_module, example_inputs):  # runs dynamo's graph as traced: eager numerics
        graphs.append(graph_module)
        return graph_module.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: compile_(function, backend=counting_backend, **options))
    data = load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)
    assert len(data.test) % 10, "a short last evaluation batch"

    def history(compiled: bool) -> list[dict]:
        cfg = validate(compose(*TINY, "loss=aomd_mode2", "logger=none", "train.device=cpu", "train.epochs=1",
                               "eval.batch_size=10", f"train.compile={compiled}"))
        runtime = Runtime.from_train(cfg.train)
        runtime.seed_everything(0)
        student = EmbeddingNet("resnet18", 16, True, False)
        teacher = EmbeddingNet("resnet18", 32, True, False).eval()  # one graph as a ResNet50's, in less time
        objective = build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)
        teacher_metrics = evaluate(teacher, data.test, data.image_size, cfg.eval, runtime)
        assert not graphs and 0 <= teacher_metrics["recall@1"] <= 1
        records = []
        fit(student, objective, data, cfg.train, cfg.eval, runtime, tmp_path / str(compiled),
            lambda record, is_best: records.append(record), teacher)
        return strip_timing(records)

    def image_shapes() -> list[tuple[int, ...]]:
        return sorted(tuple(node.meta["example_value"].shape) for graph in graphs for node in graph.graph.nodes
                      if node.op == "placeholder" and node.name.startswith("l_images"))

    try:
        eager = history(False)
        assert not graphs
        compiled = history(True)
        assert image_shapes() == [(10, 3, 32, 32), (16, 3, 32, 32), (16, 3, 32, 32)]  # evaluation; training: teacher, student
        # a second job in this process (a sweep under Hydra's default launcher) compiles its own
        # graphs: none of the first's count against dynamo's limit of graphs per function
        graphs.clear()
        assert history(True) == compiled and len(image_shapes()) == 3
    finally:
        torch.compiler.reset()
    assert len(compiled) == len(eager) == 2
    assert_histories_close(compiled, eager, rel=1e-4, abs=1e-5)


@pytest.mark.slow  # compiles (about 10 s on a 2-core CPU)
def test_a_distillation_with_fused_adapters_learns_what_the_eager_adapters_learn(tmp_path):
    """`train.fused_adapters=true` (the default on CUDA; the CPU's is false): AOMD's student
    descriptors come from the compiled adapters, and the history matches the eager one: the
    losses to float32 rounding, the metrics of the networks they trained to two ranking flips
    among the 48 test images (the compiled sums round differently, and a step of aomd_mode1 moves
    them on)."""
    data = load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32, cache_dir=tmp_path)
    assert len(data.test) == 48

    def history(fused: bool) -> tuple[list[dict], bool]:
        cfg = validate(compose(*TINY, "loss=aomd_mode1", "logger=none", "train.device=cpu", f"train.fused_adapters={fused}"))
        runtime = Runtime.from_train(cfg.train)
        assert runtime.fused_adapters is fused and runtime.describe()["fused_adapters"] is fused
        runtime.seed_everything(0)
        student = EmbeddingNet("resnet18", 16, True, False)
        teacher = EmbeddingNet("resnet50", 32, True, False).eval()
        objective = build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)
        records = []
        fit(student, objective, data, cfg.train, cfg.eval, runtime, tmp_path / str(fused),
            lambda record, is_best: records.append(record), teacher)
        return strip_timing(records), objective.terms["aomd"].fused

    (eager, eager_fused), (fused, fused_fused) = history(False), history(True)
    assert (eager_fused, fused_fused) == (False, True)
    assert Runtime.resolve("cpu").fused_adapters is False  # CPU results unchanged by default
    assert [r.keys() for r in fused] == [r.keys() for r in eager]
    for ours, theirs in zip(fused, eager):
        for key, value in theirs.items():
            loss = key == "loss" or key.startswith("loss/")
            assert ours[key] == pytest.approx(value, rel=1e-4 if loss else 0, abs=0 if loss else 2 / 48 + 1e-9), key


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_epoch_started_early_keeps_its_batches_and_its_saved_sampler_state(num_workers):
    """`epoch_batches` starts an epoch before the evaluation that precedes it: a worker begins
    reading at once (its prefetch draws from the sampler), yet the epoch's batches and the sampler
    state saved for its start are those of an epoch started when its turn comes."""
    import numpy as np

    from aomd.data.splits import ImageSplit
    from aomd.data.loader import train_loader
    from aomd.engine import epoch_batches
    from aomd.resume import sampler_state

    # image i's pixels hold i: a batch's first pixels are its indices
    split = ImageSplit(np.broadcast_to(np.arange(24, dtype=np.uint8)[:, None, None, None], (24, 4, 4, 3)).copy(),
                       np.repeat(np.arange(6), 4))
    indices_of = lambda batches: [images[:, 0, 0, 0].tolist() for images, _ in batches]  # noqa: E731
    loader = train_loader(split, 8, 2, 3, seed=0, num_workers=num_workers)
    reference = train_loader(split, 8, 2, 3, seed=0)
    first_state, first = epoch_batches(loader)
    assert first_state == sampler_state(reference.sampler)
    assert indices_of(first) == indices_of(reference)
    second_state, second = epoch_batches(loader)
    assert second_state == sampler_state(reference.sampler)
    # with a worker, the second epoch's first batches are drawn before anything asks for them
    assert (sampler_state(loader.sampler) != second_state) == (num_workers > 0)
    assert indices_of(second) == indices_of(reference)
    # resumed after its first batch: the same epoch without it
    loader.sampler.rng.bit_generator.state = reference.sampler.rng.bit_generator.state = np.random.default_rng(5).bit_generator.state
    _, rest = epoch_batches(loader, skip=1)
    assert indices_of(rest) == indices_of(reference)[1:]
