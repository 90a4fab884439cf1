"""Drop-in Equinox modules: ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``.

Each has the constructor signature, defaults, fields, ``eqx.nn.State`` layout,
dtypes and call signature of its namesake in ``equinox.nn`` (Equinox 0.13), so
that swapping the import keeps a model's pytree, its state and its
``eqx.tree_serialise_leaves`` checkpoints::

    from jaxbn import equinox as jeqx   # instead of eqx.nn.BatchNorm & co.
    norm = jeqx.BatchNorm(64, axis_name="batch", mode="batch")

The forward pass is jaxbn's (shifted two-pass statistics) and the backward
pass its closed form (a ``custom_vjp``), instead of autodiff through
Equinox's forward pass; results agree with Equinox's to round-off. Options
whose behaviour jaxbn does not reproduce raise an error instead of being
ignored: ``BatchNorm(mode="ema")`` and its alias, Equinox's default
``mode="legacy"``.

This module needs Equinox (``pip install 'jaxbn[equinox]'``); ``import jaxbn``
never imports it.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any, Literal, cast

try:
    import equinox as eqx
except ImportError as e:
    raise ImportError("jaxbn.equinox needs Equinox: pip install 'jaxbn[equinox]'") from e

import jax
import jax.numpy as jnp

from jaxbn._core import AxisName
from jaxbn._norms import batch_norm_eval, batch_norm_train, group_norm, layer_norm, rms_norm
from jaxbn._params import RunningStats

__all__ = ["BatchNorm", "GroupNorm", "LayerNorm", "RMSNorm"]

Array = jax.Array
State = eqx.nn.State
StateIndex = eqx.nn.StateIndex

# Stands for "no state passed" in the stateless layers' __call__ (as Equinox's sentinel).
_NO_STATE: Any = object()


def _default_floating_dtype() -> Any:
    """float64 under ``jax_enable_x64``, else float32 (Equinox's default parameter dtype)."""
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _promoted(*dtypes: Any) -> Any:
    """The dtype Equinox's arithmetic gives for these operands (standard promotion)."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)


def _shape_tuple(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _as_axis_name(axis_name: Hashable | Sequence[Hashable]) -> AxisName:
    """Equinox accepts any sequence of names; collectives take a tuple."""
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def _with_state(out: Array, state: State) -> Array | tuple[Array, State]:
    return out if state is _NO_STATE else (out, state)


def _per_example(norm: Any, name: str, layer: Any, x: Array) -> Array:
    """``norm`` (layer_norm or rms_norm) of one example over all its axes, as
    Equinox's LayerNorm/RMSNorm: computed in ``x``'s dtype promoted with float32,
    returned in ``x``'s dtype. ``layer`` has ``shape``, ``weight``, ``bias``, ``eps``."""
    if x.shape != layer.shape:
        raise ValueError(
            f"`{name}(shape)(x)` must satisfy the invariant `shape == x.shape`. "
            f"Received `shape={layer.shape}` and `x.shape={x.shape}`. You might need "
            f"to replace `{norm.__name__}(x)` with `jax.vmap({norm.__name__})(x)`."
        )
    with jax.named_scope(f"jaxbn.equinox.{name}"):
        dtype = _promoted(x.dtype, jnp.float32)
        params = {"gamma": None if layer.weight is None else layer.weight.astype(dtype),
                  "beta": None if layer.bias is None else layer.bias.astype(dtype)}
        out = norm(params, x.astype(dtype), axis=tuple(range(x.ndim)), eps=layer.eps)
    return out.astype(x.dtype)


class BatchNorm(eqx.nn.StatefulLayer):
    r"""Computes a mean and variance over the batch and spatial dimensions of an
    array, and uses these to normalise the whole array. Optionally applies a
    channelwise affine transformation afterwards. A drop-in for
    `equinox.nn.BatchNorm` with `mode="batch"`, on jaxbn's closed-form backward pass.

    Given an input array $x = [x_1, ... x_C]$ with $C$ channels, this layer computes

    $$\frac{x_i - \mathbb{E}[x_i]}{\sqrt{\text{Var}[x_i] + \varepsilon}} * \gamma_i + \beta_i$$

    for all $i$, with $\gamma$, $\beta$ of shape $(C,)$ if `channelwise_affine=True`
    and $\gamma = 1$, $\beta = 0$ otherwise. Expectations (the variance biased)
    are taken over all spatial dimensions *and* the batch dimension(s) named by
    `axis_name`.

    !!! warning

        This layer must be used inside of a `vmap` or `pmap` with a matching
        `axis_name` (e.g. `jax.vmap(model, axis_name="batch", in_axes=(0, None),
        out_axes=(0, None))`), possibly nested in `shard_map` with a tuple of names.

    During training (`inference=False`) the batch mean and variance normalise
    the batch, and the state keeps their exponential moving averages,
    ``hidden = momentum * hidden + (1 - momentum) * batch``, starting from mean
    0 and variance 1, and a counter of training steps. During inference the
    zero-debiased averages ``hidden / (1 - momentum**counter)`` normalise
    (the raw ``hidden`` before any training step), exactly as Equinox's
    `mode="batch"`. Toggle with [`equinox.nn.inference_mode`][].

    What differs from Equinox: the statistics are shifted two-pass ones and the
    backward pass is the closed form
    ``dx = inv_std / N * (N dxhat - sum(dxhat) - xhat sum(dxhat xhat))`` (the
    sums all-reduced over `axis_name`), not autodiff of the forward pass; the
    results are equal to round-off (1e-10 relative in the float64 tests). A training
    batch with a single value per channel (batch of one, no spatial
    dimensions) is an error rather than an output of all ``bias``.
    `mode="ema"`, and Equinox's default `mode="legacy"` (which means "ema"),
    raise a `ValueError`: Equinox's "ema" mode normalises training batches with
    the running averages rather than the batch statistics, which is not batch
    norm's closed form.
    """  # noqa: E501

    # Fields in Equinox's order, so that tree_serialise_leaves checkpoints swap.
    weight: Array | None  # (input_size,), dtype; None without channelwise_affine
    bias: Array | None  # (input_size,), dtype; None without channelwise_affine
    ema_first_time_index: None  # always None: mode="ema" is refused
    ema_state_index: None  # always None: mode="ema" is refused
    batch_counter: StateIndex  # int scalar (int64 under x64): training steps taken
    batch_state_index: StateIndex  # (hidden_mean, hidden_var), each (input_size,), dtype
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: Literal["ema", "batch"] = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: Literal["ema", "batch", "legacy"] = "legacy",
    ):
        """**Arguments:**

        - `input_size`: The number of channels in the input array.
        - `axis_name`: The name of the batch axis to compute statistics over, as passed
            to `axis_name` in `jax.vmap` or `jax.pmap`. Can also be a sequence (e.g. a
            tuple or a list) of names, to compute statistics over multiple named axes.
        - `eps`: Value added to the denominator for numerical stability.
        - `channelwise_affine`: Whether the module has learnable channel-wise affine
            parameters.
        - `momentum`: The rate at which to update the running statistics. Should be a
            value between 0 and 1 exclusive.
        - `inference`: If `False` then the batch means and variances will be calculated
            and used to update the running statistics. If `True` then the running
            statistics are directly used for normalisation. This may be toggled with
            [`equinox.nn.inference_mode`][] or overridden during
            [`jaxbn.equinox.BatchNorm.__call__`][].
        - `dtype`: The dtype to use for the running statistics and the weight and bias
            if `channelwise_affine` is `True`. Defaults to either
            `jax.numpy.float32` or `jax.numpy.float64` depending on whether JAX is in
            64-bit mode.
        - `mode`: Must be `"batch"`. Equinox's `"ema"` and its default `"legacy"`
            (an alias of `"ema"`) raise a `ValueError`.
        """
        if mode != "batch":
            if mode in ("ema", "legacy"):
                what = ("mode='legacy' (Equinox's default, which means 'ema')"
                        if mode == "legacy" else "mode='ema'")
                raise ValueError(
                    f"jaxbn.equinox.BatchNorm does not support {what}: Equinox's 'ema' "
                    "mode normalises training batches with the running averages instead of "
                    "the batch statistics, which is not batch norm's closed form. Pass "
                    "mode='batch' (what Equinox recommends for new code), or use "
                    "equinox.nn.BatchNorm for 'ema'."
                )
            raise ValueError(f"Invalid mode {mode!r}: jaxbn.equinox.BatchNorm needs mode='batch'.")
        self.mode = mode
        dtype = _default_floating_dtype() if dtype is None else dtype
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype=dtype)
            self.bias = jnp.zeros((input_size,), dtype=dtype)
        else:
            self.weight = None
            self.bias = None
        self.ema_first_time_index = None
        self.ema_state_index = None
        self.batch_counter = StateIndex(jnp.array(0))
        self.batch_state_index = StateIndex(
            (jnp.zeros((input_size,), dtype=dtype), jnp.ones((input_size,), dtype=dtype)))
        self.inference = inference
        self.axis_name = axis_name
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum

    def __call__(
        self,
        x: Array,
        state: State,
        *,
        key: Any = None,
        inference: bool | None = None,
    ) -> tuple[Array, State]:
        """**Arguments:**

        - `x`: A JAX array of shape `(input_size, dim_1, ..., dim_N)`.
        - `state`: An [`equinox.nn.State`][] object (which is used to store the
            running statistics).
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)
        - `inference`: As per [`jaxbn.equinox.BatchNorm.__init__`][]. If
            `True` or `False` then it will take priority over `self.inference`. If
            `None` then the value from `self.inference` will be used.

        **Returns:**

        A 2-tuple of:

        - A JAX array of shape `(input_size, dim_1, ..., dim_N)`, in the dtype
            Equinox gives: the promotion of `x`'s and the weight's dtypes, and in
            inference also the state's.
        - An updated state object (storing the updated running statistics).

        **Raises:**

        A `NameError` if no `vmap`s are placed around this operation, or if this vmap
        does not have a matching `axis_name`; a `ValueError` in training mode when
        each channel's statistics would be over a single value, or when the
        update of the running statistics would change their dtype (a float64
        input and float32 state), as Equinox's `State.set` does.
        """
        del key
        if inference is None:
            inference = self.inference
        with jax.named_scope("jaxbn.equinox.BatchNorm"):
            counter = state.get(self.batch_counter)
            hidden_mean, hidden_var = state.get(self.batch_state_index)
            # Equinox's output dtype: x and the affine parameters promoted, and in
            # inference also the (stored) statistics.
            affine = [p.dtype for p in (self.weight, self.bias) if p is not None]
            stored = [hidden_mean.dtype, hidden_var.dtype] if inference else []
            x = x.astype(_promoted(x.dtype, *stored, *affine))
            params = {"gamma": self.weight, "beta": self.bias}
            updated = _promoted(x.dtype, hidden_mean.dtype)
            if not inference and updated != hidden_mean.dtype:
                # Equinox's State.set refuses the promoted update with this message.
                raise ValueError(
                    "Old and new values have different structures/shapes/dtypes. The "
                    f"running statistics are {hidden_mean.dtype} and the update of a "
                    f"{x.dtype} input is {updated}: create the BatchNorm with "
                    f"dtype={updated} (as Equinox requires)."
                )
            if inference:
                # Equinox's zero-debiasing, expression for expression, with its
                # (standard) promotion of the integer counter, also under strict promotion.
                with jax.numpy_dtype_promotion("standard"):
                    scale = jnp.where(counter == 0, 1, 1 - self.momentum**counter)
                    stats = {"mean": hidden_mean / scale, "var": hidden_var / scale}
                out = batch_norm_eval(params, stats, x, axis=0, eps=self.eps)
            else:
                out, new = batch_norm_train(
                    params, RunningStats(hidden_mean, hidden_var), x,
                    momentum=self.momentum, axis=0, eps=self.eps,
                    axis_name=_as_axis_name(self.axis_name))
                state = state.set(self.batch_counter, counter + 1)
                new = cast(RunningStats, new)  # a RunningStats in, a RunningStats out
                state = state.set(self.batch_state_index, (new.mean, new.var))
        return out, state


class LayerNorm(eqx.Module):
    r"""Computes a mean and variance over the whole input array, and uses these to
    normalise the whole array. Optionally applies an elementwise affine
    transformation afterwards. A drop-in for `equinox.nn.LayerNorm`.

    Given an input array $x$, this layer computes

    $$\frac{x - \mathbb{E}[x]}{\sqrt{\text{Var}[x] + \varepsilon}} * \gamma + \beta$$

    where $\gamma$, $\beta$ have the same shape as $x$ if `use_weight`/`use_bias`,
    and $\gamma = 1$, $\beta = 0$ otherwise. It works on a single example:
    `jax.vmap(layer)(batch)` normalises each example (each row, for `shape=(D,)`).

    The computation is in the promotion of `x`'s dtype and float32 (16-bit
    input is normalised in float32) and the output has `x`'s dtype, as in
    Equinox. What differs: jaxbn's shifted two-pass statistics and its
    closed-form backward pass (`jaxbn.layer_norm`) instead of autodiff, equal to
    round-off; and an input of a single value (`shape=(1,)`) is an error rather
    than an output equal to `bias`.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    weight: Array | None  # shape, dtype; None without use_weight
    bias: Array | None  # shape, dtype; None without use_bias

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
        *,
        elementwise_affine: bool | None = None,
    ):
        """**Arguments:**

        - `shape`: Shape of the input.
        - `eps`: Value added to denominator for numerical stability.
        - `use_weight`: Whether the module has learnable affine weights.
        - `use_bias`: Whether the module has learnable affine biases.
        - `dtype`: The dtype to use for the weight and the bias in this layer if
            `use_weight` or `use_bias` is set to `True`.
            Defaults to either `jax.numpy.float32` or `jax.numpy.float64` depending
            on whether JAX is in 64-bit mode.
        - `elementwise_affine`: Deprecated alternative to `use_weight` and `use_bias`
            (warns, as in Equinox).
        """
        self.shape = _shape_tuple(shape)
        self.eps = eps
        if elementwise_affine is not None:
            use_weight = elementwise_affine
            use_bias = elementwise_affine
            warnings.warn(
                "LayerNorm(elementwise_affine=...) is deprecated "
                "in favour of LayerNorm(use_weight=...) and LayerNorm(use_bias=...)",
                stacklevel=2,
            )
        self.use_weight = use_weight
        self.use_bias = use_bias
        self.weight = jnp.ones(self.shape, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(self.shape, dtype=dtype) if use_bias else None

    def __call__(
        self, x: Array, state: State = _NO_STATE, *, key: Any = None
    ) -> Array | tuple[Array, State]:
        """**Arguments:**

        - `x`: A JAX array, with the same shape as the `shape` passed to `__init__`.
        - `state`: Ignored; provided for interchangeability with the
            [`equinox.nn.BatchNorm`][] API.
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        The output is a JAX array of the same shape and dtype as `x`.

        If `state` is passed, then a 2-tuple of `(output, state)` is returned. The state
        is passed through unchanged. If `state` is not passed, then just the output is
        returned.
        """
        del key
        return _with_state(_per_example(layer_norm, "LayerNorm", self, x), state)


class GroupNorm(eqx.Module):
    r"""Splits the first dimension ("channels") into groups of fixed size. Computes a
    mean and variance over the contents of each group, and uses these to normalise
    the group. Optionally applies a channel-wise affine transformation afterwards.
    A drop-in for `equinox.nn.GroupNorm`.

    Given an input array $x$ of shape `(channels, ...)` (a single example), this
    layer splits it into `groups`-many arrays $x_i$ of shape
    `(channels/groups, ...)`, and for each one computes

    $$\frac{x_i - \mathbb{E}[x_i]}{\sqrt{\text{Var}[x_i] + \varepsilon}} * \gamma_i + \beta_i$$

    where $\gamma_i$, $\beta_i$ have shape `(channels/groups,)` if
    `channelwise_affine=True`, and $\gamma = 1$, $\beta = 0$ otherwise.

    Computed in the promotion of `x`'s dtype and float32; the output has `x`'s
    dtype, as in Equinox. What differs: `jaxbn.group_norm`'s shifted two-pass
    statistics and closed-form backward pass, equal to round-off; groups of a
    single value (one channel per group, no spatial dimensions) are an error
    rather than an output equal to `bias`.
    """  # noqa: E501

    groups: int = eqx.field(static=True)
    channels: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    weight: Array | None  # (channels,), dtype; None without channelwise_affine
    bias: Array | None  # (channels,), dtype; None without channelwise_affine

    def __init__(
        self,
        groups: int,
        channels: int | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        dtype: Any = None,
    ):
        """**Arguments:**

        - `groups`: The number of groups to split the input into.
        - `channels`: The number of input channels. May be left unspecified (e.g. just
            `None`) if `channelwise_affine=False`.
        - `eps`: Value added to denominator for numerical stability.
        - `channelwise_affine`: Whether the module has learnable affine parameters.
        - `dtype`: The dtype to use for the weight and the bias in this layer if
            `channelwise_affine` is set to `True`.
            Defaults to either `jax.numpy.float32` or `jax.numpy.float64` depending
            on whether JAX is in 64-bit mode.
        """
        if (channels is not None) and (channels % groups != 0):
            raise ValueError(
                "The number of groups must divide the number of channels. Received "
                f"groups={groups} and channels={channels}.")
        if (channels is None) and channelwise_affine:
            raise ValueError(
                "The number of channels should be specified if `channelwise_affine=True`"
            )
        self.groups = groups
        self.channels = channels
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.weight = jnp.ones(channels, dtype=dtype) if channelwise_affine else None
        self.bias = jnp.zeros(channels, dtype=dtype) if channelwise_affine else None

    def __call__(
        self, x: Array, state: State = _NO_STATE, *, key: Any = None
    ) -> Array | tuple[Array, State]:
        """**Arguments:**

        - `x`: A JAX array of shape `(channels, ...)`.
        - `state`: Ignored; provided for interchangeability with the
            [`equinox.nn.BatchNorm`][] API.
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        The output is a JAX array of shape `(channels, ...)` and `x`'s dtype.

        If `state` is passed, then a 2-tuple of `(output, state)` is returned. The state
        is passed through unchanged. If `state` is not passed, then just the output is
        returned.
        """
        del key
        with jax.named_scope("jaxbn.equinox.GroupNorm"):
            dtype = _promoted(x.dtype, jnp.float32)
            params = {"gamma": None if self.weight is None else self.weight.astype(dtype),
                      "beta": None if self.bias is None else self.bias.astype(dtype)}
            out = group_norm(params, x.astype(dtype), self.groups, axis=0, eps=self.eps)
        return _with_state(out.astype(x.dtype), state)


class RMSNorm(eqx.Module):
    r"""A simplified version of LayerNorm which rescales the inputs, but does not
    center them. Optionally applies a learned reweighting of the transformed array
    afterward. A drop-in for `equinox.nn.RMSNorm`.

    Given an input array $x$, this layer computes

    $$\frac{x}{\sqrt{\varepsilon + \frac{1}{n}\Vert x \Vert^2_2}} \gamma + \beta$$

    where $\Vert x \Vert^2_2 = \sum_{i=1}^n x_i^2$, $n = \dim(x)$, $\gamma$ has the
    shape of $x$ if `use_weight=True` ($\gamma = 1$ otherwise) and $\beta$ likewise
    with `use_bias`. It works on a single example: `jax.vmap(layer)(batch)`.

    Computed in the promotion of `x`'s dtype and float32; the output has `x`'s
    dtype, as in Equinox. What differs: `jaxbn.rms_norm`'s closed-form backward
    pass instead of autodiff, equal to round-off.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    weight: Array | None  # shape, dtype; None without use_weight
    bias: Array | None  # shape, dtype; None without use_bias

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: float = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype: Any = None,
    ):
        """**Arguments:**

        - `shape`: Shape of the input.
        - `eps`: Value added to denominator for numerical stability (default 1e-5, as
            Equinox; `jaxbn.rms_norm`'s own default is 1e-6).
        - `use_weight`: Whether the module has learnable affine weights.
        - `use_bias`: Whether the module has learnable affine shift.
        - `dtype`: The dtype to use for the weight and the bias in this layer if
            `use_weight` or `use_bias` is set to `True`.
            Defaults to either `jax.numpy.float32` or `jax.numpy.float64` depending
            on whether JAX is in 64-bit mode.
        """
        dtype = _default_floating_dtype() if dtype is None else dtype
        self.shape = _shape_tuple(shape)
        self.eps = eps
        self.use_weight = use_weight
        self.use_bias = use_bias
        self.weight = jnp.ones(self.shape, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(self.shape, dtype=dtype) if use_bias else None

    def __call__(
        self, x: Array, state: State = _NO_STATE, *, key: Any = None
    ) -> Array | tuple[Array, State]:
        """**Arguments:**

        - `x`: A JAX array, with the same shape as the `shape` passed to `__init__`.
        - `state`: Ignored; provided for interchangeability with the
            [`equinox.nn.BatchNorm`][] API.
        - `key`: Ignored; provided for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        The output is a JAX array of the same shape and dtype as `x`.

        If `state` is passed, then a 2-tuple of `(output, state)` is returned. The state
        is passed through unchanged. If `state` is not passed, then just the output is
        returned.
        """
        del key
        return _with_state(_per_example(rms_norm, "RMSNorm", self, x), state)
