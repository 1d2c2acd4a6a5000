"""Bind-mount files, then exec a program: the middle link of the lab's exec chain.

    ip netns exec NS unshare -m --propagation private \\
        PYTHON -m l2tp_marker.lab.mountexec --bind STANDIN /usr/sbin/pppd -- \\
        /usr/sbin/xl2tpd -D -c CONF -p PIDFILE -C CONTROL

Every link execs the next one, so the PID the lab started is xl2tpd's PID.  The helper refuses
to mount unless it runs in a mount namespace of its own (not its parent's) in which the mount
holding the target does not propagate (no ``shared:`` peer group), so it can never cover the
host's ``/usr/sbin/pppd``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _unsafe_reason(target: str) -> str | None:
    """Why bind-mounting over ``target`` here could leak into another mount namespace, or None."""
    try:
        own = os.readlink("/proc/self/ns/mnt")
        parent = os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError as exc:
        return f"cannot compare mount namespaces: {exc}"
    if own == parent:
        return "still in the parent's mount namespace"
    target = os.path.realpath(target)
    best, shared = "", True
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            mount_point = fields[4].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best = mount_point
                shared = any(f.startswith("shared:") for f in fields[6:sep])
    if shared:
        return f"mount {best or '/'} holding {target} is shared (would propagate)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mountexec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", nargs=2, action="append", default=[], metavar=("SRC", "DST"),
                        help="bind-mount SRC over DST before exec (repeatable)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no program to exec")
    for _src, dst in args.bind:
        reason = _unsafe_reason(dst)
        if reason:
            print(f"mountexec: refusing to bind-mount over {dst}: {reason} "
                  "(run under 'unshare -m --propagation private')", file=sys.stderr)
            return 2
    for src, dst in args.bind:
        subprocess.run(["mount", "--bind", src, dst], check=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
