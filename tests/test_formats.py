"""Tests for qatjax.formats: integer and fp8 formats, their ranges and storage dtypes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qatjax
from qatjax.formats import FloatFormat, IntFormat, as_format, format_from_name


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_int_format_range_and_storage(bits, signed):
    fmt = IntFormat(bits, signed)
    if signed:
        expected = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        storage = np.int8
    else:
        expected = (0, (1 << bits) - 1)
        storage = np.uint8
    assert (fmt.qmin, fmt.qmax) == expected
    assert fmt.qmax - fmt.qmin + 1 == 2**bits
    assert fmt.storage_dtype == jnp.dtype(storage)
    info = np.iinfo(fmt.storage_dtype)
    assert info.min <= fmt.qmin and fmt.qmax <= info.max
    assert fmt.bits == bits and fmt.signed is signed and not fmt.is_float


def test_named_int_formats():
    assert qatjax.int8 == IntFormat(8, True)
    assert qatjax.uint8 == IntFormat(8, False)
    assert qatjax.int4 == IntFormat(4, True)
    assert qatjax.uint4 == IntFormat(4, False)
    # The 8-bit formats span exactly their storage dtype.
    assert (qatjax.int8.qmin, qatjax.int8.qmax) == (np.iinfo(np.int8).min, np.iinfo(np.int8).max)
    assert (qatjax.uint8.qmin, qatjax.uint8.qmax) == (0, np.iinfo(np.uint8).max)


@pytest.mark.parametrize(
    "fmt, dtype, exponent_bits, mantissa_bits, spec_max",
    [
        (qatjax.fp8_e4m3, ml_dtypes.float8_e4m3fn, 4, 3, 448.0),
        (qatjax.fp8_e5m2, ml_dtypes.float8_e5m2, 5, 2, 57344.0),
    ],
)
def test_fp8_formats(fmt, dtype, exponent_bits, mantissa_bits, spec_max):
    # Largest finite magnitude from the bit layout: e4m3fn keeps the top exponent for
    # finite values except mantissa 111 (NaN); e5m2 reserves the top exponent (IEEE-like).
    bias = 2 ** (exponent_bits - 1) - 1
    if exponent_bits == 4:
        expected_max = (2 - 2 * 2.0**-mantissa_bits) * 2.0 ** (2**exponent_bits - 1 - bias)
    else:
        expected_max = (2 - 2.0**-mantissa_bits) * 2.0 ** (2**exponent_bits - 2 - bias)
    assert fmt.max == expected_max == spec_max == float(ml_dtypes.finfo(dtype).max)
    assert (fmt.qmin, fmt.qmax) == (-fmt.max, fmt.max)
    assert fmt.storage_dtype == jnp.dtype(dtype)
    assert fmt.is_float and fmt.signed and fmt.bits == 8
    # Every finite bit pattern lies inside [-max, max].
    values = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    finite = values[np.isfinite(values)]
    assert np.abs(finite).max() == fmt.max


@pytest.mark.parametrize("bits", [1, 0, -3, 9, 16])
def test_int_format_rejects_out_of_range_bits(bits):
    with pytest.raises(ValueError, match="`bits`"):
        IntFormat(bits)


@pytest.mark.parametrize("bits", [True, False, 2.5, 8.0, "8", None])
def test_int_format_rejects_non_int_bits(bits):
    with pytest.raises(TypeError, match="`bits`"):
        IntFormat(bits)


def test_int_format_accepts_numpy_ints_and_normalizes():
    fmt = IntFormat(np.int64(4), np.bool_(False))
    assert fmt == qatjax.uint4
    assert type(fmt.bits) is int and type(fmt.signed) is bool
    assert hash(fmt) == hash(qatjax.uint4)


def test_int_format_rejects_non_bool_signed():
    with pytest.raises(TypeError, match="`signed`"):
        IntFormat(8, signed=1)


def test_float_format_rejects_unknown_variant():
    with pytest.raises(ValueError, match="`variant`"):
        FloatFormat("e3m4")


def test_formats_are_frozen_and_hashable_static_args():
    with pytest.raises(AttributeError):
        qatjax.int8.bits = 4  # type: ignore[misc]
    assert len({qatjax.int8, IntFormat(8), qatjax.fp8_e4m3, FloatFormat("e4m3")}) == 2

    traces = []

    def qmax_plus(x, fmt):
        traces.append(fmt)
        return x + fmt.qmax

    f = jax.jit(qmax_plus, static_argnums=1)
    assert float(f(1.0, qatjax.int8)) == 128.0
    assert float(f(1.0, IntFormat(8, True))) == 128.0  # equal format: cache hit
    assert float(f(1.0, qatjax.uint4)) == 16.0
    assert len(traces) == 2


@pytest.mark.parametrize(
    "fmt",
    [IntFormat(b, s) for b in range(2, 9) for s in (True, False)]
    + [qatjax.fp8_e4m3, qatjax.fp8_e5m2],
)
def test_format_names_round_trip(fmt):
    assert format_from_name(fmt.name) == fmt
    assert format_from_name(fmt.name.upper()) == fmt
    assert as_format(fmt.name) == fmt
    assert as_format(fmt) is fmt


def test_format_name_aliases():
    assert format_from_name("e4m3fn") == qatjax.fp8_e4m3
    assert format_from_name(" fp8_e4m3fn ") == qatjax.fp8_e4m3
    assert format_from_name("e5m2") == qatjax.fp8_e5m2


@pytest.mark.parametrize("name", ["int9", "uint1", "int", "float8", "fp8_e3m4", ""])
def test_format_from_name_rejects_unknown(name):
    with pytest.raises(ValueError):
        format_from_name(name)


def test_as_format_rejects_non_formats():
    with pytest.raises(TypeError, match="`fmt`"):
        as_format(8)
