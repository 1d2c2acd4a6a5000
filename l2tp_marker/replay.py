"""``l2tp-marker replay``: run a capture through the live engine, offline.

Direction and marks come from the capture where it has them (NFLOG: the netfilter hook and mark of
each packet), otherwise from options: ``gateway`` says which address is the LNS, and inbound marks
are assigned per peer, per peer address, or from a mapping file. The engine's clock follows the
capture's timestamps, so hold times and idle timeouts behave as they did live.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from . import capture_io, codec
from .capture_io import CapturedPacket, CaptureError
from .codec import L2tpMessage, Malformed
from .constants import L2TP_PORT, SCCRQ
from .engine import IN, OUT, Engine, EngineConfig
from .judge import R_NOT_L2TP, Verdict, judge_packet, record

HOOK_DIRECTION = {
    capture_io.NF_INET_PRE_ROUTING: IN,
    capture_io.NF_INET_LOCAL_IN: IN,
    capture_io.NF_INET_LOCAL_OUT: OUT,
    capture_io.NF_INET_POST_ROUTING: OUT,
}


class ReplayError(Exception):
    """Bad options or a capture that replay cannot use, with a message saying what to do."""


@dataclass(frozen=True)
class MarkPolicy:
    """How inbound packets of a capture without marks get one.

    ``by``: ``"peer"`` (each distinct address:port is a client: mark 1, 2, ... in order of
    appearance), ``"addr"`` (each distinct address), or ``"map"`` (``mapping``: address or
    address:port -> mark; unmapped inbound packets get mark 0).
    """

    by: str = "peer"
    mapping: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def from_file(path: str | Path) -> "MarkPolicy":
        """Read a mapping file: one ``ADDRESS[:PORT] MARK`` per line, ``#`` comments."""
        mapping: dict[str, int] = {}
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ReplayError(f"{path}:{lineno}: expected 'ADDRESS[:PORT] MARK', got {line!r}")
            try:
                mark = int(parts[1], 0)
            except ValueError:
                raise ReplayError(f"{path}:{lineno}: mark {parts[1]!r} is not a number") from None
            if not 0 <= mark <= 0xFFFFFFFF:
                raise ReplayError(f"{path}:{lineno}: mark {parts[1]} is not a 32-bit value")
            mapping[parts[0]] = mark
        return MarkPolicy("map", mapping)


@dataclass
class _Marks:
    policy: MarkPolicy
    seen: dict[str, int] = field(default_factory=dict)

    def inbound(self, src: str, sport: int) -> int:
        p = self.policy
        if p.by == "map":
            return p.mapping.get(f"{src}:{sport}", p.mapping.get(src, 0))
        key = src if p.by == "addr" else f"{src}:{sport}"
        if key not in self.seen:
            self.seen[key] = len(self.seen) + 1
        return self.seen[key]


@dataclass
class ReplayResult:
    records: list[dict]
    summary: dict
    rewritten: list[tuple[float, bytes]]


def _direction(pkt: CapturedPacket, dg: codec.UdpDatagram, gateway: str | None) -> str | None:
    if pkt.hook is not None and pkt.hook in HOOK_DIRECTION:
        return HOOK_DIRECTION[pkt.hook]
    if gateway is not None:
        if dg.dst == gateway and dg.dport == L2TP_PORT:
            return IN
        if dg.src == gateway and dg.sport == L2TP_PORT:
            return OUT
        return None
    return None


def _guess_gateway(packets: list[CapturedPacket]) -> str | None:
    """The destination of the first SCCRQ in the capture, if there is one."""
    for p in packets:
        if p.ip is None:
            continue
        dg = codec.parse_ip_udp(p.ip)
        if not isinstance(dg, codec.UdpDatagram) or dg.dport != L2TP_PORT:
            continue
        m = codec.decode_l2tp(p.ip, dg.payload_offset, dg.payload_end)
        if isinstance(m, L2tpMessage) and m.control and m.msg_type == SCCRQ and m.tunnel_id == 0:
            return dg.dst
    return None


def replay(source: str | Path | IO[bytes], *, gateway: str | None = None,
           marks: MarkPolicy | None = None, config: EngineConfig | None = None,
           fastpath_bit: int = 0x80000000) -> ReplayResult:
    """Replay a capture; raises :class:`ReplayError` / :class:`CaptureError` for unusable input.

    In a capture taken by ``l2tp-marker capture`` (NFLOG), a packet whose mark carries
    ``fastpath_bit`` was handled by the daemon's kernel fast path (the bit is set before the capture
    rules run): the bit is not part of the SA mark, so it is stripped before judging, and the
    packet's record says ``"fastpath": true``.
    """
    if gateway is not None:
        try:
            gateway = str(ipaddress.ip_address(gateway))
        except ValueError:
            raise ReplayError(f"--gateway {gateway!r} is not an IP address") from None
    packets = list(capture_io.read_capture(source))
    has_hooks = any(p.hook is not None for p in packets)
    if gateway is None and not has_hooks:
        gateway = _guess_gateway(packets)
    clock = _Clock()
    engine = Engine(config or EngineConfig(), clock=clock)
    mark_source = _Marks(marks or MarkPolicy())
    records: list[dict] = []
    rewritten: list[tuple[float, bytes]] = []
    seen = Counter()
    peers: set[str] = set()
    marks_seen: set[int] = set()
    aliases: set[tuple[str, int, int]] = set()
    malformed: list[dict] = []
    for p in packets:
        clock.t = p.ts
        if p.ip is None:
            seen["unreadable"] += 1
            malformed.append({"no": p.no, "reason": p.error or "no IP packet"})
            continue
        dg = codec.parse_ip_udp(p.ip)
        if dg is None:
            seen["esp" if _ip_proto(p.ip) == 50 else "not_udp"] += 1
            continue
        if isinstance(dg, Malformed):
            seen["malformed_ip"] += 1
            malformed.append({"no": p.no, "reason": dg.reason})
            continue
        if L2TP_PORT not in (dg.sport, dg.dport):
            seen["nat_t" if 4500 in (dg.sport, dg.dport) else "other_udp"] += 1
            continue
        direction = _direction(p, dg, gateway)
        if direction is None:
            seen["direction_unknown"] += 1
            continue
        fast = False
        if p.mark is not None:
            mark_in = p.mark
            if p.hook is not None and fastpath_bit and mark_in & fastpath_bit:
                mark_in &= ~fastpath_bit & 0xFFFFFFFF
                fast = True
        elif p.hook is not None:
            mark_in = 0  # NFLOG leaves the mark attribute out when the mark is 0
        elif direction == IN:
            mark_in = mark_source.inbound(dg.src, dg.sport)
        else:
            mark_in = 0
        v = judge_packet(engine, p.ip, direction, mark_in)
        if v.decision.reason == R_NOT_L2TP:
            seen["other_udp"] += 1
            continue
        seen["l2tp"] += 1
        rec = record(p.no, v)
        rec["mark_in"] = mark_in if p.hook is not None else p.mark
        rec["ts"] = p.ts
        if fast:
            rec["fastpath"] = True
        if v.payload is not None:
            # A capture taken where the kernel had not finished the checksum (offload, NFLOG at
            # LOCAL_OUT) holds a partial one; the rewrite keeps it exactly as (in)valid: say null.
            dg2 = codec.parse_ip_udp(v.payload)
            rec["checksum_ok"] = (codec.udp_checksum_ok(v.payload, dg2)
                                  if codec.udp_checksum_ok(p.ip, v.datagram) else None)
            rewritten.append((p.ts, v.payload))
        else:
            rewritten.append((p.ts, p.ip))
        if isinstance(v.message, Malformed):
            malformed.append({"no": p.no, "reason": v.message.reason})
        elif v.decision.reason == "malformed":
            malformed.append({"no": p.no, "reason": v.decision.detail or "malformed"})
        records.append(rec)
        if v.peer:
            peers.add(str(v.peer))
        if v.decision.mark is not None:
            marks_seen.add(v.decision.mark)
        if direction == IN and mark_in:
            marks_seen.add(mark_in)
        if v.decision.reason == "sccrq_aliased":
            for r in v.decision.rewrites:
                aliases.add((str(v.peer), r.old, r.new))
    summary = _summary(engine, seen, peers, marks_seen, aliases, malformed, gateway, len(packets))
    return ReplayResult(records, summary, rewritten)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _ip_proto(ip: bytes) -> int | None:
    if len(ip) >= 20 and ip[0] >> 4 == 4:
        return ip[9]
    if len(ip) >= 40 and ip[0] >> 4 == 6:
        return ip[6]
    return None


def _summary(engine: Engine, seen: Counter, peers, marks, aliases, malformed, gateway, total) -> dict:
    reasons = {k: v for k, v in sorted(engine.counters.items()) if v}
    tunnels = []
    for t in engine.tunnels():
        tunnels.append({"peer": str(t.peer), "mark": t.mark, "client_tid": t.client_tid,
                        "alias": t.alias, "our_tid": t.our_tid, "state": t.state,
                        "sessions": sorted(t.sessions), "packets_in": t.packets_in,
                        "packets_out": t.packets_out, "conflicts": t.conflicts})
    s = {
        "packets": total,
        "l2tp_packets": seen.get("l2tp", 0),
        "gateway": gateway,
        "peers": sorted(peers),
        "marks": sorted(marks),
        "tunnels_live": tunnels,
        "tunnels_learned": engine.counters.get("sccrq_learned", 0) + engine.counters.get("sccrq_aliased", 0),
        "sessions": sum(len(t.sessions) for t in engine.tunnels()),
        "aliases": [{"peer": p, "client_tid": c, "alias": a} for p, c, a in sorted(aliases)],
        "collisions": engine.counters.get("sccrq_aliased", 0),
        "conflicts": [{"peer": str(c.peer), "tunnel": c.our_tid, "bound_mark": c.bound_mark,
                       "seen_mark": c.seen_mark, "kind": c.kind} for c in engine.conflicts],
        "malformed": malformed,
        "reasons": reasons,
        "other_traffic": {k: v for k, v in sorted(seen.items()) if k != "l2tp"},
    }
    if not s["l2tp_packets"]:
        s["explanation"] = explain_no_l2tp(seen, gateway)
    return s


def explain_no_l2tp(seen: Counter, gateway: str | None) -> str:
    """What to capture instead, when a capture shows no L2TP that replay can judge."""
    if seen.get("direction_unknown"):
        return ("The capture has udp/1701 packets but replay cannot tell which side is the gateway: "
                "pass --gateway ADDRESS (the LNS address), or capture with `l2tp-marker capture`, "
                "which records each packet's netfilter hook and mark.")
    if seen.get("esp") or seen.get("nat_t"):
        return ("The capture holds only IPsec traffic (ESP or NAT-T udp/4500): it was taken outside the "
                "gateway's IPsec decryption, so the L2TP inside is encrypted. Capture the decrypted "
                "packets instead: `l2tp-marker capture -w FILE.pcap` on the gateway records L2TP with its "
                "marks at LOCAL_IN/LOCAL_OUT (or NFLOG rules on udp/1701 in mangle INPUT/OUTPUT with "
                "`tcpdump -i nflog:GROUP -w FILE.pcap`); tcpdump on the outside interface cannot see it.")
    return ("No L2TP (udp/1701) packets in this capture. Capture on the gateway itself, after IPsec "
            "decryption: `l2tp-marker capture -w FILE.pcap`, or `tcpdump -i any -w FILE.pcap udp port 1701`.")


# ---------------------------------------------------------------- output
COLUMNS = ("no", "dir", "peer", "kind", "tunnel", "session", "mark_in", "mark", "rewrite", "reason")


def _cell(rec: dict, col: str) -> str:
    v = rec.get(col)
    if v is None:
        return "-"
    if col in ("mark_in", "mark"):
        return f"{v:#x}"
    if col == "rewrite":
        return ",".join(f"{k}={n}" for k, n in v.items())
    return str(v)


def format_table(records: Iterable[dict]) -> Iterator[str]:
    rows = [[_cell(r, c) for c in COLUMNS] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(COLUMNS)]
    yield "  ".join(c.upper().ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()
    for row in rows:
        yield "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()


def format_summary(s: dict) -> Iterator[str]:
    yield ""
    yield f"packets: {s['packets']} in file, {s['l2tp_packets']} L2TP; gateway {s['gateway'] or 'unknown'}"
    yield f"peers: {', '.join(s['peers']) or 'none'}"
    yield f"marks: {', '.join(f'{m:#x}' for m in s['marks']) or 'none'}"
    yield f"tunnels learned: {s['tunnels_learned']}, live at end: {len(s['tunnels_live'])}, sessions: {s['sessions']}"
    for t in s["tunnels_live"]:
        alias = f" alias {t['alias']}" if t["alias"] is not None else ""
        yield (f"  {t['peer']} client tunnel {t['client_tid']}{alias} <-> gateway tunnel {t['our_tid']} "
               f"mark {t['mark']:#x} {t['state']} sessions {t['sessions']} in/out {t['packets_in']}/{t['packets_out']}")
    yield f"collisions (aliased SCCRQs): {s['collisions']}"
    for a in s["aliases"]:
        yield f"  {a['peer']} client tunnel {a['client_tid']} -> alias {a['alias']}"
    yield f"conflicts: {len(s['conflicts'])}"
    for c in s["conflicts"]:
        yield (f"  {c['peer']} tunnel {c['tunnel']} bound to mark {c['bound_mark']:#x}, "
               f"{c['kind']} came with mark {c['seen_mark']:#x}")
    yield f"malformed: {len(s['malformed'])}"
    for m in s["malformed"]:
        yield f"  packet {m['no']}: {m['reason']}"
    yield "decisions: " + ", ".join(f"{k}={v}" for k, v in s["reasons"].items())
    if s["other_traffic"]:
        yield "other traffic: " + ", ".join(f"{k}={v}" for k, v in s["other_traffic"].items())
    if "explanation" in s:
        yield ""
        yield s["explanation"]


def write_json(result: ReplayResult, out: IO[str]) -> None:
    for rec in result.records:
        out.write(json.dumps(rec, sort_keys=False) + "\n")
    out.write(json.dumps({"summary": result.summary}) + "\n")


__all__ = ["replay", "ReplayError", "CaptureError", "MarkPolicy", "ReplayResult", "Verdict",
           "format_table", "format_summary", "write_json"]
