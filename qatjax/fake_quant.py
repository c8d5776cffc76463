"""Quantize, dequantize and fake-quantize, with straight-through estimators.

All three are pure functions of arrays; granularity comes from broadcasting the
:class:`~qatjax.qparams.QParams` against ``x``. Arithmetic runs in float32
whatever the input dtype (bfloat16 inputs come back as bfloat16), matching
torch's CPU kernels bit for bit:

* integer formats: ``q = clip(round_half_even(x * (1/scale)) + zero_point, qmin, qmax)``,
  ``x_hat = (q - zero_point) * scale``;
* fp8 formats: ``q = cast_fp8(clip(x / scale, -max, max))`` (round to nearest
  even, saturating), ``x_hat = float32(q) * scale``; ``x / scale`` is the correctly
  rounded quotient (as numpy and torch divide), so the codes equal ml_dtypes' cast.

``fake_quant`` is a ``jax.custom_vjp`` whose backward pass is chosen by ``ste``:

* ``"identity"``: ``d x_hat / d x = 1``;
* ``"clipped"`` (default): ``1`` where the unclipped code lies in ``[qmin, qmax]``, else 0
  (torch's mask);
* ``"lsq"``: Learned Step Size Quantization (Esser et al., 2020): ``x`` as ``"clipped"``;
  ``d x_hat / d scale = round(x/s) - x/s`` inside the range, ``qmin - zp`` below,
  ``qmax - zp`` above; ``d x_hat / d zero_point = 0`` inside, ``-scale`` outside
  (only when the zero point is a float array, i.e. learnable). Both are multiplied
  by ``grad_scale`` (``"auto"``: ``1 / sqrt(N * qmax)``, N the number of elements
  sharing one scale).

Only ``"lsq"`` passes gradients to ``scale`` and ``zero_point``; the other
estimators treat them as constants (zero cotangents).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from qatjax.formats import Format, as_format
from qatjax.qparams import SCALE_EPS, QParams, _divide

__all__ = ["quantize", "dequantize", "fake_quant", "align_varying", "ste_mask", "used_zero_point", "STE_NAMES", "lsq_grad_scale",
           "grid_round"]

STE_NAMES = ("identity", "clipped", "lsq")

GradScale = Union[float, Literal["auto"], None]


def quantize(x: jax.Array, qp: QParams, fmt: Format) -> jax.Array:
    """Quantizes ``x`` to codes of ``fmt``.

    Args:
      x: floating array, any shape.
      qp: parameters broadcastable against ``x`` (their broadcast must not enlarge ``x``).
      fmt: target format.
    Returns:
      Codes of ``x``'s shape: ``int8`` / ``uint8`` for integer formats (NaN maps to the
      zero-point code, since integers cannot hold NaN), ``float8_e4m3fn`` /
      ``float8_e5m2`` for fp8 (NaN stays NaN, finite values saturate to +-max).
    """
    fmt = as_format(fmt)
    x, scale, zero_point = _check_args(x, qp, fmt, "quantize")
    xf = x.astype(jnp.float32)
    if fmt.is_float:
        return _fp8_codes(xf, scale, fmt)
    zp = used_zero_point(zero_point, fmt)
    code = jnp.clip(_unclipped_code(xf, scale, zp), fmt.qmin, fmt.qmax)
    code = jnp.where(jnp.isnan(code), zp, code)
    return code.astype(fmt.storage_dtype)


def dequantize(q: jax.Array, qp: QParams, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Maps codes back to real values: ``x_hat = (float32(q) - zero_point) * scale``.

    Args:
      q: integer or fp8 codes (from :func:`quantize`), any shape.
      qp: the parameters they were quantized with.
      dtype: floating dtype of the result (computed in float32, then cast).
    """
    if not isinstance(qp, QParams):
        raise TypeError(f"dequantize: `qp` must be a QParams, got {type(qp).__name__}.")
    scale = jnp.asarray(qp.scale, jnp.float32)
    zero_point = jnp.round(jnp.asarray(qp.zero_point).astype(jnp.float32))
    q = jnp.asarray(q)
    _check_broadcast(q.shape, scale.shape, "qp.scale", "dequantize")
    _check_broadcast(q.shape, zero_point.shape, "qp.zero_point", "dequantize")
    return ((q.astype(jnp.float32) - zero_point) * scale).astype(dtype)


def fake_quant(
    x: jax.Array,
    qp: QParams,
    fmt: Format,
    *,
    ste: str = "clipped",
    grad_scale: GradScale = None,
) -> jax.Array:
    """Quantizes and dequantizes ``x`` in one step, differentiably.

    Args:
      x: floating array (float32, bfloat16, float16...), any shape.
      qp: parameters broadcastable against ``x``; for ``ste="lsq"`` they receive
        gradients (the zero point only when it is a float array).
      fmt: target format.
      ste: straight-through estimator, one of ``"identity"``, ``"clipped"``, ``"lsq"``.
      grad_scale: LSQ only: factor on the scale and zero-point gradients; ``"auto"``
        uses ``1 / sqrt(N * qmax)`` with ``N = x.size // scale.size``, every element that
        shares a scale -- right for weights. For activations the paper's N excludes the
        batch (torch's quirk counts it): pass ``lsq_grad_scale(features, fmt)`` instead, as
        ``QatDense`` / ``QatConv`` do.
    Returns:
      ``x_hat`` with ``x``'s shape and dtype. NaN inputs give NaN.
    """
    fmt = as_format(fmt)
    if ste not in STE_NAMES:
        raise ValueError(f"fake_quant: `ste` must be one of {STE_NAMES}, got {ste!r}.")
    x, scale, zero_point = _check_args(x, qp, fmt, "fake_quant")
    if grad_scale is not None and ste != "lsq":
        raise ValueError("fake_quant: `grad_scale` only applies to ste='lsq'.")
    if grad_scale == "auto":
        grad_scale = lsq_grad_scale(x.size // max(scale.size, 1), fmt)
    elif grad_scale is None:
        grad_scale = 1.0
    elif not isinstance(grad_scale, (float, int)) or not grad_scale > 0:
        raise ValueError(
            f"fake_quant: `grad_scale` must be a positive float, 'auto' or None, got {grad_scale!r}."
        )
    return _fake_quant(fmt, ste, float(grad_scale), *align_varying(x, scale, zero_point))


def align_varying(*trees):
    """``trees`` with every array made to vary over the same manual mesh axes.

    Inside ``shard_map`` (with its default ``check_vma=True``) each value records the mesh
    axes it varies over: a replicated kernel or scale varies over none, a batch shard over
    the data axis. A ``custom_vjp`` must return cotangents that vary exactly as its inputs,
    but the cotangent of a replicated kernel computed from a sharded batch varies over the
    data axis. Casting every input to the union of their axes (``lax.pcast(...,
    to="varying")``, ``lax.pvary`` on older jax) before the ``custom_vjp`` makes the types
    agree, and JAX's own transpose of that cast sums the cotangent over the axes it added:
    the gradient a plain ``dot_general`` gets. Outside ``shard_map`` (or on a jax without
    varying types) the trees are returned unchanged.
    """
    typeof = getattr(jax, "typeof", None)
    leaves, treedef = jax.tree_util.tree_flatten(trees)
    if typeof is None or not leaves:
        return trees
    vmas = [_varying_axes(typeof(a)) for a in leaves]
    union = frozenset().union(*vmas)
    if not union:
        return trees
    cast = ((lambda a, axes: lax.pcast(a, axes, to="varying")) if hasattr(lax, "pcast")
            else lax.pvary)
    leaves = [cast(a, tuple(union - v)) if union - v else a for a, v in zip(leaves, vmas)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _varying_axes(aval) -> frozenset:
    """The manual mesh axes an abstract value varies over (``aval.manual_axis_type.varying``
    on jax >= 0.9, ``aval.vma`` before)."""
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def lsq_grad_scale(num_elements: int, fmt: Format) -> float:
    """LSQ's gradient scale ``1 / sqrt(num_elements * qmax)``.

    ``num_elements`` is the number of values that share one scale (for a
    per-channel weight, the elements of one channel; for activations, the
    features of one example, as in the paper).
    """
    fmt = as_format(fmt)
    return 1.0 / math.sqrt(max(int(num_elements), 1) * float(fmt.qmax))


# ----------------------------------------------------------------------------- internals


def used_zero_point(zero_point: jax.Array, fmt: Format) -> jax.Array:
    """The zero point the codes use, float32: ``clip(round_half_even(zero_point), qmin, qmax)``
    (torch's treatment of learned zero points), so that 0.0 stays representable; 0 for fp8."""
    zp = jnp.round(jnp.asarray(zero_point).astype(jnp.float32))
    return zp if fmt.is_float else jnp.clip(zp, float(fmt.qmin), float(fmt.qmax))


def _unclipped_code(xf: jax.Array, scale: jax.Array, zp: jax.Array) -> jax.Array:
    """``round_half_even(x * (1/scale)) + zp`` in float32 (torch's order); ``zp`` from
    :func:`used_zero_point`."""
    inv_scale = jnp.float32(1.0) / scale
    return jnp.round(xf * inv_scale) + zp


def _fp8_codes(xf: jax.Array, scale: jax.Array, fmt: Format) -> jax.Array:
    """Saturating round-to-nearest-even cast of ``x / scale``; NaN stays NaN."""
    # The float32 values are already on the fp8 grid, so this cast is exact.
    return _fp8_round(_divide(xf, scale), fmt).astype(fmt.storage_dtype)


def _fp8_round(y: jax.Array, fmt: Format) -> jax.Array:
    """``float32(cast_fp8(clip(y, -max, max)))`` for float32 ``y``, computed in float32.

    Bit-equal to ml_dtypes' round-to-nearest-even cast of the clipped value
    (subnormals, carries into the next binade, the sign of zero and NaN included).
    In the binade ``[2**e, 2**(e+1))`` the fp8 grid step is ``2**(e - nmant)``, with
    ``e`` floored at the smallest normal exponent (the subnormal step continues
    below it), so the cast is ``round_half_even(y * (1/step)) * step`` where both
    products are exact. ``step`` and ``1/step`` come from the exponent bits of ``y``.
    XLA:CPU converts to fp8 with a scalar routine that made fake quantization 1.6x
    slower than an elementwise op on the same array; this runs at memory speed.
    """
    info = ml_dtypes.finfo(fmt.storage_dtype)
    return grid_round(y, info.nmant, info.minexp, fmt.max)


def grid_round(y: jax.Array, nmant: int, minexp: int, max_value: float) -> jax.Array:
    """Round to nearest even onto the grid of a small float format, saturating: float32 in, the
    float32 values of the format out (:func:`_fp8_round` for any format with ``nmant``
    mantissa bits, smallest normal exponent ``minexp`` and largest value ``max_value``:
    fp8, fp6, fp4). NaN stays NaN."""
    y = jnp.clip(y, -max_value, max_value)
    exponent = lax.bitcast_convert_type(y, jnp.uint32) & np.uint32(0x7F800000)  # 2**e
    exponent = jnp.maximum(exponent, np.uint32((minexp + 127) << 23))
    step = exponent - np.uint32(nmant << 23)
    inv_step = np.uint32(254 << 23) - step  # biased exponent 127 - k of 2**-k
    step = lax.bitcast_convert_type(step, jnp.float32)
    inv_step = lax.bitcast_convert_type(inv_step, jnp.float32)
    return jnp.round(y * inv_step) * step


def _fake_quant_value(fmt: Format, xf: jax.Array, scale: jax.Array, zero_point: jax.Array):
    """Returns ``(x_hat, v, in_range)`` in float32, where ``v`` is the unclipped code
    (``x/scale`` for fp8) and ``in_range`` the STE mask."""
    if fmt.is_float:
        v = _divide(xf, scale)
        x_hat = _fp8_round(v, fmt) * scale
        return x_hat, v, jnp.abs(v) <= fmt.max
    zp = used_zero_point(zero_point, fmt)
    v = _unclipped_code(xf, scale, zp)
    k = jnp.clip(v, fmt.qmin, fmt.qmax) - zp
    # A code of -0.0 (x in (-scale/2, 0]) must dequantize to +0.0 as in torch, whose codes
    # are integers. The float arithmetic gives that only while XLA keeps `+ zp - zp`; it
    # drops them when the zero point is a constant 0, hence the explicit select.
    x_hat = jnp.where(k == 0, 0.0, k) * scale
    return x_hat, v, (v >= fmt.qmin) & (v <= fmt.qmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fake_quant(fmt, ste, grad_scale, x, scale, zero_point):
    x_hat, _, _ = _fake_quant_value(fmt, x.astype(jnp.float32), scale, zero_point)
    return x_hat.astype(x.dtype)


def _fake_quant_fwd(fmt, ste, grad_scale, x, scale, zero_point):
    x_hat, _, in_range = _fake_quant_value(fmt, x.astype(jnp.float32), scale, zero_point)
    if ste == "identity":
        res = (None, scale, zero_point)
    elif ste == "clipped":
        res = (in_range, scale, zero_point)
    else:
        res = (x, scale, zero_point)
    return x_hat.astype(x.dtype), res


def _fake_quant_bwd(fmt, ste, grad_scale, res, g):
    saved, scale, zero_point = res
    zp_cotangent = _zero_cotangent(zero_point)
    scale_cotangent = jnp.zeros_like(scale)
    if ste == "identity":
        return g, scale_cotangent, zp_cotangent
    if ste == "clipped":
        return jnp.where(saved, g, jnp.zeros_like(g)), scale_cotangent, zp_cotangent
    x = saved
    xf = x.astype(jnp.float32)
    gf = g.astype(jnp.float32)
    x_hat, v, in_range = _fake_quant_value(fmt, xf, scale, zero_point)
    if fmt.is_float:
        lo_grad, hi_grad, zp = -fmt.max, fmt.max, 0.0
    else:
        zp = used_zero_point(zero_point, fmt)
        lo_grad, hi_grad = fmt.qmin - zp, fmt.qmax - zp
    below = v < fmt.qmin
    above = v > fmt.qmax
    inside_grad = (x_hat - xf) / scale  # round(x/s) - x/s
    d_scale = jnp.where(below, lo_grad, jnp.where(above, hi_grad, inside_grad))
    g_x = jnp.where(in_range, g, jnp.zeros_like(g))
    g_scale = _sum_to_shape(gf * d_scale, scale.shape) * grad_scale
    if jnp.issubdtype(zero_point.dtype, jnp.floating) and not fmt.is_float:
        d_zp = jnp.where(in_range, 0.0, -scale)
        g_zp = (_sum_to_shape(gf * d_zp, zero_point.shape) * grad_scale).astype(zero_point.dtype)
    else:
        g_zp = zp_cotangent
    return g_x, g_scale.astype(scale.dtype), g_zp


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _zero_cotangent(a: jax.Array):
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums ``t`` over the axes that broadcasting added to an array of ``shape``."""
    lead = t.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1
    )
    return jnp.sum(t, axis=axes).reshape(shape) if axes else t.reshape(shape)


def _check_broadcast(x_shape, p_shape, argname: str, fn: str) -> None:
    try:
        out = jnp.broadcast_shapes(tuple(x_shape), tuple(p_shape))
    except ValueError:
        out = None
    if out != tuple(x_shape):
        raise ValueError(
            f"{fn}: `{argname}` of shape {tuple(p_shape)} does not broadcast against x of shape "
            f"{tuple(x_shape)} (expected size 1 or the matching size on each axis, and no more axes "
            "than x)."
        )


def _check_args(x, qp, fmt: Format, fn: str):
    """Validates the arguments at trace time; returns ``(x, scale_f32, zero_point)``."""
    if fmt.is_block:
        raise ValueError(f"{fn}: {fmt.name} is a block format, whose scales are computed per block "
                         f"along an axis: use qatjax.block_{fn}(x, fmt, axis=...).")
    if not isinstance(qp, QParams):
        raise TypeError(f"{fn}: `qp` must be a qatjax.QParams, got {type(qp).__name__}.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: `x` must be a floating array, got dtype {x.dtype}.")
    scale = jnp.asarray(qp.scale)
    zero_point = jnp.asarray(qp.zero_point)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise TypeError(f"{fn}: `qp.scale` must be a floating array, got dtype {scale.dtype}.")
    scale = scale.astype(jnp.float32)
    _check_broadcast(x.shape, scale.shape, "qp.scale", fn)
    _check_broadcast(x.shape, zero_point.shape, "qp.zero_point", fn)
    if not isinstance(scale, jax.core.Tracer):
        s = np.asarray(scale)
        bad = s[(s <= 0) | np.isinf(s)]  # NaN passes: NaN in (a NaN scale), NaN out
        if bad.size:
            raise ValueError(f"{fn}: `qp.scale` must be positive and finite; got {bad[0]}.")
    else:
        # A learned (traced) scale can reach 0 or go negative: floor it like computed scales.
        scale = jnp.maximum(scale, jnp.float32(SCALE_EPS))
    if fmt.is_float and not isinstance(zero_point, jax.core.Tracer):
        if np.any(np.asarray(zero_point) != 0):
            raise ValueError(f"{fn}: fp8 formats take `qp.zero_point` = 0.")
    _check_zero_point_range(zero_point, fmt, fn)
    return x, scale, zero_point


def _check_zero_point_range(zero_point, fmt: Format, fn: str) -> None:
    """A concrete integer-format zero point must round into ``[qmin, qmax]`` (traced ones are
    clamped there, see :func:`used_zero_point`)."""
    if fmt.is_float or isinstance(zero_point, jax.core.Tracer):
        return
    zp = np.round(np.asarray(zero_point, np.float64))
    bad = zp[(zp < fmt.qmin) | (zp > fmt.qmax)]
    if bad.size:
        raise ValueError(f"{fn}: `qp.zero_point` must lie in [{fmt.qmin}, {fmt.qmax}] for {fmt.name}, "
                         f"got {bad.flat[0]:g}.")



def ste_mask(x: jax.Array, qp: QParams, fmt: Format) -> jax.Array:
    """The gradient mask of the ``"clipped"`` estimator: bool, ``x``'s shape.

    True where the unclipped code ``round(x * (1/scale)) + zero_point`` lies in
    ``[qmin, qmax]`` (fp8: ``|x / scale| <= max``); False outside and for NaN.
    """
    fmt = as_format(fmt)
    x, scale, zero_point = _check_args(x, qp, fmt, "ste_mask")
    return _fake_quant_value(fmt, x.astype(jnp.float32), scale, zero_point)[2]
