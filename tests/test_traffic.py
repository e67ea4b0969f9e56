"""Memory traffic of the kernels, counted under the interpreter (tests/_traffic.py).

The minimum a loss must move is each input read once and each output written once; the
ratio of counted bytes to that minimum is how many passes over memory the design makes. A
memory-bound kernel's GPU time is that ratio over bandwidth, so these bound the design even
without a GPU. The README quotes the ratios printed here (``pytest -s tests/test_traffic.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if torch.cuda.is_available():
    # The kernels are compiled for the GPU in this process; the byte counter needs the
    # interpreter. CI (no GPU) runs these.
    pytest.skip("counts interpreter traffic: runs where there is no GPU", allow_module_level=True)

from _traffic import TrafficMeter  # noqa: E402

import fused_losses as fl  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "triton")


def measure(fn) -> TrafficMeter:
    with TrafficMeter() as meter:
        fn()
    return meter


@pytest.mark.parametrize(
    ("n_classes", "limit"),
    [
        (32000, 1.001),  # the case: rows held in registers, one read and one write
        # Longer rows, few of them (64 < an H100's 132 SMs): each row split among 5 programs,
        # its statistics merged, then the gradient: the second read is the GPU's L2 re-read
        # (counted here), plus the splits' per-row statistics
        (128256, 1.501),
    ],
)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cross_entropy_traffic(n_classes, limit, softcap):
    # N=64 tokens, bfloat16, mean reduction, forward + loss.backward(); softcap costs nothing
    n_rows = 64
    x = torch.randn(n_rows, n_classes, dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, n_classes, (n_rows,))
    logits_bytes = x.numel() * x.element_size()
    minimum = 2 * logits_bytes  # logits read once, their gradient written once

    meter = measure(lambda: fl.cross_entropy(x, t, softcap=softcap).backward())
    ratio = meter.ratio(minimum)
    print(f"\ncross_entropy N={n_rows} V={n_classes} bf16 mean softcap={softcap} fwd+bwd: "
          f"{meter}; {ratio:.4f}x the minimum")
    assert ratio <= limit

    # An upstream gradient other than 1 costs one more read and write of the gradient.
    x.grad = None
    scaled = measure(lambda: (fl.cross_entropy(x, t, softcap=softcap) * 0.5).backward())
    scaled = scaled.ratio(minimum)
    print(f"  with an upstream gradient of 0.5: {scaled:.4f}x")
    assert scaled <= ratio + 1.0 + 1e-3


def test_cross_entropy_traffic_whole_rows(monkeypatch):
    """Long rows on enough of them for a program each: the row read, then re-read from the
    end while it is in L2 (the interpreter counts the re-read), its gradient written."""
    from fused_losses.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "SPLIT_SMS", 1)  # the plan of >= 132 rows, on 64
    x = torch.randn(64, 128256, dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, 128256, (64,))
    ratio = measure(lambda: fl.cross_entropy(x, t, z_loss=1e-4).backward()).ratio(
        2 * x.numel() * x.element_size())
    print(f"\ncross_entropy N=64 V=128256 bf16 mean, a program a row: {ratio:.4f}x")
    assert ratio <= 1.5003


def test_cross_entropy_traffic_compiled():
    """Under torch.compile the gradient is recomputed in the backward from the saved row
    statistics: one more read of the logits (1.5x), and no more than that."""
    n_rows, n_classes = 64, 32000
    x = torch.randn(n_rows, n_classes, dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, n_classes, (n_rows,))
    minimum = 2 * x.numel() * x.element_size()
    torch._dynamo.reset()
    compiled = torch.compile(fl.cross_entropy, backend="aot_eager", fullgraph=True)
    compiled(x, t).backward()  # compile outside the meter
    x.grad = None
    ratio = measure(lambda: compiled(x, t).backward()).ratio(minimum)
    torch._dynamo.reset()
    print(f"\ncross_entropy compiled (aot_eager) N={n_rows} V={n_classes} bf16: {ratio:.4f}x")
    assert 1.49 <= ratio <= 1.51


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "huber"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_written_without_grad_mode(loss, mode):
    """A loss taken under no_grad (logged, say) of logits that require grad writes no
    gradient: a forward only reads its inputs and stores a few float32 partials."""
    x = torch.randn(64, 8192, dtype=torch.bfloat16).requires_grad_(True)
    if loss == "cross_entropy":
        t, fn = torch.randint(0, 8192, (64,)), fl.cross_entropy
    elif loss == "bce":
        t, fn = torch.rand(64, 8192).to(torch.bfloat16), fl.binary_cross_entropy_with_logits
    else:
        t, fn = torch.randn(64, 8192, dtype=torch.bfloat16), fl.huber_loss
    with getattr(torch, mode)():
        meter = measure(lambda: fn(x, t))
    print(f"\n{loss} under {mode}: {meter}")
    assert meter.bytes_stored <= 64 * 4 * 4  # per-row statistics or per-program partials


class LogitsSizedOps(TorchDispatchMode):
    """Records the torch ops (the kernels' launches aside) whose output has ``numel``
    elements: a copy of the logits or of their gradient shows up here, not in the meter."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.numel() == self.numel:
                self.ops.append(str(func))
        return out


# The floor here counts the int64 targets (8 B per position); the rest is O(positions): the
# float32 loss and statistics, the denominator's second read of the targets.
@pytest.mark.parametrize(("shape", "limit"), [((4, 21, 64, 64), 1.22), ((2, 150, 32, 32), 1.04)])
def test_cross_entropy_traffic_k_dimensional(shape, limit):
    """A segmentation-style (N, C, H, W) input is read in its own layout: no transposed copy
    of the logits before the kernel, none of the gradient after it."""
    x = torch.randn(shape, dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    minimum = 2 * x.numel() * x.element_size() + t.numel() * t.element_size()
    with LogitsSizedOps(x.numel()) as ops:
        ratio = measure(lambda: fl.cross_entropy(x, t).backward()).ratio(minimum)
    print(f"\ncross_entropy {tuple(shape)} bf16 mean fwd+bwd: {ratio:.4f}x the minimum")
    copies = [op for op in ops.ops if op.split(".")[1] in ("clone", "copy_", "_to_copy")]
    assert not copies
    assert ratio <= limit
    assert x.grad.stride() == x.stride()
