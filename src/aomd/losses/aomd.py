"""AOMD: architecture oriented mapping distillation (docs/methods.md, section 3)."""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from aomd.runtime import in_feature_precision


def match_spatial(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps [N, C, H, W] to the other's spatial size."""
    if teacher.shape[-2:] == student.shape[-2:]:
        return teacher, student
    if teacher.shape[-2] * teacher.shape[-1] > student.shape[-2] * student.shape[-1]:
        return F.adaptive_avg_pool2d(teacher, student.shape[-2:]), student
    return teacher, F.adaptive_avg_pool2d(student, teacher.shape[-2:])


def _descriptors_at(feats: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global [N, C], local [N, h*w]) of a stage whose map `feats` [N, C, H, W] was pooled to
    `pooled` [N, C, h, w] (`match_spatial`): the global descriptor over the map's own H, W, the
    local one at the pooled size. Pooling to an uneven size averages overlapping bins, whose mean
    is not the map's."""
    if pooled is feats:
        return stage_descriptors(feats)
    return stage_descriptors(feats)[0], stage_descriptors(pooled)[1]


class _StageDescriptors(torch.autograd.Function):
    """(global [N, C], local [N, H*W]) of a feature map [N, C, H, W], with a fused backward.

    Autograd's own backward of the two means would write two map-sized gradients and add them;
    this writes the map's gradient once: grad = g_global / (H W) (broadcast over H, W)
    + g_local / C (broadcast over C).
    """

    @staticmethod
    def forward(ctx, feats: torch.Tensor):
        ctx.shape, ctx.dtype, ctx.device, ctx.memory_format = feats.shape, feats.dtype, feats.device, _memory_format(feats)
        return _descriptor_means(feats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_global, grad_local):
        n, c, h, w = ctx.shape
        # autograd hands both gradients (zeros for an unused descriptor); their sum is written
        # once, straight into the map's own layout: a channels_last network gets a channels_last
        # gradient (the sum of the two broadcasts would come out in the standard layout and need
        # a second, map-sized copy)
        global_part = (grad_global / (h * w)).to(ctx.dtype)[:, :, None, None].expand(n, c, h, w)
        local_part = (grad_local / c).to(ctx.dtype).reshape(n, 1, h, w).expand(n, c, h, w)
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device, memory_format=ctx.memory_format)
        return torch.add(global_part, local_part, out=grad)


def _descriptor_means(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over H, W [N, C], mean over C [N, H*W]) of [N, C, H, W] maps, in float32 at least:
    bf16/fp16 maps accumulate in float32 without a copy of the map."""
    dtype = torch.promote_types(feats.dtype, torch.float32)
    return feats.mean((2, 3), dtype=dtype), feats.mean(1, dtype=dtype).flatten(1)


def _memory_format(feats: torch.Tensor) -> torch.memory_format:
    channels_last = feats.dim() == 4 and not feats.is_contiguous() and feats.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def stage_descriptors(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global descriptor g = mean over H, W [N, C] and local descriptor q = mean over C [N, H*W],
    in float32 at least whatever the map's dtype (the mapping terms nearly cancel and need the precision)."""
    return _StageDescriptors.apply(feats)


def full_mapping_term(x_s, y_s, x_t, y_t) -> torch.Tensor:
    """Mode 1: mean over N * Dy * Dx entries of (y_s x_s^T - y_t x_t^T)^2, without the outer product.

    Per sample ||y_s x_s^T - y_t x_t^T||_F^2 = |y_s|^2 |x_s|^2 - 2 (y_s . y_t)(x_s . x_t) + |y_t|^2 |x_t|^2.
    x: bottom descriptors [N, Dx], y: top descriptors [N, Dy]. The dot products are taken in
    float64 because the three terms nearly cancel when student and teacher agree.
    """
    dtype = x_s.dtype
    x_s, y_s, x_t, y_t = (v.double() for v in (x_s, y_s, x_t, y_t))
    per_sample = (
        (y_s * y_s).sum(1) * (x_s * x_s).sum(1)
        - 2.0 * (y_s * y_t).sum(1) * (x_s * x_t).sum(1)
        + (y_t * y_t).sum(1) * (x_t * x_t).sum(1)
    )
    n, dx, dy = x_s.shape[0], x_s.shape[1], y_s.shape[1]
    return (per_sample.sum() / (n * dx * dy)).to(dtype)


def pooled_mapping_term(x_s, y_s, x_t, y_t) -> torch.Tensor:
    """Mode 2: mean over N * Dy entries of (y_s * mean(x_s) - y_t * mean(x_t))^2.

    y * mean(x) is the mode-1 mapping y x^T averaged over its bottom axis.
    """
    m_s = y_s * x_s.mean(1, keepdim=True)
    m_t = y_t * x_t.mean(1, keepdim=True)
    return (m_s - m_t).pow(2).mean()


class AOMDLoss(nn.Module):
    """AOMD between teacher and (already adapted) student stage features.

    Called as ``loss(teacher_feats, student_feats)`` with two equally long lists of [N, C_l, H_l, W_l]
    tensors (student channels already mapped to the teacher's by the adapters). Per stage l:
    global descriptor g_l = mean over H, W [N, C_l]; local descriptor q_l = mean over C [N, H_l W_l].
    For each consecutive pair (l, l+1) of the same descriptor kind, the mapping term is
    `full_mapping_term` (mode 1) or `pooled_mapping_term` (mode 2), and

        AOMD = global_weight * sum(global terms) + local_weight * sum(local terms).

    Memory is O(N * (C + H*W)); no per-sample matrix is formed. Where a student stage has another
    spatial size than the teacher's, the local descriptors are taken with the larger map
    average-pooled to the smaller one's size; the global ones over each map's own H, W.
    """

    def __init__(self, mode: int = 2, global_weight: float = 1.0, local_weight: float = 1.0):
        super().__init__()
        if mode not in (1, 2):
            raise ValueError(f"AOMD mode must be 1 (full mapping) or 2 (pooled mapping), not {mode}.")
        self.mode, self.global_weight, self.local_weight = mode, global_weight, local_weight

    def forward(self, teacher_feats: Sequence[torch.Tensor], student_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        assert len(teacher_feats) == len(student_feats) >= 2, "need two or more stages of each network"
        teacher_descriptors, student_descriptors = [], []
        for t, s in zip(teacher_feats, student_feats):
            assert t.shape[:2] == s.shape[:2], f"student stage {tuple(s.shape)} not adapted to teacher {tuple(t.shape)}"
            pooled_t, pooled_s = match_spatial(t, s)
            teacher_descriptors.append(_descriptors_at(t, pooled_t))
            student_descriptors.append(_descriptors_at(s, pooled_s))
        return self.from_descriptors(teacher_descriptors, student_descriptors)

    def from_descriptors(self, teacher_descriptors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         student_descriptors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """AOMD from each stage's (global [N, C_l], local [N, H_l W_l]) descriptors, teacher first
        (the local descriptors of a stage of both networks have one spatial size)."""
        assert len(teacher_descriptors) == len(student_descriptors) >= 2, "need two or more stages of each network"
        assert all(t.shape == s.shape for pair in zip(teacher_descriptors, student_descriptors) for t, s in zip(*pair)), \
            "teacher and student descriptors of a stage differ in shape"
        return aomd_of_descriptors(teacher_descriptors, student_descriptors, self.mode, self.global_weight, self.local_weight)


def aomd_of_descriptors(teacher_descriptors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        student_descriptors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        mode: int, global_weight: float, local_weight: float) -> torch.Tensor:
    """global_weight * sum over consecutive stages (l, l+1) of the mapping term of their global
    descriptors + local_weight * the same of their local descriptors (`AOMDLoss`); the mapping term
    is `full_mapping_term` (mode 1) or `pooled_mapping_term` (mode 2)."""
    mapping_term = full_mapping_term if mode == 1 else pooled_mapping_term
    total = student_descriptors[0][0].new_zeros(())
    for kind, weight in enumerate((global_weight, local_weight)):
        if weight:
            t = [descriptors[kind] for descriptors in teacher_descriptors]
            s = [descriptors[kind] for descriptors in student_descriptors]
            total = total + weight * sum(mapping_term(s[l], s[l + 1], t[l], t[l + 1]) for l in range(len(s) - 1))
    return total


def adapted_descriptors(maps: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per stage, the global [N, C] and local [N, H*W] descriptors, in float32, of the adapted
    stage relu(maps + bias).

    maps: [N, C, H, W] per stage, an adapter's 1x1 convolution of the student's stage without its
    bias; biases: [C] per stage. Written as one function for `torch.compile`
    (`fused_adapted_descriptors`).
    """
    descriptors = []
    for stage_maps, bias in zip(maps, biases):
        dtype = torch.promote_types(stage_maps.dtype, torch.float32)  # bias and ReLU in float32 at least
        descriptors.append(_descriptor_means(torch.relu(stage_maps.to(dtype) + bias.to(dtype)[:, None, None])))
    return descriptors


def adapted_aomd(teacher_descriptors: Sequence[tuple[torch.Tensor, torch.Tensor]], maps: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor], mode: int, global_weight: float, local_weight: float) -> torch.Tensor:
    """AOMD of the adapted student stages relu(maps + bias) (`adapted_descriptors`) against the
    teacher's descriptors (`aomd_of_descriptors`). Written as one function for `torch.compile`
    (`fused_adapted_aomd`)."""
    return aomd_of_descriptors(teacher_descriptors, adapted_descriptors(maps, biases), mode, global_weight, local_weight)


def fused_adapted_descriptors(maps: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`adapted_descriptors`, compiled by `torch.compile` (inductor) on first use.

    Compiled, each stage's bias, ReLU and means read the convolution's output once or twice and
    write nothing map-sized, and their backward writes the map's gradient in one pass; the eager
    adapters and `stage_descriptors` write each map three times and read it seven (bias, ReLU,
    means, their gradients), which made the adapters cost 12-17% of the floor of a training step on
    an H200. All stages in one graph with static shapes: one compiled call forward and one backward
    per step, compiled once per job (its batch size, image size and precision). The AOMD term
    compiles its mapping terms into the same graph (`fused_adapted_aomd`); this serves
    `StageAdapters.descriptors`, the adapters' share of a step in `benchmarks/train_step.py`.
    """
    return _compiled(adapted_descriptors)(maps, biases)


def fused_adapted_aomd(teacher_descriptors, maps, biases, mode: int, global_weight: float, local_weight: float) -> torch.Tensor:
    """`adapted_aomd`, compiled as `fused_adapted_descriptors` is: the student's descriptors and
    the mapping terms in one graph. Eager, the mapping terms are a hundred or so kernels on vectors
    of a few thousand entries, forward and backward, each shorter than its launch: the card would
    wait for the host through them. Compiled, they are a few kernels, in float64 where mode 1
    needs it."""
    return _compiled(adapted_aomd)(teacher_descriptors, maps, biases, mode, global_weight, local_weight)


@functools.cache
def _compiled(function):
    # built on first use: importing aomd does not load dynamo, and CPU jobs (not fused) never do
    return torch.compile(function, dynamic=False)


class StageAdapters(nn.Module):
    """Per-stage 1x1 convolution + ReLU from student to teacher channels (student parameters)."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]):
        super().__init__()
        assert len(student_channels) == len(teacher_channels)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s, t, kernel_size=1), nn.ReLU(inplace=True))
            for s, t in zip(student_channels, teacher_channels)
        )

    def forward(self, student_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Adapted maps, in the precision of the student's maps (bf16 maps: a bf16 convolution)."""
        return [in_feature_precision(adapter, f) for adapter, f in zip(self.adapters, student_feats)]

    def unbiased_maps(self, student_feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(each adapter's convolution of its stage without the bias, in the maps' precision; the
        biases): what the fused functions take."""
        convs = [adapter[0] for adapter in self.adapters]
        maps = [F.conv2d(feats, conv.weight.to(feats.dtype)) for conv, feats in zip(convs, student_feats)]
        return maps, [conv.bias for conv in convs]

    def descriptors(self, student_feats: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`stage_descriptors` of each adapted map, without the adapted maps: each adapter's
        convolution runs without its bias, in the maps' precision, and `fused_adapted_descriptors`
        adds the bias, applies the ReLU and takes the means, in float32."""
        return fused_adapted_descriptors(*self.unbiased_maps(student_feats))


class AdaptedAOMD(nn.Module):
    """The AOMD training term: the student's stages go through their adapters, then `AOMDLoss`.

    With `fused` (set by `aomd.runtime.Runtime.prepare_objective`, `train.fused_adapters`) and
    every student stage of its teacher stage's spatial size, the adapters' convolutions run eager
    and the rest, from their bias to the loss, as one compiled graph (`fused_adapted_aomd`); the
    same values up to rounding.
    """

    def __init__(self, student_channels, teacher_channels, mode: int = 2, global_weight: float = 1.0, local_weight: float = 1.0):
        super().__init__()
        self.adapters = StageAdapters(student_channels, teacher_channels)
        self.aomd = AOMDLoss(mode, global_weight, local_weight)
        self.fused = False

    def forward(self, teacher_feats, student_feats) -> torch.Tensor:
        assert len(teacher_feats) == len(student_feats) == len(self.adapters.adapters) >= 2, "one adapter per stage, two or more stages"
        if not (self.fused and all(t.shape[-2:] == s.shape[-2:] for t, s in zip(teacher_feats, student_feats))):
            return self.aomd(teacher_feats, self.adapters(student_feats))
        aomd = self.aomd
        return fused_adapted_aomd([stage_descriptors(t) for t in teacher_feats], *self.adapters.unbiased_maps(student_feats),
                                  aomd.mode, aomd.global_weight, aomd.local_weight)
