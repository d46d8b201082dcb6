"""The `port_mapping` table: the one mapping the home router granted us (at most one row).

It outlives the daemon, like the tunnels it serves: a restarted daemon renews the same external
ports instead of asking for new ones. Must not talk to the router (picell/system/portmap.py does).
"""

from __future__ import annotations

import ipaddress
import sqlite3
from dataclasses import dataclass

# how long a renewal may wait at least, whatever lifetime the router grants: a hostile or broken
# gateway granting 1 s must not make us ask ten times a second
RENEW_MIN_S = 30.0


@dataclass(frozen=True)
class Mapping:
    protocol: str  # "pcp" | "nat-pmp" | "upnp"
    gateway: ipaddress.IPv4Address
    internal_address: ipaddress.IPv4Address
    external_address: ipaddress.IPv4Address
    listen_port: int  # our WireGuard UDP port
    external_port: int
    pair_port: int  # our TCP pairing port
    pair_external_port: int | None  # None when the router granted the UDP port only
    lifetime_s: int
    obtained_at: float  # wall clock: it must mean the same after a restart
    nonce: bytes = b""  # PCP's mapping nonce: a renewal or a release must repeat it

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime_s

    @property
    def renew_at(self) -> float:
        return self.obtained_at + max(self.lifetime_s / 2, RENEW_MIN_S)

    @property
    def endpoint(self) -> str:
        return f"{self.external_address}:{self.external_port}"


def load(conn: sqlite3.Connection) -> Mapping | None:
    row = conn.execute("SELECT * FROM port_mapping WHERE id = 1").fetchone()
    if row is None:
        return None
    return Mapping(
        protocol=row["protocol"],
        gateway=ipaddress.IPv4Address(row["gateway"]),
        internal_address=ipaddress.IPv4Address(row["internal_address"]),
        external_address=ipaddress.IPv4Address(row["external_address"]),
        listen_port=row["listen_port"],
        external_port=row["external_port"],
        pair_port=row["pair_port"],
        pair_external_port=row["pair_external_port"],
        lifetime_s=row["lifetime_s"],
        obtained_at=row["obtained_at"],
        nonce=bytes.fromhex(row["nonce"]),
    )


def save(conn: sqlite3.Connection, m: Mapping) -> None:
    conn.execute(
        """INSERT OR REPLACE INTO port_mapping (id, protocol, gateway, internal_address,
               external_address, listen_port, external_port, pair_port, pair_external_port,
               nonce, lifetime_s, obtained_at)
           VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            m.protocol,
            str(m.gateway),
            str(m.internal_address),
            str(m.external_address),
            m.listen_port,
            m.external_port,
            m.pair_port,
            m.pair_external_port,
            m.nonce.hex(),
            m.lifetime_s,
            m.obtained_at,
        ),
    )


def clear(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM port_mapping")
