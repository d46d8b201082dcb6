"""Cells where homes really are: behind NAT with no forward, behind carrier-grade NAT, behind
routers that forward UDP 51820 and nothing else (with host names whose A records follow a new
address at night), and at home on IPv6 alone. In each, the cells link and their devices (the
real wg-quick) resolve each other's names and use a shared service.

Three topologies, one module-scoped fixture each; the internet is one flat bridge `inet`
(every namespace on it routes out of its veth without a gateway). `zone` is an authoritative DNS
for `*.homes.test` (A and AAAA, TTL 1), every cell's upstream resolver.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.netns.cells import Cell
from tests.netns.harness import Bridge, Netns, Topology, wait_until
from tests.netns.homes import Router, Zone, add_router, home_cell, plug, public_cell

DNS4, DNS6 = "198.51.100.53", "2001:db8::53"


def linked(cell: Cell, other: str) -> bool:
    link = cell.links().get(other)
    return link is not None and link["state"] == "linked"


def wg_endpoint(cell: Cell, other: Cell) -> str | None:
    """The endpoint `cell`'s WireGuard holds for `other` right now (`wg show dump`)."""
    key = other.cli("status")["public_key"]
    for row in cell.wg_dump():
        if row[0] == key:
            return None if row[2] == "(none)" else row[2]
    return None


def stored_endpoints(cell: Cell, other: str) -> tuple[str, list[str]]:
    """(endpoint, endpoints) of `cell`'s link with `other`, read from its store."""
    uri = f"file:{cell.data_dir / 'picell.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        row = db.execute(
            "SELECT endpoint, endpoints FROM links WHERE name = ?", (other,)
        ).fetchone()
    return row[0], json.loads(row[1])


def lan_host(topo: Topology, router: Router, role: str, host: int) -> Netns:
    """A namespace on `router`'s LAN at `.host` (a laptop at home), default route via it."""
    ns = topo.add_ns(role)
    plug(topo, ns, router.lan_bridge, f"{router.lan_net()[host]}/{router.lan_prefix}")
    ns.run(["ip", "route", "replace", "default", "via", router.lan_ip])
    return ns


def internet_host(topo: Topology, inet: Bridge, role: str, *addrs: str) -> Netns:
    """A namespace out on the internet (a phone on mobile data) resolving through the zone."""
    ns = topo.add_ns(role)
    plug(topo, ns, inet, *addrs, internet=True)
    ns.set_resolver(DNS4 if any(":" not in a for a in addrs) else DNS6)
    return ns


def share_web(owner: Cell, other: str, body: str) -> None:
    """`owner` serves `body` as service `web` and shares it with the linked cell `other`."""
    owner.ns.serve_http("127.0.0.1", 8000, body)
    owner.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
    owner.cli("share", other, "web")


# ============================================================================================
# Behind NAT: no forward at all, and carrier-grade NAT


@dataclass
class NatWorld:
    topo: Topology
    pub: Cell
    phone: Netns  # pub's device, on the internet
    homes: dict[str, tuple[Router, Cell, Netns]]  # name -> (its router, cell, laptop at home)


@pytest.fixture(scope="module")
def nat() -> Iterator[NatWorld]:
    """
      ┌───────────────────────── inet (flat internet bridge) ─────────────────────────┐
      │            │             │               │                        │
    pub .1       phone .11     zone .53     rnat WAN 203.0.113.2     carrier WAN 203.0.113.3
    198.51.100   pub's device  upstream     masquerade, no forward   masquerade
    10.61/24                   DNS            │ LAN 192.168.2.1/24     │ 100.64.1.1/24
                                          ┌───┴───────┐            rcgn WAN 100.64.1.2
                                       behind .10   blaptop .20    masquerade, no forward
                                       10.62/24     its device       │ LAN 192.168.3.1/24
                                                                 ┌───┴───────┐
                                                              cgn .10      claptop .20
                                                              10.63/24     its device
      Home cells init without --endpoint: their endpoint is their LAN address. Both link out to
      pub (pub's invite); pub learns their routers' (the carrier's) addresses by roaming.
    """
    with Topology() as topo:
        inet = topo.bridge("inet")
        dns = internet_host(topo, inet, "dns", f"{DNS4}/24")
        Zone(dns, (DNS4,), topo.workdir)  # the cells' upstream resolver; no names needed here
        pub = public_cell(topo, inet, "pub", ("198.51.100.1/24",), 1, DNS4,
                          endpoint="198.51.100.1:51820")  # fmt: skip
        phone = internet_host(topo, inet, "phone", "198.51.100.11/24")
        phone.device(pub.add_device("phone"), hint="phone").up()
        rnat = add_router(topo, "rnat", inet, "203.0.113.2/24", "192.168.2.1/24")
        carrier = add_router(topo, "carrier", inet, "203.0.113.3/24", "100.64.1.1/24")
        # the customer's router hangs off the carrier's side: its WAN address is 100.64.1.2
        rcgn = add_router(topo, "rcgn", carrier, "100.64.1.2/24", "192.168.3.1/24")
        homes = {}
        for router, name, number in ((rnat, "behind", 2), (rcgn, "cgn", 3)):
            cell = home_cell(topo, router, name, 10, number, DNS4)
            assert cell.endpoint == f"{router.lan_net()[10]}:51820"  # its LAN address
            laptop = lan_host(topo, router, f"{name[0]}laptop", 20)
            laptop.device(cell.add_device("laptop"), hint=f"{name[0]}lap").up()
            homes[name] = (router, cell, laptop)
        pub.ns.serve_http("127.0.0.1", 8000, "pub web")
        pub.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        yield NatWorld(topo, pub, phone, homes)


@pytest.mark.parametrize("home", ["behind", "cgn"])
def test_a_cell_behind_nat_links_out_and_devices_meet(nat: NatWorld, home: str) -> None:
    """No forward at all (or two layers of NAT): the home cell imports the public cell's invite
    and pairs out; devices on both sides resolve the other cell's names and use its service."""
    router, cell, laptop = nat.homes[home]
    out = cell.cli("connect", nat.pub.invite()["string"])
    assert out["state"] == "linked"
    wait_until(lambda: linked(nat.pub, home), 20, f"pub does not show the link with {home}")
    # the public cell learned where the home really is: its carrier's or router's address
    public_ip = "203.0.113.3" if home == "cgn" else router.wan_ip
    wait_until(lambda: (wg_endpoint(nat.pub, cell) or "").startswith(public_ip + ":"), 30,
               f"pub did not learn {home}'s public address by roaming")  # fmt: skip
    cell_ip = cell.ip
    wait_until(lambda: nat.phone.dig(f"{home}.{home}.test") == [cell_ip], 30,
               f"pub's phone cannot resolve {home}'s name")  # fmt: skip
    wait_until(lambda: nat.phone.ping(cell_ip), 20, f"pub's phone cannot reach {home}")
    wait_until(lambda: laptop.dig("pub.pub.test") == [nat.pub.ip], 20,
               f"{home}'s laptop cannot resolve pub's name")  # fmt: skip
    nat.pub.cli("share", home, "web")
    wait_until(lambda: laptop.http_get("http://web.pub.test/") == "pub web", 30,
               f"{home}'s laptop cannot use pub's web service by name")  # fmt: skip


@pytest.mark.parametrize("home", ["behind", "cgn"])
def test_a_device_added_on_the_public_side_keeps_the_roamed_endpoint(
    nat: NatWorld, home: str
) -> None:
    """`peers add` rewrites pub's WireGuard configuration (wg syncconf). The home cell's
    declared endpoint is its LAN address, which nobody outside can reach: the address
    WireGuard learned by roaming must survive, and pub must reach the home cell at once, with no
    wait for the home cell's next keepalive."""
    router, cell, _ = nat.homes[home]
    wait_until(lambda: linked(nat.pub, home), 20, f"{home} not linked (the test before failed?)")
    public_ip = "203.0.113.3" if home == "cgn" else router.wan_ip
    wait_until(lambda: (wg_endpoint(nat.pub, cell) or "").startswith(public_ip + ":"), 30,
               f"pub has not learned {home}'s public address")  # fmt: skip
    nat.pub.add_device(f"tablet{home}")
    seen = wg_endpoint(nat.pub, cell)
    assert seen is not None and seen.startswith(public_ip + ":"), (
        f"after a device was added, pub's WireGuard holds {seen} for {home}, not the address "
        f"learned by roaming ({public_ip}:…)"
    )
    # at once: one probe of three pings, no waiting for a keepalive (25 s) to roam back
    assert nat.phone.ping(cell.ip, count=3), f"pub's phone lost {home} after a device was added"


# ============================================================================================
# Two homes forwarding UDP 51820 only, with names that follow their addresses


@dataclass
class UdpWorld:
    topo: Topology
    zone: Zone
    routers: dict[str, Router]
    cells: dict[str, Cell]
    phone: Netns  # alpha's device, on the internet
    laptop: Netns  # beta's device, on the internet


@pytest.fixture(scope="module")
def udp() -> Iterator[UdpWorld]:
    """
      ┌──────────────────────────── inet (flat internet bridge) ──────────────────────────┐
      │                      │                       │                │             │
    ralpha WAN 203.0.113.11  rbeta WAN 203.0.113.12  zone .53         phone .21     laptop .22
    masquerade; UDP 51820    masquerade; UDP 51820   alpha.homes.test alpha's dev.  beta's dev.
    → 192.168.11.10 only     → 192.168.12.10 only    beta.homes.test
      │ LAN 192.168.11.1/24    │ LAN 192.168.12.1/24 (A records, TTL 1)
    alpha .10                beta .10
    10.71/24, endpoint       10.72/24, endpoint
    alpha.homes.test:51820   beta.homes.test:51820
      Neither pairing port (TCP 51821) is reachable: the owners import each other's invite.
    """
    with Topology() as topo:
        inet = topo.bridge("inet")
        dns = internet_host(topo, inet, "dns", f"{DNS4}/24")
        zone = Zone(dns, (DNS4,), topo.workdir)
        routers, cells = {}, {}
        for name, n in (("alpha", 11), ("beta", 12)):
            router = add_router(topo, f"r{name}", inet, f"203.0.113.{n}/24", f"192.168.{n}.1/24")
            router.forward_udp(51820, f"192.168.{n}.10")
            zone.set(f"{name}.homes.test", router.wan_ip)
            routers[name] = router
            cells[name] = home_cell(topo, router, name, 10, n, DNS4,
                                    endpoint=f"{name}.homes.test:51820")  # fmt: skip
        phone = internet_host(topo, inet, "phone", "198.51.100.21/24")
        laptop = internet_host(topo, inet, "laptop", "198.51.100.22/24")
        # wg-quick resolves the endpoint's name through the zone before its DNS line applies
        phone.device(cells["alpha"].add_device("phone"), hint="phone").up()
        laptop.device(cells["beta"].add_device("laptop"), hint="laptop").up()
        yield UdpWorld(topo, zone, routers, cells, phone, laptop)


def test_two_homes_forwarding_udp_only_link_over_udp_alone(udp: UdpWorld) -> None:
    alpha, beta = udp.cells["alpha"], udp.cells["beta"]
    assert alpha.cli("connect", beta.invite()["string"])["state"] == "waiting"
    assert beta.cli("connect", alpha.invite()["string"])["state"] in ("waiting", "linked")
    # each imported the other's invite: WireGuard proves mutual consent, the signed documents
    # confirm the link on both sides over the tunnel
    wait_until(lambda: linked(alpha, "beta") and linked(beta, "alpha"), 90,
               "the link did not complete over UDP alone")  # fmt: skip


def test_devices_of_two_forwarding_homes_meet(udp: UdpWorld) -> None:
    alpha, beta = udp.cells["alpha"], udp.cells["beta"]
    wait_until(lambda: udp.phone.dig("beta.beta.test") == [beta.ip], 60,
               "alpha's phone cannot resolve beta's name")  # fmt: skip
    wait_until(lambda: udp.laptop.dig("alpha.alpha.test") == [alpha.ip], 30,
               "beta's laptop cannot resolve alpha's name")  # fmt: skip
    share_web(alpha, "beta", "alpha web")
    wait_until(lambda: udp.laptop.http_get("http://web.alpha.test/") == "alpha web", 30,
               "beta's laptop cannot use alpha's web service by name")  # fmt: skip


def test_both_homes_change_address_the_same_night_and_the_link_heals(udp: UdpWorld) -> None:
    """Both routers get new public addresses at once and the names follow: neither cell can
    reach the other at the old address, so only resolving the names again (while the link is
    stale) heals the link. No owner acts."""
    alpha, beta = udp.cells["alpha"], udp.cells["beta"]
    wait_until(lambda: alpha.ns.ping(beta.ip), 60, "no tunnel before the change")
    for name, new in (("alpha", "203.0.113.31"), ("beta", "203.0.113.32")):
        udp.routers[name].move_wan(new)
        udp.zone.set(f"{name}.homes.test", new)
    wait_until(lambda: alpha.ns.ping(beta.ip) and beta.ns.ping(alpha.ip), 420,
               "the link did not heal after both addresses changed")  # fmt: skip
    assert (wg_endpoint(alpha, beta) or "").startswith("203.0.113.32:")
    assert (wg_endpoint(beta, alpha) or "").startswith("203.0.113.31:")


# ============================================================================================
# An IPv6-only home


@dataclass
class SixWorld:
    topo: Topology
    inet: Bridge
    zone: Zone
    dual: Cell
    six: Cell
    dlaptop: Netns  # dual's device (IPv4)
    sphone: Netns  # six's device (IPv6 only)


@pytest.fixture(scope="module")
def v6() -> Iterator[SixWorld]:
    """
      ┌──────────────────────── inet (flat internet bridge) ──────────────────────────┐
      │                     │                   │                 │              │
    dual 198.51.100.31    six 2001:db8::36    zone .53         dlaptop .41    sphone
    + 2001:db8::31        (no IPv4 at all)    + 2001:db8::53   dual's device  2001:db8::46
    10.81/24              10.82/24            six.homes.test                  six's device
    default endpoints:    default endpoint:   (AAAA only,                     (IPv6 only)
    both families         its IPv6 address    in the last test)
    """
    with Topology() as topo:
        inet = topo.bridge("inet")
        dns = internet_host(topo, inet, "dns", f"{DNS4}/24", f"{DNS6}/64")
        zone = Zone(dns, (DNS4, DNS6), topo.workdir)
        dual = public_cell(topo, inet, "dual", ("198.51.100.31/24", "2001:db8::31/64"), 21, DNS4)
        six = public_cell(topo, inet, "six", ("2001:db8::36/64",), 22, DNS6)
        dlaptop = internet_host(topo, inet, "dlaptop", "198.51.100.41/24")
        sphone = internet_host(topo, inet, "sphone", "2001:db8::46/64")
        dlaptop.device(dual.add_device("laptop"), hint="dlap").up()
        sphone.device(six.add_device("phone"), hint="sphone").up()
        yield SixWorld(topo, inet, zone, dual, six, dlaptop, sphone)


def test_an_ipv6_only_cell_links_by_its_ipv6_literal(v6: SixWorld) -> None:
    dual, six = v6.dual, v6.six
    # the defaults: six has no IPv4, so its endpoint is its IPv6 address; dual announces both
    assert six.endpoint == "[2001:db8::36]:51820"
    assert dual.endpoint == "198.51.100.31:51820"
    assert dual.invite()["invite"]["endpoints"] == ["198.51.100.31:51820", "[2001:db8::31]:51820"]
    # dual pairs with six's dual-stack pairing listener over IPv6
    assert dual.cli("connect", six.invite()["string"])["state"] == "linked"
    wait_until(lambda: linked(six, "dual"), 20, "six does not show the link")
    assert stored_endpoints(dual, "six") == ("[2001:db8::36]:51820", [])
    endpoint, endpoints = stored_endpoints(six, "dual")
    assert endpoints == ["198.51.100.31:51820", "[2001:db8::31]:51820"]
    wait_until(lambda: v6.sphone.dig("dual.dual.test") == [dual.ip], 30,
               "six's IPv6-only phone cannot resolve dual's name")  # fmt: skip
    wait_until(lambda: v6.dlaptop.dig("six.six.test") == [six.ip], 30,
               "dual's laptop cannot resolve six's name")  # fmt: skip
    share_web(six, "dual", "six web")
    wait_until(lambda: v6.dlaptop.http_get("http://web.six.test/") == "six web", 30,
               "dual's laptop cannot use six's web service by name")  # fmt: skip


def test_a_name_with_only_an_aaaa_record_serves_as_the_endpoint(v6: SixWorld) -> None:
    """Six moves to a new IPv6 address and announces a name that has only an AAAA record:
    dual pairs again through the name, its WireGuard reaches six there, and a new device of
    six imports a config whose endpoint is the name."""
    dual, six = v6.dual, v6.six
    wait_until(lambda: linked(dual, "six"), 20, "not linked (the test before failed?)")
    uplink = next(
        a["ifname"]
        for a in json.loads(six.ns.run(["ip", "-j", "-6", "addr", "show"]).stdout)
        if any(i.get("local") == "2001:db8::36" for i in a.get("addr_info", []))
    )
    six.ns.run(["ip", "addr", "add", "2001:db8::37/64", "dev", uplink, "nodad"])
    v6.zone.set("six.homes.test", "2001:db8::37")
    six.stop()
    six.run("init", "--endpoint", "six.homes.test:51820")
    six.start()
    six.ns.run(["ip", "addr", "del", "2001:db8::36/64", "dev", uplink])
    assert dual.cli("connect", six.invite()["string"])["state"] == "linked"
    assert stored_endpoints(dual, "six")[0] == "six.homes.test:51820"
    wait_until(lambda: (wg_endpoint(dual, six) or "").startswith("[2001:db8::37]:"), 60,
               "dual's WireGuard does not reach six at its name's AAAA address")  # fmt: skip
    wait_until(lambda: dual.ns.ping(six.ip), 30, "dual cannot reach six through the name")
    config = six.add_device("tablet")
    assert "Endpoint = six.homes.test:51820" in config
    tablet = internet_host(v6.topo, v6.inet, "stablet", "2001:db8::47/64")
    tablet.device(config, hint="stab").up()  # wg-quick resolves the name: AAAA only
    wait_until(lambda: tablet.ping(six.ip), 30, "six's new IPv6-only device cannot reach it")
    wait_until(lambda: v6.dlaptop.http_get("http://web.six.test/") == "six web", 30,
               "dual's laptop lost six's web service after the move")  # fmt: skip
