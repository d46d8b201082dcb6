"""What we share with a linked cell, share by share (DESIGN §7; overlap issue, part 2).

A share opens one of our services to the linked cell's whole network, or to one device the
cell publishes (`Mirror.devices`), for good or until a date. The owner's changes arrive here
(checked by `check_wanted`, applied by `change_shares`); the devices a linked cell publishes
arrive with its state document (`published`), and the device shares end when it stops
publishing (`end_unpublished`). A device share grants the device's /32 as we present it
(`share_network`), so it follows the device when its cell lists it at another address.

Must not: touch the kernel (the reconciler turns shares into grants, `state.build_state`), or
end a dated share (`mesh.expiry` does, by a timer of its own).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from picell import validate
from picell.errors import BadInput, Conflict, NotFound
from picell.mesh import wire
from picell.store import journal
from picell.store import links as link_table
from picell.store import services as service_table
from picell.store.links import Link, LinkState, Share

# ISO 8601 as the CLI documents it: date, T, hours and minutes, seconds allowed, an offset
# allowed (local time without one)
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?")


def parse_until(text: str, field: str = "until", now: float | None = None) -> float:
    """`2026-12-24T18:00` (local time), `2026-12-24T18:00:30+01:00`: epoch seconds, in the
    future, or BadInput naming `field`."""
    if not _ISO.fullmatch(text):
        raise BadInput(
            f"{field}: {validate.printable(text, 40)!r} is not an ISO 8601 date and time "
            "(2026-12-24T18:00, seconds and an offset allowed)",
            field=field,
        )
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadInput(f"{field}: {exc}", field=field) from None
    if at.tzinfo is None:
        at = at.astimezone()  # the cell's local time
    until = at.timestamp()
    if until <= (time.time() if now is None else now):
        raise BadInput(f"{field}: {text} is in the past", field=field)
    return until


def shown_until(until: float | None) -> str | None:
    """An end date as the owner reads it (local time, with its offset)."""
    if until is None:
        return None
    return dt.datetime.fromtimestamp(until).astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True)
class Wanted:
    """One share as an owner asks for it (`until` already parsed)."""

    service: str
    device: str = ""
    until: float | None = None


def describe(share: Share) -> str:
    """ "wiki", "wiki with phone", "wiki until 2026-12-24T18:00:00+00:00": the journal's words."""
    text = share.service + (f" with {share.device}" if share.device else "")
    return text + (f" until {shown_until(share.until)}" if share.until is not None else "")


def check_wanted(conn: sqlite3.Connection, link: Link, wanted: Iterable[Wanted]) -> None:
    """Every service exists; every device is one the cell publishes (refused while it
    publishes none)."""
    known = {s.name for s in service_table.all_services(conn)}
    for w in wanted:
        if w.service not in known:
            raise NotFound(f"services: no service named {w.service!r}", field="services")
        if not w.device:
            continue
        if not link.mirror.devices:
            raise Conflict(
                f"device: {link.name} publishes no devices (its owner runs "
                f"`picell cells publish-devices <our cell> on`)",
                field="device",
            )
        if link.mirror.device(w.device) is None:
            raise NotFound(
                f"device: {link.name} publishes no device named {w.device!r}", field="device"
            )


def change_shares(
    conn: sqlite3.Connection,
    link: Link,
    shares: Iterable[Share],
    actor: str = "local owner",
    why: str = "",
) -> Link:
    """`link` with `shares` as its whole set (one per key), journalled and marked for a push
    when it changed; the row is saved here."""
    if link.state == LinkState.UNLINKING:
        raise Conflict(f"cell: the link with {link.name} is ending", field="cell")
    by_key = {s.key: s for s in shares}
    new = tuple(sorted(by_key.values()))
    old = {s.key: s for s in link.choices.shares}
    for key in sorted(by_key.keys() - old.keys()):
        journal.append(conn, link.name, _event("shared", by_key[key]), actor,
                       _until_detail(by_key[key]))  # fmt: skip
    for key in sorted(old.keys() - by_key.keys()):
        journal.append(conn, link.name, _event("unshared", old[key]), actor, why)
    for key in sorted(old.keys() & by_key.keys()):
        if old[key].until != by_key[key].until:
            journal.append(conn, link.name, _event("shared", by_key[key]), actor,
                           _until_detail(by_key[key]))  # fmt: skip
    if new == link.choices.shares:
        return link
    link = replace(link, choices=replace(link.choices, shares=new))
    link_table.save(conn, link)
    link_table.mark_pending(conn, link.name)
    return link


def _event(verb: str, share: Share) -> str:
    # "shared wiki" stays the whole-network event (`mesh.explain` dates a grant by it)
    if not share.device:
        return f"{verb} {share.service}"
    return f"{verb} {share.service} {'with' if verb == 'shared' else 'from'} {share.device}"


def _until_detail(share: Share) -> str:
    return f"until {shown_until(share.until)}" if share.until is not None else ""


def wanted_from(services: Iterable[str], device: str, until: str | None, field: str,
                now: float | None = None) -> list[Wanted]:  # fmt: skip
    """Validated owner input: service names, an optional device name and end date. For one
    entry of a list, `field` is its path (`services[2]`): the fields named are inside it."""
    inside = field.endswith("]")
    dev = validate.name(device, f"{field}.device" if inside else "device") if device else ""
    where = f"{field}.until" if inside else "until"
    end = parse_until(until, where, now) if until is not None else None
    return [Wanted(validate.name(s, f"{field}.service" if inside else field), dev, end)
            for s in services]  # fmt: skip


def published(link: Link, body: wire.StateBody) -> tuple[tuple[str, ipaddress.IPv4Address], ...]:
    """The devices their document publishes, each inside the network they told us (the
    model already checked names and addresses are unique)."""
    out = []
    for i, dev in enumerate(body.devices or ()):
        if dev.address not in link.identity.vpn_subnet or dev.address in (
            link.identity.vpn_subnet.network_address,
            link.identity.vpn_subnet.broadcast_address,
        ):
            field = f"body.devices[{i}].address"
            raise BadInput(f"{field}: {dev.address} is not a host of {link.identity.vpn_subnet}",
                           field=field)  # fmt: skip
        out.append((dev.name, dev.address))
    return tuple(sorted(out))


def end_unpublished(link: Link, events: list[str]) -> Link:
    """The device shares end when `link` stops publishing devices (its mirror is already the
    new one); `events` says which. A device it merely no longer lists keeps its share, with
    no grant, until a device of that name is listed again (the cell re-created it)."""
    if link.mirror.devices:
        return link
    gone = [s for s in link.choices.shares if s.device]
    if not gone:
        return link
    events += [f"share of {describe(s)} ended: {link.name} no longer publishes its devices"
               for s in gone]  # fmt: skip
    kept = tuple(s for s in link.choices.shares if not s.device)
    return replace(link, choices=replace(link.choices, shares=kept))


def share_network(link: Link, share: Share) -> ipaddress.IPv4Network | None:
    """The network `share`'s own grant opens, as this cell presents it: the link's network
    for a whole-network share, the device's /32 for a device share; None for a device share
    that the whole network's share of the same service covers, or a device not listed now."""
    if not share.device:
        return link.identity.network
    address = link.mirror.device(share.device)
    if address is None or share.service in link.choices.inbound:
        return None
    return ipaddress.IPv4Network(link.identity.view(address))
