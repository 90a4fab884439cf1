"""Synchronized batch norm over 8 host devices: results equal the single-device whole batch.

conftest.py sets ``--xla_force_host_platform_device_count=8``. Everything runs
in float64 so that "equal" can mean 1e-10 relative, for all three
implementations (custom closed form, autodiff, staged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL64, as_dtype, assert_trees_all_close, data, params_np, x64
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_batch_norm import np_batch_norm

import jaxbn
from jaxbn.reference import batch_norm_autodiff, batch_norm_staged

IMPLS = {"custom": jaxbn.batch_norm, "autodiff": batch_norm_autodiff, "staged": batch_norm_staged}
NDEV = 8
SHAPES = {"ND": (16, 3), "NHWC": (16, 2, 2, 3)}  # two examples per device


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= NDEV, "conftest.py must request 8 host devices"
    return jax.make_mesh((NDEV,), ("b",))


def _inputs(shape, seed=0):
    g, b = params_np(seed + 1, shape[-1:])
    return data(seed, shape, loc=2.0, scale=3.0), g, b, data(seed + 2, shape)


def single_device(impl, x, g, b, ct, mask=None):
    """Whole-batch value and VJP on one device: the answer every sharded run must give."""

    @jax.jit
    def run(x, g, b, ct, mask):
        y, vjp = jax.vjp(lambda x, g, b: impl(jaxbn.BatchNormParams(g, b), x, mask=mask), x, g, b)
        dx, dg, db = vjp(ct)
        return y, (dx, dg, db)

    return run(x, g, b, ct, mask)


def _shard(mesh, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, P("b"))) for a in arrays]


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_shard_map_grad_outside(mesh, impl, layout, check_vma):
    """jax.vjp of a shard_map'd batch norm (gamma/beta replicated, x batch-sharded)."""
    inputs = _inputs(SHAPES[layout])
    with x64(np.float64):
        x, g, b, ct = as_dtype(inputs, np.float64)
        want = single_device(IMPLS[impl], x, g, b, ct)
        bn = jax.shard_map(
            lambda g, b, x: IMPLS[impl](jaxbn.BatchNormParams(g, b), x, axis_name="b"),
            mesh=mesh, in_specs=(P(), P(), P("b")), out_specs=P("b"), check_vma=check_vma,
        )

        @jax.jit
        def run(x, g, b, ct):
            y, vjp = jax.vjp(lambda x, g, b: bn(g, b, x), x, g, b)
            return y, vjp(ct)

        xs, cts = _shard(mesh, x, ct)
        got = run(xs, g, b, cts)
    assert_trees_all_close(got, want, rtol=RTOL64)


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_shard_map_grad_inside_check_vma(mesh, impl, layout):
    """grad inside shard_map, param grads out with P(): replicated full-batch dgamma/dbeta."""
    inputs = _inputs(SHAPES[layout], seed=10)
    with x64(np.float64):
        x, g, b, ct = as_dtype(inputs, np.float64)
        want = single_device(IMPLS[impl], x, g, b, ct)

        def local(g, b, x, ct):
            def loss(x, g, b):
                return jnp.sum(IMPLS[impl](jaxbn.BatchNormParams(g, b), x, axis_name="b") * ct)

            y = IMPLS[impl](jaxbn.BatchNormParams(g, b), x, axis_name="b")
            dx, dg, db = jax.grad(loss, (0, 1, 2))(x, g, b)
            return y, dx, dg, db

        sm = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("b"), P("b")),
                           out_specs=(P("b"), P("b"), P(), P()))
        xs, cts = _shard(mesh, x, ct)
        y, dx, dg, db = jax.jit(sm)(g, b, xs, cts)
    assert_trees_all_close((y, (dx, dg, db)), want, rtol=RTOL64)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_shard_map_grad_inside_without_check_vma(mesh, impl):
    """check_vma=False: JAX does not insert the psum for replicated params, so each device
    holds its local dgamma/dbeta contribution (like pmap); psum'ing them gives the full batch,
    while dx needs nothing (its cross-device sums are inside the backward pass)."""
    inputs = _inputs(SHAPES["ND"], seed=20)
    with x64(np.float64):
        x, g, b, ct = as_dtype(inputs, np.float64)
        want = single_device(IMPLS[impl], x, g, b, ct)

        def local(g, b, x, ct):
            loss = lambda x, g, b: jnp.sum(  # noqa: E731
                IMPLS[impl](jaxbn.BatchNormParams(g, b), x, axis_name="b") * ct)
            dx, dg, db = jax.grad(loss, (0, 1, 2))(x, g, b)
            return dx, lax.psum(dg, "b"), lax.psum(db, "b"), dg[None], db[None]

        sm = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("b"), P("b")),
                           out_specs=(P("b"), P(), P(), P("b"), P("b")), check_vma=False)
        xs, cts = _shard(mesh, x, ct)
        dx, dg_sum, db_sum, dg_local, db_local = jax.jit(sm)(g, b, xs, cts)
    assert_trees_all_close((dx, dg_sum, db_sum), want[1], rtol=RTOL64)
    # The local pieces are the per-device shares of the full-batch sums.
    xhat = (np.asarray(want[0]) - np.asarray(b)) / np.asarray(g)
    ct_np = np.asarray(ct)
    local_dg = (ct_np * xhat).reshape(NDEV, -1, 3).sum(1)
    local_db = ct_np.reshape(NDEV, -1, 3).sum(1)
    assert_trees_all_close((dg_local, db_local), (local_dg, local_db), rtol=RTOL64)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_pmap_axis_name(impl):
    """pmap: y and dx equal the full batch; per-device dgamma/dbeta are the local
    contributions (pmap has no replicated-param psum), and their sum is the full-batch one."""
    inputs = _inputs(SHAPES["NHWC"], seed=30)
    shape = SHAPES["NHWC"]
    with x64(np.float64):
        x, g, b, ct = as_dtype(inputs, np.float64)
        want_y, (want_dx, want_dg, want_db) = single_device(IMPLS[impl], x, g, b, ct)

        def per_device(g, b, x, ct):
            f = lambda x, g, b: IMPLS[impl](jaxbn.BatchNormParams(g, b), x, axis_name="i")  # noqa
            y, vjp = jax.vjp(f, x, g, b)
            return y, vjp(ct)

        split = lambda a: a.reshape((NDEV, -1) + a.shape[1:])  # noqa: E731
        y, (dx, dg, db) = jax.pmap(per_device, axis_name="i", in_axes=(None, None, 0, 0))(
            g, b, split(x), split(ct))
    assert_trees_all_close((y.reshape(shape), dx.reshape(shape)), (want_y, want_dx), rtol=RTOL64)
    dg, db = np.asarray(dg), np.asarray(db)
    assert dg.shape == (NDEV, 3)
    assert_trees_all_close((dg.sum(0), db.sum(0)), (want_dg, want_db), rtol=RTOL64)
    xhat = (np.asarray(want_y) - np.asarray(b)) / np.asarray(g)
    ct_np = np.asarray(ct).reshape(NDEV, -1, 3)
    assert_trees_all_close(
        (dg, db), ((ct_np * xhat.reshape(NDEV, -1, 3)).sum(1), ct_np.sum(1)), rtol=RTOL64)
    assert not np.allclose(np.asarray(dg[0]), np.asarray(want_dg))  # really local


@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("shape", [(6, 2, 2, 3), (6, 3)], ids=["NHWC", "ND"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_vmap_axis_name_per_example(impl, shape, masked):
    """Equinox style: vmap over single examples with axis_name = batch norm of the batch.

    For (N, D) each example is a (D,) vector: nothing is reduced locally, all
    statistics come from the named axis."""
    inputs = _inputs(shape, seed=40)
    keep = np.array([True, False, True, True, False, True])
    mask = jnp.asarray(keep) if masked else None  # per example: a scalar mask each
    with x64(np.float64):
        x, g, b, ct = as_dtype(inputs, np.float64)
        whole_mask = None if mask is None else mask.reshape((6,) + (1,) * (len(shape) - 2))
        want = single_device(IMPLS[impl], x, g, b, ct, whole_mask)
        per_example = jax.vmap(
            lambda g, b, xi, mi: IMPLS[impl](jaxbn.BatchNormParams(g, b), xi, axis_name="batch",
                                             mask=mi),
            in_axes=(None, None, 0, None if mask is None else 0), axis_name="batch")

        @jax.jit
        def run(x, g, b, ct, mask):
            y, vjp = jax.vjp(lambda x, g, b: per_example(g, b, x, mask), x, g, b)
            return y, vjp(ct)

        got = run(x, g, b, ct, mask)
        # A single example of shape (C,) has nothing to normalize over on its own...
        with pytest.raises(ValueError, match="no axis besides the feature axes"):
            IMPLS[impl](jaxbn.BatchNormParams(g, b), x.reshape(-1, shape[-1])[0])
    assert_trees_all_close(got, want, rtol=RTOL64)


# Kept rows per device (4 rows each): unequal counts, one device with none.
KEPT_PER_DEVICE = [0, 4, 1, 3, 2, 4, 1, 0]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_shard_map_masks_with_unequal_counts(mesh, impl):
    """Global sums over global counts: unequal kept rows per device still give the full answer."""
    shape = (32, 3)
    inputs = _inputs(shape, seed=50)
    mask = np.zeros(32, bool)
    for d, k in enumerate(KEPT_PER_DEVICE):
        mask[4 * d: 4 * d + k] = True
    with x64(np.float64):
        x, g, b, ct = as_dtype(inputs, np.float64)
        m = jnp.asarray(mask)
        want = single_device(IMPLS[impl], x, g, b, ct, m)

        def local(g, b, x, ct, m):
            f = lambda x, g, b: IMPLS[impl](  # noqa: E731
                jaxbn.BatchNormParams(g, b), x, axis_name="b", mask=m)
            y, vjp = jax.vjp(f, x, g, b)
            return y, vjp(ct)

        sm = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("b"), P("b"), P("b")),
                           out_specs=(P("b"), (P("b"), P(), P())))
        xs, cts, ms = _shard(mesh, x, ct, m)
        got = jax.jit(sm)(g, b, xs, cts, ms)
    assert_trees_all_close(got, want, rtol=RTOL64)
    # And the single-device masked answer is the NumPy oracle's (kept rows only).
    ref = np_batch_norm(*inputs, mask=mask)
    assert_trees_all_close(want, ref, rtol=RTOL64)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_jit_with_named_sharding(mesh, impl):
    """Data parallel by sharding alone (no axis_name): jit equals the single-device result."""
    inputs = _inputs(SHAPES["NHWC"], seed=60)
    with x64(np.float64):
        x, g, b, ct = as_dtype(inputs, np.float64)
        want = single_device(IMPLS[impl], x, g, b, ct)
        xs, cts = _shard(mesh, x, ct)
        assert len(xs.sharding.device_set) == NDEV
        rep = NamedSharding(mesh, P())
        gs, bs = jax.device_put(g, rep), jax.device_put(b, rep)

        @jax.jit
        def run(x, g, b, ct):
            y, vjp = jax.vjp(lambda x, g, b: IMPLS[impl](jaxbn.BatchNormParams(g, b), x), x, g, b)
            return y, vjp(ct)

        got = run(xs, gs, bs, cts)
    assert_trees_all_close(got, want, rtol=RTOL64)


def test_shard_map_running_stats(mesh):
    """batch_norm_train's new running stats under shard_map equal the whole-batch update."""
    x, g, b, _ = _inputs((16, 3), seed=70)
    mask = np.ones(16, bool)
    mask[[0, 1, 2, 9]] = False  # device 0 keeps none of its two rows, device 1 keeps one
    with x64(np.float64):
        x, g, b = as_dtype((x, g, b), np.float64)
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
