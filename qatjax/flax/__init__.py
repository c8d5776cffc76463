"""Flax (linen) layers of qatjax: ``QatDense``, ``QatDenseGeneral``, ``QatConv``, ``QatEinsum``, the
``quant_mode`` context and ``quantize_model`` (swap the layers of an existing model
without editing it)."""

from qatjax.flax.intercept import quantize_model
from qatjax.flax.layers import MODES, QatConv, QatDense, QatDenseGeneral, QatEinsum, quant_mode

__all__ = ["QatDense", "QatDenseGeneral", "QatConv", "QatEinsum", "quant_mode", "quantize_model", "MODES"]
