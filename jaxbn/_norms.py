"""Batch, layer and group normalization: thin layouts over the one closed-form core."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import _core
from jaxbn._checks import (
    Params,
    Stats,
    as_params,
    batch_norm_layout,
    canonicalize_axes,
    check_eps,
    check_input,
    check_momentum,
    check_num_groups,
    feature_layout,
    per_feature,
    running_stats,
    values_per_statistic,
)
from jaxbn._core import AxisName
from jaxbn._params import RunningStats

Array = jax.Array


def batch_norm(
    params: Params,
    x: Array,
    *,
    axis: int | Sequence[int] = -1,
    eps: float = 1e-5,
    axis_name: AxisName = None,
    mask: Array | None = None,
) -> Array:
    r"""Batch normalization in training mode, with a closed-form backward pass.

    .. math::

       \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
       y = \gamma \hat x + \beta

    where :math:`\mu` and :math:`\sigma^2` (biased) are taken over every axis
    except the feature ``axis``. The VJP is the CS231n closed form
    ``dx = inv_std / N * (N * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))``.

    Args:
      params: :class:`BatchNormParams` or a dict with ``"gamma"`` and
        ``"beta"``, each of shape ``x.shape[axis]`` (a tuple of sizes for a
        tuple ``axis``).
      x: floating input, e.g. ``(N, D)`` or NHWC ``(N, H, W, C)``. 16-bit
        floats are normalized with float32 statistics and returned in their
        own dtype.
      axis: the feature axis or axes (default ``-1``; ``1`` for NCHW).
      eps: added to the variance.
      axis_name: a mapped axis name (or tuple of names) of ``shard_map``,
        ``pmap`` or ``vmap``; statistics and the backward sums are all-reduced
        over it, so the result equals batch norm of the whole global batch.
      mask: optional boolean array broadcastable to ``x``'s shape without the
        feature axes. ``False`` entries are left out of the statistics, come
        out as ``0`` and get zero gradient. An all-``False`` mask gives all
        zeros (no NaN).

    Returns:
      ``y`` with ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 3 + 1
      >>> y = jaxbn.batch_norm(jaxbn.init(4), x)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-6))
      True
    """
    layout = batch_norm_layout(
        params, x, axis=axis, eps=eps, mask=mask, axis_name=axis_name, training="batch_norm")
    return _core.normalize(
        layout.x, layout.gamma, layout.beta, stat_axes=layout.stat_axes, eps=layout.eps,
        axis_name=axis_name, mask=layout.mask,
    )


def batch_norm_train(
    params: Params,
    stats: Stats,
    x: Array,
    *,
    momentum: float = 0.9,
    axis: int | Sequence[int] = -1,
    eps: float = 1e-5,
    axis_name: AxisName = None,
    mask: Array | None = None,
) -> tuple[Array, Stats]:
    """Training-mode batch norm that also updates the running statistics.

    ``y`` is exactly :func:`batch_norm`'s. The running statistics follow the
    CS231n/Flax convention (note: PyTorch's ``momentum`` is ``1 - momentum``
    here, and PyTorch stores the unbiased variance)::

        running = momentum * running + (1 - momentum) * batch

    with the biased batch variance. No gradient flows into ``new_stats``. A
    batch whose mask is all ``False`` leaves the statistics unchanged.

    Args:
      params: as in :func:`batch_norm`.
      stats: :class:`RunningStats` (or a dict with ``"mean"`` and ``"var"``)
        with the feature shape.
      x, axis, eps, axis_name, mask: as in :func:`batch_norm`.
      momentum: in ``[0, 1]``; the weight of the old running value. May be a
        traced scalar (e.g. a schedule under ``jit``); then it is not range-checked.

    Returns:
      ``(y, new_stats)``; ``new_stats`` is a dict when ``stats`` was one.
    """
    momentum = check_momentum(momentum)
    layout = batch_norm_layout(
        params, x, axis=axis, eps=eps, mask=mask, axis_name=axis_name,
        training="batch_norm_train")
    x, mask, stat_axes = layout.x, layout.mask, layout.stat_axes
    running_mean, running_var = running_stats(
        stats, x, layout.feature_axes, layout.param_shape)
    y = _core.normalize(
        x, layout.gamma, layout.beta, stat_axes=stat_axes, eps=layout.eps,
        axis_name=axis_name, mask=mask,
    )
    # The same statistics as inside the core, without gradient, from the same
    # (masked-zeroed) input, so that under jit XLA merges the two identical
    # computations: tests/test_hlo.py checks that batch_norm_train compiles to
    # the same loops over x as batch_norm.
    batch = _core.moments(
        lax.stop_gradient(_core.zero_masked(x, mask)), stat_axes, mask, axis_name)
    mean, var = batch.shift + batch.mean, batch.var
    # In the running statistics' dtype even when momentum is traced (a float32 scalar).
    m = jnp.asarray(momentum, running_mean.dtype)
    new_mean = m * running_mean + (1 - m) * mean.astype(running_mean.dtype)
    new_var = m * running_var + (1 - m) * var.astype(running_var.dtype)
    if mask is not None:
        seen = jnp.any(mask)
        if axis_name is not None:
            seen = lax.psum(seen.astype(jnp.int32), axis_name) > 0
        new_mean = jnp.where(seen, new_mean, running_mean)
        new_var = jnp.where(seen, new_var, running_var)
    feature_shape = tuple(x.shape[a] for a in layout.feature_axes)
    new_stats = RunningStats(new_mean.reshape(feature_shape), new_var.reshape(feature_shape))
    return y, new_stats._asdict() if isinstance(stats, Mapping) else new_stats


def batch_norm_eval(
    params: Params,
    stats: Stats,
    x: Array,
    *,
    axis: int | Sequence[int] = -1,
    eps: float = 1e-5,
) -> Array:
    """Inference-mode batch norm with running statistics.

    ``y = gamma * (x - stats.mean) / sqrt(stats.var + eps) + beta``, an
    elementwise affine map (ordinary autodiff, forward mode included).

    Args:
      params, stats, x, axis, eps: as in :func:`batch_norm_train`.

    Returns:
      ``y`` with ``x``'s shape and dtype.
    """
    layout = batch_norm_layout(params, x, axis=axis, eps=eps)
    x = layout.x
    mean, var = running_stats(stats, x, layout.feature_axes, layout.param_shape)
    dtype = _core.compute_dtype(x.dtype)
    scale = lax.rsqrt(var.astype(dtype) + jnp.asarray(layout.eps, dtype))
    if layout.gamma is not None:
        scale = scale * layout.gamma.astype(dtype)
    y = (x.astype(dtype) - mean.astype(dtype)) * scale
    if layout.beta is not None:
        y = y + layout.beta.astype(dtype)
    return y.astype(x.dtype)


def _per_example(
    params: Params, x: Array, axis: int | Sequence[int], eps: float, center: bool
) -> Array:
    """Layer or RMS norm: statistics over the feature ``axis`` of each example."""
    params, x, eps = as_params(params), check_input(x), check_eps(eps)
    feature_axes, _, shape = feature_layout(x, axis)
    gamma, beta = per_feature(params, ("gamma", "beta"), x, feature_axes, shape, "params")
    if center and values_per_statistic(x, feature_axes, None) == 1:
        raise ValueError(
            f"layer_norm normalizes each example over its feature axes {feature_axes}, but "
            f"for x of shape {x.shape} they hold a single value, so every output would be "
            "beta. Expected feature axes with more than one value in all."
        )
    return _core.normalize(x, gamma, beta, stat_axes=feature_axes, eps=eps, center=center)


def layer_norm(
    params: Params, x: Array, *, axis: int | Sequence[int] = -1, eps: float = 1e-5
) -> Array:
    """Layer normalization: statistics over the feature ``axis`` of each example.

    Same closed-form core as :func:`batch_norm`, with the roles of the axes
    swapped: ``mean``/``var`` are taken over ``axis`` (per example), while
    ``gamma``/``beta`` have shape ``x.shape[axis]`` and their gradients are
    summed over the other axes.

    Args:
      params: ``gamma``/``beta`` of shape ``x.shape[axis]``; either may be ``None``.
      x: floating input, e.g. ``(N, D)`` or ``(N, T, D)``.
      axis: the axis or axes to normalize over (default ``-1``).
      eps: added to the variance.

    Returns:
      ``y`` with ``x``'s shape and dtype.
    """
    return _per_example(params, x, axis, eps, center=True)


def rms_norm(
    params: Params, x: Array, *, axis: int | Sequence[int] = -1, eps: float = 1e-6
) -> Array:
    r"""RMS normalization: layer norm without the mean, with a closed-form backward pass.

    .. math::

       r = \frac{1}{\sqrt{\tfrac{1}{N}\sum_i x_i^2 + \epsilon}}, \qquad
       \hat x = x\, r, \qquad y = \gamma \hat x + \beta

    over the ``N`` values of the feature ``axis`` of each example. Since
    :math:`\partial r / \partial x_j = -r^3 x_j / N`, the VJP with
    ``dxhat = dy * gamma`` is::

        dx     = r / N * (N * dxhat - xhat * sum(dxhat * xhat))
        dgamma = sum(dy * xhat),   dbeta = sum(dy)   (over the other axes)

    the batch-norm closed form with the mean held at zero, which drops its
    ``sum(dxhat)`` term; it runs on the same core.

    Args:
      params: ``gamma``/``beta`` of shape ``x.shape[axis]``. Flax, PyTorch and
        Equinox RMS norms have a scale only: pass ``{"gamma": g, "beta": None}``
        (``jaxbn.init`` gives ``beta = 0``, the same output).
      x: floating input, e.g. ``(N, D)`` or ``(N, T, D)``.
      axis: the axis or axes to normalize over (default ``-1``).
      eps: added to the mean square (default ``1e-6``, as Flax's ``RMSNorm``).

    Returns:
      ``y`` with ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> x = jax.random.normal(jax.random.key(0), (4, 16)) * 3
      >>> y = jaxbn.rms_norm({"gamma": jnp.ones(16), "beta": None}, x)
      >>> bool(jnp.allclose(jnp.mean(y ** 2, -1), 1, atol=1e-4))
      True
    """
    return _per_example(params, x, axis, eps, center=False)


def _split_channels(x: Array, axis: int, groups: int) -> Array:
    """``x`` with its channel ``axis`` split into ``(groups, channels // groups)``.

    On an array whose channel axis an Explicit mesh splits into ``k`` pieces,
    the group axis keeps that split when ``k`` divides ``groups`` (each device
    holds whole groups); otherwise the channels are first gathered, since a
    group would straddle two devices.
    """
    channels = x.shape[axis]
    shape = x.shape[:axis] + (groups, channels // groups) + x.shape[axis + 1:]
    pieces = _core.explicit_shards(x)[axis]
    if pieces == 1:
        return x.reshape(shape)
    sharding = jax.typeof(x).sharding
    spec = _core.explicit_spec(x)
    if groups % pieces:
        spec[axis] = None
        x = jax.sharding.reshard(x, NamedSharding(sharding.mesh, P(*spec)))
    out = spec[:axis] + [spec[axis], None] + spec[axis + 1:]
    return jnp.reshape(x, shape, out_sharding=NamedSharding(sharding.mesh, P(*out)))


def _replicated(param: Array) -> Array:
    """``param`` on every device, if an Explicit mesh splits it (a no-op otherwise)."""
    if max(_core.explicit_shards(param), default=1) == 1:
        return param
    return jax.sharding.reshard(param, NamedSharding(jax.typeof(param).sharding.mesh, P()))


def _merge_channels(y: Array, like: Array, axis: int) -> Array:
    """The inverse of :func:`_split_channels`: ``y`` in ``like``'s shape and sharding."""
    if _core.explicit_shards(like)[axis] == 1:
        return y.reshape(like.shape)
    sharding = jax.typeof(like).sharding
    spec = _core.explicit_spec(y)
    merged = spec[:axis] + [spec[axis]] + spec[axis + 2:]
    y = jnp.reshape(y, like.shape, out_sharding=NamedSharding(sharding.mesh, P(*merged)))
    return jax.sharding.reshard(y, sharding)


def group_norm(
    params: Params, x: Array, num_groups: int, *, axis: int = -1, eps: float = 1e-5
) -> Array:
    """Group normalization: statistics per example and channel group.

    The channel ``axis`` of ``x`` is split into ``num_groups`` contiguous
    groups of ``C // num_groups`` channels; each example's group is
    normalized over its channels and every other axis but the batch axis 0.
    ``axis=-1`` is channels-last ``(N, ..., C)``, ``axis=1`` NCHW, and
    ``axis=0`` a single unbatched example ``(C, ...)`` (Equinox's layout),
    which is then the one example. ``num_groups=1`` is layer norm over the
    channels and spatial axes; ``num_groups=C`` is instance norm.

    Args:
      params: ``gamma``/``beta`` of shape ``(C,)``; either may be ``None``.
      x: floating input, e.g. ``(N, H, W, C)``, ``(N, C, H, W)`` or ``(C, H, W)``.
      num_groups: a positive divisor of ``C`` (a Python int: under ``jit`` mark
        it static).
      axis: the channel axis (default ``-1``).
      eps: added to the variance.

    Returns:
      ``y`` with ``x``'s shape, dtype (and sharding).
    """
    params, x, eps = as_params(params), check_input(x), check_eps(eps)
    if isinstance(axis, (tuple, list)):
        raise TypeError(f"Expected axis to be one int, the channel axis, got {axis!r}.")
    (channel_axis,) = canonicalize_axes(axis, x.ndim)
    if x.ndim < 2 and axis != 0:  # (C,) is one example only when axis=0 says so
        raise ValueError(
            f"Expected x of rank >= 2, a batch axis 0 and the channel axis {axis} (or "
            f"axis=0 for one unbatched example), got shape {x.shape}.")
    channels = x.shape[channel_axis]
    num_groups = check_num_groups(num_groups, channels)
    param_shape = (1,) * channel_axis + (num_groups, channels // num_groups) + (1,) * (
        x.ndim - channel_axis - 1)
    # Parameters split over devices with the channels are gathered (C values):
    # a group may straddle two devices' channels.
    gamma, beta = (None if p is None else _replicated(p).reshape(param_shape)
                   for p in per_feature(params, ("gamma", "beta"), x, (channel_axis,),
                                        (channels,), "params"))
    grouped = _split_channels(x, channel_axis, num_groups)
    batch_axes = () if channel_axis == 0 else (0,)
    stat_axes = tuple(i for i in range(grouped.ndim) if i != channel_axis and i not in batch_axes)
    if values_per_statistic(grouped, stat_axes, None) == 1:
        raise ValueError(
            f"group_norm with num_groups={num_groups} for x of shape {x.shape} normalizes "
            "groups of a single value (one channel, no spatial axes), so every output "
            "would be beta. Use fewer groups or an input with spatial axes."
        )
    y = _core.normalize(grouped, gamma, beta, stat_axes=stat_axes, eps=eps)
    return _merge_channels(y, x, channel_axis)
