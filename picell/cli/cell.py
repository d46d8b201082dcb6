"""`picell init | serve | status | reconcile | peers … | services …`: the cell and its devices."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from picell.api.models import PeerCreated, PeerLive, ReportOut, ServiceOut, StatusOut, dump
from picell.cli import show
from picell.cli.base import (
    CTX,
    JsonOpt,
    admin_client,
    app,
    call,
    fail,
    out,
    peers_app,
    qr_terminal,
    read,
    read_list,
    services_app,
)
from picell.errors import PicellError


@app.command()
def init(
    name: Annotated[str | None, typer.Option(help="Cell name (default: the hostname)")] = None,
    domain: Annotated[str | None, typer.Option(help="DNS domain (default: NAME.internal)")] = None,
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
    web_port: Annotated[
        int | None, typer.Option("--web-port", help="Web UI port on 127.0.0.1 (default 8080)")
    ] = None,
    admin_password_file: Annotated[
        Path | None,
        typer.Option("--admin-password-file", help="File whose first line is the web password"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create this cell (or change its settings while the daemon is stopped)."""
    from picell.api.auth import GENERATED_PASSWORD_FILE, check_password, hash_password
    from picell.cellinit import InitRequest
    from picell.control import Control
    from picell.mesh.reach import init_warning
    from picell.store import admin as admin_table
    from picell.store.db import Store
    from picell.system.run import Runner
    from picell.validate import port as check_port

    password = None
    try:
        if web_port is not None:
            check_port(web_port, "web_port")
        if admin_password_file is not None:
            try:
                lines = admin_password_file.read_text().splitlines()
            except OSError as exc:
                raise typer.BadParameter(
                    f"cannot read {admin_password_file}: {exc.strerror}"
                ) from None
            password = check_password(lines[0] if lines else "")
    except PicellError as exc:
        fail(exc.message, as_json, {"code": exc.code, "message": exc.message, "field": exc.field})

    if (CTX.data_dir / "admin.sock").exists():
        try:
            with admin_client() as http:
                http.get("/api/status")
            fail("the daemon is running: stop it before changing the cell's settings", as_json)
        except httpx.TransportError:
            pass
    CTX.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(CTX.data_dir / "picell.db")
    try:
        cell = Control(store, Runner(), None).init_cell(
            InitRequest(name, domain, address, endpoint, interface, pair_port, mesh_port, uplink)
        )
        with store.transaction() as conn:
            if web_port is not None:
                admin_table.set_web_port(conn, web_port)
            if password is not None:
                admin_table.set_password_hash(conn, hash_password(password))
                (CTX.data_dir / GENERATED_PASSWORD_FILE).unlink(missing_ok=True)
            web = admin_table.load(conn)
    except PicellError as exc:
        fail(exc.message, as_json, {"code": exc.code, "message": exc.message, "field": exc.field})
    finally:
        store.close()
    data: dict[str, Any] = {
        "name": cell.name,
        "domain": cell.domain,
        "address": str(cell.address),
        "endpoint": cell.endpoint,
        "interface": cell.interface,
        "web": f"http://127.0.0.1:{web.web_port}",
        "admin_password": "set" if web.password_hash else "generated at the next start",
    }
    warning = init_warning(cell)
    text = "\n".join(f"{k}: {v}" for k, v in data.items())
    if warning:
        data["warnings"] = [warning]
        text += f"\nwarning: {warning}"
    out(data, as_json, text)


@app.command()
def serve(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the daemon in the foreground (reconciles before it serves)."""
    from picell.app import AlreadyRunning, Daemon

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        daemon = Daemon(CTX.data_dir)
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    daemon.serve()
    # exit now: a sender job still in a request would hold interpreter exit (the pool's
    # threads are joined at exit); the daemon has already put away what it must
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """The cell's identity and health."""
    data = read(call("GET", "/api/status", as_json), StatusOut, as_json)
    out(data, as_json, show.status_text(dump(data)))


@app.command()
def endpoint(
    endpoints: Annotated[
        list[str], typer.Argument(help="HOST:PORT other cells and devices dial, best first (1-4)")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Change our endpoint while the cell runs: every linked cell learns it at once, and device
    configs exported from now on carry the first."""
    data = read(call("PUT", "/api/cell/endpoint", as_json, json={"endpoints": endpoints}),
                StatusOut, as_json)  # fmt: skip
    lines = [f"endpoint: {', '.join(data.endpoints)} (pushed to every linked cell)"]
    out(data, as_json, "\n".join(lines + show.reach_lines(dump(data))))


@app.command()
def reconcile(as_json: JsonOpt = False) -> None:
    """Converge the system to the store now, and show what changed."""
    data = read(call("POST", "/api/reconcile", as_json), ReportOut, as_json)
    human = "no change" if not data.changed else "\n".join(data.changes)
    out(data, as_json, human)


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
    body = {"name": name, "public_key": public_key}
    data = read(call("POST", "/api/peers", as_json, json=body), PeerCreated, as_json)
    if as_json:
        out(data, True, "")
        return
    print(data.config, end="")
    if qr:
        qr_terminal(data.config)


@peers_app.command("list")
def peers_list(as_json: JsonOpt = False) -> None:
    """The devices, with their address and last handshake."""
    data = read_list(call("GET", "/api/peers", as_json), PeerLive, as_json)
    out(data, as_json, show.peers_text(dump(data)))


@peers_app.command("remove")
def peers_remove(name: str, as_json: JsonOpt = False) -> None:
    """Remove a device: its access ends at once."""
    call("DELETE", f"/api/peers/{name}", as_json)
    out({"removed": name}, as_json, f"removed {name}")


@peers_app.command("config")
def peers_config(
    name: str,
    qr: Annotated[bool, typer.Option("--qr", help="Print it as a QR code")] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to FILE (.conf, .svg or .png)")
    ] = None,
    full_tunnel: Annotated[
        bool | None,
        typer.Option(
            "--full-tunnel/--split-tunnel",
            help="All traffic through the cell (default: full when routed via an exit cell)",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a device's config again (text, QR, or a file)."""
    tunnel = "auto" if full_tunnel is None else ("full" if full_tunnel else "split")
    if output is not None:
        fmt = {".svg": "svg", ".png": "png"}.get(output.suffix, "conf")
        params = {"format": fmt, "tunnel": tunnel}
        resp = call("GET", f"/api/peers/{name}/config", as_json, params=params)
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(resp.content)
        out({"written": str(output), "format": fmt}, as_json, f"wrote {output}")
        return
    params = {"format": "text", "tunnel": tunnel}
    text = call("GET", f"/api/peers/{name}/config", as_json, params=params).text
    if as_json:
        out({"name": name, "config": text}, True, "")
    elif qr:
        qr_terminal(text)
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
    data = read(call("POST", "/api/services", as_json, json=body), ServiceOut, as_json)
    out(data, as_json, f"{data.fqdn} -> {data.vip}:{data.port} ({data.backend})")


@services_app.command("list")
def services_list(as_json: JsonOpt = False) -> None:
    """The services, with their names and addresses."""
    data = read_list(call("GET", "/api/services", as_json), ServiceOut, as_json)
    out(data, as_json, show.services_text(dump(data)))


@services_app.command("remove")
def services_remove(name: str, as_json: JsonOpt = False) -> None:
    """Stop offering a service."""
    call("DELETE", f"/api/services/{name}", as_json)
    out({"removed": name}, as_json, f"removed {name}")
