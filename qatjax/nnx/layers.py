"""Flax NNX drop-ins: ``QatLinear``, ``QatLinearGeneral``, ``QatConv`` and ``QatEinsum``.

Each is the NNX layer it replaces (a subclass: same constructor arguments, the same
``kernel`` / ``bias`` :class:`flax.nnx.Param` created the same way from ``rngs``, so a
float NNX checkpoint loads unchanged) plus ``config`` / ``mode`` / ``axis_name``, and runs
its quantized modes through the linen layer of :mod:`qatjax.flax` on its own variables:
one implementation of the recipe under both front ends, so NNX and linen give the same
bits for the same weights, data and config.

Quantization state lives in the layer as NNX variables, named as the linen variables and
typed by their linen collection, so ``nnx.state(model, QuantParams)`` and the filters of
``nnx.split`` select them:

* :class:`flax.nnx.Param` (``params``): ``kernel``, ``bias``, and with LSQ
  (``learnable_scales``) ``kernel_scale`` / ``input_scale`` (and zero points), trained by
  ``nnx.Optimizer`` like any parameter;
* :class:`QuantStats` (``quant_stats``): ``input``, the activation observer's state;
* :class:`QuantParams` (``quant_params``): the recipe descriptors ``kernel_spec`` /
  ``input_spec`` / ``fp8_spec``, the calibrated ``input_scale`` / ``input_zero_point``, and
  once converted the ``kernel_codes`` with ``kernel_scale`` / ``kernel_zero_point``;
* :class:`Fp8Meta` (``fp8_meta``): fp8 delayed scaling's amax histories and scales.

Modes, in decreasing precedence: :func:`qatjax.flax.quant_mode` around the call (a whole
model at once), the call's ``mode=``, the ``mode`` attribute; ``"float"`` is exactly the
NNX layer (its ``dot_general`` / ``out_sharding`` included). In the other modes a custom
``dot_general`` / ``conv_general_dilated`` / ``einsum_op`` is refused (quantization
replaces it) and ``out_sharding`` constrains the output's sharding.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from qatjax.config import QatConfig
from qatjax.flax import layers as linen_layers
from qatjax.flax.intercept import _ORIGINAL, _within, relative_error
from qatjax.flax.layers import _COMPARE, _FINALIZE, MODES, _forced_mode, quant_mode

__all__ = ["QatLinear", "QatLinearGeneral", "QatConv", "QatEinsum", "QuantStats", "QuantParams",
           "Fp8Meta", "VARIABLE_TYPES"]


class QuantStats(nnx.Variable):
    """Calibration statistics (the linen collection ``quant_stats``)."""


class QuantParams(nnx.Variable):
    """Frozen quantization parameters, recipe descriptors and serving codes (``quant_params``)."""


class Fp8Meta(nnx.Variable):
    """fp8 delayed scaling's amax histories and scales (``fp8_meta``)."""


#: Linen collection -> the NNX variable type that holds its entries.
VARIABLE_TYPES: dict[str, type[nnx.Variable]] = {
    "params": nnx.Param, "quant_stats": QuantStats, "quant_params": QuantParams,
    "fp8_meta": Fp8Meta}


def collection_of(variable: nnx.Variable) -> str | None:
    """The linen collection of an NNX variable of one of :data:`VARIABLE_TYPES` (else None)."""
    for col, var_type in VARIABLE_TYPES.items():
        if type(variable) is var_type:
            return col
    return None


#: While a model runs as a linen module (:mod:`qatjax.nnx.ptq`): the object whose
#: ``call(layer, args, kwargs)`` runs a drop-in's linen twin bound at the layer's path there.
linen_view: contextvars.ContextVar[Any] = contextvars.ContextVar("qatjax_nnx_linen_view",
                                                                default=None)


def _mutable(mode: str) -> list[str]:
    """The collections a linen qatjax layer may write in ``mode``."""
    return ["quant_stats", "quant_params", "fp8_meta"] + (["params"] if mode == _FINALIZE else [])


class _LinenBacked:
    """Mixin of the NNX drop-ins: the quantized modes run the linen twin on the variables.

    Each drop-in calls :meth:`_setup_quantization` with its linen twin (static) and defines
    ``_sample()`` (an input of the right shape for the twin's init) and ``_custom_op()``
    (the name of a custom contraction attribute it was given, or None).
    """

    config: QatConfig
    mode: str | None
    axis_name: str | None

    def _setup_quantization(self, config: QatConfig, mode: str | None, axis_name: str | None,
                            twin: nn.Module, rngs: nnx.Rngs) -> None:
        if not isinstance(config, QatConfig):
            raise TypeError(f"{type(self).__name__}: `config` must be a qatjax.QatConfig, got "
                            f"{type(config).__name__}.")
        if mode is not None and mode not in MODES:
            raise ValueError(f"{type(self).__name__}: `mode` must be one of {MODES} or None, "
                             f"got {mode!r}.")
        self.config, self.mode, self.axis_name = config, mode, axis_name
        self._twin = twin
        # The twin's init on this layer's own kernel and bias (its initialisers return them):
        # the quantization state -- descriptors, observer, fp8 histories, LSQ scales of this
        # kernel -- exactly as the linen layer creates it.
        own = {"kernel": self.kernel.get_value()}
        if self.bias is not None:
            own["bias"] = self.bias.get_value()
        initialising = twin.clone(kernel_init=lambda *_: own["kernel"],
                                  bias_init=lambda *_: own.get("bias"))
        # (The twin draws no random numbers: its initialisers return the arrays above.)
        variables = initialising.init(jax.random.key(0), self._sample())
        self._write_back({col: tree for col, tree in variables.items()}, skip=("kernel", "bias"))

    # ------------------------------------------------------------------ variables
    def linen_variables(self) -> dict[str, dict[str, Any]]:
        """This layer's variables as the linen twin's collections: ``{collection: {name: value}}``."""
        out: dict[str, dict[str, Any]] = {}
        for name, value in vars(self).items():
            if isinstance(value, nnx.Variable):
                col = collection_of(value)
                if col is not None:
                    out.setdefault(col, {})[name] = value.get_value()
        return out

    def _write_back(self, collections, skip=()) -> None:
        """Stores linen collections in this layer's variables (new names become new variables
        of their collection's type; entries of another type under the same name move)."""
        for col, tree in collections.items():
            var_type = VARIABLE_TYPES[col]
            for name, value in tree.items():
                if name in skip:
                    continue
                metadata = {}
                if isinstance(value, nn.Partitioned):  # sharding names, as metadata
                    metadata = {"out_sharding": tuple(value.names), "eager_sharding": False}
                    value = value.value
                current = getattr(self, name, None)
                if type(current) is var_type and not metadata:
                    if current.get_value() is not value:
                        current.set_value(value)
                else:
                    setattr(self, name, var_type(value, **metadata))

    def set_linen_variables(self, collections) -> None:
        """Makes this layer's quantization variables exactly ``collections`` (``{collection:
        {name: value}}``): entries missing there are removed (``kernel`` after
        :func:`qatjax.nnx.convert`), the others written as :meth:`_write_back` does."""
        wanted = {name for tree in collections.values() for name in tree}
        for name, value in list(vars(self).items()):
            if isinstance(value, nnx.Variable) and collection_of(value) is not None and name not in wanted:
                if name in ("kernel", "bias"):
                    setattr(self, name, nnx.data(None))
                else:
                    delattr(self, name)
        self._write_back(collections)

    # ------------------------------------------------------------------ calls
    def _resolve_mode(self, mode: str | None) -> str:
        chosen = _forced_mode.get() or mode or self.mode
        if chosen is None:
            raise ValueError(f"{type(self).__name__}: no mode given; pass mode= one of {MODES} (as a "
                             "call argument or attribute), or use qatjax.flax.quant_mode.")
        if chosen not in MODES + (_FINALIZE, _COMPARE):
            raise ValueError(f"{type(self).__name__}: `mode` must be one of {MODES}, got {chosen!r}.")
        return chosen

    def _run(self, float_call, args: tuple, mode: str | None, out_sharding, **kwargs) -> jax.Array:
        """``float_call()`` in float mode (the NNX layer itself), else the linen twin; neither
        is intercepted (a parent module's frame does not reach into the layer)."""
        view = linen_view.get()
        if view is not None:  # a linen view of the model (qatjax.nnx.ptq): the twin, bound there
            return view.call(self, args, dict(kwargs, **({"mode": mode} if mode else {})))
        mode = self._resolve_mode(mode)
        float_call = functools.partial(_within, None, float_call, (), {})
        if mode == "float" and getattr(self, "kernel", None) is not None:
            return float_call()
        custom = self._custom_op()
        if custom is not None and mode not in ("float", "calibrate", _FINALIZE):
            raise ValueError(f"{type(self).__name__}: a custom `{custom}` cannot be quantized (the "
                             "quantized contraction replaces it); keep this layer float.")
        if mode == _COMPARE:  # quant_report: the layer's own output error, float stream
            y_float = float_call()
            y = self._twin_call(args, "infer", kwargs)
            error = relative_error(y, y_float)
            if isinstance(getattr(self, "output_error", None), nnx.Intermediate):  # called again
                error = jnp.maximum(error, self.output_error.get_value())
            self.output_error = nnx.Intermediate(error)
            return y_float
        y = self._twin_call(args, mode, kwargs)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y

    def _twin_call(self, args: tuple, mode: str, kwargs) -> jax.Array:
        with quant_mode(mode):  # the resolved mode, over any outer one
            # No interception inside the layer (see qatjax.nnx.intercept).
            y, updates = _within(None, self._twin.apply, (self.linen_variables(),) + args,
                                 dict(kwargs, mutable=_mutable(mode)))
        self._write_back(updates)
        return y



class QatLinear(_LinenBacked, nnx.Linear):
    """Quantization-aware drop-in for :class:`flax.nnx.Linear` (``kernel [in, out]``).

    ``QatLinear(in_features, out_features, *, config=QatConfig(), mode=None, axis_name=None,
    **nnx.Linear's keyword arguments)``; call ``layer(x, mode=None, out_sharding=None)``.
    Bit-identical with :class:`qatjax.flax.QatDense` for the same weights, data and config.
    """

    def __init__(self, in_features: int, out_features: int, *, config: QatConfig = QatConfig(),
                 mode: str | None = None, axis_name: str | None = None, rngs: nnx.Rngs,
                 **kwargs: Any) -> None:
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        twin = linen_layers.QatDense(
            features=out_features, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, config=config,
            axis_name=axis_name)
        self._setup_quantization(config, mode, axis_name, twin, rngs)

    def _sample(self) -> jax.Array:
        return jnp.zeros((1, self.in_features), self.param_dtype)

    def _custom_op(self) -> str | None:
        return None if self.dot_general is _ORIGINAL["dot_general"] else "dot_general"

    def __call__(self, inputs: jax.Array, mode: str | None = None,  # type: ignore[override]
                 out_sharding=None) -> jax.Array:
        return self._run(lambda: nnx.Linear.__call__(self, inputs, out_sharding=out_sharding),
                         (inputs,), mode, out_sharding)


class QatLinearGeneral(_LinenBacked, nnx.LinearGeneral):
    """Quantization-aware drop-in for :class:`flax.nnx.LinearGeneral` contracting the input's
    trailing axes in order, without ``batch_axis`` (the layouts
    :class:`qatjax.flax.QatDenseGeneral` quantizes; other layouts are refused at construction).
    """

    def __init__(self, in_features, out_features, *, config: QatConfig = QatConfig(),
                 mode: str | None = None, axis_name: str | None = None, rngs: nnx.Rngs,
                 **kwargs: Any) -> None:
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        n_in = len(self.in_features)
        if self.batch_axis or tuple(self.axis) != tuple(range(-n_in, 0)):
            raise ValueError(
                "QatLinearGeneral: only the input's trailing axes, in order, can be contracted "
                f"(axis={tuple(range(-n_in, 0))}), without batch_axis; got axis={self.axis}, "
                f"batch_axis={dict(self.batch_axis)}.")
        twin = linen_layers.QatDenseGeneral(
            features=tuple(self.out_features), axis=tuple(self.axis), use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            config=config, axis_name=axis_name)
        self._setup_quantization(config, mode, axis_name, twin, rngs)

    def _sample(self) -> jax.Array:
        return jnp.zeros((1, *self.in_features), self.param_dtype)

    def _custom_op(self) -> str | None:
        custom = self.dot_general is not None or getattr(self, "dot_general_cls", None) is not None
        return "dot_general" if custom else None

    def __call__(self, inputs: jax.Array, mode: str | None = None,  # type: ignore[override]
                 out_sharding=None) -> jax.Array:
        return self._run(lambda: nnx.LinearGeneral.__call__(self, inputs, out_sharding=out_sharding),
                         (inputs,), mode, out_sharding)


class QatConv(_LinenBacked, nnx.Conv):
    """Quantization-aware drop-in for :class:`flax.nnx.Conv` (``kernel [*window, C_in / groups,
    C_out]``); bit-identical with :class:`qatjax.flax.QatConv`."""

    def __init__(self, in_features: int, out_features: int, kernel_size, strides=1, *,
                 config: QatConfig = QatConfig(), mode: str | None = None,
                 axis_name: str | None = None, rngs: nnx.Rngs, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs)
        twin = linen_layers.QatConv(
            features=out_features, kernel_size=tuple(self.kernel_size), strides=self.strides,
            padding=self.padding, input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
            use_bias=self.use_bias, mask=self.mask, dtype=self.dtype, param_dtype=self.param_dtype,
            precision=self.precision, config=config, axis_name=axis_name)
        self._setup_quantization(config, mode, axis_name, twin, rngs)

    def _sample(self) -> jax.Array:
        dilation = self.kernel_dilation
        dilation = (1,) * len(self.kernel_size) if dilation is None else (
            (dilation,) * len(self.kernel_size) if isinstance(dilation, int) else tuple(dilation))
        window = tuple((k - 1) * d + 1 for k, d in zip(self.kernel_size, dilation))
        return jnp.zeros((1, *window, self.in_features), self.param_dtype)

    def _custom_op(self) -> str | None:
        return (None if self.conv_general_dilated is _ORIGINAL["conv_general_dilated"]
                else "conv_general_dilated")

    def __call__(self, inputs: jax.Array, mode: str | None = None,  # type: ignore[override]
                 out_sharding=None) -> jax.Array:
        return self._run(lambda: nnx.Conv.__call__(self, inputs), (inputs,), mode, out_sharding)


class QatEinsum(_LinenBacked, nnx.Einsum):
    """Quantization-aware drop-in for :class:`flax.nnx.Einsum` (input x kernel);
    bit-identical with :class:`qatjax.flax.QatEinsum`. The bias, when given, has
    ``bias_shape``."""

    def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *,
                 config: QatConfig = QatConfig(), mode: str | None = None,
                 axis_name: str | None = None, rngs: nnx.Rngs, **kwargs: Any) -> None:
        super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **kwargs)
        twin = linen_layers.QatEinsum(
            shape=tuple(kernel_shape), einsum_str=einsum_str, use_bias=bias_shape is not None,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            config=config, axis_name=axis_name)
        self._setup_quantization(config, mode, axis_name, twin, rngs)

    def _sample(self) -> jax.Array:
        lhs, kernel = self.einsum_str.replace(" ", "").split("->")[0].split(",")
        sizes = dict(zip(kernel, self.kernel_shape))
        return jnp.zeros(tuple(sizes.get(c, 1) for c in lhs), self.param_dtype)

    def _custom_op(self) -> str | None:
        return None if self.einsum_op is _ORIGINAL["einsum"] else "einsum_op"

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None,  # type: ignore[override]
                 mode: str | None = None, out_sharding=None) -> jax.Array:
        kwargs = {} if einsum_str is None else {"einsum_str": einsum_str}
        return self._run(lambda: nnx.Einsum.__call__(self, inputs, einsum_str, out_sharding=out_sharding),
                         (inputs,), mode, out_sharding, **kwargs)
