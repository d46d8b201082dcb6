"""The sender: everything this cell tells linked cells, through the tunnel, from our address.

- Link state: a link whose state changed (`pending_push`) is pushed at once, bursts coalescing
  into one document (`COALESCE_S`); every linked cell is pushed again each `HEARTBEAT_S` as a
  heartbeat and safety net; a failed push is retried with backoff capped at
  `OUTBOX_MAX_BACKOFF_S`. A cell that was offline therefore converges within one heartbeat.
- The outbox: queued one-off messages (`unlink`). One that reached the other cell (or that it no
  longer needs: 404) completes our side's removal; an `unlink` undelivered for
  `UNLINK_GIVE_UP_S` is dropped with our side.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from picell.constants import COALESCE_S, HEARTBEAT_S, OUTBOX_MAX_BACKOFF_S, UNLINK_GIVE_UP_S
from picell.errors import PicellError
from picell.mesh import client
from picell.mesh.document import document
from picell.mesh.links import Links
from picell.mesh.protocol import envelope_from
from picell.store import cell as cell_table
from picell.store import exits as exit_table
from picell.store import links as link_table
from picell.store import outbox
from picell.store import services as service_table
from picell.store.links import Link
from picell.store.outbox import Message

log = logging.getLogger(__name__)


@dataclass
class Retry:
    attempts: int = 0
    at: float = 0.0


class Sender:
    def __init__(self, links: Links) -> None:
        self.links = links
        self.store = links.store
        self.pushes = 0  # documents sent (benchmarks read it)
        self._retry: dict[str, Retry] = {}
        # links told our state since this daemon started: at start every link is told at once,
        # since our identity (endpoint, domain) may have changed while we were stopped
        self._told: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
                self.push_due()
            except PicellError as exc:  # a store or apply failure: retry on the next round
                log.error("sender: %s", exc.message)
            woke = self._wake.wait(self._next_wait())
            self._wake.clear()
            if woke:
                self._stop.wait(COALESCE_S)  # let a burst of changes settle into one push

    def _next_wait(self) -> float:
        now = time.time()
        with self.store.read() as conn:
            nxt = outbox.next_due(conn)
            links = [ln for ln in link_table.all_links(conn) if ln.state == "linked"]
        times = [] if nxt is None else [nxt]
        for link in links:
            retry = self._retry.get(link.public_key)
            if retry and retry.attempts:
                times.append(retry.at)
            elif link.pending_push or link.public_key not in self._told:
                times.append(now)
            else:
                times.append((link.last_push_at or 0) + HEARTBEAT_S)
        return max(0.0, min([now + HEARTBEAT_S, *times]) - now)

    # -- link state ----------------------------------------------------------------------------
    def push_due(self) -> None:
        now = time.time()
        with self.store.read() as conn:
            links = [ln for ln in link_table.all_links(conn) if ln.state == "linked"]
        for link in links:
            retry = self._retry.get(link.public_key, Retry())
            due = (
                link.pending_push
                or link.public_key not in self._told
                or (link.last_push_at or 0) + HEARTBEAT_S <= now
            )
            if due and retry.at <= now:
                self.push(link.name)

    def push(self, name: str) -> bool:
        """Send `name` our whole state now; True when it was accepted."""
        with self.store.transaction() as conn:
            link = link_table.find(conn, name)
            if link is None or link.state != "linked":
                return False
            cell = cell_table.load(conn)
            seq = link.local_seq + 1
            generation = link_table.pending_generation(conn, name)
            slot = exit_table.slots(conn).get(name)
            extra = document(cell, link, service_table.all_services(conn), slot)
            envelope = envelope_from(cell, link, "state", seq, extra)
            conn.execute("UPDATE links SET local_seq = ? WHERE name = ?", (seq, name))
        self.pushes += 1
        error = self._send(cell.ip, link, "state", envelope)
        with self.store.transaction() as conn:
            if error is None:
                link_table.push_done(conn, name, generation, time.time())
            else:
                link_table.push_failed(conn, name, error)
        self._note(link.public_key, error)
        if error is None:
            self._told.add(link.public_key)
        return error is None

    def _note(self, key: str, error: str | None) -> None:
        if error is None:
            self._retry.pop(key, None)
            return
        retry = self._retry.setdefault(key, Retry())
        retry.at = time.time() + min(OUTBOX_MAX_BACKOFF_S, 2.0**retry.attempts)
        retry.attempts += 1

    @staticmethod
    def _send(our_ip: IPv4Address, link: Link, kind: str, envelope: dict[str, Any]) -> str | None:
        try:
            status, data = client.send(our_ip, link.dns_ip, link.mesh_port, kind, envelope)
        except client.Unreachable as exc:
            return str(exc)
        if 200 <= status < 300:
            return None
        message = data.get("message") if isinstance(data, dict) else data
        return f"HTTP {status}: {message}"

    # -- the outbox ----------------------------------------------------------------------------
    def deliver_due(self) -> None:
        with self.store.read() as conn:
            messages = outbox.due(conn, time.time())
        for message in messages:
            self._deliver(message)

    def _deliver(self, message: Message) -> None:
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            link = link_table.by_key(conn, message.link_key)
        if link is None:
            with self.store.transaction() as conn:
                outbox.done(conn, message.id)
            return
        try:
            status, data = client.send(
                cell.ip, link.dns_ip, link.mesh_port, message.kind, json.loads(message.body)
            )
            error = None if 200 <= status < 300 or status == 404 else f"HTTP {status}: {data}"
        except client.Unreachable as exc:
            status, error = 0, str(exc)
        if error is None:
            with self.store.transaction() as conn:
                outbox.done(conn, message.id)
            if message.kind == "unlink":
                outcome = "delivered" if status != 404 else "they had no link with us"
                self.links.unlink_delivered(message.link_key, outcome)
            return
        if message.kind == "unlink" and time.time() - message.created_at > UNLINK_GIVE_UP_S:
            with self.store.transaction() as conn:
                outbox.done(conn, message.id)
            self.links.unlink_delivered(message.link_key, f"given up: {error}")
            return
        retry_s = min(OUTBOX_MAX_BACKOFF_S, 2.0**message.attempts)
        log.info("sender: %s to %s failed (%s); retry in %.0f s", message.kind, link.name,
                 error, retry_s)  # fmt: skip
        with self.store.transaction() as conn:
            outbox.failed(conn, message.id, error, retry_s)
