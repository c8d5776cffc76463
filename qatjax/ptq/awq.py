"""AWQ (Lin et al., MLSys 2024): activation-aware per-input-channel weight scales for
weight-only quantization, and the optional clipping search.

Scales. With ``m_j = mean|X[:, j]|`` (:func:`qatjax.calibration.channel_mean_abs`), for
``alpha`` on the grid ``i / n_grid`` (``i < n_grid``): ``s = max(m**alpha, 1e-4)``, normalised
``s / sqrt(max(s) min(s))``; the kernel ``W [K, N]`` is served as ``Q(diag(s) W)`` for the
input ``X / s``, and the error is ``||X W - (X / s) Q(diag(s) W)||^2`` (summed over the
kernels that read ``X``, which share ``s``) with ``Q`` the weight path's quantize /
dequantize. ``alpha = 0`` (``s = 1``, no scaling) is a candidate, so the best is never
worse than no scaling on ``X``.

Clipping. Per output channel (per group and output channel when grouped; the whole
kernel per tensor), the range ``[lo, hi]`` of the scaled kernel shrinks by
``r = 1 - i / n_grid`` for ``i < max_shrink * n_grid``; each range keeps the ``r`` with
the smallest error of its own partial output ``X_g (W_g - Q(W_g))`` (the group's
channels only), all candidates evaluated at once.

What a layer stores to serve the result: the kernel ``clip_kernel(diag(s) W, clip)``
(``diag(s) W`` without the clip search), quantized by its usual weight path -- its min /
max parameters are then the searched ranges --, and ``1/s`` folded into the previous op
(a LayerNorm: :func:`qatjax.ptq.fold_layernorm`, under the same condition as SmoothQuant)
or ``s`` ``[K]`` as an explicit per-channel scale applied to the input
(:func:`qatjax.ptq.smooth_input`: ``x / s``). :func:`qatjax.ptq.smooth_kernel` computes
``diag(s) W``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from qatjax.ptq._common import (
    check_channel_vector,
    check_inputs,
    check_kernel,
    check_kernels,
    check_quantizer,
    served_kernel,
)
from qatjax.qparams import merge_groups, qparams_from_minmax, split_groups
from qatjax.quantizers import WeightQuantizer

__all__ = ["AWQClip", "AWQScales", "awq_clip", "awq_scales", "clip_kernel"]


class AWQScales(NamedTuple):
    """What :func:`awq_scales` returns.

    Attributes:
      scales: float32 ``[K]``: serve ``x / s`` with the kernel ``diag(s) W``.
      alpha: float32 scalar, the chosen exponent.
      errors: float32 ``[n_grid]``, the output error of each ``alpha = i / n_grid``.
    """

    scales: jax.Array
    alpha: jax.Array
    errors: jax.Array


class AWQClip(NamedTuple):
    """What :func:`awq_clip` returns: the searched range of each channel (group).

    Attributes:
      lo, hi: float32, kernel-form parameter shape (per channel ``[1, N]``, per group
        ``[K // group_size, 1, N]``, per tensor ``()``): the clipped minimum and maximum.
      ratio: float32, the same shape: the shrink factor chosen (1: no clipping).
    """

    lo: jax.Array
    hi: jax.Array
    ratio: jax.Array


def awq_scales(x: jax.Array, kernels: jax.Array | Sequence[jax.Array], x_mean_abs: jax.Array,
               quantizer: WeightQuantizer, *, n_grid: int = 20) -> AWQScales:
    """AWQ's per-input-channel scales (see the module docstring), searched on ``x``.

    Args:
      x: float ``[..., K]`` calibration inputs of the layer(s) (a sample is enough).
      kernels: a ``[K, N]`` kernel or the kernels ``[K, N_i]`` that read ``x``.
      x_mean_abs: float ``[K]``, ``mean|x|`` per input channel
        (:func:`qatjax.calibration.mean_abs`).
      quantizer: the weight recipe (integer format: int4 / int8, per channel or per group).
      n_grid: grid size (``alpha = 0, 1/n_grid, ..., (n_grid - 1)/n_grid``), one compiled
        program for all.
    Returns:
      An :class:`AWQScales`.
    """
    fn = "awq_scales"
    kernels = check_kernels(kernels, fn)
    k = kernels[0].shape[0]
    x = check_inputs(x, k, fn)
    m = check_channel_vector(x_mean_abs, k, fn, "x_mean_abs")
    check_quantizer(quantizer, k, fn)
    _check_positive_int(n_grid, fn, "n_grid")
    return _awq_scales(x, kernels, m, quantizer=quantizer, n_grid=int(n_grid))


def _normalized_scales(m: jax.Array, alpha: jax.Array) -> jax.Array:
    s = jnp.maximum(m ** alpha, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("quantizer", "n_grid"))
def _awq_scales(x, kernels, m, quantizer, n_grid) -> AWQScales:
    kernels = [w.astype(jnp.float32) for w in kernels]
    refs = [jnp.matmul(x, w, precision=lax.Precision.HIGHEST) for w in kernels]
    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def error(alpha):
        s = _normalized_scales(m, alpha)
        total = jnp.float32(0.0)
        for w, ref in zip(kernels, refs):
            y = jnp.matmul(x / s, served_kernel(w * s[:, None], quantizer),
                           precision=lax.Precision.HIGHEST)
            total = total + jnp.sum((y - ref) ** 2)
        return total

    errors = lax.map(error, alphas)
    best = alphas[jnp.argmin(errors)]
    return AWQScales(_normalized_scales(m, best), best, errors)


def awq_clip(x: jax.Array, kernel: jax.Array, quantizer: WeightQuantizer, *, n_grid: int = 20,
             max_shrink: float = 0.5) -> AWQClip:
    """AWQ's clipping search on one kernel (see the module docstring).

    Args:
      x: float ``[..., K]`` inputs *as the kernel sees them* (``x / s`` after :func:`awq_scales`).
      kernel: ``[K, N]`` kernel (``diag(s) W`` after :func:`awq_scales`).
      quantizer: the weight recipe.
      n_grid, max_shrink: the candidates ``r = 1 - i / n_grid`` for
        ``0 <= i < max_shrink * n_grid`` (``max_shrink`` in ``[0, 1)``).
    Returns:
      An :class:`AWQClip`; :func:`clip_kernel` applies it.
    """
    fn = "awq_clip"
    kernel = check_kernel(kernel, fn)
    k = kernel.shape[0]
    x = check_inputs(x, k, fn)
    check_quantizer(quantizer, k, fn)
    _check_positive_int(n_grid, fn, "n_grid")
    if not (isinstance(max_shrink, (float, int)) and 0 <= max_shrink < 1):
        raise ValueError(f"{fn}: `max_shrink` must be a float in [0, 1), got {max_shrink!r}.")
    ratios = tuple(1.0 - i / n_grid for i in range(max(1, round(max_shrink * n_grid))))
    return _awq_clip(x, kernel.astype(jnp.float32), jnp.asarray(ratios, jnp.float32),
                     quantizer=quantizer)


def _ranges(kernel: jax.Array, quantizer: WeightQuantizer) -> tuple[jax.Array, jax.Array]:
    """Kernel-form min and max of ``kernel`` at ``quantizer``'s granularity."""
    if quantizer.granularity == "per_group":
        w, axis = split_groups(kernel, 0, quantizer.group_size), 1
    else:
        w, axis = kernel, (0 if quantizer.granularity == "per_channel" else None)
    keep = axis is not None
    return jnp.min(w, axis, keepdims=keep), jnp.max(w, axis, keepdims=keep)


def _partial_errors(x: jax.Array, delta: jax.Array, quantizer: WeightQuantizer) -> jax.Array:
    """``sum_t (x_g delta_g)^2`` per range: the squared partial outputs of each group's
    channels (kernel-form parameter shape)."""
    if quantizer.granularity == "per_group":
        g = quantizer.group_size
        parts = jnp.einsum("tgc,gcn->gtn", x.reshape(x.shape[0], -1, g), split_groups(delta, 0, g),
                           precision=lax.Precision.HIGHEST)
        return jnp.sum(parts * parts, axis=1, keepdims=True)
    y = jnp.matmul(x, delta, precision=lax.Precision.HIGHEST)
    err = jnp.sum(y * y, axis=0, keepdims=True)
    return err if quantizer.granularity == "per_channel" else jnp.sum(err)


@functools.partial(jax.jit, static_argnames=("quantizer",))
def _awq_clip(x, kernel, ratios, quantizer) -> AWQClip:
    lo, hi = _ranges(kernel, quantizer)
    fmt = quantizer.format

    def error(r):
        qp = qparams_from_minmax(r * lo, r * hi, fmt, symmetric=quantizer.symmetric)
        return _partial_errors(x, kernel - served_kernel(kernel, quantizer, qp), quantizer)

    errors = lax.map(error, ratios)  # [len(ratios), *param shape]
    ratio = ratios[jnp.argmin(errors, axis=0)]
    return AWQClip(ratio * lo, ratio * hi, ratio)


def clip_kernel(kernel: jax.Array, clip: AWQClip, quantizer: WeightQuantizer) -> jax.Array:
    """``kernel [K, N]`` clamped to the searched ranges, in its dtype: the weight path's min /
    max parameters of the result (``quantizer.qparams``) are those of the ranges, so the
    layer's usual weight path serves the clipped quantization."""
    fn = "clip_kernel"
    kernel = check_kernel(kernel, fn)
    check_quantizer(quantizer, kernel.shape[0], fn)
    if not isinstance(clip, AWQClip):
        raise TypeError(f"{fn}: `clip` must be an AWQClip (from awq_clip), got {type(clip).__name__}.")
    lo = _ranges(kernel, quantizer)[0]
    if jnp.shape(clip.lo) != lo.shape:
        raise ValueError(f"{fn}: `clip` has ranges of shape {jnp.shape(clip.lo)}; this kernel and "
                         f"quantizer need {lo.shape}.")
    w = kernel.astype(jnp.float32)
    if quantizer.granularity == "per_group":
        clipped = merge_groups(jnp.clip(split_groups(w, 0, quantizer.group_size), clip.lo, clip.hi), 0)
    else:
        clipped = jnp.clip(w, clip.lo, clip.hi)
    return clipped.astype(kernel.dtype)


def _check_positive_int(v, fn: str, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {v!r}.")
