"""The two listeners other cells talk to, each serving only its own routes:

- the pairing listener (`<endpoint>:<pair_port>`): only `accept-invite`, with a body size limit
  and a rate limit per source address;
- the mesh listener (`<wg address>:<mesh_port>`): only the peer-sync routes; the direct source
  address (never a forwarded-for header: uvicorn runs with proxy_headers off) is checked against
  the sending link's network before the signature; refusals are counted by `refusal_reason`.

Bodies of both are read by `read_json` (a size limit, then `loads_strict`). The connection caps
and the request deadline in front of them belong to `picell/api/listen.py`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from picell import __version__
from picell.api import errors
from picell.api.listen import source_key
from picell.api.strict_json import loads_strict
from picell.constants import MESH_BODY_MAX, PAIRING_BODY_MAX, PAIRING_RATE
from picell.errors import BadInput, RateLimited
from picell.mesh.explain import Explain
from picell.mesh.links import Links
from picell.mesh.rekey import Rekey
from picell.mesh.sync import Sync


async def read_json(request: Request, limit: int) -> Any:
    """The request's body, read up to `limit` bytes and parsed strictly (`loads_strict`)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadInput(f"body: larger than {limit} bytes", field="body")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadInput(f"body: larger than {limit} bytes", field="body")
    return loads_strict(body, max_bytes=limit)


class RateLimiter:
    """At most `count` requests per `window_s` from one source address."""

    def __init__(self, count: int, window_s: float) -> None:
        self.count, self.window_s = count, window_s
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, source: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:  # forget idle sources rather than grow without bound
                self._seen = {k: v for k, v in self._seen.items() if v and now - v[-1] < 60}
            times = self._seen.setdefault(source, deque())
            while times and now - times[0] > self.window_s:
                times.popleft()
            if len(times) >= self.count:
                raise RateLimited("too many pairing attempts from this address; wait a moment")
            times.append(now)


MESH_ROUTES = ("permissions", "unlink", "rekey", "explain")


def refusal_reason(path: str, status: int) -> str:
    """The key a refused mesh request is counted under: one of a fixed set (route x status),
    never the raw path, which a linked cell chooses (the counter grew without bound)."""
    route = path.rsplit("/", 1)[-1]
    if path != f"/api/cells/peer-sync/{route}" or route not in MESH_ROUTES:
        route = "other"
    return f"{route} {status if 400 <= status <= 599 else 'other'}"


def _source(request: Request) -> str | None:
    return request.client.host if request.client else None


def build_pairing_api(links: Links) -> FastAPI:
    app = FastAPI(title="picell pairing", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    errors.install(app)
    limiter = RateLimiter(*PAIRING_RATE)

    @app.post("/api/cells/peer-sync/accept-invite")
    async def accept_invite(request: Request) -> dict[str, Any]:
        # one host holds a whole IPv6 /64: it is one source, as for the connection gate
        limiter.check(source_key(request.client.host) if request.client else "?")
        payload = await read_json(request, PAIRING_BODY_MAX)
        result: dict[str, Any] = await run_in_threadpool(links.accept, payload)
        return result

    return app


def build_mesh_api(links: Links, sync: Sync) -> FastAPI:
    app = FastAPI(title="picell mesh", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    errors.install(app)

    @app.middleware("http")
    async def count_refusals(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        if response.status_code >= 400:
            links.rejected[refusal_reason(request.url.path, response.status_code)] += 1
        return response

    @app.post("/api/cells/peer-sync/permissions")
    async def permissions(request: Request) -> dict[str, Any]:
        payload = await read_json(request, MESH_BODY_MAX)
        result: dict[str, Any] = await run_in_threadpool(
            sync.receive_state, payload, _source(request)
        )
        return result

    @app.post("/api/cells/peer-sync/unlink")
    async def unlink(request: Request) -> JSONResponse:
        payload = await read_json(request, MESH_BODY_MAX)
        result = await run_in_threadpool(links.receive_unlink, payload, _source(request))
        # tear the tunnel down only once the answer is on its way back through it
        return JSONResponse(result, background=BackgroundTask(links.control.converge))

    rekey = Rekey(links)

    @app.post("/api/cells/peer-sync/rekey")
    async def rekey_route(request: Request) -> JSONResponse:
        payload = await read_json(request, MESH_BODY_MAX)
        result = await run_in_threadpool(rekey.receive, payload, _source(request))
        # move the WireGuard peer only once the answer is on its way back through the old one
        return JSONResponse(result, background=BackgroundTask(links.control.converge))

    explain = Explain(links)

    @app.post("/api/cells/peer-sync/explain")
    async def explain_route(request: Request) -> dict[str, Any]:
        """May the asking cell use one of our services (`mesh.explain`)? Changes no grant."""
        payload = await read_json(request, MESH_BODY_MAX)
        result: dict[str, Any] = await run_in_threadpool(explain.receive, payload, _source(request))
        return result

    return app
