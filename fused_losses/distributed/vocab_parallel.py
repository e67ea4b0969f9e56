"""Vocab-parallel cross-entropy on logits sharded by class: ``row_losses`` (each rank's
partial statistics of its block, one ``exchange``, the merge, the block's gradient), its
autograd Function and ``vocab_parallel_cross_entropy``, the entry point for plain tensors."""

from __future__ import annotations

import math

import torch

from .. import _dispatch
from .._validation import (
    check_cross_entropy,
    check_cross_entropy_extras,
    check_float_argument,
    check_int,
    check_logit_transform,
    check_target_values,
    check_tensor,
    resolve_reduction,
)
from ..kernels import eager
from ..kernels._autograd import detached_without_grad_mode, may_fuse_gradient, output_as
from .protocol import (
    BAD_TARGET,
    HEADER_WORDS,
    STATS,
    VocabShard,
    _backend,
    _group,
    _signature,
    check_backend,
    exchange,
    vocab_shard,
)

# ------------------------------------------------------------------------------------------
# the rows' losses over the group: partial statistics, one all-gather, merge, gradient
# ------------------------------------------------------------------------------------------


def row_losses(x: torch.Tensor, target: torch.Tensor, weight, opts: eager.Options,
               shard: VocabShard, group, *, kernels: bool, grad=None, scales=None,
               error: tuple[int, Exception] | None = None, extra: tuple = ()):
    """The loss, z-loss term (None without z-loss) and statistics (3, rows) of rows whose
    classes are sharded over ``group``, from this rank's block ``x`` (rows, width) with unit
    class stride (a row-major block of logits), as ``cross_entropy.row_losses`` gives them for
    whole rows; with ``grad`` (x's shape; x itself for in place), the gradient of the block
    for ``scales`` (see ``eager.upstream_scales``) is written into it.

    ``target``: the rows' global class indices (rows,), contiguous, the same on every rank;
    ``weight``: all ``shard.vocab_size`` class weights or None; ``kernels``: the Triton
    kernels or the eager formula (the same choice on every rank). One all-gather; ``error``,
    (status, exception) of this rank's own error found before it, is raised after it (every
    rank reaches the collective); ``extra``: what else the ranks must ask alike (in the
    header's arguments' hash, ``_signature``'s)."""
    width, n_rows = x.shape[1], x.shape[0]
    device = x.device
    ops = _backend(kernels)
    world = len(shard.widths)
    dtype = eager.stats_dtype(kernels, x.dtype, weight)
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
    partials = exchange(block, h, target, _signature(opts, weight, x.dtype, extra), shard,
                        group, error)
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
    temperature: float = 1.0,
    logit_scale: float = 1.0,
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
        temperature, logit_scale (float, optional): the logits become ``softcap *
            tanh(logit_scale * logits / softcap) / temperature``, as ``cross_entropy``'s.
            Default: ``1.0``
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
    temperature, logit_scale = check_logit_transform(temperature, logit_scale)
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
                            out_dtype, input_dtype, temperature, logit_scale)
    if args[1] == "none":
        loss, z = loss.view(target.shape), z.view(target.shape)
    return (loss, z) if return_z_loss else loss
