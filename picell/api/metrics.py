"""`/metrics` routes: on the admin API, and the small listener on the cell's WireGuard address.

- `router` (admin API: the root-only unix socket, and the web UI behind login): `GET /metrics`
  and `POST /api/metrics/token` (`picell metrics token [--rotate]`: a token is shown once, when
  issued; only its hash is kept, so without `--rotate` an existing one is refused with a 409).
- `build_metrics_api`: the WireGuard listener (`METRICS_PORT`), serving only `GET /metrics`,
  only to our own devices' network and only with the bearer token (`scrape_refusal`). Its
  caps and request deadline are the bounded `Listener`'s (picell/api/listen.py).

Must not: build the text itself (picell/metrics.py does), or serve anything else on the
WireGuard listener.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from picell import __version__
from picell.api import errors
from picell.api.models import MetricsTokenAsk, MetricsTokenOut
from picell.constants import METRICS_PORT
from picell.errors import Conflict, Forbidden, LoginRequired
from picell.metrics import Metrics, MetricsToken, scrape_refusal

router = APIRouter()


def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


@router.get("/metrics", response_class=Response)
def metrics_text(request: Request) -> Response:
    """The cell's metrics in Prometheus' text format."""
    return Response(_metrics(request).exposition(), media_type=CONTENT_TYPE_LATEST)


@router.post("/api/metrics/token", response_model=MetricsTokenOut)
def metrics_token(request: Request, body: MetricsTokenAsk) -> dict[str, Any]:
    """Issue the token the owner's devices scrape with; `rotate` replaces the old one."""
    token: MetricsToken = request.app.state.metrics_token
    issued = token.issued_at()
    if issued is not None and not body.rotate:
        raise Conflict(
            "rotate: a metrics token was issued already and only its hash is kept, so it "
            "cannot be shown again; `picell metrics token --rotate` issues a new one (the old "
            "one stops working)",
            field="rotate",
        )
    secret = token.issue()
    cell = request.app.state.control.cell()
    return {
        "token": secret,
        "issued_at": token.issued_at() or 0.0,
        "port": METRICS_PORT,
        "url": f"http://{cell.ip}:{METRICS_PORT}/metrics",
    }


def build_metrics_api(
    metrics: Metrics, token: MetricsToken, network: ipaddress.IPv4Network
) -> FastAPI:
    """The WireGuard listener's app: `GET /metrics` for our own devices with the token."""
    app = FastAPI(title="picell metrics", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    errors.install(app)

    @app.get("/metrics")
    async def scrape(request: Request) -> Response:
        source = request.client.host if request.client else None
        refused = scrape_refusal(source, request.headers.get("authorization"), network, token)
        if refused == 403:
            raise Forbidden("source: metrics are for this cell's own devices", field="source")
        if refused == 401:
            # the exception table answers 401; the header tells a client which scheme
            resp = errors.error_response(
                LoginRequired(
                    "authorization: a valid bearer token is needed", field="authorization"
                )  # fmt: skip
            )
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        text = await run_in_threadpool(metrics.exposition)  # reads the store, connects
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app
