"""Cross-entropy over class logits: kernels, launchers and the autograd.Function, top to bottom.

Design (see ../shared/PERFORMANCE.md, "Designs and what they move"):

- One program per row (a token, or a position of a K-dimensional input). Its log-sum-exp is
  computed online in one read pass over the row, in float32, with ``exp2``.
- ``mean``/``sum`` with an input that needs its gradient (the language-model case): the
  forward kernel writes the gradient right after the log-sum-exp, re-reading the row while it
  is still in L2 (the second pass runs backwards, so the blocks read last are re-read first,
  and eviction hints keep the row in L2 ahead of the gradient streaming out).
  Rows of up to ``SINGLE_BLOCK_MAX`` classes are held in registers instead: one read, one
  write. The backward then only scales that buffer by the upstream gradient, and a kernel
  that reads the upstream gradient on the device skips even that when it is 1.
  HBM traffic: logits read once (+ the L2 re-read), gradient written once.
- ``none``, a second backward (``retain_graph=True``), and gradients for probability targets
  keep the forward to the read pass and compute the gradient in the backward from the saved
  log-sum-exp (one more read of the logits; the per-row upstream gradient is known there).
- The mean's denominator (the summed weights of non-ignored targets) is computed on the device
  before the main kernel, so no value ever crosses to the host.

Rows are addressed as (outer, inner) pairs with their own strides, so a causal-LM shift view
``logits[:, :-1, :]`` or a channels-last K-dimensional input runs without a copy. The class
dimension must have unit stride there (it is copied otherwise), except for the usual
K-dimensional layout: a contiguous (N, C, d1, ..., dK) input of up to ``COLUMNS_MAX_CLASSES``
classes (segmentation) runs ``_ce_columns_kernel``, the same arithmetic over tiles of every
class x a block of consecutive positions, loaded along the positions, its gradient written in
the input's layout.

Out-of-range class targets on CUDA are not checked on the host (that would be a sync): the
row's loss and gradient are NaN instead, and so is a ``mean``. CPU targets are checked by
``fused_losses._validation`` and raise ``IndexError`` as torch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    LN2,
    LOG2E,
    check_same_device,
    detached_without_grad_mode,
    differentiable_backward,
    float32_scratch,
    launch,
    may_fuse_gradient,
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
# K-dimensional inputs (N, C, d1, ..., dK) of up to COLUMNS_MAX_CLASSES classes run in their own
# layout (_ce_columns_kernel): tiles of every class x COLUMNS_TILE / C positions, 16 or more
# consecutive positions per class, so loads are coalesced along the positions.
COLUMNS_MAX_CLASSES = 256
COLUMNS_TILE = 4096
COLUMNS_WARPS = 8
DENOM_BLOCK = 1024


@triton.jit
def _ce_denominator_kernel(
    # pointers
    target_ptr,
    weight_ptr,
    partial_ptr,
    # sizes
    n_rows,
    n_cols,
    # scalars
    ignore_index,
    # flags
    HAS_WEIGHT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Partial sums of the mean's denominator: weight (or 1) of every non-ignored target.

    read N targets (and N gathered weights), write N / BLOCK_SIZE partials.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offs < n_rows
    y = tl.load(target_ptr + offs, mask=in_bounds, other=0).to(tl.int64)
    counted = in_bounds & (y != ignore_index)
    in_range = (y >= 0) & (y < n_cols)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + y, mask=counted & in_range, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_SIZE], 1.0, tl.float32)
    # An out-of-range target makes the whole mean NaN: never a finite wrong loss.
    w = tl.where(counted, tl.where(in_range, w, float("nan")), 0.0)
    tl.store(partial_ptr + pid, tl.sum(w, axis=0))


@triton.jit
def _ce_class_target(y, weight_ptr, n_cols, ignore_index, HAS_WEIGHT: tl.constexpr):
    """For class index(es) ``y``: counted (in range, not ignored), out of range (the loss is
    NaN), and the class weight w_y (0 where not counted)."""
    valid = y != ignore_index
    ok = valid & (y >= 0) & (y < n_cols)
    bad = valid & ((y < 0) | (y >= n_cols))
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=ok, other=0.0).to(tl.float32)
    else:
        w_y = tl.where(ok, 1.0, 0.0)
    return ok, bad, w_y


@triton.jit
def _ce_class_coef(
    t_ptrs, weight_ptr, cols, mask, n_cols, smoothing,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    """Per-class factor of a row's loss: w_c * t'_c for probability targets (t' the smoothed
    target, at ``t_ptrs``), w_c for the label-smoothing term of class-index targets. Zero
    where masked. ``cols`` are class indices, of a block of one row or a tile of columns."""
    if HAS_WEIGHT:
        coef = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        coef = tl.where(mask, 1.0, 0.0)
    if PROB_TARGET:
        t = tl.load(t_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTHING:
            t = tl.where(mask, t * (1.0 - smoothing) + smoothing / n_cols, 0.0)
        coef = coef * t
    return coef


@triton.jit
def _ce_grad_block(
    # the block: softmax, logits, class indices, load mask, store mask
    p, x, cols, mask, in_row,
    # pointers to the block's targets, gradients, target gradients; the class weights
    t_ptrs, g_ptrs, gt_ptrs, weight_ptr,
    # per-row values (broadcast against the block)
    y, w_y, m, log2_s, tsum, smooth_w, scale, ok, bad, n_cols, smoothing,
    # flags
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    X_GRAD: tl.constexpr, TARGET_GRAD: tl.constexpr, WRITE_EVICT: tl.constexpr,
):
    """Write d loss / d logits (and d loss / d probabilities) for one block of a row (or a
    tile of columns), given its softmax ``p``:

    class targets:        w_y (p_c - [c = y])                                (no smoothing)
                          p_c ((1-e) w_y + e W / C) - (1-e) w_y [c = y] - e w_c / C
    probability targets:  p_c S - w_c t'_c,  S = sum_c w_c t'_c;  d/dt_c = -(1-e) w_c log p_c
    """
    coef = 0.0
    if PROB_TARGET or HAS_SMOOTHING:
        coef = _ce_class_coef(t_ptrs, weight_ptr, cols, mask, n_cols, smoothing,
                              PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
    if X_GRAD:
        if PROB_TARGET:
            d = (p * tsum - coef) * scale
        else:
            hit = tl.where(cols == y, 1.0, 0.0)
            if HAS_SMOOTHING:
                w_hot = (1.0 - smoothing) * w_y
                d = (p * (w_hot + smoothing * smooth_w / n_cols) - w_hot * hit
                     - smoothing * coef / n_cols)
            else:
                d = w_y * (p - hit)
            # Ignored rows get exactly zero (even when the mean's denominator is 0, as
            # torch), out-of-range targets NaN.
            d = tl.where(ok, d * scale, tl.where(bad, float("nan"), 0.0))
        tl.store(g_ptrs, d.to(g_ptrs.dtype.element_ty), mask=in_row,
                 eviction_policy=WRITE_EVICT)
    if TARGET_GRAD:
        w_c = _ce_class_coef(t_ptrs, weight_ptr, cols, mask, n_cols, smoothing,
                             False, HAS_WEIGHT, False)
        log_p = (x - m) - log2_s * LN2
        dt = (smoothing - 1.0) * w_c * log_p * scale
        tl.store(gt_ptrs, dt.to(gt_ptrs.dtype.element_ty), mask=in_row,
                 eviction_policy=WRITE_EVICT)


@triton.jit
def _ce_kernel(
    # pointers
    x_ptr,  # logits: rows of n_cols, unit class stride, row = (outer, inner)
    target_ptr,  # class indices (n_rows,) or probabilities (n_rows, n_cols), contiguous
    weight_ptr,  # class weights (n_cols,)
    loss_ptr,  # out: float32 per-row loss (forward)
    stats_ptr,  # out (forward) / in (backward): float32 (2, n_rows): row max, log2(sum exp)
    tsum_ptr,  # out (forward) / in (backward): float32 per-row sum_c w_c t'_c (prob targets)
    grad_ptr,  # out: d loss / d logits in the logits' dtype, rows like x_ptr's
    grad_target_ptr,  # out: d loss / d probabilities (n_rows, n_cols), contiguous
    denom_ptr,  # in: the mean's denominator (device scalar)
    weight_sum_ptr,  # in: sum of the class weights (smoothing with weights)
    grad_out_ptr,  # in: upstream gradient, one scalar or one per row
    # sizes
    n_cols,
    n_inner,
    n_rows,
    # strides, in elements
    stride_x_outer,
    stride_x_inner,
    stride_g_outer,
    stride_g_inner,
    stride_grad_out,
    # scalars
    ignore_index,
    smoothing,
    grad_scale,
    # flags
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,  # forward: log-sum-exp and loss; else load the saved stats
    X_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    READ_EVICT: tl.constexpr,  # eviction policies ("" is the default): pass 1's loads,
    REREAD_EVICT: tl.constexpr,  # pass 2's loads,
    WRITE_EVICT: tl.constexpr,  # and the gradients' stores
):
    # int64 row offsets: 16k rows x 262k classes is over 2^32 elements.
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row - outer * n_inner
    x_row = x_ptr + outer * stride_x_outer + inner * stride_x_inner
    g_row = grad_ptr + outer * stride_g_outer + inner * stride_g_inner
    t_row = target_ptr + row * n_cols
    offs = tl.arange(0, BLOCK_SIZE)

    # The row's target. Ignored rows and out-of-range targets read no logits (n_read = 0).
    if PROB_TARGET:
        y = -1
        w_y = 1.0
        ok = True
        bad = False
        n_read = n_cols
    else:
        y = tl.load(target_ptr + row).to(tl.int64)
        ok, bad, w_y = _ce_class_target(y, weight_ptr, n_cols, ignore_index, HAS_WEIGHT)
        n_read = tl.where(ok, n_cols, 0)
    smooth_w = n_cols * 1.0  # sum of the class weights W (C without weights)
    if HAS_SMOOTHING and HAS_WEIGHT and not PROB_TARGET:
        smooth_w = tl.load(weight_sum_ptr)

    # ---- pass 1 (forward): online log-sum-exp, and the sums the loss needs ----------------
    # The log-sum-exp is kept as (m, log2 s): softmax = exp2((x - m) log2e - log2 s) and
    # lse - x = (m - x) + ln s stay exact for huge logits, where m + ln s would absorb ln s.
    # Sums are taken relative to a logit of the row (``ref``) so that W lse - sum_c w_c x_c
    # does not cancel catastrophically when all logits are large (the loss is shift-invariant).
    # read n_cols (+ n_cols targets for probability targets)
    if COMPUTE_LSE:
        acc_x = 0.0  # sum_c coef_c (x_c - ref)
        tsum = 0.0  # sum_c coef_c (probability targets: S)
        if SINGLE_BLOCK:
            mask = offs < n_read
            x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            m = tl.max(x, axis=0)
            m = tl.where(m == float("-inf"), 0.0, m)  # an empty or all -inf row: no NaN
            ref = m
            e = tl.exp2((x - m) * LOG2E)
            s = tl.sum(e, axis=0)
            if PROB_TARGET or HAS_SMOOTHING:
                coef = _ce_class_coef(t_row + offs, weight_ptr, offs, mask, n_cols, smoothing,
                                      PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
                acc_x = tl.sum(tl.where(mask, coef * (x - ref), 0.0), axis=0)
                tsum = tl.sum(coef, axis=0)
        else:
            ref = tl.load(x_row, mask=n_read > 0, other=0.0).to(tl.float32)
            m = float("-inf")
            s = 0.0
            for start in range(0, n_read, BLOCK_SIZE):
                cols = start + offs
                mask = cols < n_read
                x = tl.load(x_row + cols, mask=mask, other=float("-inf"),
                            eviction_policy=READ_EVICT).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                # a row that is -inf so far must not produce (-inf) - (-inf) = NaN
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp2((m - m_safe) * LOG2E) + tl.sum(tl.exp2((x - m_safe) * LOG2E), 0)
                m = m_new
                if PROB_TARGET or HAS_SMOOTHING:
                    coef = _ce_class_coef(t_row + cols, weight_ptr, cols, mask, n_cols,
                                          smoothing, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
                    acc_x += tl.sum(tl.where(mask, coef * (x - ref), 0.0), axis=0)
                    tsum += tl.sum(coef, axis=0)
            m = tl.where(m == float("-inf"), 0.0, m)
        log2_s = tl.log2(s)
        lse_ref = (m - ref) + log2_s * LN2  # lse - ref

        if PROB_TARGET:
            loss = tsum * lse_ref - acc_x  # sum_c w_c t'_c (lse - x_c)
            tl.store(tsum_ptr + row, tsum)
        else:
            x_y = tl.load(x_row + y, mask=ok, other=0.0).to(tl.float32)
            loss = w_y * (lse_ref - (x_y - ref))
            if HAS_SMOOTHING:
                smooth = smooth_w * lse_ref - acc_x  # sum_c w_c (lse - x_c)
                loss = (1.0 - smoothing) * loss + smoothing / n_cols * smooth
            loss = tl.where(ok, loss, tl.where(bad, float("nan"), 0.0))
            # ignored rows: finite statistics, so their softmax below is exactly zero
            m = tl.where(ok, m, 0.0)
            log2_s = tl.where(ok, log2_s, 0.0)
        tl.store(loss_ptr + row, loss)
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + n_rows + row, log2_s)
    else:
        m = tl.load(stats_ptr + row)
        log2_s = tl.load(stats_ptr + n_rows + row)
        if PROB_TARGET:
            tsum = tl.load(tsum_ptr + row)
        else:
            tsum = 0.0

    # ---- pass 2: the gradient ------------------------------------------------------------
    # write n_cols (+ n_cols for the target gradient); read n_cols unless held in registers
    if X_GRAD or TARGET_GRAD:
        gt_row = grad_target_ptr + row * n_cols
        scale = grad_scale
        if HAS_DENOM:
            scale = scale / tl.load(denom_ptr)
        if HAS_GRAD_OUT:
            scale = scale * tl.load(grad_out_ptr + row * stride_grad_out).to(tl.float32)
        if SINGLE_BLOCK:
            mask = offs < n_read
            if COMPUTE_LSE:
                p = e * (1.0 / s)  # the exponentials of pass 1, still in registers
            else:
                x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                p = tl.exp2((x - m) * LOG2E - log2_s)
            _ce_grad_block(p, x, offs, mask, offs < n_cols, t_row + offs, g_row + offs,
                           gt_row + offs, weight_ptr, y, w_y, m, log2_s, tsum, smooth_w, scale,
                           ok, bad, n_cols, smoothing,
                           PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, X_GRAD, TARGET_GRAD,
                           WRITE_EVICT)
        else:
            # Backwards over the row: the blocks pass 1 read last are the likeliest in L2.
            n_blocks = tl.cdiv(n_cols, BLOCK_SIZE)
            for i in range(0, n_blocks):
                cols = (n_blocks - 1 - i) * BLOCK_SIZE + offs
                mask = cols < n_read
                x = tl.load(x_row + cols, mask=mask, other=float("-inf"),
                            eviction_policy=REREAD_EVICT).to(tl.float32)
                p = tl.exp2((x - m) * LOG2E - log2_s)
                _ce_grad_block(p, x, cols, mask, cols < n_cols, t_row + cols, g_row + cols,
                               gt_row + cols, weight_ptr, y, w_y, m, log2_s, tsum, smooth_w,
                               scale, ok, bad, n_cols, smoothing,
                               PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, X_GRAD, TARGET_GRAD,
                               WRITE_EVICT)


@triton.jit
def _ce_columns_kernel(
    # pointers
    x_ptr,  # logits (n_outer, n_cols, n_inner), any strides: the K-dimensional layout
    target_ptr,  # class indices (n_outer * n_inner,), contiguous; or probabilities like x
    weight_ptr,  # class weights (n_cols,)
    loss_ptr,  # out: float32 per-position loss (forward)
    stats_ptr,  # out (forward) / in (backward): float32 (2, n_rows): max, log2(sum exp)
    tsum_ptr,  # out (forward) / in (backward): float32 per-position sum_c w_c t'_c
    grad_ptr,  # out: d loss / d logits, (n_outer, n_cols, n_inner) with the strides stride_g_*
    grad_target_ptr,  # out: d loss / d probabilities, laid out like grad_ptr
    denom_ptr,  # in: the mean's denominator (device scalar)
    weight_sum_ptr,  # in: sum of the class weights (smoothing with weights)
    grad_out_ptr,  # in: upstream gradient, one scalar or one per position
    # sizes
    n_cols,
    n_inner,
    n_rows,  # positions: n_outer * n_inner
    n_inner_blocks,
    # strides, in elements
    stride_x_outer,
    stride_x_col,
    stride_x_inner,
    stride_t_outer,
    stride_t_col,
    stride_t_inner,
    stride_g_outer,
    stride_g_col,
    stride_g_inner,
    stride_grad_out,
    # scalars
    ignore_index,
    smoothing,
    grad_scale,
    # flags
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_LSE: tl.constexpr,
    X_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr,
    BLOCK_C: tl.constexpr,  # all the classes: next power of two >= n_cols
    BLOCK_I: tl.constexpr,  # positions per program
):
    """_ce_kernel for few classes of a K-dimensional input, read in its own layout.

    An (N, C, d1, ..., dK) input has its classes strided by d1 * ... * dK and its positions
    contiguous, so one program takes a BLOCK_C x BLOCK_I tile (every class of BLOCK_I
    consecutive positions), loads it coalesced along the positions, and reduces over the
    classes (axis 0). The gradient is written in the same layout: nothing is transposed or
    copied. The formulas are _ce_kernel's (single block: the tile is held in registers).

    read n_cols per position (+ n_cols targets for probabilities); write n_cols per position
    when the gradient is computed; write or read 2-3 float32 per position.
    """
    pid = tl.program_id(0).to(tl.int64)
    outer = pid // n_inner_blocks
    inner = (pid - outer * n_inner_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_inner = inner < n_inner
    row = outer * n_inner + inner  # position index: targets, losses and statistics
    # int64: class x class stride exceeds 2^31 for a 16-class 512^3 volume
    cols = tl.arange(0, BLOCK_C).to(tl.int64)[:, None]
    in_tile = (cols < n_cols) & in_inner[None, :]
    x_ptrs = x_ptr + outer * stride_x_outer + cols * stride_x_col + inner[None, :] * stride_x_inner
    t_ptrs = (target_ptr + outer * stride_t_outer + cols * stride_t_col
              + inner[None, :] * stride_t_inner)

    # Each position's target. Ignored positions and out-of-range targets read no logits.
    if PROB_TARGET:
        y = tl.full([BLOCK_I], -1, tl.int64)
        w_y = tl.full([BLOCK_I], 1.0, tl.float32)
        ok = in_inner
        bad = in_inner & False
    else:
        y = tl.load(target_ptr + row, mask=in_inner, other=ignore_index).to(tl.int64)
        ok, bad, w_y = _ce_class_target(y, weight_ptr, n_cols, ignore_index, HAS_WEIGHT)
    mask = in_tile & ok[None, :]
    smooth_w = n_cols * 1.0
    if HAS_SMOOTHING and HAS_WEIGHT and not PROB_TARGET:
        smooth_w = tl.load(weight_sum_ptr)

    # ---- the log-sum-exp of every position of the tile (pass 1 of _ce_kernel) ------------
    if COMPUTE_LSE:
        x = tl.load(x_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # ignored positions: no NaN
        e = tl.exp2((x - m[None, :]) * LOG2E)
        s = tl.sum(e, axis=0)
        log2_s = tl.log2(s)
        lse_ref = log2_s * LN2  # lse - m
        tsum = tl.zeros([BLOCK_I], tl.float32)
        acc_x = tl.zeros([BLOCK_I], tl.float32)
        if PROB_TARGET or HAS_SMOOTHING:
            coef = _ce_class_coef(t_ptrs, weight_ptr, cols, mask, n_cols, smoothing,
                                  PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
            acc_x = tl.sum(tl.where(mask, coef * (x - m[None, :]), 0.0), axis=0)
            tsum = tl.sum(coef, axis=0)
        if PROB_TARGET:
            loss = tsum * lse_ref - acc_x
            tl.store(tsum_ptr + row, tsum, mask=in_inner)
        else:
            x_y = tl.sum(tl.where(cols == y[None, :], x, 0.0), axis=0)
            loss = w_y * (lse_ref - (x_y - m))
            if HAS_SMOOTHING:
                loss = (1.0 - smoothing) * loss + smoothing / n_cols * (smooth_w * lse_ref - acc_x)
            loss = tl.where(ok, loss, tl.where(bad, float("nan"), 0.0))
            m = tl.where(ok, m, 0.0)
            log2_s = tl.where(ok, log2_s, 0.0)
        tl.store(loss_ptr + row, loss, mask=in_inner)
        tl.store(stats_ptr + row, m, mask=in_inner)
        tl.store(stats_ptr + n_rows + row, log2_s, mask=in_inner)
    else:
        m = tl.load(stats_ptr + row, mask=in_inner, other=0.0)
        log2_s = tl.load(stats_ptr + n_rows + row, mask=in_inner, other=0.0)
        if PROB_TARGET:
            tsum = tl.load(tsum_ptr + row, mask=in_inner, other=0.0)
        else:
            tsum = tl.zeros([BLOCK_I], tl.float32)

    # ---- the gradient --------------------------------------------------------------------
    if X_GRAD or TARGET_GRAD:
        scale = tl.full([BLOCK_I], grad_scale, tl.float32)
        if HAS_DENOM:
            scale = scale / tl.load(denom_ptr)
        if HAS_GRAD_OUT:
            g_out = tl.load(grad_out_ptr + row * stride_grad_out, mask=in_inner, other=0.0)
            scale = scale * g_out.to(tl.float32)
        if COMPUTE_LSE:
            p = e * (1.0 / s)[None, :]
        else:
            x = tl.load(x_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
            p = tl.exp2((x - m[None, :]) * LOG2E - log2_s[None, :])
        g_offs = outer * stride_g_outer + cols * stride_g_col + inner[None, :] * stride_g_inner
        _ce_grad_block(p, x, cols, mask, in_tile, t_ptrs, grad_ptr + g_offs,
                       grad_target_ptr + g_offs, weight_ptr, y[None, :], w_y[None, :],
                       m[None, :], log2_s[None, :], tsum[None, :], smooth_w, scale[None, :],
                       ok[None, :], bad[None, :], n_cols, smoothing,
                       PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, X_GRAD, TARGET_GRAD, "")


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------


def block_config(n_cols: int) -> tuple[int, int, bool]:
    """(BLOCK_SIZE, num_warps, SINGLE_BLOCK) for rows of ``n_cols`` classes."""
    block = next_power_of_2(n_cols)
    if block <= SINGLE_BLOCK_MAX:
        return block, num_warps_for(block, elems_per_thread=32), True
    return LOOP_BLOCK, LOOP_WARPS, False


def _denominator(target, weight, n_cols, ignore_index):
    """Device scalar: summed weights (or count) of the non-ignored targets, NaN if any is
    out of range. Fixed-order partial sums, so it is bitwise reproducible."""
    n_rows = target.numel()
    partial = float32_scratch(triton.cdiv(n_rows, DENOM_BLOCK), target.device)
    launch(
        _ce_denominator_kernel,
        (partial.numel(),),
        writes=("partial_ptr",),
        target_ptr=target,
        weight_ptr=weight if weight is not None else target,
        partial_ptr=partial,
        n_rows=n_rows,
        n_cols=n_cols,
        ignore_index=ignore_index,
        HAS_WEIGHT=weight is not None,
        BLOCK_SIZE=DENOM_BLOCK,
    )
    return partial.sum()


def _launch_ce(
    x, target, weight, *, loss, stats, tsum, grad, grad_target, denom, weight_sum, grad_out,
    ignore_index, smoothing, grad_scale, prob_target, compute_lse, columns,
):
    """One launch of ``_ce_kernel`` over rows x (n_outer, n_inner, C) or, with ``columns``,
    of ``_ce_columns_kernel`` over x (n_outer, C, n_inner), contiguous, with its gradients
    (and the probability targets) laid out like it."""
    if columns:
        n_outer, n_cols, n_inner = x.shape
    else:
        n_outer, n_inner, n_cols = x.shape
    dummy = stats  # any tensor: pointers of disabled features are never dereferenced
    common = dict(
        writes=non_null(loss_ptr=loss, stats_ptr=stats if compute_lse else None,
                        tsum_ptr=tsum if compute_lse and prob_target else None, grad_ptr=grad,
                        grad_target_ptr=grad_target),
        x_ptr=x,
        target_ptr=target,
        weight_ptr=weight if weight is not None else dummy,
        loss_ptr=loss if loss is not None else dummy,
        stats_ptr=stats,
        tsum_ptr=tsum,
        grad_target_ptr=grad_target if grad_target is not None else dummy,
        denom_ptr=denom if denom is not None else dummy,
        weight_sum_ptr=weight_sum if weight_sum is not None else dummy,
        grad_out_ptr=grad_out if grad_out is not None else dummy,
        n_cols=n_cols,
        n_inner=n_inner,
        n_rows=n_outer * n_inner,
        stride_grad_out=grad_out.stride(0) if grad_out is not None and grad_out.dim() else 0,
        ignore_index=ignore_index,
        smoothing=smoothing,
        grad_scale=grad_scale,
        PROB_TARGET=prob_target,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=smoothing > 0.0,
        COMPUTE_LSE=compute_lse,
        X_GRAD=grad is not None,
        TARGET_GRAD=grad_target is not None,
        HAS_DENOM=denom is not None,
        HAS_GRAD_OUT=grad_out is not None,
    )
    if columns:
        block_c = next_power_of_2(n_cols)
        block_i = min(next_power_of_2(n_inner), max(1, COLUMNS_TILE // block_c))
        n_inner_blocks = triton.cdiv(n_inner, block_i)
        g = x  # the gradients are contiguous like x
        t = target if prob_target else x
        launch(
            _ce_columns_kernel,
            (n_outer * n_inner_blocks,),
            grad_ptr=grad if grad is not None else dummy,
            n_inner_blocks=n_inner_blocks,
            stride_x_outer=x.stride(0),
            stride_x_col=x.stride(1),
            stride_x_inner=x.stride(2),
            stride_t_outer=t.stride(0),
            stride_t_col=t.stride(1),
            stride_t_inner=t.stride(2),
            stride_g_outer=g.stride(0),
            stride_g_col=g.stride(1),
            stride_g_inner=g.stride(2),
            BLOCK_C=block_c,
            BLOCK_I=block_i,
            num_warps=COLUMNS_WARPS,
            **common,
        )
        return

    block, num_warps, single = block_config(n_cols)
    g = grad if grad is not None else x
    rereads = not single and compute_lse and (grad is not None or grad_target is not None)
    read_evict, reread_evict = ("evict_last", "evict_first") if rereads and L2_HINTS else ("", "")
    launch(
        _ce_kernel,
        (n_outer * n_inner,),
        grad_ptr=g,
        stride_x_outer=x.stride(0),
        stride_x_inner=x.stride(1),
        stride_g_outer=g.stride(0),
        stride_g_inner=g.stride(1),
        SINGLE_BLOCK=single,
        BLOCK_SIZE=block,
        READ_EVICT=read_evict,
        REREAD_EVICT=reread_evict,
        WRITE_EVICT=reread_evict,
        num_warps=num_warps,
        **common,
    )


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of logits ``x`` of shape (outer, inner, C) (unit class stride) against
    class indices (outer * inner,) or probabilities (outer * inner, C); with ``columns``, of
    logits (outer, C, inner), contiguous, against class indices (outer * inner,) or
    probabilities (outer, C, inner), contiguous."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, reduction, smoothing, prob_target,
                inplace_backward, out_dtype, columns):
        if columns:
            n_outer, n_cols, n_inner = x.shape
        else:
            n_outer, n_inner, n_cols = x.shape
        n_rows = n_outer * n_inner
        device = x.device
        needs_x_grad = ctx.needs_input_grad[0]
        needs_t_grad = prob_target and ctx.needs_input_grad[1]
        # The gradient in the forward pays off when the upstream gradient is one scalar.
        fused = needs_x_grad and reduction != "none" and not needs_t_grad and may_fuse_gradient()

        loss = float32_scratch(n_rows, device)
        stats = float32_scratch(2 * n_rows, device)  # row max, log2(sum exp)
        tsum = float32_scratch(n_rows, device) if prob_target else stats
        denom = None
        grad_scale = 1.0
        if reduction == "mean":
            if prob_target:
                grad_scale = 1.0 / n_rows  # torch divides by the number of rows here
            else:
                denom = _denominator(target, weight, n_cols, ignore_index)
        weight_sum = None
        if weight is not None and smoothing > 0.0 and not prob_target:
            weight_sum = weight.sum(dtype=torch.float32)

        grad = None
        if fused:
            grad = x if inplace_backward else torch.empty(x.shape, dtype=x.dtype, device=device)
        _launch_ce(
            x, target, weight, loss=loss, stats=stats, tsum=tsum, grad=grad, grad_target=None,
            denom=denom, weight_sum=weight_sum, grad_out=None, ignore_index=ignore_index,
            smoothing=smoothing, grad_scale=grad_scale, prob_target=prob_target,
            compute_lse=True, columns=columns,
        )
        if fused and inplace_backward:
            # The logits' storage now holds their gradient: any other node that saved them
            # fails its version check (torch's clear error) instead of using garbage.
            torch.autograd.graph.increment_version(x)

        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        elif prob_target:
            out = loss.sum() / n_rows
        else:
            out = loss.sum() / denom

        ctx.grad = grad
        ctx.overwritten = fused and inplace_backward
        ctx.meta = (ignore_index, reduction, smoothing, prob_target, inplace_backward, grad_scale,
                    columns)
        ctx.save_for_backward(
            None if ctx.overwritten else x, target, weight, stats, tsum, denom, weight_sum
        )
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        ignore_index, reduction, smoothing, prob_target, inplace, grad_scale, columns = ctx.meta
        x, target, weight, stats, tsum, denom, weight_sum = ctx.saved_tensors
        grad_x = grad_t = None
        if torch.is_grad_enabled():
            # create_graph=True: torch's ops, so that second derivatives are right (the
            # kernels' gradient would be a constant to autograd, its derivatives zero).
            ctx.grad = None
            if ctx.overwritten:
                raise RuntimeError("cross_entropy(..., inplace_backward=True) overwrote the "
                                   "logits with their gradient: create_graph=True needs them")

            def loss_fn(x, target):
                return _torch_cross_entropy(x, target, weight, ignore_index, reduction,
                                            smoothing, prob_target, columns)

            return (*differentiable_backward(ctx.needs_input_grad[:2], grad_out, loss_fn, x,
                                             target), None, None, None, None, None, None, None,
                    None)
        if ctx.grad is not None:
            # First backward after a fused forward: the gradient is already there.
            grad_x, ctx.grad = ctx.grad, None
            scale_by_upstream_(grad_x, grad_out)
        elif ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if ctx.overwritten:
                raise RuntimeError(
                    "cross_entropy(..., inplace_backward=True) overwrote the logits with their "
                    "gradient, so its graph cannot be run backward a second time; call it "
                    "without inplace_backward to use retain_graph=True"
                )
            if ctx.needs_input_grad[0]:
                grad_x = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
            else:
                grad_x = None
            if ctx.needs_input_grad[1]:
                grad_t = torch.empty_like(target)
            _launch_ce(
                x, target, weight, loss=None, stats=stats, tsum=tsum,
                grad=grad_x,
                grad_target=grad_t, denom=denom, weight_sum=weight_sum,
                grad_out=grad_out, ignore_index=ignore_index, smoothing=smoothing,
                grad_scale=grad_scale, prob_target=prob_target, compute_lse=False,
                columns=columns,
            )
            if inplace and grad_x is not None:
                torch.autograd.graph.increment_version(x)
        return grad_x, grad_t, None, None, None, None, None, None, None, None


def _torch_cross_entropy(x, target, weight, ignore_index, reduction, smoothing, prob_target,
                         columns):
    """The loss of CrossEntropyFunction's arguments in torch's ops (float32), for a
    differentiable backward. Out-of-range class targets give NaN as the kernels do, never an
    out-of-bounds read: torch sees them as ignored, then their rows are set to NaN."""
    if columns:  # (outer, C, inner): rows last, as the row layout has them
        x = x.movedim(1, -1)
        target = target.movedim(1, -1).reshape(-1, x.shape[-1]) if prob_target else target
    x = x.reshape(-1, x.shape[-1]).float()
    weight = None if weight is None else weight.float()
    if prob_target:
        return F.cross_entropy(x, target.float(), weight, reduction=reduction,
                               label_smoothing=smoothing)
    target = target.long()
    bad = (target != ignore_index) & ((target < 0) | (target >= x.shape[-1]))
    loss = F.cross_entropy(x, torch.where(bad, ignore_index, target), weight,
                           ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=smoothing)
    nan = torch.tensor(float("nan"), device=x.device)
    return torch.where(bad if reduction == "none" else bad.any(), nan, loss)


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


def cross_entropy(input, target, weight, ignore_index, reduction, smoothing, prob_target,
                  inplace_backward, out_dtype):
    """The kernels' cross-entropy for a validated call with at least one row and class,
    its result in ``out_dtype`` (torch's, which the caller works out)."""
    check_same_device(input, target=target, weight=weight)
    # Under torch.compile, AOTAutograd copies a tensor a graph writes to (and the logits'
    # version counter cannot be bumped): writing the gradient into them would save nothing.
    inplace_backward = inplace_backward and not torch.compiler.is_compiling()
    n_cols = input.shape[0] if input.dim() == 1 else input.shape[1]
    # A K-dimensional input laid out (N, C, d1, ..., dK) (classes strided) with few classes
    # runs in that layout; otherwise rows of classes with unit stride (copied if need be).
    columns = (input.dim() > 2 and input.is_contiguous() and n_cols > 1
               and n_cols <= COLUMNS_MAX_CLASSES)
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
    if prob_target and columns:
        t = target.reshape(x.shape).contiguous()
    elif prob_target:
        t = target.unsqueeze(0) if target.dim() == 1 else target
        t = (t.movedim(1, -1) if t.dim() > 2 else t).reshape(-1, n_cols).contiguous()
    else:
        t = target.reshape(-1).contiguous()
    x, t, weight = detached_without_grad_mode(
        x if columns else _fold_rows(x), t, None if weight is None else weight.contiguous())
    loss = CrossEntropyFunction.apply(
        x, t, weight, ignore_index, reduction, smoothing, prob_target, inplace_backward,
        out_dtype, columns,
    )
    return loss.view(loss_shape) if reduction == "none" else loss
