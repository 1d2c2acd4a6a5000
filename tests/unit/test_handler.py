"""The NFQUEUE verdict logic, with a fake packet object: exactly-once verdicts and fail-open."""

from __future__ import annotations

import io
import json

from l2tp_marker import constants as C
from l2tp_marker.daemon import PacketHandler
from l2tp_marker.engine import Engine, EngineConfig
from l2tp_marker.judge import judge_packet

from .helpers import NAT, FakeClock, control, data, sccrp, sccrq, stopccn


def k3(addr: str, port: int, tid: int) -> int:
    a = int.from_bytes(bytes(int(x) for x in addr.split(".")), "big")
    return (a << 32) | (port << 16) | tid


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
    # The lanes read the engine's own indexes: nothing to feed them.
    h = PacketHandler(Engine(EngineConfig(**cfg), clock=FakeClock()))
    # Two PCs behind the NAT, both tunnel ID 1: the second is aliased to 0xFFFF (judged in full).
    h.handle_in(fake(sccrq(1), 1))
    h.handle_out(fake(sccrp(1, 700), 0))
    h.handle_in(fake(sccrq(1), 2))
    h.handle_out(fake(sccrp(0xFFFF, 800), 0))
    assert len(h.engine) == 2 and h.hot_in == h.hot_out == 0
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


def test_without_the_fast_path_the_lanes_are_the_engine():
    h = PacketHandler(Engine(EngineConfig(), clock=FakeClock()), fast=False)
    h.handle_in(fake(sccrq(1), 1))
    h.handle_out(fake(sccrp(1, 700), 0))
    p = fake(data("out", 1, 5), 0)
    h.handle_out(p)
    assert p.mark == 1 and h.by_dir_reason[("out", "owner_mark_set")] == 2 and h.hot_out == 0
    p = fake(data("in", 700, 1), 1)
    h.handle_in(p)
    assert p.verdicts == ["accept"] and h.by_dir_reason[("in", "inbound_known")] == 1 and h.hot_in == 0


def test_the_lanes_follow_the_engine_table_as_it_changes():
    """No copy to keep in step: a tunnel learned, released or restored from a state file after the
    lanes were built is seen by the next packet."""
    clock = FakeClock()
    e = Engine(EngineConfig(), clock=clock)
    h = PacketHandler(e)
    p = fake(data("out", 1, 5), 0)
    h.handle_out(p)
    assert p.mark == 0 and h.hot_out == 0 and e.counters["unknown_tunnel"] == 1
    judge_packet(e, sccrq(1), "in", 1)                       # learned behind the handler's back
    judge_packet(e, sccrp(1, 700), "out", 0)
    p = fake(data("out", 1, 5), 0)
    h.handle_out(p)
    assert p.mark == 1 and h.hot_out == 1
    p = fake(data("in", 700, 1), 1)
    h.handle_in(p)
    assert p.verdicts == ["accept"] and h.hot_in == 1
    state = e.export_state()
    judge_packet(e, stopccn("out", 1, 700), "out", 0)      # the LNS stops it; released after the hold
    clock.advance(C.STOPCCN_HOLD_SECONDS)
    assert [x.kind for x in e.expire()] == ["release"]
    for pk, d in ((data("out", 1, 5), "out"), (data("in", 700, 1), "in")):
        p = fake(pk, 1 if d == "in" else 0)
        (h.handle_in if d == "in" else h.handle_out)(p)
        assert p.verdicts == ["accept"] and p.mark == (1 if d == "in" else 0)
    assert (h.hot_out, h.hot_in) == (1, 1) and e.counters["unknown_tunnel"] == 3
    e.import_state(state)                                    # a restart: the same tunnel again
    p = fake(data("out", 1, 5), 0)
    h.handle_out(p)
    assert p.mark == 1 and h.hot_out == 2
    assert h.engine.out_index is e.out_index and k3(NAT, 1701, 1) in e.out_index


def test_daemon_collects_the_changed_keys_from_the_engine_events(tmp_path):
    from l2tp_marker.config import DaemonConfig
    from l2tp_marker.daemon import Daemon
    from l2tp_marker.fastpath import FastChanges

    class Backend:
        name = "stub"

    d = Daemon(DaemonConfig(state_file=tmp_path / "s.json", fastpath="off"), backend=Backend())
    assert isinstance(d.fast, FastChanges) and not d.fast
    d.handler.handle_in(fake(sccrq(1), 1))
    d.handler.handle_out(fake(sccrp(1, 700), 0))
    assert d.fast.out == {k3(NAT, 1701, 1)} and d.fast.inb == {(k3(NAT, 1701, 700) << 32) | 1}
    p = fake(data("out", 1, 5), 0)
    d.handler.handle_out(p)
    assert p.mark == 1 and d.handler.hot_out == 1
    d.sync_fastpath()  # no kernel fast path: the changes are dropped, not piled up
    assert not d.fast and d.fast.take() == (set(), set())
    st = d.fastpath_status()
    assert (st["mode"], st["tunnels"], st["aliased_tunnels"], st["userspace_packets_out"], st["out_entries"]) == (
        "off", 1, 0, 1, 0)
    assert "userspace_tunnels" not in st
    d.handler.handle_in(fake(sccrq(1), 2))                  # aliased
    assert d.fastpath_status()["aliased_tunnels"] == 1


def test_daemon_hands_the_engine_and_the_changes_to_the_kernel_fast_path(tmp_path):
    from l2tp_marker.config import DaemonConfig
    from l2tp_marker.daemon import Daemon

    class Backend:
        name = "stub"

    class Kernel:
        """Records what sync is given, and takes the changes as KernelFastPath does."""

        def __init__(self):
            self.seen = []

        def sync(self, engine, changes):
            self.seen.append((engine, changes.take()))
            return 0

    d = Daemon(DaemonConfig(state_file=tmp_path / "s.json", fastpath="off"), backend=Backend())
    d.kernel = Kernel()
    d.handler.handle_in(fake(sccrq(1), 1))
    d.handler.handle_in(fake(sccrq(1), 2))
    d.handler.handle_out(fake(sccrp(0xFFFF, 800), 0))
    d.sync_fastpath()
    assert d.kernel.seen == [(d.engine, ({k3(NAT, 1701, 1), k3(NAT, 1701, 0xFFFF)},
                                         {(k3(NAT, 1701, 800) << 32) | 2}))]
    assert not d.fast
    d.handler.handle_out(fake(data("out", 0xFFFF, 1), 0))  # data changes nothing
    d.handler.handle_in(fake(control("in", C.SCCCN, tunnel=800), 2))
    d.sync_fastpath()
    assert d.kernel.seen[-1] == (d.engine, (set(), set()))


def test_a_burst_of_table_changes_reaches_the_kernel_without_waiting_for_the_batch(tmp_path):
    """The daemon syncs from inside a queue batch once SYNC_BATCH keys changed."""
    from l2tp_marker.config import DaemonConfig
    from l2tp_marker.daemon import Daemon

    class Backend:
        name = "stub"

    class Kernel:
        def __init__(self):
            self.synced = []

        def sync(self, engine, changes):
            out, inb = changes.take()
            self.synced.append(len(out) + len(inb))

    d = Daemon(DaemonConfig(state_file=tmp_path / "s.json", fastpath="off"), backend=Backend())
    d.kernel = Kernel()
    for tid in range(1, d.SYNC_BATCH + 2):
        v = judge_packet(d.engine, sccrq(tid, port=2000 + tid), "in", tid)
        d._events(v.decision.events)
    assert d.kernel.synced == [d.SYNC_BATCH]          # one transaction, when the batch was full
    assert len(d.fast.out) == 1                       # the rest waits for the end of the batch
