"""The `cell` table: this cell's identity and settings (exactly one row once initialised)."""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from dataclasses import dataclass

from picell.errors import NotInitialised


@dataclass(frozen=True)
class Cell:
    name: str
    domain: str
    address: ipaddress.IPv4Interface
    listen_port: int
    endpoint: str
    private_key: str
    interface: str
    pair_port: int
    mesh_port: int
    uplink: str | None
    mesh_range: ipaddress.IPv4Network
    upstreams: tuple[ipaddress.IPv4Address, ...]

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.address.network

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return self.address.ip


def load(conn: sqlite3.Connection) -> Cell:
    row = conn.execute("SELECT * FROM cell WHERE id = 1").fetchone()
    if row is None:
        raise NotInitialised("this cell is not initialised yet: run `picell init`")
    return Cell(
        name=row["name"],
        domain=row["domain"],
        address=ipaddress.IPv4Interface(row["address"]),
        listen_port=row["listen_port"],
        endpoint=row["endpoint"],
        private_key=row["private_key"],
        interface=row["interface"],
        pair_port=row["pair_port"],
        mesh_port=row["mesh_port"],
        uplink=row["uplink"],
        mesh_range=ipaddress.IPv4Network(row["mesh_range"]),
        upstreams=tuple(ipaddress.IPv4Address(u) for u in row["upstreams"].split() if u),
    )


def exists(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM cell WHERE id = 1").fetchone() is not None


def save(conn: sqlite3.Connection, cell: Cell) -> None:
    conn.execute(
        """INSERT INTO cell (id, name, domain, address, listen_port, endpoint, private_key,
               interface, pair_port, mesh_port, uplink, mesh_range, upstreams, created_at)
           VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (id) DO UPDATE SET name=excluded.name, domain=excluded.domain,
               address=excluded.address, listen_port=excluded.listen_port,
               endpoint=excluded.endpoint, interface=excluded.interface,
               pair_port=excluded.pair_port, mesh_port=excluded.mesh_port,
               uplink=excluded.uplink, mesh_range=excluded.mesh_range,
               upstreams=excluded.upstreams""",
        (
            cell.name,
            cell.domain,
            str(cell.address),
            cell.listen_port,
            cell.endpoint,
            cell.private_key,
            cell.interface,
            cell.pair_port,
            cell.mesh_port,
            cell.uplink,
            str(cell.mesh_range),
            " ".join(str(u) for u in cell.upstreams),
            time.time(),
        ),
    )
