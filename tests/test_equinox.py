"""jaxbn.equinox against equinox.nn: the same fields, state, dtypes and checkpoints, and the
same numbers.

Every comparison runs Equinox's own module and jaxbn's on the same inputs, with
non-trivial weight and bias. Tolerances, relative to the largest magnitude of
Equinox's array (``assert_trees_all_close``): 1e-10 in float64 (``RTOL64``),
5e-6 in float32 (``RTOL32``); bfloat16 input (computed in float32 by both, then
rounded) within two bfloat16 ulps. The running statistics' counter is compared
exactly.
"""

from __future__ import annotations

import dataclasses
import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import RTOL32, RTOL64, data, params_np, rtol_for, x64
from helpers import assert_trees_all_close as _assert_trees_all_close
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import equinox as jeqx

FRAMEWORKS = {"equinox": eqx.nn, "jaxbn": jeqx}
BATCHED = {"axis_name": "batch", "in_axes": (0, None), "out_axes": (0, None)}


def assert_trees_all_close(actual, desired, rtol, atol=None, err_msg=""):
    """helpers.assert_trees_all_close over the array leaves: the modules' classes differ, so
    their tree structures do too (their leaf layouts are compared by ``_leaf_specs``)."""
    _assert_trees_all_close(*(jax.tree.leaves(eqx.filter(t, eqx.is_array))
                              for t in (actual, desired)), rtol, atol, err_msg)


def _promotion(name):
    """Equinox's modules need standard dtype promotion (BatchNorm's ``momentum**counter``
    mixes a float and an int); jaxbn's run under the suite's strict promotion."""
    return jax.numpy_dtype_promotion("standard" if name == "equinox" else "strict")


def _in(name, fn, *args):
    """``fn(*args)`` under framework ``name``'s promotion (see :func:`_promotion`)."""
    with _promotion(name):
        return fn(*args)


def _with_params(module, seed):
    """``module`` with a non-trivial weight (0.5..1.5) and bias (N(0, 1)), in its dtype."""
    if module.weight is None and module.bias is None:
        return module
    ref = module.weight if module.weight is not None else module.bias
    gamma, beta = params_np(seed, ref.shape)
    new = {"weight": gamma, "bias": beta}
    for name in ("weight", "bias"):
        old = getattr(module, name)
        if old is not None:
            module = eqx.tree_at(lambda m, n=name: getattr(m, n), module,
                                 jnp.asarray(new[name], old.dtype))
    return module


def _field_layout(cls):
    """(name, static) of each dataclass field, in order: what decides a checkpoint's layout."""
    return [(f.name, bool(f.metadata.get("static", False))) for f in dataclasses.fields(cls)]


def _leaf_specs(tree):
    """Shape, dtype and weak type of every array leaf, and the other leaves as they are."""
    return [(a.shape, a.dtype, getattr(a, "weak_type", None)) if eqx.is_array(a) else a
            for a in jax.tree.leaves(tree)]


# ------------------------------------------------------------------ BatchNorm


def _bn_pair(seed=1, **kw):
    """``{framework: (bn, state)}`` built by each framework, with the same weight and bias."""
    pairs = {}
    for name, nn in FRAMEWORKS.items():
        bn, state = eqx.nn.make_with_state(nn.BatchNorm)(3, "batch", mode="batch", **kw)
        pairs[name] = (_with_params(bn, seed), state)
    return pairs


@eqx.filter_jit
def _bn_step(bn, state, x, dy, inference):
    """One batch through ``vmap(bn)``: ``(y, new_state, (dparams, dx))`` for loss sum(y*dy)."""
    params, static = eqx.partition(bn, eqx.is_inexact_array)

    def loss(params, x):
        model = eqx.combine(params, static)
        y, new_state = jax.vmap(lambda x, s: model(x, s, inference=inference), **BATCHED)(
            x, state)
        return jnp.sum(y * dy), (y, new_state)

    grads, (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new_state, grads


BN_CASES = {  # per-example shape (channels first), channelwise_affine
    "NC": ((3,), True),
    "NCHW": ((3, 2, 2), True),
    "NCL-no-affine": ((3, 4), False),
}


def _cases(cases, float32_ids):
    """Every case in float64, and the ``float32_ids`` ones in float32 too (a looser check of
    the same logic; one per layout keeps the fast suite fast)."""
    return ([pytest.param(c, np.float64, id=f"{c}-float64") for c in cases]
            + [pytest.param(c, np.float32, id=f"{c}-float32") for c in float32_ids])


@pytest.mark.parametrize(("case", "dtype"), _cases(BN_CASES, ["NCHW"]))
def test_batch_norm_train_steps_state_inference_and_grads(case, dtype):
    """Three training steps (outputs, state after each, gradients), then inference with
    the zero-debiased statistics, against eqx.nn.BatchNorm(mode="batch")."""
    shape, affine = BN_CASES[case]
    rtol = rtol_for(dtype)
    with x64(dtype):
        pairs = _bn_pair(channelwise_affine=affine, dtype=dtype)
        assert _leaf_specs(pairs["jaxbn"]) == _leaf_specs(pairs["equinox"])
        results = {}
        for name, (bn, state) in pairs.items():
            out = []
            with _promotion(name):
                for step in range(3):
                    x = jnp.asarray(data(10 + step, (8, *shape), loc=1.5, scale=2.0), dtype)
                    dy = jnp.asarray(data(20 + step, (8, *shape)), dtype)
                    y, state, grads = _bn_step(bn, state, x, dy, False)
                    out.append((y, state, grads))
                y, _, grads = _bn_step(bn, state, x, dy, True)  # inference: state unchanged
                out.append((y, state, grads))
            results[name] = out
        for step, (got, want) in enumerate(zip(results["jaxbn"], results["equinox"])):
            assert _leaf_specs(got) == _leaf_specs(want), f"step {step}"
            counter_got, counter_want = jax.tree.leaves(got[1])[0], jax.tree.leaves(want[1])[0]
            assert int(counter_got) == int(counter_want) == min(step + 1, 3)
            assert_trees_all_close(got, want, rtol=rtol, err_msg=f"{case} step {step}")


def test_batch_norm_inference_before_training_uses_initial_state():
    """counter == 0: Equinox normalizes with the initial mean 0, var 1 (no debiasing)."""
    with x64(np.float64):
        x = jnp.asarray(data(3, (4, 3, 2), loc=1.0, scale=3.0))
        dy = jnp.asarray(data(4, (4, 3, 2)))
        got, want = (_in(name, _bn_step, bn, st, x, dy, True)
                     for name, (bn, st) in _bn_pair(dtype=np.float64).items())
    assert_trees_all_close(got, want, rtol=RTOL64)


def test_batch_norm_fields_and_state_layout_match_equinox():
    assert _field_layout(jeqx.BatchNorm) == _field_layout(eqx.nn.BatchNorm)
    for dtype in (np.float32, np.float64):
        with x64(dtype):
            pairs = {name: eqx.nn.make_with_state(nn.BatchNorm)(
                5, ("a", "b"), eps=1e-3, channelwise_affine=False, momentum=0.9,
                inference=True, mode="batch") for name, nn in FRAMEWORKS.items()}
            got, want = pairs["jaxbn"], pairs["equinox"]
            assert _leaf_specs(got) == _leaf_specs(want)
            assert jax.tree.structure(got[1]) == jax.tree.structure(want[1])
            for f in ("axis_name", "eps", "channelwise_affine", "momentum", "inference",
                      "input_size", "mode", "weight", "bias"):
                assert getattr(got[0], f) == getattr(want[0], f), f


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_mixed_dtypes_follow_equinox(affine):
    """float32 state (and parameters) with bfloat16 input, training: the output is float32
    with the affine parameters (promotion) and bfloat16 without, in both; state float32;
    values to bfloat16 rounding (Equinox's statistics are in bfloat16)."""
    with x64(np.float32):
        x = jnp.asarray(data(5, (8, 3, 2), loc=1.0), jnp.bfloat16)
        dy = jnp.asarray(data(6, (8, 3, 2)), jnp.float32 if affine else jnp.bfloat16)
        got, want = (_in(name, _bn_step, bn, st, x, dy, False) for name, (bn, st)
                     in _bn_pair(channelwise_affine=affine, dtype=np.float32).items())
    assert _leaf_specs(got) == _leaf_specs(want)
    assert got[0].dtype == (jnp.float32 if affine else jnp.bfloat16)
    assert_trees_all_close(got, want, rtol=2**-6)


def test_batch_norm_float64_input_with_float32_state_is_refused_as_in_equinox():
    """Equinox's State.set refuses the float64 update of float32 statistics; so does jaxbn."""
    with x64(np.float64):
        x = jnp.asarray(data(5, (8, 3, 2), loc=1.0))
        dy = jnp.asarray(data(6, (8, 3, 2)))
        for name, (bn, st) in _bn_pair(dtype=np.float32).items():
            with pytest.raises(ValueError, match="different structures/shapes/dtypes"):
                _in(name, _bn_step, bn, st, x, dy, False)


@pytest.mark.slow  # several seconds of compiling on a 2-core CPU
def test_batch_norm_data_parallel_vmap_inside_shard_map():
    """4 devices x vmap over 2 examples each, axis_name=("dev", "batch"): equal to Equinox
    doing the same, and to the single-device vmap over the whole batch of 8."""
    mesh = jax.make_mesh((4,), ("dev",), devices=jax.devices()[:4])
    with x64(np.float64):
        x = jnp.asarray(data(7, (8, 3, 2), loc=-1.0, scale=2.0))
        dy = jnp.asarray(data(8, (8, 3, 2)))
        results = {}
        for name, nn in FRAMEWORKS.items():
            with _promotion(name):
                bn, state = eqx.nn.make_with_state(nn.BatchNorm)(3, ("dev", "batch"), mode="batch")
                bn = _with_params(bn, 2)
                params, static = eqx.partition(bn, eqx.is_inexact_array)

                def step(params, state, x, dy, static=static):
                    def loss(params, x):
                        model = eqx.combine(params, static)
                        y, st = jax.vmap(model, **BATCHED)(x, state)
                        return jnp.sum(y * dy), (y, st)

                    grads, (y, st) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
                    # Parameter gradients are each device's part; sum them (pmap-style).
                    return y, st, (jax.lax.psum(grads[0], "dev"), grads[1])

                sharded = jax.jit(jax.shard_map(
                    step, mesh=mesh, in_specs=(P(), P(), P("dev"), P("dev")),
                    out_specs=(P("dev"), P(), (P(), P("dev"))), check_vma=False))
                on_mesh = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in
                           ((x, P("dev")), (dy, P("dev")))]
                y, state, grads = sharded(params, state, *on_mesh)
                y2, _, _ = sharded(params, state, *on_mesh)  # second step, from the new state
                results[name] = (y, state, grads, y2)

                # The single-device whole batch with the same module under one vmap axis.
                single, sstate = eqx.nn.make_with_state(nn.BatchNorm)(3, "batch", mode="batch")
                single = eqx.tree_at(lambda m: (m.weight, m.bias), single, (bn.weight, bn.bias))
                want = _bn_step(single, sstate, x, dy, False)
                assert_trees_all_close((y, jax.tree.leaves(state), grads[1]),
                                       (want[0], jax.tree.leaves(want[1]), want[2][1]),
                                       rtol=RTOL64, err_msg=f"{name} vs one device")
                assert_trees_all_close(grads[0], want[2][0], rtol=RTOL64)
    assert_trees_all_close(results["jaxbn"], results["equinox"], rtol=RTOL64)


# ---------------------------------------------- LayerNorm, GroupNorm, RMSNorm

# name -> (constructor args, per-example input shape)
PER_EXAMPLE = {
    "LayerNorm-D": ("LayerNorm", (6,), {}, (6,)),
    "LayerNorm-TD-no-bias": ("LayerNorm", ((3, 4),), {"use_bias": False, "eps": 1e-3}, (3, 4)),
    "LayerNorm-no-weight": ("LayerNorm", (5,), {"use_weight": False}, (5,)),
    "GroupNorm-CHW": ("GroupNorm", (2, 6), {}, (6, 2, 3)),
    "GroupNorm-C-G1": ("GroupNorm", (1, 4), {"eps": 1e-2}, (4,)),
    "GroupNorm-no-affine": ("GroupNorm", (3,), {"channelwise_affine": False}, (6, 2)),
    "RMSNorm-D": ("RMSNorm", (6,), {}, (6,)),
    "RMSNorm-TD-weight-only": ("RMSNorm", ((2, 5),), {"use_bias": False}, (2, 5)),
}


@eqx.filter_jit
def _per_example_vjp(layer, x, dy, with_state):
    """``(y, (dparams, dx))`` of ``sum(vmap(layer)(x) * dy)``, with or without a state."""
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    state = eqx.nn.State(eqx.nn.Linear(1, 1, key=jax.random.key(0)))  # an empty state

    def loss(params, x):
        model = eqx.combine(params, static)
        if with_state:
            y, st = jax.vmap(model, in_axes=(0, None), out_axes=(0, None))(x, state)
            assert isinstance(st, eqx.nn.State)
        else:
            y = jax.vmap(model)(x)
        return jnp.sum(y.astype(dy.dtype) * dy), y

    grads, y = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads


def _per_example_pair(case, dtype):
    cls, args, kw, _ = PER_EXAMPLE[case]
    return {name: _with_params(getattr(nn, cls)(*args, **kw, dtype=dtype), 3)
            for name, nn in FRAMEWORKS.items()}


@pytest.mark.parametrize(("case", "dtype"), _cases(
    PER_EXAMPLE, ["LayerNorm-TD-no-bias", "GroupNorm-CHW", "RMSNorm-TD-weight-only"]))
def test_per_example_norms_outputs_and_grads(case, dtype):
    """Outputs and gradients (input, weight, bias) under vmap, equal to Equinox's."""
    shape = PER_EXAMPLE[case][3]
    with x64(dtype):
        layers = _per_example_pair(case, dtype)
        assert _leaf_specs(layers["jaxbn"]) == _leaf_specs(layers["equinox"])
        x = jnp.asarray(data(11, (4, *shape), loc=2.0, scale=3.0), dtype)
        dy = jnp.asarray(data(12, (4, *shape)), dtype)
        got, want = (_in(name, _per_example_vjp, layer, x, dy, case.startswith("Group"))
                     for name, layer in layers.items())
    assert _leaf_specs(got) == _leaf_specs(want)
    assert_trees_all_close(got, want, rtol=rtol_for(dtype), err_msg=case)


@pytest.mark.parametrize("cls", ["LayerNorm", "GroupNorm", "RMSNorm"])
def test_per_example_norms_dtypes_follow_equinox(cls):
    """bfloat16 input with float32 parameters: computed in float32, output bfloat16;
    float32 input with float64 parameters (x64): computed and returned in float32."""
    case = next(c for c in PER_EXAMPLE if c.startswith(cls))
    shape = PER_EXAMPLE[case][3]
    for x_dtype, p_dtype, rtol in ((jnp.bfloat16, np.float32, 2**-7),
                                   (np.float32, np.float64, RTOL32)):
        with x64(p_dtype):
            layers = _per_example_pair(case, p_dtype)
            x = jnp.asarray(data(13, (4, *shape), loc=1.0), x_dtype)
            dy = jnp.asarray(data(14, (4, *shape)), np.float32)
            got, want = (_in(name, _per_example_vjp, layer, x, dy, False)
                         for name, layer in layers.items())
        assert _leaf_specs(got) == _leaf_specs(want)
        assert got[0].dtype == x_dtype
        assert_trees_all_close(got, want, rtol=rtol, err_msg=f"{x_dtype} {p_dtype}")


@pytest.mark.parametrize("cls", ["LayerNorm", "GroupNorm", "RMSNorm"])
def test_per_example_norms_fields_match_equinox(cls):
    assert _field_layout(getattr(jeqx, cls)) == _field_layout(getattr(eqx.nn, cls))
    for dtype in (np.float32, np.float64):
        with x64(dtype):
            args = (2, 4) if cls == "GroupNorm" else ((2, 3),)
            got, want = (getattr(nn, cls)(*args) for nn in FRAMEWORKS.values())
            assert _leaf_specs(got) == _leaf_specs(want)
            for f in dataclasses.fields(want):
                if f.name not in ("weight", "bias"):
                    assert getattr(got, f.name) == getattr(want, f.name), f.name


def test_layer_norm_elementwise_affine_is_deprecated_as_in_equinox():
    for nn in FRAMEWORKS.values():
        with pytest.warns(UserWarning, match=r"elementwise_affine=\.\.\.\) is deprecated"):
            layer = nn.LayerNorm(4, elementwise_affine=False)
        assert layer.weight is None and layer.bias is None


# ---------------------------------------------------------- a model, trained


class _Net(eqx.Module):
    """Linear -> BatchNorm -> relu -> Linear -> LayerNorm, per example (Sequential)."""

    layers: eqx.nn.Sequential

    def __init__(self, nn, key):
        k1, k2 = jax.random.split(key)
        self.layers = eqx.nn.Sequential([
            eqx.nn.Linear(4, 8, key=k1),
            nn.BatchNorm(8, "batch", momentum=0.9, mode="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(8, 3, key=k2),
            nn.LayerNorm(3),
        ])

    def __call__(self, x, state):
        return self.layers(x, state)


def _make_net(nn):
    net, state = eqx.nn.make_with_state(_Net)(nn, jax.random.key(0))
    bn = net.layers[1]
    return eqx.tree_at(lambda n: n.layers[1], net, _with_params(bn, 4)), state


def _batches(steps):
    return [(jnp.asarray(data(30 + i, (16, 4), loc=0.5, scale=2.0)),
             jnp.asarray(data(40 + i, (16, 3)))) for i in range(steps)]


OPTIM = optax.sgd(0.05, momentum=0.9)


@eqx.filter_jit
def _train_step(net, state, opt_state, x, t):
    def loss(net):
        y, new_state = jax.vmap(net, **BATCHED)(x, state)
        return jnp.mean((y - t) ** 2), new_state

    (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(net)
    updates, opt_state = OPTIM.update(grads, opt_state, eqx.filter(net, eqx.is_inexact_array))
    return value, eqx.apply_updates(net, updates), state, opt_state


def _train(net, state, batches):
    """SGD with momentum under eqx.filter_jit: the losses, the trained net and its state."""
    opt_state = OPTIM.init(eqx.filter(net, eqx.is_inexact_array))
    losses = []
    for x, t in batches:
        value, net, state, opt_state = _train_step(net, state, opt_state, x, t)
        losses.append(value)
    return losses, net, state


@eqx.filter_jit
def _train_mode(net, state, x):
    return jax.vmap(net, **BATCHED)(x, state)


@eqx.filter_jit
def _infer(net, state, x):
    return jax.vmap(eqx.nn.inference_mode(net), **BATCHED)(x, state)[0]


@pytest.mark.slow  # several seconds of compiling on a 2-core CPU
def test_model_trains_identically_under_filter_jit():
    """Four optax SGD-momentum steps: the same losses, parameters, state and inference
    outputs as the model built with eqx.nn's modules."""
    with x64(np.float64):
        batches = _batches(4)
        runs = {name: _in(name, _train, *_make_net(nn), batches)
                for name, nn in FRAMEWORKS.items()}
        infer = {name: _in(name, _infer, run[1], run[2], batches[0][0])
                 for name, run in runs.items()}
        got, want = runs["jaxbn"], runs["equinox"]
        assert _leaf_specs(got) == _leaf_specs(want)
        assert_trees_all_close(got[0], want[0], rtol=RTOL64, err_msg="losses")
        assert_trees_all_close(eqx.filter(got[1], eqx.is_array),
                               eqx.filter(want[1], eqx.is_array), rtol=RTOL64, err_msg="params")
        assert_trees_all_close(got[2], want[2], rtol=RTOL64, err_msg="state")
        assert_trees_all_close(infer["jaxbn"], infer["equinox"], rtol=RTOL64, err_msg="infer")
        assert float(got[0][-1]) < float(got[0][0])  # it did train


@pytest.mark.slow  # trains and compiles both models
@pytest.mark.parametrize("direction", [("equinox", "jaxbn"), ("jaxbn", "equinox")])
def test_checkpoints_swap(direction):
    """tree_serialise_leaves of a trained model + state built with one framework's modules
    loads with tree_deserialise_leaves into the model built with the other's."""
    source, target = direction
    # Standard promotion for both: Equinox's BatchNorm needs it (see _promotion).
    with x64(np.float64), jax.numpy_dtype_promotion("standard"):
        batches = _batches(2)
        _, net, state = _train(*_make_net(FRAMEWORKS[source]), batches)
        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, (net, state))
        buffer.seek(0)
        like = _make_net(FRAMEWORKS[target])
        loaded_net, loaded_state = eqx.tree_deserialise_leaves(buffer, like)
        assert type(loaded_net.layers[1]).__module__.startswith(
            "jaxbn" if target == "jaxbn" else "equinox")
        assert_trees_all_close((loaded_net, loaded_state), (net, state), rtol=0, atol=0)
        x = batches[1][0]
        assert_trees_all_close(_infer(loaded_net, loaded_state, x), _infer(net, state, x),
                               rtol=RTOL64)
        train_out = [_train_mode(n, s, x) for n, s in ((loaded_net, loaded_state), (net, state))]
        assert_trees_all_close(train_out[0], train_out[1], rtol=RTOL64)


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("mode", ["ema", "legacy"])
def test_batch_norm_ema_modes_are_refused(mode):
    with pytest.raises(ValueError, match=r"does not support mode='(ema|legacy)'.*Pass "
                                         r"mode='batch'"):
        jeqx.BatchNorm(3, "batch", mode=mode)


def test_batch_norm_default_mode_is_refused_where_equinox_warns():
    """Equinox's default mode='legacy' warns and means 'ema'; jaxbn raises instead."""
    with pytest.warns(UserWarning, match="defaults to 'ema'"):
        eqx.nn.BatchNorm(3, "batch")
    with pytest.raises(ValueError, match=r"mode='legacy' \(Equinox's default, which means "
                                         r"'ema'\).*Pass mode='batch'"):
        jeqx.BatchNorm(3, "batch")


def test_batch_norm_unknown_mode():
    with pytest.raises(ValueError, match="Invalid mode 'foo'.*mode='batch'"):
        jeqx.BatchNorm(3, "batch", mode="foo")  # type: ignore[arg-type]


def test_batch_norm_batch_of_one_in_training_is_an_error():
    bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(ValueError, match="batch of one has nothing to normalize over"):
        jax.vmap(bn, **BATCHED)(jnp.ones((1, 3)), state)


def test_batch_norm_without_vmap_is_a_name_error_as_in_equinox():
    bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(NameError, match="batch"):
        bn(jnp.ones((3, 4)), state)


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_shape_mismatch_is_an_error(cls):
    with pytest.raises(ValueError, match=r"shape == x.shape.*shape=\(4,\)`.*x.shape=\(2, 4\)"):
        getattr(jeqx, cls)(4)(jnp.ones((2, 4)))


def test_group_norm_constructor_errors():
    with pytest.raises(ValueError, match="groups must divide.*groups=4 and channels=6"):
        jeqx.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="channels should be specified"):
        jeqx.GroupNorm(2)
