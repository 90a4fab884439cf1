"""Matplotlib (Agg) figures: PNGs written next to metrics.json, atomically."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train import _io  # noqa: E402


def _save(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    _io.atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def training_curves(history: list[dict], path: str, *, title: str) -> str:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train loss")
    ax1.set_yscale("log")
    ax1.set(xlabel="epoch", ylabel="cross-entropy (mean over epoch's batches)",
            title="Training loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", ms=3,
             label="train (running stats)")
    ax2.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", ms=3,
             label="test (running stats)")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy (eval mode)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


# Distinct line styles and hollow markers, so curves that lie on top of each other stay
# visible as such.
STYLES = [dict(ls="-", marker="o", lw=3, ms=8, alpha=0.5), dict(ls="--", marker="s", lw=1.5, ms=6),
          dict(ls=":", marker="^", lw=1.5, ms=5)]


def _legend_below(ax, ncol: int) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=ncol, frameon=False)


def compare_plot(results: dict, path: str, *, title: str) -> str:
    names = list(results["losses"])
    losses = [results["losses"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for name, curve, style in zip(names, losses, STYLES):
        axes[0].plot(range(1, len(curve) + 1), curve, label=name, mfc="none", **style)
    apart = max(max(v) - min(v) for v in zip(*losses))
    coincide = (f"\nthe {len(names)} curves coincide to within {apart:.1e}"
                if apart <= results["loss_tolerance"] else "")
    axes[0].set_yscale("log")
    axes[0].set(xlabel="epoch", ylabel="train loss", title="Train loss per epoch" + coincide)
    _legend_below(axes[0], len(names))
    for name, style in zip(names[1:], STYLES[1:]):
        d = [max(abs(v), 1e-12) for v in results["loss_diff"][name]]
        axes[1].plot(range(1, len(d) + 1), d, label=f"|{name} - {names[0]}|", mfc="none",
                     **style)
    axes[1].axhline(results["roundoff_floor"]["max_loss_abs_diff"], color="gray", ls=":",
                    lw=1, label="round-off floor (1-ulp init)")
    axes[1].axhline(results["loss_tolerance"], color="k", ls="--", lw=1, label="tolerance")
    axes[1].set_yscale("log")
    axes[1].set(xlabel="epoch", ylabel="|loss difference|",
                title=f"Loss difference vs {names[0]}")
    _legend_below(axes[1], 2)
    _step_time_bars(axes[2], names, results)
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _step_time_bars(ax, names: list[str], results: dict) -> None:
    """Median step times with their run-to-run spread; labelled as noise, not as a ranking,
    when no two medians differ by more than the spread."""
    times = [1e3 * results["step_time_s"][n] for n in names]
    spread = [1e3 * results["step_time_spread_s"][n] for n in names]
    noise = results["step_time_within_noise"]
    ax.bar(names, times, yerr=[s / 2 for s in spread], capsize=6,
           color="0.7" if noise else ["C0", "C1", "C2"][:len(names)])
    top = max(t + s / 2 for t, s in zip(times, spread))
    for i, (t, s) in enumerate(zip(times, spread)):
        label = (f"{t:.3f} \u00b1 {s / 2:.3f}" if noise
                 else f"{t:.3f} ({t / times[0]:.2f}x)")
        ax.text(i, t + s / 2 + 0.03 * top, label, ha="center", va="bottom")
    ax.set_ylim(0, 1.3 * top)
    ax.set(xlabel="backward implementation",
           ylabel="ms per train step (median; bar: spread of rounds)",
           title="Train step time: differences within noise,\nnot a ranking" if noise
           else "Train step time")


def init_scale_plot(scales, rows: dict, path: str, *, title: str) -> str:
    """``rows[label] = {"train_accuracy": [...], "test_accuracy": [...], "final_loss": [...]}``."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    keys = [("train_accuracy", "final train accuracy (%)"),
            ("test_accuracy", "final test accuracy (%)"),
            ("final_loss", "final train loss")]
    for ax, (key, label) in zip(axes, keys):
        for i, (name, r) in enumerate(rows.items()):
            vals = [100 * v if "accuracy" in key else v for v in r[key]]
            ax.plot(scales, vals, "os"[i % 2] + "-", label=name)
        ax.set_xscale("log")
        if key == "final_loss":
            ax.set_yscale("log")
        else:
            ax.axhline(10, color="gray", ls=":", lw=1, label="chance")
        ax.set(xlabel="weight init scale (std of normal init)", ylabel=label, title=label)
        _legend_below(ax, 3)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def batch_size_plot(sizes, rows: dict, path: str, *, title: str) -> str:
    """``rows`` has lists over ``sizes``: test_accuracy_eval, test_accuracy_train_mode, ..."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    ax1.plot(sizes, [100 * v for v in rows["test_accuracy_eval"]], "o-",
             label="BN, eval mode (running stats)")
    ax1.plot(sizes, [100 * v for v in rows["test_accuracy_train_mode"]], "s--",
             label="BN, train mode (test-batch stats)")
    if "test_accuracy_none" in rows:
        ax1.plot(sizes, [100 * v for v in rows["test_accuracy_none"]], "^:",
                 label="no BN")
    ax1.set_xscale("log", base=2)
    ax1.set(xlabel="batch size", ylabel="final test accuracy (%)",
            title="Test accuracy vs batch size")
    _legend_below(ax1, 2)
    ax1.grid(alpha=0.3)
    ax2.plot(sizes, rows["final_loss"], "o-", label="BN (train mode, batch stats)")
    if "final_loss_none" in rows:
        ax2.plot(sizes, rows["final_loss_none"], "^:", label="no BN")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set(xlabel="batch size", ylabel="last epoch's mean minibatch loss",
            title="Final train loss")
    _legend_below(ax2, 2)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
