"""The Windows-like LAC's state machine, driven with crafted server messages and a fake clock."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2tp_marker import constants as C
from l2tp_marker import layers as L
from l2tp_marker.lab import winclient as W

PEER_TUNNEL = 4242
PEER_SESSION = 777
TOKEN = "win-1"

STATUS_KEYS = {
    "pid", "token", "state", "tunnel_id", "session_id", "peer_tunnel_id", "peer_session_id",
    "echo_sent", "echo_replies_ok", "echo_replies_foreign", "echo_requests_answered",
    "foreign_tunnel", "retransmissions", "hellos_sent", "control_rx", "data_rx", "error", "since",
}


# --------------------------------------------------------------------------- helpers


def server_msg(msg_type: int, ns: int, nr: int, *avps, tunnel_id: int = 1,
               session_id: int = 0) -> bytes:
    return bytes(L.L2TPv2(tunnel_id=tunnel_id, session_id=session_id, ns=ns, nr=nr,
                          avps=[L.AVPMessageType(msg_type=msg_type), *avps]))


def server_zlb(ns: int, nr: int, tunnel_id: int = 1) -> bytes:
    return bytes(L.L2TPv2(tunnel_id=tunnel_id, session_id=0, ns=ns, nr=nr, avps=[]))


def sccrp(ns: int = 0, nr: int = 1, window: int | None = 4, tunnel_id: int = 1) -> bytes:
    avps = [L.AVPProtocolVersion(), L.AVPHostName(hostname=b"lns"),
            L.AVPAssignedTunnelID(tunnel_id=PEER_TUNNEL)]
    if window is not None:
        avps.append(L.AVPReceiveWindowSize(window=window))
    return server_msg(C.SCCRP, ns, nr, *avps, tunnel_id=tunnel_id)


def icrp(ns: int = 1, nr: int = 3) -> bytes:
    return server_msg(C.ICRP, ns, nr, L.AVPAssignedSessionID(session_id=PEER_SESSION),
                      session_id=1)


def lcp_data(code: int, ident: int, body: bytes, tunnel_id: int = 1, session_id: int = 1) -> bytes:
    ppp = b"\xff\x03" + struct.pack("!HBBH", 0xC021, code, ident, 4 + len(body)) + body
    return bytes(L.L2TPv2(t=0, l=1, s=0, tunnel_id=tunnel_id, session_id=session_id) / ppp)


def parse(datagram: bytes) -> L.L2TPv2:
    return L.L2TPv2(datagram)


def lcp_of(datagram: bytes) -> tuple[int, int, bytes]:
    """(code, id, body) of the LCP packet in an L2TP data message we sent."""
    pkt = parse(datagram)
    assert pkt.t == 0
    ppp = bytes(pkt.payload)
    assert ppp[:4] == b"\xff\x03\xc0\x21"
    code, ident, length = struct.unpack("!BBH", ppp[4:8])
    assert length == len(ppp) - 4
    return code, ident, ppp[8:]


def avp(pkt: L.L2TPv2, cls: type) -> L.L2TPAVP:
    found = [a for a in pkt.avps if isinstance(a, cls)]
    assert len(found) == 1, f"{cls.__name__} x{len(found)} in {pkt.summary()}"
    return found[0]


def new_client(**kw) -> W.WinClient:
    cfg = dict(tunnel_id=1, session_id=1, token=TOKEN, hostname="WIN-PC1")
    cfg.update(kw)
    return W.WinClient(W.ClientConfig(**cfg))


def established(**kw) -> tuple[W.WinClient, float]:
    """A client that went through SCCRQ..ICCN at t=0..0.2, ICCN acked; returns (client, now)."""
    c = new_client(**kw)
    c.start(0.0)
    c.receive(sccrp(), 0.1)
    c.receive(icrp(), 0.2)
    assert c.state == W.ESTABLISHED
    out = c.receive(server_zlb(ns=2, nr=4), 0.25)  # acks ICCN (Ns 3)
    assert out == []
    return c, 0.25


# --------------------------------------------------------------------------- tunnel set-up


def test_sccrq_header_and_avps():
    c = new_client(tunnel_id=1, hostname="WIN-PC1")
    out = c.start(0.0)
    assert len(out) == 1
    pkt = parse(out[0])
    assert (pkt.t, pkt.l, pkt.s, pkt.ver) == (1, 1, 1, 2)
    assert (pkt.tunnel_id, pkt.session_id, pkt.ns, pkt.nr) == (0, 0, 0, 0)
    assert pkt.length == len(out[0])
    assert pkt.msg_type == C.SCCRQ
    assert [type(a) for a in pkt.avps] == [
        L.AVPMessageType, L.AVPProtocolVersion, L.AVPFramingCapabilities,
        L.AVPBearerCapabilities, L.AVPFirmwareRevision, L.AVPHostName, L.AVPVendorName,
        L.AVPAssignedTunnelID, L.AVPReceiveWindowSize,
    ]
    version = avp(pkt, L.AVPProtocolVersion)
    assert (version.version, version.revision) == (1, 0)
    assert avp(pkt, L.AVPHostName).hostname == b"WIN-PC1"
    assert avp(pkt, L.AVPVendorName).vendor_name == b"Microsoft"
    assert avp(pkt, L.AVPAssignedTunnelID).tunnel_id == 1
    assert avp(pkt, L.AVPReceiveWindowSize).window == 8
    assert all(a.h == 0 for a in pkt.avps)
    assert c.state == W.WAIT_SCCRP


def test_start_twice_is_an_error():
    c = new_client()
    c.start(0.0)
    with pytest.raises(RuntimeError):
        c.start(1.0)


def test_sccrp_learns_peer_tunnel_and_sends_scccn_then_icrq():
    c = new_client(session_id=5, call_serial=None)
    c.start(0.0)
    out = c.receive(sccrp(), 0.3)
    assert c.peer_tunnel_id == PEER_TUNNEL
    assert c.state == W.WAIT_ICRP
    assert c.since == 0.3
    scccn, icrq = (parse(d) for d in out)
    assert scccn.msg_type == C.SCCCN
    assert (scccn.tunnel_id, scccn.session_id, scccn.ns, scccn.nr) == (PEER_TUNNEL, 0, 1, 1)
    assert icrq.msg_type == C.ICRQ
    assert (icrq.tunnel_id, icrq.session_id, icrq.ns, icrq.nr) == (PEER_TUNNEL, 0, 2, 1)
    assert avp(icrq, L.AVPAssignedSessionID).session_id == 5
    assert avp(icrq, L.AVPCallSerialNumber).serial == 5


def test_sccrp_for_another_tunnel_is_counted_and_ignored():
    c = new_client(tunnel_id=1)
    c.start(0.0)
    assert c.receive(sccrp(tunnel_id=2), 0.1) == []
    assert c.counters.foreign_tunnel == 1
    assert c.counters.control_rx == 0
    assert c.state == W.WAIT_SCCRP
    assert c.peer_tunnel_id is None


def test_peer_window_limits_messages_in_flight():
    c = new_client()
    c.start(0.0)
    out = c.receive(sccrp(window=1), 0.1)
    assert [parse(d).msg_type for d in out] == [C.SCCCN]  # ICRQ waits for the window
    out = c.receive(server_zlb(ns=1, nr=2), 0.2)
    assert [parse(d).msg_type for d in out] == [C.ICRQ]
    assert (parse(out[0]).ns, parse(out[0]).nr) == (2, 1)


def test_missing_window_avp_means_default_4():
    c = new_client()
    c.start(0.0)
    c.receive(sccrp(window=None), 0.1)
    assert c.peer_window == 4


def test_icrp_learns_peer_session_and_sends_iccn():
    c = new_client()
    c.start(0.0)
    c.receive(sccrp(), 0.1)
    out = c.receive(icrp(), 0.2)
    assert c.peer_session_id == PEER_SESSION
    assert c.state == W.ESTABLISHED
    iccn = parse(out[0])
    assert iccn.msg_type == C.ICCN
    assert (iccn.tunnel_id, iccn.session_id, iccn.ns, iccn.nr) == (PEER_TUNNEL, PEER_SESSION, 3, 2)
    assert avp(iccn, L.AVPTxConnectSpeed).speed > 0
    assert avp(iccn, L.AVPFramingType).framing == 1
    # PPP starts with an LCP Configure-Request on the data channel.
    assert lcp_of(out[1])[0] == W.LCP_CONF_REQ


def test_icrp_for_another_session_is_acked_but_ignored():
    c = new_client(session_id=1)
    c.start(0.0)
    c.receive(sccrp(), 0.1)
    bad = server_msg(C.ICRP, 1, 3, L.AVPAssignedSessionID(session_id=9), session_id=2)
    out = c.receive(bad, 0.2)
    assert [parse(d).msg_type for d in out] == [None]  # a ZLB
    assert c.state == W.WAIT_ICRP


def test_sccrp_without_assigned_tunnel_id_fails():
    c = new_client()
    c.start(0.0)
    c.receive(server_msg(C.SCCRP, 0, 1, L.AVPProtocolVersion()), 0.1)
    assert c.state == W.FAILED
    assert "Assigned Tunnel ID" in c.error
    assert c.finished


# --------------------------------------------------------------------------- reliable delivery


def test_sccrq_retransmission_backoff_then_failure():
    c = new_client(setup_timeout=100.0)
    first = c.start(0.0)[0]
    times = []
    now = 0.0
    while not c.finished:
        now = c.next_deadline()
        assert c.tick(now - 0.001) == []  # nothing early
        out = c.tick(now)
        if out:
            assert out == [first]  # identical retransmission (Ns 0, Nr 0)
            times.append(now)
    assert times == [1.0, 3.0, 7.0, 15.0, 31.0]
    assert now == 47.0  # the fifth retransmission waited max_rto (16 s) too
    assert c.counters.retransmissions == 5
    assert c.state == W.FAILED
    assert "SCCRQ" in c.error
    assert c.next_deadline() is None


def test_ack_stops_retransmission():
    c = new_client(setup_timeout=30.0)
    c.start(0.0)
    assert c.next_deadline() == 1.0
    assert c.receive(server_zlb(ns=0, nr=1), 0.5) == []
    assert c.next_deadline() == 30.0  # only the set-up allowance is left
    assert c.tick(29.9) == []
    assert c.counters.retransmissions == 0
    assert c.state == W.WAIT_SCCRP


def test_acked_but_unanswered_sccrq_fails_after_setup_timeout():
    # xl2tpd acks a second SCCRQ with the same peer address and tunnel ID, then ignores it.
    c = new_client(setup_timeout=30.0)
    c.start(0.0)
    c.receive(server_zlb(ns=0, nr=1), 0.1)
    assert c.tick(30.0) == []  # no peer tunnel yet: nothing to tear down
    assert c.state == W.FAILED
    assert c.since == 30.0
    assert "no SCCRP within 30 s" in c.error and "never answered" in c.error
    assert c.finished


def test_unanswered_icrq_fails_and_stops_the_tunnel():
    c = new_client(setup_timeout=30.0)
    c.start(0.0)
    c.receive(sccrp(), 0.1)
    c.receive(server_zlb(ns=1, nr=3), 0.2)  # SCCCN and ICRQ acked
    out = c.tick(30.0)
    assert [parse(d).msg_type for d in out] == [C.STOPCCN]
    assert c.state == W.FAILED
    assert "no ICRP" in c.error
    c.receive(server_zlb(ns=1, nr=4), 30.1)
    assert c.finished
    assert c.state == W.FAILED


def test_ack_resets_backoff():
    c = new_client()
    c.start(0.0)
    c.tick(1.0)
    c.tick(3.0)  # two retransmissions, rto now 4
    c.receive(sccrp(), 3.5)  # acks SCCRQ, SCCCN+ICRQ go out
    assert c.next_deadline() == 4.5  # back to 1 s


def test_retransmission_carries_current_nr():
    c = new_client()
    c.start(0.0)
    c.receive(sccrp(), 0.1)  # SCCCN Ns1 and ICRQ Ns2 unacked
    c.receive(server_msg(C.HELLO, 1, 1), 0.2)  # acks SCCRQ only; our Nr becomes 2
    out = c.tick(1.1)
    assert [(parse(d).msg_type, parse(d).ns, parse(d).nr) for d in out] == [
        (C.SCCCN, 1, 2), (C.ICRQ, 2, 2)]
    assert c.counters.retransmissions == 2


def test_duplicate_is_reacked_not_reprocessed():
    c = new_client()
    c.start(0.0)
    c.receive(sccrp(), 0.1)
    sent = c.counters.control_tx
    out = c.receive(sccrp(), 0.2)  # our ack got lost: the server retransmits SCCRP
    assert len(out) == 1
    zlb = parse(out[0])
    assert zlb.msg_type is None and zlb.avps == []
    assert (zlb.tunnel_id, zlb.ns, zlb.nr) == (PEER_TUNNEL, 3, 1)
    assert c.counters.duplicates == 1
    assert c.counters.control_tx == sent
    assert c.state == W.WAIT_ICRP


def test_out_of_order_message_is_dropped():
    c = new_client()
    c.start(0.0)
    c.receive(sccrp(), 0.1)
    assert c.receive(server_msg(C.HELLO, 5, 3), 0.2) == []
    # The next in-order message is still Ns 1.
    out = c.receive(icrp(ns=1, nr=3), 0.3)
    assert parse(out[0]).msg_type == C.ICCN


def test_hello_from_server_is_acked_with_zlb():
    c, now = established()
    out = c.receive(server_msg(C.HELLO, 2, 4), now + 1)
    assert len(out) == 1
    zlb = parse(out[0])
    assert zlb.msg_type is None
    assert (zlb.tunnel_id, zlb.session_id, zlb.ns, zlb.nr) == (PEER_TUNNEL, 0, 4, 3)
    # The same HELLO again is a duplicate: acked again, same numbers.
    again = parse(c.receive(server_msg(C.HELLO, 2, 4), now + 2)[0])
    assert (again.ns, again.nr) == (4, 3)
    assert c.counters.duplicates == 1


def test_zlb_sequence_number_does_not_advance():
    c, now = established()
    c.receive(server_msg(C.HELLO, 2, 4), now)
    c.receive(server_msg(C.HELLO, 3, 4), now)
    # Our next real message still gets Ns 4.
    hello = next(parse(d) for d in c.tick(now + 60) if parse(d).t)
    assert (hello.msg_type, hello.ns, hello.nr) == (C.HELLO, 4, 4)


def test_own_hello_every_interval():
    c = new_client(hello_interval=10.0, echo_interval=100.0)
    c.start(0.0)
    c.receive(sccrp(), 0.1)
    c.receive(icrp(), 0.2)
    c.receive(server_zlb(ns=2, nr=4), 0.3)
    out = c.tick(10.1)
    hello = parse(out[0])
    assert (hello.msg_type, hello.tunnel_id, hello.session_id, hello.ns) == (
        C.HELLO, PEER_TUNNEL, 0, 4)
    assert c.counters.hellos_sent == 1
    c.receive(server_zlb(ns=2, nr=5), 10.2)
    assert [parse(d).msg_type for d in c.tick(20.1)] == [C.HELLO]
    assert c.counters.hellos_sent == 2


# --------------------------------------------------------------------------- data channel


def test_echo_request_every_interval_carries_token():
    c, now = established(echo_interval=1.0)
    assert c.next_deadline() == pytest.approx(1.2)
    out = c.tick(1.2)
    pkt = parse(out[0])
    assert (pkt.t, pkt.l, pkt.s) == (0, 1, 0)
    assert (pkt.tunnel_id, pkt.session_id) == (PEER_TUNNEL, PEER_SESSION)
    code, ident, body = lcp_of(out[0])
    assert (code, ident, body) == (W.LCP_ECHO_REQ, 1, b"\0\0\0\0" + TOKEN.encode())
    assert lcp_of(c.tick(2.2)[0])[1] == 2
    assert c.counters.echo_sent == 2


def test_echo_reply_counting_ok_vs_foreign():
    c, now = established()
    c.receive(lcp_data(W.LCP_ECHO_REPLY, 1, b"\x11\x22\x33\x44" + TOKEN.encode()), now)
    c.receive(lcp_data(W.LCP_ECHO_REPLY, 2, b"\x11\x22\x33\x44" + b"win-2"), now)
    c.receive(lcp_data(W.LCP_ECHO_REPLY, 3, b"\x11\x22\x33\x44" + TOKEN.encode()), now)
    assert (c.counters.echo_replies_ok, c.counters.echo_replies_foreign) == (2, 1)
    assert c.counters.data_rx == 3


def test_server_echo_request_is_answered():
    c, now = established()
    out = c.receive(lcp_data(W.LCP_ECHO_REQ, 7, b"\xde\xad\xbe\xef" + b"probe"), now)
    pkt = parse(out[0])
    assert (pkt.tunnel_id, pkt.session_id) == (PEER_TUNNEL, PEER_SESSION)
    assert lcp_of(out[0]) == (W.LCP_ECHO_REPLY, 7, b"\0\0\0\0probe")
    assert c.counters.echo_requests_answered == 1


def test_lcp_configure_request_is_acked():
    c, now = established()
    options = bytes([5, 6, 1, 2, 3, 4])  # magic number option
    out = c.receive(lcp_data(W.LCP_CONF_REQ, 3, options), now)
    assert lcp_of(out[0]) == (W.LCP_CONF_ACK, 3, options)


def test_data_for_another_tunnel_is_foreign():
    c, now = established()
    assert c.receive(lcp_data(W.LCP_ECHO_REQ, 1, b"\0" * 4, tunnel_id=2), now) == []
    assert c.counters.foreign_tunnel == 1
    assert c.counters.data_rx == 0
    assert c.counters.echo_requests_answered == 0


def test_data_for_another_session_is_counted_separately():
    c, now = established()
    assert c.receive(lcp_data(W.LCP_ECHO_REQ, 1, b"\0" * 4, session_id=9), now) == []
    assert c.counters.foreign_session == 1
    assert c.counters.echo_requests_answered == 0


def test_malformed_packet_is_counted():
    c, now = established()
    assert c.receive(b"\x01", now) == []
    assert c.counters.malformed == 1
    assert c.state == W.ESTABLISHED


# --------------------------------------------------------------------------- teardown


def test_stopccn_from_server_is_acked_and_closes():
    c, now = established()
    stop = server_msg(C.STOPCCN, 2, 4,
                      L.AVPResultCode(result_code=1, error_code=0, error_message=b"bye"),
                      L.AVPAssignedTunnelID(tunnel_id=PEER_TUNNEL))
    out = c.receive(stop, now + 1)
    assert len(out) == 1
    zlb = parse(out[0])
    assert zlb.msg_type is None and (zlb.tunnel_id, zlb.nr) == (PEER_TUNNEL, 3)
    assert c.state == W.CLOSED
    assert c.finished
    assert c.error is None
    assert c.next_deadline() is None


def test_stopccn_during_setup_records_error():
    c = new_client()
    c.start(0.0)
    stop = server_msg(C.STOPCCN, 0, 1, L.AVPResultCode(result_code=2, error_code=6),
                      L.AVPAssignedTunnelID(tunnel_id=PEER_TUNNEL))
    out = c.receive(stop, 0.1)
    assert parse(out[0]).tunnel_id == PEER_TUNNEL
    assert c.state == W.CLOSED
    assert "result 2" in c.error


def test_close_sends_cdn_then_stopccn_and_finishes_on_ack():
    c, now = established()
    out = c.close(now + 1)
    cdn, stop = (parse(d) for d in out)
    assert cdn.msg_type == C.CDN
    assert (cdn.tunnel_id, cdn.session_id, cdn.ns) == (PEER_TUNNEL, PEER_SESSION, 4)
    assert avp(cdn, L.AVPResultCode).result_code == W.CDN_ADMIN
    assert avp(cdn, L.AVPAssignedSessionID).session_id == 1
    assert stop.msg_type == C.STOPCCN
    assert (stop.tunnel_id, stop.session_id, stop.ns) == (PEER_TUNNEL, 0, 5)
    assert avp(stop, L.AVPResultCode).result_code == W.STOPCCN_GENERAL_REQUEST
    assert avp(stop, L.AVPAssignedTunnelID).tunnel_id == 1
    assert c.state == W.CLOSED
    assert not c.finished
    assert c.tick(now + 1.5) == []  # no echo or hello after close
    c.receive(server_zlb(ns=2, nr=5), now + 1.2)  # CDN acked
    assert not c.finished
    c.receive(server_zlb(ns=2, nr=6), now + 1.3)  # StopCCN acked
    assert c.finished
    assert c.error is None


def test_close_gives_up_after_close_timeout():
    c, now = established(close_timeout=2.0)
    c.close(now)
    deadline = c.next_deadline()
    assert deadline == pytest.approx(now + 1.0)  # a retransmission first
    c.tick(now + 1.0)
    c.tick(now + 2.0)
    assert c.finished
    assert c.state == W.CLOSED


def test_close_before_sccrp_sends_nothing():
    c = new_client()
    c.start(0.0)
    assert c.close(0.5) == []
    assert c.finished
    assert c.state == W.CLOSED


def test_close_during_a_teardown_in_progress_waits_for_it():
    c, now = established()
    cdn = server_msg(C.CDN, 2, 4, L.AVPResultCode(result_code=3),
                     L.AVPAssignedSessionID(session_id=PEER_SESSION), session_id=1)
    c.receive(cdn, now)  # we answer with StopCCN
    assert c.close(now + 0.1) == []
    assert not c.finished  # still waiting for the StopCCN's ack
    c.receive(server_zlb(ns=3, nr=5), now + 0.2)
    assert c.finished


def test_wrong_version_is_malformed():
    c, now = established()
    data = bytearray(server_msg(C.HELLO, 2, 4))
    data[1] = (data[1] & 0xF0) | 3  # L2TPv3
    before = c.counters.control_rx
    assert c.receive(bytes(data), now) == []
    assert c.counters.malformed == 1
    assert c.counters.control_rx == before


def test_cdn_from_server_clears_the_tunnel():
    c, now = established()
    cdn = server_msg(C.CDN, 2, 4, L.AVPResultCode(result_code=3),
                     L.AVPAssignedSessionID(session_id=PEER_SESSION), session_id=1)
    out = c.receive(cdn, now)
    assert [parse(d).msg_type for d in out] == [C.STOPCCN]  # carries the ack (Nr 3)
    assert parse(out[0]).nr == 3
    assert c.state == W.CLOSED
    c.receive(server_zlb(ns=3, nr=5), now + 0.1)
    assert c.finished


# --------------------------------------------------------------------------- status


def test_status_has_all_keys_and_tracks_state_changes():
    c = new_client()
    st = c.status()
    assert STATUS_KEYS - {"pid"} <= set(st)
    assert st["state"] == W.IDLE
    c.start(5.0)
    st = c.status()
    assert (st["state"], st["since"], st["tunnel_id"], st["token"]) == (W.WAIT_SCCRP, 5.0, 1, TOKEN)
    json.dumps(st)


def test_write_status_is_atomic_json(tmp_path: Path):
    path = tmp_path / "status.json"
    W.write_status(str(path), {"state": "idle"})
    W.write_status(str(path), {"state": "established"})
    assert json.loads(path.read_text()) == {"state": "established"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_config_rejects_bad_ids():
    with pytest.raises(ValueError):
        W.ClientConfig(tunnel_id=0)
    assert W.main(["--server", "127.0.0.1", "--token", "x", "--status-file", "/dev/null",
                   "--tunnel-id", "70000"]) == 2


# --------------------------------------------------------------------------- socket loop


def test_bind_failure_is_reported_in_the_status_file(tmp_path: Path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("0.0.0.0", 0))
    try:
        status = tmp_path / "st.json"
        rc = W.run(new_client(), W.RunOptions(server="127.0.0.1", status_file=str(status),
                                              local_port=busy.getsockname()[1]))
    finally:
        busy.close()
    assert rc == 1
    st = json.loads(status.read_text())
    assert st["state"] == W.FAILED
    assert "cannot bind" in st["error"]


def _read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_cli_against_a_scripted_server_on_loopback(tmp_path: Path):
    """The real socket loop on 127.0.0.1 (ephemeral ports, no root): set-up, echo, SIGTERM."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5.0)
    status = tmp_path / "st.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "l2tp_marker.lab.winclient", "--server", "127.0.0.1",
         "--server-port", str(srv.getsockname()[1]), "--local-port", "0",
         "--tunnel-id", "1", "--session-id", "1", "--token", TOKEN,
         "--status-file", str(status), "--echo-interval", "0.2"],
        cwd=Path(__file__).resolve().parents[2])
    try:
        def recv_control(expected: int) -> tuple[L.L2TPv2, tuple]:
            while True:
                data, addr = srv.recvfrom(2048)
                pkt = parse(data)
                if pkt.t and pkt.msg_type == expected:
                    return pkt, addr

        pkt, client = recv_control(C.SCCRQ)
        srv.sendto(sccrp(), client)
        recv_control(C.ICRQ)
        srv.sendto(icrp(), client)
        recv_control(C.ICCN)
        srv.sendto(server_zlb(ns=2, nr=4), client)
        # Answer echo requests: one good reply, then one with foreign data.
        replies = [TOKEN.encode(), b"other"]
        while replies:
            data, _ = srv.recvfrom(2048)
            pkt = parse(data)
            if not pkt.t and lcp_of(data)[0] == W.LCP_ECHO_REQ:
                _, ident, _ = lcp_of(data)
                srv.sendto(lcp_data(W.LCP_ECHO_REPLY, ident, b"\0\0\0\0" + replies.pop(0)),
                           client)
        deadline = time.monotonic() + 5
        st = {}
        while time.monotonic() < deadline:
            st = _read_status(status)
            if st.get("echo_replies_foreign") == 1 and st.get("echo_replies_ok") == 1:
                break
            time.sleep(0.05)
        assert STATUS_KEYS <= set(st)
        assert st["state"] == W.ESTABLISHED
        assert st["pid"] == proc.pid
        assert (st["peer_tunnel_id"], st["peer_session_id"]) == (PEER_TUNNEL, PEER_SESSION)

        proc.send_signal(signal.SIGTERM)
        cdn, _ = recv_control(C.CDN)
        stop, _ = recv_control(C.STOPCCN)
        srv.sendto(server_zlb(ns=2, nr=(stop.ns + 1) & 0xFFFF), client)
        assert proc.wait(timeout=5) == 0
        final = _read_status(status)
        assert final["state"] == W.CLOSED
        assert final["echo_replies_ok"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.close()
