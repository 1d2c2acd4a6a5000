"""The control socket: root-only mode, one JSON request and reply, clear errors without a daemon."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest

from l2tp_marker.control import ControlError, ControlServer, ask, status_snapshot
from l2tp_marker.engine import Engine
from l2tp_marker.judge import judge_packet

from .helpers import FakeClock, sccrp, sccrq


def serve_until(server: ControlServer, done: threading.Event) -> None:
    while not done.is_set():
        server.serve_one()
        time.sleep(0.005)


def test_status_round_trip_and_socket_mode(tmp_path):
    e = Engine(clock=FakeClock())
    judge_packet(e, sccrq(1), "in", 1)
    judge_packet(e, sccrp(1, 700), "out", 0)
    path = tmp_path / "run" / "ctl.sock"
    server = ControlServer(path, lambda req: status_snapshot(e, stats={"in_accepted": 1}) if req.get("cmd") == "status"
                           else {"error": "unknown"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    done = threading.Event()
    t = threading.Thread(target=serve_until, args=(server, done))
    t.start()
    try:
        st = ask(path, {"cmd": "status"})
        assert [(x["client_tid"], x["gateway_tid"], x["mark"], x["state"]) for x in st["tunnels"]] == [(1, 700, 1, "bound")]
        assert st["packets"] == {"in_accepted": 1} and st["counters"]["sccrq_learned"] == 1
        assert ask(path, {"cmd": "nope"}) == {"error": "unknown"}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(b"this is not json\n")
            assert json.loads(s.makefile().readline()) == {"error": "request is not JSON"}
    finally:
        done.set()
        t.join()
        server.close()
    assert not path.exists()


def test_no_daemon_is_a_clear_error(tmp_path):
    with pytest.raises(ControlError, match="no l2tp-marker daemon is running"):
        ask(tmp_path / "missing.sock", {"cmd": "status"})


def test_status_lists_at_most_limit_tunnels_but_counts_them_all():
    from l2tp_marker.cmd_status import format_status
    from l2tp_marker.engine import EngineConfig

    e = Engine(EngineConfig(max_tunnels_per_mark=100), clock=FakeClock())
    for tid in (5, 3, 9, 1, 7):
        judge_packet(e, sccrq(tid), "in", 1)
    full = status_snapshot(e, stats={})
    assert [t["client_tid"] for t in full["tunnels"]] == [1, 3, 5, 7, 9] and full["tunnels_total"] == 5
    some = status_snapshot(e, stats={}, limit=2)
    assert [t["client_tid"] for t in some["tunnels"]] == [1, 3] and some["tunnels_total"] == 5
    assert "5 tunnel(s), showing the first 2 (--all for every one)" in format_status(some)
    assert "5 tunnel(s)" in format_status(full) and "showing" not in "\n".join(format_status(full))


def test_queue_counters_are_read_from_the_kernels_listing(tmp_path):
    from l2tp_marker.metrics import parse_queue_stats, read_queue_stats

    # /proc/net/netfilter/nfnetlink_queue: queue, portid, waiting, copy mode, range, queue
    # dropped, user dropped, last id (packets queued so far), 1
    text = ("1701  12345     0 2 65531     0     0       42  1\n"
            " 1702  12345     3 2 65531     7     1     1000  1\n"
            "garbage line\n")
    assert parse_queue_stats(text) == {
        1701: {"waiting": 0, "queue_dropped": 0, "user_dropped": 0, "queued": 42},
        1702: {"waiting": 3, "queue_dropped": 7, "user_dropped": 1, "queued": 1000}}
    (tmp_path / "nfq").write_text(text)
    assert read_queue_stats(tmp_path / "nfq") == parse_queue_stats(text)
    assert read_queue_stats(tmp_path / "missing") == {}
