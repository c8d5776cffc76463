"""quantized_dot: the native forward agrees with the fake-quant reference; the STE backward."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax.qdot import (ConvSpec, DotSpec, dot_from_codes, encode_weight, quantized_dot,
                         reference_dot, serve)


def _setup(x_fmt, w_fmt, x_sym, w_sym, group=None, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(k[0], (3, 5, 64)) + (0.0 if x_sym else 1.0)
    w = jax.random.normal(k[1], (64, 24)) * 0.2 + (0.0 if w_sym else 0.05)  # kernel [K, N]
    x_qp, w_qp = _qparams(x, w, x_fmt, w_fmt, x_sym, w_sym, group)
    spec = DotSpec(x_fmt, w_fmt, x_sym, w_sym, group_size=group)
    return x, w, x_qp, w_qp, spec


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _qparams(x, w, x_fmt, w_fmt, x_sym, w_sym, group):
    """Per-tensor min / max parameters of x; per-channel (or per-group) ones of the kernel."""
    x_qp = qatjax.qparams_from_minmax(x.min(), x.max(), x_fmt, symmetric=x_sym)
    wg = w if group is None else qatjax.split_groups(w, 0, group)  # [G, g, N]
    axis = wg.ndim - 2
    w_qp = qatjax.qparams_from_minmax(wg.min(axis, keepdims=True), wg.max(axis, keepdims=True),
                                      w_fmt, symmetric=w_sym)
    return x_qp, w_qp


def _numpy_reference(x, w, x_qp, w_qp, spec):
    """float64 matmul of the fake-quantized operands."""
    xh, wh = (np.asarray(a, np.float64) for a in _fake_quant_operands(x, w, x_qp, w_qp, spec))
    return xh @ wh


@functools.partial(jax.jit, static_argnums=4)
def _fake_quant_operands(x, w, x_qp, w_qp, spec):
    wg = w if spec.group_size is None else qatjax.split_groups(w, 0, spec.group_size)
    return (qatjax.fake_quant(x, x_qp, spec.x_format),
            qatjax.fake_quant(wg, w_qp, spec.w_format).reshape(w.shape))


CASES = [
    (qatjax.int8, qatjax.int8, True, True, None),
    (qatjax.uint8, qatjax.int8, False, True, None),
    (qatjax.uint8, qatjax.uint8, False, False, None),
    (qatjax.int8, qatjax.int4, True, False, 16),
    (qatjax.int4, qatjax.int4, False, True, None),
    (qatjax.fp8_e4m3, qatjax.fp8_e4m3, True, True, None),
    (qatjax.fp8_e4m3, qatjax.fp8_e5m2, True, True, 32),
]


@pytest.mark.parametrize("x_fmt,w_fmt,x_sym,w_sym,group", CASES)
def test_native_forward_matches_fake_quant_reference(x_fmt, w_fmt, x_sym, w_sym, group):
    x, w, x_qp, w_qp, spec = _setup(x_fmt, w_fmt, x_sym, w_sym, group)
    assert spec.native is not None

    @jax.jit
    def run(x, w, x_qp, w_qp):
        y = quantized_dot(x, w, x_qp, w_qp, spec)
        # The serving path on stored codes.
        qx = qatjax.quantize(x, x_qp, x_fmt)
        qw, served = encode_weight(w, w_qp, spec)
        return y, qw, dot_from_codes(qx, qw, x_qp, served, spec), serve(x, qw, x_qp, served, spec)

    y, qw, from_codes, served_y = run(x, w, x_qp, w_qp)
    ref = _numpy_reference(x, w, x_qp, w_qp, spec)
    rel = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5
    # The serving path on stored codes gives the same bits.
    assert qw.shape == (24, 64)  # served [N, K]
    np.testing.assert_array_equal(np.asarray(from_codes), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(served_y), np.asarray(y))


@pytest.mark.parametrize("x_fmt,w_fmt,x_sym,w_sym,group", CASES[:4])
def test_backward_is_the_ste_gradient_of_the_reference(x_fmt, w_fmt, x_sym, w_sym, group):
    x, w, x_qp, w_qp, spec = _setup(x_fmt, w_fmt, x_sym, w_sym, group, seed=1)
    ct = jax.random.normal(jax.random.key(9), (3, 5, 24))
    f = lambda fn: (lambda x, w: jnp.sum(fn(x, w, x_qp, w_qp, spec) * ct))  # noqa: E731
    gx, gw = jax.jit(jax.grad(f(quantized_dot), argnums=(0, 1)))(x, w)
    rx, rw = jax.jit(jax.grad(f(reference_dot), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5, atol=1e-6)
    # Hand-derived: d/dx = (ct @ w_hat.T) masked by the clipped-STE mask of x.
    wg = w if group is None else qatjax.split_groups(w, 0, group)
    x_hat, w_hat = (np.asarray(a) for a in _fake_quant_operands(x, w, x_qp, w_qp, spec))
    inv = np.float32(1) / np.asarray(x_qp.scale)
    code = np.rint(np.asarray(x) * inv) + np.asarray(x_qp.zero_point)
    mask = (code >= x_fmt.qmin) & (code <= x_fmt.qmax)
    np.testing.assert_allclose(np.asarray(gx), (np.asarray(ct) @ w_hat.T) * mask, rtol=1e-5, atol=1e-6)
    # d/dw = x_hat.T @ ct (summed over the batch axes), masked by the kernel's STE mask.
    x_hat = x_hat.reshape(-1, 64)
    w_code = np.rint(np.asarray(wg) * (np.float32(1) / np.asarray(w_qp.scale))) + np.asarray(w_qp.zero_point)
    w_mask = ((w_code >= w_fmt.qmin) & (w_code <= w_fmt.qmax)).reshape(w.shape)
    np.testing.assert_allclose(np.asarray(gw), (x_hat.T @ np.asarray(ct).reshape(-1, 24)) * w_mask,
                               rtol=1e-4, atol=1e-5)


def test_backward_keeps_the_one_byte_codes_not_float_copies():
    """The residuals between forward and backward are the int8 codes and their parameters:
    no float array of the activation's or the kernel's size is kept."""
    x, w, x_qp, w_qp, _ = _setup(qatjax.int8, qatjax.int8, True, True)
    spec = DotSpec(qatjax.int8, qatjax.int8, x_mask=False, w_mask=False)
    _, vjp = jax.vjp(lambda x, w: quantized_dot(x, w, x_qp, w_qp, spec), x, w)
    kept = [(leaf.dtype, leaf.shape) for leaf in jax.tree_util.tree_leaves(vjp)]
    assert (jnp.dtype(jnp.int8), x.shape) in kept and (jnp.dtype(jnp.int8), w.shape) in kept
    assert all(np.prod(shape) < min(x.size, w.size) for dtype, shape in kept if dtype != jnp.int8), kept


def _np_mask(a, qp, fmt):
    """The clipped STE's mask in numpy: the unclipped code lies in the format's range."""
    a, scale, zp = (np.asarray(v, np.float32) for v in (a, qp.scale, qp.zero_point))
    if fmt.is_float:
        return np.abs(a / scale) <= fmt.max
    code = np.rint(a * (np.float32(1) / scale)) + zp
    return (code >= fmt.qmin) & (code <= fmt.qmax)


@pytest.mark.parametrize("x_fmt,w_fmt,x_sym,w_sym,group", [CASES[0], CASES[1], CASES[3], CASES[5]])
def test_original_residuals_backward_uses_the_float_operands(x_fmt, w_fmt, x_sym, w_sym, group):
    """Qwix's estimator: the same forward, and dx = (ct @ w.T) * mask_x, dw = (x.T @ ct) * mask_w
    with the float operands (hand-derived in numpy)."""
    x, w, x_qp, w_qp, spec = _setup(x_fmt, w_fmt, x_sym, w_sym, group, seed=4)
    # narrower ranges than the data, so that both masks clip
    x_qp, w_qp = (qatjax.QParams(qp.scale * 0.7, qp.zero_point) for qp in (x_qp, w_qp))
    orig = dataclasses.replace(spec, original_residuals=True)
    forward = jax.jit(quantized_dot, static_argnums=4)
    np.testing.assert_array_equal(np.asarray(forward(x, w, x_qp, w_qp, orig)),
                                  np.asarray(forward(x, w, x_qp, w_qp, spec)))
    ct = jax.random.normal(jax.random.key(5), (3, 5, 24))
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(quantized_dot(x, w, x_qp, w_qp, orig) * ct),
                              argnums=(0, 1)))(x, w)
    wg = w if group is None else qatjax.split_groups(w, 0, group)
    x_mask = _np_mask(x, x_qp, x_fmt)
    w_mask = _np_mask(wg, w_qp, w_fmt).reshape(w.shape)
    assert not x_mask.all() and not w_mask.all()
    c, xn, wn = (np.asarray(a, np.float64) for a in (ct, x, w))
    np.testing.assert_allclose(np.asarray(gx), (c @ wn.T) * x_mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), (xn.reshape(-1, 64).T @ c.reshape(-1, 24)) * w_mask,
                               rtol=1e-5, atol=1e-4)


def test_backward_dequantizes_after_the_output_gradient_exactly():
    """The residual codes' scale is tied to the output gradient by an exact runtime one: a NaN
    or infinite first cotangent element changes only what it reaches (row 0 of dx, column 0
    of dw), every other gradient value is bit-identical."""
    x, w, x_qp, w_qp, spec = _setup(qatjax.int8, qatjax.int8, True, True, seed=6)
    ct = jax.random.normal(jax.random.key(7), (3, 5, 24))
    _, vjp = jax.vjp(lambda x, w: quantized_dot(x, w, x_qp, w_qp, spec), x, w)
    gx, gw = (np.asarray(a) for a in vjp(ct))
    for bad in (np.nan, np.inf):
        bx, bw = (np.asarray(a) for a in vjp(ct.at[0, 0, 0].set(bad)))
        np.testing.assert_array_equal(bx.reshape(15, -1)[1:], gx.reshape(15, -1)[1:])
        np.testing.assert_array_equal(bw[:, 1:], gw[:, 1:])


def test_backward_dequantized_kernels_are_transient():
    """Issue 18: the backward dequantizes each kernel right before its contractions, so at
    most one float dequantized kernel is alive at a time; XLA used to compute them all in the
    forward pass and keep them (2.6x float's temporary memory here)."""
    d, n_layers = 128, 8
    spec = DotSpec(qatjax.int8, qatjax.int8, x_mask=False, w_mask=False, x_scale_from_data=True)
    keys = jax.random.split(jax.random.key(8), n_layers + 1)
    kernels = [jax.random.normal(keys[i], (d, 4 * d) if i % 2 == 0 else (4 * d, d)) * 0.05
               for i in range(n_layers)]
    x = jax.random.normal(keys[-1], (64, d))

    def loss(kernels, quantized):
        h = x
        for i, w in enumerate(kernels):
            if quantized:
                x_qp = qatjax.qparams_from_amax(jnp.max(jnp.abs(h)), qatjax.int8)
                w_qp = qatjax.qparams_from_amax(jnp.max(jnp.abs(w), axis=0, keepdims=True),
                                                qatjax.int8)
                h = quantized_dot(h, w, x_qp, w_qp, spec)
            else:
                h = h @ w
            h = jax.nn.gelu(h) if i % 2 == 0 else h
        return jnp.mean(h ** 2)

    def temp_bytes(quantized):
        step = jax.jit(jax.grad(functools.partial(loss, quantized=quantized)))
        return step.lower(kernels).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) <= temp_bytes(False) + 4 * d * 4 * d  # + one float32 kernel


def test_original_residuals_need_a_native_matmul_without_lsq():
    x, w, x_qp, w_qp, _ = _setup(qatjax.int8, qatjax.int8, True, True)
    with pytest.raises(ValueError, match="original_residuals"):
        quantized_dot(x, w, x_qp, w_qp, DotSpec(qatjax.int8, qatjax.int8, ste="lsq",
                                                original_residuals=True))
    with pytest.raises(ValueError, match="original_residuals"):
        quantized_dot(x, w, None, w_qp, DotSpec(None, qatjax.int8, original_residuals=True))


def test_lsq_scales_receive_gradients_through_the_native_forward():
    x, w, x_qp, w_qp, _ = _setup(qatjax.int8, qatjax.int4, True, True)
    spec = DotSpec(qatjax.int8, qatjax.int4, ste="lsq", w_grad_scale=0.5)
    f = lambda xs, ws: jnp.sum(quantized_dot(x, w, qatjax.QParams(xs, x_qp.zero_point),  # noqa: E731
                                             qatjax.QParams(ws, w_qp.zero_point), spec) ** 2)
    g_xs, g_ws = jax.jit(jax.grad(f, argnums=(0, 1)))(x_qp.scale, w_qp.scale)
    r = lambda xs, ws: jnp.sum(reference_dot(x, w, qatjax.QParams(xs, x_qp.zero_point),  # noqa: E731
                                             qatjax.QParams(ws, w_qp.zero_point), spec) ** 2)
    r_xs, r_ws = jax.jit(jax.grad(r, argnums=(0, 1)))(x_qp.scale, w_qp.scale)
    assert g_ws.shape == w_qp.scale.shape and np.all(np.isfinite(g_ws)) and np.any(g_ws != 0)
    np.testing.assert_allclose(np.asarray(g_ws), np.asarray(r_ws), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(g_xs), float(r_xs), rtol=1e-4)


def test_conv_native_forward_matches_float_reference():
    k = jax.random.split(jax.random.key(3), 2)
    x = jax.nn.relu(jax.random.normal(k[0], (2, 10, 10, 3)))
    w = jax.random.normal(k[1], (3, 3, 3, 8)) * 0.2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dn = jax.lax.conv_dimension_numbers(xp.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    spec = ConvSpec(qatjax.uint8, qatjax.int8, False, True, strides=(2, 1), rhs_dilation=(1, 1),
                    dimension_numbers=dn)

    @jax.jit
    def run(x, xp, w):
        x_qp = qatjax.qparams_from_minmax(0.0, x.max(), qatjax.uint8, symmetric=False)
        w_qp = qatjax.qparams_from_amax(jnp.abs(w).max((0, 1, 2), keepdims=True), qatjax.int8)
        # The reference: the float conv of the fake-quantized operands.
        xh = qatjax.fake_quant(xp, x_qp, qatjax.uint8)
        wh = qatjax.fake_quant(w, w_qp, qatjax.int8)
        ref = jax.lax.conv_general_dilated(xh, wh, (2, 1), "VALID", dimension_numbers=dn,
                                           precision=jax.lax.Precision.HIGHEST)
        return quantized_dot(xp, w, x_qp, w_qp, spec), ref

    y, ref = (np.asarray(a) for a in run(x, xp, w))
    assert y.shape == ref.shape == (2, 5, 10, 8)
    assert np.abs(np.asarray(y) - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("original", [False, True])
def test_conv_backward_is_the_ste_gradient(original):
    """Default: the vjp of the fake-quant reference conv. Original residuals: the float conv's
    vjp, masked by the clipped-STE masks (the static uint8 range clips negative inputs)."""
    k = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(k[0], (2, 9, 9, 3))
    w = jax.random.normal(k[1], (3, 3, 3, 8)) * 0.2
    x_qp = qatjax.qparams_from_minmax(-0.5, 2.0, qatjax.uint8, symmetric=False)
    w_qp = qatjax.qparams_from_amax(jnp.abs(w).max((0, 1, 2), keepdims=True) * 0.8, qatjax.int8)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    spec = ConvSpec(qatjax.uint8, qatjax.int8, False, True, strides=(1, 2), rhs_dilation=(1, 1),
                    dimension_numbers=dn, original_residuals=original)
    ct = jax.random.normal(k[2], (2, 7, 4, 8))
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(quantized_dot(x, w, x_qp, w_qp, spec) * ct),
                              argnums=(0, 1)))(x, w)
    x_mask = _np_mask(x, x_qp, qatjax.uint8)
    w_mask = _np_mask(w, w_qp, qatjax.int8)
    assert not x_mask.all() and not w_mask.all()  # both masks matter here
    if original:
        conv = lambda x, w: spec.conv(x, w, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
        _, vjp = jax.vjp(conv, x, w)
        rx, rw = vjp(ct)
        rx, rw = rx * x_mask, rw * w_mask
    else:
        rx, rw = jax.jit(jax.grad(lambda x, w: jnp.sum(reference_dot(x, w, x_qp, w_qp, spec) * ct),
                                  argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5, atol=1e-4)


def test_feature_mismatch_is_a_clear_error():
    x, w, x_qp, w_qp, spec = _setup(qatjax.int8, qatjax.int8, True, True)
    with pytest.raises(ValueError, match="32 input features but the kernel expects 64"):
        quantized_dot(x[..., :32], w, x_qp, w_qp, spec)


# ----------------------------------------------------------------------------- dot_general / einsum

from qatjax.qdot import einsum_dimension_numbers, quantized_dot_general, quantized_einsum  # noqa: E402
from test_integer import GENERAL, _np_dot_general  # noqa: E402


def _np_codes(x, scale, zp, fmt):
    """numpy re-implementation of the integer codes: clip(round_half_even(x / s) + zp)."""
    x = np.asarray(x, np.float64)
    return np.clip(np.round(x / scale) + zp, fmt.qmin, fmt.qmax)


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims,x_fmt,x_sym", [
    case + fmt for i, case in enumerate(GENERAL)
    for fmt in ([(qatjax.int8, True), (qatjax.uint8, False)] if i in (2, 4) else [(qatjax.int8, True)])])
def test_quantized_dot_general_matches_int64_reference(lhs_shape, rhs_shape, dims, x_fmt, x_sym):
    """Both operands activations, per-row / per-channel parameters (constant along the
    contracting axes): the float32 result equals the int64 sum of code products, scaled."""
    k = jax.random.split(jax.random.key(3), 2)
    lhs = jax.random.normal(k[0], lhs_shape) + (0.0 if x_sym else 1.0)
    rhs = jax.random.normal(k[1], rhs_shape)
    (lc, rc), _ = dims
    lqp, rqp = jax.jit(lambda lhs, rhs: (  # per row / channel, constant along the contracted axes
        qatjax.qparams_from_minmax(lhs.min(lc, keepdims=True), lhs.max(lc, keepdims=True), x_fmt,
                                   symmetric=x_sym),
        qatjax.qparams_from_amax(jnp.abs(rhs).max(rc, keepdims=True), qatjax.int8)))(lhs, rhs)
    spec = DotSpec(x_fmt, qatjax.int8, x_sym, True)
    y = jax.jit(lambda a, b: quantized_dot_general(a, b, dims, lqp, rqp, spec))(lhs, rhs)
    ls, lz = np.asarray(lqp.scale, np.float64), np.asarray(lqp.zero_point, np.int64)
    rs = np.asarray(rqp.scale, np.float64)
    qa = _np_codes(lhs, ls, lz, x_fmt).astype(np.int64) - lz
    qb = _np_codes(rhs, rs, 0, qatjax.int8).astype(np.int64)
    acc = _np_dot_general(qa, qb, dims)
    scale = _np_dot_general(ls * np.ones_like(qa, np.float64) / np.prod([qa.shape[a] for a in lc]),
                            rs * np.ones_like(qb, np.float64), dims)  # ls * rs in the output layout
    ref = acc * scale
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-6, atol=1e-5 * np.abs(ref).max())
    # The gradient is the STE's: that of the float contraction of the dequantized operands.
    g = jax.jit(jax.grad(lambda a, b: quantized_dot_general(a, b, dims, lqp, rqp, spec).sum(), (0, 1)))(lhs, rhs)
    gr = jax.jit(jax.grad(lambda a, b: reference_dot(a, b, lqp, rqp, dataclasses.replace(spec, dimension_numbers=dims)).sum(), (0, 1)))(lhs, rhs)
    for got, want in zip(g, gr):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("subscripts,lhs_shape,rhs_shape", [
    ("btd,dhk->bthk", (2, 5, 16), (16, 3, 4)),          # nn.Einsum projection
    ("...qhd,...khd->...hqk", (2, 5, 3, 8), (2, 7, 3, 8)),  # flax attention weights
    ("...hqk,...khd->...qhd", (2, 3, 5, 7), (2, 7, 3, 8)),  # flax attention values
    ("ij,kj", (4, 8), (6, 8)),                          # implicit output
])
def test_quantized_einsum_equals_the_fake_quant_einsum(subscripts, lhs_shape, rhs_shape):
    dims, _ = einsum_dimension_numbers(subscripts, len(lhs_shape), len(rhs_shape))
    (lc, rc), _ = dims
    k = jax.random.split(jax.random.key(5), 2)
    a, b = jax.random.normal(k[0], lhs_shape), jax.random.normal(k[1], rhs_shape)

    @jax.jit
    def run(a, b):
        aqp = qatjax.qparams_from_amax(jnp.abs(a).max(lc, keepdims=True), qatjax.int8)
        bqp = qatjax.qparams_from_amax(jnp.abs(b).max(rc, keepdims=True), qatjax.int8)
        y = quantized_einsum(subscripts, a, b, aqp, bqp, DotSpec(qatjax.int8, qatjax.int8))
        ref = jnp.einsum(subscripts, qatjax.fake_quant(a, aqp, qatjax.int8),
                         qatjax.fake_quant(b, bqp, qatjax.int8), precision="highest")
        return y, ref

    y, ref = run(a, b)
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_einsum_refuses_what_is_not_one_contraction():
    with pytest.raises(ValueError, match="repeats"):
        einsum_dimension_numbers("ii,ij->j", 2, 2)
    with pytest.raises(ValueError, match="summed within one operand"):
        einsum_dimension_numbers("ij,jk->k", 2, 2)
    with pytest.raises(ValueError, match="two operands"):
        einsum_dimension_numbers("ij->j", 2, 2)


def test_group_and_serving_layouts_round_trip():
    """encode_weight / decode_weight: per-group int4 weights of a native and a weight-only
    layer; decode is the dequantized kernel in the kernel's layout."""
    from qatjax.qdot import decode_weight

    w = jax.random.normal(jax.random.key(1), (64, 24))
    wg = qatjax.split_groups(w, 0, 16)
    qp = qatjax.qparams_from_amax(jnp.abs(wg).max(1, keepdims=True), qatjax.int4)
    want = np.asarray(qatjax.merge_groups(qatjax.fake_quant(wg, qp, qatjax.int4), 0))
    for x_fmt, codes_shape, scale_shape in ((qatjax.int8, (24, 64), (24, 4)), (None, (64, 24), (4, 24))):
        spec = DotSpec(x_fmt, qatjax.int4, group_size=16)
        codes, serving = encode_weight(w, qp, spec)
        assert codes.shape == codes_shape and serving.scale.shape == scale_shape
        np.testing.assert_array_equal(np.asarray(decode_weight(codes, serving, spec)), want)
