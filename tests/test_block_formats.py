"""Block-scaled formats (qatjax.blocks): element casts bit-exact with ml_dtypes, block scales
against a float64 numpy implementation of the specifications' text, fake quantization and its
straight-through estimator, NaN, ragged blocks, the scale search."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qatjax
from qatjax import blocks
from qatjax.formats import BlockFormat, as_format, format_from_name
from qatjax.packing import pack_nibbles, unpack_nibbles

FLOAT_ELEMENTS = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
                  "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn,
                  "e2m1": ml_dtypes.float4_e2m1fn}
EMAX = {"e4m3": 8, "e5m2": 15, "e2m3": 2, "e3m2": 4, "e2m1": 2, "int8": 0}
ROUNDINGS = ("floor", "ceil", "round_up_on_saturation")


@functools.lru_cache(maxsize=None)
def _ops(name):
    """One compiled function per format: scales, fake quant, codes and their dequantization."""
    fmt = format_from_name(name)

    def run(x):
        scales = blocks.block_scales(x, fmt)
        codes, _ = blocks.block_quantize(x, fmt, scales=scales)
        return (scales, blocks.block_fake_quant(x, fmt, scales=scales),
                blocks.block_dequantize(codes, scales, fmt))

    return jax.jit(run)


_scales = jax.jit(blocks.block_scales, static_argnums=1)


# ----------------------------------------------------------------------------- references


def _grid(element):
    """Every finite element value (float64, sorted, unique) and the element's max."""
    if element == "int8":
        values = np.arange(-127, 128) / 64.0
        return values, 127 / 64
    dtype = FLOAT_ELEMENTS[element]
    bits = ml_dtypes.finfo(dtype).bits
    values = np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float64)
    values = np.unique(values[np.isfinite(values)])
    return values, float(ml_dtypes.finfo(dtype).max)


def _ref_element_codes(v32, element):
    """ml_dtypes' (round to nearest even) cast of the saturated float32 values: codes."""
    _, top = _grid(element)
    clipped = np.clip(v32.astype(np.float64), -top, top)
    if element == "int8":
        return np.round(np.nan_to_num(clipped) * 64).astype(np.int8)
    return np.asarray(clipped.astype(np.float32), FLOAT_ELEMENTS[element])


def _nmant(element):
    return 6 if element == "int8" else int(ml_dtypes.finfo(FLOAT_ELEMENTS[element]).nmant)


def _ref_e8m0(amax, element, rounding):
    """E8M0 bytes from the OCP text, float64: X = 2**(floor(log2(amax)) - emax); "ceil": the
    smallest e with amax / 2**e <= max; "round_up_on_saturation": one more where the block's
    largest value, rounded to nearest even on the element's grid, exceeds the max."""
    _, top = _grid(element)
    emax = EMAX[element]
    out = np.zeros(amax.shape, np.int64)
    for i, a in np.ndenumerate(amax.astype(np.float64)):
        if not np.isfinite(a):
            out[i] = 255
            continue
        if a == 0:
            out[i] = 0
            continue
        e = int(np.floor(np.log2(a))) - emax
        if rounding == "ceil":
            e = int(np.ceil(np.log2(a / top)))
        elif rounding == "round_up_on_saturation":
            step = 2.0 ** (emax - _nmant(element))
            if np.round(a / 2.0**e / step) * step > top:
                e += 1
        out[i] = min(max(e, -127), 126) + 127
    return out


def _ref_mx_fake_quant(x, element, block, rounding, axis=-1):
    """float64 fake quantization of float32 ``x`` in blocks along ``axis`` (ragged last block)."""
    x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
    n = x.shape[-1]
    g = -(-n // block)
    padded = np.zeros(x.shape[:-1] + (g * block,), np.float32)
    padded[..., :n] = x
    xs = padded.reshape(x.shape[:-1] + (g, block))
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(xs.astype(np.float64)), axis=-1)
    codes = _ref_e8m0(amax, element, rounding)
    scale = np.where(codes == 255, np.nan, 2.0 ** (codes.astype(np.float64) - 127))[..., None]
    with np.errstate(invalid="ignore"):
        y = (xs / scale).astype(np.float32)
    q = _ref_element_codes(y, element)
    qv = q.astype(np.float64) / 64 if element == "int8" else q.astype(np.float64)
    out = (qv * scale).astype(np.float32).reshape(padded.shape)[..., :n]
    return np.moveaxis(out, -1, axis), np.moveaxis(codes, -1, axis)


def _ref_nvfp4(x, block=16):
    """float64 emulation of the float32 NVFP4 text: g = amax / (448 * 6); s_b = e4m3(amax_b /
    (6 g)); element e2m1(v / (s_b g)); value element * (s_b g)."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    g_blocks = -(-n // block)
    padded = np.zeros(x.shape[:-1] + (g_blocks * block,), np.float32)
    padded[..., :n] = x
    xs = padded.reshape(x.shape[:-1] + (g_blocks, block))
    amax_t = np.float32(np.max(np.abs(x)))
    g = np.float32(np.float64(amax_t) / 2688.0) if amax_t > 0 else np.float32(1.0)
    six_g = np.float32(6.0) * g
    amax_b = np.max(np.abs(xs), axis=-1)
    s_b = np.asarray(np.minimum(np.float32(amax_b.astype(np.float64) / np.float64(six_g)),
                                np.float32(448.0)), ml_dtypes.float8_e4m3fn)
    s = s_b.astype(np.float32) * g
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(s[..., None] > 0, xs.astype(np.float64) / s[..., None].astype(np.float64), 0.0)
    e = _ref_element_codes(y.astype(np.float32), "e2m1").astype(np.float32)
    out = (e * s[..., None]).reshape(padded.shape)[..., :n]
    return out, s_b, g


def _data(shape, seed, outliers=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(3.0)
    if outliers:
        x.reshape(-1)[rng.choice(x.size, max(1, x.size // 50), replace=False)] *= 1000.0
    return x


# ----------------------------------------------------------------------------- element casts


def _cast_inputs(element):
    """Every element value, the midpoints of neighbours (ties), points a quarter step either
    side, and values beyond the max, with both signs: float32."""
    values, top = _grid(element)
    pos = values[values >= 0]
    mid = (pos[1:] + pos[:-1]) / 2
    quarter = (pos[1:] - pos[:-1]) / 4
    extra = np.array([top * 1.01, top * 2, top * 1e6, 3e38, np.inf])
    v = np.concatenate([pos, mid, mid - quarter, mid + quarter, extra])
    return np.concatenate([v, -v]).astype(np.float32)


def test_element_casts_bit_exact_with_ml_dtypes():
    """Every representable value, every tie (nearest even), subnormals and saturation, for each
    element format: the codes and decoded values equal ml_dtypes' cast of the clipped float32
    values. The block scale is 1 (E8M0 byte 127), so the elements are the inputs themselves."""
    inputs = {e: _cast_inputs(e) for e in sorted(EMAX)}
    rows = max(-(-v.size // 32) for v in inputs.values())
    padded = {e: np.pad(v, (0, rows * 32 - v.size)).reshape(rows, 32) for e, v in inputs.items()}
    scales = blocks.BlockScales(jnp.full((rows, 1), 127, jnp.uint8), jnp.float32(1.0))

    @jax.jit
    def cast_all(xs):
        out = {}
        for element, v in xs.items():
            codes, _ = blocks.block_quantize(v, BlockFormat(element), scales=scales)
            out[element] = (codes, blocks.block_dequantize(codes, scales, BlockFormat(element)))
        return out

    for element, (codes, values) in cast_all(padded).items():
        ref = _ref_element_codes(padded[element], element)
        np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), ref.view(np.uint8),
                                      err_msg=element)
        expected = ref.astype(np.float32) / (64 if element == "int8" else 1)
        np.testing.assert_array_equal(np.asarray(values).view(np.uint32), expected.view(np.uint32),
                                      err_msg=element)


def test_e8m0_scale_bytes_decode_as_ml_dtypes_float8_e8m0fnu():
    """Byte b scales by ml_dtypes' float8_e8m0fnu value of b (2**(b - 127), 255 NaN); byte 0's
    2**-127, a float32 subnormal, is applied exactly to elements that keep the product normal."""
    fmt = qatjax.mxfp4
    bytes_ = np.arange(256, dtype=np.uint8)
    codes = jnp.full((256, 32), 6, jnp.uint8)  # e2m1 bit pattern 0b0110: the value 4
    out = np.asarray(jax.jit(blocks.block_dequantize, static_argnums=2)(
        codes, blocks.BlockScales(jnp.asarray(bytes_[:, None]), jnp.float32(1)), fmt))
    scale = bytes_.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    with np.errstate(over="ignore"):  # 4 * 2**127 is float32's infinity, as in the product
        np.testing.assert_array_equal(out[:, 0], (4 * scale).astype(np.float32))
    assert np.isnan(out[255]).all()


# ----------------------------------------------------------------------------- block scales


def _threshold_blocks(element):
    """Blocks whose largest values sit on and around every rounding boundary: the max, the
    max plus half a grid step (the tie), a step, and the next power of two, at two scales."""
    _, top = _grid(element)
    emax = EMAX[element]
    step = 2.0 ** (emax - _nmant(element))
    amaxes = []
    for k in (-3, 5):
        for a in (top, top + step / 2, top + step, 2.0 ** (emax + 1), 2.0**emax):
            for d in (-1, 0, 1):
                amaxes.append(np.nextafter(np.float32(a * 2.0**k), np.float32(np.inf * d))
                              if d else np.float32(a * 2.0**k))
    x = np.full((len(amaxes), 32), 0.1, np.float32)
    x[:, 7] = -np.asarray(amaxes, np.float32)
    return x


@pytest.mark.parametrize("element", sorted(EMAX))
def test_mx_scales_and_values_match_the_float64_reference(element):
    """Random data with outliers, an all-zero block, a ragged last block (70 = 2 * 32 + 6),
    NaN and infinity blocks, and amaxes on every rounding boundary: for each rounding option
    the E8M0 bytes, fake-quant values and dequantized codes equal the float64 implementation
    of the OCP text, bit for bit."""
    x = _data((6, 70), seed=len(element))
    x[1, 32:64] = 0.0  # an all-zero block
    x[2, 3] = np.nan
    x[3, 40] = -np.inf
    x = np.concatenate([x, np.pad(_threshold_blocks(element), ((0, 0), (0, 38)))], axis=0)
    fmts = [BlockFormat(element, scale_rounding=r) for r in ROUNDINGS]
    results = jax.jit(lambda v: [_ops(f.name).__wrapped__(v) for f in fmts])(x)
    for rounding, (scales, fake, dequantized) in zip(ROUNDINGS, results):
        ref_values, ref_codes = _ref_mx_fake_quant(x, element, 32, rounding)
        np.testing.assert_array_equal(np.asarray(scales.scale), ref_codes, err_msg=rounding)
        assert float(scales.tensor_scale) == 1.0
        np.testing.assert_array_equal(np.asarray(fake), ref_values, err_msg=rounding)
        np.testing.assert_array_equal(np.asarray(dequantized), ref_values, err_msg=rounding)
        got = np.asarray(fake)
        assert np.isnan(got[2, :32]).all() and np.isnan(got[3, 32:64]).all()
        assert (got[1, 32:64] == 0).all() and np.isfinite(got[2, 32:]).all()


def test_rounding_options_differ_as_documented():
    """On E2M1 (max 6 = 1.5 * 4): a block max of 6.5 saturates to 6 under floor, takes the next
    exponent under ceil and not under round_up_on_saturation (6.5 rounds to 6); 7 does under
    both (the tie rounds up: 6's mantissa is odd). On E4M3 (max 448) round_up_on_saturation
    rounds up from 464 on (torchao's EVEN from 496)."""
    def byte(element, rounding, amax):
        x = np.zeros((1, 32), np.float32)
        x[0, 0] = amax
        return int(_scales(x, BlockFormat(element, scale_rounding=rounding)).scale[0, 0])
    assert [byte("e2m1", r, 6.5) for r in ROUNDINGS] == [127, 128, 127]
    assert [byte("e2m1", r, 7.0) for r in ROUNDINGS] == [127, 128, 128]
    assert [byte("e2m1", r, 6.0) for r in ROUNDINGS] == [127, 127, 127]
    assert [byte("e4m3", r, 464.0) for r in ROUNDINGS] == [127, 128, 127]
    assert [byte("e4m3", r, 465.0) for r in ROUNDINGS] == [127, 128, 128]


def test_block_axis_is_the_callers():
    """Blocks along axis 0 or 1 (ragged both ways): the scales keep ``x``'s layout with the
    block axis shortened to ceil(n / 32), values as the reference along that axis."""
    x = _data((45, 38), seed=3)
    fmt = qatjax.mxfp8_e4m3
    out = jax.jit(lambda v: [(blocks.block_fake_quant(v, fmt, axis=a),
                              blocks.block_scales(v, fmt, axis=a)) for a in (0, 1)])(x)
    for axis, (got, scales) in enumerate(out):
        ref, codes = _ref_mx_fake_quant(x, "e4m3", 32, "floor", axis=axis)
        np.testing.assert_array_equal(np.asarray(got), ref)
        assert scales.scale.shape == ((2, 38) if axis == 0 else (45, 2))
        np.testing.assert_array_equal(np.asarray(scales.scale), codes)


def test_nvfp4_matches_the_float64_reference():
    """Two-level NVFP4: per-tensor float32 g, E4M3 block scales, E2M1 elements, a ragged last
    block, an all-zero block; NaN anywhere makes the whole tensor NaN (the per-tensor scale);
    an all-zero tensor stays zero."""
    x = _data((5, 40), seed=7)
    x[2, 16:32] = 0.0
    ref, s_b, g = _ref_nvfp4(x)
    scales, fake, dequantized = _ops("nvfp4")(x)
    assert scales.scale.dtype == jnp.float8_e4m3fn and scales.scale.shape == (5, 3)
    np.testing.assert_array_equal(np.asarray(scales.scale).view(np.uint8), s_b.view(np.uint8))
    assert np.float32(scales.tensor_scale) == g
    np.testing.assert_array_equal(np.asarray(fake), ref)
    np.testing.assert_array_equal(np.asarray(dequantized), ref)
    x[0, 0] = np.nan
    assert np.isnan(np.asarray(_ops("nvfp4")(x)[1])).all()
    assert (np.asarray(_ops("nvfp4")(np.zeros_like(x))[1]) == 0).all()


@pytest.mark.parametrize("name", ["mxfp4_mse", "nvfp4_mse"])
def test_mse_search_picks_the_best_of_the_three_candidates(name):
    """Each block's scale is the rule's or a neighbour code, and its squared error (float64
    recomputation) is the smallest of the three; it never does worse than the rule."""
    fmt = format_from_name(name)
    rule = BlockFormat(fmt.element, fmt.block_size, fmt.scale_format, fmt.scale_rounding)
    x = _data((8, 64), seed=11)
    e4m3 = fmt.scale_format == "e4m3"
    as_int = lambda s: (np.asarray(s).view(np.uint8) if e4m3 else np.asarray(s)).astype(np.int64)  # noqa: E731
    as_scale = lambda c: (c.astype(np.uint8).view(ml_dtypes.float8_e4m3fn) if e4m3  # noqa: E731
                          else c.astype(np.uint8))

    chosen, base = _scales(x, fmt), _scales(x, rule)
    delta = as_int(chosen.scale) - as_int(base.scale)
    assert set(np.unique(delta)) <= {-1, 0, 1} and (delta != 0).any()  # the search moved some
    fq = jax.jit(lambda v, scales: blocks.block_fake_quant(v, fmt, scales=scales))

    def sse(scales):
        x_hat = np.asarray(fq(x, scales), np.float64)
        return ((x_hat - x) ** 2).reshape(8, -1, fmt.block_size).sum(-1)

    best = sse(chosen)
    for d in (-1, 1):
        codes = np.clip(as_int(base.scale) + d, 0, 0x7E if e4m3 else 254)  # valid, finite codes
        other = blocks.BlockScales(jnp.asarray(as_scale(codes)), chosen.tensor_scale)
        assert (best <= sse(other) * (1 + 1e-6)).all()
    assert (best <= sse(base) * (1 + 1e-6)).all()


# ----------------------------------------------------------------------------- STE, errors


@pytest.mark.parametrize("ste", ["clipped", "identity"])
def test_straight_through_estimators(ste):
    """d x_hat / d x is 1 where |v / scale| <= max (clipped; everywhere for identity), 0 where an
    element saturated (the floor rule saturates a block max above max * X); bfloat16 in and out."""
    fmt = qatjax.mxfp4
    x = _data((4, 64), seed=5, outliers=False)
    x[0, 0] = 7.5  # block max 7.5: X = 1, 7.5 > 6 saturates
    grad = jax.jit(jax.grad(lambda v: jnp.sum(blocks.block_fake_quant(v, fmt, ste=ste))))(x)
    codes = _ref_mx_fake_quant(x, "e2m1", 32, "floor")[1]
    scale = np.repeat(2.0 ** (codes.astype(np.float64) - 127), 32, axis=-1)
    expected = (np.abs(x / scale) <= 6.0) if ste == "clipped" else np.ones_like(x, bool)
    np.testing.assert_array_equal(np.asarray(grad), expected.astype(np.float32))
    assert ste == "identity" or not expected[0, 0]
    assert jax.eval_shape(lambda v: blocks.block_fake_quant(v, fmt), jnp.asarray(x, jnp.bfloat16)
                          ).dtype == jnp.bfloat16


def test_format_names_and_constants():
    for fmt in (qatjax.mxfp8_e4m3, qatjax.mxfp8_e5m2, qatjax.mxfp6_e2m3, qatjax.mxfp6_e3m2,
                qatjax.mxfp4, qatjax.mxint8, qatjax.nvfp4, BlockFormat("e2m1", 16, "e8m0", "ceil", True)):
        assert format_from_name(fmt.name) == fmt and as_format(fmt.name) == fmt
    assert qatjax.mxfp4.block_size == 32 and qatjax.nvfp4.block_size == 16
    assert (qatjax.mxfp4.max, qatjax.mxfp8_e4m3.max, qatjax.mxint8.max) == (6.0, 448.0, 127 / 64)
    assert format_from_name("mxfp4_b16_ceil_mse") == BlockFormat("e2m1", 16, "e8m0", "ceil", True)


def test_errors_are_clear():
    x = jnp.ones((2, 32))
    with pytest.raises(ValueError, match="block format"):
        qatjax.fake_quant(x, qatjax.QParams(jnp.float32(1), jnp.int32(0)), qatjax.mxfp4)
    with pytest.raises(ValueError, match="must be a block format"):
        blocks.block_fake_quant(x, qatjax.int8)
    with pytest.raises(ValueError, match="`ste`"):
        blocks.block_fake_quant(x, qatjax.mxfp4, ste="lsq")
    with pytest.raises(ValueError, match=r"need \(2, 1\)"):
        blocks.block_quantize(x, qatjax.mxfp4, scales=blocks.BlockScales(jnp.zeros((2, 2), jnp.uint8), 1.0))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        blocks.block_quantize(x, qatjax.nvfp4, scales=blocks.BlockScales(jnp.zeros((2, 2), jnp.uint8), 1.0))
    with pytest.raises(ValueError, match="`axis`"):
        blocks.block_scales(x, qatjax.mxfp4, axis=2)
    with pytest.raises(ValueError, match="`scale_rounding`"):
        BlockFormat("e2m1", scale_rounding="up")
    with pytest.raises(ValueError, match="E4M3 block scale"):
        BlockFormat("e4m3", scale_format="e4m3")
    with pytest.raises(ValueError, match="unknown format name"):
        format_from_name("mxfp5")


def test_fp4_codes_pack_two_per_byte():
    """E2M1 codes are unsigned 4-bit patterns: pack_nibbles / unpack_nibbles(signed=False) keep
    them, and the unpacked codes dequantize to the reference values."""
    x = _data((3, 45), seed=2)
    fmt = qatjax.mxfp4

    @jax.jit
    def round_trip(v):
        codes, scales = blocks.block_quantize(v, fmt)
        packed = pack_nibbles(codes)
        unpacked = unpack_nibbles(packed, 45, signed=fmt.signed)
        return codes, packed, unpacked, blocks.block_dequantize(unpacked, scales, fmt)

    codes, packed, unpacked, values = round_trip(x)
    assert packed.shape == (3, 23) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(unpacked), np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(values), _ref_mx_fake_quant(x, "e2m1", 32, "floor")[0])
