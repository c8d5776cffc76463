"""Export for serving (qatjax.export): StableHLO artifacts that run with jax alone, and
safetensors files that load back bit for bit.

The artifacts are checked the way a serving process would use them: a fresh Python
subprocess that never imports qatjax or flax deserializes each one, feeds it the
safetensors weights (read with the safetensors package and ml_dtypes only) and two batch
sizes through the symbolic batch dimension; its outputs must equal infer mode's exactly.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

import qatjax
import qatjax.nnx as qnnx
from qatjax import export
from qatjax.flax import QatConv, QatDense, quant_mode

BATCHES = (3, 7)  # two sizes through the symbolic batch dimension


class MLP(nn.Module):
    config: qatjax.QatConfig

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QatDense(24, config=self.config)(x))
        return QatDense(5, config=self.config)(x)


class ConvNet(nn.Module):
    config: qatjax.QatConfig

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QatConv(4, (3, 3), config=self.config)(x))
        return QatDense(3, config=self.config)(x.reshape(x.shape[0], -1))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 24, rngs=rngs)
        self.l2 = nnx.Linear(24, 5, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


CASES = {
    "int8_w8a8": (MLP, qatjax.QatConfig(), (16,)),
    "int4_grouped_weight_only": (MLP, qatjax.QatConfig(
        weight_format="int4", weight_granularity="per_group", weight_group_size=8,
        activation_format=None), (16,)),
    "fp8": (MLP, qatjax.QatConfig(weight_format="fp8_e4m3", activation_format="fp8_e4m3"), (16,)),
    "nvfp4_weight_only": (MLP, qatjax.QatConfig(weight_format="nvfp4", activation_format=None),
                          (16,)),
    "int8_conv": (ConvNet, qatjax.QatConfig(), (6, 6, 2)),
}


def _data(shape, n, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


def _server(model, variables):
    """Infer mode on the converted variables, compiled once per model: ``x -> outputs``."""
    @jax.jit
    def run(served, x):
        with quant_mode("infer"):
            return model.apply(served, x)

    served = qatjax.convert(variables)
    return lambda x: np.asarray(run(served, x))


@nnx.jit
def _nnx_infer(model, x):
    with quant_mode("infer"):
        return model(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each case calibrated, exported (weights as inputs) and saved; plus the int8 MLP with
    constant weights and the NNX model: name -> (artifact path, weights path, reference fn)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (cls, cfg, shape) in CASES.items():
        model = cls(cfg)
        x = _data(shape, 8)
        variables = qatjax.calibrate(model, jax.jit(model.init)(jax.random.key(0), x), [x])
        artifact = export.export_stablehlo(model, x, variables=variables)
        paths = artifact.save(root / f"{name}.jaxexport")
        out[name] = (*paths, _server(model, variables), artifact, variables)
        if name == "int8_w8a8":
            const = export.export_stablehlo(model, x, variables=variables, weights="constants")
            assert const.weights is None
            paths = const.save(root / "int8_constants.jaxexport")
            out["int8_constants"] = (*paths, out[name][2], const, variables)
    net = NnxNet(nnx.Rngs(0))
    qnnx.quantize_model(net, qatjax.QatConfig())
    qnnx.calibrate(net, [_data((16,), 8)])
    artifact = export.export_stablehlo(net, _data((16,), 2))
    served = qnnx.convert(nnx.clone(net))
    nnx_ref = lambda x: np.asarray(_nnx_infer(served, x))  # noqa: E731
    out["nnx_int8"] = (*artifact.save(root / "nnx_int8.jaxexport"), nnx_ref, artifact, None)
    return out


# The loader a serving process needs: jax, numpy, ml_dtypes and safetensors; no qatjax, no flax.
LOADER = textwrap.dedent("""
    import json, sys
    import jax, ml_dtypes, numpy as np, safetensors
    DTYPES = {"F32": np.float32, "I32": np.int32, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}

    def load_weights(path):
        with open(path, "rb") as f:
            return {name: np.frombuffer(t["data"], DTYPES[t["dtype"]]).reshape(t["shape"])
                    for name, t in safetensors.deserialize(f.read())}

    jobs = json.loads(sys.argv[1])
    for artifact, weights, inputs, out in jobs:
        with open(artifact, "rb") as f:
            exported = jax.export.deserialize(f.read())
        args = (load_weights(weights),) if weights else ()
        data = np.load(inputs)
        np.savez(out, **{k: np.asarray(exported.call(*args, data[k])) for k in data.files})
    assert "qatjax" not in sys.modules and "flax" not in sys.modules, "imported qatjax / flax"
    print("OK", jax.__version__)
""")


def test_artifacts_run_without_qatjax_bit_identical_to_infer(exported, tmp_path):
    jobs, refs = [], {}
    for name, (artifact, weights, ref, _, _) in exported.items():
        shape = CASES.get(name, (None, None, (16,)))[2]
        inputs = {f"b{b}": _data(shape, b, seed=b) for b in BATCHES}
        np.savez(tmp_path / f"{name}_in.npz", **inputs)
        jobs.append((str(artifact), weights and str(weights), str(tmp_path / f"{name}_in.npz"),
                     str(tmp_path / f"{name}_out.npz")))
        refs[name] = {k: ref(v) for k, v in inputs.items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=240, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")
    for (name, expected), job in zip(refs.items(), jobs):
        got = np.load(job[3])
        for k, want in expected.items():
            assert got[k].shape == want.shape, name
            np.testing.assert_array_equal(got[k], want, err_msg=name)


_SIGNATURE = re.compile(r": \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")


def _contractions(artifact):
    """``(lhs type, rhs type, result type)`` of every dot_general / convolution."""
    return [_SIGNATURE.search(line).groups()
            for line in artifact.exported.mlir_module().splitlines()
            if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]


@pytest.mark.parametrize("name, operand", [("int8_w8a8", "i8"), ("int8_conv", "i8"),
                                           ("fp8", "f8E4M3FN")])
def test_stablehlo_contracts_low_precision_operands(exported, name, operand):
    """The artifact's contractions read the codes themselves (not dequantized floats): both
    operands low precision, integer ones accumulated in int32."""
    contractions = _contractions(exported[name][3])
    low = [c for c in contractions if c[0].endswith(f"x{operand}>")]
    assert len(low) == 2, contractions  # one per layer
    for lhs, rhs, result in low:
        assert rhs.endswith(f"x{operand}>"), (lhs, rhs)
        if operand == "i8":
            assert result.endswith("xi32>"), result
    # Anything else is the NaN guard's test of the activations (|x| times a vector of ones, or
    # a batch-sized reduction): never a static float matrix, which a dequantized kernel is.
    for lhs, rhs, result in contractions:
        if (lhs, rhs, result) not in low:
            assert "?" in rhs or rhs.count("x") == 1, (lhs, rhs, result)


def test_artifact_symbolic_batch_and_platforms(exported):
    artifact = exported["int8_w8a8"][3]
    assert str(artifact.exported.in_avals[-1].shape[0]) == "b"
    assert artifact.exported.platforms == ("cpu",)
    x = np.zeros((1, 3), np.float32)
    mlp = MLP(qatjax.QatConfig())
    variables = exported["int8_w8a8"][4]
    multi = export.export_stablehlo(mlp, x[:, :1].repeat(16, 1), variables=variables,
                                    platforms=("cpu", "cuda", "tpu"), polymorphic_shapes=None)
    assert multi.exported.platforms == ("cpu", "cuda", "tpu")
    assert multi.exported.in_avals[-1].shape == (1, 16)


def test_constant_weights_are_in_the_artifact(exported):
    with_inputs, constants = exported["int8_w8a8"][3], exported["int8_constants"][3]
    assert len(constants.exported.in_avals) == 1
    assert len(with_inputs.exported.in_avals) == len(with_inputs.weights) + 1
    codes = "stablehlo.constant dense<"
    assert any(codes in line and "tensor<24x16xi8>" in line  # the first layer's codes
               for line in constants.exported.mlir_module().splitlines())
    assert not any(codes in line and "xi8>" in line
                   for line in with_inputs.exported.mlir_module().splitlines())


def _leaves_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [p for p, _ in flat_a] == list(flat_b)
    for path, value in flat_a:
        other = np.asarray(flat_b[path])
        value = np.asarray(value)
        assert value.dtype == other.dtype and value.shape == other.shape, path
        np.testing.assert_array_equal(value.reshape(-1).view(np.uint8), other.reshape(-1).view(np.uint8),
                                      err_msg=str(path))


@pytest.mark.parametrize("name", list(CASES))
def test_safetensors_round_trip_is_bit_exact(exported, name, tmp_path):
    variables = exported[name][4]
    path = export.save_safetensors(tmp_path / "m.safetensors", variables)
    _leaves_equal(nn.meta.unbox(qatjax.convert(variables)), export.load_safetensors(path))
    with pytest.raises(FileExistsError, match="exists"):
        export.save_safetensors(path, variables)


def test_safetensors_layout(exported, tmp_path):
    """Names, dtypes and the header's recipe, as the README documents them."""
    path = export.save_safetensors(tmp_path / "m.safetensors",
                                   exported["int4_grouped_weight_only"][4])
    with safetensors.safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    tensors = {name: t for name, t in safetensors.deserialize(open(path, "rb").read())}
    layers = json.loads(meta["qatjax.layers"])
    assert set(layers) == {"QatDense_0", "QatDense_1"}
    recipe = layers["QatDense_0"]
    assert recipe == {"weight_format": "int4", "granularity": "per_group", "group_size": 8,
                      "symmetric": True, "input_format": None, "input_symmetric": True,
                      "input_scaling": None, "kernel_shape": [16, 24], "codes_layout": "KN",
                      "contracting": [0], "codes_shape": [16, 24], "packed": True}
    codes = tensors["quant_params/QatDense_0/kernel_codes"]
    assert codes["dtype"] == "U8" and codes["shape"] == [16, 12]  # two int4 codes per byte
    scale = tensors["quant_params/QatDense_0/kernel_scale"]
    assert scale["dtype"] == "F32" and scale["shape"] == [2, 24]  # [G, N]
    assert "quant_params/QatDense_0/kernel_zero_point" not in tensors  # symmetric: zeros
    assert "quant_params/QatDense_0/kernel_spec" not in tensors  # descriptors: in the header
    assert json.loads(json.loads(meta["qatjax.structure"])["quant_params/QatDense_0/kernel_spec"]
                      ["text"])["format"] == "int4"
    # Dequantizing by the README's rule gives the fake-quantized kernel train mode used.
    packed = np.frombuffer(codes["data"], np.uint8).reshape(16, 12).astype(np.int16)
    nibbles = np.stack([packed & 15, packed >> 4], -1).reshape(16, 24)
    q = np.where(nibbles >= 8, nibbles - 16, nibbles)
    s = np.frombuffer(scale["data"], np.float32).reshape(2, 24)
    w = q * np.repeat(s, 8, axis=0)
    variables = exported["int4_grouped_weight_only"][4]
    kernel = np.asarray(variables["params"]["QatDense_0"]["kernel"])
    amax = np.abs(kernel.reshape(2, 8, 24)).max(1)
    expected = np.clip(np.round(kernel / np.repeat(amax / 7, 8, 0)), -8, 7) * np.repeat(amax / 7, 8, 0)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-7)


def _rewrite(path, out, edit):
    """Copies a qatjax safetensors file with ``edit(tensors)`` applied, header kept."""
    with safetensors.safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    tensors = {name: np.frombuffer(t["data"], export.SAFETENSORS_DTYPES[t["dtype"]]
                                   ).reshape(t["shape"])
               for name, t in safetensors.deserialize(open(path, "rb").read())}
    edit(tensors)
    open(out, "wb").write(safetensors.numpy.save(tensors, metadata=meta))
    return out


def test_safetensors_missing_or_wrong_tensors_are_named(exported, tmp_path):
    path = export.save_safetensors(tmp_path / "m.safetensors", exported["int8_w8a8"][4])
    name = "quant_params/QatDense_1/kernel_scale"
    missing = _rewrite(path, tmp_path / "missing.safetensors", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"tensor '{name}' is missing"):
        export.load_safetensors(missing)

    def to_f16(t):
        t[name] = t[name].astype(np.float16)

    wrong = _rewrite(path, tmp_path / "wrong.safetensors", to_f16)
    with pytest.raises(ValueError, match=f"tensor '{name}' is F16 \\[5\\], expected F32 \\[5\\]"):
        export.load_safetensors(wrong)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(safetensors.numpy.save({"w": np.ones(3, np.float32)}))
    with pytest.raises(ValueError, match="not a file written by qatjax"):
        export.load_safetensors(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a safetensors file"):
        export.load_safetensors(junk)


def test_fp8_codes_keep_their_dtype(exported, tmp_path):
    path = export.save_safetensors(tmp_path / "m.safetensors", exported["fp8"][4])
    tensors = dict(safetensors.deserialize(open(path, "rb").read()))
    assert tensors["quant_params/QatDense_0/kernel_codes"]["dtype"] == "F8_E4M3"
    loaded = export.load_safetensors(path)
    assert loaded["quant_params"]["QatDense_0"]["kernel_codes"].dtype == ml_dtypes.float8_e4m3fn


def test_nnx_round_trip_through_set_collections(exported, tmp_path):
    """An NNX model's safetensors load back into a fresh NNX model that serves the same."""
    net = NnxNet(nnx.Rngs(0))
    qnnx.quantize_model(net, qatjax.QatConfig())
    qnnx.calibrate(net, [_data((16,), 8)])
    path = export.save_safetensors(tmp_path / "nnx.safetensors", qnnx.collections(net))
    fresh = NnxNet(nnx.Rngs(1))
    qnnx.quantize_model(fresh, qatjax.QatConfig())
    qnnx.set_collections(fresh, export.load_safetensors(path))
    x = _data((16,), 4, seed=3)
    np.testing.assert_array_equal(np.asarray(_nnx_infer(fresh, x)), exported["nnx_int8"][2](x))


def test_export_argument_errors():
    mlp = MLP(qatjax.QatConfig())
    x = np.zeros((2, 16), np.float32)
    variables = mlp.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="`weights` must be one of"):
        export.export_stablehlo(mlp, x, variables=variables, weights="baked")
    with pytest.raises(ValueError, match="needs its `variables`"):
        export.export_stablehlo(mlp, x)
    with pytest.raises(TypeError, match="flax.linen or flax.nnx Module"):
        export.export_stablehlo(lambda v: v, x, variables=variables)
    with pytest.raises(ValueError, match="no calibrated input_scale"):  # never calibrated
        export.export_stablehlo(mlp, x, variables=variables)
    with pytest.raises(ValueError, match="pass the whole variables dict"):
        export.save_safetensors("unused.safetensors", variables["params"])
