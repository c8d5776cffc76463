"""Fixed-memory histograms with power-of-two ranges that merge exactly.

A histogram covers ``[0, R]`` (histogram of ``|x|``, for symmetric formats) or
``[-R, R]`` (signed histogram of ``x``, for affine formats) with ``R = 2**exponent``
for an integer ``exponent``. Each side has ``n`` bins (``n = num_bins`` for ``|x|``,
``n = num_bins // 2`` per side for the signed histogram) of width ``w = R / n``.

Binning rule (float32, exact). With ``k = ceil(|x| * n / R) - 1`` clipped below at 0,
``|x|`` falls in bin ``k``: bin 0 is ``[0, w]``, bin ``k >= 1`` is ``(k*w, (k+1)*w]``.
So a value equal to ``R`` lands in the last bin, and ``0`` in bin 0. In the signed
histogram (``2n`` bins ordered from ``-R`` to ``R``) ``x >= 0`` goes to index ``n + k``
and ``x < 0`` to ``n - 1 - k``: the mirror image, so ``-0.0`` and ``0.0`` share bin
``n``. ``n / R`` is a power of two, so ``|x| * n / R`` is computed exactly. Subnormal
values (``|x| < 2**-126``) count as zero, as on backends that flush them, so the
histogram is the same everywhere.

Range growth. The range is the smallest power of two ``>= max|x|`` over all data seen
(clamped to ``[2**EXPONENT_MIN, 2**EXPONENT_MAX]``). When a batch needs a larger
range, the range doubles as many times as needed *before* the batch is binned, and
each doubling merges adjacent bin pairs: bin ``m`` of the new ``|x|`` histogram is
bins ``2m`` and ``2m + 1`` of the old one. For right-closed bins this is exact:
``ceil(y / 2) - 1 == (ceil(y) - 1) // 2`` for every real ``y > 0``, so a value's bin
under ``2R`` is always the pair-merge of its bin under ``R``. In the signed layout
the pairs never straddle 0 because ``n`` is even, and the merged pairs land in the
middle half (``[0]*(n/2) + pair_sums + [0]*(n/2)``).

Consequences: the final histogram is the histogram of all data binned at the final
range, whatever the batch order or the way data was split across devices; two
histograms merge exactly (bring both to the larger range, then add).

Counts are int32. A bin saturates at ``COUNT_MAX = 2**31 - 1`` instead of wrapping
(additions, pair merges and cross-device sums all saturate), so a saturated bin is
a lower bound. One ``update`` may bin at most ``2**31 - 1`` values (checked at trace
time). Values that are NaN or +-Inf are not binned; they are counted in
``num_nonfinite``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "COUNT_MAX",
    "EXPONENT_MAX",
    "EXPONENT_MIN",
    "MAX_NUM_BINS",
    "HistogramState",
    "init_histogram",
    "rescale_counts",
    "saturating_add",
    "saturating_psum",
    "update_histogram",
]

#: Largest count a bin can hold (int32 maximum); counts saturate there.
COUNT_MAX = 2**31 - 1
#: Smallest range exponent: ranges below ``2**-100`` are rounded up to it.
EXPONENT_MIN = -100
#: Largest range exponent: ``2**128`` exceeds every finite float32.
EXPONENT_MAX = 128
#: Largest supported ``num_bins``: keeps every power of two involved a normal float32
#: and the estimators' exact int32 cumulative sums (counts split in 16-bit halves) in range.
MAX_NUM_BINS = 2**15

# Values per scatter: large batches are binned in up to _MAX_CHUNKS independent
# bincounts, which XLA:CPU runs concurrently (one scatter is single-threaded).
_CHUNK = 2**20
_MAX_CHUNKS = 8
_TINY = float(np.finfo(np.float32).tiny)  # 2**-126, the smallest normal float32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["counts", "exponent", "lo", "hi", "num_nonfinite"],
                   meta_fields=["signed"])
@dataclasses.dataclass(frozen=True)
class HistogramState:
    """State of a :func:`qatjax.calibration.histogram` observer.

    With batch shape ``S`` (``()`` per tensor, a keepdims shape per channel):

    Attributes:
      counts: int32 ``S + (num_bins,)``. ``|x|`` histogram: bin ``k`` covers
        ``(k*w, (k+1)*w]`` (bin 0 includes 0). Signed histogram: bins ordered from
        ``-R`` to ``R``, index ``n + k`` for ``x >= 0`` and ``n - 1 - k`` for
        ``x < 0``, ``n = num_bins // 2``.
      exponent: int32 ``S``: the range is ``R = 2**exponent``; ``EXPONENT_MIN`` until
        data larger than ``2**EXPONENT_MIN`` is seen.
      lo: float32 ``S``: smallest finite value seen (of ``|x|`` for the ``|x|``
        histogram, of ``x`` for the signed one); ``+inf`` before any.
      hi: float32 ``S``: largest finite value seen; ``-inf`` before any.
      num_nonfinite: int32 ``S``: NaN and +-Inf values skipped (saturating).
      signed: static: ``True`` for the signed histogram of ``x``.
    """

    counts: jax.Array
    exponent: jax.Array
    lo: jax.Array
    hi: jax.Array
    num_nonfinite: jax.Array
    signed: bool = False

    @property
    def num_bins(self) -> int:
        """Total number of bins (static)."""
        return int(self.counts.shape[-1])

    @property
    def bins_per_side(self) -> int:
        """``n``: bins covering ``[0, R]`` (``num_bins`` or ``num_bins // 2`` when signed)."""
        return self.num_bins // 2 if self.signed else self.num_bins

    def bin_width(self) -> jax.Array:
        """float32 ``S``: ``w = R / n = 2**(exponent - log2(n))``, exact."""
        return pow2(self.exponent - _log2(self.bins_per_side))

    def edges(self) -> jax.Array:
        """float32 ``S + (num_bins + 1,)``: bin edges, ``k * w`` (``|x|``) or ``(k - n) * w``."""
        k = jnp.arange(self.num_bins + 1, dtype=jnp.float32)
        if self.signed:
            k = k - self.bins_per_side
        return k * self.bin_width()[..., None]

    def folded(self) -> HistogramState:
        """The ``|x|`` histogram (``n`` bins, same range) of a signed histogram, exactly.

        ``|x|`` bin ``k`` is the sum of signed bins ``n + k`` and ``n - 1 - k``. ``lo``
        becomes the smallest ``|x|`` when all values share a sign, else 0 (a lower
        bound). A ``|x|`` histogram is returned unchanged.
        """
        if not self.signed:
            return self
        n = self.bins_per_side
        neg = jnp.flip(self.counts[..., :n], axis=-1)
        counts = saturating_add(self.counts[..., n:], neg)
        abs_lo = jnp.where(
            self.lo >= 0, self.lo, jnp.where(self.hi <= 0, -self.hi, jnp.float32(0))
        )
        abs_hi = jnp.maximum(-self.lo, self.hi)
        return HistogramState(counts, self.exponent, abs_lo, abs_hi, self.num_nonfinite, False)


def init_histogram(
    batch_shape: Sequence[int], num_bins: int, signed: bool
) -> HistogramState:
    """An empty histogram state of batch shape ``batch_shape``."""
    check_num_bins(num_bins)
    shape = tuple(batch_shape)
    return HistogramState(
        counts=jnp.zeros(shape + (num_bins,), jnp.int32),
        exponent=jnp.full(shape, EXPONENT_MIN, jnp.int32),
        lo=jnp.full(shape, jnp.inf, jnp.float32),
        hi=jnp.full(shape, -jnp.inf, jnp.float32),
        num_nonfinite=jnp.zeros(shape, jnp.int32),
        signed=bool(signed),
    )


def check_num_bins(num_bins: int) -> None:
    """Raises a ValueError naming ``num_bins`` unless it is a power of two in [8, MAX_NUM_BINS]."""
    if (
        isinstance(num_bins, bool)
        or not isinstance(num_bins, (int, np.integer))
        or not 8 <= num_bins <= MAX_NUM_BINS
        or num_bins & (num_bins - 1)
    ):
        raise ValueError(
            f"histogram: `num_bins` must be a power of two in [8, {MAX_NUM_BINS}] (bins per side "
            f"must be a power of two for exact range doubling), got {num_bins!r}."
        )


def update_histogram(
    state: HistogramState, x: jax.Array, axis_name: Hashable | None = None
) -> HistogramState:
    """Adds the rows of ``x`` to a state with one histogram per row.

    Args:
      state: batch shape ``(C,)``.
      x: float32 ``(C, M)``; row ``c`` goes to histogram ``c``.
      axis_name: optional mapped axis: the batch range is pmin/pmax-reduced and the
        batch counts psum-reduced (saturating) over it, so every replica ends with the
        state of a single-device run on the global batch.
    Returns:
      The new state. Each histogram's range first grows to the smallest power of two
      ``>= max|x|`` of the state and the batch, then the batch is binned at that range.
    """
    nb = state.num_bins
    b_lo, b_hi = _finite_range(x, state.signed)
    if axis_name is not None:
        b_lo = lax.pmin(b_lo, axis_name)
        b_hi = lax.pmax(b_hi, axis_name)
    amax = jnp.maximum(-b_lo, b_hi) if state.signed else b_hi
    exponent = jnp.maximum(state.exponent, ceil_log2(jnp.maximum(amax, 0.0)))
    counts = rescale_counts(state.counts, exponent - state.exponent, state.signed)
    batch = _bin_batch(x, exponent, nb, state.signed)
    if axis_name is not None:
        batch = saturating_psum(batch, axis_name)
    return HistogramState(
        counts=saturating_add(counts, batch[:, :nb]),
        exponent=exponent,
        lo=jnp.minimum(state.lo, b_lo),
        hi=jnp.maximum(state.hi, b_hi),
        num_nonfinite=saturating_add(state.num_nonfinite, batch[:, nb]),
        signed=state.signed,
    )


def rescale_counts(counts: jax.Array, steps: jax.Array, signed: bool) -> jax.Array:
    """Brings counts at range ``R`` to range ``R * 2**steps`` by ``steps`` exact pair merges.

    Args:
      counts: int32 ``S + (num_bins,)``.
      steps: non-negative int32 broadcastable to ``S``. After ``log2(n)`` merges all
        mass sits in bin 0 of each side and further merges change nothing, so a
        ``while_loop`` runs ``min(max(steps), log2(n))`` merges, each applied where
        ``steps`` asks for it; empty histograms are not merged at all. In the common
        case (the range did not grow) no merge runs.
      signed: the counts' layout.
    Returns:
      int32 ``S + (num_bins,)`` with the same total (saturating).
    """
    nb = counts.shape[-1]
    n = nb // 2 if signed else nb
    # a state created inside the same jit is a constant: the barrier stops XLA from
    # constant-folding the reductions below (seconds for per-channel states)
    counts = lax.optimization_barrier(counts)
    steps = jnp.broadcast_to(jnp.asarray(steps, jnp.int32), counts.shape[:-1])
    steps = jnp.where(jnp.any(counts > 0, axis=-1), steps, 0)[..., None]
    rounds = jnp.minimum(jnp.max(steps, initial=0), _log2(n))
    counts = counts + jnp.zeros_like(steps)  # carry typed like the merged counts (shard_map)

    def body(carry):
        s, c = carry
        return s + 1, jnp.where(steps > s, _pair_merge(c, signed), c)

    return lax.while_loop(lambda carry: carry[0] < rounds, body, (jnp.int32(0), counts))[1]


def saturating_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """``min(a + b, COUNT_MAX)`` for non-negative int32 ``a``, ``b``, without wrapping."""
    return jnp.where(a > COUNT_MAX - b, jnp.int32(COUNT_MAX), a + b)


def saturating_psum(c: jax.Array, axis_name: Hashable) -> jax.Array:
    """``min(psum(c), COUNT_MAX)`` for non-negative int32 ``c`` over a mapped axis.

    The int32 psum wraps modulo ``2**32``; a float32 psum tells the magnitude. Its
    error is below ``2**24`` near ``2**31`` for up to ``2**16`` devices, so within
    ``2**25`` of ``2**31`` the sign of the wrapped sum decides (it is negative exactly
    when the true sum passed ``2**31 - 1``).
    """
    s = lax.psum(c, axis_name)
    f = lax.psum(c.astype(jnp.float32), axis_name)
    over = (f > 2.0**31 + 2.0**25) | ((f > 2.0**31 - 2.0**25) & (s < 0))
    return jnp.where(over, jnp.int32(COUNT_MAX), s)


def ceil_log2(m: jax.Array) -> jax.Array:
    """int32 ``clip(ceil(log2(m)), EXPONENT_MIN, EXPONENT_MAX)`` for finite ``m >= 0``, exactly.

    Read from the float32 bits: ``2**(E - 127)`` times ``1.mantissa``; 0 and
    subnormals (below ``2**-126 < 2**EXPONENT_MIN``) give ``EXPONENT_MIN``.
    """
    bits = lax.bitcast_convert_type(jnp.asarray(m, jnp.float32), jnp.int32)
    biased = bits >> 23
    e = biased - 127 + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    e = jnp.where(biased == 0, EXPONENT_MIN, e)
    return jnp.clip(e, EXPONENT_MIN, EXPONENT_MAX).astype(jnp.int32)


def pow2(k: jax.Array) -> jax.Array:
    """float32 ``2**k`` for int ``k`` in ``[-126, 127]``, built from its bits (exact)."""
    k = jnp.asarray(k, jnp.int32)
    return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


# ----------------------------------------------------------------------------- internals


def _log2(n: int) -> int:
    return int(n).bit_length() - 1


def _pair_merge(counts: jax.Array, signed: bool) -> jax.Array:
    """One range doubling: adjacent pairs summed, placed so that bin edges stay aligned."""
    nb = counts.shape[-1]
    pairs = saturating_add(counts[..., 0::2], counts[..., 1::2])
    pad = [(0, 0)] * (counts.ndim - 1)
    if signed:
        return jnp.pad(pairs, pad + [(nb // 4, nb // 4)])
    return jnp.pad(pairs, pad + [(0, nb // 2)])


def _finite_range(x: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
    """Per-row ``(min, max)`` of the finite entries of ``v = x`` (signed) or ``|x|``, for 2-D
    ``x``; ``(+inf, -inf)`` for a row without any.

    The plain min/max reductions are fast; the masked ones only run (via ``cond``)
    when the plain result shows a NaN or infinity. The barrier keeps XLA from fusing
    the min and max into one multi-output loop, which XLA:CPU runs several times slower.
    """
    value = (lambda x: x) if signed else jnp.abs
    hi = jnp.max(value(x), axis=1)
    x2, hi = lax.optimization_barrier((x, hi))
    lo = jnp.min(value(x2), axis=1)

    def masked(x):
        v = value(x)
        finite = jnp.isfinite(v)
        return (
            jnp.min(jnp.where(finite, v, jnp.inf), axis=1),
            jnp.max(jnp.where(finite, v, -jnp.inf), axis=1),
        )

    ok = jnp.all(jnp.isfinite(lo)) & jnp.all(jnp.isfinite(hi))
    return lax.cond(ok, lambda x: (lo, hi), masked, x2)


def _bin_batch(x: jax.Array, exponent: jax.Array, nb: int, signed: bool) -> jax.Array:
    """int32 ``(C, nb + 1)``: each row's counts at range ``2**exponent[c]``; column ``nb``
    counts the row's non-finite values.

    One flat ``bincount`` of ``row * (nb + 1) + bin`` per chunk; chunks (of rows when
    there are many, else of columns) are independent scatters that XLA:CPU runs
    concurrently.
    """
    rows, size = x.shape
    n = nb // 2 if signed else nb
    scale = pow2(_log2(n) - exponent)[:, None]  # n / R, a power of two: |x| * scale is exact

    def ids(xc, sc):
        k = jnp.maximum(jnp.ceil(jnp.abs(xc) * sc) - 1.0, 0.0).astype(jnp.int32)
        if signed:  # subnormals count as zero whether or not the backend flushes them
            k = jnp.where(xc <= -_TINY, n - 1 - k, n + k)
        k = jnp.where(jnp.isfinite(xc), k, nb)
        return (k + jnp.arange(xc.shape[0], dtype=jnp.int32)[:, None] * (nb + 1)).reshape(-1)

    chunks = int(min(_MAX_CHUNKS, max(1, rows * size // _CHUNK)))
    if rows >= chunks:
        bounds = np.linspace(0, rows, chunks + 1).astype(int)
        parts = [
            jnp.bincount(ids(x[a:b], scale[a:b]), length=(b - a) * (nb + 1)).reshape(b - a, nb + 1)
            for a, b in itertools.pairwise(bounds)
        ]
        return jnp.concatenate(parts, axis=0)
    bounds = np.linspace(0, size, chunks + 1).astype(int)
    total = jnp.zeros((rows * (nb + 1),), jnp.int32)
    for a, b in itertools.pairwise(bounds):
        total = total + jnp.bincount(ids(x[:, a:b], scale), length=rows * (nb + 1))
    return total.reshape(rows, nb + 1)
