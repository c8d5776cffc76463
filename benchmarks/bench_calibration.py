"""Calibration benchmarks: histogram observer, entropy search, per-channel histograms.

Run:  python benchmarks/bench_calibration.py [--repeats N] [--skip-reference]

Ratios are measured in the same run, on the same data and device:

1. one histogram update (2048 bins, |x| and signed) of 16M float32 values against
   ``jnp.max(jnp.abs(x))``; target: at most 3x;
2. the entropy (KL) search over 2048 bins under ``jit`` after compilation against a
   numpy reference loop of the same algorithm (NVIDIA's ``_compute_amax_entropy``
   structure); targets: at least 50x faster and under 20 ms;
3. per-channel histograms of a 4096 x 4096 weight in one jitted call, with
   ``keep_axes`` and with ``vmap`` of the per-tensor observer, against the
   per-channel ``max|w|``.

Times are the minimum (and median) over ``--repeats`` runs after a warm-up call,
so a busy shared machine inflates the medians more than the minima.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

import qatjax
from qatjax import calibration as cal


def timeit(fn, *args, repeats: int) -> tuple[float, float]:
    """(min, median) wall seconds of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def reference_entropy_search(counts: np.ndarray, num_bits: int = 8, start_bin: int = 128) -> int:
    """The TensorRT KL search as NVIDIA writes it: a Python loop over thresholds (float64)."""
    from scipy.stats import entropy

    bins = counts.astype(np.int64).copy()
    bins[0] = bins[1]
    nq = 1 << (num_bits - 1)
    divergences = []
    for i in range(start_bin, len(bins) + 1):
        levels = np.digitize(range(i), np.linspace(0, i, num=nq + 1)) - 1
        levels[bins[:i] == 0] = -1
        mass = np.zeros(nq)
        for j, lev in enumerate(levels):
            if lev != -1:
                mass[lev] += bins[j]
        for lev, cnt in Counter(levels).items():
            if lev != -1:
                mass[lev] /= cnt
        q = np.zeros(i)
        for j, lev in enumerate(levels):
            if lev != -1:
                q[j] = mass[lev]
        p = np.array(bins[:i], dtype=np.float64)
        p[-1] += bins[i:].sum()
        divergences.append(entropy(p, q))
    divergences = np.nan_to_num(np.array(divergences), nan=np.inf)
    return start_bin + len(divergences) - 1 - int(np.argmin(divergences[::-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow numpy loop")
    args = parser.parse_args()
    r = args.repeats
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
          f"{platform.machine()}")

    # 1. histogram update vs max|x| ------------------------------------------------------
    x = jnp.asarray(rng.standard_normal(16 * 2**20).astype(np.float32))
    amax = jax.jit(lambda x: jnp.max(jnp.abs(x)))
    t_amax = timeit(amax, x, repeats=r)
    print(f"\n[1] 16M float32 values; jnp.max(jnp.abs(x)): {t_amax[0]*1e3:.2f} ms (median {t_amax[1]*1e3:.2f})")
    for signed in (False, True):
        obs = cal.histogram(2048, signed=signed)
        update = jax.jit(obs.update)
        warm = update(obs.init(), x)  # steady state: the range no longer grows
        t = timeit(update, warm, x, repeats=r)
        t0 = timeit(update, obs.init(), x, repeats=max(3, r // 4))
        name = "signed" if signed else "|x|"
        print(f"    histogram update ({name:6s}): {t[0]*1e3:7.2f} ms (median {t[1]*1e3:.2f}) "
              f"ratio {t[0]/t_amax[0]:.1f}x (target <= 3x); first batch {t0[0]*1e3:.2f} ms")

    # 2. entropy search ------------------------------------------------------------------
    obs = cal.histogram(2048)
    state = jax.jit(obs.update)(obs.init(), jnp.asarray(rng.laplace(size=2**20).astype(np.float32)))
    kl = jax.jit(lambda c: cal.entropy_kl(c, qatjax.int8))
    t_kl = timeit(kl, state.counts, repeats=r)
    est = jax.jit(lambda s: cal.estimate(s, qatjax.int8, "entropy"))
    t_est = timeit(est, state, repeats=r)
    print(f"\n[2] entropy search, 2048 bins, 1921 thresholds: KL curve {t_kl[0]*1e3:.2f} ms "
          f"(median {t_kl[1]*1e3:.2f}); full estimate {t_est[0]*1e3:.2f} ms (median {t_est[1]*1e3:.2f}); "
          f"target < 20 ms")
    if not args.skip_reference:
        counts = np.asarray(state.counts)
        t0 = time.perf_counter()
        i_ref = reference_entropy_search(counts)
        t_ref = time.perf_counter() - t0
        curve = np.asarray(kl(state.counts))
        i_ours = 128 + len(curve) - 1 - int(np.argmin(curve[::-1]))
        print(f"    numpy reference loop: {t_ref*1e3:.0f} ms; speed-up {t_ref/t_kl[0]:.0f}x (target >= 50x); "
              f"threshold bin ours {i_ours}, reference {i_ref}")

    # 3. per-channel histograms of a 4096 x 4096 weight ------------------------------------
    w = jnp.asarray(rng.standard_normal((4096, 4096)).astype(np.float32))
    per_channel_amax = jax.jit(lambda w: jnp.max(jnp.abs(w), axis=1))
    t_pc_amax = timeit(per_channel_amax, w, repeats=max(3, r // 4))
    pc = cal.histogram(2048, keep_axes=0)
    keep = jax.jit(lambda w: pc.update(pc.init(w), w))
    t_keep = timeit(keep, w, repeats=max(3, r // 4))
    per_tensor = cal.histogram(2048)
    vm = jax.jit(lambda w: jax.vmap(per_tensor.update)(jax.vmap(per_tensor.init)(w), w))
    t_vm = timeit(vm, w, repeats=max(3, r // 4))
    print("\n[3] 4096 x 4096 weight, one histogram per row, one jitted call:")
    print(f"    per-channel max|w|: {t_pc_amax[0]*1e3:.1f} ms")
    print(f"    keep_axes=0: {t_keep[0]*1e3:.1f} ms (ratio {t_keep[0]/t_pc_amax[0]:.1f}x); "
          f"vmap of per-tensor: {t_vm[0]*1e3:.1f} ms (ratio {t_vm[0]/t_pc_amax[0]:.1f}x)")


if __name__ == "__main__":
    main()
