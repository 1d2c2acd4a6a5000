"""Root-only namespace tests: skip the whole folder, with the reason, where they cannot run.

Fixtures for lab tests:

* ``lab_prefix``  a namespace prefix unique to this test and this pytest process
  (``l2t<pid>x<n>``), so parallel runs and leftovers of a crashed run never clash;
* ``make_lab``    builds a :class:`~l2tp_marker.lab.topology.Lab` with that prefix and, after the
  test, closes it and asserts that nothing is left: no namespace with the prefix, no process the
  lab started, no registry file, and the host's policy rules (and legacy mangle table, when the
  host already has one) unchanged.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_prefix_counter = itertools.count(1)
# Prefixes made by lab_prefix: "l2t<pytest pid>x<n>", "-<k>" for a test's k-th extra lab.
_PREFIX_NS_RE = re.compile(r"^(l2t(\d+)x\d+(?:-\d+)?)-(?:gw|sink|c\d+)$")
_PREFIX_REG_RE = re.compile(r"^l2tp-marker-lab-(l2t(\d+)x\d+(?:-\d+)?)\.json$")


def _folder_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, netfilter); CI runs them as root"
    if shutil.which("ip") is None:
        return "lab tests need iproute2's 'ip' (scripts/install-deps.sh installs it)"
    try:
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'ip netns' does not work here: {exc}"
    if res.returncode != 0:
        return f"'ip netns' does not work here: {res.stderr.strip()}"
    if not os.access("/usr/sbin/xl2tpd", os.X_OK):
        return "lab tests need xl2tpd (apt-get install xl2tpd, or scripts/install-deps.sh)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _folder_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(marker)


def _host_snapshot() -> dict[str, str]:
    """Host state the lab must never change (read-only: nothing here creates a table)."""
    snap = {"ip rule": subprocess.run(["ip", "rule", "list"], capture_output=True,
                                      text=True).stdout}
    try:
        tables = Path("/proc/net/ip_tables_names").read_text().split()
    except OSError:
        tables = []
    if "mangle" in tables and shutil.which("iptables-legacy"):
        snap["mangle"] = subprocess.run(["iptables-legacy", "-t", "mangle", "-S"],
                                        capture_output=True, text=True).stdout
    return snap


@pytest.fixture(scope="session", autouse=True)
def _sweep_dead_runs() -> None:
    """Remove what lab tests of a pytest process that no longer runs left behind (killed runs);
    labs of a pytest run that is still alive (a parallel run) are not touched."""
    if _folder_skip_reason() is not None:
        return
    from l2tp_marker.lab.topology import cleanup_prefix, list_namespaces

    found: dict[str, int] = {}
    for ns in list_namespaces():
        if m := _PREFIX_NS_RE.match(ns):
            found[m[1]] = int(m[2])
    for path in Path(tempfile.gettempdir()).glob("l2tp-marker-lab-l2t*.json"):
        if m := _PREFIX_REG_RE.match(path.name):
            found[m[1]] = int(m[2])
    for prefix, pid in sorted(found.items()):
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            cleanup_prefix(prefix)


@pytest.fixture
def lab_prefix() -> str:
    return f"l2t{os.getpid()}x{next(_prefix_counter)}"


@pytest.fixture
def make_lab(lab_prefix: str):
    """``make_lab(clients, **config)`` -> an unentered Lab; checked for leftovers afterwards."""
    from l2tp_marker.lab.topology import Lab, LabConfig

    before = _host_snapshot()
    labs: list[Lab] = []

    def factory(clients, **kw) -> Lab:
        kw.setdefault("prefix", lab_prefix if not labs else f"{lab_prefix}-{len(labs)}")
        lab = Lab(LabConfig(clients=tuple(clients), **kw))
        labs.append(lab)
        return lab

    yield factory

    started: list[tuple[int, int | None]] = []
    for lab in labs:
        lab.close()  # safe if the test closed it already
        started += lab.started_processes()
    assert_nothing_left([lab.config.prefix for lab in labs], started, before)


def assert_nothing_left(prefixes: list[str], started: list[tuple[int, int | None]],
                        before: dict[str, str]) -> None:
    """No namespace with one of ``prefixes``, none of ``started`` alive, no registry file, and
    the host snapshot as ``before``."""
    from l2tp_marker.lab.topology import list_namespaces, pid_alive, registry_path

    left_ns = [ns for ns in list_namespaces() if any(ns.startswith(f"{p}-") for p in prefixes)]
    assert left_ns == [], f"namespaces left behind: {left_ns}"
    alive = sorted({pid for pid, start in started if pid_alive(pid, start)})
    assert alive == [], f"processes started by the lab still alive: {alive}"
    for p in prefixes:
        assert not registry_path(p).exists(), f"registry {registry_path(p)} left behind"
    assert _host_snapshot() == before, "the host's policy rules or legacy mangle table changed"
