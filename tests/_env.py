"""The test environment, in one place: ``conftest.py`` and ``report_errors.py`` call
:func:`configure` before anything else imports jax.

* Eight host CPU devices, so that the multi-device tests (shard_map, pmap,
  NamedSharding) have a mesh to run on. XLA reads ``XLA_FLAGS`` when the CPU
  backend starts, so the flag must be set before the first computation.
* Strict dtype promotion, so that an accidental float32/float64 mix in jaxbn
  raises instead of silently promoting.

This module itself imports nothing from jax at import time.
"""

from __future__ import annotations

import os

DEVICE_COUNT = 8
_FLAG = f"--xla_force_host_platform_device_count={DEVICE_COUNT}"


def configure() -> None:
    """Requests ``DEVICE_COUNT`` host devices and turns on strict dtype promotion."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}".strip()

    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")
