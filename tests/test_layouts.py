"""Operand layouts: every tensor argument as a strided, sliced, transposed, permuted or
expanded view, against torch in float64, both backends.

``cross_entropy`` and ``linear_cross_entropy`` are called on views of their operands (input,
weights, bias, class or probability targets, class weight), drawn by hypothesis together
with the options and small chunks; the reference is torch on float64 copies of the same
rounded storage, viewed the same way, with a random upstream gradient: the value and the
gradient of every view that takes one. The regressions first: what randomized differential
tests of this kind found (issue 15, section 2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, reference_cross_entropy
from conftest import KERNEL_DEVICE
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fused_losses as fl

# ------------------------------------------------------------------------------------------
# operands as views of a storage, and the differential check
# ------------------------------------------------------------------------------------------


class Layout(NamedTuple):
    """How an operand of some shape lies in its storage: its dimensions stored in the order
    ``perm`` (the first outermost), each every ``step`` elements from ``offset``; the
    dimensions in ``expanded`` stride 0 (one element stored, expanded)."""

    perm: tuple = ()
    step: int = 1
    offset: int = 0
    expanded: frozenset = frozenset()

    def base_shape(self, shape) -> list:
        return [1 if d in self.expanded else shape[d] * self.step + self.offset
                for d in self.perm or range(len(shape))]

    def view(self, base: torch.Tensor, shape, expand: bool = True) -> torch.Tensor:
        """The operand (``shape``) in ``base``; with ``expand=False``, its stored elements
        (size 1 along the expanded dimensions)."""
        perm = self.perm or tuple(range(len(shape)))
        v = base[tuple(slice(None) if d in self.expanded else slice(self.offset, None, self.step)
                       for d in perm)]
        v = v.permute([perm.index(d) for d in range(len(shape))])
        return v.expand(tuple(shape)) if expand else v


class Operand(NamedTuple):
    """A tensor argument: its storage (CPU, the operand's dtype) and the view the call
    gets."""

    base: torch.Tensor
    make: Callable[[torch.Tensor], torch.Tensor] = lambda b: b


def laid_out(values: torch.Tensor, layout: Layout) -> Operand:
    """``values`` stored as ``layout`` says (along an expanded dimension, its first element).
    The storage's other elements hold garbage, NaN or a class out of any range: an operand
    read as if it were laid out otherwise gives a wrong number or an error."""
    shape = tuple(values.shape)
    fill = math.nan if values.is_floating_point() else -(2**40)
    base = torch.full(layout.base_shape(shape), fill, dtype=values.dtype)
    if values.numel():
        stored = layout.view(base, shape, expand=False)
        stored.copy_(values[tuple(slice(0, n) for n in stored.shape)])
    return Operand(base, lambda b: layout.view(b, shape))


def run(fn, ops: dict, grads, out_dtype, *, dtype=None, device="cpu", seed=1, **kwargs):
    """``fn`` on the views of ``ops`` (floating storage in ``dtype`` if given, on ``device``),
    backward with a random upstream gradient rounded to ``out_dtype``: (the result, {name:
    d out / d the view}). (The view's gradient is what the call returned: autograd's sum
    over an expanded dimension, in the operand's dtype, is torch's business, not the
    loss's.)"""
    views = {}
    for name, op in ops.items():
        if op is None:
            views[name] = None
            continue
        base = op.base.to(device)
        if dtype is not None and base.is_floating_point():
            base = base.to(dtype)
        if name in grads:
            base = base.detach().clone().requires_grad_(True)
        views[name] = op.make(base)
        if name in grads:
            views[name].retain_grad()
    out = fn(**views, **kwargs)
    g = torch.Generator().manual_seed(seed)
    grad_out = (torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5).to(out_dtype)
    if grads:
        out.backward(grad_out.to(out.dtype).to(out.device))
    return out.detach(), {name: views[name].grad for name in grads}


def differential(ours, theirs, ops: dict, grads, out_dtype, device, *, own=False, terms=None,
                 **kwargs):
    """``ours`` on the current backend against ``theirs`` in float64, on the same views of
    the same rounded storage: the value and the gradient of each view in ``grads``.
    ``own``: allow twice torch's own error in the operands' dtype too (a bfloat16 LM head,
    whose logits torch rounds); ``terms(name, reference gradient)``: the size of the terms
    that cancel in it (the tolerance policy)."""
    grads = {name for name in grads if ops.get(name) is not None}
    out, got = run(ours, ops, grads, out_dtype, device=device, **kwargs)
    ref, ref_grads = run(theirs, ops, grads, out_dtype, dtype=torch.float64, **kwargs)
    torch_own = {}
    if own:
        own_out, own_grads = run(theirs, ops, grads, out_dtype, **kwargs)
        # (an empty result has no error to allow)
        torch_own = {k: v for k, v in dict(own_grads, out=own_out).items() if v.numel()}
    assert out.dtype == out_dtype and out.device.type == torch.device(device).type
    assert_close(out, ref, out_dtype, "loss", torch_own=torch_own.get("out"))
    for name in sorted(grads):
        assert got[name].dtype == ops[name].base.dtype
        assert_close(got[name], ref_grads[name], ops[name].base.dtype, f"d loss / d {name}",
                     terms=0.0 if terms is None else terms(name, ref_grads[name]),
                     torch_own=torch_own.get(name))


def head_reference(input, linear_weight, target, linear_bias=None, weight=None,
                   ignore_index=None, chunk_size=None, **kwargs):
    """``cross_entropy(linear(...))`` with softcap and z-loss, K-dimensional heads too."""
    n_classes, out_features = linear_weight.shape[0], linear_weight.shape[1:-1]
    logits = F.linear(input, linear_weight.reshape(-1, linear_weight.shape[-1]),
                      None if linear_bias is None else linear_bias.reshape(-1))
    logits = logits.reshape(*input.shape[:-1], n_classes, *out_features)
    return reference_cross_entropy(logits, target, weight,
                                   -100 if ignore_index is None else ignore_index, **kwargs)


def check_head(ops: dict, **kwargs):
    """``linear_cross_entropy`` on the views of ``ops`` against ``head_reference``."""
    dtype = ops["input"].base.dtype
    prob = ops["target"].base.is_floating_point()
    sizes = {}

    def terms(name, g):
        """The size of the terms that cancel in d loss / d ``name``: for the input, the
        weight and the bias, those of d loss / d logits (``logit_terms``) through the GEMMs
        in absolute value; for probabilities, p_c S and w_c t'_c (a thousandth of the
        gradient, as test_linear_cross_entropy's)."""
        if name == "target":
            return float(g.abs().max()) * 1e-3 if g.numel() else 0.0
        if not sizes:
            x = ops["input"].make(ops["input"].base.double())
            w = ops["linear_weight"].make(ops["linear_weight"].base.double())
            b = None if ops["linear_bias"] is None else ops["linear_bias"].make(
                ops["linear_bias"].base.double())
            logits = F.linear(x, w.reshape(-1, w.shape[-1]), None if b is None
                              else b.reshape(-1)).reshape(*x.shape[:-1], *w.shape[:-1])
            du = logit_terms(logits, ops["target"], ops["weight"], dtype,
                             **_cross_entropy_options(kwargs))
            du = du.reshape(-1, w[..., 0].numel())
            x, w = x.reshape(-1, x.shape[-1]).abs(), w.reshape(-1, w.shape[-1]).abs()
            sizes.update(input=du @ w, linear_weight=du.t() @ x, linear_bias=du.sum(0))
        size = sizes[name]
        return float(size.max()) if size.numel() else 0.0

    differential(fl.linear_cross_entropy, head_reference, ops,
                 {"input", "linear_weight", "linear_bias", "target"} if prob
                 else {"input", "linear_weight", "linear_bias"},
                 dtype, _device(), own=dtype != torch.float32, terms=terms, **kwargs)


def _cross_entropy_options(kwargs: dict) -> dict:
    """A linear_cross_entropy call's options as reference_cross_entropy's."""
    kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    if kwargs.get("ignore_index", 0) is None:
        kwargs.pop("ignore_index")
    return kwargs


def logit_terms(logits, target: Operand, weight: Operand | None, out_dtype, **kwargs):
    """The size of the terms that cancel in d loss / d logits, elementwise (float64): the
    gradient's own, and that of p_c and 1 (or of p_c S and w_c t'_c): the gradient at
    uniform logits (as test_cross_entropy's) and at logits rising along the classes (where
    uniform probabilities cancel a uniform target's exactly)."""
    class_dim = 0 if logits.dim() == 1 else 1
    n_classes = logits.shape[class_dim]
    ramp = torch.arange(n_classes, dtype=torch.float64) / max(n_classes, 1)
    ramp = ramp.view(-1, *[1] * (logits.dim() - class_dim - 1)).expand_as(logits)
    size = torch.zeros_like(logits)
    for z in (logits.detach(), torch.zeros_like(logits), ramp):
        _, dz = run(reference_cross_entropy, {"input": Operand(z), "target": target,
                                              "weight": weight},
                    {"input"}, out_dtype, dtype=torch.float64, **kwargs)
        size += dz["input"].abs()
    return size


def check_cross_entropy(ops: dict, **kwargs):
    """``cross_entropy`` on the views of ``ops`` against torch's (softcap and z-loss as
    ``reference_cross_entropy``)."""
    dtype = ops["input"].base.dtype
    prob = ops["target"].base.is_floating_point()

    def terms(name, g):
        if name != "input":
            return 0.0
        x = ops["input"].make(ops["input"].base.double())
        size = logit_terms(x, ops["target"], ops["weight"], dtype, **kwargs)
        return float(size.max()) if size.numel() else 0.0

    differential(fl.cross_entropy, reference_cross_entropy, ops,
                 {"input", "target"} if prob else {"input"}, dtype, _device(), terms=terms,
                 **kwargs)


def _device():
    """The current backend's device (the ``backend`` fixture sets it)."""
    return KERNEL_DEVICE if os.environ.get("FUSED_LOSSES_BACKEND") == "triton" else "cpu"


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def quarters(*shape, seed=0, dtype=torch.float32):
    """Normal values rounded to multiples of 1/4 (exact in bfloat16 up to 64)."""
    return (randn(*shape, seed=seed, dtype=torch.float64) * 4).round().div(4).to(dtype)


def classes(shape, n_classes, seed=0, ignore_frac=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, max(n_classes, 1), shape, generator=g)
    if ignore_frac:
        t[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return t


def probabilities(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)  # need not sum to 1


# ------------------------------------------------------------------------------------------
# regressions (issue 15, section 2)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["channels-last", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_dimensional_permuted_input_with_smoothing(backend, reduction, layout, dtype):
    # the eager path's backward raised "grad_input must be contiguous" (torch's 4-D
    # nll_loss refuses a strided input's gradient)
    make = ((lambda b: b.to(memory_format=torch.channels_last)) if layout == "channels-last"
            else (lambda b: b.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)))
    ops = {"input": Operand(randn(4, 5, 3, 3, scale=3.0, dtype=dtype), make),
           "target": Operand(classes((4, 3, 3), 5, ignore_frac=0.2)), "weight": None}
    check_cross_entropy(ops, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(5, 0), (5, 0, 3), (0, 0)])
def test_probability_targets_of_no_class(backend, reduction, shape):
    # torch's test_cross_entropy_loss_zero_div (its issue #73165): a ZeroDivisionError in
    # the denominators; torch's mean is 0 / 0 (NaN), its sum 0, each row's loss 0
    x = torch.rand(shape, requires_grad=True)
    t = torch.rand(shape, requires_grad=True)
    loss = fl.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    expected = F.cross_entropy(x.detach(), t.detach(), reduction=reduction, label_smoothing=0.1)
    assert loss.shape == expected.shape and loss.dtype == expected.dtype
    torch.testing.assert_close(loss, expected, equal_nan=True)
    loss.sum().backward()
    assert x.grad.shape == x.shape and t.grad.shape == t.shape


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_class_targets_of_no_class(backend, reduction, smoothing):
    # every target ignored, rows of no class: torch's 0 (a mean 0 / 0), NaN with smoothing
    # (e / C = inf times 0)
    x = torch.rand(5, 0, requires_grad=True)
    t = torch.full((5,), -100)
    loss = fl.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing)
    expected = F.cross_entropy(x.detach(), t, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    loss.sum().backward()
    assert x.grad.shape == x.shape


def _head(n, h, c, seed=0, out_features=()):
    return (randn(n, h, seed=seed), randn(c, *out_features, h, seed=seed + 1, scale=0.5),
            randn(c, *out_features, seed=seed + 2))


@pytest.mark.parametrize(
    "target",
    ["labels[::2]", "labels2d[:, 1]", "labels[::2], 4 tokens"],
)
def test_head_strided_class_targets(backend, target):
    # the kernel path read the raw storage: 9.9456 for 9.6556, 10.3896 for 9.5802, NaN
    n, c = (4, 12) if "4 tokens" in target else (40, 50)
    x, w, b = _head(n, 16, c)
    labels = classes((2 * n,), c, seed=3)
    make = ((lambda t: t[::2]) if "::2" in target
            else (lambda t: t.view(n, 2)[:, 1]))
    ops = {"input": Operand(x), "linear_weight": Operand(w), "target": Operand(labels, make),
           "linear_bias": None, "weight": None}
    check_head(ops, chunk_size=16)
    check_head(dict(ops, linear_bias=Operand(b)), chunk_size=3, reduction="none",
               label_smoothing=0.1)


def test_head_strided_class_weight(backend):
    x, w, _ = _head(8, 16, 12)
    ops = {"input": Operand(x), "linear_weight": Operand(w),
           "target": Operand(classes((8,), 12, seed=3, ignore_frac=0.25)), "linear_bias": None,
           "weight": Operand(probabilities((24,), seed=4) + 0.25, lambda v: v[::2])}
    check_head(ops, chunk_size=3)
    check_head(ops, chunk_size=5, reduction="sum", label_smoothing=0.2)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_head_strided_probability_targets(backend, layout, reduction):
    # 423.06 for 426.78; a weight-gradient entry -0.0053 for -0.0894
    x, w, b = _head(8, 16, 12)
    if layout == "transposed":
        target = Operand(probabilities((12, 8), seed=5), lambda p: p.t())
    else:
        target = Operand(probabilities((8, 15), seed=5), lambda p: p[:, 2:14])
    ops = {"input": Operand(x), "linear_weight": Operand(w), "target": target,
           "linear_bias": Operand(b), "weight": None}
    check_head(ops, chunk_size=3, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_head_transposed_input(backend, reduction):
    # x = h_t.t(): the kernel path's gradient buffer kept the transposed strides, and the
    # backward's scale viewed it flat ("view size is not compatible ...")
    x, w, b = _head(8, 16, 12)
    ops = {"input": Operand(x.t().contiguous(), lambda h_t: h_t.t()),
           "linear_weight": Operand(w), "target": Operand(classes((8,), 12, seed=3)),
           "linear_bias": Operand(b), "weight": None}
    check_head(ops, chunk_size=3, reduction=reduction)


@pytest.mark.parametrize("out_features", [(1,), (1, 1)])
def test_head_k_dimensional_unit_dims(backend, out_features):
    # a weight (C, 1, H) and bias (C, 1): "The expanded size of the tensor (4) must match
    # the existing size (12)" (the bias was flattened only for more than one position)
    x, w, b = _head(8, 16, 12, out_features=out_features)
    ops = {"input": Operand(x), "linear_weight": Operand(w),
           "target": Operand(classes((8, *out_features), 12, seed=3)),
           "linear_bias": Operand(b), "weight": None}
    check_head(ops, chunk_size=3)
    check_head(dict(ops, target=Operand(probabilities((8, 12, *out_features), seed=4))),
               chunk_size=3, reduction="none")


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_head_non_finite_input_on_an_ignored_row(backend, value):
    # torch's backward: the ignored row's log_softmax is NaN, and 0 x NaN spreads NaN
    # through the weight's and bias's gradients and that row's input gradient. The eager
    # path is torch's formula (the same). The kernels read no logit of an ignored row (its
    # logits' gradient is 0): NaN only where the GEMM meets the non-finite entry, its column
    # of the weight's gradient; the rest is the gradient of the row made finite (README,
    # "Where it differs from torch's").
    x, w, b = _head(8, 16, 12)
    t = classes((8,), 12, seed=3)
    t[2] = -100
    x_bad = x.clone()
    x_bad[2, 5] = value

    def grads(fn, x, dtype, device="cpu"):
        leaves = [v.to(dtype).to(device).detach().clone().requires_grad_(True)
                  for v in (x, w, b)]
        loss = fn(leaves[0], leaves[1], t.to(device), linear_bias=leaves[2], chunk_size=3)
        loss.backward(torch.tensor(0.75, dtype=loss.dtype, device=device))
        return [v.grad for v in leaves]

    ours = grads(fl.linear_cross_entropy, x_bad, torch.float32, _device())
    if backend == "torch":
        expected = grads(head_reference, x_bad, torch.float64)
        assert expected[1].isnan().all()
    else:
        expected = grads(head_reference, torch.where(torch.arange(8)[:, None] == 2, 0.0, x),
                         torch.float64)
        expected[1][:, 5] = math.nan
    for got, exp, what in zip(ours, expected, ("input", "weight", "bias"), strict=True):
        assert_close(got, exp, torch.float32, f"d loss / d {what}")


@pytest.mark.parametrize("view", ["rows", "transposed", "itself"])
def test_inplace_backward_refuses_a_view_of_a_leaf(backend, view):
    # the kernels wrote the gradient over the leaf's own values (torch refuses an in-place
    # op on a view of a leaf that requires grad); a view of a non-leaf is served
    leaf = randn(5, 7).requires_grad_(True)
    make = {"rows": lambda v: v[1:], "transposed": lambda v: v.t(), "itself": lambda v: v}[view]
    t = classes((4,) if view == "rows" else (7 if view == "transposed" else 5,), 5)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="inplace_backward=True.*view of one"):
        fl.cross_entropy(make(leaf), t, inplace_backward=True)
    assert torch.equal(leaf.detach(), before)
    loss = fl.cross_entropy(make(leaf * 1.0), t, inplace_backward=True)
    loss.backward()
    assert torch.equal(leaf.detach(), before)
    wide = leaf.detach().double().requires_grad_(True)
    F.cross_entropy(make(wide), t).backward()
    assert_close(leaf.grad, wide.grad, torch.float32, "d loss / d leaf")


def test_scale_by_upstream_any_dense_layout():
    # the backward's in-place scale of a gradient the forward wrote, whatever its layout
    pytest.importorskip("triton")
    from fused_losses.kernels._common import scale_by_upstream_

    for grad in (randn(6, 5).t(), randn(6, 5, 4).permute(2, 0, 1),
                 randn(6, 5, 4, 3).to(memory_format=torch.channels_last)):
        expected = grad * 1.5
        scale_by_upstream_(grad, torch.tensor(1.5))
        assert torch.equal(grad, expected)
    with pytest.raises(ValueError, match="fill their storage"):
        scale_by_upstream_(randn(4, 4)[:, ::2], torch.tensor(1.5))


# ------------------------------------------------------------------------------------------
# the sweep: every tensor argument in a random layout, with random options
# ------------------------------------------------------------------------------------------


@st.composite
def layouts(draw, n_dims: int):
    """Contiguous, transposed or permuted, every other element, offset in its storage, a
    dimension expanded (stride 0), and their combinations."""
    perm = tuple(draw(st.permutations(range(n_dims))))
    expanded = frozenset(draw(st.sets(st.integers(0, n_dims - 1), max_size=1))
                         if n_dims else ())
    return Layout(perm, draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, 1])), expanded)


OPTIONS = dict(
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    softcap=st.sampled_from([None, 2.0]),
    z_loss=st.sampled_from([0.0, 0.01]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       n=st.integers(0, 5), h=st.integers(1, 6), n_classes=st.integers(1, 9),
       out_features=st.sampled_from([(), (), (1,), (2,), (2, 1)]),
       unbatched=st.booleans(), prob=st.booleans(), bias=st.booleans(),
       weighted=st.booleans(), ignore_index=st.sampled_from([None, 0]),
       chunk_size=st.sampled_from([None, 1, 2, 3]), seed=st.integers(0, 2**16), **OPTIONS)
def test_head_layouts(backend, data, dtype, n, h, n_classes, out_features, unbatched, prob,
                      bias, weighted, ignore_index, chunk_size, seed, **options):
    unbatched = unbatched and not out_features  # (a K-dimensional head needs a batch)
    batch = () if unbatched else (max(n, 1) if out_features else n,)
    # Multiples of 1/4: the logits are exact in float32, so their rounding (which the
    # z-loss's gradient, proportional to them, would carry beyond any tolerance where a
    # GEMM's terms cancel) is not what is measured; the gradients' GEMMs are.
    ops = {
        "input": quarters(*batch, h, seed=seed, dtype=dtype),
        "linear_weight": quarters(n_classes, *out_features, h, seed=seed + 1, dtype=dtype),
        "linear_bias": quarters(n_classes, *out_features, seed=seed + 2, dtype=dtype) if bias
        else None,
        "weight": probabilities((n_classes,), seed + 3, dtype) + 0.25 if weighted else None,
    }
    if prob:
        ignore_index = None
        ops["target"] = probabilities((*batch, n_classes, *out_features), seed + 4, dtype)
    else:
        ops["target"] = classes((*batch, *out_features), n_classes, seed + 4, ignore_frac=0.3,
                                ignore_index=-100 if ignore_index is None else ignore_index)
    drawn = {name: data.draw(layouts(v.dim()), label=name) for name, v in ops.items()
             if v is not None}
    # (not in bfloat16: a weight whose every class is one row, expanded. The input's
    # gradient is then exactly 0, and ours the sum of the bfloat16 roundings of d loss /
    # d logits, as torch's bfloat16 path rounds them, which the allowance for torch's own
    # error covers only where its rounding happens to be as large.)
    assume(dtype == torch.float32 or 0 not in drawn["linear_weight"].expanded)
    ops = {name: None if v is None else laid_out(v, drawn[name]) for name, v in ops.items()}
    check_head(ops, ignore_index=ignore_index, chunk_size=chunk_size, **options)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       shape=st.sampled_from([(9,), (0, 4), (5, 3), (3, 1), (4, 7), (2, 4, 3), (2, 3, 2, 2),
                              (1, 5, 3, 1, 2), (2, 300, 2)]),
       prob=st.booleans(), weighted=st.booleans(), ignore_index=st.sampled_from([-100, 1]),
       seed=st.integers(0, 2**16), **OPTIONS)
def test_cross_entropy_layouts(backend, data, dtype, shape, prob, weighted, ignore_index, seed,
                               **options):
    # (300 classes: K-dimensional rows of classes, not the tiles of few classes)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    ops = {"input": randn(*shape, seed=seed, scale=3.0, dtype=dtype),
           "weight": probabilities((n_classes,), seed + 1, dtype) + 0.25 if weighted else None}
    if prob:
        ops["target"] = probabilities(shape, seed + 2, dtype)
    else:
        target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
        ops["target"] = classes(target_shape, n_classes, seed + 2, ignore_frac=0.3,
                                ignore_index=ignore_index)
    ops = {name: None if v is None else laid_out(v, data.draw(layouts(v.dim()), label=name))
           for name, v in ops.items()}
    check_cross_entropy(ops, **({} if prob else {"ignore_index": ignore_index}), **options)
