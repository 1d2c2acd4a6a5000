"""Fuzz targets: one per entry point that takes bytes from the network or from a file.

Each target takes one ``bytes`` input and either raises (an exception escaped the code under test,
or an invariant checked here failed: both are findings) or returns a small hashable *signature* of
what happened (decision and malformation reasons). The fallback mutation loop of ``fuzz/run.py``
keeps inputs that produce a new signature, a cheap stand-in for coverage feedback; atheris ignores
the return value and uses real coverage.

``fuzz_decoder(data)``
    ``codec.parse_ip_udp`` on the bytes as an IP packet, ``codec.decode_l2tp`` on its UDP payload and
    on the bytes themselves (bytes and memoryview must agree). Every offset a decoded message
    reports must lie inside the buffer, and rewriting the IDs at those offsets must keep the length
    and a valid UDP checksum.

``fuzz_engine(data)``
    The bytes are a program for one :class:`~l2tp_marker.engine.Engine` with small bounds (so the
    eviction, table-full and expiry paths run within a few packets), fed through
    ``judge.judge_packet`` exactly as the daemon does. Format::

        byte 0     engine config: bits 0-1 enforce (0 off, 1 log, 2 drop, 3 log), bit 2 secret
                   b"s3cret" (the one of pcaps/hidden-avp.pcap), bit 3 mark_mask 0xffff,
                   bit 4 alias_start 3 (so alias search wraps upwards)
        then operations, each:
          b0       bit 0 direction (0 in, 1 out); bits 1-3 mark (MARKS[i], 6 = 4 more bytes);
                   bits 4-6 clock step (STEPS[i], 7 = 2 more bytes, tenths of a second);
                   bit 7: the packet bytes are an L2TP payload to wrap in IPv4/IPv6 + UDP
          b1       when wrapping: bits 0-1 peer port (1701, 1024, 1025, 50123), bit 2 IPv6,
                   bit 3 UDP checksum 0 (IPv4), bit 4 second peer address
          b2 b3    packet length (big endian), then [mark u32] [step u16], then the packet

    After every packet: no exception; the decision has a reason; inbound packets and anything not
    judged keep their mark; a rewritten packet keeps its length, changes only UDP payload bytes and
    the checksum, keeps a valid UDP checksum if it had one and decodes to the same structure; the
    table stays within ``max_tunnels``, ``max_tunnels_per_mark`` and ``max_sessions_per_tunnel``
    and its indexes agree with each other. At the end the table survives a JSON save/load, and
    after every timeout has passed it is empty with all its indexes (nothing leaks).

``fuzz_capture(data)``
    ``capture_io.read_capture`` (with internal decoder errors made fatal) and ``replay.replay`` on
    the bytes as a capture file; only ``CaptureError`` / ``ReplayError`` may come out, and the
    table, summary and JSON writers must accept whatever replay returned. The input's length picks
    the options (gateway none / IPv4 / IPv6, secret or not), so no input bytes are spent on them.

``seed_inputs(target)`` builds the seed corpus from the captures in ``pcaps/``.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
from collections import Counter
from pathlib import Path

from l2tp_marker import capture_io, codec
from l2tp_marker import engine as _engine_mod
from l2tp_marker import judge as _judge_mod
from l2tp_marker.capture_io import CaptureError
from l2tp_marker.codec import L2tpMessage, Malformed, UdpDatagram
from l2tp_marker.constants import L2TP_PORT
from l2tp_marker.engine import IN, OUT, Engine, EngineConfig
from l2tp_marker.judge import judge_packet, record
from l2tp_marker.replay import ReplayError, format_summary, format_table, replay, write_json

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT / "pcaps"

SECRET = b"s3cret"
GW4, GW6 = "198.51.100.1", "2001:db8::1"
PEERS4 = ("192.0.2.10", "192.0.2.11")
PEERS6 = ("2001:db8:1::10", "2001:db8:1::11")
PORTS = (L2TP_PORT, 1024, 1025, 50123)

# Engine bounds for the engine target: small, so that a few packets reach every limit.
BOUNDS = dict(max_tunnels=6, max_tunnels_per_mark=3, max_sessions_per_tunnel=3, idle_timeout=50.0,
              hold_time=5.0, pending_timeout=10.0, conflict_history=4)
MARKS = (0, 1, 2, 3, 0x10001, 0xFFFFFFFF, None, 0x80000002)
STEPS = (0.0, 0.001, 0.5, 1.0, 6.0, 11.0, 51.0, None)
MAX_OPS = 4096

# Every reason the engine and judge can give (their R_* constants), so new reasons need no edit here.
ALLOWED_REASONS = frozenset(v for mod in (_engine_mod, _judge_mod) for k, v in vars(mod).items()
                            if k.startswith("R_") and isinstance(v, str))


# --------------------------------------------------------------------------- helpers


def _ip_aton(addr: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(addr).packed


_PACKED: dict[str, bytes] = {}


def _packed(addr: str) -> bytes:
    p = _PACKED.get(addr)
    if p is None:
        p = _PACKED[addr] = _ip_aton(addr)
    return p


def wrap_udp(payload: bytes, src: str, dst: str, sport: int, dport: int, *, zero_checksum: bool = False) -> bytes:
    """An IPv4 or IPv6 packet around ``payload`` with correct lengths and checksums."""
    s, d = _packed(src), _packed(dst)
    ulen = 8 + len(payload)
    if len(s) == 4:
        total = 20 + ulen
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total & 0xFFFF, 1, 0, 64, 17, 0, s, d))
        struct.pack_into("!H", hdr, 10, (~codec.ones_sum(bytes(hdr))) & 0xFFFF)
        pseudo = s + d + struct.pack("!BBH", 0, 17, ulen & 0xFFFF)
    else:
        hdr = bytearray(struct.pack("!IHBB16s16s", 6 << 28, ulen & 0xFFFF, 17, 64, s, d))
        pseudo = s + d + struct.pack("!I", ulen) + b"\0\0\0\x11"
        zero_checksum = False
    udp = bytearray(struct.pack("!HHHH", sport, dport, ulen & 0xFFFF, 0) + payload)
    if not zero_checksum:
        csum = (~codec.ones_sum(pseudo + bytes(udp))) & 0xFFFF or 0xFFFF
        struct.pack_into("!H", udp, 6, csum)
    return bytes(hdr) + bytes(udp)


def _wrap_op(payload: bytes, direction: str, sel: int) -> bytes:
    port = PORTS[sel & 3]
    v6 = bool(sel & 4)
    peer = (PEERS6 if v6 else PEERS4)[(sel >> 4) & 1]
    gw = GW6 if v6 else GW4
    if direction == IN:
        return wrap_udp(payload, peer, gw, port, L2TP_PORT, zero_checksum=bool(sel & 8))
    return wrap_udp(payload, gw, peer, L2TP_PORT, port, zero_checksum=bool(sel & 8))


def _check_message(m, buf, offset: int, end: int) -> None:
    """Everything a decoded message reports must lie inside ``buf[offset:end]``."""
    if isinstance(m, Malformed):
        assert isinstance(m.reason, str) and m.reason, m
        return
    assert isinstance(m, L2tpMessage), m
    assert offset <= m.tunnel_id_offset and m.tunnel_id_offset + 2 <= end, m
    assert m.session_id_offset == m.tunnel_id_offset + 2 and m.session_id_offset + 2 <= end, m
    assert 0 <= m.tunnel_id <= 0xFFFF and 0 <= m.session_id <= 0xFFFF
    assert m.tunnel_id == int.from_bytes(bytes(buf[m.tunnel_id_offset:m.tunnel_id_offset + 2]), "big")
    assert offset <= m.body_offset <= end, m
    if m.length is not None:
        assert m.body_offset - offset <= m.length and offset + m.length <= end, m
    msg_end = end if m.length is None else offset + m.length
    if not m.control:
        assert m.msg_type is None and m.avp_count == 0 and m.assigned_tunnel_id_offset is None
        assert m.kind == "data"
        return
    assert isinstance(m.kind, str) and m.kind
    assert (m.msg_type is None) == (m.avp_count == 0), m
    for value, off, blob in ((m.assigned_tunnel_id, m.assigned_tunnel_id_offset, m.hidden_tunnel_blob),
                             (m.assigned_session_id, m.assigned_session_id_offset, m.hidden_session_blob)):
        if off is None:
            assert value is None and blob is None, m
            continue
        assert m.body_offset + 6 <= off <= msg_end, m
        if blob is None:
            assert value is not None and off + 2 <= msg_end, m
            assert value == int.from_bytes(bytes(buf[off:off + 2]), "big"), m
        else:
            assert value is None and off + len(blob) <= msg_end and bytes(buf[off:off + len(blob)]) == blob, m
    for rv in (m.hidden_tunnel_rv, m.hidden_session_rv):
        assert rv is None or isinstance(rv, bytes)


def _same_structure(a: L2tpMessage, b: L2tpMessage) -> bool:
    return (a.control, a.length, a.msg_type, a.avp_count, a.body_offset, a.session_id, a.ns, a.nr,
            a.assigned_tunnel_id_offset, a.assigned_session_id_offset) == (
        b.control, b.length, b.msg_type, b.avp_count, b.body_offset, b.session_id, b.ns, b.nr,
        b.assigned_tunnel_id_offset, b.assigned_session_id_offset)


def _kind(m) -> str:
    """A coarse outcome name: the malformation reason or the message kind (unknown types together)."""
    if isinstance(m, Malformed):
        return m.reason  # the numbers in reasons ("L2TP version 7") are few and bounded
    kind = m.kind
    return "type-other" if kind.startswith("type-") else kind


# --------------------------------------------------------------------------- decoder


def fuzz_decoder(data: bytes) -> tuple:
    data = bytes(data)
    sig: list = []
    dg = codec.parse_ip_udp(data)
    assert codec.parse_ip_udp(memoryview(data)) == dg
    if dg is None:
        sig.append("not-udp")
    elif isinstance(dg, Malformed):
        assert isinstance(dg.reason, str) and dg.reason
        sig.append(("ip", dg.reason))
    else:
        assert isinstance(dg, UdpDatagram), dg
        assert dg.version in (4, 6)
        assert 20 <= dg.udp_offset and dg.udp_offset + 8 == dg.payload_offset <= dg.payload_end <= len(data), dg
        m = codec.decode_l2tp(data, dg.payload_offset, dg.payload_end)
        assert codec.decode_l2tp(memoryview(data), dg.payload_offset, dg.payload_end) == m
        _check_message(m, data, dg.payload_offset, dg.payload_end)
        sig.append(("udp", _kind(m)))
        if isinstance(m, L2tpMessage):
            _check_rewrites(data, dg, m)
    m2 = codec.decode_l2tp(data)
    _check_message(m2, data, 0, len(data))
    sig.append(("l2tp", _kind(m2)))
    return tuple(sig)


def _check_rewrites(data: bytes, dg: UdpDatagram, m: L2tpMessage) -> None:
    """Rewrite the header tunnel ID and a clear Assigned Tunnel ID as the engine would."""
    changes = [(m.tunnel_id_offset, ((m.tunnel_id + 1) & 0xFFFF).to_bytes(2, "big"))]
    if m.assigned_tunnel_id is not None:
        changes.append((m.assigned_tunnel_id_offset, b"\xff\xfe"))
    out = codec.rewrite(data, dg, changes)
    assert len(out) == len(data)
    dg2 = codec.parse_ip_udp(out)
    assert isinstance(dg2, UdpDatagram) and dg2._replace(udp_checksum=0) == dg._replace(udp_checksum=0)
    if codec.udp_checksum_ok(data, dg):
        assert codec.udp_checksum_ok(out, dg2), "rewrite broke a valid UDP checksum"
    m2 = codec.decode_l2tp(out, dg2.payload_offset, dg2.payload_end)
    assert isinstance(m2, L2tpMessage) and _same_structure(m, m2), (m, m2)


# --------------------------------------------------------------------------- engine


class _Clock:
    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def engine_config(cfg_byte: int) -> EngineConfig:
    return EngineConfig(enforce=("off", "log", "drop", "log")[cfg_byte & 3],
                        secret=SECRET if cfg_byte & 4 else None,
                        mark_mask=0xFFFF if cfg_byte & 8 else 0xFFFFFFFF,
                        alias_start=3 if cfg_byte & 16 else 0xFFFF,
                        **BOUNDS)


def iter_ops(data: bytes):
    """Decode the engine target's program into (direction, mark, step, packet) operations."""
    n = len(data)
    pos, count = 1, 0
    while pos + 4 <= n and count < MAX_OPS:
        b0, b1 = data[pos], data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        pos += 4
        direction = OUT if b0 & 1 else IN
        mark = MARKS[(b0 >> 1) & 7]
        if mark is None:
            mark = int.from_bytes(data[pos:pos + 4].ljust(4, b"\0"), "big")
            pos += 4
        step = STEPS[(b0 >> 4) & 7]
        if step is None:
            step = int.from_bytes(data[pos:pos + 2].ljust(2, b"\0"), "big") / 10
            pos += 2
        pkt = data[pos:pos + length]
        pos += length
        if b0 & 0x80:
            pkt = _wrap_op(pkt, direction, b1)
        count += 1
        yield direction, mark, step, pkt


def encode_op(direction: str, mark: int, step: float, pkt: bytes, *, wrap_sel: int | None = None) -> bytes:
    """The inverse of :func:`iter_ops` for one operation (used to build seeds and tests)."""
    b0 = 1 if direction == OUT else 0
    extra = b""
    if mark in MARKS:
        b0 |= MARKS.index(mark) << 1
    else:
        b0 |= 6 << 1
        extra += (mark & 0xFFFFFFFF).to_bytes(4, "big")
    if step in STEPS:
        b0 |= STEPS.index(step) << 4
    else:
        b0 |= 7 << 4
        extra += min(int(round(step * 10)), 0xFFFF).to_bytes(2, "big")
    b1 = 0
    if wrap_sel is not None:
        b0 |= 0x80
        b1 = wrap_sel
    pkt = pkt[:0xFFFF]
    return bytes([b0, b1]) + len(pkt).to_bytes(2, "big") + extra + pkt


def check_verdict(engine: Engine, v, pkt: bytes, direction: str, mark: int) -> None:
    d = v.decision
    assert isinstance(d.reason, str) and d.reason in ALLOWED_REASONS, d
    assert 0 <= v.mark_out <= 0xFFFFFFFF
    json.dumps(record(1, v))
    if direction == IN or d.reason in ("malformed", "not_l2tp", "unknown_tunnel", "no_mark"):
        assert v.mark_out == mark, (d, mark)
    if d.drop:
        assert d.reason == "sa_conflict" and engine.config.enforce == "drop", d
    if v.payload is None:
        assert not d.rewrites, d
        return
    assert d.rewrites
    out, dg, before = v.payload, v.datagram, v.message
    assert isinstance(dg, UdpDatagram) and isinstance(before, L2tpMessage)
    assert len(out) == len(pkt), "rewrite changed the packet length"
    csum_at = dg.udp_offset + 6
    for i, (a, b) in enumerate(zip(pkt, out)):
        if a != b:
            assert dg.payload_offset <= i < dg.payload_end or csum_at <= i < csum_at + 2, i
    dg2 = codec.parse_ip_udp(out)
    assert isinstance(dg2, UdpDatagram) and dg2._replace(udp_checksum=0) == dg._replace(udp_checksum=0)
    if dg.version == 4 and dg.udp_checksum == 0:
        assert dg2.udp_checksum == 0
    elif codec.udp_checksum_ok(pkt, dg):
        assert codec.udp_checksum_ok(out, dg2), "rewrite broke a valid UDP checksum"
    after = codec.decode_l2tp(out, dg2.payload_offset, dg2.payload_end)
    assert isinstance(after, L2tpMessage) and _same_structure(before, after), (before, after)
    for r in d.rewrites:
        assert r.field in ("tunnel_id", "assigned_tunnel_id"), r
        if r.field == "tunnel_id":
            assert direction == OUT and after.tunnel_id == r.new
        elif not before.hidden_tunnel_id:
            assert direction == IN and after.assigned_tunnel_id == r.new


def _members(entry) -> list:
    """An index entry as a list: one tunnel, or the list of tunnels sharing a key."""
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


def check_table(engine: Engine) -> None:
    """The table's bounds, and its indexes agreeing with each other.

    White-box: besides ``tunnels()`` this reads the engine's private indexes (``_by_out``, ``_by_in``,
    ``_by_client``, ``_visible``, ``_per_mark``, and ``_evicted`` when present). An index may map a key
    to one tunnel or to a list of tunnels sharing it.
    """
    cfg = engine.config
    tunnels = engine.tunnels()
    assert len(tunnels) == len(engine) <= cfg.max_tunnels, len(tunnels)
    per = Counter(t.mark for t in tunnels)
    assert all(c <= cfg.max_tunnels_per_mark for c in per.values()), per
    assert per == +engine._per_mark, (per, engine._per_mark)
    assert len(engine.conflicts) <= cfg.conflict_history
    ids = {id(t) for t in tunnels}
    by_in = [(k, t) for k, v in engine._by_in.items() for t in _members(v)]
    assert all(_members(v) for v in engine._by_in.values()), "empty index entry left behind"
    assert all(id(t) in ids for _, t in by_in), "index holds a tunnel that is not in the table"
    assert len(by_in) == sum(t.our_tid is not None for t in tunnels)
    assert all(id(t) in ids for t in engine._by_client.values())
    assert len(engine._by_client) == sum(t.visible_tid != t.client_tid for t in tunnels)  # aliased ones
    assert sum(len(v) for v in engine._visible.values()) == len(tunnels)
    assert all(engine._visible.values()), "empty per-address set left behind"
    for t in tunnels:
        assert len(t.sessions) <= cfg.max_sessions_per_tunnel, t
        assert engine._by_out[engine._k3(t.peer.addr, t.peer.port, t.visible_tid)] is t
        if t.visible_tid != t.client_tid:
            assert engine._by_client[engine._kc(t.peer.addr, t.peer.port, t.mark, t.client_tid)] is t
        assert t.visible_tid in engine._visible[t.peer.addr]
        if t.our_tid is not None:
            assert any(x is t for x in _members(engine._by_in[engine._k3(t.peer.addr, t.peer.port, t.our_tid)]))
    # The eviction queues hold exactly the tunnels that have not completed their handshake.
    queued = {id(t) for q in getattr(engine, "_unestablished", {}).values() for t in q.values()}
    assert all(getattr(engine, "_unestablished", {}).values()), "empty eviction queue left behind"
    assert queued == {id(t) for t in tunnels if not t.established}, "eviction queue out of step"
    # Records of tunnels a full table let go, if the engine keeps them: bounded like the table.
    evicted_bound = max(cfg.max_tunnels, getattr(_engine_mod, "EVICTED_RECORDS_MIN", 0))
    assert len(getattr(engine, "_evicted", ())) <= evicted_bound


def fuzz_engine(data: bytes) -> tuple:
    data = bytes(data)
    if not data:
        return ()
    config = engine_config(data[0])
    clock = _Clock()
    engine = Engine(config, clock=clock)
    sig: set = set()
    for direction, mark, step, pkt in iter_ops(data):
        clock.t += step
        v = judge_packet(engine, pkt, direction, mark)
        check_verdict(engine, v, pkt, direction, mark)
        check_table(engine)
        d = v.decision
        sig.add((direction, d.reason, d.detail if d.reason == "malformed" else None, bool(d.rewrites),
                 bool(d.events), len(engine) == config.max_tunnels))
    # The table survives a save and load ...
    state = json.loads(json.dumps(engine.export_state()))
    other = Engine(config, clock=clock)
    other.import_state(state)
    assert len(other) == len(engine)
    check_table(other)
    # ... and once every timeout has passed, nothing is left anywhere.
    engine.expire(clock.t + 10 * max(config.idle_timeout, config.hold_time, config.pending_timeout))
    check_table(engine)
    assert len(engine) == 0 and not engine._by_in and not engine._by_client and not engine._visible
    assert not +engine._per_mark and not getattr(engine, "_evicted", None)
    return tuple(sorted(sig, key=repr))


# --------------------------------------------------------------------------- capture files

_CAPTURE_CONFIGS = (EngineConfig(), EngineConfig(secret=SECRET))
_GATEWAYS = (None, GW4, GW6)


def fuzz_capture(data: bytes) -> tuple:
    data = bytes(data)
    sel = len(data) % 6
    gateway, config = _GATEWAYS[sel % 3], _CAPTURE_CONFIGS[sel // 3]
    sig: list = []
    old_strict = capture_io._STRICT
    capture_io._STRICT = True  # a decoder bug must surface here, not become a per-record error
    try:
        try:
            no = 0
            for p in capture_io.read_capture(io.BytesIO(data)):
                no += 1
                assert p.no == no and isinstance(p.ts, float) and isinstance(p.linktype, int), p
                assert (p.ip is None) == (p.error is not None), p
                assert p.ip is None or p.ip[0] >> 4 in (4, 6), p
                assert p.mark is None or 0 <= p.mark <= 0xFFFFFFFF
                assert p.hook is None or 0 <= p.hook <= 255
                if p.error:
                    sig.append(("record", " ".join(p.error.split()[:2])))
        except CaptureError as e:
            assert str(e)
            sig.append("capture-error")
        try:
            result = replay(io.BytesIO(data), gateway=gateway, config=config)
        except (CaptureError, ReplayError) as e:
            assert str(e)
            return tuple(sig) + ("replay-error",)
    finally:
        capture_io._STRICT = old_strict
    s = result.summary
    assert s["l2tp_packets"] == len(result.records)
    for m in s["malformed"]:
        assert not str(m["reason"]).startswith("internal decode error"), m
    for rec in result.records:
        assert rec.get("checksum_ok", True) in (True, None), rec
    list(format_table(result.records))
    list(format_summary(s))
    out = io.StringIO()
    write_json(result, out)
    for line in out.getvalue().splitlines():
        json.loads(line)
    assert all(isinstance(pkt, bytes) for _, pkt in result.rewritten)
    sig.extend(sorted(s["reasons"]))
    sig.extend(sorted(s["other_traffic"]))
    return tuple(sig)


TARGETS = {"decoder": fuzz_decoder, "engine": fuzz_engine, "capture": fuzz_capture}


# --------------------------------------------------------------------------- seeds


def _captures(pcaps_dir: Path) -> list[Path]:
    return sorted(p for p in Path(pcaps_dir).iterdir() if p.suffix in (".pcap", ".pcapng"))


def _packets(path: Path) -> list[capture_io.CapturedPacket]:
    try:
        return list(capture_io.read_capture(path))
    except CaptureError:
        return []


def _engine_program(packets, cfg_byte: int, *, wrap: bool = False) -> bytes:
    prog = bytearray([cfg_byte])
    marks: dict[str, int] = {}
    last_ts = None
    for p in packets:
        if p.ip is None:
            continue
        dg = codec.parse_ip_udp(p.ip)
        if not isinstance(dg, UdpDatagram):
            if not wrap:
                prog += encode_op(IN, 1, 0.0, p.ip)
            continue
        if p.hook is not None:
            direction = IN if p.hook in (capture_io.NF_INET_PRE_ROUTING, capture_io.NF_INET_LOCAL_IN) else OUT
        else:
            direction = IN if dg.dst in (GW4, GW6) else OUT
        if p.mark is not None:
            mark = p.mark
        elif p.hook is not None or direction == OUT:
            mark = 0
        else:
            mark = marks.setdefault(f"{dg.src}:{dg.sport}", len(marks) + 1)
        step = 0.0 if last_ts is None else max(0.0, p.ts - last_ts)
        last_ts = p.ts
        if wrap:
            port = dg.sport if direction == IN else dg.dport
            sel = (PORTS.index(port) if port in PORTS else 0) | (4 if dg.version == 6 else 0)
            prog += encode_op(direction, mark, step, p.ip[dg.payload_offset:dg.payload_end], wrap_sel=sel)
        else:
            prog += encode_op(direction, mark, step, p.ip)
    return bytes(prog)


def seed_inputs(target: str, pcaps_dir: Path = PCAPS) -> list[bytes]:
    """The seed corpus of a target, built from every capture in ``pcaps_dir``."""
    seeds: list[bytes] = []
    files = _captures(pcaps_dir)
    if target == "capture":
        for f in files:
            raw = f.read_bytes()
            seeds.append(raw)
        for f in files[:3]:
            seeds.append(gzip.compress(f.read_bytes(), mtime=0))
    elif target == "decoder":
        for f in files:
            for p in _packets(f):
                if p.ip is None:
                    continue
                seeds.append(p.ip)
                dg = codec.parse_ip_udp(p.ip)
                if isinstance(dg, UdpDatagram) and L2TP_PORT in (dg.sport, dg.dport):
                    seeds.append(p.ip[dg.payload_offset:dg.payload_end])
    elif target == "engine":
        for i, f in enumerate(files):
            pkts = _packets(f)
            if not pkts:
                continue
            seeds.append(_engine_program(pkts, 0x05))              # log, secret
            seeds.append(_engine_program(pkts, 0x02 | (i & 1) << 3, wrap=True))  # drop, no secret
    else:
        raise ValueError(f"unknown target {target!r}")
    out, seen = [], set()
    for s in seeds:
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out
