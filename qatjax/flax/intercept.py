"""Quantize a Flax model without editing it: ``quantize_model`` intercepts it at call time.

``quantize_model(model, config)`` returns a copy of a linen model whose methods run
under :func:`flax.linen.intercept_methods`, at two levels:

* every call of a plain ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` / ``nn.Einsum``
  (attention projections included) runs as :class:`~qatjax.flax.QatDense` /
  :class:`~qatjax.flax.QatDenseGeneral` / :class:`~qatjax.flax.QatConv` /
  :class:`~qatjax.flax.QatEinsum` with the same attributes, in the same scope;
* inside every other module a rule matches (attention, subclasses of ``nn.Dense``,
  custom layers), its own ``lax.dot_general``, ``jnp.einsum`` and
  ``lax.conv_general_dilated`` calls run as the core's quantized contractions
  (:mod:`qatjax.qdot`), named ``dot_general0``, ``einsum1``... per call. An operand that is
  one of the module's parameters is a weight, any other an activation with its own
  observer and scales; these take static or dynamic scales.

Parameter names and paths are those of the float model, so its checkpoint loads
unchanged; the quantization state appears next to each module's parameters
(``quant_stats``, ``quant_params``), and every qatjax tool (calibrate, report, convert,
export) works on the result. This is what ``qwix.quantize_model`` does for Qwix.

The mode comes from the ``mode`` argument or, per apply, from
:func:`qatjax.flax.quant_mode` (the wrapped model's own signature is unchanged).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.config import QatConfig
from qatjax.flax import specs
from qatjax.flax.layers import (_COMPARE, _FINALIZE, MODES, QatConv, QatDense, QatDenseGeneral,
                                QatEinsum, _dn, _forced_mode)
from qatjax.integer import canonical_dims
from qatjax.qdot import (ConvSpec, DotSpec, einsum_dimension_numbers, quantized_dot,
                         quantized_dot_general, quantized_einsum)
from qatjax.qparams import QParams

__all__ = ["quantize_model"]

Rules = Sequence[tuple[str, QatConfig | None]]

# The float layer class -> (its qatjax twin, the attributes that, when not None, give the
# layer a custom matmul / convolution that quantization would replace).
_TWINS = {
    nn.Dense: (QatDense, ("dot_general", "dot_general_cls")),
    nn.DenseGeneral: (QatDenseGeneral, ("dot_general", "dot_general_cls")),
    nn.Conv: (QatConv, ("conv_general_dilated", "conv_general_dilated_cls")),
    nn.Einsum: (QatEinsum, ()),
}

# The module whose method is running, with its recipe and a counter of its contractions;
# None inside qatjax's own layers and contractions (nothing to intercept there).
_frame: contextvars.ContextVar["_Frame | None"] = contextvars.ContextVar("qatjax_frame", default=None)
_ORIGINAL = {"dot_general": lax.dot_general, "einsum": jnp.einsum,
             "conv_general_dilated": lax.conv_general_dilated,
             "dot_product_attention": jax.nn.dot_product_attention}
_PATCHED = {"dot_general": "_intercepted_dot_general", "einsum": "_intercepted_einsum",
            "conv_general_dilated": "_intercepted_conv",
            "dot_product_attention": "_intercepted_dot_product_attention"}
_TARGETS = {"dot_general": lax, "einsum": jnp, "conv_general_dilated": lax,
            "dot_product_attention": jax.nn}


@dataclasses.dataclass
class _CallRecord:
    """What one top-level call of a quantized model met: the module paths, and the indices of
    the rules that decided one of them (see :func:`_check_rules`)."""
    paths: list[str] = dataclasses.field(default_factory=list)
    decided: set[int] = dataclasses.field(default_factory=set)


_record: contextvars.ContextVar["_CallRecord | None"] = contextvars.ContextVar(
    "qatjax_rules_record", default=None)


@dataclasses.dataclass
class _Frame:
    module: nn.Module
    config: QatConfig
    mode: str | None
    axis_name: str | None
    calls: int = 0


@dataclasses.dataclass(frozen=True)
class _Interceptor:
    config: QatConfig | None
    rules: tuple[tuple[str, QatConfig | None], ...]
    mode: str | None
    axis_name: str | None

    def config_for(self, path: str) -> QatConfig | None:
        record = _record.get()
        if record is not None:
            record.paths.append(path)
        for i, (pattern, cfg) in enumerate(self.rules):
            if re.fullmatch(pattern, path):
                if record is not None:
                    record.decided.add(i)
                return cfg
        return self.config

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if module.scope is None:
            return next_fun(*args, **kwargs)
        path = "/".join(module.scope.path)
        # A named submodule run through its own ``Module.apply`` inside the model (a head
        # tied to the embedding: ``self.head.apply({"params": {"kernel": emb.T}}, h)``) is
        # bound to a root scope of its own: its rules match its name.
        # (Told apart from the body of a lifted transform such as nn.scan, also on a root
        # scope, by having no quantization collection at all, not even a mutable one.)
        scope = module.scope
        detached = not scope.path and module.name is not None and all(
            scope.is_collection_empty(c) and not scope.is_mutable_collection(c)
            for c in ("quant_params", "quant_stats"))
        if detached:
            path = module.name
        cfg = self.config_for(path)
        twin = _TWINS.get(type(module))
        if cfg is None or isinstance(module, tuple(t for t, _ in _TWINS.values())):
            return _within(None, next_fun, args, kwargs)  # float, or a qatjax layer already
        stateful = cfg.learnable_scales or cfg.fp8_scaling == "delayed" or (
            cfg.activation_format is not None and cfg.activation_scaling == "static")
        if detached and stateful and (_forced_mode.get() or self.mode) != "float":
            raise ValueError(
                f"quantize_model: {path!r} ({type(module).__name__}) runs through its own "
                "Module.apply inside the model (as a head tied to the embedding does), so the "
                "model's variables cannot hold its quantization state (static activation "
                "scales, learnable scales or fp8 histories). Keep it float with a rule "
                f"({path!r}, None), or give it a recipe without state, e.g. "
                "activation_scaling='dynamic'.")
        if twin is None or context.method_name != "__call__":
            # Any other module (attention, subclasses of nn.Dense, custom layers): its own
            # lax.dot_general / jnp.einsum calls are quantized (children get their own frame).
            frame = _Frame(module, cfg, self.mode, self.axis_name)
            return _within(frame, next_fun, args, kwargs)
        cls, custom = twin
        for name in custom:
            if getattr(module, name) is not None:
                raise ValueError(
                    f"quantize_model: layer {path!r} ({type(module).__name__}) has a custom "
                    f"`{name}`, which quantization would replace; keep it float with a rule "
                    f"({path!r}, None).")
        fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(type(module))
                  if f.init and f.name not in ("parent", "name")}
        layer = cls(**fields, config=cfg, mode=self.mode, axis_name=self.axis_name,
                    parent=module.scope)
        return _within(None, layer, args, kwargs)


def _within(frame: "_Frame | None", fun, args, kwargs):
    token = _frame.set(frame)
    try:
        return fun(*args, **kwargs)
    finally:
        _frame.reset(token)


def _is_param(module: nn.Module, a: Any) -> bool:
    """Whether ``a`` is one of ``module``'s own parameters: the very array, or (after a dtype
    promotion or under a transformation, which make a new array) an array of the shape of
    one of its parameters of rank 2 or more."""
    params = [nn.meta.unbox(v) for v in module.variables.get("params", {}).values()
              if not isinstance(v, Mapping)]
    return any(a is p for p in params) or any(
        jnp.ndim(p) >= 2 and jnp.shape(p) == jnp.shape(a) for p in params)


def _user_frame() -> "_Frame | None":
    """The frame of the module whose code made the intercepted call, or None when qatjax
    itself made it: the quantized contractions' own ``lax.dot_general`` calls (a custom VJP's
    forward rule, which differentiation under ``nn.remat`` traces after the layer's frame
    has closed) are never quantized again. (This module's stand-in for
    ``jax.nn.dot_product_attention`` calls ``jnp.einsum`` as the user's code would.)"""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller != __name__ and (caller == "qatjax" or caller.startswith("qatjax.")):
        return None
    return _frame.get()


def _intercepted_dot_general(lhs, rhs, dimension_numbers, precision=None,
                             preferred_element_type=None, **kwargs):
    frame = _user_frame()
    float_call = functools.partial(_ORIGINAL["dot_general"], lhs, rhs, dimension_numbers,
                                   precision=precision, preferred_element_type=preferred_element_type,
                                   **kwargs)
    if frame is None:
        return float_call()
    dims = canonical_dims(dimension_numbers, jnp.ndim(lhs), jnp.ndim(rhs))
    y = _quantized_call(frame, "dot_general", lhs, rhs, dims[0], float_call,
                        lambda spec, lqp, rqp: quantized_dot_general(lhs, rhs, dims, lqp, rqp, spec))
    return y.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def _intercepted_einsum(subscripts, *operands, **kwargs):
    frame = _user_frame()
    float_call = functools.partial(_ORIGINAL["einsum"], subscripts, *operands, **kwargs)
    if frame is None or not isinstance(subscripts, str) or len(operands) != 2:
        return float_call()
    lhs, rhs = operands
    dims, _ = einsum_dimension_numbers(subscripts, jnp.ndim(lhs), jnp.ndim(rhs))
    y = _quantized_call(frame, "einsum", lhs, rhs, dims[0], float_call,
                        lambda spec, lqp, rqp: quantized_einsum(subscripts, lhs, rhs, lqp, rqp, spec))
    return y.astype(kwargs.get("preferred_element_type") or jnp.result_type(lhs, rhs))


def _intercepted_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                      precision=None, preferred_element_type=None):
    frame = _user_frame()
    float_call = functools.partial(
        _ORIGINAL["conv_general_dilated"], lhs, rhs, window_strides, padding, lhs_dilation,
        rhs_dilation, dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)
    if frame is None:
        return float_call()
    if batch_group_count != 1:
        raise ValueError(f"quantize_model: {_where(frame)} calls conv_general_dilated with "
                         f"batch_group_count={batch_group_count}; keep this module float with a rule.")
    n_sp = jnp.ndim(lhs) - 2
    dn = lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), dimension_numbers)
    # Canonical layouts: input [N, *spatial, C], kernel [*window, I, O] (output channels last).
    lhs_perm = (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],)
    rhs_perm = tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0])
    out_perm = (dn.out_spec[0],) + tuple(dn.out_spec[2:]) + (dn.out_spec[1],)
    strides = tuple(window_strides)
    lhs_dil = tuple(lhs_dilation or (1,) * n_sp)
    rhs_dil = tuple(rhs_dilation or (1,) * n_sp)
    if isinstance(padding, str):  # as lax.conv_general_dilated resolves it (lhs_dilation 1)
        window = [(k - 1) * d + 1 for k, d in zip(np.take(jnp.shape(rhs), dn.rhs_spec)[2:], rhs_dil)]
        padding = lax.padtype_to_pads(np.take(jnp.shape(lhs), dn.lhs_spec)[2:], window, strides, padding)
    rhs_contracting = tuple(a for a in range(jnp.ndim(rhs)) if a != dn.rhs_spec[0])
    lhs_contracting = (dn.lhs_spec[1],)

    def contract(spec, lqp, rqp):
        x = jnp.transpose(lhs, lhs_perm)
        # Dilate and pad in float, so every position of every window holds a real value
        # (padding is quantized like any zero), then a VALID convolution.
        x = lax.pad(x, jnp.zeros((), x.dtype),
                    [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dil)] + [(0, 0, 0)])
        lqp = lqp and QParams(*(jnp.transpose(p, lhs_perm) if jnp.ndim(p) else p for p in lqp))
        rqp = rqp and QParams(*(jnp.transpose(p, rhs_perm) if jnp.ndim(p) else p for p in rqp))
        conv = ConvSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(DotSpec)
                           if f.name != "dimension_numbers"},
                        strides=strides, rhs_dilation=rhs_dil, feature_group_count=feature_group_count,
                        dimension_numbers=lax.conv_dimension_numbers(
                            x.shape, tuple(np.take(jnp.shape(rhs), rhs_perm)), _dn(n_sp)))
        y = quantized_dot(x, jnp.transpose(rhs, rhs_perm), lqp, rqp, conv)
        return jnp.transpose(y, tuple(int(i) for i in np.argsort(out_perm)))

    y = _quantized_call(frame, "conv", lhs, rhs, (lhs_contracting, rhs_contracting), float_call,
                        contract, per_token_ok=False)
    return y.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def _intercepted_dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                                      is_causal=False, query_seq_lengths=None,
                                      key_value_seq_lengths=None, local_window_size=None,
                                      implementation=None, return_residual=False):
    """``jax.nn.dot_product_attention`` (NNX's attention calls it) with its two contractions,
    ``Q K^T`` and ``A V``, quantized as intercepted einsums (``einsum{i}`` of the frame);
    masking and the float32 softmax as in JAX's XLA implementation. Float mode, and calls
    outside a quantized module, run the original."""
    frame = _user_frame()
    float_call = functools.partial(
        _ORIGINAL["dot_product_attention"], query, key, value, bias, mask, scale=scale,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        implementation=implementation, return_residual=return_residual)
    if frame is None or (_forced_mode.get() or frame.mode) == "float":
        return float_call()
    if local_window_size is not None or return_residual:
        raise ValueError(f"quantize_model: {_where(frame)} calls dot_product_attention with "
                         "local_window_size or return_residual, which its quantized version does "
                         "not implement; keep this module float with a rule.")
    q, k, v = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    unbatched = q.ndim == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:  # grouped-query attention: each key / value head serves a group
        k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k)  # intercepted: quantized
    logits = logits * jnp.array(q.shape[-1] ** -0.5 if scale is None else scale, logits.dtype)
    if bias is not None:
        logits = (logits + bias).astype(logits.dtype)
    t, s = logits.shape[-2:]
    keep = jnp.ones((1, 1, t, s), bool) if mask is None else jnp.asarray(mask, bool)
    if is_causal:
        keep = keep & jnp.tril(jnp.ones((t, s), bool))
    if query_seq_lengths is not None:
        keep = keep & (jnp.arange(t)[None, None, :, None]
                       < jnp.asarray(query_seq_lengths)[:, None, None, None])
    if key_value_seq_lengths is not None:
        keep = keep & (jnp.arange(s)[None, None, None, :]
                       < jnp.asarray(key_value_seq_lengths)[:, None, None, None])
    logits = jnp.where(keep, logits, jnp.asarray(0.7 * jnp.finfo(logits.dtype).min, logits.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)  # intercepted: quantized
    return out[0] if unbatched else out


def _where(frame: _Frame, name: str = "") -> str:
    return "/".join(frame.module.scope.path + ((name,) if name else ()))


def _state_variable(module: nn.Module, collection: str, name: str, init):
    """``module.variable(collection, name, init)``, also from a method of a ``setup``-style
    module (Hugging Face's Flax models, for one): Flax creates variables only in ``setup`` or
    ``@compact`` methods, so there the variable is made in the module's scope directly."""
    if getattr(module, "_initialization_allowed", True):
        return module.variable(collection, name, init)
    return module.scope.variable(collection, name, init)


def _quantized_call(frame: _Frame, op: str, lhs, rhs, contracting, float_call, contract,
                    per_token_ok: bool = True):
    """One intercepted contraction of ``frame.module``, named ``{op}{i}`` (its ``i``-th call).

    An operand that is one of the module's parameters is a weight (the config's weight
    recipe, per channel meaning every axis but ``contracting``), any other an activation
    (its activation recipe, with state ``quant_stats/{op}{i}_{lhs,rhs}`` and
    ``quant_params/{op}{i}_{lhs,rhs}_scale`` / ``_zero_point``). ``contract(spec, lhs_qp,
    rhs_qp)`` runs the quantized contraction; ``float_call()`` the original one.
    """
    module, cfg = frame.module, frame.config
    name = f"{op}{frame.calls}"
    frame.calls += 1
    mode = _forced_mode.get() or frame.mode
    if mode is None and not module.is_initializing():
        raise ValueError(f"quantize_model: no mode for {_where(frame, name)}; pass mode= to "
                         "quantize_model or use qatjax.flax.quant_mode.")
    if cfg.learnable_scales or cfg.fp8_scaling is not None:
        raise ValueError(f"quantize_model: {_where(frame, name)} is a {op} call, which takes "
                         "static or dynamic scales (no learnable_scales or fp8_scaling); give it "
                         "its own rule.")
    act = cfg.activation_quantizer()
    if act is not None and act.per_token and not per_token_ok:
        raise ValueError(f"quantize_model: {_where(frame, name)} is a convolution, whose windows "
                         "span several tokens; use activation_granularity='per_tensor'.")
    roles = ["weight" if _is_param(module, a) else "activation" for a in (lhs, rhs)]
    if roles == ["weight", "activation"]:
        raise ValueError(f"quantize_model: {_where(frame, name)} contracts a parameter as its left "
                         "operand; only the right operand can be the weight.")
    token = _frame.set(None)  # nothing below is intercepted
    try:
        if module.is_initializing() or mode in ("float", "calibrate", _FINALIZE):
            # Float mode runs on a float checkpoint too: statistics only where they can exist.
            keeps_stats = mode != "float" or module.is_initializing() or module.is_mutable_collection(
                "quant_stats") or module.has_variable("quant_stats", f"{name}_lhs")
            for side, a, role in (("lhs", lhs, roles[0]), ("rhs", rhs, roles[1])):
                if role == "activation" and act is not None and act.static and keeps_stats:
                    stats = _state_variable(module, "quant_stats", f"{name}_{side}", act.init)
                    if mode == "calibrate":
                        stats.value = act.observe(stats.value, a, frame.axis_name)
                    if mode == _FINALIZE:
                        qp = act.finalize(stats.value)
                        module.put_variable("quant_params", f"{name}_{side}_scale", qp.scale)
                        module.put_variable("quant_params", f"{name}_{side}_zero_point", qp.zero_point)
                        # The recipe by name, for the tools (quant_report's rows of this op).
                        module.put_variable("quant_params", f"{name}_input_spec",
                                            specs.describe(cfg)["input_spec"])
            return float_call()
        qps, fmts, syms = [], [], []
        for side, a, role, axes in zip(("lhs", "rhs"), (lhs, rhs), roles, contracting):
            if role == "weight":
                wq = cfg.weight_quantizer()
                qps.append(None if wq is None else wq.qparams(a, axes))
                fmts.append(cfg.weight_format)
                syms.append(cfg.weight_symmetric)
            elif act is None:
                qps.append(None), fmts.append(None), syms.append(True)
            else:
                qps.append(_activation_qparams(frame, act, f"{name}_{side}", a, axes))
                fmts.append(act.format)
                syms.append(act.symmetric)
        group = (cfg.weight_group_size if cfg.weight_granularity == "per_group" and roles[1] == "weight"
                 else None)
        dynamic = act is not None and not act.static
        spec = DotSpec(fmts[0], fmts[1], syms[0], syms[1], ste=cfg.ste, group_size=group,
                       w_is_activation=roles[1] == "activation",
                       x_scale_from_data=dynamic and roles[0] == "activation",
                       w_scale_from_data=dynamic and roles[1] == "activation")
        y = contract(spec, qps[0], qps[1])
        if mode != _COMPARE:
            return y
        y_float = float_call()
        module.sow("quant_report", f"{name}_output_error", relative_error(y, y_float))
        return y_float
    finally:
        _frame.reset(token)


def relative_error(y: jax.Array, reference: jax.Array) -> jax.Array:
    """``||y - reference||_2 / ||reference||_2`` in float32 (a scalar)."""
    y, reference = jnp.asarray(y, jnp.float32), jnp.asarray(reference, jnp.float32)
    norm = jnp.sqrt(jnp.sum(reference ** 2))
    return jnp.sqrt(jnp.sum((y - reference) ** 2)) / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def _activation_qparams(frame: _Frame, act, name: str, a, contracting) -> QParams:
    """Dynamic parameters from ``a``, or the calibrated ones of ``name``."""
    if not act.static:
        return act.dynamic_qparams(a, contracting, frame.axis_name)
    if not frame.module.has_variable("quant_params", f"{name}_scale"):
        raise ValueError(f"quantize_model: {_where(frame, name)} needs calibrated activation "
                         "parameters; run qatjax.calibrate first, or use activation_scaling='dynamic'.")
    return QParams(frame.module.get_variable("quant_params", f"{name}_scale"),
                   frame.module.get_variable("quant_params", f"{name}_zero_point"))


def quantize_model(model: nn.Module, config: QatConfig | None = QatConfig(), *,
                   rules: Rules = (), mode: str | None = None, axis_name: str | None = None,
                   methods: Collection[str] = ("__call__",)) -> nn.Module:
    """A copy of ``model`` whose ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` layers run as
    qatjax layers.

    Args:
      model: an unbound linen module (any Flax model; it is not modified).
      config: the recipe of every layer no rule matches (``None``: keep them float).
      rules: ``(pattern, config)`` pairs tried in order; ``pattern`` is a regular
        expression matched in full against the layer's path (``"block0/up"``, the
        ``/``-joined module names of its variables); the first match decides, and a
        ``None`` config keeps that layer float. A rule that decides no module of a call
        (a typo, or shadowed by an earlier rule) raises a ValueError listing the paths.
      mode: default mode of the swapped layers (``"float"``, ``"calibrate"``,
        ``"train"``, ``"infer"``); ``None`` (default): give one per apply with
        :func:`qatjax.flax.quant_mode`.
      axis_name: mapped axis over which calibration statistics and dynamic scales are
        reduced (pmap / shard_map).
      methods: the model's methods to intercept.
    Returns:
      The quantized model: same parameters, plus the layers' quantization collections.
    Raises:
      ValueError: nothing to quantize (``config`` None and no rules); when the model runs, a
        rule that decides no module, or a matched layer that computes with a custom
        ``dot_general`` / ``conv_general_dilated`` (which quantization would replace).
    """
    if config is None and not any(cfg is not None for _, cfg in rules):
        raise ValueError("quantize_model: nothing to quantize: `config` is None and no rule gives "
                         "a QatConfig.")
    for pattern, cfg in rules:
        re.compile(pattern)
        if cfg is not None and not isinstance(cfg, QatConfig):
            raise TypeError(f"quantize_model: rule {pattern!r} needs a QatConfig or None, "
                            f"got {type(cfg).__name__}.")
    if config is not None and not isinstance(config, QatConfig):
        raise TypeError(f"quantize_model: `config` must be a QatConfig or None, got {type(config).__name__}.")
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize_model: `mode` must be one of {MODES} or None, got {mode!r}.")
    interceptor = _Interceptor(config, tuple(rules), mode, axis_name)
    base = getattr(type(model), "_qatjax_float_type", type(model))
    namespace: dict[str, Any] = {"_qatjax_float_type": base, "__module__": base.__module__,
                                 "__qualname__": base.__qualname__}
    for name in methods:
        method = getattr(base, name)
        while hasattr(method, "method_handler_wrapped"):  # Flax's wrapper: intercept inside it
            method = method.__wrapped__
        namespace[name] = _intercepted(method, interceptor)
    quantized = model.copy()
    object.__setattr__(quantized, "__class__", type(base.__name__, (base,), namespace))
    return quantized


def _intercepted(method, interceptor: _Interceptor):
    @functools.wraps(method)  # keeps Flax's markers (``nn.compact``) on the new method
    def run(self, *args, **kwargs):
        was_patched = patched()
        if not was_patched:  # route the primitives through the frames while the model runs
            _patch(True)
        outermost = _record.get() is None
        record_token = _record.set(_CallRecord()) if outermost else None
        try:
            with nn.intercept_methods(interceptor):
                # The model's own method: its direct contractions follow the root's rule.
                root_cfg = interceptor.config_for("")
                frame = None if root_cfg is None else _Frame(self, root_cfg, interceptor.mode,
                                                              interceptor.axis_name)
                out = _within(frame, method, (self,) + args, kwargs)
            if outermost:
                _check_rules(interceptor.rules, _record.get())
            return out
        finally:
            if outermost:
                _record.reset(record_token)
            if not was_patched:
                _patch(False)

    return run


def _check_rules(rules: tuple[tuple[str, QatConfig | None], ...], record: _CallRecord) -> None:
    """Refuses rules that decided no module of the call: a typo (``"haed"``) or a rule that
    an earlier one shadows would otherwise leave the model quantized another way, silently."""
    unused = [pattern for i, (pattern, _) in enumerate(rules) if i not in record.decided]
    if unused:
        paths = sorted(set(p for p in record.paths if p))
        shown = ", ".join(repr(p) for p in paths[:40]) + (", ..." if len(paths) > 40 else "")
        raise ValueError(
            f"quantize_model: rule pattern(s) {unused} matched no module of this call (each "
            "rule must be the first full match, re.fullmatch, of at least one module path); "
            f"the module paths are: {shown or '(none)'}.")


def patched() -> bool:
    """Whether the primitives currently route through the frames (a quantized model runs)."""
    return lax.dot_general is _intercepted_dot_general


def _patch(on: bool) -> None:
    """Points ``jax.lax.dot_general`` / ``conv_general_dilated``, ``jax.numpy.einsum`` and
    ``jax.nn.dot_product_attention`` (looked up at call time by Flax's layers and attention)
    at the frame-aware versions, or back."""
    for name, replacement in _PATCHED.items():
        setattr(_TARGETS[name], name, globals()[replacement] if on else _ORIGINAL[name])
