"""The quantized dot product of a layer: what you train is what you serve.

``quantized_dot(x, kernel, x_qp, w_qp, spec)`` computes ``x @ kernel`` with both
operands quantized. When both formats are integer (or both fp8) its forward pass
runs the real low-precision matmul of :mod:`qatjax.integer` on the codes -- the
same function (:func:`dot_from_codes`) the serving path runs on stored codes, so
training and serving outputs are bit-identical. Its backward pass is the
straight-through estimator, computed from the forward's codes: ``dx = (g @ w_hat.T)
* mask_x`` and ``dw = (x_hat.T @ g) * mask_w``, with ``x_hat``, ``w_hat`` the
dequantized codes and the masks those of the chosen estimator (skipped when provably
all ones). The residuals kept for the backward are the forward's 1-byte codes and
their parameters -- a quarter of float training's activation memory, and no second
quantization. With LSQ the backward
is the vector-Jacobian product of the float reference :func:`reference_dot`, which
also gives the scale and zero-point gradients.

Layouts (dense):

* ``x`` ``[..., K]``; ``kernel`` ``[K, N]`` (Flax's layout). The kernel is quantized
  in place -- parameters broadcast against it: ``()``, ``[1, N]`` per channel, or
  ``[G, 1, N]`` per group against the kernel split into ``[G, g, N]`` -- and its
  1-byte codes are then transposed to ``[N, K]``, the serving layout in which both
  operands contract their last axis (2x the bf16 rate for int8 / fp8 on Hopper).
* serving parameters (stored with the codes): ``()``, ``[N]`` or ``[N, G]``.

Convolutions (:class:`ConvSpec`) keep the kernel's own ``[*window, C_in, C_out]``
layout; parameters ``()`` or ``[1, ..., 1, C_out]``, stored as ``()`` or ``[C_out]``.
Activation parameters are per-tensor scalars, or (dense) per-row ``[..., 1]``: a scale
that is constant along the contraction axis factors out of the integer sum.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.fake_quant import dequantize, fake_quant, quantize, ste_mask
from qatjax.formats import Format
from qatjax.integer import check_contraction, fp8_matmul, int_matmul, signed_codes
from qatjax.qparams import QParams, merge_groups, split_groups

__all__ = [
    "DotSpec",
    "ConvSpec",
    "quantized_dot",
    "dot_from_codes",
    "reference_dot",
    "quantize_kernel",
    "dequantize_codes",
    "to_serving",
    "from_serving",
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
      x_mask / w_mask: whether the clipped estimator needs the operand's mask; False when
        the caller knows no code can clip (symmetric integer parameters from the tensor's
        own absmax), which saves a pass over the tensor.
      original_residuals: the backward's matmuls take the float ``x`` and kernel instead of
        their dequantized codes (Qwix's default for forward-only quantization): cheaper
        (no dequantization) but float residuals, and not the gradient of the fake-quant
        forward. Native matmuls with the identity or clipped estimator only.
    """

    x_format: Format | None
    w_format: Format | None
    x_symmetric: bool = True
    w_symmetric: bool = True
    ste: str = "clipped"
    group_size: int | None = None
    x_grad_scale: float | None = None
    w_grad_scale: float | None = None
    x_mask: bool = True
    w_mask: bool = True
    original_residuals: bool = False

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


# ----------------------------------------------------------------------------- layouts


def _split_kernel(w: jax.Array, spec: DotSpec) -> jax.Array:
    """Dense kernel ``[K, N]`` -> ``[G, g, N]`` for per-group parameters (else unchanged)."""
    return w if spec.group_size is None else split_groups(w, 0, spec.group_size)


def to_serving(a: jax.Array, spec: DotSpec) -> jax.Array:
    """Kernel-form parameter -> serving form (``()``, ``[N]``, ``[N, G]``, conv ``[C_out]``)."""
    a = jnp.asarray(a)
    if a.ndim == 0:
        return a
    if isinstance(spec, ConvSpec):
        return a.reshape(-1)
    if spec.group_size is None:
        return a.reshape(-1)  # [1, N] -> [N]
    return a[:, 0, :].T  # [G, 1, N] -> [N, G]


def from_serving(a: jax.Array, spec: DotSpec, kernel_ndim: int = 2) -> jax.Array:
    """Serving-form parameter -> kernel form (broadcasts against the kernel, or its split)."""
    a = jnp.asarray(a)
    if a.ndim == 0:
        return a
    if isinstance(spec, ConvSpec):
        return a.reshape((1,) * (kernel_ndim - 1) + (-1,))
    if spec.group_size is None:
        return a[None, :]  # [N] -> [1, N]
    return a.T[:, None, :]  # [N, G] -> [G, 1, N]


def quantize_kernel(w: jax.Array, w_qp: QParams, spec: DotSpec) -> jax.Array:
    """Codes of the kernel in the serving layout: dense ``[N, K]``, conv the kernel's own.

    The kernel is quantized in its own layout; only the 1-byte codes are transposed.
    """
    q = _kernel_codes(w, w_qp, spec)
    return q if isinstance(spec, ConvSpec) else q.T


def dequantize_codes(qw: jax.Array, w_serving: QParams, spec: DotSpec,
                     dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Weight values ``(codes - zero_point) * scale`` in the codes' (serving) layout."""
    if isinstance(spec, ConvSpec):
        return dequantize(qw, QParams(*(from_serving(a, spec, qw.ndim) for a in w_serving)), dtype)
    if spec.group_size is None:
        return dequantize(qw, QParams(*(jnp.asarray(a)[..., None] if jnp.ndim(a) else a
                                        for a in w_serving)), dtype)
    g = split_groups(qw, 1, spec.group_size)  # [N, G, g]
    w = dequantize(g, QParams(*(jnp.asarray(a)[..., None] if jnp.ndim(a) else a
                                for a in w_serving)), dtype)
    return merge_groups(w, 1)


# ----------------------------------------------------------------------------- forward


def _fq(a, qp, fmt, spec: DotSpec, grad_scale):
    if fmt is None:
        return a
    gs = grad_scale if spec.ste == "lsq" else None
    return fake_quant(a, qp, fmt, ste=spec.ste, grad_scale=gs)


def reference_dot(x: jax.Array, w: jax.Array, x_qp: QParams | None, w_qp: QParams | None,
                  spec: DotSpec) -> jax.Array:
    """Float fake-quant reference ``fake_quant(x) @ fake_quant(kernel)`` (or the convolution):
    each operand quantized in its own dtype, the kernel's values then taken in ``x``'s
    (compute) dtype, float32 accumulation: float32 ``[..., N]``."""
    x_hat = _fq(x, x_qp, spec.x_format, spec, spec.x_grad_scale)
    w_hat = _fq(_split_kernel(w, spec), w_qp, spec.w_format, spec, spec.w_grad_scale).astype(x.dtype)
    if isinstance(spec, ConvSpec):
        return spec.conv(x_hat, w_hat, jnp.float32, lax.Precision.HIGHEST)
    if spec.group_size is not None:
        w_hat = merge_groups(w_hat, 0)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return lax.dot_general(x_hat, w_hat, dims, precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def dot_from_codes(qx: jax.Array, qw: jax.Array, x_qp: QParams, w_serving: QParams,
                   spec: DotSpec, *, kernel_layout: bool = False) -> jax.Array:
    """The low-precision forward on codes: float32 ``[..., N]``.

    Args:
      qx: activation codes ``[..., K]`` (conv: the padded input's codes).
      qw: weight codes in the serving layout (``[N, K]``; conv ``[*window, C_in, C_out]``),
        or in the kernel's ``[K, N]`` when ``kernel_layout`` (integer, ungrouped only: the
        int32 accumulation is exact, so the result is the same bits).
      x_qp: activation parameters, per tensor (``()``) or, dense only, per row (``[..., 1]``).
      w_serving: weight parameters in serving form.
    """
    if isinstance(spec, ConvSpec):
        return _conv_from_codes(qx, qw, x_qp, w_serving, spec)
    grouped = spec.group_size is not None
    if grouped:
        qx = split_groups(qx, qx.ndim - 1, spec.group_size)
        qw = split_groups(qw, 1, spec.group_size)
    w_scale = jnp.asarray(w_serving.scale, jnp.float32)  # () / [N] / [N, G]
    if spec.native == "int":
        check_contraction(qx.shape[-1], spec.x_format, spec.w_format,
                          lhs_symmetric=spec.x_symmetric, rhs_symmetric=spec.w_symmetric)
        a, za = signed_codes(qx, x_qp.zero_point, spec.x_format)
        b, zb = signed_codes(qw, w_serving.zero_point, spec.w_format)
        # Symmetric signed codes have a zero point that is statically 0: no correction terms.
        za = None if _zero_point_is_zero(spec.x_format, spec.x_symmetric) else za
        zb = None if _zero_point_is_zero(spec.w_format, spec.w_symmetric) else zb
        acc = int_matmul(a, b, za, zb, grouped=grouped, rhs_kn=kernel_layout).astype(jnp.float32)
    else:
        acc = fp8_matmul(qx, qw, grouped=grouped)
    x_scale = jnp.asarray(x_qp.scale, jnp.float32)
    if not grouped:
        return acc * (x_scale * w_scale)
    # acc: [G, ..., N]; each group has its own weight scale, so rescale then sum the groups.
    w_scale = jnp.broadcast_to(w_scale, (qw.shape[0], qw.shape[1])).T
    w_scale = w_scale.reshape((w_scale.shape[0],) + (1,) * (acc.ndim - 2) + (w_scale.shape[1],))
    return jnp.sum(acc * (x_scale * w_scale), axis=0)


def _zero_point_is_zero(fmt: Format, symmetric: bool) -> bool:
    """Whether an operand's int8 zero point is 0 by construction (symmetric parameters, and
    no -128 shift of uint8 codes)."""
    return symmetric and (fmt.signed or fmt.bits < 8)


def _conv_from_codes(qx, qw, x_qp, w_serving, spec: ConvSpec) -> jax.Array:
    """Integer / fp8 convolution on codes; weight scales are per output channel (last axis)."""
    w_scale = jnp.asarray(w_serving.scale, jnp.float32)  # () or [C_out]
    x_scale = jnp.asarray(x_qp.scale, jnp.float32)
    if spec.native == "fp8":
        return spec.conv(qx, qw, jnp.float32) * (x_scale * w_scale)
    check_contraction(int(np.prod(qw.shape[:-1])), spec.x_format, spec.w_format,
                      lhs_symmetric=spec.x_symmetric, rhs_symmetric=True)
    a, za = signed_codes(qx, x_qp.zero_point, spec.x_format)
    b = qw.astype(jnp.int8)
    acc = spec.conv(a, b, jnp.int32)
    colsum = jnp.sum(b, axis=tuple(range(b.ndim - 1)), dtype=jnp.int32)  # [C_out]
    return (acc - za * colsum).astype(jnp.float32) * (x_scale * w_scale)


# ----------------------------------------------------------------------------- training op


def _zero_like_tree(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating)
        else np.zeros(a.shape, jax.dtypes.float0), tree)


def _transpose_in_training(spec: DotSpec) -> bool:
    """Whether the training forward transposes the kernel codes to the serving ``[N, K]``.

    Accelerators run the int8 / fp8 GEMM about twice as fast with both operands contracting
    their last axis, so the codes are transposed (a 1-byte pass). XLA:CPU fuses that
    transpose into the quantization as a strided loop about 7x slower than the in-place one
    and gains nothing in the dot, so there an ungrouped integer dot contracts the codes in
    the kernel's own layout -- exactly the same int32 result.
    """
    return not (spec.native == "int" and spec.group_size is None
                and not isinstance(spec, ConvSpec) and jax.default_backend() == "cpu")


def _kernel_codes(w, w_qp, spec: DotSpec) -> jax.Array:
    """Kernel codes in the kernel's layout (``[K, N]``, or the conv kernel's)."""
    q = quantize(_split_kernel(w, spec), w_qp, spec.w_format)
    return merge_groups(q, 0) if spec.group_size is not None and not isinstance(spec, ConvSpec) else q


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _native_dot(x, w, x_qp, w_qp, spec, x_dtype, w_dtype):
    """``x_dtype`` / ``w_dtype``: ``x``'s and ``w``'s dtypes (static), the dtypes of the gradients."""
    return _native_forward(x, w, x_qp, w_qp, spec)[0]


def _native_forward(x, w, x_qp, w_qp, spec):
    qx = quantize(x, x_qp, spec.x_format)
    q_kernel = _kernel_codes(w, w_qp, spec)
    serving = QParams(*(to_serving(a, spec) for a in w_qp))
    if isinstance(spec, ConvSpec) or _transpose_in_training(spec):
        qw = q_kernel if isinstance(spec, ConvSpec) else q_kernel.T
        y = dot_from_codes(qx, qw, x_qp, serving, spec)
    else:
        y = dot_from_codes(qx, q_kernel, x_qp, serving, spec, kernel_layout=True)
    return y, qx, q_kernel


def _native_dot_fwd(x, w, x_qp, w_qp, spec, x_dtype, w_dtype):
    y, qx, q_kernel = _native_forward(x, w, x_qp, w_qp, spec)
    if spec.ste == "lsq":  # the scale gradients come from the reference's vjp
        return y, (x, w, x_qp, w_qp)
    clipped = spec.ste == "clipped"
    x_mask = ste_mask(x, x_qp, spec.x_format) if clipped and spec.x_mask else None
    w_mask = (ste_mask(_split_kernel(w, spec), w_qp, spec.w_format).reshape(w.shape)
              if clipped and spec.w_mask else None)
    # By default the residuals are the 1-byte codes (a quarter of float training's
    # activation memory), dequantized by the backward right before its matmuls.
    operands = (x, w) if spec.original_residuals else (qx, q_kernel)
    return y, (operands, x_qp, w_qp, (x_mask, w_mask))


def _native_dot_bwd(spec, dtype, w_dtype, res, g):
    if spec.ste == "lsq":
        x, w, x_qp, w_qp = res
        _, vjp = jax.vjp(lambda *a: reference_dot(*a, spec), x, w, x_qp, w_qp)
        return vjp(g)
    (a, b), x_qp, w_qp, (x_mask, w_mask) = res
    if spec.original_residuals:
        a, b = a.astype(dtype), b.astype(dtype)
    else:  # x_hat, w_hat
        a = dequantize(a, x_qp, dtype)
        b = dequantize(_split_kernel(b, spec), w_qp, dtype).reshape(b.shape)
    g = g.astype(dtype)
    if isinstance(spec, ConvSpec):
        _, vjp = jax.vjp(lambda a_, b_: spec.conv(a_, b_, jnp.float32), a, b)
        dx, dw = vjp(g.astype(jnp.float32))
        dx, dw = dx.astype(dtype), dw.astype(w_dtype)
    else:
        batch = tuple(range(g.ndim - 1))
        dx = lax.dot_general(g, b, (((g.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(dtype)
        dw = lax.dot_general(a, g, ((batch, batch), ((), ())),
                             preferred_element_type=jnp.float32).astype(w_dtype)  # [K, N]
    if x_mask is not None:
        dx = jnp.where(x_mask, dx, jnp.zeros_like(dx))
    if w_mask is not None:
        dw = jnp.where(w_mask, dw, jnp.zeros_like(dw))
    zx, zw = _zero_like_tree((x_qp, w_qp))
    return dx, dw, zx, zw


_native_dot.defvjp(_native_dot_fwd, _native_dot_bwd)


def quantized_dot(x: jax.Array, w: jax.Array, x_qp: QParams | None, w_qp: QParams | None,
                  spec: DotSpec) -> jax.Array:
    """``x @ kernel`` (or, with a :class:`ConvSpec`, the convolution of the padded ``x`` with
    the kernel) with quantized operands; differentiable through the STE.

    Args:
      x: float activations ``[..., K]``.
      w: float kernel ``[K, N]`` (conv: ``[*window, C_in, C_out]``).
      x_qp / w_qp: parameters (None where the format is None); ``w_qp`` in kernel form.
      spec: static description.
    Returns:
      float32 ``[..., N]``. With two integer (or two fp8) operands the forward runs the
      integer (fp8) matmul, bit-identical to :func:`dot_from_codes` on stored codes.
    """
    if not isinstance(spec, ConvSpec) and x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"quantized_dot: x has {x.shape[-1]} input features but the kernel expects {w.shape[0]}."
        )
    if spec.original_residuals and (spec.native is None or spec.ste == "lsq"):
        raise ValueError(
            "quantized_dot: `original_residuals` needs two integer (or two fp8) operands and the "
            f"identity or clipped estimator; got {spec.x_format}, {spec.w_format}, ste={spec.ste!r}."
        )
    if spec.native is None:
        return reference_dot(x, w, x_qp, w_qp, spec)
    return _native_dot(x, w, x_qp, w_qp, spec, jnp.dtype(x.dtype), jnp.dtype(w.dtype))
