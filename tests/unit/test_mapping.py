"""Per-link translation (issue 15, `picell.mesh.mapping`): which networks are mapped, where,
and what our side renders for them."""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from picell.errors import BadInput, Conflict
from picell.firewall.render import render_ruleset
from picell.mesh import mapping, policy
from picell.mesh.wire import Identity
from picell.state import build_state
from picell.store.cell import Cell
from picell.store.links import Link, LinkIdentity, LinkState, Mirror, OwnerChoices, Share
from picell.store.services import Service
from picell.wireguard import keys

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address
MESH = N("10.0.0.0/8")
NO_HOST = policy.HostNets()


def _cell(address: str = "10.60.0.1/24") -> Cell:
    return Cell(
        name="alpha",
        domain="alpha.test",
        address=ipaddress.IPv4Interface(address),
        endpoint="192.0.2.1:51820",
        listen_port=51820,
        private_key=keys.derive_private("A" * 43 + "=", "alpha"),
        interface="pctest0",
        pair_port=51821,
        mesh_port=3000,
        uplink=None,
        mesh_range=MESH,
        upstreams=(),
    )


def _identity(name: str, net: str, key: str | None = None) -> Identity:
    network = N(net)
    return Identity(
        cell_name=name,
        domain=f"{name}.test",
        public_key=key or keys.public_from_private(keys.derive_private("B" * 43 + "=", name)),
        endpoint="198.51.100.2:51820",
        vpn_subnet=network,
        dns_ip=network.network_address + 1,
    )


def _link(ident: Identity, mapped: N | None = None, seen_as: N | None = None) -> Link:
    return Link(
        ident.cell_name,
        ident.public_key,
        LinkIdentity(
            ident.endpoint, ident.vpn_subnet, ident.dns_ip, ident.domain, mapped=mapped
        ),  # fmt: skip
        LinkState.LINKED,
        mirror=Mirror(
            outbound=(
                {
                    "name": "wiki",
                    "vip": str(ident.vpn_subnet.network_address + 254),
                    "ports": [80],
                    "protocol": "tcp",
                },
            ),  # fmt: skip
            seen_as=seen_as,
        ),
    )


def test_translate_moves_an_address_to_the_same_offset() -> None:
    assert mapping.translate(A("10.60.0.254"), N("10.60.0.0/24"), N("10.201.7.0/24")) == A(
        "10.201.7.254"
    )
    assert mapping.translate(A("10.9.9.9"), N("10.60.0.0/24"), N("10.201.7.0/24")) == A("10.9.9.9")


@pytest.mark.parametrize(
    ("net", "why"),
    [
        ("10.60.0.0/24", "this cell's network"),  # equal to ours: PIC cells all default to one
        ("10.60.0.128/25", "this cell's network"),
        ("10.62.0.0/24", "linked cell beta"),  # as we present beta
        ("192.168.77.0/24", "this host's address"),  # the host's LAN
        ("172.20.0.0/24", "outside the mesh range"),  # our devices route only 10/8
        ("100.64.9.0/24", "outside the mesh range"),
    ],
)
def test_an_overlapping_or_unrouted_network_is_mapped_to_a_free_block(net: str, why: str) -> None:
    cell = _cell()
    beta = _link(_identity("beta", "10.62.0.0/24"))
    host = policy.HostNets(addresses=(("eth0", ipaddress.IPv4Interface("192.168.77.5/24")),),
                           routes=(("eth0", N("192.168.77.0/24")),))  # fmt: skip
    other = _identity("gamma", net)
    views = [("beta", beta.identity.network)]
    reason = mapping.overlap_reason(other.vpn_subnet, cell.network, MESH, views,
                                    policy.host_overlap(other.vpn_subnet, host))  # fmt: skip
    assert reason is not None and why in reason
    mapped = policy.plan_mapping(cell, [beta], other, host)
    assert mapped is not None and mapped.subnet_of(MESH)
    assert mapped.prefixlen == other.vpn_subnet.prefixlen
    for taken in (cell.network, beta.identity.network, N("192.168.77.0/24")):
        assert not mapped.overlaps(taken)


def test_a_free_network_is_used_as_it_is() -> None:
    assert policy.plan_mapping(_cell(), [], _identity("beta", "10.62.0.0/24"), NO_HOST) is None


def test_two_links_on_the_same_network_get_different_blocks() -> None:
    """alpha, beta and gamma all on 10.60.0.0/24: alpha presents beta and gamma apart."""
    cell = _cell()
    beta = _identity("beta", "10.60.0.0/24")
    m_beta = policy.plan_mapping(cell, [], beta, NO_HOST)
    assert m_beta is not None
    gamma = _identity("gamma", "10.60.0.0/24")
    m_gamma = policy.plan_mapping(cell, [_link(beta, m_beta)], gamma, NO_HOST)
    assert m_gamma is not None and not m_gamma.overlaps(m_beta)


def test_a_repairing_keeps_its_block_while_it_is_free() -> None:
    cell = _cell()
    beta = _identity("beta", "10.60.0.0/24")
    kept = N("10.99.1.0/24")
    assert policy.plan_mapping(cell, [_link(beta, kept)], beta, NO_HOST) == kept
    # a block the host took meanwhile is given up for a free one
    host = policy.HostNets(routes=(("eth1", N("10.99.0.0/16")),))
    moved = policy.plan_mapping(cell, [_link(beta, kept)], beta, host)
    assert moved is not None and not moved.overlaps(N("10.99.0.0/16"))


def test_no_free_block_is_refused_naming_the_cell() -> None:
    with pytest.raises(Conflict) as err:
        mapping.choose(N("10.60.0.0/24"), "k", [N("10.0.0.0/8")], MESH, "gamma")
    assert "gamma" in err.value.message and err.value.field == "vpn_subnet"
    cell = replace(_cell(), mesh_range=N("10.60.0.0/23"))  # room for ours and one block
    beta = _identity("beta", "10.60.0.0/24")
    first = policy.plan_mapping(cell, [], beta, NO_HOST)
    assert first == N("10.60.1.0/24")
    with pytest.raises(Conflict) as err:
        policy.plan_mapping(cell, [_link(beta, first)], _identity("gamma", "10.60.0.0/24"), NO_HOST)
    assert err.value.field == "invite.vpn_subnet" and "gamma" in err.value.message


@pytest.mark.parametrize(
    ("seen", "kept", "error"),
    [
        (None, None, None),
        ("10.60.0.0/24", None, None),  # as we are: nothing to translate
        ("10.201.9.0/24", "10.201.9.0/24", None),
        ("192.168.5.0/24", "192.168.5.0/24", None),  # the other cell's mesh range may differ
        ("10.201.9.0/25", None, "size"),
        ("8.8.8.0/24", None, "private"),
        ("127.0.0.0/24", None, "private"),
    ],
)
def test_where_the_other_cell_presents_us_is_checked(
    seen: str | None, kept: str | None, error: str | None
) -> None:
    given = N(seen) if seen else None
    if error is None:
        got = mapping.check_seen_as(given, N("10.60.0.0/24"), policy.LINKABLE_RANGES, "f")
        assert got == (N(kept) if kept else None)
        return
    with pytest.raises(BadInput) as err:
        mapping.check_seen_as(given, N("10.60.0.0/24"), policy.LINKABLE_RANGES, "body.f")
    assert err.value.field == "body.f" and error in err.value.message


WIKI = Service(name="wiki", vip_index=1, port=80, protocol="tcp",
               backend_host=A("127.0.0.1"), backend_port=8080)  # fmt: skip


def test_a_mapped_link_is_held_where_we_present_it() -> None:
    """beta on our own network, presented at 10.201.7.0/24, presenting us at 10.201.9.0/24:
    its peer, grants, DNS and rules all use the presented addresses."""
    beta = _identity("beta", "10.60.0.0/24")
    link = replace(_link(beta, N("10.201.7.0/24"), N("10.201.9.0/24")),
                   choices=OwnerChoices(shares=(Share("wiki"),)))  # fmt: skip
    state = build_state(_cell(), [], [WIKI], (), [link])
    [peer] = [p for p in state.peers if p.public_key == beta.public_key]
    assert peer.allowed_ips == (N("10.201.7.0/24"),)
    [grant] = state.grants
    assert (grant.network, grant.vip) == (N("10.201.7.0/24"), A("10.201.9.254"))
    assert not state.dns.forwards  # its resolver would answer with its own addresses
    [zone] = state.dns.zones
    assert {(r.fqdn, str(r.address)) for r in zone.records} == {
        ("beta.test", "10.201.7.1"),
        ("beta.beta.test", "10.201.7.1"),
        ("wiki.beta.test", "10.201.7.254"),  # its VIP 10.60.0.254, where we present it
    }
    [view] = state.dns.views
    assert view.network == N("10.201.7.0/24")
    assert ("wiki.alpha.test", A("10.201.9.254")) in {(r.fqdn, r.address) for r in view.records}
    text, _ = render_ruleset(state)
    assert "ip saddr 10.201.7.0/24 ip daddr 10.201.9.1 accept" in text
    assert "ip daddr 10.201.9.254 tcp dport 80 dnat ip to 127.0.0.1:8080" in text
    assert "ip daddr 10.201.9.0/24 dnat ip prefix to 10.60.0.0/24" in text
    assert "ip saddr 10.60.0.0/24 ip daddr 10.201.7.0/24 snat ip prefix to 10.201.9.0/24" in text
    # the VIP's own DNAT comes before the prefix DNAT: the first NAT rule is the only one
    assert text.index("10.201.9.254 tcp dport 80 dnat") < text.index("dnat ip prefix to")


def test_the_translated_ruleset_passes_nft_check(tmp_path: Path) -> None:
    """`nft -c` accepts the prefix NAT lines (nft 1.0.6), where nft exists."""
    beta = _identity("beta", "10.60.0.0/24")
    link = _link(beta, N("10.201.7.0/24"), N("10.201.9.0/24"))
    state = build_state(
        _cell(), [], [WIKI], (), [replace(link, choices=OwnerChoices((Share("wiki"),)))]
    )
    text, _ = render_ruleset(state)
    try:
        res = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True,
                             text=True, check=False)  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no nft here (tests/netns applies it for real)")
    if "Operation not permitted" in res.stderr:
        pytest.skip("nft -c needs root (tests/netns applies it for real)")
    assert res.returncode == 0, res.stderr
