"""Bounded listeners on real loopback sockets: connection caps (total and per source) shed at
accept time, the request deadline, accept errors that back off and are logged once, the admin
socket's mode, and the mesh refusal counter's fixed keys."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from picell.api.listen import (
    ConnectionGate,
    Limits,
    Listener,
    _source,
    listen_tcp,
    listen_tcp_any,
    listen_unix,
)
from picell.api.peer import refusal_reason
from tests.netns.harness import wait_until

GET = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    def ok() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(1.0)  # longer than the request deadline: handler time must not count
        return {"slow": True}

    return app


class Running:
    def __init__(self, limits: Limits, sock: socket.socket, *more: socket.socket) -> None:
        config = uvicorn.Config(_app(), log_level="warning", log_config=None, access_log=False)
        self.server = Listener(config, limits)
        self.sock = sock
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[sock, *more])), daemon=True
        )

    def __enter__(self) -> Running:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "listener did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def tcp() -> Iterator[tuple[socket.socket, int]]:
    sock = listen_tcp("127.0.0.1", 0)
    yield sock, sock.getsockname()[1]
    sock.close()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    host = "::1" if ":" in source else "127.0.0.1"
    conn = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    return conn


def closed_by_server(conn: socket.socket) -> bool:
    """True when the server closed (or reset) the connection without an answer."""
    try:
        return conn.recv(1024) == b""
    except ConnectionResetError:
        return True


def shed(port: int, source: str = "127.0.0.1") -> bool:
    """A new connection is closed without an answer (the reset may even beat connect())."""
    try:
        conn = connect(port, source)
    except ConnectionResetError:
        return True
    with conn:
        return closed_by_server(conn)


def answers(conn: socket.socket) -> bool:
    conn.sendall(GET)
    return conn.recv(4096).startswith(b"HTTP/1.1 200")


def test_gate_counts_per_source_and_total() -> None:
    gate = ConnectionGate(Limits("t", total=3, per_source=2, request_s=1))
    assert gate.admit("a") is None and gate.admit("a") is None
    assert gate.admit("a") == "2 connections open from that address"
    assert gate.admit("b") is None
    assert gate.admit("c") == "3 connections open"
    gate.release("a")
    assert gate.admit("c") is None
    assert dict(gate.shed) == {"source": 1, "total": 1}
    for source in ("a", "b", "c"):
        gate.release(source)
    assert gate.total == 0 and not gate.open  # nothing kept for sources with nothing open


def test_excess_connections_are_shed_and_others_still_served(
    tcp: tuple[socket.socket, int], caplog: pytest.LogCaptureFixture
) -> None:
    sock, port = tcp
    limits = Limits("pairing", total=6, per_source=2, request_s=30)
    with Running(limits, sock) as running, caplog.at_level(logging.WARNING):
        held = [connect(port) for _ in range(2)]
        wait_until(lambda: running.server.gate.total == 2, 10, "held connections not counted")
        assert all(shed(port) for _ in range(50))  # the kernel accepts; we close at once
        assert answers(connect(port, "127.0.0.2"))  # another source is still served
        assert running.server.gate.shed["source"] == 50
        shed_lines = [r for r in caplog.records if "closed a new connection" in r.getMessage()]
        assert len(shed_lines) == 1, [r.getMessage() for r in shed_lines]  # counted, not 50
        for conn in held:
            conn.close()


def test_gate_sources_ipv6_by_prefix_and_mapped_ipv4_as_ipv4() -> None:
    assert _source(("192.0.2.7", 5000)) == "192.0.2.7"
    assert _source(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    # one host holds a whole /64: its addresses share one count
    assert _source(("2001:db8:1:2::5", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert _source(("2001:db8:1:2:aaaa::9", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert _source(("2001:db8:1:3::5", 5000, 0, 0)) == "2001:db8:1:3::/64"
    assert _source(("fe80::1%eth0", 5000, 0, 2)) == "fe80::/64"
    assert _source("") == "local"


def test_the_dual_stack_listener_serves_and_counts_ipv6_sources() -> None:
    probe = listen_tcp("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    socks = listen_tcp_any(port)
    assert sorted(s.family for s in socks) == [socket.AF_INET, socket.AF_INET6]
    v6 = next(s for s in socks if s.family == socket.AF_INET6)
    assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1  # no v4-mapped sources
    try:
        limits = Limits("pairing", total=10, per_source=2, request_s=30)
        with Running(limits, *socks) as running:
            held = [connect(port, "::1") for _ in range(2)]
            wait_until(lambda: running.server.gate.total == 2, 10, "IPv6 connections not counted")
            assert set(running.server.gate.open) == {"::/64"}
            assert shed(port, "::1")  # over the per-source cap, over IPv6 too
            assert answers(connect(port, "127.0.0.1"))  # IPv4 on the same port, counted apart
            assert answers(held[0])
            for conn in held:
                conn.close()
    finally:
        for sock in socks:
            sock.close()


def test_total_cap_holds_across_sources(tcp: tuple[socket.socket, int]) -> None:
    sock, port = tcp
    with Running(Limits("pairing", total=3, per_source=3, request_s=30), sock) as running:
        held = [connect(port, f"127.0.0.{n}") for n in (2, 3, 4)]
        wait_until(lambda: running.server.gate.total == 3, 10, "held connections not counted")
        assert shed(port, "127.0.0.5")
        held[0].close()
        wait_until(lambda: running.server.gate.total == 2, 10, "a closed connection kept a slot")
        assert answers(connect(port, "127.0.0.5"))


def test_a_connection_without_a_whole_request_is_closed_at_the_deadline(
    tcp: tuple[socket.socket, int],
) -> None:
    sock, port = tcp
    with Running(Limits("pairing", total=10, per_source=10, request_s=0.3), sock) as running:
        idle = connect(port)
        partial = connect(port)
        partial.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        assert closed_by_server(idle)  # blocks until the deadline closes it
        assert closed_by_server(partial)
        wait_until(lambda: running.server.gate.total == 0, 10, "slots not released")
        # a whole request whose handler outlasts the deadline is answered
        slow = connect(port)
        slow.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        answer = b""
        while b'{"slow":true}' not in answer:
            chunk = slow.recv(4096)
            assert chunk, f"closed before the answer: {answer!r}"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        # ... and the next request on the same connection has a deadline of its own
        assert closed_by_server(slow)


def test_accept_errors_back_off_and_are_logged_once(
    tcp: tuple[socket.socket, int], caplog: pytest.LogCaptureFixture
) -> None:
    sock, port = tcp
    config = uvicorn.Config(_app(), log_level="warning", log_config=None, access_log=False)
    server = Listener(config, Limits("pairing", total=10, per_source=10, request_s=30))
    server.accept_backoff_s = (0.0,)
    left = 40

    async def scenario() -> bool:
        nonlocal left
        loop = asyncio.get_running_loop()
        real = loop.sock_accept

        async def sock_accept(s: socket.socket) -> Any:  # out of file descriptors, 40 times
            nonlocal left
            if left > 0:
                left -= 1
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return await real(s)

        loop.sock_accept = sock_accept  # type: ignore[method-assign]
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        served = await asyncio.to_thread(lambda: answers(connect(port)))
        server.should_exit = True
        await serving
        return served

    with caplog.at_level(logging.ERROR):
        assert asyncio.run(scenario())  # the listener went on after the errors
    assert left == 0 and server.accept_errors == 40
    lines = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert lines == ["pairing listener: accept failed: Too many open files"]


def test_admin_socket_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "picell.sock"
    path.write_text("stale")  # a file left by a killed daemon is replaced
    old = os.umask(0)
    try:
        sock = listen_unix(path)
    finally:
        os.umask(old)
    try:
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        with Running(Limits("admin", 4, 4, 30), sock):
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(10)
            client.connect(str(path))
            assert answers(client)
    finally:
        sock.close()


def test_mesh_refusals_are_counted_under_a_fixed_set_of_keys() -> None:
    keys = {refusal_reason(f"/api/cells/peer-sync/x{n}", 404) for n in range(1000)}
    keys |= {refusal_reason(f"/{n}/permissions", 404) for n in range(1000)}
    assert keys == {"other 404"}
    assert refusal_reason("/api/cells/peer-sync/permissions", 403) == "permissions 403"
    assert refusal_reason("/api/cells/peer-sync/unlink", 422) == "unlink 422"
    assert refusal_reason("/api/cells/peer-sync/unlink", 200) == "unlink other"


def test_shed_counts_are_flushed_once_the_interval_ends(
    tcp: tuple[socket.socket, int], caplog: pytest.LogCaptureFixture
) -> None:
    sock, port = tcp
    with Running(Limits("pairing", total=1, per_source=1, request_s=30), sock) as running:
        now = [0.0]
        running.server.repeats.clock = lambda: now[0]
        held = connect(port)
        wait_until(lambda: running.server.gate.total == 1, 10, "held connection not counted")
        with caplog.at_level(logging.WARNING):
            for _ in range(20):
                assert shed(port)
            totals = running.server.repeats.totals  # counted by the log once the note is written
            wait_until(lambda: totals.get("pairing shed") == 20, 10, "not all shed")
            now[0] = 1000.0  # the interval is over: the next tick reports the count
            wait_until(
                lambda: any("more like this" in r.getMessage() for r in caplog.records),
                10,
                "the count of shed connections was never logged",
            )
        lines = [
            r.getMessage() for r in caplog.records if "closed a new connection" in r.getMessage()
        ]
        assert len(lines) == 2 and "(19 more like this in the last 10 s)" in lines[1]
        held.close()
