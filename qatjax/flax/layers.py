"""``QatDense``, ``QatDenseGeneral``, ``QatConv`` and ``QatEinsum``: drop-ins for ``nn.Dense`` /
``nn.DenseGeneral`` / ``nn.Conv`` / ``nn.Einsum`` that quantize. Each is a thin front
end over the core: the operand quantizers of :mod:`qatjax.quantizers` and the one
quantized contraction and weight path of :mod:`qatjax.qdot`.

Same attributes and parameter names (``kernel``, ``bias``) as the Flax layers, so a
float checkpoint loads unchanged, plus ``config`` (a :class:`~qatjax.QatConfig`),
``mode`` and ``axis_name``.

Modes, in decreasing precedence: :func:`quant_mode` around a traced function (it
overrides everything, so a whole model switches at once), the call's ``mode=``
argument, the ``mode`` attribute:

* ``"float"``: exactly the Flax layer.
* ``"calibrate"``: float output; the activation observer in ``quant_stats`` sees the
  input (reduced across ``axis_name`` when given, so every replica holds the global
  statistics). Make ``quant_stats`` mutable.
* ``"train"``: quantization-aware training. With two integer (or fp8) operands the
  forward pass runs the real int8 x int8 -> int32 (fp8) matmul, the backward the STE.
* ``"infer"``: the integer serving path, on stored codes when the variables were
  converted (:func:`qatjax.convert`), else on codes computed from the float kernel.
  Its output equals train mode's bit for bit.

In train and infer modes, outputs that read a NaN or infinity of the input are NaN, as
in float mode (all of them when a dynamic scale is taken from the whole tensor, which it
makes NaN, and for a convolution); calibration observers skip and count non-finite
values. Variables
calibrated, trained or converted with another recipe than ``config`` (their
``kernel_spec`` / ``input_spec`` / ``fp8_spec``) are refused: a ValueError naming the
layer and both recipes, or, under ``jit`` with descriptors of the same length, NaN outputs.

Variables:

* ``params``: ``kernel``, ``bias``; with LSQ (``learnable_scales``) also
  ``kernel_scale`` (and ``kernel_zero_point`` for affine weights), ``input_scale``
  (and ``input_zero_point`` for affine activations).
* ``quant_stats``: ``input``, the activation observer state.
* ``quant_params``: ``kernel_spec`` / ``input_spec`` / ``fp8_spec`` (the recipe by name,
  versioned, see :mod:`qatjax.flax.specs`; written at init so variables describe
  themselves; QatDenseGeneral adds ``dense_general_spec``, its kernel's shape, QatEinsum
  ``einsum_kernel_axes``, QatConv with a mask ``kernel_mask``), ``input_scale`` and
  ``input_zero_point`` once calibrated, ``input_smoothing`` ``[K]`` after SmoothQuant / AWQ
  (QatDense, QatDenseGeneral, QatConv: the input is divided by it per input channel in every
  mode, see :mod:`qatjax.flax.ptq`), and after :func:`qatjax.convert` the
  ``kernel_codes`` with ``kernel_scale`` / ``kernel_zero_point`` (block formats: the block
  scales -- E8M0 bytes as uint8, or NVFP4's E4M3 -- and the float32 per-tensor scale, 1 for
  MX; see :class:`qatjax.BlockScales`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qatjax import fp8 as fp8_lib
from qatjax.config import QatConfig
from qatjax.fake_quant import lsq_grad_scale
from qatjax.flax import specs
from qatjax.ptq.smoothquant import smooth_input
from qatjax.qdot import (ConvSpec, DotSpec, contracting_axes, einsum_dimension_numbers, encode_weight,
                         from_serving, quantized_dot, serve, to_serving)
from qatjax.qparams import SCALE_EPS, QParams
from qatjax.quantizers import sharing_observations

__all__ = ["QatDense", "QatDenseGeneral", "QatConv", "QatEinsum", "MODES", "quant_mode"]

MODES = ("float", "calibrate", "train", "infer")
# Internal: the pass of qatjax.calibrate that turns statistics into quant_params.
_FINALIZE = "finalize"
# Internal: the pass of qatjax.quant_report that measures each contraction's output error.
_COMPARE = "compare"

_forced_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("qatjax_mode", default=None)


@contextlib.contextmanager
def quant_mode(mode: str) -> Iterator[None]:
    """Forces ``mode`` on every qatjax layer called (traced) inside the block.

    Use it inside the function you ``jit`` (or around a ``model.apply`` that is not
    jitted): it acts at trace time, so a function traced outside the block keeps
    the mode it was traced with. In calibrate mode, layers that read the same array
    observe it once (:func:`qatjax.quantizers.sharing_observations`).
    """
    if mode not in MODES + (_FINALIZE, _COMPARE):
        raise ValueError(f"quant_mode: `mode` must be one of {MODES}, got {mode!r}.")
    token = _forced_mode.set(mode)
    try:
        if mode == "calibrate":  # layers reading one tensor (query / key / value) observe it once
            with sharing_observations():
                yield
        else:
            yield
    finally:
        _forced_mode.reset(token)


class _HistoryVars:
    """Two Flax variables seen as one :class:`qatjax.fp8.AmaxHistory`."""

    def __init__(self, history, scale):
        self._history, self._scale = history, scale

    @property
    def value(self) -> fp8_lib.AmaxHistory:
        return fp8_lib.AmaxHistory(self._history.value, self._scale.value)

    @value.setter
    def value(self, state: fp8_lib.AmaxHistory) -> None:
        self._history.value, self._scale.value = state.history, state.scale


class _QuantLayer:
    """Behaviour shared by QatDense and QatConv (a mixin over the Flax layer)."""

    config: QatConfig
    mode: str | None
    axis_name: str | None

    def _read(self, col: str, name: str) -> Any:
        """A variable's value, unboxed from partitioning metadata (``nn.with_partitioning``)."""
        return nn.meta.unbox(self.get_variable(col, name))

    # ------------------------------------------------------------------ mode
    def _resolve_mode(self, mode: str | None) -> str:
        forced = _forced_mode.get()
        chosen = forced or mode or self.mode
        if self.is_initializing():
            return "init"
        if chosen is None:
            raise ValueError(
                f"{type(self).__name__} {self.path_str()}: no mode given; pass mode= one of {MODES} "
                "(as a call argument or attribute), or use qatjax.flax.quant_mode."
            )
        if chosen not in MODES + (_FINALIZE,):
            raise ValueError(f"{type(self).__name__}: `mode` must be one of {MODES}, got {chosen!r}.")
        return chosen

    def _begin(self, mode: str | None) -> tuple[str, bool]:
        """Validates the config, resolves the mode; returns ``(mode, converted)``."""
        self._check_config()
        mode = self._resolve_mode(mode)
        converted = self.has_variable("quant_params", "kernel_codes")
        if converted and mode != "infer":
            raise ValueError(
                f"{type(self).__name__} {self.path_str()}: these variables were converted for "
                f"serving (no float kernel); only mode='infer' can run them, got mode={mode!r}.")
        return mode, converted

    def path_str(self) -> str:
        return "/".join(self.scope.path) if self.scope is not None else type(self).__name__

    def _check_config(self) -> None:
        if not isinstance(self.config, QatConfig):
            raise TypeError(
                f"{type(self).__name__}: `config` must be a qatjax.QatConfig, got {type(self.config).__name__}."
            )

    # ------------------------------------------------------------------ activations
    def _smooth(self, inputs: jax.Array, n_in: int = 1) -> jax.Array:
        """``inputs / s`` over the ``n_in`` contracted trailing axes when the layer holds
        ``quant_params/input_smoothing`` ``s`` (float32 ``[K]``, ``K`` = their size; written by
        SmoothQuant / AWQ, :mod:`qatjax.flax.ptq`, with the kernel rows multiplied by ``s``);
        ``inputs`` unchanged otherwise. Applied in every mode, before observing or quantizing."""
        if not self.has_variable("quant_params", "input_smoothing"):
            return inputs
        s = self._read("quant_params", "input_smoothing")
        lead, trail = inputs.shape[:inputs.ndim - n_in], inputs.shape[inputs.ndim - n_in:]
        k = int(np.prod(trail))
        if jnp.shape(s) != (k,):
            raise ValueError(f"{type(self).__name__} {self.path_str()}: quant_params/input_smoothing "
                             f"has shape {jnp.shape(s)}, but the inputs have {k} input channels.")
        return smooth_input(inputs.reshape(lead + (k,)), s).reshape(inputs.shape)

    def _act_static(self) -> bool:
        act = self.config.activation_quantizer()
        return act is not None and act.static

    def _observe(self, x: jax.Array, update: bool) -> Any:
        """Creates (and in calibrate mode updates) the activation observer state."""
        act = self.config.activation_quantizer()
        stats = self.variable("quant_stats", "input", act.init)
        if update:
            stats.value = act.observe(stats.value, x, self.axis_name)
        return stats.value

    def _input_qparams(self, x: jax.Array, mode: str, contracting: tuple[int, ...]) -> QParams | None:
        """The input's parameters: dynamic ones from ``x`` (constant along ``contracting``),
        LSQ-learned ones in train mode, else the calibrated ones."""
        act = self.config.activation_quantizer()
        if act is None:
            return None
        if not act.static:
            return act.dynamic_qparams(x, contracting, self.axis_name)
        cols = ("params", "quant_params") if act.learnable else ("quant_params", "params")
        for col in cols:
            if self.has_variable(col, "input_scale"):
                scale = self._read(col, "input_scale")
                if act.learnable:  # floored like the learned kernel scale
                    scale = jnp.maximum(scale, jnp.float32(SCALE_EPS))
                zp = (self._read(col, "input_zero_point")
                      if self.has_variable(col, "input_zero_point") else jnp.zeros((), jnp.int32))
                return QParams(scale, zp)
        raise ValueError(
            f"{type(self).__name__} {self.path_str()}: mode={mode!r} needs calibrated activation "
            "parameters (quant_params/input_scale), and this layer has none: run "
            "qatjax.calibrate(model, variables, batches) first, or use "
            "activation_scaling='dynamic'."
        )

    def _finalize_input(self) -> None:
        """Turns the observer state into activation QParams (quant_params, or params for LSQ)."""
        act = self.config.activation_quantizer()
        qp = act.finalize(self._read("quant_stats", "input"))
        col = "params" if act.learnable else "quant_params"
        self.put_variable(col, "input_scale", qp.scale)
        if not act.symmetric:
            self.put_variable(col, "input_zero_point", qp.zero_point)

    # ------------------------------------------------------------------ weights
    def _weight_qparams(self, kernel: jax.Array, spec: DotSpec) -> QParams:
        """Weight parameters in kernel form (see :mod:`qatjax.qdot`): LSQ-learned ones (stored
        in serving form in ``params``), else min/max of the current kernel."""
        if self.config.learnable_scales and self.has_variable("params", "kernel_scale"):
            # A learned scale can reach 0 or go negative: floored as computed scales are, in
            # every mode (convert's codes are then train mode's).
            scale = jnp.maximum(self._read("params", "kernel_scale"), jnp.float32(SCALE_EPS))
            zp = (self._read("params", "kernel_zero_point")
                  if self.has_variable("params", "kernel_zero_point") else jnp.zeros_like(scale))
            return QParams(*(from_serving(a, spec, kernel.ndim) for a in (scale, zp)))
        return self.config.weight_quantizer().qparams(kernel, contracting_axes(spec, kernel.ndim))

    def _learnable_kernel_scale(self, kernel: jax.Array, spec: DotSpec, reset: bool) -> None:
        """Creates (or, when finalizing, re-initialises) the LSQ weight parameters, stored in
        serving form (``[N]``, ``[N, G]`` or ``()``)."""
        cfg = self.config
        if not (cfg.learnable_scales and cfg.weight_format is not None):
            return
        qp = cfg.weight_quantizer().qparams(kernel, contracting_axes(spec, kernel.ndim))
        scale = to_serving(qp.scale, spec, kernel.ndim)
        zp = to_serving(qp.zero_point, spec, kernel.ndim).astype(jnp.float32)
        if reset:
            self.put_variable("params", "kernel_scale", scale)
            if not cfg.weight_symmetric:
                self.put_variable("params", "kernel_zero_point", zp)
        else:
            self.param("kernel_scale", lambda _: scale)
            if not cfg.weight_symmetric:
                self.param("kernel_zero_point", lambda _: zp)

    def _dot_spec(self, x_numel_per_example: int = 1, w_numel_per_scale: int = 1, conv: bool = False,
                  **extra) -> DotSpec:
        cfg = self.config
        x_gs = w_gs = None
        if cfg.ste == "lsq" and cfg.lsq_grad_scale:
            if cfg.activation_format is not None:
                x_gs = lsq_grad_scale(x_numel_per_example, cfg.activation_format)
            if cfg.weight_format is not None:
                w_gs = lsq_grad_scale(w_numel_per_scale, cfg.weight_format)
        cls = ConvSpec if conv else DotSpec
        # Masks are provably all ones for symmetric integer parameters taken from the
        # tensor's own absmax (|round(x / (amax / qmax))| <= qmax): skip computing them.
        w_fmt, x_fmt = cfg.weight_format, cfg.activation_format
        w_own_absmax = (w_fmt is not None and not w_fmt.is_float and not w_fmt.is_block
                        and cfg.weight_symmetric and not cfg.learnable_scales)
        x_own_absmax = (x_fmt is not None and not x_fmt.is_float and not x_fmt.is_block
                        and x_fmt.signed and cfg.activation_symmetric
                        and cfg.activation_scaling == "dynamic")
        return cls(
            x_format=x_fmt, w_format=w_fmt,
            x_symmetric=cfg.activation_symmetric, w_symmetric=cfg.weight_symmetric,
            ste=cfg.ste, group_size=self._group_size(),
            x_grad_scale=x_gs, w_grad_scale=w_gs,
            x_mask=not x_own_absmax, w_mask=not w_own_absmax,
            original_residuals=cfg.original_residuals,
            x_scale_from_data=cfg.activation_scaling == "dynamic" and cfg.fp8_scaling is None,
            g_format=cfg.block_grad_format,
            **extra)

    def _observe_or_finalize(self, inputs: jax.Array, mode: str) -> None:
        """The quantization bookkeeping of the float-output modes.

        init: create the observer state and the descriptors; calibrate: update the
        observer; finalize: estimate the activation parameters and write the descriptors.
        """
        if mode == "float":
            return
        if self._act_static():
            if mode == _FINALIZE:
                self._finalize_input()
            else:
                self._observe(inputs, update=mode == "calibrate")
        if mode in ("init", _FINALIZE):
            self._write_specs()

    def _kernel_quant_state(self, kernel: jax.Array, spec: DotSpec, mode: str) -> None:
        """The weight side's state of ``kernel`` (as the layer uses it) in the float-output
        modes: init creates the fp8 delayed-scaling state and the LSQ weight scales;
        finalize re-initialises the LSQ scales from the (possibly rewritten) kernel."""
        if mode == "init":
            if self.config.fp8_scaling == "delayed":
                self._fp8_meta()
            self._learnable_kernel_scale(kernel, spec, reset=False)
        elif mode == _FINALIZE:
            self._learnable_kernel_scale(kernel, spec, reset=True)

    def _promote(self, inputs: jax.Array, kernel: jax.Array | None, bias: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """``inputs`` and ``bias`` in the compute dtype (``dtype``, else what the Flax layer
        would promote inputs and params to). The kernel stays in its stored precision: it is
        quantized from there, exactly as :func:`qatjax.convert` quantizes it, so that a bf16
        model serves the codes it trained with (rounding the kernel to bf16 first would move
        codes and scales)."""
        kernel_dtype = self.param_dtype if kernel is None else kernel.dtype
        dtype = self.dtype if self.dtype is not None else jnp.result_type(inputs.dtype, kernel_dtype)
        inputs, bias = self.promote_dtype(inputs, bias, dtype=dtype)
        return inputs, bias

    def _quantized_dense(self, inputs: jax.Array, kernel: jax.Array | None, bias: jax.Array | None,
                         mode: str, k_in: int, n_out: int) -> jax.Array:
        """Train / infer mode of a dense layer: ``inputs [..., K]``, ``kernel [K, N]`` (None once
        converted), ``bias [N]`` -> ``[..., N]`` in the compute dtype."""
        inputs, bias = self._promote(inputs, kernel, bias)
        cfg = self.config
        per_scale = {"per_group": cfg.weight_group_size,
                     "per_tensor": k_in * n_out}.get(cfg.weight_granularity, k_in)
        y = self._quantized_forward(inputs, kernel, mode, self._dot_spec(k_in, per_scale))
        y = y.astype(inputs.dtype)
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))

    def _write_specs(self) -> None:
        cfg = self.config
        for name, value in specs.describe(cfg).items():
            if self.is_mutable_collection("quant_params"):
                self.put_variable("quant_params", name, value)

    def _fp8_meta(self):
        """Delayed-scaling state of the input and the kernel, as plain arrays in ``fp8_meta``:
        ``{input,kernel}_amax_history [L]`` and ``{input,kernel}_scale ()``."""
        return tuple(
            _HistoryVars(self.variable("fp8_meta", f"{name}_amax_history", lambda q=quant: q.init().history),
                         self.variable("fp8_meta", f"{name}_scale", lambda q=quant: q.init().scale))
            for name, quant in zip(("input", "kernel"), self.config.fp8_quantizers()))

    def _fp8_recipe_forward(self, x: jax.Array, kernel: jax.Array | None, mode: str) -> jax.Array:
        """The fp8 training recipe (``config.fp8_scaling``): float32 output before bias. Its
        operand quantizers are :class:`qatjax.fp8.Fp8Quantizer`; its forward is the core
        contraction on the weight path's codes (:func:`qatjax.fp8.fp8_dot`)."""
        cfg = self.config
        x_quant, w_quant = cfg.fp8_quantizers()
        delayed = cfg.fp8_scaling == "delayed"
        meta_x, meta_w = self._fp8_meta() if delayed else (None, None)
        x_qp = x_quant.qparams(meta_x and meta_x.value, x, self.axis_name)
        spec = DotSpec(cfg.activation_format, cfg.weight_format)
        if self.has_variable("quant_params", "kernel_codes"):
            serving = QParams(*(self._read("quant_params", n) for n in ("kernel_scale", "kernel_zero_point")))
            return serve(x, self._read("quant_params", "kernel_codes"), x_qp, serving, spec)
        w_qp = w_quant.qparams(meta_w and meta_w.value, kernel)
        if mode == "infer":
            codes, serving = encode_weight(kernel, w_qp, spec)
            return serve(x, codes, x_qp, serving, spec)
        y = fp8_lib.fp8_dot(x, kernel, x_qp.scale, w_qp.scale, cfg.activation_format, cfg.weight_format,
                            cfg.fp8_grad_format, cfg.fp8_margin, self.axis_name)
        if delayed:
            if not self.is_mutable_collection("fp8_meta"):
                raise ValueError(
                    f"{type(self).__name__} {self.path_str()}: delayed fp8 scaling updates its amax "
                    "history in train mode; pass mutable=['fp8_meta'] to apply.")
            meta_x.value = x_quant.observe(meta_x.value, x, self.axis_name)
            meta_w.value = w_quant.observe(meta_w.value, kernel)
        return y

    def _group_size(self) -> int | None:
        cfg = self.config
        return cfg.weight_group_size if cfg.weight_granularity == "per_group" else None

    def _stored_weights(self, spec: DotSpec) -> tuple[jax.Array, QParams]:
        """The converted kernel codes and serving parameters (``quant_params``), in the layout
        ``spec`` serves."""
        codes = self._read("quant_params", "kernel_codes")
        serving = QParams(*(self._read("quant_params", n) for n in ("kernel_scale", "kernel_zero_point")))
        if (self.get_variable("quant_params", "kernel_spec").dtype == jnp.int32
                and spec.serving_perm(codes.ndim) != (1, 0) and codes.ndim == 2
                and not isinstance(spec, ConvSpec) and spec.dimension_numbers is None):
            # Converted before the recipe was stored by name (int32 descriptors), when every
            # dense layer served [N, K] codes and [N, G] parameters: read them in the kernel
            # layout that dense layers other than int x int / fp8 x fp8 now serve.
            codes, serving = codes.T, QParams(*(jnp.asarray(a).T for a in serving))
        return codes, serving

    def _quantized_forward(self, x: jax.Array, kernel: jax.Array | None, mode: str,
                           spec: DotSpec) -> jax.Array:
        """Output of train / infer mode in float32, before bias: the one quantized contraction
        of :mod:`qatjax.qdot` on the weight path's codes (stored ones once converted), NaN if
        the stored recipe differs from the config (see :meth:`_stored_recipe_differs`)."""
        differs = self._stored_recipe_differs()
        y = self._contraction(x, kernel, mode, spec)
        return y if differs is None else jnp.where(differs, jnp.nan, y)

    def _stored_recipe_differs(self) -> jax.Array | None:
        """Checks the recipe descriptors in the variables (``quant_params/kernel_spec``,
        ``input_spec``, ``fp8_spec``) against the config: variables calibrated, trained or
        converted with one recipe give wrong results under another.

        Concrete descriptors (eager applies, the model tools) that differ raise a ValueError
        naming the layer and both recipes; so do traced ones of another length. Traced ones
        of the same length (``jit`` with the variables as arguments) are compared on the
        device: returns that traced bool (the layer's outputs are then NaN), or None when
        everything was checked here.
        """
        expected = specs.describe_numpy(self.config)
        on_device = []
        for name in ("kernel_spec", "input_spec", "fp8_spec"):
            if not self.has_variable("quant_params", name):
                continue
            stored = self._read("quant_params", name)
            if not isinstance(stored, jax.core.Tracer):
                problem = specs.recipe_mismatch(name, stored, self.config)
            elif stored.dtype != jnp.uint8:  # descriptors of version 0, checked when concrete
                continue
            elif stored.shape[-1:] != expected[name].shape:
                problem = f"stored {stored.shape[-1]} bytes, config {specs.config_recipe_text(self.config, name)}"
            else:
                on_device.append(jnp.any(stored != expected[name]))
                continue
            if problem is not None:
                raise ValueError(
                    f"{type(self).__name__} {self.path_str()}: the variables were made with another "
                    f"recipe than this model's config ({name}: {problem}). Build the model with "
                    "the QatConfig the variables were calibrated / trained / converted with, or "
                    "recalibrate them with qatjax.calibrate.")
        return jnp.any(jnp.stack(on_device)) if on_device else None

    def _contraction(self, x: jax.Array, kernel: jax.Array | None, mode: str,
                     spec: DotSpec) -> jax.Array:
        if self.config.fp8_scaling is not None:
            return self._fp8_recipe_forward(x, kernel, mode)
        x_qp = self._input_qparams(x, mode, contracting_axes(spec, x.ndim, "lhs"))
        if self.has_variable("quant_params", "kernel_codes"):
            codes, serving = self._stored_weights(spec)
            return serve(x, codes, x_qp, serving, spec)
        w_qp = None if spec.w_format is None else self._weight_qparams(kernel, spec)
        return quantized_dot(x, kernel, x_qp, w_qp, spec)


class QatDense(_QuantLayer, nn.Dense):
    """Quantization-aware drop-in for ``flax.linen.Dense``.

    Attributes (beyond ``nn.Dense``'s):
      config: the :class:`~qatjax.QatConfig` recipe.
      mode: default mode when the call passes none (see the module docstring).
      axis_name: mapped axis (pmap / shard_map) to reduce calibration statistics and
        dynamic activation scales over.

    Shapes: ``x [..., K] -> y [..., features]``; ``kernel [K, features]``. Converted
    variables store ``kernel_codes [features, K]`` (int8 / uint8 / fp8).
    """

    config: QatConfig = QatConfig()
    mode: str | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, mode: str | None = None) -> jax.Array:  # type: ignore[override]
        mode, converted = self._begin(mode)
        inputs = self._smooth(inputs)
        if mode in ("float", "init", "calibrate", _FINALIZE):
            self._observe_or_finalize(inputs, mode)
            y = nn.Dense.__call__(self, inputs)
            if mode in ("init", _FINALIZE):
                self._kernel_quant_state(self._read("params", "kernel"), self._dot_spec(), mode)
            return y
        if converted:
            k_in = _codes_k(self._stored_weights(self._dot_spec())[0], self._dot_spec())
            kernel = None
        else:
            kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                                self.param_dtype)
            k_in = kernel.shape[0]
        if jnp.shape(inputs)[-1] != k_in:
            raise ValueError(
                f"QatDense {self.path_str()}: inputs have {jnp.shape(inputs)[-1]} features on the last "
                f"axis, but the kernel expects {k_in}."
            )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return self._quantized_dense(inputs, kernel, bias, mode, k_in, self.features)

class QatDenseGeneral(_QuantLayer, nn.DenseGeneral):
    """Quantization-aware drop-in for ``flax.linen.DenseGeneral`` contracting trailing axes.

    The contraction axes must be the input's last ``len(axis)`` axes, in order, and
    ``batch_dims`` empty (the form attention projections use). The kernel keeps
    ``nn.DenseGeneral``'s shape and initialisation, and is quantized as the dense
    ``[K, N]`` matrix it is (``K = prod(in)``, ``N = prod(features)``): per channel means
    one scale per output element. Converted variables store ``kernel_codes [N, K]``.

    Shapes: ``x [..., *in] -> y [..., *features]``; ``kernel [*in, *features]``.
    """

    config: QatConfig = QatConfig()
    mode: str | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, mode: str | None = None) -> jax.Array:  # type: ignore[override]
        mode, converted = self._begin(mode)
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        n_in = len(axis)
        if tuple(a % inputs.ndim for a in axis) != tuple(range(inputs.ndim - n_in, inputs.ndim)) or (
                self.batch_dims not in ((), None)):
            raise ValueError(
                f"QatDenseGeneral {self.path_str()}: only the input's trailing axes, in order, can be "
                f"contracted, without batch_dims; got axis={self.axis}, batch_dims={self.batch_dims} "
                f"for inputs of rank {inputs.ndim}.")
        in_shape = tuple(inputs.shape[-n_in:])
        k_in, n_out = int(np.prod(in_shape)), int(np.prod(features))
        inputs = self._smooth(inputs, n_in)
        if mode in ("float", "init", "calibrate", _FINALIZE):
            self._observe_or_finalize(inputs, mode)
            y = nn.DenseGeneral.__call__(self, inputs)
            if mode in ("init", _FINALIZE) and self.is_mutable_collection("quant_params"):
                self.put_variable("quant_params", "dense_general_spec",
                                  specs.describe_dense_general(n_in, in_shape + features))
            if mode in ("init", _FINALIZE):
                self._kernel_quant_state(self._read("params", "kernel").reshape(k_in, n_out),
                                         self._dot_spec(), mode)
            return y
        kernel = None
        if converted:
            k_codes = _codes_k(self._stored_weights(self._dot_spec())[0], self._dot_spec())
            if k_codes != k_in:
                raise ValueError(f"QatDenseGeneral {self.path_str()}: inputs have {in_shape} on the "
                                 f"contracted axes, but the kernel codes expect {k_codes} values.")
        else:
            kernel = self.param("kernel", _flat_init(self.kernel_init, n_in), in_shape + features,
                                self.param_dtype).reshape(k_in, n_out)
        bias = (self.param("bias", _flat_init(self.bias_init, 0), features, self.param_dtype).reshape(n_out)
                if self.use_bias else None)
        x = inputs.reshape(inputs.shape[:-n_in] + (k_in,))
        y = self._quantized_dense(x, kernel, bias, mode, k_in, n_out)
        return y.reshape(inputs.shape[:-n_in] + features)


def _codes_k(codes: jax.Array, spec: DotSpec) -> int:
    """The contraction size of stored dense codes (``[N, K]`` or ``[K, N]``, see
    :meth:`qatjax.qdot.DotSpec.serving_perm`)."""
    return codes.shape[spec.serving_perm(2).index(0) - 2]


def _flat_init(init, n_in: int):
    """``nn.DenseGeneral``'s initialisation: ``init`` on the flat ``[prod(in), prod(features)]``
    (``n_in`` leading axes; 0: the flat ``[prod(shape)]`` of a bias), reshaped."""
    def wrapped(rng, shape, dtype=jnp.float32):
        flat = ((int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))) if n_in
                else (int(np.prod(shape)),))
        value = init(rng, flat, dtype)
        if isinstance(value, nn.meta.AxisMetadata):
            return nn.meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)

    return wrapped


class QatConv(_QuantLayer, nn.Conv):
    """Quantization-aware drop-in for ``flax.linen.Conv`` (shared weights).

    Weights are quantized per tensor or per output channel, symmetric or affine (a weight
    zero point, uint8 codes included, costs the integer path one window-sum
    convolution); activations may be affine (uint8). The input is padded in float before quantization, so padding holds
    real zeros in every mode. ``input_dilation`` other than 1 needs symmetric activations
    (its inserted zeros must be code 0); ``mask`` is applied to the kernel before
    quantization in every mode, and stored as ``quant_params/kernel_mask`` so that
    :func:`qatjax.convert` quantizes the same masked kernel.

    Shapes: ``x [batch..., *spatial, C_in] -> y [batch..., *spatial', features]``;
    ``kernel [*kernel_size, C_in / feature_group_count, features]``.
    """

    config: QatConfig = QatConfig()
    mode: str | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, mode: str | None = None) -> jax.Array:  # type: ignore[override]
        mode, converted = self._begin(mode)
        cfg = self.config
        if cfg.weight_granularity == "per_group":
            raise ValueError("QatConv: weight_granularity='per_group' is not supported for convolutions; "
                             "use 'per_channel' or 'per_tensor'.")
        if any(f is not None and f.is_block for f in (cfg.weight_format, cfg.activation_format)):
            raise ValueError("QatConv: block formats (MX, NVFP4) are not supported for convolutions "
                             "(their blocks lie along a single contraction axis); use an integer or "
                             "fp8 format.")
        if cfg.fp8_scaling is not None:
            raise ValueError("QatConv: the fp8 training recipe (fp8_scaling) is implemented for "
                             "QatDense only.")
        if cfg.activation_granularity == "per_token":
            raise ValueError("QatConv: activation_granularity='per_token' is for QatDense (a "
                             "convolution window spans several positions, each with its own scale); "
                             "use 'per_tensor'.")
        kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        inputs = self._smooth(inputs)  # per input channel (the last axis)
        if mode in ("float", "init", "calibrate", _FINALIZE):
            self._observe_or_finalize(inputs, mode)
            y = nn.Conv.__call__(self, inputs)
            if mode in ("init", _FINALIZE):
                kernel = self._read("params", "kernel")
                if self.mask is not None:
                    # convert() quantizes the kernel as the layer uses it: masked.
                    if self.is_mutable_collection("quant_params"):
                        self.put_variable("quant_params", "kernel_mask", jnp.asarray(self.mask, jnp.bool_))
                    kernel = kernel * self.mask
                self._kernel_quant_state(kernel, self._dot_spec(conv=True), mode)
            return y
        return self._quantized_conv(inputs, kernel_size, mode, converted)

    def _quantized_conv(self, inputs, kernel_size, mode, converted):
        cfg = self.config
        n_sp = len(kernel_size)
        num_batch = inputs.ndim - (n_sp + 1)
        if num_batch < 1:
            raise ValueError(f"QatConv {self.path_str()}: inputs need a batch axis, got shape {inputs.shape}.")
        batch_shape = inputs.shape[:num_batch]
        if num_batch != 1:
            inputs = jnp.reshape(inputs, (-1,) + inputs.shape[num_batch:])
        c_in = inputs.shape[-1]
        kernel_shape = kernel_size + (c_in // self.feature_group_count, self.features)
        if converted:
            kernel = None
            expected = self._read("quant_params", "kernel_codes").shape
        else:
            kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
            expected = kernel.shape
            if self.mask is not None:
                kernel = kernel * self.mask
        if c_in % self.feature_group_count or tuple(expected) != kernel_shape:
            raise ValueError(
                f"QatConv {self.path_str()}: inputs with {c_in} channels need a kernel of shape "
                f"{kernel_shape}, but the stored kernel has shape {tuple(expected)}.")
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, bias = self._promote(inputs, kernel, bias)
        strides = _tuple(self.strides, n_sp)
        in_dil = _tuple(self.input_dilation, n_sp)
        k_dil = _tuple(self.kernel_dilation, n_sp)
        if any(d != 1 for d in in_dil):
            if cfg.activation_format is not None and not cfg.activation_symmetric:
                raise ValueError("QatConv: input_dilation needs symmetric activations.")
            inputs = lax.pad(inputs, jnp.zeros((), inputs.dtype),
                             [(0, 0, 0)] + [(0, 0, d - 1) for d in in_dil] + [(0, 0, 0)])
        inputs = _pad_input(inputs, self.padding, kernel_size, k_dil, strides)
        dn = lax.conv_dimension_numbers(inputs.shape, kernel_shape, _dn(n_sp))
        window = int(np.prod(kernel_shape[:-1]))
        per_scale = window if cfg.weight_granularity == "per_channel" else window * self.features
        spec = self._dot_spec(window, per_scale, conv=True, strides=strides, rhs_dilation=k_dil,
                              feature_group_count=self.feature_group_count, dimension_numbers=dn)
        y = self._quantized_forward(inputs, kernel, mode, spec).astype(inputs.dtype)
        if bias is not None:
            y += bias.reshape((1,) * (y.ndim - 1) + (-1,))
        if num_batch != 1:
            y = jnp.reshape(y, batch_shape + y.shape[1:])
        return y


def _tuple(v, n: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(v)


def _dn(n_sp: int):
    spatial = "HWD"[:n_sp] if n_sp <= 3 else "".join(chr(ord("a") + i) for i in range(n_sp))
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


def _pad_input(x, padding, kernel_size, k_dil, strides):
    """Pads ``x`` explicitly as ``nn.Conv`` would, so the convolution itself is VALID."""
    from flax.linen.linear import canonicalize_padding

    n_sp = len(kernel_size)
    pad = canonicalize_padding(padding, n_sp)
    if pad in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, k_dil)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        return jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
    if pad == "CAUSAL":
        if n_sp != 1:
            raise ValueError("QatConv: causal padding is only defined for 1-D convolutions.")
        left = k_dil[0] * (kernel_size[0] - 1)
        return jnp.pad(x, [(0, 0), (left, 0), (0, 0)])
    dilated = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, k_dil))
    if isinstance(pad, str):
        pairs = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, pad)
    else:
        pairs = pad
    return jnp.pad(x, [(0, 0)] + [tuple(p) for p in pairs] + [(0, 0)])


class QatEinsum(_QuantLayer, nn.Einsum):
    """Quantization-aware drop-in for ``flax.linen.Einsum`` (input x kernel).

    Same attributes and parameters (``kernel`` of ``shape``, ``bias``) as ``nn.Einsum``. The
    contraction is :func:`qatjax.qdot.quantized_einsum`'s: the kernel is quantized per
    tensor, per channel (one scale per element of its non-contracted axes, size 1 on the
    contracted ones) or per group (one contracted axis), the input per tensor or (dynamic)
    per token (every non-contracted axis). Converted variables keep the kernel's layout:
    ``kernel_codes`` of ``shape``, parameters with the contracted axes squeezed.

    Shapes: as ``jnp.einsum(einsum_str, inputs, kernel)``.
    """

    config: QatConfig = QatConfig()
    mode: str | None = None
    axis_name: str | None = None

    def _einsum_spec(self, einsum_str: str, inputs: jax.Array) -> tuple[DotSpec, tuple[int, ...]]:
        dims, perm = einsum_dimension_numbers(einsum_str, inputs.ndim, len(self.shape))
        (lc, rc), _ = dims
        k = int(np.prod([self.shape[a] for a in rc]))
        n = int(np.prod(self.shape)) // k
        per_scale = {"per_group": self.config.weight_group_size, "per_tensor": k * n}.get(
            self.config.weight_granularity, k)
        return dataclasses.replace(self._dot_spec(k, per_scale), dimension_numbers=dims), perm

    @nn.compact
    def __call__(self, inputs: jax.Array, einsum_str: str | None = None,  # type: ignore[override]
                 mode: str | None = None) -> jax.Array:
        mode, converted = self._begin(mode)
        call_str = einsum_str
        einsum_str = nn.module.merge_param("einsum_str", self.einsum_str, einsum_str).replace(" ", "")
        if self.config.fp8_scaling is not None:
            raise ValueError("QatEinsum: the fp8 training recipe (fp8_scaling) is for QatDense; use "
                             "fp8 formats with ordinary static or dynamic scales.")
        spec, perm = self._einsum_spec(einsum_str, inputs)
        if mode in ("float", "init", "calibrate", _FINALIZE):
            self._observe_or_finalize(inputs, mode)
            y = nn.Einsum.__call__(self, inputs, call_str)
            if mode in ("init", _FINALIZE):
                (_, rc), _ = spec.dimension_numbers
                if self.is_mutable_collection("quant_params"):
                    self.put_variable("quant_params", "einsum_kernel_axes", jnp.asarray(rc, jnp.int32))
                kernel = self._read("params", "kernel")
                self._kernel_quant_state(kernel, spec, mode)
            return y
        kernel = None if converted else self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias_shape, broadcast_shape = self._get_bias_shape(
                einsum_str, inputs, jnp.zeros(self.shape, self.param_dtype))
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        inputs, bias = self._promote(inputs, kernel, bias)
        y = self._quantized_forward(inputs, kernel, mode, spec)
        if perm != tuple(range(y.ndim)):
            y = jnp.transpose(y, perm)
        y = y.astype(inputs.dtype)
        return y if bias is None else y + jnp.reshape(bias, broadcast_shape)
