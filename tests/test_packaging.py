"""What an installed jaxbn declares and ships: license, run-time dependencies, imports."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest

import jaxbn

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _runtime_requirements() -> set[str]:
    requires = importlib.metadata.distribution("jaxbn").requires or []
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requires
             if "extra ==" not in r}
    return names


def test_license_ships_with_the_distribution():
    dist = importlib.metadata.distribution("jaxbn")
    assert dist.metadata["License-Expression"] == "MIT"
    shipped = [f for f in dist.files or [] if f.name == "LICENSE"]
    assert shipped, "LICENSE missing from the installed distribution"
    assert shipped[0].read_text() == (ROOT / "LICENSE").read_text()


def test_runtime_dependencies_are_jax_jaxlib_numpy_only():
    assert _runtime_requirements() == {"jax", "jaxlib", "numpy"}


def test_version_is_the_changelogs_latest():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    latest = re.search(r"^## \[?(\d+\.\d+\.\d+)", changelog, re.MULTILINE)
    assert latest and latest.group(1) == jaxbn.__version__


def test_import_jaxbn_imports_no_framework_or_optimizer():
    code = ("import sys, jaxbn; "
            "print(sorted(m for m in ('optax', 'flax', 'equinox', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("module", "framework", "message"), [
    pytest.param("jaxbn.nnx", "flax", "jaxbn.nnx needs Flax: pip install 'jaxbn[flax]'",
                 marks=pytest.mark.slow),
    pytest.param("jaxbn.linen", "flax", "jaxbn.linen needs Flax: pip install 'jaxbn[flax]'",
                 marks=pytest.mark.slow),
    ("jaxbn.equinox", "equinox", "jaxbn.equinox needs Equinox: pip install 'jaxbn[equinox]'"),
])
def test_missing_framework_names_the_extra(module, framework, message):
    """Importing a framework module without its framework raises an ImportError that
    names the extra to install (the framework's own error kept as the cause)."""
    code = (f"import sys; sys.modules[{framework!r}] = None\n"
            f"try:\n    import {module}\nexcept ImportError as e:\n"
            "    print(e, '|', type(e.__cause__).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == f"{message} | ModuleNotFoundError"
