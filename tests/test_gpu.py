"""The `gpu` tier: every loss option in every precision, the teacher path, repeatability and
checkpoints, on a CUDA device.

Skipped where CUDA is absent, so CI (CPU only) is unchanged. `scripts/gpu_check.sh` runs this tier
with the GPU benchmarks. To work on the tier without a card, `AOMD_GPU_TIER_DEVICE=cpu pytest -m gpu`
runs the same tests on the CPU (autocast has bf16 and fp16 there too, slowly); the one test that
needs a card's speed is skipped then.
"""
import json
import math
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from aomd.config import validate
from aomd.data.synthetic import load_synthetic
from aomd.engine import Evaluator, fit
from aomd.losses.objective import Objective
from aomd.models import EmbeddingNet
from aomd.build import build_objective
from aomd.runtime import Runtime
from conftest import REPO, TINY, assert_histories_close, compose, fit_records, run_module, signalled_at_step, strip_timing, train

DEVICE = os.environ.get("AOMD_GPU_TIER_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_CUDA = DEVICE is not None and DEVICE.startswith("cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="no CUDA device (AOMD_GPU_TIER_DEVICE=cpu runs this tier on the CPU)"),
]

LOSSES = sorted(path.stem for path in (REPO / "conf" / "loss").glob("*.yaml"))
PRECISIONS = ("fp32", "bf16", "fp16")
# Recall@1 of two short synthetic runs that differ only in precision may differ by as much as two
# runs with different seeds (about 2.5 points of standard deviation over seeds at this length)
BF16_RECALL_TOLERANCE = 0.08


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return load_synthetic(num_classes=12, images_per_class=8, base_size=40, image_size=32,
                          cache_dir=tmp_path_factory.mktemp("gpu-tier-cache"))


def test_teacher_is_trained_on_the_device_then_distilled(tmp_path):
    """A fresh cache: the managed teacher is trained on the device, evaluated there, then distilled."""
    env = {"AOMD_CACHE_DIR": str(tmp_path / "cache")}
    metrics = train(tmp_path / "student", "loss=aomd_mode2", f"train.device={DEVICE}", env=env)
    assert metrics["status"] == "finished" and metrics["runtime"]["device"].startswith(DEVICE.split(":")[0])
    assert "recall@1" in metrics["teacher"]
    (teacher_dir,) = (tmp_path / "cache" / "teachers").glob("*/")
    teacher_run = json.loads((teacher_dir / "metrics.json").read_text())
    assert teacher_run["status"] == "finished" and teacher_run["runtime"] == metrics["runtime"]
    assert teacher_run["best"]["epoch"] >= 1


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    """A short triplet run on the device in the default precision (bf16 on a card that has it):
    (its folder, its metrics.json)."""
    run_dir = tmp_path_factory.mktemp("device-run")
    return run_dir, train(run_dir, "loss=triplet", f"train.device={DEVICE}")


@pytest.mark.xdist_group("device_run")  # one training run for both, in parallel runs too
def test_a_device_checkpoint_loads_on_a_cpu_only_machine(device_run):
    run_dir, _ = device_run
    script = (
        "import sys, torch, aomd\n"
        "assert not torch.cuda.is_available()\n"
        "def tensors(tree):\n"
        "    if isinstance(tree, torch.Tensor): yield tree\n"
        "    elif isinstance(tree, dict): yield from (t for value in tree.values() for t in tensors(value))\n"
        "    elif isinstance(tree, (list, tuple)): yield from (t for value in tree for t in tensors(value))\n"
        "for path in sys.argv[1:]:\n"
        "    payload = torch.load(path, weights_only=True)\n"  # no map_location: every tensor must be a CPU tensor
        "    found = list(tensors(payload))\n"
        "    assert found and all(t.device.type == 'cpu' for t in found)\n"
        "    model = aomd.load_model(path)\n"
        "    print(len(found) > 100, tuple(model(torch.randn(2, 3, 32, 32)).shape))\n"
    )
    # best.pt: the network; last.pt also the optimiser's moments, the scaler and the generators' states
    checkpoints = [str(run_dir / "checkpoints" / name) for name in ("best.pt", "last.pt")]
    result = subprocess.run([sys.executable, "-c", script, *checkpoints],
                            capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["True (2, 128)"] * 2


@pytest.mark.xdist_group("device_run")  # one training run for both, in parallel runs too
def test_a_device_run_repeats_its_metrics(device_run, tmp_path):
    """Same seed, same device, default precision (bf16 on a card that has it): the same history."""
    _, first = device_run
    second = train(tmp_path, "loss=triplet", f"train.device={DEVICE}")
    assert first["runtime"] == second["runtime"] and len(first["history"]) == 2
    assert strip_timing(first["history"]) == strip_timing(second["history"])


def test_a_checkpoint_holds_the_values_of_its_save_whatever_the_device_queues_next(tmp_path):
    """`CheckpointWriter.save` copies a card's tensors asynchronously into page-locked memory: the
    file holds the values of the moment of `save`, not those of the in-place updates queued after
    it (as training's next steps are), although the copies run late, and it holds CPU tensors in
    the model's memory layout."""
    from aomd.models.checkpoint import CheckpointWriter

    runtime = Runtime.resolve(DEVICE)
    model = runtime.prepare_network(EmbeddingNet("resnet18", 16, True, False))
    expected = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()
                if isinstance(value, torch.Tensor)}  # not the extra state (a dict)
    moments = [p.detach() * 2 for p in model.parameters()]  # an optimiser's state, say
    expected_moments = [m.cpu().clone() for m in moments]
    with CheckpointWriter() as writer:
        if ON_CUDA:
            # the copies start only after a second of the card's time: a writer that did not wait
            # for them would write page-locked memory not yet filled
            torch.cuda._sleep(int(2e9))
        writer.save(tmp_path / "last.pt", model, training={"moments": moments})
        with torch.no_grad():  # what the next training steps would do, queued behind the copies
            for _ in range(20):
                for parameter, moment in zip(model.parameters(), moments):
                    parameter.mul_(1.5).add_(1)
                    moment.add_(parameter)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert expected and saved["model"].keys() >= expected.keys()
    for key, value in expected.items():
        assert saved["model"][key].device.type == "cpu" and torch.equal(saved["model"][key], value), key
        assert saved["model"][key].stride() == value.stride(), key  # channels_last kept on a card
    assert all(torch.equal(s, e) for s, e in zip(saved["training"]["moments"], expected_moments, strict=True))


def test_a_device_run_stopped_mid_epoch_resumes_to_the_same_history(tmp_path):
    """SIGUSR2 (SLURM's preemption) at step 3 of epoch 2 of a distillation (adapters, teacher), in
    the default precision, with the CUDA generator and the loss sums kept on the device in last.pt:
    the resumed run's history equals an uninterrupted one's."""
    args = ["loss=aomd_mode2", f"train.device={DEVICE}", "train.epochs=3", "train.iters_per_epoch=4"]
    uninterrupted = train(tmp_path / "a", *args)
    result = run_module("aomd.train", *TINY, "logger=none", *args, f"hydra.run.dir={tmp_path / 'b'}",
                        env=signalled_at_step("SIGUSR2", 7))
    assert result.returncode == 128 + signal.SIGUSR2, result.stderr[-3000:]
    resumed = train(tmp_path / "b", *args)
    assert resumed["status"] == "finished"
    assert strip_timing(resumed["history"]) == strip_timing(uninterrupted["history"])


def test_crops_kept_on_the_device_evaluate_like_the_loader(tiny_data, tmp_path):
    """`eval.keep_crops` (on by default on CUDA): evaluations after the first embed the test
    split's crops kept on the device; the history equals that of reading the split every time."""
    from aomd.engine import keeps_crops

    histories = [strip_timing(fit_records(tiny_data, tmp_path / str(keep), f"train.device={DEVICE}", "train.epochs=2",
                                          "eval.batch_size=10", f"eval.keep_crops={keep}"))  # several batches, a short last one
                 for keep in (True, False)]
    assert len(histories[0]) == 3 and histories[0] == histories[1]
    assert keeps_crops(None, [tiny_data.test], tiny_data.image_size, Runtime.resolve(DEVICE)) is ON_CUDA


def test_a_graphed_teacher_distils_like_the_eager_one(tmp_path):
    """`train.cuda_graphs=true` in a whole distillation: the same losses and metrics as eager."""
    if not ON_CUDA:
        pytest.skip("CUDA graphs need a CUDA device")
    args = ["loss=aomd_mode2", f"train.device={DEVICE}"]
    eager = train(tmp_path / "eager", *args)
    graphed = train(tmp_path / "graphed", *args, "train.cuda_graphs=true")
    assert graphed["runtime"]["cuda_graphs"] is True and eager["runtime"]["cuda_graphs"] is False
    assert_histories_close(strip_timing(graphed["history"]), strip_timing(eager["history"]), rel=1e-3, abs=1e-4)


def test_bf16_recall_is_within_tolerance_of_fp32(tmp_path):
    """The default synthetic recipe (6 epochs) in fp32 and in bf16 + channels_last."""
    if not ON_CUDA:
        pytest.skip("six synthetic epochs in bf16 take many minutes on a CPU")
    settings = {"fp32": ("train.precision=fp32", "train.channels_last=false"),
                "bf16": ("train.precision=bf16", "train.channels_last=true")}
    with ThreadPoolExecutor(2) as pool:  # the two runs side by side on the card: this is the tier's longest test
        fp32, bf16 = pool.map(lambda name: train(tmp_path / name, f"train.device={DEVICE}", *settings[name], tiny=False),
                              settings)
    assert bf16["runtime"]["precision"] == "bf16" and fp32["runtime"]["precision"] == "fp32"
    untrained = fp32["history"][0]["recall@1"]
    assert fp32["best"]["recall@1"] > untrained + 0.15 and bf16["best"]["recall@1"] > untrained + 0.15
    assert abs(bf16["best"]["recall@1"] - fp32["best"]["recall@1"]) <= BF16_RECALL_TOLERANCE, (fp32["best"], bf16["best"])


@pytest.mark.parametrize("channels_last", ["null", "true"])
def test_compiled_networks_train_fed_batches_of_either_layout(channels_last, tmp_path):
    """Compiled networks train, also fed channels_last batches (their parameters stay in the
    standard layout, which inductor's convolution backward needs)."""
    metrics = train(tmp_path, "loss=triplet", f"train.device={DEVICE}", "train.compile=true",
                    f"train.channels_last={channels_last}", timeout=900)
    assert metrics["status"] == "finished" and metrics["runtime"]["compile"] is True
    assert metrics["runtime"]["channels_last"] is (channels_last == "true")
    assert math.isfinite(metrics["history"][1]["loss"])


def test_compiled_networks_fed_channels_last_batches_give_channels_last_stage_maps():
    """`train.compile=true train.channels_last=true`: standard-layout parameters (channels_last ones
    fail in inductor's convolution backward on a card), channels_last batches, and so channels_last
    stage maps for AOMD's adapters; the backward reaches every parameter."""
    torch.compiler.reset()
    runtime = Runtime.resolve(DEVICE, "bf16", channels_last=True, compile=True)
    student = runtime.prepare_network(EmbeddingNet("resnet18", 16, True, False)).train()
    assert all(p.is_contiguous() for p in student.parameters())
    images = torch.randn(8, 3, 64, 64, device=runtime.device).contiguous(memory_format=runtime.memory_format)
    with runtime.autocast():
        embeddings, stages = student.forward_with_stages(images)
    assert all(s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous() for s in stages), \
        [s.stride() for s in stages]
    (embeddings.float().sum() + sum(s.float().mean() for s in stages)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


@pytest.mark.parametrize("precision", ("fp32", "bf16"))
def test_the_graphed_teacher_replays_the_eager_teacher(precision):
    """`train.cuda_graphs`: the teacher's forward replayed from a CUDA graph gives the eager
    forward's outputs, for each new batch, and follows weights changed in place."""
    if not ON_CUDA:
        pytest.skip("CUDA graphs need a CUDA device")
    from aomd.runtime import InferenceGraph

    runtime = Runtime.resolve(DEVICE, precision, cuda_graphs=True)
    runtime.seed_everything(0)
    teacher = runtime.prepare_network(EmbeddingNet("resnet50", 64, True, False)).eval().requires_grad_(False)
    graphed = InferenceGraph(teacher.forward_with_stages, runtime)
    tolerance = {"fp32": 1e-4, "bf16": 2e-2}[precision]
    for batch in range(3):
        if batch == 2:
            with torch.no_grad():
                teacher.embedding.weight.mul_(0.5)
        images = torch.randn(8, 3, 64, 64, device=runtime.device).contiguous(memory_format=runtime.memory_format)
        with torch.inference_mode(), runtime.autocast():
            eager_embeddings, eager_stages = teacher.forward_with_stages(images)
            embeddings, stages = graphed(images)
            for ours, eager in zip([embeddings, *stages], [eager_embeddings, *eager_stages]):
                torch.testing.assert_close(ours.float(), eager.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, True), (torch.bfloat16, True), (torch.float16, True),
                                                 (torch.float32, False)])
def test_fused_adapters_give_the_eager_adapters_values_and_gradients_on_the_device(dtype, channels_last):
    """`train.fused_adapters` (the CUDA default): inductor's kernels on the card compute AOMD's
    student descriptors and their gradients as the eager adapters do (exactly, on small integers)."""
    from test_aomd import check_fused_adapters

    check_fused_adapters(dtype, channels_last, DEVICE)


# every loss option with its default sampler; AOMD with the triplet term (which the AOMD options
# leave off) and each kind of sampler, so that a sampler runs beside the fused AOMD term
NO_WAIT_CASES = [(f"loss={loss}",) for loss in LOSSES] + [
    ("loss=aomd_mode2", "loss.triplet_ratio=1", f"sampler={sampler}") for sampler in ("distance", "semihard", "all")]


@pytest.mark.skipif(not ON_CUDA, reason="host-device synchronisation is a card's matter")
@pytest.mark.parametrize("overrides", NO_WAIT_CASES, ids=" ".join)
def test_a_training_step_never_waits_for_the_device(overrides):
    """A training step queues its work and returns: nothing in it (a negative sampler, a loss term,
    the optimiser) reads a value back from the card, which would leave the card idle while the host
    launches what follows (RKD's distance term did, with a boolean-mask index). The labels stay on
    the host, as `fit` keeps them; CUDA's sync debug mode turns any synchronisation into an error."""
    from aomd.engine import TrainStep, adam

    torch.compiler.reset()  # the fused term compiles afresh, not past dynamo's limit of graphs per function
    cfg = validate(compose(*overrides, "logger=none", *TINY))
    runtime = Runtime.resolve(DEVICE)
    runtime.seed_everything(0)
    student = EmbeddingNet("resnet18", 16, cfg.l2normalize, False)
    teacher = EmbeddingNet("resnet50", 32, True, False).eval()
    objective = build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)
    runtime.prepare_network(student).train()
    runtime.prepare_network(teacher).requires_grad_(False)
    runtime.prepare_objective(objective).train()
    optimizer = adam([*student.parameters(), *objective.parameters()], 1e-4, 1e-5, runtime)
    step = TrainStep(student, objective, optimizer, runtime, cfg.dataset.image_size,
                     teacher=teacher if objective.needs_teacher else None)
    images = torch.randint(0, 256, (16, 40, 40, 3), dtype=torch.uint8).pin_memory().to(runtime.device)
    labels = (torch.arange(16) // 4).pin_memory()
    for _ in range(2):  # compiling and the caches' first allocations happen here
        step(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, terms = step(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and terms
    if "loss.triplet_ratio=1" in overrides:
        assert set(terms) == {"triplet", "aomd"}


@pytest.mark.parametrize("name", ["all", "random", "hard", "semihard", "distance"])
def test_samplers_draw_the_same_triplets_from_labels_on_the_host(name):
    """`fit` keeps the labels on the host: a sampler finds its pairs there and returns triplets on
    the embeddings' device, the triplets it draws from labels on the device."""
    from aomd.losses import AllNegatives, DistanceWeightedNegatives, HardNegatives, RandomNegatives, SemiHardNegatives

    sampler = {"all": AllNegatives, "random": RandomNegatives, "hard": HardNegatives, "semihard": SemiHardNegatives,
               "distance": DistanceWeightedNegatives}[name]()
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(32, 8), dim=1).to(DEVICE)
    labels = torch.arange(32) // 4
    drawn = []
    for where in (labels, labels.to(DEVICE)):
        torch.manual_seed(1)
        drawn.append(sampler(embeddings, where))
    for host, device in zip(*drawn):
        assert host.device == embeddings.device
        assert torch.equal(host, device)
    assert len(drawn[0][0]) > 0


# Last in the file: pytest-xdist hands out tests in file order, so the long runs above start first and
# these thirty short ones fill the workers' ends (the longest first packs parallel workers tightest:
# the tier ends sooner, and one stopped at its limit in scripts/gpu_check.sh has run the long ones).
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_and_evaluates_on_the_device(loss, precision, tiny_data, tmp_path):
    # no loader workers: thirty forks of a CUDA process add minutes to a short lease, and the
    # tier's entrypoint runs and the data-path benchmark run the workers
    # fp16: the gradient scaler starts at 2^16 and halves at each overflow, skipping that step; the
    # distillation terms' gradients (AOMD's weight is 2e2) overflow until it reaches a few units,
    # about 15 steps on this data: the epoch trains past them
    steps = 20 if precision == "fp16" else 2
    cfg = validate(compose(*TINY, f"loss={loss}", "logger=none", f"train.device={DEVICE}", f"train.precision={precision}",
                           "train.num_workers=0", f"train.iters_per_epoch={steps}"))
    runtime = Runtime.from_train(cfg.train)
    assert runtime.precision == precision and runtime.device.type == torch.device(DEVICE).type
    runtime.seed_everything(0)
    student = EmbeddingNet("resnet18", cfg.embedding_size, cfg.l2normalize, False)
    teacher = EmbeddingNet("resnet50", 64, True, False).eval() if Objective.distils(cfg.loss) else None
    objective = build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)
    initial = [parameter.detach().clone() for parameter in student.parameters()]
    records = []
    fit(student, objective, tiny_data, cfg.train, cfg.eval, runtime, tmp_path, lambda record, is_best: records.append(record), teacher)
    assert [r["epoch"] for r in records] == [0, 1]
    trained = records[1]
    terms = [key for key in trained if key.startswith("loss/")]
    assert terms and all(math.isfinite(trained[key]) for key in ["loss", *terms]), trained
    # it trained: most parameters moved (a step the scaler skips moves none; a zero-initialised bias that
    # no gradient reaches stays, as layer4's BN biases under AT, whose 1x1 stage-4 maps at 32 px give
    # a constant attention map), and they stayed finite
    unchanged = [i for i, (before, after) in enumerate(zip(initial, student.parameters())) if torch.equal(before, after.detach().cpu())]
    assert len(unchanged) < len(initial) / 4, f"{len(unchanged)} of {len(initial)} parameters did not change"
    assert all(torch.isfinite(parameter).all() for parameter in student.parameters())
    # the evaluation's embeddings, in the training precision, are finite (Recall@K of NaN embeddings is still a number)
    embeddings, _ = Evaluator(tiny_data.test, tiny_data.image_size, cfg.eval, runtime).embed(student)
    assert torch.isfinite(embeddings).all()
    assert 0 <= trained["recall@1"] <= 1
    for module in (student, objective, *([teacher] if teacher is not None else [])):
        assert all(p.device.type == runtime.device.type for p in module.parameters())
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    tensors = [t for t in saved["model"].values() if isinstance(t, torch.Tensor)]  # not the extra state (a dict)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
