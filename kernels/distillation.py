"""Distillation on given logits: TRL's generalized JSD between a student's and a teacher's
rows, a block of rows at a time.

``fused_losses.distillation_loss``: the divergence of each row of the student's logits
(N, V) from the teacher's, under a shared temperature, with TRL's ``beta`` (0: forward KL,
1: reverse KL, between: the generalized JSD through the mixture). Each block of rows is
upcast to float32 scratch, its log-softmaxes and divergence formed there
(``eager.chunk_divergence_``: the closed-form gradient, no autograd graph), so that no
float32 copy of either whole logits exists:

- forward: per block, the rows' divergences and — where the result is one scalar (a reduced
  loss) and the student's logits need a gradient — d loss / d logits written into a
  gradient buffer in the logits' dtype, rounded once (the cross-entropy's design: the
  backward only scales it by the upstream gradient).
- ``none`` (a gradient per row), torch.compile's trace and a second backward recompute the
  blocks in the backward; ``create_graph=True`` runs the formula whole in torch's ops.

The memory traffic: the forward reads both logits once and writes the gradient once (plus
the float32 block temporaries, which stay in cache-sized blocks on the CPU and one block at a
time on a GPU). A Triton row kernel (both rows' statistics merged online, the gradient in the
same launch) is the next step on CUDA; today the same torch ops run on both backends.
"""

from __future__ import annotations

import torch

from . import eager
from ._autograd import differentiable_backward, may_fuse_gradient

# Rows per block: about this many float32 elements of each of the two logits (16 MiB).
BLOCK_ELEMENTS = 1 << 22


def _blocks(n_rows: int, n_classes: int) -> list[slice]:
    step = max(1, BLOCK_ELEMENTS // max(1, n_classes))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _scratch(src: torch.Tensor, dtype: torch.dtype, buf: torch.Tensor | None):
    """A float32 (float64) copy of a block of rows in a reused buffer: never a view of
    ``src`` (the divergence overwrites it)."""
    if buf is None or buf.shape[0] < src.shape[0]:
        buf = torch.empty(src.shape, dtype=dtype, device=src.device)
    out = buf[:src.shape[0]]
    out.copy_(src)
    return out, buf


def _divergences(s, t, counted, opts: eager.DistillOptions, *, scales=None,
                 grad: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's divergence (N,) of ``s``, ``t`` (N, V), block by block; with ``grad`` the
    gradient of sum_r scales_r loss_r w.r.t. ``s`` written into it. Rows where ``counted``
    is 0 give 0 (whatever their logits hold)."""
    dtype = eager.compute_dtype(s.dtype, t.dtype)
    loss = torch.empty(s.shape[0], dtype=dtype, device=s.device)
    s_buf = t_buf = None
    for rows in _blocks(s.shape[0], s.shape[1]):
        s_block, s_buf = _scratch(s[rows], dtype, s_buf)
        t_block, t_buf = _scratch(t[rows], dtype, t_buf)
        eager.chunk_divergence_(s_block, t_block, opts, loss=loss[rows],
                                row_scale=None if scales is None else scales[rows],
                                grad=None if grad is None else grad[rows])
    return torch.where(counted, loss, 0.0)


class DistillationFunction(torch.autograd.Function):
    """The divergence of each row of the student's logits ``s`` (N, V) from the teacher's
    ``t`` (N, V, a constant: no gradient), rows where ``counted`` (N,) is False left out:
    their sum when ``reduced`` (a scalar), else each row's (N,). float32 (float64 for
    float64 logits)."""

    @staticmethod
    def forward(ctx, s, t, counted, opts: eager.DistillOptions, reduced: bool):
        ctx.set_materialize_grads(False)
        fused = reduced and ctx.needs_input_grad[0] and may_fuse_gradient()
        grad = torch.empty_like(s, memory_format=torch.contiguous_format) if fused else None
        scales = counted.to(eager.compute_dtype(s.dtype, t.dtype)) if fused else None
        rows = _divergences(s, t, counted, opts, scales=scales, grad=grad)
        ctx.save_for_backward(s, t, counted)
        ctx.opts, ctx.reduced, ctx.grad = opts, reduced, grad
        return rows.sum() if reduced else rows

    @staticmethod
    def backward(ctx, grad_out):
        s, t, counted = ctx.saved_tensors
        opts, reduced = ctx.opts, ctx.reduced
        none = (None,) * 4
        if grad_out is None or not ctx.needs_input_grad[0]:
            return (None, *none)
        if torch.is_grad_enabled():  # create_graph=True: the formula whole, in torch's ops
            ctx.grad = None

            def loss_fn(s):
                rows = torch.where(counted, eager.divergence_rows(s, t, opts), 0.0)
                return rows.sum() if reduced else rows

            return (*differentiable_backward((True,), grad_out, loss_fn, s), *none)
        if ctx.grad is not None:  # the first backward after a forward that wrote it
            grad, ctx.grad = ctx.grad, None
            return (eager.scale_grad_(grad, grad_out.to(grad.dtype)), *none)
        # ``none``, a second backward, a compiled graph: the blocks again
        dtype = eager.compute_dtype(s.dtype, t.dtype)
        scales = counted.to(dtype) * (grad_out.to(dtype) if reduced
                                      else grad_out.reshape(-1).to(dtype))
        grad = torch.empty_like(s, memory_format=torch.contiguous_format)
        _divergences(s, t, counted, opts, scales=scales, grad=grad)
        return (grad, *none)


def distillation(s: torch.Tensor, t: torch.Tensor, counted: torch.Tensor,
                 opts: eager.DistillOptions, reduced: bool) -> torch.Tensor:
    """The public API's entry: ``s``, ``t`` (N, V), ``counted`` (N,) bool."""
    return DistillationFunction.apply(s, t, counted, opts, reduced)
