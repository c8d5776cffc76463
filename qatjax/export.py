"""Export for serving: safetensors with a documented layout, and StableHLO artifacts.

Two files leave qatjax, both readable without it:

* :func:`save_safetensors` writes a served model (the variables :func:`qatjax.convert`
  returns: weight codes, scales, zero points, calibrated input parameters and every other
  parameter) as one safetensors file, and :func:`load_safetensors` reads it back, bit for
  bit. The layout (tensor names, dtypes, shapes, how to dequantize, the per-layer recipe in
  the header) is documented in the README ("Export for serving") and in
  :data:`SAFETENSORS_LAYOUT`.
* :func:`export_stablehlo` serializes the integer inference function with
  :mod:`jax.export`: a StableHLO module with a symbolic batch dimension (and any other the
  caller names), lowered for the platforms asked for. With ``weights="inputs"`` (the
  default) the artifact holds the program only and takes the safetensors tensors as its
  first argument, so the weights travel as the safetensors file; with
  ``weights="constants"`` they are baked in. Running it needs ``jax`` alone::

      import jax, ml_dtypes, numpy as np, safetensors
      exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
      weights = {name: np.frombuffer(t["data"], DTYPES[t["dtype"]]).reshape(t["shape"])
                 for name, t in safetensors.deserialize(open("model.safetensors", "rb").read())}
      logits = exported.call(weights, x)

  (``DTYPES`` maps the header's dtype names to numpy / ml_dtypes types:
  :data:`SAFETENSORS_DTYPES`.)

Both work on linen variables and on NNX models (:func:`qatjax.nnx.collections` gives the
same tree), and both start from :func:`qatjax.convert`, the one weight path: what they
hold is what infer mode serves.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from qatjax.checkpoint import _write_atomically
from qatjax.flax import model as linen_model
from qatjax.flax import specs
from qatjax.flax.layers import quant_mode
from qatjax.formats import format_from_name
from qatjax.packing import unpack_nibbles

__all__ = ["SAFETENSORS_DTYPES", "SAFETENSORS_LAYOUT", "ExportedModel", "export_stablehlo",
           "flatten_served", "load_safetensors", "save_safetensors"]

SAFETENSORS_LAYOUT_VERSION = 1

# The safetensors header's dtype names -> numpy / ml_dtypes types (what a reader needs).
SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
_DTYPE_NAMES = {np.dtype(t): name for name, t in SAFETENSORS_DTYPES.items()}

SAFETENSORS_LAYOUT = """\
Tensors: one per array of the served variables, named "<collection>/<module path>/<name>"
(collections params, quant_params, fp8_meta, ...; module path parts joined by "/").
  params/<path>/<name>                 float parameters kept in float (biases, norms, embeddings)
  quant_params/<layer>/kernel_codes    I8 (signed int2..int8), U8 (unsigned), F8_E4M3 / F8_E5M2
                                       (fp8); U8 two codes per byte for formats of 4 bits or
                                       fewer (element 2i in the low nibble, two's complement)
  quant_params/<layer>/kernel_scale    F32, () per tensor, [N] per channel, [N, G] or [G, N] per
                                       group (G = K / group_size), as codes_layout says
  quant_params/<layer>/kernel_zero_point  I32, the shape of kernel_scale; absent for symmetric
                                       layers (zeros)
  quant_params/<layer>/input_scale, input_zero_point   F32 / I32 (), static activations
  block formats (MX, NVFP4): kernel_codes U8 element bit patterns (fp4 two per byte), F8 (MXFP8)
                             or I8 (MXINT8); kernel_scale the block scales, U8 E8M0 bytes (MX)
                             or F8_E4M3 (NVFP4), one per block along K; kernel_zero_point F32 ()
                             the per-tensor scale (NVFP4; 1 for MX)
Header metadata (strings):
  qatjax.layout      the layout version
  qatjax.layers      JSON {layer path: recipe}: weight_format, granularity, group_size,
                     symmetric, input_format, input_symmetric, input_scaling, kernel_shape (the
                     float kernel's Flax shape), codes_layout ("NK": codes [N, K], the dense
                     kernel transposed; "KN": the kernel's [K, N]; "kernel": a conv / einsum
                     kernel's own layout), contracting (the codes' contracted axes),
                     codes_shape (unpacked) and packed
  qatjax.tensors     JSON {tensor name: [dtype, shape]}: what the file must hold
  qatjax.structure   JSON {name: {dtype, shape, text | values}}: the layers' descriptors
                     (kernel_spec, input_spec, ...), constants of the served model
Dequantize: w = (codes - zero_point) * scale, the scale and zero point of a group repeated
along the contracted axis over its group_size elements; for codes_layout NK, w[k, n] =
(codes[n, k] - zero_point[n, k // g]) * scale[n, k // g]. fp8 codes: codes.astype(f32) * scale.
"""


# ----------------------------------------------------------------------------- the tree
def _is_structure(path: tuple[str, ...]) -> bool:
    """Descriptors and axis lists: constants of the served model, not weights."""
    return path[0] == "quant_params" and (path[-1].endswith("_spec")
                                          or path[-1] == "einsum_kernel_axes")


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        key = str(key)
        if "/" in key:
            raise ValueError(f"export: variable name {'/'.join(prefix + (key,))!r} holds a '/', "
                             "which the tensor names use as the separator.")
        if isinstance(value, Mapping):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _nested(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _served(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The served variables (:func:`qatjax.convert`, idempotent), without sharding boxes."""
    return nn.meta.unbox(linen_model.convert(variables))


def _recipe(qp_tree: Mapping[str, Any], layout: Mapping[str, Any] | None) -> dict[str, Any]:
    """A layer's readable recipe (the ``qatjax.layers`` header entry)."""
    fmt, gran, group, sym = specs.parse_kernel_spec(qp_tree["kernel_spec"])
    in_fmt, in_sym, scaling, _ = specs.parse_input_spec(qp_tree["input_spec"])
    recipe = {"weight_format": fmt.name if fmt is not None else None, "granularity": gran,
              "group_size": group, "symmetric": sym,
              "input_format": in_fmt.name if in_fmt is not None else None,
              "input_symmetric": in_sym, "input_scaling": scaling if in_fmt is not None else None}
    if layout is not None:
        in_ndim = int(np.asarray(layout["in_ndim"]))
        recipe.update(
            kernel_shape=[int(d) for d in np.asarray(layout["shape"])],
            codes_layout=("kernel" if in_ndim == 0 else
                          "NK" if bool(np.asarray(layout["transposed"])) else "KN"),
            contracting=[int(a) for a in np.asarray(layout["contracting"]).reshape(-1)],
            codes_shape=[int(d) for d in np.shape(qp_tree["kernel_codes"])],
            packed=bool(np.asarray(layout["packed"])))
    return recipe


def _structure_entry(value: Any) -> dict[str, Any]:
    arr = np.asarray(jax.device_get(value))
    entry: dict[str, Any] = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
    rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)
    if arr.dtype == np.uint8 and arr.ndim and (rows == rows[0]).all():
        try:  # a descriptor: readable JSON text (stacked layers repeat it)
            entry["text"] = bytes(rows[0]).decode("utf-8")
            return entry
        except UnicodeDecodeError:
            pass
    entry["values"] = arr.reshape(-1).tolist()
    return entry


def _structure_value(name: str, entry: Mapping[str, Any]) -> np.ndarray:
    try:
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        if "text" in entry:
            row = np.frombuffer(entry["text"].encode("utf-8"), np.uint8)
            return np.broadcast_to(row, shape).copy()
        return np.asarray(entry["values"], dtype).reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"qatjax.structure entry {name!r} is malformed: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Flattened:
    """A served model as named tensors: what the safetensors file and the artifact take."""
    tensors: dict[str, np.ndarray]       # name -> array (int4 codes packed)
    structure: dict[str, dict[str, Any]]  # name -> descriptor entry (constants)
    layers: dict[str, dict[str, Any]]     # layer path -> recipe

    def metadata(self) -> dict[str, str]:
        return {
            "qatjax.layout": str(SAFETENSORS_LAYOUT_VERSION),
            "qatjax.layers": json.dumps(self.layers, sort_keys=True),
            "qatjax.tensors": json.dumps(
                {k: [_dtype_name(k, v.dtype), list(v.shape)] for k, v in self.tensors.items()},
                sort_keys=True),
            "qatjax.structure": json.dumps(self.structure, sort_keys=True),
        }


def _dtype_name(name: str, dtype: np.dtype) -> str:
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"export: tensor {name!r} has dtype {np.dtype(dtype).name}, which "
                         f"safetensors cannot hold (supported: "
                         f"{sorted(d.name for d in _DTYPE_NAMES)}).") from None


def flatten_served(variables: Mapping[str, Any]) -> _Flattened:
    """The served model (:func:`qatjax.convert` of ``variables``) as named tensors.

    Tensor names are ``"<collection>/<module path>/<name>"``; codes of formats of 4 bits or
    fewer are packed two per byte (:func:`qatjax.packing.pack_nibbles`, as
    :func:`qatjax.quantize_model_weights` packs them); descriptors become the ``structure``
    entries; ``layers`` holds each quantized layer's recipe and codes layout. See
    :data:`SAFETENSORS_LAYOUT`.
    """
    served = _served(variables)
    exported = linen_model.quantize_model_weights(served)["layers"]
    layers = {"/".join(path): _recipe(qp_tree, exported.get("/".join(path)))
              for path, qp_tree in linen_model._layers(served)}
    tensors, structure = {}, {}
    for path, value in _flat(served).items():
        name = "/".join(path)
        if _is_structure(path):
            structure[name] = _structure_entry(value)
            continue
        arr = np.asarray(jax.device_get(value))
        if path[0] == "quant_params" and path[-1] in ("kernel_codes", "kernel_zero_point"):
            layer = "/".join(path[1:-1])
            if path[-1] == "kernel_codes" and layers[layer]["packed"]:
                arr = np.asarray(exported[layer]["codes"])
            if path[-1] == "kernel_zero_point" and layers[layer]["symmetric"] and not arr.any():
                continue  # zeros: rebuilt from the scale's shape
        _dtype_name(name, arr.dtype)
        tensors[name] = np.array(arr, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
    return _Flattened(tensors, structure, layers)


def _unflatten(tensors: Mapping[str, Any], structure: Mapping[str, Mapping[str, Any]],
               layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The served variables from named tensors (arrays or tracers): packed codes unpacked,
    descriptors restored as constants."""
    flat: dict[tuple[str, ...], Any] = {}
    for name, value in tensors.items():
        path = tuple(name.split("/"))
        if path[0] == "quant_params" and path[-1] == "kernel_codes":
            recipe = layers["/".join(path[1:-1])]
            if recipe["packed"]:
                signed = format_from_name(recipe["weight_format"]).signed
                value = unpack_nibbles(value, recipe["codes_shape"][-1], signed)
        flat[path] = value
    for layer, recipe in layers.items():  # symmetric layers' zero points: zeros, not stored
        scale = ("quant_params", *(layer.split("/") if layer else ()), "kernel_scale")
        zero_point = scale[:-1] + ("kernel_zero_point",)
        if recipe["symmetric"] and scale in flat and zero_point not in flat:
            flat[zero_point] = np.zeros(np.shape(flat[scale]), np.int32)
    for name, entry in structure.items():
        flat[tuple(name.split("/"))] = _structure_value(name, entry)
    return _nested(flat)


# ----------------------------------------------------------------------------- safetensors
def save_safetensors(path: str | os.PathLike, variables: Mapping[str, Any], *,
                     overwrite: bool = False) -> str:
    """Writes the served model of ``variables`` to a safetensors file (atomically).

    Args:
      path: destination (conventionally ``*.safetensors``).
      variables: a linen variables dict (calibrated, trained or already converted; it is
        converted with :func:`qatjax.convert`), or :func:`qatjax.nnx.collections` of an NNX
        model.
      overwrite: replace an existing file.
    Returns:
      The path written. The layout is :data:`SAFETENSORS_LAYOUT`.
    """
    import safetensors.numpy

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"save_safetensors: {path!r} exists; pass overwrite=True to "
                              "replace it.")
    flat = flatten_served(variables)
    _write_atomically(path, safetensors.numpy.save(flat.tensors, metadata=flat.metadata()))
    return path


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    import safetensors

    try:
        with open(path, "rb") as f:
            data = f.read()
        entries = safetensors.deserialize(data)
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e}).") from None
    tensors = {}
    for name, t in entries:
        if t["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t['dtype']}, which qatjax does "
                             f"not read (known: {sorted(SAFETENSORS_DTYPES)}).")
        tensors[name] = np.frombuffer(t["data"], SAFETENSORS_DTYPES[t["dtype"]]).reshape(t["shape"])
    return tensors, metadata


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a file of :func:`save_safetensors` back into the served variables, bit for bit
    (``mode="infer"`` serves them; :func:`qatjax.nnx.set_collections` loads them into an
    NNX model).

    Raises:
      ValueError: not a qatjax safetensors file, a newer layout, or a tensor missing, extra
        or of another dtype or shape than the header's ``qatjax.tensors`` lists (naming it).
    """
    path = os.fspath(path)
    tensors, metadata = _read_safetensors(path)
    if "qatjax.layout" not in metadata:
        raise ValueError(f"{path}: no qatjax.layout in the safetensors header; not a file "
                         "written by qatjax.export.save_safetensors.")
    if int(metadata["qatjax.layout"]) > SAFETENSORS_LAYOUT_VERSION:
        raise ValueError(f"{path}: layout version {metadata['qatjax.layout']} was written by a "
                         f"newer qatjax (this one reads up to {SAFETENSORS_LAYOUT_VERSION}).")
    expected = json.loads(metadata["qatjax.tensors"])
    for name, (dtype, shape) in expected.items():
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing (expected {dtype} {shape}).")
        found = _DTYPE_NAMES[tensors[name].dtype]
        if found != dtype or list(tensors[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} is {found} {list(tensors[name].shape)}, "
                             f"expected {dtype} {shape}.")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{path}: tensors {extra} are not in the header's qatjax.tensors.")
    return _unflatten({k: np.array(v) for k, v in tensors.items()},
                      json.loads(metadata["qatjax.structure"]),
                      json.loads(metadata["qatjax.layers"]))


# ----------------------------------------------------------------------------- StableHLO
@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A serialized inference function and, when it takes them as inputs, its weights.

    Attributes:
      exported: the :class:`jax.export.Exported` (``exported.mlir_module()`` is the
        StableHLO text).
      weights: the named tensors the function takes as its first argument (``None`` when
        they are constants inside it); :meth:`save` writes them as safetensors.
      metadata: the safetensors header entries (recipe per layer, layout).
    """

    exported: jax.export.Exported
    weights: dict[str, np.ndarray] | None
    metadata: dict[str, str]

    def __call__(self, *inputs: Any) -> Any:
        """Runs the artifact (as a loader would: :meth:`jax.export.Exported.call`)."""
        if self.weights is None:
            return self.exported.call(*inputs)
        return self.exported.call(self.weights, *inputs)

    def serialize(self) -> bytes:
        """The artifact's bytes (:func:`jax.export.deserialize` reads them)."""
        return bytes(self.exported.serialize())

    def save(self, path: str | os.PathLike, weights_path: str | os.PathLike | None = None, *,
             overwrite: bool = False) -> tuple[str, str | None]:
        """Writes the artifact to ``path`` and, when the weights are inputs, the weights to
        ``weights_path`` (default: ``path`` with the suffix ``.safetensors``), atomically.
        Returns the two paths (the second ``None`` for an artifact with constant weights)."""
        import safetensors.numpy

        path = os.fspath(path)
        if self.weights is not None and weights_path is None:
            weights_path = os.path.splitext(path)[0] + ".safetensors"
        for target in (path, weights_path):
            if target is not None and os.path.exists(target) and not overwrite:
                raise FileExistsError(f"save: {os.fspath(target)!r} exists; pass "
                                      "overwrite=True to replace it.")
        _write_atomically(path, self.serialize())
        if self.weights is None:
            return path, None
        weights_path = os.fspath(weights_path)
        _write_atomically(weights_path, safetensors.numpy.save(self.weights, self.metadata))
        return path, weights_path


WEIGHTS_MODES = ("inputs", "constants")


def export_stablehlo(model: Any, example_inputs: Any, *, variables: Mapping[str, Any] | None = None,
                     weights: str = "inputs", platforms: Sequence[str] = ("cpu",),
                     polymorphic_shapes: str | Sequence[str | None] | None = "b, ...",
                     apply_kwargs: Mapping[str, Any] | None = None) -> ExportedModel:
    """Serializes ``model``'s integer inference (``mode="infer"`` on the served model) with
    :func:`jax.export.export`.

    Args:
      model: a linen module (pass ``variables``) or an NNX model (its own variables; pass no
        ``variables``) with qatjax layers, calibrated or trained; it is converted
        (:func:`qatjax.convert`) for the export and, for NNX, left as it was.
      example_inputs: one input array (or ``jax.ShapeDtypeStruct``) or a tuple of them: the
        call's positional arguments. Their dtypes, and their shapes but for the symbolic
        dimensions, are the artifact's.
      variables: the linen model's variables.
      weights: ``"inputs"`` (the artifact takes the safetensors tensors, ``dict[str,
        array]``, as its first argument) or ``"constants"`` (baked in).
      platforms: lowering platforms, e.g. ``("cpu", "cuda")``; the artifact runs on each.
      polymorphic_shapes: :mod:`jax.export` shape specifications of the inputs: one string
        for all (default ``"b, ..."``, a symbolic leading batch dimension shared by every
        input; ``"b, s"`` also a symbolic sequence length), one per input, or ``None`` for
        static shapes.
      apply_kwargs: keyword arguments of every call (static, e.g. ``deterministic=True``).
    Returns:
      An :class:`ExportedModel`.
    Raises:
      ValueError: a bad ``weights``, linen without ``variables`` or NNX with them, or a
        model without qatjax layers.
    """
    if weights not in WEIGHTS_MODES:
        raise ValueError(f"export_stablehlo: `weights` must be one of {WEIGHTS_MODES}, got "
                         f"{weights!r}.")
    apply, variables = _inference_function(model, variables, dict(apply_kwargs or {}))
    flat = flatten_served(variables)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    specs_in = tuple(jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in inputs)
    if polymorphic_shapes is not None:
        specs_in = tuple(jax.export.symbolic_args_specs(specs_in, polymorphic_shapes))

    def served(tensors):
        return _unflatten(tensors, flat.structure, flat.layers)

    if weights == "inputs":
        def fn(tensors, *xs):
            return apply(served(tensors), *xs)

        weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.tensors.items()}
        exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(weight_specs, *specs_in)
        return ExportedModel(exported, flat.tensors, flat.metadata())

    constants = served(flat.tensors)

    def fn_constants(*xs):
        return apply(constants, *xs)

    exported = jax.export.export(jax.jit(fn_constants), platforms=tuple(platforms))(*specs_in)
    return ExportedModel(exported, None, flat.metadata())


def _inference_function(model: Any, variables: Mapping[str, Any] | None, kwargs: dict
                        ) -> tuple[Callable[..., Any], Mapping[str, Any]]:
    """``(apply(served_variables, *inputs), variables)`` for a linen module or NNX model."""
    from flax import nnx

    if isinstance(model, nnx.Module):
        from qatjax.nnx import model as nnx_model

        if variables is not None:
            raise ValueError("export_stablehlo: an NNX model carries its variables; pass no "
                             "`variables`.")
        graphdef, state = nnx.split(model)

        def apply_nnx(served, *xs):
            # Fresh Variables at this trace level (a plain merge would reuse the model's own).
            clone = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a, state))
            nnx_model.set_collections(clone, served)
            with quant_mode("infer"):
                return clone(*xs, **kwargs)

        return apply_nnx, nnx_model.collections(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_stablehlo: `model` must be a flax.linen or flax.nnx Module, got "
                        f"{type(model).__name__}.")
    if variables is None:
        raise ValueError("export_stablehlo: a linen model needs its `variables`.")

    def apply_linen(served, *xs):
        with quant_mode("infer"):
            return model.apply(served, *xs, **kwargs)

    return apply_linen, variables
