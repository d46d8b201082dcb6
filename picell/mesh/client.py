"""Outgoing cross-cell HTTP: the pairing call (to the other cell's public pairing port) and
signed messages to its mesh API, sent from our WireGuard address so they travel in the tunnel.

The answer comes from another cell, so it is hostile until proven otherwise. Every exchange is
bounded:
- size: at most `ANSWER_MAX_BYTES` (64 KiB) of body are read; a larger answer, declared or
  streamed, is refused after at most that much plus one network read. Compressed answers are
  refused (we ask for `identity`), so a small body cannot inflate;
- time: the whole exchange (connect, headers, body) ends within `DEADLINE_S`. httpx's timeouts
  are per read, so a trickled answer would never trip them: the exchange runs under
  `asyncio.timeout`, and the body loop also checks the injected clock between reads;
- shape: the body is parsed strictly (`strict_json`): UTF-8, no `NaN`/`Infinity`, at most
  `JSON_MAX_DEPTH` levels, never a `RecursionError`.

`MeshClient.pair` and `.send` return `(status, parsed body)` or raise `Unreachable` (no answer)
or `BadAnswer` (an answer, with its status, but an unusable body). Their messages are one
printable line, fit for the journal and `last_push_error`. The transport is a seam: tests pass
`httpx.MockTransport`; production builds one per request, bound to our WireGuard address.
Never retries: the sender owns retries. Must not know about the store or the link states.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from pydantic import ValidationError

from picell import validate
from picell.api.strict_json import loads_strict
from picell.errors import BadInput

PAIR_PATH = "/api/cells/peer-sync/accept-invite"
# message type -> route on the other cell's mesh listener (DESIGN §6 names the state route)
MESH_ROUTES = {"state": "/api/cells/peer-sync/permissions", "unlink": "/api/cells/peer-sync/unlink",
               "rekey": "/api/cells/peer-sync/rekey",
               "explain": "/api/cells/peer-sync/explain"}  # fmt: skip
DEADLINE_S = 8.0  # the whole exchange, not one read
ANSWER_MAX_BYTES = 64 * 1024  # the mesh listener's own body limit (MESH_BODY_MAX)
JSON_MAX_DEPTH = 32  # our answers nest 3 levels; the state document 4
ERROR_MAX_CHARS = 300  # a message from the other cell, as stored and shown


class Unreachable(Exception):
    """Nothing came back: no connection, or no status line before the deadline."""


class BadAnswer(Unreachable):
    """The other side answered with `status`, but its body is unusable (too large, too slow,
    not strict JSON). An `Unreachable` too, so a caller that only knows that one still fails
    closed; a caller that cares (the outbox: a status alone can settle a delivery) tells them
    apart."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def printable(text: object, limit: int = ERROR_MAX_CHARS) -> str:
    return validate.printable(text, limit)


def model_error(exc: ValidationError, prefix: str = "answer") -> str:
    """The first problem of a validation error, naming the field, never echoing the value."""
    first = exc.errors()[0]
    where = ".".join([prefix, *(str(p) for p in first["loc"])])
    return printable(f"{where}: {first['msg']}")


def strict_json(raw: bytes, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """Parse `raw` as strict JSON (`loads_strict`, the listeners' reader too), or raise
    `ValueError` saying why. The caller has bounded the size already."""
    try:
        return loads_strict(raw, max_bytes=max(len(raw), 1), max_depth=max_depth, field="answer")
    except BadInput as exc:
        raise ValueError(printable(exc.message.removeprefix("answer: "), 120)) from None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx builds a TLS context (loading the CA bundle: tens of ms) for every transport, even
    for plain http as here; one shared context makes a request cost what its exchange costs."""
    return httpx.create_ssl_context()


_LENGTH = re.compile(r"[0-9]{1,18}")


async def _raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it arrives, undecoded. A response built in memory (a MockTransport handler's
    `content=b"..."`) was read when it was made: it comes as one chunk."""
    if response.is_stream_consumed:
        yield response.content
        return
    async for chunk in response.aiter_raw():
        yield chunk


class MeshClient:
    """Bounded outgoing requests. `transport`: an `httpx.AsyncBaseTransport` used for every
    request (tests: `httpx.MockTransport`), or None to build a fresh one per request, bound to
    the sending address. `clock`: monotonic seconds, read between reads of the body."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        deadline_s: float = DEADLINE_S,
        max_bytes: int = ANSWER_MAX_BYTES,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes

    def pair(self, host: str, port: int, body: dict[str, Any]) -> tuple[int, Any]:
        netloc = f"[{host}]" if ":" in host else host
        return self._post(f"http://{netloc}:{port}{PAIR_PATH}", body, None)

    def send(
        self,
        our_ip: ipaddress.IPv4Address,
        their_ip: ipaddress.IPv4Address,
        port: int,
        kind: str,
        envelope: dict[str, Any],
    ) -> tuple[int, Any]:
        url = f"http://{their_ip}:{port}{MESH_ROUTES[kind]}"
        return self._post(url, envelope, str(our_ip))

    def _post(self, url: str, body: dict[str, Any], local_address: str | None) -> tuple[int, Any]:
        # one event loop per request: callers are plain threads (the sender's workers, the
        # admin API's thread pool), and a pool of connections cannot outlive its loop anyway
        return asyncio.run(self._exchange(url, body, local_address))

    async def _exchange(
        self, url: str, body: dict[str, Any], local_address: str | None
    ) -> tuple[int, Any]:
        status: int | None = None
        owned = self.transport is None
        transport = self.transport or httpx.AsyncHTTPTransport(
            local_address=local_address, verify=_tls_context()
        )
        client = httpx.AsyncClient(transport=transport, timeout=self.deadline_s, trust_env=False)
        try:
            async with asyncio.timeout(self.deadline_s):
                request = client.build_request(
                    "POST", url, json=body, headers={"Accept-Encoding": "identity"}
                )
                response = await client.send(request, stream=True)
                try:
                    status = response.status_code
                    raw = await self._read(response, status)
                finally:
                    await response.aclose()
        except TimeoutError:
            if status is None:
                raise Unreachable(f"{url}: no answer within {self.deadline_s:.0f} s") from None
            raise BadAnswer(status, self._late(url, status)) from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            reason = printable(f"{exc.__class__.__name__}: {exc}")
            if status is None:
                raise Unreachable(f"{url}: {reason}") from None
            raise BadAnswer(status, f"{url}: HTTP {status}, answer broken off: {reason}") from None
        finally:
            if owned:
                await client.aclose()
        if not raw:
            return status, None
        try:
            return status, strict_json(raw)
        except ValueError as exc:
            reason = f"{url}: HTTP {status}, answer is not usable JSON: {exc}"
            raise BadAnswer(status, reason) from None

    async def _read(self, response: httpx.Response, status: int) -> bytes:
        url = response.request.url
        declared = response.headers.get("content-length")
        if declared is not None and (
            not _LENGTH.fullmatch(declared.strip()) or int(declared) > self.max_bytes
        ):
            raise BadAnswer(status, self._too_large(url, status))
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise BadAnswer(status, f"{url}: HTTP {status}, answer is compressed (refused)")
        deadline = self.clock() + self.deadline_s
        body = bytearray()
        async for chunk in _raw_chunks(response):
            body += chunk
            if len(body) > self.max_bytes:
                raise BadAnswer(status, self._too_large(url, status))
            if self.clock() > deadline:
                raise BadAnswer(status, self._late(url, status))
        return bytes(body)

    def _too_large(self, url: object, status: int) -> str:
        return f"{url}: HTTP {status}, answer over the {self.max_bytes}-byte limit"

    def _late(self, url: object, status: int) -> str:
        return f"{url}: HTTP {status}, answer not complete within {self.deadline_s:.0f} s"


# The client `Links` uses through `pair()` and `send()`; tests replace it (monkeypatch) to put
# a MockTransport behind the pairing call.
default = MeshClient()


def pair(host: str, port: int, body: dict[str, Any]) -> tuple[int, Any]:
    return default.pair(host, port, body)


def send(
    our_ip: ipaddress.IPv4Address,
    their_ip: ipaddress.IPv4Address,
    port: int,
    kind: str,
    envelope: dict[str, Any],
) -> tuple[int, Any]:
    return default.send(our_ip, their_ip, port, kind, envelope)
