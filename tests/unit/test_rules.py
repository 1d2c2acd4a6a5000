"""Rules are data: the exact rule set a backend would apply, and the daemon's use of a backend."""

from __future__ import annotations

from l2tp_marker.config import DaemonConfig
from l2tp_marker.daemon import Daemon, ruleset_for
from l2tp_marker.engine import EngineConfig
from l2tp_marker.rules import build_rules


class RecordingBackend:
    name = "recording"

    def __init__(self, supported=(True, "ok")):
        self.calls: list[tuple[str, object]] = []
        self.supported = supported

    def is_supported(self):
        return self.supported

    def install(self, rs):
        self.calls.append(("install", rs))

    def remove(self, rs):
        self.calls.append(("remove", rs))

    def check(self, rs):
        return []


def test_default_rules_queue_only_what_must_be_judged_after_the_plugin():
    rs = build_rules(prefix="L2TP-MARKER", queue_in=1701, queue_out=1702, mark_mask=0xFFFFFFFF,
                     inbound_match="ipsec")
    assert rs.table == "mangle"
    assert [" ".join(c) for c in rs.commands()] == [
        "-t mangle -N L2TP-MARKER-IN",
        "-t mangle -N L2TP-MARKER-OUT",
        "-t mangle -A L2TP-MARKER-IN -p udp -m udp --dport 1701 -m mark ! --mark 0x0/0xffffffff "
        "-m policy --dir in --pol ipsec -m comment --comment l2tp-marker -j NFQUEUE --queue-num 1701 --queue-bypass",
        "-t mangle -A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m comment --comment l2tp-marker "
        "-j NFQUEUE --queue-num 1702 --queue-bypass",
        # Appended (-A), so the connmark plugin's rules, inserted at the top, run first.
        "-t mangle -A INPUT -p udp -m udp --dport 1701 -m comment --comment l2tp-marker -j L2TP-MARKER-IN",
        "-t mangle -A OUTPUT -p udp -m udp --sport 1701 -m comment --comment l2tp-marker -j L2TP-MARKER-OUT",
    ]


def test_lab_rules_drop_the_ipsec_match_and_honour_the_mask():
    rs = build_rules(prefix="X", queue_in=5, queue_out=6, mark_mask=0xFF00, inbound_match="none")
    (rin, rout) = rs.rules
    assert "policy" not in rin.argv()
    assert "0x0/0xff00" in rin.argv()
    assert rin.queue_num == 5 and rout.queue_num == 6 and rin.queue_bypass and rout.queue_bypass
    assert rs.chains == ("X-IN", "X-OUT")


def test_daemon_refuses_to_start_without_backend_support_and_installs_nothing(tmp_path):
    backend = RecordingBackend(supported=(False, "needs root"))
    cfg = DaemonConfig(state_file=tmp_path / "s.json", engine=EngineConfig())
    d = Daemon(cfg, backend=backend)
    try:
        d.start()
    except Exception as exc:
        assert "needs root" in str(exc)
    else:
        raise AssertionError("start() should refuse")
    assert backend.calls == []


def test_stop_saves_state_and_removes_rules_even_twice(tmp_path):
    backend = RecordingBackend()
    cfg = DaemonConfig(state_file=tmp_path / "s.json")
    d = Daemon(cfg, backend=backend)
    d.stop()
    d.stop()
    assert [c[0] for c in backend.calls] == ["remove", "remove"]
    assert backend.calls[0][1] == ruleset_for(cfg)
    assert (tmp_path / "s.json").exists()
