"""Per-link sharing: what alpha shares with beta is reachable by name from beta's devices, and
nothing else of alpha is; unsharing cuts live flows; beta learns of every change through signed
state documents, also after a partition; forged, replayed, re-targeted and misplaced messages
are refused. alpha's phone scrapes alpha's /metrics through its tunnel with the token
(`picell metrics token`); without it, or from beta with it, the scrape is refused. 20 shares
sent at once are group-committed: each answered once applied, fewer nft transactions than
changes.

Topology (module scope):

      ┌──────────────────── switch ns: br-inet 198.51.100.0/24 ─────────────────┐
      │                  │                  │                 │                 │
  alpha ns .1         beta ns .2         phone ns .11     laptop ns .12     net ns .53
  picell alpha        picell beta        alpha's device   beta's device     upstream DNS,
  10.61.0.1/24        10.62.0.1/24                                          192.0.2.80 on lo
  alpha.test          beta.test                                             (the "internet")
   │ veth 203.0.113.1/24
  lan ns 203.0.113.5: HTTP :80 (service files), echo :7 (service echo)

alpha's services: web (127.0.0.1:8000), secret (127.0.0.1:9090), files, echo (LAN).
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from picell.mesh.crypto import link_key, mac
from picell.mesh.protocol import make_envelope
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.wireguard import keys
from tests.netns.cells import (
    Cell,
    cell_on_bridge,
    post_json,
    sample,
    scrape_metrics,
    start_upstream_dns,
)
from tests.netns.faults import api
from tests.netns.harness import Netns, Topology, wait_until

MESH = "http://10.61.0.1:3000/api/cells/peer-sync/permissions"
METRICS = "http://10.61.0.1:9469/metrics"  # alpha's WireGuard address, METRICS_PORT


@dataclass
class World:
    topo: Topology
    alpha: Cell
    beta: Cell
    phone: Netns
    laptop: Netns
    lan: Netns
    net: Netns


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        nss = {r: topo.add_ns(r) for r in ("phone", "laptop", "net", "lan")}
        for role, ip in (("phone", "11"), ("laptop", "12"), ("net", "53")):
            topo.attach(nss[role], inet, f"198.51.100.{ip}/24")
        nss["net"].run(["ip", "addr", "add", "192.0.2.80/32", "dev", "lo"])
        start_upstream_dns(nss["net"], "198.51.100.53", {"www.example.net": "192.0.2.80"},
                           topo.workdir)  # fmt: skip
        alpha = cell_on_bridge(topo, inet, "alpha", 1, resolver="198.51.100.53")
        beta = cell_on_bridge(topo, inet, "beta", 2, resolver="198.51.100.53")
        nss["alpha"], nss["beta"] = alpha.ns, beta.ns
        alpha.ns.run(["ip", "route", "add", "default", "via", "198.51.100.53"])
        topo.link(alpha.ns, "203.0.113.1/24", nss["lan"], "203.0.113.5/24")
        nss["lan"].run(["ip", "route", "replace", "default", "via", "203.0.113.1"])
        nss["alpha"].serve_http("127.0.0.1", 8000, "alpha web")
        nss["alpha"].serve_http("127.0.0.1", 9090, "alpha secret")
        nss["lan"].serve_http("203.0.113.5", 80, "alpha files")
        nss["lan"].serve_tcp_echo("203.0.113.5", 7)
        alpha.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        alpha.cli("services", "add", "secret", "--backend", "127.0.0.1:9090", "--port", "80")
        alpha.cli("services", "add", "files", "--backend", "203.0.113.5:80")
        alpha.cli("services", "add", "echo", "--backend", "203.0.113.5:7")
        nss["phone"].device(alpha.add_device("phone"), hint="phone").up()
        nss["laptop"].device(beta.add_device("laptop"), hint="laptop").up()
        alpha.cli("connect", beta.invite()["string"])
        wait_until(lambda: nss["laptop"].ping("10.61.0.1"), 20, "beta's laptop cannot reach alpha")
        yield World(topo, alpha, beta, nss["phone"], nss["laptop"], nss["lan"], nss["net"])


def unbound_queries(cell: Cell) -> int:
    """Queries the cell's Unbound answered since it started or last reloaded."""
    conf = str(cell.data_dir / "unbound" / "unbound.conf")
    out = cell.ns.run(["unbound-control", "-c", conf, "stats_noreset"]).stdout
    return int(
        next(ln for ln in out.splitlines() if ln.startswith("total.num.queries=")).split("=")[1]
    )


def outbound(cell: Cell, other: str) -> list[str]:
    return [s["name"] for s in cell.links()[other]["outbound"]]


def test_a_shared_service_is_reachable_by_name_from_the_other_cell(world: World) -> None:
    alpha, beta, laptop = world.alpha, world.beta, world.laptop
    assert laptop.dig_status("web.alpha.test") == "NXDOMAIN"
    assert not laptop.tcp_connect("10.61.0.254", 80)
    for _ in range(20):  # more queries than the wait below makes: a reset would show
        assert world.phone.dig("alpha.test") == ["10.61.0.1"]
    queries, reloads = unbound_queries(alpha), alpha.cli("status")["applied"].get("unbound", 0)
    assert queries > 20
    alpha.cli("share", "beta", "web")
    # beta's DNS may hold the earlier NXDOMAIN until alpha's push arrives and flushes it
    wait_until(lambda: laptop.http_get("http://web.alpha.test/") == "alpha web", 10,
               "beta's laptop cannot use web by name")  # fmt: skip
    # the name went into alpha's running Unbound as a record delta: no reload, which would
    # have reset Unbound's query count (and dropped its cache)
    assert unbound_queries(alpha) > queries
    applied = alpha.cli("status")["applied"]
    assert applied.get("unbound", 0) == reloads and applied["unbound records"] >= 1
    wait_until(lambda: outbound(beta, "alpha") == ["web"], 10, "beta did not learn of web")
    seen = beta.links()["alpha"]["outbound"][0]
    assert seen["vip"] == "10.61.0.254" and seen["ports"] == [80]
    view = alpha.links()["beta"]
    assert view["inbound"][0]["name"] == "web" and view["last_push_status"] == "ok"
    assert beta.links()["alpha"]["last_remote_update_at"] is not None
    events = [e["event"] for e in alpha.journal("beta")]
    assert "shared web" in events
    assert "they shared web" in [e["event"] for e in beta.journal("alpha")]


def test_everything_else_of_alpha_stays_closed_to_beta(world: World) -> None:
    alpha, laptop = world.alpha, world.laptop
    alpha.cli("share", "beta", "web")
    # other services: neither by name nor by address
    for name in ("secret", "files"):
        assert laptop.dig_status(f"{name}.alpha.test") == "NXDOMAIN"
    assert not laptop.tcp_connect("10.61.0.253", 80)  # secret's address
    assert not laptop.tcp_connect("10.61.0.252", 80)  # files' address
    # alpha's devices, alpha's LAN, other ports of alpha
    assert not laptop.ping("10.61.0.2", timeout_s=1)
    assert not laptop.tcp_connect("10.61.0.2", 80)
    assert not laptop.tcp_connect("203.0.113.5", 80)
    assert not laptop.tcp_connect("10.61.0.1", 8000)
    # alpha is no open resolver for beta
    assert laptop.dig_status("www.example.net", server="10.61.0.1") == "REFUSED"
    # and no way to the internet: even if beta routed it into the tunnel, alpha drops it
    beta = world.beta
    beta.ns.run(["wg", "set", beta.interface, "peer", alpha_key(world), "allowed-ips",
                 "10.61.0.0/24,192.0.2.80/32"])  # fmt: skip
    beta.ns.run(["ip", "route", "add", "192.0.2.80/32", "dev", beta.interface])
    try:
        assert not beta.ns.ping("192.0.2.80", timeout_s=1)
        assert world.alpha.ns.ping("192.0.2.80")  # the internet is there for alpha itself
    finally:
        beta.ns.run(["ip", "route", "del", "192.0.2.80/32", "dev", beta.interface])
        beta.cli("reconcile")
    # while what is shared still works, also for alpha's own phone
    assert laptop.http_get("http://web.alpha.test/") == "alpha web"
    assert world.phone.http_get("http://secret.alpha.test/") == "alpha secret"


def alpha_key(world: World) -> str:
    key: str = world.alpha.cli("status")["public_key"]
    return key


def test_unsharing_stops_an_established_connection(world: World) -> None:
    alpha, laptop = world.alpha, world.laptop
    alpha.cli("share", "beta", "echo")
    session = laptop.tcp_echo_session("echo.alpha.test", 7)
    try:
        wait_until(lambda: session.alive(since=time.monotonic() - 0.5), 5, "no echo")
        alpha.cli("unshare", "beta", "echo")
        cut = time.monotonic()
        wait_until(lambda: session.silent_for(1.0), 10, "the flow survived the unshare")
        assert not session.alive(since=cut + 0.5)
    finally:
        session.stop()
    assert not laptop.tcp_connect("10.61.0.251", 7)
    wait_until(lambda: "echo" not in outbound(world.beta, "alpha"), 10, "beta still sees echo")
    assert "unshared echo" in [e["event"] for e in alpha.journal("beta")]


def test_a_change_during_a_partition_arrives_after_it_heals(world: World) -> None:
    alpha, beta, laptop = world.alpha, world.beta, world.laptop
    world.topo.partition("198.51.100.1", "198.51.100.2")
    try:
        alpha.cli("share", "beta", "files")
        wait_until(lambda: alpha.links()["beta"]["last_push_status"] == "error", 20,
                   "the push did not fail during the partition")  # fmt: skip
        assert "files" not in outbound(beta, "alpha")
    finally:
        world.topo.heal()
    healed = time.monotonic()
    wait_until(lambda: "files" in outbound(beta, "alpha"), 60, "beta never learned of files")
    assert time.monotonic() - healed < 60
    wait_until(lambda: laptop.http_get("http://files.alpha.test/") == "alpha files", 30,
               "beta's laptop cannot use files after the partition")  # fmt: skip
    assert alpha.links()["beta"]["last_push_status"] == "ok"


def _beta_private(world: World) -> str:
    with sqlite3.connect(world.beta.data_dir / "picell.db") as db:
        db.row_factory = sqlite3.Row
        return cell_table.load(db).private_key


def _beta_epoch(world: World) -> str:
    with sqlite3.connect(world.beta.data_dir / "picell.db") as db:
        db.row_factory = sqlite3.Row
        return cell_table.load(db).epoch


def _signed(world: World, seq: int, private: str | None = None) -> Any:
    """As beta signs: in beta's current epoch (`mesh.protocol.check_fresh`)."""
    beta_private = _beta_private(world)
    net, dns = ipaddress.IPv4Network("10.61.0.0/24"), ipaddress.IPv4Address("10.61.0.1")
    target = link_table.Link(
        "alpha", alpha_key(world), link_table.LinkIdentity("x:1", net, dns, "alpha.test")
    )
    return make_envelope(
        kind="state", from_cell="beta", our_private=private or beta_private,
        our_public=keys.public_from_private(beta_private), link=target, seq=seq,
        extra={"shared_services": [], "exit_offered": False, "use_as_exit_relay": False},
        epoch=_beta_epoch(world),
    )  # fmt: skip


def _retargeted(world: World, seq: int) -> Any:
    """Signed with the real beta-alpha link key, but addressed to another cell."""
    env = _signed(world, seq)
    body = {**env["body"], "to_public_key": keys.public_from_private(keys.generate_private())}
    return {"body": body, "mac": mac(link_key(_beta_private(world), alpha_key(world)), body)}


def _remote_seq(world: World) -> int:
    with sqlite3.connect(world.alpha.data_dir / "picell.db") as db:
        return int(db.execute("SELECT remote_seq FROM links WHERE name = 'beta'").fetchone()[0])


def _beta_sent_seq(world: World) -> int:
    """The last seq beta used toward alpha (taken before its document leaves)."""
    with sqlite3.connect(world.beta.data_dir / "picell.db") as db:
        return int(db.execute("SELECT local_seq FROM links WHERE name = 'alpha'").fetchone()[0])


def test_forged_replayed_retargeted_and_misplaced_messages_are_refused(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    wait_until(lambda: alpha.links()["beta"]["last_remote_update_at"], 10, "beta never pushed")
    before = alpha.links()["beta"]["outbound"]
    seq = _remote_seq(world)
    assert seq >= 1
    stranger = keys.generate_private()
    refusals = [
        ("forged", beta.ns, _signed(world, seq + 100, private=stranger)),
        ("replayed", beta.ns, _signed(world, seq)),
        ("older", beta.ns, _signed(world, max(1, seq - 1))),
        ("retargeted", beta.ns, _retargeted(world, seq + 100)),
        ("from beta's device", world.laptop, _signed(world, seq + 100)),
    ]
    for what, ns, body in refusals:
        status, answer = post_json(ns, MESH, body)
        assert 400 <= status < 500, (what, status, answer)
    assert alpha.links()["beta"]["outbound"] == before
    # alpha applied nothing beta did not send itself (beta's heartbeat may land meanwhile)
    assert seq <= _remote_seq(world) <= _beta_sent_seq(world)
    rejected = alpha.cli("status")["rejected_messages"]
    assert sum(n for key, n in rejected.items() if key.startswith("permissions 4")) >= 5
    # the same message from beta's own address is accepted: the refusals above were real
    status, _answer = post_json(beta.ns, MESH, _signed(world, seq + 100))
    assert status == 200
    # a replay after alpha restarts is still refused: the sequence is persisted
    alpha.stop()
    alpha.start()
    status, _answer = post_json(beta.ns, MESH, _signed(world, seq + 100))
    assert status == 403
    # alpha's own next push brings beta's view back in line
    alpha.cli("share", "beta", "web")
    wait_until(lambda: "web" in outbound(beta, "alpha"), 10, "no push after the restart")


def test_an_exit_offer_reaches_the_other_cell(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    alpha.cli("exit-offer", "beta", "on")
    wait_until(lambda: beta.links()["alpha"]["remote_exit_offered"], 10, "beta never saw it")
    assert "they offer us their exit" in beta.run("cells").stdout
    alpha.cli("exit-offer", "beta", "off")
    wait_until(lambda: not beta.links()["alpha"]["remote_exit_offered"], 10, "still offered")
    assert alpha.run("exit-offer", "beta", "maybe", check=False).returncode == 2


def scrape(ns: Netns, token: str = "") -> tuple[int, str]:
    return scrape_metrics(ns, METRICS, token)


def test_our_devices_scrape_metrics_with_the_token_and_a_linked_cell_is_refused(
    world: World,
) -> None:
    alpha, beta, phone = world.alpha, world.beta, world.phone
    token = alpha.cli("metrics", "token")["token"]
    assert alpha.refused("metrics", "token")["field"] == "rotate"  # shown once: hash only
    alpha.cli("share", "beta", "web")  # a reconcile now: its `wg show` holds beta's session
    got: dict[str, str] = {}

    def scraped() -> bool:
        status, got["body"] = scrape(phone, token)
        assert status == 200, got["body"]
        return sample(got["body"], 'picell_link_handshake_age_seconds{cell="beta"}') is not None

    wait_until(scraped, 40, "alpha's metrics show no handshake with beta")
    body = got["body"]
    assert (sample(body, "picell_reconcile_total") or 0) > 0
    assert (sample(body, 'picell_link_transmit_bytes_total{cell="beta"}') or 0) > 0
    shared = len(alpha.links()["beta"]["inbound"])  # web, and what earlier tests left shared
    assert shared >= 1 and sample(body, 'picell_link_grants{cell="beta"}') == shared
    assert sample(body, 'picell_backend_up{service="web"}') == 1
    assert scrape(phone)[0] == 401
    assert scrape(phone, token + "x")[0] == 401
    # beta reaches alpha's address, but not this port, even with the owner's token: alpha's
    # firewall drops it (no answer: 0); the listener itself would answer 403
    assert beta.ns.ping("10.61.0.1")
    status, answer = scrape(beta.ns, token)
    assert status in (0, 403), (status, answer)
    # the admin socket (root only) serves the same text without a token
    status, local = api(alpha, "GET", "/metrics")
    assert status == 200 and (sample(local, "picell_reconcile_total") or 0) > 0
    rotated = alpha.cli("metrics", "token", "--rotate")["token"]
    assert scrape(phone, token)[0] == 401 and scrape(phone, rotated)[0] == 200


def test_concurrent_shares_are_batched_each_answered_once_enforced(world: World) -> None:
    """20 shares sent at once on alpha's admin socket (group commit): every request answered
    200 only once applied (alpha's grant set holds its element when it answers), fewer nft
    transactions than changes, and beta's view ends with all of them; then 20 concurrent
    unshares take them all away again, in alpha's kernel and in beta's view."""
    alpha = world.alpha
    names = [f"burst{i}" for i in range(20)]
    for i, name in enumerate(names):
        status, _ = api(alpha, "POST", "/api/services",
                        {"name": name, "backend": f"127.0.0.1:{9100 + i}", "port": 80})  # fmt: skip
        assert status == 201
    vips = {s["name"]: s["vip"] for s in alpha.cli("services", "list")}

    def granted() -> set[str]:
        text = alpha.ns.run(["nft", "list", "set", "inet", "picell", "grants_tcp"]).stdout
        return {n for n in names if f"{vips[n]} . 80" in text}

    def nft_transactions() -> int:
        applied = api(alpha, "GET", "/api/status")[1]["applied"]
        return int(applied.get("nft grant delta", 0)) + int(applied.get("nft table", 0))

    def at_once(method: str) -> list[tuple[int, set[str]]]:
        def one(name: str) -> tuple[int, set[str]]:
            status, _ = api(alpha, method, f"/api/cells/beta/shares/{name}")
            return status, granted()  # what the kernel holds once we have the answer

        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            return list(pool.map(one, names))

    before = nft_transactions()
    results = at_once("POST")
    for name, (status, kernel) in zip(names, results, strict=True):
        assert status == 200 and name in kernel, (name, status)
    assert nft_transactions() - before < len(names)  # one each without group commit
    wait_until(lambda: set(names) <= set(outbound(world.beta, "alpha")), 20,
               "beta never saw every share")  # fmt: skip
    results = at_once("DELETE")
    for name, (status, kernel) in zip(names, results, strict=True):
        assert status == 200 and name not in kernel, (name, status)
    assert granted() == set()
    wait_until(lambda: not set(names) & set(outbound(world.beta, "alpha")), 20,
               "beta still sees a share")  # fmt: skip
    for name in names:
        assert api(alpha, "DELETE", f"/api/services/{name}")[0] == 204
