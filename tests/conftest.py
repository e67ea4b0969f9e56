"""Test set-up: which devices and backends the differential tests run on.

Every differential test runs on two backends:

- ``torch``: the eager fallback, on the CPU.
- ``triton``: the Triton kernels: on CUDA where there is a GPU, else under the Triton
  interpreter on the CPU, which each CPU launch asks for itself (``kernels/_common.launch``),
  as in a user's process: nothing is set here first. CI has no GPU, so this is how it runs
  every kernel test; nothing kernel-related is skipped there.

Tests marked ``cuda`` need a real GPU and are the only ones skipped without one.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
# FUSED_LOSSES_TEST_BACKENDS=triton runs only the kernels' half of each differential test
# (bench/gpu_check.sh on a lent GPU: the eager half is the CPU run's, which CI does)
BACKENDS = os.environ.get("FUSED_LOSSES_TEST_BACKENDS", "torch,triton").split(",")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend; yields the device its tensors should live on."""
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", request.param)
    return request.param


@pytest.fixture
def device(backend):
    return KERNEL_DEVICE if backend == "triton" else "cpu"


@pytest.fixture(params=["whole rows", "split rows"])
def row_plan(request, monkeypatch):
    """Runs the test with each row of more than 32k classes in one program, and split among
    several (the plan for few rows): the SM count the plan assumes, 1 or 4096."""
    from fused_losses.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "SPLIT_SMS", 1 if request.param == "whole rows" else 4096)
    return request.param


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
