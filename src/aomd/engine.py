"""The epoch loop: train steps on class-balanced batches, evaluation, checkpoints, tracking."""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from aomd.config import selection_metric
from aomd.data import RetrievalData
from aomd.data.augment import eval_transform, train_transform
from aomd.data.loader import eval_loader, train_loader
from aomd.data.splits import ImageSplit
from aomd.errors import UserError
from aomd.losses.objective import Objective, StepOutputs
from aomd.metrics import retrieval_metrics
from aomd.models import EmbeddingNet, save_checkpoint

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def embed(model: EmbeddingNet, split: ImageSplit, image_size: int, batch_size: int, device: torch.device,
          num_workers: int = 0, progress: bool = False, desc: str = "embed") -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [N, E] and labels [N] of a whole split (centre crops, eval mode), on `device`."""
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    for images, batch_labels in tqdm(eval_loader(split, batch_size, num_workers), desc=desc, leave=False, disable=None if progress else True):
        embeddings.append(model(eval_transform(images.to(device, non_blocking=True), image_size)))
        labels.append(batch_labels.to(device))
    model.train(was_training)
    return torch.cat(embeddings), torch.cat(labels)


def evaluate(model: EmbeddingNet, split: ImageSplit, image_size: int, eval_cfg: DictConfig, device: torch.device,
             num_workers: int = 0, progress: bool = False) -> dict[str, float]:
    """{"recall@K": ..., "map@r": ..., "r_precision": ...} of `model` on `split` (METHODS.md section 5)."""
    embeddings, labels = embed(model, split, image_size, eval_cfg.batch_size, device, num_workers, progress, "evaluate")
    return retrieval_metrics(embeddings, labels, eval_cfg.recall_k, eval_cfg.chunk_size)


def fit(
    student: EmbeddingNet,
    objective: Objective,
    data: RetrievalData,
    cfg: DictConfig,
    out_dir: Path,
    on_epoch: Callable[[dict[str, Any], bool], None],
    teacher: EmbeddingNet | None = None,
    best_from_epoch: int = 0,
) -> dict[str, Any]:
    """Train `student` with `objective` for `cfg.train.epochs` epochs; return the best record.

    Evaluates the test split at epoch 0 and after every epoch; each record (epoch, mean training
    loss and term values, Recall@K, MAP@R, R-Precision) goes to `on_epoch(record, is_best)`.
    Writes `checkpoints/best.pt` (best test Recall@1 among epochs >= `best_from_epoch`, or epoch 0
    when nothing was trained) and `checkpoints/last.pt` under `out_dir`.
    """
    train, device = cfg.train, resolve_device(cfg.train.device)
    torch.manual_seed(train.seed)  # the samplers' draws repeat whether or not a teacher was trained first
    student.to(device).train()
    objective.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    parameters = [*student.parameters(), *objective.parameters()]  # adapters and regressors learn too
    optimizer = torch.optim.Adam(parameters, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(train.lr_decay_epochs), train.lr_decay_gamma)
    loader = train_loader(data.train, train.batch_size, train.images_per_class, train.iters_per_epoch,
                          seed=train.seed, num_workers=train.num_workers, pin_memory=train.pin_memory)
    augment_rng = torch.Generator().manual_seed(train.seed)
    checkpoints = Path(out_dir) / "checkpoints"
    first_metric = selection_metric(cfg.eval)

    best_from_epoch = min(best_from_epoch, train.epochs)
    best: dict[str, Any] | None = None

    def evaluate_epoch(epoch: int, losses: dict[str, float]) -> dict[str, Any]:
        nonlocal best
        record = {"epoch": epoch, **losses, **evaluate(student, data.test, data.image_size, cfg.eval, device,
                                                      train.num_workers, train.progress)}
        is_best = epoch >= best_from_epoch and (best is None or record[first_metric] > best[first_metric])
        if is_best:
            best = record
            save_checkpoint(checkpoints / "best.pt", student, metrics=record, objective=objective.state_dict())
        on_epoch(record, is_best)
        return record

    evaluate_epoch(0, {})
    for epoch in range(1, train.epochs + 1):
        # running sums stay on the device: no host synchronisation per step
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{train.epochs}", leave=False, disable=None if train.progress else True)
        for step, (images, labels) in enumerate(bar):
            images = train_transform(images.to(device, non_blocking=True), data.image_size, augment_rng)
            labels = labels.to(device, non_blocking=True)
            teacher_embeddings = teacher_stages = None
            if objective.needs_teacher:
                with torch.no_grad():
                    teacher_embeddings, teacher_stages = teacher.forward_with_stages(images)
            embeddings, stages = student.forward_with_stages(images)
            loss, terms = objective(StepOutputs(labels, embeddings, stages, teacher_embeddings, teacher_stages))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.detach()
            for name, value in terms.items():
                sums[f"loss/{name}"] += value.detach()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        scheduler.step()
        means = {name: total.item() / train.iters_per_epoch for name, total in sums.items()}
        if not math.isfinite(means["loss"]):
            raise TrainingDiverged(f"The training loss became {means['loss']} in epoch {epoch}; lower train.lr or the loss ratios.")
        means["epoch_seconds"] = time.perf_counter() - started
        record = evaluate_epoch(epoch, means)
        save_checkpoint(checkpoints / "last.pt", student, metrics=record, objective=objective.state_dict())
    if train.epochs == 0:
        save_checkpoint(checkpoints / "last.pt", student, metrics=best, objective=objective.state_dict())
    return best
