"""The parameter and running-statistics pytrees, and their initializers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.export  # not imported by `import jax` before jax 0.8
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class BatchNormParams(NamedTuple):
    """Learned scale and shift, one value per feature."""

    gamma: Array  # (*feature_shape,), the scale; init 1
    beta: Array  # (*feature_shape,), the shift; init 0


class RunningStats(NamedTuple):
    """Running estimates of the batch statistics, used in evaluation mode."""

    mean: Array  # (*feature_shape,), init 0
    var: Array  # (*feature_shape,), biased batch variance; init 1


def _feature_shape(num_features: int | Sequence[int]) -> tuple[int, ...]:
    shape = (num_features,) if isinstance(num_features, (int, np.integer)) else tuple(num_features)
    if not shape or any(int(n) < 1 for n in shape):
        raise ValueError(f"Expected a positive number of features, got {num_features!r}.")
    return tuple(int(n) for n in shape)


def init(num_features: int | Sequence[int], dtype: Any = jnp.float32) -> BatchNormParams:
    """Returns ``BatchNormParams(gamma=ones, beta=zeros)`` of shape ``(num_features,)``.

    ``num_features`` may be a tuple, for a tuple of feature axes.
    """
    shape = _feature_shape(num_features)
    return BatchNormParams(jnp.ones(shape, dtype), jnp.zeros(shape, dtype))


def init_stats(num_features: int | Sequence[int], dtype: Any = jnp.float32) -> RunningStats:
    """Returns ``RunningStats(mean=zeros, var=ones)`` of shape ``(num_features,)``."""
    shape = _feature_shape(num_features)
    return RunningStats(jnp.zeros(shape, dtype), jnp.ones(shape, dtype))


# jax.export can serialize functions that take or return these pytrees.
jax.export.register_namedtuple_serialization(
    BatchNormParams, serialized_name="jaxbn.BatchNormParams")
jax.export.register_namedtuple_serialization(RunningStats, serialized_name="jaxbn.RunningStats")
