"""Integrations with other libraries, each an optional dependency imported only by its module.

- :mod:`fused_losses.integrations.transformers`: Hugging Face ``transformers`` causal language
  models train through :func:`fused_losses.linear_cross_entropy` (``pip install
  "fused_losses[transformers]"``).
- :mod:`fused_losses.integrations.trl`: TRL's ``GRPOTrainer`` takes its per-token log-probs and
  entropies from :func:`fused_losses.linear_log_probs` (``pip install
  "fused_losses[trl]"``, trl >= 1.16).
"""
