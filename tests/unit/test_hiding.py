"""RFC 2661 section 4.3 AVP hiding: known answer, round trip, error cases."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, strategies as st

from l2tp_marker.hiding import MAX_HIDDEN_LEN, hide, unhide

SECRET = b"tunnel-secret"
RV = bytes(range(16))


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def test_known_answer_spelled_out_from_rfc():
    # 18-octet value -> 20-octet subformat -> one full block and a 4-octet tail.
    value = b"abcdefghijklmnopqr"
    p = len(value).to_bytes(2, "big") + value
    b1 = hashlib.md5(b"\x00\x0e" + SECRET + RV).digest()  # type 14, network order
    c1 = _xor(p[:16], b1)
    b2 = hashlib.md5(SECRET + c1).digest()
    c2 = _xor(p[16:], b2)
    assert hide(14, value, SECRET, RV) == c1 + c2
    assert unhide(14, c1 + c2, SECRET, RV) == value


def test_attribute_type_is_part_of_the_key():
    assert hide(9, b"\x00\x01", SECRET, RV) != hide(14, b"\x00\x01", SECRET, RV)


def test_hidden_length_is_value_plus_length_prefix():
    for n in (0, 1, 14, 15, 16, 17, 31, 32, 33, 100):
        assert len(hide(7, b"x" * n, SECRET, RV)) == n + 2


@pytest.mark.parametrize("pad_to", [1, 16, 32, 64])
def test_padding_reaches_a_multiple_and_is_discarded(pad_to):
    for n in (0, 2, 14, 30, 70):
        hidden = hide(7, b"v" * n, SECRET, RV, pad_to=pad_to)
        assert len(hidden) % pad_to == 0
        assert len(hidden) >= n + 2
        assert unhide(7, hidden, SECRET, RV) == b"v" * n


@given(
    attr_type=st.integers(0, 0xFFFF),
    value=st.binary(max_size=MAX_HIDDEN_LEN - 2),
    secret=st.binary(max_size=64),
    vector=st.binary(min_size=1, max_size=64),
    pad_to=st.sampled_from([0, 16, 48]),
)
def test_unhide_inverts_hide(attr_type, value, secret, vector, pad_to):
    if pad_to and len(value) + 2 > MAX_HIDDEN_LEN - pad_to:
        value = value[: MAX_HIDDEN_LEN - 2 - pad_to]
    hidden = hide(attr_type, value, secret, vector, pad_to)
    assert unhide(attr_type, hidden, secret, vector) == value


@pytest.mark.parametrize("blob", [b"", b"\x01"])
def test_unhide_rejects_blob_shorter_than_length_prefix(blob):
    with pytest.raises(ValueError, match="at least the 2-octet Original Length"):
        unhide(14, blob, SECRET, RV)


def test_unhide_rejects_original_length_beyond_data():
    hidden = hide(14, b"0123456789", SECRET, RV)
    with pytest.raises(ValueError, match="Original Length 10 exceeds the 7 octet"):
        unhide(14, hidden[:-3], SECRET, RV)


def test_wrong_secret_is_detected_by_length_check():
    hidden = hide(14, b"\x12\x34", SECRET, RV)
    with pytest.raises(ValueError, match="wrong secret"):
        unhide(14, hidden, b"not-the-secret", RV)


def test_hide_rejects_values_that_do_not_fit_an_avp():
    hide(7, b"x" * (MAX_HIDDEN_LEN - 2), SECRET, RV)
    with pytest.raises(ValueError, match="too long"):
        hide(7, b"x" * (MAX_HIDDEN_LEN - 1), SECRET, RV)
    with pytest.raises(ValueError, match="exceeds"):
        hide(7, b"x" * (MAX_HIDDEN_LEN - 2), SECRET, RV, pad_to=16)


def test_hide_rejects_bad_arguments():
    with pytest.raises(ValueError):
        hide(0x10000, b"x", SECRET, RV)
    with pytest.raises(ValueError):
        hide(7, b"x", SECRET, RV, pad_to=-1)
