"""Per-input-channel statistics of a contraction's input, for SmoothQuant, AWQ and GPTQ.

Three observers (``init`` / ``update`` pairs like the others of :mod:`.observers`) over an
input ``x [..., K]`` whose channel axis (``axis``, default the last: a Dense layer's
input features) is the contraction's; every other axis is a row (a token):

* :func:`channel_absmax`: ``amax_j = max_rows |x[:, j]|`` (SmoothQuant's ``max|X_j|``);
* :func:`channel_mean_abs`: ``sum_j = sum_rows |x[:, j]|`` and the row count
  (AWQ's ``mean|X_j|`` is :func:`mean_abs` ``= sum / count``);
* :func:`hessian`: ``S = sum_rows x^T x`` ``[K, K]`` (GPTQ's ``H = 2 S``, :func:`hessian_matrix`).

A row holding a NaN or an infinity is skipped by all three (it feeds none of the
statistics; a partial row would bias the Hessian) and counted in ``num_nonfinite``
(rows, not values). Updating with zero rows is a no-op.

Exact sums. ``max`` merges exactly, sums of floats do not: float addition is not
associative, so a float32 running sum depends on the batch order and on how the batches
are spread over devices (and float64 is off by default in JAX). The sums here are kept in
an :class:`ExactSum`: each batch contributes one float32 *addend* (its ``sum |x|`` per
channel, or its float32 product ``x_b^T x_b`` computed at the highest precision), and the
addends are summed without rounding in fixed-point integers. The binary expansion of
every addend is cut into bins of ``BIN_BITS = 16`` bits at fixed absolute positions
(``2**-149`` times multiples of ``2**16``); per entry the state keeps the ``LIMBS = 4``
bins below the *top bin* (the bin of the leading bit of the largest addend seen, a
``max``), each an int32 sum of the addends' 16-bit digits in that bin -- an exact
integer sum, without carries between bins, for up to ``MAX_TERMS = 32767`` addends.
A digit below the kept bins is dropped (for each addend alone, so a sum whose top bin
rises later drops exactly what it would have dropped had it been there from the start):
the result is a function of the *multiset* of addends only. Merging two states brings
both to the higher top bin (dropping whole bins) and adds the bins: so the state after
any order of updates, :func:`~qatjax.calibration.merge` or
:func:`~qatjax.calibration.all_reduce` over any split of the batches across devices is
bit for bit the state of one observer that saw the same batches. The kept digits span
at least 48 bits below the largest addend's leading bit (float64 has 53), and the
conversion to float32 (:func:`exact_sum_value`) is compensated: the float32 result is
within about one ulp of the exact sum of the addends.

Cross-device: ``update(state, x, axis_name=...)`` all-reduces each batch's statistics
(``pmax`` of the maxima, exact sums of the per-device addends, ``psum`` of counts) before
folding them in; states updated locally are combined afterwards with
:func:`qatjax.calibration.all_reduce` or :func:`qatjax.calibration.merge`. Both equal, bit
for bit, one observer updated with every device's batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.calibration.aligned_histogram import saturating_add, saturating_psum
from qatjax.calibration.observers import Observer

__all__ = [
    "BIN_BITS",
    "LIMBS",
    "MAX_TERMS",
    "ChannelAbsMaxState",
    "ChannelMeanAbsState",
    "ExactSum",
    "HessianState",
    "channel_absmax",
    "channel_mean_abs",
    "exact_sum_value",
    "hessian",
    "hessian_matrix",
    "mean_abs",
]

#: Bits per bin of an :class:`ExactSum`.
BIN_BITS = 16
#: Bins kept per entry of an :class:`ExactSum` (the top one and the three below it).
LIMBS = 4
#: Most addends an :class:`ExactSum` holds exactly: ``MAX_TERMS * (2**16 - 1) < 2**31``.
MAX_TERMS = 2**15 - 1

# The binary expansion of a float32 as an integer times 2**-149 (subnormals included)
# reaches bit 276, bin 17; a non-finite addend poisons its entry with this top bin.
_POISON_TOP = 1 << 20
_MASK = np.uint32(2**BIN_BITS - 1)


class ExactSum(NamedTuple):
    """An order-independent sum of float32 addends (see the module docstring).

    Attributes:
      top: int32, the entries' shape: index of the highest kept bin (at least
        ``LIMBS - 1``; ``_POISON_TOP`` once a non-finite addend was added: the value is NaN).
      limbs: int32 ``[LIMBS, *shape]``: ``limbs[k]`` is the sum of the addends' signed
        16-bit digits in bin ``top - k``; the value is
        ``sum_k limbs[k] * 2**(16 * (top - k) - 149)``.
      num_terms: int32 scalar: addends summed (at most ``MAX_TERMS`` for an exact sum).
    """

    top: jax.Array
    limbs: jax.Array
    num_terms: jax.Array


class ChannelAbsMaxState(NamedTuple):
    """Per-channel absolute maximum of the finite rows.

    Attributes:
      amax: float32 ``[K]``: ``max |x[:, j]|`` (0 before any data).
      num_rows: int32 scalar: rows folded in (saturating at ``2**31 - 1``).
      num_nonfinite: int32 scalar: rows skipped because they hold a NaN or an infinity.
    """

    amax: jax.Array
    num_rows: jax.Array
    num_nonfinite: jax.Array


class ChannelMeanAbsState(NamedTuple):
    """Per-channel sum of ``|x|`` over the finite rows, and their count.

    Attributes:
      abs_sum: :class:`ExactSum` of shape ``[K]`` (one addend per batch).
      num_rows: int32 scalar: rows folded in (saturating).
      num_nonfinite: int32 scalar: rows skipped.
    """

    abs_sum: ExactSum
    num_rows: jax.Array
    num_nonfinite: jax.Array


class HessianState(NamedTuple):
    """``sum x^T x`` over the finite rows (GPTQ's Hessian is twice it).

    Attributes:
      xtx: :class:`ExactSum` of shape ``[K, K]`` (one addend per batch: its float32 ``x^T x``).
      num_rows: int32 scalar: rows folded in (saturating).
      num_nonfinite: int32 scalar: rows skipped.
    """

    xtx: ExactSum
    num_rows: jax.Array
    num_nonfinite: jax.Array


CHANNEL_STATES = (ChannelAbsMaxState, ChannelMeanAbsState, HessianState)


# ----------------------------------------------------------------------------- observers


def _channel_observer(name: str, axis: int, state_type: type, zero: Callable[[int], Any],
                      step: Callable[..., Any]) -> Observer:
    """An observer over the channels on ``axis``: ``init`` gives ``state_type(zero(k), 0, 0)``
    for ``k`` channels; ``update`` checks the state's type, then applies ``step``."""
    _check_axis(axis, name)

    def init(x_like: Any):
        return state_type(zero(_num_channels(x_like, axis, name)), jnp.int32(0), jnp.int32(0))

    def update(state, x: jax.Array, *, axis_name: Hashable | None = None):
        _check_state(state, state_type, name)
        return step(state, x, axis=axis, axis_name=axis_name)

    return Observer(init, update)


def channel_absmax(axis: int = -1) -> Observer:
    """Observer of ``amax_j = max |x[..., j]|`` over the finite rows (SmoothQuant's statistic).

    Args:
      axis: the channel axis of the inputs (a Dense layer's input features: -1).
    Returns:
      An :class:`~qatjax.calibration.Observer` whose state is a :class:`ChannelAbsMaxState`;
      ``init(x_like)`` reads the number of channels from ``x_like.shape[axis]``.
    """
    return _channel_observer("channel_absmax", axis, ChannelAbsMaxState,
                             lambda k: jnp.zeros((k,), jnp.float32), _absmax_update)


def channel_mean_abs(axis: int = -1) -> Observer:
    """Observer of ``sum_j = sum |x[..., j]|`` and the row count over the finite rows (AWQ's
    statistic: :func:`mean_abs` gives ``sum / count``). The sum is an :class:`ExactSum`, so
    merging is exact.

    Args:
      axis: the channel axis of the inputs (-1 for a Dense layer).
    Returns:
      An :class:`~qatjax.calibration.Observer` whose state is a :class:`ChannelMeanAbsState`.
    """
    return _channel_observer("channel_mean_abs", axis, ChannelMeanAbsState,
                             lambda k: _exact_zero((k,)), _mean_abs_update)


def hessian(axis: int = -1) -> Observer:
    """Observer of ``S = sum_rows x^T x`` ``[K, K]`` over the finite rows (GPTQ's Hessian is
    ``H = 2 S``: :func:`hessian_matrix`). Each batch adds its float32 ``x_b^T x_b``
    (``lax.Precision.HIGHEST``) to an :class:`ExactSum`: the state is the exact sum of the
    per-batch products, whatever their order and device split (see the module docstring).

    Memory: ``(LIMBS + 1) * K * K`` int32 (5x a float32 ``[K, K]``). At most ``MAX_TERMS``
    (32767) batches in all devices together.

    Args:
      axis: the channel axis of the inputs (-1 for a Dense layer).
    Returns:
      An :class:`~qatjax.calibration.Observer` whose state is a :class:`HessianState`.
    """
    return _channel_observer("hessian", axis, HessianState, lambda k: _exact_zero((k, k)),
                             _hessian_update)


# ----------------------------------------------------------------------------- finalizers


def exact_sum_value(s: ExactSum) -> jax.Array:
    """The float32 value of an :class:`ExactSum`, within about one ulp of the exact sum of
    its addends (the bins are split into exact 16-bit pieces and summed from the smallest
    with Neumaier's compensation). NaN where a non-finite addend was added, or where more
    than ``MAX_TERMS`` addends may have overflowed the int32 bins."""
    lo = (s.limbs & 0xFFFF).astype(jnp.float32)  # exact 16-bit pieces
    hi = (s.limbs >> 16).astype(jnp.float32)     # arithmetic shift: signed, |hi| < 2**15
    total = jnp.zeros(s.top.shape, jnp.float32)
    comp = jnp.zeros(s.top.shape, jnp.float32)
    for k in reversed(range(LIMBS)):  # value / 2**(16 top - 149) = sum_k limbs[k] 2**(-16 k)
        for piece, shift in ((lo[k], -BIN_BITS * k), (hi[k], BIN_BITS * (1 - k))):
            term = piece * np.float32(2.0**shift)
            new = total + term
            comp = comp + jnp.where(jnp.abs(total) >= jnp.abs(term),
                                    (total - new) + term, (term - new) + total)
            total = new
    value = jnp.ldexp(total + comp, BIN_BITS * s.top - 149)
    bad = (s.top >= _POISON_TOP) | (s.num_terms > MAX_TERMS)
    return jnp.where(bad, jnp.nan, value)


def mean_abs(state: ChannelMeanAbsState) -> jax.Array:
    """AWQ's ``m_j = mean |x[:, j]|`` over the finite rows seen: float32 ``[K]`` (0 before
    any data). Raises a ValueError when a concrete state holds more than ``MAX_TERMS``
    batches (traced: NaN)."""
    _check_state(state, ChannelMeanAbsState, "mean_abs")
    _check_terms(state.abs_sum, "mean_abs")
    return _mean_abs(state)


@jax.jit
def _mean_abs(state: ChannelMeanAbsState) -> jax.Array:
    return exact_sum_value(state.abs_sum) / jnp.maximum(state.num_rows, 1).astype(jnp.float32)


def hessian_matrix(state: HessianState) -> jax.Array:
    """GPTQ's ``H = 2 X^T X``: float32 ``[K, K]``, from the exact sum ``S``: ``S + S^T``
    (``2 S`` made exactly symmetric). GPTQ's result does not change when ``H`` is scaled by a positive factor
    (some implementations average it over the rows instead). Raises a ValueError when a
    concrete state holds more than ``MAX_TERMS`` batches (traced: NaN)."""
    _check_state(state, HessianState, "hessian_matrix")
    _check_terms(state.xtx, "hessian_matrix")
    return _hessian_matrix(state.xtx)


@jax.jit
def _hessian_matrix(xtx: ExactSum) -> jax.Array:
    s = exact_sum_value(xtx)
    return s + s.T  # 2 S, exactly symmetric (a float32 x^T x need not be)


# ----------------------------------------------------------------------------- reduction


def all_reduce_channel_stats(state: Any, axis_name: Hashable) -> Any:
    """Exact :func:`~qatjax.calibration.all_reduce` of a channel observer's state (``merge``
    runs it over a stacking axis): ``pmax`` of the maxima, exact sums, saturating ``psum`` of
    the counts."""
    rows = saturating_psum(state.num_rows, axis_name)
    bad = saturating_psum(state.num_nonfinite, axis_name)
    if isinstance(state, ChannelAbsMaxState):
        return ChannelAbsMaxState(lax.pmax(state.amax, axis_name), rows, bad)
    return type(state)(_exact_psum(state[0], axis_name), rows, bad)


# ----------------------------------------------------------------------------- exact sums


def _exact_zero(shape: tuple[int, ...]) -> ExactSum:
    return ExactSum(jnp.full(shape, LIMBS - 1, jnp.int32),
                    jnp.zeros((LIMBS,) + shape, jnp.int32), jnp.int32(0))


def _split_float(v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(m, e0, top)`` with ``|v| = m * 2**(e0 - 149)`` (``m`` uint32, 24 bits) and ``top``
    the bin of ``v``'s leading bit (``_POISON_TOP`` for a NaN or an infinity)."""
    bits = lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
    biased = ((bits >> 23) & np.uint32(0xFF)).astype(jnp.int32)
    frac = bits & np.uint32(0x7FFFFF)
    mantissa = jnp.where(biased > 0, frac | np.uint32(0x800000), frac)
    e0 = jnp.maximum(biased, 1) - 1
    top = jnp.maximum((e0 + 23) // BIN_BITS, LIMBS - 1)
    return mantissa, e0, jnp.where(jnp.isfinite(v), top, _POISON_TOP)


def _digits(v: jax.Array, mantissa: jax.Array, e0: jax.Array, top: jax.Array) -> jax.Array:
    """int32 ``[LIMBS, *v.shape]``: the signed 16-bit digits of ``v`` in the bins ``top - k``
    (``top`` at least ``v``'s own top bin: nothing lies above)."""
    negative = v < 0
    limbs = []
    for k in range(LIMBS):
        shift = e0 - BIN_BITS * (top - k)  # where m's lowest bit falls in bin top - k
        left = lax.shift_left(mantissa, jnp.clip(shift, 0, 31).astype(jnp.uint32))
        right = lax.shift_right_logical(mantissa, jnp.clip(-shift, 0, 31).astype(jnp.uint32))
        digit = (jnp.where(shift >= 0, left, right) & _MASK).astype(jnp.int32)
        limbs.append(jnp.where(negative, -digit, digit))
    return jnp.stack(limbs)


def _exact_of(v: jax.Array) -> ExactSum:
    """The :class:`ExactSum` of one float32 addend per entry."""
    mantissa, e0, top = _split_float(v)
    return ExactSum(top, _digits(v, mantissa, e0, top), jnp.int32(1))


def _exact_add_value(s: ExactSum, v: jax.Array) -> ExactSum:
    """``s`` plus one float32 addend per entry (the addend's digits taken directly at the
    common top bin: the same as ``_exact_add(s, _exact_of(v))``, with one shift less)."""
    mantissa, e0, v_top = _split_float(v)
    top = jnp.maximum(s.top, v_top)
    return ExactSum(top, _exact_shift(s, top) + _digits(v, mantissa, e0, top),
                    saturating_add(s.num_terms, jnp.int32(1)))


def _exact_shift(s: ExactSum, top: jax.Array) -> jax.Array:
    """``s.limbs`` brought to the top bins ``top >= s.top`` (the bins that fall below the
    kept ones are dropped whole)."""
    d = top - s.top
    return jnp.stack([
        sum(jnp.where(d == k - j, s.limbs[j], 0) for j in range(k + 1)) for k in range(LIMBS)])


def _exact_add(a: ExactSum, b: ExactSum) -> ExactSum:
    top = jnp.maximum(a.top, b.top)
    return ExactSum(top, _exact_shift(a, top) + _exact_shift(b, top),
                    saturating_add(a.num_terms, b.num_terms))


def _exact_psum(s: ExactSum, axis_name: Hashable) -> ExactSum:
    top = lax.pmax(s.top, axis_name)
    return ExactSum(top, lax.psum(_exact_shift(s, top), axis_name),
                    saturating_psum(s.num_terms, axis_name))


def _check_terms(s: ExactSum, fn: str) -> None:
    if not isinstance(s.num_terms, jax.core.Tracer) and int(s.num_terms) > MAX_TERMS:
        raise ValueError(f"{fn}: the state summed {int(s.num_terms)} batches; exact sums hold at "
                         f"most {MAX_TERMS} (use larger batches).")


# ----------------------------------------------------------------------------- updates


def _rows(x: Any, axis: int, k: int, fn: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(rows [R, K] float32 with the non-finite rows zeroed, finite [R] bool, R)``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: `x` must be a floating array, got dtype {x.dtype}.")
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{fn}: `axis`={axis} is out of range for `x` of shape {x.shape}.")
    if x.shape[axis] != k:
        raise ValueError(f"{fn}: `x` of shape {x.shape} has {x.shape[axis]} channels on axis "
                         f"{axis}; the state has {k}.")
    rows = jnp.moveaxis(x, axis, -1).reshape(-1, k).astype(jnp.float32)
    if rows.shape[0] >= 2**31:
        raise ValueError(f"{fn}: `x` has {rows.shape[0]} rows; one update takes fewer than 2**31.")
    finite = jnp.all(jnp.isfinite(rows), axis=1)
    return jnp.where(finite[:, None], rows, 0.0), finite, rows.shape[0]


def _counts(finite: jax.Array, axis_name):
    ok = jnp.sum(finite, dtype=jnp.int32)
    bad = jnp.int32(finite.shape[0]) - ok
    if axis_name is not None:
        ok, bad = saturating_psum(ok, axis_name), saturating_psum(bad, axis_name)
    return ok, bad


@functools.partial(jax.jit, static_argnames=("axis", "axis_name"))
def _absmax_update(state: ChannelAbsMaxState, x, axis, axis_name) -> ChannelAbsMaxState:
    rows, finite, n = _rows(x, axis, state.amax.shape[0], "channel_absmax")
    if n == 0:
        return state
    amax = jnp.max(jnp.abs(rows), axis=0)
    if axis_name is not None:
        amax = lax.pmax(amax, axis_name)
    ok, bad = _counts(finite, axis_name)
    return ChannelAbsMaxState(jnp.maximum(state.amax, amax), saturating_add(state.num_rows, ok),
                              saturating_add(state.num_nonfinite, bad))


def _fold(state, batch_sum: jax.Array, finite, axis_name):
    """The state of an exact-sum statistic after one batch's addend ``batch_sum``."""
    if axis_name is None:
        total = _exact_add_value(state[0], batch_sum)
    else:
        total = _exact_add(state[0], _exact_psum(_exact_of(batch_sum), axis_name))
    ok, bad = _counts(finite, axis_name)
    return type(state)(total, saturating_add(state.num_rows, ok),
                       saturating_add(state.num_nonfinite, bad))


@functools.partial(jax.jit, static_argnames=("axis", "axis_name"))
def _mean_abs_update(state: ChannelMeanAbsState, x, axis, axis_name) -> ChannelMeanAbsState:
    rows, finite, n = _rows(x, axis, state.abs_sum.top.shape[0], "channel_mean_abs")
    if n == 0:
        return state
    return _fold(state, jnp.sum(jnp.abs(rows), axis=0), finite, axis_name)


@functools.partial(jax.jit, static_argnames=("axis", "axis_name"))
def _hessian_update(state: HessianState, x, axis, axis_name) -> HessianState:
    rows, finite, n = _rows(x, axis, state.xtx.top.shape[0], "hessian")
    if n == 0:
        return state
    xtx = lax.dot_general(rows, rows, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
    return _fold(state, xtx, finite, axis_name)


# ----------------------------------------------------------------------------- checks


def _check_axis(axis: Any, fn: str) -> None:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{fn}: `axis` must be an int (the channel axis), got {axis!r}.")


def _num_channels(x_like: Any, axis: int, fn: str) -> int:
    shape = getattr(x_like, "shape", None)
    if shape is None or len(shape) == 0 or not -len(shape) <= axis < len(shape):
        raise ValueError(f"{fn}: `x_like` must be an array or jax.ShapeDtypeStruct with a channel "
                         f"axis {axis}, got {x_like!r}.")
    return int(shape[axis])


def _check_state(state: Any, cls: type, fn: str) -> None:
    if not isinstance(state, cls):
        raise TypeError(f"{fn}: `state` must be a {cls.__name__}, got {type(state).__name__}.")
