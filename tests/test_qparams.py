"""Tests for qatjax.qparams: QParams pytrees, parameters from ranges, granularity helpers.

References are numpy float32 transcriptions of torch.ao's observer arithmetic
(``_calculate_qparams``) and of the symmetric ``amax / qmax`` convention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qatjax
from qatjax import IntFormat, QParams, merge_groups, reduce_axes, split_groups

F32 = np.float32
EPS = np.finfo(np.float32).eps
INT_FORMATS = [IntFormat(b, s) for b in range(2, 9) for s in (True, False)]
FP8_FORMATS = [qatjax.fp8_e4m3, qatjax.fp8_e5m2]


def ref_affine(lo, hi, fmt):
    """torch.ao: scale = max((max_pos - min_neg) / (qmax - qmin), eps),
    zp = clip(qmin - round_half_even(min_neg / scale), qmin, qmax), in float32."""
    min_neg = np.minimum(np.asarray(lo, F32), F32(0))
    max_pos = np.maximum(np.asarray(hi, F32), F32(0))
    scale = np.maximum((max_pos - min_neg) / F32(fmt.qmax - fmt.qmin), F32(EPS))
    zp = np.clip(F32(fmt.qmin) - np.rint(min_neg / scale), fmt.qmin, fmt.qmax)
    return scale.astype(F32), zp.astype(np.int32)


def ref_symmetric(lo, hi, qmax):
    """scale = max(max(|min_neg|, max_pos) / qmax, eps), in float32."""
    amax = np.maximum(
        -np.minimum(np.asarray(lo, F32), F32(0)), np.maximum(np.asarray(hi, F32), F32(0))
    )
    return np.maximum(amax / F32(qmax), F32(EPS)).astype(F32)


# Jitted entry points (one compilation per format and shape; eager calls compile op by op).
affine = jax.jit(
    lambda lo, hi, fmt: qatjax.qparams_from_minmax(lo, hi, fmt, symmetric=False), static_argnums=2
)
symmetric = jax.jit(
    lambda lo, hi, fmt: qatjax.qparams_from_minmax(lo, hi, fmt, symmetric=True), static_argnums=2
)


def assert_bits_equal(actual, expected):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def random_ranges(rng, n):
    """Ranges over many magnitudes, including all-positive and all-negative ones."""
    mag = 2.0 ** rng.integers(-30, 30, n)
    a = (rng.standard_normal(n) * mag).astype(F32)
    b = (rng.standard_normal(n) * mag).astype(F32)
    return np.minimum(a, b), np.maximum(a, b)


# --------------------------------------------------------------------------- QParams pytree


def test_qparams_is_a_pytree():
    qp = QParams(jnp.ones((1, 3)), jnp.zeros((1, 3), jnp.int32))
    leaves, treedef = jax.tree.flatten(qp)
    assert len(leaves) == 2
    assert jax.tree.unflatten(treedef, leaves) == qp
    doubled = jax.tree.map(lambda a: a * 2, qp)
    assert isinstance(doubled, QParams)
    np.testing.assert_array_equal(doubled.scale, 2 * np.ones((1, 3)))


def test_qparams_through_jit_and_vmap():
    lo = jnp.asarray([-1.0, -2.0, 0.5])
    hi = jnp.asarray([1.0, 3.0, 4.0])
    batched = jax.jit(jax.vmap(lambda a, b: affine(a, b, qatjax.uint8)))(lo, hi)
    jitted = affine(lo, hi, qatjax.uint8)
    assert isinstance(batched, QParams) and isinstance(jitted, QParams)
    scale, zp = ref_affine(np.asarray(lo), np.asarray(hi), qatjax.uint8)
    for qp in (batched, jitted):
        assert_bits_equal(qp.scale, scale)
        np.testing.assert_array_equal(qp.zero_point, zp)


# --------------------------------------------------------------------------- from a range


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f.name)
def test_affine_matches_torch_observer_arithmetic(fmt):
    lo, hi = random_ranges(np.random.default_rng(fmt.bits * 2 + fmt.signed), 2048)
    scale, zp = ref_affine(lo, hi, fmt)
    qp = affine(lo, hi, fmt)
    assert_bits_equal(qp.scale, scale)
    assert qp.zero_point.dtype == jnp.int32
    np.testing.assert_array_equal(qp.zero_point, zp)


def test_affine_eager_and_constant_folded():
    # XLA rewrites division by a constant as a multiplication by its reciprocal: the
    # parameters must not depend on whether the range is traced, eager or a constant.
    lo, hi = random_ranges(np.random.default_rng(7), 2048)
    fmt = qatjax.uint8
    scale, zp = ref_affine(lo, hi, fmt)
    for qp in (
        qatjax.qparams_from_minmax(lo, hi, fmt, symmetric=False),
        jax.jit(lambda: qatjax.qparams_from_minmax(lo, hi, fmt, symmetric=False))(),
    ):
        assert_bits_equal(qp.scale, scale)
        np.testing.assert_array_equal(qp.zero_point, zp)
    for a, b, s, z in zip(lo[:3], hi[:3], scale, zp):
        for qp in (
            affine(a, b, fmt),
            jax.jit(lambda a=a, b=b: qatjax.qparams_from_minmax(a, b, fmt, symmetric=False))(),
        ):
            assert qp.scale.shape == () and qp.zero_point.shape == ()
            assert_bits_equal(qp.scale, s)
            assert int(qp.zero_point) == int(z)


BOUND = float(F32(1e30))


@settings(max_examples=150, deadline=None)
@given(
    lo=st.floats(-BOUND, BOUND, width=32, allow_subnormal=False),
    hi=st.floats(-BOUND, BOUND, width=32, allow_subnormal=False),
    fmt=st.sampled_from([qatjax.int8, qatjax.uint8, qatjax.uint4, IntFormat(3, True)]),
)
def test_affine_property(lo, hi, fmt):
    # Subnormal bounds are excluded: XLA:CPU flushes float32 subnormals to zero.
    qp = affine(F32(lo), F32(hi), fmt)
    scale, zp = ref_affine(F32(lo), F32(hi), fmt)
    assert_bits_equal(qp.scale, scale)
    assert int(qp.zero_point) == int(zp)
    assert fmt.qmin <= int(qp.zero_point) <= fmt.qmax
    assert float(qp.scale) >= EPS


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f.name)
def test_symmetric_scale_is_amax_over_qmax(fmt):
    lo, hi = random_ranges(np.random.default_rng(fmt.bits), 2048)
    expected = ref_symmetric(lo, hi, fmt.qmax)
    for qp in (
        symmetric(lo, hi, fmt),
        jax.jit(qatjax.qparams_from_amax, static_argnums=1)(np.maximum(-lo, hi), fmt),
    ):
        assert_bits_equal(qp.scale, expected)
        assert qp.zero_point.dtype == jnp.int32
        np.testing.assert_array_equal(qp.zero_point, 0)


@pytest.mark.parametrize("fmt", [f for f in INT_FORMATS if f.signed], ids=lambda f: f.name)
def test_symmetric_amax_maps_to_qmax(fmt):
    # Above the scale floor (amax >= qmax * eps) and below overflow, over 110 binades.
    exponents = np.arange(-13, 100)
    amax = (np.random.default_rng(3).uniform(1, 2, exponents.size) * 2.0**exponents).astype(F32)
    qp = jax.jit(qatjax.qparams_from_amax, static_argnums=1)(amax, fmt)
    quantize = jax.jit(qatjax.quantize, static_argnums=2)
    np.testing.assert_array_equal(quantize(amax, qp, fmt), fmt.qmax)
    np.testing.assert_array_equal(quantize(-amax, qp, fmt), -fmt.qmax)


@pytest.mark.parametrize("fmt", FP8_FORMATS, ids=lambda f: f.name)
def test_fp8_scale_is_amax_over_max(fmt):
    lo, hi = random_ranges(np.random.default_rng(11), 2048)
    expected = ref_symmetric(lo, hi, fmt.max)
    for qp in (symmetric(lo, hi, fmt), affine(lo, hi, fmt)):  # fp8 is always symmetric
        assert_bits_equal(qp.scale, expected)
        np.testing.assert_array_equal(qp.zero_point, 0)


@pytest.mark.parametrize("fmt", [qatjax.int8, qatjax.uint8, qatjax.uint4], ids=lambda f: f.name)
def test_range_is_widened_to_contain_zero(fmt):
    lo = np.array([2.0, 0.0, -5.0, -5.0], F32)
    hi = np.array([5.0, 5.0, -2.0, 0.0], F32)
    builders = [affine] + ([symmetric] if fmt.signed else [])
    for build in builders:
        qp = build(lo, hi, fmt)
        scale, zp = np.asarray(qp.scale), np.asarray(qp.zero_point)
        assert_bits_equal(scale[0], scale[1])
        assert_bits_equal(scale[2], scale[3])
        assert zp[0] == zp[1] and zp[2] == zp[3]
    # Affine: all-positive data puts zero at qmin, all-negative data at qmax.
    np.testing.assert_array_equal(affine(lo, hi, fmt).zero_point[::2], [fmt.qmin, fmt.qmax])


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f.name)
def test_zero_is_exactly_representable(fmt):
    lo, hi = random_ranges(np.random.default_rng(5), 2048)
    qp = affine(lo, hi, fmt)
    x_hat = jax.jit(qatjax.fake_quant, static_argnums=2)(np.zeros_like(lo), qp, fmt)
    np.testing.assert_array_equal(x_hat, 0.0)


@pytest.mark.parametrize("fmt", INT_FORMATS + FP8_FORMATS, ids=lambda f: f.name)
def test_scale_floor_for_constant_and_zero_inputs(fmt):
    # All-zero tensors, tiny ranges and constant tensors (lo == hi).
    lo = np.array([0.0, -0.0, -1e-12, 0.0, 3.0, -3.0, 1e-30], F32)
    hi = np.array([0.0, 0.0, 1e-12, 1e-15, 3.0, -3.0, 1e-30], F32)
    for build in (symmetric, affine):
        qp = build(lo, hi, fmt)
        if build is symmetric or fmt.is_float:
            assert_bits_equal(qp.scale, ref_symmetric(lo, hi, fmt.qmax))
        else:
            scale, zp = ref_affine(lo, hi, fmt)
            assert_bits_equal(qp.scale, scale)
            np.testing.assert_array_equal(qp.zero_point, zp)
        assert np.all(np.asarray(qp.scale) >= EPS)
        assert np.all(np.asarray(qp.scale)[:4] == F32(EPS))  # zero or tiny ranges: the floor


def test_qparams_are_differentiable_as_plain_division():
    # d/dhi of (hi - lo) / 255 is 1/255; d/dlo is -1/255; d/damax of amax / 127 is 1/127.
    d_hi, d_lo = jax.jit(
        jax.grad(
            lambda hi, lo: qatjax.qparams_from_minmax(lo, hi, qatjax.uint8, symmetric=False).scale,
            argnums=(0, 1),
        )
    )(F32(2.0), F32(-1.0))
    np.testing.assert_allclose([d_hi, d_lo], [1 / 255, -1 / 255], rtol=1e-6)
    d_amax = jax.jit(jax.grad(lambda a: qatjax.qparams_from_amax(a, qatjax.int8).scale))(F32(2.0))
    np.testing.assert_allclose(d_amax, 1 / 127, rtol=1e-6)


# --------------------------------------------------------------------------- granularity


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_channel_params_on_any_axis(axis):
    x = (np.random.default_rng(axis % 3).standard_normal((5, 6, 7)) * 3).astype(F32)
    axes = reduce_axes(x.ndim, axis)
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    qp = affine(lo, hi, qatjax.int8)
    scales, zero_points = np.asarray(qp.scale), np.asarray(qp.zero_point)
    expected_shape = [1, 1, 1]
    expected_shape[axis] = x.shape[axis]
    assert qp.scale.shape == qp.zero_point.shape == tuple(expected_shape)
    for c in range(x.shape[axis]):
        channel = np.take(x, c, axis=axis)
        scale, zp = ref_affine(channel.min(), channel.max(), qatjax.int8)
        assert_bits_equal(np.take(scales, c, axis=axis).reshape(()), scale)
        assert int(np.take(zero_points, c, axis=axis).reshape(())) == int(zp)


def test_reduce_axes():
    assert reduce_axes(3, None) == (0, 1, 2)
    assert reduce_axes(3, 1) == (0, 2)
    assert reduce_axes(3, -1) == (0, 1)
    assert reduce_axes(3, (0, 2)) == (1,)
    assert reduce_axes(2, np.int64(0)) == (1,)
    with pytest.raises(ValueError, match="`keep_axes`"):
        reduce_axes(3, 3)
    with pytest.raises(ValueError, match="`keep_axes`"):
        reduce_axes(3, (0, -4))


@pytest.mark.parametrize("axis, group_size", [(0, 3), (1, 4), (-1, 4), (1, 12), (1, 1)])
def test_split_and_merge_groups(axis, group_size):
    x = np.arange(6 * 12, dtype=F32).reshape(6, 12)
    a = axis % 2
    n = x.shape[a]
    y = split_groups(jnp.asarray(x), axis, group_size)
    expected_shape = x.shape[:a] + (n // group_size, group_size) + x.shape[a + 1 :]
    assert y.shape == expected_shape
    np.testing.assert_array_equal(y, x.reshape(expected_shape))
    np.testing.assert_array_equal(merge_groups(y, axis), x)


def test_per_group_params():
    x = (np.random.default_rng(2).standard_normal((4, 24)) * 2).astype(F32)
    groups = split_groups(jnp.asarray(x), 1, 8)
    lo = jnp.min(groups, axis=2, keepdims=True)
    hi = jnp.max(groups, axis=2, keepdims=True)
    qp = affine(lo, hi, qatjax.int4)
    assert qp.scale.shape == (4, 3, 1)
    for r in range(4):
        for g in range(3):
            block = x[r, g * 8 : (g + 1) * 8]
            scale, zp = ref_affine(block.min(), block.max(), qatjax.int4)
            assert_bits_equal(qp.scale[r, g, 0], scale)
            assert int(qp.zero_point[r, g, 0]) == int(zp)


@pytest.mark.parametrize("group_size", [5, 0, -4, 2.0, None])
def test_split_groups_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError, match="`group_size`"):
        split_groups(jnp.zeros((2, 12)), 1, group_size)


@pytest.mark.parametrize("axis", [2, -3, 1.0])
def test_split_groups_rejects_bad_axis(axis):
    with pytest.raises(ValueError, match="`axis`"):
        split_groups(jnp.zeros((2, 12)), axis, 4)


def test_computed_once_returns_every_bit_unchanged():
    from qatjax.qparams import computed_once

    # (not subnormals: XLA:CPU flushes those to zero in any float arithmetic)
    f = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 1.2e-38, 3.4e38, -2.5, 0.1], np.float32)
    i = np.array([0, -1, 1, 2**31 - 1, -(2**31), 127, -128], np.int32)
    for a in (f, i):
        for fn in (computed_once, jax.jit(computed_once), jax.vmap(computed_once)):
            out = np.asarray(fn(jnp.asarray(a)))
            assert out.dtype == a.dtype
            np.testing.assert_array_equal(out.view(np.int32), a.view(np.int32))
    # Differentiable as the identity.
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda a: jnp.sum(3 * computed_once(a)))(
        jnp.asarray(f[3:]))), np.full(6, 3, np.float32))


def test_parameters_are_computed_once_not_per_element():
    """The parameter chain stays out of the loop over the large tensor: in the compiled HLO,
    the fusion that multiplies a [256, 2048] tensor by the scale holds no exact division."""
    amax = jnp.linspace(1.0, 2.0, 2048)
    acc = jnp.ones((256, 2048))
    hlo = jax.jit(lambda a, m: a * qatjax.qparams_from_amax(m, "int8").scale).lower(acc, amax).compile().as_text()
    comps = [c.strip() for c in hlo.split("\n\n") if c.strip().startswith("%fused_computation")]
    big = [c for c in comps if "-> f32[256,2048]" in c.split("\n")[0]]
    assert len(big) == 1, hlo
    # the exact division's bit mask 0xFFFFF000 (4294963200) is computed in another fusion
    assert "4294963200" not in big[0] and "bitcast-convert" not in big[0], big[0]
    assert any("4294963200" in c for c in comps), hlo


@pytest.mark.parametrize("lo,hi,symmetric,where", [
    (2.0, -2.0, True, ""),
    (1.0, 0.5, False, ""),
    (np.array([0.0, 3.0]), np.array([1.0, 2.0]), False, r" at index \(1,\)"),
])
def test_swapped_bounds_are_refused(lo, hi, symmetric, where):
    fmt = qatjax.uint8 if not symmetric else qatjax.int8
    with pytest.raises(ValueError, match=r"`lo` must not exceed `hi`.*" + where):
        qatjax.qparams_from_minmax(lo, hi, fmt, symmetric=symmetric)


def test_empty_and_nan_ranges_are_documented_results():
    # (+inf, -inf) is an observer's range before any data: the smallest scale, zero point 0.
    qp = qatjax.qparams_from_minmax(np.inf, -np.inf, qatjax.int8)
    assert float(qp.scale) == qatjax.qparams.SCALE_EPS and int(qp.zero_point) == 0
    # A NaN bound gives a NaN scale (NaN in, NaN out), eagerly and under jit.
    for fn in (qatjax.qparams_from_minmax, jax.jit(qatjax.qparams_from_minmax, static_argnums=2)):
        assert np.isnan(fn(np.float32(np.nan), 1.0, qatjax.int8).scale)
