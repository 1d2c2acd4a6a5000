"""Scapy L2TPv2 layers: exact bytes against RFC 2661 layouts, dissection, hidden AVPs."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2tp import L2TP
from scapy.layers.ppp import HDLC, PPP
from scapy.packet import Padding, Raw

from l2tp_marker import constants as C
from l2tp_marker.hiding import hide
from l2tp_marker.layers import (
    AVPAssignedSessionID, AVPAssignedTunnelID, AVPBearerCapabilities, AVPCallSerialNumber,
    AVPChallenge, AVPChallengeResponse, AVPFirmwareRevision, AVPFramingCapabilities,
    AVPFramingType, AVPHidden, AVPHostName, AVPMessageType, AVPProtocolVersion,
    AVPQ931CauseCode, AVPRandomVector, AVPReceiveWindowSize, AVPResultCode, AVPRxConnectSpeed,
    AVPTieBreaker, AVPTxConnectSpeed, AVPVendorName, L2TPAVP, L2TPv2, name_of, reveal,
)

SECRET = b"tunnel-secret"

# SCCRQ as a Windows client sends it, laid out by hand from RFC 2661 3.1 / 4.1 / 4.4.
SCCRQ_HEX = (
    "c802 0066 0000 0000 0000 0000"          # T L S ver=2, length 102, tunnel 0, session 0, Ns, Nr
    "8008 0000 0000 0001"                    # M, len 8, Message Type = SCCRQ
    "8008 0000 0002 0100"                    # Protocol Version 1.0
    "800a 0000 0003 00000003"                # Framing Capabilities = sync|async
    "800a 0000 0004 00000000"                # Bearer Capabilities
    "0008 0000 0006 0600"                    # Firmware Revision (M=0)
    "800f 0000 0007 77696e636c69656e74"      # Host Name "winclient"
    "000f 0000 0008 4d6963726f736f6674"      # Vendor Name "Microsoft" (M=0)
    "8008 0000 0009 0001"                    # Assigned Tunnel ID 1
    "8008 0000 000a 0008"                    # Receive Window Size 8
)
ZLB_HEX = "c802 000c 0001 0000 0003 0002"     # tunnel 1, Ns 3, Nr 2, no AVPs


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def _sccrq() -> L2TPv2:
    return L2TPv2(avps=[
        AVPMessageType(msg_type=C.SCCRQ), AVPProtocolVersion(), AVPFramingCapabilities(),
        AVPBearerCapabilities(), AVPFirmwareRevision(firmware=0x0600),
        AVPHostName(hostname=b"winclient"), AVPVendorName(vendor_name=b"Microsoft"),
        AVPAssignedTunnelID(tunnel_id=1), AVPReceiveWindowSize(window=8),
    ])


MESSAGES = {
    "SCCRQ": _sccrq(),
    "SCCRP": L2TPv2(tunnel_id=1, nr=1, avps=[
        AVPMessageType(msg_type=C.SCCRP), AVPProtocolVersion(), AVPFramingCapabilities(),
        AVPHostName(hostname=b"lns"), AVPAssignedTunnelID(tunnel_id=0x4D2),
        AVPReceiveWindowSize(window=4), AVPChallenge(challenge=b"0123456789abcdef"),
        AVPChallengeResponse(response=bytes(range(16))),
        AVPTieBreaker(tie_breaker=b"\x01\x02\x03\x04\x05\x06\x07\x08"),
    ]),
    "SCCCN": L2TPv2(tunnel_id=0x4D2, ns=1, nr=1, avps=[
        AVPMessageType(msg_type=C.SCCCN), AVPChallengeResponse(response=b"R" * 16),
    ]),
    "StopCCN": L2TPv2(tunnel_id=0x4D2, ns=2, nr=1, avps=[
        AVPMessageType(msg_type=C.STOPCCN), AVPAssignedTunnelID(tunnel_id=1),
        AVPResultCode(result_code=2, error_code=6, error_message=b"bye"),
    ]),
    "HELLO": L2TPv2(tunnel_id=1, ns=5, nr=4, avps=[AVPMessageType(msg_type=C.HELLO)]),
    "ICRQ": L2TPv2(tunnel_id=0x4D2, ns=2, nr=1, avps=[
        AVPMessageType(msg_type=C.ICRQ), AVPAssignedSessionID(session_id=7),
        AVPCallSerialNumber(serial=0xDEADBEEF),
        L2TPAVP(m=1, attr_type=18, value=b"\x00\x00\x00\x01"),  # Bearer Type, kept raw
    ]),
    "ICRP": L2TPv2(tunnel_id=1, session_id=7, ns=1, nr=3, avps=[
        AVPMessageType(msg_type=C.ICRP), AVPAssignedSessionID(session_id=99),
    ]),
    "ICCN": L2TPv2(tunnel_id=0x4D2, session_id=99, ns=3, nr=2, avps=[
        AVPMessageType(msg_type=C.ICCN), AVPTxConnectSpeed(speed=100_000_000),
        AVPFramingType(framing=1), AVPRxConnectSpeed(speed=10_000_000),
    ]),
    "CDN": L2TPv2(tunnel_id=0x4D2, session_id=99, ns=4, nr=2, avps=[
        AVPMessageType(msg_type=C.CDN), AVPResultCode(result_code=3),
        AVPAssignedSessionID(session_id=7),
        AVPQ931CauseCode(cause_code=16, msg_code=0x5A, advisory=b"normal"),
    ]),
    "ZLB": L2TPv2(tunnel_id=1, ns=3, nr=2),
}
EXPECTED_TYPES = {
    "SCCRQ": C.SCCRQ, "SCCRP": C.SCCRP, "SCCCN": C.SCCCN, "StopCCN": C.STOPCCN, "HELLO": C.HELLO,
    "ICRQ": C.ICRQ, "ICRP": C.ICRP, "ICCN": C.ICCN, "CDN": C.CDN, "ZLB": None,
}


def _assert_same_avp(got: L2TPAVP, want: L2TPAVP) -> None:
    assert type(got) is type(want)
    assert got.length == len(bytes(want))
    for field in want.fields_desc:
        if field.name != "length":
            assert got.getfieldval(field.name) == want.getfieldval(field.name), field.name


# --- exact bytes -----------------------------------------------------------------------


def test_sccrq_bytes_match_rfc_layout():
    assert bytes(_sccrq()) == _hex(SCCRQ_HEX)


def test_zlb_bytes_match_rfc_layout():
    assert bytes(MESSAGES["ZLB"]) == _hex(ZLB_HEX)


def test_sccrq_dissects_every_field():
    msg = L2TPv2(_hex(SCCRQ_HEX))
    assert (msg.t, msg.l, msg.x1, msg.s, msg.x2, msg.o, msg.p, msg.x3, msg.ver) == (
        1, 1, 0, 1, 0, 0, 0, 0, 2)
    assert (msg.length, msg.tunnel_id, msg.session_id, msg.ns, msg.nr) == (102, 0, 0, 0, 0)
    assert msg.msg_type == C.SCCRQ
    for got, want in zip(msg.avps, _sccrq().avps, strict=True):
        _assert_same_avp(got, want)
    avps = msg.avps
    assert avps[1].version == 1 and avps[1].revision == 0
    assert avps[2].framing == 3
    assert avps[4].m == 0 and avps[4].firmware == 0x0600
    assert avps[5].hostname == b"winclient"
    assert avps[6].vendor_name == b"Microsoft"
    assert avps[7].tunnel_id == 1
    assert avps[8].window == 8


def test_zlb_dissects_without_avps():
    msg = L2TPv2(_hex(ZLB_HEX))
    assert (msg.length, msg.tunnel_id, msg.ns, msg.nr) == (12, 1, 3, 2)
    assert msg.avps == []
    assert msg.msg_type is None
    assert "ZLB" in msg.summary()


@pytest.mark.parametrize("name", list(MESSAGES))
def test_message_round_trip(name):
    built = MESSAGES[name]
    wire = bytes(built)
    assert struct.unpack("!H", wire[2:4])[0] == len(wire)
    msg = L2TPv2(wire)
    assert msg.msg_type == EXPECTED_TYPES[name]
    assert (msg.tunnel_id, msg.session_id, msg.ns, msg.nr) == (
        built.tunnel_id, built.session_id, built.ns, built.nr)
    assert len(msg.avps) == len(built.avps)
    for got, want in zip(msg.avps, built.avps):
        _assert_same_avp(got, want)
    assert bytes(msg) == wire


def test_result_code_optional_parts():
    short = L2TPv2(bytes(MESSAGES["CDN"])).avps[1]
    assert short.length == 8 and short.result_code == 3
    assert short.getfieldval("error_code") is None and short.error_message == b""
    full = L2TPv2(bytes(MESSAGES["StopCCN"])).avps[2]
    assert (full.length, full.result_code, full.error_code, full.error_message) == (
        13, 2, 6, b"bye")
    code_only = AVPResultCode(result_code=1, error_code=0)
    assert bytes(code_only) == _hex("800a 0000 0001 0001 0000")


def test_q931_cause_code_fields():
    avp = L2TPv2(bytes(MESSAGES["CDN"])).avps[3]
    assert (avp.cause_code, avp.msg_code, avp.advisory) == (16, 0x5A, b"normal")


def test_mandatory_bit_defaults_follow_rfc():
    optional = {AVPTieBreaker, AVPFirmwareRevision, AVPVendorName, AVPRxConnectSpeed}
    classes = [AVPMessageType, AVPResultCode, AVPProtocolVersion, AVPFramingCapabilities,
               AVPBearerCapabilities, AVPTieBreaker, AVPFirmwareRevision, AVPHostName,
               AVPVendorName, AVPAssignedTunnelID, AVPReceiveWindowSize, AVPChallenge,
               AVPChallengeResponse, AVPQ931CauseCode, AVPAssignedSessionID,
               AVPCallSerialNumber, AVPFramingType, AVPTxConnectSpeed, AVPRxConnectSpeed,
               AVPRandomVector]
    for cls in classes:
        avp = cls()
        assert avp.m == (0 if cls in optional else 1), cls.__name__
        assert avp.h == 0 and avp.vendor_id == 0
        assert C.AVP_TYPES[avp.attr_type] == name_of(avp.attr_type)
        assert type(L2TPAVP(bytes(avp))) is cls


# --- lengths ---------------------------------------------------------------------------


def test_lengths_computed_when_none_and_kept_when_explicit():
    assert bytes(AVPHostName(hostname=b"abc"))[:2] == b"\x80\x09"
    assert bytes(AVPHostName(length=20, hostname=b"abc"))[:2] == b"\x80\x14"
    assert bytes(L2TPv2(length=99))[2:4] == b"\x00\x63"
    assert bytes(L2TPv2(l=0))[:2] == b"\x88\x02" and len(bytes(L2TPv2(l=0))) == 10


def test_avp_longer_than_length_field_is_refused():
    with pytest.raises(ValueError, match="limit is 1023"):
        bytes(AVPHostName(hostname=b"x" * 1018))


def test_trailing_bytes_after_length_are_padding():
    msg = L2TPv2(bytes(MESSAGES["HELLO"]) + b"\x00\x00\xff")
    assert msg.msg_type == C.HELLO and len(msg.avps) == 1
    assert msg[Padding].load == b"\x00\x00\xff"


# --- IP / UDP binding ------------------------------------------------------------------


def test_ip_udp_round_trip_dissects_avps():
    pkt = IP(src="192.0.2.10", dst="198.51.100.1") / UDP(sport=1701, dport=1701) / _sccrq()
    wire = bytes(pkt)
    back = IP(wire)
    assert L2TP not in back
    msg = back[L2TPv2]
    assert msg.msg_type == C.SCCRQ
    assert bytes(msg) == _hex(SCCRQ_HEX)
    assert back[UDP].len == 8 + len(_hex(SCCRQ_HEX))
    assert bytes(back) == wire


def test_udp_builds_with_l2tp_ports():
    assert bytes(UDP() / L2TPv2())[:4] == b"\x06\xa5\x06\xa5"


@pytest.mark.parametrize("ports", [(1701, 50000), (50000, 1701)])
def test_either_port_1701_dissects_as_l2tpv2(ports):
    sport, dport = ports
    back = IP(bytes(IP() / UDP(sport=sport, dport=dport) / MESSAGES["HELLO"]))
    assert back[L2TPv2].msg_type == C.HELLO


# --- data messages ---------------------------------------------------------------------


def test_data_message_carries_ppp():
    data = L2TPv2(t=0, l=0, s=0, tunnel_id=1, session_id=2) / HDLC() / PPP() / IP(
        src="10.0.0.2", dst="10.0.0.1") / ICMP()
    wire = bytes(data)
    assert wire[:8] == _hex("0002 0001 0002 ff03")
    assert wire[8:10] == b"\x00\x21"
    back = L2TPv2(wire)
    assert back.t == 0 and back.msg_type is None and "data" in back.mysummary()
    assert back[HDLC].address == 0xFF and back[PPP].proto == 0x21
    assert back[ICMP].type == 8
    assert bytes(back) == wire


def test_data_message_over_udp_with_length_and_sequence():
    inner = IP(src="10.0.0.2", dst="10.0.0.1") / ICMP()
    data = L2TPv2(t=0, l=1, s=1, tunnel_id=3, session_id=4, ns=1, nr=0) / HDLC() / PPP() / inner
    back = IP(bytes(IP() / UDP(sport=1701, dport=1701) / data))
    msg = back[L2TPv2]
    assert msg.length == 12 + 4 + len(bytes(inner))
    assert bytes(back[ICMP]) == bytes(inner[ICMP])


def test_data_message_length_splits_off_padding():
    data = L2TPv2(t=0, l=1, s=0, tunnel_id=3, session_id=4) / PPP(proto=0xC021) / Raw(b"lcp")
    msg = L2TPv2(bytes(data) + b"junk")
    assert msg[PPP].proto == 0xC021 and msg[Raw].load == b"lcp"
    assert msg[Padding].load == b"junk"


def test_l2tpv2_over_hdlc_defaults_to_data():
    assert L2TPv2(bytes(L2TPv2() / HDLC() / PPP())).t == 0


def test_offset_field():
    data = L2TPv2(t=0, l=0, s=0, o=1, offset_pad=b"\x00\x00\x00") / HDLC() / PPP()
    wire = bytes(data)
    assert wire[:11] == _hex("0202 0000 0000 0003 000000")
    back = L2TPv2(wire)
    assert back.offset_size == 3 and back.offset_pad == b"\x00" * 3 and PPP in back


# --- raw AVPs --------------------------------------------------------------------------


def test_vendor_avp_stays_raw():
    vendor = L2TPAVP(vendor_id=311, attr_type=9, value=b"\x01\x02\x03")
    msg = L2TPv2(bytes(L2TPv2(avps=[AVPMessageType(msg_type=C.HELLO), vendor])))
    avp = msg.avps[1]
    assert type(avp) is L2TPAVP
    assert (avp.vendor_id, avp.attr_type, avp.length, avp.value) == (311, 9, 9, b"\x01\x02\x03")
    assert "vendor-311-type-9" in avp.summary()


def test_unknown_and_undecoded_avps_stay_raw_with_name():
    avps = [AVPMessageType(msg_type=C.ICRQ),
            L2TPAVP(attr_type=39, value=b""),          # Sequencing Required: no subclass
            L2TPAVP(m=1, attr_type=500, value=b"??")]  # not in RFC 2661
    msg = L2TPv2(bytes(L2TPv2(avps=avps)))
    seq, unknown = msg.avps[1:]
    assert type(seq) is L2TPAVP and seq.value == b""
    assert "Sequencing Required" in seq.summary()
    assert type(unknown) is L2TPAVP and unknown.value == b"??" and unknown.m == 1
    assert "AVP-500" in unknown.summary()


def test_name_of_covers_every_rfc_type():
    for number, name in C.AVP_TYPES.items():
        assert name_of(number) == name
        assert name in L2TPAVP(attr_type=number).summary()


def test_wrong_sized_known_avp_stays_raw_and_list_continues():
    bad = struct.pack("!HHH", 0x8000 | 9, 0, C.AVP_ASSIGNED_TUNNEL_ID) + b"\x00\x01\x02"
    body = bytes(AVPMessageType(msg_type=C.SCCRP)) + bad + bytes(AVPHostName(hostname=b"h"))
    msg = L2TPv2(struct.pack("!6H", 0xC802, 12 + len(body), 0, 0, 0, 0) + body)
    assert [type(a) for a in msg.avps] == [AVPMessageType, L2TPAVP, AVPHostName]
    assert msg.avps[1].value == b"\x00\x01\x02"


def test_many_avps_dissect():
    avps = [AVPMessageType(msg_type=C.HELLO)] + [L2TPAVP(attr_type=500) for _ in range(300)]
    assert len(L2TPv2(bytes(L2TPv2(avps=avps))).avps) == 301


# --- robustness ------------------------------------------------------------------------


def test_truncated_input_does_not_raise():
    wire = bytes(IP() / UDP(sport=1701, dport=1701) / MESSAGES["StopCCN"])
    for end in range(20, len(wire)):
        IP(wire[:end])
    msg = bytes(MESSAGES["SCCRP"])
    for end in range(12, len(msg)):
        L2TPv2(msg[:end]).summary()


@pytest.mark.parametrize("bogus", [0, 1, 5, 6, 7, 1023])
def test_bogus_avp_length_does_not_raise_or_loop(bogus):
    body = struct.pack("!HHH", 0x8000 | bogus, 0, 9) + b"\x00\x01" + bytes(AVPMessageType())
    msg = L2TPv2(struct.pack("!6H", 0xC802, 12 + len(body), 0, 0, 0, 0) + body)
    assert msg.avps and msg.summary()


# --- hidden AVPs -----------------------------------------------------------------------


def _icrq_with_hidden(vector: bytes = b"V" * 16) -> IP:
    msg = L2TPv2(tunnel_id=0x4D2, ns=2, nr=1, avps=[
        AVPMessageType(msg_type=C.ICRQ),
        AVPRandomVector(vector=vector),
        AVPHidden(m=1, attr_type=C.AVP_ASSIGNED_SESSION_ID,
                  value=hide(C.AVP_ASSIGNED_SESSION_ID, b"\x12\x34", SECRET, vector, pad_to=16)),
        AVPCallSerialNumber(serial=5),
    ])
    return IP(src="192.0.2.10", dst="198.51.100.1") / UDP(sport=1701, dport=1701) / msg


def test_hidden_avp_dissects_as_avphidden():
    msg = IP(bytes(_icrq_with_hidden()))[L2TPv2]
    hidden = msg.avps[2]
    assert type(hidden) is AVPHidden
    assert hidden.h == 1 and hidden.attr_type == C.AVP_ASSIGNED_SESSION_ID
    assert len(hidden.value) == 16 and hidden.length == 22
    assert "Assigned Session ID" in hidden.summary() and "hidden" in hidden.summary()
    assert type(msg.avps[3]) is AVPCallSerialNumber


def test_reveal_decodes_hidden_avp():
    captured = IP(bytes(_icrq_with_hidden()))
    shown = reveal(captured, SECRET)
    avp = shown[L2TPv2].avps[2]
    assert type(avp) is AVPAssignedSessionID
    assert avp.session_id == 0x1234 and avp.h == 0 and avp.m == 1 and avp.length == 8
    assert avp.was_hidden and avp.copy().was_hidden
    assert "revealed" in avp.summary()
    assert not shown[L2TPv2].avps[3].was_hidden
    assert type(captured[L2TPv2].avps[2]) is AVPHidden  # the input is untouched
    rebuilt = IP(bytes(shown))
    assert rebuilt[UDP].len == len(bytes(rebuilt[UDP]))
    assert rebuilt[L2TPv2].length == len(bytes(rebuilt[L2TPv2]))
    assert rebuilt[L2TPv2].avps[2].session_id == 0x1234


def test_reveal_uses_most_recent_random_vector():
    first, second = b"A" * 16, b"B" * 16
    msg = L2TPv2(avps=[
        AVPMessageType(msg_type=C.ICRQ),
        AVPRandomVector(vector=first),
        AVPHidden(attr_type=C.AVP_ASSIGNED_SESSION_ID,
                  value=hide(C.AVP_ASSIGNED_SESSION_ID, b"\x00\x07", SECRET, first)),
        AVPRandomVector(vector=second),
        AVPHidden(m=1, attr_type=7, value=hide(7, b"host.example", SECRET, second)),
    ])
    avps = reveal(L2TPv2(bytes(msg)), SECRET).avps
    assert avps[2].session_id == 7
    assert type(avps[4]) is AVPHostName and avps[4].hostname == b"host.example"


def test_reveal_vendor_hidden_avp_stays_raw_but_clear():
    vector = b"R" * 8
    hidden = AVPHidden(vendor_id=311, attr_type=3, value=hide(3, b"abc", SECRET, vector))
    msg = L2TPv2(avps=[AVPMessageType(msg_type=C.HELLO), AVPRandomVector(vector=vector), hidden])
    avp = reveal(L2TPv2(bytes(msg)), SECRET).avps[2]
    assert type(avp) is L2TPAVP and avp.vendor_id == 311 and avp.value == b"abc"


def test_hidden_avp_without_secret_or_vector_stays_hidden():
    captured = IP(bytes(_icrq_with_hidden()))
    assert type(reveal(captured, b"not-the-secret")[L2TPv2].avps[2]) is AVPHidden
    no_vector = L2TPv2(avps=[AVPMessageType(msg_type=C.ICRQ),
                             AVPHidden(attr_type=14, value=b"\x00\x02\x00\x01")])
    assert type(reveal(L2TPv2(bytes(no_vector)), SECRET).avps[1]) is AVPHidden


def test_reveal_ignores_data_messages():
    data = L2TPv2(t=0, l=0, s=0) / HDLC() / PPP()
    assert bytes(reveal(data, SECRET)) == bytes(data)
