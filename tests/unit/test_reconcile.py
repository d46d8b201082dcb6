"""The reconcile contract against a fake kernel: converge, no-op, constant process count, drift.

Like Tailscale's router tests: feed a sequence of desired states, then the same states shuffled,
and check what the (fake) system holds after each.
"""

from __future__ import annotations

import ipaddress
import random
import time

import pytest

from picell.errors import ApplyFailed
from picell.reconcile import Reconciler
from picell.state import State, build_state
from picell.store.cell import Cell
from picell.store.peers import Peer
from picell.store.services import Service
from picell.wireguard import keys
from tests.unit.fakes import FakeKernel

CELL = Cell(
    name="alpha",
    domain="alpha.test",
    address=ipaddress.IPv4Interface("10.61.0.1/22"),
    listen_port=51820,
    endpoint="198.51.100.1:51820",
    private_key=keys.generate_private(),
    interface="pctest0",
    pair_port=51821,
    mesh_port=3000,
    uplink=None,
    mesh_range=ipaddress.IPv4Network("10.0.0.0/8"),
    upstreams=(),
)
KEYS = [keys.public_from_private(keys.generate_private()) for _ in range(260)]


def state_with(n_peers: int, n_services: int) -> State:
    peers = [Peer(f"d{i}", KEYS[i], None, i + 2, None, time.time()) for i in range(n_peers)]
    services = [
        Service(f"s{i}", i + 1, ipaddress.IPv4Address("127.0.0.1"), 8000 + i, "tcp", 80)
        for i in range(n_services)
    ]
    return build_state(CELL, peers, services, ())


def observed_peers(kernel: FakeKernel) -> set[str]:
    peers = kernel.wg["pctest0"]["peers"]
    assert isinstance(peers, dict)
    return set(peers)


def test_first_set_creates_everything(reconciler: Reconciler, kernel: FakeKernel) -> None:
    report = reconciler.set(state_with(2, 1))
    assert report.changed
    assert "pctest0" in kernel.interfaces
    assert kernel.addrs["pctest0"] == {"10.61.0.1/22"}
    assert observed_peers(kernel) == set(KEYS[:2])
    assert kernel.nft_text is not None and "10.61.3.254 tcp dport 80" in kernel.nft_text
    assert reconciler.unbound.running()


def test_second_set_is_a_noop_without_writes(reconciler: Reconciler, kernel: FakeKernel) -> None:
    state = state_with(3, 2)
    reconciler.set(state)
    peers = kernel.wg["pctest0"]["peers"]
    assert isinstance(peers, dict)
    for p in peers.values():
        p["handshake"] = 1700000000  # sessions exist now
    report = reconciler.set(state)
    assert not report.changed
    assert report.write_commands == []
    assert all(p["handshake"] == 1700000000 for p in peers.values())


@pytest.mark.parametrize("n", [1, 50, 250])
def test_processes_per_reconcile_do_not_grow_with_devices(reconciler: Reconciler, n: int) -> None:
    first = reconciler.set(state_with(n, 50))
    change = reconciler.set(state_with(n - 1, 49))
    noop = reconciler.set(state_with(n - 1, 49))
    # create: ip link add (refused), wg show, wg syncconf, ip -j addr, ip -j route, ip -batch,
    # nft -j, nft -f, nft -j, nft -j list chains (the host's other firewalls)
    assert len(first.commands) == 10
    # change: wg show, wg syncconf, ip -j addr, ip -j route, nft -j, nft -f, nft -j,
    # nft -j list chains, unbound-control reload
    assert len(change.commands) == 9
    assert len(noop.commands) == 5


def test_sequence_then_shuffled(reconciler: Reconciler, kernel: FakeKernel) -> None:
    states = [state_with(n, s) for n, s in [(0, 0), (1, 0), (5, 2), (2, 7), (9, 1), (0, 3)]]
    order = states + random.Random(7).sample(states, len(states))
    for state in order:
        reconciler.set(state)
        assert observed_peers(kernel) == {p.public_key for p in state.peers}
        assert kernel.nft_text is not None
        for svc in state.services:
            assert f"ip daddr {svc.vip} tcp dport 80" in kernel.nft_text
        assert kernel.nft_text.count("dnat ip to") == len(state.services)
        assert not reconciler.set(state).changed


def test_drift_is_repaired(reconciler: Reconciler, kernel: FakeKernel) -> None:
    state = state_with(2, 1)
    reconciler.set(state)
    kernel.delete_interface("pctest0")
    kernel.nft_text = None
    report = reconciler.set(state)
    assert {c.area for c in report.changes} >= {"interface", "wireguard", "address", "firewall"}
    assert observed_peers(kernel) == set(KEYS[:2])
    assert not reconciler.set(state).changed


def test_a_changed_table_is_reapplied(reconciler: Reconciler, kernel: FakeKernel) -> None:
    state = state_with(1, 1)
    reconciler.set(state)
    assert kernel.nft_text is not None
    kernel.nft_text += "\n# someone added a rule by hand\n"
    report = reconciler.set(state)
    assert [c.area for c in report.changes] == ["firewall"]


def test_failed_apply_raises_apply_failed(reconciler: Reconciler, kernel: FakeKernel) -> None:
    kernel.fail_on = "nft"
    with pytest.raises(ApplyFailed) as err:
        reconciler.set(state_with(1, 1))
    assert "nft" in err.value.message


def _with_link(inbound: tuple[str, ...]) -> State:
    from picell.store.links import Link, LinkIdentity, OwnerChoices, Share

    net, dns = ipaddress.IPv4Network("10.62.0.0/24"), ipaddress.IPv4Address("10.62.0.1")
    beta = Link(
        "beta",
        KEYS[259],
        LinkIdentity("198.51.100.2:51820", net, dns, "beta.test"),
        state="linked",
        choices=OwnerChoices(shares=tuple(Share(n) for n in inbound)),
    )
    services = [
        Service(f"s{i}", i + 1, ipaddress.IPv4Address("127.0.0.1"), 8000 + i, "tcp", 80)
        for i in range(3)
    ]
    return build_state(CELL, [], services, (), [beta])


def test_a_grant_change_is_one_set_delta_and_a_revoke_cuts_flows(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    reconciler.set(_with_link(("s0",)))
    report = reconciler.set(_with_link(("s0", "s1")))
    nft_writes = [c for c in report.write_commands if c[0] == "nft"]
    assert nft_writes == [("nft", "-f", "-")], report.commands  # no table reload
    assert kernel.grants["grants_tcp"] == {"10.62.0.0/24 . 10.61.3.254 . 80",
                                           "10.62.0.0/24 . 10.61.3.253 . 80"}  # fmt: skip
    assert kernel.flows_cut == []
    # a flow of the linked network to s0 (its original tuple first, then the reply's), and
    # flows no revoked grant covers: another port, another network, another protocol
    kernel.flows = [
        "tcp      6 431999 ESTABLISHED src=10.62.0.2 dst=10.61.3.254 sport=40000 dport=80 "
        "src=127.0.0.1 dst=10.62.0.2 sport=8000 dport=40000 [ASSURED] mark=0 use=1",
        "tcp      6 431999 ESTABLISHED src=10.62.0.2 dst=10.61.3.254 sport=40001 dport=81 "
        "src=127.0.0.1 dst=10.62.0.2 sport=8000 dport=40001 [ASSURED] mark=0 use=1",
        "udp      17 29 src=10.62.0.2 dst=10.61.3.253 sport=5353 dport=80 [UNREPLIED] "
        "src=10.61.3.253 dst=10.62.0.2 sport=80 dport=5353 mark=0 use=1",
    ]
    report = reconciler.set(_with_link(("s1",)))
    assert kernel.grants["grants_tcp"] == {"10.62.0.0/24 . 10.61.3.253 . 80"}
    cut = "conntrack -D -p tcp -s 10.62.0.0 --mask-src 255.255.255.0 -d 10.61.3.254 --dport 80"
    assert kernel.flows_cut == [tuple(cut.split())]
    assert ("conntrack", "-L", "-f", "ipv4") in report.commands
    assert not reconciler.set(_with_link(("s1",))).changed
    # revoking a grant with no tracked flow: one `conntrack -L`, no `-D`
    reconciler.set(_with_link(("s1", "s0")))
    kernel.flows = [line.replace("dport=80 ", "dport=82 ", 1) for line in kernel.flows]
    report = reconciler.set(_with_link(("s1",)))
    assert [c for c in report.commands if c[0] == "conntrack"] == [
        ("conntrack", "-L", "-f", "ipv4")
    ]
    assert len(kernel.flows_cut) == 1


# -- endpoints follow reality (NAT issue) ---------------------------------------------------------
LINK_KEY = KEYS[250]


def state_with_link(n_peers: int, *endpoints: str) -> State:
    """A cell with `n_peers` devices and one linked cell announcing `endpoints`."""
    from picell.store.links import Link, LinkIdentity, LinkState

    ident = LinkIdentity(endpoints[0], ipaddress.IPv4Network("10.62.0.0/24"),
                         ipaddress.IPv4Address("10.62.0.1"), "beta.test",
                         endpoints=endpoints)  # fmt: skip
    link = Link("beta", LINK_KEY, ident, LinkState.LINKED)
    peers = [Peer(f"d{i}", KEYS[i], None, i + 2, None, time.time()) for i in range(n_peers)]
    return build_state(CELL, peers, [], (), [link])


def link_peer(kernel: FakeKernel) -> dict[str, object]:
    peers = kernel.wg["pctest0"]["peers"]
    assert isinstance(peers, dict)
    peer: dict[str, object] = peers[LINK_KEY]
    return peer


def test_a_fresh_link_keeps_the_endpoint_wireguard_learned_through_a_syncconf(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    now = 1_800_000_000.0
    reconciler.clock = lambda: now
    reconciler.set(state_with_link(1, "192.168.1.20:51820"))
    assert link_peer(kernel)["endpoint"] == "192.168.1.20:51820"  # declared, while never seen
    # the other cell's packets came from its NAT: WireGuard roamed there, and a session is fresh
    link_peer(kernel).update(endpoint="203.0.113.50:40001", handshake=int(now) - 10)
    report = reconciler.set(state_with_link(2, "192.168.1.20:51820"))  # a device added
    assert any(c.kind == "add" for c in report.changes)  # a syncconf ran ...
    assert "Endpoint = 192.168.1.20" not in reconciler.paths.wg_conf.read_text()
    assert link_peer(kernel)["endpoint"] == "203.0.113.50:40001"  # ... and kept the roamed one


def test_a_fresh_link_that_announces_a_move_gets_its_new_endpoint_at_once(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    now = 1_800_000_000.0
    reconciler.clock = lambda: now
    reconciler.set(state_with_link(1, "198.51.100.2:51820"))
    link_peer(kernel).update(endpoint="198.51.100.2:51820", handshake=int(now) - 10)
    reconciler.set(state_with_link(1, "198.51.100.2:51820"))
    assert link_peer(kernel)["endpoint"] == "198.51.100.2:51820"
    # it tells us it moved (a new pairing, its signed document) while the session is fresh
    reconciler.set(state_with_link(1, "198.51.100.22:51820"))
    assert link_peer(kernel)["endpoint"] == "198.51.100.22:51820"
    # from then on, what WireGuard learns wins again (its NAT, say)
    link_peer(kernel).update(endpoint="203.0.113.50:40001", handshake=int(now) - 5)
    reconciler.set(state_with_link(2, "198.51.100.22:51820"))
    assert link_peer(kernel)["endpoint"] == "203.0.113.50:40001"


def test_a_stale_link_tries_its_endpoints_in_turn_and_resolves_a_name_again(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    from picell.constants import ENDPOINT_RETRY_S, LINK_STALE_S

    now = [1_800_000_000.0]
    reconciler.clock = lambda: now[0]
    state = state_with_link(1, "home.beta.test:51820", "[2001:db8::2]:51820")
    reconciler.set(state)
    link_peer(kernel).update(endpoint="203.0.113.50:40001", handshake=int(now[0]))
    now[0] += LINK_STALE_S + 1  # no handshake since: stale
    reconciler.set(state)
    assert link_peer(kernel)["endpoint"] == "[2001:db8::2]:51820"  # the next one
    reconciler.set(state)  # too soon for another try: nothing changes
    assert link_peer(kernel)["endpoint"] == "[2001:db8::2]:51820"
    now[0] += ENDPOINT_RETRY_S
    reconciler.set(state)
    assert link_peer(kernel)["endpoint"] == "home.beta.test:51820"  # back to the first
    # one name alone: each try sets it again by hand, so wg resolves it anew (a new address)
    alone = state_with_link(1, "home.beta.test:51820")
    for _ in range(2):
        now[0] += ENDPOINT_RETRY_S
        link_peer(kernel)["endpoint"] = "198.51.100.77:51820"  # what the name resolved to
        report = reconciler.set(alone)
        sets = [c for c in report.commands if c[:2] == ("wg", "set")]
        assert sets == [("wg", "set", "pctest0", "peer", LINK_KEY, "endpoint",
                         "home.beta.test:51820")]  # fmt: skip
