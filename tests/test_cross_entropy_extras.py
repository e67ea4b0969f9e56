"""softcap, z-loss, the split-row plan, and wrong answers the kernels once gave.

The reference for softcap and z-loss is ``_helpers.reference_cross_entropy``: torch's ops in
float64 on the same rounded inputs (the logits softcapped with ``tanh``, torch's
cross-entropy, ``z_loss * logsumexp**2`` per counted row). Every test runs on both backends.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    assert_close,
    assert_raises_like_torch,
    class_target,
    class_weight,
    loss_and_grads,
    random_logits,
    reference_cross_entropy,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_losses as fl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(input, target, weight=None, grad_target=False, slack=1.0, **kwargs):
    """Loss, z-term and gradients on the current backend against the float64 reference. The
    eager backend (torch's float32 log_softmax where there is no sum over the classes) may
    also be off by twice torch's own float32 error: it sums a confident row's exponentials
    lane by lane (6% off in p - 1 for a row -inf but at its target, 70k classes, softcapped:
    the kernels' tree sums are not)."""
    prob = input.shape == target.shape
    dtype = input.dtype
    out_dtype = dtype
    if prob:
        out_dtype = torch.promote_types(dtype, target.dtype)
    names = {"input", "target"} if grad_target else {"input"}
    inputs = {"input": input, "target": target, "weight": weight}
    ours, grads = loss_and_grads(fl.cross_entropy, inputs, names, round_to=out_dtype, **kwargs)
    ref_inputs = {
        "input": input.cpu().double(),
        "target": target.cpu().double() if prob else target.cpu(),
        "weight": None if weight is None else weight.cpu().double(),
    }
    ref, ref_grads = loss_and_grads(reference_cross_entropy, ref_inputs, names,
                                    round_to=out_dtype, **kwargs)
    # The terms that cancel: those of uniform logits (tests/_helpers.py). In the loss, a
    # confident row's ln(1 + tiny) rounds to 0 in float32, as torch's: 4e-14 lost of a row
    # that is -inf but at its target, softcapped at 30.
    uniform = dict(ref_inputs, input=torch.zeros_like(ref_inputs["input"]))
    uniform_loss, uniform_grads = loss_and_grads(reference_cross_entropy, uniform, {"input"},
                                                 round_to=out_dtype, **kwargs)
    terms = float(uniform_grads["input"].abs().max())
    loss_terms = float(uniform_loss.abs().nan_to_num(0.0).max())
    own = dict(loss=None, grad=None)
    if os.environ.get("FUSED_LOSSES_BACKEND") == "torch" and dtype == torch.float32:
        f32 = {k: v if v is None or not v.is_floating_point() else v.float()
               for k, v in ref_inputs.items()}
        own["loss"], own_grads = loss_and_grads(reference_cross_entropy, f32, {"input"},
                                                round_to=out_dtype, **kwargs)
        own["grad"] = own_grads["input"]
    assert ours.dtype == out_dtype
    assert_close(ours, ref, out_dtype, "loss", slack, loss_terms, torch_own=own["loss"])
    assert_close(grads["input"], ref_grads["input"], dtype, "d loss / d input", slack, terms,
                 torch_own=own["grad"])
    if grad_target:
        assert_close(grads["target"], ref_grads["target"], target.dtype, "d loss / d target",
                     slack)
    # return_z_loss: the z-loss part alone, from the same call
    _, z_term = fl.cross_entropy(input, target, weight, return_z_loss=True, **kwargs)
    _, ref_z = reference_cross_entropy(ref_inputs["input"], ref_inputs["target"],
                                       ref_inputs["weight"], return_z_loss=True, **kwargs)
    assert z_term.dtype == out_dtype and not z_term.requires_grad
    assert_close(z_term, ref_z, out_dtype, "z-loss term", slack)




# --------------------------------------------------------------------------------------
# softcap and z-loss with every option
# --------------------------------------------------------------------------------------

EXTRAS = [
    dict(softcap=30.0),  # Gemma 2's final-logit cap: barely bends logits of ~N(0, 3)
    dict(softcap=1.5),  # saturates: tanh near +-1, its derivative near 0
    dict(z_loss=1e-4),  # PaLM's weight
    dict(z_loss=0.5, softcap=5.0),  # both, large enough to dominate the gradient
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extras", EXTRAS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_class_targets(backend, device, dtype, reduction, extras):
    # 37 classes (a masked tail), a quarter of the rows ignored, weights and smoothing
    x = random_logits((13, 37), dtype, device)
    t = class_target((13,), 37, device, ignore_frac=0.25)
    check(x, t, reduction=reduction, **extras)
    check(x, t, class_weight(37, dtype, device), reduction=reduction, label_smoothing=0.15,
          **extras)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets(backend, device, reduction):
    x = random_logits((6, 11), torch.float32, device)
    t = torch.softmax(random_logits((6, 11), torch.float32, device, seed=3), dim=-1)
    check(x, t, class_weight(11, torch.float32, device), grad_target=True, reduction=reduction,
          label_smoothing=0.1, softcap=4.0, z_loss=0.01)


@pytest.mark.parametrize("shape", [(2, 7, 3, 4), (2, 300, 5)])  # tiles; rows of classes
def test_k_dimensional(backend, device, shape):
    x = random_logits(shape, torch.bfloat16, device)
    t = class_target((shape[0], *shape[2:]), shape[1], device, ignore_frac=0.2)
    for reduction in ("mean", "none"):
        check(x, t, class_weight(shape[1], torch.bfloat16, device), reduction=reduction,
              label_smoothing=0.1, softcap=2.0, z_loss=0.05)
    p = torch.softmax(random_logits(shape, torch.float32, device, seed=5), dim=1)
    check(x.float(), p, grad_target=True, softcap=2.0, z_loss=0.05)


@pytest.mark.parametrize("n_classes", [32769, 70000])  # looped rows; > 2 loop blocks
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_long_rows(backend, device, row_plan, n_classes, dtype):
    x = random_logits((3, n_classes), dtype, device, scale=4.0)
    t = class_target((3,), n_classes, device)
    t[1] = -100
    # the eager backend's float32 log_softmax is torch's: ~3e-5 off at 70k classes
    slack = 3.0 if backend == "torch" else 1.0
    check(x, t, reduction="mean", softcap=30.0, z_loss=1e-3, slack=slack)
    check(x, t, class_weight(n_classes, dtype, device), reduction="none", label_smoothing=0.05,
          softcap=3.0, z_loss=1e-2, slack=slack)


def test_saturated_tanh(backend, device):
    # logits far beyond the cap: every z is +-cap up to rounding, the derivative ~1e-8
    x = random_logits((5, 40), torch.float32, device, scale=30.0)
    check(x, class_target((5,), 40, device), reduction="none", softcap=2.0)


def test_softcap_matches_plain_for_a_huge_cap(backend, device):
    x = random_logits((4, 50), torch.float32, device)
    t = class_target((4,), 50, device)
    torch.testing.assert_close(fl.cross_entropy(x, t, softcap=1e6), fl.cross_entropy(x, t),
                               rtol=1e-6, atol=1e-6)


def test_z_term_without_z_loss_is_zero(backend, device):
    x = random_logits((4, 50), torch.bfloat16, device)
    loss, z = fl.cross_entropy(x, class_target((4,), 50, device), return_z_loss=True,
                               reduction="none")
    assert z.shape == loss.shape and z.dtype == loss.dtype and not z.any()


def test_module(backend, device):
    w = class_weight(12, torch.float32, device)
    ours = fl.CrossEntropyLoss(weight=w, label_smoothing=0.1, softcap=5.0, z_loss=1e-2,
                               return_z_loss=True)
    assert "softcap=5.0" in repr(ours) and "z_loss=0.01" in repr(ours)
    x = random_logits((7, 12), torch.float32, device)
    t = class_target((7,), 12, device)
    loss, z = ours(x, t)
    ref, ref_z = reference_cross_entropy(x.double().cpu(), t.cpu(), w.double().cpu(),
                                         label_smoothing=0.1, softcap=5.0, z_loss=1e-2,
                                         return_z_loss=True)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(z, ref_z, torch.float32, "z-loss term")
    state = ours.state_dict()
    assert state.keys() == torch.nn.CrossEntropyLoss(weight=w).state_dict().keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(softcap=0.0), "softcap must be a positive finite number"),
        (dict(softcap=-1.0), "softcap must be a positive finite number"),
        (dict(softcap=float("inf")), "softcap must be a positive finite number"),
        (dict(softcap=float("nan")), "softcap must be a positive finite number"),
        (dict(softcap=True), "softcap must be a positive finite number"),
        (dict(z_loss=-1e-4), "z_loss must be a finite number >= 0"),
        (dict(z_loss=float("nan")), "z_loss must be a finite number >= 0"),
        (dict(z_loss="0.1"), "z_loss must be a finite number >= 0"),
    ],
)
def test_bad_extras(kwargs, message):
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=message):
        fl.cross_entropy(x, t, **kwargs)
    with pytest.raises(ValueError, match=message):
        fl.CrossEntropyLoss(**kwargs)


def test_autocast(backend, device):
    # torch.autocast: a float32 loss (and z-term) from bfloat16 logits and float32 weights
    x = random_logits((6, 40), torch.bfloat16, device).requires_grad_(True)
    t = class_target((6,), 40, device)
    w = class_weight(40, torch.float32, device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss, z = fl.cross_entropy(x, t, w, label_smoothing=0.1, softcap=3.0, z_loss=0.1,
                                   return_z_loss=True)
    assert loss.dtype == z.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    ref_x = x.detach().double().cpu().requires_grad_(True)
    ref = reference_cross_entropy(ref_x, t.cpu(), w.double().cpu(), label_smoothing=0.1,
                                  softcap=3.0, z_loss=0.1)
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(x.grad, ref_x.grad, torch.bfloat16, "grad")


# --------------------------------------------------------------------------------------
# few rows of many classes: the launch plan
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_rows", "n_classes", "programs_per_row"),
    [
        (8, 65536, 16),  # 128 programs of 4096 classes (an H100's 132 SMs: 1 row each idles)
        (8, 262144, 33),  # 264 programs: two per SM
        (64, 131072, 5),
        (1, 131072, 32),  # capped: at least 4096 classes per program
        (131, 262144, 3),
        (132, 262144, 1),  # a program per SM already
        (8192, 128256, 1),  # the LM-training shape
        (8, 32768, 1),  # held in registers: one program per row
    ],
)
def test_split_plan(n_rows, n_classes, programs_per_row):
    from fused_losses.kernels.cross_entropy import split_plan

    assert split_plan(n_rows, n_classes, torch.device("cpu")) == programs_per_row


def test_split_rows_launch(monkeypatch):
    # a call with few long rows launches the split kernels with rows x splits programs
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "triton")
    from fused_losses.kernels import cross_entropy

    grids = []
    real = cross_entropy.launch

    def spy(kernel, grid, writes, **kwargs):
        grids.append((kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), grid))
        real(kernel, grid, writes, **kwargs)

    monkeypatch.setattr(cross_entropy, "launch", spy)
    x = torch.randn(8, 65536, dtype=torch.bfloat16, requires_grad=True)
    fl.cross_entropy(x, torch.randint(0, 65536, (8,))).backward()
    assert ("_ce_stats_kernel", (8 * 16,)) in grids
    assert ("_ce_grad_kernel", (8 * 16,)) in grids
    assert not any(name == "_ce_row_kernel" for name, _ in grids)


# --------------------------------------------------------------------------------------
# wrong answers the kernels once gave (a randomized differential test against torch)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [32768, 32769, 70000])
def test_minus_inf_first_logit(backend, device, row_plan, n_classes):
    # masked vocabularies: a looped row whose first logit is -inf once gave NaN
    x = torch.randn(2, n_classes, dtype=torch.float64)
    x[:, 0] = -math.inf
    t = torch.tensor([5, 7])
    ours = fl.cross_entropy(x.float().to(device), t.to(device), reduction="none")
    assert_close(ours, F.cross_entropy(x.float().double(), t, reduction="none"), torch.float32,
                 "loss")


@pytest.mark.parametrize("n_classes", [50, 32769, 70000])
def test_minus_inf_patterns(backend, device, row_plan, n_classes):
    x = random_logits((5, n_classes), torch.float32, "cpu", seed=2)
    x[0, : n_classes // 2] = -math.inf  # a whole -inf block (all of the first loop block)
    x[1, :] = -math.inf  # -inf everywhere but the target
    x[1, 3] = 0.5
    x[2, ::3] = -math.inf  # every third class masked
    x[3, -1] = -math.inf  # the last class masked
    t = torch.tensor([n_classes - 1, 3, 1, 0, 2])
    # (torch's own float32 gradient is 2.6e-4 off, 13x the tolerance, at the target of the
    # row that is -inf but there, at 32k classes with smoothing: its log_softmax backward sums
    # C equal terms. Neither backend here does.)
    slack = 1.0
    for kwargs in (dict(), dict(label_smoothing=0.1), dict(weight=class_weight(n_classes,
                   torch.float32, "cpu")), dict(softcap=20.0, z_loss=1e-3)):
        w = kwargs.pop("weight", None)
        check(x.to(device), t.to(device), None if w is None else w.to(device),
              reduction="none", slack=slack, **kwargs)
        check(x.to(device), t.to(device), None if w is None else w.to(device), slack=slack,
              **kwargs)


def test_uint8_targets_k_dimensional_raise(backend, device):
    x = torch.randn(2, 7, 3, device=device)
    t = torch.randint(0, 7, (2, 3), dtype=torch.uint8, device=device)
    for kwargs in (dict(), dict(weight=torch.ones(7, device=device), label_smoothing=0.1)):
        assert_raises_like_torch(lambda kw=kwargs: fl.cross_entropy(x, t, **kw),
                                 lambda kw=kwargs: F.cross_entropy(x.cpu(), t.cpu(), **{
                                     k: v.cpu() if torch.is_tensor(v) else v
                                     for k, v in kw.items()}))


def test_uint8_weighted_smoothed_mean_raises(backend, device):
    x = torch.randn(3, 7, device=device)
    t = torch.tensor([1, 2, 3], dtype=torch.uint8, device=device)
    w = torch.rand(7, device=device)
    assert_raises_like_torch(lambda: fl.cross_entropy(x, t, w, label_smoothing=0.1),
                             lambda: F.cross_entropy(x.cpu(), t.cpu(), w.cpu(),
                                                     label_smoothing=0.1))
    for reduction in ("sum", "none"):  # accepted by torch
        check(x, t, w, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("ignore_index", [-100, -7, 3, 259, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_uint8_target_equal_to_ignore_index_modulo_256(backend, device, ignore_index,
                                                       reduction):
    # torch compares uint8 targets with ignore_index in uint8 in its smoothing term: -100
    # matches 156 there (and 259 matches 3), but not in the unsmoothed term
    x = random_logits((3, 300), torch.float32, device)
    t = torch.tensor([156, 249, 3], dtype=torch.uint8, device=device)
    check(x, t, reduction=reduction, label_smoothing=0.1, ignore_index=ignore_index)


def test_weighted_smoothed_mean_over_zero_weight_is_nan(backend, device):
    # torch: NaN loss and NaN gradient (its unsmoothed mean is 0/0); once inf and +-inf
    x = random_logits((2, 3), torch.float32, device)
    t = torch.tensor([0, 0], device=device)
    w = torch.tensor([0.0, 1.0, 1.0], device=device)
    for z_loss in (0.0, 0.1):
        check(x, t, w, label_smoothing=0.1, z_loss=z_loss)
    loss, grads = loss_and_grads(fl.cross_entropy, {"input": x, "target": t, "weight": w},
                                 {"input"}, round_to=torch.float32, label_smoothing=0.1)
    assert math.isnan(loss.item()) and grads["input"].isnan().all()


# --------------------------------------------------------------------------------------
# a randomized differential sweep: -inf patterns, uint8 targets, every option
# --------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n_rows=st.integers(1, 6),
    n_classes=st.sampled_from([1, 2, 7, 37, 300, 33000]),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    weighted=st.booleans(),
    uint8=st.booleans(),
    ignore_index=st.sampled_from([-100, -7, 0, 2, 259]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    masked=st.sampled_from(["none", "some", "first", "all but target", "row"]),
    softcap=st.sampled_from([None, 2.0, 30.0]),
    z_loss=st.sampled_from([0.0, 1e-2]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(n_rows, n_classes, dtype, reduction, smoothing, weighted, uint8,
                    ignore_index, ignore_frac, masked, softcap, z_loss, seed):
    if uint8 and n_classes > 256:
        n_classes = 256
    x = random_logits((n_rows, n_classes), dtype, "cpu", seed=seed)
    t = class_target((n_rows,), n_classes, "cpu", ignore_index, ignore_frac, seed)
    g = torch.Generator().manual_seed(seed)
    if masked == "some":
        x[torch.rand(x.shape, generator=g) < 0.3] = -math.inf
    elif masked == "first":
        x[:, 0] = -math.inf
    elif masked == "all but target":
        keep = x.gather(1, t.clamp(0, n_classes - 1).unsqueeze(1))
        x[:] = -math.inf
        x.scatter_(1, t.clamp(0, n_classes - 1).unsqueeze(1), keep)
    elif masked == "row":
        x[0] = -math.inf
    # A row that is all -inf and ignored: torch's gradient is NaN there (its log_softmax of
    # the row is), ours 0 as for every ignored row (README): such rows get a finite logit.
    x[(x == -math.inf).all(1) & (t == ignore_index), -1] = 0.0
    if uint8:
        if not 0 <= ignore_index < 256:  # ignored rows: the uint8 image of ignore_index
            image = ignore_index % 256 if ignore_index % 256 < n_classes else 0
            t = torch.where(t == ignore_index, image, t)
        t = t.to(torch.uint8)
    w = class_weight(n_classes, dtype, "cpu", seed) if weighted else None
    kwargs = dict(reduction=reduction, label_smoothing=smoothing, ignore_index=ignore_index,
                  softcap=softcap, z_loss=z_loss)
    for backend in ("torch", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FUSED_LOSSES_BACKEND", backend)
            device = "cpu" if backend == "torch" else _kernel_device()
            args = (x.to(device), t.to(device), None if w is None else w.to(device))
            try:
                reference_cross_entropy(x.double(), t, None if w is None else w.double(),
                                        **kwargs)
            except Exception:  # noqa: BLE001  torch refuses it: so must we, in its words
                assert_raises_like_torch(
                    lambda a=args: fl.cross_entropy(*a, **kwargs),
                    lambda: reference_cross_entropy(x.double(), t, None if w is None
                                                    else w.double(), **kwargs))
                continue
            # the eager backend is torch's float32 log_softmax (~3e-5 off at 33k classes)
            slack = 3.0 if backend == "torch" and n_classes > 1000 else 1.0
            check(*args, slack=slack, **kwargs)


def _kernel_device():
    from conftest import KERNEL_DEVICE

    return KERNEL_DEVICE
