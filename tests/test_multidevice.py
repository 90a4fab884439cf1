"""Synchronized batch norm over 8 host devices: results equal the single-device whole batch.

``_env.configure`` (called by conftest.py) sets
``--xla_force_host_platform_device_count=8``. Everything runs in float64 so
that "equal" can mean 1e-10 relative, for all three implementations (custom
closed form, autodiff, staged), each test computing all three in one program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _env import DEVICE_COUNT as NDEV
from helpers import (
    IMPLS,
    KEPT_PER_DEVICE,
    RTOL64,
    as_dtype,
    assert_trees_all_close,
    make_inputs,
    norm_vjp,
    value_and_vjp_each,
    x64,
)
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import np_batch_norm

import jaxbn

SHAPES = {"ND": (16, 3), "NHWC": (16, 2, 2, 3)}  # two examples per device


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= NDEV, f"conftest.py must request {NDEV} host devices"
    return jax.make_mesh((NDEV,), ("b",))


def _float64_inputs(shape, seed):
    """``(x, gamma, beta, dy)`` as float64 jnp arrays (call inside ``x64(np.float64)``)."""
    return as_dtype(make_inputs(shape, seed=seed, loc=2.0, scale=3.0), np.float64)


def _shard(mesh, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, P("b"))) for a in arrays]


def _assert_each_close(got, want):
    for name in IMPLS:
        assert_trees_all_close(got[name], want[name], rtol=RTOL64, err_msg=name)


def _each(spec):
    """The same shard_map spec for every implementation's output."""
    return {name: spec for name in IMPLS}


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_shard_map_grad_outside(mesh, layout, check_vma):
    """jax.vjp of a shard_map'd batch norm (gamma/beta replicated, x batch-sharded)."""

    def sharded(impl):
        return jax.shard_map(lambda p, x: impl(p, x, axis_name="b"), mesh=mesh,
                             in_specs=(P(), P("b")), out_specs=P("b"), check_vma=check_vma)

    with x64(np.float64):
        x, g, b, ct = _float64_inputs(SHAPES[layout], seed=0)
        want = value_and_vjp_each(IMPLS, x, g, b, ct)
        xs, cts = _shard(mesh, x, ct)
        got = value_and_vjp_each({name: sharded(impl) for name, impl in IMPLS.items()},
                                 xs, g, b, cts)
    _assert_each_close(got, want)


def _grads_inside(g, b, x, ct):
    """Inside shard_map, for every implementation: ``(y, (dx, dgamma, dbeta))`` by jax.grad
    of ``sum(y * ct)``, statistics shared over the mapped axis "b"."""
    out = {}
    for name, impl in IMPLS.items():
        def loss(x, g, b, impl=impl):
            y = impl(jaxbn.BatchNormParams(g, b), x, axis_name="b")
            return jnp.sum(y * ct), y

        grads, y = jax.grad(loss, (0, 1, 2), has_aux=True)(x, g, b)
        out[name] = (y, grads)
    return out


@pytest.mark.parametrize("layout", list(SHAPES))
def test_shard_map_grad_inside_check_vma(mesh, layout):
    """grad inside shard_map, param grads out with P(): replicated full-batch dgamma/dbeta."""
    with x64(np.float64):
        x, g, b, ct = _float64_inputs(SHAPES[layout], seed=10)
        want = value_and_vjp_each(IMPLS, x, g, b, ct)
        sm = jax.shard_map(_grads_inside, mesh=mesh, in_specs=(P(), P(), P("b"), P("b")),
                           out_specs=_each((P("b"), (P("b"), P(), P()))))
        xs, cts = _shard(mesh, x, ct)
        got = jax.jit(sm)(g, b, xs, cts)
    _assert_each_close(got, want)


def _local_shares(y, g, b, ct):
    """Per-device (dgamma, dbeta) shares of the full-batch sums: (NDEV, C) each."""
    xhat = (np.asarray(y) - np.asarray(b)) / np.asarray(g)
    ct = np.asarray(ct).reshape(NDEV, -1, ct.shape[-1])
    return (ct * xhat.reshape(ct.shape)).sum(1), ct.sum(1)


def test_shard_map_grad_inside_without_check_vma(mesh):
    """check_vma=False: JAX does not insert the psum for replicated params, so each device
    holds its local dgamma/dbeta contribution (like pmap); psum'ing them gives the full batch,
    while dx needs nothing (its cross-device sums are inside the backward pass)."""
    with x64(np.float64):
        x, g, b, ct = _float64_inputs(SHAPES["ND"], seed=20)
        want = value_and_vjp_each(IMPLS, x, g, b, ct)

        def local(g, b, x, ct):
            return {name: (dx, lax.psum(dg, "b"), lax.psum(db, "b"), dg[None], db[None])
                    for name, (_, (dx, dg, db)) in _grads_inside(g, b, x, ct).items()}

        sm = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("b"), P("b")),
                           out_specs=_each((P("b"), P(), P(), P("b"), P("b"))), check_vma=False)
        xs, cts = _shard(mesh, x, ct)
        got = jax.jit(sm)(g, b, xs, cts)
    for name, (dx, dg_sum, db_sum, dg_local, db_local) in got.items():
        want_y, want_grads = want[name]
        assert_trees_all_close((dx, dg_sum, db_sum), want_grads, rtol=RTOL64, err_msg=name)
        # The local pieces are the per-device shares of the full-batch sums.
        assert_trees_all_close((dg_local, db_local), _local_shares(want_y, g, b, ct),
                               rtol=RTOL64, err_msg=name)


def test_pmap_axis_name():
    """pmap: y and dx equal the full batch; per-device dgamma/dbeta are the local
    contributions (pmap has no replicated-param psum), and their sum is the full-batch one."""
    shape = SHAPES["NHWC"]
    with x64(np.float64):
        x, g, b, ct = _float64_inputs(shape, seed=30)
        want = value_and_vjp_each(IMPLS, x, g, b, ct)

        def per_device(g, b, x, ct):
            return {name: norm_vjp(impl, x, g, b, ct, axis_name="i")
                    for name, impl in IMPLS.items()}

        split = lambda a: a.reshape((NDEV, -1) + a.shape[1:])  # noqa: E731
        got = jax.pmap(per_device, axis_name="i", in_axes=(None, None, 0, 0))(
            g, b, split(x), split(ct))
    for name, (y, (dx, dg, db)) in got.items():
        want_y, (want_dx, want_dg, want_db) = want[name]
        assert_trees_all_close((y.reshape(shape), dx.reshape(shape)), (want_y, want_dx),
                               rtol=RTOL64, err_msg=name)
        dg, db = np.asarray(dg), np.asarray(db)
        assert dg.shape == (NDEV, 3)
        assert_trees_all_close((dg.sum(0), db.sum(0)), (want_dg, want_db), rtol=RTOL64,
                               err_msg=name)
        assert_trees_all_close((dg, db), _local_shares(want_y, g, b, ct), rtol=RTOL64,
                               err_msg=name)
        assert not np.allclose(dg[0], np.asarray(want_dg)), name  # really local


def _per_example(impl):
    """``impl`` vmapped over single examples, statistics shared over the named axis."""

    def norm(params, x, mask=None):
        return jax.vmap(lambda xi, mi: impl(params, xi, axis_name="batch", mask=mi),
                        in_axes=(0, None if mask is None else 0), axis_name="batch")(x, mask)

    return norm


@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("shape", [(6, 2, 2, 3), (6, 3)], ids=["NHWC", "ND"])
def test_vmap_axis_name_per_example(shape, masked):
    """Equinox style: vmap over single examples with axis_name = batch norm of the batch.

    For (N, D) each example is a (D,) vector: nothing is reduced locally, all
    statistics come from the named axis."""
    keep = np.array([True, False, True, True, False, True])
    mask = jnp.asarray(keep) if masked else None  # per example: a scalar mask each
    with x64(np.float64):
        x, g, b, ct = _float64_inputs(shape, seed=40)
        whole_mask = None if mask is None else mask.reshape((6,) + (1,) * (len(shape) - 2))
        want = value_and_vjp_each(IMPLS, x, g, b, ct, mask=whole_mask)
        got = value_and_vjp_each({name: _per_example(impl) for name, impl in IMPLS.items()},
                                 x, g, b, ct, mask=mask)
        # A single example of shape (C,) has nothing to normalize over on its own...
        for impl in IMPLS.values():
            with pytest.raises(ValueError, match="no axis besides the feature axes"):
                impl(jaxbn.BatchNormParams(g, b), x.reshape(-1, shape[-1])[0])
    _assert_each_close(got, want)


def test_shard_map_masks_with_unequal_counts(mesh):
    """Global sums over global counts: unequal kept rows per device still give the full answer."""
    inputs = make_inputs((32, 3), seed=50, loc=2.0, scale=3.0)
    mask = np.zeros(32, bool)
    for d, k in enumerate(KEPT_PER_DEVICE):
        mask[4 * d: 4 * d + k] = True
    with x64(np.float64):
        x, g, b, ct = as_dtype(inputs, np.float64)
        m = jnp.asarray(mask)
        want = value_and_vjp_each(IMPLS, x, g, b, ct, mask=m)

        def local(g, b, x, ct, m):
            return {name: norm_vjp(impl, x, g, b, ct, axis_name="b", mask=m)
                    for name, impl in IMPLS.items()}

        sm = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("b"), P("b"), P("b")),
                           out_specs=_each((P("b"), (P("b"), P(), P()))))
        xs, cts, ms = _shard(mesh, x, ct, m)
        got = jax.jit(sm)(g, b, xs, cts, ms)
    _assert_each_close(got, want)
    # And the single-device masked answer is the NumPy oracle's (kept rows only).
    ref = np_batch_norm(*inputs, mask=mask)
    _assert_each_close(want, {name: ref for name in IMPLS})


def test_jit_with_named_sharding(mesh):
    """Data parallel by sharding alone (no axis_name): jit equals the single-device result."""
    with x64(np.float64):
        x, g, b, ct = _float64_inputs(SHAPES["NHWC"], seed=60)
        want = value_and_vjp_each(IMPLS, x, g, b, ct)
        xs, cts = _shard(mesh, x, ct)
        assert len(xs.sharding.device_set) == NDEV
        rep = NamedSharding(mesh, P())
        gs, bs = jax.device_put(g, rep), jax.device_put(b, rep)
        got = value_and_vjp_each(IMPLS, xs, gs, bs, cts)
    _assert_each_close(got, want)


def test_shard_map_running_stats(mesh):
    """batch_norm_train's new running stats under shard_map equal the whole-batch update."""
    mask = np.ones(16, bool)
    mask[[0, 1, 2, 9]] = False  # device 0 keeps none of its two rows, device 1 keeps one
    with x64(np.float64):
        x, g, b, _ = _float64_inputs((16, 3), seed=70)
        p, s = jaxbn.BatchNormParams(g, b), jaxbn.RunningStats(jnp.full(3, 0.5), jnp.full(3, 2.0))
        m = jnp.asarray(mask)
        want = jax.jit(lambda x, m: jaxbn.batch_norm_train(p, s, x, momentum=0.7, mask=m))(x, m)
        sm = jax.shard_map(
            lambda p, s, x, m: jaxbn.batch_norm_train(p, s, x, momentum=0.7, axis_name="b",
                                                      mask=m),
            mesh=mesh, in_specs=(P(), P(), P("b"), P("b")), out_specs=(P("b"), P()))
        xs, ms = _shard(mesh, x, m)
        got = jax.jit(sm)(p, s, xs, ms)
    assert_trees_all_close(got, want, rtol=RTOL64)
    xk = np.asarray(x)[mask]
    assert_trees_all_close(tuple(got[1]), (0.7 * 0.5 + 0.3 * xk.mean(0), 0.7 * 2 + 0.3 * xk.var(0)),
                           rtol=RTOL64)
