"""Measures the max relative errors the test tolerances bound, and prints them as tables.

Run from the repository root:  python tests/report_errors.py
(Not collected by pytest: the name does not start with ``test_``.)

Relative error = max|a - b| / max|b| over every array of a result (y, dx,
dgamma, dbeta), maximized over the shapes of the corresponding tests.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from helpers import RTOL32, RTOL64, as_dtype, max_rel_err, rounded, x64  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxbn  # noqa: E402

IMPLS = {"custom": jaxbn.batch_norm, "autodiff": jaxbn.reference.batch_norm_autodiff,
         "staged": jaxbn.reference.batch_norm_staged}


def table(title, rows, header=("comparison", "max rel err", "tolerance")):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.2e}" if isinstance(v, float) else str(v) for v in row) + " |")


def batch_norm_tables():
    import test_batch_norm as tb

    for dtype, tol in ((np.float32, RTOL32), (np.float64, RTOL64)):
        errs = {}
        for shape, axis in tb.CASES:
            inputs = tb.make_inputs(shape, axis)
            ref = tb.np_batch_norm(*rounded(inputs, dtype), axis=axis)
            with x64(dtype):
                out = {k: jax.tree.map(np.asarray, tb.value_and_vjp(f, *as_dtype(inputs, dtype),
                                                                    axis=axis))
                       for k, f in IMPLS.items()}
            pairs = {
                "custom vs autodiff": (out["custom"], out["autodiff"]),
                "custom vs staged": (out["custom"], out["staged"]),
                "staged vs autodiff": (out["staged"], out["autodiff"]),
                "custom vs NumPy CS231n (f64)": (out["custom"], ref),
                "autodiff vs NumPy CS231n (f64)": (out["autodiff"], ref),
                "staged vs NumPy CS231n (f64)": (out["staged"], ref),
            }
            for k, (a, b) in pairs.items():
                errs[k] = max(errs.get(k, 0.0), max_rel_err(a, b))
        table(f"batch norm, {np.dtype(dtype).name} (y, dx, dgamma, dbeta; {len(tb.CASES)} "
              "shapes: ND, NHWC, NCHW axis=1, tuple axes, axis=0)",
              [(k, v, tol) for k, v in errs.items()])


def special_tables():
    import test_batch_norm as tb

    rows = []
    x, g, b, dy = tb.make_inputs((16, 3, 3, 4), -1, seed=50)
    x = x + 50.0  # as in test_half_precision_keeps_dtype_and_matches_float32
    for dtype, tol in ((jnp.bfloat16, tb.RTOL_HALF[jnp.bfloat16]),
                       (jnp.float16, tb.RTOL_HALF[jnp.float16])):
        for name, f in IMPLS.items():
            h = as_dtype((x, g, b, dy), dtype)
            got = tb.value_and_vjp(f, *h)
            want = tb.value_and_vjp(f, *[a.astype(jnp.float32) for a in h])
            rows.append((f"{np.dtype(dtype).name} {name} vs float32 on same values", max_rel_err(
                jax.tree.map(lambda a: np.asarray(a, np.float32), got), want), tol))
    x, g, b, dy = tb.make_inputs((256, 3), -1, seed=60)
    x = (1e4 + (x - x.mean(0)) / x.std(0)).astype(np.float32)
    ref = tb.np_batch_norm(*rounded((x, g, b, dy), np.float32))
    for name, f in IMPLS.items():
        got = tb.value_and_vjp(f, *as_dtype((x, g, b, dy), np.float32))
        rows.append((f"float32 mean 1e4 std 1: {name} vs NumPy f64", max_rel_err(got, ref),
                     tb.RTOL_OFFSET))
    table("half precision and large offset", rows)


def family_tables():
    import test_family as tf

    rows = []
    with x64(np.float64):
        lerr = {"vs NumPy": 0.0, "vs jax.vjp(naive jnp)": 0.0}
        for shape, axis in tf.LAYER_CASES:
            inputs = tf._layer_inputs(shape, axis, seed=0)
            ref = tf.np_layer_norm(*inputs, axis=axis)
            args = as_dtype(inputs, np.float64)
            got = tf.jax_value_and_vjp(
                lambda x, g, b: jaxbn.layer_norm(jaxbn.BatchNormParams(g, b), x, axis=axis), *args)
            naive = tf.jax_value_and_vjp(lambda x, g, b: tf.layer_norm_naive(g, b, x, axis), *args)
            lerr["vs NumPy"] = max(lerr["vs NumPy"], max_rel_err(got, ref))
            lerr["vs jax.vjp(naive jnp)"] = max(lerr["vs jax.vjp(naive jnp)"],
                                                 max_rel_err(got, naive))
        rows += [(f"layer_norm {k} ({len(tf.LAYER_CASES)} shapes)", v, RTOL64)
                 for k, v in lerr.items()]
        for shape, groups in tf.GROUP_CASES:
            inputs = tf._group_inputs(shape, seed=20)
            ref = tf.np_group_norm(*inputs, num_groups=groups)
            args = as_dtype(inputs, np.float64)
            got = tf.jax_value_and_vjp(
                lambda x, g, b: jaxbn.group_norm(jaxbn.BatchNormParams(g, b), x, groups), *args)
            naive = tf.jax_value_and_vjp(lambda x, g, b: tf.group_norm_naive(g, b, x, groups),
                                         *args)
            rows.append((f"group_norm {shape} G={groups}: vs NumPy / vs naive",
                         f"{max_rel_err(got, ref):.2e} / {max_rel_err(got, naive):.2e}", RTOL64))
    table("normalization family, float64 (y, dx, dgamma, dbeta)", rows)


def mask_tables():
    import test_batch_norm as tb
    import test_masks as tm

    errs = {k: 0.0 for k in IMPLS}
    with x64(np.float64):
        for shape, axis, mask_shape in tm.MASK_CASES:
            x, g, b, dy = tm._inputs(shape, axis, seed=10)
            mask = tm.make_mask(mask_shape, seed=11)
            np_mask = mask if mask.ndim < len(shape) else np.squeeze(mask, axis % len(shape))
            ref = tb.np_batch_norm(x, g, b, dy, axis=axis, mask=np_mask)
            for k, f in IMPLS.items():
                got = tm.value_and_vjp(f, *as_dtype((x, g, b, dy), np.float64), jnp.asarray(mask),
                                       axis=axis)
                errs[k] = max(errs[k], max_rel_err(got, ref))
    table(f"masked batch norm, float64, vs NumPy CS231n with mask ({len(tm.MASK_CASES)} mask "
          "shapes)", [(f"{k} vs NumPy", v, RTOL64) for k, v in errs.items()])


def multidevice_tables():
    import test_multidevice as tmd
    from jax import lax

    mesh = jax.make_mesh((8,), ("b",))
    shard = lambda *a: [jax.device_put(v, NamedSharding(mesh, P("b"))) for v in a]  # noqa: E731
    rows = []
    with x64(np.float64):
        for name, f in IMPLS.items():
            errs = {}
            x, g, b, ct = as_dtype(tmd._inputs((16, 2, 2, 3)), np.float64)
            want = tmd.single_device(f, x, g, b, ct)
            for vma in (True, False):
                bn = jax.shard_map(
                    lambda g, b, x: f(jaxbn.BatchNormParams(g, b), x, axis_name="b"),
                    mesh=mesh, in_specs=(P(), P(), P("b")), out_specs=P("b"), check_vma=vma)
                run = jax.jit(lambda x, g, b, ct: (lambda y, vjp: (y, vjp(ct)))(
                    *jax.vjp(lambda x, g, b: bn(g, b, x), x, g, b)))
                xs, cts = shard(x, ct)
                errs[f"shard_map vma={vma}, grad outside"] = max_rel_err(run(xs, g, b, cts), want)

            def local(g, b, x, ct, psum):
                y, vjp = jax.vjp(lambda x, g, b: f(jaxbn.BatchNormParams(g, b), x, axis_name="b"),
                                 x, g, b)
                dx, dg, db = vjp(ct)
                if psum:
                    dg, db = lax.psum(dg, "b"), lax.psum(db, "b")
                return y, (dx, dg, db)

            for vma in (True, False):
                sm = jax.shard_map(lambda g, b, x, ct: local(g, b, x, ct, not vma), mesh=mesh,
                                   in_specs=(P(), P(), P("b"), P("b")),
                                   out_specs=(P("b"), (P("b"), P(), P())), check_vma=vma)
                xs, cts = shard(x, ct)
                label = "grad inside, out_specs P()" + ("" if vma else " + explicit psum")
                errs[f"shard_map vma={vma}, {label}"] = max_rel_err(jax.jit(sm)(g, b, xs, cts),
                                                                    want)
            split = lambda a: a.reshape((8, -1) + a.shape[1:])  # noqa: E731
            y, (dx, dg, db) = jax.pmap(
                lambda g, b, x, ct: (lambda y, vjp: (y, vjp(ct)))(*jax.vjp(
                    lambda x, g, b: f(jaxbn.BatchNormParams(g, b), x, axis_name="i"), x, g, b)),
                axis_name="i", in_axes=(None, None, 0, 0))(g, b, split(x), split(ct))
            errs["pmap (y, dx, sum of per-device dgamma/dbeta)"] = max_rel_err(
                (np.asarray(y).reshape(x.shape), (np.asarray(dx).reshape(x.shape),
                                                  np.asarray(dg).sum(0), np.asarray(db).sum(0))),
                want)
            xv, gv, bv, ctv = as_dtype(tmd._inputs((6, 2, 2, 3), seed=40), np.float64)
            per = jax.vmap(lambda g, b, xi: f(jaxbn.BatchNormParams(g, b), xi, axis_name="n"),
                           in_axes=(None, None, 0), axis_name="n")
            got = jax.jit(lambda x, g, b, ct: (lambda y, vjp: (y, vjp(ct)))(
                *jax.vjp(lambda x, g, b: per(g, b, x), x, g, b)))(xv, gv, bv, ctv)
            errs["vmap(axis_name) per example"] = max_rel_err(
                got, tmd.single_device(f, xv, gv, bv, ctv))
            xm, gm, bm, ctm = as_dtype(tmd._inputs((32, 3), seed=50), np.float64)
            mask = np.zeros(32, bool)
            for d, k in enumerate(tmd.KEPT_PER_DEVICE):
                mask[4 * d: 4 * d + k] = True
            m = jnp.asarray(mask)
            sm = jax.shard_map(
                lambda g, b, x, ct, m: (lambda y, vjp: (y, vjp(ct)))(*jax.vjp(
                    lambda x, g, b: f(jaxbn.BatchNormParams(g, b), x, axis_name="b", mask=m),
                    x, g, b)),
                mesh=mesh, in_specs=(P(), P(), P("b"), P("b"), P("b")),
                out_specs=(P("b"), (P("b"), P(), P())))
            errs[f"shard_map, masks kept/device {tmd.KEPT_PER_DEVICE}"] = max_rel_err(
                jax.jit(sm)(gm, bm, *shard(xm, ctm, m)), tmd.single_device(f, xm, gm, bm, ctm, m))
            xs, cts = shard(x, ct)
            got = jax.jit(lambda x, g, b, ct: (lambda y, vjp: (y, vjp(ct)))(
                *jax.vjp(lambda x, g, b: f(jaxbn.BatchNormParams(g, b), x), x, g, b)))(
                xs, g, b, cts)
            errs["jit + NamedSharding(P('b')), no axis_name"] = max_rel_err(got, want)
            rows += [(f"{name}: {k}", v, RTOL64) for k, v in errs.items()]
    table("multi-device (8 host CPU devices) vs single-device whole batch, float64", rows)


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.device_count()} devices; rel err = max|a-b| / max|b|")
    batch_norm_tables()
    special_tables()
    family_tables()
    mask_tables()
    multidevice_tables()
