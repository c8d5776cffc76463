"""QatDense / QatConv: float parity with Flax, train == infer, the STE in a training loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import qatjax
from qatjax.config import QatConfig
from qatjax.flax import QatConv, QatDense, QatDenseGeneral, quant_mode

DYN = dict(activation_scaling="dynamic")


def _x(shape, seed=0, shift=0.0):
    return jax.random.normal(jax.random.key(seed), shape) + shift


def _jitted(layer):
    """``layer.apply(variables, x, mode=mode)``, compiled (``mode`` static)."""
    return jax.jit(lambda v, x, mode: layer.apply(v, x, mode=mode), static_argnums=2)


@pytest.mark.parametrize("shape", [(4, 32), (2, 3, 32)])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_float_mode_is_nn_dense_bit_for_bit(shape, dtype):
    x = _x(shape)
    layer = QatDense(16, dtype=dtype, config=QatConfig(**DYN))
    v = layer.init(jax.random.key(1), x)
    ref = nn.Dense(16, dtype=dtype).apply({"params": v["params"]}, x)
    got = layer.apply(v, x, mode="float")
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
    assert set(v["params"]) == {"kernel", "bias"}


@pytest.mark.parametrize("kw", [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(kernel_size=(3,), padding="CAUSAL"),
    dict(kernel_size=(3, 3), feature_group_count=2, padding="CIRCULAR"),
])
def test_float_mode_is_nn_conv_and_train_equals_infer(kw):
    ndim = len(kw["kernel_size"])
    x = _x((2,) + (9,) * ndim + (4,))
    layer = QatConv(6, config=QatConfig(**DYN), **kw)
    v = layer.init(jax.random.key(1), x)
    ref = nn.Conv(6, **kw).apply({"params": v["params"]}, x)
    np.testing.assert_array_equal(np.asarray(layer.apply(v, x, mode="float")), np.asarray(ref))
    train = layer.apply(v, x, mode="train")
    assert train.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(layer.apply(v, x, mode="infer")), np.asarray(train))
    served = qatjax.convert(v)
    assert "kernel" not in served["params"]
    np.testing.assert_array_equal(np.asarray(layer.apply(served, x, mode="infer")), np.asarray(train))
    # Against a float reference: fake-quantized operands, float conv.
    fq = _fake_quant_conv_reference(layer, v, x, kw)
    assert np.abs(np.asarray(train) - fq).max() <= 1e-5 * np.abs(fq).max()


def _fake_quant_conv_reference(layer, v, x, kw):
    k = v["params"]["kernel"]
    amax_w = jnp.max(jnp.abs(k), axis=tuple(range(k.ndim - 1)), keepdims=True)
    k_hat = qatjax.fake_quant(k, qatjax.qparams_from_amax(amax_w, qatjax.int8), qatjax.int8)
    x_hat = qatjax.fake_quant(x, qatjax.qparams_from_amax(jnp.max(jnp.abs(x)), qatjax.int8), qatjax.int8)
    params = {"kernel": k_hat, "bias": v["params"]["bias"]}
    return np.asarray(nn.Conv(6, precision=jax.lax.Precision.HIGHEST, **kw).apply(
        {"params": params}, x_hat), np.float64)


CONFIGS = [
    QatConfig(**DYN),
    QatConfig(activation_format="uint8", activation_symmetric=False, weight_symmetric=False, **DYN),
    QatConfig(weight_format="int4", weight_granularity="per_group", weight_group_size=8, **DYN),
    QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3", **DYN),
    QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_tensor"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.weight_format.name}-{c.activation_format}")
def test_train_infer_and_converted_infer_agree_bit_for_bit(cfg):
    x = _x((5, 32), shift=0.5)
    layer = QatDense(12, config=cfg)
    v = layer.init(jax.random.key(2), x)
    train = jax.jit(lambda v, x: layer.apply(v, x, mode="train"))(v, x)
    infer = jax.jit(lambda v, x: layer.apply(v, x, mode="infer"))(v, x)
    served = qatjax.convert(v)
    # Native (int x int, fp8 x fp8) layers serve [out, in]; weight-only ones [in, out].
    native = cfg.integer_matmul or cfg.fp8_matmul
    assert served["quant_params"]["kernel_codes"].shape == ((12, 32) if native else (32, 12))
    assert served["quant_params"]["kernel_codes"].dtype == cfg.weight_format.storage_dtype
    converted = jax.jit(lambda v, x: layer.apply(v, x, mode="infer"))(served, x)
    np.testing.assert_array_equal(np.asarray(infer), np.asarray(train))
    np.testing.assert_array_equal(np.asarray(converted), np.asarray(train))
    # And the float fake-quant reference (float64 matmul of fake-quantized operands).
    ref = _dense_reference(cfg, v, x)
    assert np.abs(np.asarray(train, np.float64) - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4]], ids=["int8", "int4-weight-only"])
@pytest.mark.parametrize("layer_dtype", [jnp.bfloat16, None], ids=["dtype-bf16", "dtype-None"])
def test_bf16_compute_serves_the_codes_it_trained_with(cfg, layer_dtype):
    """float32 params, bfloat16 inputs: the kernel is quantized in its stored precision, as
    convert does, so the converted model equals train mode bit for bit (it did not when the
    kernel was rounded to bf16 before quantization)."""
    x = _x((5, 32), shift=0.5).astype(jnp.bfloat16)
    layers = [QatDense(12, config=cfg, dtype=layer_dtype),
              QatConv(6, (3, 3), config=cfg.replace(weight_granularity="per_channel"), dtype=layer_dtype)]
    for layer, xin in zip(layers, (x, x.reshape(1, 5, 32, 1)[:, :, :8])):
        v = layer.init(jax.random.key(2), xin)
        train = layer.apply(v, xin, mode="train")
        assert train.dtype == (jnp.bfloat16 if layer_dtype else jnp.float32)
        np.testing.assert_array_equal(np.asarray(layer.apply(v, xin, mode="infer")), np.asarray(train))
        served = layer.apply(qatjax.convert(v), xin, mode="infer")
        np.testing.assert_array_equal(np.asarray(served), np.asarray(train))


def _dense_reference(cfg, v, x):
    """float64 matmul of the fake-quantized operands, with min/max kernel parameters per output
    channel (or per block of input features within it) computed here with numpy."""
    w = np.asarray(v["params"]["kernel"])  # [K, N]
    fmt = cfg.weight_format
    if cfg.weight_granularity == "per_group":
        wg = w.reshape(-1, cfg.weight_group_size, w.shape[1])
        lo, hi = wg.min(1, keepdims=True), wg.max(1, keepdims=True)
    elif cfg.weight_granularity == "per_channel":
        wg, lo, hi = w, w.min(0, keepdims=True), w.max(0, keepdims=True)
    else:
        wg, lo, hi = w, w.min(), w.max()
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    if cfg.weight_symmetric or fmt.is_float:
        scale = np.maximum(np.maximum(-lo, hi) / np.float32(fmt.qmax), np.finfo(np.float32).eps)
        zp = np.zeros_like(scale)
    else:
        scale = np.maximum((hi - lo) / np.float32(fmt.qmax - fmt.qmin), np.finfo(np.float32).eps)
        zp = np.clip(fmt.qmin - np.rint(lo / scale), fmt.qmin, fmt.qmax)
    wq = qatjax.QParams(jnp.asarray(scale, jnp.float32), jnp.asarray(zp, jnp.int32))
    w_hat = np.asarray(qatjax.fake_quant(jnp.asarray(wg), wq, fmt), np.float64).reshape(w.shape)
    x_hat = np.asarray(x, np.float64)
    if cfg.activation_format is not None:
        # dynamic scaling: min / max of the batch (affine), or its absmax (symmetric)
        xq = qatjax.qparams_from_minmax(jnp.min(x), jnp.max(x), cfg.activation_format,
                                        symmetric=cfg.activation_symmetric)
        x_hat = np.asarray(qatjax.fake_quant(x, xq, cfg.activation_format), np.float64)
    return x_hat @ w_hat + np.asarray(v["params"]["bias"], np.float64)


class _MLP(nn.Module):
    config: QatConfig

    @nn.compact
    def __call__(self, x, mode="train"):
        x = nn.relu(QatDense(32, config=self.config)(x, mode=mode))
        return QatDense(3, config=self.config)(x, mode=mode)


def _toy_data():
    x = jax.random.normal(jax.random.key(0), (256, 8))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0.5).astype(jnp.int32)
    return x, y


@pytest.mark.parametrize("cfg", [
    QatConfig(**DYN),
    QatConfig(**DYN, original_residuals=True),
    QatConfig(weight_format="int4", activation_format=None, learnable_scales=True),
], ids=["int8-dynamic", "int8-original-residuals", "int4-lsq"])
def test_plain_optax_trainstate_loop_trains(cfg):
    x, y = _toy_data()
    model = _MLP(cfg)
    variables = model.init(jax.random.key(1), x)
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                          tx=optax.adam(1e-2))
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(state):
        loss, grads = jax.value_and_grad(lambda p: loss_fn_for(state, p))(state.params)
        return state.apply_gradients(grads=grads), loss, grads

    def loss_fn_for(state, params):
        logits = state.apply_fn({"params": params, **rest}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    losses = []
    for _ in range(60):
        state, loss, grads = step(state)
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0]
    g = grads["QatDense_0"]
    assert float(jnp.abs(g["kernel"]).sum()) > 0
    if cfg.learnable_scales:
        assert g["kernel_scale"].shape == (32,)
        assert float(jnp.abs(g["kernel_scale"]).sum()) > 0
        initial = model.init(jax.random.key(1), x)["params"]["QatDense_0"]["kernel_scale"]
        assert not np.allclose(np.asarray(state.params["QatDense_0"]["kernel_scale"]), np.asarray(initial))


@pytest.mark.parametrize("original", [False, True])
def test_kernel_gradient_uses_quantized_or_original_operands(original):
    """Dynamic absmax scales clip nothing, so the kernel gradient is ``x_hat.T @ ct`` (the STE on
    the fake-quant forward) by default and ``x.T @ ct`` with original residuals (numpy)."""
    x = _x((6, 32), seed=3)
    cfg = QatConfig(**DYN, original_residuals=original)
    model = QatDense(8, config=cfg, mode="train", use_bias=False)
    params = jax.jit(model.init)(jax.random.key(2), x)["params"]
    ct = _x((6, 8), seed=4)
    g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) * ct)))(params)["kernel"]
    x_qp = qatjax.qparams_from_amax(jnp.max(jnp.abs(x)), qatjax.int8)
    x_used = np.asarray(x if original else qatjax.fake_quant(x, x_qp, qatjax.int8), np.float64)
    np.testing.assert_allclose(np.asarray(g), x_used.T @ np.asarray(ct, np.float64), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(x), np.asarray(qatjax.fake_quant(x, x_qp, qatjax.int8)), atol=1e-4)


def _np_dynamic_qparams(x, fmt, symmetric, per_token):
    """numpy float32 reference of the dynamic activation parameters (torch.ao arithmetic)."""
    axis = -1 if per_token else None
    lo = np.minimum(x.min(axis=axis, keepdims=per_token), 0).astype(np.float32)
    hi = np.maximum(x.max(axis=axis, keepdims=per_token), 0).astype(np.float32)
    if symmetric:
        amax = np.abs(x).max(axis=axis, keepdims=per_token).astype(np.float32)
        return np.maximum(amax / np.float32(fmt.qmax), np.finfo(np.float32).eps), np.zeros_like(amax)
    scale = np.maximum((hi - lo) / np.float32(fmt.qmax - fmt.qmin), np.finfo(np.float32).eps)
    zp = np.clip(fmt.qmin - np.rint(lo / scale), fmt.qmin, fmt.qmax)
    return scale.astype(np.float32), zp.astype(np.float32)


@pytest.mark.parametrize("fmt,symmetric,per_token", [
    (qatjax.int8, True, True), (qatjax.uint8, False, False), (qatjax.uint8, False, True),
], ids=["int8-per-token", "uint8-affine", "uint8-affine-per-token"])
def test_dynamic_activation_parameters_per_tensor_or_per_token(fmt, symmetric, per_token):
    """Dynamic scaling follows the config (affine min/max, per token), matches a numpy
    reference, and train mode equals infer mode bit for bit."""
    x = _x((2, 5, 32), seed=7, shift=0.5) * jnp.linspace(0.2, 3.0, 5)[:, None]  # rows differ
    cfg = QatConfig(activation_format=fmt, activation_symmetric=symmetric, **DYN,
                    activation_granularity="per_token" if per_token else "per_tensor")
    model = QatDense(6, config=cfg)
    v = jax.jit(model.init)(jax.random.key(0), x)
    run = _jitted(model)
    y_train = run(v, x, "train")
    np.testing.assert_array_equal(np.asarray(run(v, x, "infer")), np.asarray(y_train))
    scale, zp = _np_dynamic_qparams(np.asarray(x), fmt, symmetric, per_token)
    code = np.clip(np.rint(np.asarray(x) * (np.float32(1) / scale)) + zp, fmt.qmin, fmt.qmax)
    x_hat = (code - zp).astype(np.float64) * scale
    w = np.asarray(v["params"]["kernel"])
    w_scale = np.maximum(np.abs(w).max(0, keepdims=True) / np.float32(127), np.finfo(np.float32).eps)
    w_hat = np.clip(np.rint(w * (np.float32(1) / w_scale)), -128, 127).astype(np.float64) * w_scale
    ref = x_hat @ w_hat + np.asarray(v["params"]["bias"])
    assert np.abs(np.asarray(y_train) - ref).max() <= 1e-5 * np.abs(ref).max()
    report = qatjax.quant_report(v)
    assert report.layers[0].method == ("dynamic per token" if per_token else "dynamic")


def test_per_token_activations_need_dynamic_scaling_and_a_dense_layer():
    with pytest.raises(ValueError, match="per_token"):
        QatConfig(activation_granularity="per_token")
    with pytest.raises(ValueError, match="activation_granularity"):
        QatConfig(activation_granularity="per_row", **DYN)
    conv = QatConv(4, (3, 3), config=QatConfig(activation_granularity="per_token", **DYN))
    with pytest.raises(ValueError, match="per_token"):
        conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))


@pytest.mark.parametrize("features,axis,x_shape", [
    ((4, 8), -1, (2, 5, 32)),        # attention's query / key / value projections
    (32, (-2, -1), (2, 5, 4, 8)),    # its output projection
])
def test_dense_general_is_nn_dense_general_and_quantizes_as_the_flat_dense(features, axis, x_shape):
    x = _x(x_shape, seed=9)
    cfg = QatConfig(**DYN)
    layer = QatDenseGeneral(features, axis=axis, config=cfg)
    v = layer.init(jax.random.key(3), x)
    ref_layer = nn.DenseGeneral(features, axis=axis)
    ref_vars = ref_layer.init(jax.random.key(3), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v["params"], ref_vars["params"])
    np.testing.assert_array_equal(np.asarray(layer.apply(v, x, mode="float")),
                                  np.asarray(ref_layer.apply(ref_vars, x)))
    train = layer.apply(v, x, mode="train")
    served = qatjax.convert(v)
    n_in = 1 if isinstance(axis, int) else len(axis)
    k = int(np.prod(x_shape[-n_in:]))
    assert served["quant_params"]["kernel_codes"].shape == (int(np.prod(features)), k)
    np.testing.assert_array_equal(np.asarray(layer.apply(served, x, mode="infer")), np.asarray(train))
    # numpy reference: the flat dense [K, N], one scale per output element.
    w = np.asarray(v["params"]["kernel"]).reshape(k, -1)
    w_scale = np.maximum(np.abs(w).max(0, keepdims=True) / np.float32(127), np.finfo(np.float32).eps)
    w_hat = np.clip(np.rint(w * (np.float32(1) / w_scale)), -128, 127).astype(np.float64) * w_scale
    xf = np.asarray(x).reshape(x_shape[:-n_in] + (k,))
    x_scale = np.float32(np.abs(xf).max()) / np.float32(127)
    x_hat = np.clip(np.rint(xf * (np.float32(1) / x_scale)), -128, 127).astype(np.float64) * x_scale
    ref = (x_hat @ w_hat).reshape(np.shape(train)) + np.asarray(v["params"]["bias"])
    assert np.abs(np.asarray(train) - ref).max() <= 1e-5 * np.abs(ref).max()
    imported = qatjax.dequantize_weights(qatjax.quantize_model_weights(v))
    np.testing.assert_array_equal(np.asarray(imported["kernel"]),
                                  (w_hat.astype(np.float32)).reshape(v["params"]["kernel"].shape))
    g = jax.grad(lambda p: jnp.sum(layer.apply({**v, "params": p}, x, mode="train") ** 2))(v["params"])
    assert g["kernel"].shape == v["params"]["kernel"].shape and float(jnp.abs(g["kernel"]).sum()) > 0


def test_dense_general_refuses_what_it_cannot_flatten():
    x = jnp.ones((2, 5, 4, 8))
    with pytest.raises(ValueError, match="trailing axes"):
        QatDenseGeneral(16, axis=(1, 3), config=QatConfig(**DYN)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="trailing axes"):
        QatDenseGeneral(16, axis=-1, batch_dims=(0,), config=QatConfig(**DYN)).init(jax.random.key(0), x)


def test_quant_mode_context_overrides_every_layer():
    x, _ = _toy_data()
    model = _MLP(QatConfig(**DYN))
    v = model.init(jax.random.key(1), x)
    with quant_mode("float"):
        forced = model.apply(v, x, mode="train")
    np.testing.assert_array_equal(np.asarray(forced), np.asarray(model.apply(v, x, mode="float")))
    assert not np.array_equal(np.asarray(forced), np.asarray(model.apply(v, x, mode="train")))


def test_errors_are_clear():
    x = _x((4, 32))
    layer = QatDense(8, config=QatConfig())  # static activations: needs calibration
    v = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="run qatjax.calibrate"):
        layer.apply(v, x, mode="infer")
    with pytest.raises(ValueError, match="no mode given"):
        layer.apply(v, x)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        layer.apply(v, x, mode="quantize")
    dyn = QatDense(8, config=QatConfig(**DYN))
    vd = dyn.init(jax.random.key(0), x)
    with pytest.raises(Exception, match="32|16"):
        dyn.apply(vd, x[:, :16], mode="train")
    served = qatjax.convert(vd)
    with pytest.raises(ValueError, match="16 features on the last axis, but the kernel expects 32"):
        dyn.apply(served, x[:, :16], mode="infer")
    with pytest.raises(ValueError, match="only mode='infer'"):
        dyn.apply(served, x, mode="train")
    conv = QatConv(4, (3, 3), config=QatConfig(weight_granularity="per_group", weight_group_size=2, **DYN))
    with pytest.raises(ValueError, match="per_group"):
        conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))
        conv.apply(conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 2))), jnp.ones((1, 5, 5, 2)), mode="train")
    with pytest.raises(TypeError, match="config"):
        QatDense(8, config={"weight_format": "int8"}).init(jax.random.key(0), x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_learned_scales_that_reach_zero_or_below_serve_what_train_mode_computes(symmetric):
    """LSQ scales are trainable and can cross 0: every mode floors them at float32 eps, as
    computed scales are, so convert's codes and scales serve train mode's output bit for bit
    (jitted training and eager serving alike) instead of failing or differing."""
    cfg = QatConfig(learnable_scales=True, weight_symmetric=symmetric,
                    activation_symmetric=symmetric, activation_estimator="minmax",
                    activation_observer="minmax")
    layer = QatDense(4, config=cfg)
    x = jax.random.normal(jax.random.key(0), (8, 6))
    v = qatjax.calibrate(layer, layer.init(jax.random.key(1), x), [x])
    v["params"]["kernel_scale"] = v["params"]["kernel_scale"].at[0].set(-0.01).at[1].set(0.0)
    v["params"]["input_scale"] = -v["params"]["input_scale"]

    def apply(variables, mode):
        with quant_mode(mode):
            return layer.apply(variables, x)

    train = jax.jit(apply, static_argnums=1)(v, "train")
    assert np.all(np.isfinite(train))
    served = qatjax.convert(v)
    np.testing.assert_array_equal(apply(served, "infer"), train)
    np.testing.assert_array_equal(jax.jit(apply, static_argnums=1)(served, "infer"), train)
    assert float(served["quant_params"]["kernel_scale"][0]) == np.finfo(np.float32).eps
