"""Fine-tune a transformers causal LM with and without ``fused_losses``' integration.

    python examples/finetune_transformers.py                  # CPU: a few minutes
    python examples/finetune_transformers.py --steps 300      # CUDA: bigger shapes, bf16

Two copies of one randomly initialised Llama (a 32,768-token vocabulary on the CPU, Llama 3's
128,256 on a GPU) train on the same batches of a synthetic corpus: one with the stock loss,
one after ``fused_losses.integrations.transformers.apply(model)``. The script writes a PNG
(default ``examples/finetune_transformers.png``) with both loss curves and the peak memory
of each step's forward and backward beyond what was allocated before it (the parameters,
the optimizer's state, the batch), and prints the numbers.

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


def train(model, batches, device: str, lr: float, every: int):
    """The loss of each step, the peak bytes of every ``every``-th step, the seconds of the
    others (the profiler's own time is not the step's)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    losses, peaks, seconds = [], {}, []
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        measure = step % every == 0
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
            if device == "cuda":
                torch.cuda.synchronize()
                peaks[step] = torch.cuda.max_memory_allocated() - base
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if device == "cuda" or not measure:
            seconds.append(time.perf_counter() - start)
    return losses, peaks, seconds


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
    stream = corpus(vocab, args.steps * batch * seq)
    batches = list(stream.view(args.steps, batch, seq))

    results = {}
    for name, model in (("stock transformers loss", stock),
                        ("fused_losses.integrations.transformers", fused)):
        results[name] = losses, peaks, seconds = train(model, batches, args.device, args.lr,
                                                        every)
        print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; peak memory of a forward + "
              f"backward {max(peaks.values()) / 2**20:.1f} MiB; {median(seconds) * 1e3:.0f} ms"
              " per step (median)")

    (s_loss, s_peak, s_sec), (f_loss, f_peak, f_sec) = results.values()
    saving = 1 - max(f_peak.values()) / max(s_peak.values())
    drift = max(abs(a - b) for a, b in zip(s_loss, f_loss, strict=True))
    logits = batch * seq * vocab * torch.finfo(dtype).bits // 8
    print(f"peak memory saved: {saving:.0%} ({max(s_peak.values()) / 2**20:.1f} -> "
          f"{max(f_peak.values()) / 2**20:.1f} MiB; the logits alone are "
          f"{logits / 2**20:.1f} MiB in {str(dtype).removeprefix('torch.')}); step time "
          f"{median(f_sec) / median(s_sec):.2f}x; largest loss difference {drift:.1e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, (losses, peaks, _)), style in zip(results.items(), ("-", "--"), strict=True):
        ax_loss.plot(losses, style, label=name)
        ax_mem.plot(list(peaks), [p / 2**20 for p in peaks.values()], style, marker=".",
                    label=name)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_mem.set(xlabel="step" + (f" (measured every {every}th)" if every > 1 else ""),
               ylabel="MiB", ylim=(0, None), title="peak memory of forward + backward")
    ax_loss.legend()
    ax_mem.legend()
    fig.suptitle(f"Llama, vocabulary {vocab:,}, hidden {hidden}, {layers} layers, {batch} x {seq}"
                 f" tokens, {str(dtype).removeprefix('torch.')}, {args.device}: "
                 f"{saving:.0%} less peak memory")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
