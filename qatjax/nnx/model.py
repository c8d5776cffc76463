"""Model tools on NNX models: quantize an unmodified model in place, calibrate, report,
convert for serving, export.

The tools work in place on the model (NNX style). Each one views the model's variables as
the linen front end's collections (:func:`collections`: ``{"params": ..., "quant_params":
..., "quant_stats": ..., "fp8_meta": ...}``, nested by module path, list indices as
strings) and calls the linen tools of :mod:`qatjax.flax.model` on them: one implementation
of convert, the report and export under both front ends.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from qatjax import calibration
from qatjax.config import QatConfig
from qatjax.flax import model as linen_model
from qatjax.flax.layers import _COMPARE, _FINALIZE, MODES, quant_mode
from qatjax.nnx.intercept import float_type, intercept_calls
from qatjax.nnx.layers import (VARIABLE_TYPES, QatConv, QatEinsum, QatLinear, QatLinearGeneral,
                               QuantStats, _LinenBacked)

__all__ = ["quantize_model", "calibrate", "quant_report", "convert", "quantize_model_weights",
           "collections", "set_collections", "quantized_layers"]

Rules = Sequence[tuple[str, QatConfig | None]]

# The NNX layer class -> its qatjax drop-in.
_TWINS = {nnx.Linear: QatLinear, nnx.LinearGeneral: QatLinearGeneral, nnx.Conv: QatConv,
          nnx.Einsum: QatEinsum}


def _path_str(path: tuple) -> str:
    return "/".join(map(str, path))


def quantized_layers(model: nnx.Module) -> list[tuple[tuple[str, ...], _LinenBacked]]:
    """``(path, layer)`` of every qatjax NNX layer in ``model`` (path parts as strings)."""
    return [(tuple(map(str, path)), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, _LinenBacked)]


def collections(model: nnx.Module) -> dict[str, Any]:
    """The model's variables as linen collections: ``{collection: nested dict}`` for the
    variable types of :data:`qatjax.nnx.VARIABLE_TYPES` (module paths as keys, list
    indices as strings), the form the linen tools take."""
    def stringify(tree):
        if isinstance(tree, Mapping):
            return {str(k): stringify(v) for k, v in tree.items()}
        return tree

    out = {}
    for col, var_type in VARIABLE_TYPES.items():
        state = nnx.state(model, var_type)
        tree = stringify(nnx.to_pure_dict(state))
        # Sharding names (nnx.with_partitioning) travel as linen's boxes, which the linen tools
        # carry over to the codes and scales of a partitioned kernel.
        for path, variable in nnx.to_flat_state(state):
            names = variable.get_metadata().get("out_sharding")
            if names is not None:
                parent = tree
                for key in map(str, path[:-1]):
                    parent = parent[key]
                parent[str(path[-1])] = nn.Partitioned(variable.get_value(), names=tuple(names))
        if tree:
            out[col] = tree
    return out


def set_collections(model: nnx.Module, tree: Mapping[str, Any]) -> nnx.Module:
    """The inverse of :func:`collections`: writes linen-form collections (for example a
    checkpoint of ``collections(model)`` loaded with :func:`qatjax.checkpoint.load`) into
    the model's variables, in place. qatjax layers take exactly the state given (entries
    it lacks are created -- calibrated scales, converted codes -- and ones it does not
    list are removed); every other variable of those types takes its value.

    Raises:
      ValueError: if a variable of the model has no value in ``tree``.
    Returns:
      ``model``.
    """
    for path, layer in quantized_layers(model):
        layer.set_linen_variables({col: _subtree(sub, path) for col, sub in tree.items()
                                   if col in VARIABLE_TYPES})
    for col, var_type in VARIABLE_TYPES.items():
        for path, variable in nnx.to_flat_state(nnx.state(model, var_type)):
            value = tree.get(col, {})
            for key in map(str, path):
                if not isinstance(value, Mapping) or key not in value:
                    raise ValueError(f"set_collections: no value for {col}/{_path_str(path)}.")
                value = value[key]
            variable.set_value(value)
    return model


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
    return dict(tree) if isinstance(tree, Mapping) else {}


def quantize_model(model: nnx.Module, config: QatConfig | None = QatConfig(), *,
                   rules: Rules = (), mode: str | None = None,
                   axis_name: str | None = None) -> nnx.Module:
    """Swaps, in place, the ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` /
    ``nnx.Einsum`` layers of an unmodified NNX model for their qatjax drop-ins.

    The drop-ins take over the layers' own ``kernel`` / ``bias`` variables (the same
    objects: no array is copied, so quantizing costs no second copy of the model) and add
    their quantization state. The contractions other modules compute themselves
    (``jnp.einsum`` / ``lax.dot_general`` / ``lax.conv_general_dilated``: attention's
    ``Q K^T`` and ``A V``) are quantized by interception, as
    :func:`qatjax.flax.quantize_model` does (see :mod:`qatjax.nnx.intercept`). Rules are
    those of :func:`qatjax.flax.quantize_model`: ``(pattern, config)`` pairs, the first full
    match of the module's path (``"blocks/0/up"``, the root ``""``) decides, ``None`` keeps
    it float; a rule that matches no module raises.

    Returns:
      ``model`` (modified in place).
    """
    if config is not None and not isinstance(config, QatConfig):
        raise TypeError(f"quantize_model: `config` must be a QatConfig or None, got {type(config).__name__}.")
    for pattern, cfg in rules:
        re.compile(pattern)
        if cfg is not None and not isinstance(cfg, QatConfig):
            raise TypeError(f"quantize_model: rule {pattern!r} needs a QatConfig or None, "
                            f"got {type(cfg).__name__}.")
    if config is None and not any(cfg is not None for _, cfg in rules):
        raise ValueError("quantize_model: nothing to quantize: `config` is None and no rule gives "
                         "a QatConfig.")
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize_model: `mode` must be one of {MODES} or None, got {mode!r}.")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"quantize_model (qatjax.nnx): `model` must be an nnx.Module, got "
                        f"{type(model).__name__}; linen models go to qatjax.flax.quantize_model.")
    decided, seen = set(), []
    swaps, frames = [], []
    for path, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Module) or isinstance(node, _LinenBacked):
            continue
        where = _path_str(path)
        seen.append(where)
        cfg = config
        for i, (pattern, rule_cfg) in enumerate(rules):
            if re.fullmatch(pattern, where):
                decided.add(i)
                cfg = rule_cfg
                break
        is_layer = float_type(node) in _TWINS
        if is_layer and path and cfg is not None:
            swaps.append((path, _drop_in(node, cfg, mode, axis_name, path)))
        else:  # its own contractions follow cfg (None for float layers: not their parent's)
            frames.append((node, None if is_layer else cfg, tuple(map(str, path))))
    unused = [pattern for i, (pattern, _) in enumerate(rules) if i not in decided]
    if unused:
        raise ValueError(f"quantize_model: rule pattern(s) {unused} matched no module (the first "
                         f"full match, re.fullmatch, decides); the module paths are: {seen}.")
    for node, cfg, path in frames:
        intercept_calls(node, cfg, mode, axis_name, path)
    for path, layer in swaps:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if isinstance(path[-1], int):
            parent[path[-1]] = layer
        else:
            setattr(parent, path[-1], layer)
    return model


def _kernel_shape(node: nnx.Module) -> tuple[int, ...]:
    """The kernel shape an NNX layer's constructor arguments give (nnx.Linear, LinearGeneral,
    Conv or Einsum)."""
    kind = float_type(node)
    if kind is nnx.Linear:
        return (node.in_features, node.out_features)
    if kind is nnx.LinearGeneral:
        return (*dict(node.batch_axis).values(), *node.in_features, *node.out_features)
    return tuple(node.kernel_shape)


def _drop_in(node: nnx.Module, cfg: QatConfig, mode: str | None, axis_name: str | None,
             where: tuple) -> _LinenBacked:
    """The qatjax drop-in of ``node`` (at ``where``) holding ``node``'s own variables."""
    kind = float_type(node)
    kernel = node.kernel
    bias = node.bias
    expected = _kernel_shape(node)
    if tuple(kernel.shape) != expected:
        raise ValueError(
            f"quantize_model (qatjax.nnx): {kind.__name__} {_path_str(where)} holds a kernel of "
            f"shape {tuple(kernel.shape)}, not the {expected} its arguments give: layers stacked "
            "by nnx.vmap (to run under nnx.scan) are not quantized by the NNX front end. Keep "
            "the layers in a list, or write the model in linen with nn.scan (qatjax.flax."
            "quantize_model keeps scanned layers stacked).")
    common = dict(config=cfg, mode=mode, axis_name=axis_name, rngs=nnx.Rngs(0),
                  dtype=node.dtype, param_dtype=node.param_dtype, precision=node.precision,
                  promote_dtype=node.promote_dtype,
                  kernel_init=lambda *_: kernel.get_value(),
                  bias_init=lambda *_: bias.get_value())
    if kind is nnx.Linear:
        layer = QatLinear(node.in_features, node.out_features, use_bias=node.use_bias,
                          dot_general=node.dot_general,
                          preferred_element_type=node.preferred_element_type, **common)
    elif kind is nnx.LinearGeneral:
        layer = QatLinearGeneral(node.in_features, node.out_features, axis=node.axis,
                                 batch_axis=dict(node.batch_axis), use_bias=node.use_bias,
                                 dot_general=node.dot_general,
                                 dot_general_cls=node.dot_general_cls, **common)
    elif kind is nnx.Conv:
        layer = QatConv(node.in_features, node.out_features, node.kernel_size, node.strides,
                        padding=node.padding, input_dilation=node.input_dilation,
                        kernel_dilation=node.kernel_dilation,
                        feature_group_count=node.feature_group_count, use_bias=node.use_bias,
                        mask=node.mask, conv_general_dilated=node.conv_general_dilated, **common)
    else:
        layer = QatEinsum(node.einsum_str, node.kernel_shape, node.bias_shape,
                          einsum_op=node.einsum_op, **common)
    layer.kernel = kernel  # the same variables (metadata, sharding and all)
    if bias is not None:
        layer.bias = bias
    return layer


def _mode_call(mode: str, kwargs: Mapping[str, Any], mesh: Mesh | None,
               axes: tuple[str, ...] | None):
    """``call(model, args)``: the model in ``mode``; with a ``mesh``, under ``nnx.shard_map``
    over ``axes`` (model replicated, ``args`` split on their leading axis, other mesh axes
    automatic), returning nothing (the calls are for their state updates)."""
    def call(m, a):
        with quant_mode(mode):
            out = m(*a, **kwargs)
        return out if mesh is None else None

    if mesh is None:
        return call
    return nnx.shard_map(call, mesh=mesh, in_specs=(P(), linen_model._batch_spec(axes)),
                         out_specs=P(), axis_names=set(axes))


@functools.partial(nnx.jit, static_argnames=("mode", "kwargs", "mesh", "axes"))
def _run_in_mode_jitted(model: nnx.Module, args: tuple, *, mode: str, kwargs: tuple,
                        mesh: Mesh | None, axes: tuple[str, ...] | None) -> Any:
    return _mode_call(mode, dict(kwargs), mesh, axes)(model, args)


def _run_in_mode(model: nnx.Module, mode: str, args: tuple, kwargs: Mapping[str, Any],
                 mesh: Mesh | None = None, axes: tuple[str, ...] | None = None) -> Any:
    """``model(*args, **kwargs)`` in ``mode`` under ``nnx.jit`` (and ``shard_map`` over a
    ``mesh``): compiled once per model structure, mode, keyword arguments (which must then be
    hashable; others are traced anew on every call) and mesh."""
    frozen = tuple(sorted(kwargs.items()))
    try:
        hash(frozen)
    except TypeError:
        return nnx.jit(_mode_call(mode, kwargs, mesh, axes))(model, args)
    return _run_in_mode_jitted(model, args, mode=mode, kwargs=frozen, mesh=mesh, axes=axes)


def _reset_stats(model: nnx.Module) -> None:
    """Empties every activation observer (a drop-in's ``input``, an intercepted contraction's
    ``<op><n>_<side>``) in place, to the state its first calibrate-mode call would create --
    so that every calibration step has the same variables and compiles once -- and removes
    the other statistics (the post-training tools' channel statistics)."""
    for path, variable in nnx.to_flat_state(nnx.state(model, QuantStats)):
        owner = model
        for key in path[:-1]:
            owner = owner[key] if isinstance(key, int) else getattr(owner, key)
        name = str(path[-1])
        if isinstance(owner, _LinenBacked):
            config = owner.config if name == "input" else None
        else:
            intercept = getattr(owner, "_qatjax_intercept", None)
            config = intercept[0] if intercept and re.fullmatch(r"\w+\d+_(lhs|rhs)", name) else None
        act = None if config is None else config.activation_quantizer()
        empty = act.init() if act is not None and act.static else None
        if empty is not None and jax.tree_util.tree_structure(empty) == \
                jax.tree_util.tree_structure(variable.get_value()):
            variable.set_value(empty)
        else:  # created afresh by the next call, if at all
            delattr(owner, name)


def calibrate(model: nnx.Module, batches: Iterable[Any], *, progress: bool = False,
              reset: bool = True, call_kwargs: Mapping[str, Any] | None = None,
              mesh: Mesh | None = None, data_axis: str | Sequence[str] | None = None,
              across_processes: bool = False) -> nnx.Module:
    """Runs ``model`` over ``batches`` in calibrate mode, then turns every layer's statistics
    into its activation parameters (:class:`~qatjax.nnx.QuantParams`; LSQ scales as
    ``nnx.Param``), in place.

    Many devices and processes as :func:`qatjax.calibrate`: globally sharded batches work
    as they are (layers without ``axis_name``); ``mesh`` / ``data_axis`` run every call under
    ``nnx.shard_map`` over the data axes for layers created with ``axis_name=data_axis``
    (numpy batches are this process's part of the global batch); ``across_processes=True``
    combines each process's statistics (any number of batches each) exactly with
    :func:`qatjax.calibration.reduce_across_processes` before finalizing.

    Args:
      model: an NNX model with qatjax layers (drop-ins or :func:`quantize_model`).
      batches: iterable of inputs (a tuple is unpacked into the call's arguments).
      progress: show a tqdm progress bar.
      reset: start from empty statistics.
      call_kwargs: extra keyword arguments of every call (e.g. ``deterministic=True``).
      mesh: a ``jax.sharding.Mesh`` to run the calls under.
      data_axis: the mesh axis (or axes) the batch is split over; defaults to the mesh's
        only axis.
      across_processes: reduce each process's statistics across processes.
    Returns:
      ``model``.
    Raises:
      ValueError: no batches, no qatjax layer, a layer that observed no finite value,
        ``data_axis`` not an axis of ``mesh``, or (with ``mesh``) a layer with an activation
        observer whose ``axis_name`` is not ``data_axis``.
    """
    axes = linen_model.data_axes(mesh, data_axis, across_processes, "calibrate")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("calibrate: the model has no qatjax layers (QatLinear, QatConv, ... or "
                         "qatjax.nnx.quantize_model).")
    if mesh is not None:
        for path, layer in layers:
            linen_model.check_layer_axes(_path_str(path), layer.config, layer.axis_name, axes,
                                         "calibrate")
    kwargs = dict(call_kwargs or {})
    if reset:
        _reset_stats(model)

    def observe(args: tuple) -> None:
        _run_in_mode(model, "calibrate", linen_model.global_batch(args, mesh, axes), kwargs,
                     mesh, axes)

    last = linen_model.for_each_batch(batches, observe, progress=progress)
    if across_processes:
        stats = nnx.state(model, QuantStats)
        nnx.replace_by_pure_dict(
            stats, calibration.reduce_across_processes(nnx.to_pure_dict(stats)))
        nnx.update(model, stats)
    linen_model._check_observed(collections(model).get("quant_stats", {}))
    _run_in_mode(model, _FINALIZE, linen_model.global_batch(last, mesh, axes), kwargs, mesh, axes)
    return model


def quant_report(model: nnx.Module, sample: Any = None, *,
                 call_kwargs: Mapping[str, Any] | None = None) -> linen_model.CalibrationReport:
    """The per-layer table of :func:`qatjax.quant_report` for an NNX model; with a ``sample``
    batch, each layer's own output error against float on it (every layer gets the float
    model's input)."""
    errors = {}
    if sample is not None:
        if any(hasattr(layer, "kernel_codes") for _, layer in quantized_layers(model)):
            raise ValueError("quant_report: output errors need the float kernels; pass the model "
                             "before qatjax.nnx.convert (or no `sample`).")
        _run_in_mode(model, _COMPARE, linen_model._as_args(sample), dict(call_kwargs or {}))
        sown = nnx.pop(model, nnx.Intermediate)
        for path, value in nnx.to_flat_state(sown):
            key = str(path[-1])
            if key.endswith("output_error"):  # a layer's, or an intercepted op's (einsum0_...)
                op = key[:-len("_output_error")] if key != "output_error" else None
                where = tuple(map(str, path[:-1])) + ((op,) if op else ())
                errors["/".join(where)] = float(np.max(np.asarray(value.get_value())))
    return linen_model.report_with_errors(collections(model), errors)


def convert(model: nnx.Module) -> nnx.Module:
    """Converts every qatjax layer for serving, in place: the float ``kernel`` (and LSQ
    weight scales) are replaced by ``kernel_codes`` / ``kernel_scale`` / ``kernel_zero_point``
    (:class:`~qatjax.nnx.QuantParams`), exactly as :func:`qatjax.convert` converts linen
    variables, and ``quant_stats`` are dropped; infer mode then serves the codes, bit for bit
    what train mode computed. Returns ``model``."""
    served = linen_model.convert(collections(model))
    for path, layer in quantized_layers(model):
        layer.set_linen_variables({col: _subtree(tree, path) for col, tree in served.items()
                                   if col != "quant_stats"})
    return model


def quantize_model_weights(model: nnx.Module, *, pack: bool = True) -> dict:
    """:func:`qatjax.quantize_model_weights` of the model's variables (codes, scales and the
    other parameters, as plain arrays: save them with safetensors, orbax or msgpack)."""
    return linen_model.quantize_model_weights(collections(model), pack=pack)
