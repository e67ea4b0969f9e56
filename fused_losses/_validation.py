"""Argument checks with PyTorch's exception types and wording.

Both backends run these before any work, so bad input fails the same way on the CPU, under
the Triton interpreter and on CUDA. The order of the checks follows PyTorch's (which error
wins when an input is wrong in two ways); ``tests/test_errors.py`` compares every message
with the installed torch.

Nothing here decides where a call runs. The data-dependent checks (the range of class-index
targets, ``check_target_values``) are separate, for the caller to run where reading values on
the host costs nothing (CPU tensors): on CUDA an out-of-range target yields NaN for its row
instead (see ``kernels/cross_entropy.py``).
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from dataclasses import dataclass

import torch
from torch.nn import _reduction

# The names PyTorch's C++ messages use for dtypes ("expected ... but got Int").
_SCALAR_TYPE_NAMES = {
    torch.float64: "Double",
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def scalar_type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape(t) -> str:
    """A tensor's (or a shape's) sizes as torch's C++ messages print them: ``[2, 3]``."""
    shape = t.shape if isinstance(t, torch.Tensor) else t
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _type_name(value) -> str:
    return type(value).__name__ if value is not None else "NoneType"


def check_tensor(fn: str, name: str, position: int, value, optional: bool = False) -> None:
    """``TypeError`` in the words of torch's argument parser for a non-tensor argument."""
    if isinstance(value, torch.Tensor) or (optional and value is None):
        return
    raise TypeError(
        f"{fn}(): argument '{name}' (position {position}) must be Tensor, "
        f"not {_type_name(value)}"
    )


def check_int(fn: str, name: str, position: int, value) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(
        f"{fn}(): argument '{name}' (position {position}) must be int, not {_type_name(value)}"
    )


def resolve_reduction(size_average, reduce, reduction: str) -> str:
    """torch's handling of the legacy ``size_average``/``reduce`` flags, then of ``reduction``.

    ``legacy_get_string`` warns as torch does; ``get_enum`` raises torch's
    ``ValueError("avg is not a valid value for reduction")`` and maps the deprecated
    ``"elementwise_mean"`` to ``"mean"`` with torch's warning.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    return ("none", "mean", "sum")[_reduction.get_enum(reduction)]


# --------------------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossEntropySpec:
    """What the checks learned about a valid call: which kind of target, and the sizes."""

    prob_target: bool
    n_classes: int
    smoothing: float  # the label smoothing actually applied (0.0 when torch ignores it)


def check_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    input_dtype: torch.dtype | None = None,
    reduction: str = "mean",
) -> CrossEntropySpec:
    """Every check ``torch.nn.functional.cross_entropy`` makes but the target values', with
    its exception and words, in its order.

    ``input`` has at least one dimension and a floating dtype (the caller hands 0-d and
    integer inputs to torch itself, which raises its own errors for them). ``input_dtype``:
    the dtype torch would see (float32 under torch.autocast), if not the input's.
    ``reduction``: the resolved reduction (torch skips some dtype checks of an empty target
    when the loss is reduced).
    """
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]

    if input.shape == target.shape:
        # Same shape: probability targets (torch decides by shape alone).
        if not target.is_floating_point():
            raise RuntimeError(
                "Expected floating point type for target with class probabilities, "
                f"got {scalar_type_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        if weight is not None and (weight.dim() != 1 or weight.numel() != n_classes):
            raise RuntimeError(
                f"cross_entropy: weight tensor should be defined either for all {n_classes} "
                f"classes or no classes but got weight tensor of shape: {_shape(weight)}"
            )
        if label_smoothing > 0.0 and label_smoothing > 1.0:
            raise RuntimeError(
                f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}"
            )
        smoothing = label_smoothing if label_smoothing > 0.0 else 0.0
        return CrossEntropySpec(True, n_classes, smoothing)

    # Class-index targets. torch checks the smoothing first, then what nll_loss checks.
    if label_smoothing > 0.0 and label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}")

    # A target of another dtype than int64 or uint8: torch >= 2.13 refuses it among the
    # shape checks; older torch when its kernel reads the targets, after every other check,
    # and not where a reduced loss has no target to read (_target_dtype_rule).
    dtype_error = rule = None
    if target.dtype not in (torch.int64, torch.uint8):
        rule = _target_dtype_rule()
        dtype_error = RuntimeError(rule.message(target.dtype))
    reads_targets = target.numel() > 0 or reduction not in ("mean", "sum")
    _check_class_target_shape(input, target, dtype_error if rule and rule.early else None,
                              _weight_grad_error(input.dim(), weight))

    if input.dim() == 4:
        # nll_loss2d: the weight's size, then the sizes, then (below) the weight's dtype
        if weight is not None and weight.numel() != n_classes:
            raise RuntimeError("weight tensor should be defined either for all or no classes")
        if target.shape != (input.shape[0],) + tuple(input.shape[2:]):
            raise RuntimeError(
                f"size mismatch (got input: {_shape(input)} , target: {_shape(target)}"
            )

    if weight is not None:
        if input.dim() <= 2:
            if weight.dim() != 1 or weight.numel() != n_classes:
                raise RuntimeError(
                    f"weight tensor should be defined either for all {n_classes} classes or "
                    f"no classes but got weight tensor of shape: {_shape(weight)}"
                )
        elif weight.numel() != n_classes:
            raise RuntimeError("weight tensor should be defined either for all or no classes")
        input_dtype = input_dtype or input.dtype
        if weight.dtype != input_dtype:
            raise RuntimeError(
                f"expected scalar type {scalar_type_name(input_dtype)} but found "
                f"{scalar_type_name(weight.dtype)}"
            )
    if input.dim() > 2 and target.dtype == torch.uint8 and reads_targets:
        # torch's K-dimensional kernels take int64 targets only (its 1-D and 2-D ones Byte too)
        raise RuntimeError("expected scalar type Long but found Byte")
    if dtype_error is not None and not rule.early and (reads_targets or rule.checks_empty):
        raise dtype_error
    if input.dim() == 1 and target.dim() == 1 and label_smoothing > 0.0:
        # torch's smoothing path fails on this shape (its masked_fill_ cannot broadcast a
        # (1,) mask into the 0-d loss), after nll_loss's checks; raise as it does rather than
        # answer where it cannot.
        raise RuntimeError("output with shape [] doesn't match the broadcast shape [1]")

    smoothing = label_smoothing if label_smoothing > 0.0 else 0.0
    return CrossEntropySpec(False, n_classes, smoothing)


def check_target_values(target: torch.Tensor, spec: CrossEntropySpec, weight, ignore_index: int,
                        reduction: str) -> None:
    """The checks of class-index targets that read their values (CPU tensors only), in
    torch's order: ``IndexError("Target 7 is out of bounds.")`` for the first bad class
    index, then the error torch's weighted, smoothed mean raises for uint8 targets (its
    ``gather`` takes int64 indices only) unless every target is ignored there."""
    t = target.to(torch.int64)
    bad = (t != ignore_index) & ((t < 0) | (t >= spec.n_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")
    if uint8_weighted_smoothed_mean(target, spec, weight, reduction):
        # torch compares uint8 targets with ignore_index in uint8 in its smoothing term
        if bool((t != ignore_index % 256).any()):
            raise RuntimeError("gather(): Expected dtype int32/int64 for index")


def check_class_target_values(target: torch.Tensor, spec: CrossEntropySpec, weight,
                              ignore_index: int, reduction: str, on_host: bool) -> None:
    """The checks of class-index targets that depend on their values: read on the host
    where ``on_host`` (``check_target_values``); elsewhere only what needs no value."""
    if spec.prob_target:
        return
    if on_host:
        check_target_values(target, spec, weight, ignore_index, reduction)
    elif uint8_weighted_smoothed_mean(target, spec, weight, reduction):
        raise RuntimeError("gather(): Expected dtype int32/int64 for index")


def uint8_weighted_smoothed_mean(target, spec: CrossEntropySpec, weight, reduction) -> bool:
    """A call torch refuses when any target is counted (see ``check_target_values``): on
    CUDA, where the values are not read, it is refused whenever there are targets."""
    return (target.dtype == torch.uint8 and weight is not None and spec.smoothing > 0.0
            and reduction == "mean" and target.numel() > 0)


def check_cross_entropy_extras(softcap, z_loss) -> tuple[float | None, float]:
    """``softcap`` (None, or a finite number > 0) and ``z_loss`` (a finite number >= 0), or
    ``ValueError``."""
    if softcap is not None:
        if not _real(softcap) or not 0.0 < float(softcap) < math.inf:
            raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
        softcap = float(softcap)
    if not _real(z_loss) or not 0.0 <= float(z_loss) < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return softcap, float(z_loss)


def check_logit_transform(temperature, logit_scale) -> tuple[float, float]:
    """``temperature`` (a finite number > 0) and ``logit_scale`` (a finite number other than
    0), or ``ValueError``."""
    if not _real(temperature) or not 0.0 < float(temperature) < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if (not _real(logit_scale) or not math.isfinite(float(logit_scale))
            or float(logit_scale) == 0.0):
        raise ValueError(f"logit_scale must be a finite nonzero number, got {logit_scale!r}")
    return float(temperature), float(logit_scale)


def check_log_prob_rows(fn: str, n_batch: tuple, n_classes: int, target: torch.Tensor) -> None:
    """Class-index targets of rows of ``n_classes`` logits, one per row: an integer tensor
    of the rows' leading shape ``n_batch``, and at least one class where there are rows."""
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise RuntimeError(f"{fn}: expected an integer tensor of class indices as target, "
                           f"got {scalar_type_name(target.dtype)}")
    if tuple(target.shape) != tuple(n_batch):
        raise ValueError(f"{fn}: expected target of shape {_shape(n_batch)} (the logits' "
                         f"leading dimensions), got {_shape(target)}")
    if n_classes == 0 and target.numel():
        raise ValueError(f"{fn}: expected at least one class, got logits of 0 classes")


def check_log_prob_target_values(target: torch.Tensor, n_classes: int,
                                 ignore_index: int) -> None:
    """torch's ``IndexError("Target 7 is out of bounds.")`` for the first class index out of
    range (CPU tensors: reading them costs no sync)."""
    t = target.to(torch.int64)
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def weight_needs_grad(weight: torch.Tensor | None) -> bool:
    """Whether a class weight is differentiated by this call (it requires grad, and a graph
    is built): only autograd's formula gives it a gradient, not the kernels' Functions nor
    the LM head's chunks (for probability targets; class targets refuse it, as torch)."""
    return weight is not None and weight.requires_grad and torch.is_grad_enabled()


def _weight_grad_error(input_dim: int, weight: torch.Tensor | None) -> RuntimeError | None:
    """torch's refusal of a class weight that requires grad where a graph is built, for
    class-index targets: its ``nll_loss`` has no derivative for the weight (the kernels'
    Functions give it none either), so a gradient would silently be missing."""
    if not weight_needs_grad(weight):
        return None
    fn = "nll_loss_forward" if input_dim <= 2 else "nll_loss2d_forward"
    return RuntimeError(f"The function '{fn}' is not differentiable with respect to argument "
                        "'weight'. This input cannot have requires_grad True.")


def _check_class_target_shape(input: torch.Tensor, target: torch.Tensor,
                              dtype_error: RuntimeError | None,
                              weight_grad_error: RuntimeError | None = None) -> None:
    """Shape checks of ``nll_loss_nd`` for class-index targets, in torch's order, with
    ``dtype_error`` (a target dtype refused among them) where torch raises it, and
    ``weight_grad_error`` where torch reaches its autograd op (``nll_loss`` or
    ``nll_loss2d``: after the batch check, and the K-dimensional target's size check)."""
    if input.dim() == 1:
        if weight_grad_error is not None:
            raise weight_grad_error
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if dtype_error is not None:
            raise dtype_error
        if target.dim() == 1 and target.numel() != 1:
            raise ValueError(
                "For 1D input, 1D target must have size 1, but got target size: "
                f"{target.shape[0]}"
            )
        return

    target_batch = target.shape[0] if target.dim() > 0 else 0
    if input.shape[0] != target_batch:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target_batch})."
        )
    if weight_grad_error is not None and input.dim() in (2, 4):
        raise weight_grad_error
    if input.dim() == 2:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    elif input.dim() == 4:
        if target.dim() != 3:
            raise RuntimeError(
                "only batches of spatial targets supported (3D tensors) but got targets of "
                f"dimension: {target.dim()}"
            )
    else:
        expected = (input.shape[0],) + tuple(input.shape[2:])
        if tuple(target.shape) != expected:
            raise RuntimeError(
                f"Expected target size [{', '.join(map(str, expected))}], got {_shape(target)}"
            )
        if weight_grad_error is not None:
            raise weight_grad_error
    if dtype_error is not None:
        raise dtype_error


# --------------------------------------------------------------------------------------
# the dtype of class-index targets, as the installed torch refuses it
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetDtypeRule:
    """How the installed torch refuses a class-index target that is neither int64 nor uint8
    (probed: ``_target_dtype_rule``).

    ``template``: its message, ``{}`` for the dtype's name ("expected target dtype to be Long
    or Byte, but got {}" from torch 2.13 on, "expected scalar type Long but found {}"
    before). ``early``: refused among the shape checks, before the weight's (torch >= 2.13),
    rather than after every other check, where its kernel reads the targets.
    ``checks_empty``: refused also where a reduced loss has no target to read."""

    template: str
    early: bool
    checks_empty: bool

    def message(self, dtype: torch.dtype) -> str:
        return self.template.format(scalar_type_name(dtype))


# torch 2.13's behaviour: the answer while torch.compile traces, before any probe ran
_NEWEST_TARGET_DTYPE_RULE = TargetDtypeRule(
    "expected target dtype to be Long or Byte, but got {}", early=True, checks_empty=True)
_target_dtype_rule_probed: TargetDtypeRule | None = None


def _target_dtype_rule() -> TargetDtypeRule:
    """The installed torch's ``TargetDtypeRule``, found once by calling ``nll_loss`` on
    one-element CPU tensors with an int32 target (only ever on the way to an error)."""
    global _target_dtype_rule_probed
    if _target_dtype_rule_probed is None:
        if torch.compiler.is_compiling():  # (no probe inside a traced region)
            return _NEWEST_TARGET_DTYPE_RULE
        _target_dtype_rule_probed = _probe_target_dtype_rule()
    return _target_dtype_rule_probed


def _nll_loss_error(input, target, weight=None) -> str | None:
    try:
        torch.nn.functional.nll_loss(input, target, weight)
    except RuntimeError as e:
        return str(e)
    return None


def _probe_target_dtype_rule() -> TargetDtypeRule:
    int32 = torch.int32
    words = _nll_loss_error(torch.zeros(1, 1), torch.zeros(1, dtype=int32))
    name = scalar_type_name(int32)
    if words is None or not words.endswith(name):  # a torch this module does not know
        return _NEWEST_TARGET_DTYPE_RULE
    # a weight of the wrong size: which does torch refuse first?
    first = _nll_loss_error(torch.zeros(1, 2), torch.zeros(1, dtype=int32), torch.ones(1))
    return TargetDtypeRule(
        template=words[:-len(name)].replace("{", "{{").replace("}", "}}") + "{}",
        early=first == words,
        checks_empty=_nll_loss_error(torch.zeros(0, 2), torch.zeros(0, dtype=int32)) is not None,
    )


# the names in F.linear's dtype message (C++'s type names)
_CPP_TYPE_NAMES = {torch.float32: "float", torch.float64: "double",
                   torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}


def check_linear_dtypes(input: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    """``F.linear``'s errors for operands of different dtypes (outside autocast), its
    words."""
    if bias is not None and bias.dtype != weight.dtype:
        raise RuntimeError("self and mat2 must have the same dtype, but got "
                           f"{scalar_type_name(bias.dtype)} and "
                           f"{scalar_type_name(weight.dtype)}")
    if input.dtype != weight.dtype:
        names = [_CPP_TYPE_NAMES.get(t.dtype, scalar_type_name(t.dtype))
                 for t in (input, weight)]
        raise RuntimeError("expected m1 and m2 to have the same dtype, but got: "
                           f"{names[0]} != {names[1]}")


def check_float_argument(fn: str, name: str, position: int, value) -> float:
    """A ``float`` argument as torch's argument parser takes it: any real number (bool, int
    and numpy scalars included) or a 0-d real tensor that does not require grad; otherwise
    its ``TypeError``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.requires_grad and not value.is_complex():
            return float(value)
    elif isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(
        f"{fn}(): argument '{name}' (position {position}) must be float, "
        f"not {_type_name(value)}"
    )


# --------------------------------------------------------------------------------------
# broadcasting, in torch's words
# --------------------------------------------------------------------------------------


def broadcast_shape(a, b) -> tuple[int, ...]:
    """torch's ``infer_size``: shapes ``a`` and ``b`` broadcast together, or its error."""
    ndim = max(len(a), len(b))
    out = [0] * ndim
    for i in range(ndim - 1, -1, -1):  # trailing dimensions first, as torch reports them
        offset = ndim - 1 - i
        size_a = a[len(a) - 1 - offset] if offset < len(a) else 1
        size_b = b[len(b) - 1 - offset] if offset < len(b) else 1
        if size_a != size_b and size_a != 1 and size_b != 1:
            raise RuntimeError(
                f"The size of tensor a ({size_a}) must match the size of tensor b ({size_b}) "
                f"at non-singleton dimension {i}"
            )
        out[i] = size_b if size_a == 1 else size_a
    return tuple(out)


def check_inplace_broadcast(out_shape, other_shape) -> None:
    """torch's checks for ``out.mul_(other)``: ``other`` broadcasts to ``out``'s shape."""
    shape = broadcast_shape(tuple(out_shape), tuple(other_shape))
    if shape != tuple(out_shape):
        raise RuntimeError(
            f"output with shape {_shape(out_shape)} doesn't match the broadcast shape "
            f"{_shape(shape)}"
        )


# --------------------------------------------------------------------------------------
# binary cross-entropy with logits
# --------------------------------------------------------------------------------------


def check_binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> None:
    """Every check ``F.binary_cross_entropy_with_logits`` makes after resolving the reduction,
    in its order, for floating input and target (others go to torch itself)."""
    if target.size() != input.size():
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"
        )
    fn = "binary_cross_entropy_with_logits"
    check_tensor(fn, "weight", 3, weight, optional=True)
    check_tensor(fn, "pos_weight", 4, pos_weight, optional=True)
    if torch.is_grad_enabled():
        for name, value in (("weight", weight), ("pos_weight", pos_weight)):
            if value is not None and value.requires_grad:
                raise RuntimeError(
                    f"The function '{fn}' is not differentiable with respect to argument "
                    f"'{name}'. This input cannot have requires_grad True."
                )
    # torch computes log_sigmoid(input).mul_((pos_weight - 1) * target + 1), then
    # (1 - target).mul_(input).sub_(...).mul_(weight): both weights must broadcast to the
    # input's shape, pos_weight through the target's.
    if pos_weight is not None:
        check_inplace_broadcast(input.shape, broadcast_shape(pos_weight.shape, target.shape))
    if weight is not None:
        check_inplace_broadcast(input.shape, weight.shape)


# --------------------------------------------------------------------------------------
# Huber
# --------------------------------------------------------------------------------------


def check_huber(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction,
    delta,
    weight: torch.Tensor | None,
) -> tuple[tuple[int, ...], str, float]:
    """Every check ``F.huber_loss`` makes, in its order, for a floating input and a tensor
    target: its warning for a target of another size, then the broadcast shape, the reduction
    and ``delta`` as torch applies them. With a weight, torch checks the reduction last and
    in other words (and does not accept ``'elementwise_mean'``)."""
    if target.size() != input.size() and not torch.compiler.is_compiling():
        # (torch.compile cannot trace warnings.warn: a compiled call does not warn)
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to "
            "broadcasting. Please ensure they have the same size.",
            stacklevel=3,
        )
    shape = input.shape if target.shape == input.shape else broadcast_shape(input.shape,
                                                                            target.shape)
    if weight is None:
        reduction = resolve_reduction(None, None, reduction)
    elif weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")
    delta = check_float_argument("huber_loss", "delta", 4, delta)
    if not delta > 0:  # NaN too
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    if weight is not None and reduction not in ("none", "mean", "sum"):
        raise ValueError(
            f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'."
        )
    return shape, reduction, delta
