"""Expiry must release exactly what the documented rules say, and a big table in bounded slices."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from l2tp_marker import constants as C
from l2tp_marker.engine import Engine, EngineConfig
from l2tp_marker.judge import judge_packet

from .helpers import FakeClock, cdn, control, data, icrp, icrq, sccrp, sccrq, stopccn

CFG = EngineConfig(idle_timeout=50.0, hold_time=7.0, pending_timeout=20.0)


def due(e: Engine, now: float) -> set[tuple]:
    """What a full scan says must go (the engine's documented rules, written out independently)."""
    c = e.config
    out = set()
    for t in e.tunnels():
        if ((t.closing_since is not None and now - t.closing_since >= c.hold_time)
                or now - t.lns_seen >= c.idle_timeout
                or (t.our_tid is None and now - t.created >= c.pending_timeout)):
            out.add((t.peer.port, t.visible_tid))
    return out


def closed_sessions_due(e: Engine, now: float) -> set[tuple]:
    c = e.config
    return {(t.peer.port, t.visible_tid, sid) for t in e.tunnels() for sid, s in t.sessions.items()
            if s.closing_since is not None and now - s.closing_since >= c.hold_time}


op = st.one_of(
    st.tuples(st.just("sccrq"), st.integers(1, 2), st.integers(1, 2)),      # port index, client tid
    st.tuples(st.just("up"), st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.just("sccrp"), st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.just("stop_in"), st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.just("stop_out"), st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.just("data_out"), st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.just("session"), st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.just("cdn"), st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.just("wait"), st.floats(0.0, 30.0), st.just(0)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(op, max_size=60))
def test_expiry_releases_exactly_what_the_rules_say(ops):
    clock = FakeClock()
    e = Engine(CFG, clock=clock)
    for kind, a, b in ops:
        port = 1700 + a if kind != "wait" else 0
        our = 100 * a + b
        if kind == "sccrq":
            judge_packet(e, sccrq(b, port=port), "in", a)
        elif kind == "up":
            judge_packet(e, sccrq(b, port=port), "in", a)
            judge_packet(e, sccrp(b, our, port=port), "out", 0)
            judge_packet(e, control("in", C.SCCCN, tunnel=our, port=port), "in", a)
        elif kind == "sccrp":
            judge_packet(e, sccrp(b, our, port=port), "out", 0)
        elif kind == "stop_in":
            judge_packet(e, stopccn("in", our, b, port=port), "in", a)
        elif kind == "stop_out":
            judge_packet(e, stopccn("out", b, our, port=port), "out", 0)
        elif kind == "data_out":
            judge_packet(e, data("out", b, 1, port=port), "out", 0)
        elif kind == "session":
            judge_packet(e, icrq(our, 5, port=port), "in", a)
            judge_packet(e, icrp(b, 5, 9, port=port), "out", 0)
        elif kind == "cdn":
            judge_packet(e, cdn("in", our, 9, 5, port=port), "in", a)
        else:
            clock.advance(a)
            now = clock()
            want_gone = due(e, now)
            want_sessions = {x for x in closed_sessions_due(e, now) if x[:2] not in want_gone}
            before = {(t.peer.port, t.visible_tid) for t in e.tunnels()}
            sessions_before = {(t.peer.port, t.visible_tid, sid) for t in e.tunnels() for sid in t.sessions}
            events = e.expire(now)
            after = {(t.peer.port, t.visible_tid) for t in e.tunnels()}
            assert before - after == want_gone
            assert {(ev.peer.port, ev.visible_tid) for ev in events} == want_gone
            assert all(ev.kind == "release" for ev in events)
            sessions_after = {(t.peer.port, t.visible_tid, sid) for t in e.tunnels() for sid in t.sessions}
            assert {x for x in sessions_before - sessions_after if x[:2] in after} == want_sessions
            assert due(e, now) == set()  # nothing that is due survives


def test_a_big_table_expires_in_slices_and_every_tunnel_is_reached():
    """Above EXPIRE_SLICE_MIN tunnels each call looks at a slice of the table (at most a tenth, at
    least EXPIRE_SLICE_MIN): the work per second stays bounded, and within EXPIRE_SLICES calls
    every due tunnel is gone."""
    from l2tp_marker import engine as eng

    clock = FakeClock()
    e = Engine(EngineConfig(max_tunnels=10_000, max_tunnels_per_mark=10_000, pending_timeout=5.0), clock=clock)
    n = 3 * eng.EXPIRE_SLICE_MIN
    for i in range(n):
        judge_packet(e, sccrq(i % 60000 + 1, port=1024 + i // 60000), "in", 1)
    assert len(e) == n
    clock.advance(6.0)                                   # every one is past pending_timeout
    gone = [len(e.expire(clock())) for _ in range(eng.EXPIRE_SLICES)]
    budget = max(eng.EXPIRE_SLICE_MIN, n // eng.EXPIRE_SLICES)
    assert gone[0] == budget < n and all(g <= budget for g in gone), gone   # a slice per call, not all at once
    assert len(e) == 0 and sum(gone) == n
