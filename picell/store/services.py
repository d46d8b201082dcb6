"""The `services` table: what the cell offers, each on a virtual IP taken from the top of the
VPN network downward (stored as an offset below the broadcast address)."""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from dataclasses import dataclass

from picell.errors import Conflict, NotFound


@dataclass(frozen=True)
class Service:
    name: str
    vip_index: int
    backend_host: ipaddress.IPv4Address
    backend_port: int
    protocol: str
    port: int


def _row(row: sqlite3.Row) -> Service:
    return Service(
        name=row["name"],
        vip_index=row["vip_index"],
        backend_host=ipaddress.IPv4Address(row["backend_host"]),
        backend_port=row["backend_port"],
        protocol=row["protocol"],
        port=row["port"],
    )


def all_services(conn: sqlite3.Connection) -> list[Service]:
    return [_row(r) for r in conn.execute("SELECT * FROM services ORDER BY vip_index")]


def add(conn: sqlite3.Connection, svc: Service) -> None:
    if conn.execute("SELECT 1 FROM services WHERE name = ?", (svc.name,)).fetchone():
        raise Conflict(f"a service named {svc.name!r} already exists", field="name")
    conn.execute(
        "INSERT INTO services (name, vip_index, backend_host, backend_port, protocol, port,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            svc.name,
            svc.vip_index,
            str(svc.backend_host),
            svc.backend_port,
            svc.protocol,
            svc.port,
            time.time(),
        ),
    )


def remove(conn: sqlite3.Connection, name: str) -> None:
    if conn.execute("DELETE FROM services WHERE name = ?", (name,)).rowcount == 0:
        raise NotFound(f"no service named {name!r}", field="name")
