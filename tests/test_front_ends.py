"""One weight path under every linen front end: train == infer == convert-then-infer, bit for
bit, and the exported-then-imported kernel is the one train mode used (the grid of issue 10)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax.flax import QatConv, QatDense, QatDenseGeneral, QatEinsum, quant_mode, quantize_model

FORMATS = {
    "int8": dict(),
    "uint8-affine": dict(weight_format="uint8", activation_format="uint8", weight_symmetric=False,
                         activation_symmetric=False),
    "int4-group": dict(weight_format="int4", weight_granularity="per_group", weight_group_size=8),
    "fp8": dict(weight_format="fp8_e4m3", activation_format="fp8_e4m3"),
    "w4-only": dict(weight_format="int4", activation_format=None),
    "int8xfp8": dict(activation_format="fp8_e4m3"),
}
RECIPES = {
    "static": dict(activation_observer="minmax", activation_estimator="minmax"),
    "per-token": dict(activation_scaling="dynamic", activation_granularity="per_token"),
}

LAYERS = {
    "dense": (lambda cfg, d: QatDense(12, config=cfg, param_dtype=d), (3, 5, 16)),
    "dense_general": (lambda cfg, d: QatDenseGeneral((2, 6), axis=-1, config=cfg, param_dtype=d), (3, 5, 16)),
    "einsum": (lambda cfg, d: QatEinsum((16, 3, 4), "btd,dhk->bthk", config=cfg, param_dtype=d), (3, 5, 16)),
    "conv": (lambda cfg, d: QatConv(6, (3, 3), config=cfg, param_dtype=d), (2, 6, 6, 4)),
    "conv-mask-groups": (lambda cfg, d: QatConv(
        6, (3, 3), feature_group_count=2, mask=jnp.asarray(np.random.default_rng(0).random((3, 3, 2, 6)) > 0.4),
        config=cfg, param_dtype=d), (2, 6, 6, 4)),
}


def _case_ok(layer: str, fmt: str, recipe: str) -> bool:
    if layer.startswith("conv") and (fmt == "int4-group" or recipe == "per-token"):
        return False  # per-group / per-token scales do not factor out of a convolution
    if layer != "dense" and fmt in ("int8xfp8", "fp8") and recipe == "per-token":
        return False  # the contraction is shared: the dense layer covers these once
    if layer == "conv-mask-groups" and fmt not in ("int8", "uint8-affine"):
        return False
    # Per-token activations: one integer and one fp8 format suffice (the weight side is the same).
    return not (recipe == "per-token" and fmt not in ("int8", "fp8"))


CASES = [(l, f, r, d) for l in LAYERS for f in FORMATS for r in RECIPES for d in ("float32", "bfloat16")
         if _case_ok(l, f, r) and (d == "float32" or (f, r) in (("int8", "static"), ("w4-only", "static")))]


@pytest.mark.parametrize("layer_name,fmt,recipe,dtype", CASES)
def test_train_infer_convert_export_agree(layer_name, fmt, recipe, dtype):
    cfg = qatjax.QatConfig(**FORMATS[fmt], **RECIPES[recipe])
    make, shape = LAYERS[layer_name]
    layer = make(cfg, jnp.dtype(dtype))
    x = jax.random.normal(jax.random.key(0), shape) + 0.25
    v = layer.init(jax.random.key(1), x)
    if cfg.activation_format is not None and cfg.activation_scaling == "static":
        v = qatjax.calibrate(layer, v, [x, x * 0.5])
    run = jax.jit(lambda v, x, mode: layer.apply(v, x, mode=mode), static_argnums=2)
    train, infer = run(v, x, "train"), run(v, x, "infer")
    converted = run(qatjax.convert(v), x, "infer")
    np.testing.assert_array_equal(np.asarray(infer), np.asarray(train))
    np.testing.assert_array_equal(np.asarray(converted), np.asarray(train))
    # Export, then import: the imported kernel is the dequantized codes train mode used, so
    # a float apply of it equals the float apply of the fake-quantized kernel.
    imported = qatjax.dequantize_weights(qatjax.quantize_model_weights(v))
    kernel = np.asarray(v["params"]["kernel"], np.float32)
    if "kernel_mask" in v.get("quant_params", {}):
        kernel = kernel * np.asarray(v["quant_params"]["kernel_mask"])
    w_hat = np.asarray(imported["kernel"])
    assert w_hat.shape == kernel.shape
    if fmt == "fp8":  # 3 mantissa bits: half an ulp is 2**-4 of the value
        assert np.all(np.abs(w_hat - kernel) <= 2.0**-4 * np.abs(kernel) + 1e-6)
    else:  # half a step of the widest scale: max|w| / qmax
        tol = 0.51 * float(np.max(np.abs(kernel))) / (7 if "4" in fmt else 127) * (2 if "uint8" in fmt else 1)
        assert np.max(np.abs(w_hat - kernel)) <= tol
    # Train mode is the float fake-quant forward, to float rounding.
    float_out = np.asarray(layer.apply(v, x, mode="float"), np.float32)
    rel = np.max(np.abs(np.asarray(train, np.float32) - float_out)) / np.max(np.abs(float_out))
    assert rel < (0.25 if "4" in fmt else 0.08)


def test_conv_with_mask_converts_the_masked_kernel():
    """Issue 10: convert used to quantize the unmasked kernel (output off by 2.44)."""
    mask = jnp.zeros((3, 3, 4, 6)).at[1, 1].set(1.0)
    layer = QatConv(6, (3, 3), mask=mask, config=qatjax.QatConfig(activation_scaling="dynamic"))
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    v = layer.init(jax.random.key(1), x)
    v["params"]["kernel"] = v["params"]["kernel"] + 3.0  # large values where the mask is 0
    train = layer.apply(v, x, mode="train")
    np.testing.assert_array_equal(np.asarray(layer.apply(qatjax.convert(v), x, mode="infer")),
                                  np.asarray(train))


def test_conv_learnable_scales_create_and_train_the_weight_scale():
    cfg = qatjax.QatConfig(learnable_scales=True, activation_observer="minmax", activation_estimator="minmax")
    layer = QatConv(6, (3, 3), config=cfg)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    v = qatjax.calibrate(layer, jax.jit(layer.init)(jax.random.key(1), x), [x])
    assert v["params"]["kernel_scale"].shape == (6,)
    g = jax.jit(jax.grad(lambda p: layer.apply({**v, "params": p}, x, mode="train").sum()))(v["params"])
    assert np.all(np.isfinite(np.asarray(g["kernel_scale"]))) and np.any(np.asarray(g["kernel_scale"]) != 0)


def test_conv_unsigned_weights_do_not_wrap():
    """uint8 codes 128..255 used to be cast to int8 and wrap (error 3.16 on outputs of size 2)."""
    cfg = qatjax.QatConfig(weight_format="uint8", weight_symmetric=False, activation_scaling="dynamic")
    layer = QatConv(6, (3, 3), config=cfg)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    v = layer.init(jax.random.key(1), x)
    y, yf = layer.apply(v, x, mode="train"), layer.apply(v, x, mode="float")
    assert np.max(np.abs(np.asarray(y - yf))) < 0.05 * np.max(np.abs(np.asarray(yf)))


class _Block(nn.Module):
    """An unmodified transformer block: flax attention (jnp.einsum inside), nn.Einsum, and a
    subclass of nn.Dense."""

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(x, x)
        x = x + h
        h = nn.relu(nn.Einsum((16, 32), "btd,de->bte", name="up")(x))
        return x + _MyDense(16, name="down")(h)


class _MyDense(nn.Dense):
    pass


@pytest.mark.parametrize("quantize_attention_einsums", [True, False])
def test_quantize_model_reaches_attention_einsums_and_dense_subclasses(quantize_attention_einsums):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    model = _Block()
    float_params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    cfg = qatjax.QatConfig(activation_observer="minmax", activation_estimator="minmax")
    rules = [] if quantize_attention_einsums else [("attn", None)]
    q = quantize_model(model, cfg, rules=rules)
    v = jax.eval_shape(q.init, jax.random.key(1), x)
    assert jax.tree_util.tree_structure(v["params"]) == jax.tree_util.tree_structure(float_params)
    v = qatjax.calibrate(q, {"params": float_params}, [x])
    qp = v["quant_params"]
    # The attention weights' two einsums (Q K^T, A V) have their own activation scales.
    assert ("einsum0_lhs_scale" in qp["attn"]) == quantize_attention_einsums
    assert ("einsum1_rhs_scale" in qp["attn"]) == quantize_attention_einsums
    assert "dot_general0_lhs_scale" in qp["down"] and "kernel_spec" in qp["up"]
    with quant_mode("float"):
        yf = jax.jit(q.apply)(v, x)
    np.testing.assert_array_equal(np.asarray(yf),
                                  np.asarray(jax.jit(model.apply)({"params": float_params}, x)))
    with quant_mode("train"):
        yt = jax.jit(q.apply)(v, x)
    with quant_mode("infer"):
        yi = jax.jit(q.apply)(v, x)
        yc = jax.jit(q.apply)(qatjax.convert(v), x)
    np.testing.assert_array_equal(np.asarray(yi), np.asarray(yt))
    np.testing.assert_array_equal(np.asarray(yc), np.asarray(yt))
    assert 0 < float(jnp.max(jnp.abs(yt - yf))) < 0.1 * float(jnp.max(jnp.abs(yf)))

    def loss(p):
        with quant_mode("train"):
            return jnp.sum(q.apply({**v, "params": p}, x) ** 2)

    grads = jax.jit(jax.grad(loss))(v["params"])
    assert float(jnp.abs(grads["down"]["kernel"]).sum()) > 0


class _ConvNet(nn.Module):
    """A module that calls lax.conv_general_dilated itself, NCHW / OIHW, with input dilation."""

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (8, 3, 3, 3))  # OIHW
        y = jax.lax.conv_general_dilated(x, k, (1, 2), ((1, 1), (2, 0)), lhs_dilation=(2, 1),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return nn.relu(y)


@pytest.mark.parametrize("cfg", [
    qatjax.QatConfig(activation_observer="minmax", activation_estimator="minmax"),
    qatjax.QatConfig(activation_format="uint8", activation_symmetric=False, activation_scaling="dynamic"),
], ids=["int8-static", "uint8-dynamic"])
def test_quantize_model_intercepts_conv_general_dilated(cfg):
    x = jax.random.normal(jax.random.key(0), (2, 3, 7, 9)) + 0.2
    model = _ConvNet()
    float_params = model.init(jax.random.key(1), x)["params"]
    q = quantize_model(model, cfg)
    v = {"params": float_params}
    if cfg.activation_scaling == "static":
        v = qatjax.calibrate(q, v, [x])
        assert "conv0_lhs_scale" in v["quant_params"]
    with quant_mode("train"):
        yt = jax.jit(q.apply)(v, x)
    with quant_mode("infer"):
        yi = jax.jit(q.apply)(v, x)
    np.testing.assert_array_equal(np.asarray(yi), np.asarray(yt))
    # The reference: the same convolution of the fake-quantized operands.
    k = float_params["kernel"]
    kq = qatjax.fake_quant(k, qatjax.qparams_from_amax(jnp.abs(k).max((1, 2, 3), keepdims=True), qatjax.int8),
                           qatjax.int8)
    if cfg.activation_scaling == "static":
        xqp = qatjax.QParams(v["quant_params"]["conv0_lhs_scale"], v["quant_params"]["conv0_lhs_zero_point"])
    else:
        xqp = qatjax.qparams_from_minmax(x.min(), x.max(), cfg.activation_format, symmetric=False)
    xq = qatjax.fake_quant(x, xqp, cfg.activation_format)
    ref = nn.relu(jax.lax.conv_general_dilated(xq, kq, (1, 2), ((1, 1), (2, 0)), lhs_dilation=(2, 1),
                                               dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                               precision="highest"))
    assert yt.shape == ref.shape
    np.testing.assert_allclose(np.asarray(yt), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_intercepted_conv_with_string_padding_equals_its_float_module_in_float_mode():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            k = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 4, 5))
            return jax.lax.conv_general_dilated(x, k, (2, 1), "SAME", rhs_dilation=(1, 2),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = jax.random.normal(jax.random.key(0), (2, 7, 8, 4))
    params = jax.jit(Net().init)(jax.random.key(1), x)["params"]
    q = quantize_model(Net(), qatjax.QatConfig(activation_scaling="dynamic"))

    @jax.jit
    def train(variables, x):
        with quant_mode("train"):
            return q.apply(variables, x)

    y = train({"params": params}, x)
    yf = jax.jit(Net().apply)({"params": params}, x)
    assert y.shape == yf.shape
    assert float(jnp.max(jnp.abs(y - yf))) < 0.03 * float(jnp.max(jnp.abs(yf)))
