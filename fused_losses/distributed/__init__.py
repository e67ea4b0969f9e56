"""Vocab-parallel losses over ``torch.distributed``: logits sharded by class.

The package: ``protocol.py`` (the group, the layout of the vocabulary's blocks, the header and
the one all-gather every loss here makes), ``vocab_parallel.py`` (the cross-entropy of
sharded logits), ``lm_head.py`` (the tensor-parallel LM head's per-chunk losses: the
cross-entropy's and the log-probs'), ``dtensor.py`` (DTensor logits and operands, FSDP2's
gathered weight). The API floor (``functional.py``, ``linear_cross_entropy.py``,
``log_probs.py``) routes a process group or a DTensor here; nothing here reaches below the
kernels' floor but through its launchers and ``eager.py``.

When the output layer is sharded by vocabulary across the ranks of a tensor-parallel group
(Megatron-LM, torch's tensor parallelism, torchtitan), rank r holds the logits of the classes
``[offset_r, offset_r + width_r)`` of every row, and the loss is computed without gathering
them: each rank computes its block's statistics of every row (``partial_stats``: max, sum of
exponentials, smoothing sums, the target's logit where the target is in the block), **one
all-gather** brings every rank's statistics to every rank, each rank merges them into the
rows' loss (``combine_stats``, the same arithmetic and order on every rank, so the loss is
bitwise the same everywhere) and writes the gradient of its own block (``grad_from_stats``).
The backward has no collective: for ``mean``/``sum`` the gradient was written in the forward
and is only scaled, for ``none`` it is recomputed from the saved statistics. The kernels or
the eager formula (``kernels/eager.py``) compute the pieces, as ``_dispatch`` decides;
no value crosses to the host in steady state.

Design points:

- **Where each rank's block lies.** DTensor logits carry their global shape: the blocks are
  DTensor's (``torch.chunk``'s: ``ceil(V / p)`` classes per rank, the last ones shorter or
  empty). Plain tensors: ``shard_sizes=[w_0, ..., w_{p-1}]`` states every rank's width (no
  communication), or by default the first call on a process group exchanges the widths (one
  small all-gather, read on the host), validates them and caches them for the group. A rank
  whose width then changes reports it through the next call's all-gather (below): a group
  keeps one layout (``reset_vocab_layout`` forgets it, on every rank).
- **One collective, and what else it carries.** Each rank's all-gather block starts with a
  header of 8 int32 words: a status (0, or the code of an error this rank found in its own
  arguments), its offset, width and vocabulary size, a hash of the call's arguments (options,
  dtype, weight present) and a fingerprint of its targets (a position-weighted sum,
  computed on the device). Every rank checks every header against the layout: the blocks
  tile ``[0, V)`` in rank order, the same arguments, the same targets. Errors found before the
  all-gather are raised after it, so every rank reaches it and none hangs.
- **Errors on every rank.** CPU tensors (gloo), and the first call of a layout on a GPU, read
  the headers on the host: every rank sees the same headers and raises the same error (the
  rank whose arguments were wrong raises its own, e.g. torch's ``IndexError`` for a target out
  of range). Later GPU calls check on the device, without a sync: a mismatch makes the loss
  and the gradient NaN. Checks that depend only on arguments every rank passes alike (shapes,
  options) raise at once, before any collective. A process group whose backend cannot run the
  all-gather on the tensors' device (NCCL with CPU tensors, gloo with CUDA tensors) is refused
  before any collective, on every rank.
- **What cannot be checked inside one collective.** A different number of rows on some rank
  changes the all-gather's size: the first call's width exchange checks it, later calls rely
  on the caller (gloo aborts the process on a size mismatch; NCCL may hang). So is the
  backend: every rank runs the kernels or every rank the eager formula (the same
  ``FUSED_LOSSES_BACKEND``, the same GPU model: few long rows are split into as many parts as
  the SM count says). Class weights are the caller's contract (the full ``(V,)`` vector, the
  same on every rank).
- **Edge cases.** A rank whose block holds no target contributes its exponentials only; a
  rank with an empty block (DTensor's uneven tail) contributes nothing; a mean over targets
  that are all ignored is NaN with a zero gradient, as torch's.
- **Building block.** ``row_losses(x, target, weight, opts, shard, group, grad=, scales=)``
  takes a row-major block of local logits and returns the rows' losses and statistics,
  writing the local gradient into the buffer it is given (the logits themselves for in
  place): the tensor-parallel LM head calls it per chunk of rows.
- **The tensor-parallel LM head** (``linear_cross_entropy(..., process_group=)``): rank r
  holds rows ``[offset_r, offset_r + width_r)`` of the head's weight (and bias), the input is
  replicated. ``ShardedChunks`` is the LM head's per-chunk cross-entropy
  (``kernels/linear_cross_entropy.py``'s class) with its rows merged over the group, on the
  same chunked-head driver (``kernels/chunked_head.py``): per chunk of tokens, the
  local logits (one GEMM, never more than a chunk of them) go through ``row_losses`` (one
  all-gather per chunk), the rows' statistics are kept (3 per row), and the forward writes
  the gradient over the logits for the three GEMMs as on one process. The backward needs no
  all-gather: it scales, or (``none``, a second backward) recomputes each chunk's logits and
  writes their gradient from the kept statistics (``grad_from_stats``). Each rank's input
  gradient is its block's share: one all-reduce per backward sums it (in ``accum_dtype``,
  float32 by default: one rounding after the sum). The weight's and bias's gradients are
  the block's, with no communication. Every rank's chunks have the same rows (the chunk size
  is planned from the widest block, the same everywhere; an explicit ``chunk_size`` must
  agree, as the number of tokens must).
- **The tensor-parallel RL head** (``linear_log_probs(..., process_group=)``):
  ``ShardedLogProbChunks``, the log-prob head's per-chunk loss on the chunked-head driver
  (``kernels/chunked_head.py``). Per chunk each rank computes its block's statistics of each
  row (``eager.LP_STATS``: max, sum of exponentials, the entropy's sum, the target's logit
  where it is in the block; on request the sum of squares, the logits' sum and the first
  argmax), one all-gather with the same header (``exchange``), and every rank merges them
  alike (``eager.combine_log_prob_stats``): log p, entropy and the requested outputs the
  same on every rank, and each row's (m~, log2 s), kept for the backward. The backward has
  no collective: the log-prob head's gradient of the block (the row gradient kernel with
  the block's class offset) from the kept statistics, then one all-reduce of the input's
  gradient (float32 for a half-precision input). The statistics' layout is fixed (7 a row
  whatever is requested): a rank that asks for other outputs disagrees in its header's
  argument hash, not in the all-gather's size.
- **DTensor weights** (``dtensor_linear_head``): a replicated DTensor input with a
  weight sharded ``Shard(0)`` over one mesh dimension is tensor parallelism (the head above,
  over that dimension's group); a plain input with a DTensor weight (FSDP2's sharded
  parameter, outside the module's forward) gathers it as FSDP2 would, its gradient
  reduce-scattered and averaged over the mesh.

Not supported: probability targets, uint8 targets, ``create_graph=True`` (a double backward
would need the other ranks' logits), ``torch.compile`` of the collective.
"""

from __future__ import annotations

from .. import _dispatch
from .dtensor import dtensor_cross_entropy, dtensor_linear_head
from .lm_head import ShardedChunks, ShardedLogProbChunks, lm_head_layout
from .protocol import BAD_TARGET, VocabShard, reset_vocab_layout
from .vocab_parallel import vocab_parallel_cross_entropy

# The public functions' process_group= and DTensor operands come here (the API floor below
# never imports this one): its entry points handed down once.
_dispatch.provide_tensor_parallel(_dispatch.TensorParallel(
    dtensor_cross_entropy=dtensor_cross_entropy, dtensor_linear_head=dtensor_linear_head,
    lm_head_layout=lm_head_layout, sharded_chunks=ShardedChunks,
    sharded_log_prob_chunks=ShardedLogProbChunks, bad_target=BAD_TARGET))

__all__ = ["VocabShard", "reset_vocab_layout", "vocab_parallel_cross_entropy"]
