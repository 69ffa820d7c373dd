"""Extending aomd without editing it: a loss term, a dataset and a backbone registered by a plugin
module (`AOMD_PLUGINS`) with their config options in a folder of the user's
(`hydra.searchpath`), exactly as the README's "Extending aomd" recipes say."""
import json
import textwrap
from pathlib import Path

import pytest

from conftest import TINY, run_module
from test_config import assert_one_line_error

PLUGIN = '''
"""A toy loss term, a toy dataset and a ResNet-10 backbone, registered from outside the package."""
import numpy as np
import torch
import torchvision
from torch import nn

from aomd.data import RetrievalData
from aomd.data.splits import ImageSplit
from aomd.losses import Hyperparameter, LossTerm, register_term
from aomd.models.backbones import register_backbone
from aomd.schema import register_constructor


class MeanSimilarityLoss(nn.Module):
    """scale * mean over all pairs of e_i . e_j: pushes a batch's embeddings apart."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, embeddings, labels):
        return self.scale * (embeddings @ embeddings.t()).mean()


register_term(LossTerm(
    "toy", "the mean similarity of a batch", lambda c: MeanSimilarityLoss(c.params["toy_scale"]),
    lambda outputs: (outputs.student_embeddings, outputs.labels),
    (Hyperparameter("toy_scale", 1.0, "the term's scale", lambda v: v > 0, "must be positive"),),
))


def load_toy(num_classes: int = 8, images_per_class: int = 6, base_size: int = 40, image_size: int = 32) -> RetrievalData:
    """Random images, classes 0..n/2-1 train, the rest test."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), images_per_class)
    images = rng.integers(0, 256, (len(labels), base_size, base_size, 3), dtype=np.uint8)
    train = labels < num_classes // 2
    return RetrievalData("toy", ImageSplit(images[train], labels[train]), ImageSplit(images[~train], labels[~train]),
                         base_size, image_size)


register_constructor("dataset", "toy", load_toy)


def resnet10(pretrained: bool) -> nn.Module:
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


register_backbone("resnet10", ("layer1", "layer2", "layer3", "layer4"), resnet10)
'''

CONFIGS = {
    "dataset/toy.yaml": """
        # @package _global_
        defaults:
          - /schema/dataset/toy@dataset
          - _self_
        dataset:
          _target_: toy_plugin.load_toy
          num_classes: 12
          image_size: 32
        """,
    "backbone/resnet10.yaml": """
        name: resnet10
        pretrained: false
        """,
    "loss/toy.yaml": """
        defaults:
          - /objective@_here_
          - _self_
        toy_ratio: 1.0
        """,
}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> tuple[dict, str]:
    root = tmp_path_factory.mktemp("plugin")
    (root / "toy_plugin.py").write_text(PLUGIN)
    for name, text in CONFIGS.items():
        (root / "conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "conf" / name).write_text(textwrap.dedent(text))
    return {"AOMD_PLUGINS": "toy_plugin", "PYTHONPATH": str(root)}, f"hydra.searchpath=[file://{root / 'conf'}]"


@pytest.mark.slow
def test_a_plugin_term_is_validated(plugin, tmp_path):
    env, search = plugin
    common = (*TINY, "logger=none", search, f"hydra.run.dir={tmp_path}")
    assert_one_line_error(run_module("aomd.train", *common, "loss.toy_ratio=-1", env=env), "loss.toy_ratio must be 0 or more")
    assert_one_line_error(run_module("aomd.train", *common, "loss=toy", "loss.toy_scale=0", env=env),
                          "loss.toy_scale must be positive")
    assert_one_line_error(run_module("aomd.train", *common, "loss.toy_ratio=1"), "loss.toy_ratio", "not a key")
    # the two steps of the README's recipe, each forgotten: the one-line error names it
    assert_one_line_error(run_module("aomd.train", *common, "dataset=toy"), "Could not load 'schema/dataset/toy'",
                          "name its module in AOMD_PLUGINS")
    assert_one_line_error(run_module("aomd.train", *TINY, "logger=none", "dataset=toy", env=env),
                          "unknown dataset option 'toy'", "add its folder with hydra.searchpath=[file:///<folder>]")


def test_a_plugin_term_dataset_and_backbone_are_swept_and_trained(plugin, tmp_path):
    env, search = plugin
    result = run_module("aomd.train", "-m", *TINY, "logger=none", search, "dataset=toy", "backbone=resnet10",
                        "loss=toy", "loss.toy_ratio=0.5,1", "loss.triplet_ratio=1", "eval.recall_k=[1]",
                        f"hydra.sweep.dir={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [json.loads(path.read_text()) for path in sorted(Path(tmp_path).glob("*/metrics.json"))]
    assert [job["status"] for job in jobs] == ["finished", "finished"]
    assert all("loss/toy" in job["history"][1] and "loss/triplet" in job["history"][1] for job in jobs)
    assert jobs[0]["dataset"]["train_classes"] == 6 and "loss.toy_ratio=0.5" in jobs[0]["overrides"]
    config = (Path(tmp_path) / "0" / ".hydra" / "config.yaml").read_text()
    assert "resnet10" in config and "toy_plugin.load_toy" in config
