"""The web UI's pages (DESIGN §9): login, Cell Network, Devices, Services. Server-rendered with
Jinja2 from `picell/web/templates`; plain HTML forms that work without JavaScript.

Handlers call the same `Control`, `Links` and `Sync` objects as the admin API
(`request.app.state.*`), so a change from a page is the same commit + converge. A refused change
re-renders its form with the message next to the field the error names. Must not run system
commands, check sessions or CSRF tokens (`picell.api.auth` does, before any handler), nor build
error responses for `/api/...` (the error table does).
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

import segno
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from picell import validate
from picell.api import auth
from picell.api.errors import status_of
from picell.constants import DEFAULT_INVITE_TTL_S
from picell.control import Control
from picell.errors import BadInput, CsrfRefused, PicellError
from picell.mesh.links import Links
from picell.mesh.sync import Sync

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
templates = Jinja2Templates(directory=str(WEB_DIR / "templates"))


# -- words for numbers -------------------------------------------------------------------------
def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(seconds)
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago" if s < 172800 else f"{s // 86400} days ago"


def _bytes(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


templates.env.filters["age"] = _age
templates.env.filters["bytes"] = _bytes
templates.env.filters["when"] = _when


# -- rendering ---------------------------------------------------------------------------------
class FormError:
    """A refused change as a form shows it: the message next to the field it names."""

    def __init__(self, form: str, exc: PicellError, fields: tuple[str, ...]) -> None:
        self.form = form
        self.status = status_of(exc)
        name = (exc.field or "").split(".")[0].split("[")[0]
        self.field = name if name in fields else "_form"
        message = exc.message
        if exc.field and message.startswith(f"{exc.field}: "):
            message = message[len(exc.field) + 2 :]
        self.message = message[:1].upper() + message[1:]

    def on(self, form: str, field: str) -> str | None:
        return self.message if (self.form, self.field) == (form, field) else None


def _state(request: Request, name: str) -> Any:
    return getattr(request.app.state, name)


async def page(
    request: Request,
    template: str,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    ctl: Control = _state(request, "control")
    session: auth.Session | None = getattr(request.state, "session", None)
    flash = list(session.flash) if session else []
    if session and not request.headers.get("x-live"):  # a live refresh leaves them for the page
        session.flash.clear()
    cell = await run_in_threadpool(ctl.cell) if session else None
    error: FormError | None = context.pop("error", None)
    context.setdefault("form", {})
    return templates.TemplateResponse(
        request,
        template,
        {
            "cell": cell,
            "csrf": session.csrf if session else "",
            "flash": flash,
            "error": error,
            "err": (lambda form, field: error.on(form, field)) if error else (lambda *_: None),
            **context,
        },
        status_code=status_code,
    )


def _flash(request: Request, message: str) -> None:
    session: auth.Session | None = getattr(request.state, "session", None)
    if session is not None:
        session.flash.append(message)


def _back(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


async def _form(request: Request) -> dict[str, Any]:
    form = await request.form()
    out: dict[str, Any] = {}
    for key in form:
        values = [v for v in form.getlist(key) if isinstance(v, str)]
        out[key] = values if len(values) > 1 or key == "services" else (values[0] if values else "")
    return out


async def refused_page(request: Request, exc: PicellError) -> Response:
    """A refusal of the guard (CSRF, host) shown to a browser."""
    message = FormError("", exc, ()).message
    return templates.TemplateResponse(
        request,
        "refused.html",
        {"cell": None, "csrf": "", "flash": [], "message": message, "code": exc.code},
        status_code=status_of(exc),
    )


# -- login -------------------------------------------------------------------------------------
async def login_form(request: Request, error: FormError | None = None) -> Response:
    if error is None and _state(request, "auth").session(request.cookies.get(auth.COOKIE)):
        return _back("/cells")
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
    form = await _form(request)
    expected = request.cookies.get(auth.LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, str(form.get("login_token", ""))):
        return await refused_page(
            request,
            CsrfRefused("login_token: the login form expired; reload it and try again"),
        )
    source = request.client.host if request.client else "?"
    try:
        token, _ = await run_in_threadpool(
            _state(request, "auth").login, source, str(form.get("password", ""))
        )
    except PicellError as exc:
        return await login_form(request, FormError("login", exc, ("password",)))
    response = _back("/cells")
    auth.set_session_cookie(response, auth.COOKIE, token, max_age=None)
    response.delete_cookie(auth.LOGIN_COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def logout(request: Request) -> Response:
    _state(request, "auth").logout(getattr(request.state, "session_token", None))
    response = _back("/login")
    response.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="strict")
    return response


# -- Cell Network ------------------------------------------------------------------------------
def _invite_view(links: Links) -> dict[str, Any]:
    inv = links.invite(DEFAULT_INVITE_TTL_S)
    text = inv.encode()
    return {
        "json": json.dumps(inv.as_dict(), indent=2),
        "string": text,
        "qr": segno.make(text, error="m").svg_inline(scale=3, light="white"),
        "expires_at": inv.pairing.expires_at if inv.pairing else None,
    }


def _cells_context(links: Links) -> dict[str, Any]:
    overview = links.overview()
    return {
        "links": overview,
        "services": links.control.list_services(),
        "journals": {c["name"]: links.journal_entries(c["name"])[-30:] for c in overview},
    }


async def cells_page(request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
    links: Links = _state(request, "links")
    data = await run_in_threadpool(_cells_context, links)
    return await page(request, "cells.html", status_code, nav="cells", **data, **context)


async def make_invite(request: Request) -> Response:
    links: Links = _state(request, "links")
    invite = await run_in_threadpool(_invite_view, links)
    return await cells_page(request, invite=invite)


async def connect(request: Request) -> Response:
    form = await _form(request)
    links: Links = _state(request, "links")
    text = str(form.get("invite", "")).strip()
    try:
        if not text:
            raise BadInput("invite: paste the other cell's invite here", field="invite")
        link = await run_in_threadpool(links.connect, text)
    except PicellError as exc:
        err = FormError("connect", exc, ("invite",))
        return await cells_page(request, err.status, error=err, form=form)
    if link["state"] == "waiting":
        _flash(request, f"Saved {link['name']}: waiting for the other cell to import our invite")
    else:
        _flash(request, f"Linked with {link['name']}")
    return _back("/cells")


async def set_sharing(request: Request) -> Response:
    name = request.path_params["name"]
    form = await _form(request)
    sync: Sync = _state(request, "sync")
    wanted = [s for s in form.get("services", []) if s]
    try:
        await run_in_threadpool(sync.set_permissions, name, wanted)
    except PicellError as exc:
        err = FormError(f"share-{name}", exc, ("services",))
        return await cells_page(request, err.status, error=err)
    _flash(request, f"Sharing with {name}: {', '.join(wanted) or 'nothing'}")
    return _back("/cells")


async def set_exit_offer(request: Request) -> Response:
    name = request.path_params["name"]
    form = await _form(request)
    sync: Sync = _state(request, "sync")
    offered = form.get("offered") == "1"
    try:
        await run_in_threadpool(sync.set_exit_offer, name, offered)
    except PicellError as exc:
        err = FormError(f"exit-{name}", exc, ("offered",))
        return await cells_page(request, err.status, error=err)
    _flash(request, f"{'Offering' if offered else 'Not offering'} our internet exit to {name}")
    return _back("/cells")


async def disconnect(request: Request) -> Response:
    name = request.path_params["name"]
    links: Links = _state(request, "links")
    try:
        await run_in_threadpool(links.disconnect, name)
    except PicellError as exc:
        err = FormError(f"disconnect-{name}", exc, ())
        return await cells_page(request, err.status, error=err)
    _flash(request, f"Disconnected {name}; it is told to remove its side too")
    return _back("/cells")


# -- Devices -----------------------------------------------------------------------------------
async def devices_page(request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
    ctl: Control = _state(request, "control")
    peers = await run_in_threadpool(ctl.list_peers)
    return await page(request, "devices.html", status_code, nav="devices", peers=peers, **context)


async def add_device(request: Request) -> Response:
    form = await _form(request)
    ctl: Control = _state(request, "control")
    name = str(form.get("name", "")).strip()
    key = str(form.get("public_key", "")).strip() or None
    try:
        await run_in_threadpool(ctl.add_peer, name, key)
    except PicellError as exc:
        err = FormError("add", exc, ("name", "public_key"))
        return await devices_page(request, err.status, error=err, form=form)
    _flash(request, f"Added {name}: import its config or scan its QR code on the device")
    return _back(f"/devices/{name}")


async def device_page(request: Request) -> Response:
    name = request.path_params["name"]
    ctl: Control = _state(request, "control")
    try:
        validate.name(name)
        peers = await run_in_threadpool(ctl.list_peers)
        peer = next(p for p in peers if p["name"] == name)
        config = await run_in_threadpool(ctl.peer_config, name)
    except (PicellError, StopIteration):
        _flash(request, f"No device named {name}")
        return _back("/devices")
    return await page(request, "device.html", nav="devices", peer=peer, config=config)


async def remove_device(request: Request) -> Response:
    name = request.path_params["name"]
    ctl: Control = _state(request, "control")
    try:
        await run_in_threadpool(ctl.remove_peer, name)
    except PicellError as exc:
        err = FormError(f"remove-{name}", exc, ())
        return await devices_page(request, err.status, error=err)
    _flash(request, f"Removed {name}: its access ended")
    return _back("/devices")


# -- Services ----------------------------------------------------------------------------------
def _services_context(links: Links) -> dict[str, Any]:
    shared: dict[str, list[str]] = {}
    for link in links.overview():
        for svc in link["inbound"]:
            shared.setdefault(svc["name"], []).append(link["name"])
    return {"services": links.control.list_services(), "shared": shared}


async def services_page(request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
    data = await run_in_threadpool(_services_context, _state(request, "links"))
    return await page(request, "services.html", status_code, nav="services", **data, **context)


async def add_service(request: Request) -> Response:
    form = await _form(request)
    ctl: Control = _state(request, "control")
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
    _flash(request, f"Added service {name}")
    return _back("/services")


async def remove_service(request: Request) -> Response:
    name = request.path_params["name"]
    ctl: Control = _state(request, "control")
    try:
        await run_in_threadpool(ctl.remove_service, name)
    except PicellError as exc:
        err = FormError(f"remove-{name}", exc, ())
        return await services_page(request, err.status, error=err)
    _flash(request, f"Removed service {name}")
    return _back("/services")


async def home(_: Request) -> Response:
    return _back("/cells")


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
        ("/cells/connect", connect, post),
        ("/cells/{name}/sharing", set_sharing, post),
        ("/cells/{name}/exit-offer", set_exit_offer, post),
        ("/cells/{name}/disconnect", disconnect, post),
        ("/devices", devices_page, get),
        ("/devices", add_device, post),
        ("/devices/{name}", device_page, get),
        ("/devices/{name}/remove", remove_device, post),
        ("/services", services_page, get),
        ("/services", add_service, post),
        ("/services/{name}/remove", remove_service, post),
    ]
    for path, endpoint, methods in routes:
        app.add_route(path, endpoint, methods=list(methods), include_in_schema=False)
    auth.install(app, auth_, refused_page)
