"""Set-up for ``pytest bench/`` (not part of CI's ``pytest``, whose testpaths is tests/).

Sets no environment variable: the CPU group measures fused_losses's eager fallback, never the
Triton interpreter, and nothing here reaches tests/. Tests marked ``cuda`` (the realistic
shapes against the peers) are skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
