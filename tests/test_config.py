"""QatConfig: validation, hashing, dict / YAML loading, the shipped recipes."""

import dataclasses
import glob
import os

import jax
import pytest

import qatjax
from qatjax.config import QatConfig

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_defaults_and_format_names_are_normalised():
    cfg = QatConfig(weight_format="int4", activation_format="uint8", activation_symmetric=False)
    assert cfg.weight_format == qatjax.int4 and cfg.activation_format == qatjax.uint8
    assert cfg.integer_matmul and not cfg.fp8_matmul
    assert QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e5m2").fp8_matmul


def test_config_is_hashable_and_a_valid_jit_static_argument():
    a, b = QatConfig(), QatConfig()
    assert hash(a) == hash(b) and a == b
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.ste = "lsq"
    f = jax.jit(lambda x, cfg: x * cfg.weight_format.qmax, static_argnums=1)
    assert float(f(1.0, a)) == 127.0


def test_learnable_scales_select_lsq():
    assert QatConfig(learnable_scales=True, activation_format=None).ste == "lsq"


@pytest.mark.parametrize("changes,match", [
    ({"weight_granularity": "per_row"}, "weight_granularity"),
    ({"ste": "magic"}, "ste"),
    ({"weight_format": "int9"}, "int9"),
    ({"weight_format": "int1"}, "bits"),
    ({"weight_granularity": "per_group"}, "weight_group_size"),
    ({"weight_group_size": 32}, "weight_group_size"),
    ({"activation_observer": "minmax", "activation_estimator": "entropy"}, "histogram"),
    ({"percentile": 120.0}, "percentile"),
    ({"num_bins": 7}, "num_bins"),
    ({"weight_symmetric": "yes"}, "weight_symmetric"),
    ({"weight_format": "fp8_e4m3", "weight_symmetric": False}, "symmetric"),
    ({"weight_format": None, "activation_format": None}, "at least one"),
    ({"original_residuals": 1}, "original_residuals"),
    ({"original_residuals": True, "activation_format": None}, "original_residuals"),
    ({"original_residuals": True, "weight_format": "int4", "activation_format": "fp8_e4m3"},
     "original_residuals"),
    ({"original_residuals": True, "ste": "lsq"}, "original_residuals"),
    ({"original_residuals": True, "weight_format": "fp8_e4m3", "activation_format": "fp8_e4m3",
      "weight_granularity": "per_tensor", "fp8_scaling": "current"}, "original_residuals"),
])
def test_bad_values_are_named(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QatConfig(**changes)


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['weight_bits'\]"):
        QatConfig.from_dict({"weight_bits": 4})


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = QatConfig(weight_format="int4", weight_granularity="per_group", weight_group_size=32,
                    activation_estimator="mse")
    assert QatConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text("quant:\n  weight_format: int4\n  weight_granularity: per_group\n"
                    "  weight_group_size: 32\n  activation_estimator: mse\n")
    assert QatConfig.from_yaml(str(path)) == cfg
    with pytest.raises(FileNotFoundError):
        QatConfig.from_yaml(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))))
def test_shipped_recipes_load(path):
    cfg = QatConfig.from_yaml(path)
    assert cfg.weight_format is not None


def test_the_five_named_recipes_ship():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))}
    assert {"int8_ptq.yaml", "int8_qat.yaml", "int4_weight_only_lsq.yaml", "w4a8.yaml",
            "fp8_e4m3.yaml"} <= names


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_bins=100), "`num_bins` must be a power of two"),
    (dict(num_bins=8), "`num_bins` must be a power of two"),
    (dict(percentile="99"), "`percentile` must be a number"),
    (dict(ema_momentum=True), "`ema_momentum` must be a number"),
])
def test_every_field_is_validated_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QatConfig(**kwargs)


@pytest.mark.parametrize("text", ["\n", "quant:\n", "quant: {}\n", "train:\n  epochs: 3\nquant:\n"])
def test_a_recipe_without_fields_is_refused_not_the_default(text, tmp_path):
    with pytest.raises(ValueError, match="holds no recipe"):
        QatConfig.from_yaml(text)
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="holds no recipe"):
        QatConfig.from_yaml(str(path))


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_format="uint8"), r"weight_format='uint8' with weight_symmetric=True cannot "
                                  r"represent negative values.*weight_symmetric=False"),
    (dict(activation_format="uint8"), r"activation_format='uint8' with activation_symmetric=True"),
    (dict(weight_format="uint4", activation_format=None), r"'int4'"),
])
def test_symmetric_unsigned_formats_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QatConfig(**kwargs)
    # The affine version of the same recipe is accepted.
    fixed = {k.replace("format", "symmetric"): False for k, v in kwargs.items()
             if v is not None and v.startswith("u")}
    QatConfig(**kwargs, **fixed)
