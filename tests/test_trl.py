"""fused_losses.integrations.trl against TRL's own GRPOTrainer, on the CPU (and RLOO, KTO and
SFT trainers: two steps each as stock; every output of TRL's head).

A real ``trl.GRPOTrainer`` on a tiny randomly initialised Llama (built from its config and
saved to a temporary folder, with a word-level tokenizer made here: nothing is downloaded),
a dataset of made-up prompts and a simple reward: two training steps stock and applied, the
same completions, losses, metrics (entropy, KL) and every parameter's gradient at each step,
with the temperature, the reference model, the old policy's log-probs, the entropy bonus and
the entropy-quantile mask all in play; that the fused head is what ran; no ``(tokens, vocab)``
tensor; Gemma 2's softcap and TRL's ``cast_lm_head_to_fp32``; bfloat16 log-probs closer to
the float64 truth than TRL's; ``revert``; the refusals.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import fused_losses as fl  # noqa: E402
from fused_losses.integrations import trl as fl_trl  # noqa: E402

VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


def tokenizer():
    """A word-level tokenizer over the model's whole vocabulary: ``w4`` ... ``w127``."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left")


def llama(**kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TEXT, **kw}))


def gemma2():  # a small softcap, so that ignoring it would change the log-probs
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**TEXT,
                                                                    final_logit_softcapping=0.5))


def saved(tmp_path, make=llama, dtype=torch.float32):
    """A tiny random model saved to a folder: GRPOTrainer builds its reference model from the
    policy's path, so the model goes in as a path (no hub)."""
    torch.manual_seed(0)
    path = tmp_path / "model"
    make().to(dtype).save_pretrained(path)
    return str(path)


def reward(completions, **kwargs):
    """More ``w5`` and longer completions score higher: groups get different rewards."""
    return [c.count("w5") + 0.1 * len(c.split()) for c in completions]


PROMPTS = datasets.Dataset.from_dict({"prompt": [
    " ".join(f"w{(7 * i + 3 * j) % (VOCAB - 4) + 4}" for j in range(3 + i % 4))
    for i in range(16)]})


class Grads(transformers.TrainerCallback):
    """Every parameter's gradient at each optimizer step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None})


def trainer(tmp_path, model, *, applied, dtype=torch.float32, peft_config=None, **config):
    options = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                   max_steps=2, logging_steps=1, learning_rate=1e-2, temperature=0.7, seed=0,
                   beta=0.05, num_iterations=2, entropy_coef=0.02, top_entropy_quantile=0.5,
                   model_init_kwargs={"dtype": dtype}, bf16=False)
    options.update(config)
    args = trl.GRPOConfig(str(tmp_path / ("fused" if applied else "stock")), report_to=[],
                          use_cpu=True, save_strategy="no", disable_tqdm=True,
                          dataloader_num_workers=0, **options)
    t = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=PROMPTS,
                        processing_class=tokenizer(), callbacks=[Grads()],
                        peft_config=peft_config)
    return fl_trl.apply(t) if applied else t


def grads_of(t):
    return next(c for c in t.callback_handler.callbacks if isinstance(c, Grads)).steps


def logs(t):
    return [h for h in t.state.log_history if "loss" in h]


class Calls:
    """Counts the calls of the fused head and of TRL's, with and without autograd."""

    def __init__(self, monkeypatch):
        self.ours, self.ours_no_grad, self.trl = 0, 0, 0
        ours, theirs = fl.linear_log_probs, trl.trainer.utils._ChunkedLogProbFunction.apply

        def counted(*args, **kwargs):
            self.ours += 1
            self.ours_no_grad += not torch.is_grad_enabled()
            return ours(*args, **kwargs)

        def trl_counted(*args, **kwargs):
            self.trl += 1
            return theirs(*args, **kwargs)

        monkeypatch.setattr(fl, "linear_log_probs", counted)
        monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", trl_counted)


GRPO_METRICS = ("loss", "entropy", "kl", "policy_loss", "grad_norm")


def assert_same_run(stock, fused, rtol=1e-5, atol=1e-6, lora=False, metrics=GRPO_METRICS,
                    required=()):
    """Two steps: the same completions, losses, metrics (``metrics`` where logged,
    ``required`` always) and gradients."""
    ref, out = logs(stock), logs(fused)
    assert len(ref) == len(out) == 2
    for a, b in zip(ref, out, strict=True):
        assert a.get("num_tokens") == b.get("num_tokens") and a.get("reward") == b.get("reward")
        assert all(key in a for key in required), (required, a)
        for key in (*metrics, *required):
            if key in a:
                assert math.isclose(b[key], a[key], rel_tol=rtol, abs_tol=atol), (key, a, b)
    ref_grads, grads = grads_of(stock), grads_of(fused)
    assert len(ref_grads) == len(grads) == 2
    for step, (g_ref, g) in enumerate(zip(ref_grads, grads, strict=True)):
        assert g.keys() == g_ref.keys() and len(g) >= 4  # (lm_head's weight: tied or not)
        assert lora == all("lora_" in name for name in g)
        for name, grad in g.items():
            torch.testing.assert_close(grad, g_ref[name], rtol=rtol, atol=atol,
                                       msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")


# ------------------------------------------------------------------------------------------
# Training against the stock trainer
# ------------------------------------------------------------------------------------------


def test_grpo_steps_match_stock(tmp_path, monkeypatch):
    """Temperature 0.7, a reference model (beta), the old policy's log-probs
    (num_iterations=2), the entropy bonus and the entropy-quantile mask; gradient
    checkpointing (GRPO's default)."""
    path = saved(tmp_path)
    stock = trainer(tmp_path, path, applied=False)
    stock.train()
    fused = trainer(tmp_path, path, applied=True)
    assert fl_trl.is_applied(fused) and fused.ref_model is not None
    calls = Calls(monkeypatch)
    fused.train()
    assert_same_run(stock, fused)
    # every log-prob came from the fused head: per step the policy's with autograd; at the
    # generation (step 0) the old policy's and the reference model's without
    assert calls.trl == 0
    assert calls.ours - calls.ours_no_grad == 2 and calls.ours_no_grad == 2
    assert all(h["entropy"] > 0 for h in logs(fused))


def test_softcap_cast_lm_head_to_fp32_and_bias(tmp_path, monkeypatch):
    """Gemma 2's final-logit softcapping and tied embeddings; TRL's cast_lm_head_to_fp32; no
    reference model, the default temperature."""
    path = saved(tmp_path, gemma2)
    stock = trainer(tmp_path, path, applied=False, cast_lm_head_to_fp32=True, beta=0.0,
                    temperature=1.0)
    stock.train()
    fused = trainer(tmp_path, path, applied=True, cast_lm_head_to_fp32=True, beta=0.0,
                    temperature=1.0)
    state = fused.model.__dict__[fl_trl._ATTR]
    assert state.softcap == 0.5 and state.cast_lm_head_to_fp32 and state.temperature == 1.0
    calls = Calls(monkeypatch)
    fused.train()
    assert_same_run(stock, fused)
    assert calls.trl == 0 and calls.ours > 0


@pytest.mark.parametrize("model", ["cohere", "granite"])
def test_scaled_logits_match_stock(tmp_path, monkeypatch, model):
    """Heads whose forward scales the logits (Cohere's logit_scale, a multiplier; Granite's
    logits_scaling, a divisor), which TRL's head scales too, before the temperature."""
    def make():
        if model == "cohere":
            return transformers.CohereForCausalLM(transformers.CohereConfig(**TEXT,
                                                                            logit_scale=3.0))
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(
            **TEXT, logits_scaling=0.25))

    path = saved(tmp_path, make)
    stock = trainer(tmp_path, path, applied=False, beta=0.0)
    stock.train()
    fused = trainer(tmp_path, path, applied=True, beta=0.0)
    assert fused.model.__dict__[fl_trl._ATTR].logit_scale == (3.0 if model == "cohere" else 4.0)
    calls = Calls(monkeypatch)
    fused.train()
    assert_same_run(stock, fused)
    assert calls.trl == 0 and calls.ours > 0


def test_moe_load_balancing_loss_matches_stock(tmp_path, monkeypatch):
    """A Mixture-of-Experts model (a tiny Mixtral) with its router's load-balancing loss, which
    TRL's head returns beside the log-probs and GRPO adds to its loss: two steps as stock, the
    aux_loss metric included."""
    def mixtral():
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **TEXT, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
            router_aux_loss_coef=0.5))

    path = saved(tmp_path, mixtral)
    stock = trainer(tmp_path, path, applied=False, beta=0.0)
    assert stock.aux_loss_enabled
    stock.train()
    fused = trainer(tmp_path, path, applied=True, beta=0.0)
    calls = Calls(monkeypatch)
    fused.train()
    assert_same_run(stock, fused, required=("aux_loss",))
    assert calls.trl == 0 and calls.ours > 0


def test_lm_head_bias_both_backends(tmp_path, backend):
    """One loss and its gradients through ``compute_loss`` on the same inputs, with a biased
    lm_head: the eager path and the Triton kernels (interpreted on the CPU)."""
    path = saved(tmp_path)
    results = []
    for applied in (False, True):
        t = trainer(tmp_path, path, applied=applied, beta=0.0, num_iterations=1)
        torch.manual_seed(3)
        t.model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.5)
        transformers.set_seed(0)
        inputs = t._generate_and_score_completions(next(iter(t.get_train_dataloader())))
        t.model.zero_grad(set_to_none=True)
        loss = t.compute_loss(t.model, inputs)
        loss.backward()
        results.append((inputs["completion_ids"], loss.detach(),
                        {n: p.grad for n, p in t.model.named_parameters() if p.grad is not None}))
    (ids, loss, grads), (ids_f, loss_f, grads_f) = results
    assert torch.equal(ids, ids_f) and "lm_head.bias" in grads_f
    torch.testing.assert_close(loss_f, loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-5, atol=1e-6, msg=name)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor with a dimension of ``size`` (the vocabulary) that an
    op creates, forward and backward."""

    def __init__(self, size):
        super().__init__()
        self.size, self.largest = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, list | tuple) else (out,):
            if isinstance(t, torch.Tensor) and self.size in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_logits_allocated(tmp_path):
    """The policy's log-probs and entropies of 8 x 64 completion tokens with a 4,096-token
    vocabulary, forward and backward, in chunks of 64 tokens: no tensor larger than a chunk's
    logits or the (vocab, hidden) weight."""
    vocab = 4096
    torch.manual_seed(0)
    path = tmp_path / "model"
    llama(vocab_size=vocab).save_pretrained(path)
    t = trainer(tmp_path, str(path), applied=True, beta=0.0)
    fl_trl.apply(t, chunk_size=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (8, 80), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with LargestTensor(vocab) as tracker:
        logps, entropies, _ = t._get_per_token_logps_and_entropies(
            t.model, ids, mask, 64, compute_entropy=True)
        (logps.sum() + entropies.sum()).backward()
    assert logps.shape == entropies.shape == (8, 64) and logps.dtype == torch.float32
    assert (logps[0, -5:] == 0).all() and (entropies[0, -5:] == 0).all()
    assert 0 < tracker.largest <= max(64 * vocab, vocab * 32), tracker.largest
    assert tracker.largest < ids.numel() * vocab // 8


def test_torch_compile(tmp_path):
    """A compiled policy (Trainer's torch_compile): the head runs outside the graph, the same
    log-probs, entropies and gradients."""
    t = trainer(tmp_path, saved(tmp_path), applied=True, beta=0.0)
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    results = []
    for model in (t.model, torch.compile(t.model, backend="eager")):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()
        results.append((out.log_probs, out.entropy, t.model.model.norm.weight.grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_trainer_torch_compile_reference_model(tmp_path, monkeypatch):
    """torch_compile=True: the trainer's accelerator compiles the reference model when the
    trainer is built (``ref_model`` is the compiled wrapper); apply serves the module it calls,
    with the same log-probs as TRL's head there."""
    t = trainer(tmp_path, saved(tmp_path), applied=False, torch_compile=True,
                torch_compile_backend="eager")
    assert isinstance(t.ref_model, torch._dynamo.eval_frame.OptimizedModule)
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    calls = Calls(monkeypatch)
    with torch.no_grad():
        stock = t.ref_model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        fl_trl.apply(t)
        fused = t.ref_model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert calls.trl == 1 and calls.ours == 1
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-6)
    fl_trl.revert(t)
    assert not fl_trl.is_applied(t)
    assert t.ref_model._orig_mod.forward.__func__.__code__ is fl_trl._TRL_FORWARD


def sft_trainer(tmp_path, path, *, applied, **config):
    options = dict(per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                   learning_rate=1e-2, seed=0, max_length=16, packing=False,
                   model_init_kwargs={"dtype": torch.float32})
    options.update(config)
    args = trl.SFTConfig(str(tmp_path / ("sft-fused" if applied else "sft-stock")),
                         report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                         disable_tqdm=True, dataloader_num_workers=0, **options)
    texts = datasets.Dataset.from_dict({"prompt": PROMPTS["prompt"], "completion": [
        " ".join(f"w{(5 * i + 11 * j) % (VOCAB - 4) + 4}" for j in range(2 + i % 5))
        for i in range(len(PROMPTS))]})
    t = trl.SFTTrainer(model=path, args=args, train_dataset=texts,
                       processing_class=tokenizer(), callbacks=[Grads()])
    return fl_trl.apply(t) if applied else t


def test_sft_steps_match_stock(tmp_path, monkeypatch):
    """SFTTrainer (temperature 1; TRL's head returns the entropy and is-top-1 for its
    ``entropy`` and ``mean_token_accuracy`` metrics): two steps, the same losses, metrics and
    gradients, every log-prob from the fused head."""
    path = saved(tmp_path)
    stock = sft_trainer(tmp_path, path, applied=False)
    stock.train()
    fused = sft_trainer(tmp_path, path, applied=True)
    assert fused.model.__dict__[fl_trl._ATTR].outputs == ("entropy", "is_top1")
    calls = Calls(monkeypatch)
    fused.train()
    assert calls.trl == 0 and calls.ours >= 2
    assert_same_run(stock, fused, metrics=(),
                    required=("loss", "entropy", "mean_token_accuracy", "grad_norm"))


def test_rloo_steps_match_stock(tmp_path, monkeypatch):
    """RLOOTrainer (temperature 0.7, a reference model): two steps as stock."""
    path = saved(tmp_path)
    runs = []
    for applied in (False, True):
        args = trl.RLOOConfig(str(tmp_path / f"rloo-{applied}"), report_to=[], use_cpu=True,
                              bf16=False, save_strategy="no", disable_tqdm=True,
                              dataloader_num_workers=0, per_device_train_batch_size=4,
                              num_generations=4, max_completion_length=8, max_steps=2,
                              logging_steps=1, learning_rate=1e-2, temperature=0.7, seed=0,
                              beta=0.05, model_init_kwargs={"dtype": torch.float32})
        t = trl.RLOOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=PROMPTS,
                            processing_class=tokenizer(), callbacks=[Grads()])
        if applied:
            fl_trl.apply(t)
            calls = Calls(monkeypatch)
        t.train()
        runs.append(t)
    assert calls.trl == 0 and calls.ours >= 2
    assert_same_run(*runs)


def offline_steps_match_stock(tmp_path, monkeypatch, name: str, data, outputs: tuple,
                              prefixes: tuple, **config):
    """Two steps of the offline trainer ``trl.<name>Trainer`` on ``data``, stock and applied:
    TRL's head set up for ``outputs`` (beyond log p), every log-prob from the fused head, the
    same loss, the metrics starting with ``prefixes`` (``logits/*`` among them: the mean
    logits TRL's head returns) and gradients."""
    path = saved(tmp_path)
    runs = []
    for applied in (False, True):
        args = getattr(trl, f"{name}Config")(
            str(tmp_path / f"{name}-{applied}"), report_to=[], use_cpu=True, bf16=False,
            save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            per_device_train_batch_size=4, max_steps=2, logging_steps=1, learning_rate=1e-2,
            seed=0, model_init_kwargs={"dtype": torch.float32}, **config)
        t = getattr(trl, f"{name}Trainer")(model=path, args=args, train_dataset=data,
                                           processing_class=tokenizer(), callbacks=[Grads()])
        if applied:
            fl_trl.apply(t)
            assert t.model.__dict__[fl_trl._ATTR].outputs == outputs
            calls = Calls(monkeypatch)
        t.train()
        runs.append(t)
    assert calls.trl == 0 and calls.ours >= 2
    metrics = tuple(k for k in logs(runs[0])[0] if k.startswith(prefixes))
    assert any(k.startswith("logits/") for k in metrics), logs(runs[0])[0]
    assert_same_run(*runs, metrics=metrics, required=("loss",))


def test_kto_steps_match_stock(tmp_path, monkeypatch):
    """KTOTrainer (a reference model; TRL's head returns the mean logit of its ``logits/*``
    metrics): two steps as stock (the loss, logits/*, logps/*, rewards/*)."""
    data = datasets.Dataset.from_dict({
        "prompt": PROMPTS["prompt"],
        "completion": [f"w{4 + i} w{9 + 2 * i}" for i in range(len(PROMPTS))],
        "label": [i % 2 == 0 for i in range(len(PROMPTS))]})
    offline_steps_match_stock(tmp_path, monkeypatch, "KTO", data, ("entropy", "mean_logits"),
                              ("logits/", "logps/", "rewards/"))


@pytest.mark.parametrize("weighting", [False, True])
def test_dpo_steps_match_stock(tmp_path, monkeypatch, weighting):
    """DPOTrainer (a reference model; TRL's head returns the entropy, mean logit and is-top-1
    of its metrics, and log sum p^2 for WPO's weights with ``use_weighting``): two steps as
    stock (the loss, logits/*, logps/*, rewards/*, the token accuracy, the entropy)."""
    data = datasets.Dataset.from_dict({
        "prompt": PROMPTS["prompt"],
        "chosen": [f"w{4 + i} w{9 + 2 * i} w5" for i in range(len(PROMPTS))],
        "rejected": [f"w{30 + i} w{60 - i}" for i in range(len(PROMPTS))]})
    outputs = ("entropy", "mean_logits", "is_top1") + ("log_sum_sq_probs",) * weighting
    offline_steps_match_stock(tmp_path, monkeypatch, "DPO", data, outputs,
                              ("logits/", "logps/", "rewards/", "mean_token", "entropy"),
                              use_weighting=weighting)


def test_every_output_of_trls_head(tmp_path, backend):
    """A head set up for all of TRL's per-token outputs: log-probs, entropy, log sum p^2, the
    mean logit and is-top-1 as TRL's head gives them (0 / False where the label is ignored),
    the loss, and the gradients of log-probs and entropy; both backends."""
    t = trainer(tmp_path, saved(tmp_path), applied=False, beta=0.0)
    model = t.model
    trl.trainer.utils.add_fused_lm_head(model, temperature=0.7,
                                        outputs=fl.LogProbOutputs._fields)
    ids = torch.randint(4, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7] = -100
    results = []
    for applied in (False, True):
        if applied:
            fl_trl.apply(t)
            assert model.__dict__[fl_trl._ATTR].outputs == fl.LogProbOutputs._fields[1:]
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        results.append((out, model.model.norm.weight.grad.clone()))
    (ref, g_ref), (out, g) = results
    mask = labels[:, 1:] != -100
    assert torch.equal(out.label_mask, ref.label_mask) and torch.equal(out.label_mask, mask)
    for name in fl.LogProbOutputs._fields:
        a, b = getattr(ref, name), getattr(out, name)
        assert b is not None and b.dtype == a.dtype and b.shape == a.shape, name
        if name == "is_top1":
            assert torch.equal(b, a) and not b[~mask].any()
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
            assert (b[~mask] == 0).all(), name
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------


def test_bf16_log_probs_closer_to_float64_than_trl(tmp_path):
    """A bfloat16 model, logits of a few units: TRL's head rounds each tile of logits to
    bfloat16 before the log-softmax; ours forms them in float32 from the same bfloat16
    operands. Against the float64 truth on those operands (the hidden states the backbone
    gave, lm_head's weight), ours is within 2e-3 nats, and closer than TRL's. With TRL's
    cast_lm_head_to_fp32 (float32 operands for both heads) the two agree."""
    path = saved(tmp_path, lambda: llama(hidden_size=64, head_dim=32, initializer_range=0.5),
                 dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    results = {}
    for cast in (False, True):
        for applied in (False, True):
            t = trainer(tmp_path, path, applied=applied, dtype=torch.bfloat16, beta=0.0,
                        temperature=0.7, cast_lm_head_to_fp32=cast)
            model = t.model
            assert model.model.dtype == torch.bfloat16
            seen = {}

            def keep(module, args, out, seen=seen):
                seen["h"] = out.last_hidden_state.detach()

            hook = model.model.register_forward_hook(keep)
            with torch.no_grad():
                logps, ent, _ = t._get_per_token_logps_and_entropies(model, ids, mask, 16,
                                                                     compute_entropy=True)
            hook.remove()
            assert logps.dtype == ent.dtype == torch.float32
            z = seen["h"][:, -17:-1].double() @ model.lm_head.weight.double().T / 0.7
            assert z.std() > 2  # logits of a few units, as a trained model's
            truth = z.log_softmax(-1).gather(-1, ids[:, -16:, None]).squeeze(-1)
            truth_ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
            results[cast, applied] = (logps, ent, (logps.double() - truth).abs().max().item(),
                                      (ent.double() - truth_ent).abs().max().item())
    (*_, trl_lp, trl_ent), (*_, ours_lp, ours_ent) = results[False, False], results[False, True]
    print(f"\nmax |error| vs float64, bf16 operands: log-probs ours {ours_lp:.1e}, TRL "
          f"{trl_lp:.1e}; entropy ours {ours_ent:.1e}, TRL {trl_ent:.1e}")
    assert ours_lp <= 2e-3 and ours_ent <= 2e-3
    assert ours_lp < trl_lp / 10 and ours_ent < trl_ent
    (trl_lp, trl_ent, *_), (lp, ent, *errors) = results[True, False], results[True, True]
    assert max(errors) <= 2e-3
    torch.testing.assert_close(lp, trl_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, trl_ent, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# revert, generation, refusals
# ------------------------------------------------------------------------------------------


def test_revert_and_generate_unchanged(tmp_path):
    path = saved(tmp_path)
    t = trainer(tmp_path, path, applied=False)
    trl_forwards = [m.forward for m in fl_trl._models(t)]
    ids = torch.tensor([[5, 6, 7, 8]])
    transformers.set_seed(0)
    expected = t.model.generate(ids, max_new_tokens=4, do_sample=False)
    fl_trl.apply(t)
    assert all(m.forward is not f for m, f in zip(fl_trl._models(t), trl_forwards, strict=True))
    assert torch.equal(t.model.generate(ids, max_new_tokens=4, do_sample=False), expected)
    fl_trl.apply(t, chunk_size=16)  # a second call: the options only
    assert t.model.__dict__[fl_trl._ATTR].chunk_size == 16
    fl_trl.revert(t)
    assert not fl_trl.is_applied(t)
    assert [m.forward for m in fl_trl._models(t)] == trl_forwards


def test_accelerate_mixed_precision_wrapper(tmp_path, monkeypatch):
    """bf16=True: accelerate's prepare_model sets each model's forward to an autocast wrapper
    of TRL's, the reference model's when the trainer is built, the policy's when training
    starts. apply serves both models, before and after that, the fused calls under the
    wrapper's autocast; revert gives back the wrapper of TRL's head."""
    t = trainer(tmp_path, saved(tmp_path), applied=False, bf16=True, max_steps=1)
    ref = t.ref_model
    assert "_original_forward" in ref.__dict__ and "_original_forward" not in t.model.__dict__
    dtypes = []
    for m in fl_trl._models(t):
        m.model.layers[0].mlp.down_proj.register_forward_hook(
            lambda module, args, out: dtypes.append(out.dtype))
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    fl_trl.apply(t)
    calls = Calls(monkeypatch)
    out = ref(input_ids=ids, labels=labels, fused_lm_head=True)
    assert calls.ours == 1 and dtypes == [torch.bfloat16] and out.log_probs.dtype == torch.float32
    t.train()  # the policy is wrapped now, around the fused head
    assert "_original_forward" in t.model.__dict__ and fl_trl.is_applied(t) and calls.trl == 0
    fl_trl.revert(t)
    for m in fl_trl._models(t):
        dtypes.clear()
        m(input_ids=ids, labels=labels, fused_lm_head=True)
        assert dtypes == [torch.bfloat16]
    assert calls.trl == 2
    fl_trl.apply(t)
    t.model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert calls.trl == 2 and fl_trl.is_applied(t)


def test_refusals(tmp_path):
    with pytest.raises(TypeError, match="expected a trl trainer among"):
        fl_trl.apply(object())
    path = saved(tmp_path)
    with pytest.raises(ValueError, match="chunk_size"):
        fl_trl.apply(trainer(tmp_path, path, applied=False), chunk_size=0)

    # an lm_head that is not a plain nn.Linear
    t = trainer(tmp_path, path, applied=False, beta=0.0)
    t.model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB, bias=False))
    with pytest.raises(TypeError, match="expected a plain torch.nn.Linear"):
        fl_trl.apply(t)
    assert not fl_trl.is_applied(t)

    # the temperature changed after TRL's head was built
    t = trainer(tmp_path, path, applied=False)
    t.temperature = 0.5
    with pytest.raises(ValueError, match="temperature 0.7"):
        fl_trl.apply(t)
    assert not fl_trl.is_applied(t) and not fl_trl._models(t)[1].__dict__.get(fl_trl._ATTR)

    # a forward that scales its logits otherwise than TRL's head does (TRL reads the scale
    # off the config when it builds its head)
    torch.manual_seed(0)
    cohere = tmp_path / "cohere"
    transformers.CohereForCausalLM(transformers.CohereConfig(**TEXT)).save_pretrained(cohere)
    t = trainer(tmp_path, str(cohere), applied=False, beta=0.0)
    t.model.logit_scale = 0.5
    with pytest.raises(ValueError, match=r"cannot serve this trainer.*scales its logits by "
                                         r"0.5 in .*TRL's head by 0.0625"):
        fl_trl.apply(t)

    # a vision-language model (given a plain tokenizer, TRL still puts its head on it)
    torch.manual_seed(0)
    vlm = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=dict(TEXT, final_logit_softcapping=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4, image_token_index=5))
    with pytest.raises(ValueError, match="multimodal model"):
        fl_trl.apply(trainer(tmp_path, vlm, applied=False, beta=0.0))

    # not TRL's fused head
    t = trainer(tmp_path, path, applied=False, beta=0.0)
    del t.model.forward
    with pytest.raises(TypeError, match="has no TRL fused head"):
        fl_trl.apply(t)

    # a wrapper that keeps TRL's forward as accelerate's does, but does not call it
    t = trainer(tmp_path, path, applied=False, beta=0.0)
    t.model._original_forward = t.model.forward
    t.model.forward = lambda *args, **kwargs: None
    with pytest.raises(TypeError, match="something other than accelerate's"):
        fl_trl.apply(t)
    assert not fl_trl.is_applied(t)


# ------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------


def test_peft_lora_matches_stock(tmp_path, monkeypatch):
    """LoRA on the attention projections: TRL's head sits on the base model, the reference
    log-probs come from the same model with the adapter disabled (beta > 0)."""
    peft = pytest.importorskip("peft")
    path = saved(tmp_path)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    stock = trainer(tmp_path, path, applied=False, peft_config=peft.LoraConfig(**lora))
    stock.train()
    fused = trainer(tmp_path, path, applied=True, peft_config=peft.LoraConfig(**lora))
    assert fused.ref_model is None and fl_trl.is_applied(fused)
    calls = Calls(monkeypatch)
    fused.train()
    assert_same_run(stock, fused, lora=True)
    assert calls.trl == 0 and calls.ours_no_grad == 2


def test_peft_on_lm_head_refused(tmp_path):
    peft = pytest.importorskip("peft")
    path = saved(tmp_path)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    t = trainer(tmp_path, path, applied=False, beta=0.0, peft_config=config)
    with pytest.raises(ValueError, match="PEFT adapter on lm_head"):
        fl_trl.apply(t)
    assert not fl_trl.is_applied(t)
