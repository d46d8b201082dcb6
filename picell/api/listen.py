"""Bounded listeners: the sockets the daemon serves HTTP on, and the limits in front of uvicorn.

uvicorn alone arms no timeout before a first request and sets no connection limit (its
`limit_concurrency` answers 503, and a 5xx is a bug here), so idle connections to the open
pairing port used to exhaust the daemon's file descriptors. A `Listener` is a uvicorn server
that accepts its sockets itself:

- `ConnectionGate`: at most `total` connections open at once, at most `per_source` from one
  address (IPv4) or one /64 (IPv6). A connection over either cap is closed at accept time (a
  reset: no HTTP answer, no task, no parser), so a flood costs an accept and a close.
- `BoundedH11Protocol`: uvicorn's h11 protocol with a request deadline: a connection must deliver
  a whole request (headers and body) within `request_s` of connecting or of the previous answer,
  else it is closed. Time spent in the handler does not count.
- `accept()` failing (EMFILE, ENFILE, ENOBUFS) backs off instead of spinning: asyncio's own
  accept loop retries it `backlog` times per wake-up and logs a traceback each time (3.8 million
  lines in 40 s), so its servers are not used for TCP or the admin socket.
- Shed connections, deadlines and accept errors are logged once per interval with a count
  (`RepeatLog`), never once per event.

`listen_tcp` and `listen_unix` make the listening sockets (the admin socket 0600 before it
listens); `listen_tcp_any` the dual-stack pair of the pairing port (IPv4 and IPv6, one socket
each, so sources are never v4-mapped). This module must not know routes or policy:
`picell/app.py` chooses each listener's `Limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from picell.constants import ACCEPT_BACKOFF_S
from picell.system.limits import RepeatLog, backoff_delay

log = logging.getLogger(__name__)
IP_FREEBIND = 15  # <linux/in.h>; not exported by Python's socket module
LOCAL = "local"  # the source of every connection to a unix socket


@dataclass(frozen=True)
class Limits:
    name: str  # the listener, in log lines ("pairing")
    total: int  # connections open at once
    per_source: int  # ... from one source address
    request_s: float  # to deliver a whole request, from connect or from the previous answer


class ConnectionGate:
    """Counts open connections, in total and per source; says which to admit.

    Used from the event loop's thread only (no lock). `open` holds only sources with a
    connection open, so its size is bounded by `total`.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: Counter[str] = Counter()
        self.total = 0
        self.shed: Counter[str] = Counter()  # by reason, since start

    def admit(self, source: str) -> str | None:
        """Take a slot for `source`; None when admitted, else why it was refused."""
        if self.total >= self.limits.total:
            kind, reason = "total", f"{self.limits.total} connections open"
        elif self.open[source] >= self.limits.per_source:
            kind, reason = "source", f"{self.limits.per_source} connections open from that address"
        else:
            self.open[source] += 1
            self.total += 1
            return None
        self.shed[kind] += 1
        return reason

    def release(self, source: str) -> None:
        self.total -= 1
        self.open[source] -= 1
        if self.open[source] <= 0:
            del self.open[source]


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, holding a gate slot and armed with a request deadline."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        *,
        gate: ConnectionGate,
        source: str,
        repeats: RepeatLog,
    ) -> None:
        super().__init__(config=config, server_state=server_state, app_state=app_state)
        self.gate = gate
        self.source = source
        self.repeats = repeats
        self._deadline: asyncio.TimerHandle | None = None
        self._released = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.release()
        super().connection_lost(exc)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.gate.release(self.source)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is in (DONE), or the connection is over anyway

    def on_response_complete(self) -> None:
        # armed before uvicorn starts the next cycle: a pipelined request already complete
        # disarms it again in handle_events
        self._arm()
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.gate.limits.request_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.DONE or self.transport.is_closing():
            return
        self.repeats.note(
            f"{self.gate.limits.name} deadline",
            logging.WARNING,
            f"{self.gate.limits.name} listener: closed a connection from {self.source} that sent "
            f"no whole request within {self.gate.limits.request_s:g} s",
        )
        self.transport.close()


def _source(address: Any) -> str:
    """The source a gate counts: an IPv4 address; for IPv6 the source's /64, since one host
    holds a whole /64 and could otherwise open `per_source` connections from each of its
    addresses (a v4-mapped address, from a dual-stack socket, counts as the IPv4 address it
    maps); `LOCAL` for a unix socket."""
    if not (isinstance(address, tuple) and address):
        return LOCAL
    return source_key(str(address[0]))


def source_key(host: str) -> str:
    """What limits count for a source address: itself (IPv4), its /64 (IPv6), the IPv4
    address a v4-mapped one maps."""
    host = host.split("%", 1)[0]  # a link-local source's scope id
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _reset(conn: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the shed connection leaves no TIME_WAIT behind."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class Listener(uvicorn.Server):
    """A uvicorn server whose sockets are accepted by `accept_loop`, through a `ConnectionGate`;
    it leaves signals to the daemon, which runs several of them."""

    def __init__(self, config: uvicorn.Config, limits: Limits) -> None:
        super().__init__(config)
        self.limits = limits
        self.gate = ConnectionGate(limits)
        self.repeats = RepeatLog(log)
        self.accept_errors = 0
        self.accept_backoff_s = ACCEPT_BACKOFF_S
        self._accepting: list[asyncio.Task[None]] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # lifespan and state only: no asyncio server
        for sock in sockets or []:
            sock.setblocking(False)
            self._accepting.append(asyncio.create_task(self.accept_loop(sock)))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for task in self._accepting:
            task.cancel()
        for task in self._accepting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().shutdown(sockets=sockets)

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:  # once a second: report the counts of ended intervals
            self.repeats.flush()
        return await super().on_tick(counter)

    async def accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                # EMFILE and friends: the kernel keeps the connection queued; wait for a file
                # descriptor to come free rather than spin on the error
                failures += 1
                self.accept_errors += 1
                self.repeats.note(
                    f"{self.limits.name} accept {exc.errno}",
                    logging.ERROR,
                    f"{self.limits.name} listener: accept failed: "
                    f"{exc.strerror or errno.errorcode.get(exc.errno or 0, exc)}",
                )
                await asyncio.sleep(backoff_delay(failures, self.accept_backoff_s))
                continue
            failures = 0
            await self.admit(conn, address)

    async def admit(self, conn: socket.socket, address: Any) -> None:
        source = _source(address)
        refused = self.gate.admit(source)
        if refused is not None:
            _reset(conn)
            self.repeats.note(
                f"{self.limits.name} shed",
                logging.WARNING,
                f"{self.limits.name} listener: closed a new connection from {source} at once "
                f"({refused})",
            )
            return
        protocol = BoundedH11Protocol(
            self.config,
            self.server_state,
            self.lifespan.state,
            gate=self.gate,
            source=source,
            repeats=self.repeats,
        )
        try:
            conn.setblocking(False)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, conn)
        except Exception as exc:  # noqa: BLE001 - one connection's failure ends that one only
            protocol.release()
            _reset(conn)
            self.repeats.note(
                f"{self.limits.name} setup {type(exc).__name__}",
                logging.ERROR,
                f"{self.limits.name} listener: a connection failed to start: {exc!r}",
            )


def listen_tcp(address: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on an IPv4 or IPv6 address. For IPv4, IP_FREEBIND lets it bind the
    WireGuard address before (or while) the interface carries it, so start order does not
    matter. An IPv6
    socket is IPv6 only (IPV6_V6ONLY): IPv4 has its own socket, so that no source ever shows as
    a v4-mapped address."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((address, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def listen_tcp_any(port: int, backlog: int = 128) -> list[socket.socket]:
    """Dual-stack listening sockets on every address: `0.0.0.0` and `::` (for a cell whose only
    public address is IPv6). A host without IPv6 (disabled, or no module) keeps the IPv4 socket
    alone, and says so once."""
    socks = [listen_tcp("0.0.0.0", port, backlog)]
    try:
        socks.append(listen_tcp("::", port, backlog))
    except OSError as exc:
        log.warning("cannot listen on [::]:%d (%s): IPv4 only", port, exc.strerror or exc)
    return socks


def listen_unix(path: Path, mode: int = 0o600, backlog: int = 128) -> socket.socket:
    """A listening unix socket at `path` with `mode`, set before it listens: nobody else can
    connect in between (uvicorn's own `uds=` chmods it to 0666 after listening)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def loop_exception_handler(repeats: RepeatLog) -> Any:
    """An asyncio exception handler that logs each kind of error once per interval, counted."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", "error in the event loop"))
        kind = type(exc).__name__ if exc is not None else "-"
        repeats.note(
            f"loop {message} {kind}",
            logging.ERROR,
            f"event loop: {message}" + (f": {exc!r}" if exc is not None else ""),
            exc_info=False,
        )

    return handle
