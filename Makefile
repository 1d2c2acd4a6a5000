# Convenience targets; the README's two commands are scripts/demo.sh and scripts/test.sh
# (they need no make, which a fresh Debian 12 does not have).
.PHONY: demo test unit bench decode-bench
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
unit:
	./scripts/test.sh tests/unit
bench:
	./scripts/bench.sh

decode-bench:
	./scripts/install-deps.sh --test && .venv/bin/python bench/decode_bench.py
