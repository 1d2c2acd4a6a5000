"""The fast paths for data packets of known tunnels: what they hold, and the kernel rules, as data.

Pure (no I/O). Two consumers follow the engine's :class:`~l2tp_marker.engine.TableEvent` stream:

* the **kernel fast path** (``backends/nft_fastpath.py``): an nftables table whose maps give the
  data packets of known tunnels their SA mark before the legacy mangle chains run (aliased tunnels
  also get the client's tunnel ID back, ``backends/nft_rewrite.py``), and whose set lets inbound
  data of known tunnels skip the queue. Those packets never reach userspace. See
  docs/fastpath-notes.md for the measurements behind every choice here.
* the **userspace fast path** (:func:`hot_verdict`): the same match and the same keys, applied in
  the daemon to data packets that still reach the queue (everything when the kernel fast path is
  off; aliased tunnels when the kernel's rewrite rules could not be verified), without the full
  decode.

Both apply exactly the kernel rule's match: IPv4, UDP, L2TP version 2, T bit clear (data), the
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
from .engine import IN, TableEvent

DEFAULT_BIT = 0x80000000
PRIORITY = -160  # before legacy mangle (-150): the connmark restore and our queue rules


def table_name(chain_prefix: str) -> str:
    """The nftables table of a marker instance, derived from its iptables chain prefix."""
    return chain_prefix.lower().replace("-", "_")


# ------------------------------------------------------------------------------ the table
OutKey = tuple[str, int, int]        # peer address, peer port, tunnel ID in outbound headers
InKey = tuple[str, int, int, int]    # peer address, peer port, gateway tunnel ID, SA mark


def _v4(addr: str) -> bytes | None:
    try:
        return socket.inet_aton(addr) if addr.count(".") == 3 else None
    except OSError:
        return None


class FastTable:
    """The fast paths' desired content, following the engine's table events.

    ``out``: outbound key -> (SA mark, client's tunnel ID). ``inb``: inbound keys (a Counter,
    because xl2tpd may hand one gateway tunnel ID to two tunnels of one peer). ``dirty_out`` /
    ``dirty_in`` collect the keys changed since the kernel adapter last synchronised. The ``out_int``/``in_int``
    dicts hold the same entries (IPv4 peers only) keyed by one integer, the way the userspace fast
    path reads them from a packet: see :func:`out_key_int` and :func:`in_key_int`.
    """

    def __init__(self) -> None:
        self.out: dict[OutKey, tuple[int, int]] = {}
        self.inb: Counter[InKey] = Counter()
        self._bound: dict[OutKey, InKey] = {}
        self.dirty_out: set[OutKey] = set()
        self.dirty_in: set[InKey] = set()
        self.out_int: dict[int, tuple[int, bytes | None]] = {}
        self.in_int: set[int] = set()

    def __len__(self) -> int:
        return len(self.out)

    def apply(self, events: tuple[TableEvent, ...] | list[TableEvent]) -> None:
        for e in events:
            key = (e.peer.addr, e.peer.port, e.visible_tid)
            if e.kind == "learn":
                self._set_out(key, (e.mark, e.client_tid))
            elif e.kind == "bind":
                self._set_out(key, (e.mark, e.client_tid))
                self._unbind(key)
                if e.our_tid is not None:
                    ik = (e.peer.addr, e.peer.port, e.our_tid, e.mark)
                    self._bound[key] = ik
                    self.inb[ik] += 1
                    if self.inb[ik] == 1:
                        self._in_changed(ik, True)
            elif e.kind == "release":
                self._unbind(key)
                if self.out.pop(key, None) is not None:
                    self.dirty_out.add(key)
                    k = _out_int(key)
                    if k is not None:
                        self.out_int.pop(k, None)

    def clear(self) -> None:
        """Forget everything (the kernel adapter then removes what it had installed)."""
        self.dirty_out.update(self.out)
        self.dirty_in.update(self.inb)
        self.out.clear()
        self.inb.clear()
        self._bound.clear()
        self.out_int.clear()
        self.in_int.clear()

    def _set_out(self, key: OutKey, value: tuple[int, int]) -> None:
        if self.out.get(key) != value:
            self.out[key] = value
            self.dirty_out.add(key)
            k = _out_int(key)
            if k is not None:
                mark, client_tid = value
                self.out_int[k] = (mark, None if client_tid == key[2] else client_tid.to_bytes(2, "big"))

    def _unbind(self, key: OutKey) -> None:
        ik = self._bound.pop(key, None)
        if ik is None:
            return
        self.inb[ik] -= 1
        if self.inb[ik] <= 0:
            del self.inb[ik]
            self._in_changed(ik, False)

    def _in_changed(self, ik: InKey, present: bool) -> None:
        self.dirty_in.add(ik)
        k = _in_int(ik)
        if k is None:
            return
        if present:
            self.in_int.add(k)
        else:
            self.in_int.discard(k)

    def take_dirty(self) -> tuple[set[OutKey], set[InKey]]:
        out, inb = self.dirty_out, self.dirty_in
        self.dirty_out, self.dirty_in = set(), set()
        return out, inb


def out_key_int(addr: int, port: int, tid: int) -> int:
    """An outbound key as one integer: peer address (IPv4, 32 bits), peer port, tunnel ID."""
    return (addr << 32) | (port << 16) | tid


def in_key_int(addr: int, port: int, tid: int, mark: int) -> int:
    """An inbound key as one integer: peer address, peer port, gateway tunnel ID, packet mark."""
    return (addr << 64) | (port << 48) | (tid << 32) | mark


def _out_int(key: OutKey) -> int | None:
    a = _v4(key[0])
    return None if a is None else out_key_int(int.from_bytes(a, "big"), key[1], key[2])


def _in_int(key: InKey) -> int | None:
    a = _v4(key[0])
    return None if a is None else in_key_int(int.from_bytes(a, "big"), key[1], key[2], key[3])


def kernel_out_value(key: OutKey, value: tuple[int, int] | None, bit: int) -> int | None:
    """The ``out_marks`` value the kernel should hold for ``key`` (None: no element). Aliased
    tunnels go to the alias maps instead (:func:`kernel_alias_value`); IPv6 peers (the table is
    ``ip``) and marks that are zero or use the reserved bit stay on the userspace path."""
    if value is None:
        return None
    mark, client_tid = value
    if client_tid != key[2] or _v4(key[0]) is None or not mark or mark & bit:
        return None
    return mark | bit


def kernel_alias_value(key: OutKey, value: tuple[int, int] | None, bit: int) -> tuple[int, int] | None:
    """For an aliased tunnel: (alias_marks value, the client's real tunnel ID), else None."""
    if value is None:
        return None
    mark, client_tid = value
    if client_tid == key[2] or _v4(key[0]) is None or not mark or mark & bit:
        return None
    return mark | bit, client_tid


def kernel_in_ok(key: InKey, bit: int) -> bool:
    return _v4(key[0]) is not None and bool(key[3]) and not key[3] & bit


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
        lines.append(f"    {_match('sport', l_bit)} meta mark set ip daddr . udp dport . @th,{off},16 "
                     f"map @out_marks counter")
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
MISS = None


def hot_verdict(pkt: bytes, direction: str, mark_in: int, table: FastTable, mark_mask: int = 0xFFFFFFFF):
    """The userspace fast path for one queued packet: ``None`` when it does not apply (take the slow
    path), else ``(mark or None, new packet bytes or None)``.

    Applies exactly the kernel rules' match (module docstring). For outbound packets the mark is
    the engine's: the bits outside ``mark_mask`` kept, the tunnel's SA mark in the rest; aliased
    tunnels get the client's tunnel ID back in the header with the UDP checksum updated.
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
        key = in_key_int(int.from_bytes(pkt[12:16], "big"), (pkt[u] << 8) | pkt[u + 1], tid, mark_in)
        return (None, None) if key in table.in_int else MISS
    if pkt[u] != 0x06 or pkt[u + 1] != 0xA5:
        return MISS
    e = table.out_int.get(out_key_int(int.from_bytes(pkt[16:20], "big"), (pkt[u + 2] << 8) | pkt[u + 3], tid))
    if e is None:
        return MISS
    mark = (mark_in & ~mark_mask & 0xFFFFFFFF) | e[0]
    new = e[1]
    if new is None:
        return (mark, None)
    return (mark, rewrite16(pkt, u, t, new))


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
