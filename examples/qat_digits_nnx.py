"""The digits example in Flax NNX: a plain ``nnx.Module`` MLP, quantized in place, PTQ and QAT.

    pip install -e ".[examples]" && python examples/qat_digits_nnx.py

The NNX variant of ``examples/qat_digits.py`` (same data, same MLP 64-256-256-10, same
table), written the way an NNX user writes it:

1. The float model is an ordinary ``nnx.Module`` of ``nnx.Linear`` layers (nothing from
   qatjax in it), trained with ``nnx.Optimizer`` and optax on scikit-learn's bundled 8x8
   digits (``digits_experiment.load_data``: 1257 train / 540 test images, seeded split).
2. Every recipe starts from a copy of the float model (``nnx.clone``) that
   ``qatjax.nnx.quantize_model`` quantizes in place: its ``nnx.Linear`` layers become
   ``qatjax.nnx.QatLinear`` layers holding the same ``kernel`` / ``bias`` variables, plus
   their quantization state as typed NNX variables.
3. PTQ: ``qatjax.nnx.calibrate`` runs the model over training images (a histogram observer
   per layer input) and an estimator (minmax, percentile, entropy, mse) picks the 8-bit
   activation scales: affine uint8, since every layer input is >= 0. Weights are int8
   per channel (W8A8) or int4 in blocks of 32 input features (W4A8 per-group).
4. QAT: after calibration, a few epochs of the same ``nnx.Optimizer`` loop under
   ``qatjax.nnx.quant_mode("train")`` (the quantized forward, int8 x int8 -> int32 for
   W8A8; the straight-through backward). LSQ's learnable scales are ``nnx.Param`` variables, so the optimizer
   (``wrt=nnx.Param``) trains them with the weights.
5. Serving: the test logits in train mode (fake quantization), the export
   (``qatjax.nnx.quantize_model_weights``: codes and scales, int4 packed two per byte),
   then ``qatjax.nnx.convert`` (in place: integer codes replace the float kernels) and the
   test logits in infer mode, the integer path. ``|infer-train|``, the largest difference
   between the two, is 0: what was trained is what is served, bit for bit.

Options: ``--quick`` (fewer epochs, one calibration batch and three rows: a few seconds of
training, about 20 s in all on 2 CPU cores) and ``--seed`` (data split, initialisation and
shuffling).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import nnx

import qatjax.nnx as qnnx
from qatjax import QatConfig

# The digits experiment (examples/digits_experiment.py) sits next to this file; run as a
# script, its directory is already on sys.path, loaded from elsewhere (tests) it may not be.
_EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
import digits_experiment as digits


# ----------------------------------------------------------------------------- the model
class DigitsMLP(nnx.Module):
    """MLP ``64 -> 256 -> 256 -> 10`` (ReLU): plain ``nnx.Linear`` layers, no qatjax code."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.dense_0 = nnx.Linear(64, 256, rngs=rngs)
        self.dense_1 = nnx.Linear(256, 256, rngs=rngs)
        self.head = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.dense_0(x))
        x = nnx.relu(self.dense_1(x))
        return self.head(x)


# ----------------------------------------------------------------------------- the recipes
# Activations: affine uint8 from a histogram observer (every layer input is non-negative:
# pixels in [0, 1], then ReLU outputs; symmetric int8 would waste half its codes).
W8A8 = QatConfig(weight_format="int8", weight_granularity="per_channel",
                 activation_format="uint8", activation_symmetric=False,
                 activation_observer="histogram")
W4A8 = W8A8.replace(weight_format="int4")
W4A8_GROUP = W4A8.replace(weight_granularity="per_group", weight_group_size=32)

# Settings (digits_experiment.Settings): the full run is the linen example's budget (40 float
# epochs, 5 QAT epochs, calibration on every training image in batches of 128); the quick run
# trains 10 float epochs and 2 QAT epochs and calibrates on one batch of 512 images.
FULL = digits.FULL
QUICK = digits.QUICK.replace(float_epochs=10, calib_batch_size=512)

# The rows of a quick run: W8A8 PTQ, W8A8 QAT and int4 LSQ QAT (each row costs a few XLA
# compilations, which dominate a quick run).
QUICK_ROWS = ("PTQ W8A8 minmax", "QAT W8A8 percentile", "QAT W4 LSQ")


def recipes(quick: bool = False) -> list[tuple[str, str, QatConfig]]:
    """The table's rows after the float one: ``(name, "ptq" | "qat", config)``."""
    rows = [(f"PTQ W8A8 {est}", "ptq", W8A8.replace(activation_estimator=est))
            for est in ("minmax", "percentile", "entropy", "mse")]
    rows += [
        ("PTQ W4A8 per-group mse", "ptq", W4A8_GROUP.replace(activation_estimator="mse")),
        # int8 QAT: calibrate, then fine-tune with the clipped straight-through estimator.
        ("QAT W8A8 percentile", "qat", W8A8.replace(activation_estimator="percentile")),
        # int4 weights with LSQ: the weight and activation scales (and the activation zero
        # point) are nnx.Param, trained with the LSQ gradient.
        ("QAT W4A8 LSQ", "qat", W4A8.replace(activation_estimator="percentile",
                                             learnable_scales=True)),
        # int4 weight-only LSQ (float activations), configs/int4_weight_only_lsq.yaml.
        ("QAT W4 LSQ", "qat", QatConfig(weight_format="int4", activation_format=None,
                                        learnable_scales=True)),
    ]
    return [r for r in rows if not quick or r[0] in QUICK_ROWS]


# ----------------------------------------------------------------------------- training
@nnx.jit(static_argnames="mode")
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array,
                mode: str) -> jax.Array:
    def loss_fn(model: nnx.Module) -> jax.Array:
        with qnnx.quant_mode(mode):  # qatjax layers run in `mode`; plain NNX layers ignore it
            logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(model: nnx.Module, data: digits.Data, *, epochs: int, learning_rate: float,
          batch_size: int, seed: int, mode: str = "float") -> float:
    """Adam on every ``nnx.Param`` of ``model`` (kernels, biases and LSQ scales), in place:
    ``epochs`` shuffled passes over the training set (the last partial batch dropped), the
    forward in ``mode`` ("float" or "train"). Returns the last epoch's mean loss (nan for
    no epoch)."""
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    n = len(data.x_train)
    mean_loss = float("nan")
    for _ in range(epochs):
        perm = rng.permutation(n)
        losses = [_train_step(model, optimizer, data.x_train[idx], data.y_train[idx], mode)
                  for idx in np.split(perm[:n - n % batch_size], n // batch_size)]
        mean_loss = float(np.mean(jax.device_get(losses)))
    return mean_loss


@nnx.jit(static_argnames="mode")
def _logits(model: nnx.Module, x: jax.Array, mode: str) -> jax.Array:
    # quant_mode acts at trace time, so it goes inside the jitted function, and `mode` is
    # static: train and infer mode are traced (and cached) separately.
    with qnnx.quant_mode(mode):
        return model(x)


def logits(model: nnx.Module, x: np.ndarray, mode: str) -> np.ndarray:
    """``model(x)`` in ``mode`` (jitted), as a float32 numpy array."""
    return np.asarray(_logits(model, x, mode), np.float32)


# ----------------------------------------------------------------------------- the rows
def float_row(model: DigitsMLP, float_logits: np.ndarray, data: digits.Data) -> digits.Result:
    """The float baseline's row from its test logits (its size: the float32 ``nnx.Param``
    variables)."""
    metrics = digits.evaluate(float_logits, data.y_test)
    size = digits.tree_bytes(nnx.state(model, nnx.Param))
    return digits.Result("float", "float", "float32 baseline", metrics, metrics.accuracy,
                         size, size, None, 0.0)


def run_recipe(float_model: DigitsMLP, name: str, kind: str, config: QatConfig, data: digits.Data,
               settings: digits.Settings, float_logits: np.ndarray) -> digits.Result:
    """One row: quantize a copy of ``float_model``, calibrate it (and for ``"qat"`` fine-tune
    it), evaluate it on the serving path. ``float_model`` is left as it is."""
    start = time.perf_counter()
    model = qnnx.quantize_model(nnx.clone(float_model), config)  # in place, on the copy
    # Calibration also runs for weight-only recipes (nothing to observe): a cheap pass.
    qnnx.calibrate(model, digits.calibration_batches(data, settings))
    if kind == "qat":
        train(model, data, epochs=settings.qat_epochs, learning_rate=settings.qat_lr,
              batch_size=settings.batch_size, seed=settings.seed + 1, mode="train")
    out_train = logits(model, data.x_test, "train")   # fake quantization, float kernels
    exported = qnnx.quantize_model_weights(model)     # what a serving process loads
    qnnx.convert(model)                               # integer codes replace the kernels
    out_infer = logits(model, data.x_test, "infer")   # served from the codes
    float_accuracy = digits.evaluate(float_logits, data.y_test).accuracy
    return digits.Result(
        name=name, kind=kind, description="", config=config,
        metrics=digits.evaluate(out_infer, data.y_test, float_logits),
        float_accuracy=float_accuracy,
        float_bytes=digits.tree_bytes(nnx.state(float_model, nnx.Param)),
        bytes=digits.tree_bytes(exported),
        infer_vs_train=float(np.max(np.abs(out_infer - out_train))),
        seconds=time.perf_counter() - start)


# Accuracy targets (fractions): a row's accuracy may be at most this far below float's.
TOLERANCES = {"W8A8": 0.01, "W4": 0.03}


def check_targets(rows: Sequence[digits.Result]) -> list[tuple[str, bool]]:
    """``(description, met)``: each quantized row within its tolerance of float (W8A8 rows
    1 point, the others 3 points), its integer path equal to train mode, and the int8
    export about 4x smaller than the float parameters."""
    checks = []
    for r in rows[1:]:
        tol = TOLERANCES["W8A8" if "W8A8" in r.name else "W4"]
        text = (f"{r.name}: within {100 * tol:.0f} point(s) of float ({100 * r.delta:+.2f}), "
                f"|infer-train| = {r.infer_vs_train:g}")
        checks.append((text, r.delta >= -tol and r.infer_vs_train == 0.0))
    int8 = [r for r in rows if r.name.startswith("PTQ W8A8")]
    if int8:
        ratio = int8[0].float_bytes / int8[0].bytes
        checks.append((f"int8 export {ratio:.2f}x smaller than the float parameters",
                       3.5 < ratio <= 4.0))
    return checks


def run(quick: bool = False, seed: int = 0) -> list[digits.Result]:
    """Trains the float model, runs every recipe, prints the table; returns its rows."""
    settings = (QUICK if quick else FULL).replace(seed=seed)
    start = time.perf_counter()
    data = digits.load_data(seed=seed)
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images; "
          f"{'quick' if quick else 'full'} run, seed {seed}")

    float_model = DigitsMLP(nnx.Rngs(seed))
    loss = train(float_model, data, epochs=settings.float_epochs, learning_rate=settings.float_lr,
                 batch_size=settings.batch_size, seed=seed)
    float_logits = logits(float_model, data.x_test, "float")
    rows = [float_row(float_model, float_logits, data)]
    print(f"  float: {settings.float_epochs} epochs, last loss {loss:.4f}, "
          f"test accuracy {100 * rows[0].accuracy:.2f}%")
    for name, kind, config in recipes(quick):
        rows.append(run_recipe(float_model, name, kind, config, data, settings, float_logits))
        print(f"  {name}: {rows[-1].seconds:.1f} s")

    print()
    print(digits.format_table(rows))
    print()
    for text, met in check_targets(rows):
        print(f"[{'ok' if met else 'MISSED'}] {text}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[--quick] [--seed N]``; exit status 0, or 1 if a target was missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer epochs, one calibration batch, fewer rows")
    parser.add_argument("--seed", type=int, default=0,
                        help="data split, initialisation and shuffling (default: 0)")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick, seed=args.seed)
    return 0 if all(met for _, met in check_targets(rows)) else 1


if __name__ == "__main__":
    sys.exit(main())
