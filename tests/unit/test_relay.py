"""Introductions and the relay (`picell.mesh.relay`): what is asked, answered and kept, the
relay's ports and firewall lines, where a peer's endpoint comes from, and the refusals."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from picell.app import build_api
from picell.constants import LINK_STALE_S, RELAY_PORT_BASE, RELAY_PORT_SPAN
from picell.control import Control
from picell.errors import Conflict
from picell.firewall.render import _relay_rules
from picell.mesh import relay
from picell.mesh.sync import Sync
from picell.mesh.wire import Introduction, RelayPort
from picell.store.links import Link, LinkIdentity, LinkState, Mirror, OwnerChoices
from picell.wireguard import keys
from tests.unit.test_mesh import _linked_pair, _state_from_beta

NOW = 1_000_000.0


def key() -> str:
    return keys.public_from_private(keys.generate_private())


def link(name: str, n: int, state: LinkState = LinkState.LINKED, **choices: object) -> Link:
    return Link(
        name,
        key(),
        LinkIdentity(
            f"192.0.2.{n}:5182{n}",
            ipaddress.IPv4Network(f"10.{60 + n}.0.0/24"),
            ipaddress.IPv4Address(f"10.{60 + n}.0.1"),
            f"{name}.test",
        ),  # fmt: skip
        state,
        choices=OwnerChoices(**choices),  # type: ignore[arg-type]
    )


def test_wanted_lists_waiting_stale_and_via_links_only_to_a_linked_cell() -> None:
    beta = link("beta", 2)
    fresh, stale = link("fresh", 4), link("stale", 5)
    waiting, via = link("waiting", 6, LinkState.WAITING), link("gamma", 3, via="beta")
    other_via = link("other", 7, via="fresh")
    links = [beta, fresh, stale, waiting, via, other_via]
    seen = {fresh.public_key: (int(NOW) - 10, "x"),
            stale.public_key: (int(NOW - LINK_STALE_S), "y"),
            other_via.public_key: (0, None)}  # fmt: skip
    got = relay.wanted_keys(beta, links, seen, NOW)
    assert got == sorted([stale.public_key, waiting.public_key, via.public_key])
    # a cell that has not confirmed hears nothing of our links
    assert relay.wanted_keys(replace(beta, state=LinkState.WAITING), links, seen, NOW) == []


def test_an_introduction_goes_both_ways_and_only_for_fresh_linked_cells() -> None:
    alpha, gamma, delta = link("alpha", 1), link("gamma", 3), link("delta", 4)
    wants = relay.Wanted()
    assert wants.note(alpha.public_key, [gamma.public_key, delta.public_key]) == {
        gamma.public_key, delta.public_key}  # fmt: skip
    assert wants.note(alpha.public_key, [gamma.public_key, delta.public_key]) == frozenset()
    seen = {gamma.public_key: (int(NOW) - 5, "203.0.113.3:51820"),
            alpha.public_key: (int(NOW) - 5, "203.0.113.1:40000"),
            delta.public_key: (int(NOW) - 500, "203.0.113.4:51820")}  # fmt: skip
    links = [alpha, gamma, delta]
    snap = wants.snapshot()
    to_alpha = relay.introductions(alpha, links, snap, seen, NOW)
    assert to_alpha == [{"public_key": gamma.public_key, "seen_at": "203.0.113.3:51820"}]
    # gamma did not ask, but alpha asked for it: it hears where alpha is at the same time
    to_gamma = relay.introductions(gamma, links, snap, seen, NOW)
    assert to_gamma == [{"public_key": alpha.public_key, "seen_at": "203.0.113.1:40000"}]
    # delta (stale) is never introduced; it hears where alpha (fresh, asking for it) is
    assert relay.introductions(delta, links, snap, seen, NOW) == to_gamma
    # unknown keys are never introduced (we hold no link with them)
    wants.note(alpha.public_key, [key()])
    assert relay.introductions(alpha, links, wants.snapshot(), seen, NOW) == []


def test_relay_ports_need_both_offers_and_stay_stable() -> None:
    alpha, gamma, delta = (link(n, i, relay_offered=True) for n, i in
                           (("alpha", 1), ("gamma", 3), ("delta", 4)))  # fmt: skip
    reserved = relay.reserved_ports(51820, 3000, 51821)
    ports = relay.relay_port_map([alpha, gamma, delta], reserved)
    assert len(ports) == 3 and len(set(ports.values())) == 3
    assert all(RELAY_PORT_BASE <= p < RELAY_PORT_BASE + RELAY_PORT_SPAN for p in ports.values())
    assert relay.relay_port_map([delta, gamma, alpha], reserved) == ports  # order-free
    pair = tuple(sorted((alpha.public_key, gamma.public_key)))
    # a port taken by our own services moves the pair, never shadows them
    moved = relay.relay_port_map([alpha, gamma], reserved | {ports[pair]})  # type: ignore[index]
    assert moved[pair] != ports[pair]  # type: ignore[index]
    # without the offer to gamma, no pair with gamma
    no_gamma = replace(gamma, choices=OwnerChoices(relay_offered=False))
    assert relay.relay_port_map([alpha, no_gamma], reserved) == {}
    wants = {alpha.public_key: frozenset({gamma.public_key})}
    got = relay.relay_ports(alpha, [alpha, gamma], wants, reserved)
    assert got == [{"public_key": gamma.public_key, "port": ports[pair]}]  # type: ignore[index]
    assert relay.relay_ports(alpha, [alpha, no_gamma], wants, reserved) == []


def test_the_relay_forwards_exactly_the_pair_and_the_relayed_cell_accepts_it(
    control: Control,
) -> None:
    alpha, gamma = link("alpha", 1, relay_offered=True), link("gamma", 3, relay_offered=True)
    offering = replace(link("beta", 2), mirror=Mirror(relay_offered=True))
    state = relay.relay_state([alpha, gamma, offering], relay.reserved_ports(51820, 3000, 51821))
    assert [(str(r.source), str(r.target), r.target_port) for r in state.rules] == [
        ("10.61.0.1", "10.63.0.1", 51823), ("10.63.0.1", "10.61.0.1", 51821)]  # fmt: skip
    assert state.sources == (ipaddress.IPv4Address("10.62.0.1"),)
    with control.store.read() as conn:
        full = replace(control.build(conn), relay=state)
    lines = _relay_rules(full)
    port, me = state.rules[0].port, full.address.ip
    assert any(f"ip saddr 10.61.0.1 ip daddr {me} udp dport {port} dnat ip to 10.63.0.1:51823"
               in line for line in lines["dnat"]), lines  # fmt: skip
    assert any(f"snat ip to {me}" in line for line in lines["snat"])
    assert any(f"ip saddr {{ 10.62.0.1 }} ip daddr {me} udp dport {full.listen_port} accept"
               in line for line in lines["link_input"])  # fmt: skip
    empty = _relay_rules(replace(full, relay=relay.RelayState()))
    assert empty == {"dnat": [], "snat": [], "link_input": [], "vpn_forward": []}
    # gamma's documents state its listen port: a router-mapped endpoint port is not where the
    # relay's packets arrive (they come through the tunnel, to gamma's own address)
    mapped = replace(gamma, identity=replace(gamma.identity, listen_port=51820))
    state = relay.relay_state([alpha, mapped, offering], relay.reserved_ports(51820, 3000, 51821))
    assert [r.target_port for r in state.rules] == [51820, 51821]


def test_a_link_via_a_cell_uses_its_relay_alone_and_others_try_introductions_first() -> None:
    beta = link("beta", 2)
    gamma = link("gamma", 3, via="beta")
    assert relay.peer_candidates(gamma, [beta, gamma]) == ()  # no port yet: it waits
    assert relay.path_of(gamma, [beta, gamma], None)["relay_note"] is not None
    relayed = replace(gamma, mirror=Mirror(via_port=41000))
    beta_offers = replace(beta, mirror=Mirror(relay_offered=True))
    assert relay.peer_candidates(relayed, [beta_offers, relayed]) == ("10.62.0.1:41000",)
    assert relay.path_of(relayed, [beta_offers, relayed], "10.62.0.1:41000") == {
        "via": "beta", "path": "via beta", "relay_note": None}  # fmt: skip
    direct = link("delta", 4)
    intro = relay.merge_introduced(
        None, [Introduction(public_key=direct.public_key, seen_at="203.0.113.4:51820")], NOW,
        {direct.public_key},
    )  # fmt: skip
    introducer = replace(beta, mirror=Mirror(introduced=intro))
    assert relay.peer_candidates(direct, [introducer, direct]) == (
        "203.0.113.4:51820", direct.identity.endpoint)  # fmt: skip
    assert relay.path_of(direct, [introducer, direct], "203.0.113.4:51820")["path"] == (
        "introduced by beta")  # fmt: skip
    assert relay.path_of(direct, [introducer, direct], "198.51.100.9:1")["path"] == "direct"
    # an answer without it keeps the introduction; a link we no longer hold drops it
    assert relay.merge_introduced(intro, [], NOW, {direct.public_key}) == intro
    assert relay.merge_introduced(intro, [], NOW, set()) is None
    assert json.loads(intro or "")[0]["endpoint"] == "203.0.113.4:51820"


def test_via_ports_follow_the_relay_answer() -> None:
    beta, gamma = link("beta", 2), link("gamma", 3, via="beta")
    moved = relay.via_ports(beta, [RelayPort(public_key=gamma.public_key, port=41000)],
                            [beta, gamma])  # fmt: skip
    assert [m.mirror.via_port for m in moved] == [41000]
    gone = relay.via_ports(beta, [], [beta, moved[0]])
    assert [m.mirror.via_port for m in gone] == [None]


def test_connect_via_is_refused_naming_the_cell(control: Control) -> None:
    beta = link("beta", 2)
    with pytest.raises(Conflict) as err:
        relay.check_via([beta], "beta", key())
    assert err.value.field == "via" and "beta" in err.value.message  # no offer
    with pytest.raises(Conflict) as err:
        relay.check_via([beta], "nobody", key())
    assert err.value.field == "via" and "nobody" in err.value.message
    offered = replace(beta, mirror=Mirror(relay_offered=True))
    with pytest.raises(Conflict):
        relay.check_via([offered], "beta", beta.public_key)  # the invite's own cell
    assert relay.check_via([offered], "beta", key()) == offered


def test_relay_offer_api_names_fields_and_cells(control: Control) -> None:
    links, beta_private, _ = _linked_pair(control)
    client = TestClient(build_api(control, links=links, sync=Sync(links)))
    resp = client.put("/api/cells/nobody/relay-offer", json={"offered": True})
    assert resp.status_code == 404 and resp.json()["field"] == "cell"
    resp = client.put("/api/cells/beta/relay-offer", json={"offered": "yes"})
    assert resp.status_code == 422 and "offered" in resp.json()["field"]
    resp = client.put("/api/cells/beta/relay-offer", json={"offered": True})
    assert resp.status_code == 200 and resp.json()["relay_offered"] is True
    assert resp.json()["via"] is None and resp.json()["path"] == "direct"
    # connect --via a cell that does not offer us its relay: 409 naming it, field via
    invite = json.dumps({"version": 1, "cell_name": "gamma", "domain": "gamma.test",
                         "public_key": key(), "endpoint": "192.0.2.3:51820",
                         "vpn_subnet": "10.63.0.0/24", "dns_ip": "10.63.0.1", "mesh_port": 3000,
                         "pairing": {"port": 51821, "token": "t" * 32,
                                     "expires_at": 4_000_000_000.0}})  # fmt: skip
    resp = client.post("/api/cells", json={"invite": invite, "via": "beta"})
    assert resp.status_code == 409 and resp.json()["field"] == "via", resp.text
    assert "beta" in resp.json()["message"]
    # once beta offers it, the link is stored waiting, travelling via beta (no pairing call)
    Sync(links).receive_state(_state_from_beta(control, beta_private, 1, relay_offered=True),
                              "10.62.0.1")  # fmt: skip
    resp = client.post("/api/cells", json={"invite": invite, "via": "beta"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["state"] == "waiting" and resp.json()["via"] == "beta"
    assert resp.json()["relay_note"] is not None  # beta relays no port for it yet


def test_a_new_waiting_link_or_a_disconnect_is_told_to_every_linked_cell_at_once(
    control: Control,
) -> None:
    """Our `wanted` list changes: the cells that introduce or relay for us hear it now, not
    with their next heartbeat (the first introduction took 80 s before)."""
    import json as json_module
    import time as time_module

    from picell.mesh.links import Links
    from picell.store import links as link_table
    from tests.unit.test_mesh import identity, keypair, redeem

    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    links.accept(redeem(inv.pairing.token, identity("beta", "10.62.0.0/24", "beta.test",
                                                    keypair()[1])))  # fmt: skip

    def settled() -> None:
        with control.store.transaction() as conn:
            conn.execute("UPDATE links SET pending_push = 0")

    def pending(name: str) -> int:
        with control.store.read() as conn:
            return link_table.get(conn, name).sync.pending_push

    settled()
    gamma = identity("gamma", "10.63.0.0/24", "gamma.test", keypair()[1])
    pairing = {"port": 51821, "token": "t" * 32, "expires_at": time_module.time() + 3600}
    out = links.connect(json_module.dumps({**gamma, "pairing": pairing}))  # no network: waits
    assert out["state"] == "waiting" and pending("beta") > 0
    settled()
    links.disconnect("gamma")
    assert pending("beta") > 0
