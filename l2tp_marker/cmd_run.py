"""``l2tp-marker run``: options and config file for the live daemon."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from .config import ConfigError, add_engine_options, engine_config_from_args, load_config


def register(sub) -> None:
    p = sub.add_parser("run", help="run the marker daemon (NFQUEUE) on this host or namespace",
                       description="Installs the marker's rules in legacy iptables mangle, judges queued "
                                   "L2TP packets and removes the rules on exit (SIGTERM/SIGINT).")
    p.add_argument("--config", type=Path, default=None,
                   help="TOML config file (default /etc/l2tp-marker/l2tp-marker.toml if it exists)")
    p.add_argument("--queue-in", type=int, help="NFQUEUE number for inbound udp/1701 (default 1701)")
    p.add_argument("--queue-out", type=int, help="NFQUEUE number for outbound udp sport 1701 (default 1702)")
    p.add_argument("--inbound-match", choices=("ipsec", "none"),
                   help="judge inbound packets only if they came through IPsec (ipsec, default) or any "
                        "marked packet (none: labs without IPsec)")
    p.add_argument("--chain-prefix", help="name prefix of the chains the marker owns (default L2TP-MARKER)")
    p.add_argument("--state-file", type=Path, help="where the table is saved across restarts "
                                                   "(default /var/lib/l2tp-marker/state.json)")
    p.add_argument("--decision-log", type=Path, help="append a JSON line per judged L2TP packet here")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP here")
    p.add_argument("--metrics-textfile", type=Path, help="write Prometheus metrics to this textfile")
    p.add_argument("--metrics-interval", type=float, help="seconds between textfile writes (default 15)")
    p.add_argument("--repair-interval", type=float, help="seconds between rule checks (default 5)")
    p.add_argument("--control-socket", type=Path,
                   help="Unix socket for `status` (default /run/l2tp-marker/control.sock)")
    p.add_argument("--fastpath", choices=("auto", "on", "off"),
                   help="kernel fast path for data packets of known tunnels: use it if the kernel can "
                        "(auto, default), require it (on) or never use it (off)")
    add_engine_options(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run_daemon

    log = logging.getLogger("l2tp_marker")
    try:
        cfg = load_config(args.config)
        over = {k: getattr(args, k) for k in ("queue_in", "queue_out", "inbound_match", "chain_prefix",
                                               "state_file", "decision_log", "control_socket",
                                               "metrics_listen", "metrics_textfile", "metrics_interval",
                                               "repair_interval", "fastpath") if getattr(args, k) is not None}
        cfg = replace(cfg, engine=engine_config_from_args(args, cfg.engine), **over)
    except (ConfigError, ValueError) as exc:
        print(f"l2tp-marker run: {exc}", file=sys.stderr)
        return 2
    log.debug("configuration: %s", cfg)
    return run_daemon(cfg)
