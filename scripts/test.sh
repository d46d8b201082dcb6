#!/bin/sh
# Run the whole suite, as root: install the cell's needs plus test tools, then lint, type-check,
# unit tests and the network-namespace tests (real wireguard-go, nftables, Unbound).
set -eu
cd "$(dirname "$0")/.."
scripts/install.sh --test
.venv/bin/ruff check picell tests bench
.venv/bin/ruff format --check picell tests bench
.venv/bin/mypy picell
.venv/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/netns "$@"
