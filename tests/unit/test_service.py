"""The shipped systemd unit verifies, and readiness reaches systemd's notify socket."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from l2tp_marker.daemon import sd_notify

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "l2tp_marker" / "data" / "l2tp-marker.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing (scripts/install-deps.sh --test installs systemd)")
def test_unit_file_verifies(tmp_path):
    # Point ExecStart at the command this checkout installed, as an operator would.
    unit = tmp_path / "l2tp-marker.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/l2tp-marker", str(ROOT / ".venv/bin/l2tp-marker")))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "l2tp-marker" not in r.stderr  # no warning about our unit


def test_unit_declares_what_the_daemon_needs():
    text = UNIT.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text
    assert "Before=xl2tpd.service" in text and "strongswan" in text.split("Before=")[0]
    caps = next(l for l in text.splitlines() if l.startswith("CapabilityBoundingSet=")).split("=", 1)[1].split()
    assert sorted(caps) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]


def test_sd_notify_sends_ready(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_journald_priority_prefixes(capsys):
    import logging

    from l2tp_marker.cli import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("info", environ={"JOURNAL_STREAM": "8:1234"})
    try:
        logging.getLogger("l2tp_marker.x").error("two\nlines")
        logging.getLogger("l2tp_marker.x").info("hello")
        logging.getLogger("l2tp_marker.x").debug("hidden")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert capsys.readouterr().err.splitlines() == ["<3>l2tp_marker.x: two", "<3>lines", "<6>l2tp_marker.x: hello"]
