"""jax.export: the pytrees serialize, a symbolic batch size exports, and VJPs survive."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL32, assert_trees_all_close
from jax import export

import jaxbn

X = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (8, 4)), jnp.float32)
PARAMS = jaxbn.BatchNormParams(jnp.linspace(0.5, 2.0, 4), jnp.linspace(-1.0, 1.0, 4))
STATS = jaxbn.RunningStats(jnp.full(4, 0.5), jnp.full(4, 2.0))


def _train(params, stats, x):
    return jaxbn.batch_norm_train(params, stats, x, momentum=0.8)


def test_exported_function_with_namedtuples_round_trips():
    exported = export.export(jax.jit(_train))(PARAMS, STATS, X)
    restored = export.deserialize(exported.serialize())
    y, new = restored.call(PARAMS, STATS, X)
    assert isinstance(new, jaxbn.RunningStats)
    assert_trees_all_close((y, new), jax.jit(_train)(PARAMS, STATS, X), rtol=RTOL32)


def test_exported_vjp_matches():
    def loss(params, x):
        return jnp.sum(jaxbn.batch_norm(params, x) ** 3)

    exported = export.export(jax.jit(loss))(PARAMS, X)
    restored = export.deserialize(exported.serialize(vjp_order=1))
    got = jax.grad(restored.call, argnums=(0, 1))(PARAMS, X)
    assert isinstance(got[0], jaxbn.BatchNormParams)
    assert_trees_all_close(got, jax.jit(jax.grad(loss, argnums=(0, 1)))(PARAMS, X), rtol=RTOL32)


@pytest.mark.parametrize(
    "case", ["batch_norm", "masked", "train", "group_norm", "rms_norm", "bfloat16_nhwc"])
def test_symbolic_batch_size_exports_without_constraints(case):
    (b,) = export.symbolic_shape("b")
    fns = {
        "batch_norm": (lambda p, x: jaxbn.batch_norm(p, x), (8, 4), ()),
        "masked": (lambda p, x, m: jaxbn.batch_norm(p, x, mask=m), (8, 4), ((8,),)),
        "train": (lambda p, x: _train(p, STATS, x), (8, 4), ()),
        "group_norm": (lambda p, x: jaxbn.group_norm(p, x, 2), (8, 3, 4), ()),
        "rms_norm": (lambda p, x: jaxbn.rms_norm(p, x), (8, 3, 4), ()),
        # 16-bit input sums blocks of the non-symbolic axes exactly (_core._exact_block)
        "bfloat16_nhwc": (lambda p, x: jaxbn.batch_norm(p, x), (8, 3, 2, 4), ()),
    }
    fn, shape, extra_shapes = fns[case]
    dtype = jnp.bfloat16 if case == "bfloat16_nhwc" else jnp.float32
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), dtype)
    extra = [jnp.arange(s[0]) % 3 > 0 for s in extra_shapes]
    specs = [jax.ShapeDtypeStruct((b, *shape[1:]), dtype)] + [
        jax.ShapeDtypeStruct((b, *s[1:]), jnp.bool_) for s in extra_shapes]
    exported = export.export(jax.jit(fn))(PARAMS, *specs)
    restored = export.deserialize(exported.serialize())
    call, want = jax.jit(restored.call), jax.jit(fn)
    for n in (5, 8):  # one export, several batch sizes
        args = [x[:n]] + [e[:n] for e in extra]
        assert_trees_all_close(call(PARAMS, *args), want(PARAMS, *args), rtol=RTOL32)
