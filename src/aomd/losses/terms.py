"""Every term of the training objective, declared once.

A `LossTerm` holds all the project knows about a term: its name (its weight is the config key
`loss.<name>_ratio`, 0 = off), its hyperparameters (name, default and so type, the rule a value
must follow), whether it compares the student with a teacher, which outputs of a training step
it reads and how its module is built. Everything else derives from the registry `TERMS`:
the `loss` config schema with its defaults and types (`aomd.config`), the value checks
(`check_loss`), `aomd.losses.Objective` and the list of distillation terms.

Adding a term is one module class and one `register_term(LossTerm(...))`; to offer it as a
`loss=<option>` too, one YAML file in `conf/loss/`. A term defined outside this package is
registered by a module named in the `AOMD_PLUGINS` environment variable, which `aomd.config`
imports before it builds the schema (README, "Extending aomd").
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from aomd.errors import ConfigError
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


@dataclass
class StepOutputs:
    """What one training step produced, for the terms to read.

    embeddings: [N, E]; stages: four feature maps [N, C_l, H_l, W_l]; labels: [N], on the host in
    training (the samplers read them there without waiting for the device) or on the device.
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
    """The sizes a distillation term needs to build its adapters or regressors (and to check,
    before any work, that it can compare the two networks' maps)."""

    stage_channels: tuple[int, ...]
    embedding_size: int
    stage_sizes: tuple[tuple[int, int], ...] = ()   # each stage map's (height, width); () when not known


@dataclass(frozen=True)
class Hyperparameter:
    """A key of the `loss` config besides the ratios. Its type is that of its default; `valid`
    is the rule a value must follow and `rule` says it in words, for the error message."""

    name: str
    default: int | float
    help: str
    valid: Callable[[Any], bool] = lambda value: True
    rule: str = ""

    @property
    def type(self) -> type:
        return type(self.default)


@dataclass(frozen=True)
class TermContext:
    """What a term's builder gets: the negative sampler, the networks' shapes, its hyperparameters."""

    sampler: NegativeSampler | None
    student: NetworkShape
    teacher: NetworkShape | None
    params: Mapping[str, Any]


@dataclass(frozen=True)
class LossTerm:
    """One term of the objective; see the module docstring.

    build: TermContext -> the term's module, called as `module(*inputs(step_outputs))` -> scalar.
    check: optional rule across keys, (loss values, train section) -> an error message or None.
    """

    name: str
    help: str
    build: Callable[[TermContext], nn.Module]
    inputs: Callable[[StepOutputs], tuple]
    hyperparameters: tuple[Hyperparameter, ...] = ()
    distils: bool = False
    check: Callable[[Mapping[str, Any], Any], str | None] | None = field(default=None)

    @property
    def ratio_key(self) -> str:
        return f"{self.name}_ratio"


TERMS: dict[str, LossTerm] = {}


def register_term(term: LossTerm) -> LossTerm:
    """Add `term` to the registry. A hyperparameter several terms read (the margin) is declared
    by each of them with the same `Hyperparameter` object."""
    assert term.name not in TERMS, f"loss term {term.name!r} is registered twice"
    known = hyperparameters()
    for h in term.hyperparameters:
        assert known.get(h.name, h) == h, f"hyperparameter {h.name!r} is declared differently by two terms"
        assert h.name not in {t.ratio_key for t in TERMS.values()} | {term.ratio_key}, h.name
    TERMS[term.name] = term
    return term


def hyperparameters() -> dict[str, Hyperparameter]:
    """Every term's hyperparameters by name, in the order the terms were registered."""
    return {h.name: h for term in TERMS.values() for h in term.hyperparameters}


def loss_defaults() -> dict[str, int | float]:
    """Every key of the `loss` config and its default: each term's ratio (0.0), then its hyperparameters."""
    defaults: dict[str, int | float] = {}
    for term in TERMS.values():
        defaults[term.ratio_key] = 0.0
        for h in term.hyperparameters:
            defaults.setdefault(h.name, h.default)
    return defaults


def distillation_terms() -> tuple[str, ...]:
    return tuple(name for name, term in TERMS.items() if term.distils)


def distils(loss_values: Mapping[str, Any]) -> bool:
    """Whether `loss` values switch on a term that needs the teacher."""
    return any(float(loss_values.get(TERMS[name].ratio_key, 0) or 0) != 0 for name in distillation_terms())


def check_loss(loss: Mapping[str, Any], train: Any = None, prefix: str = "loss") -> None:
    """The value rules of a `loss` config (typed already; `prefix`: where it is, `loss` or the
    teacher's `teacher.loss`); a ConfigError naming the key."""
    ratios = {term.ratio_key: loss.get(term.ratio_key, 0.0) for term in TERMS.values()}
    negative = [f"{prefix}.{key}" for key, value in ratios.items() if value < 0]
    if negative:
        raise ConfigError(f"{', '.join(negative)} must be 0 or more (0 switches a term off).")
    if not any(value > 0 for value in ratios.values()):
        raise ConfigError(f"Every {prefix}.*_ratio is 0, so there is nothing to train; set one, e.g. {prefix}.triplet_ratio=1.")
    for h in hyperparameters().values():
        value = loss.get(h.name, h.default)
        if not h.valid(value):
            raise ConfigError(f"{prefix}.{h.name} {h.rule}, got {value}.")
    for term in TERMS.values():
        if term.check is not None and ratios[term.ratio_key] > 0:
            message = term.check(loss, train)
            if message:
                raise ConfigError(message)


# ---------------------------------------------------------------------------------------------
# the terms of this package (docs/methods.md, sections 2 to 4)

def _labelled(o: StepOutputs) -> tuple:
    return o.student_embeddings, o.labels


def _embeddings(o: StepOutputs) -> tuple:
    return o.teacher_embeddings, o.student_embeddings


_non_negative = lambda value: value >= 0
_positive = lambda value: value > 0
MARGIN = Hyperparameter("margin", 0.2, "the triplet and contrastive margin", _non_negative, "must be 0 or more")

register_term(LossTerm(
    "triplet", "triplet loss on the student's embeddings, with the `sampler` group's negatives",
    lambda c: TripletLoss(c.sampler, c.params["margin"], c.params["triplet_p"]), _labelled,
    (Hyperparameter("triplet_p", 2, "2: L2 triplet, 1: L1 triplet", lambda p: p in (1, 2), "must be 1 (L1) or 2 (L2)"),
     MARGIN),
))
register_term(LossTerm(
    "contrastive", "contrastive loss on the student's embeddings, with the `sampler` group's negatives",
    lambda c: ContrastiveLoss(c.sampler, c.params["margin"]), _labelled, (MARGIN,),
))


def _aomd_weights(loss: Mapping[str, Any], train: Any) -> str | None:
    if loss.get("global_weight", 1.0) + loss.get("local_weight", 1.0) <= 0:
        return ("loss.aomd_ratio is on but loss.global_weight and loss.local_weight are both 0; "
                "set one of them above 0.")
    return None


register_term(LossTerm(
    "aomd", "AOMD: mapping between consecutive stages, through adapters to the teacher's channels",
    lambda c: AdaptedAOMD(c.student.stage_channels, c.teacher.stage_channels, c.params["mode"],
                          c.params["global_weight"], c.params["local_weight"]),
    lambda o: (o.teacher_stages, o.student_stages),
    (Hyperparameter("mode", 2, "1: full mapping, 2: pooled mapping", lambda m: m in (1, 2),
                    "must be 1 (full mapping) or 2 (pooled mapping)"),
     Hyperparameter("global_weight", 1.0, "a, the weight of the global-descriptor terms", _non_negative, "must be 0 or more"),
     Hyperparameter("local_weight", 1.0, "b, the weight of the local-descriptor terms", _non_negative, "must be 0 or more")),
    distils=True, check=_aomd_weights,
))
register_term(LossTerm(
    "sp", "Similarity-Preserving (batch definition)", lambda c: SimilarityPreservingLoss(), _embeddings, distils=True,
))
def _attention_transfer(c: TermContext) -> AttentionTransferLoss:
    student, teacher = c.student.stage_sizes[1:], c.teacher.stage_sizes[1:]
    if student and teacher and student != teacher:
        raise ConfigError(f"Attention Transfer compares stages 2-4 of equal spatial sizes, but at this dataset.image_size "
                          f"the student's are {list(student)} and the teacher's {list(teacher)}; use an image size that "
                          f"is a multiple of 32, or a student and a teacher of one backbone family.")
    return AttentionTransferLoss()


register_term(LossTerm(
    "at", "Attention Transfer on stages 2-4", _attention_transfer,
    lambda o: (o.teacher_stages[1:], o.student_stages[1:]), distils=True,
))
register_term(LossTerm(
    "fitnet", "FitNet hints on stages 2-4 and the embedding (regressors are optimised with the student)",
    lambda c: FitNetLoss([*c.student.stage_channels[1:], c.student.embedding_size],
                         [*c.teacher.stage_channels[1:], c.teacher.embedding_size]),
    lambda o: ([*o.teacher_stages[1:], o.teacher_embeddings], [*o.student_stages[1:], o.student_embeddings]),
    distils=True,
))


def _permute_len_fits(loss: Mapping[str, Any], train: Any) -> str | None:
    if train is not None and loss["permute_len"] >= train.batch_size:
        return f"loss.permute_len ({loss['permute_len']}) must be smaller than train.batch_size ({train.batch_size})."
    return None


register_term(LossTerm(
    "dark", "DarkRank (hard): the teacher's ranking of each anchor's nearest, under Plackett-Luce",
    lambda c: HardDarkRankLoss(c.params["dark_alpha"], c.params["dark_beta"], c.params["permute_len"]), _embeddings,
    (Hyperparameter("dark_alpha", 2.0, "DarkRank's score scale alpha", _positive, "must be positive"),
     Hyperparameter("dark_beta", 3.0, "DarkRank's distance exponent beta", _positive, "must be positive"),
     Hyperparameter("permute_len", 4, "how many nearest samples DarkRank ranks", lambda n: n >= 1, "must be at least 1")),
    distils=True, check=_permute_len_fits,
))
register_term(LossTerm("dist", "RKD distance", lambda c: RKDDistanceLoss(), _embeddings, distils=True))
register_term(LossTerm("angle", "RKD angle", lambda c: RKDAngleLoss(), _embeddings, distils=True))
