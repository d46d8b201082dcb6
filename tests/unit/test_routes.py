"""picell only ever replaces or deletes routes of its own protocol (`proto 77`), and never adds one
where the host routes exactly that network itself; the exit lends only the default route's
interface, and nothing without one (fail closed)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random

from picell.constants import (
    DOCUMENTATION_IPV4,
    NOT_INTERNET,
    SPECIAL_PURPOSE_IPV4,
    not_internet,
)
from picell.firewall.render import render_ruleset
from picell.reconcile import Reconciler
from picell.routing.apply import ObservedLink, parse_routes, plan_link, route_conflicts
from picell.routing.exits import (
    TableRoute,
    exit_table_routes,
    foreign_in_exit_tables,
    plan_exit_routing,
)
from picell.state import LinkState, State
from tests.unit.fakes import FakeKernel
from tests.unit.test_reconcile import KEYS, state_with

IF = "pctest0"
ADDR = ipaddress.IPv4Interface("10.61.0.1/22")
LAN = ipaddress.IPv4Network("192.168.77.0/24")
LAN_ROUTE = {"dst": "192.168.77.0/24", "dev": "eth1", "protocol": "2", "scope": "253"}
DEFAULT = {"dst": "default", "gateway": "198.51.100.62", "dev": "eth0"}


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def with_links(state: State, *nets: str, unlinking: str = "") -> State:
    links = tuple(
        LinkState(
            f"l{i}",
            KEYS[200 + i],
            "198.51.100.9:51820",
            net(n),
            net(n)[1],
            3000,
            unlinking=n == unlinking,
        )  # fmt: skip
        for i, n in enumerate(nets)
    )
    return dataclasses.replace(state, links=links)


def route_lines(kernel: FakeKernel) -> list[str]:
    return [ln for batch in kernel.batches for ln in batch.splitlines() if ln.startswith("route")]


def assert_only_our_routes_touched(lines: list[str]) -> None:
    for line in lines:
        words = line.split()
        assert words[words.index("proto") + 1] == "77", line
        if "table" not in words:  # the main table: only through our own interface
            assert words[words.index("dev") + 1] == IF, line
        if words[1] == "replace" and "table" not in words:
            assert line.endswith(f"src {ADDR.ip}"), line


# -- the planner ---------------------------------------------------------------------------------
def test_a_network_the_host_routes_itself_is_neither_added_nor_replaced() -> None:
    up = ObservedLink(True, frozenset({ADDR}))
    lines = plan_link(IF, ADDR, up, (LAN, net("10.62.0.0/24")), frozenset(), frozenset({LAN}))
    assert lines == [f"route add 10.62.0.0/24 dev {IF} proto 77 src 10.61.0.1"]
    # renumbered: ours are replaced with the new source, the host's still not touched
    renumbered = ipaddress.IPv4Interface("10.61.4.1/22")
    lines = plan_link(IF, renumbered, up, (LAN, net("10.62.0.0/24")),
                      frozenset({LAN, net("10.62.0.0/24")}), frozenset({LAN}))  # fmt: skip
    assert lines == [
        f"address replace 10.61.4.1/22 dev {IF}",
        f"route replace 10.62.0.0/24 dev {IF} proto 77 src 10.61.4.1",
        f"address del 10.61.0.1/22 dev {IF}",
    ]


def test_a_network_inside_one_the_host_routes_is_not_routed() -> None:
    """A /32 into the host's LAN (a linked cell's DNS address there) would take that host,
    often the LAN's router and resolver, into the tunnel."""
    up = ObservedLink(True, frozenset({ADDR}))
    inside = (net("192.168.77.1/32"), net("192.168.77.128/25"), net("192.168.0.0/16"))
    lines = plan_link(IF, ADDR, up, inside, frozenset(), frozenset({LAN}))
    assert lines == [f"route add 192.168.0.0/16 dev {IF} proto 77 src 10.61.0.1"]


def test_a_stale_route_is_deleted_by_protocol_and_interface() -> None:
    up = ObservedLink(True, frozenset({ADDR}))
    lines = plan_link(IF, ADDR, up, (), frozenset({LAN}), frozenset({LAN}))
    assert lines == [f"route del 192.168.77.0/24 dev {IF} proto 77"]


def test_conflicts_name_the_hosts_route() -> None:
    routes = parse_routes(json.dumps([
        LAN_ROUTE, DEFAULT,
        {"dst": "172.18.0.0/16", "dev": "br-1", "protocol": "2"},  # a Docker network
        {"dst": "10.62.0.0/24", "dev": IF, "protocol": "77"},  # ours
        {"dst": "10.62.0.128/25", "dev": "br-2", "protocol": "2"},  # a smaller one inside
        {"dst": "10.63.0.0/24", "dev": "pcother0", "protocol": "77"},  # another cell's
    ]))  # fmt: skip
    wanted = [LAN, net("172.18.5.0/24"), net("10.62.0.0/24"), net("10.63.0.0/24")]
    assert route_conflicts(wanted, routes, IF) == [
        "route 10.62.0.0/24 overlaps the host's route 10.62.0.128/25 dev br-2 proto 2 metric 0",
        "route 10.63.0.0/24: the host routes it itself (10.63.0.0/24 dev pcother0 proto 77 "
        "metric 0); picell leaves that route alone",
        "route 172.18.5.0/24: the host routes a network around it (172.18.0.0/16 dev br-1 "
        "proto 2 metric 0); picell leaves that route alone",
        "route 192.168.77.0/24: the host routes it itself (192.168.77.0/24 dev eth1 proto 2 "
        "metric 0); picell leaves that route alone",
    ]


def test_odd_routes_in_our_tables_go_precisely_and_foreign_ones_stay() -> None:
    routes = parse_routes(json.dumps([
        {"type": "6", "dst": "default", "table": "7701", "protocol": "77", "metric": 4096},
        {"type": "7", "dst": "default", "table": "7701", "protocol": "77", "metric": 10},
        {"dst": "default", "table": "7702", "protocol": "77",
         "nexthops": [{"dev": "a"}, {"dev": "b"}]},
        {"dst": "10.62.0.0/24", "dev": "x0", "table": "7700", "protocol": "77", "metric": 5},
        {"dst": "default", "dev": "eth0", "table": "7703", "protocol": "4", "metric": 100},
        {"dst": "default", "dev": "eth0", "table": "100", "protocol": "77"},  # not our table
    ]))  # fmt: skip
    have, odd = exit_table_routes(routes)
    assert have == {TableRoute(7701, "default", None)}
    want = frozenset({TableRoute(7701, "default", None), TableRoute(7702, "default", "x2")})
    lines = plan_exit_routing(want, have, frozenset(), frozenset(), odd)
    assert lines == [
        "route replace default dev x2 table 7702 proto 77",  # takes the multipath route's slot
        "route del 10.62.0.0/24 dev x0 metric 5 table 7700 proto 77",
        "route del unreachable default metric 10 table 7701 proto 77",
    ]
    assert foreign_in_exit_tables(routes) == [
        "table 7703 holds a route picell did not make: default dev eth0 proto 4 metric 100"
    ]


# -- the reconciler: dangerous desired states through the planner ---------------------------------
def test_a_link_on_the_hosts_lan_never_touches_the_lan_route(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    """The identity policy refuses such a link; the routing layer is safe without it."""
    kernel.host_routes = [DEFAULT, LAN_ROUTE]
    base = state_with(1, 0)
    report = reconciler.set(with_links(base, "192.168.77.0/24", "10.62.0.0/24"))
    assert report.warnings == [
        "route 192.168.77.0/24: the host routes it itself (192.168.77.0/24 dev eth1 proto 2 "
        "metric 0); picell leaves that route alone"
    ]
    assert kernel.routes[IF] == {"10.62.0.0/24"}
    for state in (with_links(base, "192.168.77.0/24", unlinking="192.168.77.0/24"), base):
        reconciler.set(state)
    lines = route_lines(kernel)
    assert not [ln for ln in lines if "192.168.77" in ln], lines
    assert_only_our_routes_touched(lines)


def test_links_in_any_order_touch_only_our_routes(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    kernel.host_routes = [DEFAULT, LAN_ROUTE, {"dst": "10.64.0.0/24", "dev": "br0"}]
    base = state_with(2, 1)
    nets = ["10.62.0.0/24", "10.63.0.0/24", "10.64.0.0/24", "192.168.77.0/24"]
    states = [with_links(base, *nets[:k], unlinking=u) for k in range(5) for u in ("", nets[0])]
    for state in states + random.Random(11).sample(states, len(states)):
        reconciler.set(state)
        want = {
            str(link.routed)
            for link in state.links
            if link.routed not in (net("10.64.0.0/24"), LAN)
        }
        assert kernel.routes.get(IF, set()) == want
        assert not reconciler.set(state).changed
    assert_only_our_routes_touched(route_lines(kernel))


# -- what the exit lends ---------------------------------------------------------------------------
def test_the_exit_lends_the_default_routes_interface_only(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    kernel.host_routes = [
        {"dst": "default", "gateway": "198.51.100.62", "dev": "eth0", "metric": 100},
        {"dst": "10.0.0.0/8", "dev": "tun0", "protocol": "4"},  # a corporate VPN
    ]
    state = state_with(1, 0)
    report = reconciler.set(state)
    assert report.uplink == ("eth0",) and report.warnings == []
    assert kernel.nft_text is not None
    assert 'ip saddr 10.61.0.0/22 oifname "eth0" ip daddr != @not_internet accept' in (
        kernel.nft_text
    )
    assert "tun0" not in kernel.nft_text and "oifname !=" not in kernel.nft_text.split("dnat")[-1]
    # the default route moves to wlan0: the next reconcile lends wlan0
    kernel.host_routes[0]["dev"] = "wlan0"
    report = reconciler.set(state)
    assert report.uplink == ("wlan0",) and report.changes[0].area == "firewall"
    assert 'oifname "wlan0" ip daddr != @not_internet accept' in kernel.nft_text


def test_without_a_default_route_nothing_is_lent(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    kernel.host_routes = [LAN_ROUTE]
    report = reconciler.set(state_with(1, 0))
    assert report.uplink == ()
    assert report.warnings == [
        "no default route and no configured uplink: the home exit and the relay lend nothing "
        "(fail closed)"
    ]
    assert report.as_dict()["warnings"] == report.warnings
    assert kernel.nft_text is not None and "@not_internet accept" not in kernel.nft_text
    assert "@not_internet masquerade" not in kernel.nft_text
    assert "no exit lends anything" in kernel.nft_text
    # a configured uplink needs no default route
    configured = dataclasses.replace(state_with(1, 0), uplink="eth7")
    report = reconciler.set(configured)
    assert report.uplink == ("eth7",) and report.warnings == []
    assert 'oifname "eth7" ip daddr != @not_internet accept' in kernel.nft_text


def test_a_relay_without_an_uplink_drops_what_it_would_relay() -> None:
    from tests.unit.test_render import exit_state

    text, _ = render_ruleset(exit_state())
    relay = text.split("chain exit_relay {")[1].split("}")[0]
    assert "accept" not in relay and "counter drop" in relay
    assert 'iifname "pcalpha0x0"' not in text.split("chain postrouting {")[1].split("}")[0]


def test_not_internet_holds_every_special_purpose_block() -> None:
    for block, name, _ in SPECIAL_PURPOSE_IPV4:
        assert any(block.subnet_of(n) for n in NOT_INTERNET), name
    assert [str(n) for n in NOT_INTERNET] == [
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24",
        "192.88.99.0/24", "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/3",
    ]  # fmt: skip
    lab = not_internet(documentation_is_internet=True)
    assert not any(d.overlaps(n) for d in DOCUMENTATION_IPV4 for n in lab)
    assert set(NOT_INTERNET) - set(lab) == set(DOCUMENTATION_IPV4)
