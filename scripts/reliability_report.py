#!/usr/bin/env python3
"""Write docs/reliability.md: what was fuzzed and for how long, the hostile-input tests and their
outcomes, the fault and load results of the lab tests, and the bounds of the engine and the daemon.

    .venv/bin/python scripts/reliability_report.py --fuzz-seconds 120

Fuzzing: runs ``fuzz/run.py TARGET --seconds N --json var/fuzz/TARGET.json`` for every target
(``--fuzz-seconds`` each, ``--seconds-for TARGET=N`` to override one), or with ``--reuse-fuzz``
reads the results those files hold from an earlier run. Tests: runs the hostile-input tests and the
hypothesis fuzz suites with pytest (``--no-tests`` skips them).

Fault and load results are written by the lab tests (tests/lab), one JSON object per file, into
``var/reliability/*.json`` (``--results DIR``). The format, the whole interface between the lab
tests and this script::

    {
      "kind":    "fault" | "load",
      "name":    "daemon killed under load",          # short, unique per scenario
      "outcome": "passed: bypass kept traffic flowing; no misdelivery",   # what was observed
      "figures": {"clients": 20, "packets": 120000, "misdeliveries": 0, "leaks": 0},
      "command": "pytest tests/lab/test_reliability.py::test_kill_under_load",
      "date":    "2024-06-01T12:00:00+00:00"          # ISO 8601, when it ran
    }

``figures`` maps names to numbers or short strings (load results: clients, packets,
misdeliveries, leaks, and whatever else was measured). An optional ``"details"`` string is shown
under the table. For several files with the same kind and name the newest ``date`` is shown. A
file that is not such an object is listed as unreadable, never fatal. Without any file the
sections say "not run yet".
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("decoder", "engine", "capture")
HOSTILE_TESTS = "tests/unit/test_hostile_input.py"
HYPOTHESIS_SUITES = ("tests/unit/test_fuzz.py", "tests/unit/test_codec_property.py", "tests/unit/test_capture_io.py")
REQUIRED_KEYS = ("kind", "name", "outcome", "figures", "command", "date")

ENGINE_BOUNDS = ("max_tunnels", "max_tunnels_per_mark", "max_sessions_per_tunnel", "idle_timeout", "hold_time",
                 "pending_timeout", "conflict_history")
DAEMON_BOUNDS = ("queue_maxlen", "state_interval", "repair_interval", "metrics_interval")
# Short meanings where the sample's comment covers several keys at once; the rest come from the sample.
MEANING = {
    "max_tunnels": "tunnels in the table, all marks together",
    "max_tunnels_per_mark": "tunnels one SA mark (one client) may hold",
    "max_sessions_per_tunnel": "sessions tracked per tunnel; more are counted (`session_limit`), not tracked",
    "state_interval": "seconds between saves of the table to `state_file` (when it changed)",
    "metrics_interval": "seconds between writes of the metrics textfile",
}


# --------------------------------------------------------------------------- gathering


def run_fuzz(target: str, seconds: float, out: Path, mode: str) -> dict:
    cmd = [sys.executable, str(ROOT / "fuzz" / "run.py"), target, "--seconds", f"{seconds:g}", "--json", str(out),
           "--mode", mode]
    print(f"$ {shlex.join(cmd)}", flush=True)
    if out.exists():
        out.unlink()
    proc = subprocess.run(cmd, cwd=ROOT)
    if out.exists():
        return json.loads(out.read_text())
    return {"target": target, "outcome": f"runner failed (exit {proc.returncode})", "seconds": 0, "inputs": 0}


def read_fuzz(out: Path, target: str) -> dict | None:
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError):
        return None


def run_tests(files: list[str]) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
        print(f"$ {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, cwd=ROOT)
        cases = []
        if xml.exists():
            for tc in ET.parse(xml).getroot().iter("testcase"):
                outcome = "passed"
                message = ""
                for child in tc:
                    if child.tag in ("failure", "error"):
                        outcome, message = "FAILED", " ".join((child.get("message") or "").split())[:300]
                    elif child.tag == "skipped":
                        outcome, message = "skipped", (child.get("message") or "")[:200]
                cases.append({"file": tc.get("classname", "").replace(".", "/") + ".py", "name": tc.get("name", ""),
                              "time": float(tc.get("time") or 0), "outcome": outcome, "message": message})
    return cases, shlex.join([".venv/bin/python", "-m", "pytest", *files])


def test_docs(path: Path, *, full: bool = False) -> dict[str, str]:
    """First docstring paragraph (or the whole docstring) of every test function in a file."""
    docs = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            doc = ast.get_docstring(node) or ""
            docs[node.name] = " ".join((doc if full else doc.split("\n\n")[0]).split())
    return docs


def read_results(directory: Path) -> tuple[list[dict], list[str]]:
    results, bad = [], []
    if not directory.is_dir():
        return results, bad
    for f in sorted(directory.glob("*.json")):
        try:
            obj = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            bad.append(f"{f.name}: {exc}")
            continue
        if not isinstance(obj, dict):
            bad.append(f"{f.name}: not a JSON object")
            continue
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            bad.append(f"{f.name}: missing {', '.join(missing)}")
            continue
        if obj["kind"] not in ("fault", "load") or not isinstance(obj["figures"], dict):
            bad.append(f"{f.name}: kind must be fault or load and figures an object")
            continue
        obj["_file"] = f.name
        results.append(obj)
    newest: dict[tuple[str, str], dict] = {}
    older: dict[tuple[str, str], int] = {}
    for r in sorted(results, key=lambda r: str(r["date"])):
        key = (r["kind"], str(r["name"]))
        if key in newest:
            older[key] = older.get(key, 0) + 1
        newest[key] = r
    for key, r in newest.items():
        r["_older"] = older.get(key, 0)
    return sorted(newest.values(), key=lambda r: (r["kind"], str(r["name"]))), bad


def sample_comments() -> dict[str, str]:
    """The comment above each key of the shipped config sample (keys in one block share it)."""
    sample = ROOT / "l2tp_marker" / "data" / "l2tp-marker.toml"
    out: dict[str, str] = {}
    comment: list[str] = []
    block_has_key = False
    for line in sample.read_text().splitlines():
        s = line.strip()
        m = re.match(r"^#?\s*([a-z_]+)\s*=", s)
        if m and (not s.startswith("#") or re.match(r"^#\s*[a-z_]+\s*=\s*\S", s)):
            out[m.group(1)] = " ".join(comment)
            block_has_key = True
        elif s.startswith("#"):
            if block_has_key:
                comment, block_has_key = [], False
            comment.append(s.lstrip("#").strip())
        elif not s:
            comment, block_has_key = [], False
        else:
            comment, block_has_key = [], False
    return out


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        changed = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (no git)"
    return f"{head}" + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


# --------------------------------------------------------------------------- writing


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.1f}" if v >= 100 else f"{v:g}"
    if v is None:
        return "-"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(c) for c in r) + " |")
    return out


TARGET_TEXT = {
    "decoder": "`codec.parse_ip_udp` + `codec.decode_l2tp` (IP/UDP and L2TPv2 header and AVPs), and "
               "`codec.rewrite` at every ID offset a decoded message reports",
    "engine": "operation sequences (direction, mark, clock step, packet) through `judge.judge_packet` into one "
              "`Engine` with small bounds (6 tunnels, 3 per mark, 3 sessions, 5/10/50 s timeouts)",
    "capture": "`capture_io.read_capture` (decoder errors fatal) and `replay.replay` on the bytes as a capture "
               "file, then the table/summary/JSON writers",
}


def render(fuzz: dict[str, dict | None], tests: list[dict] | None, test_cmd: str | None,
           results: list[dict], bad: list[str], command: str, results_dir: Path, reused: bool = False) -> str:
    from fuzz import run as fuzz_run
    from l2tp_marker import capture_io, codec  # noqa: F401
    from l2tp_marker import constants as C
    from l2tp_marker.config import DaemonConfig
    from l2tp_marker.engine import Engine, EngineConfig

    comments = sample_comments()
    now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    L: list[str] = []
    L += ["# Reliability", "",
          f"Generated by `{command}` on {now}; do not edit by hand, rerun the command.", "",
          f"Code when this was written: {git_state()}. Python {platform.python_version()} on {platform.machine()} "
          f"({os.cpu_count()} CPUs); atheris {fuzz_run._atheris_version() or 'not installed'}.", ""]

    # ---- fuzzing
    L += ["## Fuzzing", "",
          "Coverage-guided fuzzing (atheris/libFuzzer where installed, else the random-mutation loop of "
          "`fuzz/run.py`) of every entry point that takes untrusted bytes; seeds from every capture in "
          "`pcaps/`. A run fails on any exception escaping a target, any invariant of `fuzz/targets.py` "
          "(bounds, checksums, marks, table consistency), an RSS above the limit, or one input taking "
          "longer than the timeout. Reproduce with `fuzz/run.py TARGET --seconds N` (see `fuzz/README.md`).", ""]
    rows = []
    for t in TARGETS:
        r = fuzz.get(t)
        if r is None:
            rows.append([f"`{t}`", TARGET_TEXT[t], "not run", "-", "-", "-", "-", "-", "-"])
            continue
        cov = f"{r['coverage']} / {r['features']}" if r.get("coverage") is not None else "-"
        rows.append([f"`{t}`", TARGET_TEXT[t], r.get("mode", "-"), r.get("seconds"), r.get("inputs"),
                     r.get("exec_per_s"), r.get("peak_rss_mb"), cov,
                     "no failure" if r.get("outcome") == "ok" else f"**{r.get('outcome')}**"])
    L += _table(["target", "entry points", "engine", "seconds", "inputs", "exec/s", "peak RSS (MiB)",
                 "coverage (edges / features)", "outcome"], rows)
    L.append("")
    codes = {r.get("code") for r in fuzz.values() if r}
    if len(codes) == 1 and None not in codes:
        L += [f"Code fuzzed: {codes.pop()}.", ""]
    elif codes:
        L += ["Code fuzzed: " + "; ".join(f"{t} {r.get('code', 'unknown')}" for t, r in fuzz.items() if r) + ".", ""]
    if reused:
        dates = ", ".join(f"{t} {r.get('date', '?')}" for t, r in fuzz.items() if r)
        L += [f"These figures were read from `var/fuzz/` (`--reuse-fuzz`), left by earlier runs: {dates or 'none'}.", ""]
    ran = [r for r in fuzz.values() if r]
    if ran:
        lim = ran[0]
        sizes = ", ".join(f"{r['max_len']:,} bytes ({r['target']})" for r in ran if r.get("max_len"))
        total_inputs = sum(r.get("inputs") or 0 for r in ran)
        total_seconds = sum(r.get("seconds") or 0 for r in ran)
        L += [f"Bounds of the runs: RSS limit {_fmt(lim.get('rss_limit_mb'))} MiB, {_fmt(lim.get('timeout_s'))} s "
              f"per input, inputs up to {sizes}. Total: {total_inputs:,} inputs in {total_seconds:,.0f} s.", ""]
        for r in ran:
            if r.get("outcome") != "ok":
                L += [f"**{r['target']}** failed; input saved as `{r.get('crash_file')}`:", "", "```",
                      *(r.get("error") or "").splitlines()[:40], "```", ""]
    crashes = sorted((ROOT / "fuzz" / "crashes").glob("*")) if (ROOT / "fuzz" / "crashes").is_dir() else []
    if crashes:
        L += ["Saved failing inputs in `fuzz/crashes/`: " + ", ".join(f"`{c.name}`" for c in crashes), ""]

    # ---- tests
    L += ["## Hostile input", ""]
    if tests is None:
        L += ["Tests not run for this document (`--no-tests`).", ""]
    else:
        docs = test_docs(ROOT / HOSTILE_TESTS)
        hostile = [c for c in tests if c["file"].endswith("test_hostile_input.py")]
        L += [f"`{HOSTILE_TESTS}`, one test per case (parametrized cases counted together); observed outcome "
              "of this run:", ""]
        groups: dict[str, list[dict]] = {}
        for c in hostile:
            groups.setdefault(c["name"].split("[")[0], []).append(c)
        bugs = {n: cs for n, cs in groups.items() if n.startswith("test_bug_")}
        if bugs:
            full = test_docs(ROOT / HOSTILE_TESTS, full=True)
            L += ["**Known bugs** (tests named `test_bug_*` fail on purpose until the code is fixed):", ""]
            for name, cases in bugs.items():
                seen = "still fails" if any(c["outcome"] == "FAILED" for c in cases) else "now passes: fixed"
                L += [f"* `{name}` ({seen}): {full.get(name, '')}"]
                msgs = [c["message"] for c in cases if c["message"]]
                if msgs:
                    L += [f"  Observed: `{msgs[0]}`"]
            L.append("")
        rows = []
        for name, cases in groups.items():
            passed = sum(c["outcome"] == "passed" for c in cases)
            failed = [c for c in cases if c["outcome"] == "FAILED"]
            skipped = [c for c in cases if c["outcome"] == "skipped"]
            outcome = f"{passed}/{len(cases)} passed"
            if failed:
                outcome = f"**{len(failed)} FAILED** ({failed[0]['message'][:80]})"
            elif skipped and not passed:
                outcome = f"skipped: {skipped[0]['message'][:80]}"
            rows.append([f"`{name}`", docs.get(name, ""), outcome, round(sum(c["time"] for c in cases), 2)])
        L += _table(["test", "what it shows", "outcome", "seconds"], rows)
        L.append("")
        rows = []
        for f in HYPOTHESIS_SUITES:
            cs = [c for c in tests if c["file"].endswith(Path(f).name)]
            if cs:
                rows.append([f"`{f}`", len(cs), sum(c["outcome"] == "passed" for c in cs),
                             sum(c["outcome"] == "FAILED" for c in cs), round(sum(c["time"] for c in cs), 1)])
        if rows:
            L += ["Other files whose fuzzing with hypothesis runs in CI (fixed, derandomized example counts; "
                  "whole files counted):", ""]
            L += _table(["file", "tests", "passed", "failed", "seconds"], rows)
            L.append("")
        L += [f"Command: `{test_cmd}`.", ""]

    # ---- faults and load
    where = results_dir.relative_to(ROOT) if results_dir.is_relative_to(ROOT) else results_dir
    for kind, title in (("fault", "Faults"), ("load", "Load")):
        L += [f"## {title}", ""]
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            L += [f"Not run yet: no `{kind}` results in `{where}/` (the lab tests write them; format at the top "
                  "of `scripts/reliability_report.py`).", ""]
            continue
        if kind == "fault":
            rows = [[r["name"], r["outcome"], ", ".join(f"{k} {_fmt(v)}" for k, v in r["figures"].items()) or "-",
                     f"`{r['command']}`", r["date"]] for r in rs]
            L += _table(["fault", "observed outcome", "figures", "command", "date"], rows)
        else:
            keys = ["clients", "packets", "misdeliveries", "leaks"]
            extra = sorted({k for r in rs for k in r["figures"]} - set(keys))
            rows = [[r["name"], *[r["figures"].get(k) for k in keys + extra], r["outcome"], f"`{r['command']}`",
                     r["date"]] for r in rs]
            L += _table(["load", *keys, *extra, "outcome", "command", "date"], rows)
        L.append("")
        for r in rs:
            if r.get("details"):
                L += [f"*{r['name']}*: {_fmt(r['details'])}", ""]
            if r.get("_older"):
                L += [f"*{r['name']}*: {r['_older']} older result(s) not shown.", ""]
    if bad:
        L += ["Unreadable result files: " + "; ".join(f"`{b}`" for b in bad), ""]

    # ---- bounds
    e, d = EngineConfig(), DaemonConfig()
    L += ["## Bounds", "",
          "Engine (`[engine]` in the config; `EngineConfig` defaults, explanations from the shipped sample "
          "`l2tp_marker/data/l2tp-marker.toml`):", ""]
    L += _table(["key", "default", "meaning"],
                [[f"`{k}`", getattr(e, k), MEANING.get(k) or comments.get(k, "")] for k in ENGINE_BOUNDS if hasattr(e, k)])
    policy = comments.get("max_tunnels", "")
    if policy:
        L += ["", f"Eviction (from the sample): {policy.split('. ', 1)[-1]}"]
    if hasattr(Engine(), "_evicted"):
        L += ["", "Tunnels evicted (or refused) by a full table are remembered for `pending_timeout` seconds so the "
              "LNS's answers still reach their SA: at most `max_tunnels` such records, oldest dropped first."]
    L += ["", "Daemon (`DaemonConfig` defaults):", ""]
    L += _table(["key", "default", "meaning"],
                [[f"`{k}`", getattr(d, k), MEANING.get(k) or comments.get(k, "")] for k in DAEMON_BOUNDS if hasattr(d, k)])
    other = [f.name for f in fields(EngineConfig) if f.name not in ENGINE_BOUNDS]
    max_avps = (0xFFFF - 20 - 8 - 12 - 8) // C.AVP_HEADER_LEN
    L += ["", f"Other engine settings (not bounds): {', '.join(f'`{k}`' for k in other)}.", "",
          "Built into the code (not configurable):", "",
          f"* Decoder: one pass over the message, no allocation beyond the result; an AVP is at most "
          f"{C.AVP_LENGTH_MASK} bytes (10-bit length) and at least {C.AVP_HEADER_LEN}, the L2TP Length and UDP "
          f"length are 16 bits, so a message holds at most about {max_avps:,} AVPs. IP fragments, lengths that "
          "disagree with the packet, AVP lengths below 6 or past the message, duplicate ID AVPs and versions "
          "other than 2 are `malformed`: the packet keeps its mark and bytes.",
          f"* Engine: the alias search tries at most 65,535 IDs per address; conflict history is a ring of "
          f"`conflict_history` entries; per-reason counters are a fixed set of names.",
          f"* Capture reader: a pcap record larger than max(snaplen, {capture_io._MIN_CAPLEN_LIMIT:,}) bytes "
          f"(at most {capture_io._MAX_RECORD:,}) or a pcapng block larger than {capture_io._MAX_BLOCK:,} bytes is "
          "treated as corruption, not allocated; at most 8 VLAN tags are followed. `replay` keeps every packet "
          "of a capture in memory, so its memory grows with the (decompressed) capture it is given: an offline "
          "tool reading the operator's own file.",
          "* Fuzzing: the RSS limit and per-input timeout above are the memory and time bounds the targets were "
          "held to.", ""]
    L += ["## Command", "", "```sh", command, "```", ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fuzz-seconds", type=float, default=20, help="seconds of fuzzing per target (default 20)")
    p.add_argument("--seconds-for", action="append", default=[], metavar="TARGET=N",
                   help="another time for one target (repeatable)")
    p.add_argument("--fuzz-mode", choices=("auto", "atheris", "mutate"), default="auto")
    p.add_argument("--reuse-fuzz", action="store_true",
                   help="do not fuzz: report the results left in var/fuzz/ by an earlier run")
    p.add_argument("--no-tests", action="store_true", help="do not run the hostile-input and hypothesis tests")
    p.add_argument("--results", type=Path, default=ROOT / "var" / "reliability",
                   help="folder of fault/load result files (default var/reliability)")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "reliability.md")
    args = p.parse_args(argv)
    per_target = {t: args.fuzz_seconds for t in TARGETS}
    for spec in args.seconds_for:
        name, _, secs = spec.partition("=")
        if name not in per_target or not secs:
            p.error(f"--seconds-for {spec!r}: expected TARGET=SECONDS with TARGET one of {', '.join(TARGETS)}")
        per_target[name] = float(secs)
    exe = Path(sys.executable)
    exe_text = os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else "python3"
    command = shlex.join([exe_text, "scripts/reliability_report.py", *(argv if argv is not None else sys.argv[1:])])
    fuzz_dir = ROOT / "var" / "fuzz"
    fuzz_dir.mkdir(parents=True, exist_ok=True)
    fuzz: dict[str, dict | None] = {}
    for t in TARGETS:
        out = fuzz_dir / f"{t}.json"
        fuzz[t] = read_fuzz(out, t) if args.reuse_fuzz else run_fuzz(t, per_target[t], out, args.fuzz_mode)
    tests = test_cmd = None
    if not args.no_tests:
        tests, test_cmd = run_tests([HOSTILE_TESTS, *HYPOTHESIS_SUITES])
    results, bad = read_results(args.results)
    text = render(fuzz, tests, test_cmd, results, bad, command, args.results.resolve(), args.reuse_fuzz)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    failed = [t for t, r in fuzz.items() if r and r.get("outcome") != "ok"]
    failed += [c["name"] for c in tests or [] if c["outcome"] == "FAILED"]
    if failed:
        print(f"failures: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
