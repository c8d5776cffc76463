"""The digits experiment (examples/digits_experiment.py, not part of the package): data,
metrics, recipe files, and every shipped recipe end to end (quick)."""

import glob
import os

import digits_experiment as digits  # examples/, on sys.path (conftest.py)
import jax
import numpy as np
import pytest

import qatjax
from qatjax import QatConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.fixture(scope="module")
def data():
    return digits.load_data()


@pytest.fixture(scope="module")
def float_model(data):
    """One quick float model shared by the recipe tests: (model, variables, float logits)."""
    model, variables = digits.train_float(data, digits.QUICK)
    return model, variables, digits.logits(model, variables, data.x_test, "float")


# ----------------------------------------------------------------------------- data
def test_load_data_is_a_fixed_stratified_split(data):
    assert data.x_train.shape == (1257, 64) and data.x_test.shape == (540, 64)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    # Stratified: every class holds 30% of its images in the test set (+-1).
    total = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=10)
    assert np.all(np.abs(np.bincount(data.y_test, minlength=10) - 0.3 * total) <= 1)
    again = digits.load_data()
    np.testing.assert_array_equal(again.x_test, data.x_test)
    np.testing.assert_array_equal(again.y_train, data.y_train)
    other = digits.load_data(seed=1)
    assert not np.array_equal(other.y_test, data.y_test)


# ----------------------------------------------------------------------------- metrics
def test_evaluate_matches_the_formulas():
    f = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [5.0, 1.0, 0.0]], np.float32)
    q = f.copy()
    q[1] = [3.5, 3.0, 1.0]  # top-1 flips from 1 to 0
    labels = np.array([0, 1, 2, 1])
    m = digits.evaluate(q, labels, f)
    assert m.accuracy == pytest.approx(2 / 4)  # rows 0 and 2 right (row 3 is wrong for both)
    assert m.agreement == pytest.approx(3 / 4)
    assert m.rel_logit_error == pytest.approx(3.5 / np.sqrt((f.astype(np.float64) ** 2).sum()))
    alone = digits.evaluate(f, labels)
    assert (alone.accuracy, alone.agreement, alone.rel_logit_error) == (0.75, 1.0, 0.0)


def test_float_row_size_is_the_float32_parameter_bytes(data, float_model):
    model, variables, _ = float_model
    row = digits.float_row(model, variables, data)
    n_params = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert row.bytes == row.float_bytes == 4 * n_params
    assert row.kind == "float" and row.delta == 0.0 and row.infer_vs_train is None
    assert row.accuracy > 0.95


def test_format_table_has_one_line_per_row_and_the_columns(data, float_model):
    model, variables, _ = float_model
    row = digits.float_row(model, variables, data)
    other = digits.Result("PTQ example", "ptq", "", digits.Metrics(0.5, 0.75, 0.0123), row.accuracy,
                          row.float_bytes, row.float_bytes // 4, 0.0, 1.0)
    text = digits.format_table([row, other])
    lines = text.splitlines()
    assert len(lines) == 4
    for col in ("acc %", "vs float", "top-1 agree %", "rel logit err", "bytes", "|infer-train|"):
        assert col in lines[0]
    assert lines[3].startswith("PTQ example") and "50.00" in lines[3] and "75.00" in lines[3]
    assert "0.01230" in lines[3] and f"{row.float_bytes // 4:,}" in lines[3] and "4.00" in lines[3]
    assert f"{100 * (0.5 - row.accuracy):+.2f}" in lines[3]


# ----------------------------------------------------------------------------- recipe files
def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_load_recipe_reads_kind_description_quant_and_train(tmp_path):
    path = _write(tmp_path, "recipe: qat\ndescription: hello\nquant:\n  weight_format: int4\n"
                            "  activation_format: null\ntrain:\n  qat_epochs: 1\n", "my_recipe.yaml")
    r = digits.load_recipe(path)
    assert (r.name, r.kind, r.description) == ("my_recipe", "qat", "hello")
    assert r.config == QatConfig(weight_format="int4", activation_format=None)
    assert r.train == {"qat_epochs": 1}


@pytest.mark.parametrize("text, match", [
    ("recipe: ptq\nquant: [1, 2\n", "invalid YAML"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("recipe: ptq\nquant: {}\nextra: 1\n", r"unknown key\(s\) \['extra'\]"),
    ("recipe: fancy\nquant: {}\n", "`recipe` must be one of"),
    ("quant: {}\n", "`recipe` must be one of"),
    ("recipe: ptq\n", "`quant` must be a mapping"),
    ("recipe: ptq\nquant:\n  weight_fromat: int8\n", "weight_fromat"),
    ("recipe: ptq\nquant:\n  weight_format: int9\n", "weight_format"),
    ("recipe: ptq\nquant: {}\ntrain:\n  epochs: 3\n", r"unknown `train` key\(s\) \['epochs'\]"),
    ("recipe: ptq\nquant: {}\ntrain:\n  qat_epochs: ten\n", "`qat_epochs` must be an int >= 0"),
    ("recipe: ptq\nquant: {}\ntrain:\n  calib_samples: 0\n", "`calib_samples` must be null or"),
    ("recipe: qat\nquant: {}\ntrain:\n  qat_lr: -1\n", "`qat_lr` must be a number > 0"),
])
def test_load_recipe_rejects_bad_files_naming_the_problem(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        digits.load_recipe(_write(tmp_path, text))


def test_load_recipe_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such recipe file"):
        digits.load_recipe(str(tmp_path / "nope.yaml"))


def test_check_config_fails_fast_on_a_config_the_mlp_cannot_run():
    bad = QatConfig(weight_format="int4", weight_granularity="per_group", weight_group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        digits.check_config(bad)
    digits.check_config(bad.replace(weight_group_size=32))  # divides 64 and 256


def test_run_recipe_rejects_an_unknown_kind(data, float_model):
    with pytest.raises(ValueError, match="kind"):
        digits.run_recipe(QatConfig(), "fine-tune", float_model[1], data)


# ----------------------------------------------------------------------------- calibration
def test_shared_statistics_give_the_same_variables_as_calibrating(data, float_model):
    """collect_stats + finalize (the example's shared pass) == qatjax.calibrate, bit for bit."""
    _, variables, _ = float_model
    cfg = QatConfig(activation_format="uint8", activation_symmetric=False, activation_estimator="mse")
    stats = digits.collect_stats(cfg, variables, data, digits.QUICK)
    shared = digits.calibrate_from(cfg, variables, data, digits.QUICK, stats=stats)
    direct = digits.calibrate_from(cfg, variables, data, digits.QUICK)
    a, b = jax.tree_util.tree_flatten(shared), jax.tree_util.tree_flatten(direct)
    assert a[1] == b[1]
    assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a[0], b[0]))
    # The calibrated range is the observed one for minmax-like estimators on ReLU inputs: lo = 0.
    lo, hi = digits.input_threshold(shared, "dense_1")
    acts = digits.layer_inputs(digits.DigitsMLP(), variables,
                               np.concatenate(digits.calibration_batches(data, digits.QUICK)), "dense_1")
    assert lo == 0.0 and 0.5 * acts.max() < hi <= acts.max() * (1 + 1e-6)


def test_layer_inputs_reads_each_layers_input(data, float_model):
    model, variables, _ = float_model
    x = data.x_test[:5]
    np.testing.assert_array_equal(digits.layer_inputs(model, variables, x, "dense_0"), x)
    h = digits.layer_inputs(model, variables, x, "head")
    assert h.shape == (5, 256) and h.min() >= 0.0
    with pytest.raises(ValueError, match="dense_0"):
        digits.layer_inputs(model, variables, x, "conv")


# ----------------------------------------------------------------------------- shipped recipes
def test_configs_directory_holds_the_recipes():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"int8_ptq.yaml", "int8_qat.yaml", "int4_weight_only_lsq.yaml", "fp8_e4m3.yaml",
            "w4a8.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_runs(path, data, float_model):
    recipe = digits.load_recipe(path)
    assert recipe.kind in digits.RECIPE_KINDS and recipe.description
    _, variables, float_logits = float_model
    settings = digits.QUICK.replace(**recipe.train)
    row = digits.run_recipe(recipe.config, recipe.kind, variables, data, name=recipe.name,
                            settings=settings, float_logits=float_logits)
    # Accuracy close to float (quick mode: 8-bit within 0.5 points, 4-bit within 1.5).
    narrow = recipe.config.weight_format is not None and recipe.config.weight_format.bits <= 4
    assert row.delta >= (-0.015 if narrow else -0.005), (recipe.name, row.delta)
    assert row.metrics.agreement >= 0.98
    # Served on the integer / fp8 path, equal to fake quantization bit for bit.
    assert row.infer_vs_train == 0.0
    # Smaller: int8 / fp8 kernels ~3.7x, int4 (packed two per byte) ~7x, or ~5x with one
    # float32 scale and int32 zero point per group of 32.
    per_group = recipe.config.weight_granularity == "per_group"
    assert row.float_bytes / row.bytes > (4.5 if per_group else 6.5 if narrow else 3.5)
    served = qatjax.convert(row.variables)
    assert all("kernel" not in layer for layer in served["params"].values())
