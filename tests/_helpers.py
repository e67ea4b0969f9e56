"""Shared test helpers: float64 references and the tolerance policy.

Tolerance policy (CONTRIBUTING.md): the reference is torch in float64 on the *same rounded*
inputs. Our result is computed in float32 and rounded once to the output dtype, so it must lie
within a few units in the last place of that dtype from the float64 value:

    |ours - ref| <= rtol(dtype) * |ref| + atol(dtype) * scale

with ``atol = ATOL_REL * max(max|ref|, terms) + ATOL_ABS(dtype)``: the relative part is
float32's arithmetic noise where terms cancel (p_y - 1 with p_y near 1), in proportion to the
size of the terms that cancel (``terms``, where the caller knows it: a confident row's
gradient is far smaller than its p_y and 1), the absolute part float16's
subnormal spacing (a softmax over 262k classes has elements near 1e-6, subnormal in float16).
Everything else is relative, so a tiny gradient element that is wrong still fails.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_losses as fl

# rtol: 2 ulps of the output dtype (float32: more, for sums over 262k terms).
RTOL = {torch.float32: 2e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 1e-12}
ATOL_REL = 2e-6
ATOL_ABS = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2**-24, torch.float64: 0.0}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 slack: float = 1.0, terms: float = 0.0,
                 torch_own: torch.Tensor | None = None) -> None:
    """``actual`` (any dtype, any device) against a float64 reference ``expected``;
    ``terms``: the size of the terms that cancel in it, if larger than its own values.
    ``torch_own``: torch's own result in the candidate's precision (float32 for the eager
    backend, which is torch's float32 ops; bfloat16 for a bf16 LM head, whose logits and
    their gradient torch rounds too): twice its largest error is allowed on top
    (flash-attn's bound, STYLE.md)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if actual.dtype == dtype and dtype != torch.float64:
        # one rounding to the output dtype: a reference past its range is that infinity
        # (a float16 sum of 65914 is inf, as torch's own)
        rounded = e.to(dtype).double()
        e = torch.where(torch.isinf(rounded) & torch.isfinite(e), rounded, e)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{what}: NaNs differ ({nan_a.sum()} vs {nan_e.sum()})"
    allowed = torch.zeros_like(e)
    if torch_own is not None:
        allowed += 2 * (torch_own.detach().double().cpu() - e).abs().nan_to_num(0.0).max()
    a, e, allowed = a[~nan_a], e[~nan_e], allowed[~nan_e]
    if e.numel() == 0:
        return
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]), f"{what}: infinities differ"
    a, e, allowed = a[~inf_e], e[~inf_e], allowed[~inf_e]
    if e.numel() == 0:
        return
    # A reference that is exactly zero everywhere (one class, a zero upstream gradient) leaves
    # float32's rounding noise of O(1) terms: 1 - 0.9 - 0.1 is 4e-9, not 0.
    scale = e.abs().max() if bool(e.any()) else torch.tensor(0.05, dtype=torch.float64)
    scale = torch.clamp(scale, min=terms)
    tol = slack * (RTOL[dtype] * e.abs() + ATOL_REL * scale + ATOL_ABS[dtype]) + allowed
    err = (a - e).abs()
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), (
        f"{what}: max error {err.max():.3e} over tolerance; at {worst}: got {a[worst]:.8e}, "
        f"expected {e[worst]:.8e} (dtype {dtype})"
    )


def random_logits(shape, dtype, device, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def loss_and_grads(fn, inputs: dict, grad_names, round_to: torch.dtype, grad_out_seed: int = 1,
                   **kwargs):
    """Run ``fn(**inputs, **kwargs)``, backward with a random upstream gradient.

    Returns (loss, {name: grad}) with the gradients of the tensors named in ``grad_names``.
    The upstream gradient is drawn in float64 and rounded to ``round_to`` (the candidate's
    output dtype), so a float64 reference and the candidate see the same numbers.
    """
    leaves = {}
    call = {}
    for name, value in inputs.items():
        if name in grad_names and value is not None:
            value = value.detach().clone().requires_grad_(True)
            leaves[name] = value
        call[name] = value
    loss = fn(**call, **kwargs)
    g = torch.Generator().manual_seed(grad_out_seed)
    grad_out = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(round_to)
    grad_out = grad_out.to(loss.dtype)
    loss.backward(grad_out.to(loss.device))
    return loss.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def positive(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 3 + 0.1).to(dtype).to(device)


def assert_raises_like_torch(ours, theirs):
    """``ours()`` raises the exception type and message ``theirs()`` (torch) raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as expected:
            theirs()
        with pytest.raises(expected.type) as got:
            ours()
    assert str(got.value) == str(expected.value)


def class_target(shape, n_classes, device, ignore_index=-100, ignore_frac=0.0, seed=0):
    """Class indices of ``shape``, a fraction of them ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, n_classes, shape, generator=g)
    if ignore_frac:
        t[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return t.to(device)


def class_weight(n_classes, dtype, device, seed=0):
    """Class weights in [0.25, 1.25)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.25).to(dtype).to(device)


def signature_of(fn):
    """Names, kinds and defaults (not annotations) of ``fn``'s parameters."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def check_upstream_gradients(x, ref_x, ours, theirs, dtype) -> None:
    """The input's gradient right for every way a loss meets autograd: scaled (gradient
    accumulation), used twice, times zero, a second backward through a retained graph, and
    two losses off one forward. ``ours()``/``theirs()`` compute the loss of ``x``/``ref_x``
    (a float64 copy); multipliers are exact in bfloat16, so both see the same upstream
    gradient."""

    def both(f):
        x.grad = ref_x.grad = None
        f(ours(), theirs())
        assert_close(x.grad, ref_x.grad, dtype, "grad")

    def twice(a, b):  # a second backward through a retained graph: 1 + 3
        a.backward(retain_graph=True), b.backward(retain_graph=True)
        (a * 3).backward(), (b * 3).backward()

    def two_losses(a, b):
        a2, b2 = a * 2, b * 2
        a2.backward(retain_graph=True), b2.backward(retain_graph=True)
        (a * -1).backward(), (b * -1).backward()

    both(lambda a, b: (a * 0.375).backward() or (b * 0.375).backward())  # accumulation steps
    both(lambda a, b: (a * 2 + a).backward() or (b * 2 + b).backward())  # used twice
    both(lambda a, b: (a * 0).backward() or (b * 0).backward())
    both(twice)
    both(two_losses)


# Each loss and torch's, for the tests that run all three the same way.
LOSS_PAIRS = {
    "cross_entropy": (fl.cross_entropy, F.cross_entropy),
    "bce": (fl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    "huber": (fl.huber_loss, F.huber_loss),
}


def loss_operands(loss: str, shape, device, seed: int = 0):
    """bfloat16 logits of ``shape`` and a target for ``loss`` (class indices, 0/1 labels or
    values), drawn on the CPU from ``seed`` and ``seed + 1``."""
    dtype = torch.bfloat16
    x = random_logits(shape, dtype, "cpu", seed=seed)
    if loss == "cross_entropy":
        g = torch.Generator().manual_seed(seed + 1)
        t = torch.randint(0, shape[1], shape[:1], generator=g)
    elif loss == "bce":
        t = (random_logits(shape, dtype, "cpu", seed=seed + 1) > 0).to(dtype)
    else:
        t = random_logits(shape, dtype, "cpu", seed=seed + 1)
    return x.to(device), t.to(device)


def reference_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, *, softcap=None, z_loss=0.0,
                            return_z_loss=False):
    """The issue's definition of softcap and z-loss, in torch ops on the caller's dtype
    (float64 for references): the logits become ``softcap * tanh(logits / softcap)``, then
    torch's cross-entropy; the z-loss ``z_loss * lse**2`` of each counted row is reduced like
    the loss but unweighted (a mean divides by the rows counted: every row for
    probabilities); without z-loss its term is zero."""
    z = input if softcap is None else softcap * torch.tanh(input / softcap)
    loss = F.cross_entropy(z, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    class_dim = 0 if z.dim() == 1 else 1
    lse = torch.logsumexp(z, class_dim)
    if input.shape == target.shape:
        counted = torch.ones_like(lse, dtype=torch.bool)
    else:
        counted = target.long() != ignore_index  # (the rows the unsmoothed term counts)
    z_rows = torch.where(counted, z_loss * lse**2, 0.0)
    if not z_loss:  # no z-loss: its term is zero (not a mean over no rows)
        z_term = torch.zeros_like(loss)
    elif reduction == "none":
        z_term = z_rows
    elif reduction == "sum":
        z_term = z_rows.sum()
    else:
        z_term = z_rows.sum() / counted.sum()
    return (loss + z_term, z_term) if return_z_loss else loss + z_term
