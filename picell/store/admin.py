"""The `admin` table: the web UI's port and the admin password's argon2 hash (one row).

Stores only the hash, never the password. Must not hash or verify itself (`picell.api.auth`
does) nor know about HTTP.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from picell.constants import DEFAULT_WEB_PORT


@dataclass(frozen=True)
class Admin:
    web_port: int
    password_hash: str | None
    password_set_at: float | None


def load(conn: sqlite3.Connection) -> Admin:
    row = conn.execute("SELECT * FROM admin WHERE id = 1").fetchone()
    if row is None:
        return Admin(DEFAULT_WEB_PORT, None, None)
    return Admin(row["web_port"], row["password_hash"], row["password_set_at"])


def set_web_port(conn: sqlite3.Connection, port: int) -> None:
    conn.execute(
        "INSERT INTO admin (id, web_port) VALUES (1, ?) "
        "ON CONFLICT (id) DO UPDATE SET web_port = excluded.web_port",
        (port,),
    )


def set_password_hash(conn: sqlite3.Connection, password_hash: str) -> None:
    conn.execute(
        "INSERT INTO admin (id, password_hash, password_set_at) VALUES (1, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET password_hash = excluded.password_hash, "
        "password_set_at = excluded.password_set_at",
        (password_hash, time.time()),
    )
