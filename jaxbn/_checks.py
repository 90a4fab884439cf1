"""Input checks shared by every norm: params, input, axes, mask, batch size, scalars.

Everything here runs at trace time and raises a ``ValueError`` or ``TypeError``
that says what was expected and what was received. :func:`batch_norm_layout`
bundles the checks of the batch-norm functions (and of ``jaxbn.reference``)
into one :class:`BatchNormLayout`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.export
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn._core import AxisName
from jaxbn._params import BatchNormParams, RunningStats

Array = jax.Array
Params = BatchNormParams | Mapping[str, Array | None]
Stats = RunningStats | Mapping[str, Array]


def static_hint(*names: str) -> str:
    """The advice for a configuration argument that arrived as a tracer under ``jit``."""
    quoted = ", ".join(repr(n) for n in names)
    return (
        "It configures the computation, so it must be a concrete Python value; under "
        f"jax.jit, mark it static, e.g. jax.jit(f, static_argnames=({quoted},))."
    )


def _is_number(value: Any) -> bool:
    """A real Python or NumPy number, not a bool (``True`` is no eps or momentum)."""
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(
        value, (bool, np.bool_))


def _as_named(value: Any, cls: type, what: str) -> Any:
    """``value`` as the NamedTuple ``cls``, from itself or a dict with its field names."""
    if isinstance(value, cls):
        return value
    fields = cls._fields  # type: ignore[attr-defined]
    if isinstance(value, Mapping):
        if set(fields) - set(value):
            raise ValueError(
                f"Expected {what} with keys {' and '.join(map(repr, fields))}, got keys "
                f"{sorted(value)}."
            )
        return cls(*(value[f] for f in fields))
    raise TypeError(
        f"Expected {what} to be jaxbn.{cls.__name__} or a dict with "
        f"{' and '.join(map(repr, fields))}, got {type(value).__name__}."
    )


def as_params(params: Params) -> BatchNormParams:
    """Accepts ``BatchNormParams`` or a dict with keys ``"gamma"`` and ``"beta"``.

    Either value may be ``None``: no scale (``gamma = 1``) or no shift (``beta = 0``).
    """
    return _as_named(params, BatchNormParams, "params")


def as_stats(stats: Stats) -> RunningStats:
    """Accepts ``RunningStats`` or a dict with keys ``"mean"`` and ``"var"``."""
    return _as_named(stats, RunningStats, "stats")


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


def check_eps(eps: Any) -> float:
    """Returns ``eps`` as a float; ValueError unless it is a non-negative finite number."""
    if not _is_number(eps) or not 0 <= eps < math.inf:
        hint = f" {static_hint('eps')}" if isinstance(eps, jax.core.Tracer) else ""
        raise ValueError(
            f"Expected eps to be a non-negative Python number, got {eps!r} (a finite int "
            f"or float, not a bool).{hint}"
        )
    return float(eps)


def check_momentum(momentum: Any) -> Any:
    """Returns ``momentum``; ValueError unless it is a number or scalar array in [0, 1].

    A traced value (e.g. a schedule under ``jit``) is accepted unchecked; a
    concrete one, a Python number or an array, is range-checked.
    """
    if isinstance(momentum, jax.core.Tracer):
        if momentum.ndim != 0 or not jnp.issubdtype(momentum.dtype, jnp.floating):
            raise ValueError(
                f"Expected momentum to be a floating scalar, got {momentum.dtype}"
                f"{list(momentum.shape)}."
            )
        return momentum
    value = momentum
    if not _is_number(value):
        array = np.asarray(momentum) if isinstance(momentum, (jax.Array, np.ndarray)) else None
        if (array is None or array.ndim != 0
                or not np.issubdtype(array.dtype, np.number)
                or np.issubdtype(array.dtype, np.complexfloating)):
            raise ValueError(f"Expected momentum to be a real number in [0, 1], got {momentum!r}.")
        value = array.item()
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected momentum in [0, 1], got {momentum!r}.")
    return momentum


def check_num_groups(num_groups: Any, channels: int) -> int:
    """Returns ``num_groups`` as an int; ValueError unless it positively divides ``channels``."""
    if isinstance(num_groups, jax.core.Tracer):
        raise TypeError(
            f"Expected num_groups to be a Python int, got a traced value. "
            f"{static_hint('num_groups')}"
        )
    if (not isinstance(num_groups, numbers.Integral) or isinstance(num_groups, (bool, np.bool_))
            or num_groups < 1 or channels % num_groups):
        raise ValueError(
            f"Expected num_groups to be a positive divisor of the number of channels "
            f"C={channels}, got num_groups={num_groups!r}."
        )
    return int(num_groups)


def canonicalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Sorted, de-duplicated non-negative axes; ValueError when one is out of range."""
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not axes:
        raise ValueError("Expected at least one feature axis, got axis=().")
    out = []
    for a in axes:
        if not isinstance(a, numbers.Integral) or isinstance(a, bool):
            raise TypeError(
                f"Expected axis to be an int or a tuple of ints, got {axis!r}. "
                f"{static_hint('axis')}"
            )
        a = int(a)
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for an input of rank {ndim} "
                f"(valid: {-ndim} to {ndim - 1})."
            )
        out.append(a % ndim)
    return tuple(sorted(set(out)))


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
    values: Sequence[Any], names: Sequence[str], x: Array, feature_axes: tuple[int, ...],
    broadcast_shape: tuple[int, ...], what: str,
) -> list[Any]:
    """Checks that each array has the feature shape and reshapes it to ``broadcast_shape``.

    ``None`` (a missing scale or shift) stays ``None``.
    """
    expected = tuple(x.shape[i] for i in feature_axes)
    out: list[Any] = []
    for value, name in zip(values, names):
        if value is None:
            out.append(None)
            continue
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


def running_stats(
    stats: Stats, x: Array, feature_axes: tuple[int, ...], broadcast_shape: tuple[int, ...]
) -> list[Array]:
    """Checks ``stats`` and returns its mean and var reshaped to ``broadcast_shape``."""
    stats = as_stats(stats)
    if stats.mean is None or stats.var is None:
        raise TypeError("Expected running stats mean and var to be arrays, got None.")
    return per_feature(stats, ("mean", "var"), x, feature_axes, broadcast_shape, "running stats")


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


def values_per_statistic(
    x: Array, stat_axes: tuple[int, ...], axis_name: AxisName
) -> int | None:
    """How many values each statistic is taken over, across the mapped ``axis_name`` too.

    ``None`` when that depends on a symbolic dimension (``jax.export``), which
    cannot be checked at trace time.
    """
    size = math.prod(x.shape[a] for a in stat_axes)
    if axis_name is not None:
        size *= lax.psum(1, axis_name)  # the mapped axis size, a Python int at trace time
    return None if jax.export.is_symbolic_dim(size) else int(size)


def check_batch(x: Array, stat_axes: tuple[int, ...], axis_name: AxisName, what: str) -> None:
    """ValueError when training-mode batch statistics would be over fewer than two values."""
    size = values_per_statistic(x, stat_axes, axis_name)
    if size is None or size > 1:  # a symbolic batch size is the caller's to choose
        return
    mapped = "" if axis_name is None else f" (mapped axis {axis_name!r} included)"
    if size == 0:
        where = f"the batch is empty: it holds no value per feature{mapped}"
    elif not stat_axes and axis_name is None:
        where = "x has no axis besides the feature axes to take statistics over"
    else:
        where = (f"the batch holds a single value per feature{mapped}: a batch of one has "
                 "nothing to normalize over")
    raise ValueError(
        f"{what} in training mode needs a batch to compute statistics over, but for x of "
        f"shape {x.shape} {where}. Expected x of shape (N, ..., C) with N > 1 (or spatial "
        "axes). Use a larger batch, batch_norm_eval with running statistics, or axis_name "
        "to share statistics across a mapped axis."
    )


class BatchNormLayout(NamedTuple):
    """Checked batch-norm arguments, arranged for the normalization core.

    ``gamma``, ``beta`` and ``mask`` have ``x``'s rank with size 1 off the
    feature axes, so they broadcast against ``x``; statistics are taken over
    ``stat_axes`` (every axis but the feature axes).
    """

    x: Array  # the input, any floating dtype
    gamma: Array | None  # shape param_shape; None: no scale
    beta: Array | None  # shape param_shape; None: no shift
    mask: Array | None  # boolean, x's rank, broadcastable to x; None: every entry counts
    stat_axes: tuple[int, ...]  # sorted non-negative axes the statistics reduce over
    feature_axes: tuple[int, ...]  # sorted non-negative feature axes
    param_shape: tuple[int, ...]  # x's rank, the feature sizes on feature_axes, 1 elsewhere
    eps: float  # added to the variance


def batch_norm_layout(
    params: Params,
    x: Any,
    *,
    axis: int | Sequence[int],
    eps: Any,
    mask: Any = None,
    axis_name: AxisName = None,
    training: str | None = None,
) -> BatchNormLayout:
    """Validates batch-norm arguments and arranges them for the core.

    Args:
      params, x, axis, eps, mask, axis_name: as in :func:`jaxbn.batch_norm`.
      training: the calling function's name in training mode, where the batch
        must hold at least two values per feature (:func:`check_batch`); ``None``
        in inference mode, where any batch works.

    Returns:
      A :class:`BatchNormLayout`.
    """
    params = as_params(params)
    x = check_input(x)
    eps = check_eps(eps)
    feature_axes, stat_axes, shape = feature_layout(x, axis)
    gamma, beta = per_feature(params, ("gamma", "beta"), x, feature_axes, shape, "params")
    mask = check_mask(mask, x, feature_axes)
    if training is not None:
        check_batch(x, stat_axes, axis_name, training)
    return BatchNormLayout(x, gamma, beta, mask, stat_axes, feature_axes, shape, eps)
