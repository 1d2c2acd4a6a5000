"""``l2tp-marker doctor`` against the namespace lab (root only): healthy, then broken one way at a time.

Each test builds its own lab with two Windows-like clients that both offer tunnel ID 1 (``make_lab``
checks afterwards that nothing is left behind), runs doctor on the gateway namespace, breaks one
thing, and asserts that doctor names that fault (check name and level), not only its exit code.
The marker runs with a long ``--repair-interval`` so that it does not put damaged rules back
before doctor looks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import l2tp_marker
from l2tp_marker.config import DaemonConfig
from l2tp_marker.daemon import ruleset_for
from l2tp_marker.lab.marker import MarkerProcess
from l2tp_marker.lab.topology import ClientSpec, mangle_rules, wait_for

pytestmark = pytest.mark.lab

WIN = ClientSpec("win", 1, 1)
RULES = ruleset_for(DaemonConfig(inbound_match="none"))   # what MarkerProcess installs
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    filter(None, [str(Path(l2tp_marker.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}


class Doctor:
    def __init__(self, returncode: int, doc: dict, stderr: str):
        self.returncode = returncode
        self.doc = doc
        self.checks = {c["name"]: c for c in doc.get("checks", ())}
        self.stderr = stderr

    def __getitem__(self, name: str) -> dict:
        return self.checks[name]

    def text(self) -> str:
        return "\n".join(f"{c['level']:<4}  {c['name']}: {c['summary']}" for c in self.checks.values()) \
            + (f"\nstderr: {self.stderr}" if self.stderr else "")

    def fails(self) -> list[str]:
        return [n for n, c in self.checks.items() if c["level"] == "FAIL"]


def run_doctor(lab, marker: MarkerProcess | None, *extra: str) -> Doctor:
    socket = marker.control_socket if marker is not None else lab.workdir / "marker" / "control.sock"
    argv = [sys.executable, "-m", "l2tp_marker.cli", "doctor", "--netns", lab.gw_ns, "--socket", str(socket),
            "--inbound-match", "none", "--json", *extra]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode in (0, 1), res.stderr
    doc = json.loads(res.stdout)
    d = Doctor(res.returncode, doc, res.stderr)
    assert d.returncode == (1 if d.fails() else 0), d.text()
    return d


def up(lab, *, marker: bool = True) -> MarkerProcess | None:
    lab.start_lns()
    m = None
    if marker:
        m = MarkerProcess(lab, "--repair-interval", "3600")
        m.start()
    lab.start_clients()
    if marker:
        assert lab.wait_established(20), lab.report().format()
    return m


def assert_named(d: Doctor, name: str, level: str, *words: str) -> None:
    c = d[name]
    assert c["level"] == level, d.text()
    for w in words:
        assert w in c["summary"], d.text()
    if level in ("WARN", "FAIL"):
        assert c["fix"], d.text()


def test_healthy_lab_has_no_fail(make_lab):
    with make_lab([WIN, WIN]) as lab:
        marker = up(lab)
        d = run_doctor(lab, marker)
        text = subprocess.run([sys.executable, "-m", "l2tp_marker.cli", "doctor", "--netns", lab.gw_ns,
                               "--socket", str(marker.control_socket), "--inbound-match", "none"],
                              capture_output=True, text=True, timeout=120, env=ENV)
        marker.stop()
    assert d.returncode == 0 and d.fails() == [], d.text()
    for name in ("xl2tpd", "xl2tpd-saref", "connmark-plugin", "marker-rules", "queue-bypass", "marker-jumps",
                 "rule-order", "nft-route-pitfall", "rp-filter", "daemon", "daemon-queues", "daemon-rules"):
        assert d[name]["level"] == "PASS", d.text()
    # No ESP in the lab: no SAs, and that is not a fault.
    assert d["ipsec-sa-marks"]["level"] == "INFO", d.text()
    # Both clients share one conntrack entry, and the marker handles it; the second tunnel 1 was aliased.
    assert_named(d, "conntrack-merge", "PASS", "2 clients from 192.0.2.10", "the marker runs")
    assert_named(d, "tunnel-ids", "PASS", "1 tunnel(s) aliased")
    assert text.returncode == 0, text.stdout + text.stderr
    assert "PASS  marker-rules:" in text.stdout and "0 FAIL" in text.stdout, text.stdout


# -- one fault at a time -------------------------------------------------------------------------------
def kill_marker(lab, marker):
    assert marker.stop(signal.SIGKILL) == -signal.SIGKILL


def jump_above_connmark(lab, marker):
    jump = RULES.jumps[0]   # INPUT -> L2TP-MARKER-IN
    lab.gw_run(["iptables-legacy", "-t", "mangle", "-D", "INPUT", *jump.argv()], check=True)
    lab.gw_run(["iptables-legacy", "-t", "mangle", "-I", "INPUT", "1", *jump.argv()], check=True)


def drop_queue_bypass(lab, marker):
    rule = replace(RULES.rules[1], queue_bypass=False)   # L2TP-MARKER-OUT's NFQUEUE rule
    lab.gw_run(["iptables-legacy", "-t", "mangle", "-R", rule.chain, "1", *rule.argv()], check=True)


def delete_connmark_restore(lab, marker):
    for argv in mangle_rules(lab.config):
        if argv[3:5] == ["-I", "OUTPUT"]:
            lab.gw_run(argv[:3] + ["-D", "OUTPUT"] + argv[6:], check=True)


def strict_rp_filter(lab, marker):
    lab.gw_run(["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.all.src_valid_mark=0"],
               check=True)


def nfqueue_in_iptables_nft(lab, marker):
    cfg = lab.config
    lab.gw_run(["iptables-nft", "-t", "mangle", "-A", "OUTPUT", "-s", f"{cfg.gw_ip}/32", "-d", f"{cfg.nat_ip}/32",
                "-m", "mark", "--mark", "0x0/0xffffffff", "-j", "CONNMARK", "--restore-mark",
                "--ctmask", "0xffffffff", "--nfmask", "0xffffffff"], check=True)
    lab.gw_run(["iptables-nft", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--sport", "1701",
                "-j", "NFQUEUE", "--queue-num", "1799", "--queue-bypass"], check=True)


def saref_on(lab, marker):
    conf = lab.lns_dir / "xl2tpd.conf"   # the running LNS's config (doctor finds it from its command line)
    conf.write_text(conf.read_text().replace("ipsec saref = no", "ipsec saref = yes"))


def stop_xl2tpd(lab, marker):
    lab.stop_lns()


FAULTS = [
    # (break, check name, level, words the summary must contain)
    (kill_marker, "daemon", "FAIL", ("not running",)),
    (kill_marker, "daemon-queues", "FAIL", ("in 1701, out 1702 not bound",)),
    (jump_above_connmark, "rule-order", "FAIL", ("INPUT: the jump to L2TP-MARKER-IN (rule 1)", "NFQUEUE ends")),
    (drop_queue_bypass, "queue-bypass", "FAIL", ("without --queue-bypass", "L2TP-MARKER-OUT")),
    (delete_connmark_restore, "connmark-plugin", "WARN", ("OUTPUT has no --restore-mark",)),
    (strict_rp_filter, "rp-filter", "FAIL", ("rp_filter=1 with src_valid_mark=0", "c1", "c2")),
    (nfqueue_in_iptables_nft, "nft-route-pitfall", "FAIL", ("iptables-nft mangle OUTPUT", "NFQUEUE",
                                                            "reroutes only when")),
    (saref_on, "xl2tpd-saref", "FAIL", ("'ipsec saref = yes'", "xl2tpd.conf")),
    (stop_xl2tpd, "xl2tpd", "FAIL", ("not running",)),
]


@pytest.mark.parametrize("breaker,name,level,words", FAULTS,
                         ids=[f"{b.__name__}-{n}" for b, n, _l, _w in FAULTS])
def test_doctor_names_each_fault(make_lab, breaker, name, level, words):
    with make_lab([WIN, WIN]) as lab:
        marker = up(lab)
        before = run_doctor(lab, marker)
        breaker(lab, marker)
        after = run_doctor(lab, marker)
        marker.stop()
    assert before[name]["level"] == "PASS" and before.fails() == [], before.text()
    assert_named(after, name, level, *words)
    if level == "FAIL":
        assert after.returncode == 1


def test_queue_rule_without_bypass_also_breaks_the_marker_rules(make_lab):
    with make_lab([WIN, WIN]) as lab:
        marker = up(lab)
        drop_queue_bypass(lab, marker)
        d = run_doctor(lab, marker)
        marker.stop()
    assert_named(d, "marker-rules", "FAIL", "--queue-bypass no instead of yes")
    assert_named(d, "daemon-rules", "FAIL", "L2TP-MARKER-OUT")


def test_without_marker_doctor_shows_the_merged_entry_and_the_refused_tunnel(make_lab):
    with make_lab([WIN, WIN]) as lab:
        up(lab, marker=False)
        assert wait_for(lambda: any("Peer requested tunnel 1 twice" in line for line in lab.lns_log()), 20, 0.2), \
            "\n".join(lab.lns_log()[-20:])
        d = run_doctor(lab, None, "--xl2tpd-log", str(lab.lns_dir / "xl2tpd.log"))
    assert_named(d, "conntrack-merge", "WARN", "conntrack merges 2 clients from 192.0.2.10 into one entry",
                 "only the marker can return their traffic correctly")
    assert_named(d, "tunnel-ids", "FAIL", "Peer requested tunnel N twice", "tunnel 1", "xl2tpd.log")
    assert_named(d, "daemon", "FAIL", "not running")
    assert_named(d, "marker-rules", "FAIL", "not in legacy mangle")
    assert d.returncode == 1
