"""Transformer-grade post-training quantization of NNX models: SmoothQuant, AWQ, GPTQ and
per-layer sensitivity on an NNX model's qatjax drop-ins, in place.

The same tools as :mod:`qatjax.flax.ptq`, run on a linen view of the model: a linen module
whose variables are the model's collections (:func:`qatjax.nnx.collections`) and whose call
runs the NNX model with every :class:`~qatjax.nnx.QatLinear` /
:class:`~qatjax.nnx.QatLinearGeneral` (and the other drop-ins) executing its linen twin
bound at the layer's own path. The linen tools see the twins as the
:class:`~qatjax.flax.QatDense` / :class:`~qatjax.flax.QatDenseGeneral` layers they act on,
so there is one implementation of each method, and an NNX model gets bit for bit the
result of the same linen model. Their results are written back with
:func:`qatjax.nnx.set_collections`.

Within the view only the drop-ins' state changes; the rest of the model (its other modules,
and the contractions :func:`qatjax.nnx.quantize_model` intercepts in them) reads its
variables and keeps them. Typical use, on a model quantized by
:func:`qatjax.nnx.quantize_model`::

    qatjax.nnx.ptq.smoothquant(model, batches, alpha=0.8, layers=r".*/(query|key|value)")
    qatjax.nnx.calibrate(model, batches)
    qatjax.nnx.ptq.gptq(model, batches, act_order=True)   # int weights: served codes
    qatjax.nnx.convert(model)

:func:`mixed_precision` picks a recipe per layer under a bits budget (the sensitivities of
each candidate, then :func:`qatjax.flax.ptq.search_mixed_precision`), and :func:`run_ptq` runs
a :class:`qatjax.flax.ptq.PTQRecipe` on a float NNX model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from qatjax.config import QatConfig
from qatjax.flax import ptq as linen_ptq
from qatjax.flax.intercept import _within
from qatjax.nnx.layers import VARIABLE_TYPES, _LinenBacked, linen_view
from qatjax.nnx.model import (
    calibrate,
    collections,
    quantize_model,
    quantized_layers,
    set_collections,
)

__all__ = ["collect_input_stats", "input_groups", "smoothquant", "awq", "gptq",
           "layer_sensitivity", "mixed_precision", "run_ptq"]


@dataclasses.dataclass(frozen=True, eq=False)
class _Frozen:
    """A constant carried by a linen module's attribute (never hashed, compared or traversed)."""

    value: Any


class _Node(nn.Module):
    """A step of a drop-in's path inside the view: calls the twin at ``rest`` below itself."""

    @nn.compact
    def __call__(self, rest: tuple[str, ...], twin: _Frozen, *args: Any, **kwargs: Any) -> Any:
        if len(rest) == 1:
            return twin.value.clone(parent=self, name=rest[0])(*args, **kwargs)
        return _Node(name=rest[0])(rest[1:], twin, *args, **kwargs)


class _View:
    """The running view (see :data:`qatjax.nnx.layers.linen_view`): the host module and each
    drop-in's path."""

    def __init__(self, host: nn.Module, model: nnx.Module) -> None:
        self.host = host
        self.paths = {id(layer): path for path, layer in quantized_layers(model)}
        self.top: dict[str, nn.Module] = {}  # this call's modules directly below the host

    def call(self, layer: _LinenBacked, args: tuple, kwargs: dict[str, Any]) -> Any:
        path = self.paths[id(layer)]
        mode = kwargs.pop("mode", None) or layer.mode
        if mode is not None:
            kwargs["mode"] = mode
        # As in the layer's own call: nothing inside it is intercepted by the enclosing
        # module's quantize_model frame.
        if len(path) == 1:
            twin = self.top.get(path[0])
            if twin is None:
                twin = self.top[path[0]] = layer._twin.clone(parent=self.host, name=path[0])
            return _within(None, twin, args, kwargs)
        node = self.top.get(path[0])
        if node is None:
            node = self.top[path[0]] = _Node(parent=self.host, name=path[0])
        return _within(None, node, (path[1:], _Frozen(layer._twin)) + tuple(args), kwargs)


class _LinenView(nn.Module):
    """An NNX model as a linen module over its collections (see the module docstring)."""

    graphdef: Any
    state: _Frozen

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Fresh Variables of this trace (a copy of the state's tree), then this call's values.
        model = nnx.merge(self.graphdef, jax.tree_util.tree_map(lambda a: a, self.state.value))
        tree = {col: self.variables[col] for col in VARIABLE_TYPES if col in self.variables}
        for col, var_type in VARIABLE_TYPES.items():  # the other modules' variables
            for path, variable in nnx.to_flat_state(nnx.state(model, var_type)):
                value = tree.get(col, {})
                for key in map(str, path):
                    value = value.get(key) if isinstance(value, Mapping) else None
                if value is not None:
                    variable.set_value(value)
        token = linen_view.set(_View(self, model))
        try:
            return model(*args, **kwargs)
        finally:
            linen_view.reset(token)


def _view(model: nnx.Module, fn: str) -> tuple[nn.Module, dict[str, Any]]:
    """``(linen module, its variables)`` for ``model``."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"qatjax.nnx.ptq.{fn}: `model` must be an NNX module, got "
                        f"{type(model).__name__}.")
    if not quantized_layers(model):
        raise ValueError(f"qatjax.nnx.ptq.{fn}: the model has no qatjax layers (QatLinear, "
                         "QatLinearGeneral, ... or qatjax.nnx.quantize_model).")
    graphdef, state = nnx.split(model)
    return _LinenView(graphdef, _Frozen(state)), collections(model)


def _transform(name: str):
    """The NNX form of the linen tool ``name``, which returns new variables."""
    tool = getattr(linen_ptq, name)

    def run(model: nnx.Module, batches: Sequence[Any], **kwargs: Any) -> nnx.Module:
        view, variables = _view(model, name)
        return set_collections(model, tool(view, variables, batches, **kwargs))

    run.__name__ = run.__qualname__ = name
    run.__doc__ = (f"``qatjax.flax.ptq.{name}`` on an NNX model, in place: "
                   f"``{name}(model, batches, **kwargs) -> model`` takes the keyword arguments "
                   f"of :func:`qatjax.flax.ptq.{name}` (``apply_kwargs`` are the model call's).\n\n"
                   f"Raises:\n  TypeError / ValueError: as the linen tool, or for a model "
                   f"without qatjax layers.")
    return run


smoothquant = _transform("smoothquant")
awq = _transform("awq")
gptq = _transform("gptq")
collect_input_stats = _transform("collect_input_stats")


def input_groups(model: nnx.Module, sample: Any, **kwargs: Any
                 ) -> tuple[linen_ptq.LayerInfo, ...]:
    """:func:`qatjax.flax.ptq.input_groups` of an NNX model: its dense drop-ins in call order,
    with the tensor each reads (paths as in :func:`qatjax.nnx.collections`)."""
    view, variables = _view(model, "input_groups")
    return linen_ptq.input_groups(view, variables, sample, **kwargs)


def layer_sensitivity(model: nnx.Module, sample: Any, **kwargs: Any
                      ) -> tuple[linen_ptq.LayerSensitivity, ...]:
    """:func:`qatjax.flax.ptq.layer_sensitivity` of an NNX model (calibrated, float kernels):
    each dense drop-in's effect on the model output when it alone is quantized."""
    view, variables = _view(model, "layer_sensitivity")
    return linen_ptq.layer_sensitivity(view, variables, sample, **kwargs)


def _calibrated(model: nnx.Module, configs: Sequence[QatConfig | None], batches: Sequence[Any],
                call_kwargs: Mapping[str, Any] | None, progress: bool) -> nnx.Module:
    """``model`` (quantized with ``configs``) calibrated on ``batches`` when one of them has
    static activations, else given its descriptors from the first batch alone."""
    static = any(c is not None and c.activation_quantizer() is not None
                 and c.activation_quantizer().static for c in configs)
    return calibrate(model, batches if static else batches[:1], call_kwargs=call_kwargs,
                     progress=progress)


def mixed_precision(float_model: nnx.Module, batches: Sequence[Any],
                    candidates: Mapping[str, QatConfig], *, budget_bits: float,
                    sample: Any = None, bits: Mapping[str, float] | None = None,
                    metric: str = "cosine", progress: bool = False,
                    call_kwargs: Mapping[str, Any] | None = None
                    ) -> tuple[linen_ptq.MixedPrecisionPlan,
                               dict[str, tuple[linen_ptq.LayerSensitivity, ...]]]:
    """:func:`qatjax.flax.ptq.mixed_precision` for a float NNX model (left unchanged): for each
    candidate, a copy quantized with it (:func:`qatjax.nnx.quantize_model`), calibrated on
    ``batches``, and its :func:`layer_sensitivity` on ``sample`` (default the first batch);
    then the exact search under ``budget_bits``.

    Returns:
      ``(plan, {candidate name: sensitivities})``: quantize with
      ``qatjax.nnx.quantize_model(float_model, config, rules=plan.rules())``.
    """
    batches = linen_ptq._check_batches(batches, "mixed_precision")
    sample = batches[0] if sample is None else sample
    table: dict[str, tuple[linen_ptq.LayerSensitivity, ...]] = {}
    sizes: dict[str, int] = {}
    for name, cfg in candidates.items():
        model = _calibrated(quantize_model(nnx.clone(float_model), cfg), [cfg], batches,
                            call_kwargs, progress)
        kwargs = {"apply_kwargs": call_kwargs}
        table[name] = layer_sensitivity(model, sample, metric=metric, progress=progress, **kwargs)
        if not sizes:
            sizes = {i.path: i.in_features * i.out_features
                     for i in input_groups(model, sample, **kwargs)}
    errors = {n: {s.path: s.model_error for s in rows} for n, rows in table.items()}
    plan = linen_ptq.search_mixed_precision(errors, sizes, dict(candidates),
                                            budget_bits=budget_bits, bits=bits)
    return plan, table


def run_ptq(model: nnx.Module, batches: Sequence[Any], recipe: linen_ptq.PTQRecipe, *,
            progress: bool = False, call_kwargs: Mapping[str, Any] | None = None) -> nnx.Module:
    """Runs a :class:`qatjax.flax.ptq.PTQRecipe` on a float NNX model, in place:
    :func:`qatjax.nnx.quantize_model` with the recipe's config and rules, then SmoothQuant,
    AWQ, calibration and GPTQ, each when the recipe asks for it (as
    :func:`qatjax.flax.ptq.run_ptq`). Serve with :func:`qatjax.nnx.convert` and
    ``mode="infer"``.

    Returns:
      ``model``.
    """
    batches = linen_ptq._check_batches(batches, "run_ptq")
    quantize_model(model, recipe.config, rules=recipe.rules)
    kw = {"progress": progress, "apply_kwargs": call_kwargs}
    if recipe.smoothquant is not None:
        smoothquant(model, batches, **recipe.smoothquant, **kw)
    if recipe.awq is not None:
        awq(model, batches, **recipe.awq, **kw)
    _calibrated(model, [recipe.config, *(c for _, c in recipe.rules)], batches, call_kwargs,
                progress)
    if recipe.gptq is not None:
        gptq(model, batches, **recipe.gptq, **kw)
    return model
