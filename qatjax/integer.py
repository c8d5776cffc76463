"""Real low-precision matmuls: int8 x int8 -> int32 and fp8 x fp8 -> float32.

Both are general ``lax.dot_general`` contractions (any contracting and batch axes).
Dense layers serve their weight laid out ``[N, K]`` (output features first), so both
operands contract their last axis; on Hopper GPUs that layout runs the int8 and
fp8 GEMMs at about twice the bf16 rate, against 1.3x with ``[K, N]``.

Zero points are handled in closed form, never with a second matmul:

    sum_k (a - za)(b - zb) = sum_k a*b - zb * rowsum(a) - za * colsum(b) + K * za * zb

with row / column sums over the contracting axes and zero points constant along them.

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
    "canonical_dims",
    "free_axes",
    "to_output",
    "int_dot_general",
    "fp8_dot_general",
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


DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]],
                         tuple[tuple[int, ...], tuple[int, ...]]]


def canonical_dims(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> DimensionNumbers:
    """``lax.dot_general`` dimension numbers with non-negative int tuples, validated.

    Raises:
      ValueError: an axis is out of range or used twice, or the two sides list different
        numbers of contracting / batch axes.
    """
    try:
        (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError):
        raise ValueError("`dimension_numbers` must be ((lhs_contracting, rhs_contracting), "
                         f"(lhs_batch, rhs_batch)), got {dimension_numbers!r}.") from None

    def axes(v, ndim, name):
        v = (v,) if isinstance(v, int) else tuple(v)
        if any(not isinstance(a, int) or not -ndim <= a < ndim for a in v):
            raise ValueError(f"`dimension_numbers`: {name} {v} out of range for rank {ndim}.")
        return tuple(a % ndim for a in v)

    lc, lb = axes(lc, lhs_ndim, "lhs_contracting"), axes(lb, lhs_ndim, "lhs_batch")
    rc, rb = axes(rc, rhs_ndim, "rhs_contracting"), axes(rb, rhs_ndim, "rhs_batch")
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"`dimension_numbers`: lhs and rhs list different numbers of axes: "
                         f"{dimension_numbers!r}.")
    if len(set(lc + lb)) != len(lc + lb) or len(set(rc + rb)) != len(rc + rb):
        raise ValueError(f"`dimension_numbers`: an axis is used twice: {dimension_numbers!r}.")
    return (lc, rc), (lb, rb)


def free_axes(ndim: int, contracting: tuple[int, ...], batch: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of an operand that are neither contracted nor batch, in order."""
    return tuple(a for a in range(ndim) if a not in contracting and a not in batch)


def to_output(p: jax.Array, side: str, dimension_numbers: DimensionNumbers, lhs_ndim: int,
              rhs_ndim: int) -> jax.Array:
    """An operand-shaped array constant along the contracting axes -> the output's layout.

    ``p`` is a scalar, or has the operand's rank with size 1 on every contracting axis
    (scales, zero points, row sums). ``lax.dot_general`` lays its output out as
    ``[*batch, *lhs_free, *rhs_free]``; the result broadcasts against that (size 1 on the
    other side's free axes).
    """
    p = jnp.asarray(p)
    if p.ndim == 0:
        return p
    (lc, rc), (lb, rb) = dimension_numbers
    contracting, batch, ndim = (lc, lb, lhs_ndim) if side == "lhs" else (rc, rb, rhs_ndim)
    free = free_axes(ndim, contracting, batch)
    t = jnp.transpose(p, batch + free + contracting)
    t = t.reshape(t.shape[:len(batch) + len(free)])
    n_other = len(free_axes(rhs_ndim, rc, rb) if side == "lhs" else free_axes(lhs_ndim, lc, lb))
    if side == "lhs":
        return t.reshape(t.shape + (1,) * n_other)
    return t.reshape(t.shape[:len(batch)] + (1,) * n_other + t.shape[len(batch):])


def int_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    lhs_zero_point: jax.Array | None = None,
    rhs_zero_point: jax.Array | None = None,
) -> jax.Array:
    """``sum_k (lhs - lhs_zp)(rhs - rhs_zp)`` over the contracting axes, with one
    int8 x int8 -> int32 ``lax.dot_general``.

    Args:
      lhs, rhs: int8 codes, any layout ``dimension_numbers`` describes.
      dimension_numbers: as for ``lax.dot_general``.
      lhs_zero_point / rhs_zero_point: int32 zero points, each a scalar or an array of
        its operand's rank with size 1 on the contracting axes (per row, per channel...),
        or None when statically 0. With both None no row or column sums are computed.
    Returns:
      int32, ``lax.dot_general``'s output layout ``[*batch, *lhs_free, *rhs_free]``.
    """
    if lhs.dtype != jnp.int8 or rhs.dtype != jnp.int8:
        raise TypeError(f"int_dot_general: operands must be int8 codes, got {lhs.dtype} and {rhs.dtype}.")
    dims = canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
    acc = lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.int32)
    if lhs_zero_point is None and rhs_zero_point is None:
        return acc  # both zero points statically 0: the accumulator is the answer
    (lc, rc), _ = dims
    out = lambda p, side: to_output(p, side, dims, lhs.ndim, rhs.ndim)  # noqa: E731
    k = 1
    for a in lc:
        k *= lhs.shape[a]
    za = None if lhs_zero_point is None else out(jnp.asarray(lhs_zero_point, jnp.int32), "lhs")
    zb = None if rhs_zero_point is None else out(jnp.asarray(rhs_zero_point, jnp.int32), "rhs")
    if zb is not None:
        acc = acc - zb * out(jnp.sum(lhs, axis=lc, keepdims=True, dtype=jnp.int32), "lhs")
    if za is not None:
        acc = acc - za * out(jnp.sum(rhs, axis=rc, keepdims=True, dtype=jnp.int32), "rhs")
    if za is not None and zb is not None:
        acc = acc + jnp.int32(k) * za * zb
    return acc


def fp8_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
    """fp8 x fp8 -> float32 ``lax.dot_general`` (e4m3 or e5m2, the two may differ);
    products accumulated in float32, output in ``lax.dot_general``'s layout."""
    dims = canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
    return lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)
