"""A tiny agent run inside a test namespace: holds UDP sockets and obeys JSON commands on stdin.

Commands (one JSON object a line; one JSON reply a line):
  {"op": "bind", "name": N, "addr": A, "port": P}
  {"op": "send", "name": N, "to": [A, P], "hex": H, "mark": M}    (SO_MARK M, 0 = none)
  {"op": "recv", "name": N, "timeout": S}  -> {"hex": H, "from": [A, P]} or {"timeout": true}
"""

import binascii
import json
import socket
import sys

SO_MARK = 36


def main() -> None:
    socks: dict[str, socket.socket] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "bind":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((cmd["addr"], cmd["port"]))
                socks[cmd["name"]] = s
                reply = {"ok": True}
            elif op == "send":
                s = socks[cmd["name"]]
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, cmd.get("mark", 0))
                s.sendto(binascii.unhexlify(cmd["hex"]), tuple(cmd["to"]))
                reply = {"ok": True}
            elif op == "recv":
                s = socks[cmd["name"]]
                s.settimeout(cmd.get("timeout", 2.0))
                try:
                    data, src = s.recvfrom(65535)
                    reply = {"hex": data.hex(), "from": list(src)}
                except socket.timeout:
                    reply = {"timeout": True}
            else:
                reply = {"error": f"unknown op {op}"}
        except OSError as exc:
            reply = {"error": str(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
