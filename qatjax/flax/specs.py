"""Weight quantization parameters of the layers, and the descriptors they store.

Weight parameters are computed from the kernel itself (min/max per tensor, per
output channel or per group), in training as in conversion, so a trained kernel
and its served codes always agree. They are in *kernel form* (broadcasting against
the Flax kernel, see :mod:`qatjax.qdot`); :func:`qatjax.qdot.to_serving` gives the
stored form.

``describe(config)`` gives int32 descriptors (``kernel_spec``, ``input_spec``,
``fp8_spec``) that layers write to ``quant_params`` so that tools (convert, inspect,
export) can work from the variables alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qatjax.config import ESTIMATORS, GRANULARITIES, QatConfig
from qatjax.formats import Format, format_code, format_from_code
from qatjax.qdot import ConvSpec, DotSpec
from qatjax.qparams import QParams, qparams_from_amax, qparams_from_minmax, split_groups

__all__ = [
    "describe",
    "parse_kernel_spec",
    "parse_input_spec",
    "stack_shape",
    "parse_dense_general_spec",
    "INPUT_SCALINGS",
    "weight_qparams",
    "weight_qparams_for",
    "layout_spec",
]


def describe(cfg: QatConfig) -> dict[str, jax.Array]:
    """``kernel_spec = [format code, granularity index, group size, symmetric]``,
    ``input_spec = [format code, symmetric, scaling (0 dynamic per tensor, 1 static,
    2 dynamic per token), estimator index]`` and
    ``fp8_spec = [fp8 scaling (0 none, 1 current, 2 delayed), margin]`` as int32 arrays."""
    return {
        "kernel_spec": jnp.array([
            format_code(cfg.weight_format), GRANULARITIES.index(cfg.weight_granularity),
            cfg.weight_group_size or 0, int(cfg.weight_symmetric)], jnp.int32),
        "input_spec": jnp.array([
            format_code(cfg.activation_format), int(cfg.activation_symmetric),
            INPUT_SCALINGS.index(_input_scaling(cfg)),
            ESTIMATORS.index(cfg.activation_estimator)], jnp.int32),
        "fp8_spec": jnp.array([
            (None, "current", "delayed").index(cfg.fp8_scaling), cfg.fp8_margin], jnp.int32),
    }


def stack_shape(spec) -> tuple[int, ...]:
    """Leading axes of a descriptor: ``()`` for a single layer, ``(L,)`` for ``L`` layers
    stacked by ``nn.scan`` / ``nn.vmap`` (which stack every variable of the layer)."""
    return tuple(np.shape(spec)[:-1])


def _row(spec, name: str) -> list[int]:
    """The descriptor's values; stacked layers must all describe the same recipe."""
    rows = np.asarray(jax.device_get(spec)).reshape(-1, np.shape(spec)[-1])
    if not (rows == rows[0]).all():
        raise ValueError(f"`{name}`: stacked layers describe different recipes ({rows.tolist()}).")
    return [int(v) for v in rows[0]]


def parse_kernel_spec(spec) -> tuple[Format | None, str, int | None, bool]:
    """Inverse of the ``kernel_spec`` descriptor: ``(format, granularity, group_size, symmetric)``.
    Accepts stacked descriptors ``[..., 4]`` of identical rows."""
    code, gran, group, sym = _row(spec, "kernel_spec")
    return format_from_code(code), GRANULARITIES[gran], (group or None), bool(sym)


def parse_input_spec(spec) -> tuple[Format | None, bool, str, str]:
    """Inverse of ``input_spec``: ``(format, symmetric, scaling, estimator name)``, scaling
    one of :data:`INPUT_SCALINGS`; stacked descriptors as for :func:`parse_kernel_spec`."""
    code, sym, scaling, est = _row(spec, "input_spec")
    return format_from_code(code), bool(sym), INPUT_SCALINGS[scaling], ESTIMATORS[est]


def parse_dense_general_spec(spec) -> tuple[int, tuple[int, ...]]:
    """``dense_general_spec = [n_in, *kernel_shape]`` (written by QatDenseGeneral) ->
    ``(n_in, kernel_shape)``: the kernel is the dense ``[prod(shape[:n_in]), prod(shape[n_in:])]``."""
    n_in, *shape = _row(spec, "dense_general_spec")
    return n_in, tuple(shape)


# How a layer's input scale is obtained; the index is what ``input_spec`` stores.
INPUT_SCALINGS = ("dynamic", "static", "dynamic per token")


def _input_scaling(cfg: QatConfig) -> str:
    if cfg.activation_scaling == "static" and cfg.fp8_scaling is None:
        return "static"
    return "dynamic per token" if cfg.activation_granularity == "per_token" else "dynamic"


def layout_spec(w_format: Format | None, group_size: int | None, conv: bool,
                w_symmetric: bool = True) -> DotSpec:
    """A DotSpec carrying only what the weight layout needs (format, groups, dense / conv)."""
    cls = ConvSpec if conv else DotSpec
    return cls(None, w_format, True, w_symmetric, group_size=group_size)


def weight_qparams_for(w: jax.Array, fmt: Format, granularity: str, group_size: int | None,
                       symmetric: bool) -> QParams:
    """Min/max parameters of a kernel in kernel form.

    ``w`` is a dense kernel ``[K, N]`` (2-D) or a conv kernel ``[*window, C_in, C_out]``:
    per tensor ``()``; per channel ``[1, N]`` / ``[1, ..., 1, C_out]``; per group (dense)
    ``[G, 1, N]`` against the kernel split into ``[G, g, N]``.
    """
    if granularity == "per_tensor":
        axes, keepdims = None, False
    elif granularity == "per_group":
        w = split_groups(w, 0, group_size)
        axes, keepdims = (1,), True
    else:
        axes, keepdims = tuple(range(w.ndim - 1)), True
    if symmetric or fmt.is_float:
        # max|w| in one reduction: the same parameters as min/max (0 is always in range).
        return qparams_from_amax(jnp.max(jnp.abs(w), axes, keepdims=keepdims), fmt)
    return qparams_from_minmax(jnp.min(w, axes, keepdims=keepdims), jnp.max(w, axes, keepdims=keepdims),
                               fmt, symmetric=False)


def weight_qparams(w: jax.Array, cfg: QatConfig) -> QParams:
    """Kernel-form parameters of ``w`` under ``cfg``."""
    return weight_qparams_for(
        w, cfg.weight_format, cfg.weight_granularity,
        cfg.weight_group_size if cfg.weight_granularity == "per_group" else None,
        cfg.weight_symmetric)
