"""``python -m benchmarks revisions REV``: this checkout's batch norm against the one at
git revision ``REV``, in the same process.

``jaxbn/`` at ``REV`` is extracted with ``git archive`` into a temporary
directory and imported under another name (``jaxbn_at_REV``). For every
benchmark shape (:data:`benchmarks.run.ND_SHAPES` and ``CONV_SHAPES``) and
dtype, the jitted forward+backward of ``batch_norm`` on the layer
benchmark's inputs and step (:mod:`benchmarks.impls`; ``--forward``: the
forward pass alone) is timed round-robin for three programs: ``REV``,
``REV`` compiled a second time (an A/A control: the spread between two
identical programs is the noise of the measurement), and this checkout.
Each gets the median of its calls; the table gives both as ratios to the
first ``REV`` program, with geometric means.

Prints a Markdown table; nothing is written. About a minute and a half per dtype.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import math
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

from benchmarks import impls
from benchmarks.common import positive_float
from benchmarks.run import CONV_SHAPES, ND_SHAPES, ROOT, _interleaved


def load_revision(rev: str, into: Path) -> ModuleType:
    """``jaxbn`` as of git revision ``rev``, imported as ``jaxbn_at_<rev>`` from ``into``.

    ``into`` is on ``sys.path`` only while the package and the submodules it
    imports load. A revision loads once per process (its types are registered
    with ``jax.export`` under their names): a second call returns the first module.
    """
    name = "jaxbn_at_" + re.sub(r"\W", "_", rev)
    if name in sys.modules:
        return sys.modules[name]
    archive = subprocess.run(["git", "archive", rev, "jaxbn"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".py"):
                source = tar.extractfile(member).read().decode()
                target = into / name / Path(member.name).relative_to("jaxbn")
                target.parent.mkdir(parents=True, exist_ok=True)
                # Imports and jax.export serialization names, so both versions load side by side.
                target.write_text(re.sub(r"\bjaxbn\b", name, source))
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(into))


def _step(module: ModuleType, shape: tuple[int, ...], dtype, forward: bool):
    """The compiled step of ``module.batch_norm`` on the benchmark inputs, as a call."""
    import jax

    args = impls.make_inputs(shape, dtype)
    apply = impls.functional(module.batch_norm)
    # A new function object per program, so that jit's trace cache is not shared.
    step = (lambda x, gamma, beta, dy: apply(x, gamma, beta)) if forward else impls.fwd_bwd(apply)
    return functools.partial(jax.jit(step).lower(*args).compile(), *args)


def compare(rev: str, dtypes: list[str], budget_s: float, forward: bool = False) -> list[str]:
    import jaxbn

    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(rev, Path(tmp))
    what = "Forward" if forward else "Forward+backward"
    lines = [f"{what} time relative to `{rev}` (same-run medians; "
             f"`{rev}` again: the same program compiled twice).", "",
             "| dtype | shape | " + f"`{rev}` again | this checkout | rounds |",
             "|---|---|---:|---:|---:|"]
    for dtype_name in dtypes:
        logs: dict[str, list[float]] = {"again": [], "now": []}
        for shape in ND_SHAPES + CONV_SHAPES:
            calls = {name: _step(module, shape, dtype_name, forward)
                     for name, module in (("rev", old), ("again", old), ("now", jaxbn))}
            t, repeats = _interleaved(calls, budget_s, min_repeats=30, max_repeats=20000)
            ratios = {k: t[k] / t["rev"] for k in logs}
            for k in logs:
                logs[k].append(math.log(ratios[k]))
            shape_text = "x".join(map(str, shape))
            lines.append(f"| {dtype_name} | {shape_text} | {ratios['again']:.3f} | "
                         f"{ratios['now']:.3f} | {repeats} |")
            print(lines[-1], flush=True)
        means = {k: math.exp(sum(v) / len(v)) for k, v in logs.items()}
        lines.append(f"| {dtype_name} | **geomean** | **{means['again']:.3f}** | "
                     f"**{means['now']:.3f}** | |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks revisions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="a git revision, e.g. bb6b340 (the pre-shift core)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--budget", type=positive_float, default=8.0,
                        help="seconds of timed calls per shape (default 8; at least 30 rounds)")
    parser.add_argument("--forward", action="store_true", help="time the forward pass alone")
    args = parser.parse_args(argv)
    print("\n".join(compare(args.rev, args.dtype, args.budget, args.forward)))
    return 0
