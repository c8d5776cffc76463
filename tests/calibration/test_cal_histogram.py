"""The aligned histogram observer: binning, range growth, exact merges, saturation."""

import functools
import operator

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from calib_reference import ref_abs_counts, ref_exponent, ref_signed_counts
from hypothesis import given, settings
from hypothesis import strategies as st

import qatjax.calibration.aligned_histogram as ah
from qatjax import calibration as cal

NB = 64  # small histograms keep the exactness tests fast; the algorithm is size-independent


def observe(obs, *batches):
    state = obs.init(batches[0])
    for b in batches:
        state = obs.update(state, b)
    return state


def assert_same_state(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dist", ["gaussian", "uniform", "laplace_outliers", "relu", "tiny", "huge"])
def test_counts_match_reference_binning(signed, dist):
    rng = np.random.default_rng(1)
    x = {
        "gaussian": rng.standard_normal(5000),
        "uniform": rng.uniform(-3, 7, 5000),
        "laplace_outliers": np.concatenate([rng.laplace(size=5000), [80.0, -300.0]]),
        "relu": np.maximum(rng.standard_normal(5000), 0),
        "tiny": rng.standard_normal(5000) * 1e-20,
        "huge": rng.standard_normal(5000) * 1e37,
    }[dist].astype(np.float32)
    obs = cal.histogram(NB, signed=signed)
    s = observe(obs, x)
    e = ref_exponent(x)
    assert int(s.exponent) == e
    ref = (ref_signed_counts if signed else ref_abs_counts)(x, NB, e)
    np.testing.assert_array_equal(np.asarray(s.counts), ref)
    v = x if signed else np.abs(x)
    assert float(s.lo) == v.min() and float(s.hi) == v.max()
    assert int(s.num_nonfinite) == 0


def test_edges_are_right_closed_and_range_covers_max():
    obs = cal.histogram(8)
    # max = 1.0 -> R = 1 (a power of two equal to the max), w = 1/8
    x = np.array([0.0, 0.125, 0.13, 0.25, 0.999, 1.0], np.float32)
    s = observe(obs, x)
    assert int(s.exponent) == 0
    # 0 and 0.125 (= w) in bin 0; 0.13 in bin 1; 0.25 (= 2w) in bin 1; 0.999, 1.0 = R in the last bin
    np.testing.assert_array_equal(np.asarray(s.counts), [2, 2, 0, 0, 0, 0, 0, 2])
    # just above a power of two doubles the range
    s2 = observe(obs, np.array([1.0000001], np.float32))
    assert int(s2.exponent) == 1
    np.testing.assert_array_equal(np.asarray(s.edges())[[0, 1, 8]], [0.0, 0.125, 1.0])


def test_signed_layout_mirrors_and_zero_signs_share_a_bin():
    obs = cal.histogram(8, signed=True)
    x = np.array([-1.0, -0.5, -0.25, -0.0, 0.0, 0.25, 1.0], np.float32)
    s = observe(obs, x)
    assert int(s.exponent) == 0  # R = 1, 4 bins per side of width 1/4
    # [-1,-3/4) [-3/4,-1/2) [-1/2,-1/4) [-1/4,0) | [0,1/4] (1/4,1/2] (1/2,3/4] (3/4,1]
    np.testing.assert_array_equal(np.asarray(s.counts), [1, 0, 1, 1, 3, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(s.edges()), np.linspace(-1, 1, 9))
    folded = s.folded()
    np.testing.assert_array_equal(np.asarray(folded.counts), ref_abs_counts(x, 4, 0))
    assert float(folded.hi) == 1.0 and float(folded.lo) == 0.0


@settings(max_examples=30, deadline=None)
@given(
    data=hnp.arrays(
        np.float32,
        48,
        elements=st.one_of(
            st.floats(-1e4, 1e4, width=32),
            st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 4.0, 2.0**-20, 2.0**10, 3.0, -1e-40]),
        ),
    ),
    split=st.integers(1, 47),
    signed=st.booleans(),
)
def test_property_any_split_and_order_gives_the_same_histogram(data, split, signed):
    """Exact pair merging: two batches (range growing in between or not) equal one batch,
    in either order, and equal the reference binning at the final range."""
    obs = cal.histogram(NB, signed=signed)
    update = _jit_update(NB, signed)
    s0 = obs.init()
    whole = update(s0, data)
    a, b = data[:split], data[split:]
    pad_a = np.concatenate([a, np.full(48 - a.size, np.nan, np.float32)])
    pad_b = np.concatenate([b, np.full(48 - b.size, np.nan, np.float32)])
    ab = update(update(s0, pad_a), pad_b)
    ba = update(update(s0, pad_b), pad_a)
    np.testing.assert_array_equal(np.asarray(ab.counts), np.asarray(whole.counts))
    np.testing.assert_array_equal(np.asarray(ba.counts), np.asarray(whole.counts))
    assert int(ab.exponent) == int(ba.exponent) == int(whole.exponent) == ref_exponent(data)
    assert int(ab.num_nonfinite) == 48  # the NaN padding, counted not binned
    ref = (ref_signed_counts if signed else ref_abs_counts)(data, NB, ref_exponent(data))
    np.testing.assert_array_equal(np.asarray(whole.counts), ref)


@functools.cache
def _jit_update(nb, signed):
    return jax.jit(cal.histogram(nb, signed=signed).update)


@pytest.mark.parametrize("signed", [False, True])
def test_growth_by_many_doublings_keeps_every_count(signed):
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal(300).astype(np.float32) * 10.0**k for k in (-3, 0, 2, 5)]
    obs = cal.histogram(NB, signed=signed)
    s = observe(obs, *batches)
    allx = np.concatenate(batches)
    e = ref_exponent(allx)
    ref = (ref_signed_counts if signed else ref_abs_counts)(allx, NB, e)
    np.testing.assert_array_equal(np.asarray(s.counts), ref)
    assert int(np.asarray(s.counts).sum()) == allx.size
    # reversed order: identical
    assert_same_state(observe(obs, *batches[::-1]), s)


def test_nonfinite_values_are_counted_and_skipped():
    obs = cal.histogram(NB)
    x = np.array([1.0, np.nan, -np.inf, 2.0, np.inf, -3.0], np.float32)
    s = observe(obs, x)
    assert int(s.num_nonfinite) == 3
    assert int(np.asarray(s.counts).sum()) == 3
    assert float(s.hi) == 3.0 and float(s.lo) == 1.0
    # a batch of only non-finite values changes nothing but the count
    s2 = obs.update(s, np.array([np.nan, np.inf], np.float32))
    np.testing.assert_array_equal(np.asarray(s2.counts), np.asarray(s.counts))
    assert int(s2.exponent) == int(s.exponent) and int(s2.num_nonfinite) == 5


def test_empty_update_is_a_noop():
    obs = cal.histogram(NB, signed=True)
    s = observe(obs, np.array([0.5, -2.0], np.float32))
    assert_same_state(obs.update(s, np.zeros((0,), np.float32)), s)
    assert_same_state(obs.update(s, np.zeros((3, 0), np.float32)), s)


def test_fixed_shapes_and_dtypes_whatever_the_data():
    obs = cal.histogram(2048, signed=True)
    s0 = obs.init()
    s1 = obs.update(s0, np.float32([1e30, -1e-30, 0.0]))
    for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(s1)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert s1.counts.dtype == jnp.int32 and s1.counts.shape == (2048,)


def test_extreme_magnitudes():
    obs = cal.histogram(NB)
    big = np.float32(np.finfo(np.float32).max)
    s = observe(obs, np.array([big, 1.0, 0.0], np.float32))
    assert int(s.exponent) == 128
    assert int(np.asarray(s.counts)[-1]) == 1 and int(np.asarray(s.counts)[0]) == 2
    tiny = np.array([1e-45, 2e-38, 0.0], np.float32)  # subnormal, normal, zero
    s = observe(obs, tiny)
    assert int(s.exponent) == ah.EXPONENT_MIN
    assert int(np.asarray(s.counts)[0]) == 3
    # signed: a negative subnormal counts as zero (positive side), a negative normal does not
    s = observe(cal.histogram(8, signed=True), np.array([-1e-40, -2e-38], np.float32))
    np.testing.assert_array_equal(np.asarray(s.counts), [0, 0, 0, 1, 1, 0, 0, 0])


def test_counts_saturate_instead_of_wrapping():
    cmax = ah.COUNT_MAX
    counts = jnp.asarray([cmax - 1, cmax - 1, 5, 0, 0, 0, 0, 0], jnp.int32)
    np.testing.assert_array_equal(np.asarray(ah.saturating_add(counts, counts)), [cmax, cmax, 10, 0, 0, 0, 0, 0])
    # a doubling merges bins 0 and 1: saturates
    np.testing.assert_array_equal(np.asarray(ah.rescale_counts(counts, 1, False)), [cmax, 5, 0, 0, 0, 0, 0, 0])
    s = cal.HistogramState(counts, jnp.int32(0), jnp.float32(0.1), jnp.float32(1.0), jnp.int32(cmax))
    s = cal.histogram(8).update(s, np.float32([0.01, 0.01, np.nan]))
    assert int(s.counts[0]) == cmax and int(s.num_nonfinite) == cmax


def test_batch_size_limit_is_checked_at_trace_time():
    obs = cal.histogram(NB)
    big = jax.ShapeDtypeStruct((2**31,), jnp.float32)
    with pytest.raises(ValueError, match="`x` has 2147483648 elements"):
        jax.eval_shape(obs.update, obs.init(), big)


@pytest.mark.parametrize("keep_axes", [0, -1, (0, 2)])
def test_per_channel_equals_vmap_and_a_loop_over_channels(keep_axes):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 5, 4)) * np.arange(1, 5)).astype(np.float32)
    x[1, 2, 3] = np.nan
    obs = cal.histogram(NB, keep_axes=keep_axes)
    s = observe(obs, x, 2 * x)
    axes = (keep_axes,) if isinstance(keep_axes, int) else keep_axes
    axes = tuple(a % 3 for a in axes)
    expected_shape = tuple(n if a in axes else 1 for a, n in enumerate(x.shape))
    assert s.exponent.shape == expected_shape and s.counts.shape == expected_shape + (NB,)
    per_tensor = cal.histogram(NB)
    for idx in np.ndindex(*expected_shape):
        sl = tuple(slice(None) if n == 1 else i for i, n in zip(idx, expected_shape))
        ref = observe(per_tensor, x[sl].reshape(-1), (2 * x)[sl].reshape(-1))
        assert_same_state(jax.tree_util.tree_map(operator.itemgetter(idx), s), ref)
    if keep_axes == 0:  # the same through vmap of the per-tensor observer
        vs = jax.vmap(per_tensor.init)(x)
        vs = jax.vmap(per_tensor.update)(vs, x)
        vs = jax.vmap(per_tensor.update)(vs, 2 * x)
        assert_same_state(jax.tree_util.tree_map(lambda leaf: leaf.reshape((3,) + leaf.shape[3:]), s), vs)


def test_per_channel_shape_mismatch_names_x():
    obs = cal.histogram(NB, keep_axes=1)
    s = obs.init(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="`x` of shape"):
        obs.update(s, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="need `x_like`"):
        obs.init()


def test_lax_scan_and_jit():
    obs = cal.histogram(NB, signed=True)
    xs = np.random.default_rng(4).standard_normal((6, 100)).astype(np.float32) * np.logspace(-2, 3, 6)[:, None]

    @jax.jit
    def run(xs):
        return jax.lax.scan(lambda s, x: (obs.update(s, x), None), obs.init(), xs)[0]

    assert_same_state(run(xs), observe(obs, *xs))


def test_state_lives_in_flax_variables():
    obs = cal.histogram(NB)

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x):
            stats = self.variable("quant_stats", "hist", obs.init, x)
            stats.value = obs.update(stats.value, x)
            return x

    rng = np.random.default_rng(5)
    batches = [rng.standard_normal(200).astype(np.float32) for _ in range(3)]
    # Flax's init already runs one update; the collection holds the state pytree
    initialised = Probe().init(jax.random.PRNGKey(0), batches[0])
    assert_same_state(initialised["quant_stats"]["hist"], observe(obs, batches[0]))
    variables = {"quant_stats": {"hist": obs.init()}}
    apply = jax.jit(lambda v, x: Probe().apply(v, x, mutable=["quant_stats"])[1])
    for b in batches:
        variables = apply(variables, b)
    assert_same_state(variables["quant_stats"]["hist"], observe(obs, *batches))


def test_integer_and_bfloat16_inputs():
    obs = cal.histogram(NB, signed=True)
    xi = np.array([-3, 0, 7, 2], np.int32)
    assert_same_state(observe(obs, xi), observe(obs, xi.astype(np.float32)))
    xb = jnp.asarray([0.1, -2.5, 3.0], jnp.bfloat16)
    assert_same_state(observe(obs, xb), observe(obs, np.asarray(xb.astype(jnp.float32))))
    with pytest.raises(TypeError, match="`x` must be a real"):
        obs.update(obs.init(), jnp.asarray([1 + 2j]))


@pytest.mark.parametrize("bad", [0, 100, 2**16, 4, True, 2048.0])
def test_bad_num_bins(bad):
    with pytest.raises(ValueError, match="`num_bins`"):
        cal.histogram(bad)


def test_wrong_state_is_rejected():
    obs = cal.histogram(NB)
    with pytest.raises(TypeError, match="`state` must be a HistogramState"):
        obs.update(cal.minmax().init(), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="`state` has num_bins=128"):
        obs.update(cal.histogram(128).init(), np.ones(3, np.float32))
