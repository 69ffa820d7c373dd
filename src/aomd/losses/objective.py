"""The training objective: a weighted sum of named terms (the `loss` config group).

    total = sum over terms of ratio_term * term(outputs of one training step)

Each term has one ratio key in the config (`loss.triplet_ratio`, `loss.aomd_ratio`, ...); a term
whose ratio is 0 is neither built nor computed, so any combination of terms is one override.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from aomd.losses.aomd import AdaptedAOMD
from aomd.losses.baselines import (
    AttentionTransferLoss,
    FitNetLoss,
    HardDarkRankLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    SimilarityPreservingLoss,
)
from aomd.losses.metric_learning import ContrastiveLoss, TripletLoss
from aomd.losses.samplers import NegativeSampler
from aomd.runtime import at_least_float32

# terms that compare the student with a teacher (the others train on labels alone)
DISTILLATION_TERMS = ("aomd", "sp", "at", "fitnet", "dark", "dist", "angle")


@dataclass
class StepOutputs:
    """What one training step produced, for the terms to read.

    embeddings: [N, E]; stages: four feature maps [N, C_l, H_l, W_l]; labels: [N].
    The teacher's entries are None when no term needs the teacher.
    """

    labels: torch.Tensor
    student_embeddings: torch.Tensor
    student_stages: list[torch.Tensor]
    teacher_embeddings: torch.Tensor | None = None
    teacher_stages: list[torch.Tensor] | None = None

    def with_float_embeddings(self) -> "StepOutputs":
        """The same outputs with both embeddings in float32 at least (a no-op when they already are)."""
        as_float = lambda e: None if e is None else at_least_float32(e)
        return replace(self, student_embeddings=as_float(self.student_embeddings),
                       teacher_embeddings=as_float(self.teacher_embeddings))


@dataclass(frozen=True)
class NetworkShape:
    """The sizes a distillation term needs to build its adapters or regressors."""

    stage_channels: tuple[int, ...]
    embedding_size: int


class Objective(nn.Module):
    """Weighted sum of the terms whose ratio is non-zero.

    Its parameters (AOMD adapters, FitNet regressors) belong to the student and are optimised
    with it. `forward` returns (total loss, {term name: unweighted term value}).
    """

    def __init__(
        self,
        sampler: NegativeSampler,
        student: NetworkShape,
        teacher: NetworkShape | None = None,
        *,
        triplet_ratio: float = 0.0,
        triplet_p: int = 2,
        contrastive_ratio: float = 0.0,
        margin: float = 0.2,
        aomd_ratio: float = 0.0,
        mode: int = 2,
        global_weight: float = 1.0,
        local_weight: float = 1.0,
        sp_ratio: float = 0.0,
        at_ratio: float = 0.0,
        fitnet_ratio: float = 0.0,
        dark_ratio: float = 0.0,
        dark_alpha: float = 2.0,
        dark_beta: float = 3.0,
        permute_len: int = 4,
        dist_ratio: float = 0.0,
        angle_ratio: float = 0.0,
    ):
        super().__init__()
        # name -> (ratio, builder of the loss module, which step outputs it reads)
        table: dict[str, tuple[float, Callable[[], nn.Module], Callable[[StepOutputs], tuple]]] = {
            "triplet": (triplet_ratio, lambda: TripletLoss(sampler, margin, triplet_p), _labelled),
            "contrastive": (contrastive_ratio, lambda: ContrastiveLoss(sampler, margin), _labelled),
            "aomd": (aomd_ratio,
                     lambda: AdaptedAOMD(student.stage_channels, teacher.stage_channels, mode, global_weight, local_weight),
                     lambda o: (o.teacher_stages, o.student_stages)),
            "sp": (sp_ratio, SimilarityPreservingLoss, _embeddings),
            "at": (at_ratio, AttentionTransferLoss, lambda o: (o.teacher_stages[1:], o.student_stages[1:])),
            "fitnet": (fitnet_ratio,
                       lambda: FitNetLoss([*student.stage_channels[1:], student.embedding_size],
                                          [*teacher.stage_channels[1:], teacher.embedding_size]),
                       lambda o: ([*o.teacher_stages[1:], o.teacher_embeddings],
                                  [*o.student_stages[1:], o.student_embeddings])),
            "dark": (dark_ratio, lambda: HardDarkRankLoss(dark_alpha, dark_beta, permute_len), _embeddings),
            "dist": (dist_ratio, RKDDistanceLoss, _embeddings),
            "angle": (angle_ratio, RKDAngleLoss, _embeddings),
        }
        assert set(DISTILLATION_TERMS) <= set(table)
        self.ratios: dict[str, float] = {}
        self.inputs: dict[str, Callable[[StepOutputs], tuple]] = {}
        self.terms = nn.ModuleDict()
        self.needs_teacher = False
        for name, (ratio, build, inputs) in table.items():
            if ratio == 0:
                continue
            distils = name in DISTILLATION_TERMS
            if distils and teacher is None:
                raise ValueError(f"loss.{name}_ratio is non-zero but no teacher was given.")
            self.ratios[name], self.inputs[name] = float(ratio), inputs
            self.terms[name] = build()
            self.needs_teacher |= distils
        if not self.terms:
            raise ValueError("Every loss ratio is 0, so there is nothing to train; set at least one loss.*_ratio.")

    @staticmethod
    def distils(loss_config) -> bool:
        """Whether a `loss` config has a non-zero distillation term (so a teacher is needed)."""
        return any(float(loss_config.get(f"{name}_ratio", 0) or 0) != 0 for name in DISTILLATION_TERMS)

    def forward(self, outputs: StepOutputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, {term: unweighted value}), both float32 whatever precision the networks ran in.

        The terms run outside autocast on float32 embeddings: distances, Gram matrices and
        rankings keep their numerics in a bf16/fp16 job. Stage maps stay in the networks'
        precision (copying them would cost memory); the terms that read them accumulate in
        float32 and run their own layers in the maps' precision (`aomd.runtime.in_feature_precision`).
        """
        outputs = outputs.with_float_embeddings()
        with torch.autocast(outputs.student_embeddings.device.type, enabled=False):
            values = {name: at_least_float32(term(*self.inputs[name](outputs))) for name, term in self.terms.items()}
        total = sum(self.ratios[name] * value for name, value in values.items())
        return total, values


def _labelled(o: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    return o.student_embeddings, o.labels


def _embeddings(o: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    return o.teacher_embeddings, o.student_embeddings
