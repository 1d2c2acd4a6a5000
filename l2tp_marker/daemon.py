"""``l2tp-marker run``: the live daemon (NFQUEUE adapter around the pure engine).

One thread, one loop: both queues' sockets and a signal wake-up pipe in a selector; timers for
table expiry and state saves. Each packet's verdict is applied exactly once; any exception while
judging or applying accepts the packet with the mark and bytes it arrived with (fail open), and is
logged and counted. On exit (SIGTERM, SIGINT, fatal error) the state is saved and the rules removed.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import struct
import time
from collections import Counter
from pathlib import Path
from typing import IO, Callable

from .backends import Backend, BackendError, get_backend
from .config import DaemonConfig
from .constants import L2TP_PORT
from .control import ControlServer, status_snapshot
from .metrics import MetricsServer, read_queue_stats, render, write_textfile
from .engine import IN, OUT, R_CONFLICT, Engine, TableEvent, Tunnel
from .fastpath import FastChanges, rewrite16, table_name
from .judge import judge_packet, record
from .rules import RuleSet, build_rules
from .state import load_state, save_state

log = logging.getLogger(__name__)


class DaemonError(Exception):
    """The daemon cannot start or run (missing capability, queue busy...), with the reason."""


def ruleset_for(cfg: DaemonConfig, *, kernel_fastpath: bool = False) -> RuleSet:
    return build_rules(prefix=cfg.chain_prefix, queue_in=cfg.queue_in, queue_out=cfg.queue_out,
                       mark_mask=cfg.engine.mark_mask, inbound_match=cfg.inbound_match,
                       fastpath_bit=cfg.fastpath_bit if kernel_fastpath else None)


class PacketHandler:
    """Judges queued packets and applies verdicts; independent of how packets are received."""

    # A hostile client can send conflicts at line rate: log the first, then at most one line per
    # CONFLICT_LOG_INTERVAL seconds that says how many were not logged (every one is counted).
    CONFLICT_LOG_INTERVAL = 10.0

    def __init__(self, engine: Engine, *, decision_log: IO[str] | None = None,
                 on_events: Callable[[tuple[TableEvent, ...]], None] | None = None,
                 wallclock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 fast: bool = True):
        self.engine = engine
        # The userspace fast path: data packets of known tunnels that still reach the queue are
        # judged from the engine's indexes alone (same match as the kernel's), skipping the decode.
        self.fast = fast
        self.hot_in = self.hot_out = 0
        self.decision_log = decision_log
        self.on_events = on_events
        self.wallclock = wallclock
        self.monotonic = monotonic
        self._conflict_log_next = float("-inf")
        self._conflicts_unlogged = 0
        self.stats: Counter[str] = Counter()
        self.by_dir_reason: Counter[tuple[str, str]] = Counter()
        self.dirty = False
        self.urgent = False  # the table gained or lost a tunnel: save soon, a crash must not lose it
        self._seq = 0
        self._make_lanes()

    # The userspace fast path's lanes for the common packet: IPv4 without options, L2TPv2 data.
    # One unpack reads version/IHL, fragment bits, protocol, the peer's address and both ports,
    # the L2TP flags and the two words where the tunnel ID sits (after the length with L=1).
    # Built as closures over their tables: this is the per-packet cost of every queued data packet.
    def _make_lanes(self) -> None:
        if not self.fast:
            self.handle_out = lambda pkt: self.handle(pkt, OUT)
            self.handle_in = lambda pkt: self.handle(pkt, IN)
            return
        out_index, in_index = self.engine.out_index, self.engine.in_index
        unpack_out = struct.Struct("!B5xHxB6xIHH4xBBHH").unpack_from  # ... daddr, sport, dport ...
        unpack_in = struct.Struct("!B5xHxB2xI4xHH4xBBHH").unpack_from   # ... saddr, sport, dport ...
        port = L2TP_PORT
        tunnel_cls = Tunnel
        full_mask = self.engine.config.mark_mask == 0xFFFFFFFF
        mask = self.engine.config.mark_mask
        handle = self.handle

        def handle_out(pkt) -> None:
            if self.decision_log is None:
                payload = None
                applied_payload = applied_mark = False
                try:
                    payload = pkt.get_payload()
                    if len(payload) >= 34:
                        b0, frag, proto, daddr, sport, dport, f0, f1, w30, w32 = unpack_out(payload)
                        if (b0 == 0x45 and proto == 17 and not frag & 0x3FFF and sport == port
                                and not f0 & 0x80 and f1 & 0x0F == 2):
                            lbit = f0 & 0x40
                            tid = w32 if lbit else w30
                            t = out_index.get((daddr << 32) | (dport << 16) | tid)
                            if t is not None:
                                mark = t.mark
                                if not full_mask:
                                    mark |= pkt.get_mark() & ~mask & 0xFFFFFFFF
                                if t.client_tid != tid:
                                    pkt.set_payload(rewrite16(payload, 20, 32 if lbit else 30,
                                                              t.client_tid.to_bytes(2, "big")))
                                    applied_payload = True
                                pkt.set_mark(mark)
                                applied_mark = True
                                pkt.accept()
                                self.hot_out += 1
                                return
                except Exception:
                    self._hot_failed(pkt, payload, applied_payload, applied_mark, OUT)
                    return
            handle(pkt, OUT)

        def handle_in(pkt) -> None:
            if self.decision_log is None:
                payload = None
                try:
                    payload = pkt.get_payload()
                    if len(payload) >= 34:
                        b0, frag, proto, saddr, sport, dport, f0, f1, w30, w32 = unpack_in(payload)
                        if (b0 == 0x45 and proto == 17 and not frag & 0x3FFF and dport == port
                                and not f0 & 0x80 and f1 & 0x0F == 2):
                            t = in_index.get((saddr << 32) | (sport << 16) | (w32 if f0 & 0x40 else w30))
                            if t.__class__ is tunnel_cls and t.mark == pkt.get_mark():
                                pkt.accept()
                                self.hot_in += 1
                                return
                except Exception:
                    self._hot_failed(pkt, payload, False, False, IN)
                    return
            handle(pkt, IN)

        self.handle_out = handle_out
        self.handle_in = handle_in

    def _hot_failed(self, pkt, payload, applied_payload: bool, applied_mark: bool, direction: str) -> None:
        self.stats["errors"] += 1
        self.engine.counters["error"] += 1
        log.exception("error on the userspace fast path for a %s packet; accepting it unchanged", direction)
        try:
            mark_in = pkt.get_mark()  # NetfilterQueue reports the mark the packet arrived with
        except Exception:
            mark_in = None
        self._fail_open(pkt, payload, mark_in, applied_payload, applied_mark)

    def handle(self, pkt, direction: str) -> None:
        """NetfilterQueue callback body: ``pkt`` offers get_payload/get_mark/set_mark/set_payload/accept/drop."""
        payload = mark_in = None
        applied_payload = applied_mark = False
        try:
            payload = pkt.get_payload()
            mark_in = pkt.get_mark()
            v = judge_packet(self.engine, payload, direction, mark_in)
            d = v.decision
            self.by_dir_reason[(direction, d.reason)] += 1
            if v.payload is not None:
                pkt.set_payload(v.payload)
                applied_payload = True
            if d.mark is not None and d.mark != mark_in:
                pkt.set_mark(d.mark)
                applied_mark = True
            if d.drop:
                pkt.drop()
                self.stats[f"{direction}_dropped"] += 1
            else:
                pkt.accept()
                self.stats[f"{direction}_accepted"] += 1
            if v.message is not None and (d.events or d.rewrites or getattr(v.message, "control", False)):
                self.dirty = True
                if d.events or d.reason in ("sccrq_learned", "sccrq_aliased"):
                    self.urgent = True
            if d.events and self.on_events is not None:
                self.on_events(d.events)
            if d.reason == R_CONFLICT and self.engine.config.enforce != "off":
                self._log_conflict(v)
            if self.decision_log is not None and v.datagram is not None and d.reason != "not_l2tp":
                self._seq += 1
                rec = record(self._seq, v)
                rec["ts"] = self.wallclock()
                self.decision_log.write(json.dumps(rec) + "\n")
        except Exception:
            self.stats["errors"] += 1
            self.engine.counters["error"] += 1
            log.exception("error while judging a %s packet; accepting it unchanged", direction)
            self._fail_open(pkt, payload, mark_in, applied_payload, applied_mark)

    def _log_conflict(self, v) -> None:
        now = self.monotonic()
        if now < self._conflict_log_next:
            self._conflicts_unlogged += 1
            return
        more = (f" ({self._conflicts_unlogged} more since the last message)"
                if self._conflicts_unlogged else "")
        log.warning("SA conflict, %s: %s %s%s", "dropped" if v.decision.drop else "passed to the LNS",
                    getattr(v.message, "kind", "packet"), v.decision.detail, more)
        self._conflicts_unlogged = 0
        self._conflict_log_next = now + self.CONFLICT_LOG_INTERVAL

    def _fail_open(self, pkt, payload, mark_in, applied_payload, applied_mark) -> None:
        try:
            if applied_payload and payload is not None:
                pkt.set_payload(payload)
            if applied_mark and mark_in is not None:
                pkt.set_mark(mark_in)
            pkt.accept()
        except Exception:  # the verdict may already have been given; nothing more can be done
            log.debug("verdict already sent for the failed packet", exc_info=True)


class Daemon:
    """Owns the queues, the rules, the state file and the loop."""

    def __init__(self, cfg: DaemonConfig, *, backend: Backend | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.engine = Engine(cfg.engine, clock=clock)
        self.backend = backend or get_backend(cfg.backend)
        self.ruleset = ruleset_for(cfg)
        self._log_file: IO[str] | None = None
        self.fast = FastChanges()  # keys the kernel fast path must look at again
        self.kernel = None  # KernelFastPath when the kernel fast path is in use
        self.fastpath_mode, self.fastpath_reason = "off", "fastpath = off"
        self.handler = PacketHandler(self.engine, on_events=self._events)
        self._queues: list = []
        self._control: ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self.counters: Counter[str] = Counter()
        self._started = time.time()
        self._stop = False
        self._save_cost = 0.0
        self._saver: int | None = None  # pid of a child writing the state file
        self._checks = 0
        self._wake_r = self._wake_w = None

    # ---------------------------------------------------------------- events
    # NetfilterQueue's run() drains a whole queue before returning; in a burst of thousands of
    # SCCRQs the kernel entries would wait for all of them. Synchronise from inside the batch once
    # this many keys changed (one transaction of at most a few ms).
    SYNC_BATCH = 128

    def _events(self, events: tuple[TableEvent, ...]) -> None:
        self.fast.apply(events)
        if self.kernel is not None and len(self.fast.out) + len(self.fast.inb) >= self.SYNC_BATCH:
            self.sync_fastpath()
        for e in events:
            log.info("%s tunnel peer %s client-tid %d visible-tid %d gateway-tid %s mark %#x",
                     e.kind, e.peer, e.client_tid, e.visible_tid, e.our_tid, e.mark)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        ok, why = self.backend.is_supported()
        if not ok:
            raise DaemonError(f"firewall backend {self.backend.name}: {why}")
        events = load_state(self.engine, self.cfg.state_file)
        if events:
            self._events(tuple(events))
        self._choose_fastpath()
        if self.cfg.decision_log is not None:
            self.cfg.decision_log.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.cfg.decision_log, "a", buffering=1)
            self.handler.decision_log = self._log_file
        self._bind_queues()
        try:
            self.backend.install(self.ruleset)
        except BackendError:
            self._unbind_queues()
            raise
        if self.kernel is not None:
            try:
                self.kernel.install(self.engine)
                self.fast.take()
            except BackendError as exc:
                self._kernel_failed(f"installing the fast path failed: {exc}")
        try:
            self._control = ControlServer(self.cfg.control_socket, self._control_request)
        except OSError as exc:
            log.error("control socket %s unusable (%s); `status` will not work", self.cfg.control_socket, exc)
        if self.cfg.metrics_listen:
            try:
                self._metrics = MetricsServer(self.cfg.metrics_listen, self.metrics_text)
                log.info("metrics on http://%s:%d/metrics", *self._metrics.address)
            except OSError as exc:
                log.error("cannot serve metrics on %s: %s", self.cfg.metrics_listen, exc)
        log.info("rules installed (%s, chains %s); queues in=%d out=%d; %d tunnels in table",
                 self.backend.name, ", ".join(self.ruleset.chains), self.cfg.queue_in,
                 self.cfg.queue_out, len(self.engine))
        if self.kernel is not None:
            log.info("kernel fast path on: nftables table ip %s (%d outbound, %d aliased, %d inbound entries); "
                     "aliased tunnels %s", self.kernel.table, len(self.kernel.out), len(self.kernel.alias),
                     len(self.kernel.inb),
                     "rewritten in the kernel" if self.kernel.aliases_in_kernel
                     else f"on the per-packet path ({self.kernel.alias_reason})")
        else:
            log.log(logging.WARNING if self.cfg.fastpath == "auto" else logging.INFO,
                    "kernel fast path not in use (%s): every L2TP packet is judged in userspace",
                    self.fastpath_reason)

    # ---------------------------------------------------------------- fast path
    def _choose_fastpath(self) -> None:
        if self.cfg.fastpath == "off":
            return
        from .backends.nft_fastpath import KernelFastPath  # noqa: PLC0415 - ctypes, live path only

        kernel = KernelFastPath(table_name(self.cfg.chain_prefix), self.cfg.fastpath_bit)
        if self.cfg.engine.mark_mask != 0xFFFFFFFF:
            # The kernel map sets the whole mark; the engine keeps the bits outside mark_mask.
            ok, why = False, (f"mark_mask {self.cfg.engine.mark_mask:#x} is partial, and the kernel map sets "
                              "the whole mark (bits outside the mask would be lost)")
        else:
            ok, why = kernel.is_supported()
        if not ok:
            kernel.close()
            if self.cfg.fastpath == "on":
                raise DaemonError(f"fastpath = on, but the kernel fast path is not available: {why}")
            self.fastpath_mode, self.fastpath_reason = "fallback", why
            return
        self.kernel = kernel
        self.fastpath_mode, self.fastpath_reason = "kernel", why
        self.ruleset = ruleset_for(self.cfg, kernel_fastpath=True)

    def _kernel_failed(self, why: str) -> None:
        """The kernel fast path broke: fall back to the per-packet path (the legacy rules still
        queue every packet without the bit, so nothing is lost), or stop if it is required."""
        log.error("%s", why)
        kernel, self.kernel = self.kernel, None
        self.fastpath_mode, self.fastpath_reason = "fallback", why
        if kernel is not None:
            try:
                kernel.remove()
            except BackendError as exc:
                log.error("%s", exc)
            kernel.close()
        if self.cfg.fastpath == "on":
            raise DaemonError(why)

    def sync_fastpath(self) -> None:
        """Send the fast table's changes to the kernel (one transaction)."""
        if self.kernel is None:
            self.fast.take()  # nothing follows them: do not let them pile up
            return
        try:
            self.kernel.sync(self.engine, self.fast)
        except Exception as exc:  # the packet path must go on; the legacy rules still queue
            self.counters["fastpath_errors"] += 1
            log.error("fast-path update failed: %s", exc)

    def fastpath_status(self) -> dict:
        k = self.kernel
        aliased = sum(1 for t in self.engine.tunnels() if t.alias is not None)
        st = {"mode": self.fastpath_mode, "reason": self.fastpath_reason, "setting": self.cfg.fastpath,
              "bit": self.cfg.fastpath_bit, "table": k.table if k else None,
              "out_entries": len(k.out) if k else 0, "in_entries": len(k.inb) if k else 0,
              "alias_entries": len(k.alias) if k else 0,
              "aliases_in_kernel": bool(k and k.aliases_in_kernel),
              "alias_reason": k.alias_reason if k else None,
              "tunnels": len(self.engine), "aliased_tunnels": aliased,
              "userspace_packets_in": self.handler.hot_in, "userspace_packets_out": self.handler.hot_out}
        if k is not None:
            st.update(k.stats)
            st.update(k.counters())
        return st
    def metrics_text(self) -> str:
        return render(self.engine, by_dir_reason=dict(self.handler.by_dir_reason),
                      daemon_counters={**self.counters, "errors": self.handler.stats.get("errors", 0)},
                      queues={"in": self.cfg.queue_in, "out": self.cfg.queue_out},
                      queue_stats=read_queue_stats(), fastpath=self.fastpath_status())

    def check_rules(self) -> bool:
        """Put the rules back if something removed or changed them; True if a repair was needed."""
        problems = self.backend.check(self.ruleset)
        self._checks += 1
        # The full fast-path check (every rule's expressions, the rewrite rules' checksum update)
        # costs ~35 ms of the loop: every FULL_CHECK_EVERY-th time; the quick one (~3 ms) always.
        full = self._checks % self.FULL_CHECK_EVERY == 1
        kproblems = self.kernel.check(full=full) if self.kernel is not None else []
        if problems:
            log.warning("rules damaged (%s); reinstalling", "; ".join(problems))
            self.backend.install(self.ruleset)
            self.counters["rule_repairs"] += 1
        if kproblems and self.kernel is not None:
            log.warning("fast path damaged (%s); reinstalling it with its %d entries", "; ".join(kproblems),
                        len(self.kernel.out) + len(self.kernel.inb))
            try:
                self.kernel.install(self.engine)
                self.fast.take()
                self.kernel.stats["reinstalls"] += 1
            except BackendError as exc:
                self._kernel_failed(f"reinstalling the fast path failed: {exc}")
            self.counters["rule_repairs"] += 1
        return bool(problems or kproblems)

    def _control_request(self, req: dict) -> dict:
        if req.get("cmd") != "status":
            return {"error": f"unknown command {req.get('cmd')!r}"}
        limit = req.get("limit", self.STATUS_LIMIT)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            return {"error": f"limit must be a number of tunnels or null, not {limit!r}"}
        return status_snapshot(self.engine, stats=dict(self.handler.stats), limit=limit, extra={
            "daemon": {"pid": os.getpid(), "uptime": round(time.time() - self._started, 1),
                       "queues": {"in": self.cfg.queue_in, "out": self.cfg.queue_out},
                       "backend": self.backend.name, "chains": list(self.ruleset.chains),
                       "inbound_match": self.cfg.inbound_match, "mark_mask": self.cfg.engine.mark_mask,
                       "enforce": self.cfg.engine.enforce,
                       "state_file": str(self.cfg.state_file)},
            "fastpath": self.fastpath_status(),
            "rule_problems": self.backend.check(self.ruleset) + (self.kernel.check() if self.kernel else []),
            "rule_repairs": self.counters.get("rule_repairs", 0),
        })

    def _bind_queues(self) -> None:
        from netfilterqueue import NetfilterQueue  # noqa: PLC0415 - C extension, only on the live path

        for num, direction in ((self.cfg.queue_in, IN), (self.cfg.queue_out, OUT)):
            q = NetfilterQueue()
            try:
                q.bind(num, self.handler.handle_in if direction == IN else self.handler.handle_out,
                       max_len=self.cfg.queue_maxlen)
            except OSError as exc:
                self._unbind_queues()
                raise DaemonError(f"cannot bind NFQUEUE {num} ({exc}); is another instance running?") from exc
            self._queues.append((q, direction))

    def _unbind_queues(self) -> None:
        for q, _ in self._queues:
            try:
                q.unbind()
            except Exception:
                log.debug("unbind failed", exc_info=True)
        self._queues.clear()

    def stop(self) -> None:
        """Save state, remove rules, release the queues. Safe to call twice; every step is tried."""
        sd_notify("STOPPING=1")
        try:
            self.save()
        except OSError as exc:
            log.error("could not save state to %s: %s", self.cfg.state_file, exc)
        if self.kernel is not None:
            # First, so no packet leaves with the fast path's bit after the legacy rules that clear it are gone.
            try:
                self.kernel.remove()
                log.info("fast path removed")
            except BackendError as exc:
                log.error("%s", exc)
        try:
            self.backend.remove(self.ruleset)
            log.info("rules removed")
        except BackendError as exc:
            log.error("%s", exc)
        finally:
            self._unbind_queues()
            for srv in (self._control, self._metrics):
                if srv is not None:
                    srv.close()
            self._control = self._metrics = None
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
                self.handler.decision_log = None

    # Writing the table costs ~6 µs a tunnel (JSON, fsync): 12 ms at 2,000 tunnels, 0.8 s at
    # 100,000, during which no packet would be judged. From this size on, a forked child writes
    # the snapshot (copy-on-write) while the loop goes on.
    FORK_SAVE_MIN = 500
    # `status` lists at most this many tunnels unless asked for all (a table of 100,000 rows helps
    # nobody, and building it costs the loop ~1 s and the daemon ~40 MB that it keeps).
    STATUS_LIMIT = 1000
    FULL_CHECK_EVERY = 12  # with repair_interval 5 s: a full fast-path check every minute

    def save(self, background: bool = False) -> None:
        """Save the table: in the loop (``background``) through a child for big tables, otherwise
        (and on stop) here and now."""
        self._reap_saver(block=not background)
        if background and self._saver is not None:
            return  # the previous snapshot is still being written; the table stays dirty
        t0 = time.monotonic()
        self.handler.dirty = self.handler.urgent = False
        if background and len(self.engine) >= self.FORK_SAVE_MIN:
            pid = os.fork()
            if pid == 0:  # the child: write the snapshot and leave at once, touching nothing else
                code = 1
                try:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        signal.signal(sig, signal.SIG_DFL)
                    save_state(self.engine, self.cfg.state_file)
                    code = 0
                except BaseException:  # noqa: BLE001 - reported by the exit code
                    pass
                os._exit(code)
            self._saver = pid
        else:
            try:
                save_state(self.engine, self.cfg.state_file)
            except OSError:
                self.handler.dirty = True
                raise
        self._save_cost = time.monotonic() - t0

    def _save_gap(self) -> float:
        """How soon after the last save a changed table is saved again: at once (50 ms) for small
        tables, at most once a second for forked saves (each fork stalls the loop 3-5 ms: kept
        under 1% of the time, so it does not show in the latency of 99% of the packets), and
        never more than ~10% of the time."""
        floor = 1.0 if len(self.engine) >= self.FORK_SAVE_MIN else 0.05
        return max(floor, 10 * self._save_cost)

    def _reap_saver(self, block: bool = False) -> None:
        if self._saver is None:
            return
        try:
            pid, status = os.waitpid(self._saver, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid, status = self._saver, 0
        if pid == 0:
            return
        self._saver = None
        if status != 0:
            self.handler.dirty = True
            log.error("could not save state to %s (the writer exited with status %#x); retrying",
                      self.cfg.state_file, status)

    def request_stop(self, *_: object) -> None:
        self._stop = True
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    # ---------------------------------------------------------------- loop
    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Start, serve until asked to stop, then stop. Installs SIGTERM/SIGINT handlers."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if ready is not None:
                ready()
            self._loop()
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        for q, direction in self._queues:
            sel.register(q.get_fd(), selectors.EVENT_READ, q)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        for srv in (self._control, self._metrics):
            if srv is not None:
                sel.register(srv, selectors.EVENT_READ, srv)
        start = time.monotonic()
        next_save = start + self.cfg.state_interval
        next_expire = start + 1.0
        next_repair = start + self.cfg.repair_interval
        last_save = start
        next_textfile = start if self.cfg.metrics_textfile else float("inf")
        try:
            while not self._stop:
                due = min(next_save, next_expire, next_repair, next_textfile)
                if self.handler.urgent:
                    due = min(due, last_save + self._save_gap())
                timeout = max(0.0, due - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        try:
                            self._wake_r.recv(64)
                        except BlockingIOError:
                            pass
                        continue
                    if isinstance(key.data, (ControlServer, MetricsServer)):
                        key.data.serve_one()
                    else:
                        key.data.run(block=False)
                        self.sync_fastpath()
                now = time.monotonic()
                if now >= next_expire:
                    events = self.engine.expire()
                    if events:
                        self.handler.dirty = self.handler.urgent = True
                        self._events(tuple(events))
                        self.sync_fastpath()
                    next_expire = now + 1.0
                if now >= next_repair:
                    try:
                        self.check_rules()
                    except BackendError as exc:
                        log.error("rule repair failed: %s", exc)
                    next_repair = now + self.cfg.repair_interval
                if now >= next_textfile:
                    try:
                        write_textfile(self.cfg.metrics_textfile, self.metrics_text())
                    except OSError as exc:
                        log.error("cannot write metrics to %s: %s", self.cfg.metrics_textfile, exc)
                    next_textfile = now + self.cfg.metrics_interval
                if self.handler.urgent:
                    # Save a changed table at once, but spend at most ~10% of the time saving.
                    next_save = min(next_save, last_save + self._save_gap())
                if self._saver is not None:
                    self._reap_saver()
                if now >= next_save:
                    last_save = now
                    if self.handler.dirty:
                        try:
                            self.save(background=True)
                        except OSError as exc:
                            log.error("could not save state to %s: %s", self.cfg.state_file, exc)
                    next_save = now + self.cfg.state_interval
        finally:
            sel.close()


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about readiness/stopping; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False


def _ready() -> None:
    log.info("l2tp-marker ready (pid %d)", os.getpid())
    sd_notify("READY=1\nSTATUS=judging L2TP packets")


def run_daemon(cfg: DaemonConfig) -> int:
    d = Daemon(cfg)
    try:
        d.run(ready=_ready)
    except (DaemonError, BackendError) as exc:
        log.error("%s", exc)
        return 1
    return 0


__all__ = ["Daemon", "DaemonError", "PacketHandler", "run_daemon", "ruleset_for", "Path"]
