"""Quantization parameters (scale, zero point) and how to build them from a range.

Granularity is broadcasting: a :class:`QParams` whose arrays broadcast against
``x`` describes per-tensor (scalars), per-channel (keepdims shape, size 1 except
on the channel axis) or per-group quantization (see :func:`split_groups`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.formats import Format, as_format

__all__ = [
    "QParams",
    "SCALE_EPS",
    "qparams_from_minmax",
    "qparams_from_amax",
    "reduce_axes",
    "split_groups",
    "merge_groups",
]

#: Smallest scale ever produced: float32 machine epsilon, as torch.ao observers use.
SCALE_EPS = float(np.finfo(np.float32).eps)


class QParams(NamedTuple):
    """Scale and zero point of an affine quantizer: ``x ~ (q - zero_point) * scale``.

    Attributes:
      scale: positive float32 array broadcastable against the quantized tensor.
      zero_point: array of the same shape as ``scale``; int32 for integer formats
        built here, float when learned (it is rounded half-to-even before use);
        always 0 for fp8 formats.
    """

    scale: jax.Array
    zero_point: jax.Array


def qparams_from_amax(amax: jax.typing.ArrayLike, fmt: Format) -> QParams:
    """Symmetric parameters from an absolute range: ``scale = max(amax / qmax, eps)``, zero point 0.

    ``amax`` maps exactly to ``qmax`` (TensorRT, AQT and Qwix convention; torch
    divides by ``(qmax - qmin) / 2`` instead). For fp8, ``qmax`` is ``fmt.max``.
    For unsigned integer formats the zero point is 0 too (NVIDIA's unsigned
    convention), so negative values saturate to 0.

    Args:
      amax: non-negative array of any shape (scalar for per-tensor).
      fmt: the target format.
    Returns:
      ``QParams`` with float32 ``scale`` and int32 ``zero_point`` of ``amax``'s shape.
    """
    fmt = as_format(fmt)
    amax = jnp.abs(jnp.asarray(amax, jnp.float32))
    scale = jnp.maximum(_divide(amax, jnp.float32(fmt.qmax)), jnp.float32(SCALE_EPS))
    return QParams(computed_once(scale), jnp.zeros(scale.shape, jnp.int32))


def qparams_from_minmax(
    lo: jax.typing.ArrayLike,
    hi: jax.typing.ArrayLike,
    fmt: Format,
    *,
    symmetric: bool = True,
) -> QParams:
    """Parameters that cover ``[lo, hi]``, computed exactly as torch.ao observers do.

    The range is first widened to contain 0 (``lo = min(lo, 0)``, ``hi = max(hi, 0)``)
    so that 0.0 is exactly representable. Then, in float32:

    * symmetric (and always for fp8): ``scale = max(max(|lo|, |hi|) / qmax, eps)``, zero point 0;
    * affine: ``scale = max((hi - lo) / (qmax - qmin), eps)`` and
      ``zero_point = clip(qmin - round_half_even(lo / scale), qmin, qmax)``.

    ``eps`` is float32 machine epsilon, so a constant or all-zero input still gets
    a valid positive scale. ``(lo, hi) = (+inf, -inf)``, the range of an observer
    before any data, gives that smallest scale too; a NaN bound gives a NaN scale.

    Args:
      lo, hi: float arrays of the same shape (scalars for per-tensor, keepdims
        shapes for per-channel or per-group).
      fmt: the target format.
      symmetric: symmetric (zero point 0) or affine parameters. fp8 formats are
        always symmetric.
    Returns:
      ``QParams`` with float32 ``scale`` and int32 ``zero_point`` of the broadcast shape.
    Raises:
      ValueError: if concrete finite bounds have ``lo > hi`` somewhere (swapped arguments).
    """
    fmt = as_format(fmt)
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    _check_ordered(lo, hi)
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    if symmetric or fmt.is_float:
        return qparams_from_amax(jnp.maximum(-lo, hi), fmt)
    qmin, qmax = float(fmt.qmin), float(fmt.qmax)
    scale = jnp.maximum(_divide(hi - lo, jnp.float32(qmax - qmin)), jnp.float32(SCALE_EPS))
    zero_point = jnp.clip(jnp.float32(qmin) - jnp.round(_divide(lo, scale)), qmin, qmax)
    return QParams(computed_once(scale), computed_once(zero_point.astype(jnp.int32)))


def _check_ordered(lo: jax.Array, hi: jax.Array) -> None:
    """Refuses concrete finite bounds with ``lo > hi`` (traced bounds cannot be checked)."""
    if isinstance(lo, jax.core.Tracer) or isinstance(hi, jax.core.Tracer):
        return
    lo_np, hi_np = np.broadcast_arrays(np.asarray(lo), np.asarray(hi))
    swapped = (lo_np > hi_np) & np.isfinite(lo_np) & np.isfinite(hi_np)
    if swapped.any():
        i = np.argwhere(swapped)[0]
        raise ValueError(
            f"qparams_from_minmax: `lo` must not exceed `hi`, got lo={lo_np[tuple(i)]:g} > "
            f"hi={hi_np[tuple(i)]:g}" + (f" at index {tuple(int(j) for j in i)}" if i.size else "")
            + " (are the arguments swapped?).")


def reduce_axes(ndim: int, keep_axes: int | Sequence[int] | None) -> tuple[int, ...]:
    """The axes to reduce over so that only ``keep_axes`` (the channel axes) remain.

    ``keep_axes=None`` means per-tensor (reduce everything). Negative axes are
    allowed. Raises a ValueError naming ``keep_axes`` if an axis is out of range.
    """
    if keep_axes is None:
        return tuple(range(ndim))
    if isinstance(keep_axes, (int, np.integer)):
        keep_axes = (int(keep_axes),)
    keep = set()
    for a in keep_axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"`keep_axes` entry {a} is out of range for an array of rank {ndim}.")
        keep.add(a % ndim)
    return tuple(i for i in range(ndim) if i not in keep)


def split_groups(x: jax.Array, axis: int, group_size: int) -> jax.Array:
    """Splits ``axis`` of length ``n`` into ``(n // group_size, group_size)``.

    Per-group quantization then reduces over the new ``axis + 1`` (the group
    members) with keepdims, so the parameters have shape ``(..., n // g, 1, ...)``
    and broadcast against the split array. :func:`merge_groups` undoes the split.

    Raises:
      ValueError: if ``group_size`` does not divide the axis length.
    """
    axis = _normalize_axis(axis, x.ndim, "axis")
    n = x.shape[axis]
    if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or n % group_size:
        raise ValueError(
            f"`group_size` must be a positive divisor of the axis length {n} (axis {axis}), "
            f"got {group_size!r}."
        )
    return x.reshape(x.shape[:axis] + (n // group_size, group_size) + x.shape[axis + 1:])


def merge_groups(x: jax.Array, axis: int) -> jax.Array:
    """Merges axes ``axis`` and ``axis + 1`` back into one (inverse of :func:`split_groups`)."""
    axis = _normalize_axis(axis, x.ndim - 1, "axis")
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def computed_once(a: jax.Array) -> jax.Array:
    """``a`` unchanged (NaN, infinities and signed zeros included), as a value XLA computes once.

    Quantization parameters are small arrays (``[1, N]``, ``[G, 1, N]``, scalars) computed
    by chains of cheap elementwise operations (the exact division below is about 40) and
    then broadcast against large tensors. XLA's fusion duplicates cheap producers into
    every consumer, so without this each of those consumers -- the quantization loop, the
    matmul epilogue, the backward's elementwise fusions -- recomputes the whole chain for
    every element of the large tensor (2-3x slower loops on CPU). Only an "expensive"
    producer is kept as its own fusion and read from memory; a division by a runtime
    one, ``a / ((b | 1) // (b | 1))`` with ``b`` the bits of ``a``, is such a producer,
    and it is exact. (``lax.optimization_barrier`` does not help: XLA:CPU removes it
    before fusion.)

    Args:
      a: float32 or int32 array.
    Returns:
      ``a``, bit for bit (float32 subnormals excepted: XLA:CPU flushes them to zero in any
      float arithmetic).
    """
    bits = (lax.bitcast_convert_type(a, jnp.int32) if jnp.issubdtype(a.dtype, jnp.floating)
            else a.astype(jnp.int32)) | 1
    one = lax.div(bits, bits)
    return a / one.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else lax.div(a, one.astype(a.dtype))


@jax.custom_jvp
def _divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a / b`` in float32, correctly rounded (IEEE round-to-nearest-even), for ``b > 0``.

    XLA's algebraic simplifier rewrites ``a / b`` as ``a * (1 / b)`` when ``b`` is a
    constant or (on CPU) a broadcast, which rounds twice and misses the IEEE quotient
    by one ulp for many inputs; torch, numpy and ml_dtypes references divide exactly.
    ``y = a / b`` as XLA computes it is within 1.5 ulp of ``a / b`` either way, so the
    exact residual ``r = |a| - |y| * b`` (Dekker's error-free product, with 12-bit
    halves split off by bit masking, which no simplifier can rewrite) says whether the
    correctly rounded quotient is ``|y|``, the next float up or the next one down.
    Exact while ``|a / b|`` is 0 or at least ``2**-103`` and ``|y| * b`` does not
    overflow; XLA:CPU flushes float32 subnormals to zero whatever is done here.
    Differentiable as ``a / b``.

    Args:
      a: float32 array.
      b: float32 array broadcastable against ``a``, positive and finite.
    Returns:
      The float32 quotient of the broadcast shape.
    """
    y = a / b
    abs_y = jnp.abs(y)
    product = abs_y * b
    y_hi, y_lo = _split12(abs_y)
    b_hi, b_lo = _split12(b)
    product_err = y_lo * b_lo - (((product - y_hi * b_hi) - y_lo * b_hi) - y_hi * b_lo)
    residual = (jnp.abs(a) - product) - product_err
    y_bits = lax.bitcast_convert_type(abs_y, jnp.uint32)
    exponent = jnp.maximum(y_bits & np.uint32(0x7F800000), np.uint32(24 << 23))
    half_ulp = lax.bitcast_convert_type(exponent - np.uint32(24 << 23), jnp.float32)
    # Below a power of two the spacing halves.
    half_ulp_down = jnp.where(y_bits & np.uint32(0x7FFFFF) == 0, half_ulp * 0.5, half_ulp)
    abs_q = jnp.where(
        residual > half_ulp * b,
        abs_y + 2.0 * half_ulp,
        jnp.where(residual < -(half_ulp_down * b), abs_y - 2.0 * half_ulp_down, abs_y),
    )
    return jnp.where(jnp.signbit(a), -abs_q, abs_q)


@_divide.defjvp
def _divide_jvp(primals, tangents):
    a, b = primals
    da, db = tangents
    q = _divide(a, b)
    return q, (da - q * db) / b


def _split12(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v = hi + lo`` exactly: ``hi`` is ``v`` rounded to 12 significant bits, ``|lo| <= ulp(hi)/2``."""
    bits = lax.bitcast_convert_type(v, jnp.uint32)
    hi = lax.bitcast_convert_type((bits + np.uint32(0x800)) & np.uint32(0xFFFFF000), jnp.float32)
    return hi, v - hi


def _normalize_axis(axis: int, ndim: int, argname: str) -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"`{argname}` must be an int in [-{ndim}, {ndim}), got {axis!r}.")
    return int(axis) % ndim
