"""Rendering for the web UI's pages: the Jinja2 templates of `picell/web`, words for numbers
(ages, byte counts, times), refused changes shown next to their field (`FormError`), flash
messages and redirects. Must not change anything: the handlers in `picell.api.web` do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from picell.api import auth
from picell.api.errors import status_of
from picell.control import Control
from picell.errors import PicellError

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

    def __init__(
        self,
        form: str,
        exc: PicellError,
        fields: tuple[str, ...],
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.form = form
        self.status = status_of(exc)
        name = (exc.field or "").split(".")[0].split("[")[0]
        name = (aliases or {}).get(name, name)
        self.field = name if name in fields else "_form"
        message = exc.message
        if exc.field and message.startswith(f"{exc.field}: "):
            message = message[len(exc.field) + 2 :]
        self.message = message[:1].upper() + message[1:]

    def on(self, form: str, field: str) -> str | None:
        return self.message if (self.form, self.field) == (form, field) else None


def state(request: Request, name: str) -> Any:
    return getattr(request.app.state, name)


async def page(
    request: Request,
    template: str,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    ctl: Control = state(request, "control")
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


def flash(request: Request, message: str) -> None:
    session: auth.Session | None = getattr(request.state, "session", None)
    if session is not None:
        session.flash.append(message)


def back(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


async def read_form(request: Request) -> dict[str, Any]:
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
