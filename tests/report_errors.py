"""Measures the max relative errors the test tolerances bound, and prints them as tables.

Run from the repository root:  python tests/report_errors.py
(Not collected by pytest: the name does not start with ``test_``.)

Relative error = max|a - b| / max|b| over every array of a result (y, dx,
dgamma, dbeta), maximized over the cases of the corresponding tests (the case
lists, inputs and oracles are the tests' own: ``helpers.py``, ``oracles.py``).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # as pytest's pythonpath: tests/ and the root

import _env  # noqa: E402

_env.configure()  # the test environment, before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from helpers import (  # noqa: E402
    BN_CASES,
    DTYPES,
    GROUP_CASES,
    HALF_DTYPES,
    IMPLS,
    KEPT_PER_DEVICE,
    LAYER_CASES,
    MASK_CASES,
    RTOL64,
    RTOL_HALF,
    RTOL_OFFSET,
    as_dtype,
    make_inputs,
    make_mask,
    max_rel_err,
    norm_vjp,
    rounded,
    rtol_for,
    value_and_vjp_each,
    x64,
)
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from oracles import (  # noqa: E402
    group_norm_naive,
    layer_norm_naive,
    np_batch_norm,
    np_group_norm,
    np_layer_norm,
)

import jaxbn  # noqa: E402


def table(title, rows, header=("comparison", "max rel err", "tolerance")):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.2e}" if isinstance(v, float) else str(v) for v in row) + " |")


def worst(errs, key, err):
    errs[key] = max(errs.get(key, 0.0), err)


def batch_norm_tables():
    for dtype in DTYPES:
        errs = {}
        for shape, axis in BN_CASES.values():
            inputs = make_inputs(shape, axis)
            ref = np_batch_norm(*rounded(inputs, dtype), axis=axis)
            with x64(dtype):
                out = jax.tree.map(np.asarray,
                                   value_and_vjp_each(IMPLS, *as_dtype(inputs, dtype), axis=axis))
            for a, b in (("custom", "autodiff"), ("custom", "staged"), ("staged", "autodiff")):
                worst(errs, f"{a} vs {b}", max_rel_err(out[a], out[b]))
            for name in IMPLS:
                worst(errs, f"{name} vs NumPy CS231n (f64)", max_rel_err(out[name], ref))
        table(f"batch norm, {np.dtype(dtype).name} (y, dx, dgamma, dbeta; {len(BN_CASES)} "
              f"shapes: {', '.join(BN_CASES)})", [(k, v, rtol_for(dtype)) for k, v in errs.items()])


def special_tables():
    rows = []
    x, g, b, dy = make_inputs((16, 3, 3, 4), -1, seed=50)
    for dtype in HALF_DTYPES:  # as in test_half_precision_keeps_dtype_and_matches_float32
        half = as_dtype((x + 50.0, g, b, dy), dtype)
        got = value_and_vjp_each(IMPLS, *half)
        want = value_and_vjp_each(IMPLS, *[a.astype(jnp.float32) for a in half])
        rows += [(f"{np.dtype(dtype).name} {name} vs float32 on same values",
                  max_rel_err(jax.tree.map(lambda a: np.asarray(a, np.float32), got[name]),
                              want[name]), RTOL_HALF[dtype]) for name in IMPLS]
    x, g, b, dy = make_inputs((256, 3), -1, seed=60)
    x = (1e4 + (x - x.mean(0)) / x.std(0)).astype(np.float32)
    ref = np_batch_norm(*rounded((x, g, b, dy), np.float32))
    got = value_and_vjp_each(IMPLS, *as_dtype((x, g, b, dy), np.float32))
    rows += [(f"float32 mean 1e4 std 1: {name} vs NumPy f64", max_rel_err(got[name], ref),
              RTOL_OFFSET) for name in IMPLS]
    table("half precision and large offset", rows)


def family_tables():
    rows, errs = [], {}
    with x64(np.float64):
        norms = {"jaxbn": jaxbn.layer_norm,
                 "naive": lambda p, x, axis: layer_norm_naive(p.gamma, p.beta, x, axis)}
        for shape, axis in LAYER_CASES.values():
            inputs = make_inputs(shape, axis)
            out = value_and_vjp_each(norms, *as_dtype(inputs, np.float64), axis=axis)
            worst(errs, "vs NumPy", max_rel_err(out["jaxbn"], np_layer_norm(*inputs, axis=axis)))
            worst(errs, "vs jax.vjp(naive jnp)", max_rel_err(out["jaxbn"], out["naive"]))
        rows += [(f"layer_norm {k} ({len(LAYER_CASES)} shapes)", v, RTOL64)
                 for k, v in errs.items()]
        norms = {"jaxbn": jaxbn.group_norm,
                 "naive": lambda p, x, num_groups: group_norm_naive(p.gamma, p.beta, x, num_groups)}
        for shape, groups in GROUP_CASES.values():
            inputs = make_inputs(shape)
            out = value_and_vjp_each(norms, *as_dtype(inputs, np.float64), num_groups=groups)
            ref = np_group_norm(*inputs, num_groups=groups)
            rows.append((f"group_norm {shape} G={groups}: vs NumPy / vs naive",
                         f"{max_rel_err(out['jaxbn'], ref):.2e} / "
                         f"{max_rel_err(out['jaxbn'], out['naive']):.2e}", RTOL64))
    table("normalization family, float64 (y, dx, dgamma, dbeta)", rows)


def mask_tables():
    errs = {}
    with x64(np.float64):
        for shape, axis, mask_shape in MASK_CASES.values():
            x, g, b, dy = make_inputs(shape, axis, seed=10)
            mask = make_mask(mask_shape, seed=11)
            np_mask = mask if mask.ndim < len(shape) else np.squeeze(mask, axis % len(shape))
            ref = np_batch_norm(x, g, b, dy, axis=axis, mask=np_mask)
            out = value_and_vjp_each(IMPLS, *as_dtype((x, g, b, dy), np.float64),
                                     mask=jnp.asarray(mask), axis=axis)
            for name in IMPLS:
                worst(errs, f"{name} vs NumPy", max_rel_err(out[name], ref))
    table(f"masked batch norm, float64, vs NumPy CS231n with mask ({len(MASK_CASES)} mask "
          "shapes)", [(k, v, RTOL64) for k, v in errs.items()])


def multidevice_tables():
    mesh = jax.make_mesh((_env.DEVICE_COUNT,), ("b",))
    shard = lambda *a: [jax.device_put(v, NamedSharding(mesh, P("b"))) for v in a]  # noqa: E731
    each = lambda spec: {name: spec for name in IMPLS}  # noqa: E731
    errs = {}

    def record(label, got, want):
        for name in IMPLS:
            errs[f"{name}: {label}"] = max_rel_err(got[name], want[name])

    def local(g, b, x, ct, psum=False, **kw):
        out = {}
        for name, impl in IMPLS.items():
            y, (dx, dg, db) = norm_vjp(impl, x, g, b, ct, axis_name="b", **kw)
            if psum:
                dg, db = lax.psum(dg, "b"), lax.psum(db, "b")
            out[name] = (y, (dx, dg, db))
        return out

    with x64(np.float64):
        x, g, b, ct = as_dtype(make_inputs((16, 2, 2, 3), loc=2.0, scale=3.0), np.float64)
        want = value_and_vjp_each(IMPLS, x, g, b, ct)
        xs, cts = shard(x, ct)
        for vma in (True, False):
            sharded = {name: jax.shard_map(
                lambda p, x, impl=impl: impl(p, x, axis_name="b"), mesh=mesh,
                in_specs=(P(), P("b")), out_specs=P("b"), check_vma=vma)
                for name, impl in IMPLS.items()}
            record(f"shard_map vma={vma}, grad outside",
                   value_and_vjp_each(sharded, xs, g, b, cts), want)
        for vma in (True, False):
            sm = jax.shard_map(lambda g, b, x, ct, vma=vma: local(g, b, x, ct, psum=not vma),
                               mesh=mesh, in_specs=(P(), P(), P("b"), P("b")),
                               out_specs=each((P("b"), (P("b"), P(), P()))), check_vma=vma)
            label = "grad inside, out_specs P()" + ("" if vma else " + explicit psum")
            record(f"shard_map vma={vma}, {label}", jax.jit(sm)(g, b, xs, cts), want)
        split = lambda a: a.reshape((_env.DEVICE_COUNT, -1) + a.shape[1:])  # noqa: E731
        got = jax.pmap(lambda g, b, x, ct: {name: norm_vjp(impl, x, g, b, ct, axis_name="i")
                                            for name, impl in IMPLS.items()},
                       axis_name="i", in_axes=(None, None, 0, 0))(g, b, split(x), split(ct))
        record("pmap (y, dx, sum of per-device dgamma/dbeta)",
               {name: (y.reshape(x.shape), (dx.reshape(x.shape), dg.sum(0), db.sum(0)))
                for name, (y, (dx, dg, db)) in got.items()}, want)
        xv, gv, bv, ctv = as_dtype(make_inputs((6, 2, 2, 3), seed=40, loc=2.0, scale=3.0),
                                   np.float64)
        per_example = {name: lambda p, x, impl=impl: jax.vmap(
            lambda xi: impl(p, xi, axis_name="n"), axis_name="n")(x)
            for name, impl in IMPLS.items()}
        record("vmap(axis_name) per example", value_and_vjp_each(per_example, xv, gv, bv, ctv),
               value_and_vjp_each(IMPLS, xv, gv, bv, ctv))
        xm, gm, bm, ctm = as_dtype(make_inputs((32, 3), seed=50, loc=2.0, scale=3.0), np.float64)
        mask = np.zeros(32, bool)
        for d, k in enumerate(KEPT_PER_DEVICE):
            mask[4 * d: 4 * d + k] = True
        m = jnp.asarray(mask)
        sm = jax.shard_map(lambda g, b, x, ct, m: local(g, b, x, ct, mask=m), mesh=mesh,
                           in_specs=(P(), P(), P("b"), P("b"), P("b")),
                           out_specs=each((P("b"), (P("b"), P(), P()))))
        record(f"shard_map, masks kept/device {KEPT_PER_DEVICE}",
               jax.jit(sm)(gm, bm, *shard(xm, ctm, m)),
               value_and_vjp_each(IMPLS, xm, gm, bm, ctm, mask=m))
        record("jit + NamedSharding(P('b')), no axis_name",
               value_and_vjp_each(IMPLS, xs, g, b, cts), want)
    rows = sorted(errs.items(), key=lambda kv: list(IMPLS).index(kv[0].split(":")[0]))
    table(f"multi-device ({_env.DEVICE_COUNT} host CPU devices) vs single-device whole batch, "
          "float64", [(k, v, RTOL64) for k, v in rows])


def _anchors():
    """name -> training-mode batch norm (gamma 1, beta 0) of float32 ``x``: jaxbn, Flax, PyTorch."""
    import flax.linen as nn
    import torch

    def flax_bn(x, fast):
        module = nn.BatchNorm(use_running_average=False, epsilon=1e-5, use_fast_variance=fast)
        variables = module.init(jax.random.key(0), x)
        return module.apply(variables, x, mutable=["batch_stats"])[0]

    return {
        "jaxbn (eager)": lambda x: jaxbn.batch_norm(jaxbn.init(x.shape[-1]), x),
        "jaxbn (jit)": jax.jit(lambda x: jaxbn.batch_norm(jaxbn.init(x.shape[-1]), x)),
        "flax.linen.BatchNorm, use_fast_variance=False (jit)": jax.jit(
            lambda x: flax_bn(x, False)),
        "flax.linen.BatchNorm, default (jit)": jax.jit(lambda x: flax_bn(x, True)),
        "torch.nn.functional.batch_norm": lambda x: torch.nn.functional.batch_norm(
            torch.tensor(np.asarray(x)), None, None, training=True, eps=1e-5).numpy(),
    }


def numerics_tables():
    """Constant features and large offsets in float32: jaxbn next to Flax and PyTorch."""
    rng = np.random.default_rng(0)
    constants = np.concatenate([[1e6, 12345.678], rng.uniform(1e3, 1e5, 200)])
    x_const = jnp.asarray(np.broadcast_to(constants, (1000, constants.size)), jnp.float32)
    offsets = {m: (rng.standard_normal((1000, 64)) + m).astype(np.float32)
               for m in (1e4, 1e6, 1e7)}
    rows_const, rows_offset = [], []
    for name, fn in _anchors().items():
        y = np.abs(np.asarray(fn(x_const), np.float64))  # beta = 0: y itself is the error
        rows_const.append((name, float(y.max()), f"{int(np.sum(y.max(0) > 0.1))}/{y.shape[1]}"))
        errs = []
        for x32 in offsets.values():
            x64_ = x32.astype(np.float64)
            want = (x64_ - x64_.mean(0)) / np.sqrt(x64_.var(0) + 1e-5)
            errs.append(float(np.max(np.abs(np.asarray(fn(jnp.asarray(x32)), np.float64) - want))))
        rows_offset.append((name, *errs))
    table("float32 constant features (1e6, 12345.678, 200 from [1e3, 1e5]), N = 1000, beta = 0",
          rows_const, header=("implementation", "max |y - beta|", "features off by > 0.1"))
    table("float32 data of mean M, std 1, (1000, 64): max |y - y64| against float64 on the "
          "same float32 values", rows_offset,
          header=("implementation", "M = 1e4", "M = 1e6", "M = 1e7"))


def constant_tables():
    """Constant features in every dtype: max |y - beta| eagerly, under jit, with a mask
    (row 0 NaN padding), across 8 devices with ``axis_name``, and (16-bit) with more rows
    than one exact block (18x64x64 NHWC rows, summed in blocks of 64x64)."""
    constants = np.array([1e3, 12345.678, -3.5, 0.1, 0.0, 2040.0])
    mesh = jax.make_mesh((_env.DEVICE_COUNT,), ("b",))
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64):
        with x64(dtype):
            p = jaxbn.BatchNormParams(jnp.linspace(0.5, 2, 6, dtype=dtype),
                                      jnp.linspace(-1, 1, 6, dtype=dtype))
            x = jnp.asarray(np.broadcast_to(constants, (1000, 6)), dtype)
            mask = jnp.asarray(np.arange(1000) % 3 > 0)  # row 0 masked out
            padded = x.at[0].set(jnp.nan)

            def error(y, keep=None):
                y = np.asarray(y, np.float64)
                y = y if keep is None else y[np.asarray(keep)]
                return float(np.max(np.abs(y - np.asarray(p.beta, np.float64))))

            def vjp(p, x):
                y, back = jax.vjp(jaxbn.batch_norm, p, x)
                return y, back(jnp.ones_like(y))[1]

            y_jit, dx = jax.jit(vjp)(p, x)
            sharded = jax.jit(jax.shard_map(
                lambda p, x, m: jaxbn.batch_norm(p, x, axis_name="b", mask=m), mesh=mesh,
                in_specs=(P(), P("b"), P("b")), out_specs=P("b")))
            shard = NamedSharding(mesh, P("b"))
            cells = [error(jaxbn.batch_norm(p, x)), error(y_jit),
                     str(bool(np.all(np.isfinite(np.asarray(dx, np.float64))))),
                     error(jax.jit(lambda p, x, m: jaxbn.batch_norm(p, x, mask=m))(
                         p, padded, mask), mask),
                     error(sharded(p, jax.device_put(padded, shard),
                                   jax.device_put(mask, shard)), mask)]
            if jnp.dtype(dtype).itemsize == 2:
                nhwc = jnp.asarray(np.broadcast_to(constants, (18, 64, 64, 6)), dtype)
                cells.append(error(jax.jit(jaxbn.batch_norm)(p, nhwc)))
            else:
                cells.append("-")
            rows.append((jnp.dtype(dtype).name, *cells))
    table("constant features (1e3, 12345.678, -3.5, 0.1, 0, 2040), N = 1000: max |y - beta|",
          rows, header=("dtype", "eager", "jit", "jit: dx finite", "mask, row 0 NaN",
                        f"{_env.DEVICE_COUNT} devices, mask", "73,728 rows (16-bit)"))


def rms_norm_tables():
    """rms_norm (float64) against autodiff of the naive form and torch.nn.functional.rms_norm."""
    import torch

    shape = (6, 16)
    x, gamma, _, dy = make_inputs(shape, -1, seed=11)

    def naive(params, x):
        return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * params.gamma

    with x64(np.float64):
        x_, gamma_, dy_ = as_dtype((x, gamma, dy), np.float64)
        got = norm_vjp(jaxbn.rms_norm, x_, gamma_, None, dy_)
        auto = norm_vjp(naive, x_, gamma_, None, dy_)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    yt = torch.nn.functional.rms_norm(xt, (shape[-1],), gt, eps=1e-6)
    yt.backward(torch.tensor(dy))
    torch_result = (yt.detach().numpy(), (xt.grad.numpy(), gt.grad.numpy(), None))
    table("rms_norm, float64, (6, 16): y, dgamma, dx",
          [("rms_norm vs autodiff of the naive form", max_rel_err(got, auto), RTOL64),
           ("rms_norm vs torch.nn.functional.rms_norm", max_rel_err(got, torch_result), RTOL64)])


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.device_count()} devices; rel err = max|a-b| / max|b|")
    batch_norm_tables()
    special_tables()
    family_tables()
    mask_tables()
    multidevice_tables()
    numerics_tables()
    constant_tables()
    rms_norm_tables()
