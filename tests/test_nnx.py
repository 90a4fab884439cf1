"""jaxbn.nnx against flax.nnx's own modules (``use_fast_variance=False``): outputs,
running statistics, gradients, state, dtypes, rng use, shard_map, a trained model,
checkpoints both ways, and the errors for what jaxbn refuses.

float64 comparisons use ``RTOL64 = 1e-10`` relative to the largest magnitude of
Flax's array (``assert_trees_all_close``). Flax mixes float32 state with float64
input, so every comparison runs under standard dtype promotion (the suite is
strict otherwise); Flax's own float32 write of float64 running statistics warns,
and only that warning of Flax's module is silenced (:func:`_flax_quiet`).
"""

from __future__ import annotations

import contextlib
import doctest
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _env import DEVICE_COUNT as NDEV
from flax import nnx
from helpers import RTOL64, assert_leaves_close_by_dtype, assert_trees_all_close
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import nnx as jnnx

INIT = {"scale_init": nnx.initializers.uniform(1.0), "bias_init": nnx.initializers.normal(1.0)}


@contextlib.contextmanager
def _float64():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        yield


@contextlib.contextmanager
def _flax_quiet():
    """Flax's BatchNorm writes float64 statistics into float32 arrays, which warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "scatter inputs have incompatible types",
                                FutureWarning)
        yield


def _init(name):
    """Random scale and bias initializers (RMSNorm has no bias)."""
    return {k: v for k, v in INIT.items() if name != "RMSNorm" or k == "scale_init"}


def _pair(name, *args, **kw):
    """The Flax module and jaxbn's, built from the same arguments and rng seed."""
    kw = {"use_fast_variance": False, **kw}
    return (getattr(nnx, name)(*args, **kw, rngs=nnx.Rngs(0)),
            getattr(jnnx, name)(*args, **kw, rngs=nnx.Rngs(0)))


def _x(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(1.5, 2.0, shape), dtype)


@nnx.jit
def _vjp_step(model, x, dy):
    """``(y, (d params, dx))`` of ``sum(model(x) * dy)``; the module's state is updated."""
    def loss(model, x):
        y = model(x)
        return jnp.sum(y * dy), y

    (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, grads


@nnx.jit
def _apply(model, x):
    return model(x)


def _check_state(a, b):
    sa, sb = nnx.state(a), nnx.state(b)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for va, vb in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        assert (va.shape, va.dtype) == (vb.shape, vb.dtype)


def _check_steps(flax_model, jaxbn_model, shape, steps):
    """Compares ``steps`` training steps (outputs, gradients, running statistics)."""
    for step in range(steps):
        x, dy = _x(10 + step, shape), _x(20 + step, shape)
        with _flax_quiet():
            want = _vjp_step(flax_model, x, dy)
        got = _vjp_step(jaxbn_model, x, dy)
        assert_trees_all_close(got, want, RTOL64, err_msg=f"step {step}")
        assert_trees_all_close(nnx.state(jaxbn_model), nnx.state(flax_model), RTOL64)
    _check_state(flax_model, jaxbn_model)


class _Masked(nnx.Module):
    """A BatchNorm called with a fixed mask."""

    def __init__(self, bn, mask):
        self.bn = bn
        self.mask = nnx.Variable(mask)

    def __call__(self, x):
        return self.bn(x, mask=self.mask[...])


def _same_default(a, b):
    """Equal defaults; initializers (new closures per call in Flax) by their values."""
    if a is b or not callable(a):
        return a == b
    key = jax.random.key(0)
    return np.array_equal(a(key, (3,), jnp.float32), b(key, (3,), jnp.float32))


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm"])
def test_signatures_are_flaxs(name):
    for method in ("__init__", "__call__"):
        want = inspect.signature(getattr(getattr(nnx, name), method)).parameters
        got = inspect.signature(getattr(getattr(jnnx, name), method)).parameters
        assert list(got) == list(want)
        for p in want:
            assert got[p].kind == want[p].kind, (method, p)
            assert _same_default(got[p].default, want[p].default), (method, p)


BN_CASES = {
    "ND": ((8, 5), {}),
    "NHWC-no-scale": ((4, 3, 3, 5), {"use_scale": False}),
    "NCHW-axis1-no-bias": ((4, 5, 3, 3), {"axis": 1, "use_bias": False}),
}


@pytest.mark.parametrize("shape,kw", BN_CASES.values(), ids=BN_CASES.keys())
def test_batch_norm_train_and_eval_match_flax(shape, kw):
    with _float64():
        axis = kw.get("axis", -1)
        a, b = _pair("BatchNorm", shape[axis], momentum=0.9, **INIT, **kw)
        _check_steps(a, b, shape, steps=3)
        a.eval()
        b.eval()
        x = _x(30, shape)
        assert_trees_all_close(_apply(b, x), _apply(a, x), RTOL64)
        assert_trees_all_close(_vjp_step(b, x, x), _vjp_step(a, x, x), RTOL64)


@pytest.mark.parametrize("mask_shape", [(8, 1), (1, 1)], ids=["rows", "all-kept"])
def test_batch_norm_mask_matches_flax(mask_shape):
    """Flax normalizes masked-out rows too (with the kept rows' statistics)."""
    with _float64():
        a, b = _pair("BatchNorm", 5, momentum=0.9, **INIT)
        mask = np.random.default_rng(3).random(mask_shape) < 0.6
        mask.flat[:2] = True, False
        if mask.size == 1:
            mask[...] = True
        mask = jnp.asarray(mask)
        _check_steps(_Masked(a, mask), _Masked(b, mask), (8, 5), steps=2)


LAYER_CASES = {
    "LayerNorm": ("LayerNorm", (3, 4, 6), 6, {}),
    "LayerNorm-reduce-1-2-feature-last": (
        "LayerNorm", (2, 3, 4, 5), 5, {"reduction_axes": (1, 2), "feature_axes": -1}),
    "LayerNorm-two-axes": (
        "LayerNorm", (3, 4, 5), 20, {"reduction_axes": (-2, -1), "feature_axes": (-2, -1)}),
    "LayerNorm-no-bias": ("LayerNorm", (4, 6), 6, {"use_bias": False}),
    "RMSNorm": ("RMSNorm", (3, 4, 6), 6, {}),
    "RMSNorm-reduce-1-2-feature-last": (
        "RMSNorm", (2, 3, 4, 5), 5, {"reduction_axes": (1, 2), "feature_axes": -1}),
    "RMSNorm-no-scale": ("RMSNorm", (4, 6), 6, {"use_scale": False}),
    "GroupNorm-NHWC-G3": ("GroupNorm", (2, 3, 3, 6), 6, {"num_groups": 3}),
    "GroupNorm-group-size-2": ("GroupNorm", (2, 5, 6), 6, {"num_groups": None, "group_size": 2}),
    "GroupNorm-NC-explicit-axes": (
        "GroupNorm", (4, 12), 12, {"num_groups": 3, "reduction_axes": (1,), "use_scale": False}),
}


@pytest.mark.parametrize("name,shape,features,kw", LAYER_CASES.values(), ids=LAYER_CASES.keys())
def test_per_example_norms_match_flax(name, shape, features, kw):
    with _float64():
        a, b = _pair(name, features, **_init(name), **kw)
        _check_state(a, b)
        x, dy = _x(1, shape), _x(2, shape)
        assert_trees_all_close(_vjp_step(b, x, dy), _vjp_step(a, x, dy), RTOL64)


# Three cases in the fast suite, the rest marked slow.
DTYPE_CASES = {
    "float32": (jnp.float32, None, False),
    "bfloat16-in": (jnp.bfloat16, None, False),
    "bfloat16-dtype": pytest.param(jnp.bfloat16, jnp.bfloat16, False, marks=pytest.mark.slow),
    "float64-in": (jnp.float64, None, True),
    "float32-in-float64-dtype": pytest.param(jnp.float32, jnp.float64, True,
                                             marks=pytest.mark.slow),
}
MODULES = {"BatchNorm": (4,), "LayerNorm": (4,), "RMSNorm": (4,), "GroupNorm": (4, 2)}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("x_dtype,dtype,x64", DTYPE_CASES.values(), ids=DTYPE_CASES.keys())
def test_dtypes_match_flax(name, x_dtype, dtype, x64):
    """Output and state dtypes as Flax's, in training and evaluation, values close."""
    with jax.enable_x64(x64), jax.numpy_dtype_promotion("standard"):
        a, b = _pair(name, *MODULES[name], dtype=dtype, **_init(name))
        x = _x(0, (6, 3, 4), x_dtype)
        with _flax_quiet():
            want = [_apply(a, x), _apply(a, x)]
        got = [_apply(b, x), _apply(b, x)]
        if name == "BatchNorm":
            a.eval()
            b.eval()
            want.append(_apply(a, x))
            got.append(_apply(b, x))
        half = jnp.bfloat16 in (x_dtype, dtype)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
        assert_leaves_close_by_dtype(got, want, half=half)
        _check_state(a, b)
        assert_leaves_close_by_dtype(nnx.state(b), nnx.state(a), half=half)


@pytest.mark.parametrize("name,args,kw", [
    ("BatchNorm", (3,), {}), ("BatchNorm", (3,), {"use_scale": False}),
    ("LayerNorm", (3,), {"use_bias": False}), ("RMSNorm", (3,), {}),
    ("GroupNorm", (4,), {"num_groups": 2}), ("GroupNorm", (4,), {"num_groups": 2,
                                                                  "use_scale": False,
                                                                  "use_bias": False}),
])
def test_rng_use_matches_flax(name, args, kw):
    """A layer created after the norm from the same Rngs initializes identically."""
    def build(module):
        rngs = nnx.Rngs(7)
        norm = getattr(module, name)(*args, **kw, **_init(name), rngs=rngs)
        return norm, nnx.Linear(3, 2, rngs=rngs)

    (na, la), (nb, lb) = build(nnx), build(jnnx)
    assert_trees_all_close(nnx.state(lb), nnx.state(la), 0.0)
    assert_trees_all_close(nnx.state(nb), nnx.state(na), 0.0)


def test_train_eval_view_and_call_precedence():
    x = _x(0, (6, 3), jnp.float32)
    ref = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    bn = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert bn.use_running_average is False
    bn.eval()
    assert bn.use_running_average is True
    np.testing.assert_array_equal(bn(x), x / np.sqrt(1 + 1e-5))  # running stats 0 and 1
    view = nnx.view(bn, use_running_average=False)
    assert view.use_running_average is False and bn.use_running_average is True
    y = view(x)
    np.testing.assert_allclose(y, ref(x), rtol=1e-6, atol=1e-6)  # batch statistics
    np.testing.assert_allclose(bn.mean[...], ref.mean[...], rtol=1e-6)  # state shared
    bn(x, use_running_average=False)  # the call argument wins over the attribute
    assert not np.allclose(bn.mean[...], ref.mean[...])
    bn.train()
    assert bn.use_running_average is False
    none = jnnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="No `use_running_average` argument"):
        none(x)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((NDEV,), ("b",))


def _sharded_step(model, mesh):
    """One training step of ``model`` under shard_map over the batch: y, new stats, grads."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def run(params, stats, x, dy):
        def loss(model, x):
            y = model(x)
            return jnp.sum(y * dy), y

        model = nnx.merge(graphdef, params, stats)
        (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        return y, nnx.state(model, nnx.BatchStat), grads

    return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P(), P("b"), P("b")),
                                 out_specs=(P("b"), P(), (P(), P("b"))))), params, stats


def test_batch_norm_shard_map_axis_name_matches_flax(mesh):
    """Synchronized statistics over 8 devices (2 examples each) equal Flax's."""
    with _float64():
        a, b = _pair("BatchNorm", 3, momentum=0.9, axis_name="b", **INIT)
        x, dy = (jax.device_put(_x(seed, (16, 2, 3)), NamedSharding(mesh, P("b")))
                 for seed in (0, 1))
        with _flax_quiet():
            fa, pa, sa = _sharded_step(a, mesh)
            want = fa(pa, sa, x, dy)
        fb, pb, sb = _sharded_step(b, mesh)
        assert_trees_all_close(fb(pb, sb, x, dy), want, RTOL64)


class _MLP(nnx.Module):
    """Linear - BatchNorm - relu - Linear (no bias before the norm: its gradient is 0 up
    to round-off, which a relative comparison cannot judge)."""

    def __init__(self, norms, rngs):
        self.lin1 = nnx.Linear(4, 8, use_bias=False, rngs=rngs)
        self.bn = norms.BatchNorm(8, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.lin2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.lin2(nnx.relu(self.bn(self.lin1(x))))


@nnx.jit
def _train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def _train(norms, steps=4):
    model = _MLP(norms, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    losses = []
    for step in range(steps):
        x, y = _x(step, (16, 4)), _x(100 + step, (16, 3))
        losses.append(_train_step(model, optimizer, x, y))
    return model, losses


@pytest.fixture(scope="module")
def trained():
    """The MLP trained with Flax's BatchNorm and with jaxbn's, float64: (model, losses)."""
    with _float64():
        with _flax_quiet():
            flax_run = _train(nnx)
        return flax_run, _train(jnnx)


@pytest.mark.slow
def test_small_model_trains_as_with_flax(trained):
    """nnx.jit + nnx.Optimizer(sgd with momentum): same losses, parameters and statistics."""
    (ma, la), (mb, lb) = trained
    assert_trees_all_close(lb, la, RTOL64)
    assert_trees_all_close(nnx.state(mb), nnx.state(ma), RTOL64)
    _check_state(ma, mb)


@pytest.mark.slow
def test_checkpoints_swap_both_ways(trained):
    """The state of a model built with Flax's modules loads into jaxbn's, and back."""
    (ma, _), (mb, _) = trained
    with _float64():
        x = _x(50, (5, 4))
        # (module built with Flax's norms, with jaxbn's), the state loaded into the second
        # from the first, then into the first from the second
        for flax_m, jaxbn_m, load_into_jaxbn in [(nnx.clone(ma), _MLP(jnnx, nnx.Rngs(1)), True),
                                                 (_MLP(nnx, nnx.Rngs(1)), nnx.clone(mb), False)]:
            source, target = (flax_m, jaxbn_m) if load_into_jaxbn else (jaxbn_m, flax_m)
            nnx.update(target, nnx.state(source))
            assert_trees_all_close(nnx.state(target), nnx.state(source), 0.0)
            for mode in ("eval", "train"):
                getattr(flax_m, mode)()
                getattr(jaxbn_m, mode)()
                with _flax_quiet():
                    want = flax_m(x)
                got = jaxbn_m(x)
                assert_trees_all_close((got, nnx.state(jaxbn_m)), (want, nnx.state(flax_m)),
                                       RTOL64, err_msg=mode)


ERRORS = [
    ("BatchNorm", (3,), {"axis_index_groups": [[0, 1]]}, "axis_index_groups"),
    ("LayerNorm", (3,), {"axis_index_groups": [[0, 1]]}, "axis_index_groups"),
    ("RMSNorm", (3,), {"axis_index_groups": [[0, 1]]}, "axis_index_groups"),
    ("GroupNorm", (4,), {"num_groups": 2, "axis_index_groups": [[0]]}, "axis_index_groups"),
    ("LayerNorm", (3,), {"axis_name": "b"}, "axis_name='b' is not supported"),
    ("RMSNorm", (3,), {"axis_name": "b"}, "axis_name='b' is not supported"),
    ("GroupNorm", (4,), {"num_groups": 2, "axis_name": "b"}, "axis_name='b' is not supported"),
    ("GroupNorm", (4,), {"num_groups": 3}, r"Number of groups \(3\) does not divide"),
]


@pytest.mark.parametrize("name,args,kw,match", ERRORS)
def test_unsupported_constructor_arguments_raise(name, args, kw, match):
    with pytest.raises(ValueError, match=match):
        getattr(jnnx, name)(*args, **kw, rngs=nnx.Rngs(0))


def test_unsupported_call_arguments_raise():
    x = _x(0, (4, 3, 4), jnp.float32)
    mask = jnp.ones((4, 3, 1), bool)
    for norm in (jnnx.LayerNorm(4, rngs=nnx.Rngs(0)), jnnx.RMSNorm(4, rngs=nnx.Rngs(0)),
                 jnnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match=r"mask=.*is not supported.*Supported: None"):
            norm(x, mask=mask)
    bn = jnnx.BatchNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask=.*size 1 on the feature axes"):
        bn(x, mask=jnp.ones((4, 3, 4), bool))
    with pytest.raises(ValueError, match="mask together with axis_name"):
        jnnx.BatchNorm(4, axis_name="b", rngs=nnx.Rngs(0))(x, mask=mask)
    gn = jnnx.GroupNorm(4, num_groups=2, reduction_axes=(-1,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"reduction_axes=\(-1,\) is not supported"):
        gn(x)


def test_docstring_examples_run():
    failed, attempted = doctest.testmod(jnnx, raise_on_error=False, report=True)
    assert attempted > 0 and failed == 0
