"""The ``compare``, ``init-scale`` and ``batch-size`` commands."""
