"""Offline analysis of the lab's captures: plain ``struct``, no root, no scapy needed.

The lab captures every gateway-side client link (``c1``, ``c2``...) and the dead-end link
(``dead``).  Each L2TP data packet carries one PPP frame; the lab's PPP peers put a token in the
data of their LCP Echo packets (``lac-2``, ``win-1``, ``lns/win-1``), so a packet whose token
names client N but that leaves the gateway on link ``cM`` (M != N) was delivered to the wrong
client.  Control messages carry no token; they are attributed by their header tunnel ID, which
is the recipient's: each client's IDs are learnt from the Assigned Tunnel ID of the SCCRQs it
sent on its own link, and an ID that two clients chose (two Windows PCs with tunnel 1) names
nobody.  Anything on ``dead`` left the gateway without a mark.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from l2tp_marker.constants import message_name

L2TP_PORT = 1701
LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_RAW = 101
PCAP_MAGICS = {
    0xA1B2C3D4: ("<", 1e-6), 0xD4C3B2A1: (">", 1e-6),
    0xA1B23C4D: ("<", 1e-9), 0x4D3CB2A1: (">", 1e-9),
}
LCP_ECHO_REQUEST, LCP_ECHO_REPLY = 9, 10
AVP_ASSIGNED_TUNNEL_ID = 9
MSG_SCCRQ = 1
PROTO_LCP = 0xC021


@dataclass(frozen=True)
class L2tpPacket:
    """One udp/1701 packet from a capture, decoded as far as the lab needs."""

    ts: float
    src: str
    dst: str
    sport: int
    dport: int
    control: bool
    tunnel_id: int | None = None
    session_id: int | None = None
    msg_type: int | None = None          # control: first AVP's message type, None for a ZLB
    assigned_tunnel_id: int | None = None  # control: Assigned Tunnel ID AVP (not hidden)
    lcp_code: int | None = None          # data: LCP code when the PPP frame is LCP
    echo_data: bytes | None = None       # data: Echo-Request/Reply data after the magic number

    def tokens(self) -> tuple[str, ...]:
        """Parts of the echo data split at ``/`` (``lns/win-2`` -> ``("lns", "win-2")``)."""
        if not self.echo_data:
            return ()
        return tuple(p for p in self.echo_data.decode("ascii", "replace").split("/") if p)


def read_pcap(path: str | Path) -> Iterator[tuple[float, int, bytes]]:
    """Yield ``(timestamp, linktype, frame)`` from a classic pcap file; a truncated tail is ignored
    (tcpdump may still be writing it)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 24:
        return
    magic = struct.unpack("<I", data[:4])[0]
    if magic not in PCAP_MAGICS:
        raise ValueError(f"{path}: not a classic pcap file (magic {magic:#x})")
    endian, unit = PCAP_MAGICS[magic]
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    off = 24
    rec = struct.Struct(endian + "IIII")
    while off + rec.size <= len(data):
        sec, frac, caplen, _wirelen = rec.unpack_from(data, off)
        off += rec.size
        if off + caplen > len(data):
            break
        yield sec + frac * unit, linktype, data[off:off + caplen]
        off += caplen


def _ip_payload(linktype: int, frame: bytes) -> bytes | None:
    if linktype == LINKTYPE_ETHERNET:
        off, ethertype = 14, struct.unpack("!H", frame[12:14])[0] if len(frame) >= 14 else 0
        while ethertype in (0x8100, 0x88A8) and len(frame) >= off + 4:
            ethertype = struct.unpack("!H", frame[off + 2:off + 4])[0]
            off += 4
        return frame[off:] if ethertype == 0x0800 else None
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16 or struct.unpack("!H", frame[14:16])[0] != 0x0800:
            return None
        return frame[16:]
    if linktype == LINKTYPE_RAW:
        return frame
    return None


def decode_l2tp(ts: float, linktype: int, frame: bytes) -> L2tpPacket | None:
    """Decode one captured frame; None unless it is an unfragmented IPv4 udp/1701 packet."""
    ip = _ip_payload(linktype, frame)
    if ip is None or len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
        return None
    ihl = (ip[0] & 0x0F) * 4
    frag = struct.unpack("!H", ip[6:8])[0]
    if frag & 0x1FFF or len(ip) < ihl + 8:
        return None
    src = str(ipaddress.IPv4Address(ip[12:16]))
    dst = str(ipaddress.IPv4Address(ip[16:20]))
    sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
    if L2TP_PORT not in (sport, dport):
        return None
    return decode_l2tp_payload(ts, src, dst, sport, dport, ip[ihl + 8:])


def decode_l2tp_payload(ts: float, src: str, dst: str, sport: int, dport: int,
                         l2tp: bytes) -> L2tpPacket:
    base = dict(ts=ts, src=src, dst=dst, sport=sport, dport=dport)
    if len(l2tp) < 6:
        return L2tpPacket(control=False, **base)
    flags = struct.unpack("!H", l2tp[:2])[0]
    control = bool(flags & 0x8000)
    off = 2
    if flags & 0x4000:
        off += 2
    if len(l2tp) < off + 4:
        return L2tpPacket(control=control, **base)
    tid, sid = struct.unpack("!HH", l2tp[off:off + 4])
    off += 4
    if flags & 0x0800:
        off += 4
    if flags & 0x0200 and len(l2tp) >= off + 2:
        off += 2 + struct.unpack("!H", l2tp[off:off + 2])[0]
    body = l2tp[off:]
    if control:
        msg_type = assigned = None
        pos = 0
        while pos + 6 <= len(body):
            avp_flags, vendor, avp_type = struct.unpack("!HHH", body[pos:pos + 6])
            length = avp_flags & 0x03FF
            if length < 6 or pos + length > len(body):
                break
            value = body[pos + 6:pos + length]
            if vendor == 0 and not avp_flags & 0x4000 and len(value) >= 2:
                if avp_type == 0 and pos == 0:
                    msg_type = struct.unpack("!H", value[:2])[0]
                elif avp_type == AVP_ASSIGNED_TUNNEL_ID:
                    assigned = struct.unpack("!H", value[:2])[0]
            pos += length
        return L2tpPacket(control=True, tunnel_id=tid, session_id=sid, msg_type=msg_type,
                          assigned_tunnel_id=assigned, **base)
    lcp_code = echo = None
    ppp = body[2:] if body[:2] == b"\xff\x03" else body
    if len(ppp) >= 2:
        if ppp[0] & 1:
            proto, info = ppp[0], ppp[1:]
        else:
            proto, info = (ppp[0] << 8) | ppp[1], ppp[2:]
        if proto == PROTO_LCP and len(info) >= 4:
            lcp_code = info[0]
            length = struct.unpack("!H", info[2:4])[0]
            if lcp_code in (LCP_ECHO_REQUEST, LCP_ECHO_REPLY) and 8 <= length <= len(info):
                echo = bytes(info[8:length])
    return L2tpPacket(control=False, tunnel_id=tid, session_id=sid, lcp_code=lcp_code,
                      echo_data=echo, **base)


def read_l2tp(path: str | Path) -> list[L2tpPacket]:
    """All udp/1701 packets of one capture file (empty list if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for ts, linktype, frame in read_pcap(path):
        pkt = decode_l2tp(ts, linktype, frame)
        if pkt is not None:
            out.append(pkt)
    return out


def client_tunnel_ids(packets: list[L2tpPacket], gw_ip: str) -> set[int]:
    """Tunnel IDs a client assigned itself: the Assigned Tunnel ID of the SCCRQs it sent."""
    return {p.assigned_tunnel_id for p in packets
            if p.dst == gw_ip and p.control and p.msg_type == MSG_SCCRQ
            and p.assigned_tunnel_id is not None}


def tunnel_owners(tids_by_client: dict[int, set[int]]) -> dict[int, int]:
    """``{tunnel ID: client}`` for the IDs exactly one client chose (two Windows clients that
    both chose 1 make 1 ambiguous, so it names nobody)."""
    claims: dict[int, list[int]] = {}
    for client, tids in tids_by_client.items():
        for tid in tids:
            claims.setdefault(tid, []).append(client)
    return {tid: owners[0] for tid, owners in claims.items() if len(owners) == 1}


def packet_owner(p: L2tpPacket, client_tokens: dict[str, int],
                 tid_owner: dict[int, int]) -> int | None:
    """The client an outbound packet is meant for: named by its echo token, else by its header
    tunnel ID when only one client uses that ID; None if it cannot be told."""
    for token in p.tokens():
        if token in client_tokens:
            return client_tokens[token]
    if p.tunnel_id is not None and p.tunnel_id in tid_owner:
        return tid_owner[p.tunnel_id]
    return None


@dataclass(frozen=True)
class LinkStats:
    """What one captured link saw, split by direction relative to the gateway."""

    name: str
    packets_out: int = 0                 # udp/1701 sent by the gateway on this link
    packets_in: int = 0                  # udp/1701 received by the gateway on this link
    data_out: int = 0
    control_out: int = 0
    control_out_types: tuple[tuple[str, int], ...] = ()
    tunnel_ids_out: tuple[int, ...] = ()  # header tunnel IDs the gateway sent (the client's IDs)
    tokens_out: tuple[tuple[str, int], ...] = ()   # echo data the gateway sent, with counts
    misdelivered: int = 0                # packets out meant for another client (token or ID)
    misdelivered_control: int = 0        # ... of which control messages (told by tunnel ID)
    foreign_tokens: tuple[str, ...] = ()
    by_owner: tuple[tuple[int, int], ...] = field(default=())  # packets out per client meant


def link_stats(name: str, packets: list[L2tpPacket], gw_ip: str, own: int | None,
               client_tokens: dict[str, int],
               tid_owner: dict[int, int] | None = None) -> LinkStats:
    """Summarise one link.  ``own`` is the index of the client behind the link (None for
    ``dead``); ``client_tokens`` maps every client's token to its index and ``tid_owner`` the
    unambiguous tunnel IDs (see :func:`tunnel_owners`)."""
    tid_owner = tid_owner or {}
    out = [p for p in packets if p.src == gw_ip]
    inbound = [p for p in packets if p.dst == gw_ip]
    ctl_types: dict[str, int] = {}
    tokens: dict[str, int] = {}
    by_owner: dict[int, int] = {}
    foreign: list[str] = []
    mis = mis_ctl = 0
    tids: list[int] = []
    for p in out:
        if p.control:
            key = message_name(p.msg_type)
            ctl_types[key] = ctl_types.get(key, 0) + 1
        if p.tunnel_id is not None and p.tunnel_id not in tids:
            tids.append(p.tunnel_id)
        if p.echo_data is not None:
            text = "/".join(p.tokens())
            tokens[text] = tokens.get(text, 0) + 1
        owner = packet_owner(p, client_tokens, tid_owner)
        if owner is None:
            continue
        by_owner[owner] = by_owner.get(owner, 0) + 1
        if own is not None and owner != own:
            mis += 1
            mis_ctl += p.control
            for t in p.tokens():
                if client_tokens.get(t) == owner and t not in foreign:
                    foreign.append(t)
    return LinkStats(
        name=name, packets_out=len(out), packets_in=len(inbound),
        data_out=sum(1 for p in out if not p.control),
        control_out=sum(1 for p in out if p.control),
        control_out_types=tuple(sorted(ctl_types.items())),
        tunnel_ids_out=tuple(tids),
        tokens_out=tuple(sorted(tokens.items())),
        misdelivered=mis, misdelivered_control=mis_ctl, foreign_tokens=tuple(foreign),
        by_owner=tuple(sorted(by_owner.items())),
    )
