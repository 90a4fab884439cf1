"""layer_norm and group_norm (the same closed-form core) against independent references.

References, both written here and independent of jaxbn:
* ``jax.vjp`` of a naive ``jnp`` forward,
* the float64 NumPy CS231n staged forward/backward of test_batch_norm, applied
  with the layer/group statistics axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL32, RTOL64, as_dtype, assert_trees_all_close, data, params_np, rounded, x64
from test_batch_norm import np_staged_backward, np_staged_forward

import jaxbn

pytestmark = pytest.mark.filterwarnings("error")

EPS = 1e-5


def _feature_axes(axis, ndim):
    axis = (axis,) if isinstance(axis, int) else axis
    return tuple(sorted(a % ndim for a in axis))


# ---------------------------------------------------------------- references


def layer_norm_naive(gamma, beta, x, axis, eps=EPS):
    axes = _feature_axes(axis, x.ndim)
    bshape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axes, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * gamma.reshape(bshape) + beta.reshape(bshape)


def group_norm_naive(gamma, beta, x, num_groups, eps=EPS):
    c = x.shape[-1]
    xg = x.reshape(x.shape[:-1] + (num_groups, c // num_groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(xg, axes, keepdims=True)
    var = jnp.var(xg, axes, keepdims=True)
    y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
    return y * gamma + beta


def np_layer_norm(x, gamma, beta, dy, axis, eps=EPS):
    axes = _feature_axes(axis, x.ndim)
    bshape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    y, cache = np_staged_forward(x, gamma.reshape(bshape), beta.reshape(bshape), axes, eps)
    dx, dg, db = np_staged_backward(dy, cache)
    return y, (dx, dg.reshape(gamma.shape), db.reshape(beta.shape))


def np_group_norm(x, gamma, beta, dy, num_groups, eps=EPS):
    c = x.shape[-1]
    gshape = x.shape[:-1] + (num_groups, c // num_groups)
    pshape = (1,) * (x.ndim - 1) + (num_groups, c // num_groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    y, cache = np_staged_forward(x.reshape(gshape), gamma.reshape(pshape), beta.reshape(pshape),
                                 axes, eps)
    dx, dg, db = np_staged_backward(dy.reshape(gshape), cache)
    return y.reshape(x.shape), (dx.reshape(x.shape), dg.reshape(c), db.reshape(c))


def jax_value_and_vjp(f, x, gamma, beta, dy):
    @jax.jit
    def run(x, gamma, beta, dy):
        y, vjp = jax.vjp(f, x, gamma, beta)
        return y, vjp(dy)

    return run(x, gamma, beta, dy)


def rtol(dtype):
    return RTOL64 if dtype == np.float64 else RTOL32


# ---------------------------------------------------------------- layer norm

LAYER_CASES = [((6, 5), -1), ((3, 4, 5), -1), ((3, 4, 5), (-2, -1)), ((2, 3, 4, 5), (1, 3))]
LAYER_IDS = ["ND", "NTD", "tuple-last-two", "tuple-noncontiguous"]


def _layer_inputs(shape, axis, seed):
    axes = _feature_axes(axis, len(shape))
    fshape = tuple(shape[i] for i in axes)
    g, b = params_np(seed + 1, fshape)
    return data(seed, shape, loc=-0.5, scale=2.0), g, b, data(seed + 2, shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LAYER_CASES, ids=LAYER_IDS)
def test_layer_norm_matches_references(shape, axis, dtype):
    inputs = _layer_inputs(shape, axis, seed=0)
    ref = np_layer_norm(*rounded(inputs, dtype), axis=axis)
    with x64(dtype):
        args = as_dtype(inputs, dtype)
        got = jax_value_and_vjp(
            lambda x, g, b: jaxbn.layer_norm(jaxbn.BatchNormParams(g, b), x, axis=axis), *args)
        naive = jax_value_and_vjp(lambda x, g, b: layer_norm_naive(g, b, x, axis), *args)
        assert got[0].dtype == dtype
    assert_trees_all_close(got, ref, rtol=rtol(dtype), err_msg="layer_norm vs NumPy")
    assert_trees_all_close(got, naive, rtol=rtol(dtype), err_msg="layer_norm vs jax.vjp(naive)")
    assert_trees_all_close(naive, ref, rtol=rtol(dtype), err_msg="naive vs NumPy")


def test_layer_norm_is_per_example():
    """Scaling one example does not change any other example's output."""
    x = data(3, (4, 6))
    p = jaxbn.BatchNormParams(*as_dtype(params_np(4, (6,)), jnp.float32))
    x2 = x.copy()
    x2[0] = x2[0] * 100 + 7
    f = jax.jit(jaxbn.layer_norm)
    y1, y2 = np.asarray(f(p, jnp.asarray(x, jnp.float32))), np.asarray(f(p, jnp.asarray(
        x2, jnp.float32)))
    np.testing.assert_array_equal(y1[1:], y2[1:])
    np.testing.assert_allclose(y1[0], y2[0], rtol=1e-4, atol=1e-4)  # affine-invariant too


# ---------------------------------------------------------------- group norm

# (N, C) groups hold >= 4 channels: with 2 values per group xhat = +-1 exactly up to eps
# and the true dx is pure cancellation (~eps/var), so its relative error is meaningless.
GROUP_CASES = [((4, 12), 1), ((4, 12), 2), ((4, 12), 3),
               ((2, 3, 3, 6), 1), ((2, 3, 3, 6), 2), ((2, 3, 3, 6), 3), ((2, 3, 3, 6), 6),
               ((2, 5, 4), 2)]
GROUP_IDS = ["NC-G1", "NC-G2", "NC-G3", "NHWC-G1", "NHWC-G2", "NHWC-G3", "NHWC-G6=C", "NLC-G2"]


def _group_inputs(shape, seed):
    g, b = params_np(seed + 1, shape[-1:])
    return data(seed, shape, loc=1.5, scale=3.0), g, b, data(seed + 2, shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "num_groups"), GROUP_CASES, ids=GROUP_IDS)
def test_group_norm_matches_references(shape, num_groups, dtype):
    inputs = _group_inputs(shape, seed=20)
    ref = np_group_norm(*rounded(inputs, dtype), num_groups=num_groups)
    with x64(dtype):
        args = as_dtype(inputs, dtype)
        got = jax_value_and_vjp(
            lambda x, g, b: jaxbn.group_norm(jaxbn.BatchNormParams(g, b), x, num_groups), *args)
        naive = jax_value_and_vjp(lambda x, g, b: group_norm_naive(g, b, x, num_groups), *args)
        assert got[0].dtype == dtype and got[0].shape == shape
    assert_trees_all_close(got, ref, rtol=rtol(dtype), err_msg="group_norm vs NumPy")
    assert_trees_all_close(got, naive, rtol=rtol(dtype), err_msg="group_norm vs jax.vjp(naive)")
    assert_trees_all_close(naive, ref, rtol=rtol(dtype), err_msg="naive vs NumPy")


def test_group_norm_special_cases_in_float64():
    """num_groups=1 is layer norm over (H, W, C); num_groups=C is instance norm."""
    x, g, b, dy = _group_inputs((2, 3, 2, 4), seed=30)
    with x64(np.float64):
        x, g, b, dy = as_dtype((x, g, b, dy), np.float64)
        p = jaxbn.BatchNormParams(g, b)
        g1 = jax.jit(lambda x: jaxbn.group_norm(p, x, 1))(x)
        ln = jax.jit(lambda x: layer_norm_naive(jnp.ones((3, 2, 4)), jnp.zeros((3, 2, 4)), x,
                                                (1, 2, 3)) * g + b)(x)
        gc = jax.jit(lambda x: jaxbn.group_norm(p, x, 4))(x)
        inst = (x - x.mean((1, 2), keepdims=True)) / jnp.sqrt(x.var((1, 2), keepdims=True) + EPS)
    assert_trees_all_close(g1, ln, rtol=RTOL64)
    assert_trees_all_close(gc, inst * g + b, rtol=RTOL64)


def test_group_norm_groups_are_contiguous_channels():
    """Shifting channels 0..2 (group 0 of 2) leaves group 1's output untouched."""
    x = data(40, (3, 2, 2, 6))
    p = jaxbn.init(6)
    f = jax.jit(lambda x: jaxbn.group_norm(p, x, 2))
    x2 = x.copy()
    x2[..., :3] *= 50.0
    y1, y2 = np.asarray(f(jnp.asarray(x, jnp.float32))), np.asarray(f(jnp.asarray(x2,
                                                                                  jnp.float32)))
    np.testing.assert_array_equal(y1[..., 3:], y2[..., 3:])
    assert not np.allclose(y1[..., :3] * 50, y2[..., :3])


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_family_hessian_and_grad_of_grad_match_naive(norm):
    """Second order (forward-over-reverse and reverse-over-reverse) through the shared core."""
    with x64(np.float64):
        x, g, b, ct = as_dtype(_group_inputs((2, 2, 6), seed=60), np.float64)
        if norm == "layer":
            ours = lambda g, b, x: jaxbn.layer_norm(jaxbn.BatchNormParams(g, b), x)  # noqa: E731
            naive = lambda g, b, x: layer_norm_naive(g, b, x, -1)  # noqa: E731
        else:
            ours = lambda g, b, x: jaxbn.group_norm(jaxbn.BatchNormParams(g, b), x, 3)  # noqa
            naive = lambda g, b, x: group_norm_naive(g, b, x, 3)  # noqa: E731

        def second_order(f):
            loss = lambda x, g: jnp.sum(jnp.tanh(f(g, b, x)) * ct)  # noqa: E731
            gg = jax.grad(lambda x, g: jnp.sum(jax.grad(loss, (0, 1))(x, g)[0] ** 2), (0, 1))
            return jax.hessian(loss, (0, 1))(x, g), gg(x, g)

        got = jax.jit(lambda: second_order(ours))()
        want = jax.jit(lambda: second_order(naive))()
    assert_trees_all_close(got, want, rtol=10 * RTOL64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_family_half_precision(dtype):
    x, g, b, _ = _group_inputs((4, 2, 2, 6), seed=50)
    xh, gh, bh = as_dtype((x, g, b), dtype)
    p = jaxbn.BatchNormParams(gh, bh)
    p32 = jaxbn.BatchNormParams(gh.astype(jnp.float32), bh.astype(jnp.float32))
    tol = 2 ** -7 if dtype == jnp.bfloat16 else 2 ** -10
    for f in (lambda p, x: jaxbn.group_norm(p, x, 3), lambda p, x: jaxbn.layer_norm(p, x)):
        y = jax.jit(f)(p, xh)
        assert y.dtype == dtype
        assert_trees_all_close(y, jax.jit(f)(p32, xh.astype(jnp.float32)), rtol=tol)
