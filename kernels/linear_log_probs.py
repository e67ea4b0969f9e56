"""Per-token log-probabilities and entropy of ``x @ W.T + b``: the RL head's per-chunk loss.

``fused_losses.linear_log_probs``: what an RL trainer needs of each sampled token, from the
policy's last hidden states and its LM head, without the (N, V) logits. It runs on the
chunked head's driver (``chunked_head.py``: each chunk's logits in float32, never rounded to
bfloat16 before the log-softmax) as ``LogProbChunks``:

- forward, per chunk: the row pass (``log_probs.row_log_probs``, or its eager twin
  ``eager.chunk_log_probs_``, in place over the scratch logits) writes
  log p_y, the entropy, and (m~, log2 s) of each row, kept for the backward (8 B a token).
  Under ``torch.no_grad()`` the whole memory is one chunk of logits.
- backward: the upstream gradients are per token (advantages), unknown in the forward, so the
  driver forms each chunk's logits again (a fourth GEMM) and the row kernel writes their
  gradient from the kept statistics (``log_probs.log_prob_grad``), the entropy's term only
  where the entropy's gradient came.
"""

from __future__ import annotations

import torch

from . import eager
from .chunked_head import ChunkLoss


def _ops(kernels: bool):
    """The row pass and its gradient: the Triton kernels or their eager twins (the Triton
    file is imported only for the kernels: the eager path runs without Triton)."""
    if kernels:
        from . import log_probs

        return log_probs
    return eager


class LogProbChunks(ChunkLoss):
    """log p_y (and with ``entropy`` the entropy) of each token against the class indices
    ``operands = (target,)``: outputs (log p, entropy) or log p, in the chunks' logits'
    dtype (float32); kept for the backward: each row's (m~, log2 s) and the entropy."""

    def __init__(self, opts: eager.Options, kernels: bool, entropy: bool):
        self.opts, self.kernels, self.entropy = opts, kernels, entropy

    def allocate(self, n_tokens, dtype, device):
        return (torch.empty(n_tokens, dtype=dtype, device=device),
                torch.empty(n_tokens, dtype=dtype, device=device) if self.entropy else None,
                torch.empty(n_tokens, 2, dtype=dtype, device=device))

    def workspace(self, logits, backward):
        """The eager path's scratch: one logits-sized buffer (two in the backward), so that
        its ops make no new tensor of the chunk's size (``eager.chunk_log_probs_``)."""
        if self.kernels:
            return None
        return tuple(torch.empty_like(logits) for _ in range(2 if backward else 1))

    def forward_chunk(self, logits, rows, operands, buffers, work, dlogits=None):
        (target,) = operands
        out = tuple(None if t is None else t[rows] for t in buffers)
        if self.kernels:
            _ops(True).row_log_probs(logits, target[rows], self.opts, entropy=self.entropy,
                                     out=out)
        else:
            eager.chunk_log_probs_(logits, target[rows], self.opts, entropy=self.entropy,
                                   out=out, work=work[0][:logits.shape[0]])

    def outputs(self, buffers):
        log_p, h, _ = buffers
        return (log_p, h) if self.entropy else log_p

    def saved(self, buffers):
        return buffers[2], buffers[1]  # (m~, log2 s) of each row, the entropy

    def backward_chunk(self, logits, rows, operands, saved, upstream, dlogits, work):
        (target,), (stats, h) = operands, saved
        g, g_h = (*upstream, None)[:2]
        args = (logits, target[rows], stats[rows], None if h is None else h[rows],
                None if g is None else g[rows], None if g_h is None else g_h[rows], self.opts)
        if self.kernels:
            _ops(True).log_prob_grad(*args, grad=dlogits)
        else:
            eager.chunk_log_prob_grad_(*args, grad=dlogits,
                                       work=tuple(t[:logits.shape[0]] for t in work))

    def differentiable(self, logits, operands):
        lp, h, _ = eager.row_log_probs(logits, operands[0], self.opts, entropy=self.entropy)
        return lp, h
