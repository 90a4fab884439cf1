"""``python -m benchmarks``: see :mod:`benchmarks.run`; ``python -m benchmarks models``:
see :mod:`benchmarks.models`; ``python -m benchmarks revisions REV``: see
:mod:`benchmarks.revisions`."""

import sys

if sys.argv[1:2] == ["models"]:
    from benchmarks.models import main

    sys.exit(main(sys.argv[2:]))
if sys.argv[1:2] == ["revisions"]:
    from benchmarks.revisions import main

    sys.exit(main(sys.argv[2:]))
from benchmarks.run import main

sys.exit(main())
