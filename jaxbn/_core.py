"""The one normalization core shared by batch, layer and group norm.

Every norm in jaxbn is the same computation on an array ``x`` that has been
arranged so that

* ``stat_axes`` are the axes the statistics are reduced over, and
* ``gamma``/``beta`` have ``x``'s rank, with size 1 on every axis they are
  broadcast over (their gradient is summed over those axes).

Batch norm reduces over everything but the feature axes, layer norm over the
feature axes, group norm over the spatial axes and the channels of one group.

The backward pass is the closed form of the CS231n derivation::

    dxhat  = dy * gamma
    dx     = inv_std / N * (N * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))
    dgamma = sum(dy * xhat),   dbeta = sum(dy)

substituted with :func:`jax.custom_vjp`. It saves the input ``x`` (the array
the caller already holds, in its own dtype), the mask if any, and values per
statistics group or feature (shift, mean, inverse standard deviation, count,
gamma, beta); ``xhat`` is recomputed in the backward pass inside the loops that
use it. The statistics are computed on shifted data (see :class:`Moments`).

Performance (see ``benchmarks/``): batch norm is memory bound, so the cost is
the number of times arrays of ``x``'s size are read and written. When
``gamma`` is constant over the statistics (batch norm) the backward pass is
``dbeta = sum(dy)``, ``dgamma = inv_std * sum(dy * (x - mean))`` and one
elementwise pass ``dx = a * dy - b * (x - mean) - c`` with per-feature ``a, b,
c``. Forward + backward is then six loops over ``x``'s size: two reductions
for the (two-pass, centered) statistics, the output, two reductions for the
gradient sums, and ``dx``; nothing else of ``x``'s size is written. XLA:CPU
writes an elementwise value (``x - mean``, a float32 conversion) to memory
when it has more than one user, so every use gets its own copy of the small
inputs through an optimization barrier (:func:`_distinct`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array
AxisName = Hashable | tuple[Hashable, ...] | None


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are computed in: float32 for 16-bit floats, else ``dtype``."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def _psum(value: Any, axis_name: AxisName) -> Any:
    return value if axis_name is None else lax.psum(value, axis_name)


class Moments(NamedTuple):
    """Statistics of ``x`` over ``stat_axes``, each of ``x``'s rank with size 1 there.

    The mean is kept in two parts, ``shift + mean``: ``shift`` is a sample of
    the batch and ``mean`` the mean of ``x - shift`` (for 16-bit input summed
    as exact blocks of ``x`` less ``block * shift``, see :func:`_exact_block`).
    The variance pass, the output loop and batch norm's gradient loops
    subtract the rounded ``shift + mean`` once and correct for its rounding
    per group (:func:`_rounded_mean`); layer and group norm's backward pass
    computes ``(x - shift) - mean``. Either first subtraction is exact for
    data with a large offset (Sterbenz), so nothing is lost to it, and a
    constant feature gives exactly zero. Without centering (RMS norm)
    ``shift`` and ``mean`` are zeros and ``var`` is the mean square.
    """

    shift: Array  # a kept entry of x per statistics group, the same on every device
    mean: Array  # mean of x - shift over the kept entries
    var: Array  # biased variance (mean square without centering), >= 0; inf on overflow
    num_kept: Array  # global number of kept entries, clamped to >= 1


def explicit_spec(x: Array) -> list[Any]:
    """The mesh axes (or ``None``) that split each axis of ``x``, one entry per axis."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ()
    return list(spec) + [None] * (x.ndim - len(spec))


def explicit_shards(x: Array) -> tuple[int, ...]:
    """How many pieces each axis of ``x`` is split into by an Explicit mesh (1: not split)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None:
        return (1,) * x.ndim
    counts = []
    for names in explicit_spec(x):
        names = () if names is None else names if isinstance(names, tuple) else (names,)
        counts.append(math.prod(mesh.shape[n] for n in names))
    return tuple(counts)


def _candidates(
    x: Array, kept: Array | None, stat_axes: tuple[int, ...]
) -> tuple[Array, Array | None]:
    """``x`` (and ``kept``) cut down to the rows a sample may be taken from.

    Along a statistics axis that an Explicit mesh splits into ``k`` pieces, a
    slice of one row cannot be taken from the split array; the first row of
    each piece (a strided slice, which splits evenly) is taken instead and
    then gathered onto every device (``k`` small rows). Other axes are left whole.
    """
    shards = explicit_shards(x)
    split = [i for i in stat_axes if shards[i] > 1]
    if not split:
        return x, kept
    strides = [x.shape[i] // shards[i] if i in split else 1 for i in range(x.ndim)]
    spec = explicit_spec(x)

    def cut(a: Array) -> Array:
        """The first row of each piece of ``a``, on every device; the other axes stay
        split as ``x``'s (where ``a`` is as large as ``x``: a mask has size 1 there)."""
        rows = lax.slice(a, (0,) * a.ndim, a.shape, [s if n > 1 else 1
                                                      for s, n in zip(strides, a.shape)])
        keep = [None if i in split or a.shape[i] != x.shape[i] else spec[i]
                for i in range(a.ndim)]
        return jax.sharding.reshard(rows, NamedSharding(jax.typeof(x).sharding.mesh, P(*keep)))

    return cut(x), None if kept is None else cut(kept)


def _sample(x: Array, stat_axes: tuple[int, ...], kept: Array | None) -> Array:
    """``x`` at its first kept position along ``stat_axes`` (size 1 there).

    ``kept`` is the mask broadcast to ``x``'s shape on ``stat_axes`` (``None``:
    every entry counts). ``x`` is zero where masked, so with nothing kept the
    sample is 0. The mask is taken to be constant over the other axes (size 1
    there), as batch norm's is; otherwise the first position kept in any
    group is used. On an array split by an Explicit mesh, the first kept row
    among the first rows of the pieces is used (:func:`_candidates`).
    """
    x, kept = _candidates(x, kept, stat_axes)
    starts: list[Any] = [0] * x.ndim
    if kept is not None:
        first = jnp.unravel_index(jnp.argmax(kept.reshape(-1)), kept.shape)
        starts = [first[i] if i in stat_axes else 0 for i in range(x.ndim)]
    sizes = [1 if i in stat_axes else n for i, n in enumerate(x.shape)]
    return lax.dynamic_slice(x, starts, sizes)


def _shift(
    x: Array, stat_axes: tuple[int, ...], kept: Array | None, axis_name: AxisName,
    kept_count: Array,
) -> Array:
    """The shift of :class:`Moments`: a sample of ``x``, the same on every device.

    Across a mapped ``axis_name`` the devices agree on the largest of their
    samples (a ``pmax`` of a per-feature vector, exact), leaving out those
    of devices without a kept entry; with no kept entry anywhere
    (``kept_count`` 0) the shift is 0.
    """
    sample = _sample(x, stat_axes, kept)
    if axis_name is None:
        return sample
    if kept is None:
        return lax.pmax(sample, axis_name)
    lowest = jnp.asarray(-jnp.inf, sample.dtype)
    shift = lax.pmax(jnp.where(jnp.any(kept), sample, lowest), axis_name)
    return jnp.where(kept_count > 0, shift, 0)


def moments(
    x: Array,
    stat_axes: tuple[int, ...],
    mask: Array | None,
    axis_name: AxisName,
    *,
    center: bool = True,
) -> Moments:
    """Shifted, two-pass statistics of ``x`` over ``stat_axes``.

    Args:
      x: input, zero where masked; 16-bit floats are reduced in float32
        (:func:`compute_dtype`).
      stat_axes: non-negative axes to reduce over.
      mask: ``None`` or a boolean array of ``x``'s rank, broadcastable to it;
        ``False`` entries are left out of the statistics.
      axis_name: mapped axis name(s) over which sums and counts are all-reduced.
      center: ``False`` for RMS statistics (no mean, ``var`` = mean square).

    Returns:
      :class:`Moments` in the compute dtype. ``count`` is clamped to at least
      1, so an all-masked group gives mean 0 and variance 0 (not NaN).
    """
    dtype = compute_dtype(x.dtype)
    stat_shape = tuple(1 if i in stat_axes else n for i, n in enumerate(x.shape))
    if mask is None:
        kept = None
        local_count = math.prod(x.shape[a] for a in stat_axes)
        # One count per statistics group, hidden from XLA: ``sum / count`` then stays a
        # division, computed once per group (see _std), where ``sum * (1/N)`` would be
        # recomputed, with the block guard, in every loop that uses the mean.
        count = kept_count = lax.optimization_barrier(
            jnp.full(stat_shape, _psum(local_count, axis_name), dtype))
    else:
        kept = jnp.broadcast_to(mask, _masked_shape(x.shape, stat_axes, mask.shape))
        kept_count = _psum(jnp.sum(kept, stat_axes, keepdims=True, dtype=dtype), axis_name)
        count = jnp.maximum(kept_count, 1)
    if center:
        # The shift cancels out of every result, so no derivative flows through it
        # (pmax, which picks it across devices, has none).
        shift = _shift(lax.stop_gradient(x), stat_axes, kept, axis_name, kept_count)
        shift = shift.astype(dtype)
        x_sum, x_sq = _converted_copies(x, 2, dtype)
        exact = () if mask is not None else _exact_block(x.shape, stat_axes, x.dtype)
        if exact:
            # sum(x - shift) as sums of exact blocks less block * shift (see _exact_block);
            # equal also when both overflowed (a constant bfloat16 beyond 3.4e38 / block).
            block_sum = jnp.sum(x_sum, exact, keepdims=True)
            block_shift = math.prod(x.shape[a] for a in exact) * shift
            partial = jnp.where(block_sum == block_shift, 0, block_sum - block_shift)
        else:
            partial = zero_masked(x_sum - shift, mask)
        sum_shifted = jnp.sum(partial, tuple(a for a in stat_axes if a not in exact),
                              keepdims=True)
        mean = _psum(sum_shifted, axis_name) / count
        rounded, error = _rounded_mean(shift, mean)
        sum_sq = _psum(jnp.sum(jnp.square(zero_masked(x_sq - rounded, mask)), stat_axes,
                               keepdims=True), axis_name)
        # The mean square about the rounded mean, less the square of its distance
        # to the exact one. A data set whose mean lies ``error`` from a
        # representable number has a variance of at least ``error ** 2``, so this
        # loses at most about one bit; the clamp only guards round-off.
        var = jnp.maximum(sum_sq / count - error * error, 0)
    else:
        shift = mean = jnp.zeros(stat_shape, dtype)
        var = _psum(jnp.sum(jnp.square(x.astype(dtype)), stat_axes, keepdims=True),
                    axis_name) / count
    return Moments(shift, mean, var, count)


def _exact_block(
    shape: tuple[int, ...], stat_axes: tuple[int, ...], dtype: Any
) -> tuple[int, ...]:
    """The trailing ``stat_axes`` over which a constant ``dtype`` feature sums exactly.

    16-bit floats are summed in float32, which has more significant bits:
    any sum of up to ``2 ** 16`` bfloat16 values (``2 ** 13`` float16 values)
    that are all one value is exact, in any order, as is ``block * shift``.
    So ``sum(x) - block * shift`` over such a block is exactly 0 for a constant
    feature, as ``sum(x - shift)`` is; XLA:CPU computes a plain ``sum(x)`` at
    about twice the speed (YNNPACK pays for every operation fused into a
    reduction). The block's sum may overflow float32 where ``x - shift``
    would not (a bfloat16 value beyond ``3.4e38 / block``); the caller treats
    equal overflows of both as 0. For input reduced in its own dtype (float32,
    float64) the block is empty; a symbolic size (``jax.export``) ends it.
    """
    if compute_dtype(dtype) == dtype:
        return ()
    limit = 2 ** (jnp.finfo(compute_dtype(dtype)).nmant - jnp.finfo(dtype).nmant)
    block: list[int] = []
    for axis in reversed(stat_axes):
        if (jax.export.is_symbolic_dim(shape[axis])
                or math.prod(shape[a] for a in block) * shape[axis] > limit):
            break
        block.insert(0, axis)
    return tuple(block)


def _rounded_mean(shift: Array, mean: Array) -> tuple[Array, Array]:
    """``shift + mean`` rounded to the working precision, and what the rounding lost.

    The loops over ``x`` subtract the one rounded value (one operation per
    element) instead of ``shift`` and then ``mean``, and correct their results
    for the error per group: XLA:CPU's loops pay for every elementwise
    operation fused into them. The rounded value is computed once per group
    (:func:`_per_group`), so no loop slices the shift out of ``x`` per element.
    ``shift - rounded`` is exact when the offset dominates the spread
    (Sterbenz), so the error is exact then too.
    """
    rounded = _per_group(shift + mean)
    return rounded, (shift - rounded) + mean


def _masked_shape(
    x_shape: tuple[int, ...], stat_axes: tuple[int, ...], mask_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """Shape over which the mask is counted: x's shape on stat axes, the mask's elsewhere."""
    return tuple(n if i in stat_axes else m for i, (n, m) in enumerate(zip(x_shape, mask_shape)))


def _distinct(value: Any, copies: int = 1) -> Any:
    """``value`` (or a tuple of ``copies`` of it) that XLA cannot tell is ``value``.

    XLA:CPU fuses an elementwise producer such as ``x - mean`` into a reduction
    only when the reduction is its one user. When the same ``x - mean`` also
    feeds another reduction or the output pass, common-subexpression
    elimination merges the copies and XLA writes the centered array to memory
    and reads it back, one extra pass over ``x`` per user. Passing the small
    per-feature ``mean`` through an optimization barrier gives each use its own
    ``x - mean``, which XLA then fuses into that use.
    """
    if copies == 1:
        return lax.optimization_barrier(value)
    # Note: XLA merges identical barriers, so two calls with the same value
    # and count give the same copies; callers barrier distinct tuples.
    return lax.optimization_barrier((value,) * copies)


def _per_group(value: Array) -> Array:
    """``value``, computed once per statistics group (``value / 1``, the 1 hidden from XLA).

    XLA:CPU fuses cheap operations on per-group values (the slice of ``x``
    that is the shift, an addition) into every loop over ``x``'s elements that
    uses them and recomputes them for each element; with a slice of ``x`` in
    it, the ``dx`` loop took twice as long. A division is computed once,
    before the loop (see :func:`_std`), and dividing by one is exact.
    """
    return value / lax.optimization_barrier(jnp.ones(value.shape, value.dtype))


def _converted_copies(x: Array, uses: int, dtype: Any) -> tuple[Array, ...]:
    """``uses`` copies of ``x`` in ``dtype``, each with its own conversion (see :func:`_distinct`).

    A bfloat16 ``x`` read by several reductions would otherwise be converted
    to float32 once and the float32 copy written to memory for all of them.
    """
    if x.dtype == dtype:
        return (x,) * uses
    return tuple(c.astype(dtype) for c in _distinct(x, uses))


def _sum_to(value: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``value`` over the axes where ``shape`` has size 1 (keeping dims)."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and value.shape[i] != 1)
    return jnp.sum(value, axes, keepdims=True) if axes else value


def zero_masked(x: Array, mask: Array | None) -> Array:
    """``x`` with masked-out entries set to 0, so NaN/inf padding never meets a product
    (not even in the derivatives of the backward pass)."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _normalize(
    x: Array, gamma: Array | None, beta: Array | None, mask: Array | None,
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName, center: bool,
) -> Array:
    y, _ = _normalize_fwd(x, gamma, beta, mask, stat_axes, eps, axis_name, center)
    return y


Residuals = tuple[Array, Moments, Array, Array | None, Array | None, Array | None]
# (x, moments, std, gamma, beta, mask): x, gamma, beta and mask as given;
# moments and std per statistics group, in x's rank (size 1 on stat_axes).


def _std(var: Array, eps: float) -> Array:
    """``sqrt(var + eps)``, NaN where the variance overflowed (never a silent 0 for ``1/std``).

    Every coefficient applied to elements of ``x`` is computed from it once per
    statistics group and ends in a division: XLA counts a division as expensive
    and computes it before the loop over ``x``, where a cheap chain (``rsqrt``,
    the overflow ``select``, products with ``gamma``) would be fused into that
    loop and recomputed for every element.
    """
    std = jnp.sqrt(var + jnp.asarray(eps, var.dtype))
    return jnp.where(jnp.isinf(var), jnp.nan, std)


def _over_std(gamma: Array | None, std: Array) -> Array:
    """``gamma / std`` (``1 / std`` without gamma), one division per statistics group
    where ``gamma`` is per group (batch norm), else ``gamma * (1 / std)``."""
    if gamma is None:
        return 1 / std
    gamma = gamma.astype(std.dtype)
    return gamma / std if gamma.shape == std.shape else gamma * (1 / std)


def _centered(x: Array, shift: Array, mean: Array, center: bool) -> Array:
    """``(x - shift) - mean`` in that order (see :class:`Moments`), or ``x`` uncentered."""
    return x - shift - mean if center else x


def _normalize_fwd(
    x: Array, gamma: Array | None, beta: Array | None, mask: Array | None,
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName, center: bool,
) -> tuple[Array, Residuals]:
    dtype = compute_dtype(x.dtype)
    clean = zero_masked(x, mask)
    stats = moments(clean, stat_axes, mask, axis_name, center=center)
    std = _std(stats.var, eps)
    scale = _over_std(gamma, std)
    if center:
        # (x - shift - mean) * scale = (x - rounded) * scale - error * scale, the second
        # term once per group (a division, see _std): one subtraction per element.
        # Where the offset beta - error * scale is per group (batch norm, or a norm
        # without per-element gamma and beta), it is computed once per group.
        rounded, error = _distinct(_rounded_mean(stats.shift, stats.mean))
        correction = _over_std(error if gamma is None else error * gamma.astype(dtype), std)
        offset = -correction if beta is None else beta.astype(dtype) - correction
        if offset.shape == std.shape:
            offset = _per_group(offset)
        y = (clean.astype(dtype) - rounded) * scale + offset
    else:
        y = clean.astype(dtype) * scale
        if beta is not None:
            y = y + beta.astype(dtype)
    return zero_masked(y, mask).astype(x.dtype), (x, stats, std, gamma, beta, mask)


def _batch_norm_bwd(
    x: Array, dy: Array, stats: Moments, std: Array, gamma: Array | None,
    mask: Array | None, stat_axes: tuple[int, ...], axis_name: AxisName, center: bool,
) -> tuple[Array, Array, Array]:
    """Backward pass when ``gamma`` is constant over the statistics (batch norm).

    The two sums of the closed form then factor through ``gamma``:
    ``sum(dxhat) = gamma * sum(dy)`` and ``sum(dxhat * xhat) = gamma * sum(dy * xhat)``,
    so with ``s1 = sum(dy)`` and ``s2 = sum(dy * xhat)``::

        dx     = gamma * inv_std * (dy - s1 / N - xhat * s2 / N)
        dgamma = s2,   dbeta = s1        (summed to gamma's and beta's shapes)

    two reductions and one elementwise pass with per-feature coefficients;
    nothing of ``x``'s size is written besides ``dx``. Without centering (RMS)
    the ``s1 / N`` term drops out. Returns ``(dx, dgamma, dbeta)`` in the
    compute dtype, ``dgamma``/``dbeta`` in ``x``'s rank (size 1 on
    ``stat_axes``), not yet all-reduced.
    """
    dtype = compute_dtype(x.dtype)
    # Each array-sized use gets its own handle on dy, x, shift and mean, so that
    # XLA fuses the conversion and centering into that use (see _distinct). One
    # barrier for all of them: two identical barriers would be merged again by XLA.
    (dy_sum, dy_dot, dy_dx, x_dot, x_dx, shift_dot, shift_dx, mean_dot,
     mean_dx) = lax.optimization_barrier(
        (dy, dy, dy, x, x, stats.shift, stats.shift, stats.mean, stats.mean))
    dy_sum, dy_dot, dy_dx = (zero_masked(d.astype(dtype), mask) for d in (dy_sum, dy_dot, dy_dx))
    sum_dy = jnp.sum(dy_sum, stat_axes, keepdims=True)
    x_dot, x_dx = x_dot.astype(dtype), x_dx.astype(dtype)
    if center:
        # x - shift - mean = (x - rounded) - error (see _rounded_mean), for each use
        # from its own handles.
        rounded_dot, error_dot = _rounded_mean(shift_dot, mean_dot)
        rounded_dx, error_dx = _rounded_mean(shift_dx, mean_dx)
        x_dot, x_dx = x_dot - rounded_dot, x_dx - rounded_dx
    # Masked entries may hold inf/NaN padding: zero them after centering.
    sum_dy_centered = jnp.sum(dy_dot * zero_masked(x_dot, mask), stat_axes, keepdims=True)
    if center:
        sum_dy_centered = sum_dy_centered - error_dot * sum_dy
    sum_dy_xhat = sum_dy_centered / std
    global_dy, global_dy_xhat = _psum((sum_dy, sum_dy_xhat), axis_name)
    # dx = a * dy - b * (x - shift - mean) - c = a * dy - b * (x - rounded) - (c - b * error),
    # each coefficient one division per feature (see _std):
    # a = gamma / std, b = a * s2 / (N * std), c = a * s1 / N.
    g = jnp.ones((), dtype) if gamma is None else gamma.astype(dtype)
    count = stats.num_kept
    dx = _over_std(gamma, std) * dy_dx - x_dx * (g * global_dy_xhat / (count * std * std))
    if center:
        dx = dx - g * (global_dy - global_dy_xhat * error_dx / std) / (count * std)
    return dx, sum_dy_xhat, sum_dy


def _general_bwd(
    x: Array, dy: Array, stats: Moments, std: Array, gamma: Array | None,
    mask: Array | None, stat_axes: tuple[int, ...], axis_name: AxisName, center: bool,
) -> tuple[Array, Array, Array]:
    """Backward pass when ``gamma`` varies over the statistics (layer and group norm).

    The CS231n closed form as written::

        dxhat  = dy * gamma
        dx     = inv_std / N * (N * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))
        dgamma = dy * xhat,   dbeta = dy     (summed to gamma's and beta's shapes)

    and without centering (RMS norm, ``xhat = x * inv_std``) the ``sum(dxhat)``
    term drops out. Returns ``(dx, dgamma, dbeta)`` in the compute dtype and
    ``x``'s shape (the caller sums ``dgamma``/``dbeta`` to the parameters' shapes).
    """
    dtype = compute_dtype(x.dtype)
    # A fresh handle on the saved values, so XLA does not merge this pass's
    # centering with the forward pass's (see _distinct).
    dy, x, shift, mean = lax.optimization_barrier((dy, x, stats.shift, stats.mean))
    inv_std = 1 / std
    dy = zero_masked(dy.astype(dtype), mask)
    # Masked entries may hold inf/NaN padding: zero them after centering.
    xhat = zero_masked(_centered(x.astype(dtype), shift, mean, center), mask) * inv_std
    dxhat = dy if gamma is None else dy * gamma.astype(dtype)
    count = stats.num_kept
    sum_dxhat_xhat = _psum(jnp.sum(dxhat * xhat, stat_axes, keepdims=True), axis_name)
    if center:
        sum_dxhat = _psum(jnp.sum(dxhat, stat_axes, keepdims=True), axis_name)
        dx = inv_std / count * (count * dxhat - sum_dxhat - xhat * sum_dxhat_xhat)
    else:
        dx = inv_std / count * (count * dxhat - xhat * sum_dxhat_xhat)
    return dx, dy * xhat, dy


def _normalize_bwd(
    stat_axes: tuple[int, ...], eps: float, axis_name: AxisName, center: bool,
    residuals: Residuals, dy: Array,
) -> tuple[Array, Array | None, Array | None, None]:
    del eps
    x, stats, std, gamma, beta, mask = residuals
    x = zero_masked(x, mask)
    constant_params = all(p is None or all(p.shape[a] == 1 for a in stat_axes)
                          for p in (gamma, beta))
    backward = _batch_norm_bwd if constant_params else _general_bwd
    dx, dgamma, dbeta = backward(
        x, dy, stats, std, gamma, mask, stat_axes, axis_name, center)
    dx = zero_masked(dx, mask).astype(x.dtype)
    return dx, _cotangent(dgamma, gamma), _cotangent(dbeta, beta), None


def _cotangent(value: Array, param: Array | None) -> Array | None:
    """``value`` summed to ``param``'s shape, in its dtype and Explicit sharding (None: none)."""
    if param is None:
        return None
    value = _sum_to(value, param.shape).astype(param.dtype)
    if explicit_shards(value) != explicit_shards(param):
        # A replicated gamma of a group norm whose channels are split over devices.
        target = jax.typeof(param).sharding
        spec = target.spec if target.mesh.axis_names else P()
        value = jax.sharding.reshard(
            value, NamedSharding(jax.typeof(value).sharding.mesh, spec))
    return value


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def vary_like(params: Any, x: Array) -> Any:
    """Gives each array in ``params`` the device-varying type of ``x`` (a no-op outside shard_map).

    Under ``shard_map`` a replicated ``gamma`` meets a batch-sharded ``x``. Adding
    zeros shaped like ``gamma`` but typed like ``x`` makes JAX insert its implicit
    broadcast *before* the custom VJP; that broadcast's transpose is a ``psum``,
    so the cotangents of replicated params come back replicated (the full-batch
    gradient), and the custom rule itself never sees mismatched types.
    """
    return jax.tree.map(lambda p: p + jnp.zeros_like(x, shape=p.shape, dtype=p.dtype), params)


def normalize(
    x: Array,
    gamma: Array | None,
    beta: Array | None,
    *,
    stat_axes: tuple[int, ...],
    eps: float,
    axis_name: AxisName = None,
    mask: Array | None = None,
    center: bool = True,
) -> Array:
    """Normalizes ``x`` over ``stat_axes`` and applies ``gamma * xhat + beta``.

    Args:
      x: floating array of any rank.
      gamma, beta: arrays of ``x``'s rank, size 1 on the axes they broadcast
        over, or ``None`` (no scale / no shift; no cotangent is returned).
      stat_axes: sorted non-negative axes to compute statistics over.
      eps: added to the variance.
      axis_name: mapped axis name(s) over which statistics are all-reduced.
      mask: ``None`` or boolean of ``x``'s rank; masked-out outputs are 0.
      center: ``False`` for RMS normalization: ``xhat = x / sqrt(mean(x^2) + eps)``.

    Returns:
      An array of ``x``'s shape and dtype. Its VJP is the closed form.
    """
    if axis_name is not None:
        gamma, beta = vary_like((gamma, beta), x)
    try:
        return _normalize(x, gamma, beta, mask, stat_axes, eps, axis_name, center)
    except TypeError as err:
        if "forward-mode" not in str(err):
            raise
        raise TypeError(
            "jaxbn norms have a closed-form reverse-mode derivative (jax.custom_vjp) and "
            "therefore no forward mode, so jax.jvp / jax.jacfwd cannot be applied to "
            "them. Use reverse mode instead: jax.grad, jax.vjp or jax.jacrev; "
            "jax.hessian works (forward-over-reverse). If you need forward mode, use "
            "jaxbn.reference.batch_norm_autodiff."
        ) from err
