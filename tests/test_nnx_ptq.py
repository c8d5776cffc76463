"""Post-training methods on NNX models (``qatjax.nnx.ptq``): bit for bit the linen tools'
results on the same model written in linen, and served by the NNX front end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qatjax
import qatjax.nnx as qnnx
from qatjax import QatConfig
from qatjax.flax import ptq, quant_mode, quantize_model

W8A8 = QatConfig(activation_estimator="minmax", activation_observer="minmax")
W4 = QatConfig(weight_format="int4", activation_format=None, weight_granularity="per_group",
               weight_group_size=4)


class NnxHeads(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q, self.k, self.v = (nnx.Linear(12, 16, rngs=rngs) for _ in range(3))

    def __call__(self, h):
        return nn.relu(self.q(h) * self.k(h) + self.v(h))


class NnxBlock(nnx.Module):
    """LayerNorm -> query / key / value (one input, in a submodule) -> output."""

    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(12, rngs=rngs)
        self.heads = NnxHeads(rngs)
        self.out = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.out(self.heads(self.ln(x)))


class LinenHeads(nn.Module):
    @nn.compact
    def __call__(self, h):
        q, k, v = (nn.Dense(16, name=n)(h) for n in ("q", "k", "v"))
        return nn.relu(q * k + v)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = LinenHeads(name="heads")(nn.LayerNorm(name="ln")(x))
        return nn.Dense(8, name="out")(h)


def _batches():
    scale = jnp.linspace(0.2, 8.0, 12)  # outlier channels
    return [jax.random.normal(jax.random.key(i), (32, 12)) * scale + 0.5 for i in range(3)]


def _pair(config):
    """(NNX model, linen model, its variables) with the same weights and recipe."""
    model = qnnx.quantize_model(NnxBlock(nnx.Rngs(0)), config)
    params = qnnx.collections(model)["params"]
    return model, quantize_model(LinenBlock(), config), {"params": params}


def _assert_same(nnx_model, linen_variables, cols=("params", "quant_params", "quant_stats")):
    """Every entry of the linen result's ``cols`` is in the NNX model, equal bit for bit (the
    NNX drop-ins also hold their descriptors from construction)."""
    got = qnnx.collections(nnx_model)
    for col in cols:
        for path, want in jax.tree_util.tree_flatten_with_path(linen_variables.get(col, {}))[0]:
            node = got[col]
            for key in path:
                node = node[key.key] if hasattr(key, "key") else getattr(node, key.name)
            np.testing.assert_array_equal(node, want, err_msg=f"{col}{jax.tree_util.keystr(path)}")


def test_smoothquant_with_a_layernorm_fold_and_awq_equal_linen():
    batches = _batches()
    model, lmodel, v = _pair(W8A8)
    fold = {"heads/q": "ln", "heads/k": "ln", "heads/v": "ln"}
    qnnx.ptq.smoothquant(model, batches, alpha=0.8, layers="heads/.", fold=fold)
    expected = ptq.smoothquant(lmodel, v, batches, alpha=0.8, layers="heads/.", fold=fold)
    assert not np.array_equal(expected["params"]["ln"]["scale"], v["params"]["ln"]["scale"])
    _assert_same(model, expected)
    # Then calibrate natively, and serve as the linen model does.
    qnnx.calibrate(model, batches)
    expected = qatjax.calibrate(lmodel, expected, batches)
    with quant_mode("infer"):
        np.testing.assert_array_equal(model(batches[0]), lmodel.apply(expected, batches[0]))

    model, lmodel, v = _pair(W4)
    qnnx.ptq.awq(model, batches)  # the query / key / value group gets one shared factor
    expected = ptq.awq(lmodel, v, batches)
    _assert_same(model, expected)
    s = qnnx.collections(model)["quant_params"]
    np.testing.assert_array_equal(s["heads"]["q"]["input_smoothing"],
                                  s["heads"]["v"]["input_smoothing"])


def test_gptq_codes_and_sensitivity_equal_linen_and_serve():
    batches = _batches()
    model, lmodel, v = _pair(W4)
    groups = qnnx.ptq.input_groups(model, batches[0])
    assert [(i.path, i.group) for i in groups] == [("heads/q", 0), ("heads/k", 0), ("heads/v", 0),
                                                   ("out", 1)]
    qnnx.calibrate(model, batches)  # weight descriptors (no activations to observe)
    v = qatjax.finalize(lmodel, v, batches[0])
    sens = qnnx.ptq.layer_sensitivity(model, batches[0])
    expected = ptq.layer_sensitivity(lmodel, v, batches[0])
    assert [(s.path, s.model_error) for s in sens] == [(s.path, s.model_error) for s in expected]
    assert all(s.model_error > 0 for s in sens)
    qnnx.ptq.gptq(model, batches, act_order=True)
    expected = ptq.gptq(lmodel, v, batches, act_order=True)
    _assert_same(model, expected, cols=("params", "quant_params"))
    assert "kernel_codes" in qnnx.collections(model)["quant_params"]["heads"]["q"]
    with quant_mode("infer"):
        np.testing.assert_array_equal(model(batches[1]), lmodel.apply(expected, batches[1]))


def test_bad_models_are_refused():
    with pytest.raises(TypeError, match="`model`"):
        qnnx.ptq.smoothquant(LinenBlock(), _batches())
    with pytest.raises(ValueError, match="no qatjax layers"):
        qnnx.ptq.gptq(NnxBlock(nnx.Rngs(0)), _batches())


def test_mixed_precision_and_a_recipe_on_a_float_nnx_model_equal_linen():
    batches = _batches()
    float_model = NnxBlock(nnx.Rngs(0))
    params = {"params": qnnx.collections(float_model)["params"]}
    w8 = QatConfig(activation_format=None)
    candidates = {"int8": w8, "int4": W4}
    plan, table = qnnx.ptq.mixed_precision(float_model, batches, candidates, budget_bits=6.0)
    expected, expected_table = ptq.mixed_precision(LinenBlock(), params["params"], batches,
                                                   candidates, budget_bits=6.0)
    assert plan.assignment == expected.assignment and plan.avg_bits <= 6.0
    assert {n: [r.model_error for r in rows] for n, rows in table.items()} == \
        {n: [r.model_error for r in rows] for n, rows in expected_table.items()}
    assert not any(isinstance(m, qnnx.QatLinear) for _, m in nnx.iter_graph(float_model))

    recipe = ptq.PTQRecipe(config=W8A8.replace(weight_format="int4"), awq={"n_grid": 5},
                           gptq={"act_order": True}, rules=plan.rules())
    model = qnnx.ptq.run_ptq(float_model, batches, recipe)
    lmodel, lvars = ptq.run_ptq(LinenBlock(), params["params"], batches, recipe)
    _assert_same(model, lvars)
    with quant_mode("infer"):
        np.testing.assert_array_equal(model(batches[2]), lmodel.apply(lvars, batches[2]))


def test_gptq_with_static_activations_inside_intercepted_modules_equals_linen():
    """The tools' own statistics (the Hessian's X^T X) and the drop-ins' contractions run
    outside the enclosing module's quantize_model frame: with static activations that frame
    would otherwise treat them as the model's contractions (an observer of its own; on NNX, a
    mutation from inside a trace)."""
    batches = _batches()
    config = W4.replace(activation_format="int8", activation_estimator="minmax",
                        activation_observer="minmax")
    model, lmodel, v = _pair(config)
    qnnx.calibrate(model, batches)
    v = qatjax.calibrate(lmodel, v, batches)
    assert [s.model_error for s in qnnx.ptq.layer_sensitivity(model, batches[0])] == \
        [s.model_error for s in ptq.layer_sensitivity(lmodel, v, batches[0])]
    qnnx.ptq.gptq(model, batches)
    expected = ptq.gptq(lmodel, v, batches)
    _assert_same(model, expected, cols=("params", "quant_params"))
