"""The implementations the benchmarks compare, as jittable forward+backward steps.

Every step has the signature ``step(x, gamma, beta, dy) -> (y, dx, dgamma, dbeta)``:
one training-mode forward pass and the VJP with cotangent ``dy`` (the output
``y`` is returned too, as a training step would feed it to the next layer).
:func:`make_inputs` draws those four arguments and :func:`fwd_bwd` builds the
step; ``python -m benchmarks`` and ``python -m benchmarks.compare`` both use them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from jaxbn import reference

EPS = 1e-5

# name -> label, in plotting order; "jaxbn" is the baseline of every ratio.
LABELS = {
    "jaxbn": "jaxbn (closed-form custom_vjp)",
    "staged": "staged custom_vjp (CS231n)",
    "autodiff": "autodiff of naive forward",
    "flax": "flax.linen.BatchNorm",
}


def make_inputs(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> tuple[jax.Array, ...]:
    """``(x, gamma, beta, dy)`` for a step, features last, drawn from ``seed``.

    Drawn in float64 for float64 and in float32 otherwise (the largest
    benchmark shapes would need gigabytes in float64), then cast to ``dtype``:
    ``x ~ 2 N(0, 1) + 0.5``, ``gamma ~ 1 + 0.5 N(0, 1)``, ``beta, dy ~ N(0, 1)``.
    """
    dtype = jnp.dtype(dtype)
    draw = np.float64 if dtype == jnp.float64 else np.float32
    rng = np.random.default_rng(seed)
    features = shape[-1]
    x = rng.standard_normal(shape, draw) * 2 + 0.5
    gamma = 1 + 0.5 * rng.standard_normal(features, draw)
    beta = rng.standard_normal(features, draw)
    dy = rng.standard_normal(shape, draw)
    return tuple(jnp.asarray(a, dtype) for a in (x, gamma, beta, dy))


def functional(fn: Callable, eps: float = EPS) -> Callable:
    """``apply(x, gamma, beta) -> fn({"gamma": gamma, "beta": beta}, x, eps=eps)``.

    Adapts a jaxbn-style ``fn(params, x, *, eps)`` (:func:`jaxbn.batch_norm`,
    the :mod:`jaxbn.reference` functions) to the argument order of :func:`fwd_bwd`.
    """

    def apply(x, gamma, beta):
        return fn({"gamma": gamma, "beta": beta}, x, eps=eps)

    return apply


def _flax_apply() -> Callable | None:
    try:
        import flax.linen as nn
    except ImportError:
        return None

    def apply(x, gamma, beta):
        model = nn.BatchNorm(
            use_running_average=False, momentum=0.9, epsilon=EPS,
            dtype=x.dtype, param_dtype=gamma.dtype,
        )
        features = x.shape[-1]
        stats = {"mean": jnp.zeros(features, jnp.float32), "var": jnp.ones(features, jnp.float32)}
        y, _ = model.apply(
            {"params": {"scale": gamma, "bias": beta}, "batch_stats": stats},
            x, mutable=["batch_stats"],
        )
        return y

    return apply


def forward_functions(include_flax: bool = True) -> dict[str, Callable]:
    """name -> ``apply(x, gamma, beta) -> y`` (training mode, batch statistics)."""
    fns = {
        "jaxbn": functional(jaxbn.batch_norm),
        "staged": functional(reference.batch_norm_staged),
        "autodiff": functional(reference.batch_norm_autodiff),
    }
    flax_fn = _flax_apply() if include_flax else None
    if flax_fn is not None:
        fns["flax"] = flax_fn
    return fns


def fwd_bwd(apply: Callable) -> Callable:
    """The un-jitted step ``(x, gamma, beta, dy) -> (y, dx, dgamma, dbeta)``."""

    def step(x, gamma, beta, dy):
        y, vjp = jax.vjp(apply, x, gamma, beta)
        return (y, *vjp(dy))

    return step


def elementwise_pass(x, gamma, beta, dy):
    """The bandwidth reference: one fused pass reading two arrays of x's size, writing one."""
    del gamma, beta
    return x * dy + x


def residual_bytes(apply: Callable, x, gamma, beta) -> tuple[int, int]:
    """Bytes the VJP closure keeps for the backward pass: (all, excluding ``x`` itself).

    Traced abstractly (nothing is computed): the leaves of the function
    :func:`jax.vjp` returns are the residuals. The second number leaves out
    one residual that has exactly ``x``'s shape and dtype when the
    implementation saves its input as is (``jaxbn`` does; the caller holds
    ``x`` anyway), so it counts only memory the forward pass allocates.
    """

    def leaves(x, gamma, beta):
        return jax.tree.leaves(jax.vjp(apply, x, gamma, beta)[1])

    shapes = jax.eval_shape(leaves, x, gamma, beta)
    sizes = [s.size * jnp.dtype(s.dtype).itemsize for s in shapes]
    total = sum(sizes)
    try:  # which residual is the argument x itself (private helper; optional)
        from jax._src.ad_checkpoint import saved_residuals

        described = saved_residuals(apply, x, gamma, beta)
        from_x = sum(
            a.size * jnp.dtype(a.dtype).itemsize
            for a, why in described
            if "from the argument x" in why or why.startswith("from the argument 0")
        )
    except Exception:  # noqa: BLE001 - a private API may change; report the total only
        from_x = 0
    return total, total - from_x
