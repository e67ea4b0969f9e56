"""Huber loss (optionally weighted): the kernel, its launcher and the autograd.Function.

The layout is BCE's (``_elementwise.py``'s tile view and operand modes, one pass, partial
sums):

- ``mean``/``sum`` with an input that needs its gradient: the forward reads input and target
  once and writes the gradient (upstream gradient 1) and a float32 partial sum per program;
  the backward only scales it on the device, and moves nothing when the upstream gradient
  is 1. HBM traffic: input and target read once, gradient written once.
- ``none``, gradients for the target or the weight, and a second backward compute in the
  backward from the saved inputs.
- A target (or input) of another shape is broadcast as torch broadcasts it (after torch's
  warning): the kernel reads the expanded view in place, with zero strides. The gradient of
  a broadcast operand is written in float32 and summed over the broadcast dimensions in
  float32, then rounded once to the operand's dtype.
- ``create_graph=True`` (double backward) runs torch's own ops, so second derivatives are
  right (the kernels' gradients would be constants to autograd).
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
from ._elementwise import TilePlan, _load_fixed, _load_tile, _tile_cols, _tile_rows, tile_view


@triton.jit
def _huber_kernel(
    # pointers (operands: the broadcast shape in the tile view, any strides)
    x_ptr,  # input
    t_ptr,  # target
    w_ptr,  # weight
    grad_out_ptr,  # upstream gradient (backward)
    out_ptr,  # out: the loss (REDUCE=False), or one float32 partial sum per program
    grad_x_ptr,  # out: gradients, contiguous in the view, in their operand's dtype
    grad_t_ptr,
    grad_w_ptr,
    # sizes
    n_rows,
    n_inner,
    n_cols,
    n_col_blocks,
    row_iters,  # tiles per program
    # strides (outer, inner, col) of each operand in the view, in elements
    stride_x_outer, stride_x_inner, stride_x_col,
    stride_t_outer, stride_t_inner, stride_t_col,
    stride_w_outer, stride_w_inner, stride_w_col,
    stride_grad_out_outer, stride_grad_out_inner, stride_grad_out_col,
    # scalars
    delta,
    grad_scale,  # 1/N for mean, else 1
    # flags
    X_MODE: tl.constexpr,
    T_MODE: tl.constexpr,
    W_MODE: tl.constexpr,
    GRAD_OUT_MODE: tl.constexpr,  # NONE: an upstream gradient of 1 (the fused forward)
    LOSS: tl.constexpr,
    REDUCE: tl.constexpr,
    X_GRAD: tl.constexpr,
    T_GRAD: tl.constexpr,
    W_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """torch's Huber loss and its gradients, with torch's branches (so the same at the boundary
    and for inf/NaN), d = x - t:

      h(d)  = 0.5 d^2                      |d| <  delta
            = delta (|d| - 0.5 delta)      otherwise;       l = w h(d)
      dl/dx = w clamp(d, -delta, delta),   dl/dt = -dl/dx,   dl/dw = h(d)

    read: each FULL operand once per element; write: the loss (or a partial per program) and
    each requested gradient once.
    """
    # Inductor passes float arguments as fp64: the math stays float32 (and the accumulator's
    # type fixed across the loop, which Triton requires)
    delta = tl.cast(delta, tl.float32)
    grad_scale = tl.cast(grad_scale, tl.float32)
    pid, row_block, cols, col_mask = _tile_cols(n_cols, n_col_blocks, BLOCK_C)
    x_c = _load_fixed(x_ptr, cols, col_mask, stride_x_col, X_MODE)
    t_c = _load_fixed(t_ptr, cols, col_mask, stride_t_col, T_MODE)
    w_c = _load_fixed(w_ptr, cols, col_mask, stride_w_col, W_MODE)
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
        offs = rows[:, None] * n_cols + cols[None, :]

        d = x - t
        if LOSS or W_GRAD:
            z = tl.abs(d)
            h = tl.where(z < delta, 0.5 * z * z, delta * (z - 0.5 * delta))
        if LOSS:
            loss = h * w
            if REDUCE:
                acc += tl.where(mask, loss, 0.0)
            else:
                tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)
        if X_GRAD or T_GRAD or W_GRAD:
            g = _load_tile(grad_out_ptr, go_c, outer, inner, cols, row_mask, mask,
                           stride_grad_out_outer, stride_grad_out_inner, stride_grad_out_col,
                           GRAD_OUT_MODE)
            g = g * grad_scale
            # torch's branches: d <= -delta, d >= delta, else d (NaN stays NaN)
            dx = tl.where(d <= -delta, -delta, tl.where(d >= delta, delta, d)) * (w * g)
            if X_GRAD:
                tl.store(grad_x_ptr + offs, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
            if T_GRAD:
                tl.store(grad_t_ptr + offs, (-dx).to(grad_t_ptr.dtype.element_ty), mask=mask)
            if W_GRAD:
                tl.store(grad_w_ptr + offs, (h * g).to(grad_w_ptr.dtype.element_ty), mask=mask)

    if LOSS and REDUCE:
        tl.store(out_ptr + pid, tl.sum(acc))


# ------------------------------------------------------------------------------------------
# launcher and autograd
# ------------------------------------------------------------------------------------------


def _launch_huber(view, x, t, w, delta, *, out=None, grad_x=None, grad_t=None, grad_w=None,
                  grad_out=None, grad_scale=1.0, reduce=False):
    """One pass of ``_huber_kernel``. Returns the partial sums when ``reduce``."""
    plan = TilePlan(view, {"x": x, "t": t, "w": w, "grad_out": grad_out}, dummy=x)
    if reduce:
        out = float32_scratch(plan.grid, x.device)
    plan.launch(
        _huber_kernel,
        writes=non_null(out_ptr=out, grad_x_ptr=grad_x, grad_t_ptr=grad_t, grad_w_ptr=grad_w),
        out_ptr=out if out is not None else x,
        grad_x_ptr=grad_x if grad_x is not None else x,
        grad_t_ptr=grad_t if grad_t is not None else x,
        grad_w_ptr=grad_w if grad_w is not None else x,
        delta=delta,
        grad_scale=grad_scale,
        LOSS=out is not None,
        REDUCE=reduce,
        X_GRAD=grad_x is not None,
        T_GRAD=grad_t is not None,
        W_GRAD=grad_w is not None,
    )
    return out


def _expand(shape, *tensors):
    """The tensors broadcast to ``shape`` (views; None stays None)."""
    return tuple(t if t is None or t.shape == shape else t.expand(shape) for t in tensors)


class HuberFunction(torch.autograd.Function):
    """Huber loss of ``input`` against ``target``, broadcast together to ``shape``, weighted
    by ``weight`` (the input's shape) or not."""

    @staticmethod
    def forward(ctx, input, target, weight, shape, reduction, delta, out_dtype):
        ctx.save_for_backward(input, target, weight)
        view, (x, t, w) = tile_view(shape, *_expand(shape, input, target, weight))
        numel = x.numel()
        needs = ctx.needs_input_grad
        # (a broadcast input's gradient is summed over the broadcast dimensions: backward)
        fused = (needs[0] and reduction != "none" and not (needs[1] or needs[2])
                 and input.shape == shape and may_fuse_gradient())
        grad_scale = 1.0 / numel if reduction == "mean" else 1.0

        grad = flat_grad = None
        if fused:
            grad, flat_grad = view.new(x.dtype, x.device)
        if reduction == "none":
            out, _ = view.new(out_dtype, x.device)
            _launch_huber(view, x, t, w, delta, out=out)
        else:
            partials = _launch_huber(view, x, t, w, delta, grad_x=grad, grad_scale=grad_scale,
                                     reduce=True)
            out = partials.sum()  # fixed-order second stage
            if reduction == "mean":
                out = out / numel
            out = output_as(out, out_dtype)

        ctx.grad = (grad, flat_grad) if fused else None
        ctx.meta = (shape, reduction, delta)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inputs = ctx.saved_tensors
        shape, reduction, delta = ctx.meta
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True
            ctx.grad = None

            def loss_fn(x, t, w):
                return eager.huber_loss(x, t, w, reduction, delta)

            return (*differentiable_backward(needs, grad_out, loss_fn, *inputs), None, None,
                    None, None)
        if ctx.grad is not None:
            # First backward after a fused forward: the gradient is already there.
            (grad_x, flat_grad), ctx.grad = ctx.grad, None
            scale_by_upstream_(flat_grad, grad_out)
            return grad_x, None, None, None, None, None, None
        if not any(needs):
            return (None,) * 7
        # a second backward, ``none``, gradients for target or weight: one more pass. The
        # gradient of a broadcast operand is written in float32 and summed in float32 over
        # the broadcast dimensions before its one rounding (cancelling terms would otherwise
        # be rounded one by one).
        view, (x, t, w) = tile_view(shape, *_expand(shape, *inputs))
        grads = [None if not need else view.new(
            op.dtype if op.shape == shape else torch.float32, op.device)[0]
            for need, op in zip(needs, inputs, strict=True)]
        _launch_huber(view, x, t, w, delta, grad_x=grads[0], grad_t=grads[1], grad_w=grads[2],
                      grad_out=view.fit(grad_out),
                      grad_scale=1.0 / x.numel() if reduction == "mean" else 1.0)
        grads = [g if g is None or op.shape == shape else g.sum_to_size(op.shape).to(op.dtype)
                 for g, op in zip(grads, inputs, strict=True)]
        return (*grads, None, None, None, None)


# ------------------------------------------------------------------------------------------
# entry point (arguments already validated by fused_losses.functional)
# ------------------------------------------------------------------------------------------


def huber_loss(input, target, weight, reduction, delta, out_dtype):
    """The kernels' loss for a validated call: floating input and target that broadcast to
    at least one element, ``weight`` None or of the input's shape, ``delta > 0``."""
    shape = torch.broadcast_shapes(input.shape, target.shape)
    input, target, weight = detached_without_grad_mode(input, target, weight)
    return HuberFunction.apply(input, target, weight, shape, reduction, delta, out_dtype)
