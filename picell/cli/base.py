"""What every `picell` command shares: the Typer app, global options, the admin-socket client,
output and exit codes (DESIGN §9 is the contract: keep the words and options exactly).

Human output by default, `--json` on every command. Exit 0 on success, 1 on a refused request (the
API's message printed), 2 on bad usage. Everything but `init` and `serve` talks to the daemon's
admin API over its unix socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer
from pydantic import BaseModel, TypeAdapter, ValidationError

from picell.cli import show
from picell.constants import DEFAULT_DATA_DIR

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Personal Internet Cell")
peers_app = typer.Typer(no_args_is_help=True, help="The owner's devices")
services_app = typer.Typer(no_args_is_help=True, help="Services the cell offers")
app.add_typer(peers_app, name="peers")
app.add_typer(services_app, name="services")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


class Ctx:
    data_dir: Path = Path(DEFAULT_DATA_DIR)


CTX = Ctx()


@app.callback()
def main_options(
    data_dir: Annotated[
        Path,
        typer.Option("--data-dir", envvar="PICELL_DATA_DIR", help="Store, configs and sockets"),
    ] = Path(DEFAULT_DATA_DIR),
) -> None:
    CTX.data_dir = data_dir


def fail(message: str, as_json: bool, body: Any = None) -> NoReturn:
    show.error(message, as_json, body)
    raise typer.Exit(1)


def admin_client() -> httpx.Client:
    sock = CTX.data_dir / "admin.sock"
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://picell", timeout=60
    )


def call(method: str, path: str, as_json: bool, **kwargs: Any) -> httpx.Response:
    try:
        with admin_client() as client:
            resp = client.request(method, path, **kwargs)
    except (httpx.ConnectError, httpx.TransportError, FileNotFoundError):
        fail(show.not_running(CTX.data_dir / "admin.sock"), as_json)
    if resp.status_code >= 400:
        message, body = show.refusal(resp.content)
        fail(message, as_json, body)
    return resp


M = TypeVar("M", bound=BaseModel)


def read(resp: httpx.Response, model: type[M], as_json: bool) -> M:
    """The daemon's answer as the API's own answer model (`picell.api.models`)."""
    try:
        return model.model_validate_json(resp.content)
    except ValidationError as exc:
        fail(f"unexpected answer from the daemon: {exc.errors()[0]['msg']}", as_json)


def read_list(resp: httpx.Response, model: type[M], as_json: bool) -> list[M]:
    try:
        return TypeAdapter(list[model]).validate_json(resp.content)  # type: ignore[valid-type]
    except ValidationError as exc:
        fail(f"unexpected answer from the daemon: {exc.errors()[0]['msg']}", as_json)


def out(data: Any, as_json: bool, human: str) -> None:
    """Print `human`, or with --json the answer itself (a model, a list of them, or a dict)."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    elif isinstance(data, list):
        data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
    show.emit(data, as_json, human)


def qr_terminal(text: str) -> None:
    import segno

    segno.make(text, error="m").terminal(compact=True)
