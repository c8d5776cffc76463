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
from qatjax.calibration.aligned_histogram import (
    COUNT_MAX,
    EXPONENT_MAX,
    EXPONENT_MIN,
    HistogramState,
)
from qatjax.calibration.estimators import METHODS, entropy_kl, estimate, num_levels
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
    "COUNT_MAX",
    "EXPONENT_MAX",
    "EXPONENT_MIN",
    "METHODS",
    "HistogramState",
    "MinMaxState",
    "MovingAverageState",
    "Observer",
    "all_reduce",
    "entropy_kl",
    "estimate",
    "estimators",
    "has_data",
    "histogram",
    "merge",
    "minmax",
    "moving_average_minmax",
    "num_levels",
    "shard_map",
]
