"""Estimators: an observer state and a format give :class:`~qatjax.QParams`.

* ``minmax``: any state (``MinMaxState``, ``MovingAverageState``, ``HistogramState``);
* ``percentile``, ``entropy``, ``mse``: ``HistogramState``.

Symmetric (``symmetric=True``, and always for fp8): an ``amax`` is estimated from the
``|x|`` histogram (a signed histogram is folded exactly first) and
:func:`~qatjax.qparams_from_amax` builds the parameters. Affine (``symmetric=False``
with an integer format): ``lo``/``hi`` are estimated from a signed histogram
(``histogram(signed=True)``; an ``|x|`` histogram cannot tell signs and is refused)
and :func:`~qatjax.qparams_from_minmax` (``symmetric=False``) builds them.

The percentile and entropy estimates are clipped to the observed range
(``amax <= max|x|``, ``lo >= min(x)``, ``hi <= max(x)``): the aligned histogram's range
``R`` can be up to twice ``max|x|``, and such a threshold beyond the data only wastes
resolution. The MSE estimate is the minimiser itself (for fp8 a scale a little above
``max|x|`` can align the grid better, so clipping would not be neutral there).

Per-channel states (leading keepdims batch shape) give per-channel parameters;
the cheap estimators ``vmap`` over channels, ``entropy`` and ``mse`` ``lax.map`` over
them so memory stays that of one channel. Estimators can also be ``vmap``ped over a
batched per-tensor state (memory then grows with the batch).

No data: on a concrete state that saw no finite value (in any channel) an
estimator raises a ValueError. Under ``jit`` it cannot raise; such entries fall
back to a zero range, i.e. ``scale = SCALE_EPS`` (float32 eps) and zero point as
for an all-zero tensor, and :func:`qatjax.calibration.has_data` flags them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.calibration.aligned_histogram import HistogramState
from qatjax.calibration.observers import MinMaxState, MovingAverageState, has_data
from qatjax.fake_quant import fake_quant, quantize
from qatjax.formats import Format, as_format
from qatjax.qparams import QParams, qparams_from_amax, qparams_from_minmax

__all__ = [
    "METHODS",
    "entropy",
    "entropy_kl",
    "estimate",
    "minmax",
    "mse",
    "num_levels",
    "percentile",
]

#: Method names accepted by :func:`estimate`.
METHODS = ("minmax", "percentile", "entropy", "mse")

# Candidate rows per fused block in the entropy search: smaller blocks skip more of
# the j >= i triangle and let XLA:CPU run blocks concurrently.
_KL_ROW_BLOCKS = 8
_KL_BLOCK_ELEMENTS = 2**18
# Code-table size for fp8 levels: non-negative fp8 codes are 0..127 as uint8.
_FP8_LEVELS = 128


def minmax(state: Any, fmt: Format, *, symmetric: bool = True) -> QParams:
    """Parameters covering the observed range.

    Symmetric: ``amax = max(|lo|, |hi|)`` -> :func:`~qatjax.qparams_from_amax`.
    Affine: :func:`~qatjax.qparams_from_minmax` of ``(lo, hi)`` with ``symmetric=False``.

    Args:
      state: a ``MinMaxState``, ``MovingAverageState`` or ``HistogramState`` (the
        histogram's exact observed range is used; affine needs ``signed=True``).
      fmt: target format.
      symmetric: symmetric or affine parameters (fp8 is always symmetric).
    Returns:
      ``QParams`` of the state's batch shape (float32 scale, int32 zero point).
    """
    fmt, affine = _setup(state, fmt, symmetric, "minmax")
    _check_data(state, "minmax")
    return _run(_minmax_range, state, fmt, affine, (), {})


def percentile(state: HistogramState, fmt: Format, p: float = 99.99, *, symmetric: bool = True) -> QParams:
    """Parameters from histogram quantiles, interpolated linearly inside the crossing bin.

    Symmetric: ``amax`` estimates ``np.percentile(|x|, p)`` (numpy's linear
    interpolation of the order statistics at position ``h = p/100 * (T - 1)``), reading
    the histogram as uniform within each bin: with ``t = h + 1/2`` and ``b`` the first
    non-empty bin whose cumulative count reaches ``t``,
    ``amax = edge[b] + (t - cum_before[b]) / count[b] * w``, clipped to
    ``[min|x|, max|x|]``; ``p = 0`` and ``p = 100`` give ``min|x|`` and ``max|x|``
    exactly. Where neighbouring samples are less than a bin apart this is within about
    one bin width of numpy's value. (NVIDIA returns the LEFT edge of the bin where
    ``cumsum / T`` reaches ``p/100``: up to a bin lower, and below ``max|x|`` at ``p = 100``.)

    Affine: the clipped mass ``(100 - p)%`` is split evenly between the tails
    (ONNX Runtime's convention): ``lo`` is the ``(100 - p)/2``-th and ``hi`` the
    ``100 - (100 - p)/2``-th percentile of ``x``, from the signed histogram.

    Args:
      state: a ``HistogramState`` (``signed=True`` for affine).
      fmt: target format.
      p: percentile in ``[0, 100]``; a traced scalar is accepted (not range-checked then).
      symmetric: symmetric or affine parameters.
    """
    fmt, affine = _setup(state, fmt, symmetric, "percentile", histogram_only=True)
    if isinstance(p, bool) or not isinstance(p, (int, float, np.ndarray, jax.Array, np.number)):
        raise TypeError(f"percentile: `p` must be a number in [0, 100], got {p!r}.")
    if jnp.ndim(p) != 0:
        raise ValueError(f"percentile: `p` must be a scalar, got shape {jnp.shape(p)}.")
    if not isinstance(p, jax.core.Tracer) and not 0 <= float(p) <= 100:
        raise ValueError(f"percentile: `p` must be a number in [0, 100], got {p!r}.")
    _check_data(state, "percentile")
    # cumulative fractions, in float64 on the host when p is concrete
    if isinstance(p, jax.core.Tracer):
        p = jnp.asarray(p, jnp.float32)
        cut = (100.0 - p) / 200.0
        q = {"q_lo": cut, "q_hi": 1.0 - cut} if affine else {"q": p / 100.0}
    else:
        cut = (100.0 - float(p)) / 200.0
        q = {"q_lo": cut, "q_hi": 1.0 - cut} if affine else {"q": float(p) / 100.0}
        q = {k: jnp.float32(v) for k, v in q.items()}
    return _run(_percentile_range, state, fmt, affine, (), q)


def entropy(
    state: HistogramState, fmt: Format, *, symmetric: bool = True, start_bin: int | None = None
) -> QParams:
    """Parameters minimising the KL divergence, TensorRT's algorithm (NVIDIA's calibrators).

    On the ``|x|`` histogram (``n`` bins), for every candidate threshold bin
    ``i = start_bin .. n`` at once (under ``jit``, no Python loop over candidates),
    exactly as NVIDIA's ``_compute_amax_entropy`` (see :func:`entropy_kl`), and
    ``amax = i* * w`` for the LARGEST ``i*`` reaching the minimum KL, clipped to
    ``max|x|``. If no candidate has a finite divergence (all the mass sits in bin 0,
    e.g. an all-zero tensor) ``amax = max|x|``.

    Affine formats (signed histogram): the search runs independently on the
    negative and positive halves (``n = num_bins // 2`` bins each), each against
    ``2**(bits - 1)`` levels, or all ``2**bits`` levels when the other side holds no
    value (so ReLU outputs get NVIDIA's unsigned behaviour); ``lo = -amax_neg``,
    ``hi = amax_pos``.

    Args:
      state: a ``HistogramState`` (``signed=True`` for affine).
      fmt: target format (int 2..8 bits signed/unsigned, or fp8).
      symmetric: symmetric or affine parameters.
      start_bin: first candidate threshold bin; default ``n // 16`` (NVIDIA's 128 for 2048 bins).
    """
    fmt, affine = _setup(state, fmt, symmetric, "entropy", histogram_only=True)
    n = state.bins_per_side if (affine or state.signed) else state.num_bins
    start_bin = _check_start_bin(start_bin, n, "entropy")
    _check_data(state, "entropy")
    if affine:
        static = (("start_bin", start_bin), ("bits", fmt.bits))
    else:
        static = (("start_bin", start_bin), ("nq", num_levels(fmt)), ("fp8", fmt if fmt.is_float else None))
    return _run(_entropy_range, state, fmt, affine, static, {})


def mse(
    state: HistogramState,
    fmt: Format,
    *,
    symmetric: bool = True,
    start_bin: int | None = None,
    num_candidates: int = 512,
) -> QParams:
    """Parameters minimising the histogram's expected squared quantization error.

    Each bin's count is placed at its center ``c_j`` and quantized with the library's
    :func:`~qatjax.fake_quant` numerics; the error of a candidate is
    ``sum_j counts_j * (fake_quant(c_j) - c_j)**2``, evaluated for all candidates at
    once; the first (smallest) minimiser wins, as in NVIDIA's ``_compute_amax_mse``.

    Symmetric: candidates ``amax = c_i`` for bins ``i = start_bin .. n - 1`` of the
    ``|x|`` histogram (NVIDIA's candidates), not clipped to ``max|x|``: the minimiser may
    lie above it (fp8 grids) when that lowers the estimated error.
    Affine: candidates ``(t * min(lo, 0), t * max(hi, 0))`` for
    ``t = k / num_candidates``, ``k = 1 .. num_candidates`` (shrinking the observed
    range towards 0), over the signed histogram's bin centers.

    Args:
      state: a ``HistogramState`` (``signed=True`` for affine).
      fmt: target format.
      symmetric: symmetric or affine parameters.
      start_bin: symmetric only: first candidate bin; default ``n // 16``.
      num_candidates: affine only: number of range shrink factors.
    """
    fmt, affine = _setup(state, fmt, symmetric, "mse", histogram_only=True)
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)) or num_candidates < 1:
        raise ValueError(f"mse: `num_candidates` must be a positive int, got {num_candidates!r}.")
    n = state.bins_per_side if state.signed else state.num_bins
    start_bin = _check_start_bin(start_bin, n, "mse", allow_n=False)
    _check_data(state, "mse")
    static = (("fmt", fmt), ("num_candidates", int(num_candidates)), ("start_bin", start_bin))
    return _run(_mse_range, state, fmt, affine, static, {})


_ESTIMATORS: dict[str, Callable[..., QParams]] = {
    "minmax": minmax,
    "percentile": percentile,
    "entropy": entropy,
    "mse": mse,
}


def estimate(
    state: Any, fmt: Format, method: str = "minmax", *, symmetric: bool = True, **kwargs: Any
) -> QParams:
    """One entry point: ``method`` in ``METHODS`` selects the estimator; ``kwargs`` go to it.

    ``estimate(state, fmt, "percentile", p=99.9)`` is ``percentile(state, fmt, p=99.9)``.

    Raises:
      ValueError: naming ``method`` when it is not one of ``METHODS``.
    """
    if not isinstance(method, str) or method not in _ESTIMATORS:
        raise ValueError(f"estimate: unknown `method` {method!r}; expected one of {METHODS}.")
    return _ESTIMATORS[method](state, fmt, symmetric=symmetric, **kwargs)


def num_levels(fmt: Format) -> int:
    """Levels of the entropy search's candidate distribution.

    Integer formats: NVIDIA's ``2**(bits - 1 + unsigned)`` (128 for int8, 256 for
    uint8): the non-negative codes of a symmetric quantizer. fp8: the 128 non-negative
    uint8 code points (126 finite for e4m3fn, 123 for e5m2); there, bin ``j`` belongs to
    the level of the fp8 code its center ``(j + 0.5) / i * fmt.max`` rounds to, so levels
    follow the fp8 grid (fine near 0, coarse near ``amax``) instead of being uniform.
    """
    fmt = as_format(fmt)
    if fmt.is_float:
        return _FP8_LEVELS
    return 2 ** (fmt.bits - 1 + (not fmt.signed))


def entropy_kl(counts: jax.Array, fmt: Format, *, start_bin: int | None = None) -> jax.Array:
    """KL divergence of every candidate threshold, NVIDIA's ``_compute_amax_entropy`` vectorised.

    For a 1-D ``|x|`` histogram ``counts`` (int32 ``(n,)``), with ``bins`` a copy of it
    with ``bins[0] = bins[1]`` (the input is not modified) and ``nq = num_levels(fmt)``,
    for each ``i = start_bin .. n``:

    * ``P = bins[:i]`` with ``sum(bins[i:])`` added to ``P[i-1]`` (outliers folded in);
    * levels ``level[j] = floor(j * nq / i)`` for ``j < i`` (integer arithmetic; this is
      ``digitize(j, linspace(0, i, nq + 1)) - 1``, exact since ``nq`` is a power of two);
      fp8: the code of ``(j + 0.5) / i * fmt.max``;
    * ``Q[j] = (sum of bins[:i] in j's level) / (number of non-empty bins in it)`` if
      ``bins[j] > 0``, else 0 (emptiness from ``bins``, not ``P``: an empty last bin that
      received outliers makes ``KL = inf``, as in NVIDIA);
    * ``KL = sum_j p_j * log(p_j / q_j)`` with ``p = P / sum(P)``, ``q = Q / sum(Q)``,
      ``0 * log 0 = 0`` and ``inf`` where ``p > 0 = q`` (``scipy.stats.entropy(P, Q)``).

    When ``i <= nq`` every bin is its own level, so ``Q`` is ``bins[:i]`` and only
    the outlier mass makes ``KL > 0`` (uint8's ``nq = 256`` exceeds the first
    candidates 128..256; this follows NVIDIA exactly). One deliberate difference:
    where ``sum(bins[:i]) == 0`` scipy returns NaN (``0 / 0``) and NVIDIA's argmin then
    picks that candidate; here it is ``inf``.

    Computed in float32 from exact integer cumulative sums, with one ``log`` per
    (candidate, bin) of ratios near 1: absolute error around ``1e-6``.

    Returns:
      float32 ``(n - start_bin + 1,)``; entry ``k`` is the divergence of ``i = start_bin + k``.
    """
    fmt = as_format(fmt)
    counts = jnp.asarray(counts)
    if counts.ndim != 1 or not jnp.issubdtype(counts.dtype, jnp.integer):
        raise ValueError(
            f"entropy_kl: `counts` must be a 1-D integer array, got shape {counts.shape} and "
            f"dtype {counts.dtype}."
        )
    start_bin = _check_start_bin(start_bin, counts.shape[0], "entropy_kl")
    nq = num_levels(fmt)
    return _kl_jit(counts.astype(jnp.int32), start_bin, nq, nq, fmt if fmt.is_float else None)


# ----------------------------------------------------------------------------- setup


def _setup(state: Any, fmt: Any, symmetric: Any, fn: str, histogram_only: bool = False):
    """Validates the arguments at trace time; returns ``(fmt, affine)``."""
    fmt = as_format(fmt)
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"{fn}: `symmetric` must be a bool, got {symmetric!r}.")
    kinds = (HistogramState,) if histogram_only else (HistogramState, MinMaxState, MovingAverageState)
    if not isinstance(state, kinds):
        raise TypeError(
            f"{fn}: `state` must be a {' or '.join(k.__name__ for k in kinds)}"
            f"{' (from the histogram observer)' if histogram_only else ''}, got {type(state).__name__}."
        )
    affine = not symmetric and not fmt.is_float
    if affine and isinstance(state, HistogramState) and not state.signed:
        raise ValueError(
            f"{fn}: `state` is a histogram of |x| (histogram(signed=False)), which cannot give the "
            f"asymmetric range that symmetric=False needs for {fmt}; observe with "
            "histogram(signed=True) or pass symmetric=True."
        )
    return fmt, affine


def _check_start_bin(start_bin: Any, n: int, fn: str, allow_n: bool = True) -> int:
    if start_bin is None:
        return max(1, n // 16)
    top = n if allow_n else n - 1
    if isinstance(start_bin, bool) or not isinstance(start_bin, (int, np.integer)) or not 1 <= start_bin <= top:
        raise ValueError(
            f"{fn}: `start_bin` must be an int in [1, {top}] for a histogram of {n} bins per side, "
            f"got {start_bin!r}."
        )
    return int(start_bin)


def _check_data(state: Any, fn: str) -> None:
    """Raises a ValueError when ``has_data(state)`` is concrete and False anywhere."""
    valid = has_data(state)
    if isinstance(valid, jax.core.Tracer):
        return
    v = np.asarray(valid)
    if not v.all():
        where = "" if v.ndim == 0 else f" at channel indices {np.argwhere(~v).tolist()[:8]}"
        raise ValueError(
            f"{fn}: `state` has not observed any finite value{where} (empty data or only "
            "NaN/Inf); update the observer with data before estimating."
        )


def _finish(fmt: Format, affine: bool, valid: jax.Array, lo: jax.Array, hi: jax.Array) -> QParams:
    """Zero range where there is no data; then the library's constructors."""
    lo = jnp.where(valid, lo, 0.0)
    hi = jnp.where(valid, hi, 0.0)
    if affine:
        return qparams_from_minmax(lo, hi, fmt, symmetric=False)
    return qparams_from_amax(jnp.maximum(-lo, hi), fmt)


def _run(impl: Callable, state: Any, fmt: Format, affine: bool, static: tuple, dynamic: dict) -> QParams:
    """``(lo, hi) = impl(state, affine, **static, **dynamic)`` under ``jit``, then :func:`_finish`.

    ``static`` holds only the configuration the range computation needs (so e.g. the
    minmax and percentile programs are shared by all formats); ``dynamic`` holds traced
    arrays (a percentile can change without recompiling).
    """
    lo, hi = _range_jit(impl, state, affine, static, dynamic)
    return _finish(fmt, affine, has_data(state), lo, hi)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _range_jit(impl: Callable, state: Any, affine: bool, static: tuple, dynamic: dict):
    return impl(state, affine, **dict(static), **dynamic)


def _per_row(fn: Callable, h: HistogramState, *, light: bool, **kw: Any):
    """Applies ``fn(counts, width, lo, hi, **kw)`` to every channel of ``h``; returns arrays
    (or a pair of arrays) of ``h``'s batch shape. ``light`` functions are ``vmap``ped,
    heavy ones ``lax.map``ped (memory of one channel)."""
    batch = h.exponent.shape
    rows = (
        h.counts.reshape((-1, h.num_bins)),
        h.bin_width().reshape(-1),
        h.lo.reshape(-1),
        h.hi.reshape(-1),
    )
    row_fn = lambda c, w, a, b: fn(c, w, a, b, **kw)
    if rows[1].shape[0] == 1:
        out = jax.tree_util.tree_map(lambda r: r[None], row_fn(*(r[0] for r in rows)))
    elif light:
        out = jax.vmap(row_fn)(*rows)
    else:
        out = lax.map(lambda r: row_fn(*r), rows)
    return jax.tree_util.tree_map(lambda r: r.reshape(batch), out)


# ----------------------------------------------------------------------------- ranges


def _minmax_range(state, affine):
    if isinstance(state, HistogramState) and not state.signed:
        return -state.hi, state.hi
    return state.lo, state.hi


def _percentile_range(state, affine, **q):
    if affine:
        return _per_row(_percentile_signed, state, light=True, **q)
    amax = _per_row(_percentile_abs, state.folded(), light=True, **q)
    return -amax, amax


def _entropy_range(state, affine, *, start_bin, bits=None, nq=None, fp8=None):
    if affine:
        return _per_row(_entropy_signed, state, light=False, start_bin=start_bin, bits=bits)
    amax = _per_row(_entropy_abs, state.folded(), light=False, start_bin=start_bin, nq=nq, fp8=fp8)
    return -amax, amax


def _mse_range(state, affine, *, fmt, num_candidates, start_bin):
    if affine:
        return _per_row(_mse_signed, state, light=False, fmt=fmt, num_candidates=num_candidates)
    amax = _per_row(_mse_abs, state.folded(), light=False, fmt=fmt, start_bin=start_bin)
    return -amax, amax


# ----------------------------------------------------------------------------- exact sums


def _split_cumsum(b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exclusive cumulative sums of the high and low 16 bits of non-negative int32 ``b``.

    Both fit int32 for up to 2**15 bins, so every partial sum ``C[k1] - C[k0]`` is
    exact: ``(hi[k1] - hi[k0]) * 65536 + (lo[k1] - lo[k0])``.
    """
    z = jnp.zeros(b.shape[:-1] + (1,), jnp.int32)
    hi = jnp.concatenate([z, jnp.cumsum(b >> 16, axis=-1)], axis=-1)
    lo = jnp.concatenate([z, jnp.cumsum(b & 0xFFFF, axis=-1)], axis=-1)
    return hi, lo


def _to_f32(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """float32 of the exact integer ``hi * 65536 + lo`` (one rounding each)."""
    return hi.astype(jnp.float32) * 65536.0 + lo.astype(jnp.float32)


# ----------------------------------------------------------------------------- percentile


def _quantile(
    counts: jax.Array, origin: jax.Array, w: jax.Array, q: jax.Array, lo: jax.Array, hi: jax.Array
) -> jax.Array:
    """numpy's ``'linear'`` quantile ``q`` from a histogram, clipped to ``[lo, hi]``.

    ``counts``: int32 ``(m,)`` over ``[origin, origin + m*w]``. numpy interpolates the
    order statistics at position ``h = q * (T - 1)`` (0-based). Sample ``k`` of a bin is
    placed at ``edge + (k - before + 1/2) / count * w`` (uniform within the bin), so the
    value is read at cumulative count ``h + 1/2``: in the first non-empty bin ``b``
    whose inclusive cumulative count reaches it. ``q = 0`` and ``q = 1`` give ``lo`` and
    ``hi`` (the exact observed extremes), as numpy does.
    """
    ch, cl = _split_cumsum(counts)
    incl = _to_f32(ch[1:], cl[1:])
    target = q * (incl[-1] - 1.0) + 0.5
    b = jnp.argmax((incl >= target) & (counts > 0))
    before = _to_f32(ch[b], cl[b])
    frac = jnp.clip((target - before) / counts[b].astype(jnp.float32), 0.0, 1.0)
    value = jnp.clip(origin + (b.astype(jnp.float32) + frac) * w, lo, hi)
    return jnp.where(q <= 0.0, lo, jnp.where(q >= 1.0, hi, value))


def _percentile_abs(counts, w, lo, hi, *, q):
    return _quantile(counts, jnp.float32(0), w, q, lo, hi)


def _percentile_signed(counts, w, lo, hi, *, q_lo, q_hi):
    origin = -(counts.shape[-1] // 2) * w
    lo_q = _quantile(counts, origin, w, q_lo, lo, hi)
    hi_q = _quantile(counts, origin, w, q_hi, lo, hi)
    return lo_q, hi_q


# ----------------------------------------------------------------------------- entropy


def _entropy_abs(counts, w, lo, hi, *, start_bin, nq, fp8):
    kl = _kl_curve(counts, start_bin, nq, nq, fp8)
    return _amax_from_kl(kl, start_bin, w, hi)


def _entropy_signed(counts, w, lo, hi, *, start_bin, bits):
    n = counts.shape[-1] // 2
    neg = jnp.flip(counts[:n])
    pos = counts[n:]
    has_neg = lo < 0
    has_pos = hi > 0
    half, full = 2 ** (bits - 1), 2**bits
    kl_pos = _kl_curve(pos, start_bin, jnp.where(has_neg, half, full), full, None)
    kl_neg = _kl_curve(neg, start_bin, jnp.where(has_pos, half, full), full, None)
    a_pos = _amax_from_kl(kl_pos, start_bin, w, jnp.maximum(hi, 0.0))
    a_neg = _amax_from_kl(kl_neg, start_bin, w, jnp.maximum(-lo, 0.0))
    return jnp.where(has_neg, -a_neg, 0.0), jnp.where(has_pos, a_pos, 0.0)


def _amax_from_kl(kl: jax.Array, start_bin: int, w: jax.Array, cap: jax.Array) -> jax.Array:
    """``min(i* * w, cap)`` for the largest ``i*`` minimising ``kl``; ``cap`` if all are inf."""
    last = kl.shape[0] - 1 - jnp.argmin(kl[::-1])
    amax = (start_bin + last).astype(jnp.float32) * w
    return jnp.where(jnp.isfinite(jnp.min(kl)), jnp.minimum(amax, cap), cap)


def _kl_curve(
    counts: jax.Array, start_bin: int, nq: Any, nq_max: int, fp8: Format | None
) -> jax.Array:
    """float32 ``(n - start_bin + 1,)``: KL divergence for thresholds ``i = start_bin .. n``.

    See :func:`entropy_kl`. ``nq`` may be traced (``<= nq_max``, a power of two).
    Layout: rows are candidates ``i``, columns bins ``j``; per-level quantities come
    from exact cumulative sums at the level boundaries ``B[i, k]`` (first bin of level
    ``k``), and each (i, j) element needs one gather, one division and one log:
    ``KL_i = (1/T) sum_j P_j * log((P_j / qmean[i, level(j)]) * (C_i / T))`` with
    ``qmean = mass / nonempty_count`` (the Q value of the level's non-empty bins),
    ``T = sum(bins)``, ``C_i = sum(bins[:i])``. Divisions (not reciprocals) and
    ``C_i / T := 1`` when equal make the ratio exactly 1 where ``P`` equals ``Q``, so
    exactly tied candidates stay tied (and the largest wins, as in NVIDIA).
    """
    n = counts.shape[-1]
    b = counts.at[0].set(counts[1])  # NVIDIA: suppress the zero spike (on a copy)
    b_hi, b_lo = b >> 16, b & 0xFFFF
    ch, cl = _split_cumsum(b)
    z = jnp.zeros((1,), jnp.int32)
    cnz = jnp.concatenate([z, jnp.cumsum((b > 0).astype(jnp.int32))])
    i = jnp.arange(start_bin, n + 1, dtype=jnp.int32)
    j = jnp.arange(n, dtype=jnp.int32)

    if fp8 is None:
        k = jnp.arange(nq_max + 1, dtype=jnp.int32)
        # first bin of level k: ceil(k * i / nq); levels beyond nq are empty (= i)
        bounds = jnp.minimum((k[None, :] * i[:, None] + nq - 1) // nq, i[:, None])
        codes = None
    else:
        codes = _fp8_levels(n, i, fp8)
        bounds = jax.vmap(
            lambda row: jnp.searchsorted(row, jnp.arange(nq_max + 1, dtype=jnp.int32), side="left")
        )(codes).astype(jnp.int32)
    b0, b1 = bounds[:, :-1], bounds[:, 1:]
    mass = _to_f32(ch[b1] - ch[b0], cl[b1] - cl[b0])
    nonempty = (cnz[b1] - cnz[b0]).astype(jnp.float32)
    total = _to_f32(ch[n], cl[n])
    kept = _to_f32(ch[i], cl[i])
    qmean = jnp.where(nonempty > 0, mass / jnp.maximum(nonempty, 1.0), 1.0)
    kept_share = jnp.where(kept == total, 1.0, kept / total)[:, None]
    # P[i-1] = bins[i-1] + sum(bins[i:]), exactly
    p_last = _to_f32(b_hi[i - 1] + ch[n] - ch[i], b_lo[i - 1] + cl[n] - cl[i])
    tail = _to_f32(ch[n] - ch[i], cl[n] - cl[i])
    bf = b.astype(jnp.float32)

    rows = i.shape[0]
    blocks = min(_KL_ROW_BLOCKS, max(1, rows * n // _KL_BLOCK_ELEMENTS))
    edges = np.linspace(0, rows, blocks + 1).astype(int)
    parts = []
    for r0, r1 in itertools.pairwise(edges):
        ib = i[r0:r1, None]
        cols = start_bin + int(r1) - 1  # j < i <= cols
        jb = j[None, :cols]
        if codes is None:
            level = _floor_div(jb * nq, ib)
        else:
            level = codes[r0:r1, :cols]
        level = jnp.clip(level, 0, nq_max - 1)
        qj = jnp.take_along_axis(qmean[r0:r1], level, axis=1)
        bj = bf[None, :cols]
        valid = (jb < ib) & (bj > 0)
        pj = jnp.where(jb == ib - 1, p_last[r0:r1, None], bj)
        pj = jnp.where(valid, pj, 0.0)
        ratio = jnp.where(valid, (pj / qj) * kept_share[r0:r1], 1.0)
        parts.append(jnp.sum(pj * jnp.log(ratio), axis=1))
    kl = jnp.concatenate(parts) / total
    # P > 0 = Q at the last kept bin, or nothing kept at all
    infinite = ((b[i - 1] == 0) & (tail > 0)) | (kept == 0)
    return jnp.where(infinite, jnp.inf, kl)


_kl_jit = jax.jit(_kl_curve, static_argnums=(1, 2, 3, 4))


def _floor_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """Exact ``num // den`` for non-negative int32 below 2**24, vectorisable.

    A float32 estimate (off by at most one; XLA may turn the division into a
    multiplication by a reciprocal) corrected with integer products.
    """
    est = jnp.floor(num.astype(jnp.float32) * (1.0 / den.astype(jnp.float32))).astype(jnp.int32)
    est = est + ((est + 1) * den <= num).astype(jnp.int32)
    return est - (est * den > num).astype(jnp.int32)


def _fp8_levels(n: int, i: jax.Array, fmt: Format) -> jax.Array:
    """int32 ``(len(i), n)``: the fp8 code (as uint8) that bin ``j``'s center maps to for
    threshold ``i``, ``quantize(v)`` of ``v = (2j + 1) * fmt.max / (2i)`` rounded to
    nearest-even exactly; ``_FP8_LEVELS`` where ``j >= i``.

    The quotient is only approximate in float32, so the code of the library's
    saturating cast is corrected against the two neighbouring midpoints ``m``, compared
    exactly as ``(2j + 1) * max`` vs ``2i * m`` (both products are exact in float32).
    Rows are non-decreasing, so level boundaries are found by ``searchsorted`` and
    agree with these per-bin levels by construction.
    """
    j = jnp.arange(n, dtype=jnp.int32)
    num = ((2 * j + 1).astype(jnp.float32) * jnp.float32(fmt.max))[None, :]
    den = (2 * i).astype(jnp.float32)[:, None]
    one = jnp.ones((1, 1), jnp.float32)
    code = lax.bitcast_convert_type(
        quantize(num / den, QParams(one, jnp.zeros((1, 1), jnp.int32)), fmt), jnp.uint8
    ).astype(jnp.int32)

    def value(c):
        c = jnp.clip(c, 0, _FP8_LEVELS - 1).astype(jnp.uint8)
        return lax.bitcast_convert_type(c, fmt.storage_dtype).astype(jnp.float32)

    here = value(code)
    up = (here + value(code + 1)) * 0.5  # NaN / inf past the largest finite code: never crossed
    down = jnp.where(code > 0, (value(code - 1) + here) * 0.5, -1.0)
    even = code % 2 == 0
    # a tie goes to the even code: up from an odd code, down from an odd code
    above = (num > den * up) | ((num == den * up) & ~even)
    below = (num < den * down) | ((num == den * down) & ~even)
    code = code + above.astype(jnp.int32) - below.astype(jnp.int32)
    return jnp.where(j[None, :] < i[:, None], code, _FP8_LEVELS)


# ----------------------------------------------------------------------------- mse


def _mse_abs(counts, w, lo, hi, *, fmt, start_bin):
    n = counts.shape[-1]
    centers = (jnp.arange(n, dtype=jnp.float32) + 0.5) * w
    cand = centers[start_bin:]
    qp = qparams_from_amax(cand[:, None], fmt)
    err = _weighted_sq_error(counts, centers, qp, fmt)
    return cand[jnp.argmin(err)]


def _mse_signed(counts, w, lo, hi, *, fmt, num_candidates):
    nb = counts.shape[-1]
    centers = (jnp.arange(nb, dtype=jnp.float32) - nb // 2 + 0.5) * w
    t = jnp.arange(1, num_candidates + 1, dtype=jnp.float32) / num_candidates
    los = t * jnp.minimum(lo, 0.0)
    his = t * jnp.maximum(hi, 0.0)
    qp = qparams_from_minmax(los[:, None], his[:, None], fmt, symmetric=False)
    k = jnp.argmin(_weighted_sq_error(counts, centers, qp, fmt))
    return los[k], his[k]


def _weighted_sq_error(counts: jax.Array, centers: jax.Array, qp: QParams, fmt: Format) -> jax.Array:
    """float32 ``(C,)``: ``sum_j counts_j * (fake_quant(c_j; qp_c) - c_j)**2``; NaN -> inf."""
    x = jnp.broadcast_to(centers[None, :], (qp.scale.shape[0], centers.shape[0]))
    d = fake_quant(x, qp, fmt) - x
    err = jnp.sum(counts.astype(jnp.float32)[None, :] * d * d, axis=1)
    return jnp.where(jnp.isnan(err), jnp.inf, err)
