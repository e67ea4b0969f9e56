"""Vocab-parallel cross-entropy over ``torch.distributed``: logits sharded by class.

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
  replicated. ``ShardedChunks`` is the per-chunk cross-entropy the LM head's Function
  (``kernels/linear_cross_entropy.py``) runs instead of its own: per chunk of tokens, the
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
- **DTensor weights** (``dtensor_linear_cross_entropy``): a replicated DTensor input with a
  weight sharded ``Shard(0)`` over one mesh dimension is tensor parallelism (the head above,
  over that dimension's group); a plain input with a DTensor weight (FSDP2's sharded
  parameter, outside the module's forward) gathers it as FSDP2 would, its gradient
  reduce-scattered and averaged over the mesh.

Not supported: probability targets, uint8 targets, ``create_graph=True`` (a double backward
would need the other ranks' logits), ``torch.compile`` of the collective.
"""

from __future__ import annotations

import functools
import math
import weakref
import zlib
from typing import NamedTuple

import torch

from . import _dispatch
from ._validation import (
    check_cross_entropy,
    check_cross_entropy_extras,
    check_float_argument,
    check_int,
    check_target_values,
    check_tensor,
    resolve_reduction,
)
from .kernels import eager
from .kernels._autograd import detached_without_grad_mode, may_fuse_gradient, output_as
from .kernels.linear_log_probs import LogProbChunks

__all__ = ["VocabShard", "reset_vocab_layout", "vocab_parallel_cross_entropy"]

HEADER_WORDS = 8  # status, offset, width, vocab size, argument hash, target fingerprint (2), 0
STATS = eager.STATS

# status codes: what a rank found wrong in its own arguments (raised there, after the gather)
OK, BAD_WIDTH, BAD_TARGET = 0, 1, 2
_STATUS = {
    BAD_WIDTH: "its block's width disagrees with the vocabulary layout",
    BAD_TARGET: "a class target is out of range",
}
# backends that cannot run this loss's all-gather on a device type
_REFUSED = {"cpu": ("nccl", "xccl"), "cuda": ("gloo",)}


def _dist():
    import torch.distributed as dist

    return dist


# ------------------------------------------------------------------------------------------
# the group, and where each rank's block of the vocabulary lies
# ------------------------------------------------------------------------------------------


class VocabShard(NamedTuple):
    """This rank's block of the vocabulary, ``[offset, offset + width)`` of ``vocab_size``
    classes, and every rank's width in rank order (``source`` names where they come from)."""

    rank: int
    offset: int
    width: int
    vocab_size: int
    widths: tuple[int, ...]
    source: str


def _shard(widths, rank: int, source: str) -> VocabShard:
    widths = tuple(int(w) for w in widths)
    return VocabShard(rank, sum(widths[:rank]), widths[rank], sum(widths), widths, source)


def _group(process_group):
    """(group, this rank's index in it, its size), or a clear error."""
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel cross-entropy needs torch.distributed: call "
                           "torch.distributed.init_process_group first")
    group = dist.group.WORLD if process_group is None else process_group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group it passed")
    return group, rank, dist.get_world_size(group)


def check_backend(group, device: torch.device) -> None:
    """Refuse a process group whose backend cannot all-gather tensors of ``device`` (NCCL
    with CPU tensors, gloo with CUDA tensors: it would go through host copies and syncs),
    before any collective: every rank raises."""
    name = str(_dist().get_backend(group)).lower()
    if ":" in name:  # "cpu:gloo,cuda:nccl": a backend per device type
        backend = dict(item.split(":", 1) for item in name.split(",")).get(device.type)
    else:
        backend = name
    if backend is None or backend in _REFUSED.get(device.type, ()):
        use = {"cpu": "gloo", "cuda": "nccl"}.get(device.type, "a backend for it")
        raise ValueError(
            f"vocab-parallel cross-entropy: the process group's backend ({name}) cannot "
            f"all-gather {device.type} tensors; use a group with {use} for {device.type} "
            "tensors (init_process_group('cpu:gloo,cuda:nccl') serves both)")


def _all_gather(out: torch.Tensor, block: torch.Tensor, group) -> None:
    """Every rank's ``block``, concatenated in rank order into ``out``: the loss's one
    collective."""
    dist = _dist()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, block, group=group)


# group -> the widths exchanged on its first call. Weak: a group the user destroyed must not
# outlive its ``destroy_process_group`` here (gloo's threads torn down at the interpreter's
# exit abort the process: "terminate called without an active exception").
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# group -> its layouts (widths, device type) whose first call has read its headers on the host
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Where the headers are checked: None: on the host for CPU tensors and a layout's first call,
# else on the device; True / False: always on the host / the device (tests set it).
CHECK_ON_HOST: bool | None = None


def reset_vocab_layout(process_group=None) -> None:
    """Forget the block widths exchanged on the group's first call (call it on every rank of
    the group, then the next call exchanges them again)."""
    group = _dist().group.WORLD if process_group is None else process_group
    _LAYOUTS.pop(group, None)


def _exchanged_widths(group, rank: int, world: int, width: int, device, signature: int,
                      n_rows: int) -> tuple[int, ...]:
    """Every rank's block width, all-gathered (the group's first call: one small collective
    read on the host) with the number of rows and the arguments' hash, which must agree:
    every rank sees the same values and raises the same error."""
    mine = torch.tensor([width, n_rows, signature], dtype=torch.int64, device=device)
    every = torch.empty(world * 3, dtype=torch.int64, device=device)
    _all_gather(every, mine, group)
    widths, rows, signatures = (list(v) for v in zip(*every.view(world, 3).tolist(),
                                                     strict=True))
    if len(set(rows)) > 1:
        raise RuntimeError(
            "vocab-parallel cross-entropy: the ranks have different numbers of rows "
            f"({rows}, in rank order): every rank passes the same targets")
    if len(set(signatures)) > 1:
        raise RuntimeError(
            "vocab-parallel cross-entropy: the ranks called the loss with different "
            "arguments (ignore_index, reduction, label_smoothing, softcap, z_loss, "
            "temperature, logit_scale, weight, dtype or the log-probs' outputs)")
    if sum(widths) == 0:
        raise ValueError("vocab-parallel cross-entropy: every rank's block of logits is empty")
    return tuple(widths)


def vocab_shard(group, rank: int, world: int, width: int, device, *, shard_sizes=None,
                signature: int = 0, n_rows: int = 0):
    """This rank's block of the vocabulary, for a block of ``width`` classes: from
    ``shard_sizes``, or the widths exchanged on the group's first call (cached). Returns
    (shard, None or (BAD_WIDTH, the error to raise after the all-gather) if ``width``
    disagrees)."""
    if shard_sizes is not None:
        sizes = [check_int("vocab_parallel_cross_entropy", "shard_sizes", 0, s)
                 for s in shard_sizes]
        if len(sizes) != world or min(sizes) < 0 or sum(sizes) == 0:
            raise ValueError(
                f"shard_sizes must give each of the group's {world} ranks a width >= 0, "
                f"not all 0; got {list(shard_sizes)}")
        shard = _shard(sizes, rank, "shard_sizes")
    else:
        widths = _LAYOUTS.get(group)
        if widths is None:
            widths = _exchanged_widths(group, rank, world, width, device, signature, n_rows)
            _LAYOUTS[group] = widths
        shard = _shard(widths, rank, "the widths exchanged on the group's first call")
    error = None
    if width != shard.width:
        error = BAD_WIDTH, ValueError(
            f"vocab-parallel cross-entropy: rank {rank}'s block has {width} classes, but "
            f"{shard.source} give it {shard.width} (widths {list(shard.widths)}); a changed "
            "layout needs shard_sizes=, or reset_vocab_layout() on every rank")
    return shard, error


def dtensor_widths(vocab_size: int, world: int) -> tuple[int, ...]:
    """DTensor's blocks of ``vocab_size`` classes over ``world`` ranks (``torch.chunk``'s):
    ``ceil(V / p)`` each, the last ones shorter or empty."""
    chunk = -(-vocab_size // world)
    return tuple(max(0, min(chunk, vocab_size - r * chunk)) for r in range(world))


# ------------------------------------------------------------------------------------------
# the header: what every rank checks about every other
# ------------------------------------------------------------------------------------------


def _signature(opts: eager.Options, weight, dtype: torch.dtype, extra: tuple = ()) -> int:
    """A hash of the arguments every rank must pass alike (not Python's hash: it differs
    between processes); ``extra``: what else a loss asks alike (the log-probs head: its
    outputs). Not the number of rows: the all-gather's size already agrees, and a header
    that does not change with it is copied to the device once."""
    # every option, whichever is added
    key = repr((tuple(opts), weight is None, str(dtype)) + tuple(extra))
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=64)
def _device_words(device: torch.device, words: tuple) -> torch.Tensor:
    """A constant int32 tensor on the device, copied there once (not at every call)."""
    return torch.tensor(words, dtype=torch.int32, device=device).view(-1, HEADER_WORDS)


@functools.lru_cache(maxsize=16)
def _positions(n_rows: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n_rows, dtype=torch.int64, device=device) * 2 + 1


def _fingerprint(target: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of the targets, int64 on the device (wrapping is fine: every
    rank wraps alike)."""
    return (target.long() * _positions(target.numel(), target.device)).sum()


def _check_headers_on_host(headers: torch.Tensor, shard: VocabShard) -> None:
    """Raise, on every rank alike, if any rank reported an error or disagrees with the
    others: the layout, the arguments, the targets."""
    rows = headers.cpu().tolist()
    failed = [r for r, h in enumerate(rows) if h[0] != OK]
    if failed:
        reasons = "; ".join(f"rank {r}: {_STATUS.get(rows[r][0], 'an error')}"
                            for r in failed)
        raise RuntimeError(f"vocab-parallel cross-entropy failed on another rank ({reasons})")
    offsets, widths, sizes = ([h[i] for h in rows] for i in (1, 2, 3))
    tiled = offsets[0] == 0 and all(offsets[r + 1] == offsets[r] + widths[r]
                                    for r in range(len(rows) - 1))
    if not tiled or len(set(sizes)) > 1 or sizes[0] != offsets[-1] + widths[-1]:
        raise RuntimeError(
            "vocab-parallel cross-entropy: the ranks' blocks do not tile the vocabulary in "
            f"rank order (offsets {offsets}, widths {widths}, vocabulary sizes {sizes})")
    if len({h[4] for h in rows}) > 1:
        raise RuntimeError(
            "vocab-parallel cross-entropy: the ranks called the loss with different "
            "arguments (ignore_index, reduction, label_smoothing, softcap, z_loss, "
            "temperature, logit_scale, weight, dtype or the log-probs' outputs)")
    differ = [r for r, h in enumerate(rows) if h[5:7] != rows[shard.rank][5:7]]
    if differ:
        raise RuntimeError(
            f"vocab-parallel cross-entropy: the targets differ across ranks (ranks {differ} "
            f"disagree with rank {shard.rank}): every rank passes the same targets")


# ------------------------------------------------------------------------------------------
# the rows' losses over the group: partial statistics, one all-gather, merge, gradient
# ------------------------------------------------------------------------------------------


def _backend(kernels: bool):
    return _dispatch.kernels("cross_entropy") if kernels else eager


def exchange(block: torch.Tensor, h: int, target: torch.Tensor, signature: int,
             shard: VocabShard, group, error) -> torch.Tensor:
    """The protocol's one collective: ``block`` is this rank's all-gather block, ``h``
    elements of header (written here: status, layout, ``signature``, the targets'
    fingerprint) then its statistics (the caller's). All-gathers every rank's, raises this
    rank's own ``error`` (None, or (status, exception) found before: every rank reached the
    collective), checks every header (on the host: raised on every rank alike; on the
    device: NaN statistics) and returns every rank's statistics, (world, block size - h),
    in rank order."""
    device, dtype, world = block.device, block.dtype, len(shard.widths)
    status = OK if error is None else error[0]
    words = (status, shard.offset, shard.width, shard.vocab_size, signature, 0, 0, 0)
    header = block[:h].view(torch.int32)
    header[:5].copy_(_device_words(device, words)[0, :5])
    header[5:7].copy_(_fingerprint(target).reshape(1).view(torch.int32))
    header[7:].zero_()

    gathered = torch.empty(world * block.numel(), dtype=dtype, device=device)
    _all_gather(gathered, block, group)
    gathered = gathered.view(world, block.numel())
    if error is not None:
        raise error[1]
    headers = gathered[:, :h].view(torch.int32)
    partials = gathered[:, h:]  # (every rank's parts, contiguous once copied out)
    checked = _CHECKED.setdefault(group, set())
    key = (shard.widths, device.type)
    on_host = CHECK_ON_HOST
    if on_host is None:
        on_host = device.type == "cpu" or key not in checked
    if on_host:
        _check_headers_on_host(headers, shard)
        checked.add(key)
        return partials.contiguous()
    # on the device, no sync: a rank that disagrees makes every row's loss NaN
    expected = _device_words(device, tuple(
        w for r in range(world) for w in (OK, sum(shard.widths[:r]), shard.widths[r],
                                          shard.vocab_size, signature, 0, 0, 0)))
    bad = ((headers[:, :5] != expected[:, :5]).any()
           | (headers[:, 5:7] != headers[shard.rank, 5:7]).any())
    return partials + torch.where(bad, math.nan, 0.0)


def row_losses(x: torch.Tensor, target: torch.Tensor, weight, opts: eager.Options,
               shard: VocabShard, group, *, kernels: bool, grad=None, scales=None,
               error: tuple[int, Exception] | None = None):
    """The loss, z-loss term (None without z-loss) and statistics (3, rows) of rows whose
    classes are sharded over ``group``, from this rank's block ``x`` (rows, width) with unit
    class stride (a row-major block of logits), as ``cross_entropy.row_losses`` gives them for
    whole rows; with ``grad`` (x's shape; x itself for in place), the gradient of the block
    for ``scales`` (see ``eager.upstream_scales``) is written into it.

    ``target``: the rows' global class indices (rows,), contiguous, the same on every rank;
    ``weight``: all ``shard.vocab_size`` class weights or None; ``kernels``: the Triton
    kernels or the eager formula (the same choice on every rank). One all-gather; ``error``,
    (status, exception) of this rank's own error found before it, is raised after it (every
    rank reaches the collective)."""
    width, n_rows = x.shape[1], x.shape[0]
    device = x.device
    ops = _backend(kernels)
    world = len(shard.widths)
    dtype = torch.float32 if kernels else eager.compute_dtype(
        x.dtype, *(() if weight is None else (weight.dtype,)))
    x3 = x.unsqueeze(0)
    # parts per rank: the kernels split few long rows among programs (the same count on
    # every rank: the all-gather's blocks have one size)
    n_parts = (ops.split_plan(n_rows, max(shard.widths), device) if kernels and n_rows
               else 1)

    # this rank's block of the all-gather: header, then its parts' statistics
    h = HEADER_WORDS * 4 // dtype.itemsize
    block = torch.empty(h + n_parts * STATS * n_rows, dtype=dtype, device=device)
    parts = block[h:].view(n_parts, STATS, n_rows)
    done = 0
    if error is None and width and n_rows:
        partials = ops.partial_stats(x3, target, weight, opts, class_offset=shard.offset,
                                     n_classes=shard.vocab_size,
                                     **({"n_splits": n_parts} if kernels else {}))
        done = partials.shape[0]
        parts[:done].copy_(partials)
    if done < n_parts:  # empty parts: no classes (m = -inf, sums 0)
        parts[done:].zero_()
        parts[done:, 0] = -math.inf
    partials = exchange(block, h, target, _signature(opts, weight, x.dtype), shard, group,
                        error)
    partials = partials.view(world * n_parts, STATS, n_rows)
    loss, z, stats = ops.combine_stats(partials, target, weight, opts, shard.vocab_size)
    if grad is not None and width and n_rows:
        plan = {"n_splits": ops.split_plan(n_rows, width, device)} if kernels else {}
        ops.grad_from_stats(x3, target, weight, stats, scales, opts, grad=grad.unsqueeze(0),
                            class_offset=shard.offset, n_classes=shard.vocab_size, **plan)
    return loss, z, stats


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """The loss of rows sharded by class over a group, from this rank's block ``x`` (rows,
    width). Returns (loss, z-loss term); the second is for logging, not differentiable."""

    @staticmethod
    def forward(ctx, x, target, weight, opts: eager.Options, shard: VocabShard, group,
                kernels: bool, error, out_dtype):
        ops = _backend(kernels)
        n_rows = x.shape[0]
        denom = None
        if opts.reduction == "mean":
            denom = ops.denominators(target, weight, opts.ignore_index, shard.vocab_size)
        # the gradient in the forward pays off when the upstream gradient is one scalar
        fused = ctx.needs_input_grad[0] and opts.reduction != "none" and may_fuse_gradient()
        grad = scales = None
        if fused:
            grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            scales = eager.upstream_scales(opts, denom, n_rows, None, x.device)
        loss, z, stats = row_losses(x, target, weight, opts, shard, group, kernels=kernels,
                                    grad=grad, scales=scales, error=error)
        out, z_out = eager.reduce_rows(loss, z, opts, denom, n_rows)
        if z_out is None:
            z_out = torch.zeros_like(out)
        ctx.grad, ctx.opts, ctx.shard, ctx.kernels = grad, opts, shard, kernels
        ctx.save_for_backward(x, target, weight, stats, denom)
        z_out = output_as(z_out, out_dtype)
        ctx.mark_non_differentiable(z_out)
        return output_as(out, out_dtype), z_out

    @staticmethod
    def backward(ctx, grad_out, _grad_z):
        none = (None,) * 7
        if torch.is_grad_enabled():
            raise RuntimeError(
                "vocab-parallel cross-entropy does not support create_graph=True: second "
                "derivatives would need the other ranks' logits")
        x, target, weight, stats, denom = ctx.saved_tensors
        opts, shard, ops = ctx.opts, ctx.shard, _backend(ctx.kernels)
        if ctx.grad is not None:  # the first backward after the forward wrote the gradient
            grad, ctx.grad = ctx.grad, None
            if ctx.kernels and grad.numel():
                ops.scale_by_upstream_(grad, grad_out)  # on the device: no traffic when 1
            elif grad.numel():
                grad.mul_(grad_out)
            return grad, None, *none
        if not ctx.needs_input_grad[0]:
            return None, None, *none
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if x.numel():
            scales = eager.upstream_scales(opts, denom, x.shape[0], grad_out, x.device)
            plan = {"n_splits": ops.split_plan(*x.shape, x.device)} if ctx.kernels else {}
            ops.grad_from_stats(x.unsqueeze(0), target, weight, stats, scales, opts,
                                grad=grad.unsqueeze(0), class_offset=shard.offset,
                                n_classes=shard.vocab_size, **plan)
        return grad, None, *none


# ------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------


def _options(fn: str, ignore_index, reduction, label_smoothing, softcap, z_loss):
    reduction = resolve_reduction(None, None, reduction)
    ignore_index = check_int(fn, "ignore_index", 0, ignore_index)
    label_smoothing = check_float_argument(fn, "label_smoothing", 0, label_smoothing)
    softcap, z_loss = check_cross_entropy_extras(softcap, z_loss)
    return ignore_index, reduction, label_smoothing, softcap, z_loss


def _sharded_loss(x, target, weight, group, rank, world, shard_of, ignore_index, reduction,
                  label_smoothing, softcap, z_loss, out_dtype, input_dtype, temperature=1.0,
                  logit_scale=1.0):
    """(loss, z-loss term) of rows (rows, width) of a block of classes and their targets
    (rows,), after the checks every rank makes alike. ``shard_of(signature)`` gives the
    block's (VocabShard, deferred error)."""
    check_backend(group, x.device)
    n_rows, width = x.shape
    transform = dict(softcap=softcap, temperature=temperature, logit_scale=logit_scale)
    signature = _signature(eager.Options(ignore_index=ignore_index, reduction=reduction,
                                         smoothing=max(label_smoothing, 0.0), z_loss=z_loss,
                                         **transform), weight, x.dtype)
    shard, error = shard_of(signature)
    # torch's checks of the gathered call, on a stand-in of the global logits
    stand_in = torch.empty((n_rows, shard.vocab_size), dtype=x.dtype, device="meta")
    spec = check_cross_entropy(stand_in, target, weight, ignore_index, label_smoothing,
                               input_dtype)
    opts = eager.Options(ignore_index=ignore_index, reduction=reduction,
                         smoothing=spec.smoothing, z_loss=z_loss, **transform)
    if target.dtype != torch.int64:
        raise NotImplementedError(
            "vocab-parallel cross-entropy takes int64 class targets, got "
            f"{str(target.dtype).removeprefix('torch.')}")
    if error is None and _dispatch.reads_values_on_host(target):
        try:  # raised after the all-gather, which every rank must reach
            check_target_values(target, spec, weight, ignore_index, reduction)
        except IndexError as e:
            error = BAD_TARGET, e
    kernels = _dispatch.use_kernels(x, target, weight, other_dtypes=(torch.int64,),
                                    numel=n_rows * shard.vocab_size)
    if x.stride(-1) != 1 and width > 1:
        x = x.contiguous()
    x, target, weight = detached_without_grad_mode(
        x, target.reshape(-1).contiguous(), None if weight is None else weight.contiguous())
    return VocabParallelCrossEntropyFunction.apply(x, target, weight, opts, shard, group,
                                                   kernels, error, out_dtype)


def _dtypes(x: torch.Tensor, weight):
    """(the weight, the loss's dtype, the dtype torch's checks see) under torch.autocast or
    not: float32 under autocast, as ``cross_entropy``."""
    if _dispatch.autocast_on(x):
        return (_dispatch.autocast_cast(weight), _dispatch.autocast_dtype(x.dtype),
                _dispatch.autocast_dtype(x.dtype))
    return weight, x.dtype, x.dtype


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    process_group=None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    shard_sizes=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Cross-entropy of logits sharded by class over ``process_group``: the loss and the
    gradients ``fused_losses.cross_entropy`` gives on the gathered logits, with one
    all-gather of per-row statistics in the forward and no collective in the backward.

    Rank r holds the contiguous block r of the vocabulary, in rank order; blocks may be
    uneven (and empty). The result is the same on every rank: ``cross_entropy(gathered,
    target, ...)`` with ``gathered`` the ranks' blocks concatenated along the last dimension
    (rows flattened: ``(*, V)`` logits give ``(*)`` losses for ``'none'``); the gradient of
    ``local_logits`` is its block of the gathered logits' gradient.

    Args:
        local_logits (Tensor): this rank's block of the logits, :math:`(*, V_r)`, classes on
            the last dimension (a column-parallel LM head's output); float32, bfloat16,
            float16 (float64 runs the eager formula in float64).
        target (Tensor): class indices (int64), :math:`(*)`, the same on every rank.
        process_group (ProcessGroup, optional): the ranks the vocabulary is sharded over.
            Default: the default group
        weight (Tensor, optional): the weight of every class, :math:`(V)`, the same on every
            rank. Default: ``None``
        ignore_index (int, optional): a target value that is ignored. Default: ``-100``
        reduction (str, optional): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``
        label_smoothing (float, optional): in :math:`[0.0, 1.0]`. Default: ``0.0``
        softcap (float, optional): ``softcap * tanh(logits / softcap)`` first. Default:
            ``None``
        z_loss (float, optional): PaLM's z-loss weight, as ``cross_entropy``'s. Default:
            ``0.0``
        return_z_loss (bool, optional): return ``(loss, z_term)``. Default: ``False``
        shard_sizes (sequence of int, optional): every rank's block width, in rank order, the
            same list on every rank. Default: ``None``: exchanged on the group's first call
            and cached (one small all-gather, once)

    Examples::

        >>> # rank r of a 2-rank group holds classes [r * 16000, (r + 1) * 16000)
        >>> local = hidden @ lm_head_shard.T            # (N, 16000)
        >>> loss = vocab_parallel_cross_entropy(local, labels, process_group=tp_group)
        >>> loss.backward()
    """
    fn = "vocab_parallel_cross_entropy"
    check_tensor(fn, "local_logits", 1, local_logits)
    check_tensor(fn, "target", 2, target)
    check_tensor(fn, "weight", 0, weight, optional=True)
    args = _options(fn, ignore_index, reduction, label_smoothing, softcap, z_loss)
    if local_logits.dim() == 0 or not local_logits.is_floating_point():
        raise ValueError(f"{fn}: local_logits must be a floating tensor of at least one "
                         f"dimension, got {local_logits.dtype} of shape "
                         f"{tuple(local_logits.shape)}")
    if target.shape == local_logits.shape and target.is_floating_point():
        raise NotImplementedError(f"{fn}: probability targets are not supported")
    if tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(f"{fn}: expected a target of shape {tuple(local_logits.shape[:-1])} "
                         f"(the logits' without the classes), got {tuple(target.shape)}")
    group, rank, world = _group(process_group)
    x = local_logits.reshape(math.prod(target.shape), local_logits.shape[-1])
    weight, out_dtype, input_dtype = _dtypes(x, weight)

    def shard_of(signature):
        return vocab_shard(group, rank, world, x.shape[1], x.device, shard_sizes=shard_sizes,
                           signature=signature, n_rows=x.shape[0])

    loss, z = _sharded_loss(x, target.reshape(-1), weight, group, rank, world, shard_of, *args,
                            out_dtype, input_dtype)
    if args[1] == "none":
        loss, z = loss.view(target.shape), z.view(target.shape)
    return (loss, z) if return_z_loss else loss


# ------------------------------------------------------------------------------------------
# DTensor logits sharded on the class dimension (torch's loss_parallel situation)
# ------------------------------------------------------------------------------------------


def _replicated_local(t, name: str):
    """A DTensor operand replicated over its mesh, as its local tensor (others as they are)."""
    if not _dispatch.is_dtensor(t):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"a loss with DTensor operands: the {name} must be replicated over "
                         f"the mesh, got placements {tuple(t.placements)}")
    return t.to_local()


def dtensor_cross_entropy(input, target, weight, ignore_index: int, reduction: str,
                          label_smoothing: float, softcap, z_loss: float, return_z_loss: bool,
                          temperature: float = 1.0, logit_scale: float = 1.0):
    """``cross_entropy`` of DTensor logits sharded on the class dimension (``Shard(1)``;
    ``Shard(0)`` for a :math:`(C)` input) over one mesh dimension and replicated over the
    others: the vocab-parallel loss over that mesh dimension's group, returned as a DTensor
    replicated over the mesh (as torch's ``loss_parallel``). Arguments as validated by
    ``cross_entropy``; target and weight plain tensors or replicated DTensors."""
    from torch.distributed.tensor import DTensor, Replicate

    target = _replicated_local(target, "target")
    weight = _replicated_local(weight, "weight")
    class_dim = 0 if input.dim() == 1 else 1
    mesh, placements = input.device_mesh, tuple(input.placements)
    sharded = [d for d, p in enumerate(placements) if p.is_shard()]
    if (len(sharded) != 1 or placements[sharded[0]].dim % input.dim() != class_dim
            or not all(p.is_replicate() for d, p in enumerate(placements) if d != sharded[0])):
        raise NotImplementedError(
            "cross_entropy takes DTensor logits sharded on the class dimension "
            f"(Shard({class_dim})) over one mesh dimension and replicated over the others; got "
            f"placements {placements}: call it on a local tensor or full_tensor()")
    if target.shape == input.shape and target.is_floating_point():
        raise NotImplementedError("cross_entropy with DTensor logits: probability targets "
                                  "are not supported")
    mesh_dim = sharded[0]
    group = mesh.get_group(mesh_dim)
    rank, world = mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim)
    local = input.to_local()
    weight, out_dtype, input_dtype = _dtypes(local, weight)
    # torch's own checks of the global call (shapes, dtypes), on a stand-in
    check_cross_entropy(torch.empty(input.shape, dtype=input.dtype, device="meta"), target,
                        weight, ignore_index, label_smoothing, input_dtype)
    if local.dim() == 1:
        rows, t = local.unsqueeze(0), target.reshape(1)
    else:  # (N, C_r, d1, ..., dK): rows of classes
        rows = local.movedim(1, -1)
        rows, t = rows.reshape(target.numel(), rows.shape[-1]), target.reshape(-1)
    widths = dtensor_widths(input.shape[class_dim], world)

    def shard_of(signature):
        shard = _shard(widths, rank, "DTensor's placements")
        error = None
        if rows.shape[1] != shard.width:
            error = BAD_WIDTH, ValueError(
                f"cross_entropy with DTensor logits: rank {rank}'s block has "
                f"{rows.shape[1]} classes, DTensor's layout gives it {shard.width}")
        return shard, error

    loss, z = _sharded_loss(rows, t, weight, group, rank, world, shard_of, ignore_index,
                            reduction, label_smoothing, softcap, z_loss, out_dtype, input_dtype,
                            temperature, logit_scale)
    if reduction == "none":
        shape = () if input.dim() == 1 else target.shape
        loss, z = loss.view(shape), z.view(shape)
    replicated = [Replicate()] * mesh.ndim
    loss = DTensor.from_local(loss, mesh, replicated, run_check=False)
    if not return_z_loss:
        return loss
    return loss, DTensor.from_local(z, mesh, replicated, run_check=False)


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


class ShardedChunks:
    """The per-chunk cross-entropy of the tensor-parallel LM head, in the protocol of
    ``kernels/linear_cross_entropy.py`` (``call_denominators``, ``chunk_loss``,
    ``scale_grad_``, ``reduce_input_grad_``), for one call.

    Each chunk's logits are this rank's block of the classes of the chunk's rows:
    ``row_losses`` merges them over the group (one all-gather per chunk) and, for a reduction
    to one value, writes the block's gradient over the logits. The rows' statistics (3 per
    row) are kept, so a backward that recomputes (``none``, a second backward) writes the
    gradient from them with ``grad_from_stats``, with no collective. The input's gradient of
    each rank is its block's share; ``reduce_input_grad_`` sums the shares over the group:
    one all-reduce per backward, in ``input_grad_dtype`` (the call's ``accum_dtype``, so a
    half-precision input's gradient is rounded once, after the sum)."""

    def __init__(self, group, shard: VocabShard, kernels: bool, error,
                 input_grad_dtype: torch.dtype | None):
        self.group, self.shard, self.kernels = group, shard, kernels
        self.error = error  # this rank's own error, raised after the first chunk's gather
        self.input_grad_dtype = input_grad_dtype
        self.ops = _backend(kernels)
        self.stats: dict = {}  # (first row, end) -> the chunk's rows' statistics (3, rows)
        self.scales = None  # the forward's upstream factors (one upstream gradient of 1)

    def call_denominators(self, target, weight, opts: eager.Options, n_classes: int):
        """The mean's denominators over the whole vocabulary (``n_classes`` is the block's)."""
        if opts.reduction != "mean":
            return None
        return self.ops.denominators(target, weight, opts.ignore_index, self.shard.vocab_size)

    def chunk_loss(self, logits, target, weight, opts: eager.Options, denom, n_rows: int,
                   grad_out=None, write_grad: bool = False, grad_target=None, *, rows: slice):
        """The forward (``grad_out`` None): the chunk's part of the reduced loss and z-loss
        term, the gradient over ``logits`` with ``write_grad``. The backward: the gradient
        over ``logits`` for ``grad_out``, from the statistics the forward kept."""
        shard, key = self.shard, (rows.start, rows.stop)
        if grad_out is None:
            scales = None
            if write_grad:
                if self.scales is None:
                    self.scales = eager.upstream_scales(opts, denom, n_rows, None,
                                                              logits.device)
                scales = self.scales
            error, self.error = self.error, None
            loss, z, stats = row_losses(logits, target, weight, opts, shard, self.group,
                                        kernels=self.kernels,
                                        grad=logits if write_grad else None, scales=scales,
                                        error=error)
            self.stats[key] = stats
            return eager.reduce_rows(loss, z, opts, denom, n_rows)
        if write_grad and logits.numel():
            scales = eager.upstream_scales(opts, denom, n_rows, grad_out, logits.device)
            plan = ({"n_splits": self.ops.split_plan(*logits.shape, logits.device)}
                    if self.kernels else {})
            x3 = logits.unsqueeze(0)
            self.ops.grad_from_stats(x3, target, weight, self.stats[key], scales, opts,
                                     grad=x3, class_offset=shard.offset,
                                     n_classes=shard.vocab_size, **plan)
        return None

    def scale_grad_(self, grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        if grad.numel():
            (_dispatch.kernels("cross_entropy") if self.kernels else eager).scale_grad_(
                grad, grad_out)
        return grad

    def reduce_input_grad_(self, grad: torch.Tensor) -> None:
        """This rank's share of the input's gradient summed over the group, in place."""
        _dist().all_reduce(grad, group=self.group)


def _log_prob_extra(outputs: tuple) -> tuple:
    """What the RL head's ranks must ask alike besides ``Options`` (``_signature``)."""
    return ("linear_log_probs", tuple(outputs))


class ShardedLogProbChunks(LogProbChunks):
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
        self.group, self.shard, self.error = group, shard, error
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

    def backward_chunk(self, logits, rows, operands, saved, upstream, dlogits, work):
        (target,), (stats, h) = operands, saved
        g = upstream[0]
        g_h = upstream[1] if h is not None else None  # the entropy comes right after log p
        args = (logits, target[rows], stats[rows], None if h is None else h[rows],
                None if g is None else g[rows], None if g_h is None else g_h[rows], self.opts)
        where = dict(class_offset=self.shard.offset, n_classes=self.shard.vocab_size)
        if self.kernels:
            _dispatch.kernels("log_probs").log_prob_grad(*args, grad=dlogits, **where)
        else:
            eager.chunk_log_prob_grad_(*args, grad=dlogits,
                                       work=tuple(t[:logits.shape[0]] for t in work), **where)

    def reduce_input_grad_(self, grad: torch.Tensor) -> None:
        """This rank's share of the input's gradient summed over the group, in place."""
        _dist().all_reduce(grad, group=self.group)

    def differentiable(self, logits, operands):
        raise RuntimeError(
            "linear_log_probs over a process group does not support create_graph=True: "
            "second derivatives would need the other ranks' logits")


# ------------------------------------------------------------------------------------------
# DTensor operands of linear_cross_entropy: tensor parallelism, or FSDP's gather
# ------------------------------------------------------------------------------------------


def _gathered_as_fsdp(t):
    """A DTensor parameter as FSDP2 unshards it for a forward: the whole tensor on every
    rank (an all-gather), whose gradient is reduce-scattered back to the shards, averaged
    over the mesh's ranks (FSDP2's default: each rank's loss is its batch's) — all-reduced
    over a dimension it is replicated on (HSDP's replicas). Plain tensors as they are."""
    if not _dispatch.is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial, Replicate

    mesh = t.device_mesh
    return t.redistribute(mesh, [Replicate()] * mesh.ndim).to_local(
        grad_placements=[Partial("avg")] * mesh.ndim)


def dtensor_linear_cross_entropy(call, input, linear_weight, target, linear_bias, weight,
                                 kwargs: dict):
    """``linear_cross_entropy`` with DTensor operands, either way a DTensor weight reaches a
    loss outside its module's forward:

    - **Tensor parallelism**: a DTensor ``input`` replicated over its mesh and the weight (and
      bias) sharded by class, ``Shard(0)``, over one dimension of the same mesh (replicated
      over the others): the tensor-parallel head over that dimension's group, DTensor's
      blocks; the loss a DTensor replicated over the mesh, the input's gradient the whole
      gradient, the weight's its shard's.
    - **FSDP2** (a plain ``input``, each rank its own batch): every DTensor of weight and bias
      gathered as FSDP2 does (``_gathered_as_fsdp``), the loss of this rank's batch a plain
      tensor, the weight's gradient reduce-scattered and averaged over the mesh as FSDP2's.

    ``call``: ``linear_cross_entropy`` on plain tensors; ``kwargs``: its other arguments.
    Target and class weight: plain tensors or replicated DTensors."""
    if kwargs.get("process_group") is not None or kwargs.get("shard_sizes") is not None:
        raise ValueError("linear_cross_entropy with DTensor operands takes their layout from "
                         "their meshes: pass no process_group or shard_sizes")
    target = _replicated_local(target, "target")
    weight = _replicated_local(weight, "weight")
    if not _dispatch.is_dtensor(input):
        return call(input, _gathered_as_fsdp(linear_weight), target,
                    linear_bias=_gathered_as_fsdp(linear_bias), weight=weight, **kwargs)

    from torch.distributed.tensor import DTensor, Replicate

    mesh = input.device_mesh
    placements = tuple(getattr(linear_weight, "placements", ()))
    sharded = [d for d, p in enumerate(placements) if not p.is_replicate()]
    tensor_parallel = (
        all(p.is_replicate() for p in input.placements)
        and _dispatch.is_dtensor(linear_weight) and linear_weight.device_mesh == mesh
        and len(sharded) == 1 and placements[sharded[0]].is_shard()
        and placements[sharded[0]].dim % linear_weight.dim() == 0
        and (linear_bias is None or (_dispatch.is_dtensor(linear_bias)
                                     and linear_bias.device_mesh == mesh
                                     and tuple(linear_bias.placements) == placements)))
    if not tensor_parallel:
        raise NotImplementedError(
            "linear_cross_entropy with a DTensor input takes it replicated over its mesh and "
            "the weight (and bias) sharded by class (Shard(0)) over one dimension of the same "
            f"mesh: got input placements {tuple(input.placements)}, weight placements "
            f"{placements or type(linear_weight).__name__}; pass a plain input for FSDP's "
            "gather, or local tensors with process_group=")
    mesh_dim = sharded[0]
    widths = dtensor_widths(linear_weight.shape[0], mesh.size(mesh_dim))
    loss = call(input.to_local(), linear_weight.to_local(), target,
                linear_bias=None if linear_bias is None else linear_bias.to_local(),
                weight=weight, **dict(kwargs, process_group=mesh.get_group(mesh_dim),
                                      shard_sizes=widths))
    replicated = [Replicate()] * mesh.ndim

    def wrap(t):
        return DTensor.from_local(t, mesh, replicated, run_check=False)

    return tuple(map(wrap, loss)) if isinstance(loss, tuple) else wrap(loss)
