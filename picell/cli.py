"""The `picell` command (DESIGN §9 is its contract: keep the words and options exactly).

Human output by default, `--json` on every command. Exit 0 on success, 1 on a refused request (the
API's message printed), 2 on bad usage. Everything but `init` and `serve` talks to the daemon's
admin API over its unix socket.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

from picell.constants import DEFAULT_DATA_DIR
from picell.errors import PicellError

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


def _fail(message: str, as_json: bool, body: Any = None) -> NoReturn:
    if as_json:
        print(json.dumps(body or {"code": "error", "message": message, "field": None}))
    else:
        print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _client() -> httpx.Client:
    sock = CTX.data_dir / "admin.sock"
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://picell", timeout=60
    )


def call(method: str, path: str, as_json: bool, **kwargs: Any) -> httpx.Response:
    try:
        with _client() as client:
            resp = client.request(method, path, **kwargs)
    except (httpx.ConnectError, httpx.TransportError, FileNotFoundError):
        _fail(
            f"the picell daemon is not running (no answer on {CTX.data_dir / 'admin.sock'}); "
            "start it with `picell serve`",
            as_json,
        )
    if resp.status_code >= 400:
        try:
            body = resp.json()
            message = body.get("message") or str(body)
        except ValueError:
            body, message = None, resp.text
        _fail(message, as_json, body)
    return resp


def _out(data: Any, as_json: bool, human: str) -> None:
    print(json.dumps(data, indent=2) if as_json else human)


@app.command()
def init(
    name: Annotated[str | None, typer.Option(help="Cell name (default: the hostname)")] = None,
    domain: Annotated[str | None, typer.Option(help="DNS domain (default: NAME.cell)")] = None,
    address: Annotated[
        str | None, typer.Option(help="Cell address and VPN network, e.g. 10.0.0.1/24")
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Public HOST:PORT that devices and cells dial")
    ] = None,
    interface: Annotated[str | None, typer.Option(help="WireGuard interface name")] = None,
    pair_port: Annotated[int | None, typer.Option("--pair-port")] = None,
    mesh_port: Annotated[int | None, typer.Option("--mesh-port")] = None,
    uplink: Annotated[str | None, typer.Option(help="Internet-facing interface")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create this cell (or change its settings while the daemon is stopped)."""
    from picell.control import Control, InitRequest
    from picell.store.db import Store
    from picell.system.run import Runner

    if (CTX.data_dir / "admin.sock").exists():
        try:
            with _client() as client:
                client.get("/api/status")
            _fail("the daemon is running: stop it before changing the cell's settings", as_json)
        except httpx.TransportError:
            pass
    CTX.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(CTX.data_dir / "picell.db")
    try:
        cell = Control(store, Runner(), None).init_cell(
            InitRequest(name, domain, address, endpoint, interface, pair_port, mesh_port, uplink)
        )
    except PicellError as exc:
        _fail(exc.message, as_json, {"code": exc.code, "message": exc.message, "field": exc.field})
    finally:
        store.close()
    data = {
        "name": cell.name,
        "domain": cell.domain,
        "address": str(cell.address),
        "endpoint": cell.endpoint,
        "interface": cell.interface,
    }
    _out(data, as_json, "\n".join(f"{k}: {v}" for k, v in data.items()))


@app.command()
def serve(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the daemon in the foreground (reconciles before it serves)."""
    from picell.app import Daemon

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    Daemon(CTX.data_dir).serve()


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """The cell's identity and health."""
    data = call("GET", "/api/status", as_json).json()
    keys = ("name", "domain", "address", "endpoint", "interface", "public_key", "dns")
    lines = [f"{k}: {data[k]}" for k in keys]
    lines.append(f"devices: {data['devices']}  services: {data['services']}")
    lines.append(f"dns running: {'yes' if data['dns_running'] else 'NO'}")
    if data.get("last_error"):
        lines.append(f"last error: {data['last_error']}")
    _out(data, as_json, "\n".join(lines))


@app.command()
def reconcile(as_json: JsonOpt = False) -> None:
    """Converge the system to the store now, and show what changed."""
    data = call("POST", "/api/reconcile", as_json).json()
    human = "no change" if not data["changed"] else "\n".join(data["changes"])
    _out(data, as_json, human)


def _qr_terminal(text: str) -> None:
    import segno

    segno.make(text, error="m").terminal(compact=True)


@peers_app.command("add")
def peers_add(
    name: str,
    public_key: Annotated[
        str | None, typer.Option("--public-key", help="The device's own public key")
    ] = None,
    qr: Annotated[bool, typer.Option("--qr", help="Also print the config as a QR code")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add a device and print its WireGuard config."""
    data = call("POST", "/api/peers", as_json, json={"name": name, "public_key": public_key}).json()
    if as_json:
        _out(data, True, "")
        return
    print(data["config"], end="")
    if qr:
        _qr_terminal(data["config"])


@peers_app.command("list")
def peers_list(as_json: JsonOpt = False) -> None:
    """The devices, with their address and last handshake."""
    data = call("GET", "/api/peers", as_json).json()
    rows = [
        f"{p['name']:<20} {p['address']:<16} "
        f"{'never' if p['handshake_age_s'] is None else str(p['handshake_age_s']) + 's ago':<12} "
        f"rx {p['rx_bytes']} tx {p['tx_bytes']}"
        for p in data
    ]
    _out(data, as_json, "\n".join(rows) or "no devices")


@peers_app.command("remove")
def peers_remove(name: str, as_json: JsonOpt = False) -> None:
    """Remove a device: its access ends at once."""
    call("DELETE", f"/api/peers/{name}", as_json)
    _out({"removed": name}, as_json, f"removed {name}")


@peers_app.command("config")
def peers_config(
    name: str,
    qr: Annotated[bool, typer.Option("--qr", help="Print it as a QR code")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to FILE (.conf, .svg or .png)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a device's config again (text, QR, or a file)."""
    if output is not None:
        fmt = {".svg": "svg", ".png": "png"}.get(output.suffix, "conf")
        resp = call("GET", f"/api/peers/{name}/config", as_json, params={"format": fmt})
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(resp.content)
        _out({"written": str(output), "format": fmt}, as_json, f"wrote {output}")
        return
    text = call("GET", f"/api/peers/{name}/config", as_json, params={"format": "text"}).text
    if as_json:
        _out({"name": name, "config": text}, True, "")
    elif qr:
        _qr_terminal(text)
    else:
        print(text, end="")


@services_app.command("add")
def services_add(
    name: str,
    backend: Annotated[str, typer.Option(help="HOST:PORT that serves it")],
    port: Annotated[int | None, typer.Option(help="Port on the service address")] = None,
    protocol: Annotated[str, typer.Option(help="tcp or udp")] = "tcp",
    as_json: JsonOpt = False,
) -> None:
    """Offer a service on its own virtual IP and name."""
    body = {"name": name, "backend": backend, "port": port, "protocol": protocol}
    data = call("POST", "/api/services", as_json, json=body).json()
    _out(data, as_json, f"{data['fqdn']} -> {data['vip']}:{data['port']} ({data['backend']})")


@services_app.command("list")
def services_list(as_json: JsonOpt = False) -> None:
    """The services, with their names and addresses."""
    data = call("GET", "/api/services", as_json).json()
    rows = [
        f"{s['name']:<20} {s['vip']}:{s['port']}/{s['protocol']:<4} -> {s['backend']}" for s in data
    ]
    _out(data, as_json, "\n".join(rows) or "no services")


@services_app.command("remove")
def services_remove(name: str, as_json: JsonOpt = False) -> None:
    """Stop offering a service."""
    call("DELETE", f"/api/services/{name}", as_json)
    _out({"removed": name}, as_json, f"removed {name}")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use e.g. 3600, 30m, 24h or 7d") from None


@app.command()
def invite(
    qr: Annotated[bool, typer.Option("--qr", help="Also print it as a QR code")] = False,
    expires: Annotated[str, typer.Option(help="Token lifetime: 3600, 30m, 24h, 7d")] = "24h",
    as_json: JsonOpt = False,
) -> None:
    """Print a fresh invite for another cell (single use; only its hash is kept)."""
    data = call("GET", "/api/cells/invite", as_json, params={"expires": _duration(expires)}).json()
    if as_json:
        _out(data, True, "")
        return
    print(json.dumps(data["invite"], indent=2))
    print()
    print("Copy-paste string (give it to the other cell's owner: picell connect STRING):")
    print(data["string"])
    if qr:
        _qr_terminal(data["string"])


def _show_link(c: dict[str, Any]) -> str:
    hs = "never" if c["handshake_age_s"] is None else f"{c['handshake_age_s']}s ago"
    state = c["state"]
    if state == "linked":
        state = "linked, online" if c["online"] else "linked, offline"
    lines = [
        f"{c['name']}  [{state}]  {c['domain']}  {c['vpn_subnet']}  via {c['endpoint']}",
        f"  handshake {hs}  rx {c['rx_bytes']} tx {c['tx_bytes']}",
        f"  authentication string: {c['auth_string']} (compare it with {c['name']}'s owner)",
    ]

    def services(items: list[Any]) -> str:
        return ", ".join(
            f"{s['name']} ({s['vip']}:{','.join(map(str, s['ports']))})" if isinstance(s, dict)
            and "vip" in s else str(s.get("name") if isinstance(s, dict) else s)
            for s in items
        ) or "nothing"  # fmt: skip

    lines.append(f"  we share: {services(c['inbound'])}")
    lines.append(f"  they share: {services(c['outbound'])}")
    if c.get("last_push_at"):
        when = time.strftime("%H:%M:%S", time.localtime(c["last_push_at"]))
        lines.append(f"  last push: {c['last_push_status']} at {when}")
    if c.get("last_remote_update_at"):
        when = time.strftime("%H:%M:%S", time.localtime(c["last_remote_update_at"]))
        lines.append(f"  they last told us their state at {when}")
    if c.get("last_push_error"):
        lines.append(f"  {c['last_push_error']}")
    if c.get("pending_message"):
        err = f": {c['pending_error']}" if c.get("pending_error") else ""
        lines.append(f"  telling {c['name']}: {c['pending_message']} pending{err}")
    return "\n".join(lines)


@app.command()
def connect(
    invite: Annotated[str, typer.Argument(help="The other cell's invite string, or @FILE")],
    as_json: JsonOpt = False,
) -> None:
    """Link with another cell by importing its invite."""
    if invite.startswith("@"):
        try:
            invite = Path(invite[1:]).read_text()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {invite[1:]}: {exc.strerror}") from None
    data = call("POST", "/api/cells", as_json, json={"invite": invite}).json()
    _out(data, as_json, _show_link(data))


@app.command()
def share(
    cell: Annotated[str, typer.Argument(help="The linked cell")],
    service: Annotated[str, typer.Argument(help="One of this cell's services")],
    as_json: JsonOpt = False,
) -> None:
    """Let a linked cell's network use one of our services (by name and address)."""
    data = call("POST", f"/api/cells/{cell}/shares/{service}", as_json).json()
    _out(data, as_json, _show_link(data))


@app.command()
def unshare(
    cell: Annotated[str, typer.Argument(help="The linked cell")],
    service: Annotated[str, typer.Argument(help="A service shared with it")],
    as_json: JsonOpt = False,
) -> None:
    """Stop sharing a service with a linked cell; its open connections stop too."""
    data = call("DELETE", f"/api/cells/{cell}/shares/{service}", as_json).json()
    _out(data, as_json, _show_link(data))


@app.command()
def disconnect(
    cell: Annotated[str, typer.Argument(help="The linked cell's name")], as_json: JsonOpt = False
) -> None:
    """End the link with a cell; the other cell is told and removes its side too."""
    call("DELETE", f"/api/cells/{cell}", as_json)
    _out({"disconnected": cell}, as_json, f"disconnected {cell}; telling it to remove its side")


def _cells(journal: str | None, as_json: bool) -> None:
    if journal is not None:
        entries = call("GET", "/api/cells/journal", as_json, params={"cell": journal}).json()
        rows = [
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['at']))}  {e['event']}"
            f"  by {e['actor']}" + (f"  ({e['detail']})" if e["detail"] else "")
            for e in entries
        ]
        _out(entries, as_json, "\n".join(rows) or f"no journal entries for {journal}")
        return
    data = call("GET", "/api/cells", as_json).json()
    _out(data, as_json, "\n".join(_show_link(c) for c in data) or "no linked cells")


JournalOpt = Annotated[
    str | None, typer.Option("--journal", help="Show the journal of link events with CELL")
]


@app.command("cells")
def cells_cmd(
    action: Annotated[str | None, typer.Argument(help="list (the default)")] = None,
    journal: JournalOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Linked cells with their state, handshake, traffic and authentication string."""
    if action not in (None, "list"):
        raise typer.BadParameter(f"unknown action {action!r}; use `picell cells [list]`")
    _cells(journal, as_json)


@app.command("import-links")
def import_links(
    file: Annotated[Path, typer.Argument(help="The seed system's cell_links.json")],
    as_json: JsonOpt = False,
) -> None:
    """Import links from the seed system's cell_links.json."""
    try:
        content = file.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {file}: {exc.strerror}") from None
    data = call("POST", "/api/cells/import", as_json, json={"content": content}).json()
    human = "\n".join(
        f"imported {i['name']}"
        + (f" (unknown fields kept in the journal: {', '.join(i['unknown_fields'])})"
           if i["unknown_fields"] else "")
        for i in data["imported"]
    ) or "nothing to import"  # fmt: skip
    _out(data, as_json, human)


def main() -> None:
    app()
