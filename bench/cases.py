"""What the benchmark measures: the losses, their inputs, their shapes and their byte counts.

A ``Case`` is one (loss, shape, dtype, device). Each loss has a ``LossSpec``: how to make its
inputs (drawn again in place before every provider, so all see the same numbers), how a
torch-style function is called on them, which axis its plots use, and the bytes it must move
(``min_bytes``, the one place where the benchmark counts bytes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16"}
LOSS_ALIASES = {
    "ce": "cross_entropy",
    "cross-entropy": "cross_entropy",
    "binary_cross_entropy_with_logits": "bce",
    "huber_loss": "huber",
}
VOCABS = (32000, 50257, 128256, 151936, 262144)  # Llama-2, GPT-2, Llama-3, Qwen2, Gemma-3


@dataclass(frozen=True)
class Case:
    loss: str  # a key of LOSSES
    shape: tuple[int, ...]  # of the input
    dtype: str  # a key of DTYPES
    device: str  # "cuda" or "cpu"

    @property
    def label(self) -> str:
        return "x".join(str(n) for n in self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def numel(self) -> int:
        return math.prod(self.shape)

    def input_bytes(self) -> int:
        """Bytes of the input whose gradient is taken (the logits, for cross-entropy)."""
        return self.numel() * self.torch_dtype.itemsize

    def to_json(self) -> dict:
        return {"loss": self.loss, "shape": list(self.shape), "dtype": self.dtype,
                "device": self.device}


@dataclass(frozen=True)
class Traffic:
    read: int  # bytes every pass that computes the loss must read
    grad: int  # bytes of the gradient, written once

    def bytes_for(self, mode: str) -> int:
        """The counted bytes of a timed mode. A backward on its own must read the inputs again
        (unless its forward stored the gradient) and write the gradient, so it counts the same
        as forward+backward."""
        return self.read if mode == "fwd" else self.read + self.grad


# What min_bytes counts, in words (s = bytes per element of the input's dtype); the JSON and
# the Markdown quote these.
BYTE_COUNTS = {
    "cross_entropy": "logits read once (N*V*s) + int64 targets (8*N); gradient written once "
                     "(N*V*s); the O(N) row statistics and the scalar loss are left out "
                     "(under 0.01% at V >= 32000)",
    "bce": "input and target read (2*N*C*s) + the pos_weight column (C*s); gradient written "
           "once (N*C*s)",
    "huber": "input and target read (2*n*s); gradient written once (n*s)",
}


def min_bytes(case: Case) -> Traffic:
    """The fewest bytes a loss must move through device memory: every input read once, the
    gradient written once (``BYTE_COUNTS`` says it per loss). GB/s and the roofline come from
    these counts, and only these."""
    s = case.torch_dtype.itemsize
    n = case.numel()
    if case.loss == "cross_entropy":
        rows = case.shape[0]
        return Traffic(read=n * s + 8 * rows, grad=n * s)
    if case.loss == "bce":
        return Traffic(read=2 * n * s + case.shape[1] * s, grad=n * s)
    if case.loss == "huber":
        return Traffic(read=2 * n * s, grad=n * s)
    raise ValueError(f"unknown loss {case.loss!r}")


# ------------------------------------------------------------------------------------------
# inputs: allocated once per case, drawn again (same seed) before every provider
# ------------------------------------------------------------------------------------------


def _empty(case: Case, shape=None, dtype=None, grad=False) -> torch.Tensor:
    t = torch.empty(shape or case.shape, dtype=dtype or case.torch_dtype, device=case.device)
    return t.requires_grad_(grad)


def _ce_inputs(case: Case) -> dict:
    return {"input": _empty(case, grad=True),
            "target": _empty(case, shape=case.shape[:1], dtype=torch.int64)}


def _ce_fill(t: dict, gen: torch.Generator) -> None:
    t["input"].normal_(generator=gen)
    t["target"].random_(0, t["input"].shape[1], generator=gen)


def _bce_inputs(case: Case) -> dict:
    return {"input": _empty(case, grad=True), "target": _empty(case),
            "pos_weight": _empty(case, shape=case.shape[1:])}


def _bce_fill(t: dict, gen: torch.Generator) -> None:
    t["input"].normal_(generator=gen)
    t["target"].bernoulli_(0.05, generator=gen)  # multi-label: a few positives per row
    t["pos_weight"].uniform_(0.5, 4.0, generator=gen)


def _huber_inputs(case: Case) -> dict:
    return {"input": _empty(case, grad=True), "target": _empty(case)}


def _huber_fill(t: dict, gen: torch.Generator) -> None:
    # std 2 around the target: both the quadratic (|d| < 1) and linear branches are hit
    t["input"].normal_(0.0, 2.0, generator=gen)
    t["target"].normal_(generator=gen)


@dataclass(frozen=True)
class LossSpec:
    name: str
    title: str
    fused_name: str  # the function's name in fused_losses
    torch_fn: Callable
    allocate: Callable[[Case], dict]
    fill: Callable[[dict, torch.Generator], None]
    call: Callable[[Callable, dict], Callable[[], torch.Tensor]]  # torch-style fn -> forward
    x_label: str
    headline: tuple[int, ...]  # the shape quoted in the README and summaries


LOSSES = {
    "cross_entropy": LossSpec(
        "cross_entropy", "cross-entropy", "cross_entropy", F.cross_entropy,
        _ce_inputs, _ce_fill, lambda fn, t: lambda: fn(t["input"], t["target"]),
        "vocabulary V", (8192, 128256),
    ),
    "bce": LossSpec(
        "bce", "BCE-with-logits", "binary_cross_entropy_with_logits",
        F.binary_cross_entropy_with_logits, _bce_inputs, _bce_fill,
        lambda fn, t: lambda: fn(t["input"], t["target"], pos_weight=t["pos_weight"]),
        "elements N x C", (16384, 16384),
    ),
    "huber": LossSpec(
        "huber", "Huber", "huber_loss", F.huber_loss, _huber_inputs, _huber_fill,
        lambda fn, t: lambda: fn(t["input"], t["target"]),
        "elements", (1 << 26,),
    ),
}


def make_inputs(case: Case) -> dict:
    return LOSSES[case.loss].allocate(case)


def fill_inputs(case: Case, inputs: dict, seed: int) -> None:
    """Draw the inputs in place from ``seed``: every provider sees the same numbers (Liger
    writes its gradient into the logits, so they are drawn again before each provider)."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    with torch.no_grad():
        LOSSES[case.loss].fill(inputs, gen)


def sort_key(case: Case) -> tuple[int, ...]:
    """Table order: cross-entropy by (N, V), the element-wise losses by size."""
    return case.shape if case.loss == "cross_entropy" else (case.numel(),)


def plot_point(case: Case) -> tuple[str, int]:
    """(series, x) of a case in the plots: cross-entropy against V, one series per N; the
    element-wise losses against their element count."""
    if case.loss == "cross_entropy":
        return f"N={case.shape[0]}", case.shape[1]
    return "", case.numel()


# ------------------------------------------------------------------------------------------
# sweeps
# ------------------------------------------------------------------------------------------

CUDA_SWEEP = {
    "cross_entropy": [(n, v) for n in (8192, 4096, 16384) for v in VOCABS],
    "bce": [(65536, 1024), (32768, 4096), (16384, 16384), (8192, 131072)],
    "huber": [(1 << 24,), (1 << 26,), (1 << 28,)],
}
CUDA_QUICK = {
    "cross_entropy": [(8192, 32000), (8192, 128256)],
    "bce": [(16384, 16384)],
    "huber": [(1 << 26,)],
}
# The first dtype of each loss is its main one: measured first, and the only one with --quick.
CUDA_DTYPES = {"cross_entropy": ("bfloat16", "float32"), "bce": ("float32", "bfloat16"),
               "huber": ("float32", "bfloat16")}
# The CPU sweep measures the eager fallback's overhead over torch, in seconds, not bandwidth.
CPU_SWEEP = {
    "cross_entropy": [(256, 32000), (512, 32000)],
    "bce": [(1024, 1024), (4096, 1024)],
    "huber": [(1 << 18,), (1 << 20,)],
}
CPU_QUICK = {"cross_entropy": [(256, 32000)], "bce": [(1024, 1024)], "huber": [(1 << 18,)]}
CPU_DTYPES = {"cross_entropy": ("float32", "bfloat16"), "bce": ("float32",),
              "huber": ("float32",)}


def _tier(case: Case, primary_dtype: str) -> int:
    """Order of a time-boxed sweep: the headline shapes, then each loss's main dtype (for
    cross-entropy the N=8192 vocabulary sweep that the plots draw), then everything else."""
    spec = LOSSES[case.loss]
    primary = case.dtype == primary_dtype
    if primary and case.shape == spec.headline:
        return 0
    main_series = case.loss != "cross_entropy" or case.shape[0] == spec.headline[0]
    if primary and main_series:
        return 1
    return 2 if main_series else 3


def build_cases(device: str, quick: bool, losses=None, dtypes=None) -> list[Case]:
    if device == "cuda":
        shapes, default_dtypes = (CUDA_QUICK if quick else CUDA_SWEEP), CUDA_DTYPES
    else:
        shapes, default_dtypes = (CPU_QUICK if quick else CPU_SWEEP), CPU_DTYPES
    cases = []
    for loss in losses or list(LOSSES):
        for dtype in dtypes or default_dtypes[loss][: 1 if quick else None]:
            cases += [Case(loss, shape, dtype, device) for shape in shapes[loss]]
    order = {case: i for i, case in enumerate(cases)}
    return sorted(cases, key=lambda c: (_tier(c, default_dtypes[c.loss][0]), order[c]))


def case_from_json(d: dict) -> Case:
    fields = {f.name for f in dataclasses.fields(Case)}
    d = {k: v for k, v in d.items() if k in fields}
    return Case(**{**d, "shape": tuple(d["shape"])})
