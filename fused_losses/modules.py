"""``nn.Module`` drop-ins with the constructors of ``torch.nn``'s losses.

Each subclasses torch's own loss, so ``isinstance`` checks, ``state_dict`` keys (``weight`` and
``pos_weight`` are buffers, as in torch), ``repr`` and attributes are torch's; only
``forward`` calls the fused implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss`, computed by :func:`fused_losses.cross_entropy`.

    Args:
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: as
            :class:`torch.nn.CrossEntropyLoss`.
        inplace_backward (bool, keyword-only): see :func:`fused_losses.cross_entropy`.
            Default: ``False``
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
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward,
        )
