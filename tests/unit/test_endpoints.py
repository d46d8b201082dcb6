"""Several endpoints, IPv6 among them, without a network: the host's default endpoints at init,
what an invite and a state document announce, what a link stores from each, and the pairing call
trying the other cell's endpoint hosts in turn."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from picell.cellinit import InitRequest, plan_cell
from picell.control import Control
from picell.mesh import client
from picell.mesh.document import document
from picell.mesh.links import Links, _pair_any, announced_endpoints, identity_of
from picell.mesh.sync import Sync
from picell.mesh.wire import Identity
from picell.routing.host import observe_host_addresses
from picell.store import links as link_table
from picell.system.run import Result, Runner
from tests.unit.test_mesh import _linked_pair, _state_from_beta, identity, redeem


def _addr(family: str, local: str, **flags: bool) -> dict[str, Any]:
    return {"family": family, "local": local, "prefixlen": 64, "scope": "global", **flags}


class HostAddresses(Runner):
    """Answers `ip -j -4|-6 addr show scope global` with the given addresses."""

    def __init__(self, v4: Sequence[dict[str, Any]], v6: Sequence[dict[str, Any]]) -> None:
        self.out = {"-4": [{"ifname": "eth0", "addr_info": list(v4)}],
                    "-6": [{"ifname": "eth0", "addr_info": list(v6)}]}  # fmt: skip

    def run(self, argv: Sequence[str], **_: Any) -> Result:
        assert list(argv[:2]) == ["ip", "-j"] and argv[3] == "addr", argv
        return Result(tuple(argv), 0, json.dumps(self.out[argv[2]]), "")


def test_the_host_addresses_are_its_first_ipv4_then_its_first_stable_ipv6() -> None:
    v6 = [
        _addr("inet6", "2001:db8::aa", temporary=True),  # privacy address: changes daily
        _addr("inet6", "2001:db8::bb", tentative=True),  # not usable yet
        _addr("inet6", "2001:db8::5"),
        _addr("inet6", "2001:db8::6"),
    ]
    both = HostAddresses([_addr("inet", "192.0.2.5"), _addr("inet", "192.0.2.6")], v6)
    assert observe_host_addresses(both) == ("192.0.2.5", "2001:db8::5")
    assert observe_host_addresses(HostAddresses([], v6)) == ("2001:db8::5",)
    assert observe_host_addresses(HostAddresses([], [])) == ()


def _plan(runner: Runner) -> Any:
    req = InitRequest(name="home", domain="home.test", address="10.70.0.1/24")
    return plan_cell(runner, req, None, None)  # type: ignore[arg-type]  # no old cell: no conn


def test_an_ipv6_only_host_defaults_to_its_ipv6_endpoint() -> None:
    cell = _plan(HostAddresses([], [_addr("inet6", "2001:db8:5::7")]))
    assert cell.endpoint == "[2001:db8:5::7]:51820"
    assert cell.endpoint_source == "host" and cell.announced == ("[2001:db8:5::7]:51820",)


def test_a_dual_stack_host_announces_both_and_its_invite_carries_them() -> None:
    cell = _plan(HostAddresses([_addr("inet", "192.0.2.5")], [_addr("inet6", "2001:db8::5")]))
    assert cell.endpoint == "192.0.2.5:51820"
    both = ["192.0.2.5:51820", "[2001:db8::5]:51820"]
    ident = identity_of(cell)
    assert ident.endpoint == "192.0.2.5:51820" and ident.endpoints == both
    assert Identity.model_validate(ident.as_dict()).candidates() == tuple(both)
    # a router mapping comes before the host's own addresses, and leads
    mapped = identity_of(cell.__class__(**{**cell.__dict__, "mapped_endpoint": "192.0.2.99:1"}))
    assert mapped.endpoint == "192.0.2.99:1" and mapped.endpoints == ["192.0.2.99:1", *both]


def test_the_invite_and_the_document_carry_every_announced_endpoint(control: Control) -> None:
    links = Links(control)
    inv = links.invite(3600)
    assert inv.endpoints == ["198.51.100.1:51820"] and inv.endpoint == "198.51.100.1:51820"
    _, _, beta_public = _linked_pair(control)
    with control.store.read() as conn:
        beta = link_table.by_key(conn, beta_public)
    assert beta is not None
    doc = document(control.cell(), beta, [])
    assert doc["identity"]["endpoints"] == ["198.51.100.1:51820"]


def test_a_link_stores_the_endpoints_of_the_redemption_and_of_documents(
    control: Control,
) -> None:
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    ident = {**identity("beta", "10.62.0.0/24", "beta.test"),
             "endpoints": ["198.51.100.9:51820", "[2001:db8::9]:51820"]}  # fmt: skip
    links.accept(redeem(inv.pairing.token, ident))
    with control.store.read() as conn:
        beta = link_table.get(conn, "beta")
    assert beta.identity.candidates == ("198.51.100.9:51820", "[2001:db8::9]:51820")


def test_a_document_moves_replaces_or_keeps_the_endpoints(control: Control) -> None:
    links, beta_private, _ = _linked_pair(control)
    sync = Sync(links)

    def stored() -> tuple[str, ...]:
        with control.store.read() as conn:
            return link_table.get(conn, "beta").identity.candidates

    two = {"endpoint": "198.51.100.44:51820",
           "endpoints": ["198.51.100.44:51820", "[2001:db8::44]:51820"]}  # fmt: skip
    sync.receive_state(_state_from_beta(control, beta_private, 1, identity=two), "10.62.0.1")
    assert stored() == ("198.51.100.44:51820", "[2001:db8::44]:51820")
    # an older cell names only its endpoint: unchanged, the endpoints are kept
    same = {"endpoint": "198.51.100.44:51820"}
    sync.receive_state(_state_from_beta(control, beta_private, 2, identity=same), "10.62.0.1")
    assert stored() == ("198.51.100.44:51820", "[2001:db8::44]:51820")
    # its endpoint moved: the old list no longer holds
    moved = {"endpoint": "[2001:db8::45]:51820"}
    sync.receive_state(_state_from_beta(control, beta_private, 3, identity=moved), "10.62.0.1")
    assert stored() == ("[2001:db8::45]:51820",)
    events = [
        e["detail"] for e in links.journal_entries("beta") if e["event"] == "identity changed"
    ]
    assert events[0].startswith("identity changed: endpoint 198.51.100.44:51820, [2001:db8::44]")


def test_announced_endpoints_lead_with_the_endpoint_and_stop_at_four() -> None:
    assert announced_endpoints("a:1", None) == ()
    assert announced_endpoints("a:1", ["a:1"]) == ()
    assert announced_endpoints("e:1", ["a:1", "b:1", "c:1", "d:1"]) == ("e:1", "a:1", "b:1", "c:1")


def test_pairing_tries_each_endpoint_host_until_one_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoints = ["192.0.2.9:51820", "beta.example.test:51820", "[2001:db8::9]:51820"]
    ident = {**identity("beta", "10.62.0.0/24", "beta.test"), "endpoint": endpoints[0]}
    other = Identity.model_validate({**ident, "endpoints": endpoints})
    tried: list[str] = []

    def pair(host: str, port: int, body: dict[str, Any]) -> tuple[int, Any]:
        tried.append(host)
        if host != "2001:db8::9":
            raise client.Unreachable(f"{host}: connection refused")
        return 200, {"ok": True}

    monkeypatch.setattr(client, "pair", pair)
    assert _pair_any(other, 51821, {}) == (200, {"ok": True})
    assert tried == ["192.0.2.9", "beta.example.test", "2001:db8::9"]

    def bad(host: str, port: int, body: dict[str, Any]) -> tuple[int, Any]:
        tried.append(host)
        raise client.BadAnswer(200, "not JSON")

    tried.clear()
    monkeypatch.setattr(client, "pair", bad)
    with pytest.raises(client.BadAnswer):  # an answer, even unusable, ends the attempt
        _pair_any(other, 51821, {})
    assert tried == ["192.0.2.9"]
