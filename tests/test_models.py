"""Embedding networks, their stage taps, checkpoints and the pretrained-weights error."""
import copy
import urllib.error

import pytest
import torch
import torchvision

import aomd
from aomd.models import Architecture, CheckpointError, EmbeddingNet, read_checkpoint, save_checkpoint
from aomd.models.backbones import PretrainedWeightsUnavailable
from aomd.models.checkpoint import check_architecture, load_model


@pytest.mark.parametrize("backbone, channels", [
    ("resnet18", [64, 128, 256, 512]),
    ("resnet50", [256, 512, 1024, 2048]),
    ("googlenet", [192, 480, 832, 1024]),
])
def test_embeddings_and_four_stages(backbone, channels):
    model = EmbeddingNet(backbone, embedding_size=24).eval()
    embeddings, stages = model.forward_with_stages(torch.randn(2, 3, 64, 64))
    assert embeddings.shape == (2, 24)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-5)
    assert [s.shape[1] for s in stages] == channels == model.stage_channels()
    assert [s.shape[-1] for s in stages] == [16, 8, 4, 2]  # strides 4, 8, 16, 32


def test_without_l2_normalisation():
    model = EmbeddingNet("resnet18", 16, l2normalize=False).eval()
    assert not torch.allclose(model(torch.randn(3, 3, 32, 32)).norm(dim=1), torch.ones(3))


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = EmbeddingNet("resnet18", 16).eval()
    path = tmp_path / "ckpt" / "best.pt"
    save_checkpoint(path, model, metrics={"recall@1": 0.5, "epoch": 3})
    payload = torch.load(path, weights_only=True)
    assert payload["architecture"] == {"backbone": "resnet18", "embedding_size": 16, "l2normalize": True}
    assert payload["metrics"]["recall@1"] == 0.5 and payload["aomd_version"] == aomd.__version__
    assert not list(path.parent.glob(".*tmp*")), "no temporary file is left behind"
    loaded = aomd.load_model(path)
    images = torch.randn(2, 3, 32, 32)
    assert not loaded.training
    assert torch.allclose(loaded(images), model(images), atol=1e-6)


def test_a_checkpoint_saved_from_a_card_loads_on_a_machine_without_one(tmp_path, monkeypatch):
    """Tensors saved from a card are tagged with it in the file (as the ones of a checkpoint
    written by an older version, or by hand, may be): `aomd.load_model` maps them to the CPU."""
    model = EmbeddingNet("resnet18", 16).eval()
    path = tmp_path / "best.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(path, model, metrics={"epoch": 1})
    if not torch.cuda.is_available():  # the file is what a card writes: a plain load fails here
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(path, weights_only=True)
    loaded = aomd.load_model(path)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values() if isinstance(t, torch.Tensor))
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(images), model(images), atol=1e-6)


@pytest.fixture
def released(monkeypatch):
    """An event that `CheckpointWriter`'s writes wait for (at most 10 s) before they start."""
    import threading

    from aomd.models import checkpoint

    event, write = threading.Event(), checkpoint._write

    def released_write(*args):
        assert event.wait(10), "the test did not release the checkpoint writer within 10 s"
        return write(*args)

    monkeypatch.setattr(checkpoint, "_write", released_write)
    return event


def test_the_background_writer_saves_what_was_asked_when_it_was_asked(tmp_path, released):
    """`CheckpointWriter.save` copies before it returns: the file holds the state at that moment,
    not the state the training changed it to while the write was queued. Writes land in order."""
    from aomd.models.checkpoint import CheckpointWriter

    model = EmbeddingNet("resnet18", 16)
    history = [{"epoch": 0}]
    with CheckpointWriter() as writer:
        weights = {name: t.clone() for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
        writer.save(tmp_path / "last.pt", model, history=history, metrics={"epoch": 0})
        assert not (tmp_path / "last.pt").exists()  # queued: written later
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)  # what the next steps do, in place, while the write waits
        history.append({"epoch": 1})
        released.set()
        for epoch in (1, 2, 3):
            writer.save(tmp_path / "best.pt", model, metrics={"epoch": epoch})
    first, best = torch.load(tmp_path / "last.pt", weights_only=True), torch.load(tmp_path / "best.pt", weights_only=True)
    assert first["history"] == [{"epoch": 0}] and best["metrics"] == {"epoch": 3}
    assert all(torch.equal(first["model"][name], weights[name]) for name in weights)
    assert torch.equal(best["model"]["backbone.conv1.weight"], weights["backbone.conv1.weight"] + 1.0)
    assert not list(tmp_path.glob(".*tmp*"))


def test_the_background_writer_queues_two_writes_and_reports_a_failed_one(tmp_path, released, caplog):
    """A third save waits for the first write; a failed write raises at the next save or wait,
    after the writes queued behind it; an exception already leaving the writer's block keeps its
    meaning (a stop stays a stop), the failed write logged."""
    import threading

    from aomd.models.checkpoint import CheckpointWriter

    model = EmbeddingNet("resnet18", 16)
    with CheckpointWriter() as writer:
        writer.save(tmp_path / "1.pt", model)
        writer.save(tmp_path / "2.pt", model)
        third = threading.Thread(target=writer.save, args=(tmp_path / "3.pt", model))
        third.start()
        third.join(0.5)
        assert third.is_alive() and not (tmp_path / "1.pt").exists()  # two queued: the third save waits
        released.set()
        third.join(10)
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == ["1.pt", "2.pt", "3.pt"]

    (tmp_path / "a-file").write_text("")
    released.clear()
    with pytest.raises(OSError):
        with CheckpointWriter() as writer:
            writer.save(tmp_path / "a-file" / "last.pt", model)  # its folder is a file
            writer.save(tmp_path / "after.pt", model)
            released.set()
    assert (tmp_path / "after.pt").is_file()
    with pytest.raises(OSError):
        with CheckpointWriter() as writer:
            writer.save(tmp_path / "a-file" / "last.pt", model)
            assert isinstance(writer._pending[0].exception(timeout=10), OSError)
            writer.save(tmp_path / "never.pt", model)  # raises: the failure is found here
    assert not (tmp_path / "never.pt").exists()
    caplog.clear()
    with pytest.raises(SystemExit):
        with CheckpointWriter() as writer:
            writer.save(tmp_path / "a-file" / "last.pt", model)
            raise SystemExit(128 + 12)  # a stop signal acting
    assert "A checkpoint could not be written" in caplog.text


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="could not be read"):
        read_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "r18.pt", EmbeddingNet("resnet18", 16))
    with pytest.raises(CheckpointError, match="resnet18.*resnet50"):
        check_architecture(read_checkpoint(tmp_path / "r18.pt"), Architecture("resnet50", 512), "teacher", tmp_path / "r18.pt")
    # a run folder, or its checkpoints folder, where a file is wanted: the error names the file
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "best.pt", EmbeddingNet("resnet18", 16))
    for folder in (run, run / "checkpoints"):
        with pytest.raises(CheckpointError, match=f"Checkpoint {folder} is a folder; pass a .pt file written by aomd.train, "
                                                  f"e.g. {run / 'checkpoints' / 'best.pt'}."):
            read_checkpoint(folder)
    with pytest.raises(CheckpointError, match=r"is a folder; .* \(a run's checkpoints/best.pt\)"):
        read_checkpoint(tmp_path)


def test_pretrained_googlenet_lets_torchvision_drop_the_auxiliary_heads(monkeypatch):
    asked = {}

    def record(name, **kwargs):
        asked.update(kwargs)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", record)
    with pytest.raises(PretrainedWeightsUnavailable):
        EmbeddingNet("googlenet", 16, pretrained=True)
    # torchvision refuses aux_logits=False together with weights; it removes the heads itself
    assert asked == {"weights": "DEFAULT"}


def test_unavailable_pretrained_weights_say_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        EmbeddingNet("resnet50", 16, pretrained=True)
    message = str(error.value)
    assert "backbone.pretrained=false" in message and "hub/checkpoints" in message
    assert "resnet50-" in message  # names the weight file to copy


def test_a_plugin_backbone_whose_builder_fails_raises_the_builders_error(monkeypatch):
    from aomd.models import backbones

    def builder(pretrained):
        raise RuntimeError("the plugin's weights are not on this machine")

    monkeypatch.setitem(backbones.STAGES, "plugin_net", ("layer1", "layer2", "layer3", "layer4"))
    monkeypatch.setitem(backbones.BUILDERS, "plugin_net", builder)
    with pytest.raises(RuntimeError, match="the plugin's weights are not on this machine"):
        backbones.build_backbone("plugin_net", pretrained=True)


def test_a_checkpoint_of_a_backbone_this_process_does_not_know_names_aomd_plugins(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, EmbeddingNet("resnet18", 8, pretrained=False))
    payload = torch.load(path, weights_only=True)
    payload["architecture"]["backbone"] = "plugin_net"  # registered by a plugin not loaded here
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"holds a plugin_net network, a backbone this process does not know; if a "
                                              r"plugin registers it, name the plugin's module in AOMD_PLUGINS\.$"):
        load_model(path)

def _fresh_stages(model, images):
    """The stages of `model` on `images`, from a fresh network with the same weights."""
    fresh = EmbeddingNet(model.architecture.backbone, model.architecture.embedding_size).eval()
    fresh.load_state_dict(model.state_dict())
    return fresh.forward_with_stages(images)


def test_removed_taps_record_nothing():
    model = EmbeddingNet("resnet18", 16).eval()
    model._taps.remove()
    model.backbone(torch.randn(2, 3, 32, 32))
    assert model._taps.outputs == [None] * 4
    with pytest.raises(AssertionError, match="did not run"):
        model.forward_with_stages(torch.randn(2, 3, 32, 32))
    assert not any(model.backbone.get_submodule(name)._forward_hooks for name in ("layer1", "layer2", "layer3", "layer4"))


def test_a_deep_copy_taps_its_own_stages():
    original = EmbeddingNet("resnet18", 16).eval()
    duplicate = copy.deepcopy(original)
    with torch.no_grad():  # the copy's weights differ, so its stages differ for the same images too
        for p in duplicate.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    original.backbone(a)  # fills the original's taps without collecting them
    taps_of_a = list(original._taps.outputs)
    embeddings_b, stages_b = duplicate.forward_with_stages(b)
    assert all(o is t for o, t in zip(original._taps.outputs, taps_of_a)), "the copy wrote into the original's taps"
    embeddings_a, stages_a = original.forward_with_stages(a)
    for (embeddings, stages), model, images in (((embeddings_a, stages_a), original, a),
                                                ((embeddings_b, stages_b), duplicate, b)):
        expected_embeddings, expected_stages = _fresh_stages(model, images)
        assert torch.allclose(embeddings, expected_embeddings, atol=1e-6)
        assert all(torch.allclose(s, e, atol=1e-6) for s, e in zip(stages, expected_stages, strict=True))
    # removing the copy's hooks leaves the original's in place
    duplicate._taps.remove()
    assert not any(duplicate.backbone.get_submodule(name)._forward_hooks for name in ("layer1", "layer2", "layer3", "layer4"))
    assert len(original.forward_with_stages(a)[1]) == 4


def test_compiled_forward_taps_the_same_stages():
    # aot_eager: traces like inductor (dynamo + autograd graph, hooks included) without its
    # minutes of C++ compilation of a ResNet on the CPU
    model = EmbeddingNet("resnet18", 16).eval()
    images = torch.randn(2, 3, 32, 32)
    eager_embeddings, eager_stages = model.forward_with_stages(images)
    model.forward_with_stages = torch.compile(model.forward_with_stages, backend="aot_eager")
    for _ in range(2):  # the second call runs the cached graph
        embeddings, stages = model.forward_with_stages(images)
        assert torch.allclose(embeddings, eager_embeddings, atol=1e-5)
        assert all(torch.allclose(s, e, atol=1e-5) for s, e in zip(stages, eager_stages, strict=True))
    assert model._taps.outputs == [None] * 4  # collected, also under compile


def test_the_stage_channel_probe_of_a_compiled_network_compiles_nothing():
    graphs = []
    model = EmbeddingNet("resnet18", 16).eval()
    model.forward_with_stages = torch.compile(model.forward_with_stages, dynamic=False,
                                              backend=lambda graph, inputs: graphs.append(graph) or graph.forward)
    try:
        assert model.stage_channels(32) == [64, 128, 256, 512] and not graphs
        model.forward_with_stages(torch.randn(2, 3, 32, 32))
        assert len(graphs) == 1  # the compiled forward itself still compiles
    finally:
        torch.compiler.reset()


def test_googlenet_transform_input_survives_a_checkpoint(tmp_path):
    # ImageNet weights cannot be downloaded here: transform_input=True stands for them
    model = EmbeddingNet("googlenet", 16, transform_input=True).eval()
    assert model.backbone.transform_input and model.architecture.transform_input
    path = tmp_path / "googlenet.pt"
    save_checkpoint(path, model)
    payload = read_checkpoint(path)
    assert payload["architecture"]["transform_input"] is True
    loaded = load_model(path)
    assert loaded.backbone.transform_input and loaded.architecture.transform_input
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(loaded(images), model(images), atol=1e-6)
    # a teacher built from its configuration (no transform_input) passes the architecture check
    # and gets the preprocessing from the weights it loads
    check_architecture(payload, Architecture("googlenet", 16, True), "teacher", path)
    teacher = EmbeddingNet("googlenet", 16, True, False).eval()
    assert not teacher.backbone.transform_input
    teacher.load_state_dict(payload["model"])
    assert teacher.backbone.transform_input and teacher.architecture.transform_input
    assert torch.allclose(teacher(images), model(images), atol=1e-6)


def test_checkpoints_without_transform_input_still_load(tmp_path):
    model = EmbeddingNet("googlenet", 16).eval()
    assert not model.backbone.transform_input
    payload = {"model": model.state_dict(), "architecture": model.architecture.as_dict()}
    del payload["model"]["_extra_state"]  # as written before transform_input was recorded
    assert "transform_input" not in payload["architecture"]
    torch.save(payload, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert not loaded.backbone.transform_input and not loaded.architecture.transform_input
    images = torch.randn(2, 3, 64, 64)
    assert torch.allclose(loaded(images), model(images), atol=1e-6)


def test_saving_removes_the_temporary_files_of_dead_savers(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.pt.tmp-{dead.stdout.strip()}"  # a job killed while saving
    alive = tmp_path / f".last.pt.tmp-{os.getppid()}"  # another process saving right now
    stale.write_bytes(b"half a checkpoint")
    alive.write_bytes(b"being written")
    save_checkpoint(tmp_path / "last.pt", EmbeddingNet("resnet18", 16))
    assert not stale.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "last.pt"])
