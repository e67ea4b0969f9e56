"""The public functional API: the signatures of ``torch.nn.functional``, validate -> dispatch.

Each function checks its arguments with torch's exceptions and words (``_validation``), then
runs the Triton kernels (``fused_losses.kernels``) or the eager path (``_reference``), as
``_backend`` decides. Extras beyond torch's signature are keyword-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend, _reference
from ._validation import (
    check_cross_entropy,
    check_float,
    check_int,
    check_tensor,
    resolve_reduction,
)

__all__ = ["cross_entropy"]


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    r"""Cross-entropy between input logits and target, as
    :func:`torch.nn.functional.cross_entropy`.

    For class-index targets :math:`y_n` and label smoothing :math:`\epsilon`,

    .. math::
        \ell_n = (1 - \epsilon)\, w_{y_n} (\operatorname{lse}(x_n) - x_{n,y_n})
                 + \frac{\epsilon}{C} \sum_c w_c (\operatorname{lse}(x_n) - x_{n,c}),

    zero where :math:`y_n` is ``ignore_index``; ``mean`` divides the sum by
    :math:`\sum_n w_{y_n}` over the non-ignored targets. For probability targets
    :math:`\ell_n = -\sum_c w_c t'_{n,c} \log \operatorname{softmax}(x_n)_c` with
    :math:`t' = (1-\epsilon) t + \epsilon / C`, and ``mean`` divides by the number of rows.

    On CUDA the loss and its gradient come from fused Triton kernels (float32 math inside);
    elsewhere from eager PyTorch in float32. The result has the input's dtype (for probability
    targets, torch's promotion of input, target and weight).

    Args:
        input (Tensor): logits, :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`.
        target (Tensor): class indices (int64 or uint8) of shape :math:`()`, :math:`(N)` or
            :math:`(N, d_1, ..., d_K)`, or class probabilities of the input's shape.
        weight (Tensor, optional): a weight per class, shape :math:`(C)`. Default: ``None``
        size_average (bool, optional): deprecated (see ``reduction``). Default: ``None``
        ignore_index (int, optional): a target value that is ignored and does not count in
            the mean's denominator (class-index targets). Default: ``-100``
        reduce (bool, optional): deprecated (see ``reduction``). Default: ``None``
        reduction (str, optional): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``
        label_smoothing (float, optional): in :math:`[0.0, 1.0]`. Default: ``0.0``
        inplace_backward (bool, optional, keyword-only): on the kernel path, write the
            gradient into the logits' storage instead of a new logits-sized buffer (the
            logits hold garbage afterwards). Refused for a leaf tensor that requires grad; a
            graph that used it cannot be run backward twice. Default: ``False``

    Shape:
        - Output: scalar, or for ``'none'`` the target's shape (class indices) or the input's
          shape without the class dimension (probabilities).

    Examples::

        >>> logits = torch.randn(8, 32000, requires_grad=True)
        >>> target = torch.randint(32000, (8,))
        >>> loss = cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
    """
    fn = "cross_entropy_loss"
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "target", 2, target)
    check_tensor(fn, "weight", 3, weight, optional=True)
    reduction = resolve_reduction(size_average, reduce, reduction)
    ignore_index = check_int(fn, "ignore_index", 5, ignore_index)
    label_smoothing = check_float(fn, "label_smoothing", 6, label_smoothing)

    if input.dim() == 0 or not input.is_floating_point():
        # Nothing a kernel runs: torch raises (or answers) for these itself.
        return F.cross_entropy(input, target, weight, None, ignore_index, None, reduction,
                               label_smoothing)
    spec = check_cross_entropy(input, target, weight, ignore_index, label_smoothing)
    if inplace_backward and input.is_leaf and input.requires_grad:
        raise RuntimeError(
            "cross_entropy(..., inplace_backward=True) would overwrite a leaf tensor that "
            "requires grad; pass a non-leaf tensor (the output of the layer before the loss)"
        )

    n_rows = input.numel() // max(spec.n_classes, 1)
    wide = [input.dtype]
    if spec.prob_target:
        wide += [target.dtype] + ([weight.dtype] if weight is not None else [])
    if (
        _backend.use_kernels(input)
        and n_rows > 0
        and spec.n_classes > 0
        and torch.float64 not in wide
    ):
        kernels = _backend.kernels_for(input)
        return kernels.cross_entropy.cross_entropy(
            input, target, weight, ignore_index, reduction, spec.smoothing, spec.prob_target,
            inplace_backward,
        )
    return _reference.cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, spec.prob_target
    )
