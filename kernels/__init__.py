"""The loss kernels of fused_losses, installed as ``fused_losses.kernels``.

One file per loss, top to bottom: its Triton kernels, their launchers and the
autograd.Function that ties them together (``cross_entropy.py``, with the K-dimensional layout
in ``cross_entropy_nd.py`` and the arithmetic in ``_ce_math.py``; ``bce.py``, ``huber.py``,
sharing ``_elementwise.py``). ``eager.py`` is each loss's formula in torch ops (the CPU path
and the double backward); it, and this package, import without Triton. Importing a kernel
file defines its kernels and does nothing else: whether a launch is compiled or interpreted
is decided per launch (``_common.launch``).
"""
