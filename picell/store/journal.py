"""The `journal` of link events: linked, unlinked, by whom, when, with details.

Append-only, but capped: each link keeps its latest `KEEP_PER_LINK` rows, so a linked cell that
sends documents all day cannot grow our store. Details are one line (control characters never
reach a terminal through `picell cells --journal`).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from picell.validate import printable

KEEP_PER_LINK = 1000
DETAIL_MAX = 500


def append(conn: sqlite3.Connection, link: str, event: str, actor: str, detail: str = "") -> None:
    conn.execute(
        "INSERT INTO journal (at, link, event, actor, detail) VALUES (?, ?, ?, ?, ?)",
        (time.time(), printable(link, 64), printable(event, 200), printable(actor, 100),
         printable(detail, DETAIL_MAX)),
    )  # fmt: skip
    trim(conn, printable(link, 64))


def trim(conn: sqlite3.Connection, link: str, keep: int = KEEP_PER_LINK) -> None:
    conn.execute(
        "DELETE FROM journal WHERE link = ? AND id <= (SELECT id FROM journal WHERE link = ?"
        " ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (link, link, keep),
    )


def entries(conn: sqlite3.Connection, link: str | None = None) -> list[dict[str, Any]]:
    rows = (
        conn.execute("SELECT * FROM journal WHERE link = ? ORDER BY id", (link,))
        if link
        else conn.execute("SELECT * FROM journal ORDER BY id")
    )
    return [dict(r) for r in rows]


def last_at(conn: sqlite3.Connection, link: str, event: str) -> float | None:
    """When `event` was last recorded for `link` (None: never, or trimmed away)."""
    row = conn.execute(
        "SELECT at FROM journal WHERE link = ? AND event = ? ORDER BY id DESC LIMIT 1",
        (link, event),
    ).fetchone()
    return float(row[0]) if row else None
