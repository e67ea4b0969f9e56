"""Binary cross-entropy with logits (``weight``, ``pos_weight``): kernels, launchers and the
autograd.Function, top to bottom. The tile machinery it shares with ``huber.py`` is in
``_elementwise.py``.

Design (see ../shared/PERFORMANCE.md; an elementwise loss has no row statistics, so one pass):

- The loss's shape S (input and target; weight and pos_weight broadcast to it) is seen as a
  grid of (rows, cols) tiles. The dimensions of S are ordered by the input's strides, size-1
  dimensions dropped and neighbours merged wherever every operand allows, into at most three:
  (outer, inner, cols), a row being an (outer, inner) pair. Each operand has its own three
  strides in that view (0 where it is broadcast), so transposed, sliced or channels-last
  inputs and broadcast weights are read in place, never materialized.
- ``mean``/``sum`` with an input that needs its gradient (training): the forward reads input
  and target once, writes d loss / d input for an upstream gradient of 1, and one float32
  partial sum of the loss per program; the loss is ``partials.sum()``, a fixed-order second
  stage (no atomics: bitwise the same run to run). The backward only scales the gradient by
  the upstream gradient, on the device, and moves no byte when it is 1
  (``scale_by_upstream_``). HBM traffic: input and target read once, gradient written once,
  plus 4 bytes per program.
- ``none``, the target's gradient, and a second backward (``retain_graph=True``) keep the
  forward to the loss and compute the gradients in the backward (one more read of input and
  target; the upstream gradient is known there).
- Operands constant along rows (``pos_weight`` of shape (C,) against (N, C), a per-class
  ``weight``) are loaded once per program and reused for all its rows (``REUSE_ROWS``);
  per-row operands (a per-sample ``weight`` (N, 1)) once per row.
- ``create_graph=True`` (double backward) runs torch's own ops on the saved inputs, so
  second derivatives are right (the kernels' gradients would be constants to autograd).

Offsets are int64 (rows x cols may exceed 2^31); math is float32 whatever the dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import eager
from ._autograd import (
    detached_without_grad_mode,
    differentiable_backward,
    may_fuse_gradient,
    output_as,
)
from ._common import (
    float32_scratch,
    non_null,
    scale_by_upstream_,
)
from ._elementwise import NONE, TilePlan, _load_fixed, _load_tile, _tile_cols, _tile_rows, tile_view

# ------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------


@triton.jit
def _finite(v):
    return tl.abs(v) < float("inf")  # False for inf and NaN


@triton.jit
def _bce_kernel(
    # pointers (operands: the loss's shape in the tile view, any strides)
    x_ptr,  # logits
    t_ptr,  # targets
    w_ptr,  # weight
    pw_ptr,  # pos_weight
    grad_out_ptr,  # upstream gradient (backward)
    out_ptr,  # out: the loss (REDUCE=False), or one float32 partial sum per program
    grad_x_ptr,  # out: d loss / d logits, contiguous in the view, the logits' dtype
    grad_t_ptr,  # out: d loss / d targets, contiguous in the view, the targets' dtype
    # sizes
    n_rows,
    n_inner,
    n_cols,
    n_col_blocks,
    row_iters,  # tiles per program: a runtime bound (a constant 4 gets unrolled, and the
    #             unrolled tiles' addresses take up to 2.5x the registers)
    # strides (outer, inner, col) of each operand in the view, in elements
    stride_x_outer, stride_x_inner, stride_x_col,
    stride_t_outer, stride_t_inner, stride_t_col,
    stride_w_outer, stride_w_inner, stride_w_col,
    stride_pw_outer, stride_pw_inner, stride_pw_col,
    stride_grad_out_outer, stride_grad_out_inner, stride_grad_out_col,
    # scalars
    grad_scale,  # 1/N for mean, else 1
    # flags
    X_MODE: tl.constexpr,
    T_MODE: tl.constexpr,
    W_MODE: tl.constexpr,
    PW_MODE: tl.constexpr,
    GRAD_OUT_MODE: tl.constexpr,  # NONE: an upstream gradient of 1 (the fused forward)
    LOSS: tl.constexpr,  # forward: compute the loss
    REDUCE: tl.constexpr,  # write partial sums instead of the elementwise loss
    X_GRAD: tl.constexpr,
    T_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """torch's loss, l = w ((1 - t) x - (1 + (p - 1) t) log sigmoid(x)) with p = pos_weight, and
    its gradients, for ``row_iters`` tiles of BLOCK_R x BLOCK_C elements.

    With s = sigmoid(-|x|) and softplus(-|x|) = log1p(exp(-|x|)) (never overflowing):
      l       = w ((1 - t) x + (1 + (p - 1) t) softplus(-|x|))   x >= 0
              = w (-p t x    + (1 + (p - 1) t) softplus(-|x|))   x <  0
      dl/dx   = w ((1 - t) - (p t + 1 - t) s)    x >= 0,    w ((p t + 1 - t) s - p t)    x < 0
      dl/dt   = w (-x   + (p - 1) softplus(-|x|))     x >= 0 (-x without pos_weight)
              = w (-p x + (p - 1) softplus(-|x|))     x <  0
    The loss's terms are all non-negative for t in [0, 1] and p >= 0, so nothing cancels
    (torch's form loses x = -20, t = 0 entirely in float32), and the gradients subtract only
    terms of at most 1: accurate for logits up to +-1e4 and beyond. Where this form is not
    finite (infinite logits, weights or targets) the value is torch's own formula instead, so
    inf and NaN fall where torch's do.

    read: each FULL operand once per element (PER_COL/PER_ROW/SCALAR: once per program/row);
    write: the loss (or a partial per program), and each requested gradient once.
    """
    pid, row_block, cols, col_mask = _tile_cols(n_cols, n_col_blocks, BLOCK_C)
    # operands constant along rows: loaded once, reused by every row of the program
    x_c = _load_fixed(x_ptr, cols, col_mask, stride_x_col, X_MODE)
    t_c = _load_fixed(t_ptr, cols, col_mask, stride_t_col, T_MODE)
    w_c = _load_fixed(w_ptr, cols, col_mask, stride_w_col, W_MODE)
    pw_c = _load_fixed(pw_ptr, cols, col_mask, stride_pw_col, PW_MODE)
    go_c = _load_fixed(grad_out_ptr, cols, col_mask, stride_grad_out_col, GRAD_OUT_MODE)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for it in range(row_iters):
        rows, row_mask, outer, inner = _tile_rows(row_block, it, row_iters, n_rows,
                                                  n_inner, BLOCK_R)
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_tile(x_ptr, x_c, outer, inner, cols, row_mask, mask,
                       stride_x_outer, stride_x_inner, stride_x_col, X_MODE)
        t = _load_tile(t_ptr, t_c, outer, inner, cols, row_mask, mask,
                       stride_t_outer, stride_t_inner, stride_t_col, T_MODE)
        w = _load_tile(w_ptr, w_c, outer, inner, cols, row_mask, mask,
                       stride_w_outer, stride_w_inner, stride_w_col, W_MODE)
        p = _load_tile(pw_ptr, pw_c, outer, inner, cols, row_mask, mask,
                       stride_pw_outer, stride_pw_inner, stride_pw_col, PW_MODE)
        # the gradient buffers and the elementwise loss are contiguous in the view
        offs = rows[:, None] * n_cols + cols[None, :]

        e = tl.exp(-tl.abs(x))  # in (0, 1]: no overflow
        u = 1.0 + e
        # log1p(e) = log(u) * e / (u - 1), exact to rounding even where 1 + e rounds to 1
        # (a plain log(1 + e) is 0 for x > 17, where the loss is ~exp(-x))
        softplus = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
        log_sig = tl.minimum(x, 0.0) - softplus  # torch's log_sigmoid(x)

        if LOSS:
            if PW_MODE == NONE:
                stable = tl.where(x >= 0, (1.0 - t) * x, -t * x) + softplus
                torch_form = (1.0 - t) * x - log_sig
            else:
                lw = (p - 1.0) * t + 1.0
                stable = tl.where(x >= 0, (1.0 - t) * x, -(p * t) * x) + lw * softplus
                torch_form = (1.0 - t) * x - lw * log_sig
            loss = tl.where(_finite(stable), stable, torch_form) * w
            if REDUCE:
                acc += tl.where(mask, loss, 0.0)
            else:
                tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)

        if X_GRAD or T_GRAD:
            g = _load_tile(grad_out_ptr, go_c, outer, inner, cols, row_mask, mask,
                           stride_grad_out_outer, stride_grad_out_inner, stride_grad_out_col,
                           GRAD_OUT_MODE)
            scale = w * (g * grad_scale)
            if X_GRAD:
                s = e / u  # sigmoid(-|x|)
                if PW_MODE == NONE:
                    # finite wherever x and t are finite, and torch's inf/NaN elsewhere
                    d = tl.where(x >= 0, (1.0 - t) - s, s - t)
                else:
                    pt = p * t
                    lw = pt + 1.0 - t
                    stable = tl.where(x >= 0, (1.0 - t) - lw * s, lw * s - pt)
                    torch_form = lw * tl.where(x >= 0, 1.0 / u, s) - pt  # lw sigmoid(x) - pt
                    d = tl.where(_finite(stable), stable, torch_form)
                tl.store(grad_x_ptr + offs, (d * scale).to(grad_x_ptr.dtype.element_ty),
                         mask=mask)
            if T_GRAD:
                if PW_MODE == NONE:
                    dt = -x
                else:
                    stable = tl.where(x >= 0, -x, -p * x) + (p - 1.0) * softplus
                    # log_sigmoid(-x) - p log_sigmoid(x)
                    torch_form = (tl.minimum(-x, 0.0) - softplus) - p * log_sig
                    dt = tl.where(_finite(stable), stable, torch_form)
                tl.store(grad_t_ptr + offs, (dt * scale).to(grad_t_ptr.dtype.element_ty),
                         mask=mask)

    if LOSS and REDUCE:
        tl.store(out_ptr + pid, tl.sum(acc))


# ------------------------------------------------------------------------------------------
# launcher and autograd
# ------------------------------------------------------------------------------------------


def _launch_bce(view, x, t, w, pw, *, out=None, grad_x=None, grad_t=None, grad_out=None,
                grad_scale=1.0, reduce=False):
    """One pass of ``_bce_kernel``. Returns the partial sums when ``reduce``."""
    operands = {"x": x, "t": t, "w": w, "pw": pw, "grad_out": grad_out}
    plan = TilePlan(view, operands, dummy=x)
    if reduce:
        out = float32_scratch(plan.grid, x.device)
    plan.launch(
        _bce_kernel,
        writes=non_null(out_ptr=out, grad_x_ptr=grad_x, grad_t_ptr=grad_t),
        out_ptr=out if out is not None else x,
        grad_x_ptr=grad_x if grad_x is not None else x,
        grad_t_ptr=grad_t if grad_t is not None else x,
        grad_scale=grad_scale,
        LOSS=out is not None,
        REDUCE=reduce,
        X_GRAD=grad_x is not None,
        T_GRAD=grad_t is not None,
    )
    return out


class BCEWithLogitsFunction(torch.autograd.Function):
    """BCE with logits of ``x`` against ``t`` (same shape), ``w`` and ``pw`` broadcast to it
    (expanded views) or None."""

    @staticmethod
    def forward(ctx, x, t, w, pw, reduction, out_dtype):
        ctx.save_for_backward(x, t, w, pw)
        view, (x, t, w, pw) = tile_view(x.shape, x, t, w, pw)
        numel = x.numel()
        # The gradient in the forward pays off when the upstream gradient is one scalar.
        fused = (ctx.needs_input_grad[0] and reduction != "none" and not ctx.needs_input_grad[1]
                 and may_fuse_gradient())
        grad_scale = 1.0 / numel if reduction == "mean" else 1.0

        grad = flat_grad = None
        if fused:
            grad, flat_grad = view.new(x.dtype, x.device)
        if reduction == "none":
            out, _ = view.new(out_dtype, x.device)
            _launch_bce(view, x, t, w, pw, out=out)
        else:
            partials = _launch_bce(view, x, t, w, pw, grad_x=grad, grad_scale=grad_scale,
                                   reduce=True)
            out = partials.sum()  # fixed-order second stage
            if reduction == "mean":
                out = out / numel
            out = output_as(out, out_dtype)

        ctx.grad = (grad, flat_grad) if fused else None
        ctx.reduction = reduction
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, t, w, pw = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            ctx.grad = None
            loss_fn = lambda x, t: eager.binary_cross_entropy_with_logits(  # noqa: E731
                x, t, w, pw, ctx.reduction)
            return (*differentiable_backward(needs, grad_out, loss_fn, x, t), None, None, None,
                    None)
        grad_x = grad_t = None
        if ctx.grad is not None:
            # First backward after a fused forward: the gradient is already there.
            (grad_x, flat_grad), ctx.grad = ctx.grad, None
            scale_by_upstream_(flat_grad, grad_out)
        elif needs[0] or needs[1]:
            # a second backward, ``none``, or the target's gradient: one more pass
            view, (x, t, w, pw) = tile_view(x.shape, x, t, w, pw)
            grad_x = view.new(x.dtype, x.device)[0] if needs[0] else None
            grad_t = view.new(t.dtype, t.device)[0] if needs[1] else None
            grad_scale = 1.0 / x.numel() if ctx.reduction == "mean" else 1.0
            _launch_bce(view, x, t, w, pw, grad_x=grad_x, grad_t=grad_t,
                        grad_out=view.fit(grad_out), grad_scale=grad_scale)
        return grad_x, grad_t, None, None, None, None


# ------------------------------------------------------------------------------------------
# entry point (arguments already validated by fused_losses.functional)
# ------------------------------------------------------------------------------------------


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction, out_dtype):
    """The kernels' loss for a validated call with floating input and target of one shape,
    at least one element, and weights that broadcast to it; the result in ``out_dtype``."""
    shape = input.shape
    w = None if weight is None else weight.expand(shape)
    pw = None if pos_weight is None else pos_weight.expand(shape)
    input, target, w, pw = detached_without_grad_mode(input, target, w, pw)
    return BCEWithLogitsFunction.apply(input, target, w, pw, reduction, out_dtype)
