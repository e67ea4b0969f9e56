"""``linear_cross_entropy``: torch's ``F.linear_cross_entropy``, the logits never materialized.

torch's checks and errors first (its own, in its order: the shapes, then ``F.linear``'s and
``F.cross_entropy``'s on meta tensors, which cost nothing), then the plan — how many tokens
per chunk, in which dtypes, on which backend — and the chunked head's driver that runs it
(``kernels/chunked_head.py``) with the cross-entropy's per-chunk loss
(``kernels/linear_cross_entropy.py``).

With ``process_group=`` the weight is this rank's block of a head sharded by vocabulary (the
tensor-parallel LM head): the same chunks, each chunk's rows merged over the group by the
floor above's per-chunk loss (``fused_losses/distributed/lm_head.py``, ``ShardedChunks``);
DTensor operands go up to ``distributed/dtensor.py`` first, which calls this function again
with local tensors. Both are reached through ``_dispatch.tensor_parallel()``: this module
never imports that floor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _dispatch
from ._validation import (
    check_cross_entropy,
    check_cross_entropy_extras,
    check_float_argument,
    check_int,
    check_linear_dtypes,
    check_logit_transform,
    check_target_values,
    resolve_reduction,
    uint8_weighted_smoothed_mean,
    weight_needs_grad,
)
from .kernels import eager
from .kernels._autograd import detached_without_grad_mode
from .kernels.chunked_head import ChunkedHeadFunction, Plan
from .kernels.linear_cross_entropy import CrossEntropyChunks

__all__ = ["linear_cross_entropy"]

# The logits of a chunk take at most this many bytes: 2,048 tokens of a 128k-vocabulary head
# in bfloat16, 1,024 of a 256k one. Each chunk's weight gradient adds into the float32
# accumulator of the whole weight, read and written once per chunk (8 V H bytes: 4.2 GB at
# V=128256, H=4096), so fewer chunks are faster: on the H200 the LM heads' time over their
# GEMMs was that traffic, chunks x 8 V H bytes at the copy bandwidth (32 ms of the 32 over 3
# GEMMs at V=262144 with 16 chunks of 512 tokens, 8 of 7 at V=128256). The CPU's eager formula
# keeps a few float32 temporaries of a chunk's size: smaller chunks there, though not too
# small for the same reason (4096 x 512 x 32000 in float32: 3.04 s a step in chunks of 131
# tokens, 2.46 s in chunks of 512).
CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 64 << 20}
# From this many tokens on, a chunk is at most an eighth of them: no tensor of the logits'
# order of size exists, however small the vocabulary.
EIGHTH_FROM = 1024
# A backward that tiles the classes (``grad_tiles``) does so only in tiles at least this wide
# (narrower ones make small GEMMs).
MIN_TILE_CLASSES = 2048


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = torch.float32,
    process_group=None,
    shard_sizes=None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Cross-entropy of ``input`` transformed linearly, as
    :func:`torch.nn.functional.linear_cross_entropy`: the loss of
    ``logits = linear(input, linear_weight, linear_bias)`` against ``target``, computed a
    chunk of tokens at a time, so the ``(N, C)`` logits (and their gradient) never exist.

    Everything torch's function accepts, with its results and errors: inputs ``(H,)`` or
    ``(N, H)``; weights ``(C, H)`` or, K-dimensional, ``(C, d_1, ..., d_K, H)``; class-index
    or probability targets; class ``weight``; ``linear_bias``; ``ignore_index`` (None: -100,
    refused with probability targets); ``label_smoothing``; every reduction; gradients for
    the input, the weight, the bias and probability targets (and for a class ``weight`` that
    requires grad, with probability targets, as torch: that call forms the logits whole, the
    chunks have no gradient for it). ``options`` (torch's
    ``LinearCrossEntropyOptions``) is accepted; its ``batch_chunk_size`` sets the chunk.

    On CUDA each chunk's logits come from cuBLAS and its loss and gradient from the Triton
    kernels, written over the logits; elsewhere eager PyTorch in float32 runs the same chunks.

    Args:
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
            label_smoothing, options: as :func:`torch.nn.functional.linear_cross_entropy`.
        softcap, z_loss, return_z_loss, temperature, logit_scale (keyword-only): as
            :func:`fused_losses.cross_entropy`
            (Gemma's final-logit softcapping; PaLM's z-loss; the z-loss term returned too).
        chunk_size (int, optional, keyword-only): tokens per chunk. Default: the most whose
            logits fit 512 MiB on a GPU (64 MiB on a CPU), at most an eighth of the tokens
            from 1,024 tokens on.
        accum_dtype (torch.dtype, optional, keyword-only): the dtype the weight's and bias's
            gradients accumulate in over the chunks. ``torch.float32`` (default): one
            rounding per element of a half-precision ``.grad``, with a float32 weight-sized
            buffer; ``None``: the weight's own dtype (no buffer; one rounding per chunk).
            With ``process_group``, the input's gradient is summed over the ranks in it too.
        process_group (ProcessGroup, optional, keyword-only): the tensor-parallel LM head.
            ``linear_weight`` (and ``linear_bias``) are this rank's block of a head sharded
            by vocabulary over the group: rank r holds the classes ``[offset_r, offset_r +
            width_r)`` of all V, in rank order (uneven or empty blocks allowed). ``input``
            and ``target`` are the same on every rank; ``weight`` is the full ``(V,)``. The
            result is that of the gathered head, the same on every rank; the input's
            gradient is the whole gradient on every rank, the weight's and bias's their
            block's. Communication: one all-gather of per-row statistics per chunk in the
            forward, one all-reduce of the input's gradient per backward, nothing else (the
            logits are never gathered, nor formed beyond one chunk of the local block). Class
            targets (int64) only; no ``create_graph=True``, ``torch.compile`` or
            ``torch.func`` transform of the call. Default: ``None`` (one process).
        shard_sizes (sequence of int, optional, keyword-only): with ``process_group``, every
            rank's block width, in rank order, as ``vocab_parallel_cross_entropy``'s.
            Default: ``None``: exchanged on the group's first call and cached.

    DTensor operands (what a module's weight is outside its forward under FSDP2 or torch's
    tensor parallelism): a DTensor ``input`` replicated over its mesh with the weight (and
    bias) sharded ``Shard(0)`` over one dimension of the same mesh runs the tensor-parallel
    head over that dimension (DTensor's blocks; the loss a replicated DTensor). A plain
    ``input`` (each rank its own batch, FSDP's data parallelism) with a DTensor weight or bias
    gathers them as FSDP2 does for a forward: ``full_tensor()``, the gradient reduce-scattered
    back to the shards and averaged over the mesh's ranks (FSDP2's default); the loss is this
    rank's, a plain tensor.

    Shape:
        - Output: scalar, or for ``'none'`` the target's shape (class indices) or the logits'
          shape without the class dimension (probabilities).

    Examples::

        >>> hidden = torch.randn(4096, 2048, requires_grad=True)
        >>> lm_head = torch.randn(128256, 2048, requires_grad=True)
        >>> labels = torch.randint(128256, (4096,))
        >>> loss = linear_cross_entropy(hidden, lm_head, labels, label_smoothing=0.1)
        >>> loss.backward()

        >>> # tensor parallelism: rank r holds rows [offset_r, offset_r + width_r) of the head
        >>> loss = linear_cross_entropy(hidden, lm_head_shard, labels, process_group=tp_group)
    """
    if (_dispatch.is_dtensor(input) or _dispatch.is_dtensor(linear_weight)
            or _dispatch.is_dtensor(linear_bias)):
        return _dispatch.tensor_parallel().dtensor_linear_head(
            linear_cross_entropy, "linear_cross_entropy", input, linear_weight, target,
            linear_bias, dict(weight=weight, reduction=reduction, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, options=options, softcap=softcap,
                 z_loss=z_loss, return_z_loss=return_z_loss, chunk_size=chunk_size,
                 accum_dtype=accum_dtype, process_group=process_group,
                 shard_sizes=shard_sizes, temperature=temperature, logit_scale=logit_scale))
    # ---- torch's checks, in its order -----------------------------------------------------
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(
            "expected linear_weight with dimensionality at least 2, got "
            f"{linear_weight.dim()}"
        )
    n_batch = tuple(input.shape[:-1])
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    n_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes, *out_features):
        raise RuntimeError(
            f"expected linear_bias shape {(n_classes, *out_features)}, got "
            f"{tuple(linear_bias.shape)}"
        )
    if out_features and not n_batch:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
            f"requires batched input, (N, {in_features}), got unbatched input with shape "
            f"{tuple(input.shape)}"
        )
    logits_shape = (*n_batch, n_classes, *out_features)
    if target.shape == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    fn = "cross_entropy_loss"
    ignore_index = -100 if ignore_index is None else check_int(fn, "ignore_index", 5,
                                                                ignore_index)
    reduction = resolve_reduction(None, None, reduction)
    label_smoothing = check_float_argument(fn, "label_smoothing", 6, label_smoothing)
    softcap, z_loss = check_cross_entropy_extras(softcap, z_loss)
    temperature, logit_scale = check_logit_transform(temperature, logit_scale)
    transform = dict(softcap=softcap, temperature=temperature, logit_scale=logit_scale)
    tp = None  # the tensor-parallel head: (group, this rank's block, its deferred error)
    if process_group is not None:
        tp = _tensor_parallel_layout(process_group, shard_sizes, input, linear_weight,
                                     target, weight, reduction, ignore_index, label_smoothing,
                                     z_loss, transform, accum_dtype)
        logits_shape = (*n_batch, tp[1].vocab_size, *out_features)
    elif shard_sizes is not None:
        raise ValueError("linear_cross_entropy: shard_sizes is the layout of a sharded head: "
                         "pass its process_group too")

    # F.linear's and F.cross_entropy's checks (dtypes, shapes; the latter on meta logits)
    autocast = _dispatch.autocast_on(input)
    if autocast:
        weight = _dispatch.autocast_cast(weight)
    else:
        check_linear_dtypes(input, linear_weight, linear_bias)
    meta_logits = F.linear(
        input.to("meta"), linear_weight.reshape(-1, in_features).to("meta"),
        None if linear_bias is None else linear_bias.reshape(-1).to("meta"),
    ).reshape(*n_batch, n_classes, *out_features)
    if tp is not None:  # torch's checks of the gathered head's logits
        meta_logits = meta_logits.new_empty(logits_shape)
    input_dtype = _dispatch.autocast_dtype(meta_logits.dtype) if autocast else meta_logits.dtype
    if not meta_logits.is_floating_point():
        # torch's cross_entropy refuses integer logits itself
        F.cross_entropy(meta_logits, target.to("meta"), reduction=reduction)
    spec = check_cross_entropy(meta_logits, target, weight, ignore_index, label_smoothing,
                               input_dtype)
    if not spec.prob_target:
        if _dispatch.reads_values_on_host(target):
            try:
                check_target_values(target, spec, weight, ignore_index, reduction)
            except IndexError as e:
                if tp is None:
                    raise
                # a rank's own error: raised after the first all-gather (every rank reaches
                # it, and the others learn of it there), after any found before
                tp = (*tp[:2], tp[2] or (_dispatch.tensor_parallel().bad_target, e))
        elif uint8_weighted_smoothed_mean(target, spec, weight, reduction):
            raise RuntimeError("gather(): Expected dtype int32/int64 for index")

    out_dtype = _dispatch.cross_entropy_dtype(meta_logits.dtype, target, weight, spec.prob_target,
                                            autocast)
    opts = eager.Options(ignore_index=ignore_index, reduction=reduction,
                         smoothing=spec.smoothing, z_loss=z_loss, prob_target=spec.prob_target,
                         **transform)

    # ---- the call as rows of C classes: (tokens, H) x (d * C, H), rows ordered (token, d) --
    x = input.unsqueeze(0) if input.dim() == 1 else input
    n_out = math.prod(out_features)
    w, b = linear_weight.reshape(n_classes, n_out, in_features), linear_bias
    if n_out > 1:  # K-dimensional: the weight's rows reordered (d, c) (a copy)
        w = w.transpose(0, 1)
        b = None if b is None else b.reshape(n_classes, n_out).t()
    w = w.reshape(-1, in_features)
    b = None if b is None else b.reshape(-1)  # (C, 1, ..., 1) too
    if spec.prob_target:
        t = target.reshape(x.shape[0], n_classes, n_out).transpose(1, 2)
        t = t.reshape(-1, n_classes)
    else:
        t = target.reshape(-1)

    kernels = _dispatch.use_kernels(
        input, linear_weight, target, linear_bias, weight,
        other_dtypes=(torch.int64, torch.uint8),
        supported=not _uint8_smoothing_quirk(target, spec.smoothing, ignore_index),
    )
    # a class weight differentiated (probability targets: class targets refuse it in the
    # checks): the chunks give it no gradient
    weight_grad = weight_needs_grad(weight)
    whole = x.shape[0] == 0 or weight_grad or (not kernels and (
        torch.compiler.is_compiling() or _dispatch.functorch_wrapped(x)))
    if whole:
        # torch.func transforms, and a compiled graph without the kernels, take the eager
        # formula whole (its chunks compute their gradients with autograd, which neither can
        # trace): autograd and the compiler see every op; the logits are materialized there.
        # (So do an input of no tokens, whose logits are empty, and a class weight that
        # requires grad, which only autograd's formula differentiates. A tensor-parallel head
        # comes here only with no tokens: its rows are then of the whole vocabulary, which
        # its class weight has, however few classes its block has, even none.)
        logits = F.linear(x, w, b).reshape(
            x.shape[0] * n_out, n_classes if tp is None else tp[1].vocab_size)
        loss, z = eager.cross_entropy_float(logits, t, weight, opts)
        z = z if z is not None else torch.zeros_like(loss)
        loss, z = loss.to(out_dtype), z.to(out_dtype)
    else:
        if kernels:  # the GEMMs in the logits' dtype (autocast's under autocast), as F.linear
            compute = (torch.get_autocast_dtype(x.device.type) if autocast
                       else meta_logits.dtype)
        else:  # the eager formula: float32 (float64 for float64 operands) GEMMs and math
            compute = eager.compute_dtype(x.dtype, w.dtype)
        # the backward in tiles of every token by a block of the classes where it
        # recomputes anyway (``none``, a compiled graph): class targets of (N, C) logits
        tiles = (not spec.prob_target and n_out == 1
                 and (reduction == "none" or torch.compiler.is_compiling())
                 and torch.is_grad_enabled()
                 and any(t is not None and t.requires_grad for t in (x, w, b))
                 and not _uint8_smoothing_quirk(target, spec.smoothing, ignore_index))
        plan = _plan(x.shape[0], x.device.type, compute, w.dtype, n_classes, n_out, kernels,
                     chunk_size, options, accum_dtype,
                     # the chunks' rows agree across a group (one all-gather size)
                     budget_classes=None if tp is None else max(tp[1].widths), tiles=tiles)
        x, w, b, t, weight = detached_without_grad_mode(x, w, b, t, weight)
        # class targets and class weights contiguous, as the kernels read them (small: a
        # copy of a strided one costs nothing next to the GEMMs); probability targets as
        # they are, copied a chunk at a time where strided
        t = t if spec.prob_target else t.contiguous()
        weight = None if weight is None else weight.contiguous()
        if tp is None:
            loss_chunks = CrossEntropyChunks(opts, plan, out_dtype)
        else:
            loss_chunks = _dispatch.tensor_parallel().sharded_chunks(
                opts, plan, out_dtype, *tp,
                None if accum_dtype is None else torch.promote_types(accum_dtype, x.dtype),
                _reduced_in(input, accum_dtype))
        loss, z = ChunkedHeadFunction.apply(x, w, b, plan, loss_chunks, t, weight)
    if reduction == "none":
        out_shape = tuple(target.shape) if not spec.prob_target else (*n_batch, *out_features)
        loss, z = loss.reshape(out_shape), z.reshape(out_shape)
    return (loss, z) if return_z_loss else loss


def _plan(n_tokens: int, device_type: str, compute: torch.dtype, weight_dtype: torch.dtype,
          n_classes: int, n_out: int, kernels: bool, chunk_size, options, accum_dtype,
          budget_classes: int | None = None, tiles: bool = False) -> Plan:
    """Tokens per chunk and the dtypes of a call: ``chunk_size``, else the options'
    ``batch_chunk_size``, else the most whose logits fit ``CHUNK_BYTES`` (at most an eighth
    of the tokens from ``EIGHTH_FROM`` on) for rows of ``budget_classes`` (default:
    ``n_classes``, the classes of the logits this process forms); with ``tiles``, the
    backward's tiles of this process's ``n_classes`` (``grad_tiles``)."""
    accum = weight_dtype if accum_dtype is None else torch.promote_types(accum_dtype,
                                                                         weight_dtype)
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    classes = n_classes if budget_classes is None else budget_classes
    chunk = chunk_tokens(n_tokens, n_out * classes * compute.itemsize, device_type, chunk_size,
                         "linear_cross_entropy", CHUNK_BYTES)
    grad = (0, 0) if not tiles else grad_tiles(n_tokens, n_classes, compute.itemsize,
                                               device_type, chunk_size, CHUNK_BYTES)
    return Plan(n_classes, n_out, chunk, compute, accum, kernels, *grad)


def chunk_tokens(n_tokens: int, token_bytes: int, device_type: str, chunk_size, fn: str,
                 budgets: dict) -> int:
    """Tokens per chunk of an LM head: ``chunk_size`` checked, else the most whose logits
    (``token_bytes`` a token) fit ``budgets``' bytes for the device, at most an eighth of the
    tokens from ``EIGHTH_FROM`` on; never more than the tokens there are."""
    if chunk_size is None:
        budget = budgets["cuda" if device_type == "cuda" else "cpu"]
        chunk_size = max(1, budget // max(1, token_bytes))
        if n_tokens >= EIGHTH_FROM:
            chunk_size = min(chunk_size, n_tokens // 8)
    else:
        chunk_size = check_int(fn, "chunk_size", 0, chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    return max(1, min(chunk_size, n_tokens))


def grad_tiles(n_tokens: int, n_classes: int, item_bytes: int, device_type: str, chunk_size,
               budgets: dict) -> tuple[int, int]:
    """(tokens, classes) of the tiles of a recomputing backward whose loss tiles its classes
    (``chunked_head._tiles``): every token at once, the classes split into as few tiles as
    fit ``budgets``' bytes and the memory rule (at most an eighth of the logits from
    ``EIGHTH_FROM`` tokens on); (0, 0), the forward's chunks, where tiles would be narrower
    than ``MIN_TILE_CLASSES`` (small GEMMs) or where the caller set ``chunk_size``."""
    if chunk_size is not None or not n_tokens or not n_classes:
        return 0, 0
    budget = budgets["cuda" if device_type == "cuda" else "cpu"]
    n_tiles = max(8 if n_tokens >= EIGHTH_FROM else 1,
                  -(-n_tokens * n_classes * item_bytes // budget))
    width = n_classes // n_tiles
    if n_tiles == 1 or width < MIN_TILE_CLASSES:
        return 0, 0
    return n_tokens, width


def _uint8_smoothing_quirk(target, smoothing: float, ignore_index: int) -> bool:
    """torch's smoothing term compares uint8 targets with ignore_index in uint8: only the
    eager formula reproduces it where that differs from the int64 comparison."""
    return target.dtype == torch.uint8 and smoothing > 0.0 and not 0 <= ignore_index < 256


def _tensor_parallel_layout(process_group, shard_sizes, input, linear_weight, target, weight,
                            reduction, ignore_index, label_smoothing, z_loss, transform,
                            accum_dtype):
    """(group, this rank's VocabShard, None or its deferred error) of a tensor-parallel head,
    after the checks every rank makes alike (raised before any collective). The dtype the
    input's gradient is all-reduced in (``accum_dtype``'s) goes in the arguments' hash: ranks
    that differ there raise in the forward, not at the backward's all-reduce."""
    fn = "linear_cross_entropy"
    if torch.compiler.is_compiling() or _dispatch.functorch_wrapped(input):
        raise NotImplementedError(f"{fn} over a process group runs neither under "
                                  "torch.compile nor under torch.func transforms")
    if target.is_floating_point():
        raise NotImplementedError(f"{fn} over a process group: probability targets are not "
                                  "supported")
    if target.dtype != torch.int64:
        raise NotImplementedError(
            f"{fn} over a process group takes int64 class targets, got "
            f"{str(target.dtype).removeprefix('torch.')}")
    opts = eager.Options(ignore_index=ignore_index, reduction=reduction,
                         smoothing=max(label_smoothing, 0.0), z_loss=z_loss, **transform)
    return _dispatch.tensor_parallel().lm_head_layout(
        process_group, shard_sizes, input.device, linear_weight.shape[0], target.numel(), opts,
        weight, input.dtype, _reduced_in(input, accum_dtype))


def _reduced_in(input: torch.Tensor, accum_dtype) -> tuple:
    """What a tensor-parallel head's ranks must ask alike besides ``Options`` (the arguments'
    hash): the dtype the input's gradient is all-reduced in."""
    dtype = input.dtype if accum_dtype is None else torch.promote_types(accum_dtype,
                                                                        input.dtype)
    return ("input_grad", str(dtype))
