"""fused_losses: fused Triton loss kernels that drop in for torch.nn's losses.

``cross_entropy`` / ``CrossEntropyLoss``, ``linear_cross_entropy`` /
``LinearCrossEntropyLoss`` (the fused LM head), ``binary_cross_entropy_with_logits`` /
``BCEWithLogitsLoss`` and ``huber_loss`` / ``HuberLoss`` take exactly the arguments of their
``torch.nn.functional`` / ``torch.nn`` namesakes. ``log_probs`` and ``linear_log_probs``
give RL trainers per-token log-probabilities and entropies (with a temperature), on given
logits or straight from the LM head; ``distillation_loss`` and
``linear_distillation_loss`` the KL / generalized JSD between a student's and a teacher's
next-token distributions (TRL's GKD loss), on given logits or from the two heads. CUDA
tensors run the
Triton kernels, everything else eager PyTorch; ``FUSED_LOSSES_BACKEND=auto|triton|torch``
overrides. Importing this package does not import triton.
"""

# (the floor above the functions, process groups and DTensor operands, hands its entry
# points down to them as it is imported: _dispatch.tensor_parallel)
from . import distributed  # noqa: F401
from .distillation import distillation_loss, linear_distillation_loss
from .functional import binary_cross_entropy_with_logits, cross_entropy, huber_loss
from .linear_cross_entropy import linear_cross_entropy
from .log_probs import LogProbOutputs, LogProbs, linear_log_probs, log_probs
from .modules import BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "HuberLoss",
    "LinearCrossEntropyLoss",
    "LogProbOutputs",
    "LogProbs",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "distillation_loss",
    "huber_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "log_probs",
]
