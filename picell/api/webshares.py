"""The Cell Network page's forms for what we give a linked cell: sharing toggles (its whole
network), a share with one device it publishes (until a date or for good) and its end, our
devices published to it, and the exit and relay offers (the exit until a date or for good).

Each form calls the same `Sync` method as the admin API, so a change from the page is the
same commit + converge; a refused change re-renders the page with the message next to the
field it names. Must not run system commands or check sessions (`picell.api.auth` does).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from picell.api.webrender import FormError, back, flash, read_form, state
from picell.errors import PicellError
from picell.mesh.sync import Sync


async def _refused(
    request: Request, form: str, exc: PicellError, fields: tuple[str, ...]
) -> Response:
    from picell.api.web import cells_page  # the page imports these forms' routes

    err = FormError(form, exc, fields)
    return await cells_page(request, err.status, error=err)


async def _form(request: Request) -> tuple[str, dict[str, Any], Sync]:
    """The linked cell a form is about, the form and the object that makes its change."""
    return request.path_params["name"], await read_form(request), state(request, "sync")


def _date(form: dict[str, Any]) -> str | None:
    """A `datetime-local` field ("2026-12-24T18:00"): the cell's local time; "" is none."""
    return str(form.get("until", "")).strip() or None


async def set_sharing(request: Request) -> Response:
    name, form, sync = await _form(request)
    wanted = [s for s in form.get("services", []) if s]
    try:
        await run_in_threadpool(sync.set_network_shares, name, wanted)
    except PicellError as exc:
        return await _refused(request, f"share-{name}", exc, ("services",))
    flash(request, f"Sharing with {name}: {', '.join(wanted) or 'nothing'}")
    return back("/cells")


async def share_device(request: Request) -> Response:
    """Share one service with one device `name` publishes, for good or until a date."""
    name, form, sync = await _form(request)
    service, device, until = str(form.get("service", "")), str(form.get("device", "")), _date(form)
    try:
        await run_in_threadpool(sync.share, name, [service], "service", device, until)
    except PicellError as exc:
        return await _refused(request, f"device-share-{name}", exc, ("service", "device", "until"))
    flash(
        request, f"Sharing {service} with {name}'s {device}" + (f" until {until}" if until else "")
    )
    return back("/cells")


async def end_share(request: Request) -> Response:
    """End one share (a device's, or the whole network's) with `name`."""
    name, form, sync = await _form(request)
    service, device = str(form.get("service", "")), str(form.get("device", ""))
    try:
        await run_in_threadpool(sync.unshare, name, service, device)
    except PicellError as exc:
        return await _refused(request, f"device-share-{name}", exc, ("service", "device"))
    flash(request, f"No longer sharing {service} with {name}" + (f"'s {device}" if device else ""))
    return back("/cells")


async def publish_devices(request: Request) -> Response:
    name, form, sync = await _form(request)
    on = form.get("published") == "1"
    try:
        await run_in_threadpool(sync.publish_devices, name, on)
    except PicellError as exc:
        return await _refused(request, f"publish-{name}", exc, ("published",))
    flash(request, f"{'Publishing' if on else 'Not publishing'} our devices to {name}")
    return back("/cells")


async def _set_offer(request: Request, kind: str) -> Response:
    """The exit or relay offer toggle of one linked cell (`kind`: "exit" or "relay")."""
    name, form, sync = await _form(request)
    offered = form.get("offered") == "1"
    until = _date(form) if kind == "exit" and offered else None
    try:
        if kind == "exit":
            await run_in_threadpool(sync.set_exit_offer, name, offered, until)
        else:
            await run_in_threadpool(sync.set_relay_offer, name, offered)
    except PicellError as exc:
        return await _refused(request, f"{kind}-{name}", exc, ("offered", "until"))
    what = f"our internet exit to {name}" if kind == "exit" else f"to relay for {name}"
    flash(request, f"{'Offering' if offered else 'Not offering'} {what}"
                   + (f" until {until}" if until else ""))  # fmt: skip
    return back("/cells")


async def set_exit_offer(request: Request) -> Response:
    return await _set_offer(request, "exit")


async def set_relay_offer(request: Request) -> Response:
    return await _set_offer(request, "relay")
