"""Per-token log-probabilities and entropy, for RL from a language model's head.

``log_probs`` on logits that exist; ``linear_log_probs`` on the LM head itself (hidden
states and the head's weight), chunk by chunk, the (N, V) logits never materialized. Both
validate, work out the options, then run the Triton kernels (``kernels/log_probs.py``,
``kernels/linear_log_probs.py``) or the eager formula (``kernels/eager.py``), as
``_dispatch.use_kernels`` decides.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _dispatch
from ._validation import (
    check_cross_entropy_extras,
    check_int,
    check_linear_dtypes,
    check_log_prob_rows,
    check_log_prob_target_values,
    check_logit_transform,
    check_tensor,
)
from .kernels import eager
from .kernels._autograd import detached_without_grad_mode
from .kernels.chunked_head import ChunkedHeadFunction, Plan
from .kernels.linear_log_probs import LogProbChunks
from .linear_cross_entropy import chunk_tokens, grad_tiles

__all__ = ["LogProbOutputs", "LogProbs", "linear_log_probs", "log_probs"]

# Target dtypes the kernels read (any integer tensor of class indices).
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class LogProbs(NamedTuple):
    """What ``return_entropy=True`` returns: per-token log-probabilities and entropies."""

    log_probs: torch.Tensor
    entropy: torch.Tensor


class LogProbOutputs(NamedTuple):
    """What ``outputs=`` returns: per-token log-probabilities and each output requested,
    ``None`` for the others (TRL 1.16's ``ChunkedLogProbFunction`` layout and names). Rows
    whose target is ignored give 0 (``False``)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None  # -sum_c p_c log p_c (differentiable)
    log_sum_sq_probs: torch.Tensor | None = None  # log sum_c p_c^2 (no gradient)
    mean_logits: torch.Tensor | None = None  # the transformed logits' mean (no gradient)
    is_top1: torch.Tensor | None = None  # bool: the target is the first argmax (no gradient)


# the names ``outputs=`` takes; "log_probs" (always computed) as TRL's add_fused_lm_head
_OUTPUT_NAMES = LogProbOutputs._fields


def _requested(fn: str, return_entropy: bool, outputs) -> tuple[str, ...]:
    """The outputs a call asks for beyond log p, in ``eager.EXTRA_OUTPUTS``' order."""
    names = ()
    if outputs is not None:
        if isinstance(outputs, str) or not isinstance(outputs, (tuple, list, set, frozenset)):
            raise TypeError(f"{fn}(): argument 'outputs' must be a tuple of names among "
                            f"{_OUTPUT_NAMES}, not {type(outputs).__name__}")
        for name in outputs:
            if name not in _OUTPUT_NAMES:
                raise ValueError(f"{fn}(): unknown output {name!r}; expected names among "
                                 f"{_OUTPUT_NAMES}")
        names = tuple(outputs)
    if return_entropy:
        names += ("entropy",)
    return tuple(name for name in eager.EXTRA_OUTPUTS if name in names)


def _options(fn: str, temperature, softcap, logit_scale, ignore_index) -> eager.Options:
    temperature, logit_scale = check_logit_transform(temperature, logit_scale)
    softcap, _ = check_cross_entropy_extras(softcap, 0.0)
    ignore_index = check_int(fn, "ignore_index", 0, ignore_index)
    return eager.Options(ignore_index=ignore_index, softcap=softcap, temperature=temperature,
                         logit_scale=logit_scale)


def _result(rows: eager.RowOutputs, return_entropy: bool, outputs):
    """``LogProbOutputs`` where ``outputs`` is given, else ``LogProbs`` with
    ``return_entropy``, else the log-probabilities."""
    if outputs is not None:
        return LogProbOutputs(*rows)
    return LogProbs(rows.log_probs, rows.entropy) if return_entropy else rows.log_probs


def log_probs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs: tuple[str, ...] | None = None,
) -> torch.Tensor | LogProbs | LogProbOutputs:
    r"""Log-probability of each target under ``softmax(logits / temperature)``, and on
    request the entropy of each row's distribution.

    With :math:`z = \mathrm{softcap} \tanh(x / \mathrm{softcap}) / T` (the softcap
    optional),

    .. math::
        \log p_n = z_{n, y_n} - \operatorname{logsumexp}(z_n), \qquad
        H_n = -\sum_c p_{n,c} \log p_{n,c},

    zero (and no gradient) where :math:`y_n` is ``ignore_index``. A drop-in for TRL's
    ``selective_log_softmax(logits / T, ids)`` with ``entropy_from_logits`` (and 1.16's
    ``selective_log_softmax_and_entropy``), in one pass: on CUDA one Triton kernel reads the
    logits once in their own dtype (no float32 copy) with float32 math inside; the backward
    reads them once more and writes their gradient, from upstream gradients of the
    log-probabilities, of the entropy, or both (the entropy's term only when its gradient
    comes). Elsewhere eager PyTorch in float32 runs the same formula.

    Args:
        logits (Tensor): :math:`(..., C)`, the classes last.
        target (Tensor): class indices :math:`(...)` (an integer dtype).
        temperature (float, keyword-only): the sampling temperature :math:`T > 0`.
            Default: ``1.0``
        softcap (float, optional, keyword-only): Gemma's final-logit softcapping, applied
            before the temperature. Default: ``None``
        ignore_index (int, keyword-only): a target value whose log-probability and entropy
            are 0. Default: ``-100``
        return_entropy (bool, keyword-only): also return the entropies, as
            ``LogProbs(log_probs, entropy)``. Default: ``False``
        outputs (tuple of str, optional, keyword-only): per-token outputs to compute in the
            same pass besides the log-probabilities, TRL 1.16's: ``"entropy"``,
            ``"log_sum_sq_probs"`` (:math:`\log \sum_c p_c^2`), ``"mean_logits"`` (the
            mean of :math:`z` over the classes), ``"is_top1"`` (bool: the target is the
            first argmax of :math:`z`, token accuracy); the last three carry no gradient.
            Returns ``LogProbOutputs`` with ``None`` for what was not asked (an output
            not asked costs nothing). Default: ``None``

    A target out of range raises torch's ``IndexError`` on the CPU; on CUDA (where checking
    would be a host sync) its row's results are NaN.

    Returns:
        float32 log-probabilities of the target's shape (float64 for float64 logits), or
        ``LogProbs(log_probs, entropy)``, or with ``outputs`` ``LogProbOutputs(log_probs,
        entropy, log_sum_sq_probs, mean_logits, is_top1)``. ``log_probs <= 0``,
        ``0 <= entropy <= log C``, ``-log C <= log_sum_sq_probs <= 0``.

    Examples::

        >>> logits = model(ids).logits[:, :-1]
        >>> lp, ent = log_probs(logits, ids[:, 1:], temperature=0.7, return_entropy=True)
        >>> out = log_probs(logits, ids[:, 1:], outputs=("entropy", "is_top1"))
        >>> accuracy = out.is_top1[mask].float().mean()
    """
    fn = "log_probs"
    check_tensor(fn, "logits", 0, logits)
    check_tensor(fn, "target", 1, target)
    opts = _options(fn, temperature, softcap, 1.0, ignore_index)
    requested = _requested(fn, return_entropy, outputs)
    if logits.dim() == 0 or not logits.is_floating_point():
        raise RuntimeError(f"{fn}: expected floating-point logits of shape (..., C), got "
                           f"{logits.dtype} of shape {tuple(logits.shape)}")
    if _dispatch.is_dtensor(logits):
        raise NotImplementedError(f"{fn} does not take DTensor logits; pass local tensors")
    n_classes = logits.shape[-1]
    check_log_prob_rows(fn, tuple(logits.shape[:-1]), n_classes, target)
    if target.device != logits.device:
        raise RuntimeError(f"{fn}: expected target on the logits' device ({logits.device}), "
                           f"got {target.device}")
    if _dispatch.reads_values_on_host(target):
        check_log_prob_target_values(target, n_classes, opts.ignore_index)
    if _dispatch.use_kernels(logits, target, other_dtypes=_INDEX_DTYPES):
        rows = _dispatch.kernels("log_probs").log_probs(logits, target, opts, requested)
    else:
        rows = eager.log_probs(logits, target, opts, requested)
    return _result(rows, return_entropy, outputs)


# --------------------------------------------------------------------------------------
# the LM head
# --------------------------------------------------------------------------------------

# The float32 logits of a chunk take at most this many bytes (2,048 tokens of Llama 3's
# vocabulary on a GPU); from 1,024 tokens on a chunk is at most an eighth of them. As
# linear_cross_entropy's: each chunk reads and writes the weight's float32 gradient once
# (8 V H bytes), so the fewer chunks the memory rule allows, the faster (on the H200, 256 MiB
# chunks of 523 tokens made the RL head's 16 chunks cost 16 ms of its 17.7 over 4 GEMMs at
# N=8192, H=4096, V=128256; 1 GiB makes 8). On the CPU likewise: the RL head at 4096 x 512 x
# 32000 took 4.49 s a step in 16 MiB chunks (131 tokens), 3.36 s in 64 MiB ones (512).
# The backward's tiles (``grad_tiles``: every token by a block of classes) take the same
# budget, and pass over the weight's gradient once.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


def _chunk(n_tokens: int, n_classes: int, device_type: str, chunk_size,
           fn: str = "linear_log_probs") -> int:
    """Tokens per chunk of the chunked head (float32 logits): ``chunk_size`` checked, or
    the budget's (``linear_cross_entropy.chunk_tokens``)."""
    return chunk_tokens(n_tokens, 4 * n_classes, device_type, chunk_size, fn, CHUNK_BYTES)


def linear_log_probs(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    outputs: tuple[str, ...] | None = None,
    chunk_size: int | None = None,
    process_group=None,
    shard_sizes=None,
) -> torch.Tensor | LogProbs | LogProbOutputs:
    r"""Per-token log-probabilities (and entropies) of ``linear(input, linear_weight,
    linear_bias)``, the LM head's logits, a chunk of tokens at a time: the ``(N, V)`` logits
    never exist.

    The logits are :math:`z = \mathrm{softcap} \tanh(s (x W^T + b) / \mathrm{softcap}) / T`
    (the logit scale :math:`s`, the softcap, then the temperature: TRL's order), and

    .. math::
        \log p_n = z_{n, y_n} - \operatorname{logsumexp}(z_n), \qquad
        H_n = -\sum_c p_{n,c} \log p_{n,c},

    zero (and no gradient) where :math:`y_n` is ``ignore_index``.

    Precision: each chunk's logits are formed in float32 (a float32 GEMM result from
    bfloat16 operands on CUDA), never rounded to bfloat16 before the log-softmax: within
    about 2e-3 nats of the float64 truth on the same operands where the bfloat16-logits path
    is ~0.1-0.25 nats off. Always ``log_probs <= 0`` and ``0 <= entropy <= log V``.

    Gradients: of the input, the weight and the bias, from upstream gradients of the
    log-probabilities, of the entropy, or both; the backward forms each chunk's logits again
    (per-token upstream gradients are unknown in the forward), and an output without a
    gradient costs it nothing. Under ``torch.no_grad()`` (an old policy's or a reference
    model's log-probs) the extra memory is one chunk of logits.

    Args:
        input (Tensor): hidden states :math:`(..., H)`.
        linear_weight (Tensor): the head's weight :math:`(V, H)`.
        target (Tensor): token ids :math:`(...)`, the input's leading shape.
        linear_bias (Tensor, optional, keyword-only): :math:`(V)`. Default: ``None``
        temperature (float, keyword-only): :math:`T > 0`. Default: ``1.0``
        softcap (float, optional, keyword-only): final-logit softcapping. Default: ``None``
        logit_scale (float, keyword-only): the logits' multiplier (Cohere's, Granite's
            heads). Default: ``1.0``
        ignore_index (int, keyword-only): a target whose results are 0. Default: ``-100``
        return_entropy (bool, keyword-only): also return the entropies, as
            ``LogProbs(log_probs, entropy)``. Default: ``False``
        outputs (tuple of str, optional, keyword-only): TRL 1.16's per-token outputs,
            computed in the same pass: ``"entropy"``, ``"log_sum_sq_probs"``,
            ``"mean_logits"``, ``"is_top1"`` (as :func:`log_probs`'s; the last three carry
            no gradient). Returns ``LogProbOutputs``, ``None`` for what was not asked.
            Default: ``None``
        chunk_size (int, optional, keyword-only): tokens per chunk. Default: the most whose
            float32 logits fit 1 GiB on a GPU (64 MiB on a CPU), at most an eighth of the
            tokens from 1,024 tokens on.
        process_group (ProcessGroup, optional, keyword-only): a head sharded by vocabulary
            over the group, as :func:`fused_losses.linear_cross_entropy`'s: the weight (and
            bias) are this rank's contiguous block of rows (classes), in rank order; the
            input and the (global) targets the same on every rank. One all-gather of
            per-token statistics per chunk in the forward, none in the backward, one
            all-reduce of the input's gradient per backward; every output is the same on
            every rank, the weight's and bias's gradients are the block's. Not under
            torch.compile, torch.func or ``create_graph=True``. Default: ``None``
        shard_sizes (sequence of int, optional, keyword-only): with ``process_group``,
            every rank's block width in rank order (else exchanged on the group's first
            call and cached). Default: ``None``

    DTensor operands are taken as :func:`fused_losses.linear_cross_entropy` takes them: a
    replicated input with the weight (and bias) sharded ``Shard(0)`` over one mesh dimension
    is the sharded head over that dimension's group (the outputs replicated DTensors); a
    plain input with a DTensor weight (FSDP2's parameter outside its module's forward) has
    the weight gathered as FSDP2 gathers it, its gradient reduce-scattered and averaged.

    Returns:
        float32 log-probabilities of the target's shape (float64 for float64 operands), or
        ``LogProbs(log_probs, entropy)``, or with ``outputs`` ``LogProbOutputs``.

    Examples::

        >>> hidden = model.model(ids).last_hidden_state[:, :-1]
        >>> lp, ent = linear_log_probs(hidden, model.lm_head.weight, ids[:, 1:],
        ...                            temperature=0.7, return_entropy=True)
    """
    fn = "linear_log_probs"
    for name, pos, t in (("input", 0, input), ("linear_weight", 1, linear_weight),
                         ("target", 2, target)):
        check_tensor(fn, name, pos, t)
    check_tensor(fn, "linear_bias", 3, linear_bias, optional=True)
    opts = _options(fn, temperature, softcap, logit_scale, ignore_index)
    requested = _requested(fn, return_entropy, outputs)
    if any(_dispatch.is_dtensor(t) for t in (input, linear_weight, linear_bias)):
        # tensor parallelism over the weight's mesh, or FSDP2's gather (distributed/dtensor)
        return _dispatch.tensor_parallel().dtensor_linear_head(
            linear_log_probs, fn, input, linear_weight, target, linear_bias,
            dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                 ignore_index=ignore_index, return_entropy=return_entropy, outputs=outputs,
                 chunk_size=chunk_size, process_group=process_group, shard_sizes=shard_sizes))
    if process_group is None and shard_sizes is not None:
        raise ValueError(f"{fn}: shard_sizes is the layout of a sharded head: pass its "
                         "process_group too")
    if input.dim() < 1:
        raise RuntimeError(f"{fn}: expected input of shape (..., H), got a 0-d tensor")
    if linear_weight.dim() != 2:
        raise RuntimeError(f"{fn}: expected linear_weight of shape (V, H), got "
                           f"{tuple(linear_weight.shape)}")
    n_vocab, hidden = linear_weight.shape
    if input.shape[-1] != hidden:
        raise RuntimeError(f"{fn}: expected equal input and linear_weight last dimensions "
                           f"(in_features), got {input.shape[-1]} and {hidden}, respectively")
    if linear_bias is not None and tuple(linear_bias.shape) != (n_vocab,):
        raise RuntimeError(f"{fn}: expected linear_bias shape ({n_vocab},), got "
                           f"{tuple(linear_bias.shape)}")
    if not (input.is_floating_point() and linear_weight.is_floating_point()):
        raise RuntimeError(f"{fn}: expected floating-point input and linear_weight")
    autocast = _dispatch.autocast_on(input)
    if not autocast:
        check_linear_dtypes(input, linear_weight, linear_bias)
    n_batch = tuple(input.shape[:-1])
    for t in (linear_weight, linear_bias, target):
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{fn}: expected every operand on the input's device "
                               f"({input.device}), got {t.device}")
    tp = None  # the vocab-sharded head: (group, this rank's block, its deferred error)
    if process_group is not None:
        tp = _sharded_layout(fn, process_group, shard_sizes, input, linear_weight, target,
                             opts, requested)
        n_vocab = tp[1].vocab_size  # the whole head's: the targets' range
    check_log_prob_rows(fn, n_batch, n_vocab, target)
    if _dispatch.reads_values_on_host(target):
        try:
            check_log_prob_target_values(target, n_vocab, opts.ignore_index)
        except IndexError as e:
            if tp is None:
                raise
            # this rank's own error: raised after the first all-gather, which every rank
            # reaches (the others learn of it there)
            tp = (*tp[:2], tp[2] or (_dispatch.tensor_parallel().bad_target, e))

    n_tokens = math.prod(n_batch)
    x = input.reshape(n_tokens, hidden)
    t = target.reshape(n_tokens)
    kernels = _dispatch.use_kernels(input, linear_weight, target, linear_bias,
                                    other_dtypes=_INDEX_DTYPES)
    wide = torch.float64 in (input.dtype, linear_weight.dtype)
    if kernels:  # the GEMMs in the operands' dtype (autocast's under autocast)
        compute = torch.get_autocast_dtype(input.device.type) if autocast else input.dtype
    else:  # the eager formula: float32 (float64 for float64 operands) GEMMs and math
        compute = torch.float64 if wide else torch.float32
    whole = n_tokens == 0 or (not kernels and (torch.compiler.is_compiling()
                                               or _dispatch.functorch_wrapped(x)))
    if whole:
        # torch.func transforms and compiled graphs without the kernels: the formula whole
        # (autograd and the compiler see every op; the logits are materialized there)
        logits = torch.nn.functional.linear(
            x.to(compute), linear_weight.to(compute),
            None if linear_bias is None else linear_bias.to(compute))
        rows, _ = eager.row_log_probs(logits, t, opts, outputs=requested)
    else:
        accum = torch.float64 if wide else torch.float32
        # a sharded head's chunks: the same rows on every rank (one all-gather size), planned
        # from the widest block
        budget = n_vocab if tp is None else max(tp[1].widths)
        # the backward in tiles of every token by a block of this rank's classes
        # (``grad_tiles``: the weight's gradient accumulated over once, not once a chunk)
        tiles = grad_tiles(n_tokens, linear_weight.shape[0], 4, input.device.type, chunk_size,
                           CHUNK_BYTES)
        plan = Plan(linear_weight.shape[0], 1,
                    _chunk(n_tokens, budget, input.device.type, chunk_size), compute, accum,
                    kernels, *tiles)
        if tp is None:
            loss = LogProbChunks(opts, kernels, requested, linear_weight.shape[0])
        else:
            t = t.long()  # (the protocol's fingerprint and kernels read int64 targets)
            loss = _dispatch.tensor_parallel().sharded_log_prob_chunks(
                opts, kernels, requested, *tp, input.dtype,
                torch.promote_types(accum, input.dtype))
        x, w, b, t = detached_without_grad_mode(x, linear_weight, linear_bias,
                                                t.contiguous())
        rows = eager.unpack(ChunkedHeadFunction.apply(x, w, b, plan, loss, t), requested)
    rows = eager.RowOutputs(*(None if o is None else o.view(n_batch) for o in rows))
    return _result(rows, return_entropy, outputs)


def _sharded_layout(fn: str, process_group, shard_sizes, input, linear_weight, target,
                    opts: eager.Options, requested: tuple):
    """(group, this rank's VocabShard, None or its deferred error) of a vocab-sharded head,
    after the checks every rank makes alike (raised before any collective)."""
    if torch.compiler.is_compiling() or _dispatch.functorch_wrapped(input):
        raise NotImplementedError(f"{fn} over a process group runs neither under "
                                  "torch.compile nor under torch.func transforms")
    return _dispatch.tensor_parallel().sharded_log_prob_chunks.layout(
        process_group, shard_sizes, input.device, linear_weight.shape[0],
        math.prod(target.shape), opts, input.dtype, requested)
