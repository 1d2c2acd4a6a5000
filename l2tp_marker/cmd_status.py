"""``l2tp-marker status``: the running daemon's live table, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .control import ControlError, ask


def register(sub) -> None:
    p = sub.add_parser("status", help="show the running daemon's tunnel table and counters",
                       description="Asks the running daemon over its control socket (root only).")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.add_argument("--all", action="store_true",
                   help="list every tunnel (by default the first 1000 by peer and ID; the count is always complete)")
    p.add_argument("--socket", type=Path, default=None,
                   help="control socket (default: control_socket from the config file)")
    p.add_argument("--config", type=Path, default=None, help="config file to take control_socket from")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        path = args.socket or load_config(args.config).control_socket
        st = ask(path, {"cmd": "status", **({"limit": None} if args.all else {})})
    except (ControlError, ConfigError) as exc:
        print(f"l2tp-marker status: {exc}", file=sys.stderr)
        return 1
    if "error" in st:
        print(f"l2tp-marker status: the daemon said: {st['error']}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for line in format_status(st):
            print(line)
    return 0


def _ids(sessions: list[dict]) -> str:
    return ",".join(f"{s['client_sid']}->{s['gateway_sid'] if s['gateway_sid'] is not None else '?'}"
                    + ("(closing)" if s["state"] == "closing" else "") for s in sessions) or "-"


def format_status(st: dict) -> list[str]:
    d = st.get("daemon", {})
    problems = st.get("rule_problems", [])
    lines = [f"daemon pid {d.get('pid')}, up {d.get('uptime')} s, queues in {d.get('queues', {}).get('in')} "
             f"out {d.get('queues', {}).get('out')}, backend {d.get('backend')}, rules "
             + ("OK" if not problems else "PROBLEM: " + "; ".join(problems))]
    cols = ("PEER", "CLIENT-TID", "ALIAS", "GW-TID", "MARK", "STATE", "SESSIONS", "AGE", "LAST-SEEN",
            "IN", "OUT", "CONFLICTS")
    rows = [[t["peer"], str(t["client_tid"]), "-" if t["alias"] is None else str(t["alias"]),
             "-" if t["gateway_tid"] is None else str(t["gateway_tid"]), f"{t['mark']:#x}", t["state"],
             _ids(t["sessions"]), f"{t['age']:.0f}s", f"{t['last_seen']:.0f}s", str(t["packets_in"]),
             str(t["packets_out"]), str(t["conflicts"])] for t in st.get("tunnels", [])]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    fpst = st.get("fastpath")
    if fpst:
        if fpst.get("mode") == "kernel":
            where = ("rewritten in the kernel" if fpst.get("aliases_in_kernel")
                     else f"on the per-packet path ({fpst.get('alias_reason')})")
            lines.append(f"fast path: kernel, table ip {fpst.get('table')}: {fpst.get('out_entries', 0)} outbound / "
                         f"{fpst.get('alias_entries', 0)} aliased / {fpst.get('in_entries', 0)} inbound entries, "
                         f"{fpst.get('packets_out', 0)} / {fpst.get('packets_in', 0)} packets never queued; "
                         f"{fpst.get('aliased_tunnels', 0)} aliased tunnel(s) {where}")
        else:
            lines.append(f"fast path: {fpst.get('mode')} ({fpst.get('reason')}): every packet is judged in userspace")
    total = st.get("tunnels_total", len(rows))
    lines.append(f"{len(rows)} tunnel(s)" if total == len(rows)
                 else f"{total} tunnel(s), showing the first {len(rows)} (--all for every one)")
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("decisions: " + (", ".join(f"{k}={v}" for k, v in st.get("counters", {}).items()) or "none"))
    lines.append("packets: " + (", ".join(f"{k}={v}" for k, v in st.get("packets", {}).items()) or "none"))
    conflicts = st.get("conflicts", [])
    lines.append(f"conflicts: {len(conflicts)}")
    for c in conflicts[-10:]:
        lines.append(f"  {c['ago']:.0f}s ago {c['peer']} gateway tunnel {c['gateway_tid']} bound to mark "
                     f"{c['bound_mark']:#x}, {c['kind']} came with mark {c['seen_mark']:#x}")
    return lines
