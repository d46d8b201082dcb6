"""`picell metrics token [--rotate]`: the bearer token the owner's own devices scrape
`http://<cell address>:<METRICS_PORT>/metrics` with. Shown once, when issued: the daemon keeps
only its hash, so a lost token is replaced with `--rotate` (the old one stops working)."""

from __future__ import annotations

from typing import Annotated

import typer

from picell.api.models import MetricsTokenOut
from picell.cli.base import JsonOpt, app, call, out, read

metrics_app = typer.Typer(no_args_is_help=True, help="The cell's Prometheus metrics")
app.add_typer(metrics_app, name="metrics")


@metrics_app.command("token")
def token(
    rotate: Annotated[
        bool, typer.Option("--rotate", help="Issue a new token; the old one stops working")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a new scrape token for /metrics on the cell's WireGuard address (shown once)."""
    resp = call("POST", "/api/metrics/token", as_json, json={"rotate": rotate})
    issued = read(resp, MetricsTokenOut, as_json)
    out(
        issued,
        as_json,
        f"{issued.token}\n"
        f"scrape {issued.url} from one of this cell's devices with the header "
        f"`Authorization: Bearer <token>`; only its hash is kept: keep it now",
    )
