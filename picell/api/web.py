"""The web UI's pages (DESIGN §9): login, Cell Network, Devices, Services. Server-rendered with
Jinja2 from `picell/web/templates`; plain HTML forms that work without JavaScript.

Handlers call the same `Control`, `Links`, `Sync` and `Exits` objects as the admin API
(`request.app.state.*`), so a change from a page is the same commit + converge. A refused change
re-renders its form with the message next to the field the error names. Must not run system
commands, check sessions or CSRF tokens (`picell.api.auth` does, before any handler), nor build
error responses for `/api/...` (the error table does).
"""

from __future__ import annotations

import hmac
import json
import secrets
from functools import partial
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from picell import validate
from picell.api import auth, webshares
from picell.api.cells import create_invite, list_invites
from picell.api.webrender import (
    WEB_DIR,
    FormError,
    back,
    flash,
    page,
    read_form,
    refused_page,
    state,
    templates,
)
from picell.constants import DEFAULT_INVITE_TTL_S
from picell.control import Control
from picell.errors import BadInput, CsrfRefused, PicellError
from picell.mesh.exits import Exits
from picell.mesh.links import Links
from picell.mesh.rekey import Rekey, rotation_status
from picell.store import invites as invite_table


# -- login -------------------------------------------------------------------------------------
async def login_form(request: Request, error: FormError | None = None) -> Response:
    if error is None and state(request, "auth").session(request.cookies.get(auth.COOKIE)):
        return back("/cells")
    token = request.cookies.get(auth.LOGIN_COOKIE) or secrets.token_urlsafe(24)
    response = templates.TemplateResponse(
        request,
        "login.html",
        {"cell": None, "csrf": "", "flash": [], "login_token": token,
         "err": (lambda form, field: error.on(form, field)) if error else (lambda *_: None)},
        status_code=error.status if error else 200,
    )  # fmt: skip
    auth.set_session_cookie(response, auth.LOGIN_COOKIE, token, max_age=3600)
    return response


async def login(request: Request) -> Response:
    form = await read_form(request)
    expected = request.cookies.get(auth.LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, str(form.get("login_token", ""))):
        return await refused_page(
            request,
            CsrfRefused("login_token: the login form expired; reload it and try again"),
        )
    state(request, "auth").logout(request.cookies.get(auth.COOKIE))  # never reuse a session id
    try:
        # awaits its turn after failed logins (never a refusal), holding no thread meanwhile
        token, _ = await state(request, "auth").login(str(form.get("password", "")))
    except PicellError as exc:
        return await login_form(request, FormError("login", exc, ("password",)))
    response = back("/cells")
    auth.set_session_cookie(response, auth.COOKIE, token, max_age=None)
    response.delete_cookie(auth.LOGIN_COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def logout(request: Request) -> Response:
    state(request, "auth").logout(getattr(request.state, "session_token", None))
    response = back("/login")
    response.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="strict")
    return response


# -- Cell Network ------------------------------------------------------------------------------
def _invite_view(links: Links) -> dict[str, Any]:
    """The same answer as `POST /api/cells/invites`, shown once: the token is not kept."""
    created = create_invite(links, links.control.store, DEFAULT_INVITE_TTL_S)
    return {
        "id": created.id,
        "json": json.dumps(created.invite.model_dump(mode="json"), indent=2),
        "string": created.string,
        "qr": created.svg,
        "expires_at": created.expires_at,
    }


def _cells_context(links: Links) -> dict[str, Any]:
    overview = links.overview()
    return {
        "links": overview,
        "reach": links.control.reachability(),
        "host_firewall": links.control.host_firewall(),
        "invites": [i for i in list_invites(links.control.store) if i.state == "open"],
        "services": links.control.list_services(),
        "journals": {c["name"]: links.journal_entries(c["name"])[-30:] for c in overview},
        "rotation": _rotation(links),
    }


def _rotation(links: Links) -> dict[str, Any]:
    with links.control.store.read() as conn:
        return rotation_status(conn)


async def rotate_keys(request: Request) -> Response:
    """`picell keys rotate` from the page (behind login and CSRF, with a confirmation)."""
    await read_form(request)
    links: Links = state(request, "links")
    try:
        done = await run_in_threadpool(Rekey(links).rotate)
    except PicellError as exc:
        err = FormError("rotate", exc, ())
        return await cells_page(request, err.status, error=err)
    if done["switched"]:
        devices = ", ".join(done["devices"]) or "none"
        flash(request, f"New cell key: linked cells moved to it; every device must import its"
                       f" config again ({devices})")  # fmt: skip
    else:
        flash(request, "Key rotation in flight: waiting for " + ", ".join(done["pending"]))
    return back("/cells")


async def cells_page(request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
    links: Links = state(request, "links")
    data = await run_in_threadpool(_cells_context, links)
    return await page(request, "cells.html", status_code, nav="cells", **data, **context)


async def make_invite(request: Request) -> Response:
    links: Links = state(request, "links")
    invite = await run_in_threadpool(_invite_view, links)
    return await cells_page(request, invite=invite)


async def revoke_invite(request: Request) -> Response:
    links: Links = state(request, "links")
    raw = request.path_params["invite_id"]
    try:
        if not raw.isdigit() or len(raw) > 15:
            raise BadInput(f"id: {raw[:20]!r} is not an invite number", field="id")

        def revoke() -> None:
            with links.control.store.transaction() as conn:
                invite_table.revoke(conn, int(raw))

        await run_in_threadpool(revoke)
    except PicellError as exc:
        err = FormError(f"revoke-{raw[:20]}", exc, ())
        return await cells_page(request, err.status, error=err)
    flash(request, f"Revoked invite {raw}: it can no longer be used")
    return back("/cells")


async def connect(request: Request) -> Response:
    form = await read_form(request)
    links: Links = state(request, "links")
    text = str(form.get("invite", "")).strip()
    try:
        if not text:
            raise BadInput("invite: paste the other cell's invite here", field="invite")
        trusted = form.get("trust_domain") == "on"  # the owner's word for a public domain
        via = str(form.get("via", "")).strip() or None  # a linked cell relaying for us
        link = await run_in_threadpool(partial(links.connect, text, trust_domain=trusted, via=via))
    except PicellError as exc:
        err = FormError("connect", exc, ("invite", "via"))
        return await cells_page(request, err.status, error=err, form=form)
    if link["state"] == "waiting":
        flash(request, f"Saved {link['name']}: waiting for the other cell to import our invite")
    else:
        flash(request, f"Linked with {link['name']}")
    return back("/cells")


async def set_endpoint(request: Request) -> Response:
    form = await read_form(request)
    ctl: Control = state(request, "control")
    wanted = str(form.get("endpoints", "")).replace(",", " ").split()
    try:
        await run_in_threadpool(ctl.set_endpoints, wanted)
    except PicellError as exc:
        err = FormError("endpoint", exc, ("endpoints",))
        return await cells_page(request, err.status, error=err, form=form)
    flash(request, f"Our endpoint is now {', '.join(wanted)}: every linked cell is told")
    return back("/cells")


async def disconnect(request: Request) -> Response:
    name = request.path_params["name"]
    links: Links = state(request, "links")
    try:
        await run_in_threadpool(links.disconnect, name)
    except PicellError as exc:
        err = FormError(f"disconnect-{name}", exc, ())
        return await cells_page(request, err.status, error=err)
    flash(request, f"Disconnected {name}; it is told to remove its side too")
    return back("/cells")


# -- Devices -----------------------------------------------------------------------------------
def _devices_context(links: Links) -> dict[str, Any]:
    return {
        "peers": links.control.list_peers(),
        "links": links.overview(),
        "reach": links.control.reachability(),
        "host_firewall": links.control.host_firewall(),
    }


async def devices_page(request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
    data = await run_in_threadpool(_devices_context, state(request, "links"))
    return await page(request, "devices.html", status_code, nav="devices", **data, **context)


async def add_device(request: Request) -> Response:
    form = await read_form(request)
    ctl: Control = state(request, "control")
    name = str(form.get("name", "")).strip()
    key = str(form.get("public_key", "")).strip() or None
    try:
        await run_in_threadpool(ctl.add_peer, name, key)
    except PicellError as exc:
        err = FormError("add", exc, ("name", "public_key"))
        return await devices_page(request, err.status, error=err, form=form)
    flash(request, f"Added {name}: import its config or scan its QR code on the device")
    return back(f"/devices/{name}")


async def device_page(request: Request) -> Response:
    name = request.path_params["name"]
    ctl: Control = state(request, "control")
    try:
        validate.name(name)
        peers = await run_in_threadpool(ctl.list_peers)
        peer = next(p for p in peers if p["name"] == name)
        config = await run_in_threadpool(ctl.peer_config, name)
    except (PicellError, StopIteration):
        flash(request, f"No device named {name}")
        return back("/devices")
    return await page(request, "device.html", nav="devices", peer=peer, config=config)


async def remove_device(request: Request) -> Response:
    name = request.path_params["name"]
    ctl: Control = state(request, "control")
    try:
        await run_in_threadpool(ctl.remove_peer, name)
    except PicellError as exc:
        err = FormError(f"remove-{name}", exc, ())
        return await devices_page(request, err.status, error=err)
    flash(request, f"Removed {name}: its access ended")
    return back("/devices")


async def route_via(request: Request) -> Response:
    """The device's internet exit: this cell, or a linked cell that offers its exit."""
    name = request.path_params["name"]
    form = await read_form(request)
    exits: Exits = state(request, "exits")
    via = str(form.get("via_cell", "")).strip() or None
    try:
        result = await run_in_threadpool(exits.route_via, name, via)
    except PicellError as exc:
        err = FormError(f"exit-{name}", exc, ("via_cell",), {"cell": "via_cell"})
        return await devices_page(request, err.status, error=err)
    flash(request, result["message"])
    return back(f"/devices/{name}")


# -- Services ----------------------------------------------------------------------------------
def _services_context(links: Links) -> dict[str, Any]:
    shared: dict[str, list[str]] = {}
    for link in links.overview():
        for svc in link["inbound"]:
            shared.setdefault(svc["name"], []).append(link["name"])
    return {"services": links.control.list_services(), "shared": shared}


async def services_page(request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
    data = await run_in_threadpool(_services_context, state(request, "links"))
    return await page(request, "services.html", status_code, nav="services", **data, **context)


async def add_service(request: Request) -> Response:
    form = await read_form(request)
    ctl: Control = state(request, "control")
    name = str(form.get("name", "")).strip()
    port_text = str(form.get("port", "")).strip()
    protocol = str(form.get("protocol", "tcp"))
    try:
        port = validate.port(port_text, "port") if port_text else None
        await run_in_threadpool(
            ctl.add_service, name, str(form.get("backend", "")).strip(), port, protocol
        )
    except PicellError as exc:
        err = FormError("add", exc, ("name", "backend", "port", "protocol"))
        return await services_page(request, err.status, error=err, form=form)
    flash(request, f"Added service {name}")
    return back("/services")


async def remove_service(request: Request) -> Response:
    name = request.path_params["name"]
    ctl: Control = state(request, "control")
    try:
        await run_in_threadpool(ctl.remove_service, name)
    except PicellError as exc:
        err = FormError(f"remove-{name}", exc, ())
        return await services_page(request, err.status, error=err)
    flash(request, f"Removed service {name}")
    return back("/services")


async def home(_: Request) -> Response:
    return back("/cells")


def install(app: FastAPI, auth_: auth.Auth) -> None:
    """Add the pages to `app` (the admin API built for the web listener) and put it all
    behind login."""
    app.mount("/static", StaticFiles(directory=str(WEB_DIR / "static")), name="static")
    get, post = ("GET",), ("POST",)
    routes: list[tuple[str, Any, tuple[str, ...]]] = [
        ("/", home, get),
        ("/login", login_form, get),
        ("/login", login, post),
        ("/logout", logout, post),
        ("/cells", cells_page, get),
        ("/cells/invite", make_invite, post),
        ("/cells/invites/{invite_id}/revoke", revoke_invite, post),
        ("/cells/connect", connect, post),
        ("/cells/endpoint", set_endpoint, post),
        ("/cells/keys/rotate", rotate_keys, post),
        ("/cells/{name}/sharing", webshares.set_sharing, post),
        ("/cells/{name}/device-share", webshares.share_device, post),
        ("/cells/{name}/unshare", webshares.end_share, post),
        ("/cells/{name}/publish-devices", webshares.publish_devices, post),
        ("/cells/{name}/exit-offer", webshares.set_exit_offer, post),
        ("/cells/{name}/relay-offer", webshares.set_relay_offer, post),
        ("/cells/{name}/disconnect", disconnect, post),
        ("/devices", devices_page, get),
        ("/devices", add_device, post),
        ("/devices/{name}", device_page, get),
        ("/devices/{name}/remove", remove_device, post),
        ("/devices/{name}/route-via", route_via, post),
        ("/services", services_page, get),
        ("/services", add_service, post),
        ("/services/{name}/remove", remove_service, post),
    ]
    for path, endpoint, methods in routes:
        app.add_route(path, endpoint, methods=list(methods), include_in_schema=False)
    auth.install(app, auth_, refused_page)
