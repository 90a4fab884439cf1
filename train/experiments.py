"""The ``compare``, ``init-scale`` and ``batch-size`` commands.

Each writes ``metrics.json`` (atomically) and PNG plots into ``--out``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import time_interleaved
from train import loop, plots, progress
from train.commands import config_from_args, load_data, report

COMPARE_NORMS = ("jaxbn", "autodiff", "staged")

# Tolerances of `compare` (float32 round-off; eps32 = 1.19e-7):
# * first-step gradients: the three backward passes are algebraically equal and
#   differ only in summation order, so they must agree to a few hundred eps32
#   in ||a - b|| / ||b|| per leaf;
# * per-epoch mean training loss and final parameters after training: the
#   round-off differences are fed back through hundreds of Adam steps (Adam
#   divides by sqrt(v), which amplifies tiny differences in tiny gradients), so
#   they grow from ~1e-7 to ~1e-3. They must agree to 1e-3 absolute in loss and
#   2e-2 in ||a - b|| / ||b|| per parameter leaf. `compare` also reports the
#   "round-off floor": the same drift for a jaxbn run whose initial parameters
#   were moved by one float32 ulp; implementation differences of that size are
#   round-off, not gradient errors. A real gradient bug (e.g. a dropped term)
#   gives O(1e-1..1) relative gradient errors.
GRAD_RTOL = 5e-5
LOSS_ATOL = 1e-3
PARAM_RTOL = 2e-2


def _quiet_cfg(args, **kw):
    return config_from_args(args, out=None, checkpoint_every=0, resume=False, quiet=True, **kw)


def _rel_leaf_diff(a, b) -> float:
    """max over leaves of ||a - b|| / ||b|| (Frobenius)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
    return worst


def _abs_leaf_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


TIMING_ROUNDS = 3


def _time_steps(cfgs: dict, ds, *, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """``(median, spread)`` seconds per train step of each config.

    :func:`benchmarks.common.time_interleaved` (5 warm-up steps, then one step of
    each config in turn) runs ``TIMING_ROUNDS`` times with ``steps // TIMING_ROUNDS``
    steps each; ``median`` is the median of the rounds' medians and ``spread`` their
    range (max - min), the run-to-run noise of that median.
    """
    first = next(iter(cfgs.values()))
    bs = first.batch_size
    if first.devices > 1:
        rep, batch = loop.batch_sharding(first.devices)
        x, y = loop.to_global(ds.x_train[:bs], batch), loop.to_global(ds.y_train[:bs], batch)
    else:
        x, y = jnp.asarray(ds.x_train[:bs]), jnp.asarray(ds.y_train[:bs])
    states = {}

    def step_of(name, cfg):
        fn = loop.step_fn(cfg.norm, cfg.optimizer, cfg.lr, cfg.bn_momentum, cfg.devices)
        state = loop.init_state(cfg, ds)
        states[name] = loop.to_global(state, rep) if cfg.devices > 1 else state

        def step():
            states[name], loss = fn(states[name], x, y)
            return states[name], loss
        return step

    calls = {name: step_of(name, cfg) for name, cfg in cfgs.items()}
    rounds = []
    for _ in range(TIMING_ROUNDS):
        rounds.append(time_interleaved(calls, max(1, steps // TIMING_ROUNDS), warmup=5))
        loop.stop_if_pressed()
    per_name = {name: [r[name] for r in rounds] for name in cfgs}
    return ({n: float(np.median(t)) for n, t in per_name.items()},
            {n: max(t) - min(t) for n, t in per_name.items()})


def within_noise(median: dict[str, float], spread: dict[str, float]) -> bool:
    """True if no two medians differ by more than the larger of their spreads."""
    names = list(median)
    return all(abs(median[a] - median[b]) <= max(spread[a], spread[b])
               for i, a in enumerate(names) for b in names[i + 1:])


def cmd_compare(args) -> int:
    t0 = time.perf_counter()
    ds = load_data(args)
    cfgs = {n: _quiet_cfg(args, norm=n) for n in COMPARE_NORMS}
    print(f"compare: {ds.name}, MLP hidden {list(args.hidden)}, {args.epochs} epochs, batch "
          f"{args.batch_size}, seed {args.seed}: {', '.join(COMPARE_NORMS)}", flush=True)

    # 1. gradients at initialization, on the first batch of epoch 1
    cfg0 = cfgs["jaxbn"]
    state0 = loop.init_state(cfg0, ds)
    idx = loop.epoch_order(cfg0.seed, 0, len(ds.y_train))[:cfg0.batch_size]
    xb, yb = jnp.asarray(ds.x_train[idx]), jnp.asarray(ds.y_train[idx])
    grads = {}
    for n in COMPARE_NORMS:
        g = jax.jit(jax.grad(lambda p, n=n: loop.loss_fn(p, state0.stats, xb, yb, net=n,
                                                         momentum=cfg0.bn_momentum)[0]))
        grads[n] = g(state0.params)

    # 2. full training runs
    results = {}
    for n, cfg in cfgs.items():
        res = loop.run(cfg, ds, verbose=False)
        results[n] = res
        h = res.history[-1]
        print(f"  {n:9s} final loss {h['train_loss']:.6f}  test acc "
              f"{100 * h['test_accuracy']:.2f}%  ({res.wall_time_s:.1f} s)", flush=True)

    # round-off floor: jaxbn again, from initial parameters one float32 ulp away
    nudged = state0._replace(params=jax.tree.map(
        lambda p: jnp.nextafter(p, jnp.full_like(p, jnp.inf)), state0.params))
    floor = loop.run(cfgs["jaxbn"], ds, verbose=False, init=nudged)

    # 3. step times
    tb = args.timing_batch_size or args.batch_size
    if not 2 <= tb <= len(ds.y_train):
        raise ValueError(f"Expected 2 <= --timing-batch-size <= {len(ds.y_train)}, got {tb}.")
    step_time, spread = _time_steps(
        {n: dataclasses.replace(c, batch_size=tb) for n, c in cfgs.items()}, ds,
        steps=args.timing_steps)
    noise = within_noise(step_time, spread)

    ref = results["jaxbn"]
    losses = {n: [h["train_loss"] for h in r.history] for n, r in results.items()}
    out = {"grad_rel_diff_at_init": {}, "max_param_abs_diff": {}, "max_param_rel_diff": {},
           "max_stats_abs_diff": {}, "loss_diff": {}, "max_loss_abs_diff": {},
           "test_accuracy": {n: r.history[-1]["test_accuracy"] for n, r in results.items()}}
    ok = True
    ref_losses = losses["jaxbn"]
    out["roundoff_floor"] = {
        "what": "jaxbn run from initial params moved by one float32 ulp, vs jaxbn",
        "max_param_abs_diff": _abs_leaf_diff(floor.state.params, ref.state.params),
        "max_param_rel_diff": _rel_leaf_diff(floor.state.params, ref.state.params),
        "max_loss_abs_diff": max(abs(h["train_loss"] - r)
                                 for h, r in zip(floor.history, ref_losses)),
    }
    for n in COMPARE_NORMS[1:]:
        r = results[n]
        out["grad_rel_diff_at_init"][n] = _rel_leaf_diff(grads[n], grads["jaxbn"])
        out["max_param_abs_diff"][n] = _abs_leaf_diff(r.state.params, ref.state.params)
        out["max_param_rel_diff"][n] = _rel_leaf_diff(r.state.params, ref.state.params)
        out["max_stats_abs_diff"][n] = _abs_leaf_diff(r.state.stats, ref.state.stats)
        d = [a - b for a, b in zip(losses[n], losses["jaxbn"])]
        out["loss_diff"][n] = d
        out["max_loss_abs_diff"][n] = max(abs(v) for v in d)
        ok &= (out["grad_rel_diff_at_init"][n] <= GRAD_RTOL
               and out["max_loss_abs_diff"][n] <= LOSS_ATOL
               and out["max_param_rel_diff"][n] <= PARAM_RTOL)
    metrics = {
        "command": "compare",
        "agree": bool(ok),
        "tolerances": {"grad_rtol": GRAD_RTOL, "loss_atol": LOSS_ATOL, "param_rtol": PARAM_RTOL,
                       "note": "float32 round-off; see train/experiments.py"},
        **out,
        "losses": losses,
        "loss_tolerance": LOSS_ATOL,
        "step_time_s": step_time,
        "step_time_spread_s": spread,
        "step_time_within_noise": noise,
        "step_time_ratio_vs_jaxbn": {n: step_time[n] / step_time["jaxbn"] for n in step_time},
        "timing": f"{TIMING_ROUNDS} rounds of {max(1, args.timing_steps // TIMING_ROUNDS)} "
                  f"steps per implementation (batch {tb}), each after 5 warm-up steps, one step "
                  "of each in turn (benchmarks.common.time_interleaved); step_time_s: median "
                  "of the rounds' medians, step_time_spread_s: their range; "
                  "step_time_within_noise: no two medians differ by more than that range",
        "settings": {**cfg0.settings(), "norm": list(COMPARE_NORMS),
                     "timing_steps": args.timing_steps, "timing_batch_size": tb},
        "wall_time_s": time.perf_counter() - t0,
        "versions": loop.versions(),
    }
    for n in COMPARE_NORMS[1:]:
        print(f"  {n:9s} vs jaxbn: grad rel diff at init {out['grad_rel_diff_at_init'][n]:.2e} "
              f"(tol {GRAD_RTOL:g}); max |loss diff| {out['max_loss_abs_diff'][n]:.2e} "
              f"(tol {LOSS_ATOL:g}); max param diff {out['max_param_abs_diff'][n]:.2e} abs, "
              f"{out['max_param_rel_diff'][n]:.2e} rel (tol {PARAM_RTOL:g})", flush=True)
    fl = out["roundoff_floor"]
    print(f"  round-off floor (jaxbn, init moved 1 ulp): max |loss diff| "
          f"{fl['max_loss_abs_diff']:.2e}; max param diff {fl['max_param_abs_diff']:.2e} abs, "
          f"{fl['max_param_rel_diff']:.2e} rel", flush=True)
    if noise:
        print(f"  step time (median \u00b1 half the spread of {TIMING_ROUNDS} rounds, batch {tb}): "
              + ", ".join(f"{n} {1e3 * t:.3f} \u00b1 {1e3 * spread[n] / 2:.3f} ms"
                          for n, t in step_time.items())
              + ": the differences are within the noise, not a ranking", flush=True)
    else:
        print(f"  step time (median, batch {tb}): " + ", ".join(
            f"{n} {1e3 * t:.3f} ms ({t / step_time['jaxbn']:.2f}x)"
            for n, t in step_time.items()), flush=True)
    report(args, metrics, lambda out: plots.compare_plot(
        metrics, os.path.join(out, "compare.png"),
        title=f"{ds.name}: same seed, three batch-norm backward passes "
              f"({'agree' if ok else 'DISAGREE'} within float32 tolerance)"),
        headline=f"{'agree' if ok else 'DISAGREE'} within tolerance; ")
    return 0 if ok else 3


def _sweep_run(cfg, ds):
    """One sweep point; a diverged run is recorded as NaN rather than stopping the sweep."""
    try:
        res = loop.run(cfg, ds, verbose=False)
    except loop.Diverged:
        return None
    return res


def scales_summary(scales: list[float], passed: list[bool]) -> str:
    """Which of the sweep's ``scales`` reach > 90% test accuracy: none, one, a range (when
    they are consecutive points of the sweep) or a list."""
    good = [s for s, p in zip(scales, passed) if p]
    n = len(scales)
    if n == 1:
        return f"test acc > 90% {'at' if good else 'not reached at'} scale {scales[0]:.3g}"
    if not good:
        return f"test acc > 90% at none of the {n} scales"
    if len(good) == 1:
        return f"test acc > 90% only at scale {good[0]:.3g} (1 of {n} scales)"
    idx = [i for i, p in enumerate(passed) if p]
    which = (f"{good[0]:.3g}..{good[-1]:.3g}" if idx[-1] - idx[0] + 1 == len(idx)
             else ", ".join(f"{s:.3g}" for s in good))
    return f"test acc > 90% at {len(good)} of {n} scales: {which}"


def cmd_init_scale(args) -> int:
    t0 = time.perf_counter()
    ds = load_data(args)
    scales = args.scales or [float(s) for s in np.logspace(-4, 1, 10)]
    variants = {"batch norm (jaxbn)": "jaxbn", "no batch norm": "none"}
    print(f"init-scale: {ds.name}, hidden {list(args.hidden)}, {args.epochs} epochs, "
          f"{len(scales)} scales x {len(variants)} variants", flush=True)
    rows = {}
    bar = progress.bar(len(scales) * len(variants), "init-scale", quiet=args.quiet)
    for label, norm in variants.items():
        r = {"train_accuracy": [], "test_accuracy": [], "final_loss": [], "diverged": []}
        for s in scales:
            res = _sweep_run(_quiet_cfg(args, norm=norm, init_scale=s), ds)
            h = res.history[-1] if res else None
            r["train_accuracy"].append(h["train_accuracy"] if h else math.nan)
            r["test_accuracy"].append(h["test_accuracy"] if h else math.nan)
            r["final_loss"].append(h["train_loss"] if h else math.nan)
            r["diverged"].append(res is None)
            bar.update()
            msg = (f"  {label:20s} scale {s:9.3g}: " + (
                "diverged (NaN/inf loss)" if h is None else
                f"train acc {100 * h['train_accuracy']:6.2f}%  test acc "
                f"{100 * h['test_accuracy']:6.2f}%  loss {h['train_loss']:.4f}"))
            progress.log(msg)
        rows[label] = r
    bar.close()
    passed = {label: [a > 0.9 for a in r["test_accuracy"]] for label, r in rows.items()}
    good = {label: [s for s, p in zip(scales, ps) if p] for label, ps in passed.items()}
    summary = {label: scales_summary(scales, ps) for label, ps in passed.items()}
    for label, s in summary.items():
        print(f"  {label}: {s}", flush=True)
    metrics = {
        "command": "init-scale",
        "scales": scales,
        "results": rows,
        "scales_above_90pct_test": good,
        "summary": summary,
        "settings": {**_quiet_cfg(args).settings(), "norm": list(variants.values()),
                     "init": "w ~ N(0, scale^2) for every layer; biases 0"},
        "wall_time_s": time.perf_counter() - t0,
        "versions": loop.versions(),
    }
    report(args, metrics, lambda out: plots.init_scale_plot(
        scales, rows, os.path.join(out, "init_scale.png"),
        title=f"{ds.name}: {len(args.hidden)} hidden layers of "
              f"{'/'.join(map(str, sorted(set(args.hidden))))}, {args.epochs} epochs, "
              f"{args.optimizer} lr {args.lr:g}, batch {args.batch_size}"))
    return 0


def cmd_batch_size(args) -> int:
    t0 = time.perf_counter()
    ds = load_data(args)
    sizes = [b for b in args.batch_sizes if 2 <= b <= len(ds.y_train)]
    if not sizes:
        raise ValueError(f"No batch size in {args.batch_sizes} fits 2..{len(ds.y_train)}.")
    print(f"batch-size: {ds.name}, hidden {list(args.hidden)}, {args.epochs} epochs, "
          f"batch sizes {sizes}", flush=True)
    keys = ("test_accuracy_eval", "test_accuracy_train_mode", "train_accuracy_eval",
            "final_loss", "steps", "train_time_s")
    rows = {k: [] for k in keys}
    if not args.no_baseline:
        rows.update(test_accuracy_none=[], final_loss_none=[])
    bar = progress.bar(len(sizes) * (1 if args.no_baseline else 2), "batch-size",
                       quiet=args.quiet)
    for b in sizes:
        cfg = _quiet_cfg(args, norm="jaxbn", batch_size=b)
        res = _sweep_run(cfg, ds)
        bar.update()
        if res is None:
            for k in keys:
                rows[k].append(math.nan)
        else:
            h = res.history[-1]
            rows["test_accuracy_eval"].append(h["test_accuracy"])
            rows["test_accuracy_train_mode"].append(loop.train_mode_accuracy(
                res.state.params, res.state.stats, ds.x_test, ds.y_test, net="jaxbn",
                batch_size=b))
            rows["train_accuracy_eval"].append(h["train_accuracy"])
            rows["final_loss"].append(h["train_loss"])
            rows["steps"].append(int(res.state.step))
            rows["train_time_s"].append(res.wall_time_s)
        msg = f"  batch {b:4d}: " + ("BN diverged" if res is None else (
            f"BN test acc eval {100 * rows['test_accuracy_eval'][-1]:6.2f}%  train-mode "
            f"{100 * rows['test_accuracy_train_mode'][-1]:6.2f}%  loss "
            f"{rows['final_loss'][-1]:.4f}  ({rows['steps'][-1]} steps)"))
        if not args.no_baseline:
            res0 = _sweep_run(dataclasses.replace(cfg, norm="none"), ds)
            bar.update()
            h0 = res0.history[-1] if res0 else None
            rows["test_accuracy_none"].append(h0["test_accuracy"] if h0 else math.nan)
            rows["final_loss_none"].append(h0["train_loss"] if h0 else math.nan)
            msg += ("  | no BN diverged" if h0 is None else
                    f"  | no BN test acc {100 * h0['test_accuracy']:6.2f}%")
        progress.log(msg)
    bar.close()
    gap = [e - t for e, t in zip(rows["test_accuracy_eval"], rows["test_accuracy_train_mode"])]
    metrics = {
        "command": "batch-size",
        "batch_sizes": sizes,
        "results": rows,
        "eval_minus_train_mode_test_accuracy": gap,
        "notes": "fixed number of epochs and learning rate for every batch size, so small "
                 "batches take more steps; train-mode accuracy normalizes each test batch of "
                 "the same size with its own statistics (min(batch, N_test); see "
                 "train.loop.train_mode_accuracy)",
        "settings": {**_quiet_cfg(args).settings(), "batch_size": sizes},
        "wall_time_s": time.perf_counter() - t0,
        "versions": loop.versions(),
    }
    report(args, metrics, lambda out: plots.batch_size_plot(
        sizes, rows, os.path.join(out, "batch_size.png"),
        title=f"{ds.name}: MLP hidden {'-'.join(map(str, args.hidden))}, {args.epochs} "
              f"epochs for every batch size, {args.optimizer} lr {args.lr:g}"))
    return 0
