"""The owner's choices for a linked cell (DESIGN §7, §8): what we share with it, share by
share (`mesh.shares`), whether we publish our devices to it, our exit and relay offers.

Each choice is one `Control.change`: checked, journalled, saved, the link marked for a push and
the sender woken; a dated one wakes the expiry timer too (`mesh.expiry`). Must not read the
other cell's document (`mesh.sync` does) or touch the kernel (the change's converge does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import astuple, replace
from typing import Any, Literal

from picell import validate
from picell.errors import BadInput, Conflict, NotFound
from picell.mesh import shares
from picell.mesh.links import Links
from picell.store import journal
from picell.store import links as link_table
from picell.store.links import LinkState, Share


class Choices:
    def __init__(self, links: Links, wake_sender: Callable[[], None] = lambda: None) -> None:
        self.links = links
        self.control = links.control
        self.store = links.store
        self.wake_sender = wake_sender
        # set by the daemon (`Expiry.wake`): a dated share or offer changed, so the timer
        # looks again at what ends first
        self.expiry: Callable[[], None] = lambda: None

    def set_permissions(
        self, name: str, entries: Sequence[tuple[str, str, str | None]]
    ) -> dict[str, Any]:
        """The whole set of shares with `name` (service, device or "", end date or None, each):
        one change, however many."""
        self._known(name)  # before the entries' own 4xx (dates, a key listed twice)
        wanted = [
            shares.wanted_from([svc], device, until, f"services[{i}]")[0]
            for i, (svc, device, until) in enumerate(entries)
        ]
        keys = [(w.service, w.device) for w in wanted]
        if len(keys) != len(set(keys)):
            raise BadInput("services: a service is listed twice for one device", field="services")
        return self._shares(name, wanted, lambda _current: [Share(*astuple(w)) for w in wanted])

    def set_network_shares(self, name: str, services: list[str]) -> dict[str, Any]:
        """The services shared with `name`'s whole network (the web page's toggles): its
        device shares stay, and a share that stays keeps its date."""
        wanted = shares.wanted_from(services, "", None, "services")

        def new(current: tuple[Share, ...]) -> list[Share]:
            kept = {s.service: s for s in current if not s.device}
            return [*(s for s in current if s.device),
                    *(kept.get(w.service) or Share(w.service) for w in wanted)]  # fmt: skip

        return self._shares(name, wanted, new)

    def share(
        self, name: str, services: list[str], field: str = "service", device: str = "",
        until: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Add services to what `name` (or its published `device`) may use: one change,
        however many; an existing share of the same service and device takes the new date."""
        if until is not None:
            self._known(name)
        wanted = shares.wanted_from(services, device, until, field)
        added = [Share(*astuple(w)) for w in wanted]
        return self._shares(name, wanted, lambda current: [*current, *added])

    def unshare(self, name: str, service: str, device: str = "") -> dict[str, Any]:
        validate.name(service, "service")
        if device:
            validate.name(device, "device")

        def without(current: tuple[Share, ...]) -> list[Share]:
            if not any(s.key == (service, device) for s in current):
                whom = f"{name}'s device {device}" if device else name
                raise NotFound(f"service: {service} is not shared with {whom}", field="service")
            return [s for s in current if s.key != (service, device)]

        return self._shares(name, (), without)

    def _known(self, name: str) -> None:
        """404 for a missing cell, before a date of the request is read (a 4xx of its own)."""
        validate.name(name, "cell")
        with self.store.read() as conn:
            link_table.get(conn, name)

    def _shares(
        self,
        name: str,
        wanted: Sequence[shares.Wanted],
        new: Callable[[tuple[Share, ...]], list[Share]],
    ) -> dict[str, Any]:
        # `new` reads the current shares inside the change's transaction: concurrent shares of
        # different services to one cell (batched together) each add to what the last left
        validate.name(name, "cell")
        with self.control.change() as conn:
            link = link_table.get(conn, name)
            shares.check_wanted(conn, link, wanted)
            shares.change_shares(conn, link, new(link.choices.shares))
        self.wake_sender()
        self.expiry()
        return self.links.describe(name)

    def publish_devices(self, name: str, on: bool) -> dict[str, Any]:
        """Publish (or stop publishing) our devices' names and addresses to `name` in our
        documents: its owner may then share with one of them."""
        validate.name(name, "cell")
        with self.control.change() as conn:
            link = link_table.get(conn, name)
            if link.state == LinkState.UNLINKING:
                raise Conflict(f"cell: the link with {name} is ending", field="cell")
            if link.choices.publish_devices != on:
                choices = replace(link.choices, publish_devices=on)
                link_table.save(conn, replace(link, choices=choices))
                link_table.mark_pending(conn, name)
                event = "published our devices" if on else "stopped publishing our devices"
                journal.append(conn, name, event, "local owner")
        self.wake_sender()
        return self.links.describe(name)

    def set_exit_offer(self, name: str, offered: bool, until: str | None = None) -> dict[str, Any]:
        """Offer (or withdraw) our internet exit to a linked cell, for good or `until` a date
        (`mesh.expiry` withdraws it then); it learns at once. Relaying itself happens only
        once it also asks for it (`use_as_exit_relay`)."""
        if until is not None:
            self._known(name)
        if until is not None and not offered:
            raise BadInput("until: only an offer ends on a date", field="until")
        end = shares.parse_until(until) if until is not None else None
        events = ("offered our exit", "withdrew our exit offer")
        answer = self._set_offer(name, "exit_offered", offered, events, end)
        self.expiry()
        return answer

    def set_relay_offer(self, name: str, offered: bool) -> dict[str, Any]:
        """Offer (or withdraw) our relay to a linked cell (`mesh.relay`): we relay between it
        and each other linked cell we offer it to. Every cell we offer it to hears at once
        (its relay ports change); a withdrawal ends the relayed paths in this same converge
        (the reconciler deletes their conntrack entries)."""
        events = ("offered our relay", "withdrew our relay offer")
        return self._set_offer(name, "relay_offered", offered, events)

    def _set_offer(
        self,
        name: str,
        choice: Literal["exit_offered", "relay_offered"],
        offered: bool,
        events: tuple[str, str],
        until: float | None = None,
    ) -> dict[str, Any]:
        validate.name(name, "cell")
        with self.control.change() as conn:
            link = link_table.get(conn, name)
            if link.state == LinkState.UNLINKING:
                raise Conflict(f"cell: the link with {name} is ending", field="cell")
            if choice == "exit_offered" and link.choices.exit_until != until:
                link = replace(link, choices=replace(link.choices, exit_until=until))
                link_table.save(conn, link)
                if offered and link.choices.exit_offered:
                    detail = f"until {shares.shown_until(until)}" if until else "for good"
                    journal.append(conn, name, events[0], "local owner", detail)
            if getattr(link.choices, choice) != offered:
                if choice == "exit_offered":
                    choices = replace(link.choices, exit_offered=offered)
                else:
                    choices = replace(link.choices, relay_offered=offered)
                link_table.save(conn, replace(link, choices=choices))
                link_table.mark_pending(conn, name)
                if choice == "relay_offered":  # the pairs it relays with them change too
                    for other in link_table.all_links(conn):
                        if other.name != name and other.choices.relay_offered:
                            link_table.mark_pending(conn, other.name)
                detail = f"until {shares.shown_until(until)}" if offered and until else ""
                journal.append(conn, name, events[0] if offered else events[1], "local owner",
                               detail)  # fmt: skip
        self.wake_sender()
        return self.links.describe(name)

    def forget_service(self, conn: Any, service: str) -> None:
        """A removed service stops being shared (called inside the removal's transaction)."""
        for link in link_table.all_links(conn):
            if service in link.choices.services and link.state != LinkState.UNLINKING:
                kept = [s for s in link.choices.shares if s.service != service]
                shares.change_shares(conn, link, kept, why="the service was removed")
