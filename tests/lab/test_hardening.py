"""Hardening in the namespace lab: hostile clients and faults, each with real xl2tpd (root only).

Hostile clients are authenticated: each has its own link (its own SA mark). The attacker is
:mod:`l2tp_marker.lab.attacker`, a raw-socket sender in the attacker's namespace: it sends from the
NAT address's udp/1701 like every client, so the gateway sees its packets over the attacker's SA.

Every test writes its figures to ``var/reliability/fault-<name>.json`` (``kind``, ``name``,
``outcome``, ``figures``, ``command``, ``date``) for ``scripts/reliability_report.py``; the file is
written also when the test fails (outcome "fail"). ``make_lab`` (conftest.py) checks afterwards
that no namespace, process or rule of the test is left behind.

Misdelivery and unmarked packets are counted from captures of the gateway's links (see
l2tp_marker/lab/analysis.py): a packet whose PPP echo token or tunnel ID names client N but that
left on another client's link is misdelivered; anything on the dead-end link left unmarked.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2tp_marker.lab import analysis
from l2tp_marker.lab.marker import MarkerProcess
from l2tp_marker.lab.topology import IPTABLES, ClientSpec, client_ifname, mangle_rules, wait_for
from l2tp_marker.metrics import parse_queue_stats

from .test_marker_lab import marker_rules, observe

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(os.environ.get("L2TP_RELIABILITY_DIR", ROOT / "var" / "reliability"))
ECHO = 0.3
WIN = ClientSpec("win", 1, 1)
LAC = ClientSpec("xl2tpd")


# ------------------------------------------------------------------------------ result files
class Result:
    """Figures of one reliability run, written as JSON on teardown (outcome "pass" only if the
    test reached :meth:`passed`)."""

    def __init__(self, kind: str, name: str, command: str):
        self.kind, self.name, self.command = kind, name, command
        self.figures: dict = {}
        self.ok = False

    def passed(self) -> None:
        self.ok = True

    def write(self) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.kind}-{self.name}.json"
        data = {"kind": self.kind, "name": self.name, "outcome": "pass" if self.ok else "fail",
                "figures": self.figures, "command": self.command,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return path


def result_for(request, kind: str, env: str = "") -> Result:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower()).strip("-")
    command = f"{env + ' ' if env else ''}.venv/bin/python -m pytest {request.node.nodeid}"
    return Result(kind, name, command)


@pytest.fixture
def result(request):
    r = result_for(request, "fault")
    yield r
    r.write()


# ------------------------------------------------------------------------------ helpers
def bring_up(lab, marker: MarkerProcess, timeout: float = 20.0) -> None:
    lab.start_lns()
    marker.start()
    lab.start_observer()
    lab.start_clients()
    assert lab.wait_established(timeout), lab.report().format()


def assert_isolated(report, *, clients=None, check_foreign: bool = True) -> None:
    text = report.format()
    assert report.unmarked == 0, text
    for c in report.clients:
        if clients is not None and c.index not in clients:
            continue
        assert c.established, text
        assert c.echo_ok_both_ways, text
        assert c.misdelivered == 0 and c.lost_to_others == 0, text
        if check_foreign:
            assert c.client_replies_foreign == 0 and c.lns_replies_foreign == 0, text


def tunnels_by_mark(status: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for t in status["tunnels"]:
        out.setdefault(t["mark"], []).append(t)
    return out


def attack(lab, n: int, *args: str, count: int = 1, interval: float = 0.0) -> dict:
    """Run the attacker in client N's namespace (synchronously) and return its summary."""
    res = lab.client_run(n, [sys.executable, "-m", "l2tp_marker.lab.attacker", "--server", lab.config.gw_ip,
                             "--count", str(count), "--interval", str(interval), *args],
                         env=lab._python_env(), check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def attacker_popen(lab, n: int, *args: str, count: int, interval: float) -> subprocess.Popen:
    return subprocess.Popen(lab.ns_exec(lab.client_ns(n)) + [
        sys.executable, "-m", "l2tp_marker.lab.attacker", "--server", lab.config.gw_ip,
        "--count", str(count), "--interval", str(interval), *args],
        env=lab._python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metric(path: Path, line_start: str) -> float | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def outbound_tokens(lab, n: int) -> list[str]:
    """Echo data of every packet the gateway sent on client N's link (``lns/win-1``, ``atk-3``...)."""
    gw = lab.config.gw_ip
    return ["/".join(p.tokens()) for p in analysis.read_l2tp(lab.pcap_path(client_ifname(n)))
            if p.src == gw and p.echo_data is not None]


def queue_stats(lab) -> dict[int, dict[str, int]]:
    """The gateway's /proc/net/netfilter/nfnetlink_queue: queue -> waiting/queue_dropped/user_dropped/queued."""
    return parse_queue_stats(lab.gw_run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout)


def plugin_rules_of(lab, n: int) -> list[list[str]]:
    """Client N's three connmark-plugin rules as the lab inserts them (``-I CHAIN 1 ...``)."""
    return mangle_rules(lab.config)[3 * (n - 1):3 * n]


def run_in_gw(lab, argv: list[str]) -> None:
    res = lab.gw_run(argv)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"


# ============================================================================== hostile clients
@pytest.mark.parametrize("enforce", ["log", "drop"])
def test_client_sends_into_another_clients_tunnel(make_lab, result, enforce):
    """Client 3 (authenticated, its own SA) learns client 1's gateway tunnel and session IDs and
    sends LCP echoes and HELLOs with them (and, with ``drop``, a StopCCN).

    Both modes: the victim's tunnel stays bound to mark 1, every packet is counted as an SA conflict
    (status, metrics, decision log) and logged (rate-limited), the victim's traffic never leaves on
    the attacker's link and the victim keeps working. ``log``: the packets reach the LNS, which
    answers the injected echoes inside the victim's session, so the answers go to the victim, not
    to the attacker. ``drop``: the LNS never sees them (its PPP peer for the victim sees only the
    victim's echoes, xl2tpd logs nothing about the injected HELLOs) and even a StopCCN cannot end
    the victim's tunnel.
    """
    result.figures["enforce"] = enforce
    with make_lab([WIN, WIN, WIN], echo_interval=ECHO) as lab:
        metrics = lab.workdir / "metrics.prom"
        marker = MarkerProcess(lab, "--enforce", enforce, "--metrics-textfile", str(metrics),
                               "--metrics-interval", "0.3")
        bring_up(lab, marker)
        time.sleep(1.0)  # the LNS's PPP peer names its session after the first echo it gets: the victim's
        victim = tunnels_by_mark(marker.status())[1][0]
        gtid, gsid = victim["gateway_tid"], victim["sessions"][0]["gateway_sid"]
        sent = attack(lab, 3, "data", "--tunnel-id", str(gtid), "--session-id", str(gsid),
                      "--token", "atk-3", count=20, interval=0.05)["sent"]
        sent += attack(lab, 3, "hello", "--tunnel-id", str(gtid), "--ns", "1000", count=3)["sent"]
        if enforce == "drop":
            sent += attack(lab, 3, "stopccn", "--tunnel-id", str(gtid))["sent"]
        time.sleep(2.0)
        lab.stop_observer()
        report = lab.report()
        st = marker.status()
        wait_for(lambda: metric(metrics, "l2tp_marker_conflicts_total") == sent, 5.0)
        conflicts_metric = metric(metrics, "l2tp_marker_conflicts_total")
        on_attacker = outbound_tokens(lab, 3)
        on_victim = outbound_tokens(lab, 1)
        assert marker.stop() == 0
        marker_log = marker.log_path.read_text()
        decisions = [d for d in marker.decisions() if d["reason"] == "sa_conflict"]
        lns_log = "\n".join(lab.lns_log())
    victim_after = tunnels_by_mark(st)[1][0]
    victim_lns = [s for s in report.lns_sessions if s.peer_token == "win-1"]
    result.figures.update({
        "injected": sent, "conflicts_counted": st["counters"].get("sa_conflict", 0),
        "conflicts_metric": conflicts_metric, "dropped": st["packets"].get("in_dropped", 0),
        "victim_tunnel_conflicts": victim_after["conflicts"],
        "victim_replies_foreign": report.client(1).client_replies_foreign,
        "attack_answers_on_victim_link": sum(1 for t in on_victim if "atk-3" in t),
        "victim_or_attack_packets_on_attacker_link": sum(1 for t in on_attacker if "win-1" in t or "atk-3" in t),
        "misdelivered": report.misdelivered, "unmarked": report.unmarked,
        "lns_saw_attack": any("atk-3" in s.peer_tokens for s in victim_lns),
    })
    text = report.format()
    # Bound to the victim's SA, counted, logged.
    assert (victim_after["mark"], victim_after["gateway_tid"]) == (1, gtid)
    assert victim_after["conflicts"] == sent == st["counters"]["sa_conflict"] == conflicts_metric
    assert {(c["bound_mark"], c["seen_mark"], c["gateway_tid"]) for c in st["conflicts"]} == {(1, 3, gtid)}
    assert len(decisions) == sent and all(d["mark_in"] == 3 for d in decisions)
    verb = "dropped" if enforce == "drop" else "passed to the LNS"
    assert f"SA conflict, {verb}: data peer 192.0.2.10:1701 tunnel {gtid} is bound to mark 0x1, " \
           f"packet came with mark 0x3" in marker_log
    # Nothing of the victim reached the attacker; everybody still works.
    assert result.figures["victim_or_attack_packets_on_attacker_link"] == 0, on_attacker
    assert report.client(1).state == "established"
    assert_isolated(report, check_foreign=False)
    if enforce == "drop":
        assert st["packets"]["in_dropped"] == sent and all(d.get("drop") for d in decisions)
        assert not result.figures["lns_saw_attack"] and victim_lns, text
        assert report.client(1).client_replies_foreign == 0, text
        assert "out of order control packet" not in lns_log
        assert "Connection closed" not in lns_log
    else:
        assert st["packets"].get("in_dropped", 0) == 0
        assert result.figures["lns_saw_attack"], text
        assert "out of order control packet" in lns_log  # the HELLOs reached xl2tpd
        # The LNS answered the injected echoes in the victim's session: over the victim's SA.
        assert result.figures["attack_answers_on_victim_link"] > 0, text
        assert 0 < report.client(1).client_replies_foreign <= result.figures["attack_answers_on_victim_link"]
    result.passed()


def test_sccrq_flood_stays_within_bounds_and_spares_other_clients(make_lab, result):
    """Clients 4 and 5 each flood 500 SCCRQs with distinct tunnel IDs (bounds: 8 tunnels per mark,
    16 in all), and client 1 reconnects in the middle of it (Windows: next tunnel ID, 2).

    The per-mark bound stops each flood at 8 (its own established tunnel stays; its oldest pending
    entries are evicted), the global bound at 16 (evicting first from the marks holding the most);
    the victims' tunnels are untouched (same gateway IDs, echo both ways), client 1's new tunnel gets
    in despite the full table, and the LNS's answers to the evicted flood tunnels (xl2tpd keeps
    retransmitting its SCCRP) go back to the flooder that asked, not to whichever client spoke last:
    nothing is misdelivered. The marker's memory stays flat.
    """
    flood = 500
    with make_lab([WIN] * 5, echo_interval=ECHO) as lab:
        cfg = lab.workdir / "bounds.toml"
        cfg.write_text("[engine]\nmax_tunnels = 16\nmax_tunnels_per_mark = 8\n")
        marker = MarkerProcess(lab, "--config", str(cfg))
        bring_up(lab, marker)
        before = {m: ts[0]["gateway_tid"] for m, ts in tunnels_by_mark(marker.status()).items()}
        rss_before = rss_kb(marker.proc.pid)
        floods = [attacker_popen(lab, n, "sccrq-flood", "--first-tid", str(first), count=flood, interval=0.004)
                  for n, first in ((4, 20000), (5, 30000))]
        try:
            time.sleep(0.5)
            lab.stop_client(1)
            lab.start_client(1, tunnel_id=2)
            biggest = biggest_mark = 0
            while any(p.poll() is None for p in floods):
                st = marker.status()
                biggest = max(biggest, len(st["tunnels"]))
                biggest_mark = max(biggest_mark, *(len(v) for v in tunnels_by_mark(st).values()))
                time.sleep(0.1)
            outputs = [p.communicate(timeout=10)[0] for p in floods]
        finally:
            for p in floods:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert all(p.returncode == 0 for p in floods), outputs
        assert lab.wait_established(20), lab.report().format()
        time.sleep(3.0)  # xl2tpd retransmits its SCCRPs to the flood's tunnels meanwhile
        lab.stop_observer()
        report = lab.report()
        st = marker.status()
        rss_after = rss_kb(marker.proc.pid)
        assert marker.stop() == 0
        binds = re.findall(r"bind tunnel .* gateway-tid (\d+) ", marker.log_path.read_text())
    by_mark = tunnels_by_mark(st)
    result.figures.update({
        "sccrq_sent": 2 * flood, "max_tunnels": 16, "max_tunnels_per_mark": 8,
        "largest_table_seen": biggest, "largest_mark_seen": biggest_mark,
        "evicted": st["counters"].get("evicted", 0),
        "answers_to_evicted_tunnels_routed_to_their_sa": st["counters"].get("owner_mark_evicted", 0),
        "unknown_tunnel_out": st["counters"].get("unknown_tunnel", 0),
        # xl2tpd draws tunnel IDs at random without checking them: repeats among the flood's.
        "lns_tunnel_ids_given_twice": len(binds) - len(set(binds)),
        "misdelivered": report.misdelivered, "unmarked": report.unmarked,
        "marker_rss_kb_before": rss_before, "marker_rss_kb_after": rss_after,
    })
    text = report.format()
    assert biggest <= 16 and biggest_mark <= 8, result.figures
    assert len(st["tunnels"]) <= 16 and all(len(v) <= 8 for v in by_mark.values())
    assert st["counters"]["evicted"] >= 2 * flood - 16
    # The victims' tunnels are untouched; the reconnected client 1 has a new, established tunnel.
    for m in (2, 3):
        assert [t["gateway_tid"] for t in by_mark[m]] == [before[m]]
    assert any(t["client_tid"] == 2 and t["state"] == "established" for t in by_mark[1]), by_mark[1]
    # The flooders keep their own established tunnels.
    for m in (4, 5):
        assert before[m] in [t["gateway_tid"] for t in by_mark[m]]
    assert_isolated(report)
    assert report.misdelivered == 0 and report.unmarked == 0, text
    assert st["counters"].get("owner_mark_evicted", 0) > 0
    assert rss_after - rss_before < 16 * 1024, result.figures
    result.passed()


# ============================================================================== faults
def test_sigkill_under_traffic_then_restart_resumes_from_saved_state(make_lab, result):
    """Four clients (three aliased) at ten echoes a second; the daemon is SIGKILLed.

    test_marker_lab.py covers the basic fallback; this adds the resume: with the daemon dead the
    queue rules' ``--queue-bypass`` keeps packets moving (plain connmark, nothing unmarked); the
    next start removes the leftover rules (6, not 12), restores every tunnel from the state file
    (same marks, aliases and gateway IDs, before any packet) and nobody reconnects: no SCCRQ after
    the restart, the clients' sessions are the same.
    """
    with make_lab([WIN, WIN, WIN, LAC], echo_interval=0.1) as lab:
        marker = MarkerProcess(lab)
        bring_up(lab, marker)
        time.sleep(1.0)
        lab.stop_observer()
        assert_isolated(lab.report())
        before = sorted((t["mark"], t["alias"], t["gateway_tid"]) for t in marker.status()["tunnels"])
        peer_tids = {n: lab.win_status(n)["peer_tunnel_id"] for n in (1, 2, 3)}
        sccrq_before = sum(1 for d in marker.decisions() if d["kind"] == "SCCRQ")
        assert marker.stop(signal.SIGKILL) == -signal.SIGKILL
        leftover = marker_rules(lab)
        dead = observe(lab, 1.5)
        t0 = time.monotonic()
        marker.start()
        restored = sorted((t["mark"], t["alias"], t["gateway_tid"]) for t in marker.status()["tunnels"])
        restart_s = time.monotonic() - t0
        rules_after = marker_rules(lab)
        healed = observe(lab, 3.0)
        sccrq_after = sum(1 for d in marker.decisions() if d["kind"] == "SCCRQ") - sccrq_before
        assert marker.stop() == 0
        marker_log = marker.log_path.read_text()
        peer_tids_after = {n: lab.win_status(n)["peer_tunnel_id"] for n in (1, 2, 3)}
    result.figures.update({
        "tunnels": len(before), "restored": len(restored), "restart_seconds": round(restart_s, 2),
        "packets_out_while_dead": sum(c.packets_out for c in dead.clients),
        "unmarked_while_dead": dead.unmarked, "leftover_rules": len(leftover),
        "rules_after_restart": len(rules_after), "sccrq_after_restart": sccrq_after,
        "misdelivered_after": healed.misdelivered, "unmarked_after": healed.unmarked,
    })
    assert len(leftover) == 8 and sorted(rules_after) == sorted(leftover)
    assert sum(c.packets_out for c in dead.clients) > 0 and dead.unmarked == 0, dead.format()
    assert restored == before and len(before) == 4
    assert sum(1 for t in before if t[1]) == 2  # two of the three Windows clients were aliased
    assert "restored 4 tunnels from" in marker_log and "leftover rules/chains" in marker_log
    assert sccrq_after == 0 and peer_tids_after == peer_tids
    assert_isolated(healed, check_foreign=False)
    result.passed()


def test_corrupt_or_truncated_state_file(make_lab, result):
    """A state file with garbage, then one cut in half (written by a real run): each start logs a
    clear line, moves the file aside as ``state.json.bad``, starts with an empty table and works.

    The tunnels that were up when the truncated file was read are unknown to the new table (their
    SCCRQ/SCCRP will not come again), so their clients must reconnect once. A lost table also
    forgets the aliases the LNS still holds: the aliased client's StopCCN now reaches xl2tpd with
    its real tunnel ID, xl2tpd refuses it ("tried to disconnect with invalid TID") and keeps that
    tunnel, alias 65535 included, until its own HELLO fails; a new client aliased to 65535 before
    then is ignored ("Peer requested tunnel 65535 twice"). So the reconnecting clients here use
    the IDs 2 and 3, which need no alias, and are isolated again.
    """
    with make_lab([WIN, WIN], echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab)
        garbage = b"\x00\xffnot json{"
        marker.state_file.write_bytes(garbage)
        lab.start_lns()
        marker.start()
        assert marker.running() and marker.status()["tunnels"] == []
        bad = marker.state_file.with_name("state.json.bad")
        assert bad.read_bytes() == garbage
        log1 = marker.log_path.read_text()
        lab.start_clients()
        assert lab.wait_established(20)
        first = observe(lab, 2.0)
        assert wait_for(lambda: marker.state_file.exists()
                        and len(json.loads(marker.state_file.read_text())["tunnels"]) == 2, 5.0)
        assert marker.stop(signal.SIGKILL) == -signal.SIGKILL
        saved = marker.state_file.read_bytes()
        truncated = saved[:len(saved) // 2]
        marker.state_file.write_bytes(truncated)
        marker.start()
        assert marker.running() and marker.status()["tunnels"] == []
        assert bad.read_bytes() == truncated
        log2 = marker.log_path.read_text()[len(log1):]
        for n in (1, 2):
            lab.stop_client(n)
        for n in (1, 2):  # Windows reconnects with its next tunnel ID
            lab.start_client(n, tunnel_id=1 + n)
        assert lab.wait_established(20), lab.report().format()
        second = observe(lab, 3.0)
        st = marker.status()
        assert marker.stop() == 0
        refused_stopccn = any("tried to disconnect with invalid TID (1 != 65535)" in line for line in lab.lns_log())
    unusable = re.compile(r"ERROR l2tp_marker\.state: state file \S+/state\.json is unusable \((.+)\); "
                          r"moved to \S+/state\.json\.bad, starting with an empty table")
    m1, m2 = unusable.search(log1), unusable.search(log2)
    result.figures.update({"garbage_reason": m1 and m1.group(1), "truncated_reason": m2 and m2.group(1),
                           "truncated_bytes": len(truncated), "saved_bytes": len(saved),
                           "tunnels_after_reconnect": len(st["tunnels"]),
                           "lns_refused_stopccn_of_forgotten_alias": refused_stopccn,
                           "misdelivered": first.misdelivered + second.misdelivered,
                           "unmarked": first.unmarked + second.unmarked})
    assert m1 and m2, (log1, log2)
    assert "Traceback" not in log1 + log2
    assert_isolated(first)
    assert_isolated(second, check_foreign=False)
    assert sorted((t["client_tid"], t["alias"]) for t in st["tunnels"]) == [(2, None), (3, None)]
    assert refused_stopccn
    result.passed()


def test_nfqueue_overflow_drops_and_never_misroutes(make_lab, result):
    """The daemon is stopped (SIGSTOP) for 3 s with a queue of 8 packets while echoes flow at ten a
    second per client.

    What happens: the kernel holds 8 packets per queue and drops the rest (``queue_dropped`` in
    /proc/net/netfilter/nfnetlink_queue and ``l2tp_marker_queue_drops_total``). ``--queue-bypass``
    does not apply: it only lets packets pass when no program is bound to the queue, and the marker
    does not set the queue's fail-open flag, so a full queue drops instead of passing packets
    unjudged. So packets of known tunnels are dropped, never sent on with the last speaker's
    connmark: nothing is misdelivered or unmarked. After SIGCONT the held packets are judged and
    every session continues (L2TP retransmits control messages; a few PPP echoes are lost).
    """
    with make_lab([WIN, WIN, LAC], echo_interval=0.1) as lab:
        cfg = lab.workdir / "queue.toml"
        cfg.write_text("queue_maxlen = 8\n")
        metrics = lab.workdir / "metrics.prom"
        # The per-packet path: with the kernel fast path, known tunnels' data never reaches the
        # queue, so nothing would fill it.
        marker = MarkerProcess(lab, "--config", str(cfg), "--metrics-textfile", str(metrics),
                               "--metrics-interval", "0.3", "--fastpath", "off")
        bring_up(lab, marker)
        time.sleep(1.0)
        q0 = queue_stats(lab)
        os.kill(marker.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(3.0)
            q_full = queue_stats(lab)
        finally:
            os.kill(marker.proc.pid, signal.SIGCONT)
        time.sleep(3.0)
        lab.stop_observer()
        report = lab.report()
        q1 = queue_stats(lab)
        assert wait_for(lambda: metric(metrics, 'l2tp_marker_queue_drops_total{queue="1701",direction="in",'
                                                'kind="queue_dropped"}') == q1[1701]["queue_dropped"], 5.0)
        drops_in = metric(metrics, 'l2tp_marker_queue_drops_total{queue="1701",direction="in",kind="queue_dropped"}')
        drops_out = metric(metrics, 'l2tp_marker_queue_drops_total{queue="1702",direction="out",kind="queue_dropped"}')
        st = marker.status()
        assert marker.stop() == 0
    dropped = {q: q1[q]["queue_dropped"] - q0[q]["queue_dropped"] for q in (1701, 1702)}
    result.figures.update({
        "queue_maxlen": 8, "paused_seconds": 3.0, "waiting_while_paused": {q: q_full[q]["waiting"] for q in q_full},
        "queue_dropped_in": dropped[1701], "queue_dropped_out": dropped[1702],
        "metric_queue_dropped_in": drops_in, "metric_queue_dropped_out": drops_out,
        "misdelivered": report.misdelivered, "unmarked": report.unmarked,
        "echo_lost_client_side": sum(c.client_echo_sent - c.client_replies_ok for c in report.clients),
    })
    assert q_full[1701]["waiting"] == 8 and q_full[1702]["waiting"] == 8, q_full
    assert dropped[1701] > 0 and dropped[1702] > 0, (q0, q1)
    assert drops_out == q1[1702]["queue_dropped"]
    assert report.misdelivered == 0 and report.unmarked == 0, report.format()
    assert_isolated(report)
    assert st["counters"].get("unknown_tunnel", 0) == 0
    result.passed()


def test_lns_restart_releases_stale_tunnels(make_lab, result):
    """The LNS dies (SIGKILL) and starts again with clients up (idle timeout 3 s in this test).

    What xl2tpd and the clients do: xl2tpd sends no StopCCN when it is stopped (SIGTERM or SIGKILL,
    xl2tpd 1.3.18), and the new xl2tpd logs "Can not find tunnel" and ignores the old tunnels'
    packets. The clients keep sending into their dead tunnels until their own HELLO goes unanswered
    (Windows and xl2tpd: a HELLO after 60 s of silence plus about 30 s of retransmissions), then
    Windows reconnects with its next tunnel ID. The only signal the marker gets is the LNS's
    silence: a tunnel is idle when nothing came from the LNS for ``idle_timeout`` (default 600 s),
    so the stale tunnels are released even while their clients still send. The Windows clients'
    new tunnels (tunnel ID 2) are then learned, aliased and isolated as usual.
    """
    with make_lab([WIN, WIN, LAC], echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab, "--idle-timeout", "3")
        bring_up(lab, marker)
        time.sleep(1.0)
        old = sorted(t["gateway_tid"] for t in marker.status()["tunnels"])
        os.kill(lab.lns_pid, signal.SIGKILL)
        lab.stop_lns()
        killed = time.monotonic()
        lab.start_lns()
        assert wait_for(lambda: marker.status()["tunnels"] == [], 10.0), marker.status()
        released_after = time.monotonic() - killed
        st_gone = marker.status()
        time.sleep(1.0)
        still_sending = marker.status()["counters"].get("unknown_tunnel", 0)
        lab.stop_observer()
        for n in (1, 2):
            lab.stop_client(n)
        for n in (1, 2):
            lab.start_client(n, tunnel_id=2)
        lab.start_observer()
        assert wait_for(lambda: lab.is_established(1) and lab.is_established(2), 20.0)
        time.sleep(3.0)
        lab.stop_observer()
        report = lab.report()
        st = marker.status()
        assert marker.stop() == 0
        lns_log = "\n".join(lab.lns_log())
    result.figures.update({
        "stale_tunnels": len(old), "released_idle": st_gone["counters"].get("released_idle", 0),
        "seconds_to_release": round(released_after, 1), "idle_timeout": 3,
        "packets_into_dead_tunnels": still_sending,
        "new_tunnels": len(st["tunnels"]), "misdelivered": report.misdelivered, "unmarked": report.unmarked,
    })
    assert st_gone["counters"]["released_idle"] == 3
    assert still_sending > 0  # the clients were still sending into the released tunnels
    assert "Can not find tunnel" in lns_log
    new = tunnels_by_mark(st)
    assert sorted((t["client_tid"], t["alias"] or 0) for m in (1, 2) for t in new[m]) == [(2, 0), (2, 0xFFFF)]
    assert all(t["state"] == "established" and t["gateway_tid"] for m in (1, 2) for t in new[m])
    assert st["counters"]["released_idle"] == 3  # the new tunnels, answered by the LNS, stay
    assert_isolated(report, clients={1, 2}, check_foreign=False)
    result.passed()


def test_flushing_the_whole_mangle_table_under_traffic(make_lab, result):
    """An administrator runs ``iptables-legacy -t mangle -F`` and ``-X`` while clients talk.

    That removes the marker's jumps and chains and also the connmark plugin's rules. "Repaired"
    means: the marker puts back its own rules within ``repair_interval`` (counted, ``status`` shows
    no rule problem); it does not recreate the plugin's rules (they are strongSwan's: it installs
    them again when it re-establishes or rekeys the SAs, e.g. after ``ipsec restart``; ``doctor``
    reports them missing). Meanwhile every outbound packet of a known tunnel still gets its owner's
    mark from the marker, so nothing is misdelivered or unmarked. (In the lab the clients' inbound
    packets still arrive, unmarked; with real IPsec the plugin's PREROUTING mark selects the
    inbound SA, so clients are cut off until strongSwan's rules are back.) When the plugin's rules
    come back (inserted at the top, as the plugin does), the order is right again: its rules first,
    the marker's jump last.
    """
    with make_lab([WIN, WIN, LAC], echo_interval=ECHO) as lab:
        marker = MarkerProcess(lab, "--repair-interval", "0.5")
        bring_up(lab, marker)
        time.sleep(1.0)
        lab.stop_observer()
        mine = sorted(marker_rules(lab))
        run_in_gw(lab, [IPTABLES, "-t", "mangle", "-F"])
        run_in_gw(lab, [IPTABLES, "-t", "mangle", "-X"])
        flushed = time.monotonic()
        assert wait_for(lambda: marker.status()["rule_repairs"] >= 1 and not marker.status()["rule_problems"], 10.0)
        repair_s = time.monotonic() - flushed
        listing = lab.mangle_listing()
        during = observe(lab, 3.0)
        for argv in mangle_rules(lab.config):  # strongSwan puts its rules back
            run_in_gw(lab, argv)
        after = observe(lab, 3.0)
        st = marker.status()
        final = lab.mangle_listing()
        assert marker.stop() == 0
    result.figures.update({
        "repair_seconds": round(repair_s, 2), "rule_repairs": st["rule_repairs"],
        "misdelivered_without_plugin_rules": during.misdelivered,
        "unmarked_without_plugin_rules": during.unmarked,
        "packets_out_without_plugin_rules": sum(c.packets_out for c in during.clients),
        "misdelivered_after": after.misdelivered, "unmarked_after": after.unmarked,
    })
    assert sorted(line for line in listing if "L2TP-MARKER" in line) == mine
    assert not any("CONNMARK" in line or "MARK --set" in line
                   for line in listing if "L2TP-MARKER" not in line)  # plugin's: gone
    assert during.misdelivered == 0 and during.unmarked == 0, during.format()
    assert sum(c.packets_out for c in during.clients) > 0
    assert st["rule_repairs"] == 1 and st["rule_problems"] == []
    for chain in ("INPUT", "OUTPUT"):
        rules = [line for line in final if line.startswith(f"-A {chain} ")]
        assert "L2TP-MARKER" in rules[-1] and all("CONNMARK" in r for r in rules[:-1]) and len(rules) == 4
    assert_isolated(after, check_foreign=False)
    result.passed()


def test_plugin_adds_rules_after_the_marker_started(make_lab, result):
    """A third SA comes up after the marker started: the connmark plugin inserts its rules at the
    top of mangle PREROUTING/INPUT/OUTPUT. They land before the marker's jump (which the marker
    appended), so the order stays right without any repair, and the new client (tunnel ID 1 like
    the others) is aliased and isolated like the first two.
    """
    with make_lab([WIN, WIN, WIN], echo_interval=ECHO) as lab:
        late = plugin_rules_of(lab, 3)
        for argv in late:  # client 3's SA does not exist yet
            run_in_gw(lab, _delete_form(argv))
        marker = MarkerProcess(lab, "--repair-interval", "0.5")
        lab.start_lns()
        marker.start()
        lab.start_observer()
        lab.flush_conntrack()
        for n in (1, 2):
            lab.start_client(n)
        assert wait_for(lambda: lab.is_established(1) and lab.is_established(2), 20.0)
        for argv in late:  # the plugin, for the new SA
            run_in_gw(lab, argv)
        lab.start_client(3)
        assert wait_for(lambda: lab.is_established(3), 20.0)
        time.sleep(1.5)  # three repair intervals
        lab.stop_observer()
        first = lab.report()
        listing = lab.mangle_listing()
        second = observe(lab, 3.0)
        st = marker.status()
        assert marker.stop() == 0
    result.figures.update({"rule_repairs": st["rule_repairs"], "rule_problems": len(st["rule_problems"]),
                           "misdelivered": first.misdelivered + second.misdelivered,
                           "unmarked": first.unmarked + second.unmarked})
    for chain, plugin_target in (("INPUT", "CONNMARK --set-xmark"), ("OUTPUT", "CONNMARK --restore-mark")):
        rules = [line for line in listing if line.startswith(f"-A {chain} ")]
        assert plugin_target in rules[0] and "L2TP-MARKER" in rules[-1], rules
        assert sum("L2TP-MARKER" in r for r in rules) == 1
    assert f"-i {client_ifname(3)} -j CONNMARK" in [line for line in listing if line.startswith("-A INPUT ")][0]
    assert st["rule_repairs"] == 0 and st["rule_problems"] == []
    assert sorted(t["alias"] or t["client_tid"] for t in st["tunnels"]) == [1, 0xFFFE, 0xFFFF]
    assert_isolated(first)
    assert_isolated(second)
    result.passed()


def _delete_form(argv: list[str]) -> list[str]:
    """``iptables -t mangle -I CHAIN 1 RULE`` -> ``iptables -t mangle -D CHAIN RULE``."""
    i = argv.index("-I")
    return argv[:i] + ["-D", argv[i + 1]] + argv[i + 3:]
