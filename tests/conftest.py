"""Test configuration for jaxbn: the environment of ``_env.configure`` (eight host CPU
devices, strict dtype promotion), set before any test module imports jax."""

import _env

_env.configure()

import shutil  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


COMPILATION_CACHE_MAX_BYTES = 256 * 2**20


def pytest_configure(config: pytest.Config) -> None:
    """Keeps XLA's compiled programs in pytest's cache directory between runs.

    The tests compile about 1,700 distinct programs, most of the inner loop's
    time: ``pytest -m "not slow"`` takes about 150 s on a first run and under a
    minute on the next, when every unchanged program is read back instead of
    compiled. Entries are keyed by the program, the XLA flags and the jax
    version, so a changed program is compiled again. One full set is about
    20 MB; the cache is emptied when it has grown beyond
    ``COMPILATION_CACHE_MAX_BYTES`` (jax's own size limit, which tracks every
    access, made one first run 193 s instead of 149 s). ``pytest --cache-clear``
    empties it, ``-p no:cacheprovider`` turns it off, and a
    ``JAX_COMPILATION_CACHE_DIR`` of your own is used as it is.

    jax writes entries without an atomic rename, so a run killed mid-write (or
    two runs at once) can leave a truncated one; jax then warns and compiles
    the program. That warning is not turned into a test failure: the cache
    only saves time.
    """
    cache = getattr(config, "cache", None)
    if cache is None or jax.config.jax_compilation_cache_dir:
        return
    for action in ("reading", "writing"):
        config.addinivalue_line(
            "filterwarnings", f"ignore:Error {action} persistent compilation cache entry")
    directory = cache.mkdir("jax-compilation-cache")
    too_large = sum(f.stat().st_size for f in directory.iterdir()) > COMPILATION_CACHE_MAX_BYTES
    if too_large and not hasattr(config, "workerinput"):  # not in a pytest-xdist worker
        shutil.rmtree(directory)
        directory.mkdir()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True)
def _no_x64_leak():
    """float64 tests scope jax_enable_x64 to a ``with helpers.x64(...)`` block; check none leaks."""
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before, "a test left jax_enable_x64 changed"
