"""The observers read every state `wg show dump`, `nft -j` and `ip -j` can report without raising:
what they cannot read is drift for the next reconcile (reported as an anomaly), never a 500.

The samples are real outputs (wireguard-tools v1.0.20210914, iproute2 6.1, nft 1.0.6) where a
real tool was at hand, hand-made otherwise.
"""

from __future__ import annotations

import ipaddress
import json

import pytest
from fastapi.testclient import TestClient

from picell.app import build_api
from picell.control import Control
from picell.firewall.apply import parse_table
from picell.reconcile import Reconciler
from picell.routing.apply import Route, parse_links, parse_routes
from picell.routing.exits import parse_rules
from picell.routing.host import default_uplinks, observe_host_address, observe_host_networks
from picell.wireguard.apply import diff_peers, parse_wg_dump
from tests.unit.fakes import FakeKernel
from tests.unit.test_reconcile import KEYS, state_with

K1 = "sKgipcjKwSAssLnz3z6CKYPFT2uFbE3fHGzVFvI9qkc="
P1 = "Lb5JA13q4wwPPcf575vGzqOPII+5RQd7YNWYD/dhel4="
P2 = "/okQDeZgjH95IvPV+qTziYmDe/Zj4U20TkXyKx60tS4="
# a peer that lost its only IPv4 network to a later peer keeps its IPv6 one; one that lost all
# shows (none); an IPv6 endpoint in brackets
REAL_DUMP = (
    f"{K1}\tYUmseJPdjS7hFnqefZ/LXU5yLvyEjiKp0TbLF43PLiU=\t51999\toff\n"
    f"{P1}\t(none)\t[2001:db8::1]:51820\tfd00::/64\t0\t0\t0\t25\n"
    f"{P2}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
)


# -- WireGuard ---------------------------------------------------------------------------------
def test_wg_dump_with_none_ipv6_and_off_parses() -> None:
    wg = parse_wg_dump(REAL_DUMP)
    assert wg is not None and wg.private_key == K1 and wg.listen_port == 51999
    assert wg.anomalies == ()
    lost_v4, lost_all = wg.peers[P1], wg.peers[P2]
    assert lost_v4.endpoint == "[2001:db8::1]:51820" and lost_v4.keepalive_s == 25
    assert lost_v4.allowed_ips == () and lost_v4.foreign_ips == ("fd00::/64",)
    assert lost_all.endpoint is None and lost_all.allowed_ips == () and lost_all.foreign_ips == ()
    assert lost_all.keepalive_s == 0 and lost_all.latest_handshake == 0


def test_wg_dump_of_a_bare_device_and_of_nothing() -> None:
    bare = parse_wg_dump("(none)\t(none)\t0\toff\n")
    assert bare is not None and bare.private_key == "" and bare.listen_port == 0
    assert bare.peers == {}
    assert parse_wg_dump("") is None and parse_wg_dump("\n\n") is None


@pytest.mark.parametrize(
    ("text", "anomaly"),
    [
        (f"{K1}\n", "interface line"),
        (f"{K1}\tpub\tnot-a-port\toff\n", "listen port"),
        (f"{K1}\tpub\t1\toff\n{P1}\t(none)\n", "peer line"),
        (f"{K1}\tpub\t1\toff\n{P1}\t(none)\t(none)\t10.0.0.0/8\tsoon\t0\t0\toff\n", "handshake"),
        (f"{K1}\tpub\t1\toff\n{P1}\t(none)\t(none)\t10.0.0.0/8\t0\t0\t0\tnever\n", "keepalive"),
        (f"{K1}\tpub\t1\toff\n{P1}\t(none)\t(none)\t10.0.0.0/8\t0\t-\t0\toff\textra\n", "rx"),
    ],
)
def test_unreadable_wg_fields_are_anomalies_not_errors(text: str, anomaly: str) -> None:
    wg = parse_wg_dump(text)
    assert wg is not None
    assert any(anomaly in a for a in wg.anomalies), wg.anomalies


def test_a_peer_that_lost_its_addresses_is_drift_to_sync() -> None:
    state = state_with(2, 0)
    keys = [p.public_key for p in state.peers]
    dump = f"{K1}\tpub\t51820\toff\n" + "".join(
        f"{k}\t(none)\t(none)\t{a}\t0\t0\t0\toff\n"
        for k, a in zip(keys, ["(none)", "fd00::/8"], strict=True)
    )
    changes = diff_peers(state.peers, parse_wg_dump(dump))
    assert sorted(changes) == sorted(("update", p.name) for p in state.peers)


def test_listing_devices_answers_when_a_peer_lost_its_addresses(
    control: Control, kernel: FakeKernel
) -> None:
    """The reported failure: `(none)` in allowed IPs made every call reading WireGuard a 500."""
    client = TestClient(build_api(control))
    assert client.post("/api/peers", json={"name": "phone"}).status_code == 201
    peers = kernel.wg["pctest0"]["peers"]
    assert isinstance(peers, dict)
    for p in peers.values():
        p["allowed"] = ""  # another peer took them: `wg` prints (none)
    resp = client.get("/api/peers")
    assert resp.status_code == 200 and resp.json()[0]["name"] == "phone"
    report = client.post("/api/reconcile").json()
    assert "wireguard: update phone" in report["changes"]
    peers = kernel.wg["pctest0"]["peers"]
    assert isinstance(peers, dict)
    assert [p["allowed"] for p in peers.values()] == ["10.61.0.2/32"]


def test_reconcile_repairs_a_peer_without_addresses(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    state = state_with(2, 0)
    reconciler.set(state)
    peers = kernel.wg["pctest0"]["peers"]
    assert isinstance(peers, dict)
    peers[KEYS[0]]["allowed"] = ""
    peers[KEYS[1]]["allowed"] = "10.61.0.3/32,fd00::1/128"  # an address we never give
    report = reconciler.set(state)
    assert sorted(str(c) for c in report.changes) == [
        "wireguard: update d0",
        "wireguard: update d1",
    ]
    assert not reconciler.set(state).changed


# -- nftables ----------------------------------------------------------------------------------
def test_nft_output_of_any_shape_reads_without_raising() -> None:
    for text in ("", "not json", "[]", '{"nftables": 3}', '{"nftables": [1, "x", null]}'):
        table = parse_table(text)
        assert table.digest is None and table.grants == {
            "grants_tcp": frozenset(),
            "grants_udp": frozenset(),
        }
    assert parse_table("not json").anomalies == ("nft: output is not JSON",)
    assert parse_table('{"nftables": 3}').anomalies == ("nft: no list of objects",)


def test_nft_objects_we_do_not_know_are_fingerprinted_not_refused() -> None:
    base = [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "picell"}},
            {"rule": {"chain": "input", "comment": "picell abc", "expr": []}}]  # fmt: skip
    extra = [{"flowtable": {"name": "f", "hook": "ingress", "dev": ["eth0"]}},
             {"map": {"name": "m", "type": "ipv4_addr", "map": "verdict"}},
             {"quota": {"name": "q", "bytes": 1}}, {"ct helper": {"name": "ftp"}},
             {"rule": "a rule that is not an object"}, {"set": ["odd"]}]  # fmt: skip
    plain = parse_table(json.dumps({"nftables": base}))
    odd = parse_table(json.dumps({"nftables": base + extra}))
    assert plain.digest == odd.digest == "picell abc"
    assert plain.fingerprint != odd.fingerprint and odd.anomalies == ()


def test_grant_elements_of_every_shape() -> None:
    def grants(*elems: object) -> tuple[frozenset[str], tuple[str, ...]]:
        nft = {"nftables": [{"set": {"name": "grants_tcp", "elem": list(elems)}}]}
        table = parse_table(json.dumps(nft))
        return table.grants["grants_tcp"], table.anomalies

    prefix = {"concat": [{"prefix": {"addr": "10.62.0.0", "len": 24}}, "10.61.0.254", 80]}
    ranged = {"concat": [{"range": ["10.62.0.0", "10.62.0.255"]}, "10.61.0.254", 443]}
    host = {"elem": {"val": {"concat": ["10.62.0.7", "10.61.0.254", 22]}, "counter": {}}}
    assert grants(prefix, ranged, host) == (
        frozenset({"10.62.0.0/24 . 10.61.0.254 . 80", "10.62.0.0/24 . 10.61.0.254 . 443",
                   "10.62.0.7/32 . 10.61.0.254 . 22"}),
        (),
    )  # fmt: skip
    for odd in ("10.0.0.1", {"concat": ["a"]}, {"concat": [{"range": [1]}, "x", 1]},
                {"concat": [{"prefix": {"addr": "x"}}, "y", 1]}, {"elem": {}}):  # fmt: skip
        found, anomalies = grants(prefix, odd)
        assert found == {"10.62.0.0/24 . 10.61.0.254 . 80"}
        assert anomalies == ("nft: unreadable element of grants_tcp",)


def test_an_unreadable_table_is_replaced_whole(reconciler: Reconciler, kernel: FakeKernel) -> None:
    state = state_with(1, 1)
    reconciler.set(state)
    kernel.grants["grants_tcp"] = {"garbage"}  # an element no grant delta could name
    report = reconciler.set(state)
    assert [str(c) for c in report.changes] == ["firewall: update inet picell"]
    assert report.anomalies == ["nft: unreadable element of grants_tcp"]
    assert kernel.grants.get("grants_tcp", set()) == set()
    assert reconciler.anomalies["nft"] == 1
    assert not reconciler.set(state).changed


def test_a_foreign_nft_object_is_drift(reconciler: Reconciler, kernel: FakeKernel) -> None:
    state = state_with(1, 0)
    reconciler.set(state)
    kernel.nft_extra = [{"flowtable": {"name": "sneaky"}}]
    assert [str(c) for c in reconciler.set(state).changes] == ["firewall: update inet picell"]


# -- ip ----------------------------------------------------------------------------------------
REAL_ROUTES = [  # `ip -j -N -4 route show table all` with a multipath default route
    {"type": "6", "dst": "default", "table": "7700", "protocol": "77", "metric": 4096,
     "flags": []},
    {"dst": "default", "gateway": "10.8.0.2", "dev": "obsv0", "table": "100", "metric": 50,
     "flags": []},
    {"dst": "default", "flags": [], "nexthops": [
        {"gateway": "10.9.0.2", "dev": "obsx0", "weight": 1, "flags": []},
        {"gateway": "10.8.0.2", "dev": "obsv0", "weight": 1, "flags": []}]},
    {"dst": "10.77.0.0/24", "dev": "obsx0", "protocol": "77", "scope": "253",
     "prefsrc": "10.9.0.1", "flags": []},
    {"dst": "192.168.77.0/24", "dev": "obsx0", "protocol": "4", "scope": "253", "flags": []},
    {"type": "2", "dst": "10.9.0.1", "dev": "obsx0", "table": "255", "protocol": "2",
     "scope": "254", "prefsrc": "10.9.0.1", "flags": []},
]  # fmt: skip


def test_routes_of_every_shape() -> None:
    routes = parse_routes(json.dumps(REAL_ROUTES))
    assert routes.anomalies == ()
    blackhole, other_table, multipath, ours, lan, local = routes.routes
    assert (blackhole.kind, blackhole.table, blackhole.dst_text) == ("blackhole", "7700", "default")
    assert multipath.table == "main" and multipath.devs == ("obsx0", "obsv0")
    assert ours.proto == "77" and lan.proto == "4" and local.table == "local"
    assert other_table.table == "100" and other_table.metric == 50
    assert ours.dst == ipaddress.IPv4Network("10.77.0.0/24")


@pytest.mark.parametrize(
    ("text", "anomaly"),
    [
        ("", None),
        ("garbage", "ip route: output is not JSON"),
        ('{"dst": "default"}', "ip route: output is not a list"),
        ('[{"dev": "eth0"}]', "ip route: a route without a destination"),
        ('[{"dst": ""}]', "ip route: a route without a destination"),
        ('[{"dst": "fe80::/64"}]', "ip route: unreadable destination 'fe80::/64'"),
        ('[{"dst": 7}]', "ip route: a route without a destination"),
        ('[1, null, "x"]', None),
    ],
)
def test_unreadable_routes_are_anomalies(text: str, anomaly: str | None) -> None:
    routes = parse_routes(text)
    assert routes.routes == ()
    assert routes.anomalies == ((anomaly,) if anomaly else ())


def test_odd_route_fields_read_as_defaults() -> None:
    text = '[{"dst": "10.1.2.3", "metric": "high", "nexthops": [1, {"dev": 2}]}]'
    (r,) = parse_routes(text).routes
    assert r == Route(ipaddress.IPv4Network("10.1.2.3/32"))


def test_links_of_every_shape() -> None:
    out = json.dumps([
        {"ifname": "eth0", "flags": ["UP"], "mtu": 1500, "addr_info": [
            {"family": "inet", "local": "198.51.100.1", "prefixlen": 24},
            {"family": "inet6", "local": "2001:db8::1", "prefixlen": 64}]},
        {"ifname": "wg0", "flags": "UP", "mtu": "big"},
        {"ifname": "odd", "addr_info": [{"family": "inet"}, "x", {"family": "inet",
                                        "local": "300.1.1.1", "prefixlen": 8}]},
        {"flags": ["UP"]},
    ])  # fmt: skip
    links, anomalies = parse_links(out)
    assert links["eth0"].up and links["eth0"].mtu == 1500
    assert links["eth0"].addresses == {ipaddress.IPv4Interface("198.51.100.1/24")}
    assert not links["wg0"].up and links["wg0"].mtu == 0 and links["odd"].addresses == set()
    assert anomalies == ["ip addr: an unreadable address on odd"] * 2 + [
        "ip addr: an interface without a name"
    ]
    assert parse_links("nonsense") == ({}, ["ip addr: output is not JSON"])


def test_rules_of_every_shape() -> None:
    out = json.dumps([
        {"priority": 0, "src": "all", "table": "local"},
        {"priority": 7700, "src": "all", "fwmark": "0x5c1", "table": "7701"},
        {"priority": 7700, "src": "all", "fwmark": "0x5c2", "fwmask": "0xff", "table": "main"},
        {"priority": 7700, "src": "all", "table": "7702"},
        {"priority": 7700, "fwmark": "zz", "table": "7703"},
    ])  # fmt: skip
    assert parse_rules(out) == {(0x5C1, 7701)}
    assert parse_rules("not json") == frozenset() and parse_rules('{"a": 1}') == frozenset()


def test_host_observers_survive_odd_output() -> None:
    kernel = FakeKernel()
    kernel.run = lambda argv, **kw: type("R", (), {"stdout": '[1, {"addr_info": 3}]'})()  # type: ignore[method-assign]
    assert observe_host_address(kernel) is None
    assert observe_host_networks(kernel) == []


# -- the default uplink --------------------------------------------------------------------------
def _routes(*routes: dict[str, object]) -> object:
    return parse_routes(json.dumps(list(routes)))


def test_the_default_uplink_is_the_default_routes_interface() -> None:
    eth0 = {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0", "metric": 100}
    tun0 = {"dst": "10.0.0.0/8", "dev": "tun0", "protocol": "4"}  # a corporate VPN's routes
    wlan = {"dst": "default", "gateway": "192.0.2.1", "dev": "wlan0", "metric": 600}
    assert default_uplinks(_routes(eth0, tun0, wlan), ()) == ("eth0",)  # type: ignore[arg-type]
    assert default_uplinks(_routes(tun0), ()) == ()  # type: ignore[arg-type]
    multipath = {"dst": "default", "nexthops": [{"dev": "eth0"}, {"dev": "eth1"}]}
    assert default_uplinks(_routes(multipath), ()) == ("eth0", "eth1")  # type: ignore[arg-type]
    in_table = {"dst": "default", "dev": "eth9", "table": "100"}
    ours = {"dst": "default", "dev": "pc0", "metric": 1}
    blackhole = {"dst": "default", "type": "6", "metric": 0}
    assert default_uplinks(_routes(in_table, ours, blackhole, wlan), ("pc0",)) == ("wlan0",)  # type: ignore[arg-type]
