"""Our endpoints (NAT issue): what `status` says about them, and `picell endpoint`."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from fastapi.testclient import TestClient

from picell.app import build_api
from picell.control import Control
from picell.mesh import reach
from picell.store import links as link_table
from picell.store.cell import Cell
from picell.store.links import Link, LinkIdentity, LinkState, Mirror
from tests.unit.test_sender import World


def _cell(*endpoints: str, source: str = "owner", mapped: str | None = None) -> Cell:
    from tests.unit.test_reconcile import CELL

    return dataclasses.replace(CELL, endpoint=endpoints[0], endpoints=endpoints,
                               endpoint_source=source, mapped_endpoint=mapped)  # fmt: skip


def _seen(at: str) -> Link:
    ident = LinkIdentity("198.51.100.2:51820", ipaddress.IPv4Network("10.62.0.0/24"),
                         ipaddress.IPv4Address("10.62.0.1"), "beta.test")  # fmt: skip
    return Link("beta", "K" * 43 + "=", ident, LinkState.LINKED, mirror=Mirror(seen_at=at))


def test_precedence_is_owner_then_router_mapping_then_the_host() -> None:
    assert _cell("192.168.1.5:51820", source="host", mapped="203.0.113.7:41000").announced == (
        "203.0.113.7:41000", "192.168.1.5:51820")  # fmt: skip
    assert _cell("home.example.test:51820", mapped="203.0.113.7:41000").announced == (
        "home.example.test:51820",)  # fmt: skip


@pytest.mark.parametrize("ep", ["192.168.1.5:51820", "100.64.3.4:51820", "[fd00::5]:51820",
                                "10.1.2.3:51820", "172.16.0.9:1"])  # fmt: skip
def test_a_private_endpoint_is_named(ep: str) -> None:
    [warning] = reach.endpoint_warnings(_cell(ep), [])
    assert ep in warning and "private" in warning
    assert reach.init_warning(_cell(ep, source="host")) is not None
    assert reach.init_warning(_cell(ep)) is None  # the owner chose it


def test_a_public_endpoint_seen_elsewhere_by_every_linked_cell_is_named() -> None:
    cell = _cell("198.51.100.1:51820")
    assert reach.endpoint_warnings(cell, [_seen("198.51.100.1:40000")]) == []
    [warning] = reach.endpoint_warnings(cell, [_seen("203.0.113.9:40000")])
    assert "203.0.113.9:40000" in warning and "198.51.100.1:51820" in warning
    # a host name is never resolved here: nothing to compare, nothing said
    assert reach.endpoint_warnings(_cell("home.example.test:51820"),
                                   [_seen("203.0.113.9:1")]) == []  # fmt: skip


def test_device_configs_with_a_literal_address_carry_a_note() -> None:
    assert "re" in str(reach.device_endpoint_note(_cell("198.51.100.1:51820")))
    assert reach.device_endpoint_note(_cell("home.example.test:51820")) is None


def test_picell_endpoint_is_pushed_to_every_link_and_carried_by_device_configs(
    control: Control,
) -> None:
    world = World(control)
    try:
        client = TestClient(build_api(control))
        client.post("/api/peers", json={"name": "phone"})
        wanted = ["Home.Example.TEST:51820", "[2001:db8::1]:51820"]
        got = client.put("/api/cell/endpoint", json={"endpoints": wanted})
        assert got.status_code == 200, got.text
        assert got.json()["endpoints"] == ["home.example.test:51820", "[2001:db8::1]:51820"]
        assert got.json()["device_endpoint_note"] is None
        with control.store.read() as conn:
            assert link_table.get(conn, "beta").sync.pending_push > 0
        config = client.get("/api/peers/phone/config").text
        assert "Endpoint = home.example.test:51820" in config
        world.round()
        assert world.cells.pushes() == [1]
    finally:
        world.sender.stop()


@pytest.mark.parametrize(
    ("endpoints", "field"),
    [([], "endpoints"), (["a:1"] * 5, "endpoints"), (["198.51.100.1:51820", "x"], "endpoints[1]"),
     (["[fe80::1%eth0]:51820"], "endpoints[0]")],
)  # fmt: skip
def test_bad_endpoints_are_refused_naming_the_field(
    control: Control, endpoints: list[str], field: str
) -> None:
    client = TestClient(build_api(control))
    got = client.put("/api/cell/endpoint", json={"endpoints": endpoints})
    assert got.status_code in (400, 422), got.text
    assert field in got.text
    assert client.get("/api/status").json()["endpoints"] == ["198.51.100.1:51820"]


def test_an_invite_announcing_the_router_mapping_carries_its_pairing_port(
    control: Control,
) -> None:
    from picell.mesh.links import Links
    from picell.store import cell as cell_table
    from picell.store import portmap as portmap_table

    mapping = portmap_table.Mapping(
        "nat-pmp", ipaddress.IPv4Address("192.168.1.1"), ipaddress.IPv4Address("192.168.1.5"),
        ipaddress.IPv4Address("203.0.113.7"), 51820, 41000, 51821, 41001, 7200, 0.0,
    )  # fmt: skip
    with control.store.transaction() as conn:
        portmap_table.save(conn, mapping)
        conn.execute("UPDATE cell SET endpoint_source = 'host'")
        cell_table.set_mapped_endpoint(conn, mapping.endpoint)
    invite = Links(control).invite(3600)
    assert invite.endpoint == "203.0.113.7:41000"
    assert invite.pairing is not None and invite.pairing.port == 41001
    control.set_endpoints(["home.example.test:51820"])  # the owner's word wins: our own port
    invite = Links(control).invite(3600)
    assert invite.endpoint == "home.example.test:51820"
    assert invite.pairing is not None and invite.pairing.port == 51821


# -- default names that do not collide (issue 13) ----------------------------------------------
def test_a_distribution_default_host_name_gets_a_random_suffix() -> None:
    from picell.cellinit import default_name

    assert default_name("alice-home") == "alice-home"
    names = {default_name("raspberrypi") for _ in range(20)}
    assert len(names) > 1 and all(n.startswith("raspberrypi-") and len(n) == 16 for n in names)
    assert default_name("localhost.localdomain").startswith("localhost-")
    assert default_name("123").startswith("cell-")


def test_renaming_a_linked_cell_is_refused_with_what_to_do(control: Control) -> None:
    from picell.cellinit import InitRequest
    from picell.errors import Conflict

    world = World(control)
    world.sender.stop()
    for req, field in (
        (InitRequest(name="alfa"), "name"),
        (InitRequest(domain="alfa.test"), "domain"),
    ):
        with pytest.raises(Conflict) as refused:
            control.init_cell(req)
        assert refused.value.field == field
        assert "beta" in refused.value.message and "fresh invites" in refused.value.message
    assert control.cell().name == "alpha" and control.cell().domain == "alpha.test"
    control.init_cell(InitRequest(name="alpha"))  # the same name: nothing to refuse
