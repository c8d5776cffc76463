"""Quantized contractions: ``quantized_dot_general``, ``quantized_einsum`` and the
convolution, with one weight path. What you train is what you serve.

``quantized_dot_general(lhs, rhs, dimension_numbers, lhs_qp, rhs_qp, spec)`` computes
``lax.dot_general(lhs, rhs, dimension_numbers)`` with both operands quantized (either
may be a weight or an activation: attention's ``Q K^T`` and ``A V`` quantize two
activations). When both formats are integer (or both fp8) its forward pass runs the
real low-precision contraction of :mod:`qatjax.integer` on the codes -- the same
function (:func:`dot_from_codes`) the serving path runs on stored codes, so training
and serving outputs are bit-identical. Other combinations (weight-only, int x fp8,
activation-only) compute the float contraction of the dequantized codes, again from
the same codes in training and serving. The backward pass is the straight-through
estimator, computed from the forward's codes: the vector-Jacobian product of
``dot_general(lhs_hat, rhs_hat)`` with ``lhs_hat``, ``rhs_hat`` the dequantized codes,
times the masks of the chosen estimator (skipped when provably all ones). The residuals
kept for the backward are the forward's 1-byte codes and their parameters (plus a
1-byte mask per element where the clipped estimator's mask is not provably all ones) --
a quarter (half with masks) of float32 training's, and no second quantization. With LSQ the
backward is the vector-Jacobian product of the float reference :func:`reference_dot`,
which also gives the scale and zero-point gradients.

Parameters (``QParams``) are in *operand form*: a scalar (per tensor) or an array of
the operand's rank that is constant (size 1) along its contracting axes -- per row
(per token), per output channel, per head... -- since only such a scale factors out of
the integer sum. Per-group weights (``spec.group_size``, one contracting axis ``c``)
take parameters that broadcast against the operand split at ``c`` into ``(G, g)``:
size 1 on ``g``; each group then accumulates separately.

The weight path (:func:`encode_weight`): kernel -> codes in the *serving layout* and
*serving parameters* (scale float32, zero point int32 rounded, squeezed of their
contracting axes). Train, infer, :func:`qatjax.convert` and export all call it. Serving
layouts: a dense kernel ``[K, N]`` (``spec.dimension_numbers`` None) of a native
contraction is served as ``[N, K]`` with parameters ``()``, ``[N]`` or ``[N, G]`` (both
GEMM operands contract their last axis: 2x the bf16 rate for int8 / fp8 on Hopper);
other kernels -- weight-only and mixed formats, einsum kernels, convolution kernels
``[*window, C_in, C_out]`` -- keep their own layout (parameters with the contracting
axes squeezed: ``[N]``, ``[G, N]``, conv ``()`` or ``[C_out]``).

Block-scaled formats (:class:`qatjax.BlockFormat`: MXFP8 / MXFP6 / MXFP4 / MXINT8, NVFP4)
block each operand along its (single) contracting axis; their parameters are
:class:`qatjax.BlockScales` with the operand's layout (the block axis shortened to
``ceil(K / block_size)``), computed from the tensor itself. The weight path is the same
one: a dense kernel of a block x block contraction is served as ``[N, K]`` codes with
``[N, G]`` scales (E8M0 bytes, or E4M3 with NVFP4's per-tensor scale), other kernels keep
their layout. The forward (train and serve alike) dequantizes both operands per block and
contracts in float32, or, where JAX has ``jax.nn.scaled_matmul`` and the device runs it
(compute capability 10 or more: MXFP8 and NVFP4 blocks), calls it on the codes. With
``spec.g_format`` (MXFP8 training) the backward block-quantizes the output gradient (E5M2)
along each of its two contractions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.blocks import (BlockScales, block_dequantize, block_fake_quant, block_quantize,
                           block_ste_mask, decode_elements)
from qatjax.fake_quant import align_varying, dequantize, fake_quant, quantize, ste_mask, used_zero_point
from qatjax.formats import Format
from qatjax.integer import (DimensionNumbers, canonical_dims, check_contraction, fp8_dot_general,
                            int_dot_general, signed_codes, to_output)
from qatjax.qparams import SCALE_EPS, QParams, merge_groups, split_groups

__all__ = [
    "DotSpec",
    "ConvSpec",
    "quantized_dot_general",
    "quantized_einsum",
    "einsum_dimension_numbers",
    "contracting_axes",
    "quantized_dot",
    "dot_from_codes",
    "serve",
    "nan_where_non_finite",
    "reference_dot",
    "encode_weight",
    "decode_weight",
    "to_serving",
    "from_serving",
    "scaled_matmul_supported",
    "scaled_matmul_dot",
]


@dataclasses.dataclass(frozen=True)
class DotSpec:
    """Static description of a quantized contraction ``lhs . rhs`` (``x`` is the lhs, ``w``
    the rhs: usually the activation and the kernel).

    Attributes:
      x_format / w_format: formats of the lhs and rhs (None: float).
      x_symmetric / w_symmetric: whether the zero points are 0 (bounds int32 overflow).
      ste: straight-through estimator of the backward pass.
      group_size: per-group rhs: block size along its (single) contracting axis.
      x_grad_scale / w_grad_scale: LSQ gradient scales (None: 1).
      x_mask / w_mask: whether the clipped estimator needs the operand's mask; False when
        the caller knows no code can clip (symmetric integer parameters from the tensor's
        own absmax), which saves a pass over the tensor.
      original_residuals: the backward's contractions take the float operands instead of
        their dequantized codes (Qwix's default for forward-only quantization): cheaper
        (no dequantization) but float residuals, and not the gradient of the fake-quant
        forward. Native contractions with the identity or clipped estimator only.
      dimension_numbers: ``lax.dot_general`` dimension numbers; None: dense, ``x [..., K]``
        with a kernel ``[K, N]`` (served transposed, ``[N, K]``).
      w_is_activation: the rhs is an activation (attention's K or V), whose NaN and
        infinities make the outputs that read them NaN, as the lhs's do. A weight's reach
        the outputs through its min / max scale instead (NaN), which leaves the training
        forward's arithmetic exactly that of serving.
      x_scale_from_data / w_scale_from_data: the operand's parameters come from the tensor
        itself (dynamic scaling), so a NaN or infinity in it already makes them NaN: no
        separate test (see :func:`nan_where_non_finite`).
      g_format: a block format (MXFP8 E5M2) for the output gradient in the backward pass,
        blocked along the contraction of each backward product (``dx``: the rhs free axes;
        ``dw``: the lhs free axes); None keeps it float.
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
    dimension_numbers: DimensionNumbers | None = None
    w_is_activation: bool = False
    x_scale_from_data: bool = False
    w_scale_from_data: bool = False
    g_format: Format | None = None

    @property
    def blocked(self) -> bool:
        """Whether an operand has a block format."""
        return any(f is not None and f.is_block for f in (self.x_format, self.w_format))

    @property
    def native(self) -> str | None:
        """``"int"``, ``"fp8"`` or ``"block"`` (two block formats) when the forward contracts
        low-precision codes, else None."""
        if self.x_format is None or self.w_format is None:
            return None
        if self.blocked:
            return "block" if self.x_format.is_block and self.w_format.is_block else None
        if not self.x_format.is_float and not self.w_format.is_float:
            return "int"
        if self.x_format.is_float and self.w_format.is_float:
            return "fp8"
        return None

    def dims(self, x_ndim: int, w_ndim: int) -> DimensionNumbers:
        """The contraction in the operands' own (kernel) layouts."""
        if self.dimension_numbers is None:
            return ((x_ndim - 1,), (0,)), ((), ())
        return canonical_dims(self.dimension_numbers, x_ndim, w_ndim)

    def serving_perm(self, w_ndim: int) -> tuple[int, ...]:
        """Axis permutation from the kernel layout to the serving layout of the rhs codes.

        Dense kernels of a native (int x int, fp8 x fp8) contraction serve as ``[N, K]``;
        every other kernel keeps its layout: a float contraction of dequantized codes gives
        the same bits in training and serving only when both read the rhs in one layout.
        """
        if (self.dimension_numbers is None and not isinstance(self, ConvSpec)
                and self.native is not None):
            return (1, 0)
        return tuple(range(w_ndim))


@dataclasses.dataclass(frozen=True)
class ConvSpec(DotSpec):
    """A quantized convolution: the weight is ``[*window, C_in / groups, C_out]`` (HWIO) and
    the input is already padded (``"VALID"`` convolution), so padded positions hold real
    zeros, whose code is the zero point: every window then needs the same closed-form
    correction ``- za * sum(window of b)`` (and ``- zb * sum(window of a)`` for weights
    with a zero point, uint8 codes included).

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

    def dims(self, x_ndim: int, w_ndim: int) -> DimensionNumbers:
        """Contracting axes of the kernel (every axis but the output channels)."""
        return (((), tuple(range(w_ndim - 1))), ((), ()))


# ----------------------------------------------------------------------------- layouts


def _rhs_axes(spec: DotSpec, w_ndim: int) -> tuple[int, ...]:
    """The contracting axes of the rhs (kernel layout)."""
    if isinstance(spec, ConvSpec):
        return tuple(range(w_ndim - 1))
    if spec.dimension_numbers is None:
        return (0,)
    (_, rc), _ = spec.dimension_numbers
    return tuple(a % w_ndim for a in ((rc,) if isinstance(rc, int) else rc))


def contracting_axes(spec: DotSpec, ndim: int, side: str = "rhs") -> tuple[int, ...]:
    """The contracting axes of the ``"lhs"`` (rank ``ndim``) or ``"rhs"`` (kernel layout)
    operand: the axes along which its parameters must be constant. A convolution's input
    contracts its channels (and windows, which no parameter can vary along)."""
    if side == "rhs":
        return _rhs_axes(spec, ndim)
    if isinstance(spec, ConvSpec) or spec.dimension_numbers is None:
        return (ndim - 1,)
    (lc, _), _ = spec.dimension_numbers
    return tuple(a % ndim for a in ((lc,) if isinstance(lc, int) else lc))


def _group_axis(spec: DotSpec, w_ndim: int) -> int:
    """The rhs contracting axis that per-group parameters split."""
    axes = _rhs_axes(spec, w_ndim)
    if len(axes) != 1:
        raise ValueError(f"per-group quantization needs exactly one contracting axis on the rhs, "
                         f"got {axes}.")
    return axes[0]


def _split(w: jax.Array, spec: DotSpec) -> jax.Array:
    """``w`` split at its (group) contracting axis into ``(G, g)``; unchanged when not grouped."""
    if spec.group_size is None:
        return w
    return split_groups(w, _group_axis(spec, w.ndim), spec.group_size)


def _merge(w: jax.Array, spec: DotSpec, axis: int) -> jax.Array:
    return w if spec.group_size is None else merge_groups(w, axis)


def _squeezed_axes(spec: DotSpec, w_ndim: int) -> tuple[int, ...]:
    """Axes of a kernel-form parameter that the serving form drops (size 1 there)."""
    if spec.group_size is not None:
        return (_group_axis(spec, w_ndim) + 1,)  # the group members
    return _rhs_axes(spec, w_ndim)


def to_serving(a: jax.Array, spec: DotSpec, w_ndim: int = 2) -> jax.Array:
    """Kernel-form parameter -> serving form: its contracting axes (the group members when
    grouped) squeezed, the rest in the serving layout's order (dense ``[N]`` / ``[N, G]``,
    conv ``[C_out]``, einsum kernels the kernel's non-contracting axes)."""
    a = jnp.asarray(a)
    if a.ndim == 0:
        return a
    squeeze = _squeezed_axes(spec, w_ndim)
    a = jnp.squeeze(a, squeeze)
    return jnp.transpose(a, _kept_perm(spec, w_ndim))


def from_serving(a: jax.Array, spec: DotSpec, w_ndim: int = 2) -> jax.Array:
    """Serving-form parameter -> kernel form (broadcasts against the kernel, or its split)."""
    a = jnp.asarray(a)
    if a.ndim == 0:
        return a
    a = jnp.transpose(a, np.argsort(_kept_perm(spec, w_ndim)))
    return jnp.expand_dims(a, _squeezed_axes(spec, w_ndim))


def _kept_perm(spec: DotSpec, w_ndim: int) -> tuple[int, ...]:
    """The serving permutation restricted to the axes a serving-form parameter keeps."""
    grouped = spec.group_size is not None
    kept = [a for a in range(w_ndim) if grouped or a not in _rhs_axes(spec, w_ndim)]
    order = [a for a in spec.serving_perm(w_ndim) if a in kept]
    return tuple(kept.index(a) for a in order)


def _operand_form(a: jax.Array, spec: DotSpec, w_ndim: int, perm: tuple[int, ...]) -> jax.Array:
    """Serving-form parameter -> operand form in the layout ``perm`` of the kernel."""
    return _permute_param(from_serving(a, spec, w_ndim), spec, w_ndim, perm)


def _permute_param(a: jax.Array, spec: DotSpec, w_ndim: int, perm: tuple[int, ...]) -> jax.Array:
    """Kernel-form parameter -> operand form in the kernel layout permuted by ``perm``."""
    a = jnp.asarray(a)
    if a.ndim == 0 or perm == tuple(range(w_ndim)):
        return a
    if spec.group_size is None:
        return jnp.transpose(a, perm)
    c = _group_axis(spec, w_ndim)  # the split form has the extra axis c + 1
    split_perm = []
    for p in perm:
        split_perm += [p] if p < c else ([c, c + 1] if p == c else [p + 1])
    return jnp.transpose(a, split_perm)


def _permuted_dims(dims: DimensionNumbers, perm: tuple[int, ...]) -> DimensionNumbers:
    """Dimension numbers after the rhs is transposed by ``perm``."""
    (lc, rc), (lb, rb) = dims
    where = {a: i for i, a in enumerate(perm)}
    return (lc, tuple(where[a] for a in rc)), (lb, tuple(where[a] for a in rb))


def encode_weight(w: jax.Array, w_qp: QParams, spec: DotSpec) -> tuple[jax.Array, QParams]:
    """The weight path: ``(codes, serving parameters)`` of a kernel.

    Train mode, infer mode, :func:`qatjax.convert` and export all call this, so they
    serve the same codes by construction.

    Args:
      w: the kernel as the layer uses it (after any mask), in its stored dtype.
      w_qp: kernel-form parameters (broadcast against ``w``, or its group split).
      spec: the contraction.
    Returns:
      codes in the serving layout (1-byte dtype of the format) and serving-form
      parameters: float32 scale, int32 zero point (rounded).
    """
    perm = spec.serving_perm(w.ndim)
    if spec.w_format.is_block:  # block scales keep the kernel's rank: permuted like the codes
        q, scales = block_quantize(w, spec.w_format, _block_axis(spec, w.ndim, "rhs"),
                                   scales=w_qp)
        return jnp.transpose(q, perm), BlockScales(jnp.transpose(scales.scale, perm),
                                                   scales.tensor_scale)
    q = _kernel_codes(w, w_qp, spec)
    codes = jnp.transpose(q, perm)
    serving = QParams(jnp.maximum(jnp.asarray(to_serving(w_qp.scale, spec, w.ndim), jnp.float32),
                                  jnp.float32(SCALE_EPS)),  # a learned scale, floored as quantize does
                      used_zero_point(to_serving(w_qp.zero_point, spec, w.ndim), spec.w_format
                                      ).astype(jnp.int32))
    return codes, serving


def decode_weight(codes: jax.Array, serving: QParams, spec: DotSpec,
                  dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Inverse of :func:`encode_weight`: the dequantized kernel ``(codes - zp) * scale`` in
    the kernel's layout (block formats: ``serving`` is ``(block scales, tensor scale)``, e.g.
    the ``(kernel_scale, kernel_zero_point)`` of converted variables)."""
    perm = spec.serving_perm(codes.ndim)
    inverse = tuple(int(i) for i in np.argsort(perm))
    q = jnp.transpose(codes, inverse)
    if spec.w_format.is_block:
        scale, tensor_scale = serving
        return block_dequantize(q, BlockScales(jnp.transpose(scale, inverse), tensor_scale),
                                spec.w_format, _block_axis(spec, q.ndim, "rhs"), dtype)
    w_qp = QParams(*(from_serving(a, spec, q.ndim) for a in serving))
    return _decode_kernel(q, w_qp, spec, dtype)


def _kernel_codes(w, w_qp, spec: DotSpec) -> jax.Array:
    """Kernel codes in the kernel's layout."""
    q = quantize(_split(w, spec), w_qp, spec.w_format)
    return _merge(q, spec, _group_axis(spec, w.ndim) if spec.group_size is not None else 0)


def _decode_kernel(q: jax.Array, w_qp: QParams, spec: DotSpec, dtype) -> jax.Array:
    """Dequantized kernel-layout codes (kernel-form parameters)."""
    if spec.group_size is None:
        return dequantize(q, w_qp, dtype)
    c = _group_axis(spec, q.ndim)
    return merge_groups(dequantize(split_groups(q, c, spec.group_size), w_qp, dtype), c)


def _rounded(qp: QParams | None, fmt: Format | None) -> QParams | None:
    """Parameters as the codes use them: a float (learned) zero point as
    :func:`qatjax.fake_quant.used_zero_point` makes it, ``clip(round(zp), qmin, qmax)``, int32
    (block scales unchanged)."""
    if qp is None or fmt is None or fmt.is_block:
        return qp
    zp = jnp.asarray(qp.zero_point)
    if jnp.issubdtype(zp.dtype, jnp.floating):
        zp = used_zero_point(zp, fmt).astype(jnp.int32)
    return QParams(qp.scale, zp)


# ----------------------------------------------------------------------------- forward


def _block_axis(spec: DotSpec, ndim: int, side: str) -> int:
    """The block axis of a block-format operand: its single contracting axis."""
    axes = contracting_axes(spec, ndim, side)
    if len(axes) != 1:
        raise ValueError(f"block formats need exactly one contracting axis on the {side} (the "
                         f"block axis), got {axes}.")
    return axes[0]


def _fq(a, qp, fmt, spec: DotSpec, grad_scale):
    if fmt is None:
        return a
    gs = grad_scale if spec.ste == "lsq" else None
    return fake_quant(a, qp, fmt, ste=spec.ste, grad_scale=gs)


def reference_dot(x: jax.Array, w: jax.Array, x_qp: QParams | None, w_qp: QParams | None,
                  spec: DotSpec) -> jax.Array:
    """Float fake-quant reference ``dot_general(fake_quant(x), fake_quant(w))`` (or the
    convolution): each operand quantized in its own dtype, the rhs values then taken in
    ``x``'s (compute) dtype, float32 accumulation at the highest precision: float32 in
    ``lax.dot_general``'s output layout."""
    x_hat = _fq(x, x_qp, spec.x_format, spec, spec.x_grad_scale)
    w_hat = _fq(_split(w, spec), w_qp, spec.w_format, spec, spec.w_grad_scale).astype(x.dtype)
    if isinstance(spec, ConvSpec):
        return spec.conv(x_hat, w_hat, jnp.float32, lax.Precision.HIGHEST)
    w_hat = _merge(w_hat, spec, _group_axis(spec, w.ndim) if spec.group_size is not None else 0)
    return lax.dot_general(x_hat, w_hat, spec.dims(x.ndim, w.ndim), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def dot_from_codes(qx: jax.Array, qw: jax.Array, x_qp: QParams | None, w_serving: QParams | None,
                   spec: DotSpec) -> jax.Array:
    """The forward on codes, shared by training and serving: float32 in
    ``lax.dot_general``'s output layout (conv: ``[N, *spatial', C_out]``).

    Args:
      qx: lhs codes (conv: the padded input's codes); the float lhs when ``x_format`` is None.
      qw: rhs codes in the serving layout (see :func:`encode_weight`); the float kernel (kernel
        layout) when ``w_format`` is None.
      x_qp: lhs parameters in operand form (None when ``x_format`` is None).
      w_serving: rhs parameters in serving form (None when ``w_format`` is None).
    """
    if spec.blocked:
        return _block_contract(qx, x_qp, qw, w_serving, spec)
    if spec.w_format is None:
        return _contract(qx, _rounded(x_qp, spec.x_format), qw, None, spec.dims(qx.ndim, qw.ndim), spec)
    perm = spec.serving_perm(qw.ndim)
    w_qp = QParams(*(_operand_form(a, spec, qw.ndim, perm) for a in w_serving))
    dims = _permuted_dims(spec.dims(qx.ndim, qw.ndim), perm)
    group_axis = None if spec.group_size is None else perm.index(_group_axis(spec, qw.ndim))
    return _contract(qx, _rounded(x_qp, spec.x_format), qw, w_qp, dims, spec, group_axis)


def _block_contract(qx, x_qp, qw, w_serving, spec: DotSpec) -> jax.Array:
    """The forward of a contraction with a block-format operand, on codes (``qw`` in the
    serving layout): ``jax.nn.scaled_matmul`` where :func:`scaled_matmul_supported`, else
    both operands dequantized (block formats per block) and contracted in float32 at the
    highest precision (in the lhs's dtype when it is float)."""
    perm = spec.serving_perm(qw.ndim)
    dims = _permuted_dims(spec.dims(qx.ndim, qw.ndim), perm)
    if scaled_matmul_supported(spec):
        return scaled_matmul_dot(qx, BlockScales(*x_qp), qw, BlockScales(*w_serving), spec, dims)
    (lc, rc), _ = dims
    if spec.x_format is None:
        a = qx
    elif spec.x_format.is_block:
        a = block_dequantize(qx, BlockScales(*x_qp), spec.x_format, lc[0])
    else:
        a = dequantize(qx, _rounded(x_qp, spec.x_format), jnp.float32)
    if spec.w_format is None:
        b = qw
    elif spec.w_format.is_block:
        b = block_dequantize(qw, BlockScales(*w_serving), spec.w_format, rc[0])
    else:  # (mixed formats serve in the kernel's layout)
        w_qp = QParams(*(from_serving(p, spec, qw.ndim) for p in w_serving))
        b = _decode_kernel(qw, _rounded(w_qp, spec.w_format), spec, jnp.float32)
    return lax.dot_general(a, b.astype(a.dtype), dims, precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _scaled_matmul_kind(spec: DotSpec) -> str | None:
    """``"mxfp8"`` / ``"nvfp4"`` when both operands are block formats that
    ``jax.nn.scaled_matmul`` takes (MXFP8 E4M3 / E5M2 in blocks of 32; NVFP4), else None."""
    if spec.native != "block" or isinstance(spec, ConvSpec):
        return None
    x, w = spec.x_format, spec.w_format
    if all(f.element in ("e4m3", "e5m2") and f.scale_format == "e8m0" and f.block_size == 32
           for f in (x, w)):
        return "mxfp8"
    if all(f.element == "e2m1" and f.scale_format == "e4m3" and f.block_size == 16 for f in (x, w)):
        return "nvfp4"
    return None


def scaled_matmul_supported(spec: DotSpec, backend: str | None = None) -> bool:
    """Whether the forward of ``spec`` runs ``jax.nn.scaled_matmul`` on the codes: the
    installed JAX has it, both operands are MXFP8 or both NVFP4 (:func:`_scaled_matmul_kind`),
    and the backend is a GPU of compute capability 10 or more (Blackwell: cuDNN's block-scaled
    GEMM). Elsewhere (CPU, Hopper...) the forward dequantizes per block."""
    if getattr(jax.nn, "scaled_matmul", None) is None or _scaled_matmul_kind(spec) is None:
        return False
    if (backend or jax.default_backend()) != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return float(capability) >= 10.0
    except (TypeError, ValueError):
        return False


def scaled_matmul_dot(qx: jax.Array, x_scales: BlockScales, qw: jax.Array, w_scales: BlockScales,
                      spec: DotSpec, dims: DimensionNumbers) -> jax.Array:
    """The block-scaled contraction on codes with ``jax.nn.scaled_matmul``: lhs ``[..., K]``
    and rhs ``[N, K]`` (the serving layout of a dense kernel) -> float32 ``[..., N]``.

    The codes go in as ``float8_*`` / ``float4_e2m1fn`` and the block scales as
    ``float8_e8m0fnu`` (the E8M0 bytes reinterpreted) or ``float8_e4m3fn``; a ragged ``K`` is
    padded with zero codes to whole blocks; NVFP4's per-tensor scales multiply the output.
    """
    (lc, rc), (lb, rb) = dims
    if lb or rb or lc != (qx.ndim - 1,) or rc != (1,) or qw.ndim != 2:
        raise ValueError("scaled_matmul_dot: expects a dense lhs [..., K] and a rhs [N, K] "
                         f"contracting their last axes, got dimension numbers {dims}.")

    def operand(q, scales, fmt):
        values = q if fmt.element in ("e4m3", "e5m2") else decode_elements(q, fmt).astype(
            jnp.float4_e2m1fn)
        k = values.shape[-1]
        blocks = scales.scale.shape[-1]
        if blocks * fmt.block_size != k:  # zero codes fill the ragged last block
            values = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, blocks * fmt.block_size - k)])
        scale = (lax.bitcast_convert_type(scales.scale, jnp.float8_e8m0fnu)
                 if fmt.scale_format == "e8m0" else scales.scale)
        return (values.reshape((1, -1, values.shape[-1])),
                scale.reshape((1, -1, scale.shape[-1])))

    a, a_scale = operand(qx, x_scales, spec.x_format)
    b, b_scale = operand(qw, w_scales, spec.w_format)
    y = jax.nn.scaled_matmul(a, b, a_scale, b_scale, preferred_element_type=jnp.float32)
    y = y.reshape(qx.shape[:-1] + (qw.shape[0],))
    return y * (jnp.asarray(x_scales.tensor_scale, jnp.float32)
                * jnp.asarray(w_scales.tensor_scale, jnp.float32))


def _zero_point_is_zero(fmt: Format, symmetric: bool) -> bool:
    """Whether an operand's int8 zero point is 0 by construction (symmetric parameters, and
    no -128 shift of uint8 codes)."""
    return symmetric and (fmt.signed or fmt.bits < 8)


def _decode(q, qp, fmt, dtype):
    """Dequantized codes in ``dtype`` (a float operand is only cast)."""
    return q.astype(dtype) if fmt is None else dequantize(q, qp, jnp.float32).astype(dtype)


def _contract(qx, x_qp, qw, w_qp, dims, spec: DotSpec, group_axis: int | None = None) -> jax.Array:
    """The contraction of codes in a given rhs layout (``dims``; ``w_qp`` in operand form of
    that layout, ``group_axis`` its split axis when grouped): float32."""
    if isinstance(spec, ConvSpec):
        return _conv_from_codes(qx, qw, x_qp, w_qp, spec)
    if spec.native is None:
        # Weight-only, activation-only, int x fp8: the float contraction of the dequantized
        # codes, in the lhs's dtype when it is float (the compute dtype), else in float32.
        a = _decode(qx, x_qp, spec.x_format, qx.dtype if spec.x_format is None else jnp.float32)
        # (These kernels serve in their own layout, so the codes are in the kernel's.)
        b = (qw if spec.w_format is None else _decode_kernel(qw, w_qp, spec, jnp.float32)).astype(a.dtype)
        return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)
    x_scale = jnp.asarray(x_qp.scale, jnp.float32)
    x_zp = x_qp.zero_point
    if spec.group_size is not None:
        qx, qw, x_scale, x_zp, dims = _group_as_batch(qx, qw, x_scale, x_zp, dims, group_axis,
                                                      spec.group_size)
    k = math.prod(qx.shape[a] for a in dims[0][0])
    if spec.native == "int":
        if not jax.export.is_symbolic_dim(k):  # (a symbolic size, as jax.export's shape
            # polymorphism gives a sequence length, is unknown until the artifact runs)
            check_contraction(k, spec.x_format, spec.w_format,
                              lhs_symmetric=spec.x_symmetric, rhs_symmetric=spec.w_symmetric)
        a, za = signed_codes(qx, x_zp, spec.x_format)
        b, zb = signed_codes(qw, w_qp.zero_point, spec.w_format)
        # Symmetric signed codes have a zero point that is statically 0: no correction terms.
        za = None if _zero_point_is_zero(spec.x_format, spec.x_symmetric) else za
        zb = None if _zero_point_is_zero(spec.w_format, spec.w_symmetric) else zb
        acc = int_dot_general(a, b, dims, za, zb).astype(jnp.float32)
    else:
        acc = fp8_dot_general(qx, qw, dims)
    out = lambda p, side: to_output(jnp.asarray(p, jnp.float32), side, dims, qx.ndim, qw.ndim)  # noqa: E731
    y = acc * (out(x_scale, "lhs") * out(w_qp.scale, "rhs"))
    # Grouped: the groups are the leading batch axis; each has its own scales, so rescale
    # then sum the groups.
    return y if spec.group_size is None else jnp.sum(y, axis=0)


def _group_as_batch(qx, qw, x_scale, x_zp, dims, w_axis: int, group_size: int):
    """Splits the contracting axis into ``(G, g)`` on both sides and makes ``G`` the leading
    batch axis; lhs parameters gain the matching size-1 axis."""
    (lc, rc), (lb, rb) = dims
    l_axis = lc[rc.index(w_axis)]
    qx, qw = split_groups(qx, l_axis, group_size), split_groups(qw, w_axis, group_size)

    def expand(p):
        p = jnp.asarray(p)
        return p if p.ndim == 0 else jnp.expand_dims(p, l_axis + 1)

    shift = lambda axes, at: tuple(a + 1 if a > at else a for a in axes)  # noqa: E731
    lc2 = tuple(l_axis + 1 if a == l_axis else a for a in shift(lc, l_axis))
    rc2 = tuple(w_axis + 1 if a == w_axis else a for a in shift(rc, w_axis))
    dims = (lc2, rc2), ((l_axis,) + shift(lb, l_axis), (w_axis,) + shift(rb, w_axis))
    return qx, qw, expand(x_scale), expand(x_zp), dims


def _conv_from_codes(qx, qw, x_qp, w_qp, spec: ConvSpec) -> jax.Array:
    """Integer / fp8 / float-of-codes convolution; weight parameters per output channel
    (operand form ``[1, ..., 1, C_out]``) or per tensor."""
    if spec.native is None:
        a = _decode(qx, x_qp, spec.x_format, qx.dtype if spec.x_format is None else jnp.float32)
        b = _decode(qw, w_qp, spec.w_format, a.dtype)
        return spec.conv(a, b, jnp.float32, lax.Precision.HIGHEST)
    channel = lambda p: jnp.reshape(jnp.asarray(p), (-1,)) if jnp.ndim(p) else jnp.asarray(p)  # noqa: E731
    x_scale = jnp.asarray(x_qp.scale, jnp.float32)
    w_scale = channel(jnp.asarray(w_qp.scale, jnp.float32))
    if spec.native == "fp8":
        return spec.conv(qx, qw, jnp.float32) * (x_scale * w_scale)
    k = int(np.prod(qw.shape[:-1]))
    check_contraction(k, spec.x_format, spec.w_format,
                      lhs_symmetric=spec.x_symmetric, rhs_symmetric=spec.w_symmetric)
    a, za = signed_codes(qx, x_qp.zero_point, spec.x_format)
    b, zb = signed_codes(qw, w_qp.zero_point, spec.w_format)
    acc = spec.conv(a, b, jnp.int32)
    if not _zero_point_is_zero(spec.x_format, spec.x_symmetric):
        acc = acc - za * jnp.sum(b, axis=tuple(range(b.ndim - 1)), dtype=jnp.int32)  # [C_out]
    if not _zero_point_is_zero(spec.w_format, spec.w_symmetric):
        zb = channel(zb)
        window_sums = spec.conv(a, jnp.ones_like(b), jnp.int32)  # sum of each window of a
        acc = acc - zb * window_sums
        if not _zero_point_is_zero(spec.x_format, spec.x_symmetric):
            acc = acc + jnp.int32(k) * za * zb
    return acc.astype(jnp.float32) * (x_scale * w_scale)


# ----------------------------------------------------------------------------- training op


def _zero_like_tree(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.zeros_like(a) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
        else np.zeros(jnp.shape(a), jax.dtypes.float0), tree)


def _kernel_layout_in_training(spec: DotSpec) -> bool:
    """Whether the training forward contracts the kernel codes in the kernel's own layout
    instead of transposing them to the serving layout.

    Accelerators run the int8 / fp8 GEMM about twice as fast with both operands contracting
    their last axis, so dense codes are transposed (a 1-byte pass). XLA:CPU fuses that
    transpose into the quantization as a strided loop about 7x slower than the in-place one
    and gains nothing in the dot, so there an ungrouped integer dense dot contracts the
    codes in the kernel's own layout -- exactly the same int32 result. Layouts that serve
    untransposed are the same either way.
    """
    if spec.blocked:  # the serving path itself (block scales follow the codes' layout)
        return False
    if spec.w_format is None or spec.serving_perm(2) == (0, 1):
        return True
    return spec.native == "int" and spec.group_size is None and jax.default_backend() == "cpu"


def _encode_lhs(x, x_qp, spec: DotSpec):
    if spec.x_format is None:
        return x
    if spec.x_format.is_block:
        return block_quantize(x, spec.x_format, _block_axis(spec, x.ndim, "lhs"),
                              scales=BlockScales(*x_qp))[0]
    return quantize(x, _rounded(x_qp, spec.x_format), spec.x_format)


def _non_finite_rows(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Bool, ``a``'s shape with size 1 on ``axes`` (a scalar when ``axes`` are all of them):
    whether the slice holds a NaN or an infinity.

    The test is the sum of ``|a|`` over ``axes`` (non-finite exactly where a value is, or
    where finite values beyond ~1e38 / K overflow, which no quantization range holds
    either), computed as a dot with ones: its own GEMV. XLA:CPU fuses a plain reduction
    into the quantization loop and slows a static QAT step down by ~30%.
    """
    ones = jnp.ones(tuple(a.shape[i] for i in axes), a.dtype)
    total = lax.dot_general(jnp.abs(a), ones, ((axes, tuple(range(len(axes)))), ((), ())),
                            preferred_element_type=jnp.float32)
    return ~jnp.isfinite(total if len(axes) == a.ndim else jnp.expand_dims(total, axes))


def nan_where_non_finite(y: jax.Array, x: jax.Array, w: jax.Array | None, spec: DotSpec,
                         w_ndim: int) -> jax.Array:
    """NaN in, NaN out: the contraction's output ``y`` with NaN wherever it reads a NaN or an
    infinity of a quantized activation whose scale does not come from the tensor itself.

    Codes cannot hold NaN (integers) or infinity (fp8 saturates), and a static scale does
    not see the batch, so without this a diverging input would give finite outputs. A dot
    output reads rows: those of ``x`` (and of ``w`` when ``spec.w_is_activation``) that hold
    one are NaN, the others keep their values. A convolution output reads many rows: any
    non-finite input value makes the whole output NaN. Scales from the tensor itself
    (``spec.x_scale_from_data``: dynamic scaling) are NaN already and need no test; a
    weight's NaN reaches its min / max scale.

    Args:
      y: float32 output in ``lax.dot_general``'s layout (conv: ``[N, *spatial', C_out]``).
      x, w: the lhs and the rhs (kernel layout; None when serving stored codes).
      w_ndim: the rhs's rank.
    """
    conv = isinstance(spec, ConvSpec)
    dims = None if conv else spec.dims(x.ndim, w_ndim)
    sides = [("lhs", x, spec.x_format is not None and not spec.x_scale_from_data),
             ("rhs", w, w is not None and spec.w_format is not None and spec.w_is_activation
              and not spec.w_scale_from_data)]
    for side, a, tested in sides:
        if not tested:
            continue
        if conv:
            bad = _non_finite_rows(a, tuple(range(a.ndim)))
        else:
            bad = to_output(_non_finite_rows(a, contracting_axes(spec, a.ndim, side)), side, dims,
                            x.ndim, w_ndim)
        y = jnp.where(bad, jnp.nan, y)
    return y


def serve(x: jax.Array, codes: jax.Array, x_qp: QParams | None, w_serving: QParams,
          spec: DotSpec) -> jax.Array:
    """Serving from stored weights: ``x`` quantized with ``x_qp``, then :func:`dot_from_codes`
    with the codes and serving parameters of :func:`encode_weight`. Equals the forward of
    :func:`quantized_dot_general` / :func:`quantized_dot` bit for bit; outputs that read a
    NaN or infinity of ``x`` are NaN (see :func:`nan_where_non_finite`)."""
    y = dot_from_codes(_encode_lhs(x, x_qp, spec), codes, x_qp, w_serving, spec)
    return nan_where_non_finite(y, x, None, spec, codes.ndim)


def _forward(x, w, x_qp, w_qp, spec: DotSpec):
    """The training / unconverted-infer forward: ``(y, lhs codes, kernel-layout rhs codes)``;
    outputs that read a NaN or infinity of a quantized activation are NaN."""
    y, qx, q_kernel = _forward_on_codes(x, w, x_qp, w_qp, spec)
    return nan_where_non_finite(y, x, w, spec, w.ndim), qx, q_kernel


def _forward_on_codes(x, w, x_qp, w_qp, spec: DotSpec):
    x_qp = _rounded(x_qp, spec.x_format)
    qx = _encode_lhs(x, x_qp, spec)
    if spec.w_format is None:
        return dot_from_codes(qx, w, x_qp, None, spec), qx, w
    if _kernel_layout_in_training(spec):
        q_kernel = _kernel_codes(w, w_qp, spec)
        w_op = QParams(jnp.asarray(w_qp.scale, jnp.float32), _rounded(w_qp, spec.w_format).zero_point)
        group_axis = _group_axis(spec, w.ndim) if spec.group_size is not None else None
        y = _contract(qx, x_qp, q_kernel, w_op, spec.dims(x.ndim, w.ndim), spec, group_axis)
        return y, qx, q_kernel
    codes, serving = encode_weight(w, w_qp, spec)
    q_kernel = jnp.transpose(codes, tuple(int(i) for i in np.argsort(spec.serving_perm(w.ndim))))
    return dot_from_codes(qx, codes, x_qp, serving, spec), qx, q_kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _qdot(x, w, x_qp, w_qp, spec, x_dtype, w_dtype):
    """``x_dtype`` / ``w_dtype``: ``x``'s and ``w``'s dtypes (static), the dtypes of the gradients."""
    return _forward(x, w, x_qp, w_qp, spec)[0]


def _qdot_fwd(x, w, x_qp, w_qp, spec, x_dtype, w_dtype):
    y, qx, q_kernel = _forward(x, w, x_qp, w_qp, spec)
    if spec.ste == "lsq":  # the scale gradients come from the reference's vjp
        return y, (x, w, x_qp, w_qp)
    clipped = spec.ste == "clipped"
    x_mask = (_operand_mask(x, x_qp, spec.x_format, spec, "lhs")
              if clipped and spec.x_mask and spec.x_format is not None else None)
    w_mask = (_operand_mask(w, w_qp, spec.w_format, spec, "rhs")
              if clipped and spec.w_mask and spec.w_format is not None else None)
    # By default the residuals are the 1-byte codes (and masks), dequantized by the
    # backward right before its contractions.
    operands = (x, w) if spec.original_residuals else (qx, q_kernel)
    return y, (operands, x_qp, w_qp, (x_mask, w_mask))


def _operand_mask(a, qp, fmt: Format, spec: DotSpec, side: str) -> jax.Array:
    """The clipped estimator's mask of an operand (``"rhs"``: the kernel, kernel form)."""
    if fmt.is_block:
        return block_ste_mask(a, fmt, _block_axis(spec, a.ndim, side), scales=BlockScales(*qp))
    if side == "lhs":
        return ste_mask(a, qp, fmt)
    return ste_mask(_split(a, spec), qp, fmt).reshape(a.shape)


def _decode_operand(q, qp, fmt: Format, spec: DotSpec, side: str, dtype, g: jax.Array) -> jax.Array:
    """Dequantized residual codes (the rhs in the kernel's layout, kernel-form parameters),
    computed in the backward pass: after the output gradient ``g`` (see :func:`_after`)."""
    if fmt.is_block:
        return block_dequantize(q, BlockScales(*qp), fmt, _block_axis(spec, q.ndim, side), dtype)
    qp = _rounded(qp, fmt)
    qp = QParams(_after(jnp.asarray(qp.scale, jnp.float32), g), qp.zero_point)
    if side == "lhs":
        return dequantize(q, qp, dtype)
    return _decode_kernel(q, qp, spec, dtype)


def _after(a: jax.Array, g: jax.Array) -> jax.Array:
    """``a`` (float32) bit for bit, as a value that depends on the output gradient ``g``.

    The backward dequantizes the residual codes right before its contractions, but nothing
    ties that dequantization to the backward: XLA fuses it with the forward's quantization
    (reading the float operand) and XLA:CPU's scheduler runs it in the forward pass, so each
    layer's float dequantized kernel (and activation) lives from the forward to the backward:
    the train step's temporary memory then exceeded float training's by all the kernels
    (+7% with 12 blocks, +30% with 2: benchmarks/RESULTS.md, issue 18). Scaling the codes by
    ``a`` times a runtime one read from ``g`` makes the dequantization wait for ``g``, so it
    is transient. (``lax.optimization_barrier`` would say the same, but XLA:CPU removes it
    before fusion.) The one is ``(b | 1) != 0`` for ``b`` the bits of ``g``'s first element:
    exactly 1 for any ``g`` (NaN and infinities included, where ``1 + 0 * g`` would not be),
    cheap enough to fuse into the dequantization, and a bit test XLA does not fold; ``a * 1.0``
    is ``a``.
    """
    if 0 in g.shape:
        return a
    bits = lax.bitcast_convert_type(g[(0,) * g.ndim].astype(jnp.float32), jnp.int32)
    return a * ((bits | 1) != 0).astype(jnp.float32)


def _quantized_gradients(g: jax.Array, spec: DotSpec, dims: DimensionNumbers, lhs_ndim: int,
                         rhs_ndim: int) -> tuple[jax.Array, jax.Array]:
    """The output gradient block fake-quantized with ``spec.g_format`` for each backward
    product: ``(for dx, for dw)``, blocked along the last rhs free axis (``dx`` contracts the
    rhs free axes) and the last lhs free axis (``dw`` contracts the lhs free axes); a side
    without free axes keeps ``g``. ``g`` is ``[*batch, *lhs_free, *rhs_free]``."""
    (lc, rc), (lb, _) = dims
    n_lhs_free = lhs_ndim - len(lc) - len(lb)
    n_rhs_free = rhs_ndim - len(rc) - len(lb)
    quantized = lambda axis: block_fake_quant(g, spec.g_format, axis, ste="identity")  # noqa: E731
    g_dx = quantized(g.ndim - 1) if n_rhs_free else g
    g_dw = quantized(len(lb) + n_lhs_free - 1) if n_lhs_free else g
    return g_dx, g_dw


def _qdot_bwd(spec, dtype, w_dtype, res, g):
    if spec.ste == "lsq":
        x, w, x_qp, w_qp = res
        _, vjp = jax.vjp(lambda *a: reference_dot(*a, spec), x, w, x_qp, w_qp)
        return vjp(g)
    (a, b), x_qp, w_qp, (x_mask, w_mask) = res
    if spec.original_residuals or spec.x_format is None:
        a = a.astype(dtype)
    else:  # x_hat
        a = _decode_operand(a, x_qp, spec.x_format, spec, "lhs", dtype, g)
    if spec.original_residuals or spec.w_format is None:
        b = b.astype(dtype)
    else:  # w_hat
        b = _decode_operand(b, w_qp, spec.w_format, spec, "rhs", dtype, g)
    if isinstance(spec, ConvSpec):
        _, vjp = jax.vjp(lambda a_, b_: spec.conv(a_, b_, jnp.float32), a, b)
        dx, dw = vjp(g.astype(jnp.float32))
    else:
        dims = spec.dims(a.ndim, b.ndim)
        _, vjp = jax.vjp(lambda a_, b_: lax.dot_general(a_, b_, dims), a, b)
        if spec.g_format is None:
            dx, dw = vjp(g.astype(dtype))
        else:
            g_dx, g_dw = _quantized_gradients(g.astype(jnp.float32), spec, dims, a.ndim, b.ndim)
            dx, dw = vjp(g_dx.astype(dtype))[0], vjp(g_dw.astype(dtype))[1]
    dx, dw = dx.astype(dtype), dw.astype(w_dtype)
    if x_mask is not None:
        dx = jnp.where(x_mask, dx, jnp.zeros_like(dx))
    if w_mask is not None:
        dw = jnp.where(w_mask, dw, jnp.zeros_like(dw))
    zx, zw = _zero_like_tree((x_qp, w_qp))
    return dx, dw, zx, zw


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def _check(x, w, x_qp, w_qp, spec: DotSpec, fn: str) -> None:
    for name, fmt, qp in (("lhs", spec.x_format, x_qp), ("rhs", spec.w_format, w_qp)):
        if (fmt is None) != (qp is None):
            raise ValueError(f"{fn}: the {name} parameters must be given exactly when its format "
                             f"is set (format {fmt}, parameters {'None' if qp is None else 'given'}).")
    if spec.blocked or spec.g_format is not None:
        _check_block(spec, fn)
    if spec.original_residuals and (spec.native is None or spec.ste == "lsq"):
        raise ValueError(
            f"{fn}: `original_residuals` needs two integer (or two fp8) operands and the "
            f"identity or clipped estimator; got {spec.x_format}, {spec.w_format}, ste={spec.ste!r}.")


def _check_block(spec: DotSpec, fn: str) -> None:
    """What block formats (and a block gradient format) support, checked at trace time."""
    if isinstance(spec, ConvSpec):
        raise ValueError(f"{fn}: block formats are not supported for convolutions (got "
                         f"{spec.x_format}, {spec.w_format}); quantize the convolution with an "
                         "integer or fp8 format.")
    if spec.ste not in ("identity", "clipped") or spec.original_residuals or spec.group_size:
        raise ValueError(f"{fn}: block formats take the 'identity' or 'clipped' estimator, no "
                         f"original_residuals and no group_size (their blocks are the groups); got "
                         f"ste={spec.ste!r}, original_residuals={spec.original_residuals}, "
                         f"group_size={spec.group_size}.")
    if spec.g_format is not None and not spec.g_format.is_block:
        raise ValueError(f"{fn}: `g_format` must be a block format (mxfp8_e5m2), got "
                         f"{spec.g_format}.")


def _run(x, w, x_qp, w_qp, spec: DotSpec) -> jax.Array:
    dtypes = jnp.dtype(x.dtype), jnp.dtype(w.dtype)
    return _qdot(*align_varying(x, w, x_qp, w_qp), spec, *dtypes)


def quantized_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                          lhs_qp: QParams | None, rhs_qp: QParams | None,
                          spec: DotSpec) -> jax.Array:
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` with quantized operands; differentiable
    through the straight-through estimator.

    Args:
      lhs, rhs: float operands (weights or activations), any layout.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      lhs_qp / rhs_qp: operand-form parameters (scalars, or the operand's rank with size 1
        on the contracting axes; per-group rhs: against its split), None where the format
        (``spec.x_format`` / ``spec.w_format``) is None.
      spec: the static recipe; its ``dimension_numbers`` are replaced by these.
    Returns:
      float32 ``[*batch, *lhs_free, *rhs_free]``. With two integer (or two fp8) operands
      the forward runs the integer (fp8) contraction on the codes, bit-identical to
      :func:`dot_from_codes` on stored codes.
    """
    dims = canonical_dims(dimension_numbers, lhs.ndim, rhs.ndim)
    (lc, rc), (lb, rb) = dims
    for la, ra in zip(lc + lb, rc + rb):
        if lhs.shape[la] != rhs.shape[ra]:
            raise ValueError(f"quantized_dot_general: lhs axis {la} (size {lhs.shape[la]}) and rhs "
                             f"axis {ra} (size {rhs.shape[ra]}) are paired but differ in size.")
    spec = dataclasses.replace(spec, dimension_numbers=dims)
    _check(lhs, rhs, lhs_qp, rhs_qp, spec, "quantized_dot_general")
    return _run(lhs, rhs, lhs_qp, rhs_qp, spec)


def quantized_dot(x: jax.Array, w: jax.Array, x_qp: QParams | None, w_qp: QParams | None,
                  spec: DotSpec) -> jax.Array:
    """The dense case ``x [..., K] @ kernel [K, N]`` (or, with a :class:`ConvSpec`, the
    convolution of the padded ``x`` with the kernel): float32 ``[..., N]``. See
    :func:`quantized_dot_general`; ``w_qp`` is in kernel form."""
    if not isinstance(spec, ConvSpec) and x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"quantized_dot: x has {x.shape[-1]} input features but the kernel expects {w.shape[0]}.")
    _check(x, w, x_qp, w_qp, spec, "quantized_dot")
    return _run(x, w, x_qp, w_qp, spec)


def einsum_dimension_numbers(subscripts: str, lhs_ndim: int, rhs_ndim: int
                             ) -> tuple[DimensionNumbers, tuple[int, ...]]:
    """Two-operand einsum -> ``(dimension_numbers, perm)``: ``jnp.einsum(subscripts, a, b)``
    equals ``jnp.transpose(lax.dot_general(a, b, dimension_numbers), perm)``.

    Indices in both operands and the output are batch axes, in both operands only
    contracted, in one operand and the output free. ``...`` is supported; an index
    repeated within one operand (a trace) or summed within one operand is refused.
    """
    if subscripts.count(",") != 1:
        raise ValueError(f"quantized_einsum: `subscripts` must name two operands, got {subscripts!r}.")
    text = subscripts.replace(" ", "")
    ins, _, out = text.partition("->")
    explicit = "->" in text
    specs = ins.split(",")
    free_letters = [c for c in string.ascii_letters if c not in text]

    def expand(s: str, ndim: int, ell: str | None) -> str:
        if "..." not in s:
            if len(s) != ndim:
                raise ValueError(f"quantized_einsum: {s!r} names {len(s)} axes, the operand has {ndim}.")
            return s
        n = ndim - (len(s) - 3)
        if n < 0:
            raise ValueError(f"quantized_einsum: {s!r} names more axes than the operand's {ndim}.")
        return s.replace("...", ell[len(ell) - n:] if n else "")

    n_ell = max(lhs_ndim - (len(specs[0]) - 3) if "..." in specs[0] else 0,
                rhs_ndim - (len(specs[1]) - 3) if "..." in specs[1] else 0)
    ell = "".join(free_letters[:n_ell])
    ls, rs = expand(specs[0], lhs_ndim, ell), expand(specs[1], rhs_ndim, ell)
    if explicit:
        out = expand(out, len(out) - 3 + n_ell if "..." in out else len(out), ell)
    else:
        counts = {c: (ls + rs).count(c) for c in ls + rs}
        out = ell + "".join(sorted(c for c in counts if counts[c] == 1 and c not in ell))
    for s in (ls, rs, out):
        if len(set(s)) != len(s):
            raise ValueError(f"quantized_einsum: an index repeats within {s!r} in {subscripts!r}.")
    for c in ls + rs:
        if c not in out and not (c in ls and c in rs):
            raise ValueError(f"quantized_einsum: index {c!r} of {subscripts!r} is summed within one "
                             "operand; sum it before the contraction.")
    batch = [c for c in ls if c in rs and c in out]
    contracting = [c for c in ls if c in rs and c not in out]
    dims = ((tuple(ls.index(c) for c in contracting), tuple(rs.index(c) for c in contracting)),
            (tuple(ls.index(c) for c in batch), tuple(rs.index(c) for c in batch)))
    produced = batch + [c for c in ls if c not in rs] + [c for c in rs if c not in ls]
    if sorted(produced) != sorted(out):
        raise ValueError(f"quantized_einsum: output {out!r} of {subscripts!r} names an unknown index.")
    return dims, tuple(produced.index(c) for c in out)


def quantized_einsum(subscripts: str, lhs: jax.Array, rhs: jax.Array, lhs_qp: QParams | None,
                     rhs_qp: QParams | None, spec: DotSpec) -> jax.Array:
    """``jnp.einsum(subscripts, lhs, rhs)`` with quantized operands: the einsum as a
    :func:`quantized_dot_general` and a transpose. Float32 output in the einsum's layout;
    parameters in operand form (see :func:`quantized_dot_general`)."""
    dims, perm = einsum_dimension_numbers(subscripts, lhs.ndim, rhs.ndim)
    y = quantized_dot_general(lhs, rhs, dims, lhs_qp, rhs_qp, spec)
    return jnp.transpose(y, perm) if perm != tuple(range(y.ndim)) else y
