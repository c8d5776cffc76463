"""Calibration with real processes: ``jax.distributed`` over loopback, gloo CPU collectives.

The test starts 2 worker processes (this file run as a script) per configuration, with 1
and with 2 CPU devices per process, both configurations at once. Every worker holds its
own shard of the data and calibrates the same tiny model two ways:

* ``across_processes=True`` on uneven shards (5 batches on process 0, 3 on process 1, a NaN
  among process 1's): each process observes its own batches, the statistics are gathered
  and merged exactly;
* ``mesh=`` over every device of both processes, each process feeding its own devices'
  rows of every global batch (``jax.make_array_from_process_local_data``).

Both must equal, bit for bit, one process's calibration on all the batches (computed by
each worker without any collective), on every process; the first layer's min / max must
also equal numpy's over the raw data. Workers are bounded by timeouts and killed on failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

NUM_PROCESSES = 2
NUM_BATCHES = 8  # micro-batches of ROWS rows; a global mesh batch holds one per device
ROWS, FEATURES = 2, 8
SPLIT = 5  # uneven shards: batches [0, SPLIT) on process 0, the rest on process 1
TIMEOUT_S = 90  # generous: a loaded machine; unloaded, the test takes about 15 s


def dataset() -> np.ndarray:
    """``[NUM_BATCHES, ROWS, FEATURES]`` float32, ranges varying by batch, one NaN."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((NUM_BATCHES, ROWS, FEATURES)).astype(np.float32)
    x *= (2.0 ** np.arange(-3, NUM_BATCHES - 3, dtype=np.float32))[:, None, None]
    x[6, 1, 3] = np.nan
    return x


# ----------------------------------------------------------------------------- the worker


def _worker(process_id: int, local_devices: int, port: int, out_path: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id,
                               initialization_timeout=TIMEOUT_S)
    import flax.linen as nn
    from jax.sharding import Mesh

    import qatjax
    from qatjax.flax import QatDense

    minmax = qatjax.QatConfig(weight_format="int8", activation_format="int8",
                              activation_observer="minmax", activation_estimator="minmax")
    hist = qatjax.QatConfig(weight_format="int8", activation_format="uint8",
                            activation_symmetric=False, activation_observer="histogram",
                            activation_estimator="percentile", num_bins=256)

    class Net(nn.Module):
        axis_name: str | None = None

        @nn.compact
        def __call__(self, x):
            x = QatDense(8, config=minmax, axis_name=self.axis_name, name="first")(x)
            return QatDense(4, config=hist, axis_name=self.axis_name, name="second")(nn.relu(x))

    data = dataset()
    rng = np.random.default_rng(1)  # weights by hand: no init to compile
    params = {"params": {"first": {"kernel": rng.standard_normal((FEATURES, 8), np.float32),
                                   "bias": rng.standard_normal(8, np.float32)},
                         "second": {"kernel": rng.standard_normal((8, 4), np.float32),
                                    "bias": np.zeros(4, np.float32)}}}
    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == local_devices

    results = {"reference": qatjax.calibrate(Net(), params, list(data))}
    own = data[:SPLIT] if process_id == 0 else data[SPLIT:]
    results["across_processes"] = qatjax.calibrate(Net(), params, list(own), across_processes=True)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    per_step = NUM_PROCESSES * local_devices  # micro-batches per global batch
    mine = slice(process_id * local_devices, (process_id + 1) * local_devices)
    local = [data[s:s + per_step][mine].reshape(-1, FEATURES)
             for s in range(0, NUM_BATCHES, per_step)]
    results["mesh"] = qatjax.calibrate(Net("data"), params, local, mesh=mesh, data_axis="data")

    arrays = {}
    for name, variables in results.items():
        for col in ("quant_stats", "quant_params"):
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables[col]):
                if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                    leaf = leaf.addressable_data(0)  # replicated over the mesh: this copy
                arrays[f"{name}|{col}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    np.savez(out_path, **arrays)


# ----------------------------------------------------------------------------- the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_calibrate_like_one_bit_for_bit():
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # not conftest's 8 devices
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for local_devices in (1, 2):
            port = _free_port()
            for pid in range(NUM_PROCESSES):
                out = os.path.join(tmp, f"d{local_devices}_p{pid}.npz")
                log_path = os.path.join(tmp, f"d{local_devices}_p{pid}.log")
                log = open(log_path, "w+")  # noqa: SIM115 (closed in the finally below)
                proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), str(pid), str(local_devices),
                     str(port), out], env=env, stdout=log, stderr=subprocess.STDOUT)
                runs[(local_devices, pid)] = (proc, log, out)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            for key, (proc, log, _) in runs.items():
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"worker {key} timed out after {TIMEOUT_S} s") from None
                log.seek(0)
                assert proc.returncode == 0, f"worker {key} failed:\n{log.read()[-4000:]}"
        finally:
            for proc, log, _ in runs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        results = {key: dict(np.load(out)) for key, (_, _, out) in runs.items()}

    data = dataset()
    for (local_devices, pid), arrays in results.items():
        where = f"{local_devices} device(s) per process, process {pid}"
        # The single-process reference against numpy: the first layer sees the raw data.
        assert arrays["reference|quant_stats['first']['input'].lo"] == np.nanmin(data), where
        assert arrays["reference|quant_stats['first']['input'].hi"] == np.nanmax(data), where
        assert arrays["reference|quant_stats['first']['input'].num_nonfinite"] == 1, where
        # the second layer's 8 inputs per row, less the NaN row's (skipped, counted)
        assert arrays["reference|quant_stats['second']['input'].counts"].sum() == (
            NUM_BATCHES * ROWS - 1) * 8, where
        assert arrays["reference|quant_stats['second']['input'].num_nonfinite"] == 8, where
        for path, ref in arrays.items():
            name, leaf = path.split("|")
            if name == "reference":
                continue
            np.testing.assert_array_equal(ref, arrays[f"reference|{leaf}"],
                                          err_msg=f"{where}: {path}")
        # identical on every process
        for path, value in arrays.items():
            np.testing.assert_array_equal(value, results[(local_devices, 0)][path], err_msg=where)
        assert sum(p.startswith("mesh|") for p in arrays) == sum(
            p.startswith("reference|") for p in arrays) > 10


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
