"""A small ResNet-style CNN in Flax NNX, with pure ``init``/``apply`` for the training loop.

NHWC input -> stem ``conv3x3 -> norm -> relu`` -> stages of basic residual blocks
-> global average pool -> linear head. A basic block is
``relu(norm(conv3x3(relu(norm(conv3x3(x))))) + shortcut(x))``; the shortcut is the
input itself, or ``norm(conv1x1(x))`` where the block changes the width or (first
block of every stage after the first) halves the resolution with stride 2.

The norm layer is a class with Flax's ``BatchNorm`` signature: ``jaxbn.nnx.BatchNorm``
(the default) or ``flax.nnx.BatchNorm``. Both consume the same rng keys, so the model
initializes identically with either. Convolutions followed by a norm have no bias;
without a norm (``"none"``) every convolution has one.

:class:`CNN` describes a model (hashable, so jitted functions can be cached on it);
its :meth:`CNN.init` and :meth:`CNN.apply` work on the ``(params, stats)`` pair that
:func:`flax.nnx.split` gives (``nnx.Param`` and ``nnx.BatchStat`` states), the
functional form :mod:`train.loop` trains, checkpoints and resumes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("jaxbn", "flax", "none")


def norm_class(name: str):
    """The norm layer class for ``name`` (one of ``NORMS``); ``None`` for ``"none"``."""
    if name == "jaxbn":
        from jaxbn import nnx as jaxbn_nnx

        return jaxbn_nnx.BatchNorm
    if name == "flax":
        return nnx.BatchNorm
    if name == "none":
        return None
    raise ValueError(f"Unknown norm {name!r}; expected one of {NORMS}.")


def _normed(norm, x, train: bool):
    return x if norm is None else norm(x, use_running_average=not train)


class ConvNorm(nnx.Module):
    """``norm(conv(x))``: a bias-free convolution and its norm, or a convolution with a
    bias when ``norm`` is None."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int, norm, momentum: float,
                 rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding="SAME",
                             use_bias=norm is None, rngs=rngs)
        self.norm = None if norm is None else norm(cout, momentum=momentum, rngs=rngs)

    def __call__(self, x, *, train: bool):
        return _normed(self.norm, self.conv(x), train)


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, stride: int, norm, momentum: float,
                 rngs: nnx.Rngs):
        layer = functools.partial(ConvNorm, norm=norm, momentum=momentum, rngs=rngs)
        self.a = layer(cin, cout, 3, stride=stride)
        self.b = layer(cout, cout, 3, stride=1)
        self.shortcut = (layer(cin, cout, 1, stride=stride) if stride != 1 or cin != cout
                         else None)

    def __call__(self, x, *, train: bool):
        h = self.b(jax.nn.relu(self.a(x, train=train)), train=train)
        skip = x if self.shortcut is None else self.shortcut(x, train=train)
        return jax.nn.relu(h + skip)


class ResNet(nnx.Module):
    """``(N, H, W, in_channels)`` images -> ``(N, num_classes)`` logits."""

    def __init__(self, in_channels: int, num_classes: int, *, widths: tuple[int, ...],
                 blocks: int, norm, momentum: float, rngs: nnx.Rngs):
        if not widths or blocks < 1:
            raise ValueError(f"Expected at least one stage width and one block per stage, "
                             f"got widths {tuple(widths)} and {blocks} blocks.")
        self.stem = ConvNorm(in_channels, widths[0], 3, stride=1, norm=norm, momentum=momentum,
                             rngs=rngs)
        stage_blocks = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage_blocks.append(BasicBlock(cin, width, stride=stride, norm=norm,
                                               momentum=momentum, rngs=rngs))
                cin = width
        self.blocks = nnx.List(stage_blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x, *, train: bool):
        h = jax.nn.relu(self.stem(x, train=train))
        for block in self.blocks:
            h = block(h, train=train)
        return self.head(jnp.mean(h, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class CNN:
    """A :class:`ResNet` description: ``len(widths)`` stages of ``blocks`` basic blocks,
    stage ``i`` with ``widths[i]`` channels; ``momentum`` of the running statistics
    (``running = momentum * running + (1 - momentum) * batch``)."""

    in_channels: int
    num_classes: int
    widths: tuple[int, ...] = (16, 32, 64)
    blocks: int = 1
    norm: str = "jaxbn"
    momentum: float = 0.9

    def module(self, key: jax.Array) -> ResNet:
        return ResNet(self.in_channels, self.num_classes, widths=self.widths,
                      blocks=self.blocks, norm=norm_class(self.norm), momentum=self.momentum,
                      rngs=nnx.Rngs(key))

    def init(self, key: jax.Array):
        """``(params, stats)``: the ``nnx.Param`` and ``nnx.BatchStat`` states of a new model."""
        _, params, stats = nnx.split(self.module(key), nnx.Param, nnx.BatchStat)
        return params, stats

    def apply(self, params, stats, x: jax.Array, *, train: bool):
        """Logits and the new running statistics; ``train=False`` normalizes with the
        running statistics and returns ``stats`` unchanged."""
        model = nnx.merge(_graphdef(self), params, stats, copy=True)  # fresh Variables
        logits = model(x, train=train)
        return logits, (nnx.state(model, nnx.BatchStat) if train else stats)


@functools.lru_cache(maxsize=32)
def _graphdef(spec: CNN):
    """The model's structure, without computing its parameters."""
    return nnx.split(nnx.eval_shape(lambda: spec.module(jax.random.key(0))))[0]
