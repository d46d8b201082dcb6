"""The outbox sender: delivers queued signed messages to linked cells through the tunnel.

A thread that wakes when a message is queued or due, sends it from our WireGuard address, and on
failure retries with capped backoff (`OUTBOX_MAX_BACKOFF_S`). An `unlink` that reached the other
cell (or that it no longer needs: 404) completes our side's removal; one undelivered for
`UNLINK_GIVE_UP_S` is dropped with our side.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from picell.constants import OUTBOX_MAX_BACKOFF_S, UNLINK_GIVE_UP_S
from picell.errors import PicellError
from picell.mesh import client
from picell.mesh.links import Links
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.store import outbox
from picell.store.outbox import Message

log = logging.getLogger(__name__)


class Sender:
    def __init__(self, links: Links) -> None:
        self.links = links
        self.store = links.store
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)

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
            except PicellError as exc:  # a store or apply failure: retry on the next round
                log.error("outbox: %s", exc.message)
            with self.store.read() as conn:
                nxt = outbox.next_due(conn)
            delay = OUTBOX_MAX_BACKOFF_S if nxt is None else max(0.0, nxt - time.time())
            self._wake.wait(min(delay, OUTBOX_MAX_BACKOFF_S))
            self._wake.clear()

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
        log.info("outbox: %s to %s failed (%s); retry in %.0f s", message.kind, link.name, error,
                 retry_s)  # fmt: skip
        with self.store.transaction() as conn:
            outbox.failed(conn, message.id, error, retry_s)
