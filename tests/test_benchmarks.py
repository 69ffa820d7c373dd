"""The benchmark scripts run where CI runs (the CPU, small shapes) and say what they measured;
their figures are checked by people on real hardware (docs/benchmarks.md), never by tests."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_train_step_measures_every_row_and_states_the_targets(tmp_path):
    out = tmp_path / "train_step.json"
    result = run_script("benchmarks/train_step.py", "--losses", "aomd_mode2,triplet", "--steps", "1", "--warmup", "1",
                        "--batch-size", "8", "--image-size", "32", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]["fp32"]
    assert set(rows) == {"floor", "floor+adapters", "aomd_mode2", "triplet"}
    assert all(row["seconds"] > 0 and row["images_per_second"] == pytest.approx(8 / row["seconds"]) for row in rows.values())
    assert rows["floor"]["over_floor"] == 1.0
    assert "fp32 aomd_mode2: step / floor" in result.stdout and "target <= 1.10" in result.stdout


def test_recipe_epoch_splits_each_epoch_into_training_evaluation_and_checkpoints(tmp_path):
    out = tmp_path / "recipe.json"
    result = run_script("benchmarks/recipe_epoch.py", "--epochs", "2", "--keep-crops", "true", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = json.loads(out.read_text())
    assert len(recipe["epoch_seconds"]) == 3 and len(recipe["training_seconds"]) == len(recipe["checkpoint_seconds"]) == 2
    for training, saving, epoch in zip(recipe["training_seconds"], recipe["checkpoint_seconds"], recipe["epoch_seconds"][1:]):
        assert 0 < training and 0 <= saving and training + saving < epoch  # the rest is the evaluation
    assert recipe["checkpoint_seconds"][1] > 0  # epoch 2's wall time holds epoch 1's last.pt (best.pt only when better)
    # no loader workers on the CPU: the loop reads its batches itself, a part of its training time
    assert all(0 < wait < training for wait, training in zip(recipe["batch_wait_seconds"], recipe["training_seconds"]))
    assert len(recipe["batch_wait_seconds"]) == 2 and "s waiting for batches;" in result.stdout
    assert recipe["compiled_graphs"] == 0  # not compiled
    assert "s training," in result.stdout and "s evaluation," in result.stdout and "s checkpoints)" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["benchmarks/step_anatomy.py"], ["scripts/gpu_check.sh"], ["scripts/gpu_experiments.sh"]])
def test_the_gpu_only_scripts_say_so_on_a_cpu(command, tmp_path):
    args = ["bash", *command, str(tmp_path / "check")] if command[0].endswith(".sh") else [sys.executable, *command]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "CUDA" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def check_matrix_product_adapters(setting: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """The adapter experiment `setting` of `step_anatomy.py` computes what `StageAdapters`
    computes, values and gradients, on channels_last maps (where it applies).

    Maps, weights, biases and the upstream gradient are small integers, so every product and sum
    (at most 144 in magnitude here) is exact in bf16 and fp16 and the two computations must agree
    bit for bit, whatever order their kernels sum in. With random data they need not: on an H200
    in bf16, cuDNN's convolution put one output of each stage on the other side of its ReLU, which
    moved the gradients by 1-3% in norm."""
    import copy
    import importlib.util

    from aomd.losses.aomd import StageAdapters

    spec = importlib.util.spec_from_file_location("step_anatomy", REPO / "benchmarks" / "step_anatomy.py")
    step_anatomy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_anatomy)
    torch.manual_seed(0)
    small_integers = lambda *shape: torch.randint(-1, 2, shape, device=device).float()  # noqa: E731
    convolutions = StageAdapters([8, 16], [32, 64]).to(device)
    with torch.no_grad():
        for parameter in convolutions.parameters():
            parameter.copy_(small_integers(*parameter.shape))
    products = copy.deepcopy(convolutions)
    step_anatomy.use_gemm_adapters(products, fused=setting == "adapters_fused")
    maps = [small_integers(4, c, s, s).to(dtype).contiguous(memory_format=torch.channels_last) for c, s in ((8, 6), (16, 3))]
    inputs = [[m.clone().requires_grad_() for m in maps] for _ in range(2)]
    outputs = [adapters(feats) for adapters, feats in zip((convolutions, products), inputs)]
    upstream = [small_integers(*out.shape) for out in outputs[0]]
    products_precision = torch.backends.cuda.matmul.fp32_precision
    for out in outputs:
        sum((o.float() * g).sum() for o, g in zip(out, upstream)).backward()
    assert torch.backends.cuda.matmul.fp32_precision == products_precision  # TF32 only inside the experiment
    for ours, theirs in zip(outputs[1], outputs[0]):
        assert ours.dtype == theirs.dtype == dtype and (ours > 0).any() and (ours == 0).any()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for ours, theirs in [*zip(inputs[1], inputs[0]), *zip(products.parameters(), convolutions.parameters())]:
        assert ours.grad.abs().max() > 0
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setting", ["adapters_gemm", "adapters_fused"])
def test_step_anatomys_matrix_product_adapters_match_the_convolutions(setting, dtype):
    check_matrix_product_adapters(setting, dtype)
