#!/bin/bash
# The demo command: installs whatever is missing, then runs the namespace lab with real xl2tpd,
# first without the marker and then with it, and prints a before/after summary.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
exec .venv/bin/l2tp-marker demo "$@"
