"""Exit tunnels' names and numbers, and their policy routing (DESIGN §8).

An exit tunnel of slot k is the WireGuard interface `exit_ifname(main, k)`; packets marked
`exit_mark(k)` use routing table `exit_table(k)` through one rule each. A table always ends in a
blackhole route, so that a tunnel that is missing or down drops its devices' traffic instead of
letting it fall through to the main table and out of our own uplink (fail closed).

`plan_exit_routing` (pure) turns desired and observed tables and rules into `ip -batch` lines;
routes carry protocol `ROUTE_PROTO`, and every delete names it, so only our own ever go (a route
of another protocol in these tables is reported, never touched).
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
from picell.routing.apply import PROTO, ObservedLink, ObservedRoutes, Route
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
    return parse_rules(runner.run(["ip", "-j", "-4", "rule", "show"]).stdout)


def parse_rules(out: str) -> frozenset[tuple[int, int]]:
    """Rules of any other shape (a named table, a mask, garbled output) are not ours: they
    are left alone, and a missing rule of ours is added again."""
    try:
        data = json.loads(out or "[]")
    except ValueError:
        return frozenset()
    rules = set()
    for r in data if isinstance(data, list) else []:
        if not isinstance(r, dict) or r.get("priority") != EXIT_RULE_PRIORITY:
            continue
        try:
            rules.add((int(str(r["fwmark"]), 16), int(str(r["table"]))))
        except (KeyError, ValueError):
            continue
    return frozenset(rules)


def exit_table_routes(
    routes: ObservedRoutes,
) -> tuple[frozenset[TableRoute], tuple[Route, ...]]:
    """Our routes of the exit tables: those of the shapes we make (a route through one
    interface, the blackhole of last resort), and the odd ones (protocol ROUTE_PROTO, any other
    shape: a multipath route, an `unreachable`, another metric), which go. Routes of another
    protocol in these tables are not ours and stay (`foreign_in_exit_tables`)."""
    tables, odd = set(), []
    for r in routes.routes:
        if not (r.table.isdigit() and int(r.table) in exit_tables()) or r.proto != PROTO:
            continue
        if r.kind == "blackhole" and r.metric == EXIT_BLACKHOLE_METRIC:
            tables.add(TableRoute(int(r.table), r.dst_text, None))
        elif r.kind == "unicast" and len(r.devs) == 1 and r.metric == 0:
            tables.add(TableRoute(int(r.table), r.dst_text, r.devs[0]))
        else:
            odd.append(r)
    return frozenset(tables), tuple(odd)


def foreign_in_exit_tables(routes: ObservedRoutes) -> list[str]:
    """Routes in our tables that picell did not make: reported, never touched."""
    return [
        f"table {r.table} holds a route picell did not make: {r.describe()}"
        for r in routes.routes
        if r.table.isdigit() and int(r.table) in exit_tables() and r.proto != PROTO
    ]


def plan_exit_routing(
    want_routes: frozenset[TableRoute],
    have_routes: frozenset[TableRoute],
    want_rules: frozenset[tuple[int, int]],
    have_rules: frozenset[tuple[int, int]],
    odd_routes: tuple[Route, ...] = (),
) -> list[str]:
    """`ip -batch` lines: routes and rules added (tables first, so that a rule never points at
    an empty table) before the stale ones go. Every delete names our protocol."""
    added = sorted(want_routes - have_routes, key=TableRoute.key)
    lines = [_route("replace", r) for r in added]
    lines += [
        f"rule add fwmark {mark:#x} lookup {table} priority {EXIT_RULE_PRIORITY}"
        for mark, table in sorted(want_rules - have_rules)
    ]
    lines += [
        f"rule del fwmark {mark:#x} lookup {table} priority {EXIT_RULE_PRIORITY}"
        for mark, table in sorted(have_rules - want_rules)
    ]
    lines += [_route("del", r) for r in sorted(have_routes - want_routes, key=TableRoute.key)]
    # a replace above took the kernel's slot (table, destination, metric) of an odd route
    # already: deleting it again would fail the whole batch
    taken = {(r.table, r.dst, 0 if r.dev else EXIT_BLACKHOLE_METRIC) for r in added}
    lines += [
        _odd_route_del(r)
        for r in sorted(odd_routes, key=Route.describe)
        if (int(r.table), r.dst_text, r.metric) not in taken
    ]
    return lines


def _route(verb: str, r: TableRoute) -> str:
    if r.dev is None:
        return (
            f"route {verb} blackhole {r.dst} metric {EXIT_BLACKHOLE_METRIC} table {r.table} "
            f"proto {ROUTE_PROTO}"
        )
    return f"route {verb} {r.dst} dev {r.dev} table {r.table} proto {ROUTE_PROTO}"


def _odd_route_del(r: Route) -> str:
    kind = "" if r.kind == "unicast" else f"{r.kind} "
    dev = f" dev {r.devs[0]}" if len(r.devs) == 1 else ""
    return (
        f"route del {kind}{r.dst_text}{dev} metric {r.metric} table {r.table} proto {ROUTE_PROTO}"
    )


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
