"""Data parallelism equals one device: `--devices 8` on 8 CPU devices, and multi-host
(`--distributed`, two processes of two CPU devices each, gloo collectives)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from train import cli, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, jax, numpy as np
from train import data, loop
assert jax.local_device_count() == 8, jax.devices()
ds = data.subset(data.load_digits(), train=256, test=100)
out = {}
for norm, opt, lr in (("jaxbn", "adam", 1e-3), ("staged", "sgd", 0.05)):
    runs = {}
    for d in (1, 8):
        cfg = loop.TrainConfig(norm=norm, epochs=1, batch_size=64, devices=d, quiet=True,
                               optimizer=opt, lr=lr)
        res = loop.run(cfg, ds, verbose=False)
        runs[d] = (jax.tree.leaves((res.state.params, res.state.stats)), res.history)
        if d == 8:
            leaf = jax.tree.leaves(res.state.params)[0]
            out[f"{norm}_replicated"] = bool(leaf.sharding.is_fully_replicated) and len(
                leaf.sharding.device_set) == 8
            st = loop.init_state(cfg, ds)
            hlo = loop.step_fn(norm, opt, lr, 0.9, 8).lower(
                st, ds.x_train[:64], ds.y_train[:64]).compile().as_text()
            out[f"{norm}_all_reduce"] = "all-reduce" in hlo
    for d in (8,):
        out[f"{norm}_{d}_param_rel"] = max(
            float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
            for a, b in zip(runs[d][0], runs[1][0]))
        out[f"{norm}_{d}_loss_diff"] = abs(runs[d][1][-1]["train_loss"]
                                           - runs[1][1][-1]["train_loss"])
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_data_parallel_equals_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    r = json.loads(line[len("RESULT"):])
    for norm, param_rtol in (("jaxbn", 1e-4), ("staged", 1e-5)):
        assert r[f"{norm}_replicated"], r
        assert r[f"{norm}_all_reduce"], r  # the batch really is split: XLA all-reduces
        # 4 steps; only the reduction order differs (float32 round-off). Adam's first
        # updates are ~lr * sign(g), so entries with a round-off-sized gradient can move
        # differently: measured ~2e-5 in ||a - b|| / ||b|| (up to ~1e-3 for a small,
        # near-zero leaf such as beta); SGD keeps it at round-off.
        # Per-device (not global) batch statistics would change the loss by ~3e-2.
        assert r[f"{norm}_8_param_rel"] < param_rtol, r
        assert r[f"{norm}_8_loss_diff"] < 1e-5, r
    assert np.isfinite(list(v for k, v in r.items() if isinstance(v, float))).all()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_process_equals_single_device(tmp_path):
    args = ["--epochs", "1", "--optimizer", "sgd", "--lr", "0.05", "--train-subset", "128",
            "--test-subset", "50", "--batch-size", "32", "--quiet", "--no-plots"]
    single = str(tmp_path / "single")
    assert cli.main([*args, "--out", single]) == 0
    multi = str(tmp_path / "multi")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "train", *args, "--out", multi, "--distributed", "--coordinator",
         f"localhost:{port}", "--num-processes", "2", "--process-id", str(i), "--devices",
         "all"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        logs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "devices 4" in logs[0] and "test accuracy" in logs[0]
    assert "test accuracy" not in logs[1]  # only process 0 reports and writes
    with np.load(os.path.join(single, loop.FINAL_STATE_NAME)) as a, np.load(
            os.path.join(multi, loop.FINAL_STATE_NAME)) as b:
        for k in a.files:  # SGD: round-off is not amplified as by Adam (see above)
            rel = np.linalg.norm(a[k] - b[k]) / np.linalg.norm(a[k])
            assert rel < 1e-5, (k, rel)
