"""The collective protocol every vocab-sharded loss here speaks (the package's docstring
says why it is built so): the group and its backend, where each rank's block of the
vocabulary lies (``VocabShard``: given, exchanged once per group, or DTensor's), the header
of 8 int32 words each rank's all-gather block starts with, and ``exchange``: one all-gather
of the blocks, every header checked (on the host, or on the device without a sync), a rank's
own error raised after it."""

from __future__ import annotations

import functools
import math
import weakref
import zlib
from typing import NamedTuple

import torch

from .. import _dispatch
from .._validation import (
    check_int,
)
from ..kernels import eager

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
        raise RuntimeError("vocab-parallel loss needs torch.distributed: call "
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
            f"vocab-parallel loss: the process group's backend ({name}) cannot "
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
            "vocab-parallel loss: the ranks have different numbers of rows "
            f"({rows}, in rank order): every rank passes the same targets")
    if len(set(signatures)) > 1:
        raise RuntimeError(
            "vocab-parallel loss: the ranks called the loss with different "
            "arguments (ignore_index, reduction, label_smoothing, softcap, z_loss, "
            "temperature, logit_scale, weight, dtype, accum_dtype or the log-probs' outputs)")
    if sum(widths) == 0:
        raise ValueError("vocab-parallel loss: every rank's block of logits is empty")
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
            f"vocab-parallel loss: rank {rank}'s block has {width} classes, but "
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
        raise RuntimeError(f"vocab-parallel loss failed on another rank ({reasons})")
    offsets, widths, sizes = ([h[i] for h in rows] for i in (1, 2, 3))
    tiled = offsets[0] == 0 and all(offsets[r + 1] == offsets[r] + widths[r]
                                    for r in range(len(rows) - 1))
    if not tiled or len(set(sizes)) > 1 or sizes[0] != offsets[-1] + widths[-1]:
        raise RuntimeError(
            "vocab-parallel loss: the ranks' blocks do not tile the vocabulary in "
            f"rank order (offsets {offsets}, widths {widths}, vocabulary sizes {sizes})")
    if len({h[4] for h in rows}) > 1:
        raise RuntimeError(
            "vocab-parallel loss: the ranks called the loss with different "
            "arguments (ignore_index, reduction, label_smoothing, softcap, z_loss, "
            "temperature, logit_scale, weight, dtype, accum_dtype or the log-probs' outputs)")
    differ = [r for r, h in enumerate(rows) if h[5:7] != rows[shard.rank][5:7]]
    if differ:
        raise RuntimeError(
            f"vocab-parallel loss: the targets differ across ranks (ranks {differ} "
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
