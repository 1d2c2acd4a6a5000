"""The kernel fast path in the namespace lab with real xl2tpd (root only).

What issue #5 asks to see: data packets of known tunnels never reach the daemon's queues (the
kernel's NFQUEUE counters prove it, and every queued packet is in the decision log), control
messages still do, every client stays on its own SA, aliased tunnels' headers are rewritten in the
kernel with valid checksums, and the daemon falls back to (and still works on) the per-packet path.
"""

from __future__ import annotations

import shutil
import time

import pytest

from l2tp_marker.lab.marker import MarkerProcess
from l2tp_marker.lab.topology import DEAD_IF, ClientSpec

from .test_marker_lab import ECHO, SETTLE, assert_isolated, bring_up, observe

pytestmark = pytest.mark.lab

WIN = ClientSpec("win", 1, 1)
WIN7 = ClientSpec("win", 7, 1)  # another tunnel ID: no alias needed
LAC = ClientSpec("xl2tpd")
Q_IN, Q_OUT = 1701, 1702       # the daemon's default queue numbers


def _queued(marker: MarkerProcess) -> tuple[int, int]:
    q = marker.queue_stats()
    return q[Q_IN]["queued"], q[Q_OUT]["queued"]


def test_known_tunnels_data_is_not_queued_but_control_is(make_lab):
    with make_lab([WIN, WIN7, LAC], echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab)
        assert bring_up(lab, marker), lab.report().format()
        time.sleep(1.0)
        st = marker.status()
        fp = st["fastpath"]
        assert fp["mode"] == "kernel", fp
        assert fp["out_entries"] == 3 and fp["in_entries"] == 3 and fp["aliased_tunnels"] == 0, fp
        lab.stop_observer()

        logged_before = len(marker.decisions())
        q_in0, q_out0 = _queued(marker)
        k0 = marker.status()["fastpath"]
        report = observe(lab, SETTLE)          # PPP echo every ECHO s, both ways, over every tunnel
        q_in1, q_out1 = _queued(marker)
        k1 = marker.status()["fastpath"]
        window = marker.decisions()[logged_before:]
        all_logged = marker.decisions()
        marker.stop()
    assert_isolated(report)
    sent_out = sum(c.packets_out for c in report.clients)
    sent_in = sum(c.packets_in for c in report.clients)
    # The kernel handled the data: its counters grew by (nearly) every data packet on the links.
    assert k1["packets_out"] - k0["packets_out"] >= 0.8 * sent_out > 0, (k0, k1, report.format())
    assert k1["packets_in"] - k0["packets_in"] >= 0.8 * sent_in > 0, (k0, k1, report.format())
    # ...and none of it was queued: what the queues took in the window is exactly what the daemon
    # logged (it logs every packet it judges), and none of that is data.
    assert (q_in1 - q_in0, q_out1 - q_out0) == (sum(r["dir"] == "in" for r in window),
                                                sum(r["dir"] == "out" for r in window)), window
    assert [r for r in window if r["kind"] == "data"] == []
    assert q_in1 - q_in0 + q_out1 - q_out0 < 0.1 * (sent_in + sent_out)
    # Control messages are queued and judged: every tunnel's handshake is in the log.
    kinds = {(r["dir"], r["kind"]) for r in all_logged}
    for k in (("in", "SCCRQ"), ("out", "SCCRP"), ("in", "SCCCN"), ("in", "ICRQ"), ("out", "ICRP"), ("in", "ICCN")):
        assert k in kinds, sorted(kinds)
    assert sum(1 for r in all_logged if r["kind"] == "SCCRQ" and r["reason"] == "sccrq_learned") == 3


@pytest.mark.parametrize("offload", ["on", "off"])
def test_aliased_tunnel_is_rewritten_in_the_kernel_with_valid_checksums(make_lab, offload):
    # Two Windows clients with tunnel ID 1: the second is aliased, so the kernel must write the
    # client's tunnel ID back into every outbound data header. With checksum offload off on the
    # gateway's links the UDP checksum is computed in software before netfilter: a rewrite without
    # the checksum update would be dropped by the client's stack, and its PPP echo would fail.
    if offload == "off" and shutil.which("ethtool") is None:
        pytest.skip("ethtool is not installed (scripts/install-deps.sh --test installs it)")
    with make_lab([WIN, WIN], echo_interval=ECHO) as lab:
        if offload == "off":
            for dev in ("c1", "c2", DEAD_IF):
                lab.gw_run(["ethtool", "-K", dev, "tx", "off"], check=True)
        marker = MarkerProcess(lab, decision_log=False)
        assert bring_up(lab, marker), lab.report().format()
        time.sleep(1.0)
        lab.stop_observer()
        f0 = marker.status()["fastpath"]
        csum0 = _csum_errors(lab)
        report = observe(lab, SETTLE)
        f1 = marker.status()["fastpath"]
        csum1 = _csum_errors(lab)
        marker.stop()
    assert_isolated(report)
    assert f0["mode"] == "kernel" and f0["aliased_tunnels"] == 1 and f0["aliases_in_kernel"], f0
    assert (f0["out_entries"], f0["alias_entries"], f0["in_entries"]) == (1, 1, 2), f0
    assert f1["packets_rewritten"] - f0["packets_rewritten"] > 0, (f0, f1)   # the aliased tunnel
    assert f1["packets_out"] - f0["packets_out"] > f1["packets_rewritten"] - f0["packets_rewritten"]
    assert f1["userspace_packets_out"] == f0["userspace_packets_out"], (f0, f1)  # nothing left for userspace
    assert f1["userspace_packets_in"] == f0["userspace_packets_in"], (f0, f1)
    assert csum1 == csum0, (csum0, csum1)


def _csum_errors(lab) -> dict[str, int]:
    """Udp InCsumErrors of every client namespace (a bad checksum is dropped and counted there)."""
    out = {}
    for n in range(1, len(lab.config.clients) + 1):
        text = lab.client_run(n, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
        udp = [line.split() for line in text if line.startswith("Udp:")]
        out[n] = int(dict(zip(udp[0][1:], udp[1][1:]))["InCsumErrors"])
    return out


def test_fast_path_off_judges_every_packet_in_userspace(make_lab):
    with make_lab([WIN, WIN, LAC], echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab, "--fastpath", "off", decision_log=False)
        assert bring_up(lab, marker), lab.report().format()
        time.sleep(1.0)
        lab.stop_observer()
        assert lab.nft_tables() == []
        assert not any("MARK --set-xmark" in line for line in lab.mangle_listing() if "L2TP-MARKER" in line)
        q0 = _queued(marker)
        f0 = marker.status()["fastpath"]
        report = observe(lab, SETTLE)
        q1 = _queued(marker)
        f1 = marker.status()["fastpath"]
        marker.stop()
    assert_isolated(report)
    assert f0["mode"] == "off" and f0["out_entries"] == 0, f0
    sent = sum(c.packets_out + c.packets_in for c in report.clients)
    assert q1[0] - q0[0] + q1[1] - q0[1] >= 0.8 * sent > 0
    hot = (f1["userspace_packets_out"] - f0["userspace_packets_out"]
           + f1["userspace_packets_in"] - f0["userspace_packets_in"])
    assert hot >= 0.5 * sent, (f0, f1, report.format())
