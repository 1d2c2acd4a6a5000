#!/usr/bin/env python3
"""Build the example captures in ``pcaps/`` with the project's scapy layers.

Usage::

    .venv/bin/python pcaps/make_pcaps.py            # (re)write pcaps/*.pcap, pcaps/*.pcapng
    .venv/bin/python pcaps/make_pcaps.py --out DIR  # write them somewhere else

Deterministic: fixed timestamps from a fixed epoch, fixed tunnel/session IDs, IP IDs, magic numbers
and Random Vectors, no randomness (hidden AVPs are made without ``pad_to``, the only place
:func:`l2tp_marker.hiding.hide` would draw random bytes). Running it twice gives byte-identical
files, and ``tests/unit/test_replay_pcaps.py`` checks that the committed files are what this
script writes.

The scene: Windows-style clients (and one xl2tpd-style client) behind the NAT address 192.0.2.10
talk to the L2TP/IPsec gateway 198.51.100.1. The packets are those the gateway sees after IPsec
decryption. Each conversation is a full RFC 2661 exchange with consistent Ns/Nr: SCCRQ, SCCRP,
SCCCN, ZLB, ICRQ, ICRP, ICCN, ZLB, then HELLOs and PPP LCP echoes carried in data messages both
ways, and CDN/StopCCN where the capture needs an ending.

Outbound packets (gateway -> client) carry the tunnel ID the LNS knows. For a tunnel the marker
aliased that is the alias the engine hands out (65535, 65534, ... : ``EngineConfig.alias_start``),
because the LNS saw the rewritten SCCRQ: the capture shows what an unpatched xl2tpd sends.

Most captures are LINKTYPE_NFLOG, as ``l2tp-marker capture`` or ``tcpdump -i nflog:N`` writes
them: inbound packets at LOCAL_IN with the mark of the SA that decrypted them, outbound packets at
LOCAL_OUT with the mark strongSwan's connmark rule restored from conntrack. All clients that use
udp/1701 share ONE conntrack entry (same 5-tuple after NAT), so an outbound packet carries the mark
of whichever client spoke last -- the bug the marker fixes. This script models that: outbound marks
come from a per-5-tuple "connmark" that every inbound packet overwrites.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

from scapy.layers.inet import IP, UDP, fragment  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from l2tp_marker import capture_io  # noqa: E402
from l2tp_marker import constants as C  # noqa: E402
from l2tp_marker import hiding  # noqa: E402
from l2tp_marker import layers as L  # noqa: E402

EPOCH = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC: every capture starts here
NAT = "192.0.2.10"  # the NAT's public address: every client appears as this address
GW = "198.51.100.1"  # the L2TP/IPsec gateway (LNS)
OTHER = "203.0.113.50"  # a host that is not behind the NAT (used by the ESP capture)
NAT_MAC = "02:00:5e:00:02:0a"
GW_MAC = "02:00:5e:00:64:01"
NFLOG_GROUP = 5
SECRET = b"s3cret"  # the tunnel secret of hidden-avp.pcap
ALIAS = 0xFFFF  # the first alias the engine hands out (EngineConfig.alias_start)

IN, OUT = "in", "out"


# ----------------------------------------------------------------------------- the scene


@dataclass
class Packet:
    ts: float
    direction: str
    ip: bytes
    mark: int  # the mark the packet carried when captured (0: none)
    label: str | None = None  # NFLOG prefix


class Scene:
    """A timeline of IP packets at the gateway, with the connmark behaviour of strongSwan."""

    def __init__(self) -> None:
        self.t = 0.0  # seconds since EPOCH
        self.packets: list[Packet] = []
        self.connmark: dict[tuple[str, int], int] = {}  # (client addr, client port) -> ct mark
        self._ipid = {IN: 0x1000, OUT: 0x5000}

    def at(self, t: float) -> None:
        assert t >= self.t, f"time goes forward: {t} < {self.t}"
        self.t = t

    def _ip(self, direction: str, src: str, dst: str, ttl: int) -> IP:
        self._ipid[direction] = (self._ipid[direction] + 1) & 0xFFFF
        return IP(src=src, dst=dst, id=self._ipid[direction], ttl=ttl)

    def add(self, direction: str, ip: bytes, mark: int, label: str | None = None) -> None:
        self.packets.append(Packet(EPOCH + self.t, direction, bytes(ip), mark, label))
        self.t = round(self.t + 0.002, 6)  # the next packet, 2 ms later unless at() says otherwise

    def inbound(self, addr: str, port: int, payload, mark: int, *, ttl: int = 128,
                label: str | None = None, raw_udp: bool = False) -> None:
        """A client's packet after decryption by the SA with ``mark`` (seen at LOCAL_IN)."""
        pkt = self._ip(IN, addr, GW, ttl) / UDP(sport=port, dport=C.L2TP_PORT) / payload
        if mark:
            self.connmark[(addr, port)] = mark  # INPUT: CONNMARK --set-xmark M
        self.add(IN, bytes(pkt), mark, label)

    def outbound(self, addr: str, port: int, payload, *, label: str | None = None) -> None:
        """The gateway's packet at LOCAL_OUT, with the mark connmark --restore-mark gave it."""
        pkt = self._ip(OUT, GW, addr, 64) / UDP(sport=C.L2TP_PORT, dport=port) / payload
        self.add(OUT, bytes(pkt), self.connmark.get((addr, port), 0), label)

    def raw(self, direction: str, ip: bytes, mark: int, label: str | None = None) -> None:
        self.add(direction, ip, mark, label)


def lcp_echo(code: int, ident: int, magic: int) -> bytes:
    """A PPP LCP Echo-Request (9) / Echo-Reply (10) in HDLC-like framing (ff 03)."""
    return b"\xff\x03" + struct.pack("!HBBHI", 0xC021, code, ident, 8, magic)


class Conversation:
    """One tunnel with one session between a client (LAC) and the gateway (LNS).

    ``client_tid``/``client_sid``: the IDs the client assigned (Windows: 1 and 1 after boot).
    ``gw_tid``/``gw_sid``: the IDs the LNS assigned. ``visible_tid``: the tunnel ID the LNS knows
    for the client, i.e. the alias when the marker aliased the tunnel, else ``client_tid``.
    ``hide``: hide the Assigned Tunnel/Session ID AVPs with :data:`SECRET` (both sides).
    """

    def __init__(self, scene: Scene, *, port: int, mark: int, client_tid: int, client_sid: int,
                 gw_tid: int, gw_sid: int, visible_tid: int | None = None, windows: bool = True,
                 hostname: bytes = b"PC", addr: str = NAT, hide: bool = False, rv_seed: str = ""):
        self.s = scene
        self.addr, self.port, self.mark = addr, port, mark
        self.client_tid, self.client_sid = client_tid, client_sid
        self.gw_tid, self.gw_sid = gw_tid, gw_sid
        self.visible_tid = client_tid if visible_tid is None else visible_tid
        self.windows = windows
        self.hostname = hostname
        self.hide = hide
        self.rv_seed = rv_seed or hostname.decode()
        self.c_ns = 0  # Ns of the client's next control message (= the gateway's Nr)
        self.g_ns = 0  # Ns of the gateway's next control message (= the client's Nr)
        self.c_magic = int.from_bytes(hashlib.sha256(b"c" + hostname).digest()[:4], "big")
        self.g_magic = int.from_bytes(hashlib.sha256(b"g" + hostname).digest()[:4], "big")
        self.echo_id = 0
        self._rv_count = 0

    @property
    def ttl(self) -> int:
        return 128 if self.windows else 64

    # -- building blocks
    def _rv(self) -> bytes:
        self._rv_count += 1
        return hashlib.md5(f"{self.rv_seed}/{self._rv_count}".encode()).digest()

    def _id_avp(self, cls, attr: int, value: int, field: str) -> list:
        """The Assigned Tunnel/Session ID AVP, hidden (after a fresh Random Vector) if ``hide``."""
        if not self.hide:
            return [cls(**{field: value})]
        rv = self._rv()
        blob = hiding.hide(attr, value.to_bytes(2, "big"), SECRET, rv)
        return [L.AVPRandomVector(vector=rv), L.AVPHidden(m=1, attr_type=attr, value=blob)]

    def tunnel_id_avps(self, value: int) -> list:
        return self._id_avp(L.AVPAssignedTunnelID, C.AVP_ASSIGNED_TUNNEL_ID, value, "tunnel_id")

    def session_id_avps(self, value: int) -> list:
        return self._id_avp(L.AVPAssignedSessionID, C.AVP_ASSIGNED_SESSION_ID, value, "session_id")

    def client_control(self, msg_type: int | None, avps=(), *, session_id: int = 0,
                       tunnel_id: int | None = None, ns: int | None = None, mark: int | None = None,
                       label: str | None = None) -> None:
        """Client -> gateway control message (``msg_type`` None: a ZLB ack)."""
        header_tid = (0 if msg_type == C.SCCRQ else self.gw_tid) if tunnel_id is None else tunnel_id
        avp_list = [] if msg_type is None else [L.AVPMessageType(msg_type=msg_type), *avps]
        msg = L.L2TPv2(tunnel_id=header_tid, session_id=session_id,
                       ns=self.c_ns if ns is None else ns, nr=self.g_ns, avps=avp_list)
        if msg_type is not None and ns is None:
            self.c_ns += 1
        self.s.inbound(self.addr, self.port, msg, self.mark if mark is None else mark,
                       ttl=self.ttl, label=label)

    def gateway_control(self, msg_type: int | None, avps=(), *, session_id: int = 0,
                        ns: int | None = None, label: str | None = None) -> None:
        """Gateway -> client control message, addressed to the tunnel ID the LNS knows."""
        avp_list = [] if msg_type is None else [L.AVPMessageType(msg_type=msg_type), *avps]
        msg = L.L2TPv2(tunnel_id=self.visible_tid, session_id=session_id,
                       ns=self.g_ns if ns is None else ns, nr=self.c_ns, avps=avp_list)
        if msg_type is not None and ns is None:
            self.g_ns += 1
        self.s.outbound(self.addr, self.port, msg, label=label)

    def client_data(self, ppp: bytes, *, mark: int | None = None, label: str | None = None) -> None:
        msg = L.L2TPv2(t=0, l=1, s=0, tunnel_id=self.gw_tid, session_id=self.gw_sid) / Raw(ppp)
        self.s.inbound(self.addr, self.port, msg, self.mark if mark is None else mark,
                       ttl=self.ttl, label=label)

    def gateway_data(self, ppp: bytes, *, label: str | None = None) -> None:
        msg = L.L2TPv2(t=0, l=1, s=0, tunnel_id=self.visible_tid, session_id=self.client_sid) / Raw(ppp)
        self.s.outbound(self.addr, self.port, msg, label=label)

    # -- conversation steps
    def sccrq(self) -> None:
        vendor = b"Microsoft" if self.windows else b"xelerance.com"
        firmware = 0x0601 if self.windows else 0x0690
        avps = [L.AVPProtocolVersion(), L.AVPFramingCapabilities(framing=3),
                L.AVPBearerCapabilities(bearer=0), L.AVPFirmwareRevision(firmware=firmware),
                L.AVPHostName(hostname=self.hostname), L.AVPVendorName(vendor_name=vendor),
                *self.tunnel_id_avps(self.client_tid), L.AVPReceiveWindowSize(window=8)]
        self.client_control(C.SCCRQ, avps, ns=0 if self.c_ns else None)

    def sccrp(self) -> None:
        avps = [L.AVPProtocolVersion(), L.AVPFramingCapabilities(framing=3),
                L.AVPBearerCapabilities(bearer=0), L.AVPFirmwareRevision(firmware=0x0690),
                L.AVPHostName(hostname=b"gateway"), L.AVPVendorName(vendor_name=b"xelerance.com"),
                *self.tunnel_id_avps(self.gw_tid), L.AVPReceiveWindowSize(window=4)]
        self.gateway_control(C.SCCRP, avps)

    def establish(self, gap: float = 0.0) -> None:
        """SCCRQ .. ZLB: control connection and one incoming call (the session)."""
        self.sccrq()
        self.sccrp()
        self.client_control(C.SCCCN)
        self.gateway_control(None)
        self.icrq()
        self.gateway_control(C.ICRP, self.session_id_avps(self.gw_sid), session_id=self.client_sid)
        self.client_control(C.ICCN, [L.AVPTxConnectSpeed(speed=100_000_000),
                                     L.AVPFramingType(framing=1)], session_id=self.gw_sid)
        self.gateway_control(None)

    def icrq(self) -> None:
        self.client_control(C.ICRQ, [*self.session_id_avps(self.client_sid),
                                     L.AVPCallSerialNumber(serial=self.client_sid)])

    def client_echo(self) -> None:
        """The client's pppd asks (LCP Echo-Request), the gateway's pppd answers."""
        self.echo_id = (self.echo_id + 1) & 0xFF
        self.client_data(lcp_echo(9, self.echo_id, self.c_magic))
        self.gateway_data(lcp_echo(10, self.echo_id, self.g_magic))

    def gateway_echo(self) -> None:
        self.echo_id = (self.echo_id + 1) & 0xFF
        self.gateway_data(lcp_echo(9, self.echo_id, self.g_magic))
        self.client_data(lcp_echo(10, self.echo_id, self.c_magic))

    def gateway_hello(self) -> None:
        self.gateway_control(C.HELLO)
        self.client_control(None)

    def client_hello(self) -> None:
        self.client_control(C.HELLO)
        self.gateway_control(None)

    def stopccn_avps(self) -> list:
        return [*self.tunnel_id_avps(self.client_tid), L.AVPResultCode(result_code=1)]

    def disconnect(self) -> None:
        """The client hangs up: CDN (acked), then StopCCN (acked)."""
        self.client_control(C.CDN, [L.AVPResultCode(result_code=3), *self.session_id_avps(self.client_sid)],
                            session_id=self.gw_sid)
        self.gateway_control(None)
        self.client_control(C.STOPCCN, self.stopccn_avps())
        self.gateway_control(None)


# ----------------------------------------------------------------------------- file writers


def nflog_records(packets: list[Packet]) -> list[tuple[float, bytes]]:
    """LINKTYPE_NFLOG record bodies: hook LOCAL_IN / LOCAL_OUT, mark TLV only when non-zero."""
    out = []
    for p in packets:
        hook = capture_io.NF_INET_LOCAL_IN if p.direction == IN else capture_io.NF_INET_LOCAL_OUT
        out.append((p.ts, capture_io.nflog_frame(p.ip, mark=p.mark or None, hook=hook,
                                                 prefix=p.label, group=NFLOG_GROUP)))
    return out


def ethernet_records(packets: list[Packet]) -> list[tuple[float, bytes]]:
    """Ethernet frames on the gateway's interface (received frames padded to 60 octets)."""
    out = []
    for p in packets:
        if p.direction == IN:
            frame = bytes(Ether(src=NAT_MAC, dst=GW_MAC, type=0x0800) / Raw(p.ip))
            frame += b"\0" * max(0, 60 - len(frame))
        else:
            frame = bytes(Ether(src=GW_MAC, dst=NAT_MAC, type=0x0800) / Raw(p.ip))
        out.append((p.ts, frame))
    return out


def sll_records(packets: list[Packet]) -> list[tuple[float, bytes]]:
    """Linux cooked (SLL) frames, as ``tcpdump -i any`` writes them."""
    out = []
    for p in packets:
        pkttype, mac = (0, NAT_MAC) if p.direction == IN else (4, GW_MAC)
        addr = bytes.fromhex(mac.replace(":", "")) + b"\0\0"
        out.append((p.ts, struct.pack("!HHH8sH", pkttype, 1, 6, addr, 0x0800) + p.ip))
    return out


def pcap_bytes(linktype: int, records: list[tuple[float, bytes]]) -> bytes:
    buf = io.BytesIO()
    capture_io.write_pcap(buf, records, linktype)
    return buf.getvalue()


def pcapng_bytes(linktype: int, records: list[tuple[float, bytes]], if_name: str) -> bytes:
    """A little-endian pcapng file: SHB, one IDB (microsecond timestamps), one EPB per packet."""

    def opt(code: int, value: bytes) -> bytes:
        return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)

    def block(btype: int, body: bytes) -> bytes:
        assert len(body) % 4 == 0
        return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    out = [block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
                 + opt(4, b"l2tp-marker pcaps/make_pcaps.py") + opt(0, b"")),
           block(1, struct.pack("<HHI", linktype, 0, 262_144)
                 + opt(2, if_name.encode()) + opt(9, b"\x06") + opt(0, b""))]
    for ts, data in records:
        units = round(ts * 1_000_000)
        body = struct.pack("<IIIII", 0, units >> 32, units & 0xFFFFFFFF, len(data), len(data))
        out.append(block(6, body + data + b"\0" * (-len(data) % 4)))
    return b"".join(out)


# ----------------------------------------------------------------------------- the captures
# Marks of the clients' SAs (strongSwan mark_in = mark_out = %unique hands out small numbers).
MARK_A, MARK_B = 0x1, 0x2


def one_client() -> bytes:
    s = Scene()
    a = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                     gw_sid=51203, hostname=b"DESKTOP-ALICE")
    a.establish()
    s.at(0.5)
    a.client_echo()
    s.at(10.0)
    a.gateway_echo()
    s.at(30.0)
    a.client_echo()
    s.at(60.0)
    a.gateway_hello()
    a.gateway_echo()
    s.at(62.0)
    a.disconnect()
    return pcap_bytes(capture_io.LINKTYPE_NFLOG, nflog_records(s.packets))


def two_windows_same_tid() -> bytes:
    s = Scene()
    a = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                     gw_sid=51203, hostname=b"DESKTOP-ALICE")
    b = Conversation(s, port=1701, mark=MARK_B, client_tid=1, client_sid=1, gw_tid=9730,
                     gw_sid=40417, visible_tid=ALIAS, hostname=b"DESKTOP-BOB")
    a.establish()
    s.at(0.5)
    a.client_echo()
    # B dials: same address, same port, same tunnel ID 1. The marker aliases it to 65535.
    s.at(2.0)
    b.sccrq()
    s.at(3.0)
    b.sccrq()  # Windows retransmits after 1 s: the retransmission must be aliased too
    b.sccrp()  # the LNS answers tunnel 65535 (it saw the rewritten SCCRQ)
    s.at(3.1)
    a.client_echo()  # A speaks: connmark -> A's mark
    b.client_control(C.SCCCN)  # B speaks: connmark -> B's mark
    b.gateway_control(None)
    a.gateway_data(lcp_echo(9, 0x41, a.g_magic))  # LNS pppd to A: leaves with B's mark (wrong)
    b.icrq()
    b.gateway_control(C.ICRP, [L.AVPAssignedSessionID(session_id=b.gw_sid)], session_id=b.client_sid)
    a.client_data(lcp_echo(10, 0x41, a.c_magic))
    b.client_control(C.ICCN, [L.AVPTxConnectSpeed(speed=100_000_000), L.AVPFramingType(framing=1)],
                     session_id=b.gw_sid)
    b.gateway_control(None)
    s.at(5.0)
    a.gateway_hello()  # HELLO to A with B's mark (wrong), A acks
    b.gateway_data(lcp_echo(9, 0x42, b.g_magic))  # to B with A's mark (wrong)
    b.client_data(lcp_echo(10, 0x42, b.c_magic))
    s.at(8.0)
    a.client_echo()
    b.client_echo()
    s.at(12.0)
    a.gateway_echo()  # request leaves with B's mark (wrong)
    b.gateway_echo()  # request leaves with A's mark (wrong)
    s.at(20.0)
    b.gateway_hello()  # with A's mark (wrong)
    a.gateway_hello()  # with B's mark (wrong)
    s.at(25.0)
    b.disconnect()  # B's StopCCN names tunnel 1: the marker rewrites it to 65535
    a.gateway_data(lcp_echo(9, 0x43, a.g_magic))  # with B's mark (wrong)
    a.client_data(lcp_echo(10, 0x43, a.c_magic))
    return pcap_bytes(capture_io.LINKTYPE_NFLOG, nflog_records(s.packets))


def non_windows_random_port() -> bytes:
    s = Scene()
    w = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                     gw_sid=51203, hostname=b"DESKTOP-ALICE")
    x = Conversation(s, port=50123, mark=MARK_B, client_tid=38821, client_sid=11562, gw_tid=17205,
                     gw_sid=33001, windows=False, hostname=b"laptop-carol")
    w.establish()
    s.at(1.0)
    x.establish()
    s.at(2.0)
    w.client_echo()
    x.client_echo()
    s.at(10.0)
    x.gateway_echo()
    w.gateway_echo()
    s.at(60.0)
    x.client_hello()
    w.gateway_hello()
    return pcap_bytes(capture_io.LINKTYPE_ETHERNET, ethernet_records(s.packets))


def stopccn_reconnect() -> bytes:
    s = Scene()
    old = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                       gw_sid=51203, hostname=b"DESKTOP-ALICE")
    new = Conversation(s, port=1701, mark=MARK_A, client_tid=2, client_sid=2, gw_tid=45077,
                       gw_sid=60111, hostname=b"DESKTOP-ALICE")
    old.establish()
    s.at(1.0)
    old.client_echo()
    s.at(10.0)
    old.gateway_echo()
    s.at(20.0)
    old.disconnect()  # StopCCN at t=20.006: the old tunnel is held until t=51.006
    stop_ns = old.c_ns - 1
    s.at(21.0)
    new.establish()  # Windows redials with the next tunnel ID, 2
    s.at(22.0)
    new.client_echo()
    s.at(23.0)
    # During the hold time: the client repeats its StopCCN (the ZLB was late), the LNS re-acks.
    old.client_control(C.STOPCCN, old.stopccn_avps(), ns=stop_ns)
    old.gateway_control(None)
    s.at(30.0)
    new.gateway_echo()
    s.at(45.0)
    new.gateway_hello()
    s.at(55.0)
    # After the hold time (31 s): the old tunnel is gone; a late duplicate of its StopCCN is unknown.
    old.client_control(C.STOPCCN, old.stopccn_avps(), ns=stop_ns)
    s.at(60.0)
    new.client_echo()
    new.gateway_echo()
    return pcapng_bytes(capture_io.LINKTYPE_NFLOG, nflog_records(s.packets), f"nflog:{NFLOG_GROUP}")


def hidden_avp() -> bytes:
    s = Scene()
    a = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                     gw_sid=51203, hostname=b"DESKTOP-ALICE")
    b = Conversation(s, port=1701, mark=MARK_B, client_tid=1, client_sid=1, gw_tid=9730,
                     gw_sid=40417, visible_tid=ALIAS, hostname=b"DESKTOP-DAVE", hide=True)
    a.establish()
    s.at(1.0)
    a.client_echo()
    s.at(2.0)
    b.establish()  # SCCRQ with a hidden Assigned Tunnel ID 1: collides with A's tunnel 1
    s.at(3.0)
    b.client_echo()
    a.client_echo()
    s.at(10.0)
    b.gateway_echo()
    a.gateway_echo()
    s.at(20.0)
    b.disconnect()  # hidden Assigned Tunnel ID 1 in the StopCCN: rewritten to the hidden alias
    return pcap_bytes(capture_io.LINKTYPE_NFLOG, nflog_records(s.packets))


def cross_sa_conflict() -> bytes:
    s = Scene()
    a = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                     gw_sid=51203, hostname=b"DESKTOP-ALICE")
    b = Conversation(s, port=1701, mark=MARK_B, client_tid=2, client_sid=1, gw_tid=9730,
                     gw_sid=40417, hostname=b"DESKTOP-BOB")
    a.establish()
    s.at(1.0)
    b.establish()
    s.at(2.0)
    a.client_echo()
    b.client_echo()
    s.at(5.0)
    # Packets naming A's gateway tunnel 28411 arrive over B's SA (mark 2): a conflict each.
    a.client_data(lcp_echo(9, 0x77, a.c_magic), mark=MARK_B)
    a.client_control(None, mark=MARK_B)
    # The LNS answers A; connmark now holds B's mark. The binding must not have moved.
    a.gateway_data(lcp_echo(10, 0x77, a.g_magic))
    s.at(6.0)
    a.client_echo()
    b.client_echo()
    s.at(10.0)
    a.gateway_hello()
    return pcap_bytes(capture_io.LINKTYPE_NFLOG, nflog_records(s.packets))


def _udp_raw(scene: Scene, payload: bytes, mark: int, label: str) -> None:
    scene.inbound(NAT, 1701, Raw(payload), mark, label=label)


def malformed() -> bytes:
    s = Scene()
    a = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                     gw_sid=51203, hostname=b"DESKTOP-ALICE")
    a.establish()
    s.at(1.0)
    a.client_echo()
    s.at(2.0)
    header = struct.pack("!HHHHHH", 0xC802, 0, a.gw_tid, 0, a.c_ns, a.g_ns)  # T L S, ver 2
    msg_type = struct.pack("!HHHH", 0x8008, 0, 0, C.HELLO)
    # 1. truncated L2TP header: 4 octets of a control header
    _udp_raw(s, header[:4], MARK_A, "bad: truncated L2TP header")
    # 2. an AVP whose length is 0
    body = msg_type + struct.pack("!HHH", 0x8000, 0, 9)
    _udp_raw(s, struct.pack("!HH", 0xC802, 12 + len(body)) + header[4:] + body, MARK_A,
             "bad: AVP length 0")
    # 3. an AVP running past the end of the message (says 40 octets, 8 present)
    body = msg_type + struct.pack("!HHHH", 0x8000 | 40, 0, 9, 1)
    _udp_raw(s, struct.pack("!HH", 0xC802, 12 + len(body)) + header[4:] + body, MARK_A,
             "bad: AVP beyond the end")
    # 4. the L2TP Length field lies (200 octets claimed, 20 present)
    _udp_raw(s, struct.pack("!HH", 0xC802, 200) + header[4:] + msg_type, MARK_A,
             "bad: Length field lies")
    # 5. L2TPv3 (RFC 3931) on udp/1701: a control message header with version 3
    _udp_raw(s, struct.pack("!HHI", 0xC803, 20, 0x00006EFB) + struct.pack("!HH", 0, 0) + msg_type,
             MARK_A, "bad: L2TPv3 on udp/1701")
    # 6 and 7. an IP-fragmented SCCRQ (first and second fragment)
    big = L.L2TPv2(tunnel_id=0, session_id=0, ns=0, nr=0, avps=[
        L.AVPMessageType(msg_type=C.SCCRQ), L.AVPProtocolVersion(),
        L.AVPHostName(hostname=b"F" * 600), L.AVPAssignedTunnelID(tunnel_id=7)])
    whole = IP(src=NAT, dst=GW, id=0x2222, ttl=128) / UDP(sport=1701, dport=1701) / big
    for i, frag in enumerate(fragment(IP(bytes(whole)), fragsize=400)):
        s.raw(IN, bytes(frag), MARK_A, f"bad: IP fragment {i + 1}")
    # 8. a control message without the L and S bits
    _udp_raw(s, struct.pack("!HHH", 0x8002, a.gw_tid, 0) + msg_type, MARK_A,
             "bad: control without L and S")
    # 9. a well-formed SCCRQ without an Assigned Tunnel ID AVP (the engine cannot learn it)
    s.inbound(NAT, 1701, L.L2TPv2(tunnel_id=0, session_id=0, ns=0, nr=0, avps=[
        L.AVPMessageType(msg_type=C.SCCRQ), L.AVPProtocolVersion(), L.AVPHostName(hostname=b"X")]),
        MARK_A, label="bad: SCCRQ without Assigned Tunnel ID")
    # The good tunnel still works after all that.
    s.at(3.0)
    a.client_echo()
    a.gateway_hello()
    data = pcap_bytes(capture_io.LINKTYPE_NFLOG, nflog_records(s.packets))
    # 10. a truncated record at the end of the file (the capture was cut while writing)
    last = nflog_records([Packet(EPOCH + 4.0, IN, bytes(s.packets[-2].ip), MARK_A)])[0][1]
    return data + struct.pack("<IIII", int(EPOCH) + 4, 0, len(last), len(last)) + last[:20]


def esp_only() -> bytes:
    """Taken on the gateway's outside interface: nothing but IKE/ESP on udp/4500 and plain ESP."""
    s = Scene()

    def blob(tag: str, n: int) -> bytes:
        out = b""
        i = 0
        while len(out) < n:
            out += hashlib.sha256(f"{tag}/{i}".encode()).digest()
            i += 1
        return out[:n]

    def natt(src, sport, dst, dport, payload, direction):
        s.raw(direction, bytes(IP(src=src, dst=dst, id=len(s.packets) + 1, ttl=64)
                               / UDP(sport=sport, dport=dport) / Raw(payload)), 0)

    # IKE on udp/4500 (non-ESP marker: four zero octets), then ESP-in-UDP from two clients.
    natt(NAT, 4500, GW, 4500, b"\0\0\0\0" + blob("ike-a", 236), IN)
    natt(GW, 4500, NAT, 4500, b"\0\0\0\0" + blob("ike-a-r", 220), OUT)
    for i in range(4):
        s.at(1.0 + i)
        natt(NAT, 4500, GW, 4500, struct.pack("!II", 0xC1A0_0001, i + 1) + blob(f"esp-a{i}", 88), IN)
        natt(GW, 4500, NAT, 4500, struct.pack("!II", 0xC2B0_0001, i + 1) + blob(f"esp-a-r{i}", 88), OUT)
        natt(NAT, 61000, GW, 4500, struct.pack("!II", 0xC1A0_0002, i + 1) + blob(f"esp-b{i}", 88), IN)
        natt(GW, 4500, NAT, 61000, struct.pack("!II", 0xC2B0_0002, i + 1) + blob(f"esp-b-r{i}", 88), OUT)
    s.at(6.0)
    natt(NAT, 4500, GW, 4500, b"\xff", IN)  # NAT-T keepalive
    # A client that is not behind a NAT: plain ESP (IP protocol 50).
    for i in range(2):
        s.at(7.0 + i)
        s.raw(IN, bytes(IP(src=OTHER, dst=GW, proto=50, id=0x3000 + i, ttl=64)
                        / Raw(struct.pack("!II", 0xC1A0_0003, i + 1) + blob(f"esp-c{i}", 88))), 0)
        s.raw(OUT, bytes(IP(src=GW, dst=OTHER, proto=50, id=0x6000 + i, ttl=64)
                         / Raw(struct.pack("!II", 0xC2B0_0003, i + 1) + blob(f"esp-c-r{i}", 88))), 0)
    return pcap_bytes(capture_io.LINKTYPE_ETHERNET, ethernet_records(s.packets))


def mid_session_sll() -> bytes:
    """``tcpdump -i any`` started after the tunnel came up: no SCCRQ, no marks, Linux cooked."""
    s = Scene()
    a = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                     gw_sid=51203, hostname=b"DESKTOP-ALICE")
    a.establish()
    start = len(s.packets)
    s.at(100.0)
    a.client_echo()
    a.gateway_hello()
    s.at(110.0)
    a.gateway_echo()
    return pcap_bytes(capture_io.LINKTYPE_LINUX_SLL, sll_records(s.packets[start:]))


def unmarked_plaintext() -> bytes:
    """A client that skipped IPsec: its packets reach LOCAL_IN without any mark (no NFULA_MARK)."""
    s = Scene()
    a = Conversation(s, port=1701, mark=MARK_A, client_tid=1, client_sid=1, gw_tid=28411,
                     gw_sid=51203, hostname=b"DESKTOP-ALICE")
    p = Conversation(s, addr=OTHER, port=1701, mark=0, client_tid=4711, client_sid=815, gw_tid=36002,
                     gw_sid=21300, windows=False, hostname=b"plaintext-eve")
    a.establish()
    s.at(1.0)
    p.establish()  # plain L2TP, no IPsec: no mark in, none restored out
    s.at(2.0)
    p.client_echo()
    a.client_echo()
    s.at(10.0)
    p.gateway_hello()
    a.gateway_hello()
    return pcap_bytes(capture_io.LINKTYPE_NFLOG, nflog_records(s.packets))


CAPTURES = {
    "one-client.pcap": one_client,
    "two-windows-same-tid.pcap": two_windows_same_tid,
    "non-windows-random-port.pcap": non_windows_random_port,
    "stopccn-reconnect.pcapng": stopccn_reconnect,
    "hidden-avp.pcap": hidden_avp,
    "cross-sa-conflict.pcap": cross_sa_conflict,
    "malformed.pcap": malformed,
    "esp-only.pcap": esp_only,
    "mid-session-sll.pcap": mid_session_sll,
    "unmarked-plaintext.pcap": unmarked_plaintext,
}


def build_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in CAPTURES.items():
        path = out / name
        path.write_bytes(fn())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: pcaps/)")
    args = parser.parse_args(argv)
    for path in build_all(args.out):
        print(f"{path} {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
