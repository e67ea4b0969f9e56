"""Cross-entropy of K-dimensional inputs (N, C, d1, ..., dK) with few classes, in their layout.

Segmentation-style logits have their classes strided by d1 * ... * dK and their positions
contiguous. Reading them as rows of classes would need a transposed copy of the logits (and
of their gradient back). Instead, for a contiguous input of up to ``MAX_CLASSES`` classes, one
program takes a tile of every class x BLOCK_I consecutive positions, loads it coalesced along
the positions, and reduces over the classes (axis 0): the same arithmetic as the row kernels
(``_ce_math.py``, whose helpers reduce over axis 0 of a block or a tile alike), the tile held
in registers. The gradient is written in the input's layout: nothing is transposed or copied.

HBM traffic: read C logits per position (+ C probabilities), write C gradients per position
when the gradient is computed; 12-20 B of per-position results.

The autograd.Function and the entry point are ``cross_entropy.py``'s; this file provides its
two launchers for this layout, ``row_losses`` and ``grad_from_stats``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._ce_math import (
    block_stats,
    class_factors,
    class_target,
    flags,
    grad_block,
    grad_factors,
    logits,
    row_loss,
    softmax,
    target_grad_block,
)
from ._common import float32_scratch, launch, next_power_of_2, non_null

# Inputs of up to MAX_CLASSES classes run here: tiles of every class x TILE / C positions (16
# or more consecutive positions per class, so loads are coalesced along the positions).
MAX_CLASSES = 256
TILE = 4096
WARPS = 8


def takes(input: torch.Tensor) -> bool:
    """Whether an (N, C, d1, ..., dK) input runs in its own layout here."""
    return input.dim() > 2 and input.is_contiguous() and 1 < input.shape[1] <= MAX_CLASSES


@triton.jit
def _tile(n_cols, n_inner, n_inner_blocks, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's tile: the positions' index (into targets and per-position results), the
    classes, the tile's offsets in the (outer, C, inner) layout, and its masks."""
    pid = tl.program_id(0).to(tl.int64)
    outer = pid // n_inner_blocks
    inner = (pid - outer * n_inner_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_inner = inner < n_inner
    # int64: class x n_inner exceeds 2^31 for a 16-class 512^3 volume
    cols = tl.arange(0, BLOCK_C).to(tl.int64)[:, None]
    offs = outer * n_cols * n_inner + cols * n_inner + inner[None, :]
    return outer * n_inner + inner, in_inner, cols, offs, (cols < n_cols) & in_inner[None, :]


@triton.jit
def _targets(target_ptr, weight_ptr, pos, in_inner, n_cols, ignore_index,
             PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_I: tl.constexpr):
    """Each position's class target (-1 for probabilities), counted, out of range, weight."""
    if PROB_TARGET:
        y = tl.full([BLOCK_I], -1, tl.int64)
        ok = in_inner
        bad = in_inner & False
        w_y = tl.full([BLOCK_I], 1.0, tl.float32)
    else:
        y = tl.load(target_ptr + pos, mask=in_inner, other=0).to(tl.int64)
        y = tl.where(in_inner, y, ignore_index)
        ok, bad, w_y = class_target(y, weight_ptr, n_cols, ignore_index, HAS_WEIGHT)
    return y, ok, bad, w_y


@triton.jit
def _ce_nd_fwd_kernel(
    # pointers
    x_ptr,  # logits (n_outer, n_cols, n_inner), contiguous
    target_ptr,  # class indices (n_outer * n_inner,), or probabilities laid out like x
    weight_ptr,  # class weights (n_cols,)
    loss_ptr,  # out: float32 per-position loss
    z_ptr,  # out: float32 per-position z-loss term (when z_loss != 0)
    stats_ptr,  # out: float32 (3, n_rows): m~, log2 s, k
    grad_ptr,  # out (WRITE_GRAD): d loss / d logits, laid out like x (may be x itself)
    scale_ptr,  # in (WRITE_GRAD): float32 (2,) upstream factors
    # sizes
    n_rows,  # positions: n_outer * n_inner
    n_cols,
    n_inner,
    n_inner_blocks,
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
    BLOCK_C: tl.constexpr,  # all the classes: next power of two >= n_cols
    BLOCK_I: tl.constexpr,  # positions per program
):
    """Statistics, loss and z-loss term of BLOCK_I positions; with WRITE_GRAD the gradient."""
    pos, in_inner, cols, offs, in_tile = _tile(n_cols, n_inner, n_inner_blocks, BLOCK_C,
                                               BLOCK_I)
    y, ok, bad, w_y = _targets(target_ptr, weight_ptr, pos, in_inner, n_cols, ignore_index,
                               PROB_TARGET, HAS_WEIGHT, BLOCK_I)
    mask = in_tile & ok[None, :]  # ignored positions read no logits
    z = logits(x_ptr + offs, mask, logit_mult, softcap, SOFTCAP, "")
    m, e, s, a, k = block_stats(z, target_ptr + offs, weight_ptr + cols, mask, n_cols,
                                smoothing, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
    z_y = tl.sum(tl.where(cols == y[None, :], z, 0.0), axis=0)
    loss, z_term, m_safe, log2_s = row_loss(m, s, a, k, z_y, w_y, ok, bad, n_cols, smoothing,
                                            z_loss, PROB_TARGET, HAS_SMOOTHING)
    tl.store(loss_ptr + pos, loss, mask=in_inner)
    if z_loss != 0.0:
        tl.store(z_ptr + pos, z_term, mask=in_inner)
    tl.store(stats_ptr + pos, m_safe, mask=in_inner)
    tl.store(stats_ptr + n_rows + pos, log2_s, mask=in_inner)
    if PROB_TARGET or HAS_SMOOTHING:
        tl.store(stats_ptr + 2 * n_rows + pos, k, mask=in_inner)

    if WRITE_GRAD:
        hot, extra, kc = grad_factors(m_safe, log2_s, k, w_y, tl.load(scale_ptr),
                                      tl.load(scale_ptr + 1), n_cols, smoothing, PROB_TARGET,
                                      HAS_SMOOTHING)
        k_c = 0.0
        if PROB_TARGET or HAS_SMOOTHING:
            k_c = class_factors(target_ptr + offs, weight_ptr + cols, mask, n_cols, smoothing,
                                PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
        d = grad_block(e * (1.0 / s), z, cols, y, k_c, hot, extra, kc, ok, bad, logit_mult,
                       softcap, PROB_TARGET, PROB_TARGET or HAS_SMOOTHING, SOFTCAP)
        tl.store(grad_ptr + offs, d.to(grad_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _ce_nd_grad_kernel(
    # pointers
    x_ptr,  # logits (n_outer, n_cols, n_inner), contiguous
    target_ptr,  # class indices (n_outer * n_inner,), or probabilities laid out like x
    weight_ptr,  # class weights (n_cols,)
    stats_ptr,  # in: float32 (3, n_rows): m~, log2 s, k
    scale_ptr,  # in: float32 (2,) or (n_rows, 2) upstream factors
    grad_ptr,  # out: d loss / d logits, laid out like x (may be x itself)
    grad_target_ptr,  # out: d loss / d probabilities, laid out like x
    # sizes
    n_rows,
    n_cols,
    n_inner,
    n_inner_blocks,
    stride_scale,  # 0 (one upstream gradient) or 2 (one per position)
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
    X_GRAD: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """The gradient of BLOCK_I positions from their saved statistics."""
    pos, in_inner, cols, offs, in_tile = _tile(n_cols, n_inner, n_inner_blocks, BLOCK_C,
                                               BLOCK_I)
    y, ok, bad, w_y = _targets(target_ptr, weight_ptr, pos, in_inner, n_cols, ignore_index,
                               PROB_TARGET, HAS_WEIGHT, BLOCK_I)
    mask = in_tile & ok[None, :]
    m_safe = tl.load(stats_ptr + pos, mask=in_inner, other=0.0)
    log2_s = tl.load(stats_ptr + n_rows + pos, mask=in_inner, other=0.0)
    k = tl.zeros([BLOCK_I], tl.float32)
    if PROB_TARGET or HAS_SMOOTHING:
        k = tl.load(stats_ptr + 2 * n_rows + pos, mask=in_inner, other=0.0)
    scale = tl.load(scale_ptr + pos * stride_scale, mask=in_inner, other=0.0)
    z_scale = tl.load(scale_ptr + pos * stride_scale + 1, mask=in_inner, other=0.0)
    z = logits(x_ptr + offs, mask, logit_mult, softcap, SOFTCAP, "")
    k_c = 0.0
    if PROB_TARGET or HAS_SMOOTHING:
        k_c = class_factors(target_ptr + offs, weight_ptr + cols, mask, n_cols, smoothing,
                            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING)
    if X_GRAD:
        hot, extra, kc = grad_factors(m_safe, log2_s, k, w_y, scale, z_scale, n_cols,
                                      smoothing, PROB_TARGET, HAS_SMOOTHING)
        p = softmax(z, m_safe, log2_s)
        d = grad_block(p, z, cols, y, k_c, hot, extra, kc, ok, bad, logit_mult, softcap,
                       PROB_TARGET, PROB_TARGET or HAS_SMOOTHING, SOFTCAP)
        tl.store(grad_ptr + offs, d.to(grad_ptr.dtype.element_ty), mask=in_tile)
    if TARGET_GRAD:
        w_c = class_factors(target_ptr + offs, weight_ptr + cols, mask, n_cols, smoothing,
                            False, HAS_WEIGHT, False)
        dt = target_grad_block(z, m_safe[None, :], log2_s[None, :], w_c, scale, smoothing)
        tl.store(grad_target_ptr + offs, dt.to(grad_target_ptr.dtype.element_ty), mask=in_tile)


# ------------------------------------------------------------------------------------------
# launchers (x: (n_outer, C, n_inner), contiguous; the same contracts as cross_entropy.py's)
# ------------------------------------------------------------------------------------------


def _tiles(x: torch.Tensor) -> dict:
    n_outer, n_cols, n_inner = x.shape
    block_c = next_power_of_2(n_cols)
    block_i = min(next_power_of_2(n_inner), max(1, TILE // block_c))
    n_inner_blocks = triton.cdiv(n_inner, block_i)
    return dict(n_rows=n_outer * n_inner, n_cols=n_cols, n_inner=n_inner,
                n_inner_blocks=n_inner_blocks, BLOCK_C=block_c, BLOCK_I=block_i)


def row_losses(x, target, weight, opts, *, grad=None, scales=None):
    """Per-position loss, z-loss term (None without z-loss) and statistics (3, positions);
    with ``grad`` (laid out like x, or x itself) the gradient for ``scales`` too."""
    tiles = _tiles(x)
    n_rows = tiles["n_rows"]
    loss = float32_scratch(n_rows, x.device)
    z = float32_scratch(n_rows, x.device) if opts.z_loss else None
    stats = float32_scratch(3 * n_rows, x.device)
    launch(
        _ce_nd_fwd_kernel,
        (x.shape[0] * tiles["n_inner_blocks"],),
        writes=non_null(loss_ptr=loss, z_ptr=z, stats_ptr=stats, grad_ptr=grad),
        x_ptr=x,
        target_ptr=target,
        weight_ptr=weight if weight is not None else stats,
        loss_ptr=loss,
        z_ptr=z if z is not None else loss,
        stats_ptr=stats,
        grad_ptr=grad if grad is not None else x,
        scale_ptr=scales if scales is not None else stats,
        **tiles,
        z_loss=opts.z_loss,
        **flags(opts, weight),
        WRITE_GRAD=grad is not None,
        num_warps=WARPS,
    )
    return loss, z, stats.view(3, n_rows)


def grad_from_stats(x, target, weight, stats, scales, opts, *, grad=None,
                    grad_target=None) -> None:
    """Write d out / d x into ``grad`` and d out / d probabilities into ``grad_target``
    (both laid out like x) from the positions' statistics and upstream ``scales``."""
    tiles = _tiles(x)
    launch(
        _ce_nd_grad_kernel,
        (x.shape[0] * tiles["n_inner_blocks"],),
        writes=non_null(grad_ptr=grad, grad_target_ptr=grad_target),
        x_ptr=x,
        target_ptr=target,
        weight_ptr=weight if weight is not None else stats,
        stats_ptr=stats,
        scale_ptr=scales,
        grad_ptr=grad if grad is not None else x,
        grad_target_ptr=grad_target if grad_target is not None else x,
        **tiles,
        stride_scale=scales.stride(0) if scales.dim() == 2 else 0,
        **flags(opts, weight),
        X_GRAD=grad is not None,
        TARGET_GRAD=grad_target is not None,
        num_warps=WARPS,
    )
