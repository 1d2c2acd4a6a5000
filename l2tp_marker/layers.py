"""Scapy layers for L2TPv2 (RFC 2661): full header, control-message AVPs, hidden AVPs.

* `L2TPv2` is the header of RFC 2661 section 3.1.  Control messages (T=1) carry
  a list of AVPs; a control message without AVPs is a ZLB acknowledgement
  (section 5.8).  Data messages (T=0) carry a PPP frame, dissected with
  scapy's `scapy.layers.ppp` (an `HDLC` ff 03 address/control prefix is
  recognised by `PPP`).
* `L2TPAVP` is the AVP of section 4.1.  When dissecting, IETF AVPs (vendor 0)
  that are not hidden and whose value has a valid size become the decoded
  subclasses below (section 4.4); hidden AVPs (H=1, section 4.3) become
  `AVPHidden`; vendor-specific, unknown and malformed AVPs stay `L2TPAVP`
  with their raw `value`.
* `reveal()` decodes hidden AVPs given the tunnel secret (section 4.3).

Importing this module replaces scapy's header-only `scapy.layers.l2tp.L2TP`
binding on UDP port 1701 with `L2TPv2`, so `IP(raw)` of a captured control
message dissects down to its AVPs.
"""

from __future__ import annotations

import struct

from scapy.fields import (
    BitField, ByteField, ConditionalField, FieldLenField, IntField, PacketListField,
    ShortEnumField, ShortField, StrFixedLenField, StrLenField,
)
from scapy.layers.inet import UDP
from scapy.layers.l2tp import L2TP
from scapy.layers.ppp import HDLC, PPP
from scapy.packet import Packet, bind_bottom_up, bind_layers, bind_top_down, split_layers

from l2tp_marker.constants import (
    AVP_FLAG_H, AVP_HEADER_LEN, AVP_LENGTH_MASK, AVP_TYPES, L2TP_PORT, MESSAGE_TYPES,
    message_name,
)
from l2tp_marker.hiding import unhide

__all__ = [
    "L2TPv2", "L2TPAVP", "AVPHidden", "name_of", "reveal",
    "AVPMessageType", "AVPResultCode", "AVPProtocolVersion", "AVPFramingCapabilities",
    "AVPBearerCapabilities", "AVPTieBreaker", "AVPFirmwareRevision", "AVPHostName",
    "AVPVendorName", "AVPAssignedTunnelID", "AVPReceiveWindowSize", "AVPChallenge",
    "AVPChallengeResponse", "AVPQ931CauseCode", "AVPAssignedSessionID", "AVPCallSerialNumber",
    "AVPFramingType", "AVPTxConnectSpeed", "AVPRxConnectSpeed", "AVPRandomVector",
]

_TYPE_BY_NAME = {name: number for number, name in AVP_TYPES.items()}
_AVP_HEADER_FIELDS = 6  # m, h, rsvd, length, vendor_id, attr_type
# Upper bound on the AVPs of one message (65535-octet message of 6-octet AVPs).
_MAX_AVPS = 0xFFFF // AVP_HEADER_LEN


def name_of(attr_type: int, vendor_id: int = 0) -> str:
    """Readable name of an AVP type (RFC 2661 section 4.4 names for vendor 0)."""
    if vendor_id:
        return f"vendor-{vendor_id}-type-{attr_type}"
    return AVP_TYPES.get(attr_type, f"AVP-{attr_type}")


# --- AVPs (RFC 2661 section 4.1) ---------------------------------------------------------


class _AttrTypeField(ShortEnumField):
    """Attribute Type; shown with its RFC 2661 name only when the vendor is IETF (0)."""

    def i2repr(self, pkt, x):
        if pkt is not None and pkt.vendor_id:
            return repr(x)
        return super().i2repr(pkt, x)


def _avp_header(attr_name: str | None, m: int, h: int = 0) -> list:
    """The six-octet AVP header fields, with the given defaults."""
    return [
        BitField("m", m, 1),
        BitField("h", h, 1),
        BitField("rsvd", 0, 4),
        BitField("length", None, 10),
        ShortField("vendor_id", 0),
        _AttrTypeField("attr_type", _TYPE_BY_NAME[attr_name] if attr_name else 0, AVP_TYPES),
    ]


def _value_len(pkt: Packet, used: int = 0) -> int:
    """Octets of value left after the header and `used` decoded octets."""
    return max((pkt.length or 0) - AVP_HEADER_LEN - used, 0)


class L2TPAVP(Packet):
    """One AVP, value kept raw.  Dissecting dispatches to the decoded subclasses.

    `was_hidden` is True only on AVPs that `reveal()` decoded from a hidden AVP.
    """

    name = "L2TP AVP"
    fields_desc = _avp_header(None, m=0) + [
        StrLenField("value", b"", length_from=_value_len),
    ]
    # (minimum, maximum) value size a decoded subclass accepts; None = unbounded.
    value_size: tuple[int, int | None] = (0, None)
    was_hidden = False

    @classmethod
    def dispatch_hook(cls, _pkt=None, *args, **kargs):
        if cls is not L2TPAVP or not _pkt or len(_pkt) < AVP_HEADER_LEN:
            return cls
        flags_len, vendor_id, attr_type = struct.unpack("!HHH", _pkt[:AVP_HEADER_LEN])
        if flags_len & AVP_FLAG_H:
            return AVPHidden
        decoded = _DECODED.get(attr_type) if vendor_id == 0 else None
        if decoded is None:
            return cls
        size = (flags_len & AVP_LENGTH_MASK) - AVP_HEADER_LEN
        low, high = decoded.value_size
        if size < low or (high is not None and size > high):
            return cls
        return decoded

    def post_build(self, pkt, pay):
        if self.length is None:
            if len(pkt) > AVP_LENGTH_MASK:
                raise ValueError(f"{name_of(self.attr_type, self.vendor_id)} AVP is "
                                 f"{len(pkt)} octets; the limit is {AVP_LENGTH_MASK}")
            flags = struct.unpack("!H", pkt[:2])[0] & ~AVP_LENGTH_MASK
            pkt = struct.pack("!H", flags | len(pkt)) + pkt[2:]
        return pkt + pay

    def extract_padding(self, s):
        return b"", s

    def copy(self):
        clone = super().copy()
        clone.was_hidden = self.was_hidden
        return clone

    def mysummary(self):
        parts = [name_of(self.attr_type, self.vendor_id)]
        if self.h:
            parts.append("hidden")
        if self.was_hidden:
            parts.append("revealed")
        for fld in self.fields_desc[_AVP_HEADER_FIELDS:]:
            value = self.getfieldval(fld.name)
            if value is not None:
                parts.append(f"{fld.name}={fld.i2repr(self, value)}")
        return "AVP " + " ".join(parts)


class AVPHidden(L2TPAVP):
    """An AVP with H=1: `value` is the hidden subformat (see `hiding` and `reveal`)."""

    name = "L2TP AVP (hidden)"
    fields_desc = _avp_header(None, m=0, h=1) + [
        StrLenField("value", b"", length_from=_value_len),
    ]


class AVPMessageType(L2TPAVP):
    name = "L2TP AVP Message Type"
    fields_desc = _avp_header("Message Type", m=1) + [ShortEnumField("msg_type", 0, MESSAGE_TYPES)]
    value_size = (2, 2)


def _has_error_code(pkt: Packet) -> bool:
    if pkt.length is None:  # building: present when given
        return pkt.getfieldval("error_code") is not None
    return pkt.length >= AVP_HEADER_LEN + 4


class AVPResultCode(L2TPAVP):
    """Result Code (4.4.2): result code, optional error code, optional error message."""

    name = "L2TP AVP Result Code"
    fields_desc = _avp_header("Result Code", m=1) + [
        ShortField("result_code", 0),
        ConditionalField(ShortField("error_code", None), _has_error_code),
        StrLenField("error_message", b"",
                    length_from=lambda pkt: _value_len(pkt, 4 if _has_error_code(pkt) else 2)),
    ]
    value_size = (2, None)


class AVPProtocolVersion(L2TPAVP):
    name = "L2TP AVP Protocol Version"
    fields_desc = _avp_header("Protocol Version", m=1) + [
        ByteField("version", 1), ByteField("revision", 0),
    ]
    value_size = (2, 2)


class AVPFramingCapabilities(L2TPAVP):
    name = "L2TP AVP Framing Capabilities"
    fields_desc = _avp_header("Framing Capabilities", m=1) + [IntField("framing", 3)]
    value_size = (4, 4)


class AVPBearerCapabilities(L2TPAVP):
    name = "L2TP AVP Bearer Capabilities"
    fields_desc = _avp_header("Bearer Capabilities", m=1) + [IntField("bearer", 0)]
    value_size = (4, 4)


class AVPTieBreaker(L2TPAVP):
    name = "L2TP AVP Tie Breaker"
    fields_desc = _avp_header("Tie Breaker", m=0) + [StrFixedLenField("tie_breaker", b"\0" * 8, 8)]
    value_size = (8, 8)


class AVPFirmwareRevision(L2TPAVP):
    name = "L2TP AVP Firmware Revision"
    fields_desc = _avp_header("Firmware Revision", m=0) + [ShortField("firmware", 0)]
    value_size = (2, 2)


class AVPHostName(L2TPAVP):
    name = "L2TP AVP Host Name"
    fields_desc = _avp_header("Host Name", m=1) + [
        StrLenField("hostname", b"", length_from=_value_len),
    ]


class AVPVendorName(L2TPAVP):
    name = "L2TP AVP Vendor Name"
    fields_desc = _avp_header("Vendor Name", m=0) + [
        StrLenField("vendor_name", b"", length_from=_value_len),
    ]


class AVPAssignedTunnelID(L2TPAVP):
    name = "L2TP AVP Assigned Tunnel ID"
    fields_desc = _avp_header("Assigned Tunnel ID", m=1) + [ShortField("tunnel_id", 0)]
    value_size = (2, 2)


class AVPReceiveWindowSize(L2TPAVP):
    name = "L2TP AVP Receive Window Size"
    fields_desc = _avp_header("Receive Window Size", m=1) + [ShortField("window", 4)]
    value_size = (2, 2)


class AVPChallenge(L2TPAVP):
    name = "L2TP AVP Challenge"
    fields_desc = _avp_header("Challenge", m=1) + [
        StrLenField("challenge", b"", length_from=_value_len),
    ]


class AVPChallengeResponse(L2TPAVP):
    name = "L2TP AVP Challenge Response"
    fields_desc = _avp_header("Challenge Response", m=1) + [
        StrFixedLenField("response", b"\0" * 16, 16),
    ]
    value_size = (16, 16)


class AVPQ931CauseCode(L2TPAVP):
    name = "L2TP AVP Q.931 Cause Code"
    fields_desc = _avp_header("Q.931 Cause Code", m=1) + [
        ShortField("cause_code", 0),
        ByteField("msg_code", 0),
        StrLenField("advisory", b"", length_from=lambda pkt: _value_len(pkt, 3)),
    ]
    value_size = (3, None)


class AVPAssignedSessionID(L2TPAVP):
    name = "L2TP AVP Assigned Session ID"
    fields_desc = _avp_header("Assigned Session ID", m=1) + [ShortField("session_id", 0)]
    value_size = (2, 2)


class AVPCallSerialNumber(L2TPAVP):
    name = "L2TP AVP Call Serial Number"
    fields_desc = _avp_header("Call Serial Number", m=1) + [IntField("serial", 0)]
    value_size = (4, 4)


class AVPFramingType(L2TPAVP):
    name = "L2TP AVP Framing Type"
    fields_desc = _avp_header("Framing Type", m=1) + [IntField("framing", 0)]
    value_size = (4, 4)


class AVPTxConnectSpeed(L2TPAVP):
    name = "L2TP AVP Tx Connect Speed"
    fields_desc = _avp_header("Tx Connect Speed", m=1) + [IntField("speed", 0)]
    value_size = (4, 4)


class AVPRxConnectSpeed(L2TPAVP):
    name = "L2TP AVP Rx Connect Speed"
    fields_desc = _avp_header("Rx Connect Speed", m=0) + [IntField("speed", 0)]
    value_size = (4, 4)


class AVPRandomVector(L2TPAVP):
    name = "L2TP AVP Random Vector"
    fields_desc = _avp_header("Random Vector", m=1) + [
        StrLenField("vector", b"", length_from=_value_len),
    ]


_DECODED: dict[int, type[L2TPAVP]] = {
    cls().attr_type: cls
    for cls in (
        AVPMessageType, AVPResultCode, AVPProtocolVersion, AVPFramingCapabilities,
        AVPBearerCapabilities, AVPTieBreaker, AVPFirmwareRevision, AVPHostName, AVPVendorName,
        AVPAssignedTunnelID, AVPReceiveWindowSize, AVPChallenge, AVPChallengeResponse,
        AVPQ931CauseCode, AVPAssignedSessionID, AVPCallSerialNumber, AVPFramingType,
        AVPTxConnectSpeed, AVPRxConnectSpeed, AVPRandomVector,
    )
}


# --- Header (RFC 2661 section 3.1) -------------------------------------------------------


def _header_len(pkt: Packet) -> int:
    """Octets of the L2TP header as present in `pkt` (flags decide the optional fields)."""
    size = 6
    if pkt.l:
        size += 2
    if pkt.s:
        size += 4
    if pkt.o:
        size += 2 + len(pkt.offset_pad or b"")
    return size


def _avps_len(pkt: Packet) -> int | None:
    """Octets of AVPs: from the Length field, or everything left when L=0."""
    if pkt.l and pkt.length is not None:
        return max(pkt.length - _header_len(pkt), 0)
    return None


class L2TPv2(Packet):
    """L2TPv2 header; defaults make a control message (T, L, S set), a ZLB if no AVPs."""

    name = "L2TPv2"
    fields_desc = [
        BitField("t", 1, 1),
        BitField("l", 1, 1),
        BitField("x1", 0, 2),
        BitField("s", 1, 1),
        BitField("x2", 0, 1),
        BitField("o", 0, 1),
        BitField("p", 0, 1),
        BitField("x3", 0, 4),
        BitField("ver", 2, 4),
        ConditionalField(ShortField("length", None), lambda pkt: pkt.l == 1),
        ShortField("tunnel_id", 0),
        ShortField("session_id", 0),
        ConditionalField(ShortField("ns", 0), lambda pkt: pkt.s == 1),
        ConditionalField(ShortField("nr", 0), lambda pkt: pkt.s == 1),
        ConditionalField(FieldLenField("offset_size", None, length_of="offset_pad"),
                         lambda pkt: pkt.o == 1),
        ConditionalField(StrLenField("offset_pad", b"", length_from=lambda pkt: pkt.offset_size),
                         lambda pkt: pkt.o == 1),
        ConditionalField(PacketListField("avps", [], L2TPAVP, length_from=_avps_len,
                                         max_count=_MAX_AVPS),
                         lambda pkt: pkt.t == 1),
    ]

    @property
    def msg_type(self) -> int | None:
        """Message Type of a control message (first AVP), None for a ZLB or data message."""
        if not self.t or not self.avps or not isinstance(self.avps[0], AVPMessageType):
            return None
        return self.avps[0].msg_type

    def post_build(self, pkt, pay):
        if self.l and self.length is None:
            pkt = pkt[:2] + struct.pack("!H", len(pkt) + len(pay)) + pkt[4:]
        return pkt + pay

    def extract_padding(self, s):
        if self.t:
            return b"", s
        if self.l and self.length is not None:
            body = max(self.length - _header_len(self), 0)
            return s[:body], s[body:]
        return s, b""

    def mysummary(self):
        ids = f"tunnel={self.tunnel_id} session={self.session_id}"
        if self.s:
            ids += f" ns={self.ns} nr={self.nr}"
        kind = message_name(self.msg_type) if self.t else "data"
        return f"L2TPv2 {kind} {ids}"


# --- Hidden AVPs (RFC 2661 section 4.3) --------------------------------------------------


def _revealed(avp: AVPHidden, clear: bytes) -> L2TPAVP:
    """The AVP `avp` would be with value `clear` and H=0, decoded, marked `was_hidden`."""
    flags = (avp.m << 15) | (avp.rsvd << 10) | (AVP_HEADER_LEN + len(clear))
    decoded = L2TPAVP(struct.pack("!HHH", flags, avp.vendor_id, avp.attr_type) + clear)
    decoded.was_hidden = True
    return decoded


def reveal(pkt: Packet, secret: bytes) -> Packet:
    """Return a copy of `pkt` in which every hidden AVP of its L2TPv2 layer is decoded.

    Each `AVPHidden` that follows a Random Vector AVP in the same message is
    unhidden with that most recent Random Vector and `secret` (RFC 2661 4.3)
    and replaced by the AVP it stands for, as dissection of the clear AVP
    would give it: H cleared, Length the clear length, the decoded subclass
    (`AVPAssignedTunnelID`, ...) or `L2TPAVP` for vendor/unknown types.  The
    replacement has `was_hidden = True`, so `bytes()` of the copy is the same
    message with the values sent in the clear.  Length fields of the copy
    (L2TPv2 and enclosing IP/IPv6/UDP lengths and checksums) are reset to be
    recomputed.  A hidden AVP with no preceding Random Vector, or whose
    decoded Original Length is impossible (wrong secret), stays `AVPHidden`.
    """
    out = pkt.copy()
    msg = out.getlayer(L2TPv2)
    if msg is None or not msg.t:
        return out
    vector = None
    avps = []
    for avp in msg.avps:
        if isinstance(avp, AVPRandomVector):
            vector = avp.vector
        elif isinstance(avp, AVPHidden) and vector is not None:
            try:
                avp = _revealed(avp, unhide(avp.attr_type, avp.value, secret, vector))
            except ValueError:
                pass
        avps.append(avp)
    msg.avps = avps
    msg.length = None
    layer = msg.underlayer
    while layer is not None:
        for name in ("len", "plen", "chksum"):
            if name in layer.fieldtype:
                setattr(layer, name, None)
        layer = layer.underlayer
    return out


# --- Bindings ----------------------------------------------------------------------------

split_layers(UDP, L2TP, dport=L2TP_PORT)
split_layers(UDP, L2TP, sport=L2TP_PORT)
bind_bottom_up(UDP, L2TPv2, dport=L2TP_PORT)
bind_bottom_up(UDP, L2TPv2, sport=L2TP_PORT)
bind_layers(UDP, L2TPv2, sport=L2TP_PORT, dport=L2TP_PORT)
bind_layers(L2TPv2, PPP, t=0)
bind_top_down(L2TPv2, HDLC, t=0)
