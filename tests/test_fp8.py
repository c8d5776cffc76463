"""fp8 training recipe: scaling rules, the fp8 dot and its backward, the layer and checkpoints."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import qatjax
from qatjax import fp8
from qatjax.flax import QatDense

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def _np_cast(x, scale, dtype):
    m = float(ml_dtypes.finfo(dtype).max)
    return np.clip(np.asarray(x, np.float32) / np.float32(scale), -m, m).astype(dtype)


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0, 2])
def test_delayed_scaling_follows_transformer_engine(algo, margin):
    state = fp8.init_history(4)
    amaxes = [3.0, 10.0, np.inf, 0.5, 2.0, 1.0, 0.7]
    hist = []
    scale = 1.0
    for a in amaxes:
        state = fp8.update_history(state, jnp.float32(a), qatjax.fp8_e4m3, margin=margin, algo=algo)
        if np.isfinite(a):
            hist = ([a] + hist)[:4]
        ref_amax = hist[0] if algo == "most_recent" else max(hist)
        if ref_amax > 0:
            scale = np.float32(ref_amax) / np.float32(448.0) * np.float32(2.0**margin)
        np.testing.assert_array_equal(np.asarray(state.history), np.pad(np.asarray(hist, np.float32), (0, 4 - len(hist))))
        assert float(state.scale) == pytest.approx(float(scale), rel=1e-7)


def test_zero_amax_keeps_the_previous_scale():
    prev = jnp.float32(0.25)
    assert float(fp8.scale_from_amax(jnp.float32(0.0), qatjax.fp8_e4m3, 0, prev)) == 0.25
    assert float(fp8.scale_from_amax(jnp.float32(np.nan), qatjax.fp8_e4m3, 0, prev)) == 0.25


def test_fp8_dot_forward_and_backward_match_ml_dtypes_reference():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (6, 32)) * 3
    w = jax.random.normal(k[1], (32, 10)) * 0.1  # kernel [K, N]
    ct = jax.random.normal(k[2], (6, 10)) * 1e-3
    sx, sw = fp8.amax(x) / 448.0, fp8.amax(w) / 448.0
    f = lambda x, w: fp8.fp8_dot(x, w, sx, sw, qatjax.fp8_e4m3, qatjax.fp8_e4m3,  # noqa: E731
                                 qatjax.fp8_e5m2, 0, None)
    y, vjp = jax.vjp(f, x, w)
    qx = _np_cast(x, sx, E4M3).astype(np.float64)
    qw = _np_cast(w, sw, E4M3).astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), (qx @ qw) * float(sx) * float(sw), rtol=1e-5, atol=1e-6)
    dx, dw = vjp(ct)
    sg = np.float32(np.abs(np.asarray(ct)).max()) / np.float32(57344.0)
    qg = _np_cast(ct, sg, E5M2).astype(np.float64)
    np.testing.assert_allclose(np.asarray(dx), (qg @ qw.T) * float(sg) * float(sw), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(dw), (qx.T @ qg) * float(sg) * float(sx), rtol=1e-5, atol=1e-9)


def test_fp8_dot_lowers_to_fp8_operand_dots_forward_and_backward():
    x = jnp.ones((4, 16))
    w = jnp.ones((16, 8))
    f = lambda x, w: jnp.sum(fp8.fp8_dot(x, w, 1.0, 1.0, qatjax.fp8_e4m3, qatjax.fp8_e4m3,  # noqa: E731
                                         qatjax.fp8_e5m2, 0, None))
    text = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(x, w).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert any("f8E4M3FN" in d and "f8E5M2" not in d for d in dots)  # forward
    assert sum("f8E5M2" in d for d in dots) == 2  # dgrad and wgrad with the e5m2 gradient


CFG = qatjax.QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                       weight_granularity="per_tensor", fp8_scaling="delayed", amax_history_len=4)


class _Net(nn.Module):
    config: qatjax.QatConfig

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QatDense(32, config=self.config, mode="train")(x))
        return QatDense(1, config=self.config, mode="train")(x)


def _problem():
    x = jax.random.normal(jax.random.key(0), (128, 8))
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2]
    return x, y


def _make_step(model, tx, x, y):
    @jax.jit
    def step(params, opt_state, meta):
        def loss_fn(p):
            out, upd = model.apply({"params": p, "fp8_meta": meta}, x, mutable=["fp8_meta"])
            return jnp.mean((out - y) ** 2), upd["fp8_meta"]
        (loss, meta), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, meta, loss
    return step


def test_delayed_fp8_training_resumes_exactly_from_a_checkpoint(tmp_path):
    x, y = _problem()
    model = _Net(CFG)
    v = model.init(jax.random.key(1), x)
    tx = optax.adam(3e-3)
    step = _make_step(model, tx, x, y)
    params, opt_state, meta = v["params"], tx.init(v["params"]), v["fp8_meta"]
    losses = []
    for i in range(40):
        params, opt_state, meta, loss = step(params, opt_state, meta)
        losses.append(float(loss))
        if i == 19:
            path = os.path.join(tmp_path, "ckpt.msgpack")
            qatjax.checkpoint.save(path, {"params": params, "opt_state": opt_state, "fp8_meta": meta})
    assert losses[-1] < 0.5 * losses[0]
    # The histories are live: scales differ from the initial 1.0 and track the amaxes.
    assert float(meta["QatDense_0"]["input_scale"]) != 1.0
    # Resume from step 20 and compare the next step with the uninterrupted run.
    restored = qatjax.checkpoint.load(path)
    from flax.serialization import from_state_dict
    target = {"params": v["params"], "opt_state": tx.init(v["params"]), "fp8_meta": v["fp8_meta"]}
    r = from_state_dict(target, restored)
    p2, o2, m2, loss2 = step(r["params"], r["opt_state"], r["fp8_meta"])
    assert float(loss2) == losses[20]
    p_ref, o_ref, m_ref = r["params"], r["opt_state"], r["fp8_meta"]
    for _ in range(20):
        p_ref, o_ref, m_ref, _ = step(p_ref, o_ref, m_ref)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           m_ref, meta)


def test_delayed_scaling_needs_mutable_meta():
    x, _ = _problem()
    v = _Net(CFG).init(jax.random.key(1), x)
    with pytest.raises(ValueError, match="mutable=\\['fp8_meta'\\]"):
        _Net(CFG).apply(v, x)


def test_amax_is_reduced_across_devices_under_pmap():
    n = jax.local_device_count()
    assert n == 8
    layer = QatDense(4, config=CFG.replace(fp8_scaling="delayed"), axis_name="d", mode="train")
    x = jax.random.normal(jax.random.key(0), (n, 2, 8)) * jnp.arange(1, n + 1)[:, None, None]
    v = layer.init(jax.random.key(1), x[0])
    run = jax.pmap(lambda x: layer.apply(v, x, mutable=["fp8_meta"])[1]["fp8_meta"], axis_name="d")
    meta = run(x)
    scales = np.asarray(meta["input_scale"])
    np.testing.assert_array_equal(scales, np.full(n, scales[0]))
    assert scales[0] == pytest.approx(float(jnp.max(jnp.abs(x))) / 448.0, rel=1e-6)


def test_amax_is_reduced_across_devices_under_shard_map():
    n = jax.local_device_count()
    cfg = CFG.replace(fp8_scaling="current")
    x = jax.random.normal(jax.random.key(0), (n * 2, 8)) * jnp.repeat(jnp.arange(1, n + 1), 2)[:, None]
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    P = jax.sharding.PartitionSpec

    def sharded(axis_name):
        layer = QatDense(4, config=cfg, axis_name=axis_name, mode="train")
        v = layer.init(jax.random.key(1), x[:2])
        f = qatjax.calibration.shard_map(lambda x: layer.apply(v, x), mesh=mesh, in_specs=P("d"),
                                         out_specs=P("d"))
        return np.asarray(jax.jit(f)(x)), v

    reduced, v = sharded("d")
    local, _ = sharded(None)
    whole = np.asarray(QatDense(4, config=cfg, mode="train").apply(v, x))
    # With the amax pmax-reduced every shard uses the global scale: the sharded output is one
    # device's on the whole batch (to float32 rounding of the per-shard GEMMs); with local
    # amaxes the shards' fp8 grids differ and so do the outputs.
    np.testing.assert_allclose(reduced, whole, rtol=1e-5, atol=1e-6)
    assert np.abs(local - whole).max() > 1e-3


def test_a_tiny_amax_gives_a_normal_scale_and_finite_outputs():
    """amax 1e-37 used to give a subnormal scale, flushed to 0, and NaN outputs; the floor is
    Transformer Engine's (its fp8_max / amax scale clamped to the float32 maximum)."""
    fmt = qatjax.fp8_e4m3
    state = fp8.update_history(fp8.init_history(4), jnp.float32(1e-37), fmt)
    floor = np.float32(448.0) / np.finfo(np.float32).max
    assert float(state.scale) == float(np.float32(floor)) and float(state.scale) > 0
    x = jnp.full((2, 8), 1e-37, jnp.float32)
    y = fp8.fp8_dot(x, jnp.ones((8, 3)), state.scale, jnp.float32(1.0 / 448), fmt, fmt,
                    qatjax.fp8_e5m2, 0, None)
    assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_recipe_train_infer_and_converted_agree_bit_for_bit(scaling):
    """The fp8 recipe's forward, its infer mode on the float kernel and on converted codes all
    run the core contraction on the weight path's codes."""
    cfg = qatjax.QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                           weight_granularity="per_tensor", fp8_scaling=scaling, amax_history_len=4)
    layer = QatDense(6, config=cfg)
    x = jax.random.normal(jax.random.key(0), (5, 16))
    v = layer.init(jax.random.key(1), x)
    if scaling == "delayed":  # one step fills the history, so the scales are not the initial 1.0
        _, upd = layer.apply(v, x, mode="train", mutable=["fp8_meta"])
        v = {**v, **upd}
    train, _ = layer.apply(v, x, mode="train", mutable=["fp8_meta"])
    infer = layer.apply(v, x, mode="infer")
    converted = layer.apply(qatjax.convert(v), x, mode="infer")
    np.testing.assert_array_equal(np.asarray(infer), np.asarray(train))
    np.testing.assert_array_equal(np.asarray(converted), np.asarray(train))
