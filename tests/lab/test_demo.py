"""The README's main command, end to end (root only): the demo shows the failure and the fix."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from l2tp_marker.lab.topology import list_namespaces

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]


def test_demo_shows_before_and_after_and_cleans_up():
    prefix = f"l2d{os.getpid()}"
    r = subprocess.run([str(ROOT / ".venv/bin/l2tp-marker"), "demo", "--seconds", "2", "--prefix", prefix],
                       capture_output=True, text=True, timeout=240)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    rows = {line.split()[0]: [c.split() for c in line.split("|")] for line in out.splitlines()
            if re.match(r"^(win|lac)-\d\s", line)}
    assert set(rows) == {"win-1", "win-2", "lac-3"}
    # Without the marker one of the two Windows clients (whichever spoke second) never gets its
    # tunnel; with it everyone does, and nothing is misdelivered or unmarked.
    assert sorted(rows[w][1][0] for w in ("win-1", "win-2")) == ["NO", "yes"], out
    for name, (_, _before, after) in rows.items():
        up, _echo, misdeliv, unmarked = after
        assert (up, misdeliv, unmarked) == ("yes", "0", "0"), out
    assert "reached xl2tpd as 65535" in out and "Peer requested tunnel 1 twice" in out
    assert "result: FIXED" in out
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]
