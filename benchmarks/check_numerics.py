"""``python -m benchmarks.check_numerics``: do jaxbn's gradients still hold after a speed change?

A quick, self-contained guard run after every change to ``jaxbn/_core.py``:
float64 gradients of ``jaxbn.batch_norm`` against JAX autodiff of the naive
forward (:func:`jaxbn.reference.batch_norm_autodiff`) for (N, D), NHWC and
NCHW inputs, with a mask, under ``jax.vmap(..., axis_name=)`` (synchronized
statistics equal the whole batch's), ``jax.hessian``, reverse-over-reverse,
layer and group norm, bfloat16, and float32 data with a large offset (mean
1e4, std 1). Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from jaxbn import reference

jax.config.update("jax_enable_x64", True)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-300)
    return float(np.max(np.abs(a - b))) / scale


def _grads(fn, x, gamma, beta, dy, **kw):
    def loss(x, gamma, beta):
        y = fn({"gamma": gamma, "beta": beta}, x, **kw)
        return jnp.sum(y.astype(dy.dtype) * dy)

    return jax.jit(jax.grad(loss, (0, 1, 2)))(x, gamma, beta)


def _data(shape, dtype, feature_axis=-1, seed=0, offset=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    c = shape[feature_axis]
    x = jnp.asarray(rng.standard_normal(shape) * scale + offset, dtype)
    gamma = jnp.asarray(1 + 0.5 * rng.standard_normal(c), dtype)
    beta = jnp.asarray(rng.standard_normal(c), dtype)
    dy = jnp.asarray(rng.standard_normal(shape), dtype)
    return x, gamma, beta, dy


def main() -> int:
    results = []

    def check(name, err, tol):
        ok = bool(err <= tol)
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name:58s} max rel error {err:.1e} (tol {tol:.0e})")

    f64 = jnp.float64
    for shape, axis in [((256, 64), -1), ((8, 6, 6, 16), -1), ((8, 16, 6, 6), 1), ((3, 5), -1)]:
        x, g, b, dy = _data(shape, f64, axis)
        got = _grads(jaxbn.batch_norm, x, g, b, dy, axis=axis)
        want = _grads(reference.batch_norm_autodiff, x, g, b, dy, axis=axis)
        y = jaxbn.batch_norm({"gamma": g, "beta": b}, x, axis=axis)
        y_ref = reference.batch_norm_autodiff({"gamma": g, "beta": b}, x, axis=axis)
        check(f"float64 {shape} axis={axis}: y", _rel(y, y_ref), 1e-14)
        for n, a, w in zip(("dx", "dgamma", "dbeta"), got, want):
            check(f"float64 {shape} axis={axis}: {n} vs autodiff", _rel(a, w), 1e-13)

    # Mask (with NaN padding in masked-out rows): equals autodiff with the same mask.
    x, g, b, dy = _data((64, 8), f64)
    mask = jnp.asarray(np.random.default_rng(1).random(64) < 0.7)
    x_pad = jnp.where(mask[:, None], x, jnp.nan)
    got = _grads(jaxbn.batch_norm, x_pad, g, b, dy, mask=mask)
    want = _grads(reference.batch_norm_autodiff, x, g, b, dy, mask=mask)
    for n, a, w in zip(("dx", "dgamma", "dbeta"), got, want):
        check(f"float64 mask (NaN padding): {n} vs autodiff", _rel(a, w), 1e-13)

    # vmap with axis_name: 4 shards of 16 rows equal batch norm of all 64 rows.
    def sharded_loss(x, gamma, beta):
        def one(xs):
            return jaxbn.batch_norm({"gamma": gamma, "beta": beta}, xs, axis_name="i")

        y = jax.vmap(one, axis_name="i")(x.reshape(4, 16, 8)).reshape(64, 8)
        return jnp.sum(y * dy)

    got = jax.jit(jax.grad(sharded_loss, (0, 1, 2)))(x, g, b)
    want = _grads(reference.batch_norm_autodiff, x, g, b, dy)
    for n, a, w in zip(("dx", "dgamma", "dbeta"), got, want):
        check(f"float64 vmap axis_name (4 shards): {n} vs whole batch", _rel(a, w), 1e-13)

    # Hessian (forward-over-reverse) and reverse-over-reverse.
    x, g, b, dy = _data((6, 3), f64)

    def scalar(fn):
        return lambda x: jnp.sum(jnp.sin(fn({"gamma": g, "beta": b}, x)) * dy)

    h = jax.hessian(scalar(jaxbn.batch_norm))(x)
    h_ref = jax.hessian(scalar(reference.batch_norm_autodiff))(x)
    check("float64 jax.hessian wrt x vs autodiff", _rel(h, h_ref), 1e-12)

    def grad_norm(fn):
        return lambda x: jnp.sum(jax.grad(scalar(fn))(x) ** 2)

    rr = jax.grad(grad_norm(jaxbn.batch_norm))(x)
    rr_ref = jax.grad(grad_norm(reference.batch_norm_autodiff))(x)
    check("float64 reverse-over-reverse vs autodiff", _rel(rr, rr_ref), 1e-12)

    # Layer and group norm: naive jnp forward, autodiff.
    x, g, b, dy = _data((8, 4, 4, 12), f64)

    def naive_layer(params, x):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + 1e-5) * params["gamma"] + params["beta"]

    def naive_group(params, x, groups=3):
        xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
        axes = (1, 2, 4)
        m = xg.mean(axes, keepdims=True)
        v = ((xg - m) ** 2).mean(axes, keepdims=True)
        xh = ((xg - m) / jnp.sqrt(v + 1e-5)).reshape(x.shape)
        return xh * params["gamma"] + params["beta"]

    for name, fn, ref in [
        ("layer_norm", jaxbn.layer_norm, naive_layer),
        ("group_norm(3)", lambda p, x: jaxbn.group_norm(p, x, 3), naive_group),
    ]:
        got, want = _grads(fn, x, g, b, dy), _grads(ref, x, g, b, dy)
        for n, a, w in zip(("dx", "dgamma", "dbeta"), got, want):
            check(f"float64 {name}: {n} vs naive autodiff", _rel(a, w), 1e-13)

    # bfloat16: close to the float32 gradients of the same bf16 inputs.
    x, g, b, dy = _data((128, 32), jnp.bfloat16)
    got = _grads(jaxbn.batch_norm, x, g, b, dy)
    up = [a.astype(jnp.float32) for a in (x, g, b, dy)]
    want = _grads(reference.batch_norm_autodiff, *up)
    for n, a, w in zip(("dx", "dgamma", "dbeta"), got, want):
        check(f"bfloat16: {n} vs float32 autodiff", _rel(a, w), 2e-2)

    # Large offset in float32: mean 1e4, std 1. Compare with float64 math.
    x, g, b, dy = _data((1024, 16), jnp.float32, offset=1e4, scale=1.0)
    y = jaxbn.batch_norm({"gamma": g, "beta": b}, x)
    up = [a.astype(f64) for a in (x, g, b, dy)]
    y64 = reference.batch_norm_autodiff({"gamma": up[1], "beta": up[2]}, up[0])
    check("float32 offset 1e4: y vs float64", _rel(y, y64), 1e-3)
    got = _grads(jaxbn.batch_norm, x, g, b, dy)
    want = _grads(reference.batch_norm_autodiff, *up)
    for n, a, w in zip(("dx", "dgamma", "dbeta"), got, want):
        check(f"float32 offset 1e4: {n} vs float64", _rel(a, w), 1e-3)
    xhat = (y - b) / g
    check("float32 offset 1e4: xhat mean ~ 0", float(jnp.max(jnp.abs(xhat.mean(0)))), 1e-3)
    check("float32 offset 1e4: xhat var ~ 1", float(jnp.max(jnp.abs(xhat.var(0) - 1))), 2e-3)

    failed = results.count(False)
    print(f"{len(results) - failed}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
