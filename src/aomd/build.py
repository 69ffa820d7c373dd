"""Builds the parts of a job from its validated config nodes: data, objective (with its sampler)."""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from aomd.config import check_test_size
from aomd.data import RetrievalData
from aomd.data.errors import DatasetError
from aomd.data.splits import hold_out_validation
from aomd.errors import ConfigError
from aomd.losses.objective import NetworkShape, Objective
from aomd.models import EmbeddingNet

log = logging.getLogger(__name__)


def instantiate_node(node, what: str, **objects: Any) -> Any:
    """Instantiate a config node's `_target_` with `objects` (built Python objects) as extra
    arguments. Keys the constructor does not take, or required ones it misses, are a ConfigError;
    errors raised while the object is built (decoding, a file) are the object's own."""
    try:
        # partial first: Hydra would turn the extra objects into configs if passed to instantiate
        factory = instantiate(node, _partial_=True, _convert_="all")
    except InstantiationException as error:
        raise ConfigError(f"The {what} config could not be built: {_first_line(error.__cause__ or error)}") from None
    try:
        inspect.signature(factory.func).bind(*factory.args, **{**factory.keywords, **objects})
    except TypeError as error:
        raise ConfigError(f"The {what} config could not be built: {error}.") from None
    return factory(**objects)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0]


def network_shape(model: EmbeddingNet, image_size: int) -> NetworkShape:
    shapes = model.stage_shapes(image_size)
    return NetworkShape(tuple(c for c, _, _ in shapes), model.architecture.embedding_size, tuple((h, w) for _, h, w in shapes))


def build_objective(loss, sampler, student: EmbeddingNet, teacher: EmbeddingNet | None, image_size: int) -> Objective:
    """The Objective of a `loss` node, with the negative sampler of a `sampler` node."""
    return instantiate_node(
        loss, "loss",
        sampler=instantiate_node(sampler, "sampler"),
        student=network_shape(student, image_size),
        teacher=None if teacher is None else network_shape(teacher, image_size),
    )


def build_dataset(dataset, **options: Any) -> RetrievalData:
    """The RetrievalData of a `dataset` node (its loader's `options` added), its cache built if needed."""
    try:
        return instantiate_node(dataset, "dataset", **options)
    except PermissionError as error:  # the cache's own folder is aomd.data.cache's error, with its own advice
        raise DatasetError(f"Cannot read {os.fsdecode(error.filename or '') or 'the dataset'} ({error.strerror}); "
                           "give this user read access to the dataset, or point dataset.root to a copy it can read.") from None


def load_data(dataset, batch_size: int | None, eval_spec) -> RetrievalData:
    """The data of a `dataset` node, checked against the training batch size (None: not for
    training) and `eval.recall_k`; with `eval.select=val`, `eval.val_classes` training classes
    (default a fifth, at least 2) are held out as the validation split."""
    data = build_dataset(dataset)
    if eval_spec.select == "val" and batch_size is not None:
        classes = data.train.num_classes
        held_out = eval_spec.val_classes or max(2, round(classes / 5))  # one class would score 100% every epoch
        if held_out >= classes - 1:
            raise ConfigError(f"eval.val_classes ({held_out}) leaves fewer than 2 of the {classes} training classes "
                              f"of {data.name} to train on; hold out fewer.")
        data = hold_out_validation(data, held_out)
    summary = data.summary()
    log.info("%s: %d train images of %d classes, %d test images of %d classes", data.name,
             summary["train_images"], summary["train_classes"], summary["test_images"], summary["test_classes"])
    if summary["train_classes"] < 2:  # first: a dataset of your own with one class would read as a batch too large
        raise ConfigError(f"The {data.name} train split has {summary['train_images']} images of "
                          f"{summary['train_classes']} class{'es' * (summary['train_classes'] != 1)}; training needs at least 2 classes, check dataset.root and the dataset settings.")
    if batch_size is not None and summary["train_images"] < batch_size:
        raise ConfigError(f"train.batch_size ({batch_size}) is larger than the {data.name} train split "
                          f"({summary['train_images']} images); use a smaller batch.")
    check_test_size(eval_spec.recall_k, summary["test_images"])
    if data.val is not None:
        check_test_size(eval_spec.recall_k, summary["val_images"], "validation")
    return data
