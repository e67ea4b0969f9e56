"""The tensor-parallel LM head (``linear_cross_entropy(..., process_group=)``) and DTensor /
FSDP2 weights, on the CPU with gloo.

Each test spawns one world (2 or 3 ranks, uneven blocks of the vocabulary, an empty one) and
runs a list of checks in it on both backends (the kernels under the Triton interpreter, and
the eager formula); a world that hangs is killed and fails the test (test_distributed's
``run_world``). Every rank builds the same whole head ``W`` (V, H) and bias,
takes its block of rows, and compares the sharded call with the single-process loss of the
whole head, ``cross_entropy(linear(x, W, b))`` in float64 (``reference``): the loss (bitwise
the same on every rank), the input's whole gradient on every rank, the rank's block of the
weight's and the bias's gradients, with a random upstream gradient, for every argument.
Small shapes and ``chunk_size=2``: several chunks, so several all-gathers, in every call.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _helpers import assert_close, random_logits, reference_cross_entropy
from test_distributed import (
    assert_same_on_every_rank,
    count_collectives,
    gathers,
    restore_collectives,
)
from test_distributed import run_world as run_distributed_world

BACKENDS = ("triton", "torch")
N, H, CHUNK = 5, 4, 2  # tokens, hidden size, tokens per chunk: 3 chunks


def run_world(world: int, checks: list[str], tmp_path) -> None:
    """Run the named checks of this module in ``world`` spawned processes (one gloo group;
    a hang fails the test, as in test_distributed)."""
    run_distributed_world(world, checks, tmp_path, module=__name__)


def _backend(name: str) -> None:
    os.environ["FUSED_LOSSES_BACKEND"] = name


# ------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------


def head(n_classes: int, dtype=torch.float32, out=(), seed=0):
    """The whole head: input (N, H), weight (C, *out, H), bias (C, *out), all ranks alike."""
    x = random_logits((N, H), dtype, "cpu", scale=1.0, seed=seed)
    w = random_logits((n_classes, *out, H), dtype, "cpu", scale=1.0, seed=seed + 1)
    b = random_logits((n_classes, *out), dtype, "cpu", scale=0.5, seed=seed + 2)
    return x, w, b


def targets(n_classes: int, shape=(N,), ignore=(), seed=1) -> torch.Tensor:
    t = torch.randint(0, n_classes, shape, generator=torch.Generator().manual_seed(seed))
    t.view(-1)[list(ignore)] = -100
    return t


def reference(x, w, t, b=None, weight=None, ignore_index=-100, **kwargs):
    """The single-process loss of the whole head: torch's ops, in the operands' dtype."""
    n_classes, out = w.shape[0], w.shape[1:-1]
    logits = F.linear(x, w.reshape(-1, H), None if b is None else b.reshape(-1))
    logits = logits.reshape(x.shape[0], n_classes, *out)
    return reference_cross_entropy(logits, t, weight, ignore_index, **kwargs)


def run(fn, x, w, b, grad_out_seed=1, **kwargs):
    """``fn`` on leaf copies of x, w, b, backward with a random upstream gradient: (loss,
    grad_x, grad_w, grad_b)."""
    x, w = (v.detach().clone().requires_grad_(True) for v in (x, w))
    b = None if b is None else b.detach().clone().requires_grad_(True)
    loss = fn(x, w, b=b, **kwargs)
    g = torch.Generator().manual_seed(grad_out_seed)
    grad_out = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)
    loss.backward(grad_out)
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def sharded(x, w, t, b=None, **kwargs):
    import fused_losses as fl

    return fl.linear_cross_entropy(x, w, t, linear_bias=b, **kwargs)


def compare(rank, widths, dtype=torch.float32, target=None, bias=True, class_weight=False,
            out=(), via="shard_sizes", **kwargs):
    """The sharded head of this rank's block against the reference on the whole head."""
    n_classes = sum(widths)
    offset, width = sum(widths[:rank]), widths[rank]
    x, w, b = head(n_classes, dtype, out)
    b = b if bias else None
    t = targets(n_classes, (N, *out)) if target is None else target
    cw = None
    if class_weight:
        g = torch.Generator().manual_seed(7)
        cw = (torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.25).to(dtype)
    layout = dict(shard_sizes=widths) if via == "shard_sizes" else {}
    block = slice(offset, offset + width)
    chunk = kwargs.pop("chunk_size", CHUNK)  # (None: the default plan)
    accum = kwargs.pop("accum_dtype", torch.float32)
    ours = run(sharded, x, w[block], None if b is None else b[block], t=t, weight=cw,
               process_group=dist.group.WORLD, chunk_size=chunk, accum_dtype=accum, **layout,
               **kwargs)

    def wide(v, to):
        return None if v is None else v.to(to)

    ref = run(reference, x.double(), w.double(), wide(b, torch.float64), t=t,
              weight=wide(cw, torch.float64), **kwargs)
    own = [None] * 4
    if dtype != torch.float32:  # torch's own rounding of the logits, allowed twice on top
        own = run(reference, x, w, b, t=t, weight=cw, **kwargs)
    what = f"rank {rank}, widths {widths}, {dtype}, {kwargs}"
    loss, grad_x, grad_w, grad_b = ours
    assert loss.dtype == dtype and grad_x.dtype == dtype, what
    assert_close(loss, ref[0], dtype, f"loss ({what})", torch_own=own[0])
    assert_close(grad_x, ref[1], dtype, f"input gradient ({what})", torch_own=own[1])
    assert_close(grad_w, ref[2][block], dtype, f"weight gradient ({what})",
                 torch_own=None if own[2] is None or not width else own[2][block])
    if b is not None:
        assert_close(grad_b, ref[3][block], dtype, f"bias gradient ({what})",
                     torch_own=None if own[3] is None or not width else own[3][block])
    # the loss bitwise the same on every rank, and the input's gradient
    for value in (loss, grad_x):
        assert_same_on_every_rank(value, what)


# Every argument, each reduction: class weights with smoothing and a real-class
# ignore_index, softcap with z-loss, and all of them at once.
ARGUMENTS = [
    dict(),
    dict(class_weight=True, label_smoothing=0.1, bias=False),
    dict(softcap=3.0, z_loss=0.01),
    dict(class_weight=True, label_smoothing=0.2, softcap=2.0, z_loss=0.05, ignore_index=3),
]


def sweep(rank, widths, arguments=ARGUMENTS):
    t = targets(sum(widths), ignore=(2,))
    for backend in BACKENDS:
        _backend(backend)
        for reduction in ("mean", "sum", "none"):
            for kwargs in arguments:
                ignore = kwargs.get("ignore_index", -100)
                compare(rank, widths, target=torch.where(t == -100, ignore, t),
                        reduction=reduction, **kwargs)


def check_tiles(rank, widths):
    """reduction='none': the backward in tiles of every token by 2 classes of each rank's
    block, each tile's gradient from the rows' statistics the forward merged over the group
    (the gradient kernel told the tile's offset in the block and the block's in the
    vocabulary); the chunks of the forward one token each."""
    import sys

    from test_linear_cross_entropy import tile_the_backward

    lce = sys.modules["fused_losses.linear_cross_entropy"]
    with pytest.MonkeyPatch.context() as mp:
        counts = tile_the_backward(mp, budget=4 * N * 3)
        assert lce.grad_tiles(N, 5, 4, "cpu", None, lce.CHUNK_BYTES) == (N, 2)
        t = targets(sum(widths), ignore=(2,))
        for backend in BACKENDS:
            _backend(backend)
            for kwargs in ARGUMENTS:
                counts.clear()
                ignore = kwargs.get("ignore_index", -100)
                compare(rank, widths, target=torch.where(t == -100, ignore, t),
                        reduction="none", chunk_size=None, **kwargs)
                want = -(-widths[rank] // 2) if widths[rank] > 1 else 1
                assert counts == [want], (rank, counts)
            # bfloat16 with accum_dtype=None: a rank that tiles sums its tiles in float32, one
            # that does not (an empty block; a narrow one on the kernels: bfloat16 logits
            # fit) has bfloat16 shares, all-reduced together in the input's dtype
            compare(rank, widths, torch.bfloat16, target=t, reduction="none", chunk_size=None,
                    accum_dtype=None, label_smoothing=0.1)


# ------------------------------------------------------------------------------------------
# the checks each world runs
# ------------------------------------------------------------------------------------------


def check_world_2(rank, world):
    sweep(rank, (5, 8))
    _backend("triton")  # bfloat16 on the kernels: the input's gradient summed in float32
    compare(rank, (5, 8), torch.bfloat16, class_weight=True, label_smoothing=0.1, z_loss=0.01)
    _backend("torch")
    # every target in rank 0's block; then every target ignored (NaN mean, as torch)
    compare(rank, (5, 8), target=targets(5), reduction="none", softcap=4.0)
    compare(rank, (5, 8), target=torch.full((N,), -100), z_loss=0.01)
    # the z-loss term alone, from the same call
    x, w, b = head(13)
    t = targets(13)
    kwargs = dict(label_smoothing=0.1, z_loss=0.05, softcap=3.0, return_z_loss=True)
    for backend in BACKENDS:
        _backend(backend)
        _, z = sharded(x, w[5 * rank:5 + 8 * rank], t, b[5 * rank:5 + 8 * rank],
                       process_group=dist.group.WORLD, shard_sizes=(5, 8), chunk_size=CHUNK,
                       **kwargs)
        _, ref_z = reference(x.double(), w.double(), t, b.double(), **kwargs)
        assert_close(z, ref_z, torch.float32, "z-loss term")
    check_tiles(rank, (5, 8))


def check_logit_transform(rank, world):
    """temperature and logit_scale with the softcap (TRL's order: scale, softcap,
    temperature) on the sharded head, every reduction: against the whole head's reference on
    the transformed logits (its z-loss on their log-sum-exp)."""
    widths = (5, 8, 3)[:world]
    n_classes = sum(widths)
    block = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    x, w, b = head(n_classes)
    t = targets(n_classes, ignore=(2,))
    cw = torch.rand(n_classes, generator=torch.Generator().manual_seed(7)) + 0.5
    transform = dict(temperature=1.3, logit_scale=-0.8, softcap=2.5)

    def transformed(x, w, b=None, *, temperature, logit_scale, softcap, **kwargs):
        z = F.linear(x, w, b) * logit_scale
        z = softcap * torch.tanh(z / softcap) / temperature
        return reference_cross_entropy(z, t, cw.double(), **kwargs)

    for backend in BACKENDS:
        _backend(backend)
        for reduction in ("mean", "sum", "none"):
            kwargs = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.01, **transform)
            ours = run(sharded, x, w[block], b[block], t=t, weight=cw,
                       process_group=dist.group.WORLD, shard_sizes=widths, chunk_size=CHUNK,
                       **kwargs)
            ref = run(transformed, x.double(), w.double(), b.double(), **kwargs)
            what = f"rank {rank}, {backend}, {reduction}"
            assert_close(ours[0], ref[0], torch.float32, f"loss ({what})")
            assert_close(ours[1], ref[1], torch.float32, f"input gradient ({what})")
            assert_close(ours[2], ref[2][block], torch.float32, f"weight gradient ({what})")
            assert_close(ours[3], ref[3][block], torch.float32, f"bias gradient ({what})")


def check_world_3(rank, world):
    sweep(rank, (4, 0, 7), ARGUMENTS[::3])  # an empty block in the middle
    check_tiles(rank, (4, 0, 7))
    # no tokens (no collective): torch's results on (0, V) logits with the (V,) class
    # weight, on a rank with an empty block too; a zero gradient of the block
    cw = torch.rand(11, generator=torch.Generator().manual_seed(7)) + 0.5
    for reduction in ("mean", "sum", "none"):
        wr = head(11)[1][(slice(0, 4), slice(4, 4), slice(4, 11))[rank]].requires_grad_(True)
        t = torch.zeros(0, dtype=torch.int64)
        loss = sharded(torch.zeros(0, H), wr, t, weight=cw, reduction=reduction,
                       label_smoothing=0.1, process_group=dist.group.WORLD,
                       shard_sizes=(4, 0, 7))
        want = F.cross_entropy(torch.zeros(0, 11), t, cw, reduction=reduction,
                               label_smoothing=0.1)
        torch.testing.assert_close(loss, want, equal_nan=True)
        loss.sum().backward()
        assert torch.equal(wr.grad, torch.zeros_like(wr)), reduction
    for backend in BACKENDS:
        _backend(backend)
        # a K-dimensional head (C, 2, H), the widths exchanged on the group's first call
        from fused_losses.distributed import reset_vocab_layout

        reset_vocab_layout()
        compare(rank, (3, 2, 4), out=(2,), via="exchange", reduction="none",
                label_smoothing=0.1, z_loss=0.01)
        reset_vocab_layout()


def check_collectives(rank, world):
    """Per chunk one all-gather in the forward; one all-reduce (the input's gradient) per
    backward; nothing else — a second backward included — on both backends, every
    reduction."""
    widths = (5, 8, 3)[:world]
    x, w, b = head(sum(widths))
    block = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    t = targets(sum(widths))
    n_chunks = -(-N // CHUNK)
    for backend in BACKENDS:
        _backend(backend)
        for reduction in ("mean", "sum", "none"):
            xi = x.clone().requires_grad_(True)
            wi, bi = w[block].clone().requires_grad_(True), b[block].clone()
            calls = count_collectives()
            loss = sharded(xi, wi, t, bi, process_group=dist.group.WORLD, shard_sizes=widths,
                           chunk_size=CHUNK, reduction=reduction, label_smoothing=0.1,
                           z_loss=0.01)
            assert gathers(calls) == n_chunks and len(calls) == 1, (backend, reduction, calls)
            calls.clear()
            loss.sum().backward(retain_graph=True)  # the gradients of the forward
            assert calls == {"all_reduce": 1}, (backend, reduction, calls)
            first = xi.grad.double(), wi.grad.double()
            calls.clear()
            loss.sum().backward()  # recomputed from the kept statistics: the same again
            assert calls == {"all_reduce": 1}, (backend, reduction, calls)
            assert_close(xi.grad, 2 * first[0], torch.float32, "second backward, x")
            assert_close(wi.grad, 2 * first[1], torch.float32, "second backward, W")
            # the input's gradient not needed: no all-reduce
            loss = sharded(x, wi, t, bi, process_group=dist.group.WORLD, shard_sizes=widths,
                           chunk_size=CHUNK, reduction=reduction)
            calls.clear()
            loss.sum().backward()
            assert calls == {}, (backend, reduction, calls)
            restore_collectives()


def check_errors(rank, world):
    """Bad input: an error on every rank, never a hang."""
    widths = (4, 5, 3)[:world]
    x, w, b = head(sum(widths))
    wr = w[sum(widths[:rank]):sum(widths[:rank + 1])]
    t = targets(sum(widths))
    group = dist.group.WORLD
    for backend in BACKENDS:
        _backend(backend)
        # a target out of range on one rank only: torch's IndexError there, the others learn
        # of it from the first all-gather
        bad = t.clone()
        if rank == world - 1:
            bad[1] = sum(widths)
        expected = IndexError if rank == world - 1 else RuntimeError
        with pytest.raises(expected, match="out of bounds|out of range"):
            sharded(x, wr, bad, process_group=group, shard_sizes=widths, chunk_size=CHUNK)
        # a block that disagrees with shard_sizes on rank 0
        sizes = list(widths)
        sizes[0] += 1
        expected = ValueError if rank == 0 else RuntimeError
        with pytest.raises(expected, match="block|another rank"):
            sharded(x, wr, t, process_group=group, shard_sizes=sizes)
        # arguments every rank gets wrong alike: raised before any collective
        with pytest.raises(NotImplementedError, match="probability targets"):
            sharded(x, wr, torch.rand(N, sum(widths)), process_group=group,
                    shard_sizes=widths)
        with pytest.raises(ValueError, match="process_group too"):
            sharded(x, wr, t, shard_sizes=widths)
        # accum_dtype sets the dtype of the input gradient's all-reduce: differing, an error
        # in the forward on every rank, not a collective mismatch in the backward
        with pytest.raises(RuntimeError, match="different arguments"):
            sharded(x, wr, t, process_group=group, shard_sizes=widths, chunk_size=CHUNK,
                    accum_dtype=torch.float64 if rank == 0 else torch.float32)
        with pytest.raises(RuntimeError, match="weight tensor should be defined"):
            sharded(x, wr, t, process_group=group, shard_sizes=widths, weight=torch.ones(3))
        # second derivatives would need the other ranks' logits
        xi = x.clone().requires_grad_(True)
        loss = sharded(xi, wr, t, process_group=group, shard_sizes=widths, reduction="none")
        with pytest.raises(RuntimeError, match="create_graph"):
            torch.autograd.grad(loss.sum(), xi, create_graph=True)
    # after all that the group still works
    assert torch.isfinite(sharded(x, wr, t, process_group=group, shard_sizes=widths))


def check_dtensor_tensor_parallel(rank, world):
    """A DTensor input replicated over the mesh with the weight and bias sharded Shard(0):
    the tensor-parallel head over DTensor's blocks (ceil(V / p) classes each), a replicated
    DTensor loss, the whole input gradient, the weight's block of the gradient."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.device_mesh import init_device_mesh

    import fused_losses as fl

    mesh = init_device_mesh("cpu", (world,))
    n_classes = 11  # DTensor's blocks over 3 ranks: 4, 4, 3
    x, w, b = head(n_classes)
    t = targets(n_classes, ignore=(1,))
    kwargs = dict(label_smoothing=0.1, softcap=4.0, z_loss=0.01)
    ref = run(reference, x.double(), w.double(), b.double(), t=t, **kwargs)
    for backend in BACKENDS:
        _backend(backend)
        dx = distribute_tensor(x, mesh, [Replicate()]).requires_grad_(True)
        dw = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
        db = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_(True)
        calls = count_collectives()
        loss = fl.linear_cross_entropy(dx, dw, t, linear_bias=db, chunk_size=CHUNK, **kwargs)
        assert gathers(calls) == -(-N // CHUNK) and len(calls) == 1, calls
        restore_collectives()
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
        # the upstream gradient ``run`` gave the reference, rounded to float32
        g_out = (torch.rand((), generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64) + 0.5).float()
        loss.backward(distribute_tensor(g_out, mesh, [Replicate()]))
        assert isinstance(dw.grad, DTensor) and dw.grad.placements == (Shard(0),)
        assert isinstance(dx.grad, DTensor) and dx.grad.placements == (Replicate(),)
        assert_close(loss.to_local(), ref[0], torch.float32, "DTensor TP loss")
        assert_close(dx.grad.to_local(), ref[1], torch.float32, "DTensor TP grad x")
        assert_close(dw.grad.full_tensor(), ref[2], torch.float32, "DTensor TP grad W")
        assert_close(db.grad.full_tensor(), ref[3], torch.float32, "DTensor TP grad b")
    # an input sharded over the mesh: a clear error
    with pytest.raises(NotImplementedError, match="replicated over its mesh"):
        fl.linear_cross_entropy(distribute_tensor(x, mesh, [Shard(0)]),
                                distribute_tensor(w, mesh, [Shard(0)]), t)


def check_dtensor_fsdp_gather(rank, world):
    """A plain input, each rank its own batch, with a weight and bias sharded as FSDP2 shards
    them outside a forward: gathered, the loss this rank's, the gradient reduce-scattered
    and averaged over the ranks: the gradient of the mean of the ranks' losses."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.device_mesh import init_device_mesh

    import fused_losses as fl

    mesh = init_device_mesh("cpu", (world,))
    n_classes = 9
    _, w, b = head(n_classes)
    xs = [random_logits((N, H), torch.float32, "cpu", scale=1.0, seed=10 + r)
          for r in range(world)]
    ts = [targets(n_classes, seed=20 + r) for r in range(world)]
    kwargs = dict(label_smoothing=0.1, z_loss=0.01, reduction="sum")
    ref_w = w.double().requires_grad_(True)
    ref_b = b.double().requires_grad_(True)
    ref_losses = [reference(xs[r].double(), ref_w, ts[r], ref_b, **kwargs)
                  for r in range(world)]
    (sum(ref_losses) / world).backward()
    for backend in BACKENDS:
        _backend(backend)
        dw = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
        db = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_(True)
        loss = fl.linear_cross_entropy(xs[rank], dw, ts[rank], linear_bias=db,
                                       chunk_size=CHUNK, **kwargs)
        assert not isinstance(loss, DTensor)
        assert_close(loss, ref_losses[rank], torch.float32, "FSDP-gathered loss")
        loss.backward()
        assert isinstance(dw.grad, DTensor) and dw.grad.placements == (Shard(0),)
        assert_close(dw.grad.full_tensor(), ref_w.grad, torch.float32, "FSDP grad W")
        assert_close(db.grad.full_tensor(), ref_b.grad, torch.float32, "FSDP grad b")


def check_fsdp_training_loop(rank, world):
    """FSDP2 (``fully_shard``) data parallelism: a body and an LM head, the loss computed
    outside the head's forward from its sharded weight and bias: a few SGD steps match one
    process's training on the whole batch."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.device_mesh import init_device_mesh

    import fused_losses as fl

    _backend("triton")
    mesh = init_device_mesh("cpu", (world,))
    vocab, steps, rows = 7, 3, 4

    def model():
        torch.manual_seed(0)
        return (torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh()),
                torch.nn.Linear(H, vocab))

    g = torch.Generator().manual_seed(1)
    xs = torch.randn(steps, world * rows, H, generator=g)
    ts = torch.randint(0, vocab, (steps, world * rows), generator=g)
    kwargs = dict(label_smoothing=0.1, z_loss=0.01)

    body, lm_head = model()
    opt = torch.optim.SGD([*body.parameters(), *lm_head.parameters()], lr=0.5)
    for i in range(steps):
        fl.cross_entropy(lm_head(body(xs[i])), ts[i], **kwargs).backward()
        opt.step()
        opt.zero_grad()
    ref = [*body.parameters(), *lm_head.parameters()]

    body, lm_head = model()
    fully_shard(body, mesh=mesh)
    fully_shard(lm_head, mesh=mesh)
    opt = torch.optim.SGD([*body.parameters(), *lm_head.parameters()], lr=0.5)
    mine = slice(rank * rows, (rank + 1) * rows)
    for i in range(steps):
        hidden = body(xs[i, mine])
        fl.linear_cross_entropy(hidden, lm_head.weight, ts[i, mine],
                                linear_bias=lm_head.bias, **kwargs).backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip([*body.parameters(), *lm_head.parameters()], ref, strict=True):
        torch.testing.assert_close(p.full_tensor().detach(), q.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the tests: one spawned world each
# ------------------------------------------------------------------------------------------


def test_world_2(tmp_path):
    run_world(2, ["check_world_2", "check_collectives", "check_dtensor_fsdp_gather",
                  "check_fsdp_training_loop", "check_logit_transform"], tmp_path)


def test_world_3(tmp_path):
    run_world(3, ["check_world_3", "check_collectives", "check_errors",
                  "check_dtensor_tensor_parallel"], tmp_path)
