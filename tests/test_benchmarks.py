"""`python -m benchmarks` runs end to end (tiny budget) and its report is self-consistent.

Speed is not asserted: only that every implementation was timed, ratios are
against jaxbn from the same run, and --render redraws the same report.
"""

import json
import math

from benchmarks import run

IMPLS = {"jaxbn", "staged", "autodiff"}


def test_quick_run_writes_consistent_results(tmp_path):
    out = tmp_path / "results"
    argv = ["--quick", "--no-flax", "--dtype", "float32", "--budget", "0.2", "--out", str(out)]
    assert run.main(argv) == 0
    result = json.loads((out / "results-quick.json").read_text())
    assert result["cases"] and all(c["dtype"] == "float32" for c in result["cases"])
    for case in result["cases"]:
        assert set(case["impls"]) == IMPLS
        assert case["impls"]["jaxbn"]["ratio_to_jaxbn"] == 1.0
        for info in case["impls"].values():
            assert info["median_s"] > 0 and math.isfinite(info["passes"])
    summary = result["summary"]["float32"]
    assert set(summary) == IMPLS
    assert [t["target"] for t in result["targets"]]  # each target listed with its measure
    headline = result["numpy_headline"]
    assert headline["dx_difference"] < 1e-12 and headline["speedup"] > 0
    report = (out / "RESULTS-quick.md").read_text()
    assert "## Targets" in report and "jaxbn" in report
    assert run.main(["--quick", "--render", "--out", str(out)]) == 0
    assert (out / "RESULTS-quick.md").read_text() == report


def test_unknown_load_average_is_reported_not_crashed():
    assert run._load_text(None) == "unknown"
    assert run._load_text(1.234) == "1.2"
