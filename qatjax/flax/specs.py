"""The descriptors the linen layers store: their recipe, by name, in their variables.

(Weight parameters come from :class:`qatjax.quantizers.WeightQuantizer`, codes from the
one weight path :func:`qatjax.qdot.encode_weight`.)

Descriptors
-----------
``describe(config)`` gives the descriptors that layers write to ``quant_params`` so
that tools (convert, inspect, export) can work from the variables alone. Each one is
a ``uint8`` array holding the UTF-8 bytes of a compact JSON object that names
everything (no indices into tuples) and carries the descriptor version ``"v"``:

* ``kernel_spec``: ``{"v": 1, "format": "int8", "granularity": "per_channel",
  "group_size": null, "symmetric": true}``; ``format`` is a format name
  (:func:`qatjax.formats.format_from_name`: ``"int4"``, ``"uint8"``, ``"fp8_e4m3"``, block
  formats such as ``"mxfp4"``, ``"mxfp8_e4m3_ceil"``, ``"nvfp4"``...) or ``null`` for a float
  kernel; ``granularity`` one of
  :data:`qatjax.config.GRANULARITIES`.
* ``input_spec``: ``{"v": 1, "format": "int8", "symmetric": true, "scaling": "static",
  "estimator": "entropy"}``; ``scaling`` one of :data:`INPUT_SCALINGS`, ``estimator``
  one of :data:`qatjax.config.ESTIMATORS`.
* ``fp8_spec``: ``{"v": 1, "scaling": null, "margin": 0}``; ``scaling`` ``null``,
  ``"current"`` or ``"delayed"``.
* ``dense_general_spec`` (QatDenseGeneral, :func:`describe_dense_general`):
  ``{"v": 1, "n_in": 1, "kernel_shape": [64, 8, 16]}``.

``"v"`` comes first, then the other keys sorted, without spaces. Arrays (not
strings), because variables pass through ``jit``, ``nn.scan`` / ``nn.vmap`` stacking
and checkpoints: ``L`` stacked layers hold ``[L, nbytes]`` (identical rows). Readers
ignore unknown keys and refuse a version newer than :data:`SPEC_VERSION`.

Descriptors written before version 1 are ``int32`` arrays of indices and are still
read (told apart by dtype): ``kernel_spec = [format code, granularity index, group
size or 0, symmetric]``, ``input_spec = [format code, symmetric, scaling index,
estimator index]``, ``fp8_spec = [0 none / 1 current / 2 delayed, margin]``,
``dense_general_spec = [n_in, *kernel_shape]``; format codes are
:func:`qatjax.formats.format_code`'s.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qatjax.config import ESTIMATORS, GRANULARITIES, QatConfig
from qatjax.formats import Format, format_from_code, format_from_name

__all__ = [
    "describe",
    "describe_numpy",
    "describe_dense_general",
    "parse_kernel_spec",
    "parse_input_spec",
    "parse_fp8_spec",
    "stack_shape",
    "parse_dense_general_spec",
    "recipe_mismatch",
    "config_recipe_text",
    "INPUT_SCALINGS",
    "FP8_SPEC_SCALINGS",
    "SPEC_VERSION",
]

# Version of the named (JSON) descriptors; the int32 ones that came before are version 0.
SPEC_VERSION = 1

# How a layer's input scale is obtained (``input_spec``'s ``scaling``).
INPUT_SCALINGS = ("dynamic", "static", "dynamic per token")

# ``fp8_spec``'s ``scaling`` (the int32 descriptors stored the index).
FP8_SPEC_SCALINGS = (None, "current", "delayed")


def _format_name(fmt: Format | None) -> str | None:
    return None if fmt is None else fmt.name


def _format(name: str | None, what: str) -> Format | None:
    if name is None:
        return None
    try:
        return format_from_name(name)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{what}`: {e}") from None


def _encode(doc: dict[str, Any]) -> np.ndarray:
    text = json.dumps({"v": SPEC_VERSION, **dict(sorted(doc.items()))}, separators=(",", ":"))
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def _describe_bytes(cfg: QatConfig) -> tuple[tuple[str, bytes], ...]:
    try:
        return _describe_bytes_cached(cfg)
    except TypeError:  # an unhashable config (a subclass with a list field...): no cache
        return _describe_bytes_uncached(cfg)


def _describe_bytes_uncached(cfg: QatConfig) -> tuple[tuple[str, bytes], ...]:
    docs = {
        "kernel_spec": {
            "format": _format_name(cfg.weight_format),
            "granularity": cfg.weight_granularity,
            "group_size": cfg.weight_group_size or None,
            "symmetric": bool(cfg.weight_symmetric)},
        "input_spec": {
            "format": _format_name(cfg.activation_format),
            "symmetric": bool(cfg.activation_symmetric),
            "scaling": _input_scaling(cfg),
            "estimator": cfg.activation_estimator},
        "fp8_spec": {"scaling": cfg.fp8_scaling, "margin": int(cfg.fp8_margin)},
    }
    return tuple((name, _encode(doc).tobytes()) for name, doc in docs.items())


_describe_bytes_cached = functools.lru_cache(maxsize=256)(_describe_bytes_uncached)


def describe(cfg: QatConfig) -> dict[str, jax.Array]:
    """The layer's descriptors ``kernel_spec``, ``input_spec`` and ``fp8_spec``: uint8
    arrays of named JSON documents (see the module docstring)."""
    return {name: jnp.asarray(a) for name, a in describe_numpy(cfg).items()}


def describe_numpy(cfg: QatConfig) -> dict[str, np.ndarray]:
    """:func:`describe` as numpy arrays (constants, also under a trace)."""
    return {name: np.frombuffer(data, np.uint8) for name, data in _describe_bytes(cfg)}


def describe_dense_general(n_in: int, kernel_shape) -> jax.Array:
    """QatDenseGeneral's ``dense_general_spec``: the kernel's shape and how many of its
    leading axes are contracted (a uint8 JSON document, see the module docstring)."""
    return jnp.asarray(_encode({"n_in": int(n_in),
                                "kernel_shape": [int(d) for d in kernel_shape]}))


def stack_shape(spec) -> tuple[int, ...]:
    """Leading axes of a descriptor: ``()`` for a single layer, ``(L,)`` for ``L`` layers
    stacked by ``nn.scan`` / ``nn.vmap`` (which stack every variable of the layer)."""
    return tuple(np.shape(spec)[:-1])


def _read(spec, name: str) -> dict[str, Any] | list[int]:
    """The descriptor's content: a dict (named descriptor) or a list of ints (int32
    descriptor of version 0). Stacked layers must all describe the same recipe."""
    arr = np.asarray(jax.device_get(spec))
    if arr.ndim == 0:
        raise ValueError(f"`{name}`: expected a descriptor array, got a scalar.")
    rows = arr.reshape(-1, arr.shape[-1])
    if not (rows == rows[0]).all():
        shown = ([bytes(r).decode("utf-8", "replace") for r in np.unique(rows, axis=0)]
                 if arr.dtype == np.uint8 else rows.tolist())
        raise ValueError(f"`{name}`: stacked layers describe different recipes ({shown}).")
    if arr.dtype == np.uint8:
        try:
            doc = json.loads(bytes(rows[0]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"`{name}`: not a qatjax descriptor (uint8 but not JSON).") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("v"), int):
            raise ValueError(f"`{name}`: not a qatjax descriptor (no version \"v\").")
        if doc["v"] > SPEC_VERSION:
            raise ValueError(
                f"`{name}`: descriptor version {doc['v']} was written by a newer qatjax "
                f"(this one reads up to version {SPEC_VERSION}); upgrade qatjax.")
        return doc
    if np.issubdtype(arr.dtype, np.integer):
        return [int(v) for v in rows[0]]
    raise ValueError(f"`{name}`: descriptors are uint8 (named) or int32 arrays, got {arr.dtype}.")


def _field(doc: dict[str, Any], key: str, name: str, choices=None) -> Any:
    if key not in doc:
        raise ValueError(f"`{name}`: descriptor has no {key!r} ({doc}).")
    value = doc[key]
    if choices is not None and value not in choices:
        raise ValueError(f"`{name}`: {key}={value!r} is not one of {list(choices)}.")
    return value


def parse_kernel_spec(spec) -> tuple[Format | None, str, int | None, bool]:
    """Inverse of the ``kernel_spec`` descriptor: ``(format, granularity, group_size, symmetric)``.
    Accepts stacked descriptors of identical rows, and int32 descriptors."""
    doc = _read(spec, "kernel_spec")
    if isinstance(doc, list):
        code, gran, group, sym = doc
        return format_from_code(code), GRANULARITIES[gran], (group or None), bool(sym)
    return (_format(_field(doc, "format", "kernel_spec"), "kernel_spec"),
            _field(doc, "granularity", "kernel_spec", GRANULARITIES),
            _field(doc, "group_size", "kernel_spec") or None,
            bool(_field(doc, "symmetric", "kernel_spec")))


def parse_input_spec(spec) -> tuple[Format | None, bool, str, str]:
    """Inverse of ``input_spec``: ``(format, symmetric, scaling, estimator name)``, scaling
    one of :data:`INPUT_SCALINGS`; stacked and int32 descriptors as for :func:`parse_kernel_spec`."""
    doc = _read(spec, "input_spec")
    if isinstance(doc, list):
        code, sym, scaling, est = doc
        return format_from_code(code), bool(sym), INPUT_SCALINGS[scaling], ESTIMATORS[est]
    return (_format(_field(doc, "format", "input_spec"), "input_spec"),
            bool(_field(doc, "symmetric", "input_spec")),
            _field(doc, "scaling", "input_spec", INPUT_SCALINGS),
            _field(doc, "estimator", "input_spec", ESTIMATORS))


def parse_fp8_spec(spec) -> tuple[str | None, int]:
    """Inverse of ``fp8_spec``: ``(scaling, margin)``, scaling ``None``, ``"current"`` or
    ``"delayed"``; ``spec=None`` (a layer without the descriptor) gives ``(None, 0)``."""
    if spec is None:
        return None, 0
    doc = _read(spec, "fp8_spec")
    if isinstance(doc, list):
        scaling, margin = doc
        return FP8_SPEC_SCALINGS[scaling], margin
    return (_field(doc, "scaling", "fp8_spec", FP8_SPEC_SCALINGS),
            int(_field(doc, "margin", "fp8_spec")))


def parse_dense_general_spec(spec) -> tuple[int, tuple[int, ...]]:
    """``dense_general_spec`` (written by QatDenseGeneral) -> ``(n_in, kernel_shape)``: the
    kernel is the dense ``[prod(shape[:n_in]), prod(shape[n_in:])]``."""
    doc = _read(spec, "dense_general_spec")
    if isinstance(doc, list):
        n_in, *shape = doc
        return n_in, tuple(shape)
    return (int(_field(doc, "n_in", "dense_general_spec")),
            tuple(int(d) for d in _field(doc, "kernel_shape", "dense_general_spec")))


def _input_scaling(cfg: QatConfig) -> str:
    if cfg.activation_scaling == "static" and cfg.fp8_scaling is None:
        return "static"
    return "dynamic per token" if cfg.activation_granularity == "per_token" else "dynamic"


_RECIPE_PARSERS = {"kernel_spec": parse_kernel_spec, "input_spec": parse_input_spec,
                   "fp8_spec": parse_fp8_spec}


def _recipe_text(name: str, parsed: tuple) -> str:
    fields = {"kernel_spec": ("format", "granularity", "group_size", "symmetric"),
              "input_spec": ("format", "symmetric", "scaling", "estimator"),
              "fp8_spec": ("scaling", "margin")}[name]
    shown = (v.name if isinstance(v, Format) else v for v in parsed)
    return "{" + ", ".join(f"{k}={v!r}" for k, v in zip(fields, shown)) + "}"


def recipe_mismatch(name: str, stored, cfg: QatConfig) -> str | None:
    """Compares a concrete stored recipe descriptor (``"kernel_spec"``, ``"input_spec"`` or
    ``"fp8_spec"``; named or int32, stacked or not) with the one ``cfg`` describes.

    Returns:
      None when they describe the same recipe, else ``"stored {...}, config {...}"``.
    """
    parse = _RECIPE_PARSERS[name]
    saved, wanted = parse(stored), parse(describe_numpy(cfg)[name])
    if saved == wanted:
        return None
    return f"stored {_recipe_text(name, saved)}, config {_recipe_text(name, wanted)}"


def config_recipe_text(cfg: QatConfig, name: str) -> str:
    """The ``name`` descriptor of ``cfg`` as readable text (``{format='int8', ...}``)."""
    return _recipe_text(name, _RECIPE_PARSERS[name](describe_numpy(cfg)[name]))
