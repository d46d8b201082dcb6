#!/bin/sh
# Run a cell on this host, as root: install what it needs, then run it.
# Where systemd runs the machine: as the systemd service `picell` (started at boot, restarted on
# failure, logs in the journal: journalctl -u picell). Elsewhere (a container, a chroot): the
# daemon serves in the foreground. A first run initialises the cell with defaults (see README);
# PICELL_DATA_DIR picks the data dir.
set -eu
cd "$(dirname "$0")/.."
scripts/install.sh
data_dir="${PICELL_DATA_DIR:-/var/lib/picell}"
if [ -d /run/systemd/system ]; then
    scripts/service.sh install "$(pwd)/.venv/bin/picell" "$data_dir"
    echo "picell runs as the systemd service picell (at boot too): systemctl status picell"
    echo "logs: journalctl -u picell"
    if [ -f "$data_dir/admin-password" ]; then
        echo "web UI admin password (generated; kept in $data_dir/admin-password until you change it):"
        cat "$data_dir/admin-password"
    fi
    exit 0
fi
exec .venv/bin/picell serve "$@"
