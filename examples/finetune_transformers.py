"""Fine-tune a transformers causal LM with and without ``fused_losses``' integration.

    python examples/finetune_transformers.py                  # CPU: a few minutes
    python examples/finetune_transformers.py --steps 300      # CUDA: bigger shapes, bf16

Copies of one randomly initialised Llama (a 32,768-token vocabulary on the CPU, Llama 3's
128,256 on a GPU) train on the same batches of a synthetic corpus: one with the stock loss,
one after ``fused_losses.integrations.transformers.apply(model)``. The script writes a PNG
(default ``examples/finetune_transformers.png``) with the loss curves, how far they lie
apart, and the peak memory of each step's forward and backward beyond what was allocated
before it (the parameters, the optimizer's state, the batch), and prints the numbers.

How far apart the curves may lie: no two float32 computations of the loss that round
differently give the same trajectory. AdamW at this learning rate amplifies a difference in
the last bit of the loss or of a gradient step by step, until after ~100 steps the curves
visibly part, whichever of the two rounds "better". So the script runs a third copy, the
stock model with every weight multiplied by ``1 + eps * randn`` (``eps``: the dtype's
machine epsilon, one rounding of the weights), whose curve parts from the stock one by as
much: that is the band rounding alone makes. And every 10th step it computes the stock loss
and gradients at the fused model's own weights on the same batch: there the two agree to a
few units in the last place, which is what the integration itself contributes.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``, every step; on the CPU, which
keeps no such count, the memory torch's profiler sees each op allocate and free, summed in
order, every 10th step (the profiler triples a step's time; the shapes, and so the memory,
are the same at every step).
No download: the corpus is a random walk on a sparse successor table over 1,024 of the
vocabulary's tokens (each token followed by one of four), so the loss falls from
ln(vocabulary) towards ln(4) as the model learns the table.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

SHAPES = {  # device: (vocabulary, hidden, layers, batch, sequence, dtype)
    "cpu": (32_768, 64, 2, 8, 64, torch.float32),
    "cuda": (128_256, 512, 2, 8, 512, torch.bfloat16),
}


def corpus(vocab: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """A token stream: a walk on a table that gives each of 1,024 tokens four successors."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randperm(vocab, generator=g)[:1024]
    successors = torch.randint(len(words), (len(words), 4), generator=g)
    choice = torch.randint(4, (n_tokens,), generator=g).tolist()
    table, state, out = successors.tolist(), 0, []
    for c in choice:
        state = table[state][c]
        out.append(state)
    return words[torch.tensor(out)]


def cpu_peak_bytes(prof) -> int:
    """The most bytes live at once, from the profiler's per-op allocations and frees."""
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def perturbed(model, seed: int = 1):
    """A copy of ``model`` with every weight multiplied by ``1 + eps * randn``: the size of
    one rounding of the weights (computed in float32, rounded once to their dtype)."""
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            noise = torch.randn(p.shape, generator=g).to(p.device)
            eps = torch.finfo(p.dtype).eps
            p.copy_(p.float() * (1 + eps * noise))
    return twin


def same_weights_check(stock_twin):
    """The stock loss and gradients at the fused model's weights on the same batch: the
    absolute loss difference and the gradients' relative difference (the norm of the
    difference over the norm of the stock gradient, all parameters as one vector)."""

    def check(fused, ids, loss):
        stock_twin.load_state_dict(fused.state_dict())
        stock_twin.zero_grad(set_to_none=True)
        ref = stock_twin(input_ids=ids, labels=ids).loss
        ref.backward()
        diff = norm = 0.0
        for (name, p), (ref_name, q) in zip(fused.named_parameters(),
                                            stock_twin.named_parameters(), strict=True):
            assert name == ref_name
            diff += (p.grad.double() - q.grad.double()).square().sum().item()
            norm += q.grad.double().square().sum().item()
        return abs(loss.item() - ref.item()), (diff / norm) ** 0.5

    return check


def train(model, batches, device: str, lr: float, every: int, check=None,
          check_every: int = 10):
    """The loss of each step, the peak bytes of every ``every``-th step (none for 0), the
    seconds of the others (the profiler's own time is not the step's), and ``check(model,
    ids, loss)`` after the backward of every ``check_every``-th step (not timed)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    losses, peaks, seconds, checks = [], {}, [], {}
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        measure = every > 0 and step % every == 0
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if measure and device != "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            peaks[step] = cpu_peak_bytes(prof)
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if device == "cuda" and measure:
                torch.cuda.synchronize()
                peaks[step] = torch.cuda.max_memory_allocated() - base
        paused = time.perf_counter()
        if check is not None and step % check_every == 0:
            checks[step] = check(model, ids, loss)
        paused = time.perf_counter() - paused
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if device == "cuda" or not measure:
            seconds.append(time.perf_counter() - start - paused)
    return losses, peaks, seconds, checks


def median(values):
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".png")))
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--memory-every", type=int, default=None,
                        help="measure the peak memory every this many steps (default: every "
                        "step on CUDA, every 10th on the CPU, where the profiler is slow)")
    args = parser.parse_args()
    every = args.memory_every or (1 if args.device == "cuda" else 10)

    import transformers

    from fused_losses.integrations import transformers as fl_hf

    vocab, hidden, layers, batch, seq, dtype = SHAPES[args.device]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128), max_position_embeddings=seq,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    stock = transformers.LlamaForCausalLM(config).to(args.device, dtype)
    fused = fl_hf.apply(copy.deepcopy(stock))  # the one line
    rounded = perturbed(stock)  # the rounding band: the stock model, weights one rounding off
    check = same_weights_check(copy.deepcopy(stock))
    stream = corpus(vocab, args.steps * batch * seq)
    batches = list(stream.view(args.steps, batch, seq))

    STOCK, ROUNDED, FUSED = ("stock transformers loss", "stock, weights × (1 + eps·randn)",
                             "fused_losses.integrations.transformers")
    runs = ((STOCK, stock, every, None), (ROUNDED, rounded, 0, None), (FUSED, fused, every, check))
    results = {}
    for name, model, measure_every, model_check in runs:
        results[name] = losses, peaks, seconds, _ = train(model, batches, args.device, args.lr,
                                                          measure_every, model_check)
        print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
              + (f"peak memory of a forward + backward {max(peaks.values()) / 2**20:.1f} MiB; "
                 if peaks else "")
              + f"{median(seconds) * 1e3:.0f} ms per step (median)")

    (s_loss, s_peak, s_sec, _), (r_loss, *_), (f_loss, f_peak, f_sec, checks) = results.values()
    saving = 1 - max(f_peak.values()) / max(s_peak.values())
    logits = batch * seq * vocab * torch.finfo(dtype).bits // 8
    print(f"peak memory saved: {saving:.0%} ({max(s_peak.values()) / 2**20:.1f} -> "
          f"{max(f_peak.values()) / 2**20:.1f} MiB; the logits alone are "
          f"{logits / 2**20:.1f} MiB in {str(dtype).removeprefix('torch.')}); step time "
          f"{median(f_sec) / median(s_sec):.2f}x")
    apart = {name: [abs(a - b) for a, b in zip(s_loss, other, strict=True)]
             for name, other in ((ROUNDED, r_loss), (FUSED, f_loss))}
    for name, gaps in apart.items():
        print(f"|loss - stock loss|, {name}: " + ", ".join(
            f"{gaps[i]:.1e} at step {i}" for i in sorted({49, 99, 149, len(gaps) - 1})
            if i < len(gaps)) + f"; largest {max(gaps):.1e}")
    loss_gap = max(c[0] for c in checks.values())
    grad_gap = max(c[1] for c in checks.values())
    print(f"at the same weights (every 10th step's batch): |loss - stock loss| <= "
          f"{loss_gap:.1e}, |gradient - stock gradient| / |stock gradient| <= {grad_gap:.1e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_gap, ax_mem) = plt.subplots(1, 3, figsize=(16, 4.3))
    styles = {STOCK: dict(ls="-", color="C0"), ROUNDED: dict(ls=":", color="C2"),
              FUSED: dict(ls="--", color="C1")}
    for name, (losses, peaks, _, _) in results.items():
        ax_loss.plot(losses, label=name, **styles[name])
        if peaks:
            ax_mem.plot(list(peaks), [p / 2**20 for p in peaks.values()], marker=".",
                        label=name, **styles[name])
    floor = 1e-9  # a difference of 0 is drawn here
    for name, gaps in apart.items():
        ax_gap.semilogy([max(g, floor) for g in gaps], lw=1, label=f"{name}: its own run",
                        **styles[name])
    ax_gap.semilogy(list(checks), [max(c[0], floor) for c in checks.values()], "o", ms=4,
                    color="C1", label="fused, at the same weights: loss")
    ax_gap.semilogy(list(checks), [max(c[1], floor) for c in checks.values()], "x", ms=5,
                    color="C3", label="fused, at the same weights: gradient (relative)")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_gap.set(xlabel="step", ylabel=f"(a difference of 0 drawn at {floor:g})",
               title="|loss − stock loss|", ylim=(floor, 10))
    ax_mem.set(xlabel="step" + (f" (measured every {every}th)" if every > 1 else ""),
               ylabel="MiB", ylim=(0, None), title="peak memory of forward + backward")
    ax_loss.legend(fontsize=8)
    ax_gap.legend(fontsize=7, loc="upper left")
    ax_mem.legend(fontsize=8)
    fig.suptitle(f"Llama, vocabulary {vocab:,}, hidden {hidden}, {layers} layers, {batch} x {seq}"
                 f" tokens, {str(dtype).removeprefix('torch.')}, {args.device}: "
                 f"{saving:.0%} less peak memory")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
