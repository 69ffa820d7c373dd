"""The train and evaluate entrypoints, run for real on the synthetic dataset."""
import json
from pathlib import Path

import pytest
import torch

import aomd
from conftest import TINY, run_module, signalled_at_step, strip_timing, train
from test_config import assert_one_line_error


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The acceptance command: one epoch of three batches of 32 on the default synthetic dataset."""
    run_dir = tmp_path_factory.mktemp("short-run")
    result = run_module("aomd.train", "train.epochs=1", "train.iters_per_epoch=3", "train.batch_size=32",
                        f"hydra.run.dir={run_dir}", "logger=none", "train.progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


def test_short_run_writes_metrics_checkpoints_and_config(short_run):
    run_dir, stdout = short_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["dataset"] == {"train_images": 2000, "test_images": 2000, "train_classes": 50, "test_classes": 50}
    keys = {"epoch", "recall@1", "recall@2", "recall@4", "recall@8", "map@r"}
    assert keys <= metrics["best"].keys()
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert "loss" in metrics["history"][1] and "loss/triplet" in metrics["history"][1]
    assert all(0 <= metrics["best"][k] <= 1 for k in keys - {"epoch"})
    best_epoch = max(metrics["history"], key=lambda h: h["recall@1"])["epoch"]
    assert metrics["best"]["epoch"] == best_epoch
    for name in ("best.pt", "last.pt"):
        payload = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert payload["architecture"] == {"backbone": "resnet18", "embedding_size": 128, "l2normalize": True}
        assert payload["aomd_version"] == aomd.__version__ and "recall@1" in payload["metrics"]
        assert payload["input"] == {"dataset": "synthetic", "base_size": 72, "image_size": 64,
                                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["metrics"]["epoch"] == 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "recall@1" in stdout and "best" in stdout  # the console summary table


@pytest.mark.slow
def test_evaluate_reproduces_the_checkpoint_metrics(short_run, tmp_path):
    run_dir, _ = short_run
    out = tmp_path / "eval.json"
    result = run_module("aomd.evaluate", f"checkpoint={run_dir}/checkpoints/best.pt", f"output={out}",
                        f"hydra.run.dir={tmp_path}", "train.progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(out.read_text())["metrics"]
    stored = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)["metrics"]
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
        assert evaluated[key] == pytest.approx(stored[key], abs=1e-6)
    assert "recall@1" in result.stdout and "was trained on" not in result.stdout + result.stderr
    # other crops than the network was trained on: said, and evaluated as asked
    result = run_module("aomd.evaluate", f"checkpoint={run_dir}/checkpoints/best.pt", f"output={out}", "dataset.image_size=56",
                        f"hydra.run.dir={tmp_path}", "train.progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was trained on synthetic images of 72 px cropped to 64 px; this evaluation reads synthetic at 72 px cropped " \
           "to 56 px" in result.stdout + result.stderr
    # other data of the same dataset option (its run's .hydra/config.yaml says which): the overrides to pass
    result = run_module("aomd.evaluate", f"checkpoint={run_dir}/checkpoints/best.pt", f"output={out}",
                        "dataset.num_classes=60", "dataset.seed=3", f"hydra.run.dir={tmp_path}", "train.progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was trained with other dataset settings than this evaluation's: pass dataset.num_classes=100 dataset.seed=0 " \
           "to evaluate on the data it was trained on." in result.stdout + result.stderr
    written = json.loads(out.read_text())
    assert written["input"] == {"dataset": "synthetic", "base_size": 72, "image_size": 64}
    assert written["trained_on"]["image_size"] == 64 and written["dataset"]["test_images"] == 30 * 40


def test_evaluate_names_the_dataset_overrides_of_the_training_run():
    from aomd.evaluate import dataset_differences

    trained = {"_target_": "aomd.data.synthetic.load_synthetic", "num_classes": 12, "images_per_class": 8,
               "cache_dir": "${paths.cache_dir}", "in_memory": True, "root": None, "crop": [1, 2], "flip": "${x}"}
    evaluated = {**trained, "num_classes": 100, "cache_dir": "/elsewhere", "in_memory": False, "root": "/data",
                 "crop": [3], "flip": True}
    assert dataset_differences(trained, evaluated) == ["dataset.crop=[1,2]", "dataset.num_classes=12", "dataset.root=null"]
    assert dataset_differences(trained, trained) == []
    assert dataset_differences({**trained, "_target_": "aomd.data.benchmarks.load_cars196"}, evaluated) == []  # another dataset
    assert dataset_differences(None, evaluated) == []  # a checkpoint kept outside its run folder


def test_evaluate_names_other_image_sizes_and_other_data_together():
    """Other crops and other classes than the training run's: both are said, and the overrides
    to pass are all of them, the sizes included."""
    from aomd.evaluate import mismatch_warnings

    trained = {"_target_": "aomd.data.synthetic.load_synthetic", "num_classes": 12, "image_size": 32, "base_size": 40}
    trained_on = {"dataset": "synthetic", "base_size": 40, "image_size": 32}
    evaluated = {**trained, "num_classes": 100, "image_size": 56, "base_size": 72}
    sizes, overrides = mismatch_warnings("best.pt", trained_on, {"dataset": "synthetic", "base_size": 72, "image_size": 56},
                                         trained, evaluated)
    assert sizes == ("best.pt was trained on synthetic images of 40 px cropped to 32 px; this evaluation reads synthetic at "
                     "72 px cropped to 56 px (dataset.base_size, dataset.image_size).")
    assert overrides == ("best.pt was trained with other dataset settings than this evaluation's: pass dataset.base_size=40 "
                         "dataset.image_size=32 dataset.num_classes=12 to evaluate on the data it was trained on.")
    assert mismatch_warnings("best.pt", trained_on, trained_on, trained, trained) == []
    # another dataset (transfer): the sizes alone, no overrides of the other dataset's keys
    assert len(mismatch_warnings("best.pt", trained_on, {**trained_on, "dataset": "cars196"}, trained,
                                 {**evaluated, "_target_": "aomd.data.benchmarks.load_cars196"})) == 1


def test_load_model_embeds_a_batch_of_image_files(short_run, tmp_path):
    """What a user of aomd.load_model does: files -> aomd.preprocess at the sizes the checkpoint
    records -> embeddings; the batch is the evaluation's (resize, centre crop, normalisation)."""
    from PIL import Image

    from aomd.data.augment import eval_transform

    run_dir, _ = short_run
    model = aomd.load_model(run_dir / "checkpoints" / "best.pt")
    sizes = {key: model.input[key] for key in ("base_size", "image_size")}
    assert sizes == {"base_size": 72, "image_size": 64} and model.input["dataset"] == "synthetic"
    stored = torch.randint(0, 256, (3, 72, 72, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(stored[0].numpy()).save(tmp_path / "a.png")
    images = [tmp_path / "a.png", *(Image.fromarray(image.numpy()) for image in stored[1:])]
    batch = aomd.preprocess(images, **sizes)
    assert torch.equal(batch, eval_transform(stored, 64))  # images already at base_size: only the crop and normalisation
    assert aomd.preprocess([Image.fromarray(stored[0].numpy()).resize((100, 80))], **sizes).shape == (1, 3, 64, 64)
    for one in (tmp_path / "a.png", str(tmp_path / "a.png")):  # one image, not a list: a batch of one
        assert torch.equal(aomd.preprocess(one, **sizes), batch[:1])
    with torch.no_grad():
        embeddings = model(batch)
    assert embeddings.shape == (3, 128)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)


def test_teacher_checkpoint_of_another_architecture_is_refused(short_run, tmp_path):
    run_dir, _ = short_run
    result = run_module("aomd.train", *TINY, "loss=aomd_mode2", f"teacher.checkpoint={run_dir}/checkpoints/best.pt",
                        "logger=none", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, "holds a resnet18-128 but the configuration asks for a resnet50-512; pass a matching "
                                  "checkpoint, or teacher.backbone=resnet18 teacher.embedding_size=128 to use this one.")


def test_ctrl_c_while_the_teacher_is_evaluated_records_the_job_as_interrupted(short_run, tmp_path):
    """Ctrl-C before the student's training (here in the given teacher's test evaluation, the
    job's first) ends the job with one line, and its metrics.json says interrupted, not running."""
    run_dir, _ = short_run
    result = run_module("aomd.train", *TINY, "loss=aomd_mode2", f"teacher.checkpoint={run_dir}/checkpoints/best.pt",
                        "teacher.backbone=resnet18", "teacher.embedding_size=128", "logger=none", f"hydra.run.dir={tmp_path}",
                        env=signalled_at_step("SIGINT", "eval1"))
    assert result.returncode == 130, result.stderr[-3000:]
    assert "aomd.train: interrupted; the same command with hydra.run.dir=" in result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_runs_from_any_directory_and_repeat_exactly(tmp_path):
    # 64 px batches of 64: large enough for multi-threaded kernels, whose summation order would
    # differ between runs without deterministic algorithms
    bigger = ("dataset.base_size=72", "dataset.image_size=64", "train.batch_size=64", "dataset.num_classes=40")
    first = train(tmp_path / "a", *bigger, cwd=tmp_path)
    second = train(tmp_path / "b", *bigger, cwd=Path("/"))
    assert strip_timing(first["history"]) == strip_timing(second["history"])
    assert first["history"][1]["loss"] > 0


def test_a_job_that_selects_its_untrained_network_says_so():
    from aomd.jobs import untrained_selection

    warning = untrained_selection({"epoch": 0, "recall@1": 0.2}, 3, "recall@1")
    assert warning.startswith("The selected epoch is 0, the network before training: no trained epoch beat its recall@1")
    assert untrained_selection({"epoch": 2, "recall@1": 0.3}, 3, "recall@1") is None
    assert untrained_selection({"epoch": 0, "recall@1": 0.2}, 0, "recall@1") is None  # train.epochs=0: asked for
