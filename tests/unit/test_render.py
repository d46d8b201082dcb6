"""Renderers against golden files. Regenerate with PICELL_UPDATE_GOLDEN=1 and read the diff."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import pytest

from picell.dns.render import render_unbound
from picell.firewall.render import render_ruleset
from picell.state import State, build_state
from picell.store.cell import Cell
from picell.store.links import Link, LinkIdentity, Mirror, OwnerChoices
from picell.store.peers import Peer
from picell.store.services import Service
from picell.wireguard.render import device_allowed_ips, render_device, render_interface

GOLDEN = Path(__file__).parent / "golden"
KEY_CELL = "cPi9cd0OgqJ0qWdzRZsZUaOuSlnt05kY+tG2nh0DVkY="
KEY_A = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
KEY_B = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX8="
KEY_LINK_B = "kpfFaUFjy+CyCYlSOSmQ6eid3k2HmRW03LM36AHeBxU="
KEY_LINK_C = "rq+r2PM2JJB1BmD4LSB9mfISONn3REtTQfqPyOlNaBE="


def sample_state() -> State:
    cell = Cell(
        name="alpha",
        domain="alpha.test",
        address=ipaddress.IPv4Interface("10.61.0.1/24"),
        listen_port=51820,
        endpoint="198.51.100.1:51820",
        private_key=KEY_CELL,
        interface="pcalpha0",
        pair_port=51821,
        mesh_port=3000,
        uplink=None,
        mesh_range=ipaddress.IPv4Network("10.0.0.0/8"),
        upstreams=(),
    )
    now = time.time()
    peers = [Peer("phone", KEY_A, None, 2, None, now), Peer("laptop", KEY_B, None, 3, None, now)]
    services = [
        Service("web", 1, ipaddress.IPv4Address("127.0.0.1"), 8080, "tcp", 80),
        Service("nas", 2, ipaddress.IPv4Address("203.0.113.5"), 445, "tcp", 445),
    ]
    links = [
        Link(
            "beta",
            KEY_LINK_B,
            LinkIdentity(
                "198.51.100.2:51820",
                ipaddress.IPv4Network("10.62.0.0/24"),
                ipaddress.IPv4Address("10.62.0.1"),
                "beta.test",
            ),
            state="linked",
        ),
        Link(
            "gamma",
            KEY_LINK_C,
            LinkIdentity(
                "198.51.100.3:51820",
                ipaddress.IPv4Network("10.63.0.0/24"),
                ipaddress.IPv4Address("10.63.0.1"),
                "gamma.test",
            ),
            state="unlinking",
        ),
    ]
    upstream = (ipaddress.IPv4Address("198.51.100.53"),)
    return build_state(cell, peers, services, upstream, links)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("PICELL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file"


def test_wireguard_interface() -> None:
    check_golden("wg-interface.conf", render_interface(sample_state().wg))


def test_device_config() -> None:
    state = sample_state()
    text = render_device(
        device_name="phone",
        private_key=KEY_A,
        address=ipaddress.IPv4Address("10.61.0.2"),
        dns=state.address.ip,
        domain="alpha.test",
        cell_public_key=KEY_B,
        endpoint="198.51.100.1:51820",
        allowed_ips=device_allowed_ips(state.network, ipaddress.IPv4Network("10.0.0.0/8")),
    )
    check_golden("device-phone.conf", text)


def test_device_config_covers_a_network_outside_the_mesh_range() -> None:
    nets = device_allowed_ips(
        ipaddress.IPv4Network("192.168.77.0/24"), ipaddress.IPv4Network("10.0.0.0/8")
    )
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.168.77.0/24"]


def test_ruleset() -> None:
    text, digest = render_ruleset(sample_state(), ("eth0",))
    check_golden("ruleset.nft", text)
    assert f'comment "{digest}"' in text


def test_ruleset_digest_follows_content() -> None:
    state = sample_state()
    _, d1 = render_ruleset(state)
    _, d2 = render_ruleset(state)
    fewer = State(**{**state.__dict__, "services": state.services[:1]})
    _, d3 = render_ruleset(fewer)
    assert d1 == d2 != d3


def test_unbound() -> None:
    text = render_unbound(
        sample_state().dns, Path("/var/lib/picell/unbound"), Path("/var/lib/picell/ctl.sock")
    )
    check_golden("unbound.conf", text)


@pytest.mark.parametrize("bad", ["a\nb", 'a"b'])
def test_rendered_text_cannot_carry_injected_lines(bad: str) -> None:
    from picell import validate
    from picell.errors import BadInput

    with pytest.raises(BadInput):
        validate.name(bad)


KEY_EXIT_B = "SHr6/9F0kwxmnnzYqUAF14ynpLIyh7iUGRB4LbIWimM="
KEY_EXIT_CLIENT_B = "ECuhqKB16cXuKelpUsBxhpOi4xRyVmmCJCwE+Ly0r0o="


def exit_state() -> State:
    """alpha routes phone via beta (which offers), laptop via gamma (which does not: fail
    closed), and relays for beta's devices (offered to beta, and beta asked)."""
    base = sample_state()
    cell = Cell("alpha", "alpha.test", ipaddress.IPv4Interface("10.61.0.1/24"), 51820,
                "198.51.100.1:51820", KEY_CELL, "pcalpha0", 51821, 3000, None,
                ipaddress.IPv4Network("10.0.0.0/8"), ())  # fmt: skip
    now = time.time()
    peers = [
        Peer("phone", KEY_A, None, 2, "beta", now),
        Peer("laptop", KEY_B, None, 3, "gamma", now),
    ]
    beta = Link(
        "beta",
        KEY_LINK_B,
        LinkIdentity(
            "198.51.100.2:51820",
            ipaddress.IPv4Network("10.62.0.0/24"),
            ipaddress.IPv4Address("10.62.0.1"),
            "beta.test",
        ),
        state="linked",
        choices=OwnerChoices(exit_offered=True),
        mirror=Mirror(
            exit_offered=True,
            exit_relay_active=True,
            exit_relay_key=KEY_EXIT_B,
            exit_relay_port=51821,
            exit_client_key=KEY_EXIT_CLIENT_B,
            exit_client_port=51822,
        ),
    )
    gamma = Link(
        "gamma",
        KEY_LINK_C,
        LinkIdentity(
            "198.51.100.3:51820",
            ipaddress.IPv4Network("10.63.0.0/24"),
            ipaddress.IPv4Address("10.63.0.1"),
            "gamma.test",
        ),
        state="linked",
    )
    services = [Service("web", 1, ipaddress.IPv4Address("127.0.0.1"), 8080, "tcp", 80)]
    onlink = (("pcalpha0", ipaddress.IPv4Network("10.61.0.0/24")),
              ("eth1", ipaddress.IPv4Network("203.0.113.0/24")))  # fmt: skip
    state = build_state(cell, peers, services, base.dns.upstreams, [beta, gamma],
                        {"beta": 1, "gamma": 2}, onlink)  # fmt: skip
    return state


def test_exit_tunnels_are_built_from_the_store() -> None:
    state = exit_state()
    relay, via_beta, via_gamma = state.exits
    assert relay.relay and relay.interface == "pcalpha0x0" and relay.wg is not None
    assert [str(n) for n in relay.relayed] == ["10.62.0.0/24"]
    assert via_beta.wg is not None and via_beta.wg.peers[0].public_key == KEY_EXIT_B
    assert [str(n) for n in via_beta.wg.peers[0].allowed_ips] == ["0.0.0.0/0"]
    assert via_beta.wg.peers[0].endpoint == "10.62.0.1:51821"
    assert via_gamma.wg is None and [str(d) for d in via_gamma.devices] == ["10.61.0.3"]
    assert ipaddress.IPv4Network("203.0.113.0/24") in state.not_internet
    view = next(v for v in state.dns.views if v.name == "beta")
    assert view.internet and view.hidden == ("gamma.test",)


def test_ruleset_with_exits() -> None:
    text, _ = render_ruleset(exit_state(), ("eth0", "wlan0"))  # a multipath default route
    check_golden("ruleset-exits.nft", text)


def test_unbound_with_exits() -> None:
    from picell.dns.render import render_exit_resolver

    state = exit_state()
    workdir = Path("/var/lib/picell/unbound")
    check_golden("unbound-exits.conf", render_unbound(state.dns, workdir, workdir / "ctl.sock"))
    up, down = state.exits[1], state.exits[2]
    check_golden("exit-resolver.conf", render_exit_resolver(state, up, workdir, workdir / "x.sock"))
    closed = render_exit_resolver(state, down, workdir, workdir / "x.sock")
    assert 'local-zone: "." refuse' in closed and 'name: "."' not in closed


def test_full_tunnel_device_config_covers_everything() -> None:
    nets = device_allowed_ips(
        ipaddress.IPv4Network("10.61.0.0/24"), ipaddress.IPv4Network("10.0.0.0/8"), True
    )
    assert [str(n) for n in nets] == ["0.0.0.0/0", "::/0"]
