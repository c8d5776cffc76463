"""Calibration: observers, cross-device reduction and estimators of quantization parameters.

Observers (optax-style ``init`` / ``update`` pairs over fixed-shape pytree states)::

    obs = calibration.histogram(2048)              # or minmax(), moving_average_minmax()
    state = obs.init(x)
    state = obs.update(state, x)                   # jit / scan / vmap / Flax variables
    state = calibration.all_reduce(state, "batch")  # inside pmap or shard_map
    qp = calibration.estimate(state, qatjax.int8, "entropy")

Estimators: ``minmax``, ``percentile``, ``entropy`` (TensorRT's KL search, all
thresholds at once) and ``mse``, in :mod:`qatjax.calibration.estimators` and through
:func:`estimate`.
"""

from qatjax.calibration import estimators
from qatjax.calibration.estimators import METHODS, entropy_kl, estimate, num_levels
from qatjax.calibration.aligned_histogram import COUNT_MAX, EXPONENT_MAX, EXPONENT_MIN, HistogramState
from qatjax.calibration.observers import (
    MinMaxState,
    MovingAverageState,
    Observer,
    has_data,
    histogram,
    minmax,
    moving_average_minmax,
)
from qatjax.calibration.reduce import all_reduce, merge, shard_map

__all__ = [
    "Observer",
    "MinMaxState",
    "MovingAverageState",
    "HistogramState",
    "minmax",
    "moving_average_minmax",
    "histogram",
    "has_data",
    "merge",
    "all_reduce",
    "shard_map",
    "estimate",
    "estimators",
    "METHODS",
    "entropy_kl",
    "num_levels",
    "COUNT_MAX",
    "EXPONENT_MIN",
    "EXPONENT_MAX",
]
