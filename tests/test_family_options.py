"""The family completed: optional scale and shift, dict running stats, group norm with any
channel axis (and on channel-sharded arrays), instance norm against PyTorch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import RTOL64, assert_trees_all_close, x64
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.reference import batch_norm_autodiff, batch_norm_staged

RNG = np.random.default_rng(0)
X4 = RNG.normal(0.4, 2.0, (4, 3, 5, 8))  # NHWC
GAMMA, BETA = RNG.uniform(0.5, 1.5, 8), RNG.normal(size=8)
DY = RNG.normal(size=X4.shape)

# name -> fn(params, x): every norm, with the layout it is tested in.
NORMS = {
    "batch_norm": jaxbn.batch_norm,
    "batch_norm_autodiff": batch_norm_autodiff,
    "batch_norm_staged": batch_norm_staged,
    "batch_norm_train": lambda p, x: jaxbn.batch_norm_train(p, jaxbn.init_stats(8, x.dtype), x)[0],
    "batch_norm_eval": lambda p, x: jaxbn.batch_norm_eval(
        p, jaxbn.RunningStats(jnp.full(8, 0.3, x.dtype), jnp.full(8, 2.0, x.dtype)), x),
    "layer_norm": jaxbn.layer_norm,
    "group_norm": lambda p, x: jaxbn.group_norm(p, x, 4),
    "rms_norm": jaxbn.rms_norm,
}


@pytest.mark.parametrize("missing", ["gamma", "beta", "both"])
def test_missing_scale_or_shift_equals_ones_or_zeros(missing):
    """None in params is the same as 1 (scale) or 0 (shift), and gets no gradient; every
    norm, in one compiled program per case."""
    with x64(np.float64):
        x, dy = jnp.asarray(X4), jnp.asarray(DY)
        full = {"gamma": jnp.asarray(GAMMA), "beta": jnp.asarray(BETA)}
        if missing in ("gamma", "both"):
            full["gamma"] = jnp.ones(8)
        if missing in ("beta", "both"):
            full["beta"] = jnp.zeros(8)
        partial = {k: (None if missing in (k, "both") else v) for k, v in full.items()}

        @jax.jit
        def value_and_grads(params):
            out = {}
            for name, fn in NORMS.items():
                y, vjp = jax.vjp(fn, params, x)
                out[name] = (y, vjp(dy))
            return out

        got, want = value_and_grads(partial), value_and_grads(full)
    for name in NORMS:
        (y, (dparams, dx)), (want_y, (want_dparams, want_dx)) = got[name], want[name]
        assert_trees_all_close((y, dx), (want_y, want_dx), rtol=RTOL64, err_msg=name)
        for key in ("gamma", "beta"):
            if partial[key] is None:
                assert dparams[key] is None, (name, key)
            else:
                assert_trees_all_close(dparams[key], want_dparams[key], rtol=RTOL64,
                                       err_msg=f"{name} d{key}")


def test_dict_running_stats_in_and_out():
    params = jaxbn.init(8)
    x = jnp.asarray(X4, jnp.float32)
    stats = jaxbn.RunningStats(jnp.full(8, 0.5), jnp.full(8, 2.0))
    y, new = jaxbn.batch_norm_train(params, stats._asdict(), x, momentum=0.7)
    want_y, want = jaxbn.batch_norm_train(params, stats, x, momentum=0.7)
    assert isinstance(new, dict) and set(new) == {"mean", "var"}
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(new["mean"], want.mean)
    np.testing.assert_array_equal(new["var"], want.var)
    np.testing.assert_array_equal(jaxbn.batch_norm_eval(params, new, x),
                                  jaxbn.batch_norm_eval(params, want, x))
    # A scan carry must keep its structure: dict in, dict out.
    carried, _ = jax.lax.scan(
        lambda s, x: (jaxbn.batch_norm_train(params, s, x)[1], None), stats._asdict(),
        jnp.stack([x, x]))
    assert isinstance(carried, dict)


# (layout, transpose from NHWC, axis)
LAYOUTS = {"NCHW": ((0, 3, 1, 2), 1), "NHCW": ((0, 1, 3, 2), 2)}


@pytest.mark.parametrize("layout, groups", [("NCHW", 2), ("NHCW", 8)])
def test_group_norm_any_channel_axis_equals_channels_last(layout, groups):
    perm, axis = LAYOUTS[layout]
    inverse = tuple(np.argsort(perm))
    with x64(np.float64):
        params = jaxbn.BatchNormParams(jnp.asarray(GAMMA), jnp.asarray(BETA))
        x, dy = jnp.asarray(X4), jnp.asarray(DY)

        @functools.partial(jax.jit, static_argnums=0)
        def value_and_grads(fn, x, dy):
            y, vjp = jax.vjp(fn, params, x)
            return y, vjp(dy)

        want = value_and_grads(lambda p, x: jaxbn.group_norm(p, x, groups), x, dy)
        y, (dp, dx) = value_and_grads(
            lambda p, x: jaxbn.group_norm(p, x, groups, axis=axis),
            x.transpose(perm), dy.transpose(perm))
    assert_trees_all_close((y.transpose(inverse), dp, dx.transpose(inverse)),
                           (want[0], want[1][0], want[1][1]), rtol=RTOL64)


def test_group_norm_unbatched_channels_first_example():
    """axis=0 on (C, H, W): one example, Equinox's layout; vmap gives the batch."""
    with x64(np.float64):
        params = jaxbn.BatchNormParams(jnp.asarray(GAMMA), jnp.asarray(BETA))
        x = jnp.asarray(X4)
        want, one, batched = jax.jit(lambda x: (
            jaxbn.group_norm(params, x, 4),
            jaxbn.group_norm(params, x[0].transpose(2, 0, 1), 4, axis=0),
            jax.vmap(lambda xi: jaxbn.group_norm(params, xi, 4, axis=0))(
                x.transpose(0, 3, 1, 2))))(x)
    assert_trees_all_close(one.transpose(1, 2, 0), want[0], rtol=RTOL64)
    assert_trees_all_close(batched.transpose(0, 2, 3, 1), want, rtol=RTOL64)


def test_instance_norm_is_group_norm_with_one_channel_per_group():
    """group_norm(num_groups=C) on NCHW equals torch.nn.functional.instance_norm."""
    nchw = X4.transpose(0, 3, 1, 2)
    with x64(np.float64):
        params = jaxbn.BatchNormParams(jnp.asarray(GAMMA), jnp.asarray(BETA))
        @jax.jit
        def value_and_grads(params, x, dy):
            y, vjp = jax.vjp(lambda p, x: jaxbn.group_norm(p, x, 8, axis=1), params, x)
            return y, vjp(dy)

        y, (dparams, dx) = value_and_grads(params, jnp.asarray(nchw),
                                           jnp.asarray(DY.transpose(0, 3, 1, 2)))
    xt = torch.tensor(nchw, requires_grad=True)
    gt = torch.tensor(GAMMA, requires_grad=True)
    bt = torch.tensor(BETA, requires_grad=True)
    yt = torch.nn.functional.instance_norm(xt, weight=gt, bias=bt, eps=1e-5)
    yt.backward(torch.tensor(DY.transpose(0, 3, 1, 2)))
    assert_trees_all_close(
        (y, dx, dparams.gamma, dparams.beta),
        (yt.detach().numpy(), xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()), rtol=RTOL64)


@pytest.mark.parametrize("mesh_shape, groups", [((8,), 4), ((2, 4), 8)],
                         ids=["C/8-G4-gathered", "N/2xC/4-G8-split"])
def test_group_norm_on_channel_sharded_array(mesh_shape, groups):
    """On an Explicit mesh that splits the channels, output and gradients equal unsharded
    (groups split with the channels when the pieces hold whole groups, else gathered)."""
    names = ("c",) if len(mesh_shape) == 1 else ("n", "c")
    mesh = jax.make_mesh(mesh_shape, names)
    spec = P(None, None, None, "c") if len(mesh_shape) == 1 else P("n", None, None, "c")
    rng = np.random.default_rng(groups)
    with x64(np.float64):
        x, dy = jnp.asarray(rng.normal(1.0, 2.0, (4, 3, 2, 16))), jnp.asarray(
            rng.normal(size=(4, 3, 2, 16)))
        params = jaxbn.BatchNormParams(jnp.asarray(rng.uniform(0.5, 1.5, 16)),
                                       jnp.asarray(rng.normal(size=16)))

        def value_and_grads(params, x, dy):
            y, vjp = jax.vjp(lambda p, x: jaxbn.group_norm(p, x, groups), params, x)
            return y, vjp(dy)

        want = value_and_grads(params, x, dy)
        sharding = NamedSharding(mesh, spec)
        got = jax.jit(value_and_grads)(params, jax.device_put(x, sharding),
                                       jax.device_put(dy, sharding))
    assert got[0].sharding.spec == sharding.spec  # the output keeps the input's sharding
    assert_trees_all_close(got, want, rtol=RTOL64)


def test_group_norm_groups_straddling_devices_with_split_params():
    """Channels and gamma/beta split 4 ways, 2 groups: the parameters are gathered too."""
    mesh = jax.make_mesh((2, 4), ("n", "c"))
    rng = np.random.default_rng(9)
    x, dy = rng.normal(size=(2, 3, 2, 16)), rng.normal(size=(2, 3, 2, 16))
    params = jaxbn.BatchNormParams(rng.uniform(0.5, 1.5, 16), rng.normal(size=16))
    with x64(np.float64):
        def value_and_grads(params, x, dy):
            y, vjp = jax.vjp(lambda p, x: jaxbn.group_norm(p, x, 2), params, x)
            return y, vjp(dy)

        want = jax.jit(value_and_grads)(*as_jnp((params, x, dy)))
        split = NamedSharding(mesh, P("n", None, None, "c"))
        with jax.set_mesh(mesh):
            got = jax.jit(value_and_grads)(
                jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("c"))),
                             as_jnp(params)),
                jax.device_put(jnp.asarray(x), split), jax.device_put(jnp.asarray(dy), split))
    assert_trees_all_close(got, want, rtol=RTOL64)


def as_jnp(tree):
    return jax.tree.map(jnp.asarray, tree)


def test_group_norm_takes_params_as_lists_like_every_norm():
    x = jnp.asarray(X4, jnp.float32)
    got = jaxbn.group_norm({"gamma": GAMMA.tolist(), "beta": None}, x, 4)
    want = jaxbn.group_norm({"gamma": jnp.asarray(GAMMA, jnp.float32), "beta": None}, x, 4)
    np.testing.assert_array_equal(got, want)
