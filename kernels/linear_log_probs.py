"""Per-token log-probabilities and entropy of ``x @ W.T + b``: the RL head's per-chunk loss.

``fused_losses.linear_log_probs``: what an RL trainer needs of each sampled token, from the
policy's last hidden states and its LM head, without the (N, V) logits. It runs on the
chunked head's driver (``chunked_head.py``: each chunk's logits in float32, never rounded to
bfloat16 before the log-softmax) as ``LogProbChunks``:

- forward, per chunk: the row pass (``log_probs.row_log_probs``, or its eager twin
  ``eager.chunk_log_probs_``, in place over the scratch logits) writes
  log p_y, the outputs requested (the entropy; TRL's log sum p^2, mean logit, is-top-1),
  and (m~, log2 s) of each row, kept for the backward (8 B a token).
  Under ``torch.no_grad()`` the whole memory is one chunk of logits.
- a head sharded by vocabulary (``fused_losses.distributed.ShardedLogProbChunks``, this
  class with a class offset and one all-gather of row statistics per chunk) runs on the same
  kernels: ``log_probs.log_prob_partial_stats`` and ``log_prob_grad(class_offset=)``.
- backward: the upstream gradients are per token (advantages), unknown in the forward, so the
  driver forms the logits again (a fourth GEMM) and the row kernel writes their gradient
  from the kept statistics (``log_probs.log_prob_grad``), the entropy's term only where the
  entropy's gradient came. The kept statistics are all a logit's gradient needs of its row,
  so the backward runs in tiles of every token by a block of the classes
  (``tiles_classes``; the plan's ``grad_chunk`` x ``grad_classes``, the memory rule's size):
  the weight's float32 gradient accumulator, 8 V H bytes, is read and written once, where
  chunks of tokens pass over it once each (8 times at N=8192: about 7 ms of the H200's
  4.2 TB/s at V=128256, H=4096).
"""

from __future__ import annotations

import torch

from . import eager
from .chunked_head import ChunkLoss, shaped


def _ops(kernels: bool):
    """The row pass and its gradient: the Triton kernels or their eager twins (the Triton
    file is imported only for the kernels: the eager path runs without Triton)."""
    if kernels:
        from . import log_probs

        return log_probs
    return eager


class LogProbChunks(ChunkLoss):
    """log p_y of each token against the class indices ``operands = (target,)``, and the
    ``outputs`` requested (among ``eager.EXTRA_OUTPUTS``: the entropy; TRL's log sum p^2,
    mean logit and is-top-1, which carry no gradient): outputs log p and those requested
    (``eager.present``), in the chunks' logits' dtype (float32; is_top1 bool); kept for the
    backward: each row's (m~, log2 s) and the entropy."""

    tiles_classes = True  # (the gradient of a tile needs each row's kept (m~, log2 s), H)

    def __init__(self, opts: eager.Options, kernels: bool, outputs: tuple = (),
                 n_classes: int | None = None):
        """``n_classes``: the weight's rows (the classes a tile of the backward lies in)."""
        self.opts, self.kernels, self.requested = opts, kernels, outputs
        self.n_classes = n_classes

    def allocate(self, n_tokens, dtype, device, operands):
        """(the ``RowOutputs`` fields' buffers, the statistics (N, 2)) as one flat tuple."""
        rows, stats = eager.allocate_rows(n_tokens, self.requested, dtype, device)
        return (*rows, stats)

    def workspace(self, logits, operands, backward):
        """The eager path's scratch: one logits-sized buffer (two in the backward), so that
        its ops make no new tensor of the chunk's size (``eager.chunk_log_probs_``)."""
        if self.kernels:
            return None
        return tuple(torch.empty_like(logits) for _ in range(2 if backward else 1))

    def forward_chunk(self, logits, rows, operands, buffers, work, dlogits=None):
        (target,) = operands
        *fields, stats = (None if t is None else t[rows] for t in buffers)
        out = (eager.RowOutputs(*fields), stats)
        if self.kernels:
            _ops(True).row_log_probs(logits, target[rows], self.opts,
                                     outputs=self.requested, out=out)
        else:
            eager.chunk_log_probs_(logits, target[rows], self.opts, outputs=self.requested,
                                   out=out, work=shaped(work[0], logits.shape))

    def outputs(self, buffers):
        return eager.present(eager.RowOutputs(*buffers[:-1]))

    def non_differentiable(self, outputs):
        rows = eager.unpack(outputs, self.requested)
        return tuple(t for t in (getattr(rows, name) for name in eager.NON_DIFFERENTIABLE)
                     if t is not None)

    def saved(self, buffers):
        """(m~, log2 s) and a copy of H (4 B a token): the caller may modify the entropy it
        is handed in place (masking it), as torch's formula allows."""
        h = eager.RowOutputs(*buffers[:-1]).entropy
        return buffers[-1], None if h is None else h.clone()

    def backward_chunk(self, logits, rows, operands, saved, upstream, dlogits, work,
                       operand_grads, cols=None):
        (target,), (stats, h) = operands, saved
        g = upstream[0]
        g_h = upstream[1] if h is not None else None  # the entropy comes right after log p
        args = (logits, target[rows], stats[rows], None if h is None else h[rows],
                None if g is None else g[rows], None if g_h is None else g_h[rows], self.opts)
        if self.kernels:
            _ops(True).log_prob_grad(*args, grad=dlogits, **self.columns(cols))
        else:
            eager.chunk_log_prob_grad_(*args, grad=dlogits,
                                       work=tuple(shaped(t, logits.shape) for t in work),
                                       **self.columns(cols))

    def columns(self, cols: slice | None = None) -> dict:
        """Where the logits' columns lie among the classes (the gradient's ``class_offset``
        and ``n_classes``): the whole vocabulary, or the tile ``cols`` of it; a vocab-sharded
        head's block says."""
        if cols is None:
            return {}
        return dict(class_offset=cols.start, n_classes=self.n_classes)

    def differentiable(self, logits, operands):
        rows, _ = eager.row_log_probs(logits, operands[0], self.opts, outputs=self.requested)
        return eager.present(rows)
