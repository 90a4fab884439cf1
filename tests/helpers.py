"""Shared test helpers: the implementations under test, dtypes, tolerances, the cases
shared with ``report_errors.py``, input makers, a jitted value-and-VJP, tree
comparison and float64 scoping. The independent references live in ``oracles.py``."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from oracles import feature_axes

import jaxbn
from jaxbn.reference import batch_norm_autodiff, batch_norm_staged

# ------------------------------------------------------ what is under test

# The three ways to the same batch-norm gradient; the keys are the test ids.
IMPLS = {"custom": jaxbn.batch_norm, "autodiff": batch_norm_autodiff, "staged": batch_norm_staged}
# The two with a hand-written backward pass; autodiff's is JAX's own, their reference.
HAND_WRITTEN = ["custom", "staged"]

DTYPES = [np.float32, np.float64]
HALF_DTYPES = [jnp.bfloat16, jnp.float16]

# ------------------------------------------------------------- tolerances

# Relative to the largest magnitude of the reference array (atol = rtol * max|ref|),
# so cancellations near zero do not blow them up.
RTOL64 = 1e-10  # float64: every implementation of the same math
RTOL32 = 5e-6  # float32: ~40 ulps relative to the largest entry (measured <= 3e-7)

# Half precision: inputs are bf16/f16 but statistics are float32, so the output
# differs from the float32 computation on the same values only by the final
# rounding to the 16-bit dtype (relative to the largest entry).
RTOL_HALF = {jnp.bfloat16: 2**-7, jnp.float16: 2**-10}

# Large offset: float32 data at mean 1e4, std 1. The float32 inputs themselves
# are exact; the two-pass centered variance keeps the error at a few float32
# ulps of 1e4 relative to the unit-scale output (measured ~8e-6).
RTOL_OFFSET = 5e-5


def rtol_for(dtype) -> float:
    return RTOL64 if np.dtype(dtype) == np.float64 else RTOL32


# ------------------------------------------------------------------ cases

# Batch norm (x shape, feature axis): (N, D), NHWC, NCHW with axis=1, tuple axes,
# a leading feature axis.
BN_CASES = {
    "ND": ((8, 5), -1),
    "NHWC": ((4, 3, 3, 5), -1),
    "NCHW-axis1": ((4, 5, 3, 3), 1),
    "tuple-axis": ((6, 3, 4), (1, 2)),
    "tuple-neg-axis": ((3, 4, 2, 5), (1, -1)),
    "axis0": ((5, 7), 0),
}

# Layer norm (x shape, feature axes).
LAYER_CASES = {
    "ND": ((6, 5), -1),
    "NTD": ((3, 4, 5), -1),
    "tuple-last-two": ((3, 4, 5), (-2, -1)),
    "tuple-noncontiguous": ((2, 3, 4, 5), (1, 3)),
}

# Group norm (x shape, num_groups): one group, several, one per channel; rank 2, 3, 4.
# (N, C) groups hold >= 4 channels: with 2 values per group xhat = +-1 exactly up to eps
# and the true dx is pure cancellation (~eps/var), so its relative error is meaningless.
GROUP_CASES = {
    "NC-G3": ((4, 12), 3),
    "NHWC-G1": ((2, 3, 3, 6), 1),
    "NHWC-G2": ((2, 3, 3, 6), 2),
    "NHWC-G6=C": ((2, 3, 3, 6), 6),
    "NLC-G2": ((2, 5, 4), 2),
}

# Masked batch norm (x shape, feature axis, mask shape).
MASK_CASES = {
    "ND-N": ((10, 3), -1, (10,)),
    "ND-N1": ((10, 3), -1, (10, 1)),
    "NHWC-N11": ((5, 2, 3, 4), -1, (5, 1, 1)),
    "NHWC-NHW": ((5, 2, 3, 4), -1, (5, 2, 3)),
    "NHWC-NHW1": ((5, 2, 3, 4), -1, (5, 2, 3, 1)),
    "NHWC-W": ((5, 2, 3, 4), -1, (3,)),  # broadcast over N and H: masks W columns
    "NCHW-NHW": ((5, 4, 2, 3), 1, (5, 2, 3)),  # NCHW, mask over (N, H, W)
    "NCHW-N11": ((5, 4, 2, 3), 1, (5, 1, 1)),
}

# Multi-device masks: kept rows per device (4 rows each), unequal, one device with none.
KEPT_PER_DEVICE = [0, 4, 1, 3, 2, 4, 1, 0]




def dtype_cases(cases, float32_ids):
    """``pytest.param``s: every case in float64, whose 1e-10 tolerance catches any slip in
    the axis/shape logic, and the ``float32_ids`` cases (one per layout) in float32 too,
    where the same logic only meets a looser, rounding-sized tolerance."""
    params = [pytest.param(*case, np.float64, id=f"{key}-float64") for key, case in cases.items()]
    return params + [pytest.param(*cases[key], np.float32, id=f"{key}-float32")
                     for key in float32_ids]


# ----------------------------------------------------------------- inputs


def data(seed, shape, *, loc=0.0, scale=1.0):
    """float64 NumPy normal data (the inputs every implementation gets, rounded to its dtype)."""
    return np.random.default_rng(seed).normal(loc, scale, shape)


def params_np(seed, shape):
    """float64 NumPy gamma (away from 0) and beta."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, shape), rng.normal(0.0, 1.0, shape)


def make_inputs(shape, axis=-1, seed=0, *, loc=0.7, scale=2.0):
    """float64 NumPy ``(x, gamma, beta, dy)``: x ~ N(loc, scale), a random cotangent dy
    (so every term of a backward pass matters), gamma/beta of the feature shape of ``axis``."""
    fshape = tuple(shape[i] for i in feature_axes(axis, len(shape)))
    gamma, beta = params_np(seed + 1, fshape)
    return data(seed, shape, loc=loc, scale=scale), gamma, beta, data(seed + 2, shape)


def make_mask(shape, seed):
    """A random boolean mask with at least two kept entries and (if it can) one masked."""
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask.flat[0] = True
    mask.flat[-1] = True
    if mask.size > 2:
        mask.flat[1] = False
    return mask


def as_dtype(tree, dtype):
    """NumPy arrays -> jnp arrays of ``dtype`` (call inside ``x64(dtype)``)."""
    return jax.tree.map(lambda v: jnp.asarray(v, dtype), tree)


def rounded(tree, dtype):
    """NumPy float64 copies of ``tree`` rounded through ``dtype`` (the oracle's inputs)."""
    return jax.tree.map(lambda v: np.asarray(v).astype(dtype).astype(np.float64), tree)


def x64(dtype) -> contextlib.AbstractContextManager:
    """``jax_enable_x64`` on for float64 tests, off otherwise, scoped to a ``with``."""
    return jax.enable_x64(np.dtype(dtype) == np.float64)


# -------------------------------------------------------------- JAX side


def norm_vjp(norm, x, gamma, beta, dy, **kw):
    """``(y, (dx, dgamma, dbeta))`` of ``y = norm(BatchNormParams(gamma, beta), x, **kw)``
    for the cotangent ``dy`` (call it inside ``jax.jit``)."""
    y, vjp = jax.vjp(lambda x, g, b: norm(jaxbn.BatchNormParams(g, b), x, **kw), x, gamma, beta)
    return y, vjp(dy)


def value_and_vjp_each(norms, x, gamma, beta, dy, *, mask=None, **static):
    """``{name: norm_vjp(norm, ...)}`` for a dict of norms, in one jitted program (one
    compile for all, reused by later calls with the same norms, keywords, shapes and
    dtypes). ``mask`` (when given) is a traced argument, as in a training step; the
    other keywords (axis, eps, num_groups) are static."""
    traced = {} if mask is None else {"mask": mask}
    run = _jitted_vjp(tuple(norms.items()), tuple(sorted(static.items())))
    return run(x, gamma, beta, dy, traced)


@functools.cache
def _jitted_vjp(norms, static):
    def run(x, gamma, beta, dy, traced):
        return {name: norm_vjp(norm, x, gamma, beta, dy, **traced, **dict(static))
                for name, norm in norms}

    return jax.jit(run)


def value_and_vjp(norm, x, gamma, beta, dy, *, mask=None, **static):
    """:func:`norm_vjp` of one norm, jitted as in :func:`value_and_vjp_each`."""
    return value_and_vjp_each({"norm": norm}, x, gamma, beta, dy, mask=mask, **static)["norm"]


def check_grads_rev_order2(f, args, **tolerances):
    """``check_grads(f, args, order=2, modes=("rev",), **tolerances)``, step by step as
    jax.test_util does it, but with the second-order function jitted: one compile instead
    of one per evaluation."""
    check_grads(f, args, order=1, modes=("rev",), **tolerances)

    def f_vjp(*args):  # jax.test_util's: the VJP with the primal output as cotangent
        y, vjp = jax.vjp(f, *args)
        return vjp(y)

    check_grads(jax.jit(f_vjp), args, order=1, modes=("rev",), **tolerances)


# ------------------------------------------------------------- comparing


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


def assert_leaves_close_by_dtype(actual, desired, *, half: bool, err_msg=""):
    """:func:`assert_trees_all_close` leaf by leaf, each with its dtype's tolerance:
    ``2**-6`` for every leaf when 16-bit floats took part in the computation (``half``),
    else :data:`RTOL64` for float64 leaves and ``1e-5`` for float32 ones."""
    a_leaves, a_def = jax.tree.flatten(actual)
    d_leaves, d_def = jax.tree.flatten(desired)
    assert a_def == d_def, f"tree structures differ: {a_def} vs {d_def}"
    for i, (a, d) in enumerate(zip(a_leaves, d_leaves)):
        rtol = 2**-6 if half else RTOL64 if jnp.asarray(d).dtype == jnp.float64 else 1e-5
        assert_trees_all_close(a, d, rtol, err_msg=f"{err_msg} leaf {i}")
