#!/usr/bin/env python3
"""Stand-in for ``/usr/sbin/pppd`` in the namespace lab (stdlib only, runs as a plain script).

The lab's kernel has no PPP, so real pppd cannot run.  xl2tpd 1.3.18 (``start_pppd`` in
``xl2tpd.c``, userspace mode) allocates a pty, forks, ``dup2``s the pty slave onto fds 0 and 1
(fd 2 stays xl2tpd's stderr), keeps its environment, and ``execv``s ``/usr/sbin/pppd`` with the
tty path as ``argv[1]`` followed by the options from its config (``passive``, ``nodetach``,
``local:remote``, ``file ...``).  This program is bind-mounted over ``/usr/sbin/pppd`` in a private
mount namespace (see :mod:`l2tp_marker.lab.mountexec`) and ignores the options.

It speaks async-HDLC PPP on stdin/stdout (RFC 1662: 0x7e flags, 0x7d escaping, FCS-16):

* every ``L2TP_LAB_ECHO_INTERVAL`` seconds (default 1) it sends an LCP Echo-Request whose data
  (after the 4-byte magic number) is its token;
* it answers every Echo-Request with an Echo-Reply carrying the same identifier and data, and
  every Configure-Request with a Configure-Ack (so a peer that negotiates is not stuck);
* an Echo-Reply whose data is one of the payloads it sent counts as ``replies_ok``, any other
  reply as ``replies_foreign`` (a reply meant for someone else: a misdelivery).

Environment:

``L2TP_LAB_TOKEN``           token (default ``lns``); clients use names such as ``lac-2``.
``L2TP_LAB_DIR``             where ``pppd-<pid>.json`` is written (default: the current directory).
``L2TP_LAB_ECHO_INTERVAL``   seconds between Echo-Requests (default 1).
``L2TP_LAB_ECHO_JITTER``     each gap is ``interval * uniform(1-j, 1+j)`` (default 0.3), so the two
                             ends of several sessions do not fall into lock-step (in lock-step the
                             last packet in always comes from the right client and the lab could
                             not show the connmark problem).
``L2TP_LAB_ECHO_PEER``       if ``1``: send ``<token>/<peer data>``, the peer data being that of
                             the first Echo-Request received, and hold the own requests until that
                             arrives (at most three intervals) -- the LNS side uses this so that
                             every request it sends names the client it is meant for.

The JSON status (written atomically: temp file + rename) has ``token``, ``peer_token``,
``echo_sent``, ``replies_ok``, ``replies_foreign``, ``requests_answered``, ``started``,
``last_rx``, ``pid``, ``exited`` and a few more counters.  Exits on SIGTERM, SIGHUP, SIGINT
or end of file on the tty.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import signal
import struct
import sys
import time

from l2tp_marker.fsutil import write_atomic
from l2tp_marker.lab.topology import proc_starttime

PPP_FLAG = 0x7E
PPP_ESCAPE = 0x7D
PPP_TRANS = 0x20
PROTO_LCP = 0xC021
LCP_CONF_REQ, LCP_CONF_ACK = 1, 2
LCP_TERM_REQ, LCP_TERM_ACK = 5, 6
LCP_ECHO_REQ, LCP_ECHO_REPLY = 9, 10
FCS_INIT = 0xFFFF
FCS_GOOD = 0xF0B8
STATUS_MIN_INTERVAL = 0.2
MAX_FOREIGN_SAMPLES = 8


def _make_fcs_table() -> tuple[int, ...]:
    table = []
    for b in range(256):
        v = b
        for _ in range(8):
            v = (v >> 1) ^ 0x8408 if v & 1 else v >> 1
        table.append(v & 0xFFFF)
    return tuple(table)


FCS_TABLE = _make_fcs_table()


def fcs16(data: bytes, fcs: int = FCS_INIT) -> int:
    """RFC 1662 section C.2 FCS-16 over ``data`` (not complemented)."""
    for b in data:
        fcs = (fcs >> 8) ^ FCS_TABLE[(fcs ^ b) & 0xFF]
    return fcs


def hdlc_encode(frame: bytes) -> bytes:
    """Frame ``frame`` (address/control/protocol/info) for an async link: FCS, escaping, flags.

    Escapes 0x7e, 0x7d and every byte below 0x20 (the default ACCM, which LCP always uses).
    """
    fcs = fcs16(frame) ^ 0xFFFF
    raw = frame + struct.pack("<H", fcs)
    out = bytearray([PPP_FLAG])
    for b in raw:
        if b < 0x20 or b in (PPP_FLAG, PPP_ESCAPE):
            out.append(PPP_ESCAPE)
            out.append(b ^ PPP_TRANS)
        else:
            out.append(b)
    out.append(PPP_FLAG)
    return bytes(out)


class HdlcDecoder:
    """Incremental async-HDLC deframer: ``feed(bytes)`` returns ``[(frame, fcs_ok), ...]``.

    The returned frame has the FCS removed; ``fcs_ok`` tells whether it checked.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._escape = False

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        frames: list[tuple[bytes, bool]] = []
        for b in data:
            if b == PPP_FLAG:
                if self._escape:  # aborted frame (RFC 1662 section 4.4.1)
                    self._buf.clear()
                    self._escape = False
                    continue
                if len(self._buf) >= 4:
                    raw = bytes(self._buf)
                    frames.append((raw[:-2], fcs16(raw) == FCS_GOOD))
                self._buf.clear()
            elif b == PPP_ESCAPE:
                self._escape = True
            else:
                if self._escape:
                    b ^= PPP_TRANS
                    self._escape = False
                self._buf.append(b)
        return frames


def ppp_split(frame: bytes) -> tuple[int, bytes] | None:
    """Return ``(protocol, information)`` of a PPP frame, accepting ACFC and PFC; None if short."""
    if frame[:2] == b"\xff\x03":
        frame = frame[2:]
    if not frame:
        return None
    if frame[0] & 1:  # protocol field compressed to one byte
        return frame[0], frame[1:]
    if len(frame) < 2:
        return None
    return (frame[0] << 8) | frame[1], frame[2:]


def lcp_parse(info: bytes) -> tuple[int, int, bytes] | None:
    """Return ``(code, identifier, data)`` of an LCP packet (data cut to the LCP length)."""
    if len(info) < 4:
        return None
    code, ident, length = struct.unpack("!BBH", info[:4])
    if length < 4 or length > len(info):
        return None
    return code, ident, info[4:length]


def lcp_frame(code: int, ident: int, data: bytes) -> bytes:
    """Unframed PPP frame (with address/control) carrying one LCP packet."""
    return b"\xff\x03" + struct.pack("!HBBH", PROTO_LCP, code, ident, 4 + len(data)) + data


def echo_token(lcp_data: bytes) -> bytes:
    """The data of an Echo-Request/Reply after its 4-byte magic number."""
    return lcp_data[4:]


class StandIn:
    """The stand-in's state machine; ``run()`` drives it on two file descriptors."""

    def __init__(self, token: str, status_dir: str, echo_interval: float, echo_peer: bool,
                 rfd: int = 0, wfd: int = 1, argv: list[str] | None = None,
                 jitter: float = 0.3) -> None:
        self.token = token
        self.status_dir = status_dir
        self.echo_interval = max(0.05, echo_interval)
        self.jitter = min(max(jitter, 0.0), 0.9)
        self.echo_peer = echo_peer
        self.rfd, self.wfd = rfd, wfd
        self.argv = list(argv or [])
        self.peer_token: str | None = None
        self.sent_payloads: set[bytes] = {token.encode()}
        self.echo_id = 0
        self.counters = {
            "echo_sent": 0, "replies_ok": 0, "replies_foreign": 0, "requests_answered": 0,
            "frames_rx": 0, "frames_tx": 0, "fcs_errors": 0, "lcp_other": 0, "non_lcp": 0,
            "conf_acked": 0,
        }
        self.foreign_samples: list[str] = []
        self.peer_tokens: list[str] = []
        self.started = time.time()
        self.last_rx: float | None = None
        self.exit_reason = ""
        self.stop = False
        self._last_status = 0.0
        self._dirty = True
        self.status_path = os.path.join(status_dir, f"pppd-{os.getpid()}.json")

    # -- output -----------------------------------------------------------------------------
    def _send(self, code: int, ident: int, data: bytes) -> None:
        wire = hdlc_encode(lcp_frame(code, ident, data))
        view = memoryview(wire)
        while view:
            try:
                n = os.write(self.wfd, view)
            except InterruptedError:
                continue
            view = view[n:]
        self.counters["frames_tx"] += 1
        self._dirty = True

    def request_payload(self) -> bytes:
        if self.echo_peer and self.peer_token:
            return f"{self.token}/{self.peer_token}".encode()
        return self.token.encode()

    def send_echo_request(self) -> None:
        self.echo_id = (self.echo_id + 1) & 0xFF
        payload = self.request_payload()
        self.sent_payloads.add(payload)
        self._send(LCP_ECHO_REQ, self.echo_id, b"\x00\x00\x00\x00" + payload)
        self.counters["echo_sent"] += 1

    # -- input ------------------------------------------------------------------------------
    def handle_frame(self, frame: bytes, fcs_ok: bool) -> None:
        self.counters["frames_rx"] += 1
        self.last_rx = time.time()
        self._dirty = True
        if not fcs_ok:
            self.counters["fcs_errors"] += 1
            return
        split = ppp_split(frame)
        if split is None or split[0] != PROTO_LCP:
            self.counters["non_lcp"] += 1
            return
        lcp = lcp_parse(split[1])
        if lcp is None:
            self.counters["lcp_other"] += 1
            return
        code, ident, data = lcp
        if code == LCP_ECHO_REQ:
            tok = echo_token(data)
            text = tok.decode("ascii", "replace")
            if text and text not in self.peer_tokens and len(self.peer_tokens) < MAX_FOREIGN_SAMPLES:
                self.peer_tokens.append(text)
            if self.peer_token is None and text:
                self.peer_token = text
            self._send(LCP_ECHO_REPLY, ident, b"\x00\x00\x00\x00" + tok)
            self.counters["requests_answered"] += 1
        elif code == LCP_ECHO_REPLY:
            tok = echo_token(data)
            if tok in self.sent_payloads:
                self.counters["replies_ok"] += 1
            else:
                self.counters["replies_foreign"] += 1
                text = tok.decode("ascii", "replace")
                if text not in self.foreign_samples and len(self.foreign_samples) < MAX_FOREIGN_SAMPLES:
                    self.foreign_samples.append(text)
        elif code == LCP_CONF_REQ:
            self._send(LCP_CONF_ACK, ident, data)
            self.counters["conf_acked"] += 1
        elif code == LCP_TERM_REQ:
            self._send(LCP_TERM_ACK, ident, b"")
            self.counters["lcp_other"] += 1
        else:
            self.counters["lcp_other"] += 1

    # -- status -----------------------------------------------------------------------------
    def status(self, exited: bool = False) -> dict:
        return {
            "pid": os.getpid(),
            "starttime": proc_starttime(os.getpid()),
            "token": self.token,
            "peer_token": self.peer_token,
            "peer_tokens": self.peer_tokens,
            **self.counters,
            "foreign_samples": self.foreign_samples,
            "started": self.started,
            "last_rx": self.last_rx,
            "updated": time.time(),
            "exited": exited,
            "exit_reason": self.exit_reason,
            "argv": self.argv,
        }

    def write_status(self, exited: bool = False, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._dirty or now - self._last_status < STATUS_MIN_INTERVAL):
            return
        try:
            write_atomic(self.status_path, json.dumps(self.status(exited)))
        except OSError as exc:
            print(f"pppd-standin: cannot write {self.status_path}: {exc}", file=sys.stderr)
        self._last_status = now
        self._dirty = False

    # -- main loop --------------------------------------------------------------------------
    def _holding(self) -> bool:
        """Wait for the peer's token before the first own request (echo_peer mode)."""
        return (self.echo_peer and self.peer_token is None
                and time.time() - self.started < 3 * self.echo_interval)

    def next_gap(self) -> float:
        return self.echo_interval * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def run(self) -> int:
        decoder = HdlcDecoder()
        self.write_status(force=True)
        next_echo = time.monotonic() + random.uniform(0.05, min(0.5, self.echo_interval))
        while not self.stop:
            wait = 0.05 if self._holding() else next_echo - time.monotonic()
            timeout = max(0.0, min(wait, STATUS_MIN_INTERVAL))
            try:
                ready, _, _ = select.select([self.rfd], [], [], timeout)
            except InterruptedError:
                continue
            if ready:
                try:
                    data = os.read(self.rfd, 4096)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EAGAIN:
                        continue
                    self.exit_reason = f"read error: {exc.strerror}"  # EIO: pty master closed
                    break
                if not data:
                    self.exit_reason = "eof"
                    break
                for frame, ok in decoder.feed(data):
                    self.handle_frame(frame, ok)
            if self.stop:
                break
            if time.monotonic() >= next_echo and not self._holding():
                try:
                    self.send_echo_request()
                except OSError as exc:
                    self.exit_reason = f"write error: {exc.strerror}"
                    break
                next_echo = time.monotonic() + self.next_gap()
            self.write_status()
        self.write_status(exited=True, force=True)
        return 0


def _set_raw(fd: int) -> None:
    """Put the tty in raw mode, as pppd does before it talks PPP (no-op if fd is no tty)."""
    try:
        import termios
        import tty
        if os.isatty(fd):
            tty.setraw(fd, termios.TCSANOW)
    except (ImportError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    token = os.environ.get("L2TP_LAB_TOKEN") or "lns"
    status_dir = os.environ.get("L2TP_LAB_DIR") or os.getcwd()
    try:
        interval = float(os.environ.get("L2TP_LAB_ECHO_INTERVAL", "1"))
    except ValueError:
        interval = 1.0
    try:
        jitter = float(os.environ.get("L2TP_LAB_ECHO_JITTER", "0.3"))
    except ValueError:
        jitter = 0.3
    echo_peer = os.environ.get("L2TP_LAB_ECHO_PEER", "0") == "1"
    standin = StandIn(token, status_dir, interval, echo_peer, argv=argv, jitter=jitter)

    def on_signal(signum: int, _frame: object) -> None:
        standin.stop = True
        standin.exit_reason = f"signal {signal.Signals(signum).name}"

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    _set_raw(0)
    return standin.run()


if __name__ == "__main__":
    sys.exit(main())
