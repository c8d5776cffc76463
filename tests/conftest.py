"""Test configuration: 8 forced CPU devices for the multi-device tests, and one persistent
compilation cache per test session.

The flag must be set before jax starts its backend, which is why it lives here,
the first file pytest imports.
"""

import os

# --xla_backend_optimization_level=0: XLA:CPU generates code without LLVM's optimization
# passes. The suite is dominated by compilation (most tests compile small programs once),
# and this cuts its CPU time by about a third. It changes how fast the machine code runs,
# not what it computes: XLA's IEEE semantics (no fast math, no FMA contraction) are the same
# at every level, so the bit-exact checks hold as they do for users (the benchmarks and
# examples run at the default level).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402

try:
    jax.config.update("jax_num_cpu_devices", 8)
except (AttributeError, RuntimeError):  # older jax: the XLA flag above does it
    pass

jax.config.update("jax_enable_x64", False)

# The examples (examples/*.py) are scripts, not part of the package; the digits experiment
# (examples/digits_experiment.py, which `qatjax run` loads) is imported by the tests as the
# examples import it: `import digits_experiment`, with examples/ on sys.path.
import sys  # noqa: E402

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES_DIR not in sys.path:
    sys.path.append(EXAMPLES_DIR)

# One persistent compilation cache per test session, shared by the xdist workers: many tests
# compile the same programs (the digits MLP's training and serving steps under several
# recipes, the examples' quick runs), which jit's in-memory cache does not reuse across
# function objects or processes. A cache hit loads the very executable a compilation would
# produce, so results are unchanged. Fresh per session (the run id names it): never stale.
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

_CACHE_ROOT = os.path.join(tempfile.gettempdir(), "qatjax-test-xla-cache")
for _old in (os.listdir(_CACHE_ROOT) if os.path.isdir(_CACHE_ROOT) else ()):  # earlier sessions'
    _path = os.path.join(_CACHE_ROOT, _old)
    if time.time() - os.path.getmtime(_path) > 6 * 3600:
        shutil.rmtree(_path, ignore_errors=True)
_CACHE_DIR = os.path.join(_CACHE_ROOT, os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
