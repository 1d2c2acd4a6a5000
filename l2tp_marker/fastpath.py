"""The fast paths for data packets of known tunnels: what they hold, and the kernel rules, as data.

Pure (no I/O). Two consumers follow the engine's :class:`~l2tp_marker.engine.TableEvent` stream:

* the **kernel fast path** (``backends/nft_fastpath.py``): an nftables table whose maps give the
  data packets of known tunnels their SA mark before the legacy mangle chains run (aliased tunnels
  also get the client's tunnel ID back, ``backends/nft_rewrite.py``), and whose set lets inbound
  data of known tunnels skip the queue. Those packets never reach userspace. See
  docs/fastpath-notes.md for the measurements behind every choice here.
* the **userspace fast path** (the daemon's lanes, ``PacketHandler._make_lanes``, with
  :func:`rewrite16`): the same match and the same keys, applied in the daemon to data packets that still reach the queue (everything when the kernel fast path is
  off; aliased tunnels when the kernel's rewrite rules could not be verified), without the full
  decode.

Both apply the kernel rule's match (the userspace one leaves the rare gateway tunnel ID that the
LNS gave two tunnels of one peer to the full path): IPv4, UDP, L2TP version 2, T bit clear (data), the
gateway's port 1701 on the gateway side, and the key (peer address, peer port, tunnel ID in the
header) — inbound also the packet's mark, so a packet that came over another client's SA is never
fast-pathed and the engine still sees (and counts, logs or drops) every SA conflict. Control
messages always take the slow path: the engine learns from them.

A reserved mark bit (``fastpath_bit``, 0x80000000 by default) tells the legacy chains that the
kernel fast path handled a packet: they skip the NFQUEUE for it and clear the bit (rules.py).
"""

from __future__ import annotations

import socket
from collections import Counter

from .constants import L2TP_PORT
from .engine import ipv4_int, key3

DEFAULT_BIT = 0x80000000
PRIORITY = -160  # before legacy mangle (-150): the connmark restore and our queue rules


def table_name(chain_prefix: str) -> str:
    """The nftables table of a marker instance, derived from its iptables chain prefix."""
    return chain_prefix.lower().replace("-", "_")


# ------------------------------------------------------------------------------ the table
# The fast paths keep no copy of the tunnel table: they read the engine's indexes (Engine.out_index,
# Engine.in_index), whose IPv4 keys are the integers a packet's bytes give directly (key3). IPv6
# peers are never fast-pathed (the kernel table is `ip`; the userspace lanes read IPv4 headers).
OutKey = tuple[str, int, int]        # peer address, peer port, tunnel ID in outbound headers
InKey = tuple[str, int, int, int]    # peer address, peer port, gateway tunnel ID, SA mark


def in_key(k3: int, mark: int) -> int:
    """An inbound fast-path key: the engine's in_index key and the packet's mark."""
    return (k3 << 32) | mark


def members(x) -> list:
    """An in_index entry as a list (one tunnel, or the tunnels sharing a gateway tunnel ID)."""
    return [] if x is None else x if isinstance(x, list) else [x]


class FastChanges:
    """Which fast-path keys changed since the kernel adapter last synchronised (pure).

    Follows the engine's table events; the adapter then reads what each key should hold now from
    the engine itself, so nothing here grows with the table, only with the changes of one batch.
    """

    def __init__(self) -> None:
        self.out: set[int] = set()
        self.inb: set[int] = set()

    def apply(self, events) -> None:
        for e in events:
            a = ipv4_int(e.peer.addr)
            if a is None:
                continue
            if e.kind != "bind":  # learn, release: the outbound entry comes or goes
                self.out.add(key3(a, e.peer.port, e.visible_tid))
            for tid in (e.our_tid, e.previous_tid):
                if tid is not None:
                    self.inb.add(in_key(key3(a, e.peer.port, tid), e.mark))

    def take(self) -> tuple[set[int], set[int]]:
        out, inb = self.out, self.inb
        self.out, self.inb = set(), set()
        return out, inb

    def __bool__(self) -> bool:
        return bool(self.out or self.inb)


def _kernel_ok_mark(mark: int, bit: int) -> bool:
    return bool(mark) and not mark & bit


def kernel_out_value(t, bit: int) -> int | None:
    """The ``out_marks`` value for tunnel ``t`` (None: not there). Aliased tunnels go to the alias
    maps instead (:func:`kernel_alias_value`); zero marks and marks using the bit stay in userspace."""
    if t is None or t.visible_tid != t.client_tid or not _kernel_ok_mark(t.mark, bit):
        return None
    return t.mark | bit


def kernel_alias_value(t, bit: int) -> tuple[int, int] | None:
    """For an aliased tunnel: (alias_marks value, the client's real tunnel ID), else None."""
    if t is None or t.visible_tid == t.client_tid or not _kernel_ok_mark(t.mark, bit):
        return None
    return t.mark | bit, t.client_tid


def kernel_in_ok(engine, ik: int, bit: int) -> bool:
    """Should inbound key ``ik`` be in the kernel's set: a tunnel the LNS gave that ID is bound to
    that mark (exactly the engine's "inbound_known")."""
    mark = ik & 0xFFFFFFFF
    return _kernel_ok_mark(mark, bit) and any(t.mark == mark for t in members(engine.in_index.get(ik >> 32)))


def out_key_text(k: int) -> OutKey:
    return (socket.inet_ntoa((k >> 32).to_bytes(4, "big")), (k >> 16) & 0xFFFF, k & 0xFFFF)


def in_key_text(ik: int) -> InKey:
    return (*out_key_text(ik >> 32), ik & 0xFFFFFFFF)


# ------------------------------------------------------------------------------ nft text
def _elem_out(key: OutKey, value: int | None = None) -> str:
    k = f"{key[0]} . {key[1]} . {key[2]}"
    return k if value is None else f"{k} : {value:#x}"


def _elem_in(key: InKey) -> str:
    return f"{key[0]} . {key[1]} . {key[2]} . {key[3]:#x}"


def _match(port_dir: str, l_bit: bool) -> str:
    # L2TPv2 data: T=0, version 2; the tunnel ID sits 4 octets into the L2TP header with L=1, 2 without
    return f"udp {port_dir} {L2TP_PORT} @th,64,2 {0x1 if l_bit else 0x0:#x} @th,76,4 2"


def table_script(table: str, bit: int, extra_maps: list[str] = (), extra_out_rules: list[str] = ()) -> str:
    """The whole table, replacing any earlier one atomically (one nft transaction). ``extra_*``:
    the aliased tunnels' maps and mark rules (backends/nft_rewrite.py), after ours."""
    lines = [f"add table ip {table}", f"delete table ip {table}", f"table ip {table} {{",
             "  map out_marks {", "    typeof ip daddr . udp dport . @th,96,16 : meta mark", "  }",
             "  set in_known {", "    typeof ip saddr . udp sport . @th,96,16 . meta mark", "  }",
             *extra_maps,
             "  chain out {", f"    type route hook output priority {PRIORITY}; policy accept;"]
    for l_bit, off in ((True, 96), (False, 80)):
        # accept: a plain tunnel's packet is done (the route chain still reroutes on the new mark)
        # and skips the aliased tunnels' rules below.
        lines.append(f"    {_match('sport', l_bit)} meta mark set ip daddr . udp dport . @th,{off},16 "
                     f"map @out_marks counter accept")
    lines += [*extra_out_rules, "  }", "  chain in {", f"    type filter hook input priority {PRIORITY}; policy accept;"]
    for l_bit, off in ((True, 96), (False, 80)):
        lines.append(f"    {_match('dport', l_bit)} ip saddr . udp sport . @th,{off},16 . meta mark @in_known "
                     f"meta mark set meta mark | {bit:#x} counter")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def delete_script(table: str) -> str:
    """Remove the table if it is there (``add`` first makes the delete safe when it is not)."""
    return f"add table ip {table}\ndelete table ip {table}\n"


def element_script(table: str, out_del: list[OutKey], out_add: list[tuple[OutKey, int]],
                   in_del: list[InKey], in_add: list[InKey]) -> str:
    """One transaction: deletions first, so a changed value is a delete plus an add."""
    cmds = []
    if out_del:
        cmds.append(f"delete element ip {table} out_marks {{ {', '.join(_elem_out(k) for k in out_del)} }}")
    if in_del:
        cmds.append(f"delete element ip {table} in_known {{ {', '.join(_elem_in(k) for k in in_del)} }}")
    if out_add:
        cmds.append(f"add element ip {table} out_marks {{ {', '.join(_elem_out(k, v) for k, v in out_add)} }}")
    if in_add:
        cmds.append(f"add element ip {table} in_known {{ {', '.join(_elem_in(k) for k in in_add)} }}")
    return "".join(c + "\n" for c in cmds)


# ------------------------------------------------------------------------------ userspace
def rewrite16(pkt: bytes, u: int, off: int, new: bytes) -> bytes:
    """``pkt`` with the 16-bit field at ``off`` replaced by ``new`` and the UDP checksum (at
    ``u + 6``) updated incrementally (RFC 1624); a zero checksum (none, IPv4) stays zero."""
    c = (pkt[u + 6] << 8) | pkt[u + 7]
    if not c:
        return pkt[:off] + new + pkt[off + 2:]
    s = (~c & 0xFFFF) + (~((pkt[off] << 8) | pkt[off + 1]) & 0xFFFF) + ((new[0] << 8) | new[1])
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    c = ~s & 0xFFFF or 0xFFFF
    return pkt[:u + 6] + c.to_bytes(2, "big") + pkt[u + 8:off] + new + pkt[off + 2:]
