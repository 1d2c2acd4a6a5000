"""Load: 50 Windows-like clients behind one NAT, all offering tunnel ID 1, against one real xl2tpd.

With the marker running every client must get its tunnel (49 of them aliased), PPP echo must be
answered both ways for the whole run, and no packet may leave on another client's link or without a
mark. By default the run carries traffic for 90 s; ``L2TP_SOAK_SECONDS=3600`` makes it a soak of
any length (``L2TP_LOAD_CLIENTS`` changes the number of clients, at most 99).

Figures (clients, packets, misdeliveries, unmarked packets, the marker's RSS and CPU) are printed
and written to ``var/reliability/load-<name>.json`` for ``scripts/reliability_report.py``.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from l2tp_marker.lab.marker import MarkerProcess
from l2tp_marker.lab.topology import ClientSpec

from .test_hardening import cpu_seconds, result_for, rss_kb

pytestmark = pytest.mark.lab

DEFAULT_SECONDS = 90.0
SOAK_SECONDS = float(os.environ.get("L2TP_SOAK_SECONDS") or DEFAULT_SECONDS)
CLIENTS = int(os.environ.get("L2TP_LOAD_CLIENTS") or 50)
SAMPLE_EVERY = 5.0


@pytest.fixture
def load_result(request):
    env = " ".join(f"{k}={os.environ[k]}" for k in ("L2TP_SOAK_SECONDS", "L2TP_LOAD_CLIENTS")
                   if os.environ.get(k))
    r = result_for(request, "load", env)
    yield r
    r.write()


def test_fifty_windows_clients_with_tunnel_id_1_behind_one_nat(make_lab, load_result):
    figures = load_result.figures
    figures.update({"clients": CLIENTS, "traffic_seconds": SOAK_SECONDS, "echo_interval": 1.0})
    with make_lab([ClientSpec("win", 1, 1)] * CLIENTS) as lab:
        marker = MarkerProcess(lab)
        lab.start_lns()
        marker.start()
        lab.start_observer()
        t0 = time.monotonic()
        lab.start_clients()
        assert lab.wait_established(120), lab.report().format()
        figures["seconds_to_establish_all"] = round(time.monotonic() - t0, 1)
        pid = marker.proc.pid
        judged0 = marker.status()["packets"]
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        rss_max = rss_kb(pid)
        fewest_up = CLIENTS
        end = wall0 + SOAK_SECONDS
        while (now := time.monotonic()) < end:
            time.sleep(min(SAMPLE_EVERY, end - now))
            rss_max = max(rss_max, rss_kb(pid))
            fewest_up = min(fewest_up, sum(lab.is_established(n) for n in range(1, CLIENTS + 1)))
        cpu = cpu_seconds(pid) - cpu0
        wall = time.monotonic() - wall0
        lab.stop_observer()
        report = lab.report()
        st = marker.status()
        # Read before the marker stops: without it the aliased tunnels' packets keep their alias.
        foreign_tunnel = sum(int(lab.win_status(n).get("foreign_tunnel", 0)) for n in range(1, CLIENTS + 1))
        assert marker.stop() == 0
    judged = sum(st["packets"].get(k, 0) - judged0.get(k, 0) for k in ("in_accepted", "out_accepted"))
    c = report.clients
    figures.update({
        "established_at_end": sum(x.established for x in c), "fewest_established_in_samples": fewest_up,
        "tunnels_in_table": len(st["tunnels"]),
        "aliased": sum(1 for t in st["tunnels"] if t["alias"] is not None),
        "packets_judged_in_run": judged, "packets_out_captured": sum(x.packets_out for x in c),
        "packets_in_captured": sum(x.packets_in for x in c),
        "echo_client_sent": sum(x.client_echo_sent for x in c),
        "echo_client_answered": sum(x.client_replies_ok for x in c),
        "echo_lns_sent": sum(x.lns_echo_sent for x in c),
        "echo_lns_answered": sum(x.lns_replies_ok for x in c),
        "misdelivered": report.misdelivered, "lost_to_others": sum(x.lost_to_others for x in c),
        "unmarked": report.unmarked, "foreign_echo_replies":
            sum(x.client_replies_foreign + x.lns_replies_foreign for x in c),
        "foreign_tunnel_packets": foreign_tunnel, "marker_errors": st["packets"].get("errors", 0),
        "marker_rss_kb_max": rss_max, "marker_cpu_seconds": round(cpu, 2),
        "marker_cpu_percent": round(100 * cpu / wall, 2),
        "marker_cpu_us_per_packet": round(1e6 * cpu / judged, 1) if judged else None,
    })
    print(json.dumps(figures, indent=1, sort_keys=True))
    text = report.format()
    assert figures["established_at_end"] == CLIENTS and fewest_up == CLIENTS, text
    assert len(st["tunnels"]) == CLIENTS and figures["aliased"] == CLIENTS - 1
    assert len({t["alias"] or t["client_tid"] for t in st["tunnels"]}) == CLIENTS
    assert report.misdelivered == 0 and figures["lost_to_others"] == 0, text
    assert report.unmarked == 0, text
    assert figures["foreign_echo_replies"] == 0 and foreign_tunnel == 0, text
    assert figures["marker_errors"] == 0
    for x in c:
        # Answered both ways, all along: at most the echoes still in flight when the run ended
        # (and 1% for a long soak) are missing.
        slack = 3 + x.client_echo_sent // 100
        assert x.client_replies_ok >= x.client_echo_sent - slack, text
        assert x.lns_replies_ok >= x.lns_echo_sent - slack, text
        assert x.client_replies_ok >= SOAK_SECONDS / 2 and x.lns_replies_ok >= SOAK_SECONDS / 2, text
    load_result.passed()
