"""The `outbox`: signed cross-cell messages waiting for delivery (e.g. `unlink` while the other
cell is offline). Rows are removed once delivered; attempts back off up to a cap."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    id: int
    link_key: str  # the other cell's public key
    kind: str
    body: str
    attempts: int
    next_at: float
    last_error: str | None = None
    created_at: float = 0.0


def put(conn: sqlite3.Connection, link_key: str, kind: str, body: str) -> None:
    conn.execute("DELETE FROM outbox WHERE link_key = ? AND kind = ?", (link_key, kind))
    conn.execute(
        "INSERT INTO outbox (link_key, kind, body, next_at, created_at) VALUES (?, ?, ?, ?, ?)",
        (link_key, kind, body, time.time(), time.time()),
    )


def due(conn: sqlite3.Connection, now: float) -> list[Message]:
    rows = conn.execute(
        "SELECT id, link_key, kind, body, attempts, next_at, last_error, created_at FROM outbox"
        " WHERE next_at <= ?"
        " ORDER BY id",
        (now,),
    )
    return [Message(*r) for r in rows]


def done(conn: sqlite3.Connection, message_id: int) -> None:
    conn.execute("DELETE FROM outbox WHERE id = ?", (message_id,))


def failed(conn: sqlite3.Connection, message_id: int, error: str, next_at: float) -> None:
    """A failed attempt; the next one is due at `next_at` (the sender's clock decides)."""
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_at = ? WHERE id = ?",
        (error[:500], next_at, message_id),
    )


def drop(conn: sqlite3.Connection, link_key: str) -> None:
    conn.execute("DELETE FROM outbox WHERE link_key = ?", (link_key,))


def all_messages(conn: sqlite3.Connection) -> list[Message]:
    rows = conn.execute(
        "SELECT id, link_key, kind, body, attempts, next_at, last_error, created_at FROM outbox"
    )
    return [Message(*r) for r in rows]
