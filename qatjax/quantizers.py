"""Operand quantizers: how the parameters of one operand of a contraction are obtained.

Each recipe is a small frozen (hashable, static) object whose methods are pure
functions over arrays and pytree states, like an optax transform; no Flax. Front ends
(linen, NNX, interception) keep the states in their variables and call these.

* :class:`WeightQuantizer`: parameters from the kernel's own range (symmetric absmax or
  affine min / max) per tensor, per channel (every non-contracting axis) or per group
  (blocks of ``group_size`` along the contracting axis); kernel form (see
  :mod:`qatjax.qdot`).
* :class:`ActivationQuantizer`: static (an observer accumulates statistics --
  ``init`` / ``observe`` --, an estimator turns them into parameters -- ``finalize``),
  dynamic (from the tensor itself, per tensor or per token, i.e. constant along the
  contracting axes only), or learned (LSQ: the static parameters become trainable).

The fp8 training recipe's operand quantizer, current or delayed scaling with an amax
history, is :class:`qatjax.fp8.Fp8Quantizer` (beside the fp8 contraction it feeds).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from qatjax import calibration
from qatjax.blocks import BlockScales, block_scales
from qatjax.formats import Format
from qatjax.qparams import QParams, qparams_from_amax, qparams_from_minmax, split_groups

__all__ = ["WeightQuantizer", "ActivationQuantizer", "sharing_observations"]

# The observations of the outermost open `sharing_observations` block: key -> (the
# observed array, the state before, the state after), the last _SHARED_MAX of them.
_shared: contextvars.ContextVar[collections.OrderedDict | None] = contextvars.ContextVar(
    "qatjax_shared_observations", default=None)
_SHARED_MAX = 4


@contextlib.contextmanager
def sharing_observations() -> Iterator[None]:
    """Observe each array once: inside the block, :meth:`ActivationQuantizer.observe` of an
    array it has just observed (the same object, e.g. the one input of an attention's query,
    key and value layers) with the same observer recipe reuses that update instead of
    computing it again, when the two states are equal -- decided at run time
    (``lax.cond`` on their equality), so the result is always exactly the layer's own
    ``update(state, x)``. :func:`qatjax.flax.quant_mode` opens a block in calibrate mode.

    The block remembers the last few observed arrays (references to them, until it ends);
    nested blocks share the outermost one's record.
    """
    if _shared.get() is not None:
        yield
        return
    token = _shared.set(collections.OrderedDict())
    try:
        yield
    finally:
        _shared.reset(token)


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
    """Min / max (absmax when symmetric) parameters of a kernel.

    Attributes:
      format: the weight format.
      granularity: ``"per_tensor"``, ``"per_channel"`` or ``"per_group"``.
      group_size: block size along the contracting axis (per group only).
      symmetric: zero point 0 (absmax) or affine (min / max).
    """

    format: Format
    granularity: str = "per_channel"
    group_size: int | None = None
    symmetric: bool = True

    def qparams(self, w: jax.Array, contracting: tuple[int, ...]) -> QParams | BlockScales:
        """Kernel-form parameters of ``w`` (block formats: its :class:`qatjax.BlockScales`
        along the single contracting axis, whatever the granularity).

        Args:
          w: the kernel as the layer uses it (any layout).
          contracting: its contracting axes. Per channel reduces over them (one scale per
            element of the other axes, size 1 on these); per group splits the single
            contracting axis ``c`` into ``(G, g)`` and reduces over ``g`` (parameters of
            shape ``w.shape`` with ``c`` -> ``(G, 1)``); per tensor gives scalars.
        """
        w = jax.lax.stop_gradient(w)
        if self.format.is_block:
            if len(contracting) != 1:
                raise ValueError(f"block-format weights need one contracting axis, got {contracting}.")
            return block_scales(w, self.format, contracting[0])
        if self.granularity == "per_tensor":
            axes, keepdims = None, False
        elif self.granularity == "per_group":
            if len(contracting) != 1:
                raise ValueError(f"per-group weights need one contracting axis, got {contracting}.")
            w = split_groups(w, contracting[0], self.group_size)
            axes, keepdims = (contracting[0] + 1,), True
        else:
            axes, keepdims = tuple(contracting), True
        if self.symmetric or self.format.is_float:
            # max|w| in one reduction: the same parameters as min/max (0 is always in range).
            return qparams_from_amax(jnp.max(jnp.abs(w), axes, keepdims=keepdims), self.format)
        return qparams_from_minmax(jnp.min(w, axes, keepdims=keepdims),
                                   jnp.max(w, axes, keepdims=keepdims), self.format, symmetric=False)


@dataclasses.dataclass(frozen=True)
class ActivationQuantizer:
    """Parameters of an activation operand.

    Attributes:
      format: the activation format.
      symmetric: zero point 0 or affine.
      scaling: ``"static"`` (calibrated; learned when ``learnable``) or ``"dynamic"``.
      per_token: dynamic only: one scale per element of the non-contracting axes.
      observer / estimator / percentile / num_bins / ema_momentum: the static recipe
        (see :class:`qatjax.QatConfig`).
      learnable: LSQ: the finalized parameters are trained (float zero point).
    """

    format: Format
    symmetric: bool = True
    scaling: str = "static"
    per_token: bool = False
    observer: str = "histogram"
    estimator: str = "entropy"
    percentile: float = 99.99
    num_bins: int = 2048
    ema_momentum: float = 0.01
    learnable: bool = False

    @property
    def static(self) -> bool:
        return self.scaling == "static"

    def _observer(self) -> calibration.Observer:
        if self.observer == "histogram":
            return calibration.histogram(num_bins=self.num_bins, signed=not self.symmetric)
        if self.observer == "moving_average_minmax":
            return calibration.moving_average_minmax(momentum=self.ema_momentum)
        return calibration.minmax()

    def init(self) -> Any:
        """The empty observer state (a pytree of fixed shapes)."""
        return self._observer().init(jnp.zeros((1,), jnp.float32))

    def observe(self, state: Any, x: jax.Array, axis_name: str | None = None) -> Any:
        """The state after seeing ``x`` (reduced over ``axis_name``: every replica then holds
        the global statistics); non-finite values are skipped and counted."""
        x32 = jax.lax.stop_gradient(x).astype(jnp.float32)

        def update():
            return self._observer().update(state, x32, axis_name=axis_name)

        record = _shared.get()
        if record is None:
            return update()
        key = (id(x), self.observer, self.num_bins, self.symmetric, self.ema_momentum, axis_name)
        seen = record.get(key)
        if seen is None or seen[0] is not x or \
                jax.tree_util.tree_structure(seen[1]) != jax.tree_util.tree_structure(state):
            new = update()
            record[key] = (x, state, new)
            if len(record) > _SHARED_MAX:
                record.popitem(last=False)
            return new
        record.move_to_end(key)
        _, before, after = seen
        same = jnp.all(jnp.stack([jnp.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(before))]))
        return jax.lax.cond(same, lambda: after, update)

    def finalize(self, state: Any) -> QParams:
        """Statistics -> parameters with the estimator: float32 scale, zero point int32
        (float32 when ``learnable``)."""
        kwargs = {"p": self.percentile} if self.estimator == "percentile" else {}
        qp = calibration.estimate(state, self.format, self.estimator, symmetric=self.symmetric, **kwargs)
        zp_dtype = jnp.float32 if self.learnable else jnp.int32
        return QParams(qp.scale.astype(jnp.float32), qp.zero_point.astype(zp_dtype))

    def dynamic_qparams(self, x: jax.Array, contracting: tuple[int, ...],
                        axis_name: str | None = None) -> QParams | BlockScales:
        """Parameters from ``x`` itself: absmax (symmetric) or min / max (affine) of the whole
        tensor, reduced over ``axis_name``, or per token (over ``contracting`` only, size 1
        there; no cross-device reduction: every token is local). A NaN or infinity makes
        the scale it falls under NaN: the whole tensor's per tensor, its row's per token (NaN
        in, NaN out at no extra cost; the contraction's outputs that read it are NaN
        anyway).

        Block formats: the :class:`qatjax.BlockScales` of ``x`` along its single contracting
        axis (a NaN or infinity makes its block NaN); NVFP4's per-tensor amax is reduced over
        ``axis_name``."""
        x = jax.lax.stop_gradient(x)
        if self.format.is_block:
            if len(contracting) != 1:
                raise ValueError(f"block-format activations need one contracting axis, got "
                                 f"{contracting}.")
            tensor_amax = None
            if self.format.scale_format == "e4m3":
                tensor_amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
                tensor_amax = tensor_amax if axis_name is None else jax.lax.pmax(tensor_amax, axis_name)
            return block_scales(x, self.format, contracting[0], tensor_amax=tensor_amax)
        axes = tuple(contracting) if self.per_token else None
        across_devices = axis_name is not None and not self.per_token

        def extreme(v: jax.Array, reduce, collective) -> jax.Array:
            v = reduce(v, axis=axes, keepdims=self.per_token).astype(jnp.float32)
            v = jnp.where(jnp.isfinite(v), v, jnp.nan)  # an infinity too gives a NaN scale
            return collective(v, axis_name) if across_devices else v

        if self.symmetric:
            return qparams_from_amax(extreme(jnp.abs(x), jnp.max, jax.lax.pmax), self.format)
        lo = extreme(x, jnp.min, jax.lax.pmin)
        hi = extreme(x, jnp.max, jax.lax.pmax)
        return qparams_from_minmax(lo, hi, self.format, symmetric=False)
