"""Binary cross-entropy with logits (``weight``, ``pos_weight``): kernels, launchers and the
autograd.Function, top to bottom. The first section is the elementwise tile machinery that
``huber.py`` shares.

Design (see ../shared/PERFORMANCE.md; an elementwise loss has no row statistics, so one pass):

- The loss's shape S (input and target; weight and pos_weight broadcast to it) is seen as a
  grid of (rows, cols) tiles. The dimensions of S are ordered by the input's strides, size-1
  dimensions dropped and neighbours merged wherever every operand allows, into at most three:
  (outer, inner, cols), a row being an (outer, inner) pair. Each operand has its own three
  strides in that view (0 where it is broadcast), so transposed, sliced or channels-last
  inputs and broadcast weights are read in place, never materialized.
- ``mean``/``sum`` with an input that needs its gradient (training): the forward reads input
  and target once, writes d loss / d input for an upstream gradient of 1, and one float32
  partial sum of the loss per program; the loss is ``partials.sum()``, a fixed-order second
  stage (no atomics: bitwise the same run to run). The backward only scales the gradient by
  the upstream gradient, on the device, and moves no byte when it is 1
  (``scale_by_upstream_``). HBM traffic: input and target read once, gradient written once,
  plus 4 bytes per program.
- ``none``, the target's gradient, and a second backward (``retain_graph=True``) keep the
  forward to the loss and compute the gradients in the backward (one more read of input and
  target; the upstream gradient is known there).
- Operands constant along rows (``pos_weight`` of shape (C,) against (N, C), a per-class
  ``weight``) are loaded once per program and reused for all its rows (``REUSE_ROWS``);
  per-row operands (a per-sample ``weight`` (N, 1)) once per row.
- ``create_graph=True`` (double backward) runs torch's own ops on the saved inputs, so
  second derivatives are right (the kernels' gradients would be constants to autograd).

Offsets are int64 (rows x cols may exceed 2^31); math is float32 whatever the dtypes.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    check_same_device,
    float32_scratch,
    launch,
    next_power_of_2,
    num_warps_for,
    scale_by_upstream_,
)

# ------------------------------------------------------------------------------------------
# elementwise tiles (shared with huber.py)
# ------------------------------------------------------------------------------------------

# Elements per tile: 8 per thread at 8 warps (16-byte loads of bf16), so the ~20 float32
# temporaries of the BCE math stay in registers.
BLOCK = 2048
# A tile that reuses a per-column operand across rows is at most COL_TILE wide, and its
# program covers REUSE_ROWS rows: the operand's reloads cost 1/REUSE_ROWS of its size per row
# (pos_weight (C,) float32 against bf16 input, target and gradient: +2% traffic), while a
# (64, 8192) loss still spreads over 64 programs.
COL_TILE = 256
REUSE_ROWS = 32

# How an operand of the loss's shape lies in the tile view (a kernel's ``*_MODE`` flags).
NONE = tl.constexpr(0)  # absent: reads as 1.0
FULL = tl.constexpr(1)  # varies along rows and columns (any strides)
PER_COL = tl.constexpr(2)  # constant along rows: one [BLOCK_C] load per program
PER_ROW = tl.constexpr(3)  # constant along columns: one [BLOCK_R] load per tile
SCALAR = tl.constexpr(4)  # one value: one load per program


@triton.jit
def _tile_cols(n_cols, n_col_blocks, BLOCK_C: tl.constexpr):
    """This program's id, row block, columns and their mask (int64: cols can pass 2^31)."""
    pid = tl.program_id(0).to(tl.int64)
    row_block = pid // n_col_blocks
    cols = (pid - row_block * n_col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid, row_block, cols, cols < n_cols


@triton.jit
def _tile_rows(row_block, it, row_iters, n_rows, n_inner, BLOCK_R: tl.constexpr):
    """Rows of the program's ``it``-th tile, their mask, and their (outer, inner) coordinates."""
    rows = (row_block * row_iters + it) * BLOCK_R + tl.arange(0, BLOCK_R)
    outer = rows // n_inner  # one division per row, not per element
    return rows, rows < n_rows, outer, rows - outer * n_inner


@triton.jit
def _load_fixed(ptr, cols, col_mask, stride_col, MODE: tl.constexpr):
    """An operand constant along rows, loaded once per program as float32: [1, BLOCK_C]
    (PER_COL), a scalar (SCALAR) or 1.0 (absent). Other modes load per tile (``_load_tile``)."""
    if MODE == PER_COL:
        v = tl.load(ptr + cols * stride_col, mask=col_mask, other=0).to(tl.float32)[None, :]
    elif MODE == SCALAR:
        v = tl.load(ptr).to(tl.float32)
    else:
        v = 1.0
    return v


@triton.jit
def _load_tile(ptr, fixed, outer, inner, cols, row_mask, mask,
               stride_outer, stride_inner, stride_col, MODE: tl.constexpr):
    """An operand over one tile as float32: [BLOCK_R, BLOCK_C] (FULL), [BLOCK_R, 1]
    (PER_ROW), or ``fixed``, what ``_load_fixed`` loaded for the program (other modes)."""
    if MODE == FULL:
        row_off = outer * stride_outer + inner * stride_inner
        v = tl.load(ptr + row_off[:, None] + cols[None, :] * stride_col, mask=mask, other=0)
        v = v.to(tl.float32)
    elif MODE == PER_ROW:
        v = tl.load(ptr + outer * stride_outer + inner * stride_inner, mask=row_mask, other=0)
        v = v.to(tl.float32)[:, None]
    else:
        v = fixed
    return v


@triton.jit
def _finite(v):
    return tl.abs(v) < float("inf")  # False for inf and NaN


class TileView:
    """The loss's shape S seen as (n_outer, n_inner, n_cols) for the elementwise kernels.

    Size-1 dimensions are dropped, the others ordered by the strides of the first operand
    that is not broadcast (so a transposed or channels-last input is read along its memory)
    and merged with their neighbour wherever every operand allows. ``build`` returns None when
    more than three groups are left.
    """

    def __init__(self, shape: tuple[int, ...], dims: list[int], groups: list[list[int]]):
        self.shape = shape
        self.groups = groups
        # the order in which buffers from ``new`` lay out S: size-1 dimensions, then ``dims``
        self.order = [d for d in range(len(shape)) if shape[d] == 1] + dims
        sizes = [math.prod(shape[d] for d in g) for g in groups]
        self.sizes = (1,) * (3 - len(sizes)) + tuple(sizes)

    @classmethod
    def build(cls, shape, operands) -> TileView | None:
        shape = tuple(shape)
        dims = [d for d in range(len(shape)) if shape[d] != 1]
        primary = next((t for t in operands if all(t.stride(d) for d in dims)), None)
        if primary is not None:
            dims.sort(key=lambda d: -primary.stride(d))  # stable: ties keep their order
        groups: list[list[int]] = []
        for d in dims:
            if groups and all(t.stride(groups[-1][-1]) == t.stride(d) * shape[d]
                              for t in operands):
                groups[-1].append(d)
            else:
                groups.append([d])
        return cls(shape, dims, groups) if len(groups) <= 3 else None

    @property
    def n_rows(self) -> int:
        return self.sizes[0] * self.sizes[1]

    def strides(self, t: torch.Tensor) -> tuple[int, int, int] | None:
        """(outer, inner, col) strides of ``t`` (shape S, or 0-d: broadcast), in elements;
        None when ``t``'s strides do not merge like the view's groups."""
        if t.dim() == 0:
            return (0, 0, 0)
        out = []
        for g in self.groups:
            if any(t.stride(a) != t.stride(b) * self.shape[b] for a, b in itertools.pairwise(g)):
                return None
            out.append(t.stride(g[-1]))
        return (0,) * (3 - len(out)) + tuple(out)

    def new(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """An uninitialized tensor of shape S laid out contiguously in the view (element
        (row, col) at ``row * n_cols + col``, as the kernels write), and its flat storage."""
        flat = torch.empty(math.prod(self.shape), dtype=dtype, device=device)
        inverse = [0] * len(self.order)
        for i, d in enumerate(self.order):
            inverse[d] = i
        return flat.view([self.shape[d] for d in self.order]).permute(inverse), flat

    def fit(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself if the view can read it in place, else a copy laid out like ``new``."""
        if self.strides(t) is not None:
            return t
        copy, _ = self.new(t.dtype, t.device)
        return copy.copy_(t)


def tile_view(shape, *operands):
    """The TileView of ``shape`` over ``operands`` (tensors of that shape, or None), and the
    operands it reads: themselves, or contiguous copies when no three-group view reads them
    all in place (a rare layout such as a 4-d permutation with a broadcast weight)."""
    view = TileView.build(shape, [t for t in operands if t is not None])
    if view is None:
        operands = tuple(None if t is None else t.contiguous() for t in operands)
        view = TileView.build(shape, [t for t in operands if t is not None])
    return view, operands


def operand_mode(strides, n_rows: int) -> int:
    """The ``*_MODE`` of an operand with these view strides (0: broadcast along that axis)."""
    stride_outer, stride_inner, stride_col = strides
    same_rows = stride_outer == 0 and stride_inner == 0
    if stride_col == 0:
        return SCALAR.value if same_rows or n_rows == 1 else PER_ROW.value
    return PER_COL.value if same_rows and n_rows > 1 else FULL.value


class TilePlan:
    """Kernel arguments for one launch over a TileView: for each named operand its pointer
    (``{name}_ptr``), strides (``stride_{name}_outer/inner/col``) and ``{NAME}_MODE``; the
    sizes; the tile shape (BLOCK_R x BLOCK_C, ``row_iters`` tiles per program) and the grid."""

    def __init__(self, view: TileView, operands: dict, dummy: torch.Tensor):
        args = {}
        modes = []
        for name, t in operands.items():
            strides = (0, 0, 0) if t is None else view.strides(t)
            mode = NONE.value if t is None else operand_mode(strides, view.n_rows)
            modes.append(mode)
            args[f"{name}_ptr"] = dummy if t is None else t  # absent: never dereferenced
            for axis, stride in zip(("outer", "inner", "col"), strides, strict=True):
                args[f"stride_{name}_{axis}"] = stride
            args[f"{name.upper()}_MODE"] = mode

        _, n_inner, n_cols = view.sizes
        n_rows = view.n_rows
        block_c = min(next_power_of_2(n_cols), BLOCK)
        reuse = PER_COL.value in modes
        if reuse:  # narrow tiles, many rows per program (but use the rows there are)
            block_c = min(block_c, max(COL_TILE, BLOCK // next_power_of_2(n_rows)))
        block_r = min(BLOCK // block_c, next_power_of_2(n_rows))
        row_iters = 1
        if reuse:
            row_iters = min(max(1, REUSE_ROWS // block_r),
                            next_power_of_2(triton.cdiv(n_rows, block_r)))
        n_col_blocks = triton.cdiv(n_cols, block_c)
        self.grid = triton.cdiv(n_rows, block_r * row_iters) * n_col_blocks
        args.update(
            n_rows=n_rows, n_inner=n_inner, n_cols=n_cols, n_col_blocks=n_col_blocks,
            row_iters=row_iters, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=num_warps_for(block_r * block_c, elems_per_thread=8),
        )
        self.args = args

    def launch(self, kernel, **kwargs) -> None:
        launch(kernel, (self.grid,), **self.args, **kwargs)


# ------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------


@triton.jit
def _bce_kernel(
    # pointers (operands: the loss's shape in the tile view, any strides)
    x_ptr,  # logits
    t_ptr,  # targets
    w_ptr,  # weight
    pw_ptr,  # pos_weight
    grad_out_ptr,  # upstream gradient (backward)
    out_ptr,  # out: the loss (REDUCE=False), or one float32 partial sum per program
    grad_x_ptr,  # out: d loss / d logits, contiguous in the view, the logits' dtype
    grad_t_ptr,  # out: d loss / d targets, contiguous in the view, the targets' dtype
    # sizes
    n_rows,
    n_inner,
    n_cols,
    n_col_blocks,
    row_iters,  # tiles per program: a runtime bound (a constant 4 gets unrolled, and the
    #             unrolled tiles' addresses take up to 2.5x the registers)
    # strides (outer, inner, col) of each operand in the view, in elements
    stride_x_outer, stride_x_inner, stride_x_col,
    stride_t_outer, stride_t_inner, stride_t_col,
    stride_w_outer, stride_w_inner, stride_w_col,
    stride_pw_outer, stride_pw_inner, stride_pw_col,
    stride_grad_out_outer, stride_grad_out_inner, stride_grad_out_col,
    # scalars
    grad_scale,  # 1/N for mean, else 1
    # flags
    X_MODE: tl.constexpr,
    T_MODE: tl.constexpr,
    W_MODE: tl.constexpr,
    PW_MODE: tl.constexpr,
    GRAD_OUT_MODE: tl.constexpr,  # NONE: an upstream gradient of 1 (the fused forward)
    LOSS: tl.constexpr,  # forward: compute the loss
    REDUCE: tl.constexpr,  # write partial sums instead of the elementwise loss
    X_GRAD: tl.constexpr,
    T_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """torch's loss, l = w ((1 - t) x - (1 + (p - 1) t) log sigmoid(x)) with p = pos_weight, and
    its gradients, for ``row_iters`` tiles of BLOCK_R x BLOCK_C elements.

    With s = sigmoid(-|x|) and softplus(-|x|) = log1p(exp(-|x|)) (never overflowing):
      l       = w ((1 - t) x + (1 + (p - 1) t) softplus(-|x|))   x >= 0
              = w (-p t x    + (1 + (p - 1) t) softplus(-|x|))   x <  0
      dl/dx   = w ((1 - t) - (p t + 1 - t) s)    x >= 0,    w ((p t + 1 - t) s - p t)    x < 0
      dl/dt   = w (-x   + (p - 1) softplus(-|x|))     x >= 0 (-x without pos_weight)
              = w (-p x + (p - 1) softplus(-|x|))     x <  0
    The loss's terms are all non-negative for t in [0, 1] and p >= 0, so nothing cancels
    (torch's form loses x = -20, t = 0 entirely in float32), and the gradients subtract only
    terms of at most 1: accurate for logits up to +-1e4 and beyond. Where this form is not
    finite (infinite logits, weights or targets) the value is torch's own formula instead, so
    inf and NaN fall where torch's do.

    read: each FULL operand once per element (PER_COL/PER_ROW/SCALAR: once per program/row);
    write: the loss (or a partial per program), and each requested gradient once.
    """
    pid, row_block, cols, col_mask = _tile_cols(n_cols, n_col_blocks, BLOCK_C)
    # operands constant along rows: loaded once, reused by every row of the program
    x_c = _load_fixed(x_ptr, cols, col_mask, stride_x_col, X_MODE)
    t_c = _load_fixed(t_ptr, cols, col_mask, stride_t_col, T_MODE)
    w_c = _load_fixed(w_ptr, cols, col_mask, stride_w_col, W_MODE)
    pw_c = _load_fixed(pw_ptr, cols, col_mask, stride_pw_col, PW_MODE)
    go_c = _load_fixed(grad_out_ptr, cols, col_mask, stride_grad_out_col, GRAD_OUT_MODE)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for it in range(row_iters):
        rows, row_mask, outer, inner = _tile_rows(row_block, it, row_iters, n_rows,
                                                  n_inner, BLOCK_R)
        mask = row_mask[:, None] & col_mask[None, :]
        x = _load_tile(x_ptr, x_c, outer, inner, cols, row_mask, mask,
                       stride_x_outer, stride_x_inner, stride_x_col, X_MODE)
        t = _load_tile(t_ptr, t_c, outer, inner, cols, row_mask, mask,
                       stride_t_outer, stride_t_inner, stride_t_col, T_MODE)
        w = _load_tile(w_ptr, w_c, outer, inner, cols, row_mask, mask,
                       stride_w_outer, stride_w_inner, stride_w_col, W_MODE)
        p = _load_tile(pw_ptr, pw_c, outer, inner, cols, row_mask, mask,
                       stride_pw_outer, stride_pw_inner, stride_pw_col, PW_MODE)
        # the gradient buffers and the elementwise loss are contiguous in the view
        offs = rows[:, None] * n_cols + cols[None, :]

        e = tl.exp(-tl.abs(x))  # in (0, 1]: no overflow
        u = 1.0 + e
        # log1p(e) = log(u) * e / (u - 1), exact to rounding even where 1 + e rounds to 1
        # (a plain log(1 + e) is 0 for x > 17, where the loss is ~exp(-x))
        softplus = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
        log_sig = tl.minimum(x, 0.0) - softplus  # torch's log_sigmoid(x)

        if LOSS:
            if PW_MODE == NONE:
                stable = tl.where(x >= 0, (1.0 - t) * x, -t * x) + softplus
                torch_form = (1.0 - t) * x - log_sig
            else:
                lw = (p - 1.0) * t + 1.0
                stable = tl.where(x >= 0, (1.0 - t) * x, -(p * t) * x) + lw * softplus
                torch_form = (1.0 - t) * x - lw * log_sig
            loss = tl.where(_finite(stable), stable, torch_form) * w
            if REDUCE:
                acc += tl.where(mask, loss, 0.0)
            else:
                tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)

        if X_GRAD or T_GRAD:
            g = _load_tile(grad_out_ptr, go_c, outer, inner, cols, row_mask, mask,
                           stride_grad_out_outer, stride_grad_out_inner, stride_grad_out_col,
                           GRAD_OUT_MODE)
            scale = w * (g * grad_scale)
            if X_GRAD:
                s = e / u  # sigmoid(-|x|)
                if PW_MODE == NONE:
                    # finite wherever x and t are finite, and torch's inf/NaN elsewhere
                    d = tl.where(x >= 0, (1.0 - t) - s, s - t)
                else:
                    pt = p * t
                    lw = pt + 1.0 - t
                    stable = tl.where(x >= 0, (1.0 - t) - lw * s, lw * s - pt)
                    torch_form = lw * tl.where(x >= 0, 1.0 / u, s) - pt  # lw sigmoid(x) - pt
                    d = tl.where(_finite(stable), stable, torch_form)
                tl.store(grad_x_ptr + offs, (d * scale).to(grad_x_ptr.dtype.element_ty),
                         mask=mask)
            if T_GRAD:
                if PW_MODE == NONE:
                    dt = -x
                else:
                    stable = tl.where(x >= 0, -x, -p * x) + (p - 1.0) * softplus
                    # log_sigmoid(-x) - p log_sigmoid(x)
                    torch_form = (tl.minimum(-x, 0.0) - softplus) - p * log_sig
                    dt = tl.where(_finite(stable), stable, torch_form)
                tl.store(grad_t_ptr + offs, (dt * scale).to(grad_t_ptr.dtype.element_ty),
                         mask=mask)

    if LOSS and REDUCE:
        tl.store(out_ptr + pid, tl.sum(acc))


# ------------------------------------------------------------------------------------------
# launcher and autograd
# ------------------------------------------------------------------------------------------


def _launch_bce(view, x, t, w, pw, *, out=None, grad_x=None, grad_t=None, grad_out=None,
                grad_scale=1.0, reduce=False):
    """One pass of ``_bce_kernel``. Returns the partial sums when ``reduce``."""
    operands = {"x": x, "t": t, "w": w, "pw": pw, "grad_out": grad_out}
    plan = TilePlan(view, operands, dummy=x)
    if reduce:
        out = float32_scratch(plan.grid, x.device)
    plan.launch(
        _bce_kernel,
        out_ptr=out if out is not None else x,
        grad_x_ptr=grad_x if grad_x is not None else x,
        grad_t_ptr=grad_t if grad_t is not None else x,
        grad_scale=grad_scale,
        LOSS=out is not None,
        REDUCE=reduce,
        X_GRAD=grad_x is not None,
        T_GRAD=grad_t is not None,
    )
    return out


def differentiable_backward(needs_input_grad, grad_out, loss_fn, *inputs):
    """The gradients of ``loss_fn(*inputs)`` (torch's ops, float32 math) with respect to the
    inputs that need them, themselves differentiable: the backward for ``create_graph=True``
    (a double backward), where the kernels' gradients would be constants and make every
    second derivative silently zero."""
    wrt = [t for t, need in zip(inputs, needs_input_grad, strict=False) if need]
    with torch.enable_grad():
        loss = loss_fn(*inputs).to(grad_out.dtype)
        grads = iter(torch.autograd.grad(loss, wrt, grad_out, create_graph=True))
    return tuple(next(grads) if need else None
                 for need in needs_input_grad[:len(inputs)])


class BCEWithLogitsFunction(torch.autograd.Function):
    """BCE with logits of ``x`` against ``t`` (same shape), ``w`` and ``pw`` broadcast to it
    (expanded views) or None."""

    @staticmethod
    def forward(ctx, x, t, w, pw, reduction, out_dtype):
        ctx.save_for_backward(x, t, w, pw)
        view, (x, t, w, pw) = tile_view(x.shape, x, t, w, pw)
        numel = x.numel()
        # The gradient in the forward pays off when the upstream gradient is one scalar.
        fused = ctx.needs_input_grad[0] and reduction != "none" and not ctx.needs_input_grad[1]
        grad_scale = 1.0 / numel if reduction == "mean" else 1.0

        grad = flat_grad = None
        if fused:
            grad, flat_grad = view.new(x.dtype, x.device)
        if reduction == "none":
            out, _ = view.new(out_dtype, x.device)
            _launch_bce(view, x, t, w, pw, out=out)
        else:
            partials = _launch_bce(view, x, t, w, pw, grad_x=grad, grad_scale=grad_scale,
                                   reduce=True)
            out = partials.sum()  # fixed-order second stage
            if reduction == "mean":
                out = out / numel
            out = out.to(out_dtype)

        ctx.grad = (grad, flat_grad) if fused else None
        ctx.reduction = reduction
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, t, w, pw = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            ctx.grad = None
            loss_fn = lambda x, t: F.binary_cross_entropy_with_logits(  # noqa: E731
                x.float(), t.float(), _float(w), pos_weight=_float(pw), reduction=ctx.reduction)
            return (*differentiable_backward(needs, grad_out, loss_fn, x, t), None, None, None,
                    None)
        grad_x = grad_t = None
        if ctx.grad is not None:
            # First backward after a fused forward: the gradient is already there.
            (grad_x, flat_grad), ctx.grad = ctx.grad, None
            scale_by_upstream_(flat_grad, grad_out)
        elif needs[0] or needs[1]:
            # a second backward, ``none``, or the target's gradient: one more pass
            view, (x, t, w, pw) = tile_view(x.shape, x, t, w, pw)
            grad_x = view.new(x.dtype, x.device)[0] if needs[0] else None
            grad_t = view.new(t.dtype, t.device)[0] if needs[1] else None
            grad_scale = 1.0 / x.numel() if ctx.reduction == "mean" else 1.0
            _launch_bce(view, x, t, w, pw, grad_x=grad_x, grad_t=grad_t,
                        grad_out=view.fit(grad_out), grad_scale=grad_scale)
        return grad_x, grad_t, None, None, None, None


def _float(t):
    return None if t is None else t.float()


# ------------------------------------------------------------------------------------------
# entry point (arguments already validated by fused_losses.functional)
# ------------------------------------------------------------------------------------------


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction):
    """The kernels' loss for a validated call with floating input and target of one shape,
    at least one element, and weights that broadcast to it."""
    check_same_device(input, target=target, weight=weight, pos_weight=pos_weight)
    shape = input.shape
    w = None if weight is None else weight.expand(shape)
    pw = None if pos_weight is None else pos_weight.expand(shape)
    # torch's loss has the target's dtype (it is computed in place in ``1 - target``)
    return BCEWithLogitsFunction.apply(input, target, w, pw, reduction, target.dtype)
