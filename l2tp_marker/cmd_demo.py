"""``l2tp-marker demo``: the namespace lab with real xl2tpd, first without the marker, then with it."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from .lab.topology import ClientSpec, LabReport


def register(sub) -> None:
    p = sub.add_parser("demo", help="show the problem and the fix in a namespace lab with real xl2tpd (root)",
                       description="Builds network namespaces: several L2TP clients behind one NAT address, "
                                   "each over its own simulated IPsec SA, and one real xl2tpd LNS. Runs it "
                                   "without the marker, then with it, and prints a before/after summary. "
                                   "Everything it creates is removed at the end.")
    p.add_argument("--clients", default="win,win,xl2tpd",
                   help="comma list of win[:TUNNEL_ID] and xl2tpd (default: win,win,xl2tpd: two Windows-like "
                        "clients both offering tunnel ID 1, and one xl2tpd LAC)")
    p.add_argument("--seconds", type=float, default=8.0, help="traffic time per phase once clients are up (default 8)")
    p.add_argument("--prefix", default="l2mdemo", help="namespace name prefix (default l2mdemo)")
    p.set_defaults(func=_cmd_demo)


def _check_host() -> str | None:
    if os.geteuid() != 0:
        return "the demo builds network namespaces and netfilter rules: run it as root"
    for tool in ("ip", "iptables-legacy", "xl2tpd", "tcpdump", "conntrack", "unshare"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is missing: run scripts/install-deps.sh (or scripts/demo.sh, which does)"
    return None


def _phase(config, seconds: float, with_marker: bool, say) -> tuple[LabReport, dict | None]:
    from .lab.marker import MarkerProcess
    from .lab.topology import Lab

    with Lab(config) as lab:
        lab.start_lns()
        marker = None
        if with_marker:
            marker = MarkerProcess(lab)
            marker.start()
            say("  l2tp-marker running in the gateway namespace")
        lab.start_observer()
        lab.start_clients()
        up = lab.wait_established(12.0)
        say(f"  clients {'all established' if up else 'NOT all established'}; {seconds:g} s of traffic ...")
        time.sleep(seconds)
        lab.stop_observer()
        report = lab.report()
        status = marker.status() if marker is not None else None
        if marker is not None:
            marker.stop()
    return report, status


def _yn(b: bool) -> str:
    return "yes" if b else "NO"


def _cells(r) -> list[str]:
    return [_yn(r.established), f"{r.client_replies_ok}/{r.lns_replies_ok}", str(r.misdelivered), str(r.unmarked)]


def format_comparison(before: LabReport, after: LabReport, status: dict | None) -> list[str]:
    cols = ["client", "kind", "mark", "up", "echo c/l", "misdeliv", "unmarked", "up", "echo c/l", "misdeliv",
            "unmarked"]
    rows = [[a.token, a.kind, str(a.mark), *_cells(b), *_cells(a)] for b, a in zip(before.clients, after.clients)]
    w = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        left = "  ".join(c.ljust(w[i]) for i, c in enumerate(cells[:3]))
        mid = "  ".join(c.ljust(w[i + 3]) for i, c in enumerate(cells[3:7]))
        right = "  ".join(c.ljust(w[i + 7]) for i, c in enumerate(cells[7:]))
        return f"{left} | {mid} | {right}".rstrip()

    width_left = sum(w[:3]) + 4
    width_mid = sum(w[3:7]) + 6
    lines = [f"{'':<{width_left}} | {'WITHOUT the marker':<{width_mid}} | WITH the marker", line(cols),
             "-" * len(line(cols))]
    lines += [line(r) for r in rows]
    lines.append("up: tunnel and session established; echo c/l: PPP LCP echo replies received by the client / "
                 "by the LNS side;")
    lines.append("misdeliv: packets for this client sent over another client's SA link; unmarked: packets "
                 "that left with no SA mark")
    for t in sorted((status or {}).get("tunnels", []), key=lambda t: t["mark"]):
        if t["alias"] is not None:
            lines.append(f"with the marker, mark {t['mark']:#x}'s tunnel ID {t['client_tid']} reached xl2tpd as "
                         f"{t['alias']} and was restored on the way back")
    if before.lns_log_contains("twice"):
        lines.append('without the marker, xl2tpd logged: "Peer requested tunnel 1 twice, ignoring second one"')
    return lines


def _cmd_demo(args: argparse.Namespace) -> int:
    from .lab.__main__ import parse_clients
    from .lab.topology import LabConfig, LabError, cleanup_prefix

    problem = _check_host()
    if problem:
        print(f"l2tp-marker demo: {problem}", file=sys.stderr)
        return 2
    try:
        clients: tuple[ClientSpec, ...] = parse_clients(args.clients)
    except argparse.ArgumentTypeError as exc:
        print(f"l2tp-marker demo: --clients: {exc}", file=sys.stderr)
        return 2

    def say(msg: str) -> None:
        print(msg, flush=True)

    config = LabConfig(clients=clients, prefix=args.prefix, echo_interval=0.5, hello_interval=5.0)
    say(f"l2tp-marker demo: {len(clients)} L2TP clients behind one NAT address ({config.nat_ip}), "
        f"one xl2tpd LNS ({config.gw_ip})")
    for n, c in enumerate(clients, 1):
        what = f"Windows-like client, tunnel ID {c.tunnel_id}" if c.kind == "win" else "xl2tpd LAC, random tunnel ID"
        say(f"  client {n}: {what}, its own simulated IPsec SA (mark {n})")
    t0 = time.monotonic()
    try:
        cleanup_prefix(args.prefix)
        say("\n[1/2] without l2tp-marker (strongSwan's connmark rules only)")
        before, _ = _phase(config, args.seconds, False, say)
        say("\n[2/2] with l2tp-marker")
        after, status = _phase(config, args.seconds, True, say)
    except LabError as exc:
        print(f"l2tp-marker demo: the lab failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("l2tp-marker demo: interrupted; everything it created was removed", file=sys.stderr)
        return 130
    say("")
    for line in format_comparison(before, after, status):
        say(line)
    ok = after.all_healthy
    fixed = not before.all_healthy and ok
    say("")
    say(f"result: {'FIXED: every client established and isolated with the marker' if fixed else ''}"
        f"{'every client healthy in both phases' if ok and not fixed else ''}"
        f"{'PROBLEM: some client is not healthy with the marker (see above)' if not ok else ''}"
        f" ({time.monotonic() - t0:.0f} s; namespaces, processes and rules removed)")
    return 0 if ok else 1
