"""fused_losses.linear_cross_entropy (the fused LM head) against torch, both backends.

The reference is ``cross_entropy(linear(input, W, b))`` in float64 on the same rounded inputs
(``_helpers.reference_cross_entropy`` for softcap and z-loss): values and the gradients of the
input, the weight, the bias and probability targets, with a random upstream gradient. In
bfloat16 the logits themselves are rounded (as torch's ``F.linear`` rounds them): twice torch's
own bfloat16 error is allowed on top of the tolerance policy.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    assert_close,
    assert_raises_like_torch,
    check_upstream_gradients,
    class_weight,
    loss_and_grads,
    reference_cross_entropy,
)
from torch.utils._python_dispatch import TorchDispatchMode

import fused_losses as fl
from fused_losses.linear_cross_entropy import _plan

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")  # torch >= 2.13


def reference(input, linear_weight, target, linear_bias=None, weight=None, ignore_index=None,
              **kwargs):
    """``cross_entropy(linear(...))``, as torch's reference path, with the logits' transform
    (``softcap * tanh(logit_scale * logits / softcap) / temperature``) and z-loss."""
    kwargs.pop("chunk_size", None), kwargs.pop("accum_dtype", None)
    n_classes, out_features = linear_weight.shape[0], linear_weight.shape[1:-1]
    logits = F.linear(input, linear_weight.reshape(-1, linear_weight.shape[-1]),
                      None if linear_bias is None else linear_bias.reshape(-1))
    logits = logits.reshape(*input.shape[:-1], n_classes, *out_features)
    temperature, logit_scale = kwargs.pop("temperature", 1.0), kwargs.pop("logit_scale", 1.0)
    if temperature != 1.0 or logit_scale != 1.0:
        softcap = kwargs.pop("softcap", None)
        logits = logits * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
    return reference_cross_entropy(logits, target, weight,
                                   -100 if ignore_index is None else ignore_index, **kwargs)


GRADS = ("input", "linear_weight", "linear_bias")


def check(x, w, t, bias=None, weight=None, grad_target=False, **kwargs):
    """Our loss and gradients on the current backend against the float64 reference."""
    dtype = x.dtype
    prob = t.is_floating_point()
    names = set(GRADS) | ({"target"} if grad_target else set())
    inputs = {"input": x, "linear_weight": w, "target": t, "linear_bias": bias,
              "weight": weight}
    out_dtype = torch.promote_types(dtype, t.dtype) if prob else dtype
    ours, grads = loss_and_grads(fl.linear_cross_entropy, inputs, names, round_to=out_dtype,
                                 **kwargs)

    def wide(v, to):
        return None if v is None else (v.detach().cpu().to(to) if v.is_floating_point()
                                       else v.cpu())

    ref, ref_grads = loss_and_grads(reference, {k: wide(v, torch.float64)
                                                for k, v in inputs.items()},
                                    names, round_to=out_dtype, **kwargs)
    own = {}
    if dtype != torch.float32:  # torch's own reference in the input's dtype
        own_loss, own_grads = loss_and_grads(reference, {k: wide(v, dtype)
                                                         for k, v in inputs.items()},
                                             names, round_to=out_dtype, **kwargs)
        own = dict(own_grads, loss=own_loss)
    assert ours.dtype == out_dtype
    assert_close(ours, ref, out_dtype, "loss", torch_own=own.get("loss"))
    for name in names:
        if inputs[name] is None:
            continue
        assert grads[name].dtype == inputs[name].dtype
        assert_close(grads[name], ref_grads[name], inputs[name].dtype, f"d loss / d {name}",
                     terms=float(ref_grads[name].abs().max()) * 1e-3 if prob else 0.0,
                     torch_own=own.get(name))
    return ours, grads


def operands(n, h, v, dtype, device, seed=0, out_features=()):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g, dtype=torch.float64)).to(dtype).to(device)
    w = (torch.randn(v, *out_features, h, generator=g, dtype=torch.float64) / math.sqrt(h) * 2)
    b = torch.randn(v, *out_features, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, v, (n, *out_features), generator=g)
    return x, w.to(dtype).to(device), b.to(dtype).to(device), t.to(device)



# --------------------------------------------------------------------------------------
# values and gradients, every option
# --------------------------------------------------------------------------------------

CASES = {
    "plain": dict(),
    "weight, smoothing, ignored": dict(weight=True, label_smoothing=0.1, ignore=True),
    "softcap, z-loss": dict(softcap=3.0, z_loss=0.01),
    "ignore_index 0": dict(ignore_index=0, label_smoothing=0.2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [False, True])
def test_class_targets(backend, device, dtype, reduction, case, bias):
    # 37 tokens in chunks of 8 (a ragged last chunk), 101 classes
    kw = dict(CASES[case])
    x, w, b, t = operands(37, 16, 101, dtype, device)
    if kw.pop("ignore", False):
        t[::4] = -100
    weight = class_weight(101, dtype, device) if kw.pop("weight", False) else None
    check(x, w, t, b if bias else None, weight, reduction=reduction, chunk_size=8, **kw)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets(backend, device, reduction):
    x, w, b, _ = operands(13, 16, 29, torch.float32, device)
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(13, 29, generator=g, dtype=torch.float64), -1)
    check(x, w, p.float().to(device), b, class_weight(29, torch.float32, device),
          grad_target=True, reduction=reduction, label_smoothing=0.1, softcap=4.0, z_loss=0.01,
          chunk_size=5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets_weight_gradient(backend, device, reduction):
    # a class weight that requires grad gets torch's gradient (not a silent None), with the
    # logits' transform
    x, w, b, _ = operands(9, 8, 13, torch.float32, device)
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(9, 13, generator=g, dtype=torch.float64), -1).float()
    inputs = {"input": x, "linear_weight": w, "target": p.to(device), "linear_bias": b,
              "weight": class_weight(13, torch.float32, device)}
    names = set(inputs)
    kw = dict(reduction=reduction, label_smoothing=0.1, chunk_size=4, temperature=0.8,
              logit_scale=1.5, softcap=4.0)
    ours, grads = loss_and_grads(fl.linear_cross_entropy, inputs, names,
                                 round_to=torch.float32, **kw)

    def ref(temperature, logit_scale, softcap, **kwargs):
        linear_weight = kwargs.pop("linear_weight") * (logit_scale / softcap)
        linear_bias = kwargs.pop("linear_bias") * (logit_scale / softcap)
        logits = F.linear(kwargs.pop("input"), linear_weight, linear_bias)
        return F.cross_entropy(softcap * torch.tanh(logits) / temperature, **kwargs)

    expected, ref_grads = loss_and_grads(
        ref, {k: v.cpu().double() for k, v in inputs.items()}, names,
        round_to=torch.float32, **{k: v for k, v in kw.items() if k != "chunk_size"})
    assert_close(ours, expected, torch.float32, "loss")
    for name in names:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close(grads[name], ref_grads[name], torch.float32, f"d loss / d {name}")


def test_one_dimensional_input(backend, device):
    x, w, b, t = operands(1, 16, 50, torch.float32, device)
    check(x[0], w, t[0], b, reduction="none")
    check(x[0], w, t[0], b, label_smoothing=0.1)
    p = torch.softmax(torch.randn(50, dtype=torch.float64), -1).float().to(device)
    check(x[0], w, p, b, grad_target=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k_dimensional_weights(backend, device, reduction):
    # weight (C, d1, d2, H): per-position logits (N, C, d1, d2)
    x, w, b, t = operands(6, 8, 7, torch.float32, device, out_features=(3, 2))
    t[0, 1, 1] = -100
    check(x, w, t, b, class_weight(7, torch.float32, device), reduction=reduction,
          label_smoothing=0.1, z_loss=0.01, chunk_size=4)
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(6, 7, 3, 2, generator=g, dtype=torch.float64), 1)
    check(x, w, p.float().to(device), b, grad_target=True, reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("n_tokens", [1, 9, 64])
def test_chunk_sizes(backend, device, n_tokens):
    # one token; a vocabulary that is not a multiple of anything; every chunk size
    x, w, b, t = operands(n_tokens, 16, 1003, torch.bfloat16, device)
    for chunk in {1, 5, n_tokens, None}:
        check(x, w, t, b, chunk_size=chunk, label_smoothing=0.05)


def test_upstream_gradients(backend, device):
    # (float32: the logic of scaled, repeated and second backwards, not bfloat16's rounding)
    x, w, b, t = operands(19, 16, 71, torch.float32, device)
    x.requires_grad_(True)
    ref_x = x.detach().double().cpu().requires_grad_(True)
    check_upstream_gradients(
        x, ref_x, lambda: fl.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=6),
        lambda: reference(ref_x, w.double().cpu(), t.cpu(), b.double().cpu()), torch.float32)


def test_weight_gradient_accumulation(backend, device):
    # accum_dtype=None: the weight's own dtype (bfloat16 sums over 8 chunks)
    x, w, b, t = operands(64, 16, 101, torch.bfloat16, device)
    check(x, w, t, b, chunk_size=8, accum_dtype=None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_autocast(backend, device, dtype):
    # torch.autocast: a float32 loss, each gradient in its operand's dtype; the values those
    # of torch's reference under the same autocast (its GEMM in bfloat16)
    x, w, b, t = operands(24, 16, 101, dtype, device)
    x.requires_grad_(True), w.requires_grad_(True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = fl.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=8, z_loss=1e-3)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == w.grad.dtype == dtype
    ref_x = x.detach().double().cpu().requires_grad_(True)
    ref_w = w.detach().double().cpu().requires_grad_(True)
    ref = reference(ref_x, ref_w, t.cpu(), b.double().cpu(), z_loss=1e-3)
    ref.backward()
    own_x = x.detach().cpu().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = reference(own_x, w.detach().cpu(), t.cpu(), b.cpu(), z_loss=1e-3)
    own.backward()
    assert_close(loss, ref, torch.float32, "loss", torch_own=own)
    assert_close(x.grad, ref_x.grad, dtype, "d loss / d input", torch_own=own_x.grad)


def test_no_grad(backend, device):
    x, w, b, t = operands(20, 16, 101, torch.float32, device)
    with torch.no_grad():
        loss = fl.linear_cross_entropy(x.requires_grad_(True), w.requires_grad_(True), t,
                                       linear_bias=b, chunk_size=4)
    assert loss.grad_fn is None
    assert_close(loss, reference(x.double().cpu(), w.double().cpu(), t.cpu(),
                                 b.double().cpu()), torch.float32, "loss")


def test_double_backward(backend, device):
    # create_graph=True: second derivatives through torch's ops (the only path that holds
    # the logits)
    x, w, b, t = operands(6, 8, 13, torch.float32, device)
    v = torch.randn(6, 8, dtype=torch.float64)

    def hvp(fn, x, w):
        x = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, w, t.to(x.device), label_smoothing=0.1), x,
                                   create_graph=True)
        (g * v.to(x.dtype).to(x.device)).sum().backward()
        return g.detach(), x.grad

    g, h = hvp(fl.linear_cross_entropy, x, w)
    ref_g, ref_h = hvp(reference, x.double().cpu(), w.double().cpu())
    assert_close(g, ref_g, torch.float32, "gradient")
    assert_close(h, ref_h, torch.float32, "Hessian-vector product")


def test_return_z_loss_and_module(backend, device):
    x, w, b, t = operands(11, 16, 29, torch.float32, device)
    loss, z = fl.linear_cross_entropy(x, w, t, linear_bias=b, z_loss=0.1, return_z_loss=True)
    ref, ref_z = reference(x.double().cpu(), w.double().cpu(), t.cpu(), b.double().cpu(),
                           z_loss=0.1, return_z_loss=True)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(z, ref_z, torch.float32, "z-loss term")
    assert not z.requires_grad or z.grad_fn is None

    ours = fl.LinearCrossEntropyLoss(16, 29, bias=True, label_smoothing=0.1, softcap=5.0,
                                      device=device)
    with torch.no_grad():
        ours.linear.weight.copy_(w)
        ours.linear.bias.copy_(b)
    assert_close(ours(x, t), reference(x.double().cpu(), w.double().cpu(), t.cpu(),
                                       b.double().cpu(), label_smoothing=0.1, softcap=5.0),
                 torch.float32, "module loss")


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch < 2.13 has no LinearCrossEntropyLoss")
def test_module_state_dict_moves_between_torch_and_ours():
    theirs = torch.nn.LinearCrossEntropyLoss(16, 7, out_features=(3,), bias=True,
                                             weight=torch.rand(7))
    ours = fl.LinearCrossEntropyLoss(16, 7, out_features=(3,), bias=True, weight=torch.rand(7))
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x, t = torch.randn(5, 16), torch.randint(0, 7, (5, 3))
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# never an (N, V) tensor; bfloat16 confident rows; the chunk plan
# --------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor a torch op makes (kernels' launches
    write into tensors made by torch ops, so nothing escapes). In-place ops and ``set_``
    (the Triton interpreter's byte views of a launch's tensors) make none; meta tensors
    (torch's shape checks) hold no memory."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable or func.__name__.startswith("set_"):
            return out
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.device.type != "meta":
                self.largest = max(self.largest, o.numel())
        return out


def tile_the_backward(monkeypatch, budget: int, min_classes: int = 1, spy: bool = True) -> list:
    """Make the backward of the LM heads (cross-entropy and log-probs) tile the classes of
    heads this small (``grad_tiles``: a budget of ``budget`` bytes, which the forward's
    chunks take too; tiles from ``min_classes`` classes on); returns the list each
    backward's count of tiles is appended to (so a test sees that it tiled; not with
    ``spy=False``, for torch.compile, which refuses the spy's side effect)."""
    from fused_losses.kernels import chunked_head

    monkeypatch.setattr(sys.modules["fused_losses.linear_cross_entropy"], "MIN_TILE_CLASSES",
                        min_classes)
    for name in ("linear_cross_entropy", "log_probs"):
        monkeypatch.setattr(sys.modules[f"fused_losses.{name}"], "CHUNK_BYTES",
                            {"cuda": budget, "cpu": budget})
    counts, tiles = [], chunked_head._tiles
    if not spy:
        return counts

    def counted(*args):
        out = tiles(*args)
        counts.append(len(out))
        return out

    monkeypatch.setattr(chunked_head, "_tiles", counted)
    return counts


def logits_bytes(backend: str, dtype: torch.dtype) -> int:
    """Bytes of a logit of the CE head's chunks: the GEMMs' dtype on the kernels, float32
    in the eager formula."""
    return dtype.itemsize if backend == "triton" else 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES) + ["softcap, temperature, logit_scale"])
def test_backward_in_tiles_of_classes(backend, device, dtype, case, monkeypatch):
    # reduction='none' (per-token upstream gradients: the backward recomputes) in tiles of
    # every token by a block of the classes: 37 tokens, 101 classes, tiles of 25 classes and
    # a ragged one of 1, each tile's gradient from the rows' statistics the forward kept;
    # the input's gradient summed over the tiles in float32, rounded once. A bias but in
    # the plain case.
    bias = case != "plain"
    counts = tile_the_backward(monkeypatch, budget=37 * 30 * logits_bytes(backend, dtype))
    kw = dict(CASES.get(case, dict(softcap=3.0, temperature=0.7, logit_scale=1.3)))
    x, w, b, t = operands(37, 16, 101, dtype, device)
    if kw.pop("ignore", False):
        t[::4] = -100
    t[1], t[2] = 100, 25  # targets in the last tile and at a tile's first class
    weight = class_weight(101, dtype, device) if kw.pop("weight", False) else None
    check(x, w, t, b if bias else None, weight, reduction="none", **kw)
    assert counts == [5], counts


def test_tiles_of_operands_as_views(backend, device, monkeypatch):
    # every tensor argument as a view (the input a column slice of a transposed buffer, the
    # weight transposed in memory, the bias, targets and class weights strided) in the
    # backward's tiles: the same losses and gradients as contiguous operands
    counts = tile_the_backward(monkeypatch, budget=37 * 30 * logits_bytes(backend,
                                                                           torch.float32))
    n, h, v = 37, 16, 101
    x, w, b, t = operands(n, h, v, torch.float32, device)
    t[::4] = -100
    cw = class_weight(v, torch.float32, device)
    kw = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, temperature=0.8)

    def run(x, w, b, t, cw):
        x, w, b = (u.detach().clone().requires_grad_(True) for u in (x, w, b))
        loss = fl.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, **kw)
        loss.backward(torch.linspace(0.5, 1.5, n, device=device))
        return loss.detach(), x.grad, w.grad, b.grad

    want = run(x, w, b, t, cw)
    xv = torch.zeros(h + 3, n, device=device).t()[:, 1:h + 1].copy_(x)
    wv = w.t().contiguous().t()
    bv = torch.zeros(2 * v, device=device)[::2].copy_(b)
    tv = torch.stack([t, t], 1)[:, 1]
    cwv = torch.zeros(3 * v, device=device)[::3].copy_(cw)
    assert not any(u.is_contiguous() for u in (xv, wv, bv, tv, cwv))
    for u in (xv, wv, bv):
        u.requires_grad_(True)
    loss = fl.linear_cross_entropy(xv, wv, tv, linear_bias=bv, weight=cwv, **kw)
    loss.backward(torch.linspace(0.5, 1.5, n, device=device))
    for name, got, ref in zip(("loss", "input", "weight", "bias"),
                              (loss, xv.grad, wv.grad, bv.grad), want, strict=True):
        assert_close(got, ref.double(), torch.float32, f"{name} (views, tiles)")
    assert counts == [5, 5], counts


def test_tiles_planned_where_the_backward_recomputes(monkeypatch):
    # tiles for a backward that forms the logits again anyway (reduction='none' here; a
    # compiled graph in test_torch_compile): not for a reduced loss, whose forward writes
    # its gradient (its backward forms no logits), nor for probability targets, a
    # K-dimensional head, or a chunk_size the caller set (those backwards run in chunks: 1)
    counts = tile_the_backward(monkeypatch, budget=37 * 30 * 4)
    x, w, _, t = operands(37, 16, 101, torch.float32, "cpu")
    probs = torch.softmax(torch.randn(37, 101, dtype=torch.float64), 1).float()
    x4, w4, _, t4 = operands(37, 16, 50, torch.float32, "cpu", out_features=(2,))
    calls = {
        "none": ((x, w, t), dict(reduction="none"), [5]),
        "mean": ((x, w, t), dict(), []),
        "sum": ((x, w, t), dict(reduction="sum"), []),
        "none, chunk_size": ((x, w, t), dict(reduction="none", chunk_size=8), [1]),
        "none, probabilities": ((x, w, probs), dict(reduction="none"), [1]),
        "none, K-dimensional": ((x4, w4, t4), dict(reduction="none"), [1]),
    }
    for what, ((xi, wi, ti), kwargs, want) in calls.items():
        counts.clear()
        fl.linear_cross_entropy(xi.detach().requires_grad_(True), wi, ti,
                                **kwargs).sum().backward()
        assert counts == want, (what, counts)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(label_smoothing=0.1, weight=True, softcap=30.0, z_loss=1e-4),
     dict(reduction="none"),
     dict(reduction="none", label_smoothing=0.1, weight=True, softcap=30.0, tiles=True)],
    ids=["plain", "everything", "none", "none in tiles"],
)
def test_never_an_eighth_of_the_logits(backend, device, kwargs, monkeypatch):
    # 1,024 tokens, an 800-class head of 16 features (so the weight is small): no tensor of
    # the forward or the backward holds an eighth of the logits' elements. The backward's
    # tiles of every token by a block of the classes (8 tiles of 100) on 128 tokens, the
    # rule taken from there on (a program per row of each tile: 8 times the rows for the
    # Triton interpreter to run)
    n, h, v = 1024, 16, 800
    kwargs = dict(kwargs)
    tiled = kwargs.pop("tiles", False)
    if tiled:
        n = 128
        monkeypatch.setattr(sys.modules["fused_losses.linear_cross_entropy"], "EIGHTH_FROM", n)
        counts = tile_the_backward(monkeypatch, budget=64 << 20, min_classes=8)
    x, w, b, t = operands(n, h, v, torch.bfloat16, device)
    x.requires_grad_(True), w.requires_grad_(True)
    if kwargs.pop("weight", False):
        kwargs["weight"] = class_weight(v, torch.bfloat16, device)
    with LargestTensor() as mode:
        loss = fl.linear_cross_entropy(x, w, t, **kwargs)
        loss.backward(torch.ones_like(loss))
    assert mode.largest <= n * v // 8, mode.largest
    with torch.no_grad(), LargestTensor() as mode:  # one chunk of logits
        fl.linear_cross_entropy(x, w, t, **kwargs)
    assert mode.largest <= n * v // 8, mode.largest
    assert not tiled or counts == [8], counts


def test_confident_rows_keep_their_digits(backend, device):
    # bfloat16 rows whose target has p = 1 - 6.1e-4: p rounded to bfloat16 first is 1.0, and
    # its gradient p - 1 would be 0 (three peers shipped that); formed in float32, it is
    # -6.1e-4 to bfloat16's precision. Row i sees feature i only; W[t_i, i] = 12, so its
    # target's logit is 12 and every other 0, and d loss / d W[t_i, i] = p - 1.
    n, v = 4, 100
    x = torch.eye(n, dtype=torch.bfloat16, device=device)
    t = torch.tensor([3, 7, 11, 42], device=device)
    w = torch.zeros(v, n, dtype=torch.bfloat16, device=device)
    w[t, torch.arange(n, device=device)] = 12.0
    w.requires_grad_(True)
    fl.linear_cross_entropy(x, w, t, reduction="sum").backward()
    expected = -99 / (math.exp(12) + 99)
    got = w.grad[t, torch.arange(n, device=device)].double().cpu()
    assert torch.allclose(got, torch.full_like(got, expected), rtol=2**-7), (got, expected)


@pytest.mark.parametrize(
    ("n", "v", "dtype", "device", "chunk"),
    [
        (8192, 128256, torch.bfloat16, "cuda", 1024),  # Llama 3: an eighth of the tokens
        (32768, 128256, torch.bfloat16, "cuda", 2092),  # the 512 MiB budget
        (16384, 262144, torch.bfloat16, "cuda", 1024),  # Gemma: the byte budget
        (1024, 32000, torch.bfloat16, "cuda", 128),  # an eighth of the tokens
        (512, 32000, torch.bfloat16, "cuda", 512),  # fewer: all of them, in budget
        (4096, 32000, torch.float32, "cpu", 512),  # an eighth (the CPU's 64 MiB: 524)
        (16384, 32000, torch.float32, "cpu", 524),  # the CPU's 64 MiB
    ],
)
def test_chunk_plan(n, v, dtype, device, chunk):
    plan = _plan(n, device, dtype, dtype, v, 1, device == "cuda", None, None, torch.float32)
    assert plan.chunk == chunk
    assert plan.accum_dtype == torch.float32


def test_options_batch_chunk_size_is_honoured():
    class Options:
        batch_chunk_size = 7

    def chunk(chunk_size):
        return _plan(100, "cpu", torch.float32, torch.float32, 50, 1, False, chunk_size,
                     Options(), torch.float32).chunk

    assert chunk(None) == 7
    assert chunk(3) == 3  # the keyword wins


# --------------------------------------------------------------------------------------
# torch's errors, in its words
# --------------------------------------------------------------------------------------

X, W, T = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
BAD_CALLS = {
    "3-D input": ((torch.randn(2, 4, 8), W, T), {}),
    "1-D weight": ((X, torch.randn(8), T), {}),
    "in_features mismatch": ((X, torch.randn(10, 9), T), {}),
    "bias of the wrong shape": ((X, W, T), {"linear_bias": torch.randn(11)}),
    "ignore_index with probabilities": ((X, W, torch.rand(4, 10)), {"ignore_index": 3}),
    "K-dim weight, unbatched input": ((torch.randn(8), torch.randn(10, 3, 8),
                                       torch.tensor([1, 2, 3])), {}),
    "target batch mismatch": ((X, W, torch.tensor([1, 2, 3])), {}),
    "target out of range": ((X, W, torch.tensor([1, 2, 3, 10])), {}),
    "weight of the wrong size": ((X, W, T), {"weight": torch.rand(9)}),
    "weight of the wrong dtype": ((X, W, T), {"weight": torch.rand(10, dtype=torch.float64)}),
    "input and weight dtypes": ((X, W.double(), T), {}),
    "float target of another shape": ((X, W, torch.rand(4)), {}),
    "label smoothing > 1": ((X, W, T), {"label_smoothing": 1.5}),
    "bad reduction": ((X, W, T), {"reduction": "avg"}),
    # torch's nll_loss has no derivative for the class weight of class targets
    "class weight requires grad": ((X, W, T), {"weight": torch.rand(10, requires_grad=True)}),
    "class weight requires grad, K-dim": ((X, torch.randn(10, 3, 8), torch.zeros(4, 3).long()),
                                          {"weight": torch.rand(10, requires_grad=True)}),
}


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch < 2.13 has no linear_cross_entropy")
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_errors_like_torch(backend, case):
    args, kwargs = BAD_CALLS[case]
    assert_raises_like_torch(lambda: fl.linear_cross_entropy(*args, **kwargs),
                             lambda: F.linear_cross_entropy(*args, **kwargs))


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        fl.linear_cross_entropy(X, W, T, chunk_size=0)
