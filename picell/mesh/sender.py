"""The sender: everything this cell tells linked cells, through the tunnel, from our address.

- Link state: a link whose state changed (`pending_push`) is pushed at once, bursts coalescing
  into one document (`COALESCE_S`); every linked cell is pushed again each `HEARTBEAT_S` as a
  heartbeat and safety net; a failed push is retried with backoff (1, 2, 4, ... s) capped at
  `OUTBOX_MAX_BACKOFF_S`. A cell that was offline therefore converges within one heartbeat.
  A push counts as accepted only when the answer is a 2xx whose body is a `StateAnswer` for the
  sequence number we sent.
- A `waiting` link (its owner imported the other cell's invite; no pairing answer came back) is
  pushed as soon as WireGuard holds a fresh handshake with it: the other cell, which dropped our
  handshakes until its owner imported our invite, has proven consent, and its acceptance of our
  signed document confirms the link on both sides. The pairing port is only a convenience.
- Each document says where we see the other cell (`seen_at`, the endpoint WireGuard shows).
- A push answered 404 (the other cell holds no link with us) marks the link an orphan, shown
  in `picell cells` and the journal; nothing is deleted on that guess. A later accepted push
  clears it.
- The outbox: queued one-off messages (`unlink`). One that reached the other cell (or that it no
  longer needs: 404) completes our side's removal; an `unlink` undelivered for
  `UNLINK_GIVE_UP_S` is dropped with our side.

Links are isolated: the loop thread only decides what is due and hands each due link to a small
pool of `WORKERS` threads, at most one job per link in flight. Every exchange is bounded by the
client (`DEADLINE_S`, `ANSWER_MAX_BYTES`), so a slow, trickling or huge answer holds one worker
for at most the deadline, and the other links go on. The loop thread never dies: any exception
is logged (at most once per `ERROR_LOG_INTERVAL_S`, with a count), and the loop backs off and
goes on. Time comes from a `Clock`, so tests drive all of this without sleeping.

Must not: parse or trust an answer beyond `client`'s checks, hold the store lock while sending,
or start a thread per push.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Protocol

from pydantic import ValidationError

from picell.constants import (
    COALESCE_S,
    HEARTBEAT_S,
    LINK_STALE_S,
    OUTBOX_MAX_BACKOFF_S,
    UNLINK_GIVE_UP_S,
)
from picell.mesh import client
from picell.mesh.client import MeshClient, model_error, printable
from picell.mesh.document import document
from picell.mesh.links import Links
from picell.mesh.protocol import envelope_from
from picell.mesh.rekey import Rekey
from picell.mesh.relay import relay_fields, seen_from_peers
from picell.mesh.wire import StateAnswer
from picell.metrics import Metrics
from picell.state import relay_reserved
from picell.store import cell as cell_table
from picell.store import exits as exit_table
from picell.store import journal, outbox
from picell.store import links as link_table
from picell.store import peers as peer_table
from picell.store import services as service_table
from picell.store.links import Link, LinkState
from picell.store.outbox import Message
from picell.system.limits import RepeatLog
from picell.wireguard.apply import ObservedPeer, observe_wg
from picell.worker import Worker

log = logging.getLogger(__name__)

ORPHAN_404 = ("the other cell has no link with us (it ended the link, or it was restored from"
              " a backup made before the link): connect again with a fresh invite, or"
              " disconnect")  # fmt: skip
WAITING_POLL_S = 5.0  # a waiting link: how often WireGuard is asked for a handshake with it
WORKERS = 4  # pushes in flight at once; a bad link holds one for at most client.DEADLINE_S
ERROR_LOG_INTERVAL_S = 60.0  # unexpected errors: one log line per interval, with a count


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (stored as `last_push_at`, compared with `created_at`)."""
        ...

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Wait until `event` is set (True) or `timeout_s` passed (False)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(timeout_s)


def backoff_s(attempts: int) -> float:
    """The wait after the `attempts`-th consecutive failure (1, 2, 4, ... capped)."""
    return min(OUTBOX_MAX_BACKOFF_S, 2.0 ** max(0, attempts - 1))


@dataclass
class Retry:
    attempts: int = 0
    at: float = 0.0


class Sender(Worker):
    thread_name = "sender"
    join_s = 10.0

    def __init__(
        self,
        links: Links,
        *,
        clock: Clock | None = None,
        mesh_client: MeshClient | None = None,
        workers: int = WORKERS,
    ) -> None:
        self.links = links
        self.store = links.store
        self.clock: Clock = clock or SystemClock()
        self.client = mesh_client or client.default
        self.rekey = Rekey(links)
        self.pushes = 0  # documents sent (benchmarks read it)
        self.metrics = Metrics()  # the daemon puts its own in (picell/metrics.py)
        self.errors = RepeatLog(log, ERROR_LOG_INTERVAL_S, clock=self.clock.time)
        self._lock = threading.Lock()  # guards the fields below, written by the workers
        self._retry: dict[str, Retry] = {}  # link key -> backoff after failed pushes or jobs
        # links told our state since this daemon started: at start every link is told at once,
        # since our identity (endpoint, domain) may have changed while we were stopped
        self._told: set[str] = set()
        self._seen: dict[str, ObservedPeer] = {}  # the last round's `wg show`, by peer key
        self._in_flight: dict[str, Future[None]] = {}  # link key -> its one job
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sender-job")
        super().__init__()

    def stop(self) -> None:
        super().stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.clear()  # before the round: a wake during it is not lost
            try:
                self.round()
                wait_s = self._next_wait()
                failures = 0
            except Exception as exc:  # a store failure, a bug: never end the thread
                self._error("round", exc)
                failures += 1
                wait_s = backoff_s(failures)
            woke = self.clock.wait(self._wake, wait_s)
            if woke and not self._stop.is_set():
                self.clock.wait(self._stop, COALESCE_S)  # let a burst settle into one push

    # -- scheduling ----------------------------------------------------------------------------
    def round(self) -> list[Future[None]]:
        """Start every due push and delivery whose link has no job in flight; returns the jobs
        started (tests wait for them)."""
        self.rekey.follow_stale()  # a linked cell that switched keys while we missed its word
        now = self.clock.time()
        with self.store.read() as conn:
            messages = outbox.all_messages(conn)
            links = self._pushable(conn)
        started: list[Future[None]] = []
        for message in messages:
            if self._message_due_at(message) <= now:
                started += self._start(message.link_key, self._deliver, message)
        for link in links:
            if self._push_due_at(link, now) <= now:
                started += self._start(link.public_key, self.push, link.name)
        return started

    def _next_wait(self) -> float:
        now = self.clock.time()
        with self.store.read() as conn:
            messages = outbox.all_messages(conn)
            links = self._pushable(conn, observe=False)
            waiting = link_table.count_waiting(conn) > 0
        with self._lock:
            busy = set(self._in_flight)  # their end wakes us
        times = [now + HEARTBEAT_S]
        if waiting:  # look again soon for the handshake that proves the other side imported
            times.append(now + WAITING_POLL_S)
        times += [self._message_due_at(m) for m in messages if m.link_key not in busy]
        times += [self._push_due_at(ln, now) for ln in links if ln.public_key not in busy]
        return max(0.0, min(times) - now)

    def _pushable(self, conn: Any, observe: bool = True) -> list[Link]:
        """Linked links, and waiting ones that WireGuard shows a fresh handshake with. With
        `observe` False, the round's `wg show` just taken serves (one process per loop)."""
        links = link_table.all_links(conn)
        waiting = [ln for ln in links if ln.state == LinkState.WAITING]
        if observe:
            self._seen = self._peers(cell_table.load(conn).interface) if waiting else {}
        seen = self._seen
        return [
            ln
            for ln in links
            if ln.state == LinkState.LINKED
            or (ln.state == LinkState.WAITING and self._fresh(seen.get(ln.public_key)))
        ]

    def _peers(self, interface: str) -> dict[str, ObservedPeer]:
        observed = observe_wg(self.links.control.runner, interface)
        return observed.peers if observed else {}

    def _fresh(self, peer: ObservedPeer | None) -> bool:
        return bool(peer and peer.latest_handshake
                    and self.clock.time() - peer.latest_handshake < LINK_STALE_S)  # fmt: skip

    def _push_due_at(self, link: Link, now: float) -> float:
        with self._lock:
            retry = self._retry.get(link.public_key)
            told = link.public_key in self._told
        if retry is not None:
            return retry.at
        if link.sync.pending_push or not told:
            return now
        return (link.sync.last_push_at or 0.0) + HEARTBEAT_S

    def _message_due_at(self, message: Message) -> float:
        with self._lock:
            retry = self._retry.get(message.link_key)
        return max(message.next_at, retry.at if retry else 0.0)

    def _start(self, key: str, job: Callable[[Any], Any], arg: Any) -> list[Future[None]]:
        with self._lock:
            if key in self._in_flight:
                return []  # one job per link: the next round sees what this one left
            future = self._pool.submit(self._guarded, key, job, arg)
            self._in_flight[key] = future
        future.add_done_callback(lambda _: self._finished(key))
        return [future]

    def _finished(self, key: str) -> None:
        with self._lock:
            self._in_flight.pop(key, None)
        self._wake.set()  # a change made while it was in flight may be due now

    def _guarded(self, key: str, job: Callable[[Any], Any], arg: Any) -> None:
        try:
            job(arg)
        except Exception as exc:  # a bug or a store failure: back this link off, keep going
            self._error(f"job for {key[:8]}…", exc)
            self._note(key, "internal error")

    def _error(self, where: str, exc: BaseException) -> None:
        """An unexpected error (called in its `except`): logged at once, then once per interval
        with a count, so a link that fails every round cannot flood the log."""
        kind = type(exc).__name__
        message = f"sender: {where}: {kind}: {exc}"
        self.errors.note(f"sender {where} {kind}", logging.ERROR, message, exc_info=True)

    def heard_from(self, key: str) -> None:
        """The cell with link key `key` just reached us through the tunnel (its document was
        accepted): whatever we hold for it and backed off while it was away is due now, not
        after the rest of a backoff of up to `OUTBOX_MAX_BACKOFF_S`."""
        with self._lock:
            retry = self._retry.get(key)
            if retry is None:
                return
            retry.at = min(retry.at, self.clock.time())
        self._wake.set()

    def _note(self, key: str, error: str | None) -> None:
        with self._lock:
            if error is None:
                self._retry.pop(key, None)
                return
            retry = self._retry.setdefault(key, Retry())
            retry.attempts += 1
            retry.at = self.clock.time() + backoff_s(retry.attempts)

    # -- link state ----------------------------------------------------------------------------
    def push(self, name: str) -> bool:
        """Send `name` our whole state now; True when it was accepted."""
        with self.store.read() as conn:
            cell = cell_table.load(conn)
        peers = self._peers(cell.interface)  # outside the store lock: a process
        with self.store.transaction() as conn:
            link = link_table.find(conn, name)
            if link is None or link.state == LinkState.UNLINKING:
                return False
            if link.state == LinkState.WAITING and not self._fresh(peers.get(link.public_key)):
                return False  # no tunnel yet: the other owner has not imported our invite
            cell = cell_table.load(conn)
            seq = link.sync.seq + 1
            generation = link_table.pending_generation(conn, name)
            slot = exit_table.slots(conn).get(name)
            seen = peers.get(link.public_key)
            fields = relay_fields(link, link_table.all_links(conn), self.links.wanted.snapshot(),
                                  seen_from_peers(peers), self.clock.time(),
                                  relay_reserved(cell))  # fmt: skip
            extra = document(cell, link, service_table.all_services(conn), slot,
                             seen_at=seen.endpoint if seen else None, reach=fields,
                             peers=peer_table.all_peers(conn) if link.choices.publish_devices
                             else None)  # fmt: skip
            envelope = envelope_from(cell, link, "state", seq, extra)
            conn.execute("UPDATE links SET local_seq = ? WHERE name = ?", (seq, name))
        with self._lock:
            self.pushes += 1
        started = time.monotonic()
        error = self._push_error(cell.ip, link, envelope, seq)
        self.metrics.pushed(time.monotonic() - started, error is None)
        confirmed = False
        with self.store.transaction() as conn:
            if error is None:
                link_table.push_done(conn, name, generation, self.clock.time())
                confirmed = link_table.confirm(conn, name, self.clock.time())
                if confirmed:
                    journal.append(conn, name, "linked", f"cell {name}",
                                   "it accepted our signed state through the tunnel")  # fmt: skip
                if link_table.set_orphan(conn, name, None):
                    journal.append(conn, name, "no longer an orphan", f"cell {name}",
                                   "it accepted our signed state: it holds the link")  # fmt: skip
            else:
                link_table.push_failed(conn, name, error)
                if error.startswith("HTTP 404") and link_table.set_orphan(conn, name, ORPHAN_404):
                    # shown to the owner, never acted on: a restore on either side explains
                    # it as well as an unlink that never reached us
                    journal.append(conn, name, "orphan", f"cell {name}", ORPHAN_404)
        if confirmed:
            self.links.control.converge_soon()
        self._note(link.public_key, error)
        if error is None:
            with self._lock:
                self._told.add(link.public_key)
        return error is None

    def _push_error(
        self, our_ip: IPv4Address, link: Link, envelope: dict[str, Any], seq: int
    ) -> str | None:
        try:
            status, data = self.client.send(
                our_ip, link.identity.address, link.identity.mesh_port, "state", envelope
            )
        except client.Unreachable as exc:  # BadAnswer included
            return str(exc)
        if not 200 <= status < 300:
            return _refusal(status, data)
        try:
            answer = StateAnswer.model_validate(data)
        except ValidationError as exc:
            return f"HTTP {status}: {model_error(exc)}"
        if answer.seq != seq:
            return f"HTTP {status}: answer.seq: {answer.seq}, expected {seq}"
        return None

    # -- the outbox ----------------------------------------------------------------------------
    def _deliver(self, message: Message) -> None:
        with self.store.read() as conn:
            cell = cell_table.load(conn)
            link = link_table.by_key(conn, message.link_key)
        if link is None:
            with self.store.transaction() as conn:
                outbox.done(conn, message.id)
            return
        body = json.loads(message.body)  # our own, as stored by `Links.disconnect`
        error: str | None = None
        try:
            theirs = link.identity
            status, data = self.client.send(cell.ip, theirs.address, theirs.mesh_port, message.kind,
                                            body)  # fmt: skip
        except client.BadAnswer as exc:
            # the status line settles a delivery; the body carries nothing we need
            status, data, error = exc.status, None, str(exc)
        except client.Unreachable as exc:
            status, data, error = 0, None, str(exc)
        if 200 <= status < 300 or status == 404:
            error = None
        elif error is None:
            error = _refusal(status, data)
        self._note(message.link_key, None)
        if error is None:
            with self.store.transaction() as conn:
                outbox.done(conn, message.id)
            if message.kind == "unlink":
                outcome = "delivered" if status != 404 else "they had no link with us"
                self.links.unlink_delivered(message.link_key, outcome)
            return
        now = self.clock.time()
        if message.kind == "unlink" and now - message.created_at > UNLINK_GIVE_UP_S:
            with self.store.transaction() as conn:
                outbox.done(conn, message.id)
            self.links.unlink_delivered(message.link_key, f"given up: {error}")
            return
        retry_s = backoff_s(message.attempts + 1)
        log.info("sender: %s to %s failed (%s); retry in %.0f s", message.kind, link.name,
                 error, retry_s)  # fmt: skip
        with self.store.transaction() as conn:
            outbox.failed(conn, message.id, error, now + retry_s)


def _refusal(status: int, data: Any) -> str:
    message = data.get("message") if isinstance(data, dict) else data
    return f"HTTP {status}: {printable(message)}"
