"""Test configuration for jaxbn: the environment of ``_env.configure`` (eight host CPU
devices, strict dtype promotion), set before any test module imports jax."""

import _env

_env.configure()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_x64_leak():
    """float64 tests scope jax_enable_x64 to a ``with helpers.x64(...)`` block; check none leaks."""
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before, "a test left jax_enable_x64 changed"
