"""Shared launch helpers and block-size heuristics for the loss kernels.

Imported by every kernel file; nothing here is loss-specific.
"""

from __future__ import annotations

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

_wrapped: dict[int, object] = {}


def is_interpreted(kernel) -> bool:
    """True when Triton built ``kernel`` for its interpreter (``TRITON_INTERPRET=1``)."""
    return not isinstance(kernel, JITFunction)


def launch(kernel, grid: tuple, **kwargs) -> None:
    """``kernel[grid](**kwargs)``, through ``torch.library.wrap_triton`` where it exists.

    ``wrap_triton`` makes the launch visible to torch.compile (no graph break) and is a
    direct call in eager mode. Interpreted kernels are not ``JITFunction``s and run as they
    are.
    """
    if _wrap_triton is not None and not is_interpreted(kernel):
        key = id(kernel)
        if key not in _wrapped:
            _wrapped[key] = _wrap_triton(kernel)
        kernel = _wrapped[key]
    kernel[grid](**kwargs)


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


def match_gpu_rounding_in_interpreter() -> None:
    """Make the Triton interpreter round float32 -> bfloat16 casts to nearest-even, as the GPU.

    Symptom it fixes: under TRITON_INTERPRET=1, ``x.to(tl.bfloat16)`` truncates the mantissa
    (up to 1 ulp low, and a double rounding compounds it), while compiled kernels round to
    nearest-even (``cvt.rn.bf16.f32``). The interpreter's explicit ``rtne`` path is no help: it
    drops the carry when the mantissa is all ones. Only the interpreter is patched; compiled
    kernels are untouched.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl
    if getattr(original, "_rounds_like_gpu", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            rounded = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(rounded.view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._rounds_like_gpu = True
    builder.cast_impl = cast_impl
