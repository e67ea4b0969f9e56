"""Differential tests: fused_losses.cross_entropy against torch in float64, both backends.

Every test runs on the eager backend and on the Triton kernels (CUDA, or the interpreter on
the CPU: see conftest.py), with a random upstream gradient, and compares the loss and the
gradients with ``torch.nn.functional.cross_entropy`` in float64 on the same rounded inputs.
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
    class_target,
    class_weight,
    loss_and_grads,
    random_logits,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_losses as fl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(input, target, weight=None, grad_target=False, slack=1.0, **kwargs):
    """Our loss and gradients on the current backend vs torch's in float64."""
    prob = input.shape == target.shape
    dtype = input.dtype
    out_dtype = dtype
    if prob:
        out_dtype = torch.promote_types(dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    names = {"input", "target"} if grad_target else {"input"}
    inputs = {"input": input, "target": target, "weight": weight}
    ours, grads = loss_and_grads(fl.cross_entropy, inputs, names, round_to=out_dtype, **kwargs)

    ref_inputs = {
        "input": input.cpu().double(),
        "target": target.cpu().double() if prob else target.cpu(),
        "weight": None if weight is None else weight.cpu().double(),
    }
    ref, ref_grads = loss_and_grads(F.cross_entropy, ref_inputs, names, round_to=out_dtype,
                                    **kwargs)
    # The terms that cancel in d loss / d input: p_y and 1, times the row's weight and
    # upstream gradient over the mean's denominator. That is the gradient of uniform logits.
    uniform_inputs = dict(ref_inputs, input=torch.zeros_like(ref_inputs["input"]))
    _, uniform = loss_and_grads(F.cross_entropy, uniform_inputs, {"input"}, round_to=out_dtype,
                                **kwargs)
    terms = float(uniform["input"].abs().max())
    assert ours.dtype == out_dtype
    assert ours.device == input.device
    assert_close(ours, ref, out_dtype, "loss", slack)
    assert grads["input"].dtype == dtype
    assert_close(grads["input"], ref_grads["input"], dtype, "d loss / d input", slack, terms)
    if grad_target:
        assert grads["target"].dtype == target.dtype
        assert_close(grads["target"], ref_grads["target"], target.dtype, "d loss / d target",
                     slack)
    return ours, grads




# --------------------------------------------------------------------------------------
# class-index targets: every argument and their combinations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_class_targets(backend, device, dtype, reduction, smoothing, weighted):
    # 37 classes: odd, not a power of two (masked tail); a quarter of the rows ignored.
    x = random_logits((13, 37), dtype, device)
    t = class_target((13,), 37, device, ignore_frac=0.25)
    w = class_weight(37, dtype, device) if weighted else None
    check(x, t, w, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("n_classes", [1, 2, 5, 1000, 32768])
def test_small_and_register_sized_rows(backend, device, n_classes):
    # 1 class (loss 0), tiny rows, and the largest row held in registers (SINGLE_BLOCK_MAX).
    x = random_logits((3, n_classes), torch.bfloat16, device)
    t = class_target((3,), n_classes, device)
    check(x, t, reduction="mean", label_smoothing=0.1)


@pytest.mark.parametrize(
    "n_classes",
    [
        32769,  # one past the register-held rows: the looped two-pass kernel, a 1-class tail
        50257,  # GPT-2
        131079,  # odd, > 2^17
        262144,  # Gemma-sized, an exact multiple of the block
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_vocabularies(backend, device, row_plan, n_classes, dtype):
    x = random_logits((3, n_classes), dtype, device, scale=4.0)
    t = class_target((3,), n_classes, device)
    t[1] = -100
    # The eager backend is torch's own float32 log_softmax: ~5e-5 relative at 262k classes
    # (the kernels' online float32 sum: ~1e-6).
    slack = 4.0 if backend == "torch" else 1.0
    check(x, t, reduction="mean", slack=slack)
    check(x, t, class_weight(n_classes, dtype, device), reduction="none", label_smoothing=0.05,
          slack=slack)


@pytest.mark.parametrize("ignore_index", [-1, 0, 3, 36, 1000])
def test_ignore_index_any_int(backend, device, ignore_index):
    # negative, a real class at either end or in the middle, and one out of range
    x = random_logits((16, 37), torch.float32, device)
    t = class_target((16,), 37, device)
    t[::3] = ignore_index
    for reduction in ("mean", "sum", "none"):
        check(x, t, class_weight(37, torch.float32, device), reduction=reduction,
              ignore_index=ignore_index, label_smoothing=0.2)


def test_uint8_targets(backend, device):
    x = random_logits((6, 10), torch.float32, device)
    t = class_target((6,), 10, device).to(torch.uint8)
    check(x, t, ignore_index=4)


def test_one_dimensional_input(backend, device):
    x = random_logits((11,), torch.float32, device)
    t = torch.tensor(4, device=device)
    check(x, t, reduction="none", label_smoothing=0.1)
    check(x, t, class_weight(11, torch.float32, device))
    # A (1,) target: torch's forward works but its backward raises "size mismatch" (a torch
    # bug, README); ours gives the gradient of the equivalent 0-d target.
    w = class_weight(11, torch.float32, device)
    ours, grads = loss_and_grads(fl.cross_entropy, {"input": x, "target": t.view(1), "weight": w},
                                 {"input"}, round_to=torch.float32)
    ref_inputs = {"input": x.double().cpu(), "target": t.cpu(), "weight": w.double().cpu()}
    ref, ref_grads = loss_and_grads(F.cross_entropy, ref_inputs, {"input"},
                                    round_to=torch.float32)
    assert_close(ours, F.cross_entropy(x.double().cpu(), t.view(1).cpu(), w.double().cpu()),
                 torch.float32, "loss")
    assert_close(grads["input"], ref_grads["input"], torch.float32, "grad")
    with pytest.raises(RuntimeError, match="broadcast shape"):  # as torch (test_errors.py)
        fl.cross_entropy(x, torch.tensor([4], device=device), label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(2, 7, 3), (2, 7, 3, 4), (1, 7, 2, 1, 3)])
def test_k_dimensional(backend, device, shape, reduction):
    # (N, C, d1, ..., dK): the class dimension is not last, so rows are strided
    x = random_logits(shape, torch.float32, device)
    t = class_target((shape[0],) + shape[2:], shape[1], device, ignore_frac=0.2)
    check(x, t, class_weight(shape[1], torch.float32, device), reduction=reduction,
          label_smoothing=0.1)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2, 21, 40, 64), torch.bfloat16),  # segmentation-like: 20 tiles of 128 positions
        ((3, 150, 7, 5), torch.float16),  # ADE20K's classes, a ragged last tile
        ((2, 256, 9), torch.float32),  # the widest tiled class count
        ((2, 257, 9), torch.float32),  # one more: rows of classes (a copy)
        ((1, 2, 1000), torch.bfloat16),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dimensional_tiles(backend, device, shape, dtype, reduction):
    # (N, C, d1, ..., dK) contiguous: classes strided, read in place in tiles of positions
    x = random_logits(shape, dtype, device)
    t = class_target((shape[0],) + shape[2:], shape[1], device, ignore_frac=0.1)
    check(x, t, reduction=reduction)
    check(x, t, class_weight(shape[1], dtype, device), reduction=reduction,
          label_smoothing=0.05)


def test_k_dimensional_probabilities_and_layouts(backend, device):
    shape = (2, 5, 6, 7)
    x = random_logits(shape, torch.float32, device)
    t = torch.softmax(random_logits(shape, torch.float32, device, seed=4), dim=1)
    check(x, t, class_weight(5, torch.float32, device), grad_target=True, label_smoothing=0.1)
    # channels-last: classes have unit stride, so rows of classes are read in place
    cl = x.to(memory_format=torch.channels_last)
    check(cl, class_target((2, 6, 7), 5, device), reduction="sum")
    # a sliced K-dimensional input (not contiguous): rows of classes, copied
    check(x[:, :, 1:, :], class_target((2, 5, 7), 5, device), reduction="none")


def test_k_dimensional_upstream_gradients_and_double_backward(backend, device):
    x = random_logits((2, 7, 5, 6), torch.bfloat16, device).requires_grad_(True)
    t = class_target((2, 5, 6), 7, device, ignore_frac=0.2)
    ref_x = x.detach().double().cpu().requires_grad_(True)
    check_upstream_gradients(x, ref_x, lambda: fl.cross_entropy(x, t, label_smoothing=0.1),
                             lambda: F.cross_entropy(ref_x, t.cpu(), label_smoothing=0.1),
                             torch.bfloat16)
    # create_graph=True through the tiled layout (torch's ops on the same view)
    xf = x.detach().float().requires_grad_(True)
    (g,) = torch.autograd.grad(fl.cross_entropy(xf, t), xf, create_graph=True)
    (g * g).sum().backward()
    ref = x.detach().double().cpu().requires_grad_(True)
    (ref_g,) = torch.autograd.grad(F.cross_entropy(ref, t.cpu()), ref, create_graph=True)
    (ref_g * ref_g).sum().backward()
    assert_close(g, ref_g, torch.float32, "gradient")
    assert_close(xf.grad, ref.grad, torch.float32, "Hessian-vector product")


# --------------------------------------------------------------------------------------
# probability targets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (6, 11), (2, 7, 3), (3, 40000)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets(backend, device, shape, reduction, weighted):
    x = random_logits(shape, torch.float32, device)
    g = torch.Generator().manual_seed(3)
    t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    t = t.to(torch.float32).to(device)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    w = class_weight(n_classes, torch.float32, device) if weighted else None
    check(x, t, w, grad_target=True, reduction=reduction, label_smoothing=0.1)
    check(x, t, w, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets_weight_gradient(backend, device, dtype, reduction):
    # torch differentiates a class weight that requires grad for probability targets: the
    # gradient must come (not silently None), with the input's and the target's, through
    # the logits' transform too
    x = random_logits((5, 7), dtype, device)
    g = torch.Generator().manual_seed(3)
    t = torch.softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1).to(dtype)
    inputs = {"input": x, "target": t.to(device), "weight": class_weight(7, dtype, device)}
    names = {"input", "target", "weight"}
    kw = dict(reduction=reduction, label_smoothing=0.1, temperature=0.7, logit_scale=1.5)
    ours, grads = loss_and_grads(fl.cross_entropy, inputs, names, round_to=dtype, **kw)

    def ref(input, target, weight, temperature, logit_scale, **kwargs):
        return F.cross_entropy(input * logit_scale / temperature, target, weight, **kwargs)

    wide = {k: v.cpu().double() for k, v in inputs.items()}
    expected, ref_grads = loss_and_grads(ref, wide, names, round_to=dtype, **kw)
    assert_close(ours, expected, dtype, "loss")
    for name in names:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close(grads[name], ref_grads[name], dtype, f"d loss / d {name}")


@pytest.mark.parametrize("shape", [(7,), (3, 7), (3, 7, 2), (3, 7, 2, 2)])
def test_class_targets_weight_requiring_grad_raise(backend, device, shape):
    # torch's nll_loss has no derivative for the class weight: it refuses one that requires
    # grad where a graph is built, with its words (no silent None gradient)
    w = class_weight(7, torch.float32, device).requires_grad_(True)
    x = random_logits(shape, torch.float32, device)
    t = (class_target(shape[:1] + shape[2:], 7, device) if len(shape) > 1
         else torch.tensor(3, device=device))
    assert_raises_like_torch(lambda: fl.cross_entropy(x, t, w, label_smoothing=0.1),
                             lambda: F.cross_entropy(x, t, w, label_smoothing=0.1))
    # the batch check comes first, as torch's
    if len(shape) > 1:
        assert_raises_like_torch(lambda: fl.cross_entropy(x, t[:1], w),
                                 lambda: F.cross_entropy(x, t[:1], w))
    with torch.no_grad():  # no graph: torch computes it
        assert_close(fl.cross_entropy(x, t, w), F.cross_entropy(
            x.double().cpu(), t.cpu(), w.detach().double().cpu()), torch.float32, "loss")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probability_targets_mixed_dtypes(backend, device, dtype):
    # torch promotes: bf16 logits with float32 probabilities give a float32 loss
    x = random_logits((4, 9), dtype, device)
    t = torch.rand(4, 9).to(device)
    check(x, t, grad_target=True)
    check(x, t.to(dtype), class_weight(9, torch.float32, device))


# --------------------------------------------------------------------------------------
# layouts: no copy where the class dimension has unit stride
# --------------------------------------------------------------------------------------


def test_causal_lm_shift_view(backend, device):
    # logits[:, :-1, :] against labels[:, 1:], passed as torch users do for (B, T, V)
    logits = random_logits((2, 9, 300), torch.bfloat16, device)
    labels = class_target((2, 9), 300, device)
    shifted = logits[:, :-1, :]
    check(shifted.transpose(1, 2), labels[:, 1:], reduction="mean")
    check(shifted.reshape(-1, 300), labels[:, 1:].reshape(-1), reduction="sum")


def test_transposed_input(backend, device):
    x = random_logits((23, 6), torch.float32, device).t()  # (6, 23) with class stride 6
    check(x, class_target((6,), 23, device), label_smoothing=0.1)


def test_shift_view_is_not_copied():
    from fused_losses.kernels.cross_entropy import _fold_rows

    logits = torch.randn(3, 9, 300)
    folded = _fold_rows(logits[:, :-1, :])
    assert folded.data_ptr() == logits.data_ptr()
    assert folded.shape == (3, 8, 300) and folded.stride() == (9 * 300, 300, 1)
    folded = _fold_rows(torch.randn(2, 7, 3, 4).movedim(1, -1))  # class-strided: one copy
    assert folded.is_contiguous() and folded.shape == (1, 24, 7)
    assert _fold_rows(logits).shape == (1, 27, 300)


# --------------------------------------------------------------------------------------
# NaN where torch gives NaN; upstream gradients; determinism
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_all_targets_ignored(backend, device, smoothing):
    x = random_logits((4, 8), torch.float32, device)
    t = torch.full((4,), -100, device=device)
    mean, grads = check(x, t, reduction="mean", label_smoothing=smoothing)
    assert math.isnan(mean.item())
    assert torch.count_nonzero(grads["input"]) == 0
    total, _ = check(x, t, reduction="sum", label_smoothing=smoothing)
    assert total.item() == 0.0


def test_zero_total_weight_is_nan(backend, device):
    x = random_logits((4, 5), torch.float32, device)
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], device=device)
    check(x, torch.full((4,), 2, device=device), w)


def test_non_finite_logits(backend, device):
    x = random_logits((4, 6), torch.float32, device)
    x[0, 1] = float("-inf")  # one impossible class: still a finite loss
    x[1, 2] = float("nan")
    x[2, :] = 1e30
    check(x, torch.tensor([0, 0, 3, 5], device=device), reduction="none")


@pytest.mark.parametrize("n_classes", [40, 40000])
def test_upstream_gradients(backend, device, row_plan, n_classes):
    x = random_logits((5, n_classes), torch.bfloat16, device).requires_grad_(True)
    t = class_target((5,), n_classes, device)
    ref_x = x.detach().double().cpu().requires_grad_(True)

    check_upstream_gradients(x, ref_x, lambda: fl.cross_entropy(x, t),
                             lambda: F.cross_entropy(ref_x, t.cpu()), torch.bfloat16)

def test_deterministic(backend, device, row_plan):
    x = random_logits((9, 50000), torch.bfloat16, device).requires_grad_(True)
    t = class_target((9,), 50000, device, ignore_frac=0.2)
    runs = []
    for _ in range(2):
        x.grad = None
        loss = fl.cross_entropy(x, t, label_smoothing=0.1)
        loss.backward()
        runs.append((loss.detach().clone(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_logits_are_not_modified(backend, device):
    x = random_logits((4, 100), torch.bfloat16, device).requires_grad_(True)
    before = x.detach().clone()
    fl.cross_entropy(x, class_target((4,), 100, device)).backward()
    assert torch.equal(x.detach(), before)


def test_no_grad_and_eval(backend, device):
    x = random_logits((4, 100), torch.float32, device)
    t = class_target((4,), 100, device)
    with torch.no_grad():
        loss = fl.cross_entropy(x.requires_grad_(True), t)
    assert loss.grad_fn is None
    assert_close(loss, F.cross_entropy(x.detach().double().cpu(), t.cpu()), torch.float32, "loss")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_double_backward(backend, device, reduction, prob):
    # create_graph=True: second derivatives through the loss, as torch's (a Hessian-vector
    # product), not the zeros a constant kernel gradient would give
    x = random_logits((5, 40), torch.float32, device)
    if prob:
        t = torch.softmax(random_logits((5, 40), torch.float32, device, seed=2), -1)
    else:
        t = class_target((5,), 40, device, ignore_frac=0.2)
    w = class_weight(40, torch.float32, device)
    v = random_logits((5, 40), torch.float32, device, seed=3)

    def hvp(fn, x, t, w):
        x = x.detach().clone().requires_grad_(True)
        loss = fn(x, t, w, reduction=reduction, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
        (g * v.to(x)).sum().backward()
        return g.detach(), x.grad

    g, h = hvp(fl.cross_entropy, x, t, w)
    ref_t = t.cpu().double() if prob else t.cpu()
    ref_g, ref_h = hvp(F.cross_entropy, x.cpu().double(), ref_t, w.cpu().double())
    assert_close(g, ref_g, torch.float32, "gradient")
    assert torch.count_nonzero(h) > 0
    assert_close(h, ref_h, torch.float32, "Hessian-vector product")


# --------------------------------------------------------------------------------------
# inplace_backward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n_classes", [50, 40000])
def test_inplace_backward(backend, device, row_plan, reduction, n_classes):
    leaf = random_logits((4, n_classes), torch.float32, device).requires_grad_(True)
    t = class_target((4,), n_classes, device)
    ref_leaf = leaf.detach().double().cpu().requires_grad_(True)
    loss = fl.cross_entropy(leaf * 1.0, t, reduction=reduction, inplace_backward=True)
    ref = F.cross_entropy(ref_leaf * 1.0, t.cpu(), reduction=reduction)
    go = torch.rand(ref.shape, dtype=torch.float64)
    loss.backward(go.float().to(device))
    ref.backward(go)
    assert_close(leaf.grad, ref_leaf.grad, torch.float32, "grad")


def test_inplace_backward_refusals(backend, device):
    t = class_target((4,), 30, device)
    leaf = random_logits((4, 30), torch.float32, device).requires_grad_(True)
    with pytest.raises(RuntimeError, match="leaf"):
        fl.cross_entropy(leaf, t, inplace_backward=True)
    if backend == "torch":
        return  # the eager path never writes into the logits
    # another op's backward needs the logits (exp saves its output): torch's version check
    # stops it with its usual error instead of letting it use the overwritten values
    logits = torch.exp(leaf)
    loss = fl.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # a second backward through a graph whose logits were overwritten
    loss = fl.cross_entropy(leaf * 2, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


# --------------------------------------------------------------------------------------
# properties, hypothesis sweeps
# --------------------------------------------------------------------------------------


def test_properties(backend, device):
    x = random_logits((6, 300), torch.float32, device)
    t = class_target((6,), 300, device)
    base = fl.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    shifted = fl.cross_entropy(x + 100, t, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-4)  # shift invariance
    flat = fl.cross_entropy(torch.zeros(3, 300, device=device), t[:3], reduction="none")
    torch.testing.assert_close(flat, torch.full((3,), math.log(300), device=device))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n_rows=st.integers(1, 9),
    n_classes=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    weighted=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    ignore_index=st.sampled_from([-100, -1, 0, 2]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_class_targets(n_rows, n_classes, dtype, reduction, smoothing, weighted,
                                  ignore_frac, ignore_index, seed):
    for backend in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_LOSSES_BACKEND", backend)
            device = "cpu" if backend == "torch" else _kernel_device()
            x = random_logits((n_rows, n_classes), dtype, device, seed=seed)
            t = class_target((n_rows,), n_classes, device, ignore_index, ignore_frac, seed)
            w = class_weight(n_classes, dtype, device, seed) if weighted else None
            check(x, t, w, reduction=reduction, label_smoothing=smoothing,
                  ignore_index=ignore_index)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 3),
    n_classes=st.integers(2, 260),
    spatial=st.sampled_from([(1,), (7,), (3, 5), (130,), (2, 1, 3)]),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.3]),
    weighted=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    ignore_index=st.sampled_from([-100, 0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_k_dimensional(n, n_classes, spatial, dtype, reduction, smoothing, weighted,
                                  ignore_frac, ignore_index, seed):
    # (N, C, d1, ..., dK): tiles of positions up to 256 classes, rows of classes above
    for backend in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_LOSSES_BACKEND", backend)
            device = "cpu" if backend == "torch" else _kernel_device()
            x = random_logits((n, n_classes, *spatial), dtype, device, seed=seed)
            t = class_target((n, *spatial), n_classes, device, ignore_index, ignore_frac, seed)
            w = class_weight(n_classes, dtype, device, seed) if weighted else None
            # torch's own float32 smoothing gradient (the eager path) is up to ~2x the
            # tolerance off where p_c and e / C cancel over hundreds of rows; the kernels are not
            slack = 3.0 if backend == "torch" and smoothing else 1.0
            check(x, t, w, slack=slack, reduction=reduction, label_smoothing=smoothing,
                  ignore_index=ignore_index)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.sampled_from([(3, 5), (2, 4, 3), (1, 33000), (2, 6, 2, 2)]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.25]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_probability_targets(shape, reduction, smoothing, weighted, seed):
    for backend in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_LOSSES_BACKEND", backend)
            device = "cpu" if backend == "torch" else _kernel_device()
            x = random_logits(shape, torch.float32, device, seed=seed)
            g = torch.Generator().manual_seed(seed)
            t = torch.rand(shape, generator=g).to(device)  # need not sum to 1
            w = class_weight(shape[1] if len(shape) > 1 else shape[0], torch.float32, device,
                             seed) if weighted else None
            check(x, t, w, grad_target=True, reduction=reduction, label_smoothing=smoothing)


def _kernel_device():
    from conftest import KERNEL_DEVICE

    return KERNEL_DEVICE


# --------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------


def test_module_matches_torch(backend, device):
    w = class_weight(12, torch.float32, device)
    ours = fl.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.2)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum",
                                       label_smoothing=0.2)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys() == {"weight"}
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = random_logits((7, 12), torch.float32, device)
    t = class_target((7,), 12, device)
    ref = torch.nn.CrossEntropyLoss(weight=w.double().cpu(), ignore_index=3, reduction="sum",
                                    label_smoothing=0.2)
    assert_close(ours(x, t), ref(x.double().cpu(), t.cpu()), torch.float32, "loss")
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        legacy = fl.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"


def test_module_moves_weight_with_to():
    m = fl.CrossEntropyLoss(weight=torch.ones(3)).to(torch.float64)
    assert m.weight.dtype == torch.float64


# --------------------------------------------------------------------------------------
# CUDA only: sizes and properties the interpreter cannot reach
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_over_2_pow_32_elements():
    # 16,384 x 262,144 bf16 logits: 2^32 elements. Row offsets overflow int32 long before.
    n, v = 16384, 262144
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda")
    loss = fl.cross_entropy(x, t, reduction="none")
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    ref = F.cross_entropy(x.detach()[rows].double(), t[rows], reduction="none")
    assert_close(loss[rows], ref, torch.bfloat16, "loss of the last rows")
    loss.sum().backward()
    ref_x = x.detach()[rows].double().requires_grad_(True)
    F.cross_entropy(ref_x, t[rows], reduction="sum").backward()
    assert_close(x.grad[rows], ref_x.grad, torch.bfloat16, "grad of the last rows")


@pytest.mark.cuda
def test_peak_memory_is_logits_plus_grad():
    n, v = 4096, 128256
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fl.cross_entropy(logits, t).backward()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= logits.numel() * 2 + 64 * n + 2**20, extra  # gradient + O(N)


@pytest.mark.cuda
def test_out_of_range_target_on_cuda_is_nan():
    x = torch.randn(4, 10, device="cuda")
    loss = fl.cross_entropy(x, torch.tensor([1, 2, 99, 3], device="cuda"), reduction="none")
    torch.cuda.synchronize()  # the context must still be healthy
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    assert torch.isnan(fl.cross_entropy(x, torch.tensor([1, -5, 2, 3], device="cuda")))


@pytest.mark.cuda
def test_operands_on_another_device_raise():
    x = torch.randn(4, 10, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        fl.cross_entropy(x, torch.tensor([1, 2, 3, 4]))
    with pytest.raises(RuntimeError, match="same device"):
        fl.cross_entropy(x, torch.tensor([1, 2, 3, 4], device="cuda"), weight=torch.ones(10))
