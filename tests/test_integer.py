"""Integer and fp8 matmuls against int64 / float64 numpy references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qatjax
from qatjax.integer import (check_contraction, fp8_matmul, int_matmul, max_safe_contraction,
                            signed_codes)


def _codes(rng, shape, fmt):
    return rng.integers(fmt.qmin, fmt.qmax + 1, size=shape).astype(np.int64)


@pytest.mark.parametrize("za,zb", [(0, 0), (-37, 0), (0, 5), (-128, 127), (101, -77)])
def test_int_matmul_matches_int64_reference(za, zb):
    rng = np.random.default_rng(0)
    a = _codes(rng, (5, 3, 96), qatjax.int8)
    b = _codes(rng, (7, 96), qatjax.int8)
    zb_vec = np.full((7,), zb) + np.arange(7) % 3  # per-output zero points
    got = int_matmul(jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8), jnp.int32(za),
                     jnp.asarray(zb_vec, jnp.int32))
    ref = np.einsum("mik,nk->min", a - za, b - zb_vec[:, None])
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got, np.int64), ref)


def test_int_matmul_grouped_matches_reference():
    rng = np.random.default_rng(1)
    g, groups = 16, 4
    a = _codes(rng, (6, groups, g), qatjax.int8)
    b = _codes(rng, (5, groups, g), qatjax.int4)
    zb = rng.integers(-8, 8, size=(5, groups))
    got = int_matmul(jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8), jnp.int32(3),
                     jnp.asarray(zb, jnp.int32), grouped=True)
    ref = np.einsum("mgk,ngk->gmn", a - 3, b - zb[..., None])
    np.testing.assert_array_equal(np.asarray(got, np.int64), ref)


def test_extreme_codes_near_the_int32_limit_are_exact():
    # Every product is (-128) * (-128) = 2**14; K = max_safe gives the largest exact sum.
    k = max_safe_contraction(qatjax.int8, qatjax.int8, lhs_symmetric=True, rhs_symmetric=True)
    assert k == (2**31 - 1) // 2**14
    a = jnp.full((1, k), -128, jnp.int8)
    got = int_matmul(a, a, jnp.int32(0), jnp.int32(0))
    assert int(got[0, 0]) == k * 2**14


def test_uint8_codes_shift_to_int8_without_changing_differences():
    q = jnp.arange(256, dtype=jnp.uint8)
    s, z = signed_codes(q, jnp.int32(200), qatjax.uint8)
    assert s.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(s, np.int64) - int(z), np.arange(256) - 200)


def test_contraction_guard_names_the_limit():
    check_contraction(1000, qatjax.int8, qatjax.int8, lhs_symmetric=True, rhs_symmetric=True)
    with pytest.raises(ValueError, match="exceeds 33025"):
        check_contraction(40000, qatjax.uint8, qatjax.int8, lhs_symmetric=False, rhs_symmetric=False)


def test_int_matmul_lowers_to_i8_dot_with_i32_result():
    a = jnp.zeros((4, 32), jnp.int8)
    text = jax.jit(lambda a, b: int_matmul(a, b, jnp.int32(1), jnp.int32(0))).lower(a, a).as_text()
    assert "tensor<4x32xi8>" in text and "-> tensor<4x4xi32>" in text
    assert "stablehlo.dot_general" in text


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_fp8_matmul_matches_float64_reference(dtype):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 64)).astype(dtype)
    b = rng.normal(size=(16, 64)).astype(dtype)
    got = fp8_matmul(jnp.asarray(a), jnp.asarray(b))
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)
    text = jax.jit(fp8_matmul).lower(jnp.asarray(a), jnp.asarray(b)).as_text()
    want = "f8E4M3FN" if dtype == ml_dtypes.float8_e4m3fn else "f8E5M2"
    assert f"tensor<8x64x{want}>" in text and "stablehlo.dot_general" in text


def test_int_matmul_rejects_non_int8_operands():
    with pytest.raises(TypeError, match="int8 codes"):
        int_matmul(jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.int8), 0, 0)


def test_compiled_gemms_use_the_low_precision_library_calls_on_gpu():
    """On CPU the lowering above is what can be checked; on a GPU the compiled HLO must call
    cuBLAS(Lt) with int8 / fp8 operands rather than an upcast float GEMM."""
    a8 = jnp.ones((64, 64), jnp.int8)
    f8 = jnp.ones((64, 64), jnp.float8_e4m3fn)
    int_hlo = jax.jit(lambda a, b: int_matmul(a, b, jnp.int32(0), jnp.int32(0))).lower(a8, a8).compile().as_text()
    fp8_hlo = jax.jit(fp8_matmul).lower(f8, f8).compile().as_text()
    if jax.default_backend() == "gpu":
        assert "__cublas$gemm" in int_hlo or "__cublas$lt$matmul" in int_hlo
        assert "__cublas$lt$matmul$f8" in fp8_hlo
    else:
        assert "s8[64,64]" in int_hlo and "s32[64,64]" in int_hlo
        assert "f8e4m3fn[64,64]" in fp8_hlo
