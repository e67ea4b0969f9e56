"""The tensor-parallel LM head: the per-chunk losses of a head whose weight is this rank's
block of the vocabulary, over the chunked head's driver (``kernels/chunked_head.py``), each
the single-process head's class with its chunks' rows merged over the group: ``ShardedChunks``
(``linear_cross_entropy(..., process_group=)``) and ``ShardedLogProbChunks``
(``linear_log_probs(..., process_group=)``). One all-gather of row statistics per chunk in
the forward, none in the backward, one all-reduce of the input's gradient per backward."""

from __future__ import annotations

import weakref

import torch

from .. import _dispatch
from ..kernels import eager
from ..kernels.linear_cross_entropy import CrossEntropyChunks
from ..kernels.linear_log_probs import LogProbChunks
from .protocol import (
    HEADER_WORDS,
    VocabShard,
    _backend,
    _dist,
    _group,
    _signature,
    check_backend,
    exchange,
    vocab_shard,
)
from .vocab_parallel import row_losses

# ------------------------------------------------------------------------------------------
# the tensor-parallel LM head: linear_cross_entropy with a vocabulary-sharded weight
# ------------------------------------------------------------------------------------------


def lm_head_layout(process_group, shard_sizes, device, width: int, n_rows: int,
                   opts: eager.Options, weight, dtype: torch.dtype, extra: tuple = ()):
    """(group, this rank's VocabShard, None or its deferred (status, error)) of a
    tensor-parallel head whose weight holds ``width`` classes here, for ``n_rows`` rows;
    raises what every rank raises alike (no torch.distributed, a backend that cannot serve
    ``device``, bad ``shard_sizes``) before any collective. ``extra``: ``_signature``'s."""
    group, rank, world = _group(process_group)
    check_backend(group, device)
    shard, error = vocab_shard(group, rank, world, width, device, shard_sizes=shard_sizes,
                               signature=_signature(opts, weight, dtype, extra), n_rows=n_rows)
    return group, shard, error


class _OnGroup:
    """What both sharded heads' per-chunk losses share: their process group, held weakly,
    and the input gradient's sum over it.

    The group is reached through the call's autograd graph (its Function's context keeps the
    loss object), so an output a user keeps past ``destroy_process_group`` would keep a
    destroyed group alive; a gloo group torn down at the interpreter's exit aborts the
    process ("terminate called without an active exception"). A weak reference leaves the
    group's lifetime to torch.distributed."""

    def _hold(self, group) -> None:
        self._group = weakref.ref(group)

    @property
    def group(self):
        group = self._group()
        if group is None:
            raise RuntimeError("the process group of this vocab-sharded LM head was destroyed "
                               "before its backward")
        return group

    def reduce_input_grad_(self, grad: torch.Tensor) -> None:
        """This rank's share of the input's gradient summed over the group, in place."""
        _dist().all_reduce(grad, group=self.group)


class ShardedChunks(_OnGroup, CrossEntropyChunks):
    """The per-chunk cross-entropy of the tensor-parallel LM head
    (``linear_cross_entropy(..., process_group=)``), a ``chunked_head.ChunkLoss``: each
    chunk's logits are this rank's block of the classes of the chunk's rows.

    Forward, per chunk: ``row_losses`` merges the block's statistics over the group (one
    all-gather per chunk) and, for a reduction to one value, writes the block's gradient
    over the logits. The rows' statistics (3 per row) are kept, so a backward that
    recomputes (``none``, a second backward) writes the gradient from them with
    ``grad_from_stats``, with no collective. The input's gradient of each rank is its
    block's share; ``reduce_input_grad_`` sums the shares over the group: one all-reduce per
    backward, in ``input_grad_dtype`` (the call's ``accum_dtype``, so a half-precision
    input's gradient is rounded once, after the sum)."""

    def __init__(self, opts: eager.Options, plan, out_dtype: torch.dtype, group,
                 shard: VocabShard, error, input_grad_dtype: torch.dtype | None,
                 extra: tuple = ()):
        """``error``: this rank's own, found before the first all-gather (raised after
        it); ``extra``: ``_signature``'s (what else the ranks must ask alike)."""
        super().__init__(opts, plan, out_dtype)
        self.keeps_stats = True  # (the rows' merged statistics, for any backward)
        self._hold(group)
        self.shard, self.error = shard, error
        self.input_grad_dtype = input_grad_dtype
        self.extra = extra
        self.ops = _backend(self.kernels)

    def workspace(self, logits, operands, backward):
        """(the mean's denominators over the whole vocabulary, the forward's upstream
        factors for an upstream gradient of 1)."""
        target, weight = operands
        opts = self.opts
        dens = None if opts.reduction != "mean" else self.ops.denominators(
            target, weight, opts.ignore_index, self.shard.vocab_size)
        scales = None if not self.reduced else eager.upstream_scales(
            opts, dens, target.shape[0], None, logits.device)
        return dens, scales

    def forward_chunk(self, logits, rows, operands, buffers, work, dlogits=None):
        target, weight = operands
        dens, scales = work
        t, x = self._target_rows(target, rows), self._logit_rows(logits)
        loss, z, stats = row_losses(x, t, weight, self.opts, self.shard, self.group,
                                    kernels=self.kernels,
                                    grad=None if dlogits is None else x,
                                    scales=None if dlogits is None else scales,
                                    error=self.error if rows.start == 0 else None,
                                    extra=self.extra)
        buffers[2][:, self._call_rows(rows)] = stats
        self._store(buffers, rows, *eager.reduce_rows(loss, z, self.opts, dens,
                                                      target.shape[0]))

    def backward_chunk(self, logits, rows, operands, saved, upstream, dlogits, work,
                       operand_grads, cols=None):
        """From the kept statistics, no collective: this rank's block of the classes (a
        tile ``cols`` of it)."""
        start = 0 if cols is None else cols.start
        self._grad_from_stats(logits, rows, operands, saved[0], upstream, dlogits, work[0],
                              self.shard.offset + start, self.shard.vocab_size)

    def differentiable(self, logits, operands):
        raise RuntimeError(
            "linear_cross_entropy over a process group does not support create_graph=True: "
            "second derivatives would need the other ranks' logits")


def _log_prob_extra(outputs: tuple) -> tuple:
    """What the RL head's ranks must ask alike besides ``Options`` (``_signature``)."""
    return ("linear_log_probs", tuple(outputs))


class ShardedLogProbChunks(_OnGroup, LogProbChunks):
    """The per-chunk log-probabilities (and requested outputs) of the tensor-parallel LM head
    (``linear_log_probs(..., process_group=)``), a ``chunked_head.ChunkLoss``: each chunk's
    logits are this rank's block of the classes of the chunk's rows.

    Forward, per chunk: the block's statistics of each row (``eager.LP_STATS``: max, sum of
    exponentials, the entropy's b, the target's logit where the target is in the block, and
    the requested q, Z, first argmax), **one all-gather** (``exchange``: the protocol's
    header, so an error on one rank is raised on every rank), then every rank merges them
    alike (``eager.combine_log_prob_stats``): the same log p and outputs on every rank, and
    each row's (m~, log2 s) kept for the backward as on one process. Backward: no
    collective: the gradient of the block's logits from the kept statistics and entropy
    (the log-prob head's row gradient with the block's class offset), then the driver's
    GEMMs; the input's gradient is this rank's share, summed over the group once per
    backward (``reduce_input_grad_``, float32 for a half-precision input: rounded once,
    after the sum). The weight's and bias's gradients are the block's."""

    def __init__(self, opts: eager.Options, kernels: bool, outputs: tuple, group,
                 shard: VocabShard, error, dtype: torch.dtype, input_grad_dtype):
        """``dtype``: the operands' (the arguments' hash); ``error``: this rank's own, found
        before the first all-gather (raised after it); ``input_grad_dtype``: the input's
        gradient summed in it."""
        super().__init__(opts, kernels, outputs)
        self._hold(group)
        self.shard, self.error = shard, error
        self.signature = _signature(opts, None, dtype, _log_prob_extra(outputs))
        self.input_grad_dtype = input_grad_dtype

    @staticmethod
    def layout(process_group, shard_sizes, device, width: int, n_rows: int,
               opts: eager.Options, dtype: torch.dtype, outputs: tuple):
        """``lm_head_layout`` of the RL head (its arguments' hash has its outputs)."""
        return lm_head_layout(process_group, shard_sizes, device, width, n_rows, opts, None,
                              dtype, _log_prob_extra(outputs))

    def workspace(self, logits, operands, backward):
        """The eager backward's scratch (``eager.chunk_log_prob_grad_``'s two buffers)."""
        if self.kernels or not backward:
            return None
        return tuple(torch.empty_like(logits) for _ in range(2))

    def forward_chunk(self, logits, rows, operands, buffers, work, dlogits=None):
        (target,) = operands
        target = target[rows]
        shard, n_rows, dtype = self.shard, logits.shape[0], logits.dtype
        h = HEADER_WORDS * 4 // dtype.itemsize
        block = torch.empty(h + eager.LP_STATS * n_rows, dtype=dtype, device=logits.device)
        parts = block[h:].view(eager.LP_STATS, n_rows)
        # (a rank with its own error sends empty statistics: it raises after the gather)
        x = logits if self.error is None else logits[:, :0]
        ops = _dispatch.kernels("log_probs") if self.kernels and dtype == torch.float32 \
            else eager
        ops.log_prob_partial_stats(x, target, self.opts, class_offset=shard.offset,
                                   n_classes=shard.vocab_size, outputs=self.requested,
                                   out=parts)
        partials = exchange(block, h, target, self.signature, shard, self.group, self.error)
        *fields, stats = (None if t is None else t[rows] for t in buffers)
        eager.combine_log_prob_stats(partials.view(-1, eager.LP_STATS, n_rows), target,
                                     self.opts, shard.vocab_size, self.requested,
                                     out=(eager.RowOutputs(*fields), stats))

    def columns(self, cols=None) -> dict:
        """This rank's block of the classes (a tile ``cols`` of it): the gradient's target
        test and range."""
        start = 0 if cols is None else cols.start
        return dict(class_offset=self.shard.offset + start, n_classes=self.shard.vocab_size)

    def differentiable(self, logits, operands):
        raise RuntimeError(
            "linear_log_probs over a process group does not support create_graph=True: "
            "second derivatives would need the other ranks' logits")
