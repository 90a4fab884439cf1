"""Command line: ``python -m train [COMMAND] [options]``.

Commands (bare ``python -m train`` is ``train``):

* ``train``       train the MLP once; metrics.json, curves.png, checkpoints.
* ``compare``     the same run with the three batch-norm gradients (jaxbn, autodiff, staged).
* ``init-scale``  CS231n: deep net, weight-init scale sweep, with vs without batch norm.
* ``batch-size``  batch-size sweep; train-mode vs eval-mode (running stats) accuracy.

Exit status: 0 success, 1 training diverged (NaN/inf loss), 2 bad arguments or data,
3 compare found the implementations disagree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

COMMANDS = {
    "train": "train the MLP once (the default command)",
    "compare": "train the same net from the same seed with the jaxbn, autodiff and staged "
               "batch-norm gradients; compare parameters, losses and step times",
    "init-scale": "CS231n experiment: 5 hidden layers of 100, sweep the weight-init scale, "
                  "with and without batch norm",
    "batch-size": "sweep the batch size; train-mode vs eval-mode (running statistics) "
                  "test accuracy",
}

EPILOG = """\
examples:
  python -m train                                # default: digits, 64-256-256-10, 20 epochs
  python -m train --norm none --epochs 30 --out runs/nobn
  python -m train --checkpoint-every 1 --out runs/a; python -m train --resume --out runs/a
  python -m train compare
  python -m train init-scale
  python -m train batch-size
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m train --devices 8
  srun python -m train --distributed --devices all      # multi-host, e.g. under SLURM
  python -m train --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --epochs 10

Every command writes metrics.json and PNG plots into --out (default runs/<command>,
runs/latest for train). Exit status: 0 ok, 1 diverged (NaN/inf loss), 2 bad arguments/data,
3 compare: the implementations disagree beyond the float32 tolerances.
"""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def _nonnegative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _devices(s: str) -> int | str:
    if s == "all":
        return s
    try:
        return _positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'all', got {s!r}") from None


def _common(p: argparse.ArgumentParser, *, epochs: int, hidden: list[int], norm: bool = True):
    from train.data import DATASETS
    from train.loop import OPTIMIZERS
    from train.model import NORM_HELP, NORMS

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: sklearn's bundled UCI digits (default); cifar10: the python "
                        "pickles in --data-dir")
    g.add_argument("--data-dir", default=None,
                   help="CIFAR-10 directory with data_batch_1..5 and test_batch")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the stratified digits train/test split (default 0)")
    g.add_argument("--train-subset", type=_positive_int, default=None,
                   help="use only N training examples (quick runs)")
    g.add_argument("--test-subset", type=_positive_int, default=None,
                   help="use only N test examples (quick runs)")
    g = p.add_argument_group("model and optimization")
    if norm:
        g.add_argument("--norm", choices=NORMS, default="jaxbn",
                       help="batch-norm implementation: "
                            + "; ".join(f"{k}: {v}" for k, v in NORM_HELP.items()))
    g.add_argument("--hidden", type=_positive_int, nargs="+", default=hidden,
                   help=f"hidden layer widths (default {' '.join(map(str, hidden))})")
    g.add_argument("--epochs", type=_positive_int, default=epochs,
                   help=f"epochs (default {epochs})")
    g.add_argument("--batch-size", type=_positive_int, default=64,
                   help="batch size (default 64; the incomplete last batch is dropped)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam (default) or sgd with momentum 0.9")
    g.add_argument("--bn-momentum", type=float, default=0.9,
                   help="running = m * running + (1 - m) * batch (default 0.9)")
    g.add_argument("--seed", type=int, default=0, help="init and data-order seed (default 0)")
    g.add_argument("--devices", type=_devices, default=1,
                   help="data-parallel over N devices, or 'all' (jit + NamedSharding: batch "
                        "split over a 'batch' mesh axis, state replicated, batch-norm "
                        "statistics over the whole global batch). Default 1")
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first; on SLURM, Open MPI, "
                        "Kubernetes or Cloud TPU it finds the cluster itself, else give the "
                        "three options below. Use with --devices all; process 0 writes --out")
    g.add_argument("--coordinator", default=None,
                   help="coordinator address host:port (default: $JAX_COORDINATOR_ADDRESS or "
                        "auto-detected)")
    g.add_argument("--num-processes", type=_positive_int, default=None,
                   help="number of processes (default: auto-detected)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's id, 0..N-1 (default: auto-detected)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default runs/<command>; "
                                               "runs/latest for train)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train an MLP with jaxbn batch norm on UCI digits (or CIFAR-10). "
                    "Without a command, runs 'train'. The command comes first; "
                    "'python -m train COMMAND --help' lists its options.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                title="commands (default: train)")
    p = sub.add_parser("train", help=COMMANDS["train"], description=COMMANDS["train"] + ".")
    _common(p, epochs=20, hidden=[256, 256])
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=_nonnegative_int, default=0, metavar="K",
                   help="save --out/checkpoint.npz every K EPOCHS (params, running stats, "
                        "optimizer state, step, data-order state), atomically; 0 = never")
    g.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.npz (same settings; --epochs may grow); "
                        "starts from scratch if there is none")
    p.add_argument("--init-scale", type=float, default=None,
                   help="std of a plain normal weight init (default: He init)")
    p.add_argument("--debug-epoch-sleep", type=float, default=0.0, help=argparse.SUPPRESS)

    p = sub.add_parser("compare", help=COMMANDS["compare"], description=COMMANDS["compare"] + ".")
    _common(p, epochs=10, hidden=[256, 256], norm=False)
    p.add_argument("--timing-steps", type=_positive_int, default=200,
                   help="timed steps per implementation after warm-up (default 200)")
    p.add_argument("--timing-batch-size", type=_positive_int, default=None,
                   help="batch size of the timed steps (default: --batch-size)")

    p = sub.add_parser("init-scale", help=COMMANDS["init-scale"],
                       description=COMMANDS["init-scale"] + ".")
    _common(p, epochs=10, hidden=[100] * 5, norm=False)
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="init scales (default: 10 points log-spaced over 1e-4..1e1)")

    p = sub.add_parser("batch-size", help=COMMANDS["batch-size"],
                       description=COMMANDS["batch-size"] + ".")
    _common(p, epochs=10, hidden=[256, 256], norm=False)
    p.add_argument("--batch-sizes", type=_positive_int, nargs="+",
                   default=[4, 8, 16, 32, 64, 128, 256, 512],
                   help="batch sizes (default 4 8 16 32 64 128 256 512)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the runs without batch norm")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    args = build_parser().parse_args(argv)
    if args.out is None:
        args.out = os.path.join("runs", "latest" if args.command == "train" else args.command)
    return args


def config_from_args(args: argparse.Namespace, **overrides):
    import jax

    from train.loop import TrainConfig

    if args.devices == "all":
        args.devices = jax.device_count()
    cfg = TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, hidden=tuple(args.hidden),
        norm=getattr(args, "norm", "jaxbn"), epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, optimizer=args.optimizer, bn_momentum=args.bn_momentum, seed=args.seed,
        split_seed=args.split_seed, init_scale=getattr(args, "init_scale", None),
        train_subset=args.train_subset, test_subset=args.test_subset, devices=args.devices,
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        resume=getattr(args, "resume", False), out=args.out, quiet=args.quiet,
        debug_epoch_sleep=getattr(args, "debug_epoch_sleep", 0.0),
    )
    return cfg.__class__(**{**cfg.__dict__, **overrides})


def load_data(args: argparse.Namespace):
    from train import data

    ds = data.load(args.dataset, data_dir=args.data_dir, split_seed=args.split_seed)
    return data.subset(ds, train=args.train_subset, test=args.test_subset, seed=args.split_seed)


def cmd_train(args: argparse.Namespace) -> int:
    from train import loop, plots
    from train._io import write_results

    t0 = time.perf_counter()
    ds = load_data(args)
    cfg = config_from_args(args)
    if not loop.is_main_process():  # multi-host: every process trains, process 0 reports
        loop.run(cfg, ds)
        return 0
    print(f"train: {ds.name} ({len(ds.y_train)} train / {len(ds.y_test)} test, "
          f"{ds.x_train.shape[1]} features), MLP {ds.x_train.shape[1]}-"
          f"{'-'.join(map(str, cfg.hidden))}-{ds.num_classes}, norm={cfg.norm}, "
          f"{cfg.optimizer} lr={cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs, "
          f"seed {cfg.seed}, devices {cfg.devices} -> {cfg.out}", flush=True)
    res = loop.run(cfg, ds)
    os.makedirs(cfg.out, exist_ok=True)
    loop.save_final_state(os.path.join(cfg.out, loop.FINAL_STATE_NAME), res.state)
    hist = res.history
    metrics = {
        "command": "train",
        "test_accuracy": hist[-1]["test_accuracy"],
        "train_accuracy": hist[-1]["train_accuracy"],
        "final_train_loss": hist[-1]["train_loss"],
        "train_loss": [h["train_loss"] for h in hist],
        "train_accuracy_per_epoch": [h["train_accuracy"] for h in hist],
        "test_accuracy_per_epoch": [h["test_accuracy"] for h in hist],
        "epoch_time_s": [h["epoch_time_s"] for h in hist],
        "steps": int(res.state.step),
        "evaluation": "eval mode: batch_norm_eval with running statistics",
        "resumed_from_epoch": res.resumed_from_epoch,
        "settings": {**cfg.settings(), "num_train": len(ds.y_train),
                     "num_test": len(ds.y_test)},
        "wall_time_s": time.perf_counter() - t0,
        "train_time_s": res.wall_time_s,
        "versions": loop.versions(),
    }
    write_results(cfg.out, metrics, None if args.no_plots else lambda out: plots.training_curves(
        hist, os.path.join(out, "curves.png"),
        title=f"{ds.name}: MLP {'-'.join(map(str, cfg.hidden))}, norm={cfg.norm}, "
              f"test acc {100 * metrics['test_accuracy']:.2f}%"))
    print(f"test accuracy {100 * metrics['test_accuracy']:.2f}%  "
          f"wall time {metrics['wall_time_s']:.1f} s  -> {cfg.out}/metrics.json", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.distributed:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    from train import experiments, loop
    from train.data import DataError

    name = "cmd_" + args.command.replace("-", "_")
    command = cmd_train if args.command == "train" else getattr(experiments, name)
    if loop.is_main_process():
        # A previous run's results in --out must not pass for this run's if it fails.
        for stale in ("metrics.json", loop.FINAL_STATE_NAME):
            if os.path.exists(os.path.join(args.out, stale)):
                os.remove(os.path.join(args.out, stale))
    try:
        return command(args)
    except loop.Diverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except (DataError, loop.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
