"""The training objective: a weighted sum of named terms (the `loss` config group).

    total = sum over terms of ratio_term * term(outputs of one training step)

The terms are those registered in `aomd.losses.terms`; each has one ratio key in the config
(`loss.triplet_ratio`, `loss.aomd_ratio`, ...). A term whose ratio is 0 is neither built nor
computed, so any combination of terms is one override.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from aomd.errors import ConfigError
from aomd.losses.samplers import NegativeSampler
from aomd.losses.terms import TERMS, NetworkShape, StepOutputs, TermContext, distils, loss_defaults
from aomd.runtime import at_least_float32

__all__ = ["Objective", "NetworkShape", "StepOutputs"]


class Objective(nn.Module):
    """Weighted sum of the registered terms whose ratio is non-zero.

    Keyword arguments are the `loss` config's keys: `<term>_ratio` for every registered term and
    the terms' hyperparameters (`margin`, `mode`, ...); keys left out take their declared
    defaults. Its parameters (AOMD adapters, FitNet regressors) belong to the student and are
    optimised with it. `forward` returns (total loss, {term name: unweighted term value}).
    """

    def __init__(self, sampler: NegativeSampler | None, student: NetworkShape, teacher: NetworkShape | None = None,
                 **keys: Any):
        super().__init__()
        values = loss_defaults()
        unknown = sorted(set(keys) - set(values))
        if unknown:
            raise TypeError(f"unknown loss key(s) {', '.join(unknown)}; the known ones are {', '.join(values)}")
        values.update(keys)
        self.ratios: dict[str, float] = {}
        self.inputs: dict[str, Callable[[StepOutputs], tuple]] = {}
        self.terms = nn.ModuleDict()
        self.needs_teacher = False
        for name, term in TERMS.items():
            ratio = float(values[term.ratio_key])
            if ratio == 0:
                continue
            if term.distils and teacher is None:
                raise ConfigError(f"loss.{term.ratio_key} is non-zero but no teacher was given.")
            params = {h.name: values[h.name] for h in term.hyperparameters}
            self.ratios[name], self.inputs[name] = ratio, term.inputs
            self.terms[name] = term.build(TermContext(sampler, student, teacher, params))
            self.needs_teacher |= term.distils
        if not self.terms:
            raise ConfigError("Every loss ratio is 0, so there is nothing to train; set at least one loss.*_ratio.")

    @staticmethod
    def distils(loss_config) -> bool:
        """Whether a `loss` config has a non-zero distillation term (so a teacher is needed)."""
        return distils(loss_config)

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
