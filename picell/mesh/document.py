"""The link-state document's content (pure): what we share with a linked cell, as it sees it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from picell.addressing import vip_address
from picell.routing.exits import exit_port
from picell.state import exit_private_key
from picell.store.cell import Cell
from picell.store.links import Link
from picell.store.services import Service
from picell.wireguard import keys


def shared_services(
    cell: Cell, services: list[Service], names: tuple[str, ...]
) -> list[dict[str, Any]]:
    by_name = {s.name: s for s in services}
    return [
        {
            "name": n,
            "vip": str(vip_address(cell.network, by_name[n].vip_index)),
            "ports": [by_name[n].port],
            "protocol": by_name[n].protocol,
        }
        for n in sorted(set(names))
        if n in by_name
    ]


def document(
    cell: Cell,
    link: Link,
    services: list[Service],
    exit_slot: int | None = None,
    seen_at: str | None = None,
    reach: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What we tell `link` about our side (the envelope adds v, type, keys, seq, sent_at).

    With an exit offer goes our relay end of the exit tunnel; with a request to use theirs
    (`exit_slot`: the slot our devices leave through them) our client end. `seen_at` is where
    our WireGuard sees them (their NAT's address, for them to compare with what they announce).
    `reach` is the introductions' and relay's part (`mesh.relay.relay_fields`).
    """
    wg = keys.public_from_private
    relay = {"public_key": wg(exit_private_key(cell, None)),
             "port": exit_port(cell.listen_port, 0)}  # fmt: skip
    client = None
    if exit_slot is not None:
        client = {"public_key": wg(exit_private_key(cell, link.public_key)),
                  "port": exit_port(cell.listen_port, exit_slot)}  # fmt: skip
    return {
        "shared_services": shared_services(cell, services, link.choices.inbound),
        "exit_offered": link.choices.exit_offered,
        "use_as_exit_relay": exit_slot is not None,
        "exit_relay": relay if link.choices.exit_offered else None,
        "exit_client": client,
        # spends the invite of theirs we imported, if our pairing with it never happened
        **({"invite_proof": link.sync.invite_proof} if link.sync.invite_proof else {}),
        **({"seen_at": seen_at} if seen_at else {}),
        # where we present their network (`mesh.mapping`): they translate their side with it
        **({"mapped_subnet": str(link.identity.mapped)} if link.identity.mapped else {}),
        **(reach or {}),
        "identity": {
            "endpoint": cell.primary_endpoint,
            "endpoints": list(cell.announced),
            "vpn_subnet": str(cell.network),
            "dns_ip": str(cell.ip),
            "domain": cell.domain,
            "listen_port": cell.listen_port,
        },
    }
