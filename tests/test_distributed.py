"""Vocab-parallel cross-entropy over torch.distributed, on the CPU with gloo.

Each test spawns one world of processes (2, 3 or 4 ranks, uneven and empty blocks of the
vocabulary) and runs a list of checks in it, on both backends (the kernels under the Triton
interpreter, and the eager formula), reusing one process group. A hang fails fast: a world
whose ranks all stop using the CPU for ``STALL`` seconds (a deadlock, a collective that waits
for a rank that will never come) is killed and fails the test with every rank's stack, and
so is one still running after ``TIMEOUT`` seconds (a busy loop); a slow world on a loaded
machine is neither. Every rank builds
the same full logits, takes its block, and compares the vocab-parallel loss and its block of
the gradient with ``reference_cross_entropy`` (torch's ops in float64) on the full logits:
values and gradients, with a random upstream gradient, for every argument.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import signal
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _helpers import assert_close, loss_and_grads, random_logits, reference_cross_entropy

TIMEOUT = 900  # seconds per spawned world at most, however busy (a test takes 20-60 s alone)
STALL = 60  # seconds in which no rank of a world used any CPU: a hang
BACKENDS = ("triton", "torch")
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
               "broadcast", "reduce_scatter_tensor", "all_to_all_single", "barrier",
               "gather", "scatter", "reduce", "send", "recv", "all_gather_object")


# ------------------------------------------------------------------------------------------
# spawning a world
# ------------------------------------------------------------------------------------------


def run_world(world: int, checks: list[str], tmp_path, module: str = __name__) -> None:
    """Run the named checks (functions of ``module``) in ``world`` spawned processes, one
    gloo group. A rank that raises or dies fails the test (torch.multiprocessing's join
    names it, and its signal); a world that hangs (see the module's docstring) is killed,
    after every rank has printed its threads' stacks."""
    init = tmp_path / "init"
    ctx = mp.start_processes(_worker, args=(world, str(init), module, checks), nprocs=world,
                             join=False, start_method="spawn")
    cpu: dict[int, float] = {}  # pid -> the CPU seconds it had used when last read
    start = last_busy = time.monotonic()
    used = _cpu_seconds(ctx.processes, cpu)
    try:
        while not ctx.join(timeout=2):
            now, now_used = time.monotonic(), _cpu_seconds(ctx.processes, cpu)
            if now_used is None or now_used > used + 0.5:  # (None: no /proc, the wall limit)
                used, last_busy = now_used, now
            hang = (f"used no CPU for {STALL} s" if now - last_busy > STALL else
                    f"did not finish in {TIMEOUT} s" if now - start > TIMEOUT else None)
            if hang:
                pytest.fail(f"a world of {world} ranks {hang} (a hang?); their stacks:\n"
                            + _stacks(ctx.processes, init))
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()


def _stacks(processes, init) -> str:
    """Every live rank's threads' stacks: SIGUSR1 makes each write them to its own file."""
    alive = [(rank, p) for rank, p in enumerate(processes) if p.is_alive()]
    for _, process in alive:
        os.kill(process.pid, signal.SIGUSR1)
    files = {rank: f"{init}.stacks{rank}" for rank, _ in alive}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(
            os.path.exists(f) and os.path.getsize(f) for f in files.values()):
        time.sleep(0.2)
    time.sleep(0.5)  # (a dump still being written)
    out = []
    for rank, f in files.items():
        text = open(f).read() if os.path.exists(f) else ""
        out.append(f"--- rank {rank} ---\n{text or '(none written)'}")
    return "\n".join(out)


def _cpu_seconds(processes, last: dict) -> float | None:
    """The CPU time the processes have used, from Linux's /proc (a rank that has exited
    counts with what it had used when last read); None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            last[process.pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass  # (gone)
    return sum(last.values())


def _worker(rank: int, world: int, init: str, module: str, checks: list[str]) -> None:
    # A fatal signal (an abort in a C++ thread) prints every thread's Python stack to stderr
    # first; SIGUSR1 (a hang, from run_world) writes them to this rank's file and carries on.
    faulthandler.enable(all_threads=True)
    stacks = open(f"{init}.stacks{rank}", "w")  # (open while the rank runs)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    torch.set_num_threads(1)  # (ranks share the machine's cores)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=TIMEOUT))
    try:
        tests = importlib.import_module(module)
        for name in checks:
            getattr(tests, name)(rank, world)
        dist.barrier()  # no rank tears its group down while another still uses it
    finally:
        dist.destroy_process_group()
    # A rank that passed leaves without the interpreter's finalization: gloo's threads torn
    # down there, while something still holds a (destroyed) group, abort the process
    # ("terminate called without an active exception": torch's teardown race, one world in
    # ~20 after the FSDP checks). That the library itself lets a destroyed group go is
    # check_group_released's to test; a rank that raised exits through torch's spawn wrapper.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _backend(name: str) -> None:
    os.environ["FUSED_LOSSES_BACKEND"] = name


# ------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------

N = 6  # rows


def targets(n_classes: int, seed: int = 1, ignore=(), in_range=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo, hi = in_range or (0, n_classes)
    t = torch.randint(lo, hi, (N,), generator=g)
    for i in ignore:
        t[i] = -100
    return t


def compare(rank: int, widths, dtype=torch.float32, target=None, weight=False, seed=0,
            slack=1.0, via="shard_sizes", **kwargs):
    """The vocab-parallel loss of this rank's block against the reference on the full
    logits: the loss (the same on every rank) and this rank's block of the gradient."""
    from fused_losses.distributed import vocab_parallel_cross_entropy

    n_classes = sum(widths)
    offset, width = sum(widths[:rank]), widths[rank]
    full = random_logits((N, n_classes), dtype, "cpu", seed=seed)
    t = targets(n_classes) if target is None else target
    w = None
    if weight:
        g = torch.Generator().manual_seed(7)
        w = (torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.25).to(dtype)
    layout = dict(shard_sizes=widths) if via == "shard_sizes" else {}
    ours, grads = loss_and_grads(
        vocab_parallel_cross_entropy, {"local_logits": full[:, offset:offset + width]},
        {"local_logits"}, round_to=dtype, target=t, weight=w, **layout, **kwargs)
    ref, ref_grads = loss_and_grads(
        reference_cross_entropy, {"input": full.double()}, {"input"}, round_to=dtype,
        target=t, weight=None if w is None else w.double(), **kwargs)
    what = f"rank {rank}, widths {widths}, {dtype}, {kwargs}"
    assert ours.dtype == dtype, what
    assert_close(ours, ref, dtype, f"loss ({what})", slack)
    assert_close(grads["local_logits"], ref_grads["input"][:, offset:offset + width], dtype,
                 f"gradient ({what})", slack, terms=1.0 / n_classes)
    if kwargs.get("z_loss"):  # the z-loss term alone, from the same call
        _, z = vocab_parallel_cross_entropy(full[:, offset:offset + width], t, weight=w,
                                            return_z_loss=True, **layout, **kwargs)
        _, ref_z = reference_cross_entropy(full.double(), t, None if w is None else w.double(),
                                           return_z_loss=True, **kwargs)
        assert_close(z, ref_z, dtype, f"z-loss term ({what})", slack)
    assert_same_on_every_rank(ours, what)  # the loss, bitwise


def assert_same_on_every_rank(value: torch.Tensor, what: str) -> None:
    """``value`` is bitwise the same on every rank of the default group (NaN alike)."""
    every = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(every, value.contiguous())
    assert all(torch.equal(e, value) or (e.isnan().all() and value.isnan().all())
               for e in every), what


# Every argument, each reduction: weights with smoothing and a real-class ignore_index,
# softcap with z-loss, and all of them at once.
ARGUMENTS = [
    dict(),
    dict(weight=True, label_smoothing=0.1),
    dict(softcap=3.0, z_loss=0.01),
    dict(weight=True, label_smoothing=0.2, softcap=2.0, z_loss=0.05, ignore_index=3),
]


def sweep(rank: int, widths, arguments=ARGUMENTS) -> None:
    n_classes = sum(widths)
    t = targets(n_classes, ignore=(2,))
    for backend in BACKENDS:
        _backend(backend)
        for reduction in ("mean", "sum", "none"):
            for kwargs in arguments:
                ignore = kwargs.get("ignore_index", -100)
                compare(rank, widths, target=torch.where(t == -100, ignore, t),
                        reduction=reduction, **kwargs)
    # half precision on the kernels, float64 on the eager formula
    _backend("triton")
    compare(rank, widths, torch.bfloat16, target=t, weight=True, label_smoothing=0.1,
            softcap=5.0, z_loss=0.01)
    _backend("torch")
    compare(rank, widths, torch.float64, target=t, weight=True, label_smoothing=0.1,
            softcap=5.0, z_loss=0.01, reduction="none")


def edge_cases(rank: int, widths) -> None:
    n_classes = sum(widths)
    for backend in BACKENDS:
        _backend(backend)
        # every target in rank 0's block: the other ranks hold no target
        compare(rank, widths, target=targets(n_classes, in_range=(0, widths[0])),
                weight=True, label_smoothing=0.1, z_loss=0.01)
        # every target ignored: NaN for a mean (gradient 0), 0 for a sum, as torch
        ignored = torch.full((N,), -100)
        compare(rank, widths, target=ignored)
        compare(rank, widths, target=ignored, reduction="sum", z_loss=0.1)
        # -inf logits (a masked vocabulary) in every block
        compare(rank, widths, target=targets(n_classes), seed=3, reduction="none",
                label_smoothing=0.1, z_loss=0.01)


# ------------------------------------------------------------------------------------------
# the checks each world runs
# ------------------------------------------------------------------------------------------


def check_logit_transform(rank, world):
    """temperature and logit_scale with the softcap (scale, softcap, temperature: TRL's
    order) and every other option: the vocab-parallel loss and the DTensor path against the
    reference on the transformed full logits (its z-loss on their log-sum-exp)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.device_mesh import init_device_mesh

    import fused_losses as fl
    from fused_losses.distributed import vocab_parallel_cross_entropy

    widths = (5, 8, 3)[:world]
    n_classes = sum(widths)
    offset, width = sum(widths[:rank]), widths[rank]
    full = random_logits((N, n_classes), torch.float32, "cpu")
    t = targets(n_classes, ignore=(2,))
    w = torch.rand(n_classes, generator=torch.Generator().manual_seed(3)) + 0.5
    transform = dict(temperature=0.7, logit_scale=-1.5, softcap=4.0)
    mesh = init_device_mesh("cpu", (world,))

    def reference(x, temperature, logit_scale, softcap, **kwargs):
        z = softcap * torch.tanh(x * logit_scale / softcap) / temperature
        return reference_cross_entropy(z, t, w.double(), **kwargs)

    for backend in BACKENDS:
        _backend(backend)
        for reduction in ("mean", "none"):
            kwargs = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.01, **transform)
            ref, ref_grads = loss_and_grads(reference, {"x": full.double()}, {"x"},
                                            round_to=torch.float32, **kwargs)
            what = f"{backend}, {reduction}"
            ours, grads = loss_and_grads(
                vocab_parallel_cross_entropy, {"local_logits": full[:, offset:offset + width]},
                {"local_logits"}, round_to=torch.float32, target=t, weight=w,
                shard_sizes=widths, **kwargs)
            assert_close(ours, ref, torch.float32, f"vocab-parallel loss ({what})")
            assert_close(grads["local_logits"], ref_grads["x"][:, offset:offset + width],
                         torch.float32, f"vocab-parallel gradient ({what})",
                         terms=1.0 / n_classes)
            dx = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_(True)
            loss = fl.cross_entropy(dx, t, w, **kwargs)
            g_out = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64) + 0.5).float()
            loss.backward(distribute_tensor(g_out, mesh, [Replicate()]))
            assert_close(loss.to_local(), ref, torch.float32, f"DTensor loss ({what})")
            assert_close(dx.grad.full_tensor(), ref_grads["x"], torch.float32,
                         f"DTensor gradient ({what})", terms=1.0 / n_classes)


def check_world_2(rank, world):
    sweep(rank, (5, 8))
    edge_cases(rank, (5, 8))


def check_world_3(rank, world):
    sweep(rank, (7, 0, 6), ARGUMENTS[::3])  # an empty block in the middle


def check_world_4(rank, world):
    sweep(rank, (4, 4, 4, 1), ARGUMENTS[::3])  # DTensor's blocks of 13 classes over 4 ranks
    edge_cases(rank, (1, 9, 0, 3))


def check_exchanged_layout(rank, world):
    """Without shard_sizes: the widths exchanged on the first call, once; a changed width
    is an error on every rank."""
    from fused_losses import distributed

    widths = tuple(3 + r for r in range(world))
    calls = count_collectives()
    for backend in BACKENDS:
        _backend(backend)
        compare(rank, widths, via="exchange", weight=True, label_smoothing=0.1)
    # 1 (the exchange) + 1 call x 2 backends, and compare's own all_gather of the loss x 2
    assert gathers(calls) == 3 and calls.get("all_gather") == 2, calls
    restore_collectives()
    changed = list(widths)
    changed[-1] += 1
    x = random_logits((N, changed[rank]), torch.float32, "cpu")
    expected = ValueError if rank == world - 1 else RuntimeError
    with pytest.raises(expected, match="rank|layout"):
        distributed.vocab_parallel_cross_entropy(x, targets(sum(widths)))
    distributed.reset_vocab_layout()
    # the exchange also checks the number of rows (later calls could not: the all-gather's
    # size would differ)
    with pytest.raises(RuntimeError, match="different numbers of rows"):
        distributed.vocab_parallel_cross_entropy(x[:N - rank], targets(sum(widths))[:N - rank])
    loss = distributed.vocab_parallel_cross_entropy(x, targets(sum(widths)))
    assert torch.isfinite(loss)


def check_collective_count(rank, world):
    """One collective in the forward, none in the backward, on both backends, for every
    reduction (the gradient in the forward, or recomputed in the backward)."""
    from fused_losses.distributed import vocab_parallel_cross_entropy

    widths = (5, 8, 3)[:world]
    x = random_logits((N, widths[rank]), torch.float32, "cpu").requires_grad_(True)
    t = targets(sum(widths))
    for backend in BACKENDS:
        _backend(backend)
        for reduction in ("mean", "sum", "none"):
            calls = count_collectives()
            loss = vocab_parallel_cross_entropy(x, t, shard_sizes=widths, reduction=reduction,
                                                label_smoothing=0.1, z_loss=0.01)
            assert gathers(calls) == 1 and len(calls) == 1, (backend, reduction, calls)
            calls.clear()
            loss.sum().backward()
            assert calls == {}, (backend, reduction, calls)
            restore_collectives()


def check_group_released(rank, world):
    """A group the user destroys is not kept alive by the library (its exchanged layout, its
    checked headers): a destroyed gloo group that lives on until the interpreter's exit aborts
    the process there, one run in five ("terminate called without an active exception")."""
    import gc
    import weakref

    from fused_losses.distributed import vocab_parallel_cross_entropy

    group = dist.new_group(list(range(world)), backend="gloo")
    widths = tuple(3 + r for r in range(world))
    x = random_logits((N, widths[rank]), torch.float32, "cpu")
    for backend in BACKENDS:
        _backend(backend)
        vocab_parallel_cross_entropy(x, targets(sum(widths)), process_group=group)  # exchanged
    alive = weakref.ref(group)
    dist.destroy_process_group(group)
    del group
    gc.collect()
    assert alive() is None, gc.get_referrers(alive())


def check_row_losses_in_place(rank, world):
    """The building block the tensor-parallel LM head calls per chunk of rows: the rows'
    losses over the group, the gradient written into the logits block itself."""
    from fused_losses.kernels import eager

    from fused_losses.distributed import protocol, vocab_parallel

    widths = (6, 7, 2, 5)[:world]
    full = random_logits((N, sum(widths)), torch.float32, "cpu")
    t = targets(sum(widths), ignore=(1,))
    opts = eager.Options(reduction="sum", smoothing=0.1, softcap=4.0, z_loss=0.01)
    kwargs = dict(reduction="sum", label_smoothing=0.1, softcap=4.0, z_loss=0.01)
    ref_x = full.double().requires_grad_(True)
    ref = reference_cross_entropy(ref_x, t, **kwargs)
    ref.backward()
    shard = protocol._shard(widths, rank, "test")
    block = slice(shard.offset, shard.offset + shard.width)
    for kernels in (True, False):
        _backend("triton" if kernels else "torch")
        x = full[:, block].clone()
        scales = eager.upstream_scales(opts, None, N, None, x.device)
        loss, z, stats = vocab_parallel.row_losses(x, t, None, opts, shard, dist.group.WORLD,
                                                   kernels=kernels, grad=x, scales=scales)
        assert stats.shape == (3, N)
        out, _ = eager.reduce_rows(loss, z, opts, None, N)
        assert_close(out, ref, torch.float32, "row_losses")
        assert_close(x, ref_x.grad[:, block], torch.float32, "gradient in place",
                     terms=1.0 / sum(widths))


def check_errors(rank, world):
    """Bad input: an error on every rank, never a hang."""
    from fused_losses import distributed

    widths = (4, 5, 3)[:world]
    x = random_logits((N, widths[rank]), torch.float32, "cpu")
    t = targets(sum(widths))
    vp = distributed.vocab_parallel_cross_entropy
    for backend in BACKENDS:
        _backend(backend)
        # targets that differ across ranks
        other = t.clone()
        other[0] = (t[0] + rank) % sum(widths)
        with pytest.raises(RuntimeError, match="targets differ across ranks"):
            vp(x, other, shard_sizes=widths)
        # a width that disagrees with shard_sizes on one rank: ValueError there, the others
        # learn it from the all-gather
        sizes = list(widths)
        sizes[0] += 1
        expected = ValueError if rank == 0 else RuntimeError
        with pytest.raises(expected, match="block|another rank"):
            vp(x, t, shard_sizes=sizes)
        # a target out of range on one rank only: torch's IndexError there
        bad = t.clone()
        if rank == world - 1:
            bad[1] = sum(widths)
        expected = IndexError if rank == world - 1 else RuntimeError
        with pytest.raises(expected, match="out of bounds|out of range"):
            vp(x, bad, shard_sizes=widths)
        # different arguments on different ranks
        with pytest.raises(RuntimeError, match="different arguments"):
            vp(x, t, shard_sizes=widths, label_smoothing=0.1 * rank)
        # arguments every rank gets wrong alike: raised before any collective
        with pytest.raises(ValueError, match="shard_sizes"):
            vp(x, t, shard_sizes=widths[:-1])
        with pytest.raises(RuntimeError, match="weight tensor should be defined"):
            vp(x, t, shard_sizes=widths, weight=torch.ones(3))
        with pytest.raises(ValueError, match="expected a target of shape"):
            vp(x, t[:-1], shard_sizes=widths)
        with pytest.raises(NotImplementedError, match="probability targets"):
            vp(x, torch.rand_like(x), shard_sizes=widths)
    # a process group whose backend cannot serve the tensors' device: refused before any
    # collective (gloo with CUDA tensors is the same check; CI has no GPU)
    calls = count_collectives()
    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        with pytest.raises(ValueError, match="cannot all-gather cpu tensors"):
            vp(x, t, shard_sizes=widths)
    finally:
        dist.get_backend = real
    assert calls == {}, calls
    restore_collectives()
    # after all that the group still works
    loss = vp(x, t, shard_sizes=widths)
    assert torch.isfinite(loss)


def check_device_side_checks(rank, world):
    """The GPU's steady state, on the CPU: the headers checked on the device, no host read;
    a rank that disagrees makes the loss and the gradient NaN instead of wrong."""
    from fused_losses import distributed
    from fused_losses.distributed import protocol

    widths = (4, 5, 3)[:world]
    t = targets(sum(widths))
    protocol.CHECK_ON_HOST = False
    try:
        for backend in BACKENDS:
            _backend(backend)
            compare(rank, widths, target=t, weight=True, label_smoothing=0.1)
            x = random_logits((N, widths[rank]), torch.float32, "cpu").requires_grad_(True)
            other = t.clone()
            other[0] = (t[0] + rank) % sum(widths)
            loss = distributed.vocab_parallel_cross_entropy(x, other, shard_sizes=widths)
            loss.backward()
            assert loss.isnan() and x.grad.isnan().any(), (backend, loss)
    finally:
        protocol.CHECK_ON_HOST = None


def check_dtensor(rank, world):
    """cross_entropy on DTensor logits sharded on the class dimension, as under torch's
    loss_parallel: a replicated DTensor loss, the gradient a DTensor of the logits'
    placements; the same numbers as the plain loss on the full logits."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    import fused_losses as fl

    mesh = init_device_mesh("cpu", (world,))
    n_classes = 9  # DTensor's blocks: ceil(9 / p), the last ones shorter (4 ranks: 3, 3, 3, 0)
    full = random_logits((N, n_classes), torch.float32, "cpu")
    t = targets(n_classes, ignore=(4,))
    w = torch.rand(n_classes, generator=torch.Generator().manual_seed(3)) + 0.5
    for backend in BACKENDS:
        _backend(backend)
        for reduction in ("mean", "none"):
            kwargs = dict(reduction=reduction, label_smoothing=0.1, softcap=4.0, z_loss=0.01)
            dx = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_(True)
            calls = count_collectives()
            loss = fl.cross_entropy(dx, t, w, **kwargs)
            assert gathers(calls) == 1 and len(calls) == 1, calls
            restore_collectives()
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
            g_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(5)) + 0.5
            loss.backward(distribute_tensor(g_out, mesh, [Replicate()]))
            assert isinstance(dx.grad, DTensor) and dx.grad.placements == (Shard(1),)
            ref_x = full.double().requires_grad_(True)
            ref = reference_cross_entropy(ref_x, t, w.double(), **kwargs)
            ref.backward(g_out.double())
            assert_close(loss.to_local(), ref, torch.float32, "DTensor loss")
            assert_close(dx.grad.full_tensor(), ref_x.grad, torch.float32, "DTensor gradient",
                         terms=1.0 / n_classes)
    # (N, C, d) logits, classes on dimension 1
    _backend("triton")
    full3 = random_logits((2, n_classes, 3), torch.float32, "cpu", seed=4)
    t3 = torch.randint(0, n_classes, (2, 3), generator=torch.Generator().manual_seed(6))
    dx = distribute_tensor(full3, mesh, [Shard(1)]).requires_grad_(True)
    loss = fl.cross_entropy(dx, t3, reduction="none", label_smoothing=0.1)
    loss.to_local().sum().backward()
    ref_x = full3.double().requires_grad_(True)
    ref = reference_cross_entropy(ref_x, t3, reduction="none", label_smoothing=0.1)
    ref.sum().backward()
    assert_close(loss.to_local(), ref, torch.float32, "K-dimensional DTensor loss")
    assert_close(dx.grad.full_tensor(), ref_x.grad, torch.float32,
                 "K-dimensional DTensor gradient", terms=1.0 / n_classes)
    # torch's own loss_parallel gives the same loss (target and weight replicated DTensors;
    # it refuses label smoothing with class weights, and an empty block: 12 classes here)
    _backend("torch")
    full = random_logits((N, 12), torch.float32, "cpu", seed=8)
    dx = distribute_tensor(full, mesh, [Shard(1)])
    w = torch.rand(12, generator=torch.Generator().manual_seed(3)) + 0.5
    dt, dw = (distribute_tensor(v, mesh, [Replicate()]) for v in (targets(12), w))
    with loss_parallel():
        theirs = F.cross_entropy(dx, dt, dw)
    ours = fl.cross_entropy(dx, dt, dw)
    torch.testing.assert_close(ours.full_tensor(), theirs.full_tensor())
    # logits sharded on another dimension: a clear error
    with pytest.raises(NotImplementedError, match="sharded on the class dimension"):
        fl.cross_entropy(distribute_tensor(full, mesh, [Shard(0)]), t)


def check_training_loop(rank, world):
    """A tensor-parallel LM head trained a few steps with SGD, logits sharded by torch's
    ColwiseParallel and the loss on the DTensor (the loss_parallel pattern), inside FSDP2
    (``fully_shard``) on the other dimension of a 2-D mesh: the parameters match a single
    process's training with the plain loss on the whole batch."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import fused_losses as fl

    _backend("triton")
    dp, tp = (2, world // 2) if world >= 4 else (1, world)
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    vocab, hidden, steps = 11, 8, 3

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                   torch.nn.Linear(hidden, vocab))

    g = torch.Generator().manual_seed(1)
    xs = torch.randn(steps, dp * 4, hidden, generator=g)
    ts = torch.randint(0, vocab, (steps, dp * 4), generator=g)

    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for i in range(steps):
        fl.cross_entropy(ref(xs[i]), ts[i], label_smoothing=0.1, z_loss=0.01).backward()
        opt.step()
        opt.zero_grad()

    ours = model()
    parallelize_module(ours, mesh["tp"], {"2": ColwiseParallel(use_local_output=False)})
    if dp > 1:
        fully_shard(ours, mesh=mesh["dp"])
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    rows = slice(mesh.get_local_rank("dp") * 4, mesh.get_local_rank("dp") * 4 + 4)
    for i in range(steps):
        logits = ours(xs[i, rows])
        fl.cross_entropy(logits, ts[i, rows], label_smoothing=0.1, z_loss=0.01).backward()
        opt.step()
        opt.zero_grad()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), q.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------
# counting collectives: every public collective of torch.distributed, patched
# ------------------------------------------------------------------------------------------

_REAL: dict = {}


def count_collectives() -> dict:
    calls: dict = {}
    for name in COLLECTIVES:
        real = _REAL.setdefault(name, getattr(dist, name, None))
        if real is None:
            continue

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        setattr(dist, name, counted)
    return calls


def gathers(calls: dict) -> int:
    """The all-gathers into one tensor counted (torch 2.13 renamed the function)."""
    return calls.get("all_gather_single", 0) + calls.get("all_gather_into_tensor", 0)


def restore_collectives() -> None:
    for name, real in _REAL.items():
        if real is not None:
            setattr(dist, name, real)


# ------------------------------------------------------------------------------------------
# the tests: one spawned world each
# ------------------------------------------------------------------------------------------


def test_world_2(tmp_path):
    run_world(2, ["check_world_2", "check_collective_count", "check_exchanged_layout",
                  "check_row_losses_in_place", "check_training_loop", "check_group_released",
                  "check_logit_transform"],
              tmp_path)


def test_world_3(tmp_path):
    run_world(3, ["check_world_3", "check_errors", "check_device_side_checks"], tmp_path)


def test_world_4(tmp_path):
    run_world(4, ["check_world_4", "check_row_losses_in_place", "check_dtensor",
                  "check_training_loop"], tmp_path)


def check_hang(rank, world):
    """Rank 0 waits in a collective that rank 1 never joins."""
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(3600)


def test_a_hang_fails_fast(tmp_path, monkeypatch):
    """A world whose ranks all wait fails after STALL seconds, not the collective's timeout,
    and the failure shows where each rank waits."""
    monkeypatch.setattr(sys.modules[__name__], "STALL", 5)
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="used no CPU for 5 s") as failure:
        run_world(2, ["check_hang"], tmp_path)
    assert time.monotonic() - start < TIMEOUT / 4
    message = str(failure.value)
    ranks = message.split("--- rank 1 ---")
    assert len(ranks) == 2 and "--- rank 0 ---" in ranks[0], message
    assert "in barrier" in ranks[0] and "in check_hang" in ranks[0], message
    assert "in check_hang" in ranks[1], message


# ------------------------------------------------------------------------------------------
# the building blocks, in one process: the eager twins agree with the kernels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [False, True], ids=["class targets", "probabilities"])
def test_eager_blocks_match_the_kernels(prob):
    """eager's partial_stats / combine_stats / grad_from_stats / denominators against
    the kernels' on the same blocks of classes (one empty), and both against the float64
    reference: the two backends of the vocab-parallel loss are the same arithmetic."""
    from fused_losses.kernels import cross_entropy as ce
    from fused_losses.kernels import eager

    n_rows, n_classes = 5, 29
    blocks = [(0, 11), (11, 0), (11, 18)]
    x = random_logits((n_rows, n_classes), torch.float32, "cpu")
    w = torch.rand(n_classes, generator=torch.Generator().manual_seed(2)) + 0.25
    if prob:
        t = torch.softmax(random_logits((n_rows, n_classes), torch.float32, "cpu", seed=3), 1)
    else:
        t = targets(n_classes)[:n_rows]
        t[3] = -100
    opts = eager.Options(reduction="none", smoothing=0.1, softcap=3.0, z_loss=0.01,
                         prob_target=prob)
    g_out = torch.rand(n_rows, generator=torch.Generator().manual_seed(4)) + 0.5
    ref_x = x.double().requires_grad_(True)
    ref_t = t.double().requires_grad_(True) if prob else t
    ref = reference_cross_entropy(ref_x, ref_t, w.double(), reduction="none",
                                  label_smoothing=0.1, softcap=3.0, z_loss=0.01)
    ref.backward(g_out.double())
    for ops in (ce, eager):
        def tgt(offset, width):
            return t[:, offset:offset + width].contiguous() if prob else t

        parts = torch.cat([
            ops.partial_stats(x[:, o:o + wd].contiguous().unsqueeze(0), tgt(o, wd), w, opts,
                              class_offset=o, n_classes=n_classes)
            for o, wd in blocks if wd or ops is eager])
        loss, z, stats = ops.combine_stats(parts, t, w, opts, n_classes)
        assert_close(loss + z, ref, torch.float32, f"{ops.__name__}: loss")
        scales = eager.upstream_scales(opts, None, n_rows, g_out, "cpu")
        grad, grad_t = torch.zeros_like(x), torch.zeros_like(t) if prob else None
        for o, wd in blocks:
            if wd:
                gb, gt = torch.empty(n_rows, wd), torch.empty(n_rows, wd) if prob else None
                ops.grad_from_stats(x[:, o:o + wd].contiguous().unsqueeze(0), tgt(o, wd), w,
                                    stats, scales, opts, grad=gb.unsqueeze(0), grad_target=gt,
                                    class_offset=o, n_classes=n_classes)
                grad[:, o:o + wd] = gb
                if prob:
                    grad_t[:, o:o + wd] = gt
        assert_close(grad, ref_x.grad, torch.float32, f"{ops.__name__}: gradient",
                     terms=1.0 / n_classes)
        if prob:
            assert_close(grad_t, ref_t.grad, torch.float32, f"{ops.__name__}: target gradient")
        else:
            torch.testing.assert_close(ops.denominators(t, w, -100, n_classes),
                                       eager.denominators(t, w, -100, n_classes))

