"""An interpreted launch leaves Triton as it found it.

CPU tensors run the kernels under the Triton interpreter (``kernels/_common.interpret``),
which swaps triton.language's builtins and some of its classes' methods for numpy versions
while a kernel runs, and does not put back those it swapped for a ``@triton.jit`` helper the
kernel calls (tl.max, tl.sum, our own). A process that interprets a kernel and then compiles
one for a GPU (the test suite on a GPU machine: CPU cases first, CUDA cases after) failed in
the compiler: "'value' object has no attribute 'dtype'" at ``tl.program_id(0).to(tl.int64)``.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import triton

import fused_losses as fl

# Triton < 3.7's interpreter turns one-element arrays into Python ints, which numpy >= 2.4
# refuses (CONTRIBUTING: that Triton's CPU tests need numpy < 2.4). The GPU machine's image
# has exactly that pair: nothing can be interpreted there, so there is nothing to test.
pytestmark = pytest.mark.skipif(
    tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)
    and tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4),
    reason="this Triton's interpreter cannot run with this numpy (numpy < 2.4 needed)")

ROOT = Path(__file__).resolve().parent.parent


def _namespaces():
    import triton.language as tl

    spaces = {"tl": tl, "tl.core": tl.core, "tl.math": tl.math, "tl.standard": tl.standard}
    spaces.update({f"tl.core.{name}": value for name, value in vars(tl.core).items()
                   if isinstance(value, type) and value.__module__ == tl.core.__name__})
    return spaces


def _every_loss_interpreted():
    """Forward and backward of each loss on CPU tensors, interpreted: between them they call
    Triton's standard helpers (tl.max, tl.sum, tl.where...) and our own @triton.jit ones."""
    x = torch.randn(3, 5, requires_grad=True)
    fl.cross_entropy(x, torch.tensor([0, 4, 2]), label_smoothing=0.1).backward()
    fl.cross_entropy(torch.randn(2, 3, 4, requires_grad=True),
                     torch.randint(0, 3, (2, 4))).sum().backward()
    fl.binary_cross_entropy_with_logits(x, torch.rand(3, 5)).backward()
    fl.huber_loss(x, torch.randn(3, 5), delta=0.5).backward()
    fl.log_probs(torch.randn(3, 5), torch.tensor([1, 2, 3]))


def test_interpreted_launch_leaves_triton_language_as_it_was(monkeypatch):
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "triton")
    from triton.runtime import interpreter

    spaces = _namespaces()
    before = {name: dict(vars(space)) for name, space in spaces.items()}
    _every_loss_interpreted()
    changed, added = [], []
    for name, space in spaces.items():
        now = vars(space)
        changed += [f"{name}.{attr}" for attr, value in before[name].items()
                    if now.get(attr) is not value]
        # What may appear: a submodule imported meanwhile (tl.semantic), and the globals the
        # interpreter's rewriter adds to the module of a function it interprets (its cached
        # rewritten code reads them at every later launch; they shadow nothing)
        added += [f"{name}.{attr}" for attr, value in now.items()
                  if attr not in before[name] and not inspect.ismodule(value)
                  and vars(interpreter).get(attr) is not value]
    assert not changed, f"left patched: {changed}"
    assert not added, f"left behind: {added}"


def test_kernel_compiles_for_sm90_after_an_interpreted_launch(tmp_path):
    # The failure as the GPU machine met it, without a GPU: interpret a loss, then compile
    # a kernel through Triton's real pipeline for sm_90 (tests/_compile_check.py), in a fresh
    # process so that nothing else decides what was interpreted first.
    code = (
        "import torch, fused_losses as fl\n"
        "from tests._compile_check import Capture, compile_launch\n"
        "x = torch.randn(3, 5, requires_grad=True)\n"
        "fl.cross_entropy(x, torch.tensor([0, 4, 2])).backward()\n"
        "fl.huber_loss(x, torch.randn(3, 5)).backward()\n"
        "with Capture() as capture:\n"
        "    fl.huber_loss(torch.randn(3, 5), torch.randn(3, 5))\n"
        "for kernel, grid, kwargs in capture.launches:\n"
        "    compile_launch(kernel, kwargs, arch=90)\n"
        "    print('compiled', kernel.fn.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # (an empty cache: a cached cubin would skip the compiler this is about)
    env.update(PYTHONPATH=str(ROOT), FUSED_LOSSES_BACKEND="triton",
               TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "compiled _huber_kernel" in result.stdout
