"""Checkpoints you can resume from: named, versioned descriptors; typed loads; files that
are checksummed, written atomically and readable in every earlier layout; resumed
calibration and training equal to uninterrupted runs; models whose module is unhashable."""

import gc
import hashlib
import json
import os
import pathlib
import re

import flax
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qatjax
from qatjax import checkpoint
from qatjax.calibration.aligned_histogram import HistogramState
from qatjax.calibration.observers import MinMaxState, MovingAverageState
from qatjax.config import ESTIMATORS, GRANULARITIES, QatConfig
from qatjax.flax import QatDense, specs
from qatjax.formats import format_code

CONFIGS = {
    "int8": QatConfig(),
    "uint8_affine": QatConfig(activation_format="uint8", activation_symmetric=False,
                              weight_symmetric=False, activation_estimator="mse"),
    "int4_per_group": QatConfig(weight_format="int4", weight_granularity="per_group",
                                weight_group_size=4, activation_observer="minmax",
                                activation_estimator="minmax"),
    "fp8": QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3"),
    "fp8_delayed": QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                             weight_granularity="per_tensor", fp8_scaling="delayed", fp8_margin=1),
    "weight_only": QatConfig(weight_format="int4", activation_format=None),
    "dynamic_per_token": QatConfig(activation_scaling="dynamic",
                                   activation_granularity="per_token"),
}


def _expected(cfg):
    scaling = ("static" if cfg.activation_scaling == "static" and cfg.fp8_scaling is None
               else "dynamic per token" if cfg.activation_granularity == "per_token" else "dynamic")
    return ((cfg.weight_format, cfg.weight_granularity, cfg.weight_group_size, cfg.weight_symmetric),
            (cfg.activation_format, cfg.activation_symmetric, scaling, cfg.activation_estimator),
            (cfg.fp8_scaling, cfg.fp8_margin))


def _parse(qp):
    return (specs.parse_kernel_spec(qp["kernel_spec"]), specs.parse_input_spec(qp["input_spec"]),
            specs.parse_fp8_spec(qp["fp8_spec"]))


def _old_descriptors(cfg):
    """The int32 descriptors qatjax wrote before they were named (version 0)."""
    _, (_, _, scaling, _), _ = _expected(cfg)
    return {
        "kernel_spec": np.array([format_code(cfg.weight_format), GRANULARITIES.index(cfg.weight_granularity),
                                 cfg.weight_group_size or 0, int(cfg.weight_symmetric)], np.int32),
        "input_spec": np.array([format_code(cfg.activation_format), int(cfg.activation_symmetric),
                                ("dynamic", "static", "dynamic per token").index(scaling),
                                ESTIMATORS.index(cfg.activation_estimator)], np.int32),
        "fp8_spec": np.array([(None, "current", "delayed").index(cfg.fp8_scaling), cfg.fp8_margin],
                             np.int32),
    }


class MLP(nn.Module):
    config: QatConfig

    @nn.compact
    def __call__(self, x, mode=None):
        kernel_init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        x = nn.relu(QatDense(16, config=self.config, kernel_init=kernel_init)(x, mode=mode))
        return QatDense(4, config=self.config)(x, mode=mode)


def _batches(n=4, seed=0):
    return [jax.random.normal(k, (8, 8)) for k in jax.random.split(jax.random.key(seed), n)]


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- (1) descriptors -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_descriptors_are_named_versioned_json_and_round_trip(name):
    cfg = CONFIGS[name]
    desc = specs.describe(cfg)
    assert set(desc) == {"kernel_spec", "input_spec", "fp8_spec"}
    for value in desc.values():
        assert value.dtype == jnp.uint8 and value.ndim == 1
        doc = json.loads(bytes(np.asarray(value)).decode("utf-8"))
        assert doc["v"] == specs.SPEC_VERSION
    kernel = json.loads(bytes(np.asarray(desc["kernel_spec"])).decode())
    assert kernel["format"] == (None if cfg.weight_format is None else cfg.weight_format.name)
    assert kernel["granularity"] == cfg.weight_granularity
    assert _parse(desc) == _expected(cfg)

def test_layers_write_named_descriptors_that_survive_save_and_load(tmp_path):
    for name, cfg in CONFIGS.items():
        model = MLP(cfg)
        variables = model.init(jax.random.key(0), _batches(1)[0])
        assert _parse(variables["quant_params"]["QatDense_1"]) == _expected(cfg), name
        path = checkpoint.save(tmp_path / f"{name}.msgpack", variables)
        for target in (None, variables):
            layer = checkpoint.load(path, target)["quant_params"]["QatDense_1"]
            assert layer["kernel_spec"].dtype == np.uint8
            assert _parse(layer) == _expected(cfg), name


def test_stacked_descriptors_parse_as_one_recipe():
    desc = specs.describe(CONFIGS["int4_per_group"])
    stacked = jnp.stack([desc["kernel_spec"]] * 3)
    assert specs.stack_shape(stacked) == (3,)
    assert specs.parse_kernel_spec(stacked) == specs.parse_kernel_spec(desc["kernel_spec"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_old_int32_descriptors_still_parse(name):
    cfg = CONFIGS[name]
    old = _old_descriptors(cfg)
    assert _parse(old) == _expected(cfg)
    assert _parse({k: np.stack([v, v]) for k, v in old.items()}) == _expected(cfg)
    assert specs.parse_dense_general_spec(np.array([2, 3, 4, 5], np.int32)) == (2, (3, 4, 5))


def test_dense_general_descriptor_round_trips():
    spec = specs.describe_dense_general(2, (3, 4, 5))
    assert spec.dtype == jnp.uint8
    assert specs.parse_dense_general_spec(spec) == (2, (3, 4, 5))


def test_newer_or_foreign_descriptors_are_refused():
    newer = np.frombuffer(b'{"v":99,"format":"int8"}', np.uint8)
    with pytest.raises(ValueError, match="newer"):
        specs.parse_kernel_spec(newer)
    with pytest.raises(ValueError, match="kernel_spec"):
        specs.parse_kernel_spec(np.frombuffer(b"not json", np.uint8))
    with pytest.raises(ValueError, match="granularity"):
        specs.parse_kernel_spec(np.frombuffer(
            b'{"v":1,"format":"int8","granularity":"per_row","group_size":null,"symmetric":true}',
            np.uint8))


def test_a_checkpoint_with_old_descriptors_reads_as_the_new_one(tmp_path):
    cfg = QatConfig(activation_observer="minmax", activation_estimator="minmax")
    model, data = MLP(cfg), _batches()
    variables = qatjax.calibrate(model, model.init(jax.random.key(0), data[0]), data)
    old = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables))
    for layer in old["quant_params"].values():
        layer.update(_old_descriptors(cfg))
    path = tmp_path / "old.msgpack"  # written as the previous qatjax did: no metadata
    path.write_bytes(flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(old)))
    loaded = checkpoint.load(path)
    assert loaded["quant_params"]["QatDense_0"]["kernel_spec"].dtype == np.int32
    assert str(qatjax.quant_report(loaded)) == str(qatjax.quant_report(variables))
    served_old = qatjax.convert(loaded)["quant_params"]
    served_new = nn.meta.unbox(qatjax.convert(variables))["quant_params"]
    for name, layer in served_new.items():
        assert _parse(served_old[name]) == _parse(layer) == _expected(cfg)
        _assert_trees_equal({k: v for k, v in served_old[name].items() if not k.endswith("_spec")},
                            {k: v for k, v in layer.items() if not k.endswith("_spec")})


# -- (2) typed loads -------------------------------------------------------------------


def _partly_calibrated(cfg, n=2):
    model, data = MLP(cfg), _batches()
    init = model.init(jax.random.key(0), data[0])
    return model, data, init, qatjax.calibrate(model, init, data[:n])


@pytest.mark.parametrize("observer, state_type", [("histogram", HistogramState),
                                                  ("minmax", MinMaxState)])
def test_load_with_target_restores_observer_states_and_partitioned_boxes(tmp_path, observer,
                                                                         state_type):
    cfg = QatConfig(activation_observer=observer, activation_estimator="minmax")
    _, _, init, variables = _partly_calibrated(cfg)
    path = checkpoint.save(tmp_path / "v.msgpack", variables)

    plain = checkpoint.load(path)
    assert "__qatjax__" not in plain
    assert isinstance(plain["quant_stats"]["QatDense_0"]["input"], dict)

    loaded = checkpoint.load(path, target=init)
    assert "__qatjax__" not in loaded
    state = loaded["quant_stats"]["QatDense_0"]["input"]
    assert isinstance(state, state_type)
    kernel = loaded["params"]["QatDense_0"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, "model")
    # Entries the (uncalibrated) target lacks are kept as saved.
    assert "input_scale" in loaded["quant_params"]["QatDense_0"]
    _assert_trees_equal(loaded, jax.tree_util.tree_map(np.asarray, variables))

    frozen = checkpoint.load(path, target=flax.core.freeze(init))
    assert isinstance(frozen, flax.core.FrozenDict)
    assert isinstance(frozen["quant_stats"]["QatDense_0"]["input"], state_type)


def test_load_with_target_names_the_first_mismatch(tmp_path):
    cfg = QatConfig(activation_observer="minmax", activation_estimator="minmax")
    _, data, init, variables = _partly_calibrated(cfg)
    path = checkpoint.save(tmp_path / "v.msgpack", variables)

    class Wider(nn.Module):
        partitioned: bool = True

        @nn.compact
        def __call__(self, x, mode=None):
            init = nn.initializers.lecun_normal()
            init = nn.with_partitioning(init, (None, "model")) if self.partitioned else init
            x = QatDense(32, config=cfg, kernel_init=init)(x, mode=mode)
            return QatDense(4, config=cfg)(x, mode=mode)

    wider = Wider().init(jax.random.key(0), data[0])
    with pytest.raises(ValueError, match=r"params/QatDense_0/kernel/value: expected an array of "
                                         r"shape \(8, 32\) and dtype float32, found an array of "
                                         r"shape \(8, 16\)"):
        checkpoint.load(path, target=wider)
    unboxed = Wider(partitioned=False).init(jax.random.key(0), data[0])
    with pytest.raises(ValueError, match=r"params/QatDense_0/kernel: expected an array .* found a subtree"):
        checkpoint.load(path, target=unboxed)

    more = flax.core.unfreeze(init)
    more["params"]["QatDense_2"] = {"kernel": jnp.zeros((4, 4))}
    with pytest.raises(ValueError, match="params/QatDense_2: expected .* found no such entry"):
        checkpoint.load(path, target=more)

    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a,
                                  init)
    with pytest.raises(ValueError, match="params/QatDense_0/bias: .*dtype bfloat16"):
        checkpoint.load(path, target=bf16)

    wrong_state = flax.core.unfreeze(init)
    wrong_state["quant_stats"]["QatDense_0"]["input"] = MovingAverageState(
        jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match="quant_stats/QatDense_0/input/num_batches: .* found no such"):
        checkpoint.load(path, target=wrong_state)


def test_checkpoint_version_metadata(tmp_path):
    variables = {"params": {"w": np.arange(3, dtype=np.float32)}}
    path = checkpoint.save(tmp_path / "v.msgpack", variables)
    with open(path, "rb") as f:
        raw = flax.serialization.msgpack_restore(f.read())
    assert set(raw) == {"__qatjax__", "variables"}
    assert raw["__qatjax__"] == {"version": checkpoint.CHECKPOINT_VERSION,
                                 "sha256": hashlib.sha256(raw["variables"]).hexdigest()}
    assert set(checkpoint.load(path)) == {"params"}

    newer = dict(raw, __qatjax__={"version": checkpoint.CHECKPOINT_VERSION + 1})
    (tmp_path / "newer.msgpack").write_bytes(flax.serialization.msgpack_serialize(newer))
    with pytest.raises(ValueError, match="newer qatjax"):
        checkpoint.load(tmp_path / "newer.msgpack")
    with pytest.raises(ValueError, match="reserved"):
        checkpoint.save(tmp_path / "x.msgpack", {"__qatjax__": {}})


def _saved_model(tmp_path):
    """A calibrated model's variables (a state dict of numpy arrays, as ``load`` returns it)
    and the path they are saved at."""
    cfg = QatConfig(activation_observer="histogram", activation_estimator="percentile")
    _, _, _, variables = _partly_calibrated(cfg)
    variables = flax.serialization.to_state_dict(
        jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables)))
    return variables, checkpoint.save(tmp_path / "model.msgpack", variables)


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path):
    variables, path = _saved_model(tmp_path)
    data = bytearray(pathlib.Path(path).read_bytes())
    kernel = variables["params"]["QatDense_1"]["kernel"]
    at = bytes(data).find(kernel.tobytes())
    assert at > 0  # the kernel's bytes are in the file as they are
    data[at + kernel.nbytes // 2] ^= 0x01  # one bit of one weight
    bad = tmp_path / "flipped.msgpack"
    bad.write_bytes(bytes(data))
    for target in (None, variables):
        with pytest.raises(ValueError, match=re.escape(f"load: {str(bad)!r} is corrupted: its "
                                                       "sha256 checksum does not match its contents")):
            checkpoint.load(bad, target)


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: n - 1, lambda n: 0],
                         ids=["half", "all_but_the_last_byte", "empty"])
def test_a_truncated_file_is_refused(tmp_path, keep):
    _, path = _saved_model(tmp_path)
    data = pathlib.Path(path).read_bytes()
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(data[:keep(len(data))])
    with pytest.raises(ValueError, match=re.escape(f"load: {str(cut)!r} is truncated: the file "
                                                   "ends")):
        checkpoint.load(cut)


@pytest.mark.parametrize("version", [0, 1])
def test_files_of_earlier_versions_still_load(tmp_path, version):
    """Files written before the checksum: the variables at the top level, next to
    ``"__qatjax__": {"version": 1}`` (version 1) or alone (version 0)."""
    variables, _ = _saved_model(tmp_path)
    state = variables
    if version == 1:  # what save wrote then
        state = {**state, "__qatjax__": {"version": 1}}
    old = tmp_path / f"v{version}.msgpack"
    old.write_bytes(flax.serialization.msgpack_serialize(state))
    loaded = checkpoint.load(old)
    assert "__qatjax__" not in loaded
    _assert_trees_equal(loaded, variables)
    _assert_trees_equal(checkpoint.load(old, target=variables), variables)
    assert str(qatjax.quant_report(loaded)) == str(qatjax.quant_report(variables))


def test_save_is_atomic_and_an_interrupt_leaves_nothing(tmp_path, monkeypatch):
    variables, path = _saved_model(tmp_path)
    before = pathlib.Path(path).read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    if os.name == "posix":  # a new file's permissions are the umask's (not a temporary file's 0600)
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)  # Ctrl-C in the middle of writing
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "new.msgpack", variables)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"params": {}}, overwrite=True)
    assert os.listdir(tmp_path) == ["model.msgpack"]  # no partial file, no temporary file
    assert pathlib.Path(path).read_bytes() == before


# -- (3) resuming ----------------------------------------------------------------------


def test_resumed_calibration_equals_an_uninterrupted_one(tmp_path):
    cfg = QatConfig(activation_observer="histogram", activation_estimator="percentile")
    model, data, init, part = _partly_calibrated(cfg, n=2)
    full = qatjax.calibrate(model, init, data)

    path = checkpoint.save(tmp_path / "part.msgpack", part)
    resumed = qatjax.calibrate(model, checkpoint.load(path, target=init), data[2:], reset=False)
    _assert_trees_equal(nn.meta.unbox(resumed["quant_params"]), nn.meta.unbox(full["quant_params"]))
    _assert_trees_equal(resumed["quant_stats"], full["quant_stats"])
    _assert_trees_equal(qatjax.convert(resumed), qatjax.convert(full))


@pytest.mark.parametrize("tx", [optax.sgd(0.05, momentum=0.9), optax.adam(1e-2)],
                         ids=["sgd_momentum", "adam"])
def test_resumed_training_equals_an_uninterrupted_run(tmp_path, tx):
    cfg = QatConfig(activation_observer="histogram", activation_estimator="percentile")
    model, data = MLP(cfg), _batches(6, seed=3)
    variables = qatjax.calibrate(model, model.init(jax.random.key(0), data[0]), data[:2])
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params, opt_state, x):
        def loss_fn(p):
            return jnp.mean(model.apply({"params": p, **rest}, x, mode="train") ** 2)
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def run(state, batches):
        for x in batches:
            state = step(*state, x)
        return state

    start = (variables["params"], tx.init(variables["params"]))
    uninterrupted = run(start, data[2:])

    half = run(start, data[2:4])
    path = checkpoint.save(tmp_path / "train.msgpack", {"params": half[0], "opt_state": half[1]})
    fresh = model.init(jax.random.key(7), data[0])["params"]  # other values, same structure
    loaded = checkpoint.load(path, target={"params": fresh, "opt_state": tx.init(fresh)})
    assert isinstance(loaded["params"]["QatDense_0"]["kernel"], nn.Partitioned)
    resumed = run((loaded["params"], loaded["opt_state"]), data[4:])
    _assert_trees_equal(resumed, uninterrupted)


# -- (4) unhashable modules ------------------------------------------------------------


class Unhashable(nn.Module):
    config: QatConfig
    extra: dict  # like a Hugging Face module's config: makes the module unhashable

    @nn.compact
    def __call__(self, x, mode=None):
        x = nn.relu(QatDense(16, config=self.config)(x, mode=mode))
        return QatDense(4, config=self.config)(x, mode=mode)


class Hashable(nn.Module):
    config: QatConfig
    extra: tuple = ()

    @nn.compact
    def __call__(self, x, mode=None):
        x = nn.relu(QatDense(16, config=self.config)(x, mode=mode))
        return QatDense(4, config=self.config)(x, mode=mode)


def test_calibrate_and_finalize_work_on_an_unhashable_module():
    from qatjax.flax import model as model_lib

    cfg = QatConfig(activation_observer="minmax", activation_estimator="minmax")
    data = _batches()
    model = Unhashable(cfg, {"hidden_size": 16})
    with pytest.raises(TypeError):
        hash(model)
    twin = Hashable(cfg)
    init = model.init(jax.random.key(0), data[0])
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(
        twin.init(jax.random.key(0), data[0]))

    expected = qatjax.calibrate(twin, init, data)
    got = qatjax.calibrate(model, init, data)
    _assert_trees_equal(got, expected)
    got2, report = qatjax.calibrate_model(model, init, data)
    _assert_trees_equal(got2, expected)
    assert len(report.layers) == 2
    _assert_trees_equal(qatjax.finalize(model, got, data[0]), expected)

    # Compiled once per live module (cached by identity), and not kept alive by the cache.
    args = (model_lib._FINALIZE, ("quant_params", "params"), ())
    assert model_lib._jitted_apply(model, *args) is model_lib._jitted_apply(model, *args)
    assert model_lib._jitted_apply(twin, *args) is model_lib._jitted_apply(twin, *args)
    key = id(model)
    assert key in model_lib._APPLY_BY_ID
    del model
    gc.collect()
    assert key not in model_lib._APPLY_BY_ID


@pytest.mark.parametrize("cfg", [
    QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_group", weight_group_size=8),
    QatConfig(weight_format="int8", activation_format="fp8_e4m3", activation_scaling="dynamic"),
], ids=["w4-group-only", "int8-x-fp8"])
def test_models_converted_before_named_descriptors_still_serve(cfg):
    """Before the recipe was stored by name every dense layer served [N, K] codes and [N, G]
    scales; such converted variables (int32 descriptors) must serve what they did."""
    layer = QatDense(12, config=cfg)
    x = jax.random.normal(jax.random.key(0), (3, 16))
    served = qatjax.convert(layer.init(jax.random.key(1), x))
    want = layer.apply(served, x, mode="infer")
    qp = dict(served["quant_params"])
    assert qp["kernel_codes"].shape == (16, 12)  # today's layout for these layers: [K, N]
    old = {**qp, **_old_descriptors(cfg), "kernel_codes": qp["kernel_codes"].T,
           "kernel_scale": jnp.asarray(qp["kernel_scale"]).T,
           "kernel_zero_point": jnp.asarray(qp["kernel_zero_point"]).T}
    got = layer.apply({**served, "quant_params": old}, x, mode="infer")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
