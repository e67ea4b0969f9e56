"""Per-token log-probabilities and entropy of ``x @ W.T + b``, a chunk of tokens at a time.

The RL head (``fused_losses.linear_log_probs``): what an RL trainer needs of each sampled
token, from the policy's last hidden states and its LM head, without the (N, V) logits.

- Forward, per chunk of tokens: the chunk's logits (R, V) **in float32** from one GEMM
  (from bfloat16 operands: cuBLAS's float32 result where torch has it, the chunk upcast
  elsewhere; never rounded to bfloat16 before the log-softmax), then the row pass
  (``log_probs.row_log_probs``, or its eager twin): log p_y, the entropy, and (m~, log2 s)
  of each row kept for the backward (8 B a token). Under ``torch.no_grad()`` the whole
  memory is one chunk of logits.
- Backward: the upstream gradients are per token (advantages), unknown in the forward, so
  each chunk's logits are formed again (a fourth GEMM), their gradient written by the row
  kernel from the kept statistics (in place for float32 GEMMs; else into a buffer of the
  GEMMs' dtype, formed in float32 and rounded once), then ``grad_x[chunk] = dlogits @ W`` and
  ``grad_W += dlogits.T @ x[chunk]`` (float32 accumulation, the bias's sum too). An output
  whose gradient does not come (the entropy logged only) costs nothing.
- ``create_graph=True``: torch's ops on the whole logits (second derivatives need them).
"""

from __future__ import annotations

import torch

from . import eager
from .linear_cross_entropy import Plan, _mm, _plan_dtypes


def _ops(plan: Plan):
    """The row pass and its gradient: the Triton kernels or their eager twins (the Triton
    file is imported only for the kernels: the eager path runs without Triton)."""
    if plan.kernels:
        from . import log_probs

        return log_probs
    return eager


def _chunks(n_tokens: int, chunk: int):
    return [slice(start, min(start + chunk, n_tokens)) for start in range(0, n_tokens, chunk)]


def logits_dtype(plan: Plan) -> torch.dtype:
    """float32 (float64 for float64 GEMMs): the dtype of the chunks' logits and results."""
    return torch.promote_types(torch.float32, plan.compute_dtype)


def float32_logits(x_chunk, w_c, b_f32, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """A chunk's logits ``x_chunk @ w_c.T (+ b)`` in float32 (``dtype``), contiguous: the
    GEMM's float32 result from narrower operands (``_mm``), never rounded to their dtype."""
    if out is None:
        out = torch.empty(x_chunk.shape[0], w_c.shape[0], dtype=dtype, device=x_chunk.device)
    if b_f32 is None:
        _mm(out, x_chunk, w_c.t(), accumulate=False)
    else:
        out.copy_(b_f32.expand(out.shape))
        _mm(out, x_chunk, w_c.t(), accumulate=True)
    return out


class _Grads:
    """The input's, the weight's and the bias's gradients accumulated over the chunks
    (the weight's and the bias's in ``plan.accum_dtype``)."""

    def __init__(self, x, w, b, needs, plan: Plan):
        self.x = self.w = self.b = None
        if needs[0]:
            self.x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if needs[1]:
            self.w = torch.zeros(w.shape, dtype=plan.accum_dtype, device=w.device)
        if needs[2]:
            self.b = torch.zeros(b.shape, dtype=plan.accum_dtype, device=b.device)

    def add(self, rows: slice, x_chunk, dlogits, w_c) -> None:
        if self.x is not None:
            _mm(self.x[rows], dlogits, w_c, accumulate=False)
        if self.w is not None:
            _mm(self.w, dlogits.t(), x_chunk, accumulate=True)
        if self.b is not None:
            self.b += dlogits.sum(0, dtype=self.b.dtype)

    def results(self, w, b):
        return (self.x, None if self.w is None else self.w.to(w.dtype),
                None if self.b is None else self.b.to(b.dtype))


class LinearLogProbsFunction(torch.autograd.Function):
    """log p_y (and with ``entropy`` the entropy) of logits ``x @ w.T + b`` (module doc).

    ``x``: (N, H); ``w``: (V, H); ``b``: (V,) or None; ``target``: (N,) class indices.
    Returns float32 (N,) log-probabilities, or (log-probabilities, entropy)."""

    @staticmethod
    def forward(ctx, x, w, b, target, opts: eager.Options, plan: Plan, entropy: bool):
        ctx.set_materialize_grads(False)
        ops = _ops(plan)
        n = x.shape[0]
        dtype = logits_dtype(plan)
        log_p = torch.empty(n, dtype=dtype, device=x.device)
        h = torch.empty(n, dtype=dtype, device=x.device) if entropy else None
        stats = torch.empty(n, 2, dtype=dtype, device=x.device)
        w_c = w.to(plan.compute_dtype)
        b_f = None if b is None else b.to(plan.compute_dtype).to(dtype)
        buf = None
        with _plan_dtypes(x):
            for rows in _chunks(n, plan.chunk):
                x_chunk = x[rows].to(plan.compute_dtype)
                logits = float32_logits(x_chunk, w_c, b_f, dtype,
                                        None if buf is None else buf[:x_chunk.shape[0]])
                buf = logits if buf is None else buf
                out = (log_p[rows], None if h is None else h[rows], stats[rows])
                if plan.kernels:
                    ops.row_log_probs(logits, target[rows], opts, entropy=entropy, out=out)
                else:
                    lp_c, h_c, st_c = eager.row_log_probs(logits, target[rows], opts,
                                                          entropy=entropy)
                    for dst, src in zip(out, (lp_c, h_c, st_c), strict=True):
                        if dst is not None:
                            dst.copy_(src)
        ctx.save_for_backward(x, w, b, target, stats, h)
        ctx.opts, ctx.plan = opts, plan
        return (log_p, h) if entropy else log_p

    @staticmethod
    def backward(ctx, g, g_h=None):
        x, w, b, target, stats, h = ctx.saved_tensors
        opts, plan = ctx.opts, ctx.plan
        needs = ctx.needs_input_grad[:3]
        none = (None,) * 4
        if (g is None and g_h is None) or not any(needs):
            return None, None, None, *none
        if torch.is_grad_enabled():
            # create_graph=True: torch's ops on the whole logits, the only path that holds
            # them (second derivatives need them)
            from .log_probs import upstream_pairs

            wrt = [t for t, need in zip((x, w, b), needs, strict=True) if need]
            with torch.enable_grad(), _plan_dtypes(x):
                logits = torch.nn.functional.linear(
                    x.to(plan.compute_dtype), w.to(plan.compute_dtype),
                    None if b is None else b.to(plan.compute_dtype)).float()
                lp, ent, _ = eager.row_log_probs(logits, target, opts, entropy=h is not None)
                pairs = upstream_pairs((lp, ent), (g, g_h))
                grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt,
                                                 [u.reshape(o.shape) for o, u in pairs],
                                                 create_graph=True))
            return (*(next(grads) if need else None for need in needs), *none)

        ops = _ops(plan)
        grads = _Grads(x, w, b, needs, plan)
        w_c = w.to(plan.compute_dtype)
        dtype = logits_dtype(plan)
        b_f = None if b is None else b.to(plan.compute_dtype).to(dtype)
        in_place = plan.compute_dtype == dtype
        buf = dbuf = None
        with _plan_dtypes(x):
            for rows in _chunks(x.shape[0], plan.chunk):
                x_chunk = x[rows].to(plan.compute_dtype)
                r = x_chunk.shape[0]
                logits = float32_logits(x_chunk, w_c, b_f, dtype,
                                        None if buf is None else buf[:r])
                buf = logits if buf is None else buf
                if in_place:
                    dlogits = logits
                else:  # the GEMMs' dtype: formed in float32 by the row pass, rounded once
                    if dbuf is None:
                        dbuf = torch.empty(logits.shape, dtype=plan.compute_dtype,
                                           device=x.device)
                    dlogits = dbuf[:r]
                ops.log_prob_grad(logits, target[rows], stats[rows],
                                  None if h is None else h[rows],
                                  None if g is None else g[rows],
                                  None if g_h is None else g_h[rows], opts, grad=dlogits)
                grads.add(rows, x_chunk, dlogits, w_c)
        return (*grads.results(w, b), *none)
