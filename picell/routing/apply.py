"""The cell interface's addresses, link state and routes: observe with `ip -j`, apply with one
`ip -batch -` (adds before deletes, so the cell is never without its address or a route).

Routes to linked cells carry protocol `ROUTE_PROTO`. picell deletes and replaces only routes of
that protocol through its own interface; a new route is *added* (the kernel refuses to overwrite
an existing one), and never where the host already routes exactly that network itself (its
LAN, a Docker bridge, another cell's interface): that is a conflict to report, not to fix.

The observers read every shape `ip -j` prints without raising: what cannot be read is an
anomaly in the report, never an exception that turns an admin call into a 500.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from picell.constants import ROUTE_PROTO
from picell.system.run import Runner

PROTO = str(ROUTE_PROTO)
ANY = ipaddress.IPv4Network("0.0.0.0/0")
# rtnetlink's RTN_* numbers, as `ip -N` prints a route's type
_TYPES = dict(
    enumerate(
        ("unspec", "unicast", "local", "broadcast", "anycast", "multicast", "blackhole",
         "unreachable", "prohibit", "throw", "nat"),
    )
)  # fmt: skip
_TYPE_NAMES = {str(k): v for k, v in _TYPES.items()}
_TABLES = {"254": "main", "255": "local", "253": "default"}


@dataclass(frozen=True)
class ObservedLink:
    up: bool
    addresses: frozenset[ipaddress.IPv4Interface]
    mtu: int = 0


def observe_links(runner: Runner) -> tuple[dict[str, ObservedLink], list[str]]:
    """Every interface's state and IPv4 addresses, in one read (`ip -j addr show`), and what
    could not be read."""
    return parse_links(runner.run(["ip", "-j", "addr", "show"]).stdout)


def parse_links(out: str) -> tuple[dict[str, ObservedLink], list[str]]:
    anomalies: list[str] = []
    links = {}
    for link in json_list(out, "ip addr", anomalies):
        name = link.get("ifname")
        if not isinstance(name, str) or not name:
            anomalies.append("ip addr: an interface without a name")
            continue
        addrs = set()
        info = link.get("addr_info")
        for a in info if isinstance(info, list) else []:
            if not isinstance(a, dict) or a.get("family") != "inet":
                continue
            try:
                addrs.add(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
            except (KeyError, ValueError):
                anomalies.append(f"ip addr: an unreadable address on {name}")
        flags = link.get("flags")
        up = isinstance(flags, list) and "UP" in flags
        mtu = link.get("mtu")
        links[name] = ObservedLink(up, frozenset(addrs), mtu if isinstance(mtu, int) else 0)
    return links, anomalies


@dataclass(frozen=True)
class Route:
    """One IPv4 route as the kernel holds it (`ip -j -N route`)."""

    dst: ipaddress.IPv4Network
    table: str = "main"  # "main", "local", "default" or a number
    kind: str = "unicast"  # blackhole, unreachable, local, broadcast, ...
    proto: str = ""  # the protocol number as text
    devs: tuple[str, ...] = ()  # its device, or those of its nexthops
    metric: int = 0

    @property
    def dst_text(self) -> str:
        return "default" if self.dst == ANY else str(self.dst)

    def describe(self) -> str:
        kind = "" if self.kind == "unicast" else f"{self.kind} "
        dev = "".join(f" dev {d}" for d in self.devs)
        return f"{kind}{self.dst_text}{dev} proto {self.proto or '?'} metric {self.metric}"


@dataclass(frozen=True)
class ObservedRoutes:
    routes: tuple[Route, ...] = ()
    anomalies: tuple[str, ...] = ()

    def main(self) -> list[Route]:
        return [r for r in self.routes if r.table == "main"]


def observe_routes(runner: Runner) -> ObservedRoutes:
    """Every IPv4 route of every table in one read, numbers as numbers (`-N`: protocol 77 is
    "77" whatever rt_protos names it). The links' routes, the exit tables, the host's own
    routes (conflicts) and its default route (the uplink) all come from it."""
    out = runner.run(["ip", "-j", "-N", "-4", "route", "show", "table", "all"]).stdout
    return parse_routes(out)


def parse_routes(out: str) -> ObservedRoutes:
    anomalies: list[str] = []
    routes = []
    for r in json_list(out, "ip route", anomalies):
        dst = r.get("dst")
        if not isinstance(dst, str) or not dst:
            anomalies.append("ip route: a route without a destination")
            continue
        try:
            net = ANY if dst == "default" else ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            anomalies.append(f"ip route: unreadable destination {dst[:40]!r}")
            continue
        table = str(r.get("table", "main"))
        kind = str(r.get("type", "unicast"))
        hops = r.get("nexthops")
        devs = [r.get("dev")]
        if isinstance(hops, list):  # a multipath route: its devices are its nexthops'
            devs += [h.get("dev") for h in hops if isinstance(h, dict)]
        metric = r.get("metric", 0)
        routes.append(
            Route(
                dst=net,
                table=_TABLES.get(table, table),
                kind=_TYPE_NAMES.get(kind, kind),
                proto=str(r.get("protocol", "")),
                devs=tuple(d for d in devs if isinstance(d, str) and d),
                metric=metric if isinstance(metric, int) else 0,
            )
        )
    return ObservedRoutes(tuple(routes), tuple(anomalies))


def json_list(out: str, what: str, anomalies: list[str]) -> list[dict[str, Any]]:
    """The objects of a JSON list; anything else is an anomaly and reads as nothing."""
    try:
        data = json.loads(out or "[]")
    except ValueError:
        anomalies.append(f"{what}: output is not JSON")
        return []
    if not isinstance(data, list):
        anomalies.append(f"{what}: output is not a list")
        return []
    return [item for item in data if isinstance(item, dict)]


def ours_in_main(routes: ObservedRoutes, ifname: str) -> frozenset[ipaddress.IPv4Network]:
    """Our routes to linked cells: protocol ROUTE_PROTO through our interface, main table."""
    return frozenset(r.dst for r in routes.main() if r.proto == PROTO and r.devs == (ifname,))


def foreign_in_main(routes: ObservedRoutes, ifname: str) -> list[Route]:
    """The host's own routes of the main table (another protocol, or another interface:
    another cell on the same host), the default route left out."""
    return [
        r for r in routes.main() if r.dst != ANY and not (r.proto == PROTO and r.devs == (ifname,))
    ]


def route_conflicts(
    wanted: Iterable[ipaddress.IPv4Network], routes: ObservedRoutes, ifname: str
) -> list[str]:
    """Linked networks the host routes itself: exactly or within a wider route of its own
    (picell leaves those to the host and routes nothing there), or in part (the host's more
    specific route wins there)."""
    foreign = foreign_in_main(routes, ifname)
    out = []
    for net in sorted(set(wanted)):
        for r in foreign:
            if net.subnet_of(r.dst):
                how = "routes it itself" if r.dst == net else "routes a network around it"
                out.append(f"route {net}: the host {how} ({r.describe()}); "
                           "picell leaves that route alone")  # fmt: skip
            elif r.dst.subnet_of(net):
                out.append(f"route {net} overlaps the host's route {r.describe()}")
    return out


def blocked(
    wanted: Iterable[ipaddress.IPv4Network], host_routes: Iterable[ipaddress.IPv4Network]
) -> frozenset[ipaddress.IPv4Network]:
    """The wanted networks picell must not route: the host routes them, or a network around
    them, itself (a route of ours would take its LAN, or a host in it, into the tunnel)."""
    hosts = list(host_routes)
    return frozenset(n for n in wanted if any(n.subnet_of(h) for h in hosts))


def plan_link(
    ifname: str,
    address: ipaddress.IPv4Interface,
    observed: ObservedLink | None,
    routes: tuple[ipaddress.IPv4Network, ...] = (),
    observed_routes: frozenset[ipaddress.IPv4Network] | None = None,
    host_routes: frozenset[ipaddress.IPv4Network] = frozenset(),
) -> list[str]:
    """`ip -batch` lines that make the interface carry exactly `address`, be up, and route
    exactly `routes` (sourced from our address, so replies and DNS forwards come from it).

    `observed_routes` are ours (`ours_in_main`), `host_routes` the destinations the host
    routes itself (`foreign_in_main`). Only ours are replaced (a new source address) or
    deleted, both naming our protocol and interface; a missing one is added (`add` fails
    rather than overwrite a route that appeared meanwhile) unless the host routes that
    network, or one around it, itself (`blocked`)."""
    have = observed.addresses if observed else frozenset()
    have_routes = observed_routes or frozenset()
    lines: list[str] = []
    if address not in have:
        lines.append(f"address replace {address} dev {ifname}")
    if observed is None or not observed.up:
        lines.append(f"link set dev {ifname} up")
    for net in sorted(set(routes) - blocked(routes, host_routes)):
        if net not in have_routes:
            lines.append(f"route add {net} dev {ifname} proto {PROTO} src {address.ip}")
        elif address not in have:
            lines.append(f"route replace {net} dev {ifname} proto {PROTO} src {address.ip}")
    lines += [
        f"route del {net} dev {ifname} proto {PROTO}" for net in sorted(have_routes - set(routes))
    ]
    lines += [f"address del {a} dev {ifname}" for a in sorted(have) if a != address]
    return lines


def apply_link(runner: Runner, lines: list[str]) -> None:
    runner.run(["ip", "-batch", "-"], stdin="\n".join(lines) + "\n")
