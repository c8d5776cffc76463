"""The quantized dot product of a layer: what you train is what you serve.

``quantized_dot(x, w_t, x_qp, w_qp, spec)`` computes ``x @ w_t.T`` with both
operands quantized. When both formats are integer (or both fp8) its forward pass
runs the real low-precision matmul of :mod:`qatjax.integer` on the codes -- the
same function the serving (infer) path runs on stored codes, so training and
serving outputs are bit-identical. Its backward pass is the straight-through
estimator: the vector-Jacobian product of the float reference
``fake_quant(x) @ fake_quant(w_t).T`` (float matmuls; the reference's forward
matmul is never computed, XLA drops it), which also gives LSQ its scale and
zero-point gradients.

Layout: ``x`` is ``[..., K]``; the weight is ``w_t`` ``[N, K]`` (output features
first). Weight parameters broadcast against ``w_t`` (per-channel: ``[N, 1]``) or,
for per-group weights, against ``w_t`` split into ``[N, K // g, g]`` (``[N, G, 1]``).
Activation parameters are per-tensor scalars.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from qatjax.fake_quant import fake_quant, quantize
from qatjax.formats import Format
from qatjax.integer import check_contraction, fp8_matmul, int_matmul, signed_codes
from qatjax.qparams import QParams, merge_groups, split_groups

__all__ = [
    "DotSpec",
    "ConvSpec",
    "quantized_dot",
    "dot_from_codes",
    "reference_dot",
    "quantize_weight",
]


@dataclasses.dataclass(frozen=True)
class DotSpec:
    """Static description of a quantized dot product.

    Attributes:
      x_format / w_format: formats of the activation and weight (None: float).
      x_symmetric / w_symmetric: whether the zero points are 0 (bounds int32 overflow).
      ste: straight-through estimator of the backward pass.
      group_size: per-group weights: block size along K (None otherwise).
      x_grad_scale / w_grad_scale: LSQ gradient scales (None: 1).
    """

    x_format: Format | None
    w_format: Format | None
    x_symmetric: bool = True
    w_symmetric: bool = True
    ste: str = "clipped"
    group_size: int | None = None
    x_grad_scale: float | None = None
    w_grad_scale: float | None = None

    @property
    def native(self) -> str | None:
        """``"int"`` or ``"fp8"`` when the forward runs a low-precision matmul, else None."""
        if self.x_format is None or self.w_format is None:
            return None
        if not self.x_format.is_float and not self.w_format.is_float:
            return "int"
        if self.x_format.is_float and self.w_format.is_float:
            return "fp8"
        return None


@dataclasses.dataclass(frozen=True)
class ConvSpec(DotSpec):
    """A quantized convolution: the weight is ``[*window, C_in / groups, C_out]`` (HWIO) and
    the input is already padded (``"VALID"`` convolution), so padded positions hold real
    zeros, whose code is the zero point: every window then needs the same closed-form
    correction ``- za * sum(window of b)``. Weights must be symmetric (``zb = 0``).

    Attributes (beyond :class:`DotSpec`): ``strides``, ``rhs_dilation``,
    ``feature_group_count``, ``dimension_numbers`` as for ``lax.conv_general_dilated``.
    """

    strides: tuple[int, ...] = ()
    rhs_dilation: tuple[int, ...] = ()
    feature_group_count: int = 1
    dimension_numbers: tuple[str, str, str] | None = None

    def conv(self, lhs, rhs, preferred_element_type=None, precision=None):
        return lax.conv_general_dilated(
            lhs, rhs, self.strides, "VALID", rhs_dilation=self.rhs_dilation,
            dimension_numbers=self.dimension_numbers,
            feature_group_count=self.feature_group_count,
            precision=precision, preferred_element_type=preferred_element_type)


def _grouped(a: jax.Array, spec: DotSpec) -> jax.Array:
    return a if spec.group_size is None else split_groups(a, a.ndim - 1, spec.group_size)


def _fq(a, qp, fmt, spec: DotSpec, grad_scale):
    if fmt is None:
        return a
    gs = grad_scale if spec.ste == "lsq" else None
    return fake_quant(a, qp, fmt, ste=spec.ste, grad_scale=gs)


def reference_dot(x: jax.Array, w_t: jax.Array, x_qp: QParams | None, w_qp: QParams | None,
                  spec: DotSpec) -> jax.Array:
    """Float fake-quant reference: ``fake_quant(x) @ fake_quant(w_t).T``, float32 ``[..., N]``."""
    x_hat = _fq(x.astype(jnp.float32), x_qp, spec.x_format, spec, spec.x_grad_scale)
    w_hat = _fq(_grouped(w_t.astype(jnp.float32), spec), w_qp, spec.w_format, spec, spec.w_grad_scale)
    if isinstance(spec, ConvSpec):
        return spec.conv(x_hat, w_hat, jnp.float32, lax.Precision.HIGHEST)
    if spec.group_size is not None:
        w_hat = merge_groups(w_hat, w_hat.ndim - 2)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    return lax.dot_general(x_hat, w_hat, dims, precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def quantize_weight(w_t: jax.Array, w_qp: QParams, spec: DotSpec) -> jax.Array:
    """Weight codes ``[N, K]`` in the storage dtype of ``spec.w_format``."""
    q = quantize(_grouped(w_t, spec), w_qp, spec.w_format)
    return q if spec.group_size is None else merge_groups(q, q.ndim - 2)


def dot_from_codes(qx: jax.Array, qw: jax.Array, x_qp: QParams, w_qp: QParams,
                   spec: DotSpec) -> jax.Array:
    """The low-precision forward on codes: float32 ``[..., N]``.

    Args:
      qx: activation codes ``[..., K]``; qw: weight codes ``[N, K]``.
      x_qp: per-tensor activation parameters; w_qp: weight parameters (see module doc).
    """
    if isinstance(spec, ConvSpec):
        return _conv_from_codes(qx, qw, x_qp, w_qp, spec)
    grouped = spec.group_size is not None
    qx, qw = _grouped(qx, spec), _grouped(qw, spec)
    w_scale = jnp.asarray(w_qp.scale, jnp.float32)
    w_scale = w_scale.reshape(w_scale.shape[:-1]) if w_scale.ndim else w_scale  # [N] / [N, G] / ()
    if spec.native == "int":
        check_contraction(qx.shape[-1], spec.x_format, spec.w_format,
                          lhs_symmetric=spec.x_symmetric, rhs_symmetric=spec.w_symmetric)
        a, za = signed_codes(qx, x_qp.zero_point, spec.x_format)
        b, zb = signed_codes(qw, w_qp.zero_point, spec.w_format)
        zb = zb.reshape(zb.shape[:-1]) if zb.ndim else zb
        acc = int_matmul(a, b, za, zb, grouped=grouped).astype(jnp.float32)
    else:
        acc = fp8_matmul(qx, qw, grouped=grouped)
    x_scale = jnp.asarray(x_qp.scale, jnp.float32)
    if not grouped:
        return acc * (x_scale * w_scale)
    # acc: [G, ..., N]; each group has its own weight scale, so rescale then sum the groups.
    w_scale = jnp.broadcast_to(w_scale, (qw.shape[0], qw.shape[1]))
    w_scale = w_scale.T.reshape((w_scale.shape[1],) + (1,) * (acc.ndim - 2) + (w_scale.shape[0],))
    return jnp.sum(acc * (x_scale * w_scale), axis=0)


def _conv_from_codes(qx, qw, x_qp, w_qp, spec: ConvSpec) -> jax.Array:
    """Integer / fp8 convolution on codes; weight scales are per output channel (last axis)."""
    w_scale = jnp.asarray(w_qp.scale, jnp.float32).reshape(-1)  # [C_out] or [1]
    x_scale = jnp.asarray(x_qp.scale, jnp.float32)
    if spec.native == "fp8":
        return spec.conv(qx, qw, jnp.float32) * (x_scale * w_scale)
    window = 1
    for n in qw.shape[:-1]:
        window *= n
    check_contraction(window, spec.x_format, spec.w_format,
                      lhs_symmetric=spec.x_symmetric, rhs_symmetric=True)
    a, za = signed_codes(qx, x_qp.zero_point, spec.x_format)
    b = qw.astype(jnp.int8)
    acc = spec.conv(a, b, jnp.int32)
    colsum = jnp.sum(b, axis=tuple(range(b.ndim - 1)), dtype=jnp.int32)  # [C_out]
    return (acc - za * colsum).astype(jnp.float32) * (x_scale * w_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _native_dot(x, w_t, x_qp, w_qp, spec):
    qx = quantize(x, x_qp, spec.x_format)
    qw = quantize_weight(w_t, w_qp, spec)
    return dot_from_codes(qx, qw, x_qp, w_qp, spec)


def _native_dot_fwd(x, w_t, x_qp, w_qp, spec):
    return _native_dot(x, w_t, x_qp, w_qp, spec), (x, w_t, x_qp, w_qp)


def _native_dot_bwd(spec, res, g):
    x, w_t, x_qp, w_qp = res
    _, vjp = jax.vjp(lambda *a: reference_dot(*a, spec), x, w_t, x_qp, w_qp)
    return vjp(g)


_native_dot.defvjp(_native_dot_fwd, _native_dot_bwd)


def quantized_dot(x: jax.Array, w_t: jax.Array, x_qp: QParams | None, w_qp: QParams | None,
                  spec: DotSpec) -> jax.Array:
    """``x @ w_t.T`` (or, with a :class:`ConvSpec`, the convolution of the padded ``x`` with
    the HWIO weight ``w_t``) with quantized operands; differentiable through the STE.

    Args:
      x: float activations ``[..., K]``.
      w_t: float weight ``[N, K]``.
      x_qp / w_qp: parameters (None where the format is None).
      spec: static description.
    Returns:
      float32 ``[..., N]``. With two integer (or two fp8) operands the forward runs the
      integer (fp8) matmul, bit-identical to :func:`dot_from_codes` on stored codes; the
      backward pass is the STE gradient of :func:`reference_dot`.
    """
    if not isinstance(spec, ConvSpec) and x.shape[-1] != w_t.shape[-1]:
        raise ValueError(
            f"quantized_dot: x has {x.shape[-1]} input features but the weight expects {w_t.shape[-1]}."
        )
    if spec.native is None:
        return reference_dot(x, w_t, x_qp, w_qp, spec)
    return _native_dot(x, w_t, x_qp, w_qp, spec)
