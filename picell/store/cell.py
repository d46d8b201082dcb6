"""The `cell` table: this cell's identity and settings (exactly one row once initialised)."""

from __future__ import annotations

import ipaddress
import json
import secrets
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
    # every endpoint the owner set (`endpoint` is the first), or the host's own addresses
    endpoints: tuple[str, ...] = ()
    endpoint_source: str = "owner"  # "owner": set by the owner; "host": the host's own address
    mapped_endpoint: str | None = None  # the home router's mapping (picell.system.portmap)
    # this cell's incarnation: drawn at init and anew by every restore, so linked cells accept
    # its documents again although their sequence numbers repeat (`mesh.protocol`)
    epoch: str = ""
    backup_made_at: float | None = None  # set in a backup's copy only (`store.backup`)
    restored_at: float | None = None  # when this store was restored from a backup
    # a key rotation in flight (`mesh.rekey`): the key we move to once linked cells know it
    next_private_key: str | None = None
    rotated_at: float | None = None  # when the last rotation completed

    @property
    def announced(self) -> tuple[str, ...]:
        """The endpoints other cells and our devices are told, best first (DESIGN §5: at most
        4). Precedence: what the owner set, then the router-mapped address, then the host's
        own addresses."""
        own = self.endpoints or (self.endpoint,)
        if self.endpoint_source == "owner":
            return own[:4]
        mapped = (self.mapped_endpoint,) if self.mapped_endpoint else ()
        return tuple(dict.fromkeys((*mapped, *own)))[:4]

    @property
    def primary_endpoint(self) -> str:
        return self.announced[0]

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
        endpoints=tuple(json.loads(row["endpoints"])),
        endpoint_source=row["endpoint_source"],
        mapped_endpoint=row["mapped_endpoint"],
        epoch=row["epoch"],
        backup_made_at=row["backup_made_at"],
        restored_at=row["restored_at"],
        next_private_key=row["next_private_key"],
        rotated_at=row["rotated_at"],
    )


def exists(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM cell WHERE id = 1").fetchone() is not None


def save(conn: sqlite3.Connection, cell: Cell) -> None:
    conn.execute(
        """INSERT INTO cell (id, name, domain, address, listen_port, endpoint, private_key,
               interface, pair_port, mesh_port, uplink, mesh_range, upstreams, created_at,
               endpoints, endpoint_source, epoch)
           VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (id) DO UPDATE SET name=excluded.name, domain=excluded.domain,
               address=excluded.address, listen_port=excluded.listen_port,
               endpoint=excluded.endpoint, interface=excluded.interface,
               pair_port=excluded.pair_port, mesh_port=excluded.mesh_port,
               uplink=excluded.uplink, mesh_range=excluded.mesh_range,
               upstreams=excluded.upstreams, endpoints=excluded.endpoints,
               endpoint_source=excluded.endpoint_source""",
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
            json.dumps(list(cell.endpoints or (cell.endpoint,))),
            cell.endpoint_source,
            cell.epoch or new_epoch(),  # a new cell's first incarnation; kept on update
        ),
    )


def new_epoch() -> str:
    return secrets.token_hex(16)


def set_epoch(conn: sqlite3.Connection, epoch: str) -> None:
    conn.execute("UPDATE cell SET epoch = ? WHERE id = 1", (epoch,))


def set_mapped_endpoint(conn: sqlite3.Connection, endpoint: str | None) -> None:
    """The router-mapped endpoint (or None when no mapping holds); kept apart from `save`, so
    that the owner's settings and the port mapper never overwrite each other."""
    conn.execute("UPDATE cell SET mapped_endpoint = ? WHERE id = 1", (endpoint,))
