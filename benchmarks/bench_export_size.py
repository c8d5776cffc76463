"""Export sizes: the StableHLO artifact and its safetensors weights against the float model.

The model is ``examples/minilm.py``'s Flax BERT with MiniLM-L6's shapes (6 layers, hidden
384, 22.7M parameters, of which 11.7M in the word embeddings), initialised at random (sizes
do not depend on the values; the pretrained weights are not needed), quantized unedited with
``qatjax.flax.quantize_model`` and calibrated on random token ids. For each recipe:

* ``artifact``: :func:`qatjax.export.export_stablehlo` with the weights as inputs (the
  serialized program only), symbolic batch and sequence length;
* ``safetensors``: its weights file;
* ``ideal``: the payload with nothing else: quantized kernels at their nominal bits (1 byte per
  int8 weight, 0.5 per int4), their scales (float32) and zero points (none when symmetric),
  the calibrated input scales, and every other parameter at its own size (embeddings,
  LayerNorms and biases in float32);
* ``over ideal``: ``(artifact + safetensors) / ideal - 1`` (target: at most 5% for int8).

Float rows: every parameter in float32 and in bfloat16. The exported int8 artifact is also
run once to check it serves the same embeddings as infer mode.

Usage::

    python benchmarks/bench_export_size.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import qatjax
from qatjax import export
from qatjax.flax import quant_mode, quantize_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import minilm  # noqa: E402

RECIPES = {
    "int8 W8A8 (static, per channel)": qatjax.QatConfig(),
    "int4 weight-only (groups of 32)": qatjax.QatConfig(
        weight_format="int4", weight_granularity="per_group", weight_group_size=32,
        activation_format=None),
}


def _nbytes(tree) -> int:
    return sum(int(np.asarray(a).nbytes) for a in jax.tree_util.tree_leaves(tree))


def ideal_bytes(flat: export._Flattened) -> int:
    """The payload: codes at their nominal bits, every other tensor as stored."""
    total = 0
    for name, value in flat.tensors.items():
        layer = name.split("/")[1:-1]
        recipe = flat.layers.get("/".join(layer))
        if name.endswith("/kernel_codes") and recipe is not None:
            bits = qatjax.format_from_name(recipe["weight_format"]).bits
            total += int(np.prod(recipe["codes_shape"])) * bits // 8
        else:
            total += value.nbytes
    return total


def main() -> None:
    model = minilm.MiniLM()
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (4, 32)).astype(np.int32)
    mask = np.ones_like(ids)
    params = jax.jit(model.init)(jax.random.key(0), ids, mask)["params"]
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
    f32 = _nbytes(params)
    print(f"MiniLM-L6 shapes, {n_params / 1e6:.1f}M parameters; {jax.devices()[0].device_kind}")
    print(f"{'model':34s} {'artifact':>10s} {'safetensors':>12s} {'total':>12s} {'ideal':>12s} "
          f"{'over ideal':>10s} {'vs f32':>7s} {'export s':>8s}")
    print(f"{'float32':34s} {'':>10s} {'':>12s} {f32:>12,d} {'':>12s} {'':>10s} {1:>7.3f}")
    print(f"{'bfloat16':34s} {'':>10s} {'':>12s} {f32 // 2:>12,d} {'':>12s} {'':>10s} "
          f"{0.5:>7.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in RECIPES.items():
            qmodel = quantize_model(model, config)
            variables = qatjax.calibrate(qmodel, {"params": params}, [(ids, mask)])
            start = time.perf_counter()
            artifact = export.export_stablehlo(qmodel, (ids, mask), variables=variables,
                                               polymorphic_shapes="b, s")
            seconds = time.perf_counter() - start
            path = os.path.join(tmp, f"{len(os.listdir(tmp))}.jaxexport")
            art_path, weights_path = artifact.save(path)
            art, weights = os.path.getsize(art_path), os.path.getsize(weights_path)
            ideal = ideal_bytes(export.flatten_served(variables))
            print(f"{name:34s} {art:>10,d} {weights:>12,d} {art + weights:>12,d} {ideal:>12,d} "
                  f"{100 * ((art + weights) / ideal - 1):>9.2f}% {(art + weights) / f32:>7.3f} "
                  f"{seconds:>8.1f}")
            with quant_mode("infer"):
                expected = jax.jit(qmodel.apply)(qatjax.convert(variables), ids[:2, :20],
                                                 mask[:2, :20])
            got = artifact(jnp.asarray(ids[:2, :20]), jnp.asarray(mask[:2, :20]))
            assert np.array_equal(np.asarray(got), np.asarray(expected)), name


if __name__ == "__main__":
    main()
