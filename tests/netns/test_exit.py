"""Exit relay (DESIGN §8): a device of alpha browses the internet through linked cell beta,
another through charlie at the same time, a third through alpha itself; fail-closed when the
exit goes away, no DNS leak, and the relay lends nothing but its internet.

Topology (module scope):

                        inet ns: router, ip_forward; on lo: 192.0.2.80 (oracle: HTTP :80
                        answers the caller's address, echo :7), 192.0.2.53 (DNS, logs who asks)
        ┌───────────────────────┬──────┴──────────────────┬─────────────────────────┐
  198.51.100.1/26 (gw .62)  198.51.100.65/26 (gw .126)  198.51.100.129/26 (gw .190)  br-dev
  alpha ns: picell alpha    beta ns: picell beta       charlie ns: picell charlie  198.51.100.192/26
  10.61.0.1/24 alpha.test   10.62.0.1/24 beta.test     10.63.0.1/24 charlie.test   router .254
                            │ veth 203.0.113.1/24                                   │
                            lan ns 203.0.113.5 (HTTP :80)        phone .193, laptop .194, pad .195,
                                                                 tablet .196 (beta's device)

phone routes via beta, laptop via charlie, pad (full tunnel, no route-via) via alpha itself.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from picell.constants import LAB_INTERNET_ENV
from picell.routing.exits import exit_ifname
from tests.netns.cells import Cell
from tests.netns.harness import Netns, Proc, Topology, wait_until

ORACLE = "192.0.2.80"
UPLINK = {"alpha": "198.51.100.1", "beta": "198.51.100.65", "charlie": "198.51.100.129"}


@dataclass
class World:
    topo: Topology
    alpha: Cell
    beta: Cell
    charlie: Cell
    inet: Netns
    phone: Netns
    laptop: Netns
    pad: Netns
    tablet: Netns
    oracle: Proc
    dns_log: Path

    def seen(self, path_prefix: str) -> list[str]:
        """Source addresses the oracle saw for requests whose path starts with the prefix."""
        lines = [ln.split() for ln in self.oracle.log_text().splitlines()]
        return [f[0] for f in lines if len(f) > 2 and f[2].startswith(path_prefix)]

    def asked(self, name: str) -> list[str]:
        """Addresses that asked the internet's DNS for `name`."""
        text = self.dns_log.read_text() if self.dns_log.exists() else ""
        return re.findall(rf"info: (\S+) {re.escape(name)}\. A IN", text)


def _cell(topo: Topology, inet: Netns, role: str, n: int) -> Cell:
    ns = topo.add_ns(role)
    base = 64 * (n - 1)
    topo.link(ns, f"198.51.100.{base + 1}/26", inet, f"198.51.100.{base + 62}/26")
    ns.run(["ip", "route", "add", "default", "via", f"198.51.100.{base + 62}"])
    ns.set_resolver("192.0.2.53")
    cell = Cell(topo, ns, role, f"{role}.test", f"10.{60 + n}.0.1/24",
                f"198.51.100.{base + 1}:51820")  # fmt: skip
    cell.init()
    cell.start()
    return cell


def _internet_dns(inet: Netns, workdir: Path) -> tuple[Proc, Path]:
    log = workdir / "internet-dns.log"
    conf = workdir / "internet-dns.conf"
    names = ["www.example.net", "via-beta.example.net", "via-charlie.example.net",
             "via-alpha.example.net", "closed.example.net"]  # fmt: skip
    lines = ["server:", '\tusername: ""', '\tchroot: ""', f'\tdirectory: "{workdir}"',
             '\tpidfile: ""', "\tuse-syslog: no", f'\tlogfile: "{log}"', "\tlog-queries: yes",
             "\tinterface: 192.0.2.53", "\taccess-control: 0.0.0.0/0 allow",
             '\tlocal-zone: "." static']  # fmt: skip
    lines += [f'\tlocal-data: "{n}. 60 IN A {ORACLE}"' for n in names]
    conf.write_text("\n".join(lines) + "\n")
    proc = inet.popen(["unbound", "-d", "-p", "-c", str(conf)], name="internet-dns")
    wait_until(lambda: inet.dig("www.example.net", server="192.0.2.53") == [ORACLE], 15,
               "the internet's DNS is not up")  # fmt: skip
    return proc, log


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    # this topology's internet is made of documentation ranges (the only public addresses a
    # test may use), which an exit never lends on a real host: the cells' daemons (started
    # with this environment) lend them here, and still no other special-purpose range
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
        oracle = inet.serve_http(ORACLE, 80, "@caller")
        inet.serve_tcp_echo(ORACLE, 7)
        _, dns_log = _internet_dns(inet, topo.workdir)
        dev = topo.bridge("dev")
        topo.attach(inet, dev, "198.51.100.254/26")
        devices = {}
        for i, role in enumerate(("phone", "laptop", "pad", "tablet")):
            devices[role] = topo.add_ns(role)
            topo.attach(devices[role], dev, f"198.51.100.{193 + i}/26", gw="198.51.100.254")
        alpha = _cell(topo, inet, "alpha", 1)
        beta = _cell(topo, inet, "beta", 2)
        charlie = _cell(topo, inet, "charlie", 3)
        lan = topo.add_ns("lan")
        topo.link(beta.ns, "203.0.113.1/24", lan, "203.0.113.5/24")
        lan.run(["ip", "route", "replace", "default", "via", "203.0.113.1"])
        lan.serve_http("203.0.113.5", 80, "beta's lan")
        beta.ns.serve_http("127.0.0.1", 8000, "beta web")
        beta.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        alpha.cli("connect", beta.invite()["string"])
        alpha.cli("connect", charlie.invite()["string"])
        for role in ("phone", "laptop", "pad"):
            alpha.add_device(role)
        devices["tablet"].device(beta.add_device("tablet"), hint="tablet").up()
        for other in (beta, charlie):
            wait_until(lambda o=other: alpha.ns.ping(o.ip), 20, f"alpha cannot reach {other.name}")
        yield World(topo, alpha, beta, charlie, inet, devices["phone"], devices["laptop"],
                    devices["pad"], devices["tablet"], oracle, dns_log)  # fmt: skip


def offers(world: World, cell: str) -> bool:
    return bool(world.alpha.links()[cell]["remote_exit_offered"])


def exit_of(world: World, ns: Netns, tag: str) -> str | None:
    """The address the oracle saw for one request from `ns` (path /<tag>-<n>)."""
    return ns.http_get(f"http://{ORACLE}/{tag}-{time.monotonic_ns()}", timeout_s=2)


def leaves_through(
    ns: Netns, w: World, cell: str, timeout_s: float, message: str, tag: str | None = None
) -> None:
    """Wait until a request from `ns` reaches the oracle from `cell`'s uplink address."""
    path = tag or ns.role
    wait_until(lambda: exit_of(w, ns, path) == UPLINK[cell], timeout_s, message)


@pytest.fixture(scope="module")
def routed(world: World) -> World:
    """phone via beta, laptop via charlie, pad full tunnel via alpha: each imports the config
    the owner was given."""
    alpha = world.alpha
    refused = alpha.refused("route-via", "phone", "beta")
    assert refused["code"] == "exit_not_offered" and "beta" in refused["message"]
    assert refused["field"] == "via_cell"
    world.beta.cli("exit-offer", "alpha", "on")
    world.charlie.cli("exit-offer", "alpha", "on")
    wait_until(lambda: offers(world, "beta") and offers(world, "charlie"), 15,
               "alpha did not learn of the exit offers")  # fmt: skip
    phone = alpha.cli("route-via", "phone", "beta")
    assert phone["route_via"] == "beta" and "AllowedIPs = 0.0.0.0/0, ::/0" in phone["config"]
    assert "full-tunnel" in phone["message"]
    world.phone.device(phone["config"], hint="phone").up()
    laptop = alpha.cli("route-via", "laptop", "charlie")
    world.laptop.device(laptop["config"], hint="laptop").up()
    pad = alpha.run("peers", "config", "pad", "--full-tunnel").stdout
    assert "AllowedIPs = 0.0.0.0/0, ::/0" in pad
    world.pad.device(pad, hint="pad").up()
    return world


def test_each_device_leaves_through_its_own_exit(routed: World) -> None:
    w = routed
    leaves_through(w.phone, w, "beta", 30, "the phone's traffic does not leave through beta")
    leaves_through(
        w.laptop, w, "charlie", 30, "the laptop's traffic does not leave through charlie"
    )
    leaves_through(w.pad, w, "alpha", 30, "the pad's traffic does not leave through alpha")
    assert set(w.seen("/phone")) == {UPLINK["beta"]}
    assert set(w.seen("/laptop")) == {UPLINK["charlie"]}
    # the routed phone still reaches its own cell and what linked cells share, by name
    assert w.phone.dig("phone.alpha.test") == ["10.61.0.2"]
    w.beta.cli("share", "alpha", "web")
    wait_until(lambda: w.phone.http_get("http://web.beta.test/") == "beta web", 15,
               "the routed phone cannot use beta's shared service")  # fmt: skip
    links = w.beta.links()["alpha"]
    assert links["relaying"] and links["remote_exit_relay_active"]
    assert w.alpha.links()["beta"]["exit_relay_active"]


def test_lookups_leave_where_the_traffic_leaves(routed: World) -> None:
    w = routed
    wait_until(lambda: w.phone.dig("via-beta.example.net") == [ORACLE], 20,
               "the phone cannot resolve internet names through beta")  # fmt: skip
    assert w.laptop.dig("via-charlie.example.net") == [ORACLE]
    assert w.pad.dig("via-alpha.example.net") == [ORACLE]
    assert set(w.asked("via-beta.example.net")) == {UPLINK["beta"]}
    assert set(w.asked("via-charlie.example.net")) == {UPLINK["charlie"]}
    assert set(w.asked("via-alpha.example.net")) == {UPLINK["alpha"]}


def test_the_relay_lends_only_its_internet(routed: World) -> None:
    w = routed
    leaves_through(w.phone, w, "beta", 30, "no exit via beta")
    assert w.tablet.ping("10.62.0.1")  # beta's own device is up and reachable at home
    assert not w.phone.ping("10.62.0.2", timeout_s=1)  # beta's device
    assert not w.phone.tcp_connect("203.0.113.5", 80)  # beta's LAN host
    assert not w.phone.tcp_connect(UPLINK["beta"], 51821)  # beta's own pairing port
    assert not w.phone.tcp_connect("10.62.0.1", 8000)  # a port of beta's host


def test_exits_lend_only_the_default_routes_interface_and_no_special_range(
    routed: World,
) -> None:
    """Alpha's host also reaches 192.0.2.99 through a second interface (a corporate VPN's, say)
    and 198.18.0.80 (a benchmarking address, IANA special-purpose) through its uplink. Neither
    is lent: not to the pad (alpha as home exit), not to the phone (beta as relay).

        corp ns 192.0.2.99 (HTTP) ── veth 192.0.2.128/30 ── alpha ── uplink ── inet ns 198.18.0.80
    """
    w = routed
    alpha = w.alpha
    corp = w.topo.add_ns("corp")
    corp.run(["ip", "addr", "add", "192.0.2.99/32", "dev", "lo"])
    w.topo.link(alpha.ns, "192.0.2.129/30", corp, "192.0.2.130/30")
    corp.run(["ip", "route", "add", "default", "via", "192.0.2.129"])
    alpha.ns.run(["ip", "route", "add", "192.0.2.99/32", "via", "192.0.2.130"])
    corp.serve_http("192.0.2.99", 80, "corp")
    w.inet.run(["ip", "addr", "add", "198.18.0.80/32", "dev", "lo"])
    w.inet.serve_http("198.18.0.80", 80, "bench")
    assert alpha.ns.http_get("http://192.0.2.99/") == "corp"  # the host itself reaches both
    assert alpha.ns.http_get("http://198.18.0.80/") == "bench"
    leaves_through(w.pad, w, "alpha", 30, "no home exit via alpha", tag="pad-lend")
    leaves_through(w.phone, w, "beta", 30, "no exit via beta", tag="phone-lend")
    assert w.pad.http_get("http://192.0.2.99/", timeout_s=2) is None
    assert w.pad.http_get("http://198.18.0.80/", timeout_s=2) is None
    assert w.phone.http_get("http://198.18.0.80/", timeout_s=2) is None
    out = alpha.ns.run(["ip", "-j", "route", "show", "default"]).stdout
    uplink = json.loads(out)[0]["dev"]
    assert alpha.cli("status")["last_reconcile"]["uplink"] == [uplink]


def test_withdrawn_offer_fails_closed_and_returns(routed: World) -> None:
    w = routed
    leaves_through(w.phone, w, "beta", 30, "no exit via beta")
    session = w.phone.tcp_echo_session(ORACLE, 7)
    w.beta.cli("exit-offer", "alpha", "off")
    wait_until(lambda: session.silent_for(1.0), 10, "an established flow kept going")
    assert exit_of(w, w.phone, "phone-closed") is None
    assert w.phone.dig_status("closed.example.net") != "NOERROR"
    wait_until(lambda: not offers(w, "beta"), 10, "alpha did not learn of the withdrawal")
    assert exit_of(w, w.phone, "phone-closed") is None
    assert w.seen("/phone-closed") == []  # never leaked through alpha's uplink
    assert w.asked("closed.example.net") == []
    assert exit_of(w, w.laptop, "laptop") == UPLINK["charlie"]  # the other exit is untouched
    w.beta.cli("exit-offer", "alpha", "on")
    leaves_through(w.phone, w, "beta", 30, "the phone did not come back through beta")


def test_exit_down_fails_closed_and_everything_returns_after_restarts(routed: World) -> None:
    w = routed
    leaves_through(w.phone, w, "beta", 30, "no exit via beta")
    w.beta.stop()  # its daemon stops; its tunnels outlive it: the exit keeps working
    leaves_through(w.phone, w, "beta", 30, "the exit via beta died with beta's daemon")
    # beta's tunnels go down too (its host reboots, say): the phone's exit fails closed
    for ifname in [w.beta.interface, *(exit_ifname(w.beta.interface, s) for s in range(4))]:
        w.beta.ns.run(["ip", "link", "del", "dev", ifname], check=False)
    assert exit_of(w, w.phone, "phone-down") is None
    assert w.seen("/phone-down") == []
    w.beta.start()
    leaves_through(
        w.phone, w, "beta", 60, "the phone did not come back through beta after its restart"
    )
    w.alpha.stop()
    w.alpha.start()
    leaves_through(w.phone, w, "beta", 60, "the phone lost its exit after alpha's restart")
    leaves_through(w.laptop, w, "charlie", 60, "the laptop lost its exit after alpha's restart")
    leaves_through(w.pad, w, "alpha", 60, "the pad lost its home exit after alpha's restart")
    assert w.seen("/phone-down") == []


def test_route_via_none_makes_the_cell_the_home_exit(routed: World) -> None:
    w = routed
    data = w.alpha.cli("route-via", "laptop", "none")
    assert data["route_via"] is None
    leaves_through(
        w.laptop, w, "alpha", 20, "the laptop does not leave through alpha", tag="laptop-home"
    )
    wait_until(lambda: not w.charlie.links()["alpha"]["relaying"], 10, "charlie still relays")
    w.alpha.cli("route-via", "laptop", "charlie")
    leaves_through(w.laptop, w, "charlie", 30, "the laptop did not go back to charlie")


def test_a_second_reconcile_changes_nothing_on_either_side(routed: World) -> None:
    w = routed
    leaves_through(w.phone, w, "beta", 30, "no exit via beta")
    for cell in (w.alpha, w.beta):
        cell.cli("reconcile")
        report = cell.cli("reconcile")
        assert report["changed"] is False, (cell.name, report["changes"])
        assert report["write_commands"] == 0, (cell.name, report["commands"])
