"""Read the host's own routes and addresses: for defaults at init (`ip -j`: the global IPv4
and IPv6 addresses that make the default endpoints), the on-link
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


def _global_addresses(out: str, family: str) -> list[str]:
    """The addresses of `family` in `ip -j addr` output, in its order (by interface index),
    leaving out those no other host can use for long: tentative (DAD not done), deprecated and
    temporary (privacy) IPv6 addresses."""
    found = []
    for link in json_list(out, "ip addr", []):
        info = link.get("addr_info")
        for a in info if isinstance(info, list) else []:
            if not isinstance(a, dict) or a.get("family") != family or not a.get("local"):
                continue
            if any(a.get(flag) for flag in ("tentative", "deprecated", "temporary")):
                continue
            found.append(str(a["local"]))
    return found


def observe_host_addresses(runner: Runner) -> tuple[str, ...]:
    """The host's own endpoints' addresses, best first: its first global IPv4 address, then its
    first global IPv6 address (either may be missing). A host without global IPv4 (an IPv6-only
    home, DS-Lite) is thus reached over IPv6."""
    found: list[str] = []
    for flag, family in (("-4", "inet"), ("-6", "inet6")):
        out = runner.run(["ip", "-j", flag, "addr", "show", "scope", "global"]).stdout
        found += _global_addresses(out, family)[:1]
    return tuple(found)


def observe_host_address(runner: Runner) -> str | None:
    """The first of `observe_host_addresses`: the default endpoint at init."""
    found = observe_host_addresses(runner)
    return found[0] if found else None


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
