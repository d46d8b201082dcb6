"""The cell interface's addresses, link state and routes: observe with `ip -j`, apply with one
`ip -batch -` (adds before deletes, so the cell is never without its address or a route).

Routes to linked cells carry protocol `ROUTE_PROTO`, so picell only ever deletes its own.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from picell.constants import ROUTE_PROTO
from picell.system.run import Runner


@dataclass(frozen=True)
class ObservedLink:
    up: bool
    addresses: frozenset[ipaddress.IPv4Interface]
    mtu: int = 0


def observe_links(runner: Runner) -> dict[str, ObservedLink]:
    """Every interface's state and IPv4 addresses, in one read (`ip -j addr show`)."""
    out = runner.run(["ip", "-j", "addr", "show"]).stdout
    links = {}
    for link in json.loads(out or "[]"):
        addrs = frozenset(
            ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
            for a in link.get("addr_info", [])
            if a.get("family") == "inet"
        )
        up = "UP" in link.get("flags", [])
        links[str(link.get("ifname"))] = ObservedLink(up, addrs, int(link.get("mtu", 0)))
    return links


def observe_routes(runner: Runner) -> list[dict[str, object]]:
    """Our routes in every table (protocol ROUTE_PROTO): one read for the links' routes and the
    exit tables alike (`routing.exits.split_routes` sorts them)."""
    out = runner.run(["ip", "-j", "-4", "route", "show", "table", "all", "proto", str(ROUTE_PROTO)])
    data: list[dict[str, object]] = json.loads(out.stdout or "[]")
    return data


def plan_link(
    ifname: str,
    address: ipaddress.IPv4Interface,
    observed: ObservedLink | None,
    routes: tuple[ipaddress.IPv4Network, ...] = (),
    observed_routes: frozenset[ipaddress.IPv4Network] | None = None,
) -> list[str]:
    """`ip -batch` lines that make the interface carry exactly `address`, be up, and route
    exactly `routes` (sourced from our address, so replies and DNS forwards come from it)."""
    have = observed.addresses if observed else frozenset()
    have_routes = observed_routes or frozenset()
    lines: list[str] = []
    if address not in have:
        lines.append(f"address replace {address} dev {ifname}")
    if observed is None or not observed.up:
        lines.append(f"link set dev {ifname} up")
    lines += [
        f"route replace {net} dev {ifname} proto {ROUTE_PROTO} src {address.ip}"
        for net in sorted(set(routes))
        if net not in have_routes or address not in have
    ]
    lines += [
        f"route del {net} dev {ifname} proto {ROUTE_PROTO}"
        for net in sorted(have_routes - set(routes))
    ]
    lines += [f"address del {a} dev {ifname}" for a in sorted(have) if a != address]
    return lines


def apply_link(runner: Runner, lines: list[str]) -> None:
    runner.run(["ip", "-batch", "-"], stdin="\n".join(lines) + "\n")
