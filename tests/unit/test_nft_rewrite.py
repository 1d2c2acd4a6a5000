"""The kernel rewrite of aliased tunnels' IDs (backends/nft_rewrite.py).

Pure parts always: the text for fastpath.table_script, the element script, the netlink expressions
(encoded and decoded by pyroute2, no socket), and the checks that read them back.

Root-only parts in scratch namespaces (docs/fastpath-notes.md §0): a gateway, the client (behind
veth ``vgood``, reached with ``fwmark 0x80000002``) and a dead end (behind ``vdead``, the main
table, i.e. "no mark"); both answer as 192.0.2.10. The gateway sends L2TP data from
198.51.100.1:1701. Checksums are judged at the client (UDP socket, ``InCsumErrors``, and our own
sum over an AF_PACKET capture) in three offload modes:

* ``sw``      ``tx off`` on both gateway veths: the socket computes the checksum before netfilter
              (CHECKSUM_NONE), so the kernel's incremental update is what keeps it valid;
* ``partial`` ``tx on`` for the dead end (the route at send time), ``tx off`` for the client: the
              skb is CHECKSUM_PARTIAL when rewritten and finished in software after the reroute;
* ``hw``      all on: CHECKSUM_PARTIAL all the way, the receiving veth trusts it, so only
              delivery, tunnel ID and mark are judged.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from l2tp_marker import fastpath as fp
from l2tp_marker.backends import BackendError
from l2tp_marker.backends import nft_rewrite as rw

TABLE = "l2tp_marker"
CLIENT, GW = "192.0.2.10", "198.51.100.1"
ALIAS, REAL, UNKNOWN = 65535, 1, 7
MARK = 0x80000002                     # SA mark 2 with the fast-path bit
KEY = (CLIENT, 1701, ALIAS)
PPP = bytes.fromhex("ff03c021090100081122334455")  # LCP Echo-Request


def full_script(table: str = TABLE, bit: int = fp.DEFAULT_BIT) -> str:
    """fastpath.table_script with this module's additions where the lead puts them."""
    lines = fp.table_script(table, bit).splitlines()
    i = lines.index("  set in_known {")
    lines[i:i] = rw.table_map_lines()
    j = lines.index("  chain in {") - 1        # the "  }" that closes chain out
    lines[j:j] = rw.table_rule_lines()
    return "\n".join(lines) + "\n"


# =========================================================================== pure
def test_table_additions_exact_text():
    assert rw.table_map_lines() == [
        "  map alias_marks {", "    typeof ip daddr . udp dport . @th,96,16 : meta mark", "  }",
        "  map alias_ids {", "    typeof ip daddr . udp dport . @th,96,16 : @th,96,16", "  }"]
    assert rw.table_rule_lines() == [
        "    udp sport 1701 @th,64,2 0x1 @th,76,4 2 "
        "meta mark set ip daddr . udp dport . @th,96,16 map @alias_marks counter",
        "    udp sport 1701 @th,64,2 0x0 @th,76,4 2 "
        "meta mark set ip daddr . udp dport . @th,80,16 map @alias_marks counter",
        "    udp sport 1701 @th,64,2 0x1 @th,76,4 2 udp checksum 0 "
        "@th,96,16 set ip daddr . udp dport . @th,96,16 map @alias_ids counter",
        "    udp sport 1701 @th,64,2 0x0 @th,76,4 2 udp checksum 0 "
        "@th,80,16 set ip daddr . udp dport . @th,80,16 map @alias_ids counter"]


def test_full_script_puts_the_alias_mark_rules_after_the_out_marks_rules():
    out = full_script().split("  chain out {")[1].split("  }")[0].splitlines()
    rules = [x.strip() for x in out if "map @" in x]
    assert [r.split("map @")[1].split()[0] for r in rules] == [
        "out_marks", "out_marks", "alias_marks", "alias_marks", "alias_ids", "alias_ids"]
    assert all("udp checksum 0" in r for r in rules[4:])   # the raw write only where there is no checksum


def test_alias_element_script():
    k2 = (CLIENT, 4500, 65534)
    assert rw.alias_element_script(TABLE, [k2], [(KEY, MARK, REAL)]) == (
        "delete element ip l2tp_marker alias_marks { 192.0.2.10 . 4500 . 65534 }\n"
        "delete element ip l2tp_marker alias_ids { 192.0.2.10 . 4500 . 65534 }\n"
        "add element ip l2tp_marker alias_marks { 192.0.2.10 . 1701 . 65535 : 0x80000002 }\n"
        "add element ip l2tp_marker alias_ids { 192.0.2.10 . 1701 . 65535 : 0x1 }\n")
    assert rw.alias_element_script(TABLE, [], []) == ""


@pytest.mark.parametrize("l_bit, off, tt", [(True, 12, b"\x40"), (False, 10, b"\x00")])
def test_rewrite_exprs_match_like_out_marks_and_write_with_the_checksum_update(l_bit, off, tt):
    ex = rw.rewrite_exprs(l_bit)
    names = [n for n, _ in ex]
    assert names == ["meta", "cmp", "payload", "cmp", "payload", "bitwise", "cmp", "payload", "bitwise", "cmp",
                     "payload", "cmp", "payload", "payload", "payload", "lookup", "payload", "counter"]
    assert ex[3][1]["data"] == (1701).to_bytes(2, "big")                    # udp sport 1701
    assert (ex[5][1]["mask"], ex[6][1]["data"]) == (b"\xc0", tt)            # T=0, L
    assert (ex[8][1]["mask"], ex[9][1]["data"]) == (b"\x0f", b"\x02")       # version 2
    assert ex[10][1]["offset"] == 6 and ex[11][1] == {"sreg": 1, "op": 1, "data": b"\0\0"}  # checksum != 0
    assert [a["offset"] for _, a in ex[12:15]] == [16, 2, off]              # daddr . dport . alias
    assert ex[15][1] == {"set": "alias_ids", "sreg": 1, "dreg": 1}
    assert ex[16][1] == {"sreg": 1, "base": 2, "offset": off, "len": 2, "csum_type": 1, "csum_offset": 6}


def _encode_decode(exprs, note=None):
    """A NEWRULE message as pyroute2 sends it, decoded as it comes back from a dump (no socket)."""
    from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

    m = rw._rule_msg("add", TABLE, "out", exprs=exprs, note=note)
    m["nfgen_family"] = 2
    m.encode()
    d = nft_rule_msg(m.data)
    d.decode()
    return d


@pytest.mark.parametrize("l_bit", [True, False])
def test_netlink_encoding_round_trips_and_passes_the_check(l_bit):
    d = _encode_decode(rw.rewrite_exprs(l_bit), rw.comment(l_bit))
    assert d.get_attr("NFTA_RULE_USERDATA") == f"l2tp-marker alias rewrite L={int(l_bit)}"
    got = rw.from_netlink(d.get_attr("NFTA_RULE_EXPRESSIONS"))
    assert got == rw.rewrite_exprs(l_bit)
    assert rw.check_rule(got, l_bit) == []
    assert rw.check_rule(got, not l_bit) != []   # the other layout's offsets


def _with_write(l_bit, **change):
    ex = [(n, dict(a)) for n, a in rw.rewrite_exprs(l_bit)]
    w = next(a for n, a in ex if n == "payload" and "sreg" in a)
    for k, v in change.items():
        if v is None:
            w.pop(k)
        else:
            w[k] = v
    return rw.from_netlink(_encode_decode(ex).get_attr("NFTA_RULE_EXPRESSIONS"))


def test_check_rule_names_each_payload_write_problem():
    # What an nft text round trip leaves: no checksum attributes at all (kernel: csum_type 0).
    p = rw.check_rule(_with_write(True, csum_type=None, csum_offset=None), True)
    assert any("checksum type 0 instead of INET" in x for x in p), p
    assert any("checksum offset 0 instead of 6" in x for x in p), p
    assert rw.check_rule(_with_write(True, csum_offset=8), True) == [
        "rewrite rule L=1: checksum offset 8 instead of 6"]
    assert rw.check_rule(_with_write(False, offset=12), False) == [
        "rewrite rule L=0: writes at transport header + 12 instead of transport header + 10"]
    assert rw.check_rule(_with_write(True, len=4), True) == ["rewrite rule L=1: writes 4 bytes instead of 2"]
    assert rw.check_rule(_with_write(True, csum_type=2), True)[0].startswith(
        "rewrite rule L=1: checksum type 2 instead of INET")


def test_check_rule_names_other_differences_by_position():
    ex = [(n, dict(a)) for n, a in rw.rewrite_exprs(True)]
    ex[3] = ("cmp", {"sreg": 1, "op": 0, "data": (1702).to_bytes(2, "big")})
    got = rw.from_netlink(_encode_decode(ex).get_attr("NFTA_RULE_EXPRESSIONS"))
    assert rw.check_rule(got, True)[0].startswith("rewrite rule L=1: expression 4 is cmp")
    assert rw.check_rule(got[:-1], True) == ["rewrite rule L=1: 17 expressions instead of 18"]


def _mark_rule():
    return [("lookup", {"set": "alias_marks", "sreg": 1, "dreg": 1}), ("meta", {"key": 3, "sreg": 1})]


def test_check_chain():
    r1, r0 = rw.rewrite_exprs(True), rw.rewrite_exprs(False)
    good = [(1, None, []), (2, None, []), (3, None, _mark_rule()), (4, None, _mark_rule()),
            (5, rw.comment(True), r1), (6, rw.comment(False), r0)]
    assert rw.check_chain(good) == []
    assert rw.check_chain(good[:5]) == ["rewrite rule L=0 is missing"]
    assert rw.check_chain(good + [(7, rw.comment(True), r1)]) == ["rewrite rule L=1 is there 2 times"]
    early = [good[0], good[4], good[2], good[3], good[5]]
    assert rw.check_chain(early) == [
        "rewrite rule L=1 runs before a rule marking from alias_marks (the mark lookup is keyed by the alias, "
        "so it must come first)"]
    assert rw.check_chain(good[4:]) == ["no rule marks from map alias_marks (the table_script additions are missing)"]
    # A rule with our comment but the other layout's write is still found and reported.
    assert rw.check_chain(good[:4] + [(5, rw.comment(True), r0), (6, rw.comment(False), r0)])[0].startswith(
        "rewrite rule L=1: writes at transport header + 10")


def test_check_maps():
    ok = {"alias_marks": (True, 12, 4), "alias_ids": (True, 12, 2)}
    assert rw.check_maps(ok, TABLE) == []
    assert rw.check_maps({"alias_marks": ok["alias_marks"]}, TABLE) == [
        "nftables map alias_ids is missing from table ip l2tp_marker"]
    assert rw.check_maps({**ok, "alias_ids": (False, 12, None)}, TABLE) == [
        "nftables alias_ids in table ip l2tp_marker is a set, not a map"]
    assert "key/data length 12/4 instead of 12/2" in rw.check_maps({**ok, "alias_ids": (True, 12, 4)}, TABLE)[0]


# =========================================================================== root: namespaces
def _root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "needs iproute2's 'ip' and the nft command"
    try:
        from l2tp_marker.backends.nft_fastpath import Nft

        Nft().close()
    except BackendError as exc:
        return str(exc)
    probe = f"nrwp{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"'ip netns add' does not work here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_SKIP = _root_skip_reason()
root = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
HAVE_ETHTOOL = shutil.which("ethtool") is not None

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_ns(ns: str, fn, *args):
    """Run ``fn(*args)`` in a fresh thread that first enters network namespace ``ns`` (setns is per
    thread), so sockets, libnftables and pyroute2 it opens live there; the thread then ends."""
    box: dict = {}

    def run():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            box["r"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["e"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("r")


def sh(*argv: str, check: bool = True) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


def nft(ns: str, text: str) -> str:
    def run():
        from l2tp_marker.backends.nft_fastpath import Nft

        n = Nft()
        try:
            rc, out, err = n.run(text)
        finally:
            n.close()
        if rc != 0:
            raise RuntimeError(f"nft: {err.strip()}")
        return out
    return in_ns(ns, run)


class Topo:
    """gw, client (behind vgood, table 102 via fwmark MARK) and dead end (behind vdead, main)."""

    def __init__(self, mode: str):
        p = f"nrw{os.getpid()}"
        self.gw, self.client, self.dead = f"{p}-gw", f"{p}-c", f"{p}-d"
        self.mode = mode
        self.socks: list[socket.socket] = []

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()
        for ns in (self.gw, self.client, self.dead):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def _build(self) -> None:
        gw = self.gw
        for ns in (gw, self.client, self.dead):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", gw, "addr", "add", f"{GW}/32", "dev", "lo")
        for ns, dev in ((self.client, "vgood"), (self.dead, "vdead")):
            sh("ip", "link", "add", dev, "netns", gw, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{CLIENT}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", f"{GW}/32", "dev", "eth0")
            sh("ip", "-n", gw, "link", "set", dev, "up")
            mac = re.search(r"link/ether (\S+)", sh("ip", "-n", ns, "link", "show", "eth0")).group(1)
            sh("ip", "-n", gw, "neigh", "replace", CLIENT, "lladdr", mac, "dev", dev, "nud", "permanent")
            for k in ("all", "default", "eth0"):
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.{k}.rp_filter=0")
        sh("ip", "-n", gw, "route", "add", f"{CLIENT}/32", "dev", "vdead", "src", GW)
        sh("ip", "-n", gw, "route", "add", f"{CLIENT}/32", "dev", "vgood", "src", GW, "table", "102")
        sh("ip", "-n", gw, "rule", "add", "fwmark", hex(MARK), "lookup", "102", "pref", "102")
        off = {"sw": ("vdead", "vgood"), "partial": ("vgood",), "hw": ()}[self.mode]
        for dev in off:
            sh("ip", "netns", "exec", gw, "ethtool", "-K", dev, "tx", "off")
        # The table, the rewrite rules, one aliased tunnel; the sender; both receivers.
        nft(gw, full_script())
        in_ns(gw, rw.install_rewrite_rules, TABLE)
        nft(gw, rw.alias_element_script(TABLE, [], [(KEY, MARK, REAL)]))
        self.tx = self._sock(gw, socket.SOCK_DGRAM, (GW, 1701))
        self.rx = {ns: self._sock(ns, socket.SOCK_DGRAM, ("0.0.0.0", 1701)) for ns in (self.client, self.dead)}
        self.cap = self._sock(self.client, "packet", None)

    def _sock(self, ns: str, kind, bind):
        def make():
            if kind == "packet":
                s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
                s.bind(("eth0", 0x0800))
            else:
                s = socket.socket(socket.AF_INET, kind)
                s.bind(bind)
            s.settimeout(0.05)
            return s
        s = in_ns(ns, make)
        self.socks.append(s)
        return s

    # ------------------------------------------------------------------ traffic
    def send(self, l2tp: bytes, no_check: bool = False) -> None:
        if no_check:
            self.tx.setsockopt(socket.SOL_SOCKET, 11, 1)   # SO_NO_CHECK: UDP checksum 0
        try:
            self.tx.sendto(l2tp, (CLIENT, 1701))
        finally:
            if no_check:
                self.tx.setsockopt(socket.SOL_SOCKET, 11, 0)

    @staticmethod
    def drain(s: socket.socket, quiet: float = 0.3) -> list[bytes]:
        got, end = [], time.monotonic() + quiet
        while time.monotonic() < end:
            try:
                got.append(s.recv(65535))
                end = time.monotonic() + quiet
            except (TimeoutError, BlockingIOError, socket.timeout):
                pass
        return got

    def csum_errors(self, ns: str) -> int:
        snmp = sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp").splitlines()
        head, vals = [x.split() for x in snmp if x.startswith("Udp:")][:2]
        return int(vals[head.index("InCsumErrors")])

    def counters(self) -> dict[str, int]:
        """Packets counted by the alias rules of chain out, by what they do."""
        res = {}
        for line in nft(self.gw, f"list chain ip {TABLE} out").splitlines():
            m = re.search(r"counter packets (\d+)", line)
            if m is None:
                continue
            lb = "L=1" if "@th,96,16" in line else "L=0"
            kind = ("rewrite" if "comment" in line else "raw" if "@alias_ids" in line
                    else "mark" if "@alias_marks" in line else "out_marks")
            res[f"{kind} {lb}"] = res.get(f"{kind} {lb}", 0) + int(m.group(1))
        return res


def data_l(tid: int) -> bytes:
    return struct.pack("!HHHH", 0x4002, 8 + len(PPP), tid, 9) + PPP


def data_nol(tid: int) -> bytes:
    return struct.pack("!HHH", 0x0002, tid, 9) + PPP


def tid_of(l2tp: bytes) -> int:
    return struct.unpack_from("!H", l2tp, 4 if l2tp[0] & 0x40 else 2)[0]


def udp_sum_ok(ip: bytes) -> bool:
    """Our own check of a captured IPv4/UDP packet's checksum (0 = none)."""
    ihl = (ip[0] & 0x0F) * 4
    udp = ip[ihl:ihl + struct.unpack_from("!H", ip, ihl + 4)[0]]
    if udp[6:8] == b"\0\0":
        return True
    data = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp)) + udp
    data += b"\0" * (len(data) & 1)
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def _mode_param(mode: str):
    marks = [] if mode == "hw" or HAVE_ETHTOOL else [
        pytest.mark.skip(reason="ethtool is not installed (apt-get install ethtool): cannot turn tx offload off")]
    return pytest.param(mode, marks=marks, id=mode)


@root
@pytest.mark.parametrize("mode", [_mode_param(m) for m in ("sw", "partial", "hw")])
def test_kernel_rewrites_aliased_data_with_a_valid_checksum_and_marks_it(mode):
    with Topo(mode) as t:
        assert in_ns(t.gw, rw.verify_rewrite_rules, TABLE) == []
        errs0 = {ns: t.csum_errors(ns) for ns in (t.client, t.dead)}
        t.send(data_l(ALIAS))
        t.send(data_nol(ALIAS))
        t.send(data_l(ALIAS), no_check=True)   # checksum 0 (as xl2tpd sends): marked, raw rewrite
        t.send(data_l(UNKNOWN))                # not aliased: untouched, unmarked
        got_client = t.drain(t.rx[t.client])
        got_dead = t.drain(t.rx[t.dead])
        captured = t.drain(t.cap, 0.05)
        errs1 = {ns: t.csum_errors(ns) for ns in (t.client, t.dead)}
        counters = t.counters()

    # Marked (so routed by fwmark to the client) and rewritten to the real ID, both layouts, with
    # and without a checksum.
    assert [(bool(p[0] & 0x40), tid_of(p)) for p in got_client] == [(True, REAL), (False, REAL), (True, REAL)], got_client
    assert got_client == [data_l(REAL), data_nol(REAL), data_l(REAL)]   # nothing else changed
    # Not marked (main table: the dead end) and not rewritten.
    assert [tid_of(p) for p in got_dead] == [UNKNOWN], got_dead
    assert errs1 == errs0
    assert counters == {"out_marks L=1": 0, "out_marks L=0": 0, "mark L=1": 2, "mark L=0": 1,
                        "raw L=1": 1, "raw L=0": 0, "rewrite L=1": 1, "rewrite L=0": 1}, counters
    # What arrived at the client, checked by hand (a PARTIAL skb carries only the checksum seed).
    assert len(captured) == 3
    assert [tid_of(p[28:]) for p in captured] == [REAL, REAL, REAL]
    assert all(p[26:28] != b"\0\0" for p in captured[:2]) and captured[2][26:28] == b"\0\0"
    if mode != "hw":
        assert all(udp_sum_ok(p) for p in captured[:2]), [p.hex() for p in captured]


@root
@pytest.mark.skipif(not HAVE_ETHTOOL, reason="ethtool is not installed (apt-get install ethtool): the "
                    "lost checksum update only shows with software checksums (tx offload off)")
def test_verify_catches_an_nft_text_round_trip_and_install_repairs_it():
    with Topo("sw") as t:
        assert in_ns(t.gw, rw.verify_rewrite_rules, TABLE) == []
        in_ns(t.gw, rw.install_rewrite_rules, TABLE)            # idempotent
        assert in_ns(t.gw, rw.verify_rewrite_rules, TABLE) == []
        listing = nft(t.gw, f"list chain ip {TABLE} out")
        assert listing.count('comment "l2tp-marker alias rewrite L=') == 2

        # An admin's round trip: nft prints the rule like a raw write and re-creates it as one.
        sh("ip", "netns", "exec", t.gw, "sh", "-c",
           f"nft list table ip {TABLE} > /tmp/nrw-{os.getpid()}.nft && nft delete table ip {TABLE} && "
           f"nft -f /tmp/nrw-{os.getpid()}.nft; rc=$?; rm -f /tmp/nrw-{os.getpid()}.nft; exit $rc")
        problems = in_ns(t.gw, rw.verify_rewrite_rules, TABLE)
        assert any(p.startswith("rewrite rule L=1: checksum type 0 instead of INET") for p in problems), problems
        assert any(p.startswith("rewrite rule L=0: checksum type 0 instead of INET") for p in problems), problems
        # ...and it matters: the rewritten packet now has a wrong checksum and is dropped.
        e0 = t.csum_errors(t.client)
        t.send(data_l(ALIAS))
        assert t.drain(t.rx[t.client]) == []
        assert t.csum_errors(t.client) == e0 + 1

        # A reinstall replaces the round-tripped copies (found by their comment).
        in_ns(t.gw, rw.install_rewrite_rules, TABLE)
        assert in_ns(t.gw, rw.verify_rewrite_rules, TABLE) == []
        assert nft(t.gw, f"list chain ip {TABLE} out").count("@alias_ids") == 4   # 2 raw (checksum 0) + 2 with the update
        t.send(data_l(ALIAS))
        assert t.drain(t.rx[t.client]) == [data_l(REAL)]
        assert t.csum_errors(t.client) == e0 + 1

        # A deleted rule is reported; remove_rewrite_rules takes ours away and nothing else.
        handle = re.search(r'comment "l2tp-marker alias rewrite L=0" # handle (\d+)',
                           sh("ip", "netns", "exec", t.gw, "nft", "-a", "list", "chain", "ip", TABLE, "out")).group(1)
        nft(t.gw, f"delete rule ip {TABLE} out handle {handle}")
        assert in_ns(t.gw, rw.verify_rewrite_rules, TABLE) == ["rewrite rule L=0 is missing"]
        assert in_ns(t.gw, rw.remove_rewrite_rules, TABLE) == 1
        assert in_ns(t.gw, rw.remove_rewrite_rules, TABLE) == 0
        assert nft(t.gw, f"list chain ip {TABLE} out").count("map @") == 6   # our text rules stay


@root
def test_install_errors_are_clear_and_change_nothing(monkeypatch):
    ns = f"nrw{os.getpid()}-e"
    sh("ip", "netns", "add", ns)
    try:
        with pytest.raises(BackendError, match=r"chain ip nosuch out is missing"):
            in_ns(ns, rw.install_rewrite_rules, "nosuch")
        assert in_ns(ns, rw.verify_rewrite_rules, "nosuch") == ["nftables chain ip nosuch out is missing"]
        assert in_ns(ns, rw.remove_rewrite_rules, "nosuch") == 0
        # The plain fast-path table, without the additions.
        nft(ns, fp.table_script(TABLE, fp.DEFAULT_BIT))
        with pytest.raises(BackendError, match=r"map alias_marks is missing .* map alias_ids is missing.* "
                           r"no rule in the chain marks from map alias_marks"):
            in_ns(ns, rw.install_rewrite_rules, TABLE)
        # The maps without the mark rules.
        nft(ns, full_script().replace(rw.table_rule_lines()[0] + "\n", "").replace(rw.table_rule_lines()[1] + "\n", ""))
        with pytest.raises(BackendError, match=r"^cannot install .*: no rule in the chain marks from map alias_marks"):
            in_ns(ns, rw.install_rewrite_rules, TABLE)
        # alias_ids with the mark's data type: the kernel would accept a 2-byte write from it, but
        # the value would be the mark's first two bytes.
        # (Without the raw-write text rules, which nft itself would refuse with that map.)
        raw = [line + "\n" for line in rw.table_rule_lines() if "@alias_ids" in line]
        script = full_script().replace(": @th,96,16\n", ": meta mark\n")
        for line in raw:
            script = script.replace(line, "")
        nft(ns, script)
        with pytest.raises(BackendError, match=r"alias_ids .* key/data length 12/4 instead of 12/2"):
            in_ns(ns, rw.install_rewrite_rules, TABLE)
        assert "@alias_ids" not in nft(ns, f"list chain ip {TABLE} out")
        # Full table: installs; the script accepted by nft 1.0.6 as is.
        nft(ns, full_script())
        in_ns(ns, rw.install_rewrite_rules, TABLE)
        assert in_ns(ns, rw.verify_rewrite_rules, TABLE) == []
        # A rule that does not read back right (here: sent without the checksum update) is taken out.
        real = rw.rewrite_exprs

        def no_csum(l_bit, ids_map=rw.ALIAS_IDS):
            return [(n, {k: v for k, v in a.items() if not k.startswith("csum")}) for n, a in real(l_bit, ids_map)]
        monkeypatch.setattr(rw, "rewrite_exprs", no_csum)
        with pytest.raises(BackendError, match=r"did not read back as installed \(removed them again\): "
                           r"rewrite rule L=1: checksum type 0 instead of INET"):
            in_ns(ns, rw.install_rewrite_rules, TABLE)
        monkeypatch.setattr(rw, "rewrite_exprs", real)
        assert "alias rewrite L=" not in nft(ns, f"list chain ip {TABLE} out")
        assert in_ns(ns, rw.verify_rewrite_rules, TABLE) == ["rewrite rule L=1 is missing",
                                                             "rewrite rule L=0 is missing"]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
