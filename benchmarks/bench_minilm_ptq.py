"""SmoothQuant, GPTQ, AWQ and mixed precision on all-MiniLM-L6-v2 (:mod:`qatjax.flax.ptq`).

The float model, data and metrics are ``benchmarks/bench_minilm_recipes.py``'s: the plain-Flax
BERT of ``examples/minilm.py`` with the pretrained weights, quantized unedited by
``qatjax.flax.quantize_model`` (36 Dense layers; with W8A8 also the attention's two einsums),
calibrated on :data:`minilm.CALIBRATION_SENTENCES` (4 batches of 8) and evaluated on the
other 32 sentences, on the serving path (``qatjax.convert`` + ``mode="infer"``). Figures:
min / mean cosine of each quantized sentence embedding to the float one.

Rows:

* W8A8 static per-tensor (int8 per-channel weights, affine uint8 activations, histogram + mse
  estimator; the einsums too): plain, and after SmoothQuant (fixed ``alpha`` and searched, on
  all Dense layers or on those reading a LayerNorm output: query / key / value, intermediate);
* int4 weight-only, groups of 32 and per channel: round to nearest, AWQ (scales + clip), GPTQ
  (act-order), AWQ then GPTQ;
* mixed precision: per-layer sensitivities (``1 - cos``, each layer alone quantized) of int4
  g32 and int8 weights with static uint8 activations after SmoothQuant (a=0.8, LN-output
  layers); the exact knapsack
  picks a format per layer at <= ``--budget`` bits per weight (format bits; scales not
  counted); the int4 layers then get GPTQ.

``--plot PATH`` draws the per-layer sensitivities and the cosine per method (matplotlib).

Usage::

    python benchmarks/bench_minilm_ptq.py [--only smoothquant,gptq,awq,mixed] [--plot out.png]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence

import flax
import jax
import numpy as np

import qatjax
from qatjax import QatConfig
from qatjax.flax import ptq, quant_mode, quantize_model

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "examples"))
import bench_minilm_recipes as recipes  # noqa: E402
import minilm  # noqa: E402

W8A8 = QatConfig(weight_format="int8", activation_format="uint8", activation_symmetric=False,
                 weight_granularity="per_channel", activation_observer="histogram",
                 activation_estimator="mse")
W4_G32 = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_group",
                   weight_group_size=32)
W4_PC = W4_G32.replace(weight_granularity="per_channel", weight_group_size=None)
GROUPS = ("smoothquant", "gptq", "awq", "mixed")


class Runner:
    """The float model and data; ``evaluate`` serves a quantized model and scores it."""

    def __init__(self) -> None:
        self.model, params, tok = minilm.load_minilm()
        self.params = jax.tree_util.tree_map(np.asarray, params)
        cal = tok(minilm.CALIBRATION_SENTENCES)
        self.calib = [(cal["input_ids"][i:i + 8], cal["attention_mask"][i:i + 8])
                      for i in range(0, len(minilm.CALIBRATION_SENTENCES), 8)]
        ev = tok(minilm.EVALUATION_SENTENCES)
        self.eval = (ev["input_ids"], ev["attention_mask"])
        self.float_emb = np.asarray(jax.jit(self.model.apply)({"params": self.params}, *self.eval))
        self.rows: list[tuple[str, float, float, float]] = []

    def evaluate(self, name: str, qmodel, variables, seconds: float) -> None:
        served = qatjax.convert(variables)

        @jax.jit
        def infer(v, ids, mask):
            with quant_mode("infer"):
                return qmodel.apply(v, ids, mask)

        emb = np.asarray(infer(served, *self.eval))
        min_cos, mean_cos, _, _ = recipes.compare(emb, self.float_emb)
        self.rows.append((name, min_cos, mean_cos, seconds))
        print(f"{name:<52} min cos {min_cos:.5f}  mean cos {mean_cos:.5f}  ({seconds:.1f} s)",
              flush=True)

    def start(self, config: QatConfig, rules=()):
        return quantize_model(self.model, config, rules=rules), {"params": self.params}


# The layers that read a LayerNorm output (BERT's outlier feature dimensions live there).
LN_INPUTS = r"layer_\d+/(attention/(query|key|value)|intermediate)"


def run_smoothquant(r: Runner) -> None:
    for name, alpha, layers in (("W8A8 static per-tensor", None, ""),
                                ("+ SmoothQuant a=0.5, all layers", 0.5, ".*"),
                                ("+ SmoothQuant a=0.8, all layers", 0.8, ".*"),
                                ("+ SmoothQuant a=0.8, LN-output layers", 0.8, LN_INPUTS),
                                ("+ SmoothQuant searched a, LN-output layers", "search", LN_INPUTS)):
        t0 = time.perf_counter()
        qm, v = r.start(W8A8)
        if alpha is not None:
            v = ptq.smoothquant(qm, v, r.calib, alpha=None if alpha == "search" else alpha,
                                layers=layers)
        v = qatjax.calibrate(qm, v, r.calib)
        r.evaluate(name, qm, v, time.perf_counter() - t0)


def run_weight_only(r: Runner, which: str) -> None:
    for label, cfg in (("int4 g32", W4_G32), ("int4 per-channel", W4_PC)):
        methods = (("RTN", ()), ("GPTQ", ("gptq",)), ("AWQ", ("awq",)), ("AWQ+GPTQ", ("awq", "gptq")))
        for mname, steps in methods:
            if which not in steps and steps:
                continue
            t0 = time.perf_counter()
            qm, v = r.start(cfg)
            if "awq" in steps:
                v = ptq.awq(qm, v, r.calib)
            v = qatjax.finalize(qm, v, r.calib[0])
            if "gptq" in steps:
                v = ptq.gptq(qm, v, r.calib, act_order=True)
            r.evaluate(f"{label} weight-only {mname}", qm, v, time.perf_counter() - t0)


def run_mixed(r: Runner, budget: float, plot_data: dict) -> None:
    t0 = time.perf_counter()
    w8 = W8A8
    w4 = W8A8.replace(weight_format="int4", weight_granularity="per_group", weight_group_size=32)
    # Sensitivities on the SmoothQuant'ed model (its factors do not depend on the weight format).
    qm8 = quantize_model(r.model, w8)
    smoothed = ptq.smoothquant(qm8, {"params": r.params}, r.calib, alpha=0.8, layers=LN_INPUTS)
    table = {}
    for name, cfg in (("int8", w8), ("int4_g32", w4)):
        qm = quantize_model(r.model, cfg)
        v = qatjax.calibrate(qm, smoothed, r.calib)
        table[name] = ptq.layer_sensitivity(qm, v, r.calib[0])
    sizes = {i.path: i.in_features * i.out_features
             for i in ptq.input_groups(qm8, smoothed, r.calib[0])}
    errors = {n: {s.path: s.model_error for s in rows} for n, rows in table.items()}
    plan = ptq.search_mixed_precision(errors, sizes, {"int8": w8, "int4_g32": w4},
                                      budget_bits=budget)
    plot_data["sensitivity"] = table
    n4 = sum(1 for _, c in plan.assignment if c == "int4_g32")
    print(f"mixed precision plan: {plan.avg_bits:.3f} bits/weight, {n4} of {len(plan.assignment)} "
          f"layers int4 g32, objective {plan.objective:.3g}", flush=True)
    qm = quantize_model(r.model, w8, rules=plan.rules())
    v = qatjax.calibrate(qm, smoothed, r.calib)
    r.evaluate(f"mixed {plan.avg_bits:.2f} b/w, SmoothQuant, RTN", qm, v, time.perf_counter() - t0)
    v = ptq.gptq(qm, v, r.calib, act_order=True,
                 layers="|".join(p for p, c in plan.rules_by_name() if c == "int4_g32"))
    r.evaluate(f"mixed {plan.avg_bits:.2f} b/w, SmoothQuant, GPTQ(int4)", qm, v,
               time.perf_counter() - t0)


def plot(path: str, r: Runner, plot_data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    for name, rows in plot_data.get("sensitivity", {}).items():
        ax.semilogy([s.model_error for s in rows], marker="o", label=name)
        labels = [s.path.replace("layer_", "L").replace("attention/", "") for s in rows]
    if plot_data.get("sensitivity"):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("mean (1 - cos) of the embedding, only this layer quantized")
    ax.set_title("per-layer sensitivity (W8A8 static, after SmoothQuant)")
    ax.legend()
    ax = axes[1]
    names = [n for n, *_ in r.rows]
    ax.barh(range(len(names)), [1 - m for _, m, _, _ in r.rows], log=True)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("1 - min cosine to float (lower is better)")
    ax.set_title("all-MiniLM-L6-v2, 32 held-out sentences")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated of {GROUPS}")
    parser.add_argument("--budget", type=float, default=5.0, help="mixed precision bits per weight")
    parser.add_argument("--plot", default="", help="write the plot to this PNG path")
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    if set(wanted) - set(GROUPS):
        parser.error(f"--only: choose from {GROUPS}")
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, flax {flax.__version__}, backend {jax.default_backend()} "
          f"({dev.device_kind}), {os.cpu_count()} CPUs, {platform.machine()}, "
          f"python {platform.python_version()}", flush=True)
    t_start = time.perf_counter()
    r = Runner()
    plot_data: dict = {}
    if "smoothquant" in wanted:
        run_smoothquant(r)
    if "gptq" in wanted or "awq" in wanted:
        seen = set()
        for which in ("gptq", "awq"):
            if which in wanted:
                before = len(r.rows)
                run_weight_only(r, which)
                # RTN rows are produced by both passes: keep one
                r.rows[before:] = [row for row in r.rows[before:] if row[0] not in seen]
                seen.update(row[0] for row in r.rows)
    if "mixed" in wanted:
        run_mixed(r, args.budget, plot_data)
    print()
    print(f"{'method':<52} {'min cos':>8} {'mean cos':>8} {'s':>6}")
    for name, mn, mean, s in r.rows:
        print(f"{name:<52} {mn:8.5f} {mean:8.5f} {s:6.1f}")
    if args.plot:
        plot(args.plot, r, plot_data)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
