"""Saving the table from a forked child, so a big table never stalls the packet loop."""

from __future__ import annotations

import json

from l2tp_marker.config import DaemonConfig
from l2tp_marker.daemon import Daemon
from l2tp_marker.engine import EngineConfig
from l2tp_marker.judge import judge_packet

from .helpers import sccrp, sccrq


class StubBackend:
    name = "stub"


def daemon(tmp_path, state_file=None) -> Daemon:
    cfg = DaemonConfig(state_file=state_file or tmp_path / "state.json", fastpath="off",
                       engine=EngineConfig(max_tunnels_per_mark=100))
    return Daemon(cfg, backend=StubBackend())


def test_background_save_writes_the_snapshot_from_a_child(tmp_path, monkeypatch):
    d = daemon(tmp_path)
    monkeypatch.setattr(Daemon, "FORK_SAVE_MIN", 2)
    for tid in (1, 2, 3):
        judge_packet(d.engine, sccrq(tid), "in", tid)
    judge_packet(d.engine, sccrp(2, 700), "out", 0)
    d.handler.dirty = True
    d.save(background=True)
    assert d._saver is not None and not d.handler.dirty   # a child is writing; the loop goes on
    # A change while the child writes makes the table dirty again (the next save takes it).
    judge_packet(d.engine, sccrq(4), "in", 4)
    d.handler.dirty = True
    d.save(background=True)                                # still writing: no second child
    d._reap_saver(block=True)
    assert d._saver is None and d.handler.dirty
    saved = json.loads((tmp_path / "state.json").read_text())
    assert sorted(t["client_tid"] for t in saved["tunnels"]) == [1, 2, 3]
    assert [t["our_tid"] for t in saved["tunnels"] if t["client_tid"] == 2] == [700]


def test_a_failed_background_save_keeps_the_table_dirty(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    d = daemon(tmp_path, state_file=blocker / "state.json")  # its folder cannot be created
    monkeypatch.setattr(Daemon, "FORK_SAVE_MIN", 1)
    judge_packet(d.engine, sccrq(1), "in", 1)
    d.handler.dirty = True
    d.save(background=True)
    d._reap_saver(block=True)
    assert d.handler.dirty and "could not save state" in caplog.text


def test_small_tables_and_the_final_save_are_written_in_place(tmp_path):
    d = daemon(tmp_path)
    judge_packet(d.engine, sccrq(1), "in", 1)
    d.save(background=True)                                # below FORK_SAVE_MIN
    assert d._saver is None
    assert [t["client_tid"] for t in json.loads((tmp_path / "state.json").read_text())["tunnels"]] == [1]
