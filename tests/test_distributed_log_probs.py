"""The vocab-sharded RL head (``linear_log_probs(..., process_group=)``), on the CPU with gloo.

Each test spawns one world (2 or 3 ranks, uneven blocks of the vocabulary, an empty one) and
runs its checks on both backends (the kernels under the Triton interpreter, and the eager
formula); a world that hangs is killed and fails the test (test_distributed's
``run_world``). Every rank builds the same whole head and takes its block of rows; the
sharded call is compared with torch's ops on the whole head in float64 (log p, entropy, the
input's whole gradient, the block's weight and bias gradients, for random upstream gradients
of log p, of the entropy, or both) and with the unsharded ``linear_log_probs`` on the whole
head; log p and entropy (and the input's gradient) are bitwise the same on every rank.
Small shapes and ``chunk_size=2``: three chunks, so three all-gathers, in every call.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _helpers import assert_close
from test_distributed import (
    assert_same_on_every_rank,
    count_collectives,
    gathers,
    restore_collectives,
)
from test_distributed import run_world as run_distributed_world
from test_linear_log_probs import operands, reference, run
from test_log_probs import ALL_OUTPUTS, backward, check_extras, upstream

BACKENDS = ("triton", "torch")
N, H, CHUNK = 5, 4, 2  # tokens, hidden size, tokens per chunk: 3 chunks


def run_world(world: int, checks: list[str], tmp_path) -> None:
    run_distributed_world(world, checks, tmp_path, module=__name__)


def _backend(name: str) -> None:
    os.environ["FUSED_LOSSES_BACKEND"] = name


def sharded(x, w, t, b=None, chunk_size=CHUNK, **kwargs):
    import fused_losses as fl

    return fl.linear_log_probs(x, w, t, linear_bias=b, return_entropy=True,
                               process_group=dist.group.WORLD, chunk_size=chunk_size, **kwargs)


def compare(rank, widths, dtype=torch.float32, which="both", ignore=(), bias=True,
            via="shard_sizes", **opts):
    """This rank's block of the head against torch's ops on the whole head in float64
    (``chunk_size=None`` in ``opts``: the default plan, not ``CHUNK``)."""
    import fused_losses as fl

    chunk = opts.pop("chunk_size", CHUNK)
    v = sum(widths)
    block = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    x, w, b, t = operands((N,), H, v, dtype, "cpu")
    t[list(ignore)] = -100
    b = b if bias else None
    layout = dict(shard_sizes=widths) if via == "shard_sizes" else {}
    lp, h, grads = run(sharded, x, w[block], t, None if b is None else b[block], which,
                       chunk_size=chunk, **layout, **opts)
    what = f"rank {rank}, widths {widths}, {dtype}, {which}, {opts}"
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == t.shape, what

    def wide(u):
        return None if u is None else u.double()

    ref_lp, ref_h, ref_grads = run(reference, wide(x), wide(w), t, wide(b), which, **opts)
    own = [None] * 3
    if dtype != torch.float32:  # torch's own rounding of the operands' GEMM, allowed on top
        own = run(reference, x, w, t, b, which, **opts)[2]
    assert_close(lp, ref_lp, torch.float32, f"log_probs ({what})")
    assert_close(h, ref_h, torch.float32, f"entropy ({what})")
    blocks = (slice(None), block, block)
    for name, got, want, own_g, rows in zip(("input", "weight", "bias"), grads, ref_grads,
                                            own, blocks, strict=True):
        if want is None:
            continue
        assert got.dtype == dtype, what
        assert_close(got, want[rows], dtype, f"d out / d {name} ({what})",
                     torch_own=None if own_g is None else own_g[rows])
    if dtype == torch.float32:  # the unsharded head on the whole weight, the same numbers
        whole = fl.linear_log_probs(x, w, t, linear_bias=b, return_entropy=True,
                                    chunk_size=CHUNK, **opts)
        assert_close(lp, whole.log_probs.double(), torch.float32, f"vs unsharded ({what})")
        assert_close(h, whole.entropy.double(), torch.float32, f"vs unsharded ({what})")
    for value in (lp, h, grads[0]):
        assert_same_on_every_rank(value, what)


OPTIONS = [
    dict(),
    dict(temperature=0.7, which="log_probs", ignore=(1,)),
    dict(temperature=1.3, softcap=4.0, logit_scale=0.8, which="entropy", bias=False),
    dict(temperature=0.6, softcap=3.0, which="both", ignore=(0, 3)),
]


def sweep(rank, widths, options=OPTIONS):
    for backend in BACKENDS:
        _backend(backend)
        for kwargs in options:
            compare(rank, widths, **kwargs)


def check_outputs(rank, widths):
    """TRL's other outputs (log sum p^2, the mean logit, is-top-1: the global first argmax,
    a tie across two ranks' blocks included) against the whole rows', and a no_grad call."""
    v = sum(widths)
    block = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    x, w, b, t = operands((N,), H, v, torch.float32, "cpu")
    t[2] = -100
    # class v - 1 (the last block) ties class 0 (the first) at the max of rows 0 and 1,
    # exactly (sums of one nonzero product, whatever the GEMMs' order): a row whose target
    # is the later one is not top-1, a row of the earlier one is
    w[:, 0].clamp_(-1.5, 1.5)
    w[0], b[0] = torch.tensor([2.0, 0.0, 0.0, 0.0]), 0.5
    w[v - 1], b[v - 1] = w[0], b[0]
    x[0] = x[1] = torch.tensor([20.0, 0.0, 0.0, 0.0])
    t[0], t[1] = v - 1, 0
    # row 3's top-1 is its target, in the last block (its global index, not the block's)
    w[v - 2] = torch.tensor([-2.0, 0.0, 0.0, 0.0])
    x[3] = torch.tensor([-20.0, 0.0, 0.0, 0.0])
    t[3] = v - 2
    opts = dict(temperature=0.8, logit_scale=1.5)
    logits = F.linear(x.double(), w.double(), b.double())
    for backend in BACKENDS:
        _backend(backend)
        with torch.no_grad():
            out = sharded(x, w[block], t, b[block], shard_sizes=widths, outputs=ALL_OUTPUTS,
                          **opts)
        check_extras(out, logits, t, **opts)
        assert out.is_top1.tolist() == [False, True, False, True, bool(out.is_top1[4])]
        ref_lp, ref_h = reference(x.double(), w.double(), t, b.double(), **opts)
        assert_close(out.log_probs, ref_lp, torch.float32, "log_probs (outputs)")
        assert_close(out.entropy, ref_h, torch.float32, "entropy (outputs)")
        for value in out:
            assert_same_on_every_rank(value, f"outputs ({backend})")


def check_float64(rank, widths):
    """float64 operands: the eager formula in float64 (a float64 all-gather block)."""
    block = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    x, w, b, t = operands((N,), H, sum(widths), torch.float64, "cpu")
    t[0] = -100
    lp, h = sharded(x, w[block], t, b[block], shard_sizes=widths, temperature=0.7)
    ref_lp, ref_h = reference(x, w, t, b, temperature=0.7)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, ref_h, rtol=1e-12, atol=1e-12)


def check_collectives(rank, widths):
    """Per chunk one all-gather in the forward; one all-reduce (the input's gradient) per
    backward, none without it."""
    block = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    x, w, b, t = operands((N,), H, sum(widths), torch.float32, "cpu")
    for backend in BACKENDS:
        _backend(backend)
        xi, wi = x.clone().requires_grad_(True), w[block].clone().requires_grad_(True)
        calls = count_collectives()
        lp, h = sharded(xi, wi, t, b[block], shard_sizes=widths)
        assert gathers(calls) == -(-N // CHUNK) and len(calls) == 1, (backend, calls)
        calls.clear()
        (lp.sum() + h.sum()).backward()
        assert calls == {"all_reduce": 1}, (backend, calls)
        calls.clear()
        lp, _ = sharded(x, wi, t, b[block], shard_sizes=widths)
        calls.clear()
        lp.sum().backward()
        assert calls == {}, (backend, calls)
        restore_collectives()


def check_layouts(rank, widths):
    """Every tensor argument of the sharded head as a view: the input a column slice of a
    transposed buffer, the weight's block transposed in memory, the bias's block strided,
    the targets a strided column: the same outputs and gradients as contiguous operands."""
    v = sum(widths)
    block = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    x, w, b, t = operands((N,), H, v, torch.float32, "cpu")
    opts = dict(temperature=0.7, shard_sizes=widths)
    for backend in BACKENDS:
        _backend(backend)
        want = run(sharded, x, w[block], t, b[block], "both", **opts)
        xv = torch.zeros(H + 3, N).t()[:, 1:H + 1].copy_(x).requires_grad_(True)
        wv = w[block].t().contiguous().t().requires_grad_(True)
        bv = torch.zeros(2 * widths[rank])[::2].copy_(b[block]).requires_grad_(True)
        tv = torch.stack([t, t], 1)[:, 1]
        assert not (xv.is_contiguous() or wv.is_contiguous() or bv.is_contiguous()
                    or tv.is_contiguous())
        lp, h = sharded(xv, wv, tv, bv, **opts)
        g_lp, g_h = upstream(t.shape, "both")
        backward(lp, h, g_lp, g_h)
        what = f"views, rank {rank}, {backend}"
        assert_close(lp, want[0].double(), torch.float32, what)
        assert_close(h, want[1].double(), torch.float32, what)
        for got, ref in zip((xv.grad, wv.grad, bv.grad), want[2], strict=True):
            assert_close(got, ref.double(), torch.float32, f"{what}: gradients")


def check_tiles(rank, widths):
    """The backward in tiles of every token by 2 classes of each rank's block (the gradient
    kernel told the tile's offset in the block and the block's in the vocabulary)."""
    import sys

    from test_linear_cross_entropy import tile_the_backward

    lce, lp = (sys.modules[f"fused_losses.{name}"] for name in ("linear_cross_entropy",
                                                                 "log_probs"))
    with pytest.MonkeyPatch.context() as mp:
        counts = tile_the_backward(mp, budget=4 * N * 3)
        assert lce.grad_tiles(N, 5, 4, "cpu", None, lp.CHUNK_BYTES) == (N, 2)
        for backend in BACKENDS:
            _backend(backend)
            counts.clear()
            compare(rank, widths, chunk_size=None, temperature=0.7, ignore=(2,))
            assert counts == [-(-widths[rank] // 2) if widths[rank] > 1 else 1], counts


def check_world_2(rank, world):
    sweep(rank, (5, 8))
    _backend("triton")  # bfloat16 operands on the kernels: float32 logits and sums
    compare(rank, (5, 8), torch.bfloat16, temperature=0.7, ignore=(4,))
    _backend("torch")
    compare(rank, (5, 8), torch.bfloat16, softcap=3.0)
    check_float64(rank, (5, 8))
    check_outputs(rank, (5, 8))
    check_collectives(rank, (5, 8))
    check_layouts(rank, (5, 8))
    check_tiles(rank, (5, 8))


def check_world_3(rank, world):
    sweep(rank, (4, 0, 7), OPTIONS[::3])  # an empty block in the middle
    check_tiles(rank, (4, 0, 7))
    check_outputs(rank, (3, 3, 5))
    from fused_losses.distributed import reset_vocab_layout

    for backend in BACKENDS:  # the widths exchanged on the group's first call
        _backend(backend)
        reset_vocab_layout()
        compare(rank, (6, 2, 3), via="exchange", temperature=0.9)
        reset_vocab_layout()


def check_errors(rank, world):
    """Bad input: an error on every rank, never a hang; then the group still works."""
    widths = (4, 5, 3)[:world]
    block = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    x, w, b, t = operands((N,), H, sum(widths), torch.float32, "cpu")
    wr = w[block]
    for backend in BACKENDS:
        _backend(backend)
        # a temperature that differs on rank 0: the arguments' hash in every header
        with pytest.raises(RuntimeError, match="different arguments"):
            sharded(x, wr, t, shard_sizes=widths, temperature=0.5 if rank == 0 else 0.7)
        # outputs that differ on the last rank
        with pytest.raises(RuntimeError, match="different arguments"):
            sharded(x, wr, t, shard_sizes=widths,
                    outputs=("entropy", "is_top1") if rank == world - 1 else None)
        # a target out of range on one rank only: torch's IndexError there
        bad = t.clone()
        if rank == world - 1:
            bad[1] = sum(widths)
        expected = IndexError if rank == world - 1 else RuntimeError
        with pytest.raises(expected, match="out of bounds|another rank"):
            sharded(x, wr, bad, shard_sizes=widths)
        # targets that differ across ranks
        other = t.clone()
        other[0] = (t[0] + 1 + rank) % sum(widths)
        with pytest.raises(RuntimeError, match="targets differ"):
            sharded(x, wr, other, shard_sizes=widths)
        # a block that disagrees with shard_sizes on rank 0
        sizes = list(widths)
        sizes[0] += 1
        expected = ValueError if rank == 0 else RuntimeError
        with pytest.raises(expected, match="block|another rank"):
            sharded(x, wr, t, shard_sizes=sizes)
        # what every rank gets wrong alike: before any collective
        import fused_losses as fl

        with pytest.raises(ValueError, match="process_group too"):
            fl.linear_log_probs(x, wr, t, shard_sizes=widths)
        # second derivatives would need the other ranks' logits
        xi = x.clone().requires_grad_(True)
        lp, _ = sharded(xi, wr, t, shard_sizes=widths)
        with pytest.raises(RuntimeError, match="create_graph"):
            torch.autograd.grad(lp.sum(), xi, create_graph=True)
    # headers checked on the device (a GPU's later calls): a disagreement makes every
    # output NaN on every rank, without a sync, and raises nothing
    from fused_losses.distributed import protocol

    protocol.CHECK_ON_HOST = False
    try:
        lp, h = sharded(x, wr, t, shard_sizes=widths, temperature=0.5 if rank == 0 else 0.7)
        assert lp.isnan().all() and h.isnan().all()
    finally:
        protocol.CHECK_ON_HOST = None
    lp, h = sharded(x, wr, t, shard_sizes=widths)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()


def check_group_released(rank, world):
    """Outputs of both sharded LM heads kept past ``destroy_process_group`` do not keep the
    group alive (their autograd graph reaches the heads' per-chunk losses): a destroyed gloo
    group torn down at the interpreter's exit aborts the process."""
    import gc
    import weakref

    import fused_losses as fl

    group = dist.new_group(list(range(world)), backend="gloo")
    v = 9
    block = slice(4 * rank, 4 * rank + (4 if rank == 0 else 5))
    x, w, b, t = operands((N,), H, v, torch.float32, "cpu")
    kept = []
    for backend in BACKENDS:
        _backend(backend)
        xl = x.clone().requires_grad_(True)
        lp = fl.linear_log_probs(xl, w[block], t, process_group=group, chunk_size=CHUNK)
        ce = fl.linear_cross_entropy(xl, w[block].clone().requires_grad_(True), t,
                                     process_group=group, chunk_size=CHUNK)
        (lp.sum() + ce).backward()
        kept += [lp, ce]  # (their grad_fn's contexts hold the heads' chunk losses)
    alive = weakref.ref(group)
    dist.destroy_process_group(group)
    del group
    gc.collect()
    assert alive() is None, gc.get_referrers(alive())
    assert all(k.grad_fn is not None for k in kept)


def check_dtensor(rank, world):
    """DTensor operands, the two ways a DTensor lm_head weight reaches the RL head: tensor
    parallelism (a replicated input, weight and bias Shard(0): the sharded head over
    DTensor's blocks, log p and entropy replicated DTensors) and FSDP2's gather (a plain
    input, each rank its batch: the weight gathered, its gradient reduce-scattered and
    averaged over the ranks)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.device_mesh import init_device_mesh

    import fused_losses as fl

    mesh = init_device_mesh("cpu", (world,))
    v = 11  # DTensor's blocks over 3 ranks: 4, 4, 3
    x, w, b, t = operands((N,), H, v, torch.float32, "cpu")
    t[1] = -100
    opts = dict(temperature=0.7, softcap=4.0)
    ref_lp, ref_h, ref_grads = run(reference, x.double(), w.double(), t, b.double(), "both",
                                   **opts)
    g_lp, g_h = upstream(t.shape, "both")
    for backend in BACKENDS:
        _backend(backend)
        # tensor parallelism
        dx = distribute_tensor(x, mesh, [Replicate()]).requires_grad_(True)
        dw = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
        db = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_(True)
        out = fl.linear_log_probs(dx, dw, t, linear_bias=db, return_entropy=True,
                                  chunk_size=CHUNK, **opts)
        assert type(out).__name__ == "LogProbs"
        assert all(isinstance(o, DTensor) and o.placements == (Replicate(),) for o in out)
        backward(out.log_probs, out.entropy, distribute_tensor(g_lp.float(), mesh,
                                                               [Replicate()]),
                 distribute_tensor(g_h.float(), mesh, [Replicate()]))
        what = f"DTensor TP, {backend}"
        assert_close(out.log_probs.to_local(), ref_lp, torch.float32, what)
        assert_close(out.entropy.to_local(), ref_h, torch.float32, what)
        assert dw.grad.placements == (Shard(0),) and dx.grad.placements == (Replicate(),)
        for got, want in zip((dx.grad.to_local(), dw.grad.full_tensor(),
                              db.grad.full_tensor()), ref_grads, strict=True):
            assert_close(got, want, torch.float32, f"{what}: gradients")
        # FSDP2's gather: this rank's own batch, the mean of the ranks' losses
        xs = [operands((N,), H, v, torch.float32, "cpu", seed=10 + r)[0] for r in range(world)]
        ts = [operands((N,), H, v, torch.float32, "cpu", seed=20 + r)[3] for r in range(world)]
        ref_w = w.double().requires_grad_(True)
        mine = None
        total = 0.0
        for r in range(world):
            lp_r, h_r = reference(xs[r].double(), ref_w, ts[r], **opts)
            loss_r = (lp_r * g_lp).sum() + (h_r * g_h).sum()
            total = total + loss_r / world
            if r == rank:
                mine = (lp_r.detach(), h_r.detach())
        total.backward()
        dw = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
        lp, h = fl.linear_log_probs(xs[rank], dw, ts[rank], return_entropy=True,
                                    chunk_size=CHUNK, **opts)
        assert not isinstance(lp, DTensor)
        assert_close(lp, mine[0], torch.float32, f"FSDP gather, {backend}")
        assert_close(h, mine[1], torch.float32, f"FSDP gather, {backend}")
        ((lp * g_lp.float()).sum() + (h * g_h.float()).sum()).backward()
        assert dw.grad.placements == (Shard(0),)
        assert_close(dw.grad.full_tensor(), ref_w.grad, torch.float32,
                     f"FSDP gather, {backend}: grad W")
    with pytest.raises(NotImplementedError, match="replicated over its mesh"):
        fl.linear_log_probs(distribute_tensor(x, mesh, [Shard(0)]),
                            distribute_tensor(w, mesh, [Shard(0)]), t)


def test_world_2(tmp_path):
    run_world(2, ["check_world_2", "check_errors", "check_group_released"], tmp_path)


def test_world_3(tmp_path):
    run_world(3, ["check_world_3", "check_errors"], tmp_path)


# ------------------------------------------------------------------------------------------
# the blocks' statistics and their merge, in one process (no group): every output of rows
# split into blocks, against the whole rows'
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("widths", "softcap"), [((3, 0, 9), None), ((8194, 5), 30.0)])
def test_partial_stats_merge_to_whole_rows(backend, widths, softcap):
    """Rows cut into blocks (an empty one; one longer than the kernels' register block,
    looped over) give, merged, the whole rows' log p, entropy, log sum p^2, mean logit,
    is-top-1 (ties across blocks, a row of -inf in one block), and (m~, log2 s); both
    backends' partial statistics, the eager merge."""
    from fused_losses.kernels import eager

    ops = eager
    if backend == "triton":
        from fused_losses.kernels import log_probs as ops
    opts = eager.Options(softcap=softcap, temperature=0.8, logit_scale=1.25)
    v, n = sum(widths), 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, v, generator=g) * 3
    t = torch.randint(0, v, (n,), generator=g)
    t[1] = -100
    x[2, -1] = x[2, 0] = x[2].max() + 1  # the max in the first and the last block: first
    t[2] = v - 1
    x[3, -1] = x[3].max() + 1  # the target alone at the max, in the last block
    t[3] = v - 1
    x[4, :widths[0]] = -torch.inf  # one block of -inf logits
    parts, offset = [], 0
    for width in widths:
        out = torch.empty(eager.LP_STATS, n)
        ops.log_prob_partial_stats(x[:, offset:offset + width].contiguous(), t, opts,
                                   class_offset=offset, n_classes=v,
                                   outputs=eager.EXTRA_OUTPUTS, out=out)
        parts.append(out)
        offset += width
    merged = eager.allocate_rows(n, eager.EXTRA_OUTPUTS, torch.float32, "cpu")
    eager.combine_log_prob_stats(torch.stack(parts), t, opts, v, eager.EXTRA_OUTPUTS,
                                 out=merged)
    whole, stats = eager.row_log_probs(x, t, opts, outputs=eager.EXTRA_OUTPUTS)
    rows, merged_stats = merged
    for name in ("log_probs", "entropy", "log_sum_sq_probs"):
        assert_close(getattr(rows, name), getattr(whole, name).double(), torch.float32, name)
    assert_close(rows.mean_logits, whole.mean_logits.double(), torch.float32, "mean",
                 terms=float(x.abs().max()) * 1.25 / 0.8)
    assert torch.equal(rows.is_top1, whole.is_top1)
    assert rows.is_top1.tolist()[1:4] == [False, False, True]
    assert_close(merged_stats[:, 0] + merged_stats[:, 1] * eager.LN2,
                 (stats[:, 0] + stats[:, 1] * eager.LN2).double(), torch.float32, "lse")


def test_dtensor(tmp_path):
    run_world(3, ["check_dtensor"], tmp_path)
