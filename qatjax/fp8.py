"""fp8 training: current and delayed scaling, and the fp8 dot with an fp8 backward pass.

The recipe of NVIDIA's Transformer Engine: forward operands in e4m3, the output
gradient in e5m2, one per-tensor scale for each.

* Current scaling: ``scale = amax(x now) / fp8_max * 2**margin``.
* Delayed scaling: a history of the last ``L`` amaxes; the scale used at step ``t``
  is ``max(history) / fp8_max * 2**margin`` (or the most recent amax), computed
  from steps ``< t``; the amax of step ``t`` is pushed after quantizing. A zero or
  non-finite amax keeps the previous scale.

Non-finite values and where the amax rules differ from Transformer Engine's
(``DelayedScaling``):

* NaN in, NaN out: the outputs that read a NaN or an infinity are NaN, as in float
  training, so the loss of a diverging run is non-finite. With current scaling a
  non-finite amax makes the scale, and so every output of the step, NaN.
* Delayed scaling: a non-finite amax is not pushed into the history (the scale in use
  is kept). Transformer Engine's amax kernel skips NaN (``fmaxf``) but keeps an
  infinity, stores it, and with ``"max"`` holds the previous scale for as long as the
  infinity stays in the window (up to ``amax_history_len`` steps).
* The default history is 16 steps (``QatConfig.amax_history_len``) against Transformer
  Engine's and Flax's 1024: with ``"max"`` a scale then recovers from a one-step spike
  after 16 steps instead of 1024. Set 1024 to reproduce their scales.
* ``scale`` here multiplies codes back (``x ~ q * scale``, ``scale = amax / fp8_max *
  2**margin``); Transformer Engine's ``scale`` is its reciprocal (``scale_inv`` is ours).
  Both clamp it so that a tiny amax cannot give a zero or infinite scale.

The output gradient is always scaled with its current amax, computed in the
backward pass. Delayed scaling of gradients would need the backward pass to write
state, which in JAX can only leave through a cotangent, i.e. an ``params`` entry
that the optimizer must then special-case (Flax's ``OVERWRITE_WITH_GRADIENT``);
current scaling keeps the training loop a plain optax loop.

The straight-through estimator of this recipe is the identity (as in Transformer
Engine): gradients flow through the quantized operands unmasked.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

import dataclasses

from qatjax.fake_quant import align_varying, quantize
from qatjax.formats import FloatFormat
from qatjax.qdot import DotSpec, dot_from_codes, encode_weight, nan_where_non_finite
from qatjax.qparams import QParams

__all__ = [
    "Fp8Quantizer",
    "AmaxHistory",
    "init_history",
    "scale_from_amax",
    "update_history",
    "fp8_dot",
    "amax",
]


class AmaxHistory(NamedTuple):
    """Delayed-scaling state of one tensor.

    Attributes:
      history: float32 ``[L]``, most recent amax first (zeros before any step).
      scale: float32 ``()``, the scale the next step uses (1.0 before any step).
    """

    history: jax.Array
    scale: jax.Array


def init_history(length: int) -> AmaxHistory:
    """An empty history of ``length`` amaxes with scale 1."""
    return AmaxHistory(jnp.zeros((length,), jnp.float32), jnp.ones((), jnp.float32))


def amax(x: jax.Array, axis_name: str | None = None) -> jax.Array:
    """``max|x|`` in float32 (NaN-propagating), reduced with ``pmax`` over ``axis_name``."""
    a = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return a if axis_name is None else lax.pmax(a, axis_name)


def scale_from_amax(a: jax.Array, fmt: FloatFormat, margin: int, previous: jax.Array) -> jax.Array:
    """``a / fmt.max * 2**margin``, at least ``fmt.max / float32_max``; a zero or non-finite
    ``a`` keeps ``previous``.

    The floor is Transformer Engine's (its ``fmt.max / amax`` scale is clamped to the float32
    maximum): a tiny amax (1e-37) would otherwise give a subnormal scale, which XLA:CPU
    flushes to 0, and NaN outputs.
    """
    new = a / jnp.float32(fmt.max) * jnp.float32(2.0**margin)
    new = jnp.maximum(new, jnp.float32(fmt.max / float(jnp.finfo(jnp.float32).max)))
    return jnp.where(jnp.isfinite(a) & (a > 0), new, previous)


def update_history(state: AmaxHistory, current_amax: jax.Array, fmt: FloatFormat, *,
                   margin: int = 0, algo: str = "max") -> AmaxHistory:
    """Pushes ``current_amax`` and computes the scale of the next step.

    Non-finite amaxes are not pushed (the history and the scale stay as they were).
    """
    finite = jnp.isfinite(current_amax)
    pushed = jnp.roll(state.history, 1).at[0].set(current_amax)
    history = jnp.where(finite, pushed, state.history)
    a = history[0] if algo == "most_recent" else jnp.max(history)
    return AmaxHistory(history, scale_from_amax(a, fmt, margin, state.scale))


@dataclasses.dataclass(frozen=True)
class Fp8Quantizer:
    """The operand quantizer of the fp8 recipe: one per-tensor scale, from the operand's
    current amax or from its amax history (state :class:`AmaxHistory`).

    Attributes:
      format: the operand's fp8 format.
      scaling: ``"current"`` or ``"delayed"``.
      margin: ``scale = amax / fmt.max * 2**margin``.
      history_len: delayed: length of the history.
      algo: delayed: ``"max"`` of the history or ``"most_recent"``.
    """

    format: FloatFormat
    scaling: str = "current"
    margin: int = 0
    history_len: int = 16
    algo: str = "max"

    def init(self) -> AmaxHistory:
        """The empty history (delayed scaling's state)."""
        return init_history(self.history_len)

    def qparams(self, state: AmaxHistory | None, x: jax.Array,
                axis_name: str | None = None) -> QParams:
        """``x``'s parameters: the scale of ``state`` (delayed) or of ``x``'s amax, reduced
        over ``axis_name`` (current); zero point 0."""
        if self.scaling == "delayed":
            scale = state.scale
        else:  # a non-finite amax gives a NaN scale: NaN in, NaN out
            a = amax(lax.stop_gradient(x), axis_name)
            scale = jnp.where(jnp.isfinite(a), scale_from_amax(a, self.format, self.margin,
                                                               jnp.ones((), jnp.float32)), jnp.nan)
        return QParams(scale, jnp.zeros((), jnp.int32))

    def observe(self, state: AmaxHistory, x: jax.Array, axis_name: str | None = None) -> AmaxHistory:
        """Delayed scaling: the history after this step's amax of ``x`` (pushed after use)."""
        return update_history(state, amax(lax.stop_gradient(x), axis_name), self.format,
                              margin=self.margin, algo=self.algo)


def _cast(x: jax.Array, scale: jax.Array, fmt: FloatFormat) -> jax.Array:
    """Saturating fp8 cast of ``x / scale`` (the codes of :func:`qatjax.quantize`)."""
    return quantize(x, QParams(scale, jnp.zeros((), jnp.int32)), fmt)


def fp8_dot(x, kernel, x_scale, w_scale, x_fmt, w_fmt, g_fmt, g_margin, axis_name):
    """``x @ kernel`` with fp8 operands, forward and backward.

    The kernel is cast in its own ``[K, N]`` layout and the 1-byte codes are transposed to
    ``[N, K]`` for the forward GEMM (both operands contract their last axis).

    Args:
      x: float ``[..., K]``; kernel: float ``[K, N]``.
      x_scale, w_scale: float32 scalars (per-tensor).
      x_fmt, w_fmt: fp8 formats of the operands (e4m3); g_fmt: fp8 format of the
        output gradient (e5m2) or None to keep the backward in float32.
      g_margin: margin of the gradient's current scaling.
      axis_name: mapped axis to reduce the gradient amax over (None: local).
    Returns:
      float32 ``[..., N]``: the fp8 contraction of the codes, ``q(x) . q(kernel)``, scaled by
      ``x_scale * w_scale`` (:func:`qatjax.qdot.dot_from_codes`).
    """
    return _fp8_dot(*align_varying(x, kernel, x_scale, w_scale), x_fmt, w_fmt, g_fmt, g_margin,
                    axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fp8_dot(x, kernel, x_scale, w_scale, x_fmt, w_fmt, g_fmt, g_margin, axis_name):
    return _fp8_forward(x, kernel, x_scale, w_scale, x_fmt, w_fmt)[0]


def _fp8_forward(x, kernel, x_scale, w_scale, x_fmt, w_fmt):
    """The forward on codes, shared with serving: the kernel through the one weight path
    (:func:`qatjax.qdot.encode_weight`, codes ``[N, K]``), then
    :func:`qatjax.qdot.dot_from_codes`."""
    spec = DotSpec(x_fmt, w_fmt)
    x_qp = QParams(x_scale, jnp.zeros((), jnp.int32))
    qx = quantize(x, x_qp, x_fmt)
    qw, serving = encode_weight(kernel, QParams(w_scale, jnp.zeros((), jnp.int32)), spec)
    y = nan_where_non_finite(dot_from_codes(qx, qw, x_qp, serving, spec), x, kernel, spec,
                             kernel.ndim)
    return y, qx, qw


def _fp8_dot_fwd(x, kernel, x_scale, w_scale, x_fmt, w_fmt, g_fmt, g_margin, axis_name):
    y, qx, qw = _fp8_forward(x, kernel, x_scale, w_scale, x_fmt, w_fmt)
    # Residuals are the fp8 codes: a quarter of the float32 activations' memory.
    return y, (qx, qw, x_scale, w_scale, jnp.zeros((), x.dtype), jnp.zeros((), kernel.dtype))


def _fp8_dot_bwd(x_fmt, w_fmt, g_fmt, g_margin, axis_name, res, g):
    qx, qw, x_scale, w_scale, x_proto, w_proto = res
    g = g.astype(jnp.float32)
    batch = tuple(range(g.ndim - 1))
    if g_fmt is None:
        x_hat = qx.astype(jnp.float32) * x_scale
        w_hat = qw.astype(jnp.float32) * w_scale
        dx = lax.dot_general(g, w_hat, (((g.ndim - 1,), (0,)), ((), ())))
        dw = lax.dot_general(x_hat, g, ((batch, batch), ((), ())))
    else:
        g_scale = scale_from_amax(amax(g, axis_name), g_fmt, g_margin, jnp.ones((), jnp.float32))
        qg = _cast(g, g_scale, g_fmt)
        dx = lax.dot_general(qg, qw, (((g.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32) * (g_scale * w_scale)
        dw = lax.dot_general(qx, qg, ((batch, batch), ((), ())),
                             preferred_element_type=jnp.float32) * (g_scale * x_scale)
    return (dx.astype(x_proto.dtype), dw.astype(w_proto.dtype), jnp.zeros_like(x_scale),
            jnp.zeros_like(w_scale))


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)
