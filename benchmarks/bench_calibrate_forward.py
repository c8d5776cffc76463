"""Cost of one calibrate-mode forward against the float forward of the same BERT.

The model is ``examples/minilm.py``'s Flax BERT with all-MiniLM-L6-v2's shapes (random
weights: the cost does not depend on them), quantized unedited by
``qatjax.flax.quantize_model`` (36 Dense layers and the attention's two einsums, int8
per-channel weights, static uint8 activations). Each row times one jitted call on the same
batch of token ids:

* ``float``: the float model, ``model.apply``;
* ``quantized, float mode``: the quantized model in float mode (the same graph as calibrate
  mode without its observers);
* ``calibrate histogram``: the quantized model in calibrate mode with the histogram observer
  (2048 bins, the default of the mse / percentile / entropy estimators), returning the
  float output and the updated ``quant_stats``;
* ``calibrate minmax``: the same with the min / max observer.

Layers that read the same tensor (query / key / value) observe it once
(:func:`qatjax.quantizers.sharing_observations`, opened by ``quant_mode("calibrate")``);
``--no-sharing`` times the calibrate rows without it, every layer observing its own input.

Figures are the minimum over ``--repeats`` calls after a warm-up call, in wall and in process
CPU time (both cores' work; steadier on a shared machine), each as a ratio to the float row of
the same run.

Usage::

    python benchmarks/bench_calibrate_forward.py [--batch 16] [--seq 128] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import qatjax
from qatjax import QatConfig
from qatjax.flax import quant_mode, quantize_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import minilm  # noqa: E402

W8A8 = QatConfig(weight_format="int8", activation_format="uint8", activation_symmetric=False,
                 weight_granularity="per_channel", activation_observer="histogram",
                 activation_estimator="mse")


def timeit(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, float]]:
    """``{name: (min wall s, min process-CPU s)}`` of each ``fn()`` over ``repeats`` rounds
    after a warm-up call; the rounds interleave the functions, so that a change in the
    machine's load reaches all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: (min(wall[name]), min(cpu[name])) for name in fns}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sentences per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sentence")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-sharing", action="store_true",
                        help="also time calibrate with every layer observing its own input")
    args = parser.parse_args(argv)

    config = minilm.MiniLMConfig()
    model = minilm.MiniLM(config)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones_like(ids)
    params = jax.jit(model.init)(jax.random.key(0), ids[:1], mask[:1])["params"]

    float_fn = jax.jit(model.apply)
    fns = {"float": lambda: float_fn({"params": params}, ids, mask)}
    # The quantized model in float mode: the same graph without observers (quantize_model's
    # interception computes the attention einsums in its own layout).
    qfloat = quantize_model(model, W8A8)

    def float_mode(v, *args):
        with quant_mode("float"):
            return qfloat.apply(v, *args)

    qfloat_fn = jax.jit(float_mode)
    fns["quantized, float mode"] = lambda: qfloat_fn({"params": params}, ids, mask)
    for name, cfg in (("calibrate histogram", W8A8),
                      ("calibrate minmax", W8A8.replace(activation_observer="minmax",
                                                        activation_estimator="minmax"))):
        qmodel = quantize_model(model, cfg)
        variables = qatjax.calibrate(qmodel, {"params": params}, [(ids[:2], mask[:2])])
        variables.pop("quant_params", None)

        def calibrate(v, *args, qmodel=qmodel):
            with quant_mode("calibrate"):
                return qmodel.apply(v, *args, mutable=["quant_stats"])

        fn = jax.jit(calibrate)
        fns[name] = lambda fn=fn, v=variables: fn(v, ids, mask)
        if args.no_sharing:  # an empty record of shared observations, while tracing
            unshared = jax.jit(lambda v, *a, calibrate=calibrate: calibrate(v, *a))
            with mock.patch.object(qatjax.quantizers, "_SHARED_MAX", 0):
                jax.block_until_ready(unshared(variables, ids, mask))
            fns[name + ", unshared"] = lambda fn=unshared, v=variables: fn(v, ids, mask)
    times = timeit(fns, args.repeats)

    print(f"jax {jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; MiniLM-L6 shapes, batch "
          f"{args.batch} x {args.seq} tokens, {args.repeats} repeats (minimum)")
    fw, fc = times["float"]
    print(f"{'variant':<22} {'wall ms':>8} {'vs float':>8} {'CPU ms':>8} {'vs float':>8}")
    for name, (w, c) in times.items():
        print(f"{name:<22} {1e3 * w:8.2f} {w / fw:7.2f}x {1e3 * c:8.2f} {c / fc:7.2f}x")


if __name__ == "__main__":
    main()
