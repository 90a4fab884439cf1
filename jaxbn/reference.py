"""The two other ways to the same batch-norm gradient, for comparison.

* :func:`batch_norm_autodiff`: the naive forward pass written with ``jnp``;
  JAX autodiff derives the backward pass (and forward mode works).
* :func:`batch_norm_staged`: a :func:`jax.custom_vjp` that backpropagates
  node by node through the staged computational graph, as CS231n's
  ``batchnorm_backward`` does, saving every intermediate of the forward pass.

Both take the same arguments as :func:`jaxbn.batch_norm` and share its input
checks, dtype policy and shard_map parameter handling, but not its
normalization core or its backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._checks import Params, batch_norm_layout
from jaxbn._core import AxisName, compute_dtype, vary_like

Array = jax.Array

__all__ = ["batch_norm_autodiff", "batch_norm_staged"]


def _sum(value: Array, axes: tuple[int, ...], axis_name: AxisName) -> Array:
    total = jnp.sum(value, axes, keepdims=True)
    return total if axis_name is None else lax.psum(total, axis_name)


def _count(
    x: Array, mask: Array | None, stat_axes: tuple[int, ...], axis_name: AxisName
) -> Array:
    ones = jnp.ones(x.shape, x.dtype) if mask is None else jnp.where(mask, 1.0, 0.0).astype(x.dtype)
    ones = jnp.broadcast_to(ones, x.shape)
    return jnp.maximum(_sum(ones, stat_axes, axis_name), 1)


def _filled(
    gamma: Array | None, beta: Array | None, shape: tuple[int, ...], dtype: Any
) -> tuple[Array, Array]:
    """A missing scale as ones, a missing shift as zeros (constants: no gradient)."""
    return (jnp.ones(shape, dtype) if gamma is None else gamma,
            jnp.zeros(shape, dtype) if beta is None else beta)


def batch_norm_autodiff(
    params: Params, x: Array, *, axis: int | Sequence[int] = -1, eps: float = 1e-5,
    axis_name: AxisName = None, mask: Array | None = None,
) -> Array:
    """Batch norm as the naive forward pass; the backward pass is JAX autodiff.

    Same arguments, conventions and result as :func:`jaxbn.batch_norm`.
    """
    x, gamma, beta, mask, stat_axes, _, shape, eps = batch_norm_layout(
        params, x, axis=axis, eps=eps, mask=mask, axis_name=axis_name,
        training="batch_norm_autodiff")
    dtype = compute_dtype(x.dtype)
    gamma, beta = _filled(gamma, beta, shape, dtype)
    xf = x.astype(dtype)
    keep = jnp.ones((), bool) if mask is None else mask
    xf = jnp.where(keep, xf, 0)  # masked entries may hold inf/NaN padding
    count = _count(xf, mask, stat_axes, axis_name)
    mean = _sum(xf, stat_axes, axis_name) / count
    var = _sum(jnp.where(keep, (xf - mean) ** 2, 0), stat_axes, axis_name) / count
    y = (xf - mean) / jnp.sqrt(var + jnp.asarray(eps, dtype)) * gamma.astype(dtype)
    y = jnp.where(keep, y + beta.astype(dtype), 0)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _staged(
    x: Array, gamma: Array, beta: Array, mask: Array | None,
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName,
) -> Array:
    return _staged_fwd(x, gamma, beta, mask, stat_axes, eps, axis_name)[0]


def _staged_fwd(
    x: Array, gamma: Array, beta: Array, mask: Array | None,
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName,
) -> tuple[Array, tuple[Array, ...]]:
    # The CS231n forward pass, one node at a time, every node cached.
    # x arrives in its compute dtype (float32 for 16-bit input).
    dtype = x.dtype
    keep = jnp.ones((), bool) if mask is None else mask
    xf = jnp.where(keep, x, 0)
    n = _count(xf, mask, stat_axes, axis_name)
    mu = _sum(xf, stat_axes, axis_name) / n  # step 1: mean
    xmu = jnp.where(keep, xf - mu, 0)  # step 2: center
    sq = xmu**2  # step 3
    var = _sum(sq, stat_axes, axis_name) / n  # step 4: variance
    sqrtvar = jnp.sqrt(var + jnp.asarray(eps, dtype))  # step 5
    ivar = 1.0 / sqrtvar  # step 6
    xhat = xmu * ivar  # step 7
    gammax = gamma.astype(dtype) * xhat  # step 8
    out = jnp.where(keep, gammax + beta.astype(dtype), 0)  # step 9
    cache = (xhat, gamma, beta, xmu, ivar, sqrtvar, var, n, keep)
    return out, cache


def _staged_bwd(
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName, cache: tuple[Array, ...],
    dout: Array,
) -> tuple[Array, Array, Array, None]:
    # CS231n batchnorm_backward: the same nine steps in reverse.
    xhat, gamma, beta, xmu, ivar, sqrtvar, var, n, keep = cache
    dtype = xhat.dtype
    dout = jnp.where(keep, dout.astype(dtype), 0)
    param_axes = tuple(i for i, s in enumerate(gamma.shape) if s == 1)
    dbeta = jnp.sum(dout, param_axes, keepdims=True)  # step 9
    dgammax = dout
    dgamma = jnp.sum(dgammax * xhat, param_axes, keepdims=True)  # step 8
    dxhat = dgammax * gamma.astype(dtype)
    divar = _sum(dxhat * xmu, stat_axes, axis_name)  # step 7
    dxmu1 = dxhat * ivar
    dsqrtvar = -1.0 / (sqrtvar**2) * divar  # step 6
    dvar = 0.5 * 1.0 / jnp.sqrt(var + jnp.asarray(eps, dtype)) * dsqrtvar  # step 5
    dsq = jnp.where(keep, 1.0 / n * dvar, 0)  # step 4
    dxmu2 = 2 * xmu * dsq  # step 3
    dx1 = jnp.where(keep, dxmu1 + dxmu2, 0)  # step 2
    dmu = -_sum(dx1, stat_axes, axis_name)
    dx2 = jnp.where(keep, 1.0 / n * dmu, 0)  # step 1
    dx = dx1 + dx2
    return dx, dgamma.astype(gamma.dtype), dbeta.astype(beta.dtype), None


_staged.defvjp(_staged_fwd, _staged_bwd)


def batch_norm_staged(
    params: Params, x: Array, *, axis: int | Sequence[int] = -1, eps: float = 1e-5,
    axis_name: AxisName = None, mask: Array | None = None,
) -> Array:
    """Batch norm whose backward pass walks the staged graph node by node (CS231n).

    Same arguments, conventions and result as :func:`jaxbn.batch_norm`; it
    saves every intermediate of the forward pass for the backward pass.
    """
    x, gamma, beta, mask, stat_axes, _, shape, eps = batch_norm_layout(
        params, x, axis=axis, eps=eps, mask=mask, axis_name=axis_name,
        training="batch_norm_staged")
    xf = x.astype(compute_dtype(x.dtype))
    gamma, beta = _filled(gamma, beta, shape, xf.dtype)
    if axis_name is not None:
        gamma, beta = vary_like((gamma, beta), xf)
    return _staged(xf, gamma, beta, mask, stat_axes, eps, axis_name).astype(x.dtype)
