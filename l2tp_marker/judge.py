"""One packet through decode, engine and rewrite: the code path shared by the daemon and replay.

Pure: takes the IP packet bytes, the direction and the mark it arrived with, returns a
:class:`Verdict` that an adapter applies exactly once (set the mark, replace the payload, accept or
drop). Anything unexpected is a value (reason), never an exception: the data path fails open.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import codec
from .codec import L2tpMessage, Malformed, UdpDatagram
from .constants import L2TP_PORT
from .engine import IN, Decision, Engine, Peer

R_NOT_L2TP = "not_l2tp"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one packet plus what the adapter needs to apply and report it."""

    decision: Decision
    mark_in: int
    direction: str
    datagram: UdpDatagram | None = None
    message: L2tpMessage | Malformed | None = None
    payload: bytes | None = None  # the rewritten packet, when something was rewritten

    @property
    def mark_out(self) -> int:
        return self.mark_in if self.decision.mark is None else self.decision.mark

    @property
    def peer(self) -> Peer | None:
        d = self.datagram
        if d is None:
            return None
        return Peer(d.src, d.sport) if self.direction == IN else Peer(d.dst, d.dport)


def judge_packet(engine: Engine, pkt: bytes, direction: str, mark_in: int) -> Verdict:
    """Judge one IP packet seen at LOCAL_IN (``direction="in"``) or LOCAL_OUT (``"out"``)."""
    dg = codec.parse_ip_udp(pkt)
    if dg is None:
        return _count(engine, Verdict(Decision(R_NOT_L2TP), mark_in, direction))
    if isinstance(dg, Malformed):
        return _count(engine, Verdict(Decision("malformed", detail=dg.reason), mark_in, direction, message=dg))
    port = dg.dport if direction == IN else dg.sport
    if port != L2TP_PORT:
        return _count(engine, Verdict(Decision(R_NOT_L2TP), mark_in, direction, dg))
    msg = codec.decode_l2tp(pkt, dg.payload_offset, dg.payload_end)
    peer = Peer(dg.src, dg.sport) if direction == IN else Peer(dg.dst, dg.dport)
    decision = engine.judge(msg, direction, peer, mark_in)
    payload = None
    if decision.rewrites:
        try:
            payload = codec.rewrite(pkt, dg, [(r.offset, r.data) for r in decision.rewrites])
        except ValueError as exc:  # a rewrite that does not fit the packet: never apply half of it
            engine.counters["rewrite_failed"] += 1
            decision = Decision("rewrite_failed", mark=decision.mark, events=decision.events, detail=str(exc))
    return Verdict(decision, mark_in, direction, dg, msg, payload)


def _count(engine: Engine, v: Verdict) -> Verdict:
    engine.counters[v.decision.reason] += 1
    return v


def record(no: int | None, v: Verdict) -> dict:
    """The JSON-lines record of one judged L2TP packet (format documented in the README)."""
    msg = v.message
    l2tp = msg if isinstance(msg, L2tpMessage) else None
    peer = v.peer
    return {
        "no": no,
        "dir": v.direction,
        "peer": str(peer) if peer else None,
        "kind": l2tp.kind if l2tp else "malformed",
        "tunnel": l2tp.tunnel_id if l2tp else None,
        "session": l2tp.session_id if l2tp else None,
        "mark_in": v.mark_in,
        "mark": v.mark_out,
        "rewrite": {r.field: r.new for r in v.decision.rewrites} or None,
        "reason": v.decision.reason,
        **({"detail": v.decision.detail} if v.decision.detail else {}),
        **({"drop": True} if v.decision.drop else {}),
    }
