"""GPU benchmark for the device tool: low-precision GEMMs, fp8 training, int8 inference.

One short script (under 4 minutes on an H100/H200) printing, all measured in the same run:

1. GEMM throughput (TFLOP/s or TOP/s) at 4096 and 8192 for bf16, int8 x int8 -> int32
   with the weight stored [N, K] (both operands contract their last axis, the layout
   qatjax serves) and [K, N], and fp8 e4m3 x e4m3 -> float32 [N, K]; ratios to bf16.
2. A train step (forward, loss, grad, Adam) of a stack of two MLP blocks
   (D -> 4D -> D, residual; D=4096, 16k tokens, bf16 compute) with ``nn.Dense`` (bf16),
   qatjax's fp8 recipe (``fp8_scaling="delayed"`` and ``"current"``), and Flax's own
   ``Fp8DirectDotGeneralOp``; ratios to bf16.
3. int8 inference of that stack (``qatjax.convert`` + ``mode="infer"``) against the
   bf16 forward.
4. Whether the compiled HLO calls cuBLASLt's fp8 / int8 GEMMs (custom-call targets).

Usage: ``python benchmarks/bench_gpu.py [--small]`` (``--small``: tiny shapes, for a
CPU smoke run). Writes ``$OUT/bench_gpu.json`` when ``$OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qat_step import MLPStack  # noqa: E402  (the same model as the CPU benchmark)

import qatjax  # noqa: E402
from qatjax.config import QatConfig  # noqa: E402
from qatjax.flax import QatDense  # noqa: E402


def _time(fn, *args, iters: int = 10, warmup: int = 2) -> float:
    """Median seconds per call of an already-jitted ``fn``."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemms(sizes):
    rows = []
    for n in sizes:
        k = jax.random.split(jax.random.key(n), 2)
        a = jax.random.normal(k[0], (n, n), jnp.bfloat16)
        b = jax.random.normal(k[1], (n, n), jnp.bfloat16)
        a8 = jax.random.randint(k[0], (n, n), -127, 128, jnp.int8)
        b8 = jax.random.randint(k[1], (n, n), -127, 128, jnp.int8)
        f8a, f8b = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
        nk = (((1,), (1,)), ((), ()))  # weight [N, K]
        kn = (((1,), (0,)), ((), ()))  # weight [K, N]
        cases = {
            "bf16": (jax.jit(lambda a, b: a @ b), a, b),
            "int8 [N,K]": (jax.jit(lambda a, b: jax.lax.dot_general(
                a, b, nk, preferred_element_type=jnp.int32)), a8, b8),
            "int8 [K,N]": (jax.jit(lambda a, b: jax.lax.dot_general(
                a, b, kn, preferred_element_type=jnp.int32)), a8, b8),
            "fp8 e4m3 [N,K]": (jax.jit(lambda a, b: jax.lax.dot_general(
                a, b, nk, preferred_element_type=jnp.float32)), f8a, f8b),
        }
        base = None
        for name, (fn, x, y) in cases.items():
            t = _time(fn, x, y)
            tflops = 2 * n**3 / t / 1e12
            base = base or tflops
            rows.append({"n": n, "op": name, "tflops": tflops, "ratio_to_bf16": tflops / base})
            print(f"GEMM n={n:5d} {name:15s} {tflops:8.1f} TFLOP/s  {tflops / base:5.2f}x bf16", flush=True)
    return rows


def _flax_fp8_dense(features, name):
    return nn.Dense(features, name=name, dtype=jnp.bfloat16, dot_general_cls=nn.Fp8DirectDotGeneralOp)


def train_steps(tokens, dim):
    x = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.bfloat16)
    y = jax.random.normal(jax.random.key(1), (tokens, dim), jnp.bfloat16)
    tx = optax.adam(1e-4)
    fp8 = dict(weight_format="fp8_e4m3", activation_format="fp8_e4m3", weight_granularity="per_tensor")
    variants = {
        "bf16 nn.Dense": (lambda f, name: nn.Dense(f, name=name, dtype=jnp.bfloat16), ()),
        "qatjax fp8 delayed": (lambda f, name: QatDense(f, name=name, dtype=jnp.bfloat16, config=QatConfig(
            fp8_scaling="delayed", **fp8)), (("mode", "train"),)),
        "qatjax fp8 current": (lambda f, name: QatDense(f, name=name, dtype=jnp.bfloat16, config=QatConfig(
            fp8_scaling="current", **fp8)), (("mode", "train"),)),
        "flax Fp8DirectDotGeneralOp": (_flax_fp8_dense, ()),
    }
    rows, base, hlos = [], None, {}
    for name, (dense, call_kwargs) in variants.items():
        model = MLPStack(dim=dim, dense=dense, call_kwargs=call_kwargs)
        v = model.init(jax.random.key(2), x)
        params = v["params"]
        state = {k: c for k, c in v.items() if k != "params"}
        owg = "_overwrite_with_gradient"

        def loss_fn(trainable, state, model=model):
            out, upd = model.apply({**trainable, **state}, x, mutable=list(state))
            return jnp.mean((out.astype(jnp.float32) - y.astype(jnp.float32)) ** 2), upd

        @jax.jit
        def step(params, opt_state, state, loss_fn=loss_fn):
            # Flax's fp8 ops keep their scales in a collection whose "gradient" is the new value.
            trainable = {"params": params, **({owg: state[owg]} if owg in state else {})}
            rest = {k: c for k, c in state.items() if k != owg}
            (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, rest)
            updates, opt_state = tx.update(grads["params"], opt_state, params)
            new_state = {**rest, **upd}
            if owg in grads:
                new_state[owg] = grads[owg]
            return optax.apply_updates(params, updates), opt_state, new_state, loss

        opt_state = tx.init(params)
        hlos[name] = step.lower(params, opt_state, state).compile().as_text()
        t = _time(step, params, opt_state, state, iters=8)
        base = base or t
        rows.append({"variant": name, "ms": t * 1e3, "ratio_to_bf16": t / base})
        print(f"train step {name:28s} {t * 1e3:8.2f} ms  {t / base:5.2f}x bf16", flush=True)
    return rows, hlos


def int8_inference(tokens, dim):
    x = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.bfloat16)
    float_model = MLPStack(dim=dim, dense=lambda f, name: nn.Dense(f, name=name, dtype=jnp.bfloat16))
    cfg = QatConfig(activation_observer="minmax", activation_estimator="minmax")
    q_model = MLPStack(dim=dim, dense=lambda f, name: QatDense(f, name=name, dtype=jnp.bfloat16, config=cfg),
                       call_kwargs=(("mode", "infer"),))
    v = q_model.init(jax.random.key(2), x)
    f_fwd = jax.jit(lambda p, x: float_model.apply({"params": p}, x))
    t_f = _time(f_fwd, v["params"], x)
    served = qatjax.convert(qatjax.calibrate(q_model, v, [x]))
    q_fwd = jax.jit(lambda v, x: q_model.apply(v, x))
    t_q = _time(q_fwd, served, x)
    print(f"inference bf16 {t_f * 1e3:.2f} ms, int8 {t_q * 1e3:.2f} ms: int8 {t_f / t_q:.2f}x faster", flush=True)
    hlo = q_fwd.lower(served, x).compile().as_text()
    return {"bf16_ms": t_f * 1e3, "int8_ms": t_q * 1e3, "speedup": t_f / t_q}, hlo


def gemm_calls(hlo: str) -> list[str]:
    """custom-call targets of GEMMs in compiled HLO (cuBLAS / cuBLASLt on GPU)."""
    return sorted(set(re.findall(r'custom_call_target="(__cublas[^"]*)"', hlo)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    args = p.parse_args()
    sizes, tokens, dim = ((256,), 256, 128) if args.small else ((4096, 8192), 16384, 4096)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    t0 = time.time()
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    result["gemm"] = gemms(sizes)
    result["train"], hlos = train_steps(tokens, dim)
    result["infer"], infer_hlo = int8_inference(tokens, dim)
    result["cublas_calls"] = {
        "qatjax fp8 train": gemm_calls(hlos["qatjax fp8 delayed"]),
        "int8 inference": gemm_calls(infer_hlo),
    }
    for k, v in result["cublas_calls"].items():
        print(f"GEMM custom calls in {k}: {v or 'none (not a GPU, or XLA did not rewrite to cuBLAS)'}")
    print(f"total {time.time() - t0:.0f} s")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_gpu.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
