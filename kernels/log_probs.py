"""Per-token log-probabilities and entropy of rows of logits: kernels, launchers, autograd.

What RL trainers need of each sampled token: log p(token) under a temperature and the
entropy of the distribution, with gradients through both. The arithmetic is in
``_ce_math.py`` (``row_log_prob``, ``log_prob_grad_block``: the statistics m, s, b merge
exactly; the transform of the logits, z = softcap tanh(x scale / softcap) / T).

- ``_lp_row_kernel``: one program per row. Its statistics in one read pass, in float32
  (rows of up to ``ROW_BLOCK`` classes held in registers, longer ones looped over blocks and
  merged), then log p_y, the entropy and (m~, log2 s) for the backward, and on request TRL's
  other per-token statistics (log sum p^2, the mean logit, whether the target is the top-1:
  one more statistic each, a constexpr flag each, nothing computed where not asked). No
  float32 copy of the logits: they are read once in their own dtype. read C, write 12-25 B
  a row.
- ``_lp_grad_kernel``: the backward, a program per block of a row's classes (rows x blocks:
  few long rows still fill the GPU), from the row's saved statistics and entropy and the
  upstream gradients of log p_y and of the entropy, each only where it exists (a backward
  that gets no entropy gradient computes no entropy term). read C, write C.

The upstream gradient is per row (an advantage per token), unknown in the forward: the
gradient cannot be written there, as the cross-entropy's mean does.

The launchers are the LM head's per-chunk steps too (``kernels/linear_log_probs.py``); the
eager twins (``eager.row_log_probs``, ``eager.log_prob_grad``) have the same contracts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import eager
from ._autograd import detached_without_grad_mode
from ._ce_math import (
    NO_CLASS,
    block_stats,
    class_target,
    entropy_stat,
    first_max,
    log_prob_grad_block,
    logit_sum,
    logits,
    merge_entropy_stat,
    merge_first_max,
    merge_stats,
    merge_sum_sq_stat,
    row_extras,
    row_log_prob,
    sum_sq_stat,
    transform,
)
from ._common import launch, next_power_of_2, non_null, num_warps_for
from .cross_entropy import _fold_rows

# The forward's rows: up to ROW_BLOCK classes in registers, longer rows looped over blocks
# of ROW_BLOCK (16 per thread; no gradient pass follows, so holding a whole 32k-class row as
# the cross-entropy's kernel does only spills: the entropy's sum needs more registers).
ROW_BLOCK = 8192
# The backward's programs: blocks of up to GRAD_BLOCK classes of a row, 16 per thread.
GRAD_BLOCK = 4096


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _row_stats(x_row, n_read, n_cols, logit_mult, softcap, SOFTCAP: tl.constexpr,
               ENTROPY: tl.constexpr, LOG_SUM_SQ: tl.constexpr, MEAN_LOGIT: tl.constexpr,
               TOP1: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(m, s, b, q, Z, j) of the first ``n_read`` classes of a row (module doc of _ce_math;
    b, q, Z, j only where their flag is set, else 0, 0, 0, NO_CLASS): one read pass, the
    row in registers (SINGLE_BLOCK) or looped over blocks and merged. j is local to the
    row's pointer."""
    offs = tl.arange(0, BLOCK_SIZE)
    b = 0.0
    q = 0.0
    z_sum = 0.0
    j = tl.full((), NO_CLASS, tl.int32)
    if SINGLE_BLOCK:
        mask = offs < n_read
        z = logits(x_row + offs, mask, logit_mult, softcap, SOFTCAP, "")
        m, e, s, _a, _k = block_stats(z, x_row, x_row, mask, n_cols, 0.0, False, False, False)
        if ENTROPY:
            b = entropy_stat(e, z, tl.where(m == float("-inf"), 0.0, m))
        if LOG_SUM_SQ:
            q = sum_sq_stat(e)
        if MEAN_LOGIT:
            z_sum = logit_sum(z, mask)
        if TOP1:
            j = first_max(z, offs, m)
    else:
        m = float("-inf")
        s = 0.0
        for start in range(0, n_read, BLOCK_SIZE):
            cols = start + offs
            mask = cols < n_read
            z = logits(x_row + cols, mask, logit_mult, softcap, SOFTCAP, "")
            m_b, e_b, s_b, _a, _k = block_stats(z, x_row, x_row, mask, n_cols, 0.0, False,
                                                False, False)
            # each merge reads the running max m before ``merge_stats`` moves it
            if ENTROPY:
                b_b = entropy_stat(e_b, z, tl.where(m_b == float("-inf"), 0.0, m_b))
                b = merge_entropy_stat(m, s, b, m_b, s_b, b_b)
            if LOG_SUM_SQ:
                q = merge_sum_sq_stat(m, q, m_b, sum_sq_stat(e_b))
            if MEAN_LOGIT:
                z_sum += logit_sum(z, mask)
            if TOP1:
                j = merge_first_max(m, j, m_b, first_max(z, cols, m_b))
            m, s, _a, _k = merge_stats(m, s, 0.0, 0.0, m_b, s_b, 0.0, 0.0)
    return m, s, b, q, z_sum, j


@triton.jit
def _lp_row_kernel(
    # pointers
    x_ptr,  # logits: rows of n_cols, unit class stride, row = (outer, inner)
    target_ptr,  # class indices (n_rows,), contiguous
    log_p_ptr,  # out: float32 (n_rows,) log p of the target
    entropy_ptr,  # out (ENTROPY): float32 (n_rows,) entropy
    stats_ptr,  # out: float32 (n_rows, 2): m~, log2 s (0, 0 on rows not counted)
    sum_sq_ptr,  # out (LOG_SUM_SQ): float32 (n_rows,) log sum_c p_c^2
    mean_ptr,  # out (MEAN_LOGIT): float32 (n_rows,) mean transformed logit
    top1_ptr,  # out (TOP1): uint8 (n_rows,) (a bool tensor's bytes) target is the top-1
    # sizes
    n_rows,
    n_cols,
    n_inner,
    # strides, in elements
    stride_x_outer,
    stride_x_inner,
    # scalars
    ignore_index,
    logit_mult,
    softcap,
    max_entropy,
    # flags
    SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    LOG_SUM_SQ: tl.constexpr,
    MEAN_LOGIT: tl.constexpr,
    TOP1: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the row held in registers (BLOCK_SIZE >= n_cols)
    BLOCK_SIZE: tl.constexpr,
):
    """A row's statistics, then its log p_y, and what is requested of the entropy, log sum
    p^2, the mean logit and is-top-1. read n_cols, write 12-25 B."""
    # int64 row offsets: 16k rows x 262k classes is over 2^32 elements.
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    x_row = x_ptr + outer * stride_x_outer + (row - outer * n_inner) * stride_x_inner
    y = tl.load(target_ptr + row).to(tl.int64)
    ok, bad, _ = class_target(y, target_ptr, n_cols, ignore_index, False)
    n_read = tl.where(ok, n_cols, 0)  # rows not counted read no logits
    m, s, b, q, z_sum, j = _row_stats(x_row, n_read, n_cols, logit_mult, softcap, SOFTCAP,
                                      ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1, SINGLE_BLOCK,
                                      BLOCK_SIZE)

    # the target's logit, transformed as the block's were: z_y <= m, so log p_y <= 0
    z_y = logits(x_row + y, ok, logit_mult, softcap, SOFTCAP, "")
    log_p, h, m_safe, log2_s = row_log_prob(m, s, b, z_y, ok, bad, max_entropy, ENTROPY)
    tl.store(log_p_ptr + row, log_p)
    if ENTROPY:
        tl.store(entropy_ptr + row, h)
    tl.store(stats_ptr + 2 * row, m_safe)
    tl.store(stats_ptr + 2 * row + 1, log2_s)
    if LOG_SUM_SQ or MEAN_LOGIT or TOP1:
        log_sum_sq, mean, top1 = row_extras(s, q, z_sum, j, y, n_cols, ok, bad)
        if LOG_SUM_SQ:
            tl.store(sum_sq_ptr + row, log_sum_sq)
        if MEAN_LOGIT:
            tl.store(mean_ptr + row, mean)
        if TOP1:
            tl.store(top1_ptr + row, top1.to(tl.uint8))


@triton.jit
def _lp_partial_kernel(
    # pointers
    x_ptr,  # logits: this rank's block of n_cols classes of each row, unit class stride
    target_ptr,  # global class indices (n_rows,), contiguous
    parts_ptr,  # out: float32 (LP_STATS, n_rows): m, s, b, z_y, q, Z, (j's slot)
    j_ptr,  # out: int32 view of the same buffer: j's row (the global first argmax, or -1)
    # sizes
    n_rows,
    n_cols,
    # strides, in elements
    stride_x_row,
    # scalars
    class_offset,  # the block's first class
    n_classes,  # the whole rows' classes (the targets' range)
    ignore_index,
    logit_mult,
    softcap,
    # flags
    SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    LOG_SUM_SQ: tl.constexpr,
    MEAN_LOGIT: tl.constexpr,
    TOP1: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """A vocab-sharded row's statistics over this rank's block of its classes (the merge
    over the ranks is the caller's, ``eager.combine_log_prob_stats``). read n_cols, write
    28 B a row."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    y = tl.load(target_ptr + row).to(tl.int64)
    ok, bad, _ = class_target(y, target_ptr, n_classes, ignore_index, False)
    n_read = tl.where(ok, n_cols, 0)  # rows not counted read no logits
    m, s, b, q, z_sum, j = _row_stats(x_row, n_read, n_cols, logit_mult, softcap, SOFTCAP,
                                      ENTROPY, LOG_SUM_SQ, MEAN_LOGIT, TOP1, SINGLE_BLOCK,
                                      BLOCK_SIZE)
    local = y - class_offset
    mine = ok & (local >= 0) & (local < n_cols)  # the target's class is in this block
    z_y = tl.where(mine, logits(x_row + local, mine, logit_mult, softcap, SOFTCAP, ""), 0.0)
    tl.store(parts_ptr + row, m)
    tl.store(parts_ptr + n_rows + row, s)
    tl.store(parts_ptr + 2 * n_rows + row, b)
    tl.store(parts_ptr + 3 * n_rows + row, z_y)
    tl.store(parts_ptr + 4 * n_rows + row, q)
    tl.store(parts_ptr + 5 * n_rows + row, z_sum)
    j_global = tl.where(j == NO_CLASS, -1, j.to(tl.int64) + class_offset)
    tl.store(j_ptr + 6 * n_rows + row, j_global.to(tl.int32))


@triton.jit
def _lp_grad_kernel(
    # pointers
    x_ptr,  # logits: rows of n_cols, unit class stride, row = (outer, inner)
    target_ptr,  # class indices (n_rows,), contiguous
    stats_ptr,  # in: float32 (n_rows, 2): m~, log2 s
    entropy_ptr,  # in (ENTROPY_GRAD): float32 (n_rows,) entropy
    g_ptr,  # in (LOG_PROB_GRAD): upstream gradient of log p_y, one a row (strided)
    g_h_ptr,  # in (ENTROPY_GRAD): upstream gradient of the entropy, one a row (strided)
    grad_ptr,  # out: d out / d logits, rows like x_ptr's (may be x_ptr itself)
    # sizes
    n_rows,
    n_cols,
    n_inner,
    n_col_blocks,
    # strides, in elements
    stride_x_outer,
    stride_x_inner,
    stride_grad_outer,
    stride_grad_inner,
    stride_g,  # 0 for an expanded upstream gradient (the backward of a sum)
    stride_g_h,
    # scalars
    class_offset,  # the block's first class (a vocab-sharded head's; else 0)
    n_classes,  # the whole rows' classes (the targets' range; else n_cols)
    ignore_index,
    logit_mult,
    softcap,
    # flags
    SOFTCAP: tl.constexpr,
    LOG_PROB_GRAD: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The gradient of one block of a row's classes. read BLOCK_SIZE, write BLOCK_SIZE."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    block = (pid - row * n_col_blocks).to(tl.int32)
    outer = row // n_inner
    inner = row - outer * n_inner
    x_row = x_ptr + outer * stride_x_outer + inner * stride_x_inner
    g_row = grad_ptr + outer * stride_grad_outer + inner * stride_grad_inner
    cols = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    y = tl.load(target_ptr + row).to(tl.int64)
    ok, bad, _ = class_target(y, target_ptr, n_classes, ignore_index, False)
    mask = cols < tl.where(ok, n_cols, 0)  # rows not counted read nothing (their gradient: 0)
    z = logits(x_row + cols, mask, logit_mult, softcap, SOFTCAP, "")
    m_safe = tl.load(stats_ptr + 2 * row)
    log2_s = tl.load(stats_ptr + 2 * row + 1)
    g = 0.0
    if LOG_PROB_GRAD:
        g = tl.load(g_ptr + row * stride_g).to(tl.float32)
    g_h = 0.0
    h = 0.0
    if ENTROPY_GRAD:
        g_h = tl.load(g_h_ptr + row * stride_g_h).to(tl.float32)
        h = tl.load(entropy_ptr + row)
    # the target's column in this block (outside it where the target's class is elsewhere:
    # a counted target is below n_classes, so the difference fits an int32)
    y_col = tl.where(ok, y - class_offset, -1).to(tl.int32)
    d = log_prob_grad_block(z, cols, y_col, m_safe, log2_s, h, g, g_h, ok, bad,
                            logit_mult, softcap, SOFTCAP, LOG_PROB_GRAD, ENTROPY_GRAD)
    tl.store(g_row + cols, d.to(g_row.dtype.element_ty), mask=cols < n_cols)


# ------------------------------------------------------------------------------------------
# launchers (rows are (outer, inner, C) views with unit class stride, or (rows, C))
# ------------------------------------------------------------------------------------------


def _rows3(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 3 else x.unsqueeze(0)


def row_log_probs(x, target, opts: eager.Options, *, outputs: tuple = (), out=None):
    """(``eager.RowOutputs``: log p_y and the ``outputs`` requested; statistics (rows, 2):
    m~, log2 s) of the rows of ``x`` (outer, inner, C) or (rows, C), any float dtype, against
    class indices ``target`` (rows,), contiguous. ``out``: float32 buffers to write into
    (``eager.allocate_rows``': the LM head's slices of a whole call's), else new."""
    x3 = _rows3(x)
    n_outer, n_inner, n_cols = x3.shape
    n_rows = n_outer * n_inner
    if out is None:
        out = eager.allocate_rows(n_rows, outputs, torch.float32, x.device)
    rows, stats = out
    top1 = None if rows.is_top1 is None else rows.is_top1.view(torch.uint8)

    def ptr(t):  # an output not requested: log p's pointer, never stored through
        return rows.log_probs if t is None else t

    block = min(ROW_BLOCK, next_power_of_2(n_cols))
    launch(
        _lp_row_kernel,
        (n_rows,),
        writes=non_null(log_p_ptr=rows.log_probs, entropy_ptr=rows.entropy, stats_ptr=stats,
                        sum_sq_ptr=rows.log_sum_sq_probs, mean_ptr=rows.mean_logits,
                        top1_ptr=top1),
        x_ptr=x3,
        target_ptr=target,
        log_p_ptr=rows.log_probs,
        entropy_ptr=ptr(rows.entropy),
        stats_ptr=stats,
        sum_sq_ptr=ptr(rows.log_sum_sq_probs),
        mean_ptr=ptr(rows.mean_logits),
        top1_ptr=ptr(top1),
        n_rows=n_rows,
        n_cols=n_cols,
        n_inner=n_inner,
        stride_x_outer=x3.stride(0),
        stride_x_inner=x3.stride(1),
        ignore_index=opts.ignore_index,
        **transform(opts),
        max_entropy=eager.max_entropy(n_cols),
        ENTROPY=rows.entropy is not None,
        LOG_SUM_SQ=rows.log_sum_sq_probs is not None,
        MEAN_LOGIT=rows.mean_logits is not None,
        TOP1=top1 is not None,
        SINGLE_BLOCK=block >= n_cols,
        BLOCK_SIZE=block,
        num_warps=num_warps_for(block),
    )
    return rows, stats


def log_prob_grad(x, target, stats, h, g, g_h, opts: eager.Options, *, grad,
                  class_offset: int = 0, n_classes: int | None = None) -> None:
    """Write d out / d x into ``grad`` (rows like x's, any float dtype; x itself for in
    place) for the upstream gradients ``g`` of log p_y and ``g_h`` of the entropy ``h``
    (None: no such term), from the rows' ``stats`` (``row_log_probs``). ``class_offset``,
    ``n_classes``: x is the block of classes ``[class_offset, class_offset + C)`` of rows of
    ``n_classes`` (a vocab-sharded head's), the statistics the whole rows'."""
    x3, grad3 = _rows3(x), _rows3(grad)
    n_outer, n_inner, n_cols = x3.shape
    n_rows = n_outer * n_inner
    if n_rows == 0 or n_cols == 0:
        return
    block = min(GRAD_BLOCK, next_power_of_2(n_cols))
    n_col_blocks = triton.cdiv(n_cols, block)
    g = None if g is None else g.reshape(-1)
    g_h = None if g_h is None else g_h.reshape(-1)
    launch(
        _lp_grad_kernel,
        (n_rows * n_col_blocks,),
        writes=("grad_ptr",),
        x_ptr=x3,
        target_ptr=target,
        stats_ptr=stats,
        entropy_ptr=h if g_h is not None else stats,
        g_ptr=g if g is not None else stats,
        g_h_ptr=g_h if g_h is not None else stats,
        grad_ptr=grad3,
        n_rows=n_rows,
        n_cols=n_cols,
        n_inner=n_inner,
        n_col_blocks=n_col_blocks,
        stride_x_outer=x3.stride(0),
        stride_x_inner=x3.stride(1),
        stride_grad_outer=grad3.stride(0),
        stride_grad_inner=grad3.stride(1),
        stride_g=g.stride(0) if g is not None else 0,
        stride_g_h=g_h.stride(0) if g_h is not None else 0,
        class_offset=class_offset,
        n_classes=n_cols if n_classes is None else n_classes,
        ignore_index=opts.ignore_index,
        **transform(opts),
        LOG_PROB_GRAD=g is not None,
        ENTROPY_GRAD=g_h is not None,
        BLOCK_SIZE=block,
        num_warps=num_warps_for(block),
    )


def log_prob_partial_stats(x, target, opts: eager.Options, *, class_offset: int,
                           n_classes: int, outputs: tuple, out: torch.Tensor) -> None:
    """``eager.log_prob_partial_stats``' contract: the ``eager.LP_STATS`` statistics of the
    block of classes ``[class_offset, class_offset + C)`` of rows ``x`` (R, C) (unit class
    stride) of ``n_classes``, into ``out`` (LP_STATS, R) float32, contiguous."""
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        eager.log_prob_partial_stats(x, target, opts, class_offset=class_offset,
                                     n_classes=n_classes, outputs=outputs, out=out)
        return
    block = min(ROW_BLOCK, next_power_of_2(n_cols))
    launch(
        _lp_partial_kernel,
        (n_rows,),
        writes=("parts_ptr", "j_ptr"),
        x_ptr=x,
        target_ptr=target,
        parts_ptr=out,
        j_ptr=out.view(torch.int32),
        n_rows=n_rows,
        n_cols=n_cols,
        stride_x_row=x.stride(0),
        class_offset=class_offset,
        n_classes=n_classes,
        ignore_index=opts.ignore_index,
        **transform(opts),
        ENTROPY="entropy" in outputs,
        LOG_SUM_SQ="log_sum_sq_probs" in outputs,
        MEAN_LOGIT="mean_logits" in outputs,
        TOP1="is_top1" in outputs,
        SINGLE_BLOCK=block >= n_cols,
        BLOCK_SIZE=block,
        num_warps=num_warps_for(block),
    )


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------


def upstream_pairs(outputs, grads):
    """The (output, upstream gradient) pairs that carry a gradient (None: none came)."""
    return [(o, g) for o, g in zip(outputs, grads, strict=False)
            if o is not None and g is not None]


class LogProbsFunction(torch.autograd.Function):
    """log p_y, then each output requested in ``outputs`` (``eager.present``'s order) of
    logits ``x`` (outer, inner, C) (unit class stride) against class indices
    (outer * inner,); float32 per row. Only log p_y and the entropy carry a gradient
    (TRL's); an output whose gradient does not come (the entropy logged, not trained on)
    costs the backward nothing."""

    @staticmethod
    def forward(ctx, x, target, opts: eager.Options, outputs: tuple):
        ctx.set_materialize_grads(False)
        rows, stats = row_log_probs(x, target, opts, outputs=outputs)
        # the backward's own copy of the entropy (4 B a row): the caller may modify the
        # output in place (masking it), as torch's formula allows
        ctx.save_for_backward(x, target, stats,
                              None if rows.entropy is None else rows.entropy.clone())
        ctx.opts = opts
        ctx.mark_non_differentiable(*(getattr(rows, name) for name in eager.NON_DIFFERENTIABLE
                                      if getattr(rows, name) is not None))
        return eager.present(rows)

    @staticmethod
    def backward(ctx, g, *others):
        x, target, stats, h = ctx.saved_tensors
        g_h = others[0] if h is not None else None  # the entropy comes right after log p
        none = (None,) * 3
        if (g is None and g_h is None) or not ctx.needs_input_grad[0]:
            return None, *none
        if torch.is_grad_enabled():
            # create_graph=True: torch's ops, so that second derivatives are right
            with torch.enable_grad():
                rows = x.reshape(-1, x.shape[-1])
                out, _ = eager.row_log_probs(rows, target, ctx.opts,
                                             outputs=() if h is None else ("entropy",))
                pairs = upstream_pairs((out.log_probs, out.entropy), (g, g_h))
                (grad,) = torch.autograd.grad([o for o, _ in pairs], x,
                                              [u.reshape(o.shape) for o, u in pairs],
                                              create_graph=True)
            return grad, *none
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        log_prob_grad(x, target, stats, h, g, g_h, ctx.opts, grad=grad)
        return grad, *none


# ------------------------------------------------------------------------------------------
# entry point (arguments already validated by fused_losses.log_probs)
# ------------------------------------------------------------------------------------------


def log_probs(input, target, opts: eager.Options, outputs: tuple = ()):
    """``eager.RowOutputs`` (log p_y and the ``outputs`` requested, None for the others) of
    logits (..., C) against class indices (...), float32, shaped like the target."""
    x = _fold_rows(input)
    x, t = detached_without_grad_mode(x, target.reshape(-1).contiguous())
    rows = eager.unpack(LogProbsFunction.apply(x, t, opts, outputs), outputs)
    return eager.RowOutputs(*(None if o is None else o.view(target.shape) for o in rows))
