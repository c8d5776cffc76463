"""Independent numpy references for the calibration tests (float64, literal loops)."""

from __future__ import annotations

import math
from collections import Counter

import ml_dtypes
import numpy as np
from scipy.stats import entropy as scipy_entropy

FP8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


# ----------------------------------------------------------------------------- histogram


def ref_exponent(values: np.ndarray) -> int:
    """Smallest k with max|finite values| <= 2**k, clamped to [-100, 128]."""
    a = np.abs(np.asarray(values, np.float64))
    a = a[np.isfinite(a)]
    m = float(a.max()) if a.size else 0.0
    if m <= 2.0**-100:
        return -100
    k = math.frexp(m)[1]  # m = f * 2**k, f in [0.5, 1)
    if m == 2.0 ** (k - 1):
        k -= 1
    return min(k, 128)


def ref_abs_counts(values: np.ndarray, num_bins: int, exponent: int) -> np.ndarray:
    """Right-closed |x| bins over [0, 2**exponent]: bin 0 = [0, w], bin k = (k w, (k+1) w]."""
    a = np.abs(np.asarray(values, np.float64))
    a = a[np.isfinite(a)]
    w = 2.0**exponent / num_bins
    k = np.maximum(np.ceil(a / w) - 1, 0).astype(np.int64)
    assert k.size == 0 or k.max() < num_bins
    return np.bincount(k, minlength=num_bins).astype(np.int64)


def ref_signed_counts(values: np.ndarray, num_bins: int, exponent: int) -> np.ndarray:
    """Signed layout: x >= 0 -> n + k, x < 0 -> n - 1 - k, n = num_bins // 2; subnormals
    (|x| < 2**-126) count as zero."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    x = np.where(np.abs(x) < np.finfo(np.float32).tiny, 0.0, x)
    n = num_bins // 2
    w = 2.0**exponent / n
    k = np.maximum(np.ceil(np.abs(x) / w) - 1, 0).astype(np.int64)
    idx = np.where(x >= 0, n + k, n - 1 - k)
    return np.bincount(idx, minlength=num_bins).astype(np.int64)


# ----------------------------------------------------------------------------- entropy


def nvidia_levels(i: int, nq: int) -> np.ndarray:
    """Level of each of the first i bins: digitize(j, linspace(0, i, nq + 1)) - 1."""
    space = np.linspace(0, i, num=nq + 1)
    return np.digitize(range(i), space) - 1


def fp8_levels(i: int, fmax: float, variant: str) -> np.ndarray:
    """fp8 code that each bin center v = (2j + 1) * fmax / (2i) rounds to (nearest, ties to
    the even code), decided exactly: v > m  <=>  (2j + 1) * fmax > 2i * m (exact in float64)."""
    codes = np.arange(128, dtype=np.uint8)
    values = codes.view(FP8[variant]).astype(np.float64)
    values = values[np.isfinite(values)]  # non-negative finite values, increasing with the code
    mids = (values[:-1] + values[1:]) / 2  # mids[k] between codes k and k + 1
    num = (2 * np.arange(i, dtype=np.float64) + 1)[:, None] * fmax
    thr = 2.0 * i * mids[None, :]
    odd_below = (np.arange(len(mids)) % 2 == 1)[None, :]  # tie at mids[k]: up iff code k is odd
    up = (num > thr) | ((num == thr) & odd_below)
    return up.sum(axis=1).astype(np.int64)


def entropy_divergences(counts: np.ndarray, nq: int, start_bin: int, levels_fn=None) -> np.ndarray:
    """TensorRT's KL search, one candidate at a time, as a plain loop (NVIDIA's algorithm).

    For each i in [start_bin, len(counts)]: P = bins[:i] with the outliers added to
    its last entry; Q spreads each level's count evenly over its non-empty bins;
    KL(P || Q) by scipy.stats.entropy. ``levels_fn(i)`` gives each kept bin's level
    (NVIDIA's uniform digitize by default). NaN (nothing kept) is reported as inf.
    """
    bins = np.array(counts, dtype=np.int64, copy=True)
    bins[0] = bins[1]
    total = bins.sum()
    out = []
    for i in range(start_bin, len(bins) + 1):
        levels = nvidia_levels(i, nq) if levels_fn is None else levels_fn(i)
        levels = np.array(levels, copy=True)
        levels[bins[:i] == 0] = -1
        level_mass = {}
        for idx, lev in enumerate(levels):
            if lev != -1:
                level_mass[lev] = level_mass.get(lev, 0.0) + bins[idx]
        nonempty = Counter(levels)
        q = np.zeros(i, dtype=np.float64)
        for idx, lev in enumerate(levels):
            if lev != -1:
                q[idx] = level_mass[lev] / nonempty[lev]
        p = np.array(bins[:i], dtype=np.float64)
        p[-1] += bins[i:].sum()
        assert round(q.sum() + bins[i:].sum()) == total and round(p.sum()) == total
        with np.errstate(invalid="ignore", divide="ignore"):
            kl = scipy_entropy(p, q)
        out.append(np.inf if np.isnan(kl) else kl)
    return np.array(out)


def last_argmin(values: np.ndarray) -> int:
    return len(values) - 1 - int(np.argmin(values[::-1]))


# ----------------------------------------------------------------------------- fake quant / mse


def ref_fake_quant_int(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """torch's float32 arithmetic: clip(round_half_even(x * (1/scale)) + zp) then dequantize."""
    x = np.asarray(x, np.float32)
    s = np.float32(scale)
    inv = np.float32(1.0) / s
    code = np.clip(np.round(x * inv) + np.float32(zero_point), qmin, qmax)
    return ((code - np.float32(zero_point)) * s).astype(np.float32)


def ref_fake_quant_fp8(x: np.ndarray, scale: float, variant: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    s = np.float32(scale)
    fmax = float(ml_dtypes.finfo(FP8[variant]).max)
    v = np.clip(x / s, -fmax, fmax).astype(np.float32)
    return (v.astype(FP8[variant]).astype(np.float32) * s).astype(np.float32)


def mse_sym_errors(counts: np.ndarray, width: float, start_bin: int, fq) -> tuple[np.ndarray, np.ndarray]:
    """NVIDIA's histogram MSE: amax = center i (i >= start_bin), error = sum counts * (q(c) - c)**2.

    ``fq(centers, amax)`` fake-quantizes; returns (candidate amaxes, errors) in float64.
    """
    n = len(counts)
    centers = ((np.arange(n) + 0.5) * width).astype(np.float32)
    cands, errs = [], []
    for i in range(start_bin, n):
        amax = centers[i]
        q = fq(centers, amax)
        errs.append(float(np.sum(np.asarray(counts, np.float64) * (q.astype(np.float64) - centers) ** 2)))
        cands.append(float(amax))
    return np.array(cands), np.array(errs)
