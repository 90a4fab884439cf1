"""jaxbn.linen against flax.linen's own modules (``use_fast_variance=False``): init (a
batch of one included), outputs, batch_stats, gradients, variables, dtypes, shard_map,
a trained model, variables swapped both ways, and the errors for what jaxbn refuses.

float64 comparisons use ``RTOL64 = 1e-10`` relative to the largest magnitude of
Flax's array (``assert_trees_all_close``), under standard dtype promotion (Flax
mixes float32 variables with float64 input; the suite is strict otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _env import DEVICE_COUNT as NDEV
from helpers import RTOL64, assert_leaves_close_by_dtype, assert_trees_all_close
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import linen as jlinen

INIT = {"scale_init": nn.initializers.uniform(1.0), "bias_init": nn.initializers.normal(1.0)}


@contextlib.contextmanager
def _float64():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        yield


def _init(name):
    """Random scale and bias initializers (RMSNorm has no bias)."""
    return {k: v for k, v in INIT.items() if name != "RMSNorm" or k == "scale_init"}


def _pair(name, **kw):
    """Flax's module and jaxbn's with the same fields."""
    kw = {"use_fast_variance": False, **kw}
    return getattr(nn, name)(**kw), getattr(jlinen, name)(**kw)


def _x(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(1.5, 2.0, shape), dtype)


def _call_args(train, mask=None):
    """BatchNorm's call arguments: ``train`` None (other norms), True or False."""
    kw = {} if train is None else {"use_running_average": not train}
    return kw if mask is None else {**kw, "mask": mask}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_with_output(module, x, train):
    return module.init_with_output(jax.random.key(0), x, **_call_args(train))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _vjp(module, variables, x, dy, train, mask=None):
    """``(y, new batch_stats, (d params, dx))`` of ``sum(y * dy)``."""
    kw = _call_args(train, mask)

    def loss(params, x):
        y, new = module.apply({**variables, "params": params}, x, mutable=["batch_stats"], **kw)
        return jnp.sum(y * dy), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    return y, new, grads


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _init_and_vjp(a, b, x, dy, train):
    """For Flax's module ``a`` and jaxbn's ``b``, in one compiled program: ``init_with_output``
    on ``x``, then :func:`_vjp` from those variables; a training BatchNorm (``train``
    True) also evaluates, ``_vjp`` with ``train=False``, from its updated statistics,
    and its second item is ``(training vjp, evaluation vjp)``."""
    out = []
    for m in (a, b):
        init = _init_with_output.__wrapped__(m, x, train)
        result = _vjp.__wrapped__(m, init[1], x, dy, train)
        if train:
            updated = {**init[1], **result[1]}
            result = (result, _vjp.__wrapped__(m, updated, x, dy, False))
        out.append((init, result))
    return out


def _check_same_layout(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm"])
def test_fields_and_call_signatures_are_flaxs(name):
    want = {f.name: f.default for f in dataclasses.fields(getattr(nn, name))}
    got = {f.name: f.default for f in dataclasses.fields(getattr(jlinen, name))}
    assert list(got) == list(want)
    assert all(got[k] is want[k] or got[k] == want[k] for k in want)
    want = inspect.signature(getattr(nn, name).__call__).parameters
    got = inspect.signature(getattr(jlinen, name).__call__).parameters
    assert [(p.name, p.kind, p.default) for p in got.values()] == [
        (p.name, p.kind, p.default) for p in want.values()]


BN_CASES = {
    "ND": ((8, 5), {}, None),
    "NHWC-no-scale": ((4, 3, 3, 5), {"use_scale": False}, None),
    "NCHW-axis1-no-bias": ((4, 5, 3, 3), {"axis": 1, "use_bias": False}, None),
    "ND-mask": ((8, 5), {}, (8, 1)),
    "NHWC-mask-NHW1": pytest.param((4, 3, 3, 5), {}, (4, 3, 3, 1), marks=pytest.mark.slow),
}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _bn_init_steps_eval(a, b, one, xs, dys, x_eval, mask):
    """For Flax's module ``a`` and jaxbn's ``b``, in one compiled program: init on
    ``one``; a training step (with ``mask``) per entry of ``xs``/``dys``, each applied
    to the variables the previous one updated; evaluation on ``x_eval``. Per module:
    ``((init y, init variables), [step results], evaluation result)``."""
    out = []
    for m in (a, b):
        init = _init_with_output.__wrapped__(m, one, True)
        v, steps = init[1], []
        for x, dy in zip(xs, dys):
            steps.append(_vjp.__wrapped__(m, v, x, dy, True, mask))
            v = {**v, **steps[-1][1]}
        out.append((init, steps, _vjp.__wrapped__(m, v, x_eval, x_eval, False)))
    return out


@pytest.mark.parametrize("shape,kw,mask_shape", BN_CASES.values(), ids=BN_CASES.keys())
def test_batch_norm_init_train_and_eval_match_flax(shape, kw, mask_shape):
    """init on a batch of one; three training steps; evaluation (one compiled program)."""
    with _float64():
        a, b = _pair("BatchNorm", momentum=0.9, **INIT, **kw)
        one = _x(0, (1,) + shape[1:])
        mask = None
        if mask_shape is not None:
            mask = np.random.default_rng(3).random(mask_shape) < 0.6
            mask.flat[:2] = True, False
            mask = jnp.asarray(mask)
        xs = [_x(10 + step, shape) for step in range(3)]
        dys = [_x(20 + step, shape) for step in range(3)]
        (init_a, steps_a, eval_a), (init_b, steps_b, eval_b) = _bn_init_steps_eval(
            a, b, one, xs, dys, _x(30, shape), mask)
        assert_trees_all_close(init_b, init_a, RTOL64)
        _check_same_layout(init_b[1], init_a[1])
        for step, (want, got) in enumerate(zip(steps_a, steps_b)):
            assert_trees_all_close(got, want, RTOL64, err_msg=f"step {step}")
            _check_same_layout(got[1], want[1])  # float64 after a float64 update
        assert_trees_all_close(eval_b, eval_a, RTOL64)


LAYER_CASES = {
    "LayerNorm": ("LayerNorm", (3, 4, 6), {}),
    "LayerNorm-reduce-1-2-feature-last": (
        "LayerNorm", (2, 3, 4, 5), {"reduction_axes": (1, 2), "feature_axes": -1}),
    "LayerNorm-two-axes": (
        "LayerNorm", (3, 4, 5), {"reduction_axes": (-2, -1), "feature_axes": (-2, -1)}),
    "LayerNorm-no-scale": ("LayerNorm", (4, 6), {"use_scale": False}),
    "RMSNorm": ("RMSNorm", (3, 4, 6), {}),
    "RMSNorm-reduce-1-2-feature-last": (
        "RMSNorm", (2, 3, 4, 5), {"reduction_axes": (1, 2), "feature_axes": -1}),
    "GroupNorm-NHWC-G3": ("GroupNorm", (2, 3, 3, 6), {"num_groups": 3}),
    "GroupNorm-group-size-2": ("GroupNorm", (2, 5, 6), {"num_groups": None, "group_size": 2}),
    "GroupNorm-NC-explicit-axes": (
        "GroupNorm", (4, 12), {"num_groups": 3, "reduction_axes": (1,), "use_bias": False}),
    "GroupNorm-unbatched-C": ("GroupNorm", (12,), {"num_groups": 3}),
}


@pytest.mark.parametrize("name,shape,kw", LAYER_CASES.values(), ids=LAYER_CASES.keys())
def test_per_example_norms_match_flax(name, shape, kw):
    with _float64():
        a, b = _pair(name, **_init(name), **kw)
        (init_a, vjp_a), (init_b, vjp_b) = _init_and_vjp(a, b, _x(1, shape), _x(2, shape), None)
        _check_same_layout(init_b[1], init_a[1])
        assert_trees_all_close(init_b, init_a, RTOL64)
        assert_trees_all_close(vjp_b, vjp_a, RTOL64)


# Three cases in the fast suite, the rest marked slow.
DTYPE_CASES = {
    "float32": (jnp.float32, None, jnp.float32, False),
    "bfloat16-in": (jnp.bfloat16, None, jnp.float32, False),
    "bfloat16-dtype": pytest.param(jnp.bfloat16, jnp.bfloat16, jnp.float32, False,
                                   marks=pytest.mark.slow),
    "bfloat16-params": pytest.param(jnp.bfloat16, None, jnp.bfloat16, False,
                                   marks=pytest.mark.slow),
    "float64-in": (jnp.float64, None, jnp.float32, True),
    "float32-in-float64-dtype": pytest.param(jnp.float32, jnp.float64, jnp.float32, True,
                                             marks=pytest.mark.slow),
}
MODULES = {"BatchNorm": {}, "LayerNorm": {}, "RMSNorm": {}, "GroupNorm": {"num_groups": 2}}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("x_dtype,dtype,param_dtype,x64", DTYPE_CASES.values(),
                         ids=DTYPE_CASES.keys())
def test_dtypes_match_flax(name, x_dtype, dtype, param_dtype, x64):
    """Output and variable dtypes as Flax's (training, updated statistics, evaluation)."""
    with jax.enable_x64(x64), jax.numpy_dtype_promotion("standard"):
        a, b = _pair(name, dtype=dtype, param_dtype=param_dtype, **_init(name), **MODULES[name])
        x, dy = _x(0, (6, 3, 4), x_dtype), _x(1, (6, 3, 4), x_dtype)
        train = True if name == "BatchNorm" else None
        ((_, va), want), ((_, vb), got) = _init_and_vjp(a, b, x, dy, train)
        _check_same_layout(vb, va)
        _check_same_layout(got, want)
        half = jnp.bfloat16 in (x_dtype, dtype, param_dtype)
        assert_leaves_close_by_dtype(got, want, half=half)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((NDEV,), ("b",))


def test_batch_norm_shard_map_axis_name_matches_flax(mesh):
    """Synchronized statistics over 8 devices (2 examples each) equal Flax's."""
    with _float64():
        a, b = _pair("BatchNorm", momentum=0.9, axis_name="b", **INIT)
        x, dy = (jax.device_put(_x(seed, (16, 2, 3)), NamedSharding(mesh, P("b")))
                 for seed in (0, 1))
        variables = _init_with_output(a, x, True)[1]  # init ignores axis_name, as Flax

        def sharded(module):
            return jax.jit(jax.shard_map(
                lambda v, x, dy: _vjp.__wrapped__(module, v, x, dy, True), mesh=mesh,
                in_specs=(P(), P("b"), P("b")), out_specs=(P("b"), P(), (P(), P("b")))))

        want = sharded(a)(variables, x, dy)
        assert_trees_all_close(sharded(b)(variables, x, dy), want, RTOL64)


class _MLP(nn.Module):
    """Dense - BatchNorm - relu - Dense (no bias before the norm: its gradient is 0 up
    to round-off, which a relative comparison cannot judge)."""

    norms: object

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(8, use_bias=False)(x)
        x = self.norms.BatchNorm(use_running_average=not train, momentum=0.9,
                                 use_fast_variance=False)(x)
        return nn.Dense(3)(nn.relu(x))


def _train(norms, steps=4):
    model, tx = _MLP(norms), optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(params):
            out, new = model.apply({**variables, "params": params}, x, True,
                                   mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, **new}, opt_state, loss

    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), _x(0, (1, 4)), True)
    opt_state, losses = tx.init(variables["params"]), []
    for i in range(steps):
        variables, opt_state, loss = step(variables, opt_state, _x(i, (16, 4)),
                                          _x(100 + i, (16, 3)))
        losses.append(loss)
    return model, variables, losses


@pytest.fixture(scope="module")
def trained():
    """The MLP trained with Flax's BatchNorm and with jaxbn's, float64."""
    with _float64():
        return _train(nn), _train(jlinen)


@pytest.mark.slow
def test_small_model_trains_as_with_flax(trained):
    """apply with mutable batch_stats + optax sgd with momentum: same losses and variables."""
    (_, va, la), (_, vb, lb) = trained
    assert_trees_all_close(lb, la, RTOL64)
    assert_trees_all_close(vb, va, RTOL64)
    _check_same_layout(vb, va)


@pytest.mark.slow
def test_variables_swap_both_ways(trained):
    """Variables trained with Flax's modules apply in jaxbn's model, and the reverse."""
    (ma, va, _), (mb, vb, _) = trained
    with _float64():
        x = _x(50, (5, 4))
        for source, target, variables in [(ma, mb, va), (mb, ma, vb)]:
            assert_trees_all_close(target.apply(variables, x, False),
                                   source.apply(variables, x, False), RTOL64)
            got, new_got = target.apply(variables, x, True, mutable=["batch_stats"])
            want, new_want = source.apply(variables, x, True, mutable=["batch_stats"])
            assert_trees_all_close((got, new_got), (want, new_want), RTOL64)


ERRORS = [
    ("BatchNorm", {"axis_index_groups": [[0, 1]]}, "axis_index_groups"),
    ("BatchNorm", {"force_float32_reductions": False}, "force_float32_reductions=False"),
    ("LayerNorm", {"axis_index_groups": [[0, 1]]}, "axis_index_groups"),
    ("LayerNorm", {"axis_name": "b"}, "axis_name='b' is not supported"),
    ("RMSNorm", {"axis_name": "b"}, "axis_name='b' is not supported"),
    ("RMSNorm", {"force_float32_reductions": False}, "force_float32_reductions=False"),
    ("GroupNorm", {"num_groups": 2, "axis_name": "b"}, "axis_name='b' is not supported"),
    ("GroupNorm", {"num_groups": 2, "reduction_axes": (-1,)},
     r"reduction_axes=\(-1,\) is not supported"),
    ("GroupNorm", {"num_groups": 3}, r"Number of groups \(3\) does not divide"),
    ("GroupNorm", {"num_groups": None, "group_size": 3}, r"Number of channels \(4\) is not"),
]


@pytest.mark.parametrize("name,kw,match", ERRORS)
def test_unsupported_fields_raise(name, kw, match):
    x = _x(0, (4, 3, 4), jnp.float32)
    extra = {"use_running_average": False} if name == "BatchNorm" else {}
    with pytest.raises(ValueError, match=match):
        getattr(jlinen, name)(**kw).init(jax.random.key(0), x, **extra)


def test_unsupported_call_arguments_raise():
    x = _x(0, (4, 3, 4), jnp.float32)
    mask = jnp.ones((4, 3, 1), bool)
    for norm in (jlinen.LayerNorm(), jlinen.RMSNorm(), jlinen.GroupNorm(num_groups=2)):
        with pytest.raises(ValueError, match=r"mask=.*is not supported.*Supported: None"):
            norm.init(jax.random.key(0), x, mask=mask)
    bn = jlinen.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="mask=.*size 1 on the feature axes"):
        bn.apply(variables, x, mask=jnp.ones((4, 3, 4), bool), mutable=["batch_stats"])
    with pytest.raises(ValueError, match="mask=.*size 1 on the feature axes"):  # init too
        bn.init(jax.random.key(0), x, mask=jnp.ones((4, 3, 4), bool))
    with pytest.raises(ValueError, match="use_running_average"):  # Flax's merge_param error
        bn.apply(variables, x, use_running_average=True)


def test_docstring_examples_run():
    failed, attempted = doctest.testmod(jlinen, raise_on_error=False, report=True)
    assert attempted > 0 and failed == 0
