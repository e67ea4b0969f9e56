"""Distill a tiny teacher Llama into a smaller student, stock and with ``fused_losses``.

    python examples/distill.py                  # CPU: under a minute
    python examples/distill.py --steps 100      # CUDA: bigger shapes, bf16

A teacher Llama (a 32,768-token vocabulary on the CPU, Llama 3's 128,256 on a GPU) is
initialised at random and trained for twenty steps on a synthetic corpus, so that its
next-token distribution is far from uniform. Two identical copies of a smaller student (same
vocabulary, half the hidden size) then learn from it on the same batches, with the same AdamW:

- stock: both models' full logits (``model(...).logits``) and TRL's
  ``GKDTrainer.generalized_jsd_loss`` on them, with the causal shift TRL's GKD applies
  (position t's distributions compared where the label t + 1 counts);
- fused: ``fused_losses.integrations.transformers.distillation_loss(student, teacher, ids,
  labels=ids)``, which runs both bodies and streams both heads through
  ``fused_losses.linear_distillation_loss``: neither model's logits are allocated.

The script writes a PNG (default ``examples/distill.png``) with both loss curves and the peak
memory of each training step's forward and backward (the teacher's forward, the student's
forward and backward; AdamW's step, the same in both runs, is left out) beyond what was
allocated before it (the weights, the optimizer's state, the batch), and prints the numbers.

What the curves can show: the two losses are the same function rounded differently (TRL's
formula rounds the log-softmaxes and the mixture in the logits' dtype; the fused loss works in
float32 throughout, chunk by chunk). At the same weights, the first step, the script prints
the loss and gradient differences: a few units in the last place in float32, which is what the
fused loss contributes. After that each run trains on its own weights and AdamW carries the
last-bit differences forward, so the curves drift apart slowly, as any two roundings of one
computation do (``examples/finetune_transformers.py`` shows that band); the largest per-step
difference printed is that drift, not an error of either loss. In bf16 (CUDA) the stock
formula's own rounding is larger, and so is the difference.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU, which keeps no such
count, the memory torch's profiler sees each op allocate and free, summed in order
(``examples/grpo_step.py``'s count). The profiler slows a CPU step, so the step times printed
there are not the losses' speed (``python -m bench`` measures that). The fused peak is mostly
the working set of one chunk of the two heads (on the CPU up to 64 MiB of each head's float32
logits, 512 tokens at this vocabulary: the 256 tokens here are one chunk; both heads' logits,
their softmaxes and the student's gradient), the same at any number of tokens from 512 on; the
stock peak grows with the tokens.
No download: the corpus is a random walk on a table over 64 of the vocabulary's tokens, each
followed by one of four; in its twenty steps the teacher learns mostly which 64 (its loss
falls from ln(vocabulary) to about ln 64 = 4.16, the walk's floor being ln 4), which is
distribution enough to distill: far from the student's near-uniform start.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

import torch
from grpo_step import cpu_peak_bytes  # examples/: the profiler's peak on the CPU

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

SHAPES = {  # device: (vocabulary, teacher hidden, student hidden, layers, batch, seq, dtype)
    "cpu": (32_768, 128, 64, 2, 4, 64, torch.float32),
    "cuda": (128_256, 1024, 512, 2, 8, 512, torch.bfloat16),
}
TEACHER_STEPS = 20
WORDS = 64  # the corpus uses this many of the vocabulary's tokens


def corpus(vocab: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """A token stream: a random walk on a table that gives each of WORDS tokens four
    successors."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randperm(vocab, generator=g)[:WORDS]
    table = torch.randint(WORDS, (WORDS, 4), generator=g).tolist()
    state, out = 0, []
    for c in torch.randint(4, (n_tokens,), generator=g).tolist():
        state = table[state][c]
        out.append(state)
    return words[torch.tensor(out)]


def llama(vocab: int, hidden: int, layers: int, seq: int):
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128), max_position_embeddings=seq,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None))


def gkd_loss():
    """TRL's ``GKDTrainer.generalized_jsd_loss``, or the same formula written out."""
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        return GKDTrainer.generalized_jsd_loss
    except ImportError:
        import torch.nn.functional as F

        def generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
            s = F.log_softmax(student_logits / temperature, -1)
            t = F.log_softmax(teacher_logits / temperature, -1)
            if beta == 0:
                jsd = F.kl_div(s, t, reduction="none", log_target=True)
            elif beta == 1:
                jsd = F.kl_div(t, s, reduction="none", log_target=True)
            else:
                b = torch.tensor(beta, dtype=s.dtype, device=s.device)
                m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), 0)
                jsd = (beta * F.kl_div(m, t, reduction="none", log_target=True)
                       + (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True))
            mask = labels != -100
            return jsd[mask].sum() / mask.sum().clamp_min(1)

        return generalized_jsd_loss


def train(student, teacher, loss_fn, batches, device: str, lr: float):
    """Each step's loss, the peak bytes and seconds of its forward and backward, and the
    first step's gradients (at the weights both runs share)."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, fused=True)
    losses, peaks, seconds, first_grads = [], [], [], None
    for ids in batches:
        ids = ids.to(device)
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if device == "cuda":
            loss = loss_fn(student, teacher, ids)
            loss.backward()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                loss = loss_fn(student, teacher, ids)
                loss.backward()
            peaks.append(cpu_peak_bytes(prof))
        seconds.append(time.perf_counter() - start)
        if first_grads is None:
            first_grads = [p.grad.detach().cpu().double() for p in student.parameters()]
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, peaks, seconds, first_grads


def median(values):
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".png")))
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    from fused_losses.integrations import transformers as fl_hf

    vocab, t_hidden, s_hidden, layers, batch, seq, dtype = SHAPES[args.device]
    began = time.perf_counter()
    torch.manual_seed(0)
    stream = corpus(vocab, (TEACHER_STEPS + args.steps) * batch * seq)
    batches = list(stream.view(-1, batch, seq))
    teacher_batches, batches = batches[:TEACHER_STEPS], batches[TEACHER_STEPS:]

    teacher = llama(vocab, t_hidden, layers, seq).to(args.device, dtype)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2, fused=True)
    teacher_losses = []
    for ids in teacher_batches:  # twenty steps: a teacher with a non-trivial distribution
        ids = ids.to(args.device)
        loss = teacher(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher_losses.append(loss.item())
    del opt
    teacher.eval().requires_grad_(False)
    print(f"teacher (hidden {t_hidden}): next-token loss {teacher_losses[0]:.2f} -> "
          f"{teacher_losses[-1]:.2f} in {TEACHER_STEPS} steps (ln {WORDS} = "
          f"{math.log(WORDS):.2f}, the walk's floor ln 4 = 1.39); "
          f"{time.perf_counter() - began:.0f} s")

    generalized_jsd_loss = gkd_loss()
    options = dict(beta=args.beta, temperature=args.temperature)

    def stock(student, teacher, ids):
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits[:, :-1]
        student_logits = student(input_ids=ids).logits[:, :-1]
        return generalized_jsd_loss(student_logits, teacher_logits, labels=ids[:, 1:],
                                    **options)

    def fused(student, teacher, ids):
        return fl_hf.distillation_loss(student, teacher, ids, labels=ids, **options)

    torch.manual_seed(1)
    student = llama(vocab, s_hidden, layers, seq).to(args.device, dtype)
    STOCK, FUSED = ("stock: logits + TRL's generalized_jsd_loss",
                    "fused_losses.integrations.transformers.distillation_loss")
    results = {}
    for name, loss_fn in ((STOCK, stock), (FUSED, fused)):
        results[name] = losses, peaks, seconds, _ = train(
            copy.deepcopy(student), teacher, loss_fn, batches, args.device, args.lr)
        print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; peak memory of a forward "
              f"+ backward {max(peaks) / 2**20:.1f} MiB; {median(seconds) * 1e3:.0f} ms per "
              "step (median" + (", profiled)" if args.device == "cpu" else ")"))

    (s_loss, s_peak, _, s_grads), (f_loss, f_peak, _, f_grads) = results.values()
    saving = 1 - max(f_peak) / max(s_peak)
    drift = max(abs(a - b) for a, b in zip(s_loss, f_loss, strict=True))
    grad_gap = (sum((a - b).square().sum() for a, b in zip(s_grads, f_grads, strict=True))
                / sum(a.square().sum() for a in s_grads)).sqrt().item()
    logits = batch * (seq - 1) * vocab * torch.finfo(dtype).bits // 8
    print(f"peak memory saved: {saving:.0%} ({max(s_peak) / 2**20:.1f} -> "
          f"{max(f_peak) / 2**20:.1f} MiB; one model's logits are {logits / 2**20:.1f} MiB in "
          f"{str(dtype).removeprefix('torch.')})")
    print(f"at the same weights (step 1): |loss - stock loss| = {abs(s_loss[0] - f_loss[0]):.1e}"
          f", |gradient - stock gradient| / |stock gradient| = {grad_gap:.1e}; largest "
          f"|loss - stock loss| over the {args.steps} steps (each run on its own weights): "
          f"{drift:.1e}")
    print(f"total run time {time.perf_counter() - began:.0f} s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.3))
    for (name, (losses, peaks, _, _)), style in zip(results.items(), ("-", "--"), strict=True):
        steps = range(1, len(losses) + 1)
        ax_loss.plot(steps, losses, style, marker=".", label=name)
        ax_mem.plot(steps, [p / 2**20 for p in peaks], style, marker=".", label=name)
    ax_loss.set(xlabel="step", ylabel=f"generalized JSD (beta {args.beta})",
                title=f"distillation loss (largest difference {drift:.0e}; "
                      f"{abs(s_loss[0] - f_loss[0]):.0e} at step 1)")
    ax_mem.set(xlabel="step", ylabel="MiB", ylim=(0, None),
               title="peak memory of a step's forward + backward")
    ax_loss.legend(fontsize=8)
    ax_mem.legend(fontsize=8)
    fig.suptitle(f"Llama teacher (hidden {t_hidden}) -> student (hidden {s_hidden}), "
                 f"vocabulary {vocab:,}, {layers} layers, {batch} x {seq} tokens, "
                 f"{str(dtype).removeprefix('torch.')}, {args.device}: "
                 f"{saving:.0%} less peak memory")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
