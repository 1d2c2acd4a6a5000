"""Hardening changes of the engine and the packet handler (the lab proves them end to end in
tests/lab/test_hardening.py): a tunnel the LNS stopped answering is released even while its client
keeps sending; a full table evicts from the SA that holds the most tunnels; SA conflicts are logged
(rate-limited) in log and drop mode, counted in every mode."""

from __future__ import annotations

import io
import json
import logging

from l2tp_marker import constants as C
from l2tp_marker import engine as engine_mod
from l2tp_marker.daemon import PacketHandler
from l2tp_marker.engine import Engine, EngineConfig
from l2tp_marker.judge import judge_packet

from .helpers import FakeClock, control, data, sccrp, sccrq, stopccn, zlb
from .test_handler import FakePacket


def stopccn_in(to_tid: int, sender_tid: int) -> bytes:
    return stopccn("in", to_tid, sender_tid)


def make(**cfg):
    clock = FakeClock()
    return Engine(EngineConfig(**cfg), clock=clock), clock


def j(engine, pkt, direction, mark):
    return judge_packet(engine, pkt, direction, mark)


def up(engine, tid, our, mark):
    v = j(engine, sccrq(tid), "in", mark)
    alias = v.decision.rewrites[0].new if v.decision.rewrites else tid
    j(engine, sccrp(alias, our), "out", 0)
    j(engine, control("in", C.SCCCN, tunnel=our), "in", mark)
    return alias


# ------------------------------------------------------------------ idle = the LNS went silent
def test_tunnel_the_lns_lost_is_released_while_the_client_keeps_sending():
    """After an LNS restart xl2tpd answers nothing for the old tunnels ("Can not find tunnel"), but
    the client keeps sending data and HELLOs into them until it gives up: that must not keep the
    stale entry alive."""
    e, clock = make(idle_timeout=10)
    up(e, 1, 700, 1)
    reasons = []
    for _ in range(30):  # the client talks every half second, the LNS says nothing
        clock.advance(0.5)
        reasons.append(j(e, data("in", 700, 1), "in", 1).decision.reason)
        e.expire()
    # Released 10 s after the LNS's last packet; later packets of the tunnel are unknown.
    assert set(reasons[:19]) == {"inbound_known"} and set(reasons[-10:]) == {"unknown_tunnel"}
    assert len(e) == 0 and e.counters["released_idle"] == 1


def test_a_tunnel_the_lns_answers_stays():
    e, clock = make(idle_timeout=10)
    up(e, 1, 700, 1)
    for _ in range(60):
        clock.advance(0.5)
        j(e, data("in", 700, 1), "in", 1)
        if int(clock.t * 2) % 10 == 0:  # an answer (ZLB, echo reply) every 5 s
            j(e, zlb("out", 1), "out", 0)
        e.expire()
    assert len(e) == 1 and not e.counters["released_idle"]


def test_lns_silence_survives_a_restart_of_the_marker():
    e, clock = make(idle_timeout=10)
    up(e, 1, 700, 1)
    clock.advance(8)
    j(e, data("in", 700, 1), "in", 1)  # the client spoke last, the LNS 8 s ago
    state = json.loads(json.dumps(e.export_state()))
    assert state["tunnels"][0]["idle"] == 0 and state["tunnels"][0]["idle_out"] == 8
    e2, clock2 = make(idle_timeout=10)
    e2.import_state(state)
    clock2.advance(2.5)
    e2.expire()
    assert len(e2) == 0 and e2.counters["released_idle"] == 1


def test_state_without_idle_out_falls_back_to_the_last_packet():
    """State files written before idle_out existed: the last packet of either side counts."""
    e, _ = make(idle_timeout=10)
    up(e, 1, 700, 1)
    state = json.loads(json.dumps(e.export_state()))
    del state["tunnels"][0]["idle_out"]
    e2, clock2 = make(idle_timeout=10)
    e2.import_state(state)
    clock2.advance(9)
    e2.expire()
    assert len(e2) == 1
    clock2.advance(1)
    e2.expire()
    assert len(e2) == 0


def test_a_pending_tunnel_counts_its_creation_as_the_last_lns_packet():
    e, clock = make(idle_timeout=5, pending_timeout=60)
    j(e, sccrq(9), "in", 1)
    clock.advance(4)
    e.expire()
    assert len(e) == 1
    clock.advance(1)
    e.expire()
    assert len(e) == 0


# ------------------------------------------------------------------ bounds under an SCCRQ flood
def test_flood_stays_within_the_per_mark_bound_and_evicts_its_own_oldest():
    e, _ = make(max_tunnels=1000, max_tunnels_per_mark=8)
    up(e, 1, 700, 1)          # the victim
    up(e, 1, 701, 2)          # the attacker's own, established tunnel
    for tid in range(1000, 1500):
        v = j(e, sccrq(tid), "in", 2)
        assert v.decision.reason in ("sccrq_learned", "sccrq_aliased")
    mine = [t for t in e.tunnels() if t.mark == 2]
    assert len(mine) == 8 and len(e) == 9
    assert 1 in {t.client_tid for t in mine}  # its established tunnel is never evicted
    assert sorted(t.client_tid for t in mine if not t.established) == list(range(1493, 1500))
    victim = [t for t in e.tunnels() if t.mark == 1]
    assert len(victim) == 1 and victim[0].our_tid == 700
    assert e.counters["evicted"] == 500 - 7


def test_full_table_evicts_from_the_mark_holding_the_most_tunnels_first():
    """A victim's handshake in progress (pending) survives a flood that fills the whole table:
    the flooding SA's older pending entries go first, even though the victim's is older still."""
    e, clock = make(max_tunnels=10, max_tunnels_per_mark=100)
    up(e, 1, 700, 1)
    j(e, sccrq(2), "in", 1)            # the victim reconnects: pending, the oldest pending entry
    clock.advance(1)
    for tid in range(1000, 1300):      # mark 3 floods
        clock.advance(0.001)
        assert j(e, sccrq(tid), "in", 3).decision.reason == "sccrq_learned"
    assert len(e) == 10
    assert sorted(t.client_tid for t in e.tunnels() if t.mark == 1) == [1, 2]
    # The victim's SCCRP still finds its entry.
    assert j(e, sccrp(2, 702), "out", 0).decision.mark == 1


def test_full_table_of_established_tunnels_refuses_the_new_sccrq():
    e, _ = make(max_tunnels=3, max_tunnels_per_mark=100)
    for mark in (1, 2, 3):
        up(e, 1, 700 + mark, mark)
    v = j(e, sccrq(5), "in", 4)
    assert v.decision.reason == "table_full" and v.decision.mark is None and not v.decision.drop
    assert len(e) == 3


# ------------------------------------------------------------------ conflicts are logged
def handler(enforce: str, clock: FakeClock) -> PacketHandler:
    e = Engine(EngineConfig(enforce=enforce), clock=clock)
    return PacketHandler(e, decision_log=io.StringIO(), wallclock=lambda: 42.0, monotonic=clock)


def bring_up(h: PacketHandler) -> None:
    h.handle(FakePacket(sccrq(1), 1), "in")
    h.handle(FakePacket(sccrp(1, 700), 0), "out")


def test_conflicts_are_logged_rate_limited_and_dropped_in_drop_mode(caplog):
    clock = FakeClock()
    h = handler("drop", clock)
    bring_up(h)
    with caplog.at_level(logging.WARNING, logger="l2tp_marker.daemon"):
        pkts = [FakePacket(data("in", 700, 1), 3) for _ in range(5)]
        for p in pkts:
            h.handle(p, "in")
        clock.advance(PacketHandler.CONFLICT_LOG_INTERVAL)
        h.handle(FakePacket(data("in", 700, 1), 3), "in")
    assert all(p.verdicts == ["drop"] for p in pkts)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0] == ("SA conflict, dropped: data peer 192.0.2.10:1701 tunnel 700 is bound to "
                        "mark 0x1, packet came with mark 0x3")
    assert lines[1].endswith("(4 more since the last message)")
    assert h.engine.counters["sa_conflict"] == 6 and h.stats["in_dropped"] == 6


def test_log_mode_passes_and_logs_off_mode_passes_silently(caplog):
    for enforce, expect_lines in (("log", 1), ("off", 0)):
        caplog.clear()
        clock = FakeClock()
        h = handler(enforce, clock)
        bring_up(h)
        with caplog.at_level(logging.WARNING, logger="l2tp_marker.daemon"):
            p = FakePacket(data("in", 700, 1), 3)
            h.handle(p, "in")
        assert p.verdicts == ["accept"] and p.mark == 3
        assert h.engine.counters["sa_conflict"] == 1
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == expect_lines, (enforce, msgs)
        if expect_lines:
            assert msgs[0].startswith("SA conflict, passed to the LNS: data peer")


# ------------------------------------------------------------------ tunnels the table let go
def test_the_lns_answers_to_an_evicted_tunnel_go_back_to_its_sa_for_a_while():
    """xl2tpd keeps retransmitting its SCCRP to a flood's tunnels after the table evicted them:
    those answers go to the SA that asked, not to whichever client spoke last (plain connmark)."""
    e, clock = make(max_tunnels_per_mark=2, pending_timeout=30)
    j(e, sccrq(100), "in", 4)
    j(e, sccrq(101), "in", 4)
    v = j(e, sccrq(102), "in", 4)                    # evicts 100, the least recently seen
    assert [(ev.kind, ev.client_tid) for ev in v.decision.events] == [("release", 100), ("learn", 102)]
    assert e.counters["evicted"] == 1
    out = j(e, sccrp(100, 900), "out", 2)            # connmark restored the last speaker's mark 2
    assert out.decision.reason == "owner_mark_evicted" and out.decision.mark == 4
    assert sorted(t.client_tid for t in e.tunnels()) == [101, 102]  # not re-learned
    clock.advance(30)
    e.expire()
    assert j(e, sccrp(100, 900), "out", 2).decision.reason == "unknown_tunnel"


def test_an_evicted_tunnel_id_stays_reserved_while_the_lns_may_hold_it():
    e, clock = make(max_tunnels_per_mark=1, pending_timeout=30)
    j(e, sccrq(1), "in", 4)
    j(e, sccrq(2), "in", 4)                          # evicts tunnel 1 of mark 4
    v = j(e, sccrq(1), "in", 5)                      # another client offers 1: the LNS may hold it
    assert v.decision.reason == "sccrq_aliased" and v.decision.rewrites[0].new == 0xFFFF
    clock.advance(30)
    e.expire()
    assert j(e, sccrq(1), "in", 6).decision.reason == "sccrq_learned"


def test_a_refused_sccrq_is_answered_over_its_own_sa():
    e, _ = make(max_tunnels=2, max_tunnels_per_mark=100)
    up(e, 1, 701, 1)
    up(e, 1, 702, 2)
    v = j(e, sccrq(50), "in", 3)                     # nothing evictable: passed on unchanged
    assert v.decision.reason == "table_full" and not v.decision.rewrites and not v.decision.drop
    assert j(e, sccrp(50, 703), "out", 1).decision.mark == 3


def test_records_of_evicted_tunnels_are_bounded(monkeypatch):
    monkeypatch.setattr(engine_mod, "EVICTED_RECORDS_MIN", 50)
    e, _ = make(max_tunnels=20, max_tunnels_per_mark=4)
    for tid in range(1000, 3000):
        j(e, sccrq(tid), "in", 4)
    assert len(e) == 4 and len(e._evicted) == 50
    assert j(e, sccrp(2995, 900), "out", 0).decision.mark == 4      # recent: remembered
    assert j(e, sccrp(1000, 900), "out", 0).decision.reason == "unknown_tunnel"  # oldest: gone


# ------------------------------------------------------------------ the LNS gives two tunnels one ID
def test_two_live_tunnels_with_one_lns_tunnel_id_are_told_apart_by_mark():
    """xl2tpd draws its tunnel IDs at random and does not check that they are free: under an SCCRQ
    flood a new tunnel got the gateway ID of a victim's established tunnel. That must not release
    the victim's entry; inbound packets are told apart by their mark."""
    e, _ = make()
    up(e, 1, 700, 2)                                   # the victim
    j(e, sccrq(30396), "in", 5)                        # a flood tunnel...
    v = j(e, sccrp(30396, 700), "out", 5)              # ...to which the LNS gives the same ID
    assert [ev.kind for ev in v.decision.events] == ["bind"]
    assert sorted(t.mark for t in e.tunnels()) == [2, 5]
    assert j(e, data("in", 700, 1), "in", 2).decision.reason == "inbound_known"
    assert j(e, control("in", C.SCCCN, tunnel=700), "in", 5).decision.reason == "inbound_known"
    c = j(e, data("in", 700, 1), "in", 3).decision     # a third SA: a conflict
    assert c.reason == "sa_conflict"
    assert j(e, data("out", 1, 1), "out", 5).decision.mark == 2
    assert j(e, zlb("out", 30396), "out", 2).decision.mark == 5
    # Either one ending leaves the other reachable.
    victim = next(t for t in e.tunnels() if t.mark == 2)
    assert victim.packets_in == 3 and victim.conflicts == 0
    j(e, stopccn_in(700, 30396), "in", 5)
    e.expire(e.now() + e.config.hold_time)
    assert [t.mark for t in e.tunnels()] == [2]
    assert j(e, data("in", 700, 1), "in", 2).decision.reason == "inbound_known"


def test_a_closed_tunnels_id_given_again_serves_the_new_tunnel():
    e, _ = make()
    up(e, 1, 700, 1)
    j(e, stopccn_in(700, 1), "in", 1)                   # closing, kept for the hold time
    up(e, 2, 700, 1)                                    # the LNS hands out 700 again
    v = j(e, control("in", C.ICRQ, tunnel=700), "in", 1)
    new = next(t for t in e.tunnels() if t.client_tid == 2)
    assert v.decision.reason == "inbound_known" and new.packets_in == 3
