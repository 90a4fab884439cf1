"""An MLP with batch norm after each hidden linear layer, as pure functions over pytrees.

``Linear -> BatchNorm -> ReLU`` for every hidden layer, then a linear output
layer. Layers followed by batch norm have no bias (batch norm's ``beta``
replaces it; a bias there gets a zero gradient and Adam would only amplify the
round-off in it). Without batch norm (``norm="none"``) every layer has a bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

import jaxbn
from jaxbn import reference

Array = jax.Array

NORMS = ("jaxbn", "autodiff", "staged", "none")
NORM_HELP = {
    "jaxbn": "jaxbn.batch_norm_train: closed-form custom_vjp backward (the library)",
    "autodiff": "jaxbn.reference.batch_norm_autodiff: naive forward, jax autodiff backward",
    "staged": "jaxbn.reference.batch_norm_staged: CS231n node-by-node staged backward",
    "none": "no normalization (plain MLP with biases)",
}


class Dense(NamedTuple):
    w: Array  # (fan_in, fan_out) float32
    b: Array | None  # (fan_out,) float32; None when batch norm follows


class MLPParams(NamedTuple):
    dense: tuple[Dense, ...]  # hidden layers, then the output layer
    norm: tuple[jaxbn.BatchNormParams, ...]  # one per hidden layer; () for norm="none"


MLPStats = tuple  # tuple[jaxbn.RunningStats, ...], one per hidden layer; () for norm="none"


def init_mlp(
    key: Array, sizes: Sequence[int], *, norm: str = "jaxbn", init_scale: float | None = None
) -> tuple[MLPParams, MLPStats]:
    """Parameters and running statistics of an MLP with layer widths ``sizes``.

    Args:
      key: a PRNG key.
      sizes: ``(in, hidden_1, ..., hidden_k, out)``.
      norm: one of ``NORMS``.
      init_scale: ``None`` for He init (``std = sqrt(2 / fan_in)``), else the
        std of a plain normal init for every weight matrix (the CS231n
        weight-scale experiment).

    Returns:
      ``(params, stats)``.
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS}.")
    if len(sizes) < 2:
        raise ValueError(f"Expected at least (in, out) layer sizes, got {tuple(sizes)}.")
    keys = jax.random.split(key, len(sizes) - 1)
    dense = []
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        std = jnp.sqrt(2.0 / fan_in) if init_scale is None else init_scale
        w = jax.random.normal(k, (fan_in, fan_out), jnp.float32) * std
        is_output = i == len(sizes) - 2
        b = jnp.zeros((fan_out,), jnp.float32) if (norm == "none" or is_output) else None
        dense.append(Dense(w, b))
    hidden = sizes[1:-1] if norm != "none" else ()
    params = MLPParams(tuple(dense), tuple(jaxbn.init(n) for n in hidden))
    stats = tuple(jaxbn.init_stats(n) for n in hidden)
    return params, stats


def _stats_update(stats: jaxbn.RunningStats, h: Array, momentum: float) -> jaxbn.RunningStats:
    # The reference norms return no running statistics, so the autodiff and staged
    # variants update them here, written independently of jaxbn.batch_norm_train with the
    # same convention: running = momentum * running + (1 - momentum) * batch, biased var.
    h = jax.lax.stop_gradient(h)
    mean = jnp.mean(h, axis=0)
    var = jnp.mean(jnp.square(h - mean), axis=0)
    return jaxbn.RunningStats(
        momentum * stats.mean + (1 - momentum) * mean,
        momentum * stats.var + (1 - momentum) * var,
    )


def _norm_train(norm, p, s, h, momentum):
    if norm == "jaxbn":
        return jaxbn.batch_norm_train(p, s, h, momentum=momentum)
    fn = reference.batch_norm_autodiff if norm == "autodiff" else reference.batch_norm_staged
    return fn(p, h), _stats_update(s, h, momentum)


def apply(
    params: MLPParams, stats: MLPStats, x: Array, *, norm: str, train: bool,
    momentum: float = 0.9,
) -> tuple[Array, MLPStats]:
    """Logits ``(N, classes)`` and the new running statistics.

    ``train=True`` normalizes with batch statistics (and updates the running
    ones); ``train=False`` uses the running statistics (``batch_norm_eval``)
    and returns ``stats`` unchanged.
    """
    h = x
    new_stats = []
    for i, layer in enumerate(params.dense[:-1]):
        h = h @ layer.w
        if norm == "none":
            h = h + layer.b
        elif train:
            h, s = _norm_train(norm, params.norm[i], stats[i], h, momentum)
            new_stats.append(s)
        else:
            h = jaxbn.batch_norm_eval(params.norm[i], stats[i], h)
        h = jax.nn.relu(h)
    out = params.dense[-1]
    logits = h @ out.w + out.b
    return logits, (tuple(new_stats) if train else stats)
