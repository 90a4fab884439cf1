"""The ``train`` and ``cnn`` commands, and what every command takes from the parsed arguments:
its :class:`~train.loop.TrainConfig` and its data set.

:mod:`train.cli` parses the command line and calls ``cmd_<command>(args)`` from
here or from :mod:`train.experiments`; neither imports :mod:`train.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax

from train import data, loop, plots
from train._io import write_results


def config_from_args(args: argparse.Namespace, **overrides) -> loop.TrainConfig:
    """The run's settings from the parsed arguments (``args`` is not changed);
    ``overrides`` replace fields, e.g. ``out=None`` for a run that writes nothing."""
    cnn = args.command == "cnn"
    cfg = loop.TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, model="cnn" if cnn else "mlp",
        hidden=() if cnn else tuple(args.hidden), widths=tuple(args.widths) if cnn else (),
        blocks=args.blocks if cnn else 0, norm=getattr(args, "norm", "jaxbn"),
        epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, optimizer=args.optimizer, bn_momentum=args.bn_momentum, seed=args.seed,
        split_seed=args.split_seed, init_scale=getattr(args, "init_scale", None),
        train_subset=args.train_subset, test_subset=args.test_subset,
        devices=jax.device_count() if args.devices == "all" else args.devices,
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        resume=getattr(args, "resume", False), out=args.out, quiet=args.quiet,
    )
    return dataclasses.replace(cfg, **overrides)


def load_data(args: argparse.Namespace) -> data.Dataset:
    ds = data.load(args.dataset, data_dir=args.data_dir, split_seed=args.split_seed)
    return data.subset(ds, train=args.train_subset, test=args.test_subset, seed=args.split_seed)


def report(args: argparse.Namespace, metrics: dict, plot, headline: str = "") -> None:
    """Writes ``metrics.json`` and, unless ``--no-plots``, ``plot(out)`` into ``--out``;
    prints ``headline``, the wall time and where the metrics are."""
    write_results(args.out, metrics, None if args.no_plots else plot)
    print(f"{headline}wall time {metrics['wall_time_s']:.1f} s -> "
          f"{os.path.join(args.out, 'metrics.json')}", flush=True)


def remove_stale_results(out: str) -> None:
    """Removes a previous run's results from ``out``, so they cannot pass for this run's
    if it fails (process 0 only; the checkpoint stays for ``--resume``)."""
    if not loop.is_main_process():
        return
    for stale in ("metrics.json", loop.FINAL_STATE_NAME):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))


def cmd_train(args: argparse.Namespace) -> int:
    ds = load_data(args)
    cfg = config_from_args(args)
    model = f"MLP {ds.x_train.shape[1]}-{'-'.join(map(str, cfg.hidden))}-{ds.num_classes}"
    return train_and_report(args, cfg, ds, describe=f"{ds.x_train.shape[1]} features), {model}",
                            title=f"MLP {'-'.join(map(str, cfg.hidden))}")


def cmd_cnn(args: argparse.Namespace) -> int:
    try:
        import flax  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError("python -m train cnn needs flax (the NNX model): "
                         "pip install -e '.[train,flax]'") from None
    ds = data.as_images(load_data(args))
    cfg = config_from_args(args)
    model = (f"CNN widths {'-'.join(map(str, cfg.widths))}, {cfg.blocks} residual block(s) "
             "per stage")
    return train_and_report(args, cfg, ds, describe=f"{'x'.join(map(str, ds.x_train.shape[1:]))}"
                            f" images), {model}", title=model)


def train_and_report(args: argparse.Namespace, cfg: loop.TrainConfig, ds: data.Dataset, *,
                     describe: str, title: str) -> int:
    """Trains ``cfg`` (printing ``describe``, the data shape and the model); writes the final
    state, metrics.json and curves.png (titled ``title``) into ``--out``."""
    t0 = time.perf_counter()
    if not loop.is_main_process():  # multi-host: every process trains, process 0 reports
        loop.run(cfg, ds)
        return 0
    print(f"{args.command}: {ds.name} ({len(ds.y_train)} train / {len(ds.y_test)} test, "
          f"{describe}, norm={cfg.norm}, {cfg.optimizer} lr={cfg.lr}, batch {cfg.batch_size}, "
          f"{cfg.epochs} epochs, seed {cfg.seed}, devices {cfg.devices} -> {cfg.out}",
          flush=True)
    res = loop.run(cfg, ds)
    os.makedirs(cfg.out, exist_ok=True)
    loop.save_final_state(os.path.join(cfg.out, loop.FINAL_STATE_NAME), res.state)
    hist = res.history
    metrics = {
        "command": args.command,
        "test_accuracy": hist[-1]["test_accuracy"],
        "train_accuracy": hist[-1]["train_accuracy"],
        "final_train_loss": hist[-1]["train_loss"],
        "train_loss": [h["train_loss"] for h in hist],
        "train_accuracy_per_epoch": [h["train_accuracy"] for h in hist],
        "test_accuracy_per_epoch": [h["test_accuracy"] for h in hist],
        "epoch_time_s": [h["epoch_time_s"] for h in hist],
        "steps": int(res.state.step),
        "parameters": sum(int(a.size) for a in jax.tree.leaves(res.state.params)),
        "evaluation": "eval mode: batch norm with the running statistics",
        "resumed_from_epoch": res.resumed_from_epoch,
        "settings": {**cfg.settings(), "num_train": len(ds.y_train),
                     "num_test": len(ds.y_test)},
        "wall_time_s": time.perf_counter() - t0,
        "train_time_s": res.wall_time_s,
        "versions": loop.versions(),
    }
    report(args, metrics, lambda out: plots.training_curves(
        hist, os.path.join(out, "curves.png"),
        title=f"{ds.name}: {title}, norm={cfg.norm}, "
              f"test acc {100 * metrics['test_accuracy']:.2f}%"),
        headline=f"test accuracy {100 * metrics['test_accuracy']:.2f}%  ")
    return 0
