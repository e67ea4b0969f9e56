"""The losses under ``torch.autocast``, on both backends, against torch under autocast.

Autocast runs all three losses in float32: it casts every floating operand but a float64 one to
float32 first. So the result is float32 (float64 where an operand is), float32 class weights
go with bfloat16 logits, and a float64 weight is refused in torch's words. Gradients come back
in each operand's own dtype. The references are torch under the same autocast (dtypes and
errors) and torch in float64 on the same rounded inputs (values).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, assert_raises_like_torch, random_logits

import fused_losses as fl


def autocast(device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def run(fn, x, *others, autocast_on):
    """``fn(x, *others)`` with ``x`` a fresh leaf; backward with a fixed upstream gradient
    (exact in bfloat16). Returns the loss and the input's gradient."""
    x = x.detach().clone().requires_grad_(True)
    if autocast_on is None:
        loss = fn(x, *others)
    else:
        with autocast(autocast_on):
            loss = fn(x, *others)
    (loss * 0.75).sum().backward()
    return loss.detach(), x.grad


def compare(fn_ours, fn_torch, x, *others, device):
    """Dtypes as torch's under autocast; values against torch in float64."""
    ours, grad = run(fn_ours, x.to(device), *(o.to(device) for o in others), autocast_on=device)
    theirs, their_grad = run(fn_torch, x, *others, autocast_on="cpu")
    assert ours.dtype == theirs.dtype
    assert grad.dtype == their_grad.dtype == x.dtype

    def wide(o):
        return o.double() if o.is_floating_point() else o

    ref, ref_grad = run(fn_torch, x.double(), *(wide(o) for o in others), autocast_on=None)
    assert_close(ours, ref, ours.dtype, "loss")
    assert_close(grad, ref_grad, grad.dtype, "grad")


@pytest.mark.parametrize("case", ["plain", "float32 weight", "smoothing", "probabilities"])
def test_cross_entropy(backend, device, case):
    x = random_logits((16, 40), torch.bfloat16, "cpu")
    t = torch.randint(0, 40, (16,), generator=torch.Generator().manual_seed(1))
    kwargs = {}
    if case == "float32 weight":  # refused by torch without autocast; a float32 op with it
        kwargs["weight"] = torch.rand(40, generator=torch.Generator().manual_seed(2)) + 0.5
    elif case == "smoothing":
        kwargs["label_smoothing"] = 0.1
    elif case == "probabilities":  # bfloat16 logits, float32 probabilities
        t = torch.softmax(random_logits((16, 40), torch.float32, "cpu", seed=3), dim=1)
    weight = kwargs.pop("weight", None)
    others = (t,) if weight is None else (t, weight)
    compare(lambda x, *o: fl.cross_entropy(x, *o, **kwargs),
            lambda x, *o: F.cross_entropy(x, *o, **kwargs), x, *others, device=device)


def test_cross_entropy_float64_weight_raises_like_torch(backend, device):
    x = random_logits((4, 10), torch.bfloat16, device)
    t = torch.randint(0, 10, (4,), device=device)
    w = torch.rand(10, dtype=torch.float64, device=device)

    def ours():
        with autocast(device):
            fl.cross_entropy(x, t, weight=w)

    def theirs():
        with autocast("cpu"):
            F.cross_entropy(x.cpu(), t.cpu(), weight=w.cpu())

    assert_raises_like_torch(ours, theirs)


@pytest.mark.parametrize("weighted", [False, True])
def test_bce_with_logits(backend, device, weighted):
    x = random_logits((16, 33), torch.bfloat16, "cpu")
    t = (random_logits((16, 33), torch.bfloat16, "cpu", seed=1) > 0).to(torch.bfloat16)
    others = (t, torch.rand(33, dtype=torch.bfloat16) + 0.5)  # a bfloat16 pos_weight
    if weighted:  # and a float32 weight
        others += (torch.rand(33, generator=torch.Generator().manual_seed(2)),)

    def loss_of(f):
        return lambda x, t, pw, *w: f(x, t, weight=w[0] if w else None, pos_weight=pw)

    compare(loss_of(fl.binary_cross_entropy_with_logits),
            loss_of(F.binary_cross_entropy_with_logits), x, *others, device=device)


@pytest.mark.parametrize("weighted", [False, True])
def test_huber(backend, device, weighted):
    x = random_logits((16, 33), torch.bfloat16, "cpu")
    t = random_logits((16, 33), torch.bfloat16, "cpu", seed=1)
    others = (t,)
    if weighted:
        others += (torch.rand(16, 33, dtype=torch.bfloat16) + 0.5,)
    compare(lambda x, t, *w: fl.huber_loss(x, t, delta=0.5, weight=w[0] if w else None),
            lambda x, t, *w: F.huber_loss(x, t, delta=0.5, weight=w[0] if w else None),
            x, *others, device=device)


def test_float64_operand_keeps_float64(backend, device):
    x = random_logits((8, 12), torch.bfloat16, device)
    with autocast(device):
        assert fl.huber_loss(x.double(), x.float()).dtype == torch.float64
        target = torch.sigmoid(x.double())
        assert fl.binary_cross_entropy_with_logits(x, target).dtype == torch.float64
        assert fl.cross_entropy(x.double(), torch.zeros(8, dtype=torch.long,
                                                        device=device)).dtype == torch.float64
