"""torchvision backbones with their classifier removed and their four stages tapped."""
from __future__ import annotations

from typing import Callable

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
# backbones registered by plugins: name -> a builder (pretrained) -> a module with an `fc` head
BUILDERS: dict[str, Callable[[bool], nn.Module]] = {}
BACKBONES = STAGES.keys()  # a live view: a registered backbone is valid everywhere at once


def register_backbone(name: str, stages: tuple[str, str, str, str],
                      build: Callable[[bool], nn.Module] | None = None) -> None:
    """Make `name` a backbone: `stages` names the four modules whose outputs are its stages
    (strides 4, 8, 16, 32), `build(pretrained)` returns the network with a final `fc` layer
    (default: torchvision's model of that name). Then `backbone.name=<name>` works."""
    assert name not in STAGES, f"backbone {name!r} is registered twice"
    STAGES[name] = tuple(stages)
    if build is not None:
        BUILDERS[name] = build


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights were asked for but could not be loaded."""


def build_backbone(name: str, pretrained: bool, transform_input: bool | None = None) -> tuple[nn.Module, int]:
    """A torchvision backbone whose forward returns pooled features [N, F], and F.

    `transform_input` (GoogLeNet only) is whether the network re-normalises its input from the
    ImageNet statistics to those its ImageNet weights were trained with; None keeps torchvision's
    choice (True with ImageNet weights, False without). Passing the value a trained network had
    rebuilds it without its weights (pretrained=False) yet with the same preprocessing.
    """
    assert name in STAGES, name
    # GoogLeNet: torchvision drops the auxiliary heads itself after loading ImageNet weights
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" and not pretrained else {}
    weights = "DEFAULT" if pretrained else None
    try:
        model = BUILDERS[name](pretrained) if name in BUILDERS else torchvision.models.get_model(name, weights=weights, **kwargs)
    except Exception as error:  # no network, proxy, corrupt download: all mean the same to the user
        if not pretrained or name in BUILDERS:  # a plugin's builder: its own error says what went wrong
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
        if transform_input is not None:  # set afterwards: torchvision refuses it as an argument next to weights
            model.transform_input = transform_input
    else:
        assert not transform_input, f"{name} has no transform_input"
    return model, features


class _Tap:
    """Forward hook that stores its stage's output in `taps.outputs[index]`.

    An object, not a closure, so that `copy.deepcopy` of the hooked module copies it, and through
    deepcopy's memo its `taps` becomes the copy's own taps: a deep copy records into its own taps,
    never into the original's.
    """

    def __init__(self, taps: StageTaps, index: int):
        self.taps, self.index = taps, index

    def __call__(self, _module, _inputs, output):
        self.taps.outputs[self.index] = output


class StageTaps:
    """Forward hooks that keep the latest output of each named stage of a backbone.

    Deep copies of the backbone (or of the module owning it and these taps) come with their own
    hooks, taps and handles, all pointing at the copy (see `_Tap`). The hooks are plain Python
    side effects that torch.compile traces, so compiled and eager forwards tap the same outputs.
    """

    def __init__(self, backbone: nn.Module, stage_names: tuple[str, ...]):
        self.outputs: list[torch.Tensor | None] = [None] * len(stage_names)
        self._handles = [backbone.get_submodule(name).register_forward_hook(_Tap(self, i))
                         for i, name in enumerate(stage_names)]

    def remove(self) -> None:
        """Remove the hooks: later forwards record nothing, and `collect` then fails."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs = [None] * len(self.outputs)

    def collect(self) -> list[torch.Tensor]:
        """The stage outputs of the last forward pass; they are then forgotten."""
        outputs, self.outputs = self.outputs, [None] * len(self.outputs)
        assert all(o is not None for o in outputs), "a stage did not run"
        return outputs
