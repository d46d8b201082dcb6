#!/bin/sh
# Run a cell on this host, as root: install what it needs, then serve in the foreground.
# A first run initialises the cell with defaults (see README); PICELL_DATA_DIR picks the data dir.
set -eu
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/picell serve "$@"
