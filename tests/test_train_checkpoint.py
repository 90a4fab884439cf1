"""Checkpoints, resume (also after SIGKILL and Ctrl-C), divergence and atomic outputs of
`python -m train`."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train import _io, cli, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--train-subset", "256", "--test-subset", "100", "--batch-size", "32", "--quiet",
        "--no-plots"]


# `python -m train` with every train step slowed by 40 ms (8 steps an epoch with BASE), so
# that a test can signal a run in the middle of an epoch. SIGINT gets Python's usual
# handler, as in a terminal, even where pytest itself runs with SIGINT ignored (a
# background job).
SLOW = r"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from train import cli, loop
real = loop.step_fn
def slow_step_fn(*args, **kw):
    step = real(*args, **kw)
    def slow(state, x, y):
        time.sleep(0.04)
        return step(state, x, y)
    return slow
loop.step_fn = slow_step_fn
sys.exit(cli.main(sys.argv[1:]))
"""


def _final(out):
    with np.load(os.path.join(out, loop.FINAL_STATE_NAME)) as z:
        return {k: z[k] for k in z.files}


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _checkpoint_epoch(path):
    with np.load(path) as z:
        return json.loads(str(z["meta"]))["epochs_done"]


def _assert_same_final(a, b):
    fa, fb = _final(a), _final(b)
    assert fa.keys() == fb.keys()
    for k in fa:  # bitwise: same compiled step, same data order, same restored state
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "run")
    assert cli.main([*BASE, "--epochs", "5", "--out", out]) == 0
    return out


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, uninterrupted):
    out = str(tmp_path / "run")
    assert cli.main([*BASE, "--epochs", "2", "--checkpoint-every", "1", "--out", out]) == 0
    assert _checkpoint_epoch(os.path.join(out, loop.CHECKPOINT_NAME)) == 2
    assert cli.main([*BASE, "--epochs", "5", "--checkpoint-every", "1", "--resume",
                     "--out", out]) == 0
    _assert_same_final(out, uninterrupted)
    m, ref = _metrics(out), _metrics(uninterrupted)
    assert m["resumed_from_epoch"] == 2
    assert m["train_loss"] == ref["train_loss"]  # history of all 5 epochs, bitwise
    assert m["test_accuracy"] == ref["test_accuracy"]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, uninterrupted):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, loop.CHECKPOINT_NAME)
    cmd = [sys.executable, "-c", SLOW, *BASE, "--epochs", "5", "--checkpoint-every", "1",
           "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if os.path.exists(ckpt) and _checkpoint_epoch(ckpt) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint of epoch 2 within 60 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = _checkpoint_epoch(ckpt)
    assert 2 <= done < 5
    assert not os.path.exists(os.path.join(out, "metrics.json"))  # killed before the end
    rc = subprocess.run([sys.executable, "-m", "train", *BASE, "--epochs", "5",
                         "--checkpoint-every", "1", "--resume", "--out", out], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr
    assert f"after epoch {done}" in rc.stdout
    _assert_same_final(out, uninterrupted)
    assert _metrics(out)["train_loss"] == _metrics(uninterrupted)["train_loss"]


@pytest.mark.slow
def test_ctrl_c_checkpoints_prints_resume_command_and_resumes_bitwise(tmp_path, uninterrupted):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, loop.CHECKPOINT_NAME)
    argv = [*BASE, "--epochs", "5", "--checkpoint-every", "0", "--out", out]
    proc = subprocess.Popen([sys.executable, "-c", SLOW, *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any(s.startswith("epoch   2/5") for s in lines):
            line = proc.stdout.readline()
            assert line, (lines, proc.stderr.read())  # the run ended before epoch 2
            lines.append(line)
        assert not os.path.exists(ckpt)  # --checkpoint-every 0: nothing written so far
        proc.send_signal(signal.SIGINT)  # during epoch 3's (slowed) steps
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    done = _checkpoint_epoch(ckpt)
    assert 2 <= done < 5
    assert f"interrupted; the checkpoint of epoch {done} is in {ckpt}" in stderr
    resume = f"python -m train {shlex.join([*argv, '--resume'])}"
    assert stderr.count("resume with: ") == 1 and f"resume with: {resume}\n" in stderr
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    rc = subprocess.run([sys.executable, "-m", "train", *shlex.split(resume)[3:]], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert rc.returncode == 0, rc.stderr
    assert f"after epoch {done}" in rc.stdout
    _assert_same_final(out, uninterrupted)
    assert _metrics(out)["train_loss"] == _metrics(uninterrupted)["train_loss"]


def _patch_steps(monkeypatch, first, change):
    """From the ``first``-th train step on, a step returns ``change(new_state, loss)``."""
    real = loop.step_fn
    calls = {"n": 0}

    def patched(*args, **kw):
        step = real(*args, **kw)

        def f(state, x, y):
            calls["n"] += 1
            out = step(state, x, y)
            return change(*out) if calls["n"] >= first else out
        return f

    monkeypatch.setattr(loop, "step_fn", patched)


def _ctrl_c(state, loss):
    raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_completed_epoch_not_a_half_updated_state(
        tmp_path, capsys, monkeypatch, uninterrupted):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, loop.CHECKPOINT_NAME)
    _patch_steps(monkeypatch, 3 * (256 // 32) + 4, _ctrl_c)  # in the middle of epoch 4
    argv = [*BASE, "--epochs", "5", "--checkpoint-every", "2", "--resume", "--out", out]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert _checkpoint_epoch(ckpt) == 3  # not 2 (the last periodic one), not mid-epoch 4
    assert err.count("--resume") == 1  # already in the command line: not added again
    monkeypatch.undo()
    assert cli.main(argv) == 0
    _assert_same_final(out, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, capsys,
                                                                    monkeypatch):
    out = str(tmp_path / "run")
    _patch_steps(monkeypatch, 3, _ctrl_c)
    assert cli.main([*BASE, "--epochs", "5", "--out", out]) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first epoch completed; no checkpoint was written" in err
    assert "resume with" not in err
    assert not os.path.exists(os.path.join(out, loop.CHECKPOINT_NAME))


@pytest.mark.slow
def test_ctrl_c_before_training_stops_after_the_first_step(tmp_path, capsys, monkeypatch):
    real = cli.commands.load_data

    def load_then_ctrl_c(args):  # Ctrl-C while the data loads: no KeyboardInterrupt there
        ds = real(args)
        os.kill(os.getpid(), signal.SIGINT)
        return ds

    monkeypatch.setattr(cli.commands, "load_data", load_then_ctrl_c)
    steps = []
    _patch_steps(monkeypatch, 1, lambda state, loss: steps.append(1) or (state, loss))
    assert cli.main([*BASE, "--epochs", "5", "--out", str(tmp_path / "run")]) == 130
    assert len(steps) == 1  # the loop stops at its first check
    err = capsys.readouterr().err
    assert "interrupted before the first epoch completed" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.slow
def test_resume_rejects_other_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main([*BASE, "--epochs", "1", "--checkpoint-every", "1", "--out", out]) == 0
    assert cli.main([*BASE, "--epochs", "2", "--lr", "0.01", "--resume", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "lr" in err


@pytest.mark.slow
def test_resume_refuses_checkpoint_past_epochs(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main([*BASE, "--epochs", "2", "--checkpoint-every", "1", "--out", out]) == 0
    assert cli.main([*BASE, "--epochs", "1", "--resume", "--out", out]) == 2
    assert "already at epoch 2" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main([*BASE, "--epochs", "1", "--resume", "--out", out]) == 0
    assert "starting from scratch" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("every, saved", [(1, 3), (2, 2), (0, None)])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch, every,
                                                       saved):
    _patch_steps(monkeypatch, 3 * (256 // 32) + 4, lambda state, loss: (state, loss * np.nan))
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, loop.CHECKPOINT_NAME)
    rc = cli.main([*BASE, "--epochs", "5", "--checkpoint-every", str(every), "--out", out])
    assert rc == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "at epoch 4," in err
    if saved is None:
        assert "no checkpoint was written" in err and not os.path.exists(ckpt)
    else:  # the message names the epoch of the checkpoint actually on disk
        assert f"{ckpt} (epoch {saved}) is kept" in err
        assert _checkpoint_epoch(ckpt) == saved
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] if os.path.isdir(out) else True


@pytest.mark.slow
def test_failed_run_does_not_leave_an_earlier_runs_results(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main([*BASE, "--epochs", "1", "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "metrics.json"))
    rc = cli.main([*BASE, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e30", "--out", out])
    assert rc == 1 and "diverged" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert not os.path.exists(os.path.join(out, loop.FINAL_STATE_NAME))


def test_negative_checkpoint_every_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*BASE, "--checkpoint-every", "-1"])
    assert exit_info.value.code == 2
    assert "expected an integer >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_real_divergence_exits_nonzero_without_metrics(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = cli.main([*BASE, "--epochs", "2", "--optimizer", "sgd", "--lr", "1e30", "--out", out])
    assert rc == 1
    assert "diverged" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    _io.write_json(path, {"a": 1})

    def half_then_fail(f):
        f.write(b'{"a": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write(path, half_then_fail)
    with pytest.raises(TypeError):
        _io.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.slow
def test_failing_run_leaves_no_partial_metrics(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def boom(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr("train.plots.training_curves", boom)
    with pytest.raises(RuntimeError, match="plotting failed"):
        cli.main([*BASE[:-1], "--epochs", "1", "--out", str(out)])
    assert not (out / "metrics.json").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
