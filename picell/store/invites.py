"""The `invites` table: pairing tokens, never stored themselves.

A row keeps SHA-256 of the token (to recognise it) and the pairing MAC key derived from it (to
check a redemption's MAC). Redemption marks the row used in the caller's write transaction, with
`used_at IS NULL` in the UPDATE so that of concurrent redemptions exactly one succeeds.

The owner lists what was handed out (`listing`: created, expires, used, by whom) and ends an
outstanding invite (`revoke`: its row goes, so no MAC can verify against it any more). A used
invite is kept: it is the record of who linked with it.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Literal

from picell.errors import Conflict, NotFound

InviteState = Literal["open", "used", "expired"]


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


@dataclass(frozen=True)
class InviteRecord:
    """An invite as its owner sees it (no token, no key)."""

    id: int
    created_at: float
    expires_at: float
    used_at: float | None
    used_by: str | None

    def state(self, now: float) -> InviteState:
        if self.used_at is not None:
            return "used"
        return "open" if self.expires_at > now else "expired"


def _record(row: sqlite3.Row) -> InviteRecord:
    used_at, used_by = row["used_at"], row["used_by"]
    return InviteRecord(
        id=int(row["id"]),
        created_at=float(row["created_at"]),
        expires_at=float(row["expires_at"]),
        used_at=None if used_at is None else float(used_at),
        used_by=None if used_by is None else str(used_by),
    )


def id_of(conn: sqlite3.Connection, token_hash: str) -> int:
    """The id of the invite whose token hashes to `token_hash` (one just made)."""
    row = conn.execute("SELECT id FROM invites WHERE token_hash = ?", (token_hash,)).fetchone()
    if row is None:
        raise NotFound("invite: no such invite", field="id")
    return int(row[0])


_COLUMNS = "id, created_at, expires_at, used_at, used_by"


def get(conn: sqlite3.Connection, invite_id: int) -> InviteRecord:
    row = conn.execute(f"SELECT {_COLUMNS} FROM invites WHERE id = ?", (invite_id,)).fetchone()
    if row is None:
        raise NotFound(f"id: no invite {invite_id}", field="id")
    return _record(row)


def listing(conn: sqlite3.Connection) -> list[InviteRecord]:
    """Every invite handed out, oldest first."""
    return [_record(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM invites ORDER BY id")]


def revoke(conn: sqlite3.Connection, invite_id: int) -> InviteRecord:
    """End an invite that was not used: its row goes, so a redemption can no longer match it.
    A used invite is refused (it is the record of a link), an unknown one is NotFound."""
    record = get(conn, invite_id)
    if record.used_at is not None:
        raise Conflict(
            f"id: invite {invite_id} was already used by {record.used_by}; "
            f"end that link with `picell disconnect {record.used_by}`",
            field="id",
        )
    conn.execute("DELETE FROM invites WHERE id = ? AND used_at IS NULL", (invite_id,))
    return record
