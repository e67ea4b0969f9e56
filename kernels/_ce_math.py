"""The cross-entropy's arithmetic, as @triton.jit helpers every cross-entropy kernel shares.

A row's **statistics** over a range of its classes (a block of a row, a split of a long row
among programs, a tensor-parallel rank's shard of the vocabulary):

    m  the max of the (softcapped) logits z_c, -inf when there are none
    s  sum_c exp(z_c - m~)                     m~ = m, or 0 where m = -inf (no -inf - -inf)
    a  sum_c k_c (z_c - m~)                    k_c: w_c for the label-smoothing term of class
    k  sum_c k_c                                    targets, w_c t'_c for probability targets

Sums are taken relative to the range's own max, so they are exact for huge logits and combine
exactly (``merge_stats``): a row's statistics are the merge of its blocks', of its splits', or
of every rank's. The loss of a row then needs only them and the target's logit z_y:

    lse  = m~ + ln s
    loss = (1 - e) w_y (lse - z_y) + e / C (k ln s - a)      class targets, smoothing e
         = k ln s - a                                        probability targets (k = S)
    z    = z_loss lse^2                                      PaLM's auxiliary z-loss

and its gradient with respect to z_c, with p_c = exp(z_c - lse), is

    hot (p_c - [c = y]) + extra p_c - kc k_c

with per-row factors from ``grad_factors``. The logits' transform (a logit scale, Gemma 2/3's
softcapping z = cap tanh(x / cap), a temperature) is applied as the logits are loaded and its
derivative at the end (``logits``, ``times_slope``): each option in one place.

**Log-probabilities and entropy** (RL from the LM head) take one more statistic, which merges
exactly like the others (``entropy_stat``, ``merge_entropy_stat``):

    b  sum_c exp(z_c - m~) (z_c - m~)          (<= 0)

    log p_y = (z_y - m~) - ln s                (<= 0: z_y <= m and s >= 1)
    H       = -sum_c p_c log p_c = ln s - b / s (two terms >= 0: no cancellation)

and their gradients with respect to z_c, for upstream gradients g (of log p_y) and g_H (of H),

    g ([c = y] - p_c) - g_H p_c (log p_c + H)    (``log_prob_grad_block``)

TRL 1.16's other per-token statistics, on request (no gradient, as TRL's), each from one more
statistic of the same pass that merges exactly:

    q  sum_c exp(z_c - m~)^2                   merged as s, the rescale squared
    Z  sum_c z_c                               a plain sum (merged by adding)
    j  the first class with z_j = m            merged by the larger max; on a tie, the
                                               smaller index (``argmax``'s first maximum)

    log sum_c p_c^2 = ln q - 2 ln s            (<= 0)
    mean logit      = Z / C
    is top-1        = [j = y]                  (TRL's: z_y = m, no earlier class equals it)

The logits are transformed as TRL's (scale, softcap, temperature), for every loss here:
z = softcap tanh(x scale / softcap) / T, which is softcap' tanh(x mult / softcap') with
mult = scale / T and softcap' = softcap / T: one multiply before the softcap, and
d z / d x = mult (1 - (z / softcap')^2) (``scaled``, ``times_slope``; the host side in
``transform``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LN2, LOG2E

TWO_LOG2E = tl.constexpr(2.8853900817779268)  # exp(-2u) = exp2(-2u log2 e)


@triton.jit
def softcapped(x, softcap):
    """softcap * tanh(x / softcap), to float32 precision.

    tanh is built on one exp2 (the interpreter has no libdevice): for |u| >= 1/4,
    (1 - e) / (1 + e) with e = exp(-2|u|) has no cancellation; below, the odd series to u^9
    (relative error < 1e-8 there).
    """
    u = x / softcap
    a = tl.abs(u)
    e = tl.exp2(a * TWO_LOG2E * -1.0)  # exp(-2|u|), in (0, 1]
    a2 = a * a
    series = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))
    return softcap * tl.where(u < 0.0, -t, t)


@triton.jit
def softcap_slope(z, softcap):
    """d z / d x = 1 - tanh^2 of softcapped logits ``z``, as torch's tanh backward computes
    it (from the output: the input need not stay in registers)."""
    t = z / softcap
    return (1.0 - t) * (1.0 + t)


@triton.jit
def scaled(x, logit_mult, softcap, SOFTCAP: tl.constexpr):
    """z = softcap' tanh(x mult / softcap') (module doc: mult = scale / T, softcap' =
    softcap / T), or x mult: the logits of a temperature and a logit scale. A multiply by
    mult = 1 is exact."""
    x = x * logit_mult
    if SOFTCAP:
        x = softcapped(x, softcap)
    return x


@triton.jit
def logits(ptrs, mask, logit_mult, softcap, SOFTCAP: tl.constexpr, EVICT: tl.constexpr):
    """The logits of a block in float32, transformed (``scaled``: the logit scale over the
    temperature, the softcap), -inf where masked."""
    x = tl.load(ptrs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    return tl.where(mask, scaled(x, logit_mult, softcap, SOFTCAP), float("-inf"))


@triton.jit
def times_slope(d, z, logit_mult, softcap, SOFTCAP: tl.constexpr):
    """A gradient ``d`` with respect to transformed logits ``z``, times d z / d x: mult, and
    the softcap's slope (the chain rule back to the raw logits)."""
    d = d * logit_mult
    if SOFTCAP:
        d = d * softcap_slope(z, softcap)
    return d


@triton.jit
def class_factors(t_ptrs, weight_ptrs, mask, n_classes, smoothing,
                  PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  HAS_SMOOTHING: tl.constexpr):
    """k_c of a block: w_c t'_c for probability targets (t' = (1 - e) t + e / C, at
    ``t_ptrs``), w_c for the smoothing term of class targets; 0 where masked."""
    if HAS_WEIGHT:
        k = tl.load(weight_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        k = tl.where(mask, 1.0, 0.0)
    if PROB_TARGET:
        t = tl.load(t_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTHING:
            t = tl.where(mask, t * (1.0 - smoothing) + smoothing / n_classes, 0.0)
        k = k * t
    return k


@triton.jit
def block_stats(z, t_ptrs, weight_ptrs, mask, n_classes, smoothing,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                HAS_SMOOTHING: tl.constexpr):
    """(m, e, s, a, k) of one block, reduced over axis 0 (the classes: a block of a row, or a
    tile of classes x positions); ``e`` = exp(z - m~), elementwise, for the caller to keep.
    The class factors are loaded once the exponentials are summed: fewer live registers."""
    m = tl.max(z, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp2((z - m_safe) * LOG2E)
    s = tl.sum(e, axis=0)
    if PROB_TARGET or HAS_SMOOTHING:
        k_c = class_factors(t_ptrs, weight_ptrs, mask, n_classes, smoothing, PROB_TARGET,
                            HAS_WEIGHT, HAS_SMOOTHING)
        # k_c (z_c - m~) where in range: a -inf logit with k_c > 0 makes the smoothing term
        # +inf, with k_c = 0 NaN, as torch's w_c * log_softmax
        a = tl.sum(tl.where(mask, k_c * (z - m_safe), 0.0), axis=0)
        k = tl.sum(k_c, axis=0)
    else:
        a = tl.zeros_like(s)
        k = tl.zeros_like(s)
    return m, e, s, a, k


@triton.jit
def merge_stats(m1, s1, a1, k1, m2, s2, a2, k2):
    """The statistics of two class ranges of the same rows, merged (exact: each sum is moved
    to the larger max). A range that is empty or all -inf (m = -inf, s = 0) adds nothing."""
    m = tl.maximum(m1, m2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = s1 * tl.exp2((m1 - m_safe) * LOG2E) + s2 * tl.exp2((m2 - m_safe) * LOG2E)
    a = (a1 + (tl.where(m1 == float("-inf"), 0.0, m1) - m_safe) * k1
         + a2 + (tl.where(m2 == float("-inf"), 0.0, m2) - m_safe) * k2)
    return m, s, a, k1 + k2


@triton.jit
def entropy_stat(e, z, m_safe):
    """b = sum_c e_c (z_c - m~) of a block, e = exp(z - m~) from ``block_stats``. Lanes with
    e = 0 (masked, -inf logits, underflow) add 0, not 0 * -inf."""
    return tl.sum(tl.where(e > 0.0, e * (z - m_safe), 0.0), axis=0)


@triton.jit
def merge_entropy_stat(m1, s1, b1, m2, s2, b2):
    """b of two class ranges merged (the ranges' (m, s) merge with ``merge_stats``): each
    moved to the larger max m, exp(z - m) = r exp(z - m_i) and z - m = (z - m_i) + (m_i - m),
    so b_i becomes r_i (b_i + (m_i - m) s_i). An empty range (m = -inf, s = b = 0) adds 0."""
    m = tl.maximum(m1, m2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    m1_safe = tl.where(m1 == float("-inf"), 0.0, m1)
    m2_safe = tl.where(m2 == float("-inf"), 0.0, m2)
    r1 = tl.exp2((m1 - m_safe) * LOG2E)
    r2 = tl.exp2((m2 - m_safe) * LOG2E)
    return r1 * (b1 + (m1_safe - m_safe) * s1) + r2 * (b2 + (m2_safe - m_safe) * s2)


@triton.jit
def row_log_prob(m, s, b, z_y, ok, bad, max_entropy, ENTROPY: tl.constexpr):
    """(log p_y, entropy, m~, log2 s) of rows from their statistics (module doc). Rows not
    counted give 0 (and finite m~, log2 s), out-of-range targets NaN. The entropy is at most
    ``max_entropy`` (ln C rounded down: the float32 sum of C equal terms may round above it);
    0 where not ENTROPY."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log2_s = tl.log2(s)
    ln_s = log2_s * LN2
    nan_or_0 = tl.where(bad, float("nan"), 0.0)
    log_p = tl.where(ok, (z_y - m_safe) - ln_s, nan_or_0)
    h = tl.zeros_like(log_p)
    if ENTROPY:
        # the bound keeps a NaN (a row with a NaN or +inf logit, or only -inf ones: NaN as
        # torch's); tl.minimum's default would turn it into ln C
        h = tl.where(ok, tl.minimum(ln_s - b / s, max_entropy,
                                    propagate_nan=tl.PropagateNan.ALL), nan_or_0)
    return log_p, h, tl.where(ok, m_safe, 0.0), tl.where(ok, log2_s, 0.0)


# sentinel of ``first_max``: no class of the range attains its max (empty, or all -inf)
NO_CLASS = tl.constexpr(2147483647)


@triton.jit
def sum_sq_stat(e):
    """q = sum_c e_c^2 of a block, e = exp(z - m~) from ``block_stats`` (0 where masked)."""
    return tl.sum(e * e, axis=0)


@triton.jit
def merge_sum_sq_stat(m1, q1, m2, q2):
    """q of two class ranges merged: each moved to the larger max m, exp(z - m)^2 =
    r^2 exp(z - m_i)^2 with r = exp(m_i - m) (``merge_stats``' rescale, squared)."""
    m = tl.maximum(m1, m2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    r1 = tl.exp2((m1 - m_safe) * LOG2E)
    r2 = tl.exp2((m2 - m_safe) * LOG2E)
    return q1 * (r1 * r1) + q2 * (r2 * r2)


@triton.jit
def logit_sum(z, mask):
    """Z = sum_c z_c of a block's (transformed) logits; a -inf logit makes it -inf."""
    return tl.sum(tl.where(mask, z, 0.0), axis=0)


@triton.jit
def first_max(z, cols, m):
    """j: the first of ``cols`` whose logit equals the block's max ``m`` (NO_CLASS where m is
    -inf: masked lanes are -inf, and a row of -inf logits has no top-1, as TRL's)."""
    target = tl.where(m == float("-inf"), float("nan"), m)  # NaN: equal to nothing
    return tl.min(tl.where(z == target, cols, NO_CLASS), axis=0)


@triton.jit
def merge_first_max(m1, j1, m2, j2):
    """j of two class ranges merged (order-free: on equal maxima the smaller index)."""
    return tl.where(m2 > m1, j2, tl.where(m1 > m2, j1, tl.minimum(j1, j2)))


@triton.jit
def row_extras(s, q, z_sum, j, y, n_cols, ok, bad):
    """(log sum_c p_c^2, mean logit, is top-1) of rows from their statistics (module doc):
    0 (False) for rows not counted, NaN (False) for out-of-range targets. log sum p^2 is at
    most 0 (q <= s^2, up to rounding)."""
    nan_or_0 = tl.where(bad, float("nan"), 0.0)
    log_sum_sq = tl.minimum((tl.log2(q) - 2.0 * tl.log2(s)) * LN2, 0.0,
                            propagate_nan=tl.PropagateNan.ALL)  # (row_log_prob's NaN)
    mean = z_sum / n_cols
    top1 = ok & (j.to(tl.int64) == y.to(tl.int64))
    return tl.where(ok, log_sum_sq, nan_or_0), tl.where(ok, mean, nan_or_0), top1


@triton.jit
def log_prob_grad_block(z, cols, y, m_safe, log2_s, h, g, g_h, ok, bad, logit_mult, softcap,
                        SOFTCAP: tl.constexpr, LOG_PROB_GRAD: tl.constexpr,
                        ENTROPY_GRAD: tl.constexpr):
    """d out / d x of a block of transformed logits ``z`` for the upstream gradients ``g``
    of log p_y and ``g_h`` of the entropy h (each only where its flag is set: a backward
    that gets no entropy gradient computes no entropy term), from the row's m~ and log2 s:

        c - p a,   c = g [col = y],   a = g + g_H (log p + H)

    one fused multiply-add, so a confident row's g (1 - p) keeps its digits; a lane with
    p = 0 (a -inf logit) is c (its entropy term's limit), one with p NaN (a row with a NaN
    or +inf logit, or only -inf ones) NaN, as torch's. Times d z / d x (``times_slope``);
    exact zero for rows not counted, NaN for out-of-range targets."""
    t = (z - m_safe) * LOG2E - log2_s  # log2 p
    p = tl.exp2(t)
    c = tl.zeros_like(p)
    a = tl.zeros_like(p)
    if LOG_PROB_GRAD:
        c = tl.where(cols == y, g, 0.0)
        a += g
    if ENTROPY_GRAD:
        a += g_h * (t * LN2 + h)
    d = times_slope(tl.where(p == 0.0, c, tl.fma(p, -a, c)), z, logit_mult, softcap, SOFTCAP)
    return tl.where(ok, d, tl.where(bad, float("nan"), 0.0))


@triton.jit
def class_target(y, weight_ptr, n_classes, ignore_index, HAS_WEIGHT: tl.constexpr):
    """For class index(es) ``y``: counted (in range, not ignored), out of range (that row's
    loss is NaN: no host check on a GPU), and the class weight w_y (0 where not counted)."""
    valid = y != ignore_index
    ok = valid & (y >= 0) & (y < n_classes)
    bad = valid & ((y < 0) | (y >= n_classes))
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=ok, other=0.0).to(tl.float32)
    else:
        w_y = tl.where(ok, 1.0, 0.0)
    return ok, bad, w_y


@triton.jit
def row_loss(m, s, a, k, z_y, w_y, ok, bad, n_classes, smoothing, z_loss,
             PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """(loss, z-loss term, m~, log2 s) of rows from their statistics. Rows not counted (an
    ignored target) give 0 and finite m~, log2 s; out-of-range targets NaN."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log2_s = tl.log2(s)
    ln_s = log2_s * LN2
    if PROB_TARGET:
        loss = k * ln_s - a
    else:
        loss = w_y * ((m_safe - z_y) + ln_s)
        if HAS_SMOOTHING:
            loss = (1.0 - smoothing) * loss + smoothing / n_classes * (k * ln_s - a)
    lse = m_safe + ln_s
    loss = tl.where(ok, loss, tl.where(bad, float("nan"), 0.0))
    z_term = tl.where(ok, z_loss * lse * lse, tl.where(bad, float("nan"), 0.0))
    return loss, z_term, tl.where(ok, m_safe, 0.0), tl.where(ok, log2_s, 0.0)


@triton.jit
def grad_factors(m_safe, log2_s, k, w_y, scale, z_scale, n_classes, smoothing,
                 PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """Per-row factors of d loss / d z_c = hot (p_c - [c = y]) + extra p_c - kc k_c, for an
    upstream ``scale`` of the loss and ``z_scale`` (already times 2 z_loss) of the z-loss."""
    lse = m_safe + log2_s * LN2
    extra = z_scale * lse
    if PROB_TARGET:
        hot = tl.zeros_like(extra)
        extra += scale * k  # p_c S - w_c t'_c
        kc = scale
    else:
        hot = scale * w_y
        kc = tl.zeros_like(extra)
        if HAS_SMOOTHING:
            hot = hot * (1.0 - smoothing)
            kc = scale * smoothing / n_classes
            extra += kc * k  # e/C (W p_c - w_c)
    return hot, extra, kc


@triton.jit
def softmax(z, m_safe, log2_s):
    """p_c = exp(z_c - lse) of a block, from its row's statistics."""
    return tl.exp2((z - m_safe) * LOG2E - log2_s)


@triton.jit
def grad_block(p, z, cols, y, k_c, hot, extra, kc, ok, bad, logit_mult, softcap,
               PROB_TARGET: tl.constexpr, HAS_K: tl.constexpr, SOFTCAP: tl.constexpr):
    """d loss / d x of a block of (softcapped) logits ``z`` from their softmax ``p``: exact
    zero for rows not counted, NaN for out-of-range targets. One fused multiply-add,
    ``p (hot + extra) - hot``, at the target: ``p - 1`` is formed in float32 and rounded once
    (confident rows keep their digits)."""
    c = 0.0
    if not PROB_TARGET:
        c = tl.where(cols == y, hot, 0.0)
    if HAS_K:
        c += kc * k_c
    d = times_slope(tl.fma(p, hot + extra, -c), z, logit_mult, softcap, SOFTCAP)
    return tl.where(ok, d, tl.where(bad, float("nan"), 0.0))


@triton.jit
def target_grad_block(z, m_safe, log2_s, w_c, scale, smoothing):
    """d loss / d t_c of a block of probability targets: -(1 - e) w_c log p_c."""
    log_p = (z - m_safe) - log2_s * LN2
    return (smoothing - 1.0) * w_c * log_p * scale



# ------------------------------------------------------------------------------------------
# host side: what a call asks for, and the flags and scalars every kernel takes for it
# ------------------------------------------------------------------------------------------


def transform(opts) -> dict:
    """The kernels' scalars of the logits' transform for ``opts`` (``scaled``): mult =
    logit_scale / T and softcap' = softcap / T (1.0 without softcap), and the SOFTCAP flag."""
    temperature = getattr(opts, "temperature", 1.0)
    return dict(
        logit_mult=getattr(opts, "logit_scale", 1.0) / temperature,
        softcap=(opts.softcap or 1.0) / (temperature if opts.softcap else 1.0),
        SOFTCAP=opts.softcap is not None,
    )


def flags(opts, weight) -> dict:
    """The constexpr flags of every cross-entropy kernel for ``opts`` (an ``eager.Options``), and
    the scalars they come with."""
    return dict(
        ignore_index=opts.ignore_index,
        smoothing=opts.smoothing,
        **transform(opts),
        PROB_TARGET=opts.prob_target,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=opts.smoothing > 0.0,
    )
