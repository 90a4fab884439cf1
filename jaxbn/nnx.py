"""Drop-in replacements for ``flax.nnx``'s normalization modules, over jaxbn's functions.

``from jaxbn import nnx as jnnx``; then ``jnnx.BatchNorm`` etc. take exactly
the arguments of Flax 0.12's ``nnx.BatchNorm``, ``LayerNorm``, ``GroupNorm`` and
``RMSNorm``, hold the same state (``scale``/``bias`` as ``nnx.Param``,
``mean``/``var`` as ``nnx.BatchStat``, same shapes and dtypes), consume the same
rng keys and follow ``model.train()``, ``model.eval()`` and ``nnx.view``. So a
model swaps one import and its checkpoints load both ways.

What differs from Flax:

* Training-mode statistics are jaxbn's shifted two-pass ones and the backward
  pass is jaxbn's closed form (less activation memory). ``use_fast_variance``
  is accepted and has no effect: jaxbn always computes the exact two-pass
  variance (Flax's ``use_fast_variance=False``).
* 16-bit inputs are always normalized in float32; Flax's eval-mode BatchNorm
  with ``dtype=bfloat16`` computes in bfloat16, so values may differ by a
  bfloat16 rounding (dtypes are the same).
* A training-mode batch of one value per feature raises jaxbn's ValueError
  (Flax returns ``bias``), as do groups of a single value in GroupNorm.
* Arguments whose Flax behaviour jaxbn does not reproduce raise a ValueError
  naming them: ``axis_index_groups``; ``axis_name`` and ``mask`` on LayerNorm,
  GroupNorm and RMSNorm; GroupNorm ``reduction_axes`` other than the default;
  a BatchNorm ``mask`` that varies along the feature axis or comes with
  ``axis_name``.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

try:
    from flax import nnx
    from flax.nnx import rnglib
    from flax.nnx.module import first_from
    from flax.nnx.nn import dtypes, initializers
    from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("jaxbn.nnx needs Flax: pip install 'jaxbn[flax]'") from e

import jax
import jax.numpy as jnp

from jaxbn import _flax

Array = jax.Array

__all__ = ["BatchNorm", "GroupNorm", "LayerNorm", "RMSNorm"]


def _param(
    use: bool, init: Initializer, rngs: rnglib.Rngs, shape: tuple[int, ...], dtype: Dtype,
    metadata: tp.Mapping[str, tp.Any],
) -> tp.Any:
    """``nnx.Param`` from ``init`` (one ``rngs.params()`` key, as Flax), or ``nnx.data(None)``."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), shape, dtype), **metadata)


def _value(variable: tp.Any) -> Array | None:
    return None if variable is None else variable[...]


class BatchNorm(nnx.Module):
    """BatchNorm Module, a drop-in for ``flax.nnx.BatchNorm`` over :func:`jaxbn.batch_norm_train`.

    ``model.train()`` (or ``use_running_average=False``) normalizes with batch
    statistics over every axis but ``axis`` and updates ``mean``/``var`` as
    ``momentum * running + (1 - momentum) * batch`` (biased batch variance);
    ``model.eval()`` (or ``use_running_average=True``) uses the running ones.
    The call argument takes precedence over the attribute, as in Flax.

    State (as Flax): ``scale``, ``bias``: ``nnx.Param`` of shape ``(num_features,)``
    and ``param_dtype`` (``None`` when unused); ``mean``, ``var``:
    ``nnx.BatchStat`` of shape ``(num_features,)`` and float32. The update is
    computed as Flax does (``momentum * stored + (1 - momentum) * batch``, float64
    when the computation is) and written into the stored float32 arrays, as
    Flax 0.12's ``variable[...] = value`` does (Flax's write warns about the
    cast; this one casts explicitly). ``num_features`` is the product of the
    sizes of the ``axis`` axes.

    Dtypes (as Flax): ``(x, mean, var, scale, bias)`` go through
    ``promote_dtype(..., dtype=dtype)``; statistics are at least float32; the
    output has the promoted dtype.

    Args:
      num_features: the number of input features.
      use_running_average: if True, the stored batch statistics are used.
      axis: the feature axis of the input.
      momentum: decay rate of the running statistics (default 0.99, Flax's).
      epsilon: added to the variance.
      dtype: the dtype of the result (default: infer from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      use_bias: if True, bias (beta) is added.
      use_scale: if True, multiply by scale (gamma).
      bias_init: initializer for bias, by default zero.
      scale_init: initializer for scale, by default one.
      axis_name: a ``shard_map``/``pmap`` axis name: statistics (forward and
        backward) are synchronized over it, as in Flax.
      axis_index_groups: refused unless None (ValueError).
      use_fast_variance: accepted, no effect: jaxbn always computes the exact
        shifted two-pass variance.
      promote_dtype: as Flax's: promotes ``(x, mean, var, scale, bias)``.
      rngs: rng key; ``rngs.params()`` is drawn for scale, then bias, as Flax.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param``s.

    ``__call__(x, use_running_average=None, *, mask=None)``: ``mask`` is
    broadcastable to ``x`` with size 1 on the feature axis; masked-out entries
    are left out of the statistics and are normalized with the kept entries'
    statistics, as in Flax.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: rnglib.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        _flax.check_common("nnx.BatchNorm", axis_index_groups, axis_name=axis_name,
                           axis_name_ok=True)
        feature_shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        self.scale = _param(use_scale, scale_init, rngs, feature_shape, param_dtype,
                            scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, feature_shape, param_dtype, bias_metadata)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (any shape with the feature ``axis``); returns ``x``'s shape."""
        use_running_average = first_from(
            use_running_average,
            self.use_running_average,
            error_msg=(
                "No `use_running_average` argument was provided to BatchNorm. Pass it to "
                "the constructor or the call, or use "
                "`nnx.view(model, use_running_average=True/False)`."
            ),
        )
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)),
            dtype=self.dtype,
        )
        out_dtype = _flax.output_dtype(x, scale, bias, self.dtype)
        if use_running_average:
            return _flax.batch_norm_eval_step(x, scale, bias, mean, var, axis=self.axis,
                                              epsilon=self.epsilon, out_dtype=out_dtype)
        y, batch_mean, batch_var = _flax.batch_norm_train_step(
            "nnx.BatchNorm", x, scale, bias, axis=self.axis, epsilon=self.epsilon,
            axis_name=self.axis_name, mask=mask, stat_dtype=_flax.stats_dtype(x, self.dtype),
            out_dtype=out_dtype)
        # As Flax: stop_gradient only for array refs.
        stop_gradient: tp.Callable[[Array], Array] = (
            jax.lax.stop_gradient if self.mean._can_update or self.var._can_update
            else lambda v: v)
        # Flax writes the update into the stored array, so it keeps the stored dtype
        # (float32 even when the computation is float64); cast explicitly, as that write does.
        for stat, batch in ((self.mean, batch_mean), (self.var, batch_var)):
            stored = stat[...]
            new = _flax.ema(self.momentum, stored, batch.reshape(stored.shape))
            stat[...] = stop_gradient(new.astype(stored.dtype))
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` unless it is None."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class LayerNorm(nnx.Module):
    """Layer normalization, a drop-in for ``flax.nnx.LayerNorm`` over :func:`jaxbn.layer_norm`.

    Statistics over ``reduction_axes`` of each example; ``scale``/``bias``
    (``nnx.Param`` of shape ``(num_features,)``, the product of the
    ``feature_axes`` sizes) over ``feature_axes``. When the two coincide (the
    default, ``-1``) scale and bias go through jaxbn's fused closed-form
    backward; otherwise ``x`` is normalized by jaxbn and scaled by broadcasting.
    Dtypes as Flax (``promote_dtype((x, scale, bias), dtype=dtype)``).

    Args:
      num_features: the number of input features.
      epsilon: added to the variance (default 1e-6, Flax's).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
      reduction_axes, feature_axes, promote_dtype, rngs, bias_metadata,
      scale_metadata: as Flax's.
      axis_name, axis_index_groups: refused unless None (ValueError).
      use_fast_variance: accepted, no effect (always the exact two-pass variance).

    ``__call__(x, *, mask=None)``: ``mask`` is refused unless None.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: rnglib.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        _flax.check_common("nnx.LayerNorm", axis_index_groups, axis_name=axis_name)
        feature_shape = (num_features,)
        self.scale = _param(use_scale, scale_init, rngs, feature_shape, param_dtype,
                            scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, feature_shape, param_dtype, bias_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``; returns ``x``'s shape."""
        _flax.refuse_mask("nnx.LayerNorm", mask)
        x, scale, bias = self.promote_dtype(
            (x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        return _flax.per_example_norm(
            x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=self.epsilon, center=True,
            out_dtype=_flax.output_dtype(x, scale, bias, self.dtype))


class RMSNorm(nnx.Module):
    """RMS normalization, a drop-in for ``flax.nnx.RMSNorm`` over :func:`jaxbn.rms_norm`.

    ``y = x / sqrt(mean(x^2) + epsilon) * scale`` with the mean over
    ``reduction_axes`` of each example; ``scale`` (``nnx.Param`` of shape
    ``(num_features,)``; no bias) over ``feature_axes``. Fused closed-form
    backward when the two coincide (the default), as in :class:`LayerNorm`.

    Args:
      num_features: the number of input features.
      epsilon: added to the mean square (default 1e-6, Flax's).
      dtype, param_dtype, use_scale, scale_init, reduction_axes, feature_axes,
      promote_dtype, rngs, scale_metadata: as Flax's.
      axis_name, axis_index_groups: refused unless None (ValueError).
      use_fast_variance: accepted, no effect.

    ``__call__(x, mask=None)``: ``mask`` is refused unless None.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: rnglib.Rngs,
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        _flax.check_common("nnx.RMSNorm", axis_index_groups, axis_name=axis_name)
        feature_shape = (num_features,)
        self.scale = _param(use_scale, scale_init, rngs, feature_shape, param_dtype,
                            scale_metadata)
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalizes ``x``; returns ``x``'s shape."""
        _flax.refuse_mask("nnx.RMSNorm", mask)
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        return _flax.per_example_norm(
            x, scale, None, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=self.epsilon, center=False,
            out_dtype=_flax.output_dtype(x, scale, None, self.dtype))


class GroupNorm(nnx.Module):
    """Group normalization, a drop-in for ``flax.nnx.GroupNorm`` over :func:`jaxbn.group_norm`.

    Channels last: the last axis of ``x`` (``num_features`` channels) is split
    into ``num_groups`` groups of ``group_size`` channels (give one of the two;
    errors as Flax's), and each example's group is normalized over its channels
    and every axis but the leading batch axis (Flax's default
    ``reduction_axes``; an input ``(C,)`` is one example). ``scale``/``bias``:
    ``nnx.Param`` of shape ``(num_features,)``. Dtypes as Flax.

    Args:
      num_features: the number of channels.
      num_groups: the number of channel groups (default 32), or None with
        ``group_size``.
      group_size: the number of channels in a group.
      epsilon: added to the variance (default 1e-6, Flax's).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
      promote_dtype, rngs, bias_metadata, scale_metadata: as Flax's.
      reduction_axes: None, or the default spelled out (every axis but axis 0);
        others raise a ValueError.
      axis_name, axis_index_groups: refused unless None (ValueError).
      use_fast_variance: accepted, no effect.

    ``__call__(x, *, mask=None)``: ``mask`` is refused unless None.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        reduction_axes: Axes | None = None,
        axis_name: str | None = None,
        axis_index_groups: tp.Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: rnglib.Rngs,
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        _flax.check_common("nnx.GroupNorm", axis_index_groups, axis_name=axis_name)
        self.feature_axis = -1
        self.num_groups, self.group_size = _flax.groups(num_features, num_groups, group_size)
        feature_shape = (num_features,)
        self.scale = _param(use_scale, scale_init, rngs, feature_shape, param_dtype,
                            scale_metadata)
        self.bias = _param(use_bias, bias_init, rngs, feature_shape, param_dtype, bias_metadata)
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` of shape ``(N, ..., num_features)``; returns ``x``'s shape."""
        _flax.refuse_mask("nnx.GroupNorm", mask)
        x, scale, bias = self.promote_dtype(
            (x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        return _flax.group_norm_step(
            "nnx.GroupNorm", x, scale, bias, num_groups=self.num_groups,
            reduction_axes=self.reduction_axes, epsilon=self.epsilon,
            out_dtype=_flax.output_dtype(x, scale, bias, self.dtype))
