"""The ``l2tp-marker`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import __version__
from . import cmd_capture, cmd_demo, cmd_doctor, cmd_run, cmd_status
from .config import add_engine_options


def _cmd_replay(args: argparse.Namespace) -> int:
    from .capture_io import CaptureError, LINKTYPE_RAW, write_pcap
    from .config import engine_config_from_args
    from .replay import MarkPolicy, ReplayError, format_summary, format_table, replay, write_json

    try:
        marks = MarkPolicy.from_file(args.marks) if args.marks else MarkPolicy(args.mark_by)
    except OSError as exc:
        print(f"l2tp-marker replay: cannot read marks file {args.marks}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ReplayError as exc:
        print(f"l2tp-marker replay: {exc}", file=sys.stderr)
        return 2
    try:
        result = replay(args.capture, gateway=args.gateway, marks=marks,
                        config=engine_config_from_args(args), fastpath_bit=args.fastpath_bit)
    except (ReplayError, CaptureError, ValueError) as exc:
        print(f"l2tp-marker replay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"l2tp-marker replay: cannot read {args.capture}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.write_rewritten:
        try:
            write_pcap(args.write_rewritten, result.rewritten, LINKTYPE_RAW)
        except OSError as exc:
            print(f"l2tp-marker replay: cannot write {args.write_rewritten}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    if args.json:
        write_json(result, sys.stdout)
    else:
        if result.records:
            for line in format_table(result.records):
                print(line)
        for line in format_summary(result.summary):
            print(line)
    return 0 if result.summary["l2tp_packets"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2tp-marker",
        description="Per-client IPsec SA marks and tunnel-ID translation for L2TP clients behind one NAT.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="run a capture (pcap/pcapng) through the engine offline",
                       description="Replays a capture through the same engine the daemon uses and prints "
                                   "the decision for every L2TP packet, then a summary.")
    p.add_argument("capture", help="pcap or pcapng file (Ethernet, raw IP, Linux cooked SLL/SLL2, NFLOG)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per L2TP packet, then a summary object (format in the README)")
    p.add_argument("--gateway", help="the LNS address (needed when the capture has no NFLOG hooks and "
                                     "no SCCRQ to guess it from)")
    p.add_argument("--mark-by", choices=("peer", "addr"), default="peer",
                   help="for captures without marks: give each distinct peer address:port (peer) or "
                        "address (addr) its own inbound mark 1, 2, ... (default peer)")
    p.add_argument("--marks", metavar="FILE",
                   help="for captures without marks: file of 'ADDRESS[:PORT] MARK' lines")
    p.add_argument("--fastpath-bit", type=lambda v: int(v, 0), default=0x80000000, metavar="BIT",
                   help="the live daemon's fastpath_bit (default 0x80000000; 0 = none): in an NFLOG "
                        "capture it marks packets the kernel fast path handled; replay strips it from "
                        "their mark and flags them")
    p.add_argument("--write-rewritten", metavar="PCAP",
                   help="write every L2TP packet as it leaves the marker (rewrites applied) to a raw-IP pcap")
    add_engine_options(p)
    p.set_defaults(func=_cmd_replay)

    for mod in (cmd_run, cmd_status, cmd_capture, cmd_doctor, cmd_demo):
        mod.register(sub)
    return parser


_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (``<3>``...), which journald reads from stderr."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup_logging(level: str, environ=None) -> None:
    """stderr logging; under systemd (JOURNAL_STREAM set) with journald priority prefixes."""
    environ = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    if environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
