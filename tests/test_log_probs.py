"""fused_losses.log_probs (per-token log-probabilities and entropy of given logits) against
torch in float64, both backends.

The reference (``reference_log_probs``) is torch's ``log_softmax`` in float64 on the same
rounded logits, transformed as the issue defines it (scale, softcap, temperature), with the
entropy ``-sum p log p`` (a -inf logit adds 0): values, and the gradients from random
upstream gradients of the log-probabilities, of the entropy, and of both.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close, random_logits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_losses as fl


def reference_log_probs(logits, target, temperature=1.0, softcap=None, logit_scale=1.0,
                        ignore_index=-100):
    """(log p_y, entropy) in the logits' dtype (float64 for references): zero where the
    target is ignored. Written so that -inf logits give finite gradients (0 log 0 = 0)."""
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lsm = torch.log_softmax(z, -1)
    ok = target != ignore_index
    lp = lsm.gather(-1, torch.where(ok, target, 0).unsqueeze(-1)).squeeze(-1)
    p = lsm.exp()
    h = -(p * torch.where(p > 0, lsm, 0.0)).sum(-1)
    return torch.where(ok, lp, 0.0), torch.where(ok, h, 0.0)


def reference_extras(logits, target, temperature=1.0, softcap=None, logit_scale=1.0,
                     ignore_index=-100):
    """TRL 1.16's other per-token statistics in the logits' dtype (float64 for references):
    (log sum_c p_c^2, the mean transformed logit, whether the target is the first argmax),
    0 (False) where the target is ignored."""
    z = logits * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    ok = target != ignore_index
    log_sum_sq = torch.logsumexp(2 * torch.log_softmax(z, -1), -1)
    top1 = (z.argmax(-1) == target) & ok
    return torch.where(ok, log_sum_sq, 0.0), torch.where(ok, z.mean(-1), 0.0), top1


# every output TRL 1.16's ChunkedLogProbFunction offers
ALL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def check_extras(out, logits, target, **opts):
    """``out`` (a LogProbOutputs with every output) against ``reference_extras`` in float64
    on the same rounded logits: no gradient on the statistics, as TRL's."""
    ref_sq, ref_mean, ref_top1 = reference_extras(logits.detach().cpu().double(),
                                                  target.cpu(), **opts)
    assert out.log_sum_sq_probs.dtype == out.mean_logits.dtype == torch.float32
    assert out.is_top1.dtype == torch.bool
    for t in (out.log_sum_sq_probs, out.mean_logits, out.is_top1):
        assert t.shape == target.shape and not t.requires_grad
    assert_close(out.log_sum_sq_probs, ref_sq, torch.float32, "log_sum_sq_probs")
    # a plain sum of the logits: its rounding is relative to their size, not to the mean's
    z_size = (logits.detach().double().abs().max().item() * opts.get("logit_scale", 1.0)
              / opts.get("temperature", 1.0))
    assert_close(out.mean_logits, ref_mean, torch.float32, "mean_logits", terms=z_size)
    assert torch.equal(out.is_top1.cpu(), ref_top1)


def with_ties(logits, target):
    """Rows whose top-1 is decided by argmax's first maximum: in row 1 the target and a
    later class share the max (is_top1), in row 2 an earlier class and the target (not),
    in row 3 the target alone (is_top1). Returns new logits and targets."""
    logits, target = logits.clone(), target.clone()
    rows = logits.view(-1, logits.shape[-1])
    t = target.view(-1)
    n = rows.shape[-1]
    big = rows.abs().max() + 1
    for row, (first, second), y in ((1, (2, n - 1), 2), (2, (0, n - 2), n - 2),
                                    (3, (n // 2, n // 2), n // 2)):
        rows[row, first] = rows[row, second] = big
        t[row] = y
    return logits, target


UPSTREAMS = ("log_probs", "entropy", "both")


def upstream(shape, which: str, seed: int = 1):
    """float32 upstream gradients (of log p, of H; None where that output gets none), drawn
    in float64 and rounded to float32 so both sides see the same numbers."""
    g = torch.Generator().manual_seed(seed)
    g_lp = (torch.randn(shape, generator=g, dtype=torch.float64)).float()
    g_h = (torch.randn(shape, generator=g, dtype=torch.float64)).float()
    return (g_lp if which in ("log_probs", "both") else None,
            g_h if which in ("entropy", "both") else None)


def backward(lp, h, g_lp, g_h):
    outs = [(o, g) for o, g in ((lp, g_lp), (h, g_h)) if g is not None]
    torch.autograd.backward([o for o, _ in outs], [g.to(o.device, o.dtype) for o, g in outs])


def check(logits, target, which="both", terms=0.0, **opts):
    """Ours on the current backend against the float64 reference; returns ours. ``terms``:
    the size of terms that cancel (``_helpers.assert_close``)."""
    x = logits.detach().clone().requires_grad_(True)
    lp, h = fl.log_probs(x, target, return_entropy=True, **opts)
    assert lp.dtype == h.dtype == torch.float32
    assert lp.shape == h.shape == target.shape
    g_lp, g_h = upstream(target.shape, which)
    backward(lp, h, g_lp, g_h)
    ref_x = logits.detach().cpu().double().requires_grad_(True)
    ref_lp, ref_h = reference_log_probs(ref_x, target.cpu(), **opts)
    backward(ref_lp, ref_h, None if g_lp is None else g_lp.double(),
             None if g_h is None else g_h.double())
    assert_close(lp, ref_lp, torch.float32, "log_probs", terms=terms)
    assert_close(h, ref_h, torch.float32, "entropy", terms=terms)
    assert x.grad.dtype == logits.dtype
    assert_close(x.grad, ref_x.grad, logits.dtype, f"d out / d logits ({which})", terms=terms)
    return lp, h


OPTIONS = {
    "plain": dict(),
    "temperature": dict(temperature=0.7),
    "softcap and temperature": dict(softcap=5.0, temperature=1.3),
    "ignore_index 0": dict(ignore_index=0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", UPSTREAMS)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_values_and_gradients(backend, device, dtype, which, case):
    # K-dimensional leading shape (batch, sequence); 203 classes (not a power of 2); some
    # targets ignored
    logits = random_logits((3, 7, 203), dtype, device)
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 203, (3, 7), generator=g)
    target[0, ::3] = OPTIONS[case].get("ignore_index", -100)
    check(logits, target.to(device), which, **OPTIONS[case])


def test_ignored_targets_give_zero_and_no_gradient(backend, device):
    logits = random_logits((4, 50), torch.float32, device).requires_grad_(True)
    target = torch.tensor([3, -100, 7, -100], device=device)
    lp, h = fl.log_probs(logits, target, return_entropy=True)
    (lp.sum() + h.sum()).backward()
    assert torch.equal(lp[1::2].cpu(), torch.zeros(2)) and torch.equal(h[1::2].cpu(),
                                                                       torch.zeros(2))
    assert torch.equal(logits.grad[1::2].cpu(), torch.zeros(2, 50))
    assert bool((logits.grad[::2] != 0).any())


@pytest.mark.parametrize("which", UPSTREAMS)
def test_long_rows(backend, device, which):
    # more classes than a program holds in registers: the row looped over blocks, its
    # statistics merged (b included), the gradient written by 4096-class blocks
    logits = random_logits((2, 40000), torch.bfloat16, device)
    check(logits, torch.tensor([5, 39999], device=device), which, temperature=0.8)


def test_confident_rows_keep_their_digits(backend, device):
    # p_y = 1 - 6.1e-4: in bfloat16 p_y is 1 and the gradient g (p_y - 1) would vanish (the
    # peers' bfloat16 logits); formed in float32 it keeps float32's absolute precision (the
    # terms that cancel are p_y and 1: terms=1), and so do log p_y and the entropy
    target = torch.tensor([3, 50, 99])
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.zeros(3, 100, dtype=dtype)
        logits[torch.arange(3), target] = 12.0
        check(logits.to(device), target.to(device), "both", terms=1.0)
        x = logits.to(device).requires_grad_(True)
        fl.log_probs(x, target.to(device)).sum().backward()
        expected = -99 / (math.exp(12) + 99)  # p_y - 1
        got = x.grad[torch.arange(3), target].double().cpu()
        assert torch.allclose(-got, torch.full_like(got, expected), rtol=2**-7), got


def test_minus_infinity_logits(backend, device):
    # masked vocabulary entries (-inf): they add 0 to the entropy and get a zero gradient
    logits = random_logits((4, 33), torch.float32, "cpu")
    logits[:, ::4] = -math.inf
    target = torch.tensor([1, 2, 3, 5])
    lp, h = check(logits.to(device), target.to(device), "both", temperature=0.5)
    assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(h).all())


def test_non_finite_rows_give_nan_as_torch(backend, device):
    # a NaN logit, a +inf logit, a row of -inf logits: torch's log_softmax is NaN there, and
    # so is every output and the row's gradient (a NaN must not be hidden as ln C, 0 or a
    # finite gradient); the finite row alongside is untouched
    logits = random_logits((4, 6), torch.float32, "cpu")
    logits[0, 2] = math.nan
    logits[1, 0] = math.inf
    logits[2] = -math.inf
    target = torch.tensor([1, 0, 1, 3])
    x = logits.clone().to(device).requires_grad_(True)
    out = fl.log_probs(x, target.to(device), outputs=("entropy", "log_sum_sq_probs"))
    g_lp, g_h = upstream((4,), "both")
    backward(out.log_probs, out.entropy, g_lp, g_h)
    ref_x = logits.clone().double().requires_grad_(True)
    ref_lp, ref_h = reference_log_probs(ref_x, target)
    backward(ref_lp, ref_h, g_lp.double(), g_h.double())
    for name, got in (("log_probs", out.log_probs), ("entropy", out.entropy),
                      ("log_sum_sq_probs", out.log_sum_sq_probs)):
        assert bool(got[:3].isnan().all()), (name, got)
        assert bool(got[3].isfinite()), (name, got)
    assert bool(ref_x.grad[:3].isnan().all())
    assert bool(x.grad[:3].isnan().all()), x.grad
    assert_close(x.grad[3], ref_x.grad[3], torch.float32, "the finite row's gradient")


def test_bounds(backend, device):
    # log p <= 0 and 0 <= H <= log C, exactly: uniform rows (H = log C, where a float32 sum
    # of C equal terms rounds above it), one-hot rows (H = 0, log p = 0), random rows
    n_classes = 1000
    logits = torch.cat([torch.zeros(2, n_classes), torch.full((2, n_classes), 7.25),
                        random_logits((4, n_classes), torch.float32, "cpu", scale=8.0)])
    logits[1, 0] = 200.0  # p_0 = 1 in float32
    target = torch.tensor([0, 0, 999, 5, 1, 2, 3, 4])
    lp, h = fl.log_probs(logits.to(device), target.to(device), return_entropy=True)
    assert bool((lp <= 0).all()) and bool((h >= 0).all())
    assert bool((h.double() <= math.log(n_classes)).all())
    assert lp[1].item() == 0.0 and h[1].item() == 0.0


def test_no_grad_and_entropy_without_gradient(backend, device):
    logits = random_logits((5, 64), torch.float32, device).requires_grad_(True)
    target = torch.arange(5, device=device)
    with torch.no_grad():
        lp, h = fl.log_probs(logits, target, return_entropy=True)
    assert lp.grad_fn is None and h.grad_fn is None
    # the entropy logged, not trained on: the gradient is the log-probabilities' alone
    lp, h = fl.log_probs(logits, target, return_entropy=True)
    lp.sum().backward()
    ref = logits.detach().cpu().double().requires_grad_(True)
    reference_log_probs(ref, target.cpu())[0].sum().backward()
    assert_close(logits.grad, ref.grad, torch.float32, "d log p / d logits")
    assert torch.equal(fl.log_probs(logits, target), lp)


def test_outputs_modified_in_place(backend, device):
    # an RL loop masks its per-token results in place (lp.masked_fill_, h.mul_(mask)): legal
    # on torch's formula, so the backward must not read the outputs the caller was handed
    logits = random_logits((2, 3, 9), torch.float32, device)
    target = torch.tensor([[1, 4, 8], [0, 2, 5]], device=device)
    mask = torch.tensor([[True, True, False], [True, False, True]], device=device)

    def masked(fn, x):
        x = x.detach().clone().requires_grad_(True)
        lp, h = fn(x)
        lp.masked_fill_(~mask, 0.0)
        h.mul_(mask)
        (lp.sum() * 2 + h.sum()).backward()
        return x.grad

    got = masked(lambda x: fl.log_probs(x, target, return_entropy=True, temperature=0.8),
                 logits)
    want = masked(lambda x: reference_log_probs(x, target.cpu(), temperature=0.8),
                  logits.cpu().double())
    assert_close(got, want, torch.float32, "d out / d logits (outputs masked in place)")


def test_double_backward(backend, device):
    logits = random_logits((3, 11), torch.float32, device)
    target = torch.tensor([1, 4, 10], device=device)
    v = torch.randn(3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def hvp(fn, x, t):
        x = x.detach().clone().requires_grad_(True)
        lp, h = fn(x, t)
        (g,) = torch.autograd.grad((lp * 0.5 + h).sum(), x, create_graph=True)
        (g * v.to(x.dtype).to(x.device)).sum().backward()
        return g.detach(), x.grad

    g, hv = hvp(lambda x, t: fl.log_probs(x, t, temperature=0.9, return_entropy=True),
                logits, target)
    ref_g, ref_hv = hvp(lambda x, t: reference_log_probs(x, t, temperature=0.9),
                        logits.double().cpu(), target.cpu())
    # torch's own float32 second derivative (its autograd through the same formula): twice
    # its error allowed (second derivatives cancel: ~1e-4 relative on small entries)
    _, own_hv = hvp(lambda x, t: reference_log_probs(x, t, temperature=0.9),
                    logits.float().cpu(), target.cpu())
    assert_close(g, ref_g, torch.float32, "gradient")
    assert_close(hv, ref_hv, torch.float32, "Hessian-vector product", torch_own=own_hv)


def test_return_types(backend, device):
    logits = random_logits((2, 3, 9), torch.float32, device)
    target = torch.zeros(2, 3, dtype=torch.int64, device=device)
    out = fl.log_probs(logits, target, return_entropy=True)
    assert isinstance(out, fl.LogProbs) and out.log_probs.shape == (2, 3)
    assert fl.log_probs(logits, target).shape == (2, 3)
    # one row of (C,) logits and a 0-d target
    lp = fl.log_probs(logits[0, 0], target[0, 0])
    assert lp.shape == ()
    # int32 targets
    assert torch.equal(fl.log_probs(logits, target.int()), fl.log_probs(logits, target))


def test_against_trl(backend, device):
    # TRL's own functions on the same float32 logits: selective_log_softmax(logits / T),
    # entropy_from_logits(logits / T)
    utils = pytest.importorskip("trl.trainer.utils")
    logits = random_logits((2, 6, 300), torch.float32, "cpu")
    target = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    lp, h = fl.log_probs(logits.to(device), target.to(device), temperature=0.7,
                         return_entropy=True)
    theirs_lp = utils.selective_log_softmax(logits / 0.7, target)
    theirs_h = utils.entropy_from_logits(logits / 0.7)
    torch.testing.assert_close(lp.cpu(), theirs_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.cpu(), theirs_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_requested_outputs(backend, device, dtype, case):
    # TRL's other per-token statistics (outputs=): values against float64, ties of the
    # top-1, ignored targets 0 (False); log p, the entropy and their gradients as without
    # them
    opts = OPTIONS[case]
    g = torch.Generator().manual_seed(3)
    logits, target = with_ties(random_logits((3, 7, 203), dtype, "cpu"),
                               torch.randint(0, 203, (3, 7), generator=g))
    target.view(-1)[5] = logits.view(-1, 203)[5].argmax()  # a top-1 without a tie
    target[0, ::3] = opts.get("ignore_index", -100)
    logits, target = logits.to(device), target.to(device)
    x = logits.detach().clone().requires_grad_(True)
    out = fl.log_probs(x, target, outputs=ALL_OUTPUTS, **opts)
    assert isinstance(out, fl.LogProbOutputs)
    check_extras(out, logits, target, **opts)
    assert bool(out.is_top1.any()) and not bool(out.is_top1[0, ::3].any())
    g_lp, g_h = upstream(target.shape, "both")
    backward(out.log_probs, out.entropy, g_lp, g_h)
    lp, h = check(logits, target, "both", **opts)  # the same pass without the statistics
    assert torch.equal(out.log_probs, lp.detach()) and torch.equal(out.entropy, h.detach())


def test_requested_outputs_long_rows(backend, device):
    # rows looped over blocks (> ROW_BLOCK classes): q merged with the squared rescale, the
    # sum added, the first argmax across blocks (a tie in blocks 0 and 4: the earlier wins)
    logits = random_logits((4, 40000), torch.bfloat16, "cpu")
    target = torch.tensor([5, 39999, 20000, 100])
    logits[2, 100] = logits[2, 39000] = 30.0  # row 2: a tie, the target neither
    logits[3, 100] = logits[3, 39000] = 30.0  # row 3: the target the first of a tie
    logits[1, 39999] = 40.0  # row 1: the target alone, in the last block
    out = fl.log_probs(logits.to(device), target.to(device), outputs=ALL_OUTPUTS,
                       temperature=0.8, softcap=30.0)
    check_extras(out, logits, target, temperature=0.8, softcap=30.0)
    assert out.is_top1.tolist() == [False, True, False, True]


def test_requested_outputs_bounds(backend, device):
    # log sum p^2: -log C for a uniform row, 0 for a one-hot one, in [-log C, 0] otherwise;
    # the mean of -inf logits (a masked vocabulary) is -inf, as the plain sum's
    n_classes = 1000
    logits = torch.cat([torch.zeros(1, n_classes), torch.zeros(1, n_classes),
                        random_logits((3, n_classes), torch.float32, "cpu", scale=8.0)])
    logits[1, 3] = 200.0  # p_3 = 1 in float32
    logits[4, ::2] = -math.inf
    target = torch.tensor([0, 3, 5, 6, 7])
    out = fl.log_probs(logits.to(device), target.to(device), outputs=ALL_OUTPUTS)
    sq = out.log_sum_sq_probs.double().cpu()
    assert bool((sq <= 0).all()) and bool((sq >= -math.log(n_classes) - 1e-6).all())
    assert abs(sq[0].item() + math.log(n_classes)) < 1e-5 and sq[1].item() == 0.0
    assert out.is_top1[1].item() and out.mean_logits[4].item() == -math.inf
    check_extras(out, logits, target)


def test_requested_outputs_against_trl(backend, device):
    # TRL 1.16's ChunkedLogProbFunction, every output, on the same float32 logits (as
    # hidden states times an identity head, exact); its wrapper zeroes ignored positions
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    n, c = 12, 96
    logits, target = with_ties(random_logits((n, c), torch.float32, "cpu"),
                               torch.randint(0, c, (n,), generator=torch.Generator()
                                             .manual_seed(5)))
    target[7] = logits[7].argmax()
    target[4] = -100
    ok = target != -100
    for temperature, softcap in ((0.7, None), (1.3, 5.0)):
        theirs = chunked.ChunkedLogProbFunction.apply(
            logits, torch.eye(c), None, target.clamp(min=0), temperature, 32, softcap, 1.0,
            chunked.OPTIONAL_OUTPUTS)
        theirs = [t.masked_fill(~ok, 0) for t in theirs]
        out = fl.log_probs(logits.to(device), target.to(device), temperature=temperature,
                           softcap=softcap, outputs=ALL_OUTPUTS)
        assert out._fields == ("log_probs", *chunked.OPTIONAL_OUTPUTS)
        assert bool(out.is_top1.any())
        for name, mine, theirs_t in zip(out._fields, out, theirs, strict=True):
            assert mine.dtype == theirs_t.dtype, name
            torch.testing.assert_close(mine.cpu(), theirs_t, rtol=1e-5, atol=1e-5, msg=name)


def test_requested_outputs_api(backend, device):
    logits = random_logits((2, 3, 9), torch.float32, device).requires_grad_(True)
    target = torch.tensor([[0, 1, 2], [3, -100, 5]], device=device)
    # only what is asked: None for the rest; "log_probs" may be named (TRL's tuples)
    out = fl.log_probs(logits, target, outputs=("log_probs", "is_top1"))
    assert isinstance(out, fl.LogProbOutputs)
    assert out.entropy is None and out.log_sum_sq_probs is None and out.mean_logits is None
    assert out.is_top1.dtype == torch.bool and not out.is_top1[1, 1].item()
    assert torch.equal(out.log_probs, fl.log_probs(logits, target))
    # return_entropy=True with outputs: the entropy too; any order, a list or a set
    out = fl.log_probs(logits, target, return_entropy=True, outputs=["mean_logits"])
    assert out.entropy is not None and out.mean_logits is not None and out.is_top1 is None
    assert fl.log_probs(logits, target, outputs={"is_top1", "entropy"}).entropy is not None
    assert fl.log_probs(logits, target, outputs=()).entropy is None
    # the statistics have no gradient (marked so); log p's and the entropy's flow
    out = fl.log_probs(logits, target, outputs=ALL_OUTPUTS)
    assert out.log_probs.requires_grad and out.entropy.requires_grad
    assert not (out.log_sum_sq_probs.requires_grad or out.mean_logits.requires_grad)
    (out.log_probs.sum() + out.entropy.sum()).backward()
    assert logits.grad is not None
    with torch.no_grad():
        assert fl.log_probs(logits, target, outputs=ALL_OUTPUTS).entropy.grad_fn is None
    with pytest.raises(ValueError, match="unknown output 'accuracy'"):
        fl.log_probs(logits, target, outputs=("accuracy",))
    with pytest.raises(TypeError, match="tuple of names"):
        fl.log_probs(logits, target, outputs="entropy")


BAD = {
    "target shape": (lambda d: (torch.randn(3, 5, device=d), torch.zeros(4, dtype=torch.int64,
                                                                         device=d)),
                     {}, ValueError, "expected target of shape"),
    "float target": (lambda d: (torch.randn(3, 5, device=d), torch.zeros(3, device=d)), {},
                     RuntimeError, "integer tensor"),
    "integer logits": (lambda d: (torch.ones(3, 5, dtype=torch.int64, device=d),
                                  torch.zeros(3, dtype=torch.int64, device=d)), {},
                       RuntimeError, "floating-point logits"),
    "temperature 0": (lambda d: (torch.randn(3, 5, device=d),
                                 torch.zeros(3, dtype=torch.int64, device=d)),
                      {"temperature": 0.0}, ValueError, "temperature"),
    "softcap -1": (lambda d: (torch.randn(3, 5, device=d),
                              torch.zeros(3, dtype=torch.int64, device=d)),
                   {"softcap": -1.0}, ValueError, "softcap"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_errors(backend, device, case):
    make, kwargs, error, words = BAD[case]
    with pytest.raises(error, match=words):
        fl.log_probs(*make(device), **kwargs)


def test_target_out_of_range_cpu(backend):
    # torch's words on the CPU (the values are read there: no sync)
    with pytest.raises(IndexError, match="Target 5 is out of bounds."):
        fl.log_probs(torch.randn(3, 5), torch.tensor([0, 5, 1]))


@pytest.mark.cuda
def test_target_out_of_range_cuda_gives_nan():
    lp, h = fl.log_probs(torch.randn(3, 5, device="cuda"),
                         torch.tensor([0, 5, 1], device="cuda"), return_entropy=True)
    assert bool(lp[1].isnan()) and bool(h[1].isnan()) and bool(lp[0::2].isfinite().all())


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.sampled_from([(1, 1), (3, 2), (17, 1), (2, 3, 4)]),
    n_classes=st.sampled_from([1, 2, 31, 257]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    which=st.sampled_from(UPSTREAMS),
    temperature=st.sampled_from([1.0, 0.6, 2.0]),
    softcap=st.sampled_from([None, 4.0]),
    strided=st.booleans(),
)
def test_hypothesis(backend, device, shape, n_classes, dtype, which, temperature, softcap,
                    strided):
    # strided: the logits a causal LM shifts (x[..., :-1, :]) or a class slice of a wider
    # row, read without a copy
    wide = random_logits((*shape[:-1], shape[-1] + 1, n_classes + 3), dtype, device, seed=2)
    logits = (wide[..., 1:, :n_classes] if strided
              else random_logits((*shape, n_classes), dtype, device, seed=2))
    g = torch.Generator().manual_seed(4)
    target = torch.randint(0, n_classes, shape, generator=g)
    target.view(-1)[::5] = -100
    check(logits, target.to(device), which, temperature=temperature, softcap=softcap)
    # TRL's other statistics on the same layouts (one class, two, strided views, float16)
    out = fl.log_probs(logits, target.to(device), temperature=temperature, softcap=softcap,
                       outputs=ALL_OUTPUTS)
    check_extras(out, logits, target, temperature=temperature, softcap=softcap)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend, device, compiler):
    # no graph break: validation, dispatch, the Function (the CPU's interpreted launches as
    # the opaque op), the entropy's bound a constant
    torch._dynamo.reset()
    logits = random_logits((2, 5, 40), torch.bfloat16, device)
    target = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(2))
    target[0, 1] = -100
    fn = torch.compile(lambda x, t: fl.log_probs(x, t, temperature=0.7, softcap=8.0,
                                                 return_entropy=True),
                       backend=compiler, fullgraph=True)
    x = logits.detach().clone().requires_grad_(True)
    lp, h = fn(x, target.to(device))
    g_lp, g_h = upstream(target.shape, "both")
    backward(lp, h, g_lp, g_h)
    ref_x = logits.detach().cpu().double().requires_grad_(True)
    ref_lp, ref_h = reference_log_probs(ref_x, target, temperature=0.7, softcap=8.0)
    backward(ref_lp, ref_h, g_lp.double(), g_h.double())
    assert_close(lp, ref_lp, torch.float32, "log_probs")
    assert_close(h, ref_h, torch.float32, "entropy")
    assert_close(x.grad, ref_x.grad, torch.bfloat16, "d out / d logits")
    torch._dynamo.reset()


def test_torch_compile_fullgraph_requested_outputs(backend, device):
    # the requested statistics too: the Function's optional outputs, the bool one
    torch._dynamo.reset()
    logits = random_logits((2, 5, 40), torch.float32, device)
    target = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(2))
    target[0, 1] = -100
    fn = torch.compile(lambda x, t: fl.log_probs(x, t, temperature=0.7, outputs=ALL_OUTPUTS),
                       backend="aot_eager", fullgraph=True)
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, target.to(device))
    check_extras(out, logits, target, temperature=0.7)
    g_lp, g_h = upstream(target.shape, "both")
    backward(out.log_probs, out.entropy, g_lp, g_h)
    ref_x = logits.detach().cpu().double().requires_grad_(True)
    ref_lp, ref_h = reference_log_probs(ref_x, target, temperature=0.7)
    backward(ref_lp, ref_h, g_lp.double(), g_h.double())
    assert_close(out.log_probs, ref_lp, torch.float32, "log_probs")
    assert_close(x.grad, ref_x.grad, torch.float32, "d out / d logits")
    torch._dynamo.reset()
