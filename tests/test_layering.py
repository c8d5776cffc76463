"""Package layering: no module of ``qatjax`` imports a module of a higher layer.

Every ``qatjax/**/*.py`` is parsed with ``ast`` (nothing is imported), and every import of
a ``qatjax`` module is collected: ``import qatjax.x``, ``from qatjax.x import y``,
``from qatjax import x`` and relative imports, at module level and inside functions.
Each module's layer is looked up in ``LAYERS``; a module may import modules of its own
layer or of lower layers only. A module (or an imported ``qatjax`` name) that no entry
of ``LAYERS`` covers fails the test: add it to the table.

Also: the core (every layer below the front ends) does not import ``flax``, nothing in the
package imports ``optax``, ``matplotlib``, ``sklearn`` or ``tqdm`` at module level, and the
examples use only the public API.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qatjax"
EXAMPLES = ROOT / "examples"

# Module prefix -> layer, bottom up. An entry covers the module and, for a subpackage, every
# module under it (``qatjax.calibration`` covers ``qatjax.calibration.observers``); the
# longest matching prefix wins. ``qatjax`` alone is the package ``__init__`` (the public
# API), and covers nothing else.
#
# A module may import modules of a lower layer, and modules of its own layer: entries listed
# at the same rank are peers (``qatjax.flax.model`` uses ``qatjax.flax``'s layers; a subpackage's
# modules import each other). Entries for modules that do not exist (yet) are allowed.
LAYERS = {
    # Core numerics: plain JAX, no flax.
    "qatjax.formats": 0,      # number formats (int2..int8, fp8)
    "qatjax.qparams": 1,      # scale / zero point, granularity
    "qatjax.fake_quant": 2,   # quantize, dequantize, fake quantization, STEs
    "qatjax.blocks": 2,       # block-scaled formats (MX, NVFP4): scales, quantize, fake quant
    "qatjax.packing": 3,      # int4 nibble packing
    "qatjax.calibration": 3,  # observers, histograms, estimators, cross-device reduction
    "qatjax.integer": 4,      # int8 x int8 -> int32 and fp8 x fp8 kernels
    "qatjax.quantizers": 5,   # operand quantizers (weight, activation recipes)
    "qatjax.qdot": 6,         # the quantized dot / conv (forward, STE backward, serving)
    "qatjax.fp8": 7,          # fp8 scaling recipes (imports integer, fake_quant, qparams, formats)
    "qatjax.ptq": 7,          # SmoothQuant, GPTQ, AWQ weight transforms (over qdot's weight path)
    "qatjax.config": 8,       # QatConfig
    # Front ends.
    "qatjax.flax": 9,         # linen layers, interception, specs and model tools
    "qatjax.nnx": 9,          # NNX drop-ins and model tools (over the linen layers and tools)
    # Tools and the public API.
    "qatjax.checkpoint": 10,
    "qatjax.export": 10,      # safetensors and StableHLO export (over the front ends' tools)
    "qatjax": 11,             # the package __init__: re-exports the public API
    "qatjax.cli": 12,         # the command line: a consumer of the public API; nothing imports it
}
FRONT_END = 9  # layers below this are the core

# Known exceptions to "the core does not import flax": (module, imported module). Remove an
# entry when the import goes (the test fails while an entry is stale).
#   calibration's histogram state is a `flax.struct.dataclass` (a pytree dataclass).
CORE_FLAX_EXCEPTIONS: set[tuple[str, str]] = set()

# Optional dependencies (examples, tests, benchmarks): never imported at module level; tqdm
# only inside a function (qatjax.calibrate's optional progress bar).
OPTIONAL = ("optax", "matplotlib", "sklearn", "tqdm")

# What examples/ may import from qatjax: the package and its public subpackages.
PUBLIC = ("qatjax", "qatjax.flax", "qatjax.flax.ptq", "qatjax.nnx", "qatjax.nnx.ptq",
          "qatjax.calibration", "qatjax.checkpoint",
          "qatjax.export")


# ----------------------------------------------------------------------------- parsing
def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """``{dotted name: path}`` of every module of the package."""
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import in ``source``.

    ``from X import a``, ``X`` a ``qatjax`` module: the module ``X.a`` when it is one of
    ``known`` (a submodule), else ``X``; ``X`` a third-party module: ``X.a`` (which may name
    an attribute, not a module). Relative imports are resolved against ``module``.
    """
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    base = ".".join(base + ([child.module] if child.module else []))
                else:
                    base = child.module
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in known or not is_qatjax(base) else base,
                                  child.lineno, inner))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def layer(name: str) -> int | None:
    """The layer of a ``qatjax`` module (None: no entry covers it)."""
    if name == "qatjax":
        return LAYERS["qatjax"]
    matches = [k for k in LAYERS if k != "qatjax" and (name == k or name.startswith(k + "."))]
    return LAYERS[max(matches, key=len)] if matches else None


def is_qatjax(name: str) -> bool:
    return name == "qatjax" or name.startswith("qatjax.")


MODULES = package_modules()


def all_imports():
    """``(module, imported, line, inside a function)`` over the whole package."""
    known = set(MODULES)
    for name, path in MODULES.items():
        for target, line, inner in imports(path.read_text(encoding="utf-8"), name,
                                           path.name == "__init__.py", known):
            yield name, target, line, inner


def _where(module, line):
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


# ----------------------------------------------------------------------------- the parser
def test_the_import_collector_finds_every_form():
    src = textwrap.dedent("""
        import qatjax.formats
        import numpy as np
        from flax import struct
        from qatjax import fake_quant, QatConfig
        from . import qparams
        from .layers import QatDense
        from ..config import QatConfig

        class C:
            import optax

        def f():
            from qatjax.qdot import DotSpec
            import tqdm
    """)
    known = {"qatjax", "qatjax.formats", "qatjax.fake_quant", "qatjax.qparams", "qatjax.flax",
             "qatjax.flax.layers", "qatjax.flax.qparams", "qatjax.config", "qatjax.qdot"}
    got = imports(src, "qatjax.flax.specs", False, known)
    assert got == [
        ("qatjax.formats", 2, False), ("numpy", 3, False), ("flax.struct", 4, False),
        ("qatjax.fake_quant", 5, False), ("qatjax", 5, False),
        ("qatjax.flax.qparams", 6, False), ("qatjax.flax.layers", 7, False),
        ("qatjax.config", 8, False), ("optax", 11, False),
        ("qatjax.qdot", 14, True), ("tqdm", 15, True),
    ]
    # In a package's __init__, `from . import x` is relative to the package itself.
    assert imports("from . import layers\n", "qatjax.flax", True, known) == [
        ("qatjax.flax.layers", 1, False)]
    assert layer("qatjax") == 11 and layer("qatjax.flax.layers") == 9
    assert layer("qatjax.calibration.reduce") == 3 and layer("qatjax.newthing") is None


# ----------------------------------------------------------------------------- the layers
def test_every_module_is_in_the_layer_table():
    missing = [f"{name} ({path.relative_to(ROOT)})" for name, path in MODULES.items()
               if layer(name) is None]
    assert not missing, (
        f"modules not in the layer table: {missing}; add each to LAYERS in "
        "tests/test_layering.py at its layer (the lowest above everything it imports)")


def test_no_module_imports_a_higher_layer():
    problems = []
    for module, target, line, _ in all_imports():
        if not is_qatjax(target):
            continue
        src, dst = layer(module), layer(target)
        if dst is None:
            problems.append(f"{_where(module, line)}: {module} imports {target}, which is not in "
                            "the layer table: add it to LAYERS in tests/test_layering.py")
        elif src is not None and dst > src:
            problems.append(f"{_where(module, line)}: {module} (layer {src}) imports {target} "
                            f"(layer {dst}), a higher layer")
    assert not problems, "\n".join(problems)


def test_the_core_does_not_import_flax():
    seen, problems = set(), []
    for module, target, line, _ in all_imports():
        rank = layer(module)
        if rank is None or rank >= FRONT_END or target.split(".")[0] != "flax":
            continue
        if (module, target) in CORE_FLAX_EXCEPTIONS:
            seen.add((module, target))
            continue
        problems.append(f"{_where(module, line)}: {module} (layer {rank}, core) imports {target}; "
                        "flax belongs to the front ends (qatjax.flax)")
    stale = CORE_FLAX_EXCEPTIONS - seen
    assert not stale, f"stale entries in CORE_FLAX_EXCEPTIONS (remove them): {sorted(stale)}"
    assert not problems, "\n".join(problems)


def test_no_optional_dependency_at_module_level():
    problems = [f"{_where(module, line)}: {module} imports {target} at module level"
                for module, target, line, inner in all_imports()
                if not inner and target.split(".")[0] in OPTIONAL]
    assert not problems, (
        "\n".join(problems) + f"\n{OPTIONAL} are not dependencies of the package (examples, "
        "tests, benchmarks): import them inside the function that needs them")


def test_importing_the_package_loads_no_optional_dependency():
    code = ("import sys, qatjax, qatjax.cli, qatjax.checkpoint\n"
            f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


# ----------------------------------------------------------------------------- the examples
@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_examples_use_only_the_public_api(path):
    """Examples (the digits experiment among them) import ``qatjax`` and its public
    subpackages only, never an internal module."""
    internal = [f"line {line}: {target}"
                for target, line, _ in imports(path.read_text(encoding="utf-8"), path.stem, False,
                                               set(MODULES))
                if is_qatjax(target) and target not in PUBLIC]
    assert not internal, f"{path.name} imports internal modules {internal}; use {PUBLIC}"


def test_the_digits_experiment_is_an_example_not_part_of_the_package():
    assert (EXAMPLES / "digits_experiment.py").is_file()
    assert "qatjax.digits" not in MODULES
