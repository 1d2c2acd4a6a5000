"""Crafting L2TP packets for unit tests with the project's scapy layers."""

from __future__ import annotations

import struct

from scapy.layers.inet import IP, UDP
from scapy.layers.ppp import HDLC
from scapy.packet import Raw

from l2tp_marker import constants as C
from l2tp_marker.layers import (AVPAssignedSessionID, AVPAssignedTunnelID, AVPCallSerialNumber, AVPHostName,
                                AVPMessageType, AVPProtocolVersion, AVPResultCode, L2TPv2)

NAT = "192.0.2.10"
GW = "198.51.100.1"


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def _ip(direction: str, sport: int, dport: int, peer: str = NAT):
    if direction == "in":
        return IP(src=peer, dst=GW) / UDP(sport=sport, dport=dport)
    return IP(src=GW, dst=peer) / UDP(sport=dport, dport=sport)


def control(direction: str, msg_type: int, *, tunnel: int = 0, session: int = 0, avps=(), port: int = 1701,
            peer: str = NAT, ns: int = 0, nr: int = 0) -> bytes:
    """An IP/UDP/L2TP control message; ``port`` is the peer's port (gateway side is always 1701)."""
    msg = L2TPv2(tunnel_id=tunnel, session_id=session, ns=ns, nr=nr,
                 avps=[AVPMessageType(msg_type=msg_type), *avps])
    return bytes(_ip(direction, port, 1701, peer) / msg)


def sccrq(tid: int, **kw) -> bytes:
    return control("in", C.SCCRQ, avps=[AVPProtocolVersion(), AVPHostName(hostname=b"win"),
                                        AVPAssignedTunnelID(tunnel_id=tid)], **kw)


def sccrp(to_tid: int, our_tid: int, **kw) -> bytes:
    return control("out", C.SCCRP, tunnel=to_tid, avps=[AVPProtocolVersion(), AVPHostName(hostname=b"gw"),
                                                        AVPAssignedTunnelID(tunnel_id=our_tid)], **kw)


def stopccn(direction: str, tunnel: int, sender_tid: int, **kw) -> bytes:
    return control(direction, C.STOPCCN, tunnel=tunnel,
                   avps=[AVPAssignedTunnelID(tunnel_id=sender_tid), AVPResultCode(result_code=1)], **kw)


def icrq(our_tid: int, sid: int, **kw) -> bytes:
    return control("in", C.ICRQ, tunnel=our_tid, avps=[AVPAssignedSessionID(session_id=sid),
                                                       AVPCallSerialNumber(serial=1)], **kw)


def icrp(to_tid: int, to_sid: int, our_sid: int, **kw) -> bytes:
    return control("out", C.ICRP, tunnel=to_tid, session=to_sid,
                   avps=[AVPAssignedSessionID(session_id=our_sid)], **kw)


def cdn(direction: str, tunnel: int, session: int, sender_sid: int, **kw) -> bytes:
    return control(direction, C.CDN, tunnel=tunnel, session=session,
                   avps=[AVPResultCode(result_code=1), AVPAssignedSessionID(session_id=sender_sid)], **kw)


def zlb(direction: str, tunnel: int, port: int = 1701, peer: str = NAT) -> bytes:
    return bytes(_ip(direction, port, 1701, peer) / L2TPv2(tunnel_id=tunnel, avps=[]))


def data(direction: str, tunnel: int, session: int, port: int = 1701, peer: str = NAT,
         payload: bytes = b"\xc0\x21\x09\x01\x00\x08\x00\x00\x00\x00") -> bytes:
    return bytes(_ip(direction, port, 1701, peer) / L2TPv2(t=0, l=1, s=0, tunnel_id=tunnel, session_id=session)
                 / HDLC() / Raw(payload))


def ones_sum_ref(data: bytes) -> int:
    """A ones'-complement 16-bit sum written independently of the codec's (for checking it)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s
