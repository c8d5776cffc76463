"""Flax NNX front end: drop-in quantized modules and the model tools on NNX models.

A second thin front end over the same core as :mod:`qatjax.flax` (linen): the modules run
the linen layers' recipe on NNX variables, so both front ends give the same bits.
"""

from qatjax.flax.layers import quant_mode
from qatjax.nnx import ptq
from qatjax.nnx.layers import (VARIABLE_TYPES, Fp8Meta, QatConv, QatEinsum, QatLinear,
                               QatLinearGeneral, QuantParams, QuantStats)
from qatjax.nnx.model import (calibrate, collections, convert, quant_report, quantize_model,
                              quantize_model_weights, quantized_layers, set_collections)

__all__ = ["QatLinear", "QatLinearGeneral", "QatConv", "QatEinsum", "QuantStats", "QuantParams",
           "Fp8Meta", "VARIABLE_TYPES", "quant_mode", "quantize_model", "calibrate",
           "quant_report", "convert", "quantize_model_weights", "collections",
           "set_collections", "quantized_layers", "ptq"]
