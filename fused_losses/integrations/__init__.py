"""Integrations with other libraries, each an optional dependency imported only by its module.

- :mod:`fused_losses.integrations.transformers`: Hugging Face ``transformers`` causal language
  models train through :func:`fused_losses.linear_cross_entropy` (``pip install
  "fused_losses[transformers]"``).
"""
