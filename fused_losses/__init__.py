"""fused_losses: fused Triton loss kernels that drop in for torch.nn's losses.

``fused_losses.cross_entropy`` / ``fused_losses.CrossEntropyLoss`` take exactly the arguments of
``torch.nn.functional.cross_entropy`` / ``torch.nn.CrossEntropyLoss``. CUDA tensors run the
Triton kernels, everything else eager PyTorch; ``FUSED_LOSSES_BACKEND=auto|triton|torch``
overrides. Importing this package does not import triton.
"""

from .functional import cross_entropy
from .modules import CrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["CrossEntropyLoss", "cross_entropy"]
