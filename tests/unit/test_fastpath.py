"""The fast paths: the changed keys that follow the engine's events (FastChanges), the kernel's map
values and nft text, a kernel follower that syncs only changed keys against the engine (KernelFastPath
on a stand-in for libnftables), the userspace match (:func:`fastpath.hot_verdict` and the daemon's
lanes, both reading the engine's indexes) against the full engine, and, as root in a scratch network
namespace, the nft table itself (``nft -c``, KernelFastPath).

The engine is the reference: whenever a fast path gives a verdict, it must be the verdict
``judge_packet`` gives (same mark, same bytes, never a drop skipped); whatever the kernel holds must
be what a full recomputation from the engine's tunnels gives. Packets are built here by hand
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
from contextlib import contextmanager
from functools import lru_cache
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from l2tp_marker import codec
from l2tp_marker import constants as C
from l2tp_marker import fastpath as fp
from l2tp_marker.backends import nft_rewrite as rw
from l2tp_marker.backends.nft_fastpath import KernelFastPath
from l2tp_marker.daemon import PacketHandler
from l2tp_marker.engine import IN, Engine, EngineConfig, Peer, TableEvent, Tunnel, ipv4_int, key3
from l2tp_marker.fastpath import FastChanges, rewrite16
from l2tp_marker.judge import judge_packet
from l2tp_marker.layers import (AVPAssignedTunnelID, AVPHostName, AVPMessageType, AVPProtocolVersion,
                                AVPResultCode, L2TPv2)
from l2tp_marker.rules import build_rules

from .helpers import ones_sum_ref, GW, NAT, FakeClock, control, data, sccrp, sccrq, stopccn


MISS = None


def hot_verdict(pkt: bytes, direction: str, mark_in: int, engine, mark_mask: int = 0xFFFFFFFF):
    """The reference model of the fast paths' match, written plainly (any IP header length): ``None``
    when it does not apply (the slow path), else ``(mark or None, new packet bytes or None)``.

    Applies the kernel rules' match (fastpath.py's docstring) to the engine's indexes. For
    outbound packets the mark is the engine's: the bits outside ``mark_mask`` kept, the tunnel's SA
    mark in the rest; aliased tunnels get the client's tunnel ID back in the header with the UDP
    checksum updated. The daemon's lanes must agree with it on every packet they take.
    """
    n = len(pkt)
    if n < 34 or pkt[0] >> 4 != 4 or pkt[9] != 17 or pkt[6] & 0x3F or pkt[7]:
        return MISS  # not IPv4/UDP, or a fragment
    u = (pkt[0] & 0x0F) * 4
    h = u + 8
    if n < h + 6 or pkt[h] & 0x80 or pkt[h + 1] & 0x0F != 2:
        return MISS  # too short for a data header, a control message, or not L2TPv2
    t = h + 4 if pkt[h] & 0x40 else h + 2
    tid = (pkt[t] << 8) | pkt[t + 1]
    if direction == IN:
        if pkt[u + 2] != 0x06 or pkt[u + 3] != 0xA5:
            return MISS
        x = engine.in_index.get(key3(int.from_bytes(pkt[12:16], "big"), (pkt[u] << 8) | pkt[u + 1], tid))
        return (None, None) if x is not None and not isinstance(x, list) and x.mark == mark_in else MISS
    if pkt[u] != 0x06 or pkt[u + 1] != 0xA5:
        return MISS
    tun = engine.out_index.get(key3(int.from_bytes(pkt[16:20], "big"), (pkt[u + 2] << 8) | pkt[u + 3], tid))
    if tun is None:
        return MISS
    mark = (mark_in & ~mark_mask & 0xFFFFFFFF) | tun.mark
    if tun.client_tid == tid:
        return (mark, None)
    return (mark, rewrite16(pkt, u, t, tun.client_tid.to_bytes(2, "big")))


OTHER = "203.0.113.5"
V6 = "2001:db8::10"
GW6 = "2001:db8::1"
P = Peer(NAT, 1701)
P6 = Peer(V6, 1701)
BIT = fp.DEFAULT_BIT

PROPERTY = settings(max_examples=600, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def ev(kind: str, visible: int, *, client: int | None = None, our: int | None = None, mark: int = 1,
       peer: Peer = P, previous: int | None = None) -> TableEvent:
    return TableEvent(kind, peer, visible, visible if client is None else client, our, mark, previous)


def v4int(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


def ok(addr: str, port: int, tid: int) -> int:
    """The out key (and the engine's index key) of an IPv4 peer, computed independently."""
    return (v4int(addr) << 32) | (port << 16) | tid


def ik(addr: str, port: int, tid: int, mark: int) -> int:
    """The in key of an IPv4 peer, computed independently."""
    return (ok(addr, port, tid) << 32) | mark


# ================================================================================ keys
def test_keys_are_the_documented_integers_and_print_back_as_nft_text():
    assert key3(v4int(NAT), 1701, 1) == ok(NAT, 1701, 1) == (0xC000020A << 32) | (1701 << 16) | 1
    assert fp.in_key(ok(NAT, 1701, 700), 5) == ik(NAT, 1701, 700, 5) == (ok(NAT, 1701, 700) << 32) | 5
    assert ipv4_int(NAT) == v4int(NAT) and ipv4_int(V6) is None
    assert fp.out_key_text(ok(NAT, 1701, 1)) == (NAT, 1701, 1)
    assert fp.in_key_text(ik(OTHER, 4500, 700, 0x7FFFFFFF)) == (OTHER, 4500, 700, 0x7FFFFFFF)
    # The extremes of every field do not spill into the next one.
    assert fp.out_key_text(ok("255.255.255.255", 65535, 65535)) == ("255.255.255.255", 65535, 65535)
    assert fp.out_key_text(ok("0.0.0.0", 0, 0)) == ("0.0.0.0", 0, 0)
    assert fp.in_key_text(ik("255.255.255.255", 65535, 65535, 0xFFFFFFFF)) == ("255.255.255.255", 65535, 65535,
                                                                                0xFFFFFFFF)
    assert fp.in_key_text(ik("0.0.0.0", 0, 0, 0)) == ("0.0.0.0", 0, 0, 0)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))
def test_key_text_round_trips(a, port, tid, mark):
    addr = str(ipaddress.IPv4Address(a))
    assert ipv4_int(addr) == a
    assert fp.out_key_text(key3(a, port, tid)) == (addr, port, tid)
    assert fp.in_key_text(fp.in_key(key3(a, port, tid), mark)) == (addr, port, tid, mark)


def test_members_of_an_in_index_entry():
    t1, t2 = tun(1, mark=1), tun(2, mark=2)
    assert fp.members(None) == [] and fp.members(t1) == [t1] and fp.members([t1, t2]) == [t1, t2]


def test_engine_indexes_are_keyed_by_integers_for_ipv4_and_tuples_otherwise():
    """What the fast paths read: out_index by the header's key, in_index by the LNS's tunnel ID,
    one Tunnel per key, or a list while the LNS gave one ID to several tunnels."""
    e = scenario(0xFFFFFFFF)
    by_mark = {t.mark: t for t in e.tunnels()}
    assert e.out_index == {ok(NAT, 1701, 1): by_mark[1], ok(NAT, 1701, 0xFFFF): by_mark[2],
                           ok(NAT, 1701, 2): by_mark[3], ok(OTHER, 4500, 5): by_mark[4], (V6, 1701, 1): by_mark[5]}
    assert e.in_index == {ok(NAT, 1701, 700): [by_mark[1], by_mark[3]], ok(NAT, 1701, 800): by_mark[2],
                          (V6, 1701, 900): by_mark[5]}
    # One of the two sharing 700 goes (the client starts over): the entry is one Tunnel again.
    judge_packet(e, control("in", C.SCCCN, tunnel=700), "in", 3)
    v = judge_packet(e, sccrq(2), "in", 3)
    assert [x.kind for x in v.decision.events] == ["release", "learn"]
    assert e.in_index[ok(NAT, 1701, 700)] is by_mark[1]


# ================================================================================ FastChanges
def test_learn_marks_the_out_key_only():
    c = FastChanges()
    assert not c
    c.apply([ev("learn", 1, mark=5)])
    assert c
    assert c.take() == ({ok(NAT, 1701, 1)}, set())
    assert not c and c.take() == (set(), set())


def test_an_aliased_tunnel_is_keyed_by_its_visible_id():
    c = FastChanges()
    c.apply([ev("learn", 0xFFFF, client=1, mark=2, peer=Peer(OTHER, 4500))])
    assert c.take() == ({ok(OTHER, 4500, 0xFFFF)}, set())


def test_bind_marks_the_in_key_with_the_mark_only():
    c = FastChanges()
    c.apply([ev("bind", 1, our=700, mark=5)])
    assert c.take() == (set(), {ik(NAT, 1701, 700, 5)})


def test_rebind_marks_the_previous_and_the_new_in_key():
    c = FastChanges()
    c.apply([ev("bind", 0xFFFF, client=1, our=701, mark=2, previous=700)])
    assert c.take() == (set(), {ik(NAT, 1701, 700, 2), ik(NAT, 1701, 701, 2)})


def test_release_marks_the_out_key_and_the_in_key_of_a_bound_tunnel():
    c = FastChanges()
    c.apply([ev("release", 0xFFFF, client=1, our=800, mark=2)])
    assert c.take() == ({ok(NAT, 1701, 0xFFFF)}, {ik(NAT, 1701, 800, 2)})
    c.apply([ev("release", 3, mark=3)])  # never bound: no in key
    assert c.take() == ({ok(NAT, 1701, 3)}, set())


def test_changes_collect_until_taken():
    c = FastChanges()
    c.apply([ev("learn", 1), ev("bind", 1, our=700)])
    c.apply([ev("release", 1, our=700), ev("learn", 1, mark=3), ev("learn", 2, peer=Peer(NAT, 4500))])
    assert c.take() == ({ok(NAT, 1701, 1), ok(NAT, 4500, 2)}, {ik(NAT, 1701, 700, 1)})
    assert not c


def test_ipv6_events_are_ignored():
    c = FastChanges()
    c.apply([ev("learn", 1, mark=4, peer=P6), ev("bind", 1, our=900, mark=4, peer=P6),
             ev("bind", 1, our=901, mark=4, peer=P6, previous=900), ev("release", 1, our=901, mark=4, peer=P6)])
    assert not c and c.take() == (set(), set())


# ================================================================================ kernel values
def tun(visible: int, *, client: int | None = None, mark: int = 5, addr: str = NAT, port: int = 1701,
        our: int | None = None) -> Tunnel:
    return Tunnel(Peer(addr, port), mark, visible if client is None else client, visible, 0.0, 0.0, our)


@pytest.mark.parametrize("t,bit,want", [
    (tun(1, mark=5), BIT, 0x80000005),                           # plain: the SA mark plus the bit
    (tun(7, mark=0x7FFFFFFF, port=4500), BIT, 0xFFFFFFFF),
    (tun(1, mark=0x1), 0x100, 0x101),                            # another bit
    (tun(1, mark=5, our=700), BIT, 0x80000005),                  # bound or not: the same
    (tun(0xFFFF, client=1, mark=2), BIT, None),                  # aliased: the alias maps instead
    (tun(1, mark=0), BIT, None),                                 # zero mark
    (tun(1, mark=0x80000001), BIT, None),                        # the mark uses the bit
    (tun(1, mark=0x100), 0x100, None),
    (None, BIT, None),                                           # no tunnel
])
def test_kernel_out_value(t, bit, want):
    assert fp.kernel_out_value(t, bit) == want


@pytest.mark.parametrize("t,bit,want", [
    (tun(0xFFFF, client=1, mark=2), BIT, (0x80000002, 1)),       # alias_marks value, real tunnel ID
    (tun(0xFFFE, client=0xFFFF, mark=0x7FFFFFFF), BIT, (0xFFFFFFFF, 0xFFFF)),
    (tun(0xFFFF, client=1, mark=2), 0x100, (0x102, 1)),
    (tun(1, mark=2), BIT, None),                                 # not aliased: out_marks
    (tun(0xFFFF, client=1, mark=0), BIT, None),
    (tun(0xFFFF, client=1, mark=0x80000002), BIT, None),
    (None, BIT, None),
])
def test_kernel_alias_value(t, bit, want):
    assert fp.kernel_alias_value(t, bit) == want


@pytest.mark.parametrize("key,bit,want", [
    ((NAT, 1701, 700, 1), BIT, True),
    ((NAT, 1701, 700, 3), BIT, True),          # the other tunnel the LNS gave 700
    ((NAT, 1701, 800, 2), BIT, True),          # aliased tunnels' inbound keys too (no rewrite inbound)
    ((NAT, 1701, 700, 2), BIT, False),         # 700 is not bound to mark 2
    ((NAT, 1701, 701, 1), BIT, False),         # no such gateway tunnel ID
    ((NAT, 4500, 700, 1), BIT, False),         # another peer port
    ((OTHER, 4500, 5, 4), BIT, False),         # learned, not bound: 5 is the client's ID
    ((NAT, 1701, 700, 1), 0x1, False),         # the mark uses the bit
    ((NAT, 1701, 700, 3), 0x2, False),
    ((NAT, 1701, 700, 1), 0x2, True),
])
def test_kernel_in_ok_reads_the_engine(key, bit, want):
    assert fp.kernel_in_ok(shared(0xFFFFFFFF), ik(*key), bit) is want


def test_kernel_in_ok_zero_and_bit_marks():
    e = Engine(EngineConfig(), clock=FakeClock())
    judge_packet(e, sccrq(1), "in", 0x80000001)
    judge_packet(e, sccrp(1, 700), "out", 0)
    assert e.in_index[ok(NAT, 1701, 700)].mark == 0x80000001
    assert not fp.kernel_in_ok(e, ik(NAT, 1701, 700, 0x80000001), BIT)
    assert fp.kernel_in_ok(e, ik(NAT, 1701, 700, 0x80000001), 0x100)
    assert not fp.kernel_in_ok(e, ik(NAT, 1701, 700, 0), 0x100)


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
    udp sport 1701 @th,64,2 0x1 @th,76,4 2 meta mark set ip daddr . udp dport . @th,96,16 map @out_marks counter accept
    udp sport 1701 @th,64,2 0x0 @th,76,4 2 meta mark set ip daddr . udp dport . @th,80,16 map @out_marks counter accept
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

# ================================================================================ the kernel follower
MAPS = ("out_marks", "in_known", rw.ALIAS_MARKS, rw.ALIAS_IDS)
_ELEMENTS = re.compile(r"^(add|delete) element ip (\S+) (\S+) \{ (.*) \}$")


class FakeNft:
    """Stands in for libnftables (``run(text) -> (rc, out, err)``): keeps the elements of the fast
    path's maps and set the way the kernel would, from the scripts KernelFastPath sends. Strict, and
    atomic like an nft transaction: a script that deletes an element that is not there, or adds one
    that is, changes nothing and fails."""

    def __init__(self, table: str = "t"):
        self.table = table
        self.maps: dict[str, dict] | None = None   # None: no table
        self.scripts: list[str] = []
        self.failures = 0

    def run(self, text: str, *, json_out: bool = False) -> tuple[int, str, str]:
        self.scripts.append(text)
        maps = None if self.maps is None else {n: dict(m) for n, m in self.maps.items()}
        for line in text.splitlines():
            if line == f"delete table ip {self.table}":
                maps = None
            elif line == f"table ip {self.table} {{":
                maps = {n: {} for n in MAPS}
            elif (m := _ELEMENTS.match(line)) is not None:
                op, table, name, body = m.groups()
                if table != self.table or maps is None or name not in maps:
                    return self._fail(f"no such set {table} {name}")
                for elem in body.split(", "):
                    key, value = self._parse(name, elem)
                    if op == "delete":
                        if key not in maps[name]:
                            return self._fail(f"delete: no element {elem}")
                        del maps[name][key]
                    else:
                        if key in maps[name]:
                            return self._fail(f"add: element {elem} exists")
                        maps[name][key] = value
        self.maps = maps
        return 0, "", ""

    def _fail(self, why: str) -> tuple[int, str, str]:
        self.failures += 1
        return 1, "", f"Error: {why}"

    @staticmethod
    def _parse(name: str, elem: str):
        if name == "in_known":
            a, p, t, m = elem.split(" . ")
            return (a, int(p), int(t), int(m, 0)), True
        k, _, v = elem.partition(" : ")
        a, p, t = k.split(" . ")
        return (a, int(p), int(t)), None if not v else int(v, 0)

    def close(self) -> None:
        pass


def want_kernel(e: Engine, bit: int, aliases: bool) -> dict[str, dict]:
    """What the kernel should hold, recomputed from the engine's tunnels (independently of the
    fastpath module): IPv4 peers with a usable mark; plain tunnels in out_marks, aliased ones in
    the alias maps (when the rewrite rules are in place), every bound one in in_known."""
    want: dict[str, dict] = {n: {} for n in MAPS}
    for t in e.tunnels():
        if ":" in t.peer.addr or not t.mark or t.mark & bit:
            continue
        key = (t.peer.addr, t.peer.port, t.visible_tid)
        if t.visible_tid == t.client_tid:
            want["out_marks"][key] = t.mark | bit
        elif aliases:
            want[rw.ALIAS_MARKS][key] = t.mark | bit
            want[rw.ALIAS_IDS][key] = t.client_tid
        if t.our_tid is not None:
            want["in_known"][(t.peer.addr, t.peer.port, t.our_tid, t.mark)] = True
    return want


def assert_follows(k: KernelFastPath, nft: FakeNft, e: Engine, aliases: bool = True) -> None:
    """The kernel holds exactly the engine's state, and the adapter knows which keys it holds."""
    assert nft.maps == want_kernel(e, k.bit, aliases)
    assert {fp.out_key_text(x) for x in k.out} == set(nft.maps["out_marks"])
    assert {fp.in_key_text(x) for x in k.inb} == set(nft.maps["in_known"])
    assert {fp.out_key_text(x) for x in k.alias} == set(nft.maps[rw.ALIAS_MARKS]) == set(nft.maps[rw.ALIAS_IDS])


@contextmanager
def rewrite_rules_verified():
    """install() as if the aliased tunnels' rewrite rules went in and verified (netlink, root)."""
    with mock.patch.object(rw, "install_rewrite_rules", lambda table, chain="out": None):
        yield


def kernel(aliases: bool = True, bit: int = BIT) -> tuple[KernelFastPath, FakeNft]:
    nft = FakeNft()
    return KernelFastPath("t", bit, nft=nft, aliases=aliases), nft


@pytest.mark.parametrize("aliases", [True, False])
def test_install_puts_every_ipv4_tunnel_of_the_engine_in_the_kernel(aliases):
    e = scenario(0xFFFFFFFF)
    k, nft = kernel(aliases)
    with rewrite_rules_verified():
        k.install(e)
    assert k.installed and k.aliases_in_kernel is aliases
    assert_follows(k, nft, e, aliases)
    assert nft.maps["out_marks"] == {(NAT, 1701, 1): 0x80000001, (NAT, 1701, 2): 0x80000003,
                                     (OTHER, 4500, 5): 0x80000004}
    assert set(nft.maps["in_known"]) == {(NAT, 1701, 700, 1), (NAT, 1701, 700, 3), (NAT, 1701, 800, 2)}
    assert nft.maps[rw.ALIAS_IDS] == ({(NAT, 1701, 0xFFFF): 1} if aliases else {})
    assert k.stats["errors"] == 0 and nft.failures == 0
    # Nothing changed: nothing to send.
    n = len(nft.scripts)
    assert k.sync(e, FastChanges()) == 0 and len(nft.scripts) == n
    # A key looked at again that is not in the kernel and should not be: nothing to send either.
    c = FastChanges()
    c.apply([ev("release", 9, our=709, mark=1), ev("release", 1, our=700, mark=1, peer=Peer(OTHER, 1701))])
    assert c and k.sync(e, c) == 0 and len(nft.scripts) == n and not c
    # A map key that is there is deleted and added again (no copy of the values is kept to compare
    # with); a set key that is there and should be is left alone.
    before = {name: dict(m) for name, m in nft.maps.items()}
    c.apply([ev("learn", 1, mark=1), ev("bind", 0xFFFF, client=1, our=800, mark=2)])
    assert k.sync(e, c) == 2 and nft.maps == before
    assert commands(nft.scripts[-1]) == {("delete", "out_marks", frozenset({"192.0.2.10 . 1701 . 1"})),
                                         ("add", "out_marks", frozenset({"192.0.2.10 . 1701 . 1 : 0x80000001"}))}
    assert k.stats["errors"] == nft.failures == 0


def test_install_with_rewrite_rules_that_fail_keeps_aliased_tunnels_out():
    from l2tp_marker.backends import BackendError

    def broken(table, chain="out"):
        raise BackendError("no netlink here")

    e = scenario(0xFFFFFFFF)
    k, nft = kernel()
    with mock.patch.object(rw, "install_rewrite_rules", broken):
        k.install(e)
    assert not k.aliases_in_kernel and "no netlink here" in k.alias_reason
    assert_follows(k, nft, e, aliases=False)


def commands(script: str) -> set[tuple[str, str, frozenset[str]]]:
    """An element script as (add/delete, map, elements): the order of elements within one command
    is not part of the contract."""
    out = set()
    for line in script.splitlines():
        op, _, name, body = _ELEMENTS.match(line).groups()
        out.add((op, name, frozenset(body.split(", "))))
    return out


def test_sync_sends_only_the_changed_keys_deleting_and_adding_again():
    clock = FakeClock()
    e = Engine(EngineConfig(pending_timeout=600), clock=clock)
    changes = FastChanges()

    def j(p, d, m):
        v = judge_packet(e, p, d, m)
        changes.apply(v.decision.events)
        return v

    j(sccrq(1), "in", 1)
    j(sccrp(1, 700), "out", 0)
    j(sccrq(1), "in", 2)                                  # aliased to 0xFFFF
    k, nft = kernel()
    with rewrite_rules_verified():
        k.install(e)
    changes.take()                                        # what the daemon does after install()
    assert_follows(k, nft, e)
    assert nft.maps[rw.ALIAS_MARKS] == {(NAT, 1701, 0xFFFF): 0x80000002}
    j(sccrp(0xFFFF, 800), "out", 0)                       # bind: only the in key
    j(sccrq(3), "in", 3)                                  # learn: only the out key
    added, deleted = k.stats["elements_added"], k.stats["elements_deleted"]
    assert k.sync(e, changes) == 2
    assert (k.stats["elements_added"] - added, k.stats["elements_deleted"] - deleted) == (2, 0)
    assert commands(nft.scripts[-1]) == {("add", "out_marks", frozenset({"192.0.2.10 . 1701 . 3 : 0x80000003"})),
                                         ("add", "in_known", frozenset({"192.0.2.10 . 1701 . 800 . 0x2"}))}
    assert_follows(k, nft, e)
    j(sccrp(0xFFFF, 801), "out", 0)                       # re-bind: the old in key goes, the new comes
    j(stopccn("out", 1, 700), "out", 0)                   # the LNS stops tunnel 1 ...
    clock.advance(C.STOPCCN_HOLD_SECONDS)
    changes.apply(e.expire())                             # ... and it is released
    j(sccrq(1), "in", 5)                                  # its ID is free again: a new tunnel, mark 5
    added, deleted = k.stats["elements_added"], k.stats["elements_deleted"]
    assert k.sync(e, changes) == 5
    assert (k.stats["elements_added"] - added, k.stats["elements_deleted"] - deleted) == (2, 3)
    assert commands(nft.scripts[-1]) == {
        ("delete", "out_marks", frozenset({"192.0.2.10 . 1701 . 1"})),
        ("delete", "in_known", frozenset({"192.0.2.10 . 1701 . 800 . 0x2"})),
        ("delete", "in_known", frozenset({"192.0.2.10 . 1701 . 700 . 0x1"})),
        ("add", "out_marks", frozenset({"192.0.2.10 . 1701 . 1 : 0x80000005"})),
        ("add", "in_known", frozenset({"192.0.2.10 . 1701 . 801 . 0x2"}))}
    assert_follows(k, nft, e)
    assert k.sync(e, changes) == 0                        # nothing changed since
    assert k.stats["errors"] == nft.failures == 0


def test_sync_goes_element_by_element_when_the_transaction_fails():
    """Someone deleted an element by hand: the stale delete fails the transaction, the rest goes in
    element by element, and the stale delete is no error."""
    clock = FakeClock()
    e = Engine(EngineConfig(pending_timeout=600), clock=clock)
    changes = FastChanges()

    def j(p, d, m):
        changes.apply(judge_packet(e, p, d, m).decision.events)

    j(sccrq(1), "in", 1)
    j(sccrp(1, 700), "out", 0)
    j(sccrq(3), "in", 3)
    k, nft = kernel(aliases=False)
    k.install(e)
    changes.take()
    del nft.maps["out_marks"][(NAT, 1701, 3)]
    j(stopccn("out", 3, 700), "out", 0)
    clock.advance(C.STOPCCN_HOLD_SECONDS)
    changes.apply(e.expire())                              # tunnel 3 goes
    j(sccrq(4), "in", 4)
    j(sccrp(4, 704), "out", 0)
    commits = k.stats["commits"]
    assert k.sync(e, changes) == 3                         # delete of 3 (stale), add of 4 and of its in key
    assert k.stats["errors"] == 0 and k.stats["commits"] == commits + 1
    assert nft.failures == 2                               # the transaction, then the stale delete alone
    assert_follows(k, nft, e, aliases=False)
    assert k.out == {ok(NAT, 1701, 1), ok(NAT, 1701, 4)}


def test_an_inbound_key_two_tunnels_share_stays_until_both_are_released():
    # xl2tpd may hand one gateway tunnel ID to two tunnels of the same peer (and SA).
    clock = FakeClock()
    e = Engine(EngineConfig(pending_timeout=600), clock=clock)
    changes = FastChanges()

    def j(p, d, m):
        changes.apply(judge_packet(e, p, d, m).decision.events)

    for tid in (1, 2):
        j(sccrq(tid), "in", 2)
        j(sccrp(tid, 700), "out", 0)
    assert [t.visible_tid for t in e.in_index[ok(NAT, 1701, 700)]] == [1, 2]
    k, nft = kernel()
    k.install(e)
    changes.take()
    assert nft.maps["in_known"] == {(NAT, 1701, 700, 2): True}
    j(stopccn("out", 1, 700), "out", 0)
    clock.advance(C.STOPCCN_HOLD_SECONDS)
    changes.apply(e.expire())
    assert changes.inb == {ik(NAT, 1701, 700, 2)}          # looked at again ...
    assert k.sync(e, changes) == 1                          # ... and kept: only tunnel 1's out key goes
    assert nft.maps["in_known"] == {(NAT, 1701, 700, 2): True} and e.in_index[ok(NAT, 1701, 700)].visible_tid == 2
    j(stopccn("out", 2, 700), "out", 0)
    clock.advance(C.STOPCCN_HOLD_SECONDS)
    changes.apply(e.expire())
    assert k.sync(e, changes) == 2
    assert_follows(k, nft, e)
    assert not nft.maps["in_known"] and not k.inb
    assert k.stats["errors"] == nft.failures == 0


def test_engine_clear_empties_the_kernel_through_the_changes():
    e = scenario(0xFFFFFFFF)
    k, nft = kernel()
    with rewrite_rules_verified():
        k.install(e)
    changes = FastChanges()
    changes.apply(e.clear())
    assert (changes.out, changes.inb) == (
        {ok(NAT, 1701, 1), ok(NAT, 1701, 0xFFFF), ok(NAT, 1701, 2), ok(OTHER, 4500, 5)},
        {ik(NAT, 1701, 700, 1), ik(NAT, 1701, 700, 3), ik(NAT, 1701, 800, 2)})
    assert k.sync(e, changes) == 7               # 3 out_marks, 1 aliased tunnel (both maps), 3 in_known
    assert_follows(k, nft, e)
    assert all(not m for m in nft.maps.values()) and not (k.out or k.inb or k.alias)


_PEERS = (Peer(NAT, 1701), Peer(NAT, 4500), Peer(OTHER, 1701), P6)


@lru_cache(maxsize=None)
def ctl(peer: Peer, direction: str, msg_type: int, tunnel: int = 0, assigned: int | None = None) -> bytes:
    """A control message from (``in``) or to (``out``) ``peer``, over IPv4 or IPv6."""
    avps = [AVPMessageType(msg_type=msg_type)]
    if msg_type in (C.SCCRQ, C.SCCRP):
        avps += [AVPProtocolVersion(), AVPHostName(hostname=b"x")]
    if assigned is not None:
        avps.append(AVPAssignedTunnelID(tunnel_id=assigned))
    if msg_type == C.STOPCCN:
        avps.append(AVPResultCode(result_code=1))
    v6 = ":" in peer.addr
    gw = GW6 if v6 else GW
    ip = (IPv6 if v6 else IP)(src=peer.addr, dst=gw) if direction == "in" else (IPv6 if v6 else IP)(src=gw, dst=peer.addr)
    udp = UDP(sport=peer.port, dport=1701) if direction == "in" else UDP(sport=1701, dport=peer.port)
    return bytes(ip / udp / L2TPv2(tunnel_id=tunnel, avps=avps))


_FOLLOW_OPS = st.lists(st.tuples(
    st.sampled_from(["sccrq"] * 4 + ["sccrp"] * 4 + ["scccn", "stopccn", "tick", "sync", "sync", "reinstall"]),
    st.sampled_from(_PEERS),
    st.sampled_from([1, 2, 3, 0xFFFF, 0xFFFE]),  # the client's tunnel ID (SCCRQ), the visible one (to the client)
    st.integers(700, 702),                      # the LNS's tunnel ID
    st.sampled_from([1, 2, 3, BIT | 1]),        # the SA mark (the last one the kernel cannot take)
    st.sampled_from([1, 31, 61, 301]),          # seconds (tick)
    st.integers(0, 9),                          # 0-7: about the n-th tunnel of the table, 8-9: peer and tid as drawn
), min_size=5, max_size=60)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_FOLLOW_OPS, st.booleans())
def test_a_follower_syncing_only_changed_keys_equals_a_full_recomputation(ops, aliases):
    """Any life of the engine's table (learn, alias, bind, re-bind, shared gateway IDs, StopCCN,
    idle and pending expiry, eviction, IPv6 peers, marks the kernel cannot take): every key whose
    kernel entry changed since the last sync is among the changed keys, and KernelFastPath.sync,
    which looks only at those keys, leaves the kernel equal to a full recomputation from the
    engine (and to what install() would put there)."""
    clock = FakeClock()
    e = Engine(EngineConfig(max_tunnels_per_mark=3, idle_timeout=300, pending_timeout=60), clock=clock)
    changes, probe = FastChanges(), FastChanges()   # what the daemon keeps; a copy for the check
    k, nft = kernel(aliases)

    def apply(events):
        changes.apply(events)
        probe.apply(events)

    with rewrite_rules_verified():
        k.install(e)
        last = want_kernel(e, BIT, aliases)
        for op, peer, tid, our, mark, secs, pick in ops:
            tunnels = sorted(e.tunnels(), key=lambda t: (t.peer.addr, t.peer.port, t.visible_tid))
            if op in ("sccrp", "scccn", "stopccn") and pick < 8 and tunnels:
                t = tunnels[pick % len(tunnels)]
                peer, tid, mark = t.peer, t.visible_tid, t.mark
                our = our if op == "sccrp" or t.our_tid is None else t.our_tid
            if op == "sccrq":
                apply(judge_packet(e, ctl(peer, "in", C.SCCRQ, 0, tid), "in", mark).decision.events)
            elif op == "sccrp":
                apply(judge_packet(e, ctl(peer, "out", C.SCCRP, tid, our), "out", 0).decision.events)
            elif op == "scccn":
                apply(judge_packet(e, ctl(peer, "in", C.SCCCN, our), "in", mark).decision.events)
            elif op == "stopccn":
                apply(judge_packet(e, ctl(peer, "out", C.STOPCCN, tid, our), "out", 0).decision.events)
            elif op == "tick":
                clock.advance(secs)
                apply(e.expire())
            elif op == "reinstall":                 # what the daemon's repair does
                k.install(e)
                changes.take()
                probe.take()
                last = want_kernel(e, BIT, aliases)
                assert_follows(k, nft, e, aliases)
            else:
                now = want_kernel(e, BIT, aliases)
                dout, din = probe.take()
                for name in ("out_marks", rw.ALIAS_MARKS, rw.ALIAS_IDS):
                    changed = {x for x in now[name].keys() | last[name].keys()
                               if now[name].get(x) != last[name].get(x)}
                    assert changed <= {fp.out_key_text(x) for x in dout}, name
                changed = now["in_known"].keys() ^ last["in_known"].keys()
                assert changed <= {fp.in_key_text(x) for x in din}
                k.sync(e, changes)
                assert not changes
                assert_follows(k, nft, e, aliases)
                last = now
        k.sync(e, changes)
        assert_follows(k, nft, e, aliases)
        assert k.stats["errors"] == nft.failures == 0
        fresh, fresh_nft = kernel(aliases)
        fresh.install(e)
        assert fresh_nft.maps == nft.maps


def test_a_follower_fed_with_the_engine_events_mirrors_the_engine_through_a_tunnel_life():
    clock = FakeClock()
    e = Engine(EngineConfig(max_tunnels_per_mark=3, idle_timeout=300, pending_timeout=60), clock=clock)
    changes = FastChanges()
    k, nft = kernel()

    def step(p, d, m):
        v = judge_packet(e, p, d, m)
        changes.apply(v.decision.events)
        k.sync(e, changes)
        assert_follows(k, nft, e)
        return v

    with rewrite_rules_verified():
        k.install(e)
        step(sccrq(1), "in", 1)
        step(sccrp(1, 700), "out", 0)
        step(control("in", C.SCCCN, tunnel=700), "in", 1)
        step(sccrq(1), "in", 2)                                # aliased to 0xFFFF
        step(sccrp(0xFFFF, 700), "out", 0)                     # the LNS picked 700 again (other mark)
        step(sccrq(2), "in", 2)
        step(sccrp(2, 700), "out", 0)                          # ... and again, same mark 2: a shared key
        assert [t.mark for t in fp.members(e.in_index[ok(NAT, 1701, 700)])] == [1, 2, 2]
        assert nft.maps["in_known"].keys() == {(NAT, 1701, 700, 1), (NAT, 1701, 700, 2)}
        v = step(sccrp(2, 701), "out", 0)                      # SCCRP retransmitted with another ID
        assert v.decision.events == (TableEvent("bind", P, 2, 2, 701, 2, previous_tid=700),)
        # The re-bound tunnel's old key stays: the aliased tunnel still has it.
        assert nft.maps["in_known"].keys() == {(NAT, 1701, 700, 1), (NAT, 1701, 700, 2), (NAT, 1701, 701, 2)}
        step(stopccn("in", 700, 1), "in", 1)                   # client 1 stops
        clock.advance(C.STOPCCN_HOLD_SECONDS)
        step(data("out", 0xFFFF, 1), "out", 0)                 # the next packet expires it
        assert (NAT, 1701, 1) not in nft.maps["out_marks"] and (NAT, 1701, 700, 1) not in nft.maps["in_known"]
        step(sccrq(1), "in", 1)                                # client 1 again: its ID is free now
        for tid in (10, 11, 12):                               # mark 3 floods: its oldest is evicted
            step(sccrq(tid), "in", 3)
        step(sccrq(13), "in", 3)
        assert (NAT, 1701, 10) not in nft.maps["out_marks"] and (NAT, 1701, 13) in nft.maps["out_marks"]
        clock.advance(300)
        changes.apply(e.expire())                              # the LNS went silent: all idle
        k.sync(e, changes)
        assert_follows(k, nft, e)
        assert len(e) == 0 and not e.out_index and not e.in_index
        assert all(not m for m in nft.maps.values()) and not k.out and not k.inb and not k.alias
        # A restart: the state file's events and a fresh install give the same kernel content.
        step(sccrq(1), "in", 1)
        step(sccrp(1, 702), "out", 0)
        step(sccrq(1), "in", 2)
        e2 = Engine(EngineConfig(), clock=FakeClock())
        c2 = FastChanges()
        c2.apply(e2.import_state(e.export_state()))
        assert c2.take() == ({ok(NAT, 1701, 1), ok(NAT, 1701, 0xFFFF)}, {ik(NAT, 1701, 702, 1)})
        assert e2.out_index.keys() == e.out_index.keys() and e2.in_index.keys() == e.in_index.keys()
        k2, nft2 = kernel()
        k2.install(e2)
        assert nft2.maps == nft.maps
        assert k.stats["errors"] == nft.failures == 0


# ================================================================================ hot path vs engine
# Hand-built packets (independent of the codec and of scapy).
_sum16 = ones_sum_ref  # independent of the codec (tests/unit/helpers.py)


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


def scenario(mask: int, *, enforce: str = "drop") -> Engine:
    """An engine whose table was built by judging real control packets:

    * 192.0.2.10:1701 client tid 1, mark 1: plain, gateway tid 700;
    * 192.0.2.10:1701 client tid 1, mark 2: aliased to 0xFFFF, gateway tid 800;
    * 192.0.2.10:1701 client tid 2, mark 3: plain, gateway tid 700 too (xl2tpd picked it twice);
    * 203.0.113.5:4500 client tid 5, mark 4: learned, no SCCRP yet;
    * [2001:db8::10]:1701 client tid 1, mark 5: plain over IPv6, gateway tid 900.
    """
    c = _control_packets()
    e = Engine(EngineConfig(mark_mask=mask, enforce=enforce), clock=FakeClock())
    for p, d, m, reason in ((c["rq1"], "in", 1, "sccrq_learned"), (c["rp1"], "out", 0, "owner_mark_set"),
                            (sccrq(1), "in", 2, "sccrq_aliased"), (c["rqff"], "out", 0, "owner_mark_set"),
                            (c["rq2"], "in", 3, "sccrq_learned"), (c["rp2"], "out", 0, "owner_mark_set"),
                            (c["rq5"], "in", 4, "sccrq_learned"),
                            (c["rq1v6"], "in", 5, "sccrq_learned"), (c["rp1v6"], "out", 0, "owner_mark_set")):
        v = judge_packet(e, p, d, m)
        assert v.decision.reason == reason
    assert len(e) == 5
    return e


_SCENARIOS: dict[int, Engine] = {}


def shared(mask: int) -> Engine:
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


def _check_against_engine(e: Engine, mask: int, direction: str, raw: bytes, mark: int):
    h = hot_verdict(raw, direction, mark, e, mask)
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
    # (inbound: arriving with exactly its tunnel's mark, on a gateway tunnel ID the LNS gave to
    # that tunnel alone; see test_a_gateway_tunnel_id_given_twice_takes_the_slow_path).
    dg = v.datagram
    if (dg is not None and dg.version == 4 and not getattr(v.message, "control", True)
            and (v.decision.reason in ("owner_mark", "owner_mark_set")
                 or (v.decision.reason == "inbound_known" and not mark & ~mask
                     and not isinstance(e.in_index.get(ok(dg.src, dg.sport, v.message.tunnel_id)), list)))):
        assert h is not None, v.decision
    return h, v


@PROPERTY
@given(st.sampled_from(MASKS), data_packets())
def test_hot_verdict_equals_the_engine_on_data_packets(mask, case):
    direction, raw, mark = case
    e = shared(mask)
    _check_against_engine(e, mask, direction, raw, mark)


@pytest.mark.parametrize("mask", MASKS)
def test_hot_verdict_on_each_kind_of_tunnel(mask):
    e = shared(mask)
    foreign = 0x10000 if mask != 0xFFFFFFFF else 0
    for l in (True, False):
        for csum in (True, False):
            kw = {"l": l}
            # Plain outbound: the SA mark, bytes untouched (bits outside the mask kept).
            h, _ = _check_against_engine(e, mask, "out", pkt("out", l2tp_data(1, **kw), csum=csum), 7 | foreign)
            assert h == (1 | foreign, None)
            # Aliased outbound: the client's own tunnel ID back in the header.
            raw = pkt("out", l2tp_data(0xFFFF, **kw), csum=csum)
            h, _ = _check_against_engine(e, mask, "out", raw, 1)
            assert h[0] == 2
            msg = codec.decode_l2tp(h[1], 28)
            off = msg.tunnel_id_offset
            assert msg.tunnel_id == 1 and off == (32 if l else 30)
            # Only the tunnel ID and the UDP checksum changed; no checksum stays no checksum.
            assert h[1][:26] == raw[:26] and h[1][28:off] == raw[28:off] and h[1][off + 2:] == raw[off + 2:]
            assert (h[1][26:28] == b"\0\0") is (not csum)
            # Learned, not bound yet: the LNS's first answers are data too (rare, but keyed alike).
            h, _ = _check_against_engine(e, mask, "out", pkt("out", l2tp_data(5, **kw), OTHER, 4500, csum=csum), 0)
            assert h == (4, None)
            # Inbound: the aliased tunnel's gateway ID 800, with its mark (no rewrite inbound).
            h, v = _check_against_engine(e, mask, "in", pkt("in", l2tp_data(800, **kw), csum=csum), 2)
            assert h == (None, None) and v.decision.reason == "inbound_known"
            h, v = _check_against_engine(e, mask, "in", pkt("in", l2tp_data(800, **kw), csum=csum), 1)
            assert h is None and v.decision.reason == "sa_conflict" and v.decision.drop
            # The two tunnels the LNS gave ID 700: each mark its own, the others a conflict.
            for m in (1, 3):
                h, v = _check_against_engine(e, mask, "in", pkt("in", l2tp_data(700, **kw), csum=csum), m)
                assert h is None and v.decision.reason == "inbound_known"
            h, v = _check_against_engine(e, mask, "in", pkt("in", l2tp_data(700, **kw), csum=csum), 2)
            assert h is None and v.decision.reason == "sa_conflict" and v.decision.drop


def test_a_gateway_tunnel_id_given_twice_takes_the_slow_path():
    """xl2tpd may give one gateway tunnel ID to two tunnels of one peer (told apart by mark). The
    engine's in_index then holds a list, and the userspace fast paths (hot_verdict and the daemon's
    lanes) leave such packets to the engine, which gives each mark its verdict; the kernel set holds
    a key per mark, so the kernel fast path still takes them."""
    e = shared(0xFFFFFFFF)
    assert [t.mark for t in e.in_index[ok(NAT, 1701, 700)]] == [1, 3]
    h = PacketHandler(scenario(0xFFFFFFFF))
    for m, reason, verdict in ((1, "inbound_known", "accept"), (3, "inbound_known", "accept"),
                               (2, "sa_conflict", "drop")):
        raw = pkt("in", l2tp_data(700))
        assert hot_verdict(raw, "in", m, e) is None
        assert judge_packet(e, raw, "in", m).decision.reason == reason
        p = NfqPacket(raw, m)
        h.handle_in(p)
        assert p.final == (verdict, m, raw) and h.hot_in == 0
        assert fp.kernel_in_ok(e, ik(NAT, 1701, 700, m), BIT) is (reason == "inbound_known")
    # Once one of them is gone the other is alone on the ID again, and back on the fast path.
    judge_packet(h.engine, control("in", C.SCCCN, tunnel=700), "in", 3)
    assert [x.kind for x in judge_packet(h.engine, sccrq(2), "in", 3).decision.events] == ["release", "learn"]
    p = NfqPacket(pkt("in", l2tp_data(700)), 1)
    h.handle_in(p)
    assert p.final[0] == "accept" and h.hot_in == 1


def test_alias_rewrite_checksum_edge_cases():
    """The incremental checksum update where one's complement has two zeros: a packet that arrives
    with checksum 0xFFFF (computed 0), and one whose rewrite computes 0 (sent as 0xFFFF, never 0)."""
    e = shared(0xFFFFFFFF)

    def out(tid, x):
        return pkt("out", l2tp_data(tid, body=b"\xff\x03" + x.to_bytes(2, "big")))

    arrives = next(x for x in range(0x10000) if out(0xFFFF, x)[26:28] == b"\xff\xff")
    leaves = next(x for x in range(0x10000) if out(1, x)[26:28] == b"\xff\xff")
    for x in (arrives, leaves):
        raw = out(0xFFFF, x)
        h, v = _check_against_engine(e, 0xFFFFFFFF, "out", raw, 0)
        assert h[1] == out(1, x)  # as if the LNS had sent the client's ID, checksum computed afresh
        assert h[1][26:28] != b"\0\0"
        p = NfqPacket(raw, 0)
        PacketHandler(e).handle_out(p)
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
    e = shared(0xFFFFFFFF)
    assert hot_verdict(raw, direction, mark, e) is None, why
    assert hot_verdict(raw, direction, mark, e, 0xFFFF) is None, why


def test_hot_verdict_misses_ipv6_and_other_protocols():
    e = shared(0xFFFFFFFF)
    # The scenario's IPv6 tunnel's data: the engine marks it, the fast path leaves it to the engine.
    assert e.out_index[(V6, 1701, 1)].mark == 5 and e.in_index[(V6, 1701, 900)].mark == 5
    v6 = bytes(IPv6(src=GW6, dst=V6) / UDP(sport=1701, dport=1701) / l2tp_data(1))
    assert judge_packet(e, v6, "out", 0).decision.reason == "owner_mark_set"
    assert hot_verdict(v6, "out", 0, e) is None
    v6 = bytes(IPv6(src=V6, dst=GW6) / UDP(sport=1701, dport=1701) / l2tp_data(900))
    assert judge_packet(e, v6, "in", 5).decision.reason == "inbound_known"
    assert hot_verdict(v6, "in", 5, e) is None
    # The same bytes as a known IPv4 packet but another IP version or protocol.
    raw = bytearray(pkt("out", l2tp_data(1)))
    assert hot_verdict(bytes(raw), "out", 0, e) == (1, None)
    for i, b in ((0, 0x65), (0, 0x55), (9, 6)):
        bad = bytearray(raw)
        bad[i] = b
        assert hot_verdict(bytes(bad), "out", 0, e) is None, (i, b)


@PROPERTY
@given(st.binary(max_size=120), st.sampled_from(["in", "out"]), st.integers(0, 0xFFFFFFFF), st.sampled_from(MASKS))
def test_hot_verdict_never_raises_on_any_bytes(raw, direction, mark, mask):
    e = shared(mask)
    h = hot_verdict(raw, direction, mark, e, mask)
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
    e = scenario(mask)  # fresh: a mutated packet may be a control message that changes the table
    h = hot_verdict(raw, direction, mark, e, mask)
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
    e = shared(0xFFFFFFFF)
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
    h = hot_verdict(raw, "out", 1, e)
    assert h is not None and h[0] == 2 and h[1] is not None and h[1][32:34] == b"\x00\x01", h
    p = NfqPacket(raw, 1)
    PacketHandler(e).handle_out(p)
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
        _HANDLERS[mask] = PacketHandler(scenario(mask))  # the lanes read its engine's indexes
    h = _HANDLERS[mask]
    e = shared(mask)
    v = judge_packet(e, raw, direction, mark)
    before = (h.hot_in, h.hot_out, h.engine.counters.total())
    p = NfqPacket(raw, mark)
    lane(h, direction)(p)
    assert p.final == ("drop" if v.decision.drop else "accept", v.mark_out, v.payload or raw)
    hot = (h.hot_in, h.hot_out) != before[:2]
    if hot:  # decided without the engine
        assert h.engine.counters.total() == before[2]
        assert v.decision.reason in HOT_REASONS
    # The lanes take exactly what the reference fast path takes, for IPv4 without options.
    assert hot == (raw[0] == 0x45 and hot_verdict(raw, direction, mark, h.engine, mask) is not None)


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
        "l2tp_marker", [], [((NAT, 1701, 1), 0x1 | bit), (fp.out_key_text(ok(OTHER, 4500, 65535)), 0x7F | bit)],
        [], [(NAT, 1701, 700, 0x1), fp.in_key_text(ik(OTHER, 4500, 1, 0x7F))])
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
    r = in_ns(ns, "nft", "list", "set" if name == "in_known" else "map", "ip", table, name)
    assert r.returncode == 0, r.stderr
    m = re.search(r"elements = \{(.*?)\}", r.stdout, re.S)
    if m is None:
        return set()
    return {re.sub(r"0x[0-9a-f]+", lambda h: hex(int(h.group(), 16)), " ".join(x.split()))
            for x in m.group(1).split(",")}


def _listed(want: dict[str, dict]) -> dict[str, set[str]]:
    """want_kernel() as `nft list` prints it (see _elements)."""
    return {name: {f"{k[0]} . {k[1]} . {k[2]:#x}" + (f" . {k[3]:#x}" if name == "in_known" else f" : {v:#x}")
                   for k, v in elems.items()} for name, elems in want.items()}


def _kernel_holds(ns: str, table: str) -> dict[str, set[str]]:
    return {name: _elements(ns, table, name) for name in MAPS}


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
    """KernelFastPath against the real nftables: install(engine) puts the engine's tunnels in, the
    kernel marks a tunnel's data, sync(engine, changes) sends the changed keys only; the engine's
    state is built by judging real control packets."""
    table, lo = "l2m_fp_test", "127.0.0.1"
    clock = FakeClock()
    e = Engine(EngineConfig(pending_timeout=600, idle_timeout=3600), clock=clock)
    changes = FastChanges()

    def j(p, d, m):
        v = judge_packet(e, p, d, m)
        changes.apply(v.decision.events)
        return v

    def stop(tid, peer=NAT):  # the LNS stops a tunnel, and it is released after the hold time
        j(stopccn("out", tid, 700, peer=peer), "out", 0)

    def hold_over():
        clock.advance(C.STOPCCN_HOLD_SECONDS)
        changes.apply(e.expire())

    j(sccrq(1), "in", 1)
    j(sccrp(1, 700), "out", 0)
    assert j(sccrq(1), "in", 2).decision.reason == "sccrq_aliased"      # visible 0xFFFF
    j(sccrp(0xFFFF, 800), "out", 0)
    j(ctl(P6, "in", C.SCCRQ, 0, 1), "in", 5)
    j(ctl(P6, "out", C.SCCRP, 1, 900), "out", 0)
    j(sccrq(1, peer=lo), "in", 6)
    assert len(e) == 4
    in_ns(netns, "ip", "link", "set", "lo", "up")
    with inside(netns):
        k = KernelFastPath(table)
        try:
            supported, why = k.is_supported()
            assert supported, why
            assert in_ns(netns, "nft", "list", "tables").stdout.strip() == ""  # the probe table is gone

            k.install(e)
            changes.take()                                  # what the daemon does after install()
            assert k.check() == []
            # Plain IPv4 tunnels in the map, aliased ones in the alias maps (when the rewrite rules
            # verified); every IPv4 inbound key in the set; the IPv6 tunnel nowhere.
            assert _elements(netns, table, "out_marks") == {"192.0.2.10 . 1701 . 0x1 : 0x80000001",
                                                            "127.0.0.1 . 1701 . 0x1 : 0x80000006"}
            assert _elements(netns, table, "in_known") == {"192.0.2.10 . 1701 . 0x2bc . 0x1",
                                                           "192.0.2.10 . 1701 . 0x320 . 0x2"}
            if k.aliases_in_kernel:
                assert _elements(netns, table, rw.ALIAS_MARKS) == {"192.0.2.10 . 1701 . 0xffff : 0x80000002"}
                assert _elements(netns, table, rw.ALIAS_IDS) == {"192.0.2.10 . 1701 . 0xffff : 0x1"}
                assert k.alias == {ok(NAT, 1701, 0xFFFF)}
            assert _kernel_holds(netns, table) == _listed(want_kernel(e, BIT, k.aliases_in_kernel))
            assert k.out == {ok(NAT, 1701, 1), ok(lo, 1701, 1)}
            assert k.inb == {ik(NAT, 1701, 700, 1), ik(NAT, 1701, 800, 2)}

            # The kernel marks a known tunnel's outbound data and counts it.
            _send_data(lo, 1)
            assert k.counters()["packets_out"] == 1 and k.counters()["bytes_out"] > 0

            # sync sends only the difference: a new tunnel, one gone, one whose mark changed.
            stop(1)
            stop(1, lo)
            hold_over()
            j(sccrq(3), "in", 3)
            j(sccrq(1, peer=lo), "in", 7)                   # the same key with another mark
            added, deleted = k.stats["elements_added"], k.stats["elements_deleted"]
            assert k.sync(e, changes) == 5
            assert (k.stats["elements_added"] - added, k.stats["elements_deleted"] - deleted) == (2, 3)
            assert _elements(netns, table, "out_marks") == {"192.0.2.10 . 1701 . 0x3 : 0x80000003",
                                                            "127.0.0.1 . 1701 . 0x1 : 0x80000007"}
            assert _elements(netns, table, "in_known") == {"192.0.2.10 . 1701 . 0x320 . 0x2"}
            assert _kernel_holds(netns, table) == _listed(want_kernel(e, BIT, k.aliases_in_kernel))
            assert k.sync(e, changes) == 0  # nothing changed, nothing sent
            commits = k.stats["commits"]

            # Someone deleted an element by hand: its (stale) delete fails the batch, the rest still
            # goes in element by element, and the stale delete is no error.
            r = in_ns(netns, "nft", "delete", "element", "ip", table, "out_marks", "{ 192.0.2.10 . 1701 . 3 }")
            assert r.returncode == 0, r.stderr
            stop(3)
            hold_over()
            j(sccrq(4), "in", 4)
            j(sccrp(4, 704), "out", 0)
            assert k.sync(e, changes) == 3
            assert k.stats["errors"] == 0 and k.stats["commits"] == commits + 1
            assert _elements(netns, table, "out_marks") == {"192.0.2.10 . 1701 . 0x4 : 0x80000004",
                                                            "127.0.0.1 . 1701 . 0x1 : 0x80000007"}
            assert _elements(netns, table, "in_known") == {"192.0.2.10 . 1701 . 0x320 . 0x2",
                                                           "192.0.2.10 . 1701 . 0x2c0 . 0x4"}
            assert k.out == {ok(NAT, 1701, 4), ok(lo, 1701, 1)}
            assert _kernel_holds(netns, table) == _listed(want_kernel(e, BIT, k.aliases_in_kernel))

            # Damage is reported: a flushed chain, then a missing table.
            assert in_ns(netns, "nft", "flush", "chain", "ip", table, "in").returncode == 0
            assert k.check() == k.check(full=False) == [f"nftables chain {table} in holds 0 rules, not 2"]
            # Two rules of someone else's: the count is right, only the full check sees it.
            for _ in range(2):
                assert in_ns(netns, "nft", "add", "rule", "ip", table, "in", "counter").returncode == 0
            assert k.check(full=False) == []
            assert k.check() == [f"nftables chain {table} in holds a rule that is not ours"]
            k.install(e)  # what the daemon's repair does
            changes.take()
            assert k.check() == [] and k.check(full=False) == []
            assert _elements(netns, table, "out_marks") == {"192.0.2.10 . 1701 . 0x4 : 0x80000004",
                                                            "127.0.0.1 . 1701 . 0x1 : 0x80000007"}
            assert _kernel_holds(netns, table) == _listed(want_kernel(e, BIT, k.aliases_in_kernel))
            assert in_ns(netns, "nft", "delete", "table", "ip", table).returncode == 0
            assert k.check() == [f"nftables table ip {table} is missing"]
            assert k.check(full=False) == [f"nftables table ip {table} is missing"]

            # remove() works whether or not the table is there, and leaves none.
            k.install(e)
            k.remove()
            assert in_ns(netns, "nft", "list", "tables").stdout.strip() == ""
            assert k.check() == [] and not k.out and not k.inb and not k.alias
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
