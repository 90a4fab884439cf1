"""rms_norm: its closed-form VJP against autodiff of the naive form, PyTorch and finite
differences (float64, 1e-10 relative)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import RTOL32, RTOL64, assert_trees_all_close, check_grads_rev_order2, x64

import jaxbn

# (x shape, axis): features last, a sequence, two feature axes, a leading feature axis.
CASES = {"ND": ((6, 16), -1), "NTD": ((3, 5, 8), -1), "tuple": ((3, 4, 5), (-2, -1)),
         "axis0": ((7, 3), 0)}


def naive_rms_norm(params, x, *, axis=-1, eps=1e-6):
    """RMS norm as written: mean square over ``axis``; JAX autodiff differentiates it."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    feature_shape = tuple(1 if i not in [a % x.ndim for a in axes] else n
                          for i, n in enumerate(x.shape))
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axes, keepdims=True) + eps)
    y = y * params["gamma"].reshape(feature_shape)
    return y if params["beta"] is None else y + params["beta"].reshape(feature_shape)


def _inputs(shape, axis, seed, dtype, *, beta=True):
    rng = np.random.default_rng(seed)
    axes = axis if isinstance(axis, tuple) else (axis,)
    fshape = tuple(shape[a] for a in axes)
    params = {"gamma": jnp.asarray(rng.uniform(0.5, 1.5, fshape), dtype),
              "beta": jnp.asarray(rng.normal(size=fshape), dtype) if beta else None}
    x = jnp.asarray(rng.normal(0.3, 2.0, shape), dtype)
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    return params, x, dy


def _value_and_grads(fn, params, x, dy, axis):
    y, vjp = jax.vjp(lambda p, x: fn(p, x, axis=axis), params, x)
    return y, vjp(dy)


@pytest.mark.parametrize("case, dtype, beta", [
    *[pytest.param(case, np.float64, True, id=f"{case}-float64") for case in CASES],
    pytest.param("ND", np.float64, False, id="ND-float64-scale-only"),
    pytest.param("NTD", np.float32, True, id="NTD-float32"),
    pytest.param("tuple", np.float32, False, id="tuple-float32-scale-only"),
])
def test_matches_autodiff_of_the_naive_form(case, dtype, beta):
    """Every layout in float64 (1e-10 catches any axis slip), two in float32."""
    shape, axis = CASES[case]
    with x64(dtype):
        params, x, dy = _inputs(shape, axis, 0, dtype, beta=beta)

        @jax.jit
        def both(params, x, dy):  # one compiled program for the two
            return [_value_and_grads(fn, params, x, dy, axis)
                    for fn in (jaxbn.rms_norm, naive_rms_norm)]

        got, want = both(params, x, dy)
        assert_trees_all_close(got, want, rtol=RTOL64 if dtype == np.float64 else RTOL32)


@pytest.mark.parametrize("case", ["NTD"])
def test_matches_torch_rms_norm(case):
    shape, axis = CASES[case]
    with x64(np.float64):
        params, x, dy = _inputs(shape, axis, 1, np.float64, beta=False)
        y, (dparams, dx) = jax.jit(_value_and_grads, static_argnums=(0, 4))(
            jaxbn.rms_norm, params, x, dy, axis)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    gt = torch.tensor(np.asarray(params["gamma"]), requires_grad=True)
    yt = torch.nn.functional.rms_norm(xt, (shape[-1],), gt, eps=1e-6)
    yt.backward(torch.tensor(np.asarray(dy)))
    assert_trees_all_close((y, dx, dparams["gamma"]),
                           (yt.detach().numpy(), xt.grad.numpy(), gt.grad.numpy()), rtol=RTOL64)


@pytest.mark.parametrize("case", ["tuple"])
def test_second_order_finite_differences(case):
    shape, axis = CASES[case]
    with x64(np.float64):
        params, x, _ = _inputs(shape, axis, 2, np.float64)

        def f(gamma, beta, x):
            return jaxbn.rms_norm({"gamma": gamma, "beta": beta}, x, axis=axis)

        check_grads_rev_order2(jax.jit(f), (params["gamma"], params["beta"], x))


def test_half_precision_uses_float32_statistics():
    params, x, _ = _inputs((8, 64), -1, 3, np.float32)
    norm = jax.jit(jaxbn.rms_norm)
    want = norm(params, x.astype(jnp.bfloat16).astype(jnp.float32))
    got = norm(params, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    assert_trees_all_close(got.astype(jnp.float32), want, rtol=2**-7)


def test_single_value_is_allowed_and_is_its_sign():
    """RMS of one value is defined (unlike layer norm, whose output would be beta)."""
    y = jaxbn.rms_norm({"gamma": jnp.ones(1), "beta": None}, jnp.array([[3.0], [-2.0]]))
    np.testing.assert_allclose(y, [[1.0], [-1.0]], rtol=1e-6)
