"""The implementations the benchmarks compare, as jittable forward+backward steps.

Every step has the signature ``step(x, gamma, beta, dy) -> (y, dx, dgamma, dbeta)``:
one training-mode forward pass and the VJP with cotangent ``dy`` (the output
``y`` is returned too, as a training step would feed it to the next layer).
:func:`make_inputs` draws those four arguments and :func:`fwd_bwd` builds the
step; ``python -m benchmarks`` and ``python -m benchmarks.compare`` both use them.

Two families are compared, each against its jaxbn function (:data:`FAMILIES`):
batch norm, and RMS norm with a scale only (``beta`` is ``None``, ``dbeta`` too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxbn
from jaxbn import reference

EPS = 1e-5
RMS_EPS = 1e-6  # jaxbn.rms_norm's and flax's RMSNorm default


class Family(NamedTuple):
    """A normalization the benchmarks compare implementations of."""

    title: str  # heads its report section and plot, e.g. "RMS norm"
    labels: dict[str, str]  # name -> label, in plotting order; "jaxbn" is every ratio's baseline
    shift: bool  # False: scale only, the step's beta is None
    other_shapes: str  # what its shapes of rank > 2 are (hollow markers in the plot)


FAMILIES = {
    "batch_norm": Family("Batch norm", {
        "jaxbn": "jaxbn (closed-form custom_vjp)",
        "staged": "staged custom_vjp (CS231n)",
        "autodiff": "autodiff of naive forward",
        "flax": "flax.linen.BatchNorm",
    }, shift=True, other_shapes="NHWC conv shapes"),
    "rms_norm": Family("RMS norm", {
        "jaxbn": "jaxbn.rms_norm (closed-form custom_vjp)",
        "autodiff": "autodiff of naive RMS norm",
        "flax": "flax.nnx.RMSNorm",
    }, shift=False, other_shapes="(N, T, D) shapes"),
}


def make_inputs(
    shape: tuple[int, ...], dtype: Any, seed: int = 0, *, shift: bool = True
) -> tuple[jax.Array | None, ...]:
    """``(x, gamma, beta, dy)`` for a step, features last, drawn from ``seed``.

    Drawn in float64 for float64 and in float32 otherwise (the largest
    benchmark shapes would need gigabytes in float64), then cast to ``dtype``:
    ``x ~ 2 N(0, 1) + 0.5``, ``gamma ~ 1 + 0.5 N(0, 1)``, ``beta, dy ~ N(0, 1)``;
    ``beta`` is ``None`` when not ``shift`` (the same ``x``, ``gamma`` and ``dy``).
    """
    dtype = jnp.dtype(dtype)
    draw = np.float64 if dtype == jnp.float64 else np.float32
    rng = np.random.default_rng(seed)
    features = shape[-1]
    x = rng.standard_normal(shape, draw) * 2 + 0.5
    gamma = 1 + 0.5 * rng.standard_normal(features, draw)
    beta = rng.standard_normal(features, draw)
    dy = rng.standard_normal(shape, draw)
    x, gamma, beta, dy = (jnp.asarray(a, dtype) for a in (x, gamma, beta, dy))
    return x, gamma, beta if shift else None, dy


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


def rms_norm_autodiff(x, gamma, beta):
    """The naive RMS norm over the last axis, scale only, for ``jax.vjp`` to differentiate.

    Computed in float32 for 16-bit input and cast back, as :func:`jaxbn.rms_norm` does.
    """
    del beta  # scale only
    dtype = jnp.float32 if x.dtype.itemsize < 4 else x.dtype
    x32 = x.astype(dtype)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + RMS_EPS) * gamma.astype(dtype)
    return y.astype(x.dtype)


def _flax_rms_apply() -> Callable | None:
    try:
        from flax import nnx
    except ImportError:
        return None

    def apply(x, gamma, beta):
        del beta  # scale only
        model = nnx.RMSNorm(x.shape[-1], epsilon=RMS_EPS, dtype=x.dtype,
                            param_dtype=gamma.dtype, rngs=nnx.Rngs(0))
        model.scale.set_value(gamma)  # the traced argument, so dgamma flows to it
        return model(x)

    return apply


def forward_functions(include_flax: bool = True, family: str = "batch_norm") -> dict[str, Callable]:
    """name -> ``apply(x, gamma, beta) -> y`` for a family of :data:`FAMILIES`
    (training mode: batch statistics for batch norm)."""
    if family == "rms_norm":
        fns = {"jaxbn": functional(jaxbn.rms_norm, RMS_EPS), "autodiff": rms_norm_autodiff}
        flax_fn = _flax_rms_apply() if include_flax else None
    else:
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


def check_agreement(fns: dict[str, Callable], *, shift: bool, rtol: float = 1e-4) -> None:
    """Checks that every step computes what jaxbn's does before anything is timed.

    On one small float32 input, each implementation's ``y`` and gradients are
    compared with ``fns["jaxbn"]``'s: the largest absolute difference over the
    largest absolute value of jaxbn's must be at most ``rtol``. A mismatch (a
    module whose parameter was not replaced by the traced ``gamma``, another
    ``eps``) raises ``ValueError`` naming each implementation and output.
    """
    args = make_inputs((8, 32), jnp.float32, seed=1, shift=shift)
    expected = jax.jit(fwd_bwd(fns["jaxbn"]))(*args)
    wrong = []
    for name, apply in fns.items():
        got = jax.jit(fwd_bwd(apply))(*args)
        for output, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, expected):
            if b is None:
                continue
            difference = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            if not difference <= rtol:
                wrong.append(f"{name} {output} (relative difference {difference:.1e})")
    if wrong:
        raise ValueError(f"expected every implementation to match jaxbn within {rtol:g}, but "
                         + ", ".join(wrong) + " differ")
