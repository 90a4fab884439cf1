"""Atomic file writes: a temp file in the target's directory, fsync, ``os.replace``.

A run that fails (an exception, SIGKILL) never leaves a half-written target:
either the old file or the complete new one is there. A SIGKILL between the
write and the rename may leave a hidden ``.NAME.*.tmp`` file behind, never a
truncated ``NAME``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls ``write(f)`` on a temp file next to ``path`` and renames it onto ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically. Serializes fully before touching disk."""
    data = (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def write_results(out: str, metrics: dict, plot: Callable[[str], str] | None) -> str:
    """Draws ``plot(out)`` (unless None), lists its file in ``metrics["plots"]``, then
    writes ``out/metrics.json`` atomically. Returns the metrics path."""
    os.makedirs(out, exist_ok=True)
    if plot is not None:
        metrics["plots"] = [os.path.basename(plot(out))]
    path = os.path.join(out, "metrics.json")
    write_json(path, metrics)
    return path


def write_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Writes a ``.npz`` of numpy arrays, atomically."""
    buf = io.BytesIO()
    import numpy as np

    np.savez(buf, **arrays)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
