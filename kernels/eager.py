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

from . import _threads

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
        n_rows = target.numel() // n_classes
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
    or the block's rows for ``none``). The contract of ``cross_entropy.chunk_loss``, the
    kernels' twin. Runs as ``HalfCrossEntropy`` does, blocks of rows over the CPU's cores
    (``_run_blocks``), so its float32 temporaries are a few blocks', not the chunk's."""
    if grad_target is not None:
        return _formula_block(logits, target, weight, opts, dens, grad_out, write_grad,
                              grad_target, grad)
    out = (logits if grad is None else grad) if write_grad else None
    return _join(_run_blocks(logits, target, weight, opts, dens, out, grad_out),
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
    softmax and one pass that writes the gradient; the other cases ``_formula_block``,
    autograd on the formula."""

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


def _run_blocks(x, target, weight, opts: Options, dens: Parts, grad, grad_out) -> list:
    """Each block's (loss part, z-loss part or None) of logits ``x`` (N, C, d1, ..., dK)
    split along N (``_blocks``), and with ``grad`` (``x`` itself allowed) their gradient
    written there (``grad_out``: None for 1, else the upstream gradient, per row for
    ``none``). On the CPU over ``_threads.run_blocks``; (N, C) logits against class targets
    without softcap in ``_plain_block``, the rest by ``_formula_block``."""
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
                                None if grad is None else grad[block], scratch)
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


def _plain_block(x, rows: _Rows, weight, opts: Options, dens: Parts, grad, scratch):
    """One block of rows of ``_run_blocks``: (R, C) half-precision or float32 logits on the
    CPU, class targets, no softcap, float32 math: the block's (loss part, z-loss part or
    None), and with ``grad`` (which may be ``x`` itself) its gradient written, without
    autograd.

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
    (``scratch``)."""
    n_rows, n_classes = x.shape
    z = x
    if x.dtype != torch.float32:
        z = _scratch(scratch, "z", x.shape)
        z.copy_(x)
    m = z.amax(1)
    p = _scratch(scratch, "p", x.shape)
    torch.softmax(z, 1, out=p)
    # NaN where a logit is NaN or +inf, or every logit -inf, as torch's log_softmax
    lse = m - p.amax(1).log()
    z_y = z.gather(1, rows.y[:, None]).squeeze(1)
    terms = [torch.where(rows.ok, rows.w_y * (lse - z_y), rows.nan)]
    w = None if weight is None else weight.reshape(-1).float()
    if rows.smoothed is not None:
        total = n_classes if w is None else w.sum()
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
