"""Test configuration for jaxbn.

Eight host CPU devices are requested *before* jax is imported so that the
multi-device tests (shard_map, pmap, NamedSharding) have a mesh to run on, and
dtype promotion is strict so that an accidental float32/float64 mix in jaxbn
raises instead of silently promoting.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_x64_leak():
    """float64 tests scope jax_enable_x64 to a ``with helpers.x64(...)`` block; check none leaks."""
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before, "a test left jax_enable_x64 changed"
