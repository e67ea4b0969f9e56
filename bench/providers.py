"""The providers: one registry, ``REGISTRY[loss][name] -> Provider``.

A provider's ``build(case, inputs)`` returns a forward function of no arguments that returns
the loss as a scalar tensor; the harness times it alone (forward), with ``.backward()``
(forward+backward), and the backward alone. A provider that cannot run (a peer that is not
installed, a fused_losses loss that has not landed yet) raises ``Skip``: it is reported as
skipped, never as an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.nn.functional as F

from .cases import LOSSES, Case

REFERENCE = "fused_losses"  # speed-ups are this provider's, against each other one
PEER_DISTRIBUTIONS = ("liger-kernel", "flash-attn", "quack-kernels")


class Skip(Exception):
    """This provider cannot run this case; the message says why."""


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Case, dict], Callable[[], torch.Tensor]]
    # Peak memory beyond the inputs, in units of the input's bytes: an estimate used to skip a
    # case that would not fit in the free device memory (reported as skipped-OOM).
    mem_factor: float
    description: str
    devices: tuple[str, ...] = ("cuda", "cpu")
    # The gradient is computed (and written) in the forward; the backward only scales it by
    # the upstream gradient, so its backward-only time is near zero.
    grad_in_forward: bool = False


def _scalar(out) -> torch.Tensor:
    """A peer's result as a mean scalar loss (flash-attn returns (losses, z_losses); some
    versions of quack return per-row losses)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out if out.dim() == 0 else out.mean()


def _import(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # ImportError, or a CUDA extension that fails to load
        raise Skip(f"{module}.{attr} not importable ({type(e).__name__}: {e})"[:300]) from None


def _fused(case: Case, t: dict):
    import fused_losses

    spec = LOSSES[case.loss]
    fn = getattr(fused_losses, spec.fused_name, None)
    if fn is None:
        raise Skip(f"fused_losses.{spec.fused_name} is not in this build yet")
    return spec.call(fn, t)


def _torch(case: Case, t: dict):
    spec = LOSSES[case.loss]
    return spec.call(spec.torch_fn, t)


def _torch_float(case: Case, t: dict):
    if case.dtype == "float32":
        raise Skip("the same call as torch for float32 logits")
    return lambda: F.cross_entropy(t["input"].float(), t["target"])


_COMPILED: dict[str, Callable] = {}


def _torch_compile(case: Case, t: dict):
    # dynamic=True: one compilation per (loss, dtype) serves every shape of the sweep; a
    # static compile per shape would cost ~20 s each (30 cross-entropy shapes alone).
    spec = LOSSES[case.loss]
    if case.loss not in _COMPILED:
        _COMPILED[case.loss] = torch.compile(spec.torch_fn, dynamic=True)
    return spec.call(_COMPILED[case.loss], t)


def _liger(case: Case, t: dict):
    fn = _import("liger_kernel.transformers.functional", "liger_cross_entropy")
    return lambda: fn(t["input"], t["target"])


def _flash_attn(case: Case, t: dict):
    fn = _import("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss")
    return lambda: _scalar(fn(t["input"], t["target"]))


def _quack(case: Case, t: dict):
    if case.dtype not in ("bfloat16", "float16", "float32"):
        raise Skip(f"quack has no {case.dtype} kernel")
    fn = _import("quack.cross_entropy", "cross_entropy")
    return lambda: _scalar(fn(t["input"], t["target"]))


def _common(mem_fused: float, mem_torch: float, mem_compile: float) -> dict[str, Provider]:
    """fused_losses, torch eager and torch.compile: every loss has these three."""
    return {
        "fused_losses": Provider(
            "fused_losses", _fused, mem_fused,
            "fused_losses (Triton kernels on CUDA; the eager float32 fallback on the CPU)",
            grad_in_forward=True,
        ),
        "torch": Provider("torch", _torch, mem_torch, "torch.nn.functional, eager"),
        "torch.compile": Provider(
            "torch.compile", _torch_compile, mem_compile,
            "torch.compile(the torch function, dynamic=True)", devices=("cuda",),
        ),
    }


# mem_factor: what each keeps alive at its peak, in input-sized buffers (dtype of the input
# unless said): cross-entropy eager = log_softmax output + nll grad + log_softmax grad;
# the .float() pattern = float32 copies of those (x2 each); fused kernels = the gradient.
REGISTRY: dict[str, dict[str, Provider]] = {
    "cross_entropy": {
        **_common(mem_fused=1.1, mem_torch=3.2, mem_compile=2.2),
        "torch+float": Provider(
            "torch+float", _torch_float, 6.5,
            "F.cross_entropy(logits.float(), target): the Hugging Face pattern",
        ),
        "liger": Provider(
            "liger", _liger, 1.2,
            "Liger-Kernel liger_cross_entropy (writes the gradient into the logits)",
            devices=("cuda",), grad_in_forward=True,
        ),
        "flash_attn": Provider(
            "flash_attn", _flash_attn, 1.2, "flash-attn's Triton cross_entropy_loss, .mean()",
            devices=("cuda",),
        ),
        "quack": Provider("quack", _quack, 1.2, "quack.cross_entropy", devices=("cuda",)),
    },
    # Neither loss has a Liger kernel: torch eager and torch.compile are the peers.
    "bce": _common(mem_fused=1.1, mem_torch=5.0, mem_compile=2.2),
    "huber": _common(mem_fused=1.1, mem_torch=2.2, mem_compile=2.2),
}


def providers_for(loss: str, names: list[str] | None = None) -> list[Provider]:
    """The loss's providers, fused_losses first, filtered by ``names`` when given."""
    table = REGISTRY[loss]
    return [p for name, p in table.items() if not names or name in names]


def all_names() -> list[str]:
    return sorted({name for table in REGISTRY.values() for name in table})


def peer_versions() -> dict[str, str]:
    """Installed versions of the peers (absent ones left out), for the results' header."""
    found = {}
    for dist in PEER_DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found
