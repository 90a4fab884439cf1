"""Masked batch norm: masked-out entries neither contribute to statistics nor get gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL32, RTOL64, as_dtype, assert_trees_all_close, data, params_np, rounded, x64
from test_batch_norm import np_batch_norm

import jaxbn
from jaxbn.reference import batch_norm_autodiff, batch_norm_staged

pytestmark = pytest.mark.filterwarnings("error")

IMPLS = {"custom": jaxbn.batch_norm, "autodiff": batch_norm_autodiff, "staged": batch_norm_staged}
DTYPES = [np.float32, np.float64]


def rtol(dtype):
    return RTOL64 if dtype == np.float64 else RTOL32


def value_and_vjp(impl, x, gamma, beta, dy, mask, **kw):
    @jax.jit
    def run(x, gamma, beta, dy, mask):
        y, vjp = jax.vjp(
            lambda x, g, b: impl(jaxbn.BatchNormParams(g, b), x, mask=mask, **kw), x, gamma, beta
        )
        return y, vjp(dy)

    return run(x, gamma, beta, dy, mask)


# (x shape, feature axis, mask shape, which entries of the mask are kept (given a seed))
MASK_CASES = [
    ((10, 3), -1, (10,)),
    ((10, 3), -1, (10, 1)),
    ((5, 2, 3, 4), -1, (5, 1, 1)),
    ((5, 2, 3, 4), -1, (5, 2, 3)),
    ((5, 2, 3, 4), -1, (5, 2, 3, 1)),
    ((5, 2, 3, 4), -1, (3,)),  # broadcast over N and H: masks W columns
    ((5, 4, 2, 3), 1, (5, 2, 3)),  # NCHW, mask over (N, H, W)
    ((5, 4, 2, 3), 1, (5, 1, 1)),
]
MASK_IDS = ["ND-N", "ND-N1", "NHWC-N11", "NHWC-NHW", "NHWC-NHW1", "NHWC-W", "NCHW-NHW",
            "NCHW-N11"]


def make_mask(shape, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.6
    mask.flat[0] = True  # at least two kept entries
    mask.flat[-1] = True
    if mask.size > 2:
        mask.flat[1] = False  # and at least one masked
    return mask


def _inputs(shape, axis, seed):
    fshape = (shape[axis],)
    g, b = params_np(seed + 1, fshape)
    return data(seed, shape, loc=1.0, scale=2.0), g, b, data(seed + 2, shape)


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


KEPT_CASES = (
    [pytest.param(*c, "custom", d, id=f"{i}-custom-{np.dtype(d).name}")
     for c, i in zip(MASK_CASES, MASK_IDS) for d in DTYPES]
    + [pytest.param(*MASK_CASES[j], impl, np.float64, id=f"{MASK_IDS[j]}-{impl}-float64")
       for j in (0, 3, 6) for impl in ("autodiff", "staged")]
)


@pytest.mark.parametrize(("shape", "axis", "mask_shape", "impl", "dtype"), KEPT_CASES)
def test_masked_equals_batch_norm_of_kept_entries(shape, axis, mask_shape, impl, dtype):
    x, g, b, dy = _inputs(shape, axis, seed=0)
    mask = make_mask(mask_shape, seed=1)
    full = _full_mask(mask, shape, axis)
    x[~full] = 1e3  # garbage in masked entries must not leak into anything
    kept_x, kept_dy = _kept_rows(x, full, axis), _kept_rows(dy, full, axis)
    with x64(dtype):
        y, (dx, dg, db) = value_and_vjp(IMPLS[impl], *as_dtype((x, g, b, dy), dtype),
                                        jnp.asarray(mask), axis=axis)
        y_k, (dx_k, dg_k, db_k) = value_and_vjp(IMPLS[impl],
                                                *as_dtype((kept_x, g, b, kept_dy), dtype), None)
    tol = rtol(dtype)
    assert_trees_all_close(_kept_rows(y, full, axis), y_k, rtol=tol, err_msg="kept y")
    assert_trees_all_close(_kept_rows(dx, full, axis), dx_k, rtol=tol, err_msg="kept dx")
    assert_trees_all_close((dg, db), (dg_k, db_k), rtol=tol, err_msg="dgamma, dbeta")
    np.testing.assert_array_equal(np.asarray(y)[~full], 0)
    np.testing.assert_array_equal(np.asarray(dx)[~full], 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis", "mask_shape"), MASK_CASES, ids=MASK_IDS)
def test_masked_custom_autodiff_staged_numpy_agree(shape, axis, mask_shape, dtype):
    x, g, b, dy = _inputs(shape, axis, seed=10)
    mask = make_mask(mask_shape, seed=11)
    np_mask = mask if mask.ndim < len(shape) else np.squeeze(mask, axis % len(shape))
    ref = np_batch_norm(*rounded((x, g, b, dy), dtype), axis=axis, mask=np_mask)
    @jax.jit
    def all_three(x, g, b, dy, mask):
        out = {}
        for name, impl in IMPLS.items():
            y, vjp = jax.vjp(
                lambda x, g, b: impl(jaxbn.BatchNormParams(g, b), x, axis=axis, mask=mask),
                x, g, b)
            out[name] = (y, vjp(dy))
        return out

    with x64(dtype):
        out = all_three(*as_dtype((x, g, b, dy), dtype), jnp.asarray(mask))
    for k, v in out.items():
        assert_trees_all_close(v, ref, rtol=rtol(dtype), err_msg=f"{k} vs NumPy")
    assert_trees_all_close(out["custom"], out["autodiff"], rtol=rtol(dtype))
    assert_trees_all_close(out["staged"], out["autodiff"], rtol=rtol(dtype))


def test_all_true_mask_equals_no_mask():
    x, g, b, dy = _inputs((6, 2, 2, 3), -1, seed=20)
    with x64(np.float64):
        args = as_dtype((x, g, b, dy), np.float64)
        with_mask = value_and_vjp(jaxbn.batch_norm, *args, jnp.ones((6, 2, 2), bool))
        without = value_and_vjp(jaxbn.batch_norm, *args, None)
    assert_trees_all_close(with_mask, without, rtol=RTOL64)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(("shape", "mask_shape"), [((5, 3), (5,)), ((3, 2, 2, 4), (3, 2, 2))])
def test_all_masked_gives_zeros_without_nan(shape, mask_shape, impl):
    x, g, b, dy = _inputs(shape, -1, seed=30)
    y, (dx, dg, db) = value_and_vjp(IMPLS[impl], *as_dtype((x, g, b, dy), jnp.float32),
                                    jnp.zeros(mask_shape, bool))
    for a in (y, dx, dg, db):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(np.asarray(a), 0)
    # Second order stays finite as well.
    h = jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(IMPLS[impl](
        jaxbn.init(shape[-1]), x, mask=jnp.zeros(mask_shape, bool)))))(x) ** 2)))(
        jnp.asarray(x, jnp.float32))
    assert np.all(np.isfinite(np.asarray(h)))


def _padded_inputs(garbage, seed):
    """An (8, 3) batch whose rows 2 and 5 are padding: ``((clean, dirty), g, b, dy, mask)``,
    with the padding 0 in ``clean`` and ``garbage`` in ``dirty``."""
    x, g, b, dy = _inputs((8, 3), -1, seed=seed)
    mask = np.ones(8, bool)
    mask[[2, 5]] = False
    clean, dirty = x.copy(), x.copy()
    clean[~mask] = 0.0
    dirty[~mask] = garbage
    return (clean, dirty), g, b, dy, mask


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 1e30])
def test_non_finite_garbage_in_masked_rows_does_not_leak(impl, garbage):
    """Padding rows may hold anything: their values must not reach y or any gradient."""
    (clean, dirty), g, b, dy, mask = _padded_inputs(garbage, seed=40)
    args = lambda x: as_dtype((x, g, b, dy), jnp.float32)  # noqa: E731
    got = value_and_vjp(IMPLS[impl], *args(dirty), jnp.asarray(mask))
    want = value_and_vjp(IMPLS[impl], *args(clean), jnp.asarray(mask))
    assert_trees_all_close(got, want, rtol=RTOL32)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_non_finite_garbage_in_masked_rows_does_not_leak_second_order(impl, garbage):
    """Grad-of-grad (e.g. a gradient penalty) on a padded batch: padding stays out too."""
    (clean, dirty), g, b, _, mask = _padded_inputs(garbage, seed=41)

    def penalty(x, g, b):
        inner = lambda x, g: jnp.sum(jnp.sin(IMPLS[impl](  # noqa: E731
            jaxbn.BatchNormParams(g, b), x, mask=jnp.asarray(mask))))
        dx, dg = jax.grad(inner, argnums=(0, 1))(x, g)
        return jnp.sum(dx**2) + jnp.sum(dg**2)

    with x64(np.float64):
        second = jax.jit(jax.grad(penalty, argnums=(0, 1, 2)))
        args = lambda x: as_dtype((x, g, b), jnp.float64)  # noqa: E731
        got, want = second(*args(dirty)), second(*args(clean))
        assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(got))
        assert_trees_all_close(got, want, rtol=RTOL64)
