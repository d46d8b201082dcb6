"""Read the host's own routes and addresses: for defaults at init (`ip -j`), the on-link
networks an exit must not lend (`/proc/net/route`, no process), and the uplink an exit lends
(the default route's interface, from the reconciler's one route read). Never raises on output
of an unexpected shape: it reads as nothing."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Collection
from pathlib import Path

from picell.routing.apply import ANY, ObservedRoutes, json_list, parse_routes
from picell.system.run import Runner


def observe_host_networks(runner: Runner) -> list[ipaddress.IPv4Network]:
    out = runner.run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout
    return [r.dst for r in parse_routes(out).routes if r.dst != ANY]


def observe_host_address(runner: Runner) -> str | None:
    """The first global IPv4 address in `ip`'s order (by interface index): the default
    endpoint at init."""
    out = runner.run(["ip", "-j", "-4", "addr", "show", "scope", "global"]).stdout
    for link in json_list(out, "ip addr", []):
        info = link.get("addr_info")
        for a in info if isinstance(info, list) else []:
            if isinstance(a, dict) and a.get("family") == "inet" and a.get("local"):
                return str(a["local"])
    return None


def default_uplinks(routes: ObservedRoutes, ours: Collection[str]) -> tuple[str, ...]:
    """The interfaces of the main table's default route (those of its nexthops when it is
    multipath; of the lowest metric when there are several): where the host's own internet
    traffic goes, and so the only place an exit lends. Empty without a default route."""
    defaults = [
        r
        for r in routes.main()
        if r.dst == ANY and r.kind == "unicast" and any(d not in ours for d in r.devs)
    ]
    if not defaults:
        return ()
    best = min(r.metric for r in defaults)
    return tuple(sorted({d for r in defaults if r.metric == best for d in r.devs if d not in ours}))


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
        try:
            if len(f) < 8 or int(f[3], 16) & 0x2:  # RTF_GATEWAY: not on-link
                continue
            dst, mask = (socket.inet_ntoa(struct.pack("<I", int(x, 16))) for x in (f[1], f[7]))
            if dst == "0.0.0.0":
                continue
            found.add((f[0], ipaddress.IPv4Network(f"{dst}/{mask}", strict=False)))
        except (ValueError, struct.error):
            continue  # a line of another shape: not a network we could lend anyway
    return tuple(sorted(found))
