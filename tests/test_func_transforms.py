"""The losses inside ``torch.func`` transforms (grad, vmap, jacrev), on both backends.

Their tensors are functorch wrappers, which the kernels' autograd Functions do not support:
such calls take the eager path (``_backend.use_kernels``), so the transforms work as on
torch's own losses. Compared with torch under the same transform, in float64 on the same
rounded inputs.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close, random_logits

import fused_losses as fl

DTYPE = torch.float32


def operands(device):
    x = random_logits((6, 11), DTYPE, device)
    t = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(1)).to(device)
    soft = torch.sigmoid(random_logits((6, 11), DTYPE, device, seed=2))
    return x, t, soft


def both(transform, make_fn, *args):
    """``transform(make_fn(ours))(*args)`` and the same for torch on float64 copies."""
    ours = transform(make_fn(fl))(*args)
    wide = [a.cpu().double() if a.is_floating_point() else a.cpu() for a in args]
    return ours, transform(make_fn(F))(*wide)


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "huber"])
def test_grad_and_jacrev(backend, device, transform, loss):
    x, t, soft = operands(device)
    transform_fn = getattr(torch.func, transform)
    if loss == "cross_entropy":
        def make(m):
            return lambda a, b: m.cross_entropy(a, b, label_smoothing=0.1)
        ours, ref = both(transform_fn, make, x, t)
    elif loss == "bce":
        def make(m):
            return lambda a, b: m.binary_cross_entropy_with_logits(a, b, reduction="sum")
        ours, ref = both(transform_fn, make, x, soft)
    else:
        def make(m):
            return lambda a, b: m.huber_loss(a, b, delta=0.5)
        ours, ref = both(transform_fn, make, x, soft)
    assert ours.device == x.device
    assert_close(ours, ref, DTYPE, f"{transform} of {loss}")


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "huber"])
def test_per_sample_gradients(backend, device, loss):
    """vmap(grad(loss)): one gradient per sample, the pattern of differentially private
    training."""
    x, t, soft = operands(device)
    if loss == "cross_entropy":
        def make(m):
            return lambda a, b: m.cross_entropy(a[None], b[None])
        other = t
    elif loss == "bce":
        def make(m):
            return lambda a, b: m.binary_cross_entropy_with_logits(a, b)
        other = soft
    else:
        def make(m):
            return lambda a, b: m.huber_loss(a, b)
        other = soft
    ours, ref = both(lambda f: torch.func.vmap(torch.func.grad(f)), make, x, other)
    assert_close(ours, ref, DTYPE, f"per-sample gradients of {loss}")


def test_vmap_out_of_range_target_raises_like_torch(backend):
    # (CPU tensors: on CUDA, torch's op under vmap would be a device-side assert)
    x, t, _ = operands("cpu")
    t = t.clone()
    t[3] = 11
    with pytest.raises(Exception) as theirs:
        torch.func.vmap(F.cross_entropy)(x, t)
    with pytest.raises(theirs.type, match=re.escape(str(theirs.value)[:20])):
        torch.func.vmap(fl.cross_entropy)(x, t)
