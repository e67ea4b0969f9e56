"""fused_losses.linear_log_probs (the RL head) against torch in float64, both backends.

The reference is ``test_log_probs.reference_log_probs`` of ``linear(input, W, b)`` in
float64 on the same rounded operands: values (in float32's tolerance whatever the operands'
dtype: the chunks' logits are formed in float32, never rounded to bfloat16) and the
gradients of the input, the weight and the bias from random upstream gradients of the
log-probabilities, the entropy, or both. In bfloat16 the gradients go through bfloat16
logit gradients and GEMMs: twice torch's own bfloat16 error is allowed on top.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close
from test_linear_cross_entropy import LargestTensor, tile_the_backward
from test_log_probs import ALL_OUTPUTS, backward, check_extras, reference_log_probs, upstream

import fused_losses as fl


def operands(lead, h, v, dtype, device, seed=0, logit_std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (logit_std / math.sqrt(h))
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, v, lead, generator=g)
    return (x.to(dtype).to(device), w.to(dtype).to(device), b.to(dtype).to(device),
            t.to(device))


def reference(x, w, t, b=None, **opts):
    return reference_log_probs(F.linear(x, w, b), t, **opts)


def run(fn, x, w, t, b, which, **opts):
    """fn's (log p, H) and the gradients of x, w (and b) for the upstream ``which``."""
    leaves = [v.detach().clone().requires_grad_(True) if v is not None else None
              for v in (x, w, b)]
    lp, h = fn(leaves[0], leaves[1], t, leaves[2], **opts)
    g_lp, g_h = upstream(t.shape, which)
    if g_lp is not None:
        g_lp = g_lp.to(lp.dtype)
    if g_h is not None:
        g_h = g_h.to(h.dtype)
    backward(lp, h, g_lp, g_h)
    return lp.detach(), h.detach(), [None if v is None else v.grad for v in leaves]


def ours(x, w, t, b, **opts):
    return fl.linear_log_probs(x, w, t, linear_bias=b, return_entropy=True, **opts)


def check(x, w, t, b=None, which="both", **opts):
    dtype = x.dtype
    lp, h, grads = run(ours, x, w, t, b, which, **opts)
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == t.shape
    ref_opts = {k: v for k, v in opts.items() if k != "chunk_size"}

    def wide(v, to):
        return None if v is None else v.detach().cpu().to(to)

    ref_lp, ref_h, ref_grads = run(reference, wide(x, torch.float64), wide(w, torch.float64),
                                   t.cpu(), wide(b, torch.float64), which, **ref_opts)
    assert_close(lp, ref_lp, torch.float32, "log_probs")
    assert_close(h, ref_h, torch.float32, "entropy")
    own = [None] * 3
    if dtype != torch.float32:  # torch's own path in the operands' dtype
        own = run(reference, wide(x, dtype), wide(w, dtype), t.cpu(), wide(b, dtype), which,
                  **ref_opts)[2]
    for name, got, want, own_g, v in zip(("input", "weight", "bias"), grads, ref_grads, own,
                                         (x, w, b), strict=True):
        if v is None:
            continue
        assert got.dtype == v.dtype
        assert_close(got, want, dtype, f"d out / d {name} ({which})", torch_own=own_g)
    return lp, h, grads


OPTIONS = {
    "plain": dict(),
    "temperature": dict(temperature=0.7),
    "everything": dict(temperature=1.3, softcap=4.0, logit_scale=0.8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("case", "which"), [("plain", "both"), ("temperature", "log_probs"),
                                             ("everything", "entropy"), ("everything", "both")])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients(backend, device, dtype, which, case, bias):
    # (batch, sequence) leading shape, 37 tokens in chunks of 8 (a ragged last one), 101
    # classes; some tokens ignored
    x, w, b, t = operands((37,), 16, 101, dtype, device)
    t[::4] = -100
    check(x, w, t, b if bias else None, which, chunk_size=8, **OPTIONS[case])


def test_k_dimensional_leading_shape(backend, device):
    x, w, b, t = operands((3, 5), 16, 64, torch.float32, device)
    t[1, 2] = 7  # (a valid target; the ignored one next)
    t[2, 4] = -100
    check(x, w, t, b, "both", chunk_size=4, temperature=0.9)
    # the hidden states of a causal LM, shifted (a strided view, not a copy)
    hidden = operands((3, 6), 16, 64, torch.float32, device, seed=1)[0]
    check(hidden[:, :-1], w, t, None, "log_probs", chunk_size=5)


@pytest.mark.parametrize("n_tokens", [1, 9])
def test_chunk_sizes(backend, device, n_tokens):
    x, w, b, t = operands((n_tokens,), 16, 203, torch.bfloat16, device)
    for chunk in {1, 4, n_tokens, None}:
        check(x, w, t, b, "both", chunk_size=chunk)


def test_ignore_index(backend, device):
    x, w, _, t = operands((12,), 8, 30, torch.float32, device)
    t[::2] = 0
    check(x, w, t, None, "both", ignore_index=0, chunk_size=5)
    lp, h = fl.linear_log_probs(x, w, t, ignore_index=0, return_entropy=True)
    assert torch.equal(lp[::2].cpu(), torch.zeros(6)) and torch.equal(h[::2].cpu(),
                                                                      torch.zeros(6))


def test_bf16_precision_against_the_bf16_logits_path(backend, device, capsys):
    # bfloat16 operands, ordinary rows (logits of std 4): ours within 2e-3 nats of the float64
    # truth on the same operands; the bfloat16-logits path (the logits rounded to bfloat16
    # before the log-softmax, as TRL's tiles and torch's F.linear in bf16) is far off
    x, w, _, t = operands((256,), 256, 4096, torch.bfloat16, device, logit_std=4.0)
    lp, h = fl.linear_log_probs(x, w, t, temperature=0.9, return_entropy=True)
    truth_lp, truth_h = reference(x.double().cpu(), w.double().cpu(), t.cpu(), temperature=0.9)
    bf16_logits = F.linear(x.cpu(), w.cpu()).float()
    peer_lp, peer_h = reference_log_probs(bf16_logits.double(), t.cpu(), temperature=0.9)
    err = max((lp.cpu() - truth_lp).abs().max(), (h.cpu() - truth_h).abs().max()).item()
    peer = max((peer_lp - truth_lp).abs().max(), (peer_h - truth_h).abs().max()).item()
    with capsys.disabled():
        print(f"\n  bf16 operands, max |error| in nats: ours {err:.2e}, bf16 logits {peer:.2e}")
    assert err <= 2e-3
    assert peer > 10 * err
    assert bool((lp <= 0).all()) and bool((h >= 0).all())
    assert bool((h.double() <= math.log(4096)).all())


def test_against_trl_chunked_logprob(backend, device):
    # TRL 1.16's ChunkedLogProbFunction on the same float32 operands (its CPU path):
    # log-probabilities, entropies and the gradients of the input and the weight
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    x, w, b, t = operands((24,), 32, 300, torch.float32, "cpu")
    g_lp, g_h = upstream(t.shape, "both")

    def trl_fn(x, w, t, b, temperature, softcap):
        lp, h, *_ = chunked.ChunkedLogProbFunction.apply(x, w, b, t, temperature, 128,
                                                         softcap, 1.0, ("entropy",))
        return lp, h

    def ours_fn(x, w, t, b, temperature, softcap):
        return fl.linear_log_probs(x, w, t, linear_bias=b, temperature=temperature,
                                   softcap=softcap, return_entropy=True)

    results = []
    for fn, dev in ((trl_fn, "cpu"), (ours_fn, device)):
        leaves = [v.detach().clone().to(dev).requires_grad_(True) for v in (x, w, b)]
        lp, h = fn(leaves[0], leaves[1], t.to(dev), leaves[2], 0.7, 20.0)
        backward(lp, h, g_lp, g_h)
        results.append([lp, h, *(v.grad for v in leaves)])
    for theirs, mine in zip(*results, strict=True):
        torch.testing.assert_close(mine.cpu(), theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("dtype", "case", "bias"), [(torch.float32, "plain", True),
                                                   (torch.bfloat16, "plain", False),
                                                   (torch.float32, "everything", True)])
def test_requested_outputs(backend, device, dtype, case, bias):
    # TRL's other per-token statistics (outputs=) over chunks of 8 of 37 tokens: against
    # float64 on the same operands, no gradient on them; log p, the entropy and every
    # gradient exactly as without them
    x, w, b, t = operands((37,), 16, 101, dtype, device)
    b = b if bias else None
    logits = F.linear(x.double().cpu(), w.double().cpu(), None if b is None else
                      b.double().cpu())
    t[1::3] = logits[1::3].argmax(-1).to(device)  # some top-1 targets
    t[::4] = -100
    opts = dict(chunk_size=8, **OPTIONS[case])

    def with_outputs(x, w, t, b, **kw):
        out = fl.linear_log_probs(x, w, t, linear_bias=b, outputs=ALL_OUTPUTS, **kw)
        extras.append(out)
        return out.log_probs, out.entropy

    extras = []
    lp, h, grads = run(with_outputs, x, w, t, b, "both", **opts)
    lp_ref, h_ref, grads_ref = run(ours, x, w, t, b, "both", **opts)
    for got, want in zip((lp, h, *grads), (lp_ref, h_ref, *grads_ref), strict=True):
        assert (got is None and want is None) or torch.equal(got, want)
    out = extras[0]
    check_extras(out, logits, t, **OPTIONS[case])
    assert bool(out.is_top1.any()) and not bool(out.is_top1[::4].any())


def test_requested_outputs_against_trl(backend, device):
    # TRL 1.16's ChunkedLogProbFunction with every output, on the same float32 operands
    # (its CPU path): the five outputs, and the gradients of the input, the weight and the
    # bias from the log-probabilities' and the entropy's
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    x, w, b, t = operands((24,), 32, 300, torch.float32, "cpu")
    t[::3] = F.linear(x, w, b)[::3].argmax(-1)
    g_lp, g_h = upstream(t.shape, "both")
    results = []
    for name, dev in (("trl", "cpu"), ("ours", device)):
        leaves = [v.detach().clone().to(dev).requires_grad_(True) for v in (x, w, b)]
        if name == "trl":
            out = chunked.ChunkedLogProbFunction.apply(*leaves[:3], t, 0.7, 128, 20.0, 1.5,
                                                       chunked.OPTIONAL_OUTPUTS)
        else:
            out = fl.linear_log_probs(leaves[0], leaves[1], t.to(dev), linear_bias=leaves[2],
                                      temperature=0.7, softcap=20.0, logit_scale=1.5,
                                      outputs=ALL_OUTPUTS, chunk_size=7)
            assert out._fields == ("log_probs", *chunked.OPTIONAL_OUTPUTS)
        assert not any(o.requires_grad for o in out[2:])
        backward(out[0], out[1], g_lp, g_h)
        results.append([*out, *(v.grad for v in leaves)])
    assert bool(results[1][4].any())
    for theirs, mine in zip(*results, strict=True):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine.cpu(), theirs, rtol=1e-4, atol=1e-5)


def test_requested_outputs_no_grad_and_compile(backend, device):
    x, w, b, t = operands((3, 7), 16, 50, torch.float32, device)
    t[1, 2] = -100
    with torch.no_grad():
        plain = fl.linear_log_probs(x, w, t, linear_bias=b, outputs=ALL_OUTPUTS, chunk_size=4)
    check_extras(plain, F.linear(x.double().cpu(), w.double().cpu(), b.double().cpu()), t)
    # torch.compile: the chunked driver's optional, non-differentiable outputs traced
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w, t, b: fl.linear_log_probs(
        x, w, t, linear_bias=b, outputs=ALL_OUTPUTS, chunk_size=4), backend="aot_eager",
        fullgraph=True)
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, w, b)]
    out = fn(leaves[0], leaves[1], t, leaves[2])
    for mine, want in zip(out, plain, strict=True):
        torch.testing.assert_close(mine.detach(), want, rtol=1e-6, atol=1e-6)
    assert not out.mean_logits.requires_grad and out.entropy.requires_grad
    backward(out.log_probs, out.entropy, *upstream(t.shape, "both"))
    _, _, ref_grads = run(ours, x, w, t, b, "both", chunk_size=4)
    for got, want in zip((v.grad for v in leaves), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("case", "which"), [("plain", "both"), ("temperature", "log_probs"),
                                             ("everything", "entropy")])
@pytest.mark.parametrize("bias", [False, True])
def test_backward_in_tiles_of_classes(backend, device, dtype, which, case, bias, monkeypatch):
    # the backward in tiles of every token by a block of the classes (the weight's gradient
    # accumulated over once): 37 tokens, 101 classes, tiles of 25 classes and a ragged one
    # of 1; the input's gradient summed over the tiles in float32, rounded once
    counts = tile_the_backward(monkeypatch, budget=37 * 30 * 4)
    x, w, b, t = operands((37,), 16, 101, dtype, device)
    t[::4] = -100
    t[1], t[2] = 100, 25  # targets in the last tile and at a tile's first class
    check(x, w, t, b if bias else None, which, **OPTIONS[case])
    assert counts == [5], counts


@pytest.mark.parametrize("tiles", [False, True])
def test_operands_as_views(backend, device, tiles, monkeypatch):
    # every tensor argument as a view (the input a column slice of a transposed buffer, the
    # weight transposed in memory, the bias strided, the targets a strided column): the
    # same outputs and gradients as contiguous operands, in chunks and in the backward's
    # tiles of the classes
    counts = tile_the_backward(monkeypatch, budget=37 * 30 * 4) if tiles else []
    chunk = None if tiles else 8
    n, h, v = 37, 16, 101
    x, w, b, t = operands((n,), h, v, torch.float32, device)
    t[::4] = -100
    want = run(ours, x, w, t, b, "both", temperature=0.7, chunk_size=chunk)
    xv = torch.zeros(h + 3, n, device=device).t()[:, 1:h + 1].copy_(x).requires_grad_(True)
    wv = w.t().contiguous().t().requires_grad_(True)
    bv = torch.zeros(2 * v, device=device)[::2].copy_(b).requires_grad_(True)
    tv = torch.stack([t, t], 1)[:, 1]
    assert not any(u.is_contiguous() for u in (xv, wv, bv, tv))
    lp, ent = ours(xv, wv, tv, bv, temperature=0.7, chunk_size=chunk)
    backward(lp, ent, *upstream(t.shape, "both"))
    assert_close(lp, want[0].double(), torch.float32, "log_probs (views)")
    assert_close(ent, want[1].double(), torch.float32, "entropy (views)")
    for name, got, ref in zip(("input", "weight", "bias"), (xv.grad, wv.grad, bv.grad),
                              want[2], strict=True):
        assert_close(got, ref.double(), torch.float32, f"d out / d {name} (views)")
    assert counts == ([5, 5] if tiles else []), counts


def test_default_grad_tiles():
    """Every token at once, the classes in as few tiles as the budget and the memory rule
    allow (an eighth from 1,024 tokens on); none where tiles would be narrow GEMMs, or where
    the caller set the chunk."""
    from fused_losses.linear_cross_entropy import grad_tiles
    from fused_losses.log_probs import CHUNK_BYTES

    for (n, v, device, chunk), want in [
        ((8192, 128256, "cuda", None), (8192, 16032)),  # an eighth of the classes
        ((16384, 151936, "cuda", None), (16384, 15193)),  # the 1 GiB budget: 10 tiles
        ((4096, 32000, "cpu", None), (4096, 4000)),  # the CPU's 64 MiB
        ((512, 32000, "cuda", None), (0, 0)),  # the logits fit one chunk
        ((8192, 8000, "cuda", None), (0, 0)),  # tiles of 1,000 classes: the chunks instead
        ((8192, 128256, "cuda", 512), (0, 0)),  # the caller's chunk_size
    ]:
        assert grad_tiles(n, v, 4, device, chunk, CHUNK_BYTES) == want, (n, v, device)


@pytest.mark.parametrize("tiles", [False, True])
def test_never_an_eighth_of_the_logits(backend, device, tiles, monkeypatch):
    # 1,024 tokens, an 800-class head of 16 features: no tensor of the forward or the
    # backward holds an eighth of the logits' elements (the backward's tiles of every token
    # neither); under no_grad, one chunk
    if tiles:
        counts = tile_the_backward(monkeypatch, budget=64 << 20, min_classes=8)
    n, h, v = 1024, 16, 800
    x, w, b, t = operands((n,), h, v, torch.bfloat16, device)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    with LargestTensor() as mode:
        lp, ent = fl.linear_log_probs(x, w, t, linear_bias=b, return_entropy=True,
                                      temperature=0.7)
        backward(lp, ent, *upstream(t.shape, "both"))
    assert mode.largest <= n * v // 8, mode.largest
    assert not tiles or counts == [8], counts
    with torch.no_grad(), LargestTensor() as mode:
        fl.linear_log_probs(x, w, t, linear_bias=b, return_entropy=True, chunk_size=32)
    assert mode.largest <= 32 * v, mode.largest


def test_no_grad(backend, device):
    x, w, b, t = operands((20,), 16, 101, torch.float32, device)
    with torch.no_grad():
        lp, h = fl.linear_log_probs(x.requires_grad_(True), w.requires_grad_(True), t,
                                    linear_bias=b, return_entropy=True, chunk_size=4)
    assert lp.grad_fn is None and h.grad_fn is None
    ref_lp, ref_h = reference(x.double().cpu(), w.double().cpu(), t.cpu(), b.double().cpu())
    assert_close(lp, ref_lp, torch.float32, "log_probs")
    assert_close(h, ref_h, torch.float32, "entropy")


def test_non_finite_hidden_states_give_nan_as_torch(backend, device):
    # a NaN (or inf) hidden state makes its row's logits non-finite: every output of that
    # token is NaN, and so is its input gradient, as torch's formula gives them
    x, w, _, t = operands((4,), 8, 13, torch.float32, "cpu")
    x[1, 2] = math.nan
    x[2, 0] = math.inf
    x = x.to(device).requires_grad_(True)
    out = fl.linear_log_probs(x, w.to(device), t.to(device),
                              outputs=("entropy", "log_sum_sq_probs"))
    (out.log_probs.sum() + out.entropy.sum()).backward()
    for name, got in (("log_probs", out.log_probs), ("entropy", out.entropy),
                      ("log_sum_sq_probs", out.log_sum_sq_probs)):
        assert bool(got[1:3].isnan().all()) and bool(got[::3].isfinite().all()), (name, got)
    assert bool(x.grad[1:3].isnan().all()) and bool(x.grad[::3].isfinite().all()), x.grad


@pytest.mark.parametrize("tiles", [False, True])
def test_outputs_modified_in_place(backend, device, tiles, monkeypatch):
    # the per-token results masked in place by the caller (legal on torch's formula): the
    # backward reads its own copy of what it keeps, not the outputs handed out
    counts = tile_the_backward(monkeypatch, budget=6 * 5 * 4) if tiles else []
    x, w, b, t = operands((2, 3), 8, 13, torch.float32, device)
    mask = torch.tensor([[True, True, False], [True, False, True]], device=device)

    def masked(fn, x, w, b):
        x, w, b = (v.detach().clone().requires_grad_(True) for v in (x, w, b))
        lp, h = fn(x, w, b)
        lp.masked_fill_(~mask.to(lp.device), 0.0)
        h.mul_(mask.to(h.device))
        (lp.sum() * 2 + h.sum()).backward()
        return x.grad, w.grad, b.grad

    # in chunks of 2 tokens, or the backward in tiles of 4 classes (a set chunk_size tiles
    # nothing)
    chunk = None if tiles else 2
    got = masked(lambda x, w, b: ours(x, w, t, b, temperature=0.8, chunk_size=chunk), x, w, b)
    want = masked(lambda x, w, b: reference(x, w, t.cpu(), b, temperature=0.8),
                  *(v.cpu().double() for v in (x, w, b)))
    for name, g, r in zip(("input", "weight", "bias"), got, want, strict=True):
        assert_close(g, r, torch.float32, f"d out / d {name} (outputs masked in place)")
    assert counts == ([4] if tiles else []), counts  # 13 classes: tiles of 4 (and 1)


def test_float64_entropy_gradient_of_tiny_probabilities(backend):
    # float64 operands: a class of log p = -300 (or -400) has p = 5e-131, not 0 as in
    # float32; the entropy's gradient -p (log p + H) there keeps float64's relative digits
    x = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0], [300.0], [-100.0]], dtype=torch.float64, requires_grad=True)
    _, h = fl.linear_log_probs(x, w, torch.tensor([1]), return_entropy=True)
    h.sum().backward()
    z = torch.tensor([0.0, 300.0, -100.0], dtype=torch.float64)
    log_p = z - torch.logsumexp(z, 0)
    want = -log_p.exp() * (log_p + h.detach())
    for c in (0, 2):
        assert torch.allclose(w.grad[c, 0], want[c], rtol=1e-12, atol=0.0), (w.grad, want)


def test_deterministic(backend, device):
    x, w, b, t = operands((40,), 16, 300, torch.bfloat16, device)
    runs = [run(ours, x, w, t, b, "both", chunk_size=7, temperature=0.6) for _ in range(2)]
    for a, b_ in zip((runs[0][0], runs[0][1], *runs[0][2]), (runs[1][0], runs[1][1],
                                                              *runs[1][2]), strict=True):
        assert torch.equal(a, b_)


def test_confident_rows_keep_their_digits(backend, device):
    # bfloat16 rows whose target has p = 1 - 6.1e-4 (row i sees feature i only, W[t_i, i] =
    # 12): logits rounded to bfloat16 give p = 1 and d log p / d W[t_i, i] = 1 - p = 0; ours
    # forms it in float32
    n, v = 4, 100
    x = torch.eye(n, dtype=torch.bfloat16, device=device)
    t = torch.tensor([3, 7, 11, 42], device=device)
    w = torch.zeros(v, n, dtype=torch.bfloat16, device=device)
    w[t, torch.arange(n, device=device)] = 12.0
    w.requires_grad_(True)
    fl.linear_log_probs(x, w, t).sum().backward()
    expected = 99 / (math.exp(12) + 99)
    got = w.grad[t, torch.arange(n, device=device)].double().cpu()
    assert torch.allclose(got, torch.full_like(got, expected), rtol=2**-7), (got, expected)


def test_double_backward(backend, device):
    x, w, b, t = operands((6,), 8, 13, torch.float32, device)
    v = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def hvp(fn, x, w):
        x = x.detach().clone().requires_grad_(True)
        lp, h = fn(x, w, t.to(x.device))
        (g,) = torch.autograd.grad((lp + 0.3 * h).sum(), x, create_graph=True)
        (g * v.to(x.dtype).to(x.device)).sum().backward()
        return g.detach(), x.grad

    g, hv = hvp(lambda x, w, t: ours(x, w, t, None, temperature=0.8, chunk_size=4), x, w)
    ref_g, ref_hv = hvp(lambda x, w, t: reference(x, w, t, temperature=0.8),
                        x.double().cpu(), w.double().cpu())
    # torch's own float32 second derivative: twice its error allowed (the terms cancel)
    _, own_hv = hvp(lambda x, w, t: reference(x, w, t, temperature=0.8),
                    x.float().cpu(), w.float().cpu())
    assert_close(g, ref_g, torch.float32, "gradient")
    assert_close(hv, ref_hv, torch.float32, "Hessian-vector product", torch_own=own_hv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_autocast(backend, device, dtype):
    # under torch.autocast the GEMMs run in bfloat16 (as F.linear's), the logits still in
    # float32; gradients in each operand's dtype
    x, w, b, t = operands((24,), 16, 101, dtype, device)
    x.requires_grad_(True), w.requires_grad_(True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        lp = fl.linear_log_probs(x, w, t, linear_bias=b, chunk_size=8)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert x.grad.dtype == w.grad.dtype == dtype
    rounded = [v.detach().cpu().to(torch.bfloat16).double() for v in (x, w, b)]
    ref_lp, _ = reference(rounded[0], rounded[1], t.cpu(), rounded[2])
    if torch.device(device).type == "cuda" or (backend == "triton"):
        assert_close(lp, ref_lp, torch.float32, "log_probs (autocast)")
    else:  # the eager path's float32 GEMMs (autocast's dtype is the kernels')
        assert (lp.cpu() - ref_lp).abs().max() < 0.1


BAD = {
    "weight rank": ((torch.randn(4, 8), torch.randn(10, 2, 8), torch.zeros(4, dtype=torch.long)),
                    {}, RuntimeError, "linear_weight of shape"),
    "in_features": ((torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long)),
                    {}, RuntimeError, "in_features"),
    "bias shape": ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
                   {"linear_bias": torch.randn(11)}, RuntimeError, "linear_bias shape"),
    "target shape": ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long)),
                     {}, ValueError, "target of shape"),
    "dtypes": ((torch.randn(4, 8), torch.randn(10, 8, dtype=torch.float64),
                torch.zeros(4, dtype=torch.long)), {}, RuntimeError, "same dtype"),
    "out of range": ((torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 10, 2])), {},
                     IndexError, "Target 10 is out of bounds."),
    "logit_scale 0": ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
                      {"logit_scale": 0.0}, ValueError, "logit_scale"),
    "chunk_size 0": ((torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
                     {"chunk_size": 0}, ValueError, "chunk_size"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_errors(backend, case):
    args, kwargs, error, words = BAD[case]
    with pytest.raises(error, match=words):
        fl.linear_log_probs(*args, **kwargs)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("tiles", [False, True])
def test_torch_compile_fullgraph(backend, device, compiler, tiles, monkeypatch):
    # the chunked driver traced as it is on the kernel path (its backward in tiles of the
    # classes too); the formula whole on the eager path
    torch._dynamo.reset()
    x, w, b, t = operands((3, 7), 16, 50, torch.float32, device)
    t[1, 2] = -100
    if tiles:
        tile_the_backward(monkeypatch, budget=21 * 12 * 4, spy=False)
        from fused_losses.linear_cross_entropy import grad_tiles

        assert grad_tiles(21, 50, 4, device, None, {"cuda": 1008, "cpu": 1008}) == (21, 10)
    chunk = None if tiles else 4  # (tiles of 10 classes: the default plan's)
    fn = torch.compile(lambda x, w, t, b: ours(x, w, t, b, temperature=0.8, chunk_size=chunk),
                       backend=compiler, fullgraph=True)
    lp, h, grads = run(fn, x, w, t, b, "both")
    ref_lp, ref_h, ref_grads = run(reference, x.double().cpu(), w.double().cpu(), t.cpu(),
                                   b.double().cpu(), "both", temperature=0.8)
    assert_close(lp, ref_lp, torch.float32, "log_probs")
    assert_close(h, ref_h, torch.float32, "entropy")
    for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(got, want, torch.float32, f"d out / d {name}")
    torch._dynamo.reset()


def test_masked_vocabulary(backend, device):
    # a bias of -inf masks classes out (their p is 0: no entropy, a zero gradient)
    x, w, b, t = operands((11,), 16, 40, torch.float32, device)
    b[::3] = -math.inf
    t = torch.where(t % 3 == 0, t + 1, t)
    check(x, w, t, b.detach(), "both", chunk_size=4, temperature=0.9)
    lp, h = fl.linear_log_probs(x, w, t, linear_bias=b, return_entropy=True)
    assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(h).all())


@pytest.mark.parametrize(("n", "v", "device", "chunk"), [
    (8192, 128256, "cuda", 1024),  # an eighth of the tokens (1 GiB would hold 2,092)
    (16384, 151936, "cuda", 1766),  # the 1 GiB budget of float32 logits
    (512, 32000, "cuda", 512),  # fewer than 1,024 tokens: all of them, in budget
    (4096, 32000, "cpu", 512),  # an eighth (the CPU's 64 MiB: 524)
    (16384, 32000, "cpu", 524),  # the CPU's 64 MiB
])
def test_default_chunk(n, v, device, chunk):
    """The fewest chunks the memory rule allows: each one reads and writes the weight's
    float32 gradient once (fused_losses/log_probs.py's CHUNK_BYTES)."""
    from fused_losses.log_probs import _chunk

    assert _chunk(n, v, device, None) == chunk
