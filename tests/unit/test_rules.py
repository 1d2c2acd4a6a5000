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


# ------------------------------------------------------------------ the kernel fast path's bit
def test_fastpath_bit_skips_the_queue_and_clears_the_bit_after_it():
    rs = build_rules(prefix="L2TP-MARKER", queue_in=1701, queue_out=1702, mark_mask=0xFFFFFFFF,
                     inbound_match="ipsec", fastpath_bit=0x80000000)
    assert [" ".join(c) for c in rs.commands()] == [
        "-t mangle -N L2TP-MARKER-IN",
        "-t mangle -N L2TP-MARKER-OUT",
        "-t mangle -A L2TP-MARKER-IN -p udp -m udp --dport 1701 -m mark ! --mark 0x0/0xffffffff "
        "-m mark ! --mark 0x80000000/0x80000000 -m policy --dir in --pol ipsec -m comment --comment l2tp-marker "
        "-j NFQUEUE --queue-num 1701 --queue-bypass",
        "-t mangle -A L2TP-MARKER-IN -p udp -m udp --dport 1701 -m comment --comment l2tp-marker "
        "-j MARK --set-xmark 0x0/0x80000000",
        "-t mangle -A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m mark ! --mark 0x80000000/0x80000000 "
        "-m comment --comment l2tp-marker -j NFQUEUE --queue-num 1702 --queue-bypass",
        "-t mangle -A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m comment --comment l2tp-marker "
        "-j MARK --set-xmark 0x0/0x80000000",
        "-t mangle -A INPUT -p udp -m udp --dport 1701 -m comment --comment l2tp-marker -j L2TP-MARKER-IN",
        "-t mangle -A OUTPUT -p udp -m udp --sport 1701 -m comment --comment l2tp-marker -j L2TP-MARKER-OUT",
    ]
    # Another bit, another mask.
    rs = build_rules(prefix="X", queue_in=5, queue_out=6, mark_mask=0xFF, inbound_match="none", fastpath_bit=0x100)
    assert [(r.chain, r.target) for r in rs.rules] == [("X-IN", "NFQUEUE"), ("X-IN", "MARK"),
                                                       ("X-OUT", "NFQUEUE"), ("X-OUT", "MARK")]
    assert rs.rules[0].argv()[6:16] == ["-m", "mark", "!", "--mark", "0x0/0xff", "-m", "mark", "!", "--mark", "0x100/0x100"]
    assert rs.rules[3].argv()[-4:] == ["-j", "MARK", "--set-xmark", "0x0/0x100"]


def test_without_the_fastpath_bit_the_rules_are_unchanged():
    kw = dict(prefix="L2TP-MARKER", queue_in=1701, queue_out=1702, mark_mask=0xFFFFFFFF, inbound_match="ipsec")
    plain = build_rules(**kw)
    assert build_rules(**kw, fastpath_bit=None) == plain
    assert len(plain.rules) == 2 and all(r.bit_clear is None and r.target == "NFQUEUE" for r in plain.rules)
    cfg = DaemonConfig(fastpath_bit=0x100)
    assert ruleset_for(cfg) == build_rules(prefix=cfg.chain_prefix, queue_in=cfg.queue_in, queue_out=cfg.queue_out,
                                           mark_mask=cfg.engine.mark_mask, inbound_match=cfg.inbound_match)
    assert ruleset_for(cfg, kernel_fastpath=True).rules[1].clear_bits == 0x100


def test_to_iptc_builds_the_bit_match_and_the_mark_target():
    try:
        import iptc.easy
        from l2tp_marker.backends.iptables_legacy import to_iptc

        rs = build_rules(prefix="X", queue_in=5, queue_out=6, mark_mask=0xFF00, inbound_match="ipsec",
                         fastpath_bit=0x80000000)
        decoded = [iptc.easy.decode_iptc_rule(to_iptc(r)) for r in rs.rules]
    except Exception as exc:  # python-iptables needs the xtables libraries
        import pytest

        pytest.skip(f"python-iptables not usable here: {exc}")
    assert decoded[0]["mark"] == [{"mark": ["!", "0x0/0xff00"]}, {"mark": ["!", "0x80000000/0x80000000"]}]
    assert decoded[0]["target"] == {"NFQUEUE": {"queue-num": "5", "queue-bypass": ""}}
    assert decoded[1]["target"] == {"MARK": {"set-xmark": "0x0/0x80000000"}} and "mark" not in decoded[1]
    assert decoded[2]["mark"] == {"mark": ["!", "0x80000000/0x80000000"]}
    assert decoded[3]["target"] == {"MARK": {"set-xmark": "0x0/0x80000000"}} and decoded[3]["udp"] == {"sport": "1701"}


def test_daemon_chooses_the_fast_path_by_setting_and_support(tmp_path, monkeypatch):
    import pytest

    from l2tp_marker.backends import nft_fastpath
    from l2tp_marker.daemon import DaemonError

    support = {"v": (False, "no nftables here")}
    monkeypatch.setattr(nft_fastpath.KernelFastPath, "is_supported", lambda self: support["v"])
    for setting in ("auto", "on", "off"):
        d = Daemon(DaemonConfig(state_file=tmp_path / "s.json", fastpath=setting), backend=RecordingBackend())
        if setting == "on":
            with pytest.raises(DaemonError, match="fastpath = on.*no nftables here"):
                d._choose_fastpath()
            continue
        d._choose_fastpath()
        assert d.kernel is None and d.ruleset == ruleset_for(d.cfg)
        assert d.fastpath_mode == ("fallback" if setting == "auto" else "off")
    support["v"] = (True, "ok")
    d = Daemon(DaemonConfig(state_file=tmp_path / "s.json", chain_prefix="Lab-1"), backend=RecordingBackend())
    d._choose_fastpath()
    assert d.fastpath_mode == "kernel" and d.kernel.table == "lab_1" and d.kernel.bit == 0x80000000
    assert d.ruleset == ruleset_for(d.cfg, kernel_fastpath=True)
    d.kernel.close()
