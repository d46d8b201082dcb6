"""Backups, restores, restore-proof sequence numbers (epochs) and key rotation, without a
network: the store's own files, the pure freshness rule, and signed messages against a fake
kernel."""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from picell.control import Control
from picell.errors import BadInput, Conflict, Forbidden, NotFound
from picell.mesh import wire
from picell.mesh.protocol import check_fresh, make_envelope, retire
from picell.mesh.rekey import Rekey, proof
from picell.mesh.sync import Sync
from picell.store import admin as admin_table
from picell.store import backup as backups
from picell.store import cell as cell_table
from picell.store import journal
from picell.store import links as link_table
from picell.store.db import Store
from picell.store.links import Link, LinkIdentity, Mirror
from picell.wireguard import keys
from tests.unit.test_mesh import _linked_pair, keypair

PASS = "correct horse battery"


def _alpha_as_seen_by_beta(control: Control) -> Link:
    return Link("alpha", keys.public_from_private(control.cell().private_key),
                LinkIdentity("x:1", ipaddress.IPv4Network("10.61.0.0/24"),
                             ipaddress.IPv4Address("10.61.0.1"), "alpha.test"))  # fmt: skip


def _from_beta(control: Control, private: str, kind: str, seq: int, epoch: str = "",
               **extra: Any) -> Any:  # fmt: skip
    if kind == "state":
        extra = {"shared_services": [], **extra}
    return make_envelope(kind=kind, from_cell="beta", our_private=private,
                         our_public=keys.public_from_private(private),
                         link=_alpha_as_seen_by_beta(control), seq=seq, extra=extra,
                         epoch=epoch)  # fmt: skip


# -- backup files ------------------------------------------------------------------------------
def test_a_backup_is_a_consistent_private_copy_that_says_it_holds_keys(
    control: Control, tmp_path: Path
) -> None:
    out = tmp_path / "cell.backup"
    data = backups.backup(control.store.path, out, None)
    assert "private keys" in data["warning"] and not data["encrypted"]
    assert out.stat().st_mode & 0o777 == 0o600
    conn = sqlite3.connect(out)
    name, key, made = conn.execute("SELECT name, private_key, backup_made_at FROM cell").fetchone()
    conn.close()
    assert (name, key) == ("alpha", control.cell().private_key) and made > 0


def test_an_encrypted_backup_needs_its_passphrase_and_refuses_damage(
    control: Control, tmp_path: Path
) -> None:
    out = tmp_path / "cell.backup"
    backups.backup(control.store.path, out, PASS)
    blob = out.read_bytes()
    assert blob.startswith(backups.MAGIC) and control.cell().private_key.encode() not in blob
    assert backups.load_backup(blob, PASS).startswith(backups.SQLITE_MAGIC)
    cases = [
        (blob, "wrong passphrase", "passphrase"),
        (blob[:-40], PASS, "passphrase"),  # truncated: the tag fails
        (blob[:-1] + bytes([blob[-1] ^ 1]), PASS, "passphrase"),  # one bit flipped
        (blob.replace(b'"n": 32768', b'"n": 65536'), PASS, "passphrase"),  # header is AAD
        (blob.replace(b'"v": 1', b'"v": 9'), PASS, "backup.header.v"),
        (blob.replace(b'"n": 32768', b'"n": 33333'), PASS, "backup.header.n"),
        (blob.replace(b'"n": 32768', b'"n": 1073741824'), PASS, "backup.header.n"),
        (backups.MAGIC + b"{not json\n" + b"x" * 64, PASS, "backup.header"),
        (backups.MAGIC + b"x" * 5000, PASS, "backup.header"),
        (blob, None, "passphrase_file"),
        (b"hello, not a backup", None, "backup"),
    ]
    for data, phrase, field in cases:
        with pytest.raises(BadInput) as err:
            backups.load_backup(data, phrase)
        assert err.value.field == field, (field, err.value.message)
    with pytest.raises(BadInput) as err:
        backups.load_backup(blob, "wrong passphrase")
    assert "wrong passphrase" in err.value.message


def test_a_passphrase_file_is_read_and_checked(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(BadInput) as err:
        backups.read_passphrase(short)
    assert err.value.field == "passphrase_file"
    with pytest.raises(BadInput):
        backups.read_passphrase(tmp_path / "missing")
    good = tmp_path / "good"
    good.write_text(PASS + "\nignored\n")
    assert backups.read_passphrase(good) == PASS


def test_a_damaged_or_foreign_store_is_refused_and_nothing_changes(
    control: Control, tmp_path: Path
) -> None:
    out = tmp_path / "cell.backup"
    backups.backup(control.store.path, out, None)
    blob = out.read_bytes()
    before = control.store.path.read_bytes()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE x (y)").connection.commit()
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 999")
    conn.commit()
    conn.close()
    for data in (blob[: len(blob) // 2], empty.read_bytes(), newer.read_bytes()):
        with pytest.raises(BadInput) as err:
            backups.restore(control.store.path.parent, data, None)
        assert err.value.field == "backup"
    assert control.store.path.read_bytes() == before
    assert not [p for p in control.store.path.parent.iterdir() if p.name.startswith(".restore")]


# -- restore -----------------------------------------------------------------------------------
def test_a_restore_draws_a_new_epoch_keeps_the_admin_and_names_what_changed(
    control: Control, tmp_path: Path
) -> None:
    links, _, _ = _linked_pair(control)
    control.add_peer("phone", None)
    out = tmp_path / "cell.backup"
    backups.backup(control.store.path, out, PASS)
    old_epoch = control.cell().epoch
    control.add_peer("laptop", None)  # after the backup
    with control.store.transaction() as conn:
        admin_table.set_web_port(conn, 8123)
    data_dir = control.store.path.parent
    control.store.close()  # the daemon is stopped
    report = backups.restore(data_dir, out.read_bytes(), PASS)
    assert report.devices_added_since == ["laptop"] and report.compared
    assert any("laptop" in n and "added again" in n for n in report.notes)
    assert report.backup_made_at and report.backup_made_at <= time.time()
    assert (data_dir / backups.BEFORE_RESTORE).stat().st_mode & 0o777 == 0o600
    assert (data_dir / backups.STORE_NAME).stat().st_mode & 0o777 == 0o600
    store = Store(data_dir / backups.STORE_NAME)
    try:
        with store.read() as conn:
            cell = cell_table.load(conn)
            beta = link_table.get(conn, "beta")
            rows = journal.entries(conn, "beta")
            web = admin_table.load(conn)
            names = [r[0] for r in conn.execute("SELECT name FROM peers")]
        assert cell.epoch and cell.epoch != old_epoch and cell.restored_at
        assert cell.backup_made_at is None
        assert beta.sync.pending_push > 0  # told at once
        assert any(r["event"] == "restored from backup" and "made at" in r["detail"]
                   for r in rows)  # fmt: skip
        assert web.web_port == 8123  # the admin settings in use are kept
        assert names == ["phone"]
    finally:
        store.close()


def test_a_restore_without_a_store_says_what_it_cannot_know(
    control: Control, tmp_path: Path
) -> None:
    out = tmp_path / "cell.backup"
    backups.backup(control.store.path, out, None)
    fresh = tmp_path / "elsewhere"
    report = backups.restore(fresh, out.read_bytes(), None)
    assert not report.compared
    assert any("cannot know their names" in n for n in report.notes)


def test_links_ended_after_the_backup_come_back_as_orphans(
    control: Control, tmp_path: Path
) -> None:
    _linked_pair(control)
    out = tmp_path / "cell.backup"
    backups.backup(control.store.path, out, None)
    with control.store.transaction() as conn:
        link_table.delete(conn, "beta")
    data_dir = control.store.path.parent
    control.store.close()
    report = backups.restore(data_dir, out.read_bytes(), None)
    assert report.links_ended_since == ["beta"]
    store = Store(data_dir / backups.STORE_NAME)
    try:
        with store.read() as conn:
            assert "no longer holds" in (link_table.get(conn, "beta").orphan or "")
    finally:
        store.close()


# -- epochs ------------------------------------------------------------------------------------
def _body(seq: int, epoch: str | None) -> wire.Header:
    key = keypair()[1]
    return wire.Header(v=1, type="state", from_cell="beta", from_public_key=key,
                       to_public_key=key, seq=seq, sent_at=0.0, epoch=epoch)  # fmt: skip


def _link(seq: int, epoch: str, retired: tuple[str, ...] = ()) -> Link:
    ident = LinkIdentity("x:1", ipaddress.IPv4Network("10.62.0.0/24"),
                         ipaddress.IPv4Address("10.62.0.1"), "beta.test")  # fmt: skip
    return Link("beta", keypair()[1], ident,
                mirror=Mirror(seq=seq, epoch=epoch, retired_epochs=retired))  # fmt: skip


def test_the_epoch_rules() -> None:
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    link = _link(500, a, (c,))
    assert check_fresh(_body(501, a), link) is False  # the same incarnation, newer
    for seq in (500, 499, 1):  # replays within the incarnation
        with pytest.raises(Forbidden) as err:
            check_fresh(_body(seq, a), link)
        assert err.value.field == "body.seq"
    assert check_fresh(_body(3, b), link) is True  # restored: a new epoch, seq starts over
    assert retire(link, b) == (c, a)
    with pytest.raises(Forbidden) as err:  # an earlier incarnation: a replay, whatever its seq
        check_fresh(_body(10**6, c), link)
    assert err.value.field == "body.epoch"
    with pytest.raises(Forbidden):  # no epoch once one is known: refused too
        check_fresh(_body(10**6, None), link)
    legacy = _link(7, "")  # a cell before epochs keeps the plain rule
    assert check_fresh(_body(8, None), legacy) is False
    with pytest.raises(Forbidden):
        check_fresh(_body(7, None), legacy)
    assert check_fresh(_body(1, a), legacy) is True and retire(legacy, a) == ("",)
    many = _link(1, a, tuple(f"{i:032x}" for i in range(40)))
    assert len(retire(many, b)) == 32 and retire(many, b)[-1] == a


def test_a_restored_cell_is_heard_again_and_its_old_documents_stay_refused(
    control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    links, beta_private, _ = _linked_pair(control)
    sync = Sync(links)
    first, second = "1" * 32, "2" * 32
    old = [_from_beta(control, beta_private, "state", seq, first) for seq in range(1, 101)]
    for env in old:  # 100 pushes
        sync.receive_state(env, "10.62.0.1")
    # the clock does not matter: skewed by a year, both ways
    monkeypatch.setattr(time, "time", lambda: 1.0e9)
    restored = _from_beta(control, beta_private, "state", 3, second)  # seq from the backup
    assert sync.receive_state(restored, "10.62.0.1") == {"ok": True, "seq": 3}
    for env in (old[-1], old[50], restored):
        with pytest.raises(Forbidden):
            sync.receive_state(env, "10.62.0.1")
    assert sync.receive_state(_from_beta(control, beta_private, "state", 4, second),
                              "10.62.0.1")["seq"] == 4  # fmt: skip
    events = [e["event"] for e in links.journal_entries("beta")]
    assert "cell beta was restored from a backup" in events


def test_a_404_on_a_push_marks_an_orphan_that_a_document_clears(control: Control) -> None:
    from picell.mesh.sender import ORPHAN_404

    links, beta_private, _ = _linked_pair(control)
    with control.store.transaction() as conn:
        assert link_table.set_orphan(conn, "beta", ORPHAN_404)
        assert not link_table.set_orphan(conn, "beta", ORPHAN_404)
    [row] = links.overview()
    assert row["orphan"] and "no link with us" in row["orphan_reason"]
    Sync(links).receive_state(_from_beta(control, beta_private, "state", 1, "1" * 32),
                              "10.62.0.1")  # fmt: skip
    assert links.overview()[0]["orphan"] is False


# -- key rotation ------------------------------------------------------------------------------
def _rekey(
    control: Control,
    old_private: str,
    new_private: str,
    seq: int,
    *,
    switch: bool,
    proof_key: str | None = None,
    signer: str | None = None,
) -> Any:
    alpha_public = keys.public_from_private(control.cell().private_key)
    old_public = keys.public_from_private(old_private)
    made = proof(proof_key or new_private, old_public, alpha_public)
    extra = {"new_public_key": keys.public_from_private(new_private), "proof": made,
             "switch": switch}  # fmt: skip
    env = _from_beta(control, signer or old_private, "rekey", seq, "1" * 32, **extra)
    if signer:  # claims to come from the old key
        env["body"]["from_public_key"] = old_public
    return env


def test_a_rekey_moves_the_link_only_on_a_proven_new_key(control: Control) -> None:
    links, beta_old, beta_old_public = _linked_pair(control)
    rekey = Rekey(links)
    beta_new, beta_new_public = keypair()
    thief, _ = keypair()
    refused = [
        (_rekey(control, beta_old, beta_new, 1, switch=True, proof_key=thief), "body.proof"),
        (_rekey(control, beta_old, beta_new, 1, switch=True, signer=thief), "mac"),
    ]
    for env, field in refused:
        with pytest.raises(Forbidden) as err:
            rekey.receive(env, "10.62.0.1")
        assert err.value.field == field
    with pytest.raises(Forbidden):  # not from beta's own address
        rekey.receive(_rekey(control, beta_old, beta_new, 1, switch=False), "10.62.0.7")
    prepare = _rekey(control, beta_old, beta_new, 1, switch=False)
    assert rekey.receive(prepare, "10.62.0.1")["new_public_key"] == beta_new_public
    with control.store.read() as conn:
        beta = link_table.get(conn, "beta")
    assert beta.public_key == beta_old_public and beta.mirror.next_key == beta_new_public
    with pytest.raises(Forbidden):  # replayed
        rekey.receive(prepare, "10.62.0.1")
    rekey.receive(_rekey(control, beta_old, beta_new, 2, switch=True), "10.62.0.1")
    with control.store.read() as conn:
        beta = link_table.get(conn, "beta")
    assert beta.public_key == beta_new_public and beta.mirror.next_key is None
    with pytest.raises(NotFound):  # the old key no longer speaks for beta
        rekey.receive(_rekey(control, beta_old, beta_new, 3, switch=True), "10.62.0.1")
    # the new key does: its state documents are accepted (same epoch, the next seq)
    Sync(links).receive_state(_from_beta(control, beta_new, "state", 4, "1" * 32), "10.62.0.1")
    assert "their key rotated" in [e["event"] for e in links.journal_entries("beta")]


def test_a_rekey_cannot_take_a_key_in_use(control: Control) -> None:
    links, beta_old, _ = _linked_pair(control)
    alpha_private = control.cell().private_key
    with pytest.raises(Conflict):
        Rekey(links).receive(_rekey(control, beta_old, alpha_private, 1, switch=True,
                                    proof_key=alpha_private), "10.62.0.1")  # fmt: skip


def test_rotate_keeps_the_old_key_until_every_linked_cell_holds_the_new_one(
    control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    from picell.mesh import client

    links, _, beta_public = _linked_pair(control)
    with control.store.transaction() as conn:
        conn.execute("UPDATE links SET state = 'linked'")
    control.add_peer("phone", None)
    old_private = control.cell().private_key
    sent: list[dict[str, Any]] = []
    answer: dict[str, Any] = {"up": False}

    def send(our_ip: Any, their_ip: Any, port: int, kind: str, env: dict[str, Any]) -> Any:
        sent.append(env["body"])
        if not answer["up"]:
            raise client.Unreachable("no answer")
        return 200, {"ok": True, "new_public_key": env["body"]["new_public_key"]}

    monkeypatch.setattr(client, "send", send)
    first = Rekey(links).rotate()
    assert not first["switched"] and "beta" in first["pending"] and first["devices"] == []
    assert control.cell().private_key == old_private  # the tunnel stays up
    assert control.cell().next_private_key is not None
    answer["up"] = True
    second = Rekey(links).rotate()
    assert second["public_key"] == first["public_key"]  # resumed with the same new key
    assert second["switched"] and second["moved"] == ["beta"] and second["devices"] == ["phone"]
    assert keys.public_from_private(control.cell().private_key) == second["public_key"]
    assert [b["switch"] for b in sent] == [False, False, True]
    assert all(b["to_public_key"] == beta_public for b in sent)
    assert [b["seq"] for b in sent] == sorted({b["seq"] for b in sent})  # each a fresh seq


# -- the web page ------------------------------------------------------------------------------
def test_the_cell_network_page_shows_the_backup_command_and_rotates_behind_csrf(
    control: Control,
) -> None:
    from tests.unit.test_web_pages import client as make_client
    from tests.unit.test_web_pages import post

    client = make_client.__wrapped__(control)  # type: ignore[attr-defined]
    control.add_peer("phone", None)
    html = client.get("/cells").text
    assert "picell backup FILE --passphrase-file" in html and "private keys" in html
    old = control.cell().private_key
    refused = client.post("/cells/keys/rotate", data={})  # no CSRF token
    assert refused.status_code == 403 and control.cell().private_key == old
    done = post(client, "/cells/keys/rotate")
    assert getattr(done, "status_code", 0) < 400
    assert control.cell().private_key != old  # no linked cell: it switches at once
    assert "Key last rotated" in client.get("/cells").text
