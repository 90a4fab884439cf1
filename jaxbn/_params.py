"""Parameter and running-statistics pytrees, and the input checks every norm shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._core import canonicalize_axes

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


def as_params(params: BatchNormParams | Mapping[str, Array]) -> BatchNormParams:
    """Accepts ``BatchNormParams`` or a dict with keys ``"gamma"`` and ``"beta"``."""
    if isinstance(params, BatchNormParams):
        return params
    if isinstance(params, Mapping):
        missing = {"gamma", "beta"} - set(params)
        if missing:
            raise ValueError(
                f"Expected params with keys 'gamma' and 'beta', got keys {sorted(params)}."
            )
        return BatchNormParams(params["gamma"], params["beta"])
    raise TypeError(
        "Expected params to be jaxbn.BatchNormParams or a dict with 'gamma' and 'beta', "
        f"got {type(params).__name__}."
    )


def check_input(x: Any, name: str = "x") -> Array:
    """Returns ``x`` as an array; TypeError unless it has a floating dtype."""
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"Expected {name} with at least one axis, got a scalar.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"Expected {name} to have a floating dtype (float16, bfloat16, float32 or "
            f"float64), got {x.dtype}. Cast it first, e.g. x.astype(jnp.float32)."
        )
    return x


STATIC_HINT = (
    "It configures the computation, so it must be a concrete Python value; under "
    "jax.jit, mark it static, e.g. jax.jit(f, static_argnames=('axis', 'eps'))."
)


def check_eps(eps: float) -> float:
    """Returns ``eps`` as a float; ValueError unless it is a non-negative Python number."""
    if not isinstance(eps, (int, float, np.floating)) or not eps >= 0:
        raise ValueError(
            f"Expected eps to be a non-negative Python number, got {eps!r}. {STATIC_HINT}"
        )
    return float(eps)


def feature_layout(
    x: Array, axis: int | Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Splits ``x``'s axes by a feature ``axis`` argument.

    Returns:
      ``(feature_axes, other_axes, broadcast_shape)``: sorted non-negative
      axes, and the shape (``x``'s rank, 1 off the feature axes) that
      per-feature arrays are reshaped to.
    """
    feature_axes = canonicalize_axes(axis, x.ndim)
    other_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    shape = tuple(x.shape[i] if i in feature_axes else 1 for i in range(x.ndim))
    return feature_axes, other_axes, shape


def _axes_text(feature_axes: tuple[int, ...]) -> str:
    """'feature axis 1' or 'feature axes (2, 3)', for error messages."""
    if len(feature_axes) == 1:
        return f"feature axis {feature_axes[0]}"
    return f"feature axes {feature_axes}"


def per_feature(
    values: Sequence[Array], names: Sequence[str], x: Array, feature_axes: tuple[int, ...],
    broadcast_shape: tuple[int, ...], what: str,
) -> list[Array]:
    """Checks that each array has the feature shape and reshapes it to ``broadcast_shape``."""
    expected = tuple(x.shape[i] for i in feature_axes)
    out = []
    for value, name in zip(values, names):
        value = jnp.asarray(value)
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"Expected {what} {name} with a floating dtype, got {value.dtype}.")
        if value.shape != expected:
            raise ValueError(
                f"Expected {what} {name} of shape {expected}, the size of x's "
                f"{_axes_text(feature_axes)} (x has shape {x.shape}), got shape {value.shape}."
            )
        out.append(value.reshape(broadcast_shape))
    return out


def check_mask(mask: Any, x: Array, feature_axes: tuple[int, ...]) -> Array | None:
    """Validates a mask over ``x``'s non-feature axes; returns it with ``x``'s rank.

    The mask is broadcastable to ``x``'s shape with the feature axes removed,
    e.g. ``(N,)`` or ``(N, 1)`` for ``x`` of shape ``(N, D)``, ``(N, H, W)`` for
    NHWC. Size-1 axes are inserted at the feature positions.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"Expected a boolean mask, got dtype {mask.dtype}.")
    if mask.ndim == x.ndim and all(mask.shape[a] == 1 for a in feature_axes):
        # A mask of x's rank with size 1 on the feature axes, e.g. (N, 1) for (N, D).
        mask = jnp.squeeze(mask, feature_axes)
    batch_shape = tuple(n for i, n in enumerate(x.shape) if i not in feature_axes)
    fits = mask.ndim <= len(batch_shape) and all(
        m in (1, n) for m, n in zip(mask.shape[::-1], batch_shape[::-1]))
    if not fits:
        raise ValueError(
            f"Expected a mask broadcastable to {batch_shape} (x's shape {x.shape} without "
            f"its {_axes_text(feature_axes)}), got shape {mask.shape}."
        )
    mask = mask.reshape((1,) * (len(batch_shape) - mask.ndim) + mask.shape)
    for a in feature_axes:
        mask = jnp.expand_dims(mask, a)
    return mask
