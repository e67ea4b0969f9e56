"""``python -m bench.rl_precision``: the RL head's precision table (README, "RL from the LM head").

Per-token log-probabilities and entropies from bfloat16 operands (hidden states and an LM
head), against the float64 truth on the same rounded operands: ours (``linear_log_probs``,
each chunk's logits in float32; both backends), TRL 1.16's ``ChunkedLogProbFunction`` (its
tiles in the GEMMs' dtype: the logits rounded to bfloat16 before the log-softmax), and the
unfused bfloat16 formula (``log_softmax(F.linear(x, W).float() / T)``, the same rounding).
Prints a Markdown table: the largest and the mean absolute error in nats over the tokens.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F


def truth(x, w, t, temperature):
    """(log p, H) in float64."""
    lsm = torch.log_softmax(F.linear(x.double(), w.double()) / temperature, -1)
    return lsm.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


def candidates(x, w, t, temperature):
    import fused_losses as fl

    out = {}
    for backend in ("torch", "triton"):
        os.environ["FUSED_LOSSES_BACKEND"] = backend
        name = "fused_losses (" + ("eager" if backend == "torch" else "Triton kernels") + ")"
        with torch.no_grad():
            out[name] = fl.linear_log_probs(x, w, t, temperature=temperature,
                                            return_entropy=True)
    os.environ.pop("FUSED_LOSSES_BACKEND")
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        with torch.no_grad():
            lp, h, *_ = ChunkedLogProbFunction.apply(x, w, None, t, temperature, 32768, None,
                                                     1.0, ("entropy",))
        out["TRL 1.16 ChunkedLogProbFunction"] = (lp, h)
    except ImportError:
        pass
    with torch.no_grad():
        lsm = torch.log_softmax(F.linear(x, w).float() / temperature, -1)
        out["bf16 logits, then float32 log_softmax"] = (
            lsm.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--logit-std", type=float, default=4.0,
                   help="the logits' standard deviation (a trained head's are a few units)")
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    x = torch.randn(n, h, generator=g).bfloat16()
    w = (torch.randn(v, h, generator=g) * (args.logit_std / math.sqrt(h))).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    # half the targets sampled from the model itself (RL's tokens are the policy's samples)
    with torch.no_grad():
        probs = torch.softmax(F.linear(x.double(), w.double()) / args.temperature, -1)
    t[::2] = torch.multinomial(probs[::2], 1, generator=g).squeeze(-1)
    ref_lp, ref_h = truth(x, w, t, args.temperature)
    print(f"{n} tokens, H={h}, V={v}, bfloat16 operands, logits of std {args.logit_std}, "
          f"T={args.temperature}; |error| in nats against float64 on the same operands\n")
    print("| | log p: max | log p: mean | entropy: max | entropy: mean |")
    print("|---|---|---|---|---|")
    for name, (lp, ent) in candidates(x, w, t, args.temperature).items():
        e_lp = (lp.double() - ref_lp).abs()
        e_h = (ent.double() - ref_h).abs()
        print(f"| {name} | {e_lp.max():.1e} | {e_lp.mean():.1e} | {e_h.max():.1e} | "
              f"{e_h.mean():.1e} |")


if __name__ == "__main__":
    main()
