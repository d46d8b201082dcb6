"""Two homes behind NAT link through a cell both are linked with (issue 12, items 6 and 7):
introduced by it when a direct path exists, relayed by it when none does.

Topology (one per test):

  alpha's home 192.0.2.0/28            br-inet 198.51.100.0/24            gamma's home 192.0.2.16/28
  ┌────────────────────────┐                                         ┌──────────────────────────┐
  │ alpha .2  phone .3     │   alphagw                   gammagw     │ gamma .18                │
  │ 10.61.0.1/24  wg-quick ├── .1 ─ masquerade ─ .11 ─┬─ .13 ─ masquerade ─ .17 ┤ 10.63.0.1/24│
  └────────────────────────┘   no forward,            │        no forward,       └──────────────┘
                               drops unsolicited      │        drops unsolicited
                                                  beta .2 (public)
                                                  10.62.0.1/24

Both routers masquerade with no port forward and drop every unsolicited packet from outside,
so alpha and gamma cannot reach each other's declared (LAN) endpoints; both link out to beta.
In the relay test the switch also drops everything between the two routers' public addresses
(as two carrier-grade NATs would): no direct path exists, only beta's relay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tests.netns.cells import Cell, cell_on_bridge
from tests.netns.harness import Bridge, Netns, Topology, wait_until

ROUTER_RULES = """table ip home {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{wan}" masquerade
  }}
  chain forwarding {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{lan}" accept
  }}
  chain incoming {{
    type filter hook input priority filter; policy accept;
    iifname "{wan}" ct state new drop
  }}
}}
"""


@dataclass
class Home:
    cell: Cell
    phone: Netns | None
    wan: str


def home(
    topo: Topology, inet: Bridge, role: str, number: int, wan: str, first: int, phone: bool
) -> Home:
    """A cell (and a phone) on the LAN 192.0.2.<first>/28 behind a router masquerading to
    `wan`: router .<first+1>, cell .<first+2>, phone .<first+3>."""
    router = topo.add_ns(f"{role}gw")
    lan = topo.bridge(f"{role}lan")
    gateway = f"192.0.2.{first + 1}"
    wan_if = topo.attach(router, inet, f"{wan}/24")
    lan_if = topo.attach(router, lan, f"{gateway}/28")
    router.sysctl("net.ipv4.ip_forward", 1)
    router.run(["nft", "-f", "-"], input=ROUTER_RULES.format(wan=wan_if, lan=lan_if))
    ns = topo.add_ns(role)
    topo.attach(ns, lan, f"192.0.2.{first + 2}/28", gw=gateway)
    cell = Cell(topo, ns, role, f"{role}.test", f"10.{60 + number}.0.1/24",
                f"192.0.2.{first + 2}:51820")  # fmt: skip
    cell.init()
    cell.start()
    device = None
    if phone:
        device = topo.add_ns(f"{role}ph")
        topo.attach(device, lan, f"192.0.2.{first + 3}/28", gw=gateway)
        device.device(cell.add_device("phone"), hint="phone").up()
    return Home(cell, device, wan)


def linked(cell: Cell, other: str) -> bool:
    link = cell.links().get(other)
    return link is not None and link["state"] == "linked"


@dataclass
class World:
    topo: Topology
    alpha: Home
    beta: Cell
    gamma: Home


def build(topo: Topology, blocked: bool) -> World:
    inet = topo.bridge("inet")
    beta = cell_on_bridge(topo, inet, "beta", 2)
    alpha = home(topo, inet, "alpha", 1, "198.51.100.11", 0, phone=True)
    gamma = home(topo, inet, "gamma", 3, "198.51.100.13", 16, phone=False)
    if blocked:
        topo.partition(alpha.wan, gamma.wan)
    for h in (alpha, gamma):
        assert h.cell.cli("connect", beta.invite()["string"])["state"] == "linked"
    wait_until(lambda: linked(beta, "alpha") and linked(beta, "gamma"), 30,
               "beta does not show both links")  # fmt: skip
    # gamma's services: a web page and a line echo, both on its own host
    gamma.cell.ns.serve_http("127.0.0.1", 8000, "gamma web")
    gamma.cell.ns.serve_tcp_echo("127.0.0.1", 7007)
    gamma.cell.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
    gamma.cell.cli("services", "add", "echo", "--backend", "127.0.0.1:7007", "--port", "7")
    return World(topo, alpha, beta, gamma)


def _uses_gamma(world: World) -> None:
    """alpha's phone resolves gamma's shared name and uses the service through the link."""
    world.gamma.cell.cli("share", "alpha", "web")
    world.gamma.cell.cli("share", "alpha", "echo")
    phone = world.alpha.phone
    assert phone is not None
    wait_until(lambda: phone.dig("web.gamma.test") == ["10.63.0.254"], 60,
               "alpha's phone cannot resolve gamma's shared name")  # fmt: skip
    wait_until(lambda: phone.http_get("http://web.gamma.test/") == "gamma web", 30,
               "alpha's phone cannot use gamma's web service")  # fmt: skip


def test_relay_through_a_mutually_linked_cell_and_its_withdrawal() -> None:
    with Topology() as topo:
        world = build(topo, blocked=True)
        alpha, beta, gamma = world.alpha.cell, world.beta, world.gamma.cell
        # refused before beta offers: naming beta, field via
        refused = alpha.refused("connect", gamma.invite()["string"], "--via", "beta")
        assert refused["field"] == "via" and "beta" in refused["message"]
        beta.cli("relay-offer", "alpha", "on")
        beta.cli("relay-offer", "gamma", "on")
        for h in (alpha, gamma):
            wait_until(lambda h=h: h.links()["beta"]["remote_relay_offered"], 30,
                       f"{h.name} does not see beta's relay offer")  # fmt: skip
        alpha.cli("connect", gamma.invite()["string"], "--via", "beta")
        gamma.cli("connect", alpha.invite()["string"], "--via", "beta")
        wait_until(lambda: linked(alpha, "gamma") and linked(gamma, "alpha"), 120,
                   "alpha and gamma do not link through beta's relay")  # fmt: skip
        view = alpha.links()["gamma"]
        assert view["via"] == "beta" and view["path"] == "via beta", view
        assert gamma.links()["alpha"]["via"] == "beta"
        _uses_gamma(world)
        # beta relays WireGuard: the pair's traffic passed through beta's relay rules
        ruleset = beta.ns.run(["nft", "list", "table", "inet", "picell"]).stdout
        assert 'comment "relay alpha -> gamma"' in ruleset

        assert world.alpha.phone is not None
        session = world.alpha.phone.tcp_echo_session("echo.gamma.test", 7)
        beta.cli("relay-offer", "gamma", "off")
        cut = time.monotonic()
        wait_until(lambda: session.silent_for(3.0), 20, "the relayed flow survived the withdrawal")
        assert not session.alive(since=cut + 1.0)
        wait_until(lambda: alpha.links()["gamma"]["relay_note"] is not None, 60,
                   "alpha does not say why the relayed link waits")  # fmt: skip
        assert "beta" in alpha.links()["gamma"]["relay_note"]
        assert 'relay alpha -> gamma' not in beta.ns.run(
            ["nft", "list", "table", "inet", "picell"]).stdout  # fmt: skip


def test_introduction_links_two_homes_directly() -> None:
    with Topology() as topo:
        world = build(topo, blocked=False)
        alpha, beta, gamma = world.alpha.cell, world.beta, world.gamma.cell
        # each imports the other's invite: the pairing ports are unreachable, both wait
        assert alpha.cli("connect", gamma.invite()["string"])["state"] == "waiting"
        assert gamma.cli("connect", alpha.invite()["string"])["state"] == "waiting"
        wait_until(lambda: linked(alpha, "gamma") and linked(gamma, "alpha"), 180,
                   "alpha and gamma do not link with beta's introduction")  # fmt: skip
        view = alpha.links()["gamma"]
        assert view["via"] is None and view["path"] in ("introduced by beta", "direct"), view
        # the tunnel runs between the two routers' public addresses, not through beta
        peer = {row[0]: row for row in alpha.wg_dump()}[view["public_key"]]
        assert peer[2].startswith(world.gamma.wan + ":"), peer
        _uses_gamma(world)
        assert not beta.ns.run(["nft", "list", "table", "inet", "picell"]).stdout.count("relay ")
