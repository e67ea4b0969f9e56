"""Hugging Face ``transformers``: one call makes a causal LM train through the fused LM head.

    from fused_losses.integrations import transformers as fl_hf

    fl_hf.apply(model)                       # label_smoothing=, z_loss=, chunk_size= optional
    loss = model(input_ids, labels=labels).loss      # (batch x seq, vocab) logits never exist
    fl_hf.revert(model)                      # the stock model again

From :func:`apply` on, a call **with** ``labels`` computes its loss with
:func:`fused_losses.linear_cross_entropy` from the final hidden states and ``lm_head.weight``
(and bias), chunk by chunk, exactly as the stock forward defines it: the causal shift,
``ignore_index`` (-100), ``num_items_in_batch`` (the token sum divided by it: Trainer's
gradient-accumulation fix), ``shift_labels``, ``logits_to_keep``, the final-logit softcapping of
Gemma 2/3 (``config.final_logit_softcapping``), the logit scale of Cohere (``logit_scale``),
Granite (``1 / logits_scaling``), FalconH1 (``lm_head_multiplier``) and HyperCLOVA X
(``logits_scaling``), tied embeddings; the loss is float32, as the stock loss (which upcasts
the logits) is. Its ``outputs.logits`` is ``None``: the logits were
never computed, and ``None`` fails at the first use instead of standing in for them (a
``ModelOutput`` leaves ``None`` fields out of its tuple and dict views, as it does for ``loss``
without labels). A call **without** labels (generation, evaluating logits) runs the stock
forward untouched and returns its logits.

:func:`causal_lm_loss` is the plain path, for code that keeps the logits: a drop-in for
transformers' ``ForCausalLMLoss`` (``model.loss_function = causal_lm_loss``) that runs
:func:`fused_losses.cross_entropy` on the logits as they are, without their float32 copy.

Design: where to hook
---------------------
transformers 4.50+ writes every ``*ForCausalLM.forward`` (and the multimodal
``*ForConditionalGeneration`` ones) alike::

    outputs = self.model(...)                  # family-specific plumbing (vision towers, ...)
    hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    logits = self.lm_head(hidden_states)
    [logits = softcap * tanh(logits / softcap)]          # Gemma 2/3
    loss = self.loss_function(logits=logits, labels=labels, vocab_size=..., **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits, ...)

Rewriting that forward would duplicate each family's plumbing (and break with the next
release); a custom ``loss_function`` alone comes too late (the logits exist by then); wrapping
``lm_head`` in another module would rename the ``state_dict`` keys and untie the weights. So
the stock forward keeps running, and three instance attributes (nothing class-wide, so other
models are untouched) route the loss around the logits:

1. ``model.forward``: a wrapper (``functools.wraps``, so ``inspect.signature`` -- which
   Trainer and ``generate`` read -- still sees the stock signature). Without labels it calls
   the stock forward. With labels it arms the head for the one call, and drops the
   placeholder logits from the output.
2. ``model.lm_head.forward``: ``nn.Linear``'s own while disarmed; armed, it keeps the hidden
   states it was given and returns an empty ``(..., 0)`` placeholder, so the softcapping the
   forward applies costs nothing. The module, its parameter, the tie and the
   ``state_dict`` keys stay the same.
3. ``model.loss_function`` (transformers' own setter): receives the placeholder, ``labels``
   and the loss kwargs exactly as ``ForCausalLMLoss`` would, and computes the loss from the
   kept hidden states and ``lm_head``'s weight. Reached without armed hidden states (the
   stock forward called directly, bypassing the wrapper), it computes the loss from the real
   logits it was given (:func:`causal_lm_loss`): the right loss on every path.

An instance forward survives what calls ``model.forward`` directly (PEFT's ``LoraModel``),
which module hooks would not. What the forward does with the logits between ``lm_head`` and
the loss is checked once per class, from its source, when :func:`apply` is called: the one
``self.lm_head(...)`` call (or of the module ``get_output_embeddings()`` names where a family
calls it otherwise: BioGPT's ``output_projection``, GPT-NeoX-Japanese's ``embed_out``, RWKV's
``head``), at most ``.float()`` or ``.contiguous()`` on its result (Mamba, Mllama, BLT: the
stock loss upcasts the logits itself), the logits going to ``self.loss_function`` and the
output, and in between at most a logit scale (``* S`` or ``/ S``: Cohere, Granite, FalconH1,
HyperCLOVA X) and then the softcapping, whose values are read from the same expressions per
call (a scale that is not a number -- a learned tensor -- is refused). Anything else (another
formula, a loss computed without ``self.loss_function`` as the encoder-decoder families'
causal LMs do, a head other than ``nn.Linear``) is refused with the reason, rather than
trained with a silently different loss.

Under ``torch.compile`` the fused loss runs outside the graph (``torch.compiler.disable``:
one graph break), so a compiled model keeps the memory saving on every backend (compiled,
``linear_cross_entropy``'s eager path takes its formula whole, the logits included). Not
supported: ``nn.DataParallel`` (its replicas would share the bound forward; use DDP); FSDP1
or DeepSpeed ZeRO-3 flat parameters (the loss reads ``lm_head.weight`` after the head's
forward, where those have resharded it; FSDP2's DTensor weight is one
``linear_cross_entropy`` takes, untested here); pickling the whole applied model
(``torch.save(model)``: its forward is a closure; ``revert`` first, or save the
``state_dict``, which is unchanged).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import math
import numbers
import textwrap
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fused_losses as fl

try:
    import transformers
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError as e:  # pragma: no cover - the optional dependency is missing
    raise ImportError(
        "fused_losses.integrations.transformers needs Hugging Face transformers: "
        'pip install "fused_losses[transformers]"'
    ) from e

__all__ = ["apply", "causal_lm_loss", "distillation_loss", "is_applied", "revert"]

_ATTR = "_fused_losses_lm_head"  # the state, on the model and on its lm_head
_MISSING = object()


# ------------------------------------------------------------------------------------------
# The plain path: the stock loss on the logits, without their float32 copy
# ------------------------------------------------------------------------------------------


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    **kwargs,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` through :func:`fused_losses.cross_entropy`.

    The same arguments and result: ``labels`` shifted left (position ``t`` predicts
    ``labels[t + 1]``; the last position is ignored) unless ``shift_labels`` are given;
    ``ignore_index`` not counted; the mean over the counted tokens, or with
    ``num_items_in_batch`` their sum divided by it; a float32 loss. On the kernels (CUDA)
    the logits are read as they are, float32 math inside (bfloat16 logits get no float32
    copy), and their gradient is written in the forward; the eager path (CPU) computes on a
    float32 copy, as the stock loss does. Use it as ``model.loss_function = causal_lm_loss``
    (``functools.partial(causal_lm_loss, label_smoothing=0.1)`` for the extras); the logits
    still exist: :func:`apply` removes them.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    with _float32_result(logits):
        loss = fl.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=label_smoothing, z_loss=z_loss)
    return _per_item(loss.float(), num_items_in_batch)


def _float32_result(x: torch.Tensor):
    """A half-precision input's loss comes out in float32 under autocast (its math is float32
    either way): the stock loss is float32, computed on an upcast copy we do not make."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    if half and not torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, dtype=x.dtype)
    return contextlib.nullcontext()


def _per_item(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """transformers' ``fixed_cross_entropy``: a sum divided by ``num_items_in_batch``."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# ------------------------------------------------------------------------------------------
# What a class's forward does with the logits (checked once per class, from its source)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scale:
    """A logit scale: ``logits * S`` (Cohere, FalconH1, HyperCLOVA X) or ``logits / S``
    (Granite), with ``S`` read off the model at each call."""

    path: tuple  # how to read S, as the softcap's
    divides: bool  # `logits / S`: linear_cross_entropy's logit_scale is 1 / S
    optional: bool  # under `if S is not None:` (None: no scale)
    source: str  # the statement, for messages


@dataclass(frozen=True)
class _Layout:
    """The forward's shape, as far as the loss is concerned."""

    softcap: tuple | None  # how to read the softcap off the model: ("attr", name)/("call",)
    logit_scale: _Scale | None = None  # applied before the softcap, as linear_cross_entropy's


class _Unsupported(Exception):
    pass


@functools.cache
def _layout(cls: type, head: str = "lm_head") -> _Layout:
    """Checks that ``cls.forward`` computes ``logits = self.<head>(h)`` (``head``: the output
    layer's attribute, ``lm_head`` but for a few families), then at most a logit scale
    (``* S`` or ``/ S``, on that line or the next) and the final-logit softcapping, in that
    order, then hands the logits to ``self.loss_function`` and the output only; raises
    ``_Unsupported`` with the reason otherwise."""
    fn = inspect.unwrap(cls.forward)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise _Unsupported(f"the source of {cls.__name__}.forward cannot be read ({e}), so "
                           "what it does with the logits cannot be checked") from e
    tree = ast.parse(source)
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef) or not func.args.args:
        raise _Unsupported(f"{cls.__name__}.forward is not a plain method")
    me = func.args.args[0].arg
    parent = {}
    for node in ast.walk(func):
        for child in ast.iter_child_nodes(node):
            parent[child] = node

    def self_attr(node, name):
        return (isinstance(node, ast.Attribute) and node.attr == name
                and isinstance(node.value, ast.Name) and node.value.id == me)

    def where(node):
        stmt = node
        while not isinstance(stmt, ast.stmt):
            stmt = parent[stmt]
        return f"`{ast.unparse(stmt).splitlines()[0].strip()}`"

    heads = [n for n in ast.walk(func) if isinstance(n, ast.Call) and self_attr(n.func, head)]
    if len(heads) != 1:
        raise _Unsupported(f"{cls.__name__}.forward calls self.{head} {len(heads)} times "
                           "(expected once, on the final hidden states)")
    expr = heads[0]
    assign = parent[expr]
    # `self.lm_head(h).contiguous()` (OPT) and `.float()` (Mamba, Mllama, BLT, ...): methods
    # called without arguments that change neither the values nor, for the loss, the dtype
    # (the stock loss upcasts the logits to float32 itself; the fused loss is float32 math
    # with a float32 result). Nothing else: `.double()`, `.to(...)` or `.half()` would change
    # what the stock loss computes.
    while (isinstance(assign, ast.Attribute) and assign.attr in ("contiguous", "float")
           and isinstance(parent[assign], ast.Call) and parent[assign].func is assign
           and not parent[assign].args and not parent[assign].keywords):
        expr = parent[assign]
        assign = parent[expr]
    # `logits = self.lm_head(h) * S` (FalconH1, HyperCLOVA X): a logit scale on the same line
    inline = None
    if (isinstance(assign, ast.BinOp) and isinstance(assign.op, ast.Mult | ast.Div)
            and assign.left is expr):
        inline, assign = assign, parent[assign]
    if isinstance(assign, ast.Attribute):  # `self.lm_head(h).to(torch.bfloat16)`, `.double()`
        raise _Unsupported(f"{cls.__name__}.forward calls `.{assign.attr}` on the logits of "
                           f"self.{head} in {where(assign)}, which the fused loss cannot "
                           "reproduce (it takes `.float()` and `.contiguous()` there only)")
    if not (isinstance(assign, ast.Assign) and len(assign.targets) == 1
            and isinstance(assign.targets[0], ast.Name)):
        raise _Unsupported(f"{cls.__name__}.forward does not assign the logits of "
                           f"self.{head} to a name: {where(heads[0])}")
    name = assign.targets[0].id

    def is_logits(node):
        return isinstance(node, ast.Name) and node.id == name

    def loss_call(node):
        """``self.loss_function(logits, ...)`` or ``self.loss_function(logits=logits, ...)``
        around the logits ``node``."""
        up = parent[node]
        if isinstance(up, ast.keyword) and up.arg == "logits":
            up = parent[up]
        elif not (isinstance(up, ast.Call) and up.args and up.args[0] is node):
            return False
        return self_attr(up.func, "loss_function")

    # the loss comes from self.loss_function, the one function the fused loss replaces;
    # checked first, as it is the reason that no change to the logits could overcome
    to_loss = [n for n in ast.walk(func) if is_logits(n) and loss_call(n)]
    if not to_loss:
        own = sorted((n for n in ast.walk(func)
                      if isinstance(n, ast.Call) and "loss" in ast.unparse(n.func).lower()
                      and any(is_logits(a) for a in ast.walk(n))), key=lambda n: n.lineno)
        raise _Unsupported(f"{cls.__name__}.forward does not compute its loss with "
                           "self.loss_function"
                           + (f" (it computes it in {where(own[0])})" if own else "")
                           + ", which is what the fused loss takes the place of")

    # the softcapping: `L = L / C; L = torch.tanh(L); L = L * C` or `L = tanh(L / C) * C`
    def tanh_of(node):
        return (isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords
                and isinstance(node.func, ast.Attribute | ast.Name)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "tanh")

    def divided(node):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                and is_logits(node.left)):
            return node.right
        return None

    allowed, steps = set(), []
    for stmt in ast.walk(func):
        if stmt is assign or not isinstance(stmt, ast.Assign | ast.AugAssign | ast.AnnAssign):
            continue
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        if not any(is_logits(t) for t in targets):
            continue
        value = stmt.value
        kind = None
        if isinstance(stmt, ast.Assign) and len(targets) == 1:
            if divided(value) is not None:
                kind = ("div", divided(value))
            elif tanh_of(value) and is_logits(value.args[0]):
                kind = ("tanh", None)
            elif (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Mult)
                  and is_logits(value.left)):
                kind = ("mul", value.right)
            elif (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Mult)
                  and tanh_of(value.left) and divided(value.left.args[0]) is not None):
                kind = ("fused", value.right, divided(value.left.args[0]))
        if kind is None:
            raise _Unsupported(f"{cls.__name__}.forward transforms the logits of self.{head} "
                               f"in {where(stmt)}, which the fused loss cannot reproduce")
        steps.append((stmt, kind))
        allowed.update(n for n in ast.walk(stmt) if is_logits(n))
    same = ast.unparse
    # in source order, between the head's line and the loss's: `logits = logits * S` after
    # the loss is computed would be a scale of the output only
    steps.sort(key=lambda step: (step[0].lineno, step[0].col_offset))
    first = min(to_loss, key=lambda n: (n.lineno, n.col_offset))
    for stmt, _ in steps:
        if not ((assign.lineno, assign.col_offset) < (stmt.lineno, stmt.col_offset)
                and (stmt.end_lineno, stmt.end_col_offset) <= (first.lineno, first.col_offset)):
            raise _Unsupported(f"{cls.__name__}.forward transforms the logits of self.{head} "
                               f"in {where(stmt)}, not between self.{head}(...) and "
                               "self.loss_function(...), which the fused loss cannot reproduce")

    def softcap_of(steps):
        """C of `L = L / C; L = torch.tanh(L); L = L * C` or `L = tanh(L / C) * C`."""
        kinds = [k[0] for _, k in steps]
        if kinds == ["div", "tanh", "mul"] and same(steps[0][1][1]) == same(steps[2][1][1]):
            return steps[0][1][1]
        if kinds == ["fused"] and same(steps[0][1][1]) == same(steps[0][1][2]):
            return steps[0][1][1]
        return None

    def guarded(block, node):
        """``block`` is ``if <node> is not None:`` without an else."""
        test = getattr(block, "test", None)
        left = test.left if isinstance(test, ast.Compare) else None
        if isinstance(left, ast.NamedExpr):  # `if (c := self.config...) is not None:`
            left = left.target
        return (isinstance(block, ast.If) and not block.orelse
                and isinstance(test, ast.Compare) and len(test.ops) == 1
                and isinstance(test.ops[0], ast.IsNot) and same(left) == same(node)
                and isinstance(test.comparators[0], ast.Constant)
                and test.comparators[0].value is None)

    # a logit scale first (Cohere's `logits * self.logit_scale`, Granite's
    # `logits / self.config.logits_scaling`): unconditional, or under `if S is not None:`
    scale = None
    if inline is not None:
        scale = _Scale(_read_path(inline.right, func, me, cls, what="scales"),
                       isinstance(inline.op, ast.Div), False, where(assign))
    elif (steps and steps[0][1][0] in ("mul", "div")
          and (len(steps) == 1 or softcap_of(steps[1:]) is not None)):
        (stmt, (kind, node)), steps = steps[0], steps[1:]
        optional = guarded(parent[stmt], node)
        if not (parent[stmt] is func or optional):
            raise _Unsupported(f"{cls.__name__}.forward scales the logits under a condition "
                               f"the fused loss cannot evaluate: {where(stmt)}")
        scale = _Scale(_read_path(node, func, me, cls, what="scales"), kind == "div",
                       optional, where(stmt))

    # then the softcapping: applied unconditionally, or under `if C is not None:` only
    cap = None
    if steps:
        cap = softcap_of(steps)
        if cap is None:
            raise _Unsupported(f"{cls.__name__}.forward transforms the logits of self.{head} "
                               f"in {where(steps[0][0])}, which the fused loss cannot "
                               "reproduce")
        blocks = {id(parent[s]) for s, _ in steps}
        block = parent[steps[0][0]]
        if len(blocks) != 1 or not (block is func or guarded(block, cap)):
            raise _Unsupported(f"{cls.__name__}.forward softcaps the logits under a condition "
                               f"the fused loss cannot evaluate: {where(steps[0][0])}")
        cap = _read_path(cap, func, me, cls)

    # every other use of the logits: the loss function's `logits` and the output only
    losses = 0
    for node in ast.walk(func):
        if not is_logits(node) or node in allowed or node is assign.targets[0]:
            continue
        if loss_call(node):
            losses += 1
            continue
        up = parent[node]
        if (isinstance(up, ast.keyword) and up.arg == "logits"
                and _is_output_class(parent[up].func, fn.__globals__)):
            continue  # CausalLMOutputWithPast(..., logits=logits)
        if isinstance(up, ast.Tuple):  # a tuple output: `(logits,) + outputs[1:]`
            continue
        raise _Unsupported(f"{cls.__name__}.forward uses the logits of self.{head} in "
                           f"{where(node)}, which the fused loss cannot reproduce")
    if losses != 1:
        raise _Unsupported(f"{cls.__name__}.forward computes its loss from the logits with "
                           f"self.loss_function {losses} times (expected once)")
    return _Layout(softcap=cap, logit_scale=scale)


def _read_path(node, func, me: str, cls: type, depth: int = 0,
               what: str = "softcaps") -> tuple:
    """The steps that read ``node`` (``self.config.final_logit_softcapping``, a local assigned
    from such a chain, ``self.config.get_text_config().x``) off the model at each call
    (``what`` the forward does with it, for the message)."""
    if isinstance(node, ast.Name) and node.id == me:
        return ()
    if isinstance(node, ast.Attribute):
        return (*_read_path(node.value, func, me, cls, depth, what), ("attr", node.attr))
    if (isinstance(node, ast.Call) and not node.args and not node.keywords
            and isinstance(node.func, ast.Attribute)):
        return (*_read_path(node.func, func, me, cls, depth, what), ("call", None))
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return (("const", node.value),)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "getattr" and not node.keywords and len(node.args) == 3
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
            and isinstance(node.args[2], ast.Constant) and node.args[2].value is None):
        # `getattr(self.config.get_text_config(), "final_logit_softcapping", None)`
        return (*_read_path(node.args[0], func, me, cls, depth, what),
                ("getattr", node.args[1].value))
    if isinstance(node, ast.Name) and depth < 4:
        sources = [s.value for s in ast.walk(func)
                   if (isinstance(s, ast.Assign) and len(s.targets) == 1
                       and isinstance(s.targets[0], ast.Name) and s.targets[0].id == node.id)
                   or (isinstance(s, ast.NamedExpr) and s.target.id == node.id)]
        if len(sources) == 1:
            return _read_path(sources[0], func, me, cls, depth + 1, what)
    raise _Unsupported(f"{cls.__name__}.forward {what} the logits by `{ast.unparse(node)}`, "
                       "which the fused loss cannot read off the model")


def _is_output_class(node, namespace: dict) -> bool:
    """Whether ``node`` names a ``ModelOutput`` class in the forward's module."""
    obj = namespace.get(node.id) if isinstance(node, ast.Name) else None
    return isinstance(obj, type) and issubclass(obj, transformers.utils.ModelOutput)


def _logit_scale(model, layout: _Layout) -> float:
    """The multiplier of the logits the forward applies (``linear_cross_entropy``'s
    ``logit_scale``), read off the model now; raises ``_Unsupported`` unless it is a finite
    nonzero number (a tensor -- a learned scale -- would need its gradient)."""
    scale = layout.logit_scale
    if scale is None:
        return 1.0
    value = _read(model, scale.path)
    if value is None and scale.optional:
        return 1.0
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value == 0):
        shown = f"a {type(value).__name__}" if torch.is_tensor(value) else repr(value)
        raise _Unsupported(f"{type(model).__name__}.forward scales the logits in "
                           f"{scale.source} by {shown}, which the fused loss takes only as "
                           "a finite nonzero number")
    return 1.0 / float(value) if scale.divides else float(value)


def _read(model, path: tuple | None):
    if path is None:
        return None
    value = model
    for op, arg in path:
        if op == "const":
            value = arg
        elif op == "attr":
            value = getattr(value, arg)
        elif op == "getattr":
            value = getattr(value, arg, None)
        else:
            value = value()
    return value


# ------------------------------------------------------------------------------------------
# apply / revert
# ------------------------------------------------------------------------------------------


class _State:
    """One model's integration: its options, and the armed call's hidden states."""

    def __init__(self, cls_forward, head_attr: str, layout: _Layout, options: dict,
                 previous_loss):
        self.cls_forward = cls_forward  # the class's forward, which the wrapper calls
        self.head_attr = head_attr  # the model's attribute holding the output layer
        self.signature = inspect.signature(cls_forward)
        self.layout = layout
        self.options = options
        self.previous_loss = previous_loss  # the instance's own loss_function, if it had one
        self.armed = False
        self.softcap = None  # read off the model when armed
        self.logit_scale = 1.0  # likewise
        self.hidden = None  # what the head received, while armed
        self.head = None  # the head module that received it
        self.final = None  # the placeholder the loss function received


def apply(model: nn.Module, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
          chunk_size: int | None = None,
          accum_dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Makes ``model``'s loss come from :func:`fused_losses.linear_cross_entropy` whenever it
    is called with ``labels``: its ``(batch x seq, vocab)`` logits are never allocated.

    Args:
        model: a transformers causal LM (``*ForCausalLM``, or a multimodal
            ``*ForConditionalGeneration`` with the same head) whose forward computes
            ``self.lm_head(hidden_states)`` with an ``nn.Linear`` head (or the output layer
            ``get_output_embeddings()`` returns, under its own name) and its loss with
            ``self.loss_function`` (transformers' ``ForCausalLMLoss``). Apply before
            ``torch.compile``.
        label_smoothing, z_loss: as :func:`fused_losses.cross_entropy` (defaults: the stock
            loss).
        chunk_size: tokens per chunk of the head (default: as
            :func:`fused_losses.linear_cross_entropy`).
        accum_dtype: the dtype ``lm_head``'s gradient accumulates in over the chunks
            (float32 by default; ``None``: the weight's own dtype, without a float32
            weight-sized buffer).

    Returns ``model``, changed in place. With labels, ``outputs.loss`` is the fused loss
    (float32) and ``outputs.logits`` is ``None``; without labels the stock forward runs. A
    second call only updates the options; :func:`revert` undoes it.

    Raises:
        TypeError: ``model`` is not a transformers model with an ``nn.Linear`` ``lm_head``,
            or is compiled (``torch.compile``) already.
        ValueError: its forward does something to the logits the fused loss cannot
            reproduce, or its loss function is not the causal-LM one.
    """
    options = _check_options(label_smoothing, z_loss, chunk_size, accum_dtype)
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
        raise TypeError("apply() the integration to the model before torch.compile(model), "
                        "not to the compiled module")
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            "expected a transformers causal LM (a PreTrainedModel such as LlamaForCausalLM), "
            f"got {type(model).__name__}"
            + (" (for PEFT, apply it to model.get_base_model())"
               if hasattr(model, "get_base_model") else "")
        )
    name = type(model).__name__
    attr, head, layout, _ = _output_layer(model, f"fused_losses cannot take over the loss of "
                                                 f"{name}")
    state = model.__dict__.get(_ATTR)
    if state is not None:  # applied already: new options only
        state.options = options
        _patch_head(head, state)
        return model
    previous = model.__dict__.get("_loss_function", _MISSING)
    current = model.loss_function
    if not _is_causal_lm_loss(current):
        raise ValueError(
            f"fused_losses cannot take over the loss of {name}: its loss_function is "
            f"{getattr(current, '__name__', current)!r}, expected transformers' "
            "ForCausalLMLoss (the causal LM's, or fused_losses' causal_lm_loss)"
        )
    state = _State(type(model).forward, attr, layout, options, previous)
    model.__dict__[_ATTR] = state
    model.forward = types.MethodType(_wrapped_forward(type(model).forward), model)
    model.loss_function = _FusedLoss(state)
    _patch_head(head, state)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undoes :func:`apply`: the stock forward, head and loss function again. A model never
    applied is returned as it is."""
    state = model.__dict__.pop(_ATTR, None)
    if state is None:
        return model
    forward = model.__dict__.get("forward")
    if getattr(getattr(forward, "__func__", None), "_fused_losses", False):
        del model.forward
    # (an outer wrapper, such as accelerate's, may hold ours: it finds no state and passes on)
    if state.previous_loss is _MISSING:
        model.__dict__.pop("_loss_function", None)
    else:
        model.loss_function = state.previous_loss
    head = getattr(model, state.head_attr, None)
    if isinstance(head, nn.Module) and head.__dict__.get(_ATTR) is state:
        del head.__dict__[_ATTR]
        head.__dict__.pop("forward", None)
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` is in effect on ``model``."""
    return model.__dict__.get(_ATTR) is not None


def _check_options(label_smoothing, z_loss, chunk_size, accum_dtype) -> dict:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, int | float) or not z_loss >= 0.0:
        raise ValueError(f"z_loss must be a float >= 0, got {z_loss!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if accum_dtype is not None and not isinstance(accum_dtype, torch.dtype):
        raise TypeError(f"accum_dtype must be a torch.dtype or None, got {accum_dtype!r}")
    return dict(label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                chunk_size=chunk_size, accum_dtype=accum_dtype)


def _output_layer(model: nn.Module, refusal: str):
    """(attribute, head, layout, logit scale) of a causal LM's output layer, checked: a plain
    ``nn.Linear`` (``_check_head``, its TypeError), and a forward the fused loss reproduces
    (``_layout``, the scale readable off the model; else a ValueError, ``refusal: why``)."""
    attr = _head_attr(model)
    head = getattr(model, attr, None)
    _check_head(head, type(model).__name__, attr)
    try:
        layout = _layout(type(model), attr)
        scale = _logit_scale(model, layout)
    except _Unsupported as e:
        raise ValueError(f"{refusal}: {e}") from None
    return attr, head, layout, scale


def _head_attr(model: nn.Module) -> str:
    """The model's attribute that holds its output layer: ``lm_head``, or else the child
    module ``get_output_embeddings()`` returns (BioGPT's ``output_projection``,
    GPT-NeoX-Japanese's ``embed_out``, RWKV's ``head``). The forward's check then asks for
    ``self.<that attribute>(...)``, so the module the forward calls is the one read."""
    if hasattr(model, "lm_head"):
        return "lm_head"
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    if isinstance(out, nn.Module):
        for attr, child in model.named_children():
            if child is out:
                return attr
    return "lm_head"


def _check_head(head, name: str, attr: str = "lm_head") -> None:
    if head is None:
        raise TypeError(f"{name} has no lm_head: expected a causal LM whose output layer "
                        "(model.lm_head, or the child module get_output_embeddings() "
                        "returns) is an nn.Linear")
    ours = head.__dict__.get(_ATTR) is not None if isinstance(head, nn.Module) else False
    if (not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward
            or ("forward" in head.__dict__ and not ours)):
        raise TypeError(f"{name}.{attr} is a {type(head).__name__}"
                        + (" with its own forward" if isinstance(head, nn.Linear) else "")
                        + ": expected a plain torch.nn.Linear (the fused loss reads its "
                        "weight and bias)")


def _is_causal_lm_loss(fn) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn is ForCausalLMLoss or fn is causal_lm_loss or isinstance(fn, _FusedLoss)


def _patch_head(head: nn.Linear, state: _State) -> None:
    head.__dict__[_ATTR] = state
    head.forward = types.MethodType(_head_forward, head)


# ------------------------------------------------------------------------------------------
# The three hooks
# ------------------------------------------------------------------------------------------


def _wrapped_forward(cls_forward):
    """The instance's forward: the stock one, with the head armed for a call with labels."""

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        state = self.__dict__.get(_ATTR)
        if state is None:  # reverted while an outer wrapper kept this one
            return cls_forward(self, *args, **kwargs)
        labels = kwargs.get("labels")
        if labels is None and args:
            labels = state.signature.bind_partial(self, *args, **kwargs).arguments.get("labels")
        if labels is None:
            return cls_forward(self, *args, **kwargs)
        head = getattr(self, state.head_attr)
        if head.__dict__.get(_ATTR) is not state:  # a new head (resize_token_embeddings)
            _check_head(head, type(self).__name__, state.head_attr)
            _patch_head(head, state)
        state.softcap = _read(self, state.layout.softcap)
        try:
            state.logit_scale = _logit_scale(self, state.layout)
        except _Unsupported as e:
            raise ValueError(f"fused_losses cannot take over the loss of "
                             f"{type(self).__name__}: {e}") from None
        state.armed, state.hidden, state.head, state.final = True, None, None, None
        try:
            out = cls_forward(self, *args, **kwargs)
            final = state.final
        finally:
            state.armed, state.hidden, state.head, state.final = False, None, None, None
        return _without(out, final)

    forward._fused_losses = True
    return forward


def _head_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """The head's forward: ``nn.Linear``'s, or while armed an empty placeholder."""
    state = self.__dict__.get(_ATTR)
    if state is None or not state.armed or state.hidden is not None:
        return F.linear(input, self.weight, self.bias)
    state.hidden, state.head = input, self
    dtype = (torch.get_autocast_dtype(input.device.type)
             if torch.is_autocast_enabled(input.device.type) else input.dtype)
    return input.new_empty((*input.shape[:-1], 0), dtype=dtype)


class _FusedLoss:
    """``model.loss_function``: the fused loss from the armed hidden states, else (called on
    real logits) :func:`causal_lm_loss`."""

    def __init__(self, state: _State):
        self.state = state

    def __call__(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                 shift_labels=None, **kwargs):
        state = self.state
        hidden = state.hidden if state.armed else None
        options = state.options
        if hidden is None:
            return causal_lm_loss(logits, labels, vocab_size, num_items_in_batch, ignore_index,
                                  shift_labels, label_smoothing=options["label_smoothing"],
                                  z_loss=options["z_loss"])
        head = state.head
        state.hidden, state.head, state.final = None, None, logits
        if head.weight.shape[0] != vocab_size:
            raise ValueError(f"{state.head_attr} has {head.weight.shape[0]} outputs, the loss "
                             f"was asked for a vocabulary of {vocab_size}")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        return _fused_loss(hidden, head.weight, head.bias, shift_labels, num_items_in_batch,
                           ignore_index, state.softcap, state.logit_scale, options)


@torch.compiler.disable
def _fused_loss(hidden, weight, bias, shift_labels, num_items_in_batch, ignore_index, softcap,
                logit_scale, options) -> torch.Tensor:
    x = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(x.device)
    kwargs = dict(reduction="sum" if num_items_in_batch is not None else "mean",
                  ignore_index=ignore_index, label_smoothing=options["label_smoothing"],
                  softcap=softcap, logit_scale=logit_scale, z_loss=options["z_loss"],
                  chunk_size=options["chunk_size"], accum_dtype=options["accum_dtype"])
    # a float32 loss, as the stock one (autocast's result; the math is float32 either way)
    with _float32_result(x):
        loss = fl.linear_cross_entropy(x, weight, target, linear_bias=bias, **kwargs)
    return _per_item(loss.float(), num_items_in_batch)


def _without(out, final):
    """The output without the placeholder logits (``None`` in their field)."""
    if final is None:
        return out
    if isinstance(out, transformers.utils.ModelOutput):
        if out.get("logits") is not final:
            return out
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})
    if isinstance(out, tuple):
        return tuple(v for v in out if v is not final)
    return out


# ------------------------------------------------------------------------------------------
# Distillation: a student and a teacher causal LM on the same batch
# ------------------------------------------------------------------------------------------


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    chunk_size: int | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """The distillation loss of ``student`` from ``teacher`` (two transformers causal LMs of
    one vocabulary) on one batch, neither model's ``(batch x seq, vocab)`` logits allocated:
    :func:`fused_losses.linear_distillation_loss` on each model's last hidden states and
    output layer (its bias, logit scale and final-logit softcapping included).

    Both bodies run (``model.base_model``, with ``input_ids``, ``attention_mask`` and
    ``model_kwargs``), the teacher's under ``torch.no_grad()``. The causal shift: position
    ``t``'s next-token distributions are compared where ``labels[t + 1]`` is not
    ``ignore_index`` (TRL's GKD masks with the shifted labels); without ``labels``, where
    ``attention_mask[t + 1]`` is 1, or everywhere but the last position. ``beta``,
    ``temperature``, ``reduction``, ``num_items_in_batch`` and ``chunk_size`` as
    :func:`fused_losses.linear_distillation_loss` (TRL's ``generalized_jsd_loss``).

    Each model's forward is checked as :func:`apply` checks it (``logits =
    self.lm_head(hidden)``, at most a logit scale and a softcapping, then the loss): a family
    whose forward does more to the logits is refused with the reason.
    """
    heads = []
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, transformers.PreTrainedModel):
            raise TypeError(f"expected a transformers causal LM as the {role}, got "
                            f"{type(model).__name__}")
        _, head, layout, scale = _output_layer(
            model, f"fused_losses cannot distill with {type(model).__name__} as the {role}")
        heads.append((head, _read(model, layout.softcap), scale))
    body_kwargs = dict(model_kwargs, input_ids=input_ids, attention_mask=attention_mask)
    hidden = student.base_model(**body_kwargs).last_hidden_state[:, :-1]
    with torch.no_grad():
        teacher_hidden = teacher.base_model(**body_kwargs).last_hidden_state[:, :-1]
    if labels is not None:
        target = labels[:, 1:]
    elif attention_mask is not None:
        target = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], ignore_index)
    else:
        target = None
    (s_head, s_cap, s_scale), (t_head, t_cap, t_scale) = heads
    return fl.linear_distillation_loss(
        hidden, s_head.weight, teacher_hidden, t_head.weight.detach(),
        None if target is None else target.to(hidden.device),
        student_bias=s_head.bias,
        teacher_bias=None if t_head.bias is None else t_head.bias.detach(),
        student_softcap=s_cap, teacher_softcap=t_cap, student_logit_scale=s_scale,
        teacher_logit_scale=t_scale, beta=beta, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size)
