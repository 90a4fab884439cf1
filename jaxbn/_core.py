"""The one normalization core shared by batch, layer and group norm.

Every norm in jaxbn is the same computation on an array ``x`` that has been
arranged so that

* ``stat_axes`` are the axes the statistics are reduced over, and
* ``gamma``/``beta`` have ``x``'s rank, with size 1 on every axis they are
  broadcast over (their gradient is summed over those axes).

Batch norm reduces over everything but the feature axes, layer norm over the
feature axes, group norm over the spatial axes and the channels of one group.

The backward pass is the closed form of the CS231n derivation::

    dxhat  = dy * gamma
    dx     = inv_std / N * (N * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))
    dgamma = sum(dy * xhat),   dbeta = sum(dy)

substituted with :func:`jax.custom_vjp`. It saves the input ``x`` (the array
the caller already holds, in its own dtype), the mask if any, and values per
statistics group or feature (mean, inverse standard deviation, count, gamma,
beta); ``xhat`` is recomputed in the backward pass inside the loops that use it.

Performance (see ``benchmarks/``): batch norm is memory bound, so the cost is
the number of times arrays of ``x``'s size are read and written. When
``gamma`` is constant over the statistics (batch norm) the backward pass is
``dbeta = sum(dy)``, ``dgamma = inv_std * sum(dy * (x - mean))`` and one
elementwise pass ``dx = a * dy - b * (x - mean) - c`` with per-feature ``a, b,
c``. Forward + backward is then six loops over ``x``'s size: two reductions
for the (two-pass, centered) statistics, the output, two reductions for the
gradient sums, and ``dx``; nothing else of ``x``'s size is written. XLA:CPU
writes an elementwise value (``x - mean``, a float32 conversion) to memory
when it has more than one user, so every use gets its own copy of the small
inputs through an optimization barrier (:func:`_distinct`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
AxisName = Hashable | tuple[Hashable, ...] | None


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are computed in: float32 for 16-bit floats, else ``dtype``."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def _psum(value: Any, axis_name: AxisName) -> Any:
    return value if axis_name is None else lax.psum(value, axis_name)


def moments(
    x: Array,
    stat_axes: tuple[int, ...],
    mask: Array | None,
    axis_name: AxisName,
) -> tuple[Array, Array, Array]:
    """Mean and biased variance of ``x`` over ``stat_axes`` (two-pass, centered).

    Args:
      x: input; 16-bit floats are reduced in float32 (:func:`compute_dtype`).
      stat_axes: non-negative axes to reduce over.
      mask: ``None`` or a boolean array of ``x``'s rank, broadcastable to it;
        ``False`` entries are left out of the statistics.
      axis_name: mapped axis name(s) over which sums and counts are all-reduced.

    Returns:
      ``(mean, var, count)``, each with ``x``'s rank and size 1 on ``stat_axes``.
      ``count`` is the global number of entries reduced over, clamped to at
      least 1 so an all-masked group gives mean 0 and variance 0 (not NaN).
      All three are in the compute dtype.
    """
    dtype = compute_dtype(x.dtype)
    if mask is None:
        x_sum, x_sq = _converted_copies(x, 2, dtype)
        local_count = math.prod(x.shape[a] for a in stat_axes)
        count = jnp.full((1,) * x.ndim, _psum(local_count, axis_name), dtype)
        sum_x = _psum(jnp.sum(x_sum, stat_axes, keepdims=True), axis_name)
        mean = sum_x / count
        centered = x_sq - mean
        sum_sq = _psum(jnp.sum(centered * centered, stat_axes, keepdims=True), axis_name)
    else:
        x = x.astype(dtype)
        weight = mask.astype(dtype)
        count = _psum(
            jnp.sum(jnp.broadcast_to(weight, _masked_shape(x.shape, stat_axes, mask.shape)),
                    stat_axes, keepdims=True),
            axis_name,
        )
        count = jnp.maximum(count, 1)
        mean = _psum(jnp.sum(jnp.where(mask, x, 0), stat_axes, keepdims=True), axis_name) / count
        centered = jnp.where(mask, x - mean, 0)
        sum_sq = _psum(jnp.sum(centered * centered, stat_axes, keepdims=True), axis_name)
    # Centered sums cannot go negative, but clamp anyway against round-off.
    var = jnp.maximum(sum_sq / count, 0)
    return mean, var, count


def _masked_shape(
    x_shape: tuple[int, ...], stat_axes: tuple[int, ...], mask_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """Shape over which the mask is counted: x's shape on stat axes, the mask's elsewhere."""
    return tuple(n if i in stat_axes else m for i, (n, m) in enumerate(zip(x_shape, mask_shape)))


def _distinct(value: Array, copies: int = 1) -> Any:
    """``value`` (or a tuple of ``copies`` of it) that XLA cannot tell is ``value``.

    XLA:CPU fuses an elementwise producer such as ``x - mean`` into a reduction
    only when the reduction is its one user. When the same ``x - mean`` also
    feeds another reduction or the output pass, common-subexpression
    elimination merges the copies and XLA writes the centered array to memory
    and reads it back, one extra pass over ``x`` per user. Passing the small
    per-feature ``mean`` through an optimization barrier gives each use its own
    ``x - mean``, which XLA then fuses into that use.
    """
    if copies == 1:
        return lax.optimization_barrier(value)
    # Note: XLA merges identical barriers, so two calls with the same value
    # and count give the same copies; callers barrier distinct tuples.
    return lax.optimization_barrier((value,) * copies)


def _converted_copies(x: Array, uses: int, dtype: Any) -> tuple[Array, ...]:
    """``uses`` copies of ``x`` in ``dtype``, each with its own conversion (see :func:`_distinct`).

    A bfloat16 ``x`` read by several reductions would otherwise be converted
    to float32 once and the float32 copy written to memory for all of them.
    """
    if x.dtype == dtype:
        return (x,) * uses
    return tuple(c.astype(dtype) for c in _distinct(x, uses))


def _sum_to(value: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``value`` over the axes where ``shape`` has size 1 (keeping dims)."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and value.shape[i] != 1)
    return jnp.sum(value, axes, keepdims=True) if axes else value


def zero_masked(x: Array, mask: Array | None) -> Array:
    """``x`` with masked-out entries set to 0, so NaN/inf padding never meets a product
    (not even in the derivatives of the backward pass)."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _normalize(
    x: Array, gamma: Array, beta: Array, mask: Array | None,
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName,
) -> Array:
    y, _ = _normalize_fwd(x, gamma, beta, mask, stat_axes, eps, axis_name)
    return y


Residuals = tuple[Array, Array, Array, Array, Array, Array, Array | None]
# (x, mean, inv_std, count, gamma, beta, mask): x as given, mask or None; the
# rest per statistics group in x's rank (size 1 on stat_axes), gamma and beta as given.


def _normalize_fwd(
    x: Array, gamma: Array, beta: Array, mask: Array | None,
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName,
) -> tuple[Array, Residuals]:
    dtype = compute_dtype(x.dtype)
    clean = zero_masked(x, mask)
    mean, var, count = moments(clean, stat_axes, mask, axis_name)
    inv_std = lax.rsqrt(var + jnp.asarray(eps, dtype))
    scale = inv_std * gamma.astype(dtype)  # per statistic group: one multiply per element
    y = (clean.astype(dtype) - _distinct(mean)) * scale + beta.astype(dtype)
    if mask is not None:
        y = jnp.where(mask, y, 0)
    return y.astype(x.dtype), (x, mean, inv_std, count, gamma, beta, mask)


def _keep(mask: Array | None, value: Array) -> Array:
    """``value`` with masked-out entries set to 0 (``value`` itself without a mask)."""
    return value if mask is None else jnp.where(mask, value, 0)


def _batch_norm_bwd(
    x: Array, dy: Array, mean: Array, inv_std: Array, count: Array, gamma: Array,
    mask: Array | None, stat_axes: tuple[int, ...], axis_name: AxisName,
) -> tuple[Array, Array, Array]:
    """Backward pass when ``gamma`` is constant over the statistics (batch norm).

    The two sums of the closed form then factor through ``gamma``:
    ``sum(dxhat) = gamma * sum(dy)`` and ``sum(dxhat * xhat) = gamma * sum(dy * xhat)``,
    so with ``s1 = sum(dy)`` and ``s2 = sum(dy * xhat)``::

        dx     = gamma * inv_std * (dy - s1 / N - xhat * s2 / N)
        dgamma = s2,   dbeta = s1        (summed to gamma's and beta's shapes)

    two reductions and one elementwise pass with per-feature coefficients;
    nothing of ``x``'s size is written besides ``dx``. Returns
    ``(dx, dgamma, dbeta)`` in the compute dtype, ``dgamma``/``dbeta`` in
    ``x``'s rank (size 1 on ``stat_axes``), not yet all-reduced.
    """
    dtype = compute_dtype(x.dtype)
    # Each array-sized use gets its own handle on dy, x and mean, so that XLA fuses
    # the conversion and centering into that use (see _distinct). One barrier
    # for all of them: two identical barriers would be merged again by XLA.
    dy_sum, dy_dot, dy_dx, x_dot, x_dx, mean_dot, mean_dx = lax.optimization_barrier(
        (dy, dy, dy, x, x, mean, mean)
    )
    dy_sum, dy_dot, dy_dx = (_keep(mask, d.astype(dtype)) for d in (dy_sum, dy_dot, dy_dx))
    centered = _keep(mask, x_dot.astype(dtype) - mean_dot)  # padding may hold inf/NaN
    sum_dy = jnp.sum(dy_sum, stat_axes, keepdims=True)
    sum_dy_xhat = jnp.sum(dy_dot * centered, stat_axes, keepdims=True) * inv_std
    if axis_name is not None:
        global_dy, global_dy_xhat = lax.psum((sum_dy, sum_dy_xhat), axis_name)
    else:
        global_dy, global_dy_xhat = sum_dy, sum_dy_xhat
    scale = gamma.astype(dtype) * inv_std
    dx = scale * (dy_dx - global_dy / count) - (x_dx.astype(dtype) - mean_dx) * (
        scale * inv_std * global_dy_xhat / count
    )
    return dx, sum_dy_xhat, sum_dy


def _general_bwd(
    x: Array, dy: Array, mean: Array, inv_std: Array, count: Array, gamma: Array,
    mask: Array | None, stat_axes: tuple[int, ...], axis_name: AxisName,
) -> tuple[Array, Array, Array]:
    """Backward pass when ``gamma`` varies over the statistics (layer and group norm).

    The CS231n closed form as written::

        dxhat  = dy * gamma
        dx     = inv_std / N * (N * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))
        dgamma = dy * xhat,   dbeta = dy     (summed to gamma's and beta's shapes)

    Returns ``(dx, dgamma, dbeta)`` in the compute dtype and ``x``'s shape
    (the caller sums ``dgamma``/``dbeta`` to the parameters' shapes).
    """
    dtype = compute_dtype(x.dtype)
    # A fresh handle on the saved values, so XLA does not merge this pass's
    # x - mean with the forward pass's (see _distinct).
    dy, x, mean = lax.optimization_barrier((dy, x, mean))
    dy = _keep(mask, dy.astype(dtype))
    xhat = _keep(mask, x.astype(dtype) - mean) * inv_std  # padding may hold inf/NaN
    dxhat = dy * gamma.astype(dtype)
    sum_dxhat = _psum(jnp.sum(dxhat, stat_axes, keepdims=True), axis_name)
    sum_dxhat_xhat = _psum(jnp.sum(dxhat * xhat, stat_axes, keepdims=True), axis_name)
    dx = inv_std / count * (count * dxhat - sum_dxhat - xhat * sum_dxhat_xhat)
    return dx, dy * xhat, dy


def _normalize_bwd(
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName, residuals: Residuals, dy: Array
) -> tuple[Array, Array, Array, None]:
    del eps
    x, mean, inv_std, count, gamma, beta, mask = residuals
    x = zero_masked(x, mask)
    constant_gamma = all(gamma.shape[a] == 1 for a in stat_axes)
    backward = _batch_norm_bwd if constant_gamma else _general_bwd
    dx, dgamma, dbeta = backward(x, dy, mean, inv_std, count, gamma, mask, stat_axes, axis_name)
    dx = _keep(mask, dx)
    dgamma, dbeta = _sum_to(dgamma, gamma.shape), _sum_to(dbeta, beta.shape)
    return dx.astype(x.dtype), dgamma.astype(gamma.dtype), dbeta.astype(beta.dtype), None


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def vary_like(params: Any, x: Array) -> Any:
    """Gives each array in ``params`` the device-varying type of ``x`` (a no-op outside shard_map).

    Under ``shard_map`` a replicated ``gamma`` meets a batch-sharded ``x``. Adding
    zeros shaped like ``gamma`` but typed like ``x`` makes JAX insert its implicit
    broadcast *before* the custom VJP; that broadcast's transpose is a ``psum``,
    so the cotangents of replicated params come back replicated (the full-batch
    gradient), and the custom rule itself never sees mismatched types.
    """
    return jax.tree.map(lambda p: p + jnp.zeros_like(x, shape=p.shape, dtype=p.dtype), params)


def normalize(
    x: Array,
    gamma: Array,
    beta: Array,
    *,
    stat_axes: tuple[int, ...],
    eps: float,
    axis_name: AxisName = None,
    mask: Array | None = None,
) -> Array:
    """Normalizes ``x`` over ``stat_axes`` and applies ``gamma * xhat + beta``.

    Args:
      x: floating array of any rank.
      gamma, beta: arrays of ``x``'s rank, size 1 on the axes they broadcast over.
      stat_axes: sorted non-negative axes to compute statistics over.
      eps: added to the variance.
      axis_name: mapped axis name(s) over which statistics are all-reduced.
      mask: ``None`` or boolean of ``x``'s rank; masked-out outputs are 0.

    Returns:
      An array of ``x``'s shape and dtype. Its VJP is the closed form.
    """
    if axis_name is not None:
        gamma, beta = vary_like((gamma, beta), x)
    try:
        return _normalize(x, gamma, beta, mask, stat_axes, eps, axis_name)
    except TypeError as err:
        if "forward-mode" not in str(err):
            raise
        raise TypeError(
            "jaxbn norms have a closed-form reverse-mode derivative (jax.custom_vjp) and "
            "therefore no forward mode, so jax.jvp / jax.jacfwd cannot be applied to "
            "them. Use reverse mode instead: jax.grad, jax.vjp or jax.jacrev; "
            "jax.hessian works (forward-over-reverse). If you need forward mode, use "
            "jaxbn.reference.batch_norm_autodiff."
        ) from err
