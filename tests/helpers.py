"""Shared test helpers: tolerances, tree comparison, float64 scoping, data."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

# Tolerances, relative to the largest magnitude of the reference array
# (atol = rtol * max|ref|), so cancellations near zero do not blow them up.
RTOL64 = 1e-10  # float64: every implementation of the same math
RTOL32 = 5e-6  # float32: ~40 ulps relative to the largest entry (measured <= 3e-7)


def assert_trees_all_close(actual, desired, rtol, atol=None, err_msg=""):
    """``np.testing.assert_allclose`` over matching pytrees.

    With ``atol=None`` the absolute tolerance is ``rtol * max|desired|`` per
    leaf (a norm-wise relative tolerance).
    """
    a_leaves, a_def = jax.tree.flatten(actual)
    d_leaves, d_def = jax.tree.flatten(desired)
    assert a_def == d_def, f"tree structures differ: {a_def} vs {d_def}"
    for i, (a, d) in enumerate(zip(a_leaves, d_leaves)):
        a = np.asarray(a, np.float64)
        d = np.asarray(d, np.float64)
        assert a.shape == d.shape, f"leaf {i}: shape {a.shape} vs {d.shape}"
        tol = rtol * max(float(np.max(np.abs(d), initial=0.0)), 1e-30) if atol is None else atol
        np.testing.assert_allclose(a, d, rtol=rtol, atol=tol, err_msg=f"{err_msg} leaf {i}")


def max_rel_err(actual, desired) -> float:
    """max|a - d| / max|d| over all leaves (the measure the tolerances bound)."""
    worst = 0.0
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
        a = np.asarray(a, np.float64)
        d = np.asarray(d, np.float64)
        scale = max(float(np.max(np.abs(d), initial=0.0)), 1e-300)
        worst = max(worst, float(np.max(np.abs(a - d), initial=0.0)) / scale)
    return worst


def x64(dtype) -> contextlib.AbstractContextManager:
    """``jax_enable_x64`` on for float64 tests, off otherwise, scoped to a ``with``."""
    return jax.enable_x64(np.dtype(dtype) == np.float64)


def rtol_for(dtype) -> float:
    return RTOL64 if np.dtype(dtype) == np.float64 else RTOL32


def data(seed, shape, *, loc=0.0, scale=1.0):
    """float64 NumPy normal data (the inputs every implementation gets, rounded to its dtype)."""
    return np.random.default_rng(seed).normal(loc, scale, shape)


def params_np(seed, shape):
    """float64 NumPy gamma (away from 0) and beta."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, shape), rng.normal(0.0, 1.0, shape)


def as_dtype(tree, dtype):
    """NumPy arrays -> jnp arrays of ``dtype`` (call inside ``x64(dtype)``)."""
    return jax.tree.map(lambda v: jnp.asarray(v, dtype), tree)


def rounded(tree, dtype):
    """NumPy float64 copies of ``tree`` rounded through ``dtype`` (the oracle's inputs)."""
    return jax.tree.map(lambda v: np.asarray(v).astype(dtype).astype(np.float64), tree)
