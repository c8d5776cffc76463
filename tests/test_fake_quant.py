"""Tests for qatjax.fake_quant: quantize, dequantize, fake_quant and their STEs.

Integer references are numpy float32 transcriptions of torch's CPU kernels
(``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine``):
``q = clip(rint(x * (1/scale)) + zp, qmin, qmax)``, ``x_hat = (q - zp) * scale``.
fp8 references cast ``clip(x / scale, -max, max)`` with ml_dtypes. Gradients are
checked against hand-derived values.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qatjax
from qatjax import IntFormat, QParams
from qatjax.fake_quant import ste_mask as _ste_mask

F32 = np.float32
INT_FORMATS = [IntFormat(b, s) for b in range(2, 9) for s in (True, False)]
FP8_FORMATS = [qatjax.fp8_e4m3, qatjax.fp8_e5m2]

# Jitted entry points: parameters are traced arguments, the format is static.
fake_quant = jax.jit(qatjax.fake_quant, static_argnums=2, static_argnames=("ste", "grad_scale"))
quantize = jax.jit(qatjax.quantize, static_argnums=2)
dequantize = jax.jit(qatjax.dequantize, static_argnums=2)
ste_mask = jax.jit(_ste_mask, static_argnums=2)


def grad(fun, **kwargs):
    """Jitted ``jax.grad`` (eager differentiation compiles every primitive separately)."""
    return jax.jit(jax.grad(fun, **kwargs))


# --------------------------------------------------------------------------- references


def ref_int(x, scale, zero_point, fmt):
    """Codes (float32, NaN where x is NaN) and x_hat, as torch computes them on float32."""
    x = np.asarray(x, F32)
    scale = np.asarray(scale, F32)
    zp = np.rint(np.asarray(zero_point, F32))
    with np.errstate(over="ignore", invalid="ignore"):
        inv_scale = F32(1) / scale
        q = np.clip(np.rint(x * inv_scale) + zp, fmt.qmin, fmt.qmax).astype(F32)
        return q, ((q - zp) * scale).astype(F32)


def ref_int_codes(x, scale, zero_point, fmt):
    """Integer codes; NaN inputs map to the zero point (integers cannot hold NaN)."""
    q, _ = ref_int(x, scale, zero_point, fmt)
    zp = np.broadcast_to(np.rint(np.asarray(zero_point, F32)), q.shape)
    return np.where(np.isnan(q), zp, q).astype(fmt.storage_dtype)


def ref_fp8(x, scale, fmt):
    """ml_dtypes' round-to-nearest-even cast of clip(x / scale, -max, max), and its value."""
    x = np.asarray(x, F32)
    scale = np.asarray(scale, F32)
    with np.errstate(over="ignore", invalid="ignore"):
        codes = np.clip(x / scale, -fmt.max, fmt.max).astype(fmt.storage_dtype.type)
        return codes, (codes.astype(F32) * scale).astype(F32)


def assert_same_bits(actual, expected):
    """Bit-for-bit equality (sign of zero included); NaNs only need to be NaN."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    nan = np.isnan(expected.astype(F32))
    np.testing.assert_array_equal(np.isnan(actual.astype(F32)), nan)
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32}[actual.dtype.itemsize]
    np.testing.assert_array_equal(actual.view(uint)[~nan], expected.view(uint)[~nan])


def int_cases(rng, fmt, n=4096):
    """x, scale and zero point arrays of shape (n,): every element has its own parameters.

    Covers exact ties (power-of-two scales), near ties (other scales), random values,
    odd zero points, values far outside the range, +-0.0, +-inf and NaN.
    """
    pow2 = rng.random(n) < 0.5
    scale = np.where(
        pow2, 2.0 ** rng.integers(-12, 6, n), rng.uniform(1, 2, n) * 2.0 ** rng.integers(-20, 10, n)
    ).astype(F32)
    zp = rng.integers(fmt.qmin, fmt.qmax + 1, n).astype(np.int32)
    k = rng.integers(fmt.qmin - 3, fmt.qmax + 3, n) - zp
    kind = rng.integers(0, 3, n)
    x = np.select(
        [kind == 0, kind == 1],
        [(k + 0.5) * scale.astype(np.float64), (k + rng.uniform(-1, 1, n)) * scale],
        rng.standard_normal(n) * scale * 2.0 ** rng.integers(0, 40, n),
    ).astype(F32)
    x[:12] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 3.4e38, -3.4e38, -1e-9, 1e-9, 1e-30]
    return x, scale, zp


def fp8_sweep(fmt):
    """Every finite fp8 value, the midpoints between neighbours (ties), the float32 values
    just beside each midpoint, values beyond max, +-0.0 and NaN."""
    values = np.arange(256, dtype=np.uint8).view(fmt.storage_dtype.type).astype(np.float64)
    values = np.unique(values[np.isfinite(values)])
    mids = (values[:-1] + values[1:]) / 2  # exact: fp8 values have few significant bits
    mids32 = mids.astype(F32)
    assert np.array_equal(mids32, mids)
    beyond = np.array([fmt.max * 1.03, fmt.max * 1.5, fmt.max * 2, 1e30, np.inf], np.float64)
    return np.concatenate(
        [
            values,
            mids,
            np.nextafter(mids32, F32(np.inf)),
            np.nextafter(mids32, F32(-np.inf)),
            beyond,
            -beyond,
            [0.0, -0.0, np.nan],
        ]
    )


# --------------------------------------------------------------------------- integer formats


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f.name)
def test_int_fake_quant_matches_torch_reference(fmt):
    x, scale, zp = int_cases(np.random.default_rng(fmt.bits * 2 + fmt.signed), fmt)
    qp = QParams(scale, zp)
    x_hat_ref = ref_int(x, scale, zp, fmt)[1]
    assert_same_bits(fake_quant(x, qp, fmt), x_hat_ref)
    codes = quantize(x, qp, fmt)
    assert codes.dtype == fmt.storage_dtype
    assert_same_bits(codes, ref_int_codes(x, scale, zp, fmt))
    ok = ~np.isnan(x)
    assert_same_bits(dequantize(codes, qp)[ok], x_hat_ref[ok])


@pytest.mark.parametrize("fmt", [qatjax.int8, qatjax.uint8, qatjax.int4], ids=lambda f: f.name)
def test_int_per_tensor_eager_traced_and_constant(fmt):
    rng = np.random.default_rng(1)
    x, _, _ = int_cases(rng, fmt, 1024)
    for scale, zp in [(F32(0.1), fmt.qmin + 3), (F32(2.0**-3), 0), (F32(0.037), fmt.qmax - 1)]:
        qp = QParams(scale, np.int32(zp))
        expected = ref_int(x, scale, zp, fmt)[1]
        assert_same_bits(qatjax.fake_quant(x, qp, fmt), expected)
        assert_same_bits(fake_quant(x, qp, fmt), expected)
        # Parameters that XLA sees as constants (folded into the kernel).
        assert_same_bits(jax.jit(lambda v, qp=qp: qatjax.fake_quant(v, qp, fmt))(x), expected)


def test_int_exact_ties_round_half_to_even():
    fmt = qatjax.int8
    scale = F32(0.25)  # x * (1/scale) is exact, so every x below is an exact tie
    k = np.arange(fmt.qmin - 2, fmt.qmax + 2)
    x = ((k + 0.5) * 0.25).astype(F32)
    v = x * (F32(1) / scale)
    assert np.array_equal(v, k + 0.5)
    # The reference rounds half to even, unlike floor(v + 0.5), on every other tie.
    assert np.sum(np.rint(v) != np.floor(v + 0.5)) >= k.size // 2
    for zp in (0, -37, 13):
        qp = QParams(scale, np.int32(zp))
        assert_same_bits(fake_quant(x, qp, fmt), ref_int(x, scale, zp, fmt)[1])
        assert_same_bits(quantize(x, qp, fmt), ref_int_codes(x, scale, zp, fmt))


def test_float_zero_points_are_rounded_half_to_even():
    fmt = qatjax.uint8
    x = np.linspace(-3, 130, 1001).astype(F32)
    for zp in (F32(2.5), F32(3.5), F32(-0.5), F32(7.0), F32(200.49)):
        qp = QParams(F32(0.5), zp)
        assert_same_bits(fake_quant(x, qp, fmt), ref_int(x, F32(0.5), zp, fmt)[1])
        assert_same_bits(quantize(x, qp, fmt), ref_int_codes(x, F32(0.5), zp, fmt))


@pytest.mark.parametrize("fmt", [qatjax.int8, qatjax.uint8], ids=lambda f: f.name)
def test_negative_zero_dequantizes_to_positive_zero(fmt):
    # torch's integer codes have no -0.0: x in (-scale/2, 0] gives +0.0 (with zero point 0).
    x = np.array([-0.0, -1e-9, -0.04, 0.0], F32)
    qp = QParams(F32(0.1), np.int32(0))
    expected = ref_int(x, F32(0.1), 0, fmt)[1]
    assert not np.signbit(expected).any()
    assert_same_bits(qatjax.fake_quant(x, qp, fmt), expected)
    assert_same_bits(fake_quant(x, qp, fmt), expected)
    assert_same_bits(jax.jit(lambda v: qatjax.fake_quant(v, qp, fmt))(x), expected)
    assert_same_bits(jax.jit(lambda v: qatjax.fake_quant(v, QParams(0.1, 0), fmt))(x), expected)


@pytest.mark.parametrize(
    "fmt", [qatjax.int8, qatjax.uint4, qatjax.fp8_e4m3, qatjax.fp8_e5m2], ids=lambda f: f.name
)
def test_nan_stays_nan(fmt):
    x = np.array([np.nan, 1.0, -np.nan], F32)
    out = np.asarray(fake_quant(x, QParams(F32(0.5), np.int32(0)), fmt))
    np.testing.assert_array_equal(np.isnan(out), [True, False, True])
    for ste in ("identity", "lsq"):
        assert np.isnan(fake_quant(x, QParams(F32(0.5), np.int32(0)), fmt, ste=ste)[0])


def test_int8_affine_unit_interval_round_trip():
    fmt = qatjax.int8
    x = (np.arange(256, dtype=F32) / F32(255)).astype(F32)
    qp = qatjax.qparams_from_minmax(F32(0), F32(1), fmt, symmetric=False)
    codes = np.asarray(quantize(x, qp, fmt))
    np.testing.assert_array_equal(codes, np.arange(fmt.qmin, fmt.qmax + 1))  # 256 distinct codes
    # Back exactly to k * scale (the float32 product), which is within an ulp of k/255
    # (not always equal to it: k * fl(1/255) and fl(k/255) round differently)...
    x_hat = np.asarray(dequantize(codes, qp))
    assert_same_bits(x_hat, (np.arange(256, dtype=F32) * np.asarray(qp.scale)).astype(F32))
    np.testing.assert_array_max_ulp(x_hat, x, maxulp=1)
    # ...and those values quantize back to the same codes.
    np.testing.assert_array_equal(quantize(x_hat, qp, fmt), codes)
    assert_same_bits(fake_quant(x, qp, fmt), x_hat)
    assert_same_bits(dequantize(codes, qp, jnp.bfloat16), x_hat.astype(jnp.bfloat16))


# --------------------------------------------------------------------------- granularity


@pytest.mark.parametrize("fmt", [qatjax.int8, qatjax.uint8, qatjax.fp8_e4m3], ids=lambda f: f.name)
@pytest.mark.parametrize("param_shape", [(3, 1, 1), (1, 4, 1), (1, 1, 5), (5,), (4, 1), ()])
def test_per_channel_broadcasting_matches_per_slice_reference(fmt, param_shape):
    rng = np.random.default_rng(len(param_shape))
    x = (rng.standard_normal((3, 4, 5)) * 4).astype(F32)
    scale = rng.uniform(0.01, 0.2, param_shape).astype(F32)
    zp = (
        np.zeros(param_shape, np.int32)
        if fmt.is_float
        else rng.integers(fmt.qmin, fmt.qmax + 1, param_shape).astype(np.int32)
    )
    qp = QParams(scale, zp)
    x_hat = np.asarray(fake_quant(x, qp, fmt))
    codes = np.asarray(quantize(x, qp, fmt))
    # Reference: every element against its own scalar parameters.
    s = np.broadcast_to(scale, x.shape)
    z = np.broadcast_to(zp, x.shape)
    for idx in np.ndindex(x.shape):
        if fmt.is_float:
            code, value = ref_fp8(x[idx], s[idx], fmt)
        else:
            code, value = (
                ref_int_codes(x[idx], s[idx], z[idx], fmt),
                ref_int(x[idx], s[idx], z[idx], fmt)[1],
            )
        assert_same_bits(x_hat[idx], value)
        assert_same_bits(codes[idx], code)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_group(axis):
    fmt = qatjax.int4
    x = (np.random.default_rng(axis).standard_normal((8, 12)) * 3).astype(F32)
    groups = qatjax.split_groups(jnp.asarray(x), axis, 4)
    lo = jnp.min(groups, axis=axis + 1, keepdims=True)
    hi = jnp.max(groups, axis=axis + 1, keepdims=True)
    qp = jax.jit(qatjax.qparams_from_minmax, static_argnums=2, static_argnames="symmetric")(
        lo, hi, fmt, symmetric=False
    )
    x_hat = np.asarray(qatjax.merge_groups(fake_quant(groups, qp, fmt), axis))
    assert x_hat.shape == x.shape
    for g in range(x.shape[axis] // 4):
        block = np.take(x, np.arange(4 * g, 4 * g + 4), axis=axis)
        scale = np.take(np.asarray(qp.scale), g, axis=axis)
        zp = np.take(np.asarray(qp.zero_point), g, axis=axis)
        expected = ref_int(block, scale, zp, fmt)[1]
        assert_same_bits(np.take(x_hat, np.arange(4 * g, 4 * g + 4), axis=axis), expected)


# --------------------------------------------------------------------------- fp8


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("scale", [1.0, 3.0, 0.37, 2.0**-5, 1234.5, 1.1e-3])
def test_fp8_saturating_cast_matches_ml_dtypes(fmt, scale):
    scale = F32(scale)
    y = fp8_sweep(fmt)
    x = (y * np.float64(scale)).astype(F32)
    # Beside each x too: for scales that are not powers of two x / scale lands near ties.
    x = np.concatenate([x, np.nextafter(x, F32(np.inf)), np.nextafter(x, F32(-np.inf))])
    if scale in (F32(1), F32(3)):  # few significant bits: the ties are exact in x / scale
        assert np.isin(y[np.abs(y) <= fmt.max], x / scale).all()
    codes_ref, x_hat_ref = ref_fp8(x, scale, fmt)
    qp = QParams(scale, np.int32(0))
    codes = quantize(x, qp, fmt)
    assert codes.dtype == fmt.storage_dtype
    assert_same_bits(codes, codes_ref)
    assert_same_bits(fake_quant(x, qp, fmt), x_hat_ref)
    assert_same_bits(jax.jit(lambda v: qatjax.fake_quant(v, qp, fmt))(x), x_hat_ref)
    ok = ~np.isnan(x)
    assert_same_bits(dequantize(codes, qp)[ok], x_hat_ref[ok])


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=lambda f: f.name)
def test_fp8_per_channel_scales_and_eager(fmt):
    y = fp8_sweep(fmt)
    scale = np.array([1.0, 0.37, 3.0, 1234.5], F32)[:, None]
    x = (y[None, :] * scale.astype(np.float64)).astype(F32)
    codes_ref, x_hat_ref = ref_fp8(x, scale, fmt)
    qp = QParams(scale, np.zeros_like(scale, np.int32))
    assert_same_bits(quantize(x, qp, fmt), codes_ref)
    assert_same_bits(fake_quant(x, qp, fmt), x_hat_ref)
    if fmt == qatjax.fp8_e4m3:  # eager: every primitive compiled on its own
        assert_same_bits(qatjax.quantize(x, qp, fmt), codes_ref)
        assert_same_bits(qatjax.fake_quant(x, qp, fmt), x_hat_ref)


def test_fp8_e4m3_rounding_carries_into_the_next_binade():
    # Hand-derived: 1.9375 = 1.111|1b and 248 = 1.111|1b * 2**7 are ties whose even
    # neighbour is the next power of two; half the smallest subnormal (2**-10) ties to 0.
    x = np.array([1.9375, 248.0, -248.0, 2.0**-10, -(2.0**-10), 464.0, 1e6], F32)
    out = fake_quant(x, QParams(F32(1), 0), qatjax.fp8_e4m3)
    np.testing.assert_array_equal(out, [2.0, 256.0, -256.0, 0.0, -0.0, 448.0, 448.0])
    np.testing.assert_array_equal(np.signbit(out), [0, 0, 1, 0, 1, 0, 0])
    assert_same_bits(out, ref_fp8(x, F32(1), qatjax.fp8_e4m3)[1])


# --------------------------------------------------------------------------- STEs


def _loss(ste, fmt, w, grad_scale=None):
    def loss(x, scale, zero_point):
        x_hat = qatjax.fake_quant(
            x, QParams(scale, zero_point), fmt, ste=ste, grad_scale=grad_scale
        )
        return jnp.sum(w * x_hat)

    return loss


def test_identity_ste():
    x = np.array([0.3, 100.0, -100.0, 12.0], F32)
    w = np.array([1.0, 2.0, 3.0, 4.0], F32)
    dx, ds, dz = grad(_loss("identity", qatjax.int8, w), argnums=(0, 1, 2))(x, F32(0.5), F32(0))
    np.testing.assert_array_equal(dx, w)
    assert float(ds) == 0.0 and float(dz) == 0.0


def test_clipped_ste_mask_int():
    # int8, scale 1/8: codes rint(8x) in [-128, 127] pass, even half a step outside the range.
    x = np.array([0.0, 15.875, 15.93, 15.94, -16.0, -16.06, -16.07, 100.0, -100.0], F32)
    dx, ds = grad(_loss("clipped", qatjax.int8, 1.0), argnums=(0, 1))(x, F32(0.125), 0)
    np.testing.assert_array_equal(dx, [1, 1, 1, 0, 1, 1, 0, 0, 0])
    assert float(ds) == 0.0
    # Affine uint8, scale 0.5, zero point 10: codes rint(2x) + 10 in [0, 255] pass.
    x = np.array([-5.2, -5.3, 122.7, 122.8, 0.0], F32)
    dx = grad(_loss("clipped", qatjax.uint8, 1.0))(x, F32(0.5), 10)
    np.testing.assert_array_equal(dx, [1, 0, 1, 0, 1])
    # ste_mask exposes the same mask.
    mask = ste_mask(x, QParams(F32(0.5), np.int32(10)), qatjax.uint8)
    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask, [1, 0, 1, 0, 1])


def test_clipped_ste_mask_fp8():
    x = np.array([448.0, 449.0, -448.0, -500.0, 1.3, 0.0], F32)
    dx = grad(_loss("clipped", qatjax.fp8_e4m3, 1.0))(x, F32(1), 0)
    np.testing.assert_array_equal(dx, [1, 0, 1, 0, 1, 1])
    dx = grad(_loss("clipped", qatjax.fp8_e4m3, 1.0))(x * 2, F32(2), 0)
    np.testing.assert_array_equal(dx, [1, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(ste_mask(x, QParams(F32(1), 0), qatjax.fp8_e4m3), dx)


def test_lsq_symmetric_int8():
    # scale 0.5, zero point 0 (int): x = 0.3 is inside (x/s = 0.6, round 1): d/ds = 1 - 0.6;
    # x = 100 is above (qmax - zp = 127); x = -100 below (qmin - zp = -128).
    x = np.array([0.3, 100.0, -100.0], F32)
    w = np.array([1.0, 2.0, 3.0], F32)
    dx, ds = grad(_loss("lsq", qatjax.int8, w), argnums=(0, 1))(x, F32(0.5), np.int32(0))
    np.testing.assert_array_equal(dx, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(ds, 1 * 0.4 + 2 * 127 + 3 * -128, rtol=1e-6)


def test_lsq_affine_uint8_with_learned_zero_point():
    # scale 0.5, zero point 10.0 (float, learnable). x = 0.3: code 11, inside: d/ds = 0.4,
    # d/dzp = 0; x = 200: code 410, above: d/ds = 255 - 10, d/dzp = -0.5; x = -10: code
    # -10, below: d/ds = 0 - 10, d/dzp = -0.5.
    x = np.array([0.3, 200.0, -10.0], F32)
    w = np.array([1.0, 2.0, 3.0], F32)
    dx, ds, dz = grad(_loss("lsq", qatjax.uint8, w), argnums=(0, 1, 2))(x, F32(0.5), F32(10))
    np.testing.assert_array_equal(dx, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(ds, 1 * 0.4 + 2 * 245 + 3 * -10, rtol=1e-6)
    np.testing.assert_allclose(dz, 2 * -0.5 + 3 * -0.5, rtol=1e-6)
    assert dz.dtype == jnp.float32


def test_lsq_fp8():
    # e4m3, scale 1: 1.3 -> 1.25 (step 1/8 in [1, 2)) inside: d/ds = (1.25 - 1.3) / 1;
    # 500 above: +448; -1000 below: -448.
    x = np.array([1.3, 500.0, -1000.0], F32)
    w = np.array([1.0, 2.0, 3.0], F32)
    dx, ds = grad(_loss("lsq", qatjax.fp8_e4m3, w), argnums=(0, 1))(x, F32(1), F32(0))
    np.testing.assert_array_equal(dx, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(ds, 1 * -0.05 + 2 * 448 + 3 * -448, rtol=1e-6)


def test_lsq_integer_zero_point_gets_no_gradient():
    qp = QParams(F32(0.5), np.int32(3))
    grads = grad(
        lambda qp: jnp.sum(qatjax.fake_quant(jnp.array([0.3, 200.0]), qp, qatjax.uint8, ste="lsq")),
        allow_int=True,
    )(qp)
    assert grads.zero_point.dtype == jax.dtypes.float0
    np.testing.assert_allclose(grads.scale, 0.4 + 252, rtol=1e-6)


@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_non_lsq_estimators_give_parameters_no_gradient(ste):
    x = np.array([0.3, 200.0, -10.0], F32)
    ds, dz = grad(_loss(ste, qatjax.uint8, 1.0), argnums=(1, 2))(x, F32(0.5), F32(10))
    assert float(ds) == 0.0 and float(dz) == 0.0


def test_lsq_per_channel_scale_gradients_are_summed_per_channel():
    # Columns have scales 0.5, 0.25, 1 (int8, zero point 0).
    # col 0: 0.3 inside (1 - 0.6), 100 above (127)        -> 127.4
    # col 1: 0.1 inside (0 - 0.4), -40 below (-128)       -> -128.4
    # col 2: 200 above (127), 0.2 inside (0 - 0.2)        -> 126.8
    x = np.array([[0.3, 0.1, 200.0], [100.0, -40.0, 0.2]], F32)
    scale = np.array([[0.5, 0.25, 1.0]], F32)
    dx, ds = grad(_loss("lsq", qatjax.int8, 1.0), argnums=(0, 1))(x, scale, np.int32(0))
    np.testing.assert_array_equal(dx, [[1, 1, 0], [0, 0, 1]])
    assert ds.shape == (1, 3)
    np.testing.assert_allclose(ds, [[127.4, -128.4, 126.8]], rtol=1e-6)
    # "auto": 1 / sqrt(N * qmax) with N = 2 elements per channel.
    ds_auto = grad(_loss("lsq", qatjax.int8, 1.0, "auto"), argnums=1)(x, scale, np.int32(0))
    np.testing.assert_allclose(ds_auto, ds / math.sqrt(2 * 127), rtol=1e-6)
    # Per-row scales (axis 0) sum over the other axis.
    ds_rows = grad(_loss("lsq", qatjax.int8, 1.0), argnums=1)(x, F32([[0.5], [0.25]]), 0)
    # row 0 at scale 0.5: 0.3 -> 0.4, 0.1 -> 0 - 0.2, 200 -> 127; row 1 at 0.25: all outside
    # but 0.2 (0.8 -> 1: 1 - 0.8): 127 - 128 + 0.2.
    np.testing.assert_allclose(ds_rows, [[0.4 - 0.2 + 127], [127 - 128 + 0.2]], rtol=1e-6)


@pytest.mark.parametrize("grad_scale, factor", [(0.25, 0.25), ("auto", 1 / math.sqrt(3 * 255))])
def test_lsq_grad_scale(grad_scale, factor):
    x = np.array([0.3, 200.0, -10.0], F32)
    w = np.array([1.0, 2.0, 3.0], F32)
    dx, ds, dz = grad(_loss("lsq", qatjax.uint8, w, grad_scale), argnums=(0, 1, 2))(
        x, F32(0.5), F32(10)
    )
    np.testing.assert_array_equal(dx, [1.0, 0.0, 0.0])  # x's gradient is not scaled
    np.testing.assert_allclose(ds, (0.4 + 2 * 245 - 3 * 10) * factor, rtol=1e-6)
    np.testing.assert_allclose(dz, -2.5 * factor, rtol=1e-6)
    assert qatjax.lsq_grad_scale(3, qatjax.uint8) == pytest.approx(1 / math.sqrt(3 * 255))


# --------------------------------------------------------------------------- dtypes, transforms


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("fmt", [qatjax.int8, qatjax.uint4, qatjax.fp8_e4m3], ids=lambda f: f.name)
def test_input_dtype_is_kept_in_values_and_gradients(dtype, fmt):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(257) * 3, dtype)
    qp = QParams(F32(0.05), np.int32(0 if fmt.is_float or fmt.signed else 7))
    out = fake_quant(x, qp, fmt)
    assert out.dtype == dtype
    x32 = np.asarray(x.astype(jnp.float32))
    if fmt.is_float:
        expected = ref_fp8(x32, qp.scale, fmt)[1]
    else:
        expected = ref_int(x32, qp.scale, qp.zero_point, fmt)[1]
    assert_same_bits(out, expected.astype(dtype))
    for ste in ("identity", "clipped", "lsq"):
        dx, ds = grad(
            lambda x, s, ste=ste: jnp.sum(
                qatjax.fake_quant(x, QParams(s, qp.zero_point), fmt, ste=ste).astype(jnp.float32)
            ),
            argnums=(0, 1),
        )(x, qp.scale)
        assert dx.dtype == dtype and ds.dtype == jnp.float32


def test_vmap_with_per_example_parameters():
    fmt = qatjax.uint8
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 50)) * 3).astype(F32)
    scale = rng.uniform(0.01, 0.1, 6).astype(F32)
    zp = rng.integers(0, 256, 6).astype(np.int32)
    qp = QParams(scale, zp)
    out = jax.vmap(lambda v, qp: qatjax.fake_quant(v, qp, fmt))(x, qp)
    assert_same_bits(out, ref_int(x, scale[:, None], zp[:, None], fmt)[1])
    codes = jax.vmap(lambda v, qp: qatjax.quantize(v, qp, fmt))(x, qp)
    assert_same_bits(codes, ref_int_codes(x, scale[:, None], zp[:, None], fmt))
    assert_same_bits(jax.vmap(qatjax.dequantize)(codes, qp), out)
    # Per-example LSQ gradients of the scale: one per example, equal to the unbatched ones.
    grad_scale = jax.grad(
        lambda s, v, z: jnp.sum(qatjax.fake_quant(v, QParams(s, z), fmt, ste="lsq"))
    )
    batched = jax.jit(jax.vmap(grad_scale))(scale, x, zp)
    unbatched = jax.jit(grad_scale)
    for i in range(6):
        # The sums of 50 terms may be associated differently: equal to float32 rounding.
        np.testing.assert_allclose(batched[i], unbatched(scale[i], x[i], zp[i]), rtol=1e-5)


def test_pmap_over_devices():
    n = jax.local_device_count()
    assert n == 8  # tests/conftest.py forces 8 CPU devices
    fmt = qatjax.fp8_e5m2
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((n, 64)) * 10).astype(F32)
    scale = rng.uniform(0.001, 0.01, n).astype(F32)
    qp = QParams(scale, np.zeros(n, np.int32))
    out = jax.pmap(lambda v, qp: qatjax.fake_quant(v, qp, fmt))(x, qp)
    assert_same_bits(out, ref_fp8(x, scale[:, None], fmt)[1])
    dx = jax.pmap(jax.grad(lambda v, qp: jnp.sum(qatjax.fake_quant(v, qp, fmt))))(x, qp)
    np.testing.assert_array_equal(dx, np.abs(x / scale[:, None]) <= fmt.max)


def test_grad_of_jit_equals_jit_of_grad():
    x = np.linspace(-20, 20, 101).astype(F32)
    loss = _loss("lsq", qatjax.int4, 1.0, "auto")
    outer = jax.grad(jax.jit(loss), argnums=(0, 1, 2))(x, F32(0.7), F32(-2))
    inner = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, F32(0.7), F32(-2))
    for a, b in zip(outer, inner):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------- errors


QP = QParams(F32(0.1), np.int32(0))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: qatjax.fake_quant(jnp.ones(3), QP, qatjax.int8, ste="round"), ValueError, "`ste`"),
        (lambda: qatjax.fake_quant(jnp.ones(3, jnp.int32), QP, qatjax.int8), TypeError, "`x`"),
        (lambda: qatjax.quantize(np.ones(3, np.uint8), QP, qatjax.int8), TypeError, "`x`"),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QParams(jnp.ones(4), 0), qatjax.int8),
            ValueError,
            "`qp.scale`",
        ),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QParams(jnp.ones((2, 3)), 0), qatjax.int8),
            ValueError,
            "`qp.scale`",
        ),
        (
            lambda: qatjax.fake_quant(
                jnp.ones((3, 4)), QParams(0.1, jnp.zeros((2, 1))), qatjax.int8
            ),
            ValueError,
            "`qp.zero_point`",
        ),
        (
            lambda: qatjax.dequantize(jnp.ones(3, jnp.int8), QParams(jnp.ones(2), 0)),
            ValueError,
            "`qp.scale`",
        ),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QParams(-0.1, 0), qatjax.int8),
            ValueError,
            "`qp.scale`",
        ),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QParams(0.0, 0), qatjax.int8),
            ValueError,
            "`qp.scale`",
        ),
        (
            lambda: qatjax.fake_quant(
                jnp.ones(3), QParams(jnp.array([0.1, 0.0, 0.2]), 0), qatjax.int8
            ),
            ValueError,
            "`qp.scale`",
        ),
        (
            lambda: qatjax.quantize(jnp.ones(3), QParams(np.inf, 0), qatjax.int8),
            ValueError,
            "`qp.scale`",
        ),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QParams(jnp.ones(3, jnp.int32), 0), qatjax.int8),
            TypeError,
            "`qp.scale`",
        ),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QParams(0.1, 2), qatjax.fp8_e4m3),
            ValueError,
            "`qp.zero_point`",
        ),
        (lambda: qatjax.fake_quant(jnp.ones(3), (0.1, 0), qatjax.int8), TypeError, "`qp`"),
        (lambda: qatjax.fake_quant(jnp.ones(3), QP, 8), TypeError, "`fmt`"),
        (lambda: qatjax.fake_quant(jnp.ones(3), QP, IntFormat(9)), ValueError, "`bits`"),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QP, qatjax.int8, grad_scale=0.5),
            ValueError,
            "`grad_scale`",
        ),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QP, qatjax.int8, ste="lsq", grad_scale=-1.0),
            ValueError,
            "`grad_scale`",
        ),
        (
            lambda: qatjax.fake_quant(jnp.ones(3), QP, qatjax.int8, ste="lsq", grad_scale="sqrt"),
            ValueError,
            "`grad_scale`",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_errors_are_raised_at_trace_time():
    bad_shape = QParams(jnp.ones(4), jnp.int32(0))
    with pytest.raises(ValueError, match="`qp.scale`"):
        jax.jit(lambda x: qatjax.fake_quant(x, bad_shape, qatjax.int8)).trace(jnp.ones(3))
    with pytest.raises(TypeError, match="`x`"):
        jax.eval_shape(lambda x: qatjax.fake_quant(x, QP, qatjax.int8), jnp.ones(3, jnp.int8))
    with pytest.raises(ValueError, match="`ste`"):
        jax.eval_shape(lambda x: qatjax.fake_quant(x, QP, qatjax.int8, ste="sign"), jnp.ones(3))


# --------------------------------------------------------------------------- properties

SCALE_EXPONENTS = st.integers(-20, 20)  # scales from ~1e-6 to ~2e6, well above the eps floor
SETTINGS = settings(max_examples=40, deadline=None)
PROPERTY_INT_FORMATS = [qatjax.int8, qatjax.uint8, qatjax.int4, qatjax.uint4, IntFormat(2, True)]


def _int_params(data, fmt):
    mantissa = data.draw(st.floats(1.0, 2.0, exclude_max=True), label="mantissa")
    scale = F32(mantissa * 2.0 ** data.draw(SCALE_EXPONENTS, label="exponent"))
    zp = data.draw(st.integers(fmt.qmin, fmt.qmax), label="zero_point")
    return scale, np.int32(zp)


def _values(data, scale, n=512):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return (rng.standard_normal(n) * scale * 2.0 ** rng.integers(-4, 12, n)).astype(F32)


@SETTINGS
@given(data=st.data(), fmt=st.sampled_from(PROPERTY_INT_FORMATS + FP8_FORMATS))
def test_property_idempotent(data, fmt):
    # Exact in float32: |code - zp| <= 255, so (k * scale) * (1/scale) is within far less
    # than half a step of k and rounds back to k (fp8: k has 4 significant bits).
    # With a bfloat16 input too: bf16 keeps 8 bits, enough for 255 * (1 + 2**-9) < 255.5.
    scale, zp = (
        _int_params(data, fmt) if not fmt.is_float else (_int_params(data, qatjax.int8)[0], 0)
    )
    qp = QParams(scale, np.int32(zp))
    x = _values(data, scale)
    for v in (x, x.astype(jnp.bfloat16)):
        once = fake_quant(v, qp, fmt)
        assert_same_bits(fake_quant(once, qp, fmt), once)


@SETTINGS
@given(data=st.data(), fmt=st.sampled_from(PROPERTY_INT_FORMATS))
def test_property_error_at_most_half_a_step_inside_the_range(data, fmt):
    scale, zp = _int_params(data, fmt)
    lo, hi = (fmt.qmin - int(zp)) * float(scale), (fmt.qmax - int(zp)) * float(scale)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = rng.uniform(lo, hi, 512).astype(F32)
    x = x[(x >= lo) & (x <= hi)]
    x_hat = np.asarray(fake_quant(x, QParams(scale, zp), fmt)).astype(np.float64)
    # Not exactly scale/2: x * (1/scale) rounds (up to ~2 ulp of x relative error can flip
    # a near tie) and k * scale rounds again (half an ulp of x_hat).
    ulp = np.spacing(np.maximum(np.abs(x), np.abs(x_hat)).astype(F32)).astype(np.float64)
    assert np.all(np.abs(x - x_hat) <= float(scale) / 2 + 3 * ulp)


@SETTINGS
@given(data=st.data(), fmt=st.sampled_from(PROPERTY_INT_FORMATS + FP8_FORMATS))
def test_property_monotone(data, fmt):
    scale, zp = (
        _int_params(data, fmt) if not fmt.is_float else (_int_params(data, qatjax.int8)[0], 0)
    )
    x = np.sort(np.concatenate([_values(data, scale), F32([-np.inf, np.inf, 0.0, -0.0, 3e38])]))
    x_hat = np.asarray(fake_quant(x, QParams(scale, np.int32(zp)), fmt))
    assert np.all(np.diff(x_hat) >= 0)


@pytest.mark.parametrize("fmt", INT_FORMATS + FP8_FORMATS, ids=lambda f: f.name)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_property_every_code_round_trips(fmt, data):
    if fmt.is_float:
        raw = np.arange(256, dtype=np.uint8).view(fmt.storage_dtype.type)
        codes = raw[np.isfinite(raw.astype(F32))]
        scale, zp = _int_params(data, qatjax.int8)[0], np.int32(0)
    else:
        codes = np.arange(fmt.qmin, fmt.qmax + 1).astype(fmt.storage_dtype)
        scale, zp = _int_params(data, fmt)
    qp = QParams(scale, zp)
    values = dequantize(jnp.asarray(codes), qp)
    assert_same_bits(quantize(values, qp, fmt), codes)
    assert np.unique(np.asarray(values)).size == np.unique(codes.astype(F32)).size


# ----------------------------------------------------------------------------- zero points and learned scales


def test_a_concrete_zero_point_outside_the_format_is_refused():
    x = jnp.linspace(-1.0, 1.0, 7)
    for fn in (lambda: qatjax.fake_quant(x, QParams(jnp.float32(0.1), jnp.int32(300)), qatjax.int8),
               lambda: qatjax.quantize(x, QParams(jnp.float32(0.1), jnp.int32(-129)), qatjax.int8),
               lambda: qatjax.fake_quant(x, QParams(jnp.float32(0.1), jnp.float32(20.0)), qatjax.int4,
                                         ste="lsq")):
        with pytest.raises(ValueError, match=r"`qp.zero_point` must lie in \[-?\d+, \d+\]"):
            fn()


def test_a_learned_zero_point_is_clamped_as_torch_does():
    """torch's learnable fake quantization uses clamp(round(zp), qmin, qmax): with zp = 20 on
    int4 (range [-8, 7]) the zero point is 7 and 0.0 stays exactly 0 (it used to give -1.3)."""
    f = jax.jit(lambda x, zp: qatjax.fake_quant(x, QParams(jnp.float32(0.1), zp), qatjax.int4, ste="lsq"))
    x = jnp.asarray([0.0, -0.3, 0.05, -2.0], jnp.float32)
    got = np.asarray(f(x, jnp.float32(20.0)))
    zp = 7.0  # clamp(round(20), -8, 7)
    ref = (np.clip(np.round(np.asarray(x) / np.float32(0.1)) + zp, -8, 7) - zp) * np.float32(0.1)
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    assert got[0] == 0.0
    # The codes use the same zero point.
    codes = jax.jit(lambda x, zp: qatjax.quantize(x, QParams(jnp.float32(0.1), zp), qatjax.int4))(
        x, jnp.float32(20.0))
    np.testing.assert_array_equal(np.asarray(codes), np.clip(np.round(np.asarray(x) / 0.1) + zp, -8, 7))


def test_a_learned_scale_that_reaches_zero_is_floored_not_nan():
    f = jax.jit(lambda x, s: qatjax.fake_quant(x, QParams(s, jnp.int32(0)), qatjax.int8, ste="lsq"))
    x = jnp.asarray([1e-8, -3e-7, 0.5], jnp.float32)
    for s in (0.0, -1.0):
        got = np.asarray(f(x, jnp.float32(s)))
        eps = np.float32(np.finfo(np.float32).eps)
        ref = np.clip(np.round(np.asarray(x) / eps), -128, 127) * eps
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("fmt", [qatjax.int8, qatjax.fp8_e4m3], ids=lambda f: f.name)
def test_a_nan_scale_gives_nan_not_an_error(fmt):
    # A dynamic scale of a batch holding a NaN is NaN: NaN in, NaN out, eagerly as under jit.
    qp = QParams(np.float32(np.nan), 0)
    for fn in (qatjax.fake_quant, jax.jit(qatjax.fake_quant, static_argnums=2)):
        assert np.isnan(np.asarray(fn(jnp.ones(3), qp, fmt))).all()
