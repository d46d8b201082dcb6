#!/bin/sh
# Install what a cell needs on Debian 12, as root: apt packages (without recommends), a virtualenv
# in .venv with the pinned dependencies, the picell package, and /usr/local/bin/picell.
# Usage: scripts/install.sh [--test]   (--test adds the test tools)
set -eu
cd "$(dirname "$0")/.."
extras=""
# iptables: picell keeps its accept rules in Docker's DOCKER-USER chain with it (iptables-nft,
# the backend Docker uses on Debian 12), when Docker runs on the host
pkgs="python3 python3-venv ca-certificates iproute2 wireguard-tools wireguard-go nftables unbound conntrack iptables"
if [ "${1:-}" = "--test" ]; then
    extras="[test]"
    # chromium: the web UI's browser tests; libatomic1: Playwright's bundled node driver needs it
    # (a minimal Debian lacks it); git: the compatibility test checks out an older commit
    # miniupnpd-nftables, miniupnpc: a home router answering UPnP-IGD, PCP and NAT-PMP in the
    # port-mapping test, and `upnpc` to list its mappings (the cell itself uses PyPI miniupnpc)
    # systemd: `systemd-analyze verify` checks the unit (the package does not become PID 1)
    # faketime: the fault suite skews a daemon's clock (namespaces share the real-time clock);
    # iperf3: the data-plane benchmark
    pkgs="$pkgs dnsutils iputils-ping procps chromium libatomic1 git miniupnpd-nftables miniupnpc systemd"
    pkgs="$pkgs faketime iperf3"
fi
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
# Debian's unbound package may start a system resolver; picell runs its own per cell. The same
# for miniupnpd (--test only): the test runs its own in a router namespace.
for svc in unbound miniupnpd; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled "$svc" >/dev/null 2>&1; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
done
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
# pip reinstalls an editable package on every run, fetching its build backend from the index, so a
# cell restarted without Internet (or in a namespace without an uplink) could not start. Skip pip
# when the venv was last installed from this same lock and pyproject with these (or more) extras.
stamp=.venv/.picell-installed
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
case "$have" in
    "$want $extras" | "$want [test]") ;;
    *)
        rm -f "$stamp"
        .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".$extras"
        echo "$want $extras" >"$stamp"
        ;;
esac
ln -sf "$(pwd)/.venv/bin/picell" /usr/local/bin/picell
