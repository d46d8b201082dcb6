"""Per-link sharing and the link-state document (DESIGN §6, §7).

The owner's choices (`mesh.choices`: what we share with a linked cell, our offers) live in the
store; each change marks the link `pending_push` and wakes the sender, which sends the whole
state document, signed, with a fresh `seq`. Receiving one (here) mirrors it: our `outbound`
for them is what they share with us, their `exit_offered` is our `remote_exit_offered`, their
`use_as_exit_relay` our `remote_exit_relay_active`, their `devices` what they publish (a share
with a device ends when they stop publishing); their identity updates the link in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from picell.errors import BadInput
from picell.mesh import relay, shares, wire
from picell.mesh.choices import Choices
from picell.mesh.links import Links, announced_endpoints, seen_as
from picell.mesh.protocol import check_fresh, parse_envelope, retire
from picell.store import journal
from picell.store import links as link_table
from picell.store.links import Link, LinkState, Mirror


def _relay_mirror(body: wire.StateBody, link: Link, known: Collection[str]) -> dict[str, Any]:
    """Their relay offer and introductions (`mesh.relay`); `via_port` is kept: it is the word
    of the cell this link travels through, set by that cell's documents (`relay.via_ports`)."""
    return {
        "relay_offered": body.relay_offered,
        "introduced": relay.merge_introduced(
            link.mirror.introduced, body.introductions, time.time(), known
        ),
        "via_port": link.mirror.via_port,
    }


def _mirror(body: wire.StateBody, link: Link, known: Collection[str] = ()) -> Mirror:
    """Their document as we keep it: what they share with us (every address inside their
    network), their exit offer and use of ours, and their ends of the exit tunnels: the
    relay's (with an offer), the client's (with a request to use our exit)."""
    for i, svc in enumerate(body.shared_services):
        if svc.vip not in link.identity.vpn_subnet:
            field = f"body.shared_services[{i}].vip"
            raise BadInput(f"{field}: {svc.vip} is outside {link.identity.vpn_subnet}", field=field)
    relay, client = body.exit_relay, body.exit_client
    return Mirror(
        outbound=tuple(
            s.model_dump(mode="json", exclude_none=True)
            for s in sorted(body.shared_services, key=lambda s: s.name)
        ),
        exit_offered=body.exit_offered,
        exit_relay_active=body.use_as_exit_relay,
        exit_relay_key=relay.public_key if relay else None,
        exit_relay_port=relay.port if relay else None,
        exit_client_key=client.public_key if client else None,
        exit_client_port=client.port if client else None,
        seen_at=body.seen_at,
        devices=shares.published(link, body),
        **_relay_mirror(body, link, known),
        seq=body.seq,
        updated_at=time.time(),
        epoch=body.epoch or "",
        retired_epochs=retire(link, body.epoch or ""),
        next_key=link.mirror.next_key,
    )


def _counters_off(link: Link) -> Link:
    """The link without what every document moves and no kernel state comes from: their
    sequence number, epoch, arrival time and where they see us."""
    return replace(
        link,
        mirror=replace(
            link.mirror, seq=0, updated_at=None, seen_at=None, epoch="", retired_epochs=()
        ),  # fmt: skip
    )


class Sync(Choices):
    """The owner's choices (`Choices`) and the other cell's document, received here."""

    def __init__(self, links: Links, wake_sender: Callable[[], None] = lambda: None) -> None:
        super().__init__(links, wake_sender)
        # set by the daemon (`Sender.heard_from`): a cell we just heard from is reachable, so
        # what we backed off for it is due now
        self.heard_from: Callable[[str], None] = lambda _key: None

    # -- receiving their document --------------------------------------------------------------
    def receive_state(self, payload: Any, source: str | None) -> dict[str, Any]:
        """Mirror their document. The store changes here; the kernel follows in the coalesced
        converge (`Control.converge_soon`), so a burst of documents costs a few reconciles, and
        each document adds at most one journal row."""
        env = parse_envelope(payload, wire.StateBody)
        body = env.body
        with self.store.transaction() as conn:
            link, cell = self.links.authenticate(conn, env, source)
            restarted = check_fresh(body, link)  # authenticated: fresh; is it a new epoch?
            everyone = link_table.all_links(conn)
            mirror = _mirror(body, link, {ln.public_key for ln in everyone})
            seen = seen_as(cell, body.mapped_subnet, "body.mapped_subnet")
            mirror = replace(mirror, seen_as=seen)
            versions = tuple(body.versions or (body.v,))
            updated = replace(
                link, identity=replace(link.identity, versions=versions), mirror=mirror
            )
            events: list[str] = []
            if restarted and (link.mirror.epoch or link.mirror.seq):  # a row of its own
                journal.append(conn, link.name, f"cell {link.name} was restored from a backup",
                               f"cell {link.name}", "a new epoch: its sequence numbers start"
                               " over; its earlier messages stay refused")  # fmt: skip
            if link.orphan is not None:
                updated = replace(updated, orphan=None)
                events.append("no longer an orphan: they hold the link")
            updated = self._identity(link, updated, body.identity, events)
            if link.state == LinkState.WAITING:
                updated = replace(
                    updated,
                    state=link.state.to(LinkState.LINKED, link.name),
                    linked_at=time.time(),
                    sync=replace(updated.sync, last_push_error=None),
                )
                events.append("linked: confirmed by their signed state")
            if seen != link.mirror.seen_as:
                events.append(f"they present our network at {seen or cell.network}")
            if body.invite_proof is not None:
                self.links.spend_invite(conn, cell, link, body.invite_proof)
            before = {s["name"] for s in link.mirror.outbound}
            after = {s["name"] for s in mirror.outbound}
            events += [f"they shared {svc}" for svc in sorted(after - before)]
            events += [f"they unshared {svc}" for svc in sorted(before - after)]
            if updated.mirror.exit_offered != link.mirror.exit_offered:
                events.append(
                    "they offered their exit"
                    if updated.mirror.exit_offered
                    else "they withdrew their exit offer"
                )
            if updated.mirror.exit_relay_active != link.mirror.exit_relay_active:
                relaying = (
                    "relaying" if link.choices.exit_offered else "not relaying: we do not offer it"
                )
                events.append(
                    f"they use our exit ({relaying})"
                    if updated.mirror.exit_relay_active
                    else "they stopped using our exit"
                )
            if updated.mirror.relay_offered != link.mirror.relay_offered:
                events.append(
                    "they offered their relay"
                    if updated.mirror.relay_offered
                    else "they withdrew their relay"
                )
            if updated.mirror.devices != link.mirror.devices:
                events.append(f"they publish {len(updated.mirror.devices)} device(s)")
            ended = shares.end_unpublished(updated, events)
            tell = self._relay_answer(conn, updated, body, everyone, events)
            if ended is not updated:
                updated = ended
                tell.add(link.name)  # what we share with them changed: tell them
            if events:  # one summarised row per document, none for a heartbeat
                event = events[0].split(":")[0] if len(events) == 1 else "state changed"
                journal.append(conn, link.name, event, f"cell {link.name}", "; ".join(events))
            link_table.save(conn, updated)
            for name in sorted(tell):
                link_table.mark_pending(conn, name)
        flush = updated.identity.domain if before != after else None
        if flush is not None and self.control.reconciler is not None:
            # what they let us resolve changed on their side before they sent this: forget our
            # cached answers now, not after the coalesced converge (which flushes once more)
            self.control.reconciler.unbound.flush_zone(flush)
        self.heard_from(link.public_key)
        if tell or _counters_off(updated) != _counters_off(link):
            self.control.converge_soon(flush=flush)
        # else a heartbeat: only its counters moved, and nothing the kernel holds comes from
        # them; with 50 links, converging on each heartbeat kept a hub busy for ever
        if tell:
            self.wake_sender()
        return {"ok": True, "seq": body.seq}

    def _relay_answer(
        self,
        conn: Any,
        link: Link,
        body: wire.StateBody,
        everyone: list[Link],
        events: list[str],
    ) -> set[str]:
        """Introductions and the relay (`mesh.relay`), inside `receive_state`'s transaction:
        - the relay ports `link` gives our links through it become their `via_port` (their
          WireGuard endpoint follows in the converge);
        - what `link` asks of us: when it changed, `link` and the cells it names hear our
          answer at once (an introduction reaches both sides in the same round).
        Returns the links to push to (marked after their rows are saved)."""
        tell: set[str] = set()
        for moved in relay.via_ports(link, body.relay_ports, everyone):
            link_table.save(conn, moved)
            port = moved.mirror.via_port
            events.append(
                f"relaying {moved.name} on port {port}"
                if port is not None
                else f"no longer relaying {moved.name}"
            )
            if port is None:  # tell them at once what we want: their answer may restore it
                tell.add(link.name)
        changed = self.links.wanted.note(link.public_key, body.wanted)
        if changed and link.state == LinkState.LINKED:
            tell.add(link.name)
            tell |= {ln.name for ln in everyone
                     if ln.public_key in changed and ln.state == LinkState.LINKED}  # fmt: skip
        return tell

    @staticmethod
    def _identity(
        link: Link, updated: Link, ident: wire.DocIdentity | None, events: list[str]
    ) -> Link:
        """Endpoint and DNS address may change through the document; the network and the
        domain only by pairing again with a fresh invite (they pass the identity policy)."""
        if ident is None:
            return updated
        if ident.listen_port is not None and ident.listen_port != updated.identity.listen_port:
            updated = replace(
                updated, identity=replace(updated.identity, listen_port=ident.listen_port)
            )
        if ident.vpn_subnet is not None and ident.vpn_subnet != link.identity.vpn_subnet:
            raise BadInput(
                "body.identity.vpn_subnet: a cell changes its network by pairing again",
                field="body.identity.vpn_subnet",
            )
        if ident.domain is not None and ident.domain != link.identity.domain:
            raise BadInput(
                "body.identity.domain: a cell changes its domain by pairing again",
                field="body.identity.domain",
            )
        dns_ip = ident.dns_ip or link.identity.dns_ip
        if dns_ip not in link.identity.vpn_subnet:
            raise BadInput(
                "body.identity.dns_ip: outside the cell's network", field="body.identity.dns_ip"
            )
        endpoint = ident.endpoint or link.identity.endpoint
        # a document that names no endpoints keeps those we know, unless its endpoint moved
        if ident.endpoints is not None:
            endpoints = announced_endpoints(endpoint, ident.endpoints)
        elif endpoint == link.identity.endpoint:
            endpoints = link.identity.endpoints
        else:
            endpoints = ()
        old = (link.identity.endpoint, link.identity.endpoints, link.identity.dns_ip)
        if (endpoint, endpoints, dns_ip) == old:
            return updated
        shown = ", ".join(endpoints or (endpoint,))
        events.append(f"identity changed: endpoint {shown}, dns {dns_ip}")
        url = f"http://{dns_ip}:{link.identity.mesh_port}"
        moved = replace(
            updated.identity, endpoint=endpoint, endpoints=endpoints, dns_ip=dns_ip, api_url=url
        )
        return replace(updated, identity=moved)
