"""Tests for ``python -m benchmarks.compare``: output format, JSON keys, numerics on small shapes.

No timing is asserted: timings only have to exist and be positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from benchmarks import compare

GRADS = ("dx", "dgamma", "dbeta")


def _run_json(capsys, *argv):
    assert compare.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_keys_and_timing(capsys):
    result = _run_json(capsys, "--shape", "16", "8", "--repeats", "3")
    assert set(result) >= {
        "shape", "dtype", "eps", "seed", "values_per_statistic", "baseline",
        "differences", "timing", "repeats", "backend", "jax_version",
    }
    assert result["shape"] == [16, 8]
    assert result["dtype"] == "float32"
    assert result["values_per_statistic"] == 16
    assert set(result["differences"]) == {"autodiff", "staged", "finite_diff"}
    assert result["differences"]["finite_diff"] is None  # float64 only
    for name in ("autodiff", "staged"):
        for g in GRADS:
            assert set(result["differences"][name][g]) == {"max_abs", "max_rel"}
    assert set(result["timing"]) == {"closed_form", "autodiff", "staged"}
    for t in result["timing"].values():
        assert t["median_s"] > 0
    assert result["timing"]["closed_form"]["ratio_to_closed_form"] == 1.0


@pytest.mark.parametrize("shape", [(16, 8), (4, 3, 3, 5)], ids=["ND", "NHWC"])
def test_float64_differences_are_tiny(capsys, shape):
    result = _run_json(
        capsys, "--shape", *map(str, shape), "--dtype", "float64", "--no-time",
        "--fd-samples", "4",
    )
    assert result["timing"] is None
    values = 1
    for n in shape[:-1]:
        values *= n
    assert result["values_per_statistic"] == values
    diffs = result["differences"]
    for name in ("autodiff", "staged"):
        for g in GRADS:
            assert diffs[name][g]["max_rel"] < 1e-13, (name, g, diffs[name][g])
    for g in GRADS:
        assert diffs["finite_diff"][g]["coordinates"] >= 3
        assert diffs["finite_diff"][g]["max_rel"] < 1e-8, (g, diffs["finite_diff"][g])
    # main's float64 switch must not leak into the calling process.
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_low_precision_differences(dtype, tol):
    result = compare.compare((32, 4), dtype, time_it=False)
    for name in ("autodiff", "staged"):
        for g in GRADS:
            assert result["differences"][name][g]["max_rel"] < tol


def test_text_output_format(capsys):
    assert compare.main(["--shape", "8", "4", "4", "6", "--repeats", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("jaxbn compare: shape 8x4x4x6, float32, eps 1e-05, seed 3")
    assert "(128 values per feature)" in out
    for label in ("autodiff of naive fwd", "staged (CS231n)", "closed form (jaxbn)"):
        assert label in out
    assert "dx difference:" in out and "dgamma difference:" in out
    assert "dbeta difference:" in out and "speedup:" in out
    assert "finite differences     skipped (float64 only)" in out
    # The difference rows are aligned: each starts its numbers at the same column.
    rows = [line for line in out.splitlines() if "dx difference:" in line]
    assert len({row.index("dx difference:") for row in rows}) == 1


def test_seed_changes_inputs(capsys):
    a = _run_json(capsys, "--shape", "16", "8", "--no-time", "--seed", "1")
    b = _run_json(capsys, "--shape", "16", "8", "--no-time", "--seed", "2")
    assert a["differences"] != b["differences"]
    assert (a["seed"], b["seed"]) == (1, 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "16"], "at least 2 sizes"),
        (["--shape", "1", "8"], "batch of at least 2"),
        (["--shape", "16", "0"], "expected a positive integer, got 0"),
        (["--shape", "16", "x"], "expected a positive integer, got 'x'"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--eps", "-1"], "expected a positive finite number, got -1"),
        (["--repeats", "0"], "expected a positive integer, got 0"),
    ],
)
def test_bad_arguments_give_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        compare.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m benchmarks.compare" in err
    assert message in err


@pytest.mark.slow
def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--shape", "8", "4", "--no-time", "--json"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shape"] == [8, 4]
