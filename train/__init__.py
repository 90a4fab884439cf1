"""Training code for jaxbn: a jit-compiled MLP with batch norm, trained with optax.

Run ``python -m train --help``. Nothing here is part of the ``jaxbn`` library;
it imports only jaxbn's public API.
"""
