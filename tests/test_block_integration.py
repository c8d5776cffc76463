"""Block-scaled formats through the stack: QatConfig and recipes, the quantized contraction
(forward against a float fake-quant reference, MXFP8 training's E5M2 gradients), linen, NNX
and quantize_model with train == infer == convert-then-infer bit for bit, export with fp4
codes packed two per byte, and the scaled-matmul GPU path's lowering."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qatjax
import qatjax.nnx as qnnx
from qatjax import QatConfig, blocks
from qatjax.flax import QatConv, QatDense, QatEinsum, quantize_model
from qatjax.qdot import DotSpec, scaled_matmul_dot, scaled_matmul_supported

CONFIGS = {
    "mxfp8": QatConfig(weight_format="mxfp8_e4m3", activation_format="mxfp8_e4m3"),
    "nvfp4": QatConfig(weight_format="nvfp4", activation_format="nvfp4"),
}
MXFP4_WEIGHTS = QatConfig(weight_format="mxfp4", activation_format=None)


def _x(shape, seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape) + 0.3, np.float32)


_fq = jax.jit(blocks.block_fake_quant, static_argnums=(1, 2))  # (x, fmt, axis)
_mask = jax.jit(blocks.block_ste_mask, static_argnums=(1, 2))


def _ref_forward(x, kernel, bias, cfg):
    """Float reference: block fake quantization of the input (along its features) and of the
    kernel (along its input axis), float64 matmul."""
    x_hat = x if cfg.activation_format is None else _fq(x, cfg.activation_format, -1)
    w_hat = _fq(kernel, cfg.weight_format, 0)
    return np.asarray(x_hat, np.float64) @ np.asarray(w_hat, np.float64) + np.asarray(bias)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_train_infer_convert_agree_bit_for_bit(name):
    """QatDense with block-format weights and activations (K = 70: a ragged last block): train
    == infer == infer on converted variables (jitted), all equal to the fake-quant reference up
    to float32 accumulation; converted kernels are codes with E8M0 (uint8) or E4M3 block
    scales and no float kernel. (Weight-only: the einsum and export tests.)"""
    cfg = CONFIGS[name]
    x = _x((5, 70))
    layer = QatDense(16, config=cfg)
    v = jax.jit(layer.init)(jax.random.key(1), x)
    apply = jax.jit(lambda v, x, mode: layer.apply(v, x, mode=mode), static_argnums=2)
    train, infer = apply(v, x, "train"), apply(v, x, "infer")
    served = qatjax.convert(v)
    converted = apply(served, x, "infer")
    np.testing.assert_array_equal(np.asarray(infer), np.asarray(train))
    np.testing.assert_array_equal(np.asarray(converted), np.asarray(train))
    ref = _ref_forward(x, v["params"]["kernel"], v["params"]["bias"], cfg)
    np.testing.assert_allclose(np.asarray(train), ref, rtol=1e-5, atol=1e-5)
    qp = served["quant_params"]
    assert "kernel" not in served["params"]
    # block x block: served [N, K] codes and [N, G] scales, G = ceil(70 / block_size)
    assert qp["kernel_codes"].shape == (16, 70)
    assert qp["kernel_scale"].shape == (16, -(-70 // cfg.weight_format.block_size))
    assert qp["kernel_scale"].dtype == cfg.weight_format.scale_dtype
    assert qp["kernel_codes"].dtype == cfg.weight_format.storage_dtype


def test_mxfp8_training_quantizes_the_output_gradient_to_e5m2():
    """MXFP8 W+A: dx = q(g) @ w_hat^T and dw = x_hat^T @ q(g) with q the MXFP8 E5M2 fake
    quantization along each product's contraction (N for dx, the batch for dw), masked by
    the clipped estimator; fp8_grad_format=None keeps the gradient float."""
    cfg = CONFIGS["mxfp8"]
    assert cfg.block_grad_format == qatjax.mxfp8_e5m2
    x, g = _x((40, 64)), _x((40, 48), seed=3) * 1e-3
    layer = QatDense(48, config=cfg, use_bias=False)
    v = jax.jit(layer.init)(jax.random.key(1), x)
    kernel = v["params"]["kernel"]

    def grads(cfg_):
        layer_ = QatDense(48, config=cfg_, use_bias=False)
        _, vjp = jax.vjp(lambda x_, k: layer_.apply({**v, "params": {"kernel": k}}, x_, mode="train"),
                         x, kernel)
        return vjp(g)

    dx, dw = jax.jit(lambda: grads(cfg))()
    x_hat = np.asarray(_fq(x, qatjax.mxfp8_e4m3, -1), np.float64)
    w_hat = np.asarray(_fq(kernel, qatjax.mxfp8_e4m3, 0), np.float64)
    x_mask = np.asarray(_mask(x, qatjax.mxfp8_e4m3, -1))
    w_mask = np.asarray(_mask(kernel, qatjax.mxfp8_e4m3, 0))
    g_dx = np.asarray(_fq(g, qatjax.mxfp8_e5m2, -1), np.float64)
    g_dw = np.asarray(_fq(g, qatjax.mxfp8_e5m2, 0), np.float64)
    np.testing.assert_allclose(np.asarray(dx), (g_dx @ w_hat.T) * x_mask, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(dw), (x_hat.T @ g_dw) * w_mask, rtol=1e-5, atol=1e-9)
    assert not np.allclose(g_dx, np.asarray(g, np.float64), rtol=1e-3)  # E5M2 moved the values
    dx_float, _ = jax.jit(lambda: grads(cfg.replace(fp8_grad_format=None)))()
    np.testing.assert_allclose(np.asarray(dx_float), (np.asarray(g, np.float64) @ w_hat.T) * x_mask,
                               rtol=1e-5, atol=1e-9)


def test_nnx_linear_and_quantize_model_give_the_linen_bits():
    """The NNX drop-in and an intercepted unmodified linen model give QatDense's bits in train
    and infer modes (MXFP8 W+A, K = 40)."""
    cfg = CONFIGS["mxfp8"]
    x = _x((4, 40))
    linear = qnnx.QatLinear(40, 8, config=cfg, rngs=nnx.Rngs(0))
    params = {"kernel": linear.kernel.get_value(), "bias": linear.bias.get_value()}
    dense = QatDense(8, config=cfg)
    v = {**jax.jit(dense.init)(jax.random.key(0), x), "params": params}
    run = nnx.jit(lambda layer, x, mode: layer(x, mode=mode), static_argnums=2)
    expected = {}
    for mode in ("train", "infer"):
        expected[mode] = np.asarray(jax.jit(lambda v, x, m=mode: dense.apply(v, x, mode=m))(v, x))
        np.testing.assert_array_equal(np.asarray(run(linear, x, mode)), expected[mode])

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="proj")(x)

    model = quantize_model(Plain(), cfg, mode="train")
    mv = {**jax.jit(model.init)(jax.random.key(0), x), "params": {"proj": params}}
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(mv, x)), expected["train"])


def test_export_packs_fp4_codes_and_imports_the_fake_quantized_kernel():
    """quantize_model_weights packs MXFP4 / NVFP4 codes two per byte (E8M0 scales stay uint8
    bytes); dequantize_weights gives back exactly the kernel train mode used."""
    for cfg in (MXFP4_WEIGHTS, QatConfig(weight_format="nvfp4", activation_format=None)):
        x = _x((3, 64))
        layer = QatDense(6, config=cfg)
        v = jax.jit(layer.init)(jax.random.key(2), x)
        exported = qatjax.quantize_model_weights(v)
        entry = exported["layers"][""]
        assert bool(entry["packed"]) and entry["codes"].shape == (64, 3)
        assert entry["scale"].dtype == cfg.weight_format.scale_dtype
        kernel = qatjax.dequantize_weights(exported)["kernel"]
        expected = _fq(v["params"]["kernel"], cfg.weight_format, 0)
        np.testing.assert_array_equal(np.asarray(kernel), np.asarray(expected))


def test_einsum_blocks_its_contracted_axis_and_conv_is_refused():
    """QatEinsum contracting one axis serves the same bits as it trains; a convolution (many
    contracted axes) refuses block formats with a clear error."""
    cfg = MXFP4_WEIGHTS
    x = _x((2, 3, 40))
    layer = QatEinsum(shape=(40, 6), einsum_str="btk,kn->btn", config=cfg)
    v = jax.jit(layer.init)(jax.random.key(0), x)
    apply = jax.jit(lambda v, x, mode: layer.apply(v, x, mode=mode), static_argnums=2)
    train = apply(v, x, "train")
    np.testing.assert_array_equal(np.asarray(apply(qatjax.convert(v), x, "infer")), np.asarray(train))
    w_hat = _fq(v["params"]["kernel"], cfg.weight_format, 0)
    np.testing.assert_allclose(np.asarray(train), np.einsum("btk,kn->btn", x, np.asarray(w_hat),
                                                            optimize=False), rtol=1e-5, atol=1e-5)
    conv = QatConv(4, kernel_size=(3,), config=cfg)
    with pytest.raises(ValueError, match="not supported for convolutions"):
        jax.eval_shape(conv.init, jax.random.key(0), _x((1, 8, 4)))


def test_config_and_recipes():
    cfg = QatConfig.from_yaml("quant: {weight_format: mxfp4, activation_format: mxfp8_e4m3}")
    assert cfg.weight_format == qatjax.mxfp4 and cfg.activation_format == qatjax.mxfp8_e4m3
    assert cfg.activation_scaling == "dynamic"  # block activations take scales from each block
    assert cfg.block_grad_format is None  # MXFP4 weights: not MXFP8 training
    assert QatConfig.from_dict(cfg.to_dict()) == cfg
    nv = QatConfig(weight_format="nvfp4", activation_format="nvfp4")
    assert nv.to_dict()["weight_format"] == "nvfp4" and not nv.integer_matmul
    with pytest.raises(ValueError, match="per_group"):
        QatConfig(weight_format="mxfp4", weight_granularity="per_group", weight_group_size=32)
    with pytest.raises(ValueError, match="learnable_scales"):
        QatConfig(weight_format="mxfp4", activation_format=None, learnable_scales=True)
    with pytest.raises(ValueError, match="per_token"):
        QatConfig(activation_format="mxfp8_e4m3", activation_granularity="per_token")
    with pytest.raises(ValueError, match="symmetric"):
        QatConfig(weight_format="mxfp4", weight_symmetric=False)


def test_scaled_matmul_feature_detection_and_gpu_lowering():
    """On CPU the forward dequantizes per block (no scaled matmul); lowered for CUDA, the GPU
    path emits one block-scaled dot on the fp8 / fp4 codes with E8M0 / E4M3 scales (padded
    to whole blocks), whose dequantized reference the CPU path computes."""
    mx = DotSpec(qatjax.mxfp8_e4m3, qatjax.mxfp8_e4m3)
    nv = DotSpec(qatjax.nvfp4, qatjax.nvfp4)
    assert not scaled_matmul_supported(mx) and not scaled_matmul_supported(nv)
    assert not scaled_matmul_supported(DotSpec(qatjax.mxfp4, qatjax.mxfp4), backend="gpu")
    x, w = _x((4, 40)), _x((8, 40), seed=1)  # w in the serving layout [N, K]
    dims = (((1,), (1,)), ((), ()))
    for spec, dtypes in ((mx, ("f8E4M3FN", "f8E8M0FNU")), (nv, ("f4E2M1FN", "f8E4M3FN"))):
        fmt = spec.x_format

        def serve(x, w):
            qx, sx = blocks.block_quantize(x, fmt, -1)
            qw, sw = blocks.block_quantize(w, fmt, -1)
            return scaled_matmul_dot(qx, sx, qw, sw, spec, dims)

        text = jax.jit(serve).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
        calls = [line for line in text.splitlines() if "block_scaled_dot" in line]
        assert len(calls) == 1 and all(d in calls[0] for d in dtypes), calls
        k_padded = -(-40 // fmt.block_size) * fmt.block_size
        assert f"1x4x{k_padded}x{dtypes[0]}" in calls[0]
