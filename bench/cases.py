"""What the benchmark measures: the cases, their inputs, their providers and their targets.

A case is one (loss, shape, dtype, device). ``LOSSES[loss]`` makes its inputs (once per case,
drawn in place in their own dtype, shared by every provider) and lists its providers. A
provider's ``build(case, inputs)`` returns a training step of no arguments (gradients cleared,
forward, ``backward()``; it returns the loss); ``step.leaves`` are the tensors whose gradients
it takes. A provider that cannot run (a peer that is not installed, a fused_losses function
that is not written yet) raises ``Skip``: a skipped row with the reason, never an error.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
VOCABS = (32000, 50257, 128256, 151936, 262144)  # Llama-2, GPT-2, Llama-3, Qwen2, Gemma-3


class Skip(Exception):
    """This provider cannot run this case; the message says why."""


@dataclass(frozen=True)
class Case:
    loss: str  # a key of LOSSES
    shape: tuple[int, ...]  # see each loss's `shape` below
    dtype: str  # a key of DTYPES
    device: str  # "cuda" or "cpu"

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def x(self) -> int:
        """The size its plot sweeps."""
        return LOSSES[self.loss].x(self.shape)

    def to_json(self) -> dict:
        return {"loss": self.loss, "shape": list(self.shape), "dtype": self.dtype,
                "device": self.device}

    @staticmethod
    def from_json(d: dict) -> Case:
        return Case(d["loss"], tuple(d["shape"]), d["dtype"], d["device"])


# ------------------------------------------------------------------------------------------
# inputs: created in their dtype and drawn in place, so that making them never raises the
# process's memory high-water mark above the inputs themselves (the CPU's peak memory)
# ------------------------------------------------------------------------------------------


def _new(case: Case, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or DTYPES[case.dtype], device=case.device)


def _classes(case: Case, n: int, v: int, gen) -> torch.Tensor:
    return _new(case, n, dtype=torch.int64).random_(0, v, generator=gen)


def _ce_inputs(case: Case, gen) -> dict:
    n, v = case.shape
    return {"input": _new(case, n, v).normal_(generator=gen).requires_grad_(),
            "target": _classes(case, n, v, gen)}


def _bce_inputs(case: Case, gen) -> dict:
    n, c = case.shape
    return {"input": _new(case, n, c).normal_(generator=gen).requires_grad_(),
            "target": _new(case, n, c).bernoulli_(0.05, generator=gen),  # a few positives
            "pos_weight": _new(case, c).uniform_(0.5, 4.0, generator=gen)}


def _huber_inputs(case: Case, gen) -> dict:
    # std 2 around the target: both the quadratic (|d| < 1) and the linear branch are hit
    return {"input": _new(case, *case.shape).normal_(0.0, 2.0, generator=gen).requires_grad_(),
            "target": _new(case, *case.shape).normal_(generator=gen)}


def _lce_inputs(case: Case, gen) -> dict:
    n, h, v = case.shape
    return {"input": _new(case, n, h).normal_(generator=gen).requires_grad_(),
            # std 1/sqrt(H): logits of unit variance, as in a trained LM head
            "weight": _new(case, v, h).normal_(0.0, h**-0.5, generator=gen).requires_grad_(),
            "target": _classes(case, n, v, gen)}


def _hf_inputs(case: Case, gen) -> dict:
    batch, seq, _hidden, vocab = case.shape
    return {"ids": _new(case, batch, seq, dtype=torch.int64).random_(0, vocab, generator=gen)}


def make_inputs(case: Case, seed: int = 1234) -> dict:
    gen = torch.Generator(device=case.device).manual_seed(seed)
    with torch.no_grad():
        return LOSSES[case.loss].inputs(case, gen)


# ------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Case, dict], Callable[[], torch.Tensor | None]]
    description: str
    devices: tuple[str, ...] = ("cuda", "cpu")


def train_step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]):
    """forward() -> scalar loss as a training step: gradients set to None, forward, backward."""

    def step():
        for t in leaves:
            t.grad = None
        loss = forward()
        loss.backward()
        return loss

    step.leaves = leaves
    return step


def _scalar(out) -> torch.Tensor:
    """A peer's result as a scalar loss (some return (loss, z_loss) or per-row losses)."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out if out.dim() == 0 else out.mean()


def _peer(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # ImportError, or a CUDA extension that fails to load
        raise Skip(f"{module}.{attr} not importable ({type(e).__name__})") from None


def _ours(name: str):
    import fused_losses

    fn = getattr(fused_losses, name, None)
    if fn is None:
        raise Skip(f"fused_losses.{name} does not exist yet")
    return fn


def _call(loss: str, fn, t: dict) -> Callable[[], torch.Tensor]:
    """A torch-style loss function called on a case's inputs."""
    if loss == "bce":
        return lambda: fn(t["input"], t["target"], pos_weight=t["pos_weight"])
    return lambda: fn(t["input"], t["target"])


_TORCH_FN = {"cross_entropy": F.cross_entropy, "bce": F.binary_cross_entropy_with_logits,
             "huber": F.huber_loss}
_OUR_FN = {"cross_entropy": "cross_entropy", "bce": "binary_cross_entropy_with_logits",
           "huber": "huber_loss"}
_COMPILED: dict[str, Callable] = {}


def _fused(case, t):
    return train_step(_call(case.loss, _ours(_OUR_FN[case.loss]), t), [t["input"]])


def _torch(case, t):
    return train_step(_call(case.loss, _TORCH_FN[case.loss], t), [t["input"]])


def _torch_compile(case, t):
    # dynamic=True: one compilation per loss serves every shape (its time is in warmup_s)
    if case.loss not in _COMPILED:
        _COMPILED[case.loss] = torch.compile(_TORCH_FN[case.loss], dynamic=True)
    return train_step(_call(case.loss, _COMPILED[case.loss], t), [t["input"]])


def _torch_float(case, t):
    if case.dtype == "float32":
        raise Skip("the same call as torch for float32 logits")
    return train_step(lambda: F.cross_entropy(t["input"].float(), t["target"]), [t["input"]])


def _peer_ce(module, attr):
    def build(case, t):
        fn = _peer(module, attr)
        # Liger writes its gradient into the logits: it gets its own copy
        x = t["input"].detach().clone().requires_grad_()
        return train_step(lambda: _scalar(fn(x, t["target"])), [x])

    return build


def _common() -> dict[str, Provider]:
    return {
        "fused_losses": Provider("fused_losses", _fused, "fused_losses (the Triton kernels on "
                                 "CUDA, its eager float32 path on the CPU)"),
        "torch": Provider("torch", _torch, "torch.nn.functional, eager"),
        "torch.compile": Provider("torch.compile", _torch_compile,
                                  "torch.compile(the torch function, dynamic=True)", ("cuda",)),
    }


# linear cross-entropy: the fused LM head against torch's (chunked and unfused) and peers


def _lce_step(fn, t):
    return train_step(lambda: _scalar(fn(t["input"], t["weight"], t["target"])),
                      [t["input"], t["weight"]])


def _lce_fused(case, t):
    return _lce_step(_ours("linear_cross_entropy"), t)


def _lce_torch_chunked(case, t):
    fn = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options is None:
        raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy with options")
    return _lce_step(lambda x, w, y: fn(x, w, y, options=options()), t)


def _lce_torch(case, t):
    return _lce_step(lambda x, w, y: F.cross_entropy(F.linear(x, w), y), t)


def _lce_peer(module, attr):
    return lambda case, t: _lce_step(_peer(module, attr), t)


def _three_gemms(case, t):
    """The reference: the LM head's three matrix products alone (logits, then the gradients
    of the input and of the weight from a logits-sized gradient), no loss."""
    x, w = t["input"].detach(), t["weight"].detach()

    def step():
        logits = x @ w.T
        logits @ w  # d input = d logits @ W
        logits.T @ x  # d weight = d logits^T @ x

    step.leaves = []
    return step


# per-token log-probabilities and entropy from the LM head (RL): the GRPO step's loss,
# -mean(advantage * log p) - 0.01 mean(entropy), at temperature 0.7, against TRL's function


RL_TEMPERATURE = 0.7
RL_ENTROPY_COEF = 0.01


def _rl_inputs(case: Case, gen) -> dict:
    inputs = _lce_inputs(case, gen)
    inputs["advantage"] = _new(case, case.shape[0], dtype=torch.float32).normal_(generator=gen)
    return inputs


def _rl_step(per_token, t):
    """A GRPO-style step on (log p, entropy) of every token: both outputs get a gradient."""
    def forward():
        lp, ent = per_token(t["input"], t["weight"], t["target"])
        return -(t["advantage"] * lp).mean() - RL_ENTROPY_COEF * ent.mean()

    return train_step(forward, [t["input"], t["weight"]])


def _rl_fused(case, t):
    fn = _ours("linear_log_probs")
    return _rl_step(lambda x, w, y: fn(x, w, y, temperature=RL_TEMPERATURE,
                                       return_entropy=True), t)


def _rl_torch(case, t):
    """The unfused formula (TRL <= 1.13's GRPO): the whole logits, log_softmax, the entropy."""
    def per_token(x, w, y):
        lsm = torch.log_softmax(F.linear(x, w).float() / RL_TEMPERATURE, -1)
        return lsm.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(lsm.exp() * lsm).sum(-1)

    return _rl_step(per_token, t)


def _rl_trl(case, t):
    fn = _peer("trl.kernels.chunked_logprob", "ChunkedLogProbFunction")

    def per_token(x, w, y):  # (TRL's GRPOTrainer's vocabulary tile: 32,768 classes)
        lp, ent, *_ = fn.apply(x, w, None, y, RL_TEMPERATURE, 32768, None, 1.0, ("entropy",))
        return lp, ent

    return _rl_step(per_token, t)


def _four_gemms(case, t):
    """The floor of a head whose upstream gradient is per token: the forward's GEMM, the
    backward's recompute and the two gradients' GEMMs, no loss."""
    x, w = t["input"].detach(), t["weight"].detach()

    def step():
        logits = x @ w.T
        logits = x @ w.T  # the backward's recompute
        logits @ w
        logits.T @ x

    step.leaves = []
    return step


# distillation from two LM heads: TRL's generalized JSD (beta 0.5, temperature 2) of a
# student's head against a teacher's, the student's input and weight trained


DISTILL_BETA = 0.5
DISTILL_TEMPERATURE = 2.0


def _distill_inputs(case: Case, gen) -> dict:
    n, h_s, h_t, v = case.shape
    target = _classes(case, n, v, gen)
    target[::10] = -100  # a few positions left out (prompt tokens)
    return {"input": _new(case, n, h_s).normal_(generator=gen).requires_grad_(),
            "weight": _new(case, v, h_s).normal_(0.0, h_s**-0.5, generator=gen)
            .requires_grad_(),
            "teacher_input": _new(case, n, h_t).normal_(generator=gen),
            "teacher_weight": _new(case, v, h_t).normal_(0.0, 1.5 * h_t**-0.5, generator=gen),
            "target": target}


def _distill_step(loss, t):
    return train_step(lambda: loss(t["input"], t["weight"], t["teacher_input"],
                                   t["teacher_weight"], t["target"]),
                      [t["input"], t["weight"]])


def _distill_fused(case, t):
    fn = _ours("linear_distillation_loss")
    return _distill_step(lambda x, w, xt, wt, y: fn(x, w, xt, wt, y, beta=DISTILL_BETA,
                                                    temperature=DISTILL_TEMPERATURE), t)


def _distill_torch(case, t):
    """The unfused formula (TRL's GKDTrainer.generalized_jsd_loss on whole logits)."""
    def loss(x, w, xt, wt, y):
        with torch.no_grad():
            log_t = torch.log_softmax(F.linear(xt, wt).float() / DISTILL_TEMPERATURE, -1)
        log_s = torch.log_softmax(F.linear(x, w).float() / DISTILL_TEMPERATURE, -1)
        beta = DISTILL_BETA
        mix = torch.logsumexp(torch.stack([log_s + math.log1p(-beta), log_t + math.log(beta)]),
                              dim=0)
        jsd = (beta * F.kl_div(mix, log_t, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(mix, log_s, reduction="none", log_target=True))
        mask = y != -100
        return jsd[mask].sum() / mask.sum().clamp_min(1)

    return _distill_step(loss, t)


def _distill_trl(case, t):
    fn = _peer("trl.kernels.chunked_divergence", "ChunkedDivergenceFunction")

    def loss(x, w, xt, wt, y):
        divergence, _ = fn.apply(x, w, None, xt, wt, None, DISTILL_BETA, DISTILL_TEMPERATURE)
        mask = y != -100
        return (divergence * mask).sum() / mask.sum().clamp_min(1)

    return _distill_step(loss, t)


def _distill_liger(case, t):
    cls = _peer("liger_kernel.transformers", "LigerFusedLinearJSD")
    module = cls(jsd_beta=DISTILL_BETA, temperature=DISTILL_TEMPERATURE)
    return _distill_step(lambda x, w, xt, wt, y: module(x, w, xt, wt, y), t)


def _four_distill_gemms(case, t):
    """The floor of the two heads' loss: both heads' logits, the student's two gradients."""
    x, w = t["input"].detach(), t["weight"].detach()
    xt, wt = t["teacher_input"], t["teacher_weight"]

    def step():
        logits = x @ w.T
        xt @ wt.T
        logits @ w
        logits.T @ x

    step.leaves = []
    return step


# the Hugging Face training step: a tiny Llama, with and without fused_losses's integration


def _llama(case: Case):
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise Skip(f"transformers not importable ({e})") from None
    transformers.logging.set_verbosity_error()
    _batch, _seq, hidden, vocab = case.shape
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=2, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=4096)
    torch.manual_seed(0)  # the same random weights with and without the integration
    with torch.device(case.device):
        return LlamaForCausalLM(config).to(DTYPES[case.dtype])


def _hf_step(model, ids):
    return train_step(lambda: model(input_ids=ids, labels=ids).loss, list(model.parameters()))


def _hf_plain(case, t):
    return _hf_step(_llama(case), t["ids"])


def _hf_fused(case, t):
    try:
        integration = importlib.import_module("fused_losses.integrations.transformers")
    except ModuleNotFoundError:
        raise Skip("fused_losses.integrations.transformers does not exist yet") from None
    model = _llama(case)
    return _hf_step(integration.apply(model) or model, t["ids"])


# ------------------------------------------------------------------------------------------
# the losses
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    title: str
    shape: str  # what the numbers of a shape are
    inputs: Callable
    providers: dict[str, Provider]
    reference: str  # the provider whose loss value the others are checked against
    x: Callable[[tuple], int]  # the swept size of a shape
    x_label: str
    fixed: Callable[[tuple], str]  # what a panel holds fixed
    # bytes forward+backward must move at least (each input read once, the gradient written
    # once): the roofline on CUDA. None for the compute-bound cases.
    min_bytes: Callable[[tuple, int], int] | None = None


LOSSES = {
    "cross_entropy": Loss(
        "cross-entropy", "N x V", _ce_inputs, {
            **_common(),
            "torch+float": Provider("torch+float", _torch_float, "F.cross_entropy(logits.float()"
                                    ", target): the Hugging Face pattern"),
            "liger": Provider("liger", _peer_ce("liger_kernel.transformers.functional",
                                                "liger_cross_entropy"),
                              "Liger-Kernel liger_cross_entropy", ("cuda",)),
            "flash_attn": Provider("flash_attn", _peer_ce("flash_attn.ops.triton.cross_entropy",
                                                          "cross_entropy_loss"),
                                   "flash-attn's Triton cross_entropy_loss, .mean()", ("cuda",)),
            "quack": Provider("quack", _peer_ce("quack.cross_entropy", "cross_entropy"),
                              "quack.cross_entropy", ("cuda",)),
        }, "torch", lambda s: s[1], "vocabulary V", lambda s: f"N={s[0]}",
        # logits read + int64 targets + gradient written
        lambda s, b: 2 * s[0] * s[1] * b + 8 * s[0]),
    "bce": Loss(
        "BCE-with-logits", "N x C", _bce_inputs, _common(), "torch",
        lambda s: s[0] * s[1], "elements N x C", lambda s: "pos_weight (C,)",
        # input + target read, pos_weight read, gradient written
        lambda s, b: 3 * s[0] * s[1] * b + s[1] * b),
    "huber": Loss(
        "Huber", "elements", _huber_inputs, _common(), "torch",
        lambda s: s[0] * (s[1] if len(s) > 1 else 1), "elements", lambda s: "",
        lambda s, b: 3 * s[0] * (s[1] if len(s) > 1 else 1) * b),  # input, target, gradient
    "linear_cross_entropy": Loss(
        "linear cross-entropy", "N x H x V", _lce_inputs, {
            "fused_losses": Provider("fused_losses", _lce_fused,
                                     "fused_losses.linear_cross_entropy"),
            "torch chunked": Provider("torch chunked", _lce_torch_chunked,
                                      "F.linear_cross_entropy(..., options="
                                      "torch.nn.LinearCrossEntropyOptions())"),
            "torch": Provider("torch", _lce_torch, "F.cross_entropy(F.linear(x, W), target)"),
            "liger": Provider("liger", _lce_peer("liger_kernel.transformers.functional",
                                                 "liger_fused_linear_cross_entropy"),
                              "Liger-Kernel liger_fused_linear_cross_entropy", ("cuda",)),
            "cce": Provider("cce", _lce_peer("cut_cross_entropy", "linear_cross_entropy"),
                            "Cut Cross-Entropy linear_cross_entropy", ("cuda",)),
            "3 GEMMs": Provider("3 GEMMs", _three_gemms, "x @ W.T, dlogits @ W, dlogits.T @ x "
                                "alone: the floor of any LM-head loss"),
        }, "torch", lambda s: s[2], "vocabulary V", lambda s: f"N={s[0]}, H={s[1]}"),
    "linear_log_probs": Loss(
        "RL head: log-probs + entropy", "N x H x V", _rl_inputs, {
            "fused_losses": Provider("fused_losses", _rl_fused,
                                     "fused_losses.linear_log_probs(..., temperature=0.7, "
                                     "return_entropy=True)"),
            "torch": Provider("torch", _rl_torch, "log_softmax(F.linear(x, W) / T): the whole "
                              "logits, the entropy -sum p log p (TRL <= 1.13's GRPO)"),
            "trl": Provider("trl", _rl_trl, "TRL 1.16's ChunkedLogProbFunction (GRPOTrainer's "
                            "default: its tiles in the GEMMs' dtype)"),
            "4 GEMMs": Provider("4 GEMMs", _four_gemms, "x @ W.T twice, dlogits @ W, "
                                "dlogits.T @ x alone: the floor of a per-token upstream "
                                "gradient"),
        }, "torch", lambda s: s[2], "vocabulary V", lambda s: f"N={s[0]}, H={s[1]}"),
    "linear_distillation": Loss(
        "distillation from two heads (generalized JSD)", "N x H_s x H_t x V", _distill_inputs, {
            "fused_losses": Provider("fused_losses", _distill_fused,
                                     "fused_losses.linear_distillation_loss(..., beta=0.5, "
                                     "temperature=2)"),
            "torch": Provider("torch", _distill_torch, "TRL's generalized_jsd_loss on the two "
                              "heads' whole logits"),
            "trl": Provider("trl", _distill_trl, "TRL 1.16's ChunkedDivergenceFunction"),
            "liger": Provider("liger", _distill_liger, "Liger-Kernel LigerFusedLinearJSD",
                              ("cuda",)),
            "4 GEMMs": Provider("4 GEMMs", _four_distill_gemms, "both heads' x @ W.T, the "
                                "student's dlogits @ W and dlogits.T @ x alone: the floor"),
        }, "torch", lambda s: s[3], "vocabulary V",
        lambda s: f"N={s[0]}, H_s={s[1]}, H_t={s[2]}"),
    "hf_llama_step": Loss(
        "transformers Llama training step", "batch x seq x hidden x V", _hf_inputs, {
            "fused_losses": Provider("fused_losses", _hf_fused, "the same model after "
                                     "fused_losses.integrations.transformers.apply(model)"),
            "transformers": Provider("transformers", _hf_plain, "LlamaForCausalLM(config), "
                                     "random weights, 2 layers: model(ids, labels=ids)"
                                     ".loss.backward()"),
        }, "transformers", lambda s: s[0] * s[1], "tokens",
        lambda s: f"2 layers, hidden {s[2]}, V={s[3]}"),
}


# ------------------------------------------------------------------------------------------
# sweeps and targets
# ------------------------------------------------------------------------------------------


def _sweep(device: str, quick: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    if device == "cuda":
        ce = [(8192, 32000), (8192, 128256)] if quick else [(8192, v) for v in VOCABS]
        bce = [(16384, 16384)] if quick else [(65536, 1024), (32768, 4096), (16384, 16384),
                                              (8192, 131072)]
        huber = [(1 << 26,)] if quick else [(1 << 24,), (1 << 26,), (1 << 28,)]
        lce = [(8192, 4096, v) for v in ((128256,) if quick else (32000, 128256, 262144))]
        rl = [(8192, 4096, 128256)] if quick else [(8192, 4096, 128256), (16384, 4096, 151936)]
        hf = [(b, 2048, 1024, 128256) for b in ((4,) if quick else (2, 4))]
        dtypes = [("bfloat16", "float32")[: 1 if quick else 2], ("float32", "bfloat16")]
        return ([("cross_entropy", d, s) for d in dtypes[0] for s in ce]
                + [(loss, d, s) for loss, shapes in (("bce", bce), ("huber", huber))
                   for d in dtypes[1][: 1 if quick else 2] for s in shapes]
                + [("linear_cross_entropy", "bfloat16", s) for s in lce]
                + [("linear_log_probs", "bfloat16", s) for s in rl]
                + [("linear_distillation", "bfloat16", (8192, 2048, 4096, 128256))]
                + [("hf_llama_step", "bfloat16", s) for s in hf])
    # CPU: the eager path's cost against torch's; N=4096 x 32000 and (32, 1000) carry targets
    ce = [(4096, 32000)] if quick else [(4096, 8192), (4096, 32000)]
    small = [(32, 1000), (1024, 1024) if quick else (4096, 1024)]
    # torch's chunked path costs seconds per call on a CPU whatever N: --quick keeps V small
    lce = [(512, 256, 2048), (512, 256, 8192)] if quick else [(4096, 512, 8192),
                                                              (4096, 512, 32000)]
    hf = [(1, 512, 256, 32000)] if quick else [(1, 512, 256, 32000), (2, 1024, 256, 32000)]
    rl = [(4096, 512, 32000)]  # (the targets' shape: seconds a step, quick or not)
    return ([("cross_entropy", d, s) for d in ("bfloat16", "float32") for s in ce]
            + [(loss, "float32", s) for loss in ("bce", "huber") for s in small]
            + [("linear_cross_entropy", "float32", s) for s in lce]
            + [("linear_log_probs", "float32", s) for s in rl]
            + [("linear_distillation", "float32", (2048, 256, 512, 32000))]
            + [("hf_llama_step", "float32", s) for s in hf])


@dataclass(frozen=True)
class Target:
    """fused_losses's figure on one case over what it is compared with, at most ``limit``.

    kind "time": its median time over the fastest of ``against``; "peak": its peak memory over
    the fastest's; "roofline": its time over the floor (the counted bytes at the copy
    bandwidth measured in the run); "peak/gradient": its peak memory over the input's size.
    """

    device: str
    loss: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    limit: float
    against: tuple[str, ...] = ()


TARGETS = (
    # issue 8: the CPU cost of the eager path
    Target("cpu", "cross_entropy", "bfloat16", (4096, 32000), "time", 1.3, ("torch",)),
    Target("cpu", "cross_entropy", "bfloat16", (4096, 32000), "peak", 1.1, ("torch",)),
    Target("cpu", "cross_entropy", "float32", (4096, 32000), "time", 1.05, ("torch",)),
    Target("cpu", "bce", "float32", (32, 1000), "time", 1.15, ("torch",)),
    Target("cpu", "huber", "float32", (32, 1000), "time", 1.15, ("torch",)),
    # issue 12 on a GPU
    Target("cuda", "cross_entropy", "bfloat16", (8192, 128256), "roofline", 1.15),
    Target("cuda", "cross_entropy", "bfloat16", (8192, 128256), "time", 1 / 1.3,
           ("liger", "torch.compile", "torch")),
    Target("cuda", "cross_entropy", "bfloat16", (8192, 128256), "peak/gradient", 1.02),
    Target("cuda", "bce", "float32", (16384, 16384), "roofline", 1.1),
    Target("cuda", "huber", "float32", (1 << 26,), "roofline", 1.1),
    Target("cuda", "linear_cross_entropy", "bfloat16", (8192, 4096, 128256), "time", 1.05,
           ("3 GEMMs",)),
    # issue 16: the RL head
    Target("cpu", "linear_log_probs", "float32", (4096, 512, 32000), "time", 1.0, ("trl",)),
    Target("cpu", "linear_log_probs", "float32", (4096, 512, 32000), "time", 1.1, ("torch",)),
    Target("cpu", "linear_log_probs", "float32", (4096, 512, 32000), "peak", 1.0, ("trl",)),
    Target("cuda", "linear_log_probs", "bfloat16", (8192, 4096, 128256), "time", 1.1,
           ("4 GEMMs",)),
    # issue 17: distillation from two heads
    Target("cpu", "linear_distillation", "float32", (2048, 256, 512, 32000), "time", 1.0,
           ("trl",)),
    Target("cpu", "linear_distillation", "float32", (2048, 256, 512, 32000), "time", 1.1,
           ("torch",)),
    Target("cpu", "linear_distillation", "float32", (2048, 256, 512, 32000), "peak", 1.0,
           ("trl",)),
    Target("cuda", "linear_distillation", "bfloat16", (8192, 2048, 4096, 128256), "time", 1.1,
           ("4 GEMMs",)),
)


def build_cases(device: str, quick: bool, losses=None, dtypes=None) -> list[Case]:
    """The sweep, the shapes that carry a target first (a time-boxed run measures them)."""
    cases = [Case(loss, shape, dtype, device) for loss, dtype, shape in _sweep(device, quick)
             if (not losses or loss in losses) and (not dtypes or dtype in dtypes)]
    headline = {(t.loss, t.shape, t.dtype) for t in TARGETS if t.device == device}
    return sorted(cases, key=lambda c: (c.loss, c.shape, c.dtype) not in headline)
