"""SmoothQuant, GPTQ and AWQ (qatjax.ptq) against numpy references written here.

GPTQ's reference is the unblocked algorithm in float64 (every remaining row updated after
each row, so the "current" weights a group's parameters come from are simply the
remaining rows): the blocked, lazily updated float32 implementation must give the same
codes.
"""

import numpy as np
import pytest

import qatjax
from qatjax import ptq
from qatjax.qdot import DotSpec, decode_weight, encode_weight, to_serving
from qatjax.quantizers import WeightQuantizer

EPS = np.float32(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- references


def np_qparams(w, fmt, symmetric, axis):
    """float32 min / max parameters of ``w`` reduced over ``axis`` (keepdims; None: all), as
    DESIGN.md defines them."""
    w = np.asarray(w, np.float32)
    keep = axis is not None
    lo = np.minimum(np.min(w, axis=axis, keepdims=keep), 0).astype(np.float32)
    hi = np.maximum(np.max(w, axis=axis, keepdims=keep), 0).astype(np.float32)
    if symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / np.float32(fmt.qmax), EPS).astype(np.float32)
        return scale, np.zeros_like(scale)
    scale = np.maximum((hi - lo) / np.float32(fmt.qmax - fmt.qmin), EPS).astype(np.float32)
    return scale, np.clip(fmt.qmin - np.round(lo / scale), fmt.qmin, fmt.qmax).astype(np.float32)


def np_quantize(w, scale, zp, fmt):
    """Codes (float) and dequantized values (float64) of float32 ``w``."""
    inv = (np.float32(1) / np.asarray(scale, np.float32)).astype(np.float32)
    q = np.clip(np.round(np.asarray(w, np.float32) * inv) + zp, fmt.qmin, fmt.qmax)
    return q, (q - zp) * np.asarray(scale, np.float64)


def np_fake_quant_kernel(w, fmt, symmetric, granularity, group=None, ranges=None):
    """Round-to-nearest served kernel ``[K, N]`` (float64) at a granularity; ``ranges`` (lo,
    hi) replaces the kernel's own min / max."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    split = w.reshape(k // group, group, n) if granularity == "per_group" else w
    axis = {"per_group": 1, "per_channel": 0, "per_tensor": None}[granularity]
    if ranges is None:
        scale, zp = np_qparams(split, fmt, symmetric, axis)
    else:
        scale, zp = np_qparams(np.stack(np.broadcast_arrays(*ranges)), fmt, symmetric, 0)
        scale, zp = scale[0], zp[0]
    return np_quantize(split, scale, zp, fmt)[1].reshape(k, n)


def np_searched_qparams(rows, fmt, symmetric, axis, search, row_weights):
    """Parameters ``[n]`` of ``rows [g, n]``: min / max (``search`` None) or GPTQ's range
    search ``(weighted, n_grid, max_shrink, norm)``: the shrink factor ``1 - i / n_grid`` with
    the smallest ``sum (weights *) |w - w_hat|**norm`` per column (per tensor: in all), the
    first on ties."""
    n = rows.shape[1]
    flat = lambda qp: [np.broadcast_to(a, (1, n))[0] for a in qp]  # noqa: E731
    if search is None:
        return flat(np_qparams(rows, fmt, symmetric, axis))
    weighted, n_grid, max_shrink, norm = search
    rows32 = rows.astype(np.float32)
    best = [np.full(n, np.inf), None, None]
    for i in range(int(max_shrink * n_grid)):
        p = np.float32(1.0 - i / n_grid)
        scale, zp = flat(np_qparams(rows32 * p, fmt, symmetric, axis))
        _, dq = np_quantize(rows32, scale, zp, fmt)
        err = np.abs(rows32.astype(np.float64) - dq) ** norm
        if weighted:
            err = err * row_weights[:, None]
        err = err.sum(0) if axis is not None else np.full(n, err.sum())
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = scale if best[1] is None else np.where(better, scale, best[1])
        best[2] = zp if best[2] is None else np.where(better, zp, best[2])
    return best[1], best[2]


def np_gptq(w, h, fmt, symmetric, granularity, group, act_order, percdamp=0.01,
            static_groups=False, search=None):
    """Unblocked GPTQ in float64: (codes [K, N], scales [G, N], zero points [G, N])."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    w_orig, diag = w.copy(), np.diag(h).copy()
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[perm], h[perm][:, perm]
    h += np.eye(k) * percdamp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    size = group if granularity == "per_group" else k
    axis = None if granularity == "per_tensor" else 0
    params, codes = {}, np.zeros((k, n))
    if static_groups:  # every group from the original kernel
        for g in range(k // size):
            rows = np.arange(g * size, (g + 1) * size)
            params[g] = np_searched_qparams(w_orig[rows], fmt, symmetric, axis, search, diag[rows])
    for j in range(k):
        g = perm[j] // size
        if g not in params:  # from the current weights of all the group's rows
            rows = [p for p in range(k) if perm[p] // size == g]
            params[g] = np_searched_qparams(w[rows], fmt, symmetric, axis, search,
                                            diag[perm[rows]])
        q, dq = np_quantize(w[j], *params[g], fmt)
        codes[perm[j]] = q
        w[j + 1:] -= np.outer(u[j, j + 1:], (w[j] - dq) / u[j, j])
    return codes, *(np.stack([params[g][i] for g in sorted(params)]) for i in (0, 1))


def output_error(x, w, w_hat):
    x = np.asarray(x, np.float64)
    return float(np.sum((x @ np.asarray(w, np.float64) - x @ np.asarray(w_hat, np.float64)) ** 2))


def correlated_inputs(seed, t, k, dead=()):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.standard_normal((t, k)) @ mix * rng.uniform(0.2, 3.0, k)).astype(np.float32)
    x[:, list(dead)] = 0.0
    return x


# ----------------------------------------------------------------------------- GPTQ

K, N, T = 48, 12, 160
GPTQ_RECIPES = {
    "int4_sym_group16": WeightQuantizer(qatjax.int4, "per_group", 16, True),
    "uint4_affine_channel": WeightQuantizer(qatjax.uint4, "per_channel", None, False),
    "int3_sym_tensor": WeightQuantizer(qatjax.IntFormat(3), "per_tensor", None, True),
}


@pytest.fixture(scope="module")
def gptq_problem():
    x = correlated_inputs(0, T, K, dead=(7,))
    w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    h = (2.0 * x.T.astype(np.float64) @ x).astype(np.float32)
    return x, w, h


def per_group_rows(a, shape):
    """Kernel-form parameters as ``[G, N]`` rows (per tensor: the scalar broadcast)."""
    a = np.asarray(a)
    return np.broadcast_to(a.reshape(-1, N) if a.ndim else a, shape)


@pytest.mark.parametrize("name", list(GPTQ_RECIPES))
def test_gptq_matches_the_unblocked_float64_reference(gptq_problem, name):
    """Blocks of 20 rows (K padded to 60; groups of 16 straddle blocks), with and without
    act-order: the same codes as the reference, parameters to float32 rounding, the output
    error below round-to-nearest's."""
    x, w, h = gptq_problem
    qz = GPTQ_RECIPES[name]
    rtn = np_fake_quant_kernel(w, qz.format, qz.symmetric, qz.granularity, qz.group_size)
    for act_order in (False, True):
        res = ptq.gptq(w, h, qz, block_size=20, act_order=act_order)
        codes, scales, zps = np_gptq(w, h, qz.format, qz.symmetric, qz.granularity, qz.group_size,
                                     act_order)
        assert res.codes.dtype == qz.format.storage_dtype and res.codes.shape == (K, N)
        np.testing.assert_array_equal(np.asarray(res.codes), codes)
        shape = {"per_group": (K // 16, 1, N), "per_channel": (1, N), "per_tensor": ()}[qz.granularity]
        assert res.qparams.scale.shape == res.qparams.zero_point.shape == shape
        np.testing.assert_allclose(per_group_rows(res.qparams.scale, scales.shape), scales, rtol=1e-6)
        np.testing.assert_array_equal(per_group_rows(res.qparams.zero_point, scales.shape), zps)
        w_hat = ((codes.reshape(len(scales), -1, N) - zps[:, None]) * scales[:, None]).reshape(K, N)
        assert np.all(w_hat[7] == 0)  # the dead input's row: its zero point
        gptq_err, rtn_err = output_error(x, w, w_hat), output_error(x, w, rtn)
        assert gptq_err < rtn_err, (act_order, gptq_err, rtn_err)
        assert np.isfinite(float(res.loss)) and float(res.loss) > 0


@pytest.mark.parametrize("name", list(GPTQ_RECIPES))
@pytest.mark.parametrize("static_groups,scale_search", [(True, "minmax"), (False, "mse"),
                                                        (True, "hessian_mse"), (False, "hessian_mse")])
def test_gptq_static_groups_and_scale_search_match_the_reference(gptq_problem, name,
                                                                 static_groups, scale_search):
    """The reference's ``--static-groups`` and its (H_jj-weighted) MSE range search: the same
    codes and parameters as the float64 reference, and an output error below round to
    nearest's."""
    x, w, h = gptq_problem
    qz = GPTQ_RECIPES[name]
    grid = (scale_search == "hessian_mse", 20, 0.8, 2.4)
    search = None if scale_search == "minmax" else grid
    res = ptq.gptq(w, h, qz, block_size=20, act_order=True, static_groups=static_groups,
                   scale_search=scale_search, n_grid=20, max_shrink=0.8, norm=2.4)
    codes, scales, zps = np_gptq(w, h, qz.format, qz.symmetric, qz.granularity, qz.group_size,
                                 True, static_groups=static_groups, search=search)
    np.testing.assert_array_equal(np.asarray(res.codes), codes)
    np.testing.assert_allclose(per_group_rows(res.qparams.scale, scales.shape), scales, rtol=1e-6)
    np.testing.assert_array_equal(per_group_rows(res.qparams.zero_point, scales.shape), zps)
    w_hat = ((codes.reshape(len(scales), -1, N) - zps[:, None]) * scales[:, None]).reshape(K, N)
    rtn = np_fake_quant_kernel(w, qz.format, qz.symmetric, qz.granularity, qz.group_size)
    assert output_error(x, w, w_hat) < output_error(x, w, rtn)


def test_gptq_codes_are_what_the_weight_path_serves(gptq_problem):
    """The dequantized GPTQ kernel with the frozen GPTQ parameters goes through
    qdot.encode_weight to exactly the GPTQ codes (no re-rounding), transposed for an integer
    contraction, with the serving form of the parameters."""
    _, w, h = gptq_problem
    qz = GPTQ_RECIPES["int4_sym_group16"]
    res = ptq.gptq(w, h, qz, block_size=20, act_order=True)
    spec = DotSpec(x_format=qatjax.int8, w_format=qatjax.int4, group_size=16)
    w_hat = decode_weight(np.asarray(res.codes).T, qatjax.QParams(
        to_serving(res.qparams.scale, spec), to_serving(res.qparams.zero_point, spec)), spec)
    codes, serving = encode_weight(w_hat, res.qparams, spec)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(res.codes).T)
    np.testing.assert_array_equal(np.asarray(serving.scale), np.asarray(res.qparams.scale)[:, 0, :].T)
    qz = GPTQ_RECIPES["uint4_affine_channel"]
    res = ptq.gptq(w, h, qz, block_size=20)
    spec = DotSpec(x_format=None, w_format=qatjax.uint4, w_symmetric=False)  # kernel layout
    w_hat = (np.asarray(res.codes, np.float32) - np.asarray(res.qparams.zero_point)) * np.asarray(
        res.qparams.scale)
    codes, serving = encode_weight(w_hat, res.qparams, spec)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(res.codes))
    np.testing.assert_array_equal(np.asarray(serving.zero_point), np.asarray(res.qparams.zero_point)[0])


def test_gptq_rejects_bad_arguments(gptq_problem):
    _, w, h = gptq_problem
    qz = GPTQ_RECIPES["int4_sym_group16"]
    with pytest.raises(ValueError, match="`hessian` must be a floating \\[48, 48\\]"):
        ptq.gptq(w, h[:10], qz)
    with pytest.raises(ValueError, match="`kernel` must be a 2-D floating array"):
        ptq.gptq(w[None], h, qz)
    with pytest.raises(ValueError, match="`quantizer.group_size` must be a positive divisor"):
        ptq.gptq(w, h, WeightQuantizer(qatjax.int4, "per_group", 20))
    with pytest.raises(TypeError, match="`quantizer.format` must be an integer format"):
        ptq.gptq(w, h, WeightQuantizer(qatjax.fp8_e4m3))
    with pytest.raises(ValueError, match="`block_size` must be a positive int"):
        ptq.gptq(w, h, qz, block_size=0)
    with pytest.raises(ValueError, match="`percdamp` must be a non-negative scalar"):
        ptq.gptq(w, h, qz, percdamp=-0.1)
    with pytest.raises(ValueError, match="`scale_search` must be one of"):
        ptq.gptq(w, h, qz, scale_search="l2")
    with pytest.raises(ValueError, match="`max_shrink` must be a float in \\(0, 1\\)"):
        ptq.gptq(w, h, qz, scale_search="mse", max_shrink=1.5)
    with pytest.raises(ValueError, match="`n_grid` must be a positive int"):
        ptq.gptq(w, h, qz, n_grid=0)
    with pytest.raises(TypeError, match="`static_groups` must be a bool"):
        ptq.gptq(w, h, qz, static_groups="yes")


# ----------------------------------------------------------------------------- SmoothQuant


def outlier_inputs(seed, t=96, k=32):
    """LayerNorm-like activations with a few outlier channels (range ~30 vs ~3)."""
    x = np.random.default_rng(seed).standard_normal((t, k)).astype(np.float32)
    x[:, [3, 17]] *= 30.0
    return x


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(5)
    return [(rng.standard_normal((32, n)) * 0.1).astype(np.float32) for n in (16, 16, 24)]


def test_smoothquant_scales_formula_and_sharing(qkv):
    x = outlier_inputs(0)
    ax = np.abs(x).max(0)
    ax[5] = 0.0  # a channel never active: s = 1
    aw = np.max([np.abs(w).max(1) for w in qkv], axis=0)
    for alpha in (0.5, 0.8):
        s = np.asarray(ptq.smoothquant_scales(ax, qkv, alpha))
        ref = np.where(ax > 0, ax.astype(np.float64) ** alpha / aw.astype(np.float64) ** (1 - alpha), 1.0)
        np.testing.assert_allclose(s, np.maximum(ref, 1e-5), rtol=2e-6)
    s2 = np.asarray(ptq.smoothquant_scales(ax, qkv, 0.5, power_of_two=True))
    np.testing.assert_array_equal(s2, 2.0 ** np.round(np.log2(s2)))
    assert np.all(np.abs(np.log2(s2) - np.log2(np.asarray(ptq.smoothquant_scales(ax, qkv, 0.5)))) <= 0.5 + 1e-6)


def test_smoothquant_leaves_the_float_function_unchanged_and_folds_exactly(qkv):
    x = outlier_inputs(1)
    rng = np.random.default_rng(2)
    gamma, beta = rng.uniform(0.5, 2, 32).astype(np.float32), rng.standard_normal(32).astype(np.float32)

    def layer_norm(v, g, b):
        mean = v.mean(-1, keepdims=True)
        return (v - mean) / np.sqrt(v.var(-1, keepdims=True) + np.float32(1e-5)) * g + b

    h = layer_norm(x, gamma, beta).astype(np.float32)
    ax = np.abs(h).max(0)
    for power_of_two in (False, True):
        s = np.asarray(ptq.smoothquant_scales(ax, qkv, 0.7, power_of_two=power_of_two))
        g2, b2 = (np.asarray(a) for a in ptq.fold_layernorm(gamma, beta, s))
        h2 = layer_norm(x, g2, b2).astype(np.float32)
        hs = np.asarray(ptq.smooth_input(h, s))
        for w in qkv:
            ws = np.asarray(ptq.smooth_kernel(w, s))
            y, y2 = h @ w, hs @ ws
            if power_of_two:  # every scaling exact: bit for bit
                np.testing.assert_array_equal(y2, y)
                np.testing.assert_array_equal(h2, h / s)
            else:
                np.testing.assert_allclose(y2, y, rtol=0, atol=2e-6 * np.abs(h) .max() * np.abs(w).sum(0).max())
                np.testing.assert_allclose(h2, h / s, rtol=1e-6, atol=1e-6 * np.abs(h / s).max())
    assert ptq.fold_layernorm(gamma, None, s)[1] is None


def test_smoothquant_search_minimises_the_quantized_output_error(qkv):
    x = outlier_inputs(3)
    ax = np.abs(x).max(0)
    alphas = (0.3, 0.5, 0.7, 0.9)
    wq = WeightQuantizer(qatjax.int8, "per_channel")
    res = ptq.smoothquant_search(x, qkv, ax, act_format=qatjax.int8, weight_quantizer=wq, alphas=alphas)

    def np_error(s):  # W8A8: per-tensor static x / s, per-channel s W
        xs = (x / s).astype(np.float32)
        sx, _ = np_qparams(xs, qatjax.int8, True, None)
        x_hat = np_quantize(xs, sx, 0, qatjax.int8)[1]
        return sum(float(np.sum((x_hat @ np_fake_quant_kernel(w * s[:, None], qatjax.int8, True,
                                                               "per_channel") - x @ w.astype(np.float64)) ** 2))
                   for w in qkv)

    for i, a in enumerate(alphas):
        np.testing.assert_allclose(float(res.errors[i]), np_error(np.asarray(ptq.smoothquant_scales(ax, qkv, a))),
                                   rtol=1e-3)
    assert float(res.alpha) == np.float32(alphas[int(np.argmin(res.errors))])
    np.testing.assert_allclose(np.asarray(res.scales), np.asarray(ptq.smoothquant_scales(ax, qkv, float(res.alpha))),
                               rtol=1e-6)
    assert float(np.min(res.errors)) < 0.5 * np_error(np.ones(32, np.float32))  # beats no smoothing


# ----------------------------------------------------------------------------- AWQ


def salient_problem(seed=7, t=128, k=64, n=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[:, :4] *= 12.0  # salient input channels
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w[rng.integers(0, k, 8), rng.integers(0, n, 8)] = 0.6  # outlier weights: clipping pays
    return x, w


AWQ_QUANTIZER = WeightQuantizer(qatjax.int4, "per_group", 16, True)


def test_awq_scales_reduce_the_output_error():
    x, w = salient_problem()
    m = np.abs(x).mean(0)
    res = ptq.awq_scales(x, w, m, AWQ_QUANTIZER, n_grid=10)
    alpha = float(res.alpha)
    s_ref = np.maximum(m.astype(np.float64) ** alpha, 1e-4)
    s_ref /= np.sqrt(s_ref.max() * s_ref.min())
    np.testing.assert_allclose(np.asarray(res.scales), s_ref, rtol=1e-5)
    s = np.asarray(res.scales)

    def np_error(s):  # weight-only: (x / s) Q(diag(s) W)
        w_hat = np_fake_quant_kernel(w * s[:, None], qatjax.int4, True, "per_group", 16)
        return float(np.sum(((x / s).astype(np.float64) @ w_hat - x @ w.astype(np.float64)) ** 2))

    none = np_error(np.ones_like(s))
    np.testing.assert_allclose(float(res.errors[0]), none, rtol=1e-4)  # alpha = 0: no scaling
    np.testing.assert_allclose(float(np.min(res.errors)), np_error(s), rtol=1e-4)
    assert np_error(s) < 0.8 * none and alpha > 0


@pytest.mark.parametrize("granularity", ["per_group", "per_channel"])
def test_awq_clip_search_and_clip_kernel(granularity):
    x, w = salient_problem(8)
    qz = WeightQuantizer(qatjax.int4, granularity, 16 if granularity == "per_group" else None, True)
    clip = ptq.awq_clip(x, w, qz, n_grid=10, max_shrink=0.5)
    ratios = 1.0 - np.arange(5) / 10
    k, n = w.shape
    g = 16 if granularity == "per_group" else k
    lo = w.reshape(k // g, g, n).min(1)
    hi = w.reshape(k // g, g, n).max(1)
    errs = []
    for r in ratios:  # each group's own partial output error
        delta = w - np_fake_quant_kernel(w, qatjax.int4, True, "per_group", g,
                                         ranges=(np.float32(r) * lo[:, None], np.float32(r) * hi[:, None]))
        parts = np.einsum("tgc,gcn->gtn", x.reshape(-1, k // g, g), delta.reshape(k // g, g, n))
        errs.append(np.sum(parts**2, axis=1))
    errs = np.stack(errs)
    chosen = np.asarray(clip.ratio).reshape(k // g, n)
    index = np.argmin(np.abs(ratios[:, None, None] - chosen), axis=0)
    np.testing.assert_allclose(chosen, ratios[index], rtol=1e-6)  # one of the candidates
    got = np.take_along_axis(errs, index[None], 0)[0]
    assert np.all(got <= errs.min(0) * (1 + 1e-4))  # the best of them
    assert np.any(chosen < 1.0)
    # The clipped kernel's own min / max parameters are the searched ranges.
    clipped = ptq.clip_kernel(w, clip, qz)
    qp = qz.qparams(clipped, (0,))
    np.testing.assert_array_equal(np.asarray(qp.scale),
                                  np.asarray(qatjax.qparams_from_minmax(clip.lo, clip.hi, qatjax.int4).scale))


def test_awq_and_smoothquant_reject_bad_arguments(qkv):
    x, w = salient_problem()
    with pytest.raises(ValueError, match="`x_mean_abs` must be a floating vector of the 64"):
        ptq.awq_scales(x, w, np.ones(3, np.float32), AWQ_QUANTIZER)
    with pytest.raises(ValueError, match="`x` must be a floating array \\[..., 64\\]"):
        ptq.awq_clip(x[:, :10], w, AWQ_QUANTIZER)
    with pytest.raises(ValueError, match="`max_shrink` must be a float in \\[0, 1\\)"):
        ptq.awq_clip(x, w, AWQ_QUANTIZER, max_shrink=1.0)
    with pytest.raises(ValueError, match="`kernels` must share their input channels"):
        ptq.smoothquant_scales(np.ones(32, np.float32), [qkv[0], w])
    with pytest.raises(ValueError, match="`alpha` must be a non-empty sequence of floats in \\[0.0, 1.0\\]"):
        ptq.smoothquant_scales(np.ones(32, np.float32), qkv, 1.5)
    with pytest.raises(ValueError, match="needs act_symmetric=False"):
        ptq.smoothquant_search(x[:, :32], qkv, np.ones(32, np.float32), act_format=qatjax.uint8,
                               weight_quantizer=WeightQuantizer(qatjax.int8))
