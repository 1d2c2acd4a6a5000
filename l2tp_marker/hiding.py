"""Hiding and revealing of L2TPv2 AVP values (RFC 2661 section 4.3).

A hidden AVP carries, instead of its value, the "hidden AVP subformat"::

    Original Length (2 octets, network order) | Original Value | Padding

obscured with an MD5 keystream.  The subformat is cut into 16-octet chunks
p1, p2, ... (the last one may be shorter) and::

    b1 = MD5(Attribute Type + secret + Random Vector)    c1 = p1 xor b1
    bi = MD5(secret + c(i-1))                            ci = pi xor bi

where the Attribute Type is the AVP's 2-octet type in network order and the
Random Vector is the value of the most recent Random Vector AVP preceding the
hidden AVP in the same control message.  The hidden value is c1 + c2 + ....

Pure Python (hashlib only): the engine calls this on the per-packet path.
"""

from __future__ import annotations

import hashlib
import os

from l2tp_marker.constants import AVP_HEADER_LEN, AVP_LENGTH_MASK

_BLOCK = 16
_LENGTH_PREFIX = 2
# Largest value that fits in an AVP (10-bit length including the 6-octet header).
MAX_HIDDEN_LEN = AVP_LENGTH_MASK - AVP_HEADER_LEN


def _xor_stream(attr_type: int, data: bytes, secret: bytes, random_vector: bytes,
                *, encrypt: bool) -> bytes:
    """Apply the RFC 2661 4.3 keystream to `data`; chaining uses the ciphertext side."""
    if not 0 <= attr_type <= 0xFFFF:
        raise ValueError(f"attribute type {attr_type} does not fit in 16 bits")
    key = hashlib.md5(attr_type.to_bytes(2, "big") + secret + random_vector).digest()
    out = bytearray()
    for start in range(0, len(data), _BLOCK):
        chunk = data[start:start + _BLOCK]
        n = len(chunk)
        mixed = (int.from_bytes(chunk, "big") ^ int.from_bytes(key[:n], "big")).to_bytes(n, "big")
        out += mixed
        key = hashlib.md5(secret + (mixed if encrypt else chunk)).digest()
    return bytes(out)


def hide(attr_type: int, value: bytes, secret: bytes, random_vector: bytes,
         pad_to: int = 0) -> bytes:
    """Return the hidden form of `value` for an AVP of type `attr_type`.

    With `pad_to` > 0 the subformat (2-octet length + value) is extended with
    random octets up to the next multiple of `pad_to` octets, which conceals
    the original length (RFC 2661 4.3 "Padding").  Raises ValueError if the
    result would not fit in an AVP (at most 1017 octets of value).
    """
    if pad_to < 0:
        raise ValueError(f"pad_to must be >= 0, got {pad_to}")
    if _LENGTH_PREFIX + len(value) > MAX_HIDDEN_LEN:
        raise ValueError(f"value of {len(value)} octets is too long to hide in an AVP "
                         f"(max {MAX_HIDDEN_LEN - _LENGTH_PREFIX})")
    subformat = len(value).to_bytes(_LENGTH_PREFIX, "big") + value
    if pad_to:
        subformat += os.urandom(-len(subformat) % pad_to)
        if len(subformat) > MAX_HIDDEN_LEN:
            raise ValueError(f"padding to a multiple of {pad_to} octets exceeds the "
                             f"{MAX_HIDDEN_LEN}-octet AVP value limit")
    return _xor_stream(attr_type, subformat, secret, random_vector, encrypt=True)


def unhide(attr_type: int, hidden: bytes, secret: bytes, random_vector: bytes) -> bytes:
    """Return the original value of a hidden AVP value (inverse of `hide`).

    Raises ValueError if `hidden` is too short to hold the 2-octet Original
    Length, or if the decoded Original Length exceeds the octets that follow
    it (typically a wrong secret or Random Vector).
    """
    if len(hidden) < _LENGTH_PREFIX:
        raise ValueError(f"hidden AVP value is {len(hidden)} octet(s); it must hold at least "
                         f"the {_LENGTH_PREFIX}-octet Original Length")
    clear = _xor_stream(attr_type, hidden, secret, random_vector, encrypt=False)
    original_len = int.from_bytes(clear[:_LENGTH_PREFIX], "big")
    available = len(clear) - _LENGTH_PREFIX
    if original_len > available:
        raise ValueError(f"hidden AVP Original Length {original_len} exceeds the {available} "
                         "octet(s) available (wrong secret or Random Vector?)")
    return clear[_LENGTH_PREFIX:_LENGTH_PREFIX + original_len]
