"""QAT under a mesh equals one device: dynamic int8 scales and fp8 delayed scaling's amax
histories reduced across the right axes.

* Data parallel (with tensor parallel inside): ``shard_map`` over "data" (layers with
  ``axis_name="data"``: their dynamic scales and amaxes are ``pmax``-reduced), "model" left
  to the compiler, kernels partitioned over it by ``nn.with_partitioning``.
* Tensor parallel: one ``jit`` over globally sharded kernels and batch (layers without an
  ``axis_name``: the compiler's reductions are global).

Two steps carry the fp8 histories (the second uses the delayed scales of the first); the
outputs and histories equal one device's bit for bit, the losses and gradients to float
rounding (their sums over the batch run in another order)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import qatjax
from qatjax.calibration import shard_map
from qatjax.flax import QatDense

DYNAMIC = qatjax.QatConfig(activation_scaling="dynamic")
FP8 = qatjax.QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3",
                       weight_granularity="per_tensor", fp8_scaling="delayed", amax_history_len=4)


class Net(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = QatDense(16, config=DYNAMIC, axis_name=self.axis_name, mode="train", name="dyn",
                     kernel_init=nn.with_partitioning(init, (None, "model")))(x)
        return QatDense(4, config=FP8, axis_name=self.axis_name, mode="train", name="fp8",
                        kernel_init=nn.with_partitioning(init, ("model", None)))(nn.relu(x))


def _loss_and_grads(model, params, meta, x, y):
    def loss_fn(p):
        out, upd = model.apply({"params": p, "fp8_meta": meta}, x, mutable=["fp8_meta"])
        loss = jnp.mean((out - y) ** 2)
        if model.axis_name is not None:  # the global batch's mean
            loss = jax.lax.pmean(loss, model.axis_name)
        return loss, (upd["fp8_meta"], out)

    (loss, (meta, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, meta, out


def _data_parallel(params, meta, x, y):
    # Under shard_map's default check_vma, the replicated kernels' gradients are summed over
    # "data" by the transpose of their implicit broadcast (the quantized contractions' custom
    # gradients declare how their operands vary): the gradient of the global mean loss.
    return _loss_and_grads(Net("data"), params, meta, x, y)


def _problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    x *= 2.0 ** np.repeat(np.arange(-2, 2, dtype=np.float32), 4)[:, None]  # blocks of 4 rows
    y = rng.standard_normal((16, 4)).astype(np.float32)
    params = {"dyn": {"kernel": rng.standard_normal((8, 16), np.float32) * 0.3,
                      "bias": np.zeros(16, np.float32)},
              "fp8": {"kernel": rng.standard_normal((16, 4), np.float32) * 0.3,
                      "bias": np.zeros(4, np.float32)}}
    meta = {"fp8": {f"{name}_{kind}": value for name in ("input", "kernel") for kind, value in
                    (("amax_history", np.zeros(4, np.float32)), ("scale", np.float32(1.0)))}}
    return params, meta, x, y


def _two_steps(step, params, meta, x, y):
    """Two steps carrying the fp8 histories (parameters fixed: equal inputs to both runs)."""
    results = []
    for _ in range(2):
        loss, grads, meta, out = step(params, meta, x, y)
        results.append((loss, grads, meta, out))
    return results


def test_data_and_tensor_parallel_qat_steps_equal_one_device():
    params, meta, x, y = _problem()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    # The kernels' shardings from the model's own annotations (nn.with_partitioning).
    specs = nn.get_partition_spec(jax.eval_shape(Net().init, jax.random.key(0), x))["params"]
    assert specs["dyn"]["kernel"] == P(None, "model") and specs["fp8"]["kernel"] == P("model", None)
    sharded = jax.tree_util.tree_map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                                     params, specs)
    batch = NamedSharding(mesh, P("data"))

    reference = _two_steps(jax.jit(functools.partial(_loss_and_grads, Net())), params, meta, x, y)
    dp = jax.jit(shard_map(_data_parallel, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                           out_specs=(P(), P(), P(), P("data")), axis_names={"data"}))
    tp = jax.jit(functools.partial(_loss_and_grads, Net()))
    runs = {"data parallel": _two_steps(dp, sharded, meta, x, y),
            "tensor parallel": _two_steps(tp, sharded, meta, jax.device_put(x, batch),
                                          jax.device_put(y, batch))}

    # The test can fail: each device's block of the batch has its own range.
    block_amax = np.abs(x).reshape(4, 4, 8).max(axis=(1, 2))
    assert len(set(block_amax.tolist())) == 4
    ref_meta = reference[0][2]["fp8"]
    assert ref_meta["kernel_amax_history"][0] == np.abs(params["fp8"]["kernel"]).max()
    assert float(reference[1][2]["fp8"]["input_scale"]) != 1.0  # step 2 used a delayed scale
    for name, results in runs.items():
        for step, ((loss, grads, meta_out, out), (r_loss, r_grads, r_meta, r_out)) in enumerate(
                zip(results, reference)):
            where = f"{name}, step {step}"
            np.testing.assert_array_equal(np.asarray(out), np.asarray(r_out), err_msg=where)
            np.testing.assert_allclose(float(loss), float(r_loss), rtol=1e-6, err_msg=where)
            for a, b in zip(jax.tree_util.tree_leaves(meta_out), jax.tree_util.tree_leaves(r_meta)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
            for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(r_grads)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                                           err_msg=where)
        assert results[0][1]["dyn"]["kernel"].sharding.spec == P(None, "model"), name


def test_nnx_data_parallel_qat_step_equals_one_device():
    """The same for an NNX model (a QatLinear drop-in): a functional data-parallel step
    (nnx.split / nnx.merge) under shard_map with the dynamic scales pmax-reduced over
    "data"."""
    from flax import nnx

    import qatjax.nnx as qnnx

    class NnxNet(nnx.Module):
        def __init__(self, axis_name, rngs):
            self.dyn = qnnx.QatLinear(8, 16, config=DYNAMIC, axis_name=axis_name, mode="train",
                                      rngs=rngs)

        def __call__(self, x):
            return self.dyn(x)

    _, _, x, y = _problem()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))

    models = {name: nnx.split(NnxNet(name, nnx.Rngs(0)), nnx.Param, ...) for name in (None, "data")}

    def loss_and_grads(axis_name, params, x, y):
        graphdef, _, rest = models[axis_name]

        def loss_fn(p):
            out = nnx.merge(graphdef, p, rest)(x)
            loss = jnp.mean((out - y[:, :1]) ** 2)
            return (jax.lax.pmean(loss, axis_name) if axis_name else loss), out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, out

    params = models[None][1]
    reference = jax.jit(functools.partial(loss_and_grads, None))(params, x, y)
    dp = jax.jit(shard_map(functools.partial(loss_and_grads, "data"), mesh=mesh,
                           in_specs=(P(), P("data"), P("data")), out_specs=(P(), P(), P("data")),
                           axis_names={"data"}))
    loss, grads, out = dp(params, x, y)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference[2]))
    np.testing.assert_allclose(float(loss), float(reference[0]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # The test can fail: without the pmax over "data", each device quantizes its own block of
    # the batch (each has another range) and the outputs differ.
    local = jax.jit(shard_map(functools.partial(loss_and_grads, None), mesh=mesh,
                              in_specs=(P(), P("data"), P("data")),
                              out_specs=(P(), P(), P("data")), axis_names={"data"},
                              check_vma=False))(params, x, y)[2]
    assert not np.array_equal(np.asarray(local), np.asarray(reference[2]))
