"""The `links` table: one row per linked cell (the seed system's cell_links.json, plus state).

`state` is a `LinkState`: its transitions live in `LinkState.to` and nowhere else.

A `Link` is a name, a key, a state and four typed parts, each with one writer: `identity` (what
the other cell told us about itself), `choices` (our owner's), `mirror` (the other cell's state
document, as it told us) and `sync` (our bookkeeping of what we told it). The parts are an
in-memory shape only: the table keeps its flat columns, mapped in `_row` and `save`.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from picell.errors import Conflict, NotFound
from picell.mesh.mapping import translate
from picell.validate import printable


class LinkState(StrEnum):
    """- `waiting`: our side exists; the other cell has not confirmed it (its pairing port was
      unreachable). Its signed state document, or a pairing, confirms it.
    - `linked`: both sides hold the link.
    - `unlinking`: we disconnected; the peer stays, narrowed to the other cell's address, until
      our signed `unlink` reached it (then the row goes).
    """

    WAITING = "waiting"
    LINKED = "linked"
    UNLINKING = "unlinking"

    def to(self, new: LinkState, name: str) -> LinkState:
        """`new` if the link may move there from this state, else Conflict naming the cell."""
        if new not in _NEXT[self]:
            raise Conflict(f"cell: the link with {name} is {self.value}, not {new.value}",
                           field="cell")  # fmt: skip
        return new


_NEXT: dict[LinkState, frozenset[LinkState]] = {
    # an owner imports an invite again, or the other cell confirms
    LinkState.WAITING: frozenset({LinkState.WAITING, LinkState.LINKED}),
    # re-pairing keeps it linked; disconnecting starts the unlink
    LinkState.LINKED: frozenset({LinkState.LINKED, LinkState.UNLINKING}),
    # the owner links again before the unlink was delivered
    LinkState.UNLINKING: frozenset({LinkState.UNLINKING, LinkState.WAITING, LinkState.LINKED}),
}


@dataclass(frozen=True)
class LinkIdentity:
    """What the other cell told us about itself: its invite, its pairing answer, and the
    endpoint and DNS address its documents may update (the network and domain only change by
    pairing again)."""

    endpoint: str
    vpn_subnet: ipaddress.IPv4Network
    dns_ip: ipaddress.IPv4Address
    domain: str
    mesh_port: int = 3000
    api_url: str = ""
    # the protocol versions the other cell speaks (DESIGN §5), from its invite or document
    versions: tuple[int, ...] = (1,)
    # every endpoint it announced, best first (`endpoint` is the first); () for one
    endpoints: tuple[str, ...] = ()
    # its WireGuard listen port, as its documents say (a relay forwards to it); None: unknown
    listen_port: int | None = None
    # where we present its network (`mesh.mapping`: it overlaps ours, another link's or the
    # host's); None: as it is
    mapped: ipaddress.IPv4Network | None = None

    @property
    def network(self) -> ipaddress.IPv4Network:
        """Its network as this cell presents it: what the kernel holds (AllowedIPs, routes,
        grants, views) and what our devices reach."""
        return self.mapped or self.vpn_subnet

    @property
    def address(self) -> ipaddress.IPv4Address:
        """Its DNS and mesh API address as this cell reaches it."""
        return self.view(self.dns_ip)

    def view(self, address: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        """An address of its network (as it told us) as this cell presents it."""
        if self.mapped is None:
            return address
        return translate(address, self.vpn_subnet, self.mapped)

    @property
    def candidates(self) -> tuple[str, ...]:
        """The endpoints to try while the link is stale, in turn: `endpoint` first."""
        return tuple(dict.fromkeys((self.endpoint, *self.endpoints)))[:4]


@dataclass(frozen=True, order=True)
class Share:
    """One of our services opened to the linked cell: to its whole network (`device` ""), or
    to one device it publishes (`Mirror.devices`), until `until` (epoch seconds) or for good.
    A link holds at most one share per (service, device)."""

    service: str
    device: str = ""
    until: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.device)

    def to_json(self) -> str | dict[str, Any]:
        if not self.device and self.until is None:
            return self.service  # the form every earlier version wrote
        return {"service": self.service, "device": self.device, "until": self.until}

    @classmethod
    def from_json(cls, raw: Any) -> Share:
        if isinstance(raw, str):
            return cls(raw)
        return cls(str(raw["service"]), str(raw.get("device") or ""), raw.get("until"))


@dataclass(frozen=True)
class OwnerChoices:
    """Our owner's choices for this link, which our state document tells the other cell."""

    shares: tuple[Share, ...] = ()  # our services they may use (sorted, one per key)
    exit_offered: bool = False  # we offer them our internet exit
    exit_until: float | None = None  # when our exit offer ends by itself (None: never)
    publish_devices: bool = False  # our documents list our devices' names and addresses
    exit_relay_active: bool = False  # some of our devices leave through their exit
    relay_offered: bool = False  # we relay between them and our other links that we offer it to
    via: str | None = None  # the linked cell this link travels through (connect --via)

    @property
    def inbound(self) -> tuple[str, ...]:
        """The services shared with its whole network."""
        return tuple(sorted(s.service for s in self.shares if not s.device))

    @property
    def services(self) -> tuple[str, ...]:
        """Every service shared with it in some form (whole network or some devices)."""
        return tuple(sorted({s.service for s in self.shares}))

    def devices_of(self, service: str) -> tuple[str, ...]:
        """The devices `service` is shared with one by one ((): none, or the whole network)."""
        return tuple(sorted(s.device for s in self.shares if s.service == service and s.device))


@dataclass(frozen=True)
class Mirror:
    """The other cell's state document as it told us (DESIGN §7): never our own choice."""

    outbound: tuple[dict[str, Any], ...] = field(default=())  # what they share with us
    exit_offered: bool = False  # they offer us their exit
    exit_relay_active: bool = False  # they use our exit
    # their ends of the exit tunnels (DESIGN §8): the relay end (when they offer their exit)
    # and the client end (when they use ours)
    exit_relay_key: str | None = None
    exit_relay_port: int | None = None
    exit_client_key: str | None = None
    exit_client_port: int | None = None
    relay_offered: bool = False  # they would relay for us
    seen_at: str | None = None  # where they see us ("ip:port", as their WireGuard shows it)
    # the port at their side that relays us to the link `via` them (set while they relay)
    via_port: int | None = None
    # the last introduction they gave us for the link that travels through them, or for the
    # link they see a fresh handshake with: {"public_key", "endpoint", "at"} (JSON)
    introduced: str | None = None
    seq: int = 0  # the last seq of theirs applied (within `epoch`)
    updated_at: float | None = None  # when their last document arrived
    # their incarnation (`mesh.protocol.check_fresh`): "" until their first document with one;
    # `retired_epochs` are their earlier ones, newest last (messages from those are replays)
    epoch: str = ""
    retired_epochs: tuple[str, ...] = ()
    # the key they rotate to (`mesh.rekey`), proven by them, until the link moves to it
    next_key: str | None = None
    # where they present our network (their `mapped_subnet`); None: as it is
    seen_as: ipaddress.IPv4Network | None = None
    # the devices they publish (`publish-devices`): name -> address in their network as they
    # told it (never trusted beyond "this address is theirs"); () while they publish none
    devices: tuple[tuple[str, ipaddress.IPv4Address], ...] = ()

    def device(self, name: str) -> ipaddress.IPv4Address | None:
        return dict(self.devices).get(name)


@dataclass(frozen=True)
class SyncMarks:
    """Our bookkeeping of what we told the other cell."""

    pending_push: int = 0  # changes not yet pushed (a counter; 0: in sync)
    last_push_status: str | None = None
    last_push_at: float | None = None
    last_push_error: str | None = None
    seq: int = 0  # the last seq of ours used
    # our proof, for their document, that we imported their invite (see wire.StateBody)
    invite_proof: str | None = None
    # our key rotation (`mesh.rekey`): None, "pending" (not told yet) or "told"
    rekey_state: str | None = None


@dataclass(frozen=True)
class Link:
    name: str
    public_key: str
    identity: LinkIdentity
    state: LinkState = LinkState.WAITING
    choices: OwnerChoices = field(default_factory=OwnerChoices)
    mirror: Mirror = field(default_factory=Mirror)
    sync: SyncMarks = field(default_factory=SyncMarks)
    created_at: float = 0.0
    linked_at: float | None = None
    # why one side seems to hold this link and the other not (shown, never acted on): e.g.
    # after a restore; None when both hold it
    orphan: str | None = None

    def seen(
        self, address: ipaddress.IPv4Address, ours: ipaddress.IPv4Network
    ) -> ipaddress.IPv4Address:
        """Our `address` (of our network `ours`) as the other cell presents it."""
        if self.mirror.seen_as is None:
            return address
        return translate(address, ours, self.mirror.seen_as)


def _row(r: sqlite3.Row) -> Link:
    return Link(
        name=r["name"],
        public_key=r["public_key"],
        identity=LinkIdentity(
            endpoint=r["endpoint"],
            vpn_subnet=ipaddress.IPv4Network(r["vpn_subnet"]),
            dns_ip=ipaddress.IPv4Address(r["dns_ip"]),
            domain=r["domain"],
            mesh_port=r["mesh_port"],
            api_url=r["remote_api_url"],
            versions=tuple(json.loads(r["remote_versions"])),
            endpoints=tuple(json.loads(r["endpoints"])),
            listen_port=r["listen_port"],
            mapped=_net(r["mapped_subnet"]),
        ),
        state=LinkState(r["state"]),
        choices=OwnerChoices(
            shares=tuple(sorted(Share.from_json(x) for x in json.loads(r["inbound"]))),
            exit_offered=bool(r["exit_offered"]),
            exit_until=r["exit_until"],
            publish_devices=bool(r["publish_devices"]),
            exit_relay_active=bool(r["exit_relay_active"]),
            relay_offered=bool(r["relay_offered"]),
            via=r["via"],
        ),
        mirror=Mirror(
            outbound=tuple(json.loads(r["outbound"])),
            exit_offered=bool(r["remote_exit_offered"]),
            exit_relay_active=bool(r["remote_exit_relay_active"]),
            exit_relay_key=r["remote_exit_relay_key"],
            exit_relay_port=r["remote_exit_relay_port"],
            exit_client_key=r["remote_exit_client_key"],
            exit_client_port=r["remote_exit_client_port"],
            relay_offered=bool(r["remote_relay_offered"]),
            seen_at=r["remote_seen_at"],
            via_port=r["via_port"],
            introduced=r["introduced"],
            seq=r["remote_seq"],
            updated_at=r["last_remote_update_at"],
            epoch=r["remote_epoch"],
            retired_epochs=tuple(json.loads(r["retired_epochs"])),
            next_key=r["remote_next_key"],
            seen_as=_net(r["remote_mapped_subnet"]),
            devices=tuple(
                (n, ipaddress.IPv4Address(a)) for n, a in json.loads(r["remote_devices"])
            ),
        ),
        sync=SyncMarks(
            pending_push=r["pending_push"],
            last_push_status=r["last_push_status"],
            last_push_at=r["last_push_at"],
            last_push_error=r["last_push_error"],
            seq=r["local_seq"],
            invite_proof=r["invite_proof"],
            rekey_state=r["rekey_state"],
        ),
        created_at=r["created_at"],
        linked_at=r["linked_at"],
        orphan=r["orphan"],
    )


def _net(text: str | None) -> ipaddress.IPv4Network | None:
    return ipaddress.IPv4Network(text) if text else None


def all_links(conn: sqlite3.Connection) -> list[Link]:
    return [_row(r) for r in conn.execute("SELECT * FROM links ORDER BY name")]


def find(conn: sqlite3.Connection, name: str) -> Link | None:
    row = conn.execute("SELECT * FROM links WHERE name = ?", (name,)).fetchone()
    return _row(row) if row else None


def get(conn: sqlite3.Connection, name: str) -> Link:
    link = find(conn, name)
    if link is None:
        raise NotFound(f"no linked cell named {name!r}", field="cell")
    return link


def by_key(conn: sqlite3.Connection, public_key: str) -> Link | None:
    row = conn.execute("SELECT * FROM links WHERE public_key = ?", (public_key,)).fetchone()
    return _row(row) if row else None


def save(conn: sqlite3.Connection, link: Link) -> None:
    """Insert or replace the row of `link` (keyed by its public key)."""
    ident, ours, theirs, marks = link.identity, link.choices, link.mirror, link.sync
    conn.execute("DELETE FROM links WHERE public_key = ? OR name = ?", (link.public_key, link.name))
    conn.execute(
        """INSERT INTO links (name, public_key, endpoint, vpn_subnet, dns_ip, domain, mesh_port,
               remote_api_url, state, inbound, outbound, exit_offered, remote_exit_offered,
               exit_relay_active, remote_exit_relay_active, pending_push, last_push_status,
               last_push_at, last_push_error, last_remote_update_at, local_seq, remote_seq,
               created_at, linked_at, remote_exit_relay_key, remote_exit_relay_port,
               remote_exit_client_key, remote_exit_client_port, remote_versions, invite_proof,
               endpoints, remote_seen_at, relay_offered, remote_relay_offered, via, via_port,
               introduced, listen_port, remote_epoch, retired_epochs, orphan,
               remote_next_key, rekey_state, mapped_subnet, remote_mapped_subnet, exit_until,
               publish_devices, remote_devices)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                   ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            link.name,
            link.public_key,
            ident.endpoint,
            str(ident.vpn_subnet),
            str(ident.dns_ip),
            ident.domain,
            ident.mesh_port,
            ident.api_url,
            link.state.value,
            json.dumps([sh.to_json() for sh in sorted(ours.shares)]),
            json.dumps(list(theirs.outbound)),
            int(ours.exit_offered),
            int(theirs.exit_offered),
            int(ours.exit_relay_active),
            int(theirs.exit_relay_active),
            marks.pending_push,
            marks.last_push_status,
            marks.last_push_at,
            marks.last_push_error,
            theirs.updated_at,
            marks.seq,
            theirs.seq,
            link.created_at or time.time(),
            link.linked_at,
            theirs.exit_relay_key,
            theirs.exit_relay_port,
            theirs.exit_client_key,
            theirs.exit_client_port,
            json.dumps(list(ident.versions)),
            marks.invite_proof,
            json.dumps(list(ident.endpoints)),
            theirs.seen_at,
            int(ours.relay_offered),
            int(theirs.relay_offered),
            ours.via,
            theirs.via_port,
            theirs.introduced,
            ident.listen_port,
            theirs.epoch,
            json.dumps(list(theirs.retired_epochs)),
            link.orphan,
            theirs.next_key,
            marks.rekey_state,
            str(ident.mapped) if ident.mapped else None,
            str(theirs.seen_as) if theirs.seen_as else None,
            ours.exit_until,
            int(ours.publish_devices),
            json.dumps([[n, str(a)] for n, a in theirs.devices]),
        ),
    )


def set_orphan(conn: sqlite3.Connection, name: str, reason: str | None) -> bool:
    """Record (or clear, with None) why a link seems held on one side only; True if changed."""
    cur = conn.execute(
        "UPDATE links SET orphan = ? WHERE name = ? AND orphan IS NOT ?", (reason, name, reason)
    )
    return cur.rowcount > 0


def delete(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM links WHERE name = ?", (name,))


def mark_pending(conn: sqlite3.Connection, name: str) -> None:
    """A change to push: `pending_push` counts changes, so a push clears only what it carried."""
    conn.execute("UPDATE links SET pending_push = pending_push + 1 WHERE name = ?", (name,))


def mark_publishing(conn: sqlite3.Connection) -> bool:
    """Mark every link we publish our devices to (a device came or went); True if any."""
    cur = conn.execute(
        "UPDATE links SET pending_push = pending_push + 1"
        " WHERE publish_devices = 1 AND state != 'unlinking'"
    )
    return cur.rowcount > 0


def pending_generation(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT pending_push FROM links WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def push_done(conn: sqlite3.Connection, name: str, generation: int, at: float) -> None:
    """A document was accepted: its invite proof (if any) has been delivered, so the next
    documents, heartbeats included, no longer carry it (nor make the other cell check it)."""
    conn.execute(
        "UPDATE links SET last_push_status = 'ok', last_push_at = ?, last_push_error = NULL,"
        " invite_proof = NULL,"
        " pending_push = CASE WHEN pending_push = ? THEN 0 ELSE pending_push END WHERE name = ?",
        (at, generation, name),
    )


def count_waiting(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM links WHERE state = 'waiting'").fetchone()[0])


def confirm(conn: sqlite3.Connection, name: str, at: float) -> bool:
    """A `waiting` link becomes `linked` (the other cell accepted our signed document, or sent
    us one); True when it changed."""
    cur = conn.execute(
        "UPDATE links SET state = 'linked', linked_at = ? WHERE name = ? AND state = 'waiting'",
        (at, name),
    )
    return cur.rowcount > 0


def push_failed(conn: sqlite3.Connection, name: str, error: str) -> None:
    # the error may quote the other cell's answer: one printable line, for the terminal
    error = printable(error, 500)
    conn.execute(
        "UPDATE links SET last_push_status = 'error', last_push_error = ?,"
        " pending_push = MAX(pending_push, 1) WHERE name = ?",
        (error[:500], name),
    )
