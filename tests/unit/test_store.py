"""The store: pragmas, migrations, file mode, transactions that roll back."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from picell.store import db
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
