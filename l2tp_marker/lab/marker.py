"""Running ``l2tp-marker run`` inside a lab's gateway namespace (for the demo, the tests, operators)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from l2tp_marker.control import ControlError, ask

from .topology import Lab, LabError


class MarkerProcess:
    """The marker daemon in ``lab``'s gateway, started and stopped by the PID we started.

    The lab has no IPsec, so inbound packets are judged by mark alone (``--inbound-match none``).
    Its state file, decision log, control socket and log live in the lab's work directory.
    """

    def __init__(self, lab: Lab, *extra_args: str, name: str = "marker", decision_log: bool = True):
        self.lab = lab
        self.extra = list(extra_args)
        # The decision log records every packet the daemon judges, and so turns its userspace fast
        # path off (a packet judged from the fast table alone has nothing to log).
        self.log_decisions = decision_log
        self.dir = lab.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def decision_log(self) -> Path:
        return self.dir / "decisions.jsonl"

    @property
    def control_socket(self) -> Path:
        return self.dir / "control.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "marker.log"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "l2tp_marker.cli", "--log-level", "debug", "run",
                "--inbound-match", "none", "--state-file", str(self.state_file),
                *(["--decision-log", str(self.decision_log)] if self.log_decisions else []),
                "--control-socket", str(self.control_socket), *self.extra]

    def start(self, timeout: float = 20.0) -> None:
        self._log = open(self.log_path, "ab")
        offset = self._log.tell()
        self.proc = self.lab.gw_popen(self.argv(), stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if "l2tp-marker ready" in text:
                return
            if self.proc.poll() is not None:
                raise LabError(f"l2tp-marker exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise LabError("l2tp-marker did not become ready in time:\n" + self.log_path.read_text(errors="replace"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the daemon (SIGTERM: clean exit; SIGKILL: a crash) and reap it."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict:
        return ask(self.control_socket, {"cmd": "status"})

    def try_status(self) -> dict | None:
        try:
            return self.status()
        except ControlError:
            return None

    def queue_stats(self) -> dict[int, dict[str, int]]:
        """The gateway's NFQUEUE counters (``queued`` = packets handed to each queue so far)."""
        from ..metrics import parse_queue_stats  # noqa: PLC0415

        return parse_queue_stats(self.lab.gw_run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout)

    def decisions(self) -> list[dict]:
        if not self.decision_log.exists():
            return []
        return [json.loads(line) for line in self.decision_log.read_text().splitlines() if line.strip()]
