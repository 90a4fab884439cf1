"""Speed and memory benchmarks for jaxbn: ``python -m benchmarks [--quick]``."""
