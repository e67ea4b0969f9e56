"""Elementwise tiles: how BCE and Huber see a loss of any shape, strides and broadcasting.

The loss's shape S (input and target; weights broadcast to it) is seen as a grid of
(rows, cols) tiles. The dimensions of S are ordered by the input's strides, size-1 dimensions
dropped and neighbours merged wherever every operand allows, into at most three:
(outer, inner, cols), a row being an (outer, inner) pair. Each operand has its own three
strides in that view (0 where it is broadcast) and a constexpr mode (full, per column, per
row, scalar), so transposed, sliced or channels-last inputs and broadcast weights are read in
place, never materialized. Offsets are int64: rows x cols may exceed 2^31.

``TilePlan`` turns a view and named operands into a kernel's keyword arguments; the
``@triton.jit`` helpers load an operand for one tile in its mode.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from ._common import launch, next_power_of_2, num_warps_for

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
        sizes = [math.prod([shape[d] for d in g]) for g in groups]  # (a list: torch.compile)
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


