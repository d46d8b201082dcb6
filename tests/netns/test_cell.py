"""One real cell serving its own devices: WireGuard, nftables, Unbound, admin API and CLI.

Topology (module scope):

      ┌──────────────────── switch ns: br-inet 198.51.100.0/24 ─────────────────────┐
      │                     │                     │                                 │
  cell ns 198.51.100.1   phone ns .2          tablet ns .3                    dns ns .53
  picell serve           wg-quick up          wg-quick up                     upstream Unbound
   ├ wireguard-go        (exported config)    (exported config)               www.example.net
   ├ Unbound on 10.61.0.1:53
   ├ nft table inet picell
   ├ web backend 127.0.0.1:8000, secret listener 0.0.0.0:9999
   └ veth 203.0.113.1/24 ── lan ns 203.0.113.5 (HTTP :80 = service "files")

VPN network 10.61.0.0/24: cell .1, devices from .2 upward, services from .254 downward.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.cells import Cell, start_upstream_dns
from tests.netns.harness import Device, Netns, Topology, wait_until, wg_keypair

DOMAIN = "alpha.test"


@dataclass
class World:
    topo: Topology
    cell: Cell
    phone_ns: Netns
    tablet_ns: Netns
    lan: Netns
    phone: Device


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        cell_ns = topo.add_ns("cell")
        phone_ns = topo.add_ns("phone")
        tablet_ns = topo.add_ns("tablet")
        dns_ns = topo.add_ns("dns")
        lan = topo.add_ns("lan")
        topo.attach(cell_ns, inet, "198.51.100.1/24")
        topo.attach(phone_ns, inet, "198.51.100.2/24")
        topo.attach(tablet_ns, inet, "198.51.100.3/24")
        topo.attach(dns_ns, inet, "198.51.100.53/24")
        topo.link(cell_ns, "203.0.113.1/24", lan, "203.0.113.5/24")
        lan.run(["ip", "route", "replace", "default", "via", "203.0.113.1"])
        start_upstream_dns(dns_ns, "198.51.100.53", {"www.example.net": "192.0.2.80"},
                           topo.workdir)  # fmt: skip
        cell_ns.set_resolver("198.51.100.53")  # the cell host's upstream resolver

        cell = Cell(topo, cell_ns, "alpha", DOMAIN, "10.61.0.1/24", "198.51.100.1:51820")
        cell.init()
        cell.start()
        cell_ns.serve_http("127.0.0.1", 8000, "hello from web")
        cell_ns.serve_http("0.0.0.0", 9999, "secret")
        lan.serve_http("203.0.113.5", 80, "hello from files")
        cell.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        cell.cli("services", "add", "files", "--backend", "203.0.113.5:80")

        phone = phone_ns.device(cell.add_device("phone"), hint="phone")
        phone.up()
        yield World(topo, cell, phone_ns, tablet_ns, lan, phone)


def test_device_pings_the_cell_and_resolves_names(world: World) -> None:
    ns = world.phone_ns
    assert "nameserver 10.61.0.1" in (ns.resolv_conf() or "")
    wait_until(lambda: ns.ping("10.61.0.1"), 15, "phone cannot ping the cell")
    assert ns.dig(f"alpha.{DOMAIN}") == ["10.61.0.1"]
    assert ns.dig(f"phone.{DOMAIN}") == ["10.61.0.2"]
    assert ns.dig(f"web.{DOMAIN}") == ["10.61.0.254"]
    assert ns.dig(f"files.{DOMAIN}") == ["10.61.0.253"]
    assert ns.dig_status(f"nothing.{DOMAIN}") == "NXDOMAIN"
    # other names go to the cell host's upstream resolver
    assert ns.dig("www.example.net") == ["192.0.2.80"]


def test_device_reaches_services_by_name(world: World) -> None:
    ns = world.phone_ns
    assert ns.http_get(f"http://web.{DOMAIN}/") == "hello from web"
    assert ns.http_get(f"http://files.{DOMAIN}/") == "hello from files"


def test_only_what_the_cell_offers_is_reachable(world: World) -> None:
    ns = world.phone_ns
    wait_until(lambda: ns.ping("10.61.0.1"), 15, "phone cannot ping the cell")
    assert not ns.tcp_connect("10.61.0.1", 9999)  # a listener on the cell host
    assert not ns.tcp_connect("10.61.0.254", 9999)  # a port of a service address not offered
    assert not ns.tcp_connect("10.61.0.1", 8000)  # the web backend itself, bypassing the VIP
    assert not ns.tcp_connect("203.0.113.5", 80)  # the LAN host directly
    assert not ns.ping("203.0.113.5")
    # the cell's DNS answers the VPN, and nobody else
    assert world.tablet_ns.dig_status(f"alpha.{DOMAIN}", server="198.51.100.1") in (
        "REFUSED", "TIMEOUT"
    )  # fmt: skip


def test_device_with_its_own_key(world: World) -> None:
    private, public = wg_keypair()
    config = world.cell.add_device("tablet", "--public-key", public)
    assert "\nPrivateKey" not in config
    # the owner pastes the device's own private key in, as a stock app does with its own pair
    config = config.replace("# PrivateKey = <this device's own private key: the cell never saw it>",
                            f"PrivateKey = {private}")  # fmt: skip
    tablet = world.tablet_ns.device(config, hint="tablet")
    tablet.up()
    wait_until(lambda: world.tablet_ns.ping("10.61.0.1"), 15, "tablet cannot ping the cell")
    assert world.tablet_ns.dig(f"tablet.{DOMAIN}") == ["10.61.0.3"]
    tablet.down()


def test_removing_a_device_stops_its_traffic(world: World) -> None:
    cell, ns = world.cell, world.tablet_ns
    tablet = ns.device(cell.add_device("spare"), hint="spare")
    tablet.up()
    wait_until(lambda: ns.ping("10.61.0.1"), 15, "spare cannot ping the cell")
    session = None
    try:
        world.lan.serve_tcp_echo("203.0.113.5", 7)
        cell.cli("services", "add", "echo", "--backend", "203.0.113.5:7")
        session = ns.tcp_echo_session(f"echo.{DOMAIN}", 7)
        cell.cli("peers", "remove", "spare")
        removed_at = time.time()
        wait_until(lambda: session.silent_for(1.0), 10, "the removed device's flow goes on")
        assert not session.alive(since=removed_at + 1.0)
        assert not ns.ping("10.61.0.1", timeout_s=1)
        assert not ns.dig(f"spare.{DOMAIN}", server="10.61.0.1")
    finally:
        if session is not None:
            session.stop()
        tablet.down()
        cell.run("services", "remove", "echo", check=False)


def test_bad_input_is_refused_naming_the_field(world: World) -> None:
    cell = world.cell

    def devices() -> list[tuple[str, str]]:
        return [(p["name"], p["address"]) for p in cell.cli("peers", "list")]

    before = (devices(), cell.cli("services", "list"))
    assert cell.refused("peers", "add", "Bad_Name")["field"] == "name"
    assert cell.refused("peers", "add", "phone")["code"] == "conflict"
    assert cell.refused("peers", "add", "x", "--public-key", "abc")["field"] == "public_key"
    assert cell.refused("services", "add", "db", "--backend", "nohost:1")["field"] == "backend"
    assert cell.refused("services", "add", "web", "--backend", "127.0.0.1:1")["field"] == "name"
    assert cell.refused("peers", "remove", "ghost")["code"] == "not_found"
    assert cell.run("peers", "add", check=False).returncode == 2  # missing NAME: bad usage
    assert cell.run("bogus", check=False).returncode == 2
    assert (devices(), cell.cli("services", "list")) == before


def test_second_reconcile_changes_nothing_and_keeps_sessions(world: World) -> None:
    cell = world.cell
    wait_until(lambda: world.phone_ns.ping("10.61.0.1"), 15, "phone cannot ping the cell")
    phone_key = next(p["public_key"] for p in cell.cli("peers", "list") if p["name"] == "phone")

    def handshake() -> str:
        return next(row[4] for row in cell.wg_dump() if row[0] == phone_key)

    assert handshake() != "0"
    before = handshake()
    cell.cli("reconcile")
    report = cell.cli("reconcile")
    assert report["changed"] is False
    assert report["write_commands"] == 0
    # wg show, ip -j addr, ip -j route, nft -j (our table), nft -j list chains (other tables)
    assert report["processes"] == 5
    assert handshake() == before


def test_reconcile_touches_only_routes_of_its_own_protocol(world: World) -> None:
    """The cell host routes 192.168.77.0/24 through its LAN veth itself; a stale picell route to
    the same network (as a link removed while the daemon was down leaves it) and another to a
    network no link wants are removed by the next reconcile, and the host's route stays exactly
    as it was. The cell has no default route: its exit lends nothing, and `status` says so."""
    cell, ns = world.cell, world.cell.ns

    def routes(*dst: str) -> list[dict[str, object]]:
        out = ns.run(["ip", "-j", "-N", "-4", "route", "show", "table", "all"]).stdout
        return [r for r in json.loads(out) if r.get("dst") in dst]

    ns.run(["ip", "route", "add", "192.168.77.0/24", "via", "203.0.113.5", "proto", "static"])
    lan = routes("192.168.77.0/24")
    try:
        for net, metric in (("192.168.77.0/24", "50"), ("192.168.78.0/24", "0")):
            ns.run(["ip", "route", "add", net, "dev", cell.interface, "proto", "77",
                    "metric", metric])  # fmt: skip
        cell.cli("reconcile")  # the daemon's own periodic reconcile may have come first
        wait_until(lambda: routes("192.168.77.0/24", "192.168.78.0/24") == lan, 40,
                   "the stale picell routes did not go, or the host's route changed")  # fmt: skip
        assert lan[0]["protocol"] == "4" and lan[0]["dev"] != cell.interface
        again = cell.cli("reconcile")
        assert again["changed"] is False and routes("192.168.77.0/24") == lan
        status = cell.cli("status")["last_reconcile"]
        assert status["uplink"] == []
        assert any("no default route" in w for w in status["warnings"]), status
    finally:
        ns.run(["ip", "route", "del", "192.168.77.0/24", "proto", "static"])


def test_crashed_children_are_restarted(world: World) -> None:
    cell, phone = world.cell, world.phone_ns

    def pid_of(program: str) -> int:
        for pid in cell.ns.pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == program:
                    return pid
        raise LookupError(program)

    os.kill(pid_of("unbound"), signal.SIGKILL)
    wait_until(lambda: phone.dig(f"web.{DOMAIN}") == ["10.61.0.254"], 20, "DNS did not come back")
    old_wg = pid_of("wireguard-go")
    os.kill(old_wg, signal.SIGKILL)
    wait_until(lambda: pid_of("wireguard-go") != old_wg, 20, "wireguard-go was not restarted")
    wait_until(lambda: phone.ping("10.61.0.1"), 30, "the phone did not reach the cell again")


def test_restart_converges_from_the_store_after_drift(world: World) -> None:
    cell, ns = world.cell, world.cell.ns
    cell.kill()
    ns.run(["ip", "link", "del", cell.interface])
    ns.run(["nft", "delete", "table", "inet", "picell"])
    assert not world.phone_ns.ping("10.61.0.1", timeout_s=1)
    cell.start()
    status = cell.cli("status")
    changes = status["last_reconcile"]["changes"]
    assert any(c.startswith("interface: create") for c in changes)
    assert any(c.startswith("firewall:") for c in changes)
    # the device was never touched: it comes back by itself
    wait_until(lambda: world.phone_ns.ping("10.61.0.1"), 20, "phone lost the cell after restart")
    wait_until(lambda: world.phone_ns.http_get(f"http://web.{DOMAIN}/") == "hello from web", 10,
               "web unreachable after restart")  # fmt: skip
    assert not world.phone_ns.tcp_connect("10.61.0.1", 9999)
    assert cell.cli("reconcile")["changed"] is False


def test_defaults_and_a_second_cell_on_the_same_host(world: World) -> None:
    """A second cell, initialised with defaults but its interface name, runs beside alpha in its
    own namespace; its own device reaches it, and alpha's device still reaches alpha. A host
    service already on the web UI's default port does not keep the cell from running."""
    topo = world.topo
    beta_ns = topo.add_ns("beta")
    beta_dev_ns = topo.add_ns("betadev")
    inet = topo.bridges[0]
    topo.attach(beta_ns, inet, "198.51.100.21/24")
    topo.attach(beta_dev_ns, inet, "198.51.100.22/24")
    beta = Cell(topo, beta_ns, "", "", "", "")
    beta.run("init", "--interface", beta.interface)
    beta_ns.serve_http("127.0.0.1", 8080, "the host's own web app")
    beta.start()
    assert "web UI: cannot listen on 127.0.0.1:8080" in beta.log()
    status = beta.cli("status")
    assert status["domain"] == f"{status['name']}.internal"  # Unbound serves .internal
    assert status["endpoint"] == "198.51.100.21:51820"
    network = ipaddress.IPv4Network(status["network"])
    assert network.prefixlen == 24 and network.subnet_of(ipaddress.IPv4Network("10.0.0.0/8"))
    assert status["address"] == f"{network[1]}/24"
    beta.ip = str(network[1])
    device = beta_dev_ns.device(beta.add_device("laptop"), hint="laptop")
    device.up()
    wait_until(lambda: beta_dev_ns.ping(beta.ip), 15, "beta's device cannot reach beta")
    assert beta_dev_ns.dig(f"laptop.{status['domain']}") == [str(network[2])]
    wait_until(lambda: world.phone_ns.ping("10.61.0.1"), 15, "alpha's device lost alpha")
    beta.stop()


def test_golden_ruleset_passes_nft_check(world: World) -> None:
    """The renderer's golden files are rulesets nft itself accepts (`nft -c`, nothing applied):
    a plain cell's, and one relaying and using exits."""
    golden = Path(__file__).resolve().parent.parent / "unit" / "golden"
    for name in ("ruleset.nft", "ruleset-exits.nft"):
        world.lan.run(["nft", "-c", "-f", str(golden / name)])
