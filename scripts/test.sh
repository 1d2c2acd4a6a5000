#!/bin/bash
# The test command: installs whatever is missing, then runs the whole suite.
# Lab tests (tests/lab) need root and network namespaces; without root they skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh --test
exec .venv/bin/python -m pytest -q -ra tests "$@"
