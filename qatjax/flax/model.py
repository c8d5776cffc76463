"""Whole-model tools: calibrate, report, convert for serving, export and import weights.

They work on a Flax model whose quantized layers are :class:`~qatjax.flax.QatDense`
/ :class:`~qatjax.flax.QatConv`, and on its variables (a dict of collections).
Layers describe themselves in ``quant_params`` (``kernel_spec``, ``input_spec``), so
:func:`convert`, :func:`quant_report` and :func:`quantize_model_weights` need the
variables alone.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qatjax import calibration
from qatjax.fake_quant import used_zero_point
from qatjax.fp8 import Fp8Quantizer
from qatjax.flax import specs
from qatjax.flax.intercept import relative_error
from qatjax.flax.layers import _COMPARE, _FINALIZE, _QuantLayer, quant_mode
from qatjax.packing import pack_nibbles, unpack_nibbles
from qatjax.qdot import (ConvSpec, DotSpec, contracting_axes, decode_weight, encode_weight,
                         from_serving)
from qatjax.quantizers import WeightQuantizer
from qatjax.qparams import QParams

__all__ = [
    "calibrate",
    "finalize",
    "calibrate_model",
    "CalibrationReport",
    "LayerReport",
    "quant_report",
    "convert",
    "quantize_model_weights",
    "dequantize_weights",
]

Variables = Mapping[str, Any]


def _as_args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


def _merge(variables: Variables, updates: Mapping[str, Any]) -> dict:
    out = flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) else dict(variables)
    for col, tree in updates.items():
        out[col] = flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
    return out


def calibrate(
    model: nn.Module,
    variables: Variables,
    batches: Iterable[Any],
    *,
    progress: bool = False,
    reset: bool = True,
    apply_kwargs: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    data_axis: str | Sequence[str] | None = None,
    across_processes: bool = False,
) -> dict:
    """Runs ``model`` over ``batches`` in calibrate mode and fills ``quant_params``.

    Each batch is passed to ``model.apply`` as its positional arguments (a tuple is
    unpacked, anything else is the single input). Observers accumulate in
    ``quant_stats``; after the last batch every layer's estimator turns its statistics
    into scales and zero points (``quant_params``, or ``params`` for LSQ scales).

    Many devices and processes, three ways:

    * Globally sharded batches, no other argument: each step is one ``jit``, which splits
      the work over the devices the batch lives on; the statistics are those of the global
      batch (reductions over a sharded axis are global). Layers must not have an
      ``axis_name``. On many processes, build each batch with
      ``jax.make_array_from_process_local_data``.
    * ``mesh`` (and ``data_axis``): each step runs under ``shard_map`` over ``data_axis``
      (the other mesh axes stay automatic: kernels partitioned with ``nn.with_partitioning``
      keep their sharding), each device observing its block of the batch's leading axis.
      For layers created with ``axis_name=data_axis`` (data-parallel models): their
      observers reduce every batch's statistics over that axis, so every device holds the
      global statistics. A numpy batch is this process's part of the global batch
      (assembled with ``jax.make_array_from_process_local_data``); a ``jax.Array`` is the
      global batch, used as it is. Every process runs the same number of steps.
    * ``across_processes=True``: each process calibrates on its own batches (any number,
      also different numbers per process) on its own default device; the statistics are
      then combined with :func:`qatjax.calibration.reduce_across_processes` (gather, then
      exact merge) and finalized: every process gets the same parameters, for histogram
      and min / max observers bit for bit those of one process that saw all the batches
      (moving averages are averaged, see :mod:`qatjax.calibration.reduce`).

    Args:
      model: a Flax module containing qatjax layers.
      variables: its variables; a float checkpoint (``params`` only) is fine.
      batches: iterable of inputs (at least one).
      progress: show a tqdm progress bar.
      reset: start from empty statistics (drop existing ``quant_stats``).
      apply_kwargs: extra keyword arguments for ``model.apply`` (e.g. ``train=False``).
      mesh: a ``jax.sharding.Mesh`` to run each step under (see above).
      data_axis: the mesh axis (or tuple of axes) the batch is split over; defaults to the
        mesh's only axis.
      across_processes: reduce each process's statistics across processes (see above).
    Returns:
      A new variables dict with ``quant_stats`` and ``quant_params`` (and LSQ ``params``);
      with ``mesh``, global arrays replicated over the mesh.
    Raises:
      ValueError: if ``batches`` is empty, a layer observed no finite value, the model
        has no quantization state to calibrate (no qatjax layers; dynamic scales only),
        ``data_axis`` is not an axis of ``mesh``, or a layer with an activation observer
        does not reduce over ``data_axis``.
    """
    kwargs = dict(apply_kwargs or {})
    axes = data_axes(mesh, data_axis, across_processes, "calibrate")
    variables = dict(variables)
    if reset:
        variables.pop("quant_stats", None)
    step = _jitted_apply(model, "calibrate", ("quant_stats",), _freeze_kwargs(kwargs), mesh, axes)

    def observe(args: tuple) -> None:
        args = global_batch(args, mesh, axes)
        if "quant_stats" not in variables and mesh is None:
            empty = _empty_stats(model, variables, args, kwargs, step)
            if empty is not None:
                variables["quant_stats"] = empty
        variables["quant_stats"] = step(variables, args).get("quant_stats", {})

    last = for_each_batch(batches, observe, progress=progress)
    if across_processes:
        variables["quant_stats"] = calibration.reduce_across_processes(variables["quant_stats"])
    calibrated = finalize(model, variables, last, apply_kwargs=kwargs, mesh=mesh,
                          data_axis=data_axis)
    _check_quantized(calibrated, "calibrate")
    return calibrated


def data_axes(mesh: Mesh | None, data_axis: str | Sequence[str] | None,
              across_processes: bool, fn: str) -> tuple[str, ...] | None:
    """Validates the multi-device arguments of the model tools; returns the data axes as a
    tuple (None without a mesh).

    Raises:
      TypeError / ValueError: naming ``mesh``, ``data_axis`` or ``across_processes``.
    """
    if not isinstance(across_processes, (bool, np.bool_)):
        raise TypeError(f"{fn}: `across_processes` must be a bool, got {across_processes!r}.")
    if mesh is None:
        if data_axis is not None:
            raise ValueError(f"{fn}: `data_axis` ({data_axis!r}) needs a `mesh`.")
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{fn}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if across_processes:
        raise ValueError(f"{fn}: `mesh` and `across_processes` exclude each other: with a mesh "
                         "every step is already global; across_processes is for per-process "
                         "batches.")
    names = tuple(mesh.axis_names)
    if data_axis is None:
        if len(names) != 1:
            raise ValueError(f"{fn}: `data_axis` is needed with a mesh of several axes {names}: "
                             "name the axis (or axes) the batch is split over.")
        return names
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    if not axes or any(a not in names for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"{fn}: `data_axis` must name distinct axes of `mesh` {names}, got "
                         f"{data_axis!r}.")
    return axes


def _batch_spec(axes: tuple[str, ...]) -> P:
    """The batch's leading axis split over the data axes."""
    return P(axes[0] if len(axes) == 1 else axes)


def global_batch(args: tuple, mesh: Mesh | None, axes: tuple[str, ...] | None) -> tuple:
    """A step's arguments as global arrays over ``mesh``: a ``jax.Array`` is taken as the
    global value (resharded to be split on its leading axis over ``axes`` when it is not
    already), anything else as this process's block of it, split the same way
    (``jax.make_array_from_process_local_data``). Without a mesh: ``args``."""
    if mesh is None:
        return args
    sharding = NamedSharding(mesh, _batch_spec(axes))
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, sharding) if isinstance(a, jax.Array)
        else jax.make_array_from_process_local_data(sharding, np.asarray(a)), args)


def _axes_of(axis_name: Any) -> tuple | None:
    if axis_name is None:
        return None
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def check_layer_axes(path: str, config: Any, axis_name: Any, axes: tuple[str, ...], fn: str
                     ) -> None:
    """Refuses a layer whose activation observer would keep per-device statistics under a
    mesh: static activation scaling with an ``axis_name`` other than the data axes."""
    act = config.activation_quantizer()
    if act is not None and act.static and _axes_of(axis_name) != axes:
        raise ValueError(
            f"{fn}: with `mesh`, layer {path or '<root>'} must reduce its statistics over "
            f"`data_axis` {axes if len(axes) > 1 else axes[0]!r}, but has "
            f"axis_name={axis_name!r}: create its "
            "layers with that axis_name (QatDense(axis_name=...), quantize_model(axis_name=...)), "
            "or calibrate without `mesh` on globally sharded batches (jit then splits the work).")


def for_each_batch(batches: Iterable[Any], run: Callable[[tuple], None], *,
                   progress: bool = False) -> tuple:
    """Calls ``run(args)`` for every batch (a tuple is the call's arguments, anything else
    the single one), with a tqdm progress bar if asked; returns the last ``args``.

    Raises:
      ValueError: if ``batches`` yields nothing.
    """
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibrate", unit="batch")
    last = None
    for batch in iterator:
        last = _as_args(batch)
        run(last)
    if last is None:
        raise ValueError("calibrate: `batches` yielded no batch.")
    return last


def finalize(model: nn.Module, variables: Variables, sample: Any, *,
             apply_kwargs: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
             data_axis: str | Sequence[str] | None = None) -> dict:
    """Turns accumulated ``quant_stats`` into ``quant_params`` (the last step of :func:`calibrate`).

    Use it when the statistics were collected elsewhere, e.g. by ``mode="calibrate"``
    applies under ``pmap`` / ``shard_map`` with layers given an ``axis_name``, or
    combined with :func:`qatjax.calibration.reduce_across_processes`.

    Args:
      model: the Flax module.
      variables: its variables, with ``quant_stats``.
      sample: one input batch (a tuple is unpacked), used only to trace the model.
      apply_kwargs: extra keyword arguments for ``model.apply``.
      mesh, data_axis: run under ``shard_map`` over the mesh, as :func:`calibrate` does
        (needed when layers have an ``axis_name``).
    Returns:
      A new variables dict with ``quant_params`` (and LSQ ``params``) filled.
    """
    axes = data_axes(mesh, data_axis, False, "finalize")
    run = _jitted_apply(model, _FINALIZE, ("quant_params", "params"),
                        _freeze_kwargs(dict(apply_kwargs or {})), mesh, axes)
    _check_observed(variables.get("quant_stats", {}))
    return _merge(variables, run(dict(variables), global_batch(_as_args(sample), mesh, axes)))


def _local_value(a: Any) -> Any:
    """A global array replicated over processes as this process's copy (readable by numpy);
    anything else unchanged."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return a.addressable_data(0)
    return a


def _freeze_kwargs(kwargs: Mapping[str, Any]) -> tuple:
    return tuple(sorted(kwargs.items()))


# A pseudo-mode of _jitted_apply: the observers' empty states, from the model's init.
_EMPTY_STATS = "empty_stats"


def _empty_stats(model: nn.Module, variables: Mapping[str, Any], args: tuple,
                 kwargs: Mapping[str, Any], step: Callable) -> Any | None:
    """The observer states a calibrate-mode call creates before its first update.

    Read from the model's init, which XLA reduces to constants (compiled in a small fraction
    of the forward's time), so that every calibration step runs one compiled ``step`` -- not
    a first program without statistics and a second with them, each compiling the whole
    forward. None (the first step then creates the states) when the init needs more than a
    ``params`` key (other rngs, ``rngs`` among ``kwargs``) or creates other states than the
    step would (checked on the step's abstract output).
    """
    if "rngs" in kwargs:
        return None
    init = _jitted_apply(model, _EMPTY_STATS, (), _freeze_kwargs(kwargs))
    try:
        empty = init({}, args).get("quant_stats")
    except Exception:  # noqa: BLE001 -- any init failure: the first step creates the states
        return None
    created = jax.eval_shape(step, dict(variables), args).get("quant_stats")
    if empty is None or jax.tree_util.tree_structure(empty) != jax.tree_util.tree_structure(created):
        return None
    return empty


def _jitted_apply(model: nn.Module, mode: str, mutable: tuple[str, ...], kwargs: tuple,
                  mesh: Mesh | None = None, axes: tuple[str, ...] | None = None) -> Callable:
    """A jitted ``model.apply`` in ``mode`` returning the updated collections, cached per
    (model, mode, mutable, kwargs, mesh, axes) so repeated calibrations of one model compile
    once. With a ``mesh``, under ``shard_map`` over ``axes`` (see :func:`_make_jitted_apply`).

    Modules that cannot be hashed (an attribute such as a Hugging Face config, a dict or a
    list) are cached by identity for as long as they live (a weak reference: the cache
    keeps no module alive); unhashable ``kwargs`` values are not cached."""
    try:
        return _jitted_apply_by_value(model, mode, mutable, kwargs, mesh, axes)
    except TypeError:  # "Failed to hash Flax Module", or an unhashable kwargs value
        pass
    try:
        hash((mode, mutable, kwargs))
    except TypeError:
        return _make_jitted_apply(lambda: model, mode, mutable, kwargs, mesh, axes)
    entry = _APPLY_BY_ID.get(id(model))
    if entry is None or entry[0]() is not model:
        try:
            ref = weakref.ref(model, lambda _, key=id(model): _APPLY_BY_ID.pop(key, None))
        except TypeError:  # not weakly referenceable: compile per call
            return _make_jitted_apply(lambda: model, mode, mutable, kwargs, mesh, axes)
        entry = _APPLY_BY_ID[id(model)] = (ref, {})
    ref, runs = entry
    key = (mode, mutable, kwargs, mesh, axes)
    if key not in runs:
        runs[key] = _make_jitted_apply(ref, mode, mutable, kwargs, mesh, axes)
    return runs[key]


# id(module) -> (weak reference to it, {(mode, mutable, kwargs, mesh, axes): jitted apply}).
_APPLY_BY_ID: dict[int, tuple[weakref.ref, dict[tuple, Callable]]] = {}


def _make_jitted_apply(get_model: Callable[[], nn.Module], mode: str, mutable: tuple[str, ...],
                       kwargs: tuple, mesh: Mesh | None = None,
                       axes: tuple[str, ...] | None = None) -> Callable:
    """``run(variables, args)``; with a ``mesh``, under ``shard_map`` over ``axes`` (the other
    mesh axes automatic): variables replicated, ``args`` split on their leading axis, the
    updated collections replicated (layers reduce over ``axes``, which is checked)."""
    def apply(v, args):
        if mode == _EMPTY_STATS:  # v unused: only the states init creates, data-independent
            return {"quant_stats": get_model().init(jax.random.key(0), *args, **dict(kwargs)
                                                    ).get("quant_stats", {})}
        with quant_mode(mode):
            _, upd = get_model().apply(v, *args, mutable=list(mutable), **dict(kwargs))
        return upd

    if mesh is None:
        return jax.jit(apply)

    def check(next_fun, args, kw, context):
        module = context.module
        if isinstance(module, _QuantLayer) and context.method_name == "__call__":
            check_layer_axes(module.path_str(), module.config, module.axis_name, axes, "calibrate")
        return next_fun(*args, **kw)

    def checked_apply(v, args):
        with nn.intercept_methods(check):
            return apply(v, args)

    return jax.jit(calibration.shard_map(checked_apply, mesh=mesh,
                                         in_specs=(P(), _batch_spec(axes)), out_specs=P(),
                                         axis_names=set(axes)))


@functools.lru_cache(maxsize=64)
def _jitted_apply_by_value(model: nn.Module, mode: str, mutable: tuple[str, ...], kwargs: tuple,
                           mesh: Mesh | None, axes: tuple[str, ...] | None) -> Callable:
    return _make_jitted_apply(lambda: model, mode, mutable, kwargs, mesh, axes)


def _check_observed(stats: Mapping[str, Any], path: tuple[str, ...] = ()) -> None:
    """Raises if a layer's activation observer never saw a finite value (its estimate
    would be the traced fallback, a meaningless scale)."""
    for key, value in stats.items():
        if key == "input" and not isinstance(value, Mapping):
            observed = calibration.has_data(jax.tree_util.tree_map(_local_value, value))
            if isinstance(observed, jax.core.Tracer):
                continue  # under a trace: the estimators' documented fallback applies
            if not bool(np.all(np.asarray(observed))):
                raise ValueError(
                    f"calibrate: layer {'/'.join(path) or '<root>'} observed no finite input "
                    "values; feed it data (and check the batches for NaN / Inf).")
        elif isinstance(value, Mapping):
            _check_observed(value, path + (key,))


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One quantized layer: where it is, its formats and what calibration chose."""

    path: str
    weight_format: str
    weight_granularity: str
    weight_scale_min: float
    weight_scale_max: float
    input_format: str
    method: str
    input_scale: float | None
    input_zero_point: int | None
    input_amax: float | None
    saturation: float | None
    nonfinite_skipped: int | None
    output_error: float | None = None


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
    """Per-layer table of a model's quantization; ``str(report)`` prints it."""

    layers: tuple[LayerReport, ...]

    def __str__(self) -> str:
        head = ("layer", "weights", "w scale min..max", "input", "method", "in scale", "in zp",
                "in range", "saturated", "non-finite", "out err")
        rows = [head]
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        for r in self.layers:
            rows.append((
                r.path, f"{r.weight_format} {r.weight_granularity}",
                "-" if np.isnan(r.weight_scale_min) else f"{r.weight_scale_min:.3g}..{r.weight_scale_max:.3g}",
                r.input_format, r.method,
                fmt(r.input_scale, ".4g"), fmt(r.input_zero_point, "d"), fmt(r.input_amax, ".4g"),
                fmt(r.saturation, ".3%"), fmt(r.nonfinite_skipped, "d"), fmt(r.output_error, ".3%")))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _layers(variables: Variables) -> Iterable[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """Yields ``(path, quant_params of the layer)`` for every layer that describes itself."""
    def walk(tree, path):
        if isinstance(tree, Mapping):
            if "kernel_spec" in tree:
                yield path, tree
            for k, v in tree.items():
                if isinstance(v, Mapping):
                    yield from walk(v, path + (k,))
    yield from walk(variables.get("quant_params", {}), ())


def _check_quantized(variables: Any, fn: str) -> None:
    """Refuses what would make a model tool do nothing silently: a bare ``params`` tree, or
    variables without any quantization state (no qatjax layer ran on them)."""
    if not isinstance(variables, Mapping):
        raise TypeError(f"{fn}: `variables` must be the model's variables dict, got "
                        f"{type(variables).__name__}.")
    if "params" not in variables:
        raise ValueError(
            f"{fn}: `variables` has no 'params' collection (its keys: {sorted(map(str, variables))}); "
            "pass the whole variables dict (model.init / qatjax.calibrate), not variables['params'].")
    if not variables.get("quant_params") and not variables.get("quant_stats"):
        raise ValueError(
            f"{fn}: `variables` hold no quantization state (no 'quant_params' or 'quant_stats'): "
            "the model has no qatjax layers (QatDense, QatConv, ... or qatjax.flax.quantize_model), "
            "or the variables come from the float model (initialise the quantized model and "
            "calibrate it first), or every quantized contraction is one quantize_model "
            "intercepts (a custom layer's lax.dot_general / einsum) with a recipe that keeps no "
            "state (dynamic activation scales, weight-only): those quantize as they run, in "
            "train and infer mode, with nothing to calibrate or convert.")


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


_LAYER_COLLECTIONS = ("params", "quant_params", "quant_stats", "fp8_meta")


def _layer(variables: Variables, path: tuple[str, ...]) -> dict[str, Mapping[str, Any]]:
    """The layer's own entries in each collection (``{}`` where it has none), with
    partitioning metadata boxes (``nn.with_partitioning``) unboxed."""
    return {col: nn.meta.unbox(_get(variables.get(col, {}), path) or {}) for col in _LAYER_COLLECTIONS}


def _partitioned_like(kernel: Any, codes: jax.Array, serving: QParams, stack_ndim: int
                      ) -> tuple[Any, QParams]:
    """Carries a partitioned kernel's sharding names over to its codes and scales.

    Dense codes are ``[..., N, K]`` (the kernel's last two names swapped), conv codes keep
    the kernel's layout; per-channel scales take the output axis's name, per-group ones
    ``(out, None)``. Unpartitioned kernels and per-tensor scales stay plain arrays.
    """
    if not isinstance(kernel, nn.Partitioned):
        return codes, serving
    names = tuple(kernel.names)
    lead, out_name = names[:stack_ndim], names[-1]
    conv = codes.ndim - stack_ndim > 2
    codes_names = names if conv else lead + (names[-1], names[-2])

    def box(a, a_names):
        return dataclasses.replace(kernel, value=a, names=a_names)

    def box_param(a):
        extra = jnp.ndim(a) - stack_ndim
        return a if extra == 0 else box(a, lead + (out_name,) + (None,) * (extra - 1))

    return box(codes, codes_names), QParams(*(box_param(a) for a in serving))


def _slices(layer: Mapping[str, Mapping[str, Any]]) -> Iterable[tuple[tuple[int, ...], dict]]:
    """``(index, layer)`` for each layer of a stack made by ``nn.scan`` / ``nn.vmap`` (every
    variable with the same leading axes as ``kernel_spec``); one ``((), layer)`` otherwise."""
    stack = specs.stack_shape(layer["quant_params"]["kernel_spec"])
    if not stack:
        yield (), dict(layer)
        return
    for idx in np.ndindex(*stack):
        yield idx, jax.tree_util.tree_map(lambda a, idx=idx: a[idx], dict(layer))


def _stack(results: list, stack: tuple[int, ...]) -> Any:
    """Per-slice pytrees (in :func:`_slices` order) -> one pytree with ``stack`` leading axes."""
    if not stack:
        return results[0]
    return jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs).reshape(stack + jnp.shape(xs[0])), *results)


def _layout(qp_tree: Mapping[str, Any], conv: bool) -> DotSpec:
    """The static contraction a layer's descriptors describe (what the weight path needs:
    formats, symmetry, groups, dense or conv)."""
    fmt, _, group, sym = specs.parse_kernel_spec(qp_tree["kernel_spec"])
    in_fmt, in_sym, _, _ = specs.parse_input_spec(qp_tree["input_spec"])
    dims = None
    if "einsum_kernel_axes" in qp_tree:  # QatEinsum: the kernel's contracted axes (the weight
        # path needs only the rhs side of the contraction)
        axes = np.asarray(qp_tree["einsum_kernel_axes"])
        rc = tuple(int(a) for a in axes.reshape(-1, axes.shape[-1])[0]) if axes.size else ()
        dims = ((rc, rc), ((), ()))
    if conv and dims is None:
        return ConvSpec(in_fmt, fmt, in_sym, sym, group_size=group)
    return DotSpec(in_fmt, fmt, in_sym, sym, group_size=group, dimension_numbers=dims)


def _serving_weights(layer: Mapping[str, Mapping[str, Any]], name: str
                     ) -> tuple[jax.Array, QParams, DotSpec]:
    """One (unstacked) layer's kernel codes (serving layout), serving-form parameters and
    contraction spec, from the weight path train mode runs (:func:`qatjax.qdot.encode_weight`),
    or read back when already converted. ``name`` (the layer's path) is for error messages."""
    qp_tree, layer_params = layer["quant_params"], layer["params"]
    fmt, gran, group, sym = specs.parse_kernel_spec(qp_tree["kernel_spec"])
    if "kernel_codes" in qp_tree:
        codes = qp_tree["kernel_codes"]
        spec = _layout(qp_tree, codes.ndim > 2)
        return codes, QParams(qp_tree["kernel_scale"], qp_tree["kernel_zero_point"]), spec
    if "kernel" not in layer_params:
        raise ValueError(f"layer {name}: no params/kernel and no kernel_codes.")
    kernel = jnp.asarray(layer_params["kernel"])
    if "kernel_mask" in qp_tree:  # QatConv(mask=...): the kernel as the layer uses it
        kernel = kernel * jnp.asarray(qp_tree["kernel_mask"], kernel.dtype)
    if "dense_general_spec" in qp_tree:  # QatDenseGeneral: the dense [K, N] it stands for
        n_in, shape = specs.parse_dense_general_spec(qp_tree["dense_general_spec"])
        kernel = kernel.reshape(int(np.prod(shape[:n_in])), -1)
    spec = _layout(qp_tree, kernel.ndim > 2)
    fp8_scaling, margin = (specs.parse_fp8_spec(qp_tree["fp8_spec"]) if "fp8_spec" in qp_tree
                           else (None, 0))
    delayed_scale = None
    if fp8_scaling == "delayed":
        meta = layer["fp8_meta"]
        if "kernel_scale" not in meta:
            raise ValueError(f"layer {name}: delayed fp8 scaling state (fp8_meta) is missing.")
        delayed_scale = jnp.asarray(meta["kernel_scale"], jnp.float32)
    learned = None
    if "kernel_scale" in layer_params:  # LSQ-learned, stored in serving form
        scale = layer_params["kernel_scale"]
        learned = (scale, layer_params.get("kernel_zero_point", jnp.zeros_like(scale)))
    codes, serving = _codes_and_serving(kernel, learned, delayed_scale, spec=spec, gran=gran,
                                        fp8_scaling=fp8_scaling, margin=margin)
    return codes, serving, spec


@functools.partial(jax.jit, static_argnames=("spec", "gran", "fp8_scaling", "margin"))
def _codes_and_serving(kernel, learned, delayed_scale, *, spec, gran, fp8_scaling,
                       margin) -> tuple[jax.Array, QParams]:
    """Kernel codes and serving-form parameters, one compiled computation per layer kind."""
    fmt = spec.w_format
    if fp8_scaling == "delayed":  # the fp8 training recipe: one scale, from the history...
        w_qp = QParams(delayed_scale, jnp.zeros((), jnp.int32))
    elif fp8_scaling == "current":  # ... or from the current amax
        w_qp = Fp8Quantizer(fmt, "current", margin).qparams(None, kernel)
    elif learned is not None:
        w_qp = QParams(*(from_serving(a, spec, kernel.ndim) for a in learned))
    else:
        w_qp = WeightQuantizer(fmt, gran, spec.group_size, spec.w_symmetric).qparams(
            kernel, contracting_axes(spec, kernel.ndim))
    return encode_weight(kernel, w_qp, spec)


def _saturation(state: Any, lo: float, hi: float, signed: bool) -> tuple[float | None, int]:
    """Fraction of observed values outside ``[lo, hi]`` and the count of skipped non-finite
    values. Histogram states (also as restored dicts) count the bins whose center lies
    outside; other observers give None. ``signed``: the histogram is of ``x``, not ``|x|``."""
    get = (lambda k: state[k]) if isinstance(state, Mapping) else (lambda k: getattr(state, k))  # noqa: E731
    nonfinite = int(np.asarray(get("num_nonfinite")))
    try:
        counts = np.asarray(get("counts"), np.float64)
    except (KeyError, AttributeError):
        return None, nonfinite
    total = counts.sum()
    if total == 0:
        return 0.0, nonfinite
    n = counts.shape[-1]
    per_side = n // 2 if signed else n
    width = 2.0 ** (int(np.asarray(get("exponent"))) - int(np.log2(per_side)))
    if signed:
        centers = (np.arange(n) - per_side + 0.5) * width
        outside = (centers < lo) | (centers > hi)
    else:
        outside = (np.arange(n) + 0.5) * width > max(abs(lo), abs(hi))
    return float(counts[outside].sum() / total), nonfinite


def quant_report(variables: Variables, model: nn.Module | None = None, sample: Any = None, *,
                 apply_kwargs: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
                 data_axis: str | Sequence[str] | None = None) -> CalibrationReport:
    """The per-layer table of a model's quantization (calibrated, trained or converted).

    From the variables alone: formats, weight scales, the activation range and
    saturation, the fraction of the activation histogram's mass outside that range
    (histogram observers only). With ``model`` and a ``sample`` batch (a tuple is
    unpacked), also each quantized contraction's *output error*,
    ``||y_q - y_f||_2 / ||y_f||_2`` on that batch: every layer gets the float model's
    input and its quantized output (infer mode) is compared with its float output, so the
    error is the layer's own, not the sum of the errors upstream. Contractions that
    :func:`qatjax.flax.quantize_model` intercepts inside other modules (attention's
    einsums) get rows of their own: ``module/einsum0 lhs`` / ``rhs`` for calibrated operands,
    ``module/einsum0`` for dynamic ones. A low saturation rate does not
    mean a small error (clipped outliers can matter); the output error measures it.

    With ``mesh`` (and ``data_axis``), as :func:`calibrate`: the comparison runs under
    ``shard_map`` over the data axes (for layers with an ``axis_name``), and a layer's output
    error is the largest over the devices' blocks of ``sample``, the same on every process.
    """
    _check_quantized(variables, "quant_report")
    axes = data_axes(mesh, data_axis, False, "quant_report")
    errors = ({} if model is None
              else _output_errors(model, variables, sample, apply_kwargs, mesh, axes))
    return report_with_errors(variables, errors)


def report_with_errors(variables: Variables, errors: Mapping[str, float]) -> CalibrationReport:
    """:func:`quant_report`'s table with output errors measured elsewhere (by the NNX front
    end): ``errors`` maps a layer's or an intercepted contraction's path to its error."""
    _check_quantized(variables, "quant_report")
    variables = jax.tree_util.tree_map(_local_value, variables)
    errors = dict(errors)
    rows = []
    for path, _ in _layers(variables):
        for idx, layer in _slices(_layer(variables, path)):
            label = "/".join(path) + (f"[{','.join(map(str, idx))}]" if idx else "")
            rows.append(dataclasses.replace(_layer_report(label, layer),
                                            output_error=errors.pop(label, None)))
    reported = set()
    for label, row in _intercepted_rows(variables):
        op = label.rsplit(" ", 1)[0]
        reported.add(op)
        rows.append(dataclasses.replace(row, output_error=errors.get(op)))
    for label, error in errors.items():  # intercepted contractions with dynamic scales
        if label in reported:
            continue
        rows.append(LayerReport(label, "-", "", float("nan"), float("nan"), "-", "-", None, None,
                                None, None, None, error))
    return CalibrationReport(tuple(rows))


def _input_range(in_fmt, scale, zp) -> tuple[float, float]:
    """The real range ``[lo, hi]`` the activation codes cover."""
    shift = 0 if zp is None else float(np.round(zp))
    return (float(in_fmt.qmin) - shift) * float(scale), (float(in_fmt.qmax) - shift) * float(scale)


def _input_row(label: str, in_fmt, in_sym: bool, method: str, scale, zp, stats) -> LayerReport:
    """A report row of one calibrated activation operand (no weights)."""
    lo, hi = _input_range(in_fmt, scale, zp)
    sat = nonfinite = None
    if stats is not None:
        sat, nonfinite = _saturation(stats, lo, hi, signed=not in_sym)
    return LayerReport(label, "-", "", float("nan"), float("nan"), in_fmt.name, method,
                       float(scale), None if zp is None else int(np.round(zp)),
                       max(abs(lo), abs(hi)), sat, nonfinite)


def _intercepted_rows(variables: Variables) -> Iterable[tuple[str, LayerReport]]:
    """Rows of the activation operands of contractions that quantize_model intercepts
    (``quant_params/<module>/{op}{i}_input_spec`` and ``_{lhs,rhs}_scale``), labelled
    ``"<module>/{op}{i} lhs"``."""
    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                yield from walk(value, path + (key,))
            elif key.endswith("_input_spec"):
                op = key[:-len("_input_spec")]
                in_fmt, in_sym, _, method = specs.parse_input_spec(value)
                stats = _get(variables.get("quant_stats", {}), path) or {}
                for side in ("lhs", "rhs"):
                    if f"{op}_{side}_scale" in tree:
                        label = "/".join(path + (op,)) + f" {side}"
                        yield label, _input_row(label, in_fmt, in_sym, method,
                                                tree[f"{op}_{side}_scale"],
                                                tree.get(f"{op}_{side}_zero_point"),
                                                stats.get(f"{op}_{side}"))
    yield from walk(variables.get("quant_params", {}), ())


def _output_errors(model: nn.Module, variables: Variables, sample: Any,
                   apply_kwargs: Mapping[str, Any] | None, mesh: Mesh | None = None,
                   axes: tuple[str, ...] | None = None) -> dict[str, float]:
    """``{layer or contraction path: output error}`` on ``sample`` (see :func:`quant_report`)."""
    if sample is None:
        raise ValueError("quant_report: `model` needs a `sample` batch to measure output errors.")

    if any("kernel_codes" in qp for _, qp in _layers(variables)):
        raise ValueError("quant_report: output errors need the float kernels; pass the variables "
                         "before qatjax.convert (or no `model`).")

    in_float_copy = [False]

    def compare(next_fun, args, kwargs, context):
        module = context.module
        if (in_float_copy[0] or not isinstance(module, _QuantLayer)
                or context.method_name != "__call__"):
            return next_fun(*args, **kwargs)
        with quant_mode("infer"):
            y = next_fun(*args, **kwargs)
        in_float_copy[0] = True
        try:
            with quant_mode("float"):  # the same layer, unbound, on the same input
                y_float = module.clone(parent=None).apply(module.variables, *args, **kwargs)
        finally:
            in_float_copy[0] = False
        module.sow("quant_report", "output_error", relative_error(y, y_float))
        return y_float

    def errors_of(v, args):
        with quant_mode(_COMPARE), nn.intercept_methods(compare):
            _, state = model.apply(v, *args, mutable=["quant_report"], **dict(apply_kwargs or {}))
        state = state.get("quant_report", {})
        # under a mesh: the worst device's block, on every device
        return state if mesh is None else jax.tree_util.tree_map(
            lambda e: jax.lax.pmax(e, axes), state)

    run = jax.jit(errors_of if mesh is None else calibration.shard_map(
        errors_of, mesh=mesh, in_specs=(P(), _batch_spec(axes)), out_specs=P(),
        axis_names=set(axes)))

    errors = {}

    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))
            else:  # sown values: a tuple of one error per call (shared layers are called more)
                where = path + ((key[:-len("_output_error")],) if key != "output_error" else ())
                errors["/".join(where)] = float(
                    np.max([np.asarray(_local_value(e)) for e in value]))

    walk(flax.core.unfreeze(run(dict(variables), global_batch(_as_args(sample), mesh, axes))), ())
    return errors


def _layer_report(label: str, layer: Mapping[str, Mapping[str, Any]]) -> LayerReport:
    """The report row of one (unstacked) layer."""
    qp_tree, layer_params, stats = layer["quant_params"], layer["params"], layer["quant_stats"]
    fmt, gran, group, _ = specs.parse_kernel_spec(qp_tree["kernel_spec"])
    in_fmt, in_sym, scaling, method = specs.parse_input_spec(qp_tree["input_spec"])
    w_scale_lo = w_scale_hi = float("nan")
    if fmt is not None:
        _, w_serving, _ = _serving_weights(layer, label)
        s = np.asarray(w_serving.scale)
        w_scale_lo, w_scale_hi = float(s.min()), float(s.max())
    scale = qp_tree.get("input_scale", layer_params.get("input_scale"))
    zp = qp_tree.get("input_zero_point", layer_params.get("input_zero_point"))
    amax = sat = nonfinite = None
    if scale is not None and in_fmt is not None:
        lo, hi = _input_range(in_fmt, scale, zp)
        amax = max(abs(lo), abs(hi))
        if "input" in stats:
            sat, nonfinite = _saturation(stats["input"], lo, hi, signed=not in_sym)
    return LayerReport(
        path=label,
        weight_format="float" if fmt is None else fmt.name,
        weight_granularity=gran if group is None else f"{gran}({group})",
        weight_scale_min=w_scale_lo, weight_scale_max=w_scale_hi,
        input_format="float" if in_fmt is None else in_fmt.name,
        method=(method if scaling == "static" else scaling) if in_fmt is not None else "-",
        input_scale=None if scale is None else float(scale),
        input_zero_point=None if zp is None else int(np.round(zp)),
        input_amax=amax, saturation=sat, nonfinite_skipped=nonfinite)


def calibrate_model(model: nn.Module, variables: Variables, batches: Iterable[Any],
                    **kwargs: Any) -> tuple[dict, CalibrationReport]:
    """:func:`calibrate` (same keyword arguments), then :func:`quant_report` with each
    layer's output error on the last calibration batch: ``(variables, report)``. With
    ``mesh`` the report runs under it too; with ``across_processes`` each process measures
    the errors on its own last batch."""
    seen = []

    def remember(it):
        for batch in it:
            seen[:] = [batch]
            yield batch

    variables = calibrate(model, variables, remember(batches), **kwargs)
    return variables, quant_report(variables, model, seen[0],
                                   apply_kwargs=kwargs.get("apply_kwargs"),
                                   mesh=kwargs.get("mesh"), data_axis=kwargs.get("data_axis"))


def convert(variables: Variables) -> dict:
    """Serving variables: integer / fp8 kernel codes and scales, no float kernels.

    For every qatjax layer, ``params/kernel`` (and LSQ ``kernel_scale``) is replaced by
    ``quant_params/kernel_codes`` (dense: ``[features, K]``, the layout both operands
    contract on their last axis; conv: the kernel's own layout), ``kernel_scale`` and
    ``kernel_zero_point`` (stored forms, see :mod:`qatjax.flax.specs`). Weight parameters
    are computed exactly as train mode computes them, so ``mode="infer"`` on the result
    equals train mode bit for bit. Layers stacked by ``nn.scan`` / ``nn.vmap`` (variables
    with leading layer axes) are converted layer by layer and stay stacked. ``quant_stats``
    is dropped; the input is not modified.

    Raises:
      ValueError: if a layer with static activation scaling was never calibrated, if
        ``variables`` is a bare ``params`` tree, or if it holds no quantization state.
    """
    _check_quantized(variables, "convert")
    out = jax.tree_util.tree_map(lambda a: a, flax.core.unfreeze(dict(variables)))
    out.pop("quant_stats", None)
    for path, qp_tree in list(_layers(variables)):
        fmt, _, _, _ = specs.parse_kernel_spec(qp_tree["kernel_spec"])
        in_fmt, _, scaling, _ = specs.parse_input_spec(qp_tree["input_spec"])
        layer_params = _get(out.get("params", {}), path) or {}
        if in_fmt is not None and scaling == "static" and "input_scale" not in qp_tree and "input_scale" not in layer_params:
            raise ValueError(f"convert: layer {'/'.join(path)} has no calibrated input_scale; "
                             "run qatjax.calibrate first.")
        if fmt is None or "kernel_codes" in qp_tree:
            continue
        label = "/".join(path)
        slices = [_serving_weights(layer, label)[:2] for _, layer in _slices(_layer(variables, path))]
        stack = specs.stack_shape(qp_tree["kernel_spec"])
        codes, w_serving = _partitioned_like(layer_params.get("kernel"), *_stack(slices, stack),
                                             len(stack))
        target = _get(out["quant_params"], path)
        target["kernel_codes"] = codes
        target["kernel_scale"], target["kernel_zero_point"] = w_serving
        for name in ("kernel", "kernel_scale", "kernel_zero_point"):
            layer_params.pop(name, None)
        # LSQ-learned input parameters move next to the codes, as the codes use them.
        for name in ("input_scale", "input_zero_point"):
            if name in layer_params:
                value = layer_params.pop(name)
                target[name] = (value if name == "input_scale"
                                else used_zero_point(value, in_fmt).astype(jnp.int32))
    return out


def quantize_model_weights(variables: Variables, *, pack: bool = True) -> dict:
    """Export: every qatjax layer's kernel as codes and scales, other parameters as they are.

    Returns a pytree of arrays only (so flax.serialization and orbax can save it):
    ``{"layers": {path: {"codes", "scale", "zero_point", "spec", "shape", "in_ndim", "packed"}},
    "params": <params without the quantized kernels>}``. Codes of formats of 4 bits or
    fewer are packed two per byte along the last axis when ``pack`` is True. ``shape``
    is the kernel's shape in the Flax layout (``[K, N]`` for dense), ``in_ndim`` how many
    of its leading axes are contracted (0: a convolution or an einsum kernel, whose codes keep
    its layout and whose contracted axes ``contracting`` lists), ``transposed`` whether the codes
    are the dense ``[N, K]`` (the layout of integer x integer and fp8 x fp8 layers; other
    dense layers, and convolutions, keep the kernel's layout, the dense ones as
    ``[K, N]``), ``spec`` the layer's ``kernel_spec``. Serving parameters are ``()``,
    ``[N]`` and, per group, ``[N, G]`` when transposed, else ``[G, N]``. Layers stacked by
    ``nn.scan`` / ``nn.vmap`` keep their leading axes on every entry. A layer smoothed by
    SmoothQuant / AWQ (``quant_params/input_smoothing`` ``s`` ``[K]``: its codes are those of
    ``diag(s) W`` and it divides its input by ``s``) also has ``"input_smoothing"``.
    """
    served = nn.meta.unbox(convert(variables))
    layers = {}
    for path, qp_tree in _layers(served):
        if "kernel_codes" not in qp_tree:
            continue
        fmt, _, _, _ = specs.parse_kernel_spec(qp_tree["kernel_spec"])
        codes = qp_tree["kernel_codes"]
        do_pack = pack and not fmt.is_float and fmt.bits <= 4
        stack = specs.stack_shape(qp_tree["kernel_spec"])
        layout = codes.shape[len(stack):]
        spec = _layout(qp_tree, len(layout) > 2)
        transposed = spec.serving_perm(len(layout)) == (1, 0)
        contracting = contracting_axes(spec, len(layout))  # in the kernel's (flat) layout
        if "dense_general_spec" in qp_tree:
            in_ndim, shape = specs.parse_dense_general_spec(qp_tree["dense_general_spec"])
        elif len(layout) > 2 or "einsum_kernel_axes" in qp_tree:  # conv / einsum kernels
            in_ndim, shape = 0, layout
        else:
            in_ndim, shape = 1, layout[::-1] if transposed else layout
        flax_shape = stack + shape
        layers["/".join(path)] = {
            "codes": pack_nibbles(codes) if do_pack else codes,
            "scale": qp_tree["kernel_scale"],
            "zero_point": qp_tree["kernel_zero_point"],
            "spec": qp_tree["kernel_spec"],
            "shape": jnp.asarray(flax_shape, jnp.int32),
            "in_ndim": jnp.asarray(in_ndim, jnp.int32),
            "transposed": jnp.asarray(transposed),
            "contracting": jnp.asarray(contracting, jnp.int32),
            "packed": jnp.asarray(do_pack),
        }
        if "input_smoothing" in qp_tree:  # SmoothQuant / AWQ: the codes are of diag(s) W
            layers["/".join(path)]["input_smoothing"] = qp_tree["input_smoothing"]
    return {"layers": layers, "params": served.get("params", {})}


def dequantize_weights(exported: Mapping[str, Any]) -> dict:
    """Import: float ``params`` from :func:`quantize_model_weights`' output.

    Each kernel becomes ``(codes - zero_point) * scale`` in float32, in the Flax layout,
    i.e. exactly the fake-quantized kernel that train mode used. For a layer with
    ``input_smoothing`` ``s`` (SmoothQuant / AWQ), whose quantized kernel ``Wq`` multiplies
    ``x / s``, the kernel's input rows are divided by ``s`` instead: ``diag(1/s) Wq``, so that a
    float model computes ``x @ diag(1/s) Wq``, the smoothed layer's function up to float
    rounding.
    """
    params = jax.tree_util.tree_map(lambda a: a, flax.core.unfreeze(dict(exported["params"])))
    for key, entry in exported["layers"].items():
        fmt, _, group, _ = specs.parse_kernel_spec(entry["spec"])
        stack = specs.stack_shape(entry["spec"])
        shape = tuple(int(v) for v in np.asarray(entry["shape"]))[len(stack):]
        # Exports without in_ndim (before QatDenseGeneral): dense [K, N] or conv kernels.
        in_ndim = int(np.asarray(entry["in_ndim"])) if "in_ndim" in entry else (0 if len(shape) > 2 else 1)
        conv = in_ndim == 0
        k_in = int(np.prod(shape[:in_ndim]))
        # Exports without `transposed` / `contracting` (before they existed) hold every dense
        # kernel as [N, K] and contract a conv kernel over all but its last axis.
        transposed = bool(np.asarray(entry.get("transposed", not conv)))
        flat = shape if conv else (k_in, int(np.prod(shape)) // k_in)
        layout_shape = flat[::-1] if transposed else flat
        default = tuple(range(len(flat) - 1)) if conv else (0,)
        rc = tuple(int(a) for a in np.asarray(entry.get("contracting", default)).reshape(-1))
        spec = DotSpec(None, fmt, group_size=group, dimension_numbers=((rc, rc), ((), ())))
        kernels = []
        for idx in np.ndindex(*stack):
            codes = entry["codes"][idx]
            if bool(np.asarray(entry["packed"])):
                codes = unpack_nibbles(codes, layout_shape[-1], fmt.signed)
            serving = QParams(entry["scale"][idx], entry["zero_point"][idx])
            if transposed:  # [N, K] codes, [N, G] parameters -> the kernel layout
                codes = codes.T
                serving = QParams(*(jnp.asarray(a).T for a in serving))
            w = decode_weight(codes, serving, spec)
            if "input_smoothing" in entry:  # rows of the [K, N] kernel times 1/s
                w = (w.reshape(k_in, -1) / jnp.asarray(entry["input_smoothing"][idx])[:, None])
            kernels.append(w.reshape(shape))
        w = _stack(kernels, stack)
        node = params
        for k in (key.split("/") if key else ()):
            node = node.setdefault(k, {})
        node["kernel"] = w
    return params
