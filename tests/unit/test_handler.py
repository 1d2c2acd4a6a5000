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
