#!/bin/bash
# The benchmark command: installs whatever is missing, then runs the fast-path benchmark
# (bench/fastpath_bench.py: its own network namespaces, ~10 minutes on 2 cores) and writes
# bench/RESULTS.md. Options go to the benchmark (--quick, --rounds N, --tunnels 1,10,...).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh --test
exec .venv/bin/python bench/fastpath_bench.py "$@"
