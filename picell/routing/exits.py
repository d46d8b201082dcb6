"""Exit tunnels' names and numbers, and their policy routing (DESIGN §8).

An exit tunnel of slot k is the WireGuard interface `exit_ifname(main, k)`; packets marked
`exit_mark(k)` use routing table `exit_table(k)` through one rule each. A table always ends in a
blackhole route, so that a tunnel that is missing or down drops its devices' traffic instead of
letting it fall through to the main table and out of our own uplink (fail closed).

`plan_exit_routing` (pure) turns desired and observed tables and rules into `ip -batch` lines;
routes carry protocol `ROUTE_PROTO`, so only our own are ever deleted.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from picell.constants import (
    EXIT_BLACKHOLE_METRIC,
    EXIT_DNS_PORT_BASE,
    EXIT_MARK_BASE,
    EXIT_MAX_SLOTS,
    EXIT_RULE_PRIORITY,
    EXIT_TABLE_BASE,
    ROUTE_PROTO,
)
from picell.routing.apply import ObservedLink
from picell.system.run import Runner

IFNAME_MAX = 15


def exit_ifname(main: str, slot: int) -> str:
    suffix = f"x{slot}"
    return f"{main[: IFNAME_MAX - len(suffix)]}{suffix}"


def exit_mark(slot: int) -> int:
    return EXIT_MARK_BASE + slot


def exit_table(slot: int) -> int:
    return EXIT_TABLE_BASE + slot


def exit_port(listen_port: int, slot: int) -> int:
    """Our end of the exit tunnel of `slot` listens next to the cell's own WireGuard port."""
    return listen_port + 1 + slot


def exit_dns_port(slot: int) -> int:
    return EXIT_DNS_PORT_BASE + slot


def exit_tables() -> range:
    return range(exit_table(0), exit_table(EXIT_MAX_SLOTS) + 1)


@dataclass(frozen=True)
class TableRoute:
    """One route of an exit table: `dev` None is the blackhole of last resort."""

    table: int
    dst: str  # "default" or a network
    dev: str | None

    def key(self) -> tuple[int, str, str]:
        return (self.table, self.dst, self.dev or "")


def observe_rules(runner: Runner) -> frozenset[tuple[int, int]]:
    """(mark, table) of our rules (priority EXIT_RULE_PRIORITY)."""
    out = runner.run(["ip", "-j", "-4", "rule", "show"]).stdout
    rules = set()
    for r in json.loads(out or "[]"):
        if r.get("priority") == EXIT_RULE_PRIORITY and "fwmark" in r:
            rules.add((int(r["fwmark"], 16), int(r["table"])))
    return frozenset(rules)


def split_routes(
    raw: list[dict[str, object]], main_if: str
) -> tuple[frozenset[ipaddress.IPv4Network], frozenset[TableRoute]]:
    """Our routes (`ip -j route show table all proto ROUTE_PROTO`): those of the main table
    through the cell interface, and those of the exit tables."""
    main, tables = set(), set()
    for r in raw:
        dst = str(r.get("dst", ""))
        table = r.get("table")
        if table is None and r.get("dev") == main_if:
            main.add(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32"))
        elif isinstance(table, str) and table.isdigit() and int(table) in exit_tables():
            dev = None if r.get("type") == "blackhole" else str(r.get("dev"))
            tables.add(TableRoute(int(table), dst, dev))
    return frozenset(main), frozenset(tables)


def plan_exit_routing(
    want_routes: frozenset[TableRoute],
    have_routes: frozenset[TableRoute],
    want_rules: frozenset[tuple[int, int]],
    have_rules: frozenset[tuple[int, int]],
) -> list[str]:
    """`ip -batch` lines: routes and rules added (tables first, so that a rule never points at
    an empty table) before the stale ones go."""
    lines = [_route("replace", r) for r in sorted(want_routes - have_routes, key=TableRoute.key)]
    lines += [
        f"rule add fwmark {mark:#x} lookup {table} priority {EXIT_RULE_PRIORITY}"
        for mark, table in sorted(want_rules - have_rules)
    ]
    lines += [
        f"rule del fwmark {mark:#x} lookup {table} priority {EXIT_RULE_PRIORITY}"
        for mark, table in sorted(have_rules - want_rules)
    ]
    lines += [_route("del", r) for r in sorted(have_routes - want_routes, key=TableRoute.key)]
    return lines


def _route(verb: str, r: TableRoute) -> str:
    if r.dev is None:
        return (
            f"route {verb} blackhole {r.dst} metric {EXIT_BLACKHOLE_METRIC} table {r.table} "
            f"proto {ROUTE_PROTO}"
        )
    return f"route {verb} {r.dst} dev {r.dev} table {r.table} proto {ROUTE_PROTO}"


def plan_exit_link(
    ifname: str, address: ipaddress.IPv4Address, mtu: int, observed: ObservedLink | None
) -> list[str]:
    """`ip -batch` lines that make an exit interface up with `mtu` and our address (/32, no
    route): loose reverse-path filtering (rp_filter 2) accepts the sources a tunnel carries only
    on an interface that has an address."""
    lines = []
    want = ipaddress.IPv4Interface(f"{address}/32")
    if observed is None or want not in observed.addresses:
        lines.append(f"address replace {want} dev {ifname} noprefixroute")
    if observed is None or observed.mtu != mtu or not observed.up:
        lines.append(f"link set dev {ifname} mtu {mtu} up")
    return lines
