"""The `invites` table: pairing tokens, never stored themselves.

A row keeps SHA-256 of the token (to recognise it) and the pairing MAC key derived from it (to
check a redemption's MAC). Redemption marks the row used in the caller's write transaction, with
`used_at IS NULL` in the UPDATE so that of concurrent redemptions exactly one succeeds.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Invite:
    id: int
    mac_key: bytes
    expires_at: float
    used_at: float | None


def add(conn: sqlite3.Connection, token_hash: str, mac_key: bytes, expires_at: float) -> None:
    conn.execute(
        "INSERT INTO invites (token_hash, mac_key, expires_at, created_at) VALUES (?, ?, ?, ?)",
        (token_hash, mac_key.hex(), expires_at, time.time()),
    )


def candidates(conn: sqlite3.Connection, now: float) -> list[Invite]:
    """Invites that could still be redeemed (unused, unexpired)."""
    rows = conn.execute(
        "SELECT id, mac_key, expires_at, used_at FROM invites"
        " WHERE used_at IS NULL AND expires_at > ?",
        (now,),
    )
    return [Invite(r[0], bytes.fromhex(r[1]), r[2], r[3]) for r in rows]


def consume(conn: sqlite3.Connection, invite_id: int, used_by: str) -> bool:
    """Mark the invite used; False when another redemption got there first."""
    cur = conn.execute(
        "UPDATE invites SET used_at = ?, used_by = ? WHERE id = ? AND used_at IS NULL",
        (time.time(), used_by, invite_id),
    )
    return cur.rowcount == 1
