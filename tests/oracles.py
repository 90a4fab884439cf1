"""Independent references for the tests: float64 NumPy, nothing imported from jaxbn or jax.

* :func:`np_staged_forward` / :func:`np_staged_backward`: the CS231n
  ``batchnorm_forward`` / ``batchnorm_backward`` step by step, generalized to
  arbitrary statistics axes and an optional keep-mask; :func:`np_batch_norm`,
  :func:`np_layer_norm` and :func:`np_group_norm` apply them with each norm's
  statistics axes and return ``(y, (dx, dgamma, dbeta))``.
* :func:`layer_norm_naive` / :func:`group_norm_naive`: the textbook forward
  passes, written with array methods and operators only (no ``jax.numpy``), so
  that called on JAX arrays ``jax.vjp`` of them is the autodiff reference.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def feature_axes(axis, ndim):
    """A feature ``axis`` argument (int or tuple, negative allowed) as sorted positive axes."""
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted({a % ndim for a in axis}))


def _feature_broadcast_shape(shape, axes):
    """``shape`` with every axis outside ``axes`` set to 1 (where gamma/beta broadcast)."""
    return tuple(n if i in axes else 1 for i, n in enumerate(shape))


# ------------------------------------------------------- CS231n staged graph


def np_staged_forward(x, gamma, beta, stat_axes, eps, keep=None):
    """CS231n staged forward. ``gamma``/``beta``/``keep`` broadcast against ``x``."""
    keep = np.ones(x.shape) if keep is None else np.broadcast_to(keep, x.shape).astype(np.float64)
    n = np.maximum(np.sum(keep, stat_axes, keepdims=True), 1.0)
    mu = np.sum(x * keep, stat_axes, keepdims=True) / n  # step 1
    xmu = (x - mu) * keep  # step 2
    sq = xmu**2  # step 3
    var = np.sum(sq, stat_axes, keepdims=True) / n  # step 4
    sqrtvar = np.sqrt(var + eps)  # step 5
    ivar = 1.0 / sqrtvar  # step 6
    xhat = xmu * ivar  # step 7
    gammax = gamma * xhat  # step 8
    out = (gammax + beta) * keep  # step 9
    cache = (xhat, gamma, xmu, ivar, sqrtvar, var, n, keep, stat_axes, eps)
    return out, cache


def np_staged_backward(dout, cache):
    """CS231n batchnorm_backward, step by step. Returns ``(dx, dgamma, dbeta)``.

    ``dgamma``/``dbeta`` are summed down to ``gamma``'s (broadcastable) shape.
    """
    xhat, gamma, xmu, ivar, sqrtvar, var, n, keep, stat_axes, eps = cache
    dout = dout * keep
    param_axes = tuple(i for i, s in enumerate(np.shape(gamma)) if s == 1 and dout.shape[i] != 1)
    dbeta = np.sum(dout, param_axes, keepdims=True)  # step 9
    dgammax = dout
    dgamma = np.sum(dgammax * xhat, param_axes, keepdims=True)  # step 8
    dxhat = dgammax * gamma
    divar = np.sum(dxhat * xmu, stat_axes, keepdims=True)  # step 7
    dxmu1 = dxhat * ivar
    dsqrtvar = -1.0 / sqrtvar**2 * divar  # step 6
    dvar = 0.5 / np.sqrt(var + eps) * dsqrtvar  # step 5
    dsq = 1.0 / n * np.ones(dout.shape) * dvar * keep  # step 4
    dxmu2 = 2 * xmu * dsq  # step 3
    dx1 = (dxmu1 + dxmu2) * keep  # step 2
    dmu = -np.sum(dx1, stat_axes, keepdims=True)
    dx2 = 1.0 / n * np.ones(dout.shape) * dmu * keep  # step 1
    return dx1 + dx2, dgamma, dbeta


def _staged(x, gamma, beta, dy, stat_axes, param_shape, eps, keep=None):
    """Value and VJP through the staged graph, gamma/beta reshaped to ``param_shape``."""
    x = np.asarray(x, np.float64)
    y, cache = np_staged_forward(x, np.reshape(gamma, param_shape), np.reshape(beta, param_shape),
                                 stat_axes, eps, keep)
    dx, dgamma, dbeta = np_staged_backward(np.asarray(dy, np.float64), cache)
    return y, dx, dgamma.reshape(np.shape(gamma)), dbeta.reshape(np.shape(beta))


# ------------------------------------------------------------- the norms


def np_batch_norm(x, gamma, beta, dy, *, axis=-1, eps=EPS, mask=None):
    """Batch norm value and VJP: ``(y, (dx, dgamma, dbeta))``. ``gamma``/``beta`` have the
    feature shape; ``mask`` is broadcastable to x's shape without the feature axes."""
    ndim = np.ndim(x)
    features = feature_axes(axis, ndim)
    stat_axes = tuple(i for i in range(ndim) if i not in features)
    keep = None
    if mask is not None:
        batch_ndim = len(stat_axes)
        keep = np.reshape(mask, (1,) * (batch_ndim - np.ndim(mask)) + np.shape(mask))
        keep = np.expand_dims(keep, features)
    y, dx, dgamma, dbeta = _staged(x, gamma, beta, dy, stat_axes,
                                   _feature_broadcast_shape(np.shape(x), features), eps, keep)
    return y, (dx, dgamma, dbeta)


def np_layer_norm(x, gamma, beta, dy, *, axis=-1, eps=EPS):
    """Layer norm value and VJP: statistics over the feature axes of each example."""
    features = feature_axes(axis, np.ndim(x))
    y, dx, dgamma, dbeta = _staged(x, gamma, beta, dy, features,
                                   _feature_broadcast_shape(np.shape(x), features), eps)
    return y, (dx, dgamma, dbeta)


def np_group_norm(x, gamma, beta, dy, *, num_groups, eps=EPS):
    """Group norm value and VJP (channels last): statistics per example and channel group."""
    shape = np.shape(x)
    c = shape[-1]
    grouped = shape[:-1] + (num_groups, c // num_groups)
    stat_axes = tuple(range(1, len(shape) - 1)) + (len(shape),)  # space and within-group
    y, dx, dgamma, dbeta = _staged(
        np.reshape(x, grouped), gamma, beta, np.reshape(dy, grouped), stat_axes,
        (1,) * (len(shape) - 1) + (num_groups, c // num_groups), eps)
    return y.reshape(shape), (dx.reshape(shape), dgamma, dbeta)


# ------------------------------------------ naive forwards (array methods)


def layer_norm_naive(gamma, beta, x, axis, eps=EPS):
    """``(x - mean) / sqrt(var + eps) * gamma + beta`` over the feature axes of each example."""
    axes = feature_axes(axis, x.ndim)
    pshape = _feature_broadcast_shape(x.shape, axes)
    mean = x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    return (x - mean) / (var + eps) ** 0.5 * gamma.reshape(pshape) + beta.reshape(pshape)


def group_norm_naive(gamma, beta, x, num_groups, eps=EPS):
    """Channels-last group norm: statistics per example over space and contiguous channels."""
    c = x.shape[-1]
    xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = xg.mean(axes, keepdims=True)
    var = xg.var(axes, keepdims=True)
    return ((xg - mean) / (var + eps) ** 0.5).reshape(x.shape) * gamma + beta
