"""Bad input gets a clear ValueError/TypeError at trace time that says what was expected."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn.reference import batch_norm_autodiff, batch_norm_staged

X = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
X4 = np.random.default_rng(1).normal(size=(2, 3, 3, 6)).astype(np.float32)
P3 = jaxbn.init(3)
P6 = jaxbn.init(6)
S3 = jaxbn.init_stats(3)

# (id, function of the array arguments, arguments, exception, regex the message must match)
CASES = [
    ("params-shape", lambda x: jaxbn.batch_norm(jaxbn.init(4), x), (X,), ValueError,
     r"Expected params gamma of shape \(3,\).*got shape \(4,\)"),
    ("params-shape-nchw", lambda x: jaxbn.batch_norm(P6, x, axis=1), (X4,), ValueError,
     r"Expected params gamma of shape \(3,\), the size of x's feature axis 1 .*got shape \(6,\)"),
    ("beta-shape", lambda x: jaxbn.batch_norm({"gamma": jnp.ones(3), "beta": jnp.zeros(2)}, x),
     (X,), ValueError, r"params beta of shape \(3,\).*got shape \(2,\)"),
    ("params-tuple-axis", lambda x: jaxbn.batch_norm(jaxbn.init(6), x, axis=(1, 2)), (X4,),
     ValueError, r"shape \(3, 3\).*got shape \(6,\)"),
    ("int-input", lambda x: jaxbn.batch_norm(P3, x), (X.astype(np.int32),), TypeError,
     r"floating dtype.*got int32"),
    ("bool-input", lambda x: jaxbn.batch_norm(P3, x), (X > 0,), TypeError, r"floating dtype.*bool"),
    ("int-input-layer", lambda x: jaxbn.layer_norm(P3, x), (X.astype(np.int32),), TypeError,
     r"floating dtype"),
    ("int-input-group", lambda x: jaxbn.group_norm(P6, x, 2), (X4.astype(np.int8),), TypeError,
     r"floating dtype"),
    ("int-input-eval", lambda x: jaxbn.batch_norm_eval(P3, S3, x), (X.astype(np.int32),),
     TypeError, r"floating dtype"),
    ("axis-out-of-range", lambda x: jaxbn.batch_norm(P3, x, axis=2), (X,), ValueError,
     r"axis 2 is out of range for an input of rank 2 \(valid: -2 to 1\)"),
    ("neg-axis-out-of-range", lambda x: jaxbn.batch_norm(P3, x, axis=-3), (X,), ValueError,
     r"axis -3 is out of range"),
    ("tuple-axis-out-of-range", lambda x: jaxbn.batch_norm(P3, x, axis=(1, 4)), (X4,),
     ValueError, r"axis 4 is out of range for an input of rank 4"),
    ("empty-axis", lambda x: jaxbn.batch_norm(P3, x, axis=()), (X,), ValueError,
     r"at least one feature axis"),
    ("float-axis", lambda x: jaxbn.batch_norm(P3, x, axis=1.0), (X,), TypeError,
     r"axis to be an int"),
    ("str-axis", lambda x: jaxbn.batch_norm(P3, x, axis="channels"), (X,), TypeError,
     r"axis to be an int"),
    ("layer-axis-out-of-range", lambda x: jaxbn.layer_norm(P3, x, axis=5), (X,), ValueError,
     r"out of range"),
    ("batch-of-one", lambda x: jaxbn.batch_norm(P3, x), (X[:1],), ValueError,
     r"batch of one.*batch_norm_eval"),
    ("batch-of-one-train", lambda x: jaxbn.batch_norm_train(P3, S3, x), (X[:1],), ValueError,
     r"batch of one"),
    ("batch-of-one-autodiff", lambda x: batch_norm_autodiff(P3, x), (X[:1],), ValueError,
     r"batch of one"),
    ("batch-of-one-staged", lambda x: batch_norm_staged(P3, x), (X[:1],), ValueError,
     r"batch of one"),
    ("batch-of-one-nchw-1x1", lambda x: jaxbn.batch_norm(P6, x, axis=-1), (X4[:1, :1, :1],),
     ValueError, r"shape \(1, 1, 1, 6\) the batch holds a single value per feature"),
    ("batch-norm-1d", lambda x: jaxbn.batch_norm(P3, x), (X[0],), ValueError,
     r"no axis besides the feature axes.*\(N, \.\.\., C\)"),
    ("layer-norm-one-feature", lambda x: jaxbn.layer_norm(jaxbn.init(1), x), (X[:, :1],),
     ValueError, r"layer_norm normalizes each example over its feature axes \(1,\).*single value"),
    ("instance-norm-1x1", lambda x: jaxbn.group_norm(P6, x, 6), (X4[:, :1, :1],), ValueError,
     r"group_norm with num_groups=6 .*groups of a single value"),
    ("mask-wrong-shape", lambda x, m: jaxbn.batch_norm(P3, x, mask=m), (X, np.ones(5, bool)),
     ValueError, r"mask broadcastable to \(4,\).*got shape \(5,\)"),
    ("mask-feature-shaped", lambda x, m: jaxbn.batch_norm(P3, x, mask=m),
     (X, np.ones((4, 3), bool)), ValueError, r"mask broadcastable to \(4,\).*got shape \(4, 3\)"),
    ("mask-too-many-dims", lambda x, m: jaxbn.batch_norm(P6, x, mask=m),
     (X4, np.ones((1, 2, 3, 3), bool)), ValueError, r"mask broadcastable to \(2, 3, 3\)"),
    ("mask-nhwc-wrong", lambda x, m: jaxbn.batch_norm(P6, x, mask=m), (X4, np.ones((2, 2), bool)),
     ValueError, r"mask broadcastable to \(2, 3, 3\).*got shape \(2, 2\)"),
    ("mask-not-bool", lambda x, m: jaxbn.batch_norm(P3, x, mask=m), (X, np.ones(4, np.float32)),
     TypeError, r"boolean mask, got dtype float32"),
    ("mask-int", lambda x, m: jaxbn.batch_norm_train(P3, S3, x, mask=m), (X, np.ones(4, np.int32)),
     TypeError, r"boolean mask, got dtype int32"),
    ("mask-staged", lambda x, m: batch_norm_staged(P3, x, mask=m), (X, np.ones(3, bool)),
     ValueError, r"mask broadcastable"),
    ("groups-not-dividing", lambda x: jaxbn.group_norm(P6, x, 4), (X4,), ValueError,
     r"(?=.*C=6)(?=.*num_groups=4)"),
    ("groups-zero", lambda x: jaxbn.group_norm(P6, x, 0), (X4,), ValueError,
     r"positive divisor.*C=6.*num_groups=0"),
    ("groups-too-many", lambda x: jaxbn.group_norm(P6, x, 12), (X4,), ValueError,
     r"C=6.*num_groups=12"),
    ("group-norm-rank-1", lambda x: jaxbn.group_norm(P6, x, 2), (X4[0, 0, 0],), ValueError,
     r"rank >= 2"),
    ("group-params-shape", lambda x: jaxbn.group_norm(P3, x, 3), (X4,), ValueError,
     r"params gamma of shape \(6,\)"),
    ("momentum-neg", lambda x: jaxbn.batch_norm_train(P3, S3, x, momentum=-0.1), (X,),
     ValueError, r"momentum in \[0, 1\], got -0.1"),
    ("momentum-big", lambda x: jaxbn.batch_norm_train(P3, S3, x, momentum=1.5), (X,),
     ValueError, r"momentum in \[0, 1\], got 1.5"),
    ("momentum-nan", lambda x: jaxbn.batch_norm_train(P3, S3, x, momentum=float("nan")), (X,),
     ValueError, r"momentum in \[0, 1\], got nan"),
    ("eps-neg", lambda x: jaxbn.batch_norm(P3, x, eps=-1e-5), (X,), ValueError,
     r"eps to be a non-negative Python number, got -1e-05"),
    ("eps-nan", lambda x: jaxbn.batch_norm(P3, x, eps=float("nan")), (X,), ValueError,
     r"non-negative.*nan"),
    ("eps-str", lambda x: jaxbn.batch_norm(P3, x, eps="1e-5"), (X,), ValueError,
     r"non-negative Python number"),
    ("eps-layer", lambda x: jaxbn.layer_norm(P3, x, eps=-1.0), (X,), ValueError, r"eps"),
    ("eps-group", lambda x: jaxbn.group_norm(P6, x, 2, eps=-1.0), (X4,), ValueError, r"eps"),
    ("eps-eval", lambda x: jaxbn.batch_norm_eval(P3, S3, x, eps=-1.0), (X,), ValueError, r"eps"),
    ("dict-missing-beta", lambda x: jaxbn.batch_norm({"gamma": jnp.ones(3)}, x), (X,), ValueError,
     r"keys 'gamma' and 'beta', got keys \['gamma'\]"),
    ("dict-missing-both", lambda x: jaxbn.layer_norm({"scale": jnp.ones(3)}, x), (X,), ValueError,
     r"keys 'gamma' and 'beta', got keys \['scale'\]"),
    ("params-wrong-type", lambda x: jaxbn.batch_norm([jnp.ones(3), jnp.zeros(3)], x), (X,),
     TypeError, r"BatchNormParams or a dict.*got list"),
    ("stats-wrong-type", lambda x: jaxbn.batch_norm_train(P3, (jnp.zeros(3), jnp.ones(3)), x),
     (X,), TypeError, r"stats to be jaxbn.RunningStats or a dict with 'mean' and 'var', got tuple"),
    ("stats-dict-missing-var", lambda x: jaxbn.batch_norm_eval(P3, {"mean": 0}, x), (X,),
     ValueError, r"stats with keys 'mean' and 'var', got keys \['mean'\]"),
    ("stats-shape", lambda x: jaxbn.batch_norm_train(P3, jaxbn.init_stats(2), x), (X,),
     ValueError, r"running stats mean of shape \(3,\).*got shape \(2,\)"),
    ("stats-shape-eval", lambda x: jaxbn.batch_norm_eval(P3, jaxbn.init_stats(4), x), (X,),
     ValueError, r"running stats mean of shape \(3,\)"),
]


@pytest.mark.parametrize(("fn", "args", "exc", "match"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["eager", "jit", "eval_shape"])
def test_error(fn, args, exc, match, mode):
    """Each error is raised eagerly, under jit, and by tracing alone (jax.eval_shape)."""
    run = {
        "eager": lambda: fn(*args),
        "jit": lambda: jax.jit(fn)(*args),
        "eval_shape": lambda: jax.eval_shape(fn, *args),
    }[mode]
    with pytest.raises(exc, match=match):
        run()


# The error cases with the one wrong thing fixed: (id, function, arguments).
VALID = [
    ("params-shape", lambda x: jaxbn.batch_norm(P3, x), (X,)),
    ("nhwc-batch-of-one", lambda x: jaxbn.batch_norm(P6, x, axis=-1), (X4[:1],)),  # H*W=9
    ("nchw-1x1", lambda x: jaxbn.batch_norm(jaxbn.init(3), x, axis=1), (X4[:, :, :1, :1],)),
    ("axis-in-range", lambda x: jaxbn.batch_norm(P3, x, axis=-2), (X.T,)),
    ("numpy-int-axis", lambda x: jaxbn.batch_norm(P3, x, axis=np.int64(-1)), (X,)),
    ("list-axis", lambda x: jaxbn.batch_norm(P3, x, axis=[1]), (X,)),
    ("tuple-axis", lambda x: jaxbn.batch_norm(jaxbn.init((3, 3)), x, axis=(1, 2)), (X4,)),
    ("groups-dividing", lambda x: jaxbn.group_norm(P6, x, 3), (X4,)),
    ("instance-norm", lambda x: jaxbn.group_norm(P6, x, 6), (X4,)),  # over H*W=9
    ("momentum-zero", lambda x: jaxbn.batch_norm_train(P3, S3, x, momentum=0.0)[0], (X,)),
    ("eps-zero", lambda x: jaxbn.batch_norm(P3, x, eps=0), (X,)),
    ("mask", lambda x, m: jaxbn.batch_norm(P3, x, mask=m), (X, np.ones(4, bool))),
    ("mask-nhwc-broadcast", lambda x, m: jaxbn.batch_norm(P6, x, mask=m),
     (X4, np.ones((3, 1), bool))),
    ("axis-name-none", lambda x: jaxbn.batch_norm(P3, x, axis_name=None), (X,)),
]


@pytest.mark.parametrize(("fn", "args"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_error_cases_are_valid_with_the_fix_applied(fn, args):
    """Once the one wrong thing is fixed the checks pass (they are not over-eager): the call
    traces (all checks run at trace time) to an output of x's shape and dtype."""
    y = jax.eval_shape(fn, *args)
    assert (y.shape, y.dtype) == (args[0].shape, args[0].dtype)


def test_batch_of_one_nhwc_with_spatial_extent_is_fine():
    y = jax.jit(lambda x: jaxbn.batch_norm(P6, x))(X4[:1])
    assert y.shape == (1, 3, 3, 6)
    np.testing.assert_allclose(np.asarray(y).mean((0, 1, 2)), 0, atol=1e-6)


def test_batch_of_one_across_a_mapped_axis_of_size_one():
    # vmap(axis_name=...) over a batch of one: the statistics would be over one value.
    per_example = jax.vmap(lambda xi: jaxbn.batch_norm(P3, xi, axis_name="n"), axis_name="n")
    with pytest.raises(ValueError, match=r"single value per feature \(mapped axis 'n' included\)"):
        per_example(X[:1])
    assert per_example(X[:2]).shape == (2, 3)


def test_traced_eps_and_axis_name_static_argnames():
    with pytest.raises(ValueError, match=r"eps to be a non-negative.*static_argnames"):
        jax.jit(jaxbn.batch_norm)(P3, X, eps=1e-3)
    with pytest.raises(TypeError, match=r"axis to be an int.*static_argnames"):
        jax.jit(jaxbn.batch_norm)(P3, X, axis=-1)
    static = jax.jit(jaxbn.batch_norm, static_argnames=("axis", "eps"))
    np.testing.assert_allclose(static(P3, X, axis=-1, eps=1e-3),
                               jaxbn.batch_norm(P3, X, eps=1e-3), rtol=1e-6, atol=1e-6)


def test_traced_momentum_is_allowed():
    # momentum only weighs an average, so a traced value (a schedule) is fine.
    S3 = jaxbn.init_stats(3)
    _, traced = jax.jit(jaxbn.batch_norm_train)(P3, S3, X, momentum=0.75)
    _, concrete = jaxbn.batch_norm_train(P3, S3, X, momentum=0.75)
    np.testing.assert_allclose(traced.var, concrete.var, rtol=1e-6)
    np.testing.assert_allclose(traced.mean, concrete.mean, rtol=1e-6, atol=1e-7)


def test_scalar_input_numpy_integer_groups_and_numpy_momentum():
    with pytest.raises(ValueError, match=r"Expected x with at least one axis, got a scalar"):
        jaxbn.batch_norm(P3, np.float32(1.0))
    x8 = np.random.default_rng(1).normal(size=(2, 3, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(jaxbn.group_norm(jaxbn.init(8), x8, np.int64(2)),
                               jaxbn.group_norm(jaxbn.init(8), x8, 2))
    with pytest.raises(ValueError, match=r"positive divisor .* C=8, got num_groups=True"):
        jaxbn.group_norm(jaxbn.init(8), x8, True)
    with pytest.raises(ValueError, match=r"momentum in \[0, 1\]"):
        jaxbn.batch_norm_train(P3, jaxbn.init_stats(3), X, momentum=np.float32(1.5))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_traced_momentum_keeps_running_stats_dtype(dtype):
    stats = jaxbn.init_stats(3, dtype)
    _, new = jax.jit(jaxbn.batch_norm_train)(P3, stats, X, momentum=jnp.float32(0.9))
    assert new.mean.dtype == dtype and new.var.dtype == dtype


@pytest.mark.parametrize("call", [
    lambda: jaxbn.batch_norm(P3, X, eps=True),
    lambda: jaxbn.layer_norm(P3, X, eps=np.bool_(True)),
    lambda: jaxbn.batch_norm(P3, X, eps=float("inf")),
], ids=["bool", "numpy-bool", "inf"])
def test_eps_bool_or_infinite_rejected(call):
    with pytest.raises(ValueError, match=r"eps to be a non-negative Python number.*not a bool"):
        call()


@pytest.mark.parametrize("momentum", [
    True, False, jnp.asarray(1.5), np.float64(-0.1), jnp.asarray([0.9, 0.9]),
    jnp.asarray(True), "0.9",
], ids=["True", "False", "jnp-1.5", "np-negative", "vector", "jnp-bool", "str"])
def test_momentum_bool_or_out_of_range_array_rejected(momentum):
    with pytest.raises(ValueError, match=r"momentum"):
        jaxbn.batch_norm_train(P3, S3, X, momentum=momentum)


def test_momentum_concrete_array_in_range_accepted():
    _, from_array = jaxbn.batch_norm_train(P3, S3, X, momentum=jnp.asarray(0.5))
    _, from_float = jaxbn.batch_norm_train(P3, S3, X, momentum=0.5)
    np.testing.assert_array_equal(from_array.var, from_float.var)
    jaxbn.batch_norm_train(P3, S3, X, momentum=1)  # ints 0 and 1 are in range


def test_traced_non_scalar_momentum_rejected():
    with pytest.raises(ValueError, match=r"momentum to be a floating scalar, got float32\[2\]"):
        jax.jit(jaxbn.batch_norm_train)(P3, S3, X, momentum=jnp.ones(2))


def test_traced_num_groups_says_to_mark_it_static():
    x8 = np.random.default_rng(1).normal(size=(2, 3, 3, 8)).astype(np.float32)
    with pytest.raises(TypeError, match=r"num_groups.*static_argnames=\('num_groups',\)"):
        jax.jit(jaxbn.group_norm)(jaxbn.init(8), x8, 2)
    static = jax.jit(jaxbn.group_norm, static_argnames=("num_groups",))
    np.testing.assert_allclose(static(jaxbn.init(8), x8, 2), jaxbn.group_norm(jaxbn.init(8), x8, 2),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [
    lambda x: jaxbn.batch_norm(P3, x),
    lambda x: jaxbn.batch_norm_train(P3, S3, x),
    lambda x: batch_norm_autodiff(P3, x),
], ids=["batch_norm", "train", "autodiff"])
def test_empty_batch_says_empty(fn):
    with pytest.raises(ValueError, match=r"shape \(0, 3\) the batch is empty"):
        fn(X[:0])
