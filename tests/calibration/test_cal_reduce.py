"""merge and all_reduce: exact equality with one observer that saw all the data."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import qatjax.calibration.aligned_histogram as ah
from qatjax import calibration as cal

NDEV = 8


def assert_same_state(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def replica(tree, d):
    return jax.tree_util.tree_map(lambda leaf: leaf[d], tree)


def device_data(seed=0, per_device=(3, 40)):
    """Per-device data whose ranges differ by orders of magnitude (so exponents differ)."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** np.linspace(-3, 3, NDEV)[:, None, None]
    x = (rng.standard_normal((NDEV,) + per_device) * scales).astype(np.float32)
    x[2, 1, 5] = np.nan
    x[6, 0, 0] = np.inf
    return x


OBSERVERS = {
    "minmax": lambda: cal.minmax(),
    "hist": lambda: cal.histogram(256),
    "hist_signed": lambda: cal.histogram(256, signed=True),
    "hist_per_channel": lambda: cal.histogram(64, keep_axes=0),
}


def single_device(obs, x):
    """One observer, all devices' batches in sequence (device-major)."""
    s = obs.init(x[0, 0])
    for d in range(x.shape[0]):
        for b in range(x.shape[1]):
            s = obs.update(s, x[d, b])
    return s


def test_eight_devices_are_available():
    assert jax.device_count() >= NDEV


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_pmap_all_reduce_equals_single_device(name):
    obs = OBSERVERS[name]()
    x = device_data()
    if name == "hist_per_channel":
        x = x.reshape(NDEV, 3, 8, 5)

    def local_then_reduce(xd):
        s = obs.init(xd[0])
        for b in range(xd.shape[0]):
            s = obs.update(s, xd[b])
        return cal.all_reduce(s, "d")

    out = jax.pmap(local_then_reduce, axis_name="d")(x)
    ref = single_device(obs, x)
    for d in range(NDEV):
        assert_same_state(replica(out, d), ref)


@pytest.mark.parametrize("name", ["minmax", "hist_signed"])
def test_shard_map_all_reduce_and_update_with_axis_name(name):
    obs = OBSERVERS[name]()
    x = device_data(1)
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("d",))

    def local_then_reduce(xd):
        s = obs.init(xd[0, 0])
        for b in range(xd.shape[1]):
            s = obs.update(s, xd[0, b])
        return cal.all_reduce(s, "d")

    def global_updates(xd):  # each step sees the global batch: replicas identical
        s = obs.init(xd[0, 0])
        for b in range(xd.shape[1]):
            s = obs.update(s, xd[0, b], axis_name="d")
        return s

    ref = single_device(obs, x)
    for fn in (local_then_reduce, global_updates):
        out = jax.jit(cal.shard_map(fn, mesh=mesh, in_specs=P("d"), out_specs=P()))(x)
        assert_same_state(out, ref)


def test_pmap_update_with_axis_name_histogram_equals_global_batches():
    obs = cal.histogram(256)
    x = device_data(2)
    out = jax.pmap(lambda xd: obs.update(obs.update(obs.init(), xd[0], axis_name="d"), xd[1], axis_name="d"),
                   axis_name="d")(x[:, :2])
    ref = obs.update(obs.update(obs.init(), x[:, 0]), x[:, 1])
    for d in range(NDEV):
        assert_same_state(replica(out, d), ref)


def test_moving_average_with_axis_name_is_exact_and_all_reduce_averages():
    obs = cal.moving_average_minmax(0.1)
    x = device_data(3)
    out = jax.pmap(
        lambda xd: functools.reduce(lambda s, b: obs.update(s, b, axis_name="d"), xd, obs.init()),
        axis_name="d",
    )(x)
    ref = obs.init()
    for b in range(x.shape[1]):
        ref = obs.update(ref, x[:, b])  # the global batch b
    for d in range(NDEV):
        assert_same_state(replica(out, d), ref)
    # all_reduce of local averages: the mean of the replicas' estimates
    local = [functools.reduce(obs.update, x[d], obs.init()) for d in range(NDEV)]
    red = jax.pmap(
        lambda xd: cal.all_reduce(functools.reduce(obs.update, xd, obs.init()), "d"), axis_name="d"
    )(x)
    np.testing.assert_allclose(np.asarray(red.lo)[0], np.mean([float(s.lo) for s in local]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(red.hi)[0], np.mean([float(s.hi) for s in local]), rtol=1e-6)
    assert int(red.num_nonfinite[0]) == sum(int(s.num_nonfinite) for s in local) == 2


@pytest.mark.parametrize("name", ["minmax", "hist", "hist_signed"])
def test_merge_equals_observing_the_concatenation(name):
    obs = OBSERVERS[name]()
    x = device_data(4)
    a = single_device(obs, x[:3])
    b = obs.init()
    for d in range(3, NDEV):
        for k in range(x.shape[1]):
            b = obs.update(b, x[d, k])
    ref = single_device(obs, x)
    assert_same_state(cal.merge(a, b), ref)
    assert_same_state(cal.merge(b, a), ref)


@settings(max_examples=15, deadline=None)
@given(
    exps=st.lists(st.integers(-12, 12), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
    signed=st.booleans(),
)
def test_property_merge_is_associative_commutative_and_exact(exps, seed, signed):
    rng = np.random.default_rng(seed)
    parts = [(rng.standard_normal(32) * 2.0**e).astype(np.float32) for e in exps]
    update = _update(signed)
    s = [update(cal.histogram(64, signed=signed).init(), p) for p in parts]
    whole = update(cal.histogram(64, signed=signed).init(), np.concatenate(parts))
    merge = jax.jit(cal.merge)
    assert_same_state(merge(merge(s[0], s[1]), s[2]), whole)
    assert_same_state(merge(s[2], merge(s[1], s[0])), whole)


@functools.cache
def _update(signed):
    return jax.jit(cal.histogram(64, signed=signed).update)


def test_moving_average_merge():
    obs = cal.moving_average_minmax(0.5)
    a = obs.update(obs.init(), np.array([-2.0, 4.0], np.float32))
    b = obs.update(obs.init(), np.array([0.0, 2.0, np.nan], np.float32))
    m = cal.merge(a, b)
    assert float(m.lo) == -1.0 and float(m.hi) == 3.0 and int(m.num_nonfinite) == 1
    assert_same_state(cal.merge(a, obs.init()), a)


def test_saturating_psum_across_devices():
    cmax = ah.COUNT_MAX
    per_device = np.array([[cmax // 8, 2**28, 5, cmax, 0]] * NDEV, np.int32)
    per_device[0, 0] += 6  # column sums: COUNT_MAX - 1, 2**31, 40, 8 * COUNT_MAX, 0
    out = jax.pmap(lambda c: ah.saturating_psum(c, "d"), axis_name="d")(per_device)
    np.testing.assert_array_equal(np.asarray(out)[0], [cmax - 1, cmax, 40, cmax, 0])


def test_merge_rejects_mismatched_states():
    with pytest.raises(TypeError, match="`b` is a MinMaxState but `a` is a HistogramState"):
        cal.merge(cal.histogram(64).init(), cal.minmax().init())
    with pytest.raises(ValueError, match="does not match `a`"):
        cal.merge(cal.histogram(64).init(), cal.histogram(64, signed=True).init())
    with pytest.raises(ValueError, match="batch shape"):
        cal.merge(cal.minmax(0).init(np.zeros((2, 3))), cal.minmax().init())
    with pytest.raises(TypeError, match="`state` must be"):
        cal.all_reduce({"lo": jnp.zeros(())}, "d")
