"""`python -m benchmarks`: its report is self-consistent, quick runs stay out of git,
a missing Flax is reported, every implementation computes what jaxbn does, and the
shared timer times what it is given. `python -m benchmarks models`: its section joins
the layer report, and a model whose loss differs from Flax's stops the run.

Speed is not asserted: only that every implementation was timed, ratios are
against jaxbn (batch norm) or jaxbn.rms_norm (RMS norm) from the same run, and
--render redraws the same report, from old results without RMS norm too.
"""

import functools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jaxbn
from benchmarks import common, impls, models, run

IMPLS = {"jaxbn", "staged", "autodiff"}
RMS_IMPLS = {"jaxbn", "autodiff"}


def _block_flax(monkeypatch):
    """Makes ``import flax`` (and ``import flax.linen``) fail as if flax were not installed."""
    for name in [m for m in sys.modules if m == "flax" or m.startswith("flax.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flax", None)


@pytest.mark.slow
def test_quick_run_writes_consistent_results(tmp_path, monkeypatch, capsys):
    _block_flax(monkeypatch)
    out = tmp_path / "results"
    argv = ["--quick", "--dtype", "float32", "--budget", "0.2", "--out", str(out)]
    assert run.main(argv) == 0
    assert f"note: {run.FLAX_MISSING}" in capsys.readouterr().err
    result = json.loads((out / "results-quick.json").read_text())
    assert result["notes"] == [run.FLAX_MISSING]
    for family, names in (("batch_norm", IMPLS), ("rms_norm", RMS_IMPLS)):
        section = run.sections(result)[family]
        assert [c["shape"] for c in section["cases"]] == [
            list(shape) for shape in run.SHAPES[family][1]]
        assert all(c["dtype"] == "float32" for c in section["cases"])
        for case in section["cases"]:
            assert set(case["impls"]) == names
            base = case["impls"]["jaxbn"]["median_s"]  # this family's jaxbn, this round-robin
            for info in case["impls"].values():
                assert info["median_s"] > 0 and math.isfinite(info["passes"])
                assert info["ratio_to_jaxbn"] == info["median_s"] / base
        assert set(section["summary"]["float32"]) == names
        assert section["counts"] == {"float32": len(section["cases"])}
    assert [t["target"] for t in result["targets"]]  # each target listed with its measure
    headline = result["numpy_headline"]
    assert headline["dx_difference"] < 1e-12 and headline["speedup"] > 0
    report = (out / "RESULTS-quick.md").read_text()
    assert "## Targets" in report and "jaxbn" in report
    assert "## RMS norm" in report and "| autodiff of naive RMS norm |" in report
    assert f"- note: {run.FLAX_MISSING}" in report
    assert run.main(["--quick", "--render", "--out", str(out)]) == 0
    assert (out / "RESULTS-quick.md").read_text() == report
    # --title-note is drawn, written into the report and kept in results.json.
    assert run.main(["--quick", "--render", "--out", str(out), "--title-note", "BEFORE"]) == 0
    assert json.loads((out / "results-quick.json").read_text())["title_note"] == "BEFORE"
    assert run.main(["--quick", "--render", "--out", str(out)]) == 0
    assert "**BEFORE**" in (out / "RESULTS-quick.md").read_text()
    for png in ("time_vs_size-quick.png", "ratios-quick.png", "rms_norm_time_vs_size-quick.png"):
        assert (out / png).stat().st_size > 0


def test_quick_runs_default_to_a_git_ignored_directory():
    assert run.parse_args([]).out == run.RESULTS_DIR
    assert run.parse_args(["--quick"]).out == run.QUICK_DIR
    assert run.parse_args(["--quick", "--out", "elsewhere"]).out == Path("elsewhere")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def ignored(path: Path) -> int:
        return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=run.ROOT).returncode

    if ignored(run.ROOT / "README.md") == 128:
        pytest.skip(f"{run.ROOT} is not a git checkout")
    assert ignored(run.QUICK_DIR / "results-quick.json") == 0, (
        f"expected {run.QUICK_DIR} to be listed in .gitignore")
    assert ignored(run.RESULTS_DIR / "results.json") == 1, (
        f"expected {run.RESULTS_DIR} to be tracked, not ignored")


def test_installed_flax_is_measured():
    pytest.importorskip("flax.linen")
    pytest.importorskip("flax.nnx")
    fns, notes = run.choose_implementations(include_flax=True)
    assert set(fns["batch_norm"]) == IMPLS | {"flax"} and notes == []
    assert set(fns["rms_norm"]) == RMS_IMPLS | {"flax"}


def test_missing_flax_is_named_with_the_bench_extra(monkeypatch):
    _block_flax(monkeypatch)
    fns, notes = run.choose_implementations(include_flax=True)
    assert set(fns["batch_norm"]) == IMPLS and set(fns["rms_norm"]) == RMS_IMPLS
    assert notes == [run.FLAX_MISSING]
    assert "flax not installed" in notes[0] and "pip install -e '.[bench]'" in notes[0]
    # --no-flax leaves Flax out on purpose: nothing to note.
    fns, notes = run.choose_implementations(include_flax=False)
    assert set(fns["batch_norm"]) == IMPLS and set(fns["rms_norm"]) == RMS_IMPLS
    assert notes == []


@pytest.mark.parametrize("family", sorted(impls.FAMILIES))
def test_every_implementation_computes_what_jaxbn_does(family):
    fns = impls.forward_functions(True, family)
    impls.check_agreement(fns, shift=impls.FAMILIES[family].shift)  # raises on a mismatch


def test_flax_rms_norm_that_ignores_gamma_is_caught():
    pytest.importorskip("flax.nnx")
    fns = impls.forward_functions(True, "rms_norm")
    flax = fns["flax"]
    fns["flax"] = lambda x, gamma, beta: flax(x, jnp.ones_like(gamma), beta)  # scale left at 1
    with pytest.raises(ValueError, match=r"flax y .* flax dgamma"):
        impls.check_agreement(fns, shift=False)


def test_rms_norm_inputs_have_no_beta_and_the_same_x():
    x, gamma, beta, dy = impls.make_inputs((4, 8), jnp.float32, shift=False)
    assert beta is None
    same = impls.make_inputs((4, 8), jnp.float32)
    for a, b in zip((x, gamma, dy), (same[0], same[1], same[3])):
        assert (a == b).all()


def test_old_results_without_rms_norm_render_the_committed_report(tmp_path):
    """results/before/ predates the RMS norm section: it still renders as committed."""
    before = run.RESULTS_DIR / "before"
    result = json.loads((before / "results.json").read_text())
    assert "rms_norm" not in result and list(run.sections(result)) == ["batch_norm"]
    run.write_markdown(result, tmp_path / "RESULTS.md",
                       {"time vs size": "time_vs_size.png", "ratios": "ratios.png"})
    assert (tmp_path / "RESULTS.md").read_text() == (before / "RESULTS.md").read_text()


def test_committed_results_render_the_committed_report(tmp_path):
    result = json.loads((run.RESULTS_DIR / "results.json").read_text())
    assert list(run.sections(result)) == ["batch_norm", "rms_norm"]
    run.write_markdown(result, tmp_path / "RESULTS.md", {
        "time vs size": "time_vs_size.png", "RMS norm time vs size":
        "rms_norm_time_vs_size.png", "ratios": "ratios.png"},
        run._load(run.RESULTS_DIR / "models.json"))  # the Models section, once measured
    assert (tmp_path / "RESULTS.md").read_text() == (run.RESULTS_DIR / "RESULTS.md").read_text()


def test_rms_norm_section_has_its_own_tables(tmp_path):
    result = json.loads((run.RESULTS_DIR / "results.json").read_text())
    cases = [{**c, "impls": {n: c["impls"][n] for n in ("jaxbn", "autodiff")}}
             for c in result["cases"]]
    result["rms_norm"] = {
        "cases": cases,
        "summary": {d: run.summarize(cases, d) for d in result["summary"]},
        "counts": result["counts"],
    }
    assert list(run.sections(result)) == ["batch_norm", "rms_norm"]
    run.write_markdown(result, tmp_path / "RESULTS.md", {})
    report = (tmp_path / "RESULTS.md").read_text()
    rms = report[report.index("## RMS norm\n"):report.index("## The seed's")]
    assert "relative to `jaxbn.rms_norm`" in rms
    for dtype_name in result["summary"]:
        assert f"### Summary, {dtype_name}" in rms and f"### Per shape, {dtype_name}" in rms
    assert "| jaxbn.rms_norm (closed-form custom_vjp) | 1.00 |" in rms
    assert "| autodiff of naive RMS norm |" in rms and "staged" not in rms


def test_report_shows_title_note_and_notes(tmp_path):
    result = json.loads((run.RESULTS_DIR / "results.json").read_text())
    result["title_note"] = "BEFORE OPTIMIZATION"
    result["notes"] = [run.FLAX_MISSING]
    run.write_markdown(result, tmp_path / "RESULTS.md", {})
    lines = (tmp_path / "RESULTS.md").read_text().splitlines()
    assert lines[:4] == ["# jaxbn benchmark results", "", "**BEFORE OPTIMIZATION**", ""]
    assert lines[4] == f"- note: {run.FLAX_MISSING}"


def test_unknown_load_average_is_reported_not_crashed():
    assert run._load_text(None) == "unknown"
    assert run._load_text(1.234) == "1.2"
    assert run._load_remark(None) and run._load_remark(1.5)
    assert run._load_remark(0.1) == ""


def test_time_interleaved_calls_each_warmup_plus_repeats_times_in_rotation():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    medians = common.time_interleaved(calls, 4, warmup=2)
    assert set(medians) == set("abc") and all(t >= 0 for t in medians.values())
    assert order[:6] == list("aabbcc")  # warm-up, each in turn
    assert order[6:] == list("abcbcacababc")  # rounds abc, bca, cab, abc: the first rotates


def test_interleaved_budget_sets_repeats_within_bounds():
    calls = {"a": lambda: None, "b": lambda: None}
    _, repeats = run._interleaved(calls, budget_s=1e-12, min_repeats=5, max_repeats=9)
    assert repeats == 5
    _, repeats = run._interleaved(calls, budget_s=10.0, min_repeats=5, max_repeats=9)
    assert repeats == 9


# python -m benchmarks models: whole-model train steps.

TINY_CNN = models.Model("cnn", "tiny", "BatchNorm", {"side": 8, "widths": (4, 8), "blocks": 1}, 4)


def _flax_batch_norm():
    return pytest.importorskip("flax.nnx").BatchNorm


@pytest.mark.slow
def test_models_quick_run_writes_its_section_beside_the_layer_tables(tmp_path, monkeypatch):
    pytest.importorskip("jaxbn.nnx")
    transformer = next(m for m in models.QUICK_MODELS if m.kind == "transformer")
    monkeypatch.setattr(models, "QUICK_MODELS", [TINY_CNN, transformer])
    # A layer run's results are there already: its tables stay, the Models section is added.
    shutil.copy(run.RESULTS_DIR / "results.json", tmp_path / "results-quick.json")
    assert models.main(["--quick", "--budget", "0.05", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "models-quick.json").read_text())
    assert result["command"] == (
        f"python -m benchmarks models --quick --budget 0.05 --out {tmp_path}")
    cnn, block = result["cases"]
    assert (cnn["kind"], cnn["name"], block["norm"]) == ("cnn", "tiny", transformer.norm)
    assert set(cnn["variants"]) == {"flax", "jaxbn", "none"}
    assert set(block["variants"]) == {"flax", "jaxbn"}
    for case in result["cases"]:
        flax = case["variants"]["flax"]
        for v in case["variants"].values():  # ratios to the Flax variant of the same round-robin
            assert v["median_s"] > 0 and v["time_to_flax"] == v["median_s"] / flax["median_s"]
            assert v["temp_to_flax"] == v["temp_bytes"] / flax["temp_bytes"]
        assert case["repeats"] >= 15 and len(case["losses"]["jaxbn"]) == 2
    assert result["geomean"] == {v: i["time_to_flax"] for v, i in cnn["variants"].items()}
    assert [t["measured"] for t in result["targets"]] == [
        cnn["variants"]["jaxbn"]["temp_to_flax"], cnn["variants"]["jaxbn"]["time_to_flax"]]
    report = (tmp_path / "RESULTS-quick.md").read_text()
    assert "## Summary, float32" in report and "## RMS norm" in report  # the layer tables
    section = report[report.index("## Models: the training step"):]
    assert f"command: `{result['command']}`" in section
    for label in ("flax.nnx.BatchNorm", "jaxbn.nnx.BatchNorm", "| none |",
                  f"flax.nnx.{transformer.norm}", f"jaxbn.nnx.{transformer.norm}"):
        assert label in section
    # A later layer run (here its --render) keeps the Models section.
    assert run.main(["--quick", "--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "RESULTS-quick.md").read_text() == report


@pytest.mark.slow
def test_models_agreement_catches_another_epsilon():
    batch_norm = _flax_batch_norm()
    wrong = functools.partial(batch_norm, epsilon=1.0)
    with pytest.raises(ValueError, match=r"cnn tiny: .* step 1 loss: jaxbn .*, flax "):
        models.bench_model(TINY_CNN, {"flax": batch_norm, "jaxbn": wrong}, budget_s=0.01)


@pytest.mark.slow
def test_models_agreement_catches_a_wrong_gradient():
    """Same forward pass, but the norm's gradient is the identity: the first losses agree,
    the second (after one update) does not."""
    batch_norm = _flax_batch_norm()

    class WrongGradient(batch_norm):
        def __call__(self, x, *args, **kwargs):
            return x + jax.lax.stop_gradient(super().__call__(x, *args, **kwargs) - x)

    with pytest.raises(ValueError, match="step 2 loss") as error:
        models.bench_model(TINY_CNN, {"flax": batch_norm, "jaxbn": WrongGradient}, 0.01)
    assert "step 1" not in str(error.value)


def test_models_agreement_rejects_a_non_finite_loss_and_accepts_round_off():
    models.check_agreement("m", {"flax": [2.0, 1.5], "jaxbn": [2.0 * (1 + 1e-6), 1.5]})
    with pytest.raises(ValueError, match=r"m: .*none loss nan"):
        models.check_agreement("m", {"flax": [2.0, 1.5], "jaxbn": [2.0, 1.5],
                                     "none": [2.0, math.nan]})
    with pytest.raises(ValueError, match="step 2 loss: jaxbn 1.6, flax 1.5"):
        models.check_agreement("m", {"flax": [2.0, 1.5], "jaxbn": [2.0, 1.6]})


def test_models_quick_runs_default_to_the_git_ignored_directory():
    assert models.parse_args([]).out == run.RESULTS_DIR
    assert models.parse_args(["--quick"]).out == run.QUICK_DIR
    assert len({m.name for m in models.MODELS if m.kind == "cnn"}) >= 3


def test_revisions_loads_a_git_revision_beside_this_checkout(tmp_path):
    """`python -m benchmarks revisions REV`: jaxbn at REV imports under its own name, and
    its batch norm runs next to this checkout's (HEAD's core computes what ours does, up to
    whatever is being changed in the working tree)."""
    from benchmarks import revisions

    path = list(sys.path)
    old = revisions.load_revision("HEAD", tmp_path)
    assert sys.path == path
    assert revisions.load_revision("HEAD", tmp_path / "again") is old
    assert old.__name__ == "jaxbn_at_HEAD" and old is not jaxbn
    assert old.batch_norm.__module__.startswith("jaxbn_at_HEAD.")
    x = jax.random.normal(jax.random.key(0), (16, 4))
    assert jnp.allclose(old.batch_norm(old.init(4), x), jaxbn.batch_norm(jaxbn.init(4), x),
                        rtol=1e-5, atol=1e-6)
