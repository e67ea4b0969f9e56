"""The cross-entropy's row statistics over a block of classes, in torch ops.

The eager twins of the building blocks in ``cross_entropy.py`` (``partial_stats``,
``combine_stats``, ``grad_from_stats``, ``denominators``), with their contracts and their
arithmetic (``_ce_math.py`` writes it out), for the callers that split a row's classes among
blocks on the eager backend: the vocab-parallel loss (``fused_losses/distributed.py``) and
anything else that merges statistics of several blocks. Also the reductions both backends
share (``reduce_rows``, ``upstream_scales``): torch ops, so this file imports without Triton.

A block's statistics, for rows of ``n_classes`` and the block's classes ``[class_offset,
class_offset + width)`` (the logits softcapped first; m~ = m, or 0 where m = -inf):

    m  max_c z_c          s  sum_c exp(z_c - m~)
    a  sum_c k_c (z_c - m~)        k  sum_c k_c      (smoothing or probability targets)
    z_y  the target's logit where the target is in the block, else 0

Rows not counted (ignored, out of range) read nothing: m = -inf, s = a = k = z_y = 0. The
math runs in float32 (float64 where the logits or the weights are float64).
"""

from __future__ import annotations

import math

import torch

from .eager import Options, compute_dtype, part_denominators

STATS = 5  # m, s, a, k, z_y


def _rows(x: torch.Tensor) -> torch.Tensor:
    """An (outer, inner, width) view (the kernels' row addressing), or (rows, width), as
    (rows, width)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    return compute_dtype(x.dtype, *(() if weight is None else (weight.dtype,)))


def _softcapped(x: torch.Tensor, opts: Options, dtype: torch.dtype) -> torch.Tensor:
    z = x.to(dtype)
    return z if opts.softcap is None else opts.softcap * torch.tanh(z / opts.softcap)


def _targets(target, weight, opts: Options, n_rows: int, n_classes: int, dtype):
    """(y, counted, out of range, w_y) of the rows: class indices, or every row counted with
    w_y = 1 for probability targets."""
    if opts.prob_target:
        ok = torch.ones(n_rows, dtype=torch.bool, device=target.device)
        return None, ok, ~ok, torch.ones(n_rows, dtype=dtype, device=target.device)
    y = target.reshape(-1).long()
    valid = y != opts.ignore_index
    ok = valid & (y >= 0) & (y < n_classes)
    bad = valid & ~ok
    if weight is None:
        w_y = ok.to(dtype)
    else:
        w_y = torch.where(ok, weight.to(dtype)[torch.where(ok, y, 0)], 0.0)
    return y, ok, bad, w_y


def _class_factors(target, weight, opts: Options, class_offset: int, width: int,
                   n_classes: int, dtype, device) -> torch.Tensor | None:
    """k_c of the block (rows or 1, width): w_c for the smoothing term of class targets,
    w_c t'_c for probability targets (t' = (1 - e) t + e / C); None where neither."""
    if not (opts.prob_target or opts.smoothing > 0.0):
        return None
    if weight is None:
        k = torch.ones(1, width, dtype=dtype, device=device)
    else:
        k = weight.to(dtype)[class_offset:class_offset + width].reshape(1, width)
    if opts.prob_target:
        t = _rows(target).to(dtype)
        if opts.smoothing > 0.0:
            t = t * (1.0 - opts.smoothing) + opts.smoothing / n_classes
        k = k * t
    return k


def partial_stats(x, target, weight, opts: Options, *, class_offset: int = 0,
                  n_classes: int | None = None, n_splits: int = 1) -> torch.Tensor:
    """(1, 5, rows): m, s, a, k, z_y of a block of classes of each row, as
    ``cross_entropy.partial_stats`` (``x``: (outer, inner, width) or (rows, width) logits,
    ``target``: the rows' global class indices or the block's probabilities (rows, width),
    ``weight``: all ``n_classes`` class weights). ``n_splits`` is the kernels' launch plan:
    one part here. a and k are zero without smoothing or probability targets."""
    x2 = _rows(x)
    n_rows, width = x2.shape
    n_classes = n_classes or width
    dtype = _dtype(x2, weight)
    out = torch.zeros(1, STATS, n_rows, dtype=dtype, device=x2.device)
    y, ok, _, _ = _targets(target, weight, opts, n_rows, n_classes, dtype)
    out[0, 0] = -math.inf
    if width == 0 or n_rows == 0:
        return out
    z = _softcapped(x2, opts, dtype)
    m = torch.where(ok, z.amax(1), -math.inf)
    m_safe = torch.where(m == -math.inf, 0.0, m).unsqueeze(1)
    out[0, 0] = m
    out[0, 1] = torch.where(ok, (z - m_safe).exp().sum(1), 0.0)
    k_c = _class_factors(target, weight, opts, class_offset, width, n_classes, dtype,
                         x2.device)
    if k_c is not None:
        # k_c (z_c - m~): a -inf logit with k_c > 0 makes a -inf (the smoothing term +inf),
        # with k_c = 0 NaN, as torch's w_c * log_softmax
        out[0, 2] = torch.where(ok, (k_c * (z - m_safe)).sum(1), 0.0)
        out[0, 3] = torch.where(ok, k_c.expand(n_rows, width).sum(1), 0.0)
    if y is not None:
        local = y - class_offset
        mine = ok & (local >= 0) & (local < width)
        z_y = z.gather(1, torch.where(mine, local, 0).unsqueeze(1)).squeeze(1)
        out[0, 4] = torch.where(mine, z_y, 0.0)
    return out


def combine_stats(partials: torch.Tensor, target, weight, opts: Options, n_classes: int):
    """Merge partial statistics (parts, 5, rows) into each row's loss, z-loss term (None
    without z-loss) and statistics (3, rows): m~, log2 s, k (m~ and log2 s are 0 on rows not
    counted), as ``cross_entropy.combine_stats``."""
    n_rows = partials.shape[2]
    m_p, s_p, a_p, k_p, zy_p = partials.unbind(1)
    dtype = partials.dtype
    m = m_p.amax(0) if partials.shape[0] else torch.full((n_rows,), -math.inf, dtype=dtype)
    m_safe = torch.where(m == -math.inf, 0.0, m)
    # each part's sums moved to the row's max; a part with m = -inf (empty) adds nothing
    s = (s_p * (m_p - m_safe).exp()).sum(0)
    smoothing_sums = opts.prob_target or opts.smoothing > 0.0
    if smoothing_sums:
        a = (a_p + (torch.where(m_p == -math.inf, 0.0, m_p) - m_safe) * k_p).sum(0)
        k = k_p.sum(0)
    else:
        a = k = torch.zeros_like(s)
    _, ok, bad, w_y = _targets(target, weight, opts, n_rows, n_classes, dtype)
    ln_s = s.log()
    if opts.prob_target:
        loss = k * ln_s - a
    else:
        loss = w_y * ((m_safe - zy_p.sum(0)) + ln_s)
        if opts.smoothing > 0.0:
            loss = (1.0 - opts.smoothing) * loss + opts.smoothing / n_classes * (k * ln_s - a)
    nan = torch.where(bad, math.nan, 0.0).to(dtype)
    loss = torch.where(ok, loss, nan)
    z = None
    if opts.z_loss:
        lse = m_safe + ln_s
        z = torch.where(ok, opts.z_loss * lse * lse, nan)
    stats = torch.stack([torch.where(ok, m_safe, 0.0), torch.where(ok, s.log2(), 0.0), k])
    return loss, z, stats


def grad_from_stats(x, target, weight, stats, scales, opts: Options, *, grad=None,
                    grad_target=None, class_offset: int = 0, n_classes: int | None = None,
                    n_splits: int = 1) -> None:
    """Write d out / d x of a block of classes into ``grad`` (x's shape; x itself for in
    place) and d out / d probabilities into ``grad_target``, from the whole rows' statistics
    (3, rows) and the upstream ``scales`` ((2,) or (rows, 2): d out / d loss_n and 2 z_loss
    d out / d z_n), as ``cross_entropy.grad_from_stats``:

        d = hot (p_c - [c = y]) + extra p_c - kc k_c     (times the softcap's slope)
    """
    x2 = _rows(x)
    n_rows, width = x2.shape
    n_classes = n_classes or width
    if n_rows == 0 or width == 0:
        return
    dtype = stats.dtype
    z = _softcapped(x2, opts, dtype)
    m_safe, log2_s, k = stats[0], stats[1], stats[2]
    sc = scales.reshape(-1, 2).to(dtype)
    scale, z_scale = sc[:, 0], sc[:, 1]
    y, ok, bad, w_y = _targets(target, weight, opts, n_rows, n_classes, dtype)
    lse = m_safe + log2_s * math.log(2.0)
    extra = z_scale * lse
    if opts.prob_target:
        hot = torch.zeros_like(extra)
        extra = extra + scale * k  # p_c S - w_c t'_c
        kc = scale.expand_as(extra)
    else:
        hot = scale * w_y
        kc = torch.zeros_like(extra)
        if opts.smoothing > 0.0:
            hot = hot * (1.0 - opts.smoothing)
            kc = (scale * (opts.smoothing / n_classes)).expand_as(extra)
            extra = extra + kc * k  # e/C (W p_c - w_c)
    p = (z - lse.unsqueeze(1)).exp()
    d = p * (hot + extra).unsqueeze(1)
    if y is not None:
        local = y - class_offset
        mine = ok & (local >= 0) & (local < width)
        d.scatter_add_(1, torch.where(mine, local, 0).unsqueeze(1),
                       torch.where(mine, -hot, 0.0).unsqueeze(1))
    k_c = _class_factors(target, weight, opts, class_offset, width, n_classes, dtype,
                         x2.device)
    if k_c is not None:
        d = d - kc.unsqueeze(1) * k_c
    if opts.softcap is not None:
        t = z / opts.softcap
        d = d * ((1.0 - t) * (1.0 + t))
    nan = torch.where(bad, math.nan, 0.0).to(dtype).unsqueeze(1)
    rows = ok.unsqueeze(1)
    if grad is not None:
        grad.copy_(torch.where(rows, d, nan).view(grad.shape))
    if grad_target is not None:
        w_c = (torch.ones(1, width, dtype=dtype, device=x2.device) if weight is None
               else weight.to(dtype)[class_offset:class_offset + width].reshape(1, width))
        log_p = z - lse.unsqueeze(1)
        dt = (opts.smoothing - 1.0) * w_c * log_p * scale.unsqueeze(1)
        grad_target.copy_(torch.where(rows, dt, nan).view(grad_target.shape))


def denominators(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                 n_classes: int) -> torch.Tensor:
    """(2,): the summed weights (or count) of the counted class targets, the mean's
    denominator, and their count, the z-loss mean's; NaN if a target is out of range, as
    ``cross_entropy.denominators`` (``eager.part_denominators``' arithmetic)."""
    dens = part_denominators(target, weight, Options(ignore_index=ignore_index), n_classes)
    return torch.stack([dens.terms[0], dens.z])


# ------------------------------------------------------------------------------------------
# reductions: what the per-row results become, and the upstream factors of each row (both
# backends: torch ops on (rows,) tensors)
# ------------------------------------------------------------------------------------------


def _mean_denominators(opts: Options, denom, n_rows: int):
    """(the loss's denominator, the z-loss's) of a mean: the summed weights and the count
    of the counted class targets (``denominators``), or the number of rows for probability
    targets."""
    if opts.prob_target:
        return n_rows, n_rows
    return denom[0], denom[1]


def reduce_rows(loss, z, opts: Options, denom, n_rows: int):
    """(the loss as reduced, the z-loss term as reduced: None without z-loss). A weighted
    mean whose weights sum to zero is NaN, as torch's (its 0/0 of the unsmoothed part)."""
    if opts.reduction == "none":
        return (loss if z is None else loss + z), z
    if opts.reduction == "sum":
        z = None if z is None else z.sum()
        return (loss.sum() if z is None else loss.sum() + z), z
    d_w, d_n = _mean_denominators(opts, denom, n_rows)
    out = loss.sum() / d_w
    if not opts.prob_target:
        out = torch.where(d_w == 0, float("nan"), out)
    if z is None:
        return out, None
    z = z.sum() / d_n
    return out + z, z


def upstream_scales(opts: Options, denom, n_rows: int, grad_out, device) -> torch.Tensor:
    """The upstream factors of each row: (2,) for one upstream gradient ``grad_out`` (None:
    1) or (rows, 2) for ``none``: d out / d loss_n, and 2 z_loss d out / d z_n (the z-loss's
    gradient is 2 z_loss lse p_c; 0 without z-loss). float32 (float64 for a float64 upstream
    gradient or denominator: the eager path's float64 calls). A weighted mean over zero
    weight has a NaN gradient on the rows it counts, as torch's."""
    wide = any(t is not None and t.dtype == torch.float64 for t in (grad_out, denom))
    dtype = torch.float64 if wide else torch.float32
    if opts.reduction == "none":
        g = grad_out.reshape(-1).to(dtype)
        return torch.stack([g, g * (2.0 * opts.z_loss)], dim=1)
    if opts.reduction == "sum":
        scales = _pair(1.0, 2.0 * opts.z_loss, dtype, device)
    else:
        d_w, d_n = _mean_denominators(opts, denom, n_rows)
        if opts.prob_target:
            scales = _pair(1.0 / n_rows, 2.0 * opts.z_loss / n_rows, dtype, device)
        else:
            d_w, d_n = d_w.to(dtype), d_n.to(dtype)
            inv_w = torch.where(d_w == 0, float("nan"), 1.0 / d_w)
            inv_n = (2.0 * opts.z_loss) / d_n if opts.z_loss else torch.zeros_like(d_n)
            scales = torch.stack([inv_w, inv_n])
    return scales if grad_out is None else scales * grad_out.to(dtype)


def _pair(a: float, b: float, dtype: torch.dtype, device) -> torch.Tensor:
    """(a, b) as a tensor on ``device``, filled there: ``torch.tensor`` would copy them from
    pageable host memory, which waits for the device (a host sync on the hot path)."""
    if torch.device(device).type == "cpu":
        return torch.tensor([a, b], dtype=dtype)
    out = torch.full((2,), a, dtype=dtype, device=device)
    out[1:].fill_(b)
    return out
