"""``temperature`` and ``logit_scale`` of cross_entropy and linear_cross_entropy, both backends.

The logits become ``softcap * tanh(logit_scale * x / softcap) / temperature`` (the scale,
the softcap, the temperature: TRL's order) before anything else; the reference is
``_helpers.reference_cross_entropy`` of those logits, in float64 on the same rounded inputs.
Every kernel variant that reads logits is run: rows in registers and looped, rows split
among programs (``row_plan``), the K-dimensional tiles, probability targets, the LM head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    assert_close,
    class_target,
    loss_and_grads,
    random_logits,
    reference_cross_entropy,
)

import fused_losses as fl


def transformed(x, temperature=1.0, logit_scale=1.0, softcap=None):
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def reference(input, target, temperature=1.0, logit_scale=1.0, softcap=None, **kwargs):
    return reference_cross_entropy(transformed(input, temperature, logit_scale, softcap),
                                   target, **kwargs)


def check(input, target, grad_target=False, **kwargs):
    prob = input.shape == target.shape
    names = {"input", "target"} if grad_target else {"input"}
    ours, grads = loss_and_grads(fl.cross_entropy, {"input": input, "target": target}, names,
                                 round_to=input.dtype, **kwargs)
    ref_inputs = {"input": input.cpu().double(),
                  "target": target.cpu().double() if prob else target.cpu()}
    ref, ref_grads = loss_and_grads(reference, ref_inputs, names, round_to=input.dtype,
                                    **kwargs)
    assert_close(ours, ref, input.dtype, "loss")
    for name in names:
        assert_close(grads[name], ref_grads[name], input.dtype, f"d loss / d {name}")


TRANSFORMS = {
    "temperature": dict(temperature=0.7),
    "logit_scale": dict(logit_scale=1.75),
    "all three": dict(temperature=1.4, logit_scale=0.6, softcap=4.0),
}


@pytest.mark.parametrize("case", list(TRANSFORMS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_targets(backend, device, case, reduction):
    x = random_logits((13, 97), torch.bfloat16, device)
    t = class_target((13,), 97, device, ignore_frac=0.2)
    check(x, t, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, **TRANSFORMS[case])


@pytest.mark.parametrize("case", ["temperature", "all three"])
def test_long_rows(backend, device, row_plan, case):
    # rows of more classes than a program holds: looped, or split among programs
    x = random_logits((3, 40000), torch.float32, device)
    check(x, class_target((3,), 40000, device), reduction="sum", **TRANSFORMS[case])


def test_probability_targets(backend, device):
    x = random_logits((9, 31), torch.float32, device)
    p = torch.softmax(random_logits((9, 31), torch.float64, "cpu", seed=1), -1).float()
    check(x, p.to(device), grad_target=True, **TRANSFORMS["all three"])


def test_k_dimensional(backend, device):
    # (N, C, d): the tiles of few classes
    x = random_logits((2, 5, 33), torch.float32, device)
    check(x, class_target((2, 33), 5, device, ignore_frac=0.1), reduction="none",
          **TRANSFORMS["all three"])


def test_temperature_one_is_the_plain_loss(backend, device):
    x = random_logits((7, 50), torch.float32, device)
    t = class_target((7,), 50, device)
    assert torch.equal(fl.cross_entropy(x, t, temperature=1.0, logit_scale=1.0),
                       fl.cross_entropy(x, t))


@pytest.mark.parametrize("case", ["logit_scale", "all three"])  # without softcap: the CPU's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # plain blocks' path
def test_linear_cross_entropy(backend, device, dtype, case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(21, 16, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(61, 16, generator=g, dtype=torch.float64) / 2).to(dtype).to(device)
    t = class_target((21,), 61, device, ignore_frac=0.2)
    opts = TRANSFORMS[case]
    names = {"input", "linear_weight"}
    inputs = {"input": x, "linear_weight": w, "target": t}
    ours, grads = loss_and_grads(fl.linear_cross_entropy, inputs, names, round_to=dtype,
                                 chunk_size=5, label_smoothing=0.1, **opts)

    def ref_fn(input, linear_weight, target, **kw):
        return reference(F.linear(input, linear_weight), target, **kw)

    def wide(to):
        return {k: v.cpu().to(to) if v.is_floating_point() else v.cpu()
                for k, v in inputs.items()}

    ref, ref_grads = loss_and_grads(ref_fn, wide(torch.float64), names, round_to=dtype,
                                    label_smoothing=0.1, **opts)
    own = {}
    if dtype != torch.float32:  # torch's own bfloat16 path: its error, twice, on top
        own_loss, own = loss_and_grads(ref_fn, wide(dtype), names, round_to=dtype,
                                       label_smoothing=0.1, **opts)
        own["loss"] = own_loss
    assert_close(ours, ref, dtype, "loss", torch_own=own.get("loss"))
    for name in names:
        assert_close(grads[name], ref_grads[name], dtype, f"d loss / d {name}",
                     torch_own=own.get(name))


def test_errors():
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="temperature"):
        fl.cross_entropy(x, t, temperature=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        fl.cross_entropy(x, t, logit_scale=float("inf"))
    with pytest.raises(ValueError, match="temperature"):
        fl.linear_cross_entropy(x, torch.randn(4, 5), t, temperature=-1.0)


@pytest.mark.parametrize("case", ["temperature", "all three"])
def test_modules(backend, device, case):
    # the nn.Module drop-ins take the extras too, and give the functions' numbers
    opts = TRANSFORMS[case]
    x = random_logits((6, 19), torch.float32, device)
    t = class_target((6,), 19, device, ignore_frac=0.2)
    loss = fl.CrossEntropyLoss(label_smoothing=0.1, **opts)
    assert all(f"{k}={v}" in repr(loss) for k, v in opts.items())
    torch.testing.assert_close(loss(x, t), fl.cross_entropy(x, t, label_smoothing=0.1, **opts),
                               rtol=0, atol=0)
    check(x, t, label_smoothing=0.1, **opts)  # (the function against float64)

    head = fl.LinearCrossEntropyLoss(8, 19, bias=True, device=device, **opts)
    h = random_logits((6, 8), torch.float32, device, seed=2)
    expected = fl.linear_cross_entropy(h, head.linear.weight, t, linear_bias=head.linear.bias,
                                       **opts)
    torch.testing.assert_close(head(h, t), expected, rtol=0, atol=0)
    assert head(h, t) != fl.linear_cross_entropy(h, head.linear.weight, t,
                                                 linear_bias=head.linear.bias)


def test_module_errors():
    with pytest.raises(ValueError, match="temperature"):
        fl.CrossEntropyLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fl.CrossEntropyLoss(temperature=float("nan"))
    with pytest.raises(ValueError, match="logit_scale"):
        fl.LinearCrossEntropyLoss(4, 5, logit_scale=0.0)
