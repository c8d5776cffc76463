"""examples/qat_digits_nnx.py (the digits example in Flax NNX) runs end to end in quick mode
and meets its targets."""

import contextlib
import dataclasses
import importlib.util
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT_PARAMS = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load("qat_digits_nnx")


@pytest.fixture(scope="module")
def quick_run(example):
    """``python examples/qat_digits_nnx.py --quick --seed 0`` once, in process (its ``main``,
    exit status 0): (the rows ``run`` returned, by name; stdout)."""
    returned = []
    run = example.run

    def recording_run(**kwargs):
        returned.append(run(**kwargs))
        return returned[-1]

    out = io.StringIO()
    example.run = recording_run
    try:
        with contextlib.redirect_stdout(out):
            assert example.main(["--quick", "--seed", "0"]) == 0
    finally:
        example.run = run
    (rows,) = returned
    return {r.name: r for r in rows}, out.getvalue()


def test_quick_run_prints_one_table_with_every_row(example, quick_run):
    rows, text = quick_run
    assert list(rows) == ["float"] + [name for name, _, _ in example.recipes(quick=True)]
    assert set(rows) == {"float", "PTQ W8A8 minmax", "QAT W8A8 percentile", "QAT W4 LSQ"}
    table = [line.split() for line in text.splitlines() if line.startswith(("float ", "PTQ ", "QAT "))]
    assert len(table) == len(rows)
    assert [row[-1] for row in table] == ["-"] + ["0"] * (len(rows) - 1)  # |infer-train|
    assert "[ok]" in text and "MISSED" not in text


def test_quick_run_quantized_rows_are_close_to_float(quick_run):
    rows, _ = quick_run
    assert rows["float"].accuracy >= 0.95
    for name, r in rows.items():
        if name == "float":
            continue
        tol = 0.01 if "W8A8" in name else 0.03          # W8A8: 1 point, W4: 3 points
        assert r.delta >= -tol, (name, r.delta)
        assert r.float_accuracy == rows["float"].accuracy
    # PTQ keeps the float model's decisions almost everywhere.
    assert rows["PTQ W8A8 minmax"].metrics.agreement >= 0.99
    assert rows["PTQ W8A8 minmax"].metrics.rel_logit_error < 0.02


def test_quick_run_integer_path_equals_train_mode(quick_run):
    rows, _ = quick_run
    for name, r in rows.items():
        if name != "float":
            assert r.infer_vs_train == 0.0, name


def test_quick_run_export_sizes(quick_run):
    rows, _ = quick_run
    assert rows["float"].bytes == 4 * FLOAT_PARAMS
    for name, r in rows.items():
        assert r.float_bytes == 4 * FLOAT_PARAMS, name
    # int8 codes plus per-channel scales and descriptors: about 4x smaller.
    for name in ("PTQ W8A8 minmax", "QAT W8A8 percentile"):
        assert 3.5 < rows["float"].bytes / rows[name].bytes < 4.0, name
    # int4 codes packed two per byte, per-channel scales: about 7x.
    assert 6.5 < rows["float"].bytes / rows["QAT W4 LSQ"].bytes < 8.0


def test_main_options_and_exit_status(example, quick_run, monkeypatch):
    rows, _ = quick_run
    calls = []

    def fake_run(quick, seed):
        calls.append((quick, seed))
        return list(rows.values())

    monkeypatch.setattr(example, "run", fake_run)
    assert example.main(["--quick", "--seed", "3"]) == 0
    assert example.main([]) == 0
    assert calls == [(True, 3), (False, 0)]
    # A missed target (here: an integer path that differs from train mode) fails the command.
    bad = list(rows.values())
    bad[-1] = dataclasses.replace(bad[-1], infer_vs_train=1e-3)
    monkeypatch.setattr(example, "run", lambda quick, seed: bad)
    assert example.main(["--quick"]) == 1
