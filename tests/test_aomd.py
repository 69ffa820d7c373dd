"""AOMDLoss against a direct outer-product implementation of docs/methods.md, section 3."""
import pytest
import torch
import torch.nn.functional as F

from aomd.losses import AdaptedAOMD, AOMDLoss
from aomd.losses.aomd import StageAdapters, stage_descriptors


def direct_aomd(teacher_feats, student_feats, mode, global_weight, local_weight):
    """The definition, spelled out: per-sample mapping matrices M = y x^T are materialised; global
    descriptors of each map as it is, local ones with the larger map of a stage pooled to the
    smaller one's size."""
    pooled = []
    for t, s in zip(teacher_feats, student_feats):
        size = min(t.shape[-2:], s.shape[-2:], key=lambda hw: hw[0] * hw[1])
        pooled.append((F.adaptive_avg_pool2d(t, size), F.adaptive_avg_pool2d(s, size)))
    total = 0.0
    for weight, describe, maps in ((global_weight, lambda f: f.mean((2, 3)), list(zip(teacher_feats, student_feats))),
                                   (local_weight, lambda f: f.mean(1).flatten(1), pooled)):
        for (t_low, s_low), (t_high, s_high) in zip(maps[:-1], maps[1:]):
            x_t, y_t, x_s, y_s = describe(t_low), describe(t_high), describe(s_low), describe(s_high)
            m_t = y_t[:, :, None] * x_t[:, None, :]  # [N, D_top, D_bottom]
            m_s = y_s[:, :, None] * x_s[:, None, :]
            if mode == 2:
                m_t, m_s = m_t.mean(2), m_s.mean(2)  # averaged over the bottom axis
            total = total + weight * (m_s - m_t).pow(2).mean()
    return total


SHAPES = {
    "resnet-like": [(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4), (4, 64, 2, 2)],
    "odd": [(3, 5, 7, 9), (3, 6, 5, 3), (3, 7, 2, 2)],
}


def make_feats(shapes, seed, spatial_scale=1):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n, c, h, w in shapes:
        feats.append(torch.rand(n, c, round(h * spatial_scale), round(w * spatial_scale), generator=g, dtype=torch.float64))
    return feats


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.7, 2.5)])
@pytest.mark.parametrize("shapes", list(SHAPES))
# 2: teacher maps twice the student's size; 1.5: pooled to the student's in overlapping bins
@pytest.mark.parametrize("teacher_scale", [1, 2, 1.5])
def test_value_and_gradients_equal_the_direct_implementation(mode, weights, shapes, teacher_scale):
    teacher = make_feats(SHAPES[shapes], 0, teacher_scale)
    student = [f.requires_grad_() for f in make_feats(SHAPES[shapes], 1)]
    loss = AOMDLoss(mode, *weights)(teacher, student)
    grads = torch.autograd.grad(loss, student)
    reference_student = [f.detach().clone().requires_grad_() for f in student]
    expected = direct_aomd(teacher, reference_student, mode, *weights)
    expected_grads = torch.autograd.grad(expected, reference_student)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for g, e in zip(grads, expected_grads):
        assert (g - e).norm() <= 1e-5 * e.norm()
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-9 * e.abs().max().item())


@pytest.mark.parametrize("mode", [1, 2])
def test_float32_inputs_are_accurate_near_agreement(mode):
    # student = teacher + tiny noise: the closed form's three terms nearly cancel
    teacher = [f.float() for f in make_feats(SHAPES["resnet-like"], 0)]
    student = [t + 1e-3 * torch.randn_like(t) for t in teacher]
    loss = AOMDLoss(mode)(teacher, student)
    expected = direct_aomd([t.double() for t in teacher], [s.double() for s in student], mode, 1.0, 1.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)


def test_identical_features_give_zero():
    feats = make_feats(SHAPES["resnet-like"], 0)
    for mode in (1, 2):
        assert AOMDLoss(mode)(feats, feats).item() == pytest.approx(0.0, abs=1e-12)


def test_bad_mode_and_unadapted_student_are_refused():
    with pytest.raises(ValueError, match="mode must be 1"):
        AOMDLoss(mode=3)
    teacher = make_feats(SHAPES["resnet-like"], 0)
    student = make_feats([(4, 4, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4), (4, 64, 2, 2)], 1)
    with pytest.raises(AssertionError, match="not adapted"):
        AOMDLoss()(teacher, student)


def test_adapters_map_student_channels_and_learn():
    torch.manual_seed(0)
    term = AdaptedAOMD(student_channels=[4, 8], teacher_channels=[16, 32], mode=1)
    teacher = [torch.rand(2, 16, 8, 8), torch.rand(2, 32, 4, 4)]
    student = [torch.rand(2, 4, 8, 8), torch.rand(2, 8, 4, 4)]
    loss = term(teacher, student)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.adapters.parameters())
    adapted = term.adapters(student)
    assert [a.shape[1] for a in adapted] == [16, 32] and all((a >= 0).all() for a in adapted)  # ReLU


def check_fused_adapters(dtype: torch.dtype, channels_last: bool, device: str = "cpu") -> None:
    """`train.fused_adapters`: the compiled `StageAdapters.descriptors` gives the descriptors and
    gradients of the eager adapters followed by `stage_descriptors`, and the compiled term
    (`fused_adapted_aomd`) AOMD's value and gradients in both modes.

    Maps, weights, biases and the descriptors' upstream gradients are small integers, and every
    channel count and map size is a power of two, so each convolution, mean and gradient of an
    adapted map is exact in bf16 and fp16 too, and both paths hand the same convolution backward
    the same map gradient: the two computations must agree to float32's last bits whatever order
    their kernels sum in. Only the bias gradient differs in a low precision: the eager adapter's
    is a bf16/fp16 sum, the fused one's a float32 sum."""
    # dynamo keeps at most 8 graphs of a function and runs a 9th call eagerly, with a warning only:
    # a comparison after earlier cases (other dtypes, layouts, modes) would compare eager with eager
    torch.compiler.reset()
    # one algorithm per convolution, and no TF32 (it would round the two paths' float32 map
    # gradients, which differ in their last bits, to 10 bits before the convolutions' backward)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        _compare_fused_and_eager_adapters(dtype, channels_last, device)


def _compare_fused_and_eager_adapters(dtype: torch.dtype, channels_last: bool, device: str) -> None:
    torch.manual_seed(0)
    small_integers = lambda *shape: torch.randint(-1, 2, shape, device=device).float()  # noqa: E731
    layout = torch.channels_last if channels_last else torch.contiguous_format
    student_shapes, teacher_channels = [(4, 8, 8, 8), (4, 16, 4, 4), (4, 32, 2, 2)], [16, 32, 64]
    term = AdaptedAOMD([s[1] for s in student_shapes], teacher_channels, mode=2).to(device, memory_format=layout)
    with torch.no_grad():
        for parameter in term.parameters():
            parameter.copy_(small_integers(*parameter.shape))
    adapters: StageAdapters = term.adapters
    student = [small_integers(*shape).to(dtype).contiguous(memory_format=layout) for shape in student_shapes]
    inputs = [[s.clone().requires_grad_() for s in student] for _ in range(2)]
    adapted = adapters(inputs[0])
    assert all((a == 0).any() and (a > 0).any() for a in adapted)  # the ReLU clips some outputs, not all
    eager = [stage_descriptors(a) for a in adapted]
    fused = adapters.descriptors(inputs[1])
    upstream = [(small_integers(*g.shape), small_integers(*q.shape)) for g, q in eager]
    grads = []
    for descriptors in (eager, fused):
        adapters.zero_grad()
        sum((g * ug).sum() + (q * uq).sum() for (g, q), (ug, uq) in zip(descriptors, upstream)).backward()
        grads.append([p.grad.clone() for p in adapters.parameters()])
    for (g, q), (g_fused, q_fused) in zip(eager, fused):
        assert g_fused.dtype == q_fused.dtype == torch.float32
        torch.testing.assert_close(g_fused, g, rtol=1e-6, atol=0)
        torch.testing.assert_close(q_fused, q, rtol=1e-6, atol=0)
    for ours, theirs in zip(inputs[1], inputs[0]):
        assert ours.grad.dtype == dtype and theirs.grad.abs().max() > 0
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=0)
    bias_rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    for (name, _), ours, theirs in zip(adapters.named_parameters(), grads[1], grads[0]):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, rtol=bias_rtol if name.endswith("bias") else 1e-6, atol=0)

    # the whole term, fused (`fused_adapted_aomd`: descriptors and mapping terms in one graph)
    # against eager, in both modes: its value and every gradient
    teacher = [small_integers(n, c, h, w).relu().to(dtype).contiguous(memory_format=layout)
               for (n, _, h, w), c in zip(student_shapes, teacher_channels)]
    for mode in (1, 2):
        term.aomd.mode = mode
        values, grads = [], []
        for fused in (False, True):
            term.fused = fused
            term.zero_grad()
            inputs = [s.clone().requires_grad_() for s in student]
            loss = term(teacher, inputs)
            loss.backward()
            values.append(loss.detach())
            grads.append([*(i.grad for i in inputs), *(p.grad.clone() for p in term.parameters())])
        assert values[0] > 0 and values[1].dtype == values[0].dtype == torch.float32
        torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=0)
        # AOMD's own gradients are no small integers: the eager adapters round the adapted map's
        # gradient to bf16/fp16 where the fused graph keeps float32 up to the map's gradient, and
        # float32 sums in other orders; so the gradients agree to the precision's rounding
        tolerance = max(2 * torch.finfo(dtype).eps, 1e-5)
        names = [*(f"input {i}" for i in range(len(student))), *(name for name, _ in term.named_parameters())]
        for name, ours, theirs in zip(names, grads[1], grads[0]):
            assert theirs.abs().max() > 0, name
            torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance * theirs.abs().max().item(), msg=name)


@pytest.mark.slow  # each case compiles (about 10 s on a 2-core CPU)
@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_fused_adapters_give_the_eager_adapters_values_and_gradients(dtype, channels_last):
    check_fused_adapters(dtype, channels_last)


def test_fused_adapters_fall_back_to_the_eager_path_where_spatial_sizes_differ(monkeypatch):
    """A student stage of another size than the teacher's is pooled first, which the fused path
    does not do: such a pair runs the eager adapters (nothing is compiled)."""
    from aomd.losses import aomd

    monkeypatch.setattr(aomd, "fused_adapted_aomd", lambda *args: pytest.fail("the fused path ran"))
    term = AdaptedAOMD([4, 8], [8, 16])
    term.fused = True
    student = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    teacher = [torch.randn(2, 8, 4, 4).relu(), torch.randn(2, 16, 2, 2).relu()]
    term.fused = False
    expected = term(teacher, student)
    term.fused = True
    assert torch.equal(term(teacher, student), expected)
