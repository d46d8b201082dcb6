"""`picell doctor` walks the real path between two linked cells and names the first broken
step: it passes for a shared service from both sides (both owners reading the same grant line),
then names the backend when alpha's web server stops, the handshake when the tunnel is
blocked, and the grant when alpha unshares; the serving side's `explain` answer for a service
not shared is byte for byte the answer for one that does not exist.

Topology (module scope):

      ┌────────────── switch ns: br-inet 198.51.100.0/24 ──────────────┐
      │                          │                                     │
  alpha ns .1                beta ns .2                           laptop ns .12
  picell alpha               picell beta                          beta's device
  10.61.0.1/24, alpha.test   10.62.0.1/24, beta.test              (wg-quick)
  web: 127.0.0.1:8000 (vip 10.61.0.254:80), shared with beta
  secret: 127.0.0.1:9090, not shared
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from picell.mesh.protocol import make_envelope
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.wireguard import keys
from tests.netns.cells import Cell, cell_on_bridge
from tests.netns.harness import Netns, Proc, Topology, wait_until

EXPLAIN = "http://10.61.0.1:3000/api/cells/peer-sync/explain"


@dataclass
class World:
    topo: Topology
    alpha: Cell
    beta: Cell
    laptop: Netns
    web: Proc


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        laptop = topo.add_ns("laptop")
        topo.attach(laptop, inet, "198.51.100.12/24")
        alpha = cell_on_bridge(topo, inet, "alpha", 1)
        beta = cell_on_bridge(topo, inet, "beta", 2)
        web = alpha.ns.serve_http("127.0.0.1", 8000, "alpha web")
        alpha.ns.serve_http("127.0.0.1", 9090, "alpha secret")
        alpha.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        alpha.cli("services", "add", "secret", "--backend", "127.0.0.1:9090", "--port", "80")
        laptop.device(beta.add_device("laptop"), hint="laptop").up()
        alpha.cli("connect", beta.invite()["string"])
        alpha.cli("share", "beta", "web")
        wait_until(lambda: laptop.http_get("http://web.alpha.test/") == "alpha web", 30,
                   "beta's laptop cannot use web by name")  # fmt: skip
        # each side has heard where the other sees it (the endpoint step reads it)
        wait_until(lambda: alpha.links()["beta"]["seen_at"] and beta.links()["alpha"]["seen_at"],
                   60, "the cells never told each other where they see them")  # fmt: skip
        yield World(topo, alpha, beta, laptop, web)


def doctor(cell: Cell, *args: str) -> tuple[int, dict[str, Any]]:
    proc = cell.run("doctor", *args, "--json", check=False, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, data


def step(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in data["steps"] if s["name"] == name)


def test_the_doctor_passes_for_a_shared_service_from_both_sides(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    code, served = doctor(alpha, "--from", "beta", "--to", "web")
    assert code == 0 and served["first_failure"] is None, served
    names = [s["name"] for s in served["steps"]]
    assert names == ["daemon", "endpoint beta", "port mapping", "host firewall", "handshake beta",
                     "mtu beta", "grant", "dns", "backend", "drop counters"]  # fmt: skip
    assert step(served, "mtu beta")["status"] == "pass"
    assert "accepts connections" in step(served, "backend")["finding"]
    code, asked = doctor(beta, "--to", "alpha/web")
    assert code == 0, asked
    # both owners read the same line; the asking side got it in a signed `explain` answer
    line = step(asked, "grant")["finding"]
    assert line == step(served, "grant")["finding"]
    assert line.startswith("beta → alpha/web:80 allowed since ") and line.endswith(" UTC")
    assert "web.alpha.test → 10.61.0.254" in step(asked, "dns")["finding"]
    code, device = doctor(beta, "--from", "laptop", "--to", "alpha/web")
    assert code == 0, device
    assert step(device, "grant")["finding"].startswith("beta/laptop → alpha/web:80 allowed")
    assert step(device, "device")["status"] == "pass"
    # a device of another cell cannot be named until that cell publishes its devices
    refused = alpha.refused("doctor", "--from", "beta/laptop", "--to", "web")
    assert refused["field"] == "from" and "publishes no devices" in refused["message"]
    assert alpha.refused("doctor", "--to", "nothing")["field"] == "to"


def test_a_stopped_backend_is_named(world: World) -> None:
    world.web.stop()
    try:
        code, data = doctor(world.alpha, "--from", "beta", "--to", "web")
        assert code == 1
        failed = data["first_failure"]
        assert failed["name"] == "backend" and "127.0.0.1:8000" in failed["finding"]
        assert failed["fix"]
        proc = world.alpha.run("doctor", "--from", "beta", "--to", "web", check=False)
        assert proc.returncode == 1 and "first failure: backend" in proc.stdout
    finally:
        world.web = world.alpha.ns.serve_http("127.0.0.1", 8000, "alpha web")
    assert doctor(world.alpha, "--from", "beta", "--to", "web")[0] == 0


def test_a_blocked_tunnel_is_named_at_the_handshake(world: World) -> None:
    """The tunnel is blocked on the bridge (an nft drop in the switch namespace, so no firewall
    of either cell is involved); rather than wait 135 s for the handshake to go stale, beta's
    peer for alpha is removed and put back by a reconcile: a peer with no handshake since."""
    alpha, beta = world.alpha, world.beta
    alpha_key = alpha.cli("status")["public_key"]
    world.topo.partition("198.51.100.1", "198.51.100.2")
    try:
        beta.ns.run(["wg", "set", beta.interface, "peer", alpha_key, "remove"])
        beta.cli("reconcile")
        code, data = doctor(beta, "--to", "alpha/web")
        assert code == 1
        failed = data["first_failure"]
        assert failed["name"] == "handshake alpha" and "no handshake" in failed["finding"]
        assert "198.51.100.1:51820" in failed["fix"]
        assert step(data, "mtu alpha")["status"] == "skip"
    finally:
        world.topo.heal()
    wait_until(lambda: beta.ns.ping("10.61.0.1", timeout_s=1), 60,
               "the tunnel did not come back once healed")  # fmt: skip


def _as_beta(world: World, seq_offset: int, service: str) -> dict[str, Any]:
    """An `explain` as beta signs it, with the next sequence number of beta's link."""
    with sqlite3.connect(world.beta.data_dir / "picell.db") as db:
        db.row_factory = sqlite3.Row
        cell = cell_table.load(db)
        seq = link_table.get(db, "alpha").sync.seq + seq_offset
    alpha = link_table.Link(
        "alpha",
        world.alpha.cli("status")["public_key"],
        link_table.LinkIdentity(
            "x:1", ipaddress.IPv4Network("10.61.0.0/24"), ipaddress.IPv4Address("10.61.0.1"),
            "alpha.test",
        ),
    )  # fmt: skip
    return make_envelope(kind="explain", from_cell="beta", our_private=cell.private_key,
                         our_public=keys.public_from_private(cell.private_key), link=alpha,
                         seq=seq, extra={"service": service}, epoch=cell.epoch)  # fmt: skip


_POST_RAW = """
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=10) as resp:
    print(resp.status); print(resp.read().hex())
"""


def _post_raw(ns: Netns, body: dict[str, Any]) -> bytes:
    proc = ns.python(_POST_RAW, EXPLAIN, json.dumps(body), timeout=20)
    assert proc.returncode == 0, proc.stderr
    status, _, raw = proc.stdout.strip().partition("\n")
    assert status == "200"
    return bytes.fromhex(raw)


def test_an_unshared_service_is_named_at_the_grant_and_looks_like_a_missing_one(
    world: World,
) -> None:
    """Last in the module: the raw questions below spend beta's next sequence numbers, so
    beta's next push is refused once and retried."""
    alpha, beta = world.alpha, world.beta
    alpha.cli("unshare", "beta", "web")
    code, asked = doctor(beta, "--to", "alpha/web")
    assert code == 1
    failed = asked["first_failure"]
    assert failed["name"] == "grant" and failed["finding"] == "beta → alpha/web not allowed"
    assert "picell share beta web" in failed["fix"]
    code, served = doctor(alpha, "--from", "beta", "--to", "web")
    assert code == 1 and served["first_failure"]["finding"] == failed["finding"]
    assert served["first_failure"]["fix"] == "picell share beta web"
    # the serving side's answer, as bytes: a service it has but does not share, and a name
    # it has never had, differ only in the name asked about
    hidden = _post_raw(beta.ns, _as_beta(world, 1, "secret"))
    missing = _post_raw(beta.ns, _as_beta(world, 2, "qqqqqq"))
    assert hidden.replace(b"secret", b"qqqqqq") == missing
    assert json.loads(hidden)["allowed"] is False
