"""``l2tp-marker doctor``: inspect the host (or a namespace) and report PASS/WARN/FAIL per check."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .config import ConfigError, load_config


def register(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check xl2tpd, strongSwan's connmark rules, IPsec marks, the marker's rules, kernel "
                       "fast path and daemon, rp_filter and conntrack; say what is wrong and how to fix it",
        description="Reads (never changes) the firewall tables (iptables and nftables), 'ip xfrm', sysctls, "
                    "conntrack, the xl2tpd processes and the daemon's status, and prints one line per check: "
                    "PASS, WARN, FAIL or INFO, with the fix for WARN and FAIL. Exit code 0 without FAIL, 1 "
                    "with, 2 when doctor itself cannot run. Run as root.")
    p.add_argument("--netns", metavar="NAME", help="inspect this network namespace (ip netns) instead of the host")
    p.add_argument("--config", type=Path, default=None,
                   help="the marker's config file (default /etc/l2tp-marker/l2tp-marker.toml if it exists)")
    p.add_argument("--socket", type=Path, default=None,
                   help="the daemon's control socket (default: control_socket from the config)")
    p.add_argument("--inbound-match", choices=("ipsec", "none"),
                   help="as given to `run`, if it overrides the config")
    p.add_argument("--queue-in", type=int, help="as given to `run`, if it overrides the config")
    p.add_argument("--queue-out", type=int, help="as given to `run`, if it overrides the config")
    p.add_argument("--chain-prefix", help="as given to `run`, if it overrides the config")
    p.add_argument("--fastpath", choices=("auto", "on", "off"),
                   help="as given to `run`, if it overrides the config (only used when the daemon does not "
                        "answer: a running daemon reports whether it uses the kernel fast path)")
    p.add_argument("--xl2tpd-config", action="append", default=[], metavar="FILE",
                   help="also check this xl2tpd.conf (the running xl2tpd's own is found from its command line)")
    p.add_argument("--xl2tpd-log", action="append", default=[], metavar="FILE",
                   help="xl2tpd log to search for refused SCCRQs ('Peer requested tunnel N twice'); the "
                        "stderr file of an xl2tpd -D is found by itself")
    p.add_argument("--json", action="store_true", help="print the checks as one JSON object")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .daemon import ruleset_for
    from .doctor import diagnose, exit_code, format_checks, to_json
    from .doctor_probe import ProbeError, ProbeOptions, collect

    try:
        cfg = load_config(args.config)
        over = {k: getattr(args, k) for k in ("inbound_match", "queue_in", "queue_out", "chain_prefix",
                                               "fastpath") if getattr(args, k) is not None}
        cfg = replace(cfg, **over)
        ruleset = ruleset_for(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"l2tp-marker doctor: {exc}", file=sys.stderr)
        return 2
    opts = ProbeOptions(control_socket=str(args.socket or cfg.control_socket),
                        xl2tpd_configs=tuple(str(Path(p).resolve()) for p in args.xl2tpd_config),
                        xl2tpd_logs=tuple(str(Path(p).resolve()) for p in args.xl2tpd_log))
    try:
        facts = collect(opts, ruleset=ruleset, netns=args.netns, fastpath=cfg.fastpath,
                        fastpath_bit=cfg.fastpath_bit)
    except ProbeError as exc:
        print(f"l2tp-marker doctor: {exc}", file=sys.stderr)
        return 2
    checks = diagnose(facts)
    if args.json:
        json.dump(to_json(checks, facts), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        where = f"network namespace {args.netns}" if args.netns else "this host"
        print(f"l2tp-marker doctor: {where}")
        for line in format_checks(checks):
            print(line)
        fails = sum(1 for c in checks if c.level == "FAIL")
        warns = sum(1 for c in checks if c.level == "WARN")
        print(f"{fails} FAIL, {warns} WARN, {len(checks)} checks")
    return exit_code(checks)
