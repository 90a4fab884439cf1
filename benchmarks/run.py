"""``python -m benchmarks``: speed and memory of jaxbn vs the other batch norms,
and of ``jaxbn.rms_norm`` vs the other RMS norms.

In one process, for each family, shape and dtype, after compiling and warming up,
the forward+backward steps of every implementation (and the elementwise
bandwidth reference) are called round-robin, the first one rotating each
round; each gets the median of its calls. Every number reported is a ratio
to the family's jaxbn function (or to the bandwidth reference) measured in the
same round-robin.

Writes ``benchmarks/results/``: ``results.json``, ``RESULTS.md`` and three plots;
``RESULTS.md`` ends with the "Models" section of ``python -m benchmarks models``
(:mod:`benchmarks.models`) when its ``models.json`` is there.
``--quick`` writes ``*-quick`` files into the git-ignored
``benchmarks/results-quick/`` instead (``--out`` chooses another directory),
leaving the full results alone.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import positive_float, time_interleaved

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
QUICK_DIR = ROOT / "benchmarks" / "results-quick"  # listed in .gitignore
FLAX_MISSING = ("flax not installed: the Flax column is left out; "
                "pip install -e '.[bench]' adds it")

ND_SHAPES = [
    (64, 64), (256, 256), (256, 1024), (1024, 1024), (4096, 1024), (16384, 1024),
    (65536, 1024),
]
CONV_SHAPES = [(32, 56, 56, 64), (64, 28, 28, 128), (64, 14, 14, 256), (64, 7, 7, 512)]
QUICK_SHAPES = [(64, 64), (256, 1024), (4096, 1024), (32, 28, 28, 64)]
RMS_SHAPES = [(256, 1024), (4096, 1024), (16384, 1024), (4096, 4096), (32, 128, 768)]
RMS_QUICK_SHAPES = [(256, 1024), (8, 64, 256)]
# family -> (shapes, quick shapes)
SHAPES = {"batch_norm": (ND_SHAPES + CONV_SHAPES, QUICK_SHAPES),
          "rms_norm": (RMS_SHAPES, RMS_QUICK_SHAPES)}


def _machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import jax
    import jaxlib

    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "jaxlib": jaxlib.__version__, "numpy": np.__version__}
    try:
        import flax

        versions["flax"] = flax.__version__
    except ImportError:
        versions["flax"] = None
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "versions": versions,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1min_at_start": load, "platform": platform.platform(),
    }


def _interleaved(
    calls: Mapping[str, Callable[[], Any]], budget_s: float, min_repeats: int, max_repeats: int
) -> tuple[dict[str, float], int]:
    """Median seconds per zero-argument call (:func:`time_interleaved`) and the repeats used.

    Each call is made twice first (compilation happened before): the second
    call's time, summed over the calls, sets how many rounds fit in ``budget_s``,
    clamped to ``[min_repeats, max_repeats]``.
    """
    import jax

    estimate = 0.0
    for call in calls.values():
        jax.block_until_ready(call())
        start = time.perf_counter()
        jax.block_until_ready(call())
        estimate += time.perf_counter() - start
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(estimate, 1e-9))))
    return time_interleaved(calls, repeats, warmup=0), repeats


def bench_case(shape, dtype_name, fns, budget_s, min_repeats, max_repeats, shift=True):
    import jax
    import jax.numpy as jnp

    from benchmarks import impls

    dtype = jnp.dtype(dtype_name)
    args = impls.make_inputs(shape, dtype, shift=shift)
    x, gamma, beta, _ = args
    calls, memory = {}, {}
    for name, apply in fns.items():
        compiled = jax.jit(impls.fwd_bwd(apply)).lower(*args).compile()
        calls[name] = functools.partial(compiled, *args)
        analysis = compiled.memory_analysis()
        total, beyond_x = impls.residual_bytes(apply, x, gamma, beta)
        memory[name] = {
            "residual_bytes": total,
            "residual_bytes_beyond_x": beyond_x,
            "temp_bytes": None if analysis is None else int(analysis.temp_size_in_bytes),
        }
    calls["pass"] = functools.partial(
        jax.jit(impls.elementwise_pass).lower(*args).compile(), *args)
    medians, repeats = _interleaved(calls, budget_s, min_repeats, max_repeats)
    base, one_pass = medians["jaxbn"], medians["pass"]
    x_bytes = x.size * dtype.itemsize
    out = {"shape": list(shape), "dtype": dtype_name, "elements": int(x.size),
           "repeats": repeats, "pass_s": one_pass, "impls": {}}
    for name in fns:
        t = medians[name]
        out["impls"][name] = {
            "median_s": t,
            "ratio_to_jaxbn": t / base,
            "passes": t / one_pass,
            "residual_x": memory[name]["residual_bytes"] / x_bytes,
            "residual_beyond_x": memory[name]["residual_bytes_beyond_x"] / x_bytes,
            "temp_x": None if memory[name]["temp_bytes"] is None
            else memory[name]["temp_bytes"] / x_bytes,
            **memory[name],
        }
    return out


def numpy_headline(shape=(100, 500), repeats=200, seed=0):
    """The seed's printout in NumPy: CS231n staged backward vs the closed form (float64)."""
    rng = np.random.default_rng(seed)
    n, d = shape
    x = 5 * rng.standard_normal(shape) + 12
    gamma, beta, dout = rng.standard_normal(d), rng.standard_normal(d), rng.standard_normal(shape)
    eps = 1e-5
    mu = x.mean(0)
    xmu = x - mu
    var = (xmu**2).mean(0)
    sqrtvar = np.sqrt(var + eps)
    ivar = 1 / sqrtvar
    xhat = xmu * ivar
    del beta

    def staged():
        dbeta = np.sum(dout, axis=0)
        dgamma = np.sum(dout * xhat, axis=0)
        dxhat = dout * gamma
        divar = np.sum(dxhat * xmu, axis=0)
        dxmu1 = dxhat * ivar
        dsqrtvar = -1.0 / (sqrtvar**2) * divar
        dvar = 0.5 * 1.0 / np.sqrt(var + eps) * dsqrtvar
        dsq = 1.0 / n * np.ones((n, d)) * dvar
        dxmu2 = 2 * xmu * dsq
        dx1 = dxmu1 + dxmu2
        dmu = -1 * np.sum(dxmu1 + dxmu2, axis=0)
        dx2 = 1.0 / n * np.ones((n, d)) * dmu
        return dx1 + dx2, dgamma, dbeta

    def closed():
        dbeta = dout.sum(0)
        dgamma = (dout * xhat).sum(0)
        dxhat = dout * gamma
        dx = ivar / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
        return dx, dgamma, dbeta

    a, b = staged(), closed()
    times = {"staged": [], "closed": []}
    for r in range(repeats):
        for name, fn in ((("staged", staged), ("closed", closed))[:: 1 if r % 2 else -1]):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": list(shape),
        "dx_difference": float(np.max(np.abs(a[0] - b[0]))),
        "dgamma_difference": float(np.max(np.abs(a[1] - b[1]))),
        "dbeta_difference": float(np.max(np.abs(a[2] - b[2]))),
        "staged_s": med["staged"], "closed_s": med["closed"],
        "speedup": med["staged"] / med["closed"],
    }


def _load_text(load) -> str:
    return "unknown" if load is None else f"{load:.1f}"


def _load_remark(load) -> str:
    """A warning after the load average when other jobs were running (or it is unknown)."""
    if load is not None and load < 0.5:
        return ""
    return " (other jobs may have shared the machine: timings are noisier)"


def geomean(values):
    values = [v for v in values if v is not None]
    if not values:
        return float("nan")
    if min(values) <= 0:
        return 0.0
    return math.exp(sum(map(math.log, values)) / len(values))


def summarize(cases, dtype_name):
    rows = [c for c in cases if c["dtype"] == dtype_name]
    names = list(rows[0]["impls"]) if rows else []
    return {
        name: {
            "ratio_to_jaxbn": geomean(c["impls"][name]["ratio_to_jaxbn"] for c in rows),
            "passes": geomean(c["impls"][name]["passes"] for c in rows),
            "residual_x": geomean(c["impls"][name]["residual_x"] for c in rows),
            "residual_beyond_x": geomean(
                max(c["impls"][name]["residual_beyond_x"], 1e-12) for c in rows),
            "temp_x": geomean(c["impls"][name]["temp_x"] for c in rows),
        }
        for name in names
    }


def _shape_str(shape):
    return "x".join(map(str, shape))


def sections(result) -> dict[str, dict]:
    """family -> its part of ``result``: ``cases``, ``summary`` and ``counts``.

    Batch norm's are the result's own keys (as in results.json files written
    before RMS norm was measured); another family's are under its name, if measured.
    """
    from benchmarks.impls import FAMILIES

    return {"batch_norm": result, **{f: result[f] for f in FAMILIES if f in result}}


def _summary_lines(section, labels, level) -> list[str]:
    lines = []
    for dtype_name, summary in section["summary"].items():
        lines += [
            f"{level} Summary, {dtype_name} (geometric mean over "
            f"{section['counts'][dtype_name]} shapes)",
            "",
            "| implementation | time / jaxbn | elementwise passes | residuals / x | "
            "residuals beyond x / x | temp / x |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, s in summary.items():
            lines.append(
                f"| {labels[name]} | {s['ratio_to_jaxbn']:.2f} | {s['passes']:.2f} | "
                f"{s['residual_x']:.3f} | {s['residual_beyond_x']:.3f} | {s['temp_x']:.2f} |"
            )
        lines.append("")
    return lines


def _per_shape_lines(section, level) -> list[str]:
    lines = []
    names = list(section["cases"][0]["impls"])
    for dtype_name in section["summary"]:
        lines += [
            f"{level} Per shape, {dtype_name}",
            "",
            "| shape | elements | jaxbn ms | jaxbn passes | "
            + " | ".join(f"{n} / jaxbn" for n in names if n != "jaxbn")
            + " | repeats |",
            "|---|---:|---:|---:|" + "---:|" * (len(names) - 1) + "---:|",
        ]
        for c in section["cases"]:
            if c["dtype"] != dtype_name:
                continue
            j = c["impls"]["jaxbn"]
            lines.append(
                f"| {_shape_str(c['shape'])} | {c['elements']} | {j['median_s'] * 1e3:.3f} | "
                f"{j['passes']:.2f} | "
                + " | ".join(f"{c['impls'][n]['ratio_to_jaxbn']:.2f}" for n in names
                             if n != "jaxbn")
                + f" | {c['repeats']} |"
            )
        lines.append("")
    return lines


def _memory_lines(section, labels, level) -> list[str]:
    lines = [
        f"{level} Memory per implementation (largest shape of each dtype)", "",
        "| dtype | shape | implementation | residuals / x | residuals beyond x / x | "
        "temp / x |", "|---|---|---|---:|---:|---:|",
    ]
    for dtype_name in section["summary"]:
        rows = [c for c in section["cases"] if c["dtype"] == dtype_name]
        c = max(rows, key=lambda c: c["elements"])
        for n, i in c["impls"].items():
            lines.append(f"| {dtype_name} | {_shape_str(c['shape'])} | {labels[n]} | "
                         f"{i['residual_x']:.4f} | {i['residual_beyond_x']:.4f} | "
                         f"{i['temp_x']:.2f} |")
    return lines + [""]


def machine_lines(result) -> list[str]:
    """The report's notes, date, command, machine and versions of a run's ``result``."""
    m = result["machine"]
    v = m["versions"]
    return [f"- note: {note}" for note in result.get("notes", [])] + [
        f"- date: {m['date_utc']}; command: `{result['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, backend {m['backend']} "
        f"({len(m['devices'])} device); 1-min load average at start "
        f"{_load_text(m['load_average_1min_at_start'])}"
        f"{_load_remark(m['load_average_1min_at_start'])}",
        f"- versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, "
        f"numpy {v['numpy']}, flax {v['flax']}",
    ]


def write_markdown(result, path: Path, plots: dict, models: dict | None = None):
    """Writes the report of the layer benchmark's ``result``, and the "Models" section of
    ``python -m benchmarks models``' result (:mod:`benchmarks.models`) if given."""
    from benchmarks.impls import FAMILIES, RMS_EPS

    labels = FAMILIES["batch_norm"].labels
    lines = ["# jaxbn benchmark results", ""]
    if result.get("title_note"):
        lines += [f"**{result['title_note']}**", ""]
    lines += machine_lines(result)
    lines += [
        "- method: forward+backward (`jax.vjp`, output and all three gradients returned) "
        "under `jax.jit`, compiled and warmed up, then all implementations and the "
        "bandwidth reference called round-robin (rotating who goes first), median per "
        "implementation; every ratio is against jaxbn measured in the same round-robin.",
        "- *passes*: time / time of one fused elementwise pass `a*b + a` over arrays of "
        "the input's shape and dtype (reads two, writes one). *residuals*: bytes the VJP "
        "closure keeps for the backward pass / bytes of x (jaxbn's 1.0x is x itself, "
        "which the caller holds anyway). *temp*: XLA's compiled temp buffer "
        "(`memory_analysis().temp_size_in_bytes`) / bytes of x.",
        "",
    ]
    lines += _summary_lines(result, labels, "##")
    if "targets" in result:
        lines += ["## Targets (float32, geometric means)", "", "| target | measured | met |",
                  "|---|---:|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['measured']:.3f} | "
                         f"{'yes' if t['met'] else 'no'} |")
        lines.append("")
    lines += _per_shape_lines(result, "##") + _memory_lines(result, labels, "##")
    for family, section in sections(result).items():
        if family == "batch_norm":
            continue
        f = FAMILIES[family]
        lines += [
            f"## {f.title}",
            "",
            f"`jaxbn.{family}` with a scale only (`beta=None`), eps {RMS_EPS:g}, over the last "
            "axis of each example, against the other implementations in the same "
            f"round-robin: *time / jaxbn* is relative to `jaxbn.{family}`; passes, "
            "residuals and temp as above.",
            "",
            *_summary_lines(section, f.labels, "###"),
            *_per_shape_lines(section, "###"),
            *_memory_lines(section, f.labels, "###"),
        ]
    h = result["numpy_headline"]
    lines += [
        "## The seed's headline in NumPy (float64, CS231n staged vs closed-form backward)",
        "",
        f"shape {_shape_str(h['shape'])}: dx difference: {h['dx_difference']:.1e}, "
        f"dgamma difference: {h['dgamma_difference']:.1e}, dbeta difference: "
        f"{h['dbeta_difference']:.1e}, speedup: {h['speedup']:.2f}x "
        f"(staged {h['staged_s'] * 1e6:.0f} us, closed form {h['closed_s'] * 1e6:.0f} us; "
        "the seed blog saw 2.99x)",
        "",
        "## Plots",
        "",
    ]
    for title, file in plots.items():
        lines.append(f"![{title}]({file})")
    if models is not None:
        from benchmarks.models import section_lines

        lines += [""] + section_lines(models)
    path.write_text("\n".join(lines) + "\n")


PASS_EXPLAINED = (
    "elementwise pass = time of one fused x*dy + x over arrays of x's shape and dtype "
    "(reads two arrays, writes one): the memory-bandwidth yardstick"
)


def _finish(fig, result, title: str, path: Path, bottom: float = 0.0) -> None:
    """Titles the figure, with the result's title note (if any) in red beneath,
    lays it out above ``bottom`` (a figure fraction) and saves it to ``path``."""
    import matplotlib.pyplot as plt

    height = fig.get_figheight()
    fig.suptitle(title, fontsize=13, fontweight="bold", y=1 - 0.12 / height, va="top")
    used = 0.4  # inches taken by the titles
    note = result.get("title_note")
    if note:
        fig.text(0.5, 1 - 0.42 / height, note, ha="center", va="top", fontsize=12,
                 color="firebrick", fontweight="bold")
        used = 0.65
    fig.tight_layout(rect=(0, bottom, 1, 1 - used / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_shapes(ax, cases, value, color, marker, label, linestyle="-") -> None:
    """``value(case)`` against elements: (N, D) shapes as a line with filled markers,
    NHWC shapes as hollow markers (a conv shape can have as many elements as another)."""
    nd = [c for c in cases if len(c["shape"]) == 2]
    conv = [c for c in cases if len(c["shape"]) != 2]
    ax.plot([c["elements"] for c in nd], [value(c) for c in nd], color=color, marker=marker,
            linestyle=linestyle, label=label)
    ax.plot([c["elements"] for c in conv], [value(c) for c in conv], color=color,
            marker=marker, mfc="none", linestyle="none", markersize=8)


def _plot_time_vs_size(result, section, family, title: str, path: Path) -> None:
    """Time per call and ratio to jaxbn against elements, one column per dtype, for one
    family's ``section`` of ``result``."""
    import matplotlib.pyplot as plt

    from benchmarks.impls import FAMILIES

    labels = FAMILIES[family].labels
    dtypes = list(section["summary"])
    names = list(section["cases"][0]["impls"])
    markers = dict(zip(names, "osD^v"))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    fig, axes = plt.subplots(2, len(dtypes), figsize=(7 * len(dtypes), 9.5), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [3, 2]})
    for col, dtype_name in enumerate(dtypes):
        rows = sorted((c for c in section["cases"] if c["dtype"] == dtype_name),
                      key=lambda c: c["elements"])
        time_ax, ratio_ax = axes[0][col], axes[1][col]
        for n in names:
            for ax, value in ((time_ax, lambda c, n=n: c["impls"][n]["median_s"] * 1e3),
                              (ratio_ax, lambda c, n=n: c["impls"][n]["ratio_to_jaxbn"])):
                _plot_shapes(ax, rows, value, colors[n], markers[n], labels[n])
        _plot_shapes(time_ax, rows, lambda c: c["pass_s"] * 1e3, "k", "x",
                     "one elementwise pass (x*dy + x)", linestyle="--")
        time_ax.plot([], [], "o", color="gray", mfc="none",
                     label=f"hollow markers: {FAMILIES[family].other_shapes}")
        time_ax.set_yscale("log")
        time_ax.set_ylabel("forward+backward time (ms, log scale)")
        time_ax.set_title(f"{dtype_name}: time per call (lower is better)")
        time_ax.legend(fontsize=9)
        ratio_ax.set_ylabel("time / jaxbn's time")
        ratio_ax.set_title(f"{dtype_name}: time relative to jaxbn, per shape (lower is better)")
        ratio_ax.set_xlabel("elements in x (log scale)")
        for ax in (time_ax, ratio_ax):
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
    _finish(fig, result, title, path)


def make_plots(result, out_dir: Path, suffix: str) -> dict:
    """Writes ``time_vs_size{suffix}.png`` and ``ratios{suffix}.png`` (batch norm), and
    ``{family}_time_vs_size{suffix}.png`` for each other family measured; returns title -> file.

    Returns ``{}`` (and draws nothing) without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    from benchmarks.impls import FAMILIES

    labels = FAMILIES["batch_norm"].labels
    dtypes = list(result["summary"])
    names = list(result["cases"][0]["impls"])
    machine = f"{result['machine']['cores']}-core {result['machine']['backend'].upper()}"
    files = {}
    for family, section in sections(result).items():
        title = FAMILIES[family].title
        key, file = (("time vs size", f"time_vs_size{suffix}.png") if family == "batch_norm"
                     else (f"{title} time vs size", f"{family}_time_vs_size{suffix}.png"))
        files[key] = file
        _plot_time_vs_size(result, section, family,
                           f"{title} forward+backward under jax.jit, {machine}", out_dir / file)

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    width = 0.8 / len(dtypes)
    for k, dtype_name in enumerate(dtypes):
        s = result["summary"][dtype_name]
        pos = np.arange(len(names)) + (k - (len(dtypes) - 1) / 2) * width
        for ax, key in zip(axes, ("ratio_to_jaxbn", "passes")):
            bars = ax.bar(pos, [s[n][key] for n in names], width, label=dtype_name)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
    counts = ", ".join(f"{result['counts'][d]} {d}" for d in dtypes)
    titles = ("Time relative to jaxbn (lower is better)",
              "Elementwise passes (lower is better)")
    ylabels = ("forward+backward time / jaxbn's time", "time / one elementwise pass")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title)
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels([labels[n].replace(" (", "\n(").replace(" of ", "\nof ")
                            for n in names], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[1].axhline(3.0, color="firebrick", ls="--", lw=1, label="target for jaxbn: <= 3.0")
    for ax in axes:
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
        ax.legend(fontsize=9, loc="upper center", ncol=3)
    fig.text(0.5, 0.01, PASS_EXPLAINED, ha="center", va="bottom", fontsize=9)
    files["ratios"] = f"ratios{suffix}.png"
    _finish(fig, result, f"Geometric means over shapes ({counts}), {machine}",
            out_dir / files["ratios"], bottom=0.04)
    return files


def targets(summary) -> list:
    s = summary.get("float32")
    if not s:
        return []
    out = []
    if "autodiff" in s:
        r = s["autodiff"]["ratio_to_jaxbn"]
        out.append({"target": ">= 3x faster than autodiff of the naive forward",
                    "measured": r, "met": r >= 3})
    if "flax" in s:
        r = s["flax"]["ratio_to_jaxbn"]
        out.append({"target": ">= 1.5x faster than Flax BatchNorm", "measured": r,
                    "met": r >= 1.5})
    p = s["jaxbn"]["passes"]
    out.append({"target": "<= 3.0 elementwise passes", "measured": p, "met": p <= 3.0})
    m = s["jaxbn"]["residual_x"]
    out.append({"target": "residual memory <= 1.0x the input", "measured": m,
                "met": m <= 1.0 + 1e-9})
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``python -m benchmarks``, with ``--out`` resolved.

    ``--out`` defaults to :data:`RESULTS_DIR`, or with ``--quick`` to the
    git-ignored :data:`QUICK_DIR`, so a smoke test leaves the tracked results alone.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Speed and memory of jaxbn vs staged, autodiff and Flax batch norm, "
        "and of jaxbn.rms_norm vs autodiff and Flax RMS norm.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes and a short time budget (smoke test, ~1 minute)")
    parser.add_argument("--dtype", action="append", choices=("float32", "bfloat16"),
                        help="repeatable; default: float32 and bfloat16")
    parser.add_argument("--budget", type=positive_float, default=None,
                        help="seconds of timed calls per shape and dtype (default 8, quick 1)")
    parser.add_argument("--no-flax", action="store_true", help="leave Flax out")
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"results directory (default: {RESULTS_DIR.relative_to(ROOT)}, with --quick the "
        f"git-ignored {QUICK_DIR.relative_to(ROOT)})")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: redraw RESULTS.md and the plots from results.json")
    parser.add_argument(
        "--title-note", default=None, metavar="TEXT",
        help="a line shown under the plot titles and the report's heading, e.g. 'before "
        "optimization'; stored in results.json (with --render too), so later renders keep it")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_DIR if args.quick else RESULTS_DIR
    return args


def choose_implementations(include_flax: bool) -> tuple[dict, list[str]]:
    """family -> the forward functions to measure, and notes for the report on what is
    left out."""
    from benchmarks.impls import FAMILIES, forward_functions

    fns = {family: forward_functions(include_flax, family) for family in FAMILIES}
    missing = include_flax and any("flax" not in f for f in fns.values())
    return fns, [FLAX_MISSING] if missing else []


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def render(out: Path, suffix: str, title_note: str | None = None) -> None:
    """RESULTS.md (and the plots) again from ``out``'s results.json, with the "Models"
    section from models.json if it is there; ``title_note`` is stored into results.json
    first. Without results.json (no layer run yet) the report is the Models section alone.
    """
    json_path = out / f"results{suffix}.json"
    result, models = _load(json_path), _load(out / f"models{suffix}.json")
    if result is None:
        from benchmarks.models import section_lines

        lines = ["# jaxbn benchmark results", "", *section_lines(models)]
        (out / f"RESULTS{suffix}.md").write_text("\n".join(lines) + "\n")
        return
    if title_note is not None:
        result["title_note"] = title_note
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    plots = make_plots(result, out, suffix)
    write_markdown(result, out / f"RESULTS{suffix}.md", plots, models)


def main(argv=None) -> int:
    args = parse_args(argv)
    suffix = "-quick" if args.quick else ""
    if args.render:
        render(args.out, suffix, args.title_note)
        return 0

    dtypes = args.dtype or ["float32", "bfloat16"]
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 8.0)
    fns, notes = choose_implementations(include_flax=not args.no_flax)
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    from benchmarks.impls import FAMILIES, check_agreement

    for family, family_fns in fns.items():
        check_agreement(family_fns, shift=FAMILIES[family].shift)
    args.out.mkdir(parents=True, exist_ok=True)

    result = {"command": ("python -m benchmarks " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])).strip(),
              "machine": _machine(), "notes": notes}
    if args.title_note is not None:
        result["title_note"] = args.title_note
    start = time.perf_counter()
    for family, family_fns in fns.items():
        # batch norm's section is the result itself (see sections())
        section = result if family == "batch_norm" else result.setdefault(family, {})
        section["cases"] = []
        for dtype_name in dtypes:
            for shape in SHAPES[family][args.quick]:
                case = bench_case(shape, dtype_name, family_fns, budget, 7, 300,
                                  shift=FAMILIES[family].shift)
                section["cases"].append(case)
                ratios = "  ".join(f"{n} {i['ratio_to_jaxbn']:.2f}x"
                                   for n, i in case["impls"].items() if n != "jaxbn")
                j = case["impls"]["jaxbn"]
                print(f"{family:10s} {dtype_name:9s} {_shape_str(shape):>14s}  jaxbn "
                      f"{j['median_s'] * 1e3:9.3f} ms = {j['passes']:5.2f} passes  | {ratios}  "
                      f"(n={case['repeats']})", flush=True)
        section["summary"] = {d: summarize(section["cases"], d) for d in dtypes}
        section["counts"] = {d: sum(c["dtype"] == d for c in section["cases"]) for d in dtypes}
    result["targets"] = targets(result["summary"])
    result["numpy_headline"] = numpy_headline()
    result["elapsed_s"] = time.perf_counter() - start
    plots = make_plots(result, args.out, suffix)
    (args.out / f"results{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / f"RESULTS{suffix}.md", plots,
                   _load(args.out / f"models{suffix}.json"))
    h = result["numpy_headline"]
    print(f"numpy {_shape_str(h['shape'])}: dx difference: {h['dx_difference']:.1e}, "
          f"dgamma difference: {h['dgamma_difference']:.1e}, dbeta difference: "
          f"{h['dbeta_difference']:.1e}, speedup: {h['speedup']:.2f}x")
    for family, section in sections(result).items():
        for d, s in section["summary"].items():
            print(f"geomean {family} {d}: " + "  ".join(
                f"{n}: {v['ratio_to_jaxbn']:.2f}x time, {v['passes']:.2f} passes, "
                f"residuals {v['residual_x']:.2f}x" for n, v in s.items()))
    for t in result["targets"]:
        print(f"target {t['target']}: {t['measured']:.2f} -> {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {args.out}/RESULTS{suffix}.md in {result['elapsed_s']:.0f} s")
    return 0
