"""Operator's command line for the namespace lab (run as root).

    python -m l2tp_marker.lab run --clients win,win,xl2tpd --duration 10
    python -m l2tp_marker.lab run --clients xl2tpd,xl2tpd --hold      # poke around, Ctrl-C ends
    python -m l2tp_marker.lab commands --clients win,win               # what "run" would build
    python -m l2tp_marker.lab cleanup --prefix l2m                     # leftovers of a dead lab

A client is ``xl2tpd`` or ``win[:TUNNEL_ID[:SESSION_ID]]`` (``win`` means tunnel 1, session 1,
as a freshly booted Windows PC).  Everything the lab creates is removed when it ends, also on
Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from l2tp_marker.lab.topology import (ClientSpec, Lab, LabConfig, LabError, cleanup_prefix,
                                      setup_commands)


def parse_clients(text: str) -> tuple[ClientSpec, ...]:
    """``"win,win:7,xl2tpd"`` -> ClientSpecs."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, *ids = item.split(":")
        if kind not in ("win", "xl2tpd"):
            raise argparse.ArgumentTypeError(f"unknown client kind {kind!r}")
        if kind == "xl2tpd" and ids:
            raise argparse.ArgumentTypeError("xl2tpd clients pick their own IDs")
        try:
            numbers = [int(x) for x in ids]
            specs.append(ClientSpec(kind, *numbers[:2]))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    if not specs:
        raise argparse.ArgumentTypeError("no clients")
    return tuple(specs)


def _config(args: argparse.Namespace) -> LabConfig:
    return LabConfig(clients=args.clients, prefix=args.prefix, echo_interval=args.echo_interval,
                     hello_interval=args.hello_interval, rp_filter=args.rp_filter,
                     workdir=Path(args.workdir) if args.workdir else None,
                     keep_workdir=args.keep)


def _terminate_as_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    with Lab(config) as lab:
        print(f"lab {config.prefix}: work directory {lab.workdir}", flush=True)
        lab.start_lns()
        lab.start_observer()
        lab.start_clients(stagger=args.stagger)
        up = lab.wait_established(args.establish_timeout)
        print(f"all clients established: {'yes' if up else 'NO'}", flush=True)
        if args.hold:
            print(f"holding; gateway namespace {lab.gw_ns}, clients "
                  f"{', '.join(lab.client_ns(n) for n in range(1, lab.n_clients + 1))}. "
                  "Ctrl-C to stop.", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        else:
            time.sleep(args.duration)
        lab.stop_observer()
        report = lab.report()
        lab.stop_clients()
    if args.json:
        print(json.dumps(asdict(report), indent=1, default=str))
    else:
        print(report.format())
    return 0 if report.all_healthy else 1


def cmd_commands(args: argparse.Namespace) -> int:
    for argv in setup_commands(_config(args)):
        print(" ".join(argv))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    for line in cleanup_prefix(args.prefix):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m l2tp_marker.lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "commands"):
        p = sub.add_parser(name)
        p.add_argument("--clients", type=parse_clients, default=parse_clients("win,win"),
                       help="comma-separated: xl2tpd | win[:TID[:SID]] (default win,win)")
        p.add_argument("--prefix", default="l2m", help="namespace prefix (default l2m)")
        p.add_argument("--echo-interval", type=float, default=1.0)
        p.add_argument("--hello-interval", type=float, default=5.0)
        p.add_argument("--rp-filter", type=int, choices=(0, 1, 2), default=0)
        p.add_argument("--workdir", help="keep configs, logs and captures here")
        p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
        if name == "run":
            p.add_argument("--duration", type=float, default=10.0,
                           help="seconds to run once established (default 10)")
            p.add_argument("--establish-timeout", type=float, default=20.0)
            p.add_argument("--stagger", type=float, default=0.0,
                           help="seconds between client starts")
            p.add_argument("--hold", action="store_true", help="run until Ctrl-C")
            p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser("cleanup")
    p.add_argument("--prefix", default="l2m")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"run": cmd_run, "commands": cmd_commands, "cleanup": cmd_cleanup}[args.command](args)
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lab: interrupted; everything was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
