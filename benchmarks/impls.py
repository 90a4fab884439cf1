"""The implementations the benchmarks compare, as jittable forward+backward steps.

Every step has the signature ``step(x, gamma, beta, dy) -> (y, dx, dgamma, dbeta)``:
one training-mode forward pass and the VJP with cotangent ``dy`` (the output
``y`` is returned too, as a training step would feed it to the next layer).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

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


def _functional(fn: Callable) -> Callable:
    def apply(x, gamma, beta):
        return fn({"gamma": gamma, "beta": beta}, x, eps=EPS)

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
        "jaxbn": _functional(jaxbn.batch_norm),
        "staged": _functional(reference.batch_norm_staged),
        "autodiff": _functional(reference.batch_norm_autodiff),
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
