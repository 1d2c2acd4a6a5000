"""Smoke test of bench/fastpath_bench.py (root only): its quickest form with the two cheapest modes.

Checks structure and hygiene, never timing: the report has a row per mode and tunnel count with
numeric ratios, traffic flowed and the kernel-only map mode delivered every packet over the marked
route (none into the dead end), and nothing is left behind (namespaces, processes), also when the
bench is stopped with SIGTERM in the middle of a run. Each run takes about 10-20 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "fastpath_bench.py"
QUICKEST = ["--quick", "--modes", "none,kmap", "--tunnels", "1,10", "--duration", "0.3",
            "--probe-duration", "0.1", "--no-control", "--rss-tunnels", "0"]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the bench needs root (network namespaces, netfilter)"
    for tool in ("gcc", "ip", "iptables-legacy", "nft", "taskset"):
        if shutil.which(tool) is None:
            return f"the bench needs {tool} (scripts/install-deps.sh installs it)"
    return None


pytestmark = [pytest.mark.lab, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _assert_nothing_left(result: dict, bench_pid: int) -> None:
    assert not [ns for ns in _namespaces() if ns.startswith(f"fpb{bench_pid}-")], "namespaces left behind"
    assert set(result["namespaces"]) == {f"fpb{bench_pid}-gw", f"fpb{bench_pid}-cl"}
    assert result["started_pids"], "the bench reported no processes"
    alive = [p for p in result["started_pids"] if _alive(p)]
    assert alive == [], f"processes started by the bench still alive: {alive}"


def test_quickest_bench_reports_every_row_and_leaves_nothing(tmp_path):
    md, js = tmp_path / "RESULTS.md", tmp_path / "out.json"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(BENCH), *QUICKEST, "--results", str(md), "--json", str(js)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert time.monotonic() - t0 < 60, "the quickest bench took a minute or more"
    result = json.loads(js.read_text())
    _assert_nothing_left(result, proc.pid)

    assert result["rounds"] == 3 and result["modes"] == ["none", "kmap"]
    rows = {(r["mode"], r["size"], r["tunnels"]): r for r in result["rows"]}
    assert set(rows) == {(m, 50, t) for m in ("none", "kmap") for t in (1, 10)}
    for (mode, _size, _t), r in rows.items():
        assert r["rounds"] == 3
        for key in ("pps_min", "pps_median", "vs_none", "vs_kmap"):
            assert isinstance(r[key], (int, float)) and r[key] == r[key], (key, r)  # a number, not NaN
        assert r["received"] > 0, r
        assert r["misrouted"] == 0, r  # the map's packets all took the marked route
        if mode == "kmap":
            assert r["vs_kmap"] == 1.0
        else:
            assert r["vs_none"] == 1.0
    assert len(result["cells"]) == 2 * 2 * 3

    text = md.read_text()
    assert "bench/fastpath_bench.py --quick" in text
    for label in ("no rules", "kernel-only map"):
        for t in (1, 10):
            assert text.count(f"| {label} | {t} | ") == 1, (label, t)
    assert "kernel" in text and "CPUs" in text  # machine info
    assert "## Data plane" in text and "× kernel map" in text


def test_bench_stopped_midway_cleans_up(tmp_path):
    js = tmp_path / "out.json"
    proc = subprocess.Popen([sys.executable, str(BENCH), *QUICKEST, "--duration", "2", "--results",
                             str(tmp_path / "R.md"), "--json", str(js)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:  # stop it while traffic runs
            if (" tunnels " in line and " pps " in line) or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert not (tmp_path / "R.md").exists(), "an interrupted run must not write a report"
    _assert_nothing_left(json.loads(js.read_text()), proc.pid)
