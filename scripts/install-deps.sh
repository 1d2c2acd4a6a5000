#!/bin/bash
# Installs everything l2tp-marker needs on Debian 12 (run as root), idempotently:
# system packages (xl2tpd, iptables, nftables, libnetfilter-queue, tcpdump, conntrack, build tools)
# and a virtualenv in .venv with the package and its Python dependencies.
# Usage: scripts/install-deps.sh [--test]   (--test also installs the test extras)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(xl2tpd iptables nftables libnftables1 conntrack tcpdump iproute2 util-linux procps
          libnetfilter-queue-dev libnfnetlink-dev build-essential python3-dev python3-venv)
# The tests also verify the systemd unit with systemd-analyze, and turn veth checksum offload off
# (ethtool) to prove the kernel fast path writes valid UDP checksums.
[ "${1:-}" = "--test" ] && APT_PKGS+=(systemd ethtool)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# xl2tpd's Debian package starts a system-wide daemon; the project never uses it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet xl2tpd 2>/dev/null; then
    systemctl stop xl2tpd || true
    systemctl disable xl2tpd 2>/dev/null || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
stamp=".venv/.installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -q -e ".${extras}"
    touch "$stamp"
fi
