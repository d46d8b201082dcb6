"""Overlapping networks, linked without renumbering (issue 15, `picell.mesh.mapping`): three
cells on the same 10.60.0.0/24 link pairwise. Each presents the other two at free blocks of
10/8 and tells them where (their `seen_as`); devices that imported their configs with wg-quick
resolve and use what each pair shares, at the translated addresses; the serving side still
decides: what it does not share stays shut, unsharing cuts an established flow, and an exit
through an overlapping cell fails closed when its offer goes.

Topology (module scope):

                  inet ns: router, ip_forward; on lo: 192.0.2.80 (oracle: HTTP :80 answers the
                  caller's address, echo :7), 192.0.2.53 (the internet's DNS)
        ┌────────────────────────┬───────┴────────────────┬──────────────────────────┐
  198.51.100.1/26 (gw .62)  198.51.100.65/26 (gw .126)  198.51.100.129/26 (gw .190)  br-dev
  alpha ns: picell alpha    beta ns: picell beta        gamma ns: picell gamma      .192/26
  10.60.0.1/24 alpha.test   10.60.0.1/24 beta.test      10.60.0.1/24 gamma.test     router .254
  web 127.0.0.1:8000 (the   wiki 127.0.0.1:8000         files 127.0.0.1:8000         │
  caller's address), echo                                                phone .193 (alpha's),
  127.0.0.1:7                                                            pad .194 (alpha's, via
                                                                         beta), laptop .195
                                                                         (beta's), tablet .196
                                                                         (gamma's)
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from picell.constants import LAB_INTERNET_ENV
from picell.mesh.mapping import translate
from tests.netns.cells import Cell, sample, scrape_metrics
from tests.netns.harness import Netns, Topology, wait_until
from tests.netns.hostile import lan_link

ORACLE = "192.0.2.80"
NET = "10.60.0.0/24"
LAN_VPN = "192.168.77.1/24"  # delta's VPN network: alpha's LAN, outside the 10/8 devices route
UPLINK = {"alpha": "198.51.100.1", "beta": "198.51.100.65", "gamma": "198.51.100.129"}
VIP_TOP, VIP_NEXT = 254, 253  # the first and second service of a cell (from the top down)


@dataclass
class World:
    topo: Topology
    cells: dict[str, Cell]
    devices: dict[str, Netns]

    def presented(self, at: str, other: str) -> ipaddress.IPv4Network:
        """Where cell `at` presents `other`'s network (its `mapped_subnet`, else as it is)."""
        shown = self.cells[at].links()[other]
        return ipaddress.IPv4Network(shown["mapped_subnet"] or shown["vpn_subnet"])

    def address(self, at: str, other: str, host: int) -> str:
        """Host `host` of `other`'s network, as cell `at` (and its devices) reach it."""
        real = ipaddress.IPv4Interface(self.cells[other].address).network
        return str(translate(real.network_address + host, real, self.presented(at, other)))


def _cell(
    topo: Topology,
    inet: Netns,
    role: str,
    n: int,
    net: str = "198.51.100",
    vpn: str = "10.60.0.1/24",
) -> Cell:
    ns = topo.add_ns(role)
    base = 64 * (n - 1)
    topo.link(ns, f"{net}.{base + 1}/26", inet, f"{net}.{base + 62}/26")
    ns.run(["ip", "route", "add", "default", "via", f"{net}.{base + 62}"])
    ns.set_resolver("192.0.2.53")
    cell = Cell(topo, ns, role, f"{role}.test", vpn, f"{net}.{base + 1}:51820")
    cell.init()
    cell.start()
    return cell


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    # this topology's internet is made of documentation ranges, which an exit lends only in a
    # lab (the daemons started with this environment)
    previous = os.environ.get(LAB_INTERNET_ENV)
    os.environ[LAB_INTERNET_ENV] = "1"
    try:
        yield from _world()
    finally:
        if previous is None:
            os.environ.pop(LAB_INTERNET_ENV, None)
        else:
            os.environ[LAB_INTERNET_ENV] = previous


def _world() -> Iterator[World]:
    with Topology() as topo:
        inet = topo.add_ns("inet")
        inet.sysctl("net.ipv4.ip_forward", 1)
        for addr in (ORACLE, "192.0.2.53"):
            inet.run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
        inet.serve_http(ORACLE, 80, "@caller")
        inet.serve_tcp_echo(ORACLE, 7)
        conf = topo.workdir / "internet-dns.conf"
        conf.write_text(
            "\n".join(["server:", '\tusername: ""', '\tchroot: ""',
                       f'\tdirectory: "{topo.workdir}"',
                       '\tpidfile: ""', "\tuse-syslog: no", "\tinterface: 192.0.2.53",
                       "\taccess-control: 0.0.0.0/0 allow", '\tlocal-zone: "." static',
                       f'\tlocal-data: "www.example.net. 60 IN A {ORACLE}"']) + "\n"
        )  # fmt: skip
        inet.popen(["unbound", "-d", "-p", "-c", str(conf)], name="internet-dns")
        wait_until(lambda: inet.dig("www.example.net", server="192.0.2.53") == [ORACLE], 15,
                   "the internet's DNS is not up")  # fmt: skip
        dev = topo.bridge("dev")
        topo.attach(inet, dev, "198.51.100.254/26")
        devices = {}
        for i, role in enumerate(("phone", "pad", "laptop", "tablet")):
            devices[role] = topo.add_ns(role)
            topo.attach(devices[role], dev, f"198.51.100.{193 + i}/26", gw="198.51.100.254")
        cells = {name: _cell(topo, inet, name, n + 1)
                 for n, name in enumerate(("alpha", "beta", "gamma"))}  # fmt: skip
        alpha, beta, gamma = cells["alpha"], cells["beta"], cells["gamma"]
        # alpha's LAN, and delta, whose network is that LAN (and outside 10/8)
        lan = topo.add_ns("lan")
        lan_link(topo, alpha.ns, "192.168.77.1/24", lan, "192.168.77.5/24")
        lan.run(["ip", "route", "replace", "default", "via", "192.168.77.1"])
        lan.serve_http("192.168.77.5", 80, "alpha lan")
        cells["delta"] = delta = _cell(topo, inet, "delta", 1, "203.0.113", LAN_VPN)
        delta.ns.serve_http("127.0.0.1", 8000, "delta photos")
        delta.cli("services", "add", "photos", "--backend", "127.0.0.1:8000", "--port", "80")
        alpha.ns.serve_http("127.0.0.1", 8000, "@caller")
        alpha.ns.serve_tcp_echo("127.0.0.1", 7)
        beta.ns.serve_http("127.0.0.1", 8000, "beta wiki")
        gamma.ns.serve_http("127.0.0.1", 8000, "gamma files")
        alpha.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        alpha.cli("services", "add", "echo", "--backend", "127.0.0.1:7")
        alpha.cli("services", "add", "nas", "--backend", "192.168.77.5:80")  # on alpha's LAN
        beta.cli("services", "add", "wiki", "--backend", "127.0.0.1:8000", "--port", "80")
        gamma.cli("services", "add", "files", "--backend", "127.0.0.1:8000", "--port", "80")
        devices["phone"].device(alpha.add_device("phone"), hint="phone").up()
        alpha.add_device("pad")  # routed via beta later: it imports the config it is given then
        devices["laptop"].device(beta.add_device("laptop"), hint="laptop").up()
        devices["tablet"].device(gamma.add_device("tablet"), hint="tablet").up()
        alpha.cli("connect", beta.invite()["string"])
        alpha.cli("connect", gamma.invite()["string"])
        alpha.cli("connect", delta.invite()["string"])
        beta.cli("connect", gamma.invite()["string"])
        w = World(topo, cells, devices)
        for a, b in (("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma"), ("alpha", "delta")):
            for x, y in ((a, b), (b, a)):
                wait_until(lambda x=x, y=y: cells[x].ns.ping(w.address(x, y, 1)), 30,
                           f"{x} cannot reach {y} where it presents it")  # fmt: skip
        alpha.cli("share", "beta", "web", "echo")
        alpha.cli("share", "gamma", "web")
        beta.cli("share", "alpha", "wiki")
        beta.cli("share", "gamma", "wiki")
        gamma.cli("share", "alpha", "files")
        delta.cli("share", "alpha", "photos")
        yield w


def test_three_cells_on_one_network_each_present_the_others_apart(world: World) -> None:
    own = ipaddress.IPv4Network(NET)
    for name in ("alpha", "beta", "gamma"):
        cell = world.cells[name]
        shown = {k: v for k, v in cell.links().items() if k != "delta"}
        blocks = [ipaddress.IPv4Network(c["mapped_subnet"]) for c in shown.values()]
        assert len(blocks) == 2 and not blocks[0].overlaps(blocks[1]), (name, blocks)
        assert all(b.subnet_of(ipaddress.IPv4Network("10.0.0.0/8")) for b in blocks)
        assert not any(b.overlaps(own) for b in blocks)
        for other, c in shown.items():
            assert c["vpn_subnet"] == NET  # the network the other cell announces, as it is
            # where the other cell presents us: its word, in its signed messages
            assert c["seen_as"] == world.cells[other].links()[name]["mapped_subnet"]
    # the CLI shows it next to the network (human output)
    out = world.cells["alpha"].run("cells").stdout
    assert f"{NET} as {world.presented('alpha', 'beta')}" in out


def test_each_pairs_devices_resolve_and_use_what_is_shared(world: World) -> None:
    w, dev = world, world.devices
    laptop, phone, tablet = dev["laptop"], dev["phone"], dev["tablet"]
    web_for_beta = w.address("beta", "alpha", VIP_TOP)
    wait_until(lambda: laptop.dig("web.alpha.test") == [web_for_beta], 15,
               "beta's laptop does not resolve alpha's web where beta presents alpha")  # fmt: skip
    # alpha's web answers with the caller's address: beta's laptop, where alpha presents beta
    caller = laptop.http_get("http://web.alpha.test/")
    assert caller is not None and ipaddress.IPv4Address(caller) in w.presented("alpha", "beta")
    assert laptop.dig("alpha.test") == [w.address("beta", "alpha", 1)]
    wait_until(lambda: phone.http_get("http://wiki.beta.test/") == "beta wiki", 15,
               "alpha's phone cannot use beta's wiki by name")  # fmt: skip
    wait_until(lambda: phone.http_get("http://files.gamma.test/") == "gamma files", 15,
               "alpha's phone cannot use gamma's files by name")  # fmt: skip
    wait_until(lambda: tablet.http_get("http://wiki.beta.test/") == "beta wiki", 15,
               "gamma's tablet cannot use beta's wiki by name")  # fmt: skip
    caller = tablet.http_get("http://web.alpha.test/")
    assert caller is not None and ipaddress.IPv4Address(caller) in w.presented("alpha", "gamma")
    # what is not shared stays shut: gamma shares nothing with beta; alpha's echo not with gamma
    assert laptop.dig_status("files.gamma.test") == "NXDOMAIN"
    assert not laptop.tcp_connect(w.address("beta", "gamma", VIP_TOP), 80)
    assert not tablet.tcp_connect(w.address("gamma", "alpha", VIP_NEXT), 7)
    # nor does a linked cell reach the other's devices (alpha's phone is 10.60.0.2 at alpha)
    assert not laptop.tcp_connect(w.address("beta", "alpha", 2), 22, timeout_s=1)


def test_unsharing_cuts_an_established_flow_through_the_translation(world: World) -> None:
    alpha, laptop = world.cells["alpha"], world.devices["laptop"]
    session = laptop.tcp_echo_session("echo.alpha.test", 7)
    wait_until(lambda: session.alive(since=time.monotonic() - 0.5), 10, "no echo through alpha")
    alpha.cli("unshare", "beta", "echo")
    cut = time.monotonic()
    wait_until(lambda: session.silent_for(1.0), 10, "the flow survived the unshare")
    assert not session.alive(since=cut + 0.5)
    alpha.cli("share", "beta", "echo")


def test_an_exit_through_an_overlapping_cell_fails_closed(world: World) -> None:
    alpha, beta, pad = world.cells["alpha"], world.cells["beta"], world.devices["pad"]
    beta.cli("exit-offer", "alpha", "on")
    wait_until(lambda: alpha.links()["beta"]["remote_exit_offered"], 15,
               "alpha did not learn of beta's offer")  # fmt: skip
    pad.device(alpha.cli("route-via", "pad", "beta")["config"], hint="pad").up()
    wait_until(lambda: pad.http_get(f"http://{ORACLE}/pad", timeout_s=2) == UPLINK["beta"], 30,
               "the pad's traffic does not leave through beta")  # fmt: skip
    assert pad.dig("www.example.net") == [ORACLE]  # its lookups leave through beta too
    session = pad.tcp_echo_session(ORACLE, 7)
    wait_until(lambda: session.alive(since=time.monotonic() - 0.5), 10, "no echo via beta")
    beta.cli("exit-offer", "alpha", "off")
    wait_until(lambda: session.silent_for(1.0), 10, "an established flow kept going")
    wait_until(lambda: not alpha.links()["beta"]["remote_exit_offered"], 15,
               "alpha did not learn of the withdrawal")  # fmt: skip
    # fail closed: nothing leaves, through beta or through alpha's own uplink
    assert pad.http_get(f"http://{ORACLE}/pad-closed", timeout_s=2) is None
    # and what beta shares with alpha still works for alpha's other devices
    assert world.devices["phone"].http_get("http://wiki.beta.test/") == "beta wiki"


def test_doctor_and_metrics_know_the_translation(world: World) -> None:
    alpha, beta = world.cells["alpha"], world.cells["beta"]
    proc = alpha.run("doctor", "--from", "phone", "--to", "beta/wiki", "--json", check=False,
                     timeout=120)  # fmt: skip
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], report
    [step] = [s for s in report["steps"] if s["name"] == "translation beta"]
    assert step["status"] == "pass" and str(world.presented("alpha", "beta")) in step["finding"]
    proc = beta.run("doctor", "--from", "alpha", "--to", "wiki", "--json", check=False,
                    timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout  # the grant and the view, as alpha presents beta
    token = alpha.cli("metrics", "token", "--rotate")["token"]
    status, body = scrape_metrics(world.devices["phone"], "http://10.60.0.1:9469/metrics", token)
    assert status == 200, body
    for side in ("ours", "theirs"):
        assert sample(body, f'picell_link_translated{{cell="beta",side="{side}"}}') == 1


def test_a_cell_on_our_hosts_lan_is_mapped_and_the_lan_stays_ours(world: World) -> None:
    """delta's network is alpha's LAN (192.168.77.0/24, outside the 10/8 devices route): alpha
    presents it inside 10/8, its LAN route stays on the LAN, and alpha's phone reaches both
    delta's photos and alpha's own LAN service."""
    alpha, phone = world.cells["alpha"], world.devices["phone"]
    presented = world.presented("alpha", "delta")
    assert presented.subnet_of(ipaddress.IPv4Network("10.0.0.0/8"))
    assert alpha.links()["delta"]["vpn_subnet"] == "192.168.77.0/24"
    routes = alpha.ns.run(["ip", "-4", "route", "show", "192.168.77.0/24"]).stdout
    assert routes.count("\n") == 1 and "proto 77" not in routes, routes  # the LAN's own
    wait_until(lambda: phone.http_get("http://photos.delta.test/") == "delta photos", 15,
               "alpha's phone cannot use delta's photos by name")  # fmt: skip
    assert phone.http_get("http://nas.alpha.test/") == "alpha lan"
    # delta does not map alpha (10.60.0.0/24 is free there): it sees alpha as it is
    assert world.cells["delta"].links()["alpha"]["mapped_subnet"] is None
    assert alpha.links()["delta"]["seen_as"] is None
