"""The live daemon on a real NFQUEUE in a private namespace, over loopback.

Two "clients" share one address (127.0.0.2:1701) and differ only in the socket mark they send with
(SO_MARK plays the decrypting SA); the "LNS" is a plain socket on 127.0.0.1:1701. This checks the
daemon's real netfilter path without xl2tpd: alias rewrite on the way in, restore and re-mark on the
way out (counted by mark in POSTROUTING), state across a restart, fail-open after SIGKILL and a clean
restart over the leftovers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2tp_marker import constants as C
from l2tp_marker.layers import AVPAssignedTunnelID, AVPHostName, AVPMessageType, AVPProtocolVersion, L2TPv2

from .nsutil import require_root_netns

pytestmark = [pytest.mark.lab, require_root_netns()]

ROOT = Path(__file__).resolve().parents[2]
LNS = ("127.0.0.1", 1701)
CLIENT = ("127.0.0.2", 1701)


def ns_run(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check)


class Agent:
    def __init__(self, ns: str):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).with_name("nsagent.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        assert "error" not in reply, reply
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Marker:
    def __init__(self, ns: str, tmp: Path):
        self.ns, self.tmp = ns, tmp
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        self.stderr = open(self.tmp / "marker.log", "ab")
        offset = self.stderr.tell()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, str(ROOT / ".venv/bin/l2tp-marker"), "--log-level", "debug", "run",
             "--inbound-match", "none", "--queue-in", "11", "--queue-out", "12",
             "--state-file", str(self.tmp / "state.json"), "--decision-log", str(self.tmp / "decisions.jsonl"),
             "--control-socket", str(self.tmp / "ctl.sock"), *extra],
            stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "ready" in (self.tmp / "marker.log").read_text(errors="replace")[offset:]:
                return
            assert self.proc.poll() is None, (self.tmp / "marker.log").read_text()
            time.sleep(0.05)
        raise AssertionError("daemon did not become ready: " + (self.tmp / "marker.log").read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(10)
        self.proc = None
        self.stderr.close()
        return rc

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def lab(tmp_path):
    ns = f"l2mt-{os.getpid()}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    agent = marker = None
    try:
        ns_run(ns, "ip", "link", "set", "lo", "up")
        for mark in (1, 2):
            ns_run(ns, "iptables-legacy", "-t", "mangle", "-A", "POSTROUTING", "-p", "udp", "--sport", "1701",
                   "-d", CLIENT[0], "-m", "mark", "--mark", str(mark))
        agent = Agent(ns)
        agent(op="bind", name="lns", addr=LNS[0], port=LNS[1])
        agent(op="bind", name="client", addr=CLIENT[0], port=CLIENT[1])
        marker = Marker(ns, tmp_path)
        yield ns, agent, marker
    finally:
        if marker is not None:
            marker.kill_if_running()
        if agent is not None:
            agent.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def sccrq(tid: int) -> str:
    return bytes(L2TPv2(tunnel_id=0, avps=[AVPMessageType(msg_type=C.SCCRQ), AVPProtocolVersion(),
                                           AVPHostName(hostname=b"win"), AVPAssignedTunnelID(tunnel_id=tid)])).hex()


def sccrp(to_tid: int, our_tid: int) -> str:
    return bytes(L2TPv2(tunnel_id=to_tid, avps=[AVPMessageType(msg_type=C.SCCRP), AVPProtocolVersion(),
                                                AVPHostName(hostname=b"gw"), AVPAssignedTunnelID(tunnel_id=our_tid)])).hex()


def data(to_tid: int) -> str:
    return bytes(L2TPv2(t=0, l=0, s=0, tunnel_id=to_tid, session_id=1) / b"\xff\x03\xc0\x21\x09\x01\x00\x04").hex()


def counts(ns: str) -> dict[int, int]:
    out = ns_run(ns, "iptables-legacy", "-t", "mangle", "-L", "POSTROUTING", "-v", "-n", "-x").stdout
    res = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+\d+\s+.*mark match 0x([0-9a-f]+)", line)
        if m:
            res[int(m.group(2), 16)] = int(m.group(1))
    return res


def marker_rules(ns: str) -> list[str]:
    return [l for l in ns_run(ns, "iptables-legacy", "-t", "mangle", "-S").stdout.splitlines() if "L2TP-MARKER" in l]


def recv_tid(agent: Agent, name: str) -> int:
    r = agent(op="recv", name=name, timeout=3)
    assert "hex" in r, f"{name} received nothing"
    return L2TPv2(bytes.fromhex(r["hex"])).tunnel_id


def recv_sccrq_tid(agent: Agent) -> int:
    r = agent(op="recv", name="lns", timeout=3)
    assert "hex" in r
    pkt = L2TPv2(bytes.fromhex(r["hex"]))
    return next(a.tunnel_id for a in pkt.avps if isinstance(a, AVPAssignedTunnelID))


def test_alias_remark_restart_and_sigkill_fallback(lab):
    ns, agent, marker = lab
    marker.start()
    rules = marker_rules(ns)
    assert len(rules) == 8 and all("--queue-bypass" in r for r in rules if "NFQUEUE" in r)

    # Client A (mark 1) and client B (mark 2) both offer tunnel ID 1.
    agent(op="send", name="client", to=list(LNS), hex=sccrq(1), mark=1)
    assert recv_sccrq_tid(agent) == 1
    agent(op="send", name="client", to=list(LNS), hex=sccrq(1), mark=2)
    assert recv_sccrq_tid(agent) == 0xFFFF  # the LNS sees B's tunnel under an alias

    # The LNS answers both; B's answer goes to the alias and must come back as tunnel 1 on mark 2.
    agent(op="send", name="lns", to=list(CLIENT), hex=sccrp(1, 100))
    assert recv_tid(agent, "client") == 1
    agent(op="send", name="lns", to=list(CLIENT), hex=sccrp(0xFFFF, 200))
    assert recv_tid(agent, "client") == 1
    assert counts(ns) == {1: 1, 2: 1}

    # `status` shows what the daemon knows, as JSON and as a table.
    st = json.loads(subprocess.run([str(ROOT / ".venv/bin/l2tp-marker"), "status", "--json", "--socket",
                                    str(marker.tmp / "ctl.sock")], capture_output=True, text=True, check=True).stdout)
    assert st["rule_problems"] == []
    assert sorted((t["mark"], t["client_tid"], t["alias"], t["gateway_tid"]) for t in st["tunnels"]) == [
        (1, 1, None, 100), (2, 1, 0xFFFF, 200)]
    assert st["counters"]["sccrq_aliased"] == 1
    table = subprocess.run([str(ROOT / ".venv/bin/l2tp-marker"), "status", "--socket", str(marker.tmp / "ctl.sock")],
                           capture_output=True, text=True, check=True).stdout
    assert "2 tunnel(s)" in table and "65535" in table and "rules OK" in table

    # Restart: state comes back, B's data still restored and marked 2.
    assert marker.stop() == 0
    assert marker_rules(ns) == []
    marker.start()
    agent(op="send", name="lns", to=list(CLIENT), hex=data(0xFFFF))
    assert recv_tid(agent, "client") == 1
    assert counts(ns) == {1: 1, 2: 2}

    # SIGKILL: rules stay. The leftover kernel fast path still marks the tunnels it knew (its
    # bit cleared by the leftover legacy rules); anything else passes unjudged (--queue-bypass:
    # plain connmark behaviour).
    marker.stop(signal.SIGKILL)
    assert len(marker_rules(ns)) == 8
    agent(op="send", name="lns", to=list(CLIENT), hex=data(1))
    assert recv_tid(agent, "client") == 1
    assert counts(ns) == {1: 2, 2: 2}  # marked by the leftover map
    agent(op="send", name="lns", to=list(CLIENT), hex=data(7))
    assert recv_tid(agent, "client") == 7
    assert counts(ns) == {1: 2, 2: 2}  # an unknown tunnel: nobody marked it

    # The next start cleans the leftovers without duplicating them and judges again.
    marker.start()
    assert len(marker_rules(ns)) == 8
    agent(op="send", name="lns", to=list(CLIENT), hex=data(1))
    assert recv_tid(agent, "client") == 1
    assert counts(ns) == {1: 3, 2: 2}
    assert marker.stop() == 0
    assert marker_rules(ns) == []
    assert not (marker.tmp / "ctl.sock").exists()
    r = subprocess.run([str(ROOT / ".venv/bin/l2tp-marker"), "status", "--socket", str(marker.tmp / "ctl.sock")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no l2tp-marker daemon is running" in r.stderr

    log = [json.loads(l) for l in (marker.tmp / "decisions.jsonl").read_text().splitlines()]
    aliased = [r for r in log if r["reason"] == "sccrq_aliased"]
    assert len(aliased) == 1 and aliased[0]["rewrite"] == {"assigned_tunnel_id": 0xFFFF}
    assert {"no", "dir", "peer", "kind", "tunnel", "session", "mark_in", "mark", "rewrite", "reason"} <= set(log[0])


def status(marker: Marker) -> dict:
    return json.loads(subprocess.run([str(ROOT / ".venv/bin/l2tp-marker"), "status", "--json", "--socket",
                                      str(marker.tmp / "ctl.sock")], capture_output=True, text=True,
                                     check=True).stdout)


def test_flushed_rules_are_repaired_and_metrics_exported(lab):
    ns, agent, marker = lab
    marker.start("--repair-interval", "0.3", "--metrics-listen", "127.0.0.1:9717",
                 "--metrics-textfile", str(marker.tmp / "metrics.prom"), "--metrics-interval", "0.5")
    agent(op="send", name="client", to=list(LNS), hex=sccrq(1), mark=1)
    assert recv_sccrq_tid(agent) == 1
    # An administrator (or a firewall reload) flushes the built-in chains: the jumps are gone.
    ns_run(ns, "iptables-legacy", "-t", "mangle", "-F", "INPUT")
    ns_run(ns, "iptables-legacy", "-t", "mangle", "-F", "OUTPUT")
    deadline = time.monotonic() + 10
    while status(marker)["rule_repairs"] < 1:
        assert time.monotonic() < deadline, "rules were not repaired"
        time.sleep(0.1)
    assert len(marker_rules(ns)) == 8 and status(marker)["rule_problems"] == []
    # Judging works again after the repair: B's colliding SCCRQ is aliased.
    agent(op="send", name="client", to=list(LNS), hex=sccrq(1), mark=2)
    assert recv_sccrq_tid(agent) == 0xFFFF

    body = ns_run(ns, sys.executable, "-c", "import urllib.request;"
                  "print(urllib.request.urlopen('http://127.0.0.1:9717/metrics', timeout=5).read().decode())").stdout
    assert 'l2tp_marker_packets_total{direction="in",reason="sccrq_aliased"} 1' in body
    assert 'l2tp_marker_tunnels{state="pending"} 2' in body
    assert "l2tp_marker_rule_repairs_total 1" in body
    assert 'l2tp_marker_queue_drops_total{queue="11",direction="in",kind="queue_dropped"} 0' in body
    deadline = time.monotonic() + 10
    textfile = marker.tmp / "metrics.prom"
    while not textfile.exists() or 'reason="sccrq_aliased"} 1' not in textfile.read_text():
        assert time.monotonic() < deadline, "textfile not written"
        time.sleep(0.1)
    assert marker.stop() == 0
