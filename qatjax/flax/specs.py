"""Weight quantization parameters of the layers, and the descriptors they store.

Weight parameters are computed from the kernel itself (min/max per tensor, per
output channel or per group), in training as in conversion, so a trained kernel
and its served codes always agree. Two layouts exist:

* dense: ``w_t [N, K]``; parameters ``()``, ``[N, 1]`` or, per group, ``[N, G, 1]``
  against ``w_t`` split into ``[N, G, g]``; stored squeezed as ``()``, ``[N]``, ``[N, G]``.
* conv: ``kernel [*window, C_in, C_out]``; parameters ``()`` or ``[1, ..., 1, C_out]``;
  stored as ``()`` or ``[C_out]``.

``describe(config)`` gives int32 descriptors (``kernel_spec``, ``input_spec``)
that layers write to ``quant_params`` so that tools (convert, inspect, export)
can work from the variables alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qatjax.config import ESTIMATORS, GRANULARITIES, QatConfig
from qatjax.fake_quant import dequantize
from qatjax.formats import Format, format_code, format_from_code
from qatjax.qdot import DotSpec
from qatjax.qparams import QParams, merge_groups, qparams_from_minmax, split_groups

__all__ = [
    "describe",
    "parse_kernel_spec",
    "parse_input_spec",
    "weight_qparams",
    "squeeze_weight_param",
    "expand_weight_param",
    "dequantize_weight_codes",
]


def describe(cfg: QatConfig) -> dict[str, jax.Array]:
    """``kernel_spec = [format code, granularity index, group size, symmetric]`` and
    ``input_spec = [format code, symmetric, static scaling, estimator index]`` and
    ``fp8_spec = [fp8 scaling (0 none, 1 current, 2 delayed), margin]`` as int32 arrays."""
    return {
        "kernel_spec": jnp.array([
            format_code(cfg.weight_format), GRANULARITIES.index(cfg.weight_granularity),
            cfg.weight_group_size or 0, int(cfg.weight_symmetric)], jnp.int32),
        "input_spec": jnp.array([
            format_code(cfg.activation_format), int(cfg.activation_symmetric),
            int(cfg.activation_scaling == "static" and cfg.fp8_scaling is None),
            ESTIMATORS.index(cfg.activation_estimator)], jnp.int32),
        "fp8_spec": jnp.array([
            (None, "current", "delayed").index(cfg.fp8_scaling), cfg.fp8_margin], jnp.int32),
    }


def parse_kernel_spec(spec) -> tuple[Format | None, str, int | None, bool]:
    """Inverse of the ``kernel_spec`` descriptor: ``(format, granularity, group_size, symmetric)``."""
    code, gran, group, sym = (int(v) for v in jax.device_get(spec))
    return format_from_code(code), GRANULARITIES[gran], (group or None), bool(sym)


def parse_input_spec(spec) -> tuple[Format | None, bool, bool, str]:
    """Inverse of ``input_spec``: ``(format, symmetric, static, estimator name)``."""
    code, sym, static, est = (int(v) for v in jax.device_get(spec))
    return format_from_code(code), bool(sym), bool(static), ESTIMATORS[est]


def weight_qparams_for(w: jax.Array, fmt: Format, granularity: str, group_size: int | None,
                       symmetric: bool, conv: bool) -> QParams:
    """Min/max parameters of a weight in broadcast form (see the module docstring)."""
    if granularity == "per_tensor":
        return qparams_from_minmax(jnp.min(w), jnp.max(w), fmt, symmetric=symmetric)
    if conv:
        axes = tuple(range(w.ndim - 1))
    elif granularity == "per_group":
        w = split_groups(w, w.ndim - 1, group_size)
        axes = (w.ndim - 1,)
    else:
        axes = (w.ndim - 1,)
    return qparams_from_minmax(jnp.min(w, axes, keepdims=True), jnp.max(w, axes, keepdims=True),
                               fmt, symmetric=symmetric)


def weight_qparams(w: jax.Array, cfg: QatConfig) -> QParams:
    """Parameters of a dense ``w_t [N, K]`` (2-D) or a conv kernel (more axes) under ``cfg``."""
    return weight_qparams_for(
        w, cfg.weight_format, cfg.weight_granularity,
        cfg.weight_group_size if cfg.weight_granularity == "per_group" else None,
        cfg.weight_symmetric, conv=w.ndim > 2)


def squeeze_weight_param(a: jax.Array, ndim: int) -> jax.Array:
    """Broadcast form -> stored form (``()``, ``[N]``, ``[N, G]`` or ``[C_out]``)."""
    if a.ndim == 0:
        return a
    if ndim > 2:
        return a.reshape(-1)
    return a.reshape(a.shape[:-1])


def expand_weight_param(a: jax.Array, ndim: int, conv: bool = False) -> jax.Array:
    """Stored form -> broadcast form against a weight of rank ``ndim``."""
    a = jnp.asarray(a)
    if a.ndim == 0:
        return a
    if conv or ndim > 2:
        return a.reshape((1,) * (ndim - 1) + (-1,))
    return a[..., None]


def dequantize_weight_codes(q: jax.Array, w_qp: QParams, spec: DotSpec) -> jax.Array:
    """float32 weight from codes (per-group aware)."""
    if spec.group_size is None:
        return dequantize(q, w_qp)
    x = dequantize(split_groups(q, q.ndim - 1, spec.group_size), w_qp)
    return merge_groups(x, x.ndim - 2)
