"""`l2tp-marker capture`: its rules as data (exact argv), where its jumps go, the pcapng copy, and the
lifecycle (rules removed on every exit path) with a recording firewall and a stand-in tcpdump."""

from __future__ import annotations

import io
import os
import signal
import struct
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from l2tp_marker import capture as cap
from l2tp_marker.backends import BackendError
from l2tp_marker.capture import (CaptureError, CaptureOptions, CaptureRun, build_capture_rules,
                                 jump_position, pcap_to_pcapng, preflight)
from l2tp_marker.capture_io import (LINKTYPE_NFLOG, NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT, PcapWriter,
                                    nflog_frame, read_capture)
from l2tp_marker.cli import main
from l2tp_marker.rules import Rule, build_rules

NFLOG = "-j NFLOG --nflog-group 1701 --nflog-threshold 1"
C = "-m comment --comment l2tp-marker-capture"


# --------------------------------------------------------------------------- rules as data
def test_capture_rules_exact_argv_when_the_marker_is_not_running():
    cr = build_capture_rules(prefix="L2TP-MARKER")
    assert cr.table == "mangle"
    assert cr.chains == ("L2TP-MARKER-CAP-IN", "L2TP-MARKER-CAP-OUT")
    assert [" ".join(c) for c in cr.commands()] == [
        "-t mangle -N L2TP-MARKER-CAP-IN",
        "-t mangle -N L2TP-MARKER-CAP-OUT",
        # Inbound: all of udp/1701, marked or not; outbound: sport 1701. No batching in the kernel.
        f"-t mangle -A L2TP-MARKER-CAP-IN -p udp -m udp --dport 1701 {C} {NFLOG}",
        f"-t mangle -A L2TP-MARKER-CAP-OUT -p udp -m udp --sport 1701 {C} {NFLOG}",
        f"-t mangle -A INPUT -p udp -m udp --dport 1701 {C} -j L2TP-MARKER-CAP-IN",
        f"-t mangle -A OUTPUT -p udp -m udp --sport 1701 {C} -j L2TP-MARKER-CAP-OUT",
    ]


def test_capture_jumps_are_inserted_right_before_the_markers_jumps():
    cr = build_capture_rules(prefix="X", group=7)
    assert cr.anchors == (("INPUT", "X-IN"), ("OUTPUT", "X-OUT"))
    cmds = [" ".join(c) for c in cr.commands({"INPUT": 3, "OUTPUT": 0})]
    assert cmds[-2:] == [
        f"-t mangle -I INPUT 4 -p udp -m udp --dport 1701 {C} -j X-CAP-IN",  # iptables counts from 1
        f"-t mangle -I OUTPUT 1 -p udp -m udp --sport 1701 {C} -j X-CAP-OUT",
    ]
    assert "--nflog-group 7" in cmds[2]


def test_jump_position_is_the_first_jump_into_the_markers_chain():
    # INPUT as the lab has it: the plugin's CONNMARK rules on top, then the marker's jump.
    targets = ["CONNMARK", "CONNMARK", "L2TP-MARKER-IN", "ACCEPT", "L2TP-MARKER-IN"]
    assert jump_position(targets, "L2TP-MARKER-IN") == 2
    assert jump_position(["CONNMARK", "ACCEPT"], "L2TP-MARKER-IN") is None  # marker not running: append
    assert jump_position([], "L2TP-MARKER-IN") is None
    assert jump_position(["L2TP-MARKER-IN"], None) is None
    # Our own jump left over from a crash is not an anchor (install removes it first anyway).
    assert jump_position(["L2TP-MARKER-CAP-IN", "L2TP-MARKER-IN"], "L2TP-MARKER-IN") == 1


def test_capture_chains_fit_iptables_names_for_the_longest_prefix():
    cr = build_capture_rules(prefix="P" * 20)  # config.py allows up to 20 characters
    assert all(len(c) <= 28 for c in cr.chains)  # XT_EXTENSION_MAXNAMELEN - 1


def test_capture_rules_refuse_bad_group_and_threshold():
    with pytest.raises(ValueError):
        build_capture_rules(prefix="X", group=65536)
    with pytest.raises(ValueError):
        build_capture_rules(prefix="X", threshold=0)


def test_capture_chains_never_collide_with_the_markers():
    marker = build_rules(prefix="L2TP-MARKER", queue_in=1, queue_out=2, mark_mask=0xFFFFFFFF,
                         inbound_match="none")
    ours = build_capture_rules(prefix="L2TP-MARKER")
    assert not set(marker.chains) & set(ours.chains)
    # The marker's install removes jumps *into its own chains* only, so it never strips ours.
    assert not {j.target for j in ours.ruleset.jumps} & set(marker.chains)


def test_rule_argv_nflog_is_additive():
    assert Rule("C", "NFLOG", dport=1701, nflog_group=5).argv()[-4:] == ["-j", "NFLOG", "--nflog-group", "5"]
    assert Rule("C", "NFLOG", sport=1701).argv()[-2:] == ["-j", "NFLOG"]
    # NFQUEUE rules are exactly as before.
    assert Rule("C", "NFQUEUE", queue_num=3, queue_bypass=True).argv()[-5:] == [
        "-j", "NFQUEUE", "--queue-num", "3", "--queue-bypass"]


def test_to_iptc_builds_the_nflog_target():
    try:
        import iptc.easy
        from l2tp_marker.backends.iptables_legacy import to_iptc

        decoded = iptc.easy.decode_iptc_rule(to_iptc(build_capture_rules(prefix="X").ruleset.rules[0]))
    except Exception as exc:  # python-iptables needs the xtables libraries
        pytest.skip(f"python-iptables not usable here: {exc}")
    assert decoded["target"] == {"NFLOG": {"nflog-group": "1701", "nflog-threshold": "1"}}
    assert decoded["udp"] == {"dport": "1701"}
    assert decoded["comment"] == {"comment": "l2tp-marker-capture"}


# --------------------------------------------------------------------------- pcap -> pcapng
# IPv4 10.0.0.1:1701 -> 10.0.0.2:1701, an L2TP ZLB (checksums do not matter here).
IP = bytes.fromhex("4500002800010000401100000a0000010a000002" "06a506a500140000" "c802000c0000000000000000")


def _nflog_pcap(path: Path, packets) -> None:
    with PcapWriter(path, LINKTYPE_NFLOG) as w:
        for ts, mark, hook in packets:
            w.write(ts, nflog_frame(IP, mark=mark, hook=hook, group=1701))


def test_pcap_to_pcapng_keeps_marks_hooks_and_timestamps(tmp_path):
    src, dst = tmp_path / "a.pcap", tmp_path / "a.pcapng"
    pkts = [(1700000000.123456, 7, NF_INET_LOCAL_IN), (1700000001.5, None, NF_INET_LOCAL_OUT)]
    _nflog_pcap(src, pkts)
    assert pcap_to_pcapng(src, dst) == 2
    assert dst.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"
    got = list(read_capture(dst))
    assert [(p.linktype, p.mark, p.hook, p.ip) for p in got] == [
        (LINKTYPE_NFLOG, 7, NF_INET_LOCAL_IN, IP), (LINKTYPE_NFLOG, None, NF_INET_LOCAL_OUT, IP)]
    assert [p.ts for p in got] == pytest.approx([t for t, _, _ in pkts], abs=1e-6)


def test_pcap_to_pcapng_nanosecond_and_cut_record(tmp_path):
    src, dst = tmp_path / "n.pcap", tmp_path / "n.pcapng"
    frame = nflog_frame(IP, mark=3, hook=NF_INET_LOCAL_IN)
    with open(src, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, LINKTYPE_NFLOG))
        f.write(struct.pack("<IIII", 10, 999_999_999, len(frame), len(frame)) + frame)
        f.write(struct.pack("<IIII", 11, 0, len(frame), len(frame)) + frame[:5])  # writer interrupted
    assert pcap_to_pcapng(src, dst) == 1
    (p,) = list(read_capture(dst))
    assert p.ts == pytest.approx(10.999999999, abs=1e-9) and p.mark == 3
    with pytest.raises(CaptureError):
        pcap_to_pcapng(dst, tmp_path / "x")  # not a classic pcap


# --------------------------------------------------------------------------- lifecycle
FAKE_TCPDUMP = '''
import os, signal, sys, time
from l2tp_marker.capture_io import PcapWriter, LINKTYPE_NFLOG, nflog_frame
a = sys.argv[1:]
out, count = a[a.index("-w") + 1], int(a[a.index("-c") + 1]) if "-c" in a else None
mode = os.environ.get("FAKE_MODE", "ok")
Path = __import__("pathlib").Path
Path(os.environ["FAKE_ARGV"]).write_text(" ".join(a))
if mode == "fail":
    print("tcpdump: nflog:1701: Can't listen on group index: Operation not permitted", file=sys.stderr)
    sys.exit(1)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("tcpdump: listening on " + a[a.index("-i") + 1] + ", link-type NFLOG", file=sys.stderr, flush=True)
IP = bytes.fromhex(os.environ["FAKE_IP"])
with PcapWriter(out, LINKTYPE_NFLOG, flush_each=True) as w:
    for i, (mark, hook) in enumerate([(1, 1), (None, 3), (2, 1)]):
        w.write(1700000000 + i, nflog_frame(IP, mark=mark, hook=hook))
if mode == "die":
    time.sleep(0.2)
    sys.exit(3)
if count is None:
    while not stop:
        time.sleep(0.01)
print("3 packets captured\\n3 packets received by filter\\n0 packets dropped by kernel", file=sys.stderr)
'''


class RecordingFirewall:
    def __init__(self, fail_install: bool = False, positions=None):
        self.calls: list[str] = []
        self.fail_install = fail_install
        self.positions = positions if positions is not None else {"INPUT": 2, "OUTPUT": None}

    def is_supported(self):
        return True, "recording"

    def install(self, rules):
        self.calls.append("install")
        if self.fail_install:
            raise BackendError("installing rules in legacy mangle failed: boom")
        return 0, dict(self.positions)

    def remove(self, rules):
        self.calls.append("remove")
        return 6


@pytest.fixture
def fake_tcpdump(tmp_path, monkeypatch):
    script = tmp_path / "tcpdump"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_TCPDUMP))
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_IP", IP.hex())
    monkeypatch.setenv("FAKE_ARGV", str(tmp_path / "argv"))
    monkeypatch.setenv("PYTHONPATH", str(Path(cap.__file__).resolve().parents[1]))
    return script


def _run(tmp_path, fake_tcpdump, fw, **kw):
    opts = CaptureOptions(path=tmp_path / "out.pcap", tcpdump=str(fake_tcpdump), drain_quiet=0.05, **kw)
    out, err = io.StringIO(), io.StringIO()
    run = CaptureRun(opts, firewall=fw, out=out, err=err)
    rc = run.run()
    return rc, run, out.getvalue(), err.getvalue()


def test_duration_stop_removes_rules_and_prints_the_replay_command(tmp_path, fake_tcpdump):
    fw = RecordingFirewall()
    rc, run, out, err = _run(tmp_path, fake_tcpdump, fw, duration=0.3)
    assert rc == 0, err
    assert fw.calls == ["install", "remove"]
    assert "-I INPUT 3 -p udp -m udp --dport 1701" in out and "-A OUTPUT -p udp -m udp --sport 1701" in out
    assert "3 packets captured (2 inbound, 1 outbound)" in out
    assert out.rstrip().endswith(f"l2tp-marker replay {tmp_path / 'out.pcap'}")
    argv = (tmp_path / "argv").read_text().split()
    assert argv[:2] == ["-i", "nflog:1701"] and "-U" in argv and "-c" not in argv
    assert run.proc is None and run.result.stopped_by == "0.3 s elapsed"


def test_count_stop_and_pcapng(tmp_path, fake_tcpdump):
    fw = RecordingFirewall()
    rc, run, out, _ = _run(tmp_path, fake_tcpdump, fw, count=3, pcapng=True, group=42)
    assert rc == 0 and fw.calls == ["install", "remove"]
    argv = (tmp_path / "argv").read_text().split()
    assert argv[argv.index("-c") + 1] == "3" and argv[1] == "nflog:42"
    assert run.result.stopped_by == "--count 3 reached"
    assert [(p.mark, p.hook) for p in read_capture(tmp_path / "out.pcap")] == [(1, 1), (None, 3), (2, 1)]
    assert (tmp_path / "out.pcap").read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"
    assert not (tmp_path / "out.pcap.nflog.pcap").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stop_removes_rules_and_restores_handlers(tmp_path, fake_tcpdump, sig):
    before = signal.getsignal(sig)
    fw = RecordingFirewall()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), sig))
    timer.start()
    try:
        rc, run, out, _ = _run(tmp_path, fake_tcpdump, fw)
    finally:
        timer.cancel()
    assert rc == 0 and fw.calls == ["install", "remove"]
    assert run.result.stopped_by == sig.name
    assert signal.getsignal(sig) is before


def test_install_failure_removes_what_may_be_there_and_stops_tcpdump(tmp_path, fake_tcpdump):
    fw = RecordingFirewall(fail_install=True)
    opts = CaptureOptions(path=tmp_path / "out.pcap", tcpdump=str(fake_tcpdump), drain_quiet=0.05)
    run = CaptureRun(opts, firewall=fw, out=io.StringIO(), err=io.StringIO())
    with pytest.raises(CaptureError, match="boom"):
        run.run()
    assert fw.calls == ["install", "remove"]
    assert run.proc is None  # stopped and reaped


def test_tcpdump_dying_is_an_error_and_rules_still_go(tmp_path, fake_tcpdump, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "die")
    fw = RecordingFirewall()
    rc, run, _, err = _run(tmp_path, fake_tcpdump, fw)
    assert rc == 1 and fw.calls == ["install", "remove"]
    assert "tcpdump exited unexpectedly (status 3)" in err


def test_tcpdump_that_cannot_listen_installs_nothing(tmp_path, fake_tcpdump, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "fail")
    fw = RecordingFirewall()
    opts = CaptureOptions(path=tmp_path / "out.pcap", tcpdump=str(fake_tcpdump))
    with pytest.raises(CaptureError, match="Operation not permitted.*try --group"):
        CaptureRun(opts, firewall=fw, out=io.StringIO(), err=io.StringIO()).run()
    assert fw.calls == []


# --------------------------------------------------------------------------- clear errors, exit 2
def test_preflight_errors(tmp_path, monkeypatch, fake_tcpdump):
    ok = CaptureOptions(path=tmp_path / "x.pcap", tcpdump=str(fake_tcpdump))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    preflight(ok)
    assert not ok.path.exists()  # the writability probe leaves nothing behind
    with pytest.raises(CaptureError, match="tcpdump not found"):
        preflight(CaptureOptions(path=ok.path, tcpdump=str(tmp_path / "nope" / "tcpdump")))
    with pytest.raises(CaptureError, match="cannot write .*No such file"):
        preflight(CaptureOptions(path=tmp_path / "no" / "x.pcap", tcpdump=str(fake_tcpdump)))
    with pytest.raises(CaptureError, match="is a directory"):
        preflight(CaptureOptions(path=tmp_path, tcpdump=str(fake_tcpdump)))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CaptureError, match="needs root"):
        preflight(ok)


@pytest.mark.parametrize("argv, needle", [
    (["capture", "-w", "/nonexistent-dir/x.pcap"], "cannot write /nonexistent-dir/x.pcap"),
    (["capture", "-w", "x.pcap", "--chain-prefix", "a b"], "chain_prefix"),
])
def test_cli_errors_exit_2_without_traceback(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cap.shutil, "which", lambda name: "/usr/bin/tcpdump")
    monkeypatch.setattr("l2tp_marker.config.DEFAULT_CONFIG_PATH", Path("/nonexistent/l2tp-marker.toml"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_not_root_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr("l2tp_marker.config.DEFAULT_CONFIG_PATH", Path("/nonexistent/l2tp-marker.toml"))
    assert main(["capture", "-w", str(tmp_path / "x.pcap")]) == 2
    assert "needs root" in capsys.readouterr().err


def test_cli_bad_group_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        main(["capture", "-w", "x.pcap", "--group", "70000"])
    assert e.value.code == 2
