"""Measurement infrastructure shared by ``benchmarks/``, ``python -m benchmarks.compare``
and ``train/``: the interleaved timer and checked argparse number types.

The library (``jaxbn/``) imports nothing from here.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]], repeats: int, *, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each zero-argument ``call``.

    Each call runs ``warmup`` times first (compilation, caches), then
    ``repeats`` rounds of one call each, the first caller rotating from round
    to round so that no call always follows the same neighbour. Every call is
    waited on with :func:`jax.block_until_ready`, so asynchronous dispatch is
    timed to completion. Bind arguments with a closure or
    :func:`functools.partial`; a call may update state it closes over (a
    training step).
    """
    import jax

    for call in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def checked_number(
    convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str
) -> Callable[[str], Any]:
    """An argparse ``type`` that converts a flag's text and checks it, naming what was expected."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


positive_int = checked_number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = checked_number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked_number(
    float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
