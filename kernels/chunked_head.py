"""The chunked LM head's driver: chunks of tokens, a GEMM per chunk, a per-chunk loss.

``x @ W.T + b`` is never formed whole. The driver (``ChunkedHeadFunction``) owns what every
head shares: the chunks, each chunk's logits from one GEMM (in float32 by default: cuBLAS's
float32 result from bfloat16 operands where torch has it, the chunk upcast elsewhere; never
rounded to bfloat16), and in the backward the logits formed again, their gradient written by
the loss, then ``grad_x[chunk] = dlogits @ W`` and ``grad_W += dlogits.T @ x[chunk]``
(float32 accumulation; the bias's sum too). What a head computes of a chunk's rows is a
per-chunk loss, one class over this interface (``ChunkLoss``). Its object holds the call's
options only and is never mutated (torch.compile traces the Function, and refuses side
effects on an object from outside it): the tensors it reads (``operands``: the targets) come
as arguments, and what it writes are buffers the driver allocates and hands back.

- ``logits_dtype(plan)``: the chunks' logits' dtype (float32; float64 for float64 GEMMs);
- ``allocate(n_tokens, dtype, device, operands)``: the call's per-token buffers (a tuple;
  None for one not requested);
- ``workspace(logits, operands, backward)``: what the chunks of one pass share (scratch,
  the call's denominators; None: nothing), made once a pass from the first (the largest)
  chunk's logits and the operands;
- ``forward_chunk(logits, rows, operands, buffers, work, dlogits)``: the results of tokens
  ``rows`` from their logits (R, V) (scratch: the loss may overwrite them), written into the
  buffers; and where ``dlogits`` is given (``fuses_gradient``, below), d out / d logits for
  an upstream gradient of 1 into it;
- ``outputs(buffers)``: what the Function returns (None for an output not requested);
  ``non_differentiable(outputs)``: those of them that carry no gradient (statistics kept for
  logging); ``saved(buffers)``: what the backward needs of them (through
  ``save_for_backward``);
- ``backward_chunk(logits, rows, operands, saved, upstream, dlogits, work, operand_grads,
  cols)``: d out / d logits of the chunk (of its classes ``cols``, a tile, for a loss that
  sets ``tiles_classes``: ``_tiles``) into ``dlogits`` (the logits themselves where they are in
  the GEMMs' dtype; None where only an operand needs a gradient) for the upstream gradients
  of the outputs (None where none came: an output without a gradient costs nothing), and
  the chunk's rows of the operands' gradients into ``operand_grads`` (``operand_grads(
  operands, needs)``' buffers: a cross-entropy's probability targets);
- ``scale_grad_(grad, upstream)``: a gradient written in the forward times the upstream one
  (on the device for the kernels: no host sync);
- ``reduce_input_grad_(grad)``: once per backward (a vocab-sharded head sums the ranks'
  shares of the input's gradient there, in ``input_grad_dtype`` when set: float32 sums of
  a half-precision input's shares, rounded once after the sum); ``differentiable(logits,
  operands)``: the outputs of the whole logits in torch ops, for ``create_graph=True``.

A loss whose output is one scalar (a reduced loss) sets ``fuses_gradient``: its upstream
gradient is then one number, so the forward writes each chunk's gradient while it has the
logits, the driver runs the two gradient GEMMs right away, and the backward only scales
them: the forward's GEMM and the two gradients', no recompute. Not while torch.compile
traces, nor for a second backward (``_autograd.may_fuse_gradient``), nor when an operand
needs a gradient (the probabilities' of a soft-target cross-entropy): those recompute.

The heads over it, one class each: the cross-entropy (``linear_cross_entropy.
CrossEntropyChunks``), the log-probabilities (``linear_log_probs.LogProbChunks``), the
distillation (``linear_distillation.DistillationChunks``), and the vocab-sharded heads
(``fused_losses/distributed/lm_head.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import eager
from ._autograd import may_fuse_gradient


class Plan(NamedTuple):
    """How a call runs, worked out by the caller (the public API)."""

    n_classes: int  # C: the classes of a row
    rows_per_token: int  # rows of C classes per token: 1, or d1 * ... * dK
    chunk: int  # tokens per chunk
    compute_dtype: torch.dtype  # the GEMMs' dtype
    accum_dtype: torch.dtype  # the weight's and bias's gradient accumulators
    kernels: bool  # the Triton row kernels (else the eager formula) on each chunk
    # a recomputing backward's tiles, for a loss that ``tiles_classes`` (0: its chunks):
    grad_chunk: int = 0  # tokens per tile
    grad_classes: int = 0  # classes (the weight's rows) per tile


def _mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` (or ``out += a @ b``) rounded once to ``out``'s dtype: in ``a``'s dtype
    for a narrower ``out``; for a wider one (float32 sums of bfloat16 products), cuBLAS's
    mixed-precision GEMM where torch has it, else the chunk's operands upcast."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.dtype.itemsize < a.dtype.itemsize:  # a narrower result: one rounding at the end
        out.add_(a @ b) if accumulate else out.copy_(a @ b)
        return
    if a.is_cuda:
        try:
            if accumulate:
                torch.ops.aten.addmm.dtype_out(out, a, b, out.dtype, out=out)
            else:
                torch.ops.aten.mm.dtype_out(a, b, out.dtype, out=out)
            return
        except (RuntimeError, NotImplementedError, AttributeError):  # an older torch
            pass
    a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


class _Grads:
    """The gradients a call accumulates over its chunks (the input's in ``x_dtype``, default
    its own)."""

    def __init__(self, x, w, b, needs, plan: Plan, x_dtype: torch.dtype | None = None):
        self.x = None
        if needs[0]:
            # contiguous whatever the input's layout: the chunks' GEMMs write rows of it and
            # the backward scales it as one block (a transposed input's empty_like would not)
            self.x = torch.empty(x.shape, dtype=x_dtype or x.dtype, device=x.device)
        self.w = self.b = None
        # (written by the first chunk's GEMM, not zeroed then added to: a pass over the
        # weight's float32 gradient saved, 8 V H bytes; zeros for a call of no tokens)
        new = torch.zeros if x.shape[0] == 0 else torch.empty
        if needs[1]:
            # float32 accumulation straight into a float32 weight's gradient; a half one
            # gets a float32 buffer, rounded once at the end
            self.w = new(w.shape, dtype=plan.accum_dtype, device=w.device)
        if needs[2]:
            self.b = new(b.shape, dtype=plan.accum_dtype, device=b.device)

    def add(self, rows: slice, x_chunk, dlogits, w_c, cols: slice | None = None) -> None:
        """The chunk's share: ``dlogits`` (R, V) is d out / d logits of tokens ``rows``
        (of the classes ``cols`` of a tile: the input's gradient then adds over the tiles)."""
        if cols is None:
            cols = slice(0, w_c.shape[0])
        if self.x is not None:
            _mm(self.x[rows], dlogits, w_c[cols], accumulate=cols.start > 0)
        first = rows.start == 0  # (the first chunk of tokens writes the weight's rows)
        if self.w is not None:
            _mm(self.w[cols], dlogits.t(), x_chunk, accumulate=not first)
        if self.b is not None:
            bias = dlogits.sum(0, dtype=self.b.dtype)
            self.b[cols].copy_(bias) if first else self.b[cols].add_(bias)

    def results(self, x, w, b):
        """(grad_x, grad_w, grad_b) in the operands' dtypes."""
        grad_x = None if self.x is None else self.x.to(x.dtype)
        grad_w = None if self.w is None else self.w.to(w.dtype)
        grad_b = None if self.b is None else self.b.to(b.dtype)
        return grad_x, grad_w, grad_b


def _plan_dtypes(x: torch.Tensor):
    """The chunks' ops in the plan's dtypes: autocast off (the plan already chose
    autocast's dtype for the GEMMs where it applies; the eager formula's are float32)."""
    return torch.autocast(x.device.type, enabled=False)


def chunks(n_tokens: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, n_tokens)) for start in range(0, n_tokens, chunk)]


def shaped(buf: torch.Tensor, shape) -> torch.Tensor:
    """The first elements of the reused buffer ``buf`` (made for the largest chunk or tile)
    as a contiguous tensor of ``shape`` (a narrower tile's too)."""
    return buf.view(-1)[:shape[0] * shape[1]].view(shape)


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
    kernels = False  # the Triton kernels (else torch's ops) on each chunk
    # a recomputing backward may hand ``backward_chunk`` a tile of the classes (``cols``):
    # its gradient needs only what the forward kept of each row, not the whole row
    tiles_classes = False

    def logits_dtype(self, plan: Plan) -> torch.dtype:
        return torch.promote_types(torch.float32, plan.compute_dtype)

    def allocate(self, n_tokens: int, dtype: torch.dtype, device, operands: tuple) -> tuple:
        raise NotImplementedError

    def workspace(self, logits: torch.Tensor, operands: tuple, backward: bool):
        return None

    def forward_chunk(self, logits: torch.Tensor, rows: slice, operands: tuple,
                      buffers: tuple, work, dlogits: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def outputs(self, buffers: tuple):
        raise NotImplementedError

    def non_differentiable(self, outputs) -> tuple:
        return ()

    def saved(self, buffers: tuple) -> tuple:
        return ()

    def operand_grads(self, operands: tuple, needs: tuple) -> tuple:
        return (None,) * len(operands)

    def backward_chunk(self, logits, rows: slice, operands: tuple, saved: tuple,
                       upstream: tuple, dlogits, work, operand_grads: tuple,
                       cols: slice | None = None) -> None:
        raise NotImplementedError

    def scale_grad_(self, grad: torch.Tensor, upstream: torch.Tensor) -> None:
        if not grad.numel():
            return
        if self.kernels:  # (the Triton file imported only here: eager runs without it)
            from ._common import scale_by_upstream_

            scale_by_upstream_(grad, upstream)
        else:
            eager.scale_grad_(grad, upstream.to(grad.dtype))

    def reduce_input_grad_(self, grad: torch.Tensor) -> None:
        pass

    def differentiable(self, logits: torch.Tensor, operands: tuple) -> tuple:
        raise NotImplementedError


def _dlogits(logits: torch.Tensor, dbuf: torch.Tensor | None, plan: Plan):
    """Where a chunk's gradient goes, and the buffer reused for it: the logits themselves
    where they are in the GEMMs' dtype (in place), else a buffer in the GEMMs' dtype (formed
    in float32 by the loss, rounded once)."""
    if plan.compute_dtype == logits.dtype:
        return logits, dbuf
    if dbuf is None:
        dbuf = torch.empty(logits.shape, dtype=plan.compute_dtype, device=logits.device)
    return shaped(dbuf, logits.shape), dbuf


def _logits_once(w, b, plan: Plan, dtype: torch.dtype):
    """The GEMMs' weight and the bias as the chunks' logits add it: made once a pass. (The
    bias rounded to the GEMMs' dtype first, as F.linear under autocast.)"""
    w_c = w.to(plan.compute_dtype)
    b_wide = None if b is None else b.to(plan.compute_dtype).to(dtype)
    return w_c, b_wide


def _tiles(n_classes: int, plan: Plan, loss: ChunkLoss) -> list:
    """The tiles of classes of a recomputing backward: ``[None]`` (each chunk's whole rows)
    unless the loss tiles its classes and the plan sets tiles. Tiles of ``plan.grad_chunk``
    tokens by ``plan.grad_classes`` classes let the backward take many more tokens at once
    in the same memory: the weight's float32 gradient accumulator (8 V H bytes read and
    written per token chunk, the LM heads' largest cost past their GEMMs) is then passed
    over once or twice instead of once per chunk; the input's, N H float32, once per tile."""
    if not (loss.tiles_classes and plan.grad_chunk and plan.grad_classes):
        return [None]
    return chunks(n_classes, plan.grad_classes)


class ChunkedHeadFunction(torch.autograd.Function):
    """The outputs of ``loss`` (a ``ChunkLoss``) on the logits ``x @ w.T + b``, a chunk of
    ``plan.chunk`` tokens at a time. ``x``: (N, H); ``w``: (V, H); ``b``: (V,) or None;
    ``operands``: the tensors the loss reads (the targets; None for one not given). Returns
    ``loss.outputs(...)``."""

    @staticmethod
    def forward(ctx, x, w, b, plan: Plan, loss: ChunkLoss, *operands):
        ctx.set_materialize_grads(False)
        dtype = loss.logits_dtype(plan)
        buffers = loss.allocate(x.shape[0], dtype, x.device, operands)
        needs = ctx.needs_input_grad[:3]
        fused = (loss.fuses_gradient and any(needs) and not any(ctx.needs_input_grad[5:])
                 and may_fuse_gradient())
        grads = _Grads(x, w, b, needs, plan, loss.input_grad_dtype) if fused else None
        w_c, b_wide = _logits_once(w, b, plan, dtype)
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
        outputs = loss.outputs(buffers)
        constant = loss.non_differentiable(outputs)
        if constant:  # (not called without any: torch.compile refuses a scalar output then)
            ctx.mark_non_differentiable(*constant)
        return outputs

    @staticmethod
    def backward(ctx, *upstream):
        x, w, b, *rest = ctx.saved_tensors
        operands, saved = tuple(rest[:ctx.n_operands]), tuple(rest[ctx.n_operands:])
        plan, loss = ctx.plan, ctx.loss
        needs = ctx.needs_input_grad[:3]
        op_needs = ctx.needs_input_grad[5:]
        if all(g is None for g in upstream) or not any(needs + op_needs):
            return (None,) * (5 + ctx.n_operands)
        dtype = loss.logits_dtype(plan)
        if torch.is_grad_enabled():
            # create_graph=True: torch's ops on the whole logits, the only path that holds
            # them (second derivatives need them)
            wrt = [t for t, need in zip((x, w, b, *operands), needs + op_needs, strict=True)
                   if need]
            with torch.enable_grad(), _plan_dtypes(x):
                logits = torch.nn.functional.linear(
                    x.to(plan.compute_dtype), w.to(plan.compute_dtype),
                    None if b is None else b.to(plan.compute_dtype)).to(dtype)
                pairs = [(o, g) for o, g in zip(loss.differentiable(logits, operands),
                                                upstream, strict=False)
                         if o is not None and g is not None]
                grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt,
                                                 [g.reshape(o.shape) for o, g in pairs],
                                                 create_graph=True))
            got = [next(grads) if need else None for need in needs + op_needs]
            return (*got[:3], None, None, *got[3:])
        if ctx.grads is not None:  # the first backward after a forward that wrote them
            grads, ctx.grads = ctx.grads, None
            for g in (grads.x, grads.w, grads.b):
                if g is not None:
                    loss.scale_grad_(g, upstream[0])
            if grads.x is not None:
                loss.reduce_input_grad_(grads.x)
            return (*grads.results(x, w, b), None, None, *(None,) * ctx.n_operands)

        tiles = _tiles(w.shape[0], plan, loss)
        tiled = tiles != [None]
        x_dtype = loss.input_grad_dtype
        if tiled and x_dtype is None:  # (summed over the tiles: rounded once)
            x_dtype = torch.promote_types(torch.float32, x.dtype)
        grads = _Grads(x, w, b, needs, plan, x_dtype)
        operand_grads = loss.operand_grads(operands, op_needs)
        w_c, b_wide = _logits_once(w, b, plan, dtype)
        buf = dbuf = work = None
        with _plan_dtypes(x):
            for rows in chunks(x.shape[0], plan.grad_chunk if tiled else plan.chunk):
                x_chunk = x[rows].to(plan.compute_dtype)
                for cols in tiles:
                    w_t = w_c if cols is None else w_c[cols]
                    b_t = b_wide if b_wide is None or cols is None else b_wide[cols]
                    logits = chunk_logits(x_chunk, w_t, b_t, dtype, None if buf is None else
                                          shaped(buf, (x_chunk.shape[0], w_t.shape[0])))
                    if buf is None:
                        buf, work = logits, loss.workspace(logits, operands, backward=True)
                    dlogits = None
                    if any(needs):
                        dlogits, dbuf = _dlogits(logits, dbuf, plan)
                    loss.backward_chunk(logits, rows, operands, saved, upstream, dlogits,
                                        work, operand_grads, cols=cols)
                    if dlogits is not None:
                        grads.add(rows, x_chunk, dlogits, w_c, cols)
        if grads.x is not None:
            if tiled and loss.input_grad_dtype is None:
                # the tiles' float32 sum rounded once to the input's dtype before the loss's
                # reduction: the dtype it reduces in is the call's, never this process's
                # plan (a vocab-sharded head's ranks tile their blocks differently, or not
                # at all, and all-reduce the shares together)
                grads.x = grads.x.to(x.dtype)
            loss.reduce_input_grad_(grads.x)
        return (*grads.results(x, w, b), None, None, *operand_grads)
