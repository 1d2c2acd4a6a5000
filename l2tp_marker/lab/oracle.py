"""A cheating marker for the lab: re-marks outbound L2TP by who it is for, by looking.

It knows what a real marker cannot (the lab's echo tokens name the client, ``lac-2`` -> mark 2)
and uses the simplest learning for control messages (the Assigned Tunnel ID of each inbound
SCCRQ, with that packet's mark).  That makes it a reference for the lab itself: with it every
packet must reach the right client, so a lab that still counts misdeliveries is broken, not the
marker under test.  It also proves the path the real daemon relies on: an NFQUEUE verdict that
changes the mark at LOCAL_OUT makes the kernel route the packet again (``nf_reroute``), here into
table 100+N and out of ``cN``.

Run in the gateway namespace, behind rules placed after the connmark plugin's::

    iptables-legacy -t mangle -A INPUT  -p udp --dport 1701 -j NFQUEUE --queue-num Q --queue-bypass
    iptables-legacy -t mangle -A OUTPUT -p udp --sport 1701 -j NFQUEUE --queue-num Q --queue-bypass
    python -m l2tp_marker.lab.oracle --queue Q --client lac-1=1 --client lac-2=2

Packets it cannot attribute pass with the mark they have.  SIGTERM ends it.  Tunnel IDs two
clients share (Windows' 1) are not told apart: use it with xl2tpd clients.
"""

from __future__ import annotations

import argparse
import signal
import sys

from l2tp_marker.lab.analysis import L2tpPacket, decode_l2tp_payload


NF_INET_LOCAL_IN = 1
MSG_SCCRQ = 1


def decode(payload: bytes) -> L2tpPacket | None:
    """The L2TP part of an IPv4/UDP packet from the queue."""
    if len(payload) < 28 or payload[0] >> 4 != 4 or payload[9] != 17:
        return None
    ihl = (payload[0] & 0x0F) * 4
    return decode_l2tp_payload(0.0, "", "", 0, 0, payload[ihl + 8:])


def outbound_mark(pkt: L2tpPacket, marks: dict[str, int],
                  tunnel_marks: dict[int, int]) -> int | None:
    """Mark for an outbound packet: by the client its echo token names, else by the tunnel ID
    learnt from that client's SCCRQ; None if neither tells."""
    for token in pkt.tokens():
        if token in marks:
            return marks[token]
    if pkt.tunnel_id is not None:
        return tunnel_marks.get(pkt.tunnel_id)
    return None


def main(argv: list[str] | None = None) -> int:
    from netfilterqueue import NetfilterQueue

    parser = argparse.ArgumentParser(prog="python -m l2tp_marker.lab.oracle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--client", action="append", default=[], metavar="TOKEN=MARK")
    args = parser.parse_args(argv)
    marks = {tok: int(mark, 0) for tok, mark in (c.split("=", 1) for c in args.client)}
    tunnel_marks: dict[int, int] = {}
    counts = {"remarked": 0, "passed": 0, "learnt": 0}

    def judge(qpkt) -> None:
        try:
            pkt = decode(qpkt.get_payload())
            if pkt is None:
                counts["passed"] += 1
            elif qpkt.hook == NF_INET_LOCAL_IN:
                if pkt.control and pkt.msg_type == MSG_SCCRQ and pkt.assigned_tunnel_id:
                    tunnel_marks[pkt.assigned_tunnel_id] = qpkt.get_mark()
                    counts["learnt"] += 1
                counts["passed"] += 1
            else:
                mark = outbound_mark(pkt, marks, tunnel_marks)
                if mark is not None and mark != qpkt.get_mark():
                    qpkt.set_mark(mark)
                    counts["remarked"] += 1
                else:
                    counts["passed"] += 1
        finally:
            qpkt.accept()

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    nfq = NetfilterQueue()
    nfq.bind(args.queue, judge)
    print(f"oracle: bound to queue {args.queue}", flush=True)
    try:
        nfq.run()
    except KeyboardInterrupt:
        pass
    finally:
        nfq.unbind()
        print(f"oracle: {counts['remarked']} re-marked, {counts['passed']} passed, "
              f"{counts['learnt']} tunnel(s) learnt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
