"""Quantization-aware distillation: train a quantized linen model against its float teacher.

The objective is the distance between the quantized model's outputs and the float model's
own outputs on the same (unlabeled) inputs, the teacher frozen in the same jitted step:
cosine distance of embeddings (:func:`embedding_distance`, optionally plus their mean
squared error), or the KL divergence of logits (:func:`logit_distance`), or any function of
the two models' outputs. This is how QAT recovers what post-training quantization loses
without labels (Gemma 3's QAT, torchao's QAT recipes train against the float model).

:func:`distiller` builds the training step from the quantized ``model`` (a module of qatjax
layers, or :func:`qatjax.flax.quantize_model`'s result), the teacher's variables and an
optax optimizer, optax style: ``init(variables) -> state``, ``step(state, *batch) ->
(state, loss)``. Everything in ``params`` is trained unless ``trainable`` says otherwise:
the kernels and biases, and with ``learnable_scales`` (LSQ) the weight and activation
scales and the affine zero points, which live in ``params`` too. Any variables of the
quantized model are a valid start: :func:`qatjax.calibrate`'s (min/max, mse, ... estimators)
or another post-training method's result (GPTQ, AWQ, SmoothQuant), as long as its
``params`` hold the kernels (and LSQ scales) train mode reads.

The state is a plain pytree (:class:`DistillState`): save it with :func:`qatjax.checkpoint.save`
and restore it with :func:`qatjax.checkpoint.load` given ``init``'s state as the target,
and the run continues bit for bit (the step is deterministic for the same inputs).

optax is imported where it is used (it is not a dependency of the package).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from qatjax.flax.layers import quant_mode

__all__ = ["DistillState", "Distiller", "distiller", "embedding_distance", "logit_distance"]

Variables = Mapping[str, Any]


# ----------------------------------------------------------------------------- losses
def _masked_mean(values: jax.Array, where: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over the entries where ``where`` is true (all without it)."""
    if where is None:
        return jnp.mean(values)
    w = jnp.broadcast_to(jnp.asarray(where, values.dtype), values.shape)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def embedding_distance(student: jax.Array, teacher: jax.Array, *, mse_weight: float = 0.0,
                       where: jax.Array | None = None) -> jax.Array:
    """Mean cosine distance (plus ``mse_weight`` times the mean squared error) of vectors.

    ``student`` and ``teacher`` are ``[..., d]`` (sentence embeddings ``[B, d]``, or hidden
    states ``[B, T, d]``); ``where`` (broadcastable to ``[...]``, e.g. an attention mask
    ``[B, T]``) selects the rows averaged over. With ``c_i`` the cosine similarity of row
    ``i`` and ``n`` the number of rows::

        loss = sum_i (1 - c_i) / n + mse_weight * sum_i mean_k (s_ik - t_ik)^2 / n

    Returns a float32 scalar (0 when the rows are parallel and equal).
    """
    import optax

    if student.shape != teacher.shape:
        raise ValueError(f"embedding_distance: `student` {student.shape} and `teacher` "
                         f"{teacher.shape} must have the same shape.")
    student, teacher = student.astype(jnp.float32), teacher.astype(jnp.float32)
    loss = _masked_mean(optax.losses.cosine_distance(student, teacher, epsilon=1e-12), where)
    if mse_weight:
        loss = loss + mse_weight * _masked_mean(
            jnp.mean(optax.losses.squared_error(student, teacher), axis=-1), where)
    return loss


def logit_distance(student: jax.Array, teacher: jax.Array, *, temperature: float = 1.0,
                   where: jax.Array | None = None) -> jax.Array:
    """Mean KL divergence ``KL(softmax(t / T) || softmax(s / T)) * T^2`` of logits ``[..., C]``
    (Hinton's distillation loss; ``T`` the ``temperature``), over the rows ``where`` selects.

    Returns a float32 scalar (0 when the logits are equal).
    """
    import optax

    if student.shape != teacher.shape:
        raise ValueError(f"logit_distance: `student` {student.shape} and `teacher` "
                         f"{teacher.shape} must have the same shape.")
    if not temperature > 0:
        raise ValueError(f"logit_distance: `temperature` must be > 0, got {temperature!r}.")
    s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    kl = optax.losses.kl_divergence_with_log_targets(s, t, axis=-1)
    return _masked_mean(kl, where) * temperature ** 2


# ----------------------------------------------------------------------------- training
class DistillState(NamedTuple):
    """The training state (a pytree; checkpoint it as a whole).

    Attributes:
      step: int32 scalar, the number of steps taken.
      params: the trained parameters (the ``trainable`` part of ``params``, same nesting).
      opt_state: the optimizer's state of ``params``.
      frozen: every other variable of the student: frozen parameters (``"params"``) and the
        other collections (``quant_params``, ``quant_stats``).
    """

    step: jax.Array
    params: dict
    opt_state: Any
    frozen: dict


class Distiller(NamedTuple):
    """What :func:`distiller` returns.

    Attributes:
      init: ``init(variables) -> DistillState``: the student's starting variables (e.g. a
        PTQ result) split into trained and frozen parts, and the optimizer's state.
      step: ``step(state, *batch) -> (state, loss)``: one jitted optimizer step on the
        distillation loss of ``batch`` (the loss before the update).
      loss: ``loss(state, *batch) -> loss``: the distillation loss without an update
        (jitted), e.g. on held-out data.
      variables: ``variables(state) -> dict``: the student's variables (for
        :func:`qatjax.convert`, evaluation, export).
    """

    init: Callable[[Variables], DistillState]
    step: Callable[..., tuple[DistillState, jax.Array]]
    loss: Callable[..., jax.Array]
    variables: Callable[[DistillState], dict]


def _apply(module: nn.Module, variables: Variables, *batch: Any) -> Any:
    return module.apply(variables, *batch)


def _split(params: Variables, trainable: Callable[[tuple[str, ...], jax.Array], bool]
           ) -> tuple[dict, dict]:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(params)))
    keep = {k: bool(trainable(k, v)) for k, v in flat.items()}
    if not any(keep.values()):
        raise ValueError("distiller: `trainable` selects no parameter of the student's params.")
    pick = lambda want: flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if keep[k] == want})
    return pick(True), pick(False)


def _merge(trained: Variables, frozen: Variables) -> dict:
    """The student's variables: the trained parameters merged into the frozen ones."""
    params = flax.traverse_util.flatten_dict(dict(frozen.get("params", {})))
    params.update(flax.traverse_util.flatten_dict(dict(trained)))
    return {**frozen, "params": flax.traverse_util.unflatten_dict(params)}


def distiller(model: nn.Module, teacher_variables: Variables, optimizer: Any, *,
              loss: Callable[..., jax.Array] | None = None,
              outputs: Callable[..., Any] | None = None,
              teacher: nn.Module | None = None,
              trainable: Callable[[tuple[str, ...], jax.Array], bool] | None = None
              ) -> Distiller:
    """Quantization-aware distillation of ``model`` against a frozen float teacher.

    Each step computes, in one jitted function, ``t = outputs(teacher, teacher_variables,
    *batch)`` in float mode (under ``jax.lax.stop_gradient``), ``s = outputs(model,
    variables, *batch)`` in train mode (fake quantization: the int8 / int4 forward, the
    straight-through or LSQ backward), the scalar ``loss(s, t, *batch)``, its gradient with
    respect to the trained parameters, and the ``optimizer`` update.

    Args:
      model: the quantized student: a linen module of qatjax layers, or
        :func:`qatjax.flax.quantize_model`'s result. It runs under
        :func:`~qatjax.flax.quant_mode` (``"train"``), which sets every layer's mode.
      teacher_variables: the teacher's variables, frozen (e.g. the float checkpoint
        ``{"params": float_params}``). Passed to the jitted step as an argument, not
        baked into it as a constant.
      optimizer: an ``optax.GradientTransformation`` (schedules, clipping: chain them).
      loss: ``loss(student_outputs, teacher_outputs, *batch) -> scalar``. Default: the
        cosine distance of the outputs (:func:`embedding_distance`).
      outputs: ``outputs(module, variables, *batch) -> pytree``: what the two models are
        compared on (e.g. an embedding and hidden states captured with
        ``capture_intermediates``). Default: ``module.apply(variables, *batch)``.
      teacher: the float module. Default: ``model`` itself in float mode (a quantized
        model's float mode is exactly the float model).
      trainable: ``trainable(path, leaf) -> bool`` over the paths of ``params`` (tuples of
        names, e.g. ``("layer_0", "intermediate", "kernel_scale")``); the others are frozen
        (no gradient, no optimizer state). Default: every parameter.

    Returns:
      A :class:`Distiller` ``(init, step, loss, variables)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"distiller: `model` must be a flax.linen Module, got "
                        f"{type(model).__name__}.")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"distiller: `teacher` must be a flax.linen Module or None, got "
                        f"{type(teacher).__name__}.")
    if not isinstance(teacher_variables, Mapping) or "params" not in teacher_variables:
        raise ValueError("distiller: `teacher_variables` must be a variables dict with "
                         "'params' (e.g. {'params': float_params}).")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"distiller: `optimizer` must be an optax GradientTransformation, got "
                        f"{type(optimizer).__name__}.")
    outputs = outputs or _apply
    if loss is None:
        def loss(s, t, *_):
            return embedding_distance(s, t)
    teacher_module = model if teacher is None else teacher
    trainable = trainable or (lambda path, leaf: True)

    def objective(params, frozen, teacher_vars, batch):
        with quant_mode("float"):
            t = jax.lax.stop_gradient(outputs(teacher_module, teacher_vars, *batch))
        with quant_mode("train"):
            s = outputs(model, _merge(params, frozen), *batch)
        return loss(s, t, *batch).astype(jnp.float32)

    def init(variables: Variables) -> DistillState:
        variables = flax.core.unfreeze(dict(variables))
        if "params" not in variables:
            raise ValueError("distiller.init: `variables` must be the student's variables dict "
                             "with 'params'.")
        if "fp8_meta" in variables:
            # Train mode would update the amax histories; the step keeps variables frozen.
            raise ValueError("distiller.init: `variables` hold delayed fp8 scaling state "
                             "(fp8_meta), which the distillation step does not update; use "
                             "fp8_scaling='current'.")
        params, frozen_params = _split(variables["params"], trainable)
        frozen = {**variables, "params": frozen_params}
        return DistillState(jnp.zeros((), jnp.int32), params, optimizer.init(params), frozen)

    @jax.jit
    def _step(state, teacher_vars, batch):
        import optax

        value, grads = jax.value_and_grad(objective)(state.params, state.frozen, teacher_vars,
                                                     batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return DistillState(state.step + 1, params, opt_state, state.frozen), value

    @jax.jit
    def _loss(state, teacher_vars, batch):
        return objective(state.params, state.frozen, teacher_vars, batch)

    def step(state: DistillState, *batch: Any) -> tuple[DistillState, jax.Array]:
        return _step(state, teacher_variables, batch)

    def loss_of(state: DistillState, *batch: Any) -> jax.Array:
        return _loss(state, teacher_variables, batch)

    def variables_of(state: DistillState) -> dict:
        return _merge(state.params, state.frozen)

    return Distiller(init, step, loss_of, variables_of)
