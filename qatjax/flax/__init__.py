"""Flax (linen) layers of qatjax: ``QatDense``, ``QatDenseGeneral``, ``QatConv``, ``QatEinsum``, the
``quant_mode`` context and ``quantize_model`` (swap the layers of an existing model
without editing it), the linen model tools (:mod:`qatjax.flax.model`) and quantization-aware
distillation against the float model (:func:`distiller`, :mod:`qatjax.flax.distill`).

Importing it registers the core's dataclass states (the histogram observer's) with
``flax.serialization``, so variables holding them save and restore as Flax
serializes any other pytree (the core itself does not import Flax)."""

import dataclasses

import flax.serialization

from qatjax.calibration.aligned_histogram import HistogramState
from qatjax.flax.distill import (
    Distiller,
    DistillState,
    distiller,
    embedding_distance,
    logit_distance,
)
from qatjax.flax.intercept import quantize_model
from qatjax.flax.layers import MODES, QatConv, QatDense, QatDenseGeneral, QatEinsum, quant_mode

__all__ = ["QatDense", "QatDenseGeneral", "QatConv", "QatEinsum", "quant_mode", "quantize_model", "MODES",
           "DistillState", "Distiller", "distiller", "embedding_distance", "logit_distance"]


def _dataclass_to_state_dict(state) -> dict:
    return {f.name: flax.serialization.to_state_dict(getattr(state, f.name))
            for f in dataclasses.fields(state) if f.name != "signed"}


def _dataclass_from_state_dict(target, state: dict):
    missing = [f.name for f in dataclasses.fields(target) if f.name != "signed" and f.name not in state]
    if missing:
        raise ValueError(f"{type(target).__name__}: the restored state lacks {missing}.")
    return dataclasses.replace(target, **{
        f.name: flax.serialization.from_state_dict(getattr(target, f.name), state[f.name])
        for f in dataclasses.fields(target) if f.name != "signed"})


flax.serialization.register_serialization_state(
    HistogramState, _dataclass_to_state_dict, _dataclass_from_state_dict, override=True)
