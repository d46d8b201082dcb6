"""Backup, restore and key rotation with real cells: a backup taken while alpha runs, 100
pushes later a restore, and beta hears alpha again at its first document (a new epoch) while a
replayed old document stays refused; then alpha rotates its key, beta follows through the
tunnel without a new invite, alpha's phone imports its new config with wg-quick, and beta's
laptop still reaches alpha's shared service.

Topology (module scope):

      ┌──────────────── switch ns: br-inet 198.51.100.0/24 ────────────────┐
      │                     │                     │                      │
  alpha ns .1            beta ns .2            phone ns .11          laptop ns .12
  picell alpha           picell beta           alpha's device        beta's device
  10.61.0.1/24           10.62.0.1/24          (wg-quick)            (wg-quick)
  alpha.test             beta.test
  web: 127.0.0.1:8000 (shared with beta as web.alpha.test)
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from picell.constants import HEARTBEAT_S
from picell.mesh.protocol import make_envelope
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.wireguard import keys
from tests.netns.cells import Cell, cell_on_bridge, post_json
from tests.netns.harness import Device, Netns, Topology, wait_until

BETA_MESH = "http://10.62.0.1:3000/api/cells/peer-sync/permissions"
PASSPHRASE = "a long enough passphrase"


@dataclass
class World:
    topo: Topology
    alpha: Cell
    beta: Cell
    phone: Netns
    laptop: Netns
    phone_wg: Device


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        phone, laptop = topo.add_ns("phone"), topo.add_ns("laptop")
        topo.attach(phone, inet, "198.51.100.11/24")
        topo.attach(laptop, inet, "198.51.100.12/24")
        alpha = cell_on_bridge(topo, inet, "alpha", 1)
        beta = cell_on_bridge(topo, inet, "beta", 2)
        alpha.ns.serve_http("127.0.0.1", 8000, "alpha web")
        alpha.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        phone_wg = phone.device(alpha.add_device("phone"), hint="phone")
        phone_wg.up()
        laptop.device(beta.add_device("laptop"), hint="laptop").up()
        alpha.cli("connect", beta.invite()["string"])
        wait_until(lambda: laptop.ping("10.61.0.1"), 30, "beta's laptop cannot reach alpha")
        alpha.cli("share", "beta", "web")
        wait_until(lambda: "web" in outbound(beta, "alpha"), 30, "beta never saw the share")
        yield World(topo, alpha, beta, phone, laptop, phone_wg)


def outbound(cell: Cell, other: str) -> list[str]:
    return [s["name"] for s in cell.links()[other]["outbound"]]


def _db(cell: Cell) -> sqlite3.Connection:
    db = sqlite3.connect(cell.data_dir / "picell.db")
    db.row_factory = sqlite3.Row
    return db


def _alpha_cell(world: World) -> cell_table.Cell:
    with _db(world.alpha) as db:
        return cell_table.load(db)


def _beta_view_of_alpha(world: World) -> link_table.Link:
    with _db(world.beta) as db:
        return link_table.get(db, "alpha")


def _as_alpha(world: World, private: str, epoch: str, seq: int) -> Any:
    """A state document signed as alpha signs them (its key, its epoch), to beta."""
    with _db(world.alpha) as db:
        beta_key = link_table.get(db, "beta").public_key
    target = link_table.Link("beta", beta_key, link_table.LinkIdentity(
        "x:1", ipaddress.IPv4Network("10.62.0.0/24"), ipaddress.IPv4Address("10.62.0.1"),
        "beta.test"))  # fmt: skip
    return make_envelope(
        kind="state", from_cell="alpha", our_private=private,
        our_public=keys.public_from_private(private), link=target, seq=seq, epoch=epoch,
        extra={"shared_services": [], "exit_offered": False, "use_as_exit_relay": False},
    )  # fmt: skip


def test_a_restore_is_heard_again_at_once_and_replays_stay_refused(
    world: World, tmp_path: Path
) -> None:
    alpha, beta = world.alpha, world.beta
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\n")
    backup = tmp_path / "alpha.backup"
    made = alpha.cli("backup", str(backup), "--passphrase-file", str(secret))  # alpha runs
    assert made["encrypted"] and "private keys" in made["warning"]
    assert backup.stat().st_mode & 0o777 == 0o600
    before = _alpha_cell(world)
    seq_at_backup = _beta_view_of_alpha(world).mirror.seq
    # real pushes, each waited for: unshare, share, ... ending unshared
    for i in range(6):
        verb = "unshare" if i % 2 == 0 else "share"
        alpha.cli(verb, "beta", "web")
        wanted = verb == "share"
        wait_until(lambda w=wanted: ("web" in outbound(beta, "alpha")) == w, 30, f"push {i}")
    alpha.cli("unshare", "beta", "web")
    wait_until(lambda: "web" not in outbound(beta, "alpha"), 30, "the last unshare")
    # ... and 100 more on the counter (one push each would take as long as they take)
    alpha.stop()
    with _db(alpha) as db:
        db.execute("UPDATE links SET local_seq = local_seq + 100 WHERE name = 'beta'")
    alpha.start()
    wait_until(lambda: _beta_view_of_alpha(world).mirror.seq > seq_at_backup + 100, 60,
               "alpha's documents after the jump never reached beta")  # fmt: skip
    heard = _beta_view_of_alpha(world).mirror.seq
    # a document alpha sent before the restore (its epoch, a seq beta applied)
    old_document = _as_alpha(world, before.private_key, before.epoch, heard)

    refused = alpha.refused("restore", str(backup), "--passphrase-file", str(secret))
    assert "daemon is running" in refused["message"]
    alpha.stop()
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    assert alpha.refused("restore", str(backup), "--passphrase-file", str(wrong))["field"] == (
        "passphrase"
    )
    report = alpha.cli("restore", str(backup), "--passphrase-file", str(secret))
    assert report["compared"] and report["devices_added_since"] == []
    restored = _alpha_cell(world)
    assert restored.epoch != before.epoch and restored.private_key == before.private_key
    with _db(alpha) as db:  # the backup's counter: far behind what beta applied
        assert link_table.get(db, "beta").sync.seq < heard
    alpha.start()
    # within one heartbeat: beta takes alpha's restored state (web shared, as at the backup)
    wait_until(lambda: "web" in outbound(beta, "alpha"), HEARTBEAT_S + 30,
               "beta did not hear the restored alpha")  # fmt: skip
    assert _beta_view_of_alpha(world).mirror.epoch == restored.epoch
    assert alpha.links()["beta"]["last_push_status"] == "ok"
    wait_until(lambda: world.laptop.http_get("http://web.alpha.test/") == "alpha web", 30,
               "beta's laptop cannot use the shared service after the restore")  # fmt: skip
    # replays of the earlier incarnation stay refused, whatever their seq
    for body in (old_document, _as_alpha(world, before.private_key, before.epoch, heard + 10**6)):
        status, answer = post_json(alpha.ns, BETA_MESH, body)
        assert status == 403 and answer["field"] == "body.epoch", answer
    assert "web" in outbound(beta, "alpha")
    events = [e["event"] for e in beta.journal("alpha")]
    assert "cell alpha was restored from a backup" in events
    assert "restored from backup" in [e["event"] for e in alpha.journal("beta")]


def test_a_key_rotation_moves_the_link_and_the_devices_reimport(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    old_public = alpha.cli("status")["public_key"]
    rotated = alpha.cli("keys", "rotate")
    new_public = rotated["public_key"]
    assert rotated["switched"] and rotated["moved"] == ["beta"] and rotated["pending"] == {}
    assert rotated["devices"] == ["phone"]
    assert new_public != old_public and alpha.cli("status")["public_key"] == new_public
    # beta follows through the tunnel, no new invite
    wait_until(lambda: beta.links()["alpha"]["public_key"] == new_public, 30, "beta kept the key")
    wait_until(lambda: world.laptop.http_get("http://web.alpha.test/") == "alpha web", 60,
               "beta's laptop lost alpha's shared service after the rotation")  # fmt: skip
    alpha.cli("share", "beta", "web")  # a no-op change still syncs: documents verify
    wait_until(lambda: alpha.links()["beta"]["last_push_status"] == "ok", 60, "no push")
    assert "their key rotated" in [e["event"] for e in beta.journal("alpha")]
    # the phone's old config names the old key: it re-imports and works
    world.phone_wg.down()
    config = alpha.run("peers", "config", "phone").stdout
    assert new_public in config
    fresh = world.phone.device(config, hint="phone2")
    fresh.up()
    wait_until(lambda: world.phone.ping("10.61.0.1"), 30, "the phone cannot reach alpha")
