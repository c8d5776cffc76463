"""Post-training weight transforms for transformers: SmoothQuant, GPTQ, AWQ.

Flax-free numerics over arrays: each function takes a Dense kernel ``[K, N]`` (input
channels first, as ``flax.linen.Dense``; transpose other layouts to it), the statistics of
the layer's input gathered by the observers of :mod:`qatjax.calibration` (``channel_absmax``,
``channel_mean_abs``, ``hessian``: exact across devices) and a
:class:`qatjax.quantizers.WeightQuantizer` recipe, and returns arrays a layer stores:

* :func:`smoothquant_scales` / :func:`smoothquant_search`: per-input-channel migration
  factors ``s`` (``x / s``, ``diag(s) W``), :func:`smooth_kernel`, :func:`smooth_input`,
  :func:`fold_layernorm`;
* :func:`gptq`: integer codes ``[K, N]`` and their kernel-form parameters, served as they
  are by the weight path (:func:`qatjax.qdot.encode_weight`);
* :func:`awq_scales` / :func:`awq_clip` / :func:`clip_kernel`: AWQ's per-input-channel
  scales and clipped ranges for weight-only formats.

All are jit-able (the searches and GPTQ compile one program per shape and recipe).
"""

from qatjax.ptq.awq import AWQClip, AWQScales, awq_clip, awq_scales, clip_kernel
from qatjax.ptq.gptq import GPTQResult, gptq
from qatjax.ptq.smoothquant import (
    SmoothQuantSearch,
    fold_layernorm,
    smooth_input,
    smooth_kernel,
    smoothquant_scales,
    smoothquant_search,
)

__all__ = [
    "AWQClip",
    "AWQScales",
    "GPTQResult",
    "SmoothQuantSearch",
    "awq_clip",
    "awq_scales",
    "clip_kernel",
    "fold_layernorm",
    "gptq",
    "smooth_input",
    "smooth_kernel",
    "smoothquant_scales",
    "smoothquant_search",
]
