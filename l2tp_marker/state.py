"""Persisting the engine's table across daemon restarts (atomic writes, tolerant reads)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .engine import Engine, TableEvent
from .fsutil import write_atomic

log = logging.getLogger(__name__)


def save_state(engine: Engine, path: Path) -> None:
    """Write the table to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(engine.export_state(), separators=(",", ":")), mode=0o600, fsync=True)


def load_state(engine: Engine, path: Path) -> list[TableEvent] | None:
    """Load the table saved at ``path``.

    A missing file means a first start (None). A file that cannot be used (truncated, corrupt, from an
    unknown version) is logged with the reason, moved aside as ``<name>.bad`` for inspection, and the
    daemon starts with an empty table: it then relearns tunnels from their next SCCRQ.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read state file %s (%s); starting with an empty table", path, exc.strerror)
        return None
    try:
        events = engine.import_state(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        bad = path.with_name(path.name + ".bad")
        log.error("state file %s is unusable (%s); moved to %s, starting with an empty table",
                  path, exc, bad)
        try:
            os.replace(path, bad)
        except OSError:
            pass
        return None
    log.info("restored %d tunnels from %s", len(engine), path)
    return events
