"""The PTQ model tools (qatjax.flax.ptq): SmoothQuant, AWQ, GPTQ, statistics, sensitivity and
mixed precision on tiny linen models, against numpy references written here."""

from __future__ import annotations

import itertools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import qatjax
from qatjax import QatConfig
from qatjax import ptq as core
from qatjax.export import load_safetensors, save_safetensors
from qatjax.flax import ptq, quant_mode, quantize_model

D_IN, D_QK, D_UP, D_OUT = 16, 8, 32, 8
MINMAX = QatConfig(activation_observer="minmax", activation_estimator="minmax")


class Toy(nn.Module):
    """q, k and up read the input x (one group); down reads gelu(up)."""

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(D_QK, name="q")(x)
        k = nn.Dense(D_QK, name="k")(x)
        h = nn.gelu(nn.Dense(D_UP, name="up")(x))
        return nn.Dense(D_OUT, name="down")(h) + q * k


class PreLN(nn.Module):
    """A LayerNorm whose output only the Dense layers read (foldable), or also the residual."""

    residual: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="ln")(x)
        out = nn.Dense(D_IN, name="q")(y) + nn.Dense(D_IN, name="k")(y)
        return out + y if self.residual else out + x


def _data(seed=0, n=3, rows=8, outlier=True, grid=False):
    rng = np.random.default_rng(seed)
    scale = np.where(np.arange(D_IN) == 3, 16.0, 1.0) if outlier else 1.0
    out = []
    for _ in range(n):
        x = rng.normal(size=(rows, 4, D_IN)) * scale
        if grid:  # multiples of 1/4 below 32: x^T x is exact in float32
            x = np.clip(np.round(x * 4), -127, 127) / 4
        out.append(x.astype(np.float32))
    return out


def _params(model, x):
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    return jax.tree_util.tree_map(np.asarray, params)


def _apply(model, v, x, mode):
    with quant_mode(mode):
        y, _ = model.apply(v, x, mutable=["quant_stats"])
    return np.asarray(y)


def test_smoothquant_float_unchanged_scales_and_served_exactly(tmp_path):
    model = Toy()
    batches = _data()
    params = _params(model, batches[0])
    qm = quantize_model(model, MINMAX)
    v = ptq.smoothquant(qm, {"params": params}, batches, alpha=0.5, power_of_two=True)
    # Independent reference: s = 2^round(log2(max|x|^a / max_i max|W_i[j]|^(1-a))) over q, k, up.
    ax = np.max(np.abs(np.concatenate(batches).reshape(-1, D_IN)), axis=0)
    aw = np.max(np.stack([np.abs(params[n]["kernel"]).max(1) for n in ("q", "k", "up")]), axis=0)
    s_ref = 2.0 ** np.round(np.log2(np.sqrt(ax) / np.sqrt(aw)))
    for name in ("q", "k", "up"):  # one shared factor for the layers reading x
        np.testing.assert_allclose(np.asarray(v["quant_params"][name]["input_smoothing"]), s_ref,
                                   rtol=0)
        np.testing.assert_array_equal(np.asarray(v["params"][name]["kernel"]),
                                      params[name]["kernel"] * s_ref[:, None].astype(np.float32))
    assert not np.allclose(s_ref, 1.0)
    # Power-of-two factors: the float function is unchanged bit for bit.
    x = batches[0]
    np.testing.assert_array_equal(_apply(qm, v, x, "float"), np.asarray(model.apply({"params": params}, x)))
    # Calibrated on the smoothed inputs; infer on converted variables, after a safetensors
    # round trip too, equals train mode bit for bit.
    v = qatjax.calibrate(qm, v, batches)
    train = _apply(qm, v, x, "train")
    served = qatjax.convert(v)
    assert "input_smoothing" in served["quant_params"]["q"]
    np.testing.assert_array_equal(_apply(qm, served, x, "infer"), train)
    path = os.path.join(tmp_path, "m.safetensors")
    save_safetensors(path, v)
    np.testing.assert_array_equal(_apply(qm, load_safetensors(path), x, "infer"), train)


def test_layernorm_fold_exact_when_valid_refused_through_a_residual():
    batches = _data(n=2)
    for residual in (False, True):
        model = PreLN(residual)
        params = _params(model, batches[0])
        qm = quantize_model(model, MINMAX)
        fold = {"q": "ln", "k": "ln"}
        if residual:
            with pytest.raises(ValueError, match="residual"):
                ptq.smoothquant(qm, {"params": params}, batches, alpha=0.8, fold=fold)
            continue
        v = ptq.smoothquant(qm, {"params": params}, batches, alpha=0.8, fold=fold)
        assert "input_smoothing" not in v.get("quant_params", {}).get("q", {})
        y_ref = np.asarray(model.apply({"params": params}, batches[0]))
        np.testing.assert_allclose(_apply(qm, v, batches[0], "float"), y_ref, rtol=1e-5, atol=1e-5)
        assert not np.allclose(np.asarray(v["params"]["ln"]["scale"]), params["ln"]["scale"])


def _numpy_hessian(batches):
    x = np.concatenate(batches).reshape(-1, D_IN).astype(np.float64)
    return (2 * x.T @ x).astype(np.float32)


@pytest.mark.parametrize("learnable", [False, True])
def test_gptq_codes_are_what_convert_and_export_serve(learnable):
    batches = _data(grid=True)
    model = Toy()
    params = _params(model, batches[0])
    cfg = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_group",
                    weight_group_size=8, learnable_scales=learnable)
    recipe = ptq.PTQRecipe(cfg, gptq={"layers": "q|k|up", "act_order": True, "block_size": 4})
    qm, v = ptq.run_ptq(model, params, batches, recipe)
    h = _numpy_hessian(batches)
    served = qatjax.convert(v)
    exported = qatjax.quantize_model_weights(v, pack=False)
    for name in ("q", "k", "up"):
        ref = core.gptq(params[name]["kernel"], h, cfg.weight_quantizer(), block_size=4,
                        act_order=True)
        codes = np.asarray(served["quant_params"][name]["kernel_codes"])  # weight-only: [K, N]
        np.testing.assert_array_equal(codes, np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(exported["layers"][name]["codes"]), np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(served["quant_params"][name]["kernel_scale"]),
                                      np.asarray(ref.qparams.scale)[:, 0, :])
    # The other layer keeps round to nearest; the served output is the dequantized GPTQ kernel's.
    x = batches[0]
    w_hat = {n: np.asarray(qatjax.dequantize_weights(exported)[n]["kernel"]) for n in ("q", "k", "up", "down")}
    b = {n: params[n]["bias"] for n in w_hat}
    q, k = x @ w_hat["q"] + b["q"], x @ w_hat["k"] + b["k"]
    h_ = np.asarray(nn.gelu(jnp.asarray(x @ w_hat["up"] + b["up"])))
    ref_y = h_ @ w_hat["down"] + b["down"] + q * k
    np.testing.assert_allclose(_apply(qm, served, x, "infer"), ref_y, rtol=2e-5, atol=2e-5)


def test_awq_reduces_output_error_against_round_to_nearest():
    batches = _data(seed=2)
    model = Toy()
    params = _params(model, batches[0])
    # Make the outlier channel matter: small weights on it (AWQ's salient channels).
    for n in ("q", "k", "up"):
        params[n]["kernel"] = params[n]["kernel"].copy()
        params[n]["kernel"][3] *= 0.05
    cfg = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_channel")
    qm = quantize_model(model, cfg)
    y_f = np.asarray(model.apply({"params": params}, batches[0]))

    def error(v):
        y = _apply(qm, qatjax.convert(qatjax.finalize(qm, v, batches[0])), batches[0], "infer")
        return np.linalg.norm(y - y_f) / np.linalg.norm(y_f)

    rtn = error({"params": params})
    scaled = ptq.awq(qm, {"params": params}, batches, clip=False)
    clipped = ptq.awq(qm, {"params": params}, batches, clip=True)
    assert error(scaled) < rtn
    assert error(clipped) < rtn
    assert not np.allclose(np.asarray(scaled["quant_params"]["q"]["input_smoothing"]), 1.0)


def test_statistics_on_8_devices_equal_one_device_and_numpy():
    assert len(jax.devices()) >= 8
    batches = _data(seed=3, rows=8)
    model = Toy()
    params = _params(model, batches[0])
    qm = quantize_model(model, MINMAX)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    eight = ptq.collect_input_stats(qm, {"params": params}, batches, mesh=mesh)["quant_stats"]
    # Each device adds its block (one example) of every batch as an addend of the exact sums:
    # one device seeing those blocks as batches holds the same bits.
    blocks = [b[i:i + 1] for b in batches for i in range(8)]
    one = ptq.collect_input_stats(qm, {"params": params}, blocks)["quant_stats"]
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(eight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(eight)
    x = np.concatenate(batches).reshape(-1, D_IN).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(one["q"]["input_absmax"].amax),
                                  np.abs(x).max(0).astype(np.float32))
    np.testing.assert_allclose(np.asarray(qatjax.calibration.mean_abs(one["k"]["input_mean_abs"])),
                               np.abs(x).mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qatjax.calibration.hessian_matrix(one["up"]["input_hessian"])),
                               2 * x.T @ x, rtol=1e-5, atol=1e-4)
    assert one["down"]["input_hessian"].xtx.top.shape == (D_UP, D_UP)


def test_layer_sensitivity_matches_a_model_with_only_that_layer_quantized():
    batches = _data(seed=4, n=2)
    model = Toy()
    params = _params(model, batches[0])
    cfg = MINMAX.replace(weight_format="int4")
    qm = quantize_model(model, cfg)
    v = qatjax.calibrate(qm, {"params": params}, batches)
    rows = ptq.layer_sensitivity(qm, v, batches[0], metric="relative")
    assert [r.path for r in rows] == ["q", "k", "up", "down"]
    y_f = np.asarray(model.apply({"params": params}, batches[0]))
    for r in rows[1:3]:
        only = quantize_model(model, None, rules=[(r.path, cfg)])
        vo = qatjax.calibrate(only, {"params": params}, batches)
        y = _apply(only, vo, batches[0], "train")
        np.testing.assert_allclose(r.model_error, np.linalg.norm(y - y_f) / np.linalg.norm(y_f),
                                   rtol=1e-4)
        assert r.own_error is not None and r.own_error > 0


def test_mixed_precision_search_is_optimal_under_its_budget_and_round_trips():
    rng = np.random.default_rng(5)
    paths = [f"block{i}/dense" for i in range(7)]
    sizes = dict(zip(paths, rng.integers(1, 5, size=7) * 64))
    cands = {"int4": QatConfig(weight_format="int4", activation_format=None),
             "int8": QatConfig(weight_format="int8", activation_format=None),
             "float": None}
    errors = {"int4": {p: float(rng.uniform(0.1, 1)) for p in paths},
              "int8": {p: float(rng.uniform(0.0, 0.1)) for p in paths},
              "float": {p: 0.0 for p in paths}}
    bits = {"int4": 4, "int8": 8, "float": 32}
    total = sum(sizes.values())
    for budget in (4.0, 5.0, 6.5, 12.0):
        plan = ptq.search_mixed_precision(errors, sizes, cands, budget_bits=budget)
        best = min((sum(errors[c][p] for p, c in zip(paths, combo)), combo)
                   for combo in itertools.product(cands, repeat=len(paths))
                   if sum(bits[c] * sizes[p] for p, c in zip(paths, combo)) <= budget * total)
        assert plan.avg_bits <= budget + 1e-9
        np.testing.assert_allclose(plan.objective, best[0], rtol=1e-12)
        np.testing.assert_allclose(sum(errors[c][p] for p, c in plan.assignment), plan.objective)
    with pytest.raises(ValueError, match="no assignment"):
        ptq.search_mixed_precision(errors, sizes, cands, budget_bits=3.0)
    recipe = ptq.PTQRecipe.from_yaml(plan.to_yaml())
    assert list(recipe.rules) == plan.rules()
    assert all(re.fullmatch(p, path) for (p, _), path in zip(plan.rules(), paths))


def test_mixed_precision_rules_drive_quantize_model_and_recipes_validate():
    batches = _data(seed=6, n=2)
    model = Toy()
    params = _params(model, batches[0])
    w8 = QatConfig(weight_format="int8", activation_format=None)
    w4 = w8.replace(weight_format="int4")
    plan, table = ptq.mixed_precision(model, params, batches, {"int8": w8, "int4": w4},
                                      budget_bits=5.0)
    sizes = {"q": D_IN * D_QK, "k": D_IN * D_QK, "up": D_IN * D_UP, "down": D_UP * D_OUT}
    assert plan.avg_bits <= 5.0
    assert set(table) == {"int8", "int4"} and all(len(t) == 4 for t in table.values())
    assert all(a.model_error <= b.model_error * 1.5 for a, b in zip(table["int8"], table["int4"]))
    qm = quantize_model(model, w8, rules=plan.rules())
    v = qatjax.finalize(qm, {"params": params}, batches[0])
    report = {r.path: r.weight_format for r in qatjax.quant_report(v).layers}
    assert report == {p: ("int4" if c == "int4" else "int8") for p, c in plan.assignment}
    avg = sum((4 if c == "int4" else 8) * sizes[p] for p, c in plan.assignment) / sum(sizes.values())
    np.testing.assert_allclose(plan.avg_bits, avg)
    with pytest.raises(ValueError, match="unknown `gptq` setting"):
        ptq.PTQRecipe(w8, gptq={"blocksize": 4})
    with pytest.raises(ValueError, match="unknown `gptq` setting"):  # code, not recipe data
        ptq.PTQRecipe(w8, gptq={"row_mask": _mask})
    assert ptq.PTQRecipe(w8, gptq={"sequential": True, "scale_search": "hessian_mse",
                                   "percdamp": [0.01, 0.1]}).gptq["sequential"]
    r = ptq.PTQRecipe.from_yaml("quant: {weight_format: int4, activation_format: null}\n"
                                "ptq: {smoothquant: {alpha: 0.7}, gptq: {}}\n")
    assert r.smoothquant == {"alpha": 0.7} and r.gptq == {} and r.awq is None
    assert ptq.PTQRecipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(TypeError, match="re-iterable"):
        ptq.gptq(qm, v, iter(batches))


def _mask(x):
    """``row_mask``: one value per row of the [rows, 4, features] inputs (0: left out)."""
    return x[..., 0] > 0


def test_row_mask_leaves_rows_out_of_statistics_gptq_and_searches():
    batches = _data(seed=7, grid=True)
    model = Toy()
    params = _params(model, batches[0])
    qm = quantize_model(model, MINMAX)
    st = ptq.collect_input_stats(qm, {"params": params}, batches, row_mask=_mask)["quant_stats"]
    x = np.concatenate([b[b[..., 0] > 0] for b in batches]).astype(np.float64)  # kept rows
    assert 0 < len(x) < sum(b.shape[0] * b.shape[1] for b in batches)
    np.testing.assert_array_equal(np.asarray(st["q"]["input_absmax"].amax),
                                  np.abs(x).max(0).astype(np.float32))
    assert int(st["k"]["input_mean_abs"].num_rows) == len(x)
    np.testing.assert_allclose(np.asarray(qatjax.calibration.mean_abs(st["k"]["input_mean_abs"])),
                               np.abs(x).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(qatjax.calibration.hessian_matrix(st["up"]["input_hessian"])),
                                  (2 * x.T @ x).astype(np.float32))
    cfg = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_group",
                    weight_group_size=8)
    qm4 = quantize_model(model, cfg)
    v = ptq.gptq(qm4, {"params": params}, batches, layers="q", row_mask=_mask)
    ref = core.gptq(params["q"]["kernel"], (2 * x.T @ x).astype(np.float32), cfg.weight_quantizer())
    np.testing.assert_array_equal(np.asarray(qatjax.convert(v)["quant_params"]["q"]["kernel_codes"]),
                                  np.asarray(ref.codes))
    # The searches see the kept rows only: AWQ on the masked batches equals AWQ on batches of
    # the kept rows alone (one row per example).
    kept = [b[b[..., 0] > 0][:, None, :] for b in batches]
    a = ptq.awq(qm4, {"params": params}, batches, layers="q|k|up", row_mask=_mask)
    b = ptq.awq(qm4, {"params": params}, kept, layers="q|k|up")
    np.testing.assert_allclose(np.asarray(a["quant_params"]["q"]["input_smoothing"]),
                               np.asarray(b["quant_params"]["q"]["input_smoothing"]), rtol=1e-6)
    with pytest.raises(ValueError, match="row_mask: layer q reads"):
        ptq.collect_input_stats(qm, {"params": params}, batches, row_mask=lambda x: x[0, :, 0])


def _served_kernel(v, name):
    exported = qatjax.quantize_model_weights(v, pack=False)
    return np.asarray(qatjax.dequantize_weights(exported)[name]["kernel"])


def test_sequential_gptq_takes_each_hessian_from_the_quantized_prefix():
    batches = _data(seed=8)
    model = Toy()
    params = _params(model, batches[0])
    cfg = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_group",
                    weight_group_size=8)
    qm = quantize_model(model, cfg)
    v0 = qatjax.finalize(qm, {"params": params}, batches[0])
    seq = ptq.gptq(qm, v0, batches, act_order=True, sequential=True)
    one = ptq.gptq(qm, v0, batches, act_order=True)
    codes = lambda v, n: np.asarray(qatjax.convert(v)["quant_params"][n]["kernel_codes"])  # noqa: E731
    for name in ("q", "k", "up"):  # they read the model input: the same Hessian either way
        np.testing.assert_array_equal(codes(seq, name), codes(one, name))
    # down reads gelu(x W_hat_up + b): its Hessian from the model with up's GPTQ kernel.
    prefix = jax.tree_util.tree_map(lambda a: a, {"params": params})
    prefix["params"]["up"] = dict(params["up"], kernel=_served_kernel(seq, "up"))
    st = ptq.collect_input_stats(qm, prefix, batches, kinds=("hessian",), layers="down")
    h = qatjax.calibration.hessian_matrix(st["quant_stats"]["down"]["input_hessian"])
    ref = core.gptq(params["down"]["kernel"], h, cfg.weight_quantizer(), act_order=True)
    np.testing.assert_array_equal(codes(seq, "down"), np.asarray(ref.codes))
    assert not np.array_equal(codes(seq, "down"), codes(one, "down"))


def test_cross_validated_percdamp_picks_the_held_out_argmin():
    batches = _data(seed=9, grid=True, rows=2)  # 8 rows per batch, K = 16: rank-deficient
    model = Toy()
    params = _params(model, batches[0])
    cfg = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_channel")
    qm = quantize_model(model, cfg)
    grid = (0.001, 0.1, 10.0)
    report: dict = {}
    v = ptq.gptq(qm, {"params": params}, batches, layers="q|up", percdamp=grid, report=report)
    assert set(report) == {"q", "up"}
    hs = [(2 * b.reshape(-1, D_IN).astype(np.float64).T @ b.reshape(-1, D_IN)) for b in batches]
    for name in ("q", "up"):
        w = params[name]["kernel"].astype(np.float64)
        errors = []
        for lam in grid:
            err = 0.0
            for i, h_b in enumerate(hs):
                rest = sum(h for j, h in enumerate(hs) if j != i).astype(np.float32)
                res = core.gptq(params[name]["kernel"], rest, cfg.weight_quantizer(), percdamp=lam)
                d = w - (np.asarray(res.codes, np.float64) * np.asarray(res.qparams.scale, np.float64))
                err += 0.5 * np.sum(d * (h_b @ d))
            errors.append(err)
        assert report[name] == grid[int(np.argmin(errors))]
        ref = core.gptq(params[name]["kernel"], sum(hs).astype(np.float32), cfg.weight_quantizer(),
                        percdamp=report[name])
        np.testing.assert_array_equal(
            np.asarray(qatjax.convert(v)["quant_params"][name]["kernel_codes"]), np.asarray(ref.codes))
    with pytest.raises(ValueError, match="at least 2"):
        ptq.gptq(qm, {"params": params}, batches[:1], percdamp=grid)


def test_weight_sensitivity_serves_one_kernel_in_the_float_model():
    batches = _data(seed=10)
    model = Toy()
    params = _params(model, batches[0])
    cfg = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_group",
                    weight_group_size=8)
    qm, v = ptq.run_ptq(model, params, batches, ptq.PTQRecipe(cfg, gptq={"layers": "up"}))
    rows = ptq.weight_sensitivity(qm, {"params": params}, v, batches[0], metric="relative")
    assert [r.path for r in rows] == ["q", "k", "up", "down"]
    y_f = np.asarray(model.apply({"params": params}, batches[0]))
    for r in rows:
        p = dict(params)
        p[r.path] = dict(params[r.path], kernel=_served_kernel(v, r.path))
        y = np.asarray(model.apply({"params": p}, batches[0]))
        np.testing.assert_allclose(r.model_error, np.linalg.norm(y - y_f) / np.linalg.norm(y_f),
                                   rtol=1e-4)
        assert r.own_error > 0


def test_the_minilm_ptq_example_on_a_tiny_bert(tmp_path, capsys):
    """examples/minilm_ptq.py --tiny: one row per method on a small random-weight BERT,
    served; GPTQ beats round to nearest, the mixed plan keeps its budget, the plot is drawn."""
    import minilm_ptq  # examples/ is on sys.path (tests/conftest.py)

    r = minilm_ptq.main(["--tiny", "--plot", str(tmp_path / "ptq.png")])
    out = capsys.readouterr().out
    rows = {name: (mn, mean) for name, mn, mean, _ in r.rows}
    assert list(rows) == [
        "W8A8 static per-tensor", "+ SmoothQuant a=0.8, LN-output layers",
        "int4 g32 weight-only RTN", "int4 g32 weight-only GPTQ seq hmse",
        "int4 g32 weight-only AWQ", "mixed 5.00 b/w (2 int8/4 int4), SQ, RTN"]
    assert all(0.9 < mn <= mean <= 1.0 for mn, mean in rows.values())
    assert rows["int4 g32 weight-only GPTQ seq hmse"][0] > rows["int4 g32 weight-only RTN"][0]
    assert "budget 5.0: plan 5.000 bits/weight" in out
    assert (tmp_path / "ptq.png").stat().st_size > 0
