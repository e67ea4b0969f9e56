"""Distillation on rows of logits: TRL's generalized JSD between a student's and a teacher's
next-token distributions, kernel, launcher and autograd.

With z_s, z_t a row's transformed logits (each head's scale and softcap, then the shared
temperature: ``_ce_math.scaled``), p = softmax(z), lse = m + ln s (``block_stats``), the
divergences of a row and their gradients with respect to z_s:

    beta = 0  KL(p_t | p_s) = A_t / s_t - lse_t + lse_s,   A_t = sum e_t (z_t - z_s)
              d = p_s - p_t
    beta = 1  KL(p_s | p_t) = A_s / s_s - lse_s + lse_t,   A_s = sum e_s (z_s - z_t)
              d = p_s (log p_s - log p_t - KL)
    between   beta KL(p_t | m) + (1 - beta) KL(p_s | m),   m = log((1 - beta) p_s + beta p_t)
              d = (1 - beta) p_s (log p_s - m - KL(p_s | m))

(e = exp(z - its max)). The KLs' weighted gaps A merge over blocks exactly like the sum of
exponentials (each moved to the larger max), so for beta in {0, 1} the loss comes out of one
read pass over both rows; the JSD's mixture needs both normalizers first, a second pass. A
class of p = 0 adds 0 (0 log 0: masked -inf logits, underflow), never 0 * inf.

- ``_divergence_kernel``: one program per row. Pass 1 reads both rows (the statistics),
  the JSD a pass 2 (its two KLs), and with ``WRITE_GRAD`` a last pass writes d loss / d
  logits of the student's row times the row's scale (the upstream gradient over the
  reduction's denominator, 0 on rows left out). Memory traffic: reads 2 C (KL) or 4 C (JSD)
  elements of each row, + 2 C with the gradient, writes C; the logits are read in their own
  dtype, with no float32 copy. The re-reads of a row come from L2 at the vocabularies of
  interest (a 128k-class bf16 row is 256 KB).

``distillation`` is the entry of ``fused_losses.distillation_loss``: ``eager.
DistillationFunction`` over this kernel (the gradient written in the forward for a reduced
loss, as the cross-entropy's); ``row_divergence`` is the LM head's per-chunk step too
(``kernels/linear_distillation.py``). The eager twin, ``eager.chunk_divergence_``, has the
same contract.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import eager
from ._ce_math import logits, merge_stats, times_slope, transform
from ._common import LN2, LOG2E, launch, next_power_of_2, num_warps_for

# Classes per block of a row: 4096 of each head's logits in registers (16 a thread).
BLOCK = 4096
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


# ------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------


@triton.jit
def _max_and_exp(z):
    """(the block's max, m~: 0 where it is -inf, exp(z - m~)) of transformed logits."""
    m = tl.max(z, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, m_safe, tl.exp2((z - m_safe) * LOG2E)


@triton.jit
def _merge_gap(m1, a1, m2, a2):
    """A weighted gap sum e (z - z') of two class ranges, each relative to its own max,
    moved to the larger: a_i exp(m_i - m). An empty range (m = -inf, a = 0) adds 0."""
    m = tl.maximum(m1, m2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return (a1 * tl.exp2((m1 - m_safe) * LOG2E) + a2 * tl.exp2((m2 - m_safe) * LOG2E))


@triton.jit
def _log_mixture(log_s, log_t, log_1m_beta, log_beta):
    """log((1 - beta) p_s + beta p_t) from the log-probabilities: a log-add-exp (-inf where
    both are 0; the callers mask those lanes)."""
    a = log_s + log_1m_beta
    b = log_t + log_beta
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + tl.log(1.0 + tl.exp2((lo - hi) * LOG2E))


@triton.jit
def _p_log_ratio(p, log_p, log_q):
    """p (log p - log q), 0 where p = 0."""
    return tl.where(p > 0.0, p * (log_p - log_q), 0.0)


@triton.jit
def _divergence_kernel(
    # pointers
    s_ptr,  # the student's logits: rows of n_cols, unit class stride
    t_ptr,  # the teacher's logits, the same rows
    loss_ptr,  # out: float32 (n_rows,) each row's divergence
    scale_ptr,  # in (WRITE_GRAD): float32 (n_rows,) each row's factor of its gradient
    grad_ptr,  # out (WRITE_GRAD): d / d student logits, rows like s_ptr's (may be s_ptr)
    # sizes
    n_cols,
    # strides, in elements
    stride_s,
    stride_t,
    stride_grad,
    # scalars
    beta,
    log_1m_beta,  # log(1 - beta), log(beta): the mixture's weights (JSD)
    log_beta,
    s_mult,  # the heads' transforms (``_ce_math.transform``)
    s_softcap,
    t_mult,
    t_softcap,
    # flags
    S_SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    MODE: tl.constexpr,  # FORWARD_KL, REVERSE_KL or JSD
    WRITE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """A row's divergence, and with WRITE_GRAD its gradient. read 2-6 C, write C."""
    # int64 row offsets: 16k rows x 262k classes is over 2^32 elements.
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_SIZE)

    # pass 1: both rows' (m, s); the KL's weighted gap
    m_s = float("-inf")
    sum_s = 0.0
    m_t = float("-inf")
    sum_t = 0.0
    gap = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offs
        mask = cols < n_cols
        z_s = logits(s_row + cols, mask, s_mult, s_softcap, S_SOFTCAP, "")
        z_t = logits(t_row + cols, mask, t_mult, t_softcap, T_SOFTCAP, "")
        mb_s, _ms, e_s = _max_and_exp(z_s)
        mb_t, _mt, e_t = _max_and_exp(z_t)
        if MODE == 0:
            gap = _merge_gap(m_t, gap, mb_t, tl.sum(_p_log_ratio(e_t, z_t, z_s), axis=0))
        if MODE == 1:
            gap = _merge_gap(m_s, gap, mb_s, tl.sum(_p_log_ratio(e_s, z_s, z_t), axis=0))
        m_s, sum_s, _a, _k = merge_stats(m_s, sum_s, 0.0, 0.0, mb_s, tl.sum(e_s, axis=0),
                                         0.0, 0.0)
        m_t, sum_t, _a, _k = merge_stats(m_t, sum_t, 0.0, 0.0, mb_t, tl.sum(e_t, axis=0),
                                         0.0, 0.0)
    lse_s = tl.where(m_s == float("-inf"), 0.0, m_s) + tl.log2(sum_s) * LN2
    lse_t = tl.where(m_t == float("-inf"), 0.0, m_t) + tl.log2(sum_t) * LN2

    kl_s = 0.0  # the JSD's KL(p_s | m), for the gradient
    if MODE == 0:
        loss = gap / sum_t - lse_t + lse_s
    elif MODE == 1:
        loss = gap / sum_s - lse_s + lse_t
    else:  # pass 2: the mixture, with both normalizers known
        kl_t = 0.0
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offs
            mask = cols < n_cols
            log_s = logits(s_row + cols, mask, s_mult, s_softcap, S_SOFTCAP, "") - lse_s
            log_t = logits(t_row + cols, mask, t_mult, t_softcap, T_SOFTCAP, "") - lse_t
            mix = _log_mixture(log_s, log_t, log_1m_beta, log_beta)
            kl_s += tl.sum(_p_log_ratio(tl.exp2(log_s * LOG2E), log_s, mix), axis=0)
            kl_t += tl.sum(_p_log_ratio(tl.exp2(log_t * LOG2E), log_t, mix), axis=0)
        loss = beta * kl_t + (1.0 - beta) * kl_s
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row)
        g_row = grad_ptr + row * stride_grad
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offs
            mask = cols < n_cols
            z_s = logits(s_row + cols, mask, s_mult, s_softcap, S_SOFTCAP, "")
            log_s = z_s - lse_s
            log_t = logits(t_row + cols, mask, t_mult, t_softcap, T_SOFTCAP, "") - lse_t
            p_s = tl.exp2(log_s * LOG2E)
            if MODE == 0:
                d = p_s - tl.exp2(log_t * LOG2E)
            elif MODE == 1:
                d = tl.where(p_s > 0.0, p_s * (log_s - log_t - loss), 0.0)
            else:
                mix = _log_mixture(log_s, log_t, log_1m_beta, log_beta)
                d = tl.where(p_s > 0.0, (1.0 - beta) * p_s * (log_s - mix - kl_s), 0.0)
            d = times_slope(d, z_s, s_mult, s_softcap, S_SOFTCAP) * scale
            # (the grad's element type: a store into the logits' dtype rounds once)
            tl.store(g_row + cols, d.to(g_row.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------


def _mode(beta: float) -> int:
    return FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD


def row_divergence(s, t, opts: eager.DistillOptions, *, loss, row_scale=None,
                   grad=None) -> None:
    """Each row's divergence of logits ``s``, ``t`` (R, C), any float dtypes (read as they
    are; unit class stride), into ``loss`` (R,) float32; with ``grad`` (R, C) (``s`` itself
    allowed), d (sum_r row_scale_r loss_r) / d s into it. ``eager.chunk_divergence_``'s
    contract (the inputs are not overwritten here)."""
    n_rows, n_cols = s.shape
    if n_rows == 0:
        return
    beta = opts.beta
    student, teacher = transform(opts.student), transform(opts.teacher)
    block = min(BLOCK, next_power_of_2(n_cols))
    if grad is not None and row_scale is None:
        row_scale = torch.ones(n_rows, dtype=torch.float32, device=s.device)
    launch(
        _divergence_kernel,
        (n_rows,),
        writes=("loss_ptr",) + (("grad_ptr",) if grad is not None else ()),
        s_ptr=s,
        t_ptr=t,
        loss_ptr=loss,
        scale_ptr=row_scale.to(torch.float32) if grad is not None else loss,
        grad_ptr=grad if grad is not None else s,
        n_cols=n_cols,
        stride_s=s.stride(0),
        stride_t=t.stride(0),
        stride_grad=grad.stride(0) if grad is not None else 0,
        beta=beta,
        log_1m_beta=_log(1.0 - beta),
        log_beta=_log(beta),
        s_mult=student["logit_mult"],
        s_softcap=student["softcap"],
        t_mult=teacher["logit_mult"],
        t_softcap=teacher["softcap"],
        S_SOFTCAP=student["SOFTCAP"],
        T_SOFTCAP=teacher["SOFTCAP"],
        MODE=_mode(beta),
        WRITE_GRAD=grad is not None,
        BLOCK_SIZE=block,
        num_warps=num_warps_for(block),
    )


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 else float("-inf")


# ------------------------------------------------------------------------------------------
# entry point (the autograd Function is eager.DistillationFunction, over this file's rows)
# ------------------------------------------------------------------------------------------


def divergences(s, t, counted, opts: eager.DistillOptions, *, scales=None, grad=None):
    """Each row's divergence (N,) float32 of ``s``, ``t`` (N, V) in one launch, 0 where
    ``counted`` is False; with ``grad`` the gradient of sum_r scales_r loss_r written there
    (``eager._divergence_blocks``' contract)."""
    loss = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
    row_divergence(s, t, opts, loss=loss, row_scale=scales, grad=grad)
    return torch.where(counted, loss, 0.0)


def distillation(s, t, counted, opts: eager.DistillOptions, reduced: bool) -> torch.Tensor:
    """The entry of ``fused_losses.distillation_loss``: ``s``, ``t`` (N, V), ``counted``
    (N,) bool; the logits read as they are (a strided class dimension copied first)."""
    if s.stride(-1) != 1:
        s = s.contiguous()
    if t.stride(-1) != 1:
        t = t.contiguous()
    return eager.DistillationFunction.apply(s, t, counted, opts, reduced, divergences)
