"""The fast paths: the table that follows the engine's events, the kernel's map values and nft text,
the userspace match (:func:`fastpath.hot_verdict` and the daemon's lanes) against the full engine,
and, as root in a scratch network namespace, the nft table itself (``nft -c``, KernelFastPath).

The engine is the reference: whenever a fast path gives a verdict, it must be the verdict
``judge_packet`` gives (same mark, same bytes, never a drop skipped). Packets are built here by hand
(struct), independently of the codec, with a checksum sum of their own.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import IPv6
from scapy.layers.inet import UDP

from l2tp_marker import codec
from l2tp_marker import constants as C
from l2tp_marker import fastpath as fp
from l2tp_marker.daemon import PacketHandler
from l2tp_marker.engine import Engine, EngineConfig, Peer, TableEvent
from l2tp_marker.fastpath import FastTable, hot_verdict
from l2tp_marker.judge import judge_packet
from l2tp_marker.layers import AVPAssignedTunnelID, AVPHostName, AVPMessageType, AVPProtocolVersion, L2TPv2
from l2tp_marker.rules import build_rules

from .helpers import GW, NAT, FakeClock, data, sccrp, sccrq

OTHER = "203.0.113.5"
V6 = "2001:db8::10"
GW6 = "2001:db8::1"
P = Peer(NAT, 1701)
P6 = Peer(V6, 1701)
BIT = fp.DEFAULT_BIT

PROPERTY = settings(max_examples=600, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def ev(kind: str, visible: int, *, client: int | None = None, our: int | None = None, mark: int = 1,
       peer: Peer = P) -> TableEvent:
    return TableEvent(kind, peer, visible, visible if client is None else client, our, mark)


def v4int(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


# ================================================================================ FastTable
def test_learn_adds_the_outbound_entry_only():
    t = FastTable()
    t.apply([ev("learn", 1, mark=5)])
    assert t.out == {(NAT, 1701, 1): (5, 1)} and len(t) == 1
    assert not t.inb
    assert t.dirty_out == {(NAT, 1701, 1)} and t.dirty_in == set()


def test_bind_adds_the_inbound_key_with_the_mark():
    t = FastTable()
    t.apply([ev("learn", 1, mark=5)])
    t.take_dirty()
    t.apply([ev("bind", 1, our=700, mark=5)])
    assert t.inb == Counter({(NAT, 1701, 700, 5): 1})
    # The outbound value did not change: only the inbound key is dirty.
    assert t.dirty_out == set() and t.dirty_in == {(NAT, 1701, 700, 5)}


def test_rebind_with_a_new_gateway_tid_replaces_the_inbound_key():
    t = FastTable()
    t.apply([ev("learn", 1), ev("bind", 1, our=700)])
    t.take_dirty()
    t.apply([ev("bind", 1, our=701)])
    assert t.inb == Counter({(NAT, 1701, 701, 1): 1})
    assert t.dirty_in == {(NAT, 1701, 700, 1), (NAT, 1701, 701, 1)} and t.dirty_out == set()
    assert t.in_int == {fp.in_key_int(v4int(NAT), 1701, 701, 1)}


def test_two_tunnels_sharing_an_inbound_key_keep_it_until_both_are_released():
    # xl2tpd may hand one gateway tunnel ID to two tunnels of the same peer (and SA).
    t = FastTable()
    t.apply([ev("learn", 1), ev("bind", 1, our=700), ev("learn", 2), ev("bind", 2, our=700)])
    k = (NAT, 1701, 700, 1)
    assert t.inb[k] == 2
    assert t.take_dirty() == ({(NAT, 1701, 1), (NAT, 1701, 2)}, {k})
    t.apply([ev("release", 1, our=700)])
    assert t.inb[k] == 1 and fp.in_key_int(v4int(NAT), 1701, 700, 1) in t.in_int
    assert t.take_dirty() == ({(NAT, 1701, 1)}, set())  # the inbound key did not change
    t.apply([ev("release", 2, our=700)])
    assert k not in t.inb and not t.in_int and not t.out
    assert t.take_dirty() == ({(NAT, 1701, 2)}, {k})


def test_release_removes_both_entries_and_take_dirty_empties_the_sets():
    t = FastTable()
    t.apply([ev("learn", 0xFFFF, client=1, mark=2), ev("bind", 0xFFFF, client=1, our=800, mark=2)])
    assert t.take_dirty() == ({(NAT, 1701, 0xFFFF)}, {(NAT, 1701, 800, 2)})
    assert t.take_dirty() == (set(), set())
    t.apply([ev("release", 0xFFFF, client=1, our=800, mark=2)])
    assert not t.out and not t.inb and not t.out_int and not t.in_int and len(t) == 0
    assert t.dirty_out == {(NAT, 1701, 0xFFFF)} and t.dirty_in == {(NAT, 1701, 800, 2)}
    # Releasing what is not there changes nothing.
    t.take_dirty()
    t.apply([ev("release", 0xFFFF, client=1, our=800, mark=2), ev("release", 9)])
    assert t.take_dirty() == (set(), set())


def test_relearning_a_key_with_another_mark_changes_its_value():
    t = FastTable()
    t.apply([ev("learn", 1, mark=1)])
    t.take_dirty()
    t.apply([ev("release", 1, mark=1), ev("learn", 1, mark=3)])
    assert t.out == {(NAT, 1701, 1): (3, 1)}
    assert t.out_int == {fp.out_key_int(v4int(NAT), 1701, 1): (3, None)}
    assert t.take_dirty() == ({(NAT, 1701, 1)}, set())


def test_integer_indexes_hold_ipv4_entries_only():
    t = FastTable()
    t.apply([ev("learn", 1, mark=1), ev("bind", 1, our=700, mark=1),
             ev("learn", 0xFFFF, client=1, mark=2), ev("bind", 0xFFFF, client=1, our=800, mark=2),
             ev("learn", 1, mark=4, peer=P6), ev("bind", 1, our=900, mark=4, peer=P6)])
    assert len(t.out) == 3 and len(t.inb) == 3
    assert t.out_int == {fp.out_key_int(v4int(NAT), 1701, 1): (1, None),
                         fp.out_key_int(v4int(NAT), 1701, 0xFFFF): (2, b"\x00\x01")}
    assert t.in_int == {fp.in_key_int(v4int(NAT), 1701, 700, 1), fp.in_key_int(v4int(NAT), 1701, 800, 2)}


def test_clear_forgets_everything_and_marks_it_dirty():
    t = FastTable()
    t.apply([ev("learn", 1), ev("bind", 1, our=700), ev("learn", 2, mark=2, peer=P6)])
    t.take_dirty()
    t.clear()
    assert not t.out and not t.inb and not t.out_int and not t.in_int
    assert t.take_dirty() == ({(NAT, 1701, 1), (V6, 1701, 2)}, {(NAT, 1701, 700, 1)})
    # A bind after clear() starts from nothing (no stale binding is undone twice).
    t.apply([ev("learn", 1), ev("bind", 1, our=701)])
    assert t.inb == Counter({(NAT, 1701, 701, 1): 1})


_OPS = st.lists(st.tuples(st.sampled_from(["learn", "bind", "release", "sync"]),
                          st.sampled_from([P, Peer(NAT, 4500), P6]),
                          st.integers(1, 4),          # visible tunnel ID
                          st.integers(1, 3),          # mark (learn) / client tid offset
                          st.integers(700, 702)),     # gateway tunnel ID (bind)
                max_size=60)


@PROPERTY
@given(_OPS)
def test_table_follows_any_valid_event_sequence_and_a_dirty_follower_stays_in_sync(ops):
    """Against a model of the live tunnels: the table, its integer indexes, and a follower that only
    looks at the dirty keys (what KernelFastPath.sync does) always agree."""
    t = FastTable()
    live: dict[tuple, dict] = {}            # out key -> {"mark", "client", "our"}
    mirror_out: dict = {}
    mirror_in: set = set()
    snap_out, snap_in = {}, Counter()

    def follow():
        dout, din = t.take_dirty()
        # Every key whose entry changed since the last sync is dirty.
        changed_out = {k for k in set(snap_out) | set(t.out) if snap_out.get(k) != t.out.get(k)}
        changed_in = {k for k in set(snap_in) | set(t.inb) if (k in snap_in) != (k in t.inb)}
        assert changed_out <= dout and changed_in <= din
        for k in dout:
            if k in t.out:
                mirror_out[k] = t.out[k]
            else:
                mirror_out.pop(k, None)
        for k in din:
            if k in t.inb:
                mirror_in.add(k)
            else:
                mirror_in.discard(k)
        snap_out.clear()
        snap_out.update(t.out)
        snap_in.clear()
        snap_in.update(t.inb)

    for op, peer, visible, m, our in ops:
        key = (peer.addr, peer.port, visible)
        x = live.get(key)
        if op == "sync":
            follow()
            continue
        if op == "learn" and x is None:
            x = live[key] = {"mark": m, "client": visible if m == 1 else visible + 10, "our": None}
            t.apply([TableEvent("learn", peer, visible, x["client"], None, x["mark"])])
        elif op == "bind" and x is not None:
            x["our"] = our
            t.apply([TableEvent("bind", peer, visible, x["client"], our, x["mark"])])
        elif op == "release" and x is not None:
            del live[key]
            t.apply([TableEvent("release", peer, visible, x["client"], x["our"], x["mark"])])
    assert t.out == {k: (x["mark"], x["client"]) for k, x in live.items()}
    assert t.inb == Counter((k[0], k[1], x["our"], x["mark"]) for k, x in live.items() if x["our"] is not None)
    assert t.out_int == {fp.out_key_int(v4int(k[0]), k[1], k[2]):
                         (x["mark"], None if x["client"] == k[2] else x["client"].to_bytes(2, "big"))
                         for k, x in live.items() if ":" not in k[0]}
    assert t.in_int == {fp.in_key_int(v4int(k[0]), k[1], x["our"], x["mark"])
                        for k, x in live.items() if x["our"] is not None and ":" not in k[0]}
    follow()
    assert mirror_out == t.out and mirror_in == set(t.inb)


def assert_mirrors(e: Engine, t: FastTable) -> None:
    """The fast table holds exactly the engine's tunnels: every one outbound, the bound ones inbound."""
    tunnels = e.tunnels()
    assert t.out == {(x.peer.addr, x.peer.port, x.visible_tid): (x.mark, x.client_tid) for x in tunnels}
    assert t.inb == Counter((x.peer.addr, x.peer.port, x.our_tid, x.mark) for x in tunnels if x.our_tid is not None)


def test_table_fed_with_the_engine_events_mirrors_the_engine_through_a_tunnel_life():
    from .helpers import control, stopccn

    clock = FakeClock()
    e = Engine(EngineConfig(max_tunnels_per_mark=3, idle_timeout=300, pending_timeout=60), clock=clock)
    t = FastTable()

    def step(p, d, m):
        v = judge_packet(e, p, d, m)
        t.apply(v.decision.events)
        assert_mirrors(e, t)
        return v

    step(sccrq(1), "in", 1)
    step(sccrp(1, 700), "out", 0)
    step(control("in", C.SCCCN, tunnel=700), "in", 1)
    step(sccrq(1), "in", 2)                                # aliased to 0xFFFF
    step(sccrp(0xFFFF, 700), "out", 0)                     # the LNS picked 700 again (other mark)
    step(sccrq(2), "in", 2)
    step(sccrp(2, 700), "out", 0)                          # ... and again, same mark 2: shared key
    assert t.inb[(NAT, 1701, 700, 2)] == 2
    step(sccrp(2, 701), "out", 0)                          # SCCRP retransmitted with another ID
    step(stopccn("in", 700, 1), "in", 1)                   # client 1 stops
    clock.advance(C.STOPCCN_HOLD_SECONDS)
    step(data("out", 0xFFFF, 1), "out", 0)                 # the next packet expires it
    assert (NAT, 1701, 1) not in t.out
    step(sccrq(1), "in", 1)                                # client 1 again: its ID is free now
    for tid in (10, 11, 12):                               # mark 3 floods: its oldest is evicted
        step(sccrq(tid), "in", 3)
    step(sccrq(13), "in", 3)
    assert (NAT, 1701, 10) not in t.out and (NAT, 1701, 13) in t.out
    clock.advance(300)
    t.apply(e.expire())                                    # the LNS went silent: all idle
    assert_mirrors(e, t)
    assert len(t) == 0 and not t.out_int and not t.in_int
    # A restart: the state file's events rebuild the same table.
    step(sccrq(1), "in", 1)
    step(sccrp(1, 702), "out", 0)
    step(sccrq(1), "in", 2)
    e2 = Engine(EngineConfig(), clock=FakeClock())
    t2 = FastTable()
    t2.apply(e2.import_state(e.export_state()))
    assert_mirrors(e2, t2)
    assert t2.out == t.out and t2.inb == t.inb and t2.out_int == t.out_int and t2.in_int == t.in_int


# ================================================================================ kernel values
@pytest.mark.parametrize("key,value,bit,want", [
    ((NAT, 1701, 1), (5, 1), BIT, 0x80000005),                 # plain: the SA mark plus the bit
    ((NAT, 4500, 7), (0x7FFFFFFF, 7), BIT, 0xFFFFFFFF),
    ((NAT, 1701, 1), (0x1, 1), 0x100, 0x101),                  # another bit
    ((NAT, 1701, 0xFFFF), (2, 1), BIT, None),                  # aliased: needs a rewrite
    ((V6, 1701, 1), (5, 1), BIT, None),                        # the table is ip (IPv4)
    ((NAT, 1701, 1), (0, 1), BIT, None),                       # zero mark
    ((NAT, 1701, 1), (0x80000001, 1), BIT, None),              # the mark uses the bit
    ((NAT, 1701, 1), (0x100, 1), 0x100, None),
    ((NAT, 1701, 1), None, BIT, None),                         # no entry
])
def test_kernel_out_value(key, value, bit, want):
    assert fp.kernel_out_value(key, value, bit) == want


@pytest.mark.parametrize("key,bit,want", [
    ((NAT, 1701, 700, 5), BIT, True),
    ((NAT, 1701, 700, 0x7FFFFFFF), BIT, True),
    ((V6, 1701, 700, 5), BIT, False),
    ((NAT, 1701, 700, 0), BIT, False),
    ((NAT, 1701, 700, 0x80000005), BIT, False),
    ((NAT, 1701, 700, 0x105), 0x100, False),
])
def test_kernel_in_ok(key, bit, want):
    assert fp.kernel_in_ok(key, bit) is want


# ================================================================================ nft text
def test_table_name_follows_the_chain_prefix():
    assert fp.table_name("L2TP-MARKER") == "l2tp_marker"
    assert fp.table_name("Lab-2") == "lab_2"


def test_table_script_text():
    assert fp.table_script("l2tp_marker", 0x40000000) == """\
add table ip l2tp_marker
delete table ip l2tp_marker
table ip l2tp_marker {
  map out_marks {
    typeof ip daddr . udp dport . @th,96,16 : meta mark
  }
  set in_known {
    typeof ip saddr . udp sport . @th,96,16 . meta mark
  }
  chain out {
    type route hook output priority -160; policy accept;
    udp sport 1701 @th,64,2 0x1 @th,76,4 2 meta mark set ip daddr . udp dport . @th,96,16 map @out_marks counter
    udp sport 1701 @th,64,2 0x0 @th,76,4 2 meta mark set ip daddr . udp dport . @th,80,16 map @out_marks counter
  }
  chain in {
    type filter hook input priority -160; policy accept;
    udp dport 1701 @th,64,2 0x1 @th,76,4 2 ip saddr . udp sport . @th,96,16 . meta mark @in_known \
meta mark set meta mark | 0x40000000 counter
    udp dport 1701 @th,64,2 0x0 @th,76,4 2 ip saddr . udp sport . @th,80,16 . meta mark @in_known \
meta mark set meta mark | 0x40000000 counter
  }
}
"""
    assert fp.PRIORITY < -150  # before the legacy mangle chains (connmark restore, our queue rules)


def test_delete_script_is_safe_when_the_table_is_absent():
    assert fp.delete_script("t") == "add table ip t\ndelete table ip t\n"


def test_element_script_deletes_before_adds():
    s = fp.element_script("t", [(NAT, 1701, 1), (OTHER, 4500, 2)], [((NAT, 1701, 3), 0x80000003)],
                          [(NAT, 1701, 700, 1)], [(NAT, 1701, 701, 0x2), (OTHER, 4500, 9, 0x10)])
    assert s == (
        "delete element ip t out_marks { 192.0.2.10 . 1701 . 1, 203.0.113.5 . 4500 . 2 }\n"
        "delete element ip t in_known { 192.0.2.10 . 1701 . 700 . 0x1 }\n"
        "add element ip t out_marks { 192.0.2.10 . 1701 . 3 : 0x80000003 }\n"
        "add element ip t in_known { 192.0.2.10 . 1701 . 701 . 0x2, 203.0.113.5 . 4500 . 9 . 0x10 }\n")
    assert fp.element_script("t", [], [], [], []) == ""
    assert fp.element_script("t", [], [], [], [(NAT, 1, 2, 3)]) == "add element ip t in_known { 192.0.2.10 . 1 . 2 . 0x3 }\n"


# ================================================================================ hot path vs engine
# Hand-built packets (independent of the codec and of scapy).
def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ip4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, *, csum: bool = True,
            options: bytes = b"", df: bool = False, frag: int = 0) -> bytes:
    ihl = 5 + len(options) // 4
    ulen = 8 + len(payload)
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    c = 0
    if csum:
        c = ~_sum16(s + d + struct.pack("!BBH", 0, 17, ulen) + struct.pack("!HHHH", sport, dport, ulen, 0)
                    + payload) & 0xFFFF or 0xFFFF
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + ulen, 0x1234, (0x4000 if df else 0) | frag,
                      64, 17, 0, s, d) + options
    hdr = hdr[:10] + struct.pack("!H", ~_sum16(hdr) & 0xFFFF) + hdr[12:]
    return hdr + struct.pack("!HHHH", sport, dport, ulen, c) + payload


def l2tp_data(tid: int, sid: int = 1, *, l: bool = True, s: bool = False, o: bool = False, p: bool = False,
              ns: int = 0, nr: int = 0, pad: bytes = b"", body: bytes = b"\xff\x03\xc0\x21\x09\x01\x00\x04",
              version: int = 2) -> bytes:
    flags = (C.FLAG_L if l else 0) | (C.FLAG_S if s else 0) | (C.FLAG_O if o else 0) | (C.FLAG_P if p else 0) | version
    rest = struct.pack("!HH", tid, sid)
    if s:
        rest += struct.pack("!HH", ns, nr)
    if o:
        rest += struct.pack("!H", len(pad)) + pad
    rest += body
    if l:
        return struct.pack("!HH", flags, 2 + 2 + len(rest)) + rest
    return struct.pack("!H", flags) + rest


def pkt(direction: str, l2tp: bytes, peer: str = NAT, port: int = 1701, gw_port: int = 1701, **kw) -> bytes:
    if direction == "in":
        return ip4_udp(peer, GW, port, gw_port, l2tp, **kw)
    return ip4_udp(GW, peer, gw_port, port, l2tp, **kw)


def _v6_sccrq(tid: int) -> bytes:
    msg = L2TPv2(tunnel_id=0, avps=[AVPMessageType(msg_type=C.SCCRQ), AVPProtocolVersion(),
                                    AVPHostName(hostname=b"win"), AVPAssignedTunnelID(tunnel_id=tid)])
    return bytes(IPv6(src=V6, dst=GW6) / UDP(sport=1701, dport=1701) / msg)


def _v6_sccrp(to_tid: int, our: int) -> bytes:
    msg = L2TPv2(tunnel_id=to_tid, avps=[AVPMessageType(msg_type=C.SCCRP), AVPProtocolVersion(),
                                         AVPHostName(hostname=b"gw"), AVPAssignedTunnelID(tunnel_id=our)])
    return bytes(IPv6(src=GW6, dst=V6) / UDP(sport=1701, dport=1701) / msg)


MASKS = (0xFFFFFFFF, 0x0000FFFF)


@lru_cache(maxsize=None)
def _control_packets():
    return {
        "rq1": sccrq(1), "rp1": sccrp(1, 700), "rqff": sccrp(0xFFFF, 800), "rq2": sccrq(2), "rp2": sccrp(2, 700),
        "rq5": sccrq(5, peer=OTHER, port=4500), "rq1v6": _v6_sccrq(1), "rp1v6": _v6_sccrp(1, 900),
    }


def scenario(mask: int, *, enforce: str = "drop") -> tuple[Engine, FastTable]:
    """An engine and a fast table fed with its events (decisions' events via judge_packet):

    * 192.0.2.10:1701 client tid 1, mark 1: plain, gateway tid 700;
    * 192.0.2.10:1701 client tid 1, mark 2: aliased to 0xFFFF, gateway tid 800;
    * 192.0.2.10:1701 client tid 2, mark 3: plain, gateway tid 700 too (xl2tpd picked it twice);
    * 203.0.113.5:4500 client tid 5, mark 4: learned, no SCCRP yet;
    * [2001:db8::10]:1701 client tid 1, mark 5: plain over IPv6, gateway tid 900.
    """
    c = _control_packets()
    e = Engine(EngineConfig(mark_mask=mask, enforce=enforce), clock=FakeClock())
    t = FastTable()
    for p, d, m, reason in ((c["rq1"], "in", 1, "sccrq_learned"), (c["rp1"], "out", 0, "owner_mark_set"),
                            (sccrq(1), "in", 2, "sccrq_aliased"), (c["rqff"], "out", 0, "owner_mark_set"),
                            (c["rq2"], "in", 3, "sccrq_learned"), (c["rp2"], "out", 0, "owner_mark_set"),
                            (c["rq5"], "in", 4, "sccrq_learned"),
                            (c["rq1v6"], "in", 5, "sccrq_learned"), (c["rp1v6"], "out", 0, "owner_mark_set")):
        v = judge_packet(e, p, d, m)
        assert v.decision.reason == reason
        t.apply(v.decision.events)
    assert len(e) == len(t) == 5
    return e, t


_SCENARIOS: dict[int, tuple[Engine, FastTable]] = {}


def shared(mask: int) -> tuple[Engine, FastTable]:
    # Judging data packets does not change what later data packets get (the clock stands still).
    if mask not in _SCENARIOS:
        _SCENARIOS[mask] = scenario(mask)
    return _SCENARIOS[mask]


KNOWN_OUT = [(NAT, 1701, 1), (NAT, 1701, 0xFFFF), (NAT, 1701, 2), (OTHER, 4500, 5)]
KNOWN_IN = [(NAT, 1701, 700), (NAT, 1701, 800)]


@st.composite
def data_packets(draw):
    direction = draw(st.sampled_from(["in", "out"]))
    if draw(st.integers(0, 9)) < 7:  # mostly a known tunnel's key, else anything near it
        peer, port, tid = draw(st.sampled_from(KNOWN_OUT if direction == "out" else KNOWN_IN))
    else:
        peer, port = draw(st.sampled_from([(NAT, 1701), (OTHER, 4500), (NAT, 4500), ("192.0.2.99", 1701)]))
        tid = draw(st.sampled_from([1, 0xFFFF, 2, 5, 3, 700, 800, 900, 701]) | st.integers(0, 0xFFFF))
    l, s, o, p = (draw(st.booleans()) for _ in range(4))
    l2 = l2tp_data(tid, draw(st.integers(0, 0xFFFF)), l=l, s=s, o=o, p=p,
                   ns=draw(st.integers(0, 0xFFFF)), nr=draw(st.integers(0, 0xFFFF)),
                   pad=draw(st.binary(max_size=6)) if o else b"", body=draw(st.binary(max_size=80)))
    gw_port = draw(st.sampled_from([1701, 1701, 1701, 1702]))
    options = draw(st.sampled_from([b"", b"", b"\x01\x01\x01\x01", b"\x01" * 8]))
    raw = pkt(direction, l2, peer, port, gw_port, csum=draw(st.booleans()), options=options, df=draw(st.booleans()))
    mark = draw(st.sampled_from([1, 2, 3, 4, 5, 0]))
    mark |= draw(st.sampled_from([0, 0, 0x10000, 0x80000000]))
    if draw(st.integers(0, 9)) == 0:
        mark = draw(st.integers(0, 0xFFFFFFFF))
    return direction, raw, mark


HOT_REASONS = {"owner_mark", "owner_mark_set", "inbound_known"}


def _check_against_engine(e: Engine, t: FastTable, mask: int, direction: str, raw: bytes, mark: int):
    h = hot_verdict(raw, direction, mark, t, mask)
    v = judge_packet(e, raw, direction, mark)
    if h is not None:
        hmark, hpayload = h
        assert (mark if hmark is None else hmark) == v.mark_out
        assert hpayload == v.payload
        assert v.decision.reason in HOT_REASONS and not v.decision.drop
        if direction == "in":
            assert h == (None, None)
        if hpayload is not None:
            assert codec.udp_checksum_ok(hpayload, codec.parse_ip_udp(hpayload))
    # Not vacuous: the fast path takes every well-formed IPv4 data packet of a known tunnel
    # (inbound: arriving with exactly its tunnel's mark).
    dg = v.datagram
    if (dg is not None and dg.version == 4 and not getattr(v.message, "control", True)
            and (v.decision.reason in ("owner_mark", "owner_mark_set")
                 or (v.decision.reason == "inbound_known" and not mark & ~mask))):
        assert h is not None, v.decision
    return h, v


@PROPERTY
@given(st.sampled_from(MASKS), data_packets())
def test_hot_verdict_equals_the_engine_on_data_packets(mask, case):
    direction, raw, mark = case
    e, t = shared(mask)
    _check_against_engine(e, t, mask, direction, raw, mark)


@pytest.mark.parametrize("mask", MASKS)
def test_hot_verdict_on_each_kind_of_tunnel(mask):
    e, t = shared(mask)
    foreign = 0x10000 if mask != 0xFFFFFFFF else 0
    for l in (True, False):
        for csum in (True, False):
            kw = {"l": l}
            # Plain outbound: the SA mark, bytes untouched (bits outside the mask kept).
            h, _ = _check_against_engine(e, t, mask, "out", pkt("out", l2tp_data(1, **kw), csum=csum), 7 | foreign)
            assert h == (1 | foreign, None)
            # Aliased outbound: the client's own tunnel ID back in the header.
            raw = pkt("out", l2tp_data(0xFFFF, **kw), csum=csum)
            h, _ = _check_against_engine(e, t, mask, "out", raw, 1)
            assert h[0] == 2
            msg = codec.decode_l2tp(h[1], 28)
            off = msg.tunnel_id_offset
            assert msg.tunnel_id == 1 and off == (32 if l else 30)
            # Only the tunnel ID and the UDP checksum changed; no checksum stays no checksum.
            assert h[1][:26] == raw[:26] and h[1][28:off] == raw[28:off] and h[1][off + 2:] == raw[off + 2:]
            assert (h[1][26:28] == b"\0\0") is (not csum)
            # Learned, not bound yet: the LNS's first answers are data too (rare, but keyed alike).
            h, _ = _check_against_engine(e, t, mask, "out", pkt("out", l2tp_data(5, **kw), OTHER, 4500, csum=csum), 0)
            assert h == (4, None)
            # Inbound: both tunnels the LNS gave ID 700, each with its own mark.
            for m in (1, 3):
                h, _ = _check_against_engine(e, t, mask, "in", pkt("in", l2tp_data(700, **kw), csum=csum), m)
                assert h == (None, None)
            h, v = _check_against_engine(e, t, mask, "in", pkt("in", l2tp_data(700, **kw), csum=csum), 2)
            assert h is None and v.decision.reason == "sa_conflict" and v.decision.drop


def test_alias_rewrite_checksum_edge_cases():
    """The incremental checksum update where one's complement has two zeros: a packet that arrives
    with checksum 0xFFFF (computed 0), and one whose rewrite computes 0 (sent as 0xFFFF, never 0)."""
    e, t = shared(0xFFFFFFFF)

    def out(tid, x):
        return pkt("out", l2tp_data(tid, body=b"\xff\x03" + x.to_bytes(2, "big")))

    arrives = next(x for x in range(0x10000) if out(0xFFFF, x)[26:28] == b"\xff\xff")
    leaves = next(x for x in range(0x10000) if out(1, x)[26:28] == b"\xff\xff")
    for x in (arrives, leaves):
        raw = out(0xFFFF, x)
        h, v = _check_against_engine(e, t, 0xFFFFFFFF, "out", raw, 0)
        assert h[1] == out(1, x)  # as if the LNS had sent the client's ID, checksum computed afresh
        assert h[1][26:28] != b"\0\0"
        p = NfqPacket(raw, 0)
        PacketHandler(e, fast=t).handle_out(p)
        assert p.final == ("accept", 2, h[1])


@pytest.mark.parametrize("direction,raw,mark,why", [
    ("out", pkt("out", sccrp(1, 700)[28:]), 1, "control message"),
    ("in", pkt("in", sccrq(1)[28:]), 1, "control message"),
    ("out", pkt("out", l2tp_data(1), frag=0x2000), 1, "first fragment (MF)"),
    ("out", pkt("out", l2tp_data(1), frag=0x0010), 1, "later fragment"),
    ("out", pkt("out", l2tp_data(1), gw_port=1702), 1, "not the gateway's port"),
    ("in", pkt("in", l2tp_data(700), gw_port=1702), 1, "not the gateway's port"),
    ("out", pkt("out", l2tp_data(1, version=3)), 1, "L2TPv3"),
    ("in", pkt("in", l2tp_data(700, version=3)), 1, "L2TPv3"),
    ("in", pkt("in", l2tp_data(700)), 0x80000001, "another mark"),
    ("out", pkt("out", l2tp_data(1), peer="192.0.2.11"), 1, "another peer"),
    ("out", pkt("out", l2tp_data(1), port=1702), 1, "another peer port"),
    ("out", pkt("out", l2tp_data(1))[:30], 1, "truncated before the tunnel ID"),
    ("out", pkt("out", l2tp_data(1, l=False))[:29], 1, "truncated before the tunnel ID"),
    ("in", pkt("in", l2tp_data(700))[:31], 1, "truncated inside the tunnel ID"),
    ("out", pkt("out", l2tp_data(1))[:20], 1, "IP header only"),
    ("out", b"", 1, "empty"),
])
def test_hot_verdict_misses(direction, raw, mark, why):
    e, t = shared(0xFFFFFFFF)
    assert hot_verdict(raw, direction, mark, t) is None, why
    assert hot_verdict(raw, direction, mark, t, 0xFFFF) is None, why


def test_hot_verdict_misses_ipv6_and_other_protocols():
    e, t = shared(0xFFFFFFFF)
    # The scenario's IPv6 tunnel's data: the engine marks it, the fast path leaves it to the engine.
    assert (V6, 1701, 1) in t.out
    v6 = bytes(IPv6(src=GW6, dst=V6) / UDP(sport=1701, dport=1701) / l2tp_data(1))
    assert judge_packet(e, v6, "out", 0).decision.reason == "owner_mark_set"
    assert hot_verdict(v6, "out", 0, t) is None
    v6 = bytes(IPv6(src=V6, dst=GW6) / UDP(sport=1701, dport=1701) / l2tp_data(900))
    assert judge_packet(e, v6, "in", 5).decision.reason == "inbound_known"
    assert hot_verdict(v6, "in", 5, t) is None
    # The same bytes as a known IPv4 packet but another IP version or protocol.
    raw = bytearray(pkt("out", l2tp_data(1)))
    assert hot_verdict(bytes(raw), "out", 0, t) == (1, None)
    for i, b in ((0, 0x65), (0, 0x55), (9, 6)):
        bad = bytearray(raw)
        bad[i] = b
        assert hot_verdict(bytes(bad), "out", 0, t) is None, (i, b)


@PROPERTY
@given(st.binary(max_size=120), st.sampled_from(["in", "out"]), st.integers(0, 0xFFFFFFFF), st.sampled_from(MASKS))
def test_hot_verdict_never_raises_on_any_bytes(raw, direction, mark, mask):
    e, t = shared(mask)
    h = hot_verdict(raw, direction, mark, t, mask)
    assert h is None or (isinstance(h, tuple) and len(h) == 2)


@st.composite
def mutated(draw):
    direction, raw, mark = draw(data_packets())
    b = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(b) - 1))
        b[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        b = b[:draw(st.integers(0, len(b)))]
    return direction, bytes(b), mark


@PROPERTY
@given(st.sampled_from(MASKS), mutated())
def test_hot_verdict_equals_the_engine_on_mutated_packets_the_codec_decodes(mask, case):
    """Bit flips and truncations: never an exception, and on every packet the engine can decode as
    L2TP, the same verdict. (Packets the codec finds malformed: see test_bug_* below.)"""
    direction, raw, mark = case
    e, t = scenario(mask)  # fresh: a mutated packet may be a control message that changes the table
    h = hot_verdict(raw, direction, mark, t, mask)
    v = judge_packet(e, raw, direction, mark)
    if h is not None and v.message is not None and not isinstance(v.message, codec.Malformed):
        assert (mark if h[0] is None else h[0]) == v.mark_out
        assert h[1] == v.payload
        assert not v.decision.drop


@pytest.mark.parametrize("case", ["truncated_session_id", "l2tp_length_beyond_packet", "udp_length_short"])
def test_fast_paths_apply_the_kernel_match_not_the_full_decode(case):
    """By design the userspace fast path (and the daemon's lanes) apply the kernel rule's match:
    they read up to the tunnel ID. So an outbound packet whose L2TP header is cut after the tunnel
    ID, or whose L2TP / UDP length fields disagree with it, gets its tunnel's SA mark (aliased: the
    client's tunnel ID back) exactly as the kernel map would give it, where judge_packet calls it
    "malformed" and leaves it. Inbound, such packets never change anything either way."""
    e, t = shared(0xFFFFFFFF)
    good = pkt("out", l2tp_data(0xFFFF, body=b""))          # aliased tunnel; L2TP header is 8 octets
    if case == "truncated_session_id":
        raw = pkt("out", l2tp_data(0xFFFF, body=b"")[:6])  # flags, length, tunnel ID; no session ID
    elif case == "l2tp_length_beyond_packet":
        b = bytearray(good)
        b[30:32] = (200).to_bytes(2, "big")
        raw = bytes(b)
    else:
        b = bytearray(good)
        b[24:26] = (8).to_bytes(2, "big")                  # UDP length: header only
        raw = bytes(b)
    v = judge_packet(e, raw, "out", 1)
    assert v.decision.reason == "malformed" and v.mark_out == 1 and v.payload is None
    h = hot_verdict(raw, "out", 1, t)
    assert h is not None and h[0] == 2 and h[1] is not None and h[1][32:34] == b"\x00\x01", h
    p = NfqPacket(raw, 1)
    PacketHandler(e, fast=t).handle_out(p)
    assert p.final == ("accept", 2, h[1]), p.final


# ================================================================================ daemon lanes vs engine
class NfqPacket:
    """Like netfilterqueue.Packet: get_* report what the packet arrived with, set_* record what the
    verdict will carry, and a second verdict is an error."""

    def __init__(self, payload: bytes, mark: int):
        self._payload, self._mark = payload, mark
        self.new_payload: bytes | None = None
        self.new_mark: int | None = None
        self.verdict: str | None = None

    def get_payload(self):
        return self._payload

    def get_mark(self):
        return self._mark

    def set_payload(self, p):
        self.new_payload = p

    def set_mark(self, m):
        self.new_mark = m

    def _give(self, v):
        if self.verdict is not None:
            raise RuntimeError("verdict already given")
        self.verdict = v

    def accept(self):
        self._give("accept")

    def drop(self):
        self._give("drop")

    @property
    def final(self):
        return (self.verdict, self._mark if self.new_mark is None else self.new_mark,
                self._payload if self.new_payload is None else self.new_payload)


def lane(h: PacketHandler, direction: str):
    return h.handle_in if direction == "in" else h.handle_out


_HANDLERS: dict[int, PacketHandler] = {}


@PROPERTY
@given(st.sampled_from(MASKS), data_packets())
def test_daemon_lanes_give_the_engine_verdict(mask, case):
    """The queue callbacks the daemon binds (fast lane, falling back to the engine) end with exactly
    the verdict, mark and bytes judge_packet gives on an engine holding the same table."""
    direction, raw, mark = case
    if mask not in _HANDLERS:
        e2, t2 = scenario(mask)
        _HANDLERS[mask] = PacketHandler(e2, fast=t2)
    h = _HANDLERS[mask]
    e, _ = shared(mask)
    v = judge_packet(e, raw, direction, mark)
    before = (h.hot_in, h.hot_out, h.engine.counters.total())
    p = NfqPacket(raw, mark)
    lane(h, direction)(p)
    assert p.final == ("drop" if v.decision.drop else "accept", v.mark_out, v.payload or raw)
    hot = (h.hot_in, h.hot_out) != before[:2]
    if hot:  # decided without the engine
        assert h.engine.counters.total() == before[2]
        assert v.decision.reason in HOT_REASONS
    if raw[0] == 0x45 and hot_verdict(raw, direction, mark, h.fast, mask) is not None:
        assert hot  # the lanes take what the reference fast path takes (IPv4 without options)


# ================================================================================ root: nft in a netns
CLONE_NEWNET = 0x40000000


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a scratch network namespace and nftables"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


_NETNS_SKIP = _netns_skip_reason()
needs_netns = pytest.mark.skipif(_NETNS_SKIP is not None, reason=_NETNS_SKIP or "")


def _run(*cmd: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, input=input)


_ns_seq = 0


@pytest.fixture
def netns():
    """A scratch network namespace, always deleted afterwards."""
    global _ns_seq
    _ns_seq += 1
    name = f"l2m-fp-{os.getpid()}-{_ns_seq}"
    r = _run("ip", "netns", "add", name)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    try:
        yield name
    finally:
        _run("ip", "netns", "del", name)


@contextmanager
def inside(ns: str):
    """Run this thread in network namespace ``ns`` (sockets created meanwhile live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:  # never run the rest of the session in the scratch netns
                pytest.exit(f"cannot leave network namespace {ns}: errno {ctypes.get_errno()}", returncode=3)
    finally:
        os.close(home)
        os.close(target)


def in_ns(ns: str, *cmd: str, input: str | None = None) -> subprocess.CompletedProcess:
    return _run("ip", "netns", "exec", ns, *cmd, input=input)


@pytest.mark.lab
@needs_netns
@pytest.mark.parametrize("bit", [BIT, 0x100])
def test_nft_check_mode_accepts_the_table_and_its_elements(netns, bit):
    script = fp.table_script("l2tp_marker", bit) + fp.element_script(
        "l2tp_marker", [], [((NAT, 1701, 1), 0x1 | bit), ((OTHER, 4500, 65535), 0x7F | bit)],
        [], [(NAT, 1701, 700, 0x1), (OTHER, 4500, 1, 0x7F)])
    r = in_ns(netns, "nft", "-c", "-f", "-", input=script)
    assert r.returncode == 0, r.stderr
    # Check mode really checks: an element for a map that does not exist is refused.
    r = in_ns(netns, "nft", "-c", "-f", "-", input=fp.element_script("nosuch", [], [((NAT, 1701, 1), 1)], [], []))
    assert r.returncode != 0
    # ... and checking installs nothing.
    assert in_ns(netns, "nft", "list", "ruleset").stdout.strip() == ""


def _elements(ns: str, table: str, name: str) -> set[str]:
    """The elements of a map/set as `nft list` prints them (tunnel IDs in hex, as typeof @th makes
    them integers), hex numbers without leading zeros."""
    r = in_ns(ns, "nft", "list", "map" if name == "out_marks" else "set", "ip", table, name)
    assert r.returncode == 0, r.stderr
    m = re.search(r"elements = \{(.*?)\}", r.stdout, re.S)
    if m is None:
        return set()
    return {re.sub(r"0x[0-9a-f]+", lambda h: hex(int(h.group(), 16)), " ".join(x.split()))
            for x in m.group(1).split(",")}


def _send_data(dst: str, tid: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((dst, 1701))
        s.sendto(l2tp_data(tid), (dst, 1701))
    finally:
        s.close()


@pytest.mark.lab
@needs_netns
def test_kernel_fast_path_in_a_scratch_netns(netns):
    from l2tp_marker.backends.nft_fastpath import KernelFastPath

    table = "l2m_fp_test"
    in_ns(netns, "ip", "link", "set", "lo", "up")
    with inside(netns):
        k = KernelFastPath(table)
        try:
            ok, why = k.is_supported()
            assert ok, why
            assert in_ns(netns, "nft", "list", "tables").stdout.strip() == ""  # the probe table is gone

            t = FastTable()
            t.apply([ev("learn", 1, mark=1), ev("bind", 1, our=700, mark=1),
                     ev("learn", 0xFFFF, client=1, mark=2), ev("bind", 0xFFFF, client=1, our=800, mark=2),
                     ev("learn", 1, mark=5, peer=P6), ev("bind", 1, our=900, mark=5, peer=P6),
                     ev("learn", 1, mark=6, peer=Peer("127.0.0.1", 1701))])
            k.install(t)
            assert t.take_dirty() == (set(), set())
            assert k.check() == []
            # Plain IPv4 tunnels only in the map; every IPv4 inbound key in the set.
            assert _elements(netns, table, "out_marks") == {"192.0.2.10 . 1701 . 0x1 : 0x80000001",
                                                            "127.0.0.1 . 1701 . 0x1 : 0x80000006"}
            assert _elements(netns, table, "in_known") == {"192.0.2.10 . 1701 . 0x2bc . 0x1",
                                                           "192.0.2.10 . 1701 . 0x320 . 0x2"}

            # The kernel marks a known tunnel's outbound data and counts it.
            _send_data("127.0.0.1", 1)
            assert k.counters()["packets_out"] == 1 and k.counters()["bytes_out"] > 0

            # sync sends only the difference: a new tunnel, one gone, one whose mark changed.
            t.apply([ev("learn", 3, mark=3), ev("release", 1, our=700, mark=1),
                     ev("release", 1, mark=6, peer=Peer("127.0.0.1", 1701)),
                     ev("learn", 1, mark=7, peer=Peer("127.0.0.1", 1701))])
            added, deleted = k.stats["elements_added"], k.stats["elements_deleted"]
            assert k.sync(t) == 5
            assert (k.stats["elements_added"] - added, k.stats["elements_deleted"] - deleted) == (2, 3)
            assert _elements(netns, table, "out_marks") == {"192.0.2.10 . 1701 . 0x3 : 0x80000003",
                                                            "127.0.0.1 . 1701 . 0x1 : 0x80000007"}
            assert _elements(netns, table, "in_known") == {"192.0.2.10 . 1701 . 0x320 . 0x2"}
            assert k.sync(t) == 0  # nothing dirty, nothing sent
            commits = k.stats["commits"]

            # Someone deleted an element by hand: its (stale) delete fails the batch, the rest still
            # goes in element by element, and the stale delete is no error.
            r = in_ns(netns, "nft", "delete", "element", "ip", table, "out_marks", "{ 192.0.2.10 . 1701 . 3 }")
            assert r.returncode == 0, r.stderr
            t.apply([ev("release", 3, mark=3), ev("learn", 4, mark=4), ev("bind", 4, our=704, mark=4)])
            assert k.sync(t) == 3
            assert k.stats["errors"] == 0 and k.stats["commits"] == commits + 1
            assert _elements(netns, table, "out_marks") == {"192.0.2.10 . 1701 . 0x4 : 0x80000004",
                                                            "127.0.0.1 . 1701 . 0x1 : 0x80000007"}
            assert _elements(netns, table, "in_known") == {"192.0.2.10 . 1701 . 0x320 . 0x2",
                                                           "192.0.2.10 . 1701 . 0x2c0 . 0x4"}
            assert set(k.out) == {(NAT, 1701, 4), ("127.0.0.1", 1701, 1)}

            # Damage is reported: a flushed chain, then a missing table.
            assert in_ns(netns, "nft", "flush", "chain", "ip", table, "in").returncode == 0
            assert k.check() == [f"nftables chain {table} in does not hold its 2 rules"]
            k.install(t)  # what the daemon's repair does
            assert k.check() == []
            assert _elements(netns, table, "out_marks") == {"192.0.2.10 . 1701 . 0x4 : 0x80000004",
                                                            "127.0.0.1 . 1701 . 0x1 : 0x80000007"}
            assert in_ns(netns, "nft", "delete", "table", "ip", table).returncode == 0
            assert k.check() == [f"nftables table ip {table} is missing"]

            # remove() works whether or not the table is there, and leaves none.
            k.install(t)
            k.remove()
            assert in_ns(netns, "nft", "list", "tables").stdout.strip() == ""
            assert k.check() == [] and not k.out and not k.inb
            k.remove()
        finally:
            k.close()


@pytest.mark.lab
@pytest.mark.skipif(_NETNS_SKIP is not None or shutil.which("iptables-legacy") is None,
                    reason=_NETNS_SKIP or "iptables-legacy is not installed")
@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0xFF])
def test_legacy_rules_with_the_fastpath_bit_install_and_check_clean(netns, mask):
    """The bit match and the MARK rule survive a round trip through libiptc (check() compares what
    it reads back, so a mismatch would reinstall the rules at every repair interval)."""
    from l2tp_marker.backends.iptables_legacy import IptablesLegacyBackend

    rs = build_rules(prefix="L2TP-MARKER", queue_in=1701, queue_out=1702, mark_mask=mask,
                     inbound_match="ipsec", fastpath_bit=BIT)
    b = IptablesLegacyBackend()
    with inside(netns):
        b.install(rs)
        try:
            assert b.check(rs) == []
            saved = in_ns(netns, "iptables-legacy-save", "-t", "mangle").stdout
        finally:
            b.remove(rs)
    rules = [line for line in saved.splitlines() if line.startswith("-A L2TP-MARKER-")]
    assert len(rules) == 4
    assert "--mark 0x80000000/0x80000000 " in rules[0] and "-j NFQUEUE" in rules[0]
    assert rules[1].endswith("-j MARK --set-xmark 0x0/0x80000000")
    assert "--mark 0x80000000/0x80000000 " in rules[2] and "-j NFQUEUE" in rules[2]
    assert rules[3].endswith("-j MARK --set-xmark 0x0/0x80000000")


@pytest.mark.lab
@needs_netns
def test_kernel_fast_path_keeps_mark_bits_outside_mark_mask(netns, tmp_path):
    """mark_mask promises that bits outside it are left as they are (the engine keeps them:
    ``(mark_in & ~mask) | SA``), but the kernel map sets the whole 32-bit mark (``meta mark set ...
    map @out_marks``): with a partial mask the daemon must not use the kernel fast path."""
    from l2tp_marker.config import DaemonConfig
    from l2tp_marker.daemon import Daemon

    class Backend:
        name = "stub"

    mask, foreign, sa = 0x0000FFFF, 0x00AB0000, 0x1
    e = Engine(EngineConfig(mark_mask=mask), clock=FakeClock())
    judge_packet(e, sccrq(1, peer="127.0.0.1"), "in", sa)
    engine_mark = judge_packet(e, pkt("out", l2tp_data(1), peer="127.0.0.1"), "out", foreign).mark_out
    assert engine_mark == foreign | sa

    in_ns(netns, "ip", "link", "set", "lo", "up")
    d = Daemon(DaemonConfig(state_file=tmp_path / "s.json", chain_prefix="FPMASK",
                            engine=EngineConfig(mark_mask=mask)), backend=Backend())
    with inside(netns):
        try:
            d._choose_fastpath()
            # The kernel map sets the whole mark, so with a partial mask the daemon keeps to the
            # per-packet path (which keeps the bits, as the engine does) and says why.
            assert d.kernel is None and d.fastpath_mode == "fallback", (d.fastpath_mode, d.fastpath_reason)
            assert "mark_mask 0xffff is partial" in d.fastpath_reason
        finally:
            if d.kernel is not None:
                d.kernel.remove()
                d.kernel.close()
