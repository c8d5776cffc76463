"""Quantize a Flax model without editing it: ``quantize_model`` swaps its layers at call time.

``quantize_model(model, config)`` returns a copy of a linen model whose methods run
under :func:`flax.linen.intercept_methods`: every call of a plain ``nn.Dense`` /
``nn.DenseGeneral`` / ``nn.Conv`` inside it (attention projections included) runs as
:class:`~qatjax.flax.QatDense` / :class:`~qatjax.flax.QatDenseGeneral` /
:class:`~qatjax.flax.QatConv` with the same attributes, in the same scope. Parameter names and paths are those of
the float model, so its checkpoint loads unchanged; the quantization state appears
next to each layer's parameters (``quant_stats``, ``quant_params``), and every qatjax
tool (calibrate, report, convert, export) works on the result. This is what
``qwix.quantize_model`` does for Qwix.

The mode comes from the ``mode`` argument or, per apply, from
:func:`qatjax.flax.quant_mode` (the wrapped model's own signature is unchanged).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Collection, Sequence
from typing import Any

import flax.linen as nn

from qatjax.config import QatConfig
from qatjax.flax.layers import MODES, QatConv, QatDense, QatDenseGeneral

__all__ = ["quantize_model"]

Rules = Sequence[tuple[str, QatConfig | None]]

# The float layer class -> (its qatjax twin, the attributes that, when not None, give the
# layer a custom matmul / convolution that quantization would replace).
_TWINS = {
    nn.Dense: (QatDense, ("dot_general", "dot_general_cls")),
    nn.DenseGeneral: (QatDenseGeneral, ("dot_general", "dot_general_cls")),
    nn.Conv: (QatConv, ("conv_general_dilated", "conv_general_dilated_cls")),
}


@dataclasses.dataclass(frozen=True)
class _Interceptor:
    config: QatConfig | None
    rules: tuple[tuple[str, QatConfig | None], ...]
    mode: str | None
    axis_name: str | None

    def config_for(self, path: str) -> QatConfig | None:
        for pattern, cfg in self.rules:
            if re.fullmatch(pattern, path):
                return cfg
        return self.config

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        twin = _TWINS.get(type(module))
        if twin is None or context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        path = "/".join(module.scope.path)
        cfg = self.config_for(path)
        if cfg is None:
            return next_fun(*args, **kwargs)
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
        return layer(*args, **kwargs)


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
        ``None`` config keeps that layer float.
      mode: default mode of the swapped layers (``"float"``, ``"calibrate"``,
        ``"train"``, ``"infer"``); ``None`` (default): give one per apply with
        :func:`qatjax.flax.quant_mode`.
      axis_name: mapped axis over which calibration statistics and dynamic scales are
        reduced (pmap / shard_map).
      methods: the model's methods to intercept.
    Returns:
      The quantized model: same parameters, plus the layers' quantization collections.
    Raises:
      ValueError: a matched layer computes with a custom ``dot_general`` /
        ``conv_general_dilated`` (which quantization would replace).
    """
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
        with nn.intercept_methods(interceptor):
            return method(self, *args, **kwargs)

    return run
