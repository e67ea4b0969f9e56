"""The fused LM head's cross-entropy: the loss of ``x @ W.T + b`` without ever holding the
logits, as the chunked head's per-chunk loss (``CrossEntropyChunks``).

Design (see ../shared/PERFORMANCE.md, "The LM head"):

- Chunks of tokens, on the chunked head's driver (``chunked_head.py``). Per chunk, its logits
  ``(R, V)`` come out of one GEMM (cuBLAS on a GPU, the CPU's BLAS elsewhere); the
  cross-entropy of those rows (``chunk_loss``: the Triton row kernel, or the eager formula on
  the CPU) gives the chunk's loss and, when the reduction makes the upstream gradient a
  scalar, writes d loss / d logits **in place** over the logits; the driver then runs
  ``grad_x[chunk] = dlogits @ W`` and ``grad_W += dlogits.T @ x[chunk]`` (and the bias's
  sum), and the backward only scales the gradients by the upstream gradient (on the device).
  So the forward+backward costs the three GEMMs of the head plus one pass of the
  cross-entropy over each chunk, and the largest tensor alive is one chunk of logits.
- ``none``, a second backward, a compiled graph and gradients for probability targets
  recompute each chunk's logits in the backward (a fourth GEMM), with each row's upstream
  gradient. Where the plan sets the backward's tiles (``tiles_classes``: class targets,
  where the backward recomputes anyway: ``none``, a compiled graph), the forward keeps each
  row's statistics (3 a row: max, log2 of the sum of exponentials, the smoothing's sum) and
  the backward runs in tiles of every token by a block of the classes, each tile's
  gradient from them (``grad_from_stats``): the weight's float32 gradient accumulator is
  then read and written once, not once per chunk (the log-prob head's tiles).
- Precision: unlike the log-prob head's, the logits and d loss / d logits are in the GEMMs'
  dtype (the input's; bfloat16 for an LM in bf16), as torch's ``F.linear`` then
  ``F.cross_entropy`` has them: the loss is torch's of the same rounded logits. d loss / d
  logits is formed in float32 and rounded once (``p - 1`` included). The weight's and bias's
  gradients accumulate over the chunks in ``accum_dtype`` (float32 by default: one rounding
  per element when a half-precision ``.grad`` is made, at the price of a float32
  weight-sized buffer; the weight's own dtype saves it, rounding once per chunk). The
  input's gradient is one GEMM per chunk: rounded once.
- K-dimensional heads (a weight (C, d1, ..., dK, H)) run as rows of C classes: the weight's
  rows are ordered (d, c) (``rows_per_token`` = d1 * ... * dK rows per token).
- A head whose weight is one rank's block of the vocabulary is this class with its chunks'
  rows merged over the group (``fused_losses/distributed/lm_head.py``, ``ShardedChunks``).
"""

from __future__ import annotations

import torch

from . import eager
from ._autograd import output_as
from .chunked_head import ChunkLoss, Plan


def _ce(kernels: bool):
    """The per-chunk cross-entropy: ``call_denominators``, ``chunk_loss``. (The Triton file
    is imported only for the kernels: the eager path runs without Triton.)"""
    if kernels:
        from . import cross_entropy

        return cross_entropy
    return eager


class CrossEntropyChunks(ChunkLoss):
    """The cross-entropy of each chunk's rows of C classes against ``operands = (target,
    weight)``: ``target`` (N * d,) class indices or (N * d, C) probabilities, row-major in
    (token, d), class indices contiguous; ``weight`` (C,) class weights, contiguous, or None.
    Outputs (loss, z-loss term) in ``out_dtype``: reduced, or per row (N * d,) for ``none``;
    the second is for logging, not differentiable (zeros without z-loss)."""

    def __init__(self, opts: eager.Options, plan: Plan, out_dtype: torch.dtype):
        self.opts, self.out_dtype = opts, out_dtype
        self.n_classes, self.per_token = plan.n_classes, plan.rows_per_token
        self.chunk, self.kernels = plan.chunk, plan.kernels
        self.reduced = opts.reduction != "none"
        # (one upstream scalar: the forward writes the chunks' gradients)
        self.fuses_gradient = self.reduced
        # the backward in tiles of the classes (planned only where it recomputes), each
        # tile's gradient from the rows' statistics the forward keeps
        self.tiles_classes = bool(plan.grad_classes)
        self.keeps_stats = self.tiles_classes

    def logits_dtype(self, plan):
        return plan.compute_dtype

    def _call_rows(self, rows: slice) -> slice:
        """The call's rows of C classes of tokens ``rows``."""
        return slice(rows.start * self.per_token, rows.stop * self.per_token)

    def _logit_rows(self, logits: torch.Tensor) -> torch.Tensor:
        # (the rows' count spelled out: a rank's block of a sharded head may have no class)
        return logits.view(logits.shape[0] * self.per_token, logits.shape[1] // self.per_token)

    def _target_rows(self, target: torch.Tensor, rows: slice) -> torch.Tensor:
        """The targets of tokens ``rows``, contiguous: the kernels read a chunk's rows of
        probabilities with unit strides (a strided caller's copied a chunk at a time)."""
        return target[self._call_rows(rows)].contiguous()

    def allocate(self, n_tokens, dtype, device, operands):
        """(loss, z-loss term or None, the rows' statistics (3, N * d) or None): the loss per
        row for ``none``, else per chunk (summed in ``outputs``), as wide as the chunks'
        results; the statistics where the backward needs them (``keeps_stats``)."""
        wide = torch.promote_types(torch.float32, dtype)
        for t in operands:
            if t is not None and t.is_floating_point():
                wide = torch.promote_types(wide, t.dtype)
        n = n_tokens * self.per_token if not self.reduced else -(-n_tokens // self.chunk)
        stats = None
        if self.keeps_stats:
            stats = torch.empty(3, n_tokens * self.per_token, device=device,
                                dtype=eager.stats_dtype(self.kernels, dtype, operands[1]))
        return (*(torch.empty(n, dtype=wide, device=device) if keep else None
                  for keep in (True, bool(self.opts.z_loss))), stats)

    def _store(self, buffers: tuple, rows: slice, loss, z) -> None:
        where = rows.start // self.chunk if self.reduced else self._call_rows(rows)
        for buf, value in zip(buffers[:2], (loss, z), strict=True):
            if buf is not None:
                buf[where] = value

    def workspace(self, logits, operands, backward):
        """The whole call's denominators (a mean's: made again in a recomputing backward;
        for the tiles' ``grad_from_stats``, as ``upstream_scales`` takes them)."""
        target, weight = operands
        ops = _ce(self.kernels)
        if backward and self.tiles_classes:
            return None if self.opts.reduction != "mean" else ops.denominators(
                target, weight, self.opts.ignore_index, self.n_classes)
        return ops.call_denominators(target, weight, self.opts, self.n_classes)

    def forward_chunk(self, logits, rows, operands, buffers, work, dlogits=None):
        target, weight = operands
        assert dlogits is None or dlogits is logits  # (the GEMMs' dtype: in place)
        stats = buffers[2]
        loss, z = _ce(self.kernels).chunk_loss(
            self._logit_rows(logits), self._target_rows(target, rows), weight, self.opts,
            work, target.shape[0], write_grad=dlogits is not None,
            stats=None if stats is None else stats[:, self._call_rows(rows)])
        self._store(buffers, rows, loss, z)

    def saved(self, buffers):
        return () if buffers[2] is None else (buffers[2],)

    def outputs(self, buffers):
        loss, z = buffers[:2]
        if self.reduced:
            loss, z = loss.sum(), None if z is None else z.sum()
        z = torch.zeros_like(loss) if z is None else z
        return output_as(loss, self.out_dtype), output_as(z, self.out_dtype)

    def non_differentiable(self, outputs):
        return (outputs[1],)

    def operand_grads(self, operands, needs):
        """The probabilities' gradient (contiguous: written a chunk of rows at a time)."""
        target = operands[0]
        return (torch.empty(target.shape, dtype=target.dtype, device=target.device)
                if needs[0] else None, None)

    def _upstream_rows(self, upstream: tuple, rows: slice) -> torch.Tensor:
        """The loss's upstream gradient: one value, or the chunk's rows' for ``none``."""
        g = upstream[0]
        return g if self.reduced else self._target_rows(g.reshape(-1), rows)

    def backward_chunk(self, logits, rows, operands, saved, upstream, dlogits, work,
                       operand_grads, cols=None):
        if cols is not None:  # a tile of the classes: from the kept statistics
            self._grad_from_stats(logits, rows, operands, saved[0], upstream, dlogits, work,
                                  cols.start, self.n_classes)
            return
        target, weight = operands
        grad_t = operand_grads[0]
        _ce(self.kernels).chunk_loss(
            self._logit_rows(logits), self._target_rows(target, rows), weight, self.opts,
            work, target.shape[0], self._upstream_rows(upstream, rows),
            write_grad=dlogits is not None,
            grad_target=None if grad_t is None else grad_t[self._call_rows(rows)])

    def _grad_from_stats(self, logits, rows, operands, stats, upstream, dlogits, dens,
                         class_offset: int, n_classes: int) -> None:
        """d out / d logits of tokens ``rows`` into ``dlogits`` (the logits, in place), the
        logits being the classes ``[class_offset, class_offset + width)`` of rows of
        ``n_classes``, from the rows' kept statistics ``stats`` (3, N * d) and the mean's
        denominators ``dens`` (``denominators``' (2,), or None)."""
        if dlogits is None or not logits.numel():
            return
        target, weight = operands
        x = self._logit_rows(logits)
        t = self._target_rows(target, rows)
        scales = eager.upstream_scales(self.opts, dens, target.shape[0],
                                       self._upstream_rows(upstream, rows), logits.device)
        stats = stats[:, self._call_rows(rows)].contiguous()
        if self.kernels:
            ops = _ce(True)
            x3 = x.unsqueeze(0)
            ops.grad_from_stats(x3, t, weight, stats, scales, self.opts, grad=x3,
                                class_offset=class_offset, n_classes=n_classes,
                                n_splits=ops.split_plan(*x.shape, logits.device))
        else:
            eager.chunk_grad_from_stats(x, t, weight, stats, scales, self.opts, grad=x,
                                        class_offset=class_offset, n_classes=n_classes)

    def differentiable(self, logits, operands):
        target, weight = operands
        loss, _ = eager.cross_entropy_float(logits.view(-1, self.n_classes), target, weight,
                                            self.opts)
        return (loss.to(self.out_dtype),)
