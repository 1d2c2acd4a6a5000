"""Shared checks for the root-only namespace tests."""

from __future__ import annotations

import os
import shutil

import pytest


def missing_for_lab() -> str | None:
    """Why the namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces and netfilter (CI runs as root)"
    for tool in ("ip", "iptables-legacy"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-deps.sh installs it)"
    return None


def require_root_netns():
    why = missing_for_lab()
    return pytest.mark.skipif(why is not None, reason=why or "")
