"""Where the RL head's time goes: each step of one chunk of ``linear_log_probs``, timed alone.

The benchmark times the whole head (forward + backward) against its four GEMMs; this splits
one chunk into the driver's steps, so that the gap has a name:

- the forward's GEMM with a bfloat16 result (what the "4 GEMMs" baseline and TRL's head
  write) and with a float32 result (``mm.dtype_out``: what ours writes, never rounded);
- the row pass (``log_probs.row_log_probs``: log p, with and without the entropy) over the
  chunk's float32 logits;
- the backward's gradient pass (``log_probs.log_prob_grad``: float32 logits in, bfloat16
  gradient out, with and without the entropy's term);
- the two gradient GEMMs (``dlogits @ W`` and ``dlogits.T @ x``; the second adds into the
  weight's float32 gradient, read and written whole once per chunk: 8 V H bytes, which on
  the H200 explained the LM heads' gaps to their GEMMs, e.g. 16 chunks x 4.2 GB = 16 ms of
  the RL head's 17.7 ms at N=8192, H=4096, V=128256).

Each line gives the median time, and for the passes over memory the bytes they must move
over the copy bandwidth measured here (their roofline). Then the sum of one chunk's steps
times the chunks, against the whole head's time measured the same way, and the head as
planned by default (its backward in tiles of every token by a block of classes: the
accumulator passed over once), whose difference is the tiles' gain; the same for the
cross-entropy head with ``reduction='none'`` (tiles from its rows' kept statistics).

    python -m bench.head_profile                # CUDA: N=8192, H=4096, V=128256, bf16
    python -m bench.head_profile --device cpu --tokens 256 --hidden 64 --vocab 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from fused_losses.kernels import eager

import fused_losses as fl

from .run import copy_gbps, sample


def _timer(device: str):
    """The median of a step's samples (``bench.run.sample``: CUDA events, or five host-timed
    calls on the CPU), after a first call."""
    def ms_of(fn):
        fn()
        rounds = 1 if device == "cuda" else 5
        return statistics.median(t for _ in range(rounds) for t in sample(device, fn, 60))

    return ms_of


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk", type=int, default=None, help="default: the head's own choice")
    a = p.parse_args(argv)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to profile")
        return 2
    kernels = dev == "cuda"
    if kernels:
        from fused_losses.kernels import log_probs as ops
    else:
        ops = eager
    from fused_losses.kernels.chunked_head import _mm

    torch.manual_seed(0)
    n, h, v = a.tokens, a.hidden, a.vocab
    dtype = torch.bfloat16
    x = (torch.randn(n, h, device=dev) * 0.5).to(dtype)
    w = (torch.randn(v, h, device=dev) * 0.02).to(dtype)
    t = torch.randint(0, v, (n,), device=dev)
    g = torch.randn(n, device=dev)
    opts = eager.Options(temperature=0.7)
    ms_of = _timer(dev)
    gbps = copy_gbps() if dev == "cuda" else None  # (no roofline on the CPU)

    # the head's chunk: ask it (the public default) unless given
    chunk = a.chunk
    if chunk is None:
        from fused_losses.log_probs import _chunk

        chunk = _chunk(n, v, dev, None, "linear_log_probs")
    r = min(chunk, n)
    xc, tc, gc = x[:r], t[:r].contiguous(), g[:r].contiguous()
    z32 = torch.empty(r, v, dtype=torch.float32, device=dev)
    z16 = torch.empty(r, v, dtype=dtype, device=dev)
    d16 = torch.empty(r, v, dtype=dtype, device=dev)
    gx = torch.empty(r, h, dtype=torch.float32, device=dev)
    gw = torch.zeros(v, h, dtype=torch.float32, device=dev)
    wt = w.t()
    _mm(z32, xc, wt, accumulate=False)
    rows, stats = ops.row_log_probs(z32, tc, opts, outputs=("entropy",))
    ent = rows.entropy.clone()

    def row(entropy):
        ops.row_log_probs(z32, tc, opts, outputs=("entropy",) if entropy else ())

    def grad(entropy):
        z = z32 if kernels else z32.clone()
        ops.log_prob_grad(z, tc, stats, ent if entropy else None, gc,
                          gc if entropy else None, opts, grad=d16)

    steps = [
        ("GEMM x W^T -> bf16", lambda: torch.mm(xc, wt, out=z16), None),
        ("GEMM x W^T -> fp32 (ours)", lambda: _mm(z32, xc, wt, accumulate=False), None),
        ("row pass: log p", lambda: row(False), 4 * r * v),
        ("row pass: log p + entropy", lambda: row(True), 4 * r * v),
        ("grad pass: log p", lambda: grad(False), 6 * r * v),
        ("grad pass: log p + entropy", lambda: grad(True), 6 * r * v),
        ("GEMM dlogits @ W (grad x)", lambda: _mm(gx, d16, w, accumulate=False), None),
        # (its float32 accumulator read and written once per chunk: 8 V H bytes)
        ("GEMM dlogits^T @ x (grad W)", lambda: _mm(gw, d16.t(), xc, accumulate=True),
         8 * v * h + 2 * r * v + 2 * r * h),
    ]
    n_chunks = -(-n // r)
    print(f"{dev}: N={n} H={h} V={v} bf16, chunk {r} tokens ({n_chunks} chunks), T=0.7; "
          f"copy bandwidth {'-' if gbps is None else f'{gbps:.0f} GB/s'}")
    print(f"{'step (one chunk)':32s} {'ms':>9s} {'x chunks':>9s} {'roofline':>9s}")
    times = {}
    for name, fn, nbytes in steps:
        ms = ms_of(fn)
        times[name] = ms
        roof = "" if nbytes is None or gbps is None else f"{ms / (nbytes / gbps / 1e6):8.2f}x"
        print(f"{name:32s} {ms:9.3f} {ms * n_chunks:9.2f} {roof:>9s}", flush=True)

    x_l, w_l = x.clone().requires_grad_(), w.clone().requires_grad_()
    g2 = torch.randn(n, device=dev)

    def head(chunk_size):
        def step():
            x_l.grad = w_l.grad = None
            lp, en = fl.linear_log_probs(x_l, w_l, t, temperature=0.7, return_entropy=True,
                                         chunk_size=chunk_size)
            (lp * g + en * g2).sum().backward()

        return step

    # the whole head as a user runs it (the backward in tiles of every token by a block of
    # classes where the plan makes them), and in chunks of r tokens both ways (the steps')
    from fused_losses.linear_cross_entropy import grad_tiles
    from fused_losses.log_probs import CHUNK_BYTES

    tiles = grad_tiles(n, v, 4, dev, a.chunk, CHUNK_BYTES)
    default = ms_of(head(a.chunk))
    whole = ms_of(head(r))
    ours = n_chunks * (2 * times["GEMM x W^T -> fp32 (ours)"] + times["row pass: log p + entropy"]
                       + times["grad pass: log p + entropy"]
                       + times["GEMM dlogits @ W (grad x)"]
                       + times["GEMM dlogits^T @ x (grad W)"])
    four = n_chunks * (2 * times["GEMM x W^T -> bf16"] + times["GEMM dlogits @ W (grad x)"]
                       + times["GEMM dlogits^T @ x (grad W)"])
    print(f"{'sum of the steps (log p + H)':32s} {ours:9.2f} ms; the whole head {whole:.2f} ms "
          f"(the rest: {whole - ours:.2f} ms of casts, launches, allocations); 4 bf16 GEMMs "
          f"{four:.2f} ms", flush=True)
    if tiles[0]:
        print(f"the head as planned, its backward in tiles of {tiles[0]} tokens x {tiles[1]} "
              f"classes: {default:.2f} ms ({whole - default:+.2f} ms against chunks)", flush=True)
    # the CE head where its backward forms the logits again (reduction='none', per-token
    # upstream gradients): as planned (tiles of the classes from the rows' kept statistics)
    # against its chunks
    from fused_losses.linear_cross_entropy import CHUNK_BYTES as CE_BYTES
    from fused_losses.linear_cross_entropy import chunk_tokens

    item = dtype.itemsize if kernels else 4  # (the CE head's logits: the GEMMs' dtype)
    ce_tiles = grad_tiles(n, v, item, dev, a.chunk, CE_BYTES)
    ce_chunk = chunk_tokens(n, v * item, dev, a.chunk, "linear_cross_entropy", CE_BYTES)

    def ce(chunk_size):
        def step():
            x_l.grad = w_l.grad = None
            fl.linear_cross_entropy(x_l, w_l, t, reduction="none",
                                    chunk_size=chunk_size).mul(g).sum().backward()

        return step

    if ce_tiles[0]:
        print(f"the CE head, reduction='none': as planned, its backward in tiles of "
              f"{ce_tiles[1]} classes, {ms_of(ce(a.chunk)):.2f} ms; in chunks of {ce_chunk} "
              f"tokens, {ms_of(ce(ce_chunk)):.2f} ms", flush=True)
    acc = n_chunks * 8 * v * h
    at = "" if gbps is None else f", {acc / gbps / 1e6:.2f} ms at the copy bandwidth"
    print(f"the weight gradient's float32 accumulator, read and written once a chunk: "
          f"{n_chunks} x {8 * v * h / 1e9:.2f} GB = {acc / 1e9:.1f} GB{at} (fewer, larger "
          "chunks: less; the backward's tiles: once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
