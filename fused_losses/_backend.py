"""Which backend runs a call: the Triton kernels or eager PyTorch.

``FUSED_LOSSES_BACKEND`` (read at every call, so tests can switch it):

- ``auto`` (default): CUDA tensors run the Triton kernels, everything else eager PyTorch.
- ``torch``: always eager PyTorch (float32 math for half inputs, as the kernels do).
- ``triton``: always the kernels. CPU tensors run them under the Triton interpreter
  (``TRITON_INTERPRET=1``), which is how CI tests the kernels without a GPU.

float64 inputs always run eagerly: the kernels compute in float32, and float64 callers want
float64 arithmetic. So do calls inside ``torch.func`` transforms (``grad``, ``vmap``,
``jacrev``...): their tensors are functorch wrappers, which torch's own ops support and the
kernels' autograd Functions do not.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNELS_MODULE = "fused_losses.kernels"


def backend_setting() -> str:
    value = os.environ.get("FUSED_LOSSES_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"FUSED_LOSSES_BACKEND={value!r} is not one of {', '.join(BACKENDS)}"
        )
    return value


def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


def functorch_wrapped(x: torch.Tensor) -> bool:
    """True for a tensor of a ``torch.func`` transform (a batched or grad-tracking wrapper).
    Never while torch.compile traces: Dynamo cannot call the check, and it unwraps the
    transforms it traces itself."""
    if torch.compiler.is_compiling():
        return False
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # pragma: no cover - a torch without that private helper
        return False


def use_kernels(x: torch.Tensor) -> bool:
    """True when the Triton kernels should run for input ``x``."""
    setting = backend_setting()
    if setting == "torch" or x.dtype not in KERNEL_DTYPES or functorch_wrapped(x):
        return False
    if setting == "auto":
        return x.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("FUSED_LOSSES_BACKEND=triton, but triton is not installed")
    if x.device.type not in ("cuda", "cpu"):
        raise RuntimeError(
            f"FUSED_LOSSES_BACKEND=triton runs on CUDA or (interpreted) CPU tensors, "
            f"not on {x.device.type}"
        )
    return True


def kernels_for(x: torch.Tensor):
    """The kernels package, imported so that it can run ``x``.

    Triton decides at decoration time whether a kernel is compiled or interpreted, so CPU
    tensors need ``TRITON_INTERPRET=1`` before ``fused_losses.kernels`` is first imported.
    This sets it when the kernels are not yet imported; if they were already compiled for
    the GPU, a CPU tensor cannot run them and the error says how to set things up.
    """
    if x.device.type == "cpu" and _KERNELS_MODULE not in sys.modules:
        if os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
            os.environ["TRITON_INTERPRET"] = "1"
    from fused_losses import kernels

    if x.device.type == "cpu" and not kernels.INTERPRETED:
        raise RuntimeError(
            "FUSED_LOSSES_BACKEND=triton with CPU tensors runs the kernels under the Triton "
            "interpreter, but they were already compiled for the GPU in this process: set "
            "TRITON_INTERPRET=1 before fused_losses.kernels is first imported"
        )
    return kernels
