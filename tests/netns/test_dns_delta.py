"""Unbound record deltas against the real Unbound: after each change applied as a delta, the
running Unbound holds exactly what a fresh Unbound started on the new config file holds (the
file and the running resolver never disagree), it answers the new names at once, and it was
never reloaded (same process, its query count never reset).

Topology (one namespace, no cell):

  dns ns: lo 127.0.0.1, 10.61.0.1 (alpha's resolver), 10.62.0.1 (a source in beta's view)
    unbound "delta"  10.61.0.1:53    driven by picell.dns.unbound.Unbound (deltas, reloads)
    unbound "fresh"  10.61.0.1:5354  started anew on each step's config, then stopped
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from picell.dns.render import render_unbound
from picell.dns.unbound import Unbound
from picell.state import DnsState, State, build_state
from picell.store.cell import Cell
from picell.store.links import Link, LinkIdentity, LinkState, OwnerChoices, Share
from picell.store.services import Service
from picell.system.children import Child
from picell.system.run import Runner
from picell.wireguard import keys
from tests.netns.harness import Netns, Topology, wait_until

CELL = Cell(
    name="alpha",
    domain="alpha.test",
    address=ipaddress.IPv4Interface("10.61.0.1/24"),
    listen_port=51820,
    endpoint="198.51.100.1:51820",
    private_key=keys.generate_private(),
    interface="pcdelta0",
    pair_port=51821,
    mesh_port=3000,
    uplink=None,
    mesh_range=ipaddress.IPv4Network("10.0.0.0/8"),
    upstreams=(),
)
LINK_KEYS = [keys.public_from_private(keys.generate_private()) for _ in range(2)]


def _state(shares: dict[str, tuple[str, ...]], services: int = 3, shift: int = 0) -> State:
    svcs = [
        Service(f"s{i}", i + 1 + shift, ipaddress.IPv4Address("127.0.0.1"), 8000 + i, "tcp", 80)
        for i in range(services)
    ]
    links = [
        Link(
            name,
            LINK_KEYS[i],
            LinkIdentity(
                f"198.51.100.{i + 2}:51820",
                ipaddress.IPv4Network(f"10.{62 + i}.0.0/24"),
                ipaddress.IPv4Address(f"10.{62 + i}.0.1"),
                f"{name}.test",
            ),
            LinkState.LINKED,
            OwnerChoices(shares=tuple(Share(n) for n in inbound)),
        )
        for i, (name, inbound) in enumerate(shares.items())
    ]
    return build_state(CELL, [], svcs, (), links)


def _relayed(dns: DnsState, name: str) -> DnsState:
    """`name`'s devices leave to the internet through us: its view resolves internet names."""
    return replace(dns, views=tuple(replace(v, internet=v.name == name) for v in dns.views))


class Resolver:
    def __init__(self, ns: Netns, workdir: Path, name: str) -> None:
        self.ns, self.workdir = ns, workdir
        self.conf = workdir / "unbound.conf"
        self.control = workdir / "control.sock"
        workdir.mkdir(parents=True, exist_ok=True)

        def make_child(child: str, argv: list[str]) -> Child:
            return Child(child, ns.argv(argv), workdir / f"{child}.log")

        self.unbound = Unbound(Runner(), self.conf, make_child, name)

    def render(self, dns: DnsState) -> str:
        return render_unbound(dns, self.workdir, self.control)

    def set(self, dns: DnsState) -> str:
        text = self.render(dns)
        changes = self.unbound.needs(text, dns)
        how = self.unbound.apply(text, changes, dns) if changes else ""
        if "start" in changes:
            wait_until(self.control.exists, 10, "unbound did not start")
        return how

    def ctl(self, *args: str) -> str:
        return self.ns.run(["unbound-control", "-c", str(self.conf), *args]).stdout

    def holds(self, views: list[str]) -> dict[str, list[str]]:
        """What this Unbound serves from local data, as it lists it."""
        held = {"zones": self.ctl("list_local_zones"), "data": self.ctl("list_local_data")}
        for view in views:
            held[f"{view} zones"] = self.ctl("view_list_local_zones", view)
            held[f"{view} data"] = self.ctl("view_list_local_data", view)
        return {k: sorted(ln for ln in v.splitlines() if ln.strip()) for k, v in held.items()}

    def queries(self) -> int:
        out = self.ctl("stats_noreset")
        line = next(ln for ln in out.splitlines() if ln.startswith("total.num.queries="))
        return int(line.split("=")[1])


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Netns, Path]]:
    with Topology() as topo:
        ns = topo.add_ns("dns")
        for addr in ("10.61.0.1/32", "10.62.0.1/32"):
            ns.run(["ip", "addr", "add", addr, "dev", "lo"])
        yield ns, topo.workdir


def test_deltas_leave_what_a_restart_on_the_new_file_would(world: tuple[Netns, Path]) -> None:
    ns, workdir = world
    live = Resolver(ns, workdir / "live", "unbound-live")
    assert live.set(_state({"beta": (), "gamma": ()}).dns) == "start"
    pid = live.unbound.child.pid
    steps = [
        _state({"beta": ("s0",), "gamma": ()}).dns,  # a share
        _state({"beta": ("s0",), "gamma": ("s1", "s2")}).dns,  # another view, two names
        _state({"beta": (), "gamma": ("s1", "s2")}).dns,  # an unshare
        _state({"beta": (), "gamma": ("s1", "s2")}, services=4).dns,  # a new service
        _state({"beta": ("s1",), "gamma": ("s1", "s2")}, shift=7).dns,  # every address moves
        _relayed(_state({"beta": ("s1",), "gamma": ("s2",)}).dns, "beta"),  # zones swap
        _state({"beta": ("s1",), "gamma": ("s2",)}).dns,  # and back
    ]
    for step, dns in enumerate(steps):
        for _ in range(3):  # queries a reload would reset
            assert ns.dig("alpha.test", server="10.61.0.1") == ["10.61.0.1"]
        before = live.queries()
        assert live.set(dns) == "delta", step
        fresh = Resolver(ns, workdir / f"fresh{step}", f"unbound-fresh{step}")
        assert fresh.set(replace(dns, port=5354)) == "start"
        try:
            views = [f"link-{v.name}" for v in dns.views]
            assert live.holds(views) == fresh.holds(views), step
        finally:
            fresh.unbound.stop()
        assert live.conf.read_text() == live.render(dns)  # a restart would read the same
        assert live.queries() >= before and live.unbound.child.pid == pid
    # what beta's network resolves here, answered by the delta-fed Unbound
    assert ns.dig_status("s1.alpha.test", server="10.61.0.1") == "NOERROR"  # our own devices
    assert _view_answer(ns, "s1.alpha.test") == "NOERROR"  # shared with beta
    assert _view_answer(ns, "s2.alpha.test") == "NXDOMAIN"  # shared with gamma only
    assert _view_answer(ns, "www.example.net") == "REFUSED"  # no relay for beta any more


def test_a_new_link_is_a_reload_that_keeps_the_same_process(world: tuple[Netns, Path]) -> None:
    ns, workdir = world
    live = Resolver(ns, workdir / "links", "unbound-links")
    live.set(_state({"beta": ()}).dns)
    pid = live.unbound.child.pid
    assert "no view with name" in _views(live)
    assert live.set(_state({"beta": (), "gamma": ()}).dns) == "reload"
    assert live.unbound.child.pid == pid
    assert "alpha.test. static" in _views(live)  # the reload has added gamma's view
    live.unbound.stop()


def _views(live: Resolver) -> str:
    """The zones of gamma's view ("no view with name" until a reload adds it)."""
    return live.ns.run(
        ["unbound-control", "-c", str(live.conf), "view_list_local_zones", "link-gamma"],
        check=False,
    ).stdout


def _view_answer(ns: Netns, name: str) -> str:
    """The rcode for a query from beta's network (its view)."""
    argv = ["dig", "+noall", "+comments", "+time=1", "+tries=1", "-b", "10.62.0.1"]
    out = ns.run([*argv, "@10.61.0.1", name, "A"], check=False).stdout
    match = re.search(r"status: ([A-Z]+)", out)
    return match.group(1) if match else "TIMEOUT"
