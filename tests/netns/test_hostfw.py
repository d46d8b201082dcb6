"""Living beside the host's firewall (issue 13): with Docker's typical iptables-nft ruleset
(`ip filter FORWARD` policy drop, DOCKER-USER, DOCKER-ISOLATION-STAGE-*) loaded in both cells'
namespaces, a linked cell's device reaches a LAN-backed service, our device resolves the linked
cell's name and reaches its service, and the exit through the linked cell works: picell keeps
its accept rules in DOCKER-USER (written with iptables-nft, tagged `picell`), puts them back
after Docker reloads its ruleset, keeps them through a restart, and `status` names Docker and
what it did. With ufw's shape instead, `status` prints the owner's command and nothing is
written, and the warning ends once the owner's rules are in.

Topology (module scope):

                   inet ns: router, ip_forward; on lo: 192.0.2.80 (HTTP :80 answers the
                   caller's address), 192.0.2.53 (the internet's DNS)
        ┌────────────────────────┴────────────────┬─────────────────────────────┐
  198.51.100.1/26 (gw .62)             198.51.100.65/26 (gw .126)            br-dev
  alpha ns: picell alpha               beta ns: picell beta                  198.51.100.192/26
  10.61.0.1/24 alpha.test              10.62.0.1/24 beta.test                router .254
  Docker's ruleset (ip filter)         Docker's ruleset (ip filter)          phone .193 (alpha's,
  │ veth 203.0.113.1/24                web: 127.0.0.1:8000                    routed via beta)
  lan ns 203.0.113.5 (HTTP :80)                                              tablet .194 (beta's)

alpha shares `files` (LAN-backed) with beta; beta shares `web` with alpha and offers alpha its
exit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from picell.constants import LAB_INTERNET_ENV
from picell.firewall.host import docker_rules
from tests.netns.cells import Cell
from tests.netns.harness import Netns, Topology, wait_until

RULESETS = Path(__file__).parent.parent / "unit" / "golden" / "hostfw"
ORACLE = "192.0.2.80"
BETA_UPLINK = "198.51.100.65"


@dataclass
class World:
    topo: Topology
    alpha: Cell
    beta: Cell
    phone: Netns
    tablet: Netns


def load(ns: Netns, ruleset: str) -> None:
    """Load a ruleset as Docker (or ufw) does: iptables-restore, which replaces `ip filter`."""
    ns.run(["iptables-restore"], input=(RULESETS / ruleset).read_text())


def ours(cell: Cell) -> list[str]:
    """Our accept rules in DOCKER-USER, as iptables prints them."""
    out = cell.ns.run(["iptables-nft", "-S", "DOCKER-USER"], check=False).stdout
    return [line for line in out.splitlines() if "--comment picell" in line]


def docker_named(cell: Cell) -> bool:
    return any(
        fw["owner"] == "docker" and fw["action"] == "accept rules added in DOCKER-USER"
        for fw in cell.cli("status")["host_firewall"]
    )


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


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    previous = os.environ.get(LAB_INTERNET_ENV)
    os.environ[LAB_INTERNET_ENV] = "1"  # the exit lends the documentation ranges (test_exit.py)
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
        conf = topo.workdir / "internet-dns.conf"
        conf.write_text(
            "\n".join(["server:", '\tusername: ""', '\tchroot: ""', '\tpidfile: ""',
                       f'\tdirectory: "{topo.workdir}"', "\tuse-syslog: no",
                       "\tinterface: 192.0.2.53", "\taccess-control: 0.0.0.0/0 allow",
                       '\tlocal-zone: "." static',
                       f'\tlocal-data: "www.example.net. 60 IN A {ORACLE}"']) + "\n"
        )  # fmt: skip
        inet.popen(["unbound", "-d", "-p", "-c", str(conf)], name="internet-dns")
        wait_until(lambda: inet.dig("www.example.net", server="192.0.2.53") == [ORACLE], 15,
                   "the internet's DNS is not up")  # fmt: skip
        dev = topo.bridge("dev")
        topo.attach(inet, dev, "198.51.100.254/26")
        phone, tablet = topo.add_ns("phone"), topo.add_ns("tablet")
        topo.attach(phone, dev, "198.51.100.193/26", gw="198.51.100.254")
        topo.attach(tablet, dev, "198.51.100.194/26", gw="198.51.100.254")
        alpha = _cell(topo, inet, "alpha", 1)
        beta = _cell(topo, inet, "beta", 2)
        # Docker starts beside running cells: its FORWARD policy drop is in both namespaces
        for cell in (alpha, beta):
            load(cell.ns, "docker.rules")
        lan = topo.add_ns("lan")
        topo.link(alpha.ns, "203.0.113.1/24", lan, "203.0.113.5/24")
        lan.run(["ip", "route", "replace", "default", "via", "203.0.113.1"])
        lan.serve_http("203.0.113.5", 80, "alpha files")
        alpha.cli("services", "add", "files", "--backend", "203.0.113.5:80")
        beta.ns.serve_http("127.0.0.1", 8000, "beta web")
        beta.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        alpha.cli("connect", beta.invite()["string"])
        wait_until(lambda: alpha.ns.ping(beta.ip), 30, "alpha cannot reach beta")
        alpha.cli("share", "beta", "files")
        beta.cli("share", "alpha", "web")
        beta.cli("exit-offer", "alpha", "on")
        wait_until(lambda: alpha.links()["beta"]["remote_exit_offered"], 20,
                   "alpha did not learn of beta's exit offer")  # fmt: skip
        alpha.add_device("phone")
        phone.device(alpha.cli("route-via", "phone", "beta")["config"], hint="phone").up()
        tablet.device(beta.add_device("tablet"), hint="tablet").up()
        yield World(topo, alpha, beta, phone, tablet)


def test_links_services_and_the_exit_work_beside_dockers_ruleset(world: World) -> None:
    w = world
    for cell in (w.alpha, w.beta):
        wait_until(lambda c=cell: docker_named(c), 60, f"{cell.name}'s status does not name Docker")
        want = {str(r).split(" ", 1)[1] for r in docker_rules(cell.interface)}
        assert {line.split(" ", 2)[2] for line in ours(cell)} == want
    # Docker's own chains are still there and still drop by default
    filter_table = w.alpha.ns.run(["nft", "list", "table", "ip", "filter"]).stdout
    assert "policy drop" in filter_table and "DOCKER-ISOLATION-STAGE-1" in filter_table
    # a linked cell's device reaches our LAN-backed service, by name
    wait_until(lambda: w.tablet.http_get("http://files.alpha.test/") == "alpha files", 30,
               "beta's tablet cannot reach alpha's LAN-backed service")  # fmt: skip
    # our device resolves the linked cell's name and reaches what it shares
    wait_until(lambda: w.phone.dig("web.beta.test") != [], 20, "the phone cannot resolve beta")
    wait_until(lambda: w.phone.http_get("http://web.beta.test/") == "beta web", 20,
               "the phone cannot reach beta's shared service")  # fmt: skip
    # and it leaves for the internet through beta's exit
    wait_until(
        lambda: w.phone.http_get(f"http://{ORACLE}/phone-{time.monotonic_ns()}") == BETA_UPLINK,
        30, "the phone's traffic does not leave through beta",
    )  # fmt: skip
    human = w.alpha.run("status").stdout
    assert (
        "host firewall: docker (ip filter FORWARD) drops forwarded traffic: "
        "accept rules added in DOCKER-USER" in human
    )


def test_docker_reloading_its_ruleset_is_drift_and_a_restart_keeps_the_rules(
    world: World,
) -> None:
    w = world
    load(w.alpha.ns, "docker.rules")  # Docker restarted: DOCKER-USER holds only its RETURN
    assert ours(w.alpha) == []
    # the periodic reconcile (RECONCILE_PERIOD_S) puts them back by itself
    wait_until(lambda: len(ours(w.alpha)) == 4, 60, "alpha did not put its rules back")
    wait_until(lambda: w.tablet.http_get("http://files.alpha.test/") == "alpha files", 30,
               "beta's tablet lost alpha's LAN-backed service")  # fmt: skip
    report = w.alpha.cli("reconcile")
    assert not report["changed"] and report["write_commands"] == 0
    w.alpha.stop()
    assert len(ours(w.alpha)) == 4  # a stop removes nothing picell put in place
    w.alpha.start()
    wait_until(lambda: docker_named(w.alpha), 30, "alpha's status does not name Docker")
    assert len(ours(w.alpha)) == 4  # not added twice
    wait_until(lambda: w.tablet.http_get("http://files.alpha.test/") == "alpha files", 30,
               "beta's tablet lost alpha's LAN-backed service after the restart")  # fmt: skip


def test_ufw_gets_the_owners_command_and_nothing_written(world: World) -> None:
    w = world
    ifname = w.alpha.interface
    load(w.alpha.ns, "ufw.rules")  # ufw instead: INPUT and FORWARD policy drop, ufw-* chains
    w.alpha.cli("reconcile")
    found = {
        (fw["owner"], fw["hook"], fw["action"]) for fw in w.alpha.cli("status")["host_firewall"]
    }
    assert found == {
        ("ufw", "input", f"run: ufw allow in on {ifname} && ufw allow 51820/udp"),
        ("ufw", "forward", f"run: ufw route allow in on {ifname}"),
    }
    human = w.alpha.run("status").stdout
    assert f"ufw route allow in on {ifname}" in human
    saved = w.alpha.ns.run(["iptables-nft-save"]).stdout
    assert "picell" not in saved and "DOCKER-USER" not in saved
    # the owner runs the commands (what ufw writes for them): the warning ends
    for rule in (
        ["-A", "ufw-user-input", "-i", ifname, "-j", "ACCEPT"],
        ["-A", "ufw-user-input", "-p", "udp", "-m", "udp", "--dport", "51820", "-j", "ACCEPT"],
        ["-A", "ufw-user-forward", "-i", ifname, "-j", "ACCEPT"],
    ):
        w.alpha.ns.run(["iptables-nft", *rule])
    w.alpha.cli("reconcile")
    assert w.alpha.cli("status")["host_firewall"] == []
    wait_until(lambda: w.tablet.http_get("http://files.alpha.test/") == "alpha files", 30,
               "beta's tablet cannot reach alpha's LAN service through ufw")  # fmt: skip
