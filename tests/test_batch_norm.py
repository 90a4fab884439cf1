"""Batch norm numerics: the closed-form custom VJP against independent oracles.

Oracles:
* ``jax.grad``/``jax.vjp`` of the naive forward (``reference.batch_norm_autodiff``),
* a float64 NumPy transcription of the CS231n staged forward and
  ``batchnorm_backward`` (``oracles.py``; it imports nothing from jaxbn),
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
from helpers import (
    BN_CASES,
    DTYPES,
    HALF_DTYPES,
    IMPLS,
    RTOL64,
    RTOL_HALF,
    RTOL_OFFSET,
    as_dtype,
    assert_trees_all_close,
    check_grads_rev_order2,
    data,
    dtype_cases,
    make_inputs,
    rounded,
    rtol_for,
    value_and_vjp,
    value_and_vjp_each,
    x64,
)
from jax.test_util import check_grads
from oracles import np_batch_norm

import jaxbn

# Pairs of implementations whose values and VJPs must agree.
PAIRS = [("custom", "autodiff"), ("staged", "autodiff"), ("custom", "staged")]


@pytest.mark.parametrize(("shape", "axis", "dtype"),
                         dtype_cases(BN_CASES, float32_ids=["ND", "NHWC", "NCHW-axis1"]))
def test_implementations_match_numpy_oracle_and_each_other(shape, axis, dtype):
    """The value and VJP of every implementation equal the NumPy CS231n oracle's, and
    the three agree with each other (custom closed form, jax autodiff, staged)."""
    inputs = make_inputs(shape, axis)
    ref = np_batch_norm(*rounded(inputs, dtype), axis=axis)

    with x64(dtype):
        out = value_and_vjp_each(IMPLS, *as_dtype(inputs, dtype), axis=axis)
    rtol = rtol_for(dtype)
    for name, (y, grads) in out.items():
        assert y.dtype == dtype and all(g.dtype == dtype for g in grads), name
        assert_trees_all_close(y, ref[0], rtol=rtol, err_msg=f"{name}: y vs NumPy")
        assert_trees_all_close(grads, ref[1], rtol=rtol,
                               err_msg=f"{name}: (dx, dgamma, dbeta) vs NumPy")
    for a, b in PAIRS:
        assert_trees_all_close(out[a], out[b], rtol=rtol, err_msg=f"{a} vs {b}")


# The hand-written backward passes (autodiff is JAX's own derivative): custom in both
# layouts, staged in one (its second order also meets autodiff's in test_transforms).
FD_CASES = [("custom", (5, 3), -1), ("custom", (3, 2, 2, 2), 1), ("staged", (5, 3), -1)]


@pytest.mark.parametrize(("impl", "shape", "axis"), FD_CASES,
                         ids=["custom-ND", "custom-NCHW-axis1", "staged-ND"])
def test_check_grads_finite_differences_order2(impl, shape, axis):
    """Reverse mode, first and second order, against central finite differences (float64)."""
    x, gamma, beta, _ = make_inputs(shape, axis, seed=20)
    with x64(np.float64):
        x, gamma, beta = as_dtype((x, gamma, beta), np.float64)
        f = jax.jit(lambda x, g, b: IMPLS[impl](jaxbn.BatchNormParams(g, b), x, axis=axis))
        check_grads_rev_order2(f, (x, gamma, beta), eps=1e-4, atol=1e-6, rtol=1e-6)


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


@pytest.mark.parametrize("dtype", DTYPES)
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


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_keeps_dtype_and_matches_float32(dtype):
    x, gamma, beta, dy = make_inputs((16, 3, 3, 4), -1, seed=50)
    # An offset of 50 (ulp 0.25 in bfloat16): statistics accumulated in the 16-bit dtype
    # would be off by several times the tolerance; float32 statistics are not.
    half = as_dtype((x + 50.0, gamma, beta, dy), dtype)
    out = value_and_vjp_each(IMPLS, *half)
    # The float32 computation on the very same (exactly representable) values.
    out32 = value_and_vjp_each(IMPLS, *[a.astype(jnp.float32) for a in half])
    rtol = RTOL_HALF[dtype]
    for name, (y, (dx, dg, db)) in out.items():
        assert all(a.dtype == dtype for a in (y, dx, dg, db)), name
        assert np.all(np.isfinite(np.asarray(y, np.float32))), name
        y32, (dx32, dg32, db32) = out32[name]
        assert_trees_all_close(y, y32, rtol=rtol, err_msg=f"{name}: y")
        assert_trees_all_close(dx, dx32, rtol=rtol, err_msg=f"{name}: dx")
        # dgamma/dbeta are sums of 144 terms, accumulated in float32, rounded once.
        assert_trees_all_close((dg, db), (dg32, db32), rtol=rtol, err_msg=f"{name}: dgamma, dbeta")


def test_large_offset_float32():
    """Mean 1e4, std 1 in float32: normalizes to mean ~0 / std ~1 and matches float64."""
    x, gamma, beta, dy = make_inputs((256, 3), -1, seed=60)
    x32 = (1e4 + (x - x.mean(0)) / x.std(0)).astype(np.float32)
    ref_y, ref_grads = np_batch_norm(*rounded((x32, gamma, beta, dy), np.float32))
    out = value_and_vjp_each(IMPLS, *as_dtype((x32, gamma, beta, dy), np.float32))
    for name, (y, grads) in out.items():
        assert_trees_all_close(y, ref_y, rtol=RTOL_OFFSET, err_msg=f"{name}: y")
        assert_trees_all_close(grads, ref_grads, rtol=RTOL_OFFSET, err_msg=f"{name}: grads")
        xhat = (np.asarray(y, np.float64) - beta) / gamma
        np.testing.assert_allclose(xhat.mean(0), 0, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(xhat.std(0), 1, atol=1e-4, err_msg=name)


def test_nchw_axis1_equals_nhwc_transposed():
    """The layout alone changes nothing (float64, where "equal" means 1e-10)."""
    x, gamma, beta, dy = make_inputs((4, 5, 3, 2), 1, seed=70)
    to_nhwc = functools.partial(np.transpose, axes=(0, 2, 3, 1))
    with x64(np.float64):
        nchw = value_and_vjp_each(IMPLS, *as_dtype((x, gamma, beta, dy), np.float64), axis=1)
        nhwc = value_and_vjp_each(IMPLS, *as_dtype((to_nhwc(x), gamma, beta, to_nhwc(dy)),
                                                   np.float64))
    for name, (y, (dx, dg, db)) in nchw.items():
        assert_trees_all_close((to_nhwc(np.asarray(y)), (to_nhwc(np.asarray(dx)), dg, db)),
                               nhwc[name], rtol=RTOL64, err_msg=name)


def test_nhwc_batch_of_one_normalizes_over_space():
    """N=1 with H*W>1 is a valid training batch: statistics over H and W."""
    x, gamma, beta, dy = make_inputs((1, 3, 4, 2), -1, seed=80)
    ref = np_batch_norm(x, gamma, beta, dy)
    with x64(np.float64):
        out = value_and_vjp(jaxbn.batch_norm, *as_dtype((x, gamma, beta, dy), np.float64))
    assert_trees_all_close(out, ref, rtol=RTOL64)
