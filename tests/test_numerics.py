"""Numerics no other batch norm has: exact constant features, lossless large offsets,
and failures that show (NaN) instead of a silent beta.

Statistics are computed on shifted data (a sample of the batch subtracted
first, the same on every device), so a constant feature gives exactly
``y == beta`` and a float32 offset of 1e6 costs nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL32, assert_trees_all_close, x64
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

# Constants that float32 sums and `sum * (1/N)` get wrong without shifting.
CONSTANTS = np.array([1e6, 12345.678, -3.5, 0.1, 7e4, 0.0])
GAMMA = np.array([1.5, 2.0, 0.5, 3.0, 1.25, 0.75])
BETA = np.array([0.25, -1.0, 7.0, 0.0, 3.5, -2.0])
OFFSET_TOL = 1e-5  # max |y - y64| for float32 data at mean 1e4..1e7, std 1 (measured ~5e-7)


def _constant_batch(n, dtype):
    constants = CONSTANTS / 100 if dtype == jnp.float16 else CONSTANTS  # float16 ends at 65504
    x = jnp.asarray(np.broadcast_to(constants, (n, constants.size)), dtype)
    params = jaxbn.BatchNormParams(jnp.asarray(GAMMA, dtype), jnp.asarray(BETA, dtype))
    return params, x


def _exact_beta(y, beta, where=None):
    """``y`` equals ``beta`` bit for bit (on the rows ``where`` selects)."""
    y, beta = np.asarray(y), np.asarray(beta)
    rows = y if where is None else y[np.asarray(where)]
    np.testing.assert_array_equal(rows, np.broadcast_to(beta, rows.shape))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_constant_feature_gives_exactly_beta(dtype, jit):
    with x64(dtype):
        params, x = _constant_batch(1000, dtype)
        dy = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), dtype)

        def run(params, x):
            y, vjp = jax.vjp(jaxbn.batch_norm, params, x)
            return y, vjp(dy)

        y, (dparams, dx) = (jax.jit(run) if jit else run)(params, x)
        _exact_beta(y, params.beta)
        assert y.dtype == dtype
        for g in (dx, dparams.gamma, dparams.beta):
            assert np.all(np.isfinite(np.asarray(g, np.float64)))


# 16-bit constants that use every significand bit (the hardest to sum exactly).
FULL_SIGNIFICAND = {jnp.bfloat16: 1.9921875, jnp.float16: 1.9990234375}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_exact_block_is_the_longest_exact_float32_sum(dtype):
    """16-bit input sums blocks of rows as plain float32 sums (``_exact_block``): every
    partial sum of up to 2**16 bfloat16 (2**13 float16) copies of one value is exact in
    float32 (8 + 16 or 11 + 13 significant bits), and twice as many copies are not."""
    from jaxbn._core import _exact_block

    largest = 2 ** (jnp.finfo(jnp.float32).nmant - jnp.finfo(dtype).nmant)
    assert _exact_block((largest,), (0,), jnp.dtype(dtype)) == (0,)
    assert _exact_block((largest + 1,), (0,), jnp.dtype(dtype)) == ()
    assert _exact_block((8, largest // 4, 4), (0, 1), jnp.dtype(dtype)) == (1,)
    assert _exact_block((8, 1, 1, 4), (0, 1, 2), jnp.dtype(jnp.float32)) == ()  # own dtype
    c = FULL_SIGNIFICAND[dtype] * 2.0 ** 10
    sums = np.cumsum(np.full(2 * largest, c, np.float32))  # sequential float32 sums
    exact = sums == np.arange(1, 2 * largest + 1) * c  # the float64 product is exact
    assert exact[:largest].all() and not exact.all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(18, 64, 64, 6), (70000, 6)],
                         ids=["several-blocks", "rows-beyond-a-block"])
def test_constant_16_bit_feature_beyond_one_block(dtype, shape):
    """More rows than one exact block: blocks of rows (NHWC) or the shifted sum (2-D).
    The largest finite values overflow a float32 block sum (bfloat16), and still give beta."""
    largest = float(jnp.finfo(dtype).max)
    constants = np.array([1000.0, -largest, 0.1, largest, 0.0, FULL_SIGNIFICAND[dtype] * 1024])
    x = jnp.asarray(np.broadcast_to(constants, shape), dtype)
    params = jaxbn.BatchNormParams(jnp.asarray(GAMMA, dtype), jnp.asarray(BETA, dtype))

    @jax.jit
    def run(params, x):
        y, vjp = jax.vjp(jaxbn.batch_norm, params, x)
        return y, vjp(jnp.ones_like(y))[1]

    y, dx = run(params, x)
    _exact_beta(y, params.beta)
    assert np.all(np.isfinite(np.asarray(dx, np.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64])
def test_constant_feature_with_mask_and_nan_padding(dtype):
    """Row 0 is masked out and holds NaN: the shift comes from the first kept row."""
    with x64(dtype):
        params, x = _constant_batch(12, dtype)
        x = x.at[0].set(jnp.nan).at[5].set(jnp.inf)
        mask = np.ones(12, bool)
        mask[[0, 1, 5]] = False
        stats = jaxbn.init_stats(CONSTANTS.size, dtype)

        @jax.jit
        def run(params, x, mask):
            (y, new), vjp = jax.vjp(
                lambda p, x: jaxbn.batch_norm_train(p, stats, x, mask=mask, momentum=0.0),
                params, x)
            return y, new, vjp((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new)))

        y, new, (dparams, dx) = run(params, x, jnp.asarray(mask))
        _exact_beta(y, params.beta, mask)
        np.testing.assert_array_equal(np.asarray(y)[~mask], 0)
        np.testing.assert_array_equal(np.asarray(new.mean), np.asarray(x[2]))  # momentum 0
        np.testing.assert_array_equal(np.asarray(new.var), 0)
        assert np.all(np.isfinite(np.asarray(dx, np.float64)))
        assert np.all(np.isfinite(np.asarray(dparams.gamma, np.float64)))


@pytest.mark.parametrize("kept_per_device", [[2] * 8, [0, 0, 1, 2, 0, 2, 1, 0]],
                         ids=["all-kept", "devices-without-rows"])
def test_constant_feature_across_8_devices(kept_per_device):
    """shard_map with axis_name: every device uses the same shift, so the result is exact."""
    mesh = jax.make_mesh((8,), ("b",))
    params, x = _constant_batch(16, jnp.float32)
    mask = np.concatenate([np.arange(2) < k for k in kept_per_device])
    x = jnp.where(jnp.asarray(mask)[:, None], x, jnp.nan)  # masked rows hold NaN padding

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(), P("b"), P("b")), out_specs=(P("b"), P("b")))
    def run(params, x, mask):
        y, vjp = jax.vjp(
            lambda x: jaxbn.batch_norm(params, x, axis_name="b", mask=mask), x)
        return y, vjp(jnp.ones_like(y))[0]

    shard = NamedSharding(mesh, P("b"))
    y, dx = run(params, jax.device_put(x, shard), jax.device_put(jnp.asarray(mask), shard))
    _exact_beta(y, params.beta, mask)
    assert np.all(np.isfinite(np.asarray(dx)))


@pytest.mark.parametrize("norm", ["layer", "group", "instance"])
def test_constant_groups_in_layer_and_group_norm(norm):
    """The same core: a constant example (layer) or group gives exactly beta."""
    x = jnp.full((3, 4, 4, 8), 54321.5, jnp.float32).at[1].set(-0.3)
    params = jaxbn.BatchNormParams(jnp.linspace(0.5, 2, 8), jnp.linspace(-1, 1, 8))
    fn = {
        "layer": lambda p, x: jaxbn.layer_norm(p, x, axis=(1, 2, 3)),
        "group": lambda p, x: jaxbn.group_norm(p, x, 2),
        "instance": lambda p, x: jaxbn.group_norm(p, x, 8),
    }[norm]
    if norm == "layer":
        params = jaxbn.BatchNormParams(
            jnp.ones((4, 4, 8)), jnp.broadcast_to(params.beta, (4, 4, 8)))
    y = jax.jit(fn)(params, x)
    _exact_beta(y, jnp.broadcast_to(params.beta, y.shape[1:]))


def _float64_batch_norm(x):
    """The float64 answer on the same (float32) values, gamma = 1, beta = 0."""
    x = np.asarray(x, np.float64)
    return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)


@pytest.mark.parametrize("offset, jit", [(1e4, True), (1e6, True), (1e7, True), (1e6, False)],
                         ids=["1e4-jit", "1e6-jit", "1e7-jit", "1e6-eager"])
def test_large_offset_costs_nothing(offset, jit):
    x = jnp.asarray(np.random.default_rng(1).normal(offset, 1.0, (1000, 8)), jnp.float32)
    fn = jax.jit(jaxbn.batch_norm) if jit else jaxbn.batch_norm
    y = np.asarray(fn(jaxbn.init(8), x), np.float64)
    assert np.max(np.abs(y - _float64_batch_norm(x))) <= OFFSET_TOL


@pytest.mark.parametrize("offset", [1e6])
def test_large_offset_layer_and_group_norm(offset):
    x = jnp.asarray(np.random.default_rng(2).normal(offset, 1.0, (4, 6, 6, 8)), jnp.float32)
    x64_ = np.asarray(x, np.float64)
    layer, instance = jax.jit(lambda x: (
        jaxbn.layer_norm(jaxbn.init((6, 6, 8)), x, axis=(1, 2, 3)),
        jaxbn.group_norm(jaxbn.init(8), x, 8)))(x)
    for y, axes in ((layer, (1, 2, 3)), (instance, (1, 2))):
        want = (x64_ - x64_.mean(axes, keepdims=True)) / np.sqrt(
            x64_.var(axes, keepdims=True) + 1e-5)
        assert np.max(np.abs(np.asarray(y, np.float64) - want)) <= OFFSET_TOL


def test_large_offset_across_devices_with_unequal_counts():
    mesh = jax.make_mesh((8,), ("b",))
    x = jnp.asarray(np.random.default_rng(3).normal(1e6, 1.0, (32, 4)), jnp.float32)
    mask = np.random.default_rng(4).random(32) < 0.6

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("b"), P("b")), out_specs=P("b"))
    def run(x, mask):
        return jaxbn.batch_norm(jaxbn.init(4), x, axis_name="b", mask=mask)

    shard = NamedSharding(mesh, P("b"))
    y = run(jax.device_put(x, shard), jax.device_put(jnp.asarray(mask), shard))
    y = np.asarray(y, np.float64)[mask]
    assert np.max(np.abs(y - _float64_batch_norm(np.asarray(x)[mask]))) <= OFFSET_TOL


def test_variance_overflow_gives_nan_not_beta():
    """A float32 spread beyond ~1.8e19 overflows the variance: that feature is NaN."""
    x = jnp.array([[1e20, 1.0], [-1e20, 2.0], [3e20, 3.0], [0.0, 4.0]], jnp.float32)
    params = jaxbn.BatchNormParams(jnp.ones(2), jnp.full(2, 5.0))

    @jax.jit
    def run(x):
        y, vjp = jax.vjp(lambda x: jaxbn.batch_norm(params, x), x)
        return y, jaxbn.batch_norm_train(params, jaxbn.init_stats(2), x)[0], vjp(y)[0]

    y, y_train, dx = run(x)
    for y in (y, y_train):
        assert np.all(np.isnan(np.asarray(y[:, 0])))
        np.testing.assert_allclose(y[:, 1], 5 + (x[:, 1] - 2.5) / np.sqrt(1.25 + 1e-5), rtol=1e-6)
    assert np.all(np.isnan(np.asarray(dx[:, 0])))


def test_eps_zero_constant_feature_is_nan():
    """Documented: with eps=0 a constant feature is 0/0 (PyTorch refuses eps=0 in training)."""
    x = jnp.ones((4, 2)).at[:, 1].set(jnp.arange(4.0))
    y = jaxbn.batch_norm(jaxbn.init(2), x, eps=0)
    assert np.all(np.isnan(np.asarray(y[:, 0])))
    assert np.all(np.isfinite(np.asarray(y[:, 1])))


def test_second_order_across_a_mapped_axis():
    """The shift has no derivative (it cancels out); grad-of-grad with axis_name works and
    equals grad-of-grad of the whole batch (pmax, which picks the shift, has no JVP rule)."""
    x = np.random.default_rng(5).normal(50.0, 3.0, (8, 4))
    with x64(np.float64):
        x = jnp.asarray(x)
        p = jaxbn.init(4, jnp.float64)

        def outer(loss):
            return jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x)

        def mapped(x):
            per_row = jax.vmap(lambda xi: jaxbn.batch_norm(p, xi, axis_name="n"), axis_name="n")
            return jnp.sum(per_row(x) ** 3)

        got = jax.jit(lambda: outer(mapped))()
        want = jax.jit(lambda: outer(
            lambda x: jnp.sum(jaxbn.reference.batch_norm_autodiff(p, x) ** 3)))()
    assert_trees_all_close(got, want, rtol=1e-10)


def test_masked_batch_norm_with_batch_and_features_split():
    """Explicit mesh splitting both the batch and the feature axis, with a mask."""
    mesh = jax.make_mesh((2, 4), ("d", "m"))
    rng = np.random.default_rng(6)
    x, dy = rng.normal(3.0, 2.0, (16, 8)).astype(np.float32), rng.normal(size=(16, 8))
    mask = np.arange(16) % 3 != 0

    def run(x, mask, dy):
        y, vjp = jax.vjp(lambda x: jaxbn.batch_norm(jaxbn.init(8), x, mask=mask), x)
        return y, vjp(dy.astype(y.dtype))[0]

    want = jax.jit(run)(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(dy, jnp.float32))
    split = NamedSharding(mesh, P("d", "m"))
    with jax.set_mesh(mesh):
        got = jax.jit(run)(jax.device_put(x, split),
                           jax.device_put(mask, NamedSharding(mesh, P("d"))),
                           jax.device_put(jnp.asarray(dy, jnp.float32), split))
    assert_trees_all_close(got, want, rtol=RTOL32)
