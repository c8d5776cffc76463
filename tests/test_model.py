"""Model tools: calibrate, report, convert, export / import, checkpoints, multi-device calibration."""

import dataclasses
import functools

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax.config import QatConfig
from qatjax.flax import QatConv, QatDense


class Net(nn.Module):
    config: QatConfig
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, mode=None):
        kw = dict(config=self.config, axis_name=self.axis_name)
        x = nn.relu(QatConv(4, (3, 3), **kw)(x, mode=mode))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(QatDense(16, **kw)(x, mode=mode))
        return QatDense(3, **kw)(x, mode=mode)


def _batches(n=4, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, (8, 6, 6, 2)) for k in keys]


def _calibrated(cfg, batches=None):
    batches = batches or _batches()
    model = Net(cfg)
    v = model.init(jax.random.key(1), batches[0])
    return model, qatjax.calibrate(model, v, batches)


@pytest.mark.parametrize("estimator", ["minmax", "percentile", "entropy", "mse"])
def test_calibrate_fills_quant_params_with_the_configured_estimator(estimator):
    cfg = QatConfig(activation_estimator=estimator)
    batches = _batches()
    model, v = _calibrated(cfg, batches)
    layer = v["quant_params"]["QatDense_0"]
    assert layer["input_scale"].shape == () and float(layer["input_scale"]) > 0
    # The layer's estimate equals the estimator on a histogram of the layer's inputs.
    _, inter = model.apply(v, batches[0], mode="float", capture_intermediates=True,
                           mutable=["intermediates"])
    xs = [model.apply(v, b, mode="float", capture_intermediates=True, mutable=["intermediates"])[1]
          for b in batches]
    obs = qatjax.calibration.histogram(cfg.num_bins)
    state = obs.init()
    for inter in xs:
        conv_out = inter["intermediates"]["QatConv_0"]["__call__"][0]
        state = obs.update(state, jax.nn.relu(conv_out).reshape(8, -1))
    kwargs = {"p": cfg.percentile} if estimator == "percentile" else {}
    ref = qatjax.calibration.estimate(state, qatjax.int8, estimator, **kwargs)
    assert float(layer["input_scale"]) == float(ref.scale)
    # Infer mode then runs, and equals train mode bit for bit.
    np.testing.assert_array_equal(np.asarray(model.apply(v, batches[0], mode="infer")),
                                  np.asarray(model.apply(v, batches[0], mode="train")))


def test_uint8_affine_activations_after_calibration():
    cfg = QatConfig(activation_format="uint8", activation_symmetric=False, activation_estimator="mse")
    model, v = _calibrated(cfg)
    zp = v["quant_params"]["QatDense_0"]["input_zero_point"]
    assert zp.dtype == jnp.int32 and 0 <= int(zp) <= 255
    x = _batches(1, seed=5)[0]
    served = qatjax.convert(v)
    np.testing.assert_array_equal(np.asarray(model.apply(served, x, mode="infer")),
                                  np.asarray(model.apply(v, x, mode="train")))


def test_report_lists_every_layer():
    model, v = _calibrated(QatConfig(activation_estimator="entropy"))
    report = qatjax.quant_report(v)
    assert [r.path for r in report.layers] == ["QatConv_0", "QatDense_0", "QatDense_1"]
    text = str(report)
    assert "entropy" in text and "int8 per_channel" in text
    for r in report.layers:
        assert 0.0 <= r.saturation < 0.05 and r.nonfinite_skipped == 0
        assert r.input_scale > 0 and r.weight_scale_min > 0
    v2, report2 = qatjax.calibrate_model(model, model.init(jax.random.key(1), _batches()[0]), _batches())
    # calibrate_model's report adds each layer's output error on the last batch.
    assert [dataclasses.replace(r, output_error=None) for r in report2.layers] == list(report.layers)
    assert all(0 < r.output_error < 0.05 for r in report2.layers)


def test_calibration_counts_and_skips_nonfinite_values():
    batches = _batches(2)
    batches[0] = batches[0].at[0, 0, 0, 0].set(jnp.nan).at[1, 0, 0, 0].set(jnp.inf)
    model, v = _calibrated(QatConfig(), batches)
    report = qatjax.quant_report(v)
    assert report.layers[0].nonfinite_skipped == 2
    assert np.isfinite(report.layers[0].input_scale)


def test_infer_and_convert_before_calibration_are_clear_errors():
    model = Net(QatConfig())
    v = model.init(jax.random.key(1), _batches(1)[0])
    with pytest.raises(ValueError, match="qatjax.calibrate"):
        model.apply(v, _batches(1)[0], mode="infer")
    with pytest.raises(ValueError, match="calibrate first"):
        qatjax.convert(v)
    with pytest.raises(ValueError, match="no batch"):
        qatjax.calibrate(model, v, [])
    with pytest.raises(ValueError, match="QatConv_0 observed no finite input"):
        qatjax.calibrate(model, v, [jnp.full((8, 6, 6, 2), jnp.nan)])


def test_float_checkpoint_loads_unchanged_and_calibrates():
    class FloatNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            x = x.reshape(x.shape[:-3] + (-1,))
            x = nn.relu(nn.Dense(16)(x))
            return nn.Dense(3)(x)

    x = _batches(1)[0]
    float_params = FloatNet().init(jax.random.key(3), x)["params"]
    float_params = {k.replace("Conv", "QatConv").replace("Dense", "QatDense"): p
                    for k, p in float_params.items()}
    model = Net(QatConfig())
    np.testing.assert_array_equal(np.asarray(model.apply({"params": float_params}, x, mode="float")),
                                  np.asarray(FloatNet().apply({"params": {
                                      k.replace("Qat", ""): p for k, p in float_params.items()}}, x)))
    v = qatjax.calibrate(model, {"params": float_params}, _batches())
    assert "input_scale" in v["quant_params"]["QatDense_1"]


def test_convert_stores_codes_only_and_export_round_trips():
    cfg = QatConfig(weight_format="int4")
    model, v = _calibrated(cfg)
    served = qatjax.convert(v)
    for name in ("QatConv_0", "QatDense_0", "QatDense_1"):
        assert "kernel" not in served["params"][name]
        codes = served["quant_params"][name]["kernel_codes"]
        assert codes.dtype == jnp.int8
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert served["quant_params"]["QatDense_0"]["kernel_codes"].shape == (16, 144)  # [out, in]
    assert "quant_stats" not in served
    # The input is not modified.
    assert "kernel" in v["params"]["QatDense_0"]
    exported = qatjax.quantize_model_weights(v)
    layer = exported["layers"]["QatDense_0"]
    assert layer["codes"].dtype == jnp.uint8 and layer["codes"].shape == (16, 72)  # packed
    imported = qatjax.dequantize_weights(exported)
    # Import gives exactly the fake-quantized kernels that train mode uses.
    w = v["params"]["QatDense_0"]["kernel"]
    wq = qatjax.qparams_from_amax(jnp.max(jnp.abs(w), axis=0, keepdims=True), qatjax.int4)
    np.testing.assert_array_equal(np.asarray(imported["QatDense_0"]["kernel"]),
                                  np.asarray(qatjax.fake_quant(w, wq, qatjax.int4)))
    np.testing.assert_array_equal(np.asarray(imported["QatDense_0"]["bias"]),
                                  np.asarray(v["params"]["QatDense_0"]["bias"]))


def test_per_group_affine_export_round_trip():
    cfg = QatConfig(weight_format="int4", weight_granularity="per_group", weight_group_size=8,
                    weight_symmetric=False)
    layer = QatDense(5, config=cfg.replace(activation_scaling="dynamic"))
    x = jnp.ones((2, 16))
    v = jax.jit(layer.init)(jax.random.key(0), x)
    exported = qatjax.quantize_model_weights(v)
    imported = qatjax.dequantize_weights(exported)

    @jax.jit
    def reference(kernel):
        g = qatjax.split_groups(kernel, 0, 8)  # [G, 8, N]
        qp = qatjax.qparams_from_minmax(g.min(1, keepdims=True), g.max(1, keepdims=True),
                                        qatjax.int4, symmetric=False)
        return qatjax.merge_groups(qatjax.fake_quant(g, qp, qatjax.int4), 0)

    np.testing.assert_array_equal(np.asarray(imported["kernel"]), np.asarray(reference(v["params"]["kernel"])))


class _ScanBody(nn.Module):
    config: QatConfig

    @nn.compact
    def __call__(self, x, _):
        return nn.relu(QatDense(12, config=self.config)(x)), None


class ScannedNet(nn.Module):
    """Three QatDense layers stacked by nn.scan: every variable gets a leading axis of 3."""

    config: QatConfig

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_ScanBody, variable_axes={"params": 0, "quant_stats": 0, "quant_params": 0},
                       split_rngs={"params": True}, length=3)
        return scan(self.config, name="blocks")(x, None)[0]


@pytest.mark.parametrize("cfg", [
    QatConfig(activation_observer="minmax", activation_estimator="minmax"),
    QatConfig(weight_format="int4", weight_granularity="per_group", weight_group_size=4,
              weight_symmetric=False, activation_observer="histogram", activation_estimator="mse"),
], ids=["int8", "int4-group-affine"])
def test_layers_stacked_by_nn_scan_calibrate_convert_report_and_export(cfg):
    model = ScannedNet(cfg)
    batches = [jax.random.normal(jax.random.key(i), (8, 12)) for i in range(3)]
    v = qatjax.calibrate(model, jax.jit(model.init)(jax.random.key(1), batches[0]), batches)
    layer_qp = v["quant_params"]["blocks"]["QatDense_0"]
    assert layer_qp["input_scale"].shape == (3,)
    x = batches[1]

    @functools.partial(jax.jit, static_argnums=2)
    def run(variables, x, mode):
        with qatjax.flax.quant_mode(mode):
            return model.apply(variables, x)

    y_train = run(v, x, "train")
    served = qatjax.convert(v)
    codes = served["quant_params"]["blocks"]["QatDense_0"]["kernel_codes"]
    assert codes.shape == (3, 12, 12) and "kernel" not in served["params"]["blocks"]["QatDense_0"]
    np.testing.assert_array_equal(np.asarray(run(served, x, "infer")), np.asarray(y_train))
    # Each stacked layer converts exactly as the same layer on its own would.
    kernels = v["params"]["blocks"]["QatDense_0"]["kernel"]
    single = QatDense(12, config=cfg.replace(activation_scaling="dynamic"))
    single_qp = jax.jit(single.init)(jax.random.key(0), x)["quant_params"]  # its recipe descriptors
    for i in range(3):
        own = qatjax.convert({"params": {"kernel": kernels[i], "bias": jnp.zeros(12)},
                              "quant_params": single_qp})
        np.testing.assert_array_equal(np.asarray(codes[i]), np.asarray(own["quant_params"]["kernel_codes"]))
    report = qatjax.quant_report(v)
    assert [r.path for r in report.layers] == [f"blocks/QatDense_0[{i}]" for i in range(3)]
    np.testing.assert_array_equal([r.input_scale for r in report.layers], np.asarray(layer_qp["input_scale"]))
    imported = qatjax.dequantize_weights(qatjax.quantize_model_weights(v))
    w_hat = imported["blocks"]["QatDense_0"]["kernel"]
    assert w_hat.shape == kernels.shape

    @jax.jit
    def reference(w):  # one layer's fake-quantized kernel
        if cfg.weight_granularity == "per_group":
            g = qatjax.split_groups(w, 0, 4)
            qp = qatjax.qparams_from_minmax(g.min(1, keepdims=True), g.max(1, keepdims=True),
                                            cfg.weight_format, symmetric=False)
            return qatjax.merge_groups(qatjax.fake_quant(g, qp, cfg.weight_format), 0)
        qp = qatjax.qparams_from_amax(jnp.max(jnp.abs(w), axis=0, keepdims=True), cfg.weight_format)
        return qatjax.fake_quant(w, qp, cfg.weight_format)

    for i in range(3):
        np.testing.assert_array_equal(np.asarray(w_hat[i]), np.asarray(reference(kernels[i])))


def test_stacked_layers_with_different_recipes_are_refused():
    spec = jnp.stack([qatjax.flax.specs.describe(QatConfig())["kernel_spec"],
                      qatjax.flax.specs.describe(QatConfig(weight_format="int4"))["kernel_spec"]])
    with pytest.raises(ValueError, match="kernel_spec"):
        qatjax.flax.specs.parse_kernel_spec(spec)


def test_partitioned_kernels_keep_their_sharding_names_through_convert():
    """``nn.with_partitioning`` boxes: the tools read through them, and the served codes and
    scales carry the kernel's names (dense codes are [out, in], so the names swap)."""
    from jax.sharding import PartitionSpec as P

    cfg = QatConfig(activation_observer="minmax", activation_estimator="minmax")
    init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    model = QatDense(8, config=cfg, kernel_init=init)
    x = jax.random.normal(jax.random.key(0), (4, 16))
    v = qatjax.calibrate(model, model.init(jax.random.key(1), x), [x])
    assert isinstance(v["params"]["kernel"], nn.Partitioned)
    served = qatjax.convert(v)
    specs = nn.get_partition_spec(served)["quant_params"]
    assert specs["kernel_codes"] == P("mlp", "embed") and specs["kernel_scale"] == P("mlp")
    with qatjax.flax.quant_mode("train"):
        y_train = model.apply(v, x)
    with qatjax.flax.quant_mode("infer"):
        np.testing.assert_array_equal(np.asarray(model.apply(served, x)), np.asarray(y_train))
    assert len(qatjax.quant_report(v).layers) == 1
    imported = qatjax.dequantize_weights(qatjax.quantize_model_weights(v))
    w = v["params"]["kernel"].value
    qp = qatjax.qparams_from_amax(jnp.max(jnp.abs(w), axis=0, keepdims=True), qatjax.int8)
    np.testing.assert_array_equal(np.asarray(imported["kernel"]), np.asarray(qatjax.fake_quant(w, qp, qatjax.int8)))


def _assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_collection_round_trips_through_flax_serialization_and_orbax(tmp_path):
    model, v = _calibrated(QatConfig(activation_format="uint8", activation_symmetric=False))
    for variables in (v, qatjax.convert(v)):
        restored = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(variables))
        _assert_trees_equal(restored, variables)
    import orbax.checkpoint as ocp

    path = tmp_path / "orbax"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, v)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, v)
    _assert_trees_equal(restored, v)
    x = _batches(1, seed=9)[0]
    infer = jax.jit(lambda variables, x: model.apply(variables, x, mode="infer"))
    np.testing.assert_array_equal(np.asarray(infer(restored, x)), np.asarray(infer(v, x)))
    # qatjax.checkpoint: a file that never overwrites silently, loaded back exactly.
    f = tmp_path / "model.msgpack"
    qatjax.checkpoint.save(f, v)
    with pytest.raises(FileExistsError):
        qatjax.checkpoint.save(f, v)
    loaded = flax.serialization.from_state_dict(v, qatjax.checkpoint.load(f))
    _assert_trees_equal(loaded, v)
    # The report works on a restored checkpoint without the model.
    assert str(qatjax.quant_report(qatjax.checkpoint.load(f))) == str(qatjax.quant_report(v))


def _shard_map():
    return qatjax.calibration.shard_map


@pytest.mark.parametrize("estimator,symmetric", [("entropy", True), ("mse", False)])
def test_calibration_over_8_devices_equals_single_device(estimator, symmetric):
    n = jax.local_device_count()
    assert n == 8
    cfg = QatConfig(activation_estimator=estimator, activation_symmetric=symmetric,
                    activation_format="int8" if symmetric else "uint8")
    batches = _batches(3, seed=4)
    single = Net(cfg)
    v0 = single.init(jax.random.key(1), batches[0])
    ref = qatjax.calibrate(single, v0, batches)

    model = Net(cfg, axis_name="batch")
    params = v0["params"]

    def step(stats, x):
        _, upd = model.apply({"params": params, "quant_stats": stats}, x, mode="calibrate",
                             mutable=["quant_stats"])
        return upd["quant_stats"]

    # pmap: each device sees 1/8 of every batch.
    stats = jax.tree_util.tree_map(lambda a: jnp.stack([a] * n), v0["quant_stats"])
    pstep = jax.pmap(step, axis_name="batch")
    for b in batches:
        stats = pstep(stats, b.reshape((n, -1) + b.shape[1:]))
    # The first layer sees the raw batch: its statistics are bit-identical. Deeper layers see
    # activations that XLA:CPU computes with batch-size-dependent blocking (last-bit
    # differences in the float convolution itself), so they are compared to float rounding.
    for d in range(n):
        local = jax.tree_util.tree_map(lambda a: a[d], stats)
        _assert_stats_match(local, ref["quant_stats"])

    # shard_map over a 1-D mesh, same result.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    P = jax.sharding.PartitionSpec
    sstep = jax.jit(_shard_map()(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P()))
    stats = v0["quant_stats"]
    for b in batches:
        stats = sstep(stats, b)
    _assert_stats_match(stats, ref["quant_stats"])
    # Finalizing the multi-device statistics gives the single-device qparams.
    fin = qatjax.finalize(single, {"params": params, "quant_stats": stats}, batches[0])
    _assert_trees_equal(fin["quant_params"]["QatConv_0"], ref["quant_params"]["QatConv_0"])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                                   rtol=1e-5),
                           fin["quant_params"], ref["quant_params"])


def _assert_stats_match(got, ref):
    _assert_trees_equal(got["QatConv_0"], ref["QatConv_0"])
    for name in ("QatDense_0", "QatDense_1"):
        a, b = got[name]["input"], ref[name]["input"]
        np.testing.assert_allclose(np.asarray(a.hi), np.asarray(b.hi), rtol=1e-6)
        assert int(a.exponent) == int(b.exponent)
        assert int(np.abs(np.asarray(a.counts) - np.asarray(b.counts)).sum()) <= 2


class _PlainFloat(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(nn.relu(nn.Dense(8, name="body")(x)))


def test_model_tools_refuse_what_would_do_nothing():
    x = np.random.RandomState(0).randn(4, 16).astype(np.float32)
    plain = _PlainFloat()
    variables = plain.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"convert: `variables` has no 'params' collection.*"
                                         r"not variables\['params'\]"):
        qatjax.convert(variables["params"])
    for call, name in ((lambda: qatjax.convert(variables), "convert"),
                       (lambda: qatjax.quant_report(variables), "quant_report"),
                       (lambda: qatjax.quantize_model_weights(variables), "convert"),
                       (lambda: qatjax.calibrate(plain, variables, [x]), "calibrate")):
        with pytest.raises(ValueError, match=name + r": `variables` hold no quantization state"):
            call()
    with pytest.raises(TypeError, match="`variables` must be the model's variables dict"):
        qatjax.convert([variables])


def test_variables_of_another_recipe_are_refused_naming_layer_and_both_recipes():
    x = np.random.RandomState(0).randn(8, 16).astype(np.float32)
    int8 = QatDense(8, config=QatConfig(activation_observer="minmax", activation_estimator="minmax"))
    variables = qatjax.calibrate(int8, int8.init(jax.random.key(0), x), [x])
    converted = qatjax.convert(variables)
    other = {
        "uint8": QatConfig(activation_format="uint8", activation_symmetric=False,
                           activation_observer="minmax", activation_estimator="minmax"),
        "int4": QatConfig(weight_format="int4", activation_observer="minmax",
                          activation_estimator="minmax"),
        "int8 per tensor": QatConfig(weight_granularity="per_tensor", activation_observer="minmax",
                                     activation_estimator="minmax"),
    }
    for name, cfg in other.items():
        model = QatDense(8, config=cfg)
        for v in (variables, converted):
            for mode in ("train", "infer") if v is variables else ("infer",):
                # Eagerly: a ValueError naming the layer and both recipes.
                with pytest.raises(ValueError, match=r"QatDense .*another recipe.*stored \{format="
                                                     r"'(u?int\d)'.*config \{format="):
                    model.apply(v, x, mode=mode)
                # Under jit with the variables as arguments: an error at trace time when the
                # descriptors differ in length, else NaN outputs (never a silent answer).
                try:
                    y = jax.jit(lambda v, x, m=mode: model.apply(v, x, mode=m))(v, x)
                except ValueError as e:
                    assert "another recipe" in str(e), name
                else:
                    assert np.isnan(np.asarray(y)).all(), name
    # The same recipe still runs, eagerly and under jit.
    same = QatDense(8, config=QatConfig(activation_observer="minmax", activation_estimator="minmax"))
    np.testing.assert_array_equal(jax.jit(lambda v: same.apply(v, x, mode="infer"))(converted),
                                  int8.apply(variables, x, mode="train"))


def test_report_measures_each_layers_own_output_error_against_float():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x, mode=None):
            cfg = QatConfig(activation_observer="minmax", activation_estimator="minmax",
                            weight_format="int4")
            h = QatDense(16, config=cfg, name="a")(x, mode=mode)
            return QatDense(4, config=cfg, name="b")(jnp.tanh(h), mode=mode)

    x = np.random.RandomState(1).randn(32, 8).astype(np.float32)
    model = Two()
    variables, report = qatjax.calibrate_model(model, model.init(jax.random.key(0), x), [x])
    errors = {r.path: r.output_error for r in report.layers}

    def rel(y, ref):
        y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
        return np.linalg.norm(y - ref) / np.linalg.norm(ref)

    # Layer a: its quantized output against its float output on the batch.
    layer_a = QatDense(16, config=QatConfig(activation_observer="minmax",
                                            activation_estimator="minmax", weight_format="int4"))
    va = {c: t["a"] for c, t in variables.items() if "a" in t}
    ya_f = layer_a.apply(va, x, mode="float")
    ya_q = layer_a.apply(va, x, mode="infer")
    assert errors["a"] == pytest.approx(rel(ya_q, ya_f), rel=1e-4)
    # Layer b gets the *float* model's input, so its error is its own.
    hb = jnp.tanh(ya_f)
    vb = {c: t["b"] for c, t in variables.items() if "b" in t}
    layer_b = QatDense(4, config=layer_a.config)
    assert errors["b"] == pytest.approx(
        rel(layer_b.apply(vb, hb, mode="infer"), layer_b.apply(vb, hb, mode="float")), rel=1e-4)
    assert 0 < errors["b"] < 1 and "out err" in str(report)
    # Without a model the column is empty; converted variables have no float kernels to compare.
    assert all(r.output_error is None for r in qatjax.quant_report(variables).layers)
    with pytest.raises(ValueError, match="output errors need the float kernels"):
        qatjax.quant_report(qatjax.convert(variables), model, x)


class _Heads(nn.Module):
    """Three layers reading one input (an attention's query / key / value) and one reading
    another."""

    config: QatConfig

    @nn.compact
    def __call__(self, x):
        q, k, v = (QatDense(8, config=self.config, name=n)(x) for n in ("q", "k", "v"))
        return QatDense(4, config=self.config, name="out")(nn.relu(q * k + v))


@pytest.mark.parametrize("observer", ["histogram", "minmax"])
def test_layers_reading_one_tensor_observe_it_once_with_the_same_statistics(observer, monkeypatch):
    """Under quant_mode("calibrate") the observer update runs once per distinct input (2 per
    call, not 4); every layer's statistics equal those of observing on its own, bit for bit,
    also when one layer's state differs from its siblings' (it then updates its own)."""
    cfg = QatConfig(activation_observer=observer,
                    activation_estimator="mse" if observer == "histogram" else "minmax")
    model = _Heads(cfg)
    xs = [jax.random.normal(jax.random.key(i), (16, 12)) * (1 + i) for i in range(3)]
    variables = model.init(jax.random.key(9), xs[0])
    executed = []
    real = qatjax.quantizers.ActivationQuantizer._observer

    def counting(self):
        obs = real(self)

        def update(state, x, axis_name=None):
            jax.debug.callback(lambda: executed.append(1))
            return obs.update(state, x, axis_name=axis_name)

        return obs._replace(update=update)

    monkeypatch.setattr(qatjax.quantizers.ActivationQuantizer, "_observer", counting)

    @jax.jit
    def step(v, x):
        with qatjax.flax.quant_mode("calibrate"):
            return model.apply(v, x, mutable=["quant_stats"])[1]["quant_stats"]

    def own(v, x):  # each layer observes on its own: no shared record
        with monkeypatch.context() as m:
            m.setattr(qatjax.quantizers, "_SHARED_MAX", 0)
            with qatjax.flax.quant_mode("calibrate"):
                return model.apply(v, x, mutable=["quant_stats"])[1]["quant_stats"]

    stats = dict(variables["quant_stats"])
    for x in xs[:2]:
        executed.clear()
        new = step({"params": variables["params"], "quant_stats": stats}, x)
        jax.effects_barrier()
        assert len(executed) == 2
        expected = own({"params": variables["params"], "quant_stats": stats}, x)
        jax.tree_util.tree_map(np.testing.assert_array_equal, new, expected)
        stats = new
    # "k" has also seen a batch of its own: its state differs, so it updates it itself.
    stats = dict(stats, k=own({"params": variables["params"], "quant_stats": stats}, xs[2])["k"])
    executed.clear()
    new = step({"params": variables["params"], "quant_stats": stats}, xs[0])
    jax.effects_barrier()
    assert len(executed) == 3
    expected = own({"params": variables["params"], "quant_stats": stats}, xs[0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, expected)
    assert not np.array_equal(jax.tree_util.tree_leaves(new["k"])[0],
                              jax.tree_util.tree_leaves(new["q"])[0])


def test_weight_export_of_a_smoothed_layer_keeps_its_input_smoothing():
    """SmoothQuant's ``input_smoothing`` travels with the exported weights, and
    ``dequantize_weights`` folds it back into the kernel rows: the float model on the
    imported params computes the smoothed layers' function (int8 weight error only)."""
    from qatjax.flax import ptq, quantize_model

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.relu(nn.Dense(16)(x)))

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (64, 12)) * jnp.linspace(0.1, 20.0, 12)
    params = model.init(jax.random.key(1), x)["params"]
    qmodel = quantize_model(model, QatConfig(activation_estimator="minmax"))
    smoothed = qatjax.calibrate(qmodel, ptq.smoothquant(qmodel, {"params": params}, [x], alpha=0.8),
                                [x])
    exported = qatjax.quantize_model_weights(smoothed)
    entry = exported["layers"]["Dense_0"]
    s = np.asarray(smoothed["quant_params"]["Dense_0"]["input_smoothing"])
    np.testing.assert_array_equal(entry["input_smoothing"], s)
    assert "input_smoothing" not in exported["layers"]["Dense_1"] or \
        "input_smoothing" in smoothed["quant_params"]["Dense_1"]
    imported = qatjax.dequantize_weights(exported)
    codes = np.asarray(entry["codes"], np.float64)  # [N, K] int8 codes, symmetric
    expected = (codes * np.asarray(entry["scale"], np.float64)[:, None]).T / s[:, None]
    np.testing.assert_allclose(imported["Dense_0"]["kernel"], expected, rtol=1e-6)
    y = model.apply({"params": params}, x)
    err = lambda p: float(jnp.linalg.norm(model.apply({"params": p}, x) - y) / jnp.linalg.norm(y))
    assert err(imported) < 2e-2
    unfolded = jax.tree_util.tree_map(lambda a: a, imported)
    unfolded["Dense_0"]["kernel"] = imported["Dense_0"]["kernel"] * s[:, None]
    assert err(unfolded) > 10 * err(imported)
