"""The `exits` table: which slot each exit cell our devices leave through holds.

A slot names one exit tunnel's interface, firewall mark and routing table (`picell.exits`); it is
kept while any device routes through that cell, so adding another exit never renames the
interfaces of the ones in use. Slot 0 is the relay side (our exit lent to linked cells).
"""

from __future__ import annotations

import sqlite3

from picell.constants import EXIT_MAX_SLOTS
from picell.errors import Conflict


def slots(conn: sqlite3.Connection) -> dict[str, int]:
    return {r["cell"]: r["slot"] for r in conn.execute("SELECT cell, slot FROM exits")}


def claim(conn: sqlite3.Connection, cell: str) -> int:
    """The slot of exit cell `cell`, allocating the lowest free one (from 1) if it has none."""
    taken = slots(conn)
    if cell in taken:
        return taken[cell]
    free = next((n for n in range(1, EXIT_MAX_SLOTS + 1) if n not in taken.values()), None)
    if free is None:
        raise Conflict(
            f"via_cell: devices already leave through {EXIT_MAX_SLOTS} different cells; "
            "move one of them first",
            field="via_cell",
        )
    conn.execute("INSERT INTO exits (cell, slot) VALUES (?, ?)", (cell, free))
    return free


def release_unused(conn: sqlite3.Connection) -> None:
    """Free the slots of exit cells no device routes through any more, and record on each link
    whether we use its exit (`exit_relay_active`, what we ask of it)."""
    conn.execute(
        "DELETE FROM exits WHERE cell NOT IN"
        " (SELECT route_via FROM peers WHERE route_via IS NOT NULL)"
    )
    conn.execute("UPDATE links SET exit_relay_active = (name IN (SELECT cell FROM exits))")
