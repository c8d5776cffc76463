"""Throughput of ``qatjax.fake_quant`` relative to the memory-bound floor.

Each format fake-quantizes the same 32M-element float32 array under ``jax.jit``
and is reported as a ratio to a plain elementwise op (``x * 2 + 1``) on that
array, timed alternately with it in the same run. Both read and write 128 MiB
once, so a ratio near 1 means fake quantization costs no more than the memory
traffic it cannot avoid.

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


def _time(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x).block_until_ready()
    return time.perf_counter() - t0


def _medians(fn, floor, x, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of ``floor``, timed alternately so that load from
    other processes on the machine affects both alike."""
    for _ in range(3):  # compile, then warm caches and the allocator
        fn(x).block_until_ready()
        floor(x).block_until_ready()
    times, floor_times = [], []
    for _ in range(repeats):
        floor_times.append(_time(floor, x))
        times.append(_time(fn, x))
    return statistics.median(times), statistics.median(floor_times)


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

    floor = jax.jit(lambda v: v * 2.0 + 1.0)
    # The parameters are jit arguments (as in training), not constants folded into the kernel.
    fq = jax.jit(lambda v, qp, fmt: qatjax.fake_quant(v, qp, fmt), static_argnums=2)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s), x: {x.shape} float32 ({x.size:,} elements), "
        f"median of {args.repeats}"
    )
    print(f"{'case':<18} {'ms':>7} {'floor ms':>9} {'ratio':>6}")
    for name, (qp, fmt) in cases.items():
        t, t_floor = _medians(lambda v, qp=qp, fmt=fmt: fq(v, qp, fmt), floor, x, args.repeats)
        print(f"{name:<18} {t * 1e3:7.1f} {t_floor * 1e3:9.1f} {t / t_floor:6.2f}")


if __name__ == "__main__":
    main()
