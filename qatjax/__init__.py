"""qatjax: quantization-aware training and post-training calibration for JAX and Flax.

Layers, bottom up: formats -> quantization parameters -> fake quantization ->
calibration -> integer kernels -> configuration -> Flax layers -> model tools.
"""

from qatjax.formats import (
    FloatFormat,
    Format,
    IntFormat,
    format_from_name,
    fp8_e4m3,
    fp8_e5m2,
    int4,
    int8,
    uint4,
    uint8,
)
from qatjax.qparams import (
    QParams,
    merge_groups,
    qparams_from_amax,
    qparams_from_minmax,
    reduce_axes,
    split_groups,
)
from qatjax.fake_quant import dequantize, fake_quant, lsq_grad_scale, quantize
from qatjax import calibration
from qatjax.config import QatConfig
from qatjax import checkpoint, flax
from qatjax.model import (
    CalibrationReport,
    calibrate,
    calibrate_model,
    convert,
    dequantize_weights,
    finalize,
    quant_report,
    quantize_model_weights,
)

__all__ = [
    "IntFormat", "FloatFormat", "Format", "format_from_name",
    "int8", "uint8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2",
    "QParams", "qparams_from_minmax", "qparams_from_amax", "reduce_axes",
    "split_groups", "merge_groups",
    "quantize", "dequantize", "fake_quant", "lsq_grad_scale",
    "calibration", "QatConfig", "flax", "checkpoint",
    "calibrate", "calibrate_model", "finalize", "quant_report", "CalibrationReport",
    "convert", "quantize_model_weights", "dequantize_weights",
]

__version__ = "0.1.0"
