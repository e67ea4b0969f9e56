"""One float32 formula per loss, in torch ops: the eager path, and the kernels' double backward.

Every loss is written here once, differentiably, in float32 (float64 where an operand is):
the CPU fallback runs it, and so does the backward of every kernel Function under
``create_graph=True`` (the kernels' gradients are constants to autograd, so second
derivatives need torch's ops). It imports torch only: the package runs without Triton.

Cross-entropy is split into per-row parts and a reduction (``row_parts``, ``reduce_parts``),
so that half-precision logits can run a block of rows at a time (``cross_entropy``): the loss
and gradient of each block are computed in float32 in cache-sized pieces, and no float32 copy
of the whole logits exists (torch's own bfloat16 loss keeps its log-softmax and two gradients
of the logits' size).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Half-precision logits run in blocks of about this many float32 elements (8 MiB): their
# float32 temporaries stay in the CPU's caches and a fraction of the logits' size, and the
# blocks are few enough for their ops' overhead to stay small (measured at 4, 8, 16 and 64
# MiB on 2 threads: 8 MiB was the fastest, 1.1x torch's own bfloat16 loss).
BLOCK_ELEMENTS = 1 << 21


class Options(NamedTuple):
    """What a cross-entropy call asks for beyond its tensors (validated by the caller)."""

    ignore_index: int = -100
    reduction: str = "mean"
    smoothing: float = 0.0
    softcap: float | None = None
    z_loss: float = 0.0
    prob_target: bool = False
    inplace_backward: bool = False


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

    Softcapping comes first (``z = softcap * tanh(x / softcap)``). Then class targets give
    ``(1 - e) w_y (lse - z_y)`` (zero where ignored, NaN for a target out of range) and
    ``e / C sum_c w_c (lse - z_c)``, probability targets ``sum_c w_c t'_c (lse - z_c)``; the
    z-loss is ``z_loss lse^2`` on the rows counted.
    """
    dtype = compute_dtype(x.dtype, *(t.dtype for t in (target, weight)
                                     if t is not None and t.is_floating_point()))
    z = x.to(dtype)
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
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
               write_grad: bool = False, grad_target=None, grad=None):
    """A block of rows (R, C) of a larger call, float32 logits (``dens``: the whole call's
    ``call_denominators``): (its part of the reduced loss, of the z-loss term or None). With
    ``write_grad``, d out / d logits is written into ``logits`` in place, or into ``grad``
    (and d out / d probabilities into ``grad_target``), for ``grad_out`` (None: 1; one value,
    or the block's rows for ``none``): autograd on the formula, one block at a time. The
    contract of ``cross_entropy.chunk_loss``, the kernels' twin."""
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
    """``cross_entropy_float`` of half-precision logits, a block of rows at a time
    (``chunk_loss``): each block is upcast, its loss and (for ``mean``/``sum``) its gradient
    computed, the gradient rounded once into a logits-sized buffer; the backward scales it
    (``none``: recomputes each block with its rows' upstream gradients). Peak memory: the
    gradient and one block's float32 temporaries."""

    @staticmethod
    def forward(ctx, x, target, weight, opts: Options):
        dens = part_denominators(target, weight, opts, x.shape[1])
        fused = ctx.needs_input_grad[0] and opts.reduction != "none"
        grad = torch.empty_like(x) if fused else None
        outs = []
        for block in _blocks(x):
            outs.append(chunk_loss(x[block].float(), target[block], weight, opts, dens,
                                   x.shape[0], write_grad=fused,
                                   grad=grad[block] if fused else None))
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
        for block in _blocks(x):
            g = grad_out[block] if opts.reduction == "none" else grad_out
            chunk_loss(x[block].float(), target[block], weight, opts, ctx.dens, x.shape[0], g,
                       write_grad=True, grad=grad[block])
        return grad, None, None, None


def _blocks(x: torch.Tensor):
    """Slices of about BLOCK_ELEMENTS elements along the first dimension."""
    rows = max(1, BLOCK_ELEMENTS // max(1, x[0].numel()))
    return [slice(start, start + rows) for start in range(0, x.shape[0], rows)]


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
