"""End-to-end tests of `python -m train` and its subcommands, on tiny configs."""

import json
import os

import jax
import numpy as np
import pytest

from train import cli, loop
from train.model import NORMS, apply, init_mlp

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
    assert cli.parse_args(["compare"]).out == os.path.join("runs", "compare")


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
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_default_settings_reach_97_percent(tmp_path):
    out = str(tmp_path / "run")
    assert cli.main(["--quiet", "--no-plots", "--out", out]) == 0
    m = _metrics(out)
    assert m["settings"]["epochs"] == 20 and m["settings"]["hidden"] == [256, 256]
    assert m["test_accuracy"] >= 0.97, m["test_accuracy"]


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "jaxbn"])
def test_norm_choices_train(tmp_path, norm):
    out = str(tmp_path / norm)
    assert cli.main([*TINY, "--no-plots", "--norm", norm, "--out", out]) == 0
    m = _metrics(out)
    assert m["settings"]["norm"] == norm and m["test_accuracy"] > 0.5


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


def test_progress_bar_and_one_line_per_epoch(tmp_path, capsys):
    out = str(tmp_path / "bar")
    argv = [a for a in TINY if a != "--quiet"]
    assert cli.main([*argv, "--no-plots", "--out", out]) == 0
    cap = capsys.readouterr()
    assert "epoch 1/2" in cap.err and "it/s" in cap.err  # the tqdm bar
    lines = [s for s in cap.out.splitlines() if s.startswith("epoch")]
    assert len(lines) == 2 and "loss" in lines[0] and "test acc" in lines[0]
    assert cli.main([*TINY, "--no-plots", "--out", out]) == 0
    assert "it/s" not in capsys.readouterr().err  # --quiet: no bar


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


@pytest.mark.parametrize("n, batch", [(10, 4), (9, 4), (10, 5), (3, 8), (7, 2)])
def test_train_mode_accuracy_counts_every_example(n, batch):
    params, stats = init_mlp(jax.random.key(0), (5, 8, 3))
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
        np.asarray(apply(params, stats, x[rows], norm="jaxbn", train=True)[0]).argmax(-1)[keep]
        for rows, keep in groups])
    assert preds.shape == (n,)
    acc = loop.train_mode_accuracy(params, stats, x, preds, norm="jaxbn", batch_size=batch)
    assert acc == 1.0
    wrong = (preds + 1) % 3  # every label wrong: each example must be counted once
    assert loop.train_mode_accuracy(params, stats, x, wrong, norm="jaxbn", batch_size=batch) == 0
