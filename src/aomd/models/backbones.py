"""torchvision backbones with their classifier removed and their four stages tapped."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from aomd.errors import UserError

# the module whose output is each backbone's stage 1..4 (strides 4, 8, 16, 32)
STAGES = {
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet34": ("layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("layer1", "layer2", "layer3", "layer4"),
    "resnet101": ("layer1", "layer2", "layer3", "layer4"),
    "googlenet": ("conv3", "inception3b", "inception4e", "inception5b"),
}
BACKBONES = tuple(STAGES)


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights were asked for but could not be loaded."""


def build_backbone(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    """A torchvision backbone whose forward returns pooled features [N, F], and F."""
    assert name in STAGES, name
    # GoogLeNet: torchvision drops the auxiliary heads itself after loading ImageNet weights
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" and not pretrained else {}
    weights = "DEFAULT" if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except Exception as error:  # no network, proxy, corrupt download: all mean the same to the user
        if not pretrained:
            raise
        target = torchvision.models.get_model_weights(name).DEFAULT
        raise PretrainedWeightsUnavailable(
            f"Could not load the ImageNet weights of {name} ({type(error).__name__}: {error}). "
            f"On a machine with internet run `python -c \"import torchvision; "
            f"torchvision.models.get_model('{name}', weights='DEFAULT')\"`, copy "
            f"{target.url.rsplit('/', 1)[-1]} from its $TORCH_HOME/hub/checkpoints/ (default "
            f"~/.cache/torch/hub/checkpoints/) to the same folder here, and run again; "
            f"or train from scratch with backbone.pretrained=false."
        ) from None
    features = model.fc.in_features
    model.fc = nn.Identity()
    if name == "googlenet":
        model.dropout = nn.Identity()
    return model, features


class StageTaps:
    """Forward hooks that keep the latest output of each named stage of a backbone."""

    def __init__(self, backbone: nn.Module, stage_names: tuple[str, ...]):
        self.outputs: list[torch.Tensor | None] = [None] * len(stage_names)
        for i, name in enumerate(stage_names):
            backbone.get_submodule(name).register_forward_hook(self._keeper(i))

    def _keeper(self, i: int):
        def hook(_module, _inputs, output):
            self.outputs[i] = output
        return hook

    def collect(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, [None] * len(self.outputs)
        assert all(o is not None for o in outputs), "a stage did not run"
        return outputs
