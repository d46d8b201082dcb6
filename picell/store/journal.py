"""The append-only `journal` of link events: linked, unlinked, by whom, when, with details."""

from __future__ import annotations

import sqlite3
import time
from typing import Any


def append(conn: sqlite3.Connection, link: str, event: str, actor: str, detail: str = "") -> None:
    conn.execute(
        "INSERT INTO journal (at, link, event, actor, detail) VALUES (?, ?, ?, ?, ?)",
        (time.time(), link, event, actor, detail),
    )


def entries(conn: sqlite3.Connection, link: str | None = None) -> list[dict[str, Any]]:
    rows = (
        conn.execute("SELECT * FROM journal WHERE link = ? ORDER BY id", (link,))
        if link
        else conn.execute("SELECT * FROM journal ORDER BY id")
    )
    return [dict(r) for r in rows]
