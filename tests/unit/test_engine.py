"""The tracking engine: learning, marking, aliasing, binding, teardown, bounds and persistence."""

from __future__ import annotations

import json

import pytest

from l2tp_marker import codec, hiding
from l2tp_marker import constants as C
from l2tp_marker.engine import Engine, EngineConfig
from l2tp_marker.judge import judge_packet
from l2tp_marker.layers import (AVPAssignedTunnelID, AVPHidden, AVPHostName, AVPMessageType,
                                AVPProtocolVersion, AVPRandomVector, L2TPv2)
from scapy.layers.inet import IP, UDP

from .helpers import (GW, NAT, FakeClock, cdn, control, data, icrp, icrq, sccrp, sccrq, stopccn, zlb)


def make(**cfg):
    clock = FakeClock()
    return Engine(EngineConfig(**cfg), clock=clock), clock


def j(engine, pkt, direction, mark):
    return judge_packet(engine, pkt, direction, mark)


def up(engine, tid, our, mark, port=1701):
    """Bring a tunnel up (SCCRQ in, SCCRP out, SCCCN in); returns the visible (LNS-side) tunnel ID."""
    v = j(engine, sccrq(tid, port=port), "in", mark)
    alias = v.decision.rewrites[0].new if v.decision.rewrites else tid
    j(engine, sccrp(alias, our, port=port), "out", 0)
    j(engine, control("in", C.SCCCN, tunnel=our, port=port), "in", mark)
    return alias


def test_one_client_learned_and_marked():
    e, _ = make()
    v = j(e, sccrq(1), "in", 5)
    assert v.decision.reason == "sccrq_learned" and v.decision.mark is None and v.payload is None
    v = j(e, sccrp(1, 700), "out", 0)
    assert v.decision.mark == 5 and v.decision.reason == "owner_mark_set"
    assert [ev.kind for ev in v.decision.events] == ["bind"]
    assert v.decision.events[0].our_tid == 700
    # A data packet of the tunnel that connmark already marked right is kept as is.
    v = j(e, data("out", 1, 9), "out", 5)
    assert v.decision.mark == 5 and v.decision.reason == "owner_mark"
    # Inbound packets keep their SA mark.
    v = j(e, data("in", 700, 3), "in", 5)
    assert v.decision.mark is None and v.decision.reason == "inbound_known"


def test_two_windows_clients_same_tunnel_id_get_aliased_and_restored():
    e, _ = make()
    assert up(e, 1, 700, mark=1) == 1
    v = j(e, sccrq(1), "in", 2)
    assert v.decision.reason == "sccrq_aliased"
    (rw,) = v.decision.rewrites
    assert (rw.field, rw.old, rw.new) == ("assigned_tunnel_id", 1, 0xFFFF)
    # The LNS sees the alias in the rewritten bytes, with a valid UDP checksum.
    dg = codec.parse_ip_udp(v.payload)
    msg = codec.decode_l2tp(v.payload, dg.payload_offset, dg.payload_end)
    assert msg.assigned_tunnel_id == 0xFFFF
    assert codec.udp_checksum_ok(v.payload, dg)
    assert IP(v.payload)[UDP].chksum == IP(IP(v.payload).build())[UDP].chksum
    # The LNS answers the alias: the header gets the client's real ID back and the client's mark,
    # even though connmark restored the other client's mark.
    v = j(e, sccrp(0xFFFF, 800), "out", 1)
    assert v.decision.mark == 2
    assert [(r.field, r.new) for r in v.decision.rewrites] == [("tunnel_id", 1)]
    out = IP(v.payload)
    assert out[L2TPv2].tunnel_id == 1 and codec.udp_checksum_ok(v.payload, codec.parse_ip_udp(v.payload))
    # Data for each client leaves with its owner's mark whatever mark it arrived with.
    assert j(e, data("out", 1, 1), "out", 2).decision.mark == 1
    v = j(e, data("out", 0xFFFF, 1), "out", 1)
    assert v.decision.mark == 2 and IP(v.payload)[L2TPv2].tunnel_id == 1


def test_third_client_gets_next_alias_and_random_port_client_is_not_aliased_needlessly():
    e, _ = make()
    up(e, 1, 700, 1)
    assert up(e, 1, 701, 2) == 0xFFFF
    assert up(e, 1, 702, 3) == 0xFFFE
    # An ID nobody uses at that address is not aliased, even from another port.
    assert up(e, 4242, 703, 4, port=50123) == 4242
    # Same ID as a live tunnel of the same address but another port: xl2tpd matches on address only.
    assert up(e, 1, 704, 5, port=50123) == 0xFFFD


def test_sccrq_retransmission_keeps_the_same_alias():
    e, _ = make()
    up(e, 1, 700, 1)
    first = j(e, sccrq(1), "in", 2).decision
    again = j(e, sccrq(1), "in", 2).decision
    assert again.reason == "sccrq_retransmit"
    assert [r.new for r in again.rewrites] == [r.new for r in first.rewrites] == [0xFFFF]
    assert len(e) == 2


def test_sa_binding_never_moves_and_conflict_is_counted():
    e, _ = make(enforce="log")
    up(e, 1, 700, 1)
    up(e, 1, 800, 2)
    v = j(e, data("in", 700, 1), "in", 2)  # client 2 sends into client 1's gateway tunnel
    assert v.decision.reason == "sa_conflict" and not v.decision.drop
    c = e.conflicts[-1]
    assert (c.our_tid, c.bound_mark, c.seen_mark) == (700, 1, 2)
    # Return traffic of tunnel 1 still goes to mark 1.
    assert j(e, data("out", 1, 1), "out", 2).decision.mark == 1
    # A StopCCN from the wrong SA does not tear the victim's tunnel down.
    j(e, stopccn("in", 700, 1), "in", 2)
    assert {t.our_tid: t.state for t in e.tunnels()}[700] != "closing"


def test_enforce_drop_drops_cross_sa_packets():
    e, _ = make(enforce="drop")
    up(e, 1, 700, 1)
    assert j(e, data("in", 700, 1), "in", 2).decision.drop
    assert not j(e, data("in", 700, 1), "in", 1).decision.drop


def test_stopccn_hold_time_then_release_and_reconnect_with_next_id():
    e, clock = make()
    up(e, 1, 700, 1)
    alias = up(e, 1, 800, 2)
    # Client 2 stops: its StopCCN names its own ID, which the LNS knows as the alias.
    v = j(e, stopccn("in", 800, 1), "in", 2)
    assert [(r.field, r.new) for r in v.decision.rewrites] == [("assigned_tunnel_id", alias)]
    clock.advance(C.STOPCCN_HOLD_SECONDS - 1)
    # Retransmissions during the hold time are still marked right.
    assert j(e, zlb("out", alias), "out", 1).decision.mark == 2
    clock.advance(2)
    v = j(e, data("out", alias, 1), "out", 1)
    assert v.decision.reason == "unknown_tunnel" and v.decision.mark is None
    assert any(ev.kind == "release" and ev.our_tid == 800 for ev in v.decision.events)
    # Windows reconnects with the next ID: no collision, no alias.
    assert up(e, 2, 801, 2) == 2


def test_sessions_learned_and_released_by_cdn():
    e, clock = make()
    up(e, 1, 700, 1)
    j(e, icrq(700, 1), "in", 1)
    j(e, icrp(1, 1, 55), "out", 0)
    (t,) = e.tunnels()
    assert t.sessions[1].our_sid == 55
    j(e, cdn("in", 700, 55, 1), "in", 1)
    clock.advance(C.STOPCCN_HOLD_SECONDS + 1)
    e.expire()
    assert t.sessions == {}


def test_idle_and_pending_timeouts():
    e, clock = make(idle_timeout=100, pending_timeout=30)
    up(e, 1, 700, 1)
    j(e, sccrq(7), "in", 2)  # never answered
    clock.advance(31)
    e.expire()
    assert [t.client_tid for t in e.tunnels()] == [1]
    clock.advance(70)
    e.expire()
    assert len(e) == 0
    assert e.counters["released_pending"] == 1 and e.counters["released_idle"] == 1


def test_table_bounds_refuse_clearly_and_evict_unanswered_first():
    e, _ = make(max_tunnels=3, max_tunnels_per_mark=2)
    up(e, 1, 700, 1)
    up(e, 2, 701, 1)
    v = j(e, sccrq(3), "in", 1)  # mark 1 is full of established tunnels: refused
    assert v.decision.reason == "table_full" and "mark 0x1" in v.decision.detail
    j(e, sccrq(5), "in", 2)  # pending (unanswered)
    v = j(e, sccrq(6), "in", 3)  # global bound reached: the unanswered one goes first
    assert v.decision.reason == "sccrq_learned"
    assert e.counters["evicted"] == 1
    assert sorted(t.client_tid for t in e.tunnels()) == [1, 2, 6]


def test_unknown_and_unmarked_and_non_l2tp_are_unchanged():
    e, _ = make()
    assert j(e, data("out", 9, 9), "out", 3).decision.reason == "unknown_tunnel"
    assert j(e, sccrq(1), "in", 0).decision.reason == "no_mark"
    v = j(e, bytes(IP(src=NAT, dst=GW) / UDP(sport=1701, dport=53) / b"x"), "in", 1)
    assert v.decision.reason == "not_l2tp" and v.decision.mark is None
    v = j(e, b"\x45\x00\x00", "in", 1)
    assert v.decision.reason == "malformed" and v.decision.mark is None


def test_mark_mask_keeps_foreign_bits():
    e, _ = make(mark_mask=0xFF)
    j(e, sccrq(1), "in", 0xAB00 | 0x07)
    v = j(e, sccrp(1, 700), "out", 0xCD00 | 0x01)
    assert v.decision.mark == 0xCD07


def _hidden_sccrq(tid: int, secret: bytes, rv: bytes = b"0123456789abcdef") -> bytes:
    blob = hiding.hide(C.AVP_ASSIGNED_TUNNEL_ID, tid.to_bytes(2, "big"), secret, rv)
    msg = L2TPv2(tunnel_id=0, avps=[AVPMessageType(msg_type=C.SCCRQ), AVPRandomVector(vector=rv),
                                    AVPProtocolVersion(), AVPHostName(hostname=b"win"),
                                    AVPHidden(m=1, h=1, attr_type=C.AVP_ASSIGNED_TUNNEL_ID, value=blob)])
    return bytes(IP(src=NAT, dst=GW) / UDP(sport=1701, dport=1701) / msg)


def test_hidden_assigned_tunnel_id():
    e, _ = make()
    v = j(e, _hidden_sccrq(1, b"s3cret"), "in", 1)
    assert v.decision.reason == "hidden_id_no_secret" and len(e) == 0
    e, _ = make(secret=b"s3cret")
    up(e, 1, 700, 1)
    v = j(e, _hidden_sccrq(1, b"s3cret"), "in", 2)
    assert v.decision.reason == "sccrq_aliased"
    dg = codec.parse_ip_udp(v.payload)
    msg = codec.decode_l2tp(v.payload, dg.payload_offset, dg.payload_end)
    revealed = hiding.unhide(C.AVP_ASSIGNED_TUNNEL_ID, msg.hidden_tunnel_blob, b"s3cret", msg.hidden_tunnel_rv)
    assert revealed == (0xFFFF).to_bytes(2, "big")
    assert codec.udp_checksum_ok(v.payload, dg)


def test_state_round_trip_keeps_marks_and_aliases():
    e, clock = make()
    up(e, 1, 700, 1)
    up(e, 1, 800, 2)
    j(e, icrq(800, 1), "in", 2)
    state = json.loads(json.dumps(e.export_state()))
    e2 = Engine(EngineConfig(), clock=FakeClock(5.0))  # another clock base: times are ages
    events = e2.import_state(state)
    assert sorted(ev.our_tid for ev in events if ev.kind == "bind") == [700, 800]
    assert sorted((ev.kind, ev.visible_tid) for ev in events if ev.kind == "learn") == [("learn", 1), ("learn", 65535)]
    v = j(e2, data("out", 0xFFFF, 1), "out", 1)
    assert v.decision.mark == 2 and IP(v.payload)[L2TPv2].tunnel_id == 1
    assert j(e2, data("in", 800, 1), "in", 1).decision.reason == "sa_conflict"
    # A third client colliding again gets a fresh alias, not one in use.
    assert up(e2, 1, 900, 3) == 0xFFFE


@pytest.mark.parametrize("bad", [
    {}, {"version": 99, "tunnels": []}, {"version": 1}, {"version": 1, "tunnels": [{"mark": 1}]},
    {"version": 1, "tunnels": [{"peer_addr": "x", "peer_port": 1701, "mark": 0, "client_tid": 1,
                                "visible_tid": 1, "age": 1, "idle": 1}]},
    {"version": 1, "tunnels": [{"peer_addr": "x", "peer_port": 1701, "mark": 1, "client_tid": 70000,
                                "visible_tid": 1, "age": 1, "idle": 1}]},
    [], "garbage",
])
def test_bad_state_is_a_clear_error_and_leaves_an_empty_table(bad):
    e, _ = make()
    up(e, 1, 700, 1)
    with pytest.raises(ValueError, match="invalid state"):
        e.import_state(bad)
    assert len(e) == 0


def test_sccrq_for_an_established_tunnel_starts_over():
    """A client that reconnects with the same ID after its tunnel was up (e.g. the LNS restarted)
    gets a fresh entry; the stale one is released instead of swallowing the new SCCRQ."""
    e, _ = make()
    up(e, 1, 700, 1)
    v = j(e, sccrq(1), "in", 1)
    assert v.decision.reason == "sccrq_learned"
    assert any(ev.kind == "release" and ev.our_tid == 700 for ev in v.decision.events)
    assert e.counters["released_restarted"] == 1
    j(e, sccrp(1, 900), "out", 0)
    assert [t.our_tid for t in e.tunnels()] == [900]


# ------------------------------------------------------------------ table events (the fast paths follow them)
def test_sccrq_announces_the_tunnel_with_its_visible_id_and_sccrp_binds_it():
    from l2tp_marker.engine import Peer, TableEvent

    e, _ = make()
    peer = Peer(NAT, 1701)
    v = j(e, sccrq(1), "in", 5)
    assert v.decision.events == (TableEvent("learn", peer, 1, 1, None, 5),)
    v = j(e, sccrq(1), "in", 6)  # a second PC with the same ID: aliased, announced under its alias
    assert v.decision.reason == "sccrq_aliased"
    assert v.decision.events == (TableEvent("learn", peer, 0xFFFF, 1, None, 6),)
    assert j(e, sccrq(1), "in", 6).decision.events == ()  # a retransmission announces nothing
    v = j(e, sccrp(0xFFFF, 800), "out", 5)
    assert v.decision.events == (TableEvent("bind", peer, 0xFFFF, 1, 800, 6),)
    assert j(e, sccrp(0xFFFF, 800), "out", 5).decision.events == ()  # same LNS ID again: no change
    v = j(e, sccrp(0xFFFF, 801), "out", 5)  # the LNS answered with another ID: bound anew
    assert v.decision.events == (TableEvent("bind", peer, 0xFFFF, 1, 801, 6, previous_tid=800),)
    # Data and inbound packets never change the table.
    assert j(e, data("out", 0xFFFF, 1), "out", 0).decision.events == ()
    assert j(e, data("in", 801, 1), "in", 6).decision.events == ()


def test_every_way_out_of_the_table_is_a_release_event():
    from l2tp_marker.engine import Peer, TableEvent

    peer = Peer(NAT, 1701)
    # StopCCN: released after the hold time, by the next judged packet or by expire().
    e, clock = make()
    up(e, 1, 700, 1)
    j(e, stopccn("out", 1, 700), "out", 1)
    clock.advance(C.STOPCCN_HOLD_SECONDS - 1)
    assert e.expire() == []
    clock.advance(1)
    assert e.expire() == [TableEvent("release", peer, 1, 1, 700, 1)]
    # Idle (the LNS went silent) and pending (never answered).
    e, clock = make(idle_timeout=100, pending_timeout=30)
    up(e, 1, 700, 1)
    j(e, sccrq(2), "in", 2)
    clock.advance(30)
    v = j(e, data("in", 700, 1), "in", 1)
    assert v.decision.events == (TableEvent("release", peer, 2, 2, None, 2),)
    clock.advance(70)
    assert e.expire() == [TableEvent("release", peer, 1, 1, 700, 1)]
    # Eviction from a full table: the release comes before the newcomer's learn.
    e, _ = make(max_tunnels_per_mark=1)
    j(e, sccrq(1), "in", 3)
    v = j(e, sccrq(2), "in", 3)
    assert v.decision.events == (TableEvent("release", peer, 1, 1, None, 3), TableEvent("learn", peer, 2, 2, None, 3))
    # A client starting over: the stale entry is released, the same key learned again.
    e, _ = make()
    up(e, 1, 700, 1)
    v = j(e, sccrq(1), "in", 1)
    assert v.decision.events == (TableEvent("release", peer, 1, 1, 700, 1), TableEvent("learn", peer, 1, 1, None, 1))
    # clear() releases everything.
    assert e.clear() == [TableEvent("release", peer, 1, 1, None, 1)]


def test_import_state_announces_each_tunnel_then_binds_the_bound_ones():
    from l2tp_marker.engine import Peer, TableEvent

    e, _ = make()
    up(e, 1, 700, 1)
    up(e, 1, 800, 2)                      # aliased to 0xFFFF
    j(e, sccrq(9, port=4500), "in", 3)    # pending: no LNS ID yet
    e2, _ = make()
    events = e2.import_state(json.loads(json.dumps(e.export_state())))
    p, p2 = Peer(NAT, 1701), Peer(NAT, 4500)
    assert events == [
        TableEvent("learn", p, 1, 1, None, 1), TableEvent("bind", p, 1, 1, 700, 1),
        TableEvent("learn", p, 0xFFFF, 1, None, 2), TableEvent("bind", p, 0xFFFF, 1, 800, 2),
        TableEvent("learn", p2, 9, 9, None, 3),
    ]
