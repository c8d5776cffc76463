"""Helpers shared by the PTQ transforms: argument checks and the served weight of a kernel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qatjax.formats import IntFormat
from qatjax.qdot import DotSpec, decode_weight, encode_weight
from qatjax.qparams import QParams
from qatjax.quantizers import WeightQuantizer


def weight_only_spec(quantizer: WeightQuantizer) -> DotSpec:
    """The weight-only contraction ``x [..., K] @ kernel [K, N]`` of ``quantizer``'s recipe
    (its codes serve in the kernel's layout)."""
    group = quantizer.group_size if quantizer.granularity == "per_group" else None
    return DotSpec(x_format=None, w_format=quantizer.format, w_symmetric=quantizer.symmetric,
                   group_size=group)


def served_kernel(kernel: jax.Array, quantizer: WeightQuantizer,
                  qp: QParams | None = None) -> jax.Array:
    """The float32 kernel that serving computes with: the weight path
    (:func:`qatjax.qdot.encode_weight`) then :func:`qatjax.qdot.decode_weight`, with the
    kernel-form parameters ``qp`` (default: ``quantizer``'s own min / max of ``kernel``)."""
    spec = weight_only_spec(quantizer)
    if qp is None:
        qp = quantizer.qparams(kernel, (0,))
    codes, serving = encode_weight(kernel, qp, spec)
    return decode_weight(codes, serving, spec)


def check_quantizer(quantizer: Any, k: int, fn: str) -> WeightQuantizer:
    """``quantizer`` if it is an integer :class:`WeightQuantizer` whose groups divide ``k``."""
    if not isinstance(quantizer, WeightQuantizer):
        raise TypeError(f"{fn}: `quantizer` must be a qatjax.quantizers.WeightQuantizer, got "
                        f"{type(quantizer).__name__}.")
    if not isinstance(quantizer.format, IntFormat):
        raise TypeError(f"{fn}: `quantizer.format` must be an integer format (IntFormat), got "
                        f"{quantizer.format}.")
    if quantizer.granularity not in ("per_tensor", "per_channel", "per_group"):
        raise ValueError(f"{fn}: `quantizer.granularity` must be 'per_tensor', 'per_channel' or "
                         f"'per_group', got {quantizer.granularity!r}.")
    if quantizer.granularity == "per_group":
        g = quantizer.group_size
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g <= 0 or k % g:
            raise ValueError(f"{fn}: `quantizer.group_size` must be a positive divisor of the "
                             f"kernel's {k} input channels, got {g!r}.")
    return quantizer


def check_kernel(kernel: Any, fn: str, name: str = "kernel") -> jax.Array:
    """``kernel`` as a 2-D floating array ``[K, N]``."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"{fn}: `{name}` must be a 2-D floating array [K, N] (input channels "
                         f"first, as flax Dense), got shape {kernel.shape}, dtype {kernel.dtype}.")
    return kernel


def check_kernels(kernels: Any, fn: str) -> tuple[jax.Array, ...]:
    """One kernel or a sequence of kernels reading the same input: 2-D, one ``K``."""
    if isinstance(kernels, Sequence) and not isinstance(kernels, (str, bytes)):
        kernels = tuple(check_kernel(w, fn, f"kernels[{i}]") for i, w in enumerate(kernels))
    else:
        kernels = (check_kernel(kernels, fn, "kernels"),)
    if not kernels:
        raise ValueError(f"{fn}: `kernels` is empty.")
    ks = {w.shape[0] for w in kernels}
    if len(ks) != 1:
        raise ValueError(f"{fn}: `kernels` must share their input channels (axis 0), got shapes "
                         f"{[w.shape for w in kernels]}.")
    return kernels


def check_channel_vector(v: Any, k: int, fn: str, name: str) -> jax.Array:
    """``v`` as a float32 ``[k]`` vector."""
    v = jnp.asarray(v)
    if v.shape != (k,) or not jnp.issubdtype(v.dtype, jnp.floating):
        raise ValueError(f"{fn}: `{name}` must be a floating vector of the {k} input channels, got "
                         f"shape {v.shape}, dtype {v.dtype}.")
    return v.astype(jnp.float32)


def check_inputs(x: Any, k: int, fn: str) -> jax.Array:
    """Calibration inputs ``[..., k]`` as float32 rows ``[T, k]``."""
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != k or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: `x` must be a floating array [..., {k}] (the layer's inputs), got "
                         f"shape {x.shape}, dtype {x.dtype}.")
    return x.reshape(-1, k).astype(jnp.float32)


def check_grid(values: Any, fn: str, name: str, lo: float, hi: float, *,
               open_lo: bool = False) -> tuple[float, ...]:
    """A non-empty static tuple of floats in ``[lo, hi]`` (``(lo, hi]`` when ``open_lo``)."""
    try:
        grid = tuple(float(v) for v in np.atleast_1d(np.asarray(values, np.float64)))
    except (TypeError, ValueError):
        grid = ()
    ok = grid and all((lo < v if open_lo else lo <= v) and v <= hi for v in grid)
    if not ok:
        raise ValueError(f"{fn}: `{name}` must be a non-empty sequence of floats in "
                         f"{'(' if open_lo else '['}{lo}, {hi}], got {values!r}.")
    return grid
