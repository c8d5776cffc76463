"""quantize_model: an unmodified Flax model's Dense / Conv layers run as qatjax layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax.config import QatConfig
from qatjax.flax import QatConv, QatDense, quant_mode, quantize_model

CFG = QatConfig(activation_observer="minmax", activation_estimator="minmax")


class CNN(nn.Module):
    """A plain Flax model, as it exists in a user's code base."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(10, name="head")(x)


class QatCNN(nn.Module):
    """The same model written by hand with qatjax layers (the reference)."""

    config: QatConfig

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QatConv(8, (3, 3), config=self.config, name="conv")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(QatDense(32, config=self.config, name="fc1")(x))
        return nn.Dense(10, name="head")(x)


class SetupMLP(nn.Module):
    def setup(self):
        self.layers = [nn.Dense(16), nn.Dense(4)]

    def __call__(self, x):
        return self.layers[1](nn.relu(self.layers[0](x)))


def _x(seed=0, shape=(4, 6, 6, 2)):
    return jax.random.normal(jax.random.key(seed), shape)


def _jitted(model, mode):
    """``model.apply(variables, x)`` under ``quant_mode(mode)``, compiled (the mode acts at
    trace time, inside the jitted function)."""
    def apply(variables, x):
        with quant_mode(mode):
            return model.apply(variables, x)

    return jax.jit(apply)


def test_float_mode_is_the_original_model_and_it_is_left_untouched():
    model = CNN()
    x = _x()
    float_vars = model.init(jax.random.key(1), x)
    qmodel = quantize_model(model, CFG)
    v = qmodel.init(jax.random.key(1), x)
    assert set(v) == {"params", "quant_stats", "quant_params"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, v["params"], float_vars["params"])
    with quant_mode("float"):
        np.testing.assert_array_equal(np.asarray(qmodel.apply(v, x)),
                                      np.asarray(model.apply(float_vars, x)))
    assert type(model) is CNN and set(model.init(jax.random.key(1), x)) == {"params"}
    assert type(qmodel).__name__ == "CNN" and isinstance(qmodel, CNN)


def test_calibrate_train_convert_equal_the_hand_written_qatjax_model():
    model, x, batches = CNN(), _x(), [_x(i) for i in range(3)]
    float_params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    qmodel = quantize_model(model, CFG, rules=[("head", None)])
    v = qatjax.calibrate(qmodel, {"params": float_params}, batches)
    ref_model = QatCNN(CFG)
    ref = qatjax.calibrate(ref_model, {"params": float_params}, batches)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v["quant_params"], ref["quant_params"])
    assert [r.path for r in qatjax.quant_report(v).layers] == ["conv", "fc1"]  # head kept float
    train = _jitted(qmodel, "train")
    y = train(v, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_jitted(ref_model, "train")(ref, x)))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(train({**v, "params": p}, x) ** 2)))(v["params"])
    assert all(float(jnp.abs(grads[n]["kernel"]).sum()) > 0 for n in ("conv", "fc1", "head"))
    served = qatjax.convert(v)
    assert served["quant_params"]["fc1"]["kernel_codes"].shape == (32, 288)
    np.testing.assert_array_equal(np.asarray(_jitted(qmodel, "infer")(served, x)), np.asarray(y))


def test_rules_choose_a_recipe_per_layer_and_mode_can_be_fixed():
    model, x = SetupMLP(), _x(shape=(5, 8))
    int4 = QatConfig(weight_format="int4", activation_format=None)
    qmodel = quantize_model(model, QatConfig(activation_scaling="dynamic"),
                            rules=[(r"layers_1", int4)], mode="train")
    v = qmodel.init(jax.random.key(0), x)
    fmt = {r.path: r.weight_format for r in qatjax.quant_report(v).layers}
    assert fmt == {"layers_0": "int8", "layers_1": "int4"}
    y = qmodel.apply(v, x)  # mode="train" without a quant_mode context
    w1 = v["params"]["layers_1"]["kernel"]
    qp = qatjax.qparams_from_amax(jnp.max(jnp.abs(w1), axis=0, keepdims=True), qatjax.int4)
    h = QatDense(16, config=QatConfig(activation_scaling="dynamic"), mode="train").apply(
        {"params": v["params"]["layers_0"], "quant_params": v["quant_params"]["layers_0"]}, x)
    ref = nn.relu(h) @ qatjax.fake_quant(w1, qp, qatjax.int4) + v["params"]["layers_1"]["bias"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_layers_inside_nn_scan_are_quantized_and_stay_stacked():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.relu(nn.Dense(8)(x)), None

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0, "quant_stats": 0, "quant_params": 0},
                           split_rngs={"params": True}, length=4)
            return scan(name="blocks")(x, None)[0]

    x = _x(shape=(6, 8))
    qmodel = quantize_model(Deep(), CFG)
    v = qatjax.calibrate(qmodel, qmodel.init(jax.random.key(0), x), [x])
    assert v["quant_params"]["blocks"]["Dense_0"]["input_scale"].shape == (4,)
    with quant_mode("train"):
        y = qmodel.apply(v, x)
    with quant_mode("infer"):
        np.testing.assert_array_equal(np.asarray(qmodel.apply(qatjax.convert(v), x)), np.asarray(y))


def test_attention_projections_are_quantized():
    """nn.MultiHeadDotProductAttention's DenseGeneral projections run as QatDenseGeneral."""
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, name="attn")(x)
            return x + nn.Dense(32, name="mlp")(nn.relu(x))

    model, x = Block(), _x(shape=(2, 5, 32))
    float_vars = jax.jit(model.init)(jax.random.key(1), x)
    qmodel = quantize_model(model, CFG)
    v = qatjax.calibrate(qmodel, {"params": float_vars["params"]}, [x, _x(1, (2, 5, 32))])
    assert sorted(r.path for r in qatjax.quant_report(v).layers) == [
        "attn/einsum0 lhs", "attn/einsum0 rhs", "attn/einsum1 lhs", "attn/einsum1 rhs",
        "attn/key", "attn/out", "attn/query", "attn/value", "mlp"]
    np.testing.assert_array_equal(np.asarray(_jitted(qmodel, "float")(v, x)),
                                  np.asarray(jax.jit(model.apply)(float_vars, x)))
    y = _jitted(qmodel, "train")(v, x)
    served = qatjax.convert(v)
    assert served["quant_params"]["attn"]["out"]["kernel_codes"].shape == (32, 32)
    np.testing.assert_array_equal(np.asarray(_jitted(qmodel, "infer")(served, x)), np.asarray(y))
    imported = qatjax.dequantize_weights(qatjax.quantize_model_weights(v))
    assert imported["attn"]["query"]["kernel"].shape == (32, 4, 8)


def test_einsum_in_a_setup_style_module_is_quantized():
    """A module defined with ``setup`` (as Hugging Face's Flax models are) may not create
    variables in ``__call__``; its activation x activation einsum still gets its calibration
    state, scales equal to min / max of its operands, and serves what it trains."""
    class SetupScores(nn.Module):
        def setup(self):
            self.q, self.k = nn.Dense(8), nn.Dense(8)

        def __call__(self, x):
            return jnp.einsum("bqd,bkd->bqk", self.q(x), self.k(x))

    model, x = SetupScores(), _x(shape=(2, 5, 6))
    params = model.init(jax.random.key(1), x)["params"]
    qmodel = quantize_model(model, CFG)
    assert "einsum0_lhs" in qmodel.init(jax.random.key(1), x)["quant_stats"]
    batches = [x, _x(1, (2, 5, 6))]
    v = qatjax.calibrate(qmodel, {"params": params}, batches)
    q = [np.asarray(model.apply({"params": params}, b, method=lambda m, b: m.q(b))) for b in batches]
    # minmax, symmetric int8: scale = max|q| / 127 over every batch
    np.testing.assert_allclose(np.asarray(v["quant_params"]["einsum0_lhs_scale"]),
                               max(np.abs(a).max() for a in q) / 127, rtol=1e-6)
    y = _jitted(qmodel, "train")(v, x)
    assert np.abs(np.asarray(y) - np.asarray(model.apply({"params": params}, x))).max() > 0
    np.testing.assert_array_equal(np.asarray(_jitted(qmodel, "infer")(qatjax.convert(v), x)),
                                  np.asarray(y))


def test_a_head_tied_to_the_embedding_through_its_own_apply():
    """``self.head.apply({"params": {"kernel": emb.T}}, h)`` (GPT-2's tied head in Hugging
    Face's Flax models) runs on a root scope of its own: a recipe with state is refused with
    the rule that keeps it float (rules match its name), and a stateless one quantizes it."""
    class TiedHead(nn.Module):
        def setup(self):
            self.embed = nn.Embed(50, 16)
            self.body = nn.Dense(16)
            self.head = nn.Dense(50, use_bias=False)

        def __call__(self, ids):
            h = self.body(self.embed(ids))
            return self.head.apply({"params": {"kernel": self.embed.embedding.T}}, h)

    model, ids = TiedHead(), jnp.arange(12).reshape(2, 6)
    params = model.init(jax.random.key(0), ids)["params"]
    with pytest.raises(ValueError, match=r"'head' \(Dense\) runs through its own Module.apply.*"
                                         r"\('head', None\)"):
        qatjax.calibrate(quantize_model(model, CFG), {"params": params}, [ids])
    qmodel = quantize_model(model, CFG, rules=[("head", None)])
    v = qatjax.calibrate(qmodel, {"params": params}, [ids])
    assert [r.path for r in qatjax.quant_report(v).layers] == ["body"]
    y = _jitted(qmodel, "train")(v, ids)
    np.testing.assert_array_equal(np.asarray(_jitted(qmodel, "infer")(qatjax.convert(v), ids)),
                                  np.asarray(y))
    # Dynamic scales keep no state: the head is quantized too (its kernel on the fly).
    dyn = quantize_model(model, QatConfig(activation_scaling="dynamic"), mode="train")
    v = {**dyn.init(jax.random.key(0), ids), "params": params}
    def qat_dense(features, kernel, bias, x):  # the hand-written qatjax layer
        layer = QatDense(features, use_bias=bias is not None, mode="train",
                         config=QatConfig(activation_scaling="dynamic"))
        p = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
        return layer.apply({**layer.init(jax.random.key(0), x), "params": p}, x)

    emb = params["embed"]["embedding"]
    h = qat_dense(16, params["body"]["kernel"], params["body"]["bias"], emb[ids])
    expected = qat_dense(50, emb.T, None, h)
    np.testing.assert_array_equal(np.asarray(dyn.apply(v, ids)), np.asarray(expected))
    assert np.abs(np.asarray(expected) - np.asarray(model.apply({"params": params}, ids))).max() > 0


def test_gradients_through_nn_remat():
    """Under nn.remat, differentiation traces the quantized contraction's forward rule after
    the layer has returned; qatjax's own dot_generals there are not intercepted again: the
    gradient equals the one without remat."""
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q, k = nn.Dense(8, name="q")(x), nn.Dense(8, name="k")(x)
            return jnp.einsum("bqd,bkd->bqk", q, k)

    class Net(nn.Module):
        remat: bool

        @nn.compact
        def __call__(self, x):
            return (nn.remat(Attn) if self.remat else Attn)(name="attn")(x)

    x = _x(shape=(2, 5, 6))
    params = Net(False).init(jax.random.key(1), x)["params"]
    v = qatjax.calibrate(quantize_model(Net(False), CFG), {"params": params}, [x])  # same paths
    grads = []
    for remat in (False, True):
        qmodel = quantize_model(Net(remat), CFG)
        with quant_mode("train"):
            grads.append(jax.grad(lambda p: jnp.sum(qmodel.apply({**v, "params": p}, x) ** 2))(
                v["params"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, grads[1], grads[0])
    assert float(jnp.abs(grads[1]["attn"]["q"]["kernel"]).sum()) > 0


def test_axis_name_reduces_calibration_across_8_devices():
    """quantize_model(..., axis_name=) gives the swapped layers the mapped axis: calibration
    statistics under shard_map equal the single-device ones."""
    model, batches = CNN(), [_x(i, (16, 6, 6, 2)) for i in range(2)]
    params = model.init(jax.random.key(1), batches[0])["params"]
    ref = qatjax.calibrate(quantize_model(model, CFG), {"params": params}, batches)
    qmodel = quantize_model(model, CFG, mode="calibrate", axis_name="batch")
    stats = qmodel.init(jax.random.key(1), batches[0])["quant_stats"]

    def step(stats, x):
        return qmodel.apply({"params": params, "quant_stats": stats}, x,
                            mutable=["quant_stats"])[1]["quant_stats"]

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    P = jax.sharding.PartitionSpec
    sstep = jax.jit(qatjax.calibration.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")),
                                                 out_specs=P()))
    for b in batches:
        stats = sstep(stats, b)
    # The first layer sees the raw batches: its min / max are exactly the single-device ones.
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats["conv"], ref["quant_stats"]["conv"])


def test_bad_arguments_and_custom_matmuls_are_clear_errors():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, dot_general=jax.lax.dot_general, name="special")(x)

    x = _x(shape=(2, 8))
    with pytest.raises(ValueError, match="'special'.*dot_general"):
        quantize_model(Custom(), CFG).init(jax.random.key(0), x)
    quantize_model(Custom(), CFG, rules=[("special", None)]).init(jax.random.key(0), x)  # kept float
    with pytest.raises(TypeError, match="config"):
        quantize_model(Custom(), {"weight_format": "int8"})
    with pytest.raises(TypeError, match="rule 'special'"):
        quantize_model(Custom(), CFG, rules=[("special", "int8")])
    with pytest.raises(ValueError, match="`mode`"):
        quantize_model(Custom(), CFG, mode="training")


def test_rules_that_decide_no_module_are_refused_with_the_paths():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="head")(nn.relu(nn.Dense(8, name="body")(x)))

    x = jnp.ones((2, 16))
    typo = quantize_model(Plain(), QatConfig(activation_scaling="dynamic"), rules=[("haed", None)],
                          mode="float")
    with pytest.raises(ValueError, match=r"rule pattern\(s\) \['haed'\] matched no module.*"
                                         r"'body', 'head'"):
        typo.init(jax.random.key(0), x)
    shadowed = quantize_model(Plain(), QatConfig(activation_scaling="dynamic"),
                              rules=[("b.*|h.*", None), ("head", QatConfig(weight_format="int4"))],
                              mode="float")
    with pytest.raises(ValueError, match=r"\['head'\] matched no module"):
        shadowed.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_model(Plain(), None, rules=[("head", None)])


def test_intercepted_einsums_run_float_on_a_float_checkpoint_and_are_reported():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.Dense(8, name="q")(x)
            return jnp.einsum("btd,bsd->bts", q, x)

    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    params = Attn().init(jax.random.key(0), x)["params"]
    model = quantize_model(Attn(), QatConfig(activation_observer="minmax",
                                             activation_estimator="minmax"))
    with quant_mode("float"):  # static activations, a float checkpoint: exactly the float model
        np.testing.assert_array_equal(model.apply({"params": params}, x),
                                      Attn().apply({"params": params}, x))
    variables, report = qatjax.calibrate_model(model, {"params": params}, [x])
    rows = {r.path: r for r in report.layers}
    assert set(rows) == {"q", "einsum0 lhs", "einsum0 rhs"}
    q = nn.Dense(8).apply({"params": params["q"]}, x)
    for side, operand in (("lhs", q), ("rhs", x)):
        row = rows[f"einsum0 {side}"]
        assert row.input_format == "int8" and row.method == "minmax"
        assert row.input_scale == pytest.approx(float(jnp.abs(operand).max()) / 127, rel=1e-6)
        assert 0 < row.output_error < 0.05
