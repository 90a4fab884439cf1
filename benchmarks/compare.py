"""Compare the closed-form batch-norm backward pass with the other ways to the same gradient.

``python -m benchmarks.compare --shape 256 1024 --dtype float64`` (from the
repository root) computes ``dx``, ``dgamma`` and ``dbeta`` of
``sum(batch_norm(params, x) * dy)`` four ways:

* ``closed form``: :func:`jaxbn.batch_norm`, the CS231n closed-form custom VJP
  (the baseline every other row is compared with);
* ``autodiff``: :func:`jaxbn.reference.batch_norm_autodiff`, JAX autodiff of
  the naive forward pass;
* ``staged``: :func:`jaxbn.reference.batch_norm_staged`, the CS231n
  node-by-node backward pass as a custom VJP;
* ``finite diff``: central finite differences of the loss on a few sampled
  coordinates of ``x``, ``gamma`` and ``beta`` (float64 only).

It prints the largest absolute and relative differences of each gradient from
the closed form, and the speed of each implementation (forward + backward
under ``jax.jit``, median of interleaved repeats) as a ratio to the closed
form. ``--json`` prints the same numbers as one JSON object.

The relative difference of an array ``a`` against the closed form ``c`` is
``max|a - c| / max|c|`` (normwise, so entries that happen to be near zero do
not blow it up).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.common import (
    nonnegative_int,
    positive_float,
    positive_int,
    time_interleaved,
)

DTYPES = ("float32", "float64", "bfloat16")
GRADS = ("dx", "dgamma", "dbeta")

# Implementation keys, in the order they are printed.
CLOSED, AUTODIFF, STAGED, FINITE = "closed_form", "autodiff", "staged", "finite_diff"
LABELS = {
    CLOSED: "closed form (jaxbn)",
    AUTODIFF: "autodiff of naive fwd",
    STAGED: "staged (CS231n)",
    FINITE: "finite differences",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.compare`` (numbers checked by type)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=(
            "Compare jaxbn's closed-form batch-norm gradient with JAX autodiff of the naive "
            "forward pass, the staged CS231n backward pass and (float64) finite differences: "
            "largest differences of dx, dgamma, dbeta and forward+backward speed under jit."
        ),
        epilog="Relative difference: max|a - closed| / max|closed| over the whole array.",
    )
    parser.add_argument(
        "--shape", type=positive_int, nargs="+", default=[256, 1024], metavar="N",
        help="input shape, features last: N D, or NHWC N H W C (default: 256 1024)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="default: float32")
    parser.add_argument("--eps", type=positive_float, default=1e-5, help="default: 1e-5")
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0,
        help="seed for x, gamma, beta and the cotangent dy (default: 0)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=50,
        help="timed calls per implementation, interleaved (default: 50)",
    )
    parser.add_argument(
        "--no-time", action="store_true", help="skip the timing (differences only)",
    )
    parser.add_argument(
        "--fd-samples", type=nonnegative_int, default=6,
        help="coordinates of each of x, gamma, beta checked by finite differences "
        "(float64 only; default: 6)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _implementations() -> dict[str, Callable]:
    import jaxbn

    return {
        CLOSED: jaxbn.batch_norm,
        AUTODIFF: jaxbn.reference.batch_norm_autodiff,
        STAGED: jaxbn.reference.batch_norm_staged,
    }


def _difference(a: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    abs_diff = float(np.max(np.abs(a - ref))) if a.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return {"max_abs": abs_diff, "max_rel": abs_diff / scale if scale > 0 else abs_diff}


def _finite_differences(x, gamma, beta, dy, eps, samples, seed, closed_grads):
    """Central differences of ``sum(batch_norm(x) * dy)`` on sampled coordinates (float64).

    Returns differences against the closed form on those coordinates, in the
    same form as :func:`_difference`, plus how many coordinates were checked.
    """
    import jax
    import jax.numpy as jnp

    import jaxbn

    @jax.jit
    def loss(x, gamma, beta):
        return jnp.sum(jaxbn.batch_norm({"gamma": gamma, "beta": beta}, x, eps=eps) * dy)

    rng = np.random.default_rng(seed + 1)
    args = [x, gamma, beta]
    out = {}
    for i, name in enumerate(GRADS):
        value = np.asarray(args[i])
        flat = rng.choice(value.size, size=min(samples, value.size), replace=False)
        estimates, exact = [], []
        for f in flat:
            index = np.unravel_index(f, value.shape)
            # The loss is affine in gamma and beta (a large step is exact up to
            # round-off); for x, Richardson-extrapolated central differences.
            step = (1e-3 if name == "dx" else 1e-2) * max(1.0, abs(float(value[index])))

            def central(h, i=i, index=index):
                plus = [a.at[index].add(h) if j == i else a for j, a in enumerate(args)]
                minus = [a.at[index].add(-h) if j == i else a for j, a in enumerate(args)]
                return (float(loss(*plus)) - float(loss(*minus))) / (2 * h)

            coarse, fine = central(step), central(step / 2)
            estimate = (4 * fine - coarse) / 3
            estimates.append(estimate)
            exact.append(float(np.asarray(closed_grads[i])[index]))
        # Relative to the largest gradient entry of the full closed-form array,
        # the same scale the other rows use.
        diff = float(np.max(np.abs(np.array(estimates) - np.array(exact)))) if exact else 0.0
        scale = float(np.max(np.abs(np.asarray(closed_grads[i]))))
        out[name] = {
            "max_abs": diff,
            "max_rel": diff / scale if scale > 0 else diff,
            "coordinates": int(len(flat)),
        }
    return out


def compare(
    shape: Sequence[int],
    dtype: str = "float32",
    *,
    eps: float = 1e-5,
    seed: int = 0,
    repeats: int = 50,
    fd_samples: int = 6,
    time_it: bool = True,
) -> dict[str, Any]:
    """Runs the comparison; returns the JSON-able result (see module docstring).

    Float64 needs ``jax_enable_x64`` (e.g. ``with jax.enable_x64(True):``);
    :func:`main` turns it on for the run.
    """
    import jax

    from benchmarks import impls

    shape = tuple(int(n) for n in shape)
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("float64 needs jax.config.update('jax_enable_x64', True) first.")
    x, gamma, beta, dy = impls.make_inputs(shape, dtype, seed)
    steps = {
        name: jax.jit(impls.fwd_bwd(impls.functional(fn, eps)))
        for name, fn in _implementations().items()
    }
    grads = {name: jax.device_get(step(x, gamma, beta, dy))[1:] for name, step in steps.items()}

    differences: dict[str, Any] = {}
    for name in (AUTODIFF, STAGED):
        differences[name] = {
            g: _difference(grads[name][i], grads[CLOSED][i]) for i, g in enumerate(GRADS)
        }
    if dtype == "float64" and fd_samples > 0:
        differences[FINITE] = _finite_differences(
            x, gamma, beta, dy, eps, fd_samples, seed, grads[CLOSED]
        )
    else:
        differences[FINITE] = None

    timing = None
    if time_it:
        medians = time_interleaved(
            {name: functools.partial(step, x, gamma, beta, dy) for name, step in steps.items()},
            repeats,
        )
        base = medians[CLOSED]
        timing = {
            name: {"median_s": t, "ratio_to_closed_form": t / base} for name, t in medians.items()
        }
    return {
        "shape": list(shape),
        "dtype": dtype,
        "eps": eps,
        "seed": seed,
        "values_per_statistic": int(math.prod(shape[:-1])),
        "baseline": CLOSED,
        "relative_difference": "max|a - closed_form| / max|closed_form|",
        "differences": differences,
        "timing": timing,
        "repeats": repeats if time_it else 0,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }


def _fmt(value: float) -> str:
    return "0.0" if value == 0 else f"{value:.1e}"


def format_report(result: dict[str, Any]) -> str:
    """Aligned, human-readable text for a :func:`compare` result."""
    shape = "x".join(str(n) for n in result["shape"])
    lines = [
        f"jaxbn compare: shape {shape}, {result['dtype']}, eps {result['eps']:g}, "
        f"seed {result['seed']} ({result['values_per_statistic']} values per feature)",
        "gradient differences vs the closed form (max abs; rel = max|a-c|/max|c|):",
    ]
    timing = result["timing"]
    width = max(len(label) for label in LABELS.values())
    for name in (AUTODIFF, STAGED, FINITE):
        diff = result["differences"][name]
        label = LABELS[name].ljust(width)
        if diff is None:
            lines.append(f"  {label}  skipped (float64 only)")
            continue
        parts = [
            f"{g} difference: {_fmt(diff[g]['max_abs']):>7} (rel {_fmt(diff[g]['max_rel']):>7})"
            for g in GRADS
        ]
        if name == FINITE:
            coords = "/".join(str(diff[g]["coordinates"]) for g in GRADS)
            parts.append(f"on {coords} sampled coordinates")
        elif timing is not None:
            parts.append(f"closed-form speedup: {timing[name]['ratio_to_closed_form']:.2f}x")
        lines.append(f"  {label}  " + ", ".join(parts))
    if timing is not None:
        lines.append(
            f"fwd+bwd under jit on {result['backend']}, median of {result['repeats']} "
            "interleaved calls (closed-form speedup = its time / closed form's time):"
        )
        for name in (CLOSED, AUTODIFF, STAGED):
            t = timing[name]
            lines.append(
                f"  {LABELS[name].ljust(width)}  {t['median_s'] * 1e3:9.3f} ms  "
                f"{t['ratio_to_closed_form']:5.2f}x the closed form's time"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m benchmarks.compare``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.shape) < 2:
        parser.error(
            f"--shape needs at least 2 sizes (N D, or N H W C with features last), "
            f"got {args.shape}"
        )
    if math.prod(args.shape[:-1]) < 2:
        parser.error(
            f"--shape {' '.join(map(str, args.shape))} has a single value per feature; "
            "batch norm needs a batch of at least 2 to normalize over"
        )
    import jax

    # Float64 needs x64 on before any array is created; the context manager
    # keeps it from leaking into a caller's process (main is also called by tests).
    with jax.enable_x64(args.dtype == "float64" or jax.config.jax_enable_x64):
        result = compare(
            args.shape, args.dtype, eps=args.eps, seed=args.seed, repeats=args.repeats,
            fd_samples=args.fd_samples, time_it=not args.no_time,
        )
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
