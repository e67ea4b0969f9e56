"""A small forward+backward of each loss on CUDA, checked against torch in float32.

gpu_check.sh runs it twice: plainly (values, and Triton's cache warmed), then under
``compute-sanitizer --tool memcheck`` with PyTorch's caching allocator off
(PYTORCH_NO_CUDA_MEMORY_CACHING=1), so that every tensor is its own allocation and an
out-of-bounds access by any kernel launch is reported. Shapes are tiny: memcheck runs kernels
~100x slower.

    python -m bench.cuda_check               # exit 0: all match; 1: a mismatch; 2: no CUDA
    python -m bench.cuda_check --device cpu  # the same checks on the eager fallback

A loss that fused_losses does not have yet is reported as skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fused_losses

LOOPED_V = 40000  # over SINGLE_BLOCK_MAX (32768): the looped kernel path


def _same(x):
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _float(v):
    return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _loss_and_grad(fn, base, view, args, kwargs):
    """Loss, and the gradient of 0.5 * loss.sum() w.r.t. ``base`` (an upstream gradient other
    than 1 on purpose); the loss sees ``view(base)``, so strided views are tested as views."""
    leaf = base.detach().clone().requires_grad_(True)
    loss = fn(view(leaf), *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum() * 0.5, leaf)
    return loss.detach(), grad


def check(name: str, fn: str | Callable, torch_fn, base: torch.Tensor, *args,
          view: Callable = _same, ref_kwargs: bool = True, **kwargs) -> bool:
    """fused_losses.<fn> (or a callable over it) against torch's function on float32 copies
    of the inputs; the keyword arguments go to the reference too unless ``ref_kwargs`` is
    False (a reference with the options built in)."""
    if isinstance(fn, str):
        fn = getattr(fused_losses, fn, fn)
    if isinstance(fn, str):
        print(f"skip  {name}: fused_losses.{fn} is not in this build yet")
        return True
    try:
        ours = _loss_and_grad(fn, base, view, args, kwargs)
        ref = _loss_and_grad(torch_fn, base.float(), view, tuple(_float(a) for a in args),
                             {k: _float(v) for k, v in kwargs.items()} if ref_kwargs else {})
    except Exception as e:  # report it and go on: memcheck should see every other launch
        print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
        return False
    errors = [_rel(ours[0], ref[0]), _rel(ours[1], ref[1])]
    limit = 2e-2 if base.dtype in (torch.bfloat16, torch.float16) else 1e-4
    ok = all(e <= limit for e in errors)
    print(f"{'ok   ' if ok else 'FAIL '} {name}: loss rel err {errors[0]:.1e}, "
          f"grad rel err {errors[1]:.1e}", flush=True)
    return ok


def cross_entropy_checks(dev: str, dtype: torch.dtype) -> list[bool]:
    d, ce = str(dtype).removeprefix("torch."), F.cross_entropy
    results = []
    for n, v in ((4, 1000), (3, LOOPED_V)):
        x = torch.randn(n, v, device=dev, dtype=dtype)
        t = torch.randint(0, v, (n,), device=dev)
        t[1] = -100  # an ignored row: no logits read, zero gradient written
        results += [
            check(f"cross_entropy {d} {n}x{v} ignore_index", "cross_entropy", ce, x, t),
            check(f"cross_entropy {d} {n}x{v} none, smoothing", "cross_entropy", ce, x, t,
                  reduction="none", label_smoothing=0.1),
        ]
    # non-contiguous rows: a slice of wider rows (row stride 1010, class stride 1)
    x = torch.randn(5, 1010, device=dev, dtype=dtype)
    t = torch.randint(0, 1000, (5,), device=dev)
    results.append(check(f"cross_entropy {d} 5x1000 strided rows", "cross_entropy", ce, x, t,
                         view=lambda b: b[:, :1000]))
    # the causal-LM shift view with the classes in dim 1: (B, V, T-1), unit class stride
    x = torch.randn(2, 7, 1000, device=dev, dtype=dtype)
    t = torch.randint(0, 1000, (2, 6), device=dev)
    results.append(check(f"cross_entropy {d} shifted (2, 1000, 6) view", "cross_entropy", ce,
                         x, t, view=lambda b: b[:, :-1, :].transpose(1, 2)))
    return results


def retain_graph_check(dev: str) -> bool:
    """A second backward (retain_graph) recomputes the gradient in the backward kernel."""
    x = torch.randn(4, 1000, device=dev, requires_grad=True)
    t = torch.randint(0, 1000, (4,), device=dev)
    loss = fused_losses.cross_entropy(x, t)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    ok = _rel(g2, g1) <= 1e-5
    print(f"{'ok   ' if ok else 'FAIL '} cross_entropy retain_graph second backward", flush=True)
    return ok


def elementwise_checks(dev: str, dtype: torch.dtype) -> list[bool]:
    d, bce = str(dtype).removeprefix("torch."), F.binary_cross_entropy_with_logits
    x = torch.randn(8, 100, device=dev, dtype=dtype)
    y = (torch.rand(8, 100, device=dev) < 0.1).to(dtype)
    pos_weight = torch.rand(100, device=dev, dtype=dtype) + 0.5
    weight = torch.rand(8, 1, device=dev, dtype=dtype)
    a = torch.randn(33, 7, device=dev, dtype=dtype)
    b = torch.randn(7, 33, device=dev, dtype=dtype)
    name = "binary_cross_entropy_with_logits"
    return [
        check(f"bce {d} 8x100 pos_weight", name, bce, x, y, pos_weight=pos_weight),
        check(f"bce {d} 8x100 weight, none", name, bce, x, y, weight=weight, reduction="none"),
        check(f"huber {d} 231", "huber_loss", F.huber_loss, a.reshape(-1), b.reshape(-1)),
        check(f"huber {d} 7x33 transposed view, delta 0.5, sum", "huber_loss", F.huber_loss,
              a, b, view=lambda v: v.t(), reduction="sum", delta=0.5),
    ]


def _log_probs_ref(logits, target, temperature=1.0):
    """log p(target) + 0.25 entropy under softmax(logits / T), float32 (ignored rows 0)."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    keep = target != -100
    lp = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(keep, lp + 0.25 * ent, 0.0)


def _lp_and_entropy(fn_name: str):
    """fused_losses.<fn_name>'s log-prob + 0.25 entropy (both outputs' gradients at once)."""
    fn = getattr(fused_losses, fn_name, None)
    if fn is None:
        return fn_name

    def combined(*args, **kwargs):
        lp, ent = fn(*args, return_entropy=True, **kwargs)
        return lp + 0.25 * ent
    return combined


def _jsd_ref(student, teacher, beta, temperature=1.0):
    """TRL's generalized JSD per position, summed (reduction "sum")."""
    ls = torch.log_softmax(student.float() / temperature, -1)
    lt = torch.log_softmax(teacher.float() / temperature, -1)
    kl = F.kl_div
    if beta == 0:
        return kl(ls, lt, reduction="sum", log_target=True)
    if beta == 1:
        return kl(lt, ls, reduction="sum", log_target=True)
    m = torch.logsumexp(torch.stack([ls + torch.log(torch.tensor(1 - beta)),
                                     lt + torch.log(torch.tensor(beta))]), 0)
    return (beta * kl(m, lt, reduction="sum", log_target=True)
            + (1 - beta) * kl(m, ls, reduction="sum", log_target=True))


def head_checks(dev: str, dtype: torch.dtype) -> list[bool]:
    """The LM-head losses (chunked GEMMs + row kernels) and the RL / distillation rows."""
    d = str(dtype).removeprefix("torch.")
    n, h, v = 37, 64, LOOPED_V
    x = torch.randn(n, h, device=dev, dtype=dtype)
    w = torch.randn(v, h, device=dev, dtype=dtype) / h**0.5
    b = torch.randn(v, device=dev, dtype=dtype)
    t = torch.randint(0, v, (n,), device=dev)
    t[3] = -100
    logits = torch.randn(n, v, device=dev, dtype=dtype) * 2
    teacher = torch.randn(n, v, device=dev, dtype=dtype) * 2
    xt = torch.randn(n, 2 * h, device=dev, dtype=dtype)
    wt = torch.randn(v, 2 * h, device=dev, dtype=dtype) / (2 * h) ** 0.5
    results = [
        check(f"linear_cross_entropy {d} {n}x{h}x{v}", "linear_cross_entropy",
              lambda x, w, t: F.cross_entropy(x @ w.t(), t), x, w, t),
        check(f"log_probs {d} {n}x{v} T=0.7, + entropy / 4", _lp_and_entropy("log_probs"),
              lambda z, t: _log_probs_ref(z, t, 0.7), logits, t, temperature=0.7,
              ref_kwargs=False),
        check(f"linear_log_probs {d} {n}x{h}x{v} bias, T=0.7, + entropy / 4",
              _lp_and_entropy("linear_log_probs"),
              lambda x, w, t: _log_probs_ref(F.linear(x, w, b.float()), t, 0.7), x, w, t,
              linear_bias=b, temperature=0.7, ref_kwargs=False),
    ]
    for beta in (0.0, 0.5, 1.0):
        results += [
            check(f"distillation_loss {d} {n}x{v} beta={beta}", "distillation_loss",
                  lambda s, tl, beta=beta: _jsd_ref(s, tl, beta, 0.9), logits, teacher,
                  beta=beta, temperature=0.9, reduction="sum", ref_kwargs=False),
            check(f"linear_distillation_loss {d} {n}x{h}x{v} beta={beta}",
                  "linear_distillation_loss",
                  lambda x, w, xt, wt, beta=beta: _jsd_ref(x @ w.t(), xt @ wt.t(), beta, 0.9),
                  x, w, xt, wt, beta=beta, temperature=0.9, reduction="sum",
                  ref_kwargs=False),
        ]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    dev = parser.parse_args(argv).device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    torch.manual_seed(0)
    results = [retain_graph_check(dev)]
    for dtype in (torch.bfloat16, torch.float32):
        results += (cross_entropy_checks(dev, dtype) + elementwise_checks(dev, dtype)
                    + head_checks(dev, dtype))
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"{sum(results)} of {len(results)} checks passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
