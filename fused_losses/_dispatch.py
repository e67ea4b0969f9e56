"""Kernels or eager PyTorch: the one place where every loss's call is routed.

``FUSED_LOSSES_BACKEND`` (read at every call, so tests can switch it):

- ``auto`` (default): CUDA tensors run the Triton kernels, everything else eager PyTorch.
- ``torch``: always eager PyTorch (float32 math for half inputs, as the kernels do).
- ``triton``: always the kernels. CPU tensors run them under the Triton interpreter, in any
  process and after any import (``kernels/_common.launch`` decides per launch), which is how
  CI tests the kernels without a GPU.

Whatever the setting, a call runs eagerly (where torch's own ops decide, and raise) when the
kernels would not compute it exactly as torch does: float64 operands (float64 callers want
float64 arithmetic), an operand on another device than the input or of a dtype the kernels
do not read, an empty input, tensors of a ``torch.func`` transform (functorch wrappers, which
torch's ops support and the kernels' autograd Functions do not), or a case the loss itself
declares unsupported.

This module also works out the dtypes ``torch.autocast`` makes an op see: the losses run in
float32 under it, and the kernels read any dtype, so only the small operands are cast.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# The setting's raw value, read without os.environ's per-call key encoding (a microsecond of
# a small loss's ~60): CPython keeps the environment in a dict under encoded keys, which
# os.environ's writes (monkeypatch.setenv included) keep current. Elsewhere: os.environ.
try:
    _ENVIRON_DATA = os.environ._data
    _BACKEND_KEY = os.environ.encodekey("FUSED_LOSSES_BACKEND")
    _decode = os.environ.decodevalue
except AttributeError:  # pragma: no cover - another Python's os.environ
    _ENVIRON_DATA = None


def _raw_backend_setting() -> str | None:
    if _ENVIRON_DATA is None:  # pragma: no cover
        return os.environ.get("FUSED_LOSSES_BACKEND")
    value = _ENVIRON_DATA.get(_BACKEND_KEY)
    return None if value is None else _decode(value)


def backend_setting() -> str:
    value = _raw_backend_setting()
    if value is None:  # (every call reads it: a small loss's time is its Python)
        return "auto"
    value = value.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"FUSED_LOSSES_BACKEND={value!r} is not one of {', '.join(BACKENDS)}"
        )
    return value


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


# Looked up once, when this module is imported (finding the package imports nothing): the
# dispatch runs inside torch.compile's traced region, and Dynamo refuses to trace
# importlib.util.find_spec on some torch versions (2.11: "Attempted to call function marked
# as skipped"), which broke every compiled call with fullgraph=True.
_TRITON_AVAILABLE = _find_triton()


def triton_available() -> bool:
    """Whether triton is installed (as it was when fused_losses was imported)."""
    return _TRITON_AVAILABLE


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


def use_kernels(input: torch.Tensor, *operands: torch.Tensor | None,
                other_dtypes: tuple = (), numel: int | None = None,
                supported: bool = True) -> bool:
    """True when the Triton kernels run this call.

    ``operands``: the call's other tensors (None where absent), each of which the kernels
    read in a float dtype of theirs, bool, or one of ``other_dtypes``, on the input's
    device. ``numel``: the elements the loss computes (default: the input's); ``supported``:
    False where the loss's kernels do not cover the case.
    """
    setting = backend_setting()
    if setting == "torch" or not supported or input.dtype not in KERNEL_DTYPES:
        return False
    if setting == "auto" and not input.is_cuda:  # the common CPU call: answered at once
        return False
    if (input.numel() if numel is None else numel) == 0 or functorch_wrapped(input):
        return False
    for t in operands:
        if t is None:
            continue
        if t.device != input.device:
            return False
        if t.dtype not in KERNEL_DTYPES and t.dtype != torch.bool and t.dtype not in other_dtypes:
            return False
    if setting == "auto":
        return input.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("FUSED_LOSSES_BACKEND=triton, but triton is not installed")
    if input.device.type not in ("cuda", "cpu"):
        raise RuntimeError(
            f"FUSED_LOSSES_BACKEND=triton runs on CUDA or (interpreted) CPU tensors, "
            f"not on {input.device.type}"
        )
    return True


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (``fused_losses.distributed`` runs those), without
    importing DTensor where nothing has."""
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None) if module is not None else None
    return cls is not None and isinstance(t, cls)


def torch_itself(input: torch.Tensor, *operands) -> bool:
    """True where the eager path would run torch's own loss on these very tensors: the
    kernels not chosen, every operand a tensor of the input's float32 or float64 dtype (no
    upcast to make), no autocast. A small loss's time is its Python: the caller hands such a
    call to torch at once, validation included (torch's own, by construction)."""
    setting = backend_setting()
    if setting == "triton" or (setting == "auto" and input.is_cuda):
        return False
    if input.dtype not in (torch.float32, torch.float64):
        return False
    for t in operands:
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == input.dtype):
            return False
    return not autocast_on(input)


def kernels(loss: str):
    """The kernel file ``fused_losses.kernels.<loss>`` (the first call imports Triton). An
    import statement, not importlib: torch.compile traces through it."""
    from .kernels import bce, cross_entropy, distillation, huber, log_probs

    return {"bce": bce, "cross_entropy": cross_entropy, "distillation": distillation,
            "huber": huber, "log_probs": log_probs}[loss]


def reads_values_on_host(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values on the host: not for CUDA tensors (a sync on
    the hot path), not while torch.compile traces (it cannot), not inside a transform (the
    eager path runs there, and torch's own ops check)."""
    return not (t.is_cuda or torch.compiler.is_compiling() or functorch_wrapped(t))


# ------------------------------------------------------------------------------------------
# torch.autocast
# ------------------------------------------------------------------------------------------


# Whether autocast is on for any of the CPU, CUDA and a few others (a private helper of
# torch's, where it has one): 0.1 us where the device's own check takes 0.5.
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on(input: torch.Tensor) -> bool:
    """Whether torch.autocast is enabled for the input's device."""
    if (_ANY_AUTOCAST is not None and (input.is_cpu or input.is_cuda)
            and not _ANY_AUTOCAST()):  # the common case, answered at once
        return False
    try:
        return torch.is_autocast_enabled(input.device.type)
    except RuntimeError:  # a device type autocast does not know
        return False


def autocast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast hands a float32 op for an operand of ``dtype``: every floating
    dtype but float64 becomes float32."""
    floating = dtype.is_floating_point and dtype != torch.float64
    return torch.float32 if floating else dtype


def cross_entropy_dtype(logits_dtype: torch.dtype, target: torch.Tensor,
                        weight: torch.Tensor | None, prob_target: bool,
                        autocast: bool) -> torch.dtype:
    """torch's result dtype of a cross-entropy: the logits'; for probability targets the
    logits', the target's and the weight's promoted; float32 under autocast (float64 kept)."""
    dtype = logits_dtype
    if prob_target:
        for t in (target, weight):
            dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    return autocast_dtype(dtype) if autocast else dtype


def autocast_cast(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None else t.to(autocast_dtype(t.dtype))


# ------------------------------------------------------------------------------------------
# the floor above: process groups and DTensor operands
# ------------------------------------------------------------------------------------------


class TensorParallel(NamedTuple):
    """What the public functions route a ``process_group=`` call or DTensor operands to: the
    entry points of the floor above (``fused_losses/distributed``), each documented where it
    is defined. That floor hands them down here when it is imported (``fused_losses``
    imports it), so no module of the API floor imports it: a call is turned into local
    tensors and a group once, up there, and comes back down with a per-chunk loss that
    knows the group."""

    dtensor_cross_entropy: Callable  # cross_entropy of DTensor logits (vocab-parallel)
    dtensor_linear_head: Callable  # an LM-head loss of DTensor operands (TP or FSDP2)
    lm_head_layout: Callable  # (group, this rank's block, its deferred error) of a CE head
    sharded_chunks: type  # the sharded CE head's per-chunk loss
    sharded_log_prob_chunks: type  # the sharded RL head's (its ``layout`` too)
    bad_target: int  # the status a rank's out-of-range target is deferred with


_TENSOR_PARALLEL: list = []


def provide_tensor_parallel(entry: TensorParallel) -> None:
    """Called once, by ``fused_losses/distributed`` when it is imported."""
    _TENSOR_PARALLEL[:] = [entry]


def tensor_parallel() -> TensorParallel:
    """The floor above's entry points (``TensorParallel``)."""
    if not _TENSOR_PARALLEL:  # (only where this module was imported outside its package)
        raise RuntimeError("fused_losses.distributed is not imported")
    return _TENSOR_PARALLEL[0]
