"""A few GRPO steps with TRL's GRPOTrainer, stock and with ``fused_losses``' integration.

    python examples/grpo_step.py                  # CPU: a few minutes
    python examples/grpo_step.py --steps 20       # CUDA: bigger shapes, bf16

Two trainers on one randomly initialised Llama (a 32,768-token vocabulary on the CPU, Llama
3's 128,256 on a GPU) train on the same batches: TRL 1.16's stock ``GRPOTrainer``, whose
log-probs and entropies come from its own chunked head, and the same trainer after
``fused_losses.integrations.trl.apply(trainer)``, whose come from
``fused_losses.linear_log_probs``. Same batches: the fused run replays the completions the
stock run sampled (its generation step is swapped for the recorded one; everything else is
the trainer's own), so the two loss curves differ only by the heads' arithmetic. The script
writes a PNG (default ``examples/grpo_step.png``) with both loss curves and the peak memory
of each training step (generation, the old policy's log-probs where due, the loss's forward
and backward, the optimizer) beyond what was allocated before it, and prints the numbers.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU, which keeps no such
count, the memory torch's profiler sees each op allocate and free, summed in order.
No download: a word-level tokenizer made here, prompts of random words, and a reward for
completions that use the first 256 words of the vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # device: (vocabulary, hidden, layers, generations, completion length, dtype)
    "cpu": (32_768, 64, 2, 8, 256, torch.float32),
    "cuda": (128_256, 512, 2, 16, 256, torch.bfloat16),
}
GOOD = 256  # the reward counts the completion's tokens among the vocabulary's first GOOD words


def tokenizer(vocab: int):
    """A word-level tokenizer over the whole vocabulary: ``w4`` ... (no download)."""
    import tokenizers
    import transformers

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left")


def reward(completions, **kwargs):
    """The share of a completion's words among the first GOOD of the vocabulary."""
    out = []
    for text in completions:
        words = text.split()
        out.append(sum(int(w[1:]) < GOOD for w in words) / max(len(words), 1))
    return out


def cpu_peak_bytes(prof) -> int:
    """The most bytes allocated during the profile and live at once: the allocations and frees
    the profiler records (its trace's memory events), in order; frees of what was allocated
    before it are not counted."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in sorted(events, key=lambda e: e.get("ts", 0))
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    live = peak = 0
    ours: dict[int, int] = {}  # address: bytes, of the allocations made during the profile
    for event in memory:
        nbytes, address = event["Bytes"], event["Addr"]
        if nbytes > 0:
            ours[address] = nbytes
            live += nbytes
        elif address in ours:
            live -= ours.pop(address)
        peak = max(peak, live)
    return peak


def run(trainer, device: str, tape: list, replay: bool):
    """Trains; returns each step's loss, peak bytes and seconds. The first run records its
    completions on ``tape``, the second replays them."""
    generate = trainer._generate_single_turn
    replayed = iter(tape)

    def same_batches(*args, **kwargs):
        if replay:
            return copy.deepcopy(next(replayed))
        out = generate(*args, **kwargs)
        tape.append(copy.deepcopy(out))
        return out

    trainer._generate_single_turn = same_batches
    peaks, seconds = [], []
    step = trainer.training_step

    def measured(*args, **kwargs):
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if device == "cuda":
            out = step(*args, **kwargs)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = step(*args, **kwargs)
            peaks.append(cpu_peak_bytes(prof))
        seconds.append(time.perf_counter() - start)
        return out

    trainer.training_step = measured
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
    return losses, peaks, seconds


def median(values):
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".png")))
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    import datasets
    import transformers
    import trl

    from fused_losses.integrations import trl as fl_trl

    vocab, hidden, layers, generations, length, dtype = SHAPES[args.device]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128), max_position_embeddings=2 * length,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    folder = tempfile.mkdtemp(prefix="grpo_step_")
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    prompts = datasets.Dataset.from_dict({"prompt": [
        " ".join(f"w{i}" for i in torch.randint(4, vocab, (12,), generator=g).tolist())
        for _ in range(args.steps)]})

    def trainer(name):
        config = trl.GRPOConfig(
            str(Path(folder) / name), per_device_train_batch_size=generations,
            num_generations=generations, max_completion_length=length, max_steps=args.steps,
            learning_rate=args.lr, temperature=args.temperature, logging_steps=1, seed=0,
            report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=args.device == "cpu", bf16=dtype == torch.bfloat16,
            model_init_kwargs={"dtype": dtype}, gradient_checkpointing=False,
            beta=0.04, entropy_coef=0.01,  # the reference model's log-probs; the entropy bonus
        )
        return trl.GRPOTrainer(model=folder, reward_funcs=reward, args=config,
                               train_dataset=prompts, processing_class=tokenizer(vocab))

    tape: list = []
    results = {}
    for name, replay in (("TRL's GRPOTrainer", False),
                         ("+ fused_losses.integrations.trl", True)):
        t = trainer("stock" if not replay else "fused")
        if replay:
            fl_trl.apply(t)  # the one line
        results[name] = losses, peaks, seconds = run(t, args.device, tape, replay)
        print(f"{name}: loss {losses[0]:+.4f} ... {losses[-1]:+.4f}; peak memory of a step "
              f"{max(peaks) / 2**20:.1f} MiB; {median(seconds) * 1e3:.0f} ms per step (median)")

    (s_loss, s_peak, s_sec), (f_loss, f_peak, f_sec) = results.values()
    saving = 1 - max(f_peak) / max(s_peak)
    drift = max(abs(a - b) for a, b in zip(s_loss, f_loss, strict=True))
    tokens = generations * length
    logits = tokens * vocab * 4
    print(f"peak memory saved: {saving:.0%} ({max(s_peak) / 2**20:.1f} -> "
          f"{max(f_peak) / 2**20:.1f} MiB; {tokens} completion tokens' float32 logits would be "
          f"{logits / 2**20:.1f} MiB); step time {median(f_sec) / median(s_sec):.2f}x; "
          f"largest loss difference {drift:.1e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, (losses, peaks, _)), style in zip(results.items(), ("-", "--"), strict=True):
        steps = range(1, len(losses) + 1)
        ax_loss.plot(steps, losses, style, marker=".", label=name)
        ax_mem.plot(range(1, len(peaks) + 1), [p / 2**20 for p in peaks], style, marker=".",
                    label=name)
    ax_loss.set(xlabel="step", ylabel="GRPO loss",
                title=f"training loss (largest difference {drift:.0e})")
    ax_mem.set(xlabel="step", ylabel="MiB", ylim=(0, None),
               title="peak memory of a training step")
    ax_loss.legend()
    ax_mem.legend()
    fig.suptitle(f"GRPO, Llama, vocabulary {vocab:,}, hidden {hidden}, {layers} layers, "
                 f"{generations} x {length} completion tokens, "
                 f"{str(dtype).removeprefix('torch.')}, {args.device}: "
                 f"{saving:.0%} less peak memory")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
