"""Quantizing the contractions that NNX modules compute themselves (attention's einsums).

:func:`qatjax.nnx.quantize_model` swaps the NNX layers for drop-ins; the contractions that
other modules call directly -- ``jnp.einsum`` / ``lax.dot_general`` /
``lax.conv_general_dilated`` in ``nnx.MultiHeadAttention``'s attention function or in a
custom module -- are quantized by the interception of :mod:`qatjax.flax.intercept`, the
same code as for linen models: every module of the model is given a frame while its
``__call__`` runs (its recipe, or none), and the intercepted primitives of that frame run
the quantized contraction. :class:`ModuleState` gives that code the linen module interface
it uses, over the NNX module's variables, so the state has the same names as under linen
(``einsum0_lhs`` in :class:`~qatjax.nnx.QuantStats`, ``einsum0_lhs_scale`` in
:class:`~qatjax.nnx.QuantParams`) and the same tools read it.
"""

from __future__ import annotations

import types
from typing import Any

import jax.numpy as jnp
from flax import nnx

from qatjax.config import QatConfig
from qatjax.flax import intercept as linen_intercept
from qatjax.nnx.layers import VARIABLE_TYPES

__all__ = ["ModuleState", "intercept_calls", "float_type"]


class ModuleState:
    """The part of the linen module interface that :mod:`qatjax.flax.intercept`'s
    contractions use, over an NNX module: variables by collection (stored as attributes of
    the collection's NNX variable type), always mutable, never initialising."""

    def __init__(self, module: nnx.Module, path: tuple[str, ...]) -> None:
        self._module = module
        self.scope = types.SimpleNamespace(path=path)

    def is_initializing(self) -> bool:
        return False

    def is_mutable_collection(self, col: str) -> bool:
        return True

    def has_variable(self, col: str, name: str) -> bool:
        return type(getattr(self._module, name, None)) is VARIABLE_TYPES[col]

    def get_variable(self, col: str, name: str) -> Any:
        return getattr(self._module, name).get_value()

    def put_variable(self, col: str, name: str, value: Any) -> None:
        if self.has_variable(col, name):
            getattr(self._module, name).set_value(value)
        else:
            setattr(self._module, name, VARIABLE_TYPES[col](value))

    def variable(self, col: str, name: str, init) -> "_Ref":
        if not self.has_variable(col, name):
            self.put_variable(col, name, init())
        return _Ref(self, col, name)

    def sow(self, col: str, name: str, value: Any) -> None:
        """Keeps the largest value sown under ``name`` (an ``nnx.Intermediate``)."""
        current = getattr(self._module, name, None)
        if isinstance(current, nnx.Intermediate):
            value = jnp.maximum(value, current.get_value())
        setattr(self._module, name, nnx.Intermediate(value))

    @property
    def variables(self) -> dict[str, dict[str, Any]]:
        """The module's own parameters (``{"params": {name: value}}``)."""
        return {"params": {name: v.get_value() for name, v in vars(self._module).items()
                           if type(v) is nnx.Param}}


class _Ref:
    """``.value`` of one variable of a :class:`ModuleState`."""

    def __init__(self, state: ModuleState, col: str, name: str) -> None:
        self._state, self._col, self._name = state, col, name

    @property
    def value(self) -> Any:
        return self._state.get_variable(self._col, self._name)

    @value.setter
    def value(self, value: Any) -> None:
        self._state.put_variable(self._col, self._name, value)


# Base class -> its subclass with an intercepted __call__ (one per class: stable graphdefs).
_WRAPPED: dict[type, type] = {}


def _intercepted_call(self, *args, **kwargs):
    cfg, mode, axis_name, path = self._qatjax_intercept
    frame = (None if cfg is None else
             linen_intercept._Frame(ModuleState(self, path), cfg, mode, axis_name))
    patched = linen_intercept.patched()
    if not patched:  # route the primitives through the frames while the model runs
        linen_intercept._patch(True)
    try:
        return linen_intercept._within(frame, type(self).__mro__[1].__call__, (self,) + args, kwargs)
    finally:
        if not patched:
            linen_intercept._patch(False)


def float_type(module: nnx.Module) -> type:
    """``module``'s class before :func:`intercept_calls` wrapped it."""
    cls = type(module)
    return cls.__mro__[1] if cls in _WRAPPED.values() else cls


def intercept_calls(module: nnx.Module, config: QatConfig | None, mode: str | None,
                    axis_name: str | None, path: tuple[str, ...]) -> None:
    """Makes ``module``'s own contractions follow ``config`` (None: float) while its
    ``__call__`` runs, in place (its class becomes a subclass with that ``__call__``)."""
    base = float_type(module)  # quantized before: only the recipe changes
    wrapped = _WRAPPED.get(base)
    if wrapped is None:
        wrapped = _WRAPPED[base] = type(base.__name__, (base,), {
            "__call__": _intercepted_call, "__module__": base.__module__,
            "__qualname__": base.__qualname__})
    object.__setattr__(module, "__class__", wrapped)
    module._qatjax_intercept = (config, mode, axis_name, path)
