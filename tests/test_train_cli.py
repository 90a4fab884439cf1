"""`python -m train` and its subcommands: argument parsing, output, progress bars, plots,
and end-to-end runs on tiny configs (marked slow)."""

import functools
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from train import cli, commands, experiments, loop, plots, progress
from train.model import NORMS, apply, init_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--epochs", "2", "--train-subset", "256", "--test-subset", "120", "--quiet"]


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in text
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert "--out" in capsys.readouterr().out


def test_bare_command_is_train():
    args = cli.parse_args(["--epochs", "3"])
    assert args.command == "train" and args.epochs == 3 and args.out == os.path.join(
        "runs", "latest")
    assert args.checkpoint_every == 1  # every epoch by default: Ctrl-C loses at most one
    assert cli.parse_args(["compare"]).out == os.path.join("runs", "compare")


def test_options_before_the_command_are_refused_with_the_working_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--epochs", "1", "train"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m train train " in err
    assert "the command comes first: python -m train train --epochs 1 (got 'train'" in err
    with pytest.raises(SystemExit):
        cli.main(["--epochs", "1", "compare", "--timing-steps", "5"])
    assert ("the command comes first: python -m train compare --epochs 1 --timing-steps 5"
            in capsys.readouterr().err)


def test_unknown_option_shows_the_usage_of_its_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--norm", "none"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m train compare ")
    assert "python -m train compare: error: unrecognized arguments: --norm none" in err
    with pytest.raises(SystemExit):
        cli.main(["--no-such-flag"])
    assert "python -m train train: error: unrecognized arguments: --no-such-flag" in (
        capsys.readouterr().err)


def test_config_from_args_leaves_the_arguments_alone():
    args = cli.parse_args(["--devices", "all", "--epochs", "3"])
    before = dict(vars(args))
    cfg = commands.config_from_args(args, epochs=5, out=None)
    assert vars(args) == before  # not mutated: devices stays "all"
    assert cfg.devices == jax.device_count() and cfg.epochs == 5 and cfg.out is None
    assert cfg.checkpoint_every == 1 and cfg.hidden == (256, 256)


def test_data_dir_with_digits_is_an_error(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["--data-dir", str(tmp_path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"--data-dir {tmp_path} is only read by --dataset cifar10" in err
    assert not os.path.exists(out)


def test_resume_command_adds_resume_once():
    assert cli.resume_command(["--epochs", "5", "--out", "my runs/a"]) == (
        "python -m train --epochs 5 --out 'my runs/a' --resume")
    assert cli.resume_command(["train", "--resume", "--epochs", "5"]) == (
        "python -m train train --resume --epochs 5")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_stdout(monkeypatch):
    for stream, shown in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stdout", stream)
        with progress.bar(3, "epoch 1/1", quiet=False) as bar:
            bar.update(3)
        progress.log("epoch   1/1  loss 0.1")
        with progress.bar(3, "quiet", quiet=True) as bar:
            bar.update(3)
        text = stream.getvalue()
        assert ("epoch 1/1" in text and "\r" in text) == shown, repr(text)
        assert "quiet" not in text  # --quiet: never a bar
        if not shown:
            assert text == "epoch   1/1  loss 0.1\n"


def test_init_scale_summary_wording():
    s = [1e-3, 1e-2, 1e-1, 1.0]
    assert experiments.scales_summary(s, [False] * 4) == "test acc > 90% at none of the 4 scales"
    assert experiments.scales_summary(s, [False, True, False, False]) == (
        "test acc > 90% only at scale 0.01 (1 of 4 scales)")
    assert experiments.scales_summary(s, [False, True, True, True]) == (
        "test acc > 90% at 3 of 4 scales: 0.01..1")
    assert experiments.scales_summary(s, [True, False, True, False]) == (
        "test acc > 90% at 2 of 4 scales: 0.001, 0.1")
    assert experiments.scales_summary([0.06], [True]) == "test acc > 90% at scale 0.06"
    assert experiments.scales_summary([0.06], [False]) == (
        "test acc > 90% not reached at scale 0.06")


def test_step_times_within_noise():
    assert experiments.within_noise({"a": 1.0, "b": 1.2}, {"a": 0.3, "b": 0.1})
    assert not experiments.within_noise({"a": 1.0, "b": 1.5}, {"a": 0.3, "b": 0.1})


def _compare_results(loss_shift, spread):
    losses = {"jaxbn": [2.0, 1.0, 0.5], "autodiff": [2.0, 1.0, 0.5 + loss_shift],
              "staged": [2.0, 1.0 + loss_shift / 2, 0.5]}
    return {"losses": losses, "loss_tolerance": 1e-3,
            "loss_diff": {n: [a - b for a, b in zip(losses[n], losses["jaxbn"])]
                          for n in ("autodiff", "staged")},
            "roundoff_floor": {"max_loss_abs_diff": 1e-7},
            "step_time_s": {"jaxbn": 1e-3, "autodiff": 1.2e-3, "staged": 1.1e-3},
            "step_time_spread_s": {n: spread for n in losses},
            "step_time_within_noise": spread >= 2e-4}


def test_compare_plot_says_when_curves_coincide_and_times_are_noise(tmp_path, monkeypatch):
    titles = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: titles.append(
        [ax.get_title() for ax in fig.axes]) or real_save(fig, path))
    plots.compare_plot(_compare_results(4e-4, 3e-4), str(tmp_path / "a.png"), title="t")
    plots.compare_plot(_compare_results(0.1, 1e-5), str(tmp_path / "b.png"), title="t")
    assert "the 3 curves coincide to within 4.0e-04" in titles[0][0]
    assert "within noise" in titles[0][2] and "not a ranking" in titles[0][2]
    assert "coincide" not in titles[1][0] and "noise" not in titles[1][2]
    assert os.path.getsize(tmp_path / "a.png") > 1000


@pytest.mark.slow
def test_train_writes_metrics_contract(tmp_path):
    out = str(tmp_path / "run")
    assert cli.main([*TINY, "--out", out]) == 0
    m = _metrics(out)
    assert m["command"] == "train"
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert len(m["train_loss"]) == 2 and all(np.isfinite(m["train_loss"]))
    assert len(m["test_accuracy_per_epoch"]) == 2
    assert m["settings"]["epochs"] == 2 and m["settings"]["batch_size"] == 64
    assert m["settings"]["num_train"] == 256 and m["settings"]["norm"] == "jaxbn"
    assert m["wall_time_s"] > 0
    for k in ("jax", "optax", "numpy", "jaxbn"):
        assert m["versions"][k]
    assert m["steps"] == 2 * (256 // 64)
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    assert os.path.exists(os.path.join(out, loop.FINAL_STATE_NAME))
    with np.load(os.path.join(out, loop.CHECKPOINT_NAME)) as z:  # by default, every epoch
        assert json.loads(str(z["meta"]))["epochs_done"] == 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.slow
def test_default_settings_reach_97_percent(tmp_path):
    out = str(tmp_path / "run")
    assert cli.main(["--quiet", "--no-plots", "--out", out]) == 0
    m = _metrics(out)
    assert m["settings"]["epochs"] == 20 and m["settings"]["hidden"] == [256, 256]
    assert m["test_accuracy"] >= 0.97, m["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("norm", [n for n in NORMS if n != "jaxbn"])
def test_norm_choices_train(tmp_path, norm):
    out = str(tmp_path / norm)
    assert cli.main([*TINY, "--no-plots", "--norm", norm, "--out", out]) == 0
    m = _metrics(out)
    assert m["settings"]["norm"] == norm and m["test_accuracy"] > 0.5


@pytest.mark.slow
def test_compare_agrees(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    rc = cli.main(["compare", *TINY, "--timing-steps", "10", "--out", out])
    assert rc == 0, capsys.readouterr()
    m = _metrics(out)
    assert m["agree"] is True
    for n in ("autodiff", "staged"):
        assert m["grad_rel_diff_at_init"][n] <= m["tolerances"]["grad_rtol"]
        assert m["max_loss_abs_diff"][n] <= m["tolerances"]["loss_atol"]
        assert len(m["loss_diff"][n]) == 2
    assert set(m["step_time_s"]) == {"jaxbn", "autodiff", "staged"}
    assert all(t > 0 for t in m["step_time_s"].values())
    assert os.path.exists(os.path.join(out, "compare.png"))


@pytest.mark.slow
def test_init_scale_tiny(tmp_path):
    out = str(tmp_path / "isc")
    rc = cli.main(["init-scale", "--epochs", "1", "--train-subset", "256", "--quiet",
                   "--hidden", "32", "32", "--scales", "1e-3", "1e-1", "--out", out])
    assert rc == 0
    m = _metrics(out)
    assert m["scales"] == [1e-3, 1e-1]
    assert set(m["results"]) == {"batch norm (jaxbn)", "no batch norm"}
    for r in m["results"].values():
        assert len(r["test_accuracy"]) == 2 and len(r["final_loss"]) == 2
    assert os.path.exists(os.path.join(out, "init_scale.png"))


@pytest.mark.slow
def test_batch_size_tiny(tmp_path):
    out = str(tmp_path / "bs")
    rc = cli.main(["batch-size", "--epochs", "1", "--train-subset", "256", "--quiet",
                   "--batch-sizes", "8", "64", "--out", out])
    assert rc == 0
    m = _metrics(out)
    assert m["batch_sizes"] == [8, 64]
    r = m["results"]
    assert r["steps"] == [256 // 8, 256 // 64]
    for k in ("test_accuracy_eval", "test_accuracy_train_mode", "test_accuracy_none"):
        assert len(r[k]) == 2 and all(0 <= v <= 1 for v in r[k])
    assert os.path.exists(os.path.join(out, "batch_size.png"))


@pytest.mark.slow
def test_bar_on_a_terminal_and_clean_lines_when_piped(tmp_path, monkeypatch):
    out = str(tmp_path / "bar")
    argv = [a for a in TINY if a != "--quiet"] + ["--no-plots", "--out", out]
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert cli.main(argv) == 0
    assert "epoch 1/2" in terminal.getvalue() and "it/s" in terminal.getvalue()  # the bar
    monkeypatch.undo()
    piped = subprocess.run([sys.executable, "-m", "train", *argv], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stdout + piped.stderr and "it/s" not in piped.stdout + piped.stderr
    lines = piped.stdout.splitlines()
    assert lines[0].startswith("train: digits") and lines[-1].startswith("test accuracy")
    epochs = [s for s in lines if s.startswith("epoch")]
    assert len(epochs) == 2 and "loss" in epochs[0] and "test acc" in epochs[0]
    assert len(lines) == 4


@pytest.mark.slow
def test_no_plots(tmp_path):
    out = str(tmp_path / "np")
    assert cli.main([*TINY, "--no-plots", "--out", out]) == 0
    assert not [f for f in os.listdir(out) if f.endswith(".png")]


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "1"], "batch size"),
    (["--devices", "64"], "XLA_FLAGS"),
    (["--batch-size", "63", "--devices", "2"], "divisible"),
])
def test_bad_settings_exit_2_with_message(tmp_path, capsys, argv, message):
    out = str(tmp_path / "bad")
    assert cli.main([*TINY, *argv, "--out", out]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "metrics.json"))


@functools.cache
def _mlp():
    """The (5, 8, 3) MLP of the accuracy tests (built once, shared)."""
    return init_mlp(jax.random.key(0), (5, 8, 3))


_train_apply = jax.jit(functools.partial(apply, norm="jaxbn", train=True))


@pytest.mark.parametrize("n, batch", [(10, 4), (9, 4), (10, 5), (3, 8), (7, 2)])
def test_train_mode_accuracy_counts_every_example(n, batch):
    params, stats = _mlp()
    x = np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32)
    # The documented grouping: batches of b = min(batch, n); a remainder r >= 2 is its
    # own batch; a single leftover example is normalized with the b - 1 before it.
    b = min(batch, n)
    full = n // b * b
    groups = [(slice(i, i + b), slice(None)) for i in range(0, full, b)]
    if n - full >= 2:
        groups.append((slice(full, n), slice(None)))
    elif n - full == 1:
        groups.append((slice(n - b, n), slice(-1, None)))
    preds = np.concatenate([
        np.asarray(_train_apply(params, stats, x[rows])[0]).argmax(-1)[keep]
        for rows, keep in groups])
    assert preds.shape == (n,)
    acc = loop.train_mode_accuracy(params, stats, x, preds, net="jaxbn", batch_size=batch)
    assert acc == 1.0
    wrong = (preds + 1) % 3  # every label wrong: each example must be counted once
    assert loop.train_mode_accuracy(params, stats, x, wrong, net="jaxbn", batch_size=batch) == 0
