"""Share with one device of another cell, until a date (issue 15, part 2; `picell.mesh.shares`,
`picell.mesh.expiry`), through a translated link: alpha and beta are both on 10.60.0.0/24, so
alpha presents beta's devices at addresses of its own choosing, and the /32 grant must follow.

- `share --device` is refused (exit 1) while beta publishes no devices;
- with beta's devices published, a share with beta/phone admits the phone and refuses the
  laptop, at the phone's address as alpha presents it; `cells` counts what the grant carried;
- the grant follows the phone when beta re-creates it at another address (gone from the list
  meanwhile: no access, the share waits), and the share ends when beta stops publishing;
- a share until a date 20 s away stops an established flow when it expires, by its own timer,
  and the journal says it expired; an exit offer `--until` a date is withdrawn the same way.

Topology (module scope), one bridge, every address on it from 198.51.100.0/24:

    br-lan ── alpha ns (.1): picell alpha, 10.60.0.1/24, web 127.0.0.1:8000 (answers the
         │                   caller's address), echo 127.0.0.1:7
         ├── beta ns (.2):   picell beta, 10.60.0.1/24
         ├── phone ns (.20): beta's phone (wg-quick)
         └── laptop ns (.21): beta's laptop (wg-quick)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.netns.cells import Cell, cell_on_bridge, sample
from tests.netns.faults import api
from tests.netns.harness import Device, Netns, Topology, wait_until

VPN = "10.60.0.1/24"


@dataclass
class World:
    alpha: Cell
    beta: Cell
    devices: dict[str, Netns]
    tunnels: dict[str, Device]

    def presented(self, device: str) -> ipaddress.IPv4Address:
        """beta's `device` where alpha presents it (from alpha's `cells`)."""
        shown = {d["name"]: d["address"] for d in self.alpha.links()["beta"]["devices"]}
        return ipaddress.IPv4Address(shown[device])


def _web(w: World, device: str) -> str | None:
    return w.devices[device].http_get("http://web.alpha.test/", timeout_s=2)


def build(topo: Topology) -> World:
    """The module's topology (also bench/devshare.py's), alpha and beta linked."""
    lan = topo.bridge("lan")
    alpha = cell_on_bridge(topo, lan, "alpha", 1, vpn=VPN)
    beta = cell_on_bridge(topo, lan, "beta", 2, vpn=VPN)
    alpha.ns.serve_http("127.0.0.1", 8000, "@caller")
    alpha.ns.serve_tcp_echo("127.0.0.1", 7)
    alpha.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
    alpha.cli("services", "add", "echo", "--backend", "127.0.0.1:7")
    devices, tunnels = {}, {}
    for i, role in enumerate(("phone", "laptop")):
        devices[role] = topo.add_ns(role)
        topo.attach(devices[role], lan, f"198.51.100.{20 + i}/24")
        tunnels[role] = devices[role].device(beta.add_device(role), hint=role)
        tunnels[role].up()
    alpha.cli("connect", beta.invite()["string"])
    wait_until(lambda: all(c.links().get(o, {}).get("state") == "linked"
                           for c, o in ((alpha, "beta"), (beta, "alpha"))), 60,
               "alpha and beta did not link")  # fmt: skip
    assert alpha.links()["beta"]["mapped_subnet"] is not None  # a translated link
    return World(alpha, beta, devices, tunnels)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Topology() as topo:
        yield build(topo)


def _at(seconds: float) -> str:
    """A date `seconds` from now, as an owner types it: local time, no offset."""
    return dt.datetime.fromtimestamp(time.time() + seconds).isoformat(timespec="seconds")


def test_a_device_share_is_refused_while_the_cell_publishes_no_devices(world: World) -> None:
    err = world.alpha.refused("share", "beta", "web", "--device", "phone")
    assert err["field"] == "device" and "publishes no devices" in err["message"], err
    assert world.alpha.links()["beta"]["inbound"] == []
    # a date in the past, or no date at all, is refused too and changes nothing
    assert world.alpha.refused("share", "beta", "web", "--until", "2020-01-01T00:00")["field"] \
        == "until"  # fmt: skip
    bad = world.alpha.run("share", "beta", "web", "--until", "tomorrow", check=False)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert world.alpha.links()["beta"]["inbound"] == []


def test_a_device_share_admits_that_device_only(world: World) -> None:
    w, alpha = world, world.alpha
    w.beta.cli("cells", "publish-devices", "alpha", "on")
    wait_until(lambda: {d["name"] for d in alpha.links()["beta"]["devices"]} == {"phone", "laptop"},
               15, "alpha does not see beta's published devices")  # fmt: skip
    phone_at = w.presented("phone")
    mapped = ipaddress.IPv4Network(alpha.links()["beta"]["mapped_subnet"])
    assert phone_at in mapped  # presented through the translation, never beta's own address
    alpha.cli("share", "beta", "web", "--device", "phone")
    wait_until(lambda: _web(w, "phone") == str(phone_at), 15,
               "beta's phone cannot use alpha's web (or not at its presented address)")  # fmt: skip
    assert _web(w, "laptop") is None  # the laptop is refused by alpha's firewall
    [row] = alpha.links()["beta"]["inbound"]
    assert (row["name"], row["device"]) == ("web", "phone")
    assert row["packets"] > 0 and row["bytes"] > 0, row  # what the grant carried
    # the doctor walks the path from beta/phone (allowed) and beta/laptop (the grant fails)
    proc = alpha.run("doctor", "--from", "beta/phone", "--to", "web", "--json", check=False,
                     timeout=120)  # fmt: skip
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], report
    proc = alpha.run("doctor", "--from", "beta/laptop", "--to", "web", "--json", check=False,
                     timeout=120)  # fmt: skip
    first = json.loads(proc.stdout)["first_failure"]
    assert proc.returncode == 1 and first["name"] == "grant", first
    assert first["fix"] == "picell share beta web --device laptop", first
    # the metrics say which device used what
    status, body = api(alpha, "GET", "/metrics")
    series = 'picell_share_bytes_total{cell="beta",device="phone",service="web"}'
    assert status == 200 and (sample(body, series) or 0) > 0, body
    # beta's owner sees that alpha shares web with its phone only
    wait_until(lambda: [(s["name"], s.get("devices")) for s in w.beta.links()["alpha"]["outbound"]]
               == [("web", ["phone"])], 15, "beta does not see the device share")  # fmt: skip


def test_the_grant_follows_the_device_and_ends_when_it_is_unpublished(world: World) -> None:
    w, alpha, beta = world, world.alpha, world.beta
    before = w.presented("phone")
    # beta moves its phone: removed, its address taken by another device, then added back
    w.tunnels["phone"].down()
    beta.cli("peers", "remove", "phone")
    beta.add_device("spare")
    w.tunnels["phone"] = w.devices["phone"].device(beta.add_device("phone"), hint="phone2")
    w.tunnels["phone"].up()
    wait_until(lambda: w.presented("phone") != before, 15, "alpha did not learn the move")
    wait_until(lambda: _web(w, "phone") == str(w.presented("phone")), 15,
               "the grant did not follow the phone to its new address")  # fmt: skip
    beta.cli("cells", "publish-devices", "alpha", "off")
    wait_until(lambda: alpha.links()["beta"]["inbound"] == [], 15,
               "the device share did not end when beta stopped publishing")  # fmt: skip
    wait_until(lambda: _web(w, "phone") is None, 10, "the phone kept its access")
    events = [e["detail"] for e in alpha.journal("beta")]
    assert any("no longer publishes its devices" in d for d in events), events
    beta.cli("cells", "publish-devices", "alpha", "on")
    wait_until(lambda: alpha.links()["beta"]["devices"] != [], 15, "beta did not publish again")


def test_a_dated_share_ends_on_its_date_and_cuts_the_flow(world: World) -> None:
    w, alpha = world, world.alpha
    wait_until(lambda: "phone" in {d["name"] for d in alpha.links()["beta"]["devices"]}, 15,
               "beta's phone is not published")  # fmt: skip
    until = time.time() + 20
    alpha.cli("share", "beta", "echo", "--device", "phone", "--until", _at(20))
    [row] = [r for r in alpha.links()["beta"]["inbound"] if r["name"] == "echo"]
    assert row["device"] == "phone" and row["until"], row
    wait_until(lambda: w.devices["phone"].dig("echo.alpha.test"), 15,
               "beta's phone does not resolve alpha's echo")  # fmt: skip
    session = w.devices["phone"].tcp_echo_session("echo.alpha.test", 7, wait_s=15)
    wait_until(lambda: session.alive(since=time.monotonic() - 0.5), 10, "no echo through alpha")
    wait_until(lambda: time.time() > until + 1, 30, "the date did not come")
    # stopped by the share's own timer, within a few seconds of its date (the reconcile's
    # period is 30 s: a flow cut here was not cut by it)
    wait_until(lambda: session.silent_for(1.0), 8, "the flow outlived its share's date")
    assert not any(r["name"] == "echo" for r in alpha.links()["beta"]["inbound"])
    expired = [e for e in alpha.journal("beta") if "expired" in e["event"]]
    assert expired and expired[-1]["actor"] == "timer", expired
    status, body = api(alpha, "GET", "/metrics")
    assert (sample(body, "picell_shares_expired_total") or 0) >= 1, body


def test_an_exit_offer_until_a_date_is_withdrawn_then(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    answer = alpha.cli("exit-offer", "beta", "on", "--until", _at(6))
    assert answer["exit_offered"] and answer["exit_until"], answer
    wait_until(lambda: beta.links()["alpha"]["remote_exit_offered"], 15,
               "beta did not learn of the offer")  # fmt: skip
    wait_until(lambda: not beta.links()["alpha"]["remote_exit_offered"], 20,
               "the offer was not withdrawn on its date")  # fmt: skip
    assert not alpha.links()["beta"]["exit_offered"]
    events = [e["event"] for e in alpha.journal("beta")]
    assert any(e.startswith("exit offer until") and e.endswith("expired") for e in events)
