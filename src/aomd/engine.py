"""The epoch loop: train steps on class-balanced batches, evaluation, checkpoints, tracking."""
from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

from aomd.data import RetrievalData
from aomd.data.augment import centre_crop, input_spec, normalise, train_transform
from aomd.data.loader import eval_loader, to_device, train_loader
from aomd.data.sampler import ClassBalancedBatchSampler
from aomd.data.splits import ImageSplit
from aomd.errors import UserError
from aomd.losses.objective import Objective, StepOutputs
from aomd.metrics import retrieval_metrics, selection_metric
from aomd.models import EmbeddingNet
from aomd.models.checkpoint import CheckpointWriter
from aomd import preemption
from aomd.preemption import StopSignals
from aomd.progress import progress_bar
from aomd import resume as resume_state
from aomd.runtime import InferenceGraph, Runtime, is_compiled
from aomd.schema import EvalSchema, TrainSchema

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


class OutOfDeviceMemory(UserError, RuntimeError):
    """A training or evaluation batch did not fit in the device's memory."""


def _out_of_memory(error: BaseException, what: str, batch_key: str, batch_size: int, runtime: Runtime,
                   hint: str = "") -> OutOfDeviceMemory:
    if runtime.precision == "fp32":
        hint += ", or train.precision=bf16 to halve the activations"
    return OutOfDeviceMemory(f"{runtime.device} ran out of memory during {what} with {batch_key}={batch_size} "
                             f"({runtime.precision}); lower {batch_key}{hint}.")


class Evaluator:
    """Test-split evaluation of any network, for all the epochs of a job.

    Embeds in batches of `eval_spec.batch_size` centre crops under the job's precision and
    inference mode; the metrics are computed on the device from float32 embeddings.

    With `keep_crops` (`eval.keep_crops`, see `keeps_crops`) the first evaluation keeps the split's
    uint8 centre crops and labels on the device, and later evaluations embed from them without
    the loader: the same batches, so the same embeddings, without reading and copying the split
    again after every epoch. Otherwise one persistent loader serves every evaluation.
    """

    def __init__(self, split: ImageSplit, image_size: int, eval_spec, runtime: Runtime, progress: bool = False,
                 keep_crops: bool = False):
        self.split, self.image_size, self.eval_spec, self.runtime, self.progress = split, image_size, eval_spec, runtime, progress
        self.keep_crops = keep_crops
        self.crops: torch.Tensor | None = None   # uint8 [N, s, s, 3] on the device, once kept
        self.labels: torch.Tensor | None = None  # int64 [N]
        self.loader = eval_loader(split, eval_spec.batch_size, runtime.num_workers, runtime.pin_memory)

    def _crop_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 centre crops [B, s, s, 3], labels [B]) of the split in order, on the device."""
        if self.crops is not None:
            size = self.eval_spec.batch_size
            for start in range(0, len(self.crops), size):
                yield self.crops[start : start + size], self.labels[start : start + size]
            return
        if self.keep_crops:  # filled in place: no second copy of the split at any time
            n, size = len(self.split), self.image_size
            kept_crops = torch.empty((n, size, size, 3), dtype=torch.uint8, device=self.runtime.device)
        start = 0
        for images, labels in to_device(self.loader, self.runtime.device):
            crops = centre_crop(images, self.image_size)
            if self.keep_crops:
                kept_crops[start : start + len(crops)] = crops
            start += len(crops)
            yield crops, labels
        if self.keep_crops:  # only a whole pass is kept (an evaluation stopped half-way fills it again)
            assert start == len(kept_crops), "the loader yields the whole split"
            self.crops, self.labels = kept_crops, torch.as_tensor(self.split.labels, device=self.runtime.device)

    @torch.inference_mode()
    def embed(self, model: EmbeddingNet, desc: str = "embed",
              should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings float32 [N, E] and labels [N] of the whole split, on the device. Raises
        EvaluationStopped before a batch when `should_stop()` is true."""
        was_training = model.training
        model.eval()
        compiled = is_compiled(model)
        embeddings, labels = [], []
        try:
            for crops, batch_labels in progress_bar(self._crop_batches(), enabled=self.progress, desc=desc, total=len(self.loader),
                                                    leave=False, unit="img", unit_scale=self.eval_spec.batch_size):
                if should_stop is not None and should_stop():
                    raise EvaluationStopped()
                count = len(crops)
                if compiled and count < self.eval_spec.batch_size:
                    # a compiled network runs one static shape: the short last batch is padded (in
                    # eval mode each image is embedded on its own) rather than compiled again
                    crops = torch.cat([crops, crops.new_zeros((self.eval_spec.batch_size - count, *crops.shape[1:]))])
                images = normalise(crops).contiguous(memory_format=self.runtime.memory_format)
                with self.runtime.autocast():
                    embeddings.append(model(images)[:count].float())
                labels.append(batch_labels)
        except torch.OutOfMemoryError as error:
            hint = " (or eval.keep_crops=false)" if self.keep_crops else ""
            raise _out_of_memory(error, "evaluation", "eval.batch_size", self.eval_spec.batch_size, self.runtime, hint) from None
        finally:
            model.train(was_training)
        return torch.cat(embeddings), torch.cat(labels)

    def __call__(self, model: EmbeddingNet, desc: str = "evaluate",
                 should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """{"recall@K": ..., "map@r": ..., "r_precision": ...} of `model` (docs/methods.md, metrics)."""
        embeddings, labels = self.embed(model, desc, should_stop)
        return retrieval_metrics(embeddings, labels, self.eval_spec.recall_k, self.eval_spec.chunk_size)


class EvaluationStopped(Exception):
    """A stop signal came while an epoch's evaluation ran: the job saves the epoch's steps and
    stops; the resumed job evaluates that epoch (an evaluation can take minutes on a CPU, longer
    than SLURM waits between its signal and the end of the job)."""


# kept crops may take up to this share of the card's memory (Cars196's test split at 224 px: 1.2 GB)
KEPT_CROPS_MEMORY_SHARE = 1 / 8


def keeps_crops(setting: bool | None, splits: list[ImageSplit], image_size: int, runtime: Runtime) -> bool:
    """Whether a job's evaluations keep the centre crops of `splits` (the test split, and the
    validation split with eval.select=val) on the device (`eval.keep_crops`): as set, or with
    null (auto) on CUDA when their uint8 crops together take at most KEPT_CROPS_MEMORY_SHARE of
    the card's memory; on the CPU the loader reads them again (CPU runs unchanged)."""
    if setting is not None:
        return bool(setting)
    if runtime.device.type != "cuda":
        return False
    return kept_crops_bytes(splits, image_size) <= KEPT_CROPS_MEMORY_SHARE * torch.cuda.get_device_properties(runtime.device).total_memory


def kept_crops_bytes(splits: list[ImageSplit], image_size: int) -> int:
    """The memory the uint8 centre crops [N, s, s, 3] of `splits` take."""
    return sum(len(split) for split in splits) * image_size * image_size * 3


def evaluate(model: EmbeddingNet, split: ImageSplit, image_size: int, eval_spec, runtime: Runtime,
             progress: bool = False) -> dict[str, float]:
    """The retrieval metrics of `model` on `split`, once (the network is moved to the device).

    Not compiled under `train.compile`: one pass over the split does not pay back a compilation."""
    runtime.place(model)
    return Evaluator(split, image_size, eval_spec, runtime, progress)(model)


def learning_rate(base: float, milestones, gamma: float, epoch: int) -> float:
    """The learning rate of `epoch` (numbered from 1): x `gamma` from each milestone epoch on, as
    the reference's command line means it (it steps MultiStepLR at the start of every epoch), so
    milestones [40, 60] give epochs 1-39 `base`, 40-59 `base` x gamma, 60- `base` x gamma^2."""
    return base * gamma ** sum(epoch >= milestone for milestone in milestones)


def adam(parameters, lr: float, weight_decay: float, runtime: Runtime) -> torch.optim.Adam:
    """The training's optimiser: Adam with L2 weight decay (the reference's), fused on CUDA."""
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=runtime.fused_optimizer or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimiser state, keeping this job's implementation of the update (fused on
    CUDA, for-loop on the CPU): `load_state_dict` would otherwise bring back the choice of the
    job that saved it, which may have run on another device or aomd version."""
    implementation = ("fused", "foreach", "capturable")
    own = [{key: group[key] for key in implementation if key in group} for group in optimizer.param_groups]
    assert len(own) == len(state["param_groups"]), "the saved optimiser has other parameter groups"
    optimizer.load_state_dict({**state, "param_groups": [{**saved, **mine} for saved, mine in zip(state["param_groups"], own)]})
    # `load_state_dict` moves the moments to their parameters' device but keeps the memory layout
    # they were saved in; fused Adam needs each parameter's own (on CUDA it refuses a mismatch, on
    # the CPU it would pair the wrong elements). A run resumed with another layout (channels_last
    # on or off, compiled or not, the CPU's standard layout resumed on a card) gets them restrided.
    for parameter, moments in optimizer.state.items():
        for key, value in moments.items():
            if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                moments[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


class TrainStep:
    """One optimisation step of `aomd.train`, from a uint8 batch on the device to updated weights:
    augmentation (random crop + flip), teacher forward under inference mode, student forward
    (both under the job's precision), the objective, backward (loss-scaled in fp16), optimiser step.
    The labels may stay on the host, where `fit` keeps them (`aomd.losses.samplers`).

    Returns (loss, {term: value}), detached, on the device: reading them is the caller's choice,
    so a step never waits for the device to finish.
    """

    def __init__(self, student: EmbeddingNet, objective: Objective, optimizer: torch.optim.Optimizer, runtime: Runtime,
                 image_size: int, seed: int = 0, teacher: EmbeddingNet | None = None, decay_unreached: bool = True):
        assert teacher is not None or not objective.needs_teacher, "the objective needs a teacher"
        self.student, self.objective, self.optimizer, self.runtime = student, objective, optimizer, runtime
        self.image_size = image_size
        # the reference computes switched-off terms times 0, so every parameter gets a gradient
        # (zero where no active term reaches it) and the optimiser's weight decay moves it; a
        # parameter without a gradient (None) would be skipped and keep its initial weights
        self.decay_unreached = decay_unreached
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = runtime.grad_scaler()
        self.augment_rng = torch.Generator().manual_seed(seed)
        self.teacher_forward = None
        if teacher is not None and objective.needs_teacher:
            frozen = runtime.frozen_copy(teacher)
            self.teacher_forward = (InferenceGraph(frozen.forward_with_stages, runtime) if runtime.cuda_graphs
                                    else frozen.forward_with_stages)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        runtime = self.runtime
        images = train_transform(images, self.image_size, self.augment_rng).contiguous(memory_format=runtime.memory_format)
        teacher_embeddings = teacher_stages = None
        with runtime.autocast():
            if self.teacher_forward is not None:
                with torch.inference_mode():
                    teacher_embeddings, teacher_stages = self.teacher_forward(images)
            embeddings, stages = self.student.forward_with_stages(images)
        loss, terms = self.objective(StepOutputs(labels, embeddings, stages, teacher_embeddings, teacher_stages))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.decay_unreached:
            for parameter in self.parameters:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), {name: value.detach() for name, value in terms.items()}


def epoch_batches(loader: DataLoader, skip: int = 0) -> tuple[dict[str, Any], Iterator[tuple[torch.Tensor, ...]]]:
    """Start an epoch of the training `loader`: (its batch sampler's state at the epoch's start,
    for `last.pt`; the epoch's batches). A loader with workers (CUDA's default; none on the CPU)
    has them read the first batches at once (their prefetch), so an epoch started before the
    evaluation of the previous one finds its first batches ready; without workers nothing is read
    before the first batch is asked for. With `skip`, the epoch yields only its batches after the
    first `skip` (a run resumed in the middle of it)."""
    sampler = loader.sampler
    assert isinstance(sampler, ClassBalancedBatchSampler), "a training loader (aomd.data.loader.train_loader)"
    state = resume_state.sampler_state(sampler)  # before the workers' prefetch draws the first batches
    sampler.skip(skip)
    return state, iter(loader)


def fit(
    student: EmbeddingNet,
    objective: Objective,
    data: RetrievalData,
    recipe: TrainSchema,
    eval_spec: EvalSchema,
    runtime: Runtime,
    out_dir: Path,
    on_epoch: Callable[[dict[str, Any], bool], None],
    teacher: EmbeddingNet | None = None,
    best_from_epoch: int = 0,
    identity: str = "",
    resume: dict[str, Any] | None = None,
    on_restore: Callable[[list[dict[str, Any]], dict[str, Any] | None], None] | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `student` with `objective` for `recipe.epochs` epochs on `runtime`; return the best record.

    `resume` is a `last.pt` payload of this job (`aomd.resume.read_state`): the run continues
    after its epoch, exactly as if it had not stopped, and `on_restore(history, best)` hands the
    records so far to the tracker. Every `last.pt` holds the training state under `training`,
    tagged with `identity` and `checkpoint_extra` (the W&B run id).

    The learning rate of every epoch is `learning_rate` (the reference's milestones). Evaluates the
    test split (and with `eval_spec.select == "val"` the validation split, as `val/...`) at epoch 0
    and after every epoch; each record (epoch, mean training loss and term values, lr, Recall@K,
    MAP@R, R-Precision) goes to `on_epoch(record, is_best)`. The selected epoch (`is_best`) is,
    among epochs >= `best_from_epoch`: the best test Recall@1 (select "test", the reference's
    practice), the best validation Recall@1 ("val") or the last ("last"). Writes
    `checkpoints/best.pt` (the selected epoch) and `checkpoints/last.pt` under `out_dir`, from a
    background thread while training goes on (`CheckpointWriter`); both are on disk when fit returns.
    A newly selected epoch is written to `best.next.pt` and becomes `best.pt` only once the
    `last.pt` that records it as the best is on disk: a job killed in between (SIGKILL, a lost
    node) resumes from the earlier `last.pt` with the `best.pt` that goes with it
    (`settle_next_best`), never with a `best.pt` of an epoch it trains again.

    A stop signal (SIGTERM, SIGINT, SIGUSR1, SLURM's SIGUSR2: `aomd.preemption`) waits for the step in
    progress (or the evaluation), then `last.pt` is written with the place in the epoch
    (`partial`) and the signal takes effect; resuming from it skips the batches already trained on.
    """
    train, device = recipe, runtime.device
    runtime.forget_compiled_graphs()
    torch.manual_seed(train.seed)  # the samplers' draws repeat whether or not a teacher was trained first
    runtime.prepare_network(student).train()
    runtime.prepare_objective(objective).train()
    if teacher is not None:
        runtime.prepare_network(teacher).eval()
    parameters = [*student.parameters(), *objective.parameters()]  # adapters and regressors learn too
    optimizer = adam(parameters, train.lr, train.weight_decay, runtime)
    step = TrainStep(student, objective, optimizer, runtime, data.image_size, seed=train.seed, teacher=teacher,
                     decay_unreached=train.decay_unreached)
    loader = train_loader(data.train, train.batch_size, train.images_per_class, train.iters_per_epoch,
                          seed=train.seed, num_workers=runtime.num_workers, pin_memory=runtime.pin_memory)
    evaluated = [data.test]
    if eval_spec.select == "val":
        assert data.val is not None, "eval.select=val needs the validation split (aomd.data.splits.hold_out_validation)"
        evaluated.append(data.val)
    keep_crops = keeps_crops(eval_spec.keep_crops, evaluated, data.image_size, runtime)
    if keep_crops:
        log.info("Evaluations after the first embed %d centre crops kept on %s (%.2f GB; eval.keep_crops=false reads them "
                 "again every time).", sum(map(len, evaluated)), device, kept_crops_bytes(evaluated, data.image_size) / 1e9)

    def evaluator_of(split: ImageSplit) -> Evaluator:
        return Evaluator(split, data.image_size, eval_spec, runtime, train.progress, keep_crops=keep_crops)

    evaluator = evaluator_of(data.test)
    validator = evaluator_of(data.val) if eval_spec.select == "val" else None
    checkpoints = Path(out_dir) / "checkpoints"
    network_input = input_spec(data.name, data.base_size, data.image_size)  # what aomd.load_model's users must feed
    selected_by = selection_metric(eval_spec.recall_k, eval_spec.select)

    best_from_epoch = min(best_from_epoch, train.epochs)
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    scaler = step.scaler
    sampler = loader.sampler

    next_best_written = False  # best.next.pt holds the selected epoch, not yet best.pt

    def save_last(epoch: int, sampler_state: dict[str, Any], partial: dict[str, Any] | None = None) -> None:
        """`last.pt` after the finished `epoch`; with `partial`, also the steps so far of the epoch
        after it (and `sampler_state` is the sampler's state at that epoch's start). A selected
        epoch waiting in best.next.pt becomes best.pt once last.pt is on disk."""
        nonlocal next_best_written
        training = {"epoch": epoch, "identity": identity, "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "best": best, "history": history, "partial": partial,
                    "random": resume_state.random_states(sampler_state, step.augment_rng), **(checkpoint_extra or {})}
        writer.save(checkpoints / LAST, student, metrics=history[-1] if history else None,
                    objective=objective.state_dict(), training=training, input=network_input,
                    then_rename=(checkpoints / NEXT_BEST, checkpoints / BEST) if next_best_written else None)
        next_best_written = False

    def stop_after_saving(where: str) -> None:
        try:
            writer.wait()  # last.pt on disk before the signal acts (submitit requeues the job from it)
        except Exception as error:  # noqa: BLE001 - a full disk: the signal still acts, or the job is not requeued
            log.error("Could not write %s (%s: %s); the job stops as asked and continues from the last one written "
                      "before.", checkpoints / LAST, type(error).__name__, error)
        stop.stop(where, str(checkpoints / LAST))

    def evaluate_epoch(epoch: int, losses: dict[str, float], should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        nonlocal best, next_best_written
        record = {"epoch": epoch, **losses, **evaluator(student, should_stop=should_stop)}
        if validator is not None:
            record.update({f"val/{key}": value for key, value in validator(student, "validate", should_stop).items()})
        is_best = epoch >= best_from_epoch and (
            best is None or eval_spec.select == "last" or record[selected_by] > best[selected_by])
        if is_best:
            best = record
            # epoch 0 is evaluated before any last.pt: a job killed before its first starts over
            writer.save(checkpoints / (BEST if epoch == 0 else NEXT_BEST), student, metrics=record,
                        objective=objective.state_dict(), input=network_input)
            next_best_written = epoch > 0
        history.append(record)
        on_epoch(record, is_best)
        return record

    partial = None
    preemption.last_stop = None
    # the writer waits for its writes before the signals' handlers go (its exit runs first)
    with StopSignals() as stop, CheckpointWriter() as writer:
        settle_next_best(checkpoints, resume)
        if resume is None:
            evaluate_epoch(0, {})
            first_epoch = 1
            if stop.requested:
                save_last(0, resume_state.sampler_state(sampler))
                stop_after_saving("after the evaluation before training")
        else:
            training = resume["training"]
            student.load_state_dict(resume["model"])
            objective.load_state_dict(resume["objective"])
            load_optimizer_state(optimizer, training["optimizer"])
            if training["scaler"]:  # empty when saved in fp32 or bf16: resumed in fp16, the scaler starts afresh
                scaler.load_state_dict(training["scaler"])
            best, history = training["best"], list(training["history"])
            resume_state.restore_random_states(training["random"], sampler, step.augment_rng)
            partial = training.get("partial")
            first_epoch = training["epoch"] + 1
            assert partial is None or partial["epoch"] == first_epoch, "a partial epoch follows the last finished one"
            if partial is None:
                log.info("Resuming after epoch %d of %d.", training["epoch"], train.epochs)
            else:
                log.info("Resuming in epoch %d of %d after step %d of %d.", first_epoch, train.epochs,
                         partial["steps"], train.iters_per_epoch)
            if on_restore is not None:
                on_restore(history, best)
        upcoming = None  # the next epoch's (sampler state at its start, batches), once its reading started
        for epoch in range(first_epoch, train.epochs + 1):
            # running sums stay on the device: no host synchronisation per step
            sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
            steps_done, seconds_before = 0, 0.0
            if partial is not None:  # resumed in the middle of this epoch
                steps_done, seconds_before = partial["steps"], partial["seconds"]
                sums.update({name: total.to(device) for name, total in partial["sums"].items()})
                partial = None
            if upcoming is None:  # this process's first epoch
                writer.wait()  # the loader's workers fork at its first batch: not while the writer's thread works
                upcoming = epoch_batches(loader, skip=steps_done)
            (epoch_start, batches), upcoming = upcoming, None
            started = time.perf_counter()
            bar = progress_bar(to_device(batches, device, labels_on_host=True), enabled=train.progress,
                               desc=f"epoch {epoch}/{train.epochs}", total=train.iters_per_epoch, initial=steps_done,
                               leave=False, unit="img", unit_scale=train.batch_size)
            lr = learning_rate(train.lr, train.lr_decay_epochs, train.lr_decay_gamma, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            shown = None
            try:
                for index, (images, labels) in enumerate(bar, start=steps_done + 1):
                    loss, terms = step(images, labels)
                    sums["loss"] += loss
                    for name, value in terms.items():
                        sums[f"loss/{name}"] += value
                    if stop.requested:
                        save_last(epoch - 1, epoch_start, {
                            "epoch": epoch, "steps": index, "sums": {name: total.cpu() for name, total in sums.items()},
                            "seconds": seconds_before + time.perf_counter() - started})
                        stop_after_saving(f"in epoch {epoch} after step {index} of {train.iters_per_epoch}")  # may return
                    if train.progress and index % 10 == 0:
                        # the loss of ten steps ago is long computed: reading it does not stall the device
                        if shown is not None:
                            bar.set_postfix(loss=f"{shown.item():.4f}", refresh=False)  # shown at the bar's next update
                        shown = loss
            except torch.OutOfMemoryError as error:
                hint = " (or eval.keep_crops=false to free the kept evaluation crops)" if keep_crops else ""
                raise _out_of_memory(error, "training", "train.batch_size", train.batch_size, runtime, hint) from None
            means = {name: total.item() / train.iters_per_epoch for name, total in sums.items()}
            if not math.isfinite(means["loss"]):
                raise TrainingDiverged(f"The training loss became {means['loss']} in epoch {epoch}; lower train.lr or the loss ratios.")
            means["lr"] = lr
            means["epoch_seconds"] = seconds_before + time.perf_counter() - started
            means["images_per_second"] = train.iters_per_epoch * train.batch_size / means["epoch_seconds"]
            if epoch < train.epochs:
                # the loader's workers (if any) read the next epoch's first batches while the device evaluates
                upcoming = epoch_batches(loader)
            next_epoch_start = upcoming[0] if upcoming else resume_state.sampler_state(sampler)
            while True:
                try:
                    evaluate_epoch(epoch, means, should_stop=lambda: stop.requested is not None)
                    break
                except EvaluationStopped:  # saved as an epoch whose steps are done: the resumed job evaluates it
                    save_last(epoch - 1, epoch_start, {
                        "epoch": epoch, "steps": train.iters_per_epoch, "sums": {name: total.cpu() for name, total in sums.items()},
                        "seconds": means["epoch_seconds"]})
                    stop_after_saving(f"in the evaluation of epoch {epoch} (its {train.iters_per_epoch} steps done)")  # may return
            save_last(epoch, next_epoch_start)
            if stop.requested:  # after the evaluation's last batch: the state after the epoch is saved
                stop_after_saving(f"after epoch {epoch}")
        if train.epochs == 0:
            save_last(0, resume_state.sampler_state(sampler))
    return best


BEST, NEXT_BEST, LAST = "best.pt", "best.next.pt", "last.pt"


def settle_next_best(checkpoints: Path, resume: dict[str, Any] | None) -> None:
    """Finish or undo the step from best.next.pt to best.pt that a killed job left half done: the
    resumed `last.pt` (`resume`) records that epoch as the best (its best.pt is then best.next.pt),
    or it does not (the epoch is trained again, and best.pt is still the best of what it records)."""
    next_best = checkpoints / NEXT_BEST
    if not next_best.is_file():
        return
    selected = ((resume or {}).get("training") or {}).get("best") or {}
    try:
        waiting = torch.load(next_best, map_location="cpu", weights_only=True)["metrics"]
    except Exception:  # noqa: BLE001 - killed while it was written: not the best of anything resumed
        waiting = None
    if waiting is not None and selected.get("epoch") == waiting.get("epoch") and resume is not None:
        log.info("Completing %s: %s holds epoch %d, which %s records as the best.", checkpoints / BEST, next_best,
                 waiting["epoch"], LAST)
        os.replace(next_best, checkpoints / BEST)
    else:
        next_best.unlink()
