"""Quantize a model you already have: a plain Flax CNN and its trained parameters.

    python examples/quantize_existing_model.py

The recipe for any Flax model:

1. ``qatjax.flax.quantize_model(model, config)``: the same model, whose ``nn.Conv`` /
   ``nn.Dense`` calls run as ``qatjax.flax.QatConv`` / ``QatDense`` (no code edited).
   Parameter names and paths do not change, so the float checkpoint loads unchanged,
   and ``quant_mode("float")`` is bit for bit the original model. (Writing the model
   with QatConv / QatDense, same names, is the same thing by hand.)
2. ``qatjax.calibrate`` it on a few hundred training inputs: each layer's
   histogram observer sees its input and an estimator picks the int8 scale.
3. ``qatjax.convert`` the variables for serving (int8 kernel codes + scales) and run
   ``mode="infer"``: int8 x int8 -> int32 convolutions and matmuls.
4. ``qatjax.quant_report`` prints what calibration chose, layer by layer;
   ``qatjax.quantize_model_weights`` is the export (its size is the model's size).

Here the "existing model" is a small CNN trained on scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qatjax
from qatjax import QatConfig
from qatjax.flax import quant_mode, quantize_model

# The digits experiment (examples/digits_experiment.py) sits next to this file; run as a
# script, its directory is already on sys.path, loaded from elsewhere (tests) it may not be.
_EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
import digits_experiment as digits  # noqa: E402


# ----------------------------------------------------------------------------- the float model
class CNN(nn.Module):
    """The model as it exists in your code base: plain Flax layers."""

    @nn.compact
    def __call__(self, x):  # x: [batch, 8, 8, 1]
        x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="conv2")(x))  # -> [batch, 4, 4, 32]
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64, name="fc")(x))
        return nn.Dense(10, name="head")(x)


def train_cnn(data: digits.Data, epochs: int, seed: int = 0) -> dict:
    """Stands for "your trained checkpoint": a plain optax loop on the float CNN."""
    model = CNN()
    x, y = data.x_train.reshape(-1, 8, 8, 1), data.y_train
    params = jax.jit(model.init)(jax.random.key(seed), x[:1])["params"]
    tx = optax.adam(2e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(len(x) // 32):
            idx = perm[i * 32:(i + 1) * 32]
            params, opt_state = step(params, opt_state, x[idx], y[idx])
    return params


def run(epochs: int = 15, calib_samples: int = 512, estimator: str = "mse") -> dict:
    """Runs the walk-through; returns its measurements (for the tests)."""
    data = digits.load_data()
    x_test = data.x_test.reshape(-1, 8, 8, 1)
    params = train_cnn(data, epochs)                      # the existing checkpoint
    float_logits = jax.jit(CNN().apply)({"params": params}, x_test)

    # 1. Run the same model with qatjax layers; the float params load unchanged.
    # Every layer input is >= 0 (pixels, then ReLU outputs): affine uint8 activations use
    # all 256 codes on [0, max]; weights are symmetric int8, one scale per output channel.
    config = QatConfig(weight_format="int8", weight_granularity="per_channel",
                       activation_format="uint8", activation_symmetric=False,
                       activation_observer="histogram", activation_estimator=estimator)
    qmodel = quantize_model(CNN(), config)

    @functools.partial(jax.jit, static_argnames="mode")
    def apply(variables, x, mode):
        with quant_mode(mode):
            return qmodel.apply(variables, x)

    same = apply({"params": params}, x_test, mode="float")
    float_diff = float(jnp.max(jnp.abs(same - float_logits)))
    print(f"quantize_model(CNN()) in float mode vs CNN: max |diff| = {float_diff} (identical)")
    assert float_diff == 0.0

    # 2. Calibrate on training images.
    calib = data.x_train[:calib_samples].reshape(-1, 8, 8, 1)
    batches = [calib[i:i + 128] for i in range(0, len(calib), 128)]
    variables = qatjax.calibrate(qmodel, {"params": params}, batches, progress=True)

    # 3. Convert for serving and run the integer path.
    served = qatjax.convert(variables)
    int8_logits = apply(served, x_test, mode="infer")
    fake_logits = apply(variables, x_test, mode="train")
    infer_diff = float(jnp.max(jnp.abs(int8_logits - fake_logits)))

    # 4. Report: per-layer quantization, accuracy and size.
    print()
    print(qatjax.quant_report(variables))
    f = digits.evaluate(np.asarray(float_logits), data.y_test)
    q = digits.evaluate(np.asarray(int8_logits), data.y_test, np.asarray(float_logits))
    float_bytes = digits.tree_bytes(params)
    int8_bytes = digits.tree_bytes(qatjax.quantize_model_weights(variables))
    print()
    print(f"float accuracy {100 * f.accuracy:.2f}%   int8 accuracy {100 * q.accuracy:.2f}%   "
          f"top-1 agreement {100 * q.agreement:.2f}%   relative logit error {q.rel_logit_error:.4f}")
    print(f"integer path vs fake quantization: max |diff| = {infer_diff}")
    print(f"size: float {float_bytes:,} bytes -> int8 {int8_bytes:,} bytes "
          f"({float_bytes / int8_bytes:.2f}x smaller)")
    return {"float_accuracy": f.accuracy, "accuracy": q.accuracy, "agreement": q.agreement,
            "rel_logit_error": q.rel_logit_error, "infer_vs_train": infer_diff,
            "float_bytes": float_bytes, "bytes": int8_bytes, "float_mode_diff": float_diff,
            "report": qatjax.quant_report(variables)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Quantize an existing Flax CNN to int8.")
    parser.add_argument("--epochs", type=int, default=15, help="float training epochs (default 15)")
    parser.add_argument("--estimator", default="mse", choices=qatjax.calibration.METHODS,
                        help="activation estimator (default mse)")
    args = parser.parse_args(argv)
    run(epochs=args.epochs, estimator=args.estimator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
