#!/bin/sh
# Run the whole suite, as root: install the cell's needs plus test tools, then lint, type-check,
# unit tests and the network-namespace tests (real wireguard-go, nftables, Unbound).
set -eu
cd "$(dirname "$0")/.."
scripts/install.sh --test
.venv/bin/ruff check picell tests bench
.venv/bin/ruff format --check picell tests bench
.venv/bin/mypy picell
# two workers, a test module each (module-scoped topologies stay whole): the netns tests spend
# most of their time waiting for handshakes and daemons, not on the CPU
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests/unit tests/netns "$@"
