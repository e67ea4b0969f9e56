"""Differential tests: fused_losses.huber_loss against torch in float64, both backends.

Every test runs on the eager backend and on the Triton kernels (CUDA, or the interpreter on
the CPU: see conftest.py), with a random upstream gradient, and compares the loss and the
gradients (input, target, weight) with ``torch.nn.functional.huber_loss`` in float64 on the
same rounded inputs, and the warnings torch gives with the ones we give.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings

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


def check(input, target, weight=None, grad_target=False, grad_weight=False, slack=1.0,
          **kwargs):
    """Our loss and gradients on the current backend vs torch's in float64; the same
    warnings as torch's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's dtype for these inputs
        out_dtype = F.huber_loss(input.detach().cpu(), target.cpu(), weight=None if weight is None
                                 else weight.cpu(), **kwargs).dtype
    names = {"input"} | ({"target"} if grad_target else set()) | (
        {"weight"} if grad_weight else set())
    inputs = {"input": input, "target": target, "weight": weight}
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        ours, grads = loss_and_grads(fl.huber_loss, inputs, names, round_to=out_dtype, **kwargs)
    ref_inputs = {k: None if v is None else v.detach().cpu().double() for k, v in inputs.items()}
    with warnings.catch_warnings(record=True) as torch_warned:
        warnings.simplefilter("always")
        ref, ref_grads = loss_and_grads(F.huber_loss, ref_inputs, names, round_to=out_dtype,
                                        **kwargs)
    # (what numpy says inside the Triton interpreter, an overflow or a deprecation that
    # Triton <= 3.6 triggers, is not torch's business)
    assert [str(w.message) for w in ours_warned
            if f"triton{os.sep}runtime" not in w.filename] == [
        str(w.message) for w in torch_warned]
    assert ours.dtype == out_dtype
    assert ours.device == input.device
    assert_close(ours, ref, out_dtype, "loss", slack)
    for name in names:
        value = inputs[name]
        assert grads[name].dtype == value.dtype and grads[name].shape == value.shape
        assert_close(grads[name], ref_grads[name], value.dtype, f"d loss / d {name}", slack)
    return ours, grads


def targets(shape, dtype, device, seed=1, scale=2.0):
    return random_logits(shape, dtype, device, scale=scale, seed=seed)


# --------------------------------------------------------------------------------------
# every argument, every reduction, every dtype
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("delta", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_reductions_and_deltas(backend, device, dtype, reduction, delta, weighted):
    # (13, 37): odd sizes; scale 2 puts differences on both sides of every delta
    x = random_logits((13, 37), dtype, device, scale=2.0)
    t = targets((13, 37), dtype, device)
    w = positive((13, 37), dtype, device, seed=3) if weighted else None
    check(x, t, w, grad_target=True, grad_weight=weighted, reduction=reduction, delta=delta)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_input_gradient_only(backend, device, reduction):
    # the training case: only the input needs its gradient (fused into the forward)
    x = random_logits((16, 300), torch.bfloat16, device, scale=2.0)
    check(x, targets((16, 300), torch.bfloat16, device), reduction=reduction, delta=0.5)
    w = positive((16, 300), torch.bfloat16, device)
    check(x, targets((16, 300), torch.bfloat16, device), w, reduction=reduction)


@pytest.mark.parametrize("delta", [0.5, 1.0, 1.75])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_at_the_boundary(backend, device, delta, dtype):
    # |x - t| exactly delta: both branches agree, 0.5 delta^2 and a gradient of +-delta
    x = torch.zeros(6, dtype=dtype, device=device)
    t = torch.tensor([delta, -delta, 0.5 * delta, 2 * delta, -2 * delta, 0.0], dtype=dtype,
                     device=device)
    loss, grads = check(x, t, grad_target=True, reduction="none", delta=delta)
    expected = torch.tensor([0.5, 0.5, 0.125, 1.5, 1.5, 0.0]) * delta**2
    assert torch.equal(loss.float().cpu(), expected.to(dtype).float())
    x.requires_grad_(True)
    fl.huber_loss(x, t, reduction="sum", delta=delta).backward()
    expected = torch.tensor([-1.0, 1.0, -0.5, -1.0, 1.0, 0.0]) * delta
    assert torch.equal(x.grad.float().cpu(), expected.to(dtype).float())


def test_non_finite_like_torch(backend, device):
    inf, nan = math.inf, math.nan
    # (differences that overflow float32 but not float64 are left out: the reference is float64)
    x = torch.tensor([inf, -inf, nan, 1e30, -3e38, 1.0, 0.0, inf, 2.0], device=device)
    t = torch.tensor([inf, 0.0, 0.0, -1e30, -3e38, inf, nan, -inf, 1.0], device=device)
    check(x, t, grad_target=True, reduction="none")
    check(x, t, grad_target=True, reduction="sum", delta=inf)  # delta = inf: all quadratic
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 0.0, 1.0, 3.0, inf], device=device)
    check(x, t, w, grad_target=True, grad_weight=True, reduction="none")


# --------------------------------------------------------------------------------------
# broadcasting (with torch's warning) and layouts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x_shape", "t_shape"),
    [
        ((8, 37), (37,)),  # a target per column: read once per program
        ((8, 37), (8, 1)),  # a target per row
        ((37,), (8, 37)),  # the input broadcast: its gradient summed back over rows
        ((8, 1), (1, 37)),  # both broadcast
        ((2, 3, 4, 5), (3, 1, 5)),
        ((), (6,)),  # 0-d input
        ((4, 5), ()),  # 0-d target
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_broadcasting(backend, device, x_shape, t_shape, reduction, weighted):
    x = random_logits(x_shape, torch.float32, device, scale=2.0)
    t = targets(t_shape, torch.float32, device)
    w = positive(x_shape, torch.float32, device, seed=3) if weighted else None  # input's shape
    check(x, t, w, grad_target=True, grad_weight=weighted, reduction=reduction, delta=0.7)


def test_broadcast_warning_points_at_the_caller(backend, device):
    x, t = torch.zeros(3, 4, device=device), torch.zeros(4, device=device)
    with pytest.warns(UserWarning, match="Using a target size") as record:
        fl.huber_loss(x, t)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # same sizes: no warning
        fl.huber_loss(x, t.expand(3, 4))


def test_non_contiguous(backend, device):
    x = random_logits((37, 13), torch.bfloat16, device, scale=2.0).t()
    t = targets((37, 13), torch.bfloat16, device).t()
    check(x, t, positive((37, 13), torch.bfloat16, device).t(), grad_target=True,
          grad_weight=True)
    x4 = random_logits((2, 5, 3, 4), torch.float32, device).to(
        memory_format=torch.channels_last)
    check(x4, targets((2, 5, 3, 4), torch.float32, device), grad_target=True,
          reduction="none")
    x = random_logits((13, 80), torch.float32, device)[:, 3:40]
    check(x, targets((13, 80), torch.float32, device)[:, 40:77], reduction="sum")


def test_wide_rows(backend, device):
    x = random_logits((2, 100_000), torch.bfloat16, device, scale=2.0)
    check(x, targets((2, 100_000), torch.bfloat16, device), reduction="mean", delta=0.5)


# --------------------------------------------------------------------------------------
# dtypes, empty inputs
# --------------------------------------------------------------------------------------


def test_mixed_dtypes(backend, device):
    # torch's loss has the input's dtype, promoted with the weight's
    x = random_logits((5, 9), torch.bfloat16, device, scale=2.0)
    check(x, targets((5, 9), torch.float32, device), grad_target=True)
    x32 = random_logits((5, 9), torch.float32, device, scale=2.0)
    check(x32, targets((5, 9), torch.bfloat16, device), grad_target=True)
    check(x, targets((5, 9), torch.bfloat16, device), positive((5, 9), torch.float32, device),
          grad_weight=True)
    check(x32, targets((5, 9), torch.float32, device), positive((5, 9), torch.float64,
                                                                device))
    # integer targets: torch's forward takes them, its backward raises
    ti = torch.randint(-2, 3, (5, 9), device=device)
    assert_close(fl.huber_loss(x32, ti), F.huber_loss(x32.double().cpu(), ti.cpu()),
                 torch.float32, "loss")
    leaf = x32.clone().requires_grad_(True)
    assert_raises_like_torch(lambda: fl.huber_loss(leaf, ti).backward(),
                             lambda: F.huber_loss(leaf, ti).backward())
    check(x32, targets((5, 9), torch.float32, device), torch.rand(5, 9, device=device) > 0.3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty(backend, device, reduction):
    x = torch.empty(0, 5, device=device, requires_grad=True)
    ours = fl.huber_loss(x, torch.empty(0, 5, device=device), reduction=reduction)
    ref = F.huber_loss(torch.empty(0, 5), torch.empty(0, 5), reduction=reduction)
    assert ours.shape == ref.shape
    assert torch.equal(ours.detach().cpu().isnan(), ref.isnan())  # mean: NaN, as torch
    ours.sum().backward()
    assert x.grad.shape == x.shape


# --------------------------------------------------------------------------------------
# upstream gradients, graphs, determinism
# --------------------------------------------------------------------------------------


def test_upstream_gradients(backend, device):
    x = random_logits((6, 300), torch.bfloat16, device, scale=2.0).requires_grad_(True)
    t = targets((6, 300), torch.bfloat16, device)
    ref_x = x.detach().double().cpu().requires_grad_(True)

    check_upstream_gradients(x, ref_x, lambda: fl.huber_loss(x, t, delta=0.5),
                             lambda: F.huber_loss(ref_x, t.double().cpu(), delta=0.5),
                             torch.bfloat16)

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward(backend, device, reduction):
    # create_graph=True: second derivatives (1 inside |d| < delta) and the weight's, as torch's
    x = random_logits((5, 7), torch.float32, device, scale=2.0).requires_grad_(True)
    t = targets((7,), torch.float32, device)  # broadcast, as torch allows (with its warning)
    w = positive((5, 7), torch.float32, device).requires_grad_(True)
    ref_x, ref_w = (v.detach().double().cpu().requires_grad_(True) for v in (x, w))

    def second(fn, x, t, w):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = fn(x, t, reduction=reduction, delta=0.8, weight=w)
        gx, gw = torch.autograd.grad(loss, (x, w), torch.ones_like(loss), create_graph=True)
        return torch.autograd.grad((gx**2).sum() + (gw * x).sum(), (x, w))

    ours = second(fl.huber_loss, x, t, w)
    ref = second(F.huber_loss, ref_x, t.double().cpu(), ref_w)
    assert_close(ours[0], ref[0], torch.float32, "d penalty / d input")
    assert_close(ours[1], ref[1], torch.float32, "d penalty / d weight")


def test_deterministic(backend, device):
    x = random_logits((33, 5000), torch.bfloat16, device).requires_grad_(True)
    t = targets((5000,), torch.bfloat16, device)  # per-column target: row/column tiles
    runs = []
    for _ in range(2):
        x.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = fl.huber_loss(x, t, delta=0.5)
        loss.backward()
        runs.append((loss.detach().clone(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_inputs_are_not_modified(backend, device):
    x = random_logits((4, 100), torch.bfloat16, device).requires_grad_(True)
    t = targets((4, 100), torch.bfloat16, device).requires_grad_(True)
    w = positive((4, 100), torch.float32, device).requires_grad_(True)
    before = [v.detach().clone() for v in (x, t, w)]
    fl.huber_loss(x, t, weight=w).backward()
    assert all(torch.equal(v.detach(), b) for v, b in zip((x, t, w), before, strict=True))


# --------------------------------------------------------------------------------------
# errors: torch's exception types and words
# --------------------------------------------------------------------------------------


def _error_cases(device):
    x = torch.randn(2, 3, device=device)
    t = torch.randn(2, 3, device=device)
    w = torch.rand(2, 3, device=device)
    return {
        "not broadcastable": ((x, t[:, :2]), {}),
        "bad reduction": ((x, t), {"reduction": "avg"}),
        "bad reduction before delta": ((x, t), {"reduction": "avg", "delta": 0.0}),
        "delta 0": ((x, t), {"delta": 0.0}),
        "delta negative": ((x, t), {"delta": -1}),
        "delta NaN": ((x, t), {"delta": math.nan}),
        "delta str": ((x, t), {"delta": "1.5"}),
        "delta None": ((x, t), {"delta": None}),
        "delta 1-d tensor": ((x, t), {"delta": torch.tensor([2.0])}),
        "delta requires grad": ((x, t), {"delta": torch.tensor(2.0, requires_grad=True)}),
        "weight size": ((x, t), {"weight": w[0]}),
        "weight size before delta": ((x, t), {"weight": w[0], "delta": 0.0}),
        "weight with bad reduction": ((x, t), {"weight": w, "reduction": "avg"}),
        "weight with elementwise_mean": ((x, t), {"weight": w, "reduction": "elementwise_mean"}),
        "weight with delta 0": ((x, t), {"weight": w, "delta": 0.0}),
        "weight not a tensor": ((x, t), {"weight": [1.0]}),
        "input not a tensor": (([1.0], t), {}),
        "target not a tensor": ((x, 1.0), {}),
        "integer input": ((x.long(), t.long()), {}),
    }


@pytest.mark.parametrize("case", list(_error_cases("cpu")))
def test_errors_like_torch(backend, device, case):
    args, kwargs = _error_cases(device)[case]
    assert_raises_like_torch(lambda: fl.huber_loss(*args, **kwargs),
                             lambda: F.huber_loss(*args, **kwargs))


@pytest.mark.parametrize("delta", [2, True, torch.tensor(0.5), torch.tensor(2)])
def test_delta_as_torch_parses_it(backend, device, delta):
    x, t = random_logits((3, 4), torch.float32, device), targets((3, 4), torch.float32, device)
    check(x, t, delta=delta)


def test_elementwise_mean_without_weight(backend, device):
    x, t = random_logits((3, 4), torch.float32, device), targets((3, 4), torch.float32, device)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        ours = fl.huber_loss(x, t, reduction="elementwise_mean")
    assert_close(ours, F.huber_loss(x.double().cpu(), t.double().cpu()), torch.float32, "mean")


# --------------------------------------------------------------------------------------
# API: signatures and the module
# --------------------------------------------------------------------------------------


def test_forward_signature_matches_torch():
    # the function's and the constructor's signatures are compared in test_api.py (torch 2.13:
    # F.huber_loss has ``weight``, torch.nn.HuberLoss's constructor does not)
    assert "weight" in inspect.signature(fl.huber_loss).parameters
    assert "weight" not in inspect.signature(fl.HuberLoss.__init__).parameters
    assert signature_of(fl.HuberLoss.forward) == signature_of(torch.nn.HuberLoss.forward)


def test_module_matches_torch(backend, device):
    ours, theirs = fl.HuberLoss(reduction="sum", delta=0.5), torch.nn.HuberLoss("sum", 0.5)
    assert isinstance(ours, torch.nn.HuberLoss)
    assert repr(ours) == repr(theirs) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = random_logits((4, 7), torch.float32, device)
    t = targets((4, 7), torch.float32, device)
    assert_close(ours(x, t), theirs(x.double().cpu(), t.double().cpu()), torch.float32, "loss")
    # torch >= 2.13 refuses a string delta in the constructor (older torch takes it): as torch
    try:
        torch.nn.HuberLoss(delta="1")
    except TypeError:
        with pytest.raises(TypeError, match="delta must be a float or int"):
            fl.HuberLoss(delta="1")
    else:
        fl.HuberLoss(delta="1")


# --------------------------------------------------------------------------------------
# hypothesis
# --------------------------------------------------------------------------------------


@st.composite
def _shapes(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    if draw(st.booleans()):
        shape = shape[:-1] + (draw(st.integers(7, 300)),)
    # the target: the same shape, or a trailing part with some sizes set to 1 (broadcast)
    keep = draw(st.integers(0, ndim)) if draw(st.booleans()) else ndim
    t_shape = tuple(s if draw(st.integers(0, 3)) else 1 for s in shape[ndim - keep:])
    return shape, t_shape


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shapes=_shapes(),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    delta=st.sampled_from([0.1, 1.0, 2.5]),
    weighted=st.booleans(),
    all_grads=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(shapes, dtype, reduction, delta, weighted, all_grads, seed):
    shape, t_shape = shapes
    for backend in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_LOSSES_BACKEND", backend)
            device = "cpu" if backend == "torch" else KERNEL_DEVICE
            x = random_logits(shape, dtype, device, scale=2.0, seed=seed)
            t = targets(t_shape, dtype, device, seed=seed + 1)
            w = positive(shape, dtype, device, seed + 2) if weighted else None
            check(x, t, w, grad_target=all_grads, grad_weight=all_grads and weighted,
                  reduction=reduction, delta=delta)


# --------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_over_2_pow_31_elements():
    n = 2**31 + 3 * 2**20  # flat offsets overflow int32
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    loss = fl.huber_loss(x, t, reduction="sum", delta=0.5)
    loss.backward()
    idx = torch.tensor([0, n // 2, n - 1], device="cuda")
    ref_x = x.detach()[idx].double().requires_grad_(True)
    F.huber_loss(ref_x, t[idx].double(), reduction="sum", delta=0.5).backward()
    assert_close(x.grad[idx], ref_x.grad, torch.bfloat16, "grad at the end")
    ref = F.huber_loss(x.detach().float(), t.float(), reduction="sum", delta=0.5)
    assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
