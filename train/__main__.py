"""``python -m train``: see :mod:`train.cli`."""

import sys

try:
    from train.cli import main  # imports jax: Ctrl-C may come here already

    status = main()
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    status = 130
sys.exit(status)
