"""layer_norm and group_norm (the same closed-form core) against independent references.

References, both in ``oracles.py`` and independent of jaxbn:
* ``jax.vjp`` of the naive forward (``layer_norm_naive``, ``group_norm_naive``),
* the float64 NumPy CS231n staged forward/backward, applied with the layer/group
  statistics axes (``np_layer_norm``, ``np_group_norm``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    GROUP_CASES,
    HALF_DTYPES,
    LAYER_CASES,
    RTOL64,
    RTOL_HALF,
    as_dtype,
    assert_trees_all_close,
    data,
    dtype_cases,
    make_inputs,
    params_np,
    rounded,
    rtol_for,
    value_and_vjp_each,
    x64,
)
from oracles import EPS, group_norm_naive, layer_norm_naive, np_group_norm, np_layer_norm

import jaxbn


def _assert_matches_references(got, naive, ref, dtype, what):
    assert_trees_all_close(got, ref, rtol=rtol_for(dtype), err_msg=f"{what} vs NumPy")
    assert_trees_all_close(got, naive, rtol=rtol_for(dtype), err_msg=f"{what} vs jax.vjp(naive)")
    assert_trees_all_close(naive, ref, rtol=rtol_for(dtype), err_msg="naive vs NumPy")


# ---------------------------------------------------------------- layer norm


@pytest.mark.parametrize(("shape", "axis", "dtype"),
                         dtype_cases(LAYER_CASES, float32_ids=["ND", "tuple-noncontiguous"]))
def test_layer_norm_matches_references(shape, axis, dtype):
    inputs = make_inputs(shape, axis)
    ref = np_layer_norm(*rounded(inputs, dtype), axis=axis)
    norms = {"jaxbn": jaxbn.layer_norm,
             "naive": lambda p, x, axis: layer_norm_naive(p.gamma, p.beta, x, axis)}
    with x64(dtype):
        out = value_and_vjp_each(norms, *as_dtype(inputs, dtype), axis=axis)
    assert out["jaxbn"][0].dtype == dtype
    _assert_matches_references(out["jaxbn"], out["naive"], ref, dtype, "layer_norm")


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


@pytest.mark.parametrize(("shape", "num_groups", "dtype"),
                         dtype_cases(GROUP_CASES, float32_ids=["NC-G3", "NHWC-G2"]))
def test_group_norm_matches_references(shape, num_groups, dtype):
    inputs = make_inputs(shape)
    ref = np_group_norm(*rounded(inputs, dtype), num_groups=num_groups)
    norms = {"jaxbn": jaxbn.group_norm,
             "naive": lambda p, x, num_groups: group_norm_naive(p.gamma, p.beta, x, num_groups)}
    with x64(dtype):
        out = value_and_vjp_each(norms, *as_dtype(inputs, dtype), num_groups=num_groups)
    assert out["jaxbn"][0].dtype == dtype and out["jaxbn"][0].shape == shape
    _assert_matches_references(out["jaxbn"], out["naive"], ref, dtype, "group_norm")


def test_group_norm_special_cases_in_float64():
    """num_groups=1 is layer norm over (H, W, C); num_groups=C is instance norm."""
    x, g, b, dy = make_inputs((2, 3, 2, 4), seed=30)
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
        x, g, b, ct = as_dtype(make_inputs((2, 2, 6), seed=60), np.float64)
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

        got, want = jax.jit(lambda: (second_order(ours), second_order(naive)))()
    assert_trees_all_close(got, want, rtol=10 * RTOL64)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_family_half_precision(dtype):
    x, g, b, _ = make_inputs((4, 2, 2, 6), seed=50)
    xh, gh, bh = as_dtype((x, g, b), dtype)
    p = jaxbn.BatchNormParams(gh, bh)
    p32 = jaxbn.BatchNormParams(gh.astype(jnp.float32), bh.astype(jnp.float32))
    norms = {"group_norm": lambda p, x: jaxbn.group_norm(p, x, 3), "layer_norm": jaxbn.layer_norm}
    # Each norm on the 16-bit values and on the same values in float32.
    out = jax.jit(lambda p, p32, x: {k: (f(p, x), f(p32, x.astype(jnp.float32)))
                                     for k, f in norms.items()})(p, p32, xh)
    for name, (y, y32) in out.items():
        assert y.dtype == dtype, name
        assert_trees_all_close(y, y32, rtol=RTOL_HALF[dtype], err_msg=name)
