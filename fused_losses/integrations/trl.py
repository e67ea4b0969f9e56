"""TRL: one call makes a TRL trainer's per-token log-probs (and entropies, and the other
per-token statistics TRL's head returns) come from :func:`fused_losses.linear_log_probs`.

    from fused_losses.integrations import trl as fl_trl

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
    fl_trl.apply(trainer)             # chunk_size= optional; RLOO, KTO and SFT trainers too
    trainer.train()
    fl_trl.revert(trainer)            # TRL's own head again

From :func:`apply` on, every log-prob the trainer computes -- the policy's with its entropy
(the loss, the entropy bonus, the entropy-quantile mask, the ``entropy`` metric), the old
policy's and the reference model's (``torch.no_grad``, forward only) -- comes from
:func:`fused_losses.linear_log_probs` on the model's final hidden states and ``lm_head``'s
weight (and bias), divided by the trainer's ``temperature``, with the model's final-logit
softcapping (Gemma 2/3), chunk by chunk: the ``(batch, seq, vocab)`` logits are never
allocated, and each chunk's logits are float32 (from bfloat16 operands too), where TRL's own
head rounds them to the compute dtype first. Log-probs and entropies come out in float32,
zero where the label is ``-100`` and without a gradient there, as TRL's do, so the loss, the
entropy bonus and the entropy-quantile mask are computed from them exactly as stock.

The same holds for every TRL 1.16 trainer that scores tokens through TRL's fused head
(``add_fused_lm_head``): ``GRPOTrainer`` and ``RLOOTrainer`` (log-probs and entropy at the
sampling temperature), ``DPOTrainer`` (with the mean logit and is-top-1 of its ``logits/*``
and accuracy metrics, log sum p^2 for WPO's weights), ``KTOTrainer`` (with the mean logit of
its ``logits/*`` metrics) and
``SFTTrainer`` (whose loss is then the mean of ``-log p`` over the labelled tokens, with
``is_top1`` for its ``mean_token_accuracy`` metric): every output TRL's head was set up to
return (``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``) comes from the same
fused pass.

Where it hooks
--------------
TRL 1.16's ``GRPOTrainer`` gets its log-probs in ``_get_per_token_logps_and_entropies`` from
``model(..., labels=labels, fused_lm_head=True)``: ``trl.trainer.utils.add_fused_lm_head``
sets the policy's (its base model's under PEFT) and the reference model's ``forward`` to one
that runs the backbone, then its own chunked head, and returns a ``FusedCausalLMOutput``.
:func:`apply` replaces that instance ``forward`` with one that runs the backbone the same way
and :func:`fused_losses.linear_log_probs` as the head; a call without ``fused_lm_head=True``
(generation) goes to TRL's forward, and so to the stock one, untouched. Under mixed precision
(``bf16=True``) accelerate's ``prepare_model`` has wrapped that forward in its autocast (the
reference model's when the trainer is built, the policy's when training starts): ours then goes
inside the same wrapper, and :func:`revert` puts TRL's back inside it. Under
``torch_compile=True`` the reference model is the compiled wrapper of the model that carries
the head. The trainer itself is
not changed, so everything it does around the log-probs (batching, masks, accelerate's
autocast and DDP wrapper, gradient checkpointing) stays TRL's; only the head's arithmetic is
ours. The temperature, the softcap and the requested outputs are read off TRL's head, and
checked against the trainer and against what the model's own forward does with its logits
(the :mod:`fused_losses.integrations.transformers` checks: one ``nn.Linear`` ``lm_head``, at
most the final-logit softcapping after it, and no logit scale).

Only the labelled positions (the completion tokens) go through the head: their hidden
states are gathered first (one ``(tokens, hidden)`` copy; the prompt's positions cost no
GEMM), as TRL does on CUDA. Under ``torch.compile`` the head runs outside the graph (one
graph break), as in the transformers integration.

What it does not serve
----------------------
:func:`apply` raises, with the reason, rather than train with a different head, for:

- a multimodal model (a processor as the trainer's ``processing_class``, or a model whose
  text config is a sub-config): TRL's own head serves those; don't apply;
- a model the transformers integration refuses (an ``lm_head`` that is not a plain
  ``nn.Linear``, a forward that does more to its logits than a scale and the softcapping),
  or whose forward scales or softcaps its logits otherwise than TRL's head does (a scale
  both apply, Cohere's ``logit_scale`` or Granite's ``1 / logits_scaling``, is served);
- a PEFT adapter on ``lm_head`` (LoRA on it, or ``modules_to_save=["lm_head"]``): the head
  reads ``lm_head.weight``, which is not what the adapter computes;
- DeepSpeed ZeRO-3 and FSDP (sharded head weights: untested here).

Each reason is one of these checks in :func:`apply`; nothing is left to a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
from dataclasses import dataclass

import torch
from torch import nn

import fused_losses as fl
from fused_losses.integrations import transformers as _hf

try:
    import trl
    from trl.trainer import utils as _trl_utils
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as e:  # pragma: no cover - the optional dependency is missing
    raise ImportError(
        'fused_losses.integrations.trl needs Hugging Face TRL >= 1.16: pip install '
        '"fused_losses[trl]"'
    ) from e

__all__ = ["apply", "is_applied", "revert"]

_ATTR = "_fused_losses_trl"  # the state, on each model whose forward is ours
_SERVED_OUTPUTS = fl.LogProbOutputs._fields  # every per-token output of TRL's head
# the trainers whose models carry TRL's fused head (those of this TRL that exist)
_TRAINERS = tuple(getattr(trl, name) for name in ("GRPOTrainer", "RLOOTrainer", "DPOTrainer",
                                                  "KTOTrainer", "SFTTrainer")
                  if hasattr(trl, name))
_IGNORE = -100  # TRL marks the positions it does not score with -100


def _trl_fused_forward_code() -> types.CodeType | None:
    """The code of the forward ``add_fused_lm_head`` installs (TRL >= 1.16)."""
    add = getattr(_trl_utils, "add_fused_lm_head", None)
    if add is None:
        return None
    codes = [c for c in add.__code__.co_consts
             if isinstance(c, types.CodeType) and c.co_name == "_fused_forward"]
    return codes[0] if len(codes) == 1 else None


_TRL_FORWARD = _trl_fused_forward_code()


@dataclass
class _State:
    """One model's head: what TRL's head was set up with, and our options."""

    stock_forward: object  # TRL's bound forward, which non-fused calls still go to
    temperature: float
    softcap: float | None
    logit_scale: float
    outputs: tuple[str, ...]  # what TRL's head returns beyond log-probs (entropy, ...)
    cast_lm_head_to_fp32: bool
    backbone_attr: str
    chunk_size: int | None


def apply(trainer, *, chunk_size: int | None = None):
    """Makes ``trainer``'s per-token log-probs and entropies come from
    :func:`fused_losses.linear_log_probs` on the final hidden states: the policy's, the old
    policy's and the reference model's; the ``(batch, seq, vocab)`` logits never allocated.

    Args:
        trainer: a ``trl.GRPOTrainer``, ``RLOOTrainer``, ``DPOTrainer``, ``KTOTrainer`` or
            ``SFTTrainer``
            (TRL >= 1.16, whose models carry TRL's fused head) of a text causal LM. Apply
            before ``trainer.train()`` (or between two of its calls).
        chunk_size: tokens per chunk of the head (default: as
            :func:`fused_losses.linear_log_probs`).

    Returns ``trainer``; its models are changed in place (their instance ``forward``). A
    second call only updates ``chunk_size``; :func:`revert` undoes it.

    Raises:
        TypeError: ``trainer`` is not one of those trainers, or a model has no TRL fused head or
            an ``lm_head`` that is not a plain ``nn.Linear``.
        ValueError: something the fused head does not serve (see the module's docstring),
            with the reason.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(trainer, _TRAINERS):
        raise TypeError(f"expected a trl trainer among {[t.__name__ for t in _TRAINERS]}, "
                        f"got {type(trainer).__name__}")
    if _TRL_FORWARD is None:
        raise TypeError(f"TRL {trl.__version__} has no add_fused_lm_head (TRL >= 1.16 expected): "
                        "its trainers compute the log-probs another way")
    _check_trainer(trainer)
    # check every model before changing any
    names = ("the policy", "the reference model")
    plans = [(model, _plan(model, names[i], trainer, chunk_size))
             for i, model in enumerate(_models(trainer))]
    for model, state in plans:
        if model.__dict__.get(_ATTR) is not None:
            model.__dict__[_ATTR].chunk_size = chunk_size
            continue
        model.__dict__[_ATTR] = state
        _set_forward(model, types.MethodType(_fused_forward(type(model).forward, state), model),
                     trainer)
    return trainer


def revert(trainer):
    """Undoes :func:`apply`: TRL's own head again. A trainer never applied is returned as it
    is."""
    for model in _models(trainer):
        state = model.__dict__.pop(_ATTR, None)
        if state is not None:
            _set_forward(model, state.stock_forward, trainer)
    return trainer


def is_applied(trainer) -> bool:
    """Whether :func:`apply` is in effect on ``trainer``'s policy."""
    models = _models(trainer)
    return bool(models) and models[0].__dict__.get(_ATTR) is not None


def _models(trainer) -> list[nn.Module]:
    """The models whose forward carries the head: the policy (its base model under PEFT),
    then the reference model if there is one."""
    policy = _uncompiled(getattr(trainer, "model", None))
    if policy is None:
        return []
    if _is_peft(policy):
        policy = policy.get_base_model()
    ref = _uncompiled(getattr(trainer, "ref_model", None))
    return [policy] if ref is None else [policy, ref]


def _uncompiled(model):
    """The module a ``torch.compile`` wrapper calls (under ``torch_compile=True`` the
    trainer's accelerator compiles the reference model when the trainer is built), whose
    instance ``forward`` that call runs."""
    from accelerate.utils import is_compiled_module

    return model._orig_mod if model is not None and is_compiled_module(model) else model


def _own_forward(model):
    """The model's instance ``forward`` that carries the head. Under mixed precision,
    ``Accelerator.prepare_model`` (the trainer's, for the reference model when it is built and
    for the policy when training starts) sets the instance ``forward`` to an autocast wrapper of
    the one before, which it keeps as ``_original_forward``: then that one."""
    own = model.__dict__
    return own["_original_forward"] if "_original_forward" in own else own.get("forward")


def _set_forward(model, forward, trainer) -> None:
    """Sets ``model``'s own forward (see :func:`_own_forward`) to the bound ``forward``, inside
    accelerate's mixed-precision wrapper again where the model has one: its autocast (the
    accelerator's) and its float32 outputs, as ``prepare_model`` wraps it."""
    if "_original_forward" not in model.__dict__:
        model.forward = forward
        return
    from accelerate.utils import convert_outputs_to_fp32

    fn, accelerator = forward.__func__, trainer.accelerator

    @functools.wraps(fn)
    def autocast(*args, **kwargs):
        with accelerator.autocast():
            return fn(*args, **kwargs)

    model._original_forward = forward
    model.forward = types.MethodType(convert_outputs_to_fp32(autocast), model)


def _wraps(forward, inner) -> bool:
    """Whether the chain of ``__wrapped__`` from ``forward`` reaches the function ``inner``."""
    for _ in range(16):
        if forward is inner or getattr(forward, "__func__", None) is inner:
            return True
        forward = getattr(forward, "__wrapped__", None)
        if forward is None:
            return False
    return False


def _is_peft(model) -> bool:
    """A PEFT model (TRL puts its head on the base model)."""
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


# ------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------


def _refuse(reason: str):
    return ValueError(f"fused_losses.integrations.trl cannot serve this trainer: {reason}")


def _check_trainer(trainer) -> None:
    from transformers import ProcessorMixin

    if isinstance(getattr(trainer, "processing_class", None), ProcessorMixin):
        raise _refuse("its processing_class is a multimodal processor; TRL's own fused head "
                      "serves vision-language models (don't apply)")
    if getattr(trainer, "is_fsdp_enabled", False):
        raise _refuse("FSDP shards lm_head's weight; the fused head is untested there")
    if getattr(trainer, "is_deepspeed_enabled", False):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise _refuse("DeepSpeed ZeRO-3 partitions lm_head's weight, which the fused head "
                          "reads outside the head's forward")


def _plan(model, what: str, trainer, chunk_size) -> _State:
    """The state of ``model``'s fused head, after checking that it can be served."""
    name = type(model).__name__
    state = model.__dict__.get(_ATTR)
    if state is not None:  # applied already
        return state
    forward = _own_forward(model)
    fn = getattr(forward, "__func__", None)
    if getattr(fn, "__code__", None) is not _TRL_FORWARD or forward.__self__ is not model:
        raise TypeError(f"{what} ({name}) has no TRL fused head (trl.trainer.utils."
                        "add_fused_lm_head), which GRPOTrainer adds when it is built")
    if not _wraps(model.__dict__.get("forward"), fn):
        raise TypeError(f"{what} ({name}): its forward wraps TRL's fused head in something other "
                        "than accelerate's mixed-precision wrapper; apply before wrapping it")
    trl_head = inspect.getclosurevars(fn).nonlocals
    config = model.config
    if config.get_text_config() is not config:
        raise _refuse(f"{what} ({name}) is a multimodal model; TRL's own fused head serves "
                      "vision-language models (don't apply)")
    head = model.get_output_embeddings()
    if type(head).__module__.startswith("peft."):
        raise _refuse(f"{what} ({name}) has a PEFT adapter on lm_head ({type(head).__name__}): "
                      "the fused head reads lm_head.weight, which is not what the adapter "
                      "computes; remove 'lm_head' from the adapter's target_modules and "
                      "modules_to_save")
    if head is not getattr(model, "lm_head", None):
        raise TypeError(f"{name}'s output embeddings are not its lm_head")
    cast = bool(trl_head.get("cast_lm_head_to_fp32"))
    _check_head(head, name, cast)
    try:  # what the model's own forward does with its logits: lm_head, at most a softcap
        layout = _hf._layout(type(model))
        scale = _hf._logit_scale(model, layout)
    except _hf._Unsupported as e:
        raise _refuse(str(e)) from None
    softcap = _hf._read(model, layout.softcap)
    if softcap != trl_head.get("final_logit_softcapping"):
        raise _refuse(f"{name}'s forward softcaps its logits by {softcap}, TRL's head by "
                      f"{trl_head.get('final_logit_softcapping')}")
    # the logits' scale (Cohere's logit_scale, Granite's 1 / logits_scaling, ...): TRL's head
    # applies what it reads off the config, before its softcap and temperature, as
    # linear_log_probs does; served where the model's forward applies the same
    logit_scale = trl_head.get("logit_scale", 1.0)
    if not math.isclose(scale, logit_scale, rel_tol=1e-12):
        source = "" if layout.logit_scale is None else f" in {layout.logit_scale.source}"
        raise _refuse(f"{name}'s forward scales its logits by {scale}{source}, TRL's head by "
                      f"{logit_scale}")
    temperature = trl_head.get("temperature")
    sampling = getattr(trainer, "temperature", None)  # (GRPO's and RLOO's; SFT, KTO: none)
    if sampling is not None and temperature != sampling:
        raise _refuse(f"TRL's head divides the logits by temperature {temperature}, the trainer "
                      f"samples at {sampling}")
    outputs = tuple(trl_head.get("outputs", ()))
    if not set(outputs) <= set(_SERVED_OUTPUTS):
        raise _refuse(f"TRL's head computes {outputs}; the fused head serves "
                      f"{_SERVED_OUTPUTS}")
    return _State(stock_forward=forward, temperature=float(temperature), softcap=softcap,
                  logit_scale=float(logit_scale),
                  outputs=tuple(o for o in outputs if o != "log_probs"),
                  cast_lm_head_to_fp32=cast,
                  backbone_attr=trl_head.get("backbone_attr", "base_model"),
                  chunk_size=chunk_size)


def _check_head(head, name: str, cast: bool) -> None:
    """The transformers integration's check of a plain ``nn.Linear`` head; with TRL's
    ``cast_lm_head_to_fp32``, TRL's own float32 forward on it is expected."""
    if not cast:
        _hf._check_head(head, name)
        return
    own = head.__dict__.get("forward")
    if (not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward
            or getattr(own, "__name__", None) != "cast_forward_to_fp32"):
        raise TypeError(f"{name}.lm_head is a {type(head).__name__}: expected a plain "
                        "torch.nn.Linear with TRL's float32 forward (cast_lm_head_to_fp32)")


# ------------------------------------------------------------------------------------------
# The forward
# ------------------------------------------------------------------------------------------


def _fused_forward(cls_forward, state: _State):
    """The model's forward: ``fused_lm_head=True`` calls through the fused head, the others
    to TRL's forward (and so to the stock one)."""
    stock = state.stock_forward

    # the stock signature, which generate() validates its kwargs against (as TRL's wrapper)
    @functools.wraps(cls_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head or self.__dict__.get(_ATTR) is not state:
            return stock(*args, fused_lm_head=fused_lm_head, labels=labels,
                         shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                         **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the tokens "
                             "whose log-probs to compute")
        kwargs["use_cache"] = False
        text_config = self.config.get_text_config()
        if getattr(text_config, "output_router_logits", False):  # (MoE: as TRL's head)
            kwargs.setdefault("output_router_logits", True)
        backbone = getattr(self, state.backbone_attr)(*args, **kwargs)
        hidden = backbone.last_hidden_state
        if shift_labels is None:  # position t predicts token t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        _check_head(head, type(self).__name__, state.cast_lm_head_to_fp32)
        labels = labels.to(head.weight.device)
        out = _head(hidden.to(head.weight.device), head.weight, head.bias, labels, state)
        mask = labels != _IGNORE
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss, aux_loss = -out.log_probs.sum() / count, None
        if kwargs.get("output_router_logits"):  # the MoE load-balancing loss, as TRL's head
            aux_loss = _load_balancing_loss(self, text_config, backbone.router_logits,
                                            kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss,
                                   **out._asdict())

    forward._fused_losses = True
    return forward


def _load_balancing_loss(model, text_config, router_logits, attention_mask):
    """The MoE router's load-balancing loss TRL's head returns (and adds to its loss, times
    ``router_aux_loss_coef``): transformers' (Mixtral's, which the MoE families share) over
    the backbone's router logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    n_experts = getattr(text_config, "num_experts", None)
    if n_experts is None:
        n_experts = model.num_experts
    return load_balancing_loss_func(router_logits, n_experts, text_config.num_experts_per_tok,
                                    attention_mask)


@torch.compiler.disable
def _head(hidden, weight, bias, labels, state: _State):
    """``LogProbOutputs`` of ``labels`` at every position (log-probs and the outputs TRL's
    head returns; 0 or False where ignored): the labelled positions through
    :func:`fused_losses.linear_log_probs`, scattered back."""
    mask = labels != _IGNORE
    x, target = hidden[mask], labels[mask]
    autocast = contextlib.nullcontext()
    if state.cast_lm_head_to_fp32:  # TRL's option: the head in float32, outside autocast
        x = x.float()
        autocast = torch.autocast(x.device.type, enabled=False)
    with autocast:
        out = fl.linear_log_probs(x, weight, target, linear_bias=bias,
                                  temperature=state.temperature, softcap=state.softcap,
                                  logit_scale=state.logit_scale, ignore_index=_IGNORE,
                                  outputs=state.outputs, chunk_size=state.chunk_size)

    def scatter(values):  # masked_scatter: the graph stays connected when no label counts
        return None if values is None else values.new_zeros(mask.shape).masked_scatter(
            mask, values)

    return fl.LogProbOutputs(*(scatter(values) for values in out))
