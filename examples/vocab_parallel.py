"""Vocab-parallel cross-entropy: an LM head sharded by vocabulary over the ranks.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py        # CPU (gloo) or GPUs (NCCL)

Each rank holds a block of the output layer's rows (uneven blocks: the vocabulary need not
divide by the number of ranks), computes its block of the logits, and the loss needs one
all-gather of per-row statistics, not the logits. The example checks the loss and the
gradients against the plain loss on the gathered logits, then runs the same head through
torch's tensor parallelism (DTensor logits, what ``loss_parallel`` would take) with
``fused_losses.cross_entropy``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import fused_losses as fl
from fused_losses.distributed import vocab_parallel_cross_entropy


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    tokens, hidden, vocab = 64, 32, 1003  # 1003 classes: uneven blocks
    g = torch.Generator().manual_seed(0)  # the same numbers on every rank
    h = torch.randn(tokens, hidden, generator=g).to(device)  # replicated hidden states
    head = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    labels[::7] = -100  # some positions ignored (padding)

    # ---- plain tensors: this rank's rows of the head --------------------------------------
    widths = [vocab // world + (r < vocab % world) for r in range(world)]
    start = sum(widths[:rank])
    shard = head[start:start + widths[rank]].clone().requires_grad_(True)
    local_logits = h @ shard.T  # (tokens, widths[rank])
    loss = vocab_parallel_cross_entropy(local_logits, labels, shard_sizes=widths,
                                        label_smoothing=0.1, z_loss=1e-4)
    loss.backward()

    # the check: the same loss on the whole head, in one process
    full = head.clone().requires_grad_(True)
    ref = fl.cross_entropy(h @ full.T, labels, label_smoothing=0.1, z_loss=1e-4)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(shard.grad, full.grad[start:start + widths[rank]])
    if rank == 0:
        print(f"vocab_parallel_cross_entropy over {world} ranks (blocks {widths}): "
              f"loss {loss.item():.6f}, the same as on the gathered logits")

    # ---- DTensor: torch's tensor parallelism shards the head, fl.cross_entropy the loss ---
    from torch.distributed.tensor.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh(device.type, (world,))
    model = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    with torch.no_grad():
        model.weight.copy_(head)
    parallelize_module(model, mesh, ColwiseParallel(use_local_output=False))
    logits = model(h)  # a DTensor sharded on the classes (DTensor's blocks: ceil(V / p))
    loss = fl.cross_entropy(logits, labels, label_smoothing=0.1, z_loss=1e-4)
    loss.backward()
    torch.testing.assert_close(loss.full_tensor(), ref)
    torch.testing.assert_close(model.weight.grad.full_tensor(), full.grad)
    if rank == 0:
        print(f"fl.cross_entropy on DTensor logits {tuple(logits.placements)}: "
              f"loss {loss.full_tensor().item():.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
