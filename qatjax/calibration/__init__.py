"""Calibration: observers, cross-device reduction and estimators of quantization parameters.

Observers (optax-style ``init`` / ``update`` pairs over fixed-shape pytree states)::

    obs = calibration.histogram(2048)              # or minmax(), moving_average_minmax()
    state = obs.init(x)
    state = obs.update(state, x)                   # jit / scan / vmap / Flax variables
    state = calibration.all_reduce(state, "batch")  # inside pmap or shard_map
    qp = calibration.estimate(state, qatjax.int8, "entropy")

Whole statistics trees (a model's ``quant_stats`` / ``fp8_meta``): ``all_reduce_tree``
inside ``pmap`` / ``shard_map``, ``merge_tree`` / ``merge_stacked``, and
``reduce_across_processes`` (each process's statistics, any number of batches each,
gathered with ``process_allgather`` and merged exactly); new state kinds join with
``register_reduction``::

    stats = calibration.reduce_across_processes(variables["quant_stats"])

Per-input-channel statistics for SmoothQuant, AWQ and GPTQ (:mod:`.channel_stats`):
``channel_absmax``, ``channel_mean_abs`` and ``hessian`` observers, exact across devices.

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
from qatjax.calibration.channel_stats import (
    ChannelAbsMaxState,
    ChannelMeanAbsState,
    ExactSum,
    HessianState,
    channel_absmax,
    channel_mean_abs,
    exact_sum_value,
    hessian,
    hessian_matrix,
    mean_abs,
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
from qatjax.calibration.reduce import (
    all_reduce,
    all_reduce_tree,
    merge,
    merge_stacked,
    merge_tree,
    reduce_across_processes,
    register_reduction,
    shard_map,
)

__all__ = [
    "COUNT_MAX",
    "EXPONENT_MAX",
    "EXPONENT_MIN",
    "METHODS",
    "ChannelAbsMaxState",
    "ChannelMeanAbsState",
    "ExactSum",
    "HessianState",
    "HistogramState",
    "MinMaxState",
    "MovingAverageState",
    "Observer",
    "all_reduce",
    "all_reduce_tree",
    "channel_absmax",
    "channel_mean_abs",
    "entropy_kl",
    "estimate",
    "estimators",
    "exact_sum_value",
    "has_data",
    "hessian",
    "hessian_matrix",
    "histogram",
    "mean_abs",
    "merge",
    "merge_stacked",
    "merge_tree",
    "minmax",
    "moving_average_minmax",
    "num_levels",
    "reduce_across_processes",
    "register_reduction",
    "shard_map",
]
