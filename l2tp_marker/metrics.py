"""Prometheus text exposition of the daemon's counters (rendering is pure; serving is tiny).

Served over HTTP on a configurable local address (``metrics_listen``) from the daemon's own loop, or
written atomically to a node-exporter textfile (``metrics_textfile``).
"""

from __future__ import annotations

import socket
from pathlib import Path

from .control import accept_request
from .engine import Engine
from .fsutil import write_atomic

NFQ_PROC = Path("/proc/net/netfilter/nfnetlink_queue")


def read_queue_stats(path: Path = NFQ_PROC) -> dict[int, dict[str, int]]:
    """Per-queue kernel counters of this network namespace (see :func:`parse_queue_stats`)."""
    try:
        return parse_queue_stats(path.read_text())
    except OSError:
        return {}


def parse_queue_stats(text: str) -> dict[int, dict[str, int]]:
    """``/proc/net/netfilter/nfnetlink_queue`` per queue: waiting, queue_dropped (queue full),
    user_dropped, and ``queued``: packets handed to the queue since it was bound (the last id)."""
    out: dict[int, dict[str, int]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 7 and all(x.isdigit() for x in f[:7]):
            out[int(f[0])] = {"waiting": int(f[2]), "queue_dropped": int(f[5]), "user_dropped": int(f[6]),
                              "queued": int(f[7]) if len(f) > 7 and f[7].isdigit() else 0}
    return out


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(engine: Engine, *, by_dir_reason: dict[tuple[str, str], int], daemon_counters: dict[str, int],
           queues: dict[str, int], queue_stats: dict[int, dict[str, int]], fastpath: dict | None = None) -> str:
    """The exposition text (format 0.0.4)."""
    tunnels = engine.tunnels()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value:g}" if lab else f"{name} {value:g}")

    metric("l2tp_marker_packets_total", "counter", "Packets judged, by direction and decision reason.",
           [({"direction": d, "reason": r}, n) for (d, r), n in sorted(by_dir_reason.items())])
    states: dict[str, int] = {}
    for t in tunnels:
        states[t.state] = states.get(t.state, 0) + 1
    metric("l2tp_marker_tunnels", "gauge", "Tunnels in the table, by state.",
           [({"state": s}, n) for s, n in sorted(states.items())])
    metric("l2tp_marker_sessions", "gauge", "Sessions in the table.",
           [({}, sum(len(t.sessions) for t in tunnels))])
    metric("l2tp_marker_aliases", "gauge", "Tunnels whose client tunnel ID is translated.",
           [({}, sum(1 for t in tunnels if t.alias is not None))])
    metric("l2tp_marker_conflicts_total", "counter",
           "Inbound packets of a tunnel that arrived over another client's SA.",
           [({}, engine.counters.get("sa_conflict", 0))])
    metric("l2tp_marker_table_events_total", "counter", "Table events (releases, evictions, refusals).",
           [({"event": k}, v) for k, v in sorted(engine.counters.items())
            if k.startswith(("released_", "evicted", "table_full", "session_"))])
    metric("l2tp_marker_rule_repairs_total", "counter", "Times the daemon found its rules gone and put them back.",
           [({}, daemon_counters.get("rule_repairs", 0))])
    metric("l2tp_marker_errors_total", "counter", "Packets accepted unchanged after an internal error.",
           [({}, daemon_counters.get("errors", 0))])
    qs = []
    for direction, num in sorted(queues.items()):
        st = queue_stats.get(num, {})
        for kind in ("queue_dropped", "user_dropped"):
            qs.append(({"queue": str(num), "direction": direction, "kind": kind}, st.get(kind, 0)))
    metric("l2tp_marker_queue_drops_total", "counter",
           "Packets the kernel dropped because the NFQUEUE was full (queue_dropped) or could not be "
           "delivered to the daemon (user_dropped).", qs)
    metric("l2tp_marker_queued_packets_total", "counter", "Packets the kernel handed to the daemon's queues.",
           [({"queue": str(num), "direction": d}, queue_stats.get(num, {}).get("queued", 0))
            for d, num in sorted(queues.items())])
    if fastpath is not None:
        metric("l2tp_marker_fastpath_info", "gauge",
               "The fast path in use: kernel (nftables map), fallback (kernel path unavailable) or off.",
               [({"mode": fastpath.get("mode", "off"), "reason": fastpath.get("reason", "")}, 1)])
        metric("l2tp_marker_fastpath_entries", "gauge", "Entries in the kernel fast path, by direction.",
               [({"direction": "out"}, fastpath.get("out_entries", 0)),
                ({"direction": "in"}, fastpath.get("in_entries", 0))])
        metric("l2tp_marker_fastpath_packets_total", "counter",
               "Data packets of known tunnels handled without the full decode: by the kernel map "
               "(path=kernel, never queued) or by the daemon's userspace copy of it (path=userspace).",
               [({"path": "kernel", "direction": "out"}, fastpath.get("packets_out", 0)),
                ({"path": "kernel", "direction": "in"}, fastpath.get("packets_in", 0)),
                ({"path": "userspace", "direction": "out"}, fastpath.get("userspace_packets_out", 0)),
                ({"path": "userspace", "direction": "in"}, fastpath.get("userspace_packets_in", 0))])
        metric("l2tp_marker_fastpath_errors_total", "counter", "Fast-path elements the kernel refused.",
               [({}, fastpath.get("errors", 0))])
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port), with a clear error."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics_listen {value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class MetricsServer:
    """A minimal HTTP/1.0 server for GET /metrics, polled from the daemon's selector loop."""

    def __init__(self, listen: str, render_fn):
        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.render_fn = render_fn

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def serve_one(self) -> None:
        got = accept_request(self.sock, lambda b: b"\r\n\r\n" in b or b"\n\n" in b, 8192)
        if got is None:
            return
        conn, req = got
        with conn:
            first = req.split(b"\n", 1)[0].split()
            if len(first) >= 2 and first[0] == b"GET" and first[1].split(b"?")[0] in (b"/metrics", b"/"):
                body = self.render_fn().encode()
                head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            else:
                body = b"not found\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Length: 10\r\n\r\n"
            try:
                conn.sendall(head + body)
            except OSError:
                pass  # the scraper went away

    def close(self) -> None:
        self.sock.close()
