"""Transformer-grade post-training quantization of linen models: SmoothQuant, AWQ, GPTQ,
per-layer sensitivity and mixed precision.

Model tools over ``(model, variables, batches)`` like :func:`qatjax.calibrate`, for models
whose quantized layers are :class:`~qatjax.flax.QatDense` / :class:`~qatjax.flax.QatDenseGeneral`
(built by hand or by :func:`qatjax.flax.quantize_model`); the numerics are the Flax-free
:mod:`qatjax.ptq` and the exact per-channel observers of :mod:`qatjax.calibration`.
Convolutions and einsum kernels are left as they are (their statistics would need an
im2col / per-kernel-axis layout).

* :func:`collect_input_stats`: one pass over the batches in float mode, intercepting every
  dense qatjax layer's call, fills ``quant_stats/<layer>/input_absmax`` /
  ``input_mean_abs`` / ``input_hessian`` (:func:`qatjax.calibration.channel_absmax`,
  :func:`~qatjax.calibration.channel_mean_abs`, :func:`~qatjax.calibration.hessian` of the
  input *as the kernel sees it*, i.e. after ``input_smoothing``). With ``mesh`` each step
  runs under ``shard_map`` and the observers reduce exactly over the data axes: the
  statistics are bit for bit those of one device.
* :func:`input_groups`: the layers that read the same tensor (query / key / value: the same
  traced array in one trace), which SmoothQuant and AWQ give one shared factor.
* :func:`smoothquant` / :func:`awq`: per-input-channel factors ``s``; the kernel rows become
  ``s_j W[j, :]`` and the layer divides its input by ``s`` (``quant_params/input_smoothing``,
  applied in every mode, carried by :func:`qatjax.convert` and the exports), or ``1/s`` is
  folded into the preceding LayerNorm (``fold=``). Folding is valid only when *every*
  consumer of that LayerNorm's output is one of the smoothed layers: not in post-LN BERT,
  whose LayerNorm output also feeds the residual connection (the fold is checked on the
  model's float output, and refused when it changes it). Re-calibrate activations
  (:func:`qatjax.calibrate`) afterwards: the layers now see ``x / s``.
* :func:`gptq`: GPTQ codes per layer, written in the form that serves them unchanged
  (``quant_params/kernel_codes`` / ``kernel_scale`` / ``kernel_zero_point`` as
  :func:`qatjax.convert` stores them, the float kernel dropped; with LSQ
  ``learnable_scales``: ``params/kernel`` = the dequantized kernel and ``params/kernel_scale``
  the GPTQ scales, so QAT continues from the same codes).
* :func:`layer_sensitivity`: per layer, the model output's error when only that layer is
  quantized, and the layer's own output error (:func:`qatjax.quant_report`);
  :func:`weight_sensitivity`: the same for the served kernels of any quantized variables
  (GPTQ codes included), weights only.
* :func:`search_mixed_precision` / :func:`mixed_precision`: a format per layer under an
  average-bits budget minimising the summed sensitivities (exact multiple-choice knapsack),
  as ``quantize_model`` rules and a YAML recipe.
* :class:`PTQRecipe` / :func:`run_ptq`: the whole pipeline from a recipe (YAML or Python).

``batches`` is iterated once per pass: pass a list (a generator is refused).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from qatjax import calibration
from qatjax import ptq as core
from qatjax.config import QatConfig
from qatjax.flax.intercept import _within
from qatjax.flax.layers import QatDense, QatDenseGeneral, _QuantLayer, quant_mode
from qatjax.flax.model import (_as_args, _layout, calibrate, data_axes, finalize,
                               global_batch, quant_report)
from qatjax.formats import IntFormat
from qatjax.qdot import decode_weight, encode_weight, to_serving
from qatjax.qparams import QParams

__all__ = [
    "STAT_KINDS",
    "LayerInfo",
    "LayerSensitivity",
    "MixedPrecisionPlan",
    "PTQRecipe",
    "awq",
    "collect_input_stats",
    "gptq",
    "input_groups",
    "layer_sensitivity",
    "mixed_precision",
    "run_ptq",
    "search_mixed_precision",
    "smoothquant",
    "weight_sensitivity",
]

#: Statistic kind -> its observer (``quant_stats/<layer>/input_<kind>``).
STAT_KINDS: dict[str, Callable[[], calibration.Observer]] = {
    "absmax": calibration.channel_absmax,
    "mean_abs": calibration.channel_mean_abs,
    "hessian": calibration.hessian,
}


# ----------------------------------------------------------------------------- discovery
@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A dense qatjax layer met in a trace of the model.

    Attributes:
      path: the layer's module path (``"/"``-joined, as in the variables).
      config: its :class:`~qatjax.QatConfig`.
      n_in: how many trailing input axes it contracts (1 for QatDense).
      in_features: ``K``, their size; ``out_features``: ``N``.
      group: index of the tensor it reads (layers with the same index read the same array).
    """

    path: str
    config: QatConfig
    n_in: int
    in_features: int
    out_features: int
    group: int


def _check_batches(batches: Any, fn: str) -> list:
    if iter(batches) is batches:
        raise TypeError(f"{fn}: `batches` must be re-iterable (a list or tuple of batches); a "
                        "generator or iterator would be exhausted after the first pass.")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{fn}: `batches` is empty.")
    return batches


def _outermost(interceptor: Callable) -> Callable:
    """``interceptor`` for the outermost call of each module only: a qatjax layer's
    ``__call__`` runs the Flax layer's ``__call__`` on itself, a second intercepted call."""
    active: set[int] = set()

    def wrapped(next_fun, args, kwargs, context):
        key = id(context.module)
        if key in active:
            return next_fun(*args, **kwargs)
        active.add(key)
        try:
            return interceptor(next_fun, args, kwargs, context)
        finally:
            active.discard(key)

    return wrapped


def _dense_call(context: Any) -> tuple[_QuantLayer, int] | None:
    """``(layer, n_in)`` when ``context`` is the call of a dense qatjax layer, else None."""
    m = context.module
    if context.method_name != "__call__" or m.scope is None:
        return None
    if isinstance(m, QatDenseGeneral):
        return m, len((m.axis,) if isinstance(m.axis, int) else tuple(m.axis))
    if isinstance(m, QatDense):
        return m, 1
    return None


def _kernel_input(layer: _QuantLayer, x: jax.Array, n_in: int) -> jax.Array:
    """The layer's input as its kernel sees it (after ``input_smoothing``): float32 rows
    ``[T, K]``."""
    x = layer._smooth(jnp.asarray(x), n_in)
    k = int(np.prod(x.shape[x.ndim - n_in:]))
    return x.reshape(-1, k).astype(jnp.float32)


def input_groups(model: nn.Module, variables: Mapping[str, Any], sample: Any, *,
                 apply_kwargs: Mapping[str, Any] | None = None) -> tuple[LayerInfo, ...]:
    """The dense qatjax layers of ``model``, in call order, with the tensor each reads.

    Traces one float-mode apply on ``sample`` (a tuple is unpacked; nothing is computed:
    ``jax.eval_shape``). Layers that receive the very same array (query, key and value of
    one attention) get the same ``group``.
    """
    infos: list[LayerInfo] = []
    seen: list[Any] = []  # keeps the inputs alive, so their ids stay unique in the trace

    def record(next_fun, args, kwargs, context):
        hit = _dense_call(context)
        if hit is not None and args:
            layer, n_in = hit
            x = args[0]
            group = next((i for i, a in enumerate(seen) if a is x), None)
            if group is None:
                seen.append(x)
                group = len(seen) - 1
            path = "/".join(layer.scope.path)
            if not any(i.path == path for i in infos):  # a shared layer is one entry
                k = int(np.prod(jnp.shape(x)[jnp.ndim(x) - n_in:]))
                feats = layer.features
                n = int(np.prod((feats,) if isinstance(feats, int) else feats))
                infos.append(LayerInfo(path, layer.config, n_in, k, n, group))
        return next_fun(*args, **kwargs)

    def run(v, args):
        with quant_mode("float"), nn.intercept_methods(_outermost(record)):
            return model.apply(v, *args, mutable=["quant_stats"], **dict(apply_kwargs or {}))

    jax.eval_shape(run, dict(variables), _as_args(sample))
    return tuple(infos)


def _select(infos: Sequence[LayerInfo], layers: str, keep: Callable[[LayerInfo], bool]
            ) -> list[list[LayerInfo]]:
    """The layers whose path matches the regex ``layers`` (in full) and ``keep``, grouped by
    the tensor they read (groups in call order)."""
    pattern = re.compile(layers)
    groups: dict[int, list[LayerInfo]] = {}
    for info in infos:
        if pattern.fullmatch(info.path) and keep(info):
            groups.setdefault(info.group, []).append(info)
    return list(groups.values())


# ----------------------------------------------------------------------------- statistics
def _path(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def _node(tree: Mapping[str, Any], path: str) -> Any:
    for key in _path(path):
        tree = tree[key]
    return tree


def _make_node(tree: dict, path: str) -> dict:
    for key in _path(path):
        tree = tree.setdefault(key, {})
    return tree


def _copy(variables: Mapping[str, Any]) -> dict:
    """A deep copy of the dict structure (arrays shared), unfrozen."""
    return jax.tree_util.tree_map(lambda a: a, flax.core.unfreeze(dict(variables)))


def _strip_stats(stats: Any, kinds: Sequence[str]) -> Any:
    """``stats`` without the ``input_<kind>`` entries."""
    names = {f"input_{k}" for k in kinds}
    if not isinstance(stats, Mapping):
        return stats
    out = {}
    for key, value in stats.items():
        if key in names:
            continue
        out[key] = _strip_stats(value, kinds) if isinstance(value, Mapping) else value
    return out


def _own_stats(stats: Any, kinds: Sequence[str]) -> dict:
    """Only the ``input_<kind>`` entries of ``stats`` (empty subtrees dropped)."""
    names = {f"input_{k}" for k in kinds}
    out = {}
    for key, value in stats.items():
        if key in names:
            out[key] = value
        elif isinstance(value, Mapping) and key not in ("input",):
            sub = _own_stats(value, kinds)
            if sub:
                out[key] = sub
    return out


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = (_deep_merge(out[key], value) if isinstance(value, Mapping)
                    and isinstance(out.get(key), Mapping) else value)
    return out


def _row_mask_of(row_mask: Callable[..., Any] | None, args: tuple, x: jax.Array,
                 path: str) -> jax.Array | None:
    """``row_mask(*args)`` flattened to the ``[T]`` float32 rows of a layer's kernel input
    ``x [T, K]`` (None when ``row_mask`` is None)."""
    if row_mask is None:
        return None
    m = jnp.asarray(row_mask(*args))
    if m.size != x.shape[0]:
        raise ValueError(f"row_mask: layer {path} reads {x.shape[0]} rows, but `row_mask` of the "
                         f"batch has shape {m.shape} ({m.size} elements); it must give one value per "
                         "row of every selected layer's input (e.g. the [B, T] attention mask "
                         "of a transformer whose Dense layers read [B, T, features]).")
    return (m.reshape(-1) != 0).astype(jnp.float32)


def _run_pass(model: nn.Module, variables: Mapping[str, Any], batches: Sequence[Any],
              kinds: Sequence[str], paths: frozenset[str], capture: bool, *, progress: bool,
              apply_kwargs: Mapping[str, Any] | None, mesh: Mesh | None,
              axes: tuple[str, ...] | None, desc: str,
              row_mask: Callable[..., Any] | None = None,
              per_batch: bool = False) -> tuple[Any, dict[str, jax.Array]]:
    """One float-mode pass over ``batches``: the statistics ``kinds`` of the layers in
    ``paths`` (a ``quant_stats`` subtree; with ``per_batch`` a list of one subtree per batch,
    each of that batch alone) and, when ``capture``, their kernel inputs ``{path: [T, K]}``
    of every batch, concatenated. With ``row_mask``, the rows it marks 0 are left out of
    both (zeroed in the observers' input, the row counts corrected; dropped from the
    captured inputs)."""
    kwargs = dict(apply_kwargs or {})

    def observe(v, args):
        def interceptor(next_fun, a, kw, context):
            hit = _dense_call(context)
            if hit is not None and "/".join(hit[0].scope.path) in paths:
                # The statistics are the tool's computation, not the model's: outside any
                # quantize_model frame of the enclosing module (whose contractions it would
                # otherwise intercept, e.g. the Hessian's X^T X).
                _within(None, record, (hit, a), {})
            return next_fun(*a, **kw)

        def record(hit, a):
            layer, n_in = hit
            x = _kernel_input(layer, a[0], n_in)
            m = _row_mask_of(row_mask, args, x, "/".join(layer.scope.path))
            if m is not None:
                x = x * m[:, None]
                left_out = jnp.sum(1 - m).astype(jnp.int32)
                if axes is not None:
                    left_out = jax.lax.psum(left_out, axes)
            for kind in kinds:
                obs = STAT_KINDS[kind]()
                var = layer.variable("quant_stats", f"input_{kind}", obs.init, x)
                new = obs.update(var.value, x, axis_name=axes)
                if m is not None:  # the masked rows were counted as (zero) rows
                    new = new._replace(num_rows=new.num_rows - left_out)
                var.value = new
            if capture:
                layer.sow("ptq_inputs", "x", x)
                if m is not None:
                    layer.sow("ptq_inputs", "m", m)

        with quant_mode("float"), nn.intercept_methods(_outermost(interceptor)):
            _, upd = model.apply(v, *args, mutable=["quant_stats", "ptq_inputs"], **kwargs)
        return _own_stats(upd.get("quant_stats", {}), kinds), upd.get("ptq_inputs", {})

    if mesh is None:
        step = jax.jit(observe)
    else:
        def stats_only(v, args):
            return observe(v, args)[0]

        sharded = jax.jit(calibration.shard_map(stats_only, mesh=mesh,
                                                in_specs=(P(), P(axes[0] if len(axes) == 1 else axes)),
                                                out_specs=P(), axis_names=set(axes)))
        step = lambda v, args: (sharded(v, args), {})  # noqa: E731
    base = dict(variables)
    base["quant_stats"] = _strip_stats(base.get("quant_stats", {}), kinds)
    stats: dict = {}
    captured: dict[str, list[jax.Array]] = {}
    kept: dict[str, list[jax.Array]] = {}
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=desc, unit="batch")
    each: list[dict] = []
    for batch in iterator:
        v = dict(base)
        v["quant_stats"] = _deep_merge(base["quant_stats"], {} if per_batch else stats)
        stats, sown = step(v, global_batch(_as_args(batch), mesh, axes))
        each.append(stats)
        for path in paths:
            try:
                node = _node(sown, path)
                xs = node["x"]
            except (KeyError, TypeError):
                continue
            captured.setdefault(path, []).extend(xs)
            if "m" in node:
                kept.setdefault(path, []).extend(node["m"])
    if capture and mesh is not None:  # the searches' samples: one unsharded pass
        _, captured_tree = _run_pass(model, variables, batches, (), paths, True,
                                     progress=False, apply_kwargs=apply_kwargs, mesh=None,
                                     axes=None, desc=desc, row_mask=row_mask)
        return (each if per_batch else stats), captured_tree
    out = {}
    for p, xs in captured.items():
        x = jnp.concatenate(xs)
        if p in kept:
            x = x[np.asarray(jnp.concatenate(kept[p])) != 0]
        out[p] = x
    return (each if per_batch else stats), out


def collect_input_stats(model: nn.Module, variables: Mapping[str, Any], batches: Sequence[Any],
                        *, kinds: Sequence[str] = ("absmax", "mean_abs", "hessian"),
                        layers: str = ".*", progress: bool = False,
                        apply_kwargs: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
                        data_axis: str | Sequence[str] | None = None,
                        row_mask: Callable[..., Any] | None = None) -> dict:
    """Per-input-channel statistics of every dense qatjax layer's input, in one pass.

    Each batch runs the model in float mode; the input of every QatDense / QatDenseGeneral
    whose path matches ``layers`` (a regex, matched in full) -- as its kernel sees it, after
    ``input_smoothing``, flattened to rows ``[T, K]`` -- updates the observers ``kinds``:

    * ``"absmax"``: ``quant_stats/<layer>/input_absmax``, a ``ChannelAbsMaxState`` (``max|x_j|``);
    * ``"mean_abs"``: ``input_mean_abs``, a ``ChannelMeanAbsState`` (``mean|x_j|``);
    * ``"hessian"``: ``input_hessian``, a ``HessianState`` (``sum x^T x``, ``[K, K]``).

    Args:
      model, variables: the model and its variables (a float checkpoint is fine).
      batches: a list of inputs (a tuple is unpacked into the call's arguments).
      kinds: the statistics to gather (keys of :data:`STAT_KINDS`).
      layers: regex on layer paths.
      progress: tqdm bar over the batches.
      apply_kwargs: extra keyword arguments of ``model.apply``.
      mesh, data_axis: run each step under ``shard_map`` over the data axes, as
        :func:`qatjax.calibrate` does: each device observes its block of the batch and the
        observers reduce exactly (``pmax``, exact sums), so the result is bit for bit one
        device's.
      row_mask: None (every row counts), or a function of a batch's arguments (the batch
        unpacked as for ``model.apply``) returning one value per row of each selected
        layer's input ``[..., K]`` (any shape with that many elements, e.g. the ``[B, T]``
        attention mask of a transformer): rows where it is 0 (padding) are left out of
        every statistic (``x_t`` zeroed, so ``sum x^T x`` and ``max|x|`` skip it; the row
        counts, hence ``mean|x|``, count only the kept rows).
    Returns:
      A new variables dict: ``quant_stats`` holds the fresh statistics (earlier ones of the
      same kinds are replaced; other statistics kept).
    """
    fn = "collect_input_stats"
    batches = _check_batches(batches, fn)
    bad = [k for k in kinds if k not in STAT_KINDS]
    if bad or not kinds:
        raise ValueError(f"{fn}: `kinds` must be a non-empty subset of {tuple(STAT_KINDS)}, "
                         f"got {tuple(kinds)!r}.")
    axes = data_axes(mesh, data_axis, False, fn)
    infos = input_groups(model, variables, batches[0], apply_kwargs=apply_kwargs)
    paths = frozenset(i.path for g in _select(infos, layers, lambda i: True) for i in g)
    if not paths:
        raise ValueError(f"{fn}: no QatDense / QatDenseGeneral layer matches `layers`={layers!r} "
                         f"(dense layers: {[i.path for i in infos]}).")
    stats, _ = _run_pass(model, variables, batches, tuple(kinds), paths, False,
                         progress=progress, apply_kwargs=apply_kwargs, mesh=mesh, axes=axes,
                         desc="input statistics", row_mask=row_mask)
    out = _copy(variables)
    out["quant_stats"] = _deep_merge(_strip_stats(out.get("quant_stats", {}), kinds), stats)
    return out


# ----------------------------------------------------------------------------- kernels
def _kernel(variables: Mapping[str, Any], info: LayerInfo) -> jax.Array:
    """The layer's float kernel as the dense ``[K, N]`` it stands for."""
    node = _node(variables.get("params", {}), info.path)
    if "kernel" not in node:
        raise ValueError(f"layer {info.path}: no params/kernel (converted for serving, or GPTQ "
                         "already wrote its codes); PTQ transforms need the float kernel.")
    return jnp.asarray(nn.meta.unbox(node["kernel"])).reshape(info.in_features, info.out_features)


def _set_kernel(out: dict, info: LayerInfo, kernel2d: jax.Array) -> None:
    """Stores a ``[K, N]`` kernel back in the layer's shape, dtype and partitioning box."""
    node = _node(out["params"], info.path)
    old = node["kernel"]
    raw = nn.meta.unbox(old)
    new = jnp.asarray(kernel2d).reshape(jnp.shape(raw)).astype(raw.dtype)
    node["kernel"] = nn.meta.replace_boxed(old, new) if isinstance(old, nn.meta.AxisMetadata) else new


def _smoothing(variables: Mapping[str, Any], info: LayerInfo) -> jax.Array | None:
    qp = variables.get("quant_params", {})
    try:
        return jnp.asarray(_node(qp, info.path)["input_smoothing"])
    except (KeyError, TypeError):
        return None


def _group_smoothing(variables: Mapping[str, Any], group: Sequence[LayerInfo], fn: str
                     ) -> jax.Array | None:
    """The ``input_smoothing`` the members of a group share (None: none has one)."""
    found = [_smoothing(variables, i) for i in group]
    if all(s is None for s in found):
        return None
    first = found[0]
    if any(s is None or not np.array_equal(np.asarray(s), np.asarray(first)) for s in found):
        raise ValueError(f"{fn}: the layers {[i.path for i in group]} read the same tensor but hold "
                         "different quant_params/input_smoothing; smooth them together.")
    return first


def _apply_smoothing(out: dict, variables: Mapping[str, Any], group: Sequence[LayerInfo],
                     s: jax.Array, fold_into: str | None) -> None:
    """Kernel rows times ``s`` for every member, and ``x / s`` on their input: composed into
    ``quant_params/input_smoothing``, or folded into the LayerNorm ``params/<fold_into>``."""
    for info in group:
        _set_kernel(out, info, core.smooth_kernel(_kernel(out, info), s))
    if fold_into is not None:
        ln = _node(out["params"], fold_into)
        scale, bias = core.fold_layernorm(jnp.asarray(ln["scale"]),
                                          None if "bias" not in ln else jnp.asarray(ln["bias"]), s)
        ln["scale"] = scale
        if bias is not None:
            ln["bias"] = bias
        return
    old = _group_smoothing(variables, group, "smoothing")
    total = s if old is None else old * s
    for info in group:
        _make_node(out.setdefault("quant_params", {}), info.path)["input_smoothing"] = total


def _float_output(model: nn.Module, variables: Mapping[str, Any], sample: Any,
                  apply_kwargs: Mapping[str, Any] | None) -> list[np.ndarray]:
    def run(v, args):
        with quant_mode("float"):
            y, _ = model.apply(v, *args, mutable=["quant_stats"], **dict(apply_kwargs or {}))
        return y

    return [np.asarray(a, np.float64) for a in
            jax.tree_util.tree_leaves(jax.jit(run)(dict(variables), _as_args(sample)))]


def _check_fold(model, before, after, sample, apply_kwargs, folded: Sequence[str], fn: str,
                rtol: float = 1e-3) -> None:
    """Refuses LayerNorm folds that change the float model (an LN output with other readers)."""
    y0 = _float_output(model, before, sample, apply_kwargs)
    y1 = _float_output(model, after, sample, apply_kwargs)
    err = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)) for a, b in zip(y0, y1))
    if err > rtol:
        raise ValueError(
            f"{fn}: folding into the LayerNorm(s) {list(folded)} changes the float model's output "
            f"(relative error {err:.3g} > {rtol}): their output also feeds something other than "
            "the smoothed layers (e.g. a residual connection, as in post-LN BERT). Keep the "
            "factors explicit (no `fold`).")


def _fold_target(group: Sequence[LayerInfo], fold: Mapping[str, str] | None, fn: str) -> str | None:
    if not fold:
        return None
    targets = {fold.get(i.path) for i in group}
    if targets == {None}:
        return None
    if len(targets) != 1:
        raise ValueError(f"{fn}: `fold` must map every layer of {[i.path for i in group]} (they "
                         f"read one tensor) to the same LayerNorm, got {[fold.get(i.path) for i in group]}.")
    return targets.pop()


def _int_weights(info: LayerInfo) -> bool:
    fmt = info.config.weight_format
    return isinstance(fmt, IntFormat)


def _layer_bar(items: Sequence[Any], progress: bool, desc: str) -> Iterable[Any]:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="group")


# ----------------------------------------------------------------------------- SmoothQuant
def smoothquant(model: nn.Module, variables: Mapping[str, Any], batches: Sequence[Any], *,
                alpha: float | None = 0.5, alphas: Sequence[float] = core.smoothquant.DEFAULT_ALPHAS,
                layers: str = ".*", fold: Mapping[str, str] | None = None,
                power_of_two: bool = False, progress: bool = False,
                apply_kwargs: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
                data_axis: str | Sequence[str] | None = None,
                row_mask: Callable[..., Any] | None = None) -> dict:
    """SmoothQuant (Xiao et al., 2023) on every dense qatjax layer with quantized activations.

    Per group of layers reading one tensor ``X`` (see :func:`input_groups`), with
    ``ax_j = max|X_j|`` over all ``batches`` (:func:`collect_input_stats`, ``"absmax"``) and
    ``aw_j = max_i max|W_i[j, :]|`` over the group's kernels:
    ``s_j = ax_j**alpha / aw_j**(1 - alpha)`` (:func:`qatjax.ptq.smoothquant_scales`), or, with
    ``alpha=None``, the ``alpha`` of ``alphas`` with the smallest quantized output error on
    the batches' inputs (:func:`qatjax.ptq.smoothquant_search`, with the group's first
    layer's formats). Every kernel becomes ``diag(s) W`` and the input ``X / s``
    (``quant_params/input_smoothing``, composed with an existing one), so the float model is
    unchanged up to rounding (bit for bit with ``power_of_two``).

    Args:
      model, variables, batches: as :func:`qatjax.calibrate` (``batches`` a list).
      alpha: migration strength in ``[0, 1]``, or None to search ``alphas`` per group.
      layers: regex on layer paths (matched in full); only layers with an activation format.
      fold: ``{layer path: LayerNorm params path}``: fold ``1/s`` into that LayerNorm's
        ``scale`` / ``bias`` instead (every layer of the group must map to it). Valid only
        when every consumer of the LayerNorm's output is smoothed; checked on the float
        model's output (ValueError otherwise).
      power_of_two: round the factors to powers of two.
      progress: progress bars over batches and layer groups.
      apply_kwargs, mesh, data_axis, row_mask: as :func:`collect_input_stats` (the masked
        rows are also left out of the search's samples).
    Returns:
      New variables (``params`` kernels smoothed, ``quant_params/input_smoothing``); their
      activation parameters are stale: re-calibrate (:func:`qatjax.calibrate`).
    """
    fn = "smoothquant"
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"{fn}: `alpha` must be a float in [0, 1] or None (search), got {alpha!r}.")
    search = alpha is None
    batches, groups, stats, xs = _smoothing_statistics(
        model, variables, batches, fn, layers, "absmax", search, progress, apply_kwargs, mesh,
        data_axis, row_mask)
    out = _copy(variables)
    folded = []
    for group in _layer_bar(groups, progress, fn):
        lead = group[0]
        kernels = [_kernel(out, i) for i in group]
        ax = _node(stats, lead.path)["input_absmax"].amax
        if search:
            if not _int_weights(lead):
                raise ValueError(f"{fn}: searching alpha needs integer weights; layer {lead.path} has "
                                 f"{lead.config.weight_format}. Pass a fixed `alpha`.")
            s = core.smoothquant_search(
                xs[lead.path], kernels, ax, act_format=lead.config.activation_format,
                weight_quantizer=lead.config.weight_quantizer(),
                act_symmetric=lead.config.activation_symmetric, alphas=alphas,
                power_of_two=power_of_two).scales
        else:
            s = core.smoothquant_scales(ax, kernels, alpha, power_of_two=power_of_two)
        _smooth_group(out, variables, group, s, fold, fn, folded)
    if folded:
        _check_fold(model, variables, out, batches[0], apply_kwargs, folded, fn)
    return out


def _smoothing_statistics(model, variables, batches, fn: str, layers: str, statistic: str,
                          keep_inputs: bool, progress: bool, apply_kwargs, mesh, data_axis, row_mask):
    """The statistics pass of SmoothQuant / AWQ: ``(batches, groups, stats, inputs)``.

    ``groups``: the input groups of the layers matching ``layers`` that the method applies to
    (quantized activations for SmoothQuant's ``"absmax"``, integer weights for AWQ's
    ``"mean_abs"``); ``stats``: the per-channel ``statistic`` of each group's input over all
    ``batches``; ``inputs``: the groups' inputs (when ``keep_inputs``, for a search)."""
    batches = _check_batches(batches, fn)
    axes = data_axes(mesh, data_axis, False, fn)
    infos = input_groups(model, variables, batches[0], apply_kwargs=apply_kwargs)
    if statistic == "absmax":
        applies, what = (lambda i: i.config.activation_format is not None), "quantized activations"
    else:
        applies, what = _int_weights, "integer weights"
    groups = _select(infos, layers, applies)
    if not groups:
        raise ValueError(f"{fn}: no QatDense / QatDenseGeneral layer with {what} matches "
                         f"`layers`={layers!r}.")
    paths = frozenset(i.path for g in groups for i in g)
    stats, xs = _run_pass(model, variables, batches, (statistic,), paths, keep_inputs,
                          progress=progress, apply_kwargs=apply_kwargs, mesh=mesh, axes=axes,
                          desc=f"{fn} statistics", row_mask=row_mask)
    return batches, groups, stats, xs


def _smooth_group(out, variables, group, s, fold, fn: str, folded: list) -> None:
    """Applies the smoothing scales ``s`` of one input group to ``out`` (kernel rows times
    ``s``, and ``input_smoothing`` or the ``fold`` target's LayerNorm), recording a folded
    target in ``folded``."""
    target = _fold_target(group, fold, fn)
    if target is not None:
        folded.append(target)
    _apply_smoothing(out, variables, group, s, target)


# ----------------------------------------------------------------------------- AWQ
def awq(model: nn.Module, variables: Mapping[str, Any], batches: Sequence[Any], *,
        n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5, layers: str = ".*",
        fold: Mapping[str, str] | None = None, progress: bool = False,
        apply_kwargs: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
        data_axis: str | Sequence[str] | None = None,
        row_mask: Callable[..., Any] | None = None) -> dict:
    """AWQ (Lin et al., 2024) on every dense qatjax layer with integer weights.

    Per group of layers reading one tensor ``X``: ``m_j = mean|X_j|`` over all ``batches``
    (``"mean_abs"``), the scales ``s`` of :func:`qatjax.ptq.awq_scales` searched on the
    batches' inputs (grid ``alpha = i / n_grid``, the group's summed output error with the
    first layer's weight recipe), applied as SmoothQuant's (kernel rows times ``s``,
    ``input_smoothing`` or a LayerNorm fold, see :func:`smoothquant`); then, with ``clip``,
    each kernel is clamped to the ranges of :func:`qatjax.ptq.awq_clip` (its own weight
    recipe, on the smoothed inputs), which its weight path then quantizes.

    Args:
      model, variables, batches: as :func:`qatjax.calibrate` (``batches`` a list).
      n_grid: grid size of both searches; ``max_shrink``: the clip search's range.
      clip: run the clipping search.
      layers, fold, progress, apply_kwargs, mesh, data_axis, row_mask: as :func:`smoothquant`.
    Returns:
      New variables. Re-calibrate static activations afterwards (the inputs changed).
    """
    fn = "awq"
    batches, groups, stats, xs = _smoothing_statistics(
        model, variables, batches, fn, layers, "mean_abs", True, progress, apply_kwargs, mesh,
        data_axis, row_mask)
    out = _copy(variables)
    folded = []
    for group in _layer_bar(groups, progress, fn):
        lead = group[0]
        x = xs[lead.path]
        m = calibration.mean_abs(_node(stats, lead.path)["input_mean_abs"])
        s = core.awq_scales(x, [_kernel(out, i) for i in group], m,
                            lead.config.weight_quantizer(), n_grid=n_grid).scales
        _smooth_group(out, variables, group, s, fold, fn, folded)
        if clip:
            x_s = core.smooth_input(x, s)
            for info in group:
                q = info.config.weight_quantizer()
                w = _kernel(out, info)
                ranges = core.awq_clip(x_s, w, q, n_grid=n_grid, max_shrink=max_shrink)
                _set_kernel(out, info, core.clip_kernel(w, ranges, q))
    if folded:
        _check_fold(model, variables, out, batches[0], apply_kwargs, folded, fn)
    return out


# ----------------------------------------------------------------------------- GPTQ
def gptq(model: nn.Module, variables: Mapping[str, Any], batches: Sequence[Any], *,
         block_size: int = 128, percdamp: float | Sequence[float] = 0.01, act_order: bool = False,
         static_groups: bool = False, scale_search: str = "minmax", n_grid: int = 100,
         max_shrink: float = 0.8, norm: float = 2.4, sequential: bool = False,
         layers: str = ".*", progress: bool = False,
         apply_kwargs: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
         data_axis: str | Sequence[str] | None = None,
         row_mask: Callable[..., Any] | None = None, report: dict | None = None) -> dict:
    """GPTQ (Frantar et al., 2023) codes for every dense qatjax layer with integer weights.

    The Hessians ``H = 2 X^T X`` of the selected layers come from float-mode passes
    (:func:`collect_input_stats`, ``"hessian"``: exact sums, bit for bit the same on any
    number of devices); then each kernel is quantized by :func:`qatjax.ptq.gptq` with its
    layer's weight recipe.

    * ``sequential=False``: one pass, every ``X`` the float model's input of the layer.
    * ``sequential=True`` (the GPTQ paper's procedure): the selected layers, grouped by the
      tensor they read (query / key / value together), are quantized in call order, and the
      Hessians of each group come from a pass in which every layer quantized so far computes
      with its dequantized GPTQ kernel ``W_hat`` (float mode otherwise: the weight error of
      the prefix is seen, an activation quantization of the prefix is not). Each layer's
      codes then also compensate the error its quantized inputs carry... as far as ``H`` of
      the perturbed inputs allows: GPTQ still minimises ``||X_q W - X_q W_hat||^2`` on the
      inputs ``X_q`` of the partially quantized model. One pass per group.

    Dampening chosen per layer by cross-validation (``percdamp`` a sequence of candidates
    ``lambda_c``; at least two batches): with ``H_b`` the Hessian of batch ``b`` alone and
    ``W_hat_{c,b}`` the GPTQ kernel from ``sum_{b' != b} H_b'`` with ``lambda_c``, the layer
    keeps the ``lambda_c`` minimising the held-out output error
    ``sum_b ||X_b (W - W_hat_{c,b})||^2 = sum_b tr(D^T H_b D) / 2`` (``D = W - W_hat_{c,b}``;
    the first candidate on ties), then runs GPTQ on ``H = sum_b H_b`` with it. The data
    decide how far to trust ``H``: few calibration rows (fewer than ``K``) leave it
    rank-deficient, and GPTQ's updates in its null space then fit the calibration set. Costs
    ``len(percdamp) * (len(batches) + 1)`` GPTQ runs per layer; ``H`` is then a float32 sum
    of the exact per-batch Hessians (not the exact total).

    The result is written so that it serves unchanged:

    * default: ``quant_params/kernel_codes`` / ``kernel_scale`` / ``kernel_zero_point``
      exactly as :func:`qatjax.convert` stores them (the weight path,
      :func:`qatjax.qdot.encode_weight`, of the dequantized kernel with the GPTQ
      parameters), and ``params/kernel`` removed: the layer is converted (infer mode only);
    * LSQ (``learnable_scales``): ``params/kernel`` = the dequantized kernel
      ``(codes - zero_point) * scale`` and ``params/kernel_scale`` (/ ``kernel_zero_point``)
      the GPTQ parameters in serving form, from which train mode and :func:`qatjax.convert`
      give back the GPTQ codes (QAT continues from them). The kernel must be float32.

    Static activations must be calibrated before (a converted layer cannot calibrate).

    Args:
      model, variables, batches: as :func:`qatjax.calibrate` (``batches`` a list).
      block_size, percdamp, act_order, static_groups, scale_search, n_grid, max_shrink, norm:
        as :func:`qatjax.ptq.gptq`; ``percdamp`` may also be a sequence of candidates, chosen
        per layer by leave-one-batch-out cross-validation (see above).
      sequential: Hessians from the partially quantized model (see above).
      layers, progress, apply_kwargs, mesh, data_axis, row_mask: as :func:`smoothquant`
        (with ``row_mask`` the Hessians sum over the kept rows only, e.g. not over padding).
      report: None, or a dict that receives ``{layer path: chosen percdamp}`` when
        ``percdamp`` is cross-validated.
    Returns:
      New variables with the GPTQ codes (see above).
    """
    fn = "gptq"
    batches = _check_batches(batches, fn)
    axes = data_axes(mesh, data_axis, False, fn)
    infos = input_groups(model, variables, batches[0], apply_kwargs=apply_kwargs)
    selected = [i for g in _select(infos, layers, _int_weights) for i in g]
    if not selected:
        raise ValueError(f"{fn}: no QatDense / QatDenseGeneral layer with integer weights matches "
                         f"`layers`={layers!r}.")
    if not isinstance(sequential, (bool, np.bool_)):
        raise TypeError(f"{fn}: `sequential` must be a bool, got {sequential!r}.")
    cv = isinstance(percdamp, Sequence) and not isinstance(percdamp, str)
    if cv:
        candidates = core._common.check_grid(percdamp, fn, "percdamp", 0.0, math.inf)
        if len(batches) < 2:
            raise ValueError(f"{fn}: choosing `percdamp` among {candidates} cross-validates over "
                             f"the batches: pass at least 2, got {len(batches)}.")
    if any(_needs_descriptors(variables, i) for i in selected):
        variables = _descriptors(model, variables, selected, batches[0], apply_kwargs, fn)
    options = {"block_size": block_size, "act_order": act_order, "static_groups": static_groups,
               "scale_search": scale_search, "n_grid": n_grid, "max_shrink": max_shrink,
               "norm": norm}
    pass_kw = {"apply_kwargs": apply_kwargs, "mesh": mesh, "axes": axes, "row_mask": row_mask,
               "per_batch": cv}
    chosen: dict[str, float] = {}

    def quantize_layer(info: LayerInfo, stats: Any) -> jax.Array:
        kernel, quantizer = _kernel(out, info), info.config.weight_quantizer()
        if not cv:
            h = calibration.hessian_matrix(_node(stats, info.path)["input_hessian"])
            return _write_gptq(out, info, core.gptq(kernel, h, quantizer, percdamp=percdamp,
                                                    **options))
        hs = [calibration.hessian_matrix(_node(st, info.path)["input_hessian"]) for st in stats]
        h = _sum_hessians(hs)
        lam = _cross_validated_percdamp(kernel, hs, quantizer, candidates, options)
        chosen[info.path] = lam
        return _write_gptq(out, info, core.gptq(kernel, h, quantizer, percdamp=lam, **options))

    out = _copy(variables)
    if not sequential:
        stats, _ = _run_pass(model, variables, batches, ("hessian",),
                             frozenset(i.path for i in selected), False, desc="gptq hessians",
                             progress=progress, **pass_kw)
        for info in _layer_bar(selected, progress, "gptq"):
            quantize_layer(info, stats)
    else:
        # `work` holds the float kernels with the quantized prefix's W_hat.
        work = _copy(variables)
        for group in _layer_bar(_select(infos, layers, _int_weights), progress, "gptq (sequential)"):
            stats, _ = _run_pass(model, work, batches, ("hessian",),
                                 frozenset(i.path for i in group), False, desc="gptq hessians",
                                 progress=False, **pass_kw)
            for info in group:
                _set_kernel(work, info, quantize_layer(info, stats))
    if report is not None:
        report.update(chosen)
    return out


def _sum_hessians(hs: Sequence[jax.Array]) -> jax.Array:
    """``sum_b H_b`` (float64 accumulation, in batch order; rounded once to float32)."""
    return jnp.asarray(np.sum([np.asarray(h, np.float64) for h in hs], axis=0), jnp.float32)


def _cross_validated_percdamp(kernel: jax.Array, hs: Sequence[jax.Array],
                              quantizer: Any, candidates: Sequence[float],
                              options: Mapping[str, Any]) -> float:
    """The candidate dampening with the smallest leave-one-batch-out output error (see
    :func:`gptq`)."""
    w = np.asarray(kernel, np.float64)
    k, n = w.shape
    rest = [_sum_hessians([g for j, g in enumerate(hs) if j != b]) for b in range(len(hs))]
    errors = []
    for lam in candidates:
        err = 0.0
        for h_rest, h_b in zip(rest, hs):
            res = core.gptq(kernel, h_rest, quantizer, percdamp=lam, **options)
            scale = np.asarray(res.qparams.scale, np.float64)
            zp = np.asarray(res.qparams.zero_point, np.float64)
            codes = np.asarray(res.codes, np.float64)
            if scale.ndim == 3:  # per group: [G, 1, N] against [G, g, N]
                codes = codes.reshape(scale.shape[0], -1, n)
            d = w - ((codes - zp) * scale).reshape(k, n)
            err += 0.5 * float(np.sum(d * (np.asarray(h_b, np.float64) @ d)))
        errors.append(err)
    return float(candidates[int(np.argmin(errors))])


def _needs_descriptors(variables: Mapping[str, Any], info: LayerInfo) -> bool:
    try:
        return "kernel_spec" not in _node(variables.get("quant_params", {}), info.path)
    except (KeyError, TypeError):
        return True


def _descriptors(model, variables, selected, sample, apply_kwargs, fn) -> dict:
    """Variables with the layers' recipe descriptors (:func:`qatjax.finalize`), for a float
    checkpoint of a model without static activations."""
    for info in selected:
        act = info.config.activation_quantizer()
        if act is not None and act.static:
            raise ValueError(f"{fn}: layer {info.path} has static activation scaling and no "
                             "calibrated quant_params; run qatjax.calibrate first.")
    return finalize(model, variables, sample, apply_kwargs=apply_kwargs)


def _write_gptq(out: dict, info: LayerInfo, result: core.GPTQResult) -> jax.Array:
    """Stores a GPTQ result in the form the layer serves unchanged (see :func:`gptq`);
    returns the dequantized kernel ``[K, N]``."""
    qp_tree = _node(out["quant_params"], info.path)
    spec = _layout(qp_tree, False)
    perm = spec.serving_perm(2)
    codes = jnp.transpose(result.codes, perm)
    scale, zp = (to_serving(a, spec) for a in result.qparams)
    w_hat = decode_weight(codes, QParams(scale, zp), spec)  # (codes - zp) * scale, [K, N]
    params = _node(out["params"], info.path)
    if info.config.learnable_scales:
        if jnp.asarray(nn.meta.unbox(params["kernel"])).dtype != jnp.float32:
            raise ValueError(f"gptq: layer {info.path}: with learnable_scales the dequantized GPTQ "
                             "kernel is stored as params/kernel, which must be float32 to keep "
                             "the codes exact.")
        _set_kernel(out, info, w_hat)
        params["kernel_scale"] = scale.astype(jnp.float32)
        if not info.config.weight_symmetric:
            params["kernel_zero_point"] = zp.astype(jnp.float32)
        return w_hat
    served, serving = encode_weight(w_hat, result.qparams, spec)  # the one weight path
    if not np.array_equal(np.asarray(served), np.asarray(codes)):
        raise AssertionError(f"gptq: layer {info.path}: the weight path does not give back the "
                             "GPTQ codes.")
    qp_tree["kernel_codes"] = served
    qp_tree["kernel_scale"], qp_tree["kernel_zero_point"] = serving
    for name in ("kernel", "kernel_scale", "kernel_zero_point"):
        params.pop(name, None)
    return w_hat


# ----------------------------------------------------------------------------- sensitivity
@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One layer's sensitivity.

    Attributes:
      path: the layer.
      model_error: the model output's error against float when only this layer is quantized
        (its recipe, train mode = the serving codes), the other layers and intercepted
        einsums float (see :func:`layer_sensitivity`'s ``metric``).
      own_error: ``||y_q - y_f|| / ||y_f||`` of the layer's own output on float inputs
        (:func:`qatjax.quant_report`).
    """

    path: str
    model_error: float
    own_error: float | None


def _output_error(y: Any, ref: Any, metric: str) -> jax.Array:
    """``mean(1 - cos)`` over the rows of the last axis (``"cosine"``), its max
    (``"max_cosine"``), or ``||y - ref|| / ||ref||`` (``"relative"``) of the leaves."""
    ys, refs = jax.tree_util.tree_leaves(y), jax.tree_util.tree_leaves(ref)
    if metric == "relative":
        num = sum(jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2) for a, b in zip(ys, refs))
        den = sum(jnp.sum(b.astype(jnp.float32) ** 2) for b in refs)
        return jnp.sqrt(num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny))
    errs = []
    for a, b in zip(ys, refs):
        a = a.astype(jnp.float32).reshape(-1, a.shape[-1])
        b = b.astype(jnp.float32).reshape(-1, b.shape[-1])
        cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1),
                                               jnp.finfo(jnp.float32).tiny)
        errs.append(1.0 - cos)
    e = jnp.concatenate(errs)
    return jnp.max(e) if metric == "max_cosine" else jnp.mean(e)


def layer_sensitivity(model: nn.Module, variables: Mapping[str, Any], sample: Any, *,
                      metric: str = "cosine", layers: str = ".*", progress: bool = False,
                      apply_kwargs: Mapping[str, Any] | None = None
                      ) -> tuple[LayerSensitivity, ...]:
    """Each dense qatjax layer's effect on the model output when it alone is quantized.

    One compiled program (the quantized layer is a traced index: every layer computes its
    float and its quantized output and keeps one), run once for float and once per layer
    on ``sample``. Static activations need calibrated variables (:func:`qatjax.calibrate`);
    layers already converted (GPTQ codes) are refused.

    Args:
      model, variables: a calibrated model (float kernels).
      sample: one batch (a tuple is unpacked).
      metric: ``"cosine"``: mean over the output rows (last axis) of ``1 - cos(y, y_float)``;
        ``"max_cosine"``: the largest; ``"relative"``: ``||y - y_float|| / ||y_float||``.
      layers: regex on layer paths (matched in full).
      progress: tqdm bar over the layers.
      apply_kwargs: extra keyword arguments of ``model.apply``.
    Returns:
      One :class:`LayerSensitivity` per layer, in call order.
    """
    fn = "layer_sensitivity"
    if metric not in ("cosine", "max_cosine", "relative"):
        raise ValueError(f"{fn}: `metric` must be 'cosine', 'max_cosine' or 'relative', got {metric!r}.")
    infos = [i for g in _select(input_groups(model, variables, sample, apply_kwargs=apply_kwargs),
                                layers, lambda i: True) for i in g]
    if not infos:
        raise ValueError(f"{fn}: no QatDense / QatDenseGeneral layer matches `layers`={layers!r}.")
    for info in infos:
        _kernel(variables, info)  # raises for converted layers
    index = {info.path: n for n, info in enumerate(infos)}
    kwargs = dict(apply_kwargs or {})

    def run(v, which, args):
        def interceptor(next_fun, a, kw, context):
            hit = _dense_call(context)
            if hit is None or "/".join(hit[0].scope.path) not in index:
                return next_fun(*a, **kw)
            with quant_mode("train"):
                y_q = next_fun(*a, **kw)
            with quant_mode("float"):  # the same layer, unbound, on the same input
                layer = hit[0]
                y_f = layer.clone(parent=None).apply(layer.variables, *a, **kw)
            return jnp.where(which == index["/".join(layer.scope.path)], y_q, y_f)

        with quant_mode("float"), nn.intercept_methods(_outermost(interceptor)):
            y, _ = model.apply(v, *args, mutable=["quant_stats"], **kwargs)
        return y

    step = jax.jit(run)
    args = _as_args(sample)
    ref = step(dict(variables), jnp.int32(-1), args)
    errors = []
    for n in _layer_bar(range(len(infos)), progress, "sensitivity"):
        errors.append(float(_output_error(step(dict(variables), jnp.int32(n), args), ref, metric)))
    own = {r.path: r.output_error for r in quant_report(variables, model, sample,
                                                        apply_kwargs=apply_kwargs).layers}
    return tuple(LayerSensitivity(i.path, e, own.get(i.path)) for i, e in zip(infos, errors))


def weight_sensitivity(model: nn.Module, float_variables: Mapping[str, Any],
                       quantized_variables: Mapping[str, Any], sample: Any, *,
                       metric: str = "cosine", layers: str = ".*",
                       apply_kwargs: Mapping[str, Any] | None = None
                       ) -> tuple[LayerSensitivity, ...]:
    """Each layer's effect on the model output when only its *kernel* is the served one.

    The served kernel ``W_hat_l [K, N]`` of every quantized dense layer of
    ``quantized_variables`` is what it serves (:func:`qatjax.quantize_model_weights`, then
    ``(codes - zero_point) * scale``: round to nearest, AWQ-clipped or GPTQ codes alike; for
    a smoothed layer the kernel of ``x / s``). Per layer ``l``, the model runs in float mode on
    ``float_variables`` with kernel ``l`` replaced by ``W_hat_l`` (activations and the other
    layers float), and the error against the float output is measured as in
    :func:`layer_sensitivity` (``metric``). One compiled program (the kernels are data).
    Unlike :func:`layer_sensitivity` this also measures layers GPTQ has converted, and it
    leaves activation quantization out: mixed-precision candidates that share the
    activation recipe differ by their weights only.

    Args:
      model: the quantized model (run in float mode).
      float_variables: its variables with every layer's float kernel (and the same
        ``input_smoothing`` as ``quantized_variables``).
      quantized_variables: variables whose weight path gives the served kernels.
      sample: one batch (a tuple is unpacked).
      metric, layers, apply_kwargs: as :func:`layer_sensitivity`.
    Returns:
      One :class:`LayerSensitivity` per quantized dense layer, in call order
      (``own_error``: ``||W_hat - W||_F / ||W||_F``).
    """
    from qatjax.flax.model import dequantize_weights, quantize_model_weights

    fn = "weight_sensitivity"
    if metric not in ("cosine", "max_cosine", "relative"):
        raise ValueError(f"{fn}: `metric` must be 'cosine', 'max_cosine' or 'relative', got {metric!r}.")
    exported = quantize_model_weights(quantized_variables, pack=False)
    # The kernels in the smoothed domain (float mode divides the input by s itself).
    entries = {k: {n: a for n, a in e.items() if n != "input_smoothing"}
               for k, e in exported["layers"].items()}
    served = dequantize_weights({"layers": entries, "params": {}})
    infos = [i for g in _select(input_groups(model, float_variables, sample,
                                             apply_kwargs=apply_kwargs), layers,
                                lambda i: i.path in entries) for i in g]
    if not infos:
        raise ValueError(f"{fn}: no quantized dense layer of `quantized_variables` matches "
                         f"`layers`={layers!r}.")
    kwargs = dict(apply_kwargs or {})

    @jax.jit
    def run(v, args):
        with quant_mode("float"):
            y, _ = model.apply(v, *args, mutable=["quant_stats"], **kwargs)
        return y

    args = _as_args(sample)
    ref = run(dict(float_variables), args)
    rows = []
    for info in infos:
        v = _copy(float_variables)
        w = _kernel(v, info)
        w_hat = jnp.asarray(_node(served, info.path)["kernel"]).reshape(w.shape)
        _set_kernel(v, info, w_hat)
        err = float(_output_error(run(v, args), ref, metric))
        own = float(jnp.linalg.norm(w_hat - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30))
        rows.append(LayerSensitivity(info.path, err, own))
    return tuple(rows)


# ----------------------------------------------------------------------------- mixed precision
def _weight_bits(cfg: QatConfig | None) -> float:
    """Bits per weight of a recipe's format (float weights: 32)."""
    return 32.0 if cfg is None or cfg.weight_format is None else float(cfg.weight_format.bits)


@dataclasses.dataclass(frozen=True)
class MixedPrecisionPlan:
    """A format per layer (what :func:`search_mixed_precision` returns).

    Attributes:
      assignment: ``((layer path, candidate name), ...)`` in the order given.
      candidates: ``((name, QatConfig or None), ...)``.
      avg_bits: ``sum_l bits(c_l) * size_l / sum_l size_l``.
      objective: the summed sensitivities of the assignment.
    """

    assignment: tuple[tuple[str, str], ...]
    candidates: tuple[tuple[str, QatConfig | None], ...]
    avg_bits: float
    objective: float

    def rules(self) -> list[tuple[str, QatConfig | None]]:
        """``quantize_model`` rules: one ``(re.escape(path), config)`` per layer."""
        configs = dict(self.candidates)
        return [(re.escape(path), configs[name]) for path, name in self.assignment]

    def to_yaml(self, default: QatConfig | None = None) -> str:
        """The plan as a recipe file :meth:`PTQRecipe.from_yaml` reads (``quant`` = ``default``,
        or the first candidate; one rule per layer)."""
        configs = dict(self.candidates)
        base = default if default is not None else self.candidates[0][1]
        doc = {"description": f"mixed precision, {self.avg_bits:.3f} bits per weight",
               "quant": None if base is None else base.to_dict(),
               "rules": [{"pattern": p, "quant": None if configs[n] is None else configs[n].to_dict()}
                         for p, n in self.rules_by_name()]}
        return yaml.safe_dump(doc, sort_keys=False)

    def rules_by_name(self) -> list[tuple[str, str]]:
        """``(re.escape(path), candidate name)`` per layer."""
        return [(re.escape(path), name) for path, name in self.assignment]


def search_mixed_precision(errors: Mapping[str, Mapping[str, float]],
                           sizes: Mapping[str, int],
                           candidates: Mapping[str, QatConfig | None], *,
                           budget_bits: float,
                           bits: Mapping[str, float] | None = None) -> MixedPrecisionPlan:
    """The format per layer minimising ``sum_l errors[c_l][l]`` subject to
    ``sum_l bits[c_l] size_l <= budget_bits * sum_l size_l``.

    Exact: a multiple-choice knapsack solved by dynamic programming over the reachable total
    bit counts (a dict from total bits to the best objective and its choices; totals above
    the budget are pruned, as are those dominated by a cheaper total with a smaller
    objective). The objective treats the layers' errors as additive (a first-order model of
    how they compose).

    Args:
      errors: ``{candidate name: {layer path: error}}`` (e.g. :func:`layer_sensitivity`'s
        ``model_error``), every candidate over the same layers.
      sizes: ``{layer path: number of weights}``.
      candidates: ``{name: QatConfig}`` (None: float).
      budget_bits: the largest average bits per weight.
      bits: ``{name: bits per weight}``; default the weight format's bits (32 for float;
        scales not counted).
    Returns:
      A :class:`MixedPrecisionPlan`.
    Raises:
      ValueError: inconsistent layers or names, or no assignment fits the budget.
    """
    fn = "search_mixed_precision"
    names = list(candidates)
    if not names or set(errors) != set(names):
        raise ValueError(f"{fn}: `errors` must have one entry per candidate {names}, got {list(errors)}.")
    paths = list(sizes)
    for name in names:
        if set(errors[name]) != set(paths):
            raise ValueError(f"{fn}: errors[{name!r}] must cover exactly the layers of `sizes`.")
    bits = {n: _weight_bits(candidates[n]) for n in names} if bits is None else dict(bits)
    if set(bits) != set(names):
        raise ValueError(f"{fn}: `bits` must give every candidate's bits, got {sorted(bits)}.")
    total = sum(int(sizes[p]) for p in paths)
    cap = budget_bits * total
    # total bits -> (objective, choices); kept Pareto-optimal.
    states: dict[float, tuple[float, tuple[str, ...]]] = {0.0: (0.0, ())}
    for p in paths:
        nxt: dict[float, tuple[float, tuple[str, ...]]] = {}
        for used, (obj, choice) in states.items():
            for n in names:
                u = used + bits[n] * int(sizes[p])
                if u > cap * (1 + 1e-12):
                    continue
                o = obj + float(errors[n][p])
                if u not in nxt or o < nxt[u][0]:
                    nxt[u] = (o, choice + (n,))
        front, best = {}, math.inf
        for u in sorted(nxt):
            if nxt[u][0] < best:
                front[u], best = nxt[u], nxt[u][0]
        states = front
        if not states:
            raise ValueError(f"{fn}: no assignment fits {budget_bits} bits per weight (the "
                             f"cheapest candidate has {min(bits.values())}).")
    used, (obj, choice) = min(states.items(), key=lambda kv: (kv[1][0], kv[0]))
    return MixedPrecisionPlan(tuple(zip(paths, choice)), tuple(candidates.items()),
                              used / total, obj)


def mixed_precision(float_model: nn.Module, params: Mapping[str, Any], batches: Sequence[Any],
                    candidates: Mapping[str, QatConfig], *, budget_bits: float, sample: Any = None,
                    bits: Mapping[str, float] | None = None, metric: str = "cosine",
                    progress: bool = False, apply_kwargs: Mapping[str, Any] | None = None
                    ) -> tuple[MixedPrecisionPlan, dict[str, tuple[LayerSensitivity, ...]]]:
    """Sensitivities of every candidate recipe, then :func:`search_mixed_precision`.

    For each candidate: ``quantize_model(float_model, config)``, calibrated on ``batches``
    when it has static activations, and :func:`layer_sensitivity` on ``sample`` (default the
    first batch). The layers' sizes are their ``K * N``.

    Returns:
      ``(plan, {candidate name: sensitivities})``; ``plan.rules()`` are ``quantize_model``
      rules, ``plan.to_yaml()`` a recipe.
    """
    from qatjax.flax.intercept import quantize_model

    batches = _check_batches(batches, "mixed_precision")
    sample = batches[0] if sample is None else sample
    table: dict[str, tuple[LayerSensitivity, ...]] = {}
    sizes: dict[str, int] = {}
    for name, cfg in candidates.items():
        qmodel = quantize_model(float_model, cfg)
        v = {"params": params}
        act = cfg.activation_quantizer()
        v = (calibrate(qmodel, v, batches, apply_kwargs=apply_kwargs) if act is not None and act.static
             else finalize(qmodel, v, batches[0], apply_kwargs=apply_kwargs))
        table[name] = layer_sensitivity(qmodel, v, sample, metric=metric, progress=progress,
                                        apply_kwargs=apply_kwargs)
        if not sizes:
            sizes = {i.path: i.in_features * i.out_features
                     for i in input_groups(qmodel, v, sample, apply_kwargs=apply_kwargs)}
    errors = {n: {s.path: s.model_error for s in rows} for n, rows in table.items()}
    plan = search_mixed_precision(errors, sizes, dict(candidates), budget_bits=budget_bits, bits=bits)
    return plan, table


# ----------------------------------------------------------------------------- recipes
@dataclasses.dataclass(frozen=True)
class PTQRecipe:
    """A post-training pipeline: recipes per layer and the weight transforms to run.

    Attributes:
      config: the recipe of layers no rule matches (``quantize_model``'s ``config``).
      rules: ``((path regex, QatConfig or None), ...)``, ``quantize_model``'s rules.
      smoothquant: None, or :func:`smoothquant`'s keyword arguments (``alpha``, ``layers``...).
      awq: None, or :func:`awq`'s keyword arguments (``n_grid``, ``clip``...).
      gptq: None, or :func:`gptq`'s keyword arguments (``block_size``, ``act_order``...).

    YAML (:meth:`from_yaml`): ``quant:`` (a QatConfig mapping), ``rules:`` (a list of
    ``{pattern, quant}``; ``quant: null`` keeps a layer float), ``ptq:`` with optional
    ``smoothquant:`` / ``awq:`` / ``gptq:`` mappings (``{}`` for the defaults).
    """

    config: QatConfig | None = QatConfig()
    rules: tuple[tuple[str, QatConfig | None], ...] = ()
    smoothquant: Mapping[str, Any] | None = None
    awq: Mapping[str, Any] | None = None
    gptq: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name, fun in (("smoothquant", smoothquant), ("awq", awq), ("gptq", gptq)):
            settings = getattr(self, name)
            if settings is None:
                continue
            if not isinstance(settings, Mapping):
                raise TypeError(f"PTQRecipe: `{name}` must be a mapping of keyword arguments or "
                                f"None, got {type(settings).__name__}.")
            import inspect

            allowed = {p.name for p in inspect.signature(fun).parameters.values()
                       if p.kind == p.KEYWORD_ONLY} - {"progress", "apply_kwargs", "mesh", "data_axis",
                                                             "row_mask", "report"}
            unknown = sorted(set(settings) - allowed)
            if unknown:
                raise ValueError(f"PTQRecipe: unknown `{name}` setting(s) {unknown}; known: "
                                 f"{sorted(allowed)}.")
            object.__setattr__(self, name, dict(settings))

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> "PTQRecipe":
        """Loads a recipe file (or YAML text); see the class docstring for the layout."""
        text = str(path_or_text)
        if os.path.exists(text):
            with open(text, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        else:
            data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise ValueError(f"PTQRecipe.from_yaml: expected a mapping with `quant`, `rules`, "
                             f"`ptq`, got {type(data).__name__}.")
        unknown = sorted(set(data) - {"description", "recipe", "quant", "rules", "ptq"})
        if unknown:
            raise ValueError(f"PTQRecipe.from_yaml: unknown top-level key(s) {unknown}.")
        quant = data.get("quant")
        config = None if quant is None else QatConfig.from_dict(quant)
        rules = []
        for rule in data.get("rules") or ():
            if not isinstance(rule, Mapping) or set(rule) != {"pattern", "quant"}:
                raise ValueError(f"PTQRecipe.from_yaml: each rule must be {{pattern, quant}}, got {rule!r}.")
            rules.append((str(rule["pattern"]),
                          None if rule["quant"] is None else QatConfig.from_dict(rule["quant"])))
        ptq_section = data.get("ptq") or {}
        unknown = sorted(set(ptq_section) - {"smoothquant", "awq", "gptq"})
        if unknown:
            raise ValueError(f"PTQRecipe.from_yaml: unknown `ptq` method(s) {unknown}.")
        methods = {k: (dict(v) if v else {}) for k, v in ptq_section.items()}
        return cls(config, tuple(rules), **methods)

    def to_yaml(self) -> str:
        """The recipe as YAML (:meth:`from_yaml` reads it back)."""
        doc: dict[str, Any] = {"quant": None if self.config is None else self.config.to_dict()}
        if self.rules:
            doc["rules"] = [{"pattern": p, "quant": None if c is None else c.to_dict()}
                            for p, c in self.rules]
        ptq_section = {k: dict(getattr(self, k)) for k in ("smoothquant", "awq", "gptq")
                       if getattr(self, k) is not None}
        if ptq_section:
            doc["ptq"] = ptq_section
        return yaml.safe_dump(doc, sort_keys=False)


def run_ptq(float_model: nn.Module, params: Mapping[str, Any], batches: Sequence[Any],
            recipe: PTQRecipe, *, progress: bool = False,
            apply_kwargs: Mapping[str, Any] | None = None,
            row_mask: Callable[..., Any] | None = None) -> tuple[nn.Module, dict]:
    """Runs a :class:`PTQRecipe` on a float model: ``quantize_model(float_model, recipe.config,
    rules=recipe.rules)``, then SmoothQuant, AWQ, calibration of static activations (or the
    descriptors only, :func:`qatjax.finalize`), GPTQ -- each when the recipe asks for it.

    ``row_mask`` (a function of a batch's arguments, see :func:`collect_input_stats`) leaves
    the rows it marks 0 (padding) out of SmoothQuant's, AWQ's and GPTQ's statistics; it is
    code, not data, so it is an argument here rather than a recipe setting.

    Returns:
      ``(quantized model, variables)``: serve with :func:`qatjax.convert` and ``mode="infer"``.
    """
    from qatjax.flax.intercept import quantize_model

    batches = _check_batches(batches, "run_ptq")
    qmodel = quantize_model(float_model, recipe.config, rules=recipe.rules)
    kw = {"progress": progress, "apply_kwargs": apply_kwargs}
    mask_kw = {"row_mask": row_mask}
    v: dict = {"params": params}
    if recipe.smoothquant is not None:
        v = smoothquant(qmodel, v, batches, **recipe.smoothquant, **kw, **mask_kw)
    if recipe.awq is not None:
        v = awq(qmodel, v, batches, **recipe.awq, **kw, **mask_kw)
    configs = [c for c in (recipe.config, *(c for _, c in recipe.rules)) if c is not None]
    static = any(c.activation_quantizer() is not None and c.activation_quantizer().static
                 for c in configs)
    v = (calibrate(qmodel, v, batches, **kw) if static
         else finalize(qmodel, v, batches[0], apply_kwargs=apply_kwargs))
    if recipe.gptq is not None:
        v = gptq(qmodel, v, batches, **recipe.gptq, **kw, **mask_kw)
    return qmodel, v
