"""The losses under ``torch.compile(fullgraph=True)``: no graph break, and the same values
and gradients as torch in float64, on both backends.

On the CPU the kernels run under the interpreter, which torch.compile cannot trace; there each
launch becomes the opaque op ``fused_losses::interpret`` (kernels/_common.py), so everything
around it (validation, dispatch, the autograd Functions, what they keep for the backward) is
traced as on a GPU. ``eager`` runs Dynamo's graph as it is; ``aot_eager`` adds AOTAutograd's
functionalized forward and backward graphs, what Inductor compiles. Inductor itself runs on
CUDA only (``cuda`` tests).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    LOSS_PAIRS,
    assert_close,
    check_upstream_gradients,
    loss_and_grads,
    loss_operands,
    random_logits,
    reference_cross_entropy,
)
from test_linear_cross_entropy import tile_the_backward

import fused_losses as fl

COMPILERS = ["eager", "aot_eager"]  # Inductor: the cuda tests at the end


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles its own graphs (no recompile limit reached)
    yield
    torch._dynamo.reset()


def compiled(fn, compiler):
    return torch.compile(fn, backend=compiler, fullgraph=True)


def check(compiler, ours, theirs, inputs: dict, grad_names, dtype):
    """``compile(ours)`` against ``theirs`` in float64: loss and gradients, with a random
    upstream gradient."""
    loss, grads = loss_and_grads(compiled(ours, compiler), inputs, grad_names, round_to=dtype)
    ref_inputs = {k: v.detach().cpu().double() if v.is_floating_point() else v.cpu()
                  for k, v in inputs.items()}
    ref, ref_grads = loss_and_grads(theirs, ref_inputs, grad_names, round_to=dtype)
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype, "loss")
    for name in grad_names:
        assert_close(grads[name], ref_grads[name], dtype, f"grad of {name}")


CE_CASES = {
    "mean": dict(),
    "sum, smoothing": dict(reduction="sum", label_smoothing=0.2),
    "none, weight": dict(reduction="none", weight=True),
    "mean, weight, smoothing, ignored": dict(weight=True, label_smoothing=0.1, ignore=True),
}


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy(backend, device, compiler, case):
    kw = dict(CE_CASES[case])
    dtype = torch.bfloat16
    x = random_logits((6, 40), dtype, device)
    t = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(1)).to(device)
    inputs = {"input": x, "target": t}
    if kw.pop("ignore", False):
        t[2] = -100
    if kw.pop("weight", False):
        inputs["weight"] = random_logits((40,), dtype, device).abs() + 0.5
    check(compiler, lambda **a: fl.cross_entropy(**a, **kw),
          lambda **a: F.cross_entropy(**a, **kw), inputs, {"input"}, dtype)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_cross_entropy_probabilities_k_dim(backend, device, compiler):
    dtype = torch.float32
    x = random_logits((3, 7, 4, 5), dtype, device)
    t = torch.softmax(random_logits((3, 7, 4, 5), dtype, device, seed=2), dim=1)
    check(compiler, lambda **a: fl.cross_entropy(**a, label_smoothing=0.1),
          lambda **a: F.cross_entropy(**a, label_smoothing=0.1),
          {"input": x, "target": t}, {"input", "target"}, dtype)


SOFTCAP_CASES = {
    "mean, softcap, z-loss": dict(softcap=5.0, z_loss=1e-2),
    "none, weight, smoothing, softcap, z-loss": dict(reduction="none", weight=True,
                                                     label_smoothing=0.1, softcap=2.0,
                                                     z_loss=0.1),
}


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
def test_cross_entropy_softcap_z_loss(backend, device, compiler, case):
    kw = dict(SOFTCAP_CASES[case])
    dtype = torch.bfloat16
    x = random_logits((6, 40), dtype, device)
    t = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(1)).to(device)
    t[2] = -100
    inputs = {"input": x, "target": t}
    if kw.pop("weight", False):
        inputs["weight"] = random_logits((40,), dtype, device).abs() + 0.5
    check(compiler, lambda **a: fl.cross_entropy(**a, **kw),
          lambda **a: reference_cross_entropy(**a, **kw), inputs, {"input"}, dtype)
    # the z-loss term from the same compiled call
    _, z = compiled(lambda **a: fl.cross_entropy(**a, **kw, return_z_loss=True),
                    compiler)(**inputs)
    ref_inputs = {k: v.cpu().double() if v.is_floating_point() else v.cpu()
                  for k, v in inputs.items()}
    _, ref_z = reference_cross_entropy(**ref_inputs, **kw, return_z_loss=True)
    assert_close(z, ref_z, dtype, "z-loss term")


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("case", ["mean", "none, smoothing, softcap, z-loss"])
@pytest.mark.parametrize("tiles", [False, True])
def test_linear_cross_entropy(backend, device, compiler, case, tiles, monkeypatch):
    # the fused LM head in a compiled graph: the kernels' chunked Function (its gradients
    # recomputed in the backward, in chunks or in tiles of the classes from the rows' kept
    # statistics); the eager formula whole on the torch backend
    kw = dict(chunk_size=7)
    if tiles:  # the default plan: tiles of 10 classes (the budget of 7 tokens' logits)
        tile_the_backward(monkeypatch, budget=20 * 12 * 4, spy=False)
        kw = {}
    if case != "mean":
        kw.update(reduction="none", label_smoothing=0.1, softcap=3.0, z_loss=0.01)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 16, generator=g).to(device)
    w = (torch.randn(50, 16, generator=g) * 0.3).to(device)
    b = torch.randn(50, generator=g).to(device)
    t = torch.randint(0, 50, (20,), generator=g).to(device)

    def reference(input, linear_weight, target, linear_bias):
        return reference_cross_entropy(F.linear(input, linear_weight, linear_bias), target,
                                       **{k: v for k, v in kw.items() if k != "chunk_size"})

    check(compiler, lambda **a: fl.linear_cross_entropy(**a, **kw), reference,
          {"input": x, "linear_weight": w, "target": t, "linear_bias": b},
          {"input", "linear_weight", "linear_bias"}, torch.float32)


FLOAT32_LOSSES = {
    "cross_entropy": (lambda **a: fl.cross_entropy(**a, label_smoothing=0.1),
                      lambda **a: F.cross_entropy(**a, label_smoothing=0.1)),
    "bce": (fl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    "huber, sum": (lambda **a: fl.huber_loss(**a, reduction="sum"),
                   lambda **a: F.huber_loss(**a, reduction="sum")),
}


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("loss", list(FLOAT32_LOSSES))
def test_float32_reduced_losses(backend, device, compiler, loss):
    # a float32 loss is already in its output dtype: a Function that returned it through a
    # no-op .to() got zero gradients under torch.compile on torch 2.11 (_autograd.output_as)
    ours, theirs = FLOAT32_LOSSES[loss]
    x = random_logits((5, 12), torch.float32, device)
    if loss == "cross_entropy":
        t = torch.randint(0, 12, (5,), generator=torch.Generator().manual_seed(1)).to(device)
    else:
        t = torch.rand(5, 12, generator=torch.Generator().manual_seed(2)).to(device)
    check(compiler, ours, theirs, {"input": x, "target": t}, {"input"}, torch.float32)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_bce_with_logits(backend, device, compiler):
    dtype = torch.bfloat16
    x = random_logits((9, 33), dtype, device)
    t = (random_logits((9, 33), dtype, device, seed=3) > 0).to(dtype)
    weight = random_logits((33,), dtype, device, seed=4).abs()
    pos_weight = random_logits((33,), dtype, device, seed=5).abs() + 0.5
    check(compiler, fl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
          {"input": x, "target": t, "weight": weight, "pos_weight": pos_weight}, {"input"},
          dtype)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_huber_broadcast_target(backend, device, compiler):
    dtype = torch.float32
    x = random_logits((9, 33), dtype, device)
    t = random_logits((33,), dtype, device, seed=6)
    check(compiler, lambda **a: fl.huber_loss(**a, delta=0.5),
          lambda **a: F.huber_loss(**a, delta=0.5), {"input": x, "target": t},
          {"input", "target"}, dtype)


def upstream_gradients(compiled_fn, theirs, x, t):
    """A compiled backward holds no state between calls: scaled, used twice, a second
    backward through a retained graph, two losses off one forward."""
    x = x.detach().requires_grad_(True)
    ref_x = x.detach().cpu().double().requires_grad_(True)
    t_ref = t.cpu().double() if t.is_floating_point() else t.cpu()
    check_upstream_gradients(x, ref_x, lambda: compiled_fn(x, t), lambda: theirs(ref_x, t_ref),
                             x.dtype)


# AOTAutograd refuses retain_graph=True for a backward that reuses ("donates") saved buffers,
# with torch's own losses as with ours; its error says to turn that off (at compile time).
def no_donated_buffers():
    import torch._functorch.config

    return torch._functorch.config.patch(donated_buffer=False)


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("loss", list(LOSS_PAIRS))
def test_upstream_gradients(backend, device, compiler, loss):
    ours, theirs = LOSS_PAIRS[loss]
    x, t = loss_operands(loss, (8, 50), device)
    with no_donated_buffers():
        upstream_gradients(compiled(ours, compiler), theirs, x, t)


@pytest.mark.cuda
@pytest.mark.parametrize("loss", list(LOSS_PAIRS))
def test_inductor(loss):
    """The kernels inside an Inductor graph at a language-model shape, after a compiled op:
    values and gradients, then the upstream-gradient patterns through the same graph (one
    compilation per loss: gpu_check.sh gives this file its own time)."""
    ours, theirs = LOSS_PAIRS[loss]
    x, t = loss_operands(loss, (64, 32000 if loss == "cross_entropy" else 8192), "cuda")

    def fn(input, target):
        return ours(input * 1.0, target)

    with no_donated_buffers():
        check("inductor", fn, lambda input, target: theirs(input * 1.0, target),
              {"input": x, "target": t}, {"input"}, x.dtype)
        upstream_gradients(compiled(fn, "inductor"), theirs, x, t)
