"""Differential tests: fused_losses.binary_cross_entropy_with_logits against torch in float64.

Every test runs on the eager backend and on the Triton kernels (CUDA, or the interpreter on
the CPU: see conftest.py), with a random upstream gradient, and compares the loss and the
gradients with ``torch.nn.functional.binary_cross_entropy_with_logits`` in float64 on the
same rounded inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    assert_close,
    assert_raises_like_torch,
    check_upstream_gradients,
    loss_and_grads,
    positive,
    random_logits,
    signature_of,
)
from conftest import KERNEL_DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_losses as fl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(input, target, weight=None, pos_weight=None, grad_target=False, slack=1.0,
          **kwargs):
    """Our loss and gradients on the current backend vs torch's in float64."""
    out_dtype = target.dtype  # torch's loss has the target's dtype
    names = {"input", "target"} if grad_target else {"input"}
    inputs = {"input": input, "target": target, "weight": weight, "pos_weight": pos_weight}
    ours, grads = loss_and_grads(fl.binary_cross_entropy_with_logits, inputs, names,
                                 round_to=out_dtype, **kwargs)
    ref_inputs = {k: None if v is None else v.detach().cpu().double() for k, v in inputs.items()}
    ref, ref_grads = loss_and_grads(F.binary_cross_entropy_with_logits, ref_inputs, names,
                                    round_to=out_dtype, **kwargs)
    assert ours.dtype == out_dtype
    assert ours.device == input.device
    assert_close(ours, ref, out_dtype, "loss", slack)
    assert grads["input"].dtype == input.dtype
    assert_close(grads["input"], ref_grads["input"], input.dtype, "d loss / d input", slack)
    if grad_target:
        assert grads["target"].dtype == target.dtype
        assert_close(grads["target"], ref_grads["target"], target.dtype, "d loss / d target",
                     slack)
    return ours, grads


def soft_targets(shape, dtype, device, seed=0, hard_frac=0.5):
    """Soft labels in [0, 1], a fraction of them exactly 0 or 1 (multi-label 0/1 targets)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    hard = torch.rand(shape, generator=g) < hard_frac
    t = torch.where(hard, (t > 0.5).double(), t)
    return t.to(dtype).to(device)


# --------------------------------------------------------------------------------------
# every argument, every reduction, every dtype
# --------------------------------------------------------------------------------------

# (13, 37): odd sizes, masked tails in both tile dimensions
WEIGHTS = {
    "plain": (None, None),
    "weight per class": ((37,), None),
    "weight per sample": ((13, 1), None),
    "weight full": ((13, 37), None),
    "pos_weight": (None, (37,)),
    "weight and pos_weight": ((13, 1), (37,)),
}


def _operands(weights, dtype, device):
    """Logits, soft targets, weight and pos_weight of the (13, 37) case named ``weights``."""
    w_shape, pw_shape = WEIGHTS[weights]
    x = random_logits((13, 37), dtype, device)
    t = soft_targets((13, 37), dtype, device)
    w = None if w_shape is None else positive(w_shape, dtype, device, seed=1)
    pw = None if pw_shape is None else positive(pw_shape, dtype, device, seed=2)
    return x, t, w, pw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_reductions_and_weights(backend, device, dtype, reduction, weights):
    check(*_operands(weights, dtype, device), reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", ["plain", "weight full", "weight and pos_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_gradient(backend, device, reduction, weights, dtype):
    # d/dt = w (log sigmoid(-x) - p log sigmoid(x)), -w x without pos_weight
    check(*_operands(weights, dtype, device), grad_target=True, reduction=reduction)


@pytest.mark.parametrize(
    ("shape", "w_shape", "pw_shape"),
    [
        ((3, 5, 4, 6), None, (5, 1, 1)),  # the docs' (C, 1, 1) for (N, C, H, W)
        ((3, 5, 4, 6), (5, 1, 1), (6,)),  # per-channel weight, pos_weight along W
        ((3, 5, 4, 6), (1, 5, 1, 6), (4, 6)),  # partial broadcasts on both
        ((3, 5, 4, 6), (3, 1, 1, 1), (3, 5, 4, 6)),  # per-sample weight, full pos_weight
        ((3, 5, 4, 6), (), ()),  # 0-d weights
        ((3, 5, 4, 6), (1,), (1, 1, 1, 1)),  # one-element weights
        ((2, 3, 4, 5, 6), (3, 1, 5, 1), (4, 1, 6)),  # more groups than the kernel's three
        ((7,), (7,), (7,)),  # 1-d
        ((), (), ()),  # 0-d input
        ((4, 1), (4, 1), (1,)),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_broadcasting(backend, device, shape, w_shape, pw_shape, reduction):
    x = random_logits(shape, torch.float32, device)
    t = soft_targets(shape, torch.float32, device)
    w = None if w_shape is None else positive(w_shape, torch.float32, device, seed=1)
    pw = None if pw_shape is None else positive(pw_shape, torch.float32, device, seed=2)
    check(x, t, w, pw, grad_target=True, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_wide_multilabel(backend, device, reduction):
    # extreme multi-label classification: (N, 100,000) labels, sparse positives,
    # pos_weight per label
    n_labels = 100_000
    x = random_logits((2, n_labels), torch.bfloat16, device)
    g = torch.Generator().manual_seed(4)
    t = (torch.rand(2, n_labels, generator=g) < 0.01).to(torch.bfloat16).to(device)
    pw = positive((n_labels,), torch.float32, device, seed=5)
    w = positive((2, 1), torch.bfloat16, device, seed=6)
    check(x, t, w, pw, reduction=reduction)


# --------------------------------------------------------------------------------------
# layouts: strided operands are read in place
# --------------------------------------------------------------------------------------


def test_non_contiguous(backend, device):
    base = random_logits((37, 13), torch.bfloat16, device)
    x = base.t()  # (13, 37), column-major
    t = soft_targets((37, 13), torch.bfloat16, device).t()
    check(x, t, positive((13, 1), torch.bfloat16, device), positive((37,), torch.float32,
                                                                    device), grad_target=True)
    x = random_logits((13, 80), torch.float32, device)[:, 3:40]  # sliced rows
    t = soft_targets((13, 80), torch.float32, device)[:, 40:77]
    check(x, t, positive((37,), torch.float32, device), reduction="none")
    x4 = random_logits((2, 5, 3, 4), torch.float32, device).to(
        memory_format=torch.channels_last)
    t4 = soft_targets((2, 5, 3, 4), torch.float32, device)
    check(x4, t4, None, positive((5, 1, 1), torch.float32, device), grad_target=True)
    t_expanded = soft_targets((1, 37), torch.float32, device).expand(13, 37)  # stride 0
    check(random_logits((13, 37), torch.float32, device), t_expanded, grad_target=True)


def test_tile_view_reads_in_place():
    from fused_losses.kernels._elementwise import TileView, tile_view

    x = torch.randn(4, 5, 6, 7)
    view = TileView.build(x.shape, [x, torch.ones(5, 1, 1).expand(x.shape)])
    assert view.sizes == (4, 5, 42)  # (N, C, H*W): pos_weight (C, 1, 1) per row
    channels_last = x.to(memory_format=torch.channels_last)
    view = TileView.build(x.shape, [channels_last])
    assert view.sizes == (1, 1, x.numel())  # one contiguous run, read along memory
    assert view.strides(channels_last) == (0, 0, 1)
    transposed = torch.randn(9, 8).t()
    view, (same,) = tile_view(transposed.shape, transposed)
    assert same is transposed and view.strides(transposed) == (0, 0, 1)
    # a loss-shaped output laid out like the input it is computed from
    out, flat = view.new(torch.float32, "cpu")
    assert out.shape == transposed.shape and out.stride() == transposed.stride()
    # five groups: copied contiguous, then one
    w = torch.ones(3, 1, 5, 1).expand(2, 3, 4, 5, 6)
    view, (x5, w5) = tile_view(w.shape, torch.randn(2, 3, 4, 5, 6), w)
    assert x5.is_contiguous() and w5.is_contiguous() and view.sizes == (1, 1, 720)


# --------------------------------------------------------------------------------------
# numerics: extreme logits, infinities, NaN where torch gives NaN
# --------------------------------------------------------------------------------------


def _grid(values, targets):
    x = torch.tensor(values, dtype=torch.float64).repeat_interleave(len(targets))
    t = torch.tensor(targets, dtype=torch.float64).repeat(len(values))
    return x, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_weight", [None, 0.25, 3.0])
def test_extreme_logits(backend, device, dtype, pos_weight):
    # logits up to +-1e4: finite loss and gradients everywhere (torch's are), and accurate
    # where a naive formula cancels (x = -20, t = 0: loss 2e-9, not 0)
    x, t = _grid([-1e4, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1e4], [0.0, 0.3, 1.0])
    x, t = x.to(dtype).to(device), t.to(dtype).to(device)
    pw = None if pos_weight is None else torch.full((1,), pos_weight, dtype=dtype,
                                                    device=device)
    for reduction in ("none", "mean"):
        loss, grads = check(x, t, None, pw, grad_target=True, reduction=reduction)
        assert torch.isfinite(loss).all()
        assert torch.isfinite(grads["input"]).all() and torch.isfinite(grads["target"]).all()


@pytest.mark.parametrize("pos_weight", [None, 2.0, 0.0, math.inf])
def test_non_finite_like_torch(backend, device, pos_weight):
    # infinite or NaN logits, infinite pos_weight: inf and NaN exactly where torch has them
    inf, nan = math.inf, math.nan
    x, t = _grid([-inf, inf, nan, -1e4, -20.0, -1.0, 0.0, 1.0, 20.0, 1e4], [0.0, 0.5, 1.0])
    x, t = x.float().to(device), t.float().to(device)
    pw = None if pos_weight is None else torch.tensor([pos_weight], device=device)
    check(x, t, None, pw, grad_target=True, reduction="none")
    w = torch.ones_like(x)
    w[::4] = 0.0  # 0 * inf = NaN, as torch
    check(x, t, w, pw, grad_target=True, reduction="none")
    check(x, t, w, pw, reduction="sum")


def test_properties(backend, device):
    x = random_logits((6, 50), torch.float32, device)
    t = soft_targets((6, 50), torch.float32, device)
    # l(x, t) = l(-x, 1 - t) without pos_weight; t = sigmoid(x) minimizes the loss
    a = fl.binary_cross_entropy_with_logits(x, t, reduction="none")
    b = fl.binary_cross_entropy_with_logits(-x, 1 - t, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    x.requires_grad_(True)
    fl.binary_cross_entropy_with_logits(x, torch.sigmoid(x.detach())).backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x), rtol=0, atol=1e-8)
    zero = fl.binary_cross_entropy_with_logits(torch.zeros(3, 4, device=device),
                                               torch.zeros(3, 4, device=device))
    assert abs(zero.item() - math.log(2)) < 1e-6


# --------------------------------------------------------------------------------------
# dtypes, devices, empty inputs
# --------------------------------------------------------------------------------------


def test_mixed_dtypes(backend, device):
    # torch's loss has the target's dtype; weights of any dtype
    x = random_logits((5, 9), torch.bfloat16, device)
    check(x, soft_targets((5, 9), torch.float32, device), grad_target=True)
    x32 = random_logits((5, 9), torch.float32, device)
    check(x32, soft_targets((5, 9), torch.bfloat16, device), positive((9,), torch.float16,
                                                                      device))
    mask = (torch.arange(9, device=device) % 3 != 0).expand(5, 9)  # a bool mask as weight
    check(x, soft_targets((5, 9), torch.bfloat16, device), mask,
          positive((9,), torch.float32, device))
    check(x32, soft_targets((5, 9), torch.float32, device), positive((9,), torch.float64,
                                                                     device))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty(backend, device, reduction):
    x = torch.empty(0, 5, device=device, requires_grad=True)
    t = torch.empty(0, 5, device=device)
    ours = fl.binary_cross_entropy_with_logits(x, t, reduction=reduction,
                                               pos_weight=torch.ones(5, device=device))
    ref = F.binary_cross_entropy_with_logits(x.detach().cpu(), t.cpu(), reduction=reduction)
    assert ours.shape == ref.shape
    assert torch.equal(ours.detach().cpu().isnan(), ref.isnan())  # mean: NaN, as torch
    ours.sum().backward()
    assert x.grad.shape == x.shape


# --------------------------------------------------------------------------------------
# upstream gradients, graphs, determinism
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_upstream_gradients(backend, device, weighted):
    x = random_logits((6, 300), torch.bfloat16, device).requires_grad_(True)
    t = soft_targets((6, 300), torch.bfloat16, device)
    pw = positive((300,), torch.bfloat16, device) if weighted else None
    ref_x = x.detach().double().cpu().requires_grad_(True)
    ref_kw = {} if pw is None else {"pos_weight": pw.double().cpu()}

    check_upstream_gradients(
        x, ref_x, lambda: fl.binary_cross_entropy_with_logits(x, t, pos_weight=pw),
        lambda: F.binary_cross_entropy_with_logits(ref_x, t.double().cpu(), **ref_kw),
        torch.bfloat16)

    # not reduced: the upstream gradient is a tensor, full, per column, per row or one value
    # (with pos_weight, the kernel reads it as such in a (rows, columns) view)
    col_scale = (torch.arange(300, device=device) % 4 * 0.5).to(torch.bfloat16)
    row_scale = (torch.arange(6, device=device) % 3 * 0.25 + 1).to(torch.bfloat16)
    full_scale = torch.outer(row_scale, col_scale)
    for reduce_none in (lambda a, c: (a * full_scale.to(c)).sum(),
                        lambda a, c: (a.sum(0) * col_scale.to(c)).sum(),
                        lambda a, c: (a.sum(1) * row_scale.to(c)).sum(),
                        lambda a, c: a.sum()):
        x.grad = ref_x.grad = None
        a = fl.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pw)
        b = F.binary_cross_entropy_with_logits(ref_x, t.double().cpu(), reduction="none",
                                               **ref_kw)
        reduce_none(a, a.device).backward()
        reduce_none(b, "cpu").backward()
        assert_close(x.grad, ref_x.grad, torch.bfloat16, "grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward(backend, device, reduction):
    # create_graph=True (gradient penalties, meta-learning): second derivatives as torch's
    x = random_logits((5, 7), torch.float32, device).requires_grad_(True)
    t = soft_targets((5, 7), torch.float32, device).requires_grad_(True)
    pw = positive((7,), torch.float32, device)
    ref_x, ref_t = (v.detach().double().cpu().requires_grad_(True) for v in (x, t))

    def second(fn, x, t, pw):
        loss = fn(x, t, pos_weight=pw, reduction=reduction)
        gx, gt = torch.autograd.grad(loss, (x, t), torch.ones_like(loss), create_graph=True)
        penalty = (gx**2).sum() + (gt * x).sum()
        return torch.autograd.grad(penalty, (x, t))

    ours = second(fl.binary_cross_entropy_with_logits, x, t, pw)
    ref = second(F.binary_cross_entropy_with_logits, ref_x, ref_t, pw.double().cpu())
    assert_close(ours[0], ref[0], torch.float32, "d penalty / d input")
    assert_close(ours[1], ref[1], torch.float32, "d penalty / d target")


def test_deterministic(backend, device):
    x = random_logits((33, 5000), torch.bfloat16, device).requires_grad_(True)
    t = soft_targets((33, 5000), torch.bfloat16, device)
    pw = positive((5000,), torch.float32, device)
    runs = []
    for _ in range(2):
        x.grad = None
        loss = fl.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
        loss.backward()
        runs.append((loss.detach().clone(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_inputs_are_not_modified(backend, device):
    x = random_logits((4, 100), torch.bfloat16, device).requires_grad_(True)
    t = soft_targets((4, 100), torch.bfloat16, device).requires_grad_(True)
    w, pw = positive((4, 1), torch.float32, device), positive((100,), torch.float32, device)
    before = [v.detach().clone() for v in (x, t, w, pw)]
    fl.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw).backward()
    assert all(torch.equal(v.detach(), b) for v, b in zip((x, t, w, pw), before, strict=True))


def test_no_grad(backend, device):
    x = random_logits((4, 100), torch.float32, device).requires_grad_(True)
    t = soft_targets((4, 100), torch.float32, device)
    with torch.no_grad():
        loss = fl.binary_cross_entropy_with_logits(x, t)
    assert loss.grad_fn is None
    assert_close(loss, F.binary_cross_entropy_with_logits(x.detach().double().cpu(),
                                                          t.double().cpu()),
                 torch.float32, "loss")


# --------------------------------------------------------------------------------------
# errors: torch's exception types and words
# --------------------------------------------------------------------------------------


def _error_cases(device):
    x = torch.randn(2, 3, device=device)
    t = torch.rand(2, 3, device=device)
    r = lambda *s: torch.rand(*s, device=device)  # noqa: E731
    return {
        "target size": ((x, t[:, :2]), {}),
        "0-d input": ((x[0, 0], t), {}),
        "bad reduction": ((x, t), {"reduction": "avg"}),
        "bad reduction first": ((x, t[:, :2]), {"reduction": "avg"}),
        "weight not broadcastable": ((x, t), {"weight": r(4)}),
        "weight too many rows": ((x, t), {"weight": r(5, 3)}),
        "weight bigger": ((x, t), {"weight": r(2, 2, 3)}),
        "pos_weight not broadcastable": ((x, t), {"pos_weight": r(4)}),
        "pos_weight bigger": ((x, t), {"pos_weight": r(1, 2, 3)}),
        "pos_weight before weight": ((x, t), {"weight": r(4), "pos_weight": r(5)}),
        "weight not a tensor": ((x, t), {"weight": [1.0]}),
        "pos_weight not a tensor": ((x, t), {"pos_weight": 2.0}),
        "input not a tensor": (([1.0], t), {}),
        "weight requires grad": ((x, t), {"weight": r(3).requires_grad_(True)}),
        "pos_weight requires grad": ((x, t), {"pos_weight": r(3).requires_grad_(True)}),
        "integer target": ((x, t.long()), {}),
        "bool target": ((x, t > 0.5), {}),
        "integer input": ((x.long(), t), {"weight": r(4)}),
    }


@pytest.mark.parametrize("case", list(_error_cases("cpu")))
def test_errors_like_torch(backend, device, case):
    args, kwargs = _error_cases(device)[case]
    assert_raises_like_torch(lambda: fl.binary_cross_entropy_with_logits(*args, **kwargs),
                             lambda: F.binary_cross_entropy_with_logits(*args, **kwargs))


def test_weight_requires_grad_under_no_grad(backend, device):
    w = torch.rand(3, device=device, requires_grad=True)
    x, t = torch.randn(2, 3, device=device), torch.rand(2, 3, device=device)
    with torch.no_grad():  # torch allows it without a graph
        ours = fl.binary_cross_entropy_with_logits(x, t, w)
    assert_close(ours, F.binary_cross_entropy_with_logits(x.double().cpu(), t.double().cpu(),
                                                          w.detach().double().cpu()),
                 torch.float32, "loss")


def test_legacy_reduction_arguments(backend, device):
    x, t = random_logits((3, 4), torch.float32, device), soft_targets((3, 4), torch.float32,
                                                                      device)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        total = fl.binary_cross_entropy_with_logits(x, t, size_average=False)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        mean = fl.binary_cross_entropy_with_logits(x, t, reduction="elementwise_mean")
    ref = F.binary_cross_entropy_with_logits(x.double().cpu(), t.double().cpu(),
                                             reduction="none")
    assert_close(total, ref.sum(), torch.float32, "sum")
    assert_close(mean, ref.mean(), torch.float32, "mean")


# --------------------------------------------------------------------------------------
# API: signatures and the module
# --------------------------------------------------------------------------------------


def test_forward_signature_matches_torch():
    # the function's and the constructor's signatures are compared in test_api.py
    assert signature_of(fl.BCEWithLogitsLoss.forward) == signature_of(
        torch.nn.BCEWithLogitsLoss.forward)


def test_module_matches_torch(backend, device):
    w, pw = positive((4, 1), torch.float32, device), positive((7,), torch.float32, device)
    ours = fl.BCEWithLogitsLoss(weight=w, reduction="sum", pos_weight=pw)
    theirs = torch.nn.BCEWithLogitsLoss(weight=w, reduction="sum", pos_weight=pw)
    assert isinstance(ours, torch.nn.BCEWithLogitsLoss)
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys() == {
        "weight", "pos_weight"}
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours) == repr(theirs)
    x, t = random_logits((4, 7), torch.float32, device), soft_targets((4, 7), torch.float32,
                                                                      device)
    ref = torch.nn.BCEWithLogitsLoss(weight=w.double().cpu(), reduction="sum",
                                     pos_weight=pw.double().cpu())
    assert_close(ours(x, t), ref(x.double().cpu(), t.double().cpu()), torch.float32, "loss")
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        legacy = fl.BCEWithLogitsLoss(reduce=False)
    assert legacy.reduction == "none"
    moved = fl.BCEWithLogitsLoss(pos_weight=torch.ones(3)).to(torch.float64)
    assert moved.pos_weight.dtype == torch.float64


# --------------------------------------------------------------------------------------
# hypothesis: random shapes, broadcast weights and layouts
# --------------------------------------------------------------------------------------


@st.composite
def _bce_case(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    if draw(st.booleans()):  # sometimes a wider last dimension: masked column tails
        shape = shape[:-1] + (draw(st.integers(7, 300)),)

    def broadcastable():  # a trailing suffix of the shape, some sizes set to 1, or None
        if draw(st.booleans()):
            return None
        keep = draw(st.integers(0, len(shape)))
        return tuple(s if draw(st.booleans()) else 1 for s in shape[len(shape) - keep:])

    return shape, broadcastable(), broadcastable()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    case=_bce_case(),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    grad_target=st.booleans(),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(case, dtype, reduction, grad_target, transpose, seed):
    shape, w_shape, pw_shape = case
    for backend in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_LOSSES_BACKEND", backend)
            device = "cpu" if backend == "torch" else KERNEL_DEVICE
            x = random_logits(shape, dtype, device, seed=seed)
            if transpose and x.dim() >= 2:  # the same values, column-major
                x = x.transpose(0, -1).contiguous().transpose(0, -1)
            t = soft_targets(shape, dtype, device, seed=seed + 1)
            w = None if w_shape is None else positive(w_shape, dtype, device, seed + 2)
            pw = None if pw_shape is None else positive(pw_shape, dtype, device, seed + 3)
            check(x, t, w, pw, grad_target=grad_target, reduction=reduction)


# --------------------------------------------------------------------------------------
# CUDA only: sizes and properties the interpreter cannot reach
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_over_2_pow_31_elements():
    # 2^31 + 3 * 2^20 bf16 elements (4.3 GB each for logits, targets and the gradient): flat
    # offsets overflow int32. pos_weight per column exercises the row/column tiles too.
    n, c = 2**21 + 3 * 2**10, 1024
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    t = (torch.rand(n, c, device="cuda") < 0.5).to(torch.bfloat16)
    pw = torch.rand(c, device="cuda") + 0.5
    loss = fl.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="sum")
    loss.backward()
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    ref_x = x.detach()[rows].double().requires_grad_(True)
    F.binary_cross_entropy_with_logits(ref_x, t[rows].double(), pos_weight=pw.double(),
                                       reduction="sum").backward()
    assert_close(x.grad[rows], ref_x.grad, torch.bfloat16, "grad of the last rows")
    ref = F.binary_cross_entropy_with_logits(x.detach().float(), t.float(), pos_weight=pw,
                                             reduction="sum")
    # the loss is bf16: one rounding of the float32 sum, within 2^-9 of it (and the float32
    # reference's own error of a 2^31-term sum is far below that)
    assert abs(loss.item() - ref.item()) <= 2**-8 * abs(ref.item())
