"""The public names of the API contract (README, API table) exist; init/init_stats return
what they promise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_all_close, x64

import jaxbn

PUBLIC = [
    "BatchNormParams",
    "RunningStats",
    "batch_norm",
    "batch_norm_eval",
    "batch_norm_train",
    "group_norm",
    "init",
    "init_stats",
    "layer_norm",
    "reference",
    "rms_norm",
]


def test_every_public_name_is_importable():
    from jaxbn import (  # noqa: F401
        BatchNormParams,
        RunningStats,
        batch_norm,
        batch_norm_eval,
        batch_norm_train,
        group_norm,
        init,
        init_stats,
        layer_norm,
        reference,
        rms_norm,
    )
    from jaxbn.reference import batch_norm_autodiff, batch_norm_staged  # noqa: F401

    assert sorted(jaxbn.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(jaxbn, name) is not None
    assert sorted(jaxbn.reference.__all__) == ["batch_norm_autodiff", "batch_norm_staged"]
    assert isinstance(jaxbn.__version__, str)


def test_pytrees_are_namedtuples_with_named_fields():
    assert jaxbn.BatchNormParams._fields == ("gamma", "beta")
    assert jaxbn.RunningStats._fields == ("mean", "var")
    p = jaxbn.init(3)
    leaves, treedef = jax.tree.flatten(p)
    assert len(leaves) == 2
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, jaxbn.BatchNormParams)
    assert rebuilt.gamma is p.gamma and rebuilt.beta is p.beta


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64])
@pytest.mark.parametrize("num_features", [1, 5, (2, 3)])
def test_init_values_shapes_dtypes(num_features, dtype):
    with x64(dtype):
        shape = (num_features,) if isinstance(num_features, int) else num_features
        p = jaxbn.init(num_features, dtype=dtype)
        s = jaxbn.init_stats(num_features, dtype=dtype)
        assert isinstance(p, jaxbn.BatchNormParams)
        assert isinstance(s, jaxbn.RunningStats)
        for leaf in (*p, *s):
            assert leaf.shape == shape
            assert leaf.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(p.gamma, np.float64), np.ones(shape))
        np.testing.assert_array_equal(np.asarray(p.beta, np.float64), np.zeros(shape))
        np.testing.assert_array_equal(np.asarray(s.mean, np.float64), np.zeros(shape))
        np.testing.assert_array_equal(np.asarray(s.var, np.float64), np.ones(shape))


def test_init_default_dtype_is_float32():
    assert jaxbn.init(4).gamma.dtype == jnp.float32
    assert jaxbn.init_stats(4).var.dtype == jnp.float32


@pytest.mark.parametrize("bad", [0, -1, (), (3, 0)])
def test_init_rejects_non_positive_sizes(bad):
    with pytest.raises(ValueError, match="positive number of features"):
        jaxbn.init(bad)
    with pytest.raises(ValueError, match="positive number of features"):
        jaxbn.init_stats(bad)


def test_dict_params_accepted_everywhere():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    gamma = jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32)
    beta = jnp.asarray(rng.normal(size=4), jnp.float32)
    nt = jaxbn.BatchNormParams(gamma, beta)
    d = {"gamma": gamma, "beta": beta}
    stats = jaxbn.RunningStats(jnp.asarray(rng.normal(size=4), jnp.float32),
                               jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32))
    cases = [
        lambda p: jaxbn.batch_norm(p, x),
        lambda p: jaxbn.batch_norm_train(p, stats, x),
        lambda p: jaxbn.batch_norm_eval(p, stats, x),
        lambda p: jaxbn.layer_norm(p, x),
        lambda p: jaxbn.group_norm(p, x, 2),
        lambda p: jaxbn.reference.batch_norm_autodiff(p, x),
        lambda p: jaxbn.reference.batch_norm_staged(p, x),
    ]
    outputs = jax.jit(lambda p: [f(p) for f in cases])
    assert_trees_all_close(outputs(d), outputs(nt), rtol=0, atol=0)
    # The gradient w.r.t. a dict comes back as a dict with the same keys.
    grad = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(jaxbn.batch_norm(p, x)))))
    gd, gn = grad(d), grad(nt)
    assert set(gd) == {"gamma", "beta"}
    assert_trees_all_close((gd["gamma"], gd["beta"]), tuple(gn), rtol=0, atol=0)

