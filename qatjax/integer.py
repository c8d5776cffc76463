"""Real low-precision matmuls: int8 x int8 -> int32 and fp8 x fp8 -> float32.

The weight operand is laid out ``[N, K]`` (output features first), so both
operands contract their last axis; on Hopper GPUs that layout runs the int8 and
fp8 GEMMs at about twice the bf16 rate, against 1.3x with ``[K, N]``.

Zero points are handled in closed form, never with a second matmul:

    sum_k (a - za)(b - zb) = sum_k a*b - zb * rowsum(a) - za * colsum(b) + K * za * zb

The int32 accumulator is exact as long as the true result fits in int32: the
intermediate terms are int32 additions, which wrap modulo 2**32 in XLA, so only
the final value needs the bound (see :func:`max_safe_contraction`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qatjax.formats import IntFormat

__all__ = [
    "max_safe_contraction",
    "check_contraction",
    "signed_codes",
    "int_matmul",
    "fp8_matmul",
]

_INT32_MAX = 2**31 - 1


def _max_abs_offset(fmt: IntFormat, symmetric: bool) -> int:
    """Largest ``|q - zero_point|`` a code of ``fmt`` can have."""
    if symmetric:
        return max(abs(fmt.qmin), fmt.qmax)
    return fmt.qmax - fmt.qmin


def max_safe_contraction(
    lhs_format: IntFormat, rhs_format: IntFormat, *, lhs_symmetric: bool, rhs_symmetric: bool
) -> int:
    """Largest contraction size ``K`` for which the int32 accumulator cannot overflow.

    ``K_max = floor((2**31 - 1) / (max|a - za| * max|b - zb|))``: 131071 for two
    symmetric int8 operands, 65793 for affine uint8 activations with symmetric
    int8 weights, 33025 for two affine 8-bit operands.
    """
    bound = _max_abs_offset(lhs_format, lhs_symmetric) * _max_abs_offset(rhs_format, rhs_symmetric)
    return _INT32_MAX // bound


def check_contraction(k: int, lhs_format: IntFormat, rhs_format: IntFormat, *,
                      lhs_symmetric: bool, rhs_symmetric: bool) -> None:
    """Raises a ValueError when a contraction of size ``k`` could overflow int32."""
    limit = max_safe_contraction(lhs_format, rhs_format, lhs_symmetric=lhs_symmetric,
                                 rhs_symmetric=rhs_symmetric)
    if k > limit:
        raise ValueError(
            f"integer matmul: contraction size {k} exceeds {limit}, the largest for which the "
            f"int32 accumulator of {lhs_format.name} x {rhs_format.name} codes cannot overflow; "
            "use per_group weights (each group accumulates separately) or a float layer."
        )


def signed_codes(q: jax.Array, zero_point: jax.Array, fmt: IntFormat) -> tuple[jax.Array, jax.Array]:
    """Maps codes of any integer format to int8 storage for an int8 GEMM.

    uint8 codes (0..255) become ``q - 128`` with zero point ``zero_point - 128``,
    which leaves ``q - zero_point`` unchanged; other formats already fit in int8.

    Returns:
      ``(int8 codes, int32 zero point)``.
    """
    zero_point = jnp.round(jnp.asarray(zero_point)).astype(jnp.int32)
    if fmt.signed or fmt.bits < 8:
        return q.astype(jnp.int8), zero_point
    shifted = (q.astype(jnp.int32) - 128).astype(jnp.int8)
    return shifted, zero_point - 128


def int_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    lhs_zero_point: jax.Array,
    rhs_zero_point: jax.Array,
    *,
    grouped: bool = False,
    rhs_kn: bool = False,
) -> jax.Array:
    """``sum_k (lhs - lhs_zp)(rhs - rhs_zp)`` with one int8 x int8 -> int32 dot_general.

    Args:
      lhs: int8 codes ``[..., K]`` (``[..., G, g]`` when ``grouped``).
      rhs: int8 codes ``[N, K]`` (``[N, G, g]`` when ``grouped``), or ``[K, N]`` when
        ``rhs_kn`` (not grouped). Integer accumulation is exact, so both layouts give the
        same result.
      lhs_zero_point: int32 scalar (per-tensor activations) or ``[..., 1]`` (per row), or
        None when statically 0.
      rhs_zero_point: int32, shape ``()`` or ``[N]`` (``[N, G]`` when grouped), or None when
        statically 0. With both None no row or column sums are computed.
      grouped: contract each of the ``G`` groups separately (per-group weights).
      rhs_kn: ``rhs`` is laid out ``[K, N]``.
    Returns:
      int32 ``[..., N]``, or ``[G, ..., N]`` when ``grouped``.
    """
    if lhs.dtype != jnp.int8 or rhs.dtype != jnp.int8:
        raise TypeError(f"int_matmul: operands must be int8 codes, got {lhs.dtype} and {rhs.dtype}.")
    if lhs_zero_point is None and rhs_zero_point is None:
        # Both zero points are statically 0: the accumulator is the answer.
        return lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())) if rhs_kn
                               else _dims(lhs.ndim, grouped), preferred_element_type=jnp.int32)
    za = jnp.asarray(0 if lhs_zero_point is None else lhs_zero_point, jnp.int32)
    zb = jnp.asarray(0 if rhs_zero_point is None else rhs_zero_point, jnp.int32)
    if rhs_kn and grouped:
        raise ValueError("int_matmul: `rhs_kn` is for ungrouped operands.")
    dims = (((lhs.ndim - 1,), (0,)), ((), ())) if rhs_kn else _dims(lhs.ndim, grouped)
    acc = lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.int32)
    k = lhs.shape[-1]
    # Row sums of lhs (per example, and per group) and column sums of rhs.
    rowsum = jnp.sum(lhs, axis=-1, dtype=jnp.int32)  # [...] or [..., G]
    colsum = jnp.sum(rhs, axis=0 if rhs_kn else -1, dtype=jnp.int32)  # [N] or [N, G]
    if grouped:
        rowsum = jnp.moveaxis(rowsum, -1, 0)[..., None]  # [G, ..., 1]
        colsum = colsum.T.reshape((colsum.shape[1],) + (1,) * (lhs.ndim - 2) + (colsum.shape[0],))
        zb_b = zb.T.reshape(colsum.shape) if zb.ndim == 2 else zb
    else:
        rowsum = rowsum[..., None]
        zb_b = zb
    return acc - zb_b * rowsum - za * colsum + jnp.int32(k) * za * zb_b


def fp8_matmul(lhs: jax.Array, rhs: jax.Array, *, grouped: bool = False) -> jax.Array:
    """fp8 x fp8 -> float32 dot_general contracting the last axis of both.

    Args:
      lhs: fp8 codes ``[..., K]`` (``[..., G, g]`` when ``grouped``).
      rhs: fp8 codes ``[N, K]`` (``[N, G, g]``); e4m3 or e5m2, the two may differ.
      grouped: contract each group separately.
    Returns:
      float32 ``[..., N]`` (``[G, ..., N]`` when grouped), products accumulated in float32.
    """
    return lax.dot_general(lhs, rhs, _dims(lhs.ndim, grouped), preferred_element_type=jnp.float32)


def _dims(lhs_ndim: int, grouped: bool):
    """dot_general dimension numbers contracting the last axis of ``lhs`` and ``rhs``."""
    if grouped:
        return (((lhs_ndim - 1,), (2,)), ((lhs_ndim - 2,), (1,)))
    return (((lhs_ndim - 1,), (1,)), ((), ()))
