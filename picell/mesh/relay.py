"""Introductions and the relay through a mutually linked cell (issue 12, items 6 and 7): pure.

Cells A, B, C; B is linked with both, A and C want a link with each other.

- **Wanted.** A's state document to B lists, in `wanted`, the public keys of A's links that B
  may help with: links waiting or stale (no handshake for `LINK_STALE_S`) and links whose
  `choices.via` names B. Only a linked B hears them (`wanted_keys`).
- **Introductions.** B answers A with `introductions`: for each key asked for that B is linked
  with and sees with a fresh handshake, where B's WireGuard sees that cell (`seen_at`). B tells
  C about A in the same round (both cells asked for by either side), so both set the other's
  address at once and keep it open with keepalives: a hole punch introduced by a friend. A
  keeps the introductions in `Mirror.introduced` of its link with B (a JSON list of
  `{public_key, endpoint, at}`), and `peer_candidates` tries them before the declared endpoints.
- **The relay.** B's owner offers its relay per linked cell (`OwnerChoices.relay_offered`); a
  pair (A, C) is relayed while B offers it to both. Each pair gets one UDP port at B's VPN
  address (`relay_port_map`: derived from both keys, stable). B answers a `wanted` key with
  `relay_ports`; A sets it as `via_port` on its link with C, whose WireGuard endpoint becomes
  `B_dns_ip:port`: WireGuard inside the A–B and B–C links, so B sees only ciphertext. B's
  firewall DNATs exactly that (`RelayRule`: source cell, port) to the other cell's WireGuard port
  and SNATs it to B's address; the receiving cell accepts WireGuard over its tunnel only from a
  cell that offers it the relay (`RelayState.sources`).

B learns what its linked cells want from their documents and keeps it in memory (`Wanted`):
every document carries the whole list again, so a restart loses nothing for long.

Must not: read the store or the system (callers pass the links, the observation and the time),
or accept a key, endpoint or port that did not come through `picell.mesh.wire`'s models.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from picell import validate
from picell.constants import (
    DNS_PORT,
    EXIT_MAX_SLOTS,
    LINK_STALE_S,
    RELAY_PORT_BASE,
    RELAY_PORT_SPAN,
)
from picell.errors import Conflict
from picell.mesh.wire import WANTED_MAX, Introduction, RelayPort
from picell.store.links import Link, LinkState

# a cell's sightings of its peers, from `wg show dump`: public key -> (latest handshake, endpoint)
Seen = Mapping[str, tuple[int, str | None]]


@dataclass(frozen=True, order=True)
class RelayRule:
    """At the relaying cell: UDP from `source` to our VPN address's `port` goes on to
    `target:target_port` (the other cell's WireGuard), with our address as its source."""

    source: ipaddress.IPv4Address
    port: int
    target: ipaddress.IPv4Address
    target_port: int
    label: str  # "alpha -> gamma", for the rule's comment
    # translation (`mesh.mapping`): where the source cell presents our network (it sends to our
    # address there) and where the target cell does (we send from our address there)
    arrives: ipaddress.IPv4Network | None = None
    leaves: ipaddress.IPv4Network | None = None


@dataclass(frozen=True)
class RelayState:
    """What the firewall renders for introductions' sibling, the relay: the rules we relay
    with, and the linked cells whose address may bring WireGuard to our own port (they offer
    us their relay)."""

    rules: tuple[RelayRule, ...] = ()
    sources: tuple[ipaddress.IPv4Address, ...] = ()


def seen_from_peers(peers: Mapping[str, Any]) -> dict[str, tuple[int, str | None]]:
    """`Seen` from `wireguard.apply.ObservedWg.peers`."""
    return {k: (p.latest_handshake, p.endpoint) for k, p in peers.items()}


def fresh(key: str, seen: Seen, now: float) -> bool:
    handshake = seen.get(key, (0, None))[0]
    return bool(handshake) and now - handshake < LINK_STALE_S


# -- what we ask a linked cell for ---------------------------------------------------------------
def wanted_keys(to: Link, links: Sequence[Link], seen: Seen, now: float) -> list[str]:
    """The keys of our links that `to` may introduce or relay: waiting or stale ones (not
    travelling through another cell), and those travelling through `to`. Nothing to a cell
    that is not linked: our links are ours to reveal only to a cell that confirmed."""
    if to.state != LinkState.LINKED:
        return []
    keys = [
        ln.public_key
        for ln in links
        if ln.public_key != to.public_key
        and ln.state != LinkState.UNLINKING
        and (
            ln.choices.via == to.name
            or (
                ln.choices.via is None
                and (ln.state == LinkState.WAITING or not fresh(ln.public_key, seen, now))
            )
        )
    ]
    return sorted(keys)[:WANTED_MAX]


class Wanted:
    """What each linked cell asked us for in its last document (public key -> keys). Memory
    only: every document of theirs carries the whole list again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by: dict[str, frozenset[str]] = {}

    def note(self, asker: str, keys: Iterable[str]) -> frozenset[str]:
        """Record `asker`'s list; returns the keys that changed (added or dropped)."""
        new = frozenset(keys) - {asker}
        with self._lock:
            old = self._by.get(asker, frozenset())
            if new:
                self._by[asker] = new
            else:
                self._by.pop(asker, None)
        return old ^ new

    def snapshot(self) -> dict[str, frozenset[str]]:
        with self._lock:
            return dict(self._by)


def _asked(to: Link, wants: Mapping[str, frozenset[str]]) -> set[str]:
    """The keys that `to` asked us about, and the keys of cells that asked us about `to`:
    an introduction goes both ways at once."""
    return set(wants.get(to.public_key, ())) | {k for k, ks in wants.items() if to.public_key in ks}


# -- what we answer ------------------------------------------------------------------------------
def introductions(
    to: Link, links: Sequence[Link], wants: Mapping[str, frozenset[str]], seen: Seen, now: float
) -> list[dict[str, str]]:
    """Where we see each cell asked about (by `to`, or asking about `to`), when we are linked
    with it and see it with a fresh handshake."""
    if to.state != LinkState.LINKED:
        return []
    linked = {ln.public_key for ln in links if ln.state == LinkState.LINKED}
    out = []
    for key in sorted(_asked(to, wants) & linked - {to.public_key}):
        endpoint = seen.get(key, (0, None))[1]
        if endpoint and fresh(key, seen, now):
            out.append({"public_key": key, "seen_at": endpoint})
    return out[:WANTED_MAX]


def _pair_hash(pair: tuple[str, str]) -> int:
    return int.from_bytes(hashlib.sha256(("relay " + " ".join(pair)).encode()).digest()[:4])


def reserved_ports(listen_port: int, mesh_port: int, pair_port: int) -> set[int]:
    """Ports of our own address a relay port must never shadow."""
    return {listen_port, mesh_port, pair_port, DNS_PORT,
            *range(listen_port + 1, listen_port + 2 + EXIT_MAX_SLOTS)}  # fmt: skip


def relay_pairs(links: Sequence[Link]) -> list[tuple[Link, Link]]:
    """Every pair of linked cells we offer our relay to (both offers: both consented)."""
    offered = sorted(
        (ln for ln in links if ln.state == LinkState.LINKED and ln.choices.relay_offered),
        key=lambda ln: ln.public_key,
    )
    return [(a, b) for i, a in enumerate(offered) for b in offered[i + 1 :]]


def relay_port_map(links: Sequence[Link], reserved: set[int]) -> dict[tuple[str, str], int]:
    """One port per relayed pair (keys sorted), derived from both keys: the same pair keeps its
    port across restarts; a collision moves the later pair (in hash order) up by one."""
    pairs = [(a.public_key, b.public_key) for a, b in relay_pairs(links)]
    used = set(reserved)
    out: dict[tuple[str, str], int] = {}
    for pair in sorted(pairs, key=lambda p: (_pair_hash(p), p)):
        offset = _pair_hash(pair) % RELAY_PORT_SPAN
        for step in range(RELAY_PORT_SPAN):
            port = RELAY_PORT_BASE + (offset + step) % RELAY_PORT_SPAN
            if port not in used:
                used.add(port)
                out[pair] = port
                break
    return out


def relay_ports(
    to: Link,
    links: Sequence[Link],
    wants: Mapping[str, frozenset[str]],
    reserved: set[int],
) -> list[dict[str, Any]]:
    """The ports we relay `to` with, for the cells asked about (either way)."""
    if to.state != LinkState.LINKED or not to.choices.relay_offered:
        return []
    ports = relay_port_map(links, reserved)
    out = []
    for key in sorted(_asked(to, wants) - {to.public_key}):
        port = ports.get((min(to.public_key, key), max(to.public_key, key)))
        if port is not None:
            out.append({"public_key": key, "port": port})
    return out[:WANTED_MAX]


def relay_fields(
    to: Link,
    links: Sequence[Link],
    wants: Mapping[str, frozenset[str]],
    seen: Seen,
    now: float,
    reserved: set[int],
) -> dict[str, Any]:
    """This module's part of our state document to `to` (`mesh.document.document`)."""
    return {
        "relay_offered": to.choices.relay_offered,
        "wanted": wanted_keys(to, links, seen, now),
        "introductions": introductions(to, links, wants, seen, now),
        "relay_ports": relay_ports(to, links, wants, reserved),
    }


def relay_state(links: Sequence[Link], reserved: set[int]) -> RelayState:
    """The relay's firewall data (`State.relay`): both directions of every relayed pair, to the
    other cell's WireGuard listen port (as its documents say; before its first document, the
    port of its endpoint), and who may bring us WireGuard through its tunnel."""
    ports = relay_port_map(links, reserved)
    rules = []
    for a, b in relay_pairs(links):
        port = ports.get((a.public_key, b.public_key))
        if port is None:  # more pairs than ports: the rest are not relayed
            continue
        for src, dst in ((a, b), (b, a)):
            rules.append(
                RelayRule(
                    src.identity.address,
                    port,
                    dst.identity.address,
                    dst.identity.listen_port or validate.endpoint(dst.identity.endpoint).port,
                    f"{src.name} -> {dst.name}",
                    src.mirror.seen_as,
                    dst.mirror.seen_as,
                )
            )
    sources = sorted(
        {
            ln.identity.address
            for ln in links
            if ln.state == LinkState.LINKED and ln.mirror.relay_offered
        }  # fmt: skip
    )
    return RelayState(tuple(sorted(rules)), tuple(sources))


# -- what we keep of their answer ----------------------------------------------------------------
def merge_introduced(
    kept: str | None, new: Sequence[Introduction], now: float, known: Collection[str]
) -> str | None:
    """`Mirror.introduced`: the latest introduction per key (a new one replaces, an absent one
    stays: a link that works through an introduction stops asking for it), for keys we still
    have a link with."""
    entries: dict[str, dict[str, Any]] = {e["public_key"]: e for e in parse_introduced(kept)}
    for intro in new:
        entries[intro.public_key] = {"public_key": intro.public_key, "endpoint": intro.seen_at,
                                     "at": now}  # fmt: skip
    keep = [e for k, e in sorted(entries.items()) if k in known][:WANTED_MAX]
    return json.dumps(keep, sort_keys=True) if keep else None


def parse_introduced(text: str | None) -> list[dict[str, Any]]:
    """Our own JSON as stored; an object (one introduction) is read as a list of one."""
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    items = data if isinstance(data, list) else [data]
    return [
        e for e in items
        if isinstance(e, dict) and isinstance(e.get("public_key"), str)
        and isinstance(e.get("endpoint"), str)
    ]  # fmt: skip


def via_ports(via: Link, body_ports: Sequence[RelayPort], links: Sequence[Link]) -> list[Link]:
    """The links travelling through `via` whose relay port its document changed (set, moved, or
    gone: its offer to us or to the other cell was withdrawn)."""
    ports = {rp.public_key: rp.port for rp in body_ports}
    out = []
    for ln in links:
        if ln.choices.via != via.name or ln.public_key == via.public_key:
            continue
        port = ports.get(ln.public_key)
        if port != ln.mirror.via_port:
            out.append(replace(ln, mirror=replace(ln.mirror, via_port=port)))
    return out


def check_via(links: Sequence[Link], via: str, invite_key: str) -> Link:
    """The linked cell a new link travels through: linked, offering us its relay, not the
    invite's own cell; else 409 naming it (field `via`)."""
    link = next((ln for ln in links if ln.name == via), None)
    if link is None or link.state != LinkState.LINKED:
        raise Conflict(f"via: no linked cell named {via}", field="via")
    if link.public_key == invite_key:
        raise Conflict(f"via: cell {via} is the one this invite links us with", field="via")
    if not link.mirror.relay_offered:
        raise Conflict(f"via: cell {via} does not offer us its relay", field="via")
    return link


# -- where our peer goes, and what the owner sees ------------------------------------------------
def introduced(link: Link, links: Sequence[Link]) -> list[tuple[str, str]]:
    """(endpoint, by whom) for `link`, from our other linked cells' introductions, newest first."""
    found = []
    for other in links:
        if other.public_key == link.public_key or other.state != LinkState.LINKED:
            continue
        for e in parse_introduced(other.mirror.introduced):
            if e["public_key"] == link.public_key:
                found.append((float(e.get("at") or 0), e["endpoint"], other.name))
    return [(ep, by) for _, ep, by in sorted(found, reverse=True)]


def relay_endpoint(link: Link, links: Sequence[Link]) -> str | None:
    """`via_dns_ip:via_port` while the cell we travel through relays this link, else None."""
    via = next((ln for ln in links if ln.name == link.choices.via), None)
    if via is None or via.state != LinkState.LINKED or link.mirror.via_port is None:
        return None
    return f"{via.identity.address}:{link.mirror.via_port}"


def peer_candidates(link: Link, links: Sequence[Link]) -> tuple[str, ...]:
    """The endpoints our WireGuard peer for `link` tries while the link is stale, in turn (the
    reconciler rotates them): for a link `via` a cell, its relay alone (none while it does not
    relay: the link waits); else the introductions, newest first, then the endpoints the cell
    declared."""
    if link.choices.via is not None:
        relayed = relay_endpoint(link, links)
        return (relayed,) if relayed else ()
    intro = tuple(ep for ep, _ in introduced(link, links))
    return tuple(dict.fromkeys((*intro, *link.identity.candidates)))


def path_of(link: Link, links: Sequence[Link], observed_endpoint: str | None) -> dict[str, Any]:
    """`via` (the relay cell or None), `path` ("direct", "introduced by B", "via B") and
    `relay_note` (why a relayed link waits, or None) for `picell cells`."""
    via = link.choices.via
    if via is not None:
        cell = next((ln for ln in links if ln.name == via), None)
        note = None
        if cell is None or cell.state != LinkState.LINKED:
            note = f"{via} is not linked: the relayed path is down"
        elif not cell.mirror.relay_offered:
            note = f"{via} no longer offers us its relay: the relayed path is down"
        elif link.mirror.via_port is None:
            note = f"{via} relays no port for this link (its offer to {link.name} is missing)"
        return {"via": via, "path": f"via {via}", "relay_note": note}
    by = next((b for ep, b in introduced(link, links) if ep == observed_endpoint), None)
    return {"via": None, "path": f"introduced by {by}" if by else "direct", "relay_note": None}
