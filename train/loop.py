"""The training loop: one jitted train step, epochs, evaluation, checkpoints, resume.

The whole train step (forward, loss, gradient, optax update, running-stat
update) is one :func:`jax.jit`. State is a :class:`TrainState` pytree; nothing
is hidden in objects. The network is the MLP of :mod:`train.model` or the CNN of
:mod:`train.cnn` (``TrainConfig.model``); both are pure ``apply(params, stats, x)``
functions to the loop (see :func:`network`).

Determinism: parameters come from ``jax.random.key(seed)`` and the data order
of epoch ``e`` is :func:`train.data.epoch_order` ``(seed, e)``, so a run is a
pure function of its settings, and a run resumed from an epoch checkpoint
replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import _io, progress
from train.data import Dataset, epoch_order
from train.model import apply, init_mlp

Array = jax.Array

CHECKPOINT_NAME = "checkpoint.npz"
FINAL_STATE_NAME = "final_state.npz"
OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (``out``/``quiet`` only where it goes)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"  # "mlp" or "cnn"
    hidden: tuple[int, ...] = (256, 256)  # mlp: hidden layer widths; () for the cnn
    widths: tuple[int, ...] = ()  # cnn: channels of each stage; () for the mlp
    blocks: int = 0  # cnn: residual blocks per stage; 0 for the mlp
    norm: str = "jaxbn"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    bn_momentum: float = 0.9
    seed: int = 0
    split_seed: int = 0
    init_scale: float | None = None  # None: He init
    train_subset: int | None = None
    test_subset: int | None = None
    devices: int = 1
    checkpoint_every: int = 0  # epochs; 0: no checkpoints
    resume: bool = False
    out: str | None = None
    quiet: bool = False

    # settings that must match for --resume to continue a checkpoint
    RESUME_KEYS = ("dataset", "model", "hidden", "widths", "blocks", "norm", "batch_size", "lr", "optimizer", "bn_momentum",
                   "seed", "split_seed", "init_scale", "train_subset", "test_subset")

    def settings(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"], d["widths"] = list(self.hidden), list(self.widths)
        return d


class TrainState(NamedTuple):
    params: Any  # MLPParams, or the CNN's nnx.Param state
    stats: Any  # MLPStats, or the CNN's nnx.BatchStat state
    opt_state: Any  # optax state of the optimizer, a pytree of arrays
    step: Array  # () int32, optimizer steps taken


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed with these settings."""


class Interrupted(Exception):
    """Ctrl-C stopped a run; ``checkpoint`` holds ``epoch`` (None, 0: no epoch completed)."""

    def __init__(self, checkpoint: str | None, epoch: int):
        self.checkpoint, self.epoch = checkpoint, epoch
        super().__init__(
            f"interrupted; the checkpoint of epoch {epoch} is in {checkpoint}" if checkpoint
            else "interrupted before the first epoch completed; no checkpoint was written")


class RunResult(NamedTuple):
    state: TrainState
    history: list[dict[str, float]]  # one dict per epoch, from epoch 1
    wall_time_s: float  # this process, including compilation
    resumed_from_epoch: int  # 0 for a fresh run


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(lr)
    if name == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}; expected one of {OPTIMIZERS}.")


def network(cfg: TrainConfig, ds: Dataset):
    """The network ``net`` that the functions below take: the MLP's norm name (a str), or
    a :class:`train.cnn.CNN` for ``model="cnn"`` (images ``(N, H, W, C)``). Hashable, so
    the jitted functions are cached on it."""
    if cfg.model == "mlp":
        return cfg.norm
    if cfg.model == "cnn":
        from train.cnn import CNN

        return CNN(ds.x_train.shape[-1], ds.num_classes, widths=cfg.widths, blocks=cfg.blocks,
                   norm=cfg.norm, momentum=cfg.bn_momentum)
    raise ValueError(f"Unknown model {cfg.model!r}; expected 'mlp' or 'cnn'.")


def apply_net(net, params, stats, x, *, train: bool, momentum: float = 0.9):
    """``(logits, new_stats)`` of :func:`network` ``net`` (the CNN has its momentum)."""
    if isinstance(net, str):
        return apply(params, stats, x, norm=net, train=train, momentum=momentum)
    return net.apply(params, stats, x, train=train)


def loss_fn(params, stats, x, y, *, net, momentum):
    logits, new_stats = apply_net(net, params, stats, x, train=True, momentum=momentum)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_stats


def train_step(state: TrainState, x: Array, y: Array, *, net, optimizer, momentum: float):
    """One optimizer step; returns ``(new_state, loss)``. Pure; jitted by :func:`step_fn`."""
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.stats, x, y, net=net, momentum=momentum
    )
    # optax's Adam bias correction mixes a Python float with its int32 step count,
    # which fails under jax_numpy_dtype_promotion="strict" (set by some test suites).
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, new_stats, opt_state, state.step + 1), loss


def check_devices(devices: int) -> int:
    """ValueError unless JAX sees at least ``devices`` devices; returns how many it sees."""
    available = jax.device_count()
    if devices > available:
        raise ValueError(
            f"--devices {devices} but JAX sees {available} device(s) "
            f"({jax.default_backend()}). On CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before starting Python."
        )
    return available


def batch_sharding(devices: int):
    """``(replicated, batch)`` NamedShardings over a 1-d ``'batch'`` mesh of ``devices`` devices.

    The mesh takes the first ``devices`` of :func:`jax.devices`, i.e. of all
    processes after :func:`jax.distributed.initialize` (multi-host), where it
    must span every device.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    available = check_devices(devices)
    if jax.process_count() > 1 and devices != available:
        raise ValueError(f"With {jax.process_count()} processes, --devices must be all "
                         f"{available} devices, got {devices}.")
    mesh = jax.make_mesh((devices,), ("batch",), devices=jax.devices()[:devices])
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))


def to_global(tree, sharding):
    """Places host values on ``sharding``; each process fills only its own devices' shards.

    Every process holds the same full values (same data, same seed), so this is
    correct with one process and with many (:func:`jax.make_array_from_callback`
    asks only for the shards of addressable devices).
    """
    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def is_main_process() -> bool:
    """Process 0 writes files and prints; the others only compute."""
    return jax.process_index() == 0


@functools.lru_cache(maxsize=64)
def step_fn(net, optimizer: str, lr: float, momentum: float, devices: int = 1):
    """The jitted train step (cached, so sweeps over seeds/scales compile once).

    With ``devices > 1`` the batch is split over a ``'batch'`` mesh axis and
    the state is replicated; XLA inserts the all-reduces, so batch-norm
    statistics and gradients are those of the whole global batch.
    """
    f = functools.partial(train_step, net=net, optimizer=make_optimizer(optimizer, lr),
                          momentum=momentum)
    if devices == 1:
        return jax.jit(f)
    rep, batch = batch_sharding(devices)
    return jax.jit(f, in_shardings=(rep, batch, batch), out_shardings=(rep, rep))


@functools.lru_cache(maxsize=16)
def predict_fn(net):
    """Jitted eval-mode logits: batch norm with the running statistics."""
    return jax.jit(lambda params, stats, x: apply_net(net, params, stats, x, train=False)[0])


@functools.lru_cache(maxsize=64)
def predict_train_mode_fn(net, batch_size: int):
    """Jitted train-mode logits: each chunk of ``batch_size`` rows uses its own batch statistics.

    Takes ``x`` of shape ``(chunks, batch_size, ...)``; the chunks are ``vmap``-ed,
    so statistics are per chunk, as during training.
    """
    def f(params, stats, x):
        return jax.vmap(lambda xb: apply_net(net, params, stats, xb, train=True)[0])(x)

    return jax.jit(f)


def accuracy(params, stats, x, y, *, net, chunk: int = 4096) -> float:
    predict = predict_fn(net)
    correct = 0
    for i in range(0, len(y), chunk):
        logits = predict(params, stats, x[i:i + chunk])
        correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == y[i:i + chunk]))
    return correct / max(len(y), 1)


def train_mode_accuracy(params, stats, x, y, *, net, batch_size: int) -> float:
    """Accuracy when test batches of ``batch_size`` are normalized with their own statistics.

    Every example is counted: the test set is cut into batches of
    ``min(batch_size, N)``; a remainder of ``r >= 2`` examples is its own
    (smaller) batch, a single leftover example is normalized together with the
    ``batch_size - 1`` examples before it.
    """
    n = len(y)
    b = min(batch_size, n)
    full = (n // b) * b
    preds = []
    if full:
        logits = predict_train_mode_fn(net, b)(params, stats, x[:full].reshape(-1, b, *x.shape[1:]))
        preds.append(np.asarray(jnp.argmax(logits, -1)).reshape(-1))
    r = n - full
    if r >= 2:
        logits = predict_train_mode_fn(net, r)(params, stats, x[None, full:])
        preds.append(np.asarray(jnp.argmax(logits, -1)).reshape(-1))
    elif r == 1:
        logits = predict_train_mode_fn(net, b)(params, stats, x[None, n - b:])
        preds.append(np.asarray(jnp.argmax(logits, -1)).reshape(-1)[-1:])
    return float(np.mean(np.concatenate(preds) == y))


def init_state(cfg: TrainConfig, ds: Dataset) -> TrainState:
    key = jax.random.key(cfg.seed)
    if cfg.model == "mlp":
        sizes = (ds.x_train.shape[1], *cfg.hidden, ds.num_classes)
        params, stats = init_mlp(key, sizes, norm=cfg.norm, init_scale=cfg.init_scale)
    else:
        params, stats = network(cfg, ds).init(key)
    opt_state = make_optimizer(cfg.optimizer, cfg.lr).init(params)
    return TrainState(params, stats, opt_state, jnp.zeros((), jnp.int32))


# --- checkpoints -------------------------------------------------------------------------

def save_checkpoint(path: str, state: TrainState, *, epoch: int, cfg: TrainConfig,
                    history: list[dict]) -> None:
    """Saves the state's leaves and the resume metadata to one ``.npz``, atomically.

    The data-order state is ``(seed, next epoch)``: see :func:`epoch_order`.
    """
    leaves = jax.tree.leaves(state)
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    meta = {
        "epochs_done": epoch,
        "step": int(state.step),
        "data_order": {"seed": cfg.seed, "next_epoch": epoch,
                       "rule": "numpy.random.default_rng([seed, epoch]).permutation(n)"},
        "settings": cfg.settings(),
        "history": history,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    _io.write_npz(path, arrays)


def load_checkpoint(path: str, template: TrainState, cfg: TrainConfig):
    """Returns ``(state, epochs_done, history)``; CheckpointError if it does not fit ``cfg``."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        leaves = [z[f"leaf_{i:05d}"] for i in range(sum(k.startswith("leaf_") for k in z.files))]
    saved = {**TrainConfig().settings(), **meta["settings"]}  # older files lack new fields
    now = cfg.settings()
    diff = {k: (saved.get(k), now[k]) for k in TrainConfig.RESUME_KEYS if saved.get(k) != now[k]}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"Checkpoint {path} was written with other settings ({details}). "
                              "Resume with the same settings or use another --out.")
    t_leaves, treedef = jax.tree.flatten(template)
    if len(leaves) != len(t_leaves) or any(
        a.shape != np.shape(b) or a.dtype != np.asarray(b).dtype for a, b in zip(leaves, t_leaves)
    ):
        raise CheckpointError(f"Checkpoint {path} does not match the model's parameter shapes.")
    state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves])
    return state, int(meta["epochs_done"]), list(meta["history"])


# --- the loop ----------------------------------------------------------------------------

def run(cfg: TrainConfig, ds: Dataset, *, verbose: bool = True,
        init: TrainState | None = None) -> RunResult:
    """Trains ``cfg`` on ``ds``; writes checkpoints to ``cfg.out`` if asked.

    ``init`` replaces the seeded initial state (``compare`` uses it to measure
    how far a one-ulp perturbation of the initial parameters drifts).

    Raises:
      Diverged: the loss became NaN/inf; the last good checkpoint (if any) is kept.
      CheckpointError: ``--resume`` with a checkpoint from other settings.
      Interrupted: Ctrl-C (KeyboardInterrupt) with ``cfg.out`` set; the checkpoint of the
        last completed epoch has been written first. Without ``cfg.out`` the
        KeyboardInterrupt itself propagates.
    """
    t0 = time.perf_counter()
    _check_settings(cfg, len(ds.y_train))
    ckpt = os.path.join(cfg.out, CHECKPOINT_NAME) if cfg.out else None
    state = init_state(cfg, ds) if init is None else init
    state, start, history = _resume(cfg, state, ckpt, verbose=verbose)
    saved = start or None  # epoch of the checkpoint on disk that belongs to this run, if any
    net = network(cfg, ds)
    step = step_fn(net, cfg.optimizer, cfg.lr, cfg.bn_momentum, cfg.devices)
    state, put, host = _placement(cfg, state)
    verbose = verbose and is_main_process()
    done = (state, start)  # the state after the last completed epoch, and that epoch
    try:
        with ctrl_c_stops():
            for epoch in range(start, cfg.epochs):
                started = time.perf_counter()
                state, losses = _train_epoch(step, state, ds, cfg, epoch, put,
                                             verbose=verbose)
                _check_finite(losses, epoch, ckpt, saved)
                history.append(_evaluate(state, losses, ds, net, epoch, host, started=started))
                done = (state, epoch + 1)
                if verbose:
                    _log_epoch(history[-1], cfg.epochs)
                if ckpt and cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:
                    if is_main_process():
                        save_checkpoint(ckpt, state, epoch=epoch + 1, cfg=cfg, history=history)
                    saved = epoch + 1
                stop_if_pressed()
    except KeyboardInterrupt:
        if ckpt is None:
            raise
        raise _save_interrupted(ckpt, *done, cfg=cfg, history=history, saved=saved) from None
    return RunResult(state, history, time.perf_counter() - t0, start)


def _check_settings(cfg: TrainConfig, n: int) -> None:
    """ValueError unless the batch size fits ``n`` training examples and the devices."""
    if cfg.batch_size < 2 or cfg.batch_size > n:
        raise ValueError(f"Expected 2 <= batch size <= {n} (training examples), "
                         f"got {cfg.batch_size}.")
    check_devices(cfg.devices)
    if cfg.batch_size % cfg.devices:
        raise ValueError(f"Batch size {cfg.batch_size} must be divisible by --devices "
                         f"{cfg.devices}.")


def _resume(cfg: TrainConfig, state: TrainState, ckpt: str | None, *, verbose: bool):
    """``(state, epochs done, history)``: from ``ckpt`` with ``cfg.resume``, else fresh."""
    if not (cfg.resume and ckpt and os.path.exists(ckpt)):
        if cfg.resume and verbose and is_main_process():
            print(f"--resume: no checkpoint at {ckpt}; starting from scratch", flush=True)
        return state, 0, []
    state, start, history = load_checkpoint(ckpt, state, cfg)
    if start > cfg.epochs:
        raise CheckpointError(f"Checkpoint {ckpt} is already at epoch {start}, past "
                              f"--epochs {cfg.epochs}.")
    if verbose and is_main_process():
        print(f"resuming from {ckpt} after epoch {start} (step {int(state.step)})", flush=True)
    return state, start, history


def _placement(cfg: TrainConfig, state: TrainState):
    """``(state, put, host)``: the state on its devices, how to place a batch, how to read
    the state back. One device: as they are; several: replicated state, split batch."""
    if cfg.devices == 1:
        return state, (lambda a: a), (lambda tree: tree)
    rep, batch = batch_sharding(cfg.devices)
    # replicated arrays: every process reads its local copy with jax.device_get
    return to_global(state, rep), (lambda a: to_global(a, batch)), jax.device_get


def _train_epoch(step, state: TrainState, ds: Dataset, cfg: TrainConfig, epoch: int, put,
                 *, verbose: bool) -> tuple[TrainState, np.ndarray]:
    """The steps of one epoch (the incomplete last batch dropped); ``(state, losses)``.
    KeyboardInterrupt after a step if Ctrl-C was pressed."""
    order = epoch_order(cfg.seed, epoch, len(ds.y_train))
    losses = []
    with progress.bar(len(order) // cfg.batch_size, f"epoch {epoch + 1}/{cfg.epochs}",
                      quiet=cfg.quiet or not verbose) as bar:
        for i in range(len(order) // cfg.batch_size):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            state, loss = step(state, put(ds.x_train[idx]), put(ds.y_train[idx]))
            losses.append(loss)
            bar.update()
            stop_if_pressed()
    return state, np.array([np.asarray(v) for v in jax.device_get(losses)])


def _check_finite(losses: np.ndarray, epoch: int, ckpt: str | None, saved: int | None) -> None:
    """Diverged (naming the checkpoint on disk, if any) unless every loss is finite."""
    if np.all(np.isfinite(losses)):
        return
    bad = int(np.argmax(~np.isfinite(losses)))
    kept = (f"the last good checkpoint {ckpt} (epoch {saved}) is kept" if saved is not None
            else "no checkpoint was written")
    raise Diverged(f"training diverged: loss is {losses[bad]} at epoch {epoch + 1}, step "
                   f"{epoch * len(losses) + bad + 1}; {kept}. Try a smaller --lr.")


def _evaluate(state: TrainState, losses: np.ndarray, ds: Dataset, net, epoch: int, host,
              *, started: float) -> dict[str, float]:
    """The epoch's history record: eval-mode accuracies, seconds since ``started``."""
    params, stats = host((state.params, state.stats))
    return {
        "epoch": epoch + 1,
        "train_loss": float(losses.mean()),
        "train_accuracy": accuracy(params, stats, ds.x_train, ds.y_train, net=net),
        "test_accuracy": accuracy(params, stats, ds.x_test, ds.y_test, net=net),
        "epoch_time_s": time.perf_counter() - started,
    }


def _log_epoch(rec: dict[str, float], epochs: int) -> None:
    progress.log(f"epoch {rec['epoch']:3d}/{epochs}  loss {rec['train_loss']:.4f}  "
                 f"train acc {100 * rec['train_accuracy']:6.2f}%  "
                 f"test acc {100 * rec['test_accuracy']:6.2f}%  ({rec['epoch_time_s']:.2f} s)")


_CTRL_C = threading.Event()  # set by the first Ctrl-C within ctrl_c_stops()


def _on_sigint(signum, frame):
    if _CTRL_C.is_set():
        raise KeyboardInterrupt  # the second Ctrl-C: at once
    _CTRL_C.set()


@contextlib.contextmanager
def ctrl_c_stops():
    """Within: the first Ctrl-C (SIGINT) only sets a flag, and :func:`stop_if_pressed` raises
    KeyboardInterrupt where the code calls it (the loop: after every step and epoch), never
    wherever Python happens to be (inside jax's compiler or a jax callback, where it is lost
    or leaves jax unable to shut down cleanly). A second Ctrl-C raises at once. Nested uses
    share the flag; a SIGINT that is ignored (nohup, a background job) is left alone."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    _CTRL_C.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _CTRL_C.clear()


def stop_if_pressed() -> None:
    """KeyboardInterrupt if Ctrl-C was pressed within :func:`ctrl_c_stops`."""
    if _CTRL_C.is_set():
        raise KeyboardInterrupt


def _save_interrupted(ckpt: str, state: TrainState, epoch: int, *, cfg: TrainConfig,
                      history: list[dict], saved: int | None) -> Interrupted:
    """Writes the checkpoint of the last completed ``epoch`` unless it is on disk already
    (a second Ctrl-C cannot cut the write short); returns the Interrupted to raise."""
    if epoch == 0:
        return Interrupted(None, 0)
    if saved != epoch and is_main_process():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            save_checkpoint(ckpt, state, epoch=epoch, cfg=cfg, history=history[:epoch])
        finally:
            signal.signal(signal.SIGINT, previous)
    return Interrupted(ckpt, epoch)


def save_final_state(path: str, state: TrainState) -> None:
    """Final params and running stats (leaves in ``jax.tree.leaves`` order), atomically."""
    leaves = jax.tree.leaves((state.params, state.stats))
    _io.write_npz(path, {f"leaf_{i:05d}": np.asarray(a) for i, a in enumerate(leaves)})


def versions() -> dict[str, str]:
    import platform

    import jaxlib
    import sklearn

    import jaxbn

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "jaxbn": jaxbn.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
    }
