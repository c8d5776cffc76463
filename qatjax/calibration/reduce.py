"""Combining statistics: of two observers, of a whole model, across devices and processes.

One state (an observer's):

* :func:`all_reduce` ``(state, axis_name)``: across a mapped axis, inside ``pmap``,
  ``shard_map`` (re-exported here as :data:`shard_map`, from ``jax.shard_map`` or
  ``jax.experimental.shard_map`` on older jax) or a named ``vmap``; collectives
  ``lax.psum`` / ``pmin`` / ``pmax``.
* :func:`merge` ``(a, b)``: two states.

A whole statistics tree (a model's ``quant_stats``, ``fp8_meta``, or any pytree of them):

* :func:`all_reduce_tree`: :func:`all_reduce` of every state of the tree.
* :func:`merge_tree` ``(a, b)`` and :func:`merge_stacked` (the trees stacked on a leading
  axis: ``pmap`` outputs, ``shard_map`` outputs with ``out_specs=P(axis)``, gathers).
* :func:`reduce_across_processes`: each process's own statistics (any number of batches
  each) gathered with ``jax.experimental.multihost_utils.process_allgather`` and merged;
  every process gets the same result.

How each kind combines (the same rule for all five functions; merging is the collective
run over the stacking axis, so a merge equals the all-reduce of the same states):

* ``MinMaxState``: ``lo = min(lo_i)``, ``hi = max(hi_i)``, ``num_nonfinite = sum`` (saturating
  at ``2**31 - 1``). Exact.
* ``HistogramState``: ``exponent = max(exponent_i)``; each ``counts_i`` brought to it by
  exact pair merges, then summed (saturating); ``lo`` / ``hi`` / ``num_nonfinite`` as above.
  Exact: bit for bit the state of one observer that saw all the data, in any order.
* ``MovingAverageState``: cannot be combined exactly (the average depends on the order
  of batches). The result averages the estimates of the states that have data (an
  equal-weight mean of ``lo`` and of ``hi``), keeps the largest ``num_batches`` and sums the
  non-finite counts. For an exact multi-device moving average pass ``axis_name`` to the
  observer's ``update`` instead (reduces each batch's min / max before the average).
* ``ChannelAbsMaxState``, ``ChannelMeanAbsState``, ``HessianState`` (SmoothQuant, AWQ,
  GPTQ; :mod:`.channel_stats`): ``max`` of the maxima, exact sums, counts summed. Exact.
* A plain floating-point array is an amax statistic (fp8 delayed scaling's
  ``*_amax_history`` and ``*_scale`` in ``fp8_meta``): elementwise ``max``. For histories of
  replicas that stepped together entry ``t`` becomes the amax of step ``t`` over all data,
  what the ``axis_name`` path records; the scale, a non-decreasing function of the
  history's amax, becomes that of the merged history whenever every replica's history
  holds a positive amax (a replica whose data were all zeros keeps an older scale).

Other kinds are registered with :func:`register_reduction`; a tree holding a node of an
unregistered kind, or a non-float plain array, is refused (naming its path) rather than
combined wrongly.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.calibration.aligned_histogram import HistogramState, rescale_counts, saturating_psum
from qatjax.calibration.channel_stats import CHANNEL_STATES, all_reduce_channel_stats
from qatjax.calibration.observers import MinMaxState, MovingAverageState

try:
    from jax import shard_map  # jax >= 0.7
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map

__all__ = [
    "all_reduce",
    "all_reduce_tree",
    "merge",
    "merge_stacked",
    "merge_tree",
    "reduce_across_processes",
    "register_reduction",
    "shard_map",
]

State = Any
AxisName = Hashable
# The named axis merges reduce over (a vmap over the stacked states).
_STACK = "qatjax_merge"


def _minmax_all_reduce(state: MinMaxState, axis_name: AxisName) -> MinMaxState:
    return MinMaxState(
        lo=lax.pmin(state.lo, axis_name),
        hi=lax.pmax(state.hi, axis_name),
        num_nonfinite=saturating_psum(state.num_nonfinite, axis_name),
    )


def _histogram_all_reduce(state: HistogramState, axis_name: AxisName) -> HistogramState:
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


def _moving_average_all_reduce(state: MovingAverageState, axis_name: AxisName
                               ) -> MovingAverageState:
    has = (state.num_batches > 0).astype(jnp.float32)
    replicas = jnp.maximum(lax.psum(has, axis_name), 1.0)
    return MovingAverageState(
        lo=lax.psum(jnp.where(has > 0, state.lo, 0.0), axis_name) / replicas,
        hi=lax.psum(jnp.where(has > 0, state.hi, 0.0), axis_name) / replicas,
        num_batches=lax.pmax(state.num_batches, axis_name),
        num_nonfinite=saturating_psum(state.num_nonfinite, axis_name),
    )


# State kind -> its all-reduce over a mapped axis (merges run it over a stacking axis).
_REDUCTIONS: dict[type, Callable[[Any, AxisName], Any]] = {
    MinMaxState: _minmax_all_reduce,
    HistogramState: _histogram_all_reduce,
    MovingAverageState: _moving_average_all_reduce,
    **dict.fromkeys(CHANNEL_STATES, all_reduce_channel_stats),  # exact (channel_stats)
}


def register_reduction(kind: type, all_reduce_fn: Callable[[Any, AxisName], Any]) -> None:
    """Teaches :func:`all_reduce`, :func:`merge` and the tree functions a new state kind.

    Args:
      kind: the state's class (a pytree node type: NamedTuple, registered dataclass).
      all_reduce_fn: ``(state, axis_name) -> state``, built from ``lax`` collectives over
        ``axis_name``, every replica getting the combined state. Merges run it inside a
        ``vmap`` with a named axis, so it defines them too.
    Raises:
      TypeError: if ``kind`` is not a class or ``all_reduce_fn`` is not callable.
    """
    if not isinstance(kind, type):
        raise TypeError(f"register_reduction: `kind` must be a class, got {kind!r}.")
    if not callable(all_reduce_fn):
        raise TypeError("register_reduction: `all_reduce_fn` must be callable, got "
                        f"{all_reduce_fn!r}.")
    _REDUCTIONS[kind] = all_reduce_fn


def all_reduce(state: State, axis_name: AxisName) -> State:
    """Reduces one observer state over the mapped axis ``axis_name``; every replica gets
    the result (see the module docstring for each kind's rule).

    * ``MinMaxState``: ``pmin(lo)``, ``pmax(hi)``, saturating ``psum(num_nonfinite)``.
    * ``HistogramState``: ``e = pmax(exponent)``; local counts brought to ``2**e`` by
      exact pair merges; saturating ``psum`` of the counts. Over 8 devices this equals,
      bit for bit, one observer updated with all devices' data.
    * ``MovingAverageState``: mean of ``lo`` and ``hi`` over the replicas with data
      (not exact), ``pmax(num_batches)``, ``psum`` of the non-finite counts.

    Raises:
      TypeError: naming ``state`` when it is not of a known kind.
    """
    reduce = _REDUCTIONS.get(type(state))
    if reduce is None:
        raise TypeError(
            f"all_reduce: `state` must be one of {_kind_names()}, got {type(state).__name__}.")
    return reduce(state, axis_name)


def all_reduce_tree(tree: Any, axis_name: AxisName) -> Any:
    """:func:`all_reduce` of every statistic in ``tree`` over the mapped axis ``axis_name``
    (inside ``pmap`` / ``shard_map``): observer states by their kind's rule, plain float
    arrays (fp8 amax histories and scales) with ``pmax``.

    Use it on statistics each replica gathered locally (layers without ``axis_name``):
    ``all_reduce_tree(updates["quant_stats"], "data")``. States already reduced at every
    update (layers with ``axis_name``) must not be reduced again: summing identical
    histograms counts their data once per replica.

    Raises:
      TypeError: naming the path of a node of no known kind or a non-float array.
    """
    return _map_statistics(lambda s: _reduce_statistic(s, axis_name), tree, "all_reduce_tree")


def merge(a: State, b: State) -> State:
    """Combines two states of the same observer (same type and shapes).

    ``MinMaxState`` and ``HistogramState``: exact, commutative and associative, equal
    to observing the concatenation of both data streams. ``MovingAverageState``: the
    mean of the estimates that have data (see the module docstring).

    Raises:
      TypeError / ValueError: naming ``b`` when it does not match ``a``.
    """
    _check_pair(a, b)
    return merge_stacked(jax.tree_util.tree_map(lambda u, v: jnp.stack([u, v]), a, b))


def merge_tree(a: Any, b: Any) -> Any:
    """Combines two statistics trees of the same structure (two models' ``quant_stats``, two
    processes' ``fp8_meta``) statistic by statistic, as :func:`merge` does.

    Raises:
      ValueError: naming ``b`` when its structure or a shape differs from ``a``'s.
      TypeError: naming the path of a node of no known kind or a non-float array.
    """
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    if ta != tb:
        raise ValueError(f"merge_tree: `b` has structure {tb}, `a` has {ta}.")
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        if jnp.shape(u) != jnp.shape(v):
            raise ValueError(f"merge_tree: `b` at {jax.tree_util.keystr(path)} has shape "
                             f"{jnp.shape(v)}, `a` has {jnp.shape(u)}.")
    return merge_stacked(jax.tree_util.tree_map(lambda u, v: jnp.stack([u, v]), a, b))


def merge_stacked(tree: Any) -> Any:
    """Merges ``n`` statistics trees stacked along a leading axis into one.

    Every array of ``tree`` has a leading axis of size ``n`` (replica ``i``'s value at index
    ``i``): the output of ``jax.pmap``, of ``shard_map`` with ``out_specs=P(axis)``, of
    ``process_allgather``. The result (without that axis) is :func:`all_reduce_tree` over
    the ``n`` replicas, computed as that collective over a named ``vmap`` axis.

    Raises:
      ValueError: if the arrays have no common leading axis.
      TypeError: naming the path of a node of no known kind or a non-float array.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) > 1 or None in sizes:
        raise ValueError("merge_stacked: every array of `tree` must have the same leading "
                         f"(stacking) axis; leading sizes found: {sorted(map(str, sizes))}.")
    _map_statistics(lambda s: s, tree, "merge_stacked")  # validate before tracing
    return _merge_stacked(tree)


@jax.jit
def _merge_stacked(tree: Any) -> Any:
    reduced = jax.vmap(lambda t: all_reduce_tree(t, _STACK), axis_name=_STACK)(tree)
    return jax.tree_util.tree_map(lambda leaf: leaf[0], reduced)


def reduce_across_processes(tree: Any) -> Any:
    """Combines each process's statistics into the global ones, on every process.

    Each process passes its own ``tree`` (same structure, shapes and dtypes everywhere;
    the statistics of any number of batches, also none). The arrays are gathered with
    ``jax.experimental.multihost_utils.process_allgather`` (one gather per dtype: the
    leaves are packed into one flat buffer each) and combined with :func:`merge_stacked`,
    so every process gets the same tree: for histograms and min / max, bit for bit the
    statistics of one observer that saw every process's data. On one process it returns
    the statistics unchanged. Call it from every process (it is a collective).

    Args:
      tree: this process's statistics, as host or fully addressable (process-local) arrays.
    Returns:
      The combined tree (arrays on this process's default device).
    Raises:
      ValueError: if ``tree`` holds global arrays spanning processes (they are already
        global: reducing them again would count every replica's data once per process), or
        if the trees differ across processes (structure, shapes or dtypes).
      TypeError: naming the path of a node of no known kind or a non-float array.
    """
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(
                f"reduce_across_processes: `tree` at {jax.tree_util.keystr(path)} is a global "
                "array spanning processes: it is already reduced (e.g. by calibrate(mesh=...)); "
                "pass each process's own statistics.")
    _map_statistics(lambda s: s, tree, "reduce_across_processes")
    host = [np.asarray(leaf) for leaf in leaves]
    signature = repr((treedef, [(a.shape, a.dtype.str) for a in host]))
    fingerprint = np.array([zlib.crc32(signature.encode()) & 0x7FFFFFFF], np.int32)
    seen = np.asarray(multihost_utils.process_allgather(fingerprint))
    if not np.all(seen == seen[0]):
        raise ValueError("reduce_across_processes: `tree` differs across processes (structure, "
                         "shapes or dtypes); every process must pass the statistics of the same "
                         "model.")
    dtypes = sorted({a.dtype.str for a in host})
    packed = {d: np.concatenate([a.ravel() for a in host if a.dtype.str == d] or
                                [np.zeros((0,), d)]) for d in dtypes}
    gathered = multihost_utils.process_allgather(packed)  # {dtype: [processes, total]}
    offsets = dict.fromkeys(dtypes, 0)
    stacked = []
    for a in host:
        d = a.dtype.str
        stacked.append(gathered[d][:, offsets[d]:offsets[d] + a.size].reshape((-1,) + a.shape))
        offsets[d] += a.size
    return merge_stacked(jax.tree_util.tree_unflatten(treedef, stacked))


# ----------------------------------------------------------------------------- internals


def _kind_names() -> str:
    return ", ".join(k.__name__ for k in _REDUCTIONS)


def _is_container(node: Any) -> bool:
    """Plain containers the tree functions walk through (NamedTuples are states, not these)."""
    if isinstance(node, Mapping) or node is None:
        return True
    return type(node) in (list, tuple)


def _map_statistics(fn: Callable[[Any], Any], tree: Any, where: str) -> Any:
    """``fn`` of every statistic of ``tree`` (registered state or plain float array); raises
    on anything else, naming its path."""

    def is_statistic(node):
        return type(node) in _REDUCTIONS or not _is_container(node)

    def visit(path, node):
        if type(node) not in _REDUCTIONS:
            dtype = getattr(node, "dtype", None)
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                what = (f"an array of dtype {dtype}" if dtype is not None
                        else f"a {type(node).__name__}")
                raise TypeError(
                    f"{where}: `tree` at {jax.tree_util.keystr(path) or '<root>'} is {what}: not a "
                    f"statistic ({_kind_names()}, or a float array of amaxes); register new state "
                    "kinds with qatjax.calibration.register_reduction.")
        return fn(node)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_statistic)


def _reduce_statistic(node: Any, axis_name: AxisName) -> Any:
    reduce = _REDUCTIONS.get(type(node))
    return reduce(node, axis_name) if reduce is not None else lax.pmax(node, axis_name)


def _check_pair(a: State, b: State) -> None:
    if type(a) not in _REDUCTIONS:
        raise TypeError(f"merge: `a` must be one of {_kind_names()}, got {type(a).__name__}.")
    if type(b) is not type(a):
        raise TypeError(f"merge: `b` is a {type(b).__name__} but `a` is a {type(a).__name__}.")
    if isinstance(a, HistogramState) and (a.signed != b.signed or a.counts.shape != b.counts.shape):
        raise ValueError(
            f"merge: `b` (signed={b.signed}, counts shape {b.counts.shape}) does not match `a` "
            f"(signed={a.signed}, counts shape {a.counts.shape})."
        )
    shapes_a = [jnp.shape(u) for u in jax.tree_util.tree_leaves(a)]
    shapes_b = [jnp.shape(v) for v in jax.tree_util.tree_leaves(b)]
    if shapes_a != shapes_b:
        raise ValueError(f"merge: `b` does not have `a`'s batch shape: its arrays have shapes "
                         f"{shapes_b}, `a`'s {shapes_a}.")
