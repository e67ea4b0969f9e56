"""The kernels in the CUDA runtime's ways of running work: captured in a CUDA graph (what
``torch.compile(mode="reduce-overhead")`` does), and on a GPU other than the current one.

GPU only: the interpreter has no streams, graphs or devices. A CUDA graph cannot capture a
host sync, so capture also proves that a loss's forward and backward never sync.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import LOSS_PAIRS, assert_close, loss_operands

pytestmark = pytest.mark.cuda


def operands(loss, device, seed):
    return loss_operands(loss, (64, 40000 if loss == "cross_entropy" else 4096), device, seed)


def reference(loss, x, t):
    ref_x = x.detach().cpu().double().requires_grad_(True)
    t = t.cpu().double() if t.is_floating_point() else t.cpu()
    out = LOSS_PAIRS[loss][1](ref_x, t)
    (out * 0.5).backward()
    return out.detach(), ref_x.grad


@pytest.mark.parametrize("loss", list(LOSS_PAIRS))
def test_cuda_graph_capture_and_replay(loss):
    ours = LOSS_PAIRS[loss][0]
    x, t = operands(loss, "cuda", seed=0)
    x.requires_grad_(True)
    half = torch.tensor(0.5, device="cuda", dtype=torch.bfloat16)

    # warm up on a side stream (kernels compiled, allocator pools set), as torch's docs ask
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            x.grad = None
            (ours(x, t) * half).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        static_loss = ours(x, t)
        (static_loss * half).backward()

    for seed in (1, 2):  # new data in the captured inputs, then replay
        new_x, new_t = operands(loss, "cuda", seed)
        with torch.no_grad():
            x.copy_(new_x)
        t.copy_(new_t)
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_grad = reference(loss, new_x, new_t)
        assert_close(static_loss, ref, torch.bfloat16, f"{loss} loss, replay {seed}")
        assert_close(x.grad, ref_grad, torch.bfloat16, f"{loss} grad, replay {seed}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("loss", list(LOSS_PAIRS))
def test_tensors_on_a_gpu_other_than_the_current_one(loss):
    ours = LOSS_PAIRS[loss][0]
    x, t = operands(loss, "cuda:1", seed=0)
    x.requires_grad_(True)
    with torch.cuda.device(0):
        out = ours(x, t)
        (out * 0.5).backward()
    torch.cuda.synchronize(1)
    ref, ref_grad = reference(loss, x, t)
    assert out.device == x.grad.device == torch.device("cuda:1")
    assert_close(out, ref, torch.bfloat16, "loss")
    assert_close(x.grad, ref_grad, torch.bfloat16, "grad")
