"""``l2tp-marker replay`` on the command line: JSON lines, the table, --write-rewritten, errors.

Runs ``l2tp_marker.cli.main([...])`` in-process (stdout/stderr through capsys) on the captures of
``pcaps/`` (see ``pcaps/README.md``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from l2tp_marker import capture_io, cli
from tests.unit.test_replay_pcaps import (
    ALIAS, GW, NAT, PCAPS, RECORD_KEYS, SECRET, assigned_tunnel_id, codec_udp_checksum_ok, l2tp,
    scapy_udp_checksum_ok,
)

TWO = str(PCAPS / "two-windows-same-tid.pcap")


def replay_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["replay", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def parse_json(out: str) -> tuple[list[dict], dict]:
    lines = out.splitlines()
    assert lines, "no output"
    objs = [json.loads(line) for line in lines]  # every line is one valid JSON object
    assert all(isinstance(o, dict) for o in objs)
    *records, last = objs
    assert set(last) == {"summary"}, "the last line is the summary object"
    for rec in records:
        assert RECORD_KEYS <= rec.keys(), rec
        assert "summary" not in rec
    return records, last["summary"]


# ----------------------------------------------------------------------------- --json


def test_json_two_windows_marks_alias_and_checksums(capsys, tmp_path):
    """The issue's acceptance: every outbound packet leaves with its owner's mark, the second
    client's tunnel is aliased on the way in and restored on the way out, and the checksums of the
    rewritten bytes are valid."""
    written = tmp_path / "out.pcap"
    rc, out, err = replay_cli(capsys, TWO, "--json", "--write-rewritten", str(written))
    assert rc == 0, err
    records, summary = parse_json(out)
    leaving = list(capture_io.read_capture(written))
    assert len(leaving) == len(records) == summary["l2tp_packets"] == 45
    ip_of = {rec["no"]: p.ip for rec, p in zip(records, leaving)}
    original = {p.no: p.ip for p in capture_io.read_capture(TWO)}

    # owners: the tunnel ID the LNS saw in each SCCRQ (after the marker) -> the SA mark it came with
    owners: dict[int, int] = {}
    for rec in records:
        if rec["kind"] == "SCCRQ":
            assert assigned_tunnel_id(original[rec["no"]]) == 1  # both PCs offer tunnel 1
            owners.setdefault(assigned_tunnel_id(ip_of[rec["no"]]), rec["mark_in"])
    assert owners == {1: 1, ALIAS: 2}

    # 1. owner's mark on every outbound packet
    outbound = [r for r in records if r["dir"] == "out"]
    for rec in outbound:
        assert rec["mark"] == owners[rec["tunnel"]], rec
    assert any(r["mark_in"] != r["mark"] for r in outbound if r["tunnel"] == 1)
    assert any(r["mark_in"] != r["mark"] for r in outbound if r["tunnel"] == ALIAS)

    # 2. aliased on the way in, restored on the way out
    b_sccrqs = [r for r in records if r["kind"] == "SCCRQ" and r["mark_in"] == 2]
    assert b_sccrqs and all(r["rewrite"] == {"assigned_tunnel_id": ALIAS} for r in b_sccrqs)
    to_alias = [r for r in outbound if r["tunnel"] == ALIAS]
    assert len(to_alias) >= 8
    for rec in to_alias:
        assert rec["rewrite"] == {"tunnel_id": 1}, rec
        assert l2tp(ip_of[rec["no"]]).tunnel_id == 1
    for rec in outbound:
        if rec["tunnel"] == 1:
            assert rec["rewrite"] is None and ip_of[rec["no"]] == original[rec["no"]]

    # 3. valid checksums in the rewritten bytes: replay says so, scapy and the codec agree
    rewritten = [r for r in records if r["rewrite"]]
    assert len(rewritten) == len(to_alias) + len(b_sccrqs) + 1  # + B's StopCCN
    for rec in rewritten:
        assert rec["checksum_ok"] is True, rec
        assert ip_of[rec["no"]] != original[rec["no"]]
        assert scapy_udp_checksum_ok(ip_of[rec["no"]]), rec
        assert codec_udp_checksum_ok(ip_of[rec["no"]]), rec

    assert summary["aliases"] == [{"peer": f"{NAT}:1701", "client_tid": 1, "alias": ALIAS}]
    assert summary["collisions"] == 1 and summary["conflicts"] == []


def test_json_values_are_plain(capsys):
    rc, out, _ = replay_cli(capsys, str(PCAPS / "one-client.pcap"), "--json")
    assert rc == 0
    records, summary = parse_json(out)
    first = records[0]
    assert first["no"] == 1 and first["dir"] == "in" and first["peer"] == f"{NAT}:1701"
    assert first["kind"] == "SCCRQ" and first["tunnel"] == 0 and first["session"] == 0
    assert first["mark_in"] == 1 and first["mark"] == 1 and first["rewrite"] is None
    assert first["reason"] == "sccrq_learned"
    assert isinstance(first["ts"], float)
    assert summary["packets"] == 22 and summary["peers"] == [f"{NAT}:1701"] and summary["marks"] == [1]


def test_json_malformed_records_carry_detail(capsys):
    rc, out, _ = replay_cli(capsys, str(PCAPS / "malformed.pcap"), "--json")
    assert rc == 0
    records, summary = parse_json(out)
    bad = [r for r in records if r["reason"] == "malformed"]
    assert {r["detail"] for r in bad} >= {"truncated L2TP header", "AVP length 0 below 6",
                                          "L2TPv3 on udp/1701", "SCCRQ without Assigned Tunnel ID"}
    assert all(r["kind"] == "malformed" for r in bad if r["detail"] != "SCCRQ without Assigned Tunnel ID")
    assert {"no": summary["packets"], "reason": "truncated record"} in summary["malformed"]  # the last one


# ----------------------------------------------------------------------------- the table


def test_table_two_windows(capsys):
    rc, out, err = replay_cli(capsys, TWO)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NO", "DIR", "PEER", "KIND", "TUNNEL", "SESSION", "MARK_IN", "MARK",
                                "REWRITE", "REASON"]
    rows = lines[1:lines.index("")]
    assert len(rows) == 45
    b_sccrq = rows[10].split()
    assert b_sccrq[:4] == ["11", "in", f"{NAT}:1701", "SCCRQ"]
    assert b_sccrq[-2:] == ["assigned_tunnel_id=65535", "sccrq_aliased"]
    corrected = [r.split() for r in rows if r.split()[-1] == "owner_mark_set"]
    assert corrected and all(r[-2] in ("-", "tunnel_id=1") for r in corrected)
    assert any(r.split()[4] == "65535" and "tunnel_id=1" in r for r in rows)
    text = "\n".join(lines)
    assert "collisions (aliased SCCRQs): 1" in text
    assert f"  {NAT}:1701 client tunnel 1 -> alias 65535" in text
    assert f"client tunnel 1 alias 65535 <-> gateway tunnel 9730 mark 0x2" in text
    assert "conflicts: 0" in text and "malformed: 0" in text
    assert "sccrq_aliased=1" in text


def test_table_conflict_lists_both_marks(capsys):
    rc, out, _ = replay_cli(capsys, str(PCAPS / "cross-sa-conflict.pcap"))
    assert rc == 0
    assert "conflicts: 2" in out
    assert f"{NAT}:1701 tunnel 28411 bound to mark 0x1, data came with mark 0x2" in out
    assert f"{NAT}:1701 tunnel 28411 bound to mark 0x1, ZLB came with mark 0x2" in out


def test_table_malformed_lists_reasons(capsys):
    rc, out, _ = replay_cli(capsys, str(PCAPS / "malformed.pcap"))
    assert rc == 0
    for reason in ("truncated L2TP header", "AVP length 0 below 6", "AVP beyond the end of the message",
                   "L2TP length field disagrees with the packet", "L2TPv3 on udp/1701", "IP fragment",
                   "control message without L and S bits", "truncated record"):
        assert f": {reason}" in out, reason


# ----------------------------------------------------------------------------- options


def test_write_rewritten_is_a_raw_ip_capture(capsys, tmp_path):
    written = tmp_path / "rewritten.pcap"
    rc, out, _ = replay_cli(capsys, TWO, "--json", "--write-rewritten", str(written))
    assert rc == 0
    records, _ = parse_json(out)
    packets = list(capture_io.read_capture(written))
    assert len(packets) == len(records)
    for rec, p in zip(records, packets):
        assert p.error is None and p.linktype == capture_io.LINKTYPE_RAW
        assert p.mark is None and p.hook is None
        assert abs(p.ts - rec["ts"]) < 1e-6
        assert l2tp(p.ip).tunnel_id == (1 if rec["tunnel"] == ALIAS else rec["tunnel"])


def test_hidden_avp_needs_the_secret(capsys):
    path = str(PCAPS / "hidden-avp.pcap")
    rc, out, _ = replay_cli(capsys, path, "--json")
    assert rc == 0
    records, summary = parse_json(out)
    assert [r["reason"] for r in records if r["kind"] == "SCCRQ"] == ["sccrq_learned", "hidden_id_no_secret"]
    assert summary["aliases"] == []
    rc, out, _ = replay_cli(capsys, path, "--json", "--secret", SECRET.decode())
    assert rc == 0
    records, summary = parse_json(out)
    [b] = [r for r in records if r["kind"] == "SCCRQ" and r["mark_in"] == 2]
    assert b["reason"] == "sccrq_aliased" and b["rewrite"] == {"assigned_tunnel_id": ALIAS}
    assert b["checksum_ok"] is True
    assert summary["aliases"] == [{"peer": f"{NAT}:1701", "client_tid": 1, "alias": ALIAS}]


def test_enforce_drop(capsys):
    rc, out, _ = replay_cli(capsys, str(PCAPS / "cross-sa-conflict.pcap"), "--json", "--enforce", "drop")
    assert rc == 0
    records, _ = parse_json(out)
    assert [(r["reason"], r["mark_in"]) for r in records if r.get("drop")] == [("sa_conflict", 2)] * 2


def test_gateway_and_mark_by_on_an_ethernet_capture(capsys, tmp_path):
    path = str(PCAPS / "non-windows-random-port.pcap")
    rc, out, _ = replay_cli(capsys, path, "--json", "--gateway", GW)
    assert rc == 0
    records, summary = parse_json(out)
    assert summary["gateway"] == GW
    assert {(r["peer"], r["mark"]) for r in records} == {(f"{NAT}:1701", 1), (f"{NAT}:50123", 2)}
    rc, out, _ = replay_cli(capsys, path, "--json", "--gateway", GW, "--mark-by", "addr")
    assert {r["mark"] for r in parse_json(out)[0]} == {1}
    marks = tmp_path / "marks"
    marks.write_text("192.0.2.10:1701 7\n192.0.2.10:50123 0x100\n")
    rc, out, _ = replay_cli(capsys, path, "--json", "--marks", str(marks))
    assert {(r["peer"], r["mark"]) for r in parse_json(out)[0]} == {(f"{NAT}:1701", 7), (f"{NAT}:50123", 0x100)}


def test_mid_session_capture_needs_gateway(capsys):
    path = str(PCAPS / "mid-session-sll.pcap")
    rc, out, _ = replay_cli(capsys, path)
    assert rc == 1
    assert "--gateway" in out and "direction_unknown=6" in out
    rc, out, _ = replay_cli(capsys, path, "--gateway", GW)
    assert rc == 0 and "unknown_tunnel=6" in out


# ----------------------------------------------------------------------------- no L2TP


def test_esp_only_exit_1_with_explanation(capsys):
    path = str(PCAPS / "esp-only.pcap")
    rc, out, err = replay_cli(capsys, path)
    assert rc == 1, err
    assert "NO  DIR" not in out  # no table when there is nothing to show
    assert "packets: 23 in file, 0 L2TP" in out
    assert "decrypted" in out and "l2tp-marker capture" in out
    rc, out, _ = replay_cli(capsys, path, "--json")
    assert rc == 1
    records, summary = parse_json(out)
    assert records == []
    assert "decrypted" in summary["explanation"]


# ----------------------------------------------------------------------------- bad arguments


def bad(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a capture\n")
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    badmarks = tmp_path / "marks.txt"
    badmarks.write_text("192.0.2.10 one\n")
    return {
        "missing file": ([str(tmp_path / "nope.pcap")], "nope.pcap"),
        "not a capture": ([str(text)], "not a pcap or pcapng capture"),
        "empty file": ([str(empty)], "empty"),
        "a directory": ([str(tmp_path)], str(tmp_path)),
        "bad --gateway": ([TWO, "--gateway", "gw.example"], "--gateway 'gw.example' is not an IP address"),
        "bad --marks line": ([TWO, "--marks", str(badmarks)], "is not a number"),
    }


@pytest.mark.parametrize("case", ["missing file", "not a capture", "empty file", "a directory",
                                  "bad --gateway", "bad --marks line"])
def test_bad_arguments_exit_2_with_a_clear_message(capsys, tmp_path, case):
    argv, needle = bad(tmp_path)[case]
    rc, out, err = replay_cli(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith("l2tp-marker replay: "), err
    assert needle in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_bad_option_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["replay", TWO, "--mark-by", "colour"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_marks_file_is_named(capsys, tmp_path):
    """A missing --marks file is named in the error (not the capture, which exists)."""
    missing = tmp_path / "marks.txt"
    rc, out, err = replay_cli(capsys, TWO, "--marks", str(missing))
    assert rc == 2
    assert str(missing) in err, err


def test_unwritable_write_rewritten_exits_2(capsys, tmp_path):
    """An unwritable --write-rewritten path is exit code 2 with a one-line message, no traceback."""
    target = tmp_path / "no-such-dir" / "out.pcap"
    rc, out, err = replay_cli(capsys, TWO, "--write-rewritten", str(target))
    assert rc == 2
    assert str(target) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the real entry point


def test_entry_point_json_on_stdout_only():
    proc = subprocess.run([sys.executable, "-m", "l2tp_marker.cli", "replay", TWO, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    records, summary = parse_json(proc.stdout)
    assert len(records) == 45 and summary["collisions"] == 1


# ------------------------------------------------------------------ the kernel fast path's bit
def test_fastpath_bit_in_an_nflog_capture_is_stripped_and_flagged(tmp_path, capsys):
    """Live, the fast path sets 0x80000000 on known tunnels' data before the capture rules run:
    replay must judge the SA mark (inbound_known), not report a conflict with mark 0x80000001."""
    from l2tp_marker.capture import NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT

    from .helpers import data, sccrp, sccrq

    frames = [
        (1.0, capture_io.nflog_frame(sccrq(1), mark=1, hook=NF_INET_LOCAL_IN)),
        (1.1, capture_io.nflog_frame(sccrp(1, 700), mark=None, hook=NF_INET_LOCAL_OUT)),
        (2.0, capture_io.nflog_frame(data("in", 700, 1), mark=0x80000001, hook=NF_INET_LOCAL_IN)),
        (2.1, capture_io.nflog_frame(data("out", 1, 1), mark=0x80000001, hook=NF_INET_LOCAL_OUT)),
    ]
    path = tmp_path / "fp.pcap"
    capture_io.write_pcap(path, frames, capture_io.LINKTYPE_NFLOG)
    assert cli.main(["replay", str(path), "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()][:-1]
    assert [(r["reason"], r.get("fastpath", False), r["mark_in"]) for r in recs] == [
        ("sccrq_learned", False, 1), ("owner_mark_set", False, 0),
        ("inbound_known", True, 1), ("owner_mark", True, 1)]
    # Told there is no fast path, the same capture shows what a wrong bit would look like.
    assert cli.main(["replay", str(path), "--json", "--fastpath-bit", "0"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()][:-1]
    assert recs[2]["reason"] == "sa_conflict"
