"""Masked batch norm: masked-out entries neither contribute to statistics nor get gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    DTYPES,
    IMPLS,
    MASK_CASES,
    RTOL32,
    RTOL64,
    as_dtype,
    assert_trees_all_close,
    dtype_cases,
    make_inputs,
    make_mask,
    norm_vjp,
    rounded,
    rtol_for,
    value_and_vjp,
    value_and_vjp_each,
    x64,
)
from oracles import np_batch_norm

import jaxbn

# Finite garbage in masked-out entries: it must not leak into anything (the non-finite
# kinds are tested below).
GARBAGE = 1e3


def _full_mask(mask, shape, axis):
    """The boolean mask broadcast to x's full shape (True on kept entries)."""
    ndim = len(shape)
    axis = axis % ndim
    m = mask
    if m.ndim == ndim:
        m = np.squeeze(m, axis)
    batch_shape = tuple(n for i, n in enumerate(shape) if i != axis)
    m = np.broadcast_to(m, batch_shape)
    return np.broadcast_to(np.expand_dims(m, axis), shape)


def _kept_rows(a, full_mask, axis):
    """Gathers kept entries as (K, C) rows: the batch of the kept entries alone."""
    a = np.moveaxis(np.asarray(a), axis, -1)
    return a[np.moveaxis(full_mask, axis, -1)[..., 0]]


# One mask case per layout: (N, D), NHWC masked over (N, H, W), NCHW masked over (N, H, W).
LAYOUT_CASES = ["ND-N", "NHWC-NHW", "NCHW-NHW"]


def _oracle_case(shape, axis, mask_shape):
    """Inputs (garbage in the masked-out entries), mask and its full broadcast of a case."""
    x, g, b, dy = make_inputs(shape, axis, seed=10)
    mask = make_mask(mask_shape, seed=11)
    full = _full_mask(mask, shape, axis)
    x[~full] = GARBAGE
    return (x, g, b, dy), mask, full


@functools.cache
def _oracle_outputs(dtype):
    """Every implementation on every mask case of ``dtype`` (as in the parametrization
    below), in one compiled program: ``{case id: {name: (y, grads)}}`` as NumPy arrays."""
    keys = list(MASK_CASES) if dtype == np.float64 else LAYOUT_CASES

    @jax.jit
    def run(inputs):
        return {key: {name: norm_vjp(impl, *inputs[key][0], mask=inputs[key][1],
                                     axis=MASK_CASES[key][1])
                      for name, impl in IMPLS.items()} for key in keys}

    with x64(dtype):
        inputs = {key: (as_dtype(_oracle_case(*MASK_CASES[key])[0], dtype),
                        jnp.asarray(_oracle_case(*MASK_CASES[key])[1])) for key in keys}
        return jax.tree.map(np.asarray, run(inputs))


@pytest.mark.parametrize(("shape", "axis", "mask_shape", "dtype"),
                         dtype_cases(MASK_CASES, float32_ids=LAYOUT_CASES))
def test_masked_implementations_match_numpy_oracle(shape, axis, mask_shape, dtype):
    """Every implementation equals the NumPy CS231n oracle with a keep-mask; garbage in
    the masked-out entries reaches nothing, and their y and dx are exactly 0."""
    (x, g, b, dy), mask, full = _oracle_case(shape, axis, mask_shape)
    np_mask = mask if mask.ndim < len(shape) else np.squeeze(mask, axis % len(shape))
    ref = np_batch_norm(*rounded((x, g, b, dy), dtype), axis=axis, mask=np_mask)
    (key,) = [k for k, case in MASK_CASES.items() if case == (shape, axis, mask_shape)]
    out = _oracle_outputs(dtype)[key]
    for name, (y, grads) in out.items():
        assert y.dtype == dtype and all(g.dtype == dtype for g in grads), name
        assert_trees_all_close((y, grads), ref, rtol=rtol_for(dtype), err_msg=f"{name} vs NumPy")
        np.testing.assert_array_equal(np.asarray(y)[~full], 0, err_msg=f"{name}: masked y")
        np.testing.assert_array_equal(np.asarray(grads[0])[~full], 0, err_msg=f"{name}: masked dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_masked_equals_batch_norm_of_kept_entries(case, dtype):
    """A second oracle for the masked semantics: the unmasked batch norm of the kept entries."""
    shape, axis, mask_shape = MASK_CASES[case]
    x, g, b, dy = make_inputs(shape, axis, seed=0)
    mask = make_mask(mask_shape, seed=1)
    full = _full_mask(mask, shape, axis)
    x[~full] = GARBAGE
    kept_x, kept_dy = _kept_rows(x, full, axis), _kept_rows(dy, full, axis)
    with x64(dtype):
        out = value_and_vjp_each(IMPLS, *as_dtype((x, g, b, dy), dtype),
                                 mask=jnp.asarray(mask), axis=axis)
        kept = value_and_vjp_each(IMPLS, *as_dtype((kept_x, g, b, kept_dy), dtype))
    tol = rtol_for(dtype)
    for name, (y, (dx, dg, db)) in out.items():
        y_k, (dx_k, dg_k, db_k) = kept[name]
        assert_trees_all_close(_kept_rows(y, full, axis), y_k, rtol=tol, err_msg=f"{name}: kept y")
        assert_trees_all_close(_kept_rows(dx, full, axis), dx_k, rtol=tol,
                               err_msg=f"{name}: kept dx")
        assert_trees_all_close((dg, db), (dg_k, db_k), rtol=tol, err_msg=f"{name}: dgamma, dbeta")


def test_all_true_mask_equals_no_mask():
    x, g, b, dy = make_inputs((6, 2, 2, 3), seed=20)
    with x64(np.float64):
        args = as_dtype((x, g, b, dy), np.float64)
        with_mask = value_and_vjp(jaxbn.batch_norm, *args, mask=jnp.ones((6, 2, 2), bool))
        without = value_and_vjp(jaxbn.batch_norm, *args)
    assert_trees_all_close(with_mask, without, rtol=RTOL64)


@jax.jit
def _sin_penalty_grads(x, gamma, beta, mask):
    """For every implementation: the gradient, w.r.t. (x, gamma, beta), of the gradient
    penalty ``|dx|^2 + |dgamma|^2`` of the loss ``sum(sin(y))`` (reverse over reverse)."""

    def penalty(impl, x, gamma, beta):
        def loss(x, g):
            return jnp.sum(jnp.sin(impl(jaxbn.BatchNormParams(g, beta), x, mask=mask)))

        dx, dg = jax.grad(loss, argnums=(0, 1))(x, gamma)
        return jnp.sum(dx**2) + jnp.sum(dg**2)

    return {name: jax.grad(penalty, argnums=(1, 2, 3))(impl, x, gamma, beta)
            for name, impl in IMPLS.items()}


@pytest.mark.parametrize(("shape", "mask_shape"), [((5, 3), (5,)), ((3, 2, 2, 4), (3, 2, 2))],
                         ids=["ND", "NHWC"])
def test_all_masked_gives_zeros_without_nan(shape, mask_shape):
    x, g, b, dy = as_dtype(make_inputs(shape, seed=30), jnp.float32)
    mask = jnp.zeros(mask_shape, bool)
    for name, out in value_and_vjp_each(IMPLS, x, g, b, dy, mask=mask).items():
        for a in jax.tree.leaves(out):
            np.testing.assert_array_equal(np.asarray(a), 0, err_msg=name)
    # Second order stays finite as well.
    for name, grads in _sin_penalty_grads(x, g, b, mask).items():
        assert all(np.all(np.isfinite(np.asarray(a))) for a in grads), name


def _padded_inputs(garbage, seed):
    """An (8, 3) batch whose rows 2 and 5 are padding: ``((clean, dirty), g, b, dy, mask)``,
    with the padding 0 in ``clean`` and ``garbage`` in ``dirty``."""
    x, g, b, dy = make_inputs((8, 3), seed=seed)
    mask = np.ones(8, bool)
    mask[[2, 5]] = False
    clean, dirty = x.copy(), x.copy()
    clean[~mask] = 0.0
    dirty[~mask] = garbage
    return (clean, dirty), g, b, dy, mask


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 1e30])
def test_non_finite_garbage_in_masked_rows_does_not_leak(garbage):
    """Padding rows may hold anything: their values must not reach y or any gradient."""
    (clean, dirty), g, b, dy, mask = _padded_inputs(garbage, seed=40)
    args = lambda x: as_dtype((x, g, b, dy), jnp.float32)  # noqa: E731
    got = value_and_vjp_each(IMPLS, *args(dirty), mask=jnp.asarray(mask))
    want = value_and_vjp_each(IMPLS, *args(clean), mask=jnp.asarray(mask))
    for name in IMPLS:
        assert_trees_all_close(got[name], want[name], rtol=RTOL32, err_msg=name)


@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_non_finite_garbage_in_masked_rows_does_not_leak_second_order(garbage):
    """Grad-of-grad (e.g. a gradient penalty) on a padded batch: padding stays out too."""
    (clean, dirty), g, b, _, mask = _padded_inputs(garbage, seed=41)
    with x64(np.float64):
        args = lambda x: (*as_dtype((x, g, b), jnp.float64), jnp.asarray(mask))  # noqa: E731
        got, want = _sin_penalty_grads(*args(dirty)), _sin_penalty_grads(*args(clean))
    for name in IMPLS:
        assert all(np.all(np.isfinite(np.asarray(a))) for a in got[name]), name
        assert_trees_all_close(got[name], want[name], rtol=RTOL64, err_msg=name)
