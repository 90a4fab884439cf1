"""`python -m train cnn`: the NNX ResNet with jaxbn's BatchNorm equals the one with Flax's
(initialization and train steps), and runs end to end through the shared training loop
(metrics, plots, checkpoints, resume, Ctrl-C)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL64, assert_trees_all_close, x64

from train import cli, data, loop
from train.cnn import CNN, NORMS

TINY = ["cnn", "--epochs", "2", "--train-subset", "256", "--test-subset", "120",
        "--batch-size", "32", "--widths", "8", "16", "--quiet"]


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _final(out):
    with np.load(os.path.join(out, loop.FINAL_STATE_NAME)) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def digits():
    return data.as_images(data.load("digits"))


def test_digits_as_images(digits):
    flat = data.load("digits")
    assert digits.x_train.shape == (len(flat.y_train), 8, 8, 1)
    # row-major 8x8: pixel (r, c) is feature 8 r + c
    np.testing.assert_array_equal(digits.x_train[:, 2, 5, 0], flat.x_train[:, 8 * 2 + 5])


def test_cli_knows_the_cnn_norms():
    assert set(cli.CNN_NORM_HELP) == set(NORMS)


def _steps(norm, ds, *, n, dtype):
    """Initial state and ``n`` Adam train steps of the CNN with ``norm``, on batches of 32."""
    spec = CNN(1, 10, widths=(4, 8), blocks=1, norm=norm)  # identity and projection skips
    params, stats = jax.tree.map(lambda a: a.astype(dtype), spec.init(jax.random.key(3)))
    state = loop.TrainState(params, stats, loop.make_optimizer("adam", 1e-2).init(params),
                            jnp.zeros((), jnp.int32))
    step = loop.step_fn(spec, "adam", 1e-2, 0.9)
    states, losses = [state], []
    for i in range(n):
        state, loss = step(state, jnp.asarray(ds.x_train[32 * i:32 * (i + 1)], dtype),
                           jnp.asarray(ds.y_train[32 * i:32 * (i + 1)]))
        states.append(state)
        losses.append(loss)
    logits = spec.apply(state.params, state.stats, jnp.asarray(ds.x_test[:64], dtype),
                        train=False)[0]
    return states, losses, logits


@pytest.mark.slow
@pytest.mark.parametrize("dtype, rtol", [(np.float64, RTOL64), (np.float32, 1e-4)])
def test_jaxbn_and_flax_models_initialize_and_train_identically(digits, dtype, rtol):
    # standard promotion: Flax's BatchNorm promotes float64 input with float32, which the
    # suite's strict promotion refuses
    with x64(dtype), jax.numpy_dtype_promotion("standard"):
        ours, our_losses, our_logits = _steps("jaxbn", digits, n=3, dtype=dtype)
        theirs, their_losses, their_logits = _steps("flax", digits, n=3, dtype=dtype)
        # the same rng use: every parameter and statistic is bitwise the same at init
        assert jax.tree.structure(ours[0]) == jax.tree.structure(theirs[0])
        for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(theirs[0])):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(our_losses, their_losses, rtol=rtol)
        for i, (a, b) in enumerate(zip(ours[1:], theirs[1:])):
            assert_trees_all_close(a.params, b.params, rtol, err_msg=f"params, step {i + 1}")
            assert_trees_all_close(a.stats, b.stats, rtol, err_msg=f"stats, step {i + 1}")
        assert_trees_all_close(our_logits, their_logits, rtol, err_msg="eval-mode logits")
        assert our_losses[-1] < our_losses[0]  # it trains


@pytest.mark.slow
def test_eval_mode_uses_the_running_statistics(digits):
    spec = CNN(1, 10, widths=(4,), norm="jaxbn")
    params, stats = spec.init(jax.random.key(0))
    x = jnp.asarray(digits.x_train[:16])
    _, new_stats = spec.apply(params, stats, x, train=True)
    assert not np.allclose(jax.tree.leaves(new_stats)[0], jax.tree.leaves(stats)[0])
    a, same = spec.apply(params, new_stats, x, train=False)
    b, _ = spec.apply(params, stats, x, train=False)
    assert same is new_stats and not np.allclose(a, b)


@pytest.mark.parametrize("argv, message", [
    (["cnn", "--norm", "autodiff"], "argument --norm: invalid choice: 'autodiff'"),
    (["--norm", "flax"], "argument --norm: invalid choice: 'flax'"),  # the MLP's norms
    (["cnn", "--hidden", "32"], "unrecognized arguments: --hidden 32"),
    (["cnn", "--widths", "16", "0"], "argument --widths: expected a positive integer"),
    (["cnn", "--blocks", "0"], "argument --blocks: expected a positive integer"),
])
def test_bad_cnn_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cnn") / "run")
    assert cli.main([*TINY, "--out", out]) == 0
    return out


@pytest.mark.slow
def test_cnn_run_writes_metrics_plots_and_checkpoints(uninterrupted):
    m = _metrics(uninterrupted)
    assert m["command"] == "cnn" and m["settings"]["model"] == "cnn"
    assert m["settings"]["norm"] == "jaxbn" and m["settings"]["widths"] == [8, 16]
    assert m["settings"]["blocks"] == 1 and m["settings"]["hidden"] == []
    assert len(m["train_loss"]) == 2 and all(np.isfinite(m["train_loss"]))
    assert m["train_loss"][1] < m["train_loss"][0]
    assert m["steps"] == 2 * (256 // 32)
    assert 0.0 <= m["test_accuracy"] <= 1.0  # accuracy: test_cnn_default_settings_reach_97
    assert m["plots"] == ["curves.png"]
    assert os.path.getsize(os.path.join(uninterrupted, "curves.png")) > 1000
    with np.load(os.path.join(uninterrupted, loop.CHECKPOINT_NAME)) as z:
        assert json.loads(str(z["meta"]))["epochs_done"] == 2


@pytest.mark.slow
def test_cnn_default_settings_reach_97_percent(tmp_path):
    out = str(tmp_path / "run")
    assert cli.main(["cnn", "--quiet", "--no-plots", "--out", out]) == 0
    m = _metrics(out)
    assert m["settings"]["widths"] == cli.CNN_WIDTHS and m["settings"]["norm"] == "jaxbn"
    assert m["settings"]["epochs"] == cli.CNN_EPOCHS and m["settings"]["blocks"] == cli.CNN_BLOCKS
    assert m["test_accuracy"] >= 0.97, m["test_accuracy"]


@pytest.mark.slow
def test_cnn_resume_equals_uninterrupted(tmp_path, uninterrupted):
    out = str(tmp_path / "run")
    assert cli.main([*TINY, "--epochs", "1", "--out", out]) == 0
    assert cli.main([*TINY, "--resume", "--out", out]) == 0
    a, b = _final(out), _final(uninterrupted)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert _metrics(out)["resumed_from_epoch"] == 1
    assert _metrics(out)["train_loss"] == _metrics(uninterrupted)["train_loss"]


@pytest.mark.slow
def test_cnn_resume_refuses_another_model(tmp_path, capsys, uninterrupted):
    out = str(tmp_path / "run")
    assert cli.main([*TINY, "--epochs", "1", "--out", out]) == 0
    assert cli.main([*TINY, "--widths", "8", "8", "--resume", "--out", out]) == 2
    assert "widths: checkpoint [8, 16] vs now [8, 8]" in capsys.readouterr().err
    assert cli.main([*TINY, "--norm", "flax", "--resume", "--out", out]) == 2
    assert "norm: checkpoint 'jaxbn' vs now 'flax'" in capsys.readouterr().err


@pytest.mark.slow
def test_cnn_ctrl_c_checkpoints_and_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    real, calls = loop.step_fn, []

    def ctrl_c_in_epoch_2(*args, **kw):
        step = real(*args, **kw)

        def f(state, x, y):
            calls.append(1)
            if len(calls) == 256 // 32 + 3:
                raise KeyboardInterrupt
            return step(state, x, y)
        return f

    monkeypatch.setattr(loop, "step_fn", ctrl_c_in_epoch_2)
    out = str(tmp_path / "run")
    argv = [*TINY, "--out", out]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert f"the checkpoint of epoch 1 is in {os.path.join(out, loop.CHECKPOINT_NAME)}" in err
    assert f"resume with: python -m train {' '.join(argv)} --resume" in err


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["flax", "none"])
def test_cnn_other_norms_train(tmp_path, norm):
    out = str(tmp_path / norm)
    assert cli.main([*TINY, "--no-plots", "--norm", norm, "--out", out]) == 0
    m = _metrics(out)
    assert m["settings"]["norm"] == norm and m["train_loss"][1] < m["train_loss"][0]
