#!/usr/bin/env python3
"""Decode benchmark: the fast codec against scapy dissection, and the full judge path.

Measures, in ONE run, nanoseconds per packet of

* the fast decoder: ``codec.parse_ip_udp`` + ``codec.decode_l2tp``;
* scapy dissection: ``IP(raw)`` with the project's layers bound on udp/1701 (down to the AVPs);
* the full per-packet path ``judge.judge_packet`` with an ``Engine`` that already knows the
  tunnels, for data packets (inbound, outbound, outbound to an aliased tunnel = rewrite + checksum).

Rounds are interleaved (fast, scapy, judge, then the next round in the other order) and each figure
is the median over rounds; ratios are ratios of medians taken in the same run. The machines this
runs on are shared and noisy: compare the ratios, not the absolute numbers. Nothing here asserts a
timing. See bench/README.md.

    .venv/bin/python bench/decode_bench.py [--rounds 7] [--packets 2000]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import scapy  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from l2tp_marker import codec  # noqa: E402
from l2tp_marker import constants as C  # noqa: E402
from l2tp_marker.engine import IN, OUT, Engine, EngineConfig  # noqa: E402
from l2tp_marker.judge import judge_packet  # noqa: E402
from l2tp_marker.layers import (  # noqa: E402
    AVPAssignedTunnelID, AVPBearerCapabilities, AVPFirmwareRevision, AVPFramingCapabilities,
    AVPHostName, AVPMessageType, AVPProtocolVersion, AVPReceiveWindowSize, AVPTieBreaker,
    AVPVendorName, L2TPv2,
)

GATEWAY = "10.0.0.1"
NAT = "198.51.100.7"
PORT = C.L2TP_PORT

# The mix: (kind, weight). Steady state is overwhelmingly data; control traffic is HELLOs and their
# ZLB acks, with a tunnel setup now and then.
MIX = (("data", 16), ("HELLO", 2), ("ZLB", 1), ("SCCRQ", 1))


def _ip(l2tp, *, inbound: bool = True, port: int = 1701) -> bytes:
    src, dst = (NAT, GATEWAY) if inbound else (GATEWAY, NAT)
    sport, dport = (port, PORT) if inbound else (PORT, port)
    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / l2tp)


def _ppp_ip_payload(n: int) -> bytes:
    # PPP in HDLC-like framing carrying an IPv4 packet of n octets (contents do not matter here).
    return b"\xff\x03\x00\x21" + bytes(IP(src="192.168.42.10", dst="192.168.1.20") / Raw(b"x" * max(n - 20, 0)))


def make_packet(kind: str, i: int) -> bytes:
    tid, sid = 100 + i % 50, 1 + i % 7
    if kind == "data":
        return _ip(L2TPv2(t=0, l=0, s=0, tunnel_id=tid, session_id=sid) / Raw(_ppp_ip_payload(200 + (i * 37) % 1000)))
    if kind == "HELLO":
        return _ip(L2TPv2(tunnel_id=tid, ns=i & 0xFFFF, nr=i & 0xFFFF, avps=[AVPMessageType(msg_type=C.HELLO)]))
    if kind == "ZLB":
        return _ip(L2TPv2(tunnel_id=tid, ns=i & 0xFFFF, nr=i & 0xFFFF))
    if kind == "SCCRQ":  # ten AVPs, as a Windows client sends it
        return _ip(L2TPv2(avps=[
            AVPMessageType(msg_type=C.SCCRQ), AVPProtocolVersion(), AVPFramingCapabilities(),
            AVPBearerCapabilities(), AVPTieBreaker(tie_breaker=i.to_bytes(8, "big")),
            AVPFirmwareRevision(firmware=0x0600), AVPHostName(hostname=b"winclient-%d" % i),
            AVPVendorName(vendor_name=b"Microsoft"), AVPAssignedTunnelID(tunnel_id=1 + i % 20),
            AVPReceiveWindowSize(window=8),
        ]))
    raise ValueError(kind)


def build_mix(n: int) -> list[bytes]:
    cycle = [k for k, w in MIX for _ in range(w)]
    return [make_packet(cycle[i % len(cycle)], i) for i in range(n)]


# --------------------------------------------------------------------------- the measured loops


def fast_decode(packets: list[bytes]) -> int:
    parse, decode = codec.parse_ip_udp, codec.decode_l2tp
    n = 0
    for p in packets:
        dg = parse(p)
        m = decode(p, dg.payload_offset, dg.payload_end)
        n += m.avp_count
    return n


def scapy_decode(packets: list[bytes]) -> int:
    n = 0
    for p in packets:
        pkt = IP(p)
        n += len(pkt[L2TPv2].avps or ()) if pkt[L2TPv2].t else 0
    return n


def judge_all(items: list[tuple[bytes, str, int]], engine: Engine) -> int:
    rewritten = 0
    for p, direction, mark in items:
        rewritten += judge_packet(engine, p, direction, mark).payload is not None
    return rewritten


def timed(fn, packets) -> float:
    """ns per packet of one pass of ``fn`` over ``packets``."""
    gc.collect()
    t0 = time.perf_counter_ns()
    fn(packets)
    return (time.perf_counter_ns() - t0) / len(packets)


# --------------------------------------------------------------------------- a populated engine


def populated_engine(tunnels: int) -> tuple[Engine, dict[str, list[tuple[bytes, str, int]]]]:
    """An engine knowing ``tunnels`` tunnels from one NAT address (half of them aliased), and data
    packets for them as (packet, direction, mark): inbound with the owner's mark, outbound to a plain
    tunnel, outbound to an aliased one (header tunnel ID rewritten, checksum updated)."""
    engine = Engine(EngineConfig(max_tunnels_per_mark=tunnels + 1))
    data: dict[str, list[tuple[bytes, str, int]]] = {"in": [], "out": [], "out_aliased": []}
    payload = Raw(_ppp_ip_payload(600))
    for k in range(tunnels):
        port = 1024 + k
        client_tid = 1 + k // 2  # every ID is used by two clients: the second one gets an alias
        mark = 0x100 + k
        sccrq = _ip(L2TPv2(avps=[AVPMessageType(msg_type=C.SCCRQ), AVPAssignedTunnelID(tunnel_id=client_tid)]),
                    port=port)
        v = judge_packet(engine, sccrq, IN, mark)
        if v.decision.reason not in ("sccrq_learned", "sccrq_aliased"):
            raise SystemExit(f"engine setup failed: {v.decision}")
        visible = client_tid if v.decision.reason == "sccrq_learned" else v.decision.rewrites[0].new
        our_tid = 1000 + k
        sccrp = _ip(L2TPv2(tunnel_id=visible, avps=[AVPMessageType(msg_type=C.SCCRP),
                                                     AVPAssignedTunnelID(tunnel_id=our_tid)]),
                    inbound=False, port=port)
        judge_packet(engine, sccrp, OUT, 0)
        data["in"].append((_ip(L2TPv2(t=0, l=0, s=0, tunnel_id=our_tid, session_id=3) / payload, port=port),
                           IN, mark))
        out = _ip(L2TPv2(t=0, l=0, s=0, tunnel_id=visible, session_id=7) / payload, inbound=False, port=port)
        data["out_aliased" if visible != client_tid else "out"].append((out, OUT, 0))
    return engine, data


def _expand(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median over them; default 7)")
    ap.add_argument("--packets", type=int, default=2000, help="packets per timed pass (default 2000)")
    ap.add_argument("--tunnels", type=int, default=200, help="tunnels the judge-path engine knows (default 200)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.packets < 1 or args.tunnels < 2:
        ap.error("--rounds and --packets must be >= 1, --tunnels >= 2")

    mix = build_mix(args.packets)
    per_kind_n = max(args.packets // 8, 25)
    kinds = {k: [make_packet(k, i) for i in range(per_kind_n)] for k, _ in MIX}
    engine, jdata = populated_engine(args.tunnels)
    judge_sets = {name: _expand(items, args.packets) for name, items in jdata.items()}

    # Sanity before timing (not a timing assert): both decoders see the same messages, and the judge
    # path takes the branches it is meant to measure.
    if fast_decode(mix) != scapy_decode(mix):
        raise SystemExit("fast decoder and scapy disagree on the mix")
    expect = {"in": ("inbound_known", False), "out": ("owner_mark_set", False),
              "out_aliased": ("owner_mark_set", True)}
    for name, items in judge_sets.items():
        for p, d, m in items[:len(jdata[name])]:
            v = judge_packet(engine, p, d, m)
            if (v.decision.reason, v.payload is not None) != expect[name]:
                raise SystemExit(f"judge path {name}: unexpected {v.decision}")

    samples: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    for r in range(args.rounds):
        order = ("fast", "scapy") if r % 2 == 0 else ("scapy", "fast")
        for which in order:
            fn = fast_decode if which == "fast" else scapy_decode
            add(f"{which}:mix", timed(fn, mix))
            for k, pkts in kinds.items():
                add(f"{which}:{k}", timed(fn, pkts))
        for name, items in judge_sets.items():
            add(f"judge:{name}", timed(lambda x: judge_all(x, engine), items))

    med = {k: statistics.median(v) for k, v in samples.items()}
    lo = {k: min(v) for k, v in samples.items()}
    hi = {k: max(v) for k, v in samples.items()}

    total_w = sum(w for _, w in MIX)
    mix_desc = ", ".join(f"{k} {100 * w / total_w:.0f}%" for k, w in MIX)
    print(f"l2tp-marker decode benchmark: {args.rounds} interleaved rounds x {args.packets} packets")
    print(f"mix: {mix_desc} (SCCRQ = 10 AVPs; data = PPP/IPv4, 200-1200 octets)")
    print(f"python {platform.python_version()}, scapy {scapy.VERSION}, {platform.machine()}")
    print()
    rows = [("fast decode  parse_ip_udp + decode_l2tp", "fast:mix"),
            ("scapy        IP(raw) with l2tp_marker.layers", "scapy:mix")]
    w = max(len(label) for label, _ in rows) + 2
    print(f"{'mix':<{w}}{'median ns/pkt':>14}{'min':>10}{'max':>10}")
    for label, key in rows:
        print(f"{label:<{w}}{med[key]:>14,.0f}{lo[key]:>10,.0f}{hi[key]:>10,.0f}")
    print(f"{'ratio scapy / fast (of medians)':<{w}}{med['scapy:mix'] / med['fast:mix']:>13.1f}x")
    print()
    print(f"{'per kind':<{w}}{'fast ns':>14}{'scapy ns':>10}{'ratio':>10}")
    for k, _ in MIX:
        f, s = med[f"fast:{k}"], med[f"scapy:{k}"]
        print(f"{k:<{w}}{f:>14,.0f}{s:>10,.0f}{s / f:>9.1f}x")
    print()
    print(f"{f'judge_packet, engine knows {args.tunnels} tunnels':<{w}}{'median ns/pkt':>14}{'min':>10}{'max':>10}"
          f"{'/ fast data':>13}")
    jrows = [("data in, known tunnel", "judge:in"),
             ("data out, owner mark", "judge:out"),
             ("data out, aliased (rewrite+csum)", "judge:out_aliased")]
    for label, key in jrows:
        print(f"{label:<{w}}{med[key]:>14,.0f}{lo[key]:>10,.0f}{hi[key]:>10,.0f}"
              f"{med[key] / med['fast:data']:>12.1f}x")
    print()
    print("Ratios come from one interleaved run; absolute numbers depend on the (shared, noisy) machine.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
