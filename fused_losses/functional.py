"""The public functional API: the signatures of ``torch.nn.functional``, validate -> dispatch.

Each function checks its arguments with torch's exceptions and words (``_validation``), works
out torch's result dtype (autocast included), then runs the Triton kernels or the eager
formula (``fused_losses.kernels.eager``), as ``_dispatch.use_kernels`` decides. Extras beyond
torch's signature are keyword-only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _dispatch
from ._validation import (
    check_binary_cross_entropy_with_logits,
    check_class_target_values,
    check_cross_entropy,
    check_cross_entropy_extras,
    check_float_argument,
    check_huber,
    check_int,
    check_logit_transform,
    check_tensor,
    resolve_reduction,
    weight_needs_grad,
)
from .kernels import eager

__all__ = ["binary_cross_entropy_with_logits", "cross_entropy", "huber_loss"]


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
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_z_loss: bool = False,
    inplace_backward: bool = False,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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

    With ``softcap`` the logits are first replaced by ``softcap * tanh(logits / softcap)``
    (Gemma 2/3's final-logit softcapping); with ``logit_scale`` and ``temperature`` the
    logits are ``softcap * tanh(logit_scale * logits / softcap) / temperature`` (the scale,
    the softcap, the temperature). With ``z_loss`` each counted row adds
    ``z_loss * lse**2`` (PaLM's auxiliary loss, ``lse`` the log-sum-exp of the transformed
    logits: scaled, softcapped, divided by the temperature), reduced like the loss but
    **unweighted**: ``none`` adds it per row, ``sum`` sums it, ``mean`` divides it by the
    number of non-ignored rows (by every row for probability targets), whatever the class
    weights.

    On CUDA the loss and its gradient come from fused Triton kernels (float32 math inside);
    elsewhere from eager PyTorch in float32. The result has the input's dtype (for probability
    targets, torch's promotion of input, target and weight).

    DTensor logits sharded on the class dimension (torch's ``loss_parallel()`` situation)
    run the vocab-parallel loss, one all-gather of per-row statistics
    (``fused_losses.distributed``), and return a replicated DTensor; ``inplace_backward`` has
    no effect there.

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
        softcap (float, optional, keyword-only): cap the logits at ``±softcap`` with
            ``softcap * tanh(logits / softcap)`` before anything else; ``> 0``. Default:
            ``None``
        z_loss (float, optional, keyword-only): the weight of the z-loss, ``>= 0``.
            Default: ``0.0``
        return_z_loss (bool, optional, keyword-only): return ``(loss, z_term)``, ``z_term``
            the reduced z-loss part of the loss alone, for logging (computed in the same
            pass, not differentiable; zeros without ``z_loss``). Default: ``False``
        inplace_backward (bool, optional, keyword-only): on the kernel path, write the
            gradient into the logits' storage instead of a new logits-sized buffer (the
            logits hold garbage afterwards). Refused for a leaf tensor that requires grad; a
            graph that used it cannot be run backward twice. Default: ``False``
        temperature (float, keyword-only): the logits divided by it, last (distillation,
            sampling temperatures); ``> 0``. Default: ``1.0``
        logit_scale (float, keyword-only): the logits multiplied by it, first (Cohere's and
            Granite's heads); finite, nonzero. Default: ``1.0``

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
    label_smoothing = check_float_argument(fn, "label_smoothing", 6, label_smoothing)
    softcap, z_loss = check_cross_entropy_extras(softcap, z_loss)
    temperature, logit_scale = check_logit_transform(temperature, logit_scale)

    if input.dim() == 0 or not input.is_floating_point():
        # Nothing a kernel runs: torch raises (or answers) for these itself.
        loss = F.cross_entropy(input, target, weight, None, ignore_index, None, reduction,
                               label_smoothing)
        return (loss, torch.zeros_like(loss)) if return_z_loss else loss
    if _dispatch.is_dtensor(input):
        # logits sharded by class over a device mesh (torch's loss_parallel): the
        # vocab-parallel loss, one all-gather of per-row statistics (distributed/vocab_parallel.py)
        return _dispatch.tensor_parallel().dtensor_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss,
            return_z_loss, temperature=temperature, logit_scale=logit_scale)
    autocast = _dispatch.autocast_on(input)
    if autocast:
        weight = _dispatch.autocast_cast(weight)
    input_dtype = _dispatch.autocast_dtype(input.dtype) if autocast else input.dtype
    spec = check_cross_entropy(input, target, weight, ignore_index, label_smoothing,
                               input_dtype, reduction)
    check_class_target_values(target, spec, weight, ignore_index, reduction,
                              _dispatch.reads_values_on_host(target))
    if inplace_backward and input.requires_grad and (
            input.is_leaf or (input._base is not None and input._base.is_leaf)):
        # (a view of a leaf too: torch refuses an in-place op on one, and the kernels would
        # write the gradient over the leaf's values)
        raise RuntimeError(
            "cross_entropy(..., inplace_backward=True) would overwrite a leaf tensor that "
            "requires grad (or a view of one); pass a non-leaf tensor (the output of the "
            "layer before the loss)"
        )

    out_dtype = _dispatch.cross_entropy_dtype(input.dtype, target, weight, spec.prob_target,
                                            autocast)
    opts = eager.Options(ignore_index=ignore_index, reduction=reduction,
                         smoothing=spec.smoothing, softcap=softcap, z_loss=z_loss,
                         prob_target=spec.prob_target, inplace_backward=inplace_backward,
                         temperature=temperature, logit_scale=logit_scale)
    # torch's smoothing term compares uint8 targets with ignore_index in uint8 (-100 counts
    # as 156): only the eager path reproduces that, where the two comparisons can differ.
    uint8_quirk = (target.dtype == torch.uint8 and spec.smoothing > 0.0
                   and not 0 <= ignore_index < 256)
    # a class weight differentiated (probability targets: class targets refuse it above):
    # the kernels give it no gradient, the eager formula's autograd does
    weight_grad = weight_needs_grad(weight)
    if _dispatch.use_kernels(input, target, weight, other_dtypes=(torch.int64, torch.uint8),
                             supported=not (uint8_quirk or weight_grad)):
        loss, z = _dispatch.kernels("cross_entropy").cross_entropy(input, target, weight, opts,
                                                                   out_dtype)
    else:
        loss, z = eager.cross_entropy(input, target, weight, opts, out_dtype)
    if not return_z_loss:
        return loss
    return loss, (z if z is not None else torch.zeros_like(loss))


def binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Binary cross-entropy between target and input logits, as
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    With :math:`p` the ``pos_weight`` and :math:`w` the ``weight`` (both broadcast to the
    input),

    .. math::
        \ell = -w \left[ p\, t \log \sigma(x) + (1 - t) \log (1 - \sigma(x)) \right],

    computed without overflow or cancellation for any logit. ``mean`` divides the sum by the
    number of elements.

    On CUDA the loss and its gradients (with respect to input and target) come from one fused
    Triton pass (float32 math inside); elsewhere from eager PyTorch in float32. The result
    has the target's dtype, as torch's.

    Args:
        input (Tensor): logits of any shape.
        target (Tensor): the same shape as the input, values in :math:`[0, 1]` (soft labels
            allowed).
        weight (Tensor, optional): a rescaling weight that broadcasts to the input's shape.
            Default: ``None``
        size_average (bool, optional): deprecated (see ``reduction``). Default: ``None``
        reduce (bool, optional): deprecated (see ``reduction``). Default: ``None``
        reduction (str, optional): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``
        pos_weight (Tensor, optional): a weight of positive examples, broadcast with the
            target along its trailing dimensions: :math:`(C)` for an :math:`(N, C)` target,
            :math:`(C, 1, 1)` for :math:`(N, C, H, W)`. Default: ``None``

    Shape:
        - Output: scalar, or for ``'none'`` the input's shape.

    Examples::

        >>> logits = torch.randn(64, 100_000, requires_grad=True)
        >>> labels = torch.randint(0, 2, (64, 100_000)).float()
        >>> loss = binary_cross_entropy_with_logits(logits, labels,
        ...                                         pos_weight=torch.full((100_000,), 3.0))
        >>> loss.backward()
    """
    if not (
        isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
        and input.is_floating_point() and target.is_floating_point()
    ) or _dispatch.torch_itself(input, target, weight, pos_weight):
        # Nothing a kernel runs, or the eager path would be torch's own function on these
        # very tensors: torch raises (or answers) for them itself.
        return F.binary_cross_entropy_with_logits(input, target, weight, size_average, reduce,
                                                  reduction, pos_weight)
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_binary_cross_entropy_with_logits(input, target, weight, pos_weight)
    # torch's loss has the target's dtype (it is computed in place in ``1 - target``)
    out_dtype = target.dtype
    if _dispatch.autocast_on(input):
        weight, pos_weight = _dispatch.autocast_cast(weight), _dispatch.autocast_cast(pos_weight)
        out_dtype = _dispatch.autocast_dtype(out_dtype)
    if _dispatch.use_kernels(input, target, weight, pos_weight):
        return _dispatch.kernels("bce").binary_cross_entropy_with_logits(
            input, target, weight, pos_weight, reduction, out_dtype)
    return eager.as_dtype(eager.binary_cross_entropy_with_logits(
        input, target, weight, pos_weight, reduction), out_dtype)


def huber_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Huber loss, optionally weighted, as :func:`torch.nn.functional.huber_loss`.

    With :math:`d = x - t`,

    .. math::
        \ell = w \cdot \begin{cases}
            0.5\, d^2, & \text{if } |d| < \delta \\
            \delta (|d| - 0.5\, \delta), & \text{otherwise.}
        \end{cases}

    A target of another size is broadcast against the input, with torch's warning; ``mean``
    divides the sum by the number of elements of the broadcast shape.

    On CUDA the loss and its gradients (with respect to input, target and weight) come from
    one fused Triton pass (float32 math inside); elsewhere from eager PyTorch in float32. The
    result has the input's dtype (promoted with the weight's, as torch's).

    Args:
        input (Tensor): predictions of any shape.
        target (Tensor): ground truth, the input's shape (or broadcastable, with a warning).
        reduction (str, optional): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``
        delta (float, optional): the threshold between the quadratic and the linear part;
            must be positive. Default: ``1.0``
        weight (Tensor, optional): a weight per element, the input's shape. Default: ``None``

    Shape:
        - Output: scalar, or for ``'none'`` the broadcast shape of input and target.

    Examples::

        >>> pred = torch.randn(32, 8, requires_grad=True)
        >>> loss = huber_loss(pred, torch.randn(32, 8), delta=0.5)
        >>> loss.backward()
    """
    if not (
        isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
        and input.is_floating_point()
    ) or (target.shape == input.shape and _dispatch.torch_itself(input, target, weight)):
        # Nothing a kernel runs, or the eager path would be torch's own function on these
        # very tensors: torch raises (or answers) for them itself. (A target of another
        # shape gets our warning, which points at the caller.)
        return F.huber_loss(input, target, reduction, delta, weight)
    shape, reduction, delta = check_huber(input, target, reduction, delta, weight)

    out_dtype = input.dtype
    if _dispatch.autocast_on(input):
        weight = _dispatch.autocast_cast(weight)
        out_dtype = _dispatch.autocast_dtype(out_dtype)
    if weight is not None:
        # torch multiplies the unweighted loss (the broadcast shape, the input's dtype) by the
        # weight: its promotion, 0-d rules included
        unweighted = torch.empty((0,) * min(len(shape), 1), dtype=out_dtype, device="meta")
        out_dtype = torch.result_type(unweighted, weight)
    if _dispatch.use_kernels(input, target, weight, numel=math.prod(shape),
                             supported=target.dtype != torch.bool):
        return _dispatch.kernels("huber").huber_loss(input, target, weight, reduction, delta,
                                                     out_dtype)
    return eager.as_dtype(eager.huber_loss(input, target, weight, reduction, delta), out_dtype)
