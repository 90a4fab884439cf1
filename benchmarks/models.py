"""``python -m benchmarks models``: the training step of whole models with Flax's
normalization modules, with jaxbn's drop-in ones (:mod:`jaxbn.nnx`) and, for the
CNNs, without normalization.

Models: the ResNet-style CNN of ``train/`` (:class:`train.cnn.ResNet`) in several
sizes with ``BatchNorm``, and a pre-norm transformer block (attention + MLP) with
``LayerNorm`` and with ``RMSNorm``. Each variant starts from the same weights
(``nnx.Rngs(0)``; jaxbn's modules consume the same keys as Flax's).

The step is forward, backward and an optax update (SGD with momentum) under
``jax.jit`` with the parameters, the other state (batch statistics) and the
optimizer state donated, as a real training step: the module is split once with
``nnx.split`` and merged inside the traced function, so the compiled step is
timed without ``nnx.jit``'s per-call Python work. Its compiled memory is
``memory_analysis().temp_size_in_bytes`` of that same executable.

Before timing, each variant takes two steps; the Flax and jaxbn variants of a
model must agree on both losses (the second one follows the first update, so it
checks the gradients too) or the run stops with ``ValueError``. The variants of
a model are then timed round-robin (:func:`benchmarks.common.time_interleaved`),
and every time and memory is reported as a ratio to the Flax variant's.

Writes ``models.json`` into the results directory and the report's "Models"
section into its ``RESULTS.md`` (re-rendered with the layer tables if
``results.json`` is there); ``--quick`` writes ``*-quick`` files into the
git-ignored ``benchmarks/results-quick/``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import run
from benchmarks.common import positive_float

RTOL = 1e-4  # Flax and jaxbn losses of the first two float32 steps agree to this
LEARNING_RATE, MOMENTUM = 0.01, 0.9  # optax.sgd
BN_MOMENTUM = 0.99  # of the running statistics: Flax's default and jaxbn.nnx's
CLASSES = 10


class Model(NamedTuple):
    """One model to benchmark: which, its size, and the batch it trains on."""

    kind: str  # "cnn" or "transformer"
    name: str  # size ("small") or the norm ("LayerNorm")
    norm: str  # the module of flax.nnx / jaxbn.nnx it uses
    config: dict  # CNN: side, widths, blocks; transformer: d_model, heads, seq
    batch: int


def _cnn(name, side, widths, blocks, batch):
    return Model("cnn", name, "BatchNorm",
                 {"side": side, "widths": widths, "blocks": blocks}, batch)


def _transformer(norm, d_model, heads, seq, batch):
    return Model("transformer", norm, norm, {"d_model": d_model, "heads": heads, "seq": seq},
                 batch)


MODELS = [
    _cnn("small", 32, (16, 32, 64), 1, 32),
    _cnn("medium", 32, (32, 64, 128), 1, 64),
    _cnn("large", 32, (64, 128, 256), 2, 64),
    _transformer("LayerNorm", 256, 4, 128, 8),
    _transformer("RMSNorm", 256, 4, 128, 8),
]
QUICK_MODELS = [
    _cnn("tiny", 8, (4, 8), 1, 4),
    _cnn("tiny-wide", 8, (8, 16), 1, 4),
    _transformer("LayerNorm", 16, 2, 8, 2),
    _transformer("RMSNorm", 16, 2, 8, 2),
]
LABELS = {"flax": "flax.nnx", "jaxbn": "jaxbn.nnx", "none": "none"}  # + the norm's name


def variants(model: Model) -> dict[str, Any]:
    """name -> the norm class (``None``: no normalization) of each variant; ``"flax"``
    is the baseline of every ratio."""
    from flax import nnx

    from jaxbn import nnx as jnnx

    out = {"flax": getattr(nnx, model.norm), "jaxbn": getattr(jnnx, model.norm)}
    if model.kind == "cnn":
        out["none"] = None
    return out


def _transformer_block(d_model: int, heads: int, norm: Callable, rngs):
    from flax import nnx

    class Block(nnx.Module):
        """Pre-norm: ``x + attention(norm(x))``, then ``x + mlp(norm(x))`` (4x, GELU)."""

        def __init__(self):
            self.norm1 = norm(d_model, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(heads, d_model, decode=False, rngs=rngs)
            self.norm2 = norm(d_model, rngs=rngs)
            self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
            self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

        def __call__(self, x, *, train: bool):
            del train  # no batch statistics; the argument is the CNN's signature
            x = x + self.attention(self.norm1(x))
            return x + self.down(nnx.gelu(self.up(self.norm2(x))))

    return Block()


def build(model: Model, norm, seed: int = 0):
    """The ``nnx.Module`` of ``model`` with ``norm`` (a class, or ``None`` for no
    normalization), and one batch ``(x, y)`` to train it on, both drawn from ``seed``."""
    import jax
    from flax import nnx

    from train.cnn import ResNet

    rngs = nnx.Rngs(seed)
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    c = model.config
    if model.kind == "cnn":
        module = ResNet(3, CLASSES, widths=c["widths"], blocks=c["blocks"], norm=norm,
                        momentum=BN_MOMENTUM, rngs=rngs)
        x = jax.random.normal(kx, (model.batch, c["side"], c["side"], 3))
        y = jax.random.randint(ky, (model.batch,), 0, CLASSES)
    else:
        module = _transformer_block(c["d_model"], c["heads"], norm, rngs)
        x = jax.random.normal(kx, (model.batch, c["seq"], c["d_model"]))
        y = jax.random.normal(ky, x.shape)
    return module, (x, y)


def _loss(module, x, y):
    import jax.numpy as jnp
    import optax

    out = module(x, train=True)
    if jnp.issubdtype(y.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return jnp.mean(jnp.square(out - y))


def compile_step(module, batch):
    """The compiled train step of ``module`` and a zero-argument call that takes one step.

    The step is ``(params, rest, opt_state, x, y) -> (params, rest, opt_state, loss)``
    with the first three donated; the call feeds each step's state to the next and
    returns the step's outputs.
    """
    import jax
    import optax
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

    def step(params, rest, opt_state, x, y):
        m = nnx.merge(graphdef, params, rest)
        loss, grads = nnx.value_and_grad(_loss)(m, x, y)  # with respect to the nnx.Params
        _, params, rest = nnx.split(m, nnx.Param, ...)  # rest: the new batch statistics
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    state = [params, rest, tx.init(params)]
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, *batch).compile()

    def call():
        out = compiled(*state, *batch)
        state[:] = out[:3]
        return out

    return compiled, call


def check_agreement(name: str, losses: dict[str, list[float]], rtol: float = RTOL) -> None:
    """Raises ``ValueError`` unless every loss of ``losses`` (variant -> losses of the first
    steps) is finite and jaxbn's equal Flax's within ``rtol`` (relative)."""
    wrong = [f"{v} loss {loss}" for v, ls in losses.items() for loss in ls
             if not math.isfinite(loss)]
    for step, (a, b) in enumerate(zip(losses["jaxbn"], losses["flax"]), 1):
        if not abs(a - b) <= rtol * abs(b):
            wrong.append(f"step {step} loss: jaxbn {a:.7g}, flax {b:.7g}")
    if wrong:
        raise ValueError(f"{name}: expected finite losses, jaxbn's equal to Flax's within "
                         f"{rtol:g}, but " + "; ".join(wrong))


def bench_model(model: Model, norms: dict[str, Any], budget_s: float,
                min_repeats: int = 15, max_repeats: int = 300) -> dict:
    """Compiles, checks (:func:`check_agreement`) and times every variant of ``model``;
    ``norms`` is :func:`variants`'s mapping (``"flax"`` and ``"jaxbn"`` at least)."""
    calls, temp, losses = {}, {}, {}
    for v, norm in norms.items():
        compiled, calls[v] = compile_step(*build(model, norm))
        analysis = compiled.memory_analysis()
        temp[v] = None if analysis is None else int(analysis.temp_size_in_bytes)
        losses[v] = [float(calls[v]()[-1]) for _ in range(2)]
    check_agreement(f"{model.kind} {model.name}", losses)
    medians, repeats = run._interleaved(calls, budget_s, min_repeats, max_repeats)
    out = {**model._asdict(), "repeats": repeats, "losses": losses, "variants": {}}
    for v in norms:
        out["variants"][v] = {
            "median_s": medians[v], "time_to_flax": medians[v] / medians["flax"],
            "temp_bytes": temp[v],
            "temp_to_flax": None if temp[v] is None else temp[v] / temp["flax"],
        }
    return out


def summarize(cases: list[dict]) -> tuple[dict, list[dict]]:
    """Geometric means of the CNNs' time ratios per variant, and the issue's targets."""
    cnns = [c for c in cases if c["kind"] == "cnn"]
    if not cnns:
        return {}, []
    geomean = {v: run.geomean(c["variants"][v]["time_to_flax"] for c in cnns)
               for v in cnns[0]["variants"]}
    jaxbn = [c["variants"]["jaxbn"] for c in cnns]
    time_ratio = max(j["time_to_flax"] for j in jaxbn)
    targets = [{"target": "jaxbn step not slower than Flax's in any CNN size (largest ratio)",
                "measured": time_ratio, "met": time_ratio <= 1.0}]
    if all(j["temp_to_flax"] is not None for j in jaxbn):
        temp_ratio = max(j["temp_to_flax"] for j in jaxbn)
        targets.insert(0, {"target": "jaxbn train-step temp memory <= 0.75x Flax's in every "
                                     "CNN size (largest ratio)",
                           "measured": temp_ratio, "met": temp_ratio <= 0.75})
    return geomean, targets


def _number(r: float | None, digits: int) -> str:
    return "n/a" if r is None else f"{r:.{digits}f}"


def section_lines(result: dict) -> list[str]:
    """The report's "Models" section for a ``models.json`` result."""
    lines = [
        "## Models: the training step", "",
        *run.machine_lines(result),
        f"- method: forward, backward and `optax.sgd({LEARNING_RATE}, momentum={MOMENTUM})` "
        "update, one "
        "`jax.jit` executable with parameters, batch statistics and optimizer state donated; "
        "the variants of a model start from the same weights, take two steps (Flax's and "
        f"jaxbn's losses must agree to {RTOL:g}), then are called round-robin (rotating who goes "
        "first), median per variant; *time / Flax* is against the Flax variant of the same "
        "model in the same round-robin. *temp*: XLA's compiled temp buffer of the step "
        "(`memory_analysis().temp_size_in_bytes`). CNN: `train.cnn.ResNet`, NHWC input of "
        f"side x side x 3, {CLASSES} classes, cross-entropy; transformer: one pre-norm block "
        "(multi-head attention + 4x GELU MLP), mean squared error; float32.",
        "",
        "| model | size | batch | normalization | step ms | time / Flax | temp MiB | "
        "temp / Flax |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for c in result["cases"]:
        size = ", ".join(f"{k} {'x'.join(map(str, v)) if isinstance(v, list | tuple) else v}"
                         for k, v in c["config"].items())
        for v, i in c["variants"].items():
            label = LABELS[v] if v == "none" else f"{LABELS[v]}.{c['norm']}"
            temp = _number(None if i["temp_bytes"] is None else i["temp_bytes"] / 2**20, 2)
            lines.append(f"| {c['kind']} {c['name']} | {size} | {c['batch']} | "
                         f"{label} | {i['median_s'] * 1e3:.2f} | "
                         f"{i['time_to_flax']:.3f} | {temp} | {_number(i['temp_to_flax'], 2)} |")
    lines.append("")
    if result["geomean"]:
        count = sum(c["kind"] == "cnn" for c in result["cases"])
        lines += [f"Geometric mean of time / Flax over the {count} CNN sizes: " + ", ".join(
            f"{LABELS[v]} {g:.3f}" for v, g in result["geomean"].items()), ""]
    if result["targets"]:
        lines += ["### Targets", "", "| target | measured | met |", "|---|---:|---|"]
        lines += [f"| {t['target']} | {t['measured']:.3f} | {'yes' if t['met'] else 'no'} |"
                  for t in result["targets"]]
        lines.append("")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``python -m benchmarks models``, with ``--out`` resolved as
    :func:`benchmarks.run.parse_args` does."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks models",
        description="Train-step time and compiled memory of whole models with Flax's "
        "normalization modules, jaxbn's and (CNNs) none.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and a short time budget (smoke test)")
    parser.add_argument("--budget", type=positive_float, default=None,
                        help="seconds of timed steps per model (default 60, quick 0.5)")
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"results directory (default: {run.RESULTS_DIR.relative_to(run.ROOT)}, with "
        f"--quick the git-ignored {run.QUICK_DIR.relative_to(run.ROOT)})")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = run.QUICK_DIR if args.quick else run.RESULTS_DIR
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    suffix = "-quick" if args.quick else ""
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 60.0)
    words = sys.argv[2:] if argv is None else argv
    result = {"command": " ".join(["python -m benchmarks models", *words]),
              "machine": run._machine(), "cases": []}
    start = time.perf_counter()
    for model in QUICK_MODELS if args.quick else MODELS:
        case = bench_model(model, variants(model), budget)
        result["cases"].append(case)
        flax_ms = case["variants"]["flax"]["median_s"] * 1e3
        print(f"{model.kind:11s} {model.name:9s} flax {flax_ms:8.2f} ms | " + "  ".join(
            f"{v} {i['time_to_flax']:.3f}x time, {_number(i['temp_to_flax'], 2)}x temp"
            for v, i in case["variants"].items() if v != "flax")
            + f"  (n={case['repeats']})", flush=True)
    result["geomean"], result["targets"] = summarize(result["cases"])
    result["elapsed_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"models{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    run.render(args.out, suffix)
    for t in result["targets"]:
        print(f"target {t['target']}: {t['measured']:.3f} -> {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {args.out}/RESULTS{suffix}.md in {result['elapsed_s']:.0f} s")
    return 0
