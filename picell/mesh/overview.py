"""The links as the owner sees them (`picell cells`, the Cell Network page): the store's rows
joined with what WireGuard reports (handshake age, rx/tx) and the outbox, and what each share's
grant carried. Read-only: one read transaction and one `wg show dump`, whatever the number of
links (with the shares' usage, one `nft -j` and one `conntrack -L` more)."""

from __future__ import annotations

import time
from typing import Any

from picell.addressing import vip_address
from picell.constants import LINK_ONLINE_S
from picell.firewall.apply import Flow, GrantCounters, list_flows, observe_grant_counters
from picell.mesh.crypto import short_auth_string
from picell.mesh.document import service_entry
from picell.mesh.relay import path_of
from picell.mesh.shares import shown_until
from picell.state import Grant, share_grant
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.store import outbox
from picell.store import services as service_table
from picell.store.cell import Cell
from picell.store.db import Store
from picell.store.links import Link, LinkState, Share
from picell.store.services import Service
from picell.system.run import Runner
from picell.wireguard import keys
from picell.wireguard.apply import observe_wg


def link_overview(
    store: Store, runner: Runner, name: str | None = None, usage: bool = True
) -> list[dict[str, Any]]:
    """Every link (or only `name`'s). With `usage`, what each share's grant carried: one
    `nft -j` and one `conntrack -L` more, so the answer to a change leaves it out."""
    with store.read() as conn:
        cell = cell_table.load(conn)
        links = [ln for ln in link_table.all_links(conn) if name in (None, ln.name)]
        services = service_table.all_services(conn)
        pending = {m.link_key: m for m in outbox.all_messages(conn)}
    observed = observe_wg(runner, cell.interface) if links else None
    shared = usage and any(ln.choices.shares for ln in links)
    use = (observe_grant_counters(runner), list_flows(runner)) if shared else None
    our_public = keys.public_from_private(cell.private_key)
    now = time.time()
    out = []
    for link in links:
        seen = observed.peers.get(link.public_key) if observed else None
        hs = seen.latest_handshake if seen else 0
        age = round(now - hs) if hs else None
        msg = pending.get(link.public_key)
        out.append(
            {
                "name": link.name,
                "state": link.state.value,
                "domain": link.identity.domain,
                "vpn_subnet": str(link.identity.vpn_subnet),
                "dns_ip": str(link.identity.dns_ip),
                # translation (`mesh.mapping`): where we present its network, where it
                # presents ours; None: as it is
                "mapped_subnet": str(link.identity.mapped) if link.identity.mapped else None,
                "seen_as": str(link.mirror.seen_as) if link.mirror.seen_as else None,
                "endpoint": link.identity.endpoint,
                "endpoints": list(link.identity.candidates),
                "seen_at": link.mirror.seen_at,
                "public_key": link.public_key,
                "auth_string": short_auth_string(our_public, link.public_key),
                "handshake_age_s": age,
                "online": age is not None and age < LINK_ONLINE_S,
                "rx_bytes": seen.rx_bytes if seen else 0,
                "tx_bytes": seen.tx_bytes if seen else 0,
                "inbound": _inbound(cell, services, link, use),
                "outbound": list(link.mirror.outbound),
                "exit_offered": link.choices.exit_offered,
                "exit_until": shown_until(link.choices.exit_until)
                if link.choices.exit_offered
                else None,
                "remote_exit_offered": link.mirror.exit_offered,
                # we use their exit (devices routed via them); they use ours
                "exit_relay_active": link.choices.exit_relay_active,
                "remote_exit_relay_active": link.mirror.exit_relay_active,
                "relaying": link.state == LinkState.LINKED
                and link.choices.exit_offered
                and link.mirror.exit_relay_active,
                "pending_push": link.sync.pending_push,
                "last_push_status": link.sync.last_push_status,
                "last_push_at": link.sync.last_push_at,
                "last_push_error": link.sync.last_push_error,
                "last_remote_update_at": link.mirror.updated_at,
                "linked_at": link.linked_at,
                "pending_message": msg.kind if msg else None,
                "pending_error": msg.last_error if msg else None,
                # introductions and the relay (mesh.relay): via, path, relay_note
                "relay_offered": link.choices.relay_offered,
                "remote_relay_offered": link.mirror.relay_offered,
                **path_of(link, links, seen.endpoint if seen else None),
                "orphan": link.orphan is not None,
                "orphan_reason": link.orphan,
                "rekey_state": link.sync.rekey_state,
                "remote_next_key": link.mirror.next_key,
                "publish_devices": link.choices.publish_devices,
                "devices": [
                    {"name": n, "address": str(link.identity.view(a))}
                    for n, a in link.mirror.devices
                ],  # fmt: skip
            }
        )
    return out


def share_grant_of(cell: Cell, svc: Service, link: Link, share: Share) -> Grant | None:
    """The grant `share` of our service `svc` holds (`state.share_grant`)."""
    vip = vip_address(cell.network, svc.vip_index)
    return share_grant(link, share, svc.protocol, vip, svc.port, cell.network)


def _inbound(
    cell: Cell,
    services: list[Service],
    link: Link,
    usage: tuple[GrantCounters, set[Flow] | None] | None,
) -> list[dict[str, Any]]:
    """Our shares with `link`, one row each: the service, the device and end date when it has
    them, and with `usage` what its grant carried (packets and bytes since it was made) and
    the flows open through it now."""
    by_name = {s.name: s for s in services}
    rows = []
    for share in link.choices.shares:
        svc = by_name.get(share.service)
        if svc is None:
            continue
        row = {**service_entry(cell, svc), "until": shown_until(share.until)}
        if share.device:  # not listed now: no grant until it is listed again
            row |= {"device": share.device,
                    "published": link.mirror.device(share.device) is not None}  # fmt: skip
        rows.append(row)
        grant = share_grant_of(cell, svc, link, share)
        if usage is None or grant is None:
            continue
        counters, flows = usage
        row["packets"], row["bytes"] = counters.get((grant.protocol, grant.element), (0, 0))
        if flows is not None:
            row["flows"] = sum(1 for f in flows if _in(grant, f))
    return rows


def _in(grant: Grant, flow: Flow) -> bool:
    proto, src, dst, port = flow
    return (proto, dst, port) == (grant.protocol, grant.vip, grant.port) and src in grant.network
