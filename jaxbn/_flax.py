"""What :mod:`jaxbn.nnx` and :mod:`jaxbn.linen` share: Flax's arguments mapped onto
jaxbn's pure functions, the dtype rules of ``flax/*/normalization.py``, and the
checks that refuse what jaxbn does not reproduce. Imports no framework.

Conventions (as in Flax 0.12): ``scale``/``bias`` are 1-D of the product of the
feature sizes (NNX) or of the feature shape (Linen); both are reshaped here to
the feature shape ``tuple(x.shape[a] for a in feature_axes)`` that jaxbn takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn._checks import as_stats, canonicalize_axes
from jaxbn._core import AxisName, compute_dtype
from jaxbn._norms import (
    batch_norm,
    batch_norm_eval,
    batch_norm_train,
    group_norm,
    layer_norm,
    rms_norm,
)

Array = jax.Array
Axes = int | Sequence[int]


def refuse(module: str, name: str, value: Any, supported: str) -> None:
    """Raises the ValueError for an argument whose Flax behaviour jaxbn does not reproduce."""
    raise ValueError(
        f"jaxbn {module}: {name}={value!r} is not supported (jaxbn does not reproduce "
        f"Flax's behaviour for it). Supported: {supported}.")


def check_common(module: str, axis_index_groups: Any, force_float32_reductions: bool = True,
                 axis_name: Any = None, axis_name_ok: bool = False) -> None:
    """Refuses ``axis_index_groups``, ``force_float32_reductions=False`` and (unless
    ``axis_name_ok``) ``axis_name``."""
    if axis_index_groups is not None:
        refuse(module, "axis_index_groups", axis_index_groups,
               "None (statistics over all devices of axis_name)")
    if force_float32_reductions is not True:
        refuse(module, "force_float32_reductions", force_float32_reductions,
               "True (statistics in at least float32)")
    if axis_name is not None and not axis_name_ok:
        refuse(module, "axis_name", axis_name,
               "None (cross-device statistics are only available in BatchNorm)")


def refuse_mask(module: str, mask: Any) -> None:
    """Norms without a mask in jaxbn refuse Flax's ``mask`` argument."""
    if mask is not None:
        refuse(module, "mask", f"<array of shape {jnp.shape(mask)}>", "None")


def output_dtype(x: Array, scale: Array | None, bias: Array | None, dtype: Any) -> Any:
    """Flax's output dtype: ``dtype``, else the promoted dtype of ``x``, scale and bias."""
    if dtype is not None:
        return jnp.dtype(dtype)
    out = x.dtype
    for a in (scale, bias):
        if a is not None:
            out = jnp.promote_types(out, a.dtype)
    return out


def stats_dtype(x: Array, dtype: Any) -> Any:
    """Flax's statistics dtype: ``dtype`` (else ``x``'s), at least float32."""
    return jnp.promote_types(x.dtype if dtype is None else dtype, jnp.float32)


def ema(momentum: float, stored: Array, batch: Array) -> Array:
    """Flax's update ``momentum * stored + (1 - momentum) * batch``, with its dtypes (the
    product in ``stored``'s dtype, the sum promoted) spelled out for strict promotion."""
    dtype = jnp.promote_types(stored.dtype, batch.dtype)
    return (momentum * stored).astype(dtype) + ((1 - momentum) * batch).astype(dtype)


def _params(
    scale: Array | None, bias: Array | None, x: Array, shape: tuple[int, ...] | None = None
) -> dict:
    """jaxbn's params, reshaped to the feature ``shape`` and cast to ``x``'s compute dtype:
    as in Flax, whose float64 arithmetic promotes float32 parameters, their gradients
    are then summed (across devices too) before they are rounded to their dtype."""
    dtype = compute_dtype(x.dtype)

    def cast(a: Array | None) -> Array | None:
        if a is None:
            return None
        return (a if shape is None else a.reshape(shape)).astype(dtype)

    return {"gamma": cast(scale), "beta": cast(bias)}


def feature_axes_of(x: Array, axis: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(feature_axes, feature_shape)`` of ``x`` for a Flax ``axis`` argument."""
    axes = canonicalize_axes(axis, x.ndim)
    return axes, tuple(x.shape[a] for a in axes)


def _flax_mask(mask: Any, x: Array, axes: tuple[int, ...], module: str) -> Array:
    """Flax's mask (broadcastable to ``x``) at ``x``'s rank; refused unless constant
    (size 1) along the feature axes, which jaxbn's per-row mask needs."""
    mask = jnp.asarray(mask, dtype=bool)
    if mask.ndim > x.ndim:
        refuse(module, "mask", f"<array of shape {mask.shape}>",
               f"a boolean mask broadcastable to x's shape {x.shape}")
    mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
    if any(mask.shape[a] != 1 for a in axes):
        refuse(module, "mask", f"<array of shape {mask.shape}>",
               f"a mask of size 1 on the feature axes {axes} (the same for every feature, "
               "e.g. mask[..., :1] for axis=-1)")
    return mask


def _masked_moments(x: Array, mask: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Flax's two-pass ``mean``/``var`` (``use_fast_variance=False``) over the kept entries,
    differentiable, of the feature shape."""
    stat_axes = tuple(i for i in range(x.ndim) if i not in axes)
    kept = jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(kept, stat_axes).astype(x.dtype)
    mean = jnp.sum(jnp.where(kept, x, 0), stat_axes) / count
    centered = x - jnp.expand_dims(mean, stat_axes)
    var = jnp.sum(jnp.where(kept, centered * centered, 0), stat_axes) / count
    return mean, var


def batch_norm_train_step(
    module: str, x: Array, scale: Array | None, bias: Array | None, *, axis: Axes,
    epsilon: float, axis_name: AxisName, mask: Any, stat_dtype: Any, out_dtype: Any,
) -> tuple[Array, Array, Array]:
    """Training-mode batch norm as Flax's BatchNorm computes it.

    Returns ``(y, batch_mean, batch_var)``: ``y`` in ``out_dtype``, the biased batch
    statistics in ``stat_dtype`` with the feature shape. Without a mask ``y`` is
    :func:`jaxbn.batch_norm`'s (closed-form backward). With a mask, kept rows get
    jaxbn's masked batch norm and masked-out rows Flax's formula with the kept rows'
    statistics (differentiable, as in Flax), so values and gradients are Flax's.
    """
    x = x.astype(out_dtype)
    axes, fshape = feature_axes_of(x, axis)
    params = _params(scale, bias, x, fshape)
    zero = {"mean": jnp.zeros(fshape, stat_dtype), "var": jnp.zeros(fshape, stat_dtype)}
    if mask is None:
        # momentum=0: the "running" statistics returned are the batch statistics exactly.
        y, batch = batch_norm_train(params, zero, x, momentum=0.0, axis=axes, eps=epsilon,
                                    axis_name=axis_name)
        stats = as_stats(batch)
        return y, stats.mean, stats.var
    if axis_name is not None:
        refuse(module, "mask together with axis_name", True,
               "a mask without axis_name (Flax averages the devices' masked means with "
               "equal weights, whatever their counts)")
    mask = _flax_mask(mask, x, axes, module)
    y_kept = batch_norm(params, x, axis=axes, eps=epsilon, mask=mask)
    mean, var = _masked_moments(x.astype(stat_dtype), mask, axes)
    y_out = batch_norm_eval(params, {"mean": mean, "var": var}, x, axis=axes, eps=epsilon)
    return jnp.where(mask, y_kept, y_out), mean, var


def batch_norm_init_output(
    module: str, x: Array, scale: Array | None, bias: Array | None, *, axis: Axes, epsilon: float,
    mask: Any, stat_dtype: Any, out_dtype: Any,
) -> Array:
    """Training-mode output while Linen initializes: Flax's two-pass statistics of any
    batch, a batch of one included, over the entries ``mask`` keeps (broadcastable to
    ``x``; None: all), without cross-device reduction, as in Flax. A mask is checked
    as in training, so that ``init`` refuses what ``apply`` would."""
    x = x.astype(out_dtype)
    axes, fshape = feature_axes_of(x, axis)
    kept = jnp.ones((), bool) if mask is None else _flax_mask(mask, x, axes, module)
    mean, var = _masked_moments(x.astype(stat_dtype), kept, axes)
    return batch_norm_eval(_params(scale, bias, x, fshape), {"mean": mean, "var": var}, x,
                           axis=axes, eps=epsilon)


def batch_norm_eval_step(
    x: Array, scale: Array | None, bias: Array | None, mean: Array, var: Array, *,
    axis: Axes, epsilon: float, out_dtype: Any,
) -> Array:
    """Inference-mode batch norm with running statistics, in ``out_dtype``."""
    x = x.astype(out_dtype)
    axes, fshape = feature_axes_of(x, axis)
    stats = {"mean": mean.reshape(fshape), "var": var.reshape(fshape)}
    return batch_norm_eval(_params(scale, bias, x, fshape), stats, x, axis=axes, eps=epsilon)


def per_example_norm(
    x: Array, scale: Array | None, bias: Array | None, *, reduction_axes: Axes,
    feature_axes: Axes, epsilon: float, center: bool, out_dtype: Any,
) -> Array:
    """Flax's LayerNorm (``center``) or RMSNorm: statistics over ``reduction_axes`` of
    each example, scale and bias over ``feature_axes``.

    When the two coincide (the default), scale and bias go into jaxbn's fused
    closed-form backward; otherwise ``x`` is normalized by jaxbn and scale and
    bias are applied by broadcasting (ordinary autodiff), in float32 at least.
    """
    x = x.astype(out_dtype)
    reduce = canonicalize_axes(reduction_axes, x.ndim)
    features, fshape = feature_axes_of(x, feature_axes)
    norm = layer_norm if center else rms_norm
    if reduce == features:
        return norm(_params(scale, bias, x, fshape), x, axis=reduce, eps=epsilon)
    dtype = compute_dtype(x.dtype)
    y = norm({"gamma": None, "beta": None}, x.astype(dtype), axis=reduce, eps=epsilon)
    shape = tuple(x.shape[a] if a in features else 1 for a in range(x.ndim))
    if scale is not None:
        y = y * scale.reshape(shape).astype(dtype)
    if bias is not None:
        y = y + bias.reshape(shape).astype(dtype)
    return y.astype(x.dtype)


def group_norm_step(
    module: str, x: Array, scale: Array | None, bias: Array | None, *, num_groups: int,
    reduction_axes: Axes | None, epsilon: float, out_dtype: Any,
) -> Array:
    """Flax's GroupNorm (channels last), for its default ``reduction_axes``: every axis
    but the leading batch axis (an input ``(C,)`` is one example)."""
    x = x.astype(out_dtype)
    default = tuple(range(1, x.ndim)) if x.ndim > 1 else (0,)
    if reduction_axes is not None and canonicalize_axes(reduction_axes, x.ndim) != default:
        refuse(module, "reduction_axes", reduction_axes,
               f"None or every axis but the leading batch axis, {default} for an input of "
               f"rank {x.ndim}")
    return group_norm(_params(scale, bias, x), x, num_groups,
                      axis=-1 if x.ndim > 1 else 0, eps=epsilon)


def groups(
    channels: int, num_groups: int | None, group_size: int | None, what: str = "features"
) -> tuple[int, int]:
    """``(num_groups, group_size)`` from Flax's GroupNorm arguments, with Flax's errors
    (``what``: "features" in NNX, "channels" in Linen)."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "Either `num_groups` or `group_size` should be specified. If `group_size` is to "
            "be specified, pass `num_groups=None` as argument to override the default "
            "`num_groups` value of 32.")
    if group_size is not None:
        if channels % group_size != 0:
            raise ValueError(
                f"Number of {what} ({channels}) is not multiple of the group size "
                f"({group_size}).")
        return channels // group_size, group_size
    if not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(
            f"Number of groups ({num_groups}) does not divide the number of channels "
            f"({channels}).")
    return num_groups, channels // num_groups
