"""``nn.Module`` drop-ins with the constructors of ``torch.nn``'s losses.

Each subclasses torch's own loss, so ``isinstance`` checks, ``state_dict`` keys (``weight`` and
``pos_weight`` are buffers, as in torch), ``repr`` and attributes are torch's; only
``forward`` calls the fused implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._validation import check_cross_entropy_extras

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "HuberLoss"]


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss`, computed by :func:`fused_losses.cross_entropy`.

    Args:
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: as
            :class:`torch.nn.CrossEntropyLoss`.
        softcap, z_loss, return_z_loss, inplace_backward (keyword-only): see
            :func:`fused_losses.cross_entropy`. Defaults: ``None``, ``0.0``, ``False``,
            ``False``
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
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.softcap, self.z_loss = check_cross_entropy_extras(softcap, z_loss)
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
        )

    def extra_repr(self) -> str:
        extras = [f"{name}={getattr(self, name)}" for name, default in
                  (("softcap", None), ("z_loss", 0.0), ("return_z_loss", False))
                  if getattr(self, name) != default]
        return ", ".join(extras)


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
