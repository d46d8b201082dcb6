"""The outgoing client against hostile answers: size cap, total deadline, strict JSON; and
`Links.connect` through the client's transport seam (httpx.MockTransport), plus two checks on a
real loopback socket (the sending address, a header trickle no per-read timeout catches)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from picell.control import Control
from picell.errors import Forbidden
from picell.mesh import client
from picell.mesh.client import ANSWER_MAX_BYTES, BadAnswer, MeshClient, Unreachable, strict_json
from picell.mesh.crypto import mac, pairing_key
from picell.mesh.links import Links
from tests.unit.fakes import FakeClock
from tests.unit.test_mesh import identity, keypair

OURS = ipaddress.IPv4Address("10.61.0.1")
THEIRS = ipaddress.IPv4Address("10.62.0.1")
MIB = 1024 * 1024
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


class Stream:
    """A response body that counts what the client pulled from it. `step_s` moves the fake
    clock per chunk (a trickle in fake time)."""

    def __init__(
        self, chunk: bytes, total: int, clock: FakeClock | None = None, step_s: float = 0.0
    ) -> None:
        self.chunk, self.total, self.clock, self.step_s = chunk, total, clock, step_s
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.total:
            self.pulled += len(self.chunk)
            if self.clock is not None:
                self.clock.advance(self.step_s)
            yield self.chunk


def mock(answer: Any) -> MeshClient:
    """A client whose every request gets `answer` (a Response, or a callable making one)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return answer(request) if callable(answer) else answer

    return MeshClient(httpx.MockTransport(handler))


def send(c: MeshClient) -> tuple[int, Any]:
    return c.send(OURS, THEIRS, 3000, "state", {"body": {"seq": 1}, "mac": "m"})


def test_a_good_answer_is_parsed_and_the_request_is_what_we_meant() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True, "seq": 1})

    assert send(mock(answer)) == (200, {"ok": True, "seq": 1})
    [request] = seen
    assert str(request.url) == "http://10.62.0.1:3000/api/cells/peer-sync/permissions"
    assert json.loads(request.content) == {"body": {"seq": 1}, "mac": "m"}
    assert request.headers["accept-encoding"] == "identity"


def test_a_huge_streamed_answer_is_cut_off_at_the_cap() -> None:
    body = Stream(b" " * 65536, 100 * MIB)
    with pytest.raises(BadAnswer) as err:
        send(mock(httpx.Response(200, content=body)))
    assert err.value.status == 200 and "over the 65536-byte limit" in str(err.value)
    assert body.pulled <= ANSWER_MAX_BYTES + 65536  # one read past the cap, not 100 MB


def test_a_huge_declared_answer_is_refused_unread() -> None:
    body = Stream(b" " * 65536, 100 * MIB)
    answer = httpx.Response(200, headers={"content-length": str(100 * MIB)}, content=body)
    with pytest.raises(BadAnswer, match="over the 65536-byte limit"):
        send(mock(answer))
    assert body.pulled == 0


def test_a_trickled_answer_ends_at_the_deadline_of_the_whole_exchange() -> None:
    clock = FakeClock(1000.0)
    body = Stream(b" ", 10**9, clock, step_s=1.0)  # a byte a second, for ever
    c = MeshClient(httpx.MockTransport(lambda r: httpx.Response(200, content=body)),
                   clock=clock.monotonic)  # fmt: skip
    with pytest.raises(BadAnswer) as err:
        send(c)
    assert "not complete within 8 s" in str(err.value) and err.value.status == 200
    assert body.pulled <= client.DEADLINE_S + 1


def test_no_status_line_within_the_deadline_is_unreachable() -> None:
    async def silent(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)  # a per-read timeout alone would wait this out and succeed
        return httpx.Response(200, json={"ok": True, "seq": 1})

    c = MeshClient(httpx.MockTransport(silent), deadline_s=0.2)
    with pytest.raises(Unreachable) as err:
        send(c)
    assert not isinstance(err.value, BadAnswer) and "no answer within" in str(err.value)


def test_deep_nesting_is_refused_before_the_parser_recurses() -> None:
    deep = b"[" * 30_000 + b"]" * 30_000  # inside the size cap
    with pytest.raises(RecursionError):
        json.loads(deep)  # what killed the sender thread
    with pytest.raises(BadAnswer, match="nested deeper than 32 levels"):
        send(mock(httpx.Response(200, content=deep)))
    with pytest.raises(ValueError, match="nested deeper"):
        strict_json(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    # brackets inside strings are not nesting; 32 real levels are fine
    assert strict_json(b'["[[[[{{{{\\"]"]') == ['[[[[{{{{"]']
    assert strict_json(b"[" * 32 + b"]" * 32) is not None
    with pytest.raises(ValueError, match="nested deeper"):
        strict_json(b"[" * 33 + b"]" * 33)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"ok": true, "seq": NaN}', "NaN is not a JSON number"),
        (b'{"ok": true, "seq": Infinity}', "Infinity is not a JSON number"),
        (b'{"seq": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"ok": tru', "not usable JSON"),
        (b'{"ok": "\xff"}', "not UTF-8"),
        (b"1" * 5000, "not usable JSON"),  # Python refuses ints over 4300 digits
    ],
)
def test_not_strict_json_is_a_bad_answer(raw: bytes, why: str) -> None:
    with pytest.raises(BadAnswer, match=why):
        send(mock(httpx.Response(200, content=raw)))


def test_a_compressed_or_broken_off_answer_is_a_bad_answer() -> None:
    gzip = httpx.Response(200, headers={"content-encoding": "gzip"}, content=b"\x1f\x8b")
    with pytest.raises(BadAnswer, match="compressed"):
        send(mock(gzip))

    class Broken:
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"ok": '
            raise httpx.ReadError("connection reset")

    with pytest.raises(BadAnswer) as err:
        send(mock(httpx.Response(200, content=Broken())))
    assert err.value.status == 200 and "broken off" in str(err.value)


def test_a_refused_connection_is_unreachable_and_an_empty_body_is_none() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(Unreachable) as err:
        send(mock(refuse))
    assert not isinstance(err.value, BadAnswer) and "ConnectError" in str(err.value)
    assert send(mock(httpx.Response(204))) == (204, None)


# -- a real socket -----------------------------------------------------------------------------
@contextmanager
def serve_once(reply: Any) -> Iterator[tuple[int, list[str]]]:
    """A one-connection server on 127.0.0.1; yields its port and the peers it saw."""
    listener = socket.create_server(("127.0.0.1", 0))
    peers: list[str] = []

    def run() -> None:
        conn, addr = listener.accept()
        peers.append(addr[0])
        with conn:
            conn.recv(65536)
            try:
                reply(conn)
            except OSError:  # the client hung up: what a deadline does
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], peers
    finally:
        listener.close()
        thread.join(timeout=30)


def test_production_sends_from_our_address() -> None:
    def ok(conn: socket.socket) -> None:
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{"ok":true,"seq":1} ')

    with serve_once(ok) as (port, peers):
        answer = MeshClient().send(ipaddress.IPv4Address("127.0.0.2"), LOOPBACK, port, "state", {})
        assert answer == (200, {"ok": True, "seq": 1})
        assert peers == ["127.0.0.2"]


def test_headers_trickled_over_a_real_socket_end_at_the_deadline() -> None:
    def trickle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        end = time.monotonic() + 20  # then a valid answer: a missing deadline would pass
        while time.monotonic() < end:
            conn.sendall(b"a")
            time.sleep(0.02)
        conn.sendall(b'\r\nContent-Length: 20\r\n\r\n{"ok":true,"seq":1} ')

    with serve_once(trickle) as (port, _):
        c = MeshClient(deadline_s=0.5)
        with pytest.raises(Unreachable, match="no answer within"):
            c.send(LOOPBACK, LOOPBACK, port, "state", {})


# -- Links.connect through the seam ------------------------------------------------------------
TOKEN = "t" * 32


def beta_invite(public: str) -> str:
    ident = identity("beta", "10.62.0.0/24", "beta.test", public)
    pairing = {"port": 51821, "token": TOKEN, "expires_at": time.time() + 3600}
    return json.dumps({**ident, "pairing": pairing})


def connect_with(
    control: Control, monkeypatch: pytest.MonkeyPatch, answer: Any
) -> tuple[Links, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request) if callable(answer) else answer

    monkeypatch.setattr(client, "default", MeshClient(httpx.MockTransport(handler)))
    return Links(control), seen


def test_connect_pairs_through_the_transport(
    control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, beta_public = keypair()
    ident = identity("beta", "10.62.0.0/24", "beta.test", beta_public)

    def accept(request: httpx.Request) -> httpx.Response:
        nonce = json.loads(request.content)["nonce"]
        signed = {"identity": ident, "nonce": nonce, "role": "accepted"}
        return httpx.Response(200, json={"identity": ident, "nonce": nonce,
                                         "mac": mac(pairing_key(TOKEN), signed)})  # fmt: skip

    links, seen = connect_with(control, monkeypatch, accept)
    out = links.connect(beta_invite(beta_public))
    assert out["state"] == "linked" and out["name"] == "beta"
    assert str(seen[0].url) == "http://198.51.100.9:51821/api/cells/peer-sync/accept-invite"


def test_connect_refused_stores_nothing(control: Control, monkeypatch: pytest.MonkeyPatch) -> None:
    refusal = httpx.Response(403, json={"code": "forbidden", "message": "pairing refused"})
    links, _ = connect_with(control, monkeypatch, refusal)
    with pytest.raises(
        Forbidden, match="beta refused the link; its owner sees why in beta.s journal"
    ):
        links.connect(beta_invite(keypair()[1]))
    assert links.overview() == []


def test_connect_unreachable_waits(control: Control, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    links, _ = connect_with(control, monkeypatch, refuse)
    out = links.connect(beta_invite(keypair()[1]))
    assert out["state"] == "waiting"
    assert "pairing port unreachable" in out["last_push_error"]
    assert "ConnectError" in out["last_push_error"]


def test_connect_with_a_huge_answer_reads_only_the_cap(
    control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = Stream(b" " * 65536, 100 * MIB)
    links, _ = connect_with(control, monkeypatch, httpx.Response(200, content=body))
    with pytest.raises(Forbidden) as err:  # it answered, with something unusable: no link
        links.connect(beta_invite(keypair()[1]))
    assert "over the 65536-byte limit" in err.value.message
    assert links.overview() == []
    assert body.pulled <= ANSWER_MAX_BYTES + 65536
