"""Command line: ``python -m train [COMMAND] [options]``.

Commands (bare ``python -m train`` is ``train``):

* ``train``       train the MLP once; metrics.json, curves.png, checkpoints.
* ``cnn``         the same for a small ResNet-style CNN (Flax NNX, jaxbn's or Flax's BatchNorm).
* ``compare``     the same run with the three batch-norm gradients (jaxbn, autodiff, staged).
* ``init-scale``  CS231n: deep net, weight-init scale sweep, with vs without batch norm.
* ``batch-size``  batch-size sweep; train-mode vs eval-mode (running stats) accuracy.

Argument parsing and dispatch only: the commands live in :mod:`train.commands`
and :mod:`train.experiments`, which do not import this module.

Exit status: 0 success, 1 training diverged (NaN/inf loss), 2 bad arguments or data,
3 compare found the implementations disagree, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from benchmarks.common import checked_number, nonnegative_int, positive_float, positive_int
from train import commands, experiments, loop
from train.data import DATASETS, DataError
from train.model import NORM_HELP

CNN_NORM_HELP = {  # the names of train.cnn.NORMS (not imported here: it needs flax)
    "jaxbn": "jaxbn.nnx.BatchNorm (the default)",
    "flax": "flax.nnx.BatchNorm: the identical model and initialization",
    "none": "no normalization (convolutions with biases)",
}

PROG = "python -m train"

COMMANDS = {
    "train": "train the MLP once (the default command)",
    "cnn": "train a small ResNet-style CNN (Flax NNX) on the digits as 8x8x1 images, with "
           "jaxbn's BatchNorm or, for comparison, Flax's",
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
  python -m train --out runs/a; python -m train --resume --out runs/a   # after Ctrl-C
  python -m train cnn                            # ResNet-style CNN, jaxbn.nnx.BatchNorm
  python -m train cnn --norm flax --out runs/cnn-flax   # the same model, flax.nnx.BatchNorm
  python -m train compare
  python -m train init-scale
  python -m train batch-size
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m train --devices 8
  srun python -m train --distributed --devices all      # multi-host, e.g. under SLURM
  python -m train --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --epochs 10

Every command writes metrics.json and PNG plots into --out (default runs/<command>,
runs/latest for train). Ctrl-C writes the checkpoint of the last completed epoch and
prints the command that resumes. Exit status: 0 ok, 1 diverged (NaN/inf loss), 2 bad
arguments/data, 3 compare: the implementations disagree beyond the float32 tolerances,
130 interrupted.
"""

_momentum = checked_number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _devices(s: str) -> int | str:
    if s == "all":
        return s
    try:
        return positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'all', got {s!r}") from None


def _common(p: argparse.ArgumentParser, *, command: str, epochs: int,
            hidden: list[int] | None, norms: dict[str, str] | None = NORM_HELP):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: sklearn's bundled UCI digits (default); cifar10: the python "
                        "pickles in --data-dir")
    g.add_argument("--data-dir", default=None,
                   help="CIFAR-10 directory with data_batch_1..5 and test_batch (only with "
                        "--dataset cifar10)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the stratified digits train/test split (default 0)")
    g.add_argument("--train-subset", type=positive_int, default=None,
                   help="use only N training examples (quick runs)")
    g.add_argument("--test-subset", type=positive_int, default=None,
                   help="use only N test examples (quick runs)")
    g = p.add_argument_group("model and optimization")
    if norms:
        g.add_argument("--norm", choices=list(norms), default="jaxbn",
                       help="batch-norm implementation: "
                            + "; ".join(f"{k}: {v}" for k, v in norms.items()))
    if hidden:
        g.add_argument("--hidden", type=positive_int, nargs="+", default=hidden,
                       help=f"hidden layer widths (default {' '.join(map(str, hidden))})")
    g.add_argument("--epochs", type=positive_int, default=epochs,
                   help=f"epochs (default {epochs})")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="batch size (default 64; the incomplete last batch is dropped)")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--optimizer", choices=loop.OPTIMIZERS, default="adam",
                   help="adam (default) or sgd with momentum 0.9")
    g.add_argument("--bn-momentum", type=_momentum, default=0.9,
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
    g.add_argument("--num-processes", type=positive_int, default=None,
                   help="number of processes (default: auto-detected)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's id, 0..N-1 (default: auto-detected)")
    g = p.add_argument_group("output")
    out = os.path.join("runs", "latest" if command == "train" else command)
    g.add_argument("--out", default=out, help=f"output directory (default {out})")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")


def _command(sub, name: str, **common) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name] + ".")
    _common(p, command=name, **common)
    return p


def _checkpoints(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=nonnegative_int, default=1, metavar="K",
                   help="save --out/checkpoint.npz every K EPOCHS (params, running stats, "
                        "optimizer state, step, data-order state), atomically; 0 = only on "
                        "Ctrl-C. Default 1")
    g.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.npz (same settings; --epochs may grow); "
                        "starts from scratch if there is none")


CNN_EPOCHS, CNN_WIDTHS, CNN_BLOCKS = 15, [16, 32, 64], 1


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train an MLP with jaxbn batch norm on UCI digits (or CIFAR-10). "
                    "Without a command, runs 'train'. The command comes first; "
                    "'python -m train COMMAND --help' lists its options.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                title="commands (default: train)")
    p = _command(sub, "train", epochs=20, hidden=[256, 256])
    _checkpoints(p)
    p.add_argument("--init-scale", type=positive_float, default=None,
                   help="std of a plain normal weight init (default: He init)")

    p = _command(sub, "cnn", epochs=CNN_EPOCHS, hidden=None, norms=CNN_NORM_HELP)
    g = p.add_argument_group("CNN architecture")
    g.add_argument("--widths", type=positive_int, nargs="+", default=CNN_WIDTHS,
                   help="channels of each stage; every stage after the first halves the "
                        f"resolution (default {' '.join(map(str, CNN_WIDTHS))})")
    g.add_argument("--blocks", type=positive_int, default=CNN_BLOCKS,
                   help=f"basic residual blocks per stage (default {CNN_BLOCKS})")
    _checkpoints(p)

    p = _command(sub, "compare", epochs=10, hidden=[256, 256], norms=None)
    p.add_argument("--timing-steps", type=positive_int, default=200,
                   help="timed steps per implementation, in 3 rounds that each start "
                        "with 5 warm-up steps (default 200)")
    p.add_argument("--timing-batch-size", type=positive_int, default=None,
                   help="batch size of the timed steps (default: --batch-size)")

    p = _command(sub, "init-scale", epochs=10, hidden=[100] * 5, norms=None)
    p.add_argument("--scales", type=positive_float, nargs="+", default=None,
                   help="init scales (default: 10 points log-spaced over 1e-4..1e1)")

    p = _command(sub, "batch-size", epochs=10, hidden=[256, 256], norms=None)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+",
                   default=[4, 8, 16, 32, 64, 128, 256, 512],
                   help="batch sizes (default 4 8 16 32 64 128 256 512)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the runs without batch norm")
    return parser, sub.choices


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses ``[COMMAND] [options]`` (no command: ``train``). An unknown option is reported
    with the usage of the command it was given to; a command after options is refused with
    the command line that works."""
    parser, command_parsers = build_parser()
    named = bool(argv) and (argv[0] in COMMANDS or argv[0] in ("-h", "--help"))
    args, extra = parser.parse_known_args(argv if named else ["train", *argv])
    if not extra:
        return args
    p = command_parsers[args.command]
    late = [a for a in extra if a in COMMANDS]
    if late and not named:
        rest = list(argv)
        rest.remove(late[0])
        p.error(f"the command comes first: {PROG} {shlex.join([late[0], *rest])} "
                f"(got {late[0]!r} after the options)")
    p.error(f"unrecognized arguments: {' '.join(extra)}")


def resume_command(argv: list[str]) -> str:
    """The user's command line with ``--resume`` added (once)."""
    return f"{PROG} {shlex.join(argv if '--resume' in argv else [*argv, '--resume'])}"


COMMAND_FUNCTIONS = {
    "train": commands.cmd_train,
    "cnn": commands.cmd_cnn,
    "compare": experiments.cmd_compare,
    "init-scale": experiments.cmd_init_scale,
    "batch-size": experiments.cmd_batch_size,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.distributed:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    commands.remove_stale_results(args.out)
    try:
        with loop.ctrl_c_stops():  # Ctrl-C from here on stops between train steps
            return COMMAND_FUNCTIONS[args.command](args)
    except loop.Diverged as e:
        return _fail(f"error: {e}", 1)
    except (DataError, loop.CheckpointError, ValueError) as e:
        return _fail(f"error: {e}", 2)
    except loop.Interrupted as e:
        return _fail(f"{e}\nresume with: {resume_command(argv)}" if e.checkpoint else str(e),
                     130)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, status: int) -> int:
    print(message, file=sys.stderr, flush=True)
    return status
