"""Tests for l2tp_marker.capture_io (pure-struct pcap / pcapng reader and writer).

scapy is used here only to build packets and as an independent reader / writer
to cross-check against; the module under test never imports it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2tp_marker import capture_io as cio
from l2tp_marker.capture_io import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_NFLOG,
    LINKTYPE_RAW,
    NF_INET_FORWARD,
    NF_INET_LOCAL_IN,
    NF_INET_LOCAL_OUT,
    NF_INET_POST_ROUTING,
    NF_INET_PRE_ROUTING,
    CaptureError,
    CapturedPacket,
    PcapWriter,
    nflog_frame,
    read_capture,
    write_pcap,
)

scapy_all = pytest.importorskip("scapy.all")
from scapy.all import IP, UDP, IPv6, Ether, raw, rdpcap, wrpcap  # noqa: E402
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Loopback  # noqa: E402
from scapy.utils import PcapNgWriter  # noqa: E402
from scapy.utils import PcapWriter as ScapyPcapWriter  # noqa: E402

# --------------------------------------------------------------------------- helpers

IP4 = raw(IP(src="192.0.2.10", dst="198.51.100.1", id=7) / UDP(sport=1701, dport=1701) / b"l2tp-v4")
IP6 = raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1701, dport=1701) / b"l2tp-v6")
IP4_SMALL = raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))  # 28 bytes: Ethernet pads it


def roundtrip(records, linktype):
    buf = io.BytesIO()
    write_pcap(buf, records, linktype=linktype)
    buf.seek(0)
    return list(read_capture(buf))


def read_bytes(data: bytes):
    return list(read_capture(io.BytesIO(data)))


def eth(payload: bytes, ethertype: int, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    hdr = bytes.fromhex("020000000002") + bytes.fromhex("020000000001")
    for tpid, vid in tags:
        hdr += struct.pack(">HH", tpid, vid)
    return hdr + struct.pack(">H", ethertype) + payload


def sll(payload: bytes, proto: int) -> bytes:
    # packet type, ARPHRD, address length, address (8), protocol
    return struct.pack(">HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x01", proto) + payload


def sll2(payload: bytes, proto: int) -> bytes:
    # protocol, reserved, ifindex, ARPHRD, packet type, address length, address (8)
    return struct.pack(">HHIHBB8s", proto, 0, 2, 1, 4, 6, b"\x02\0\0\0\0\x01") + payload


def pcap_bytes(records, linktype, *, order="<", nano=False, snaplen=65535) -> bytes:
    """Classic pcap written by hand (either byte order / resolution)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    div = 1_000_000_000 if nano else 1_000_000
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for sec, frac, data in records:
        assert frac < div
        out.append(struct.pack(order + "IIII", sec, frac, len(data), len(data)) + data)
    return b"".join(out)


# pcapng builders ------------------------------------------------------------


def ng_block(order: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    blen = 12 + len(body)
    return struct.pack(order + "II", btype, blen) + body + struct.pack(order + "I", blen)


def ng_opts(order: str, opts: list[tuple[int, bytes]]) -> bytes:
    out = b""
    for code, val in opts:
        out += struct.pack(order + "HH", code, len(val)) + val + b"\0" * (-len(val) % 4)
    return out + (struct.pack(order + "HH", 0, 0) if opts else b"")


def ng_shb(order: str, opts=()) -> bytes:
    body = struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1) + ng_opts(order, list(opts))
    return ng_block(order, 0x0A0D0D0A, body)


def ng_idb(order: str, linktype: int, snaplen: int = 0, tsresol: int | None = None, tsoffset: int | None = None):
    opts = [(2, b"eth0")]
    if tsresol is not None:
        opts.append((9, bytes([tsresol])))
    if tsoffset is not None:
        opts.append((14, struct.pack(order + "q", tsoffset)))
    return ng_block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + ng_opts(order, opts))


def ng_epb(order: str, ifid: int, units: int, data: bytes, orig: int | None = None) -> bytes:
    body = struct.pack(order + "IIIII", ifid, units >> 32, units & 0xFFFFFFFF, len(data), orig or len(data))
    body += data + b"\0" * (-len(data) % 4)
    body += ng_opts(order, [(1, b"a comment"), (2, struct.pack(order + "I", 1))])
    return ng_block(order, 6, body)


def ng_spb(order: str, data: bytes) -> bytes:
    return ng_block(order, 3, struct.pack(order + "I", len(data)) + data)


def ng_pb(order: str, ifid: int, units: int, data: bytes) -> bytes:
    body = struct.pack(order + "HHIIII", ifid, 0, units >> 32, units & 0xFFFFFFFF, len(data), len(data))
    return ng_block(order, 2, body + data)


@contextlib.contextmanager
def strict_decoding():
    """Let decoder bugs raise instead of becoming ``internal decode error`` values."""
    old = cio._STRICT
    cio._STRICT = True
    try:
        yield
    finally:
        cio._STRICT = old


# --------------------------------------------------------------------------- API surface


def test_constants():
    assert (LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6) == (1, 101, 228, 229)
    assert (LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_NFLOG) == (113, 276, 239)
    assert (NF_INET_PRE_ROUTING, NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING) == (
        0, 1, 2, 3, 4,
    )


def test_module_does_not_import_scapy():
    code = (
        "import io, sys\n"
        "import l2tp_marker.capture_io as c\n"
        "b = io.BytesIO()\n"
        "c.write_pcap(b, [(1.0, b'\\x45' + bytes(19))])\n"
        "b.seek(0)\n"
        "assert [p.error for p in c.read_capture(b)] == [None]\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'scapy'], 'scapy imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --------------------------------------------------------------------------- raw IP link types


def test_raw_roundtrip_ipv4_ipv6_and_timestamps():
    pkts = roundtrip([(1700000000.123456, IP4), (1700000001.000001, IP6), (0.0, IP4)], LINKTYPE_RAW)
    assert [p.no for p in pkts] == [1, 2, 3]
    assert [p.ip for p in pkts] == [IP4, IP6, IP4]
    assert pkts[0].ts == pytest.approx(1700000000.123456, abs=1e-6)
    assert pkts[1].ts == pytest.approx(1700000001.000001, abs=1e-6)
    assert all(p.linktype == 101 and p.error is None for p in pkts)
    assert all(p.mark is None and p.hook is None and p.prefix is None for p in pkts)


def test_raw_non_ip_payload_is_an_error_value():
    (p,) = roundtrip([(1.0, b"\x00" * 30)], LINKTYPE_RAW)
    assert p.ip is None and "not an IP packet" in p.error


@pytest.mark.parametrize("linktype", [12, 14])
def test_bsd_raw_link_types_decide_by_version_nibble(linktype):
    pkts = roundtrip([(1.0, IP4), (2.0, IP6), (3.0, b"\x50" + b"\0" * 40)], linktype)
    assert [p.ip for p in pkts[:2]] == [IP4, IP6]
    assert pkts[2].ip is None and "version nibble 5" in pkts[2].error
    assert {p.linktype for p in pkts} == {linktype}


def test_ipv4_and_ipv6_link_types_check_the_version():
    a, b = roundtrip([(1.0, IP4), (2.0, IP6)], LINKTYPE_IPV4)
    assert a.ip == IP4 and a.error is None
    assert b.ip is None and "IP version nibble is 6" in b.error
    a, b = roundtrip([(1.0, IP6), (2.0, IP4)], LINKTYPE_IPV6)
    assert a.ip == IP6 and a.error is None
    assert b.ip is None and "IP version nibble is 4" in b.error


def test_truncated_ip_header_is_an_error():
    (p,) = roundtrip([(1.0, IP4[:12])], LINKTYPE_RAW)
    assert p.ip is None and p.error == "truncated IPv4 header"
    (p,) = roundtrip([(1.0, IP6[:30])], LINKTYPE_RAW)
    assert p.ip is None and p.error == "truncated IPv6 header"


def test_snapped_ip_packet_is_returned_as_captured():
    (p,) = roundtrip([(1.0, IP4[:24])], LINKTYPE_RAW)
    assert p.ip == IP4[:24] and p.error is None


# --------------------------------------------------------------------------- Ethernet


def test_ethernet_plain_vlan_qinq_and_padding():
    frames = [
        eth(IP4, 0x0800),
        eth(IP6, 0x86DD, ((0x8100, 100),)),
        eth(IP4, 0x0800, ((0x88A8, 10), (0x8100, 20))),
        eth(IP4_SMALL, 0x0800) + b"\0" * (60 - 14 - len(IP4_SMALL)) + b"FCS!",  # padding + FCS trimmed
        eth(b"\0" * 28, 0x0806),
        eth(b"\xaa\xaa\x03" + b"\0" * 40, 46),  # 802.3 length field
        b"\x01\x02\x03",
        eth(IP6, 0x0800),
    ]
    pkts = roundtrip([(float(i), f) for i, f in enumerate(frames)], LINKTYPE_ETHERNET)
    assert [p.ip for p in pkts[:4]] == [IP4, IP6, IP4, IP4_SMALL]
    assert all(p.error is None for p in pkts[:4])
    assert pkts[4].ip is None and pkts[4].error == "non-IP ethertype 0x0806"
    assert pkts[5].ip is None and "802.3" in pkts[5].error
    assert pkts[6].ip is None and pkts[6].error == "truncated Ethernet header"
    assert pkts[7].ip is None and "ethertype 0x0800" in pkts[7].error


def test_ethernet_truncated_vlan_tag():
    (p,) = roundtrip([(1.0, eth(b"\x00\x05", 0x8100))], LINKTYPE_ETHERNET)
    assert p.ip is None and p.error == "truncated VLAN tag"


def test_ethernet_pppoe_session():
    pppoe = struct.pack(">BBHHH", 0x11, 0, 0x1234, len(IP4) + 2, 0x0021) + IP4
    (p,) = roundtrip([(1.0, eth(pppoe, 0x8864))], LINKTYPE_ETHERNET)
    assert p.ip == IP4 and p.error is None


def test_ethernet_cross_checked_with_scapy_writer(tmp_path):
    f = tmp_path / "scapy_eth.pcap"
    pkts = [
        Ether() / IP(raw(IP4)),
        Ether() / Dot1Q(vlan=5) / IPv6(raw(IP6)),
        Ether() / Dot1AD(vlan=5) / Dot1Q(vlan=6) / IP(raw(IP4)),
        Ether() / ARP(),
    ]
    for i, p in enumerate(pkts):
        p.time = 1000 + i + 0.5
    wrpcap(str(f), pkts)
    got = list(read_capture(f))
    assert [p.ip for p in got] == [IP4, IP6, IP4, None]
    assert [p.ts for p in got] == [1000.5, 1001.5, 1002.5, 1003.5]
    assert got[3].error == "non-IP ethertype 0x0806"
    assert {p.linktype for p in got} == {1}


# --------------------------------------------------------------------------- Linux cooked captures


def test_linux_sll_and_sll2_by_hand():
    pkts = roundtrip([(1.0, sll(IP4, 0x0800)), (2.0, sll(IP6, 0x86DD)), (3.0, sll(b"x" * 28, 0x0806)),
                      (4.0, sll(b"", 0x0800)[:10]), (5.0, sll(struct.pack(">HH", 7, 0x0800) + IP4, 0x8100))],
                     LINKTYPE_LINUX_SLL)
    assert [p.ip for p in pkts] == [IP4, IP6, None, None, IP4]
    assert pkts[2].error == "non-IP ethertype 0x0806"
    assert pkts[3].error == "truncated Linux SLL header"
    pkts = roundtrip([(1.0, sll2(IP4, 0x0800)), (2.0, sll2(IP6, 0x86DD)), (3.0, sll2(b"", 0x86DD)[:19])],
                     LINKTYPE_LINUX_SLL2)
    assert [p.ip for p in pkts] == [IP4, IP6, None]
    assert pkts[2].error == "truncated Linux SLL2 header"
    assert {p.linktype for p in pkts} == {276}


def test_linux_sll_and_sll2_cross_checked_with_scapy(tmp_path):
    f1, f2 = tmp_path / "sll.pcap", tmp_path / "sll2.pcap"
    wrpcap(str(f1), [CookedLinux(proto=0x0800) / IP(raw(IP4)), CookedLinux(proto=0x86DD) / IPv6(raw(IP6))])
    wrpcap(str(f2), [CookedLinuxV2(proto=0x0800) / IP(raw(IP4)), CookedLinuxV2(proto=0x86DD) / IPv6(raw(IP6))])
    a = list(read_capture(str(f1)))
    b = list(read_capture(str(f2)))
    assert [p.ip for p in a] == [IP4, IP6] and {p.linktype for p in a} == {113}
    assert [p.ip for p in b] == [IP4, IP6] and {p.linktype for p in b} == {276}


# --------------------------------------------------------------------------- BSD loopback


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_null_loopback_host_order_family(byteorder):
    recs = [
        (1.0, (2).to_bytes(4, byteorder) + IP4),
        (2.0, (30).to_bytes(4, byteorder) + IP6),  # Darwin AF_INET6
        (3.0, (24).to_bytes(4, byteorder) + IP6),  # NetBSD / OpenBSD
        (4.0, (28).to_bytes(4, byteorder) + IP6),  # FreeBSD
        (5.0, (7).to_bytes(4, byteorder) + IP4),
    ]
    pkts = roundtrip(recs, 0)
    assert [p.ip for p in pkts] == [IP4, IP6, IP6, IP6, None]
    assert pkts[4].error == "non-IP address family 7"


def test_loop_linktype_network_order():
    pkts = roundtrip([(1.0, (2).to_bytes(4, "big") + IP4)], 108)
    assert pkts[0].ip == IP4


def test_null_cross_checked_with_scapy(tmp_path):
    f = tmp_path / "lo.pcap"
    wrpcap(str(f), [Loopback(type=2) / IP(raw(IP4))])
    (p,) = read_capture(f)
    assert p.ip == IP4 and p.linktype == 0


# --------------------------------------------------------------------------- NFLOG


@pytest.mark.parametrize("hook", [0, 1, 2, 3, 4])
def test_nflog_mark_hook_prefix_roundtrip(hook):
    frame = nflog_frame(IP4, mark=0xDEADBEEF, hook=hook, prefix="l2m-in", group=7)
    (p,) = roundtrip([(5.5, frame)], LINKTYPE_NFLOG)
    assert (p.ip, p.mark, p.hook, p.prefix, p.error) == (IP4, 0xDEADBEEF, hook, "l2m-in", None)
    assert p.linktype == 239 and p.ts == 5.5
    assert frame[:4] == bytes([2, 0, 0, 7])  # family, version, group big endian


def test_nflog_optional_tlvs_absent():
    pkts = roundtrip(
        [
            (1.0, nflog_frame(IP4, mark=None, hook=None)),
            (2.0, nflog_frame(IP6, mark=0, hook=NF_INET_POST_ROUTING, family=10)),
            (3.0, nflog_frame(IP4, mark=1, hook=None, prefix="")),
            (4.0, nflog_frame(IP4, mark=2, hook=1, prefix="ünïcode")),
        ],
        LINKTYPE_NFLOG,
    )
    assert (pkts[0].ip, pkts[0].mark, pkts[0].hook, pkts[0].prefix) == (IP4, None, None, None)
    assert (pkts[1].ip, pkts[1].mark, pkts[1].hook) == (IP6, 0, 4)
    assert (pkts[2].mark, pkts[2].hook, pkts[2].prefix) == (1, None, "")
    assert pkts[3].prefix == "ünïcode"
    assert all(p.error is None for p in pkts)


def test_nflog_tlv_layout_matches_the_documented_format():
    frame = nflog_frame(IP4, mark=0x42, hook=3, prefix="abc")
    off, tlvs = 4, []
    while off < len(frame):
        tlen, ttype = struct.unpack_from("<HH", frame, off)  # host (little) endian on x86
        tlvs.append((ttype, frame[off + 4 : off + tlen]))
        off += (tlen + 3) & ~3
    assert off == len(frame)
    assert tlvs == [
        (1, struct.pack(">HBB", 0x0800, 3, 0)),
        (2, struct.pack(">I", 0x42)),
        (10, b"abc\0"),
        (9, IP4),
    ]


def test_nflog_without_payload_and_bad_frames():
    no_payload = nflog_frame(IP4, mark=9, hook=1, prefix="p")
    no_payload = no_payload[: no_payload.index(struct.pack("<HH", 4 + len(IP4), 9))]
    pkts = roundtrip(
        [
            (1.0, no_payload),
            (2.0, b"\x02\x00"),
            (3.0, b"\x02\x01\x00\x00" + nflog_frame(IP4, mark=None, hook=None)[4:]),
            (4.0, b"\x02\x00\x00\x00" + struct.pack("<HH", 2, 9) + b"\0" * 8),
            (5.0, nflog_frame(IP6, mark=None, hook=None, family=2)),
            (6.0, nflog_frame(b"\x00" * 30, mark=None, hook=None, family=7)),
        ],
        LINKTYPE_NFLOG,
    )
    assert (pkts[0].ip, pkts[0].mark, pkts[0].hook, pkts[0].prefix, pkts[0].error) == (
        None, 9, 1, "p", "NFLOG without payload",
    )
    assert pkts[1].error == "truncated NFLOG header"
    assert pkts[2].error == "unsupported NFLOG version 1"
    assert pkts[3].ip is None and "malformed NFLOG TLV" in pkts[3].error
    assert pkts[4].ip is None and "IP version nibble is 6" in pkts[4].error
    assert pkts[5].ip is None and "not an IP packet" in pkts[5].error


def test_nflog_payload_cut_by_snaplen_keeps_metadata():
    frame = nflog_frame(IP4, mark=3, hook=2, prefix="x")
    (p,) = roundtrip([(1.0, frame[:-5])], LINKTYPE_NFLOG)
    assert (p.mark, p.hook, p.prefix) == (3, 2, "x")
    pad = -len(IP4) % 4
    assert p.ip == IP4[: len(IP4) - (5 - pad)]
    assert p.error is None


def test_nflog_in_big_endian_pcap_uses_file_byte_order():
    frame = nflog_frame(IP4, mark=0x42, hook=3, prefix="be", byteorder="big")
    data = pcap_bytes([(10, 5, frame)], LINKTYPE_NFLOG, order=">")
    (p,) = read_bytes(data)
    assert (p.ip, p.mark, p.hook, p.prefix, p.error) == (IP4, 0x42, 3, "be", None)


def test_nflog_tlvs_in_the_other_byte_order_are_still_read():
    # e.g. a big-endian host's NFLOG capture re-written by a tool that did not swap the TLVs
    frame = nflog_frame(IP4, mark=7, hook=0, prefix="sw", byteorder="big")
    (p,) = roundtrip([(1.0, frame)], LINKTYPE_NFLOG)  # little-endian file
    assert (p.ip, p.mark, p.hook, p.prefix) == (IP4, 7, 0, "sw")


def test_nflog_frame_validates_arguments():
    with pytest.raises(ValueError):
        nflog_frame(IP4, mark=1 << 32, hook=0)
    with pytest.raises(ValueError):
        nflog_frame(IP4, mark=0, hook=256)
    with pytest.raises(ValueError):
        nflog_frame(IP4, mark=0, hook=0, group=70000)
    with pytest.raises(ValueError):
        nflog_frame(b"\x45" + b"\0" * 65535, mark=0, hook=0)


# A record captured with `tcpdump -i nflog:7` on Linux 6.18 (iptables-legacy MARK 0x42 in
# mangle OUTPUT + NFLOG --nflog-group 7 --nflog-prefix l2m; UDP 127.0.0.1 -> 127.0.0.1:1701).
# Kernel TLV order: PACKET_HDR, PREFIX, IFINDEX_OUTDEV, MARK, UID, GID, PAYLOAD.
REAL_NFLOG_PCAP = bytes.fromhex(
    "d4c3b2a102000400000000000000000000000400ef00000070ba0b6bcb330400"
    "5c0000005c00000002000007080001000800030008000a006c326d0008000500"
    "00000001080002000000004208000b000000000008000e000000000025000900"
    "45000021da7c40004011624d7f0000017f0000018c1e06a5000dfe2070726f62"
    "65000000"
)


def test_real_kernel_nflog_record():
    (p,) = read_bytes(REAL_NFLOG_PCAP)
    assert (p.linktype, p.mark, p.hook, p.prefix, p.error) == (239, 0x42, NF_INET_LOCAL_OUT, "l2m", None)
    pkt = IP(p.ip)
    assert pkt.src == pkt.dst == "127.0.0.1" and pkt[UDP].dport == 1701
    assert bytes(pkt[UDP].payload) == b"probe"


# --------------------------------------------------------------------------- pcap variants


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_byte_orders_and_resolutions(order, nano):
    frac = 123456789 if nano else 123456
    data = pcap_bytes([(1700000000, frac, IP4), (1700000001, 0, eth(IP6, 0x86DD))], LINKTYPE_RAW, order=order,
                      nano=nano)
    # second record is Ethernet-in-RAW, i.e. garbage for this link type
    a, b = read_bytes(data)
    assert a.ip == IP4 and a.error is None
    assert a.ts == pytest.approx(1700000000 + frac / (1e9 if nano else 1e6), abs=1e-6)
    assert b.ip is None and b.error


def test_big_endian_pcap_cross_checked_with_scapy(tmp_path):
    f = tmp_path / "be.pcap"
    w = ScapyPcapWriter(str(f), linktype=LINKTYPE_ETHERNET, endianness=">", sync=True)
    p = Ether() / IP(raw(IP4))
    p.time = 42.25
    w.write(p)
    w.close()
    assert f.read_bytes()[:4] == b"\xa1\xb2\xc3\xd4"
    (got,) = read_capture(f)
    assert (got.ip, got.ts, got.linktype) == (IP4, 42.25, 1)


def test_nanosecond_pcap_cross_checked_with_scapy(tmp_path):
    f = tmp_path / "ns.pcap"
    w = ScapyPcapWriter(str(f), linktype=LINKTYPE_RAW, nano=True, sync=True)
    w.write(IP(raw(IP4)))
    w.close()
    assert f.read_bytes()[:4] == b"\x4d\x3c\xb2\xa1"
    (got,) = read_capture(f)
    assert got.ip == IP4


def test_linktype_field_upper_bits_are_ignored():
    data = bytearray(pcap_bytes([(1, 0, IP4)], LINKTYPE_RAW))
    data[20:24] = struct.pack("<I", 0x14000000 | LINKTYPE_RAW)  # FCS length info
    (p,) = read_bytes(bytes(data))
    assert p.linktype == 101 and p.ip == IP4


def test_modified_kuznetsov_pcap():
    hdr = struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, LINKTYPE_RAW)
    rec = struct.pack("<IIII", 5, 0, len(IP4), len(IP4)) + struct.pack("<IHBB", 1, 0x0800, 0, 0) + IP4
    (p,) = read_bytes(hdr + rec)
    assert p.ip == IP4 and p.ts == 5.0


def test_unsupported_link_type_is_per_packet_error():
    pkts = roundtrip([(1.0, IP4), (2.0, IP4)], 147)
    assert [p.error for p in pkts] == ["unsupported link type 147"] * 2
    assert all(p.ip is None and p.linktype == 147 for p in pkts)


# --------------------------------------------------------------------------- truncation and garbage


def test_truncated_final_record_yields_error_then_stops():
    data = pcap_bytes([(1, 0, IP4), (2, 0, IP6)], LINKTYPE_RAW)
    pkts = read_bytes(data[:-5])
    assert [p.ip for p in pkts] == [IP4, None]
    assert pkts[1].error == "truncated record" and pkts[1].ts == 2.0 and pkts[1].no == 2


def test_partial_record_header_stops_silently():
    data = pcap_bytes([(1, 0, IP4), (2, 0, IP6)], LINKTYPE_RAW)
    cut = 24 + 16 + len(IP4) + 10  # 10 of the 16 header bytes of record 2
    pkts = read_bytes(data[:cut])
    assert [p.ip for p in pkts] == [IP4]


def test_absurd_caplen_is_a_corrupt_record_not_an_allocation():
    data = pcap_bytes([(1, 0, IP4)], LINKTYPE_RAW) + struct.pack("<IIII", 2, 0, 0xFFFFFFF0, 0xFFFFFFF0) + IP4
    pkts = read_bytes(data)
    assert pkts[0].ip == IP4
    assert pkts[1].ip is None and "corrupt record header" in pkts[1].error
    assert len(pkts) == 2


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty file"),
        (b"GET / HTTP/1.1\r\n\r\n" * 3, "not a pcap or pcapng"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "truncated pcap global header"),
        (b"\xd4\xc3\xb2\xa1" + struct.pack("<HHiIII", 3, 0, 0, 0, 65535, 1), "unsupported pcap version"),
        (b"\x0a\x0d\x0d\x0a\x1c\x00", "truncated pcapng section header"),
        (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x11\x22\x33\x44" + b"\0" * 16, "byte-order magic"),
        (ng_shb("<")[:20], "truncated pcapng section header"),
    ],
)
def test_file_level_problems_raise_capture_error(data, fragment):
    with pytest.raises(CaptureError, match=fragment):
        read_capture(io.BytesIO(data))  # raised eagerly, before iterating


def test_missing_file_is_capture_error(tmp_path):
    with pytest.raises(CaptureError, match="cannot open"):
        read_capture(tmp_path / "nope.pcap")
    with pytest.raises(CaptureError, match="cannot open"):
        read_capture(tmp_path)


def test_text_mode_file_object_is_capture_error(tmp_path):
    f = tmp_path / "x.pcap"
    write_pcap(f, [(1.0, IP4)])
    with open(f, encoding="latin-1") as fh, pytest.raises(CaptureError, match="binary mode"):
        read_capture(fh)


# --------------------------------------------------------------------------- pcapng


def test_pcapng_two_interfaces_and_nanosecond_tsresol():
    o = "<"
    ts_us = 1700000000_250000  # if 0: default microseconds
    ts_ns = 1700000002_123456789  # if 1: if_tsresol = 9
    data = (
        ng_shb(o, [(4, b"test app")])
        + ng_idb(o, LINKTYPE_ETHERNET)
        + ng_idb(o, LINKTYPE_NFLOG, tsresol=9)
        + ng_epb(o, 0, ts_us, eth(IP4, 0x0800))
        + ng_block(o, 4, b"\0" * 8)  # Name Resolution Block: skipped
        + ng_epb(o, 1, ts_ns, nflog_frame(IP6, mark=5, hook=1, prefix="ng", family=10))
        + ng_block(o, 0x00000BAD, b"custom block payload")  # custom block: skipped
        + ng_block(o, 5, struct.pack(o + "III", 0, 0, 0))  # Interface Statistics Block: skipped
        + ng_epb(o, 3, ts_us, IP4)  # undefined interface
    )
    a, b, c = read_bytes(data)
    assert (a.no, a.linktype, a.ip, a.error) == (1, 1, IP4, None)
    assert a.ts == pytest.approx(1700000000.25, abs=1e-6)
    assert (b.no, b.linktype, b.ip, b.mark, b.hook, b.prefix) == (2, 239, IP6, 5, 1, "ng")
    assert b.ts == pytest.approx(1700000002.123456789, abs=1e-6)
    assert (c.no, c.linktype, c.ip, c.error) == (3, -1, None, "packet on undefined interface 3")


def test_pcapng_big_endian_binary_tsresol_tsoffset_spb_and_pb():
    o = ">"
    data = (
        ng_shb(o)
        + ng_idb(o, LINKTYPE_RAW, snaplen=0, tsresol=0x80 | 10, tsoffset=1000)  # 2**-10 s units
        + ng_idb(o, LINKTYPE_LINUX_SLL)
        + ng_epb(o, 0, 3 * 1024 + 512, IP4)
        + ng_spb(o, IP6)
        + ng_pb(o, 1, 7_500_000, sll(IP4, 0x0800))
    )
    a, b, c = read_bytes(data)
    assert (a.ip, a.ts, a.linktype) == (IP4, 1003.5, 101)
    assert (b.ip, b.ts, b.linktype) == (IP6, 0.0, 101)  # SPB: interface 0, no timestamp
    assert (c.ip, c.ts, c.linktype) == (IP4, 7.5, 113)


def test_pcapng_spb_respects_interface_snaplen():
    o = "<"
    data = ng_shb(o) + ng_idb(o, LINKTYPE_RAW, snaplen=24) + ng_spb(o, IP4)
    (p,) = read_bytes(data)
    assert p.ip == IP4[:24]


def test_pcapng_new_section_resets_interfaces_and_byte_order():
    data = (
        ng_shb("<") + ng_idb("<", LINKTYPE_RAW) + ng_epb("<", 0, 1_000_000, IP4)
        + ng_shb(">") + ng_idb(">", LINKTYPE_ETHERNET) + ng_epb(">", 0, 2_000_000, eth(IP6, 0x86DD))
        + ng_epb(">", 1, 0, IP4)
    )
    a, b, c = read_bytes(data)
    assert (a.linktype, a.ip, a.ts) == (101, IP4, 1.0)
    assert (b.linktype, b.ip, b.ts) == (1, IP6, 2.0)
    assert c.error == "packet on undefined interface 1"


def test_pcapng_truncated_final_packet_block():
    o = "<"
    data = ng_shb(o) + ng_idb(o, LINKTYPE_RAW) + ng_epb(o, 0, 5_000_000, IP4) + ng_epb(o, 0, 6_000_000, IP6)
    a, b = read_bytes(data[:-30])
    assert a.ip == IP4
    assert (b.ip, b.error, b.linktype, b.ts) == (None, "truncated record", 101, 6.0)
    # a truncated trailing non-packet block is just the end
    (a,) = read_bytes(data[: -len(ng_epb(o, 0, 6_000_000, IP6))] + ng_block(o, 5, b"\0" * 40)[:-10])
    assert a.ip == IP4


def test_pcapng_corrupt_block_length_stops_with_error():
    o = "<"
    good = ng_shb(o) + ng_idb(o, LINKTYPE_RAW) + ng_epb(o, 0, 0, IP4)
    bad = struct.pack(o + "II", 6, 13) + b"\0" * 40
    pkts = read_bytes(good + bad + ng_epb(o, 0, 0, IP4))
    assert [p.ip for p in pkts] == [IP4, None]
    assert "corrupt pcapng block" in pkts[1].error
    mismatch = bytearray(ng_epb(o, 0, 0, IP4))
    mismatch[-4:] = struct.pack(o + "I", 8)
    pkts = read_bytes(good + bytes(mismatch))
    assert "trailing length mismatch" in pkts[1].error


def test_pcapng_cross_checked_with_scapy_writer(tmp_path):
    f = tmp_path / "scapy.pcapng"
    a = Ether() / Dot1Q(vlan=3) / IP(raw(IP4))
    b = CookedLinux(proto=0x86DD) / IPv6(raw(IP6))
    b.sniffed_on = "any"
    c = CookedLinuxV2(proto=0x0800) / IP(raw(IP4))
    c.sniffed_on = "any2"
    for i, p in enumerate((a, b, c)):
        p.time = 100 + i + 0.75
    w = PcapNgWriter(str(f))
    for p in (a, b, c):
        w.write(p)
    w.close()
    got = list(read_capture(f))
    assert [(p.linktype, p.ip, p.ts) for p in got] == [(1, IP4, 100.75), (113, IP6, 101.75), (276, IP4, 102.75)]


# --------------------------------------------------------------------------- writer


def test_writer_output_is_read_by_scapy(tmp_path):
    f = tmp_path / "w.pcap"
    write_pcap(f, [(1700000000.5, IP4), (1700000001.25, IP6)])
    got = rdpcap(str(f))
    assert [raw(p) for p in got] == [IP4, IP6]
    assert [float(p.time) for p in got] == [1700000000.5, 1700000001.25]
    hdr = f.read_bytes()[:24]
    assert struct.unpack("<IHHiIII", hdr)[0::6] == (0xA1B2C3D4, LINKTYPE_RAW)


def test_pcap_writer_streaming_and_context_manager(tmp_path):
    f = tmp_path / "stream.pcap"
    with PcapWriter.open(f, LINKTYPE_NFLOG, flush_each=True) as w:
        w.write(1.0, nflog_frame(IP4, mark=1, hook=0))
        # flushed: a concurrent reader already sees the complete record
        (p,) = read_capture(f)
        assert (p.ip, p.mark, p.hook) == (IP4, 1, 0)
        w.write(2.0, nflog_frame(IP4, mark=2, hook=4, prefix="out"))
        w.flush()
    assert w.closed
    assert [(p.mark, p.hook) for p in read_capture(f)] == [(1, 0), (2, 4)]
    with pytest.raises(ValueError):
        w.write(3.0, IP4)


def test_pcap_writer_leaves_caller_file_open_and_cuts_at_snaplen():
    buf = io.BytesIO()
    with PcapWriter(buf, LINKTYPE_RAW, snaplen=30) as w:
        w.write(0.9999996, IP4)  # rounds up to 1.000000
    assert not buf.closed
    buf.seek(0)
    (p,) = read_capture(buf)
    assert p.ts == 1.0 and p.ip == IP4[:30]
    buf.seek(24)
    assert struct.unpack("<IIII", buf.read(16)) == (1, 0, 30, len(IP4))


def test_pcap_writer_rejects_bad_timestamps_and_linktypes():
    w = PcapWriter(io.BytesIO())
    for bad in (-1.0, float("nan"), float("inf"), 2.0**33):
        with pytest.raises(ValueError):
            w.write(bad, IP4)
    with pytest.raises(ValueError):
        PcapWriter(io.BytesIO(), 70000)


def test_read_from_path_str_pathlike_and_gzip(tmp_path):
    f = tmp_path / "a.pcap"
    write_pcap(str(f), [(1.0, IP4)])
    assert [p.ip for p in read_capture(str(f))] == [IP4]
    assert [p.ip for p in read_capture(f)] == [IP4]
    gz = tmp_path / "a.pcap.gz"
    gz.write_bytes(gzip.compress(f.read_bytes()))
    assert [p.ip for p in read_capture(gz)] == [IP4]
    with open(gz, "rb") as fh:
        assert [p.ip for p in read_capture(fh)] == [IP4]
        assert not fh.closed


def test_iterator_closes_owned_file(tmp_path):
    f = tmp_path / "a.pcap"
    write_pcap(f, [(1.0, IP4), (2.0, IP4)])
    it = read_capture(f)
    next(it)
    it.close()  # early exit must not leak the descriptor
    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(50):
        list(read_capture(f))
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_nonseekable_stream():
    data = pcap_bytes([(1, 0, IP4)], LINKTYPE_RAW)
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    with os.fdopen(r, "rb", buffering=0) as fh:  # raw unbuffered: short reads possible
        assert [p.ip for p in read_capture(fh)] == [IP4]


# --------------------------------------------------------------------------- fuzzing


def _sample_files() -> list[bytes]:
    o = "<"
    files = [
        pcap_bytes([(1, 0, IP4), (2, 5, IP6)], LINKTYPE_RAW),
        pcap_bytes([(1, 0, eth(IP4, 0x0800, ((0x8100, 1),))), (2, 0, eth(b"\0" * 28, 0x0806))], 1, order=">"),
        pcap_bytes([(1, 0, nflog_frame(IP4, mark=0x42, hook=3, prefix="l2m"))], LINKTYPE_NFLOG, nano=True),
        pcap_bytes([(1, 0, sll(IP4, 0x0800)), (2, 0, sll(IP6, 0x86DD))], LINKTYPE_LINUX_SLL),
        pcap_bytes([(1, 0, sll2(IP6, 0x86DD))], LINKTYPE_LINUX_SLL2),
        pcap_bytes([(1, 0, (2).to_bytes(4, "little") + IP4)], 0),
        REAL_NFLOG_PCAP,
        ng_shb(o) + ng_idb(o, 1) + ng_idb(o, 239, tsresol=9) + ng_epb(o, 0, 1, eth(IP4, 0x0800))
        + ng_epb(o, 1, 2, nflog_frame(IP6, mark=1, hook=2, family=10)) + ng_spb(o, eth(IP6, 0x86DD))
        + ng_pb(o, 1, 3, nflog_frame(IP4, mark=None, hook=None)),
        ng_shb(">") + ng_idb(">", 101, tsresol=0x85, tsoffset=-5) + ng_epb(">", 0, 99, IP4)
        + ng_shb("<") + ng_idb("<", 113) + ng_epb("<", 0, 1, sll(IP4, 0x0800)),
    ]
    files.append(gzip.compress(files[0]))
    files.append(gzip.compress(files[7]))
    return files


SAMPLES = _sample_files()
MAGICS = [b"", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\x0a\x0d\x0d\x0a",
          b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x4d\x3c\x2b\x1a", b"\x1f\x8b"]


def _consume(data: bytes) -> None:
    with strict_decoding():
        try:
            it = read_capture(io.BytesIO(data))
        except CaptureError as e:
            assert str(e)
            return
        expected_no = 1
        try:
            for p in it:
                assert isinstance(p, CapturedPacket)
                assert p.no == expected_no
                expected_no += 1
                assert isinstance(p.ts, float) and isinstance(p.linktype, int)
                assert (p.ip is None) == (p.error is not None), p
                if p.ip is not None:
                    assert p.ip[0] >> 4 in (4, 6)
                assert p.mark is None or 0 <= p.mark <= 0xFFFFFFFF
                assert p.hook is None or 0 <= p.hook <= 255
        except CaptureError as e:
            assert str(e)


def test_all_samples_are_valid():
    for data in SAMPLES:
        pkts = read_bytes(data)
        assert pkts and all(p.error is None or "ethertype 0x0806" in p.error for p in pkts), pkts


FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(prefix=st.sampled_from(MAGICS), body=st.binary(max_size=600))
def test_fuzz_random_bytes(prefix, body):
    _consume(prefix + body)


@FUZZ
@given(data=st.sampled_from(SAMPLES), frac=st.floats(0.0, 1.0))
def test_fuzz_truncated_valid_files(data, frac):
    _consume(data[: int(len(data) * frac)])


@FUZZ
@given(
    data=st.sampled_from(SAMPLES),
    edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
    frac=st.floats(0.0, 1.0),
)
def test_fuzz_mutated_valid_files(data, edits, frac):
    buf = bytearray(data)
    for where, value in edits:
        buf[int(where * len(buf))] = value
    _consume(bytes(buf[: max(1, int(len(buf) * frac))] if frac < 1.0 else buf))


# --------------------------------------------------------------------------- real NFLOG capture (root)


def _real_nflog_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace, iptables-legacy and tcpdump on nflog:)"
    for tool in ("ip", "iptables-legacy", "tcpdump"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.mark.lab
@pytest.mark.skipif(_real_nflog_skip_reason() is not None, reason=_real_nflog_skip_reason() or "")
def test_real_nflog_capture_has_mark_and_hook(tmp_path):
    ns = f"capio-test-{os.getpid()}"
    out = tmp_path / "nflog.pcap"
    tcpdump: subprocess.Popen | None = None
    r = _run("ip", "netns", "add", ns)
    if r.returncode != 0:
        pytest.skip(f"cannot create network namespace: {r.stderr.strip()}")
    try:
        setup = [
            ("ip", "link", "set", "lo", "up"),
            ("iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "1701",
             "-j", "MARK", "--set-mark", "0x42"),
            ("iptables-legacy", "-A", "OUTPUT", "-p", "udp", "--dport", "1701",
             "-j", "NFLOG", "--nflog-group", "7", "--nflog-prefix", "l2m"),
        ]
        for cmd in setup:
            r = _run("ip", "netns", "exec", ns, *cmd)
            if r.returncode != 0:
                pytest.skip(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
        # `ip netns exec` execs tcpdump, so this PID is tcpdump's own.
        tcpdump = subprocess.Popen(
            ["ip", "netns", "exec", ns, "tcpdump", "-n", "-U", "-c", "1", "-i", "nflog:7", "-w", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        assert tcpdump.stderr is not None
        errtext = b""
        deadline = time.monotonic() + 15
        while b"listening on" not in errtext:
            if tcpdump.poll() is not None or time.monotonic() > deadline:
                errtext += tcpdump.stderr.read() if tcpdump.poll() is not None else b""
                pytest.skip(f"tcpdump did not start on nflog:7: {errtext.decode(errors='replace').strip()}")
            ready, _, _ = select.select([tcpdump.stderr], [], [], 0.2)
            if ready:
                errtext += os.read(tcpdump.stderr.fileno(), 4096)
        send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.sendto(b'capio-probe', ('127.0.0.1', 1701))")
        r = _run("ip", "netns", "exec", ns, sys.executable, "-c", send)
        assert r.returncode == 0, r.stderr
        # The kernel batches NFLOG messages (flush timeout 1 s by default); -c 1 ends tcpdump.
        tcpdump.wait(timeout=20)
        pkts = list(read_capture(out))
    finally:
        if tcpdump is not None and tcpdump.poll() is None:
            tcpdump.terminate()
            try:
                tcpdump.wait(timeout=5)
            except subprocess.TimeoutExpired:
                tcpdump.kill()
                tcpdump.wait(timeout=5)
        if tcpdump is not None and tcpdump.stderr is not None:
            tcpdump.stderr.close()
        _run("ip", "netns", "del", ns)
    assert len(pkts) == 1
    (p,) = pkts
    assert (p.linktype, p.mark, p.hook, p.prefix, p.error) == (LINKTYPE_NFLOG, 0x42, NF_INET_LOCAL_OUT, "l2m", None)
    pkt = IP(p.ip)
    assert pkt.src == pkt.dst == "127.0.0.1"
    assert pkt[UDP].dport == 1701 and bytes(pkt[UDP].payload) == b"capio-probe"
    assert len(p.ip) == pkt.len
