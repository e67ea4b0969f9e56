"""Distillation from two LM heads: the divergence of the student's next-token distribution
from the teacher's, neither model's (N, V) logits ever held.

``fused_losses.linear_distillation_loss`` runs on the chunked head's driver
(``chunked_head.py``) as ``DistillationChunks``: per chunk of tokens the driver forms the
student's logits in float32 (one GEMM), and the chunk loss forms the teacher's for the same
tokens (a second GEMM, the teacher's operands in their own dtype, its float32 result), then
the divergence kernel (``distillation.row_divergence``; on the eager path its twin
``eager.chunk_divergence_``) gives each token's divergence and, for a reduced loss, its
gradient, over the two chunks. Per chunk, in all:

- a reduced loss (``batchmean``, ``sum``, ``mean``: one upstream scalar) — four GEMMs: the
  two heads' forward ones and the student's two gradient ones, run in the forward while the
  chunk's gradient exists; the backward scales the gradients;
- ``none`` (a gradient per token), a compiled graph or a second backward — the two logits
  again in the backward (six GEMMs).

The teacher is a constant: its tensors are read, never differentiated (the public API
refuses a teacher tensor that requires grad).
"""

from __future__ import annotations

import torch

from . import eager
from .chunked_head import ChunkLoss, chunk_logits


class DistillationChunks(ChunkLoss):
    """The divergence of each token's student distribution from its teacher's.
    ``operands = (teacher_x (N, H_t), teacher_w (V, H_t), teacher_b (V,) or None, counted
    (N,) bool)``; output: the counted tokens' divergences summed (``reduced``) or each
    token's (N,), 0 where not counted. ``teacher_dtype``: the teacher's GEMMs' dtype;
    ``kernels``: the Triton kernel (else the eager formula) on each chunk."""

    def __init__(self, opts: eager.DistillOptions, teacher_dtype: torch.dtype, reduced: bool,
                 kernels: bool):
        self.opts, self.teacher_dtype, self.reduced = opts, teacher_dtype, reduced
        self.kernels = kernels
        self.fuses_gradient = reduced

    def allocate(self, n_tokens, dtype, device, operands):
        return (torch.empty(n_tokens, dtype=dtype, device=device),)

    def workspace(self, logits, operands, backward):
        """The teacher's chunk of logits (reused), its weight and bias in its GEMMs' dtype
        (once a pass, as the driver casts the student's), and the eager formula's two
        workspaces (``chunk_divergence_``)."""
        _, t_w, t_b, _ = operands
        return {"logits": torch.empty_like(logits),
                "weight": t_w.to(self.teacher_dtype),
                "bias": None if t_b is None else t_b.to(self.teacher_dtype).to(logits.dtype),
                "eager": None if self.kernels else (torch.empty_like(logits),
                                                     torch.empty_like(logits))}

    def _divergence(self, logits, t_logits, loss, row_scale, dlogits, work):
        if self.kernels:  # (the Triton file is imported only here: eager runs without it)
            from .distillation import row_divergence

            row_divergence(logits, t_logits, self.opts, loss=loss, row_scale=row_scale,
                           grad=dlogits)
        else:
            eager.chunk_divergence_(logits, t_logits, self.opts, loss=loss,
                                    row_scale=row_scale, grad=dlogits, work=work["eager"])

    def _teacher_logits(self, rows: slice, operands: tuple, work: dict, like: torch.Tensor):
        """The teacher's logits of tokens ``rows``, in ``like``'s dtype (float32)."""
        x_chunk = operands[0][rows].to(self.teacher_dtype)
        return chunk_logits(x_chunk, work["weight"], work["bias"], like.dtype,
                            work["logits"][:like.shape[0]])

    def forward_chunk(self, logits, rows, operands, buffers, work, dlogits=None):
        counted = operands[3][rows]
        t_logits = self._teacher_logits(rows, operands, work, logits)
        loss = buffers[0][rows]
        self._divergence(logits, t_logits, loss, counted, dlogits, work)
        loss.masked_fill_(~counted, 0.0)  # (whatever a left-out token's logits hold)

    def outputs(self, buffers):
        (loss,) = buffers
        return loss.sum() if self.reduced else loss

    def backward_chunk(self, logits, rows, operands, saved, upstream, dlogits, work,
                       operand_grads, cols=None):
        counted = operands[3][rows].to(logits.dtype)
        g = upstream[0]
        scale = counted * (g.to(logits.dtype) if self.reduced else g[rows].to(logits.dtype))
        t_logits = self._teacher_logits(rows, operands, work, logits)
        scratch = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        self._divergence(logits, t_logits, scratch, scale, dlogits, work)

    def differentiable(self, logits, operands):
        t_x, t_w, t_b, counted = operands
        t_logits = torch.nn.functional.linear(t_x.to(self.teacher_dtype),
                                              t_w.to(self.teacher_dtype),
                                              None if t_b is None else
                                              t_b.to(self.teacher_dtype)).to(logits.dtype)
        rows = torch.where(counted, eager.divergence_rows(logits, t_logits, self.opts), 0.0)
        return (rows.sum() if self.reduced else rows,)
