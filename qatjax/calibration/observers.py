"""Observers: pure ``(init, update)`` pairs that accumulate calibration statistics.

Like an optax ``GradientTransformation``, an :class:`Observer` is a NamedTuple of
two pure functions::

    obs = qatjax.calibration.histogram(2048)
    state = obs.init(x_like)          # a pytree of fixed-shape arrays
    state = obs.update(state, x)      # returns a new state

States have fixed shapes and dtypes, so they work under ``jit``, as ``lax.scan``
carries, in Flax variable collections, and batched with ``vmap`` (one state per
channel). Every observer skips NaN and +-Inf and counts them in
``state.num_nonfinite``; updating with an empty array is a no-op.

Granularity: ``keep_axes=None`` (default) keeps per-tensor statistics with scalar
state fields; ``keep_axes=a`` (int or tuple) keeps one set of statistics per index
of those axes, with keepdims-shaped fields (size 1 on reduced axes), so the
:class:`~qatjax.QParams` estimated from them broadcast against ``x``.

Statistics are computed in float32 (other real dtypes are converted); XLA backends
flush subnormal values to zero, so a subnormal may be seen as 0.

Cross-device: ``update(state, x, axis_name=name)`` reduces the batch statistics over
the mapped axis ``name`` (``pmap``/``shard_map``/``vmap`` axis) before folding them in,
so all replicas end with the state of a single-device run on the global batch. For
states updated locally, :func:`qatjax.calibration.all_reduce` combines them afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.calibration.aligned_histogram import (
    HistogramState,
    check_num_bins,
    init_histogram,
    saturating_add,
    saturating_psum,
    update_histogram,
)
from qatjax.qparams import reduce_axes

__all__ = [
    "HistogramState",
    "MinMaxState",
    "MovingAverageState",
    "Observer",
    "has_data",
    "histogram",
    "minmax",
    "moving_average_minmax",
]

KeepAxes = int | Sequence[int] | None


class Observer(NamedTuple):
    """A pair of pure functions ``init(x_like) -> state`` and
    ``update(state, x, *, axis_name=None) -> state``."""

    init: Callable[[Any], Any]
    update: Callable[..., Any]


class MinMaxState(NamedTuple):
    """Running range of the finite values seen.

    Attributes:
      lo: float32, batch shape (``()`` or keepdims): running minimum; ``+inf`` before any data.
      hi: float32, batch shape: running maximum; ``-inf`` before any data.
      num_nonfinite: int32, batch shape: NaN/Inf values skipped (saturating at ``2**31 - 1``).
    """

    lo: jax.Array
    hi: jax.Array
    num_nonfinite: jax.Array


class MovingAverageState(NamedTuple):
    """Exponential moving averages of the batch minimum and maximum.

    Attributes:
      lo: float32, batch shape: averaged minimum (meaningless while ``num_batches == 0``).
      hi: float32, batch shape: averaged maximum.
      num_batches: int32, batch shape: batches with at least one finite value folded in.
      num_nonfinite: int32, batch shape: NaN/Inf values skipped (saturating).
    """

    lo: jax.Array
    hi: jax.Array
    num_batches: jax.Array
    num_nonfinite: jax.Array


def minmax(keep_axes: KeepAxes = None) -> Observer:
    """Observer of the running minimum and maximum (torch ``MinMaxObserver``).

    ``lo = min(lo, min(x))``, ``hi = max(hi, max(x))`` over the finite entries,
    reduced over every axis except ``keep_axes``.

    Args:
      keep_axes: ``None`` for per-tensor statistics, or the channel axis / axes to keep.
    Returns:
      An :class:`Observer` whose state is a :class:`MinMaxState`.
    """
    keep_axes = _check_keep_axes(keep_axes, "minmax")

    def init(x_like: Any = None) -> MinMaxState:
        shape = _batch_shape(x_like, keep_axes, "minmax")
        return MinMaxState(
            lo=jnp.full(shape, jnp.inf, jnp.float32),
            hi=jnp.full(shape, -jnp.inf, jnp.float32),
            num_nonfinite=jnp.zeros(shape, jnp.int32),
        )

    def update(
        state: MinMaxState, x: jax.Array, *, axis_name: Hashable | None = None
    ) -> MinMaxState:
        _check_state(state, MinMaxState, "minmax")
        return _minmax_update(state, x, keep_axes=keep_axes, axis_name=axis_name)

    return Observer(init, update)


def moving_average_minmax(momentum: float = 0.01, keep_axes: KeepAxes = None) -> Observer:
    """Observer of moving averages of the batch min and max (torch ``MovingAverageMinMaxObserver``).

    The first batch with finite values sets the range; each later one updates it as
    ``lo <- lo + momentum * (batch_lo - lo)`` and ``hi <- hi + momentum * (batch_hi - hi)``
    (``momentum`` is torch's ``averaging_constant``: the weight of the NEW batch, not
    the weight of the old value as in Flax's ``BatchNorm``). Batches without finite
    values (per channel) leave the averages unchanged.

    Cross-device: pass ``axis_name`` to ``update``; the batch min/max are then
    pmin/pmax-reduced before the average, which is exact: every replica holds the
    state of a single-device run on the global batch. :func:`all_reduce` of locally
    averaged states cannot be exact; it averages the replicas' estimates instead.

    Args:
      momentum: float in ``(0, 1]``, default 0.01 as in torch.
      keep_axes: ``None`` for per-tensor statistics, or the channel axis / axes to keep.
    Returns:
      An :class:`Observer` whose state is a :class:`MovingAverageState`.
    """
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (float, int, np.floating, np.integer))
        or not 0 < momentum <= 1
    ):
        raise ValueError(
            f"moving_average_minmax: `momentum` must be a float in (0, 1] (the weight of the new "
            f"batch), got {momentum!r}."
        )
    c = float(momentum)
    keep_axes = _check_keep_axes(keep_axes, "moving_average_minmax")

    def init(x_like: Any = None) -> MovingAverageState:
        shape = _batch_shape(x_like, keep_axes, "moving_average_minmax")
        return MovingAverageState(
            lo=jnp.zeros(shape, jnp.float32),
            hi=jnp.zeros(shape, jnp.float32),
            num_batches=jnp.zeros(shape, jnp.int32),
            num_nonfinite=jnp.zeros(shape, jnp.int32),
        )

    def update(
        state: MovingAverageState, x: jax.Array, *, axis_name: Hashable | None = None
    ) -> MovingAverageState:
        _check_state(state, MovingAverageState, "moving_average_minmax")
        return _moving_average_update(state, x, momentum=c, keep_axes=keep_axes, axis_name=axis_name)

    return Observer(init, update)


def histogram(num_bins: int = 2048, *, signed: bool = False, keep_axes: KeepAxes = None) -> Observer:
    """Observer of an exactly mergeable fixed-memory histogram (see :mod:`.aligned_histogram`).

    ``signed=False`` histograms ``|x|`` over ``[0, R]`` (for symmetric formats and
    NVIDIA's entropy / percentile / MSE calibration); ``signed=True`` histograms ``x``
    over ``[-R, R]`` with ``num_bins // 2`` bins per side (for affine formats).
    ``R = 2**k`` is the smallest power of two ``>= max|x|``; growing it merges bin
    pairs exactly, so the result is independent of batch order and device split.

    Memory is fixed: ``num_bins`` int32 counts per channel. Each bin saturates at
    ``2**31 - 1``; one ``update`` may see at most ``2**31 - 1`` values.

    Args:
      num_bins: power of two in ``[8, 32768]``; default 2048 as NVIDIA's calibrators.
      signed: histogram of ``x`` (affine formats) instead of ``|x|``.
      keep_axes: ``None`` for one histogram, or the channel axis / axes to keep (one
        histogram per channel, all binned by one flat ``bincount``; ``vmap`` of the
        per-tensor observer gives the same states, more slowly).
    Returns:
      An :class:`Observer` whose state is a :class:`HistogramState`.
    """
    if not isinstance(signed, (bool, np.bool_)):
        raise TypeError(f"histogram: `signed` must be a bool, got {signed!r}.")
    check_num_bins(num_bins)
    keep_axes = _check_keep_axes(keep_axes, "histogram")

    def init(x_like: Any = None) -> HistogramState:
        return init_histogram(_batch_shape(x_like, keep_axes, "histogram"), num_bins, bool(signed))

    def update(
        state: HistogramState, x: jax.Array, *, axis_name: Hashable | None = None
    ) -> HistogramState:
        _check_state(state, HistogramState, "histogram")
        if state.num_bins != num_bins or state.signed != bool(signed):
            raise ValueError(
                f"histogram: `state` has num_bins={state.num_bins}, signed={state.signed}; this "
                f"observer has num_bins={num_bins}, signed={bool(signed)}."
            )
        return _histogram_update(state, x, keep_axes=keep_axes, axis_name=axis_name)

    return Observer(init, update)


def has_data(state: MinMaxState | MovingAverageState | HistogramState) -> jax.Array:
    """bool array of the state's batch shape: whether any finite value was observed.

    Estimators on a state without data raise a ValueError when the state is concrete;
    under ``jit`` they fall back to a zero range (scale = float32 eps) and this flag
    tells which entries are real.
    """
    if isinstance(state, (MinMaxState, HistogramState)):
        return state.lo <= state.hi
    if isinstance(state, MovingAverageState):
        return state.num_batches > 0
    raise TypeError(
        "has_data: `state` must be a MinMaxState, MovingAverageState or HistogramState, got "
        f"{type(state).__name__}."
    )


# ----------------------------------------------------------------------------- updates
# Module-level jitted updates (static configuration), shared by all observer instances:
# eager calls compile once per shape, and inside an outer jit / pmap / shard_map they inline.


def _global_batch_range(x, state_shape, keep_axes, axis_name, fn):
    """The batch's finite ``(lo, hi, num_nonfinite)``, reduced over ``axis_name`` when given;
    None for an empty batch."""
    x, axes = _prepare(x, state_shape, keep_axes, fn)
    if x.size == 0:
        return None
    b_lo, b_hi, bad = _batch_range(x, axes, keep_axes is not None)
    if axis_name is not None:
        b_lo = lax.pmin(b_lo, axis_name)
        b_hi = lax.pmax(b_hi, axis_name)
        bad = saturating_psum(bad, axis_name)
    return b_lo, b_hi, bad


@functools.partial(jax.jit, static_argnames=("keep_axes", "axis_name"))
def _minmax_update(state: MinMaxState, x: jax.Array, keep_axes, axis_name) -> MinMaxState:
    batch = _global_batch_range(x, state.lo.shape, keep_axes, axis_name, "minmax")
    if batch is None:
        return state
    b_lo, b_hi, bad = batch
    return MinMaxState(
        lo=jnp.minimum(state.lo, b_lo),
        hi=jnp.maximum(state.hi, b_hi),
        num_nonfinite=saturating_add(state.num_nonfinite, bad),
    )


@functools.partial(jax.jit, static_argnames=("momentum", "keep_axes", "axis_name"))
def _moving_average_update(
    state: MovingAverageState, x: jax.Array, momentum, keep_axes, axis_name
) -> MovingAverageState:
    batch = _global_batch_range(x, state.lo.shape, keep_axes, axis_name, "moving_average_minmax")
    if batch is None:
        return state
    b_lo, b_hi, bad = batch
    seen = b_lo <= b_hi
    first = state.num_batches == 0
    lo = jnp.where(first, b_lo, state.lo + momentum * (b_lo - state.lo))
    hi = jnp.where(first, b_hi, state.hi + momentum * (b_hi - state.hi))
    return MovingAverageState(
        lo=jnp.where(seen, lo, state.lo),
        hi=jnp.where(seen, hi, state.hi),
        num_batches=state.num_batches + seen.astype(jnp.int32),
        num_nonfinite=saturating_add(state.num_nonfinite, bad),
    )


@functools.partial(jax.jit, static_argnames=("keep_axes", "axis_name"))
def _histogram_update(state: HistogramState, x: jax.Array, keep_axes, axis_name) -> HistogramState:
    batch = state.exponent.shape
    x, axes = _prepare(x, batch, keep_axes, "histogram")
    if x.size == 0:
        return state
    # One row per channel: kept axes first, reduced axes flattened.
    kept = [a for a in range(x.ndim) if a not in axes]
    rows = jnp.transpose(x, kept + list(axes)).reshape(int(np.prod([x.shape[a] for a in kept])), -1)
    if rows.shape[0] * (state.num_bins + 1) >= 2**31:
        raise ValueError(
            f"histogram: `x` has {rows.shape[0]} channels (keep_axes={keep_axes}); "
            "channels * (num_bins + 1) must stay below 2**31."
        )
    flat = jax.tree_util.tree_map(
        lambda leaf: leaf.reshape((rows.shape[0],) + leaf.shape[len(batch):]), state
    )
    new = update_histogram(flat, rows, axis_name)
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape(batch + leaf.shape[1:]), new)


# ----------------------------------------------------------------------------- internals


def _check_keep_axes(keep_axes: KeepAxes, fn: str) -> tuple[int, ...] | None:
    if keep_axes is None:
        return None
    axes = (keep_axes,) if isinstance(keep_axes, (int, np.integer)) else keep_axes
    try:
        axes = tuple(axes)
    except TypeError:
        axes = None
    if axes is None or not all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes
    ):
        raise TypeError(f"{fn}: `keep_axes` must be None, an int or a tuple of ints, got {keep_axes!r}.")
    return tuple(int(a) for a in axes)


def _batch_shape(x_like: Any, keep_axes: tuple[int, ...] | None, fn: str) -> tuple[int, ...]:
    """Per-tensor: ``()``. Per-channel: ``x``'s keepdims shape (1 on the reduced axes)."""
    if keep_axes is None:
        return ()
    if x_like is None or not hasattr(x_like, "shape"):
        raise ValueError(
            f"{fn}: per-channel observers (keep_axes={keep_axes}) need `x_like`, an array or "
            f"jax.ShapeDtypeStruct with the input's shape, got {x_like!r}."
        )
    shape = tuple(x_like.shape)
    axes = reduce_axes(len(shape), keep_axes)
    return tuple(1 if a in axes else n for a, n in enumerate(shape))


def _check_state(state: Any, cls: type, fn: str) -> None:
    if not isinstance(state, cls):
        raise TypeError(f"{fn}: `state` must be a {cls.__name__}, got {type(state).__name__}.")


def _prepare(
    x: Any, batch_shape: tuple[int, ...], keep_axes: tuple[int, ...] | None, fn: str
) -> tuple[jax.Array, tuple[int, ...]]:
    """Validates ``x`` against the state; returns ``(float32 x, axes to reduce)``."""
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{fn}: `x` must be a real (floating or integer) array, got dtype {x.dtype}.")
    if x.size >= 2**31:
        raise ValueError(
            f"{fn}: `x` has {x.size} elements; one update may count at most 2**31 - 1 values "
            "(int32 counts). Split the batch."
        )
    x = x.astype(jnp.float32)
    if keep_axes is None:
        return x, tuple(range(x.ndim))
    axes = reduce_axes(x.ndim, keep_axes)
    expected = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    if expected != tuple(batch_shape):
        raise ValueError(
            f"{fn}: `x` of shape {x.shape} gives per-channel statistics of shape {expected} "
            f"(keep_axes={keep_axes}), but the state has shape {tuple(batch_shape)}."
        )
    return x, axes


def _batch_range(
    x: jax.Array, axes: tuple[int, ...], keep: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lo, hi, num_nonfinite)`` of the finite entries over ``axes`` (keepdims shape when
    per-channel, scalars per tensor); ``lo = +inf``, ``hi = -inf`` where there are none.

    The plain reductions are fast; the masked ones run only (via ``cond``) when the
    plain ones show a NaN or infinity.
    """
    hi = jnp.max(x, axis=axes, keepdims=keep)
    # the barrier keeps XLA from fusing min and max into one (slow on CPU) multi-output loop
    x, hi = lax.optimization_barrier((x, hi))
    lo = jnp.min(x, axis=axes, keepdims=keep)

    def plain(x):
        return lo, hi, jnp.zeros_like(lo, dtype=jnp.int32)  # zeros_like keeps shard_map typing

    def masked(x):
        finite = jnp.isfinite(x)
        return (
            jnp.min(jnp.where(finite, x, jnp.inf), axis=axes, keepdims=keep),
            jnp.max(jnp.where(finite, x, -jnp.inf), axis=axes, keepdims=keep),
            jnp.sum(~finite, axis=axes, keepdims=keep, dtype=jnp.int32),
        )

    ok = jnp.all(jnp.isfinite(lo)) & jnp.all(jnp.isfinite(hi))
    return lax.cond(ok, plain, masked, x)
