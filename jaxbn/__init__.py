"""jaxbn: batch normalization for JAX with the closed-form (CS231n) backward pass."""

from jaxbn import reference
from jaxbn._norms import (
    batch_norm,
    batch_norm_eval,
    batch_norm_train,
    group_norm,
    layer_norm,
    rms_norm,
)
from jaxbn._params import BatchNormParams, RunningStats, init, init_stats

__version__ = "0.1.0"

__all__ = [
    "BatchNormParams",
    "RunningStats",
    "batch_norm",
    "batch_norm_eval",
    "batch_norm_train",
    "group_norm",
    "init",
    "init_stats",
    "layer_norm",
    "reference",
    "rms_norm",
]
