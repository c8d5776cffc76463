"""The ``qatjax`` command line: run, inspect, --help, the one-line errors (exit 2) and Ctrl-C
(exit 130).

``run`` runs examples/digits_experiment.py, found in the source checkout (or --examples-dir /
$QATJAX_EXAMPLES_DIR)."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qatjax import checkpoint, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INT8_PTQ = os.path.join(ROOT, "configs", "int8_ptq.yaml")


def _one_line_error(capsys, *fragments):
    """Asserts stderr is exactly one line "qatjax: error: ..." holding the fragments."""
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("qatjax: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, err)
    return lines[0]


# ----------------------------------------------------------------------------- help
def test_help_explains_both_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "run" in out and "inspect" in out and "digits" in out and "exit status" in out
    assert "130 interrupted" in out
    assert cli.main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "CONFIG" in out and "--quick" in out and "--save" in out and "relative logit error" in out
    assert "served model" in out and "qatjax.convert" in out and "checked before the run" in out
    assert "--examples-dir" in out and "QATJAX_EXAMPLES_DIR" in out
    assert cli.main(["inspect", "--help"]) == 0
    out = capsys.readouterr().out
    assert "CHECKPOINT" in out and "saturation" in out


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2
    assert "usage: qatjax" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["run"]) == 2
    assert cli.main(["run", INT8_PTQ, "--bogus"]) == 2


# ----------------------------------------------------------------------------- run: bad input
def test_run_missing_config(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
    _one_line_error(capsys, "no such recipe file", "nope.yaml")


@pytest.mark.parametrize("text, fragment", [
    ("recipe: ptq\nquant: [int8,\n", "invalid YAML (line"),
    ("recipe: ptq\nquant:\n  weight_fromat: int8\n", "unknown key(s) ['weight_fromat']"),
    ("recipe: ptq\nquant: {}\nlearning_rate: 0.1\n", "unknown key(s) ['learning_rate']"),
    ("recipe: finetune\nquant: {}\n", "`recipe` must be one of"),
    ("recipe: ptq\nquant:\n  weight_format: int9\n", "weight_format"),
    ("recipe: ptq\nquant:\n  num_bins: 7\n", "num_bins"),
    ("just text\n", "must be a YAML mapping"),
    # Valid QatConfig, but the MLP's 64 inputs are not a multiple of the group size: caught by
    # tracing the model before any training.
    (("recipe: ptq\nquant:\n  weight_format: int4\n  weight_granularity: per_group\n"
      "  weight_group_size: 48\n"), "cannot run on the digits MLP"),
])
def test_run_bad_config_is_one_line_exit_2(tmp_path, capsys, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["run", str(path), "--quick", "--no-progress"]) == 2
    _one_line_error(capsys, fragment, str(path))


def test_run_refuses_to_overwrite_save_target(tmp_path, capsys):
    target = tmp_path / "model.msgpack"
    target.write_bytes(b"precious")
    assert cli.main(["run", INT8_PTQ, "--quick", "--save", str(target)]) == 2
    _one_line_error(capsys, "--save", "exists")
    assert target.read_bytes() == b"precious"


def _unwritable_dir(tmp_path, monkeypatch):
    """A directory we cannot create files in: read-only by its mode, or (root ignores modes)
    Linux's /proc; elsewhere the read-only one, with file creation failing as it would."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o500)
    if not os.access(directory, os.W_OK):
        return directory
    if sys.platform.startswith("linux"):
        return pathlib.Path("/proc")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refused)
    return directory


@pytest.mark.parametrize("where", ["missing", "file", "unwritable"])
def test_run_checks_the_save_target_before_running(tmp_path, capsys, monkeypatch, where):
    def started(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(cli, "_load_experiment", started)
    fragment = "is not an existing directory"
    if where == "missing":
        directory = tmp_path / "no_such_dir"
    elif where == "file":
        directory = tmp_path / "a_file"
        directory.write_text("")
    else:
        directory, fragment = _unwritable_dir(tmp_path, monkeypatch), "cannot create a file in"
    target = str(directory / "model.msgpack")
    assert cli.main(["run", INT8_PTQ, "--quick", "--save", target]) == 2
    _one_line_error(capsys, "--save", target, str(directory), fragment)
    assert not os.path.exists(target)


def test_ctrl_c_exits_130_with_one_line_and_saves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.EXAMPLES_ENV, raising=False)
    digits = cli._load_experiment()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "train_float", interrupted)
    target = tmp_path / "model.msgpack"
    assert cli.main(["run", INT8_PTQ, "--quick", "--no-progress", "--save", str(target)]) == 130
    captured = capsys.readouterr()
    assert captured.err == "qatjax: interrupted\n"
    assert not target.exists() and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- run: the examples
def test_run_finds_the_experiment_in_the_source_checkout(monkeypatch):
    monkeypatch.delenv(cli.EXAMPLES_ENV, raising=False)
    assert cli._find_experiment() == pathlib.Path(ROOT, "examples", "digits_experiment.py").resolve()


def test_run_without_the_examples_says_where_it_looked(tmp_path, capsys, monkeypatch):
    assert cli.main(["run", INT8_PTQ, "--quick", "--examples-dir", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path / "digits_experiment.py"), "--examples-dir",
                    "source checkout", "pip install -e")
    monkeypatch.setenv(cli.EXAMPLES_ENV, str(tmp_path / "nowhere"))
    assert cli.main(["run", INT8_PTQ, "--quick"]) == 2
    _one_line_error(capsys, str(tmp_path / "nowhere" / "digits_experiment.py"), "$QATJAX_EXAMPLES_DIR")


def test_run_names_a_missing_example_dependency(tmp_path, capsys, monkeypatch):
    (tmp_path / "digits_experiment.py").write_text("import qatjax_test_no_such_module\n")
    before = sys.modules.get("digits_experiment")
    monkeypatch.setenv(cli.EXAMPLES_ENV, str(tmp_path))
    assert cli.main(["run", INT8_PTQ, "--quick"]) == 2
    _one_line_error(capsys, "qatjax_test_no_such_module", '".[examples]"')
    assert sys.modules.get("digits_experiment") is before  # nothing half-imported left behind


# ----------------------------------------------------------------------------- run + inspect
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """``qatjax run configs/int8_ptq.yaml --quick --save PATH`` once: (exit code, stdout, path)."""
    import contextlib
    import io

    path = str(tmp_path_factory.mktemp("cli") / "int8_ptq.msgpack")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["run", INT8_PTQ, "--quick", "--no-progress", "--save", path])
    return code, out.getvalue(), path


def test_run_prints_float_and_recipe_rows_and_saves_the_served_model(saved_run):
    code, out, path = saved_run
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("int8_ptq (ptq): W8A8 PTQ")
    header = next(i for i, line in enumerate(lines) if line.startswith("config"))
    float_row, recipe_row = lines[header + 2].split(), lines[header + 3].split()
    assert float_row[0] == "float" and recipe_row[0] == "int8_ptq"
    acc_float, acc = float(float_row[1]), float(recipe_row[1])
    assert acc_float > 95.0 and abs(acc - acc_float) <= 0.5
    assert recipe_row[-1] == "0"  # integer path == fake quantization
    size = os.path.getsize(path)
    assert f"saved {path}: the served model (qatjax.convert: weight codes and scales, {size:,} " \
           "bytes)" in out
    # The served (converted) model, what the table reports: int8 codes and scales, about the
    # table's bytes (not the float kernels and calibration histograms, 4x that).
    table_bytes = int(recipe_row[5].replace(",", ""))
    assert size <= 1.05 * table_bytes
    variables = checkpoint.load(path)
    assert set(variables) == {"params", "quant_params"}
    for name in ("dense_0", "dense_1", "head"):
        assert set(variables["params"][name]) == {"bias"}
        assert variables["quant_params"][name]["kernel_codes"].dtype == np.int8
        assert variables["quant_params"][name]["input_scale"].dtype == np.float32
    # It serves: the integer path on the saved file gives the table's accuracy.
    digits = cli._load_experiment()
    recipe = digits.load_recipe(INT8_PTQ)
    data = digits.load_data(seed=digits.QUICK.seed)
    out_infer = digits.logits(digits.DigitsMLP(config=recipe.config), variables, data.x_test, "infer")
    assert f"{100 * digits.evaluate(out_infer, data.y_test).accuracy:.2f}" == recipe_row[1]


def test_inspect_prints_the_per_layer_table(saved_run, capsys):
    _, _, path = saved_run
    assert cli.main(["inspect", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 3 quantized layer(s)"
    for col in ("layer", "weights", "w scale min..max", "method", "in scale", "in zp", "saturated"):
        assert col in out[1]
    rows = {line.split()[0]: line.split() for line in out[3:]}
    assert set(rows) == {"dense_0", "dense_1", "head"}
    for row in rows.values():
        assert row[1:3] == ["int8", "per_channel"] and row[4:6] == ["uint8", "entropy"]
        assert float(row[6]) > 0 and row[7] == "0"  # input scale, zero point
        assert row[-2:] == ["-", "-"]  # a served model keeps no calibration histograms


def test_inspect_refuses_a_corrupted_checkpoint(saved_run, tmp_path, capsys):
    _, _, path = saved_run
    data = bytearray(pathlib.Path(path).read_bytes())
    data[len(data) // 2] ^= 0x10  # in the middle of the weights
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(bytes(data))
    assert cli.main(["inspect", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "corrupted", "checksum does not match")


def test_inspect_bad_paths_and_files(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing.msgpack")]) == 2
    _one_line_error(capsys, "no such file", "missing.msgpack")
    junk = tmp_path / "junk.msgpack"
    junk.write_bytes(b"\x93not a checkpoint at all")
    assert cli.main(["inspect", str(junk)]) == 2
    _one_line_error(capsys, "junk.msgpack")
    plain = tmp_path / "plain.msgpack"
    checkpoint.save(str(plain), {"params": {"dense": {"kernel": np.ones((2, 2), np.float32)}}})
    assert cli.main(["inspect", str(plain)]) == 2
    _one_line_error(capsys, "no qatjax layers")


def test_console_script_is_installed_and_errors_cleanly(tmp_path):
    exe = shutil.which("qatjax")
    cmd = [exe] if exe else [sys.executable, "-m", "qatjax.cli"]
    assert exe is not None, "the `qatjax` console script is not on PATH (pip install -e .)"
    proc = subprocess.run(cmd + ["inspect", str(tmp_path / "nothing.msgpack")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("qatjax: error: ")


# ----------------------------------------------------------------------------- convert + export
@pytest.fixture(scope="module")
def calibrated_digits(tmp_path_factory):
    """A calibrated (not converted) int8 digits MLP saved with qatjax.checkpoint, and a
    serve.py naming its model for --model: (checkpoint path, variables, model, serve.py)."""
    import jax

    import qatjax

    digits = cli._load_experiment()
    root = tmp_path_factory.mktemp("convert")
    x = digits.load_data(seed=0).x_train[:96]
    model = digits.DigitsMLP(config=qatjax.QatConfig())
    variables = qatjax.calibrate(model, jax.jit(model.init)(jax.random.key(0), x[:1]),
                                 [x[:48], x[48:]])
    path = str(root / "calibrated.msgpack")
    checkpoint.save(path, variables)
    serve = root / "serve.py"
    serve.write_text("import qatjax\nfrom digits_experiment import DigitsMLP\n\n"
                     "model = DigitsMLP(config=qatjax.QatConfig())\n")
    return path, variables, model, str(serve)


def _infer(model, variables, x):
    import jax

    from qatjax.flax import quant_mode

    with quant_mode("infer"):
        return np.asarray(jax.jit(model.apply)(variables, x))


def test_help_lists_convert_and_export(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "qatjax convert" in out and "--format stablehlo" in out
    assert cli.main(["export", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for fragment in ("safetensors", "stablehlo", "--model FILE:NAME", "--input SHAPE[:DTYPE]",
                     "--weights {inputs,constants}", "--platform", "symbolic batch"):
        assert fragment in out, fragment


def test_convert_writes_the_served_model(calibrated_digits, tmp_path, capsys):
    import qatjax

    path, variables, model, _ = calibrated_digits
    out = str(tmp_path / "served.msgpack")
    assert cli.main(["convert", path, out]) == 0
    printed = capsys.readouterr().out
    assert f"converted 3 quantized layer(s): wrote {out}" in printed
    served = checkpoint.load(out)
    expected = qatjax.convert(variables)
    assert set(served) == {"params", "quant_params"} == set(expected)
    for name in ("dense_0", "dense_1", "head"):
        np.testing.assert_array_equal(served["quant_params"][name]["kernel_codes"],
                                      expected["quant_params"][name]["kernel_codes"])
    x = np.random.default_rng(0).random((5, 64), np.float32)
    np.testing.assert_array_equal(_infer(model, served, x), _infer(model, expected, x))
    assert cli.main(["convert", path, out]) == 2  # never over an existing file
    _one_line_error(capsys, "OUT", "exists")


def test_export_safetensors_and_stablehlo_end_to_end(calibrated_digits, tmp_path, capsys,
                                                     monkeypatch):
    import jax

    import qatjax
    from qatjax import export

    path, variables, model, serve = calibrated_digits
    served = qatjax.convert(variables)
    st = str(tmp_path / "digits.safetensors")
    assert cli.main(["export", path, "--format", "safetensors", "-o", st]) == 0
    assert f"wrote {st}: 3 quantized layer(s)" in capsys.readouterr().out
    loaded = export.load_safetensors(st)
    for name in ("dense_0", "dense_1", "head"):
        np.testing.assert_array_equal(loaded["quant_params"][name]["kernel_codes"],
                                      served["quant_params"][name]["kernel_codes"])

    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))  # serve.py imports the example
    # The weights go next to the artifact (its name, .safetensors): digits.safetensors exists,
    # so nothing is written.
    art = str(tmp_path / "digits.jaxexport")
    stablehlo = ["--format", "stablehlo", "--model", f"{serve}:model", "--input", "1,64"]
    assert cli.main(["export", path, *stablehlo, "-o", art]) == 2
    _one_line_error(capsys, "--out", "digits.safetensors", "exists")
    assert not os.path.exists(art)
    sub = tmp_path / "pair"
    sub.mkdir()
    art = str(sub / "model.jaxexport")
    assert cli.main(["export", path, *stablehlo, "-o", art]) == 0
    printed = capsys.readouterr().out
    assert "lowering DigitsMLP for cpu" in printed and art in printed
    assert sorted(os.listdir(sub)) == ["model.jaxexport", "model.safetensors"]
    tensors, _ = export._read_safetensors(str(sub / "model.safetensors"))
    exported = jax.export.deserialize(open(art, "rb").read())
    for batch in (1, 6):  # the symbolic batch dimension
        x = np.random.default_rng(batch).random((batch, 64), np.float32)
        np.testing.assert_array_equal(np.asarray(exported.call(tensors, x)),
                                      _infer(model, served, x))


def test_export_errors_are_one_line(calibrated_digits, tmp_path, capsys):
    path, _, _, serve = calibrated_digits
    out = str(tmp_path / "x.jaxexport")
    assert cli.main(["export", path, "--format", "stablehlo", "-o", out]) == 2
    _one_line_error(capsys, "needs --model", "--input")
    assert cli.main(["export", path, "--format", "stablehlo", "--model", "nope.py:model",
                     "--input", "1,64", "-o", out]) == 2
    _one_line_error(capsys, "--model", "no such file")
    assert cli.main(["export", path, "--format", "stablehlo", "--model", f"{serve}:model",
                     "--input", "1,x", "-o", out]) == 2
    _one_line_error(capsys, "--input", "SHAPE[:DTYPE]")
    assert not os.path.exists(out)
    assert cli.main(["export", str(tmp_path / "missing.msgpack"), "--format",
                     "safetensors"]) == 2
    _one_line_error(capsys, "missing.msgpack")
    plain = tmp_path / "float.msgpack"
    checkpoint.save(str(plain), {"params": {"dense": {"kernel": np.ones((2, 2), np.float32)}}})
    assert cli.main(["export", str(plain), "--format", "safetensors"]) == 2
    _one_line_error(capsys, "no qatjax layers")
    assert cli.main(["convert", str(plain), str(tmp_path / "c.msgpack")]) == 2
    _one_line_error(capsys, "no qatjax layers")
    st = tmp_path / "w.safetensors"  # a safetensors file is not a checkpoint
    st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert cli.main(["convert", str(st), str(tmp_path / "c.msgpack")]) == 2
    _one_line_error(capsys, "w.safetensors")
