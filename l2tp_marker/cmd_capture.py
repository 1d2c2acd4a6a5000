"""``l2tp-marker capture``: options, and errors as messages with exit code 2 (no tracebacks)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from .capture import DEFAULT_GROUP, CaptureError, CaptureOptions, CaptureRun, preflight
from .config import ConfigError, load_config


def _positive_int(s: str) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {v}")
    return v


def _group(s: str) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"NFLOG group must be 0..65535, not {v}")
    return v


def _seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number of seconds") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {s}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "capture", help="record L2TP as the marker sees it (with marks and hooks) for `replay`",
        description="Adds NFLOG rules for udp/1701 in legacy mangle INPUT/OUTPUT, just before the "
                    "marker's jumps (inbound before any rewrite, outbound as the LNS sent it), "
                    "records them with tcpdump into a LINKTYPE_NFLOG pcap that `l2tp-marker replay` "
                    "reads with each packet's mark and hook, and removes the rules on exit "
                    "(Ctrl-C, SIGTERM, --duration, --count). Needs root and tcpdump.")
    p.add_argument("-w", "--write", dest="file", type=Path, required=True, metavar="FILE",
                   help="capture file to write (pcap; pcapng with --pcapng)")
    p.add_argument("--group", type=_group, default=DEFAULT_GROUP,
                   help=f"NFLOG group to use (default {DEFAULT_GROUP}); must not be in use by another logger")
    p.add_argument("--duration", type=_seconds, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--count", type=_positive_int, default=None, metavar="N", help="stop after N packets")
    p.add_argument("--pcapng", action="store_true", help="write pcapng instead of classic pcap")
    p.add_argument("--config", type=Path, default=None,
                   help="the marker's config file, for its chain prefix "
                        "(default /etc/l2tp-marker/l2tp-marker.toml if it exists)")
    p.add_argument("--chain-prefix", default=None,
                   help="the marker's chain prefix, if it runs with one other than the config's")
    p.set_defaults(func=_cmd_capture)


def _cmd_capture(args: argparse.Namespace) -> int:
    log = logging.getLogger("l2tp_marker")
    try:
        cfg = load_config(args.config)
        if args.chain_prefix is not None:
            cfg = replace(cfg, chain_prefix=args.chain_prefix)
    except ConfigError as exc:
        print(f"l2tp-marker capture: {exc}", file=sys.stderr)
        return 2
    opts = CaptureOptions(path=args.file, group=args.group, duration=args.duration, count=args.count,
                          pcapng=args.pcapng, chain_prefix=cfg.chain_prefix)
    log.debug("capture options: %s", opts)
    try:
        preflight(opts)
        return CaptureRun(opts).run()
    except CaptureError as exc:
        print(f"l2tp-marker capture: {exc}", file=sys.stderr)
        return 2
