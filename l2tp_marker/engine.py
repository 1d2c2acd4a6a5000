"""The tracking engine: which L2TP tunnel belongs to which IPsec SA mark, and what to do per packet.

Pure logic: no sockets, no files, no netfilter. The clock is injected. The adapters (the NFQUEUE
daemon, ``replay``) decode a packet with :mod:`l2tp_marker.codec`, call :meth:`Engine.judge` and apply
the returned :class:`Decision` exactly once.

Model (RFC 2661 header IDs are the *recipient's*):

* An inbound SCCRQ that arrived with a non-zero mark M from peer P carries the client's Assigned
  Tunnel ID C. The engine creates a tunnel bound to M. If another live tunnel from the same peer
  *address* already shows the LNS that ID (the Windows case: every PC starts at tunnel ID 1), the
  Assigned Tunnel ID is rewritten to an alias A unused for that address, so an unpatched LNS (xl2tpd
  matches SCCRQs on peer address and tunnel ID) sees distinct tunnels. The ID the LNS knows is the
  tunnel's *visible* ID: A if aliased, else C.
* The outbound SCCRP (header tunnel ID = visible ID) carries the LNS's own Assigned Tunnel ID G;
  inbound packets of the tunnel carry G in their header from then on.
* Every outbound packet whose header names a known visible ID leaves with the owner's mark; an
  aliased tunnel gets the client's real ID C back in its header. Inbound StopCCNs of an aliased
  tunnel get their Assigned Tunnel ID rewritten like the SCCRQ.
* Sessions are tracked per tunnel from ICRQ/ICRP (and OCRQ/OCRP), released by CDN. The LNS scopes
  session IDs by its own tunnel ID and inbound packets carry the LNS's session IDs, so a session ID
  collision between clients cannot reach the LNS once their tunnels are distinct: sessions are never
  aliased.

SA binding: a tunnel stays bound to the mark that created it for its whole life. An inbound packet
of the tunnel arriving with another mark never moves it; it is counted as a conflict (and dropped
when ``enforce="drop"``). A binding "moves" only by ending: after the tunnel is released (StopCCN
plus the hold time, idle timeout, or an SCCRQ that never got its SCCRP), the same IDs may be bound
anew by whichever SA sends the next SCCRQ.

Idle means: nothing from the LNS for ``idle_timeout`` seconds. A live LNS answers every HELLO (and
sends its own), so a tunnel it stopped answering is one it lost (it restarted, or dropped the
tunnel without a StopCCN): such a tunnel is released even while its client keeps sending into it.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from . import constants as C
from . import hiding
from .codec import L2tpMessage, Malformed

IN = "in"
OUT = "out"

STATE_VERSION = 1
# At least this many tunnels evicted from (or refused by) a full table are remembered (more if
# max_tunnels is larger), so the LNS's answers to them still go back to their own SA.
EVICTED_RECORDS_MIN = 4096

# Reasons (stable strings: they appear in logs, replay output and metrics).
R_MALFORMED = "malformed"
R_NO_MARK = "no_mark"
R_UNKNOWN_TUNNEL = "unknown_tunnel"
R_LEARNED = "sccrq_learned"
R_ALIASED = "sccrq_aliased"
R_RETRANSMIT = "sccrq_retransmit"
R_TABLE_FULL = "table_full"
R_HIDDEN = "hidden_id_no_secret"
R_CONFLICT = "sa_conflict"
R_INBOUND = "inbound_known"
R_OWNER = "owner_mark"
R_OWNER_SET = "owner_mark_set"
R_EVICTED_OWNER = "owner_mark_evicted"


@dataclass(frozen=True, slots=True)
class Peer:
    """The client's address and UDP port as the gateway sees them."""

    addr: str
    port: int

    def __str__(self) -> str:
        return f"[{self.addr}]:{self.port}" if ":" in self.addr else f"{self.addr}:{self.port}"


@dataclass(frozen=True, slots=True)
class Rewrite:
    """One field to change in the packet: ``data`` goes at absolute ``offset`` of the L2TP buffer."""

    field: str
    offset: int
    old: int | None
    new: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TableEvent:
    """A change of the table that the fast paths (kernel map, userspace cache) follow.

    ``learn``: a tunnel entered the table (its SCCRQ; the key of its outbound packets is known, the
    LNS's tunnel ID not yet). ``bind``: the LNS's tunnel ID became known (its SCCRP), so inbound
    packets can be recognised. ``release``: the tunnel left the table.
    """

    kind: str  # "learn" | "bind" | "release"
    peer: Peer
    visible_tid: int
    client_tid: int
    our_tid: int | None
    mark: int
    previous_tid: int | None = None  # bind: the LNS tunnel ID the tunnel had before (a re-bind)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one packet. ``mark`` None means: keep the mark it arrived with."""

    reason: str
    mark: int | None = None
    rewrites: tuple[Rewrite, ...] = ()
    drop: bool = False
    events: tuple[TableEvent, ...] = ()
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine settings; every value has a documented default (see the shipped config sample)."""

    mark_mask: int = 0xFFFFFFFF
    idle_timeout: float = 600.0
    hold_time: float = C.STOPCCN_HOLD_SECONDS
    pending_timeout: float = 60.0
    max_tunnels: int = 100_000
    max_tunnels_per_mark: int = 64
    max_sessions_per_tunnel: int = 64
    enforce: str = "log"  # off | log | drop: what to do with inbound packets of a tunnel bound to another mark
    secret: bytes | None = None
    alias_start: int = 0xFFFF  # aliases are handed out downwards from here (Windows counts up from 1)
    conflict_history: int = 100

    def __post_init__(self) -> None:
        if self.enforce not in ("off", "log", "drop"):
            raise ValueError(f"enforce must be off, log or drop, not {self.enforce!r}")
        if not 0 < self.mark_mask <= 0xFFFFFFFF:
            raise ValueError("mark_mask must be a non-zero 32-bit value")
        if not 1 <= self.alias_start <= 0xFFFF:
            raise ValueError("alias_start must be in 1..65535")


@dataclass(slots=True)
class Session:
    client_sid: int
    our_sid: int | None
    created: float
    last_seen: float
    closing_since: float | None = None


NO_SESSIONS: Mapping[int, "Session"] = MappingProxyType({})


@dataclass(slots=True)
class Tunnel:
    peer: Peer
    mark: int
    client_tid: int
    visible_tid: int
    created: float
    last_seen: float
    our_tid: int | None = None
    established: bool = False
    closing_since: float | None = None
    packets_in: int = 0
    packets_out: int = 0
    conflicts: int = 0
    # Most tunnels have one session, many (pending) none: a shared read-only empty mapping until
    # the first one arrives saves a dict per tunnel (100,000 tunnels must fit in the daemon).
    sessions: dict[int, Session] = field(default_factory=lambda: NO_SESSIONS)  # type: ignore[assignment]
    last_out: float | None = None  # last packet from the LNS (None: none yet)

    @property
    def lns_seen(self) -> float:
        """When the LNS last sent something for this tunnel (its creation if never)."""
        return self.created if self.last_out is None else self.last_out

    @property
    def alias(self) -> int | None:
        return self.visible_tid if self.visible_tid != self.client_tid else None

    @property
    def state(self) -> str:
        if self.closing_since is not None:
            return "closing"
        if self.our_tid is None:
            return "pending"
        return "established" if self.established else "bound"


@dataclass(frozen=True, slots=True)
class Evicted:
    """A tunnel the LNS may still hold although the table let it go (evicted, or refused when full)."""

    port: int
    mark: int
    until: float


@dataclass(frozen=True, slots=True)
class Conflict:
    """An inbound packet of a tunnel that arrived over another client's SA."""

    at: float
    peer: Peer
    our_tid: int
    bound_mark: int
    seen_mark: int
    kind: str


def ipv4_int(addr: str) -> int | None:
    """An IPv4 address as an integer (None for anything else, e.g. IPv6)."""
    try:
        return int(ipaddress.IPv4Address(addr))
    except ValueError:
        return None


def key3(a: int, port: int, tid: int) -> int:
    """The index key of (IPv4 address as int, port, tunnel ID): how the fast paths read a packet."""
    return (a << 32) | (port << 16) | tid


_MISSING = object()
EXPIRE_SLICE_MIN = 2000  # tables up to this size are looked at whole at every expiry
EXPIRE_SLICES = 10       # bigger ones in this many slices, one per call


class Engine:
    """The tunnel table and the per-packet decision. Not thread-safe; one caller at a time.

    The two indexes the fast paths read are public, read-only for them: ``out_index`` (peer address,
    peer port, tunnel ID in outbound headers -> Tunnel) and ``in_index`` (peer address, peer port,
    LNS tunnel ID -> Tunnel, or a list of Tunnels when the LNS gave one ID to several). Their keys
    are :func:`key3` integers for IPv4 peers and ``(addr, port, tid)`` tuples otherwise: one small
    integer per entry keeps 100,000 tunnels affordable, and a packet's key is read with one unpack.
    """

    def __init__(self, config: EngineConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or EngineConfig()
        self._clock = clock
        self._by_out: dict[int | tuple, Tunnel] = {}   # key of (addr, port, visible tid)
        # key of (addr, port, LNS tid) -> the tunnel (or tunnels, oldest first) the LNS gave that
        # ID. Usually one, but xl2tpd picks its tunnel IDs at random without checking that they are
        # free, so two live tunnels of one peer can share an ID; their inbound packets are told
        # apart by mark.
        self._by_in: dict[int | tuple, Tunnel | list[Tunnel]] = {}
        # key of (addr, port, mark, client tid) -> an aliased tunnel (the others are found in
        # _by_out under their own ID: one index entry fewer per tunnel)
        self._by_client: dict[int | tuple, Tunnel] = {}
        self.out_index, self.in_index = self._by_out, self._by_in
        self._addr_ints: dict[str, int | None] = {}
        self._visible: dict[str, set[int]] = {}                 # addr -> visible tids in use
        # (addr, visible tid) -> the SA of a tunnel evicted (or refused) by a full table, for
        # pending_timeout seconds: the LNS already saw its SCCRQ and keeps answering it for a while.
        self._evicted: OrderedDict[tuple[str, int], Evicted] = OrderedDict()
        self._per_mark: Counter[int] = Counter()
        # mark -> its tunnels that have not completed their handshake, oldest first: eviction
        # candidates found in O(1) instead of a scan of the whole table per SCCRQ.
        self._unestablished: dict[int, OrderedDict[int, Tunnel]] = {}
        self.counters: Counter[str] = Counter()
        self.conflicts: deque[Conflict] = deque(maxlen=self.config.conflict_history)
        self._next_expiry = 0.0
        # Expiry looks at the table in slices (see expire): what is left of the current pass.
        self._scan: list[Tunnel] = []

    # ---------------------------------------------------------------- queries
    def tunnels(self) -> list[Tunnel]:
        return list(self._by_out.values())

    def __len__(self) -> int:
        return len(self._by_out)

    def now(self) -> float:
        return self._clock()

    # ---------------------------------------------------------------- keys
    def _a(self, addr: str) -> int | None:
        a = self._addr_ints.get(addr, _MISSING)
        if a is _MISSING:
            if len(self._addr_ints) >= 65536:
                self._addr_ints.clear()
            a = self._addr_ints[addr] = ipv4_int(addr)
        return a  # type: ignore[return-value]

    def _k3(self, addr: str, port: int, tid: int) -> int | tuple:
        a = self._a(addr)
        return (addr, port, tid) if a is None else (a << 32) | (port << 16) | tid

    def _kc(self, addr: str, port: int, mark: int, tid: int) -> int | tuple:
        a = self._a(addr)
        return (addr, port, mark, tid) if a is None else (a << 64) | (port << 48) | (mark << 16) | tid

    def _index_in(self, t: Tunnel) -> None:
        k = self._k3(t.peer.addr, t.peer.port, t.our_tid)
        x = self._by_in.get(k)
        if x is None:
            self._by_in[k] = t
        elif isinstance(x, list):
            x.append(t)
        else:
            self._by_in[k] = [x, t]

    # ---------------------------------------------------------------- the decision
    def judge(self, msg: L2tpMessage | Malformed, direction: str, peer: Peer, mark_in: int) -> Decision:
        """Decide what to do with one L2TP packet (see the module docstring for the semantics)."""
        now = self._clock()
        events: tuple[TableEvent, ...] = ()
        if now >= self._next_expiry:
            events = tuple(self.expire(now))
        if isinstance(msg, Malformed):
            d = Decision(R_MALFORMED, detail=msg.reason)
        elif direction == OUT:
            d = self._outbound(msg, peer, mark_in, now)
        else:
            d = self._inbound(msg, peer, mark_in, now)
        self.counters[d.reason] += 1
        if events:
            d = replace(d, events=events + d.events)
        return d

    def _outbound(self, msg: L2tpMessage, peer: Peer, mark_in: int, now: float) -> Decision:
        t = self._by_out.get(self._k3(peer.addr, peer.port, msg.tunnel_id))
        if t is None:
            gone = self._evicted.get((peer.addr, msg.tunnel_id))
            if gone is not None and gone.port == peer.port and now < gone.until:
                # The LNS still answers a tunnel the table had to let go: back to its own SA, not
                # to whichever client spoke last (plain connmark).
                mark = (mark_in & ~self.config.mark_mask & 0xFFFFFFFF) | gone.mark
                return Decision(R_EVICTED_OWNER, mark)
            return Decision(R_UNKNOWN_TUNNEL)
        t.last_seen = t.last_out = now
        t.packets_out += 1
        mask = self.config.mark_mask
        mark = (mark_in & ~mask & 0xFFFFFFFF) | t.mark
        rewrites: tuple[Rewrite, ...] = ()
        if t.visible_tid != t.client_tid:
            rewrites = (Rewrite("tunnel_id", msg.tunnel_id_offset, t.visible_tid, t.client_tid,
                                t.client_tid.to_bytes(2, "big")),)
        events: tuple[TableEvent, ...] = ()
        if msg.control:
            events = self._outbound_control(t, msg, now)
        reason = R_OWNER if mark == mark_in else R_OWNER_SET
        return Decision(reason, mark, rewrites, events=events)

    def _outbound_control(self, t: Tunnel, msg: L2tpMessage, now: float) -> tuple[TableEvent, ...]:
        mt = msg.msg_type
        if mt == C.SCCRP:
            our = self._assigned_id(msg, tunnel=True)
            if our is not None and our != t.our_tid:
                return self._bind(t, our)
        elif mt == C.STOPCCN:
            if t.closing_since is None:
                t.closing_since = now
        elif mt in (C.ICRP, C.OCRP):
            s = t.sessions.get(msg.session_id)
            our = self._assigned_id(msg, tunnel=False)
            if s is not None and our is not None:
                s.our_sid = our
        elif mt == C.CDN:
            s = t.sessions.get(msg.session_id)
            if s is not None:
                if s.closing_since is None:
                    s.closing_since = now
        return ()

    def _bind(self, t: Tunnel, our_tid: int) -> tuple[TableEvent, ...]:
        # Another entry with this LNS ID is not necessarily stale: xl2tpd does not check that a
        # random tunnel ID is free (new_tunnel in xl2tpd.c), so both may be live. Stale entries end
        # by their own signals (StopCCN, the LNS's silence, the client starting over).
        previous = t.our_tid
        self._unindex(t)
        t.our_tid = our_tid
        self._index_in(t)
        return (TableEvent("bind", t.peer, t.visible_tid, t.client_tid, our_tid, t.mark, previous),)

    def _unindex(self, t: Tunnel) -> None:
        if t.our_tid is None:
            return
        key = self._k3(t.peer.addr, t.peer.port, t.our_tid)
        x = self._by_in.get(key)
        if x is t:
            del self._by_in[key]
        elif isinstance(x, list):
            for i, y in enumerate(x):
                if y is t:
                    del x[i]
                    break
            if len(x) == 1:
                self._by_in[key] = x[0]
            elif not x:
                del self._by_in[key]

    def _lookup_in(self, peer: Peer, tid: int, mark: int) -> Tunnel | None:
        """The tunnel an inbound packet belongs to: of those the LNS gave ``tid``, the newest bound
        to ``mark``; if none is, the newest (the packet is then an SA conflict)."""
        x = self._by_in.get(self._k3(peer.addr, peer.port, tid))
        if x is None or not isinstance(x, list):
            return x
        for t in reversed(x):
            if t.mark == mark:
                return t
        return x[-1]

    def _inbound(self, msg: L2tpMessage, peer: Peer, mark_in: int, now: float) -> Decision:
        mark = mark_in & self.config.mark_mask
        if msg.control and msg.msg_type == C.SCCRQ and msg.tunnel_id == 0:
            if not mark:
                return Decision(R_NO_MARK)
            return self._sccrq(msg, peer, mark, now)
        t = self._lookup_in(peer, msg.tunnel_id, mark)
        if t is None:
            return Decision(R_NO_MARK if not mark else R_UNKNOWN_TUNNEL)
        if mark != t.mark:
            return self._conflict(t, msg, peer, mark, now)
        t.last_seen = now
        t.packets_in += 1
        if not msg.control:
            return Decision(R_INBOUND)
        mt = msg.msg_type
        rewrites: tuple[Rewrite, ...] = ()
        if mt == C.SCCCN:
            t.established = True
            self._forget_unestablished(t)
        elif mt == C.STOPCCN:
            if t.closing_since is None:
                t.closing_since = now
            if t.visible_tid != t.client_tid:
                rewrites = self._alias_rewrite(msg, t)
        elif mt in (C.ICRQ, C.OCRQ):
            sid = self._assigned_id(msg, tunnel=False)
            if sid is not None and sid not in t.sessions:
                if len(t.sessions) < self.config.max_sessions_per_tunnel:
                    if t.sessions is NO_SESSIONS:
                        t.sessions = {}
                    t.sessions[sid] = Session(sid, None, now, now)
                else:
                    self.counters["session_limit"] += 1
        elif mt == C.CDN:
            sid = self._assigned_id(msg, tunnel=False)
            s = t.sessions.get(sid) if sid is not None else None
            if s is not None:
                if s.closing_since is None:
                    s.closing_since = now
        elif msg.session_id:
            for s in t.sessions.values():
                if s.our_sid == msg.session_id:
                    s.last_seen = now
        return Decision(R_INBOUND, rewrites=rewrites)

    def _conflict(self, t: Tunnel, msg: L2tpMessage, peer: Peer, mark: int, now: float) -> Decision:
        t.conflicts += 1
        self.conflicts.append(Conflict(now, peer, t.our_tid or 0, t.mark, mark, msg.kind))
        detail = (f"peer {peer} tunnel {t.our_tid} is bound to mark {t.mark:#x}, "
                  f"packet came with mark {mark:#x}")
        return Decision(R_CONFLICT, drop=self.config.enforce == "drop", detail=detail)

    def _sccrq(self, msg: L2tpMessage, peer: Peer, mark: int, now: float) -> Decision:
        client_tid = self._assigned_id(msg, tunnel=True)
        if client_tid is None:
            return Decision(R_HIDDEN if msg.hidden_tunnel_id else R_MALFORMED,
                            detail=None if msg.hidden_tunnel_id else "SCCRQ without Assigned Tunnel ID")
        key = self._kc(peer.addr, peer.port, mark, client_tid)
        t = self._by_out.get(self._k3(peer.addr, peer.port, client_tid))
        if t is None or t.client_tid != client_tid or t.mark != mark:
            t = self._by_client.get(key)  # an aliased tunnel of this client
        if t is not None and t.closing_since is None and not t.established:
            # The same client asking again before the handshake completed: a retransmission (its
            # SCCRP may have been lost), which must reach the LNS with the same alias.
            t.last_seen = now
            t.packets_in += 1
            return Decision(R_RETRANSMIT, rewrites=self._alias_rewrite(msg, t))
        events: tuple[TableEvent, ...] = ()
        if len(self._by_out) >= self.config.max_tunnels or self._per_mark[mark] >= self.config.max_tunnels_per_mark:
            if now >= self._next_expiry:  # a full pass only when one is due, not per SCCRQ
                events = tuple(self.expire(now))
            ok, evicted = self._make_room(mark, now)
            events += evicted
            if not ok:
                if not self._taken(peer.addr, client_tid):
                    # Passed on unchanged: the LNS will answer it as client_tid.
                    self._remember_evicted(peer, client_tid, mark, now)
                return Decision(R_TABLE_FULL, events=events,
                                detail=f"{len(self._by_out)} tunnels, {self._per_mark[mark]} for mark {mark:#x}")
        if t is not None:
            # Same client and ID, but the old tunnel is closing or was established: the client
            # started over (e.g. after the LNS restarted); the old entry is stale.
            events += self._release(t, "released_restarted")
        used = self._visible.setdefault(peer.addr, set())
        visible = client_tid
        if self._taken(peer.addr, client_tid):
            visible = self._pick_alias(peer.addr)
            if visible is None:
                return Decision(R_TABLE_FULL, events=events, detail=f"no free tunnel ID alias for {peer.addr}")
        t = Tunnel(Peer(sys.intern(peer.addr), peer.port), mark, client_tid, visible, now, now, packets_in=1)
        used.add(visible)
        self._by_out[self._k3(peer.addr, peer.port, visible)] = t
        if visible != client_tid:
            self._by_client[key] = t
        self._per_mark[mark] += 1
        self._unestablished.setdefault(mark, OrderedDict())[id(t)] = t
        events += (TableEvent("learn", peer, visible, client_tid, None, mark),)
        if visible == client_tid:
            return Decision(R_LEARNED, events=events)
        return Decision(R_ALIASED, rewrites=self._alias_rewrite(msg, t), events=events)

    def _taken(self, addr: str, tid: int) -> bool:
        """Does the LNS know a tunnel ``tid`` of ``addr`` (live in the table, or recently evicted)?"""
        return tid in self._visible.get(addr, ()) or (addr, tid) in self._evicted

    def _pick_alias(self, addr: str) -> int | None:
        for cand in range(self.config.alias_start, 0, -1):
            if not self._taken(addr, cand):
                return cand
        for cand in range(self.config.alias_start + 1, 0x10000):
            if not self._taken(addr, cand):
                return cand
        return None

    def _remember_evicted(self, peer: Peer, visible: int, mark: int, now: float) -> None:
        """Keep routing the LNS's answers for a tunnel the table let go to its SA, and keep its ID
        reserved, for pending_timeout seconds (xl2tpd gives up an unanswered SCCRP within ~31 s).
        At most max(max_tunnels, EVICTED_RECORDS_MIN) such records; the oldest goes first."""
        key = (peer.addr, visible)
        self._evicted.pop(key, None)
        self._evicted[key] = Evicted(peer.port, mark, now + self.config.pending_timeout)
        while len(self._evicted) > max(self.config.max_tunnels, EVICTED_RECORDS_MIN):
            self._evicted.popitem(last=False)

    def _make_room(self, mark: int, now: float) -> tuple[bool, tuple[TableEvent, ...]]:
        """Evict tunnels that never completed their handshake, if that helps.

        Established tunnels are never evicted. A full per-mark bound evicts only that mark's own
        tunnels; a full table evicts first from the mark holding the most tunnels (a client
        flooding SCCRQs loses its own entries before another client's handshake in progress),
        each mark's oldest first. Each eviction costs O(number of marks), not O(table).
        """
        def full() -> bool:
            return (len(self._by_out) >= self.config.max_tunnels
                    or self._per_mark[mark] >= self.config.max_tunnels_per_mark)
        events: list[TableEvent] = []
        while full():
            if self._per_mark[mark] >= self.config.max_tunnels_per_mark:
                victim_mark = mark if self._unestablished.get(mark) else None
            else:
                with_candidates = [m for m, q in self._unestablished.items() if q]
                victim_mark = max(with_candidates, key=lambda m: self._per_mark[m], default=None)
            if victim_mark is None:
                break
            t = next(iter(self._unestablished[victim_mark].values()))
            events.extend(self._release(t, "evicted"))
            self._remember_evicted(t.peer, t.visible_tid, t.mark, now)
        return not full(), tuple(events)

    def _forget_unestablished(self, t: Tunnel) -> None:
        q = self._unestablished.get(t.mark)
        if q is not None and q.pop(id(t), None) is not None and not q:
            del self._unestablished[t.mark]

    def _alias_rewrite(self, msg: L2tpMessage, t: Tunnel) -> tuple[Rewrite, ...]:
        """Rewrite the Assigned Tunnel ID AVP of an inbound SCCRQ/StopCCN to the tunnel's alias."""
        if t.visible_tid == t.client_tid or msg.assigned_tunnel_id_offset is None:
            return ()
        if not msg.hidden_tunnel_id:
            return (Rewrite("assigned_tunnel_id", msg.assigned_tunnel_id_offset, msg.assigned_tunnel_id,
                            t.visible_tid, t.visible_tid.to_bytes(2, "big")),)
        secret, rv, old = self.config.secret, msg.hidden_tunnel_rv, msg.hidden_tunnel_blob
        if secret is None or rv is None or old is None:
            return ()
        blob = hiding.hide(C.AVP_ASSIGNED_TUNNEL_ID, t.visible_tid.to_bytes(2, "big"), secret, rv,
                           pad_to=len(old))
        if len(blob) != len(old):
            return ()
        return (Rewrite("assigned_tunnel_id", msg.assigned_tunnel_id_offset, t.client_tid,
                        t.visible_tid, blob),)

    def _assigned_id(self, msg: L2tpMessage, *, tunnel: bool) -> int | None:
        """The Assigned Tunnel/Session ID of a control message, revealing a hidden one if we can."""
        value = msg.assigned_tunnel_id if tunnel else msg.assigned_session_id
        if value is not None:
            return value
        blob = msg.hidden_tunnel_blob if tunnel else msg.hidden_session_blob
        rv = msg.hidden_tunnel_rv if tunnel else msg.hidden_session_rv
        if blob is None or rv is None or self.config.secret is None:
            return None
        attr = C.AVP_ASSIGNED_TUNNEL_ID if tunnel else C.AVP_ASSIGNED_SESSION_ID
        try:
            value = hiding.unhide(attr, blob, self.config.secret, rv)
        except ValueError:
            self.counters["hidden_id_undecodable"] += 1
            return None
        if len(value) != 2:
            self.counters["hidden_id_undecodable"] += 1
            return None
        return int.from_bytes(value, "big")

    # ---------------------------------------------------------------- expiry
    def expire(self, now: float | None = None) -> list[TableEvent]:
        """Release tunnels and sessions whose time is up; returns the release events."""
        if now is None:
            now = self._clock()
        self._next_expiry = now + 1.0
        cfg = self.config
        while self._evicted:
            key, gone = next(iter(self._evicted.items()))
            if now < gone.until:
                break
            del self._evicted[key]
        events: list[TableEvent] = []
        n = len(self._by_out)
        budget = max(EXPIRE_SLICE_MIN, n // EXPIRE_SLICES)
        if n <= budget:
            batch = list(self._by_out.values())
            self._scan = []
        else:
            # A big table is looked at in slices, one per call (each second): at most 1/10 of it,
            # so expiry costs a few ms a second and a tunnel goes at most ~10 s after its time.
            if not self._scan:
                self._scan = list(self._by_out.values())
            batch = self._scan[-budget:]
            del self._scan[-budget:]
        for t in batch:
            if self._by_out.get(self._k3(t.peer.addr, t.peer.port, t.visible_tid)) is not t:
                continue  # released meanwhile
            if t.closing_since is not None and now - t.closing_since >= cfg.hold_time:
                events.extend(self._release(t, "released_stopccn"))
            elif now - t.lns_seen >= cfg.idle_timeout:  # the LNS went silent (see module doc)
                events.extend(self._release(t, "released_idle"))
            elif t.our_tid is None and now - t.created >= cfg.pending_timeout:
                events.extend(self._release(t, "released_pending"))
            elif t.sessions:
                for sid, s in list(t.sessions.items()):
                    if s.closing_since is not None and now - s.closing_since >= cfg.hold_time:
                        del t.sessions[sid]
                        self.counters["session_released"] += 1
        return events

    def _release(self, t: Tunnel, why: str | None = None) -> tuple[TableEvent, ...]:
        addr, port = t.peer.addr, t.peer.port
        kout = self._k3(addr, port, t.visible_tid)
        if self._by_out.get(kout) is not t:
            return ()
        del self._by_out[kout]
        kc = self._kc(addr, port, t.mark, t.client_tid)
        if self._by_client.get(kc) is t:
            del self._by_client[kc]
        self._unindex(t)
        used = self._visible.get(addr)
        if used is not None:
            used.discard(t.visible_tid)
            if not used:
                del self._visible[addr]
        self._per_mark[t.mark] -= 1
        if self._per_mark[t.mark] <= 0:
            del self._per_mark[t.mark]
        self._forget_unestablished(t)
        if why:
            self.counters[why] += 1
        return (TableEvent("release", t.peer, t.visible_tid, t.client_tid, t.our_tid, t.mark),)

    def clear(self) -> list[TableEvent]:
        """Forget every tunnel (returns their release events)."""
        events: list[TableEvent] = []
        for t in list(self._by_out.values()):
            events.extend(self._release(t))
        self._evicted.clear()
        self._scan = []
        return events

    # ---------------------------------------------------------------- persistence
    def export_state(self) -> dict:
        """A JSON-ready snapshot of the table. Times are stored as ages, so any clock base works."""
        now = self._clock()
        tunnels = []
        for t in self._by_out.values():
            tunnels.append({
                "peer_addr": t.peer.addr, "peer_port": t.peer.port, "mark": t.mark,
                "client_tid": t.client_tid, "visible_tid": t.visible_tid, "our_tid": t.our_tid,
                "established": t.established,
                "age": now - t.created, "idle": now - t.last_seen,
                "idle_out": None if t.last_out is None else now - t.last_out,
                "closing_for": None if t.closing_since is None else now - t.closing_since,
                "packets_in": t.packets_in, "packets_out": t.packets_out, "conflicts": t.conflicts,
                "sessions": [{"client_sid": s.client_sid, "our_sid": s.our_sid, "age": now - s.created,
                              "idle": now - s.last_seen,
                              "closing_for": None if s.closing_since is None else now - s.closing_since}
                             for s in t.sessions.values()],
            })
        return {"version": STATE_VERSION, "tunnels": tunnels}

    def import_state(self, state: dict) -> list[TableEvent]:
        """Load a snapshot made by :meth:`export_state`, replacing the table.

        Raises ``ValueError`` with a clear message for anything that is not a valid snapshot; the
        table is then left empty. Returns a "learn" event per tunnel, followed by a "bind" event for the
        tunnels whose LNS ID is known.
        """
        self.clear()
        try:
            tunnels = self._parse_state(state)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"invalid state: {exc}") from exc
        events: list[TableEvent] = []
        for t in tunnels:
            key_out = self._k3(t.peer.addr, t.peer.port, t.visible_tid)
            if key_out in self._by_out:
                raise_dup = f"duplicate tunnel {t.visible_tid} for {t.peer}"
                self.clear()
                raise ValueError(f"invalid state: {raise_dup}")
            self._by_out[key_out] = t
            if t.visible_tid != t.client_tid:
                self._by_client[self._kc(t.peer.addr, t.peer.port, t.mark, t.client_tid)] = t
            self._visible.setdefault(t.peer.addr, set()).add(t.visible_tid)
            self._per_mark[t.mark] += 1
            if not t.established:
                self._unestablished.setdefault(t.mark, OrderedDict())[id(t)] = t
            events.append(TableEvent("learn", t.peer, t.visible_tid, t.client_tid, None, t.mark))
            if t.our_tid is not None:
                self._index_in(t)
                events.append(TableEvent("bind", t.peer, t.visible_tid, t.client_tid, t.our_tid, t.mark))
        return events

    def _parse_state(self, state: dict) -> list[Tunnel]:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {state.get('version') if isinstance(state, dict) else None!r}")
        now = self._clock()
        out = []

        def u16(v, name, optional=False):
            if v is None and optional:
                return None
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFF:
                raise ValueError(f"{name} {v!r} is not a 16-bit ID")
            return v

        def secs(v, name, optional=False):
            if v is None and optional:
                return None
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} {v!r} is not a duration")
            return float(v)

        for d in state["tunnels"]:
            mark = d["mark"]
            if not isinstance(mark, int) or not 0 < mark <= 0xFFFFFFFF:
                raise ValueError(f"mark {mark!r}")
            port = d["peer_port"]
            if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
                raise ValueError(f"peer_port {port!r}")
            addr = d["peer_addr"]
            if not isinstance(addr, str) or not addr:
                raise ValueError(f"peer_addr {addr!r}")
            closing = secs(d.get("closing_for"), "closing_for", True)
            t = Tunnel(Peer(addr, port), mark, u16(d["client_tid"], "client_tid"),
                       u16(d["visible_tid"], "visible_tid"), now - secs(d["age"], "age"),
                       now - secs(d["idle"], "idle"), u16(d.get("our_tid"), "our_tid", True),
                       bool(d.get("established", False)),
                       None if closing is None else now - closing,
                       int(d.get("packets_in", 0)), int(d.get("packets_out", 0)), int(d.get("conflicts", 0)))
            if "idle_out" in d:
                idle_out = secs(d["idle_out"], "idle_out", True)
                t.last_out = None if idle_out is None else now - idle_out
            else:  # a state file written before the LNS's last packet was recorded
                t.last_out = t.last_seen
            for s in d.get("sessions", []):
                sc = secs(s.get("closing_for"), "closing_for", True)
                sid = u16(s["client_sid"], "client_sid")
                if t.sessions is NO_SESSIONS:
                    t.sessions = {}
                t.sessions[sid] = Session(sid, u16(s.get("our_sid"), "our_sid", True),
                                          now - secs(s["age"], "age"), now - secs(s["idle"], "idle"),
                                          None if sc is None else now - sc)
            out.append(t)
        return out


def iter_events(decisions: Iterable[Decision]) -> Iterable[TableEvent]:
    """All table events of a sequence of decisions, in order."""
    for d in decisions:
        yield from d.events
