#!/usr/bin/env python3
"""Run one fuzz target for a chosen time.

    .venv/bin/python fuzz/run.py {decoder,engine,capture} --seconds N [--corpus DIR] [--json FILE]

With atheris installed (``pip install atheris``: x86_64 Linux wheels for CPython 3.11-3.13; it is in
the ``test`` extras there) this is coverage-guided libFuzzer, run in a child process with
``-max_total_time=N -rss_limit_mb=2048 -timeout=10``: the memory bound is libFuzzer's RSS limit, an
input running longer than the timeout is a finding too. Without atheris (or with ``--mode mutate``)
a random-mutation loop of the same targets runs for the same time, keeping inputs whose outcome
signature is new, with the same RSS and time bounds checked between inputs.

The seed corpus comes from ``pcaps/``: the IP packets and L2TP payloads of every capture (decoder),
every capture as an engine program (engine), the capture files themselves and some gzipped
(capture). It is rewritten to ``fuzz/corpus/TARGET-seeds/`` on every run; the growing corpus lives
in ``fuzz/corpus/TARGET/`` (or ``--corpus DIR``).

Prints inputs executed, exec/s and peak RSS. Exit status 0 when nothing was found; 1 when an
exception escaped a target, an invariant failed, the RSS limit was hit or an input timed out: the
input is saved under ``fuzz/crashes/`` (``--crashes DIR``) and the traceback printed.
Reproduce a saved input with ``fuzz/run.py TARGET --reproduce FILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_NAMES = ("decoder", "engine", "capture")
MAX_LEN = {"decoder": 4096, "engine": 16384, "capture": 16384}
DEFAULT_RSS_LIMIT_MB = 2048
DEFAULT_TIMEOUT = 10

ATHERIS_MISSING = ("atheris is not installed: falling back to the random-mutation loop (not coverage-guided). "
                   "For coverage-guided fuzzing: .venv/bin/pip install atheris (wheels for x86_64 Linux, "
                   "CPython 3.11-3.13; elsewhere it needs clang with libFuzzer to build).")


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _atheris_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("atheris")
    except Exception:
        return None


def _rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def code_state() -> str:
    """The code being fuzzed: the git commit, and the files of the package that differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "l2tp_marker", "fuzz/targets.py"],
                                cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    changed = sorted(line[3:] for line in status.splitlines() if line.strip())
    return head + (f" + uncommitted {', '.join(changed)}" if changed else "")


def write_seeds(target: str, directory: Path) -> int:
    from fuzz.targets import seed_inputs

    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.is_file():
            old.unlink()
    seeds = seed_inputs(target)
    for s in seeds:
        (directory / hashlib.sha1(s).hexdigest()).write_bytes(s)
    return len(seeds)


def save_crash(crashes: Path, target: str, data: bytes, kind: str = "crash") -> Path:
    crashes.mkdir(parents=True, exist_ok=True)
    path = crashes / f"{target}-{kind}-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- mutation loop

_INTERESTING8 = (0, 1, 2, 3, 5, 6, 7, 0x0F, 0x10, 0x20, 0x40, 0x7F, 0x80, 0xC8, 0xFE, 0xFF)
_INTERESTING16 = (0, 1, 2, 6, 8, 9, 14, 36, 0x3FF, 0x400, 0x6B5, 0x7FFF, 0x8000, 0xC802, 0xFFFE, 0xFFFF)


def mutate(rng: random.Random, data: bytes, corpus: list[bytes], max_len: int) -> bytes:
    """libFuzzer-like byte mutations: flips, interesting values, arithmetic, insert/delete/copy, splice."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(buf)
        op = rng.randrange(11)
        if op == 0 and n:  # flip bits
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(n)
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # set a byte
            buf[rng.randrange(n)] = rng.choice(_INTERESTING8) if rng.random() < 0.6 else rng.randrange(256)
        elif op == 2 and n >= 2:  # set a 16-bit word (big endian: every length/ID field here is)
            i = rng.randrange(n - 1)
            buf[i:i + 2] = rng.choice(_INTERESTING16).to_bytes(2, "big")
        elif op == 3 and n:  # add/subtract a small number to a byte
            i = rng.randrange(n)
            buf[i] = (buf[i] + rng.choice((-8, -4, -2, -1, 1, 2, 4, 8))) & 0xFF
        elif op == 4:  # insert random bytes
            i = rng.randint(0, n)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 5 and n:  # delete a range
            i = rng.randrange(n)
            del buf[i:i + rng.randint(1, 16)]
        elif op == 6 and n:  # duplicate a range somewhere
            i = rng.randrange(n)
            chunk = buf[i:i + rng.randint(1, 64)]
            j = rng.randint(0, n)
            buf[j:j] = chunk
        elif op == 7 and n:  # truncate
            del buf[rng.randint(0, n):]
        elif op == 8 and corpus:  # splice with another input
            other = rng.choice(corpus)
            buf = buf[:rng.randint(0, n)] + other[rng.randint(0, len(other)):]
        elif op == 9 and n:  # overwrite with a chunk of another input
            other = rng.choice(corpus)
            if other:
                i, j = rng.randrange(n), rng.randrange(len(other))
                chunk = other[j:j + rng.randint(1, 32)]
                buf[i:i + len(chunk)] = chunk
        elif op == 10 and n:  # repeat a byte run (long fields, many AVPs)
            i = rng.randrange(n)
            chunk = buf[i:i + rng.randint(1, 8)]
            buf[i:i] = chunk * rng.randint(2, 64)
    return bytes(buf[:max_len])


def run_mutation(target: str, seconds: float, *, seeds: list[bytes] | None = None, corpus_dir: Path | None = None,
                 crashes: Path = HERE / "crashes", rng_seed: int = 0, rss_limit_mb: float = DEFAULT_RSS_LIMIT_MB,
                 timeout: float = DEFAULT_TIMEOUT, max_len: int | None = None, max_corpus: int = 4000,
                 progress=None) -> dict:
    """Fuzz ``target`` with random mutations for ``seconds``; returns the result record (see main)."""
    from fuzz.targets import TARGETS, seed_inputs

    fn = TARGETS[target]
    max_len = max_len or MAX_LEN[target]
    rng = random.Random(rng_seed)
    corpus: list[bytes] = list(seed_inputs(target) if seeds is None else seeds)
    if corpus_dir is not None and corpus_dir.is_dir():
        corpus += [p.read_bytes() for p in sorted(corpus_dir.iterdir()) if p.is_file()]
    corpus = [c for c in corpus if c] or [b"\0"]
    nseeds = len(corpus)
    signatures: set = set()
    inputs = 0
    result = {"target": target, "mode": "mutate", "seconds_requested": seconds, "seeds": nseeds,
              "rss_limit_mb": rss_limit_mb, "timeout_s": timeout, "max_len": max_len, "outcome": "ok",
              "crash_file": None, "error": None}
    start = time.monotonic()
    deadline = start + seconds
    next_report = start + 10
    queue = list(corpus)  # every seed runs once before mutations begin
    data = b""
    try:
        while True:
            if queue:
                data = queue.pop()
            else:
                if time.monotonic() >= deadline:
                    break
                data = mutate(rng, rng.choice(corpus), corpus, max_len)
            t0 = time.monotonic()
            sig = fn(data)
            took = time.monotonic() - t0
            inputs += 1
            if took > timeout:
                raise TimeoutError(f"one input took {took:.1f} s (limit {timeout} s)")
            if sig not in signatures:
                signatures.add(sig)
                if len(corpus) < max_corpus:
                    corpus.append(data)
                    if corpus_dir is not None:
                        corpus_dir.mkdir(parents=True, exist_ok=True)
                        (corpus_dir / hashlib.sha1(data).hexdigest()).write_bytes(data)
            if inputs % 256 == 0:
                rss = _rss_mb()
                if rss > rss_limit_mb:
                    raise MemoryError(f"RSS {rss:.0f} MiB above the {rss_limit_mb} MiB limit")
                now = time.monotonic()
                if progress and now >= next_report:
                    next_report = now + 10
                    progress(f"#{inputs} corpus {len(corpus)} signatures {len(signatures)} "
                             f"exec/s {inputs / (now - start):.0f} rss {rss:.0f}Mb")
    except Exception as exc:  # anything escaping the target is the finding
        path = save_crash(crashes, target, data,
                          "oom" if isinstance(exc, MemoryError) else "timeout" if isinstance(exc, TimeoutError)
                          else "crash")
        result.update(outcome="crash", crash_file=str(path),
                      error="".join(traceback.format_exception(exc)).rstrip())
    elapsed = time.monotonic() - start
    result.update(seconds=round(elapsed, 1), inputs=inputs, exec_per_s=round(inputs / elapsed) if elapsed else 0,
                  peak_rss_mb=round(_peak_rss_mb(), 1), corpus=len(corpus), signatures=len(signatures))
    return result


# --------------------------------------------------------------------------- atheris (libFuzzer)


def _atheris_worker(target: str, libfuzzer_args: list[str]) -> None:
    """Runs in the child process: instrument the package, then hand over to libFuzzer (never returns)."""
    import atheris

    with atheris.instrument_imports(include=["l2tp_marker", "fuzz"]):
        from fuzz import targets
    fn = targets.TARGETS[target]

    def one_input(data: bytes) -> None:
        fn(data)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_STAT = re.compile(r"^stat::(\w+):\s*(\d+)")
_COV = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)/")


def run_atheris(target: str, seconds: float, *, corpus_dir: Path, crashes: Path,
                rss_limit_mb: float = DEFAULT_RSS_LIMIT_MB, timeout: float = DEFAULT_TIMEOUT,
                max_len: int | None = None, log: Path | None = None, echo: bool = True) -> dict:
    seeds_dir = corpus_dir.parent / f"{corpus_dir.name}-seeds"
    nseeds = write_seeds(target, seeds_dir)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    max_len = max_len or MAX_LEN[target]
    log = log or HERE / "logs" / f"{target}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = [str(corpus_dir), str(seeds_dir), f"-max_total_time={int(seconds)}", f"-rss_limit_mb={int(rss_limit_mb)}",
            f"-timeout={int(timeout)}", f"-max_len={max_len}", f"-artifact_prefix={crashes}/{target}-",
            "-print_final_stats=1", "-reload=0"]
    cmd = [sys.executable, str(Path(__file__).resolve()), target, "--worker", "--", *args]
    start = time.monotonic()
    tail: list[str] = []
    stats: dict[str, int] = {}
    done = cov = None
    artifact = None
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", cwd=ROOT)
        assert proc.stdout is not None
        last_echo = 0.0
        for line in proc.stdout:
            logf.write(line)
            line = line.rstrip("\n")
            tail.append(line)
            del tail[:-60]
            if m := _DONE.match(line):
                done = (int(m.group(1)), int(m.group(2)))
            if m := _STAT.match(line):
                stats[m.group(1)] = int(m.group(2))
            if m := _COV.search(line):
                cov = tuple(int(x) for x in m.groups())
            if "Test unit written to" in line:
                artifact = line.split("Test unit written to", 1)[1].strip()
            if echo and ("pulse" in line or "DONE" in line or (time.monotonic() - last_echo > 15 and line.startswith("#"))):
                print(f"  {line}", flush=True)
                last_echo = time.monotonic()
        rc = proc.wait()
    elapsed = time.monotonic() - start
    inputs = stats.get("number_of_executed_units", done[0] if done else 0)
    result = {"target": target, "mode": "atheris", "atheris": _atheris_version(), "seconds_requested": seconds,
              "seconds": round(elapsed, 1), "inputs": inputs,
              "exec_per_s": round(inputs / max(1, done[1] if done else elapsed)) if inputs else 0,
              "peak_rss_mb": stats.get("peak_rss_mb", round(_peak_rss_mb(resource.RUSAGE_CHILDREN))),
              "seeds": nseeds, "corpus": cov[2] if cov else None, "coverage": cov[0] if cov else None,
              "features": cov[1] if cov else None, "rss_limit_mb": rss_limit_mb, "timeout_s": timeout,
              "max_len": max_len, "log": str(log), "outcome": "ok", "crash_file": None, "error": None}
    if rc != 0 or artifact:
        result["outcome"] = "crash"
        result["crash_file"] = artifact
        start_at = next((i for i, line in enumerate(tail) if "Uncaught Python exception" in line
                         or "ERROR: libFuzzer" in line or line.startswith("==") and "ERROR" in line), 0)
        result["error"] = "\n".join(line for line in tail[start_at:]
                                    if len(line) < 300 and not line.startswith(("0x", "Base64:", "stat::", "MS:")))[:4000]
    return result


# --------------------------------------------------------------------------- main


def format_result(r: dict) -> str:
    lines = [f"target {r['target']} ({r['mode']}): {r['inputs']} inputs in {r['seconds']} s, "
             f"{r['exec_per_s']} exec/s, peak RSS {r['peak_rss_mb']} MiB, {r['seeds']} seeds, "
             f"corpus {r.get('corpus')}" + (f", coverage {r['coverage']} edges / {r['features']} features"
                                            if r.get("coverage") is not None else "")
             + f": {r['outcome'].upper()}"]
    if r["outcome"] != "ok":
        lines.append(f"input saved to {r['crash_file']}")
        lines.append(r["error"] or "")
    return "\n".join(lines)


def reproduce(target: str, path: Path) -> int:
    from fuzz.targets import TARGETS

    data = path.read_bytes()
    try:
        sig = TARGETS[target](data)
    except Exception:
        traceback.print_exc()
        return 1
    print(f"{path}: no failure ({len(data)} bytes, outcome {sig!r:.200})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:  # child process of run_atheris
        target = argv[0]
        _atheris_worker(target, argv[argv.index("--") + 1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=TARGET_NAMES)
    p.add_argument("--seconds", type=float, default=60, help="how long to fuzz (default 60)")
    p.add_argument("--corpus", type=Path, default=None, help="corpus directory (default fuzz/corpus/TARGET)")
    p.add_argument("--crashes", type=Path, default=HERE / "crashes", help="where failing inputs go")
    p.add_argument("--mode", choices=("auto", "atheris", "mutate"), default="auto",
                   help="auto: atheris when installed, else the mutation loop")
    p.add_argument("--rss-limit-mb", type=float, default=DEFAULT_RSS_LIMIT_MB)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds one input may take")
    p.add_argument("--max-len", type=int, default=None, help="largest input (bytes)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mutation loop")
    p.add_argument("--log", type=Path, default=None, help="libFuzzer's output (default fuzz/logs/TARGET.log)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this file")
    p.add_argument("--reproduce", type=Path, default=None, metavar="FILE", help="run one saved input and exit")
    args = p.parse_args(argv)
    if args.reproduce:
        return reproduce(args.target, args.reproduce)
    corpus = args.corpus or HERE / "corpus" / args.target
    mode = args.mode
    if mode in ("auto", "atheris") and not atheris_available():
        if mode == "atheris":
            print(ATHERIS_MISSING.split(":")[0] + ". Install it: .venv/bin/pip install atheris", file=sys.stderr)
            return 2
        print(ATHERIS_MISSING, file=sys.stderr)
        mode = "mutate"
    elif mode == "auto":
        mode = "atheris"
    code = code_state()  # taken before the run: the worker imports the code as it is now
    print(f"fuzzing {args.target} for {args.seconds:g} s ({mode}), code {code}", flush=True)
    if mode == "atheris":
        result = run_atheris(args.target, args.seconds, corpus_dir=corpus, crashes=args.crashes,
                             rss_limit_mb=args.rss_limit_mb, timeout=args.timeout, max_len=args.max_len, log=args.log)
    else:
        result = run_mutation(args.target, args.seconds, corpus_dir=corpus, crashes=args.crashes,
                              rng_seed=args.seed, rss_limit_mb=args.rss_limit_mb, timeout=args.timeout,
                              max_len=args.max_len, progress=lambda s: print(f"  {s}", flush=True))
    result["command"] = shlex.join([os.path.relpath(sys.executable, ROOT) if Path(sys.executable).is_relative_to(ROOT)
                                    else "python3", "fuzz/run.py", *argv])
    result["code"] = code
    result["python"] = sys.version.split()[0]
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(format_result(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["outcome"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
