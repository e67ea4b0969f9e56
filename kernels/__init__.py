"""Triton kernels of fused_losses, installed as ``fused_losses.kernels``.

One file per loss, each holding its kernels, their launchers and the autograd.Function that
ties them together. Import this package only through ``fused_losses._backend.kernels_for``:
whether Triton compiles or interprets the kernels is fixed when it is first imported.
"""

from . import bce, cross_entropy, huber
from ._common import is_interpreted, match_gpu_rounding_in_interpreter

# True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1): they then
# run on CPU tensors (slowly) and CUDA tensors (copied through the host).
INTERPRETED = is_interpreted(cross_entropy._ce_kernel)
if INTERPRETED:
    match_gpu_rounding_in_interpreter()

__all__ = ["INTERPRETED", "bce", "cross_entropy", "huber"]
