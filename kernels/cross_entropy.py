"""Cross-entropy over rows of class logits: kernels, launchers and the autograd.Function.

Design (see ../shared/PERFORMANCE.md, "Designs and what they move"); the arithmetic is in
``_ce_math.py``, the K-dimensional (N, C, d1, ..., dK) layout in ``cross_entropy_nd.py``.

- ``_ce_row_kernel``: one program per row (a token). Its statistics (max, sum of exponentials,
  the smoothing sums) are computed online in one read pass, in float32, with ``exp2``; then
  its loss and z-loss term. ``mean``/``sum`` with an input that needs its gradient (training)
  write the gradient in the same program, right after: rows of up to ``SINGLE_BLOCK_MAX``
  classes are held in registers (one read of the logits, one write of the gradient); longer
  rows are re-read backwards while they are still in L2, with eviction hints keeping the row
  there ahead of the gradient streaming out. The backward then only scales that buffer by
  the upstream gradient on the device (``scale_by_upstream_``: no traffic when it is 1).
  HBM traffic: logits read once (+ the L2 re-read), gradient written once.
- Few rows and a long vocabulary (``split_plan``): each row is split among several programs
  (``_ce_stats_kernel``), their statistics merged (``_ce_combine_kernel``) and the gradient
  written by ``_ce_grad_kernel``, a program per split again, so the GPU's SMs are all busy.
- ``none``, a second backward (``retain_graph=True``) and gradients for probability targets
  keep the forward to the statistics and compute the gradient in the backward
  (``_ce_grad_kernel``) from the saved statistics: one more read of the logits.
- The mean's denominators (summed weights, and the count of rows for the z-loss) are computed
  on the device before the main kernel: no value ever crosses to the host.

The launchers below (``denominators``, ``row_losses``, ``partial_stats``, ``combine_stats``,
``grad_from_stats``) are the building blocks of the LM head and the vocab-parallel loss too:
``partial_stats`` and ``grad_from_stats`` take a block of a row's classes, ``[class_offset,
class_offset + width)`` of ``n_classes``, so a target outside the block is "elsewhere" (another
chunk, another rank), and the gradient can be written into any buffer, the logits included.

Rows are addressed as (outer, inner) pairs with their own strides, so a causal-LM shift view
``logits[:, :-1, :]`` or a channels-last input runs without a copy (classes with unit stride).

Out-of-range class targets on CUDA are not checked on the host (that would be a sync): the
row's loss and gradient are NaN instead, and so is a ``mean``. CPU targets are checked by
``fused_losses._validation`` and raise ``IndexError`` as torch does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cross_entropy_nd, eager
from ._autograd import (
    detached_without_grad_mode,
    differentiable_backward,
    may_fuse_gradient,
    output_as,
)
from ._ce_math import (
    block_stats,
    class_factors,
    class_target,
    flags,
    grad_block,
    grad_factors,
    logits,
    merge_stats,
    row_loss,
    softmax,
    target_grad_block,
)
from ._common import (
    float32_scratch,
    launch,
    next_power_of_2,
    non_null,
    num_warps_for,
    scale_by_upstream_,
)

# Rows up to this many classes are held in registers (32 float32 values per thread at 32
# warps): one read of the logits, one write of the gradient. Longer rows loop over blocks.
SINGLE_BLOCK_MAX = 32768
# Longer rows: blocks of LOOP_BLOCK classes, 32 warps (32 elements per thread per block), one
# program per SM, so the rows in flight (132 x 256 KB at V=128k bf16 on an H100) fit in L2
# for the gradient pass.
LOOP_BLOCK = 32768
LOOP_WARPS = 32
# Looped rows: L2 eviction priorities for the gradient pass's re-read (PTX createpolicy +
# L2::cache_hint; hints only, the results are the same). Pass 1 reads the row "evict last",
# the re-read and the gradient's stores are "evict first", so the gradient streaming out does
# not push the rest of the row out of L2 before the re-read reaches it.
L2_HINTS = True
# Few rows of many classes: split each row among programs of SPLIT_BLOCK-class blocks
# (SPLIT_WARPS warps), at least SPLIT_MIN_COLS classes each, until there are about two
# programs per SM (a GPU's count; an H100's 132 SMs elsewhere, so the interpreter tests it).
SPLIT_BLOCK = 4096
SPLIT_WARPS = 8
# The gradient from saved statistics (its own launch: nothing to hold) loops over blocks of
# up to GRAD_BLOCK classes, 16 per thread.
GRAD_BLOCK = 8192
SPLIT_MIN_COLS = 4096
DEFAULT_SMS = 132
SPLIT_SMS: int | None = None  # the SM count the plan assumes (None: the GPU's); tests set it
DENOM_BLOCK = 1024
STATS = 5  # partial statistics per row: m, s, a, k, z_y (see _ce_math.py)


Options = eager.Options


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _ce_denominator_kernel(
    # pointers
    target_ptr,
    weight_ptr,
    partial_ptr,  # out: (2, n_programs) float32: summed weights, count
    # sizes
    n_rows,
    n_classes,
    n_programs,
    # scalars
    ignore_index,
    # flags
    HAS_WEIGHT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Partial sums of the mean's denominators over the counted targets: their weights (the
    loss's) and their number (the z-loss's). An out-of-range target makes both NaN: a mean is
    never a finite wrong number. read N targets (and N gathered weights), write 8 B a program.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    y = tl.load(target_ptr + offs, mask=offs < n_rows, other=0).to(tl.int64)
    y = tl.where(offs < n_rows, y, ignore_index)  # (uint8 targets cannot hold -100)
    ok, bad, w_y = class_target(y, weight_ptr, n_classes, ignore_index, HAS_WEIGHT)
    nan = tl.where(bad, float("nan"), 0.0)
    tl.store(partial_ptr + pid, tl.sum(w_y + nan, axis=0))
    tl.store(partial_ptr + n_programs + pid, tl.sum(tl.where(ok, 1.0, 0.0) + nan, axis=0))


@triton.jit
def _row_target(target_ptr, row, weight_ptr, n_classes, ignore_index,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """A row's class target (-1 for probability targets), whether it is counted, whether it
    is out of range (its loss is NaN), and its class weight w_y."""
    if PROB_TARGET:
        y = row * 0 - 1  # (an int64 tensor, as a class target's)
        ok = True
        bad = False
        w_y = 1.0
    else:
        y = tl.load(target_ptr + row).to(tl.int64)
        ok, bad, w_y = class_target(y, weight_ptr, n_classes, ignore_index, HAS_WEIGHT)
    return y, ok, bad, w_y


@triton.jit
def _split_program(n_splits, n_inner, split_width, n_cols):
    """This program's row (int64), its (outer, inner) pair, its split, and the split's
    classes [c_start, c_end) (int32: half the registers of int64 columns)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_splits
    split = (pid - row * n_splits).to(tl.int32)
    outer = row // n_inner
    c_start = split * split_width
    c_end = tl.minimum(c_start + split_width, n_cols)
    return row, outer, row - outer * n_inner, split, c_start, c_end


@triton.jit
def _ce_row_kernel(
    # pointers
    x_ptr,  # logits: rows of n_cols, unit class stride, row = (outer, inner)
    target_ptr,  # class indices (n_rows,) or probabilities (n_rows, n_cols), contiguous
    weight_ptr,  # class weights (n_cols,)
    loss_ptr,  # out: float32 per-row loss
    z_ptr,  # out: float32 per-row z-loss term (when z_loss != 0)
    stats_ptr,  # out: float32 (3, n_rows): m~, log2 s, k (k with smoothing or probabilities)
    grad_ptr,  # out (WRITE_GRAD): d loss / d logits, rows like x_ptr's (may be x_ptr itself)
    scale_ptr,  # in (WRITE_GRAD): float32 (2,) or (n_rows, 2) upstream factors
    # sizes
    n_rows,
    n_cols,
    n_inner,
    # strides, in elements
    stride_x_outer,
    stride_x_inner,
    stride_g_outer,
    stride_g_inner,
    stride_scale,  # 0 (one upstream gradient) or 2 (one per row)
    # scalars
    ignore_index,
    smoothing,
    logit_mult,
    softcap,
    z_loss,
    # flags
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the row held in registers (BLOCK_SIZE >= n_cols)
    BLOCK_SIZE: tl.constexpr,
    READ_EVICT: tl.constexpr,  # eviction policies ("" is the default): pass 1's loads,
    REREAD_EVICT: tl.constexpr,  # pass 2's loads and the gradient's stores
):
    """A row's statistics, loss and z-loss term; with WRITE_GRAD its gradient right after.

    read n_cols (+ n_cols probabilities), write n_cols when WRITE_GRAD (looped rows re-read
    n_cols from L2); 12-20 B of per-row results.
    """
    # int64 row offsets: 16k rows x 262k classes is over 2^32 elements.
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row - outer * n_inner
    x_row = x_ptr + outer * stride_x_outer + inner * stride_x_inner
    t_row = target_ptr + row * n_cols
    offs = tl.arange(0, BLOCK_SIZE)

    # The row's target. Ignored rows and out-of-range targets read no logits (n_read = 0).
    y, ok, bad, w_y = _row_target(target_ptr, row, weight_ptr, n_cols, ignore_index,
                                  PROB_TARGET, HAS_WEIGHT)
    n_read = tl.where(ok, n_cols, 0)

    # ---- pass 1: the row's statistics (read n_cols) ---------------------------------------
    if SINGLE_BLOCK:
        mask = offs < n_read
        z = logits(x_row + offs, mask, logit_mult, softcap, SOFTCAP, READ_EVICT)
        m, e, s, a, k = block_stats(z, t_row + offs, weight_ptr + offs, mask, n_cols,
                                    smoothing, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
    else:
        m = float("-inf")
        s = 0.0
        a = 0.0
        k = 0.0
        for start in range(0, n_read, BLOCK_SIZE):
            cols = start + offs
            mask = cols < n_read
            z = logits(x_row + cols, mask, logit_mult, softcap, SOFTCAP, READ_EVICT)
            m_b, e_b, s_b, a_b, k_b = block_stats(z, t_row + cols, weight_ptr + cols, mask,
                                                  n_cols, smoothing, PROB_TARGET, HAS_WEIGHT,
                                                  HAS_SMOOTHING)
            m, s, a, k = merge_stats(m, s, a, k, m_b, s_b, a_b, k_b)

    z_y = 0.0
    if not PROB_TARGET:
        z_y = logits(x_row + y, ok, logit_mult, softcap, SOFTCAP, "")
    loss, z_term, m_safe, log2_s = row_loss(m, s, a, k, z_y, w_y, ok, bad, n_cols, smoothing,
                                            z_loss, PROB_TARGET, HAS_SMOOTHING)
    tl.store(loss_ptr + row, loss)
    if z_loss != 0.0:
        tl.store(z_ptr + row, z_term)
    tl.store(stats_ptr + row, m_safe)
    tl.store(stats_ptr + n_rows + row, log2_s)
    if PROB_TARGET or HAS_SMOOTHING:
        tl.store(stats_ptr + 2 * n_rows + row, k)

    # ---- pass 2: the gradient (write n_cols; looped rows re-read n_cols) -----------------
    if WRITE_GRAD:
        scales = scale_ptr + row * stride_scale
        hot, extra, kc = grad_factors(m_safe, log2_s, k, w_y, tl.load(scales),
                                      tl.load(scales + 1), n_cols, smoothing, PROB_TARGET,
                                      HAS_SMOOTHING)
        g_row = grad_ptr + outer * stride_g_outer + inner * stride_g_inner
        if SINGLE_BLOCK:
            # p from the exponentials of pass 1, still in registers; the class factors are
            # loaded again (from L1/L2: registers are the row's)
            k_c = 0.0
            if PROB_TARGET or HAS_SMOOTHING:
                k_c = class_factors(t_row + offs, weight_ptr + offs, offs < n_read, n_cols,
                                    smoothing, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
            if SOFTCAP:  # (the softcapped logits stay in registers, not their exponentials)
                p = softmax(z, m_safe, log2_s)
            else:
                p = e * (1.0 / s)
            d = grad_block(p, z, offs, y.to(tl.int32), k_c, hot, extra, kc, ok, bad,
                           logit_mult, softcap, PROB_TARGET, PROB_TARGET or HAS_SMOOTHING,
                           SOFTCAP)
            tl.store(g_row + offs, d.to(g_row.dtype.element_ty), mask=offs < n_cols)
        else:
            # Backwards over the row: the blocks pass 1 read last are the likeliest in L2.
            n_blocks = tl.cdiv(n_cols, BLOCK_SIZE)
            for i in range(0, n_blocks):
                cols = (n_blocks - 1 - i) * BLOCK_SIZE + offs
                mask = cols < n_read
                z = logits(x_row + cols, mask, logit_mult, softcap, SOFTCAP, REREAD_EVICT)
                if PROB_TARGET or HAS_SMOOTHING:
                    k_c = class_factors(t_row + cols, weight_ptr + cols, mask, n_cols,
                                        smoothing, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
                else:
                    k_c = 0.0
                p = softmax(z, m_safe, log2_s)
                d = grad_block(p, z, cols, y.to(tl.int32), k_c, hot, extra, kc, ok, bad,
                               logit_mult, softcap, PROB_TARGET, PROB_TARGET or HAS_SMOOTHING,
                               SOFTCAP)
                tl.store(g_row + cols, d.to(g_row.dtype.element_ty), mask=cols < n_cols,
                         eviction_policy=REREAD_EVICT)


@triton.jit
def _ce_stats_kernel(
    # pointers
    x_ptr,  # logits: a block of classes [class_offset, class_offset + n_cols) of each row
    target_ptr,  # class indices (n_rows,), or probabilities of the block (n_rows, n_cols)
    weight_ptr,  # class weights (n_classes,): the whole row's
    partial_ptr,  # out: float32 (n_splits, 5, n_rows): m, s, a, k, z_y of each split (a
    #               and k with smoothing or probabilities only)
    # sizes
    n_rows,
    n_cols,
    n_inner,
    n_classes,
    class_offset,
    split_width,
    n_splits,
    # strides, in elements
    stride_x_outer,
    stride_x_inner,
    # scalars
    ignore_index,
    smoothing,
    logit_mult,
    softcap,
    # flags
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Statistics of one split of a row: classes [split * split_width, + split_width) of the
    block. z_y is the target's logit where the target is in this split, else 0.

    read split_width (+ as many probabilities), write 20 B.
    """
    row, outer, inner, split, c_start, c_end = _split_program(n_splits, n_inner, split_width,
                                                              n_cols)
    x_row = x_ptr + outer * stride_x_outer + inner * stride_x_inner
    t_row = target_ptr + row * n_cols
    offs = tl.arange(0, BLOCK_SIZE)
    y, ok, bad, w_y = _row_target(target_ptr, row, weight_ptr, n_classes, ignore_index,
                                  PROB_TARGET, HAS_WEIGHT)
    n_end = tl.where(ok, c_end, c_start)  # rows not counted read nothing

    m = float("-inf")
    s = 0.0
    a = 0.0
    k = 0.0
    for start in range(c_start, n_end, BLOCK_SIZE):
        cols = start + offs
        mask = cols < n_end
        z = logits(x_row + cols, mask, logit_mult, softcap, SOFTCAP, "")
        m_b, e_b, s_b, a_b, k_b = block_stats(z, t_row + cols, weight_ptr + class_offset + cols,
                                              mask, n_classes, smoothing, PROB_TARGET,
                                              HAS_WEIGHT, HAS_SMOOTHING)
        m, s, a, k = merge_stats(m, s, a, k, m_b, s_b, a_b, k_b)
    y_local = (y - class_offset).to(tl.int32)  # (rows not counted: never used)
    mine = ok & (y_local >= c_start) & (y_local < c_end)
    z_y = logits(x_row + y_local, mine, logit_mult, softcap, SOFTCAP, "")
    out = partial_ptr + split * 5 * n_rows + row
    tl.store(out, m)
    tl.store(out + n_rows, s)
    if PROB_TARGET or HAS_SMOOTHING:
        tl.store(out + 2 * n_rows, a)
        tl.store(out + 3 * n_rows, k)
    tl.store(out + 4 * n_rows, tl.where(mine, z_y, 0.0))


@triton.jit
def _ce_combine_kernel(
    # pointers
    partial_ptr,  # in: float32 (n_parts, 5, n_rows) statistics of a partition of each row
    target_ptr,  # class indices (n_rows,) (unused for probabilities)
    weight_ptr,  # class weights (n_classes,)
    loss_ptr,  # out: float32 per-row loss
    z_ptr,  # out: float32 per-row z-loss term (when z_loss != 0)
    stats_ptr,  # out: float32 (3, n_rows): m~, log2 s, k
    # sizes
    n_rows,
    n_parts,
    n_classes,
    # scalars
    ignore_index,
    smoothing,
    z_loss,
    # flags
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Merge the statistics of every part of BLOCK_SIZE rows, then their loss (read 20 B per
    row and part, write 20 B per row)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_rows = rows < n_rows
    m = tl.full([BLOCK_SIZE], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_SIZE], tl.float32)
    a = tl.zeros([BLOCK_SIZE], tl.float32)
    k = tl.zeros([BLOCK_SIZE], tl.float32)
    z_y = tl.zeros([BLOCK_SIZE], tl.float32)
    for part in range(0, n_parts):
        ptrs = partial_ptr + part * 5 * n_rows + rows
        m_p = tl.load(ptrs, mask=in_rows, other=float("-inf"))
        s_p = tl.load(ptrs + n_rows, mask=in_rows, other=0.0)
        a_p = tl.zeros([BLOCK_SIZE], tl.float32)
        k_p = tl.zeros([BLOCK_SIZE], tl.float32)
        if PROB_TARGET or HAS_SMOOTHING:
            a_p = tl.load(ptrs + 2 * n_rows, mask=in_rows, other=0.0)
            k_p = tl.load(ptrs + 3 * n_rows, mask=in_rows, other=0.0)
        m, s, a, k = merge_stats(m, s, a, k, m_p, s_p, a_p, k_p)
        z_y += tl.load(ptrs + 4 * n_rows, mask=in_rows, other=0.0)
    if PROB_TARGET:
        ok = in_rows
        bad = in_rows & False
        w_y = tl.full([BLOCK_SIZE], 1.0, tl.float32)
    else:
        y = tl.load(target_ptr + rows, mask=in_rows, other=0).to(tl.int64)
        y = tl.where(in_rows, y, ignore_index)
        ok, bad, w_y = class_target(y, weight_ptr, n_classes, ignore_index, HAS_WEIGHT)
    loss, z_term, m_safe, log2_s = row_loss(m, s, a, k, z_y, w_y, ok, bad, n_classes,
                                            smoothing, z_loss, PROB_TARGET, HAS_SMOOTHING)
    tl.store(loss_ptr + rows, loss, mask=in_rows)
    if z_loss != 0.0:
        tl.store(z_ptr + rows, z_term, mask=in_rows)
    tl.store(stats_ptr + rows, m_safe, mask=in_rows)
    tl.store(stats_ptr + n_rows + rows, log2_s, mask=in_rows)
    tl.store(stats_ptr + 2 * n_rows + rows, k, mask=in_rows)


@triton.jit
def _ce_grad_kernel(
    # pointers
    x_ptr,  # logits: a block of classes [class_offset, class_offset + n_cols) of each row
    target_ptr,  # class indices (n_rows,), or probabilities of the block (n_rows, n_cols)
    weight_ptr,  # class weights (n_classes,): the whole row's
    stats_ptr,  # in: float32 (3, n_rows): the whole row's m~, log2 s, k
    scale_ptr,  # in: float32 (2,) or (n_rows, 2) upstream factors, see upstream_scales
    grad_ptr,  # out: d loss / d logits, rows like x_ptr's (may be x_ptr itself)
    grad_target_ptr,  # out: d loss / d probabilities (n_rows, n_cols), contiguous
    # sizes
    n_rows,
    n_cols,
    n_inner,
    n_classes,
    class_offset,
    split_width,
    n_splits,
    # strides, in elements
    stride_x_outer,
    stride_x_inner,
    stride_g_outer,
    stride_g_inner,
    stride_scale,  # 0 (one upstream gradient) or 2 (one per row)
    # scalars
    ignore_index,
    smoothing,
    logit_mult,
    softcap,
    z_loss,
    # flags
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    X_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The gradient of one split of a row from the row's statistics.

    read split_width (+ probabilities), write split_width (+ their gradient).
    """
    row, outer, inner, split, c_start, c_end = _split_program(n_splits, n_inner, split_width,
                                                              n_cols)
    x_row = x_ptr + outer * stride_x_outer + inner * stride_x_inner
    g_row = grad_ptr + outer * stride_g_outer + inner * stride_g_inner
    t_row = target_ptr + row * n_cols
    gt_row = grad_target_ptr + row * n_cols
    offs = tl.arange(0, BLOCK_SIZE)
    y, ok, bad, w_y = _row_target(target_ptr, row, weight_ptr, n_classes, ignore_index,
                                  PROB_TARGET, HAS_WEIGHT)
    n_end = tl.where(ok, c_end, c_start)  # rows not counted read nothing (their gradient is 0)
    y_local = (y - class_offset).to(tl.int32)  # the one-hot column, if in this block
    m_safe = tl.load(stats_ptr + row)
    log2_s = tl.load(stats_ptr + n_rows + row)
    k = 0.0
    if PROB_TARGET or HAS_SMOOTHING:
        k = tl.load(stats_ptr + 2 * n_rows + row)
    scale = tl.load(scale_ptr + row * stride_scale)
    hot, extra, kc = grad_factors(m_safe, log2_s, k, w_y, scale,
                                  tl.load(scale_ptr + row * stride_scale + 1), n_classes,
                                  smoothing, PROB_TARGET, HAS_SMOOTHING)
    for start in range(c_start, c_end, BLOCK_SIZE):
        cols = start + offs
        mask = cols < n_end
        z = logits(x_row + cols, mask, logit_mult, softcap, SOFTCAP, "")
        if PROB_TARGET or HAS_SMOOTHING:
            k_c = class_factors(t_row + cols, weight_ptr + class_offset + cols, mask,
                                n_classes, smoothing, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
        else:
            k_c = 0.0
        if X_GRAD:
            p = softmax(z, m_safe, log2_s)
            d = grad_block(p, z, cols, y_local, k_c, hot, extra, kc, ok, bad, logit_mult,
                           softcap, PROB_TARGET, PROB_TARGET or HAS_SMOOTHING, SOFTCAP)
            tl.store(g_row + cols, d.to(g_row.dtype.element_ty), mask=cols < c_end)
        if TARGET_GRAD:
            w_c = class_factors(t_row + cols, weight_ptr + class_offset + cols, mask,
                                n_classes, smoothing, False, HAS_WEIGHT, False)
            dt = target_grad_block(z, m_safe, log2_s, w_c, scale, smoothing)
            tl.store(gt_row + cols, dt.to(gt_row.dtype.element_ty), mask=cols < c_end)


# ------------------------------------------------------------------------------------------
# launchers: the building blocks (rows are (outer, inner, C) views with unit class stride)
# ------------------------------------------------------------------------------------------


def block_config(n_cols: int) -> tuple[int, int, bool]:
    """(BLOCK_SIZE, num_warps, SINGLE_BLOCK) for one program per row of ``n_cols`` classes."""
    block = next_power_of_2(n_cols)
    if block <= SINGLE_BLOCK_MAX:
        return block, num_warps_for(block, elems_per_thread=32), True
    return LOOP_BLOCK, LOOP_WARPS, False


def split_plan(n_rows: int, n_cols: int, device: torch.device) -> int:
    """Programs per row for ``n_rows`` rows of ``n_cols`` classes: 1, or for few rows of
    more classes than a program holds in registers, enough splits of at least SPLIT_MIN_COLS
    classes to give every SM two programs."""
    if n_cols <= SINGLE_BLOCK_MAX:
        return 1
    sms = SPLIT_SMS or DEFAULT_SMS
    if SPLIT_SMS is None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    if n_rows >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, n_rows), n_cols // SPLIT_MIN_COLS))


def _split_width(n_cols: int, n_splits: int, block: int) -> tuple[int, int]:
    """(classes per split, a multiple of ``block``; the number of splits that makes)."""
    width = triton.cdiv(triton.cdiv(n_cols, n_splits), block) * block
    return width, triton.cdiv(n_cols, width)


def _rows(x: torch.Tensor) -> dict:
    """Row addressing of an (outer, inner, C) view."""
    n_outer, n_inner, n_cols = x.shape
    return dict(n_rows=n_outer * n_inner, n_cols=n_cols, n_inner=n_inner,
                stride_x_outer=x.stride(0), stride_x_inner=x.stride(1))


def denominators(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                 n_classes: int) -> torch.Tensor:
    """Device float32 (2,): the summed weights (or count) of the counted class targets, the
    mean's denominator, and their count, the z-loss mean's; NaN if a target is out of range.
    Fixed-order partial sums, so bitwise reproducible."""
    n_rows = target.numel()
    n_programs = triton.cdiv(n_rows, DENOM_BLOCK)
    partial = float32_scratch(2 * n_programs, target.device)
    launch(
        _ce_denominator_kernel,
        (n_programs,),
        writes=("partial_ptr",),
        target_ptr=target,
        weight_ptr=weight if weight is not None else target,
        partial_ptr=partial,
        n_rows=n_rows,
        n_classes=n_classes,
        n_programs=n_programs,
        ignore_index=ignore_index,
        HAS_WEIGHT=weight is not None,
        BLOCK_SIZE=DENOM_BLOCK,
    )
    return partial.view(2, n_programs).sum(1)


def row_losses(x, target, weight, opts: Options, *, grad=None, scales=None):
    """Per-row loss, z-loss term (None without z-loss) and statistics (3, N) of the rows of
    ``x`` (outer, inner, C); with ``grad`` (rows like x's; x itself for in place), the
    gradient too, for the upstream ``scales`` (``upstream_scales``: (2,) or (rows, 2)).
    Few rows of many classes are split among programs (``split_plan``)."""
    n_outer, n_inner, n_cols = x.shape
    n_rows = n_outer * n_inner
    n_splits = split_plan(n_rows, n_cols, x.device)
    if n_splits > 1:
        partials = partial_stats(x, target, weight, opts, n_splits=n_splits)
        loss, z, stats = combine_stats(partials, target, weight, opts, n_cols)
        if grad is not None:
            grad_from_stats(x, target, weight, stats, scales, opts, grad=grad,
                            n_splits=n_splits)
        return loss, z, stats

    loss = float32_scratch(n_rows, x.device)
    z = float32_scratch(n_rows, x.device) if opts.z_loss else None
    stats = float32_scratch(3 * n_rows, x.device)
    block, num_warps, single = block_config(n_cols)
    g = grad if grad is not None else x
    rereads = not single and grad is not None
    read_evict, reread_evict = ("evict_last", "evict_first") if rereads and L2_HINTS else ("", "")
    launch(
        _ce_row_kernel,
        (n_rows,),
        writes=non_null(loss_ptr=loss, z_ptr=z, stats_ptr=stats, grad_ptr=grad),
        x_ptr=x,
        target_ptr=target,
        weight_ptr=weight if weight is not None else stats,
        loss_ptr=loss,
        z_ptr=z if z is not None else loss,
        stats_ptr=stats,
        grad_ptr=g,
        scale_ptr=scales if scales is not None else stats,
        **_rows(x),
        stride_g_outer=g.stride(0),
        stride_g_inner=g.stride(1),
        stride_scale=scales.stride(0) if scales is not None and scales.dim() == 2 else 0,
        z_loss=opts.z_loss,
        **flags(opts, weight),
        WRITE_GRAD=grad is not None,
        SINGLE_BLOCK=single,
        BLOCK_SIZE=block,
        READ_EVICT=read_evict,
        REREAD_EVICT=reread_evict,
        num_warps=num_warps,
    )
    return loss, z, stats.view(3, n_rows)


def partial_stats(x, target, weight, opts: Options, *, class_offset: int = 0,
                  n_classes: int | None = None, n_splits: int = 1) -> torch.Tensor:
    """Statistics of a block of classes of each row, in ``n_splits`` parts.

    ``x``: (outer, inner, width) logits, classes ``[class_offset, class_offset + width)`` of
    rows of ``n_classes`` (default: width). ``target``: the rows' class indices (global:
    a target outside the block is elsewhere, not out of range) or the block's probabilities
    (rows, width), contiguous; ``weight``: all ``n_classes`` class weights. Returns float32
    (parts, 5, rows): max m, sum of exponentials s relative to it, the smoothing sums a and k
    (written with smoothing or probability targets only),
    and the target's logit z_y where it falls in the part (0 elsewhere). Parts of a row, of
    several blocks, or of several ranks (gathered) merge with ``combine_stats``.
    """
    dims = _rows(x)
    width, n_splits = _split_width(dims["n_cols"], n_splits, SPLIT_BLOCK)
    partial = float32_scratch(n_splits * STATS * dims["n_rows"], x.device)
    launch(
        _ce_stats_kernel,
        (dims["n_rows"] * n_splits,),
        writes=("partial_ptr",),
        x_ptr=x,
        target_ptr=target,
        weight_ptr=weight if weight is not None else partial,
        partial_ptr=partial,
        **dims,
        n_classes=n_classes or dims["n_cols"],
        class_offset=class_offset,
        split_width=width,
        n_splits=n_splits,
        **flags(opts, weight),
        BLOCK_SIZE=min(SPLIT_BLOCK, next_power_of_2(width)),
        num_warps=SPLIT_WARPS,
    )
    return partial.view(n_splits, STATS, dims["n_rows"])


def combine_stats(partials: torch.Tensor, target, weight, opts: Options, n_classes: int):
    """Merge partial statistics (parts, 5, rows) into each row's loss, z-loss term (None
    without z-loss) and statistics (3, rows) for ``grad_from_stats``."""
    n_parts, _, n_rows = partials.shape
    device = partials.device
    loss = float32_scratch(n_rows, device)
    z = float32_scratch(n_rows, device) if opts.z_loss else None
    stats = float32_scratch(3 * n_rows, device)
    block = min(1024, next_power_of_2(n_rows))
    scalars = flags(opts, weight)
    del scalars["logit_mult"], scalars["softcap"], scalars["SOFTCAP"]
    launch(
        _ce_combine_kernel,
        (triton.cdiv(n_rows, block),),
        writes=non_null(loss_ptr=loss, z_ptr=z, stats_ptr=stats),
        partial_ptr=partials,
        target_ptr=target,
        weight_ptr=weight if weight is not None else partials,
        loss_ptr=loss,
        z_ptr=z if z is not None else loss,
        stats_ptr=stats,
        n_rows=n_rows,
        n_parts=n_parts,
        n_classes=n_classes,
        z_loss=opts.z_loss,
        **scalars,
        BLOCK_SIZE=block,
        num_warps=num_warps_for(block, elems_per_thread=4),
    )
    return loss, z, stats.view(3, n_rows)


def grad_from_stats(x, target, weight, stats, scales, opts: Options, *, grad=None,
                    grad_target=None, class_offset: int = 0, n_classes: int | None = None,
                    n_splits: int = 1) -> None:
    """Write d out / d x into ``grad`` (rows like x's; x itself for in place) and d out / d
    probabilities into ``grad_target``, for a block of classes as in ``partial_stats``,
    from the whole rows' statistics (3, rows) and the upstream ``scales``: float32 (2,) or
    (rows, 2), d out / d loss_n and d out / d z_n."""
    dims = _rows(x)
    block = SPLIT_BLOCK if n_splits > 1 else min(GRAD_BLOCK, next_power_of_2(dims["n_cols"]))
    width, n_splits = _split_width(dims["n_cols"], n_splits, block)
    g = grad if grad is not None else x
    launch(
        _ce_grad_kernel,
        (dims["n_rows"] * n_splits,),
        writes=non_null(grad_ptr=grad, grad_target_ptr=grad_target),
        x_ptr=x,
        target_ptr=target,
        weight_ptr=weight if weight is not None else stats,
        stats_ptr=stats,
        scale_ptr=scales,
        grad_ptr=g,
        grad_target_ptr=grad_target if grad_target is not None else stats,
        **dims,
        n_classes=n_classes or dims["n_cols"],
        class_offset=class_offset,
        split_width=width,
        n_splits=n_splits,
        stride_g_outer=g.stride(0),
        stride_g_inner=g.stride(1),
        stride_scale=scales.stride(0) if scales.dim() == 2 else 0,
        z_loss=opts.z_loss,
        **flags(opts, weight),
        X_GRAD=grad is not None,
        TARGET_GRAD=grad_target is not None,
        BLOCK_SIZE=block,
        num_warps=num_warps_for(block),
    )


# ------------------------------------------------------------------------------------------
# reductions: what the per-row results become, and the upstream factors of each row
# (``reduce_rows`` and ``upstream_scales``: torch ops both backends share, in eager.py)
# ------------------------------------------------------------------------------------------


def call_denominators(target, weight, opts: Options, n_classes: int):
    """The mean's denominators of a whole call (``denominators``; None where ``reduce_rows``
    and ``upstream_scales`` need none)."""
    if opts.reduction != "mean" or opts.prob_target:
        return None
    return denominators(target, weight, opts.ignore_index, n_classes)


def chunk_loss(logits, target, weight, opts: Options, denom, n_rows: int, grad_out=None,
               write_grad: bool = False, grad_target=None, stats=None):
    """A block of rows (R, C) of a call of ``n_rows`` rows (``denom``: the whole call's
    ``call_denominators``): (its part of the reduced loss, of the z-loss term or None). With
    ``write_grad``, d out / d logits is written into ``logits`` in place, and d out / d
    probabilities into ``grad_target``, for ``grad_out`` (None: 1; one value, or the block's
    rows for ``none``); with ``stats`` (3, R), the rows' statistics for ``grad_from_stats``
    copied there. The LM head's chunks run through here (``linear_cross_entropy.py``).
    """
    x = logits.unsqueeze(0)
    scales = None
    if write_grad or grad_target is not None:
        scales = eager.upstream_scales(opts, denom, n_rows, grad_out, logits.device)
    if grad_target is None:
        loss, z, row_stats = row_losses(x, target, weight, opts,
                                        grad=x if write_grad else None, scales=scales)
        if stats is not None:
            stats.copy_(row_stats)
    else:
        loss, z, stats = row_losses(x, target, weight, opts)
        grad_from_stats(x, target, weight, stats, scales, opts, grad=x if write_grad else None,
                        grad_target=grad_target)
    return eager.reduce_rows(loss, z, opts, denom, n_rows)


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of logits ``x`` (outer, inner, C) (unit class stride) against class
    indices (outer * inner,) or probabilities (outer * inner, C); with ``columns``, of logits
    (outer, C, inner), contiguous, against class indices (outer * inner,) or probabilities
    (outer, C, inner), contiguous (``cross_entropy_nd``). Returns (loss, z-loss term); the
    second is for logging, not differentiable."""

    @staticmethod
    def forward(ctx, x, target, weight, opts: Options, columns: bool, out_dtype):
        nd = cross_entropy_nd if columns else None
        n_cols = x.shape[1] if columns else x.shape[2]
        n_rows = x.numel() // n_cols
        needs_x_grad = ctx.needs_input_grad[0]
        needs_t_grad = opts.prob_target and ctx.needs_input_grad[1]
        # The gradient in the forward pays off when the upstream gradient is one scalar.
        fused = (needs_x_grad and opts.reduction != "none" and not needs_t_grad
                 and may_fuse_gradient())
        denom = None
        if opts.reduction == "mean" and not opts.prob_target:
            denom = denominators(target, weight, opts.ignore_index, n_cols)
        grad = scales = None
        if fused:
            grad = x if opts.inplace_backward else torch.empty(x.shape, dtype=x.dtype,
                                                               device=x.device)
            scales = eager.upstream_scales(opts, denom, n_rows, None, x.device)
        losses = nd.row_losses if nd else row_losses
        loss, z, stats = losses(x, target, weight, opts, grad=grad, scales=scales)
        if fused and opts.inplace_backward:
            # The logits' storage now holds their gradient: any other node that saved them
            # fails its version check (torch's clear error) instead of using garbage.
            torch.autograd.graph.increment_version(x)
        out, z_out = eager.reduce_rows(loss, z, opts, denom, n_rows)
        if z_out is None:
            z_out = torch.zeros_like(out)

        ctx.grad = grad
        ctx.overwritten = fused and opts.inplace_backward
        ctx.opts, ctx.columns, ctx.n_rows = opts, columns, n_rows
        ctx.save_for_backward(None if ctx.overwritten else x, target, weight, stats, denom)
        z_out = output_as(z_out, out_dtype)
        ctx.mark_non_differentiable(z_out)
        return output_as(out, out_dtype), z_out

    @staticmethod
    def backward(ctx, grad_out, _grad_z):
        opts, columns = ctx.opts, ctx.columns
        x, target, weight, stats, denom = ctx.saved_tensors
        none = (None,) * 4
        if torch.is_grad_enabled():
            # create_graph=True: torch's ops, so that second derivatives are right (the
            # kernels' gradient would be a constant to autograd, its derivatives zero).
            ctx.grad = None
            if ctx.overwritten:
                raise RuntimeError("cross_entropy(..., inplace_backward=True) overwrote the "
                                   "logits with their gradient: create_graph=True needs them")

            def loss_fn(x, target):
                # the eager formula's layout: (N, C, d...) with the classes on dim 1
                if columns and not opts.prob_target:
                    target = target.view(x.shape[0], x.shape[2])
                elif not columns:
                    x = x.reshape(-1, x.shape[-1])
                return eager.cross_entropy_float(x, target, weight, opts)[0]

            return (*differentiable_backward(ctx.needs_input_grad[:2], grad_out, loss_fn, x,
                                             target), *none)
        if ctx.grad is not None:
            # First backward after a fused forward: the gradient is already there.
            grad_x, ctx.grad = ctx.grad, None
            scale_by_upstream_(grad_x, grad_out)
            return grad_x, None, *none
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, *none
        if ctx.overwritten:
            raise RuntimeError(
                "cross_entropy(..., inplace_backward=True) overwrote the logits with their "
                "gradient, so its graph cannot be run backward a second time; call it "
                "without inplace_backward to use retain_graph=True"
            )
        grad_x = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_x = (x if opts.inplace_backward
                      else torch.empty(x.shape, dtype=x.dtype, device=x.device))
        if ctx.needs_input_grad[1]:
            grad_t = torch.empty_like(target)
        scales = eager.upstream_scales(opts, denom, ctx.n_rows, grad_out, x.device)
        grads = cross_entropy_nd.grad_from_stats if columns else grad_from_stats
        grads(x, target, weight, stats, scales, opts, grad=grad_x, grad_target=grad_t)
        if opts.inplace_backward and grad_x is not None:
            torch.autograd.graph.increment_version(x)
        return grad_x, grad_t, *none


# ------------------------------------------------------------------------------------------
# entry point (arguments already validated by fused_losses.functional)
# ------------------------------------------------------------------------------------------


def _fold_rows(x: torch.Tensor) -> torch.Tensor:
    """A (outer, inner, C) view of ``x`` (class dimension last), copying only when the
    leading dimensions cannot be folded into two strided ones or the classes are strided."""
    n_cols = x.shape[-1]
    if x.stride(-1) != 1 and n_cols > 1:
        x = x.contiguous()
    merged: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        x = x.contiguous()
        merged = [[x.numel() // n_cols, n_cols]]
    sizes = [1] * (2 - len(merged)) + [size for size, _ in merged]
    return x.view(sizes[0], sizes[1], n_cols)


def cross_entropy(input, target, weight, opts: Options, out_dtype):
    """The kernels' (loss, z-loss term) for a validated call with at least one row and
    class, in ``out_dtype`` (torch's, which the caller works out)."""
    # Under torch.compile, AOTAutograd copies a tensor a graph writes to (and the logits'
    # version counter cannot be bumped): writing the gradient into them would save nothing.
    if opts.inplace_backward and torch.compiler.is_compiling():
        opts = opts._replace(inplace_backward=False)
    n_cols = input.shape[0] if input.dim() == 1 else input.shape[1]
    # A K-dimensional input laid out (N, C, d1, ..., dK) (classes strided) with few classes
    # runs in that layout; otherwise rows of classes with unit stride (copied if need be).
    columns = cross_entropy_nd.takes(input)
    if input.dim() == 1:
        x, loss_shape = input.unsqueeze(0), ()
    elif input.dim() == 2:
        x, loss_shape = input, (input.shape[0],)
    elif columns:
        x = input.view(input.shape[0], n_cols, -1)
        loss_shape = (input.shape[0], *input.shape[2:])
    else:
        x = input.movedim(1, -1)
        loss_shape = tuple(x.shape[:-1])
    if opts.prob_target and columns:
        t = target.reshape(x.shape).contiguous()
    elif opts.prob_target:
        t = target.unsqueeze(0) if target.dim() == 1 else target
        t = (t.movedim(1, -1) if t.dim() > 2 else t).reshape(-1, n_cols).contiguous()
    else:
        t = target.reshape(-1).contiguous()
    x, t, weight = detached_without_grad_mode(
        x if columns else _fold_rows(x), t, None if weight is None else weight.contiguous())
    loss, z = CrossEntropyFunction.apply(x, t, weight, opts, columns, out_dtype)
    if opts.reduction == "none":
        return loss.view(loss_shape), z.view(loss_shape)
    return loss, z
