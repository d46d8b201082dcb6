"""Admin routes: devices, services, status, reconcile. Served on the root-only unix socket; the
web listener (with login) mounts the same router. Handlers only call `Control`; bodies and
answers are the typed models of `picell.api.models`, so the OpenAPI schema says what is
accepted and what comes back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import segno
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from picell.api.models import (
    NAME_MAX,
    NAME_PATTERN,
    EndpointSet,
    KeysRotated,
    PeerCreate,
    PeerCreated,
    PeerLive,
    ReportOut,
    RouteVia,
    RouteViaOut,
    ServiceCreate,
    ServiceOut,
    StatusOut,
)
from picell.control import Control
from picell.doctor import Doctor, DoctorAsk
from picell.mesh.exits import Exits
from picell.mesh.rekey import Rekey, rotation_status
from picell.store import cell as cell_table

Name = Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX)]


def get_control(request: Request) -> Control:
    control: Control = request.app.state.control
    return control


Ctl = Annotated[Control, Depends(get_control)]
router = APIRouter(prefix="/api")


@router.get("/status", response_model=StatusOut)
def status(ctl: Ctl, request: Request) -> dict[str, Any]:
    data = ctl.status()
    data["rejected_messages"] = dict(request.app.state.links.rejected)
    if ctl.reconciler is not None:
        data["applied"] = dict(ctl.reconciler.applied)
    sender = getattr(request.app.state, "sender", None)
    data["pushes_sent"] = sender.pushes if sender is not None else 0
    with ctl.store.read() as conn:
        data["key_rotation"] = rotation_status(conn)
        data["restored_at"] = cell_table.load(conn).restored_at
    return data


@router.post("/cell/keys/rotate", response_model=KeysRotated)
def rotate_keys(request: Request) -> dict[str, Any]:
    """A new cell key (`mesh.rekey`): every linked cell moves to it through its tunnel; every
    device must import its config again."""
    return Rekey(request.app.state.links).rotate()


@router.put("/cell/endpoint", response_model=StatusOut)
def set_endpoint(body: EndpointSet, ctl: Ctl, request: Request) -> dict[str, Any]:
    """Our endpoints (HOST:PORT, best first), set while the cell runs: pushed to every link at
    once; device configs exported afterwards carry the first."""
    ctl.set_endpoints(body.endpoints)
    return status(ctl, request)


@router.post("/doctor")
def doctor(body: DoctorAsk, ctl: Ctl, request: Request) -> dict[str, Any]:
    """Walk the path from a device to a service and name the first broken step (`doctor`)."""
    return Doctor(ctl, request.app.state.links).run(body)


@router.post("/reconcile", response_model=ReportOut)
def reconcile(ctl: Ctl) -> dict[str, Any]:
    report = ctl.converge()
    return report.as_dict() if report else {"changed": False, "changes": []}


@router.get("/peers", response_model=list[PeerLive])
def list_peers(ctl: Ctl) -> list[dict[str, Any]]:
    return ctl.list_peers()


@router.post("/peers", status_code=201, response_model=PeerCreated)
def add_peer(body: PeerCreate, ctl: Ctl) -> dict[str, Any]:
    info = ctl.add_peer(body.name, body.public_key)
    info["config"] = ctl.peer_config(body.name)
    return info


@router.delete("/peers/{name}", status_code=204)
def remove_peer(name: Name, ctl: Ctl) -> Response:
    ctl.remove_peer(name)
    return Response(status_code=204)


@router.put("/peers/{name}/route-via", response_model=RouteViaOut)
def route_via(name: Name, body: RouteVia, request: Request) -> dict[str, Any]:
    """Send the device's internet through a linked cell that offers its exit (null: through
    this cell). The answer carries the full-tunnel config the device must import."""
    exits: Exits = request.app.state.exits
    return exits.route_via(name, body.via_cell)


@router.get(
    "/peers/{name}/config",
    response_class=Response,
    responses={200: {"content": {m: {} for m in ("text/plain", "image/svg+xml", "image/png")}}},
)
def peer_config(
    name: Name,
    ctl: Ctl,
    format: Annotated[Literal["conf", "svg", "png", "text"], Query()] = "conf",
    tunnel: Annotated[Literal["auto", "full", "split"], Query()] = "auto",
) -> Response:
    """The device's WireGuard config as a download (.conf) or as a QR code (SVG or PNG).
    `tunnel=auto`: full tunnel when the device is routed via an exit cell, split otherwise."""
    text = ctl.peer_config(name, None if tunnel == "auto" else tunnel == "full")
    if format == "text":
        return Response(text, media_type="text/plain")
    if format == "conf":
        return Response(
            text,
            media_type="text/plain",
            headers={"Content-Disposition": f'attachment; filename="{name}.conf"'},
        )
    qr = segno.make(text, error="m")
    if format == "svg":
        return Response(image(qr, "svg"), media_type="image/svg+xml")
    return Response(image(qr, "png"), media_type="image/png")


def image(qr: segno.QRCode, kind: Literal["svg", "png"]) -> bytes:
    """A QR code as a standalone image file (an SVG with its namespace, so that browsers and
    viewers load it; `svg_inline` output only works inside an HTML page)."""
    import io

    buf = io.BytesIO()
    if kind == "svg":
        qr.save(buf, kind="svg", scale=4, xmldecl=False, light="white")
    else:
        qr.save(buf, kind="png", scale=6)
    return buf.getvalue()


@router.get("/services", response_model=list[ServiceOut])
def list_services(ctl: Ctl) -> list[dict[str, Any]]:
    return ctl.list_services()


@router.post("/services", status_code=201, response_model=ServiceOut)
def add_service(body: ServiceCreate, ctl: Ctl) -> dict[str, Any]:
    return ctl.add_service(body.name, body.backend, body.port, body.protocol)


@router.delete("/services/{name}", status_code=204)
def remove_service(name: Name, ctl: Ctl) -> Response:
    ctl.remove_service(name)
    return Response(status_code=204)
