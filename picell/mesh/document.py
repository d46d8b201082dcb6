"""The link-state document's content (pure): what we share with a linked cell, as it sees it."""

from __future__ import annotations

from typing import Any

from picell.addressing import vip_address
from picell.store.cell import Cell
from picell.store.links import Link
from picell.store.services import Service


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


def document(cell: Cell, link: Link, services: list[Service]) -> dict[str, Any]:
    """What we tell `link` about our side (the envelope adds v, type, keys, seq, sent_at)."""
    return {
        "shared_services": shared_services(cell, services, link.inbound),
        "exit_offered": link.exit_offered,
        "use_as_exit_relay": link.exit_relay_active,
        "identity": {
            "endpoint": cell.endpoint,
            "vpn_subnet": str(cell.network),
            "dns_ip": str(cell.ip),
            "domain": cell.domain,
        },
    }
