"""Rendered files from hostile identities pass their own checkers (issue 11, "Proof").

Hypothesis redeems a cell's invites with many generated identities (tests/unit/hostile.py: every
form of endpoint, domain and network the protocol takes, plus hostile mutations) and sends the
linked ones state documents that move their endpoints, all in-process against the fake kernel's
store. What was accepted is then rendered into one state, and each file is checked once, by the
program that reads it, in a throwaway namespace:

    +-------------------- pc<tag>chk ---------------------+
    |  wireguard-go wgchk<tag>N <- wg setconf (rendered)   |
    |  nft -c -f, nft -f (rendered table inet picell)      |
    |  unbound -d -c (rendered), unbound-control           |
    |  /etc/netns/<ns>/hosts: the linked host names        |
    +------------------------------------------------------+

Each holds exactly the expected peers (one per link, exactly its AllowedIPs and endpoint), sets
(linked networks, grants) and forward zones, as the checker itself reports them. Must run as
root (tests/netns).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from picell.cellinit import InitRequest
from picell.control import Control
from picell.dns.render import render_unbound
from picell.errors import PicellError
from picell.firewall.render import render_ruleset
from picell.mesh.crypto import link_key, mac, pairing_key
from picell.mesh.links import Links
from picell.mesh.sync import Sync
from picell.state import State, build_state
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.store import peers as peer_table
from picell.store import services as service_table
from picell.store.db import Store
from picell.wireguard import keys
from picell.wireguard.render import render_interface
from tests.netns.harness import ETC_NETNS, Netns, Topology, wait_until
from tests.unit import hostile
from tests.unit.fakes import FakeKernel
from tests.unit.test_wire_properties import redemptions

IDENTITIES = 300  # redemptions tried; about half are accepted
UPSTREAM = ipaddress.IPv4Address("192.0.2.53")


@pytest.fixture(scope="module")
def checker() -> Iterator[Netns]:
    # `ip netns exec` binds /etc/netns/<ns>/hosts over /etc/hosts, which must exist: a minimal
    # Debian (debootstrap minbase) has none
    made_hosts = not Path("/etc/hosts").exists()
    if made_hosts:
        Path("/etc/hosts").write_text("127.0.0.1 localhost\n")
    try:
        with Topology() as topo:
            ns = topo.add_ns("chk")
            ns.run(["ip", "link", "set", "lo", "up"])
            yield ns
    finally:
        if made_hosts:
            Path("/etc/hosts").unlink(missing_ok=True)


def _expected_endpoint(endpoint: str, names: dict[str, str]) -> str:
    host, _, port = endpoint.rpartition(":")
    if host.startswith("["):
        return f"[{ipaddress.IPv6Address(host[1:-1])}]:{port}"
    try:
        return f"{ipaddress.IPv4Address(host)}:{port}"
    except ValueError:
        return f"{names[host.lower().removesuffix('.')]}:{port}"


def _apart(ident: dict[str, Any], i: int) -> dict[str, Any]:
    """`ident` made distinct from the others (hypothesis favours small, equal values, which
    would only meet the conflict checks): its name and domain get a unique first label, its
    network (with dns_ip) a slot of its own in 10.128.0.0/9. A hostile value stays hostile."""
    out = dict(ident)
    if isinstance(out.get("cell_name"), str):
        out["cell_name"] = f"c{i}-" + out["cell_name"]
    if isinstance(out.get("domain"), str):
        out["domain"] = f"c{i}." + out["domain"]
    try:
        net = ipaddress.IPv4Network(out["vpn_subnet"])
        offset = int(ipaddress.IPv4Address(out["dns_ip"])) - int(net.network_address)
    except (KeyError, TypeError, ValueError):
        return out
    if 0 <= offset < net.num_addresses:
        moved = ipaddress.IPv4Network((int(ipaddress.IPv4Address("10.128.0.0")) + i * 256,
                                       net.prefixlen))  # fmt: skip
        out["vpn_subnet"], out["dns_ip"] = str(moved), str(moved[offset])
    return out


class Cell:
    """A cell in-process (store and fake kernel), linked by hypothesis."""

    def __init__(self, root: Path) -> None:
        self.kernel = FakeKernel()
        self.store = Store(root / "picell.db")
        self.control = Control(self.store, self.kernel, None)
        self.control.init_cell(InitRequest(name="alpha", domain="alpha.test",
                                           address="10.61.0.1/24",
                                           endpoint="198.51.100.1:51820",
                                           interface="pcchk0"))  # fmt: skip
        self.links = Links(self.control)
        self.sync = Sync(self.links)
        self.private: dict[str, str] = {}  # their private keys, by their public key
        self.sent: dict[str, dict[str, Any]] = {}  # the identity each link was accepted with

    def redeem(self, private: str, payload: Any) -> None:
        inv = self.links.invite(3600)
        assert inv.pairing is not None
        if isinstance(payload, dict) and "identity" in payload and "nonce" in payload:
            signed = {"identity": payload["identity"], "nonce": payload["nonce"]}
            payload = {**payload, "mac": mac(pairing_key(inv.pairing.token), signed)}
        try:
            self.links.accept(payload)
        except PicellError:
            return
        ident = payload["identity"]
        self.private[ident["public_key"]] = private
        self.sent[ident["public_key"]] = ident

    def move(self, public: str, seq: int, endpoint: Any) -> None:
        """Their signed state document announcing `endpoint` (hostile or not)."""
        alpha = keys.public_from_private(self.control.cell().private_key)
        body = {**hostile.header("state", self.sent[public]["cell_name"], public, alpha, seq),
                "identity": {"endpoint": endpoint}}  # fmt: skip
        env = {"body": body, "mac": mac(link_key(self.private[public], alpha), body)}
        try:
            self.sync.receive_state(env, self.sent[public]["dns_ip"])
        except PicellError:
            return
        self.sent[public] = {**self.sent[public], "endpoint": endpoint}

    def state(self) -> State:
        with self.store.read() as conn:
            return build_state(cell_table.load(conn), peer_table.all_peers(conn),
                               service_table.all_services(conn), (UPSTREAM,),
                               link_table.all_links(conn))  # fmt: skip


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Cell:
    """The cell with what hypothesis linked: links, moved endpoints, devices, a shared service
    and one link ending (unlinking: only its cell's address stays routed)."""
    c = Cell(tmp_path_factory.mktemp("cell"))
    c.control.add_peer("phone")
    c.control.add_service("web", "127.0.0.1:8080", 80)
    count = iter(range(10**6))

    @settings(max_examples=IDENTITIES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=redemptions(list(c.sent)), private=hostile.KEY_PRIVATE)
    def link(case: tuple[Any, bool], private: str) -> None:
        payload, _ = case
        if isinstance(payload, dict) and isinstance(payload.get("identity"), dict):
            ident = _apart(payload["identity"], next(count))
            # their real key, so that their documents verify (a takeover attempt keeps its own)
            key = ident.get("public_key")
            if not isinstance(key, str) or key not in c.sent:
                ident["public_key"] = keys.public_from_private(private)
            payload = {**payload, "identity": ident}
        c.redeem(private, payload)

    link()
    seqs = iter(range(1, 10**6))

    @settings(max_examples=IDENTITIES // 2, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(which=st.sampled_from(sorted(c.sent)), endpoint=st.one_of(
        hostile.endpoints(), hostile.endpoints().flatmap(hostile.mutated_text)))  # fmt: skip
    def move(which: str, endpoint: str) -> None:
        c.move(which, next(seqs), endpoint)

    move()
    names = sorted(c.sent[k]["cell_name"] for k in c.sent)
    for name in names[::3]:
        c.sync.set_permissions(name, [("web", "", None)])
    c.links.disconnect(names[-1])
    return c


def test_enough_was_accepted_and_refused_to_mean_something(cell: Cell) -> None:
    assert len(cell.sent) >= 20, len(cell.sent)
    with cell.store.read() as conn:
        assert {ln.public_key for ln in link_table.all_links(conn)} == set(cell.sent)


def test_wireguard_takes_the_interface_config_with_exactly_one_peer_per_link(
    cell: Cell, checker: Netns, tmp_path: Path
) -> None:
    state = cell.state()
    names: dict[str, str] = {}
    for link in state.links:
        host = link.endpoint.rpartition(":")[0]
        if not host.startswith("[") and not host.replace(".", "").isdigit():
            names[host] = f"203.0.113.{len(names) % 250 + 1}"
    (ETC_NETNS / checker.name / "hosts").write_text(
        "127.0.0.1 localhost\n" + "".join(f"{ip} {host}\n" for host, ip in names.items())
    )
    ifname = checker.topology.ifname("wg")
    checker.wireguard_go(ifname)
    conf = tmp_path / "wg.conf"
    conf.write_text(render_interface(state.wg))
    checker.run(["wg", "setconf", ifname, str(conf)], env={"WG_ENDPOINT_RESOLUTION_RETRIES": "0"})
    dump = checker.run(["wg", "show", ifname, "dump"]).stdout.splitlines()
    peers = {f[0]: f for f in (line.split("\t") for line in dump[1:])}
    with cell.store.read() as conn:
        phone = peer_table.all_peers(conn)[0]
        links = link_table.all_links(conn)
    want = {ln.public_key: str(ipaddress.IPv4Network(ln.identity.dns_ip) if ln.state == "unlinking"
                               else ln.identity.vpn_subnet) for ln in links}  # fmt: skip
    want[phone.public_key] = "10.61.0.2/32"
    assert {k: f[3] for k, f in peers.items()} == want
    for key, ident in cell.sent.items():  # the endpoint they sent last, read independently
        assert peers[key][2] == _expected_endpoint(ident["endpoint"], names), ident


def test_nft_takes_the_ruleset_with_exactly_the_linked_networks_and_grants(
    cell: Cell, checker: Netns, tmp_path: Path
) -> None:
    state = cell.state()
    text, _ = render_ruleset(state)
    path = tmp_path / "picell.nft"
    path.write_text(text)
    checker.run(["nft", "-c", "-f", str(path)])
    checker.run(["nft", "-f", str(path)])
    listed = json.loads(checker.run(["nft", "-j", "list", "table", "inet", "picell"]).stdout)
    sets = {o["set"]["name"]: o["set"].get("elem", []) for o in listed["nftables"] if "set" in o}

    def net(e: Any) -> ipaddress.IPv4Network:
        p = e["prefix"] if isinstance(e, dict) else {"addr": e, "len": 32}
        return ipaddress.IPv4Network(f"{p['addr']}/{p['len']}")

    with cell.store.read() as conn:
        links = link_table.all_links(conn)
    live = {ln.identity.vpn_subnet for ln in links if ln.state != "unlinking"}
    assert {net(e) for e in sets["linked_nets"]} == live
    # each grant carries its counter (`{"elem": {"val": …, "counter": …}}`)
    values = [e["elem"]["val"]["concat"] for e in sets["grants_tcp"]]
    assert all("counter" in e["elem"] for e in sets["grants_tcp"])
    grants = {(net(v[0]), v[1], v[2]) for v in values}
    shared = {
        ln.identity.vpn_subnet
        for ln in links
        if "web" in ln.choices.inbound and ln.state != "unlinking"
    }
    assert shared and grants == {(n, "10.61.0.254", 80) for n in shared}
    assert sets["grants_udp"] == []
    not_internet = [net(e) for e in sets["not_internet"]]
    assert all(any(n.subnet_of(big) for big in not_internet) for n in live)


def test_unbound_takes_the_config_with_exactly_one_forward_zone_per_linked_domain(
    cell: Cell, checker: Netns, tmp_path: Path
) -> None:
    state = cell.state()
    sock = tmp_path / "unbound.ctl"
    conf = tmp_path / "unbound.conf"
    conf.write_text(render_unbound(state.dns, tmp_path, sock))
    checker.run(["unbound-checkconf", str(conf)])
    checker.popen(["unbound", "-d", "-c", str(conf)], name="unbound")
    control = ["unbound-control", "-c", str(conf)]
    wait_until(lambda: checker.run([*control, "status"], check=False).returncode == 0, 30,
               "unbound answers its control socket")  # fmt: skip
    forwards = {tuple(line.split()[::3]) for line in
                checker.run([*control, "list_forwards"]).stdout.splitlines()}  # fmt: skip
    with cell.store.read() as conn:
        links = link_table.all_links(conn)
    live = [ln for ln in links if ln.state != "unlinking"]
    want = {(f"{ln.identity.domain}.", str(ln.identity.dns_ip)) for ln in live} | {
        (".", str(UPSTREAM))
    }
    assert forwards == want
    for ln in live:
        sent = cell.sent[ln.public_key]["domain"]
        assert f"{ln.identity.domain}." == sent.lower().removesuffix(".") + "."
        zones = checker.run([*control, "view_list_local_zones", f"link-{ln.name}"]).stdout
        # Unbound's default zones (RFC 6761 names, reverse ranges) join every view; of the
        # names a link could matter for, the view holds exactly ours and a refusal of the rest
        ours = {"."} | {f"{x.identity.domain}." for x in links} | {"alpha.test."}
        held = {
            tuple(z.split())
            for z in zones.splitlines()
            if z.split()[:1]
            and any(z.split()[0] == d or z.split()[0].endswith("." + d) for d in ours - {"."})
        }
        held |= {tuple(z.split()) for z in zones.splitlines() if z.split()[:1] == ["."]}
        assert held == {(".", "refuse"), ("alpha.test.", "static")}, zones
