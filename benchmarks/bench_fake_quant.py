"""Throughput of ``qatjax.fake_quant`` relative to the memory-bound floor.

Each format fake-quantizes the same 32M-element float32 array under ``jax.jit``
and is reported as a ratio to a plain elementwise op (``x * 2 + 1``) on that
array, timed alternately with it in the same run. Both read and write 128 MiB
once, so a ratio near 1 means fake quantization costs no more than the memory
traffic it cannot avoid.

Block formats (MXFP8, MXFP4, MXINT8, NVFP4, blocks along the last axis) compute their
block scales from the array in the same call, as training does: one more read of the
array (NVFP4: two, its per-tensor amax first). Target: within 2.5x of the elementwise op.

Usage::

    python benchmarks/bench_fake_quant.py [--size 33554432] [--repeats 11]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import qatjax


def _time(fn, x) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all of XLA's threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(x).block_until_ready()
    return time.perf_counter() - wall, time.process_time() - cpu


def _ratios(fn, floor, x, repeats: int) -> tuple[float, float, float]:
    """Median wall ms of ``fn``, and its wall and CPU-time ratios to ``floor``.

    The two are timed alternately so that load from other processes affects both
    alike; CPU time is the steadier figure on a shared machine (it leaves out the
    time the process waits for a core).
    """
    for _ in range(3):  # compile, then warm caches and the allocator
        fn(x).block_until_ready()
        floor(x).block_until_ready()
    samples, floor_samples = [], []
    for _ in range(repeats):
        floor_samples.append(_time(floor, x))
        samples.append(_time(fn, x))
    wall, cpu = (statistics.median(s) for s in zip(*samples))
    floor_wall, floor_cpu = (statistics.median(s) for s in zip(*floor_samples))
    return wall * 1e3, wall / floor_wall, cpu / floor_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32 * 1024 * 1024, help="number of elements")
    parser.add_argument("--channels", type=int, default=4096, help="channels for per-channel int8")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()

    rows = args.size // args.channels
    x = jax.random.normal(jax.random.key(0), (rows, args.channels), jnp.float32) * 3.0
    amax = jnp.max(jnp.abs(x))
    ch_amax = jnp.max(jnp.abs(x), axis=0, keepdims=True)
    cases = {
        "int8 per-tensor": (qatjax.qparams_from_amax(amax, qatjax.int8), qatjax.int8),
        "int8 per-channel": (qatjax.qparams_from_amax(ch_amax, qatjax.int8), qatjax.int8),
        "uint8 affine": (
            qatjax.qparams_from_minmax(jnp.min(x), jnp.max(x), qatjax.uint8, symmetric=False),
            qatjax.uint8,
        ),
        "int4 per-tensor": (qatjax.qparams_from_amax(amax, qatjax.int4), qatjax.int4),
        "fp8 e4m3": (qatjax.qparams_from_amax(amax, qatjax.fp8_e4m3), qatjax.fp8_e4m3),
        "fp8 e5m2": (qatjax.qparams_from_amax(amax, qatjax.fp8_e5m2), qatjax.fp8_e5m2),
    }

    for fmt in (qatjax.mxfp8_e4m3, qatjax.mxfp4, qatjax.mxint8, qatjax.nvfp4):
        cases[fmt.name] = (None, fmt)  # block scales computed from x inside the call

    floor = jax.jit(lambda v: v * 2.0 + 1.0)
    # The parameters are jit arguments (as in training), not constants folded into the kernel.
    fq = jax.jit(lambda v, qp, fmt: (qatjax.block_fake_quant(v, fmt) if fmt.is_block
                                     else qatjax.fake_quant(v, qp, fmt)), static_argnums=2)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s), x: {x.shape} float32 ({x.size:,} elements), "
        f"median of {args.repeats}"
    )
    print(f"{'case':<18} {'ms':>7} {'wall ratio':>11} {'cpu ratio':>10}")
    for name, (qp, fmt) in cases.items():
        ms, wall, cpu = _ratios(lambda v, qp=qp, fmt=fmt: fq(v, qp, fmt), floor, x, args.repeats)
        print(f"{name:<18} {ms:7.1f} {wall:11.2f} {cpu:10.2f}")


if __name__ == "__main__":
    main()
