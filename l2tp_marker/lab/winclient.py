"""A Windows-like L2TPv2 LAC (RFC 2661) for the test lab.

Windows' built-in L2TP/IPsec client behaves in ways the product has to cope with:
it sends from udp/1701 to udp/1701, numbers its tunnels (and sessions) from 1 after boot,
so two PCs behind one NAT both offer tunnel ID 1, sends HELLOs and keeps PPP alive with LCP
Echo over L2TP data packets. This module reproduces that behaviour.

Layout ("pure core, thin edges"):

* :class:`WinClient` holds the whole protocol: control connection set-up
  (SCCRQ/SCCRP/SCCCN, ICRQ/ICRP/ICCN), reliable delivery (RFC 2661 section 5.8: Ns/Nr, ZLB acks,
  retransmission with exponential backoff, duplicate detection), HELLO, LCP Echo over data
  packets, teardown (CDN, StopCCN). It does no I/O: it takes received datagrams and a clock value
  ``now`` and returns the datagrams to send; :meth:`WinClient.next_deadline` says when to call
  :meth:`WinClient.tick` next.
* :func:`run` is the socket loop around it, and :func:`main` the command line::

      python -m l2tp_marker.lab.winclient --server 198.51.100.1 --tunnel-id 1 --session-id 1 \\
          --token win-1 --status-file /tmp/win-1.json [--hello-interval 60] [--echo-interval 1] \\
          [--duration SECONDS] [--local-port 1701] [--hostname NAME] [--setup-timeout 30] [-v|-vv]

  Run it inside a network namespace: it binds 0.0.0.0:1701 like Windows does.

The status file is JSON, rewritten atomically (temp file + rename) at least every second and on
every state change.  Keys: ``pid``, ``token``, ``state`` (idle, wait-sccrp, wait-icrp,
established, failed, closed), ``tunnel_id`` / ``session_id`` (ours), ``peer_tunnel_id`` /
``peer_session_id`` (the server's, null until learnt), ``echo_sent``, ``echo_replies_ok`` (Echo-
Reply data == our token), ``echo_replies_foreign`` (any other data: a reply meant for someone
else), ``echo_requests_answered``, ``foreign_tunnel`` (packets whose header tunnel ID is not ours),
``foreign_session``, ``retransmissions``, ``hellos_sent``, ``control_rx`` / ``control_tx``,
``duplicates``, ``data_rx`` / ``data_tx``, ``malformed``, ``lcp_acked``, ``error`` (text or null),
``since`` (epoch seconds of the last state change), ``server``, ``ignored_sources``, ``updated``.

Exit codes: 0 after a teardown (SIGTERM/SIGINT, ``--duration``, StopCCN or CDN from the server),
1 when the control connection failed (no ack after 5 retransmissions, or no SCCRP/ICRP within
``--setup-timeout``), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from l2tp_marker import constants as C
from l2tp_marker import layers as L
from l2tp_marker.fsutil import write_atomic

log = logging.getLogger(__name__)

# Client states as written to the status file.
IDLE = "idle"
WAIT_SCCRP = "wait-sccrp"
WAIT_ICRP = "wait-icrp"
ESTABLISHED = "established"
FAILED = "failed"
CLOSED = "closed"

# PPP / LCP numbers (RFC 1661).
PPP_ADDRESS_CONTROL = b"\xff\x03"
PPP_LCP = 0xC021
LCP_CONF_REQ, LCP_CONF_ACK, LCP_CONF_NAK, LCP_CONF_REJ = 1, 2, 3, 4
LCP_TERM_REQ, LCP_TERM_ACK = 5, 6
LCP_ECHO_REQ, LCP_ECHO_REPLY = 9, 10

# Result codes (RFC 2661 section 4.4.2).
STOPCCN_GENERAL_REQUEST = 1  # "General request to clear control connection"
CDN_ADMIN = 3  # "Session disconnected for administrative reasons"

# Values a Windows client puts in its control messages.
WINDOWS_VENDOR = "Microsoft"
WINDOWS_FIRMWARE = 0x0600
FRAMING_SYNC = 1
CONNECT_SPEED = 100_000_000


def seq_before(a: int, b: int) -> bool:
    """True if sequence number ``a`` comes before ``b`` in 16-bit serial arithmetic."""
    return 0 < ((b - a) & 0xFFFF) < 0x8000


@dataclass(frozen=True)
class ClientConfig:
    """Everything that shapes the client's behaviour; times are seconds."""

    tunnel_id: int = 1
    session_id: int = 1
    token: str = "win-1"
    hostname: str = "WIN-CLIENT"
    hello_interval: float = 60.0
    echo_interval: float = 1.0
    receive_window: int = 8
    call_serial: int | None = None  # None: same as session_id
    initial_rto: float = 1.0
    max_rto: float = 16.0
    max_retries: int = 5
    close_timeout: float = 2.0  # how long a teardown waits for the StopCCN's ack
    # Give up ("failed") when the session is not up this long after start.  Needed because a
    # server may ack an SCCRQ with a ZLB and never answer it (xl2tpd does that to a second SCCRQ
    # with the same peer address and tunnel ID), so retransmission alone never ends the wait.
    setup_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("tunnel_id", "session_id"):
            value = getattr(self, name)
            if not 1 <= value <= 0xFFFF:
                raise ValueError(f"{name} must be 1..65535, got {value}")
        if min(self.hello_interval, self.echo_interval, self.setup_timeout) <= 0:
            raise ValueError("intervals must be positive")


@dataclass
class _Outgoing:
    """A control message in the send queue; its bytes are built at (re)transmission time."""

    msg_type: int
    avps: list[Any]
    tunnel_id: int
    session_id: int
    ns: int
    sent_at: float | None = None


@dataclass
class Counters:
    echo_sent: int = 0
    echo_replies_ok: int = 0
    echo_replies_foreign: int = 0
    echo_requests_answered: int = 0
    foreign_tunnel: int = 0
    foreign_session: int = 0
    retransmissions: int = 0
    hellos_sent: int = 0
    control_rx: int = 0
    control_tx: int = 0
    duplicates: int = 0
    data_rx: int = 0
    data_tx: int = 0
    malformed: int = 0


@dataclass
class WinClient:
    """The protocol engine: no sockets, no clock of its own.

    Every method that can produce traffic returns a list of UDP payloads (bytes) to send to the
    server's port 1701, in order. Call :meth:`start` once, then :meth:`receive` for each datagram
    from the server and :meth:`tick` whenever ``now`` reaches :meth:`next_deadline`.
    """

    config: ClientConfig
    state: str = IDLE
    since: float = 0.0
    error: str | None = None
    peer_tunnel_id: int | None = None
    peer_session_id: int | None = None
    peer_window: int = 1  # until SCCRP says otherwise only SCCRQ is in flight anyway
    counters: Counters = field(default_factory=Counters)
    finished: bool = False  # nothing more to do: the loop may exit
    # Reliable delivery state (RFC 2661 section 5.8).
    _ns: int = 0  # Ns of the next message we send
    _nr: int = 0  # Ns we expect next from the peer
    _unacked: list[_Outgoing] = field(default_factory=list)
    _waiting: list[_Outgoing] = field(default_factory=list)  # beyond the peer's window
    _retries: int = 0
    _rto: float = 1.0
    _retransmit_at: float | None = None
    # Periodic traffic.
    _hello_at: float | None = None
    _echo_at: float | None = None
    _echo_id: int = 0
    _lcp_id: int = 0
    _lcp_acked: bool = False
    _close_at: float | None = None  # end of a teardown we started
    _setup_at: float | None = None  # end of the set-up allowance

    def __post_init__(self) -> None:
        self._rto = self.config.initial_rto

    # ------------------------------------------------------------------ public API

    @property
    def token(self) -> bytes:
        return self.config.token.encode()

    def start(self, now: float) -> list[bytes]:
        """Open the control connection: send SCCRQ (header tunnel 0, Ns 0)."""
        if self.state != IDLE:
            raise RuntimeError(f"start() in state {self.state}")
        cfg = self.config
        self._set_state(WAIT_SCCRP, now)
        self._setup_at = now + cfg.setup_timeout
        avps = [
            L.AVPMessageType(msg_type=C.SCCRQ),
            L.AVPProtocolVersion(version=1, revision=0),
            L.AVPFramingCapabilities(framing=FRAMING_SYNC),
            L.AVPBearerCapabilities(bearer=0),
            L.AVPFirmwareRevision(firmware=WINDOWS_FIRMWARE),
            L.AVPHostName(hostname=cfg.hostname.encode()),
            L.AVPVendorName(vendor_name=WINDOWS_VENDOR.encode()),
            L.AVPAssignedTunnelID(tunnel_id=cfg.tunnel_id),
            L.AVPReceiveWindowSize(window=cfg.receive_window),
        ]
        return self._queue(C.SCCRQ, avps, tunnel_id=0, session_id=0, now=now)

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Handle one UDP payload from the server."""
        try:
            pkt = L.L2TPv2(data)
        except Exception:  # noqa: BLE001 - a malformed packet must never stop the client
            log.debug("undecodable packet (%d bytes)", len(data))
            self.counters.malformed += 1
            return []
        if pkt.ver != 2:
            self.counters.malformed += 1
            return []
        if pkt.tunnel_id != self.config.tunnel_id:
            self.counters.foreign_tunnel += 1
            log.debug("packet for tunnel %d, ours is %d", pkt.tunnel_id, self.config.tunnel_id)
            return []
        if pkt.t:
            return self._receive_control(pkt, now)
        return self._receive_data(pkt, now)

    def tick(self, now: float) -> list[bytes]:
        """Fire every timer that is due at ``now``."""
        out: list[bytes] = []
        if self._retransmit_at is not None and now >= self._retransmit_at:
            out += self._on_retransmit_timer(now)
        if self._close_at is not None and now >= self._close_at:
            self.finished = True
            self._close_at = None
        if self.finished:
            return out
        if self._setup_at is not None and now >= self._setup_at:
            self._setup_at = None
            if self.state in (WAIT_SCCRP, WAIT_ICRP):
                waited = "SCCRP" if self.state == WAIT_SCCRP else "ICRP"
                error = f"no {waited} within {self.config.setup_timeout:g} s"
                if not self._unacked:
                    error += " (request acknowledged, never answered)"
                out += self._fail_and_stop(error, now)
                return out
        if self._hello_at is not None and now >= self._hello_at:
            out += self._queue(C.HELLO, [L.AVPMessageType(msg_type=C.HELLO)],
                               tunnel_id=self.peer_tunnel_id, session_id=0, now=now)
            self.counters.hellos_sent += 1
            self._hello_at = now + self.config.hello_interval
        if self._echo_at is not None and now >= self._echo_at:
            out.append(self._echo_request())
            self._echo_at = now + self.config.echo_interval
        return out

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has work to do, or None."""
        if self.finished:
            return None
        times = [t for t in (self._retransmit_at, self._hello_at, self._echo_at, self._close_at,
                             self._setup_at) if t is not None]
        return min(times) if times else None

    def close(self, now: float) -> list[bytes]:
        """Tear down like Windows does on disconnect: CDN, then StopCCN (best effort).

        The state becomes "closed" at once; :attr:`finished` turns true when the StopCCN is acked
        or ``close_timeout`` seconds have passed.
        """
        if self.finished:
            return []
        if self.state in (CLOSED, FAILED):
            if self._close_at is None:  # no teardown of ours in progress
                self.finished = True
            return []
        out: list[bytes] = []
        self._stop_periodic()
        if self.state == ESTABLISHED:
            out += self._queue(
                C.CDN,
                [L.AVPMessageType(msg_type=C.CDN),
                 L.AVPResultCode(result_code=CDN_ADMIN, error_code=0, error_message=b""),
                 L.AVPAssignedSessionID(session_id=self.config.session_id)],
                tunnel_id=self.peer_tunnel_id, session_id=self.peer_session_id or 0, now=now)
        if self.peer_tunnel_id is not None:
            out += self._send_stopccn(now)
            self._close_at = now + self.config.close_timeout
        else:
            # Nothing to tear down: the server never answered our SCCRQ.
            self._unacked.clear()
            self._waiting.clear()
            self._retransmit_at = None
            self.finished = True
        self._set_state(CLOSED, now)
        return out

    def status(self) -> dict[str, Any]:
        """The status file's content, minus ``pid`` (the loop adds it)."""
        c = self.counters
        return {
            "token": self.config.token,
            "state": self.state,
            "tunnel_id": self.config.tunnel_id,
            "session_id": self.config.session_id,
            "peer_tunnel_id": self.peer_tunnel_id,
            "peer_session_id": self.peer_session_id,
            "echo_sent": c.echo_sent,
            "echo_replies_ok": c.echo_replies_ok,
            "echo_replies_foreign": c.echo_replies_foreign,
            "echo_requests_answered": c.echo_requests_answered,
            "foreign_tunnel": c.foreign_tunnel,
            "foreign_session": c.foreign_session,
            "retransmissions": c.retransmissions,
            "hellos_sent": c.hellos_sent,
            "control_rx": c.control_rx,
            "control_tx": c.control_tx,
            "duplicates": c.duplicates,
            "data_rx": c.data_rx,
            "data_tx": c.data_tx,
            "malformed": c.malformed,
            "lcp_acked": self._lcp_acked,
            "error": self.error,
            "since": self.since,
        }

    # ------------------------------------------------------------------ control channel

    def _receive_control(self, pkt: Any, now: float) -> list[bytes]:
        self.counters.control_rx += 1
        if not pkt.s:
            self.counters.malformed += 1
            return []
        out = self._process_nr(pkt.nr, now)
        msg_type = pkt.msg_type
        if msg_type is None:  # ZLB: an ack only
            return out
        if pkt.ns != self._nr:
            if seq_before(pkt.ns, self._nr):
                # Duplicate (our ack got lost): ack again, do not process it twice.
                self.counters.duplicates += 1
                log.debug("duplicate %s Ns=%d (expecting %d)", C.message_name(msg_type),
                          pkt.ns, self._nr)
                return out + [self._zlb()]
            # Out of order (a gap): drop it, the peer will retransmit.
            log.debug("out-of-order %s Ns=%d (expecting %d)", C.message_name(msg_type),
                      pkt.ns, self._nr)
            return out
        self._nr = (self._nr + 1) & 0xFFFF
        sent_before = self.counters.control_tx
        out += self._dispatch(msg_type, pkt, now)
        if self.counters.control_tx == sent_before:
            # Nothing carried our Nr back to the peer: acknowledge with a ZLB.
            out.append(self._zlb())
        return out

    def _dispatch(self, msg_type: int, pkt: Any, now: float) -> list[bytes]:
        log.debug("received %s in state %s", C.message_name(msg_type), self.state)
        if msg_type == C.SCCRP:
            return self._on_sccrp(pkt, now)
        if msg_type == C.ICRP:
            return self._on_icrp(pkt, now)
        if msg_type == C.STOPCCN:
            return self._on_stopccn(pkt, now)
        if msg_type == C.CDN:
            return self._on_cdn(pkt, now)
        # HELLO and anything else just needs the ack the caller sends.
        return []

    def _on_sccrp(self, pkt: Any, now: float) -> list[bytes]:
        if self.state != WAIT_SCCRP:
            return []
        peer_tunnel = _avp_value(pkt, C.AVP_ASSIGNED_TUNNEL_ID)
        if not peer_tunnel:
            return self._fail_and_stop("SCCRP without Assigned Tunnel ID", now)
        self.peer_tunnel_id = peer_tunnel
        window = _avp_value(pkt, 10)
        self.peer_window = window if window else 4  # RFC 2661 4.4.3: default 4
        out = self._queue(C.SCCCN, [L.AVPMessageType(msg_type=C.SCCCN)],
                          tunnel_id=self.peer_tunnel_id, session_id=0, now=now)
        self._set_state(WAIT_ICRP, now)
        self._hello_at = now + self.config.hello_interval
        out += self._queue(
            C.ICRQ,
            [L.AVPMessageType(msg_type=C.ICRQ),
             L.AVPAssignedSessionID(session_id=self.config.session_id),
             L.AVPCallSerialNumber(serial=self.config.call_serial or self.config.session_id)],
            tunnel_id=self.peer_tunnel_id, session_id=0, now=now)
        return out

    def _on_icrp(self, pkt: Any, now: float) -> list[bytes]:
        if self.state != WAIT_ICRP or pkt.session_id != self.config.session_id:
            return []
        peer_session = _avp_value(pkt, C.AVP_ASSIGNED_SESSION_ID)
        if not peer_session:
            return self._fail_and_stop("ICRP without Assigned Session ID", now)
        self.peer_session_id = peer_session
        out = self._queue(
            C.ICCN,
            [L.AVPMessageType(msg_type=C.ICCN),
             L.AVPTxConnectSpeed(speed=CONNECT_SPEED),
             L.AVPFramingType(framing=FRAMING_SYNC)],
            tunnel_id=self.peer_tunnel_id, session_id=self.peer_session_id, now=now)
        self._set_state(ESTABLISHED, now)
        self._setup_at = None
        # PPP starts: configure LCP (no options) and keep it alive with echoes.
        out.append(self._lcp(LCP_CONF_REQ, self._next_lcp_id(), b""))
        self._echo_at = now + self.config.echo_interval
        return out

    def _on_stopccn(self, pkt: Any, now: float) -> list[bytes]:
        result = _result_text(pkt)
        log.info("server sent StopCCN (%s)", result)
        if self.peer_tunnel_id is None:  # refused during set-up: address the ack properly
            self.peer_tunnel_id = _avp_value(pkt, C.AVP_ASSIGNED_TUNNEL_ID)
        self._stop_periodic()
        # Our outstanding messages are moot; the caller's ZLB acks the StopCCN.
        self._unacked.clear()
        self._waiting.clear()
        self._retransmit_at = None
        self._close_at = None
        if self.state in (WAIT_SCCRP, WAIT_ICRP) and self.error is None:
            self.error = f"server sent StopCCN during set-up: {result}"
        if self.state != FAILED:
            self._set_state(CLOSED, now)
        self.finished = True
        return []

    def _on_cdn(self, pkt: Any, now: float) -> list[bytes]:
        if pkt.session_id != self.config.session_id or self.state in (CLOSED, FAILED):
            return []
        log.info("server sent CDN (%s); clearing the tunnel", _result_text(pkt))
        if self.state == WAIT_ICRP:
            self.error = f"server refused the call: {_result_text(pkt)}"
        self._stop_periodic()
        out = self._send_stopccn(now)
        self._close_at = now + self.config.close_timeout
        self._set_state(CLOSED, now)
        return out

    def _send_stopccn(self, now: float) -> list[bytes]:
        return self._queue(
            C.STOPCCN,
            [L.AVPMessageType(msg_type=C.STOPCCN),
             L.AVPResultCode(result_code=STOPCCN_GENERAL_REQUEST, error_code=0, error_message=b""),
             L.AVPAssignedTunnelID(tunnel_id=self.config.tunnel_id)],
            tunnel_id=self.peer_tunnel_id, session_id=0, now=now)

    def _fail_and_stop(self, error: str, now: float) -> list[bytes]:
        self.error = error
        self._set_state(FAILED, now)
        self._stop_periodic()
        if self.peer_tunnel_id is None:
            self._unacked.clear()
            self._waiting.clear()
            self._retransmit_at = None
            self.finished = True
            return []
        self._close_at = now + self.config.close_timeout
        return self._send_stopccn(now)

    # ------------------------------------------------------------------ reliable delivery

    def _queue(self, msg_type: int, avps: list[Any], *, tunnel_id: int | None, session_id: int,
               now: float) -> list[bytes]:
        msg = _Outgoing(msg_type=msg_type, avps=avps, tunnel_id=tunnel_id or 0,
                        session_id=session_id, ns=self._ns)
        self._ns = (self._ns + 1) & 0xFFFF
        self._waiting.append(msg)
        return self._send_window(now)

    def _send_window(self, now: float) -> list[bytes]:
        out = []
        while self._waiting and len(self._unacked) < max(self.peer_window, 1):
            msg = self._waiting.pop(0)
            msg.sent_at = now
            self._unacked.append(msg)
            out.append(self._build(msg))
            self.counters.control_tx += 1
            log.debug("sent %s Ns=%d Nr=%d", C.message_name(msg.msg_type), msg.ns, self._nr)
        if self._unacked and self._retransmit_at is None:
            self._retransmit_at = now + self._rto
        return out

    def _process_nr(self, nr: int, now: float) -> list[bytes]:
        """The peer has everything before ``nr``: drop those messages from the send queue."""
        acked = [m for m in self._unacked if seq_before(m.ns, nr)]
        if not acked:
            return []
        self._unacked = [m for m in self._unacked if not seq_before(m.ns, nr)]
        self._retries = 0
        self._rto = self.config.initial_rto
        self._retransmit_at = None
        if any(m.msg_type == C.ICCN for m in acked):
            log.info("session established (tunnel %d/%d, session %d/%d)",
                     self.config.tunnel_id, self.peer_tunnel_id or 0,
                     self.config.session_id, self.peer_session_id or 0)
        if (self._close_at is not None and not self._unacked and not self._waiting):
            # Everything of our teardown (StopCCN last) is acknowledged.
            self.finished = True
            self._close_at = None
            return []
        out = self._send_window(now)
        if self._unacked and self._retransmit_at is None:
            self._retransmit_at = now + self._rto
        return out

    def _on_retransmit_timer(self, now: float) -> list[bytes]:
        self._retransmit_at = None
        if not self._unacked:
            return []
        if self._retries >= self.config.max_retries:
            oldest = self._unacked[0]
            error = (f"no ack for {C.message_name(oldest.msg_type)} (Ns={oldest.ns}) after "
                     f"{self._retries} retransmissions")
            log.warning("%s", error)
            self._unacked.clear()
            self._waiting.clear()
            self._stop_periodic()
            if self._close_at is None:  # a teardown we started ends quietly as "closed"
                self.error = error
                self._set_state(FAILED, now)
            self._close_at = None
            self.finished = True
            return []
        self._retries += 1
        self._rto = min(self._rto * 2, self.config.max_rto)
        out = []
        for msg in self._unacked:
            msg.sent_at = now
            out.append(self._build(msg))
            self.counters.retransmissions += 1
            log.debug("retransmit %s Ns=%d (retry %d)", C.message_name(msg.msg_type), msg.ns,
                      self._retries)
        self._retransmit_at = now + self._rto
        return out

    def _build(self, msg: _Outgoing) -> bytes:
        return bytes(L.L2TPv2(tunnel_id=msg.tunnel_id, session_id=msg.session_id,
                              ns=msg.ns, nr=self._nr, avps=list(msg.avps)))

    def _zlb(self) -> bytes:
        # A ZLB carries the Ns of the next message we will send, and does not consume it.
        return bytes(L.L2TPv2(tunnel_id=self.peer_tunnel_id or 0, session_id=0,
                              ns=self._ns, nr=self._nr, avps=[]))

    # ------------------------------------------------------------------ data channel (PPP)

    def _receive_data(self, pkt: Any, now: float) -> list[bytes]:
        self.counters.data_rx += 1
        if pkt.session_id != self.config.session_id:
            self.counters.foreign_session += 1
            return []
        if self.state != ESTABLISHED:
            return []
        frame = bytes(pkt.payload)
        if frame.startswith(PPP_ADDRESS_CONTROL):
            frame = frame[2:]
        if not frame:
            return []
        if frame[0] & 1:  # protocol field compressed to one byte (RFC 1661 PFC)
            proto, frame = frame[0], frame[1:]
        else:
            if len(frame) < 2:
                return []
            proto, frame = struct.unpack("!H", frame[:2])[0], frame[2:]
        if proto != PPP_LCP or len(frame) < 4:
            return []
        code, ident, length = struct.unpack("!BBH", frame[:4])
        body = frame[4:length] if 4 <= length <= len(frame) else frame[4:]
        return self._on_lcp(code, ident, body)

    def _on_lcp(self, code: int, ident: int, body: bytes) -> list[bytes]:
        if code == LCP_ECHO_REQ:
            self.counters.echo_requests_answered += 1
            # Magic number 0 (we negotiate none), then the request's data copied.
            return [self._lcp(LCP_ECHO_REPLY, ident, b"\0\0\0\0" + body[4:])]
        if code == LCP_ECHO_REPLY:
            if body[4:] == self.token:
                self.counters.echo_replies_ok += 1
            else:
                self.counters.echo_replies_foreign += 1
                log.debug("foreign echo reply data %r", body[4:])
            return []
        if code == LCP_CONF_REQ:
            # Accept whatever the server proposes, and ask (again) for our empty config if needed.
            out = [self._lcp(LCP_CONF_ACK, ident, body)]
            if not self._lcp_acked:
                out.append(self._lcp(LCP_CONF_REQ, self._next_lcp_id(), b""))
            return out
        if code == LCP_CONF_ACK:
            self._lcp_acked = True
            return []
        if code == LCP_TERM_REQ:
            return [self._lcp(LCP_TERM_ACK, ident, b"")]
        return []

    def _echo_request(self) -> bytes:
        self._echo_id = (self._echo_id + 1) & 0xFF
        self.counters.echo_sent += 1
        return self._lcp(LCP_ECHO_REQ, self._echo_id, b"\0\0\0\0" + self.token)

    def _next_lcp_id(self) -> int:
        self._lcp_id = (self._lcp_id + 1) & 0xFF
        return self._lcp_id

    def _lcp(self, code: int, ident: int, body: bytes) -> bytes:
        """An L2TP data packet carrying one LCP packet.

        Windows sends data messages with the Length bit set and no sequence numbers
        (flags 0x4002), so that is what we send too.
        """
        ppp = PPP_ADDRESS_CONTROL + struct.pack("!HBBH", PPP_LCP, code, ident, 4 + len(body)) + body
        self.counters.data_tx += 1
        return bytes(L.L2TPv2(t=0, l=1, s=0, tunnel_id=self.peer_tunnel_id or 0,
                              session_id=self.peer_session_id or 0) / ppp)

    # ------------------------------------------------------------------ helpers

    def _stop_periodic(self) -> None:
        self._hello_at = None
        self._echo_at = None
        self._setup_at = None

    def _set_state(self, state: str, now: float) -> None:
        if state != self.state:
            log.info("state %s -> %s", self.state, state)
            self.state = state
            self.since = now


def _avps(pkt: Any) -> list[Any]:
    return list(getattr(pkt, "avps", None) or [])


def _avp_by_type(pkt: Any, attr_type: int) -> Any | None:
    for avp in _avps(pkt):
        if getattr(avp, "vendor_id", 0) == 0 and getattr(avp, "attr_type", None) == attr_type:
            return avp
    return None


# Name of the value field of each AVP class we read.
_VALUE_FIELDS = {C.AVP_ASSIGNED_TUNNEL_ID: "tunnel_id", C.AVP_ASSIGNED_SESSION_ID: "session_id",
                 10: "window"}


def _avp_value(pkt: Any, attr_type: int) -> int | None:
    """The integer value of an unhidden 16-bit AVP (Assigned Tunnel/Session ID, window)."""
    avp = _avp_by_type(pkt, attr_type)
    if avp is None or getattr(avp, "h", 0):
        return None
    name = _VALUE_FIELDS.get(attr_type)
    if name is not None and name in avp.fields:
        return int(avp.getfieldval(name))
    raw = getattr(avp, "value", None)
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 2:
        return struct.unpack("!H", raw)[0]
    return None


def _result_text(pkt: Any) -> str:
    avp = _avp_by_type(pkt, C.AVP_RESULT_CODE)
    if avp is None or getattr(avp, "h", 0):
        return "no result code"
    try:
        text = f"result {avp.result_code}"
        if getattr(avp, "error_code", None) is not None:
            text += f", error {avp.error_code}"
        message = getattr(avp, "error_message", None)
        if message:
            if isinstance(message, bytes):
                message = message.decode(errors="replace")
            text += f": {message}"
        return text
    except AttributeError:
        return "unreadable result code"


# ---------------------------------------------------------------------- socket loop


def write_status(path: str, status: dict[str, Any]) -> None:
    """Write ``status`` as JSON to ``path`` atomically (temp file in the same directory + rename)."""
    write_atomic(path, json.dumps(status, indent=1, sort_keys=True) + "\n")


@dataclass(frozen=True)
class RunOptions:
    server: str
    status_file: str
    local_port: int = C.L2TP_PORT
    server_port: int = C.L2TP_PORT
    duration: float | None = None
    status_interval: float = 1.0


def run(client: WinClient, opts: RunOptions) -> int:
    """Drive ``client`` over a UDP socket bound to 0.0.0.0:local_port until it finishes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", opts.local_port))
    except OSError as e:
        sock.close()
        client.error = f"cannot bind udp/{opts.local_port}: {e.strerror}"
        client.state = FAILED
        log.error("%s", client.error)
        st = client.status()
        st.update(pid=os.getpid(), since=time.time(), server=opts.server)
        write_status(opts.status_file, st)
        return 1
    sock.setblocking(False)
    server = (opts.server, opts.server_port)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stop_requested.append(signum)

    old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    mono_to_wall = time.time() - time.monotonic()
    ignored_sources = 0

    def status() -> dict[str, Any]:
        st = client.status()
        st["pid"] = os.getpid()
        st["since"] = round(st["since"] + mono_to_wall, 3)
        st["server"] = opts.server
        st["ignored_sources"] = ignored_sources
        st["updated"] = round(time.time(), 3)
        return st

    def send(datagrams: list[bytes]) -> None:
        for d in datagrams:
            try:
                sock.sendto(d, server)
            except OSError as e:  # e.g. ENETUNREACH while the lab rewires: keep going
                log.warning("send to %s failed: %s", opts.server, e)

    try:
        start = time.monotonic()
        end = start + opts.duration if opts.duration is not None else None
        closing = False
        send(client.start(start))
        last_state, next_status = None, 0.0
        while not client.finished:
            now = time.monotonic()
            if not closing and (stop_requested or (end is not None and now >= end)):
                closing = True
                log.info("%s: tearing down", "signal" if stop_requested else "duration over")
                send(client.close(now))
                continue
            if client.state != last_state or now >= next_status:
                write_status(opts.status_file, status())
                last_state, next_status = client.state, now + opts.status_interval
            wake = [next_status]
            deadline = client.next_deadline()
            if deadline is not None:
                wake.append(deadline)
            if end is not None and not closing:
                wake.append(end)
            timeout = max(0.0, min(wake) - now)
            readable, _, _ = select.select([sock, wake_r], [], [], timeout)
            now = time.monotonic()
            if wake_r in readable:
                try:
                    while wake_r.recv(64):
                        pass
                except BlockingIOError:
                    pass
            if sock in readable:
                while True:
                    try:
                        data, addr = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if addr != server:
                        ignored_sources += 1
                        continue
                    send(client.receive(data, now))
            send(client.tick(time.monotonic()))
        write_status(opts.status_file, status())
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        sock.close()
        wake_r.close()
        wake_w.close()
    return 1 if client.state == FAILED else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m l2tp_marker.lab.winclient",
        description="Windows-like L2TPv2 LAC for the test lab (run inside a network namespace).")
    p.add_argument("--server", required=True, help="LNS address (udp/1701)")
    p.add_argument("--tunnel-id", type=int, default=1, help="our tunnel ID (default 1, as Windows)")
    p.add_argument("--session-id", type=int, default=1, help="our session ID (default 1)")
    p.add_argument("--token", required=True, help="data of our LCP Echo-Requests")
    p.add_argument("--status-file", required=True, help="JSON status, rewritten every second")
    p.add_argument("--hello-interval", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--echo-interval", type=float, default=1.0, help="seconds (default 1)")
    p.add_argument("--duration", type=float, default=None,
                   help="tear down (CDN, StopCCN) and exit after this many seconds")
    p.add_argument("--local-port", type=int, default=C.L2TP_PORT, help="default 1701")
    p.add_argument("--server-port", type=int, default=C.L2TP_PORT,
                   help="default 1701 (other values only for loopback tests)")
    p.add_argument("--hostname", default=None, help="Host Name AVP (default WIN-<token>)")
    p.add_argument("--setup-timeout", type=float, default=30.0,
                   help="state 'failed' if the session is not up after this many seconds "
                        "(default 30)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format=f"%(asctime)s winclient[{args.token}] %(levelname)s %(message)s")
    try:
        config = ClientConfig(tunnel_id=args.tunnel_id, session_id=args.session_id,
                              token=args.token, hostname=args.hostname or f"WIN-{args.token}",
                              hello_interval=args.hello_interval,
                              echo_interval=args.echo_interval,
                              setup_timeout=args.setup_timeout)
    except ValueError as e:
        print(f"winclient: {e}", file=sys.stderr)
        return 2
    opts = RunOptions(server=args.server, status_file=args.status_file,
                      local_port=args.local_port, server_port=args.server_port,
                      duration=args.duration)
    return run(WinClient(config), opts)


if __name__ == "__main__":
    sys.exit(main())
