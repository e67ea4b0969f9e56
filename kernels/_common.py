"""Shared launch helpers and block-size heuristics for the loss kernels.

Imported by every kernel file; nothing here is loss-specific.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Globals a kernel reads must be tl.constexpr (the compiler rejects plain floats).
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the SFU's native op
LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) * LN2

try:  # torch >= 2.6: launches that torch.compile can trace without a graph break
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch launches the kernel directly
    _wrap_triton = None


def is_interpreted(kernel) -> bool:
    """True when Triton built ``kernel`` for its interpreter (``TRITON_INTERPRET=1`` when it
    was defined)."""
    return not isinstance(kernel, JITFunction)


@triton.jit
def _probe_kernel():
    pass


# Whether this process's kernels are built for the interpreter (TRITON_INTERPRET=1 when the
# kernel files were imported). torch.compile asks this instead of is_interpreted(kernel):
# torch 2.11's Dynamo cannot trace isinstance() on a Triton kernel.
KERNELS_INTERPRETED = is_interpreted(_probe_kernel)


def launch(kernel, grid: tuple, writes: tuple[str, ...], **kwargs) -> None:
    """``kernel[grid](**kwargs)``: compiled for CUDA tensors, interpreted for CPU tensors.

    CUDA launches go through ``torch.library.wrap_triton`` (where it exists) while
    torch.compile traces, which makes them visible to it (no graph break); in eager mode they
    are plain Triton launches. CPU tensors
    run the same kernel under the Triton interpreter (``interpret``), whatever imported triton
    first and however: the choice is made per launch, not when the kernels are defined. While
    torch.compile traces, an interpreted launch becomes the opaque op
    ``fused_losses::interpret``, which is told that the tensors named in ``writes`` (the
    pointers this launch stores through) are written and every other tensor only read. (A
    compiled launch needs no such list: torch finds its stores in the kernel's IR.)
    """
    compiling = torch.compiler.is_compiling()
    device = _device_of(kwargs)
    interpreted = KERNELS_INTERPRETED if compiling else is_interpreted(kernel)
    if device is None or device.type == "cpu" or interpreted:
        if compiling:
            _launch_interpreted_op(kernel, grid, writes, kwargs)
        else:
            interpret(kernel, grid, kwargs)
        return
    # Only while torch.compile traces: in eager mode torch 2.11's wrapper is no direct call but
    # a trip through its higher-order-op dispatch on every launch (on the H200, Huber's
    # forward+backward took ~1.3 ms whatever its size, torch's 0.12 ms at 16M elements).
    # (Dynamo takes wrap_triton for a no-op and traces the launch itself; it cannot trace a
    # cache of wrappers keyed by id(kernel), which broke every compiled CUDA launch.)
    if compiling and _wrap_triton is not None:
        kernel = _wrap_triton(kernel)
    # Triton launches on the *current* device; the tensors may live on another (a model split
    # over GPUs). Inductor's generated code sets the device itself.
    if not compiling and device.index != torch.cuda.current_device():
        with torch.cuda.device(device.index):
            kernel[grid](**kwargs)
        return
    kernel[grid](**kwargs)


def _device_of(kwargs: dict) -> torch.device | None:
    """The device of a launch's tensors (all on one device: the dispatch checks it)."""
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return None


# ------------------------------------------------------------------------------------------
# The Triton interpreter, per launch
#
# Triton fixes at decoration time whether a @triton.jit function is compiled or interpreted
# (TRITON_INTERPRET, read when it is defined), and so does every helper of its standard
# library (tl.max, tl.sum...), defined when triton is first imported. A process that imported
# triton before asking for the interpreter (any torch.optim optimizer, torch._dynamo,
# transformers...) could not interpret a kernel: "Cannot call @triton.jit'd outside of the
# scope of a kernel". So a CPU launch runs the kernel's Python function as an
# InterpretedFunction, in a scope where every JITFunction it calls is interpreted too.
#
# The interpreter swaps triton.language's builtins (tl.core.cast, tl.core.add, ...) and some
# methods of its classes (tl.tensor.__index__, tl.dtype.to_ir) for numpy versions while a
# kernel runs. It puts them back after a launch, but not after a call of a @triton.jit helper
# (tl.max, tl.sum, our own): those stay patched for the rest of the process (Triton 3.6 to
# 3.9 at least), and the next kernel *compiled* for a GPU in that process fails in its first
# cast: "'value' object has no attribute 'dtype'" at `tl.program_id(0).to(tl.int64)`. So the
# scope also snapshots the namespaces the interpreter patches and puts back whatever a launch
# left changed.
# ------------------------------------------------------------------------------------------

_interpreted: dict[object, object] = {}  # Python function -> its InterpretedFunction
_interpreter_lock = threading.RLock()


def interpret(kernel, grid: tuple, kwargs: dict) -> None:
    """Run ``kernel[grid](**kwargs)`` under the Triton interpreter (CPU tensors)."""
    with _interpreter_scope():
        _as_interpreted(kernel)[grid](**kwargs)


def _as_interpreted(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    fn = kernel.fn
    if fn not in _interpreted:
        _interpreted[fn] = InterpretedFunction(fn)
    return _interpreted[fn]


@contextlib.contextmanager
def _interpreter_scope():
    """While an interpreted kernel runs: JITFunctions it calls are interpreted, Triton's
    ``interpret`` knob is on, float32 -> bfloat16 casts round as on the GPU, and the numpy
    warnings of the interpreter's arithmetic (log2(0) of an empty row, inf - inf selected
    away by tl.where) are silenced: the GPU computes the same values without a word."""
    import numpy as np
    from triton.runtime import interpreter

    with _interpreter_lock:
        saved_language = _snapshot_language()
        saved_call = JITFunction.__call__
        saved_cast = interpreter.InterpreterBuilder.cast_impl
        knobs = getattr(triton, "knobs", None)
        saved_knob = knobs.runtime.interpret if knobs is not None else None

        def call(self, *args, **kwargs):  # a helper called from an interpreted kernel
            return _as_interpreted(self)(*args, **kwargs)

        JITFunction.__call__ = call
        interpreter.InterpreterBuilder.cast_impl = _gpu_rounding_cast(saved_cast)
        if knobs is not None:
            knobs.runtime.interpret = True
        try:
            with np.errstate(all="ignore"):
                yield
        finally:
            JITFunction.__call__ = saved_call
            interpreter.InterpreterBuilder.cast_impl = saved_cast
            if knobs is not None:
                knobs.runtime.interpret = saved_knob
            _restore_language(saved_language)


def _language_namespaces() -> list:
    """What the interpreter patches: triton.language and its core, math and standard modules,
    and every class of triton.language.core (tensor, dtype, condition, ...)."""
    core = tl.core
    spaces = [tl, core, tl.math, getattr(tl, "standard", tl)]
    spaces += [value for value in vars(core).values()
               if isinstance(value, type) and value.__module__ == core.__name__]
    return list({id(space): space for space in spaces}.values())


def _snapshot_language() -> list[tuple[object, dict]]:
    return [(space, dict(vars(space))) for space in _language_namespaces()]


def _restore_language(snapshot: list[tuple[object, dict]]) -> None:
    """Put every attribute of the snapshot's namespaces back as it was, and remove those a
    launch added, except what must stay: a submodule imported meanwhile
    (triton.language.semantic), and the interpreter's own globals, which its rewriter adds to
    the module of each function it interprets (tl.standard's helpers) and their cached
    rewritten code reads at every later launch."""
    from triton.runtime import interpreter

    kept = vars(interpreter)
    for space, saved in snapshot:
        now = vars(space)
        for name in [name for name in now if name not in saved]:
            value = now[name]
            if not (inspect.ismodule(value) or kept.get(name, _MISSING) is value):
                delattr(space, name)
        for name, value in saved.items():
            if now.get(name, _MISSING) is not value:
                setattr(space, name, value)


_MISSING = object()


def _gpu_rounding_cast(original):
    """The interpreter's cast, rounding float32 -> bfloat16 to nearest-even as the GPU does.

    Symptom it fixes: under the interpreter, ``x.to(tl.bfloat16)`` truncates the mantissa (up
    to 1 ulp low, and a double rounding compounds it), while compiled kernels round to
    nearest-even (``cvt.rn.bf16.f32``). The interpreter's explicit ``rtne`` path is no help:
    it drops the carry when the mantissa is all ones.
    """
    import numpy as np
    from triton.runtime import interpreter

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            rounded = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(rounded.view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    return cast_impl


def non_null(**pointers: torch.Tensor | None) -> tuple[str, ...]:
    """The names of the pointers given a tensor: a launch's ``writes`` where an output is
    optional."""
    return tuple(name for name, t in pointers.items() if t is not None)


# ------------------------------------------------------------------------------------------
# Interpreted launches under torch.compile (CPU tensors, TRITON_INTERPRET=1)
#
# torch.compile cannot trace the interpreter (it reads kernel source at run time), and
# ``wrap_triton`` takes compiled kernels only. So a traced interpreted launch becomes one
# custom op that names the kernel and passes its arguments by kind: tensors written, tensors
# only read, bools, ints, floats (strings, and the names, inside one string). This is what
# lets the CPU test suite compile the losses with fullgraph=True: the code around each launch
# is the code a CUDA launch runs.
# ------------------------------------------------------------------------------------------

_INTERPRETED: dict[str, object] = {}  # "module:name" -> interpreted kernel


def _launch_interpreted_op(kernel, grid: tuple, writes: tuple[str, ...], kwargs: dict):
    written, read = {}, {}
    scalars: dict[type, dict] = {bool: {}, int: {}, float: {}}
    nones, strings = [], []
    for key, value in kwargs.items():
        if value is None:
            nones.append(key)
        elif isinstance(value, str):  # short constexpr words ("evict_last"): no "|" or ","
            strings.append(f"{key}={value}")
        elif isinstance(value, torch.Tensor):
            (written if key in writes else read)[key] = value
        else:
            scalars[next(t for t in scalars if isinstance(value, t))][key] = value  # bool 1st
    # A tensor that is also written (a placeholder for an absent operand) travels once, as
    # an alias of the written one: an op may not take one tensor as written and as read.
    outs = list(written.values())
    aliases = {k: next(i for i, w in enumerate(outs) if w is t) for k, t in read.items()
               if any(w is t for w in outs)}
    read = {k: t for k, t in read.items() if k not in aliases}
    # (custom ops take no list of strings: the names travel as one string)
    names = "|".join([",".join(written), ",".join(read),
                      ",".join(f"{k}={i}" for k, i in aliases.items()),
                      *(",".join(group) for group in scalars.values()), ",".join(nones),
                      ",".join(strings)])
    torch.ops.fused_losses.interpret(
        f"{kernel.fn.__module__}:{kernel.fn.__name__}", list(grid), names, outs,
        list(read.values()), *(list(group.values()) for group in scalars.values()))


@torch.library.custom_op("fused_losses::interpret", mutates_args=("written",))
def _interpret(kernel: str, grid: list[int], names: str, written: list[torch.Tensor],
               read: list[torch.Tensor], bools: list[bool], ints: list[int],
               floats: list[float]) -> None:
    if kernel not in _INTERPRETED:
        import importlib

        module, attr = kernel.split(":")
        _INTERPRETED[kernel] = getattr(importlib.import_module(module), attr)
    w, r, aliases, b, i, f, nones, strings = [part.split(",") if part else []
                                              for part in names.split("|")]
    kwargs = dict.fromkeys(nones)
    kwargs.update(item.split("=", 1) for item in strings)
    for keys, values in zip((w, r, b, i, f), (written, read, bools, ints, floats), strict=True):
        kwargs.update(zip(keys, values, strict=True))
    for alias in aliases:
        key, index = alias.split("=")
        kwargs[key] = written[int(index)]
    interpret(_INTERPRETED[kernel], tuple(grid), kwargs)


@_interpret.register_fake
def _(kernel, grid, names, written, read, bools, ints, floats) -> None:
    return None


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def num_warps_for(block_size: int, elems_per_thread: int = 16, max_warps: int = 32) -> int:
    """Warps for a program that handles ``block_size`` elements at once.

    About ``elems_per_thread`` values per thread keeps several 16-byte loads in flight per
    thread without spilling registers.
    """
    warps = block_size // (32 * elems_per_thread)
    return max(1, min(max_warps, next_power_of_2(warps)))


def float32_scratch(n: int, device: torch.device) -> torch.Tensor:
    """Per-row float32 scratch (losses, log-sum-exps, partial sums): O(N) memory."""
    return torch.empty(n, dtype=torch.float32, device=device)



# ------------------------------------------------------------------------------------------
# The backward of a loss whose forward already wrote d loss / d input for an upstream
# gradient of 1: multiply by the real upstream gradient, decided on the device.
# ------------------------------------------------------------------------------------------

SCALE_BLOCK = 4096


@triton.jit
def _scale_by_upstream_kernel(
    # pointers
    grad_ptr,
    grad_out_ptr,
    # sizes
    n_cols,
    n_inner,
    n_col_blocks,
    # strides
    stride_outer,
    stride_inner,
    # flags
    BLOCK_SIZE: tl.constexpr,
):
    """grad *= upstream gradient (a device scalar), in place, over an (outer, inner, cols) view.

    Decided on the device, with no host sync: when the upstream gradient is 1 (a plain
    ``loss.backward()``) every lane is masked off and no byte of the gradient moves;
    otherwise it is read and written once. One program per BLOCK_SIZE columns of a row, on a
    1-D grid (rows x column blocks may exceed the 65535 limit of the other grid axes).
    """
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    outer = row // n_inner
    inner = row - outer * n_inner
    cols = (pid - row * n_col_blocks) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    g = tl.load(grad_out_ptr).to(tl.float32)
    mask = cols < tl.where(g != 1.0, n_cols, 0)
    ptrs = grad_ptr + outer * stride_outer + inner * stride_inner + cols
    d = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (d.to(tl.float32) * g).to(d.dtype), mask=mask)


def _in_memory_order(grad: torch.Tensor) -> torch.Tensor:
    """A (1, 1, numel) view of a tensor whose elements fill their span of storage (a
    contiguous tensor, or any permutation of one: transposed, channels-last), in the order
    they lie in memory."""
    if not grad.is_contiguous():
        by_stride = sorted(range(grad.dim()), key=grad.stride, reverse=True)
        if not grad.permute(by_stride).is_contiguous():
            raise ValueError("scale_by_upstream_: the gradient's elements must fill their "
                             f"storage (got shape {tuple(grad.shape)}, strides "
                             f"{grad.stride()})")
        grad = grad.permute(by_stride)
    return grad.view(1, 1, -1)


def scale_by_upstream_(grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``grad *= grad_out`` in place (``grad_out`` a one-element device tensor); no traffic
    when ``grad_out`` is 1. ``grad`` is an (outer, inner, cols) view with unit column stride,
    or any tensor whose elements fill their storage (any order of its dimensions). Returns
    ``grad``."""
    unit_cols = grad.dim() == 3 and (grad.stride(2) == 1 or grad.shape[2] <= 1)
    view = grad if unit_cols else _in_memory_order(grad)
    n_outer, n_inner, n_cols = view.shape
    block = min(SCALE_BLOCK, next_power_of_2(n_cols))
    n_col_blocks = triton.cdiv(n_cols, block)
    launch(
        _scale_by_upstream_kernel,
        (n_outer * n_inner * n_col_blocks,),
        writes=("grad_ptr",),
        grad_ptr=view,
        grad_out_ptr=grad_out,
        n_cols=n_cols,
        n_inner=n_inner,
        n_col_blocks=n_col_blocks,
        stride_outer=view.stride(0),
        stride_inner=view.stride(1),
        BLOCK_SIZE=block,
        num_warps=num_warps_for(block),
    )
    return grad
