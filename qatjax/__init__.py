"""qatjax: quantization-aware training and post-training calibration for JAX and Flax.

Layers, bottom up (a module imports only its own layer or lower; tests/test_layering.py):

  core numerics (plain JAX, no Flax)
    formats      number formats: int2..int8 (signed / unsigned), fp8 e4m3 / e5m2, block
                 formats (MXFP8, MXFP6, MXFP4, MXINT8, NVFP4)
    qparams      QParams (scale, zero point) from ranges; per tensor / channel / group
    fake_quant   quantize, dequantize, fake_quant and the straight-through estimators
    blocks       block scales (E8M0 / NVFP4), block quantize, dequantize and fake quant
    packing      int4 codes packed two per byte
    calibration  observers (init / update over pytrees), cross-device reduction, estimators
    integer      int8 x int8 -> int32 and fp8 ``dot_general`` with closed-form zero points
    quantizers   operand quantizers: weight (min / max) and activation (static, dynamic,
                 per token, learned) recipes as pure functions
    qdot         the one quantized contraction (``quantized_dot_general``,
                 ``quantized_einsum``, the convolution) and the one weight path
                 (``encode_weight``) shared by train, infer, convert and export
    fp8          Transformer Engine's fp8 training recipe (current / delayed scaling)
    config       QatConfig
  front ends
    flax         linen: QatDense, QatDenseGeneral, QatConv, QatEinsum, quant_mode,
                 quantize_model (interception of unmodified models), descriptors (specs),
                 and the linen model tools (flax.model): calibrate, finalize, report,
                 convert, export / import
  tools
    checkpoint   save / load variables (msgpack, orbax), typed restore
    cli          the ``qatjax`` command

The digits experiment and the other demos are examples (``examples/``), not the package.
"""

from qatjax.formats import (
    BlockFormat,
    FloatFormat,
    Format,
    IntFormat,
    format_from_name,
    fp8_e4m3,
    fp8_e5m2,
    int4,
    int8,
    mxfp4,
    mxfp6_e2m3,
    mxfp6_e3m2,
    mxfp8_e4m3,
    mxfp8_e5m2,
    mxint8,
    nvfp4,
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
from qatjax.blocks import (BlockScales, block_dequantize, block_fake_quant, block_quantize,
                           block_scales)
from qatjax import calibration
from qatjax.qdot import DotSpec, quantized_dot_general, quantized_einsum
from qatjax.config import QatConfig
from qatjax import checkpoint, flax, quantizers
from qatjax.flax.model import (
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
    "BlockFormat", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8", "nvfp4",
    "BlockScales", "block_scales", "block_quantize", "block_dequantize", "block_fake_quant",
    "QParams", "qparams_from_minmax", "qparams_from_amax", "reduce_axes",
    "split_groups", "merge_groups",
    "quantize", "dequantize", "fake_quant", "lsq_grad_scale",
    "DotSpec", "quantized_dot_general", "quantized_einsum",
    "calibration", "quantizers", "QatConfig", "flax", "checkpoint",
    "calibrate", "calibrate_model", "finalize", "quant_report", "CalibrationReport",
    "convert", "quantize_model_weights", "dequantize_weights",
]

__version__ = "0.1.0"
