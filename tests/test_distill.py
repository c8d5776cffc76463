"""Quantization-aware distillation (``qatjax.flax.distill``) and its MiniLM example
(``examples/minilm_qat.py``, on a small random-weight BERT: CI has no pretrained weights)."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import minilm  # examples/ is on sys.path (tests/conftest.py)
import minilm_qat
import numpy as np
import optax
import pytest

import qatjax
from qatjax import QatConfig
from qatjax.flax import (distiller, embedding_distance, logit_distance, ptq, quant_mode,
                         quantize_model)


# ----------------------------------------------------------------------------- losses
def _np_cos_distance(s, t):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    return 1.0 - np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))


def test_embedding_distance_is_the_hand_computed_cosine_distance_plus_mse():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 8))
    where = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    rows = where.astype(bool)
    cos = _np_cos_distance(s, t)[rows].mean()
    mse = np.mean((s - t) ** 2, -1)[rows].mean()
    np.testing.assert_allclose(embedding_distance(jnp.asarray(s, jnp.float32),
                                                  jnp.asarray(t, jnp.float32), where=where),
                               cos, rtol=1e-5)
    np.testing.assert_allclose(embedding_distance(jnp.asarray(s, jnp.float32),
                                                  jnp.asarray(t, jnp.float32),
                                                  mse_weight=0.5, where=where),
                               cos + 0.5 * mse, rtol=1e-5)
    # Without `where`: every row. Scaled copies are at distance 0.
    np.testing.assert_allclose(embedding_distance(s[0], t[0]), _np_cos_distance(s[0], t[0]).mean(),
                               rtol=1e-5)
    assert abs(float(embedding_distance(s[0], 3.0 * s[0]))) < 1e-6


def test_logit_distance_is_the_hand_computed_kl_divergence():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 6)) * 3, rng.normal(size=(4, 6)) * 3
    temperature = 2.0

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1)
    np.testing.assert_allclose(logit_distance(s, t, temperature=temperature),
                               kl.mean() * temperature ** 2, rtol=1e-5)
    where = np.array([True, False, True, True])
    np.testing.assert_allclose(logit_distance(s, t, temperature=temperature, where=where),
                               kl[where].mean() * temperature ** 2, rtol=1e-5)
    assert abs(float(logit_distance(t, t))) < 1e-6


def test_bad_arguments_are_named():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="`student`.*`teacher`"):
        embedding_distance(x, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="`temperature`"):
        logit_distance(x, x, temperature=0.0)
    with pytest.raises(TypeError, match="`model`"):
        distiller(lambda v, x: x, {"params": {}}, optax.adam(1e-3))
    with pytest.raises(ValueError, match="`teacher_variables`"):
        distiller(nn.Dense(2), {}, optax.adam(1e-3))
    with pytest.raises(TypeError, match="`optimizer`"):
        distiller(nn.Dense(2), {"params": {}}, 1e-3)


# ----------------------------------------------------------------------------- training
_W3 = QatConfig(weight_format="int3", activation_format=None, weight_symmetric=False,
                learnable_scales=True)
_TRAINABLE = lambda path, _: path != ("up", "bias")


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32, name="up")(x))
        return nn.Dense(16, name="out")(x)


@pytest.fixture(scope="module")
def mlp_run():
    """An MLP quantized to int3 weight-only LSQ (affine, per channel), distilled for 40 steps
    against its float self with ``up/bias`` frozen: (float params, variables before, after,
    distiller, state, held-out batch, losses)."""
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (256, 24))
    float_params = model.init(jax.random.key(1), x[:1])["params"]
    qmodel = quantize_model(model, _W3)
    start = qatjax.finalize(qmodel, {"params": float_params}, x[:1])
    dist = distiller(qmodel, {"params": float_params}, optax.adam(3e-4), trainable=_TRAINABLE)
    state = dist.init(start)
    losses = []
    for i in range(40):
        state, loss = dist.step(state, x[32 * (i % 6):32 * (i % 6 + 1)])
        losses.append(float(loss))
    return float_params, start, dist.variables(state), dist, state, x[192:], losses


def test_distillation_brings_the_student_closer_to_the_teacher(mlp_run):
    float_params, start, _, dist, state, held_out, losses = mlp_run
    before = float(dist.loss(dist.init(start), held_out))
    after = float(dist.loss(state, held_out))
    assert before > 1e-2
    assert after < 0.85 * before, (before, after)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    # The distance the loss reports is the served student's: cosine distance to the float
    # model's outputs on the held-out batch, through convert and the integer path.
    qmodel = quantize_model(_MLP(), _W3)
    with quant_mode("infer"):
        served = qmodel.apply(qatjax.convert(dist.variables(state)), held_out)
    ref = _MLP().apply({"params": float_params}, held_out)
    np.testing.assert_allclose(np.mean(minilm_qat.cosines(served, ref)), 1.0 - after, atol=1e-5)


def test_only_trainable_parameters_move_and_lsq_scales_are_learned(mlp_run):
    _, start, after, _, state, _, _ = mlp_run
    assert jax.tree_util.tree_structure(state.frozen["params"]) == \
        jax.tree_util.tree_structure({"up": {"bias": 0}})
    assert "bias" not in state.params["up"]
    np.testing.assert_array_equal(after["params"]["up"]["bias"], start["params"]["up"]["bias"])
    for layer in ("up", "out"):
        for name in ("kernel", "bias", "kernel_scale", "kernel_zero_point"):
            if (layer, name) != ("up", "bias"):
                assert not np.array_equal(after["params"][layer][name],
                                          start["params"][layer][name]), (layer, name)


def test_the_teacher_defaults_to_the_student_module_in_float_mode(mlp_run):
    """Without ``teacher``, the quantized model in float mode on the teacher's variables is
    the float model: the same loss as with the float module given explicitly."""
    float_params, _, _, dist, state, held_out, _ = mlp_run
    explicit = distiller(quantize_model(_MLP(), _W3), {"params": float_params}, optax.adam(3e-4),
                         teacher=_MLP(), trainable=_TRAINABLE)
    assert float(explicit.loss(state, held_out)) == float(dist.loss(state, held_out))


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_distillation_starts_from_a_rescaling_ptq_method_and_serves_what_it_trains(method):
    """W4A8 LSQ from SmoothQuant or AWQ's result: the layers' ``input_smoothing`` (frozen,
    in ``quant_params``) is carried through training, the start serves the method's model,
    the distance falls, and the trained model serves bit for bit what train mode computes."""
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (192, 24)) * jnp.linspace(0.2, 6.0, 24)  # outliers
    float_params = model.init(jax.random.key(1), x[:1])["params"]
    config = QatConfig(weight_format="int4", activation_format="int8", learnable_scales=True)
    qmodel = quantize_model(model, config)
    calib = [x[:64], x[64:128]]
    transform = {"smoothquant": lambda: ptq.smoothquant(qmodel, {"params": float_params}, calib,
                                                        alpha=0.8),
                 "awq": lambda: ptq.awq(qmodel, {"params": float_params}, calib)}[method]
    start = qatjax.calibrate(qmodel, transform(), calib)
    start.pop("quant_stats")
    smoothing = start["quant_params"]["up"]["input_smoothing"]
    assert not np.allclose(smoothing, 1.0)
    dist = distiller(qmodel, {"params": float_params}, optax.adam(3e-4))
    state = dist.init(start)
    held_out = x[128:]
    before = float(dist.loss(state, held_out))
    for i in range(16):
        state, _ = dist.step(state, x[32 * (i % 4):32 * (i % 4 + 1)])
    after = dist.variables(state)
    assert float(dist.loss(state, held_out)) < 0.95 * before
    np.testing.assert_array_equal(after["quant_params"]["up"]["input_smoothing"], smoothing)

    def served(variables, mode):
        with quant_mode(mode):
            return qmodel.apply(qatjax.convert(variables) if mode == "infer" else variables,
                                held_out)

    np.testing.assert_array_equal(served(after, "infer"), served(after, "train"))
    # Step 0 is the method's post-training model: the loss is its served distance.
    ref = model.apply({"params": float_params}, held_out)
    np.testing.assert_allclose(np.mean(minilm_qat.cosines(served(start, "infer"), ref)),
                               1.0 - before, atol=1e-5)


# ----------------------------------------------------------------------------- the example
TINY = minilm_qat.TINY  # 4 steps, checkpoints every 2


@pytest.fixture(scope="module")
def tiny():
    """The tiny random-weight BERT, its tokenizer, and the example's training data for it."""
    model, params, tok = minilm_qat.tiny_minilm()
    return model, params, tok, tok(minilm_qat.training_sentences(TINY.num_sentences))


def test_training_text_is_disjoint_from_calibration_and_evaluation():
    text = minilm_qat.training_sentences(600)
    assert len(set(text)) == 600
    assert not set(text) & set(minilm.SENTENCES)
    assert text[:50] == minilm_qat.training_sentences(50)  # deterministic for a seed
    with pytest.raises(ValueError, match="`n`"):
        minilm_qat.training_sentences(0)


def test_the_distillation_text_holds_docstrings_and_calibration_never_evaluation(tiny):
    _, _, tok, _ = tiny
    settings = dataclasses.replace(TINY, docstring_text=True, calibration_repeats=3)
    text = minilm_qat.training_text(settings, tok)
    docs = minilm_qat.docstring_sentences()
    assert len(docs) > 500 and all(5 <= len(d.split()) <= 20 for d in docs)
    assert not set(text) & set(minilm.EVALUATION_SENTENCES)
    assert all(len(tok.encode(t)) <= settings.max_tokens for t in text)
    kept_cal = [c for c in minilm.CALIBRATION_SENTENCES if len(tok.encode(c)) <= settings.max_tokens]
    assert kept_cal and all(text.count(c) == 3 for c in kept_cal)
    assert set(text) & set(docs)
    without = minilm_qat.training_text(TINY, tok)  # the tiny run: no docstrings, calibration once
    assert not set(without) & set(docs) and all(without.count(c) == 1 for c in kept_cal)


def test_resuming_a_checkpoint_reproduces_the_uninterrupted_run(tiny, tmp_path):
    """int4 per-channel weight-only LSQ: 4 steps at once, or 2 steps, a checkpoint, and 2 more
    from it: the same state and losses, bit for bit."""
    model, params, _, data = tiny
    variant = minilm_qat.RECIPES[1].variants[1]  # int4 per-channel affine
    qmodel, start = minilm_qat.lsq_start(model, variant)
    calib = [(data["input_ids"][:8], data["attention_mask"][:8])]
    dist = minilm_qat.make_distiller(qmodel, model, params, 4, TINY)
    init = dist.init(start(qmodel, params, calib))
    whole = minilm_qat.train(dist, init, data, 4, TINY, progress=False)
    path = str(tmp_path / "run.msgpack")
    part = minilm_qat.train(dist, init, data, 4, TINY, checkpoint=path, stop_after=2,
                            progress=False)
    assert int(part.state.step) == 2 and np.isnan(part.losses[2:]).all()
    resumed = minilm_qat.train(dist, init, data, 4, TINY, checkpoint=path, resume=True,
                               progress=False)
    assert int(resumed.state.step) == 4 and np.isfinite(resumed.losses).all()
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.state), jax.tree_util.tree_leaves(whole.state)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(whole.state.params["layer_0"]["output"]["kernel_scale"],
                              init.params["layer_0"]["output"]["kernel_scale"])
    with pytest.raises(ValueError, match="other settings"):
        minilm_qat.train(dist, init, data, 4, dataclasses.replace(TINY, seed=1), checkpoint=path,
                         resume=True, progress=False)


def test_the_example_end_to_end_on_a_tiny_bert(tiny, tmp_path, capsys):
    """W4A8 with one calibration variant: PTQ row, QAT from it, both served (convert, infer)
    and bit-identical to train mode, the table with the recovered fraction, plot, checkpoint."""
    model, params, tok, _ = tiny
    w4a8 = minilm_qat.RECIPES[0]
    minmax = w4a8.variants[0]  # "PTQ minmax", with the (cheaper to compile) min / max observer
    cheap = {"activation_observer": "minmax"}
    variant = dataclasses.replace(minmax, config=minmax.config.replace(**cheap),
                                  einsums=minmax.einsums.replace(**cheap))
    recipe = dataclasses.replace(w4a8, variants=(variant,))
    rows, runs = minilm_qat.run(model, params, tok, settings=TINY, recipes=[recipe],
                                out=str(tmp_path), progress=False)
    text = capsys.readouterr().out
    ptq, qat = rows
    assert (ptq.name, qat.name) == ("PTQ minmax", "QAT from minmax, 4 steps")
    assert ptq.infer_vs_train == 0.0 and qat.infer_vs_train == 0.0
    assert ptq.mean_cos < 0.999  # a gap to recover
    assert qat.mean_cos > ptq.mean_cos and qat.min_cos > ptq.min_cos  # held-out text
    recovered = f"{100 * minilm_qat.recovered(qat.min_cos, ptq.min_cos):7.1f}%"
    assert "recovered vs PTQ minmax" in text and recovered in text
    assert runs["w4a8"].losses.shape == (4,) and np.isfinite(runs["w4a8"].losses).all()
    assert os.path.isfile(tmp_path / "minilm_qat_w4a8.msgpack")
    assert os.path.getsize(tmp_path / "minilm_qat_loss.png") > 0
    assert "recovered" in (tmp_path / "minilm_qat_results.txt").read_text()


def test_the_example_starts_qat_from_gptq_codes(tiny):
    """``--from gptq``: the LSQ start converts to the codes GPTQ gives the plain quantized
    model (QAT continues from them), and the table has the GPTQ row and QAT from it, both
    served bit-identical to train mode."""
    model, params, tok, data = tiny
    w4 = minilm_qat.RECIPES[1]
    variant = w4.variants[0]  # int4 per-channel symmetric
    calib = [(data["input_ids"][i:i + 8], data["attention_mask"][i:i + 8]) for i in (0, 8)]
    qmodel, default_start = minilm_qat.lsq_start(model, variant)
    start = minilm_qat.method_start("gptq", variant, default_start)(qmodel, params, calib)
    plain = quantize_model(model, variant.config, rules=variant.rules)
    served = ptq.gptq(plain, qatjax.finalize(plain, {"params": params}, calib[0]), calib,
                      act_order=True, sequential=True, scale_search="hessian_mse")
    for layer in ("query", "value"):
        np.testing.assert_array_equal(
            qatjax.convert(start)["quant_params"]["layer_0"]["attention"][layer]["kernel_codes"],
            served["quant_params"]["layer_0"]["attention"][layer]["kernel_codes"])
    ev = tok(minilm.EVALUATION_SENTENCES[:8])
    eval_batch = (ev["input_ids"], ev["attention_mask"])
    float_emb = np.asarray(model.apply({"params": params}, *eval_batch))
    rows, _ = minilm_qat.run_recipe(model, params, dataclasses.replace(w4, variants=(variant,)),
                                    calib, data, eval_batch, float_emb,
                                    dataclasses.replace(TINY, steps=(("w4", 2),)), method="gptq",
                                    start=lambda *_: start, progress=False)  # GPTQ ran above
    assert [r.name for r in rows] == ["PTQ minmax symmetric", "PTQ gptq + minmax symmetric",
                                      "QAT from gptq + minmax symmetric, 2 steps"]
    assert all(r.infer_vs_train == 0.0 for r in rows)
    with pytest.raises(ValueError, match="weight-only"):
        minilm_qat.method_start("smoothquant", variant, default_start)
    with pytest.raises(ValueError, match="`method`"):
        minilm_qat.method_start("hqq", variant, default_start)


def test_recovered_fraction():
    assert minilm_qat.recovered(0.99, 0.98) == pytest.approx(0.5)
    assert minilm_qat.recovered(0.98, 0.98) == 0.0
    assert minilm_qat.recovered(0.97, 0.98) == pytest.approx(-0.5)
