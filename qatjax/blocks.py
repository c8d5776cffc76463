"""Block-scaled formats (OCP Microscaling v1.0: MXFP8, MXFP6, MXFP4, MXINT8; NVIDIA's NVFP4):
block scales, quantize, dequantize and fake quantization with straight-through estimators.

A tensor ``x`` is cut along its block axis ``a`` (the contraction axis of the matmul it
feeds) into blocks of ``fmt.block_size`` consecutive elements; each block shares one
scale. With ``n = x.shape[a]`` and ``G = ceil(n / block_size)``:

* the scales (:class:`BlockScales`) have ``x``'s shape with ``n`` replaced by ``G``
  (``block_scale``), plus a float32 scalar ``tensor_scale`` (NVFP4's ``g``; 1 for MX);
* a ragged last block (``n % block_size != 0``) is padded with zeros: its scale is that of
  its real elements (zeros never raise a block's maximum), and only real elements get codes;
* the codes have ``x``'s shape, dtype :attr:`qatjax.BlockFormat.storage_dtype`.

Scales, all blocks at once, by exponent arithmetic on the float32 bits (exact):

* MX (E8M0 scale ``X = 2**e``, byte ``e + 127``): ``amax`` the block's largest magnitude,
  ``emax`` the element's largest exponent, ``e = floor(log2(amax)) - emax`` (``"floor"``,
  the OCP rule), plus one where ``amax / 2**e`` exceeds the element's max (``"ceil"``) or
  would round above it (``"round_up_on_saturation"``); see :class:`qatjax.BlockFormat`.
  Exponents produced lie in ``[-127, 126]``: an all-zero block takes ``e = -127`` (byte 0),
  and MXINT8 blocks beyond ``2**127`` saturate instead of taking byte 254 (whose reciprocal
  is a float32 subnormal). A block holding a NaN or an infinity gets byte 255 (NaN): the
  specification's NaN scale, which makes the whole block NaN when dequantized. FP4 / FP6 /
  E4M3 elements cannot hold an infinity.
* NVFP4: ``g = amax_tensor / 2688`` (``448 * 6``; 1 for an all-zero tensor, NaN for a
  non-finite one), ``s_b = e4m3(amax_block / (6 * g))`` (nearest even, saturating), both
  divisions correctly rounded in float32, ``6 * g`` rounded once.

Elements: ``q = round_half_even(v / scale)`` on the element's grid, saturated to ``+-max``;
for MX ``v / scale = v * 2**-e`` is exact; for NVFP4 ``v / (s_b * g)`` is the correctly
rounded float32 quotient by the rounded product ``s_b * g`` (0 where that product is 0).
Dequantized values are ``q * 2**e`` (exact) and ``q * (s_b * g)`` (one float32 rounding).

Straight-through estimators (:func:`block_fake_quant`): ``"clipped"`` (default) passes the
gradient where ``|v / scale| <= max`` (an element that saturated, or a NaN, gets 0);
``"identity"`` passes it everywhere. Scales are computed from the data and are not
differentiated (as for dynamic scaling).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from qatjax.fake_quant import grid_round
from qatjax.formats import BlockFormat, Format, as_format
from qatjax.qparams import _divide, _normalize_axis, computed_once

__all__ = [
    "BlockScales",
    "BLOCK_STE_NAMES",
    "block_scales",
    "block_quantize",
    "block_dequantize",
    "block_fake_quant",
    "block_ste_mask",
    "decode_elements",
    "encode_elements",
    "num_blocks",
]

BLOCK_STE_NAMES = ("identity", "clipped")

_NVFP4_TENSOR_DIVISOR = 448.0 * 6.0
_E4M3_MAX_CODE = 0x7E  # 448


class BlockScales(NamedTuple):
    """The scales of a block-quantized tensor.

    Attributes:
      scale: the block scales, ``x``'s shape with the block axis of length ``n`` replaced by
        ``ceil(n / block_size)``: ``uint8`` E8M0 bytes (``e + 127``, 255 = NaN) for MX
        formats, ``float8_e4m3fn`` for NVFP4.
      tensor_scale: float32 scalar: NVFP4's per-tensor ``g``; 1.0 for MX formats.

    The serving variables of a converted layer store ``scale`` as ``kernel_scale`` and
    ``tensor_scale`` as ``kernel_zero_point`` (a block format has no zero point).
    """

    scale: jax.Array
    tensor_scale: jax.Array


def num_blocks(n: int, fmt: BlockFormat) -> int:
    """Blocks along an axis of length ``n``: ``ceil(n / fmt.block_size)``."""
    return -(-int(n) // fmt.block_size)


def _block_format(fmt: object, fn: str) -> BlockFormat:
    fmt = as_format(fmt)
    if not fmt.is_block:
        raise ValueError(f"{fn}: `fmt` must be a block format (qatjax.mxfp4, nvfp4, ...), got "
                         f"{fmt.name}; use qatjax.{fn.removeprefix('block_')} for it.")
    return fmt


def _check_x(x, fn: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: `x` must be a floating array, got dtype {x.dtype}.")
    if x.ndim == 0:
        raise ValueError(f"{fn}: `x` must have at least one axis (the block axis), got a scalar.")
    return x


def _split(x: jax.Array, axis: int, block_size: int) -> jax.Array:
    """``x`` padded with zeros along ``axis`` to whole blocks and split there into
    ``(G, block_size)``."""
    n = x.shape[axis]
    g = -(-n // block_size)
    if g * block_size != n:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, g * block_size - n)
        x = jnp.pad(x, pad)
    return x.reshape(x.shape[:axis] + (g, block_size) + x.shape[axis + 1:])


def _merge(xs: jax.Array, axis: int, n: int) -> jax.Array:
    """Inverse of :func:`_split` (the padding dropped)."""
    x = xs.reshape(xs.shape[:axis] + (xs.shape[axis] * xs.shape[axis + 1],) + xs.shape[axis + 2:])
    return x if x.shape[axis] == n else lax.slice_in_dim(x, 0, n, axis=axis)


def _check_scales(scales, x_shape, axis: int, fmt: BlockFormat, fn: str) -> BlockScales:
    """``scales`` as :class:`BlockScales` (any ``(scale, tensor_scale)`` pair), validated."""
    try:
        scale, tensor_scale = scales
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: `scales` must be a BlockScales (scale, tensor_scale), got "
                        f"{type(scales).__name__}.") from None
    scale, tensor_scale = jnp.asarray(scale), jnp.asarray(tensor_scale, jnp.float32)
    expected = tuple(x_shape[:axis]) + (num_blocks(x_shape[axis], fmt),) + tuple(x_shape[axis + 1:])
    if tuple(scale.shape) != expected:
        raise ValueError(f"{fn}: `scales.scale` has shape {tuple(scale.shape)}; blocks of "
                         f"{fmt.block_size} along axis {axis} of shape {tuple(x_shape)} need "
                         f"{expected}.")
    if scale.dtype != fmt.scale_dtype:
        raise TypeError(f"{fn}: `scales.scale` of {fmt.name} must be {fmt.scale_dtype}, got "
                        f"{scale.dtype}.")
    if tensor_scale.ndim != 0:
        raise ValueError(f"{fn}: `scales.tensor_scale` must be a scalar, got shape "
                         f"{tuple(tensor_scale.shape)}.")
    return BlockScales(scale, tensor_scale)


# ----------------------------------------------------------------------------- scales


def _mantissa_threshold(fmt: BlockFormat) -> tuple[int, bool]:
    """``(t, inclusive)``: a block's float32 mantissa bits ``m`` (amax = ``1.m * 2**E``) make
    the exponent round up when ``m > t`` (or ``m >= t`` when inclusive)."""
    top = fmt.max / 2.0**fmt.emax  # largest element over 2**emax, in [1, 2)
    if fmt.scale_rounding == "ceil":
        return int(round((top - 1.0) * 2**23)), False
    # round_up_on_saturation: the element grid in [1, 2) has steps 2**-nmant; the top value
    # rounds up from half a step above it (ties go to the even neighbour).
    nmant = 6 if fmt.element == "int8" else int(ml_dtypes.finfo(fmt.element_dtype).nmant)
    top_units = int(round((top - 1.0) * 2**nmant))  # the top value's mantissa, in grid units
    threshold = int(round((top - 1.0 + 2.0**-(nmant + 1)) * 2**23))
    return threshold, bool(top_units % 2)  # an odd top mantissa: ties round up


def _e8m0_codes(amax: jax.Array, fmt: BlockFormat) -> jax.Array:
    """uint8 E8M0 bytes of blocks with largest magnitudes ``amax`` (float32, any shape)."""
    bits = lax.bitcast_convert_type(amax.astype(jnp.float32), jnp.uint32)
    biased = (bits >> 23).astype(jnp.int32)  # float32 exponent + 127 (sign bit is 0)
    e = biased - 127 - fmt.emax
    if fmt.scale_rounding != "floor":
        threshold, inclusive = _mantissa_threshold(fmt)
        mantissa = (bits & np.uint32(0x7FFFFF)).astype(jnp.int32)
        up = mantissa >= threshold if inclusive else mantissa > threshold
        e = e + up.astype(jnp.int32)
    # Zero (and float32-subnormal, which XLA flushes) blocks: the smallest exponent, -127.
    e = jnp.where(biased == 0, -127, jnp.clip(e, -127, 126))
    code = jnp.where(biased == 255, 255, e + 127)  # NaN or infinity in the block: NaN scale
    return code.astype(jnp.uint8)


def _nvfp4_tensor_scale(amax_tensor: jax.Array) -> jax.Array:
    """``g = amax / 2688`` (correctly rounded), 1 for 0, NaN for a non-finite amax."""
    a = jnp.asarray(amax_tensor, jnp.float32)
    g = _divide(a, jnp.float32(_NVFP4_TENSOR_DIVISOR))
    return jnp.where(jnp.isfinite(a), jnp.where(a > 0, g, jnp.float32(1.0)), jnp.float32(jnp.nan))


def _e4m3_block_scales(amax: jax.Array, g: jax.Array) -> jax.Array:
    """NVFP4 block scales ``e4m3(amax / (6 g))``, float32 values on the E4M3 grid."""
    info = ml_dtypes.finfo(ml_dtypes.float8_e4m3fn)
    return grid_round(_divide(amax.astype(jnp.float32), jnp.float32(6.0) * g), info.nmant,
                      info.minexp, float(info.max))


def block_scales(x: jax.Array, fmt: Format | str, axis: int = -1, *,
                 tensor_amax: jax.Array | None = None) -> BlockScales:
    """The block scales of ``x`` by ``fmt``'s rule, every block at once.

    Args:
      x: floating array, any shape (computed in float32).
      fmt: a block format (:class:`qatjax.BlockFormat` or its name).
      axis: the block axis (the contraction axis); negative values count from the end.
      tensor_amax: NVFP4 only: ``max|x|`` over the whole tensor when it spans more than
        ``x`` (reduced across devices); default ``max|x|`` (NaN if ``x`` holds a NaN).
    Returns:
      :class:`BlockScales`: ``scale`` of ``x``'s shape with the block axis of length ``n``
      replaced by ``ceil(n / block_size)`` (uint8 E8M0 bytes or float8_e4m3fn), float32
      ``tensor_scale``. With ``fmt.mse_search`` each block's scale is the best of three
      candidates (see :class:`qatjax.BlockFormat`).
    """
    fmt = _block_format(fmt, "block_scales")
    x = lax.stop_gradient(_check_x(x, "block_scales"))
    axis = _normalize_axis(axis, x.ndim, "axis")
    xs = _split(x.astype(jnp.float32), axis, fmt.block_size)
    amax = jnp.max(jnp.abs(xs), axis=axis + 1)
    if fmt.scale_format == "e8m0":
        codes = _e8m0_codes(amax, fmt)
        tensor_scale = jnp.ones((), jnp.float32)
    else:
        if tensor_amax is None:
            tensor_amax = jnp.max(amax)
        tensor_scale = _nvfp4_tensor_scale(tensor_amax)
        codes = _e4m3_block_scales(amax, tensor_scale).astype(jnp.float8_e4m3fn)
    scales = BlockScales(codes, tensor_scale)
    if fmt.mse_search:
        scales = _mse_search(xs, axis, scales, fmt)
    return scales


def _mse_search(xs: jax.Array, axis: int, scales: BlockScales, fmt: BlockFormat) -> BlockScales:
    """Per block, the candidate scale code among ``(c, c - 1, c + 1)`` (the rule's first)
    with the smallest sum of squared errors; NaN blocks keep theirs."""
    if fmt.scale_format == "e8m0":
        code = scales.scale.astype(jnp.int32)
        lo, hi, nan = 0, 254, code == 255
    else:
        code = lax.bitcast_convert_type(scales.scale, jnp.uint8).astype(jnp.int32)
        lo, hi, nan = 0, _E4M3_MAX_CODE, jnp.isnan(scales.scale.astype(jnp.float32))
    candidates = []
    for d in (0, -1, 1):
        c = jnp.where(nan, code, jnp.clip(code + d, lo, hi))
        if fmt.scale_format == "e8m0":
            candidates.append(c.astype(jnp.uint8))
        else:
            candidates.append(lax.bitcast_convert_type(c.astype(jnp.uint8), jnp.float8_e4m3fn))
    errors = []
    for c in candidates:
        x_hat, _ = _fake_quant_split(xs, axis, BlockScales(c, scales.tensor_scale), fmt)
        errors.append(jnp.sum(jnp.square(x_hat - xs), axis=axis + 1))
    best = jnp.argmin(jnp.stack(errors), axis=0)  # the first minimum: the rule's on ties
    chosen = candidates[0]
    for i in (1, 2):
        chosen = jnp.where(best == i, candidates[i], chosen)
    return BlockScales(chosen, scales.tensor_scale)


# ----------------------------------------------------------------------------- elements


def _element_round(y: jax.Array, fmt: BlockFormat) -> jax.Array:
    """The element grid value of float32 ``y``: round half to even, saturating."""
    if fmt.element == "int8":
        return jnp.round(jnp.clip(y, -fmt.max, fmt.max) * 64.0) * (1.0 / 64.0)
    info = ml_dtypes.finfo(fmt.element_dtype)
    return grid_round(y, int(info.nmant), int(info.minexp), fmt.max)


def _scale_factors(scales: BlockScales, fmt: BlockFormat, axis: int):
    """Per-block factors broadcasting against the split tensor (size 1 at ``axis + 1``):
    ``(inverse, scale, half)``: MX: ``v * inverse`` is ``v / 2**e`` and ``(q * scale) * half``
    is ``q * 2**e`` (byte 0's ``2**-127`` is a float32 subnormal: taken as ``2**-126 / 2``);
    NVFP4: ``inverse`` None (divide by ``scale = s_b * g``), ``half`` None."""
    expand = lambda a: jnp.expand_dims(a, axis + 1)  # noqa: E731
    if fmt.scale_format == "e8m0":
        code = scales.scale.astype(jnp.uint32)
        nan = code == 255
        inverse = lax.bitcast_convert_type((np.uint32(254) - jnp.minimum(code, 254)) << 23,
                                           jnp.float32)
        scale = lax.bitcast_convert_type(jnp.maximum(code, 1) << 23, jnp.float32)
        half = jnp.where(code == 0, jnp.float32(0.5), jnp.float32(1.0))
        inverse = jnp.where(nan, jnp.nan, inverse)
        scale = jnp.where(nan, jnp.nan, scale)
        return expand(inverse), expand(scale), expand(half)
    # Its own fusion: XLA would otherwise recompute the block scale's chain for every element.
    scale = computed_once(scales.scale.astype(jnp.float32)
                          * jnp.asarray(scales.tensor_scale, jnp.float32))
    return None, expand(scale), None


def _scaled(xs: jax.Array, factors) -> jax.Array:
    """``v / scale`` (unrounded element values), float32."""
    inverse, scale, _ = factors
    if inverse is not None:
        return xs * inverse
    y = _divide(xs, jnp.where(scale > 0, scale, 1.0))
    return jnp.where(scale == 0, jnp.zeros_like(y), y)  # an all-zero NVFP4 block


def _rescaled(q: jax.Array, factors) -> jax.Array:
    """``q * scale`` for element values ``q``, float32."""
    _, scale, half = factors
    return q * scale if half is None else (q * scale) * half


def _fake_quant_split(xs, axis, scales, fmt):
    """``(x_hat, v / scale)`` of the split float32 tensor."""
    factors = _scale_factors(scales, fmt, axis)
    y = _scaled(xs, factors)
    return _rescaled(_element_round(y, fmt), factors), y


def encode_elements(values: jax.Array, fmt: BlockFormat) -> jax.Array:
    """Element grid values (float32, ``|v| <= max``) -> codes of ``fmt.storage_dtype``.

    fp8 elements: the fp8 value itself; MXINT8: ``int8(64 v)``; fp6 / fp4: the element's bit
    pattern (sign, exponent, mantissa, as ml_dtypes encodes it) in a uint8. NaN values
    (blocks with a NaN scale) encode as 0.
    """
    values = jnp.where(jnp.isnan(values), 0.0, values)
    if fmt.element in ("e4m3", "e5m2"):
        return values.astype(fmt.storage_dtype)
    if fmt.element == "int8":
        return (values * 64.0).astype(jnp.int8)
    info = ml_dtypes.finfo(fmt.element_dtype)
    nmant, minexp = int(info.nmant), int(info.minexp)
    magnitude = jnp.abs(values)
    bits = lax.bitcast_convert_type(magnitude, jnp.uint32)
    normal = (bits >> (23 - nmant)) - np.uint32((126 + minexp) << nmant)
    subnormal = (magnitude * 2.0 ** (nmant - minexp)).astype(jnp.uint32)
    mag_code = jnp.where(magnitude >= 2.0**minexp, normal, subnormal)
    sign = jnp.signbit(values).astype(jnp.uint32) << (fmt.bits - 1)
    return (mag_code | sign).astype(jnp.uint8)


@functools.lru_cache(maxsize=None)
def _decode_table(element: str) -> np.ndarray:
    dtype = BlockFormat(element).element_dtype
    bits = int(ml_dtypes.finfo(dtype).bits)
    return np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float32)


def decode_elements(codes: jax.Array, fmt: BlockFormat) -> jax.Array:
    """Inverse of :func:`encode_elements`: float32 element values."""
    codes = jnp.asarray(codes)
    if codes.dtype != fmt.storage_dtype:
        raise TypeError(f"decode_elements: codes of {fmt.name} must be {fmt.storage_dtype}, got "
                        f"{codes.dtype}.")
    if fmt.element in ("e4m3", "e5m2"):
        return codes.astype(jnp.float32)
    if fmt.element == "int8":
        return codes.astype(jnp.float32) * (1.0 / 64.0)
    table = jnp.asarray(_decode_table(fmt.element))
    return table[codes.astype(jnp.int32) & (table.shape[0] - 1)]


# ----------------------------------------------------------------------------- public ops


def _checked_inputs(x, fmt, axis: int, scales, fn: str):
    """``(fmt, x, axis, scales)`` checked for ``fn``: the block format, ``x`` a floating array,
    ``axis`` normalized, ``scales`` checked against ``x`` (default :func:`block_scales` of
    ``x``)."""
    fmt = _block_format(fmt, fn)
    x = _check_x(x, fn)
    axis = _normalize_axis(axis, x.ndim, "axis")
    scales = (block_scales(x, fmt, axis) if scales is None
              else _check_scales(scales, x.shape, axis, fmt, fn))
    return fmt, x, axis, scales


def block_quantize(x: jax.Array, fmt: Format | str, axis: int = -1, *,
                   scales: BlockScales | None = None) -> tuple[jax.Array, BlockScales]:
    """Block-quantizes ``x``.

    Args:
      x: floating array (computed in float32).
      fmt: a block format.
      axis: the block axis.
      scales: the scales to use (e.g. a weight's, computed once); default
        :func:`block_scales` of ``x``.
    Returns:
      ``(codes, scales)``: codes of ``x``'s shape in ``fmt.storage_dtype`` (see
      :func:`encode_elements`) and the :class:`BlockScales`.
    """
    fmt, x, axis, scales = _checked_inputs(x, fmt, axis, scales, "block_quantize")
    xs = _split(x.astype(jnp.float32), axis, fmt.block_size)
    q = _element_round(_scaled(xs, _scale_factors(scales, fmt, axis)), fmt)
    return _merge(encode_elements(q, fmt), axis, x.shape[axis]), scales


def block_dequantize(codes: jax.Array, scales: BlockScales, fmt: Format | str, axis: int = -1,
                     dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """``q * scale`` per block: MX ``q * 2**e`` (exact), NVFP4 ``q * (s_b * g)``; NaN scales
    give NaN blocks.

    Args:
      codes: codes from :func:`block_quantize` (``fmt.storage_dtype``).
      scales: their :class:`BlockScales` (or any ``(scale, tensor_scale)`` pair).
      fmt: the block format; axis: the block axis.
      dtype: floating dtype of the result (computed in float32, then cast).
    """
    fmt = _block_format(fmt, "block_dequantize")
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        raise ValueError("block_dequantize: `codes` must have at least one axis, got a scalar.")
    axis = _normalize_axis(axis, codes.ndim, "axis")
    scales = _check_scales(scales, codes.shape, axis, fmt, "block_dequantize")
    qs = _split(decode_elements(codes, fmt), axis, fmt.block_size)
    return _merge(_rescaled(qs, _scale_factors(scales, fmt, axis)), axis, codes.shape[axis]).astype(dtype)


def block_fake_quant(x: jax.Array, fmt: Format | str, axis: int = -1, *,
                     scales: BlockScales | None = None, ste: str = "clipped") -> jax.Array:
    """``block_dequantize(block_quantize(x))`` in one pass, differentiably.

    Args:
      x: floating array, any shape (computed in float32, returned in ``x``'s dtype).
      fmt: a block format; axis: the block axis.
      scales: the scales to use; default :func:`block_scales` of ``x`` (not differentiated).
      ste: ``"clipped"`` (gradient 1 where ``|v / scale| <= max``, else 0) or ``"identity"``.
    Returns:
      ``x_hat`` of ``x``'s shape and dtype; blocks holding a NaN or an infinity are NaN (MX),
      every value is NaN when ``x`` holds one (NVFP4: the per-tensor scale is NaN).
    """
    fmt = _block_format(fmt, "block_fake_quant")
    if ste not in BLOCK_STE_NAMES:
        raise ValueError(f"block_fake_quant: `ste` must be one of {BLOCK_STE_NAMES} (block scales "
                         f"are not learned), got {ste!r}.")
    fmt, x, axis, scales = _checked_inputs(x, fmt, axis, scales, "block_fake_quant")
    return _block_fake_quant(fmt, ste, axis, x, lax.stop_gradient(tuple(scales)))


def block_ste_mask(x: jax.Array, fmt: Format | str, axis: int = -1, *,
                   scales: BlockScales | None = None) -> jax.Array:
    """The ``"clipped"`` estimator's mask: bool of ``x``'s shape, True where ``|v / scale| <=
    max`` (False for saturated elements and NaN)."""
    fmt, x, axis, scales = _checked_inputs(x, fmt, axis, scales, "block_ste_mask")
    xs = _split(x.astype(jnp.float32), axis, fmt.block_size)
    y = _scaled(xs, _scale_factors(BlockScales(*scales), fmt, axis))
    return _merge(jnp.abs(y) <= fmt.max, axis, x.shape[axis])


def _fake_quant_value(fmt, axis, x, scales):
    xs = _split(x.astype(jnp.float32), axis, fmt.block_size)
    x_hat, y = _fake_quant_split(xs, axis, BlockScales(*scales), fmt)
    n = x.shape[axis]
    return _merge(x_hat, axis, n).astype(x.dtype), _merge(jnp.abs(y) <= fmt.max, axis, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _block_fake_quant(fmt, ste, axis, x, scales):
    return _fake_quant_value(fmt, axis, x, scales)[0]


def _block_fake_quant_fwd(fmt, ste, axis, x, scales):
    x_hat, mask = _fake_quant_value(fmt, axis, x, scales)
    return x_hat, (mask if ste == "clipped" else None, scales)


def _block_fake_quant_bwd(fmt, ste, axis, res, g):
    mask, scales = res
    zeros = tuple(jnp.zeros_like(s) if jnp.issubdtype(jnp.asarray(s).dtype, jnp.floating)
                  else np.zeros(jnp.shape(s), jax.dtypes.float0) for s in scales)
    return (g if mask is None else jnp.where(mask, g, jnp.zeros_like(g))), zeros


_block_fake_quant.defvjp(_block_fake_quant_fwd, _block_fake_quant_bwd)
