"""The marker in the namespace lab with real xl2tpd: the product's end-to-end proof (root only).

Each test uses ``make_lab`` (conftest.py), which afterwards asserts that no namespace, process or
rule of the test is left behind. Misdelivery and unmarked packets are counted from captures of the
gateway's links (see l2tp_marker/lab/analysis.py); echo health from the PPP peers on both sides.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from l2tp_marker.lab.marker import MarkerProcess
from l2tp_marker.lab.topology import ClientSpec

pytestmark = pytest.mark.lab

ECHO = 0.3
SETTLE = 4.0
WIN = ClientSpec("win", 1, 1)
LAC = ClientSpec("xl2tpd")


def marker_rules(lab) -> list[str]:
    return [line for line in lab.mangle_listing() if "L2TP-MARKER" in line]


def observe(lab, seconds: float):
    lab.start_observer()
    time.sleep(seconds)
    lab.stop_observer()
    return lab.report()


def bring_up(lab, marker: MarkerProcess | None, timeout: float = 20.0) -> bool:
    lab.start_lns()
    if marker is not None:
        marker.start()
    lab.start_observer()
    lab.start_clients()
    return lab.wait_established(timeout)


def assert_isolated(report, *, check_foreign: bool = True) -> None:
    text = report.format()
    assert report.unmarked == 0, text
    for c in report.clients:
        assert c.established, text
        assert c.echo_ok_both_ways, text
        assert c.misdelivered == 0, text
        if check_foreign:
            assert c.client_replies_foreign == 0 and c.lns_replies_foreign == 0, text


def test_without_marker_the_lab_shows_the_failure(make_lab):
    """win(1), win(1), xl2tpd and no marker: whichever Windows client speaks second is refused by
    xl2tpd, and the merged conntrack entry sends replies of the others over the wrong SA."""
    with make_lab([WIN, WIN, LAC], echo_interval=ECHO) as lab:
        assert not bring_up(lab, None, timeout=8)
        time.sleep(SETTLE)
        lab.stop_observer()
        r = lab.report()
    text = r.format()
    assert sorted(r.client(n).established for n in (1, 2)) == [False, True], text
    assert r.lns_log_contains("Peer requested tunnel 1 twice"), text
    assert r.misdelivered > 0, text  # replies followed the last speaker's mark


def test_marker_isolates_two_windows_clients_and_an_xl2tpd_lac(make_lab):
    with make_lab([WIN, WIN, LAC], echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab)
        assert bring_up(lab, marker), lab.report().format()
        time.sleep(SETTLE)
        lab.stop_observer()
        r = lab.report()
        st = marker.status()
        # What an operator types: the table names all three tunnels, the alias and the marks.
        table = subprocess.run([sys.executable, "-m", "l2tp_marker.cli", "status", "--socket",
                                str(marker.control_socket)], capture_output=True, text=True, check=True).stdout
        assert marker.stop() == 0
        assert marker_rules(lab) == []
        decisions = marker.decisions()  # the lab's work folder goes with the lab
    assert "3 tunnel(s)" in table and "rules OK" in table, table
    rows = [line.split() for line in table.splitlines() if line.startswith("192.0.2.10:1701")]
    assert sorted((row[4], row[2]) for row in rows) == sorted(
        (f"{t['mark']:#x}", "-" if t["alias"] is None else str(t["alias"])) for t in st["tunnels"])
    assert sum(row[2] == "65535" for row in rows) == 1 and all(row[5] == "established" for row in rows), table
    assert_isolated(r)
    assert not r.lns_log_contains("twice"), r.format()
    # Whichever Windows client spoke second was aliased on the way in; the LNS only saw the alias.
    tunnels = {t["mark"]: t for t in st["tunnels"]}
    assert tunnels[1]["client_tid"] == tunnels[2]["client_tid"] == 1
    assert sorted((tunnels[1]["alias"] or 0, tunnels[2]["alias"] or 0)) == [0, 0xFFFF]
    assert tunnels[3]["alias"] is None
    assert any(d["reason"] == "sccrq_aliased" and d["rewrite"] == {"assigned_tunnel_id": 0xFFFF}
               for d in decisions)
    # Every packet that went out to the aliased tunnel got the client's real ID back.
    assert all(d["rewrite"] == {"tunnel_id": 1} for d in decisions
               if d["dir"] == "out" and d["tunnel"] == 0xFFFF)


def test_four_windows_clients_with_tunnel_id_1(make_lab):
    with make_lab([WIN] * 4, echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab)
        assert bring_up(lab, marker), lab.report().format()
        time.sleep(SETTLE)
        lab.stop_observer()
        r = lab.report()
        st = marker.status()
        marker.stop()
    assert_isolated(r)
    assert sorted(t["alias"] or t["client_tid"] for t in st["tunnels"]) == [1, 0xFFFD, 0xFFFE, 0xFFFF]


def test_restart_mid_run_keeps_every_session(make_lab):
    with make_lab([WIN, WIN, LAC], echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab)
        assert bring_up(lab, marker), lab.report().format()
        time.sleep(SETTLE / 2)
        lab.stop_observer()
        before = lab.report()
        assert_isolated(before)
        # Restart: the tunnels' SCCRQ/SCCRP will not come again; the saved table must carry them.
        assert marker.stop() == 0
        assert marker.state_file.exists()
        marker.start()
        assert len(marker.status()["tunnels"]) == 3
        after = observe(lab, SETTLE)
        marker.stop()
    # Replies kept flowing, over the right links, and nobody had to reconnect.
    assert_isolated(after, check_foreign=False)
    for b, a in zip(before.clients, after.clients):
        assert a.client_replies_ok > b.client_replies_ok and a.lns_replies_ok > b.lns_replies_ok, after.format()
        assert a.sessions == b.sessions, after.format()
    assert not after.lns_log_contains("Connection closed"), after.format()


def test_sigkill_falls_back_to_connmark_and_next_start_cleans_up(make_lab):
    with make_lab([WIN, WIN, LAC], echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab)
        assert bring_up(lab, marker), lab.report().format()
        time.sleep(1.0)
        lab.stop_observer()
        assert marker.stop(signal.SIGKILL) == -signal.SIGKILL
        leftover = marker_rules(lab)
        assert len(leftover) == 8  # nothing removed them: a crash (2 chains, 2 jumps, queue + bit clear each)
        assert lab.nft_tables() == ["table ip l2tp_marker"]
        # With the daemon dead, --queue-bypass lets every packet through: on its connmark, or on the
        # mark the leftover fast path gives known tunnels (the leftover legacy rules clear its bit).
        dead = observe(lab, 2.0)
        assert sum(c.packets_out for c in dead.clients) > 0, dead.format()
        assert dead.unmarked == 0, dead.format()
        # The next start removes the leftovers instead of stacking a second set.
        marker.start()
        assert sorted(marker_rules(lab)) == sorted(leftover)
        assert lab.nft_tables() == ["table ip l2tp_marker"]
        healed = observe(lab, SETTLE)
        marker.stop()
        assert marker_rules(lab) == []
        assert lab.nft_tables() == []
    assert_isolated(healed, check_foreign=False)
