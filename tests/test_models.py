"""Embedding networks, their stage taps, checkpoints and the pretrained-weights error."""
import urllib.error

import pytest
import torch
import torchvision

import aomd
from aomd.models import Architecture, CheckpointError, EmbeddingNet, read_checkpoint, save_checkpoint
from aomd.models.backbones import PretrainedWeightsUnavailable
from aomd.models.checkpoint import check_architecture


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


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="could not be read"):
        read_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "r18.pt", EmbeddingNet("resnet18", 16))
    with pytest.raises(CheckpointError, match="resnet18.*resnet50"):
        check_architecture(read_checkpoint(tmp_path / "r18.pt"), Architecture("resnet50", 512), "teacher", tmp_path / "r18.pt")


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
