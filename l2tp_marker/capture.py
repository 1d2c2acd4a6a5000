"""``l2tp-marker capture``: record L2TP as the marker sees it, with marks and hooks, for ``replay``.

Two NFLOG rules in chains of our own (``<prefix>-CAP-IN`` / ``<prefix>-CAP-OUT``, legacy mangle),
reached from INPUT/OUTPUT by jumps placed immediately **before** the marker's own jumps:

* after the connmark plugin's rules (inserted at the top of INPUT/OUTPUT), so an outbound packet is
  logged with the mark the CONNMARK restore gave it, which is the mark the marker is handed;
* before the marker's NFQUEUE rule, whose verdict ends the traversal of the chain: anything after
  it would see nothing, or (with the queue bypassed) the packet after the rewrite.

So inbound packets are logged before any rewrite, outbound ones as the LNS sent them. Inbound takes
all of udp/1701 (marked or not: replay reports unmarked ones as ``no_mark``), outbound udp sport
1701. ``--nflog-threshold 1`` makes the kernel send every packet at once (by default it batches up to
100 packets or 1 s). tcpdump (``-i nflog:GROUP``) writes the LINKTYPE_NFLOG file, which
:func:`l2tp_marker.capture_io.read_capture` reads with each packet's mark and hook.

Rules are data (:func:`build_capture_rules`, pure); :class:`LegacyCaptureFirewall` applies them through
python-iptables; :class:`CaptureRun` is the lifecycle: tcpdump listening first, then the rules;
on every exit (signal, ``--duration``, ``--count``, error) the rules go first, then tcpdump is given
time to drain what NFLOG already delivered, then stopped by the PID we started.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping, Protocol, Sequence

from .backends import BackendError
from .constants import L2TP_PORT
from .rules import Rule, RuleSet

CAPTURE_COMMENT = "l2tp-marker-capture"
DEFAULT_GROUP = 1701
NFLOG_THRESHOLD = 1
IPTABLES = "iptables-legacy"

NF_INET_LOCAL_IN = 1
NF_INET_LOCAL_OUT = 3


class CaptureError(Exception):
    """The capture cannot start (or its file cannot be written): a message for the operator."""


# --------------------------------------------------------------------------- rules as data
@dataclass(frozen=True)
class CaptureRules:
    """The capture's chains, NFLOG rules and jumps, and where each jump goes.

    ``anchors`` maps a built-in chain to the marker chain whose jump ours must precede; where no
    such jump exists (the marker is not running) ours is appended.
    """

    ruleset: RuleSet
    anchors: tuple[tuple[str, str], ...]

    @property
    def table(self) -> str:
        return self.ruleset.table

    @property
    def chains(self) -> tuple[str, ...]:
        return self.ruleset.chains

    def anchor_of(self, chain: str) -> str | None:
        return dict(self.anchors).get(chain)

    def commands(self, positions: Mapping[str, int | None] | None = None) -> list[list[str]]:
        """Installing, as iptables argument lists. ``positions`` gives, per built-in chain, the
        0-based index our jump is inserted at (``-I CHAIN n+1``); missing/None means ``-A``."""
        positions = positions or {}
        t = self.ruleset.table
        out = [["-t", t, "-N", c] for c in self.ruleset.chains]
        out += [["-t", t, "-A", r.chain, *r.argv()] for r in self.ruleset.rules]
        for j in self.ruleset.jumps:
            pos = positions.get(j.chain)
            where = ["-A", j.chain] if pos is None else ["-I", j.chain, str(pos + 1)]
            out.append(["-t", t, *where, *j.argv()])
        return out


def capture_chains(prefix: str) -> tuple[str, str]:
    return f"{prefix}-CAP-IN", f"{prefix}-CAP-OUT"


def build_capture_rules(*, prefix: str, group: int = DEFAULT_GROUP,
                        threshold: int = NFLOG_THRESHOLD) -> CaptureRules:
    """The capture's rule set for the marker whose chains are named from ``prefix``."""
    if not 0 <= group <= 0xFFFF:
        raise ValueError(f"NFLOG group must be 0..65535, not {group}")
    if threshold < 1:
        raise ValueError(f"NFLOG threshold must be at least 1, not {threshold}")
    cap_in, cap_out = capture_chains(prefix)
    rules = (
        Rule(cap_in, "NFLOG", dport=L2TP_PORT, comment=CAPTURE_COMMENT,
             nflog_group=group, nflog_threshold=threshold),
        Rule(cap_out, "NFLOG", sport=L2TP_PORT, comment=CAPTURE_COMMENT,
             nflog_group=group, nflog_threshold=threshold),
    )
    jumps = (
        Rule("INPUT", cap_in, dport=L2TP_PORT, comment=CAPTURE_COMMENT),
        Rule("OUTPUT", cap_out, sport=L2TP_PORT, comment=CAPTURE_COMMENT),
    )
    anchors = (("INPUT", f"{prefix}-IN"), ("OUTPUT", f"{prefix}-OUT"))
    return CaptureRules(RuleSet("mangle", (cap_in, cap_out), rules, jumps), anchors)


def jump_position(targets: Sequence[str], anchor: str | None) -> int | None:
    """Where our jump goes in a chain whose rules have ``targets`` (in order): the index of the
    first rule jumping to ``anchor`` (so ours comes immediately before it), or None (append)."""
    if anchor is None:
        return None
    for i, t in enumerate(targets):
        if t == anchor:
            return i
    return None


# --------------------------------------------------------------------------- applying them
class CaptureFirewall(Protocol):
    def is_supported(self) -> tuple[bool, str]: ...

    def install(self, rules: CaptureRules) -> tuple[int, dict[str, int | None]]: ...

    def remove(self, rules: CaptureRules) -> int: ...


class LegacyCaptureFirewall:
    """Applies :class:`CaptureRules` to legacy iptables (python-iptables, one commit each)."""

    name = "iptables-legacy"

    def is_supported(self) -> tuple[bool, str]:
        from .backends.iptables_legacy import IptablesLegacyBackend  # noqa: PLC0415

        return IptablesLegacyBackend().is_supported()

    @staticmethod
    def _strip(iptc, table, rules: CaptureRules) -> int:
        from .backends.iptables_legacy import strip_chains  # noqa: PLC0415

        return strip_chains(table, rules.chains)

    def _locked(self, rules: CaptureRules, body: Callable) -> object:
        from .backends.iptables_legacy import _iptc, xtables_lock  # noqa: PLC0415

        iptc = _iptc()
        try:
            with xtables_lock():
                t = iptc.Table(rules.table)
                t.autocommit = False
                t.refresh()
                result = body(iptc, t)
                t.commit()
                t.refresh()
                t.autocommit = True
                return result
        except iptc.IPTCError as exc:
            raise BackendError(f"changing legacy {rules.table} failed: {exc}") from exc

    def install(self, rules: CaptureRules) -> tuple[int, dict[str, int | None]]:
        """Remove leftovers of an earlier capture, then install; returns (leftovers removed,
        0-based position of each jump or None where it was appended)."""
        from .backends.iptables_legacy import to_iptc  # noqa: PLC0415

        def body(iptc, t):
            leftovers = self._strip(iptc, t, rules)
            for name in rules.chains:
                t.create_chain(name)
            for rule in rules.ruleset.rules:
                iptc.Chain(t, rule.chain).append_rule(to_iptc(rule))
            positions: dict[str, int | None] = {}
            for jump in rules.ruleset.jumps:
                chain = iptc.Chain(t, jump.chain)
                pos = jump_position([r.target.name for r in chain.rules], rules.anchor_of(jump.chain))
                if pos is None:
                    chain.append_rule(to_iptc(jump))
                else:
                    chain.insert_rule(to_iptc(jump), position=pos)
                positions[jump.chain] = pos
            return leftovers, positions

        return self._locked(rules, body)  # type: ignore[return-value]

    def remove(self, rules: CaptureRules) -> int:
        return self._locked(rules, lambda iptc, t: self._strip(iptc, t, rules))  # type: ignore[return-value]


# --------------------------------------------------------------------------- pcap -> pcapng
def pcap_to_pcapng(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Copy a classic pcap file into a pcapng file (same byte order, link type and timestamps;
    record bytes untouched, so NFLOG TLVs keep the byte order the reader expects). Returns the
    number of packets."""
    with open(src, "rb") as f:
        head = f.read(24)
        magics = {b"\xd4\xc3\xb2\xa1": ("<", 6), b"\xa1\xb2\xc3\xd4": (">", 6),
                  b"\x4d\x3c\xb2\xa1": ("<", 9), b"\xa1\xb2\x3c\x4d": (">", 9)}
        if len(head) < 24 or head[:4] not in magics:
            raise CaptureError(f"{src} is not a classic pcap file")
        o, res = magics[head[:4]]
        snaplen, linktype = struct.unpack(o + "II", head[16:24])
        linktype &= 0xFFFF
        n = 0
        with open(dst, "wb") as out:
            def block(btype: int, body: bytes) -> None:
                body += b"\0" * (-len(body) % 4)
                total = 12 + len(body)
                out.write(struct.pack(o + "II", btype, total) + body + struct.pack(o + "I", total))

            block(0x0A0D0D0A, struct.pack(o + "IHHq", 0x1A2B3C4D, 1, 0, -1) + struct.pack(o + "HH", 0, 0))
            opts = b""
            if res != 6:  # if_tsresol (default 10^-6)
                opts = struct.pack(o + "HH", 9, 1) + bytes([res]) + b"\0\0\0"
            opts += struct.pack(o + "HH", 0, 0) if opts else b""
            block(0x00000001, struct.pack(o + "HHI", linktype, 0, snaplen) + opts)
            scale = 10 ** res
            while True:
                rh = f.read(16)
                if len(rh) < 16:
                    break
                sec, frac, caplen, origlen = struct.unpack(o + "IIII", rh)
                data = f.read(caplen)
                if len(data) < caplen:
                    break  # a record cut short by an interrupted writer: drop it
                ts = sec * scale + frac
                block(0x00000006, struct.pack(o + "IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, caplen, origlen) + data)
                n += 1
    return n


# --------------------------------------------------------------------------- the run
@dataclass
class CaptureOptions:
    path: Path
    group: int = DEFAULT_GROUP
    duration: float | None = None
    count: int | None = None
    pcapng: bool = False
    chain_prefix: str = "L2TP-MARKER"
    tcpdump: str = "tcpdump"
    start_timeout: float = 10.0
    drain_quiet: float = 0.3   # tcpdump's file unchanged this long = it has read what NFLOG sent
    drain_max: float = 1.5     # ... but never wait longer (the kernel's NFLOG flush timer is 1 s)


@dataclass
class CaptureResult:
    packets: int = 0
    inbound: int = 0
    outbound: int = 0
    stopped_by: str = ""
    tcpdump_stats: list[str] = field(default_factory=list)
    path: Path | None = None


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """tcpdump dies with us, even if we are SIGKILLed (else it keeps the NFLOG group bound)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def preflight(opts: CaptureOptions) -> None:
    """The checks that need no firewall change: root, tcpdump, a writable output file."""
    if os.geteuid() != 0:
        raise CaptureError("needs root (CAP_NET_ADMIN) to add NFLOG rules and read NFLOG; run it with sudo")
    if shutil.which(opts.tcpdump) is None:
        raise CaptureError(f"{opts.tcpdump} not found; install it (apt-get install tcpdump)")
    for p in _output_paths(opts):
        _check_writable(p)


def _output_paths(opts: CaptureOptions) -> list[Path]:
    return [opts.path, _raw_path(opts)] if opts.pcapng else [opts.path]


def _raw_path(opts: CaptureOptions) -> Path:
    """Where tcpdump writes (the pcapng file is made from it at the end)."""
    return opts.path.with_name(opts.path.name + ".nflog.pcap") if opts.pcapng else opts.path


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise CaptureError(f"cannot write {path}: it is a directory")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise CaptureError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not existed:
        path.unlink(missing_ok=True)


class CaptureRun:
    """One capture: tcpdump, the rules, the wait, the teardown. ``run()`` returns the exit code."""

    def __init__(self, opts: CaptureOptions, *, firewall: CaptureFirewall | None = None,
                 out: IO[str] | None = None, err: IO[str] | None = None):
        self.opts = opts
        self.rules = build_capture_rules(prefix=opts.chain_prefix, group=opts.group)
        self.firewall = firewall if firewall is not None else LegacyCaptureFirewall()
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.proc: subprocess.Popen | None = None
        self._stop_reason: str | None = None
        self._installed = False
        self._stderr = None  # tcpdump's stderr: an unlinked temporary file (nothing left if we are killed)
        self.result: CaptureResult | None = None

    # -- output -------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        print(f"l2tp-marker capture: {text}", file=self.err, flush=True)

    # -- signals ------------------------------------------------------------------------
    def request_stop(self, signum: int = 0, _frame: object = None) -> None:
        if self._stop_reason is None:
            self._stop_reason = signal.Signals(signum).name if signum else "request"

    # -- lifecycle ----------------------------------------------------------------------
    def run(self) -> int:
        sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        old = {s: signal.signal(s, self.request_stop) for s in sigs}
        try:
            return self._run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _run(self) -> int:
        ok, why = self.firewall.is_supported()
        if not ok:
            raise CaptureError(f"cannot change the firewall: {why}")
        self._stderr = tempfile.TemporaryFile(prefix="l2tp-marker-capture-")
        result = self.result = CaptureResult(path=self.opts.path)
        failed: str | None = None
        try:
            self._start_tcpdump()
            if self._stop_reason is None:
                self._install()
                failed = self._wait()
        finally:
            self._teardown(result)
        if failed:
            self.warn(failed)
        self._report(result)
        return 1 if failed else 0

    def _tcpdump_argv(self) -> list[str]:
        argv = [self.opts.tcpdump, "-i", f"nflog:{self.opts.group}", "-n", "-U", "-s", "0",
                "-Z", "root", "-w", str(_raw_path(self.opts))]
        if self.opts.count:
            argv += ["-c", str(self.opts.count)]
        return argv

    def _tcpdump_log(self) -> str:
        if self._stderr is None:
            return ""
        try:  # pread: the file offset is shared with tcpdump, which writes at it
            return os.pread(self._stderr.fileno(), 1 << 16, 0).decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def _start_tcpdump(self) -> None:
        try:
            self.proc = subprocess.Popen(self._tcpdump_argv(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self._stderr,
                                         start_new_session=True, preexec_fn=_set_pdeathsig)
        except OSError as exc:
            raise CaptureError(f"cannot run {self.opts.tcpdump}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self.opts.start_timeout
        while "listening on" not in self._tcpdump_log():
            if self.proc.poll() is not None:
                log = self._tcpdump_log().strip()
                self.proc = None
                raise CaptureError(f"tcpdump could not listen on NFLOG group {self.opts.group}: "
                                   f"{log or 'exited with no message'}"
                                   + (" (another program, perhaps another capture, may be using this "
                                      "group: try --group)"
                                      if any(w in log.lower() for w in ("busy", "not permitted")) else ""))
            if time.monotonic() >= deadline:
                raise CaptureError(f"tcpdump did not start listening within {self.opts.start_timeout:g} s: "
                                   f"{self._tcpdump_log().strip()}")
            if self._stop_reason is not None:
                return
            time.sleep(0.02)

    def _install(self) -> None:
        try:
            self._installed = True  # even a failed install may have left something: remove on exit
            leftovers, positions = self.firewall.install(self.rules)
        except BackendError as exc:
            raise CaptureError(str(exc)) from None
        if leftovers:
            self.say(f"removed {leftovers} leftover rules/chains of an earlier capture")
        self.say(f"installed in legacy {self.rules.table} (removed again on exit):")
        for cmd in self.rules.commands(positions):
            self.say("  " + shlex.join([IPTABLES, *cmd]))
        for chain, anchor in self.rules.anchors:
            if positions.get(chain) is None:
                self.say(f"  ({chain}: no jump to {anchor}, the marker is not running here: appended; "
                         "a marker started later appends its jump after this one)")
            else:
                self.say(f"  ({chain}: inserted before the marker's jump to {anchor})")
        limits = []
        if self.opts.duration:
            limits.append(f"for {self.opts.duration:g} s")
        if self.opts.count:
            limits.append(f"up to {self.opts.count} packets")
        self.say(f"capturing L2TP (udp/{L2TP_PORT}) on NFLOG group {self.opts.group} into "
                 f"{self.opts.path} (tcpdump pid {self.proc.pid}){' ' + ', '.join(limits) if limits else ''}; "
                 "stop with Ctrl-C")

    def _wait(self) -> str | None:
        """Until a signal, the duration, or tcpdump's exit; returns a failure message or None."""
        end = time.monotonic() + self.opts.duration if self.opts.duration else None
        while self._stop_reason is None:
            rc = self.proc.poll()
            if rc is not None:
                if self.opts.count and rc == 0:
                    self._stop_reason = f"--count {self.opts.count} reached"
                    return None
                self._stop_reason = "tcpdump exited"
                return f"tcpdump exited unexpectedly (status {rc}): {self._tcpdump_log().strip()}"
            if end is not None and time.monotonic() >= end:
                self._stop_reason = f"{self.opts.duration:g} s elapsed"
                return None
            time.sleep(0.05)
        return None

    def _teardown(self, result: CaptureResult) -> None:
        """Rules first (no new packets), then let tcpdump drain NFLOG, then stop it by its PID."""
        errors: list[str] = []
        if self._installed:
            try:
                self.firewall.remove(self.rules)
                self._installed = False
            except BackendError as exc:
                errors.append(f"could not remove the capture's rules: {exc}")
        if self.proc is not None:
            if self.proc.poll() is None:
                self._drain()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        result.stopped_by = self._stop_reason or "error"
        result.tcpdump_stats = [ln.strip() for ln in self._tcpdump_log().splitlines()
                                if "packets" in ln and "dropped" in ln]
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        for e in errors:
            self.warn(e)
        if errors:
            rm = self.rules.ruleset
            self.warn("remove them by hand: " + "; ".join(
                shlex.join([IPTABLES, "-t", rm.table, "-D", j.chain, *j.argv()]) for j in rm.jumps)
                + "; " + "; ".join(f"{IPTABLES} -t {rm.table} -F {c}; {IPTABLES} -t {rm.table} -X {c}"
                                   for c in rm.chains))

    def _drain(self) -> None:
        path = _raw_path(self.opts)
        deadline = time.monotonic() + self.opts.drain_max
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
            now = time.monotonic()
            if size != last:
                last, since = size, now
            elif now - since >= self.opts.drain_quiet:
                return
            time.sleep(0.05)

    def _report(self, result: CaptureResult) -> None:
        from .capture_io import CaptureError as ReadError, read_capture  # noqa: PLC0415

        raw = _raw_path(self.opts)
        if not raw.exists() or raw.stat().st_size == 0:
            self.say(f"stopped ({result.stopped_by}); no capture was written")
            return
        try:
            for p in read_capture(raw):
                result.packets += 1
                if p.hook == NF_INET_LOCAL_IN:
                    result.inbound += 1
                elif p.hook == NF_INET_LOCAL_OUT:
                    result.outbound += 1
        except (ReadError, OSError) as exc:
            self.warn(f"cannot read back {raw}: {exc}")
        if self.opts.pcapng:
            try:
                pcap_to_pcapng(raw, self.opts.path)
                raw.unlink()
            except (CaptureError, OSError) as exc:
                self.warn(f"could not write pcapng {self.opts.path} ({exc}); the pcap is in {raw}")
                result.path = raw
        self.say(f"stopped ({result.stopped_by}): {result.packets} packets captured "
                 f"({result.inbound} inbound, {result.outbound} outbound) in {result.path}")
        for line in result.tcpdump_stats:
            if not line.startswith("0 "):
                self.say(f"tcpdump: {line}")
        self.say("analyse it with:")
        self.say(f"  l2tp-marker replay {shlex.quote(str(result.path))}")


__all__ = ["CaptureError", "CaptureOptions", "CaptureRules", "CaptureRun", "LegacyCaptureFirewall",
           "build_capture_rules", "capture_chains", "jump_position", "pcap_to_pcapng", "preflight",
           "DEFAULT_GROUP"]
