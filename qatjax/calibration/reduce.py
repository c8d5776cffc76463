"""Combining observer states: :func:`merge` two of them, :func:`all_reduce` across devices.

Both are exact for ``MinMaxState`` (min / max of the ranges, sum of the non-finite
counts) and ``HistogramState`` (common range ``max`` of the exponents, counts brought
to it by exact pair merges, then summed, saturating at ``2**31 - 1``): the result is
bit for bit the state of one observer that saw all the data, in any order.

A ``MovingAverageState`` cannot be combined exactly (the average depends on the
order of batches). ``merge`` and ``all_reduce`` average the estimates of the states
that have data (an equal-weight mean of ``lo`` and of ``hi``), keep the largest
``num_batches`` and sum the non-finite counts. For an exact multi-device moving
average pass ``axis_name`` to the observer's ``update`` instead, which reduces each
batch's min / max before the average.

``all_reduce`` uses ``lax.psum`` / ``pmin`` / ``pmax`` and so runs inside ``pmap``,
``shard_map`` (re-exported here as :data:`shard_map`, from ``jax.shard_map`` or
``jax.experimental.shard_map`` on older jax) or a named ``vmap``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax.numpy as jnp
from jax import lax

from qatjax.calibration.aligned_histogram import (
    HistogramState,
    rescale_counts,
    saturating_add,
    saturating_psum,
)
from qatjax.calibration.observers import MinMaxState, MovingAverageState

try:
    from jax import shard_map  # jax >= 0.7
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map

__all__ = ["all_reduce", "merge", "shard_map"]

State = Any


def merge(a: State, b: State) -> State:
    """Combines two states of the same observer (same type and shapes).

    ``MinMaxState`` and ``HistogramState``: exact, commutative and associative, equal
    to observing the concatenation of both data streams. ``MovingAverageState``: the
    mean of the estimates that have data (see the module docstring).

    Raises:
      TypeError / ValueError: naming ``b`` when it does not match ``a``.
    """
    _check_pair(a, b)
    if isinstance(a, MinMaxState):
        return MinMaxState(
            lo=jnp.minimum(a.lo, b.lo),
            hi=jnp.maximum(a.hi, b.hi),
            num_nonfinite=saturating_add(a.num_nonfinite, b.num_nonfinite),
        )
    if isinstance(a, HistogramState):
        exponent = jnp.maximum(a.exponent, b.exponent)
        counts = saturating_add(
            rescale_counts(a.counts, exponent - a.exponent, a.signed),
            rescale_counts(b.counts, exponent - b.exponent, b.signed),
        )
        return HistogramState(
            counts=counts,
            exponent=exponent,
            lo=jnp.minimum(a.lo, b.lo),
            hi=jnp.maximum(a.hi, b.hi),
            num_nonfinite=saturating_add(a.num_nonfinite, b.num_nonfinite),
            signed=a.signed,
        )
    has_a = a.num_batches > 0
    has_b = b.num_batches > 0
    both = has_a & has_b

    def mean(u, v):
        return jnp.where(both, (u + v) * 0.5, jnp.where(has_a, u, v))

    return MovingAverageState(
        lo=mean(a.lo, b.lo),
        hi=mean(a.hi, b.hi),
        num_batches=jnp.maximum(a.num_batches, b.num_batches),
        num_nonfinite=saturating_add(a.num_nonfinite, b.num_nonfinite),
    )


def all_reduce(state: State, axis_name: Hashable) -> State:
    """Reduces a state over the mapped axis ``axis_name``; every replica gets the result.

    * ``MinMaxState``: ``pmin(lo)``, ``pmax(hi)``, saturating ``psum(num_nonfinite)``.
    * ``HistogramState``: ``e = pmax(exponent)``; local counts brought to ``2**e`` by
      exact pair merges; saturating ``psum`` of the counts. Over 8 devices this equals,
      bit for bit, one observer updated with all devices' data.
    * ``MovingAverageState``: mean of ``lo`` and ``hi`` over the replicas with data
      (not exact; see the module docstring), ``pmax(num_batches)``, ``psum`` of the
      non-finite counts.
    """
    if isinstance(state, MinMaxState):
        return MinMaxState(
            lo=lax.pmin(state.lo, axis_name),
            hi=lax.pmax(state.hi, axis_name),
            num_nonfinite=saturating_psum(state.num_nonfinite, axis_name),
        )
    if isinstance(state, HistogramState):
        exponent = lax.pmax(state.exponent, axis_name)
        counts = rescale_counts(state.counts, exponent - state.exponent, state.signed)
        return HistogramState(
            counts=saturating_psum(counts, axis_name),
            exponent=exponent,
            lo=lax.pmin(state.lo, axis_name),
            hi=lax.pmax(state.hi, axis_name),
            num_nonfinite=saturating_psum(state.num_nonfinite, axis_name),
            signed=state.signed,
        )
    if isinstance(state, MovingAverageState):
        has = (state.num_batches > 0).astype(jnp.float32)
        replicas = jnp.maximum(lax.psum(has, axis_name), 1.0)
        return MovingAverageState(
            lo=lax.psum(jnp.where(has > 0, state.lo, 0.0), axis_name) / replicas,
            hi=lax.psum(jnp.where(has > 0, state.hi, 0.0), axis_name) / replicas,
            num_batches=lax.pmax(state.num_batches, axis_name),
            num_nonfinite=saturating_psum(state.num_nonfinite, axis_name),
        )
    raise TypeError(
        "all_reduce: `state` must be a MinMaxState, MovingAverageState or HistogramState, got "
        f"{type(state).__name__}."
    )


def _check_pair(a: State, b: State) -> None:
    kinds = (MinMaxState, MovingAverageState, HistogramState)
    if not isinstance(a, kinds):
        raise TypeError(
            "merge: `a` must be a MinMaxState, MovingAverageState or HistogramState, got "
            f"{type(a).__name__}."
        )
    if type(b) is not type(a):
        raise TypeError(f"merge: `b` is a {type(b).__name__} but `a` is a {type(a).__name__}.")
    if isinstance(a, HistogramState) and (a.signed != b.signed or a.counts.shape != b.counts.shape):
        raise ValueError(
            f"merge: `b` (signed={b.signed}, counts shape {b.counts.shape}) does not match `a` "
            f"(signed={a.signed}, counts shape {a.counts.shape})."
        )
    if jnp.shape(a.lo) != jnp.shape(b.lo):
        raise ValueError(f"merge: `b` has batch shape {jnp.shape(b.lo)}, `a` has {jnp.shape(a.lo)}.")
