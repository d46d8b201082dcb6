"""Dated shares and exit offers end on their date, by a timer of their own (overlap issue).

`Expiry` sleeps until the earliest end date in the store (a share's `until`, an exit offer's
`exit_until`), then ends everything due in one change: the shares leave the store, the exit
offers are withdrawn, each link is marked for a push and its journal says what expired. The
change converges at once (`Control.change`), so the grant leaves the nft set and its
established flows are cut (`Reconciler`) within the timer's slack of the date, not at the next
30 s reconcile. A change to a date wakes it (`wake`), so a new, earlier date is seen at once.
Dates that passed while the daemon was stopped end on its first round.

Must not: end anything before its date, or touch the kernel itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from picell.control import Control
from picell.mesh import shares
from picell.store import journal
from picell.store import links as link_table
from picell.store.links import Link, LinkState
from picell.worker import Worker

log = logging.getLogger(__name__)

IDLE_S = 3600.0  # with nothing dated, look again this often (a wake comes first)


def next_end(links: list[Link]) -> float | None:
    """The earliest end date among the live links' shares and exit offers."""
    ends = [
        at
        for ln in links
        if ln.state != LinkState.UNLINKING
        for at in (
            *(s.until for s in ln.choices.shares),
            ln.choices.exit_until if ln.choices.exit_offered else None,
        )
        if at is not None
    ]
    return min(ends, default=None)


def end_due(link: Link, now: float, events: list[str]) -> Link:
    """`link` without what ended by `now`; `events` says what."""
    due = [s for s in link.choices.shares if s.until is not None and s.until <= now]
    choices = link.choices
    if due:
        choices = replace(choices, shares=tuple(s for s in choices.shares if s not in due))
        events += [f"share of {shares.describe(s)} expired" for s in due]
    end = choices.exit_until
    if end is not None and end <= now:
        choices = replace(choices, exit_until=None)
        if choices.exit_offered:
            choices = replace(choices, exit_offered=False)
            events.append(f"exit offer until {shares.shown_until(end)} expired")
    return replace(link, choices=choices)


class Expiry(Worker):
    thread_name = "expiry"

    def __init__(
        self,
        control: Control,
        wake_sender: Callable[[], None],
        clock: Callable[[], float] = time.time,
        on_expired: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.control = control
        self.on_expired = on_expired  # the daemon's metrics count them
        self.store = control.store
        self.wake_sender = wake_sender
        self.clock = clock
        self.expired = 0  # shares and offers ended so far (metrics, tests)
        super().__init__()

    def run_once(self) -> float | None:
        """End what is due now, in one change; the next end date (None: nothing dated)."""
        now = self.clock()
        with self.store.read() as conn:
            due = [ln.name for ln in link_table.all_links(conn)
                   if ln.state != LinkState.UNLINKING and end_due(ln, now, []) != ln]  # fmt: skip
        if due:
            with self.control.change() as conn:
                for name in due:
                    link = link_table.find(conn, name)
                    if link is None or link.state == LinkState.UNLINKING:
                        continue
                    events: list[str] = []
                    ended = end_due(link, now, events)
                    if not events and ended == link:
                        continue
                    link_table.save(conn, ended)
                    link_table.mark_pending(conn, name)
                    for event in events:
                        journal.append(conn, name, event, "timer")
                    self.expired += len(events)
                    self.on_expired(len(events))
                    log.info("%s: %s", name, "; ".join(events))
            self.wake_sender()
        with self.store.read() as conn:
            return next_end(link_table.all_links(conn))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                end = self.run_once()
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("expiry round failed")
                end = self.clock() + 5.0
            wait = IDLE_S if end is None else max(0.0, end - self.clock())
            # a little past the date: a share ends at its date, not a hair before
            self._wake.wait(min(wait + 0.05, IDLE_S))
