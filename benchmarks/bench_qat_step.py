"""Cost of an int8 quantization-aware training step, against float, AQT and Qwix.

One jitted training step (forward, MSE loss, gradient, Adam update with optax) of
a stack of two residual MLP blocks, ``x + Dense(D)(gelu(Dense(4D)(x)))``, timed
for each variant on the same data in the same run:

* ``float``: ``flax.linen.Dense``, the baseline every ratio divides by;
* ``qatjax int8 dynamic``: ``qatjax.flax.QatDense`` in train mode, int8 weights
  (per channel) and int8 activations (per-tensor absmax of each batch); the forward
  runs the int8 x int8 -> int32 dot_general, the backward the STE float matmuls;
* ``qatjax int8 static``: the same with calibrated (minmax) activation scales, run
  only when ``qatjax.calibration`` is available;
* ``aqt int8``: ``nn.Dense(dot_general_cls=AqtDotGeneral)`` with
  ``aqt.jax.v2.config.fully_quantized(fwd_bits=8, bwd_bits=None)`` (int8 forward,
  float backward; no stochastic rounding since the backward is not quantized);
* ``qwix int8``: ``qwix.quantize_model`` with
  ``QtProvider([QtRule(module_path='.*', weight_qtype='int8', act_qtype='int8')])``;
* ``qatjax int8 per-token``: ``qatjax int8 dynamic`` with one activation scale per token
  (``activation_granularity="per_token"``), the activation granularity of AQT and Qwix;
* ``qatjax int8 orig-res``: ``qatjax int8 dynamic`` with ``original_residuals=True``,
  Qwix's estimator (the backward multiplies by the float x and kernel; Qwix's default
  when only the forward is quantized), for a like-for-like comparison with Qwix;
* ``float attention`` / ``qatjax attention int8``: two transformer blocks (8-head
  ``nn.MultiHeadDotProductAttention`` on sequences of 64 tokens, then the MLP block),
  float and through ``qatjax.flax.quantize_model`` with dynamic per-token int8 (the
  projections, the MLP and the attention's Q K^T and A V einsums); the second's ratio
  divides by the first;
* ``float nnx`` / ``qatjax nnx int8 dynamic``: the MLP stack written in Flax NNX
  (``nnx.Linear``), float and quantized in place by ``qatjax.nnx.quantize_model`` with the
  dynamic recipe, trained functionally (``nnx.split`` / ``nnx.merge``); the second's ratio
  divides by the first and should match the linen ``qatjax int8 dynamic`` one.

AQT and Qwix come with the ``bench`` extra (``pip install -e '.[bench]'``).

Each repeat times ``--steps`` consecutive steps of every variant in turn (so load
from other processes on the machine affects all alike); the figure is the median
over ``--repeats`` of the mean step time, after a warm-up that compiles. The ratio
is to the float step of the same run. Device-agnostic: it runs on the default JAX
backend (for a GPU run: ``--batch 8192 --dim 4096 --dtype bfloat16``; parameters
stay float32, compute runs in ``--dtype``).

Usage::

    python benchmarks/bench_qat_step.py [--batch 256] [--dim 512] [--dtype float32] [--blocks 2]
        [--steps 10] [--repeats 11] [--only float,qatjax-dynamic,...] [--profile]

Beside each time it prints the compiled step's temporary memory (``temp MB``:
``jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``) and its ratio to the
float step's; ``--blocks 12 --batch 2048 --dim 256`` is the memory configuration of the
issue (12 residual blocks).

``--profile`` also counts each variant's dot_generals by operand type in its
compiled HLO, splits each train step's op time by category from a ``jax.profiler``
trace, times forward-only and forward+backward, and times the pieces of one layer (an
int8 against a float dot at the layer shapes, the quantization ops, the backward).
``--hlo-dir DIR`` writes each variant's compiled train step there.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qatjax
import qatjax.nnx as qnnx
from qatjax.config import QatConfig
from qatjax.flax import QatDense

# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    """``x + Dense(D)(gelu(Dense(4D)(x)))``; ``dense(features, name)`` builds each layer."""

    dim: int
    dense: Callable[..., nn.Module]
    call_kwargs: tuple = ()

    @nn.compact
    def __call__(self, x):
        kw = dict(self.call_kwargs)
        h = self.dense(4 * self.dim, name="up")(x, **kw)
        h = nn.gelu(h)
        return x + self.dense(self.dim, name="down")(h, **kw)


class AttentionStack(nn.Module):
    """Two transformer blocks on sequences of ``seq`` tokens: ``x + attention(x)`` (8 heads,
    flax's ``MultiHeadDotProductAttention``: DenseGeneral projections and the Q K^T / A V
    einsums), then the MLP block."""

    dim: int
    dtype: Any
    seq: int = 64
    num_blocks: int = 2

    @nn.compact
    def __call__(self, x):
        h = x.reshape(-1, self.seq, self.dim)
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        for i in range(self.num_blocks):
            h = h + nn.MultiHeadDotProductAttention(num_heads=8, dtype=self.dtype,
                                                    param_dtype=jnp.float32, name=f"attn{i}")(h, h)
            h = Block(self.dim, dense, name=f"block{i}")(h)
        return h.reshape(x.shape)


class MLPStack(nn.Module):
    dim: int
    dense: Callable[..., nn.Module]
    call_kwargs: tuple = ()
    num_blocks: int = 2

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_blocks):
            x = Block(self.dim, self.dense, self.call_kwargs, name=f"block{i}")(x)
        return x


# ----------------------------------------------------------------------------- variants


class Variant:
    """A model to train: ``apply(params, x)`` and the variables that are not trained;
    ``baseline``: the variant its ratio divides by."""

    def __init__(self, name: str, model: nn.Module, params: Any, frozen: Any, note: str = "",
                 baseline: str = "float"):
        self.name, self.model, self.params, self.frozen, self.note = name, model, params, frozen, note
        self.baseline = baseline

    def apply(self, params, x):
        return self.model.apply({"params": params, **self.frozen}, x)


def _split(variables) -> tuple[Any, dict]:
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def _init(model, x, seed=0):
    return _split(model.init(jax.random.key(seed), x))


def make_float(dim, dtype, x, calib, blocks=2):
    dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=jnp.float32)
    model = MLPStack(dim, dense, num_blocks=blocks)
    return Variant("float", model, *_init(model, x))


def _qatjax_stack(dim, dtype, blocks, **config) -> MLPStack:
    """The benchmark model with int8 QatDense layers in train mode; ``config``: QatConfig fields."""
    cfg = QatConfig(weight_format="int8", activation_format="int8", **config)
    dense = functools.partial(QatDense, config=cfg, dtype=dtype, param_dtype=jnp.float32)
    return MLPStack(dim, dense, (("mode", "train"),), num_blocks=blocks)


def make_qatjax_dynamic(dim, dtype, x, calib, blocks=2):
    model = _qatjax_stack(dim, dtype, blocks, activation_scaling="dynamic")
    return Variant("qatjax int8 dynamic", model, *_init(model, x),
                   note="per-channel w, per-tensor absmax x each batch")


def make_qatjax_per_token(dim, dtype, x, calib, blocks=2):
    model = _qatjax_stack(dim, dtype, blocks, activation_scaling="dynamic", activation_granularity="per_token")
    return Variant("qatjax int8 per-token", model, *_init(model, x),
                   note="as dynamic, one activation scale per token (as AQT and Qwix)")


def make_qatjax_original_residuals(dim, dtype, x, calib, blocks=2):
    model = _qatjax_stack(dim, dtype, blocks, activation_scaling="dynamic", original_residuals=True)
    return Variant("qatjax int8 orig-res", model, *_init(model, x),
                   note="as dynamic, backward on float x and kernel (Qwix's estimator)")


def make_qatjax_static(dim, dtype, x, calib, blocks=2):
    model = _qatjax_stack(dim, dtype, blocks, activation_scaling="static", activation_observer="minmax",
                          activation_estimator="minmax")
    variables = model.init(jax.random.key(0), x)
    variables = qatjax.calibrate(model, variables, calib)
    params, frozen = _split(variables)
    frozen.pop("quant_stats", None)
    return Variant("qatjax int8 static", model, params, frozen,
                   note="per-channel w, calibrated minmax x")


def make_aqt(dim, dtype, x, calib, blocks=2):
    from aqt.jax.v2 import config as aqt_config
    from aqt.jax.v2.flax import aqt_flax

    # int8 forward (both operands), float backward: bwd_bits=None. Stochastic rounding
    # only concerns quantized gradients, so it is off.
    cfg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=None, use_stochastic_rounding=False)
    dg = functools.partial(aqt_flax.AqtDotGeneral, cfg, prng_name=None)
    dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=jnp.float32, dot_general_cls=dg)
    model = MLPStack(dim, dense, num_blocks=blocks)
    return Variant("aqt int8", model, *_init(model, x),
                   note="fully_quantized(fwd_bits=8, bwd_bits=None)")


def make_qwix(dim, dtype, x, calib, blocks=2):
    import qwix

    dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=jnp.float32)
    provider = qwix.QtProvider([qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")])
    model = qwix.quantize_model(MLPStack(dim, dense, num_blocks=blocks), provider)
    return Variant("qwix int8", model, *_init(model, x),
                   note="QtRule(weight_qtype=int8, act_qtype=int8)")


def make_float_attention(dim, dtype, x, calib, blocks=2):
    model = AttentionStack(dim, dtype, num_blocks=blocks)
    return Variant("float attention", model, *_init(model, x), baseline="float-attn",
                   note="2 x (8-head attention + MLP), sequences of 64")


def make_qatjax_attention(dim, dtype, x, calib, blocks=2):
    from qatjax.flax import quantize_model

    cfg = QatConfig(activation_scaling="dynamic", activation_granularity="per_token")
    model = quantize_model(AttentionStack(dim, dtype, num_blocks=blocks), cfg, mode="train")
    return Variant("qatjax attention int8", model, *_init(model, x), baseline="float-attn",
                   note="quantize_model: projections, MLP and the Q K^T / A V einsums int8, per token")


class NnxMLPStack(nnx.Module):
    """:class:`MLPStack` written in Flax NNX: ``x + Linear(D)(gelu(Linear(4D)(x)))`` per block."""

    def __init__(self, dim: int, dtype, rngs: nnx.Rngs, num_blocks: int = 2):
        linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.up = nnx.List([linear(dim, 4 * dim) for _ in range(num_blocks)])
        self.down = nnx.List([linear(4 * dim, dim) for _ in range(num_blocks)])

    def __call__(self, x):
        for up, down in zip(self.up, self.down, strict=True):
            x = x + down(nnx.gelu(up(x)))
        return x


class NnxVariant(Variant):
    """An NNX model trained functionally: ``nnx.split`` into its ``nnx.Param`` state (trained)
    and the rest; every step merges them and calls the model (in train mode for qatjax)."""

    def __init__(self, name: str, model: nnx.Module, note: str = "", baseline: str = "float-nnx",
                 mode: str | None = None):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        super().__init__(name, model, params, rest, note, baseline)
        self.graphdef, self.mode = graphdef, mode

    def apply(self, params, x):
        model = nnx.merge(self.graphdef, params, self.frozen)
        if self.mode is None:
            return model(x)
        with qnnx.quant_mode(self.mode):
            return model(x)


def make_float_nnx(dim, dtype, x, calib, blocks=2):
    return NnxVariant("float nnx", NnxMLPStack(dim, dtype, nnx.Rngs(0), blocks))


def make_qatjax_nnx(dim, dtype, x, calib, blocks=2):
    model = qnnx.quantize_model(NnxMLPStack(dim, dtype, nnx.Rngs(0), blocks),
                                QatConfig(activation_scaling="dynamic"))
    return NnxVariant("qatjax nnx int8 dynamic", model, mode="train",
                      note="qatjax.nnx.quantize_model in place: the dynamic recipe on NNX")


VARIANTS: dict[str, Callable] = {
    "float": make_float,
    "qatjax-dynamic": make_qatjax_dynamic,
    "qatjax-static": make_qatjax_static,
    "aqt": make_aqt,
    "qwix": make_qwix,
    "qatjax-orig": make_qatjax_original_residuals,
    "qatjax-token": make_qatjax_per_token,
    "float-attn": make_float_attention,
    "qatjax-attn": make_qatjax_attention,
    "float-nnx": make_float_nnx,
    "qatjax-nnx": make_qatjax_nnx,
}
MISSING_HINT = {
    "aqt": "aqt int8: skipped, aqtp is not installed (pip install -e '.[bench]')",
    "qwix": "qwix int8: skipped, qwix is not installed (pip install -e '.[bench]')",
}


def _static_available() -> str | None:
    """None when ``qatjax.calibration`` imports (calibrate itself may still fail), else why not."""
    try:
        from qatjax import calibration
    except Exception as e:  # noqa: BLE001
        return f"qatjax.calibration does not import ({type(e).__name__}: {e})"
    if not [n for n in dir(calibration) if not n.startswith("_")]:
        return "qatjax.calibration is empty (not written yet?)"
    return None


# ----------------------------------------------------------------------------- step


def make_step(variant: Variant, tx):
    def loss_fn(params, x, y):
        out = variant.apply(params, x)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - y.astype(jnp.float32)))

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), loss_fn


class Runner:
    """Holds a variant's jitted step and its (donated) training state."""

    def __init__(self, variant: Variant, tx, x, y):
        self.variant = variant
        self.compile_s = float("nan")
        self.step, self.loss_fn = make_step(variant, tx)
        self.x, self.y = x, y
        self.params = jax.tree_util.tree_map(jnp.copy, variant.params)
        self.opt_state = tx.init(self.params)
        self.loss = None

    def run(self, n: int) -> float:
        """Seconds per step over ``n`` consecutive steps."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.params, self.opt_state, self.loss = self.step(self.params, self.opt_state,
                                                               self.x, self.y)
        jax.block_until_ready((self.params, self.opt_state, self.loss))
        return (time.perf_counter() - t0) / n

    def temp_bytes(self) -> int | None:
        """The compiled train step's temporary memory (``memory_analysis().temp_size_in_bytes``:
        forward, loss, gradient and adam, activations and residuals included; the parameters,
        optimizer state and batch are arguments, not temporaries); None if the backend does
        not say."""
        compiled = self.step.lower(self.params, self.opt_state, self.x, self.y).compile()
        analysis = compiled.memory_analysis()
        return None if analysis is None else int(analysis.temp_size_in_bytes)

    def hlo(self, compiled: bool = True) -> str:
        lowered = self.step.lower(self.params, self.opt_state, self.x, self.y)
        return lowered.compile().as_text() if compiled else lowered.as_text()


# ----------------------------------------------------------------------------- HLO summary

def dot_summary(hlo: str) -> str:
    """Counts the dots of compiled HLO text by ``operand types -> result type``.

    Dots usually sit inside fused computations; operand types are looked up among the
    instructions (parameters included) of the computation that holds the dot.
    """
    counts: dict[str, int] = {}
    types: dict[str, str] = {}
    for line in hlo.splitlines():
        if re.match(r"^(ENTRY )?%\S+ \(", line):  # a new computation
            types = {}
            for pname, ptype in re.findall(r"(\w[\w.\-]*): (\w+)\[", line):
                types[pname] = ptype
            continue
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[[^\]]*\]\S* (\w[\w\-]*)\((.*)", line)
        if not m:
            continue
        name, out_t, op, rest = m.groups()
        types[name] = out_t
        if op != "dot":
            continue
        operands = re.findall(r"%(\S+?)[,)]", rest.split("), ")[0] + ")")[:2]
        in_t = "x".join(types.get(o, "?") for o in operands)
        key = f"{in_t}->{out_t}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{v}x {k}" for k, v in sorted(counts.items())) or "(no dot found)"


def lowered_dot_summary(stablehlo: str) -> str:
    """Counts the dot_generals of a lowered (pre-XLA) module by operand element types and
    precision: what the program asks for, before a backend rewrites it (XLA:CPU, for one,
    computes bfloat16 dots in float32)."""
    counts: dict[str, int] = {}
    for line in stablehlo.splitlines():
        if "stablehlo.dot_general" not in line:
            continue
        sig = re.search(r":\s*\((tensor<[^)]*)\)\s*->\s*tensor<([^>]*)>", line)
        if not sig:
            continue
        ins = [t.split("x")[-1] for t in re.findall(r"tensor<([^>]*)>", sig.group(1))]
        prec = "HIGHEST" if "HIGHEST" in line else "default"
        key = f"{'x'.join(ins)}->{sig.group(2).split('x')[-1]} {prec}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{v}x {k}" for k, v in sorted(counts.items())) or "(no dot_general found)"


# ----------------------------------------------------------------------------- profile


def _time_fn(fn, *args, repeats: int, inner: int = 10) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def pieces(args, dtype) -> list[str]:
    """Times the pieces of one quantized layer at the benchmark's two layer shapes.

    ``kernel`` is in the Flax layout ``[K, N]``; QatDense quantizes it in place and (on
    accelerators) transposes the 1-byte codes to ``[N, K]``.
    """
    from jax import lax

    from qatjax.qdot import DotSpec, encode_weight, quantized_dot

    B, D = args.batch, args.dim
    cfg = QatConfig(activation_scaling="dynamic")
    spec = DotSpec(qatjax.int8, qatjax.int8)
    kn = (((1,), (0,)), ((), ()))
    nk = (((1,), (1,)), ((), ()))
    int8 = qatjax.int8

    def amax_qp(a, axis=None):
        return qatjax.qparams_from_amax(jnp.max(jnp.abs(a), axis=axis, keepdims=axis is not None),
                                        int8)

    def quant_x(a):  # dynamic per-tensor activation codes
        return qatjax.quantize(a, amax_qp(a), int8)

    def quant_kernel_kn(k):  # per-channel codes in the kernel's own layout [K, N]
        return qatjax.quantize(k, amax_qp(k, 0), int8)

    def quant_kernel_t(k):  # serving codes [N, K]: quantized in place, codes transposed
        return encode_weight(k, cfg.weight_quantizer().qparams(k, (0,)), spec)[0]

    def ste_bwd(a, k, g):  # qatjax's backward: the vjp of quantized_dot
        qp_x = amax_qp(a)

        def op(a_, k_):
            return quantized_dot(a_, k_, qp_x, cfg.weight_quantizer().qparams(k_, (0,)), spec)

        return jax.vjp(op, a, k)[1](g)

    def float_bwd(a, k, g):
        return jax.vjp(lambda a_, k_: lax.dot_general(a_, k_, kn, preferred_element_type=jnp.float32),
                       a, k)[1](g)

    cols = [
        ("float dot", lambda a, k, qa, qk, qkt, g: (a, k),
         lambda a, k: lax.dot_general(a, k, kn, preferred_element_type=jnp.float32)),
        ("s8 dot KN", lambda a, k, qa, qk, qkt, g: (qa, qk),
         lambda a, k: lax.dot_general(a, k, kn, preferred_element_type=jnp.int32)),
        ("s8 dot NK", lambda a, k, qa, qk, qkt, g: (qa, qkt),
         lambda a, k: lax.dot_general(a, k, nk, preferred_element_type=jnp.int32)),
        ("quant x", lambda a, k, qa, qk, qkt, g: (a,), quant_x),
        ("quant w KN", lambda a, k, qa, qk, qkt, g: (k,), quant_kernel_kn),
        ("quant w.T", lambda a, k, qa, qk, qkt, g: (k,), quant_kernel_t),
        ("float bwd", lambda a, k, qa, qk, qkt, g: (a, k, g), float_bwd),
        ("qatjax bwd", lambda a, k, qa, qk, qkt, g: (a, k, g), ste_bwd),
    ]
    lines = [(f"pieces of one layer, ms (median of {args.repeats} x {args.steps} calls); kernel [K,N], "
              "'quant w.T' = the serving [N,K] codes (quantized in place, codes transposed):"),
             f"{'x [B,K] @ kernel [K,N]':<24}" + "".join(f"{c[0]:>11}" for c in cols)]
    key = jax.random.key(1)
    for K, N in ((D, 4 * D), (4 * D, D)):
        kx, kw, kg = jax.random.split(jax.random.fold_in(key, K), 3)
        a = jax.random.normal(kx, (B, K), jnp.float32).astype(dtype)
        k = (jax.random.normal(kw, (K, N), jnp.float32) * K ** -0.5).astype(dtype)
        g = jax.random.normal(kg, (B, N), jnp.float32).astype(dtype)
        qa, qk = jax.jit(quant_x)(a), jax.jit(quant_kernel_kn)(k)
        qkt = qk.T.copy()
        row = []
        for _, pick, fn in cols:
            row.append(_time_fn(jax.jit(fn), *pick(a, k, qa, qk, qkt, g),
                                repeats=args.repeats, inner=args.steps))
        lines.append(f"{f'[{B},{K}] @ [{K},{N}]':<24}" + "".join(f"{t * 1e3:11.3f}" for t in row))
    return lines


def _entry_ops(hlo: str) -> dict[str, str]:
    """Category of each top-level instruction of compiled HLO (by what its fusion contains)."""
    comps: dict[str, list[str]] = {}
    cur, entry = None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%(\S+) \(", line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        if cur is not None and line.strip().startswith(("%", "ROOT")):
            comps[cur].append(line)
    cats = {}
    for line in comps.get(entry, []):
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(", line)
        if not m:
            continue
        name, ty, shape, op = m.groups()
        body = [line]
        if op == "fusion":
            c = re.search(r"calls=%([\w.\-]+)", line)
            body = comps.get(c.group(1), []) if c else []
        ops = set(re.findall(r"= \w+\[[^\]]*\]\S* (\w[\w\-]*)\(", "\n".join(body)))
        numel = 1
        for d in filter(None, shape.split(",")):
            numel *= int(d)
        if "dot" in ops or "custom-call" in ops and any("gemm" in b or "matmul" in b for b in body):
            s8 = any(re.search(r"s8\[", b) and " parameter(" in b for b in body) or ty == "s32"
            cats[name] = "int8 dot" if s8 else "float dot"
        elif "reduce" in ops:
            cats[name] = "reduce"
        elif ops & {"transpose", "copy"} and numel > 1:
            cats[name] = "transposing elementwise" if op == "fusion" else "copy/transpose"
        elif op in ("fusion",) or op not in ("parameter", "constant", "tuple", "get-tuple-element"):
            cats[name] = "elementwise/other"
    return cats


TRACE_CATS = ("int8 dot", "float dot", "transposing elementwise", "elementwise/other", "reduce",
              "copy/transpose")


def trace_breakdown(runners: dict[str, Runner], steps: int) -> list[str]:
    """Op time per step of each variant's train step, by category, from a jax.profiler trace.

    On a CPU the XLA thunks of all worker threads are summed (CPU time, not wall time).
    """
    import glob
    import tempfile

    from jax.profiler import ProfileData

    lines = ["op time per train step by category, ms (profiler trace; on CPU summed over threads):",
             f"{'variant':<22}{'wall':>8}" + "".join(f"{c[:13]:>14}" for c in TRACE_CATS)]
    for r in runners.values():
        cats = _entry_ops(r.hlo())
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            wall = r.run(steps)
            jax.profiler.stop_trace()
            files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
            pd = ProfileData.from_file(files[0])
        per_plane: dict[str, dict[str, float]] = {}
        for plane in pd.planes:
            acc = per_plane.setdefault(plane.name, {})
            for line in plane.lines:
                for ev in line.events:
                    if ev.name in cats:
                        acc[cats[ev.name]] = acc.get(cats[ev.name], 0.0) + ev.duration_ns
        device = [p for p in per_plane if p.startswith("/device:") and per_plane[p]]
        if device:
            acc = per_plane[device[0]]
        else:  # host planes (CPU): merge them all
            acc = {}
            for a in per_plane.values():
                for k, v in a.items():
                    acc[k] = acc.get(k, 0.0) + v
        lines.append(f"{r.variant.name:<22}{wall * 1e3:8.2f}"
                     + "".join(f"{acc.get(c, 0.0) / 1e6 / steps:14.2f}" for c in TRACE_CATS))
    return lines


def whole_model(args, runners: dict[str, Runner]) -> list[str]:
    """Forward only and forward+backward (no optimizer) of each variant, ms."""
    lines = ["forward / forward+backward of the whole model (no optimizer), ms:"]
    for r in runners.values():
        fwd = jax.jit(lambda p, x, r=r: r.variant.apply(p, x))
        vg = jax.jit(jax.value_and_grad(r.loss_fn))
        tf = _time_fn(fwd, r.params, r.x, repeats=args.repeats, inner=args.steps)
        tg = _time_fn(vg, r.params, r.x, r.y, repeats=args.repeats, inner=args.steps)
        lines.append(f"  {r.variant.name:<22} fwd {tf * 1e3:8.3f}  fwd+bwd {tg * 1e3:8.3f}")
    return lines


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="tokens per step (B)")
    parser.add_argument("--dim", type=int, default=512, help="model width D (hidden 4D)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16...)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--blocks", type=int, default=2, help="residual blocks in the stacks")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--profile", action="store_true", help="time the pieces, summarize HLO")
    parser.add_argument("--hlo-dir", default="", help="write each variant's compiled HLO there")
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (args.batch, args.dim), jnp.float32).astype(dtype)
    y = jax.random.normal(ky, (args.batch, args.dim), jnp.float32).astype(dtype)
    calib = [jax.random.normal(jax.random.key(100 + i), (args.batch, args.dim)).astype(dtype)
             for i in range(4)]
    tx = optax.adam(1e-4)

    wanted = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "float" not in wanted:
        wanted.insert(0, "float")

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind}), "
          f"B={args.batch}, D={args.dim}, {args.dtype}, {args.blocks} blocks D->4D->D, adam; "
          f"median of {args.repeats} x {args.steps} steps")

    runners: dict[str, Runner] = {}
    skipped: list[str] = []
    for name in wanted:
        if name == "qatjax-static":
            why = _static_available()
            if why is not None:
                skipped.append(f"qatjax int8 static: skipped, {why}")
                continue
        try:
            variant = VARIANTS[name](args.dim, dtype, x, calib, blocks=args.blocks)
        except ImportError as e:
            if name in MISSING_HINT:
                skipped.append(f"{MISSING_HINT[name]} [{e}]")
                continue
            raise
        except Exception as e:
            if name == "float":
                raise
            label = "qatjax int8 static: skipped, calibration failed" if name == "qatjax-static" \
                else f"{name}: failed to build"
            skipped.append(f"{label}: {type(e).__name__}: {e}")
            continue
        runners[name] = Runner(variant, tx, x, y)

    # Warm up: compile, then a few steps to settle caches and the allocator.
    for name in list(runners):
        r = runners[name]
        try:
            r.compile_s = r.run(1)  # compile + one step
            r.run(max(2, args.steps // 2))
        except Exception as e:
            if name == "float":
                raise
            skipped.append(f"{r.variant.name}: step failed: {type(e).__name__}: {e}")
            del runners[name]

    times: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(args.repeats):
        for name, r in runners.items():
            times[name].append(r.run(args.steps))

    memory = {name: r.temp_bytes() for name, r in runners.items()}
    print(f"{'variant':<22} {'ms/step':>8} {'vs float':>8} {'min ms':>8} {'min vs':>7} "
          f"{'temp MB':>8} {'vs float':>8} {'compile s':>9} {'last loss':>9}  note")
    for name, r in runners.items():
        med, best = statistics.median(times[name]), min(times[name])
        baseline = r.variant.baseline
        mem = memory[name]
        mem_text = "       -" if mem is None else f"{mem / 1e6:8.1f}"
        if baseline not in times:
            ratio = ratio_min = mem_ratio = "      -"
        else:  # each ratio divides by its own float baseline (the MLP stack or the attention one)
            ratio = f"{med / statistics.median(times[baseline]):7.2f}x"
            ratio_min = f"{best / min(times[baseline]):6.2f}x"
            base_mem = memory[baseline]
            mem_ratio = ("      -" if mem is None or not base_mem
                         else f"{mem / base_mem:7.3f}x")
        print(f"{r.variant.name:<22} {med * 1e3:8.3f} {ratio} {best * 1e3:8.3f} "
              f"{ratio_min} {mem_text} {mem_ratio} {r.compile_s:9.1f} {float(r.loss):9.4f}  "
              f"{r.variant.note}")
    for line in skipped:
        print(line)

    if args.profile or args.hlo_dir:
        print("dots of the train step as lowered (operand types -> result, precision):")
        for r in runners.values():
            print(f"  {r.variant.name:<22} {lowered_dot_summary(r.hlo(compiled=False))}")
        print("dots of the compiled train step (operand types -> result):")
        for name, r in runners.items():
            text = r.hlo()
            print(f"  {r.variant.name:<22} {dot_summary(text)}")
            if args.hlo_dir:
                import os

                os.makedirs(args.hlo_dir, exist_ok=True)
                with open(os.path.join(args.hlo_dir, f"{name}.hlo.txt"), "w") as f:
                    f.write(text)
    if args.profile:
        for part in (lambda: trace_breakdown(runners, args.steps), lambda: whole_model(args, runners),
                     lambda: pieces(args, dtype)):
            try:
                lines = part()
            except Exception as e:  # noqa: BLE001  (profiling must not hide the table)
                lines = [f"(profile part failed: {type(e).__name__}: {e})"]
            for line in lines:
                print(line)


if __name__ == "__main__":
    main()
