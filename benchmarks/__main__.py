"""``python -m benchmarks``: see :mod:`benchmarks.run`; ``python -m benchmarks models``:
see :mod:`benchmarks.models`."""

import sys

if sys.argv[1:2] == ["models"]:
    from benchmarks.models import main

    sys.exit(main(sys.argv[2:]))
from benchmarks.run import main

sys.exit(main())
