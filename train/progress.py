"""Progress bars and log lines on standard output.

Bars and lines share one stream, stdout, so a bar never lands between the lines
of a log: the bar is drawn only when stdout is a terminal (tqdm's
``disable=None``), so ``python -m train | cat`` or ``> log`` get the lines alone.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int, desc: str, *, quiet: bool) -> tqdm:
    """A transient tqdm bar on stdout; off with ``quiet`` or when stdout is not a terminal."""
    return tqdm(total=total, desc=desc, leave=False, file=sys.stdout, dynamic_ncols=True,
                disable=True if quiet else None)


def log(msg: str) -> None:
    """Prints one line above any bar on stdout, flushed (logs of piped runs stay current)."""
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()
