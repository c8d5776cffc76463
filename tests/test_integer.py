"""Integer and fp8 matmuls against int64 / float64 numpy references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qatjax
from qatjax.integer import (check_contraction, fp8_dot_general, int_dot_general, max_safe_contraction,
                            signed_codes)


def _codes(rng, shape, fmt):
    return rng.integers(fmt.qmin, fmt.qmax + 1, size=shape).astype(np.int64)


@pytest.mark.parametrize("za,zb", [(0, 0), (-37, 0), (0, 5), (-128, 127), (101, -77)])
def _np_dot_general(a, b, dims):
    """int64 / float64 dot_general by einsum letters (the layout lax.dot_general gives)."""
    (lc, rc), (lb, rb) = dims
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    la = [None] * a.ndim
    ra = [None] * b.ndim
    for i, j in zip(lc + lb, rc + rb):
        la[i] = ra[j] = next(letters)
    for axes in (la, ra):
        for i, v in enumerate(axes):
            if v is None:
                axes[i] = next(letters)
    out = [la[i] for i in lb] + [la[i] for i in range(a.ndim) if i not in lc + lb] + \
          [ra[i] for i in range(b.ndim) if i not in rc + rb]
    return np.einsum(f"{''.join(la)},{''.join(ra)}->{''.join(out)}", a, b)


GENERAL = [
    ((3, 5, 64), (64, 24), (((2,), (0,)), ((), ()))),          # dense, kernel [K, N]
    ((3, 5, 64), (24, 64), (((2,), (1,)), ((), ()))),          # served [N, K]
    ((2, 7, 4, 16), (2, 9, 4, 16), (((3,), (3,)), ((0, 2), (0, 2)))),  # attention Q K^T
    ((2, 4, 7, 9), (2, 9, 4, 16), (((3,), (1,)), ((0, 1), (0, 2)))),   # A V
    ((6, 4, 8), (8, 4, 5), (((1, 2), (1, 0)), ((), ()))),      # two contracting axes, transposed
]


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", GENERAL)
@pytest.mark.parametrize("zero_points", ["none", "scalar", "per_row_and_channel"])
def test_int_dot_general_matches_int64_reference(lhs_shape, rhs_shape, dims, zero_points):
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, size=lhs_shape)
    b = rng.integers(-128, 128, size=rhs_shape)
    (lc, rc), _ = dims
    if zero_points == "none":
        za = zb = None
    elif zero_points == "scalar":
        za, zb = np.int64(-7), np.int64(11)
    else:  # constant along the contracting axes, varying along every other one
        za = rng.integers(-20, 20, size=tuple(1 if i in lc else n for i, n in enumerate(lhs_shape)))
        zb = rng.integers(-20, 20, size=tuple(1 if i in rc else n for i, n in enumerate(rhs_shape)))
    ref = _np_dot_general(a - (0 if za is None else za), b - (0 if zb is None else zb), dims)
    got = int_dot_general(jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8), dims,
                          None if za is None else jnp.asarray(za, jnp.int32),
                          None if zb is None else jnp.asarray(zb, jnp.int32))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got, np.int64), ref)


def test_dimension_numbers_are_validated():
    a = jnp.zeros((2, 3), jnp.int8)
    with pytest.raises(ValueError, match="out of range"):
        int_dot_general(a, a, (((2,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="used twice"):
        int_dot_general(a, a, (((0,), (0,)), ((0,), (1,))))


def test_extreme_codes_near_the_int32_limit_are_exact():
    # Every product is (-128) * (-128) = 2**14; K = max_safe gives the largest exact sum.
    k = max_safe_contraction(qatjax.int8, qatjax.int8, lhs_symmetric=True, rhs_symmetric=True)
    assert k == (2**31 - 1) // 2**14
    a = jnp.full((1, k), -128, jnp.int8)
    got = int_dot_general(a, a, (((1,), (1,)), ((), ())))
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


def test_int_dot_general_lowers_to_i8_dot_with_i32_result():
    a = jnp.zeros((4, 32), jnp.int8)
    dims = (((1,), (1,)), ((), ()))
    text = jax.jit(lambda a, b: int_dot_general(a, b, dims, jnp.int32(1))).lower(a, a).as_text()
    assert "tensor<4x32xi8>" in text and "-> tensor<4x4xi32>" in text
    assert "stablehlo.dot_general" in text


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_fp8_dot_general_matches_float64_reference(dtype):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 64)).astype(dtype)
    b = rng.normal(size=(16, 64)).astype(dtype)
    dims = (((1,), (1,)), ((), ()))
    got = fp8_dot_general(jnp.asarray(a), jnp.asarray(b), dims)
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)
    text = jax.jit(lambda a, b: fp8_dot_general(a, b, dims)).lower(jnp.asarray(a), jnp.asarray(b)).as_text()
    want = "f8E4M3FN" if dtype == ml_dtypes.float8_e4m3fn else "f8E5M2"
    assert f"tensor<8x64x{want}>" in text and "stablehlo.dot_general" in text


def test_int_dot_general_rejects_non_int8_operands():
    with pytest.raises(TypeError, match="int8 codes"):
        int_dot_general(jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.int8), (((1,), (0,)), ((), ())))


def test_compiled_gemms_use_the_low_precision_library_calls_on_gpu():
    """On CPU the lowering above is what can be checked; on a GPU the compiled HLO must call
    cuBLAS(Lt) with int8 / fp8 operands rather than an upcast float GEMM."""
    a8 = jnp.ones((64, 64), jnp.int8)
    f8 = jnp.ones((64, 64), jnp.float8_e4m3fn)
    dims = (((1,), (1,)), ((), ()))
    int_hlo = jax.jit(lambda a, b: int_dot_general(a, b, dims)).lower(a8, a8).compile().as_text()
    fp8_hlo = jax.jit(lambda a, b: fp8_dot_general(a, b, dims)).lower(f8, f8).compile().as_text()
    if jax.default_backend() == "gpu":
        assert "__cublas$gemm" in int_hlo or "__cublas$lt$matmul" in int_hlo
        assert "__cublas$lt$matmul$f8" in fp8_hlo
    else:
        assert "s8[64,64]" in int_hlo and "s32[64,64]" in int_hlo
        assert "f8e4m3fn[64,64]" in fp8_hlo
