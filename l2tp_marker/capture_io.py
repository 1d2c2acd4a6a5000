"""Capture file reading and writing without scapy (stdlib ``struct`` only).

Used by ``l2tp-marker replay`` (offline analysis of operator captures) and by
``l2tp-marker capture`` (which writes LINKTYPE_NFLOG files carrying each packet's
netfilter mark and hook).  The reader never crashes on a bad file: a file that is
not a capture at all raises :class:`CaptureError`; everything wrong with an
individual record becomes a :class:`CapturedPacket` whose ``error`` says why.

Formats implemented (from their public specifications):

* classic pcap -- draft-ietf-opsawg-pcap ("PCAP Capture File Format") and
  pcap-savefile(5): 24-byte global header, magic ``0xA1B2C3D4`` (microsecond) or
  ``0xA1B23C4D`` (nanosecond) in either byte order; the lower 16 bits of the
  LinkType field are the link type, the upper bits (FCS info) are ignored.
  The "modified" (Kuznetsov, ``0xA1B2CD34``) variant with 24-byte record
  headers is read too.
* pcapng -- draft-ietf-opsawg-pcapng: Section Header Block (either byte order,
  byte-order magic ``0x1A2B3C4D``; a later SHB starts a new section with its own
  byte order and interfaces), Interface Description Block (link type, snaplen,
  ``if_tsresol`` (option 9: ``10**-n``, or ``2**-n`` when the top bit is set)
  and ``if_tsoffset`` (option 14)), Enhanced Packet Block, Simple Packet Block
  (no timestamp: ``ts`` is 0.0), obsolete Packet Block; every other block is
  skipped.
* gzip-compressed files of either format are decompressed transparently.
* link types (https://www.tcpdump.org/linktypes.html):
  0 NULL / 108 LOOP (BSD loopback, 4-byte address family, host / network
  order), 1 Ethernet (any number of 802.1Q / 802.1ad / QinQ tags, PPPoE
  session frames), 12 / 14 / 101 raw IP (version nibble decides),
  228 IPv4, 229 IPv6, 113 LINUX_SLL (16-byte header, protocol at offset 14),
  276 LINUX_SLL2 (20-byte header, protocol at offset 0) and
  239 NFLOG (tcpdump.org/linktypes/LINKTYPE_NFLOG.html and Linux
  include/uapi/linux/netfilter/nfnetlink_log.h): a 4-byte header
  (family u8, version u8 = 0, resource id = NFLOG group, u16 big endian)
  followed by netlink-style TLVs ``length u16, type u16`` in the *writing
  host's* byte order (libpcap swaps them together with the rest of a
  byte-swapped file, so here they are taken in the file's / section's byte
  order, falling back to the other order when only that one is plausible),
  ``length`` includes the 4-byte TLV header but not the padding to a 4-byte
  boundary.  Used TLV types: NFULA_PACKET_HDR = 1 (hw_protocol u16 BE, hook
  u8, pad u8), NFULA_MARK = 2 (u32 BE), NFULA_PAYLOAD = 9 (the packet from
  its network header), NFULA_PREFIX = 10 (NUL-terminated string).  Note
  that the kernel only emits NFULA_MARK when the mark is non-zero, so a
  real capture reports ``mark=None`` for unmarked packets.

Decoded IP packets are trimmed to the length their own header gives (dropping
Ethernet padding / FCS); a packet cut short by the snap length is returned as
captured.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = [
    "CaptureError",
    "CapturedPacket",
    "read_capture",
    "write_pcap",
    "nflog_frame",
    "PcapWriter",
    "LINKTYPE_NULL",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_RAW",
    "LINKTYPE_LOOP",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_NFLOG",
    "NF_INET_PRE_ROUTING",
    "NF_INET_LOCAL_IN",
    "NF_INET_FORWARD",
    "NF_INET_LOCAL_OUT",
    "NF_INET_POST_ROUTING",
]

# --------------------------------------------------------------------------- constants

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_BSD12 = 12  # DLT_RAW on most BSDs
LINKTYPE_RAW_BSD14 = 14  # DLT_RAW on OpenBSD
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_NFLOG = 239
LINKTYPE_LINUX_SLL2 = 276

NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
NF_INET_POST_ROUTING = 4

# nfnetlink_log.h attribute types
NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
_NLA_TYPE_MASK = 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100, 0x9200})
_ETH_P_PPPOE_SESS = 0x8864

_AF_INET = 2
_AF_INET6_VALUES = frozenset({10, 23, 24, 28, 30})  # Linux, Windows, Net/OpenBSD, FreeBSD, Darwin

_PCAP_MAGICS: dict[bytes, tuple[str, int, int]] = {
    # magic bytes as stored -> (struct byte order, timestamp fraction divisor, record header size)
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000, 16),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000, 16),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000, 16),
    b"\x34\xcd\xb2\xa1": ("<", 1_000_000, 24),  # Kuznetsov "modified" pcap
    b"\xa1\xb2\xcd\x34": (">", 1_000_000, 24),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
_PCAPNG_BOM_LE = b"\x4d\x3c\x2b\x1a"
_PCAPNG_BOM_BE = b"\x1a\x2b\x3c\x4d"
_GZIP_MAGIC = b"\x1f\x8b"

# Sanity limits: anything above is treated as a corrupt length, not allocated.
_MIN_CAPLEN_LIMIT = 262_144  # libpcap's MAXIMUM_SNAPLEN
_MAX_RECORD = 1 << 24
_MAX_BLOCK = 1 << 26

_DEFAULT_SNAPLEN = 262_144

# Set by the tests: let unexpected decoder exceptions propagate instead of turning
# them into ``error="internal decode error ..."`` values.
_STRICT = False


class CaptureError(Exception):
    """File-level problem (not a capture, unsupported link type, truncated global header) with a readable message."""


@dataclass(frozen=True)
class CapturedPacket:
    """One record of a capture file, decoded down to its IP packet."""

    no: int  # 1-based packet number in the file
    ts: float  # seconds since epoch
    linktype: int  # DLT/LINKTYPE number of the packet's interface (-1: unknown interface)
    ip: bytes | None  # the IPv4 or IPv6 packet (starting at the IP header), or None
    mark: int | None  # netfilter mark (NFLOG captures only; None if absent)
    hook: int | None  # netfilter hook number (NFLOG NFULA_PACKET_HDR), None if absent
    prefix: str | None  # NFLOG prefix string if present
    error: str | None  # why ip is None / the record is unusable, else None


# --------------------------------------------------------------------------- byte source


class _Source:
    """Reads exactly-n-or-EOF from a binary file object, mapping I/O failures to CaptureError."""

    def __init__(self, f: Any, name: str):
        self._f = f
        self.name = name

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        chunks: list[bytes] = []
        want = n
        while want > 0:
            try:
                b = self._f.read(want)
            except (OSError, EOFError, zlib.error) as e:
                raise CaptureError(f"{self.name}: read error: {e}") from e
            if b is None:  # non-blocking raw stream with nothing available
                raise CaptureError(f"{self.name}: file object returned no data (non-blocking?)")
            if isinstance(b, str):
                raise CaptureError(f"{self.name}: file object must be opened in binary mode")
            if not b:
                break
            b = bytes(b)
            chunks.append(b)
            want -= len(b)
        return b"".join(chunks)

    def skip(self, n: int) -> int:
        """Discard n bytes; return how many were actually there."""
        got = 0
        while got < n:
            b = self.read(min(n - got, 1 << 20))
            if not b:
                break
            got += len(b)
        return got


class _Prepended(io.RawIOBase):
    """A raw stream yielding ``head`` and then the rest of ``src`` (for sniffing gzip)."""

    def __init__(self, head: bytes, src: _Source):
        self._head = head
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = len(buf)
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
        else:
            data = self._src.read(n)
        buf[: len(data)] = data
        return len(data)


# --------------------------------------------------------------------------- file readers
#
# Each reader's records() yields (ts, linktype, data, error, byteorder) tuples; data is
# None exactly when error is set.  A reader stops after yielding a truncated or corrupt
# record it cannot resynchronise from.

_Record = tuple[float, int, bytes | None, str | None, str]


class _PcapReader:
    def __init__(self, src: _Source, magic: bytes):
        self._src = src
        self._order, self._div, self._rechdr = _PCAP_MAGICS[magic]
        rest = src.read(20)
        if len(rest) < 20:
            raise CaptureError(f"{src.name}: truncated pcap global header ({4 + len(rest)} of 24 bytes)")
        major, minor, _zone, _sigfigs, snaplen, network = struct.unpack(self._order + "HHiIII", rest)
        if major != 2:
            raise CaptureError(f"{src.name}: unsupported pcap version {major}.{minor}")
        self.linktype = network & 0xFFFF
        self._limit = max(_MIN_CAPLEN_LIMIT, min(snaplen, _MAX_RECORD))

    def records(self) -> Iterator[_Record]:
        o, lt, src = self._order, self.linktype, self._src
        while True:
            hdr = src.read(self._rechdr)
            if len(hdr) < self._rechdr:
                return  # clean EOF, or a partial record header: nothing usable
            sec, frac, caplen, _origlen = struct.unpack_from(o + "IIII", hdr)
            ts = sec + frac / self._div
            if caplen > self._limit:
                yield ts, lt, None, f"corrupt record header (caplen {caplen})", o
                return
            data = src.read(caplen)
            if len(data) < caplen:
                yield ts, lt, None, "truncated record", o
                return
            yield ts, lt, data, None, o


@dataclass
class _Iface:
    linktype: int
    snaplen: int
    div: int  # timestamp units per second
    offset: int  # if_tsoffset, seconds


def _pcapng_options(buf: bytes, order: str) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + 4 <= len(buf):
        code, olen = struct.unpack_from(order + "HH", buf, off)
        if code == 0:  # opt_endofopt
            return
        yield code, buf[off + 4 : off + 4 + olen]
        off += 4 + olen + (-olen % 4)


class _PcapngReader:
    def __init__(self, src: _Source):
        self._src = src
        self._ifaces: list[_Iface] = []
        self._order = "<"
        rest = src.read(4)
        if len(rest) < 4:
            raise CaptureError(f"{src.name}: truncated pcapng section header")
        err = self._section_from(_PCAPNG_SHB + rest)
        if err:
            raise CaptureError(f"{src.name}: {err}")

    def _iface(self, ifid: int) -> _Iface | None:
        return self._ifaces[ifid] if 0 <= ifid < len(self._ifaces) else None

    def _ts(self, iface: _Iface | None, units: int) -> float:
        if iface is None:
            return 0.0
        sec, frac = divmod(units, iface.div)
        return sec + frac / iface.div + iface.offset

    def _idb(self, body: bytes) -> None:
        o = self._order
        if len(body) < 8:
            self._ifaces.append(_Iface(-1, 0, 1_000_000, 0))  # keep numbering; packets get errors
            return
        linktype, _res, snaplen = struct.unpack_from(o + "HHI", body)
        div, offset = 1_000_000, 0
        for code, val in _pcapng_options(body[8:], o):
            if code == 9 and len(val) >= 1:  # if_tsresol
                v = val[0]
                div = 1 << (v & 0x7F) if v & 0x80 else 10 ** v
            elif code == 14 and len(val) >= 8:  # if_tsoffset
                (offset,) = struct.unpack_from(o + "q", val)
        self._ifaces.append(_Iface(linktype, snaplen, div, offset))

    def _packet(self, btype: int, body: bytes, complete: bool) -> _Record:
        """Decode an EPB / SPB / PB body; ``complete`` is False for a truncated block."""
        o = self._order
        iface: _Iface | None
        if btype == 6:  # Enhanced Packet Block
            if len(body) < 20:
                iface = self._iface(struct.unpack_from(o + "I", body)[0]) if len(body) >= 4 else None
                return 0.0, iface.linktype if iface else -1, None, (
                    "truncated record" if not complete else "corrupt packet block (too short)"
                ), o
            ifid, hi, lo, caplen, _orig = struct.unpack_from(o + "IIIII", body)
            iface = self._iface(ifid)
            ts = self._ts(iface, (hi << 32) | lo)
            start = 20
        elif btype == 2:  # obsolete Packet Block
            if len(body) < 20:
                iface = self._iface(struct.unpack_from(o + "H", body)[0]) if len(body) >= 2 else None
                return 0.0, iface.linktype if iface else -1, None, (
                    "truncated record" if not complete else "corrupt packet block (too short)"
                ), o
            ifid, _drops, hi, lo, caplen, _orig = struct.unpack_from(o + "HHIIII", body)
            iface = self._iface(ifid)
            ts = self._ts(iface, (hi << 32) | lo)
            start = 20
        else:  # Simple Packet Block: interface 0, no timestamp
            ifid = 0
            iface = self._iface(0)
            ts = 0.0
            if len(body) < 4:
                return ts, iface.linktype if iface else -1, None, (
                    "truncated record" if not complete else "corrupt packet block (too short)"
                ), o
            (orig,) = struct.unpack_from(o + "I", body)
            caplen = min(orig, len(body) - 4)
            if iface is not None and iface.snaplen:
                caplen = min(caplen, iface.snaplen)
            start = 4
        lt = iface.linktype if iface else -1
        if not complete:
            return ts, lt, None, "truncated record", o
        if iface is None:
            return ts, lt, None, f"packet on undefined interface {ifid}", o
        if iface.linktype < 0:
            return ts, lt, None, f"interface {ifid} has a corrupt description block", o
        if caplen > len(body) - start:
            return ts, lt, None, f"corrupt packet block (caplen {caplen} exceeds block)", o
        return ts, lt, body[start : start + caplen], None, o

    def records(self) -> Iterator[_Record]:
        src = self._src
        while True:
            hdr = src.read(8)
            if len(hdr) < 8:
                return  # EOF (or a partial block header: nothing usable)
            if hdr[:4] == _PCAPNG_SHB:
                # a new section: its own byte order; re-read its header from the length field
                err = self._section_from(hdr)
                if err:
                    yield 0.0, -1, None, err, self._order
                    return
                continue
            o = self._order
            btype, blen = struct.unpack(o + "II", hdr)
            if blen < 12 or blen % 4 or blen > _MAX_BLOCK:
                yield 0.0, -1, None, f"corrupt pcapng block (type 0x{btype:08x}, length {blen})", o
                return
            is_packet = btype in (2, 3, 6)
            if not is_packet and btype != 1:
                if src.skip(blen - 8) < blen - 8:
                    return  # truncated non-packet block at the end
                continue
            body = src.read(blen - 8)
            if len(body) < blen - 8:
                if is_packet:
                    yield self._packet(btype, body, complete=False)
                return
            if struct.unpack(o + "I", body[-4:])[0] != blen:
                yield 0.0, -1, None, f"corrupt pcapng block (type 0x{btype:08x}, trailing length mismatch)", o
                return
            body = body[:-4]
            if btype == 1:
                self._idb(body)
            else:
                yield self._packet(btype, body, complete=True)

    def _section_from(self, hdr: bytes) -> str | None:
        """Read the rest of a Section Header Block; ``hdr`` is its type and length fields."""
        src = self._src
        bom = src.read(4)
        if len(bom) < 4:
            return "truncated pcapng section header"
        if bom == _PCAPNG_BOM_LE:
            order = "<"
        elif bom == _PCAPNG_BOM_BE:
            order = ">"
        else:
            return f"pcapng section header has a bad byte-order magic {bom.hex()}"
        (blen,) = struct.unpack(order + "I", hdr[4:8])
        if blen < 28 or blen % 4 or blen > _MAX_BLOCK:
            return f"corrupt pcapng section header (length {blen})"
        body = src.read(blen - 12)
        if len(body) < blen - 12:
            return "truncated pcapng section header"
        major, minor = struct.unpack_from(order + "HH", body)
        if major != 1:
            return f"unsupported pcapng version {major}.{minor}"
        if struct.unpack(order + "I", body[-4:])[0] != blen:
            return "corrupt pcapng section header (trailing length mismatch)"
        self._order = order
        self._ifaces = []
        return None


# --------------------------------------------------------------------------- link layers
#
# Every decoder returns (ip, error, mark, hook, prefix).

_Decoded = tuple[bytes | None, str | None, int | None, int | None, str | None]


def _finish_ip(b: bytes, want: int | None, what: str) -> tuple[bytes | None, str | None]:
    """Check that ``b`` starts with an IP header (of version ``want``) and trim trailing padding."""
    if not b:
        return None, f"{what}: no IP packet"
    v = b[0] >> 4
    if want is not None and v != want:
        return None, f"{what} but IP version nibble is {v}"
    if v == 4:
        if len(b) < 20:
            return None, "truncated IPv4 header"
        ihl = (b[0] & 0x0F) * 4
        tot = (b[2] << 8) | b[3]
        if 20 <= ihl <= tot <= len(b):
            b = b[:tot]
    elif v == 6:
        if len(b) < 40:
            return None, "truncated IPv6 header"
        plen = (b[4] << 8) | b[5]
        if plen and 40 + plen <= len(b):  # plen 0: jumbogram, leave alone
            b = b[: 40 + plen]
    else:
        return None, f"not an IP packet (version nibble {v})"
    return b, None


def _ok(r: tuple[bytes | None, str | None]) -> _Decoded:
    return r[0], r[1], None, None, None


def _by_ethertype(et: int, data: bytes, off: int) -> _Decoded:
    """Follow VLAN tags / PPPoE from an ethertype whose payload starts at ``off``."""
    tags = 0
    while et in _VLAN_TPIDS:
        if len(data) < off + 4:
            return None, "truncated VLAN tag", None, None, None
        et = (data[off + 2] << 8) | data[off + 3]
        off += 4
        tags += 1
        if tags > 8:
            return None, "too many VLAN tags", None, None, None
    if et == ETH_P_IP:
        return _ok(_finish_ip(data[off:], 4, "ethertype 0x0800"))
    if et == ETH_P_IPV6:
        return _ok(_finish_ip(data[off:], 6, "ethertype 0x86dd"))
    if et == _ETH_P_PPPOE_SESS:
        if len(data) < off + 8:
            return None, "truncated PPPoE header", None, None, None
        ppp = (data[off + 6] << 8) | data[off + 7]
        if ppp == 0x0021:
            return _ok(_finish_ip(data[off + 8 :], 4, "PPP protocol 0x0021"))
        if ppp == 0x0057:
            return _ok(_finish_ip(data[off + 8 :], 6, "PPP protocol 0x0057"))
        return None, f"non-IP PPP protocol 0x{ppp:04x}", None, None, None
    if et < 0x0600:
        return None, f"non-IP 802.3 frame (length/protocol 0x{et:04x})", None, None, None
    return None, f"non-IP ethertype 0x{et:04x}", None, None, None


def _dec_ethernet(data: bytes, order: str) -> _Decoded:
    if len(data) < 14:
        return None, "truncated Ethernet header", None, None, None
    return _by_ethertype((data[12] << 8) | data[13], data, 14)


def _dec_sll(data: bytes, order: str) -> _Decoded:
    if len(data) < 16:
        return None, "truncated Linux SLL header", None, None, None
    return _by_ethertype((data[14] << 8) | data[15], data, 16)


def _dec_sll2(data: bytes, order: str) -> _Decoded:
    if len(data) < 20:
        return None, "truncated Linux SLL2 header", None, None, None
    return _by_ethertype((data[0] << 8) | data[1], data, 20)


def _dec_raw(data: bytes, order: str) -> _Decoded:
    return _ok(_finish_ip(data, None, "raw IP"))


def _dec_ipv4(data: bytes, order: str) -> _Decoded:
    return _ok(_finish_ip(data, 4, "LINKTYPE_IPV4"))


def _dec_ipv6(data: bytes, order: str) -> _Decoded:
    return _ok(_finish_ip(data, 6, "LINKTYPE_IPV6"))


def _af_packet(af: int, payload: bytes) -> _Decoded:
    if af == _AF_INET:
        return _ok(_finish_ip(payload, 4, f"address family {af}"))
    if af in _AF_INET6_VALUES:
        return _ok(_finish_ip(payload, 6, f"address family {af}"))
    return None, f"non-IP address family {af}", None, None, None


def _dec_null(data: bytes, order: str) -> _Decoded:
    # The family is in the *capturing* host's byte order, which need not be the file's.
    if len(data) < 4:
        return None, "truncated loopback header", None, None, None
    le = int.from_bytes(data[:4], "little")
    be = int.from_bytes(data[:4], "big")
    af = le if le < 0x10000 else be
    return _af_packet(af, data[4:])


def _dec_loop(data: bytes, order: str) -> _Decoded:
    if len(data) < 4:
        return None, "truncated loopback header", None, None, None
    return _af_packet(int.from_bytes(data[:4], "big"), data[4:])


def _plausible_tlv(data: bytes, order: str) -> bool:
    tlen, ttype = struct.unpack_from(order + "HH", data, 4)
    return tlen >= 4 and 1 <= (ttype & _NLA_TYPE_MASK) <= 64


def _dec_nflog(data: bytes, order: str) -> _Decoded:
    if len(data) < 4:
        return None, "truncated NFLOG header", None, None, None
    family, version = data[0], data[1]
    if version != 0:
        return None, f"unsupported NFLOG version {version}", None, None, None
    if len(data) >= 8 and not _plausible_tlv(data, order):
        other = ">" if order == "<" else "<"
        if _plausible_tlv(data, other):
            order = other
    mark = hook = None
    prefix: str | None = None
    payload: bytes | None = None
    problem: str | None = None
    off = 4
    while len(data) - off >= 4:
        tlen, ttype = struct.unpack_from(order + "HH", data, off)
        if tlen < 4:
            problem = f"malformed NFLOG TLV (length {tlen})"
            break
        val = data[off + 4 : off + tlen]  # shorter than tlen - 4 if cut by the snap length
        complete = off + tlen <= len(data)
        t = ttype & _NLA_TYPE_MASK
        if t == NFULA_PACKET_HDR and len(val) >= 3 and hook is None:
            hook = val[2]
        elif t == NFULA_MARK and len(val) >= 4 and mark is None:
            mark = int.from_bytes(val[:4], "big")
        elif t == NFULA_PREFIX and prefix is None and complete:
            prefix = val.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif t == NFULA_PAYLOAD and payload is None:
            payload = val
        off += tlen + (-tlen % 4)
    if payload is None:
        return None, problem or "NFLOG without payload", mark, hook, prefix
    want = {2: 4, 10: 6}.get(family)
    ip, err = _finish_ip(payload, want, f"NFLOG family {family}")
    return ip, err, mark, hook, prefix


_DECODERS = {
    LINKTYPE_NULL: _dec_null,
    LINKTYPE_ETHERNET: _dec_ethernet,
    LINKTYPE_RAW_BSD12: _dec_raw,
    LINKTYPE_RAW_BSD14: _dec_raw,
    LINKTYPE_RAW: _dec_raw,
    LINKTYPE_LOOP: _dec_loop,
    LINKTYPE_LINUX_SLL: _dec_sll,
    LINKTYPE_IPV4: _dec_ipv4,
    LINKTYPE_IPV6: _dec_ipv6,
    LINKTYPE_NFLOG: _dec_nflog,
    LINKTYPE_LINUX_SLL2: _dec_sll2,
}


def _decode(no: int, rec: _Record) -> CapturedPacket:
    ts, lt, data, error, order = rec
    if data is None:
        return CapturedPacket(no, ts, lt, None, None, None, None, error or "unusable record")
    fn = _DECODERS.get(lt)
    if fn is None:
        return CapturedPacket(no, ts, lt, None, None, None, None, f"unsupported link type {lt}")
    try:
        ip, err, mark, hook, prefix = fn(data, order)
    except Exception as e:  # a decoder bug must not take down a replay of a big file
        if _STRICT:
            raise
        ip, err, mark, hook, prefix = None, f"internal decode error: {type(e).__name__}: {e}", None, None, None
    return CapturedPacket(no, ts, lt, ip, mark, hook, prefix, err)


# --------------------------------------------------------------------------- public reader


def read_capture(path_or_fileobj: str | os.PathLike[str] | BinaryIO) -> Iterator[CapturedPacket]:
    """Iterate over the packets of a pcap / pcapng file (optionally gzip-compressed).

    The file header is checked before this returns, so a file that is not a
    capture raises :class:`CaptureError` right here; read errors later on also
    raise :class:`CaptureError`.  Per-record problems (truncation, unknown link
    type, non-IP frames) are reported in ``CapturedPacket.error``.  A path is
    opened and closed by the returned iterator; a file object is read from its
    current position and left open.
    """
    if isinstance(path_or_fileobj, (str, bytes, os.PathLike)):
        name = os.fsdecode(path_or_fileobj)
        try:
            f: Any = open(path_or_fileobj, "rb")
        except (OSError, ValueError) as e:  # ValueError: embedded NUL in the path
            raise CaptureError(f"{name}: cannot open: {getattr(e, 'strerror', None) or e}") from e
        owned = True
    else:
        f = path_or_fileobj
        name = str(getattr(f, "name", "<capture>"))
        owned = False
    try:
        src = _Source(f, name)
        magic = src.read(4)
        if magic[:2] == _GZIP_MAGIC:
            gz = gzip.GzipFile(fileobj=io.BufferedReader(_Prepended(magic, src)), mode="rb")
            src = _Source(gz, name)
            magic = src.read(4)
        reader: _PcapReader | _PcapngReader
        if magic in _PCAP_MAGICS:
            reader = _PcapReader(src, magic)
        elif magic == _PCAPNG_SHB:
            reader = _PcapngReader(src)
        elif not magic:
            raise CaptureError(f"{name}: empty file, not a pcap or pcapng capture")
        else:
            raise CaptureError(
                f"{name}: not a pcap or pcapng capture (starts with {magic.hex()})"
            )
    except BaseException:
        if owned:
            f.close()
        raise
    return _iterate(reader, f if owned else None)


def _iterate(reader: _PcapReader | _PcapngReader, to_close: Any) -> Iterator[CapturedPacket]:
    try:
        no = 0
        for rec in reader.records():
            no += 1
            yield _decode(no, rec)
    finally:
        if to_close is not None:
            to_close.close()


# --------------------------------------------------------------------------- writers


class PcapWriter:
    """Streaming classic-pcap writer (little endian, microsecond timestamps).

    ``PcapWriter(path_or_fileobj, linktype)`` or ``PcapWriter.open(path, linktype)``;
    use as a context manager.  ``write(ts, data)`` appends one record; with
    ``flush_each=True`` every record is flushed so a concurrent reader (or a
    crash) sees complete records.  A path is opened (truncated) and closed by the
    writer; a file object is flushed but left open on ``close()``.
    """

    def __init__(
        self,
        path_or_fileobj: str | os.PathLike[str] | BinaryIO,
        linktype: int = LINKTYPE_RAW,
        *,
        snaplen: int = _DEFAULT_SNAPLEN,
        flush_each: bool = False,
    ):
        if not isinstance(linktype, int) or not 0 <= linktype <= 0xFFFF:
            raise ValueError(f"linktype must be 0..65535, not {linktype!r}")
        if not isinstance(snaplen, int) or not 0 < snaplen <= 0xFFFFFFFF:
            raise ValueError(f"snaplen must be positive, not {snaplen!r}")
        self.linktype = linktype
        self.snaplen = snaplen
        self.flush_each = flush_each
        self._owned = isinstance(path_or_fileobj, (str, bytes, os.PathLike))
        self._f: Any = open(path_or_fileobj, "wb") if self._owned else path_or_fileobj
        self._closed = False
        try:
            self._f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype))
            if flush_each:
                self._f.flush()
        except BaseException:
            self._closed = True
            if self._owned:
                self._f.close()
            raise

    @classmethod
    def open(
        cls, path_or_fileobj: str | os.PathLike[str] | BinaryIO, linktype: int = LINKTYPE_RAW, **kwargs: Any
    ) -> PcapWriter:
        return cls(path_or_fileobj, linktype, **kwargs)

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, ts: float, data: bytes, *, orig_len: int | None = None) -> None:
        """Append one record; data beyond ``snaplen`` is cut (``orig_len`` keeps the real length)."""
        if self._closed:
            raise ValueError("write to a closed PcapWriter")
        if not math.isfinite(ts):
            raise ValueError(f"timestamp must be finite, not {ts!r}")
        sec, usec = divmod(round(ts * 1_000_000), 1_000_000)
        if not 0 <= sec <= 0xFFFFFFFF:
            raise ValueError(f"timestamp {ts!r} does not fit a pcap record")
        data = bytes(data)
        orig = len(data) if orig_len is None else max(orig_len, len(data))
        data = data[: self.snaplen]
        self._f.write(struct.pack("<IIII", sec, usec, len(data), min(orig, 0xFFFFFFFF)) + data)
        if self.flush_each:
            self._f.flush()

    def flush(self) -> None:
        if not self._closed:
            self._f.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._f.flush()
        finally:
            if self._owned:
                self._f.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_pcap(
    path_or_fileobj: str | os.PathLike[str] | BinaryIO,
    packets: Iterable[tuple[float, bytes]],
    linktype: int = LINKTYPE_RAW,
) -> None:
    """Write ``(ts, data)`` pairs as a classic microsecond pcap file."""
    with PcapWriter(path_or_fileobj, linktype) as w:
        for ts, data in packets:
            w.write(ts, data)


def _tlv(order: str, ttype: int, value: bytes) -> bytes:
    tlen = 4 + len(value)
    if tlen > 0xFFFF:
        raise ValueError(f"NFLOG TLV type {ttype} too long ({len(value)} bytes)")
    return struct.pack(order + "HH", tlen, ttype) + value + b"\0" * (-tlen % 4)


def nflog_frame(
    ip: bytes,
    *,
    mark: int | None,
    hook: int | None,
    prefix: str | None = None,
    family: int = 2,
    group: int = 0,
    byteorder: str = "little",
) -> bytes:
    """Build one LINKTYPE_NFLOG record body (as the kernel + libpcap would) around ``ip``.

    TLVs are emitted in the kernel's order (PACKET_HDR, MARK, PREFIX, PAYLOAD);
    ``None`` leaves the corresponding TLV out.  ``byteorder`` is the TLV header
    byte order, which must match the pcap file's (``PcapWriter`` writes little
    endian).
    """
    if byteorder not in ("little", "big"):
        raise ValueError("byteorder must be 'little' or 'big'")
    if not 0 <= family <= 0xFF:
        raise ValueError(f"family must be 0..255, not {family}")
    if not 0 <= group <= 0xFFFF:
        raise ValueError(f"group must be 0..65535, not {group}")
    o = "<" if byteorder == "little" else ">"
    ip = bytes(ip)
    out = [struct.pack(">BBH", family, 0, group)]
    if hook is not None:
        if not 0 <= hook <= 0xFF:
            raise ValueError(f"hook must be 0..255, not {hook}")
        v = ip[0] >> 4 if ip else 0
        hw = ETH_P_IP if v == 4 else ETH_P_IPV6 if v == 6 else 0
        out.append(_tlv(o, NFULA_PACKET_HDR, struct.pack(">HBB", hw, hook, 0)))
    if mark is not None:
        if not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"mark must be a u32, not {mark}")
        out.append(_tlv(o, NFULA_MARK, struct.pack(">I", mark)))
    if prefix is not None:
        out.append(_tlv(o, NFULA_PREFIX, prefix.encode("utf-8") + b"\0"))
    out.append(_tlv(o, NFULA_PAYLOAD, ip))
    return b"".join(out)
