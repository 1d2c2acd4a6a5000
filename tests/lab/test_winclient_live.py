"""The Windows-like client against a real xl2tpd LNS, in two network namespaces of its own.

Layout (all inside namespaces this module creates and always deletes)::

    wct-<pid>-c  192.0.2.10  --veth--  198.51.100.1  wct-<pid>-s
    winclient (udp/1701)                xl2tpd LNS (udp/1701) -> pppd stand-in (LCP echo)

xl2tpd hard-codes /usr/sbin/pppd and this kernel has no PPP, so xl2tpd runs in a private mount
namespace (``unshare -m --propagation private``) where a stand-in is bind-mounted over
/usr/sbin/pppd.  Needs root; skips otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "l2tp_marker" / "lab" / "pppd_standin.py"
MOUNTEXEC = REPO / "l2tp_marker" / "lab" / "mountexec.py"
SERVER_IP = "198.51.100.1"
CLIENT_IP = "192.0.2.10"
XL2TPD = "/usr/sbin/xl2tpd"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run the suite as root)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command"
    if not os.access(XL2TPD, os.X_OK):
        return f"needs {XL2TPD} (apt-get install xl2tpd)"
    if not os.path.exists("/usr/sbin/pppd"):
        return "needs /usr/sbin/pppd to exist as a bind-mount target (apt-get install ppp)"
    return None


if (_reason := _skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Lab:
    """Two namespaces joined by a veth pair, xl2tpd as LNS in the server one."""

    def __init__(self, workdir: Path) -> None:
        tag = f"wct-{os.getpid()}"
        self.server_ns, self.client_ns = f"{tag}-s", f"{tag}-c"
        self.veth_s, self.veth_c = f"wct{os.getpid()}s", f"wct{os.getpid()}c"
        self.dir = workdir
        self.xl2tpd: subprocess.Popen | None = None
        self.clients: list[subprocess.Popen] = []
        self.xl2tpd_log = workdir / "xl2tpd.log"
        self.has_standin = STANDIN.exists()

    # -- set-up ---------------------------------------------------------------------------
    def create(self) -> None:
        _run("ip", "netns", "add", self.server_ns)
        _run("ip", "netns", "add", self.client_ns)
        _run("ip", "link", "add", self.veth_s, "netns", self.server_ns,
             "type", "veth", "peer", "name", self.veth_c, "netns", self.client_ns)
        for ns, dev, me, peer in ((self.server_ns, self.veth_s, SERVER_IP, CLIENT_IP),
                                  (self.client_ns, self.veth_c, CLIENT_IP, SERVER_IP)):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{me}/32", "peer", f"{peer}/32", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")

    def start_xl2tpd(self) -> None:
        d = self.dir
        (d / "l2tp-secrets").write_text("")
        os.chmod(d / "l2tp-secrets", 0o600)
        (d / "ppp-options").write_text("")
        (d / "xl2tpd.conf").write_text(f"""\
[global]
listen-addr = {SERVER_IP}
port = 1701
ipsec saref = no
access control = no
auth file = {d / 'l2tp-secrets'}
debug avp = yes
debug network = yes
debug state = yes
debug tunnel = yes

[lns default]
ip range = 10.99.0.10-10.99.0.50
local ip = 10.99.0.1
require authentication = no
require chap = no
refuse pap = yes
challenge = no
length bit = yes
pppoptfile = {d / 'ppp-options'}
""")
        fake = d / "pppd"
        if self.has_standin:
            fake.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
        else:  # enough to prove tunnel and session set-up
            fake.write_text("#!/bin/sh\nexec sleep 3600\n")
        fake.chmod(0o755)
        xl2tpd = [XL2TPD, "-D", "-c", str(d / "xl2tpd.conf"), "-p", str(d / "xl2tpd.pid"),
                  "-C", str(d / "xl2tpd-control")]
        if MOUNTEXEC.exists():  # execs xl2tpd, so the PID we hold is xl2tpd's
            inner = [sys.executable, "-m", "l2tp_marker.lab.mountexec",
                     "--bind", str(fake), "/usr/sbin/pppd", "--", *xl2tpd]
        else:
            inner = ["sh", "-c", 'mount --bind "$0" /usr/sbin/pppd && exec "$@"', str(fake),
                     *xl2tpd]
        env = dict(os.environ, L2TP_LAB_TOKEN="lns", L2TP_LAB_DIR=str(d),
                   L2TP_LAB_ECHO_PEER="1", L2TP_LAB_ECHO_INTERVAL="0.5")
        with open(self.xl2tpd_log, "wb") as log:
            self.xl2tpd = subprocess.Popen(
                ["ip", "netns", "exec", self.server_ns,
                 "unshare", "-m", "--propagation", "private", *inner],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        listening = _wait_for(lambda: "Listening on IP address" in self.log(), timeout=10)
        assert listening, f"xl2tpd did not start:\n{self.log()}"

    # -- clients --------------------------------------------------------------------------
    def client(self, token: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        status = self.dir / f"{token}.json"
        with open(self.dir / f"{token}.log", "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.client_ns, sys.executable, "-m",
                 "l2tp_marker.lab.winclient", "--server", SERVER_IP, "--token", token,
                 "--status-file", str(status), "-v", *extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.clients.append(proc)
        return proc, status

    def log(self) -> str:
        try:
            return self.xl2tpd_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def standin_status(self) -> list[dict]:
        return [_read_json(p) for p in sorted(self.dir.glob("pppd-*.json"))]

    # -- tear-down ------------------------------------------------------------------------
    def destroy(self) -> None:
        for proc in self.clients:
            try:
                _stop(proc)
            except OSError:
                pass
        if self.xl2tpd is not None:
            try:
                _stop(self.xl2tpd)
            except OSError:
                pass
        for ns in (self.client_ns, self.server_ns):
            try:
                subprocess.run(["ip", "netns", "del", ns], check=False,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError:
                pass


@pytest.fixture
def lab(tmp_path: Path):
    lab = Lab(tmp_path)
    try:
        lab.create()
        lab.start_xl2tpd()
        yield lab
    finally:
        lab.destroy()


def _wait_state(status: Path, states: set[str], timeout: float) -> dict:
    return _wait_for(lambda: (st := _read_json(status)).get("state") in states and st,
                     timeout=timeout) or _read_json(status)


def test_client_establishes_against_xl2tpd_and_echo_flows(lab: Lab):
    proc, status = lab.client("win-1", "--tunnel-id", "1", "--session-id", "1",
                              "--echo-interval", "0.2", "--hello-interval", "1.5")
    st = _wait_state(status, {"established", "failed", "closed"}, timeout=10)
    assert st.get("state") == "established", f"{st}\n{lab.log()}"
    assert st["pid"] == proc.pid
    assert (st["tunnel_id"], st["session_id"]) == (1, 1)
    assert st["peer_tunnel_id"] and st["peer_session_id"]
    assert f"Remote: 1" in lab.log()  # xl2tpd's "Connection established to ... Remote: 1"
    assert "Call established with 192.0.2.10" in lab.log()

    if lab.has_standin:
        st = _wait_for(lambda: (s := _read_json(status)).get("echo_replies_ok", 0) >= 3
                       and s.get("echo_requests_answered", 0) >= 2 and s, timeout=10)
        assert st, f"echo did not flow: {_read_json(status)}"
        assert st["echo_replies_foreign"] == 0
        standin = _wait_for(lambda: [s for s in lab.standin_status()
                                     if s.get("replies_ok", 0) >= 1], timeout=5)
        assert standin and standin[0]["peer_token"] == "win-1", lab.standin_status()
        assert standin[0]["replies_foreign"] == 0

    # Our HELLO every 1.5 s gets acked: no retransmission.
    st = _wait_for(lambda: (s := _read_json(status)).get("hellos_sent", 0) >= 2 and s, timeout=6)
    assert st, _read_json(status)
    assert st["retransmissions"] == 0
    assert st["foreign_tunnel"] == 0
    assert st["error"] is None

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    final = _read_json(status)
    assert final["state"] == "closed", final
    closed = _wait_for(lambda: "Connection closed to 192.0.2.10, port 1701" in lab.log(), 5)
    assert closed, lab.log()
    assert "Call-Disconnect-Notify" in lab.log()


def test_second_client_with_same_tunnel_id_is_ignored_by_xl2tpd(lab: Lab):
    """The failure the product fixes: same peer address, same tunnel ID 1 -> ignored."""
    first, first_status = lab.client("win-1", "--duration", "8")
    assert _wait_state(first_status, {"established"}, timeout=10).get("state") == "established"
    # Same namespace, so the same source address; another port, as a NAT would give it.
    second, second_status = lab.client("win-2", "--local-port", "1702", "--setup-timeout", "3")
    assert second.wait(timeout=15) == 1
    st = _read_json(second_status)
    assert st["state"] == "failed", st
    assert "no SCCRP" in st["error"]
    assert "Peer requested tunnel 1 twice" in lab.log()
    # The first client is unaffected and ends by itself when --duration is over.
    assert first.wait(timeout=15) == 0
    final = _read_json(first_status)
    assert final["state"] == "closed" and final["error"] is None, final
    if lab.has_standin:
        assert final["echo_replies_ok"] > 0
