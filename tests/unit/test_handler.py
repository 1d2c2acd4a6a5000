"""The NFQUEUE verdict logic, with a fake packet object: exactly-once verdicts and fail-open."""

from __future__ import annotations

import io
import json

from l2tp_marker.daemon import PacketHandler
from l2tp_marker.engine import Engine, EngineConfig

from .helpers import FakeClock, data, sccrp, sccrq


class FakePacket:
    def __init__(self, payload: bytes, mark: int, fail_on: str | None = None):
        self.payload, self.mark, self.fail_on = payload, mark, fail_on
        self.orig_mark = mark
        self.verdicts: list[str] = []
        self.set_payloads: list[bytes] = []

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return self.mark

    def set_mark(self, m):
        if self.fail_on == "set_mark" and m != self.orig_mark:
            raise RuntimeError("boom")
        self.mark = m

    def set_payload(self, p):
        self.set_payloads.append(p)
        self.payload = p

    def accept(self):
        self.verdicts.append("accept")

    def drop(self):
        self.verdicts.append("drop")



fake = FakePacket


def handler(**cfg):
    return PacketHandler(Engine(EngineConfig(**cfg), clock=FakeClock()), decision_log=io.StringIO(),
                         wallclock=lambda: 42.0)


def test_verdict_applied_once_with_mark_and_rewrite():
    h = handler()
    for tid, mark in ((1, 1), (1, 2)):
        h.handle(fake(sccrq(tid), mark), "in")
    p = fake(sccrp(0xFFFF, 9), 1)
    h.handle(p, "out")
    assert p.verdicts == ["accept"] and p.mark == 2 and len(p.set_payloads) == 1
    assert p.payload != sccrp(0xFFFF, 9)
    lines = [json.loads(l) for l in h.decision_log.getvalue().splitlines()]
    assert [l["reason"] for l in lines] == ["sccrq_learned", "sccrq_aliased", "owner_mark_set"]
    assert lines[-1]["ts"] == 42.0 and lines[-1]["rewrite"] == {"tunnel_id": 1}


def test_error_while_applying_fails_open_with_original_mark_and_bytes():
    h = handler()
    h.handle(fake(sccrq(1), 1), "in")
    h.handle(fake(sccrq(1), 2), "in")
    original = sccrp(0xFFFF, 9)
    p = fake(original, 1, fail_on="set_mark")
    h.handle(p, "out")
    assert p.verdicts == ["accept"]
    assert p.mark == 1 and p.payload == original
    assert h.stats["errors"] == 1 and h.engine.counters["error"] == 1


def test_drop_only_when_enforcing():
    h = handler(enforce="drop")
    h.handle(fake(sccrq(1), 1), "in")
    h.handle(fake(sccrp(1, 700), 0), "out")
    p = fake(data("in", 700, 1), 2)
    h.handle(p, "in")
    assert p.verdicts == ["drop"]
    p = fake(data("in", 700, 1), 1)
    h.handle(p, "in")
    assert p.verdicts == ["accept"]


def test_garbage_is_accepted_unchanged():
    h = handler()
    p = fake(b"\x00garbage", 7)
    h.handle(p, "in")
    assert p.verdicts == ["accept"] and p.mark == 7 and p.set_payloads == []


# ------------------------------------------------------------------ the userspace fast path (daemon lanes)
def fast_handler(**cfg):
    from l2tp_marker.fastpath import FastTable

    fast = FastTable()
    h = PacketHandler(Engine(EngineConfig(**cfg), clock=FakeClock()), fast=fast, on_events=fast.apply)
    # Two PCs behind the NAT, both tunnel ID 1: the second is aliased to 0xFFFF (judged in full).
    h.handle_in(fake(sccrq(1), 1))
    h.handle_out(fake(sccrp(1, 700), 0))
    h.handle_in(fake(sccrq(1), 2))
    h.handle_out(fake(sccrp(0xFFFF, 800), 0))
    assert len(fast) == 2 and h.hot_in == h.hot_out == 0
    return h


def test_known_tunnel_data_takes_the_fast_path_without_the_engine():
    h = fast_handler()
    counters = h.engine.counters.copy()
    reasons = h.by_dir_reason.copy()
    t1 = next(t for t in h.engine.tunnels() if t.mark == 1)
    out = data("out", 1, 5)
    p = fake(out, 2)  # connmark restored the other client's mark
    h.handle_out(p)
    assert p.verdicts == ["accept"] and p.mark == 1 and p.set_payloads == []
    p = fake(data("in", 700, 1), 1)
    h.handle_in(p)
    assert p.verdicts == ["accept"] and p.mark == 1 and p.set_payloads == []
    assert (h.hot_out, h.hot_in) == (1, 1)
    assert h.engine.counters == counters and h.by_dir_reason == reasons and t1.packets_out == 1


def test_aliased_tunnel_data_gets_the_clients_tunnel_id_back_on_the_fast_path():
    from scapy.layers.inet import IP

    from l2tp_marker import codec
    from l2tp_marker.layers import L2TPv2

    h = fast_handler()
    original = data("out", 0xFFFF, 5)
    p = fake(original, 1)
    h.handle_out(p)
    assert p.verdicts == ["accept"] and p.mark == 2 and h.hot_out == 1
    assert IP(p.payload)[L2TPv2].tunnel_id == 1
    assert codec.udp_checksum_ok(p.payload, codec.parse_ip_udp(p.payload))
    # The engine would have done the same.
    from l2tp_marker.judge import judge_packet

    v = judge_packet(h.engine, original, "out", 1)
    assert (v.mark_out, v.payload) == (p.mark, p.payload)


def test_fast_path_leaves_everything_else_to_the_engine():
    h = fast_handler(enforce="drop")
    p = fake(data("in", 700, 1), 2)        # over the other client's SA: a conflict, dropped
    h.handle_in(p)
    assert p.verdicts == ["drop"] and h.engine.counters["sa_conflict"] == 1
    p = fake(data("out", 9, 1), 0)         # unknown tunnel
    h.handle_out(p)
    assert p.verdicts == ["accept"] and p.mark == 0 and h.engine.counters["unknown_tunnel"] == 1
    p = fake(sccrp(1, 700), 0)             # control: the engine learns from it
    h.handle_out(p)
    assert p.mark == 1 and h.by_dir_reason[("out", "owner_mark_set")] == 3
    assert h.hot_in == h.hot_out == 0


def test_an_error_on_the_fast_path_fails_open():
    h = fast_handler()
    original = data("out", 0xFFFF, 5)
    p = fake(original, 1, fail_on="set_mark")  # the rewrite is applied, then setting the mark fails
    h.handle_out(p)
    assert p.verdicts == ["accept"] and p.mark == 1 and p.payload == original
    assert h.stats["errors"] == 1 and h.engine.counters["error"] == 1 and h.hot_out == 0

    class Broken(FakePacket):
        def get_payload(self):
            raise RuntimeError("boom")

    p = Broken(data("in", 700, 1), 1)
    h.handle_in(p)
    assert p.verdicts == ["accept"] and p.mark == 1 and h.stats["errors"] == 2


def test_with_a_decision_log_every_packet_is_judged_and_logged():
    h = fast_handler()
    h.decision_log = io.StringIO()
    for d, pk, m in (("out", data("out", 1, 5), 0), ("out", data("out", 0xFFFF, 5), 0), ("in", data("in", 700, 1), 1)):
        p = fake(pk, m)
        (h.handle_in if d == "in" else h.handle_out)(p)
        assert p.verdicts == ["accept"]
    lines = [json.loads(l) for l in h.decision_log.getvalue().splitlines()]
    assert [(l["dir"], l["reason"], l["mark"]) for l in lines] == [
        ("out", "owner_mark_set", 1), ("out", "owner_mark_set", 2), ("in", "inbound_known", 1)]
    assert h.hot_in == h.hot_out == 0


def test_without_a_fast_table_the_lanes_are_the_engine():
    h = PacketHandler(Engine(EngineConfig(), clock=FakeClock()))
    h.handle_in(fake(sccrq(1), 1))
    h.handle_out(fake(sccrp(1, 700), 0))
    p = fake(data("out", 1, 5), 0)
    h.handle_out(p)
    assert p.mark == 1 and h.by_dir_reason[("out", "owner_mark_set")] == 2 and h.hot_out == 0


def test_daemon_feeds_its_fast_table_from_the_engine_events(tmp_path):
    from l2tp_marker.config import DaemonConfig
    from l2tp_marker.daemon import Daemon

    class Backend:
        name = "stub"

    d = Daemon(DaemonConfig(state_file=tmp_path / "s.json", fastpath="off"), backend=Backend())
    d.handler.handle_in(fake(sccrq(1), 1))
    d.handler.handle_out(fake(sccrp(1, 700), 0))
    assert d.fast.out == {("192.0.2.10", 1701, 1): (1, 1)} and list(d.fast.inb) == [("192.0.2.10", 1701, 700, 1)]
    p = fake(data("out", 1, 5), 0)
    d.handler.handle_out(p)
    assert p.mark == 1 and d.handler.hot_out == 1
    d.sync_fastpath()  # no kernel fast path: the changes are dropped, not piled up
    assert d.fast.dirty_out == set() and d.fast.dirty_in == set()
    st = d.fastpath_status()
    assert (st["mode"], st["userspace_tunnels"], st["userspace_packets_out"], st["out_entries"]) == ("off", 1, 1, 0)
