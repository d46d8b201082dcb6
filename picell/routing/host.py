"""Read the host's own routes and addresses: for defaults at init (`ip -j`), and the on-link
networks an exit must not lend (`/proc/net/route`, no process)."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from pathlib import Path

from picell.system.run import Runner


def observe_host_networks(runner: Runner) -> list[ipaddress.IPv4Network]:
    out = runner.run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout
    nets = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                nets.append(ipaddress.IPv4Network(dst, strict=False))
            except ValueError:
                continue
    return nets


def observe_host_address(runner: Runner) -> str | None:
    out = runner.run(["ip", "-j", "-4", "addr", "show", "scope", "global"]).stdout
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                return str(a["local"])
    return None


def observe_onlink(
    proc_route: Path = Path("/proc/net/route"),
) -> tuple[tuple[str, ipaddress.IPv4Network], ...]:
    """(interface, network) of every directly connected route of the main table: the host's
    LANs and uplink subnet, which an exit lends to nobody."""
    try:
        lines = proc_route.read_text().splitlines()[1:]
    except OSError:
        return ()
    found = set()
    for line in lines:
        f = line.split()
        if len(f) < 8 or int(f[3], 16) & 0x2:  # RTF_GATEWAY: not on-link
            continue
        dst, mask = (socket.inet_ntoa(struct.pack("<I", int(x, 16))) for x in (f[1], f[7]))
        if dst == "0.0.0.0":
            continue
        found.add((f[0], ipaddress.IPv4Network(f"{dst}/{mask}", strict=False)))
    return tuple(sorted(found))
