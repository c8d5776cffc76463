"""Flax (linen) layers of qatjax: ``QatDense``, ``QatConv``, the ``quant_mode`` context and
``quantize_model`` (swap the layers of an existing model without editing it)."""

from qatjax.flax.intercept import quantize_model
from qatjax.flax.layers import MODES, QatConv, QatDense, quant_mode

__all__ = ["QatDense", "QatConv", "quant_mode", "quantize_model", "MODES"]
