"""The torch mirror of the kernels: one float32 formula per loss, in torch ops.

Every loss is written here once, differentiably, in float32 (float64 where an operand is):
the CPU fallback runs it, and so does the backward of every kernel Function under
``create_graph=True`` (the kernels' gradients are constants to autograd, so second
derivatives need torch's ops). It imports torch only: the package runs without Triton.

Cross-entropy is split into per-row parts and a reduction (``row_parts``, ``reduce_parts``),
so that half-precision logits can run a block of rows at a time (``cross_entropy``): the loss
and gradient of each block are computed in float32 in cache-sized pieces, and no float32 copy
of the whole logits exists (torch's own bfloat16 loss keeps its log-softmax and two gradients
of the logits' size).

The kernels' building blocks have their eager twins here, with the same contracts and
``_ce_math.py``'s arithmetic: the row statistics of a block of classes and their merge
(``partial_stats``, ``combine_stats``, ``grad_from_stats``, ``denominators``: split and
sharded rows), the reductions both backends share (``reduce_rows``, ``upstream_scales``), the
LM head's per-chunk steps (``call_denominators``, ``chunk_loss``; ``scale_grad_``), the
log-probabilities, entropy and TRL's other requested per-token statistics
(``row_log_probs``, ``chunk_log_probs_``, ``log_prob_grad``), and the distillation
divergence (``divergence_rows``, ``chunk_divergence_``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _threads
from ._autograd import may_fuse_gradient

# Logits run in blocks of rows of about this many float32 elements (2 MiB): each thread's
# float32 temporaries of a block stay in its core's caches and a small fraction of the
# logits' size. Measured interleaved on 2 threads (bfloat16, 4096 x 32,000, a busy
# machine), 0.5 / 1 / 2 / 4 / 8 MiB: 0.80 / 0.65 / 0.60 / 0.68 / 0.72x torch's time: smaller
# blocks pay their ops' Python (under the GIL), larger ones the caches.
BLOCK_ELEMENTS = 1 << 19


class Options(NamedTuple):
    """What a cross-entropy call asks for beyond its tensors (validated by the caller)."""

    ignore_index: int = -100
    reduction: str = "mean"
    smoothing: float = 0.0
    softcap: float | None = None
    z_loss: float = 0.0
    prob_target: bool = False
    inplace_backward: bool = False
    temperature: float = 1.0  # the logits divided by it (after the scale and the softcap)
    logit_scale: float = 1.0  # the logits multiplied by it first (Cohere's, Granite's heads)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any operand is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _compute_dtype_of(*tensors: torch.Tensor | None) -> torch.dtype:
    return compute_dtype(*(t.dtype for t in tensors if t is not None))


def _up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in the compute dtype; integer, bool and complex tensors as they are (torch's
    promotion decides for them)."""
    return as_dtype(t, dtype) if t is not None and t.is_floating_point() else t


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without a dispatcher call when it is a no-op (a small loss's time is
    its Python)."""
    return t if t.dtype == dtype else t.to(dtype)


# ------------------------------------------------------------------------------------------
# the logits' transform (the logit scale, the softcap, the temperature): _ce_math's ``scaled``
# ------------------------------------------------------------------------------------------


LN2 = math.log(2.0)


def transformed_logits(x: torch.Tensor, opts: Options, dtype: torch.dtype) -> torch.Tensor:
    """z = softcap tanh(x scale / softcap) / T in ``dtype``: TRL's order (scale, softcap,
    temperature); each step skipped where it is the identity."""
    z = as_dtype(x, dtype)
    if opts.logit_scale != 1.0:
        z = z * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    if opts.temperature != 1.0:
        z = z / opts.temperature
    return z


def transform_slope(z: torch.Tensor, opts: Options):
    """d z / d x of transformed logits ``z`` (``transformed_logits``): scale / T, times the
    softcap's 1 - tanh^2 (from the output, as torch's tanh backward)."""
    mult = opts.logit_scale / opts.temperature
    if opts.softcap is None:
        return mult
    t = z / (opts.softcap / opts.temperature)
    return (1.0 - t) * (1.0 + t) * mult


# ------------------------------------------------------------------------------------------
# cross-entropy
# ------------------------------------------------------------------------------------------


class Parts(NamedTuple):
    """A cross-entropy's per-row terms, each to be divided by its own denominator in a mean
    (torch divides its unsmoothed and its smoothing term separately)."""

    terms: list  # per-row tensors (N, d1, ..., dK): the loss is their sum
    z: torch.Tensor | None  # the z-loss term per row, or None


def row_parts(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
              opts: Options) -> Parts:
    """The per-row terms of the loss of logits ``x`` (N, C, d1, ..., dK), classes on dim 1,
    against class indices (N, d1, ..., dK) or probabilities shaped like ``x``.

    The logits are transformed first (``transformed_logits``: the logit scale, softcapping
    ``z = softcap * tanh(x / softcap)``, the temperature). Then class targets give
    ``(1 - e) w_y (lse - z_y)`` (zero where ignored, NaN for a target out of range) and
    ``e / C sum_c w_c (lse - z_c)``, probability targets ``sum_c w_c t'_c (lse - z_c)``; the
    z-loss is ``z_loss lse^2`` on the rows counted.
    """
    dtype = compute_dtype(x.dtype, *(t.dtype for t in (target, weight)
                                     if t is not None and t.is_floating_point()))
    z = transformed_logits(x, opts, dtype)
    n_classes = z.shape[1]
    if n_classes == 0:
        return _classless_parts(z, target, opts)
    weight = None if weight is None else weight.reshape(-1)  # (any shape of C elements)
    w = None if weight is None else weight.to(dtype).view(-1, *([1] * (z.dim() - 2)))
    eps = opts.smoothing
    lse = None
    if eps > 0 or opts.prob_target:
        # Sums over the classes, k ln s - sum_c k_c (z_c - m) with s = sum_c exp(z_c - m):
        # autograd forms their gradient k p_c - k_c without a sum of C terms (through
        # log_softmax it sums C equal terms: 1e-3 off at 70k classes in float32).
        m = z.detach().amax(1, keepdim=True)
        m = torch.where(m == -math.inf, 0.0, m)  # a row that is all -inf: no NaN from -inf - -inf
        zm = z - m
        ln_s = zm.exp().sum(1).log()
        lse = m.squeeze(1) + ln_s
    else:
        # m = lse, so z - m is the log-softmax, torch's fused op (as fast as its own loss)
        zm = torch.log_softmax(z, 1)
        ln_s = 0.0

    if opts.prob_target:
        t = target.to(dtype)
        if eps > 0:
            t = t * (1.0 - eps) + eps / n_classes
        k = t if w is None else t * w
        terms = [k.sum(1) * ln_s - (k * zm).sum(1)]
        z_rows = None
        if opts.z_loss:
            z_rows = opts.z_loss * lse**2
        return Parts(terms, z_rows)

    y = target.long()
    counted = y != opts.ignore_index
    bad = counted & ((y < 0) | (y >= n_classes))
    ok = counted & ~bad
    w_y = torch.ones_like(z[:, 0]) if weight is None else weight.to(dtype)[torch.where(ok, y, 0)]
    # lse - z_y = ln s - (z_y - m), z_y - m picked by torch's nll_loss, which checks the
    # targets' range (CPU: also where the values cannot be read on the host, under vmap or
    # torch.compile). On a GPU, where it would assert, a target out of range gives NaN
    # instead, as the kernels do. Rows not counted give exactly 0.
    if y.is_cuda:
        y = torch.where(bad, 0, y)
    nan = torch.where(bad, math.nan, 0.0).to(dtype)
    if zm.dim() == 4 and not zm.is_contiguous():
        # torch's 4-D nll_loss (nll_loss2d) refuses a strided input in its backward ("grad_input
        # must be contiguous"; a channels-last or permuted input); other ranks it reshapes
        zm = zm.contiguous()
    nll = ln_s + F.nll_loss(zm, y, ignore_index=opts.ignore_index, reduction="none")
    terms = [torch.where(ok, (1.0 - eps) * w_y * nll, nan)]
    if eps > 0:
        smooth = (n_classes if w is None else w.sum()) * ln_s - (zm if w is None
                                                                  else zm * w).sum(1)
        terms.append(torch.where(_smoothing_counted(target, opts), eps / n_classes * smooth,
                                 nan))
    z_rows = None
    if opts.z_loss:
        lse = torch.logsumexp(z, 1) if lse is None else lse
        z_rows = torch.where(ok, opts.z_loss * lse**2, nan)
    return Parts(terms, z_rows)


def _classless_parts(z: torch.Tensor, target: torch.Tensor, opts: Options) -> Parts:
    """``row_parts`` of rows of no class, as torch computes them: a probability target's
    loss is a sum of no terms (-0; its mean 0 / 0, the denominators'), a class target is out
    of range unless ignored (NaN, else 0), and smoothing makes every row NaN (e / C = inf
    times 0); the z-loss of lse = -inf."""
    lse = torch.logsumexp(z, 1)  # -inf, shaped like the rows (and connected to z)
    if opts.prob_target:
        terms = [-(target.to(z.dtype) * z).sum(1)]
        counted = torch.ones_like(lse, dtype=torch.bool)
    else:
        counted = target.long() != opts.ignore_index
        terms = [torch.where(counted, math.nan, z.sum(1))]
        if opts.smoothing > 0:
            terms.append(z.sum(1) + math.nan)
    z_rows = None
    if opts.z_loss:
        z_rows = torch.where(counted, opts.z_loss * lse**2 if opts.prob_target else math.nan,
                             0.0)
    return Parts(terms, z_rows)


def _smoothing_counted(target: torch.Tensor, opts: Options) -> torch.Tensor:
    """The rows torch's label-smoothing term counts. torch compares a uint8 target with
    ``ignore_index`` in uint8 there (-100 matches 156), and as int64 everywhere else."""
    ignore = opts.ignore_index
    if target.dtype == torch.uint8:
        ignore %= 256
    return target.long() != ignore


def part_denominators(target: torch.Tensor, weight: torch.Tensor | None, opts: Options,
                      n_classes: int) -> Parts:
    """The denominators a mean divides each of ``row_parts``' terms by: the summed weights
    (or the count) of the rows each term counts, NaN if a target is out of range; the number
    of rows for probability targets. The z-loss's is the count of the rows the unsmoothed
    term counts (every row for probabilities), unweighted."""
    if opts.prob_target:
        # torch divides by numel / C: 0 / 0, a NaN mean, for rows of no class
        n_rows = target.numel() // n_classes if n_classes else math.nan
        return Parts([n_rows], n_rows)
    y = target.long()
    bad = (y != opts.ignore_index) & ((y < 0) | (y >= n_classes))
    in_range = ~bad
    dtype = torch.float64 if weight is not None and weight.dtype == torch.float64 else None
    w_y = torch.ones_like(y, dtype=dtype or torch.float32)
    if weight is not None:
        w_y = weight.reshape(-1).to(w_y.dtype)[torch.where((y >= 0) & (y < n_classes), y, 0)]
    nan = torch.where(bad.any(), math.nan, 0.0)

    def summed(counted):
        return torch.where(counted & in_range, w_y, 0.0).sum() + nan

    ok = (y != opts.ignore_index) & in_range
    dens = [summed(ok)]
    if opts.smoothing > 0:
        # torch's smoothing term has its own mask: it differs from the unsmoothed one for
        # uint8 targets with an ignore_index outside [0, 255]
        dens.append(summed(_smoothing_counted(target, opts)))
    return Parts(dens, ok.sum().to(w_y.dtype) + nan)


def reduce_parts(parts: Parts, dens: Parts, reduction: str):
    """(loss, z-loss term or None) reduced: per row, summed, or each term divided by its
    denominator. Linear in the parts, so blocks of rows reduce to their sum."""
    if reduction == "none":
        loss = sum(parts.terms)
        z = parts.z
    elif reduction == "sum":
        loss = sum(t.sum() for t in parts.terms)
        z = None if parts.z is None else parts.z.sum()
    else:
        loss = sum(t.sum() / d for t, d in zip(parts.terms, dens.terms, strict=True))
        z = None if parts.z is None else parts.z.sum() / dens.z
    return (loss if z is None else loss + z), z


def cross_entropy_float(x, target, weight, opts: Options):
    """(loss, z-loss term or None) of ``x`` (N, C, d1, ..., dK) in float32 torch ops,
    differentiable (the double backward of the kernels, and the eager path)."""
    dens = part_denominators(target, weight, opts, x.shape[1])
    return reduce_parts(row_parts(x, target, weight, opts), dens, opts.reduction)


def call_denominators(target, weight, opts: Options, n_classes: int) -> Parts:
    """The denominators of a whole call, for its blocks of rows (``chunk_loss``)."""
    return part_denominators(target, weight, opts, n_classes)


def chunk_loss(logits, target, weight, opts: Options, dens: Parts, n_rows: int, grad_out=None,
               write_grad: bool = False, grad_target=None, grad=None, stats=None):
    """A block of rows (R, C) of a larger call, float32 logits (``dens``: the whole call's
    ``call_denominators``): (its part of the reduced loss, of the z-loss term or None). With
    ``write_grad``, d out / d logits is written into ``logits`` in place, or into ``grad``
    (and d out / d probabilities into ``grad_target``), for ``grad_out`` (None: 1; one value,
    or the block's rows for ``none``); with ``stats`` (3, R), the rows' statistics for
    ``grad_from_stats`` written there (class targets; not with ``write_grad``). The contract
    of ``cross_entropy.chunk_loss``, the kernels' twin. Runs as ``HalfCrossEntropy`` does,
    blocks of rows over the CPU's cores (``_run_blocks``), so its float32 temporaries are a
    few blocks', not the chunk's."""
    if grad_target is not None:
        return _formula_block(logits, target, weight, opts, dens, grad_out, write_grad,
                              grad_target, grad)
    out = (logits if grad is None else grad) if write_grad else None
    return _join(_run_blocks(logits, target, weight, opts, dens, out, grad_out, stats),
                 opts.reduction)


def _formula_block(logits, target, weight, opts: Options, dens: Parts, grad_out=None,
                   write_grad: bool = False, grad_target=None, grad=None):
    """``chunk_loss`` by autograd on the formula (every option)."""
    wrt = []
    with torch.set_grad_enabled(write_grad or grad_target is not None):
        z = logits.detach().requires_grad_(write_grad)
        t = target if grad_target is None else target.detach().requires_grad_(True)
        wrt = [v for v, need in ((z, write_grad), (t, grad_target is not None)) if need]
        out, z_out = reduce_parts(row_parts(z, t, weight, opts), dens, opts.reduction)
    if wrt:
        grads = torch.autograd.grad(out, wrt, None if grad_out is None else grad_out.float())
        if write_grad:
            (logits if grad is None else grad).copy_(grads[0])
        if grad_target is not None:
            grad_target.copy_(grads[-1])
    return out.detach(), None if z_out is None else z_out.detach()


def scale_grad_(grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``grad *= grad_out`` in place, skipped when it is 1 (CPU tensors: reading it costs no
    sync)."""
    if not bool(grad_out == 1):
        grad.mul_(grad_out)
    return grad


class HalfCrossEntropy(torch.autograd.Function):
    """``cross_entropy_float`` of half-precision logits, a block of rows at a time: each
    block is upcast, its loss and (for ``mean``/``sum``) its gradient computed, the gradient
    rounded once into a logits-sized buffer; the backward scales it (``none``: recomputes
    each block with its rows' upstream gradients). Peak memory: the gradient and each
    thread's float32 temporaries of one block.

    On the CPU the blocks are spread over the cores by ``_threads.run_blocks``, each block's
    ops single-threaded (torch's parallel regions on small blocks stall while another process
    uses a core). Class targets of (N, C) logits without softcap take ``_plain_block``, a
    softmax and one pass that writes the gradient (a temperature or logit scale folded in);
    the other cases ``_formula_block``, autograd on the formula."""

    @staticmethod
    def forward(ctx, x, target, weight, opts: Options):
        dens = part_denominators(target, weight, opts, x.shape[1])
        fused = ctx.needs_input_grad[0] and opts.reduction != "none"
        grad = torch.empty_like(x) if fused else None
        outs = _run_blocks(x, target, weight, opts, dens, grad, None)
        loss, z = _join(outs, opts.reduction)
        ctx.save_for_backward(x, target, weight)
        ctx.opts, ctx.dens, ctx.grad = opts, dens, grad
        if z is None:
            z = torch.zeros_like(loss)
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    def backward(ctx, grad_out, _grad_z):
        x, target, weight = ctx.saved_tensors
        opts = ctx.opts
        if torch.is_grad_enabled():  # create_graph=True: the formula on the whole input
            ctx.grad = None
            with torch.enable_grad():
                loss, _ = cross_entropy_float(x, target, weight, opts)
            return torch.autograd.grad(loss, x, grad_out, create_graph=True)[0], None, None, None
        if ctx.grad is not None:  # the first backward after the forward wrote the gradient
            grad, ctx.grad = ctx.grad, None
            return scale_grad_(grad, grad_out), None, None, None
        grad = torch.empty_like(x)
        _run_blocks(x, target, weight, opts, ctx.dens, grad, grad_out)
        return grad, None, None, None


def _run_blocks(x, target, weight, opts: Options, dens: Parts, grad, grad_out,
                stats=None) -> list:
    """Each block's (loss part, z-loss part or None) of logits ``x`` (N, C, d1, ..., dK)
    split along N (``_blocks``), and with ``grad`` (``x`` itself allowed) their gradient
    written there (``grad_out``: None for 1, else the upstream gradient, per row for
    ``none``); with ``stats`` ((3, N), (N, C) logits of class targets), each row's
    ``combine_stats`` statistics written there. On the CPU over ``_threads.run_blocks``;
    (N, C) logits against class targets without softcap in ``_plain_block`` (which folds a
    temperature and logit scale in), the rest by ``_formula_block``."""
    x = x.detach()
    blocks = _blocks(x)
    plain = (x.dim() == 2 and x.shape[1] > 0 and x.device.type == "cpu"
             and opts.softcap is None and not opts.prob_target
             and compute_dtype(x.dtype, torch.float32 if weight is None else weight.dtype)
             == torch.float32)
    rows = _plain_rows(target, weight, opts, dens, grad_out, x.shape[1]) if plain else None

    def one(i, scratch):
        block = blocks[i]
        if rows is not None:
            return _plain_block(x[block], rows.block(block), weight, opts, dens,
                                None if grad is None else grad[block], scratch,
                                None if stats is None else stats[:, block])
        if stats is not None:
            t = target[block]
            parts = partial_stats(x[block], t, weight, opts)
            stats[:, block] = combine_stats(parts, t, weight, opts, x.shape[1])[2]
        g = grad_out if grad_out is None or opts.reduction != "none" else grad_out[block]
        return _formula_block(as_dtype(x[block], compute_dtype(x.dtype)), target[block],
                              weight, opts, dens, g, write_grad=grad is not None,
                              grad=None if grad is None else grad[block])

    return _threads.run_blocks(one, len(blocks), x.device)


class _Rows(NamedTuple):
    """What ``_plain_block`` needs of each row besides its logits, for a whole call: the
    target (0 where not counted), the rows each term counts, the terms' factors and the
    gradient's (module doc of ``_plain_block``), NaN where a target is out of range."""

    y: torch.Tensor  # int64
    ok: torch.Tensor  # bool: counted by the unsmoothed term and the z-loss
    smoothed: torch.Tensor | None  # bool: counted by the smoothing term
    nan: torch.Tensor  # NaN where the target is out of range, else 0
    w_y: torch.Tensor  # (1 - eps) w_y (the unsmoothed term's factor)
    b: torch.Tensor  # the gradient's at the target
    a: torch.Tensor  # the gradient's of p, less the z-loss's
    d: torch.Tensor | None  # the smoothing's, of the class weights (or of 1)
    dz: torch.Tensor | None  # the z-loss's, of lse p

    def block(self, rows: slice) -> _Rows:
        return _Rows(*(None if v is None else v[rows] for v in self))


def _plain_rows(target, weight, opts: Options, dens: Parts, grad_out, n_classes: int) -> _Rows:
    """``_Rows`` of a call (``grad_out``: None for 1, a scalar, or per row for ``none``)."""
    y = target.long()
    counted = y != opts.ignore_index
    bad = counted & ((y < 0) | (y >= n_classes))
    ok = counted & ~bad
    y = torch.where(ok, y, 0)
    zero = torch.zeros((), dtype=torch.float32)
    w_y = ok.float() if weight is None else torch.where(ok, weight.reshape(-1).float()[y], zero)
    eps = opts.smoothing
    g = torch.ones((), dtype=torch.float32) if grad_out is None else grad_out.float()
    # the logits' transform without softcap, z = mult x: each gradient term times mult
    mult = opts.logit_scale / opts.temperature
    if mult != 1.0:
        g = g * mult
    mean = opts.reduction == "mean"
    # Rows not counted get exactly 0 (NaN only from their NaN logits), even over a mean's
    # zero or NaN denominator, as autograd through the formula's where() gives.
    b = torch.where(ok, (1.0 - eps) * w_y * g / dens.terms[0] if mean
                    else (1.0 - eps) * w_y * g, zero)
    a, smoothed, d, dz = b, None, None, None
    if eps > 0:
        smoothed = _smoothing_counted(target, opts)
        d = torch.where(smoothed, eps / n_classes * g / dens.terms[1] if mean
                        else eps / n_classes * g, zero)
        total = n_classes if weight is None else weight.float().sum()
        a = b + d * total
    if opts.z_loss:
        dz = torch.where(ok, 2 * opts.z_loss * g / dens.z if mean else 2 * opts.z_loss * g,
                         zero)
    nan = torch.where(bad, math.nan, 0.0)
    return _Rows(y, ok, smoothed, nan, (1.0 - eps) * w_y, b, a, d, dz)


def _plain_block(x, rows: _Rows, weight, opts: Options, dens: Parts, grad, scratch,
                 stats=None):
    """One block of rows of ``_run_blocks``: (R, C) half-precision or float32 logits on the
    CPU, class targets, no softcap, float32 math: the block's (loss part, z-loss part or
    None), and with ``grad`` (which may be ``x`` itself) its gradient written, without
    autograd. A temperature or logit scale makes z = x scale / T (a float32 copy; the
    gradient's factors carry scale / T, ``_plain_rows``).

    With p = softmax(z) and e the smoothing, a row's loss is ``(1 - e) w_y (lse - z_y)
    + e/C (W lse - sum_c w_c z_c)`` (W = sum_c w_c; w = 1 without weights) (+ ``z_loss
    lse^2``), its gradient ``a p - b e_y - d w`` with b = (1 - e) w_y g / den, d = e g / (C
    den_s), a = b + d W (+ 2 z_loss lse g / den_z) (g the upstream gradient, den the terms'
    mean denominators, 1 for ``sum``/``none``; 0 where a term does not count the row:
    ``_plain_rows``). ``lse = max z - log(max p)``: max p = 1 / sum exp(z - max z) is at
    least 1/C, so it never underflows as p_y can (and a softmax is cheaper than a
    logsumexp). The gradient is formed in float32 and rounded once into ``grad``; the
    target's entry is then overwritten by ``a p_y - b - d w_y``, formed in float32 (no
    p_y - 1 after a rounding). Passes over the block: the upcast, two max, the softmax, the
    gradient (and with smoothing a sum, and a second float32 pass where there are class
    weights). Float32 temporaries: p, and z for half logits, reused from block to block
    (``scratch``). With ``stats`` (3, R), the rows' ``combine_stats`` statistics (m~, log2 s
    = -log2 max p, the smoothing's W) written there, 0 on rows not counted."""
    n_rows, n_classes = x.shape
    z = x
    mult = opts.logit_scale / opts.temperature  # the transform (no softcap here): z = mult x
    if x.dtype != torch.float32 or mult != 1.0:
        z = _scratch(scratch, "z", x.shape)
        z.copy_(x)  # (upcast first: x * mult would round in x's dtype)
        if mult != 1.0:
            z.mul_(mult)
    m = z.amax(1)
    p = _scratch(scratch, "p", x.shape)
    torch.softmax(z, 1, out=p)
    # NaN where a logit is NaN or +inf, or every logit -inf, as torch's log_softmax
    max_p = p.amax(1)
    lse = m - max_p.log()
    z_y = z.gather(1, rows.y[:, None]).squeeze(1)
    terms = [torch.where(rows.ok, rows.w_y * (lse - z_y), rows.nan)]
    w = None if weight is None else weight.reshape(-1).float()
    total = n_classes if w is None else w.sum()
    if stats is not None:
        stats[0] = torch.where(rows.ok & (m != -math.inf), m, 0.0)
        stats[1] = torch.where(rows.ok, -max_p.log2(), 0.0)
        stats[2] = torch.where(rows.ok & (opts.smoothing > 0.0), total, 0.0)
    if rows.smoothed is not None:
        weighted_z = z.sum(1) if w is None else z @ w
        terms.append(torch.where(rows.smoothed, opts.smoothing / n_classes
                                 * (total * lse - weighted_z), rows.nan))
    z_rows, a = None, rows.a
    if opts.z_loss:  # torch's logsumexp there: +-inf for such rows, not NaN
        lse = torch.where(m.isinf(), m, lse)
        z_rows = torch.where(rows.ok, opts.z_loss * lse**2, rows.nan)
        if rows.dz is not None:
            a = a + rows.dz * lse
    out, z_out = reduce_parts(Parts(terms, z_rows), dens, opts.reduction)
    if grad is None:
        return out, z_out
    at_target = torch.arange(n_rows), rows.y
    target_grad = a * p[at_target] - rows.b
    if rows.d is None:
        torch.mul(p, a[:, None], out=grad)
    elif w is None:  # a p - d, in one rounding
        torch.addcmul(-rows.d[:, None], p, a[:, None], out=grad)
        target_grad = target_grad - rows.d
    else:
        p.mul_(a[:, None]).addr_(rows.d, w, alpha=-1.0)
        grad.copy_(p)
        target_grad = target_grad - rows.d * w[rows.y]
    grad[at_target] = target_grad.to(grad.dtype)
    return out, z_out


def _scratch(scratch: dict, name: str, shape) -> torch.Tensor:
    """A float32 buffer of ``shape`` from the thread's scratch (the first rows of the
    largest block's)."""
    buf = scratch.get(name)
    if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:]:
        buf = scratch[name] = torch.empty(shape, dtype=torch.float32)
    return buf[: shape[0]]


def _blocks(x: torch.Tensor):
    """Slices of about BLOCK_ELEMENTS elements along the first dimension; logits of a few
    blocks' size are cut into one block per thread (down to an eighth of BLOCK_ELEMENTS
    each), so that they too run on every core without torch's parallel regions."""
    n_rows, numel = x.shape[0], x.numel()
    n_blocks = max(math.ceil(numel / BLOCK_ELEMENTS),
                   min(torch.get_num_threads(), numel // (BLOCK_ELEMENTS // 8)))
    rows = max(1, math.ceil(n_rows / max(1, n_blocks)))
    return [slice(start, start + rows) for start in range(0, n_rows, rows)]


def _join(outs, reduction: str):
    """The (loss, z-loss term) of a call from its blocks' parts."""
    losses = [o[0] for o in outs]
    zs = [o[1] for o in outs]
    if reduction == "none":
        return torch.cat(losses), None if zs[0] is None else torch.cat(zs)
    return sum(losses), None if zs[0] is None else sum(zs)


def cross_entropy(input, target, weight, opts: Options, out_dtype):
    """The eager (loss, z-loss term or None), in ``out_dtype``, for a validated call.

    float32 and float64 logits run the formula as it is (autograd keeps what it needs); half
    precision ones a block of rows at a time (``HalfCrossEntropy``), except under
    torch.compile and ``torch.func`` transforms, which trace the formula whole."""
    x, t = input, target
    if x.dim() == 1:  # (C,): one row; a (1,) target means the same as a 0-d one
        x = x.unsqueeze(0)
        t = t.unsqueeze(0) if opts.prob_target else t.reshape(1)
    blocks = (x.dtype in (torch.float16, torch.bfloat16) and not opts.prob_target
              and not torch.compiler.is_compiling() and not _functorch_wrapped(x)
              and x.shape[0] > 0)
    if blocks:
        loss, z = HalfCrossEntropy.apply(x, t, weight, opts)
        z = z if opts.z_loss else None
    else:
        loss, z = cross_entropy_float(x, t, weight, opts)
    if input.dim() == 1 and opts.reduction == "none":
        loss, z = loss.reshape(()), None if z is None else z.reshape(())
    return as_dtype(loss, out_dtype), None if z is None else as_dtype(z, out_dtype)


def _functorch_wrapped(x: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # pragma: no cover - a torch without that private helper
        return False


# ------------------------------------------------------------------------------------------
# the row statistics of a block of classes: the twins of cross_entropy.py's building blocks
#
# ``partial_stats``, ``combine_stats``, ``grad_from_stats``, ``denominators``, with their
# contracts and their arithmetic (``_ce_math.py`` writes it out), for the callers that split a
# row's classes among blocks on the eager backend: the vocab-parallel loss
# (``fused_losses/distributed/``) and anything else that merges statistics of several
# blocks. Also the reductions both backends share (``reduce_rows``, ``upstream_scales``).
#
# A block's statistics, for rows of ``n_classes`` and the block's classes ``[class_offset,
# class_offset + width)`` (the logits transformed first; m~ = m, or 0 where m = -inf):
#
#     m  max_c z_c          s  sum_c exp(z_c - m~)
#     a  sum_c k_c (z_c - m~)        k  sum_c k_c      (smoothing or probability targets)
#     z_y  the target's logit where the target is in the block, else 0
#
# Rows not counted (ignored, out of range) read nothing: m = -inf, s = a = k = z_y = 0. The
# math runs in float32 (float64 where the logits or the weights are float64).
# ------------------------------------------------------------------------------------------


STATS = 5  # m, s, a, k, z_y


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """An (outer, inner, width) view (the kernels' row addressing), or (rows, width), as
    (rows, width)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def stats_dtype(kernels: bool, dtype: torch.dtype, weight) -> torch.dtype:
    """The dtype of the cross-entropy's row statistics (``combine_stats``' (3, rows)) for
    logits of ``dtype``: float32 on the kernels, the eager formula's compute dtype
    elsewhere."""
    if kernels:
        return torch.float32
    return compute_dtype(dtype, *(() if weight is None else (weight.dtype,)))


def _stat_targets(target, weight, opts: Options, n_rows: int, n_classes: int, dtype):
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
        t = _as_rows(target).to(dtype)
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
    x2 = _as_rows(x)
    n_rows, width = x2.shape
    n_classes = n_classes or width
    dtype = stats_dtype(False, x2.dtype, weight)
    out = torch.zeros(1, STATS, n_rows, dtype=dtype, device=x2.device)
    y, ok, _, _ = _stat_targets(target, weight, opts, n_rows, n_classes, dtype)
    out[0, 0] = -math.inf
    if width == 0 or n_rows == 0:
        return out
    z = transformed_logits(x2, opts, dtype)
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
    _, ok, bad, w_y = _stat_targets(target, weight, opts, n_rows, n_classes, dtype)
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
    x2 = _as_rows(x)
    n_rows, width = x2.shape
    n_classes = n_classes or width
    if n_rows == 0 or width == 0:
        return
    dtype = stats.dtype
    z = transformed_logits(x2, opts, dtype)
    m_safe, log2_s, k = stats[0], stats[1], stats[2]
    sc = scales.reshape(-1, 2).to(dtype)
    scale, z_scale = sc[:, 0], sc[:, 1]
    y, ok, bad, w_y = _stat_targets(target, weight, opts, n_rows, n_classes, dtype)
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
    slope = transform_slope(z, opts)
    if not isinstance(slope, float) or slope != 1.0:
        d = d * slope
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


def chunk_grad_from_stats(x, target, weight, stats, scales, opts: Options, *, grad,
                          class_offset: int = 0, n_classes: int | None = None) -> None:
    """``grad_from_stats`` of a chunk or tile of logits (R, width) of class targets, a block
    of rows at a time over the CPU's cores: its temporaries a few blocks', not the tile's
    (``grad`` may be ``x``)."""
    blocks = _blocks(x)
    per_row = scales.dim() == 2
    # float32 logits of class targets, no softcap, overwritten: in place, in a few passes
    plain = (grad is x and x.dtype == torch.float32 and stats.dtype == torch.float32
             and opts.softcap is None and not opts.prob_target)
    row_grad = _plain_tile_grad_ if plain else grad_from_stats

    def one(i, scratch):
        rows = blocks[i]
        row_grad(x[rows], target[rows], weight, stats[:, rows],
                 scales[rows] if per_row else scales, opts, grad=grad[rows],
                 class_offset=class_offset, n_classes=n_classes)

    _threads.run_blocks(one, len(blocks), x.device)


def _plain_tile_grad_(x, target, weight, stats, scales, opts: Options, *, grad,
                      class_offset: int, n_classes: int | None) -> None:
    """``grad_from_stats`` of float32 logits (R, width) of class targets without softcap,
    written over them (``grad`` is ``x``) in place: d = mult (p (hot + extra) - kc w_c),
    less mult hot at the target, p = exp(mult x - lse)."""
    n_rows, width = x.shape
    n_classes = n_classes or width
    if n_rows == 0 or width == 0:
        return
    mult = opts.logit_scale / opts.temperature
    m_safe, log2_s, k = stats[0], stats[1], stats[2]
    sc = scales.reshape(-1, 2).float()
    scale, z_scale = sc[:, 0], sc[:, 1]
    y, ok, bad, w_y = _stat_targets(target, weight, opts, n_rows, n_classes, torch.float32)
    lse = m_safe + log2_s * LN2
    extra = z_scale * lse
    hot = scale * w_y
    kc = None
    if opts.smoothing > 0.0:
        hot = hot * (1.0 - opts.smoothing)
        kc = scale * (opts.smoothing / n_classes)
        extra = extra + kc * k
    if mult != 1.0:
        x.mul_(mult)
    x.sub_(lse.unsqueeze(1)).exp_().mul_(((hot + extra) * mult).unsqueeze(1))
    if kc is not None:  # - mult kc w_c (w_c = 1 without class weights)
        w_c = (torch.ones(width, dtype=torch.float32) if weight is None
               else weight.float()[class_offset:class_offset + width])
        x.addr_((kc * mult).expand(n_rows).contiguous(), w_c, alpha=-1.0)
    local = y - class_offset
    mine = ok & (local >= 0) & (local < width)
    x.scatter_add_(1, torch.where(mine, local, 0).unsqueeze(1),
                   torch.where(mine, -hot * mult, 0.0).unsqueeze(1))
    x.masked_fill_(~ok.unsqueeze(1), 0.0)
    x[bad] = math.nan


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


# ------------------------------------------------------------------------------------------
# log-probabilities and entropy: the torch mirror of _ce_math's (its module doc has the math)
# ------------------------------------------------------------------------------------------


def max_entropy(n_classes: int) -> float:
    """ln C rounded down to a float32: the most an entropy of C classes can be (the float32
    sum of C equal terms may round above it). Plain math on a Python number, which
    torch.compile folds into a constant (no decorator: torch.compiler's would import Dynamo,
    and with it Triton, when this module is imported)."""
    exact = math.log(max(n_classes, 1))
    mantissa, exponent = math.frexp(exact)  # exact = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return math.ldexp(math.floor(math.ldexp(mantissa, 24)), exponent - 24)  # float32's 24 bits


# The per-token outputs a log-prob pass may be asked for besides log p_y: TRL 1.16's names, in
# its order (``ChunkedLogProbFunction``'s ``outputs``). Only the entropy carries a gradient;
# the other three are statistics for logging and metrics, without one (as TRL's).
EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
NON_DIFFERENTIABLE = ("log_sum_sq_probs", "mean_logits", "is_top1")


class RowOutputs(NamedTuple):
    """A log-prob pass's per-row results: log p_y, and each output requested (``outputs``,
    among ``EXTRA_OUTPUTS``), None where not requested. float32 (float64 for float64
    logits); ``is_top1`` bool. Rows not counted give 0 (False)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None  # log sum_c p_c^2
    mean_logits: torch.Tensor | None = None  # sum_c z_c / C, of the transformed logits
    is_top1: torch.Tensor | None = None  # the target is the first argmax of the row


def allocate_rows(n_rows: int, outputs: tuple, dtype: torch.dtype, device):
    """Buffers for a log-prob pass's ``out``: (``RowOutputs`` with a buffer for log p_y and
    each of ``outputs``, None for the others (``dtype``; is_top1 bool), the statistics
    (rows, 2))."""
    def buf(name):
        if name != "log_probs" and name not in outputs:
            return None
        return torch.empty(n_rows, dtype=torch.bool if name == "is_top1" else dtype,
                           device=device)

    return (RowOutputs(*(buf(name) for name in RowOutputs._fields)),
            torch.empty(n_rows, 2, dtype=dtype, device=device))


def present(rows: RowOutputs) -> tuple:
    """The tensors of ``rows`` that were requested, in order: what an autograd Function
    returns (torch.compile cannot trace the backward of a Function that returns None)."""
    return tuple(t for t in rows if t is not None)


def unpack(tensors, outputs: tuple) -> RowOutputs:
    """``RowOutputs`` from ``present``'s tensors of a call that requested ``outputs``."""
    it = iter(tensors)
    log_p = next(it)
    return RowOutputs(log_p, *(next(it) if name in outputs else None for name in EXTRA_OUTPUTS))


def _log_prob_targets(target: torch.Tensor, opts: Options, n_classes: int):
    """(y, counted, out of range) of class indices."""
    y = target.reshape(-1).long()
    valid = y != opts.ignore_index
    ok = valid & (y >= 0) & (y < n_classes)
    return y, ok, valid & ~ok


def _log_sum_sq(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log sum_c p_c^2 = ln q - 2 ln s (_ce_math's ``row_extras``), at most 0."""
    return ((q.log2() - 2.0 * s.log2()) * LN2).clamp(max=0.0)


def _first_max(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The first class whose logit is its row's max ``m`` (argmax's first maximum); -1 where
    the max is -inf (a row of -inf logits has no top-1: TRL's)."""
    if z.shape[-1] == 0:
        return torch.full(z.shape[:-1], -1, dtype=torch.long, device=z.device)
    return torch.where(m == -math.inf, -1, z.argmax(-1))


def row_log_probs(x: torch.Tensor, target: torch.Tensor, opts: Options, *,
                  outputs: tuple = ()):
    """(RowOutputs: log p_y and the ``outputs`` requested, statistics (rows, 2): m~, log2 s)
    of rows ``x`` (R, C), in float32 (float64 for float64 logits), differentiable in ``x``
    (the entropy; the other outputs carry no gradient): the eager path, the double backward,
    and the eager twin of ``log_probs.row_log_probs``.

    The row's statistics as the kernels form them (m~ the max, s = sum exp(z - m~), b = sum
    exp(z - m~) (z - m~)): log p_y = (z_y - m~) - ln s, H = ln s - b / s, both exact for
    confident rows (no cancellation); log sum p^2 = ln q - 2 ln s with q = sum exp(z - m~)^2,
    the mean logit sum z / C, top-1 the first argmax. Rows not counted give 0, out-of-range
    targets NaN (is_top1: False)."""
    dtype = compute_dtype(x.dtype)
    z = transformed_logits(x, opts, dtype)
    n_classes = z.shape[-1]
    y, ok, bad = _log_prob_targets(target, opts, n_classes)
    m_raw = z.detach().amax(-1) if n_classes else z.new_full(z.shape[:1], -math.inf)
    m = torch.where(m_raw == -math.inf, 0.0, m_raw).unsqueeze(-1)  # no -inf - -inf
    zm = z - m
    e = zm.exp()
    s = e.sum(-1)
    ln_s = s.log()
    nan = torch.where(bad, math.nan, 0.0).to(dtype)
    z_y = zm.gather(-1, torch.where(ok, y, 0).unsqueeze(-1)).squeeze(-1)
    out = {"log_probs": torch.where(ok, z_y - ln_s, nan)}
    if "entropy" in outputs:
        # where(e > 0, ...) on z - m first: a -inf logit adds 0 and back-propagates 0
        b = (e * torch.where(e > 0, zm, 0.0)).sum(-1)
        h = ln_s - b / s
        # at most ln C, the gradient the formula's (the bound only rounds the value)
        h = h - (h - max_entropy(n_classes)).clamp(min=0.0).detach()
        out["entropy"] = torch.where(ok, h, nan)
    # the statistics without a gradient (detached: they never require one, as TRL's)
    if "log_sum_sq_probs" in outputs:
        q = e.detach().square().sum(-1)
        out["log_sum_sq_probs"] = torch.where(ok, _log_sum_sq(q, s.detach()), nan)
    if "mean_logits" in outputs:
        out["mean_logits"] = torch.where(ok, z.detach().sum(-1) / n_classes, nan)
    if "is_top1" in outputs:
        out["is_top1"] = ok & (_first_max(z.detach(), m_raw) == y)
    stats = torch.stack([torch.where(ok, m.squeeze(-1), 0.0),
                         torch.where(ok, s.log2(), 0.0)], dim=-1).detach()
    return RowOutputs(**out), stats


def log_prob_grad(x: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, h, g, g_h,
                  opts: Options, *, grad: torch.Tensor, class_offset: int = 0,
                  n_classes: int | None = None) -> None:
    """Write d out / d x of rows ``x`` (R, C) into ``grad`` for the upstream gradients ``g``
    of log p_y and ``g_h`` of the entropy ``h`` (None: no such term), from the rows'
    statistics (``row_log_probs``): _ce_math's ``log_prob_grad_block`` in torch ops,

        d = (c - p a) dz/dx,   c = g [c = y],   a = g + g_H (log p + H).

    A block of classes ``[class_offset, class_offset + C)`` of rows of ``n_classes`` (a
    vocab-sharded head's): the statistics and entropy are the whole rows', the targets
    global, c only where the target is in the block."""
    if x.numel() == 0:
        return
    dtype = stats.dtype
    z = transformed_logits(x, opts, dtype)
    width = z.shape[-1]
    y, ok, bad = _log_prob_targets(target, opts, n_classes or width)
    log_p = z - (stats[:, 0] + stats[:, 1] * LN2).unsqueeze(-1)
    p = log_p.exp()
    a = torch.zeros_like(ok, dtype=dtype).unsqueeze(-1)
    c = torch.zeros_like(p)
    if g is not None:
        g = g.reshape(-1).to(dtype)
        a = a + g.unsqueeze(-1)
        local = y - class_offset
        mine = ok & (local >= 0) & (local < width)
        c.scatter_(-1, torch.where(mine, local, 0).unsqueeze(-1),
                   torch.where(mine, g, 0.0).unsqueeze(-1))
    if g_h is not None:
        a = a + g_h.reshape(-1).to(dtype).unsqueeze(-1) * (log_p + h.unsqueeze(-1))
    d = torch.where(p == 0, c, torch.addcmul(c, p, a, value=-1.0))  # p NaN: NaN, as torch
    slope = transform_slope(z, opts)
    if not isinstance(slope, float) or slope != 1.0:
        d = d * slope
    nan = torch.where(bad, math.nan, 0.0).to(dtype).unsqueeze(-1)
    grad.copy_(torch.where(ok.unsqueeze(-1), d, nan).view(grad.shape))


def _transform_(z: torch.Tensor, opts: Options) -> torch.Tensor:
    """``transformed_logits`` in place (a chunk of logits that is scratch); without softcap
    one multiply by scale / T."""
    if opts.softcap is None:
        mult = opts.logit_scale / opts.temperature
        return z.mul_(mult) if mult != 1.0 else z
    if opts.logit_scale != 1.0:
        z.mul_(opts.logit_scale)
    z.div_(opts.softcap).tanh_().mul_(opts.softcap)
    if opts.temperature != 1.0:
        z.div_(opts.temperature)
    return z


def chunk_log_probs_(logits: torch.Tensor, target: torch.Tensor, opts: Options, *,
                     outputs: tuple, out: tuple, work: torch.Tensor) -> None:
    """``row_log_probs`` of an LM-head chunk whose logits (R, C) are scratch: overwritten,
    with one logits-sized workspace ``work`` and no other temporary of their size (the CPU
    allocates and faults in every new large tensor: a fresh one per op costs more than the
    op). Writes log p_y, the ``outputs`` requested and (m~, log2 s) into ``out`` (a
    ``RowOutputs`` of buffers, the statistics). Not differentiable."""
    rows, stats = out
    z = _transform_(logits, opts)
    n_classes = z.shape[-1]
    y, ok, bad = _log_prob_targets(target, opts, n_classes)
    m = z.amax(-1, keepdim=True)
    nan = torch.where(bad, math.nan, 0.0).to(z.dtype)
    # the plain sum and the first argmax read z before it becomes z - m
    if "mean_logits" in outputs:
        rows.mean_logits.copy_(torch.where(ok, z.sum(-1) / n_classes, nan))
    if "is_top1" in outputs:
        rows.is_top1.copy_(ok & (_first_max(z, m.squeeze(-1)) == y))
    m = torch.where(m == -math.inf, 0.0, m)
    z_y = z.gather(-1, torch.where(ok, y, 0).unsqueeze(-1)).squeeze(-1)
    zm = z.sub_(m)
    e = torch.exp(zm, out=work)
    s = e.sum(-1)
    ln_s = s.log()
    m = m.squeeze(-1)
    rows.log_probs.copy_(torch.where(ok, (z_y - m) - ln_s, nan))
    if "entropy" in outputs:
        b = torch.bmm(e.unsqueeze(1), zm.unsqueeze(-1)).view(-1)  # row dot products (BLAS)
        # a -inf logit makes its row's dot product NaN (0 * -inf): those rows again, masked
        redo = torch.isnan(b) & ok
        if bool(redo.any()):
            redo_rows = redo.nonzero().squeeze(-1)
            b[redo_rows] = (e[redo_rows] * torch.where(e[redo_rows] > 0, zm[redo_rows],
                                                       0.0)).sum(-1)
        ent = ln_s - b / s
        rows.entropy.copy_(torch.where(ok, ent.clamp(max=max_entropy(n_classes)), nan))
    if "log_sum_sq_probs" in outputs:
        q = torch.bmm(e.unsqueeze(1), e.unsqueeze(-1)).view(-1)  # sum e^2, no temporary
        rows.log_sum_sq_probs.copy_(torch.where(ok, _log_sum_sq(q, s), nan))
    stats[:, 0] = torch.where(ok, m, 0.0)
    stats[:, 1] = torch.where(ok, s.log2(), 0.0)


# log p below which exp(log p) is 0 in each dtype (the least subnormal's log, rounded down)
_LOG_P_FLOOR = {torch.float32: -200.0, torch.float64: -800.0}


def chunk_log_prob_grad_(logits: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, h,
                         g, g_h, opts: Options, *, grad: torch.Tensor, work: tuple,
                         class_offset: int = 0, n_classes: int | None = None) -> None:
    """``log_prob_grad`` of an LM-head chunk whose logits (R, C) are scratch (overwritten;
    ``grad`` may be them), with two logits-sized workspaces ``work`` (``chunk_log_probs_``'s
    reason), in as few passes as it takes: d = p a' (+ c at the target), where
    a' = -mult (g + g_H (log p + H)) folds the negation and the transform's factor in.
    ``class_offset``, ``n_classes``: a block of classes of longer rows (``log_prob_grad``)."""
    if logits.numel() == 0:
        return
    p, slope = work
    z = _transform_(logits, opts)
    width = z.shape[-1]
    y, ok, bad = _log_prob_targets(target, opts, n_classes or width)
    dtype = p.dtype
    mult = opts.logit_scale / opts.temperature
    scale = -1.0
    if opts.softcap is not None:  # mult (1 - t^2), t = z / softcap', from the output
        torch.mul(z, opts.temperature / opts.softcap, out=slope)
        slope.square_().neg_().add_(1.0).mul_(mult)
    else:
        scale = -mult
    log_p = z.sub_((stats[:, 0] + stats[:, 1] * LN2).unsqueeze(-1))
    torch.exp(log_p, out=p)
    g = None if g is None else g.reshape(-1).to(dtype)
    k = torch.zeros_like(stats[:, 0]) if g is None else g.clone()
    if g_h is not None:
        g_h = g_h.reshape(-1).to(dtype)
        k = k + g_h * h
        # a -inf logit has p = 0 and log p = -inf: clamped, its term is 0 * finite = 0 (a
        # log p below the bound has p = 0 in the dtype anyway: exp(-104) already rounds to 0
        # in float32, exp(-746) in float64; a fixed -200 clamped float64's p = 1e-87..1e-300)
        a = torch.addcmul((k * scale).unsqueeze(-1), log_p.clamp_(min=_LOG_P_FLOOR[dtype]),
                          (g_h * scale).unsqueeze(-1), out=log_p)
        d = torch.mul(p, a, out=grad)
    else:
        d = torch.mul(p, (k * scale).unsqueeze(-1), out=grad)
    if g is not None:  # + g dz/dx at the target (c - p a, the sign folded into a')
        local = y - class_offset
        mine = ok & (local >= 0) & (local < width)
        d.scatter_add_(-1, torch.where(mine, local, 0).unsqueeze(-1),
                       torch.where(mine, g * -scale, 0.0).unsqueeze(-1).to(d.dtype))
    if opts.softcap is not None:
        d.mul_(slope)
    if not bool(ok.all()):  # rows not counted: 0; out of range: NaN
        d[~ok] = torch.where(bad[~ok], math.nan, 0.0).to(d.dtype).unsqueeze(-1)


# A block of classes' statistics of each row for a vocab-sharded head, (LP_STATS, rows):
# m, s, b, z_y, q, Z (``row_log_probs``' statistics, each relative to the block's own max),
# and j, the first argmax as a global class index (-1: none), stored as an integer of the
# statistics' width in their buffer (exact for any vocabulary). Rows not counted: m = -inf,
# the sums 0. A fixed layout: every rank's all-gather block has one size whatever it asks.
LP_STATS = 7
LP_INDEX_DTYPE = {torch.float32: torch.int32, torch.float64: torch.int64}


def log_prob_partial_stats(x: torch.Tensor, target: torch.Tensor, opts: Options, *,
                           class_offset: int, n_classes: int, outputs: tuple,
                           out: torch.Tensor) -> None:
    """Write the ``LP_STATS`` statistics of the block of classes ``[class_offset,
    class_offset + C)`` of rows ``x`` (R, C) of ``n_classes`` into ``out`` (LP_STATS, R)
    (float32, float64 for float64 logits); b, q, Z, j only where ``outputs`` asks for them
    (else 0, -1). ``target``: global class indices. Not differentiable."""
    dtype = out.dtype
    n_rows, width = x.shape
    y, ok, _ = _log_prob_targets(target, opts, n_classes)
    out.zero_()
    out[0] = -math.inf
    out[6].view(LP_INDEX_DTYPE[dtype]).fill_(-1)
    if n_rows == 0 or width == 0:
        return
    z = transformed_logits(x.detach(), opts, dtype)
    m = z.amax(-1)
    m_safe = torch.where(m == -math.inf, 0.0, m)
    zm = z - m_safe.unsqueeze(-1)
    e = zm.exp()
    out[0] = torch.where(ok, m, -math.inf)
    out[1] = torch.where(ok, e.sum(-1), 0.0)
    local = y - class_offset
    mine = ok & (local >= 0) & (local < width)
    z_y = z.gather(-1, torch.where(mine, local, 0).unsqueeze(-1)).squeeze(-1)
    out[3] = torch.where(mine, z_y, 0.0)
    if "entropy" in outputs:
        out[2] = torch.where(ok, (e * torch.where(e > 0, zm, 0.0)).sum(-1), 0.0)
    if "log_sum_sq_probs" in outputs:
        out[4] = torch.where(ok, e.square().sum(-1), 0.0)
    if "mean_logits" in outputs:
        out[5] = torch.where(ok, z.sum(-1), 0.0)
    if "is_top1" in outputs:
        j = _first_max(z, m)
        out[6].view(LP_INDEX_DTYPE[dtype]).copy_(
            torch.where(ok & (j >= 0), j + class_offset, -1))


def combine_log_prob_stats(partials: torch.Tensor, target: torch.Tensor, opts: Options,
                           n_classes: int, outputs: tuple, out: tuple) -> None:
    """Merge the blocks' statistics (blocks, LP_STATS, rows) (``log_prob_partial_stats``,
    the blocks in class order) into the rows' log p_y and the ``outputs`` requested, and
    (m~, log2 s) of the whole rows, written into ``out`` (``allocate_rows``' buffers), as
    ``row_log_probs`` gives them for whole rows: each block's sums moved to the row's max
    (exact, ``_ce_math``'s merges), then log p_y = z_y - m~ - ln S, H = ln S - B / S,
    log sum p^2 = ln Q - 2 ln S, the mean Z / C, top-1 the first global argmax. The same
    torch ops on every rank: bitwise the same results."""
    rows, stats = out
    m_p, s_p, b_p, zy_p, q_p, zs_p, _ = partials.unbind(1)
    m = m_p.amax(0)
    m_safe = torch.where(m == -math.inf, 0.0, m)
    mp_safe = torch.where(m_p == -math.inf, 0.0, m_p)
    r = (m_p - m_safe).exp()  # a block with m = -inf adds nothing
    s = (s_p * r).sum(0)
    y, ok, bad = _log_prob_targets(target, opts, n_classes)
    nan = torch.where(bad, math.nan, 0.0).to(partials.dtype)
    log2_s = s.log2()
    ln_s = log2_s * LN2
    rows.log_probs.copy_(torch.where(ok, (zy_p.sum(0) - m_safe) - ln_s, nan))
    if rows.entropy is not None:
        b = (r * (b_p + (mp_safe - m_safe) * s_p)).sum(0)
        h = (ln_s - b / s).clamp(max=max_entropy(n_classes))
        rows.entropy.copy_(torch.where(ok, h, nan))
    if rows.log_sum_sq_probs is not None:
        q = (q_p * r.square()).sum(0)
        rows.log_sum_sq_probs.copy_(torch.where(ok, _log_sum_sq(q, s), nan))
    if rows.mean_logits is not None:
        rows.mean_logits.copy_(torch.where(ok, zs_p.sum(0) / n_classes, nan))
    if rows.is_top1 is not None:
        j_p = partials[:, 6].contiguous().view(LP_INDEX_DTYPE[partials.dtype]).long()
        # among the blocks that hold the row's max, the first class (blocks in class order)
        at_max = (m_p == m) & (m != -math.inf) & (j_p >= 0)
        j = torch.where(at_max, j_p, n_classes).amin(0)
        rows.is_top1.copy_(ok & (j == y))
    stats[:, 0] = torch.where(ok, m_safe, 0.0)
    stats[:, 1] = torch.where(ok, log2_s, 0.0)


def log_probs(input: torch.Tensor, target: torch.Tensor, opts: Options, outputs: tuple = ()):
    """The eager ``RowOutputs`` (log p_y and the ``outputs`` requested) of logits (..., C)
    against class indices (...), float32 (float64 for float64 logits), shaped like the
    target, differentiable by autograd (the entropy; the other outputs carry no gradient)."""
    n_classes = input.shape[-1]
    rows, _ = row_log_probs(input.reshape(-1, n_classes), target, opts, outputs=outputs)
    return RowOutputs(*(None if t is None else t.view(target.shape) for t in rows))


# ------------------------------------------------------------------------------------------
# distillation: the generalized JSD between a student's and a teacher's rows (TRL's)
# ------------------------------------------------------------------------------------------


class DistillOptions(NamedTuple):
    """A distillation call's options (validated by the caller): ``beta`` (0: KL(teacher ||
    student); 1: KL(student || teacher); between: the generalized JSD through the mixture
    (1 - beta) p_s + beta p_t) and each head's logits' transform (``Options``' logit scale,
    softcap and temperature; its other fields unused)."""

    beta: float = 0.5
    student: Options = Options()
    teacher: Options = Options()


def _p_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_c p (log p - log q) over the last dimension, p = exp(log p): a class of p = 0
    adds 0 (0 log 0 = 0: a masked -inf logit, an underflowed probability), never NaN, and
    back-propagates 0; one of p > 0 = q adds +inf, the truth."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _mixture(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """log((1 - beta) p_s + beta p_t). The log-probabilities clamped to the dtype's lowest
    finite value first: a class both give -inf would make logaddexp's gradient NaN (its
    exp(-inf - -inf)); clamped, that class's mixture is about -3.4e38 and its p's 0."""
    low = torch.finfo(log_s.dtype).min
    return torch.logaddexp(log_s.clamp(min=low) + math.log1p(-beta),
                           log_t.clamp(min=low) + math.log(beta))


def divergence(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Each row's divergence from the student's and the teacher's log-probabilities (TRL's
    ``generalized_jsd_loss`` summed over the classes), differentiable by autograd."""
    if beta == 0.0:
        return _p_log_ratio(log_t, log_s)
    if beta == 1.0:
        return _p_log_ratio(log_s, log_t)
    mix = _mixture(log_s, log_t, beta)
    return beta * _p_log_ratio(log_t, mix) + (1.0 - beta) * _p_log_ratio(log_s, mix)


def divergence_rows(s: torch.Tensor, t: torch.Tensor, opts: DistillOptions) -> torch.Tensor:
    """The divergence of each row of the student's logits ``s`` (R, C) from the teacher's
    ``t`` (R, C), float32 (float64 where either is), differentiable by autograd in both: the
    double backward's formula and the tests' reference of the chunked one."""
    dtype = compute_dtype(s.dtype, t.dtype)
    log_s = torch.log_softmax(transformed_logits(s, opts.student, dtype), -1)
    log_t = torch.log_softmax(transformed_logits(t, opts.teacher, dtype), -1)
    return divergence(log_s, log_t, opts.beta)


def _max_and_sum(z: torch.Tensor, work: torch.Tensor):
    """(m~, s) of rows ``z`` (R, C), keepdim: m~ the max (0 where it is -inf), s = sum
    exp(z - m~) (``work``: a buffer of z's shape for the exponentials; z is not changed).
    ln p = (z - m~) - ln s; an all -inf row gives NaN there, as torch's log_softmax."""
    m = z.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, 0.0, m)
    return m, torch.exp(torch.sub(z, m, out=work), out=work).sum(-1, keepdim=True)


def _kl_from_logits_(z_p, z_q, stats_p, stats_q, w1, w2):
    """KL(p | q) of each row from the logits ``z_p``, ``z_q`` (R, C) and their rows'
    ``_max_and_sum`` (``z_p`` is scratch: overwritten by p), the online form the Triton
    kernel uses:

        KL = sum_c p_c (z_p - z_q)_c + (m_q - m_p) + ln(s_q / s_p)

    -- no log-probability is formed, so no class's term carries the rounding of a large
    log-sum-exp (on KLs of ~20 nats, 5x closer to float64 than sum p (log p - log q)), and
    the normalizers' difference is one logarithm of a ratio. Returns (KL (R,), p (over
    ``z_p``), z_p - z_q (in ``w2``, 0 where p = 0), its expectation sum p (z_p - z_q))."""
    (m_p, s_p), (m_q, s_q) = stats_p, stats_q
    diff = torch.sub(z_p, z_q, out=w2)
    p = z_p.sub_(m_p).exp_().div_(s_p)
    expected = _p_times_(diff, p, out=w1)
    return expected + ((m_q - m_p) + (s_q / s_p).log()).squeeze(-1), p, diff, expected


def _p_times_(ratio: torch.Tensor, p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum_c p ratio of each row, ratio set to 0 first where p = 0 (0 log 0 = 0); the
    products in ``out`` (which may be ``ratio``), then torch's sum. (Not a BLAS row dot
    product: its long float32 accumulations are biased, 2e-5 on a JSD of 0.69 over 32k
    classes, where torch's cascaded sum is 1e-6 off.)"""
    ratio.masked_fill_(p == 0, 0.0)
    return torch.mul(p, ratio, out=out).sum(-1)


def chunk_divergence_(s: torch.Tensor, t: torch.Tensor, opts: DistillOptions, *,
                      loss: torch.Tensor, row_scale: torch.Tensor | None = None,
                      grad: torch.Tensor | None = None, work: tuple | None = None) -> None:
    """The divergence of each row of a chunk whose student and teacher logits ``s``, ``t``
    (R, C) are scratch (float32 or float64; overwritten) into ``loss`` (R,); with ``grad``
    (which may be ``s``), d (sum_r row_scale_r loss_r) / d s into it, from the closed forms
    (z the student's transformed logits, KL_s = sum p_s (log p_s - m)):

        beta = 0:  p_s - p_t
        beta = 1:  p_s (log p_s - log p_t - loss)
        between:   (1 - beta) p_s (log p_s - m - KL_s),   m = log((1 - beta) p_s + beta p_t)

    times d z / d s. A class of p = 0 adds 0 and gets 0 (no 0 * inf). In place: two
    workspaces of the chunk's shape (``work``, made here if not given) and no other temporary
    of its size but boolean masks (the CPU faults in every new large tensor: a fresh one per
    op costs more than the op). Not differentiable."""
    w1, w2 = work if work is not None else (torch.empty_like(s), torch.empty_like(s))
    w1, w2 = w1[:s.shape[0]], w2[:s.shape[0]]
    z = _transform_(s, opts.student)
    slope = None
    if grad is not None and opts.student.softcap is not None:
        slope = transform_slope(z, opts.student)  # (a tensor of the chunk's size)
    mult = opts.student.logit_scale / opts.student.temperature
    z_t = _transform_(t, opts.teacher)
    stats_s, stats_t = _max_and_sum(z, w1), _max_and_sum(z_t, w1)  # each row's (m~, s)
    (m_s, s_s), (m_t, s_t) = stats_s, stats_t
    beta = opts.beta
    if beta == 0.0:  # KL(p_t | p_s); d = p_s - p_t
        kl, p_t, _, _ = _kl_from_logits_(z_t, z, stats_t, stats_s, w1, w2)
        loss.copy_(kl)
        if grad is None:
            return
        d = z.sub_(m_s).exp_().div_(s_s).sub_(p_t)
    elif beta == 1.0:  # KL(p_s | p_t); d = p_s (log p_s - log p_t - KL) = p_s (diff - E diff)
        kl, p_s, diff, expected = _kl_from_logits_(z, z_t, stats_s, stats_t, w1, w2)
        loss.copy_(kl)
        if grad is None:
            return
        d = diff.sub_(expected.unsqueeze(-1)).mul_(p_s)
        d.masked_fill_(p_s == 0, 0.0)
    else:  # the generalized JSD, through the mixture m
        log_s = z.sub_(m_s).sub_(s_s.log())
        log_t = z_t.sub_(m_t).sub_(s_t.log())
        # the mixture, its inputs clamped to the lowest finite value (``_mixture``)
        low = torch.finfo(s.dtype).min
        mix = torch.clamp(log_s, min=low, out=w2).add_(math.log1p(-beta))
        mix = torch.logaddexp(mix, torch.clamp(log_t, min=low, out=w1).add_(math.log(beta)),
                              out=w2)
        p_t = torch.exp(log_t, out=w1)
        kl_t = _p_times_(log_t.sub_(mix), p_t, out=t)  # over log_t (not needed again)
        p_s = torch.exp(log_s, out=w1)
        ratio = log_s.sub_(mix)
        kl_s = _p_times_(ratio, p_s, out=w2)  # (over the mixture: not needed again)
        loss.copy_(beta * kl_t + (1.0 - beta) * kl_s)
        if grad is None:
            return
        d = ratio.sub_(kl_s.unsqueeze(-1)).mul_(p_s)
        d.masked_fill_(p_s == 0, 0.0)
        d.mul_(1.0 - beta)
    if slope is not None:
        d.mul_(slope)
    elif mult != 1.0:
        d.mul_(mult)
    if row_scale is not None:
        d.mul_(row_scale.to(d.dtype).unsqueeze(-1))
    if d is not grad:  # (in place when grad is s: d is s, overwritten op by op)
        grad.copy_(d)


# Rows per block of the eager divergence on given logits: about this many float32 elements
# of each of the two logits (16 MiB).
DISTILL_BLOCK_ELEMENTS = 1 << 22


def _divergence_blocks(s, t, counted, opts: DistillOptions, *, scales=None,
                       grad: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's divergence (N,) of logits ``s``, ``t`` (N, V), a block of rows at a time
    upcast into reused float32 scratch (no float32 copy of the whole logits); with ``grad``
    the gradient of sum_r scales_r loss_r w.r.t. ``s`` written into it. Rows where
    ``counted`` is False give 0 (whatever their logits hold)."""
    dtype = compute_dtype(s.dtype, t.dtype)
    n_rows, n_classes = s.shape
    loss = torch.empty(n_rows, dtype=dtype, device=s.device)
    step = max(1, DISTILL_BLOCK_ELEMENTS // max(1, n_classes))
    bufs = None  # the blocks' scratch and workspace, reused (the first block is the largest)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        r = rows.stop - rows.start
        if bufs is None:
            bufs = [torch.empty((r, n_classes), dtype=dtype, device=s.device) for _ in range(4)]
        s_block, t_block = bufs[0][:r], bufs[1][:r]
        s_block.copy_(s[rows])
        t_block.copy_(t[rows])
        chunk_divergence_(s_block, t_block, opts, loss=loss[rows],
                          row_scale=None if scales is None else scales[rows],
                          grad=None if grad is None else grad[rows], work=bufs[2:])
    return torch.where(counted, loss, 0.0)


class DistillationFunction(torch.autograd.Function):
    """The divergence of each row of the student's logits ``s`` (N, V) from the teacher's
    ``t`` (a constant), rows where ``counted`` (N,) is False left out: their sum when
    ``reduced`` (a scalar), else each row's (N,); float32 (float64 for float64 logits).
    ``divergences(s, t, counted, opts, scales=, grad=)``: the rows' divergences, and with
    ``grad`` the gradient of sum_r scales_r loss_r written there (``_divergence_blocks``, or
    the Triton kernel's ``distillation.divergences``).

    For a reduced loss the forward writes the gradient (rounded once into the logits' dtype)
    and the backward scales it; ``none``, a compiled graph and a second backward compute it
    again with each row's upstream gradient; ``create_graph=True`` runs
    ``divergence_rows`` whole, by autograd."""

    @staticmethod
    def forward(ctx, s, t, counted, opts: DistillOptions, reduced: bool, divergences):
        ctx.set_materialize_grads(False)
        fused = reduced and ctx.needs_input_grad[0] and may_fuse_gradient()
        grad = torch.empty(s.shape, dtype=s.dtype, device=s.device) if fused else None
        scales = counted.to(compute_dtype(s.dtype, t.dtype)) if fused else None
        rows = divergences(s, t, counted, opts, scales=scales, grad=grad)
        ctx.save_for_backward(s, t, counted)
        ctx.opts, ctx.reduced, ctx.grad, ctx.divergences = opts, reduced, grad, divergences
        return rows.sum() if reduced else rows

    @staticmethod
    def backward(ctx, grad_out):
        s, t, counted = ctx.saved_tensors
        opts, reduced = ctx.opts, ctx.reduced
        none = (None,) * 5
        if grad_out is None or not ctx.needs_input_grad[0]:
            return (None, *none)
        if torch.is_grad_enabled():  # create_graph=True: the formula whole, by autograd
            ctx.grad = None
            with torch.enable_grad():
                rows = torch.where(counted, divergence_rows(s, t, opts), 0.0)
                out = rows.sum() if reduced else rows
                (grad,) = torch.autograd.grad(out, s, grad_out.to(out.dtype),
                                              create_graph=True)
            return (grad, *none)
        if ctx.grad is not None:  # the first backward after a forward that wrote it
            grad, ctx.grad = ctx.grad, None
            return (scale_grad_(grad, grad_out.to(grad.dtype)), *none)
        dtype = compute_dtype(s.dtype, t.dtype)
        scales = counted.to(dtype) * (grad_out.to(dtype) if reduced
                                      else grad_out.reshape(-1).to(dtype))
        grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
        ctx.divergences(s, t, counted, opts, scales=scales, grad=grad)
        return (grad, *none)


def distillation(s, t, counted, opts: DistillOptions, reduced: bool) -> torch.Tensor:
    """The eager divergence of logits ``s``, ``t`` (N, V), ``counted`` (N,) bool: summed
    (``reduced``) or per row, a block of rows at a time."""
    return DistillationFunction.apply(s, t, counted, opts, reduced, _divergence_blocks)


# ------------------------------------------------------------------------------------------
# BCE with logits, Huber: torch's own functions on float32 copies
# ------------------------------------------------------------------------------------------


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction):
    """For floating input and target of one shape; float32 (float64 if an operand is)."""
    dtype = _compute_dtype_of(input, target, weight, pos_weight)
    return F.binary_cross_entropy_with_logits(
        as_dtype(input, dtype), as_dtype(target, dtype), _up(weight, dtype),
        reduction=reduction, pos_weight=_up(pos_weight, dtype))


def huber_loss(input, target, weight, reduction, delta):
    """For a floating input; input, target (and the weight with them) broadcast here (the
    caller warned as torch does)."""
    dtype = _compute_dtype_of(input, target, weight)
    x, t = as_dtype(input, dtype), _up(target, dtype)
    if x.shape != t.shape:
        x, t = torch.broadcast_tensors(x, t)
    w = None if weight is None else _up(weight, dtype).expand(x.shape)
    return F.huber_loss(x, t, reduction=reduction, delta=delta, weight=w)
