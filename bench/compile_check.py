"""Compile every kernel variant a call launches for a GPU target, without a GPU.

The Triton interpreter runs the kernels' Python, not the compiler: a kernel can pass every
interpreter test and still fail to compile (loop-carried types, constexpr logic, layouts).
This runs a call with the launches captured instead of executed, compiles each distinct
(kernel, signature, constexprs) through Triton's real pipeline down to a cubin for the named
target, and reports the registers and the stack/local memory (spills) each thread uses.

    python -m bench.compile_check            # every loss, the default sweep of variants
    python -m bench.compile_check --arch 80  # another target

Must run without TRITON_INTERPRET (it re-executes itself in a clean subprocess otherwise).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8",
    torch.int8: "i8", torch.bool: "i1",
}


def _signature(kernel, kwargs):
    sig, constexprs = {}, {}
    for name in kernel.arg_names:
        value = kwargs[name]
        param = kernel.params[kernel.arg_names.index(name)]
        if param.is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {value!r}")
    return sig, constexprs


class Capture:
    """Context manager: record launches of fused_losses.kernels instead of running them."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        import fused_losses.kernels as pkg

        # every kernel module imports ``launch`` by name: patch each binding
        self._saved = [(m, m.launch) for m in vars(pkg).values()
                       if hasattr(m, "launch") and hasattr(m, "__file__")]

        def record(kernel, grid, **kwargs):
            self.launches.append((kernel, grid, kwargs))

        for module, _ in self._saved:
            module.launch = record
        return self

    def __exit__(self, *exc):
        for module, launch in self._saved:
            module.launch = launch


def compile_launch(kernel, kwargs, arch: int = 90):
    """Compile one launch for sm_<arch>; returns (name, registers, local bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig, constexprs = _signature(kernel, kwargs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spills = _resources(compiled.asm["cubin"])
    return kernel.__name__, regs, spills


def _resources(cubin: bytes):
    """(registers, stack + local bytes per thread) from cuobjdump, bundled with Triton."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    # spilled registers live in the stack frame (STACK) and local memory (LOCAL)
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    local = int(re.search(r"LOCAL:(\d+)", out).group(1))
    return int(re.search(r"REG:(\d+)", out).group(1)), stack + local


def _variants():
    """Calls that together launch every kernel variant the losses use."""
    from fused_losses.kernels import cross_entropy as ce

    calls = []
    for n_cols in (1000, ce.SINGLE_BLOCK_MAX, ce.SINGLE_BLOCK_MAX + 1):
        for dtype in (torch.bfloat16, torch.float32):
            for reduction in ("mean", "none"):
                for smoothing, weighted in ((0.0, False), (0.1, True)):
                    calls.append(("ce", n_cols, dtype, reduction, smoothing, weighted, False))
            calls.append(("ce", n_cols, dtype, "mean", 0.1, True, True))  # probabilities
    return calls


def _run_ce(n_cols, dtype, reduction, smoothing, weighted, prob):
    from fused_losses.kernels import cross_entropy as ce

    x = torch.randn(1, 2, n_cols, dtype=dtype, requires_grad=True)
    if prob:
        t = torch.rand(2, n_cols, requires_grad=True)
    else:
        t = torch.randint(0, n_cols, (2,))
    w = torch.rand(n_cols, dtype=dtype if not prob else torch.float32) if weighted else None
    loss = ce.CrossEntropyFunction.apply(x, t, w, -100, reduction, smoothing, prob, False, dtype)
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()  # the second backward recomputes: the backward-only variant


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="0")
        sys.exit(subprocess.call([sys.executable, "-m", "bench.compile_check", *sys.argv[1:]],
                                 env=env))
    seen = {}
    for variant in _variants():
        with Capture() as cap:
            _run_ce(*variant[1:])
        for kernel, _grid, kwargs in cap.launches:
            sig, constexprs = _signature(kernel, kwargs)
            key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())),
                   kwargs.get("num_warps"))
            if key not in seen:
                seen[key] = compile_launch(kernel, kwargs, args.arch)
                name, regs, spills = seen[key]
                flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                 for k, v in constexprs.items())
                print(f"sm_{args.arch} {name:24s} warps={kwargs.get('num_warps', 4):2d} "
                      f"regs={regs:3d} spill={spills:4d}B  {flags}", flush=True)
    print(f"{len(seen)} kernel variants compiled for sm_{args.arch}")


if __name__ == "__main__":
    main()
