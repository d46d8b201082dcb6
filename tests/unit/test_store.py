"""The store: pragmas, migrations, file mode, transactions that roll back, the link row."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest

from picell.store import db, links
from picell.store.db import Store


def test_pragmas_and_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert stat.S_IMODE((tmp_path / "s.db").stat().st_mode) == 0o600
    assert store.version == len(db.MIGRATIONS)
    store.close()


def test_migrations_run_once_and_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(tmp_path / "s.db").close()
    extra = "ALTER TABLE peers ADD COLUMN note TEXT NOT NULL DEFAULT ''"
    monkeypatch.setattr(db, "MIGRATIONS", (*db.MIGRATIONS, extra))
    store = Store(tmp_path / "s.db")  # an older store gains the column with its default
    assert store.version == len(db.MIGRATIONS)
    cols = [r[1] for r in store.conn.execute("PRAGMA table_info(peers)")]
    assert "note" in cols
    store.close()
    Store(tmp_path / "s.db").close()  # running again changes nothing


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    with pytest.raises(RuntimeError), store.transaction() as conn:
        conn.execute(
            "INSERT INTO services (name, vip_index, backend_host, backend_port, port, created_at)"
            " VALUES ('web', 1, '127.0.0.1', 80, 80, 0)"
        )
        raise RuntimeError("apply failed")
    assert store.conn.execute("SELECT COUNT(*) FROM services").fetchone()[0] == 0
    store.close()


def test_a_link_keeps_each_part_in_its_own_columns(tmp_path: Path) -> None:
    """The parts of a `Link` are an in-memory shape: every value lands in the flat column the
    SQL elsewhere (`mark_pending`, the exit claim, the sender's seq) reads, and comes back."""
    ours, theirs = links.OwnerChoices, links.Mirror
    link = links.Link(
        "beta",
        "K" * 43 + "=",
        links.LinkIdentity(
            "198.51.100.2:51820",
            ipaddress.IPv4Network("10.62.0.0/24"),
            ipaddress.IPv4Address("10.62.0.1"),
            "beta.test",
            mesh_port=3001,
            api_url="http://10.62.0.1:3001",
            versions=(1, 2),
            endpoints=("198.51.100.2:51820", "[2001:db8::2]:51820"),
            listen_port=51820,
            mapped=ipaddress.IPv4Network("10.201.7.0/24"),
        ),
        links.LinkState.LINKED,
        choices=ours(
            shares=(links.Share("web"), links.Share("wiki", "phone", 1800000000.0)),
            exit_offered=True,
            exit_until=1800000001.0,
            publish_devices=True,
            exit_relay_active=False,
            relay_offered=True,
            via="gamma",
        ),  # fmt: skip
        mirror=theirs(
            outbound=({"name": "nas"},),
            exit_offered=False,
            exit_relay_active=True,
            exit_relay_key="R" * 43 + "=",
            exit_relay_port=51821,
            exit_client_key="C" * 43 + "=",
            exit_client_port=51822,
            relay_offered=True,
            seen_at="203.0.113.9:40000",
            via_port=52000,
            introduced='{"at": 1}',
            seq=7,
            updated_at=20.0,
            epoch="e" * 32,
            retired_epochs=("d" * 32,),
            next_key="N" * 43 + "=",
            seen_as=ipaddress.IPv4Network("10.201.9.0/24"),
            devices=(("phone", ipaddress.IPv4Address("10.62.0.2")),),
        ),
        sync=links.SyncMarks(
            pending_push=3,
            last_push_status="error",
            last_push_at=30.0,
            last_push_error="refused",
            seq=9,
            invite_proof="p" * 64,
            rekey_state="told",
        ),
        created_at=10.0,
        linked_at=11.0,
        orphan="they hold no link with us",
    )
    store = Store(tmp_path / "s.db")
    with store.transaction() as conn:
        links.save(conn, link)
        row = dict(conn.execute("SELECT * FROM links").fetchone())
        assert links.get(conn, "beta") == link
    store.close()
    assert row == {
        "name": "beta",
        "public_key": "K" * 43 + "=",
        "endpoint": "198.51.100.2:51820",
        "vpn_subnet": "10.62.0.0/24",
        "dns_ip": "10.62.0.1",
        "domain": "beta.test",
        "mesh_port": 3001,
        "remote_api_url": "http://10.62.0.1:3001",
        "remote_versions": "[1, 2]",
        "state": "linked",
        "inbound": '["web", {"service": "wiki", "device": "phone", "until": 1800000000.0}]',
        "exit_until": 1800000001.0,
        "publish_devices": 1,
        "remote_devices": '[["phone", "10.62.0.2"]]',
        "exit_offered": 1,
        "exit_relay_active": 0,
        "outbound": '[{"name": "nas"}]',
        "remote_exit_offered": 0,
        "remote_exit_relay_active": 1,
        "remote_exit_relay_key": "R" * 43 + "=",
        "remote_exit_relay_port": 51821,
        "remote_exit_client_key": "C" * 43 + "=",
        "remote_exit_client_port": 51822,
        "remote_seq": 7,
        "last_remote_update_at": 20.0,
        "pending_push": 3,
        "last_push_status": "error",
        "last_push_at": 30.0,
        "last_push_error": "refused",
        "local_seq": 9,
        "invite_proof": "p" * 64,
        "created_at": 10.0,
        "linked_at": 11.0,
        "endpoints": '["198.51.100.2:51820", "[2001:db8::2]:51820"]',
        "relay_offered": 1,
        "via": "gamma",
        "remote_relay_offered": 1,
        "remote_seen_at": "203.0.113.9:40000",
        "via_port": 52000,
        "mapped_subnet": "10.201.7.0/24",
        "remote_mapped_subnet": "10.201.9.0/24",
        "introduced": '{"at": 1}',
        "listen_port": 51820,
        "remote_epoch": "e" * 32,
        "retired_epochs": '["' + "d" * 32 + '"]',
        "orphan": "they hold no link with us",
        "remote_next_key": "N" * 43 + "=",
        "rekey_state": "told",
    }
