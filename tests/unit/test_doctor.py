"""doctor's pure checks over crafted facts (no root): every check, every level it can give."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from l2tp_marker.cli import main
from l2tp_marker.config import DaemonConfig
from l2tp_marker.daemon import ruleset_for
from l2tp_marker.doctor import (FAIL, INFO, PASS, WARN, Check, Facts, Output, TextFile, Xl2tpdProcess,
                                diagnose, exit_code, format_checks, nft_priority, parse_conntrack,
                                parse_iptables_save, parse_nft_tables, parse_xfrm_policies, parse_xfrm_states,
                                rule_from_listing, to_json)
from l2tp_marker.doctor_probe import (ProbeError, ProbeOptions, collect_in_netns, ipv4_conf, is_marker,
                                      run_tool, strip_secrets, xl2tpd_config_path)

RULESET = ruleset_for(DaemonConfig(inbound_match="none"))

PLUGIN = """\
-P PREROUTING ACCEPT -c 36 2142
-P INPUT ACCEPT -c 0 0
-P FORWARD ACCEPT -c 0 0
-P OUTPUT ACCEPT -c 0 0
-P POSTROUTING ACCEPT -c 38 2124
"""
CHAINS = "-N L2TP-MARKER-IN\n-N L2TP-MARKER-OUT\n"
PREROUTING = """\
-A PREROUTING -i c2 -c 19 1126 -j MARK --set-xmark 0x2/0xffffffff
-A PREROUTING -i c1 -c 17 1016 -j MARK --set-xmark 0x1/0xffffffff
"""
IN_SET = """\
-A INPUT -s 192.0.2.10/32 -d 198.51.100.1/32 -m mark --mark 0x2 -c 19 1126 -j CONNMARK --set-xmark 0x2/0xffffffff
-A INPUT -s 192.0.2.10/32 -d 198.51.100.1/32 -m mark --mark 0x1 -c 17 1016 -j CONNMARK --set-xmark 0x1/0xffffffff
"""
IN_JUMP = "-A INPUT -p udp -m udp --dport 1701 -m comment --comment l2tp-marker -c 36 2142 -j L2TP-MARKER-IN\n"
OUT_RESTORE = """\
-A OUTPUT -s 198.51.100.1/32 -d 192.0.2.10/32 -m mark --mark 0x0 -c 38 2124 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A OUTPUT -s 198.51.100.1/32 -d 192.0.2.10/32 -m mark --mark 0x0 -c 0 0 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
"""
OUT_JUMP = "-A OUTPUT -p udp -m udp --sport 1701 -m comment --comment l2tp-marker -c 38 2124 -j L2TP-MARKER-OUT\n"
Q_IN = ("-A L2TP-MARKER-IN -p udp -m udp --dport 1701 -m mark ! --mark 0x0 -m comment --comment l2tp-marker "
        "-c 36 2142 -j NFQUEUE --queue-num 1701 --queue-bypass\n")
Q_OUT = ("-A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m comment --comment l2tp-marker -c 38 2124 "
         "-j NFQUEUE --queue-num 1702 --queue-bypass\n")


def listing(*, prerouting=PREROUTING, in_set=IN_SET, in_jump=IN_JUMP, out_restore=OUT_RESTORE,
            out_jump=OUT_JUMP, chains=CHAINS, q_in=Q_IN, q_out=Q_OUT, jump_first=False) -> str:
    inp = in_jump + in_set if jump_first else in_set + in_jump
    return PLUGIN + chains + prerouting + inp + out_restore + out_jump + q_in + q_out


NFT_EMPTY = "-P PREROUTING ACCEPT -c 0 0\n-P INPUT ACCEPT -c 0 0\n-P FORWARD ACCEPT -c 0 0\n" \
            "-P OUTPUT ACCEPT -c 0 0\n-P POSTROUTING ACCEPT -c 0 0\n"
CONNTRACK = ("ipv4     2 udp      17 119 src=192.0.2.10 dst=198.51.100.1 sport=1701 dport=1701 "
             "src=198.51.100.1 dst=192.0.2.10 sport=1701 dport=1701 [ASSURED] mark=2 use=1\n")
NFQUEUE = " 1702 2742549577     0 2  4016     0     0       38  1\n 1701   7200     0 2  4016     0     0       36  1\n"
LNS_CONF = ("[global]\nport = 1701\nipsec saref = no\nforce userspace = yes\n\n[lns default]\n"
            "ip range = 203.0.113.100-203.0.113.199\n")
STATUS = {
    "tunnels": [
        {"peer": "192.0.2.10:1701", "client_tid": 1, "alias": None, "gateway_tid": 7476, "mark": 1},
        {"peer": "192.0.2.10:1701", "client_tid": 1, "alias": 65535, "gateway_tid": 44759, "mark": 2},
    ],
    "daemon": {"pid": 6849, "uptime": 2.6, "queues": {"in": 1701, "out": 1702}, "backend": "iptables-legacy",
               "chains": ["L2TP-MARKER-IN", "L2TP-MARKER-OUT"]},
    "rule_problems": [], "rule_repairs": 0,
}
CONF = {"all": {"rp_filter": 0, "src_valid_mark": 1}, "default": {"rp_filter": 0, "src_valid_mark": 0},
        "lo": {"rp_filter": 0, "src_valid_mark": 0}, "c1": {"rp_filter": 0, "src_valid_mark": 0},
        "c2": {"rp_filter": 0, "src_valid_mark": 0}}

HEALTHY = Facts(
    netns="lab-gw",
    legacy_mangle=Output(listing()),
    nft_mangle=Output(NFT_EMPTY),
    nft_ruleset=Output(""),
    xfrm_state=Output(""),
    xfrm_policy=Output(""),
    conntrack=Output(CONNTRACK),
    nfqueue=Output(NFQUEUE),
    ipv4_conf=CONF,
    xl2tpd=(Xl2tpdProcess(100, ("/usr/sbin/xl2tpd", "-D", "-c", "/lab/lns.conf"), "/lab/lns.conf"),),
    xl2tpd_configs=(TextFile("/lab/lns.conf", LNS_CONF, source="xl2tpd pid 100"),),
    xl2tpd_logs=(TextFile("/lab/xl2tpd.log", "xl2tpd[100]: Listening on IP address 0.0.0.0, port 1701\n"),),
    marker_pids=(6849,),
    control_socket="/lab/control.sock",
    status=STATUS,
    ruleset=RULESET,
)

NO_DAEMON = replace(HEALTHY, status=None, status_error="no l2tp-marker daemon is running", marker_pids=(),
                    nfqueue=Output(""))

# -- the same gateway with the kernel fast path (as `iptables-legacy -t mangle -S -v` and `nft -t list
# ruleset` show a daemon started with the defaults and --inbound-match none) ----------------------------
BIT = 0x80000000
Q_IN_FP = ("-A L2TP-MARKER-IN -p udp -m udp --dport 1701 -m mark ! --mark 0x0 -m mark ! --mark 0x80000000/0x80000000 "
           "-m comment --comment l2tp-marker -c 8 624 -j NFQUEUE --queue-num 1701 --queue-bypass\n")
IN_CLEAR = ("-A L2TP-MARKER-IN -p udp -m udp --dport 1701 -m comment --comment l2tp-marker -c 2 88 "
            "-j MARK --set-xmark 0x0/0x80000000\n")
Q_OUT_FP = ("-A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m mark ! --mark 0x80000000/0x80000000 -m comment "
            "--comment l2tp-marker -c 10 606 -j NFQUEUE --queue-num 1702 --queue-bypass\n")
OUT_CLEAR = ("-A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m comment --comment l2tp-marker -c 0 0 "
             "-j MARK --set-xmark 0x0/0x80000000\n")


def fp_listing(**kw) -> str:
    kw.setdefault("q_in", Q_IN_FP + IN_CLEAR)
    kw.setdefault("q_out", Q_OUT_FP + OUT_CLEAR)
    return listing(**kw)


NFT_FP = """\
table ip l2tp_marker {
\tmap out_marks {
\t\ttypeof ip daddr . udp dport . @th,96,16 : meta mark
\t}

\tset in_known {
\t\ttypeof ip saddr . udp sport . @th,96,16 . meta mark
\t}

\tchain out {
\t\ttype route hook output priority mangle - 10; policy accept;
\t\tudp sport 1701 @th,64,8 & 0xc0 == 0x40 @th,72,8 & 0xf == 0x2 meta mark set ip daddr . udp dport . @th,96,16 map @out_marks counter packets 0 bytes 0
\t\tudp sport 1701 @th,64,8 & 0xc0 == 0x0 @th,72,8 & 0xf == 0x2 meta mark set ip daddr . udp dport . @th,80,16 map @out_marks counter packets 0 bytes 0
\t}

\tchain in {
\t\ttype filter hook input priority mangle - 10; policy accept;
\t\tudp dport 1701 @th,64,8 & 0xc0 == 0x40 @th,72,8 & 0xf == 0x2 ip saddr . udp sport . @th,96,16 . meta mark @in_known meta mark set meta mark | 0x80000000 counter packets 2 bytes 88
\t\tudp dport 1701 @th,64,8 & 0xc0 == 0x0 @th,72,8 & 0xf == 0x2 ip saddr . udp sport . @th,80,16 . meta mark @in_known meta mark set meta mark | 0x80000000 counter packets 0 bytes 0
\t}
}
"""
FASTPATH = {"mode": "kernel", "reason": "nftables route chain with a tunnel map", "setting": "auto",
            "bit": BIT, "table": "l2tp_marker", "out_entries": 1, "in_entries": 2, "tunnels": 2,
            "aliased_tunnels": 1, "packets_out": 5, "packets_in": 2}
FP_STATUS = {**STATUS, "daemon": {**STATUS["daemon"], "inbound_match": "none", "mark_mask": 0xFFFFFFFF,
                                  "enforce": "log"},
             "fastpath": FASTPATH}
HEALTHY_FP = replace(HEALTHY, legacy_mangle=Output(fp_listing()), nft_ruleset=Output(NFT_FP), status=FP_STATUS,
                     fastpath_setting="auto", fastpath_bit=BIT)
FP_NO_DAEMON = replace(HEALTHY_FP, status=None, status_error="no l2tp-marker daemon is running", marker_pids=(),
                       nfqueue=Output(""))


def fp_status(**fastpath) -> dict:
    return {**FP_STATUS, "fastpath": {**FASTPATH, **fastpath}}


def by_name(facts: Facts) -> dict[str, Check]:
    checks = diagnose(facts)
    names = [c.name for c in checks]
    assert len(names) == len(set(names)), names
    return {c.name: c for c in checks}


def check(facts: Facts, name: str) -> Check:
    return by_name(facts)[name]


def assert_level(facts: Facts, name: str, level: str, *words: str) -> Check:
    c = check(facts, name)
    assert c.level == level, c
    for w in words:
        assert w in c.summary, c
    if level in (WARN, FAIL):
        assert c.fix, c
    return c


# -- the healthy lab gateway, output ---------------------------------------------------------
def test_healthy_gateway_has_no_fail_and_no_warn():
    checks = diagnose(HEALTHY)
    assert [c for c in checks if c.level in (WARN, FAIL)] == []
    assert exit_code(checks) == 0
    assert [c.name for c in checks] == [
        "xl2tpd", "xl2tpd-saref", "connmark-plugin", "ipsec-sa-marks", "ipsec-policy-marks", "marker-rules",
        "queue-bypass", "marker-jumps", "rule-order", "fastpath", "fastpath-bit", "nft-route-pitfall",
        "rp-filter", "conntrack-merge", "tunnel-ids", "daemon", "daemon-queues", "daemon-rules"]
    # No IPsec in the lab: the IPsec checks say so without failing.
    assert check(HEALTHY, "ipsec-sa-marks").level == INFO
    assert check(HEALTHY, "ipsec-policy-marks").level == INFO


def test_text_lines_and_json():
    checks = diagnose(NO_DAEMON)
    lines = format_checks(checks)
    assert "FAIL  daemon: the l2tp-marker daemon is not running in namespace lab-gw" in "\n".join(lines)
    i = next(i for i, line in enumerate(lines) if line.startswith("FAIL  daemon:"))
    assert lines[i + 1].startswith("      fix: start it")
    assert all(not line.startswith("      fix:") or lines[j - 1][:4] in ("WARN", "FAIL")
               for j, line in enumerate(lines))
    doc = to_json(checks, NO_DAEMON)
    assert doc["exit_code"] == exit_code(checks) == 1
    assert doc["counts"][FAIL] == sum(1 for c in checks if c.level == FAIL)
    (daemon,) = [c for c in doc["checks"] if c["name"] == "daemon"]
    assert daemon["level"] == FAIL and daemon["fix"].startswith("start it")
    json.dumps(doc)
    with pytest.raises(ValueError):
        Check("x", "BAD", "y")


def test_facts_survive_the_json_trip_from_the_namespace_probe():
    again = Facts.from_dict(json.loads(json.dumps(HEALTHY.to_dict())))
    assert again == replace(HEALTHY, ipv4_conf=again.ipv4_conf) and dict(again.ipv4_conf) == CONF
    assert again.ruleset == RULESET
    fp = Facts.from_dict(json.loads(json.dumps(HEALTHY_FP.to_dict())))
    assert (fp.fastpath_setting, fp.fastpath_bit) == ("auto", 0x80000000)
    assert fp.status == HEALTHY_FP.status and fp.nft_ruleset == HEALTHY_FP.nft_ruleset


# -- xl2tpd -------------------------------------------------------------------------------------
def test_xl2tpd_not_running_fails_and_two_warn():
    assert_level(replace(HEALTHY, xl2tpd=()), "xl2tpd", FAIL, "not running in namespace lab-gw")
    two = HEALTHY.xl2tpd + (Xl2tpdProcess(101, ("xl2tpd",), "/etc/xl2tpd/xl2tpd.conf"),)
    assert_level(replace(HEALTHY, xl2tpd=two), "xl2tpd", WARN, "2 xl2tpd processes")


@pytest.mark.parametrize("text,level", [
    ("[global]\nipsec saref = yes\n", FAIL),
    ("[global]\n  IPsec   SAref=Yes  ; old setting\n", FAIL),
    ("[global]\n; ipsec saref = yes\nipsec saref = no\n", PASS),
    ("[global]\nport = 1701\n", PASS),
])
def test_saref(text, level):
    facts = replace(HEALTHY, xl2tpd_configs=(TextFile("/x.conf", text, source="--xl2tpd-config"),))
    c = assert_level(facts, "xl2tpd-saref", level, "/x.conf")
    if level == FAIL:
        assert "KLIPS" in c.summary and "ipsec saref = no" in c.fix


def test_saref_unreadable_or_missing_config():
    unread = replace(HEALTHY, xl2tpd_configs=(TextFile("/x.conf", None, "Permission denied"),))
    assert_level(unread, "xl2tpd-saref", WARN, "Permission denied")
    assert check(replace(HEALTHY, xl2tpd_configs=()), "xl2tpd-saref").level == INFO


# -- connmark plugin ---------------------------------------------------------------------------
def test_connmark_plugin_rules_in_legacy_pass():
    assert_level(HEALTHY, "connmark-plugin", PASS, "marks 0x1, 0x2", "2 OUTPUT --restore-mark")


def test_connmark_restore_missing_warns():
    facts = replace(HEALTHY, legacy_mangle=Output(listing(out_restore="")))
    assert_level(facts, "connmark-plugin", WARN, "OUTPUT has no --restore-mark")


def test_connmark_set_missing_warns():
    facts = replace(HEALTHY, legacy_mangle=Output(listing(in_set="")))
    assert_level(facts, "connmark-plugin", WARN, "INPUT has no CONNMARK --set-xmark")


def test_connmark_restore_without_guard_warns():
    unguarded = OUT_RESTORE.replace("-m mark --mark 0x0 ", "")
    facts = replace(HEALTHY, legacy_mangle=Output(listing(out_restore=unguarded)))
    assert_level(facts, "connmark-plugin", WARN, "'-m mark --mark 0' guard")


def test_connmark_rules_only_in_nft_warn_naming_the_backend():
    nft = NFT_EMPTY + IN_SET + OUT_RESTORE
    facts = replace(HEALTHY, legacy_mangle=Output(listing(in_set="", out_restore="")), nft_mangle=Output(nft))
    assert_level(facts, "connmark-plugin", WARN, "only in the nft-based tables (iptables-nft")


def test_no_connmark_rules_anywhere_warn():
    facts = replace(HEALTHY, legacy_mangle=Output(""))
    assert_level(facts, "connmark-plugin", WARN, "no connmark plugin rules",
                 "return traffic has no mark unless marked otherwise")


def test_legacy_table_unreadable_is_a_fact_not_a_crash():
    facts = replace(HEALTHY, legacy_mangle=Output(error="iptables-legacy is not installed"))
    checks = by_name(facts)
    assert checks["connmark-plugin"].level == WARN and "not installed" in checks["connmark-plugin"].summary
    assert checks["marker-rules"].level == FAIL
    assert checks["rule-order"].level == INFO


# -- IPsec ---------------------------------------------------------------------------------------
def sa(src, dst, spi, reqid, mark=None, mask="0xffffffff"):
    mark_line = f"\tmark {mark}/{mask}\n" if mark is not None else ""
    return (f"src {src} dst {dst}\n\tproto esp spi {spi} reqid {reqid} mode transport\n"
            f"\treplay-window 0 flag af-unspec\n{mark_line}"
            f"\taead rfc4106(gcm(aes)) 0x0011223344556677 128\n"
            f"\tencap type espinudp sport 4500 dport 4500 addr 0.0.0.0\n"
            f"\tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000\n\tsel src 0.0.0.0/0 dst 0.0.0.0/0\n")


NAT, GW = "192.0.2.10", "198.51.100.1"
TWO_CLIENTS_SAS = (sa(NAT, GW, "0xc1", 1, "0x1") + sa(GW, NAT, "0xd1", 1, "0x1")
                   + sa(NAT, GW, "0xc2", 2, "0x2") + sa(GW, NAT, "0xd2", 2, "0x2"))


def test_xfrm_state_parse():
    states = parse_xfrm_states(TWO_CLIENTS_SAS)
    assert [(s.src, s.spi, s.reqid, s.mark, s.mode) for s in states] == [
        (NAT, "0xc1", 1, 1, "transport"), (GW, "0xd1", 1, 1, "transport"),
        (NAT, "0xc2", 2, 2, "transport"), (GW, "0xd2", 2, 2, "transport")]


def test_sa_marks_equal_pass():
    assert_level(replace(HEALTHY, xfrm_state=Output(TWO_CLIENTS_SAS)), "ipsec-sa-marks", PASS,
                 "2 SA pair(s)", "0x1, 0x2")


def test_sa_marks_in_out_differ_fail():
    text = sa(NAT, GW, "0xc1", 1, "0x1") + sa(GW, NAT, "0xd1", 1, "0x5")
    assert_level(replace(HEALTHY, xfrm_state=Output(text)), "ipsec-sa-marks", FAIL, "differ", "0x5")
    one_sided = sa(NAT, GW, "0xc1", 1, "0x1") + sa(GW, NAT, "0xd1", 1)
    assert_level(replace(HEALTHY, xfrm_state=Output(one_sided)), "ipsec-sa-marks", FAIL, "mark none")


def test_sa_without_marks_warn_and_shared_marks_warn():
    text = sa(NAT, GW, "0xc1", 1) + sa(GW, NAT, "0xd1", 1)
    assert_level(replace(HEALTHY, xfrm_state=Output(text)), "ipsec-sa-marks", WARN, "without a mark")
    shared = (sa(NAT, GW, "0xc1", 1, "0x1") + sa(GW, NAT, "0xd1", 1, "0x1")
              + sa(NAT, GW, "0xc2", 2, "0x1") + sa(GW, NAT, "0xd2", 2, "0x1"))
    assert_level(replace(HEALTHY, xfrm_state=Output(shared)), "ipsec-sa-marks", WARN, "share one mark")


def test_no_sas_is_info_and_unreadable_is_warn():
    assert check(HEALTHY, "ipsec-sa-marks").level == INFO
    assert_level(replace(HEALTHY, xfrm_state=Output(error="ip is not installed")), "ipsec-sa-marks", WARN)


POLICIES = """\
src 198.51.100.1/32 dst 192.0.2.10/32 proto udp sport 1701 dport 1701
\tdir out priority 0 ptype main
\tmark 0x1/0xffffffff
\ttmpl src 198.51.100.1 dst 192.0.2.10
\t\tproto esp reqid 1 mode transport
src 192.0.2.10/32 dst 198.51.100.1/32 proto udp sport 1701 dport 1701
\tdir in priority 0 ptype main
\tmark 0x1/0xffffffff
\ttmpl src 192.0.2.10 dst 198.51.100.1
\t\tproto esp reqid 1 mode transport
"""


def test_policies():
    pols = parse_xfrm_policies(POLICIES)
    assert [(p.direction, p.mark, p.src) for p in pols] == [("out", 1, GW), ("in", 1, NAT)]
    one = sa(NAT, GW, "0xc1", 1, "0x1") + sa(GW, NAT, "0xd1", 1, "0x1")
    assert_level(replace(HEALTHY, xfrm_policy=Output(POLICIES), xfrm_state=Output(one)),
                 "ipsec-policy-marks", PASS, "0x1")
    # Client 2's SA mark has no outbound policy.
    assert_level(replace(HEALTHY, xfrm_policy=Output(POLICIES), xfrm_state=Output(TWO_CLIENTS_SAS)),
                 "ipsec-policy-marks", WARN, "0x2")
    assert check(HEALTHY, "ipsec-policy-marks").level == INFO


# -- the marker's rules ----------------------------------------------------------------------------
def test_marker_chains_missing_fail():
    facts = replace(NO_DAEMON, legacy_mangle=Output(listing(chains="", in_jump="", out_jump="", q_in="",
                                                            q_out="")))
    checks = by_name(facts)
    assert checks["marker-rules"].level == FAIL and "not in legacy mangle" in checks["marker-rules"].summary
    assert checks["marker-jumps"].level == FAIL
    assert checks["queue-bypass"].level == INFO


def test_queue_rule_without_bypass_fails_twice():
    facts = replace(HEALTHY, legacy_mangle=Output(listing(q_out=Q_OUT.replace(" --queue-bypass", ""))),
                    status={**STATUS, "rule_problems": ["chain L2TP-MARKER-OUT does not hold the expected rules"]})
    checks = by_name(facts)
    assert checks["queue-bypass"].level == FAIL
    assert "L2TP-MARKER-OUT" in checks["queue-bypass"].summary
    assert "dies with the daemon" in checks["queue-bypass"].summary
    assert checks["marker-rules"].level == FAIL and "--queue-bypass no instead of yes" in checks["marker-rules"].summary
    assert checks["daemon-rules"].level == FAIL


def test_marker_rule_wrong_queue_and_extra_rule_fail():
    facts = replace(NO_DAEMON, legacy_mangle=Output(listing(q_in=Q_IN.replace("1701 --queue-bypass",
                                                                               "1801 --queue-bypass"))))
    assert_level(facts, "marker-rules", FAIL, "queue number 1801 instead of 1701")
    extra = Q_OUT + "-A L2TP-MARKER-OUT -j ACCEPT\n"
    assert_level(replace(NO_DAEMON, legacy_mangle=Output(listing(q_out=extra))), "marker-rules", FAIL,
                 "extra rule")
    odd = Q_IN.replace("-p udp", "-s 10.0.0.1/32 -p udp")
    assert_level(replace(NO_DAEMON, legacy_mangle=Output(listing(q_in=odd))), "marker-rules", FAIL,
                 "unexpected")


def test_rules_of_another_configuration_warn_when_the_daemon_is_content():
    ipsec = replace(HEALTHY, ruleset=ruleset_for(DaemonConfig()))
    assert_level(ipsec, "marker-rules", WARN, "IPsec policy match no instead of yes", "another configuration")
    assert check(replace(ipsec, status=None), "marker-rules").level == FAIL


def test_jumps_missing_fail_and_duplicate_warn():
    assert_level(replace(HEALTHY, legacy_mangle=Output(listing(out_jump=""))), "marker-jumps", FAIL,
                 "OUTPUT -> L2TP-MARKER-OUT")
    assert_level(replace(HEALTHY, legacy_mangle=Output(listing(out_jump=OUT_JUMP * 2))), "marker-jumps", WARN,
                 "2 jumps")


def test_jump_above_the_plugin_rules_fails_rule_order():
    facts = replace(HEALTHY, legacy_mangle=Output(listing(jump_first=True)))
    c = assert_level(facts, "rule-order", FAIL, "INPUT: the jump to L2TP-MARKER-IN (rule 1)",
                     "NFQUEUE ends the chain")
    assert "OUTPUT" not in c.summary.split(":")[0]
    out_first = OUT_JUMP + OUT_RESTORE
    facts = replace(HEALTHY, legacy_mangle=Output(listing(out_restore=out_first, out_jump="")))
    assert_level(facts, "rule-order", FAIL, "OUTPUT: the jump to L2TP-MARKER-OUT (rule 1)", "2, 3")
    assert_level(HEALTHY, "rule-order", PASS, "INPUT and OUTPUT")


# -- iptables-nft / nft route chain -------------------------------------------------------------------
NFT_RESTORE = ("-A OUTPUT -s 198.51.100.1/32 -d 192.0.2.10/32 -m mark --mark 0x0 -c 0 0 -j CONNMARK "
               "--restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n")
NFT_QUEUE = "-A OUTPUT -p udp -m udp --sport 1701 -c 0 0 -j NFQUEUE --queue-num 1702 --queue-bypass\n"


def test_nfqueue_next_to_connmark_restore_in_iptables_nft_fails():
    facts = replace(HEALTHY, nft_mangle=Output(NFT_EMPTY + NFT_RESTORE + NFT_QUEUE))
    c = assert_level(facts, "nft-route-pitfall", FAIL, "iptables-nft mangle OUTPUT", "reroutes only when",
                     "even for one client")
    assert "legacy" in c.fix


def test_nfqueue_in_a_user_chain_reached_from_nft_output_fails_too():
    text = (NFT_EMPTY + "-N Q\n" + NFT_RESTORE + "-A OUTPUT -p udp -j Q\n"
            + NFT_QUEUE.replace("-A OUTPUT", "-A Q"))
    assert check(replace(HEALTHY, nft_mangle=Output(text)), "nft-route-pitfall").level == FAIL


def test_nfqueue_alone_in_iptables_nft_output_warns():
    assert_level(replace(HEALTHY, nft_mangle=Output(NFT_EMPTY + NFT_QUEUE)), "nft-route-pitfall", WARN)


NATIVE = """\
table inet fw {
\tchain out {
\t\ttype route hook output priority mangle; policy accept;
\t\tmeta mark 0x00000000 meta mark set ct mark
\t\tudp sport 1701 queue num 1702 bypass
\t}
}
"""


def test_native_nft_route_chain_with_queue_and_mark_set_fails():
    facts = replace(HEALTHY, nft_ruleset=Output(NATIVE))
    assert_level(facts, "nft-route-pitfall", FAIL, "inet fw chain out")
    filt = NATIVE.replace("type route", "type filter")
    assert check(replace(HEALTHY, nft_ruleset=Output(filt)), "nft-route-pitfall").level == PASS


def test_nft_unreadable_is_info():
    facts = replace(HEALTHY, nft_mangle=Output(error="iptables-nft is not installed"),
                    nft_ruleset=Output(error="nft is not installed"))
    assert check(facts, "nft-route-pitfall").level == INFO


# -- rp_filter ----------------------------------------------------------------------------------------
def conf(all_rp, all_svm, **ifaces):
    d = {"all": {"rp_filter": all_rp, "src_valid_mark": all_svm},
         "default": {"rp_filter": 0, "src_valid_mark": 0}, "lo": {"rp_filter": 1, "src_valid_mark": 0}}
    for name, (rp, svm) in ifaces.items():
        d[name] = {"rp_filter": rp, "src_valid_mark": svm}
    return d


@pytest.mark.parametrize("ipv4,level,word", [
    (conf(1, 0, eth0=(0, 0)), FAIL, "eth0"),                 # all=1 wins (max)
    (conf(0, 0, eth0=(1, 0), eth1=(0, 0)), FAIL, "eth0"),
    (conf(1, 1, eth0=(0, 0)), PASS, "strict with src_valid_mark"),
    (conf(0, 0, eth0=(1, 1)), PASS, "strict with src_valid_mark"),
    (conf(2, 0, eth0=(1, 0)), PASS, "loose"),
    (conf(0, 0, eth0=(0, 0)), PASS, "off"),
])
def test_rp_filter(ipv4, level, word):
    c = assert_level(replace(HEALTHY, ipv4_conf=ipv4), "rp-filter", level, word)
    assert not re.search(r"\blo\b", c.summary), c   # loopback is never judged


def test_rp_filter_default_only_warns_and_missing_warns():
    ipv4 = conf(0, 0, eth0=(0, 0))
    ipv4["default"] = {"rp_filter": 1, "src_valid_mark": 0}
    assert_level(replace(HEALTHY, ipv4_conf=ipv4), "rp-filter", WARN, "default")
    assert check(replace(HEALTHY, ipv4_conf={}), "rp-filter").level == WARN


# -- conntrack -------------------------------------------------------------------------------------------
def test_conntrack_parse():
    (e,) = parse_conntrack(CONNTRACK)
    assert (e.src, e.dst, e.sport, e.dport, e.mark) == (NAT, GW, 1701, 1701, 2)


def test_merged_entry_without_the_marker_warns():
    c = assert_level(NO_DAEMON, "conntrack-merge", WARN,
                     "conntrack merges 2 clients from 192.0.2.10 into one entry",
                     "only the marker can return their traffic correctly")
    assert "l2tp-marker" in c.fix


def test_merged_entry_with_the_marker_passes():
    assert_level(HEALTHY, "conntrack-merge", PASS, "2 clients from 192.0.2.10", "the marker runs")


def test_rules_that_saw_no_packet_do_not_count_as_clients():
    quiet = IN_SET.replace("-c 17 1016", "-c 0 0")
    facts = replace(NO_DAEMON, legacy_mangle=Output(listing(in_set=quiet)))
    assert check(facts, "conntrack-merge").level == PASS


def test_inbound_sas_count_as_clients():
    facts = replace(NO_DAEMON, legacy_mangle=Output(""), xfrm_state=Output(TWO_CLIENTS_SAS))
    assert_level(facts, "conntrack-merge", WARN, "2 clients from 192.0.2.10")


def test_no_entries_and_no_tool_are_info():
    assert check(replace(HEALTHY, conntrack=Output("")), "conntrack-merge").level == INFO
    assert check(replace(HEALTHY, conntrack=Output(error="conntrack is not installed")),
                 "conntrack-merge").level == INFO


# -- tunnel IDs ------------------------------------------------------------------------------------------
TWICE = ("xl2tpd[9]: control_finish: Peer requested tunnel 1 twice, ignoring second one.\n" * 3)


def test_tunnel_requested_twice_without_marker_fails():
    facts = replace(NO_DAEMON, xl2tpd_logs=(TextFile("/var/log/xl2tpd.log", TWICE, source="--xl2tpd-log"),))
    c = assert_level(facts, "tunnel-ids", FAIL, "Peer requested tunnel N twice", "tunnel 1 (3x)",
                     "same tunnel ID")
    assert "alias" in c.fix


def test_aliases_from_the_daemon_pass():
    assert_level(HEALTHY, "tunnel-ids", PASS, "1 tunnel(s) aliased")
    no_alias = {**STATUS, "tunnels": STATUS["tunnels"][:1]}
    assert_level(replace(HEALTHY, status=no_alias), "tunnel-ids", PASS, "no tunnel ID offered twice")


def test_twice_in_the_log_while_the_marker_runs_warns():
    facts = replace(HEALTHY, xl2tpd_logs=(TextFile("/var/log/xl2tpd.log", TWICE),))
    assert_level(facts, "tunnel-ids", WARN, "although the marker runs")


def test_tunnel_ids_without_daemon():
    assert_level(NO_DAEMON, "tunnel-ids", PASS, "/lab/xl2tpd.log")
    assert check(replace(NO_DAEMON, xl2tpd_logs=()), "tunnel-ids").level == INFO
    unread = replace(NO_DAEMON, xl2tpd_logs=(TextFile("/x.log", None, "No such file or directory"),))
    c = check(unread, "tunnel-ids")
    assert c.level == INFO and "No such file" in c.summary


# -- the daemon ----------------------------------------------------------------------------------------
def test_daemon_down_fails_with_queues():
    checks = by_name(NO_DAEMON)
    assert checks["daemon"].level == FAIL and "not running" in checks["daemon"].summary
    assert checks["daemon-queues"].level == FAIL and "in 1701, out 1702 not bound" in checks["daemon-queues"].summary
    assert "daemon-rules" not in checks


def test_daemon_process_without_answer_fails_naming_it():
    facts = replace(NO_DAEMON, marker_pids=(4242,))
    assert_level(facts, "daemon", FAIL, "pid 4242", "does not answer")


def test_daemon_error_reply_fails():
    assert_level(replace(HEALTHY, status={"error": "unknown command"}), "daemon", FAIL, "unknown command")


def test_queues():
    one = replace(HEALTHY, nfqueue=Output(NFQUEUE.splitlines()[0] + "\n"))
    assert_level(one, "daemon-queues", FAIL, "in 1701 not bound")
    bound_no_daemon = replace(NO_DAEMON, nfqueue=Output(NFQUEUE))
    assert_level(bound_no_daemon, "daemon-queues", WARN, "another program")
    drops = NFQUEUE.replace("  4016     0     0       36", "  4016     7     0       36")
    assert_level(replace(HEALTHY, nfqueue=Output(drops)), "daemon-queues", WARN, "7 queue-full")
    assert_level(replace(HEALTHY, nfqueue=Output(error="Permission denied")), "daemon-queues", WARN)
    assert_level(HEALTHY, "daemon-queues", PASS, "in 1701", "out 1702")


def test_daemon_rules():
    assert_level(replace(HEALTHY, status={**STATUS, "rule_problems": ["no jump from INPUT to X"]}),
                 "daemon-rules", FAIL, "no jump from INPUT to X")
    assert_level(replace(HEALTHY, status={**STATUS, "rule_repairs": 3}), "daemon-rules", WARN, "3 time(s)")


# -- the kernel fast path: the marker's rules ---------------------------------------------------------
def test_healthy_fastpath_gateway_has_no_fail_and_no_warn():
    checks = by_name(HEALTHY_FP)
    assert [c for c in checks.values() if c.level in (WARN, FAIL)] == []
    assert_level(HEALTHY_FP, "marker-rules", PASS, "the kernel fast-path form (bit 0x80000000)",
                 "as the daemon reports")
    assert "not doctor's" not in checks["marker-rules"].summary
    assert_level(HEALTHY_FP, "fastpath", PASS, "kernel fast path in use: table ip l2tp_marker, 1 outbound / 2 "
                                               "inbound entries", "1 aliased tunnel(s)", "5 outbound / 2 inbound")
    assert_level(HEALTHY_FP, "fastpath-bit", PASS, "0x80000000", "marks 0x1, 0x2")
    for name in ("queue-bypass", "marker-jumps", "rule-order", "nft-route-pitfall", "daemon-rules"):
        assert checks[name].level == PASS, checks[name]


def test_listed_fastpath_rules_read_back_as_the_marker_builds_them():
    want = ruleset_for(DaemonConfig(inbound_match="none"), kernel_fastpath=True)
    t = parse_iptables_save(fp_listing())
    got = [rule_from_listing(r)[0] for c in want.chains for r in t.rules(c)]
    assert got == list(want.rules)
    assert got[1].clear_bits == got[3].clear_bits == BIT and got[0].bit_clear == got[2].bit_clear == BIT
    assert got[0].mark_nonzero_mask == 0xFFFFFFFF


@pytest.mark.parametrize("line,why", [
    ("-A X -p udp -j MARK --set-xmark 0x1/0xffffffff", "unexpected --set-xmark 0x1/0xffffffff"),
    ("-A X -p udp -j MARK --set-mark 0x0", "unexpected '--set-mark 0x0'"),
    ("-A X -p udp -j MARK", "MARK without --set-xmark"),
    ("-A X -p udp -m mark ! --mark 0x3/0x3 -j NFQUEUE --queue-num 1", "unexpected mark match ! 0x3/0x3"),
    ("-A X -p udp -m mark --mark 0x80000000/0x80000000 -j NFQUEUE --queue-num 1", "unexpected mark match 0x8"),
    ("-A X -p udp -m mark ! --mark 0x0 -m mark ! --mark 0x0/0xff -j NFQUEUE --queue-num 1", "unexpected mark"),
])
def test_mark_matches_and_targets_the_marker_never_uses_are_unexpected(line, why):
    rule, reason = rule_from_listing(parse_iptables_save(line).rules("X")[0])
    assert rule is None and why in reason


def test_old_rules_when_the_daemon_runs_the_fast_path_fail_naming_the_bit():
    facts = replace(HEALTHY_FP, legacy_mangle=Output(listing()),
                    status={**FP_STATUS, "rule_problems": ["chain L2TP-MARKER-IN does not hold the expected rules"]})
    c = assert_level(facts, "marker-rules", FAIL, "against the kernel fast-path form (bit 0x80000000), as the "
                                                  "daemon reports",
                     "L2TP-MARKER-IN rule 1: fast-path bit match ('! --mark BIT/BIT') none instead of 0x80000000",
                     "L2TP-MARKER-OUT lacks '-A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m comment --comment "
                     "l2tp-marker -j MARK --set-xmark 0x0/0x80000000'")
    assert "L2TP-MARKER-IN lacks '-A L2TP-MARKER-IN" in c.summary
    # The daemon content with them: doctor and daemon disagree on what to expect (a warning).
    assert check(replace(facts, status=FP_STATUS), "marker-rules").level == WARN


def test_fastpath_rules_when_the_daemon_fell_back_fail():
    status = {**fp_status(mode="fallback", reason="libnftables is not available", table=None),
              "rule_problems": ["chain L2TP-MARKER-IN does not hold the expected rules"]}
    facts = replace(HEALTHY_FP, status=status, nft_ruleset=Output(""))
    assert_level(facts, "marker-rules", FAIL, "against the form without the fast path",
                 "fast-path bit match ('! --mark BIT/BIT') 0x80000000 instead of none",
                 "L2TP-MARKER-OUT has an extra rule '-A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m comment "
                 "--comment l2tp-marker -j MARK --set-xmark 0x0/0x80000000'")
    # Its old-form rules pass.
    ok = replace(facts, legacy_mangle=Output(listing()), status=fp_status(mode="fallback", table=None))
    assert_level(ok, "marker-rules", PASS, "the form without the fast path, as the daemon reports")


def test_without_the_daemon_either_form_passes_and_says_which():
    assert_level(FP_NO_DAEMON, "marker-rules", PASS, "the kernel fast-path form (bit 0x80000000)",
                 "the daemon does not answer, so either form is accepted")
    old = replace(FP_NO_DAEMON, legacy_mangle=Output(listing()))
    assert_level(old, "marker-rules", PASS, "the form without the fast path")
    # Without a fast-path setting (doctor given only a rule set) both forms pass too.
    assert check(replace(NO_DAEMON, legacy_mangle=Output(fp_listing())), "marker-rules").level == PASS


def test_without_the_daemon_a_broken_form_fails_against_the_closest_form():
    facts = replace(FP_NO_DAEMON, legacy_mangle=Output(fp_listing(q_out=Q_OUT_FP)))
    assert_level(facts, "marker-rules", FAIL, "neither form matches; against the kernel fast-path form",
                 "L2TP-MARKER-OUT lacks '-A L2TP-MARKER-OUT -p udp -m udp --sport 1701 -m comment --comment "
                 "l2tp-marker -j MARK --set-xmark 0x0/0x80000000'")
    # The closest form explains, even when it is not the likelier one.
    old = replace(FP_NO_DAEMON, legacy_mangle=Output(listing(q_out=Q_OUT.replace("1702", "1802"))))
    assert_level(old, "marker-rules", FAIL, "against the form without the fast path",
                 "L2TP-MARKER-OUT rule 1: queue number 1802 instead of 1702")
    # Half one form, half the other: as far from both; the configuration's setting decides which to show.
    mixed = replace(FP_NO_DAEMON, legacy_mangle=Output(fp_listing(q_out=Q_OUT)))
    assert_level(mixed, "marker-rules", FAIL, "against the kernel fast-path form")
    assert_level(replace(mixed, fastpath_setting="off"), "marker-rules", FAIL, "against the form without the "
                                                                               "fast path")


def test_fastpath_rules_in_the_wrong_order_fail():
    facts = replace(FP_NO_DAEMON, legacy_mangle=Output(fp_listing(q_out=OUT_CLEAR + Q_OUT_FP)))
    assert_level(facts, "marker-rules", FAIL, "L2TP-MARKER-OUT holds the expected rules in another order",
                 "-j NFQUEUE --queue-num 1702 --queue-bypass' is rule 2")


def test_another_bit_is_named_in_hex():
    status = fp_status(bit=0x40000000)
    facts = replace(HEALTHY_FP, status={**status, "rule_problems": ["x"]})
    assert_level(facts, "marker-rules", FAIL, "fast-path bit match ('! --mark BIT/BIT') 0x80000000 instead of "
                                              "0x40000000",
                 "bits cleared (MARK --set-xmark 0x0/BITS) 0x80000000 instead of 0x40000000")


def test_the_daemons_own_values_win_over_doctors_options_and_are_named():
    # doctor was given the default configuration (inbound_match ipsec): the daemon says none.
    facts = replace(HEALTHY_FP, ruleset=ruleset_for(DaemonConfig()))
    assert_level(facts, "marker-rules", PASS, "as the daemon reports (its inbound_match none, not doctor's ipsec)")
    masked = replace(HEALTHY_FP, ruleset=ruleset_for(DaemonConfig(inbound_match="none")),
                     status={**FP_STATUS, "daemon": {**FP_STATUS["daemon"], "mark_mask": 0xFFFF},
                             "rule_problems": ["x"]})
    assert_level(masked, "marker-rules", FAIL, "its mark_mask 0xffff, not doctor's 0xffffffff",
                 "non-zero mark match (mask) 0xffffffff instead of 0xffff")
    # A daemon that reports its chains under another prefix: doctor expects those chains.
    other = replace(HEALTHY_FP, ruleset=ruleset_for(DaemonConfig(inbound_match="none", chain_prefix="GW")))
    assert_level(other, "marker-rules", PASS, "its chain prefix L2TP-MARKER, not doctor's GW")


def test_queue_bypass_and_jumps_with_the_fast_path_rules():
    no_bypass = replace(HEALTHY_FP, legacy_mangle=Output(fp_listing(q_out=Q_OUT_FP.replace(" --queue-bypass", "")
                                                                    + OUT_CLEAR)))
    assert_level(no_bypass, "queue-bypass", FAIL, "L2TP-MARKER-OUT")
    assert_level(FP_NO_DAEMON, "marker-jumps", PASS, "INPUT -> L2TP-MARKER-IN")


# -- the kernel fast path: its table ---------------------------------------------------------------------
def test_nft_tables_parse():
    tables = parse_nft_tables(NFT_FP + NATIVE)
    t = tables["ip l2tp_marker"]
    assert t.sets == {"out_marks", "in_known"}
    assert (t.chains["out"].hook, t.chains["out"].priority) == ("route output", -160)
    assert (t.chains["in"].hook, t.chains["in"].priority) == ("filter input", -160)
    assert len(t.chains["out"].statements) == len(t.chains["in"].statements) == 2
    assert tables["inet fw"].chains["out"].hook == "route output"
    assert set(parse_nft_tables("table ip l2tp_marker\ntable inet fw\n")) == {"ip l2tp_marker", "inet fw"}
    assert [nft_priority(x) for x in ("mangle - 10", "-160", "filter", "srcnat + 5", "odd")] == [-160, -160, 0,
                                                                                                 105, None]


def test_fastpath_in_use_without_nft_listing_passes_from_the_status():
    facts = replace(HEALTHY_FP, nft_ruleset=Output(error="nft is not installed"))
    assert_level(facts, "fastpath", PASS, "kernel fast path in use", "from the daemon's status",
                 "nft is not installed")


def test_fastpath_fallback_warns_with_the_reason_and_off_is_info():
    facts = replace(HEALTHY, status=fp_status(mode="fallback", table=None, reason="libnftables is not available "
                                                                                   "(libnftables.so.1: cannot open)"))
    c = assert_level(facts, "fastpath", WARN, "kernel fast path not available (libnftables is not available",
                     "judged in userspace")
    assert "libnftables1" in c.fix and 'fastpath = "off"' in c.fix and "nf_tables" in c.fix
    off = replace(HEALTHY, status=fp_status(mode="off", table=None, reason="fastpath = off", setting="off"))
    assert_level(off, "fastpath", INFO, "kernel fast path off (fastpath = off)")
    assert_level(HEALTHY, "fastpath", INFO, "reports no fast path")


def test_fastpath_table_missing_while_the_daemon_uses_it_warns():
    assert_level(replace(HEALTHY_FP, nft_ruleset=Output("")), "fastpath", WARN,
                 "reports the kernel fast path, but nftables table ip l2tp_marker is missing")


def test_fastpath_table_incomplete_warns():
    no_in = NFT_FP[:NFT_FP.index("\tchain in {")] + "}\n"
    assert_level(replace(HEALTHY_FP, nft_ruleset=Output(no_in)), "fastpath", WARN, "lacks chain in")
    moved = NFT_FP.replace("priority mangle - 10; policy accept;\n\t\tudp sport",
                           "priority mangle; policy accept;\n\t\tudp sport")
    assert_level(replace(HEALTHY_FP, nft_ruleset=Output(moved)), "fastpath", WARN,
                 "chain out on hook route output at priority -160")
    one_rule = "\n".join(line for line in NFT_FP.splitlines() if "@th,80,16 map" not in line) + "\n"
    assert_level(replace(HEALTHY_FP, nft_ruleset=Output(one_rule)), "fastpath", WARN,
                 "the 2 rules of chain out that use @out_marks (it has 1)")
    # More rules and maps (the aliased tunnels' rewrite, say) are the daemon's own business.
    more = NFT_FP.replace("\tchain out {", "\tmap alias_ids {\n\t\ttypeof ip daddr : @th,96,16\n\t}\n\n\tchain out {")
    more = more.replace("map @out_marks counter packets 0 bytes 0\n\t}",
                        "map @out_marks counter packets 0 bytes 0\n\t\tudp sport 1701 @th,96,16 set 0x1 "
                        "comment \"l2tp-marker alias rewrite L=1\"\n\t}")
    assert "alias rewrite" in more and "map alias_ids" in more
    assert check(replace(HEALTHY_FP, nft_ruleset=Output(more)), "fastpath").level == PASS


def test_crashed_daemon_with_flushed_mangle_fails():
    # The daemon died (SIGKILL: its table stays) and someone flushed mangle: nothing clears the bit.
    for text in (PLUGIN, "", listing(q_in=Q_IN_FP + IN_CLEAR, q_out=Q_OUT_FP)):
        facts = replace(FP_NO_DAEMON, legacy_mangle=Output(text))
        c = assert_level(facts, "fastpath", FAIL, "nftables table ip l2tp_marker is there",
                         "nothing in legacy mangle OUTPUT clears that bit", "0x80000001 for mark 0x1",
                         "selects no SA", "died without removing its table")
        assert "ip netns exec lab-gw nft delete table ip l2tp_marker" in c.fix
    # Only the inbound clear is gone: a warning.
    facts = replace(FP_NO_DAEMON, legacy_mangle=Output(fp_listing(q_in=Q_IN_FP)))
    assert_level(facts, "fastpath", WARN, "nothing in legacy mangle INPUT clears its bit 0x80000000")


def test_clear_rule_out_of_reach_does_not_count():
    # The chain is there but OUTPUT no longer jumps to it.
    facts = replace(FP_NO_DAEMON, legacy_mangle=Output(fp_listing(out_jump="")))
    assert_level(facts, "fastpath", FAIL, "OUTPUT clears")


def test_running_daemon_whose_clear_rule_was_deleted_fails_without_blaming_a_crash():
    facts = replace(HEALTHY_FP, legacy_mangle=Output(fp_listing(q_out=Q_OUT_FP)))
    c = assert_level(facts, "fastpath", FAIL, "nothing in legacy mangle OUTPUT clears that bit")
    assert "died" not in c.summary


def test_leftover_table_with_its_rules_but_no_daemon_warns():
    c = assert_level(FP_NO_DAEMON, "fastpath", WARN, "is there but no daemon answers", "old client's mark")
    assert "nft delete table ip l2tp_marker" in c.fix
    # The table's own bit decides what must be cleared (here not the configuration's).
    nft = NFT_FP.replace("| 0x80000000", "| 0x40000000")
    text = fp_listing().replace("0x80000000", "0x40000000")
    facts = replace(FP_NO_DAEMON, legacy_mangle=Output(text), nft_ruleset=Output(nft))
    assert check(facts, "fastpath").level == WARN
    assert check(replace(facts, legacy_mangle=Output(fp_listing())), "fastpath").level == FAIL


def test_leftover_table_next_to_a_fallen_back_daemon():
    status = fp_status(mode="fallback", table=None, reason="nftables cannot build the fast-path table")
    # Its legacy rules are the old form: nothing clears the bit.
    facts = replace(HEALTHY_FP, status=status, legacy_mangle=Output(listing()))
    assert_level(facts, "fastpath", FAIL, "nothing in legacy mangle OUTPUT clears that bit",
                 "died without removing its table")
    # Something else clears it: the table is a leftover the daemon does not use.
    assert_level(replace(facts, legacy_mangle=Output(fp_listing())), "fastpath", WARN,
                 "the daemon does not use it (mode fallback: nftables cannot build")


def test_fastpath_table_unreadable_legacy_or_none_at_all():
    facts = replace(FP_NO_DAEMON, legacy_mangle=Output(error="iptables-legacy is not installed"))
    assert_level(facts, "fastpath", WARN, "cannot tell whether the fast path's bit 0x80000000 is cleared")
    assert_level(replace(FP_NO_DAEMON, nft_ruleset=Output("")), "fastpath", INFO,
                 "no nftables table ip l2tp_marker and no daemon answers (configuration: fastpath = auto)")
    assert_level(replace(FP_NO_DAEMON, nft_ruleset=Output(error="nft is not installed")), "fastpath", INFO,
                 "nft is not installed")


def test_fastpath_table_follows_the_chain_prefix():
    rs = ruleset_for(DaemonConfig(inbound_match="none", chain_prefix="GW-1"))
    nft = NFT_FP.replace("table ip l2tp_marker", "table ip gw_1")
    text = fp_listing().replace("L2TP-MARKER", "GW-1")
    facts = replace(FP_NO_DAEMON, ruleset=rs, nft_ruleset=Output(nft), legacy_mangle=Output(PLUGIN))
    assert_level(facts, "fastpath", FAIL, "nftables table ip gw_1 is there")
    assert check(replace(facts, nft_ruleset=Output(NFT_FP)), "fastpath").level == INFO   # another instance's
    assert_level(replace(facts, legacy_mangle=Output(text)), "marker-rules", PASS, "fast-path form")


# -- the kernel fast path: its bit and the SA marks ----------------------------------------------------------
def test_sa_marks_using_the_bit_fail():
    text = sa(NAT, GW, "0xc1", 1, "0x80000001") + sa(GW, NAT, "0xd1", 1, "0x80000001")
    c = assert_level(replace(HEALTHY_FP, xfrm_state=Output(text)), "fastpath-bit", FAIL,
                     "0x80000001 (xfrm state 192.0.2.10->198.51.100.1 spi 0xc1)", "the daemon uses",
                     "selects no SA")
    assert "fastpath_bit" in c.fix and 'fastpath = "off"' in c.fix
    pol = POLICIES.replace("mark 0x1/0xffffffff", "mark 0x80000001/0xffffffff")
    assert_level(replace(HEALTHY_FP, xfrm_policy=Output(pol)), "fastpath-bit", FAIL,
                 "xfrm policy 198.51.100.1->192.0.2.10 dir out")


def test_connmark_marks_using_the_bit_fail():
    in_set = IN_SET.replace("--set-xmark 0x2/0xffffffff", "--set-xmark 0x80000002/0xffffffff")
    facts = replace(HEALTHY_FP, legacy_mangle=Output(fp_listing(in_set=in_set)))
    assert_level(facts, "fastpath-bit", FAIL, "0x80000002 (legacy mangle '-A INPUT -s 192.0.2.10/32")
    nft = replace(HEALTHY_FP, nft_mangle=Output(NFT_EMPTY + in_set))
    assert_level(nft, "fastpath-bit", FAIL, "iptables-nft mangle")
    # The marker's own MARK rules (they clear the bit) are not SA marks.
    assert check(HEALTHY_FP, "fastpath-bit").level == PASS


def test_fastpath_bit_depends_on_the_mode():
    text = sa(NAT, GW, "0xc1", 1, "0x80000001") + sa(GW, NAT, "0xd1", 1, "0x80000001")
    base = replace(HEALTHY_FP, xfrm_state=Output(text))
    assert_level(replace(base, status=fp_status(mode="fallback", table=None)), "fastpath-bit", WARN,
                 "once its fast path works")
    assert_level(replace(base, status=fp_status(mode="off", table=None)), "fastpath-bit", INFO, "off")
    assert_level(replace(base, status=STATUS), "fastpath-bit", INFO, "off")   # a daemon without a fast path
    no_daemon = replace(base, status=None, status_error="down")
    assert_level(no_daemon, "fastpath-bit", FAIL, "the configuration reserves")
    assert_level(replace(no_daemon, fastpath_setting="off"), "fastpath-bit", INFO, "fastpath = off")
    # The daemon's bit counts, not the configuration's.
    other = replace(base, status=fp_status(bit=0x40000000))
    assert_level(other, "fastpath-bit", PASS, "0x40000000", "0x80000001")
    marks_40 = text.replace("0x80000001", "0x40000001")
    assert_level(replace(other, xfrm_state=Output(marks_40)), "fastpath-bit", FAIL, "0x40000001")


def test_daemon_tunnel_marks_count_and_no_marks_is_info():
    status = {**FP_STATUS, "tunnels": [{**STATUS["tunnels"][0], "mark": 0x80000005}]}
    assert_level(replace(HEALTHY_FP, status=status), "fastpath-bit", FAIL, "0x80000005 (the daemon's tunnel")
    bare = replace(FP_NO_DAEMON, legacy_mangle=Output(""), xfrm_state=Output(""))
    assert_level(bare, "fastpath-bit", INFO, "no SA marks seen")


# -- parsing details ------------------------------------------------------------------------------------
def test_iptables_listing_keeps_order_and_counters():
    t = parse_iptables_save(listing())
    assert [r.target for r in t.rules("INPUT")] == ["CONNMARK", "CONNMARK", "L2TP-MARKER-IN"]
    assert t.rules("INPUT")[0].packets == 19
    assert t.user_chains == {"L2TP-MARKER-IN", "L2TP-MARKER-OUT"}
    assert "-c" not in t.rules("L2TP-MARKER-IN")[0].args
    quoted = parse_iptables_save('-A INPUT -m comment --comment "two words" -j ACCEPT\n')
    assert quoted.rules("INPUT")[0].value("--comment") == "two words"


# -- the probe's pure helpers, the command line -------------------------------------------------------
def test_probe_helpers(tmp_path):
    assert xl2tpd_config_path(("/usr/sbin/xl2tpd", "-D", "-c", "/lab/x.conf")) == "/lab/x.conf"
    assert xl2tpd_config_path(("xl2tpd",)) == "/etc/xl2tpd/xl2tpd.conf"
    assert is_marker(("/venv/bin/python", "-m", "l2tp_marker.cli", "--log-level", "debug", "run"))
    assert is_marker(("/usr/bin/python3", "/usr/local/bin/l2tp-marker", "run", "--config", "x"))
    assert not is_marker(("/venv/bin/python", "-m", "l2tp_marker.cli", "doctor"))
    assert strip_secrets(sa(NAT, GW, "0xc1", 1, "0x1")).count("aead") == 0
    assert run_tool(["l2tp-marker-no-such-tool-xyz"]).error == "l2tp-marker-no-such-tool-xyz is not installed"
    opts = ProbeOptions("/s.sock", ("/a.conf",), ("/a.log",), 3.0)
    assert ProbeOptions.from_json(opts.to_json()) == opts
    for name, rp, svm in (("all", "1", "1"), ("eth0", "2", "0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rp_filter").write_text(rp + "\n")
        (tmp_path / name / "src_valid_mark").write_text(svm + "\n")
    assert ipv4_conf(tmp_path) == {"all": {"rp_filter": 1, "src_valid_mark": 1},
                                   "eth0": {"rp_filter": 2, "src_valid_mark": 0}}
    with pytest.raises(ProbeError, match="no network namespace"):
        collect_in_netns("l2tp-marker-no-such-ns", opts)


def test_cli_bad_namespace_and_bad_config_exit_2(tmp_path, capsys):
    assert main(["doctor", "--netns", "l2tp-marker-no-such-ns", "--config", str(tmp_path / "none.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    assert main(["doctor", "--netns", "l2tp-marker-no-such-ns", "--config", str(cfg)]) == 2
    assert "no network namespace" in capsys.readouterr().err


def test_collect_hands_the_fastpath_configuration_on(monkeypatch):
    import l2tp_marker.doctor_probe as probe

    monkeypatch.setattr(probe, "collect_here", lambda opts: Facts(control_socket=opts.control_socket))
    f = probe.collect(ProbeOptions("/s.sock"), ruleset=RULESET, fastpath="off", fastpath_bit=0x40000000)
    assert (f.ruleset, f.fastpath_setting, f.fastpath_bit, f.control_socket) == (RULESET, "off", 0x40000000,
                                                                                 "/s.sock")


def test_probe_lists_nft_without_set_elements(monkeypatch, tmp_path):
    import l2tp_marker.doctor_probe as probe

    calls: list[list[str]] = []
    monkeypatch.setattr(probe, "run_tool", lambda argv, timeout=10.0: calls.append(argv) or Output(""))
    probe.collect_here(ProbeOptions(str(tmp_path / "none.sock"), timeout=1.0))
    assert ["nft", "-t", "list", "ruleset"] in calls and ["nft", "list", "ruleset"] not in calls


def test_cli_gives_doctor_the_fastpath_setting_and_bit(monkeypatch, tmp_path, capsys):
    import l2tp_marker.doctor_probe as probe

    seen: dict = {}

    def fake_collect(opts, **kw):
        seen.update(kw)
        return replace(FP_NO_DAEMON, ruleset=kw["ruleset"], fastpath_setting=kw["fastpath"],
                       fastpath_bit=kw["fastpath_bit"])

    monkeypatch.setattr(probe, "collect", fake_collect)
    cfg = tmp_path / "c.toml"
    cfg.write_text('inbound_match = "none"\nfastpath_bit = 0x40000000\n')
    assert main(["doctor", "--config", str(cfg), "--json"]) in (0, 1)
    assert (seen["fastpath"], seen["fastpath_bit"]) == ("auto", 0x40000000)
    doc = json.loads(capsys.readouterr().out)
    (rules,) = [c for c in doc["checks"] if c["name"] == "marker-rules"]
    # The listing uses bit 0x80000000, the configuration 0x40000000: neither form matches.
    assert rules["level"] == FAIL and "0x40000000" in rules["summary"], rules
    assert main(["doctor", "--config", str(cfg), "--fastpath", "off", "--json"]) in (0, 1)
    assert seen["fastpath"] == "off"
    capsys.readouterr()
