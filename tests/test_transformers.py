"""fused_losses.integrations.transformers against the stock transformers models, on the CPU.

Tiny randomly initialised models built from their config classes (no downloads): for each
family, the fused model's loss and every parameter's gradient against a copy running the stock
forward (with ``-100`` labels, ``num_items_in_batch``, ``shift_labels``, ``logits_to_keep``, the
Gemma softcap, tied and untied embeddings); AdamW and ``Trainer`` (gradient accumulation)
tracking the stock losses; no ``(batch x seq, vocab)`` tensor (a dispatch-mode tracker); the
stock logits without labels; ``revert``; the refusals; autocast, bfloat16 and
``torch.compile``.
"""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from fused_losses.integrations import transformers as fl_hf  # noqa: E402

VOCAB = 512
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


def _llama(**kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TEXT, **kw}))


def _gemma3_vision():
    config = transformers.Gemma3Config(
        text_config=dict(TEXT, final_logit_softcapping=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4, image_token_index=5,
    )
    return transformers.Gemma3ForConditionalGeneration(config)


def _qwen2_5_vl():
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=32),
        image_token_id=5, video_token_id=6, vision_start_token_id=7,
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def _blt():
    small = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                 intermediate_size=64)
    local = dict(small, hidden_size_global=32, cross_attn_k=2)
    return transformers.BltForCausalLM(transformers.BltConfig(
        vocab_size=VOCAB, patcher_config=small, encoder_config=local, decoder_config=local,
        global_config=small, encoder_hash_byte_group_vocab=64,
        encoder_hash_byte_group_size=[3, 4], cross_attn_k=2, max_position_embeddings=64,
        local_attention_window_len=16, use_cache=False))


MAMBA = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2)
GPT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
SSM = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
           mamba_chunk_size=8)


def _scaled(model_cls, config_cls, **kw):
    """A logit-scaled family: a scale far from 1, so that ignoring it changes the loss."""
    return lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(
        **{**TEXT, **kw}))

FAMILIES = {
    "llama": _llama,
    "llama-tied": functools.partial(_llama, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**TEXT)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TEXT)),
    # a small softcap, so that ignoring it would change the loss
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**TEXT, final_logit_softcapping=0.5)),
    "gemma3-text": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**TEXT, final_logit_softcapping=0.5)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**TEXT)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    "gemma3-vision": _gemma3_vision,
    "qwen2.5-vl": _qwen2_5_vl,
    # `logits = self.lm_head(h).float()` (the stock loss upcasts the logits itself)
    "mamba": lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
        **MAMBA, state_size=4)),
    "mamba2": lambda: transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        **MAMBA, num_heads=4, head_dim=16, state_size=8, n_groups=1, chunk_size=8)),
    "falcon_mamba": lambda: transformers.FalconMambaForCausalLM(
        transformers.FalconMambaConfig(**MAMBA, state_size=4)),
    "mllama": lambda: transformers.MllamaForCausalLM(transformers.MllamaTextConfig(
        **{k: v for k, v in TEXT.items() if k != "head_dim"}, cross_attention_layers=[1])),
    "nemotron_h": lambda: transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        **{k: v for k, v in TEXT.items() if k != "num_hidden_layers"},
        layers_block_type=["mamba", "attention", "mlp"], ssm_state_size=8, mamba_num_heads=4,
        mamba_head_dim=16, n_groups=1, chunk_size=8)),
    "blt": _blt,
    # the output layer under another name (get_output_embeddings() names it)
    "biogpt": lambda: transformers.BioGptForCausalLM(transformers.BioGptConfig(
        **GPT, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "gpt_neox_japanese": lambda: transformers.GPTNeoXJapaneseForCausalLM(
        transformers.GPTNeoXJapaneseConfig(**GPT, attention_dropout=0.0, bos_token_id=1,
                                           eos_token_id=2)),
    "rwkv": lambda: transformers.RwkvForCausalLM(transformers.RwkvConfig(
        **{k: v for k, v in GPT.items() if k != "num_attention_heads"}, context_length=64)),
    # a logit scale: `logits * self.logit_scale` (Cohere), `logits / config.logits_scaling`
    # (Granite), `self.lm_head(h) * S` (FalconH1's lm_head_multiplier, HyperCLOVA X)
    "cohere": _scaled("CohereForCausalLM", "CohereConfig", logit_scale=3.0),
    "cohere2": _scaled("Cohere2ForCausalLM", "Cohere2Config", logit_scale=3.0, sliding_window=8),
    "granite": _scaled("GraniteForCausalLM", "GraniteConfig", logits_scaling=0.3),
    "granitemoe": _scaled("GraniteMoeForCausalLM", "GraniteMoeConfig", logits_scaling=0.3,
                          **MOE),
    "granitemoeshared": _scaled("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig",
                                logits_scaling=0.3, shared_intermediate_size=64, **MOE),
    "granitemoehybrid": _scaled("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
                                logits_scaling=0.3, shared_intermediate_size=64,
                                layer_types=["mamba", "attention"], **SSM, **MOE),
    "falcon_h1": _scaled("FalconH1ForCausalLM", "FalconH1Config", lm_head_multiplier=2.5,
                         mamba_d_ssm=64, **SSM),
    "hyperclovax": _scaled("HyperCLOVAXForCausalLM", "HyperCLOVAXConfig", logits_scaling=2.5),
    "cohere2_moe": _scaled("Cohere2MoeForCausalLM", "Cohere2MoeConfig", logit_scale=3.0,
                           num_experts=4, num_experts_per_tok=2, sliding_window=8),
    "granite_swa": _scaled("GraniteSWAForCausalLM", "GraniteSWAConfig", logits_scaling=0.3),
    "granitemoe_swa": _scaled("GraniteMoeSWAForCausalLM", "GraniteMoeSWAConfig",
                              logits_scaling=0.3, **MOE),
}
# RWKV's embeddings are initialised ~1e-4 and layer-normed at once (`pre_ln`), which scales
# their gradient up ~1e3 (to ~3e2): float32 rounding anywhere downstream (here the loss's last
# unit) shows there at ~1e-7 of the tensor's largest entry, as the project's tolerance policy
# allows for float32 cancellation (its `2e-6 max|ref|` term), applied per tensor.
SCALED_ATOL = {"rwkv"}


def pair(family="llama", **options):
    """A tiny model of the family and a copy of it with the integration applied."""
    torch.manual_seed(0)
    stock = FAMILIES[family]()
    fused = fl_hf.apply(copy.deepcopy(stock), **options)
    return stock, fused


def batch(b=2, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[-1, -3:] = -100  # padding
    return ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_training(stock, fused, rtol=1e-5, atol=1e-6, prefix="", scaled_atol=False,
                         **inputs):
    """The fused model's loss and every parameter's gradient match the stock model's
    (``scaled_atol``: each gradient's ``atol`` at least ``2e-6`` of its largest entry)."""
    ref, ref_grads = loss_and_grads(stock, **inputs)
    out, grads = loss_and_grads(fused, **inputs)
    grads = {n.removeprefix(prefix): g for n, g in grads.items()}
    assert out.loss.dtype == ref.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        ref_g = ref_grads[name]
        tol = max(atol, 2e-6 * ref_g.abs().max().item()) if scaled_atol else atol
        torch.testing.assert_close(g, ref_g, rtol=rtol, atol=tol, msg=name)
    assert out.logits is None and "logits" not in out
    return out, ref


def assert_near(actual, expected, what, tol=2**-5):
    """Half-precision training: the roundings of a bfloat16 backward through the layers
    differ elementwise; the gradient as a whole stays within ``tol`` (relative norm)."""
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err <= tol, f"{what}: relative error {err:.2e}"


# ------------------------------------------------------------------------------------------
# Every family: loss and gradients, num_items_in_batch, logits without labels, revert
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_stock(family):
    stock, fused = pair(family)
    ids, labels = batch()
    scaled = family in SCALED_ATOL
    assert_same_training(stock, fused, input_ids=ids, labels=labels, scaled_atol=scaled)
    # the gradient-accumulation fix: the token sum over a count of the whole batch
    n = torch.tensor(37)
    out, _ = assert_same_training(stock, fused, input_ids=ids, labels=labels,
                                  num_items_in_batch=n, scaled_atol=scaled)
    assert out.loss.grad_fn.name() != "NllLossBackward0"
    # without labels: the stock forward, its logits bit for bit
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, stock(input_ids=ids).logits)
    head = fused.get_output_embeddings()  # lm_head, or BioGPT's output_projection, ...
    assert "forward" in head.__dict__
    fl_hf.revert(fused)
    assert not fl_hf.is_applied(fused) and "forward" not in head.__dict__
    ref, _ = loss_and_grads(stock, input_ids=ids, labels=labels)
    out, _ = loss_and_grads(fused, input_ids=ids, labels=labels)
    assert out.logits is not None and torch.equal(out.loss, ref.loss)


def test_both_backends(backend):
    """The fused head on the eager path and on the Triton kernels (interpreted on the CPU);
    an lm_head with a bias."""
    stock, fused = pair("llama")
    stock.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.1)
    fused.lm_head.bias = torch.nn.Parameter(stock.lm_head.bias.detach().clone())
    ids, labels = batch(s=12)
    assert_same_training(stock, fused, input_ids=ids, labels=labels)
    assert_same_training(stock, fused, input_ids=ids, labels=labels,
                         num_items_in_batch=torch.tensor(30))


def test_shift_labels_logits_to_keep_and_ignore_index():
    stock, fused = pair("llama")
    ids, labels = batch()
    shift = torch.roll(labels, -1, dims=1)
    shift[:, -1] = -100
    shift[1, :4] = -100
    assert_same_training(stock, fused, input_ids=ids, labels=labels, shift_labels=shift)
    # labels for the kept positions only, as the stock loss needs them
    assert_same_training(stock, fused, input_ids=ids, labels=labels[:, -6:], logits_to_keep=6)
    every = labels.clone()
    every[1] = -100  # a row without a counted token
    assert_same_training(stock, fused, input_ids=ids, labels=every)


def test_positional_labels_and_tuple_output():
    stock, fused = pair("gpt2")
    ids, labels = batch()
    params = list(inspect.signature(type(stock).forward).parameters)[1:]  # without self
    args = (ids, *[None] * (params.index("labels") - 1), labels)
    ref = stock(*args, return_dict=False)
    out = fused(*args, return_dict=False)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    assert len(out) == len(ref) - 1  # the logits left out, as a None field would be
    assert not any(isinstance(v, torch.Tensor) and v.shape[-1:] == (0,) for v in out)


def test_options_label_smoothing_and_z_loss():
    stock, fused = pair("gemma2", label_smoothing=0.1, z_loss=1e-3)
    ids, labels = batch()
    out = fused(input_ids=ids, labels=labels)
    with torch.no_grad():
        logits = stock(input_ids=ids).logits.double()  # softcapped by the stock forward
    target = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    logits = logits.reshape(-1, VOCAB)
    counted = target != -100
    ce = F.cross_entropy(logits, target, label_smoothing=0.1)
    z = (logits.logsumexp(-1)[counted] ** 2).mean()
    torch.testing.assert_close(out.loss.double(), ce + 1e-3 * z, rtol=1e-5, atol=0)
    # apply() again: the options replaced, nothing stacked
    assert fl_hf.apply(fused) is fused
    assert fused.forward.__wrapped__ is type(fused).forward
    assert_same_training(stock, fused, input_ids=ids, labels=labels)


def test_five_adamw_steps_track_stock():
    stock, fused = pair("qwen3")
    losses = {}
    for name, model in (("stock", stock), ("fused", fused)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        ids, labels = batch(b=4)
        for _ in range(5):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["fused"][-1] < losses["fused"][0]
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["stock"]),
                               rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------
# Memory: no (batch x seq, vocab) tensor
# ------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """The largest tensor with a dimension of ``size`` (the vocabulary) that any op creates,
    forward and backward, by elements (and the float32 ones apart)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.largest, self.largest_float32 = size, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, list | tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" \
                    and self.size in t.shape:
                self.largest = max(self.largest, t.numel())
                if t.dtype == torch.float32:
                    self.largest_float32 = max(self.largest_float32, t.numel())
        return out


def test_no_logits_allocated(backend):
    """From 1,024 tokens on, the default plan holds at most an eighth of the logits (the
    interpreted kernels: 256 tokens in chunks of 32). The (vocab, hidden) weight and its
    gradient are that size too here."""
    triton = backend == "triton"
    stock, fused = pair("llama-tied", chunk_size=32 if triton else None)
    ids, labels = batch(b=2, s=128) if triton else batch(b=4, s=256)
    n_logits = ids.numel() * VOCAB
    for model, bound in ((fused, n_logits // 8), (stock, None)):
        with LargestTensor(VOCAB) as tracker:
            model(input_ids=ids, labels=labels).loss.backward()
        if bound is None:
            assert tracker.largest >= n_logits  # the stock model: the logits exist
        else:
            assert tracker.largest <= bound, (tracker.largest, n_logits)


def test_plain_loss_path_keeps_bf16_logits(backend):
    """causal_lm_loss as model.loss_function: the stock loss; on the kernels, without a
    float32 copy of the bfloat16 logits (the eager formula makes one, by design)."""
    torch.manual_seed(0)
    stock = _llama().to(torch.bfloat16)
    plain = copy.deepcopy(stock)
    plain.loss_function = fl_hf.causal_lm_loss
    ids, labels = batch()
    n = torch.tensor(20)
    ref, ref_grads = loss_and_grads(stock, input_ids=ids, labels=labels, num_items_in_batch=n)
    with LargestTensor(VOCAB) as tracker:
        out, grads = loss_and_grads(plain, input_ids=ids, labels=labels, num_items_in_batch=n)
    if backend == "triton":
        assert tracker.largest_float32 < ids.numel() * VOCAB // 8
    assert out.loss.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    for name, g in grads.items():
        assert_near(g, ref_grads[name], name)
    # applied, a direct call of the stock forward (no armed head) takes the plain path
    fl_hf.apply(plain)
    direct = type(plain).forward(plain, input_ids=ids, labels=labels, num_items_in_batch=n)
    assert direct.logits is not None
    torch.testing.assert_close(direct.loss, ref.loss, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------
# Precision, autocast, torch.compile
# ------------------------------------------------------------------------------------------


def test_bf16_model_and_autocast():
    stock, fused = pair("llama")
    ids, labels = batch()
    for case in ("autocast", "bfloat16"):
        if case == "bfloat16":
            stock.to(torch.bfloat16), fused.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
            ref, ref_grads = loss_and_grads(stock, input_ids=ids, labels=labels)
            out, grads = loss_and_grads(fused, input_ids=ids, labels=labels)
        assert out.loss.dtype == torch.float32 and out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, rtol=2**-8, atol=0)
        for name, g in grads.items():
            assert g.dtype == ref_grads[name].dtype
            assert_near(g, ref_grads[name], f"{case}: {name}")


def test_torch_compile():
    torch._dynamo.reset()
    stock, fused = pair("llama")
    compiled = torch.compile(fused, backend="eager")
    for seed in (1, 2):  # the second call runs the compiled graphs
        ids, labels = batch(seed=seed)
        assert_same_training(stock, compiled, input_ids=ids, labels=labels,
                             num_items_in_batch=torch.tensor(25), prefix="_orig_mod.")
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, stock(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------
# Trainer, generate, and what changes the model
# ------------------------------------------------------------------------------------------


def test_trainer_gradient_accumulation(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    data = []
    g = torch.Generator().manual_seed(3)
    for i in range(12):
        ids = torch.randint(8, VOCAB, (16,), generator=g)
        labels = ids.clone()
        labels[: (i * 5) % 13] = -100  # uneven counts: num_items_in_batch matters
        data.append({"input_ids": ids, "labels": labels})
    history = {}
    stock, fused = pair("llama")
    calls = []
    monkeypatch.setattr(fl_hf.fl, "linear_cross_entropy",
                        lambda *a, _f=fl_hf.fl.linear_cross_entropy, **k: calls.append(1)
                        or _f(*a, **k))
    for name, model in (("stock", stock), ("fused", fused)):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=3, learning_rate=3e-3, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        history[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        history[name].append(trainer.evaluate(data[:4])["eval_loss"])  # logits None: fine
    assert len(history["fused"]) == 4 and len(calls) == 7  # 3 steps of 2 micro-batches, eval
    torch.testing.assert_close(torch.tensor(history["fused"]), torch.tensor(history["stock"]),
                               rtol=1e-5, atol=0)


def test_generate_unchanged():
    stock, fused = pair("llama")
    ids, _ = batch(b=1, s=6)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(ids, **kw), stock.generate(ids, **kw))


@pytest.mark.parametrize("family", ["llama", "biogpt"])  # biogpt: `output_projection`
def test_resized_embeddings_and_deepcopy(family):
    stock, fused = pair(family)
    for model in (stock, fused):  # fused: a new lm_head module
        torch.manual_seed(5)
        model.resize_token_embeddings(VOCAB + 64, mean_resizing=False)
    ids, labels = batch()
    labels[0, -1] = VOCAB + 10
    assert_same_training(stock, fused, input_ids=ids, labels=labels)
    twin = copy.deepcopy(fused)
    assert fl_hf.is_applied(twin)
    assert_same_training(stock, twin, input_ids=ids, labels=labels)


def test_refusals():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="expected a transformers causal LM"):
        fl_hf.apply(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="has no lm_head"):
        fl_hf.apply(transformers.LlamaModel(transformers.LlamaConfig(**TEXT)))
    custom = _llama()
    custom.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB, bias=False))
    with pytest.raises(TypeError, match="expected a plain torch.nn.Linear"):
        fl_hf.apply(custom)
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(**TEXT))
    cohere.logit_scale = torch.nn.Parameter(torch.tensor(0.5))  # a learned scale
    with pytest.raises(ValueError, match=r"logits \* self.logit_scale` by a Parameter"):
        fl_hf.apply(cohere)
    assert not fl_hf.is_applied(cohere)
    other = _llama()
    other.loss_function = lambda logits, labels, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="expected transformers' ForCausalLMLoss"):
        fl_hf.apply(other)
    with pytest.raises(TypeError, match="before torch.compile"):
        fl_hf.apply(torch.compile(_llama(), backend="eager"))
    with pytest.raises(ValueError, match="label_smoothing"):
        fl_hf.apply(_llama(), label_smoothing=2.0)


def test_refusal_of_a_loss_computed_without_loss_function():
    """The encoder-decoder families' causal LMs (BART, Marian, mBART, Pegasus, ...) compute
    their loss with their own CrossEntropyLoss: the message says so, not which line happens
    to read the logits first (`labels = labels.to(logits.device)`)."""
    torch.manual_seed(0)
    bart = transformers.BartForCausalLM(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"BartForCausalLM\.forward does not compute its loss "
                       r"with self\.loss_function \(it computes it in `loss = loss_fct\(") as e:
        fl_hf.apply(bart)
    assert "labels.to" not in str(e.value) and not fl_hf.is_applied(bart)


VARIANT = '''
import torch
import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast


class Variant(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden_states){tail}
{steps}
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
{after}
        return CausalLMOutputWithPast(loss=loss, logits=logits)
'''


@pytest.fixture
def variant(tmp_path):
    """``variant(tail, steps, after)``: a LlamaForCausalLM subclass whose forward is VARIANT
    with ``tail`` after ``self.lm_head(...)`` and the lines ``steps`` after that line and
    ``after`` after the loss (each indented as the body), from a file (its source is read)."""
    import importlib.util
    import sys
    import textwrap

    names = []

    def make(tail="", steps="", after=""):
        code = VARIANT.replace("{tail}", tail)
        for key, lines in (("{steps}", steps), ("{after}", after)):
            code = code.replace(key, textwrap.indent(textwrap.dedent(lines), " " * 8))
        path = tmp_path / f"variant_{len(names)}.py"
        path.write_text(code)
        spec = importlib.util.spec_from_file_location(f"{tmp_path.name}_{len(names)}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        names.append(spec.name)
        spec.loader.exec_module(module)
        return module.Variant

    yield make
    for name in names:
        del sys.modules[name]


@pytest.mark.parametrize("tail, refused", [
    (".float()", None),  # Mamba, Mllama, NemotronH, BLT
    (".contiguous().float()", None),
    (".double()", "double"),  # a float64 loss: not what the fused loss computes
    (".bfloat16().float()", "bfloat16"),  # logits rounded to bfloat16 first
    (".float().half()", "half"),
    (".to(torch.float32)", "to"),  # harmless, but only the exact forms are taken
    (".float(memory_format=torch.preserve_format)", "float"),
])
def test_methods_on_the_logits(tail, refused, variant):
    """Of the methods a forward may call on lm_head's output, only `.float()` and
    `.contiguous()` without arguments are taken: the stock loss upcasts the logits to float32
    itself. Anything else that could round them, or change the loss's dtype, is refused."""
    torch.manual_seed(0)
    stock = variant(tail)(transformers.LlamaConfig(**TEXT))
    if refused:
        with pytest.raises(ValueError, match=rf"Variant\.forward calls `\.{refused}` on "
                           "the logits of self.lm_head in `logits = self.lm_head"):
            fl_hf.apply(copy.deepcopy(stock))
        return
    fused = fl_hf.apply(copy.deepcopy(stock))
    ids, labels = batch()
    assert_same_training(stock, fused, input_ids=ids, labels=labels)
    assert_same_training(stock, fused, input_ids=ids, labels=labels,
                         num_items_in_batch=torch.tensor(37))
    # bfloat16: the float32 loss of the bfloat16 logits, as the stock one
    stock.to(torch.bfloat16), fused.to(torch.bfloat16)
    ref, ref_grads = loss_and_grads(stock, input_ids=ids, labels=labels)
    out, grads = loss_and_grads(fused, input_ids=ids, labels=labels)
    assert out.loss.dtype == torch.float32 and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=2**-8, atol=0)
    for name, g in grads.items():
        assert_near(g, ref_grads[name], name)


SCALE = "logits = logits * self.scale"
CAP = "logits = torch.tanh(logits / self.cap) * self.cap"


@pytest.mark.parametrize("tail, steps, scale", [
    ("", SCALE, 3.0),  # Cohere
    ("", "logits = logits / self.scale", 0.3),  # Granite
    (" * self.scale", "", 3.0),  # FalconH1, HyperCLOVA X
    (".float() / self.scale", "", 0.3),
    ("", "if self.scale is not None:\n    " + SCALE, 3.0),  # Cohere Compass
    ("", "if self.scale is not None:\n    " + SCALE, None),
    ("", "s = self.scale\nlogits = logits * s", 3.0),
    ("", f"{SCALE}\n{CAP}", 3.0),  # the scale, then the softcap
    (" / self.scale", "if self.cap is not None:\n    " + CAP, 0.3),
])
def test_logit_scale_forms(tail, steps, scale, variant):
    """A logit scale, `* S` or `/ S`, read off the model at each call and handed to
    linear_cross_entropy as its logit_scale (before the softcap, as the forward does)."""
    torch.manual_seed(0)
    stock = variant(tail, steps)(transformers.LlamaConfig(**TEXT))
    stock.scale, stock.cap = scale, 0.5
    fused = fl_hf.apply(copy.deepcopy(stock))
    ids, labels = batch()
    assert_same_training(stock, fused, input_ids=ids, labels=labels)
    if scale is None:
        return
    for model in (stock, fused):  # read at each call
        model.scale = scale * 1.5
    assert_same_training(stock, fused, input_ids=ids, labels=labels,
                         num_items_in_batch=torch.tensor(37))


@pytest.mark.parametrize("steps, after, message", [
    ("logits = self.scale * logits", "", r"transforms the logits .* `logits = self.scale \*"),
    (f"{SCALE}\n{SCALE}", "", "transforms the logits"),  # two scales
    (f"{CAP}\n{SCALE}", "", "transforms the logits"),  # the softcap first
    ("if self.training:\n    " + SCALE, "", "scales the logits under a condition"),
    ("", SCALE, r"not between self.lm_head\(...\) and self.loss_function"),  # the output only
    ("logits = logits * self.scales[0]", "", r"scales the logits by `self.scales\[0\]`, "
     "which the fused loss cannot read off the model"),
])
def test_logit_scale_refused_forms(steps, after, message, variant):
    torch.manual_seed(0)
    stock = variant("", steps, after)(transformers.LlamaConfig(**TEXT))
    stock.scale, stock.cap = 3.0, 0.5
    with pytest.raises(ValueError, match=message):
        fl_hf.apply(stock)
    assert not fl_hf.is_applied(stock)


def test_logit_scale_that_is_not_a_number(variant):
    """A learned scale (a tensor, whose gradient the stock model computes), None without a
    guard, or 0: refused at apply(), and at a call where it changed since."""
    torch.manual_seed(0)
    model = variant("", SCALE)(transformers.LlamaConfig(**TEXT))
    for bad in (None, 0.0, float("inf"), True, torch.nn.Parameter(torch.tensor(3.0))):
        model.scale = bad
        with pytest.raises(ValueError, match=r"scales the logits in `logits = logits \* "
                           r"self.scale` by .*, which the fused loss takes only as a finite "
                           "nonzero number"):
            fl_hf.apply(model)
        assert not fl_hf.is_applied(model)
    del model.scale  # the Parameter
    model.scale = 3.0
    fl_hf.apply(model)
    model.scale = torch.tensor(3.0)
    ids, labels = batch()
    with pytest.raises(ValueError, match="takes only as a finite nonzero number"):
        model(input_ids=ids, labels=labels)
    model.scale = 3.0
    assert model(input_ids=ids, labels=labels).loss.isfinite()


SCALES = {"cohere": 3.0, "cohere2": 3.0, "granite": 1 / 0.3, "granitemoe": 1 / 0.3,
          "granitemoeshared": 1 / 0.3, "granitemoehybrid": 1 / 0.3, "falcon_h1": 2.5,
          "hyperclovax": 2.5, "cohere2_moe": 3.0, "granite_swa": 1 / 0.3,
          "granitemoe_swa": 1 / 0.3}


@pytest.mark.parametrize("family", SCALES)
def test_family_logit_scale_is_read(family):
    """The scaled families of FAMILIES are served with their scale (not ignored: it is far
    from 1 there, and test_family_matches_stock compares with the stock loss)."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    assert fl_hf._logit_scale(model, fl_hf._layout(type(model))) == pytest.approx(
        SCALES[family], rel=1e-12)


def test_distillation_of_scaled_families():
    """distillation_loss reads each model's logit scale: a Cohere student (`* logit_scale`)
    and a Granite teacher (`/ logits_scaling`), against the loss on their stock logits."""
    import fused_losses as fl

    torch.manual_seed(0)
    student, teacher = FAMILIES["cohere"](), FAMILIES["granite"]()
    ids, labels = batch()
    kw = dict(beta=0.3, temperature=1.5)
    loss = fl_hf.distillation_loss(student, teacher, ids, labels=labels, chunk_size=8, **kw)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    s_logits = student(input_ids=ids).logits[:, :-1]
    ref = fl.distillation_loss(s_logits, t_logits, labels[:, 1:], **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
