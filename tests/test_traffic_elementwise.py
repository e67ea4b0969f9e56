"""Memory traffic of the BCE-with-logits and Huber kernels, counted under the interpreter.

The issue's case: (64, 8192) bfloat16, ``mean``, forward + ``loss.backward()``. The minimum
is every operand read once (input, target, and weights at their own sizes) and the gradient
written once; the limit is 1.1x that. The README quotes the ratios printed here
(``pytest -s tests/test_traffic_elementwise.py``).
"""

from __future__ import annotations

import pytest
import torch

if torch.cuda.is_available():
    # The kernels are compiled for the GPU in this process; the byte counter needs the
    # interpreter. CI (no GPU) runs these.
    pytest.skip("counts interpreter traffic: runs where there is no GPU", allow_module_level=True)

from _traffic import TrafficMeter  # noqa: E402

import fused_losses as fl  # noqa: E402

N, C = 64, 8192


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "triton")


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


CASES = {
    # name: (loss, weight shape and dtype, pos_weight shape and dtype)
    "bce": ("bce", None, None),
    "bce pos_weight (C,)": ("bce", None, ((C,), torch.float32)),
    "bce weight (C,) pos_weight (C,)": ("bce", ((C,), torch.float32), ((C,), torch.float32)),
    "bce weight (N, 1)": ("bce", ((N, 1), torch.float32), None),
    "bce weight (N, C)": ("bce", ((N, C), torch.bfloat16), None),
    "huber": ("huber", None, None),
    "huber weight (N, C)": ("huber", ((N, C), torch.bfloat16), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_elementwise_traffic(case):
    loss_name, w_spec, pw_spec = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).to(torch.bfloat16).requires_grad_(True)
    t = (torch.rand(N, C, generator=g) < 0.5).to(torch.bfloat16)
    w = None if w_spec is None else torch.rand(w_spec[0], generator=g).to(w_spec[1])
    pw = None if pw_spec is None else torch.rand(pw_spec[0], generator=g).to(pw_spec[1])
    if loss_name == "bce":
        fn = lambda: fl.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw)  # noqa: E731
    else:
        fn = lambda: fl.huber_loss(x, t, weight=w)  # noqa: E731
    # inputs read once, the gradient written once
    minimum = _bytes(x, t, w, pw) + _bytes(x)

    with TrafficMeter() as meter:
        fn().backward()
    ratio = meter.ratio(minimum)
    print(f"\n{case}: N={N} C={C} bf16 mean fwd+bwd: {meter}; {ratio:.4f}x the minimum")
    assert ratio <= 1.1


def test_upstream_gradient_not_one():
    # gradient accumulation / loss scaling: one more read and write of the gradient
    x = torch.randn(N, C).to(torch.bfloat16).requires_grad_(True)
    t = torch.rand(N, C).to(torch.bfloat16)
    minimum = 3 * _bytes(x)
    with TrafficMeter() as meter:
        (fl.binary_cross_entropy_with_logits(x, t) * 0.5).backward()
    ratio = meter.ratio(minimum)
    print(f"\nbce with an upstream gradient of 0.5: {meter}; {ratio:.4f}x")
    assert ratio <= 1.1 + 2 / 3
