"""Batch norm numerics: the closed-form custom VJP against independent oracles.

Oracles:
* ``jax.grad``/``jax.vjp`` of the naive forward (``reference.batch_norm_autodiff``),
* a float64 NumPy transcription of the CS231n staged forward and
  ``batchnorm_backward`` written below (it imports nothing from jaxbn),
* finite differences (``jax.test_util.check_grads``, orders 1 and 2).

Cotangents are random (not ``sum()``), so the ``sum(dxhat)`` and
``sum(dxhat * xhat)`` terms of the closed form are exercised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL32, RTOL64, as_dtype, assert_trees_all_close, data, params_np, rounded, x64
from jax.test_util import check_grads

import jaxbn
from jaxbn.reference import batch_norm_autodiff, batch_norm_staged

pytestmark = pytest.mark.filterwarnings("error")

IMPLS = {
    "custom": jaxbn.batch_norm,
    "autodiff": batch_norm_autodiff,
    "staged": batch_norm_staged,
}

# (x shape, feature axis): (N, D), NHWC, NCHW with axis=1, tuple axes, a leading feature axis.
CASES = [
    ((8, 5), -1),
    ((4, 3, 3, 5), -1),
    ((4, 5, 3, 3), 1),
    ((6, 3, 4), (1, 2)),
    ((3, 4, 2, 5), (1, -1)),
    ((5, 7), 0),
]
CASE_IDS = ["ND", "NHWC", "NCHW-axis1", "tuple-axis", "tuple-neg-axis", "axis0"]

# Half precision: inputs are bf16/f16 but statistics are float32, so the
# output differs from the float32 computation on the same values only by the
# final rounding to the 16-bit dtype (relative to the largest entry).
RTOL_HALF = {jnp.bfloat16: 2 ** -7, jnp.float16: 2 ** -10}

# Large offset: float32 data at mean 1e4, std 1. The float32 inputs themselves
# are exact; the two-pass centered variance keeps the error at a few float32
# ulps of 1e4 relative to the unit-scale output (measured ~8e-6).
RTOL_OFFSET = 5e-5


# --------------------------------------------------------------------------
# The NumPy oracle: CS231n batchnorm_forward / batchnorm_backward, float64,
# generalized to arbitrary statistics axes and an optional keep-mask.
# --------------------------------------------------------------------------


def _axes(axis, ndim):
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted({a % ndim for a in axis}))


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


def np_batch_norm(x, gamma, beta, dy, *, axis=-1, eps=1e-5, mask=None):
    """Batch norm value and VJP in float64 NumPy. ``gamma``/``beta`` have the feature shape.

    ``mask`` is broadcastable to x's shape without the feature axes.
    """
    x = np.asarray(x, np.float64)
    feature_axes = _axes(axis, x.ndim)
    stat_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    bshape = tuple(x.shape[i] if i in feature_axes else 1 for i in range(x.ndim))
    keep = None
    if mask is not None:
        mask = np.asarray(mask)
        batch_shape = tuple(x.shape[i] for i in stat_axes)
        mask = mask.reshape((1,) * (len(batch_shape) - mask.ndim) + mask.shape)
        for a in feature_axes:
            mask = np.expand_dims(mask, a)
        keep = mask
    y, cache = np_staged_forward(
        x, np.reshape(gamma, bshape), np.reshape(beta, bshape), stat_axes, eps, keep
    )
    dx, dgamma, dbeta = np_staged_backward(np.asarray(dy, np.float64), cache)
    fshape = np.shape(gamma)
    return y, (dx, dgamma.reshape(fshape), dbeta.reshape(fshape))


# --------------------------------------------------------------------------
# JAX side.
# --------------------------------------------------------------------------


def value_and_vjp(impl, x, gamma, beta, dy, **kw):
    """``(y, (dx, dgamma, dbeta))`` of ``impl`` for cotangent ``dy``, jitted."""

    @jax.jit
    def run(x, gamma, beta, dy):
        y, vjp = jax.vjp(lambda x, g, b: impl(jaxbn.BatchNormParams(g, b), x, **kw), x, gamma, beta)
        return y, vjp(dy)

    return run(x, gamma, beta, dy)


def make_inputs(shape, axis, seed=0):
    feature_axes = _axes(axis, len(shape))
    fshape = tuple(shape[i] for i in feature_axes)
    x = data(seed, shape, loc=0.7, scale=2.0)
    gamma, beta = params_np(seed + 1, fshape)
    dy = data(seed + 2, shape)
    return x, gamma, beta, dy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_matches_numpy_cs231n_oracle(shape, axis, impl, dtype):
    inputs = make_inputs(shape, axis)
    ref_y, ref_grads = np_batch_norm(*rounded(inputs, dtype), axis=axis)
    with x64(dtype):
        y, grads = value_and_vjp(IMPLS[impl], *as_dtype(inputs, dtype), axis=axis)
        assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    rtol = RTOL64 if dtype == np.float64 else RTOL32
    assert_trees_all_close(y, ref_y, rtol=rtol, err_msg="y")
    assert_trees_all_close(grads, ref_grads, rtol=rtol, err_msg="(dx, dgamma, dbeta)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_custom_vjp_equals_autodiff_and_staged(shape, axis, dtype):
    """All three implementations agree with each other (not only with NumPy), and
    jax.grad of the naive forward (cotangent as loss weights) equals the custom VJP."""
    inputs = make_inputs(shape, axis, seed=10)
    rtol = RTOL64 if dtype == np.float64 else RTOL32

    def loss(impl, dy):
        return lambda x, g, b: jnp.sum(impl(jaxbn.BatchNormParams(g, b), x, axis=axis) * dy)

    @jax.jit
    def all_three(x, gamma, beta, dy):
        out = {}
        for name, impl in IMPLS.items():
            y = impl(jaxbn.BatchNormParams(gamma, beta), x, axis=axis)
            out[name] = (y, jax.grad(loss(impl, dy), (0, 1, 2))(x, gamma, beta))
        return out

    with x64(dtype):
        out = all_three(*as_dtype(inputs, dtype))
    assert_trees_all_close(out["custom"], out["autodiff"], rtol=rtol, err_msg="custom vs autodiff")
    assert_trees_all_close(out["staged"], out["autodiff"], rtol=rtol, err_msg="staged vs autodiff")
    assert_trees_all_close(out["custom"], out["staged"], rtol=rtol, err_msg="custom vs staged")


@pytest.mark.parametrize("impl", ["custom", "staged"])  # autodiff is JAX's own derivative
@pytest.mark.parametrize(("shape", "axis"), [((5, 3), -1), ((3, 2, 2, 2), 1)],
                         ids=["ND", "NCHW-axis1"])
def test_check_grads_finite_differences_order2(shape, axis, impl):
    """Reverse mode, first and second order, against central finite differences (float64)."""
    x, gamma, beta, _ = make_inputs(shape, axis, seed=20)
    with x64(np.float64):
        x, gamma, beta = as_dtype((x, gamma, beta), np.float64)
        f = jax.jit(lambda x, g, b: IMPLS[impl](jaxbn.BatchNormParams(g, b), x, axis=axis))
        check_grads(f, (x, gamma, beta), order=2, modes=("rev",), eps=1e-4, atol=1e-6, rtol=1e-6)


def test_check_grads_can_fail():
    """The finite-difference check does catch a wrong backward (here dx missing a term)."""

    @jax.custom_vjp
    def wrong(x):
        return (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)

    def fwd(x):
        return wrong(x), x

    def bwd(x, dy):
        inv_std = 1 / jnp.sqrt(x.var(0) + 1e-5)
        return (inv_std * (dy - dy.mean(0)),)  # drops the xhat * mean(dy * xhat) term

    wrong.defvjp(fwd, bwd)
    with x64(np.float64):
        x = jnp.asarray(data(0, (5, 3)), np.float64)
        with pytest.raises(AssertionError):
            check_grads(wrong, (x,), order=1, modes=("rev",), eps=1e-4, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
def test_eps_enters_as_variance_offset(eps):
    inputs = make_inputs((7, 4), -1, seed=30)
    ref_y, ref_grads = np_batch_norm(*inputs, eps=eps)
    with x64(np.float64):
        y, grads = value_and_vjp(jaxbn.batch_norm, *as_dtype(inputs, np.float64), eps=eps)
    assert_trees_all_close((y, grads), (ref_y, ref_grads), rtol=RTOL64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_statistics(dtype):
    """gamma=1, beta=0: per-feature mean 0 and biased variance var / (var + eps)."""
    x = data(40, (64, 3), loc=-3.0, scale=5.0)
    with x64(dtype):
        y = np.asarray(jax.jit(jaxbn.batch_norm)(jaxbn.init(3, dtype), jnp.asarray(x, dtype)),
                       np.float64)
    xr = x.astype(dtype).astype(np.float64)
    var = xr.var(0)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(y.mean(0), 0, atol=tol)
    np.testing.assert_allclose(y.var(0), var / (var + 1e-5), rtol=tol * 10)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_half_precision_keeps_dtype_and_matches_float32(impl, dtype):
    shape = (16, 3, 3, 4)
    x, gamma, beta, dy = make_inputs(shape, -1, seed=50)
    # An offset of 50 (ulp 0.25 in bfloat16): statistics accumulated in the 16-bit dtype
    # would be off by several times the tolerance; float32 statistics are not.
    x = x + 50.0
    f = IMPLS[impl]
    xh, gh, bh, dyh = as_dtype((x, gamma, beta, dy), dtype)
    y, (dx, dg, db) = value_and_vjp(f, xh, gh, bh, dyh)
    assert y.dtype == dtype and dx.dtype == dtype and dg.dtype == dtype and db.dtype == dtype
    # The float32 computation on the very same (exactly representable) values.
    as32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    y32, grads32 = value_and_vjp(f, as32(xh), as32(gh), as32(bh), as32(dyh))
    rtol = RTOL_HALF[dtype]
    assert_trees_all_close(y, y32, rtol=rtol, err_msg="y")
    assert_trees_all_close(dx, grads32[0], rtol=rtol, err_msg="dx")
    # dgamma/dbeta are sums of 144 terms, accumulated in float32, rounded once.
    assert_trees_all_close((dg, db), grads32[1:], rtol=rtol, err_msg="dgamma, dbeta")
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_large_offset_float32(impl):
    """Mean 1e4, std 1 in float32: normalizes to mean ~0 / std ~1 and matches float64."""
    x, gamma, beta, dy = make_inputs((256, 3), -1, seed=60)
    x = 1e4 + (x - x.mean(0)) / x.std(0)
    x32 = x.astype(np.float32)
    y, grads = value_and_vjp(IMPLS[impl], *as_dtype((x32, gamma, beta, dy), np.float32))
    ref_y, ref_grads = np_batch_norm(*rounded((x32, gamma, beta, dy), np.float32))
    assert_trees_all_close(y, ref_y, rtol=RTOL_OFFSET, err_msg="y")
    assert_trees_all_close(grads, ref_grads, rtol=RTOL_OFFSET, err_msg="grads")
    xhat = (np.asarray(y, np.float64) - beta) / gamma
    np.testing.assert_allclose(xhat.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(xhat.std(0), 1, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_nchw_axis1_equals_nhwc_transposed(impl, dtype):
    x, gamma, beta, dy = make_inputs((4, 5, 3, 2), 1, seed=70)
    to_nhwc = functools.partial(np.transpose, axes=(0, 2, 3, 1))
    with x64(dtype):
        y_c, (dx_c, dg_c, db_c) = value_and_vjp(
            IMPLS[impl], *as_dtype((x, gamma, beta, dy), dtype), axis=1
        )
        y_l, (dx_l, dg_l, db_l) = value_and_vjp(
            IMPLS[impl], *as_dtype((to_nhwc(x), gamma, beta, to_nhwc(dy)), dtype)
        )
    rtol = RTOL64 if dtype == np.float64 else RTOL32
    assert_trees_all_close(
        (to_nhwc(np.asarray(y_c)), to_nhwc(np.asarray(dx_c)), dg_c, db_c),
        (y_l, dx_l, dg_l, db_l),
        rtol=rtol,
    )


def test_nhwc_batch_of_one_normalizes_over_space():
    """N=1 with H*W>1 is a valid training batch: statistics over H and W."""
    x, gamma, beta, dy = make_inputs((1, 3, 4, 2), -1, seed=80)
    ref = np_batch_norm(x, gamma, beta, dy)
    with x64(np.float64):
        out = value_and_vjp(jaxbn.batch_norm, *as_dtype((x, gamma, beta, dy), np.float64))
    assert_trees_all_close(out, ref, rtol=RTOL64)
