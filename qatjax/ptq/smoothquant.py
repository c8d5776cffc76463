"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights.

For ``Y = X W`` (``X [tokens, K]``, kernel ``W [K, N]`` as flax Dense) with calibrated
per-input-channel maxima ``ax_j = max|X[:, j]|`` (:func:`qatjax.calibration.channel_absmax`)
and ``aw_j = max|W[j, :]|``::

    s_j = ax_j**alpha / aw_j**(1 - alpha)        Y = (X / s) (s W)

is exact in real arithmetic, so the float function is unchanged up to rounding (exactly,
bit for bit, with ``power_of_two=True``); ``X / s`` has flatter channels, so per-tensor
static activation quantization loses less. Layers that read one tensor (query, key,
value) share one ``s``, with ``aw_j`` the maximum over their kernels.

What a layer stores to serve the result:

* the smoothed kernel ``smooth_kernel(W, s)`` in place of ``W`` (quantized per channel or
  per group as usual: the weight path is unchanged);
* either ``1/s`` folded into the preceding LayerNorm (:func:`fold_layernorm`: its scale
  and bias become ``gamma / s`` and ``beta / s``) -- valid only when every consumer of
  that LayerNorm's output is a layer whose kernel is multiplied by ``s`` (not when the
  output also feeds a residual connection, as in post-LN BERT) --, or ``s`` ``[K]`` as an
  explicit per-channel scale applied to the input before its quantizer
  (:func:`smooth_input`: ``x / s``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from qatjax.formats import Format, as_format
from qatjax.ptq._common import (
    check_channel_vector,
    check_grid,
    check_inputs,
    check_kernels,
    check_quantizer,
    weight_only_spec,
)
from qatjax.qdot import quantized_dot
from qatjax.qparams import qparams_from_minmax
from qatjax.quantizers import WeightQuantizer

__all__ = [
    "SmoothQuantSearch",
    "fold_layernorm",
    "smooth_input",
    "smooth_kernel",
    "smoothquant_scales",
    "smoothquant_search",
]

#: The paper's grid of migration strengths (0.05 steps).
DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))


class SmoothQuantSearch(NamedTuple):
    """What :func:`smoothquant_search` returns.

    Attributes:
      alpha: float32 scalar, the migration strength with the smallest output error.
      scales: float32 ``[K]``, :func:`smoothquant_scales` at that ``alpha``.
      errors: float32 ``[len(alphas)]``, the output error of each candidate.
    """

    alpha: jax.Array
    scales: jax.Array
    errors: jax.Array


def smoothquant_scales(x_absmax: jax.Array, kernels: jax.Array | Sequence[jax.Array],
                       alpha: float | jax.Array = 0.5, *, min_scale: float = 1e-5,
                       power_of_two: bool = False) -> jax.Array:
    """Migration factors ``s_j = ax_j**alpha / aw_j**(1 - alpha)``, ``aw_j = max|W[j, :]|``
    over all ``kernels`` (the layers that read this input share ``s``).

    Channels with ``ax_j = 0`` or ``aw_j = 0`` (never active, or no weight) get ``s_j = 1``;
    every factor is then clamped to ``>= min_scale``. ``power_of_two`` rounds ``log2 s`` to
    the nearest integer, so that ``x / s``, ``s W`` and the LayerNorm fold are exact in
    floating point (the smoothed float layer is then bit for bit the original).

    Args:
      x_absmax: float ``[K]``, per-input-channel ``max|x|`` (``ChannelAbsMaxState.amax``).
      kernels: a ``[K, N]`` kernel or a sequence of kernels ``[K, N_i]`` reading that input.
      alpha: migration strength in ``[0, 1]`` (0.5 is the paper's default, 0.75-0.85 for
        models with strong outliers); a traced scalar is accepted.
      min_scale: the clamp (positive).
      power_of_two: round the factors to powers of two.
    Returns:
      float32 ``[K]``.
    """
    fn = "smoothquant_scales"
    kernels = check_kernels(kernels, fn)
    x_absmax = check_channel_vector(x_absmax, kernels[0].shape[0], fn, "x_absmax")
    if not isinstance(alpha, jax.core.Tracer):
        check_grid(alpha, fn, "alpha", 0.0, 1.0)
    if not (isinstance(min_scale, (float, int)) and min_scale > 0):
        raise ValueError(f"{fn}: `min_scale` must be a positive float, got {min_scale!r}.")
    return _scales(x_absmax, kernels, jnp.asarray(alpha, jnp.float32), float(min_scale),
                   bool(power_of_two))


def _scales(x_absmax, kernels, alpha, min_scale: float, power_of_two: bool) -> jax.Array:
    w_absmax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)
                                              for w in kernels])
    live = (x_absmax > 0) & (w_absmax > 0)
    s = jnp.where(live, jnp.where(live, x_absmax, 1.0) ** alpha
                  / jnp.where(live, w_absmax, 1.0) ** (1.0 - alpha), 1.0)
    s = jnp.maximum(s, jnp.float32(min_scale))
    return jnp.exp2(jnp.round(jnp.log2(s))) if power_of_two else s


def smooth_kernel(kernel: jax.Array, scales: jax.Array) -> jax.Array:
    """``diag(s) W``: row ``j`` of the ``[K, N]`` kernel times ``s_j``, in the kernel's dtype."""
    kernel = check_kernels(kernel, "smooth_kernel")[0]
    s = check_channel_vector(scales, kernel.shape[0], "smooth_kernel", "scales")
    return (kernel.astype(jnp.float32) * s[:, None]).astype(kernel.dtype)


def smooth_input(x: jax.Array, scales: jax.Array) -> jax.Array:
    """``x / s`` over the last axis (the input channels) of ``x [..., K]``, in ``x``'s dtype."""
    x = jnp.asarray(x)
    if x.ndim == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"smooth_input: `x` must be a floating [..., K] array, got shape {x.shape}, "
                         f"dtype {x.dtype}.")
    s = check_channel_vector(scales, x.shape[-1], "smooth_input", "scales")
    return (x.astype(jnp.float32) / s).astype(x.dtype)


def fold_layernorm(scale: jax.Array, bias: jax.Array | None,
                   scales: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """A LayerNorm's ``(scale, bias)`` with ``1/s`` folded in: ``(scale / s, bias / s)``, so
    ``LN'(x) = LN(x) / s`` (``bias`` None stays None). Exact up to one rounding of each
    product; bit for bit with power-of-two ``s``.

    Args:
      scale, bias: the LayerNorm's ``[K]`` parameters (flax ``scale`` / ``bias``).
      scales: the migration factors ``s`` ``[K]``.
    """
    scale = jnp.asarray(scale)
    if scale.ndim != 1 or not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(f"fold_layernorm: `scale` must be a floating [K] vector, got shape "
                         f"{scale.shape}, dtype {scale.dtype}.")
    s = check_channel_vector(scales, scale.shape[0], "fold_layernorm", "scales")
    folded = (scale.astype(jnp.float32) / s).astype(scale.dtype)
    if bias is None:
        return folded, None
    bias = jnp.asarray(bias)
    if bias.shape != scale.shape:
        raise ValueError(f"fold_layernorm: `bias` must have `scale`'s shape {scale.shape}, got "
                         f"{bias.shape}.")
    return folded, (bias.astype(jnp.float32) / s).astype(bias.dtype)


def smoothquant_search(x: jax.Array, kernels: jax.Array | Sequence[jax.Array],
                       x_absmax: jax.Array, *, act_format: Format,
                       weight_quantizer: WeightQuantizer, act_symmetric: bool = True,
                       alphas: Sequence[float] = DEFAULT_ALPHAS, min_scale: float = 1e-5,
                       power_of_two: bool = False) -> SmoothQuantSearch:
    """The migration strength with the smallest quantized output error on ``x``.

    For each ``alpha``: ``s = smoothquant_scales(x_absmax, kernels, alpha)``; the input
    ``x / s`` is quantized per tensor with the min / max of ``x / s`` over ``x`` (a static
    scale as a min / max observer gives it), each kernel ``s W_i`` by ``weight_quantizer``,
    and the error is ``sum_i ||x W_i - Q(x / s) Q(s W_i)||^2`` with the layer's real
    quantized contraction (:func:`qatjax.qdot.quantized_dot`). One compiled program for all
    candidates (``lax.map``).

    Args:
      x: float ``[..., K]`` calibration inputs of the layer(s) (a sample is enough).
      kernels: a ``[K, N]`` kernel or the kernels ``[K, N_i]`` that read ``x``.
      x_absmax: float ``[K]``, the calibrated per-channel ``max|x|`` (over all calibration data).
      act_format: the activation format; ``act_symmetric``: zero point 0 or affine.
      weight_quantizer: the kernels' recipe (integer format).
      alphas: candidate strengths in ``[0, 1]``.
      min_scale, power_of_two: as :func:`smoothquant_scales`.
    Returns:
      A :class:`SmoothQuantSearch`.
    """
    fn = "smoothquant_search"
    kernels = check_kernels(kernels, fn)
    k = kernels[0].shape[0]
    x = check_inputs(x, k, fn)
    x_absmax = check_channel_vector(x_absmax, k, fn, "x_absmax")
    act_format = as_format(act_format, "act_format")
    if act_symmetric and not act_format.signed:
        raise ValueError(f"{fn}: an unsigned `act_format` ({act_format.name}) needs "
                         "act_symmetric=False (a zero point 0 cannot represent negative inputs).")
    check_quantizer(weight_quantizer, k, fn)
    grid = check_grid(alphas, fn, "alphas", 0.0, 1.0)
    if not (isinstance(min_scale, (float, int)) and min_scale > 0):
        raise ValueError(f"{fn}: `min_scale` must be a positive float, got {min_scale!r}.")
    return _search(x, kernels, x_absmax, jnp.asarray(grid, jnp.float32), act_format=act_format,
                   act_symmetric=bool(act_symmetric), quantizer=weight_quantizer,
                   min_scale=float(min_scale), power_of_two=bool(power_of_two))


@functools.partial(jax.jit, static_argnames=("act_format", "act_symmetric", "quantizer",
                                             "min_scale", "power_of_two"))
def _search(x, kernels, x_absmax, alphas, act_format, act_symmetric, quantizer, min_scale,
            power_of_two) -> SmoothQuantSearch:
    spec = dataclasses.replace(weight_only_spec(quantizer), x_format=act_format,
                               x_symmetric=act_symmetric)
    refs = [jnp.matmul(x, w.astype(jnp.float32), precision=lax.Precision.HIGHEST) for w in kernels]

    def error(alpha):
        s = _scales(x_absmax, kernels, alpha, min_scale, power_of_two)
        xs = x / s
        x_qp = qparams_from_minmax(jnp.min(xs), jnp.max(xs), act_format, symmetric=act_symmetric)
        total = jnp.float32(0.0)
        for w, ref in zip(kernels, refs):
            ws = w.astype(jnp.float32) * s[:, None]
            y = quantized_dot(xs, ws, x_qp, quantizer.qparams(ws, (0,)), spec)
            total = total + jnp.sum((y - ref) ** 2)
        return total

    errors = lax.map(error, alphas)
    best = alphas[jnp.argmin(errors)]
    return SmoothQuantSearch(best, _scales(x_absmax, kernels, best, min_scale, power_of_two), errors)
