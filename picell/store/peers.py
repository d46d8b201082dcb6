"""The `peers` table: the owner's devices. Addresses are stored as a host index into the cell's
network, so a renumbered cell derives every device address (and keeps allocating) correctly."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from picell.errors import Conflict, NotFound


@dataclass(frozen=True)
class Peer:
    name: str
    public_key: str
    private_key: str | None
    host_index: int
    route_via: str | None
    created_at: float


def _row(row: sqlite3.Row) -> Peer:
    return Peer(
        name=row["name"],
        public_key=row["public_key"],
        private_key=row["private_key"],
        host_index=row["host_index"],
        route_via=row["route_via"],
        created_at=row["created_at"],
    )


def all_peers(conn: sqlite3.Connection) -> list[Peer]:
    return [_row(r) for r in conn.execute("SELECT * FROM peers ORDER BY host_index")]


def get(conn: sqlite3.Connection, name: str) -> Peer:
    row = conn.execute("SELECT * FROM peers WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFound(f"no device named {name!r}", field="name")
    return _row(row)


def add(conn: sqlite3.Connection, peer: Peer) -> None:
    if conn.execute("SELECT 1 FROM peers WHERE name = ?", (peer.name,)).fetchone():
        raise Conflict(f"a device named {peer.name!r} already exists", field="name")
    clash = conn.execute(
        "SELECT name FROM peers WHERE public_key = ?", (peer.public_key,)
    ).fetchone()
    if clash:
        raise Conflict(f"public_key: already used by device {clash['name']!r}", field="public_key")
    conn.execute(
        "INSERT INTO peers (name, public_key, private_key, host_index, route_via, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            peer.name,
            peer.public_key,
            peer.private_key,
            peer.host_index,
            peer.route_via,
            time.time(),
        ),
    )


def remove(conn: sqlite3.Connection, name: str) -> None:
    if conn.execute("DELETE FROM peers WHERE name = ?", (name,)).rowcount == 0:
        raise NotFound(f"no device named {name!r}", field="name")


def set_route_via(conn: sqlite3.Connection, name: str, via: str | None) -> None:
    if conn.execute("UPDATE peers SET route_via = ? WHERE name = ?", (via, name)).rowcount == 0:
        raise NotFound(f"no device named {name!r}", field="name")
