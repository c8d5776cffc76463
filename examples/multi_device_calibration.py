"""Calibrate over 8 devices (pmap and a mesh), on one or several processes, and get the
single-device result exactly.

    python examples/multi_device_calibration.py

    # the same over 2 processes of 4 devices each (here on one machine, CPU, gloo):
    python examples/multi_device_calibration.py --num-processes 2 --process-id 0 &
    python examples/multi_device_calibration.py --num-processes 2 --process-id 1

Data-parallel calibration: each device sees a slice of every calibration batch. Give
the qatjax layers an ``axis_name`` (``QatDense(..., axis_name="batch")``, here through
``DigitsMLP(axis_name="batch")``) and every observer update reduces its batch
statistics over that mapped axis (psum of histogram counts, pmin / pmax of ranges)
before folding them in, so all replicas hold the statistics of the *global* batch.
The histogram is aligned and exactly mergeable, so the result does not depend on the
device count: the quantization parameters equal single-device calibration bit for bit.

Steps:

1. pmap, by hand: ``model.apply(variables, x, mode="calibrate", mutable=["quant_stats"])``
   once per batch under ``jax.pmap``; each process feeds its own devices' slices of the
   batch. ``qatjax.finalize(model, variables, sample)`` then turns the statistics into
   ``quant_params`` (the last step of ``qatjax.calibrate``).
2. A mesh: ``qatjax.calibrate(model, variables, batches, mesh=mesh, data_axis="batch")``
   runs every step under ``shard_map`` over the mesh's "batch" axis; each process passes
   its own part of every batch (numpy), assembled into the global batch with
   ``jax.make_array_from_process_local_data``.
3. Compare with ``qatjax.calibrate`` on one device over the same images, in batches of
   the per-device size: statistics and parameters are equal, asserted. (The batch shape
   matters only through the float forward pass: XLA may round a 128-row matmul
   differently from a 16-row one, so deeper layers can see inputs an ulp apart.)

Without 8 accelerators the example uses 8 CPU devices, forced with
``--xla_force_host_platform_device_count`` (set before jax is imported); with
``--num-processes N`` each process gets ``8 / N`` of them and joins the others with
``jax.distributed.initialize`` (gloo collectives on CPU).
"""

from __future__ import annotations

import os

NUM_DEVICES = 8
# Must happen before jax initialises its backends (i.e. before `import jax` anywhere).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()

import argparse
import sys

import jax
import numpy as np
from jax.sharding import Mesh

import qatjax
from qatjax import QatConfig

# The digits experiment (examples/digits_experiment.py) sits next to this file; run as a
# script, its directory is already on sys.path, loaded from elsewhere (tests) it may not be.
_EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
import digits_experiment as digits  # noqa: E402


def start_processes(num_processes: int, process_id: int, coordinator: str) -> None:
    """Joins ``num_processes`` processes with ``jax.distributed`` (before any computation),
    each with ``8 / num_processes`` CPU devices unless accelerators are present."""
    if num_processes == 1:
        return
    if NUM_DEVICES % num_processes:
        raise ValueError(f"--num-processes must divide {NUM_DEVICES}, got {num_processes}")
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES // num_processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def calibration_devices() -> list:
    """8 devices over all processes: the default backend's if it has 8, else the (forced)
    CPU devices."""
    devices = jax.devices()
    if len(devices) < NUM_DEVICES:
        devices = jax.devices("cpu")
    if len(devices) < NUM_DEVICES:
        raise RuntimeError(
            f"need {NUM_DEVICES} devices, found {len(devices)}: set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={NUM_DEVICES} before jax is imported.")
    return devices[:NUM_DEVICES]


def process_share(x: np.ndarray) -> np.ndarray:
    """This process's rows of a global batch: the devices are ordered process by process, so
    process ``p`` holds the ``p``-th of ``process_count`` equal parts."""
    n = x.shape[0] // jax.process_count()
    return x[jax.process_index() * n:(jax.process_index() + 1) * n]


def host_value(tree):
    """Statistics or parameters as numpy arrays; a global array replicated over processes
    is read from this process's copy."""
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a), tree)


def stats_with_pmap(model, params, batches, devices) -> dict:
    """quant_stats after one calibrate-mode apply per batch, each batch split over devices;
    each process feeds the slices of its own (local) devices."""
    local = [d for d in devices if d.process_index == jax.process_index()]

    def step(variables, x):  # per device: x is this device's slice of the batch
        _, updates = model.apply(variables, x, mode="calibrate", mutable=["quant_stats"])
        return updates["quant_stats"]

    pstep = jax.pmap(step, axis_name="batch", devices=devices)
    # pmap maps over a leading device axis: one copy of the parameters per local device.
    replicated = jax.tree_util.tree_map(
        lambda a: np.broadcast_to(a, (len(local),) + np.shape(a)), {"params": params})
    for x in batches:
        mine = process_share(x)
        shards = mine.reshape((len(local), -1) + x.shape[1:])  # [local devices, per device, ...]
        stats = pstep(replicated, shards)
        replicated = {**replicated, "quant_stats": stats}
    # Every replica holds the same (globally reduced) statistics: check, then take one.
    for leaf in jax.tree_util.tree_leaves(stats):
        leaf = np.asarray(leaf)
        assert all(np.array_equal(leaf[0], leaf[i]) for i in range(len(local))), "replicas disagree"
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[0], stats)


def input_qparams(variables) -> dict:
    """{layer: (input_scale, input_zero_point)} as numpy arrays."""
    qp = variables["quant_params"]
    return {layer: (np.asarray(qp[layer]["input_scale"]), np.asarray(qp[layer]["input_zero_point"]))
            for layer in sorted(qp)}


def run(epochs: int = 5, calib_samples: int = 1024, batch_size: int = 128,
        estimator: str = "entropy") -> dict:
    """Runs the comparison; returns the three calibrated variable dicts."""
    devices = calibration_devices()
    if batch_size % len(devices):
        raise ValueError(f"batch_size {batch_size} must divide evenly over {len(devices)} devices")
    print(f"{len(devices)} devices: {devices[0].platform} x{len(devices)}")

    data = digits.load_data()
    _, float_vars = digits.train_float(data, digits.FULL.replace(float_epochs=epochs))
    params = float_vars["params"]
    x = data.x_train[:calib_samples - calib_samples % batch_size]
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]

    config = QatConfig(weight_format="int8", activation_format="uint8", activation_symmetric=False,
                       activation_observer="histogram", activation_estimator=estimator)
    single_model = digits.DigitsMLP(config=config)
    dp_model = digits.DigitsMLP(config=config, axis_name="batch")   # QatDense(axis_name="batch")

    # Reference: one device, the same images in batches of the per-device size. (The
    # statistics do not depend on how the images are split -- the histogram merges
    # exactly -- but the float forward pass does: XLA may round a 128-row matmul
    # differently from a 16-row one, which moves deeper layers' inputs by an ulp.)
    per_device = batch_size // len(devices)
    micro = [x[i:i + per_device] for i in range(0, len(x), per_device)]
    single = qatjax.calibrate(single_model, {"params": params}, micro,
                              progress=jax.process_index() == 0)

    stats = stats_with_pmap(dp_model, params, batches, devices)
    # Finalize on one device: the estimators run on the (identical) global statistics.
    results = {"single device": single,
               "pmap": qatjax.finalize(single_model, {"params": params, "quant_stats": stats},
                                       batches[0])}
    # The mesh: every process passes its own part of each batch.
    mesh = Mesh(np.array(devices), ("batch",))
    results["shard_map"] = host_value(qatjax.calibrate(
        dp_model, {"params": params}, [process_share(b) for b in batches], mesh=mesh,
        data_axis="batch"))

    ref = input_qparams(single)
    print(f"\n{len(batches)} batches of {batch_size} ({batch_size // len(devices)} per device), "
          f"{estimator} estimator; input scale / zero point per layer:")
    print(f"{'layer':8s}  {'run':13s}  {'input_scale':>12s}  {'zero_point':>10s}  equal to single device")
    for name, variables in results.items():
        got = input_qparams(variables)
        for layer, (scale, zp) in got.items():
            same = np.array_equal(scale, ref[layer][0]) and np.array_equal(zp, ref[layer][1])
            print(f"{layer:8s}  {name:13s}  {float(scale):12.8g}  {int(zp):10d}  {same}")
        # Bit-for-bit: observer states and every quant param (scales, zero points, descriptors).
        for key in ("quant_stats", "quant_params"):
            a = jax.tree_util.tree_leaves(jax.device_get(single[key]))
            b = jax.tree_util.tree_leaves(jax.device_get(variables[key]))
            assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b)), \
                f"{name}: {key} differs from single-device calibration"
    print("\npmap and mesh (shard_map) calibration equal single-device calibration bit for bit.")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Calibrate over 8 devices with pmap and a mesh.")
    parser.add_argument("--epochs", type=int, default=5, help="float training epochs (default 5)")
    parser.add_argument("--estimator", default="entropy", choices=qatjax.calibration.METHODS)
    parser.add_argument("--num-processes", type=int, default=1,
                        help="processes to spread the 8 devices over (default 1)")
    parser.add_argument("--process-id", type=int, default=0, help="this process's index")
    parser.add_argument("--coordinator", default="127.0.0.1:12421",
                        help="address of process 0 (default 127.0.0.1:12421)")
    args = parser.parse_args(argv)
    start_processes(args.num_processes, args.process_id, args.coordinator)
    run(epochs=args.epochs, estimator=args.estimator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
