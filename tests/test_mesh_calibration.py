"""Calibration under a mesh (linen and NNX), globally sharded batches, and whole-tree
reduction of statistics (all_reduce_tree, merge_tree, merge_stacked, reduce_across_processes).

References: one device calibrating the same data in blocks of the per-device size (the
statistics merge exactly, so only the float forward's batch shape matters), and numpy."""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import qatjax
import qatjax.nnx as qnnx
from qatjax import calibration as cal
from qatjax.flax import QatDense

MINMAX = qatjax.QatConfig(activation_observer="minmax", activation_estimator="minmax")
HIST = qatjax.QatConfig(activation_format="uint8", activation_symmetric=False,
                        activation_observer="histogram", activation_estimator="percentile",
                        num_bins=256)
BLOCK = 2  # rows per device: a batch of 8 rows over the 4 devices of the data axis


class Net(nn.Module):
    """First layer: min / max of the raw input, kernel split over "model"; second: a
    signed histogram."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        kernel_init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        x = QatDense(16, config=MINMAX, axis_name=self.axis_name, kernel_init=kernel_init,
                     name="first")(x)
        return QatDense(4, config=HIST, axis_name=self.axis_name, name="second")(nn.relu(x))


def _mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _batches():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8)).astype(np.float32)
    x[1] *= 2.0 ** np.arange(-4, 4, dtype=np.float32)[:, None]  # blocks of different ranges
    return list(x)


@functools.cache
def _reference():
    """(float variables, one device's calibration on BLOCK-row batches)."""
    batches = _batches()
    rng = np.random.default_rng(1)  # weights by hand: no init to compile
    params = {"params": {"first": {"kernel": rng.standard_normal((8, 16), np.float32) * 0.4,
                                   "bias": rng.standard_normal(16, np.float32) * 0.1},
                         "second": {"kernel": rng.standard_normal((16, 4), np.float32) * 0.3,
                                    "bias": np.zeros(4, np.float32)}}}
    blocks = [b[i:i + BLOCK] for b in batches for i in range(0, len(b), BLOCK)]
    return params, qatjax.calibrate(Net(), params, blocks)


def _local(a):
    return np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a)


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(_local(x), _local(y), err_msg=jax.tree_util.keystr(path))


def test_calibrate_under_a_mesh_equals_one_device():
    params, ref = _reference()
    mesh = _mesh()
    batches = _batches()
    # The first kernel split over "model" (tensor parallel inside the data-parallel step).
    kernel = params["params"]["first"]["kernel"]
    sharded = jax.device_put(kernel, NamedSharding(mesh, P(None, "model")))
    first = {**params["params"]["first"], "kernel": sharded}
    params = {"params": {**params["params"], "first": first}}
    # One batch as this process's numpy block, one as a global array.
    glob = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), batches[1])
    out, report = qatjax.calibrate_model(Net("data"), params, [batches[0], glob], mesh=mesh,
                                         data_axis="data")
    for col in ("quant_stats", "quant_params"):
        assert_same_tree(out[col], ref[col])
    first = out["quant_stats"]["first"]["input"]
    assert float(first.lo) == np.min(batches) and float(first.hi) == np.max(batches)
    assert first.lo.sharding.is_fully_replicated
    assert out["params"]["first"]["kernel"].sharding.spec == P(None, "model")
    # The report ran under the mesh (layers with axis_name): an error per layer.
    assert [r.path for r in report.layers] == ["first", "second"]
    assert all(0 < r.output_error < 1 for r in report.layers)


def test_calibrate_under_a_mesh_takes_unsharded_jax_arrays_as_global_batches():
    """A jax.Array on one device is the global batch: resharded over the data axis."""
    params, ref = _reference()
    batches = [jnp.asarray(b) for b in _batches()]
    out = qatjax.calibrate(Net("data"), params, batches, mesh=_mesh(), data_axis="data")
    for col in ("quant_stats", "quant_params"):
        assert_same_tree(out[col], ref[col])


def test_plain_calibrate_on_globally_sharded_batches_equals_one_device():
    params, ref = _reference()
    sharding = NamedSharding(_mesh(), P("data"))
    batches = [jax.device_put(b, sharding) for b in _batches()]
    out = qatjax.calibrate(Net(), params, batches)  # jit splits each step over the devices
    for col in ("quant_stats", "quant_params"):
        assert_same_tree(out[col], ref[col])


def test_nnx_calibrate_under_a_mesh_equals_linen():
    params, ref = _reference()
    mesh = _mesh()

    class NnxNet(nnx.Module):
        def __init__(self, axis_name):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
            self.first = qnnx.QatLinear(8, 16, config=MINMAX, axis_name=axis_name, kernel_init=init,
                                        rngs=nnx.Rngs(0))
            self.second = qnnx.QatLinear(16, 4, config=HIST, axis_name=axis_name, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.second(nnx.relu(self.first(x)))

    with jax.set_mesh(mesh):
        model = NnxNet("data")
    for name in ("first", "second"):
        for var in ("kernel", "bias"):
            variable = getattr(getattr(model, name), var)  # the linen weights, sharded as created
            variable.set_value(jax.device_put(params["params"][name][var],
                                              variable.get_value().sharding))
    assert getattr(model.first.kernel.get_value().sharding, "spec", None) == P(None, "model")
    qnnx.calibrate(model, _batches(), mesh=mesh, data_axis="data")
    got = qnnx.collections(model)
    for col in ("quant_stats", "quant_params"):
        assert_same_tree(got[col], ref[col])
    with jax.set_mesh(mesh):
        plain = NnxNet(None)
    with pytest.raises(ValueError, match="layer first must reduce its statistics over `data_axis`"):
        qnnx.calibrate(plain, _batches(), mesh=mesh, data_axis="data")
    # across_processes (one process here: the gather-and-merge path, writing back in place)
    for name in ("first", "second"):
        for var in ("kernel", "bias"):
            getattr(getattr(plain, name), var).set_value(params["params"][name][var])
    blocks = [b[i:i + BLOCK] for b in _batches() for i in range(0, 8, BLOCK)]
    qnnx.calibrate(plain, blocks, across_processes=True)
    got = qnnx.collections(plain)
    for col in ("quant_stats", "quant_params"):
        assert_same_tree(got[col], ref[col])


def test_mesh_arguments_are_checked():
    params, _ = _reference()
    mesh, batches = _mesh(), _batches()
    with pytest.raises(ValueError, match="`data_axis` .* needs a `mesh`"):
        qatjax.calibrate(Net(), params, batches, data_axis="data")
    with pytest.raises(ValueError, match="`data_axis` is needed"):
        qatjax.calibrate(Net("data"), params, batches, mesh=mesh)
    with pytest.raises(ValueError, match="`data_axis` must name distinct axes"):
        qatjax.calibrate(Net("data"), params, batches, mesh=mesh, data_axis="batch")
    with pytest.raises(TypeError, match="`mesh` must be a jax.sharding.Mesh"):
        qatjax.calibrate(Net("data"), params, batches, mesh="data")
    with pytest.raises(ValueError, match="`mesh` and `across_processes` exclude each other"):
        qatjax.calibrate(Net("data"), params, batches, mesh=mesh, data_axis="data",
                         across_processes=True)
    with pytest.raises(ValueError, match="layer first must reduce its statistics over `data_axis`"
                                         " 'data', but has axis_name=None"):
        qatjax.calibrate(Net(), params, batches, mesh=mesh, data_axis="data")


# ----------------------------------------------------------------------------- whole trees

NDEV = 8


def _device_data():
    """Per-device data whose ranges differ by orders of magnitude, with non-finite values."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((NDEV, 2, 24)) * 10.0 ** np.linspace(-2, 2, NDEV)[:, None, None])
    x = x.astype(np.float32)
    x[1, 0, 3], x[5, 1, 0] = np.nan, -np.inf
    return x


OBSERVERS = {"hist": cal.histogram(64), "signed": cal.histogram(64, signed=True),
             "minmax": cal.minmax(), "ema": cal.moving_average_minmax(0.5)}


def _local_tree(xd):
    """A model-like statistics tree of one device's batches: observer states, a list, and
    fp8 amax histories as plain arrays (as in ``fp8_meta``)."""
    tree = {name: obs.init() for name, obs in OBSERVERS.items()}
    for b in xd:
        tree = {name: OBSERVERS[name].update(s, b) for name, s in tree.items()}
    amaxes = jnp.max(jnp.where(jnp.isfinite(xd), jnp.abs(xd), 0.0), axis=1)
    return {"quant_stats": {"layer": tree, "stack": [tree["minmax"]]},
            "fp8_meta": {"input_amax_history": amaxes, "input_scale": jnp.max(amaxes)}}


@functools.cache
def _one_observer_each(devices=NDEV):
    """One observer per exact kind over the first ``devices`` devices' data, and the
    replicas' mean EMA estimate."""
    x = _device_data()[:devices]
    refs = {}
    for name in ("hist", "signed", "minmax"):
        obs = OBSERVERS[name]
        refs[name] = functools.reduce(obs.update, x.reshape(-1, x.shape[-1]), obs.init())
    ema = OBSERVERS["ema"]
    refs["ema_lo"] = np.mean([functools.reduce(ema.update, xd, ema.init()).lo for xd in x])
    return refs


def _check_global(tree, x):
    """``tree`` against one observer per kind over all devices' data, and numpy maxima."""
    refs = _one_observer_each()
    for name in ("hist", "signed", "minmax"):
        assert_same_tree(tree["quant_stats"]["layer"][name], refs[name])
    assert_same_tree(tree["quant_stats"]["stack"][0], refs["minmax"])
    ema = tree["quant_stats"]["layer"]["ema"]  # the mean of the replicas' estimates
    np.testing.assert_allclose(ema.lo, refs["ema_lo"], rtol=1e-6)
    assert int(ema.num_nonfinite) == 2 and int(ema.num_batches) == 2
    finite = np.where(np.isfinite(x), np.abs(x), 0.0)
    np.testing.assert_array_equal(tree["fp8_meta"]["input_amax_history"], finite.max(axis=(0, 2)))
    assert float(tree["fp8_meta"]["input_scale"]) == finite.max()


def test_whole_tree_reductions_equal_one_observer():
    x = _device_data()
    # per-device trees along a leading axis
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *map(_local_tree, x))
    _check_global(cal.merge_stacked(stacked), x)

    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("d",))
    reduce = jax.jit(cal.shard_map(  # each device's own tree (its row of `stacked`)
        lambda t: cal.all_reduce_tree(jax.tree_util.tree_map(lambda a: a[0], t), "d"),
        mesh=mesh, in_specs=P("d"), out_specs=P()))
    _check_global(reduce(stacked), x)

    # Two devices' trees, uneven in data (one has a NaN, the other not).
    merged = cal.merge_tree(_local_tree(x[0]), _local_tree(x[1]))
    for name in ("hist", "signed", "minmax"):
        assert_same_tree(merged["quant_stats"]["layer"][name], _one_observer_each(2)[name])
    np.testing.assert_allclose(merged["quant_stats"]["layer"]["ema"].lo,
                               _one_observer_each(2)["ema_lo"], rtol=1e-6)
    np.testing.assert_array_equal(merged["fp8_meta"]["input_amax_history"],
                                  np.nanmax(np.abs(x[:2]), axis=(0, 2)))

def test_new_state_kinds_are_registered_and_unknown_ones_refused():
    class CountState(NamedTuple):
        total: jax.Array

    tree = {"a": CountState(jnp.int32(3)), "b": {"amax": jnp.float32(2.0)}}
    other = {"a": CountState(jnp.int32(4)), "b": {"amax": jnp.float32(5.0)}}
    with pytest.raises(TypeError, match=r"`tree` at \['a'\] is a CountState: not a statistic"):
        cal.merge_tree(tree, other)
    cal.register_reduction(CountState, lambda s, axis: CountState(jax.lax.psum(s.total, axis)))
    merged = cal.merge_tree(tree, other)
    assert int(merged["a"].total) == 7 and float(merged["b"]["amax"]) == 5.0
    with pytest.raises(TypeError, match=r"\['n'\] is an array of dtype int32"):
        cal.all_reduce_tree({"n": jnp.int32(1)}, "d")
    with pytest.raises(ValueError, match="`b` has structure"):
        cal.merge_tree(tree, {"a": other["a"]})
    with pytest.raises(ValueError, match=r"`b` at \['b'\]\['amax'\] has shape \(2,\)"):
        cal.merge_tree(tree, {"a": other["a"], "b": {"amax": jnp.zeros(2)}})
    with pytest.raises(ValueError, match="same leading"):
        cal.merge_stacked({"u": jnp.zeros((2,)), "v": jnp.zeros((3,))})
