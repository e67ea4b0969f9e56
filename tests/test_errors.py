"""Bad input: the same exception type and message as the installed torch, on both backends.

Each case is a call torch rejects; we run it through torch and through fused_losses and
compare ``type(e)`` and ``str(e)`` exactly. Cases that are wrong in two ways check that the
same error wins, i.e. that the checks run in torch's order.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fused_losses as fl
from fused_losses import _validation

L, I32 = torch.long, torch.int32


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def idx(values, dtype=L):
    return torch.tensor(values, dtype=dtype)


# (id, args, kwargs) for cross_entropy(input, target, ...)
CE_CASES = [
    ("target out of range", (x(4, 5), idx([0, 1, 2, 7])), {}),
    ("negative target", (x(4, 5), idx([0, 1, 2, -5])), {}),
    ("uint8 target out of range", (x(4, 5), idx([1, 2, 3, 200], torch.uint8)), {}),
    ("out of range with smoothing", (x(4, 5), idx([1, 2, 3, 9])), {"label_smoothing": 0.2}),
    ("K-dim out of range", (x(2, 3, 4), torch.full((2, 4), 5)), {}),
    ("4-D out of range", (x(2, 3, 4, 5), torch.full((2, 4, 5), 5)), {}),
    ("no classes", (x(4, 0), idx([0, 0, 0, 0])), {}),
    ("batch mismatch", (x(4, 5), idx([0, 1, 2, 3, 4])), {}),
    ("batch mismatch, 0-d target", (x(4, 5), idx(1)), {}),
    ("batch mismatch before dtype", (x(4, 5), idx([1, 2], I32)), {}),
    ("batch mismatch before weight", (x(4, 5), idx([1, 2])), {"weight": torch.ones(3)}),
    ("multi-target", (x(4, 5), torch.zeros(4, 2, dtype=L)), {}),
    ("bad reduction", (x(4, 5), idx([0, 1, 2, 3])), {"reduction": "avg"}),
    ("reduction None", (x(4, 5), idx([0, 1, 2, 3])), {"reduction": None}),
    ("int32 target", (x(4, 5), idx([0, 1, 2, 3], I32)), {}),
    ("int16 target", (x(4, 5), idx([0, 1, 2, 3], torch.int16)), {}),
    ("bool target", (x(4, 5), torch.tensor([True, False, True, False])), {}),
    ("float target, other shape", (x(4, 5), torch.tensor([0.0, 1, 2, 3])), {}),
    ("dtype before weight", (x(4, 5), idx([1, 2, 3, 4], I32)), {"weight": torch.ones(3)}),
    ("ignore_index with probabilities", (x(4, 5), torch.rand(4, 5)), {"ignore_index": 3}),
    ("integer probabilities", (x(4, 5), torch.randint(0, 5, (4, 5))), {}),
    ("prob dtype before ignore", (x(4, 5), torch.zeros(4, 5, dtype=L)), {"ignore_index": 1}),
    ("prob ignore before smoothing", (x(4, 5), torch.rand(4, 5)),
     {"ignore_index": 1, "label_smoothing": 3.0}),
    ("smoothing > 1", (x(4, 5), idx([0, 1, 2, 3])), {"label_smoothing": 1.5}),
    ("smoothing 2.0 formatting", (x(4, 5), idx([0, 1, 2, 3])), {"label_smoothing": 2.0}),
    ("smoothing before batch", (x(4, 5), idx([1, 2])), {"label_smoothing": 2.0}),
    ("smoothing > 1, probabilities", (x(4, 5), torch.rand(4, 5)), {"label_smoothing": 1.5}),
    ("weight size", (x(4, 5), idx([0, 1, 2, 3])), {"weight": torch.ones(3)}),
    ("weight shape", (x(4, 5), idx([0, 1, 2, 3])), {"weight": torch.ones(5, 1)}),
    ("weight 0-d", (x(4, 5), idx([0, 1, 2, 3])), {"weight": torch.tensor(1.0)}),
    ("weight size, smoothing", (x(4, 5), idx([0, 1, 2, 3])),
     {"weight": torch.ones(3), "label_smoothing": 0.2}),
    ("weight size, probabilities", (x(4, 5), torch.rand(4, 5)), {"weight": torch.ones(3)}),
    ("weight shape, probabilities", (x(4, 5), torch.rand(4, 5)), {"weight": torch.ones(5, 1)}),
    ("weight dtype", (x(4, 5), idx([0, 1, 2, 3])), {"weight": torch.ones(5).double()}),
    ("weight dtype, bf16 input", (x(4, 5, dtype=torch.bfloat16), idx([0, 1, 2, 3])),
     {"weight": torch.ones(5)}),
    ("weight dtype before range", (x(4, 5), idx([1, 2, 3, 9])),
     {"weight": torch.ones(5).double()}),
    ("weight integer", (x(4, 5), idx([0, 1, 2, 3])), {"weight": torch.ones(5, dtype=L)}),
    ("K-dim batch", (x(2, 3, 4), torch.zeros(3, 4, dtype=L)), {}),
    ("K-dim target shape", (x(2, 3, 4), torch.zeros(2, 4, 5, dtype=L)), {}),
    ("K-dim 1-d target", (x(2, 3, 4), idx([1, 1])), {}),
    ("K-dim 0-d target", (x(2, 3, 4), idx(1)), {}),
    ("K-dim shape before dtype", (x(2, 3, 4), torch.zeros(2, 5, dtype=I32)), {}),
    ("K-dim weight", (x(2, 3, 4), torch.zeros(2, 4, dtype=L)), {"weight": torch.ones(2)}),
    ("4-D target rank", (x(2, 3, 4, 5), torch.zeros(2, 4, dtype=L)), {}),
    ("4-D dtype before size", (x(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=I32)), {}),
    ("4-D size mismatch", (x(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=L)), {}),
    ("4-D batch", (x(2, 3, 4, 5), torch.zeros(3, 4, 5, dtype=L)), {}),
    ("4-D weight dtype", (x(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=L)),
     {"weight": torch.ones(3).double()}),
    ("5-D target shape", (x(2, 3, 4, 5, 6), torch.zeros(2, 4, 5, 7, dtype=L)), {}),
    ("1-D input, 2-D target", (x(5), torch.tensor([[1]])), {}),
    ("1-D input, long target", (x(5), idx([1, 2])), {}),
    ("1-D input, dtype first", (x(5), idx([1, 2], I32)), {}),
    ("1-D input, weight", (x(5), idx(1)), {"weight": torch.ones(3)}),
    ("1-D input, (1,) target, smoothing", (x(5), idx([1])), {"label_smoothing": 0.1}),
    ("1-D input, smoothing after weight", (x(5), idx([1])),
     {"label_smoothing": 0.1, "weight": torch.ones(3)}),
    ("1-D input, smoothing after dtype", (x(5), idx([1], I32)), {"label_smoothing": 0.1}),
    ("4-D weight size before size", (x(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=L)),
     {"weight": torch.ones(2)}),
    ("K-dim empty uint8, none", (x(2, 3, 0), torch.zeros(2, 0, dtype=torch.uint8)),
     {"reduction": "none"}),
    ("1-D input out of range", (x(5), idx(7)), {}),
    ("0-d input", (torch.tensor(5.0), idx(0)), {}),
    ("0-d input, 0-d float target", (torch.tensor(5.0), torch.tensor(0.3)), {}),
    ("integer input", (x(4, 5).long(), idx([0, 1, 2, 3])), {}),
    ("integer input, probabilities", (x(5).long(), torch.rand(5)), {}),
    ("target is a list", (x(4, 5), [0, 1, 2, 3]), {}),
    ("input is a list", ([1.0], idx([0])), {}),
    ("weight is a list", (x(4, 5), idx([0, 1, 2, 3])), {"weight": [1, 2, 3, 4, 5]}),
    ("ignore_index float", (x(4, 5), idx([0, 1, 2, 3])), {"ignore_index": 2.5}),
    ("ignore_index bool", (x(4, 5), idx([0, 1, 2, 3])), {"ignore_index": True}),
    ("label_smoothing str", (x(4, 5), idx([0, 1, 2, 3])), {"label_smoothing": "a"}),
    ("label_smoothing tensor requiring grad", (x(4, 5), idx([0, 1, 2, 3])),
     {"label_smoothing": torch.tensor(0.1, requires_grad=True)}),
]


def _outcome(fn, args, kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - comparing whatever is raised
        return type(e), str(e)
    return None, "no error"


@pytest.mark.parametrize(("args", "kwargs"), [c[1:] for c in CE_CASES],
                         ids=[c[0] for c in CE_CASES])
def test_cross_entropy_errors_match_torch(backend, args, kwargs):
    expected = _outcome(F.cross_entropy, args, kwargs)
    assert expected[0] is not None, "the case should be one torch rejects"
    assert _outcome(fl.cross_entropy, args, kwargs) == expected


def test_module_errors_match_torch(backend):
    args = (x(4, 5), idx([0, 1, 2, 9]))
    assert _outcome(fl.CrossEntropyLoss(), args, {}) == _outcome(torch.nn.CrossEntropyLoss(),
                                                                  args, {})


def test_bad_backend_setting(monkeypatch):
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FUSED_LOSSES_BACKEND='cuda' is not one of"):
        fl.cross_entropy(x(2, 3), idx([0, 1]))


# Calls torch accepts although they look odd: accepted here too, same answer.
ODD_BUT_VALID = [
    ("negative smoothing is ignored", (x(4, 5), idx([0, 1, 2, 3])), {"label_smoothing": -0.5}),
    ("NaN smoothing is ignored", (x(4, 5), idx([0, 1, 2, 3])), {"label_smoothing": float("nan")}),
    ("smoothing of 1", (x(4, 5), idx([0, 1, 2, 3])), {"label_smoothing": 1}),
    ("smoothing True", (x(4, 5), idx([0, 1, 2, 3])), {"label_smoothing": True}),
    ("smoothing as a 0-d tensor", (x(4, 5), idx([0, 1, 2, 3])),
     {"label_smoothing": torch.tensor(0.1)}),
    ("out of range but ignored", (x(4, 5), idx([1, 2, 3, -1])), {"ignore_index": -1}),
    ("ignore_index beyond the classes", (x(4, 5), idx([1, 2, 3, 4])), {"ignore_index": 40}),
    ("K-dim weight of any shape with C elements", (x(2, 3, 4), torch.zeros(2, 4, dtype=L)),
     {"weight": torch.ones(3, 1)}),
    ("non-contiguous weight", (x(4, 5), idx([0, 1, 2, 3])), {"weight": torch.ones(10)[::2]}),
    ("elementwise_mean", (x(4, 5), idx([0, 1, 2, 3])), {"reduction": "elementwise_mean"}),
    ("empty batch, mean", (x(0, 5), idx([])), {}),
    ("empty batch, sum", (x(0, 5), idx([])), {"reduction": "sum"}),
    ("empty batch, probabilities", (x(0, 5), torch.zeros(0, 5)), {}),
    ("float64 input", (x(4, 5).double(), idx([0, 1, 2, 3])), {}),
    ("0-d input, 0-d target", (x(5), idx(3)), {}),
]


@pytest.mark.filterwarnings("ignore:reduction='elementwise_mean' is deprecated")
@pytest.mark.parametrize(("args", "kwargs"), [c[1:] for c in ODD_BUT_VALID],
                         ids=[c[0] for c in ODD_BUT_VALID])
def test_odd_but_valid_calls(backend, args, kwargs):
    expected = F.cross_entropy(*args, **kwargs)
    got = fl.cross_entropy(*args, **kwargs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, equal_nan=True)


# --------------------------------------------------------------------------------------
# class-index targets: every combination of a few wrongs, against the installed torch
# --------------------------------------------------------------------------------------

SWEEP_INPUTS = {"1-D": (5,), "1-D, no class": (0,), "2-D": (4, 5), "2-D, empty": (0, 5),
                "2-D, no class": (4, 0), "3-D": (2, 3, 4), "3-D, empty": (2, 3, 0),
                "4-D": (2, 3, 4, 5), "4-D, empty": (0, 3, 4, 5), "5-D": (2, 3, 4, 5, 6)}


def _sweep_targets(shape):
    """Target shapes for an input shape: right, and wrong in each way torch checks."""
    if len(shape) == 1:
        return [(), (1,), (2,), (1, 1)]
    right = (shape[0],) + shape[2:]
    wrong = [(shape[0] + 1,) + shape[2:], (shape[0], 2) if len(shape) == 2 else (shape[0],)]
    if len(shape) > 2:
        wrong.append(right[:-1] + (right[-1] + 1,))
    return [right, *wrong]


def _sweep(shape):
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    weights = [None, torch.ones(n_classes), torch.ones(n_classes + 1),
               torch.ones(n_classes, dtype=torch.float64)]
    dtypes = [torch.int64, torch.uint8, torch.int32, torch.bool, torch.float32]
    for t_shape, dtype, weight, smoothing, reduction in itertools.product(
            _sweep_targets(shape), dtypes, weights, (0.0, 0.1), ("mean", "none")):
        if n_classes == 0 and (t_shape == (1,) and smoothing or
                               dtype == torch.uint8 and reduction == "none"):
            # not ours: torch reads a 1-D input's (1,) target before its smoothing term fails
            # on that shape (we raise the latter: the checks read no values), and prints an
            # out-of-range uint8 target of an unreduced loss as a character ("Target \x00")
            continue
        yield (torch.randn(shape), torch.zeros(t_shape, dtype=dtype)), dict(
            weight=weight, label_smoothing=smoothing, reduction=reduction)


@pytest.mark.parametrize("shape", list(SWEEP_INPUTS.values()), ids=list(SWEEP_INPUTS))
def test_class_target_checks_match_torch(backend, shape):
    # target shapes, dtypes, weights, smoothing and reductions crossed: where torch raises,
    # the same error (the first of several, in torch's order); where it answers on an empty
    # input (torch < 2.13 takes an empty int32 target for a reduced loss), the same answer
    for args, kwargs in _sweep(shape):
        expected = _outcome(F.cross_entropy, args, kwargs)
        if expected[0] is None and args[0].numel():
            continue  # (the value tests cover valid calls)
        assert _outcome(fl.cross_entropy, args, kwargs) == expected, (args, kwargs)
        if expected[0] is None:
            torch.testing.assert_close(fl.cross_entropy(*args, **kwargs),
                                       F.cross_entropy(*args, **kwargs), equal_nan=True)


# What torch 2.11.0 raised (observed on CPU) where 2.13 raises its new target-dtype error
# first: the old words, after every other check, and nothing for an empty reduced loss.
TORCH_2_11 = [
    ("int32 target", (x(4, 5), idx([0, 1, 2, 3], I32)), {},
     (RuntimeError, "expected scalar type Long but found Int")),
    ("bool target", (x(4, 5), torch.zeros(4, dtype=torch.bool)), {},
     (RuntimeError, "expected scalar type Long but found Bool")),
    ("float target", (x(4, 5), torch.zeros(4)), {},
     (RuntimeError, "expected scalar type Long but found Float")),
    ("weight size first", (x(4, 5), idx([0, 1, 2, 3], I32)), {"weight": torch.ones(3)},
     (RuntimeError, "weight tensor should be defined either for all 5 classes or no classes "
                    "but got weight tensor of shape: [3]")),
    ("weight dtype first", (x(4, 5), idx([0, 1, 2, 3], I32)),
     {"weight": torch.ones(5, dtype=torch.float64)},
     (RuntimeError, "expected scalar type Float but found Double")),
    ("1-D target size first", (x(5), idx([1, 2], I32)), {},
     (ValueError, "For 1D input, 1D target must have size 1, but got target size: 2")),
    ("4-D size first", (x(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=I32)), {},
     (RuntimeError, "size mismatch (got input: [2, 3, 4, 5] , target: [2, 4, 6]")),
    ("K-dim weight first", (x(2, 3, 4), torch.zeros(2, 4, dtype=I32)),
     {"weight": torch.ones(2)},
     (RuntimeError, "weight tensor should be defined either for all or no classes")),
    ("empty, mean", (x(0, 5), idx([], I32)), {}, (None, "no error")),
    ("empty K-dim, sum", (x(2, 3, 0), torch.zeros(2, 0, dtype=I32)), {"reduction": "sum"},
     (None, "no error")),
    ("empty, none", (x(0, 5), idx([], I32)), {"reduction": "none"},
     (RuntimeError, "expected scalar type Long but found Int")),
]


def _nll_loss_error_of_torch_2_11(input, target, weight=None):
    """torch 2.11.0's answer to the probes of ``_validation._probe_target_dtype_rule``."""
    if weight is not None and weight.numel() != input.shape[-1]:
        return (f"weight tensor should be defined either for all {input.shape[-1]} classes "
                f"or no classes but got weight tensor of shape: [{weight.numel()}]")
    if target.dtype in (torch.int64, torch.uint8) or target.numel() == 0:
        return None
    return f"expected scalar type Long but found {_validation.scalar_type_name(target.dtype)}"


@pytest.mark.parametrize(("args", "kwargs", "expected"), [c[1:] for c in TORCH_2_11],
                         ids=[c[0] for c in TORCH_2_11])
def test_target_dtype_checks_follow_the_probed_torch(backend, monkeypatch, args, kwargs,
                                                     expected):
    # the checks follow what the probe finds: here a torch that answers as 2.11.0 did
    monkeypatch.setattr(_validation, "_nll_loss_error", _nll_loss_error_of_torch_2_11)
    monkeypatch.setattr(_validation, "_target_dtype_rule_probed", None)
    assert _outcome(fl.cross_entropy, args, kwargs) == expected


def test_target_dtype_probe_finds_the_installed_torch():
    rule = _validation._probe_target_dtype_rule()
    for dtype in (torch.int32, torch.int16, torch.int8, torch.bool, torch.float16,
                  torch.float64, torch.complex64):
        target = torch.zeros(3, dtype=dtype)
        assert _outcome(F.cross_entropy, (x(3, 4), target), {}) == (
            RuntimeError, rule.message(dtype))
    assert _validation._target_dtype_rule() == rule
