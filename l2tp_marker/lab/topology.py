"""The namespace lab: several L2TP clients behind one NAT address, each over its own "SA".

The test kernel has no ESP and no PPP (see ``DOMAIN.md`` section 5), so each client's IPsec SA
is simulated by its own veth link.  Layout for prefix ``P`` and N clients::

    P-c1  eth0 192.0.2.10/32 ──veth── c1 ┐
    P-c2  eth0 192.0.2.10/32 ──veth── c2 ├─ P-gw  lo 198.51.100.1/32, xl2tpd LNS
    ...                                  │
    P-sink eth0 (no address) ──veth── dead┘  main-table route for 192.0.2.10 (unmarked = lost)

In ``P-gw`` the legacy mangle table carries the strongSwan connmark plugin's rules, one set per
client N with mark N (like ``mark = %unique``): PREROUTING ``-i cN`` MARK N plays the decrypting SA,
INPUT ``-i cN`` CONNMARK ``--set-xmark N`` plays the ``-m policy --spi`` rule, OUTPUT restores the connmark when
the packet has no mark.  ``ip rule fwmark N lookup 100+N`` routes 192.0.2.10 over ``cN`` (the
outbound SA chosen by the mark); unmarked packets follow the main table into ``dead``.

rp_filter: the gateway uses ``rp_filter=0`` (and ``src_valid_mark=1``, harmless).  Strict
``rp_filter=1`` breaks ARP on the ``cN`` links: ARP is never marked, so the reverse-path lookup of
192.0.2.10 follows the main table to ``dead`` and the gateway ignores the clients' ARP requests.
Loose mode (``LabConfig(rp_filter=2)``) works too.

Processes: xl2tpd as LNS in the gateway and as LAC in ``xl2tpd`` clients, each in a private
mount namespace with :mod:`~l2tp_marker.lab.pppd_standin` bind-mounted over ``/usr/sbin/pppd``
(exec chain ``ip netns exec NS unshare -m --propagation private python -m
l2tp_marker.lab.mountexec --bind STANDIN /usr/sbin/pppd -- xl2tpd -D ...``, so the PID the lab
holds is xl2tpd's); ``win`` clients run :mod:`l2tp_marker.lab.winclient`; tcpdump captures every
``cN`` and ``dead`` in the gateway.

Detection: every PPP echo names its client (``lac-2``, ``win-1``; the LNS-side stand-ins send
``lns/<client>``), so a data packet leaving on ``cM`` whose echo names client N != M was
misdelivered; control messages are attributed by their (unambiguous) tunnel ID; anything on
``dead`` left unmarked (see :mod:`~l2tp_marker.lab.analysis`).  Echo timers are jittered so the
sessions do not run in lock-step (in lock-step the last packet in always comes from the right
client and the connmark problem hides).

All processes run from a per-lab work directory; the PIDs the lab starts are recorded in a
registry file (``$TMPDIR/l2tp-marker-lab-PREFIX.json``) so :func:`cleanup_prefix` can stop the
leftovers of a lab that died without cleaning up.  Entering a :class:`Lab` first removes
whatever carries its prefix, so two live labs must not share one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from l2tp_marker.fsutil import write_atomic
from l2tp_marker.lab import analysis

log = logging.getLogger(__name__)

PPPD_PATH = "/usr/sbin/pppd"
XL2TPD_PATH = "/usr/sbin/xl2tpd"
IPTABLES = "iptables-legacy"
MARK_MASK = "0xffffffff"
TABLE_BASE = 100
RULE_PREF_BASE = 1000
DEAD_IF = "dead"
CLIENT_IF = "eth0"
SINK_MAC = "02:6c:32:6d:ff:fe"       # fixed so the gateway's neighbour entry is plain data
LNS_LOCAL_IP = "203.0.113.1"          # PPP addresses xl2tpd hands to pppd (never used for traffic)
LNS_IP_RANGE = "203.0.113.100-203.0.113.199"
KINDS = ("win", "xl2tpd")
MAX_CLIENTS = 99
STOP_TIMEOUT = 5.0
_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


class LabError(RuntimeError):
    """The lab could not be built or a process it needs did not start."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientSpec:
    """One client behind the NAT: ``kind`` is ``"win"`` (the Windows-like scapy client, which
    uses ``tunnel_id``/``session_id``) or ``"xl2tpd"`` (real xl2tpd as LAC; random IDs)."""

    kind: str = "win"
    tunnel_id: int = 1
    session_id: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown client kind {self.kind!r} (expected one of {KINDS})")
        for name in ("tunnel_id", "session_id"):
            value = getattr(self, name)
            if not 1 <= value <= 0xFFFF:
                raise ValueError(f"{name} must be 1..65535, not {value}")


@dataclass(frozen=True)
class LabConfig:
    """Everything that shapes a lab.  ``workdir=None`` means a fresh temporary directory that is
    removed on close (unless ``keep_workdir`` or the environment variable ``L2TP_LAB_KEEP=1``)."""

    clients: tuple[ClientSpec, ...]
    prefix: str = "l2m"
    nat_ip: str = "192.0.2.10"
    gw_ip: str = "198.51.100.1"
    echo_interval: float = 1.0
    hello_interval: float = 5.0
    workdir: Path | None = None
    rp_filter: int = 0
    redial_timeout: int = 2
    keep_workdir: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "clients", tuple(self.clients))
        if not self.clients:
            raise ValueError("a lab needs at least one client")
        if len(self.clients) > MAX_CLIENTS:
            raise ValueError(f"at most {MAX_CLIENTS} clients")
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must match {_PREFIX_RE.pattern}")
        if self.rp_filter not in (0, 1, 2):
            raise ValueError("rp_filter must be 0, 1 or 2")
        if self.workdir is not None:
            object.__setattr__(self, "workdir", Path(self.workdir))


def gw_ns_name(prefix: str) -> str:
    return f"{prefix}-gw"


def client_ns_name(prefix: str, n: int) -> str:
    return f"{prefix}-c{n}"


def sink_ns_name(prefix: str) -> str:
    return f"{prefix}-sink"


def client_ifname(n: int) -> str:
    """Gateway-side name of client N's link."""
    return f"c{n}"


def mark_of(n: int) -> int:
    """The SA mark of client N (strongSwan's %unique hands out 1, 2, ...)."""
    return n


def table_of(n: int) -> int:
    return TABLE_BASE + n


def client_token(spec: ClientSpec, n: int) -> str:
    """The PPP echo token of client N: ``win-N`` or ``lac-N``."""
    return f"{'win' if spec.kind == 'win' else 'lac'}-{n}"


def namespaces_of(config: LabConfig) -> list[str]:
    return ([gw_ns_name(config.prefix)]
            + [client_ns_name(config.prefix, n) for n in range(1, len(config.clients) + 1)]
            + [sink_ns_name(config.prefix)])


def registry_path(prefix: str) -> Path:
    return Path(tempfile.gettempdir()) / f"l2tp-marker-lab-{prefix}.json"


# --------------------------------------------------------------------------------------------
# The rule set, as data
# --------------------------------------------------------------------------------------------
def mangle_rules(config: LabConfig) -> list[list[str]]:
    """The connmark plugin's legacy mangle rules for every client, in the order they are applied
    inside the gateway namespace (each inserted at position 1, as libiptc does for the plugin)."""
    nat, gw = f"{config.nat_ip}/32", f"{config.gw_ip}/32"
    rules: list[list[str]] = []
    for n in range(1, len(config.clients) + 1):
        mark = f"{mark_of(n):#x}"
        rules.append([IPTABLES, "-t", "mangle", "-I", "PREROUTING", "1", "-i", client_ifname(n),
                      "-j", "MARK", "--set-xmark", f"{mark}/{MARK_MASK}"])
        # The plugin's INPUT rule matches the SA (`-m policy --spi`); the SA is the client's link here.
        # (Not `-m mark`: the kernel fast path sets a reserved bit on the marks of known tunnels.)
        rules.append([IPTABLES, "-t", "mangle", "-I", "INPUT", "1", "-s", nat, "-d", gw,
                      "-i", client_ifname(n),
                      "-j", "CONNMARK", "--set-xmark", f"{mark}/{MARK_MASK}"])
        rules.append([IPTABLES, "-t", "mangle", "-I", "OUTPUT", "1", "-s", gw, "-d", nat,
                      "-m", "mark", "--mark", f"0x0/{MARK_MASK}",
                      "-j", "CONNMARK", "--restore-mark", "--ctmask", MARK_MASK,
                      "--nfmask", MARK_MASK])
    return rules


def expected_mangle_listing(config: LabConfig) -> list[str]:
    """What ``iptables-legacy -t mangle -S`` prints in the gateway once :func:`mangle_rules` ran
    (policies first, then each chain top to bottom)."""
    nat, gw = f"{config.nat_ip}/32", f"{config.gw_ip}/32"
    n_clients = len(config.clients)
    order = range(n_clients, 0, -1)  # inserted at position 1: the last client ends up on top
    lines = [f"-P {chain} ACCEPT" for chain in
             ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")]
    lines += [f"-A PREROUTING -i {client_ifname(n)} -j MARK --set-xmark {mark_of(n):#x}/{MARK_MASK}"
              for n in order]
    lines += [f"-A INPUT -s {nat} -d {gw} -i {client_ifname(n)} "
              f"-j CONNMARK --set-xmark {mark_of(n):#x}/{MARK_MASK}" for n in order]
    lines += [f"-A OUTPUT -s {gw} -d {nat} -m mark --mark 0x0 "
              f"-j CONNMARK --restore-mark --nfmask {MARK_MASK} --ctmask {MARK_MASK}"
              for _ in order]
    return lines


def setup_commands(config: LabConfig) -> list[list[str]]:
    """Every command that builds the lab, in order, as argv lists run on the host.

    Namespaces, sysctls, links, addresses, routes, policy rules, the static neighbour on
    ``dead`` and :func:`mangle_rules` (run in the gateway with ``ip netns exec``).
    """
    p = config.prefix
    gw, sink = gw_ns_name(p), sink_ns_name(p)
    n_clients = len(config.clients)
    clients = [client_ns_name(p, n) for n in range(1, n_clients + 1)]
    cmds: list[list[str]] = [["ip", "netns", "add", ns] for ns in namespaces_of(config)]

    def sysctl(ns: str, *settings: str) -> list[str]:
        return ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings]

    rp = str(config.rp_filter)
    # Defaults first: links created afterwards inherit them.
    cmds.append(sysctl(gw, f"net.ipv4.conf.all.rp_filter={rp}",
                       f"net.ipv4.conf.default.rp_filter={rp}",
                       "net.ipv4.conf.all.src_valid_mark=1",
                       "net.ipv6.conf.all.disable_ipv6=1",
                       "net.ipv6.conf.default.disable_ipv6=1"))
    for ns in clients + [sink]:
        cmds.append(sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1",
                           "net.ipv6.conf.default.disable_ipv6=1"))
    for n, ns in enumerate(clients, start=1):
        cmds.append(["ip", "-n", gw, "link", "add", client_ifname(n), "type", "veth",
                     "peer", "name", CLIENT_IF, "netns", ns])
    cmds.append(["ip", "-n", gw, "link", "add", DEAD_IF, "type", "veth",
                 "peer", "name", CLIENT_IF, "address", SINK_MAC, "netns", sink])
    cmds.append(sysctl(gw, *[f"net.ipv4.conf.{ifname}.rp_filter={rp}" for ifname in
                             [client_ifname(n) for n in range(1, n_clients + 1)] + [DEAD_IF]]))
    # Gateway: its address on lo, links up, return routing.
    cmds.append(["ip", "-n", gw, "link", "set", "lo", "up"])
    cmds.append(["ip", "-n", gw, "addr", "add", f"{config.gw_ip}/32", "dev", "lo"])
    for n in range(1, n_clients + 1):
        cmds.append(["ip", "-n", gw, "link", "set", client_ifname(n), "up"])
    cmds.append(["ip", "-n", gw, "link", "set", DEAD_IF, "up"])
    cmds.append(["ip", "-n", gw, "route", "add", f"{config.nat_ip}/32", "dev", DEAD_IF,
                 "scope", "link"])
    cmds.append(["ip", "-n", gw, "neigh", "replace", config.nat_ip, "lladdr", SINK_MAC,
                 "dev", DEAD_IF, "nud", "permanent"])
    for n in range(1, n_clients + 1):
        cmds.append(["ip", "-n", gw, "route", "add", f"{config.nat_ip}/32",
                     "dev", client_ifname(n), "scope", "link", "table", str(table_of(n))])
        cmds.append(["ip", "-n", gw, "rule", "add", "pref", str(RULE_PREF_BASE + n),
                     "fwmark", f"{mark_of(n):#x}", "lookup", str(table_of(n))])
    # Clients: the NAT's public address, a host route to the gateway.
    for ns in clients:
        cmds.append(["ip", "-n", ns, "link", "set", "lo", "up"])
        cmds.append(["ip", "-n", ns, "addr", "add", f"{config.nat_ip}/32", "dev", CLIENT_IF])
        cmds.append(["ip", "-n", ns, "link", "set", CLIENT_IF, "up"])
        cmds.append(["ip", "-n", ns, "route", "add", f"{config.gw_ip}/32", "dev", CLIENT_IF,
                     "scope", "link"])
    # Sink: link up, no address (whatever arrives is dropped).
    cmds.append(["ip", "-n", sink, "link", "set", "lo", "up"])
    cmds.append(["ip", "-n", sink, "link", "set", CLIENT_IF, "up"])
    cmds += [["ip", "netns", "exec", gw, *rule] for rule in mangle_rules(config)]
    return cmds


# --------------------------------------------------------------------------------------------
# xl2tpd configuration
# --------------------------------------------------------------------------------------------
def lns_config(config: LabConfig, auth_file: Path, ppp_options: Path) -> str:
    return "\n".join([
        "; xl2tpd LNS of the l2tp-marker namespace lab",
        "[global]",
        "port = 1701",
        f"listen-addr = {config.gw_ip}",
        f"auth file = {auth_file}",
        "ipsec saref = no",
        "force userspace = yes",
        "",
        "[lns default]",
        f"ip range = {LNS_IP_RANGE}",
        f"local ip = {LNS_LOCAL_IP}",
        "require authentication = no",
        "require chap = no",
        "refuse pap = yes",
        "length bit = yes",
        "hidden bit = no",
        f"pppoptfile = {ppp_options}",
        "",
    ])


def lac_config(config: LabConfig, auth_file: Path, ppp_options: Path) -> str:
    return "\n".join([
        "; xl2tpd LAC (one client behind the NAT) of the l2tp-marker namespace lab",
        "[global]",
        "port = 1701",
        f"listen-addr = {config.nat_ip}",
        f"auth file = {auth_file}",
        "ipsec saref = no",
        "force userspace = yes",
        "",
        "[lac lab]",
        f"lns = {config.gw_ip}",
        "autodial = yes",
        "redial = yes",
        f"redial timeout = {config.redial_timeout}",
        "require authentication = no",
        "length bit = yes",
        "hidden bit = no",
        f"pppoptfile = {ppp_options}",
        "",
    ])


PPP_OPTIONS = "\n".join([
    "# read by nobody: the lab's pppd stand-in ignores its options",
    "noauth",
    "nodefaultroute",
    "lcp-echo-interval 0",
    "",
])


# --------------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------------
def proc_starttime(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), None if there is no such live process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, still has ``starttime``."""
    current = proc_starttime(pid)
    if current is None:
        return False
    return starttime is None or current == starttime


def kill_pid(pid: int, starttime: int | None, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM a process that is not our child, wait, then SIGKILL.  Returns True if it was
    alive.  ``starttime`` guards against a recycled PID."""
    if not pid_alive(pid, starttime):
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid, starttime):
                return True
            time.sleep(0.05)
    log.warning("process %d survived SIGKILL", pid)
    return True


def stop_popen(proc: subprocess.Popen, sig: int = signal.SIGTERM,
               timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop one of our children by its PID: ``sig``, wait, SIGKILL if needed.  Returns its
    exit status."""
    stop_popens([proc], sig, timeout)
    return proc.returncode


def stop_popens(procs: list[subprocess.Popen], sig: int = signal.SIGTERM,
                timeout: float = STOP_TIMEOUT) -> None:
    """Signal all of ``procs`` first, then wait for each (SIGKILL after ``timeout``)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored signal %d, killing it", proc.pid, sig)
            proc.kill()
            proc.wait(timeout)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    log.debug("run: %s", " ".join(argv))
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    res = subprocess.run(argv, **kw)
    if check and res.returncode != 0:
        raise LabError(f"command failed ({res.returncode}): {' '.join(argv)}\n"
                       f"{(res.stderr or '').strip()}")
    return res


def list_namespaces() -> list[str]:
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _prefix_namespaces(prefix: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}-(gw|sink|c\d+)$")
    return [ns for ns in list_namespaces() if pattern.match(ns)]


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove what a lab with ``prefix`` may have left: processes recorded in its registry file
    (stopped by PID, start time checked), processes still inside its namespaces, the namespaces,
    its temporary work directory and the registry file.  Returns what it did, for logging."""
    done: list[str] = []
    reg_path = registry_path(prefix)
    registry: dict = {}
    if reg_path.exists():
        try:
            registry = json.loads(reg_path.read_text())
        except (OSError, ValueError) as exc:
            done.append(f"unreadable registry {reg_path}: {exc}")
    for entry in registry.get("pids", []):
        if kill_pid(int(entry["pid"]), entry.get("starttime")):
            done.append(f"stopped leftover pid {entry['pid']} ({entry.get('name', '?')})")
    for ns in _prefix_namespaces(prefix):
        for pid in namespace_pids(ns):
            if pid == os.getpid():
                continue
            cmd = _cmdline(pid)
            if kill_pid(pid, proc_starttime(pid)):
                done.append(f"stopped pid {pid} left in {ns}: {cmd}")
        res = _run(["ip", "netns", "del", ns], check=False)
        done.append(f"deleted namespace {ns}" if res.returncode == 0
                    else f"could not delete namespace {ns}: {res.stderr.strip()}")
    workdir = registry.get("workdir")
    if workdir and registry.get("own_workdir") and Path(workdir).name.startswith("l2tp-lab-"):
        if Path(workdir).exists():
            shutil.rmtree(workdir, ignore_errors=True)
            done.append(f"removed work directory {workdir}")
    if reg_path.exists():
        reg_path.unlink()
    for line in done:
        log.info("cleanup %s: %s", prefix, line)
    return done


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PppStats:
    """One pppd stand-in's final counters (``pppd-<pid>.json``)."""

    pid: int
    token: str
    peer_token: str | None
    echo_sent: int
    replies_ok: int
    replies_foreign: int
    requests_answered: int
    exited: bool
    foreign_samples: tuple[str, ...] = ()
    peer_tokens: tuple[str, ...] = ()    # every distinct Echo-Request data seen (first = peer)

    @classmethod
    def from_json(cls, data: dict) -> PppStats:
        return cls(pid=int(data.get("pid", 0)), token=str(data.get("token", "")),
                   peer_token=data.get("peer_token"),
                   echo_sent=int(data.get("echo_sent", 0)),
                   replies_ok=int(data.get("replies_ok", 0)),
                   replies_foreign=int(data.get("replies_foreign", 0)),
                   requests_answered=int(data.get("requests_answered", 0)),
                   exited=bool(data.get("exited", False)),
                   foreign_samples=tuple(data.get("foreign_samples", ())),
                   peer_tokens=tuple(data.get("peer_tokens", ())))


@dataclass(frozen=True)
class ClientResult:
    """How one client fared.  "client_*" counters come from the client's own PPP peer (the
    xl2tpd LAC's pppd stand-in, or the win client's status file); "lns_*" from the LNS-side
    stand-ins that talked to this client (their echo data names it).

    ``established``: a win client whose status says so at report time; an xl2tpd LAC that got a
    session at all (``sessions`` counts its PPP stand-ins: more than one means it redialled).
    ``packets_out``/``misdelivered`` come from the capture of the gateway's link ``cN``;
    ``unmarked`` counts this client's packets seen on ``dead``."""

    index: int
    kind: str
    token: str
    mark: int
    established: bool
    sessions: int
    client_echo_sent: int
    client_replies_ok: int
    client_replies_foreign: int
    client_requests_answered: int
    lns_echo_sent: int
    lns_replies_ok: int
    lns_replies_foreign: int
    packets_out: int
    packets_in: int
    data_out: int
    control_out: int
    control_out_types: tuple[tuple[str, int], ...]
    tunnel_ids_out: tuple[int, ...]
    misdelivered: int
    foreign_tokens: tuple[str, ...]
    unmarked: int
    state: str = ""
    foreign_tunnel_packets: int = 0      # packets the client got for a tunnel it does not know
    misdelivered_control: int = 0        # of ``misdelivered``: control messages (by tunnel ID)
    lost_to_others: int = 0              # packets meant for this client that left on another cM


    @property
    def misdelivered_data(self) -> int:
        return self.misdelivered - self.misdelivered_control

    @property
    def echo_ok_both_ways(self) -> bool:
        return self.client_replies_ok > 0 and self.lns_replies_ok > 0

    @property
    def healthy(self) -> bool:
        return (self.established and self.echo_ok_both_ways and self.misdelivered == 0
                and self.unmarked == 0 and self.client_replies_foreign == 0
                and self.lns_replies_foreign == 0)


@dataclass(frozen=True)
class LabReport:
    clients: tuple[ClientResult, ...]
    unmarked: int                        # udp/1701 packets seen on the dead-end link
    unmarked_by_client: tuple[tuple[int, int], ...]   # (client, packets) where it can be told
    lns_sessions: tuple[PppStats, ...]
    lns_log: tuple[str, ...]
    captured: bool                       # False if the observer never ran

    def client(self, n: int) -> ClientResult:
        return self.clients[n - 1]

    @property
    def misdelivered(self) -> int:
        return sum(c.misdelivered for c in self.clients)

    @property
    def all_healthy(self) -> bool:
        return self.unmarked == 0 and all(c.healthy for c in self.clients)

    def lns_log_contains(self, text: str) -> bool:
        return any(text in line for line in self.lns_log)

    def format(self) -> str:
        head = (f"{'client':<8}{'kind':<8}{'mark':>5} {'estab':<6}{'sess':>5}"
                f"{'echo c->l':>11}{'echo l->c':>11}{'foreign':>9}{'out':>6}{'in':>6}"
                f"{'misdeliv':>10}{'unmarked':>10}")
        lines = [head, "-" * len(head)]
        for c in self.clients:
            lines.append(
                f"{c.token:<8}{c.kind:<8}{c.mark:>5} {('yes' if c.established else 'NO'):<6}"
                f"{c.sessions:>5}{f'{c.client_replies_ok}/{c.client_echo_sent}':>11}"
                f"{f'{c.lns_replies_ok}/{c.lns_echo_sent}':>11}"
                f"{c.client_replies_foreign + c.lns_replies_foreign:>9}"
                f"{c.packets_out:>6}{c.packets_in:>6}{c.misdelivered:>10}{c.unmarked:>10}")
        lines.append(f"unmarked udp/1701 packets on '{DEAD_IF}': {self.unmarked}"
                     + (f" ({', '.join(f'c{n}: {k}' for n, k in self.unmarked_by_client)})"
                        if self.unmarked_by_client else ""))
        if not self.captured:
            lines.append("(no capture: the observer did not run)")
        for c in self.clients:
            extra = []
            if c.foreign_tokens:
                extra.append(f"other clients' tokens on c{c.index}: {', '.join(c.foreign_tokens)}")
            if c.misdelivered_control:
                extra.append(f"{c.misdelivered_control} control message(s) for another client "
                             f"on c{c.index}")
            if c.lost_to_others:
                extra.append(f"{c.lost_to_others} packet(s) for it left on other links")
            if c.control_out_types:
                extra.append("control out: " + ", ".join(f"{k} {v}" for k, v in c.control_out_types))
            if c.state:
                extra.append(f"state {c.state}")
            if c.foreign_tunnel_packets:
                extra.append(f"{c.foreign_tunnel_packets} packet(s) for an unknown tunnel")
            if extra:
                lines.append(f"  {c.token}: " + "; ".join(extra))
        lines.append("echo c->l = replies ok/requests sent by the client's PPP peer; "
                     "l->c = the same for the LNS side")
        for st in self.lns_sessions:
            if len(st.peer_tokens) > 1:
                lines.append(f"  LNS session (pppd {st.pid}) got echo requests from several "
                             f"peers: {', '.join(st.peer_tokens)}")
        interesting = [ln for ln in self.lns_log if any(key in ln for key in (
            "twice", "Can not find", "No such", "closed", "Maximum retries", "Unable"))]
        if interesting:
            lines.append("LNS log highlights:")
            lines += [f"  {ln}" for ln in interesting[:12]]
            if len(interesting) > 12:
                lines.append(f"  ... {len(interesting) - 12} more")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The lab
# --------------------------------------------------------------------------------------------
@dataclass
class _Tracked:
    name: str
    proc: subprocess.Popen
    starttime: int | None
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)


class Lab:
    """Builds the namespaces and rules, runs xl2tpd/clients/tcpdump, reports, tears down.

    Use as a context manager; ``__exit__`` (and :meth:`close`, safe to call twice) stops every
    process the lab started by its PID (tcpdump first) and removes the namespaces, also after
    errors and KeyboardInterrupt.
    """

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self._workdir: Path | None = None
        self._own_workdir = config.workdir is None
        self._lns: _Tracked | None = None
        self._clients: dict[int, _Tracked] = {}
        self._observers: dict[str, _Tracked] = {}
        self._extra: list[_Tracked] = []
        self._past_pids: list[dict] = []
        self._created_ns: list[str] = []
        self._built = False
        self._closed = False
        self._captured = False
        self._standin: Path | None = None
        self._registry_written = False

    # -- names ----------------------------------------------------------------------------
    @property
    def gw_ns(self) -> str:
        return gw_ns_name(self.config.prefix)

    @property
    def sink_ns(self) -> str:
        return sink_ns_name(self.config.prefix)

    def client_ns(self, n: int) -> str:
        self._check_index(n)
        return client_ns_name(self.config.prefix, n)

    def mark_of(self, n: int) -> int:
        self._check_index(n)
        return mark_of(n)

    @property
    def n_clients(self) -> int:
        return len(self.config.clients)

    @property
    def namespaces(self) -> list[str]:
        return namespaces_of(self.config)

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise LabError("the lab has no work directory yet (use it as a context manager)")
        return self._workdir

    def token_of(self, n: int) -> str:
        self._check_index(n)
        return client_token(self.config.clients[n - 1], n)

    def _check_index(self, n: int) -> None:
        if not 1 <= n <= self.n_clients:
            raise IndexError(f"client index {n} out of 1..{self.n_clients}")

    def client_dir(self, n: int) -> Path:
        self._check_index(n)
        return self.workdir / f"c{n}"

    @property
    def lns_dir(self) -> Path:
        return self.workdir / "lns"

    @property
    def pcap_dir(self) -> Path:
        return self.workdir / "pcap"

    def pcap_path(self, ifname: str) -> Path:
        return self.pcap_dir / f"{ifname}.pcap"

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            cleanup_prefix(self.config.prefix)
            self._make_workdir()
            self._save_registry()
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _make_workdir(self) -> None:
        if self.config.workdir is not None:
            self._workdir = Path(self.config.workdir).resolve()
            self._workdir.mkdir(parents=True, exist_ok=True)
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"l2tp-lab-{self.config.prefix}-"))
        for sub in ["lns", "lns/ppp", "pcap", "bin"] + [
                f"c{n}" for n in range(1, self.n_clients + 1)] + [
                f"c{n}/ppp" for n in range(1, self.n_clients + 1)]:
            (self._workdir / sub).mkdir(parents=True, exist_ok=True)

    def _save_registry(self) -> None:
        entries = list(self._past_pids)
        for t in self._all_tracked():
            entries.append({"pid": t.proc.pid, "starttime": t.starttime, "name": t.name})
        data = {"prefix": self.config.prefix, "workdir": str(self._workdir),
                "own_workdir": self._own_workdir, "namespaces": self.namespaces,
                "owner_pid": os.getpid(), "pids": entries}
        write_atomic(registry_path(self.config.prefix), json.dumps(data, indent=1))
        self._registry_written = True

    def _all_tracked(self) -> list[_Tracked]:
        out = list(self._observers.values()) + list(self._clients.values()) + list(self._extra)
        if self._lns is not None:
            out.append(self._lns)
        return out

    def build(self) -> None:
        """Create namespaces, links, routes and rules (``__enter__`` calls it)."""
        if self._built:
            return
        for argv in setup_commands(self.config):
            if argv[:3] == ["ip", "netns", "add"]:
                self._created_ns.append(argv[3])
            _run(argv)
        self._built = True
        log.info("lab %s built: %d client(s), work directory %s", self.config.prefix,
                 self.n_clients, self._workdir)

    def close(self) -> None:
        """Stop everything (tcpdump first, by PID), remove the namespaces and the registry.
        Safe to call twice; a KeyboardInterrupt during cleanup is re-raised at the end."""
        if self._closed:
            return
        self._closed = True
        interrupted: BaseException | None = None
        steps: list[tuple[str, Callable[[], object]]] = [
            ("stop observer", self.stop_observer),
            ("stop clients", self.stop_clients),
            ("stop gateway processes", self._stop_extra),
            ("stop LNS", self.stop_lns),
            ("stop stragglers", self._stop_stragglers),
            ("remember stand-ins", self._remember_standins),
            ("delete namespaces", self._delete_namespaces),
            ("remove registry", self._remove_registry),
            ("remove work directory", self._remove_workdir),
        ]
        for name, step in steps:
            try:
                step()
            except KeyboardInterrupt as exc:
                interrupted = exc
                log.warning("lab cleanup: interrupted during %s, continuing", name)
            except Exception:
                log.exception("lab cleanup: %s failed", name)
        if interrupted is not None:
            raise interrupted

    def _stop_extra(self) -> None:
        for t in self._extra:
            self._past_pids.append({"pid": t.proc.pid, "starttime": t.starttime,
                                    "name": t.name})
        stop_popens([t.proc for t in self._extra])
        self._extra.clear()

    def _stop_stragglers(self) -> None:
        """Stand-ins orphaned by a stopped xl2tpd, then anything else still inside our
        namespaces (all of it was started by this lab)."""
        if self._workdir is not None:
            self._kill_standins(self.lns_dir / "ppp")
            for n in range(1, self.n_clients + 1):
                self._kill_standins(self.client_dir(n) / "ppp")
        for ns in self._created_ns:
            for pid in namespace_pids(ns):
                if pid == os.getpid():
                    continue
                log.warning("lab cleanup: pid %d still in %s (%s), stopping it", pid, ns,
                            _cmdline(pid))
                kill_pid(pid, proc_starttime(pid))

    def _kill_standins(self, ppp_dir: Path) -> None:
        if self._workdir is None or not ppp_dir.exists():
            return
        for path in ppp_dir.glob("pppd-*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pid, start = int(data.get("pid", 0)), data.get("starttime")
            if pid and start is not None and pid_alive(pid, start):
                kill_pid(pid, start, timeout=2.0)

    def _delete_namespaces(self) -> None:
        existing = set(list_namespaces())
        for ns in self._created_ns:
            if ns in existing:
                _run(["ip", "netns", "del", ns], check=False)
        left = [ns for ns in self._created_ns if ns in set(list_namespaces())]
        if left:
            raise LabError(f"namespaces left behind: {left}")
        self._created_ns.clear()

    def _remove_registry(self) -> None:
        if self._created_ns or not self._registry_written:
            return  # namespaces survived (keep the record for cleanup_prefix), or not ours
        path = registry_path(self.config.prefix)
        if path.exists():
            path.unlink()

    def _remove_workdir(self) -> None:
        keep = self.config.keep_workdir or os.environ.get("L2TP_LAB_KEEP") == "1"
        if self._own_workdir and self._workdir is not None and not keep:
            shutil.rmtree(self._workdir, ignore_errors=True)
        elif self._workdir is not None:
            log.info("lab work directory kept: %s", self._workdir)

    # -- running things in namespaces -----------------------------------------------------
    def _spawn(self, name: str, argv: list[str], log_path: Path,
               env: dict[str, str] | None = None, **kw) -> _Tracked:
        if self._closed:
            raise LabError("the lab is closed")
        log.debug("spawn %s: %s", name, " ".join(argv))
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as fh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    **kw)
        tracked = _Tracked(name, proc, proc_starttime(proc.pid), log_path)
        tracked.extra["log_offset"] = offset
        return tracked

    def ns_exec(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def gw_run(self, argv: list[str], check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` in the gateway namespace and wait (text output captured)."""
        return _run(self.ns_exec(self.gw_ns) + list(argv), check=check, **kw)

    def client_run(self, n: int, argv: list[str], check: bool = False,
                   **kw) -> subprocess.CompletedProcess:
        return _run(self.ns_exec(self.client_ns(n)) + list(argv), check=check, **kw)

    def gw_popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in the gateway namespace.  The lab records its PID and stops it on
        close (SIGTERM, then SIGKILL) unless it already ended."""
        if self._closed:
            raise LabError("the lab is closed")
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.ns_exec(self.gw_ns) + list(argv), **kw)
        self._extra.append(_Tracked(f"gw:{argv[0]}", proc, proc_starttime(proc.pid)))
        self._save_registry()
        return proc

    def flush_conntrack(self) -> None:
        """Empty the gateway's conntrack table (call when (re)starting a scenario)."""
        self.gw_run(["conntrack", "-F"], check=False)

    def conntrack_entries(self) -> list[str]:
        return self.gw_run(["conntrack", "-L", "-p", "udp"]).stdout.splitlines()

    def mangle_listing(self) -> list[str]:
        """``iptables-legacy -t mangle -S`` in the gateway."""
        return self.gw_run([IPTABLES, "-t", "mangle", "-S"], check=True).stdout.splitlines()

    def nft_tables(self) -> list[str]:
        """``nft list tables`` in the gateway (the marker's fast path lives in ``table ip l2tp_marker``)."""
        return self.gw_run(["nft", "list", "tables"], check=True).stdout.splitlines()

    # -- xl2tpd ---------------------------------------------------------------------------
    def _standin_path(self) -> Path:
        """An executable copy of :mod:`pppd_standin` whose shebang is this interpreter."""
        if self._standin is None:
            src = Path(__file__).with_name("pppd_standin.py").read_text()
            body = src.split("\n", 1)[1] if src.startswith("#!") else src
            path = self.workdir / "bin" / "pppd-standin"
            path.write_text(f"#!{sys.executable} -I\n{body}")
            path.chmod(0o755)
            self._standin = path
        return self._standin

    def _xl2tpd_argv(self, ns: str, conf: Path, pidfile: Path, control: Path) -> list[str]:
        return (self.ns_exec(ns)
                + ["unshare", "-m", "--propagation", "private",
                   sys.executable, "-m", "l2tp_marker.lab.mountexec",
                   "--bind", str(self._standin_path()), PPPD_PATH, "--",
                   XL2TPD_PATH, "-D", "-c", str(conf), "-p", str(pidfile), "-C", str(control)])

    @staticmethod
    def _python_env() -> dict[str, str]:
        """Our environment, with this package importable by the helpers we start."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return env

    def _ppp_env(self, token: str, ppp_dir: Path, echo_peer: bool) -> dict[str, str]:
        env = self._python_env()
        env.update({"L2TP_LAB_TOKEN": token, "L2TP_LAB_DIR": str(ppp_dir),
                    "L2TP_LAB_ECHO_INTERVAL": str(self.config.echo_interval),
                    "L2TP_LAB_ECHO_PEER": "1" if echo_peer else "0"})
        return env

    def _start_xl2tpd(self, name: str, ns: str, base: Path, conf_text: str, token: str,
                      echo_peer: bool) -> _Tracked:
        conf, secrets, opts = base / "xl2tpd.conf", base / "l2tp-secrets", base / "ppp-options"
        conf.write_text(conf_text)
        secrets.write_text("# no tunnel secrets: tunnel authentication is off\n")
        secrets.chmod(0o600)
        opts.write_text(PPP_OPTIONS)
        pidfile, control, log_path = base / "xl2tpd.pid", base / "l2tp-control", base / "xl2tpd.log"
        for stale in (pidfile, control):
            if stale.exists() or stale.is_fifo():
                stale.unlink()
        tracked = self._spawn(name, self._xl2tpd_argv(ns, conf, pidfile, control), log_path,
                              env=self._ppp_env(token, base / "ppp", echo_peer))
        tracked.extra["pidfile"] = pidfile
        return tracked

    def _wait_listening(self, tracked: _Tracked, timeout: float = 10.0) -> None:
        def listening() -> bool:  # in this run's part of the log (it is appended to)
            return b"Listening on" in _read_bytes(tracked.log_path, tracked.extra["log_offset"])

        wait_for(lambda: tracked.proc.poll() is not None or listening(), timeout, 0.05)
        if tracked.proc.poll() is not None or not listening():
            raise LabError(f"{tracked.name} did not start (exit {tracked.proc.poll()}):\n"
                           + _tail(tracked.log_path))
        pidfile = tracked.extra.get("pidfile")
        if pidfile is not None and wait_for(pidfile.exists, 2.0, 0.05):
            written = pidfile.read_text().strip()
            if written and written != str(tracked.proc.pid):
                log.warning("%s wrote pid %s, started pid %d", tracked.name, written,
                            tracked.proc.pid)

    def start_lns(self) -> None:
        """Start xl2tpd as LNS in the gateway (its pppd is the stand-in, token ``lns``)."""
        if self._lns is not None and self._lns.proc.poll() is None:
            raise LabError("the LNS already runs")
        tracked = self._start_xl2tpd(
            "lns", self.gw_ns, self.lns_dir,
            lns_config(self.config, self.lns_dir / "l2tp-secrets", self.lns_dir / "ppp-options"),
            token="lns", echo_peer=True)
        self._lns = tracked
        self._save_registry()
        self._wait_listening(tracked)

    def stop_lns(self) -> None:
        if self._lns is not None:
            self._past_pids.append({"pid": self._lns.proc.pid, "starttime": self._lns.starttime,
                                    "name": "lns"})
            stop_popen(self._lns.proc)
            self._lns = None
            self._kill_standins(self.lns_dir / "ppp")

    @property
    def lns_pid(self) -> int | None:
        return self._lns.proc.pid if self._lns is not None else None

    def winclient_available(self) -> bool:
        return importlib.util.find_spec("l2tp_marker.lab.winclient") is not None

    def start_clients(self, stagger: float = 0.0) -> None:
        """Flush conntrack, then start every client (``stagger`` seconds apart)."""
        if any(t.proc.poll() is None for t in self._clients.values()):
            raise LabError("clients already run (stop_clients first)")
        if any(s.kind == "win" for s in self.config.clients) and not self.winclient_available():
            raise LabError("a 'win' client needs l2tp_marker.lab.winclient, which is missing")
        self.flush_conntrack()
        started: list[_Tracked] = []
        for n, spec in enumerate(self.config.clients, start=1):
            if n > 1 and stagger > 0:
                time.sleep(stagger)
            started.append(self._start_client(n, spec))
        for tracked in started:
            if tracked.extra.get("pidfile") is not None:
                self._wait_listening(tracked)

    def start_client(self, n: int, *, tunnel_id: int | None = None,
                     session_id: int | None = None) -> None:
        """Start client N alone (a client that joins later, or one that reconnects); conntrack
        is left as it is.  A ``win`` client may be given other IDs than its spec (Windows
        reconnects with its next tunnel ID)."""
        self._check_index(n)
        old = self._clients.get(n)
        if old is not None and old.proc.poll() is None:
            raise LabError(f"client {n} already runs")
        spec = self.config.clients[n - 1]
        if tunnel_id is not None or session_id is not None:
            if spec.kind != "win":
                raise LabError("only win clients take other IDs")
            spec = ClientSpec("win", tunnel_id or spec.tunnel_id, session_id or spec.session_id)
        if old is not None:
            self._past_pids.append({"pid": old.proc.pid, "starttime": old.starttime,
                                    "name": old.name})
        tracked = self._start_client(n, spec)
        if tracked.extra.get("pidfile") is not None:
            self._wait_listening(tracked)

    def stop_client(self, n: int) -> None:
        """Stop client N (SIGTERM by PID; a win client tears its tunnel down first)."""
        tracked = self._clients.pop(n, None)
        if tracked is None:
            return
        self._past_pids.append({"pid": tracked.proc.pid, "starttime": tracked.starttime,
                                "name": tracked.name})
        stop_popen(tracked.proc)
        self._kill_standins(self.client_dir(n) / "ppp")
        self._save_registry()

    def _start_client(self, n: int, spec: ClientSpec) -> _Tracked:
        if spec.kind == "xl2tpd":
            base = self.client_dir(n)
            tracked = self._start_xl2tpd(
                f"c{n}", self.client_ns(n), base,
                lac_config(self.config, base / "l2tp-secrets", base / "ppp-options"),
                token=self.token_of(n), echo_peer=False)
        else:
            tracked = self._start_winclient(n, spec)
        self._clients[n] = tracked
        self._save_registry()
        return tracked

    def winclient_argv(self, n: int, spec: ClientSpec | None = None) -> list[str]:
        spec = spec or self.config.clients[n - 1]
        return (self.ns_exec(self.client_ns(n))
                + [sys.executable, "-m", "l2tp_marker.lab.winclient",
                   "--server", self.config.gw_ip,
                   "--tunnel-id", str(spec.tunnel_id), "--session-id", str(spec.session_id),
                   "--token", self.token_of(n),
                   "--status-file", str(self.status_file(n)),
                   "--hello-interval", str(self.config.hello_interval),
                   "--echo-interval", str(self.config.echo_interval), "-v"])

    def status_file(self, n: int) -> Path:
        return self.client_dir(n) / "win-status.json"

    def _start_winclient(self, n: int, spec: ClientSpec) -> _Tracked:
        status = self.status_file(n)
        if status.exists():
            status.unlink()
        return self._spawn(f"c{n}", self.winclient_argv(n, spec), self.client_dir(n) / "winclient.log",
                           env=self._python_env())

    def stop_clients(self) -> None:
        """Stop every client (SIGTERM by PID) and the stand-ins their xl2tpd leaves behind."""
        clients = sorted(self._clients.items())
        for _n, tracked in clients:
            self._past_pids.append({"pid": tracked.proc.pid, "starttime": tracked.starttime,
                                    "name": tracked.name})
        stop_popens([t.proc for _n, t in clients])
        if self._workdir is not None:
            for n, _t in clients:
                self._kill_standins(self.client_dir(n) / "ppp")
        self._clients.clear()

    def client_pid(self, n: int) -> int | None:
        t = self._clients.get(n)
        return t.proc.pid if t is not None else None

    def started_processes(self) -> list[tuple[int, int | None]]:
        """``(pid, starttime)`` of every process this lab started, running or not, the pppd
        stand-ins included (also after :meth:`close` removed the work directory)."""
        seen: dict[int, int | None] = {e["pid"]: e.get("starttime") for e in self._past_pids}
        seen.update((t.proc.pid, t.starttime) for t in self._all_tracked())
        for pid, start in self._standin_processes():
            seen.setdefault(pid, start)
        return sorted(seen.items())

    def started_pids(self) -> list[int]:
        return [pid for pid, _start in self.started_processes()]

    def _standin_processes(self) -> list[tuple[int, int | None]]:
        if self._workdir is None or not self._workdir.exists():
            return []
        out = []
        for ppp_dir in [self.lns_dir / "ppp"] + [self.client_dir(n) / "ppp"
                                                  for n in range(1, self.n_clients + 1)]:
            for path in ppp_dir.glob("pppd-*.json"):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                out.append((int(data.get("pid", 0)), data.get("starttime")))
        return out

    def _remember_standins(self) -> None:
        known = {e["pid"] for e in self._past_pids}
        for pid, start in self._standin_processes():
            if pid not in known:
                self._past_pids.append({"pid": pid, "starttime": start, "name": "pppd-standin"})

    # -- observation ----------------------------------------------------------------------
    def start_observer(self) -> None:
        """tcpdump (``-U -w``) in the gateway on every ``cN`` and on ``dead``."""
        if self._observers:
            raise LabError("the observer already runs")
        ifaces = [client_ifname(n) for n in range(1, self.n_clients + 1)] + [DEAD_IF]
        for ifname in ifaces:
            pcap = self.pcap_path(ifname)
            if pcap.exists():
                pcap.unlink()
            argv = self.ns_exec(self.gw_ns) + ["tcpdump", "-i", ifname, "-n", "-U", "-s", "0",
                                               "-Z", "root", "-w", str(pcap)]
            tracked = self._spawn(f"tcpdump-{ifname}", argv, self.pcap_dir / f"{ifname}.log")
            self._observers[ifname] = tracked
            self._save_registry()
        for ifname, tracked in self._observers.items():
            def ready(t: _Tracked = tracked) -> bool:
                return t.proc.poll() is not None or "listening on" in _read(t.log_path)
            wait_for(ready, 10.0, 0.05)
            if tracked.proc.poll() is not None:
                raise LabError(f"tcpdump on {ifname} failed:\n{_tail(tracked.log_path)}")
        self._captured = True

    def stop_observer(self) -> None:
        for tracked in self._observers.values():
            self._past_pids.append({"pid": tracked.proc.pid, "starttime": tracked.starttime,
                                    "name": tracked.name})
        stop_popens([t.proc for t in self._observers.values()], signal.SIGTERM)
        self._observers.clear()

    # -- state ----------------------------------------------------------------------------
    @staticmethod
    def _ppp_stats(ppp_dir: Path) -> list[PppStats]:
        out = []
        for path in sorted(ppp_dir.glob("pppd-*.json")):
            try:
                out.append(PppStats.from_json(json.loads(path.read_text())))
            except (OSError, ValueError):
                continue
        return out

    def win_status(self, n: int) -> dict:
        try:
            return json.loads(self.status_file(n).read_text())
        except (OSError, ValueError):
            return {}

    def is_established(self, n: int) -> bool:
        """Is client N's session up now (an xl2tpd LAC with a live PPP stand-in, or a win client
        whose status says ``established``)?"""
        spec = self.config.clients[n - 1]
        if spec.kind == "win":
            return self.win_status(n).get("state") == "established"
        return any(not s.exited for s in self._ppp_stats(self.client_dir(n) / "ppp"))

    def wait_established(self, timeout: float) -> bool:
        """Wait until every client is established; False on timeout."""
        return wait_for(lambda: all(self.is_established(n)
                                    for n in range(1, self.n_clients + 1)), timeout, 0.1)

    def lns_log(self) -> list[str]:
        return _read(self.lns_dir / "xl2tpd.log").splitlines()

    def client_log(self, n: int) -> list[str]:
        spec = self.config.clients[n - 1]
        name = "xl2tpd.log" if spec.kind == "xl2tpd" else "winclient.log"
        return _read(self.client_dir(n) / name).splitlines()

    def report(self) -> LabReport:
        """Collect status files, captures and the LNS log into a :class:`LabReport`."""
        gw_ip = self.config.gw_ip
        tokens = {self.token_of(n): n for n in range(1, self.n_clients + 1)}
        lns_stats = self._ppp_stats(self.lns_dir / "ppp")
        captures = {n: analysis.read_l2tp(self.pcap_path(client_ifname(n)))
                    for n in range(1, self.n_clients + 1)}
        tid_owner = analysis.tunnel_owners(
            {n: analysis.client_tunnel_ids(pkts, gw_ip) for n, pkts in captures.items()})
        links = {n: analysis.link_stats(client_ifname(n), pkts, gw_ip, n, tokens, tid_owner)
                 for n, pkts in captures.items()}
        dead_packets = analysis.read_l2tp(self.pcap_path(DEAD_IF))
        dead = analysis.link_stats(DEAD_IF, dead_packets, gw_ip, None, tokens, tid_owner)
        results = []
        for n, spec in enumerate(self.config.clients, start=1):
            token = self.token_of(n)
            link = links[n]
            lost = sum(dict(other.by_owner).get(n, 0) for m, other in links.items() if m != n)
            state = ""
            if spec.kind == "win":
                st = self.win_status(n)
                state = str(st.get("state", ""))
                established = state == "established"
                sessions = 1 if established or st.get("echo_replies_ok", 0) else 0
                c_sent, c_ok = int(st.get("echo_sent", 0)), int(st.get("echo_replies_ok", 0))
                c_foreign = int(st.get("echo_replies_foreign", 0))
                c_answered = int(st.get("echo_requests_answered", 0))
                foreign_tunnel = int(st.get("foreign_tunnel", 0))
            else:
                mine = self._ppp_stats(self.client_dir(n) / "ppp")
                established = bool(mine)
                sessions = len(mine)
                c_sent = sum(s.echo_sent for s in mine)
                c_ok = sum(s.replies_ok for s in mine)
                c_foreign = sum(s.replies_foreign for s in mine)
                c_answered = sum(s.requests_answered for s in mine)
                foreign_tunnel = sum(1 for line in self.client_log(n)
                                     if "Can not find tunnel" in line)
            theirs = [s for s in lns_stats if s.peer_token == token]
            results.append(ClientResult(
                index=n, kind=spec.kind, token=token, mark=mark_of(n),
                established=established, sessions=sessions,
                client_echo_sent=c_sent, client_replies_ok=c_ok,
                client_replies_foreign=c_foreign, client_requests_answered=c_answered,
                lns_echo_sent=sum(s.echo_sent for s in theirs),
                lns_replies_ok=sum(s.replies_ok for s in theirs),
                lns_replies_foreign=sum(s.replies_foreign for s in theirs),
                packets_out=link.packets_out, packets_in=link.packets_in,
                data_out=link.data_out, control_out=link.control_out,
                control_out_types=link.control_out_types, tunnel_ids_out=link.tunnel_ids_out,
                misdelivered=link.misdelivered, foreign_tokens=link.foreign_tokens,
                unmarked=dict(dead.by_owner).get(n, 0), state=state,
                foreign_tunnel_packets=foreign_tunnel,
                misdelivered_control=link.misdelivered_control, lost_to_others=lost))
        return LabReport(clients=tuple(results), unmarked=len(dead_packets),
                         unmarked_by_client=dead.by_owner, lns_sessions=tuple(lns_stats),
                         lns_log=tuple(self.lns_log()), captured=self._captured)


def _read(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _read_bytes(path: Path | None, offset: int = 0) -> bytes:
    if path is None:
        return b""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    except OSError:
        return b""


def _tail(path: Path | None, lines: int = 20) -> str:
    return "\n".join(_read(path).splitlines()[-lines:])


def run_scenario(config: LabConfig, duration: float, *, establish_timeout: float = 20.0,
                 before_clients: Callable[[Lab], object] | None = None) -> LabReport:
    """Build a lab, run LNS + observer + clients for ``duration`` seconds after the clients
    are established (or the timeout passed), and return the report; everything is torn down."""
    with Lab(config) as lab:
        lab.start_lns()
        if before_clients is not None:
            before_clients(lab)
        lab.start_observer()
        lab.start_clients()
        lab.wait_established(establish_timeout)
        time.sleep(duration)
        lab.stop_observer()
        report = lab.report()
        lab.stop_clients()
        return report


__all__ = [
    "ClientSpec", "LabConfig", "Lab", "LabReport", "ClientResult", "PppStats", "LabError",
    "cleanup_prefix", "mangle_rules", "expected_mangle_listing", "setup_commands", "mark_of",
    "table_of", "client_token", "gw_ns_name", "client_ns_name", "sink_ns_name",
    "registry_path", "run_scenario", "namespaces_of", "list_namespaces",
]
