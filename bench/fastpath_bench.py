#!/usr/bin/env python3
"""Fast-path benchmark (issue #5): outbound L2TP data through five netfilter set-ups, side by side.

Modes (one run, order shuffled in every round):

  none        no rules at all (the main route leads to the client over the "SA" link)
  kmap        kernel only: the bench's own nftables table like the daemon's (map daddr . dport .
              tunnel ID -> mark in a route chain at priority -160), no NFQUEUE
  fastpath    l2tp-marker run --fastpath on (tunnels learnt from real SCCRQ/SCCRP)
  userspace   l2tp-marker run --fastpath off (every outbound packet through NFQUEUE to Python)
  acceptonly  a tiny NetfilterQueue program that accepts everything, behind a legacy mangle OUTPUT
              NFQUEUE rule of the daemon's shape: the ceiling of any per-packet Python path
  kmapbit     (diagnostic, not run by default) kmap with the daemon's fast-path mark bit in the map
              values and the daemon's legacy mangle OUTPUT rules (NFQUEUE unless the bit is set,
              then clear the bit), but no daemon: what the fast path's design costs by itself

for several tunnel counts (the sender cycles the tunnel IDs) and packet sizes, measured with a C
load generator (bench/loadgen.c, compiled into bench/build/). Plus the control plane (tunnel
setups per second, SCCRP -> kernel entry latency from nftables netlink events) and the daemon's
memory with 100,000 tunnels. Prints a report and writes bench/RESULTS.md. Never asserts a timing.

Topology: namespaces fpb<pid>-gw (gateway 198.51.100.1) and fpb<pid>-cl (client addresses
192.0.2.10 and .11) joined by a veth pair, the "SA" link. In the gateway, `ip rule fwmark 0x1
lookup 100` routes to the client over that link; in the marking modes (kmap, fastpath, userspace)
the main table sends the client's addresses into a dead-end veth pair, so only marked packets
reach the client and every dead-end packet is counted as misrouted. In the modes that do not mark
(none, acceptonly) the main table uses the SA link itself, so all modes end on the same path.
Inbound, `iptables-legacy -t mangle -A PREROUTING -i <sa link> -j MARK --set-xmark 0x1` plays the
decrypting SA. With 2+ CPUs the traffic sender is pinned to CPU 0 and everything else (receiver,
daemon, accept-only program) to CPU 1 (--no-pin to turn that off).

    sudo .venv/bin/python bench/fastpath_bench.py            # full run, ~10 min on 2 cores
    sudo .venv/bin/python bench/fastpath_bench.py --quick    # 3 short rounds, small packets only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
LOADGEN_SRC = HERE / "loadgen.c"
LOADGEN = BUILD / "loadgen"
VENV_PY = ROOT / ".venv" / "bin" / "python"
MARKER = ROOT / ".venv" / "bin" / "l2tp-marker"

GW = "198.51.100.1"
CLIENTS = ("192.0.2.10", "192.0.2.11")
PORT = 1701
SA_MARK = 0x1
SA_TABLE = 100
FP_BIT = 0x80000000
QUEUE_IN, QUEUE_OUT = 1701, 1702
QUEUE_MAXLEN = 4096  # the daemon's default queue_maxlen; the accept-only program uses the same
CHAIN_PREFIX = "FPBENCH"
KMAP_TABLE = "fpb_kmap"
SA_DEV, DEAD_DEV, DEAD_PEER, CL_DEV = "fpbsa", "fpbdead", "fpbdeadp", "eth0"

DEFAULT_MODES = ("none", "kmap", "fastpath", "userspace", "acceptonly")
ALL_MODES = ("none", "kmap", "kmapbit", "fastpath", "userspace", "acceptonly")
DAEMON_MODES = ("fastpath", "userspace")
MARKING_MODES = ("kmap", "kmapbit", "fastpath", "userspace")
MODE_LABEL = {
    "none": "no rules",
    "kmap": "kernel-only map",
    "kmapbit": "kernel map + daemon's legacy rules, no daemon",
    "fastpath": "daemon, fast path on",
    "userspace": "daemon, fast path off",
    "acceptonly": "NFQUEUE accept-only",
}
NS_RE = re.compile(r"^fpb(\d+)-(gw|cl)$")

# Targets from issue #5 (reported against, never asserted).
T_FASTPATH_VS_KMAP = 0.95
T_USERSPACE_VS_ACCEPT = 0.90
T_SETUPS_PER_S = 5000
T_SCCRP_LIVE_P99_MS = 5.0
T_RSS_MB = 100.0

NFT_KMAP = """\
table ip {t} {{
  map out_marks {{
    typeof ip daddr . udp dport . @th,96,16 : meta mark
  }}
  chain out {{
    type route hook output priority -160; policy accept;
    udp sport 1701 @th,64,2 0x1 @th,76,4 2 meta mark set ip daddr . udp dport . @th,96,16 map @out_marks counter
    udp sport 1701 @th,64,2 0x0 @th,76,4 2 meta mark set ip daddr . udp dport . @th,80,16 map @out_marks counter
  }}
}}
"""

ACCEPT_ONLY = """\
import signal, sys
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda p: p.accept(), max_len=int(sys.argv[2]))
def _stop(*_):
    raise SystemExit(0)
signal.signal(signal.SIGTERM, _stop)
print("READY", flush=True)
try:
    q.run()
finally:
    q.unbind()
"""


class BenchError(Exception):
    """The bench cannot run or a mode did not do what it must (with the reason)."""


# ---------------------------------------------------------------------------------------------
# small helpers

def run(argv: list[str], *, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise BenchError(f"command failed ({res.returncode}): {shlex.join(argv)}\n{res.stderr.strip()}")
    return res.stdout


def nsx(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def med(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_busy(seconds: float = 0.5) -> list[float]:
    """Busy % of each CPU over ``seconds`` (from /proc/stat): what else runs on the machine."""
    def snap() -> list[tuple[int, int]]:
        res = []
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                v = [int(x) for x in line.split()[1:]]
                res.append((sum(v), v[3] + v[4]))  # total, idle + iowait
        return res
    a = snap()
    time.sleep(seconds)
    b = snap()
    return [round(100.0 * (1 - (bi - ai) / max(1, bt - at)), 1) for (at, ai), (bt, bi) in zip(a, b)]


def fastpath_supported() -> bool:
    try:
        out = run([str(MARKER), "run", "--help"], check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--fastpath" in out


def compile_loadgen() -> None:
    if shutil.which("gcc") is None:
        raise BenchError("gcc is not installed: the load generator (bench/loadgen.c) must be compiled "
                         "(apt-get install gcc, or scripts/install-deps.sh)")
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    BUILD.mkdir(parents=True, exist_ok=True)
    tmp = LOADGEN.with_suffix(f".tmp{os.getpid()}")
    res = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(LOADGEN_SRC)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BenchError(f"gcc could not compile {LOADGEN_SRC}:\n{res.stderr}")
    tmp.replace(LOADGEN)


def check_packets() -> None:
    """The load generator's packets must decode as meant with the project's own decoder."""
    sys.path.insert(0, str(ROOT))
    from l2tp_marker.codec import decode_l2tp  # noqa: PLC0415

    def dump(kind: str, **kw) -> bytes:
        args = [str(LOADGEN), "dump", "--kind", kind] + [a for k, v in kw.items()
                                                         for a in (f"--{k}", str(v))]
        return bytes.fromhex(run(args).strip())

    m = decode_l2tp(dump("data", size=50, tid=7))
    if getattr(m, "control", True) or m.tunnel_id != 7 or m.length != 50:
        raise BenchError(f"loadgen data packet decodes wrongly: {m}")
    m = decode_l2tp(dump("sccrq", tid=7))
    if not m.control or m.msg_type != 1 or m.tunnel_id != 0 or m.assigned_tunnel_id != 7:
        raise BenchError(f"loadgen SCCRQ decodes wrongly: {m}")
    m = decode_l2tp(dump("sccrp", tid=7))
    if not m.control or m.msg_type != 2 or m.tunnel_id != 7 or m.assigned_tunnel_id != 65529:
        raise BenchError(f"loadgen SCCRP decodes wrongly: {m}")


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    osname = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    git = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False).strip() or "?"
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "l2tp_marker"], check=False).strip()
    nft = run(["nft", "--version"], check=False).strip()
    mem = "?"
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) // 1024} MiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
            "host": platform.node(), "os": osname, "kernel": platform.release(), "cpu": cpu,
            "cpus": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "nft": nft, "git": git + (" (l2tp_marker/ has uncommitted changes)" if dirty else "")}


# ---------------------------------------------------------------------------------------------
# nftables netlink events (run inside the gateway namespace as `fastpath_bench.py --nlmon`)

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1


def _attrs(buf: bytes, off: int, end: int):
    while off + 4 <= end:
        ln, typ = struct.unpack_from("=HH", buf, off)
        if ln < 4:
            return
        yield typ & 0x3FFF, buf[off + 4:off + ln]
        off += (ln + 3) & ~3


def nlmon_main() -> int:
    """Print one line per nftables set element added/deleted: `<monotonic ns> add|del <table>
    <set> <key hex>`; "READY" once subscribed, "LOST n" when the kernel dropped events."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE, then the capped one
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, 64 << 20)
            break
        except OSError:
            continue
    s.bind((0, 0))
    s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    lost = 0
    while True:
        try:
            buf = s.recv(1 << 20)
        except OSError as exc:
            if exc.errno == 105:  # ENOBUFS: events were dropped
                lost += 1
                out.write(f"LOST {lost}\n")
                out.flush()
                continue
            raise
        t = time.monotonic_ns()
        off, lines = 0, []
        while off + 16 <= len(buf):
            ln, typ, _flags, _seq, _pid = struct.unpack_from("=IHHII", buf, off)
            if ln < 16:
                break
            sub, msg = typ >> 8, typ & 0xFF
            if sub == NFNL_SUBSYS_NFTABLES and msg in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM):
                table = setname = ""
                keys = []
                for at, val in _attrs(buf, off + 20, off + ln):
                    if at == 1:
                        table = val.rstrip(b"\0").decode(errors="replace")
                    elif at == 2:
                        setname = val.rstrip(b"\0").decode(errors="replace")
                    elif at == 3:
                        for _lt, elem in _attrs(val, 0, len(val)):
                            for et, ev in _attrs(elem, 0, len(elem)):
                                if et == 1:  # NFTA_SET_ELEM_KEY -> NFTA_DATA_VALUE
                                    for dt, dv in _attrs(ev, 0, len(ev)):
                                        if dt == 1:
                                            keys.append(dv.hex())
                op = "add" if msg == NFT_MSG_NEWSETELEM else "del"
                lines += [f"{t} {op} {table} {setname} {k}\n" for k in keys]
            off += (ln + 3) & ~3
        if lines:
            out.write("".join(lines))
            out.flush()


@dataclass
class SetEvent:
    t_ns: int
    op: str
    table: str
    set: str
    key: bytes

    def addr_tid(self) -> tuple[str, int] | None:
        """(address, tunnel ID) of a `addr . port . tid` key (registers padded to 4 octets)."""
        if len(self.key) < 10:
            return None
        return socket.inet_ntoa(self.key[:4]), int.from_bytes(self.key[8:10], "big")


class NlMonitor:
    def __init__(self, bench: "Bench"):
        self.bench = bench
        self.events: list[SetEvent] = []
        self.lost = 0
        self.lock = threading.Lock()
        self.proc = bench.start(nsx(bench.gw) + [str(VENV_PY), "-u", str(Path(__file__).resolve()), "--nlmon"],
                                "nlmon", ready=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "LOST":
                self.lost = int(parts[1])
                continue
            if len(parts) != 5:
                continue
            ev = SetEvent(int(parts[0]), parts[1], parts[2], parts[3], bytes.fromhex(parts[4]))
            with self.lock:
                self.events.append(ev)

    def snapshot(self) -> list[SetEvent]:
        with self.lock:
            return list(self.events)

    def clear(self) -> None:
        with self.lock:
            self.events.clear()

    def count(self, setname: str, op: str = "add") -> int:
        with self.lock:
            return sum(1 for e in self.events if e.set == setname and e.op == op)

    def stop(self) -> None:
        self.bench.stop(self.proc)


# ---------------------------------------------------------------------------------------------
# the lab

@dataclass
class Daemon:
    proc: subprocess.Popen
    fastpath: str
    socket: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Cell:
    mode: str
    size: int
    tunnels: int
    round: int
    pps: float
    sent_pps: float
    send_errors: int
    received: int
    misrouted: int
    rx_drops: int
    queue_drops: int
    cpu_pct: float | None
    lat_p50_us: float | None
    lat_p99_us: float | None
    lat_n: int
    sent: int = 0
    kernel_marked: int | None = None      # daemon modes: the fast path's nft counter (throughput phase)
    daemon_judged_out: int | None = None  # daemon modes: outbound packets the daemon gave a verdict


@dataclass
class Bench:
    args: argparse.Namespace
    pid: int = field(default_factory=os.getpid)
    procs: list[subprocess.Popen] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    tmp: Path | None = None
    ns_made: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gw = f"fpb{self.pid}-gw"
        self.cl = f"fpb{self.pid}-cl"
        self.pin = not self.args.no_pin and (os.cpu_count() or 1) >= 2
        self._daemons = 0

    # ---------------------------------------------------------------- processes
    def cpu(self, which: str) -> list[str]:
        if not self.pin:
            return []
        return ["taskset", "-c", "0" if which == "sender" else "1"]

    def start(self, argv: list[str], name: str, *, ready: bool = False, stderr=None,
              timeout: float = 30) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr if stderr is not None else subprocess.PIPE,
                             text=True, start_new_session=True)
        self.procs.append(p)
        self.started.append(p.pid)
        p.bench_name = name  # type: ignore[attr-defined]
        if ready:
            line = self._readline(p, timeout)
            if line.strip() != "READY":
                err = ""
                if p.poll() is not None and p.stderr is not None:
                    err = p.stderr.read()
                self.stop(p)
                raise BenchError(f"{name} did not start: {line.strip()!r} {err.strip()}")
        return p

    @staticmethod
    def _readline(p: subprocess.Popen, timeout: float) -> str:
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        return box[0] if box else ""

    def stop(self, p: subprocess.Popen, timeout: float = 10) -> tuple[str, str]:
        """SIGTERM the process (by its PID), SIGKILL after ``timeout``; its remaining output."""
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = p.communicate()
        if p in self.procs:
            self.procs.remove(p)
        return out or "", err or ""

    def wait_json(self, p: subprocess.Popen, timeout: float) -> dict:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise BenchError(f"{getattr(p, 'bench_name', 'process')} did not finish in {timeout:.0f} s")
        if p in self.procs:
            self.procs.remove(p)
        return self._json(p, out, err)

    @staticmethod
    def _json(p, out: str, err: str) -> dict:
        for line in reversed((out or "").splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise BenchError(f"{getattr(p, 'bench_name', 'process')} printed no result "
                         f"(exit {p.returncode}): {(err or '').strip()[-500:]}")

    def stop_json(self, p: subprocess.Popen) -> dict:
        out, err = self.stop(p)
        return self._json(p, out, err)

    # ---------------------------------------------------------------- namespaces
    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"fpb{self.pid}-"))
        for ns in (self.gw, self.cl):
            run(["ip", "netns", "add", ns])
            self.ns_made.append(ns)
        g, c = self.gw, self.cl
        cmds = [
            ["ip", "-n", g, "link", "set", "lo", "up"],
            ["ip", "-n", c, "link", "set", "lo", "up"],
            ["ip", "link", "add", SA_DEV, "netns", g, "type", "veth", "peer", "name", CL_DEV, "netns", c],
            # the dead end: a veth pair inside the gateway; what arrives on its far end is not for
            # the gateway and is dropped (no forwarding in the namespace, no ICMP)
            ["ip", "-n", g, "link", "add", DEAD_DEV, "type", "veth", "peer", "name", DEAD_PEER],
            ["ip", "-n", g, "link", "set", SA_DEV, "up"],
            ["ip", "-n", g, "link", "set", DEAD_DEV, "up"],
            ["ip", "-n", g, "link", "set", DEAD_PEER, "up"],
            ["ip", "-n", c, "link", "set", CL_DEV, "up"],
            ["ip", "-n", g, "addr", "add", f"{GW}/32", "dev", "lo"],
            *[["ip", "-n", c, "addr", "add", f"{a}/32", "dev", CL_DEV] for a in CLIENTS],
            ["ip", "-n", c, "route", "add", f"{GW}/32", "dev", CL_DEV],
            ["ip", "-n", g, "route", "add", "192.0.2.0/24", "dev", SA_DEV, "src", GW, "table", str(SA_TABLE)],
            ["ip", "-n", g, "route", "add", "192.0.2.0/24", "dev", DEAD_DEV, "src", GW],
            ["ip", "-n", g, "rule", "add", "fwmark", hex(SA_MARK), "lookup", str(SA_TABLE), "pref", "100"],
        ]
        for cmd in cmds:
            run(cmd)
        for ns in (g, c):
            run(nsx(ns) + ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0",
                           "net.ipv4.conf.default.rp_filter=0", "net.ipv6.conf.all.disable_ipv6=1",
                           "net.ipv6.conf.default.disable_ipv6=1"])
        run(nsx(g) + ["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        for dev in (SA_DEV, DEAD_DEV, DEAD_PEER):
            run(nsx(g) + ["sysctl", "-qw", f"net.ipv4.conf.{dev}.rp_filter=0"])
        run(nsx(c) + ["sysctl", "-qw", f"net.ipv4.conf.{CL_DEV}.rp_filter=0"])
        gw_mac = run(["ip", "-n", g, "-j", "link", "show", SA_DEV])
        cl_mac = run(["ip", "-n", c, "-j", "link", "show", CL_DEV])
        gw_mac, cl_mac = json.loads(gw_mac)[0]["address"], json.loads(cl_mac)[0]["address"]
        dead_mac = json.loads(run(["ip", "-n", g, "-j", "link", "show", DEAD_PEER]))[0]["address"]
        for a in CLIENTS:
            run(["ip", "-n", g, "neigh", "replace", a, "lladdr", cl_mac, "dev", SA_DEV, "nud", "permanent"])
            run(["ip", "-n", g, "neigh", "replace", a, "lladdr", dead_mac, "dev", DEAD_DEV, "nud", "permanent"])
        run(["ip", "-n", c, "neigh", "replace", GW, "lladdr", gw_mac, "dev", CL_DEV, "nud", "permanent"])
        # The inbound SA: what arrives over the SA link carries the SA's mark.
        run(nsx(g) + ["iptables-legacy", "-w", "-t", "mangle", "-A", "PREROUTING", "-i", SA_DEV,
                      "-j", "MARK", "--set-xmark", f"{SA_MARK:#x}/0xffffffff"])

    def main_route(self, via_sa: bool) -> None:
        run(["ip", "-n", self.gw, "route", "replace", "192.0.2.0/24", "dev",
             SA_DEV if via_sa else DEAD_DEV, "src", GW])

    def dead_tx(self) -> int:
        return int(run(nsx(self.gw) + ["cat", f"/sys/class/net/{DEAD_DEV}/statistics/tx_packets"]).strip())

    def gw_counters(self) -> tuple[int, int]:
        """(dead-end packets, NFQUEUE drops) in the gateway namespace."""
        out = run(nsx(self.gw) + ["sh", "-c", f"cat /sys/class/net/{DEAD_DEV}/statistics/tx_packets; "
                                  "cat /proc/net/netfilter/nfnetlink_queue 2>/dev/null || true"])
        lines = out.splitlines()
        dead = int(lines[0])
        drops = 0
        for line in lines[1:]:
            f = line.split()
            if len(f) >= 7:
                drops += int(f[5]) + int(f[6])  # queue_dropped, user_dropped
        return dead, drops

    def rx_drops(self) -> int:
        out = run(nsx(self.cl) + ["cat", "/proc/net/snmp"])
        rows = [line.split() for line in out.splitlines() if line.startswith("Udp:")]
        if len(rows) >= 2:
            d = dict(zip(rows[0][1:], rows[1][1:]))
            return int(d.get("InErrors", 0))  # includes RcvbufErrors (socket buffer full)
        return 0

    def cleanup(self) -> list[str]:
        problems = []
        for p in list(self.procs):
            try:
                self.stop(p, timeout=10)
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                problems.append(f"stopping pid {p.pid}: {exc}")
        for ns in self.ns_made:
            try:  # anything still running in the namespace (nothing should be), by PID
                for pid in run(["ip", "netns", "pids", ns], check=False).split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                    problems.append(f"pid {pid} was still running in {ns}")
            except Exception:  # noqa: BLE001
                pass
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if res.returncode != 0:
                problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
        self.ns_made.clear()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        return problems

    # ---------------------------------------------------------------- traffic
    def loadgen(self, ns: str, which: str, *args: str) -> list[str]:
        return nsx(ns) + self.cpu(which) + [str(LOADGEN), *args]

    def fp_counters(self, daemon: Daemon | None) -> tuple[int, int]:
        """(packets the kernel fast path marked, packets the daemon judged outbound) so far."""
        if daemon is None:
            return 0, 0
        st = self.status(daemon)
        fp = st.get("fastpath") or {}
        pk = st.get("packets", {})
        judged = (int(pk.get("out_accepted", 0)) + int(pk.get("out_dropped", 0))
                  + int(fp.get("userspace_packets_out", 0)))  # the daemon's userspace fast path
        return int(fp.get("packets_out", 0)), judged

    def measure(self, mode: str, size: int, tunnels: int, rnd: int, watch_pid: int | None,
                daemon: Daemon | None = None) -> Cell:
        a = self.args
        k0, u0 = self.fp_counters(daemon)
        dead0, qd0 = self.gw_counters()
        rx0 = self.rx_drops()
        recv = self.start(self.loadgen(self.cl, "other", "recv", "--bind", CLIENTS[0], "--timeout",
                                       str(a.duration + 30)), "receiver", ready=True)
        cpu0 = cpu_ticks(watch_pid) if watch_pid else None
        t0 = time.monotonic()
        snd = self.start(self.loadgen(self.gw, "sender", "send", "--src", GW, "--dst", CLIENTS[0],
                                      "--size", str(size), "--tunnels", str(tunnels),
                                      "--duration", str(a.duration)), "sender")
        sres = self.wait_json(snd, a.duration + 30)
        wall = time.monotonic() - t0
        cpu1 = cpu_ticks(watch_pid) if watch_pid else None
        time.sleep(0.15)  # let the queue drain
        rres = self.stop_json(recv)
        dead1, qd1 = self.gw_counters()
        rx1 = self.rx_drops()
        k1, u1 = self.fp_counters(daemon)
        cpu_pct = None
        if cpu0 is not None and cpu1 is not None:
            cpu_pct = 100.0 * (cpu1 - cpu0) / os.sysconf("SC_CLK_TCK") / wall
        # latency probes at a low rate
        lat = {}
        if a.probe_duration > 0:
            recv = self.start(self.loadgen(self.cl, "other", "recv", "--bind", CLIENTS[0], "--probe",
                                           "--timeout", str(a.probe_duration + 30)), "probe receiver", ready=True)
            snd = self.start(self.loadgen(self.gw, "sender", "send", "--probe", "--src", GW, "--dst", CLIENTS[0],
                                          "--size", str(size), "--tunnels", str(tunnels), "--rate",
                                          str(a.probe_rate), "--duration", str(a.probe_duration)), "probe sender")
            self.wait_json(snd, a.probe_duration + 30)
            time.sleep(0.05)
            lat = self.stop_json(recv)
        return Cell(mode, size, tunnels, rnd, pps=rres["pps"], sent_pps=sres["pps"],
                    send_errors=sres["errors"], received=rres["received"], misrouted=dead1 - dead0,
                    rx_drops=rx1 - rx0, queue_drops=qd1 - qd0, cpu_pct=cpu_pct,
                    lat_p50_us=lat.get("lat_p50_us"), lat_p99_us=lat.get("lat_p99_us"),
                    lat_n=lat.get("lat_n", 0), sent=sres["sent"], kernel_marked=k1 - k0 if daemon else None,
                    daemon_judged_out=u1 - u0 if daemon else None)

    # ---------------------------------------------------------------- modes
    def kmap_install(self, tunnels: int, bit: int = 0) -> None:
        value = SA_MARK | bit
        elems = ", ".join(f"{CLIENTS[0]} . {PORT} . {t} : {value:#x}" for t in range(1, tunnels + 1))
        text = NFT_KMAP.format(t=KMAP_TABLE) + f"add element ip {KMAP_TABLE} out_marks {{ {elems} }}\n"
        run(nsx(self.gw) + ["nft", "-f", "-"], input=text)
        if bit:  # the daemon's legacy OUTPUT rules for the fast path (rules.py), without a daemon
            chain = f"{CHAIN_PREFIX}-KB"
            ipt = nsx(self.gw) + ["iptables-legacy", "-w", "-t", "mangle"]
            udp = ["-p", "udp", "-m", "udp", "--sport", str(PORT)]
            run(ipt + ["-N", chain])
            run(ipt + ["-A", chain, *udp, "-m", "mark", "!", "--mark", f"{bit:#x}/{bit:#x}", "-j", "NFQUEUE",
                       "--queue-num", str(QUEUE_OUT), "--queue-bypass"])
            run(ipt + ["-A", chain, *udp, "-j", "MARK", "--set-xmark", f"0x0/{bit:#x}"])
            run(ipt + ["-A", "OUTPUT", *udp, "-j", chain])

    def kmap_remove(self) -> None:
        run(nsx(self.gw) + ["nft", "delete", "table", "ip", KMAP_TABLE], check=False)
        chain = f"{CHAIN_PREFIX}-KB"
        ipt = nsx(self.gw) + ["iptables-legacy", "-w", "-t", "mangle"]
        if subprocess.run(ipt + ["-S", chain], capture_output=True).returncode == 0:
            run(ipt + ["-D", "OUTPUT", "-p", "udp", "-m", "udp", "--sport", str(PORT), "-j", chain], check=False)
            run(ipt + ["-F", chain], check=False)
            run(ipt + ["-X", chain], check=False)

    def acceptonly_start(self) -> subprocess.Popen:
        chain = f"{CHAIN_PREFIX}-AO"
        ipt = nsx(self.gw) + ["iptables-legacy", "-w", "-t", "mangle"]
        run(ipt + ["-N", chain])
        run(ipt + ["-A", chain, "-p", "udp", "-m", "udp", "--sport", str(PORT), "-j", "NFQUEUE",
                   "--queue-num", str(QUEUE_OUT), "--queue-bypass"])
        run(ipt + ["-A", "OUTPUT", "-p", "udp", "-m", "udp", "--sport", str(PORT), "-j", chain])
        return self.start(nsx(self.gw) + self.cpu("other") + [str(VENV_PY), "-c", ACCEPT_ONLY,
                                                              str(QUEUE_OUT), str(QUEUE_MAXLEN)],
                          "accept-only", ready=True)

    def acceptonly_stop(self, p: subprocess.Popen) -> None:
        self.stop(p)
        chain = f"{CHAIN_PREFIX}-AO"
        ipt = nsx(self.gw) + ["iptables-legacy", "-w", "-t", "mangle"]
        run(ipt + ["-D", "OUTPUT", "-p", "udp", "-m", "udp", "--sport", str(PORT), "-j", chain], check=False)
        run(ipt + ["-F", chain], check=False)
        run(ipt + ["-X", chain], check=False)

    def daemon_start(self, fastpath: str) -> Daemon:
        assert self.tmp is not None
        self._daemons += 1
        d = self.tmp / f"daemon{self._daemons}"
        d.mkdir()
        cfg = d / "bench.toml"
        cfg.write_text(f"queue_maxlen = {QUEUE_MAXLEN}\n\n[engine]\nmax_tunnels = 200000\n"
                       "max_tunnels_per_mark = 200000\n")
        sock = d / "ctl" / "control.sock"
        log = d / "daemon.log"
        argv = [str(MARKER), "run", "--inbound-match", "none", "--chain-prefix", CHAIN_PREFIX,
                "--state-file", str(d / "state.json"), "--control-socket", str(sock),
                "--queue-in", str(QUEUE_IN), "--queue-out", str(QUEUE_OUT), "--config", str(cfg)]
        if self.args.fastpath_flag:
            argv[2:2] = ["--fastpath", fastpath]
        with open(log, "w") as logf:
            p = self.start(nsx(self.gw) + self.cpu("other") + argv, f"daemon (fastpath {fastpath})",
                           stderr=logf)
        daemon = Daemon(p, fastpath, sock, log)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if p.poll() is not None:
                raise BenchError(f"the daemon exited ({p.returncode}) at start; its log:\n"
                                 + log.read_text()[-3000:])
            try:
                self.status(daemon)
                return daemon
            except (OSError, ValueError, BenchError):
                time.sleep(0.1)
        raise BenchError("the daemon did not answer on its control socket within 60 s")

    def status(self, daemon: Daemon, timeout: float = 60, *, all_tunnels: bool = False) -> dict:
        """The daemon's status; without ``all_tunnels`` it lists no tunnels (``limit`` 0: cheap for
        the daemon; ``tunnels_total`` still counts them)."""
        req = {"cmd": "status", "limit": None if all_tunnels else 0}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(daemon.socket))
            s.sendall(json.dumps(req).encode() + b"\n")
            chunks = []
            while True:
                b = s.recv(1 << 20)
                if not b:
                    break
                chunks.append(b)
                if b.endswith(b"\n"):
                    break
        st = json.loads(b"".join(chunks))
        if "error" in st:
            raise BenchError(f"daemon status: {st['error']}")
        return st

    def daemon_stop(self, daemon: Daemon) -> None:
        self.stop(daemon.proc, timeout=20)
        if daemon.proc.returncode not in (0, -signal.SIGTERM):
            self.notes.append(f"daemon (fastpath {daemon.fastpath}) exited with {daemon.proc.returncode}: "
                              + daemon.log.read_text()[-500:])

    def bound_tunnels(self, daemon: Daemon) -> tuple[int, dict | None]:
        """(tunnels with the LNS's tunnel ID known, the fastpath status object)."""
        st = self.status(daemon, all_tunnels=True)
        listed = st.get("tunnels", [])
        bound = sum(1 for t in listed if t.get("gateway_tid") is not None)
        fp = st.get("fastpath")
        if st.get("tunnels_total", len(listed)) > len(listed) and fp and fp.get("mode") == "kernel":
            bound = int(fp.get("in_entries", 0))  # the list was cut short
        return bound, fp

    def setup_tunnels(self, addrs: tuple[str, ...], first: int, count: int, rate: float,
                      linger: float = 0.3) -> tuple[dict, dict, Path, Path]:
        """SCCRQ from every client address for tunnel IDs first..first+count-1, answered by the fake
        LNS; returns (sender result, LNS result, SCCRQ times file, SCCRP times file)."""
        assert self.tmp is not None
        n = len(list(self.tmp.glob("sccrq*.txt")))
        qf, pf = self.tmp / f"sccrq{n}.txt", self.tmp / f"sccrp{n}.txt"
        lns = self.start(self.loadgen(self.gw, "sender", "lns", "--bind", GW, "--times", str(pf)),
                         "fake LNS", ready=True)
        try:
            snd = self.start(self.loadgen(self.cl, "sender", "sccrq", "--src", ",".join(addrs), "--dst", GW,
                                          "--first-tid", str(first), "--count", str(count),
                                          "--rate", str(rate), "--times", str(qf), "--linger", str(linger)),
                             "SCCRQ sender")
            sres = self.wait_json(snd, count * len(addrs) / max(rate, 100) + 120)
        finally:
            lres = self.stop_json(lns)
        return sres, lres, qf, pf

    def daemon_with_tunnels(self, fastpath: str, tunnels: int) -> Daemon:
        daemon = self.daemon_start(fastpath)
        try:
            self.setup_tunnels((CLIENTS[0],), 1, tunnels, rate=self.args.setup_rate)
            end = time.monotonic() + 30
            while True:
                bound, fp = self.bound_tunnels(daemon)
                ok = bound >= tunnels and (fastpath != "on" or fp is None
                                           or fp.get("out_entries", 0) >= tunnels)
                if ok:
                    break
                if time.monotonic() > end:
                    raise BenchError(f"daemon (fastpath {fastpath}): only {bound} of {tunnels} tunnels bound "
                                     f"(fastpath: {fp}); its log:\n{daemon.log.read_text()[-2000:]}")
                time.sleep(0.2)
            if fastpath == "on" and fp is not None and fp.get("mode") != "kernel":
                self.notes.append(f"daemon --fastpath on reports fastpath mode {fp.get('mode')!r}, not 'kernel'")
            if fastpath == "on" and fp is None:
                self.notes.append("daemon --fastpath on: status has no 'fastpath' object")
            return daemon
        except BaseException:
            self.daemon_stop(daemon)
            raise

    def run_mode(self, mode: str, rnd: int, cells: list[tuple[int, int]], results: list[Cell]) -> None:
        max_t = max(t for _s, t in cells)
        self.main_route(via_sa=mode not in MARKING_MODES)
        cleanup = None
        watch = None
        daemon = None
        try:
            if mode in ("kmap", "kmapbit"):
                cleanup = self.kmap_remove
                self.kmap_install(max_t, FP_BIT if mode == "kmapbit" else 0)
            elif mode in DAEMON_MODES:
                daemon = self.daemon_with_tunnels("on" if mode == "fastpath" else "off", max_t)
                watch = daemon.pid
                d = daemon
                cleanup = lambda: self.daemon_stop(d)  # noqa: E731
            elif mode == "acceptonly":
                ao = self.acceptonly_start()
                watch = ao.pid
                cleanup = lambda: self.acceptonly_stop(ao)  # noqa: E731
            for size, tunnels in cells:
                c = self.measure(mode, size, tunnels, rnd, watch, daemon)
                results.append(c)
                flag = "" if not c.misrouted else f"  MISROUTED {c.misrouted}"
                if c.kernel_marked is not None:
                    flag += f"  kernel-marked {c.kernel_marked}, daemon judged {c.daemon_judged_out}"
                lat = f"{c.lat_p50_us:8.1f} {c.lat_p99_us:8.1f} us" if c.lat_p50_us is not None else ""
                cpu = f"cpu {c.cpu_pct:5.1f}%" if c.cpu_pct is not None else ""
                print(f"  r{rnd} {mode:10} size {size:4} tunnels {tunnels:5}: {c.pps:11.0f} pps "
                      f"(sent {c.sent_pps:11.0f}) {lat} {cpu}{flag}", flush=True)
        finally:
            if cleanup is not None:
                cleanup()
            self.main_route(via_sa=False)

    # ---------------------------------------------------------------- control plane
    def control_plane(self, fastpath: str, rnd: int) -> dict:
        a = self.args
        addrs = CLIENTS[:2]
        daemon = self.daemon_start(fastpath)
        mon = NlMonitor(self) if fastpath == "on" and a.fastpath_flag else None
        res: dict = {"round": rnd, "fastpath": fastpath}
        try:
            # 1. burst: as fast as the sender can
            b_first, b_count = 1, a.burst_tunnels // len(addrs)
            sres, lres, qf, pf = self.setup_tunnels(addrs, b_first, b_count, rate=0, linger=1.0)
            self._wait_settled(daemon, mon, lres["answered"])
            res["burst"] = self._setup_figures(daemon, mon, sres, lres, qf, pf, b_first, b_count)
            # 2. paced: latency at a rate the daemon should keep up with
            if mon is not None:
                mon.clear()
            p_first, p_count = b_first + b_count, max(1, int(a.paced_rate * a.paced_seconds) // len(addrs))
            sres, lres, qf, pf = self.setup_tunnels(addrs, p_first, p_count, rate=a.paced_rate, linger=1.0)
            self._wait_settled(daemon, mon, lres["answered"])
            res["paced"] = self._setup_figures(daemon, mon, sres, lres, qf, pf, p_first, p_count)
            res["paced"]["offered_rate"] = a.paced_rate
            # 3. sustained: the target rate for a while (does the daemon keep up?)
            if a.sustained_rate > 0:
                if mon is not None:
                    mon.clear()
                s_first = p_first + p_count
                s_count = max(1, int(a.sustained_rate * a.sustained_seconds) // len(addrs))
                sres, lres, qf, pf = self.setup_tunnels(addrs, s_first, s_count, rate=a.sustained_rate,
                                                        linger=1.0)
                self._wait_settled(daemon, mon, lres["answered"])
                res["sustained"] = self._setup_figures(daemon, mon, sres, lres, qf, pf, s_first, s_count)
                res["sustained"]["offered_rate"] = a.sustained_rate
            res["nl_lost"] = mon.lost if mon else 0
        finally:
            if mon is not None:
                mon.stop()
            self.daemon_stop(daemon)
        return res

    def _wait_settled(self, daemon: Daemon, mon: NlMonitor | None, expect: int, idle: float = 1.0,
                      timeout: float = 60) -> None:
        """Until ``expect`` in_known elements were added (or nothing new for ``idle`` s)."""
        end = time.monotonic() + timeout
        if mon is None:
            time.sleep(idle)
            return
        last, last_change = -1, time.monotonic()
        while time.monotonic() < end:
            n = mon.count("in_known")
            if n >= expect:
                return
            if n != last:
                last, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > idle:
                return
            time.sleep(0.05)

    def _setup_figures(self, daemon: Daemon, mon: NlMonitor | None, sres: dict, lres: dict,
                       qf: Path, pf: Path, first: int, count: int) -> dict:
        sccrq_t: dict[tuple[str, int], int] = {}   # (addr, client tid) -> SCCRQ send time
        reply_t: dict[tuple[str, int], int] = {}   # (addr, client tid) -> SCCRP arrival at the client
        for line in qf.read_text().split("\n"):
            if line:
                addr, tid, ns, rep = line.split()
                sccrq_t[(addr, int(tid))] = int(ns)
                if int(rep):
                    reply_t[(addr, int(tid))] = int(rep)
        sccrp_t: dict[tuple[str, int], int] = {}   # (addr, gateway tid) -> SCCRP send time
        sccrp_c: dict[tuple[str, int], int] = {}   # (addr, client tid) -> SCCRP send time
        for line in pf.read_text().split("\n"):
            if line:
                addr, ctid, gtid, ns = line.split()
                sccrp_t[(addr, int(gtid))] = int(ns)
                sccrp_c[(addr, int(ctid))] = int(ns)
        out = {"offered": sres["sent"], "send_errors": sres["errors"], "send_seconds": sres["elapsed"],
               "answered_by_lns": lres["answered"], "sccrp_at_client": len(reply_t)}
        first_send = min(sccrq_t.values()) if sccrq_t else None
        if reply_t and first_send is not None:
            span = (max(reply_t.values()) - first_send) / 1e9
            out["client_span_seconds"] = span
            out["client_setups_per_s"] = len(reply_t) / span if span > 0 else None
            rtt = [(reply_t[k] - sccrq_t[k]) / 1e6 for k in reply_t]
            out["sccrq_to_sccrp_ms"] = {"n": len(rtt), "p50": pct(rtt, 50), "p99": pct(rtt, 99)}
        if mon is None:
            out["completed"] = len(reply_t)
            out["completed_by"] = "SCCRPs that reached the client (no kernel entries to watch)"
            out["setups_per_s"] = out.get("client_setups_per_s")
            return out
        live_in, live_out = [], []
        matched_in: dict[tuple[str, int], int] = {}
        table = self.nft_table()
        for ev in mon.snapshot():
            if ev.op != "add" or ev.table != table:
                continue
            at = ev.addr_tid()
            if at is None:
                continue
            if ev.set == "in_known":
                t_sent = sccrp_t.get(at)
                if t_sent is None:
                    t_sent = sccrp_c.get(at)
                if t_sent is not None and at not in matched_in:
                    matched_in[at] = ev.t_ns
                    live_in.append((ev.t_ns - t_sent) / 1e6)
            elif ev.set == "out_marks":
                t_sent = sccrq_t.get(at)
                if t_sent is not None:
                    live_out.append((ev.t_ns - t_sent) / 1e6)
        completed = len(matched_in)
        out["completed"] = completed
        out["completed_by"] = "in_known elements added (nftables events) matched to the SCCRPs"
        if completed and first_send is not None:
            span = (max(matched_in.values()) - first_send) / 1e9
            out["span_seconds"] = span
            out["setups_per_s"] = completed / span if span > 0 else None
        out["sccrp_to_live_ms"] = {"n": len(live_in), "p50": pct(live_in, 50), "p99": pct(live_in, 99),
                                   "max": max(live_in) if live_in else None}
        out["sccrq_to_out_entry_ms"] = {"n": len(live_out), "p50": pct(live_out, 50),
                                        "p99": pct(live_out, 99)}
        out["in_known_events_unmatched"] = mon.count("in_known") - completed
        return out


    def nft_table(self) -> str:
        return CHAIN_PREFIX.lower().replace("-", "_")

    # ---------------------------------------------------------------- memory
    def memory(self) -> dict:
        """VmRSS of a daemon that learnt ``--rss-tunnels`` tunnels from real SCCRQ/SCCRP (two client
        addresses: the engine allows 65535 tunnel IDs per address). Completion is judged from the
        SCCRPs that reached the client, not from `status`, whose answer (every tunnel, as JSON)
        would itself raise the daemon's memory; `status` is asked once, after the reading."""
        a = self.args
        fastpath = "on" if a.fastpath_flag else "off"
        daemon = self.daemon_start(fastpath)
        try:
            time.sleep(0.5)
            rss0 = rss_kb(daemon.pid)
            per_addr = -(-a.rss_tunnels // len(CLIENTS))
            t0 = time.monotonic()
            sres, lres, _qf, _pf = self.setup_tunnels(CLIENTS, 1, per_addr, rate=a.rss_rate, linger=2.0)
            setup_s = time.monotonic() - t0
            time.sleep(2.0)  # let pending state saves finish
            rss1 = rss_kb(daemon.pid)
            st = self.status(daemon)  # no tunnel list
            fp = st.get("fastpath")
            total = int(st.get("tunnels_total", -1))
            bound, _fp = self.bound_tunnels(daemon)  # every tunnel listed (or as many as it lists)
            rss2 = rss_kb(daemon.pid)
            kernel = None
            if fp is not None:
                kernel = {k: fp.get(k) for k in ("mode", "out_entries", "in_entries")}
            return {"fastpath": fastpath, "tunnels_offered": sres["sent"], "answered_by_lns": lres["answered"],
                    "sccrp_at_client": sres["sccrp_received"], "tunnels_bound": bound,
                    "tunnels_in_table": total,
                    "rss_start_kb": rss0, "rss_kb": rss1, "rss_after_status_kb": rss2,
                    "setup_seconds": setup_s, "offered_rate": a.rss_rate, "kernel": kernel}
        finally:
            self.daemon_stop(daemon)


# ---------------------------------------------------------------------------------------------
# sweeping what a killed run left

def sweep_stale() -> list[str]:
    """Namespaces of bench runs whose process is gone (killed with SIGKILL): processes in them are
    killed by PID, then the namespaces deleted."""
    done = []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NS_RE.match(name)
        if not m or Path(f"/proc/{m[1]}").exists():
            continue
        for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        done.append(name)
    return done


# ---------------------------------------------------------------------------------------------
# analysis and report

def analyse(cells: list[Cell], modes: list[str], sizes: list[int], tunnels: list[int]) -> list[dict]:
    by: dict[tuple[str, int, int], list[Cell]] = {}
    for c in cells:
        by.setdefault((c.mode, c.size, c.tunnels), []).append(c)

    def ratio(mode: str, base: str, size: int, t: int) -> float | None:
        """Median over rounds of the ratio taken within each round."""
        if base not in modes or mode == base:
            return 1.0 if mode == base else None
        mine = {c.round: c.pps for c in by.get((mode, size, t), [])}
        theirs = {c.round: c.pps for c in by.get((base, size, t), [])}
        rs = [mine[r] / theirs[r] for r in mine if r in theirs and theirs[r] > 0]
        return med(rs)

    rows = []
    for size in sizes:
        for mode in modes:
            for t in tunnels:
                cs = by.get((mode, size, t), [])
                if not cs:
                    continue
                base = by.get(("none", size, t), [])
                lat50 = med(c.lat_p50_us for c in cs)
                lat99 = med(c.lat_p99_us for c in cs)
                b50 = med(c.lat_p50_us for c in base)
                b99 = med(c.lat_p99_us for c in base)
                cpus = [c.cpu_pct for c in cs if c.cpu_pct is not None]
                rows.append({
                    "mode": mode, "size": size, "tunnels": t, "rounds": len(cs),
                    "pps_min": min(c.pps for c in cs), "pps_median": med(c.pps for c in cs),
                    "sent_pps_median": med(c.sent_pps for c in cs),
                    "vs_none": ratio(mode, "none", size, t), "vs_kmap": ratio(mode, "kmap", size, t),
                    "vs_acceptonly": ratio(mode, "acceptonly", size, t),
                    "lat_p50_us": lat50, "lat_p99_us": lat99,
                    "added_p50_us": (lat50 - b50) if lat50 is not None and b50 is not None else None,
                    "added_p99_us": (lat99 - b99) if lat99 is not None and b99 is not None else None,
                    "cpu_pct": med(cpus) if cpus else None,
                    "misrouted": sum(c.misrouted for c in cs), "rx_drops": sum(c.rx_drops for c in cs),
                    "queue_drops": sum(c.queue_drops for c in cs),
                    "send_errors": sum(c.send_errors for c in cs),
                    "kernel_marked": sum(c.kernel_marked for c in cs) if cs[0].kernel_marked is not None else None,
                    "daemon_judged_out": (sum(c.daemon_judged_out for c in cs)
                                          if cs[0].daemon_judged_out is not None else None),
                    "sent": sum(c.sent for c in cs), "received": sum(c.received for c in cs),
                })
    return rows


def fmt(v, spec: str = ".0f", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and v != v:  # NaN
        return none
    return format(v, spec)


def kpps(v) -> str:
    return "-" if v is None else f"{v / 1000:.1f}k"


def report_tables(rows: list[dict], sizes: list[int]) -> list[str]:
    out = []
    for size in sizes:
        out.append(f"\n### {size}-byte L2TP data packets\n")
        out.append("| mode | tunnels | pps min | pps median | × no rules | × kernel map | × accept-only "
                   "| p50 µs | p99 µs | added p50 µs | added p99 µs | CPU % | misrouted |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["size"] != size:
                continue
            out.append(
                f"| {MODE_LABEL[r['mode']]} | {r['tunnels']} | {kpps(r['pps_min'])} | {kpps(r['pps_median'])} "
                f"| {fmt(r['vs_none'], '.3f')} | {fmt(r['vs_kmap'], '.3f')} | {fmt(r['vs_acceptonly'], '.3f')} "
                f"| {fmt(r['lat_p50_us'], '.1f')} | {fmt(r['lat_p99_us'], '.1f')} "
                f"| {fmt(r['added_p50_us'], '+.1f')} | {fmt(r['added_p99_us'], '+.1f')} "
                f"| {fmt(r['cpu_pct'], '.0f')} | {r['misrouted']} |")
    return out


def verification_lines(rows: list[dict]) -> list[str]:
    """Per mode, over all its throughput measurements: sent, received, misrouted, and for the
    daemon the packets its kernel fast path marked and those it judged in userspace."""
    out = ["### Where the packets went (throughput phases, all rounds, sizes and tunnel counts)", "",
           "| mode | sent | received by the client | dropped at the client's socket | misrouted (dead end) "
           "| NFQUEUE drops | marked by the kernel fast path | judged by the daemon (outbound) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ALL_MODES:
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        km = [r["kernel_marked"] for r in rs if r["kernel_marked"] is not None]
        dj = [r["daemon_judged_out"] for r in rs if r["daemon_judged_out"] is not None]
        out.append(f"| {MODE_LABEL[mode]} | {sum(r['sent'] for r in rs)} | {sum(r['received'] for r in rs)} "
                   f"| {sum(r['rx_drops'] for r in rs)} | {sum(r['misrouted'] for r in rs)} | {sum(r['queue_drops'] for r in rs)} "
                   f"| {sum(km) if km else '-'} | {sum(dj) if dj else '-'} |")
    return out + ["", "A packet dropped at the client's socket means the receiver fell behind for a moment "
                  "(usually when other work took its CPU); the pps of that measurement is then the "
                  "receiver's, not the path's.", ""]


def targets(rows: list[dict], control: list[dict], mem: dict | None, modes: list[str]) -> list[str]:
    out = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("meets" if ok else "**misses**")

    if "fastpath" in modes and "kmap" in modes:
        rs = [r for r in rows if r["mode"] == "fastpath" and r["vs_kmap"] is not None]
        if rs:
            lo = min(rs, key=lambda r: r["vs_kmap"])
            out.append(f"| fast path ≥ {T_FASTPATH_VS_KMAP} × kernel-only map, 1..1000 tunnels | lowest "
                       f"{lo['vs_kmap']:.3f} ({lo['size']} B, {lo['tunnels']} tunnels); range "
                       f"{min(r['vs_kmap'] for r in rs):.3f}..{max(r['vs_kmap'] for r in rs):.3f} "
                       f"| {verdict(lo['vs_kmap'] >= T_FASTPATH_VS_KMAP)} |")
    if "userspace" in modes and "acceptonly" in modes:
        rs = [r for r in rows if r["mode"] == "userspace" and r["vs_acceptonly"] is not None]
        if rs:
            lo = min(rs, key=lambda r: r["vs_acceptonly"])
            out.append(f"| per-packet path ≥ {T_USERSPACE_VS_ACCEPT} × accept-only | lowest "
                       f"{lo['vs_acceptonly']:.3f} ({lo['size']} B, {lo['tunnels']} tunnels); range "
                       f"{min(r['vs_acceptonly'] for r in rs):.3f}..{max(r['vs_acceptonly'] for r in rs):.3f} "
                       f"| {verdict(lo['vs_acceptonly'] >= T_USERSPACE_VS_ACCEPT)} |")
    on = [c for c in control if c["fastpath"] == "on"]
    if on:
        rates = [c["burst"].get("setups_per_s") for c in on if c["burst"].get("setups_per_s")]
        if rates:
            out.append(f"| ≥ {T_SETUPS_PER_S} tunnel setups/s | median {med(rates):.0f}/s (min {min(rates):.0f}) "
                       f"| {verdict(med(rates) >= T_SETUPS_PER_S)} |")
        sus = [c["sustained"] for c in on if c.get("sustained")]
        if sus:
            done = [f["completed"] / f["offered"] if f["offered"] else 0 for f in sus]
            rates = [f.get("setups_per_s") or 0 for f in sus]
            out.append(f"| … sustained: {sus[0]['offered_rate']:.0f} SCCRQs/s offered | completed "
                       f"{min(done) * 100:.1f}–{max(done) * 100:.1f} % of them, at {med(rates):.0f}/s (median); "
                       f"SCCRP→live p99 {fmt(med(f.get('sccrp_to_live_ms', {}).get('p99') for f in sus), '.1f')} ms "
                       f"| {verdict(min(done) >= 0.999 and sus[0]['offered_rate'] >= T_SETUPS_PER_S)} |")
        p99 = [c["paced"]["sccrp_to_live_ms"]["p99"] for c in on
               if c["paced"].get("sccrp_to_live_ms", {}).get("p99") is not None]
        if p99:
            out.append(f"| SCCRP → kernel entry live p99 ≤ {T_SCCRP_LIVE_P99_MS} ms (paced) | median over rounds "
                       f"{med(p99):.2f} ms (max {max(p99):.2f}) | {verdict(med(p99) <= T_SCCRP_LIVE_P99_MS)} |")
    if mem and mem.get("rss_kb"):
        mb = mem["rss_kb"] / 1024
        out.append(f"| ≤ {T_RSS_MB:.0f} MB resident with 100,000 tunnels | {mb:.1f} MiB with "
                   f"{mem['tunnels_bound']} tunnels | "
                   f"{verdict(mb <= T_RSS_MB) if mem['tunnels_bound'] >= 100000 else 'n/a (fewer tunnels)'} |")
    if out:
        out = ["| target | measured | |", "|---|---|---|"] + out
    return out


def control_lines(control: list[dict]) -> list[str]:
    if not control:
        return []
    out = ["| round | fast path | phase | SCCRQs sent | answered by LNS | SCCRPs at client | completed "
           "| setups/s | SCCRQ→SCCRP p50 / p99 ms | SCCRP→live p50 / p99 / max ms | SCCRQ→out entry p50 ms |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in control:
        for phase in ("burst", "paced", "sustained"):
            f = c.get(phase)
            if not f:
                continue
            lat = f.get("sccrp_to_live_ms", {})
            lo = f.get("sccrq_to_out_entry_ms", {})
            rtt = f.get("sccrq_to_sccrp_ms", {})
            name = phase if phase == "burst" else f"{phase} {f.get('offered_rate', 0):.0f}/s"
            out.append(f"| {c['round']} | {c['fastpath']} | {name} | {f['offered']} | {f['answered_by_lns']} "
                       f"| {f['sccrp_at_client']} | {f.get('completed', '-')} | {fmt(f.get('setups_per_s'))} "
                       f"| {fmt(rtt.get('p50'), '.2f')} / {fmt(rtt.get('p99'), '.2f')} "
                       f"| {fmt(lat.get('p50'), '.2f')} / {fmt(lat.get('p99'), '.2f')} / {fmt(lat.get('max'), '.2f')} "
                       f"| {fmt(lo.get('p50'), '.2f')} |")
    return out


def write_markdown(path: Path, info: dict, args: argparse.Namespace, command: str, rows: list[dict],
                   control: list[dict], mem: dict | None, notes: list[str], elapsed: float) -> None:
    lines = ["# Fast-path benchmark results", "",
             "Written by `bench/fastpath_bench.py` (see bench/README.md for what each figure means). "
             "Throughput and latency figures are only comparable **within this run**: compare the "
             "ratios, not the packets per second of another machine or another day.", "",
             "```", command, "```", "",
             f"* date: {info['date']}, run took {elapsed / 60:.1f} min",
             f"* machine: {info['cpu']}, {info['cpus']} CPUs, {info['memory']}; {info['os']}, "
             f"kernel {info['kernel']}; {info['nft']}; Python {info['python']}",
             f"* code: git {info['git']}",
             f"* load: load average {' '.join(info['loadavg_start'])} at the start, "
             f"{' '.join(info['loadavg_end'])} at the end; busiest CPU with other work just before each "
             f"mode (0.5 s sample, round:mode=%): " + ", ".join(
                 f"{b['round']}:{b['mode']}={max(b['busy']):.0f}" for b in info["background_busy"]),
             f"* rounds: {args.rounds} (mode order shuffled per round, seed {args.seed}); "
             f"{args.duration} s of traffic per measurement; latency from {args.probe_rate:.0f} probes/s "
             f"for {args.probe_duration} s; CPU pinning: "
             + ("sender on CPU 0, receiver/daemon/accept-only program on CPU 1" if not args.no_pin
                and (os.cpu_count() or 1) >= 2 else "none"),
             "* pps = packets/s received by the client over the SA link (min and median over rounds); "
             "× columns = median over rounds of the ratio measured within the round; latency = one-way, "
             "sender to receiving socket, median over rounds of each round's p50/p99; added = minus "
             "'no rules'; CPU % = utime+stime of the daemon (or the accept-only program) over the "
             "measurement, % of one core; misrouted = packets that left unmarked into the dead end "
             "(summed over rounds).",
             "* 'no rules' and 'accept-only' do not mark, so there the main table routes over the SA "
             "link itself; in the other modes the main table leads into a dead end and only marked "
             "packets arrive.", ""]
    t = targets(rows, control, mem, args.modes)
    if t:
        lines += ["## Targets (issue #5)", ""] + t + [""]
    lines += ["## Data plane"] + report_tables(rows, args.sizes) + [""]
    lines += verification_lines(rows)
    if control:
        lines += ["## Control plane", "",
                  "A fresh daemon per round; the client sends SCCRQs for distinct tunnels (two client "
                  "addresses), 'burst' as fast as the sender can, 'paced' at a low rate, 'sustained' at the "
                  "target rate; the fake LNS answers each with an SCCRP. In the burst, what overflows a "
                  "queue is lost: SCCRQs at the inbound queue (sent − answered by LNS), SCCRPs at the "
                  "outbound queue (answered − SCCRPs at client). Completed = in_known elements that appeared (nftables "
                  "netlink events in the gateway namespace, CLOCK_MONOTONIC); setups/s = completed / "
                  "(last in_known event − first SCCRQ sent). SCCRP→live = in_known event − the LNS's "
                  "send time of that tunnel's SCCRP.", ""] + control_lines(control) + [""]
    if mem:
        lines += ["## Memory", ""]
        lines.append(f"Daemon (fast path {mem['fastpath']}) VmRSS: {mem['rss_start_kb'] / 1024:.1f} MiB at "
                     f"start, **{mem['rss_kb'] / 1024:.1f} MiB with {mem['tunnels_bound']} tunnels** bound "
                     f"({mem['tunnels_offered']} SCCRQs offered at {mem['offered_rate']:.0f}/s over two client "
                     f"addresses, {mem['sccrp_at_client']} SCCRPs back at the client, set up in "
                     f"{mem['setup_seconds']:.0f} s; {mem['tunnels_in_table']} tunnels in the daemon's table); "
                     f"{mem['rss_after_status_kb'] / 1024:.1f} MiB after a `status` request that lists every "
                     f"tunnel; kernel: {mem.get('kernel')}.")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="3 short rounds, small packets only, tunnel counts 1 and 1000, smaller control "
                        "plane and memory phases (about 1 minute)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; at least 3 recommended)")
    p.add_argument("--duration", type=float, default=None, help="seconds of traffic per measurement (default 2)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma list of {', '.join(ALL_MODES)} (default: all but the diagnostic kmapbit)")
    p.add_argument("--tunnels", default=None, help="comma list of tunnel counts (default 1,10,100,1000)")
    p.add_argument("--sizes", default=None, help="comma list of L2TP message sizes in octets (default 50,1400)")
    p.add_argument("--probe-rate", type=float, default=2000, help="latency probes per second (default 2000)")
    p.add_argument("--probe-duration", type=float, default=None, help="seconds of probes per measurement "
                   "(default 0.5; 0 = no latency)")
    p.add_argument("--setup-rate", type=float, default=2000,
                   help="SCCRQs/s when the data-plane daemon modes set up their tunnels (default 2000)")
    p.add_argument("--no-control", action="store_true", help="skip the control-plane phase")
    p.add_argument("--burst-tunnels", type=int, default=None,
                   help="SCCRQs sent back to back per control-plane round (default 20000)")
    p.add_argument("--paced-rate", type=float, default=None, help="SCCRQs/s of the paced phase (default 1000)")
    p.add_argument("--paced-seconds", type=float, default=None, help="length of the paced phase (default 2)")
    p.add_argument("--sustained-rate", type=float, default=None,
                   help=f"SCCRQs/s of the sustained phase (default {T_SETUPS_PER_S}, the target; 0 = skip)")
    p.add_argument("--sustained-seconds", type=float, default=None,
                   help="length of the sustained phase (default 2)")
    p.add_argument("--rss-tunnels", type=int, default=None,
                   help="tunnels for the memory figure (default 100000; 0 = skip)")
    p.add_argument("--rss-rate", type=float, default=None, help="SCCRQs/s for the memory phase (default 3000)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each round, wait up to this long for the CPUs to be < 15%% busy with "
                        "other work (default 0: do not wait)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the sender and the rest to CPUs 0 and 1")
    p.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random, printed)")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="markdown output (default bench/RESULTS.md)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    p.add_argument("--nlmon", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or 3
    a.duration = a.duration if a.duration is not None else (0.5 if q else 2.0)
    a.probe_duration = a.probe_duration if a.probe_duration is not None else (0.25 if q else 0.5)
    a.tunnels = [int(x) for x in (a.tunnels or ("1,1000" if q else "1,10,100,1000")).split(",")]
    a.sizes = [int(x) for x in (a.sizes or ("50" if q else "50,1400")).split(",")]
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in ALL_MODES]
    if bad:
        p.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(ALL_MODES)}")
    a.burst_tunnels = a.burst_tunnels if a.burst_tunnels is not None else (4000 if q else 20000)
    a.paced_rate = a.paced_rate if a.paced_rate is not None else 1000.0
    a.paced_seconds = a.paced_seconds if a.paced_seconds is not None else (1.0 if q else 2.0)
    a.sustained_rate = a.sustained_rate if a.sustained_rate is not None else float(T_SETUPS_PER_S)
    a.sustained_seconds = a.sustained_seconds if a.sustained_seconds is not None else (1.0 if q else 2.0)
    a.rss_tunnels = a.rss_tunnels if a.rss_tunnels is not None else (10000 if q else 100000)
    a.rss_rate = a.rss_rate if a.rss_rate is not None else 3000.0
    if a.seed is None:
        a.seed = random.randrange(1 << 30)
    if max(a.tunnels) > 65535 or min(a.tunnels) < 1:
        p.error("tunnel counts must be 1..65535")
    if (a.burst_tunnels + a.paced_rate * a.paced_seconds + a.sustained_rate * a.sustained_seconds) \
            // len(CLIENTS) > 65000:
        p.error("burst + paced + sustained tunnels exceed the 65535 tunnel IDs per client address")
    if -(-a.rss_tunnels // len(CLIENTS)) > 65535:
        p.error(f"--rss-tunnels: at most {65535 * len(CLIENTS)}")
    if any(s < 24 or s > 1472 for s in a.sizes):
        p.error("sizes must be 24..1472 octets (one unfragmented IPv4 packet)")
    return a


def main(argv: list[str] | None = None) -> int:
    if argv is None and "--nlmon" in sys.argv[1:]:
        return nlmon_main()
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("fastpath_bench: needs root (network namespaces, netfilter)", file=sys.stderr)
        return 2
    for tool in ("ip", "iptables-legacy", "nft", "taskset"):
        if shutil.which(tool) is None:
            print(f"fastpath_bench: {tool} is not installed (scripts/install-deps.sh)", file=sys.stderr)
            return 2
    try:
        compile_loadgen()
        check_packets()
    except BenchError as exc:
        print(f"fastpath_bench: {exc}", file=sys.stderr)
        return 2
    args.fastpath_flag = fastpath_supported()
    notes: list[str] = []
    modes = list(args.modes)
    if not args.fastpath_flag:
        if "fastpath" in modes:
            modes.remove("fastpath")
            notes.append("`l2tp-marker run` has no --fastpath option in this version: mode 'fastpath' "
                         "skipped, 'userspace' ran the daemon without the option (every packet queued)")
    if any(m in modes for m in DAEMON_MODES) and not MARKER.exists():
        print(f"fastpath_bench: {MARKER} missing (scripts/install-deps.sh)", file=sys.stderr)
        return 2
    args.modes = modes
    command = "sudo " + shlex.join([".venv/bin/python", "bench/fastpath_bench.py", *(argv or sys.argv[1:])])
    swept = sweep_stale()
    if swept:
        print(f"removed namespaces of a dead bench run: {', '.join(swept)}")

    bench = Bench(args)
    bench.notes = notes
    stop_signal = {"n": 0}

    def on_term(signum, _frame):
        stop_signal["n"] += 1
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    cells: list[Cell] = []
    background: list[dict] = []
    control: list[dict] = []
    mem = None
    rc = 0
    rng = random.Random(args.seed)
    info = machine_info()
    try:
        bench.setup()
        print(f"bench {bench.gw}/{bench.cl}: modes {', '.join(modes)}; sizes {args.sizes}; tunnels "
              f"{args.tunnels}; {args.rounds} rounds x {args.duration} s; seed {args.seed}", flush=True)
        for rnd in range(1, args.rounds + 1):
            order = modes[:]
            rng.shuffle(order)
            print(f"round {rnd}: {' '.join(order)}", flush=True)
            for mode in order:
                busy = cpu_busy()
                waited = 0.0
                while args.wait_idle > waited and max(busy) > 15:
                    time.sleep(2.0)
                    waited += 2.5
                    busy = cpu_busy()
                background.append({"round": rnd, "mode": mode, "busy": busy, "waited": waited})
                print(f" {mode}: CPUs busy with other work just before: {', '.join(f'{b:.0f}%' for b in busy)}"
                      + (f" (after waiting {waited:.0f} s)" if waited else ""), flush=True)
                cl = [(s, t) for s in args.sizes for t in args.tunnels]
                rng.shuffle(cl)
                bench.run_mode(mode, rnd, cl, cells)
        if not args.no_control and any(m in modes for m in DAEMON_MODES):
            fp = "on" if args.fastpath_flag and "fastpath" in modes else "off"
            for rnd in range(1, args.rounds + 1):
                c = bench.control_plane(fp, rnd)
                control.append(c)
                b, pc = c["burst"], c["paced"]
                lat = pc.get("sccrp_to_live_ms", {})
                print(f"control r{rnd} (fastpath {fp}): burst {b['offered']} offered, {b.get('completed')} completed, "
                      f"{fmt(b.get('setups_per_s'))} setups/s; paced {pc['offered']} at {args.paced_rate:.0f}/s: "
                      f"{pc.get('completed')} completed, SCCRP->live p50 {fmt(lat.get('p50'), '.2f')} ms "
                      f"p99 {fmt(lat.get('p99'), '.2f')} ms"
                      + (f"; sustained {c['sustained']['offered']} at {args.sustained_rate:.0f}/s: "
                         f"{c['sustained'].get('completed')} completed" if c.get("sustained") else ""), flush=True)
        if args.rss_tunnels > 0 and any(m in modes for m in DAEMON_MODES):
            mem = bench.memory()
            print(f"memory: {mem['rss_kb'] / 1024:.1f} MiB VmRSS with {mem['tunnels_bound']} tunnels "
                  f"(start {mem['rss_start_kb'] / 1024:.1f} MiB)", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        rc = 130
    except BenchError as exc:
        print(f"fastpath_bench: {exc}", file=sys.stderr)
        rc = 1
    finally:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = bench.cleanup()
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
        for pr in problems:
            print(f"cleanup: {pr}", file=sys.stderr)
    elapsed = time.monotonic() - t_start
    rows = analyse(cells, modes, args.sizes, args.tunnels)
    print()
    for line in report_tables(rows, args.sizes):
        print(line)
    cl = control_lines(control)
    if cl:
        print("\n### Control plane\n")
        print("\n".join(cl))
    t = targets(rows, control, mem, modes)
    if t:
        print("\n### Targets\n")
        print("\n".join(t))
    for n in bench.notes:
        print(f"note: {n}")
    if rc == 0:
        info["background_busy"] = background
        info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        write_markdown(args.results, info, args, command, rows, control, mem, bench.notes, elapsed)
        print(f"\nwritten: {args.results} ({elapsed / 60:.1f} min)")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "command": command, "machine": info, "seed": args.seed, "modes": modes, "sizes": args.sizes,
            "tunnels": args.tunnels, "rounds": args.rounds, "rows": rows,
            "cells": [c.__dict__ for c in cells], "control": control, "memory": mem,
            "background_busy": background,
            "notes": bench.notes, "started_pids": bench.started, "namespaces": [bench.gw, bench.cl],
            "rc": rc, "elapsed": elapsed}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
