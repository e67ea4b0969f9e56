"""The chunked LM head's driver: chunks of tokens, a GEMM per chunk, a per-chunk loss.

``x @ W.T + b`` is never formed whole. The driver (``ChunkedHeadFunction``) owns what every
head shares: the chunks, each chunk's logits **in float32** from one GEMM (cuBLAS's float32
result from bfloat16 operands where torch has it, the chunk upcast elsewhere: never rounded to
bfloat16), and in the backward the logits formed again, their gradient written by the loss,
then ``grad_x[chunk] = dlogits @ W`` and ``grad_W += dlogits.T @ x[chunk]`` (float32
accumulation; the bias's sum too). What a head computes of a chunk's rows is a per-chunk loss,
one class over this interface (``ChunkLoss``). Its object holds the call's options only and
is never mutated (torch.compile traces the Function, and refuses side effects on an object
from outside it): the tensors it reads (``operands``: the targets) come as arguments, and
what it writes are buffers the driver allocates and hands back.

- ``allocate(n_tokens, dtype, device)``: the call's per-token buffers (a tuple; None for one
  not requested);
- ``workspace(logits, operands, backward)``: scratch the chunks share (None: none), made
  once a pass from the first (the largest) chunk's logits and the operands;
- ``forward_chunk(logits, rows, operands, buffers, work, dlogits)``: the results of tokens
  ``rows`` from their logits (R, V) (scratch: the loss may overwrite them), written into the
  buffers' rows; and where ``dlogits`` is given (``fuses_gradient``, below), d out / d
  logits for an upstream gradient of 1 into it;
- ``outputs(buffers)``: what the Function returns (None for an output not requested);
  ``non_differentiable(buffers)``: those of them that carry no gradient (statistics kept for
  logging); ``saved(buffers)``: what the backward needs of them (through
  ``save_for_backward``);
- ``backward_chunk(logits, rows, operands, saved, upstream, dlogits, work)``: d out / d
  logits of
  the chunk into ``dlogits`` (the logits themselves for float32 GEMMs) for the upstream
  gradients of the outputs (None where none came: an output without a gradient costs
  nothing);
- ``reduce_input_grad_(grad)``: once per backward (a vocab-sharded head sums the ranks'
  shares of the input's gradient there, in ``input_grad_dtype`` when set: float32 sums of
  a half-precision input's shares, rounded once after the sum); ``differentiable(logits,
  operands)``: the outputs of the whole logits in torch ops, for ``create_graph=True``.

A loss whose output is one scalar (a reduced loss) sets ``fuses_gradient``: its upstream
gradient is then one number, so the forward writes each chunk's gradient while it has the
logits, the driver runs the two gradient GEMMs right away, and the backward only scales
them: the forward's GEMM and the two gradients', no recompute (as ``linear_cross_entropy``).
Not while torch.compile traces, nor for a second backward (``_autograd.may_fuse_gradient``):
those recompute.

The log-probability head (``linear_log_probs.LogProbChunks``) and the distillation head
(``linear_distillation.DistillationChunks``) are such classes. (The
cross-entropy head, ``linear_cross_entropy.py``, still runs its own Function: it writes its
gradients in the forward where the upstream gradient is one scalar.)
"""

from __future__ import annotations

import torch

from . import eager
from ._autograd import may_fuse_gradient
from .linear_cross_entropy import Plan, _Grads, _mm, _plan_dtypes


def chunks(n_tokens: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, n_tokens)) for start in range(0, n_tokens, chunk)]


def logits_dtype(plan: Plan) -> torch.dtype:
    """float32 (float64 for float64 GEMMs): the dtype of the chunks' logits."""
    return torch.promote_types(torch.float32, plan.compute_dtype)


def chunk_logits(x_chunk, w_c, b_wide, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """A chunk's logits ``x_chunk @ w_c.T (+ b)`` in ``dtype`` (float32), contiguous: the
    GEMM's float32 result from narrower operands (``_mm``), never rounded to their dtype."""
    if out is None:
        out = torch.empty(x_chunk.shape[0], w_c.shape[0], dtype=dtype, device=x_chunk.device)
    if b_wide is None:
        _mm(out, x_chunk, w_c.t(), accumulate=False)
    else:
        out.copy_(b_wide.expand(out.shape))
        _mm(out, x_chunk, w_c.t(), accumulate=True)
    return out


class ChunkLoss:
    """The per-chunk interface (module doc); subclasses implement it."""

    fuses_gradient = False  # one scalar output: its gradient written in the forward
    input_grad_dtype = None  # the input's gradient accumulated in it (None: the input's)

    def allocate(self, n_tokens: int, dtype: torch.dtype, device) -> tuple:
        raise NotImplementedError

    def workspace(self, logits: torch.Tensor, operands: tuple, backward: bool):
        return None

    def forward_chunk(self, logits: torch.Tensor, rows: slice, operands: tuple,
                      buffers: tuple, work, dlogits: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def outputs(self, buffers: tuple):
        raise NotImplementedError

    def non_differentiable(self, buffers: tuple) -> tuple:
        return ()

    def saved(self, buffers: tuple) -> tuple:
        return ()

    def backward_chunk(self, logits, rows: slice, operands: tuple, saved: tuple,
                       upstream: tuple, dlogits, work) -> None:
        raise NotImplementedError

    def reduce_input_grad_(self, grad: torch.Tensor) -> None:
        pass

    def differentiable(self, logits: torch.Tensor, operands: tuple) -> tuple:
        raise NotImplementedError


def _dlogits(logits: torch.Tensor, dbuf: torch.Tensor | None, plan: Plan):
    """Where a chunk's gradient goes, and the buffer reused for it: the logits themselves
    for float32 GEMMs (in place), else a buffer in the GEMMs' dtype (formed in float32 by the
    loss, rounded once)."""
    if plan.compute_dtype == logits.dtype:
        return logits, dbuf
    if dbuf is None:
        dbuf = torch.empty(logits.shape, dtype=plan.compute_dtype, device=logits.device)
    return dbuf[:logits.shape[0]], dbuf


class ChunkedHeadFunction(torch.autograd.Function):
    """The outputs of ``loss`` (a ``ChunkLoss``) on the logits ``x @ w.T + b``, a chunk of
    ``plan.chunk`` tokens at a time. ``x``: (N, H); ``w``: (V, H); ``b``: (V,) or None;
    ``operands``: the tensors the loss reads (per token: sliced by rows). Returns
    ``loss.outputs(...)``."""

    @staticmethod
    def forward(ctx, x, w, b, plan: Plan, loss: ChunkLoss, *operands):
        ctx.set_materialize_grads(False)
        dtype = logits_dtype(plan)
        buffers = loss.allocate(x.shape[0], dtype, x.device)
        needs = ctx.needs_input_grad[:3]
        fused = loss.fuses_gradient and any(needs) and may_fuse_gradient()
        grads = _Grads(x, w, b, needs, plan, loss.input_grad_dtype) if fused else None
        w_c = w.to(plan.compute_dtype)
        # (the bias rounded to the GEMMs' dtype first, as F.linear under autocast)
        b_wide = None if b is None else b.to(plan.compute_dtype).to(dtype)
        buf = dbuf = work = None  # one chunk's logits, reused (the first chunk is the largest)
        with _plan_dtypes(x):
            for rows in chunks(x.shape[0], plan.chunk):
                x_chunk = x[rows].to(plan.compute_dtype)
                logits = chunk_logits(x_chunk, w_c, b_wide, dtype,
                                      None if buf is None else buf[:x_chunk.shape[0]])
                if buf is None:
                    buf, work = logits, loss.workspace(logits, operands, backward=fused)
                dlogits = None
                if fused:
                    dlogits, dbuf = _dlogits(logits, dbuf, plan)
                loss.forward_chunk(logits, rows, operands, buffers, work, dlogits)
                if fused:
                    grads.add(rows, x_chunk, dlogits, w_c)
        saved = loss.saved(buffers)
        ctx.save_for_backward(x, w, b, *operands, *saved)
        ctx.plan, ctx.loss, ctx.n_operands, ctx.grads = plan, loss, len(operands), grads
        constant = loss.non_differentiable(buffers)
        if constant:  # (not called without any: torch.compile refuses a scalar output then)
            ctx.mark_non_differentiable(*constant)
        return loss.outputs(buffers)

    @staticmethod
    def backward(ctx, *upstream):
        x, w, b, *rest = ctx.saved_tensors
        operands, saved = tuple(rest[:ctx.n_operands]), tuple(rest[ctx.n_operands:])
        plan, loss = ctx.plan, ctx.loss
        needs = ctx.needs_input_grad[:3]
        none = (None,) * (2 + ctx.n_operands)
        if all(g is None for g in upstream) or not any(needs):
            return None, None, None, *none
        if torch.is_grad_enabled():
            # create_graph=True: torch's ops on the whole logits, the only path that holds
            # them (second derivatives need them)
            wrt = [t for t, need in zip((x, w, b), needs, strict=True) if need]
            with torch.enable_grad(), _plan_dtypes(x):
                logits = torch.nn.functional.linear(
                    x.to(plan.compute_dtype), w.to(plan.compute_dtype),
                    None if b is None else b.to(plan.compute_dtype)).to(logits_dtype(plan))
                pairs = [(o, g) for o, g in zip(loss.differentiable(logits, operands),
                                                upstream, strict=False)
                         if o is not None and g is not None]
                grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt,
                                                 [g.reshape(o.shape) for o, g in pairs],
                                                 create_graph=True))
            return (*(next(grads) if need else None for need in needs), *none)
        if ctx.grads is not None:  # the first backward after a forward that wrote them
            grads, ctx.grads = ctx.grads, None
            for g in (grads.x, grads.w, grads.b):
                if g is not None:
                    eager.scale_grad_(g, upstream[0].to(g.dtype))
            if grads.x is not None:
                loss.reduce_input_grad_(grads.x)
            return (*grads.results(x, w, b), *none)

        grads = _Grads(x, w, b, needs, plan, loss.input_grad_dtype)
        w_c = w.to(plan.compute_dtype)
        dtype = logits_dtype(plan)
        b_wide = None if b is None else b.to(plan.compute_dtype).to(dtype)
        buf = dbuf = work = None
        with _plan_dtypes(x):
            for rows in chunks(x.shape[0], plan.chunk):
                x_chunk = x[rows].to(plan.compute_dtype)
                r = x_chunk.shape[0]
                logits = chunk_logits(x_chunk, w_c, b_wide, dtype,
                                      None if buf is None else buf[:r])
                if buf is None:
                    buf, work = logits, loss.workspace(logits, operands, backward=True)
                dlogits, dbuf = _dlogits(logits, dbuf, plan)
                loss.backward_chunk(logits, rows, operands, saved, upstream, dlogits, work)
                grads.add(rows, x_chunk, dlogits, w_c)
        if grads.x is not None:
            loss.reduce_input_grad_(grads.x)
        return (*grads.results(x, w, b), *none)
