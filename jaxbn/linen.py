"""Drop-in replacements for ``flax.linen``'s normalization modules, over jaxbn's functions.

``from jaxbn import linen as jlinen``; then ``jlinen.BatchNorm`` etc. have
exactly the fields and defaults of Flax 0.12's ``nn.BatchNorm``, ``LayerNorm``,
``GroupNorm`` and ``RMSNorm`` and the same variables: ``params`` holds ``scale``
and ``bias``, ``batch_stats`` holds ``mean`` and ``var`` (float32 at init; the
update is Flax's ``momentum * running + (1 - momentum) * batch``, so it is
float64 after a float64 step, as in Flax). A model swaps one import and its
variables load both ways.

What differs from Flax:

* Training-mode statistics are jaxbn's shifted two-pass ones and the backward
  pass is jaxbn's closed form (less activation memory). ``use_fast_variance``
  is accepted and has no effect: jaxbn always computes the exact two-pass
  variance (Flax's ``use_fast_variance=False``).
* ``init`` works on any batch, a batch of one included: while initializing,
  BatchNorm's output uses Flax's own two-pass statistics and the statistics
  are not updated, as in Flax. Outside ``init``, a training-mode batch of one
  value per feature raises jaxbn's ValueError (Flax returns ``bias``), as do
  groups of a single value in GroupNorm.
* Arguments whose Flax behaviour jaxbn does not reproduce raise a ValueError
  naming them: ``axis_index_groups``; ``force_float32_reductions=False``;
  ``axis_name`` and ``mask`` on LayerNorm, GroupNorm and RMSNorm; GroupNorm
  ``reduction_axes`` other than the default; a BatchNorm ``mask`` that varies
  along the feature axis or comes with ``axis_name``.
"""

from __future__ import annotations

from typing import Any

try:
    from flax import linen as nn
    from flax.linen.module import merge_param
    from flax.typing import Axes, Dtype, Initializer
    from jax.nn import initializers
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("jaxbn.linen needs Flax: pip install 'jaxbn[flax]'") from e

import jax
import jax.numpy as jnp

from jaxbn import _flax

Array = jax.Array

__all__ = ["BatchNorm", "GroupNorm", "LayerNorm", "RMSNorm"]


def _scale_bias(
    module: nn.Module, shape: tuple[int, ...], use_scale: bool, use_bias: bool
) -> tuple[Array | None, Array | None]:
    """The ``params`` ``scale`` and ``bias`` of ``shape`` (None when unused), as Flax."""
    m: Any = module
    scale = m.param("scale", m.scale_init, shape, m.param_dtype) if use_scale else None
    bias = m.param("bias", m.bias_init, shape, m.param_dtype) if use_bias else None
    return scale, bias


class BatchNorm(nn.Module):
    """BatchNorm Module, a drop-in for ``flax.linen.BatchNorm`` over :func:`jaxbn.batch_norm_train`.

    With ``use_running_average=False`` (field or call argument; giving both, or
    neither, is Flax's error) it normalizes with batch statistics over every
    axis but ``axis`` and, in ``apply(..., mutable=["batch_stats"])``, updates
    ``batch_stats`` as ``momentum * running + (1 - momentum) * batch`` (biased
    batch variance); with ``True`` it uses the running statistics.

    Variables (as Flax): ``params``: ``scale``, ``bias`` of the feature shape
    and ``param_dtype``; ``batch_stats``: ``mean``, ``var`` of the feature shape,
    float32 at init and given the dtype of Flax's update afterwards. Dtypes as
    Flax: statistics in ``dtype`` (else ``x``'s) and at least float32, output in
    ``dtype``, else the promoted dtype of ``x``, scale and bias.

    Attributes:
      use_running_average: if True, the statistics in ``batch_stats`` are used.
      axis: the feature axis of the input.
      momentum: decay rate of the running statistics (default 0.99, Flax's).
      epsilon: added to the variance.
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as Flax's.
      axis_name: a ``shard_map``/``pmap`` axis name: statistics (forward and
        backward) are synchronized over it, as in Flax (not while initializing).
      axis_index_groups: refused unless None (ValueError).
      use_fast_variance: accepted, no effect (always the exact two-pass variance).
      force_float32_reductions: refused unless True (ValueError).

    ``__call__(x, use_running_average=None, *, mask=None)``: ``mask`` is
    broadcastable to ``x`` with size 1 on the feature axis; masked-out entries
    are left out of the statistics and are normalized with the kept entries'
    statistics, as in Flax.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from jaxbn import linen as jlinen
      >>> bn = jlinen.BatchNorm(momentum=0.9)
      >>> x = jax.random.normal(jax.random.key(0), (5, 6))
      >>> variables = bn.init(jax.random.key(1), x[:1], use_running_average=False)
      >>> jax.tree.map(jnp.shape, variables)
      {'batch_stats': {'mean': (6,), 'var': (6,)}, 'params': {'bias': (6,), 'scale': (6,)}}
      >>> y, updates = bn.apply(variables, x, use_running_average=False,
      ...                       mutable=["batch_stats"])
      >>> y = bn.apply({**variables, **updates}, x, use_running_average=True)
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (any shape with the feature ``axis``); returns ``x``'s shape."""
        _flax.check_common("linen.BatchNorm", self.axis_index_groups,
                           self.force_float32_reductions, self.axis_name, axis_name_ok=True)
        use_running_average = merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        x = jnp.asarray(x)
        _, feature_shape = _flax.feature_axes_of(x, self.axis)
        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), feature_shape)
        ra_var = self.variable(
            "batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), feature_shape)
        scale, bias = _scale_bias(self, feature_shape, self.use_scale, self.use_bias)
        out_dtype = _flax.output_dtype(x, scale, bias, self.dtype)
        stat_dtype = _flax.stats_dtype(x, self.dtype)
        if use_running_average:
            return _flax.batch_norm_eval_step(
                x, scale, bias, ra_mean.value, ra_var.value, axis=self.axis,
                epsilon=self.epsilon, out_dtype=out_dtype)
        if self.is_initializing():
            return _flax.batch_norm_init_output(
                "linen.BatchNorm", x, scale, bias, axis=self.axis, epsilon=self.epsilon, mask=mask,
                stat_dtype=stat_dtype, out_dtype=out_dtype)
        y, batch_mean, batch_var = _flax.batch_norm_train_step(
            "linen.BatchNorm", x, scale, bias, axis=self.axis, epsilon=self.epsilon,
            axis_name=self.axis_name, mask=mask, stat_dtype=stat_dtype, out_dtype=out_dtype)
        ra_mean.value = _flax.ema(self.momentum, ra_mean.value, batch_mean)
        ra_var.value = _flax.ema(self.momentum, ra_var.value, batch_var)
        return y


class LayerNorm(nn.Module):
    """Layer normalization, a drop-in for ``flax.linen.LayerNorm`` over :func:`jaxbn.layer_norm`.

    Statistics over ``reduction_axes`` of each example; ``params`` ``scale``
    and ``bias`` (the shape of the ``feature_axes``) over ``feature_axes``. When
    the two coincide (the default, ``-1``) scale and bias go through jaxbn's
    fused closed-form backward; otherwise ``x`` is normalized by jaxbn and
    scaled by broadcasting. Dtypes as Flax.

    Attributes:
      epsilon: added to the variance (default 1e-6, Flax's).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
      reduction_axes, feature_axes: as Flax's.
      axis_name, axis_index_groups: refused unless None (ValueError).
      use_fast_variance: accepted, no effect (always the exact two-pass variance).
      force_float32_reductions: refused unless True (ValueError).

    ``__call__(x, *, mask=None)``: ``mask`` is refused unless None.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``; returns ``x``'s shape."""
        _flax.check_common("linen.LayerNorm", self.axis_index_groups,
                           self.force_float32_reductions, self.axis_name)
        _flax.refuse_mask("linen.LayerNorm", mask)
        x = jnp.asarray(x)
        _, feature_shape = _flax.feature_axes_of(x, self.feature_axes)
        scale, bias = _scale_bias(self, feature_shape, self.use_scale, self.use_bias)
        return _flax.per_example_norm(
            x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=self.epsilon, center=True,
            out_dtype=_flax.output_dtype(x, scale, bias, self.dtype))


class RMSNorm(nn.Module):
    """RMS normalization, a drop-in for ``flax.linen.RMSNorm`` over :func:`jaxbn.rms_norm`.

    ``y = x / sqrt(mean(x^2) + epsilon) * scale`` with the mean over
    ``reduction_axes`` of each example; ``params`` ``scale`` (no bias) over
    ``feature_axes``. Fused closed-form backward when the two coincide (the
    default), as in :class:`LayerNorm`. Dtypes as Flax.

    Attributes:
      epsilon: added to the mean square (default 1e-6, Flax's).
      dtype, param_dtype, use_scale, scale_init, reduction_axes, feature_axes:
        as Flax's.
      axis_name, axis_index_groups: refused unless None (ValueError).
      use_fast_variance: accepted, no effect.
      force_float32_reductions: refused unless True (ValueError).

    ``__call__(x, *, mask=None)``: ``mask`` is refused unless None.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``; returns ``x``'s shape."""
        _flax.check_common("linen.RMSNorm", self.axis_index_groups,
                           self.force_float32_reductions, self.axis_name)
        _flax.refuse_mask("linen.RMSNorm", mask)
        x = jnp.asarray(x)
        _, feature_shape = _flax.feature_axes_of(x, self.feature_axes)
        scale, _ = _scale_bias(self, feature_shape, self.use_scale, False)
        return _flax.per_example_norm(
            x, scale, None, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=self.epsilon, center=False,
            out_dtype=_flax.output_dtype(x, scale, None, self.dtype))


class GroupNorm(nn.Module):
    """Group normalization, a drop-in for ``flax.linen.GroupNorm`` over :func:`jaxbn.group_norm`.

    Channels last: the last axis of ``x`` is split into ``num_groups`` groups of
    ``group_size`` channels (give one of the two; errors as Flax's), and each
    example's group is normalized over its channels and every axis but the
    leading batch axis (Flax's default ``reduction_axes``; an input ``(C,)`` is
    one example). ``params`` ``scale``/``bias`` of shape ``(C,)``. Dtypes as Flax.

    Attributes:
      num_groups: the number of channel groups (default 32), or None with
        ``group_size``.
      group_size: the number of channels in a group.
      epsilon: added to the variance (default 1e-6, Flax's).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as Flax's.
      reduction_axes: None, or the default spelled out (every axis but axis 0);
        others raise a ValueError.
      axis_name, axis_index_groups: refused unless None (ValueError).
      use_fast_variance: accepted, no effect.
      force_float32_reductions: refused unless True (ValueError).

    ``__call__(x, *, mask=None)``: ``mask`` is refused unless None.
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` of shape ``(N, ..., C)``; returns ``x``'s shape."""
        _flax.check_common("linen.GroupNorm", self.axis_index_groups,
                           self.force_float32_reductions, self.axis_name)
        _flax.refuse_mask("linen.GroupNorm", mask)
        x = jnp.asarray(x)
        channels = x.shape[-1]
        num_groups, _ = _flax.groups(channels, self.num_groups, self.group_size, "channels")
        scale, bias = _scale_bias(self, (channels,), self.use_scale, self.use_bias)
        return _flax.group_norm_step(
            "linen.GroupNorm", x, scale, bias, num_groups=num_groups,
            reduction_axes=self.reduction_axes, epsilon=self.epsilon,
            out_dtype=_flax.output_dtype(x, scale, bias, self.dtype))
