"""GPTQ (Frantar et al., ICLR 2023): integer codes of a kernel that minimise the layer's
output error on calibration inputs, by optimal-brain-quantization updates.

For a Dense kernel ``W [K, N]`` (input channels first, as flax) and calibration inputs
``X [tokens, K]`` with ``H = 2 X^T X`` (:func:`qatjax.calibration.hessian`): the input
channels (rows of ``W``) are quantized one at a time; the error of each row is spread
over the rows not yet quantized so as to minimise ``||X W - X W_hat||^2``:

1. dead inputs (``H_jj = 0``): ``H_jj = 1`` and ``W[j, :] = 0``;
2. dampening ``H += lambda I``, ``lambda = percdamp * mean(diag(H))``;
3. act-order (optional): rows in the order of decreasing ``diag(H)``;
4. ``U`` = the upper Cholesky factor of ``H^-1``;
5. blocks of ``block_size`` rows: for each row ``j``: ``q_j = quantize(W[j])`` with its
   group's parameters, ``e_j = (W[j] - dequantize(q_j)) / U_jj``,
   ``W[j+1:block_end] -= U[j, j+1:block_end]^T e_j``; after the block (lazy batch update)
   ``W[block_end:] -= U[block, block_end:]^T E_block``.

A group's parameters (``quantizer.qparams`` of its rows: absmax or min / max) are computed
when its first row is reached, from the *current* weights of all its rows: the rows of
the block already updated in place and, for rows past the block, the stored weights
minus the block's pending update -- exactly the weights of the unblocked algorithm at
that step (the reference implementation reads stale weights there). With act-order the
groups stay contiguous blocks of ``group_size`` input channels in the kernel's own order
(the layout :func:`qatjax.qdot.encode_weight` serves), each computed when the first of
its rows comes up in the activation order. Per channel and per tensor the parameters
come from the whole kernel (dead rows zeroed) before the first row.

Options of the parameters (the reference implementation's ``--static-groups`` and its
quantizer's ``mse=True``, also AutoGPTQ's):

* ``static_groups=True``: every group's parameters come from the *original* kernel (dead rows
  zeroed) before the first row, instead of from the current weights when the group starts.
* ``scale_search="mse"``: the range of each parameter set (a group's rows ``[g, N]``, per
  output channel; per channel the whole column, per tensor the whole kernel) is shrunk by
  the factor ``p_i = 1 - i / n_grid``, ``i = 0 .. floor(max_shrink * n_grid) - 1``
  (``quantizer.qparams(p_i * rows)``: ``p_i * absmax``, or ``p_i * min`` / ``p_i * max``),
  and the factor with the smallest ``sum_rows |w - dequantize(quantize(w))|**norm`` per
  output channel is kept (the first, i.e. the widest range, on ties); defaults
  ``n_grid=100, max_shrink=0.8, norm=2.4`` are the reference's.
  ``scale_search="hessian_mse"`` weights each row's error by its ``H_jj`` (the
  diagonal of the undampened Hessian, i.e. ``2 sum_t x_tj**2``: what the row's rounding
  error costs at the output when inputs are uncorrelated), so the search spends the range on
  the inputs that matter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax.fake_quant import dequantize, quantize
from qatjax.ptq._common import check_kernel, check_quantizer
from qatjax.qparams import QParams
from qatjax.quantizers import WeightQuantizer

__all__ = ["GPTQResult", "gptq"]


class GPTQResult(NamedTuple):
    """What :func:`gptq` returns: the codes to serve and their parameters.

    Attributes:
      codes: ``[K, N]`` codes in the kernel's layout, ``int8`` (signed formats) or ``uint8``.
      qparams: kernel-form parameters, exactly what ``quantizer.qparams`` would return in
        shape and dtype: per channel float32 scale and int32 zero point ``[1, N]``, per
        group ``[K // group_size, 1, N]`` (against the kernel split by
        :func:`qatjax.split_groups` on axis 0), per tensor scalars.
      loss: float32 scalar, ``sum_j ||W[j] - W_hat[j]||^2 / (2 U_jj^2)``: GPTQ's estimate of
        the increase of ``||X W - X W_hat||^2`` (in the units of ``H``).

    Serving: ``qdot.encode_weight(W_hat, qparams, spec)`` of the dequantized kernel
    ``W_hat = (codes - zero_point) * scale`` returns these codes (transposed to ``[N, K]``
    for a native integer contraction) with the serving form of ``qparams``, so a layer
    can store ``W_hat`` as its kernel with ``qparams`` frozen (never recomputed from
    ``W_hat``), or store ``jnp.transpose(codes, spec.serving_perm(2))`` with
    ``qdot.to_serving(qparams.scale, spec)`` and ``qdot.to_serving(qparams.zero_point, spec)``
    directly (``spec.group_size`` = ``quantizer.group_size`` when per group).
    """

    codes: jax.Array
    qparams: QParams
    loss: jax.Array


SCALE_SEARCHES = ("minmax", "mse", "hessian_mse")


def gptq(kernel: jax.Array, hessian: jax.Array, quantizer: WeightQuantizer, *,
         block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
         static_groups: bool = False, scale_search: str = "minmax", n_grid: int = 100,
         max_shrink: float = 0.8, norm: float = 2.4) -> GPTQResult:
    """GPTQ codes of a Dense kernel (see the module docstring for the algorithm).

    Jit-able; the work is one compiled program per shape and recipe (``lax.fori_loop`` over
    blocks and over the rows of a block): ``act_order`` and ``percdamp`` are data, so they
    do not recompile.

    Args:
      kernel: ``[K, N]`` floating kernel (input channels first, as ``flax.linen.Dense``);
        computed in float32.
      hessian: ``[K, K]`` float ``H = 2 X^T X`` of the layer's inputs
        (:func:`qatjax.calibration.hessian_matrix`; any positive multiple gives the same result).
      quantizer: the weight recipe: an integer format, symmetric or affine, per tensor, per
        channel (one scale per output channel) or per group (``group_size`` consecutive
        input channels per output channel; it must divide ``K``).
      block_size: rows per lazy batch update (``K`` is padded with dead rows to a multiple).
      percdamp: dampening, as a fraction of the mean of ``diag(H)`` (``>= 0``).
      act_order: quantize the rows in the order of decreasing ``diag(H)``.
      static_groups: all parameters from the original kernel, before the first row (see
        the module docstring); default: each group's from its current weights.
      scale_search: ``"minmax"`` (the quantizer's own parameters), ``"mse"`` or
        ``"hessian_mse"``: the range shrink factor with the smallest (``H_jj``-weighted)
        ``|w - w_hat|**norm`` error, per output channel of each group (module docstring).
      n_grid, max_shrink, norm: the search's grid (``p = 1 - i / n_grid`` for
        ``i < max_shrink * n_grid``) and error exponent; static.
    Returns:
      A :class:`GPTQResult`: codes ``[K, N]``, kernel-form parameters, the loss estimate.
    Raises:
      ValueError / TypeError: naming the argument, for bad shapes, recipes or values.
    """
    fn = "gptq"
    kernel = check_kernel(kernel, fn)
    k = kernel.shape[0]
    quantizer = check_quantizer(quantizer, k, fn)
    hessian = jnp.asarray(hessian)
    if hessian.shape != (k, k) or not jnp.issubdtype(hessian.dtype, jnp.floating):
        raise ValueError(f"{fn}: `hessian` must be a floating [{k}, {k}] array (the kernel has {k} "
                         f"input channels), got shape {hessian.shape}, dtype {hessian.dtype}.")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"{fn}: `block_size` must be a positive int, got {block_size!r}.")
    if not isinstance(act_order, (bool, np.bool_)):
        raise TypeError(f"{fn}: `act_order` must be a bool, got {act_order!r}.")
    if not isinstance(static_groups, (bool, np.bool_)):
        raise TypeError(f"{fn}: `static_groups` must be a bool, got {static_groups!r}.")
    if scale_search not in SCALE_SEARCHES:
        raise ValueError(f"{fn}: `scale_search` must be one of {SCALE_SEARCHES}, got {scale_search!r}.")
    if isinstance(n_grid, bool) or not isinstance(n_grid, (int, np.integer)) or n_grid < 1:
        raise ValueError(f"{fn}: `n_grid` must be a positive int, got {n_grid!r}.")
    if not isinstance(max_shrink, (int, float)) or not 0 < max_shrink < 1:
        raise ValueError(f"{fn}: `max_shrink` must be a float in (0, 1), got {max_shrink!r}.")
    if not isinstance(norm, (int, float)) or not norm > 0:
        raise ValueError(f"{fn}: `norm` must be a positive float, got {norm!r}.")
    percdamp = jnp.asarray(percdamp, jnp.float32)
    if percdamp.shape != () or (not isinstance(percdamp, jax.core.Tracer) and not percdamp >= 0):
        raise ValueError(f"{fn}: `percdamp` must be a non-negative scalar, got {percdamp}.")
    search = None
    if scale_search != "minmax":
        factors = tuple(1.0 - i / n_grid for i in range(max(1, int(max_shrink * n_grid))))
        search = (scale_search == "hessian_mse", factors, float(norm))
    return _gptq(kernel.astype(jnp.float32), hessian.astype(jnp.float32), percdamp,
                 jnp.asarray(act_order), quantizer=quantizer, block_size=min(int(block_size), k),
                 static_groups=bool(static_groups), search=search)


def _group_qparams(quantizer: WeightQuantizer, rows: jax.Array, search=None,
                   row_weights: jax.Array | None = None) -> QParams:
    """Parameters ``[N]`` of a group from its current rows ``[g, N]`` (per tensor: the
    whole kernel's scalars, broadcast). ``search``: None (min / max) or ``(weighted,
    factors, norm)``: the shrink factor of the range with the smallest
    ``sum_rows row_weights * |rows - w_hat|**norm`` (per column; per tensor in all)."""
    per_tensor = quantizer.granularity == "per_tensor"
    if not per_tensor:
        quantizer = dataclasses.replace(quantizer, granularity="per_channel", group_size=None)
    n = rows.shape[1]

    def flat(qp):
        return QParams(jnp.broadcast_to(jnp.reshape(qp.scale, (-1,)), (n,)),
                       jnp.broadcast_to(jnp.reshape(qp.zero_point, (-1,)), (n,)))

    if search is None:
        return flat(quantizer.qparams(rows, (0,)))
    weighted, factors, norm = search
    fmt = quantizer.format

    def candidate(best, p):
        qp = flat(quantizer.qparams(rows * p, (0,)))
        err = jnp.abs(rows - dequantize(quantize(rows, qp, fmt), qp)) ** norm
        if weighted:
            err = err * row_weights[:, None]
        err = jnp.sum(err, axis=0)
        if per_tensor:
            err = jnp.broadcast_to(jnp.sum(err), (n,))
        better = err < best[0]  # strict: the widest range wins ties
        return (jnp.where(better, err, best[0]), jnp.where(better, qp.scale, best[1]),
                jnp.where(better, qp.zero_point, best[2])), None

    init = (jnp.full((n,), jnp.inf, jnp.float32), jnp.ones((n,), jnp.float32),
            jnp.zeros((n,), jnp.int32))
    (_, scale, zero_point), _ = lax.scan(candidate, init, jnp.asarray(factors, jnp.float32))
    return QParams(scale, zero_point)


def _upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
    """``U`` upper triangular with ``U^T U = h^-1`` (``h`` symmetric positive definite),
    without forming ``h^-1``: with ``J`` the exchange matrix and ``J h J = M M^T`` (lower
    Cholesky), ``h = R R^T`` for the upper triangular ``R = J M J``, so ``U = R^-1 = J M^-1 J``
    (the Cholesky factor with a positive diagonal is unique)."""
    m = jnp.linalg.cholesky(h[::-1, ::-1])
    m_inv = jax.scipy.linalg.solve_triangular(m, jnp.eye(h.shape[0], dtype=h.dtype), lower=True)
    return m_inv[::-1, ::-1]


@functools.partial(jax.jit, static_argnames=("quantizer", "block_size", "static_groups",
                                             "search"))
def _gptq(w, h, percdamp, act_order, quantizer: WeightQuantizer, block_size: int,
          static_groups: bool = False, search=None) -> GPTQResult:
    k, n = w.shape
    fmt = quantizer.format
    hp = jax.lax.Precision.HIGHEST
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[:, None], 0.0, w)
    w_orig = w  # dead rows zeroed, kernel order
    perm = jnp.where(act_order, jnp.argsort(-jnp.diagonal(h), stable=True), jnp.arange(k))
    inv_perm = jnp.argsort(perm)
    row_weights = jnp.diagonal(h)[perm]  # H_jj of each (permuted) row, before dampening
    w = w[perm]
    h = h[perm][:, perm]
    h = h + jnp.eye(k, dtype=h.dtype) * (percdamp * jnp.mean(jnp.diagonal(h)))

    # Padding to whole blocks: dead rows (zero weights, identity Hessian) in a dummy group.
    b = block_size
    kp = -(-k // b) * b
    w = jnp.pad(w, ((0, kp - k), (0, 0)))
    h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag(jnp.arange(kp) >= k).astype(h.dtype)
    u = _upper_cholesky_of_inverse(h)

    group_size = quantizer.group_size if quantizer.granularity == "per_group" else k
    num_groups = k // group_size
    group_of = jnp.concatenate([perm // group_size, jnp.full((kp - k,), num_groups)])
    members = inv_perm.reshape(num_groups, group_size)  # positions of each group's rows
    scale = jnp.ones((num_groups + 1, n), jnp.float32)
    zero_point = jnp.zeros((num_groups + 1, n), jnp.int32)
    ready = jnp.arange(num_groups + 1) == num_groups
    if static_groups:  # every group from the original kernel, up front
        w_groups = w_orig.reshape(num_groups, group_size, n)
        diag_groups = row_weights[inv_perm].reshape(num_groups, group_size)
        qps = jax.vmap(lambda r, d: _group_qparams(quantizer, r, search, d))(w_groups, diag_groups)
        scale = scale.at[:num_groups].set(qps.scale)
        zero_point = zero_point.at[:num_groups].set(qps.zero_point)
        ready = jnp.ones_like(ready)
    rows_kp = jnp.arange(kp)

    def block(i_block, carry):
        w, codes, scale, zero_point, ready, loss = carry
        i1 = i_block * b
        w1 = lax.dynamic_slice_in_dim(w, i1, b, 0)
        u_rows = lax.dynamic_slice_in_dim(u, i1, b, 0)  # [b, kp]
        u1 = lax.dynamic_slice_in_dim(u_rows, i1, b, 1)  # [b, b]

        def new_group(g, w1, err1, scale, zero_point, ready):
            pos = members[g]
            in_block = (pos >= i1) & (pos < i1 + b)
            pending = jnp.matmul(u_rows[:, pos].T, err1, precision=hp)
            current = jnp.where(in_block[:, None], w1[jnp.clip(pos - i1, 0, b - 1)], w[pos] - pending)
            qp = _group_qparams(quantizer, current, search, row_weights[pos])
            return scale.at[g].set(qp.scale), zero_point.at[g].set(qp.zero_point), ready.at[g].set(True)

        def column(i, carry):
            w1, err1, q1, scale, zero_point, ready, loss = carry
            g = group_of[i1 + i]
            scale, zero_point, ready = lax.cond(
                ready[g], lambda *a: a[3:], new_group, g, w1, err1, scale, zero_point, ready)
            qp = QParams(scale[g], zero_point[g])
            row = w1[i]
            q = quantize(row, qp, fmt)
            delta = row - dequantize(q, qp)
            d = u1[i, i]
            e = delta / d
            # U is upper triangular: rows < i are untouched, row i is done (not read again).
            w1 = w1 - u1[i][:, None] * e[None, :]
            loss = loss + jnp.sum(delta * delta) / (2.0 * d * d)
            return w1, err1.at[i].set(e), q1.at[i].set(q), scale, zero_point, ready, loss

        err1 = jnp.zeros((b, n), jnp.float32)
        q1 = jnp.zeros((b, n), fmt.storage_dtype)
        w1, err1, q1, scale, zero_point, ready, loss = lax.fori_loop(
            0, b, column, (w1, err1, q1, scale, zero_point, ready, loss))
        codes = lax.dynamic_update_slice_in_dim(codes, q1, i1, 0)
        update = jnp.matmul(u_rows.T, err1, precision=hp)  # [kp, n]
        w = w - jnp.where((rows_kp >= i1 + b)[:, None], update, 0.0)
        return w, codes, scale, zero_point, ready, loss

    codes = jnp.zeros((kp, n), fmt.storage_dtype)
    _, codes, scale, zero_point, _, loss = lax.fori_loop(
        0, kp // b, block, (w, codes, scale, zero_point, ready, jnp.float32(0.0)))
    codes = codes[:k][inv_perm]
    scale, zero_point = scale[:num_groups], zero_point[:num_groups]
    if quantizer.granularity == "per_group":
        qp = QParams(scale[:, None, :], zero_point[:, None, :])
    elif quantizer.granularity == "per_channel":
        qp = QParams(scale, zero_point)
    else:
        qp = QParams(scale[0, 0], zero_point[0, 0])
    return GPTQResult(codes, qp, loss)
