"""``l2tp-marker doctor`` against the namespace lab (root only): healthy, then broken one way at a time.

Each test builds its own lab with two Windows-like clients that both offer tunnel ID 1 (``make_lab``
checks afterwards that nothing is left behind), runs doctor on the gateway namespace, breaks one
thing, and asserts that doctor names that fault (check name and level), not only its exit code.
The marker runs with a long ``--repair-interval`` so that it does not put damaged rules back
before doctor looks. It runs with the kernel fast path (nftables table ``ip l2tp_marker``, legacy
rules that skip the queue for the fast path's bit and clear it) unless a test turns it off.
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
from l2tp_marker.control import ask
from l2tp_marker.daemon import ruleset_for
from l2tp_marker.lab.marker import MarkerProcess
from l2tp_marker.lab.topology import ClientSpec, mangle_rules, wait_for
from l2tp_marker.rules import RuleSet

pytestmark = pytest.mark.lab

WIN = ClientSpec("win", 1, 1)
RULES = ruleset_for(DaemonConfig(inbound_match="none"))   # what MarkerProcess installs without the fast path
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


def run_doctor(lab, marker: MarkerProcess | None, *extra: str, inbound_match: str | None = "none") -> Doctor:
    socket = marker.control_socket if marker is not None else lab.workdir / "marker" / "control.sock"
    argv = [sys.executable, "-m", "l2tp_marker.cli", "doctor", "--netns", lab.gw_ns, "--socket", str(socket),
            *(["--inbound-match", inbound_match] if inbound_match else []), "--json", *extra]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode in (0, 1), res.stderr
    doc = json.loads(res.stdout)
    d = Doctor(res.returncode, doc, res.stderr)
    assert d.returncode == (1 if d.fails() else 0), d.text()
    return d


def up(lab, *, marker: bool = True, fastpath: str = "auto") -> MarkerProcess | None:
    lab.start_lns()
    m = None
    if marker:
        m = MarkerProcess(lab, "--repair-interval", "3600", "--fastpath", fastpath)
        m.start()
    lab.start_clients()
    if marker:
        assert lab.wait_established(20), lab.report().format()
    return m


def installed_rules(marker: MarkerProcess) -> RuleSet:
    """The rules the running daemon installed: with the fast path's bit when it reports using it."""
    st = ask(marker.control_socket, {"cmd": "status"}, timeout=5.0)
    return ruleset_for(DaemonConfig(inbound_match="none"), kernel_fastpath=st["fastpath"]["mode"] == "kernel")


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
                 "rule-order", "fastpath", "fastpath-bit", "nft-route-pitfall", "rp-filter", "daemon",
                 "daemon-queues", "daemon-rules"):
        assert d[name]["level"] == "PASS", d.text()
    # The lab's kernel runs the fast path: doctor expects its rule shapes and finds its table.
    assert_named(d, "marker-rules", "PASS", "the kernel fast-path form (bit 0x80000000)", "as the daemon reports")
    assert_named(d, "fastpath", "PASS", "kernel fast path in use: table ip l2tp_marker,", "1 outbound / 2 inbound")
    assert_named(d, "fastpath-bit", "PASS", "0x80000000", "marks 0x1, 0x2")
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
    rules = installed_rules(marker)
    out = [r for r in rules.rules if r.chain == rules.chains[1]]
    i = next(i for i, r in enumerate(out) if r.target == "NFQUEUE")   # L2TP-MARKER-OUT's NFQUEUE rule
    rule = replace(out[i], queue_bypass=False)
    lab.gw_run(["iptables-legacy", "-t", "mangle", "-R", rule.chain, str(i + 1), *rule.argv()], check=True)


def flush_mangle(lab):
    """What a firewall reload may do: flush legacy mangle and delete its user chains."""
    lab.gw_run(["iptables-legacy", "-t", "mangle", "-F"], check=True)
    lab.gw_run(["iptables-legacy", "-t", "mangle", "-X"], check=True)


def crash_and_flush_mangle(lab, marker):
    """A crash (the fast path's table stays), then someone flushes legacy mangle."""
    kill_marker(lab, marker)
    flush_mangle(lab)


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
    (kill_marker, "fastpath", "WARN", ("nftables table ip l2tp_marker is there but no daemon answers",)),
    (crash_and_flush_mangle, "fastpath", "FAIL", ("nftables table ip l2tp_marker is there",
                                                  "nothing in legacy mangle OUTPUT clears that bit",
                                                  "selects no SA")),
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


def test_crash_then_flushed_mangle_is_named_and_the_leftover_rules_pass_without_the_daemon(make_lab):
    with make_lab([WIN, WIN]) as lab:
        marker = up(lab)
        kill_marker(lab, marker)
        assert lab.nft_tables() == ["table ip l2tp_marker"]
        crashed = run_doctor(lab, None)
        flush_mangle(lab)
        flushed = run_doctor(lab, None)
        net = lab.gw_run(["nft", "list", "tables"], check=True).stdout
    # Right after the crash the leftover rules are the fast-path form: accepted without the daemon.
    assert_named(crashed, "marker-rules", "PASS", "the kernel fast-path form (bit 0x80000000)",
                 "the daemon does not answer, so either form is accepted")
    assert_named(crashed, "fastpath", "WARN", "no daemon answers")
    # Then the rules that clear the bit are gone, the table is not: known tunnels' data leaves with 0x8000000N.
    assert "table ip l2tp_marker" in net
    assert_named(flushed, "fastpath", "FAIL", "nothing in legacy mangle OUTPUT clears that bit",
                 "0x80000001 for mark 0x1", "died without removing its table")
    assert f"ip netns exec {lab.gw_ns} nft delete table ip l2tp_marker" in flushed["fastpath"]["fix"]
    assert_named(flushed, "marker-rules", "FAIL", "not in legacy mangle")



def test_doctor_takes_the_daemons_values_over_its_own_options(make_lab):
    with make_lab([WIN, WIN]) as lab:
        marker = up(lab)
        d = run_doctor(lab, marker, inbound_match=None)   # doctor's default: ipsec; the daemon runs with none
        marker.stop()
    assert d.fails() == [], d.text()
    assert_named(d, "marker-rules", "PASS", "as the daemon reports (its inbound_match none, not doctor's ipsec)")


def test_fastpath_off_lab_passes_with_the_old_rules(make_lab):
    with make_lab([WIN, WIN]) as lab:
        marker = up(lab, fastpath="off")
        d = run_doctor(lab, marker)
        tables = lab.nft_tables()
        marker.stop()
    assert tables == []
    assert d.returncode == 0 and d.fails() == [], d.text()
    assert_named(d, "marker-rules", "PASS", "the form without the fast path, as the daemon reports")
    assert_named(d, "fastpath", "INFO", "kernel fast path off")
    assert_named(d, "fastpath-bit", "INFO", "no mark bit is reserved")
