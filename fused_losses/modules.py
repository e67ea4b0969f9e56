"""``nn.Module`` drop-ins with the constructors of ``torch.nn``'s losses.

Each subclasses torch's own loss, so ``isinstance`` checks, ``state_dict`` keys (``weight`` and
``pos_weight`` are buffers, as in torch), ``repr`` and attributes are torch's; only
``forward`` calls the fused implementation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as F
from ._validation import check_cross_entropy_extras, check_logit_transform
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "HuberLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss`, computed by :func:`fused_losses.cross_entropy`.

    Args:
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: as
            :class:`torch.nn.CrossEntropyLoss`.
        softcap, z_loss, return_z_loss, inplace_backward, temperature, logit_scale
            (keyword-only): see :func:`fused_losses.cross_entropy`. Defaults: ``None``,
            ``0.0``, ``False``, ``False``, ``1.0``, ``1.0``
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_z_loss: bool = False,
        inplace_backward: bool = False,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.softcap, self.z_loss = check_cross_entropy_extras(softcap, z_loss)
        self.temperature, self.logit_scale = check_logit_transform(temperature, logit_scale)
        self.return_z_loss = return_z_loss
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_z_loss=self.return_z_loss,
            inplace_backward=self.inplace_backward,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
        )

    def extra_repr(self) -> str:
        return _extras_repr(self)


def _extras_repr(module) -> str:
    """The keyword-only extras a loss module was built with, where not their defaults."""
    return ", ".join(f"{name}={getattr(module, name)}" for name, default in
                     (("softcap", None), ("z_loss", 0.0), ("return_z_loss", False),
                      ("temperature", 1.0), ("logit_scale", 1.0))
                     if getattr(module, name) != default)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss`, computed by
    :func:`fused_losses.binary_cross_entropy_with_logits`.

    Args:
        weight, size_average, reduce, reduction, pos_weight: as
            :class:`torch.nn.BCEWithLogitsLoss` (``weight`` and ``pos_weight`` are buffers).
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class HuberLoss(nn.HuberLoss):
    """:class:`torch.nn.HuberLoss`, computed by :func:`fused_losses.huber_loss`.

    Args:
        reduction, delta: as :class:`torch.nn.HuberLoss`.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


# torch's module exists from torch 2.13 on: subclass it there (state_dict, repr and isinstance
# are torch's); on an older torch, the same constructor and state (a ``linear`` submodule, a
# ``weight`` buffer) on torch's weighted-loss base.
_TorchLinearCrossEntropyLoss = getattr(nn, "LinearCrossEntropyLoss", None)


class LinearCrossEntropyLoss(_TorchLinearCrossEntropyLoss or nn.modules.loss._WeightedLoss):
    """:class:`torch.nn.LinearCrossEntropyLoss` (torch >= 2.13; the same constructor and
    state on an older torch), computed by :func:`fused_losses.linear_cross_entropy`: the
    logits of ``self.linear`` are never materialized.

    Args:
        in_features, num_classes, out_features, bias, device, dtype, reduction, weight,
            ignore_index, label_smoothing, options: as :class:`torch.nn.LinearCrossEntropyLoss`.
        softcap, z_loss, return_z_loss, chunk_size, accum_dtype, temperature, logit_scale
            (keyword-only): see :func:`fused_losses.linear_cross_entropy`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options=None,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_z_loss: bool = False,
        chunk_size: int | None = None,
        accum_dtype: torch.dtype | None = torch.float32,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
    ) -> None:
        kwargs = dict(out_features=out_features, bias=bias, device=device, dtype=dtype,
                      reduction=reduction, weight=weight, ignore_index=ignore_index,
                      label_smoothing=label_smoothing, options=options)
        if _TorchLinearCrossEntropyLoss is not None:
            super().__init__(in_features, num_classes, **kwargs)
        else:  # torch 2.13's constructor
            if weight is not None and weight.shape != (num_classes,):
                raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got "
                                   f"{tuple(weight.shape)}")
            if label_smoothing < 0 or label_smoothing > 1.0:
                raise RuntimeError("expected label_smoothing to be in range [0, 1], got "
                                   f"{label_smoothing}")
            super().__init__(weight=weight, reduction=reduction)
            self.num_classes, self.out_features = num_classes, out_features
            self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
            self.linear = nn.Linear(in_features, math.prod(out_features, start=num_classes),
                                    bias=bias, device=device, dtype=dtype)
            self.options = options
        self.softcap, self.z_loss = check_cross_entropy_extras(softcap, z_loss)
        self.temperature, self.logit_scale = check_logit_transform(temperature, logit_scale)
        self.return_z_loss, self.chunk_size, self.accum_dtype = (return_z_loss, chunk_size,
                                                                 accum_dtype)

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        linear_weight = self.linear.weight.reshape(
            (self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = None
        if self.linear.bias is not None:
            linear_bias = self.linear.bias.reshape((self.num_classes, *self.out_features))
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options, softcap=self.softcap,
            z_loss=self.z_loss, return_z_loss=self.return_z_loss, chunk_size=self.chunk_size,
            accum_dtype=self.accum_dtype, temperature=self.temperature,
            logit_scale=self.logit_scale,
        )
