"""batch_norm_train's running statistics and batch_norm_eval."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPES, RTOL32, as_dtype, assert_trees_all_close, data, params_np, rtol_for, x64

import jaxbn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((8, 3), -1), ((4, 2, 3, 5), -1), ((4, 5, 2, 3), 1)],
                         ids=["ND", "NHWC", "NCHW"])
def test_train_y_identical_to_batch_norm(shape, axis, dtype):
    c = shape[axis]
    x = data(0, shape, loc=2.0, scale=3.0)
    g, b = params_np(1, (c,))
    with x64(dtype):
        x, g, b = as_dtype((x, g, b), dtype)
        p = jaxbn.BatchNormParams(g, b)
        # Gradients through y are the batch_norm ones too.
        ct = jnp.asarray(data(2, shape), dtype)

        @jax.jit
        def outputs_and_grads(p, x):
            def train_y(p, x):
                return jaxbn.batch_norm_train(p, jaxbn.init_stats(c, dtype), x, axis=axis)[0]

            def bn_y(p, x):
                return jaxbn.batch_norm(p, x, axis=axis)

            def grads(f):
                return jax.grad(lambda p, x: jnp.sum(f(p, x) * ct), (0, 1))(p, x)

            return train_y(p, x), bn_y(p, x), grads(train_y), grads(bn_y)

        y_train, y, g_train, g_bn = outputs_and_grads(p, x)
    np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y))
    assert_trees_all_close(g_train, g_bn, rtol=rtol_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0, 1.0])
@pytest.mark.parametrize(("shape", "axis"), [((8, 3), -1), ((4, 3, 2, 2), 1)], ids=["ND", "NCHW"])
def test_running_stats_recurrence_over_steps(shape, axis, momentum, dtype):
    """running = momentum * running + (1 - momentum) * batch, biased batch variance."""
    c = shape[axis]
    reduce_axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    g, b = params_np(3, (c,))
    batches = [data(10 + t, shape, loc=t - 1.0, scale=1.0 + t) for t in range(4)]
    mean_ref, var_ref = np.zeros(c), np.ones(c)
    with x64(dtype):
        p = jaxbn.BatchNormParams(*as_dtype((g, b), dtype))
        stats = jaxbn.init_stats(c, dtype)
        step = jax.jit(lambda p, s, x: jaxbn.batch_norm_train(p, s, x, momentum=momentum,
                                                              axis=axis))
        for xb in batches:
            _, stats = step(p, stats, jnp.asarray(xb, dtype))
            assert isinstance(stats, jaxbn.RunningStats)
            assert stats.mean.shape == (c,) and stats.mean.dtype == dtype
            assert stats.var.dtype == dtype
            xr = xb.astype(dtype).astype(np.float64)
            mean_ref = momentum * mean_ref + (1 - momentum) * xr.mean(reduce_axes)
            var_ref = momentum * var_ref + (1 - momentum) * xr.var(reduce_axes)  # biased (ddof=0)
            assert_trees_all_close(tuple(stats), (mean_ref, var_ref), rtol=rtol_for(dtype))
    if momentum < 1:
        # Distinguishes biased from unbiased (ddof=1) variance.
        n = np.prod([shape[i] for i in reduce_axes])
        assert not np.allclose(np.asarray(stats.var), var_ref * n / (n - 1), rtol=1e-3)


def test_momentum_one_keeps_stats_and_zero_replaces_them():
    x = jnp.asarray(data(0, (6, 2), loc=5.0), jnp.float32)
    s0 = jaxbn.RunningStats(jnp.asarray([1.0, -1.0]), jnp.asarray([2.0, 3.0]))
    p = jaxbn.init(2)
    _, s1 = jaxbn.batch_norm_train(p, s0, x, momentum=1.0)
    assert_trees_all_close(tuple(s1), tuple(s0), rtol=0, atol=0)
    _, s2 = jaxbn.batch_norm_train(p, s0, x, momentum=0.0)
    assert_trees_all_close(tuple(s2), (x.mean(0), x.var(0)), rtol=RTOL32)


def test_no_gradient_flows_into_new_stats():
    x = jnp.asarray(data(0, (6, 3), loc=1.0), jnp.float32)
    p = jaxbn.BatchNormParams(*as_dtype(params_np(1, (3,)), jnp.float32))
    s = jaxbn.RunningStats(jnp.asarray([0.3, 0.2, 0.1]), jnp.asarray([1.5, 1.0, 0.5]))

    def through_stats(p, s, x):
        _, new = jaxbn.batch_norm_train(p, s, x, momentum=0.7)
        return jnp.sum(new.mean * 3.0) + jnp.sum(new.var**2)

    gp, gs, gx = jax.jit(jax.grad(through_stats, (0, 1, 2)))(p, s, x)
    np.testing.assert_array_equal(np.asarray(gx), 0)
    np.testing.assert_array_equal(np.asarray(gp.gamma), 0)
    np.testing.assert_array_equal(np.asarray(gp.beta), 0)
    # The old running stats themselves are differentiable inputs of the update
    # (d new.mean / d s.mean = momentum); only the batch statistics are stopped.
    np.testing.assert_allclose(np.asarray(gs.mean), 3.0 * 0.7, rtol=1e-6)
    # Sanity: the same loss without stop_gradient would have a nonzero dx.
    naive = jax.grad(lambda x: jnp.sum(0.3 * x.mean(0) * 3.0))(x)
    assert np.any(np.asarray(naive) != 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((5, 3), -1), ((2, 3, 4, 4), 1), ((3, 4, 2), (1, 2))],
                         ids=["ND", "NCHW", "tuple"])
def test_eval_matches_numpy_formula(shape, axis, dtype):
    axes = (axis,) if isinstance(axis, int) else axis
    fshape = tuple(shape[a] for a in axes)
    bshape = tuple(shape[i] if i in [a % len(shape) for a in axes] else 1
                   for i in range(len(shape)))
    x = data(0, shape, loc=1.0, scale=2.0)
    g, b = params_np(1, fshape)
    rng = np.random.default_rng(2)
    mean, var = rng.normal(size=fshape), rng.uniform(0.5, 3.0, fshape)
    eps = 1e-3
    with x64(dtype):
        x_, g_, b_, m_, v_ = as_dtype((x, g, b, mean, var), dtype)
        y = jax.jit(lambda p, s, x: jaxbn.batch_norm_eval(p, s, x, axis=axis, eps=eps))(
            jaxbn.BatchNormParams(g_, b_), jaxbn.RunningStats(m_, v_), x_)
        assert y.dtype == dtype and y.shape == shape
    r = lambda a: a.astype(dtype).astype(np.float64).reshape(bshape)  # noqa: E731
    want = r(g) * (x.astype(dtype) - r(mean)) / np.sqrt(r(var) + eps) + r(b)
    assert_trees_all_close(y, want, rtol=rtol_for(dtype))


def test_eval_of_a_batch_of_one_is_allowed():
    p, s = jaxbn.init(3), jaxbn.init_stats(3)
    x = jnp.asarray([[1.0, 2.0, 3.0]])
    y = jaxbn.batch_norm_eval(p, s, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_train_excludes_masked_rows_from_stats(dtype):
    x = data(0, (10, 3), loc=1.0, scale=2.0)
    x[[1, 4, 7]] = 1e3  # garbage rows (e.g. padding) that must not leak into the stats
    mask = np.ones(10, bool)
    mask[[1, 4, 7]] = False
    g, b = params_np(1, (3,))
    s0 = (np.array([0.5, -0.5, 0.0]), np.array([1.0, 2.0, 0.5]))
    with x64(dtype):
        p = jaxbn.BatchNormParams(*as_dtype((g, b), dtype))
        s = jaxbn.RunningStats(*as_dtype(s0, dtype))
        f = jax.jit(lambda p, s, x, m: jaxbn.batch_norm_train(p, s, x, momentum=0.8, mask=m))
        y, new = f(p, s, jnp.asarray(x, dtype), jnp.asarray(mask))
        y_kept, new_kept = f(p, s, jnp.asarray(x[mask], dtype), None)
    kept = x[mask].astype(dtype).astype(np.float64)
    want = (0.8 * s0[0] + 0.2 * kept.mean(0), 0.8 * s0[1] + 0.2 * kept.var(0))
    assert_trees_all_close(tuple(new), want, rtol=rtol_for(dtype))
    assert_trees_all_close(tuple(new), tuple(new_kept), rtol=rtol_for(dtype))
    assert_trees_all_close(np.asarray(y)[mask], y_kept, rtol=rtol_for(dtype))
    np.testing.assert_array_equal(np.asarray(y)[~mask], 0)


@pytest.mark.parametrize("mask_shape", [(6,), (6, 1)])
def test_all_masked_batch_leaves_stats_unchanged(mask_shape):
    x = jnp.asarray(data(0, (6, 2), loc=3.0), jnp.float32)
    s = jaxbn.RunningStats(jnp.asarray([0.25, -1.0]), jnp.asarray([0.5, 4.0]))
    mask = jnp.zeros(mask_shape, bool)
    f = jax.jit(lambda s, x, m: jaxbn.batch_norm_train(jaxbn.init(2), s, x, mask=m))
    y, new = f(s, x, mask)
    assert_trees_all_close(tuple(new), tuple(s), rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(y), 0)
    # And a partly kept mask does change them (the all-masked check is not vacuous).
    _, moved = f(s, x, mask.at[0].set(True).at[3].set(True) if mask.ndim == 1
                 else mask.at[0, 0].set(True).at[3, 0].set(True))
    assert not np.allclose(np.asarray(moved.mean), np.asarray(s.mean))
