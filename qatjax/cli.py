"""The ``qatjax`` command line.

    qatjax run CONFIG [--quick] [--save PATH]   run a recipe on the digits experiment
    qatjax inspect CHECKPOINT                   per-layer quantization table of a saved model
    qatjax convert CHECKPOINT OUT               calibrated / trained variables -> served codes
    qatjax export CHECKPOINT --format safetensors|stablehlo [-o OUT] [--model FILE:NAME
                  --input SHAPE[:DTYPE] ...]    files that serve without qatjax

``run`` trains the float digits MLP, applies the recipe file (``configs/*.yaml``:
``recipe: ptq|qat``, ``description:``, ``quant:``), and prints the float row and the
recipe's row. ``--save`` writes the served model the table reports -- the recipe's
variables (calibrated or trained) after :func:`qatjax.convert`: weight codes and scales,
no float kernels or calibration statistics -- with :func:`qatjax.checkpoint.save`; the
target is checked (a new path in an existing, writable directory) before the run starts.
The digits experiment is
example code, not part of the package: ``run`` loads ``examples/digits_experiment.py``
from ``--examples-dir``, else from ``$QATJAX_EXAMPLES_DIR``, else from the source checkout
the package is installed from (``pip install -e ".[examples]"``), and needs the example
dependencies (optax, scikit-learn, matplotlib, tqdm).

``inspect`` loads a checkpoint (:func:`qatjax.checkpoint.load`) and prints
:func:`qatjax.quant_report`: layer path, formats, weight scale range, activation scale,
zero point and range, calibration method, saturation rate.

``convert`` loads a checkpoint of calibrated or trained variables, applies
:func:`qatjax.convert` and saves the served model (weight codes and scales) to ``OUT``.
``export`` writes the served model as safetensors (:func:`qatjax.export.save_safetensors`,
the layout in the README) or as a StableHLO artifact (:func:`qatjax.export.export_stablehlo`)
of the model that ``--model`` names (``path/to/file.py:NAME`` or ``package.module:NAME``: a
linen or NNX module, or a function or class that returns one when called with no
arguments, built with the recipe the checkpoint was made with) on inputs of the given shapes
(``--input 1,64``; ``--input 1,128:int32`` for another dtype; repeat it for several
arguments), with a symbolic batch dimension; by default the artifact takes its weights as
inputs and they are written next to it as ``OUT`` with the suffix ``.safetensors``.

Errors the user can fix (missing file, bad YAML, unknown key, existing or unwritable
``--save`` / ``OUT`` target, not a checkpoint, a corrupted checkpoint, a checkpoint without
qatjax layers, a ``--model`` that cannot be loaded) print one line on stderr and
exit with status 2. Ctrl-C prints ``qatjax: interrupted`` and exits with status 130,
having written nothing (``--save`` writes its file atomically, at the end).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["build_parser", "main"]

_EPILOG = """examples:
  qatjax run configs/int8_ptq.yaml --quick
  qatjax run configs/int8_qat.yaml --save int8_qat.msgpack
  qatjax inspect int8_qat.msgpack
  qatjax convert calibrated.msgpack served.msgpack
  qatjax export served.msgpack --format safetensors
  qatjax export served.msgpack --format stablehlo --model serve.py:model --input 1,64

exit status: 0 success, 2 bad arguments, file or config, 130 interrupted (Ctrl-C)."""

# `qatjax run` runs the digits experiment, which is example code (examples/ of a source
# checkout), not part of the package.
EXPERIMENT_FILE = "digits_experiment.py"
EXAMPLES_ENV = "QATJAX_EXAMPLES_DIR"
_EXPERIMENT_MODULE = "digits_experiment"  # the name examples/*.py import it under


class _UserError(Exception):
    """An error the user can fix; reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatjax",
        description="qatjax: quantization-aware training and post-training calibration for "
                    "JAX/Flax. Run a quantization recipe on the handwritten-digits example, "
                    "inspect the quantization of a saved model, convert it for serving and "
                    "export it as safetensors or StableHLO.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{run,inspect,convert,export}")
    sub.required = True

    run = sub.add_parser(
        "run", help="run a recipe (YAML) on the digits MLP and print its results table",
        description="Train the float digits MLP (scikit-learn's 8x8 digits), apply the recipe "
                    "(recipe: ptq calibrates; recipe: qat calibrates then fine-tunes), serve it "
                    "on the integer path and print a table: accuracy, difference to float, top-1 "
                    "agreement with float, relative logit error, size in bytes, and the max "
                    "difference between the integer path and fake quantization.")
    run.add_argument("config", metavar="CONFIG",
                     help="recipe file, e.g. configs/int8_ptq.yaml (keys: recipe, description, "
                          "quant, optional train)")
    run.add_argument("--quick", action="store_true",
                     help="fewer epochs and calibration images (seconds instead of a minute)")
    run.add_argument("--save", metavar="PATH", default=None,
                     help="write the served model the table reports to PATH: the recipe's "
                          "variables after qatjax.convert (weight codes and scales; no float "
                          "kernels, no calibration statistics), msgpack with a checksum "
                          "(qatjax.checkpoint). PATH must not exist and its directory must exist "
                          "and be writable; both are checked before the run")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    run.add_argument("--examples-dir", metavar="DIR", default=None,
                     help=f"directory holding {EXPERIMENT_FILE} (default: ${EXAMPLES_ENV}, else "
                          "examples/ of the source checkout qatjax is installed from)")

    inspect = sub.add_parser(
        "inspect", help="print the per-layer quantization table of a saved model",
        description="Load a checkpoint written by qatjax.checkpoint.save (or an orbax directory) "
                    "and print, per quantized layer: path, weight format and granularity, weight "
                    "scale range, input format, calibration method, input scale, zero point, "
                    "range, saturation rate and skipped non-finite values (the last two from "
                    "histogram calibration statistics; a served model, as `qatjax run --save` "
                    "writes, has none and shows -).")
    inspect.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or directory")

    convert = sub.add_parser(
        "convert", help="calibrated or trained variables -> the served model (codes and scales)",
        description="Load a checkpoint of calibrated or trained variables (qatjax.checkpoint), "
                    "apply qatjax.convert (float kernels -> integer / fp8 codes and scales, "
                    "calibration statistics dropped) and save the served model to OUT; "
                    "mode='infer' on it gives train mode's outputs bit for bit.")
    convert.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or directory")
    convert.add_argument("out", metavar="OUT", help="served checkpoint to write (must not exist)")

    export = sub.add_parser(
        "export", help="write the served model as safetensors or a StableHLO artifact",
        description="Convert a checkpoint (as `qatjax convert`) and write it for serving "
                    "without qatjax: --format safetensors writes codes, scales and the "
                    "per-layer recipe (README: 'Export for serving'); --format stablehlo "
                    "serializes the model's integer inference with jax.export (needs --model "
                    "and --input); a loader needs only jax.")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or directory")
    export.add_argument("--format", required=True, choices=("safetensors", "stablehlo"),
                        help="what to write")
    export.add_argument("-o", "--out", metavar="OUT", default=None,
                        help="file to write (must not exist; default: CHECKPOINT's name with "
                             "the suffix .safetensors or .jaxexport)")
    export.add_argument("--model", metavar="FILE:NAME", default=None,
                        help="stablehlo: the model, as path/to/file.py:NAME or "
                             "package.module:NAME -- a linen or NNX module, or a function or "
                             "class returning one when called with no arguments, built with "
                             "the checkpoint's recipe")
    export.add_argument("--input", metavar="SHAPE[:DTYPE]", action="append", default=None,
                        help="stablehlo: an example input's shape (and dtype, default float32), "
                             "e.g. 1,64 or 1,128:int32; repeat for several arguments")
    export.add_argument("--polymorphic-shapes", metavar="SPEC", default="b, ...",
                        help="stablehlo: jax.export shape specification of every input "
                             "(default 'b, ...': a symbolic batch dimension; 'b, s' adds a "
                             "sequence length; 'none' for static shapes)")
    export.add_argument("--weights", choices=("inputs", "constants"), default="inputs",
                        help="stablehlo: take the weights as inputs, written next to the "
                             "artifact as safetensors (default), or bake them in")
    export.add_argument("--platform", action="append", default=None,
                        help="stablehlo: a lowering platform (cpu, cuda, rocm, tpu); repeat "
                             "for several (default cpu)")
    return parser


def _find_experiment(examples_dir: str | os.PathLike | None = None) -> Path:
    """The path of ``digits_experiment.py``: in ``examples_dir`` if given, else in
    ``$QATJAX_EXAMPLES_DIR`` if set, else in ``examples/`` next to the package directory
    (a source checkout, as with ``pip install -e``). A user error names where it looked."""
    if examples_dir is not None:
        directory, source = Path(examples_dir), " (--examples-dir)"
    elif os.environ.get(EXAMPLES_ENV):
        directory, source = Path(os.environ[EXAMPLES_ENV]), f" (${EXAMPLES_ENV})"
    else:
        import qatjax

        directory, source = Path(qatjax.__file__).resolve().parent.parent / "examples", ""
    path = directory / EXPERIMENT_FILE
    if not path.is_file():
        raise _UserError(
            f"`qatjax run` needs the digits experiment, which is example code, not part of the "
            f"installed package: {EXPERIMENT_FILE} not found at {path}{source}. Use a source "
            f"checkout of qatjax (pip install -e \".[examples]\" in it), or pass --examples-dir "
            f"DIR (or set {EXAMPLES_ENV}) naming the checkout's examples/ directory.")
    return path.resolve()


def _load_experiment(examples_dir: str | os.PathLike | None = None) -> ModuleType:
    """Imports ``digits_experiment.py`` (:func:`_find_experiment`) as module
    ``digits_experiment``, the name the examples import it under; a copy of the same file
    imported already is reused."""
    path = _find_experiment(examples_dir)
    loaded = sys.modules.get(_EXPERIMENT_MODULE)
    if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(_EXPERIMENT_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_EXPERIMENT_MODULE] = module  # dataclasses (Flax modules) look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        if loaded is None:
            sys.modules.pop(_EXPERIMENT_MODULE, None)
        else:
            sys.modules[_EXPERIMENT_MODULE] = loaded
        # A third-party module is missing: the example dependencies are not installed. (An
        # ImportError from qatjax itself is a bug, and keeps its traceback.)
        if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] != "qatjax":
            raise _UserError(
                f"cannot load {path}: no module named {e.name!r}; the digits experiment needs "
                f"the example dependencies (optax, scikit-learn, matplotlib, tqdm): "
                f"pip install -e \".[examples]\"") from None
        raise
    return module


def _check_save_target(path: str, argname: str = "--save") -> None:
    """Refuses, before any work, a target the end of the command could not write: an
    existing path, or one whose directory does not exist or does not let us create files."""
    if os.path.lexists(path):
        raise _UserError(f"{argname}: {path!r} exists; choose a new path")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise _UserError(f"{argname}: cannot write {path!r}: {directory!r} is not an existing "
                         "directory")
    try:  # the one reliable test (permissions, ACLs, read-only mounts, root)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise _UserError(f"{argname}: cannot write {path!r}: cannot create a file in "
                         f"{directory!r} ({e.strerror or e})") from None


def _run(args: argparse.Namespace) -> None:
    import qatjax
    from qatjax import checkpoint

    if args.save is not None:
        _check_save_target(args.save)
    digits = _load_experiment(args.examples_dir)
    try:
        recipe = digits.load_recipe(args.config)
    except (FileNotFoundError, ValueError) as e:
        raise _UserError(str(e)) from None
    try:  # fails fast (tracing only) on a config the digits MLP cannot run
        digits.check_config(recipe.config)
    except (ValueError, TypeError) as e:
        raise _UserError(f"{args.config}: this recipe cannot run on the digits MLP: {e}") from None
    settings = (digits.QUICK if args.quick else digits.FULL).replace(**recipe.train)
    progress = not args.no_progress
    data = digits.load_data(seed=settings.seed)
    model, float_vars = digits.train_float(data, settings, progress=progress)
    float_logits = digits.logits(model, float_vars, data.x_test, "float")
    row = digits.run_recipe(recipe.config, recipe.kind, float_vars, data, name=recipe.name,
                            description=recipe.description, settings=settings,
                            progress=progress, float_logits=float_logits)
    print(f"{recipe.name} ({recipe.kind}): {recipe.description}")
    print(digits.format_table([digits.float_row(model, float_vars, data), row]))
    if args.save is not None:
        try:
            checkpoint.save(args.save, qatjax.convert(row.variables))
        except OSError as e:
            raise _UserError(f"--save: cannot write {args.save!r}: {e.strerror or e}") from None
        print(f"saved {args.save}: the served model (qatjax.convert: weight codes and scales, "
              f"{os.path.getsize(args.save):,} bytes)")


def _load_quantized(path: str) -> dict:
    """The variables of a checkpoint with qatjax layers, or a user error saying why not."""
    from qatjax import checkpoint

    try:
        variables = checkpoint.load(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise _UserError(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- orbax / msgpack raise assorted types on foreign files
        raise _UserError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from None
    if not isinstance(variables, dict) or "quant_params" not in variables:
        raise _UserError(f"{path}: no qatjax layers (no quant_params collection); is this a "
                         "qatjax model checkpoint?")
    return variables


def _inspect(args: argparse.Namespace) -> None:
    import qatjax

    variables = _load_quantized(args.checkpoint)
    try:
        report = qatjax.quant_report(variables)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise _UserError(f"{args.checkpoint}: cannot read its quantization state: {e}") from None
    if not report.layers:
        raise _UserError(f"{args.checkpoint}: no qatjax layers (no kernel_spec in quant_params)")
    print(f"{args.checkpoint}: {len(report.layers)} quantized layer(s)")
    print(report)


def _served(variables: dict, path: str) -> tuple[dict, int]:
    """``(qatjax.convert(variables), number of quantized layers)``, or a user error."""
    import qatjax

    try:
        served = qatjax.convert(variables)
    except (ValueError, KeyError, TypeError) as e:
        raise _UserError(f"{path}: cannot convert it: {e}") from None
    return served, len(qatjax.quant_report(served).layers)


def _convert(args: argparse.Namespace) -> None:
    from qatjax import checkpoint

    _check_save_target(args.out, "OUT")
    print(f"loading {args.checkpoint}")
    served, n = _served(_load_quantized(args.checkpoint), args.checkpoint)
    checkpoint.save(args.out, served)
    print(f"converted {n} quantized layer(s): wrote {args.out} (the served model: weight codes "
          f"and scales, {os.path.getsize(args.out):,} bytes)")


def _parse_input(text: str):
    """``"1,64"`` / ``"1,128:int32"`` -> a ``jax.ShapeDtypeStruct``."""
    import jax
    import numpy as np

    shape_text, _, dtype_text = text.partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.split(",") if d.strip())
        dtype = np.dtype(dtype_text or "float32")
    except (ValueError, TypeError):
        raise _UserError(f"--input: {text!r} is not SHAPE[:DTYPE] (e.g. 1,64 or "
                         "1,128:int32)") from None
    if not shape or min(shape) < 1:
        raise _UserError(f"--input: {text!r}: the shape needs positive sizes (e.g. 1,64)")
    return jax.ShapeDtypeStruct(shape, dtype)


def _load_model(spec: str):
    """The module ``--model`` names: ``path/to/file.py:NAME`` or ``package.module:NAME``, an
    instance, or a function / class called with no arguments."""
    import importlib

    from flax import linen as nn
    from flax import nnx

    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise _UserError(f"--model: {spec!r} is not FILE.py:NAME or package.module:NAME")
    try:
        if source.endswith(".py"):
            if not os.path.isfile(source):
                raise _UserError(f"--model: no such file: {source!r}")
            module_spec = importlib.util.spec_from_file_location(
                f"qatjax_cli_model_{Path(source).stem}", source)
            module = importlib.util.module_from_spec(module_spec)
            sys.path.insert(0, os.path.dirname(os.path.abspath(source)))
            try:
                module_spec.loader.exec_module(module)
            finally:
                sys.path.pop(0)
        else:
            module = importlib.import_module(source)
    except _UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- user code: report what it raised, in one line
        raise _UserError(f"--model: cannot load {source!r}: {type(e).__name__}: {e}") from None
    if not hasattr(module, name):
        raise _UserError(f"--model: {source!r} has no {name!r}")
    model = getattr(module, name)
    if not isinstance(model, (nn.Module, nnx.Module)) and callable(model):
        try:
            model = model()
        except Exception as e:  # noqa: BLE001
            raise _UserError(f"--model: calling {spec} with no arguments raised "
                             f"{type(e).__name__}: {e}") from None
    if not isinstance(model, (nn.Module, nnx.Module)):
        raise _UserError(f"--model: {spec} is a {type(model).__name__}, not a flax linen or "
                         "NNX module")
    return model


def _export(args: argparse.Namespace) -> None:
    from flax import nnx

    from qatjax import export

    suffix = ".safetensors" if args.format == "safetensors" else ".jaxexport"
    out = args.out or os.path.splitext(args.checkpoint.rstrip("/\\"))[0] + suffix
    weights_out = (os.path.splitext(out)[0] + ".safetensors"
                   if args.format == "stablehlo" and args.weights == "inputs" else None)
    if weights_out == out:
        raise _UserError(f"--out: {out!r} would also be the weights file; use another suffix "
                         "(.jaxexport)")
    if args.format == "stablehlo":
        if args.model is None or not args.input:
            raise _UserError("--format stablehlo needs --model FILE:NAME and --input SHAPE "
                             "(the model's code and its example input)")
        inputs = tuple(_parse_input(text) for text in args.input)
    for target in (out, weights_out):
        if target is not None:
            _check_save_target(target, "--out")
    print(f"loading {args.checkpoint}")
    served, n = _served(_load_quantized(args.checkpoint), args.checkpoint)
    if args.format == "safetensors":
        export.save_safetensors(out, served)
        print(f"wrote {out}: {n} quantized layer(s), {os.path.getsize(out):,} bytes")
        return
    model = _load_model(args.model)
    nnx_model = isinstance(model, nnx.Module)
    platforms = tuple(args.platform or ("cpu",))
    print(f"lowering {type(model).__name__} for {', '.join(platforms)}")
    shapes = None if args.polymorphic_shapes.lower() == "none" else args.polymorphic_shapes
    try:
        if nnx_model:
            from qatjax.nnx import set_collections

            set_collections(model, served)
        artifact = export.export_stablehlo(
            model, inputs, variables=None if nnx_model else served, weights=args.weights,
            platforms=platforms, polymorphic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 -- the model does not fit the checkpoint or inputs
        raise _UserError(f"cannot export {args.model} with the weights of {args.checkpoint}: "
                         f"{type(e).__name__}: {e}") from None
    paths = artifact.save(out, weights_out)
    sizes = ", ".join(f"{p} ({os.path.getsize(p):,} bytes)" for p in paths if p)
    print(f"wrote {sizes}; load with jax.export.deserialize (README: 'Export for serving')")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qatjax`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    try:
        {"run": _run, "inspect": _inspect, "convert": _convert, "export": _export}[args.command](args)
    except _UserError as e:
        print(f"qatjax: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; --save writes nothing until the end
        print("qatjax: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
