"""Speed and memory benchmarks for jaxbn, run from the repository root.

``python -m benchmarks [--quick]``: every implementation's forward+backward time
and memory (:mod:`benchmarks.run`); ``python -m benchmarks.compare``: one shape's
gradients from the closed form, autodiff, the staged backward and finite
differences, side by side (:mod:`benchmarks.compare`). Shared pieces live in
:mod:`benchmarks.common` (timer, argparse numbers) and :mod:`benchmarks.impls`
(the implementations, their inputs and the forward+backward step).
"""
