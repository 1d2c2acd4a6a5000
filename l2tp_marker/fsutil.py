"""Atomic file writes shared by the daemon (state, metrics) and the lab (status files, registry)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str, *, mode: int = 0o644, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix.

    Writes a temp file in the same folder, optionally fsyncs it (for state that must survive a
    power loss), sets ``mode`` and renames it over ``path``. The temp file is removed on failure.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
