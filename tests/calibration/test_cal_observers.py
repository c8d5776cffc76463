"""minmax and moving-average observers against numpy / torch-style references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatjax import calibration as cal


def batches(seed=0, n=5, shape=(7, 3)):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * (1 + k) + k).astype(np.float32) for k in range(n)]


def torch_moving_average(xs, c):
    """torch.ao MovingAverageMinMaxObserver.forward, per tensor, as a loop."""
    lo = hi = None
    for x in xs:
        f = x[np.isfinite(x)]
        if f.size == 0:
            continue
        b_lo, b_hi = np.float32(f.min()), np.float32(f.max())
        if lo is None:
            lo, hi = b_lo, b_hi
        else:
            lo = np.float32(lo + np.float32(c) * (b_lo - lo))
            hi = np.float32(hi + np.float32(c) * (b_hi - hi))
    return lo, hi


def test_minmax_per_tensor_and_nonfinite():
    xs = batches()
    xs[2][0, 0] = np.nan
    xs[3][1, 1] = -np.inf
    obs = cal.minmax()
    s = obs.init()
    for x in xs:
        s = obs.update(s, x)
    allx = np.concatenate([x.ravel() for x in xs])
    fin = allx[np.isfinite(allx)]
    assert float(s.lo) == fin.min() and float(s.hi) == fin.max()
    assert int(s.num_nonfinite) == 2
    assert s.lo.shape == () and s.lo.dtype == jnp.float32


@pytest.mark.parametrize("keep_axes", [1, -1, (0, 1)])
def test_minmax_per_channel(keep_axes):
    xs = batches(1)
    xs[0][4, 1] = np.inf
    obs = cal.minmax(keep_axes)
    s = obs.init(xs[0])
    for x in xs:
        s = obs.update(s, x)
    stack = np.stack(xs)
    fin = np.where(np.isfinite(stack), stack, np.nan)
    axes = {1: (0, 1), -1: (0, 1), (0, 1): (0,)}[keep_axes]
    np.testing.assert_array_equal(np.asarray(s.lo), np.nanmin(fin, axis=axes, keepdims=True)[0])
    np.testing.assert_array_equal(np.asarray(s.hi), np.nanmax(fin, axis=axes, keepdims=True)[0])
    assert int(np.asarray(s.num_nonfinite).sum()) == 1


def test_moving_average_matches_torch_semantics():
    xs = batches(2, n=6)
    xs[3][:] = np.nan  # a batch without finite values leaves the average unchanged
    xs[4][0, 0] = np.inf
    for c in (0.01, 0.3, 1.0):
        obs = cal.moving_average_minmax(c)
        s = obs.init()
        for x in xs:
            s = obs.update(s, x)
        lo, hi = torch_moving_average(xs, c)
        np.testing.assert_allclose([float(s.lo), float(s.hi)], [lo, hi], rtol=1e-6)
        assert int(s.num_batches) == 5 and int(s.num_nonfinite) == 22


def test_moving_average_per_channel_skips_empty_channels():
    x1 = np.array([[1.0, np.nan], [3.0, np.nan]], np.float32)
    x2 = np.array([[5.0, 2.0], [7.0, -2.0]], np.float32)
    obs = cal.moving_average_minmax(0.5, keep_axes=1)
    s = obs.update(obs.update(obs.init(x1), x1), x2)
    # channel 0: first batch sets [1, 3], then halfway to [5, 7]; channel 1: only x2 counts
    np.testing.assert_array_equal(np.asarray(s.lo), [[3.0, -2.0]])
    np.testing.assert_array_equal(np.asarray(s.hi), [[5.0, 2.0]])
    np.testing.assert_array_equal(np.asarray(s.num_batches), [[2, 1]])


@settings(max_examples=25, deadline=None)
@given(
    # XLA flushes subnormals to zero; the torch-style reference would not
    values=st.lists(st.floats(-1e6, 1e6, width=32, allow_subnormal=False), min_size=12, max_size=12),
    c=st.sampled_from([0.01, 0.5, 1.0]),
)
def test_property_moving_average_stays_within_the_seen_range(values, c):
    xs = [np.array(values[i:i + 4], np.float32) for i in range(0, 12, 4)]
    s = _ma_run(xs, c)
    seen = np.concatenate(xs)
    tol = 1e-6 * np.abs(seen).max() + np.finfo(np.float32).tiny  # lo + c * (b - lo) rounds
    assert seen.min() - tol <= float(s.lo) <= float(s.hi) + tol <= seen.max() + 2 * tol
    lo, hi = torch_moving_average(xs, c)
    # XLA may fuse the update into one fused multiply-add and flushes subnormal results
    # to zero: equal up to float32 rounding
    atol = 1e-6 * np.abs(seen).max() + np.finfo(np.float32).tiny
    np.testing.assert_allclose([float(s.lo), float(s.hi)], [lo, hi], rtol=1e-6, atol=atol)


_MA_UPDATE = jax.jit(lambda s, x, c: cal.moving_average_minmax(c).update(s, x), static_argnums=2)


def _ma_run(xs, c):
    s = cal.moving_average_minmax(c).init()
    for x in xs:
        s = _MA_UPDATE(s, x, c)
    return s


def test_empty_updates_are_noops():
    for obs in (cal.minmax(), cal.moving_average_minmax()):
        s = obs.update(obs.init(), np.ones(3, np.float32))
        e = obs.update(s, np.zeros((0, 2), np.float32))
        for a, b in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(e)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_has_data():
    for obs in (cal.minmax(), cal.moving_average_minmax(), cal.histogram(64)):
        s = obs.init()
        assert not bool(cal.has_data(s))
        s = obs.update(s, np.array([np.nan], np.float32))
        assert not bool(cal.has_data(s))
        s = obs.update(s, np.array([0.0], np.float32))
        assert bool(cal.has_data(s))
    with pytest.raises(TypeError, match="`state` must be"):
        cal.has_data({"lo": 0})


def scan_updates(obs, xs):
    return jax.lax.scan(lambda s, x: (obs.update(s, x), None), obs.init(), xs)[0]


def test_observers_under_scan_and_vmap():
    xs = np.stack(batches(3, n=4))
    for obs in (cal.minmax(), cal.moving_average_minmax(0.2)):
        run = jax.jit(functools.partial(scan_updates, obs))
        s = obs.init()
        for x in xs:
            s = obs.update(s, x)
        for a, b in zip(jax.tree_util.tree_leaves(run(xs)), jax.tree_util.tree_leaves(s)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # vmap over the last axis = per-channel statistics on that axis
        pc = cal.minmax(keep_axes=-1) if isinstance(s, cal.MinMaxState) else cal.moving_average_minmax(0.2, -1)
        ref = pc.init(xs[0])
        for x in xs:
            ref = pc.update(ref, x)
        v = jax.vmap(obs.init)(xs[0].T)
        for x in xs:
            v = jax.vmap(obs.update)(v, x.T)
        np.testing.assert_array_equal(np.asarray(v.lo), np.asarray(ref.lo)[0])
        np.testing.assert_array_equal(np.asarray(v.hi), np.asarray(ref.hi)[0])


def test_argument_errors():
    with pytest.raises(ValueError, match="`momentum`"):
        cal.moving_average_minmax(0.0)
    with pytest.raises(ValueError, match="`momentum`"):
        cal.moving_average_minmax(1.5)
    with pytest.raises(TypeError, match="`keep_axes`"):
        cal.minmax(keep_axes="0")
    with pytest.raises(ValueError, match="`keep_axes` entry 3"):
        cal.minmax(keep_axes=3).init(np.zeros((2, 2)))
    with pytest.raises(TypeError, match="`state` must be a MinMaxState"):
        cal.minmax().update(cal.moving_average_minmax().init(), np.ones(2, np.float32))
    obs = cal.minmax(keep_axes=0)
    with pytest.raises(ValueError, match="`x` of shape"):
        obs.update(obs.init(np.zeros((3, 2))), np.zeros((4, 2), np.float32))
    with pytest.raises(TypeError, match="`x` must be a real"):
        cal.minmax().update(cal.minmax().init(), np.array([True]))
