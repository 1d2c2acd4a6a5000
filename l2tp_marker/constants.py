"""L2TPv2 protocol numbers (RFC 2661) shared by the codec, the scapy layers and the engine."""

from __future__ import annotations

L2TP_PORT = 1701

# Header flag bits (first 16-bit word, RFC 2661 section 3.1).
FLAG_T = 0x8000  # control message
FLAG_L = 0x4000  # length present
FLAG_S = 0x0800  # Ns/Nr present
FLAG_O = 0x0200  # offset size present
FLAG_P = 0x0100  # priority
VERSION_MASK = 0x000F
# Bits that must be zero in an L2TPv2 header (x bits).
RESERVED_BITS = 0x30F0

# Control message types (RFC 2661 section 3.2).
SCCRQ, SCCRP, SCCCN, STOPCCN, HELLO = 1, 2, 3, 4, 6
OCRQ, OCRP, OCCN, ICRQ, ICRP, ICCN = 7, 8, 9, 10, 11, 12
CDN, WEN, SLI = 14, 15, 16

MESSAGE_TYPES: dict[int, str] = {
    1: "SCCRQ", 2: "SCCRP", 3: "SCCCN", 4: "StopCCN", 6: "HELLO",
    7: "OCRQ", 8: "OCRP", 9: "OCCN", 10: "ICRQ", 11: "ICRP", 12: "ICCN",
    14: "CDN", 15: "WEN", 16: "SLI",
}

# AVP types (RFC 2661 section 4.4).
AVP_MESSAGE_TYPE = 0
AVP_RESULT_CODE = 1
AVP_ASSIGNED_TUNNEL_ID = 9
AVP_ASSIGNED_SESSION_ID = 14
AVP_RANDOM_VECTOR = 36

AVP_TYPES: dict[int, str] = {
    0: "Message Type", 1: "Result Code", 2: "Protocol Version", 3: "Framing Capabilities",
    4: "Bearer Capabilities", 5: "Tie Breaker", 6: "Firmware Revision", 7: "Host Name",
    8: "Vendor Name", 9: "Assigned Tunnel ID", 10: "Receive Window Size", 11: "Challenge",
    12: "Q.931 Cause Code", 13: "Challenge Response", 14: "Assigned Session ID",
    15: "Call Serial Number", 16: "Minimum BPS", 17: "Maximum BPS", 18: "Bearer Type",
    19: "Framing Type", 21: "Called Number", 22: "Calling Number", 23: "Sub-Address",
    24: "Tx Connect Speed", 25: "Physical Channel ID", 26: "Initial Received LCP CONFREQ",
    27: "Last Sent LCP CONFREQ", 28: "Last Received LCP CONFREQ", 29: "Proxy Authen Type",
    30: "Proxy Authen Name", 31: "Proxy Authen Challenge", 32: "Proxy Authen ID",
    33: "Proxy Authen Response", 34: "Call Errors", 35: "ACCM", 36: "Random Vector",
    37: "Private Group ID", 38: "Rx Connect Speed", 39: "Sequencing Required",
}

# AVP header bits.
AVP_FLAG_M = 0x8000
AVP_FLAG_H = 0x4000
AVP_LENGTH_MASK = 0x03FF
AVP_HEADER_LEN = 6

# Messages whose Assigned Tunnel ID / Assigned Session ID AVP names the *sender's* ID.
TUNNEL_ID_CARRIERS = frozenset({SCCRQ, SCCRP, STOPCCN})
SESSION_ID_CARRIERS = frozenset({ICRQ, ICRP, OCRQ, OCRP, CDN})

# RFC 2661 section 5.7: the sender of StopCCN keeps state for a full retransmission cycle;
# with the recommended backoff (1+2+4+8+16 s) that is 31 seconds.
STOPCCN_HOLD_SECONDS = 31.0


def message_name(msg_type: int | None) -> str:
    """Readable name of a control message type ("ZLB" for None, "type-N" if unknown)."""
    if msg_type is None:
        return "ZLB"
    return MESSAGE_TYPES.get(msg_type, f"type-{msg_type}")
