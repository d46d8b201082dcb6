"""Unbound record deltas: the plan between two DNS states, and the reconciler applying it
against the fake runner (records go in without a reload; anything else, or a failure, reloads).

The real Unbound's equivalence (a delta leaves what a restart on the new file would hold) is
proven in tests/netns/test_dns_delta.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from picell.control import Control
from picell.dns import delta
from picell.dns.delta import Command
from picell.dns.render import render_unbound
from picell.reconcile import Reconciler
from picell.state import DnsRecord, DnsState, State, build_state
from picell.store.links import Link, LinkIdentity, LinkState, OwnerChoices, Share
from picell.store.services import Service
from tests.unit.fakes import FakeKernel
from tests.unit.test_reconcile import CELL, KEYS


def _link(name: str, index: int, inbound: tuple[str, ...] = ()) -> Link:
    ident = LinkIdentity(
        f"198.51.100.{index}:51820",
        ipaddress.IPv4Network(f"10.{61 + index}.0.0/24"),
        ipaddress.IPv4Address(f"10.{61 + index}.0.1"),
        f"{name}.test",
    )
    return Link(
        name,
        KEYS[200 + index],
        ident,
        LinkState.LINKED,
        OwnerChoices(shares=tuple(Share(n) for n in inbound)),
    )


def cell(shares: dict[str, tuple[str, ...]], services: int = 3, vip_shift: int = 0) -> State:
    svcs = [
        Service(f"s{i}", i + 1 + vip_shift, ipaddress.IPv4Address("127.0.0.1"), 8000 + i, "tcp", 80)
        for i in range(services)
    ]
    links = [_link(name, i + 1, inbound) for i, (name, inbound) in enumerate(shares.items())]
    return build_state(CELL, [], svcs, (), links)


def dns(shares: dict[str, tuple[str, ...]], **kw: int) -> DnsState:
    return cell(shares, **kw).dns


# -- the plan -------------------------------------------------------------------------------------


def test_a_share_is_one_view_add_and_an_unshare_one_view_remove() -> None:
    before, after = dns({"beta": ("s0",)}), dns({"beta": ("s0", "s1")})
    assert delta.plan(before, after) == [
        Command(("view_local_datas", "link-beta"), "s1.alpha.test. 60 IN A 10.61.3.253\n")
    ]
    assert delta.plan(after, before) == [
        Command(("view_local_datas_remove", "link-beta"), "s1.alpha.test.\n")
    ]
    assert delta.plan(after, after) == []


def test_only_the_view_that_changed_is_touched() -> None:
    before = dns({"beta": ("s0",), "gamma": ()})
    after = dns({"beta": ("s0",), "gamma": ("s2",)})
    assert delta.plan(before, after) == [
        Command(("view_local_datas", "link-gamma"), "s2.alpha.test. 60 IN A 10.61.3.252\n")
    ]


def test_a_new_service_changes_the_global_zone_and_an_address_is_a_remove_then_add() -> None:
    assert delta.plan(dns({}, services=1), dns({}, services=2)) == [
        Command(("local_datas",), "s1.alpha.test. 60 IN A 10.61.3.253\n")
    ]
    moved = delta.plan(dns({"beta": ("s0",)}), dns({"beta": ("s0",)}, vip_shift=3))
    assert moved is not None
    removes = [c for c in moved if c.args[0].endswith("_remove")]
    adds = [c for c in moved if not c.args[0].endswith("_remove")]
    assert moved.index(removes[0]) < moved.index(adds[0])  # remove the name, then add it
    assert (
        Command(("local_datas_remove",), "s0.alpha.test.\ns1.alpha.test.\ns2.alpha.test.\n")
        in moved
    )
    assert Command(("view_local_datas_remove", "link-beta"), "s0.alpha.test.\n") in moved
    assert (
        Command(("view_local_datas", "link-beta"), "s0.alpha.test. 60 IN A 10.61.3.251\n") in moved
    )


@pytest.mark.parametrize(
    "after",
    [
        {"beta": ("s0",), "gamma": ()},  # a new link: a view, a forward zone
        {},  # a link gone
    ],
)
def test_views_or_forwards_that_change_need_a_reload(after: dict[str, tuple[str, ...]]) -> None:
    assert delta.plan(dns({"beta": ("s0",)}), dns(after)) is None


def test_upstreams_access_and_listen_need_a_reload() -> None:
    base = dns({"beta": ()})
    for changed in (
        replace(base, upstreams=(ipaddress.IPv4Address("192.0.2.53"),)),
        replace(base, allow=(ipaddress.IPv4Network("10.70.0.0/24"),)),
        replace(base, listen=ipaddress.IPv4Address("10.61.0.2")),
        replace(base, domain="other.test"),
    ):
        assert delta.plan(base, changed) is None


def test_relaying_a_links_internet_swaps_its_view_zones() -> None:
    base = dns({"beta": (), "gamma": ()})
    beta = base.views[0]
    relayed = replace(base, views=(replace(beta, internet=True), base.views[1]))
    assert delta.plan(base, relayed) == [
        Command(("view_local_zone_remove", "link-beta", ".")),
        Command(("view_local_zone", "link-beta", "gamma.test.", "refuse")),
    ]
    assert delta.plan(relayed, base) == [
        Command(("view_local_zone_remove", "link-beta", "gamma.test.")),
        Command(("view_local_zone", "link-beta", ".", "refuse")),
    ]


@pytest.mark.parametrize(
    "fqdn", ["evil.alpha.test. 60 IN A 1.2.3.4\nx.alpha.test", "a b.alpha.test", "a..test", ""]
)
def test_a_name_that_fails_the_check_never_reaches_unbound_control(fqdn: str) -> None:
    base = dns({"beta": ()})
    bad = replace(
        base, records=(*base.records, DnsRecord(fqdn, ipaddress.IPv4Address("10.61.0.9")))
    )
    assert delta.plan(base, bad) is None
    assert delta.plan(bad, base) is None


# -- the reconciler applies it ------------------------------------------------------------------


def _unbound_calls(kernel: FakeKernel) -> list[tuple[tuple[str, ...], str | None]]:
    calls = [(a[3:], s) for a, s in kernel.stdins if a[0] == "unbound-control"]
    kernel.stdins.clear()
    return calls


def _conf(reconciler: Reconciler) -> str:
    return Path(reconciler.paths.unbound_conf).read_text()


def test_a_share_goes_in_as_a_delta_and_the_file_matches_a_restart(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    reconciler.set(cell({"beta": ()}))
    _unbound_calls(kernel)
    state = cell({"beta": ("s1",)})
    report = reconciler.set(state)
    assert _unbound_calls(kernel) == [
        (("view_local_datas", "link-beta"), "s1.alpha.test. 60 IN A 10.61.3.253\n")
    ]
    assert "dns: records unbound" in [str(c) for c in report.changes]
    assert reconciler.applied["unbound records"] == 1
    paths = reconciler.paths
    assert _conf(reconciler) == render_unbound(state.dns, paths.unbound_dir, paths.unbound_control)
    assert not reconciler.set(state).changed
    assert _unbound_calls(kernel) == []


def test_a_new_link_reloads(reconciler: Reconciler, kernel: FakeKernel) -> None:
    reconciler.set(cell({"beta": ()}))
    _unbound_calls(kernel)
    reloads = reconciler.applied["unbound"]
    reconciler.set(cell({"beta": (), "gamma": ()}))
    assert _unbound_calls(kernel) == [(("reload",), None)]
    assert reconciler.applied["unbound"] == reloads + 1


def test_a_delta_that_fails_falls_back_to_a_reload(
    reconciler: Reconciler, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    reconciler.set(cell({"beta": ()}))
    _unbound_calls(kernel)
    real = kernel.run

    def no_view(argv, **kw):  # type: ignore[no-untyped-def]
        result = real(argv, **kw)
        if "view_local_datas" in argv:
            return replace(result, stdout="no view with name: link-beta\n")  # real rc is 0
        return result

    monkeypatch.setattr(kernel, "run", no_view)
    state = cell({"beta": ("s0",)})
    reconciler.set(state)
    calls = [a for a, _ in _unbound_calls(kernel)]
    assert calls == [("view_local_datas", "link-beta"), ("reload",)]
    assert reconciler.applied["unbound records"] == 0
    paths = reconciler.paths
    assert _conf(reconciler) == render_unbound(state.dns, paths.unbound_dir, paths.unbound_control)


def test_an_adopted_unbound_with_an_older_file_is_reloaded_once(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    """A new daemon does not know what the running Unbound holds until its file matches."""
    reconciler.set(cell({"beta": ()}))
    reconciler.unbound._applied = None  # as after a daemon restart that adopted it
    reconciler.set(cell({"beta": ("s0",)}))
    assert [a for a, _ in _unbound_calls(kernel)][-1] == ("reload",)
    reconciler.set(cell({"beta": ("s0", "s2")}))
    assert [a for a, _ in _unbound_calls(kernel)] == [("view_local_datas", "link-beta")]


# -- the other side: their names changed -----------------------------------------------------------


def test_a_document_that_changes_their_shares_flushes_their_zone_at_once(
    control: Control, kernel: FakeKernel
) -> None:
    """The flush does not wait for the coalesced converge: their Unbound already holds the
    name when they send the document, and ours may hold its NXDOMAIN."""
    from picell.mesh.sync import Sync
    from tests.unit.test_mesh import _linked_pair, _state_from_beta

    class Later:  # a coalescer whose window has not ended yet
        def ask(self) -> None:
            pass

    links, beta_private, _ = _linked_pair(control)
    control.reconciler.unbound.child.start()  # type: ignore[union-attr]
    control.coalescer = Later()  # type: ignore[assignment]
    kernel.history.clear()
    web = [{"name": "web", "vip": "10.62.0.254", "ports": [80], "protocol": "tcp"}]
    Sync(links).receive_state(_state_from_beta(control, beta_private, 1, shared_services=web),
                              "10.62.0.1")  # fmt: skip
    flushes = [a[3:] for a in kernel.history if a[0] == "unbound-control"]
    assert flushes == [("flush_zone", "beta.test")]
    kernel.history.clear()
    Sync(links).receive_state(_state_from_beta(control, beta_private, 2, shared_services=web),
                              "10.62.0.1")  # fmt: skip
    assert [a for a in kernel.history if a[0] == "unbound-control"] == []  # nothing changed
