"""Every kernel variant compiles for a Hopper GPU, checked without one.

The interpreter runs kernels as numpy code, so a kernel that the real compiler rejects
(a non-constexpr global, a loop-carried value that changes type, an unsupported op) would pass
every other CPU test and fail on the first GPU. tests/_compile_check.py compiles each variant
the losses launch through Triton's pipeline down to a cubin for sm_90 and reports register and
spill counts; this runs it (``python -m tests._compile_check`` from the checkout's root, in a
subprocess without TRITON_INTERPRET).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_all_kernel_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)  # for `tests`; fused_losses itself is the installed one
    result = subprocess.run([sys.executable, "-m", "tests._compile_check", "--arch", "90"],
                            capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "kernel variants compiled for sm_90" in result.stdout
