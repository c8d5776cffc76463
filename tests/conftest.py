"""Test configuration: 8 forced CPU devices for the multi-device tests.

The flag must be set before jax starts its backend, which is why it lives here,
the first file pytest imports.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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
