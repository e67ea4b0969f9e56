"""fused_losses.distillation_loss and linear_distillation_loss against float64, both backends.

The reference (``reference``) is TRL's ``generalized_jsd_loss`` written in float64 with the
``0 log 0 = 0`` convention guarded (TRL's own formula gives NaN where a probability is 0; on
finite logits the two agree, which ``test_against_trl`` checks on TRL's function itself).
Values and the student's gradients (of the logits; of the input, the weight and the bias for
the LM heads) from random upstream gradients, every ``beta`` in {0, 0.3, 0.5, 1}, every
reduction; in bfloat16 twice torch's own bfloat16 error is allowed on top.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close
from test_linear_cross_entropy import LargestTensor

import fused_losses as fl

BETAS = (0.0, 0.3, 0.5, 1.0)
REDUCTIONS = ("batchmean", "sum", "mean", "none")


# ------------------------------------------------------------------------------------------
# the float64 reference
# ------------------------------------------------------------------------------------------


def _head(x, temperature, softcap=None, logit_scale=1.0):
    x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def _p_log_ratio(lp, lq):
    """sum p (log p - log q), each term 0 where p = 0 (and back-propagating 0)."""
    p = lp.exp()
    pos = p > 0
    return (p * (torch.where(pos, lp, 0.0) - torch.where(pos, lq, 0.0))).sum(-1)


def reference(s, t, target=None, *, beta=0.5, temperature=1.0, ignore_index=-100,
              reduction="batchmean", num_items_in_batch=None, student_softcap=None,
              teacher_softcap=None, student_logit_scale=1.0, teacher_logit_scale=1.0):
    ls = torch.log_softmax(_head(s, temperature, student_softcap, student_logit_scale), -1)
    lt = torch.log_softmax(_head(t, temperature, teacher_softcap, teacher_logit_scale), -1)
    if beta == 0:
        jsd = _p_log_ratio(lt, ls)
    elif beta == 1:
        jsd = _p_log_ratio(ls, lt)
    else:
        some = (ls > -math.inf) | (lt > -math.inf)  # (a class neither has: no logaddexp)
        mix = torch.logaddexp(torch.where(some, ls, 0.0) + math.log1p(-beta),
                              torch.where(some, lt, 0.0) + math.log(beta))
        jsd = beta * _p_log_ratio(lt, mix) + (1 - beta) * _p_log_ratio(ls, mix)
    mask = torch.ones(jsd.shape, dtype=torch.bool) if target is None else target != ignore_index
    jsd = torch.where(mask, jsd, 0.0)
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "none":
        return jsd
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.sum() / (mask.sum() * s.shape[-1])
    if target is not None:
        return jsd.sum() / mask.sum().clamp_min(1)
    return jsd.sum() / max(s.shape[0], 1)


def linear_reference(xs, ws, xt, wt, target=None, *, student_bias=None, teacher_bias=None,
                     chunk_size=None, **opts):
    return reference(F.linear(xs, ws, student_bias), F.linear(xt, wt, teacher_bias), target,
                     **opts)


# ------------------------------------------------------------------------------------------
# operands and the comparison
# ------------------------------------------------------------------------------------------


def targets(lead, v, g, ignore=0.2):
    t = torch.randint(0, v, lead, generator=g)
    return torch.where(torch.rand(lead, generator=g) < ignore, -100, t)


def logits_operands(lead, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, v, generator=g, dtype=torch.float64) * 2.0
    t = s * 0.7 + torch.randn(*lead, v, generator=g, dtype=torch.float64) * 1.5
    return s.to(dtype).to(device), t.to(dtype).to(device), targets(lead, v, g).to(device)


def head_operands(lead, h_s, h_t, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    xs, ws, bs = make(*lead, h_s), make(v, h_s, std=2 / math.sqrt(h_s)), make(v, std=0.3)
    xt, wt, bt = make(*lead, h_t), make(v, h_t, std=2 / math.sqrt(h_t)), make(v, std=0.3)
    return xs, ws, bs, xt, wt, bt, targets(lead, v, g).to(device)


def grads_of(fn, leaves, others, kwargs, seed=3):
    """fn's output and the gradients of ``leaves`` (fresh leaf copies) from a random upstream
    gradient."""
    leaves = [v.detach().clone().requires_grad_(True) for v in leaves]
    out = fn(*leaves, *others, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    (out * g.to(out.dtype).to(out.device)).sum().backward()
    return out.detach(), [v.grad for v in leaves]


def wide(v):
    return None if v is None else v.detach().cpu().double()


def check_logits(s, t, target, **opts):
    out, (grad,) = grads_of(fl.distillation_loss, [s], [t, target], opts)
    assert out.dtype == torch.promote_types(s.dtype, torch.float32)
    ref, (ref_grad,) = grads_of(reference, [wide(s)], [wide(t), wide(target)], opts)
    own = None
    if s.dtype != torch.float32:  # torch's own formula in the logits' dtype (TRL's)
        own = grads_of(reference, [s.detach().cpu()], [t.cpu(), wide(target)], opts)[1][0]
    assert_close(out, ref, out.dtype, "loss")  # float32 math, a float32 result
    assert grad.dtype == s.dtype
    assert_close(grad, ref_grad, s.dtype, "d loss / d student_logits", torch_own=own)


def check_heads(xs, ws, bs, xt, wt, bt, target, **opts):
    kwargs = dict(opts, teacher_bias=bt)
    leaves = [xs, ws] + ([bs] if bs is not None else [])

    def ours(xs, ws, bs=None, *, xt, wt, target, **kw):
        return fl.linear_distillation_loss(xs, ws, xt, wt, target, student_bias=bs, **kw)

    def ref(xs, ws, bs=None, *, xt, wt, target, **kw):
        return linear_reference(xs, ws, xt, wt, target, student_bias=bs, **kw)

    out, grads = grads_of(ours, leaves, [], dict(kwargs, xt=xt, wt=wt, target=target))
    assert out.dtype == torch.promote_types(xs.dtype, torch.float32)
    ref_out, ref_grads = grads_of(ref, [wide(v) for v in leaves], [],
                                  dict(kwargs, teacher_bias=wide(bt), xt=wide(xt),
                                       wt=wide(wt), target=wide(target)))
    own = [None] * len(leaves)
    if xs.dtype != torch.float32:
        own = grads_of(ref, [v.detach().cpu() for v in leaves], [],
                       dict(kwargs, teacher_bias=None if bt is None else bt.cpu(),
                            xt=xt.cpu(), wt=wt.cpu(), target=target.cpu()))[1]
    # the loss: float32 math on the rounded operands (their float32 GEMMs), float32
    assert_close(out, ref_out, out.dtype, "loss")
    for name, got, want, own_g, v in zip(("input", "weight", "bias"), grads, ref_grads, own,
                                         leaves, strict=False):
        assert got.dtype == v.dtype
        assert_close(got, want, xs.dtype, f"d loss / d student {name}", torch_own=own_g)


# ------------------------------------------------------------------------------------------
# values and gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logits(backend, device, beta, reduction):
    s, t, target = logits_operands((3, 5), 37, torch.float32, device)
    check_logits(s, t, target, beta=beta, temperature=1.7, reduction=reduction)
    check_logits(s, t, None, beta=beta, reduction=reduction)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_heads(backend, device, beta, reduction):
    # different hidden sizes, biases, chunks of 4 of 15 tokens
    xs, ws, bs, xt, wt, bt, target = head_operands((3, 5), 12, 20, 37, torch.float32, device)
    check_heads(xs, ws, bs, xt, wt, bt, target, beta=beta, temperature=2.0,
                reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("beta", BETAS)
def test_bfloat16(backend, device, beta):
    s, t, target = logits_operands((40,), 300, torch.bfloat16, device)
    check_logits(s, t, target, beta=beta, temperature=0.9)
    xs, ws, bs, xt, wt, bt, target = head_operands((40,), 32, 48, 300, torch.bfloat16,
                                                   device)
    check_heads(xs, ws, bs, xt, wt, bt, target, beta=beta, chunk_size=16)


def test_head_options(backend, device):
    # each head's softcap and logit scale, no biases, a 1-D input (one position)
    xs, ws, _, xt, wt, _, target = head_operands((9,), 10, 14, 23, torch.float32, device)
    opts = dict(beta=0.4, temperature=0.8, student_softcap=3.0, teacher_softcap=5.0,
                student_logit_scale=0.7, teacher_logit_scale=1.5, chunk_size=2)
    check_heads(xs, ws, None, xt, wt, None, target, **opts)
    check_heads(xs[0], ws, None, xt[0], wt, None, target[0].clamp(min=0), **opts)


@pytest.mark.parametrize("items", [7, "tensor"])
def test_num_items_in_batch(backend, device, items):
    items = torch.tensor(7, device=device) if items == "tensor" else items
    s, t, target = logits_operands((2, 6), 19, torch.float32, device)
    for reduction in ("batchmean", "none"):  # the sum over it, whatever the reduction
        check_logits(s, t, target, beta=0.5, num_items_in_batch=items, reduction=reduction)
    xs, ws, bs, xt, wt, bt, target = head_operands((2, 6), 8, 8, 19, torch.float32, device)
    check_heads(xs, ws, bs, xt, wt, bt, target, beta=0.0, num_items_in_batch=items,
                chunk_size=5)


def test_against_trl(backend, device):
    # TRL's own generalized_jsd_loss on the same float64 logits: every beta and reduction,
    # with and without labels (TRL's "none" is element-wise: ours sums it over the classes)
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t, target = logits_operands((2, 5), 13, torch.float64, "cpu")
    for beta in BETAS:
        for reduction in REDUCTIONS:
            for labels in (None, target):
                kw = dict(beta=beta, temperature=2.0, reduction=reduction)
                theirs, (their_grad,) = grads_of(
                    lambda s, t, y, **k: _summed(gkd.GKDTrainer.generalized_jsd_loss(
                        s, t, y, **k), k["reduction"], y), [s], [t, labels], kw)
                mine, (my_grad,) = grads_of(
                    fl.distillation_loss, [s.to(device)], [t.to(device),
                                                           _on(labels, device)], kw)
                if reduction == "none" and labels is not None:
                    mine = mine.cpu()[labels != -100]  # TRL keeps the counted positions only
                    theirs = theirs.view(-1)
                    my_grad = their_grad = None
                torch.testing.assert_close(mine.cpu(), theirs, rtol=1e-10, atol=1e-12)
                if my_grad is not None:
                    torch.testing.assert_close(my_grad.cpu(), their_grad, rtol=1e-10,
                                               atol=1e-12)


def _summed(jsd, reduction, labels):
    return jsd.sum(-1) if reduction == "none" else jsd


def _on(t, device):
    return None if t is None else t.to(device)


def test_against_trl_chunked_divergence(backend, device):
    # TRL 1.16's ChunkedDivergenceFunction (its per-token divergence, the CPU path) on the
    # same float32 heads: the summed loss and the student's gradients
    chunked = pytest.importorskip("trl.kernels.chunked_divergence")
    xs, ws, bs, xt, wt, bt, _ = head_operands((24,), 16, 24, 90, torch.float32, "cpu")
    for beta in BETAS:
        leaves = [v.clone().requires_grad_(True) for v in (xs, ws, bs)]
        div, _ = chunked.ChunkedDivergenceFunction.apply(*leaves, xt, wt, bt, beta, 1.5)
        div.sum().backward()
        theirs = [div.sum().detach(), *(v.grad for v in leaves)]
        mine_leaves = [v.clone().to(device).requires_grad_(True) for v in (xs, ws, bs)]
        out = fl.linear_distillation_loss(*mine_leaves[:2], xt.to(device), wt.to(device),
                                          student_bias=mine_leaves[2],
                                          teacher_bias=bt.to(device), beta=beta,
                                          temperature=1.5, reduction="sum")
        out.backward()
        mine = [out.detach(), *(v.grad for v in mine_leaves)]
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=2e-4, atol=2e-5)


# ------------------------------------------------------------------------------------------
# operand layouts: every tensor argument strided, sliced or with transposed storage
# ------------------------------------------------------------------------------------------


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (a 1-D or 2-D leaf's values) as a leaf of another layout: ``transposed``
    storage, ``sliced`` (every other column of a wider tensor; every other element of a
    vector), ``strided`` rows (every other row of a taller one)."""
    needs_grad, t = t.requires_grad, t.detach()
    if layout == "contiguous":
        out = t.clone()
    elif layout == "transposed" and t.dim() == 2:
        out = t.t().contiguous().t()
    elif layout == "sliced" or (layout == "transposed" and t.dim() == 1):
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        out = wide[..., ::2]
    else:  # strided rows
        tall = torch.zeros(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
        tall[::2] = t
        out = tall[::2]
    assert torch.equal(out, t) and (layout == "contiguous" or not out.is_contiguous())
    return out.requires_grad_(needs_grad)


LAYOUTS = ("transposed", "sliced", "strided")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_logits(backend, device, layout):
    s, t, target = logits_operands((9,), 17, torch.float32, device)
    for reduction in ("sum", "none"):
        leaf = _laid_out(s.requires_grad_(True), layout)
        out = fl.distillation_loss(leaf, _laid_out(t, layout), _laid_out(target, layout),
                                   beta=0.3, temperature=1.5, reduction=reduction)
        out.sum().backward()
        ref_s = wide(s).requires_grad_(True)
        ref = reference(ref_s, wide(t), wide(target), beta=0.3, temperature=1.5,
                        reduction=reduction)
        ref.sum().backward()
        assert_close(out, ref, torch.float32, f"loss ({layout}, {reduction})")
        assert_close(leaf.grad, ref_s.grad, torch.float32, f"gradient ({layout})")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_heads(backend, device, layout):
    xs, ws, bs, xt, wt, bt, target = head_operands((11,), 6, 10, 19, torch.float32, device)
    for reduction in ("batchmean", "none"):
        leaves = [_laid_out(v.requires_grad_(True), layout) for v in (xs, ws, bs)]
        out = fl.linear_distillation_loss(
            leaves[0], leaves[1], _laid_out(xt, layout), _laid_out(wt, layout),
            _laid_out(target, layout), student_bias=leaves[2],
            teacher_bias=_laid_out(bt, layout), beta=0.5, reduction=reduction, chunk_size=4)
        out.sum().backward()
        refs = [wide(v).requires_grad_(True) for v in (xs, ws, bs)]
        ref = linear_reference(refs[0], refs[1], wide(xt), wide(wt), wide(target),
                               student_bias=refs[2], teacher_bias=wide(bt), beta=0.5,
                               reduction=reduction)
        ref.sum().backward()
        assert_close(out, ref, torch.float32, f"loss ({layout}, {reduction})")
        for name, leaf, r in zip(("input", "weight", "bias"), leaves, refs, strict=True):
            assert_close(leaf.grad, r.grad, torch.float32, f"d / d {name} ({layout})")


# ------------------------------------------------------------------------------------------
# corners: probabilities of 0, ignored positions, no grad, second derivatives
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
def test_masked_vocabulary_and_underflow(backend, device, beta):
    # -inf logits (a padded vocabulary: both heads; one class of one head), and rows whose
    # probabilities underflow float32 (logits spread over thousands): finite wherever the
    # truth is, never a NaN from 0 log 0
    s, t, target = logits_operands((6,), 29, torch.float32, device)
    s, t = s.clone(), t.clone()
    s[:, -4:] = t[:, -4:] = -math.inf
    (t if beta < 1 else s)[:, 3] = -math.inf  # (where the other side's 0 is harmless)
    s[0] *= 800.0
    t[1] *= 900.0
    for reduction in ("sum", "none"):
        check_logits(s, t, target, beta=beta, reduction=reduction)
    out = fl.distillation_loss(s.requires_grad_(True), t, target, beta=beta, reduction="none")
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(s.grad).all())
    assert bool((s.grad[:, -4:] == 0).all())
    xs, ws, bs, xt, wt, bt, target = head_operands((6,), 8, 8, 29, torch.float32, device)
    bs, bt = bs.clone(), bt.clone()
    bs[-4:] = bt[-4:] = -math.inf
    check_heads(xs, ws, bs.detach(), xt, wt, bt, target, beta=beta, chunk_size=4)


def test_student_zero_where_the_teacher_is_not(backend, device):
    # forward KL of a teacher that puts mass where the student has none: +inf, as the truth
    s, t, _ = logits_operands((3,), 7, torch.float32, device)
    s = s.clone()
    s[:, 2] = -math.inf
    assert bool(torch.isinf(fl.distillation_loss(s, t, beta=0.0, reduction="none")).all())
    assert bool(torch.isfinite(fl.distillation_loss(s, t, beta=0.5, reduction="none")).all())


def test_nothing_counted(backend, device):
    # every position ignored: batchmean 0 (TRL's clamp), mean NaN (TRL's empty mean), zero
    # gradients
    s, t, _ = logits_operands((4,), 11, torch.float32, device)
    target = torch.full((4,), -100, device=device)
    s.requires_grad_(True)
    loss = fl.distillation_loss(s, t, target)
    loss.backward()
    assert loss.item() == 0.0 and bool((s.grad == 0).all())
    assert math.isnan(fl.distillation_loss(s, t, target, reduction="mean").item())


def test_no_grad_and_teacher_constant(backend, device):
    xs, ws, bs, xt, wt, bt, target = head_operands((10,), 8, 12, 31, torch.float32, device)
    wt.requires_grad_(True)  # a teacher in train mode, its loss taken under no_grad
    with torch.no_grad():
        loss = fl.linear_distillation_loss(xs.requires_grad_(True), ws, xt, wt, target)
    assert loss.grad_fn is None
    with pytest.raises(ValueError, match="teacher is a constant"):
        fl.linear_distillation_loss(xs, ws, xt, wt, target)
    s, t, target = logits_operands((5,), 9, torch.float32, device)
    with pytest.raises(ValueError, match="teacher_logits.detach"):
        fl.distillation_loss(s, t.requires_grad_(True), target)


def test_double_backward(backend, device):
    xs, ws, _, xt, wt, _, target = head_operands((7,), 6, 9, 13, torch.float32, device)
    v = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def hvp(fn, xs, ws, xt, wt, target):
        x = xs.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, ws, xt, wt, target, beta=0.3, temperature=1.2), x,
                                   create_graph=True)
        (g * v.to(x.dtype).to(x.device)).sum().backward()
        return g.detach(), x.grad

    g, hv = hvp(lambda *a, **k: fl.linear_distillation_loss(*a, **k, chunk_size=3),
                xs, ws, xt, wt, target)
    ref_g, ref_hv = hvp(linear_reference, *(wide(a) for a in (xs, ws, xt, wt, target)))
    assert_close(g, ref_g, torch.float32, "gradient")
    assert_close(hv, ref_hv, torch.float32, "Hessian-vector product")


def test_retain_graph_twice(backend, device):
    # the gradient written in the forward serves the first backward; a second one recomputes
    xs, ws, bs, xt, wt, bt, target = head_operands((8,), 6, 6, 17, torch.float32, device)
    xs.requires_grad_(True)
    loss = fl.linear_distillation_loss(xs, ws, xt, wt, target, chunk_size=3)
    (g1,) = torch.autograd.grad(loss, xs, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xs)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)


def test_never_an_eighth_of_the_logits(backend, device):
    # 1,024 tokens of a 400-class vocabulary: no tensor of the forward or the backward holds
    # an eighth of either head's logits, for a reduced loss and for "none"
    n, v = 1024, 400
    xs, ws, bs, xt, wt, bt, target = head_operands((n,), 16, 24, v, torch.bfloat16, device)
    for reduction in ("batchmean", "none"):
        leaves = [a.detach().clone().requires_grad_(True) for a in (xs, ws, bs)]
        with LargestTensor() as mode:
            out = fl.linear_distillation_loss(leaves[0], leaves[1], xt, wt, target,
                                              student_bias=leaves[2], teacher_bias=bt,
                                              reduction=reduction, temperature=2.0)
            out.sum().backward()
        assert mode.largest <= n * v // 8, (reduction, mode.largest)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend, device, compiler):
    torch._dynamo.reset()
    xs, ws, bs, xt, wt, bt, target = head_operands((2, 5), 8, 12, 21, torch.float32, device)
    fn = torch.compile(lambda xs, ws, bs: fl.linear_distillation_loss(
        xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt, beta=0.3, chunk_size=4),
        backend=compiler, fullgraph=True)
    out, grads = grads_of(fn, [xs, ws, bs], [], {})
    ref, ref_grads = grads_of(
        lambda xs, ws, bs: linear_reference(xs, ws, wide(xt), wide(wt), wide(target),
                                            student_bias=bs, teacher_bias=wide(bt), beta=0.3),
        [wide(xs), wide(ws), wide(bs)], [], {})
    assert_close(out, ref, torch.float32, "loss")
    for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(got, want, torch.float32, f"d loss / d {name}")
    torch._dynamo.reset()


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_fullgraph_logits(backend, device, reduction):
    torch._dynamo.reset()
    s, t, target = logits_operands((6,), 23, torch.float32, device)
    fn = torch.compile(lambda s: fl.distillation_loss(s, t, target, beta=0.3, temperature=1.3,
                                                      reduction=reduction),
                       backend="aot_eager", fullgraph=True)
    out, (grad,) = grads_of(fn, [s], [], {})
    ref, (ref_grad,) = grads_of(lambda s: reference(s, wide(t), wide(target), beta=0.3,
                                                    temperature=1.3, reduction=reduction),
                                [wide(s)], [], {})
    assert_close(out, ref, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "d loss / d student_logits")
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def _heads(n=4, n_t=4, h=8, v=10, v_t=10):
    return (torch.randn(n, h), torch.randn(v, h), torch.randn(n_t, h + 2), torch.randn(v_t, h + 2))


BAD = {
    "vocabularies": (fl.linear_distillation_loss, _heads(v_t=11), {}, ValueError,
                     "vocabularies must match"),
    "token counts": (fl.linear_distillation_loss, _heads(n_t=5), {}, ValueError,
                     "same positions"),
    "in_features": (fl.linear_distillation_loss,
                    (torch.randn(4, 8), torch.randn(10, 9), torch.randn(4, 8),
                     torch.randn(10, 8)), {}, RuntimeError, "in_features"),
    "beta": (fl.linear_distillation_loss, _heads(), {"beta": 1.5}, ValueError, "beta"),
    "reduction": (fl.distillation_loss, (torch.randn(3, 5), torch.randn(3, 5)),
                  {"reduction": "elementwise_mean"}, ValueError, "reduction"),
    "logit shapes": (fl.distillation_loss, (torch.randn(3, 5), torch.randn(3, 6)), {},
                     ValueError, "same shape"),
    "target shape": (fl.distillation_loss, (torch.randn(3, 5), torch.randn(3, 5),
                                            torch.zeros(4, dtype=torch.long)), {},
                     ValueError, "target of shape"),
    "temperature": (fl.distillation_loss, (torch.randn(3, 5), torch.randn(3, 5)),
                    {"temperature": 0.0}, ValueError, "temperature"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_errors(backend, case):
    fn, args, kwargs, error, words = BAD[case]
    with pytest.raises(error, match=words):
        fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# Hugging Face models
# ------------------------------------------------------------------------------------------


def _tiny_llama(hidden, seed, vocab=97):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                                      intermediate_size=2 * hidden, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


@pytest.mark.parametrize("masking", ["labels", "attention_mask"])
def test_transformers_helper(backend, masking):
    # two tiny Llamas of different widths: the helper against TRL's formula on the stock
    # models' logits (the causal shift, the masked positions), loss and the student's
    # gradients
    from fused_losses.integrations import transformers as fl_hf

    student, teacher = _tiny_llama(32, 0), _tiny_llama(64, 1)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding
    kwargs = dict(labels=labels) if masking == "labels" else dict(attention_mask=mask)
    loss = fl_hf.distillation_loss(student, teacher, ids, beta=0.3, temperature=1.5,
                                   chunk_size=5, **kwargs)
    loss.backward()
    ours = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with torch.no_grad():
        t_logits = teacher(ids, attention_mask=kwargs.get("attention_mask")).logits[:, :-1]
    s_logits = student(ids, attention_mask=kwargs.get("attention_mask")).logits[:, :-1]
    if masking == "labels":
        target = labels[:, 1:]
    else:
        target = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    ref = reference(s_logits, t_logits, target, beta=0.3, temperature=1.5)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, p in zip(ours, student.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
