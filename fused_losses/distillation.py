"""Knowledge distillation: the divergence of a student's next-token distribution from a
teacher's, with the semantics of TRL's ``GKDTrainer.generalized_jsd_loss``.

``distillation_loss`` on logits that exist; ``linear_distillation_loss`` on the two LM heads
(each model's hidden states and head weight), chunk by chunk, neither model's (N, V) logits
ever held. Both validate, work out the options and the reduction's denominator here, then run
the Triton kernel (``kernels/distillation.py``) or its eager twin (``kernels/eager.py``:
``distillation``, ``chunk_divergence_``), as ``_dispatch.use_kernels`` decides; the heads run
on the chunked head (``kernels/linear_distillation.py``) with either.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _dispatch
from ._validation import (
    check_cross_entropy_extras,
    check_int,
    check_linear_dtypes,
    check_log_prob_rows,
    check_logit_transform,
    check_tensor,
)
from .kernels import eager
from .kernels._autograd import detached_without_grad_mode, output_as
from .kernels.chunked_head import ChunkedHeadFunction, Plan
from .kernels.linear_distillation import DistillationChunks
from .log_probs import _INDEX_DTYPES, _chunk

__all__ = ["distillation_loss", "linear_distillation_loss"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_options(beta, reduction, ignore_index, fn: str) -> tuple[float, int]:
    if (not isinstance(beta, numbers.Real) or isinstance(beta, bool)
            or not 0.0 <= float(beta) <= 1.0):
        raise ValueError(f"{fn}: beta must be a number in [0, 1], got {beta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {', '.join(REDUCTIONS)}; got "
                         f"{reduction!r}")
    return float(beta), check_int(fn, "ignore_index", 0, ignore_index)


def _head_options(temperature, softcap, logit_scale) -> eager.Options:
    temperature, logit_scale = check_logit_transform(temperature, logit_scale)
    softcap, _ = check_cross_entropy_extras(softcap, 0.0)
    return eager.Options(softcap=softcap, temperature=temperature, logit_scale=logit_scale)


def _check_teacher_constant(fn: str, **tensors) -> None:
    """The teacher is a constant: no gradient flows to it. A teacher tensor that requires
    grad (where a graph is being built) would silently get none: refuse it."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{fn}: {name} requires grad, but the teacher is a constant here (no gradient "
                f"flows to it); pass {name}.detach(), or run the teacher under "
                "torch.no_grad()")


def _counted(target, n_batch: tuple, n_classes: int, ignore_index: int, device, fn: str):
    """The positions the loss counts: (N,) bool, from the target (its ``ignore_index``
    left out) or all of them."""
    n = math.prod(n_batch)
    if target is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    check_log_prob_rows(fn, n_batch, n_classes, target)
    if target.device != device:
        raise RuntimeError(f"{fn}: expected target on the logits' device ({device}), got "
                           f"{target.device}")
    return target.reshape(n) != ignore_index


def _result_dtype(*tensors) -> torch.dtype:
    """float32 (float64 where an operand is): the loss is a sum over the vocabulary and the
    positions, which bfloat16 would round to 3 digits (a divergence of 22 to the nearest
    0.125); TRL's chunked divergence and the stock causal-LM loss are float32 too."""
    return eager.compute_dtype(*(t.dtype for t in tensors))


def _reduce(total_or_rows, counted, reduction: str, num_items_in_batch, first_dim: int,
            n_classes: int, n_batch: tuple, labelled: bool):
    """TRL's reductions of the per-position divergences (summed over the classes):
    ``num_items_in_batch`` divides the sum (whatever ``reduction``); ``batchmean`` divides
    by the counted positions (at least 1) with a target, by the first dimension of the
    logits without one (``F.kl_div``'s batch); ``mean`` by the counted elements (positions x
    classes: TRL's ``jsd.mean()`` over the element-wise terms); ``none``: each position's."""
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total_or_rows.device)
        return total_or_rows / num_items_in_batch
    if reduction == "none":
        return total_or_rows.view(n_batch)
    if reduction == "sum":
        return total_or_rows
    if reduction == "mean":
        return total_or_rows / (counted.sum() * n_classes)
    if labelled:
        return total_or_rows / counted.sum().clamp_min(1)
    return total_or_rows / max(first_dim, 1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> torch.Tensor:
    r"""The generalized Jensen-Shannon divergence between the student's and the teacher's
    next-token distributions (TRL's ``GKDTrainer.generalized_jsd_loss``, exactly).

    With :math:`p_s = \mathrm{softmax}(s / T)`, :math:`p_t = \mathrm{softmax}(t / T)` per
    position:

    - ``beta = 0``: :math:`\mathrm{KL}(p_t \| p_s)` (forward KL, ``F.kl_div(log p_s, log p_t,
      log_target=True)``);
    - ``beta = 1``: :math:`\mathrm{KL}(p_s \| p_t)` (reverse KL);
    - in between: :math:`\beta \mathrm{KL}(p_t \| m) + (1 - \beta) \mathrm{KL}(p_s \| m)`,
      :math:`m = (1 - \beta) p_s + \beta p_t`.

    A class of probability 0 adds 0 (``0 log 0 = 0``: masked ``-inf`` logits, underflowed
    probabilities), never NaN. float32 math inside whatever the logits' dtype, a float32
    result; no float32 copy of the logits (blocks of rows), the student's gradient (in the
    logits' dtype, rounded once) written in the forward for a reduced loss.

    Args:
        student_logits (Tensor): :math:`(..., V)`; the gradient flows to it.
        teacher_logits (Tensor): :math:`(..., V)`, the same shape; a constant (a teacher
            tensor that requires grad is refused: detach it).
        target (Tensor, optional): token ids :math:`(...)`; positions equal to
            ``ignore_index`` are left out. Default: ``None`` (every position counts)
        beta (float, keyword-only): in :math:`[0, 1]`. Default: ``0.5``
        temperature (float, keyword-only): both logits are divided by it. Default: ``1.0``
        ignore_index (int, keyword-only): Default: ``-100``
        reduction (str, keyword-only): ``'batchmean'`` (the sum over the counted positions
            divided by their number, at least 1; without a target, by the logits' first
            dimension), ``'sum'``, ``'mean'`` (divided by positions x classes, as TRL's
            element-wise mean) or ``'none'`` (each position's divergence, 0 where left out;
            TRL returns the element-wise terms there). Default: ``'batchmean'``
        num_items_in_batch (int or Tensor, optional, keyword-only): when given, the sum is
            divided by it (gradient accumulation), whatever ``reduction``. Default: ``None``

    Returns:
        the loss in float32 (float64 for float64 logits): a scalar, or :math:`(...)` for
        ``'none'``. (TRL's formula returns the logits' dtype: in bfloat16 a divergence of
        22 nats is rounded to the nearest 0.125.)
    """
    fn = "distillation_loss"
    check_tensor(fn, "student_logits", 0, student_logits)
    check_tensor(fn, "teacher_logits", 1, teacher_logits)
    check_tensor(fn, "target", 2, target, optional=True)
    beta, ignore_index = _check_options(beta, reduction, ignore_index, fn)
    opts = eager.DistillOptions(beta=beta, student=_head_options(temperature, None, 1.0),
                                teacher=_head_options(temperature, None, 1.0))
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if t.dim() == 0 or not t.is_floating_point():
            raise RuntimeError(f"{fn}: expected floating-point {name} of shape (..., V), got "
                               f"{t.dtype} of shape {tuple(t.shape)}")
        if _dispatch.is_dtensor(t):
            raise NotImplementedError(f"{fn} does not take DTensor logits; pass local tensors")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{fn}: expected student and teacher logits of the same shape (the "
                         f"same positions and vocabulary), got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise RuntimeError(f"{fn}: expected teacher_logits on the student's device "
                           f"({student_logits.device}), got {teacher_logits.device}")
    _check_teacher_constant(fn, teacher_logits=teacher_logits)
    n_classes = student_logits.shape[-1]
    n_batch = tuple(student_logits.shape[:-1])
    counted = _counted(target, n_batch, n_classes, ignore_index, student_logits.device, fn)
    reduced = reduction != "none" or num_items_in_batch is not None
    s = student_logits.reshape(-1, n_classes)
    t = teacher_logits.detach().reshape(-1, n_classes)
    (s,) = detached_without_grad_mode(s)
    if _dispatch.use_kernels(student_logits, teacher_logits, supported=n_classes > 0):
        out = _dispatch.kernels("distillation").distillation(s, t, counted, opts, reduced)
    else:
        out = eager.distillation(s, t, counted, opts, reduced)
    out = _reduce(out, counted, reduction, num_items_in_batch, student_logits.shape[0],
                  n_classes, n_batch, target is not None)
    return output_as(out, _result_dtype(student_logits, teacher_logits))


def linear_distillation_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r""":func:`distillation_loss` of the two LM heads' logits, a chunk of tokens at a time:
    neither ``(N, V)`` logits tensor ever exists.

    Each head's logits are :math:`\mathrm{softcap} \tanh(s (x W^T + b) / \mathrm{softcap})`
    (its logit scale :math:`s` and softcap optional, Gemma's and Cohere's/Granite's heads),
    then divided by the temperature. Per chunk both heads' logits are formed in float32 (a
    float32 GEMM result from bfloat16 operands on CUDA, never rounded to bfloat16), then the
    divergence and, for a reduced loss, the student's gradient in the same pass: four GEMMs
    per chunk in all (the two heads' forward ones, the student's two gradient ones). ``none``
    forms the chunks again in the backward.

    Args:
        student_input (Tensor): the student's hidden states :math:`(..., H_s)`.
        student_weight (Tensor): the student's head :math:`(V, H_s)`.
        teacher_input (Tensor): the teacher's hidden states :math:`(..., H_t)`, the same
            leading shape (the same positions); a constant.
        teacher_weight (Tensor): the teacher's head :math:`(V, H_t)`, the same vocabulary.
        target (Tensor, optional): token ids :math:`(...)`, ``ignore_index`` left out.
        student_bias, teacher_bias (Tensor, optional, keyword-only): :math:`(V)`.
        student_softcap, teacher_softcap (float, optional, keyword-only): final-logit
            softcapping of each head (before the temperature).
        student_logit_scale, teacher_logit_scale (float, keyword-only): each head's logit
            multiplier. Default: ``1.0``
        beta, temperature, ignore_index, reduction, num_items_in_batch: as
            :func:`distillation_loss`.
        chunk_size (int, optional, keyword-only): tokens per chunk. Default: the most whose
            float32 logits fit 1 GiB on a GPU (64 MiB on a CPU), at most an eighth of the
            tokens from 1,024 tokens on.

    Gradients flow to the student's input, weight and bias; the teacher's tensors are
    constants (one that requires grad is refused: detach it, or run the teacher under
    ``torch.no_grad()``).

    Returns:
        the loss in float32 (float64 for float64 operands): a scalar, or :math:`(...)` for
        ``'none'``.
    """
    fn = "linear_distillation_loss"
    for name, pos, t in (("student_input", 0, student_input),
                         ("student_weight", 1, student_weight),
                         ("teacher_input", 2, teacher_input),
                         ("teacher_weight", 3, teacher_weight)):
        check_tensor(fn, name, pos, t)
    check_tensor(fn, "target", 4, target, optional=True)
    check_tensor(fn, "student_bias", 5, student_bias, optional=True)
    check_tensor(fn, "teacher_bias", 6, teacher_bias, optional=True)
    beta, ignore_index = _check_options(beta, reduction, ignore_index, fn)
    opts = eager.DistillOptions(
        beta=beta,
        student=_head_options(temperature, student_softcap, student_logit_scale),
        teacher=_head_options(temperature, teacher_softcap, teacher_logit_scale))
    heads = (("student", student_input, student_weight, student_bias),
             ("teacher", teacher_input, teacher_weight, teacher_bias))
    for who, x, w, b in heads:
        if any(_dispatch.is_dtensor(t) for t in (x, w, b)):
            raise NotImplementedError(f"{fn} does not take DTensor operands; pass local "
                                      "tensors")
        if x.dim() < 1 or w.dim() != 2:
            raise RuntimeError(f"{fn}: expected {who}_input of shape (..., H) and "
                               f"{who}_weight of shape (V, H), got {tuple(x.shape)} and "
                               f"{tuple(w.shape)}")
        if x.shape[-1] != w.shape[1]:
            raise RuntimeError(f"{fn}: expected equal {who}_input and {who}_weight last "
                               f"dimensions (in_features), got {x.shape[-1]} and "
                               f"{w.shape[1]}, respectively")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise RuntimeError(f"{fn}: expected {who}_bias shape ({w.shape[0]},), got "
                               f"{tuple(b.shape)}")
        if not (x.is_floating_point() and w.is_floating_point()):
            raise RuntimeError(f"{fn}: expected floating-point {who}_input and "
                               f"{who}_weight")
        for t in (w, b):
            if t is not None and t.device != student_input.device:
                raise RuntimeError(f"{fn}: expected every operand on the student input's "
                                   f"device ({student_input.device}), got {t.device}")
    if teacher_input.device != student_input.device:
        raise RuntimeError(f"{fn}: expected every operand on the student input's device "
                           f"({student_input.device}), got {teacher_input.device}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"{fn}: the student's and the teacher's vocabularies must match, got "
                         f"heads of {student_weight.shape[0]} and {teacher_weight.shape[0]} "
                         "classes")
    if student_input.shape[:-1] != teacher_input.shape[:-1]:
        raise ValueError(f"{fn}: expected the student's and the teacher's hidden states at "
                         f"the same positions, got leading shapes "
                         f"{tuple(student_input.shape[:-1])} and "
                         f"{tuple(teacher_input.shape[:-1])}")
    _check_teacher_constant(fn, teacher_input=teacher_input, teacher_weight=teacher_weight,
                            teacher_bias=teacher_bias)
    autocast = _dispatch.autocast_on(student_input)
    if not autocast:
        for _, x, w, b in heads:
            check_linear_dtypes(x, w, b)

    n_vocab = student_weight.shape[0]
    n_batch = tuple(student_input.shape[:-1])
    n_tokens = math.prod(n_batch)
    counted = _counted(target, n_batch, n_vocab, ignore_index, student_input.device, fn)
    reduced = reduction != "none" or num_items_in_batch is not None
    x = student_input.reshape(n_tokens, student_input.shape[-1])
    t_x = teacher_input.detach().reshape(n_tokens, teacher_input.shape[-1])
    t_w = teacher_weight.detach()
    t_b = None if teacher_bias is None else teacher_bias.detach()
    kernels = _dispatch.use_kernels(student_input, student_weight, student_bias, t_x, t_w,
                                    t_b, target, other_dtypes=_INDEX_DTYPES)
    wide = torch.float64 in (student_input.dtype, student_weight.dtype, teacher_input.dtype,
                             teacher_weight.dtype)
    if kernels:  # the GEMMs in each head's operands' dtype (autocast's under autocast)
        auto = torch.get_autocast_dtype(student_input.device.type) if autocast else None
        compute, t_compute = auto or student_input.dtype, auto or teacher_input.dtype
    else:  # the eager formula: float32 (float64 for float64 operands) GEMMs and math
        compute = t_compute = torch.float64 if wide else torch.float32
    whole = n_tokens == 0 or (not kernels and (torch.compiler.is_compiling()
                                               or _dispatch.functorch_wrapped(x)))
    if whole:
        # torch.func transforms and compiled graphs without the kernels: the formula whole
        # (autograd and the compiler see every op; both logits are materialized there)
        def linear(x, w, b, dtype):
            return torch.nn.functional.linear(x.to(dtype), w.to(dtype),
                                              None if b is None else b.to(dtype))

        s_logits = linear(x, student_weight, student_bias, compute)
        t_logits = linear(t_x, t_w, t_b, t_compute).to(s_logits.dtype)
        rows = torch.where(counted, eager.divergence_rows(s_logits, t_logits, opts), 0.0)
        out = rows.sum() if reduced else rows
    else:
        accum = torch.float64 if wide else torch.float32
        chunk = _chunk(n_tokens, n_vocab, student_input.device.type, chunk_size, fn)
        plan = Plan(n_vocab, 1, chunk, compute, accum, kernels)
        x, w, b = detached_without_grad_mode(x, student_weight, student_bias)
        out = ChunkedHeadFunction.apply(x, w, b, plan,
                                        DistillationChunks(opts, t_compute, reduced,
                                                           kernels),
                                        t_x, t_w, t_b, counted)
    first = student_input.shape[0] if student_input.dim() > 1 else n_vocab
    out = _reduce(out, counted, reduction, num_items_in_batch, first, n_vocab, n_batch,
                  target is not None)
    return output_as(out, _result_dtype(student_input, student_weight, teacher_input,
                                        teacher_weight))
