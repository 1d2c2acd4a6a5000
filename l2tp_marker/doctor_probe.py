"""``l2tp-marker doctor``, the I/O part: collects :class:`~l2tp_marker.doctor.Facts`.

Everything is read, nothing is changed: commands run as argument lists (never through a shell),
tables that are not loaded are not listed (listing a legacy table would create it), and a missing
tool or an unreadable file becomes a fact with the reason, never an exception. With ``netns`` the
collection runs inside that network namespace (``ip netns exec NS <this python> -m
l2tp_marker.doctor_probe OPTIONS``, which prints the facts as JSON), so ``/proc/net``,
``/proc/sys/net``, the netfilter tables and conntrack are the namespace's; processes are matched
to the namespace by their ``/proc/PID/ns/net``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .control import ControlError, ask
from .doctor import DEFAULT_XL2TPD_CONF, Facts, Output, TextFile, Xl2tpdProcess
from .rules import RuleSet

log = logging.getLogger(__name__)

LOG_TAIL = 4 << 20            # read at most the last 4 MiB of a log
CONF_MAX = 1 << 20
SECRET_LINES = ("enc ", "auth ", "auth-trunc ", "aead ", "comp ")   # ip xfrm state key material


class ProbeError(Exception):
    """The probe could not run at all (no such namespace, the namespace probe failed)."""


@dataclass(frozen=True)
class ProbeOptions:
    control_socket: str
    xl2tpd_configs: tuple[str, ...] = ()
    xl2tpd_logs: tuple[str, ...] = ()
    timeout: float = 10.0

    def to_json(self) -> str:
        return json.dumps({"control_socket": self.control_socket, "xl2tpd_configs": list(self.xl2tpd_configs),
                           "xl2tpd_logs": list(self.xl2tpd_logs), "timeout": self.timeout})

    @classmethod
    def from_json(cls, text: str) -> ProbeOptions:
        d = json.loads(text)
        return cls(control_socket=d["control_socket"], xl2tpd_configs=tuple(d.get("xl2tpd_configs", ())),
                   xl2tpd_logs=tuple(d.get("xl2tpd_logs", ())), timeout=float(d.get("timeout", 10.0)))


def collect(opts: ProbeOptions, *, ruleset: RuleSet | None, netns: str | None = None,
            fastpath: str | None = None, fastpath_bit: int | None = None) -> Facts:
    """The facts of this host (``netns=None``) or of network namespace ``netns``; ``ruleset``,
    ``fastpath`` and ``fastpath_bit`` are the marker's configuration, as doctor was given it."""
    facts = collect_in_netns(netns, opts) if netns else collect_here(opts)
    return replace(facts, netns=netns, ruleset=ruleset, fastpath_setting=fastpath, fastpath_bit=fastpath_bit)


# --------------------------------------------------------------------------------------------
# Running in a namespace
# --------------------------------------------------------------------------------------------
def collect_in_netns(netns: str, opts: ProbeOptions) -> Facts:
    if "/" in netns or netns in (".", "..") or not Path("/run/netns", netns).exists():
        raise ProbeError(f"no network namespace {netns!r} (see 'ip netns list')")
    if shutil.which("ip") is None:
        raise ProbeError("iproute2's 'ip' is needed to enter a namespace")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "l2tp_marker.doctor_probe", opts.to_json()]
    log.debug("run: %s", " ".join(argv))
    try:
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=opts.timeout * 6)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeError(f"the probe in namespace {netns} failed: {exc}") from None
    if res.returncode != 0:
        raise ProbeError(f"the probe in namespace {netns} failed ({res.returncode}): "
                         f"{res.stderr.strip()[-2000:]}")
    try:
        return Facts.from_dict(json.loads(res.stdout))
    except (ValueError, KeyError, TypeError) as exc:
        raise ProbeError(f"the probe in namespace {netns} answered something unusable: {exc}") from None


# --------------------------------------------------------------------------------------------
# Collecting here
# --------------------------------------------------------------------------------------------
def run_tool(argv: list[str], timeout: float = 10.0) -> Output:
    """Run a read-only command; a missing tool, a timeout or a failure is an :class:`Output` error."""
    if shutil.which(argv[0]) is None:
        return Output(error=f"{argv[0]} is not installed")
    log.debug("run: %s", " ".join(argv))
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Output(error=f"'{' '.join(argv)}' did not finish within {timeout:g} s")
    except OSError as exc:
        return Output(error=f"cannot run {argv[0]}: {exc.strerror or exc}")
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        return Output(error=f"'{' '.join(argv)}' failed ({res.returncode})" + (f": {err[-1]}" if err else ""))
    return Output(text=res.stdout)


def read_text(path: str | Path, limit: int = CONF_MAX, tail: bool = False) -> Output:
    try:
        with open(path, "rb") as fh:
            if tail:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - limit))
            data = fh.read(limit)
    except OSError as exc:
        return Output(error=exc.strerror or str(exc))
    return Output(text=data.decode(errors="replace"))


def legacy_mangle(timeout: float) -> Output:
    """``iptables-legacy -t mangle -S -v``, but only if the legacy mangle table exists here:
    listing it would create it (and register its hooks)."""
    names = read_text("/proc/net/ip_tables_names")
    if not names.ok or "mangle" not in names.text.split():
        return Output(text="")
    return run_tool(["iptables-legacy", "-w", "5", "-t", "mangle", "-S", "-v"], timeout)


def strip_secrets(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith(SECRET_LINES)) + "\n"


def ipv4_conf(base: Path = Path("/proc/sys/net/ipv4/conf")) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError:
        return out
    for name in names:
        vals = {}
        for key in ("rp_filter", "src_valid_mark"):
            try:
                vals[key] = int((base / name / key).read_text().strip())
            except (OSError, ValueError):
                continue
        out[name] = vals
    return out


def _netns_id(pid: str = "self") -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _argv(pid: int) -> tuple[str, ...]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def processes_here() -> list[int]:
    """PIDs of the processes in this network namespace (other than this one)."""
    me = _netns_id()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _netns_id(entry) == me and me is not None:
            out.append(int(entry))
    return sorted(out)


def xl2tpd_config_path(argv: tuple[str, ...]) -> str:
    for i, a in enumerate(argv[:-1]):
        if a == "-c":
            return argv[i + 1]
    return DEFAULT_XL2TPD_CONF


def is_marker(argv: tuple[str, ...]) -> bool:
    named = any(a == "l2tp_marker.cli" or os.path.basename(a) == "l2tp-marker" for a in argv[:3])
    return named and "run" in argv


def _in_root(pid: int, path: str) -> str:
    """``path`` as process ``pid`` sees it (its mount namespace and working directory)."""
    return f"/proc/{pid}/root{path}" if path.startswith("/") else f"/proc/{pid}/cwd/{path}"


def _stderr_log(pid: int) -> str | None:
    """The file xl2tpd's stderr goes to, if it is a regular file (xl2tpd -D logs there)."""
    link = f"/proc/{pid}/fd/2"
    try:
        target = os.readlink(link)
        if target.startswith("/") and stat.S_ISREG(os.stat(link).st_mode):
            return target
    except OSError:
        pass
    return None


def collect_here(opts: ProbeOptions) -> Facts:
    t = opts.timeout
    pids = processes_here()
    xl2tpd, markers = [], []
    for pid in pids:
        argv = _argv(pid)
        if _comm(pid) == "xl2tpd":
            xl2tpd.append(Xl2tpdProcess(pid=pid, argv=argv, config_path=xl2tpd_config_path(argv)))
        elif is_marker(argv):
            markers.append(pid)

    configs: list[TextFile] = []
    seen: set[str] = set()
    for p in xl2tpd:
        if p.config_path in seen:
            continue
        seen.add(p.config_path)
        o = read_text(_in_root(p.pid, p.config_path))
        if not o.ok and p.config_path.startswith("/"):   # /proc/PID/root needs privileges; try as is
            o2 = read_text(p.config_path)
            o = o2 if o2.ok else o
        configs.append(TextFile(p.config_path, o.text, o.error, f"xl2tpd pid {p.pid}"))
    for path in opts.xl2tpd_configs:
        o = read_text(path)
        configs.append(TextFile(path, o.text, o.error, "--xl2tpd-config"))
    if not configs and Path(DEFAULT_XL2TPD_CONF).exists():
        o = read_text(DEFAULT_XL2TPD_CONF)
        configs.append(TextFile(DEFAULT_XL2TPD_CONF, o.text, o.error, "default path, xl2tpd not running"))

    logs: list[TextFile] = []
    seen_logs: set[str] = set()
    for path in opts.xl2tpd_logs:
        o = read_text(path, LOG_TAIL, tail=True)
        logs.append(TextFile(path, o.text, o.error, "--xl2tpd-log"))
        seen_logs.add(os.path.realpath(path))
    for p in xl2tpd:
        target = _stderr_log(p.pid)
        if target is not None and os.path.realpath(target) not in seen_logs:
            seen_logs.add(os.path.realpath(target))
            o = read_text(f"/proc/{p.pid}/fd/2", LOG_TAIL, tail=True)
            logs.append(TextFile(target, o.text, o.error, f"stderr of xl2tpd pid {p.pid}"))

    status = status_error = None
    try:
        status = ask(Path(opts.control_socket), {"cmd": "status"}, timeout=min(t, 5.0))
    except ControlError as exc:
        status_error = str(exc)
    except OSError as exc:
        status_error = f"cannot ask {opts.control_socket}: {exc.strerror or exc}"

    nfq = read_text("/proc/net/netfilter/nfnetlink_queue")
    if not nfq.ok and not Path("/proc/net/netfilter/nfnetlink_queue").exists():
        nfq = Output(text="")   # the module is not loaded: no queue is bound
    xs = run_tool(["ip", "xfrm", "state"], t)
    return Facts(
        legacy_mangle=legacy_mangle(t),
        nft_mangle=run_tool(["iptables-nft", "-w", "5", "-t", "mangle", "-S", "-v"], t),
        # -t: without set and map elements (the fast path's map can hold a tunnel per client; no check
        # needs them, and loading them all costs time and memory)
        nft_ruleset=run_tool(["nft", "-t", "list", "ruleset"], t),
        xfrm_state=Output(text=strip_secrets(xs.text)) if xs.ok else xs,
        xfrm_policy=run_tool(["ip", "xfrm", "policy"], t),
        conntrack=run_tool(["conntrack", "-L", "-p", "udp", "--dport", "1701", "-o", "extended"], t),
        nfqueue=nfq,
        ipv4_conf=ipv4_conf(),
        xl2tpd=tuple(xl2tpd),
        xl2tpd_configs=tuple(configs),
        xl2tpd_logs=tuple(logs),
        marker_pids=tuple(markers),
        control_socket=opts.control_socket,
        status=status,
        status_error=status_error,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m l2tp_marker.doctor_probe OPTIONS_JSON``: print the facts here as JSON."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m l2tp_marker.doctor_probe OPTIONS_JSON", file=sys.stderr)
        return 2
    facts = collect_here(ProbeOptions.from_json(args[0]))
    json.dump(facts.to_dict(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
