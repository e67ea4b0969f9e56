"""The fused LM head: the cross-entropy of ``x @ W.T + b`` without ever holding the logits.

Design (see ../shared/PERFORMANCE.md, "The LM head"):

- Chunks of tokens. Per chunk, its logits ``(R, V)`` come out of one GEMM (cuBLAS on a GPU, the
  CPU's BLAS elsewhere); the cross-entropy of those rows (``chunk_loss``: the Triton row kernel,
  or the eager formula on the CPU) gives the chunk's loss and, when the reduction makes the
  upstream gradient a scalar, writes d loss / d logits **in place** over the logits; then
  ``grad_x[chunk] = dlogits @ W`` and ``grad_W += dlogits.T @ x[chunk]`` (and the bias's sum).
  The backward then only scales the gradients by the upstream gradient (on the device). So the
  forward+backward costs the three GEMMs of the head plus one pass of the cross-entropy over
  each chunk, and the largest tensor alive is one chunk of logits.
- ``none``, a second backward, and gradients for probability targets recompute each chunk's
  logits in the backward (a fourth GEMM), with each row's upstream gradient.
- Precision: the logits and d loss / d logits are in the GEMMs' dtype (the input's; bfloat16
  for an LM in bf16), formed in float32 and rounded once (``p - 1`` included). The weight's
  and bias's gradients accumulate over the chunks in ``accum_dtype`` (float32 by default: one
  rounding per element when a half-precision ``.grad`` is made, at the price of a float32
  weight-sized buffer; the weight's own dtype saves it, rounding once per chunk). The input's
  gradient is one GEMM per chunk: rounded once.
- K-dimensional heads (a weight (C, d1, ..., dK, H)) run as rows of C classes: the weight's
  rows are ordered (d, c) (``rows_per_token`` = d1 * ... * dK rows per token).
- The per-chunk cross-entropy is an object with a small protocol: ``call_denominators``,
  ``chunk_loss``, ``scale_grad_`` (the kernels' file or ``eager.py``, as ``_ce`` picks). A
  caller may hand the Function its own (``chunk_ce``): the tensor-parallel head does
  (``fused_losses/distributed/lm_head.py``), whose weight is this rank's block of the vocabulary and
  whose chunks' rows are merged over the group. Such an object's ``chunk_loss`` also gets the
  chunk's rows (``rows=``, a slice of the call's rows of C classes: it keeps what the forward
  learned of them for the backward's recompute), and ``reduce_input_grad_`` is called once
  per backward on the input's gradient (its rank's share, summed there over the group,
  ``input_grad_dtype`` wide). Nothing here knows of a process group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import eager
from ._autograd import differentiable_backward, may_fuse_gradient, output_as


class Plan(NamedTuple):
    """How a call runs, worked out by the caller (fused_losses.linear_cross_entropy)."""

    n_classes: int  # C: the classes of a row
    rows_per_token: int  # rows of C classes per token: 1, or d1 * ... * dK
    chunk: int  # tokens per chunk
    compute_dtype: torch.dtype  # the GEMMs' and the logits' dtype
    accum_dtype: torch.dtype  # the weight's and bias's gradient accumulators
    kernels: bool  # the Triton cross-entropy (else the eager formula) on each chunk


def _ce(plan: Plan):
    """The per-chunk cross-entropy: ``call_denominators``, ``chunk_loss``, ``scale_grad_``.
    (The Triton file is imported only for the kernels: the eager path runs without Triton.)"""
    if plan.kernels:
        from . import cross_entropy

        return cross_entropy
    return eager


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
        if needs[1]:
            # float32 accumulation straight into a float32 weight's gradient; a half one
            # gets a float32 buffer, rounded once at the end
            self.w = torch.zeros(w.shape, dtype=plan.accum_dtype, device=w.device)
        if needs[2]:
            self.b = torch.zeros(b.shape, dtype=plan.accum_dtype, device=b.device)

    def add(self, rows: slice, x_chunk, dlogits, w_c) -> None:
        """The chunk's share: ``dlogits`` (R, V) is d out / d logits of tokens ``rows``."""
        if self.x is not None:
            _mm(self.x[rows], dlogits, w_c, accumulate=False)
        if self.w is not None:
            _mm(self.w, dlogits.t(), x_chunk, accumulate=True)
        if self.b is not None:
            self.b += dlogits.sum(0, dtype=self.b.dtype)

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


def _chunks(n_tokens: int, plan: Plan):
    return [slice(start, min(start + plan.chunk, n_tokens))
            for start in range(0, n_tokens, plan.chunk)]


def _logits(x_chunk, w_c, b_c, plan: Plan):
    """One chunk's logits (R, V) in the compute dtype, contiguous, and its rows (R * d, C)."""
    logits = torch.mm(x_chunk, w_c.t()) if b_c is None else torch.addmm(b_c, x_chunk, w_c.t())
    # (the rows' count spelled out: a rank's block of a sharded head may have no class)
    return logits, logits.view(logits.shape[0] * plan.rows_per_token, plan.n_classes)


def _call_rows(rows: slice, plan: Plan) -> slice:
    """The call's rows of C classes of tokens ``rows``."""
    d = plan.rows_per_token
    return slice(rows.start * d, rows.stop * d)


def _target_rows(target, rows: slice, plan: Plan):
    """The targets of tokens ``rows``, contiguous: the kernels read a chunk's class indices
    and rows of probabilities with unit strides (a strided caller's probabilities are copied
    a chunk at a time, never whole)."""
    return target[_call_rows(rows, plan)].contiguous()


def _read_densely(target, weight, opts: eager.Options):
    """Class targets and class weights contiguous, as the kernels read them (small: a copy of
    a strided one costs nothing next to the GEMMs); probability targets as they are, copied
    a chunk at a time where strided (``_target_rows``)."""
    return (target if opts.prob_target else target.contiguous(),
            None if weight is None else weight.contiguous())


def _where(chunk_ce, rows: slice, plan: Plan) -> dict:
    """What a caller's per-chunk cross-entropy is told of a chunk besides its rows' values:
    which of the call's rows of C classes they are (module doc)."""
    if chunk_ce is None:
        return {}
    return {"rows": _call_rows(rows, plan)}


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The loss of logits ``x @ w.T + b`` against ``target``, chunk by chunk (module doc).

    ``x``: (N, H); ``w``: (V, H) with V = d * C rows ordered (d, c); ``b``: (V,) or None;
    ``target``: (N * d,) class indices or (N * d, C) probabilities, row-major in (token, d);
    ``weight``: (C,) class weights or None. Returns (loss, z-loss term): the loss reduced, or
    per row (N * d,) for ``none``; the second is for logging, not differentiable.
    ``chunk_ce``: a caller's per-chunk cross-entropy (module doc), or None for ``_ce``'s.
    """

    @staticmethod
    def forward(ctx, x, w, b, target, weight, opts: eager.Options, plan: Plan, out_dtype,
                chunk_ce=None):
        ce = _ce(plan) if chunk_ce is None else chunk_ce
        target, weight = _read_densely(target, weight, opts)
        n_tokens = x.shape[0]
        n_rows = n_tokens * plan.rows_per_token
        needs = ctx.needs_input_grad
        needs_t = opts.prob_target and needs[3]
        # The gradients in the forward pay off when the upstream gradient is one scalar.
        fused = (any(needs[:3]) and opts.reduction != "none" and not needs_t
                 and may_fuse_gradient())
        w_c = w.to(plan.compute_dtype)
        b_c = None if b is None else b.to(plan.compute_dtype)
        dens = ce.call_denominators(target, weight, opts, plan.n_classes)
        x_dtype = getattr(chunk_ce, "input_grad_dtype", None)
        grads = _Grads(x, w, b, needs, plan, x_dtype) if fused else None
        outs = []
        with _plan_dtypes(x):
            for rows in _chunks(n_tokens, plan):
                x_chunk = x[rows].to(plan.compute_dtype)
                logits, logit_rows = _logits(x_chunk, w_c, b_c, plan)
                outs.append(ce.chunk_loss(logit_rows, _target_rows(target, rows, plan), weight,
                                          opts, dens, n_rows, write_grad=fused,
                                          **_where(chunk_ce, rows, plan)))
                if fused:
                    grads.add(rows, x_chunk, logits, w_c)
                del logits, logit_rows
        loss, z = eager._join(outs, opts.reduction)

        ctx.save_for_backward(x, w, b, target, weight)
        ctx.opts, ctx.plan, ctx.dens, ctx.grads = opts, plan, dens, grads
        ctx.chunk_ce = chunk_ce
        z = torch.zeros_like(loss) if z is None else z
        z = output_as(z, out_dtype)
        ctx.mark_non_differentiable(z)
        return output_as(loss, out_dtype), z

    @staticmethod
    def backward(ctx, grad_out, _grad_z):
        x, w, b, target, weight = ctx.saved_tensors
        opts, plan, chunk_ce = ctx.opts, ctx.plan, ctx.chunk_ce
        ce = _ce(plan) if chunk_ce is None else chunk_ce
        needs = ctx.needs_input_grad
        none = (None,) * 5
        if torch.is_grad_enabled() and chunk_ce is not None:
            raise RuntimeError(
                "linear_cross_entropy over a process group does not support "
                "create_graph=True: second derivatives would need the other ranks' logits")
        if torch.is_grad_enabled():
            # create_graph=True: torch's ops on the whole logits (second derivatives need
            # them), the only path that holds the logits
            ctx.grads = None

            def loss_fn(x, w, b, target):
                logits = torch.nn.functional.linear(x.to(plan.compute_dtype),
                                                    w.to(plan.compute_dtype),
                                                    None if b is None else
                                                    b.to(plan.compute_dtype))
                return eager.cross_entropy_float(logits.view(-1, plan.n_classes), target,
                                                 weight, opts)[0]

            return (*differentiable_backward(needs[:4], grad_out, loss_fn, x, w, b, target),
                    *none)
        if ctx.grads is not None:  # the first backward after a forward that wrote them
            grads, ctx.grads = ctx.grads, None
            for g in (grads.x, grads.w, grads.b):
                if g is not None:
                    ce.scale_grad_(g, grad_out)
            if chunk_ce is not None and grads.x is not None:
                chunk_ce.reduce_input_grad_(grads.x)
            return (*grads.results(x, w, b), None, *none)
        if not any(needs[:4]):
            return (None,) * 9

        # ``none``, a second backward, or the probabilities' gradient: each chunk again
        grads = _Grads(x, w, b, needs, plan, getattr(chunk_ce, "input_grad_dtype", None))
        # (contiguous: written a chunk of rows at a time)
        grad_t = (torch.empty(target.shape, dtype=target.dtype, device=target.device)
                  if needs[3] else None)
        w_c = w.to(plan.compute_dtype)
        b_c = None if b is None else b.to(plan.compute_dtype)
        n_rows = x.shape[0] * plan.rows_per_token
        with _plan_dtypes(x):
            for rows in _chunks(x.shape[0], plan):
                x_chunk = x[rows].to(plan.compute_dtype)
                logits, logit_rows = _logits(x_chunk, w_c, b_c, plan)
                g = grad_out
                if opts.reduction == "none":
                    g = _target_rows(grad_out.reshape(-1), rows, plan)
                t_grad = None if grad_t is None else grad_t[_call_rows(rows, plan)]
                ce.chunk_loss(logit_rows, _target_rows(target, rows, plan), weight, opts,
                              ctx.dens, n_rows, g, write_grad=any(needs[:3]),
                              grad_target=t_grad, **_where(chunk_ce, rows, plan))
                if any(needs[:3]):
                    grads.add(rows, x_chunk, logits, w_c)
                del logits, logit_rows
        if chunk_ce is not None and grads.x is not None:
            chunk_ce.reduce_input_grad_(grads.x)
        return (*grads.results(x, w, b), grad_t, *none)
