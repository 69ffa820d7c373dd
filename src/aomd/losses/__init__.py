"""Losses: triplet and contrastive with their negative samplers, AOMD, the distillation
baselines, and the weighted objective that combines them."""
from aomd.losses.aomd import AdaptedAOMD, AOMDLoss, StageAdapters
from aomd.losses.baselines import (
    AttentionTransferLoss,
    FitNetLoss,
    HardDarkRankLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    SimilarityPreservingLoss,
)
from aomd.losses.metric_learning import ContrastiveLoss, TripletLoss
from aomd.losses.objective import NetworkShape, Objective, StepOutputs
from aomd.losses.terms import TERMS, Hyperparameter, LossTerm, TermContext, register_term
from aomd.losses.samplers import (
    AllNegatives,
    DistanceWeightedNegatives,
    HardNegatives,
    NegativeSampler,
    RandomNegatives,
    SemiHardNegatives,
)

__all__ = [
    "AOMDLoss", "AdaptedAOMD", "StageAdapters", "AttentionTransferLoss", "FitNetLoss", "HardDarkRankLoss",
    "RKDAngleLoss", "RKDDistanceLoss", "SimilarityPreservingLoss", "ContrastiveLoss", "TripletLoss",
    "NetworkShape", "Objective", "StepOutputs", "AllNegatives", "DistanceWeightedNegatives",
    "HardNegatives", "NegativeSampler", "RandomNegatives", "SemiHardNegatives",
    "TERMS", "Hyperparameter", "LossTerm", "TermContext", "register_term",
]
