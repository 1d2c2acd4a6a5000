"""Replay every capture in ``pcaps/`` and check the decisions packet by packet.

The captures are made by ``pcaps/make_pcaps.py`` (see ``pcaps/README.md`` for what each one shows).
Expectations are derived from the packets themselves wherever possible (which tunnel a packet
belongs to, which SA mark owns that tunnel), not from lists of packet numbers. scapy (with the
project's L2TPv2 layers) is the independent decoder used to check the bytes replay produces.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from l2tp_marker import capture_io, codec, hiding
from l2tp_marker import constants as C
from l2tp_marker import layers as L
from l2tp_marker.engine import EngineConfig
from l2tp_marker.replay import MarkPolicy, ReplayResult, replay

ROOT = Path(__file__).resolve().parents[2]
PCAPS = ROOT / "pcaps"
GENERATOR = PCAPS / "make_pcaps.py"
NAT = "192.0.2.10"
GW = "198.51.100.1"
SECRET = b"s3cret"
ALIAS = 0xFFFF
RECORD_KEYS = {"no", "dir", "peer", "kind", "tunnel", "session", "mark_in", "mark", "rewrite", "reason"}

# capture file name -> the tests that check its decisions (filled by @covers)
COVERED: dict[str, list[str]] = {}


def covers(*names: str) -> Callable:
    def deco(fn):
        for name in names:
            COVERED.setdefault(name, []).append(fn.__name__)
        return fn
    return deco


def capture_files() -> list[str]:
    return sorted(p.name for p in PCAPS.iterdir() if p.suffix in (".pcap", ".pcapng"))


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def strict_capture_io(monkeypatch):
    """A decoder bug must surface here instead of turning into an 'internal decode error' record."""
    monkeypatch.setattr(capture_io, "_STRICT", True)


def run(name: str, **kw) -> ReplayResult:
    res = replay(PCAPS / name, **kw)
    assert len(res.records) == len(res.rewritten)
    for rec in res.records:
        assert RECORD_KEYS <= rec.keys(), rec
    return res


def captured(name: str) -> dict[int, capture_io.CapturedPacket]:
    return {p.no: p for p in capture_io.read_capture(PCAPS / name)}


def after(res: ReplayResult) -> dict[int, bytes]:
    """Packet number -> the IP packet as it leaves the marker."""
    return {rec["no"]: ip for rec, (_, ip) in zip(res.records, res.rewritten)}


def l2tp(ip: bytes) -> L.L2TPv2:
    pkt = IP(ip)
    assert pkt.haslayer(L.L2TPv2), pkt.summary()
    return pkt[L.L2TPv2]


def avp_of(msg: L.L2TPv2, attr: int) -> L.L2TPAVP:
    found = [a for a in msg.avps if a.vendor_id == 0 and a.attr_type == attr]
    assert len(found) == 1, f"AVP {attr} x{len(found)} in {msg.summary()}"
    return found[0]


def assigned_tunnel_id(ip: bytes, secret: bytes | None = None) -> int:
    """The Assigned Tunnel ID AVP of a control message, revealed with hiding.unhide if hidden."""
    msg = l2tp(ip)
    avp = avp_of(msg, C.AVP_ASSIGNED_TUNNEL_ID)
    if not avp.h:
        return avp.tunnel_id
    assert secret is not None, "hidden Assigned Tunnel ID and no secret"
    return int.from_bytes(hiding.unhide(C.AVP_ASSIGNED_TUNNEL_ID, avp.value, secret, rv_before(msg, avp)), "big")


def rv_before(msg: L.L2TPv2, avp: L.L2TPAVP) -> bytes:
    rv = None
    for a in msg.avps:
        if a is avp:
            break
        if isinstance(a, L.AVPRandomVector):
            rv = a.vector
    assert rv is not None, "hidden AVP without a Random Vector before it"
    return rv


def scapy_udp_checksum_ok(ip: bytes) -> bool:
    """Independent check: delete the UDP checksum, let scapy rebuild it, compare with the wire."""
    pkt = IP(ip)
    udp = pkt[UDP]
    wire = udp.chksum
    payload = bytes(udp.payload)
    udp.remove_payload()
    udp.add_payload(Raw(payload))
    del udp.chksum
    rebuilt = bytes(pkt)
    # everything but the checksum must be rebuilt identically
    off = (ip[0] & 0x0F) * 4 + 6
    assert rebuilt[:off] + rebuilt[off + 2:] == ip[:off] + ip[off + 2:]
    return IP(rebuilt)[UDP].chksum == wire


def codec_udp_checksum_ok(ip: bytes) -> bool:
    dg = codec.parse_ip_udp(ip)
    return isinstance(dg, codec.UdpDatagram) and codec.udp_checksum_ok(ip, dg)


def changed_offsets(a: bytes, b: bytes) -> list[int]:
    assert len(a) == len(b)
    return [i for i in range(len(a)) if a[i] != b[i]]


def check_rewrites_are_minimal(name: str, res: ReplayResult) -> None:
    """Every rewritten packet: valid UDP checksum (scapy and codec), checksum_ok in the record, and
    nothing changed but the rewritten 16-bit field(s) and the UDP checksum."""
    orig = captured(name)
    out = after(res)
    for rec in res.records:
        before, now = orig[rec["no"]].ip, out[rec["no"]]
        if rec["rewrite"] is None:
            assert now == before, rec
            continue
        assert rec["checksum_ok"] is True, rec
        assert codec_udp_checksum_ok(now), rec
        assert scapy_udp_checksum_ok(now), rec
        ihl = (before[0] & 0x0F) * 4
        allowed = {ihl + 6, ihl + 7}
        msg_before, msg_now = l2tp(before), l2tp(now)
        if "tunnel_id" in rec["rewrite"]:
            assert msg_now.tunnel_id == rec["rewrite"]["tunnel_id"]
            allowed |= {ihl + 8 + (4 if msg_before.l else 2), ihl + 8 + (5 if msg_before.l else 3)}
        if "assigned_tunnel_id" in rec["rewrite"]:
            a0 = avp_of(msg_before, C.AVP_ASSIGNED_TUNNEL_ID)
            start = bytes(before).index(bytes(a0))  # the AVP's value follows its 6-octet header
            allowed |= set(range(start + 6, start + len(bytes(a0))))
        assert set(changed_offsets(before, now)) <= allowed, rec


# ----------------------------------------------------------------------------- every capture


def test_every_capture_has_a_test_and_a_readme_line():
    files = capture_files()
    assert files, "no captures in pcaps/"
    assert sorted(COVERED) == files, (
        f"captures without a test: {sorted(set(files) - set(COVERED))}; "
        f"tests for missing captures: {sorted(set(COVERED) - set(files))}")
    readme = (PCAPS / "README.md").read_text()
    for name in files:
        assert f"`{name}`" in readme, f"pcaps/README.md has no line for {name}"
    assert "make_pcaps.py" in readme


def test_captures_are_what_the_generator_writes(tmp_path):
    """The committed captures are byte-identical to a fresh run of make_pcaps.py (deterministic)."""
    proc = subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == capture_files()
    for name in fresh:
        assert (tmp_path / name).read_bytes() == (PCAPS / name).read_bytes(), f"{name} is stale: rerun make_pcaps.py"


@pytest.mark.parametrize("name", capture_files())
def test_every_capture_replays(name):
    """Nothing raises, every rewritten packet is minimal and checksummed, every L2TP packet judged."""
    res = run(name)
    check_rewrites_are_minimal(name, res)
    packets = captured(name)
    assert res.summary["packets"] == len(packets)
    assert res.summary["l2tp_packets"] == len(res.records)
    for rec in res.records:
        assert rec["dir"] in ("in", "out")
        assert rec["ts"] == packets[rec["no"]].ts


def test_captures_have_valid_checksums_and_consistent_sequence_numbers():
    """The crafted traffic itself is sound: UDP checksums verify, and per tunnel direction the
    control messages' Ns count up by one (a retransmission repeats an earlier one), a ZLB carries
    the next Ns without consuming it, and Nr never goes back."""
    for name in capture_files():
        next_ns: dict = {}
        last_nr: dict = {}
        for p in capture_io.read_capture(PCAPS / name):
            if p.ip is None:
                continue
            dg = codec.parse_ip_udp(p.ip)
            if not isinstance(dg, codec.UdpDatagram):
                continue
            assert codec_udp_checksum_ok(p.ip), (name, p.no)
            if C.L2TP_PORT not in (dg.sport, dg.dport) or p.prefix:
                continue
            msg = l2tp(p.ip)
            if not msg.t:
                continue
            key = (dg.src, dg.sport, dg.dst, dg.dport, msg.tunnel_id)
            expected = next_ns.setdefault(key, msg.ns)
            if msg.msg_type is None:  # ZLB
                assert msg.ns == expected, (name, p.no)
            elif msg.ns == expected:
                next_ns[key] = expected + 1
            else:
                assert msg.ns < expected, (name, p.no)  # a retransmission
            assert msg.nr >= last_nr.get(key, 0), (name, p.no)
            last_nr[key] = msg.nr


# ----------------------------------------------------------------------------- one client


@covers("one-client.pcap")
def test_one_client():
    name = "one-client.pcap"
    res = run(name)
    reasons = [r["reason"] for r in res.records]
    assert reasons[0] == "sccrq_learned"
    for rec in res.records:
        assert rec["rewrite"] is None
        assert rec["mark"] == 1
        assert rec["mark_in"] == 1
        if rec["dir"] == "out":
            assert rec["reason"] == "owner_mark"
            assert rec["tunnel"] == 1
        elif rec["kind"] != "SCCRQ":
            assert rec["reason"] == "inbound_known"
    kinds = [r["kind"] for r in res.records]
    assert kinds[:8] == ["SCCRQ", "SCCRP", "SCCCN", "ZLB", "ICRQ", "ICRP", "ICCN", "ZLB"]
    assert {"HELLO", "data", "CDN", "StopCCN"} <= set(kinds)
    s = res.summary
    assert s["tunnels_learned"] == 1 and s["collisions"] == 0 and s["conflicts"] == []
    [t] = s["tunnels_live"]
    assert (t["peer"], t["client_tid"], t["alias"], t["our_tid"], t["mark"], t["state"]) == \
        (f"{NAT}:1701", 1, None, 28411, 1, "closing")
    assert t["sessions"] == [1]


# ----------------------------------------------------------------------------- two Windows clients


def owners_by_visible_tid(name: str, res: ReplayResult, secret: bytes | None = None) -> dict[int, int]:
    """Visible tunnel ID (what the LNS knows) -> the mark of the SA whose SCCRQ created it.

    Read from the SCCRQs *as the LNS received them* (the rewritten bytes), and the mark they came with.
    """
    orig, out = captured(name), after(res)
    owners: dict[int, int] = {}
    for rec in res.records:
        if rec["dir"] == "in" and rec["kind"] == "SCCRQ" and rec["reason"].startswith("sccrq_"):
            visible = assigned_tunnel_id(out[rec["no"]], secret)
            mark = orig[rec["no"]].mark
            assert owners.setdefault(visible, mark) == mark, "one visible ID, two owners"
    return owners


@covers("two-windows-same-tid.pcap")
def test_two_windows_same_tid_marks_aliases_checksums():
    name = "two-windows-same-tid.pcap"
    res = run(name)
    orig, out = captured(name), after(res)

    # Both clients offered tunnel ID 1; the LNS must have seen two distinct IDs.
    offered = [assigned_tunnel_id(orig[r["no"]].ip) for r in res.records if r["kind"] == "SCCRQ"]
    assert set(offered) == {1}
    owners = owners_by_visible_tid(name, res)
    assert owners == {1: 1, ALIAS: 2}
    client_tid = {visible: 1 for visible in owners}  # what each client calls its tunnel

    # 1. every outbound packet leaves with its owner's mark (the tunnel it is addressed to decides)
    out_recs = [r for r in res.records if r["dir"] == "out"]
    assert len(out_recs) >= 15
    wrong_before = set()
    for rec in out_recs:
        visible = l2tp(orig[rec["no"]].ip).tunnel_id
        assert rec["tunnel"] == visible
        owner = owners[visible]
        assert rec["mark"] == owner, rec
        assert rec["reason"] == ("owner_mark" if rec["mark_in"] == owner else "owner_mark_set"), rec
        if rec["mark_in"] != owner:
            wrong_before.add(owner)
    # connmark had given both clients' packets the other's mark: the engine corrected both
    assert wrong_before == {1, 2}

    # 2. the second client's tunnel aliased on the way in, restored on the way out
    sccrqs = [r for r in res.records if r["kind"] == "SCCRQ"]
    assert [(r["mark_in"], r["reason"], r["rewrite"]) for r in sccrqs] == [
        (1, "sccrq_learned", None),
        (2, "sccrq_aliased", {"assigned_tunnel_id": ALIAS}),
        (2, "sccrq_retransmit", {"assigned_tunnel_id": ALIAS}),
    ]
    for rec in res.records:
        if rec["dir"] == "out":
            visible = rec["tunnel"]
            if visible != client_tid[visible]:
                assert rec["rewrite"] == {"tunnel_id": client_tid[visible]}, rec
                assert l2tp(out[rec["no"]]).tunnel_id == 1
            else:
                assert rec["rewrite"] is None, rec
        elif rec["kind"] == "StopCCN":
            assert rec["mark_in"] == 2
            assert rec["rewrite"] == {"assigned_tunnel_id": ALIAS}
            assert assigned_tunnel_id(out[rec["no"]]) == ALIAS
        elif rec["kind"] != "SCCRQ":
            assert rec["rewrite"] is None and rec["reason"] == "inbound_known", rec
            assert rec["mark"] == rec["mark_in"]
    assert sum(1 for r in out_recs if r["rewrite"]) >= 8

    # 3. checksums valid in the rewritten bytes, checked by scapy and by the codec
    rewritten = [r for r in res.records if r["rewrite"]]
    assert rewritten
    for rec in rewritten:
        assert rec["checksum_ok"] is True
        assert scapy_udp_checksum_ok(out[rec["no"]]), rec
        assert codec_udp_checksum_ok(out[rec["no"]]), rec
    check_rewrites_are_minimal(name, res)

    s = res.summary
    assert s["collisions"] == 1
    assert s["aliases"] == [{"peer": f"{NAT}:1701", "client_tid": 1, "alias": ALIAS}]
    live = {(t["client_tid"], t["alias"]): t for t in s["tunnels_live"]}
    assert live[(1, None)]["mark"] == 1 and live[(1, None)]["our_tid"] == 28411
    assert live[(1, ALIAS)]["mark"] == 2 and live[(1, ALIAS)]["our_tid"] == 9730
    assert live[(1, ALIAS)]["state"] == "closing"
    assert s["conflicts"] == []


# ----------------------------------------------------------------------------- non-Windows client


@covers("non-windows-random-port.pcap")
@pytest.mark.parametrize("gateway", [GW, None])
def test_non_windows_random_port_by_peer(gateway):
    name = "non-windows-random-port.pcap"
    res = run(name, gateway=gateway, marks=MarkPolicy("peer"))
    assert captured(name)[1].linktype == capture_io.LINKTYPE_ETHERNET
    assert res.summary["gateway"] == GW
    mark_of_port = {1701: 1, 50123: 2}  # in order of appearance
    assert [r["reason"] for r in res.records if r["kind"] == "SCCRQ"] == ["sccrq_learned"] * 2
    for rec in res.records:
        port = int(rec["peer"].rsplit(":", 1)[1])
        assert rec["mark"] == mark_of_port[port], rec
        assert rec["mark_in"] is None  # the capture has no marks
        assert rec["rewrite"] is None
        if rec["dir"] == "out":
            assert rec["reason"] == "owner_mark_set"
        elif rec["kind"] != "SCCRQ":
            assert rec["reason"] == "inbound_known"
    tunnels = {t["client_tid"]: t for t in res.summary["tunnels_live"]}
    assert set(tunnels) == {1, 38821}
    assert tunnels[38821]["peer"] == f"{NAT}:50123" and tunnels[38821]["our_tid"] == 17205
    assert all(t["alias"] is None and t["state"] == "established" for t in tunnels.values())
    assert res.summary["collisions"] == 0


@covers("non-windows-random-port.pcap")
def test_non_windows_random_port_by_addr_and_mapping(tmp_path):
    name = "non-windows-random-port.pcap"
    res = run(name, gateway=GW, marks=MarkPolicy("addr"))
    assert {r["mark"] for r in res.records} == {1}
    assert len(res.summary["tunnels_live"]) == 2
    mapping = tmp_path / "marks.txt"
    mapping.write_text("# client SAs\n192.0.2.10:50123 0x20\n192.0.2.10 0x10  # the rest\n")
    res = run(name, gateway=GW, marks=MarkPolicy.from_file(mapping))
    for rec in res.records:
        assert rec["mark"] == (0x20 if rec["peer"].endswith(":50123") else 0x10), rec


# ----------------------------------------------------------------------------- StopCCN, reconnect


@covers("stopccn-reconnect.pcapng")
def test_stopccn_then_reconnect_with_next_tunnel_id():
    name = "stopccn-reconnect.pcapng"
    res = run(name)
    orig = captured(name)
    assert orig[1].linktype == capture_io.LINKTYPE_NFLOG
    hold = EngineConfig().hold_time
    assert hold == 31.0

    # gateway tunnel ID per client tunnel ID, from the SCCRPs (header = client's ID)
    gw_tid = {r["tunnel"]: assigned_tunnel_id(orig[r["no"]].ip) for r in res.records if r["kind"] == "SCCRP"}
    assert set(gw_tid) == {1, 2}
    old_g, new_g = gw_tid[1], gw_tid[2]

    stops = [r for r in res.records if r["kind"] == "StopCCN" and r["tunnel"] == old_g]
    first_stop = stops[0]["ts"]
    new_sccrq = [r for r in res.records if r["kind"] == "SCCRQ"][1]
    assert assigned_tunnel_id(orig[new_sccrq["no"]].ip) == 2
    assert first_stop < new_sccrq["ts"] < first_stop + hold
    assert new_sccrq["reason"] == "sccrq_learned" and new_sccrq["rewrite"] is None

    in_hold_old = in_hold_new = 0
    late = []
    for rec in res.records:
        old = rec["tunnel"] == (old_g if rec["dir"] == "in" else 1)
        new = rec["tunnel"] == (new_g if rec["dir"] == "in" else 2)
        assert rec["rewrite"] is None
        if rec["ts"] <= first_stop or rec["kind"] == "SCCRQ":
            continue
        if rec["ts"] < first_stop + hold:
            if old:
                in_hold_old += 1
                assert rec["reason"] == ("inbound_known" if rec["dir"] == "in" else "owner_mark"), rec
            if new:
                in_hold_new += 1
                assert rec["reason"] in ("inbound_known", "owner_mark"), rec
        else:
            if old:
                late.append(rec)
            if new:
                assert rec["reason"] in ("inbound_known", "owner_mark"), rec
    assert in_hold_old >= 3 and in_hold_new >= 6  # packets of both tunnels during the hold time
    # after 31 s of capture time the old tunnel is released: its late duplicate is unknown
    assert [r["reason"] for r in late] == ["unknown_tunnel"]

    s = res.summary
    assert s["reasons"]["released_stopccn"] == 1
    assert s["tunnels_learned"] == 2
    [t] = s["tunnels_live"]
    assert (t["client_tid"], t["our_tid"], t["mark"], t["state"], t["sessions"]) == (2, new_g, 1, "established", [2])


@covers("stopccn-reconnect.pcapng")
def test_stopccn_hold_time_follows_the_capture_clock():
    """With a longer hold time the late duplicate still finds the old tunnel."""
    res = run("stopccn-reconnect.pcapng", config=EngineConfig(hold_time=120.0))
    late_stop = [r for r in res.records if r["kind"] == "StopCCN"][-1]
    assert late_stop["reason"] == "inbound_known"
    assert "released_stopccn" not in res.summary["reasons"]
    assert len(res.summary["tunnels_live"]) == 2


# ----------------------------------------------------------------------------- hidden AVP


def hidden_sccrqs(res: ReplayResult) -> list[dict]:
    orig = captured("hidden-avp.pcap")
    return [r for r in res.records if r["kind"] == "SCCRQ"
            and avp_of(l2tp(orig[r["no"]].ip), C.AVP_ASSIGNED_TUNNEL_ID).h]


@covers("hidden-avp.pcap")
def test_hidden_avp_without_secret():
    name = "hidden-avp.pcap"
    res = run(name)
    orig = captured(name)
    [rq] = hidden_sccrqs(res)
    # the hidden ID is really 1: it collides with A's live tunnel 1
    assert assigned_tunnel_id(orig[rq["no"]].ip, SECRET) == 1
    assert rq["reason"] == "hidden_id_no_secret" and rq["rewrite"] is None
    for rec in res.records:
        b_packet = rec["mark_in"] == 2 if rec["dir"] == "in" else rec["tunnel"] == ALIAS
        if b_packet and rec is not rq:
            assert rec["reason"] == "unknown_tunnel", rec
        assert rec["rewrite"] is None
    s = res.summary
    assert s["collisions"] == 0 and s["aliases"] == []
    assert [(t["client_tid"], t["mark"]) for t in s["tunnels_live"]] == [(1, 1)]
    assert s["reasons"]["hidden_id_no_secret"] == 1


@covers("hidden-avp.pcap")
def test_hidden_avp_with_secret_is_aliased_and_rehidden():
    name = "hidden-avp.pcap"
    res = run(name, config=EngineConfig(secret=SECRET))
    orig, out = captured(name), after(res)
    [rq] = hidden_sccrqs(res)
    assert rq["reason"] == "sccrq_aliased"
    assert rq["rewrite"] == {"assigned_tunnel_id": ALIAS}
    # the rewritten AVP is still hidden, and reveals (hiding.unhide) to the alias
    new_avp = avp_of(l2tp(out[rq["no"]]), C.AVP_ASSIGNED_TUNNEL_ID)
    assert new_avp.h == 1
    assert assigned_tunnel_id(out[rq["no"]], SECRET) == ALIAS
    revealed = L.reveal(IP(out[rq["no"]]), SECRET)[L.L2TPv2]
    assert avp_of(revealed, C.AVP_ASSIGNED_TUNNEL_ID).tunnel_id == ALIAS
    # so is B's StopCCN
    [stop] = [r for r in res.records if r["kind"] == "StopCCN"]
    assert stop["rewrite"] == {"assigned_tunnel_id": ALIAS}
    assert assigned_tunnel_id(orig[stop["no"]].ip, SECRET) == 1
    assert assigned_tunnel_id(out[stop["no"]], SECRET) == ALIAS
    check_rewrites_are_minimal(name, res)

    # B's tunnel is learned from the LNS's hidden SCCRP, so all of B's traffic is judged
    owners = owners_by_visible_tid(name, res, SECRET)
    assert owners == {1: 1, ALIAS: 2}
    b_gw_tid = next(assigned_tunnel_id(orig[r["no"]].ip, SECRET) for r in res.records
                    if r["kind"] == "SCCRP" and r["tunnel"] == ALIAS)
    for rec in res.records:
        if rec["dir"] == "out":
            assert rec["mark"] == owners[rec["tunnel"]], rec
            if rec["tunnel"] == ALIAS:
                assert rec["rewrite"] == {"tunnel_id": 1}
                assert l2tp(out[rec["no"]]).tunnel_id == 1
        elif rec["kind"] != "SCCRQ":
            assert rec["reason"] == "inbound_known", rec
    live = {t["alias"]: t for t in res.summary["tunnels_live"]}
    assert live[ALIAS]["our_tid"] == b_gw_tid == 9730
    assert live[ALIAS]["sessions"] == [1]  # from the hidden Assigned Session ID of B's ICRQ
    assert res.summary["aliases"] == [{"peer": f"{NAT}:1701", "client_tid": 1, "alias": ALIAS}]


@covers("hidden-avp.pcap")
def test_hidden_avp_with_the_wrong_secret():
    """A wrong secret reveals garbage: the ID is reported undecodable, never learned or aliased."""
    res = run("hidden-avp.pcap", config=EngineConfig(secret=b"wrong"))
    [rq] = hidden_sccrqs(res)
    assert rq["reason"] == "hidden_id_no_secret" and rq["rewrite"] is None
    assert res.summary["reasons"]["hidden_id_undecodable"] == 1
    assert [(t["client_tid"], t["mark"]) for t in res.summary["tunnels_live"]] == [(1, 1)]


# ----------------------------------------------------------------------------- SA conflict


def conflict_expectations(res: ReplayResult) -> tuple[int, int]:
    """(A's gateway tunnel ID, A's mark), from A's SCCRQ and the SCCRP answering it."""
    orig = captured("cross-sa-conflict.pcap")
    [a_rq] = [r for r in res.records if r["kind"] == "SCCRQ" and assigned_tunnel_id(orig[r["no"]].ip) == 1]
    [a_rp] = [r for r in res.records if r["kind"] == "SCCRP" and r["tunnel"] == 1]
    return assigned_tunnel_id(orig[a_rp["no"]].ip), a_rq["mark_in"]


@covers("cross-sa-conflict.pcap")
def test_cross_sa_conflict():
    res = run("cross-sa-conflict.pcap")
    a_gw, a_mark = conflict_expectations(res)
    assert (a_gw, a_mark) == (28411, 1)
    conflicts = []
    for rec in res.records:
        if rec["dir"] == "in" and rec["tunnel"] == a_gw:
            if rec["mark_in"] != a_mark:
                assert rec["reason"] == "sa_conflict", rec
                assert f"{a_mark:#x}" in rec["detail"] and f"{rec['mark_in']:#x}" in rec["detail"]
                assert "drop" not in rec  # default enforce=log
                conflicts.append(rec)
            else:
                assert rec["reason"] == "inbound_known", rec
    assert [(r["kind"], r["mark_in"]) for r in conflicts] == [("data", 2), ("ZLB", 2)]
    # the binding did not move: A's packets after the conflict still leave with A's mark
    after_conflict = [r for r in res.records if r["dir"] == "out" and r["tunnel"] == 1
                      and r["no"] > conflicts[-1]["no"]]
    assert after_conflict
    assert all(r["mark"] == a_mark for r in after_conflict)
    assert any(r["mark_in"] == 2 and r["reason"] == "owner_mark_set" for r in after_conflict)
    s = res.summary
    assert s["conflicts"] == [
        {"peer": f"{NAT}:1701", "tunnel": a_gw, "bound_mark": 1, "seen_mark": 2, "kind": "data"},
        {"peer": f"{NAT}:1701", "tunnel": a_gw, "bound_mark": 1, "seen_mark": 2, "kind": "ZLB"},
    ]
    live = {t["client_tid"]: t for t in s["tunnels_live"]}
    assert live[1]["mark"] == 1 and live[1]["conflicts"] == 2
    assert live[2]["mark"] == 2 and live[2]["conflicts"] == 0
    assert s["reasons"]["sa_conflict"] == 2


@covers("cross-sa-conflict.pcap")
def test_cross_sa_conflict_enforce_drop():
    res = run("cross-sa-conflict.pcap", config=EngineConfig(enforce="drop"))
    dropped = [r for r in res.records if r.get("drop")]
    assert [r["reason"] for r in dropped] == ["sa_conflict", "sa_conflict"]
    assert all(r["mark_in"] == 2 for r in dropped)
    assert [t["mark"] for t in res.summary["tunnels_live"] if t["client_tid"] == 1] == [1]


# ----------------------------------------------------------------------------- malformed

MALFORMED = {  # NFLOG prefix of the bad packet -> the reason replay must give
    "bad: truncated L2TP header": "truncated L2TP header",
    "bad: AVP length 0": "AVP length 0 below 6",
    "bad: AVP beyond the end": "AVP beyond the end of the message",
    "bad: Length field lies": "L2TP length field disagrees with the packet",
    "bad: L2TPv3 on udp/1701": "L2TPv3 on udp/1701",
    "bad: IP fragment 1": "IP fragment",
    "bad: IP fragment 2": "IP fragment",
    "bad: control without L and S": "control message without L and S bits",
    "bad: SCCRQ without Assigned Tunnel ID": "SCCRQ without Assigned Tunnel ID",
}
ENGINE_LEVEL = {"bad: SCCRQ without Assigned Tunnel ID"}  # decodes fine, the engine rejects it


def bad_packets() -> dict[str, capture_io.CapturedPacket]:
    found = {p.prefix: p for p in capture_io.read_capture(PCAPS / "malformed.pcap")
             if p.prefix and p.prefix.startswith("bad:")}
    assert set(found) == set(MALFORMED)
    return found


@covers("malformed.pcap")
def test_malformed_each_reported_with_its_reason():
    res = run("malformed.pcap")
    recs = {r["no"]: r for r in res.records}
    summary_bad = {m["no"]: m["reason"] for m in res.summary["malformed"]}
    for label, p in bad_packets().items():
        want = MALFORMED[label]
        if p.no in recs:  # it reached the L2TP decoder: a record says why
            rec = recs[p.no]
            assert rec["reason"] == "malformed", (label, rec)
            assert rec["detail"] == want, (label, rec)
            assert rec["mark"] == rec["mark_in"] == 1 and rec["rewrite"] is None
        else:  # broken below L2TP (IP fragment): only the summary can tell
            assert want == "IP fragment"
        if label not in ENGINE_LEVEL:
            assert summary_bad.get(p.no) == want, label
    # the record cut short at the end of the file
    packets = list(capture_io.read_capture(PCAPS / "malformed.pcap"))
    last = packets[-1]
    assert last.ip is None and last.error == "truncated record"
    assert summary_bad[last.no] == "truncated record"
    assert res.summary["other_traffic"] == {"malformed_ip": 2, "unreadable": 1}
    assert res.summary["reasons"]["malformed"] == 7


@covers("malformed.pcap")
def test_malformed_packets_do_not_disturb_the_good_tunnel():
    res = run("malformed.pcap")
    bad = {p.no for p in bad_packets().values()}
    good = [r for r in res.records if r["no"] not in bad]
    last_bad = max(bad)
    tail = [r for r in good if r["no"] > last_bad]
    assert len(tail) >= 4
    assert {r["reason"] for r in tail} == {"inbound_known", "owner_mark"}
    [t] = res.summary["tunnels_live"]
    assert (t["client_tid"], t["our_tid"], t["state"]) == (1, 28411, "established")


@covers("malformed.pcap")
def test_summary_malformed_lists_engine_rejected_packets():
    """An SCCRQ without an Assigned Tunnel ID decodes, so the engine, not the codec, rejects it;
    the summary must still list it with its reason."""
    res = run("malformed.pcap")
    p = bad_packets()["bad: SCCRQ without Assigned Tunnel ID"]
    assert {"no": p.no, "reason": "SCCRQ without Assigned Tunnel ID"} in res.summary["malformed"]


# ----------------------------------------------------------------------------- ESP only


@covers("esp-only.pcap")
def test_esp_only_explains_what_to_capture():
    res = run("esp-only.pcap")
    s = res.summary
    assert res.records == [] and s["l2tp_packets"] == 0
    assert s["other_traffic"]["esp"] == 4
    assert s["other_traffic"]["nat_t"] == 19
    assert set(s["other_traffic"]) == {"esp", "nat_t"}
    text = s["explanation"]
    assert "decrypted" in text and "l2tp-marker capture" in text
    assert s["tunnels_live"] == [] and s["malformed"] == []


# ----------------------------------------------------------------------------- mid-session, SLL


@covers("mid-session-sll.pcap")
def test_mid_session_without_gateway_asks_for_it():
    res = run("mid-session-sll.pcap")
    assert captured("mid-session-sll.pcap")[1].linktype == capture_io.LINKTYPE_LINUX_SLL
    assert res.records == []
    assert res.summary["other_traffic"] == {"direction_unknown": 6}
    assert "--gateway" in res.summary["explanation"]


@covers("mid-session-sll.pcap")
def test_mid_session_with_gateway_is_unknown_tunnel():
    res = run("mid-session-sll.pcap", gateway=GW)
    assert len(res.records) == 6
    assert {r["reason"] for r in res.records} == {"unknown_tunnel"}
    assert {r["dir"] for r in res.records} == {"in", "out"}
    for r in res.records:
        assert r["mark"] == (1 if r["dir"] == "in" else 0) and r["rewrite"] is None
    assert res.summary["tunnels_live"] == [] and "explanation" not in res.summary


# ----------------------------------------------------------------------------- unmarked plaintext


@covers("unmarked-plaintext.pcap")
def test_unmarked_plaintext_client_is_never_bound():
    name = "unmarked-plaintext.pcap"
    res = run(name)
    orig = captured(name)
    plain = [r for r in res.records if r["peer"].startswith("203.0.113.50:")]
    assert len(plain) >= 10
    for rec in plain:
        assert orig[rec["no"]].mark is None  # no NFULA_MARK: the mark was 0
        assert rec["mark"] == 0 and rec["rewrite"] is None, rec
        assert rec["reason"] == ("no_mark" if rec["dir"] == "in" else "unknown_tunnel"), rec
    others = [r for r in res.records if r not in plain]
    assert all(r["mark"] == 1 for r in others)
    [t] = res.summary["tunnels_live"]
    assert (t["peer"], t["client_tid"], t["mark"]) == (f"{NAT}:1701", 1, 1)


def test_engine_config_defaults_match_the_captures():
    """The captures hard-code the first alias and the hold time the engine uses by default."""
    cfg = EngineConfig()
    assert cfg.alias_start == ALIAS
    assert cfg.hold_time == C.STOPCCN_HOLD_SECONDS == 31.0


def test_independent_checksum_checks_catch_a_bad_checksum():
    """The two checksum checks used above really fail on a wrong UDP checksum."""
    ip = bytearray(next(p.ip for p in capture_io.read_capture(PCAPS / "one-client.pcap")))
    assert scapy_udp_checksum_ok(bytes(ip)) and codec_udp_checksum_ok(bytes(ip))
    ip[(ip[0] & 0x0F) * 4 + 6] ^= 0x01
    assert not scapy_udp_checksum_ok(bytes(ip))
    assert not codec_udp_checksum_ok(bytes(ip))
