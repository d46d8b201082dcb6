#!/bin/sh
# picell's systemd unit: render it, or install and start it (as root, where systemd runs).
# Usage: scripts/service.sh render PICELL DATA_DIR   (prints the unit)
#        scripts/service.sh install PICELL DATA_DIR  (/etc/systemd/system/picell.service, enabled
#                                                     and started; waits until the cell serves)
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-}"
picell="${2:-}"
data_dir="${3:-}"
case "$picell$data_dir" in
    *[!A-Za-z0-9_./-]*)
        echo "error: paths with spaces or special characters are not supported: $picell $data_dir" >&2
        exit 2
        ;;
esac
if [ -z "$picell" ] || [ -z "$data_dir" ]; then
    echo "usage: $0 render|install PICELL DATA_DIR" >&2
    exit 2
fi
render() {
    sed -e "s|@PICELL@|$picell|g" -e "s|@DATA_DIR@|$data_dir|g" "$here/picell.service"
}
case "$cmd" in
    render) render ;;
    install)
        unit=/etc/systemd/system/picell.service
        render >"$unit.tmp"
        chmod 0644 "$unit.tmp"
        mv "$unit.tmp" "$unit"
        systemctl daemon-reload
        systemctl enable picell.service >/dev/null
        # a changed unit or program is picked up; start waits for READY=1 (Type=notify)
        systemctl restart picell.service
        ;;
    *)
        echo "usage: $0 render|install PICELL DATA_DIR" >&2
        exit 2
        ;;
esac
