"""The README's Python examples and the docstring examples run as written."""

import doctest
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import _norms

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 5, "README lost its examples"
    namespace: dict = {}
    # The blocks build on each other, as a reader would run them in one session.
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    y, x = namespace["y"], namespace["x"]
    expected = jaxbn.batch_norm(jaxbn.init(64), x)
    assert y.shape == x.shape
    assert float(abs(y - expected).max()) < 1e-5


@pytest.mark.parametrize("module", [_norms], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_shard_map_gradients_equal_single_device():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    x, grads = namespace["x"], namespace["grads"]

    def single_device_loss(params, x):
        return jnp.sum(jaxbn.batch_norm(params, x) ** 3)

    x_one_device = jnp.asarray(np.asarray(x))
    expected = jax.grad(single_device_loss)(jaxbn.init(64), x_one_device)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_readme_vmap_axis_name_equals_batch_norm():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    params, per_example = namespace["params"], namespace["per_example"]
    x = jnp.asarray(np.asarray(namespace["x"]))
    np.testing.assert_allclose(per_example(x), jaxbn.batch_norm(params, x), rtol=1e-6, atol=1e-6)
