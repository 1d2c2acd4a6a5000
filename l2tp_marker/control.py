"""The daemon's local control socket: one JSON request line in, one JSON reply line out.

The socket is a Unix stream socket created mode 0600 in a root-owned folder, so only root can ask.
Requests: ``{"cmd": "status"}``. The reply of ``status`` is built by :func:`status_snapshot` (pure),
and the client side (:func:`ask`) turns a missing daemon into a clear :class:`ControlError`.
"""

from __future__ import annotations

import heapq
import json
import os
import socket
import stat
from pathlib import Path

from .engine import Engine

DEFAULT_SOCKET = Path("/run/l2tp-marker/control.sock")
MAX_REQUEST = 4096


class ControlError(Exception):
    """No daemon answers, or it answered something unusable."""


def status_snapshot(engine: Engine, *, stats: dict, extra: dict | None = None, limit: int | None = None) -> dict:
    """Everything ``l2tp-marker status`` shows, as JSON-ready data (no I/O). ``limit``: list at most
    that many tunnels (the first by peer and ID); ``tunnels_total`` always counts them all."""
    now = engine.now()
    tunnels = []
    order = lambda t: (t.peer.addr, t.peer.port, t.visible_tid)  # noqa: E731
    chosen = (sorted(engine.tunnels(), key=order) if limit is None or len(engine) <= limit
              else heapq.nsmallest(max(0, limit), engine.tunnels(), key=order))
    for t in chosen:
        tunnels.append({
            "peer": str(t.peer), "client_tid": t.client_tid, "alias": t.alias, "gateway_tid": t.our_tid,
            "mark": t.mark, "state": t.state, "age": round(now - t.created, 3),
            "last_seen": round(now - t.last_seen, 3), "packets_in": t.packets_in,
            "packets_out": t.packets_out, "conflicts": t.conflicts,
            "sessions": [{"client_sid": s.client_sid, "gateway_sid": s.our_sid,
                          "state": "closing" if s.closing_since is not None else "up",
                          "last_seen": round(now - s.last_seen, 3)}
                         for s in sorted(t.sessions.values(), key=lambda s: s.client_sid)],
        })
    conflicts = [{"ago": round(now - c.at, 3), "peer": str(c.peer), "gateway_tid": c.our_tid,
                  "bound_mark": c.bound_mark, "seen_mark": c.seen_mark, "kind": c.kind}
                 for c in engine.conflicts]
    return {
        "tunnels": tunnels,
        "tunnels_total": len(engine),
        "counters": dict(sorted((k, v) for k, v in engine.counters.items() if v)),
        "packets": dict(sorted(stats.items())),
        "conflicts": conflicts,
        **(extra or {}),
    }


class ControlServer:
    """Listening side, driven by the daemon's selector loop (non-blocking, tiny requests)."""

    def __init__(self, path: Path, handler):
        self.path = path
        self.handler = handler
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_one(self) -> None:
        got = accept_request(self.sock, lambda b: b"\n" in b, MAX_REQUEST)
        if got is None:
            return
        conn, buf = got
        with conn:
            try:
                req = json.loads(buf.split(b"\n", 1)[0] or b"{}")
                reply = self.handler(req) if isinstance(req, dict) else {"error": "request must be an object"}
            except ValueError:
                reply = {"error": "request is not JSON"}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass  # the client went away; nothing to answer

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def accept_request(sock: socket.socket, complete, limit: int) -> tuple[socket.socket, bytes] | None:
    """Accept one connection on a non-blocking listener and read its (small) request.

    Reads until ``complete(data)`` or ``limit`` bytes or EOF, waiting at most a second. Returns the
    connection (the caller answers and closes it) and the bytes, or None if nobody was waiting or
    the client went away.
    """
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return None
    conn.settimeout(1.0)
    buf = b""
    try:
        while not complete(buf) and len(buf) < limit:
            chunk = conn.recv(limit)
            if not chunk:
                break
            buf += chunk
    except OSError:
        conn.close()
        return None
    return conn, buf


def ask(path: Path, request: dict, timeout: float = 5.0) -> dict:
    """Send one request to the daemon and return its reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no l2tp-marker daemon is running (nothing listens on {path})") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root") from None
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        raise ControlError(f"the daemon did not answer on {path} within {timeout:g} s") from None
    finally:
        s.close()
    try:
        return json.loads(buf)
    except ValueError:
        raise ControlError(f"unusable answer from the daemon on {path}") from None
