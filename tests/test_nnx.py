"""The NNX front end: drop-ins bit-identical with the linen layers and with the NNX layers in
float mode, quantization state as typed NNX variables, in-place quantization of an
unmodified model sharing its variables, the model tools, and a plain nnx.Optimizer loop."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qatjax
import qatjax.nnx as qnnx
from qatjax import QatConfig
from qatjax.flax import QatConv as LinenConv
from qatjax.flax import QatDense, QatDenseGeneral, QatEinsum as LinenEinsum

RNG = np.random.RandomState(0)
MINMAX = dict(activation_observer="minmax", activation_estimator="minmax")
CONFIGS = {
    "int8-static": QatConfig(**MINMAX),
    "uint8-affine-mse": QatConfig(activation_format="uint8", activation_symmetric=False,
                                  weight_symmetric=False),
    "int4-group-lsq": QatConfig(weight_format="int4", weight_granularity="per_group",
                                weight_group_size=8, learnable_scales=True, **MINMAX),
    "per-token": QatConfig(activation_scaling="dynamic", activation_granularity="per_token"),
    "fp8-delayed": QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                             weight_granularity="per_tensor", fp8_scaling="delayed"),
    "fp8-current": QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                             weight_granularity="per_tensor", fp8_scaling="current"),
}


def _cases():
    x2 = RNG.randn(6, 16).astype(np.float32)
    x3 = RNG.randn(2, 5, 16).astype(np.float32)
    img = RNG.randn(2, 6, 6, 4).astype(np.float32)
    return {
        "linear": (lambda cfg, rngs: qnnx.QatLinear(16, 8, config=cfg, rngs=rngs),
                   lambda cfg: QatDense(8, config=cfg), x2),
        "linear-general": (lambda cfg, rngs: qnnx.QatLinearGeneral(16, (2, 4), config=cfg, rngs=rngs),
                           lambda cfg: QatDenseGeneral((2, 4), config=cfg), x3),
        "conv": (lambda cfg, rngs: qnnx.QatConv(4, 8, (3, 3), config=cfg, rngs=rngs),
                 lambda cfg: LinenConv(8, (3, 3), config=cfg), img),
        "einsum": (lambda cfg, rngs: qnnx.QatEinsum("btd,dh->bth", (16, 8), config=cfg, rngs=rngs),
                   lambda cfg: LinenEinsum((16, 8), "btd,dh->bth", config=cfg, use_bias=False), x3),
    }


CASES = _cases()


@functools.partial(nnx.jit, static_argnames="mode")
def _run(model, x, mode, mask=None):
    """``model(x)`` (with ``mask`` if given) under ``quant_mode(mode)``, compiled: the mode acts
    at trace time, and it is a static argument, so each mode has its own trace."""
    with qnnx.quant_mode(mode):
        return model(x) if mask is None else model(x, mask=mask)


def _linen_twin_variables(layer, linen, x):
    """The linen layer's variables initialised on the NNX layer's params (as a float
    checkpoint loads)."""
    v = linen.init(jax.random.key(1), x)
    return {**v, "params": {**v["params"], **{k: getattr(layer, k)[...] for k in ("kernel", "bias")
                                             if getattr(layer, k, None) is not None}}}


# Every recipe on the dense layer; the others on the recipes that change their code paths
# (per-token activations do not apply to convolutions, the fp8 recipe is the dense layer's).
GRID = ([("linear", cfg) for cfg in CONFIGS if cfg != "int8-static"]
        + [("linear-general", "int8-static"), ("conv", "int8-static"),
           ("einsum", "int4-group-lsq")])


@pytest.mark.parametrize("case,cfg_name", GRID)
def test_drop_ins_match_the_nnx_layer_in_float_and_linen_in_every_mode(case, cfg_name):
    make_nnx, make_linen, x = CASES[case]
    cfg = CONFIGS[cfg_name]
    layer = make_nnx(cfg, nnx.Rngs(0))
    plain = {"linear": lambda: nnx.Linear(16, 8, rngs=nnx.Rngs(0)),
             "linear-general": lambda: nnx.LinearGeneral(16, (2, 4), rngs=nnx.Rngs(0)),
             "conv": lambda: nnx.Conv(4, 8, (3, 3), rngs=nnx.Rngs(0)),
             "einsum": lambda: nnx.Einsum("btd,dh->bth", (16, 8), rngs=nnx.Rngs(0))}[case]()
    np.testing.assert_array_equal(layer.kernel[...], plain.kernel[...])  # same init from rngs
    np.testing.assert_array_equal(layer(x, mode="float"), plain(x))

    linen = make_linen(cfg)
    v = _linen_twin_variables(layer, linen, x)
    if cfg.activation_scaling == "static" and cfg.fp8_scaling is None:
        qnnx.calibrate(layer, [x, 0.5 * x])
        v = qatjax.calibrate(linen, v, [x, 0.5 * x])
    for mode in ("train", "infer", "train"):  # fp8 histories advance alike in both
        y_linen, updates = linen.apply(v, x, mode=mode, mutable=True)
        v = {**v, **updates}
        np.testing.assert_array_equal(layer(x, mode=mode), y_linen, err_msg=mode)
    # The model tools: the same export, and the same served outputs after convert.
    for a, b in zip(jax.tree.leaves(qnnx.quantize_model_weights(layer)),
                    jax.tree.leaves(qatjax.quantize_model_weights(v)), strict=True):
        np.testing.assert_array_equal(a, b)
    qnnx.convert(layer)
    served = qatjax.convert(v)
    np.testing.assert_array_equal(layer(x, mode="infer"),
                                  linen.apply(served, x, mode="infer", mutable=True)[0])


def test_state_is_typed_nnx_variables_and_lsq_scales_are_params():
    layer = qnnx.QatLinear(16, 8, config=CONFIGS["int4-group-lsq"], rngs=nnx.Rngs(0))
    x = RNG.randn(4, 16).astype(np.float32)
    qnnx.calibrate(layer, [x])
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    assert {"kernel", "bias", "kernel_scale", "input_scale"} <= set(params)
    assert set(nnx.to_pure_dict(nnx.state(layer, qnnx.QuantParams))) >= {"kernel_spec", "input_spec"}
    assert set(nnx.to_pure_dict(nnx.state(layer, qnnx.QuantStats))) == {"input"}
    graphdef, p, rest = nnx.split(layer, nnx.Param, ...)
    assert _run(nnx.merge(graphdef, p, rest), x, "train").shape == (4, 8)


class _Net(nnx.Module):
    """An unmodified NNX model: plain nnx layers in a list and as attributes."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3,), rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(8, 32, rngs=rngs), nnx.Linear(32, 8, rngs=rngs)])
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x)).mean(1)
        h = self.blocks[1](jax.nn.relu(self.blocks[0](h)))
        return self.head(h)


def test_quantize_model_in_place_shares_variables_and_equals_the_linen_tools():
    x = RNG.randn(16, 10, 3).astype(np.float32)
    net = _Net(nnx.Rngs(0))
    y_float = _run(net, x, "float")  # the unmodified model (no qatjax layer: mode unused)
    kernel = net.blocks[0].kernel
    before = sum(a.nbytes for a in jax.live_arrays())
    qnnx.quantize_model(net, QatConfig(**MINMAX), rules=[("head", None)])
    added = sum(a.nbytes for a in jax.live_arrays()) - before
    model_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(net, nnx.Param)))
    assert net.blocks[0].kernel is kernel and isinstance(net.head, nnx.Linear)
    assert not isinstance(net.head, qnnx.QatLinear)
    assert added < 0.25 * model_bytes, (added, model_bytes)  # descriptors and observers only
    np.testing.assert_array_equal(_run(net, x, "float"), y_float)
    qnnx.calibrate(net, [x])
    report = qnnx.quant_report(net, x)
    assert [r.path for r in report.layers] == ["blocks/0", "blocks/1", "conv"]
    assert all(0 < r.output_error < 0.05 for r in report.layers)
    y_train = _run(net, x, "train")
    exported = qnnx.quantize_model_weights(net)
    assert set(exported["layers"]) == {"blocks/0", "blocks/1", "conv"}
    qnnx.convert(net)
    assert net.blocks[0].kernel is None and net.blocks[0].kernel_codes[...].dtype == jnp.int8
    np.testing.assert_array_equal(_run(net, x, "infer"), y_train)
    with pytest.raises(ValueError, match=r"rule pattern\(s\) \['haed'\] matched no module"):
        qnnx.quantize_model(_Net(nnx.Rngs(0)), QatConfig(), rules=[("haed", None)])
    with pytest.raises(TypeError, match="linen models go to qatjax.flax.quantize_model"):
        qnnx.quantize_model(nn.Dense(3), QatConfig())


def test_a_plain_nnx_optimizer_qat_loop_trains_kernels_and_lsq_scales():
    x = np.random.RandomState(0).randn(64, 10, 3).astype(np.float32)  # its own data, any order
    y = (x.mean((1, 2)) > 0).astype(np.int32)
    net = qnnx.quantize_model(_Net(nnx.Rngs(0)), CONFIGS["int4-group-lsq"].replace(
        weight_group_size=None, weight_granularity="per_channel"))
    qnnx.calibrate(net, [x])
    initial = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    optimizer = nnx.Optimizer(net, optax.adam(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(net, optimizer, x, y):
        def loss_fn(net):
            with qnnx.quant_mode("train"):
                logits = net(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        optimizer.update(net, grads)
        return loss, grads

    losses, first = [], None
    for _ in range(15):
        loss, grads = step(net, optimizer, x, y)
        losses.append(float(loss))
        first = nnx.to_pure_dict(grads) if first is None else first
    assert losses[-1] < 0.8 * losses[0]
    assert np.abs(nnx.to_pure_dict(grads)["blocks"][0]["kernel"]).sum() > 0
    # The LSQ scales are parameters: they get gradients, and the optimizer moves them. (Checked
    # on the first step: Adam's steps of 2e-3 can drive a small activation scale to its floor,
    # float32 eps, where its gradient is exactly 0.)
    trained = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    for name in ("kernel", "kernel_scale", "input_scale"):
        assert np.abs(first["blocks"][0][name]).sum() > 0, name
        assert not np.array_equal(trained["blocks"][0][name], initial["blocks"][0][name]), name


def test_a_checkpoint_restored_mid_training_reproduces_the_next_step(tmp_path):
    cfg = QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                    weight_granularity="per_tensor", fp8_scaling="delayed")
    x = RNG.randn(32, 10, 3).astype(np.float32)
    y = (x.mean((1, 2)) > 0).astype(np.int32)

    def build(seed):
        net = qnnx.quantize_model(_Net(nnx.Rngs(seed)), cfg, rules=[("conv", None)])
        return net, nnx.Optimizer(net, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(net, optimizer, x, y):
        def loss_fn(net):
            with qnnx.quant_mode("train"):
                return optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        optimizer.update(net, grads)
        return loss

    net, optimizer = build(0)
    for _ in range(3):
        step(net, optimizer, x, y)
    path = str(tmp_path / "ckpt.msgpack")
    qatjax.checkpoint.save(path, {"model": qnnx.collections(net),
                                  "opt": nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState))})
    history = net.blocks[0].input_amax_history[...]
    expected = float(step(net, optimizer, x, y))

    restored, optimizer2 = build(1)  # other weights, empty histories
    loaded = qatjax.checkpoint.load(path)
    qnnx.set_collections(restored, loaded["model"])
    opt_state = nnx.state(optimizer2, nnx.OptState)
    nnx.replace_by_pure_dict(opt_state, loaded["opt"])
    nnx.update(optimizer2, opt_state)
    np.testing.assert_array_equal(restored.blocks[0].input_amax_history[...], history)
    assert float(step(restored, optimizer2, x, y)) == expected
    for a, b in zip(jax.tree.leaves(nnx.state(net, nnx.Param)),
                    jax.tree.leaves(nnx.state(restored, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a, b)


class _Block(nnx.Module):
    """An unmodified NNX transformer block: attention (jax.nn.dot_product_attention inside
    nnx.MultiHeadAttention), then an MLP."""

    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=32,
                                           decode=False, rngs=rngs)
        self.up = nnx.Linear(32, 64, rngs=rngs)
        self.down = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x, mask=None):
        x = x + self.attn(x, mask=mask)
        return x + self.down(nnx.relu(self.up(x)))


def test_an_unmodified_nnx_transformer_block_is_quantized_by_rules_attention_einsums_included():
    x = RNG.randn(2, 6, 32).astype(np.float32)
    block = _Block(nnx.Rngs(0))
    y_float = _run(block, x, "float")  # the unmodified block (no qatjax layer: mode unused)
    qnnx.quantize_model(block, QatConfig(activation_scaling="dynamic",
                                         activation_granularity="per_token"),
                        rules=[("attn", QatConfig(**MINMAX)), ("attn/(query|key|value|out)",
                                                                 QatConfig(**MINMAX))])
    np.testing.assert_array_equal(_run(block, x, "float"), y_float)
    qnnx.calibrate(block, [x])
    paths = [r.path for r in qnnx.quant_report(block, x).layers]
    assert {"attn/einsum0 lhs", "attn/einsum0 rhs", "attn/einsum1 lhs", "attn/einsum1 rhs",
            "attn/query", "up", "down"} <= set(paths)
    y_train = _run(block, x, "train")
    # A causal mask holds in the quantized attention: later tokens do not move earlier ones.
    causal = nnx.make_causal_mask(jnp.ones((2, 6)))
    changed = x.copy()
    changed[:, 4:] += 1.0
    np.testing.assert_array_equal(_run(block, x, "train", causal)[:, :4],
                                  _run(block, changed, "train", causal)[:, :4])
    rel = np.linalg.norm(y_train - y_float) / np.linalg.norm(y_float)
    assert 0 < rel < 0.05
    qnnx.convert(block)
    np.testing.assert_array_equal(_run(block, x, "infer"), y_train)


def _assert_calibrations_match(a, b, exact):
    """The quantization state of two calibrated models: layer ``exact`` bit for bit; the
    others' float statistics and scales to float rounding (relative to the layer's largest
    value: a minimum |x| near 0 comes out of a cancellation), histogram counts within 2 (a
    value moved across a bin edge), everything else (zero points, recipes, exponents,
    non-finite counts) bit for bit."""
    for kind in (qnnx.QuantParams, qnnx.QuantStats):
        flat_a = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(a, kind)))[0]
        flat_b = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(b, kind)))[0]
        assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
        leaves = [(jax.tree_util.keystr(p), np.asarray(u), np.asarray(v))
                  for (p, u), (_, v) in zip(flat_a, flat_b, strict=True)]
        layer = lambda name: name.rsplit("[", 1)[0]  # noqa: E731  ['blocks'][0]['input'].hi
        largest = {}
        for name, u, _ in leaves:
            if u.dtype.kind == "f":
                largest[layer(name)] = max(largest.get(layer(name), 0.0), float(np.abs(u).max()))
        for name, u, v in leaves:
            assert u.dtype == v.dtype and u.shape == v.shape, name
            if name.startswith(f"['{exact}']") or not (u.dtype.kind == "f" or name.endswith(".counts")):
                np.testing.assert_array_equal(u, v, err_msg=name)
            elif name.endswith(".counts"):
                assert np.abs(u.astype(np.int64) - v).sum() <= 2, name
            else:
                np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6 * largest[layer(name)],
                                           err_msg=name)


def test_sharded_calibration_orbax_checkpoint_and_export_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    x = np.random.RandomState(3).randn(16, 10, 3).astype(np.float32)  # its own data, any order
    single = qnnx.quantize_model(_Net(nnx.Rngs(0)), QatConfig(activation_estimator="percentile"))
    qnnx.calibrate(single, [x, 2 * x])
    # The same calibration with the batches split over 8 devices: the statistics of the global
    # batches. The first layer sees the raw batches: its statistics and parameters are
    # bit-identical. Deeper layers see activations that XLA:CPU computes with
    # batch-size-dependent blocking (last-bit differences in the float convolution itself),
    # so theirs agree to float rounding.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = qnnx.quantize_model(_Net(nnx.Rngs(0)), QatConfig(activation_estimator="percentile"))
    qnnx.calibrate(sharded, [jax.device_put(b, sharding) for b in (x, 2 * x)])
    _assert_calibrations_match(single, sharded, exact="conv")

    # An orbax checkpoint of the collections restores calibrated state into a fresh model.
    path = tmp_path / "orbax"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, qnnx.collections(single))
    checkpointer.wait_until_finished()
    fresh = qnnx.quantize_model(_Net(nnx.Rngs(1)), QatConfig(activation_estimator="percentile"))
    qnnx.set_collections(fresh, qatjax.checkpoint.load(str(path)))
    with qnnx.quant_mode("train"):
        np.testing.assert_array_equal(fresh(x), single(x))
        y_train = single(x)

    # Export (int8 codes) and import into the unmodified float model: the fake-quantized kernels.
    exported = qnnx.quantize_model_weights(single)
    float_net = _Net(nnx.Rngs(2))
    qnnx.set_collections(float_net, {"params": qatjax.dequantize_weights(exported)})
    assert np.abs(float_net(x) - y_train).max() < 0.05 * np.abs(y_train).max()


def test_partitioned_kernels_keep_their_sharding_names_on_codes_and_scales():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    with jax.set_mesh(mesh):
        layer = qnnx.QatLinear(16, 8, kernel_init=init, config=QatConfig(**MINMAX),
                               rngs=nnx.Rngs(0))
        x = RNG.randn(8, 16).astype(np.float32)
        qnnx.calibrate(layer, [x])
        y_train = _run(layer, x, "train")
        qnnx.convert(layer)
        assert layer.kernel_codes.get_metadata()["out_sharding"] == ("model", None)  # [N, K]
        assert layer.kernel_scale.get_metadata()["out_sharding"] == ("model",)
        np.testing.assert_array_equal(_run(layer, x, "infer"), y_train)


def test_a_custom_dot_general_runs_float_and_is_refused_when_quantized():
    calls = []

    def my_dot_general(*args, **kwargs):
        calls.append(1)
        return jax.lax.dot_general(*args, **kwargs)

    layer = qnnx.QatLinear(16, 8, dot_general=my_dot_general, config=QatConfig(**MINMAX),
                           rngs=nnx.Rngs(0))
    x = RNG.randn(4, 16).astype(np.float32)
    layer(x, mode="float")
    assert calls  # float mode is the NNX layer, its dot_general included
    with pytest.raises(ValueError, match="custom `dot_general` cannot be quantized"):
        layer(x, mode="train")


def test_layers_stacked_by_nnx_vmap_are_refused_clearly_and_left_unchanged():
    """Layers created under nnx.vmap (for nnx.scan over layers) hold stacked kernels, which
    the NNX front end does not quantize: a clear error naming the layer, the model untouched."""
    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return nnx.Linear(8, 8, rngs=rngs)
            self.layers = make(rngs)

    model = Stack(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Linear layers holds a kernel of shape \(3, 8, 8\), not "
                                         r"the \(8, 8\).*nnx.vmap"):
        qnnx.quantize_model(model, QatConfig())
    assert type(model.layers) is nnx.Linear
