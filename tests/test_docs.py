"""The README's Python examples and the docstring examples run as written."""

import doctest
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL32, assert_trees_all_close

import jaxbn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# The modules that define the public names (private ones included), found from
# jaxbn.__all__ rather than named, so that moving code between them needs no change here.
PUBLIC_MODULES = sorted({inspect.getmodule(getattr(jaxbn, name)) for name in jaxbn.__all__},
                        key=lambda m: m.__name__)


def test_docstring_examples():
    attempted = 0
    for module in PUBLIC_MODULES:
        result = doctest.testmod(module, verbose=False)
        assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module}"
        attempted += result.attempted
    assert attempted > 0, f"no docstring examples found in {PUBLIC_MODULES}"


@pytest.fixture(scope="module")
def readme():
    """The README's ```python blocks run in one namespace, as a reader would run them."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 5, "README lost its examples"
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_readme_examples_run(readme):
    y, x = readme["y"], readme["x"]
    expected = jaxbn.batch_norm(jaxbn.init(64), x)
    assert y.shape == x.shape
    assert float(abs(y - expected).max()) < 1e-5


@pytest.mark.slow
def test_readme_shard_map_gradients_equal_single_device(readme):
    x, grads = readme["x"], readme["grads"]

    def single_device_loss(params, x):
        return jnp.sum(jaxbn.batch_norm(params, x) ** 3)

    x_one_device = jnp.asarray(np.asarray(x))
    expected = jax.grad(single_device_loss)(jaxbn.init(64), x_one_device)
    # float32, two summation orders and two shifts (a sample per device vs x[0]).
    assert_trees_all_close(tuple(grads), tuple(expected), rtol=RTOL32)


@pytest.mark.slow
def test_readme_vmap_axis_name_equals_batch_norm(readme):
    params, per_example = readme["params"], readme["per_example"]
    x = jnp.asarray(np.asarray(readme["x"]))
    np.testing.assert_allclose(per_example(x), jaxbn.batch_norm(params, x), rtol=1e-6, atol=1e-6)
