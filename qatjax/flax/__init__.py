"""Flax (linen) layers of qatjax: ``QatDense``, ``QatConv`` and the ``quant_mode`` context."""

from qatjax.flax.layers import MODES, QatConv, QatDense, quant_mode

__all__ = ["QatDense", "QatConv", "quant_mode", "MODES"]
