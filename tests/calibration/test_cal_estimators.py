"""Estimators against independent numpy references (NVIDIA's algorithms as literal loops)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from calib_reference import (
    entropy_divergences,
    fp8_levels,
    last_argmin,
    mse_sym_errors,
    ref_fake_quant_fp8,
    ref_fake_quant_int,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import qatjax
from qatjax import calibration as cal
from qatjax.calibration import estimators as est

INT_FORMATS = [qatjax.IntFormat(b, s) for b in range(2, 9) for s in (True, False)]
ALL_FORMATS = INT_FORMATS + [qatjax.fp8_e4m3, qatjax.fp8_e5m2]
FMT_IDS = [f.name for f in ALL_FORMATS]


def make_data(dist, size=20000, seed=0):
    rng = np.random.default_rng(seed)
    if dist == "gaussian":
        x = rng.standard_normal(size)
    elif dist == "uniform":
        x = rng.uniform(-2.0, 3.0, size)
    elif dist == "laplace_outliers":
        x = rng.laplace(size=size)
        x[: size // 500] *= 25.0  # 0.2% outliers far in the tails
    elif dist == "laplace":
        x = rng.laplace(size=size)
    elif dist == "student_t3":
        x = rng.standard_t(3, size)
    elif dist == "relu":
        x = np.maximum(rng.standard_normal(size), 0.0)  # half the mass exactly at 0
    elif dist == "one_huge_outlier":
        x = rng.standard_normal(size)
        x[7] = 1e4
    else:
        raise ValueError(dist)
    return x.astype(np.float32)


@functools.cache
def observed(dist, num_bins=2048, signed=False):
    obs = cal.histogram(num_bins, signed=signed)
    return obs.update(obs.init(), make_data(dist))


@functools.cache
def nvidia_kl(dist, num_bins, nq, start_bin, fp8=None):
    counts = np.asarray(observed(dist, num_bins).counts)
    levels_fn = None
    if fp8 is not None:
        fmax = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn if fp8 == "e4m3" else ml_dtypes.float8_e5m2).max)
        levels_fn = lambda i: fp8_levels(i, fmax, fp8)
    return entropy_divergences(counts, nq, start_bin, levels_fn)


def amax_of(qp, fmt):
    qmax = fmt.max if fmt.is_float else fmt.qmax
    return np.asarray(qp.scale, np.float64) * qmax


# ----------------------------------------------------------------------------- entropy


def check_kl(ours, ref):
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-5, atol=2e-6)
    # the chosen candidate (largest argmin) is the reference's, up to float32 near-ties
    assert ref[last_argmin(ours)] <= ref.min() + 2e-6


@pytest.mark.parametrize("dist", ["gaussian"])
def test_entropy_kl_matches_nvidia_loop_2048_bins_int8(dist):
    counts = observed(dist).counts
    ref = nvidia_kl(dist, 2048, 128, 128)
    check_kl(cal.entropy_kl(counts, qatjax.int8), ref)
    # the estimator: amax = edge of the largest argmin, clipped to max|x|
    st_ = observed(dist)
    amax = amax_of(est.entropy(st_, qatjax.int8), qatjax.int8)
    i_ref = 128 + last_argmin(ref)
    expected = min(i_ref * float(st_.bin_width()), float(st_.hi))
    assert amax == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=[f.name for f in INT_FORMATS])
def test_entropy_kl_matches_nvidia_loop_every_int_format(fmt):
    nq = 2 ** (fmt.bits - 1 + (not fmt.signed))
    assert cal.num_levels(fmt) == nq
    for dist in ("laplace_outliers", "relu"):
        counts = observed(dist, 256).counts
        check_kl(cal.entropy_kl(counts, fmt, start_bin=16), nvidia_kl(dist, 256, nq, 16))


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_entropy_kl_fp8_levels_follow_the_fp8_grid(variant):
    fmt = qatjax.FloatFormat(variant)
    counts = observed("laplace_outliers", 256).counts
    check_kl(cal.entropy_kl(counts, fmt, start_bin=16), nvidia_kl("laplace_outliers", 256, 128, 16, variant))


def test_entropy_kl_does_not_modify_its_input():
    counts = np.asarray(observed("relu", 256).counts).copy()
    before = counts.copy()
    assert counts[0] != counts[1]
    cal.entropy_kl(counts, qatjax.int8, start_bin=16)
    np.testing.assert_array_equal(counts, before)


def test_entropy_ties_go_to_the_largest_threshold():
    kl = jnp.asarray([0.5, 0.1, 0.3, 0.1, 0.1, 0.2, jnp.inf], jnp.float32)
    amax = est._amax_from_kl(kl, 10, jnp.float32(0.5), jnp.float32(1e9))
    assert float(amax) == (10 + 4) * 0.5
    # uint8: 256 levels, data below the first candidate: KL is exactly 0 for every i <= 256
    # (each bin its own level) and for a few more (only empty or equal bins merged)
    counts = np.zeros(512, np.int64)
    counts[:100] = np.arange(1, 101)
    kl = np.asarray(cal.entropy_kl(counts, qatjax.uint8, start_bin=128))
    ref = entropy_divergences(counts, 256, 128)
    np.testing.assert_array_equal(kl == 0, ref == 0)
    assert np.all(kl[: 256 - 128 + 1] == 0.0) and kl.max() > 0
    assert last_argmin(kl) == last_argmin(ref) == np.flatnonzero(ref == 0).max() > 256 - 128


def test_entropy_outliers_into_an_empty_last_bin_give_inf():
    counts = np.zeros(64, np.int64)
    counts[:10] = 50
    counts[40] = 3  # outlier: candidates 11..40 fold it into an empty bin
    kl = np.asarray(cal.entropy_kl(counts, qatjax.int4, start_bin=8))
    ref = entropy_divergences(counts, 8, 8)
    check_kl(kl, ref)
    assert np.isinf(kl[11 - 8 + 1: 40 - 8]).all()


# ----------------------------------------------------------------------------- percentile


@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace_outliers", "relu", "one_huge_outlier"])
def test_percentile_within_one_bin_of_numpy(dist):
    x = make_data(dist)
    s = observed(dist)
    w = float(s.bin_width())
    for p in (50.0, 90.0, 99.0, 99.9, 99.99, 100.0):
        amax = amax_of(est.percentile(s, qatjax.int8, p), qatjax.int8)
        assert abs(amax - np.percentile(np.abs(x), p)) <= w * (1 + 1e-6), p
    assert amax_of(est.percentile(s, qatjax.int8, 100.0), qatjax.int8) == pytest.approx(np.abs(x).max())


@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace_outliers"])
def test_affine_percentile_cuts_both_tails(dist):
    x = make_data(dist)
    s = observed(dist, signed=True)
    w = float(s.bin_width())
    fmt = qatjax.uint8
    for p in (90.0, 99.0):  # tails dense enough that order statistics are < 1 bin apart
        cut = (100.0 - p) / 2
        lo, hi = np.percentile(x, cut), np.percentile(x, 100 - cut)
        qp = est.percentile(s, fmt, p, symmetric=False)
        ref = qatjax.qparams_from_minmax(lo, hi, fmt, symmetric=False)
        # scale within the error of the two quantiles (one bin each)
        assert abs(float(qp.scale) - float(ref.scale)) <= 2 * w / (fmt.qmax - fmt.qmin) * (1 + 1e-5)
        assert abs(int(qp.zero_point) - int(ref.zero_point)) <= 1


@settings(max_examples=20, deadline=None)
@given(p=st.floats(0.0, 100.0), seed=st.integers(0, 3))
def test_property_percentile_is_monotone_and_bounded(p, seed):
    dist = ["gaussian", "uniform", "laplace_outliers", "relu"][seed]
    x = make_data(dist)
    s = observed(dist)
    a = float(_percentile_amax(s, p))  # scale * qmax: float32 rounding of the scale
    assert np.abs(x).min() * (1 - 1e-6) <= a <= np.abs(x).max() * (1 + 1e-6)
    assert a <= float(_percentile_amax(s, min(100.0, p + 1.0))) * (1 + 1e-6)
    if p <= 99.5:  # dense region: sorted values closer than a bin
        assert abs(a - np.percentile(np.abs(x), p)) <= float(s.bin_width()) * (1 + 1e-6)


def _percentile_amax(s, p):
    return amax_of(est.percentile(s, qatjax.int8, p), qatjax.int8)


# ----------------------------------------------------------------------------- mse


def _ref_fq(fmt):
    if fmt.is_float:
        variant = fmt.variant
        return lambda c, amax: ref_fake_quant_fp8(c, max(amax / fmt.max, np.finfo(np.float32).eps), variant)
    return lambda c, amax: ref_fake_quant_int(
        c, max(np.float32(amax) / np.float32(fmt.qmax), np.finfo(np.float32).eps), 0, fmt.qmin, fmt.qmax
    )


@pytest.mark.parametrize("fmt", [qatjax.int8, qatjax.uint8, qatjax.int4, qatjax.fp8_e4m3], ids=lambda f: f.name)
@pytest.mark.parametrize("dist", ["gaussian", "laplace_outliers"])
def test_mse_matches_reference_loop(fmt, dist):
    s = observed(dist)
    counts = np.asarray(s.counts)
    cands, errs = mse_sym_errors(counts, float(s.bin_width()), 128, _ref_fq(fmt))
    amax = amax_of(est.mse(s, fmt), fmt)
    k = int(np.argmin(np.abs(cands - amax)))
    assert cands[k] == pytest.approx(amax, rel=1e-6)  # one of NVIDIA's candidates (bin centers)
    assert errs[k] <= errs.min() * (1 + 1e-5)  # the minimiser, up to float32 near-ties


# ----------------------------------------------------------------------------- behaviour


def data_mse(x, qp, fmt):
    return float(jnp.mean((qatjax.fake_quant(jnp.asarray(x), qp, fmt) - x) ** 2))


@pytest.mark.parametrize("dist", ["laplace", "student_t3"])
def test_heavy_tails_clip_and_lower_the_error(dist):
    x = make_data(dist)
    s = observed(dist)
    methods = (("entropy", {}), ("percentile", {"p": 99.9}), ("mse", {}))
    for fmt in (qatjax.int4, qatjax.int8):
        ref = est.minmax(s, fmt)
        err = {"minmax": data_mse(x, ref, fmt)}
        for method, kw in methods:
            qp = cal.estimate(s, fmt, method, **kw)
            assert float(qp.scale) < float(ref.scale), (fmt, method)
            err[method] = data_mse(x, qp, fmt)
        if fmt == qatjax.int4:  # coarse grid: every clipping method beats the full range
            assert max(err["entropy"], err["percentile"], err["mse"]) < err["minmax"], err
        else:  # int8: rounding is cheap; KL / percentile thresholds clip more than is
            # MSE-optimal, the MSE search still beats the full range
            assert err["mse"] < err["minmax"] and err["mse"] <= min(err.values()), err


def test_one_huge_outlier():
    x = make_data("one_huge_outlier")  # N(0, 1) and a single 1e4
    bulk = np.delete(x, 7)
    s = observed("one_huge_outlier")
    for fmt in (qatjax.int8, qatjax.int4):
        full = est.minmax(s, fmt)
        assert amax_of(full, fmt) == pytest.approx(1e4)
        clipped = est.percentile(s, fmt, 99.9)
        # the bulk sits in bin 0 (width 8): the quantile is interpolated inside it
        assert amax_of(clipped, fmt) <= float(s.bin_width())
        assert data_mse(bulk, clipped, fmt) < data_mse(bulk, full, fmt) / 5
        # 2048 bins over [0, 16384] put all the Gaussian mass in bin 0, which NVIDIA's
        # algorithm overwrites with bin 1 (empty): entropy then only sees the outlier
        assert amax_of(est.entropy(s, fmt), fmt) == pytest.approx(1e4)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=FMT_IDS)
def test_every_format_gives_valid_parameters(fmt):
    x = make_data("laplace_outliers")
    for method in cal.METHODS:
        # fp8 is always symmetric; the affine path is bit-width generic: spot-check 2, 4, 8 bits
        affine = not fmt.is_float and fmt.bits in (2, 4, 8)
        for symmetric in (True, False) if affine else (True,):
            s = observed("laplace_outliers", 256, signed=not symmetric)
            qp = cal.estimate(s, fmt, method, symmetric=symmetric)
            scale = float(qp.scale)
            assert np.isfinite(scale) and scale > 0
            if fmt.is_float or symmetric:
                assert int(qp.zero_point) == 0
                # mse may pick a bin center above max|x| (never above the range R)
                top = 2.0 ** float(s.exponent) if method == "mse" else np.abs(x).max()
                assert 0 < amax_of(qp, fmt) <= top * (1 + 1e-6)
            else:
                assert fmt.qmin <= int(qp.zero_point) <= fmt.qmax
                assert scale <= (x.max() - x.min()) / (fmt.qmax - fmt.qmin) * (1 + 1e-6)


@pytest.mark.parametrize("method", list(cal.METHODS))
def test_constant_and_zero_tensors_get_a_valid_positive_scale(method):
    obs = cal.histogram(256)
    for value in (3.7, -0.25, 4.0, 0.0):
        s = obs.update(obs.init(), np.full(1000, value, np.float32))
        nonempty = np.flatnonzero(np.asarray(s.counts))
        assert len(nonempty) == 1  # all mass in one bin
        qp = cal.estimate(s, qatjax.int8, method)
        scale = float(qp.scale)
        assert scale > 0 and np.isfinite(scale)
        if value == 0.0:
            assert scale == qatjax.qparams.SCALE_EPS
        elif method in ("minmax", "entropy", "percentile"):
            assert amax_of(qp, qatjax.int8) == pytest.approx(abs(value), rel=1e-6)
        else:  # mse: the center of the value's bin
            assert abs(amax_of(qp, qatjax.int8) - abs(value)) <= float(s.bin_width())


def test_affine_entropy_on_relu_data_is_nvidia_unsigned():
    """With no negative values the positive half gets all 2**bits levels, like NVIDIA's
    unsigned calibration of the |x| histogram."""
    s = observed("relu", signed=True)
    affine = est.entropy(s, qatjax.uint8, symmetric=False)
    sym = est.entropy(s, qatjax.uint8, symmetric=True)
    assert int(affine.zero_point) == 0
    assert float(affine.scale) == float(sym.scale)


def test_minmax_estimator_on_every_state_kind():
    x = make_data("uniform")
    ref_sym = qatjax.qparams_from_amax(np.abs(x).max(), qatjax.int8)
    ref_aff = qatjax.qparams_from_minmax(x.min(), x.max(), qatjax.uint8, symmetric=False)
    for obs in (cal.minmax(), cal.moving_average_minmax(0.5), cal.histogram(64, signed=True)):
        s = obs.update(obs.init(), x)
        for qp, ref in ((est.minmax(s, qatjax.int8), ref_sym), (est.minmax(s, qatjax.uint8, symmetric=False), ref_aff)):
            np.testing.assert_array_equal(np.asarray(qp.scale), np.asarray(ref.scale))
            np.testing.assert_array_equal(np.asarray(qp.zero_point), np.asarray(ref.zero_point))


# ----------------------------------------------------------------------------- per channel


def test_per_channel_estimates_equal_a_loop_and_vmap():
    rng = np.random.default_rng(9)
    w = (rng.laplace(size=(4, 300)) * np.linspace(0.1, 10, 4)[:, None]).astype(np.float32)
    obs = cal.histogram(64, keep_axes=0)
    s = obs.update(obs.init(w), w)
    per_tensor = cal.histogram(64)
    vs = jax.vmap(per_tensor.update)(jax.vmap(per_tensor.init)(w), w)
    for method in ("percentile", "entropy"):  # vmapped rows / lax.mapped rows
        qp = cal.estimate(s, qatjax.int8, method)
        assert qp.scale.shape == (4, 1)
        loop = [
            float(cal.estimate(per_tensor.update(per_tensor.init(), w[c]), qatjax.int8, method).scale)
            for c in range(4)
        ]
        np.testing.assert_array_equal(np.asarray(qp.scale)[:, 0], loop)
        vq = jax.vmap(functools.partial(cal.estimate, fmt=qatjax.int8, method=method))(vs)
        np.testing.assert_array_equal(np.asarray(vq.scale), loop)
    # parameters broadcast against the weight
    assert qatjax.fake_quant(jnp.asarray(w), cal.estimate(s, qatjax.int8, "mse"), qatjax.int8).shape == w.shape


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", list(cal.METHODS))
def test_no_data_raises_when_concrete_and_falls_back_under_jit(method):
    obs = cal.histogram(64)
    empty = obs.update(obs.init(), np.array([np.nan, np.inf], np.float32))
    with pytest.raises(ValueError, match="`state` has not observed any finite value"):
        cal.estimate(empty, qatjax.int8, method)
    qp, ok = jax.jit(lambda s: (cal.estimate(s, qatjax.int8, method), cal.has_data(s)))(empty)
    assert float(qp.scale) == qatjax.qparams.SCALE_EPS and int(qp.zero_point) == 0
    assert not bool(ok)
    # per channel: names the empty channel
    pc = cal.histogram(64, keep_axes=0)
    x = np.array([[1.0, 2.0], [np.nan, np.nan]], np.float32)
    with pytest.raises(ValueError, match=r"channel indices \[\[1, 0\]\]"):
        cal.estimate(pc.update(pc.init(x), x), qatjax.int8, method)


def test_argument_errors_are_named():
    s = observed("gaussian", 256)
    with pytest.raises(ValueError, match="unknown `method` 'kl'"):
        cal.estimate(s, qatjax.int8, "kl")
    with pytest.raises(TypeError, match="unexpected keyword"):
        cal.estimate(s, qatjax.int8, "entropy", p=99.0)
    with pytest.raises(ValueError, match="`p` must be a number in \\[0, 100\\]"):
        cal.estimate(s, qatjax.int8, "percentile", p=101)
    with pytest.raises(ValueError, match="`start_bin` must be an int in \\[1, 256\\]"):
        cal.estimate(s, qatjax.int8, "entropy", start_bin=300)
    with pytest.raises(ValueError, match="histogram of \\|x\\|"):
        cal.estimate(s, qatjax.int8, "entropy", symmetric=False)
    with pytest.raises(TypeError, match="`state` must be a HistogramState"):
        cal.estimate(cal.minmax().init(), qatjax.int8, "percentile")
    with pytest.raises(TypeError, match="`fmt` must be a qatjax format"):
        cal.estimate(s, 8, "minmax")
    with pytest.raises(ValueError, match="`num_candidates`"):
        cal.estimate(s, qatjax.int8, "mse", num_candidates=0)
    # fp8 is always symmetric, so an |x| histogram is fine with symmetric=False
    assert int(cal.estimate(s, qatjax.fp8_e4m3, "entropy", symmetric=False).zero_point) == 0
