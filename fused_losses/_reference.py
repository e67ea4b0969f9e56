"""The eager PyTorch path: torch's own losses, computed in float32 for half inputs.

This is the fallback for every non-CUDA tensor (and for float64, and for the corner cases the
kernels hand back, such as empty inputs). It calls ``torch.nn.functional`` on upcast copies, so
its semantics are torch's by construction, and its rounding matches the kernels' (float32 math
inside, output in the caller's dtype). Gradients flow through the upcasts back to the
original dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any operand is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _up(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in the compute dtype; integer, bool and complex tensors as they are (torch's
    promotion decides for them)."""
    return t.to(dtype) if t is not None and t.is_floating_point() else t


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, prob_target,
                  out_dtype):
    dtype = compute_dtype(out_dtype)
    if prob_target:
        target = target.to(dtype)
    else:
        if input.dim() == 1 and target.dim() == 1:
            # (C,) input with a (1,) target: torch's backward raises "size mismatch" for it;
            # the 0-d target means the same and has a working backward (same output shape).
            target = target.reshape(())
    loss = F.cross_entropy(
        input.to(dtype),
        target,
        _up(weight, dtype),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.to(out_dtype)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction, out_dtype):
    """For floating input and target (of one shape)."""
    dtypes = [t.dtype for t in (input, target, weight, pos_weight) if t is not None]
    dtype = compute_dtype(*dtypes)
    loss = F.binary_cross_entropy_with_logits(
        input.to(dtype), target.to(dtype), _up(weight, dtype), reduction=reduction,
        pos_weight=_up(pos_weight, dtype),
    )
    return loss.to(out_dtype)


def huber_loss(input, target, weight, reduction, delta, out_dtype):
    """For a floating input. Input and target are broadcast here (the caller gave torch's
    warning), and the weight with them."""
    dtypes = [t.dtype for t in (input, target, weight) if t is not None]
    dtype = compute_dtype(*dtypes)
    x, t = torch.broadcast_tensors(input.to(dtype), _up(target, dtype))
    w = None if weight is None else _up(weight, dtype).expand(x.shape)
    return F.huber_loss(x, t, reduction=reduction, delta=delta, weight=w).to(out_dtype)
