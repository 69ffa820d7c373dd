"""Each distillation baseline against a direct (looped) implementation of its definition
(docs/methods.md, section 4), and the objective that combines the terms."""
import math

import pytest
import torch
import torch.nn.functional as F

from aomd.losses import (
    AllNegatives,
    AttentionTransferLoss,
    FitNetLoss,
    HardDarkRankLoss,
    NetworkShape,
    Objective,
    RKDAngleLoss,
    RKDDistanceLoss,
    SimilarityPreservingLoss,
    StepOutputs,
    DistanceWeightedNegatives,
    TripletLoss,
)

N = 6


def emb(d, seed):
    return torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def smooth_l1(a, b):
    diff = abs(a - b)
    return 0.5 * diff**2 if diff < 1 else diff - 0.5


def test_similarity_preserving_is_the_batch_definition():
    t, s = emb(16, 0), emb(4, 1)  # different widths: only the N x N Gram matrices are compared
    def gram(e):
        g = [[float(e[i] @ e[j]) for j in range(N)] for i in range(N)]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]
    gt, gs = gram(t), gram(s)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(N) for j in range(N)) / N**2
    assert SimilarityPreservingLoss()(t, s).item() == pytest.approx(expected, rel=1e-9)


def test_attention_transfer():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(N, c, h, h, generator=g, dtype=torch.float64) for c, h in ((16, 8), (32, 4))]
    s = [torch.randn(N, c, h, h, generator=g, dtype=torch.float64) for c, h in ((4, 8), (8, 4))]
    expected = 0.0
    for ft, fs in zip(t, s):
        for_stage = 0.0
        for n in range(N):
            at = (ft[n] ** 2).mean(0).flatten()
            as_ = (fs[n] ** 2).mean(0).flatten()
            at, as_ = at / at.norm(), as_ / as_.norm()
            for_stage += float(((as_ - at) ** 2).sum())
        expected += for_stage / (N * ft.shape[-1] * ft.shape[-2])
    assert AttentionTransferLoss()(t, s).item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="equal spatial sizes"):
        AttentionTransferLoss()([t[0]], [s[1]])


def test_fitnet_regresses_student_onto_teacher():
    torch.manual_seed(0)
    loss = FitNetLoss(student_widths=[4, 8], teacher_widths=[16, 32]).double()
    for regressor in loss.regressors:
        assert regressor.weight.abs().max() <= 0.005 and regressor.bias is None
    t = [torch.randn(N, 16, 4, 4, dtype=torch.float64), torch.randn(N, 32)]  # a map and an embedding
    s = [torch.randn(N, 4, 4, 4, dtype=torch.float64), torch.randn(N, 8, dtype=torch.float64)]
    expected = 0.0
    for regressor, ft, fs in zip(loss.regressors, t, s):
        w = regressor.weight.detach()[:, :, 0, 0]  # [teacher width, student width]
        fs = fs if fs.dim() == 4 else fs[:, :, None, None]
        ft = ft if ft.dim() == 4 else ft[:, :, None, None]
        mapped = torch.einsum("oc,nchw->nohw", w, fs)
        expected += float(((mapped - ft.double()) ** 2).mean())
    assert loss([x.double() for x in t], s).item() == pytest.approx(expected, rel=1e-9)


def test_hard_darkrank_is_the_plackett_luce_likelihood_of_the_teacher_ranking():
    t, s = emb(8, 0), emb(4, 1)
    alpha, beta, k = 2.0, 3.0, 4
    dist = lambda e, i, j: float((e[i] - e[j]).norm())
    expected = 0.0
    for a in range(N):
        others = [j for j in range(N) if j != a]
        ranking = sorted(others, key=lambda j: dist(t, a, j))[:k]
        scores = [-alpha * dist(s, a, j) ** beta for j in ranking]
        log_likelihood = sum(scores[i] - math.log(sum(math.exp(x) for x in scores[i:])) for i in range(k))
        expected += -log_likelihood / N
    assert HardDarkRankLoss(alpha, beta, k)(t, s).item() == pytest.approx(expected, rel=1e-7)


def test_rkd_distance():
    t, s = emb(8, 0), emb(4, 1)
    def normalised(e):
        d = [[float((e[i] - e[j]).norm()) for j in range(N)] for i in range(N)]
        mean = sum(d[i][j] for i in range(N) for j in range(N) if i != j) / (N * (N - 1))
        return [[v / mean for v in row] for row in d]
    dt, ds = normalised(t), normalised(s)
    expected = sum(smooth_l1(ds[i][j], dt[i][j]) for i in range(N) for j in range(N)) / N**2
    assert RKDDistanceLoss()(t, s).item() == pytest.approx(expected, rel=1e-7)


def test_rkd_angle():
    t, s = emb(8, 0), emb(4, 1)
    def cos(e, i, j, k):  # angle at j between e_i and e_k
        if i == j or k == j:
            return 0.0
        u, v = e[i] - e[j], e[k] - e[j]
        return float(u @ v / (u.norm() * v.norm()))
    expected = sum(smooth_l1(cos(s, i, j, k), cos(t, i, j, k)) for i in range(N) for j in range(N) for k in range(N)) / N**3
    assert RKDAngleLoss()(t, s).item() == pytest.approx(expected, rel=1e-7)



def test_rkd_angle_gradient_with_two_equal_student_embeddings():
    """Two equal student embeddings (not equal in the teacher) make a zero difference, whose
    cosines are constants: the gradient is the one of the looped definition, not 1/eps times it."""
    t, s = emb(8, 0), emb(4, 1)
    s[1] = s[0]
    s.requires_grad_(True)
    RKDAngleLoss()(t, s).backward()
    looped = s.detach().clone().requires_grad_(True)
    def cos(e, i, j, k):
        u, v = e[i] - e[j], e[k] - e[j]
        if u.detach().norm() == 0 or v.detach().norm() == 0:
            return torch.zeros((), dtype=e.dtype)
        return u @ v / (u.norm() * v.norm())
    loss = sum(F.smooth_l1_loss(cos(looped, i, j, k), cos(t, i, j, k)) for i in range(N) for j in range(N) for k in range(N)) / N**3
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1
    torch.testing.assert_close(s.grad, looped.grad)

STUDENT = NetworkShape((4, 8, 16, 32), 6)
TEACHER = NetworkShape((8, 16, 32, 64), 10)


def outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    stages = lambda channels: [torch.rand(N, c, 16 >> i, 16 >> i, generator=g) for i, c in enumerate(channels)]
    return StepOutputs(
        labels=torch.tensor([0, 0, 1, 1, 2, 2]),
        student_embeddings=F.normalize(torch.randn(N, 6, generator=g), dim=1),
        student_stages=stages(STUDENT.stage_channels),
        teacher_embeddings=F.normalize(torch.randn(N, 10, generator=g), dim=1),
        teacher_stages=stages(TEACHER.stage_channels),
    )


def test_objective_is_the_weighted_sum_of_its_terms():
    objective = Objective(DistanceWeightedNegatives(), STUDENT, TEACHER, triplet_ratio=1.0, aomd_ratio=200.0,
                          sp_ratio=20.0, dist_ratio=1.0, angle_ratio=2.0, mode=1)
    assert set(objective.terms) == {"triplet", "aomd", "sp", "dist", "angle"} and objective.needs_teacher
    torch.manual_seed(0)
    total, values = objective(outputs())
    assert objective.ratios == {"triplet": 1.0, "aomd": 200.0, "sp": 20.0, "dist": 1.0, "angle": 2.0}
    expected = values["triplet"] + 200 * values["aomd"] + 20 * values["sp"] + values["dist"] + 2 * values["angle"]
    assert total.item() == pytest.approx(expected.item())
    assert values["sp"].item() == pytest.approx(SimilarityPreservingLoss()(outputs().teacher_embeddings, outputs().student_embeddings).item())


@pytest.mark.parametrize("overrides, ratios, mode, weights", [
    (["loss=aomd_mode1"], {"aomd": 200.0}, 1, (1.0, 1.0)),
    (["loss=aomd_mode2", "loss.triplet_ratio=1", "loss.global_weight=0.3", "loss.local_weight=2"],
     {"triplet": 1.0, "aomd": 200.0}, 2, (0.3, 2.0)),
    (["loss=rkd"], {"dist": 1.0, "angle": 2.0}, None, None),
    (["loss=darkrank", "loss.dark_ratio=3"], {"dark": 3.0}, None, None),
])
def test_a_loss_config_builds_the_objective_it_names(overrides, ratios, mode, weights):
    """From the composed config to the objective a job trains with: each option's ratios, and
    AOMD's mode and descriptor weights, reach the built terms."""
    from aomd.build import build_objective
    from aomd.config import validate
    from aomd.models import EmbeddingNet
    from conftest import compose

    cfg = validate(compose(*overrides))
    student, teacher = EmbeddingNet("resnet18", 16, True, False), EmbeddingNet("resnet18", 32, True, False)
    objective = build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)
    assert objective.ratios == ratios
    if mode is not None:
        aomd = objective.terms["aomd"].aomd
        assert (aomd.mode, (aomd.global_weight, aomd.local_weight)) == (mode, weights)


def test_every_term_gets_its_documented_inputs_and_settings():
    """Each term's value in the objective is its loss on the inputs docs/methods.md gives it (AT and
    FitNet on stages 2-4, FitNet also on the embeddings) with the settings of the loss config."""
    out = outputs()
    objective = Objective(AllNegatives(), STUDENT, TEACHER, triplet_ratio=1.0, margin=0.7, triplet_p=1, sp_ratio=1.0,
                          at_ratio=1.0, fitnet_ratio=1.0, dark_ratio=1.0, dark_alpha=1.5, dark_beta=2.5, permute_len=3,
                          dist_ratio=1.0, angle_ratio=1.0)
    _, values = objective(out)
    t, s = out.teacher_embeddings, out.student_embeddings
    fitnet = objective.terms["fitnet"]
    assert [r.in_channels for r in fitnet.regressors] == [*STUDENT.stage_channels[1:], STUDENT.embedding_size]
    expected = {
        "triplet": TripletLoss(AllNegatives(), 0.7, 1)(s, out.labels),
        "sp": SimilarityPreservingLoss()(t, s),
        "at": AttentionTransferLoss()(out.teacher_stages[1:], out.student_stages[1:]),
        "fitnet": fitnet([*out.teacher_stages[1:], t], [*out.student_stages[1:], s]),
        "dark": HardDarkRankLoss(1.5, 2.5, 3)(t, s),
        "dist": RKDDistanceLoss()(t, s),
        "angle": RKDAngleLoss()(t, s),
    }
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name].item() == pytest.approx(value.item(), rel=1e-6), name
    # and not with the defaults: each setting reaches its term
    defaults = Objective(AllNegatives(), STUDENT, TEACHER, triplet_ratio=1.0, dark_ratio=1.0)(out)[1]
    assert defaults["triplet"].item() != pytest.approx(values["triplet"].item())
    assert defaults["dark"].item() != pytest.approx(values["dark"].item())


def test_terms_with_ratio_zero_are_not_built():
    objective = Objective(DistanceWeightedNegatives(), STUDENT, None, triplet_ratio=1.0)
    assert list(objective.terms) == ["triplet"] and not objective.needs_teacher
    with pytest.raises(ValueError, match="no teacher"):
        Objective(DistanceWeightedNegatives(), STUDENT, None, aomd_ratio=1.0)
    with pytest.raises(ValueError, match="nothing to train"):
        Objective(DistanceWeightedNegatives(), STUDENT, TEACHER)


@pytest.mark.parametrize("ratio", ["aomd_ratio", "sp_ratio", "at_ratio", "fitnet_ratio", "dark_ratio", "dist_ratio", "angle_ratio"])
def test_every_distillation_term_runs_and_has_gradients(ratio):
    objective = Objective(DistanceWeightedNegatives(), STUDENT, TEACHER, **{ratio: 1.0})
    out = outputs()
    out.student_embeddings.requires_grad_()
    for f in out.student_stages:
        f.requires_grad_()
    total, _ = objective(out)
    total.backward()
    grads = [out.student_embeddings.grad, *(f.grad for f in out.student_stages)]
    assert torch.isfinite(total) and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert Objective.distils({ratio: 1.0}) and not Objective.distils({"triplet_ratio": 1.0})


def test_attention_transfer_between_maps_of_other_sizes_is_refused_before_any_work():
    """GoogLeNet's and ResNet's stage maps differ in size when the crops are not a multiple of 32."""
    from aomd.build import build_objective
    from aomd.config import validate
    from aomd.errors import ConfigError
    from aomd.models import EmbeddingNet
    from conftest import compose

    cfg = validate(compose("loss=at"))
    student, teacher = EmbeddingNet("googlenet", 8, True, False), EmbeddingNet("resnet18", 8, True, False)
    with pytest.raises(ConfigError, match=r"student's are \[\(8, 8\), \(4, 4\), \(2, 2\)\] and the teacher's \[\(9, 9\), \(5, 5\), \(3, 3\)\]"):
        build_objective(cfg.loss, cfg.sampler, student, teacher, 65)
    assert set(build_objective(cfg.loss, cfg.sampler, student, teacher, 64).terms) == {"at"}
