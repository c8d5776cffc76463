"""NaN in, NaN out: outputs that read a NaN or infinity of a quantized activation are NaN in
train and infer modes, as in float mode (all outputs when a dynamic scale is taken from the
whole tensor, and for a convolution; the rows otherwise); calibration skips and counts
non-finite values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qatjax
from qatjax import QatConfig
from qatjax.flax import QatDense, quant_mode, quantize_model
from qatjax.qdot import ConvSpec, DotSpec, encode_weight, quantized_dot, quantized_dot_general, serve
from qatjax.quantizers import ActivationQuantizer, WeightQuantizer

RNG = np.random.RandomState(0)
X = RNG.randn(6, 16).astype(np.float32)
W = RNG.randn(16, 8).astype(np.float32)


def _poison(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[1, 3], x[2, 5], x[4, 0] = np.nan, np.inf, -np.inf
    return x


def _bad_rows(x: np.ndarray) -> np.ndarray:
    return ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))


SPECS = {
    "int8xint8": DotSpec(qatjax.int8, qatjax.int8),
    "uint8-affine x int4": DotSpec(qatjax.uint8, qatjax.int4, x_symmetric=False),
    "fp8xfp8": DotSpec(qatjax.fp8_e4m3, qatjax.fp8_e4m3),
    "activation-only": DotSpec(qatjax.int8, None),
    "int8xfp8": DotSpec(qatjax.int8, qatjax.fp8_e4m3),
}


@pytest.mark.parametrize("per_token", [False, True], ids=["per-tensor", "per-token"])
@pytest.mark.parametrize("name", list(SPECS))
def test_dynamic_activations_nan_in_nan_out_and_other_rows_unchanged(name, per_token):
    spec = SPECS[name]
    act = ActivationQuantizer(spec.x_format, symmetric=spec.x_symmetric, scaling="dynamic",
                              per_token=per_token)
    wq = (None if spec.w_format is None
          else WeightQuantizer(spec.w_format, "per_channel", symmetric=spec.w_symmetric))

    def run(x, serving=False):
        x_qp = act.dynamic_qparams(x, (1,))
        w_qp = None if wq is None else wq.qparams(W, (0,))
        if not serving:
            return quantized_dot(x, W, x_qp, w_qp, spec)
        codes, served = encode_weight(W, w_qp, spec) if wq is not None else (W, None)
        return serve(x, codes, x_qp, served, spec)

    x = _poison(X)
    y = np.asarray(jax.jit(run)(x))
    bad = _bad_rows(x)
    assert np.isnan(y[bad]).all(), "rows that read a NaN or infinity must be NaN"
    if per_token:  # the other rows keep their scales and values
        clean = np.asarray(jax.jit(run)(np.where(np.isfinite(x), x, 0).astype(np.float32)))
        np.testing.assert_array_equal(y[~bad], clean[~bad])
        assert np.isfinite(y[~bad]).all()
    else:  # the scale shared by the whole tensor is NaN, and so is every output
        assert np.isnan(y).all()
    if spec.w_format is not None:  # serving from stored codes agrees bit for bit, NaN included
        np.testing.assert_array_equal(np.asarray(jax.jit(run, static_argnums=1)(x, True)), y)


def test_static_scales_nan_in_nan_out():
    w_qp = WeightQuantizer(qatjax.int8).qparams(W, (0,))
    run = jax.jit(quantized_dot, static_argnums=4)
    spec = DotSpec(qatjax.int8, qatjax.int8)
    qp = qatjax.qparams_from_amax(4.0, qatjax.int8)
    y = np.asarray(run(_poison(X), W, qp, w_qp, spec))
    bad = _bad_rows(_poison(X))
    # Only the rows that read a non-finite value; the others keep their values bit for bit.
    assert np.isnan(y[bad]).all() and np.isfinite(y[~bad]).all()
    np.testing.assert_array_equal(y[~bad], np.asarray(run(X, W, qp, w_qp, spec))[~bad])


def test_two_activations_poison_rows_and_columns():
    # Attention's Q K^T: a NaN in a key poisons that key's column, one in a query its row.
    q, k = RNG.randn(2, 5, 8).astype(np.float32), RNG.randn(2, 7, 8).astype(np.float32)
    q[0, 1, 2], k[1, 4, 0] = np.nan, np.inf
    act = ActivationQuantizer(qatjax.int8, scaling="dynamic", per_token=True)
    dims = (((2,), (2,)), ((0,), (0,)))
    y = np.asarray(quantized_dot_general(q, k, dims, act.dynamic_qparams(q, (2,)),
                                         act.dynamic_qparams(k, (2,)),
                                         DotSpec(qatjax.int8, qatjax.int8, w_is_activation=True)))
    expected = ~np.isfinite(np.einsum("bqd,bkd->bqk", q, k))
    np.testing.assert_array_equal(np.isnan(y), expected)


@pytest.mark.parametrize("groups", [1, 2])
def test_convolution_with_a_nan_gives_nan(groups):
    x = RNG.randn(2, 9, 9, 4).astype(np.float32)
    x[0, 4, 4, 1], x[1, 0, 8, 3] = np.nan, np.inf
    w = RNG.randn(3, 3, 4 // groups, 6).astype(np.float32)
    spec = ConvSpec(qatjax.int8, qatjax.int8, strides=(2, 1), rhs_dilation=(1, 2),
                    feature_group_count=groups, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x_qp = qatjax.qparams_from_amax(3.0, qatjax.int8)
    w_qp = WeightQuantizer(qatjax.int8).qparams(w, (0, 1, 2))
    y = np.asarray(jax.jit(lambda x: quantized_dot(x, w, x_qp, w_qp, spec))(x))
    assert np.isnan(y).all()  # the per-tensor scale of the input is NaN
    clean = np.where(np.isfinite(x), x, 0).astype(np.float32)
    assert np.isfinite(np.asarray(jax.jit(lambda x: quantized_dot(x, w, x_qp, w_qp, spec))(clean))).all()


def test_a_nan_weight_poisons_its_output_channel_through_its_scale():
    w = W.copy()
    w[3, 5] = np.nan
    w_qp = WeightQuantizer(qatjax.int8).qparams(w, (0,))
    assert np.isnan(w_qp.scale[0, 5])
    y = np.asarray(jax.jit(quantized_dot, static_argnums=4)(
        X, w, qatjax.qparams_from_amax(4.0, qatjax.int8), w_qp, DotSpec(qatjax.int8, qatjax.int8)))
    assert np.isnan(y[:, 5]).all() and np.isfinite(np.delete(y, 5, axis=1)).all()


RECIPES = {
    "static-entropy": QatConfig(),
    "static-minmax": QatConfig(activation_observer="minmax", activation_estimator="minmax"),
    "static-affine-uint8": QatConfig(activation_format="uint8", activation_symmetric=False,
                                     activation_estimator="mse"),
    "lsq": QatConfig(learnable_scales=True),
    "dynamic": QatConfig(activation_scaling="dynamic"),
    "dynamic-per-token": QatConfig(activation_scaling="dynamic", activation_granularity="per_token"),
    "activation-only": QatConfig(weight_format=None, activation_scaling="dynamic"),
    "fp8-static": QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                            activation_estimator="minmax", activation_observer="minmax"),
    "fp8-current": QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                             weight_granularity="per_tensor", fp8_scaling="current"),
    "fp8-delayed": QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                             weight_granularity="per_tensor", fp8_scaling="delayed"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_activation_recipe_propagates_nan_in_train_and_infer(name):
    cfg = RECIPES[name]
    model = QatDense(8, config=cfg)
    variables = model.init(jax.random.key(0), X)
    if cfg.activation_scaling == "static" and cfg.fp8_scaling is None:
        variables = qatjax.calibrate(model, variables, [X])
    x = _poison(X)
    bad = _bad_rows(x)
    float_y = np.asarray(model.apply(variables, x, mode="float"))
    assert (~np.isfinite(float_y).all(axis=1) == bad).all()
    # A scale taken from the whole tensor is NaN, and every output with it; else the rows.
    shared = name in ("dynamic", "activation-only", "fp8-current")
    for mode in ("train", "infer"):
        y, _ = model.apply(variables, x, mode=mode, mutable=True)
        y = np.asarray(y)
        assert np.isnan(y[bad]).all(), mode  # so the loss is NaN: a diverging run shows
        assert np.isnan(y).all() if shared else np.isfinite(y[~bad]).all(), mode


def test_quantize_model_attention_propagates_nan():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x)
            s = jnp.einsum("bqd,bkd->bqk", h, h)
            return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s), h)

    model = quantize_model(Block(), QatConfig(activation_scaling="dynamic",
                                              activation_granularity="per_token"))
    x = RNG.randn(3, 6, 4).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    x[1, 2, 0] = np.nan
    for mode in ("train", "infer"):
        with quant_mode(mode):
            y = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, x))  # traced here
        assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all(), mode


def test_calibration_skips_and_counts_non_finite_values():
    model = QatDense(8, config=QatConfig(activation_observer="minmax", activation_estimator="minmax"))
    variables = model.init(jax.random.key(0), X)
    calibrated = qatjax.calibrate(model, variables, [_poison(X), X])
    reference = qatjax.calibrate(model, variables, [np.where(np.isfinite(_poison(X)), _poison(X), 0), X])
    np.testing.assert_array_equal(calibrated["quant_params"]["input_scale"],
                                  reference["quant_params"]["input_scale"])
    stats = jax.tree_util.tree_leaves_with_path(calibrated["quant_stats"])
    counts = [v for p, v in stats if "num_nonfinite" in jax.tree_util.keystr(p)]
    assert counts and int(np.sum(counts)) == 3
