"""Structural performance checks that no noisy clock can fool.

Batch norm is memory bound: its cost is the number of loops over arrays of
``x``'s size. These tests read the optimized HLO of the jitted forward and
backward pass (``jax.jit(step).lower(...).compile().as_text()``) and count,
in the entry computation, the instructions that read or write an array with
as many elements as ``x`` (each is one loop over ``x``'s size), and those
that write one (each is an array of ``x``'s size in memory).

Without a mask, forward + backward is six loops: sum(x), sum((x - mean)^2),
y, sum(dy), sum(dy * (x - mean)), dx; and only ``y`` and ``dx`` are written.
With a mask, XLA:CPU's YNNPACK reduction fusions (used for these shapes, 32
features or more) do not take in the masking selects, so the reductions read
masked copies written first: three more loops and three more writes (four
in bfloat16, whose float32 conversion of x is written once more). These are
today's counts on XLA:CPU (jax 0.10); a change that adds a pass over ``x``
fails here, and one that saves a pass updates them.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

import jaxbn
from jaxbn import reference

_SHAPE = re.compile(r"\b(?:pred|bf16|[fsu]\d+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_NO_LOOP = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
# Operations that iterate over their (large) operand rather than their (small) result.
_READS_ALL = re.compile(r"\s(?:reduce|reduce-window|dot|convolution)\(")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name (``"ENTRY"`` for the entry) -> its instruction lines."""
    bodies: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            name = "ENTRY"
            bodies[name] = []
        elif line.startswith("%") and line.rstrip().endswith("{"):
            name = line.split()[0][1:]
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            bodies[name].append(line)
    return bodies


def x_sized_loops(hlo_text: str, size: int) -> tuple[list[str], list[str], list[str]]:
    """``(loops, writes, outputs)`` of the entry computation of optimized HLO text.

    A loop over ``size`` elements is an instruction whose result has that size
    (it is computed element by element, and written to memory), or one that
    reduces an operand of that size (a reduction or dot, itself or inside the
    fusion it calls). A slice that reads one row of such an operand is not a
    loop over it. ``outputs`` are the operands of the entry's ROOT instruction.
    """
    bodies = _computations(hlo_text)
    sizes: dict[str, list[int]] = {}
    loops, writes, outputs = [], [], []
    for line in bodies["ENTRY"]:
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, result_type, opcode, rest = match.groups()
        operands = re.findall(r"%([\w.\-]+)", rest)
        if line.lstrip().startswith("ROOT"):
            outputs = operands
        sizes[name] = [math.prod(int(d) for d in dims.split(",") if d)
                       for dims in _SHAPE.findall(result_type)]
        if opcode in _NO_LOOP:
            continue
        called = _CALLS.search(rest)
        body = "\n".join(bodies.get(called.group(1), [])) if called else line
        reads_x = any(size in sizes.get(o, ()) for o in operands)
        if size in sizes[name]:
            loops.append(name)
            writes.append(name)
        elif reads_x and _READS_ALL.search(body):
            loops.append(name)
    return loops, writes, outputs


def _compiled_text(norm, shape, dtype, masked):
    """Optimized HLO of one jitted forward + backward pass (and stats update for train)."""
    x = jnp.ones(shape, dtype)
    params, stats = jaxbn.init(shape[-1]), jaxbn.init_stats(shape[-1])
    mask = jnp.arange(math.prod(shape[:-1])).reshape(shape[:-1]) % 3 > 0
    kwargs = {"mask": mask} if masked else {}

    def step(params, x, dy):
        if norm == "batch_norm_train":
            y, vjp, new_stats = jax.vjp(
                lambda p, x: jaxbn.batch_norm_train(p, stats, x, **kwargs), params, x,
                has_aux=True)
            return y, vjp(dy), new_stats
        fn = jaxbn.batch_norm if norm == "batch_norm" else reference.batch_norm_autodiff
        y, vjp = jax.vjp(lambda p, x: fn(p, x, **kwargs), params, x)
        return y, vjp(dy)

    return jax.jit(step).lower(params, x, x).compile().as_text()


# (loops, writes) over x's size, by (masked, dtype).
EXPECTED = {
    (False, "float32"): (6, 2),
    (False, "bfloat16"): (6, 2),
    (True, "float32"): (9, 5),
    (True, "bfloat16"): (10, 6),
}


@pytest.mark.parametrize("norm", ["batch_norm", "batch_norm_train"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(256, 48), (8, 6, 6, 32)], ids=["ND", "NHWC"])
def test_loops_over_x(norm, masked, dtype, shape):
    text = _compiled_text(norm, shape, jnp.dtype(dtype), masked)
    loops, writes, outputs = x_sized_loops(text, math.prod(shape))
    assert (len(loops), len(writes)) == EXPECTED[masked, dtype], (
        f"jax {jax.__version__}: loops {loops}, writes {writes}")
    if not masked:  # only y and dx are written, and both are outputs
        assert set(writes) <= set(outputs), (writes, outputs)


def test_train_compiles_to_the_same_loops_as_batch_norm():
    """batch_norm_train's second moments call is merged by XLA with the core's."""
    shape = (256, 48)
    for masked in (False, True):
        counts = [
            tuple(map(len, x_sized_loops(
                _compiled_text(norm, shape, jnp.float32, masked), math.prod(shape))[:2]))
            for norm in ("batch_norm", "batch_norm_train")
        ]
        assert counts[0] == counts[1], (masked, counts)


def test_counter_sees_extra_passes():
    """The counter can fail: autodiff of the naive forward pass takes more loops and writes."""
    shape = (256, 48)
    loops, writes, _ = x_sized_loops(
        _compiled_text("autodiff", shape, jnp.float32, False), math.prod(shape))
    assert len(loops) > EXPECTED[False, "float32"][0]
    assert len(writes) > EXPECTED[False, "float32"][1]
