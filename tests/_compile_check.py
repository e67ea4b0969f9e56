"""Compile every kernel variant a call launches for a GPU target, without a GPU.

The Triton interpreter runs the kernels' Python, not the compiler: a kernel can pass every
interpreter test and still fail to compile (loop-carried types, constexpr logic, layouts).
This runs a call with the launches captured instead of executed, compiles each distinct
(kernel, signature, constexprs) through Triton's real pipeline down to a cubin for the named
target, and reports the registers and the stack/local memory (spills) each thread uses.

    python -m tests._compile_check            # every loss, the default sweep of variants
    python -m tests._compile_check --arch 80  # another target

Run from the checkout's root; tests/test_compile.py runs it in CI. Must run without
TRITON_INTERPRET (it re-executes itself in a clean subprocess otherwise).
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
        from fused_losses.kernels import (  # noqa: F401  (every module that launches)
            _common,
            _elementwise,
            bce,
            cross_entropy,
            cross_entropy_nd,
            distillation,
            huber,
            log_probs,
        )

        # every kernel module imports ``launch`` by name: patch each binding
        modules = (_common, _elementwise, bce, cross_entropy, cross_entropy_nd, distillation,
                   huber, log_probs)
        self._saved = [(m, m.launch) for m in modules if hasattr(m, "launch")]

        def record(kernel, grid, writes, **kwargs):
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

    target = GPUTarget("cuda", arch, 32)
    try:
        src, options = _jit_source(kernel, kwargs, target)
    except (ImportError, AttributeError, TypeError):  # a Triton without these internals
        sig, constexprs = _signature(kernel, kwargs)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=target, options=options)
    regs, spills = _resources(compiled.asm["cubin"])
    return kernel.__name__, regs, spills


def _jit_source(kernel, kwargs, target):
    """The source and options Triton's JIT itself builds for this launch, specialization
    included: integer arguments equal to 1 become constants and 16-divisible pointers and
    integers get alignment hints, which is what vectorizes loads (without them every load is
    scalar, and the registers counted come out 2-3x those of the kernel that runs)."""
    import triton
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options)
    return triton.compiler.ASTSource(kernel, signature, constexprs, attrs), options.__dict__


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
        # softcap and z-loss (Gemma's LM head: bf16, plain and smoothed)
        calls.append(("ce", n_cols, torch.bfloat16, "mean", 0.0, False, False, False, 30.0,
                      1e-4))
        calls.append(("ce", n_cols, torch.bfloat16, "none", 0.1, True, False, False, 30.0))
    # few rows of a long vocabulary: rows split among programs (stats, combine, gradient)
    for dtype in (torch.bfloat16, torch.float32):
        for smoothing, weighted, softcap in ((0.0, False, None), (0.1, True, 30.0)):
            calls.append(("ce", 131072, dtype, "mean", smoothing, weighted, False, False,
                          softcap, 0.0, 2))
    calls.append(("ce", 131072, torch.bfloat16, "mean", 0.1, True, True, False, None, 0.0, 2))
    # K-dimensional tiles (cross_entropy_nd): few classes and the most there are
    for n_cols in (21, ce.cross_entropy_nd.MAX_CLASSES):
        for dtype in (torch.bfloat16, torch.float32):
            for reduction in ("mean", "none"):
                for smoothing, weighted in ((0.0, False), (0.1, True)):
                    calls.append(("ce", n_cols, dtype, reduction, smoothing, weighted, False,
                                  True))
            calls.append(("ce", n_cols, dtype, "mean", 0.1, True, True, True))
        calls.append(("ce", n_cols, torch.bfloat16, "mean", 0.1, False, False, True, 5.0))
    # BCE / Huber: every operand mode (full, per column, per row, scalar) and pass (fused
    # forward, loss-only forward, backward with a scalar or a full upstream gradient, target
    # and weight gradients) at the (64, 8192) in bfloat16; float32, and the tile shapes
    # of the wide (2, 100000) and the narrow (1000, 3), with fewer combinations
    bce_weights = [(None, None), ("col", "col"), ("row", "full"), (None, "col"),
                   ("full", None), ("scalar", "scalar"), (None, "row")]
    for shape, dtype, weights, targets in (
        ((64, 8192), torch.bfloat16, bce_weights, ("same", "col", "row")),
        ((64, 8192), torch.float32, bce_weights[:2], ("same",)),
        ((2, 100000), torch.bfloat16, bce_weights[:3], ("same", "col")),
        ((1000, 3), torch.bfloat16, bce_weights[:3], ("same", "col")),
    ):
        for reduction in ("mean", "none"):
            for weight, pos_weight in weights:
                for target_grad in (False, True):
                    calls.append(("bce", shape, dtype, dtype, reduction, weight, pos_weight,
                                  target_grad))
            for target_shape in targets:
                for weighted, all_grads in ((False, False), (True, False), (True, True)):
                    calls.append(("huber", shape, dtype, reduction, target_shape, weighted,
                                  all_grads))
    calls.append(("bce", (64, 8192), torch.bfloat16, torch.float32, "mean", "full", "col", True))
    # log-probabilities and entropy: rows in registers and looped; every upstream (log p,
    # entropy, both); softcap; float32 logits with a bfloat16 gradient (the LM head's chunks)
    from fused_losses.kernels import eager, log_probs

    for n_cols in (1000, log_probs.ROW_BLOCK, log_probs.ROW_BLOCK + 1):
        for dtype in (torch.bfloat16, torch.float32):
            for softcap in (None, 30.0):
                for which in ("log_probs", "entropy", "both"):
                    calls.append(("lp", n_cols, dtype, dtype, softcap, which))
            calls.append(("lp", n_cols, dtype, dtype, None, "log_probs only"))
            # TRL's other statistics too (log sum p^2, mean logit, is-top-1)
            calls.append(("lp", n_cols, dtype, dtype, 30.0, "all outputs"))
        calls.append(("lp", n_cols, torch.float32, torch.bfloat16, None, "both"))
        # the vocab-sharded head's block (float32 chunks): partial statistics of each set of
        # outputs, the gradient with a class offset
        for outputs in ((), ("entropy",), eager.EXTRA_OUTPUTS):
            calls.append(("lp_shard", n_cols, outputs, 30.0 if outputs else None))
    # distillation: each beta's mode, with and without the gradient; a row in one block and
    # looped; bf16 given logits, and float32 chunks (the LM head) with each head's softcap
    from fused_losses.kernels import distillation

    for n_cols in (1000, distillation.BLOCK + 1):
        for beta in (0.0, 1.0, 0.5):
            for grad in (False, True):
                calls.append(("distill", n_cols, torch.bfloat16, beta, grad, None))
            calls.append(("distill", n_cols, torch.float32, beta, True, 30.0))
    return calls


def _run_ce(n_cols, dtype, reduction, smoothing, weighted, prob, columns=False, softcap=None,
            z_loss=0.0, n_rows=None):
    from fused_losses.kernels import cross_entropy as ce

    n_rows = n_rows or 2
    shape = (1, n_cols, 40) if columns else (1, n_rows, n_cols)  # (outer, C, inner) or rows
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    if prob:
        t = torch.rand(shape if columns else (n_rows, n_cols), requires_grad=True)
    else:
        t = torch.randint(0, n_cols, (40 if columns else n_rows,))
    w = torch.rand(n_cols, dtype=dtype if not prob else torch.float32) if weighted else None
    opts = ce.Options(reduction=reduction, smoothing=smoothing, softcap=softcap,
                      z_loss=z_loss, prob_target=prob)
    loss, _ = ce.CrossEntropyFunction.apply(x, t, w, opts, columns, dtype)
    loss.sum().backward(retain_graph=True)
    loss.sum().backward()  # the second backward recomputes: the backward-only variant


def _weight(kind, shape, dtype):
    """A weight of ``shape``'s loss laid out as ``kind``: per column, per row, full, 0-d."""
    sizes = {"col": shape[1:], "row": (shape[0], 1), "full": shape, "scalar": ()}
    return None if kind is None else torch.rand(sizes[kind], dtype=dtype) + 0.5


def _backward_all_ways(loss, per_column):
    """Backwards with a full upstream gradient (or the fused one's scale), then one that is a
    scalar (the recomputing backward-only variant); with a per-column operand (rows and
    columns in the view) and ``none``, also upstream gradients per column and per row."""
    loss.backward(torch.ones_like(loss), retain_graph=True)
    if per_column and loss.dim() == 2:
        rows, cols = loss.shape
        (loss.sum(0) * torch.arange(cols)).sum().backward(retain_graph=True)
        (loss.sum(1) * torch.arange(rows)).sum().backward(retain_graph=True)
    loss.sum().backward()


def _run_bce(shape, dtype, t_dtype, reduction, weight, pos_weight, target_grad):
    from fused_losses.kernels import bce

    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    t = torch.rand(shape, dtype=t_dtype, requires_grad=target_grad)
    loss = bce.binary_cross_entropy_with_logits(
        x, t, _weight(weight, shape, dtype), _weight(pos_weight, shape, dtype), reduction,
        t_dtype)
    _backward_all_ways(loss, per_column=weight == "col")


def _run_huber(shape, dtype, reduction, target_shape, weighted, all_grads):
    from fused_losses.kernels import huber

    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    t = torch.randn({"same": shape, "col": shape[1:], "row": (shape[0], 1)}[target_shape],
                    dtype=dtype, requires_grad=all_grads)
    w = torch.rand(shape, dtype=dtype, requires_grad=all_grads) if weighted else None
    loss = huber.huber_loss(x, t, w, reduction, 0.5, dtype)
    _backward_all_ways(loss, per_column=target_shape == "col")


def _run_lp(n_cols, dtype, grad_dtype, softcap, which):
    """``which``: the upstream gradients the backward gets ("log_probs only": the entropy
    not requested; "all outputs": every output requested, both upstream gradients)."""
    from fused_losses.kernels import eager, log_probs

    opts = eager.Options(softcap=softcap, temperature=0.7, logit_scale=1.25)
    x = torch.randn(1, 2, n_cols, dtype=dtype)
    t = torch.randint(0, n_cols, (2,))
    outputs = {"log_probs only": (), "all outputs": eager.EXTRA_OUTPUTS}.get(which,
                                                                          ("entropy",))
    rows, stats = log_probs.row_log_probs(x, t, opts, outputs=outputs)
    h = rows.entropy
    g = torch.rand(2).expand(2) if which != "entropy" else None
    g_h = torch.rand(2) if which in ("entropy", "both", "all outputs") else None
    grad = torch.empty(x.shape, dtype=grad_dtype)
    log_probs.log_prob_grad(x, t, stats, h, g, g_h, opts, grad=grad)


def _run_lp_shard(n_cols, outputs, softcap):
    """A vocab-sharded head's block of ``n_cols`` classes at offset 5 of rows of
    ``n_cols + 9``: partial statistics, then the gradient from (made-up) whole-row ones."""
    from fused_losses.kernels import eager, log_probs

    opts = eager.Options(softcap=softcap, temperature=0.7)
    x = torch.randn(2, n_cols)
    t = torch.randint(0, n_cols + 9, (2,))
    parts = torch.empty(eager.LP_STATS, 2)
    log_probs.log_prob_partial_stats(x, t, opts, class_offset=5, n_classes=n_cols + 9,
                                     outputs=outputs, out=parts)
    stats = torch.zeros(2, 2)
    h = torch.rand(2) if outputs else None
    log_probs.log_prob_grad(x, t, stats, h, torch.rand(2), h, opts, grad=x, class_offset=5,
                            n_classes=n_cols + 9)


def _run_distill(n_cols, dtype, beta, grad, softcap):
    from fused_losses.kernels import distillation, eager

    head = eager.Options(softcap=softcap, temperature=2.0, logit_scale=1.25)
    opts = eager.DistillOptions(beta=beta, student=head, teacher=head)
    s, t = torch.randn(2, n_cols, dtype=dtype), torch.randn(2, n_cols, dtype=dtype)
    loss = torch.empty(2)
    distillation.row_divergence(s, t, opts, loss=loss, row_scale=torch.ones(2),
                                grad=torch.empty_like(s) if grad else None)


_RUNNERS = {"ce": _run_ce, "bce": _run_bce, "huber": _run_huber, "lp": _run_lp,
            "lp_shard": _run_lp_shard,
            "distill": _run_distill}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="0")
        sys.exit(subprocess.call([sys.executable, "-m", "tests._compile_check", *sys.argv[1:]],
                                 env=env, cwd=os.path.dirname(os.path.dirname(__file__))))
    seen = {}
    for variant in _variants():
        with Capture() as cap:
            _RUNNERS[variant[0]](*variant[1:])
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
