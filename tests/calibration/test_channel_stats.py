"""Per-input-channel statistics (SmoothQuant absmax, AWQ mean |x|, GPTQ Hessian) against
numpy, and their exactness: any batch order, merge and all-reduce over 8 devices give the
state of one observer, bit for bit."""

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qatjax import calibration as cal
from qatjax.calibration import channel_stats as cs

NDEV = 8
K = 6
OBSERVERS = {"absmax": cal.channel_absmax, "mean_abs": cal.channel_mean_abs, "hessian": cal.hessian}


def assert_same_state(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def replica(tree, d):
    return jax.tree_util.tree_map(lambda leaf: leaf[d], tree)


def device_batches(seed=0, batches=2, rows=(3, 5)):
    """``[NDEV, batches, 3, 5, K]``: magnitudes differ by orders of magnitude across devices
    and channels (so the exact sums' top bins differ), one NaN row and one infinite row."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-4, 4, (NDEV, 1, 1, 1, K))
    x = (rng.standard_normal((NDEV, batches) + rows + (K,)) * scale).astype(np.float32)
    x[2, 1, 0, 3, 4] = np.nan
    x[5, 0, 2, 1, 0] = -np.inf
    return x


def finite_rows(x):
    rows = np.asarray(x, np.float64).reshape(-1, K)
    return rows[np.all(np.isfinite(rows), axis=1)]


def sequential(obs, x):
    """One observer, every device's batches in turn."""
    s = obs.init(x[0, 0])
    for d in range(x.shape[0]):
        for b in range(x.shape[1]):
            s = obs.update(s, x[d, b])
    return s


def test_statistics_against_numpy():
    x = device_batches()
    rows = finite_rows(x)
    total_rows = x.size // K
    absmax, mean_abs, hess = (sequential(OBSERVERS[n](), x) for n in OBSERVERS)
    np.testing.assert_array_equal(np.asarray(absmax.amax), np.abs(rows).max(0).astype(np.float32))
    np.testing.assert_allclose(np.asarray(cal.mean_abs(mean_abs)), np.abs(rows).mean(0), rtol=3e-7)
    # Each batch's x^T x is a float32 product; the sum over batches is exact.
    ref = 2 * rows.T @ rows
    h = np.asarray(cal.hessian_matrix(hess))
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(h, ref, rtol=0, atol=1e-6 * np.sqrt(np.outer(np.diag(ref), np.diag(ref))).max())
    np.testing.assert_allclose(np.diag(h), np.diag(ref), rtol=1e-6)
    for s in (absmax, mean_abs, hess):
        assert int(s.num_rows) == len(rows) == total_rows - 2
        assert int(s.num_nonfinite) == 2
    assert int(hess.xtx.num_terms) == NDEV * x.shape[1]


def test_exact_sum_is_order_independent_and_correct():
    """Addends over 40 orders of magnitude, both signs: the state is the same for every order
    and its value is the exact sum (rationals) rounded to float32, within one ulp."""
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((40, 4)) * 10.0 ** rng.integers(-20, 20, (40, 4))).astype(np.float32)
    values[7, 1] = 0.0
    values[:, 3] = 1.5  # a constant column: 60, exactly

    @jax.jit
    def total(order):
        return jax.lax.fori_loop(0, len(order), lambda i, s: cs._exact_add(
            s, cs._exact_of(jnp.asarray(values)[order[i]])), cs._exact_zero((4,)))

    ref = total(np.arange(len(values)))
    for seed in range(3):
        assert_same_state(total(np.random.default_rng(seed).permutation(len(values))), ref)
    got = np.asarray(cal.exact_sum_value(ref))
    exact = [sum(fractions.Fraction(float(v)) for v in values[:, j]) for j in range(4)]
    want = np.array([float(e) for e in exact], np.float32)  # correctly rounded
    assert np.all(np.abs(got.view(np.int32) - want.view(np.int32)) <= 1), (got, want)
    assert got[3] == 60.0


def test_eight_devices_equal_one_device():
    """all_reduce of local states, update with axis_name, and merge: all equal one observer
    that saw every batch (pmap over 8 forced CPU devices)."""
    assert jax.device_count() >= NDEV
    x = device_batches(2)
    observers = {n: make() for n, make in OBSERVERS.items()}

    def per_device(xd):
        local, synced = {}, {}
        for n, obs in observers.items():
            s = t = obs.init(xd[0])
            for b in range(xd.shape[0]):
                s = obs.update(s, xd[b])
                t = obs.update(t, xd[b], axis_name="d")  # each step: the global batch
            local[n], synced[n] = cal.all_reduce(s, "d"), t
        return local, synced

    local, synced = jax.pmap(per_device, axis_name="d")(x)
    for n, obs in observers.items():
        ref = sequential(obs, x)
        for d in (0, NDEV - 1):
            assert_same_state(replica(local[n], d), ref)
            # the same rows and addends summed in another order: the same exact state
            assert_same_state(replica(synced[n], d), ref)
        first, rest = sequential(obs, x[:3]), sequential(obs, x[3:])
        assert_same_state(cal.merge(first, rest), ref)
        assert_same_state(cal.merge(rest, first), ref)


def test_empty_update_poison_and_term_limit():
    obs = cal.hessian()
    s0 = obs.init(np.zeros((1, K), np.float32))
    assert_same_state(obs.update(s0, np.zeros((0, K), np.float32)), s0)
    np.testing.assert_array_equal(cal.hessian_matrix(s0), np.zeros((K, K)))
    # Finite rows whose product overflows float32 make the entries they reach NaN.
    x = np.zeros((3, 5, K), np.float32)
    x[0, 0, :2] = [3e20, 1.0]
    big = obs.update(s0, x)
    h = np.asarray(cal.hessian_matrix(big))
    assert np.isnan(h[0, 0]) and h[0, 1] == h[1, 0] == np.float32(6e20) and h[1, 1] == 2.0
    assert np.all(h[2:] == 0) and int(big.num_nonfinite) == 0
    many = s0._replace(xtx=s0.xtx._replace(num_terms=jnp.int32(cal.channel_stats.MAX_TERMS + 1)))
    with pytest.raises(ValueError, match="at most 32767"):
        cal.hessian_matrix(many)
    assert np.all(np.isnan(jax.jit(cal.hessian_matrix)(many)))


def test_bad_arguments_are_named():
    obs = cal.channel_mean_abs()
    s = obs.init(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="`x` of shape \\(2, 5\\) has 5 channels"):
        obs.update(s, np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="`x` must be a floating array"):
        obs.update(s, np.zeros((2, 4), np.int32))
    with pytest.raises(TypeError, match="`state` must be a ChannelMeanAbsState"):
        obs.update(cal.hessian().init(np.zeros((1, 4))), np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="`axis` must be an int"):
        cal.channel_absmax(axis="last")
    with pytest.raises(ValueError, match="`x_like`"):
        cal.hessian().init(None)
    with pytest.raises(ValueError, match="batch shape"):
        cal.merge(cal.hessian().init(np.zeros((1, 4))), cal.hessian().init(np.zeros((1, 3))))


def test_channel_axis_other_than_last():
    x = np.random.default_rng(3).standard_normal((4, K, 3)).astype(np.float32)
    obs = cal.channel_absmax(axis=1)
    s = obs.update(obs.init(x), x)
    np.testing.assert_array_equal(np.asarray(s.amax), np.abs(x).max(axis=(0, 2)))
    assert int(s.num_rows) == 12
