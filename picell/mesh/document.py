"""The link-state document's content (pure): what we share with a linked cell, as it sees it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from picell.addressing import peer_address, vip_address
from picell.routing.exits import exit_port
from picell.state import exit_private_key
from picell.store.cell import Cell
from picell.store.links import Link, Share
from picell.store.peers import Peer
from picell.store.services import Service
from picell.wireguard import keys


def service_entry(cell: Cell, svc: Service) -> dict[str, Any]:
    return {
        "name": svc.name,
        "vip": str(vip_address(cell.network, svc.vip_index)),
        "ports": [svc.port],
        "protocol": svc.protocol,
    }


def shared_services(
    cell: Cell, services: list[Service], shares: tuple[Share, ...]
) -> list[dict[str, Any]]:
    """One entry per service shared in some form, as the document tells it: `devices` when
    only some of their devices may use it, `until` when every share of it ends (the last)."""
    by_name = {s.name: s for s in services}
    out = []
    for name in sorted({s.service for s in shares} & by_name.keys()):
        mine = [s for s in shares if s.service == name]
        entry = service_entry(cell, by_name[name])
        whole = next((s for s in mine if not s.device), None)
        if whole is None:
            entry["devices"] = sorted(s.device for s in mine)
        ends = [s.until for s in ([whole] if whole else mine)]
        if None not in ends:
            entry["until"] = max(u for u in ends if u is not None)
        out.append(entry)
    return out


def published_devices(cell: Cell, peers: list[Peer]) -> list[dict[str, str]]:
    """Our devices as we publish them to a cell (names and addresses in our network)."""
    return [
        {"name": p.name, "address": str(peer_address(cell.network, p.host_index))}
        for p in sorted(peers, key=lambda p: p.name)
    ]


def document(
    cell: Cell,
    link: Link,
    services: list[Service],
    exit_slot: int | None = None,
    seen_at: str | None = None,
    reach: Mapping[str, Any] | None = None,
    peers: list[Peer] | None = None,
) -> dict[str, Any]:
    """What we tell `link` about our side (the envelope adds v, type, keys, seq, sent_at).

    With an exit offer goes our relay end of the exit tunnel; with a request to use theirs
    (`exit_slot`: the slot our devices leave through them) our client end. `seen_at` is where
    our WireGuard sees them (their NAT's address, for them to compare with what they announce).
    `reach` is the introductions' and relay's part (`mesh.relay.relay_fields`). `peers`, our
    devices, are listed while the owner publishes them to `link`.
    """
    wg = keys.public_from_private
    relay = {"public_key": wg(exit_private_key(cell, None)),
             "port": exit_port(cell.listen_port, 0)}  # fmt: skip
    client = None
    if exit_slot is not None:
        client = {"public_key": wg(exit_private_key(cell, link.public_key)),
                  "port": exit_port(cell.listen_port, exit_slot)}  # fmt: skip
    return {
        "shared_services": shared_services(cell, services, link.choices.shares),
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
        **(
            {"devices": published_devices(cell, peers or [])}
            if link.choices.publish_devices
            else {}
        ),
        "identity": {
            "endpoint": cell.primary_endpoint,
            "endpoints": list(cell.announced),
            "vpn_subnet": str(cell.network),
            "dns_ip": str(cell.ip),
            "domain": cell.domain,
            "listen_port": cell.listen_port,
        },
    }
