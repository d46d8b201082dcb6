"""`picell invite | invites | connect | disconnect | share | unshare | exit-offer | relay-offer |
cells | import-links | route-via`: links to other cells. Answers are read with the admin API's
own models (`picell.api.models`), and `--json` prints them."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from picell.api.models import (
    UNTIL_PATTERN,
    CellOut,
    ImportOut,
    InviteCreated,
    InviteRow,
    JournalEntryOut,
    RouteViaOut,
    dump,
)
from picell.cli import show
from picell.cli.base import JsonOpt, app, call, out, qr_terminal, read, read_list


def _duration(text: str) -> float:
    try:
        return show.duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def invite(
    qr: Annotated[bool, typer.Option("--qr", help="Also print it as a QR code")] = False,
    expires: Annotated[str, typer.Option(help="Token lifetime: 3600, 30m, 24h, 7d")] = "24h",
    as_json: JsonOpt = False,
) -> None:
    """Print a fresh invite for another cell (single use; only its hash is kept)."""
    body = {"expires_s": _duration(expires)}
    data = read(call("POST", "/api/cells/invites", as_json, json=body), InviteCreated, as_json)
    if as_json:
        out(data, True, "")
        return
    print(show.invite_text(dump(data)))
    if qr:
        qr_terminal(data.string)


@app.command()
def invites(
    action: Annotated[str | None, typer.Argument(help="revoke (or nothing: list them)")] = None,
    invite_id: Annotated[int | None, typer.Argument(metavar="ID", help="The invite to end")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The invites this cell handed out (open, used, expired); `invites revoke ID` ends one."""
    if action is None:
        rows = read_list(call("GET", "/api/cells/invites", as_json), InviteRow, as_json)
        out(rows, as_json, show.invites_text(dump(rows)))
        return
    if action != "revoke" or invite_id is None:
        raise typer.BadParameter("use `picell invites` or `picell invites revoke ID`")
    call("DELETE", f"/api/cells/invites/{invite_id}", as_json)
    out({"revoked": invite_id}, as_json, f"revoked invite {invite_id}: it can no longer be used")


def _link(resp: Any, as_json: bool) -> None:
    cell = read(resp, CellOut, as_json)
    out(cell, as_json, show.link_text(dump(cell)))


def _invite_text(invite: str) -> str:
    """The invite as given: a string, @FILE or - (stdin). A file's text is passed on unchanged
    (the daemon takes every form a cell exports, `invite --json` output included)."""
    if invite == "-":
        return sys.stdin.read()
    if invite.startswith("@"):
        try:
            return Path(invite[1:]).read_text()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {invite[1:]}: {exc.strerror}") from None
    return invite


@app.command()
def connect(
    invite: Annotated[
        str, typer.Argument(help="The other cell's invite string, @FILE, or - (stdin)")
    ],
    trust_domain: Annotated[
        bool,
        typer.Option(
            "--trust-domain",
            help="Accept the other cell's domain although it is not under a private-use suffix",
        ),
    ] = False,
    via: Annotated[
        str | None,
        typer.Option(
            "--via",
            metavar="CELL",
            help="Link through a linked cell that offers us its relay (both homes behind CGNAT)",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Link with another cell by importing its invite."""
    body = {"invite": _invite_text(invite), "trust_domain": trust_domain, "via": via}
    _link(call("POST", "/api/cells", as_json, json=body), as_json)


DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="Only this device of the cell (one it publishes to us)"),
]
UntilOpt = Annotated[
    str | None,
    typer.Option(
        "--until",
        help="End by itself then: ISO 8601, 2026-12-24T18:00 (local time unless it carries "
        "an offset; seconds allowed)",
    ),
]


def _until(text: str | None) -> str | None:
    """Bad usage (exit 2) for what is no date; the daemon refuses a date in the past."""
    if text is not None and not re.fullmatch(UNTIL_PATTERN, text):
        raise typer.BadParameter(f"{text!r}: use ISO 8601, e.g. 2026-12-24T18:00")
    return text


@app.command()
def share(
    cell: Annotated[str, typer.Argument(help="The linked cell")],
    services: Annotated[list[str], typer.Argument(help="One or more of this cell's services")],
    device: DeviceOpt = None,
    until: UntilOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let a linked cell's network (or one device it publishes) use our services, by name and
    address, for good or until a date: one change."""
    if len(services) == 1 and device is None and until is None:
        _link(call("POST", f"/api/cells/{cell}/shares/{services[0]}", as_json), as_json)
    else:
        body = {"services": services, "device": device, "until": _until(until)}
        _link(call("POST", f"/api/cells/{cell}/shares", as_json, json=body), as_json)


@app.command()
def unshare(
    cell: Annotated[str, typer.Argument(help="The linked cell")],
    service: Annotated[str, typer.Argument(help="A service shared with it")],
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop sharing a service with a linked cell (or with one of its devices); its open
    connections stop too."""
    params = {"device": device} if device else None
    _link(call("DELETE", f"/api/cells/{cell}/shares/{service}", as_json, params=params), as_json)


@app.command("exit-offer")
def exit_offer(
    cell: Annotated[str, typer.Argument(help="The linked cell")],
    state: Annotated[str, typer.Argument(help="on or off")],
    until: UntilOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Offer (on) or withdraw (off) this cell's internet exit to a linked cell, for good or
    until a date."""
    if state not in ("on", "off"):
        raise typer.BadParameter(f"{state!r}: use on or off")
    if until is not None and state == "off":
        raise typer.BadParameter("--until goes with on")
    body = {"offered": state == "on", "until": _until(until)}
    _link(call("PUT", f"/api/cells/{cell}/exit-offer", as_json, json=body), as_json)


@app.command("relay-offer")
def relay_offer(
    cell: Annotated[str, typer.Argument(help="The linked cell")],
    state: Annotated[str, typer.Argument(help="on or off")],
    as_json: JsonOpt = False,
) -> None:
    """Offer (on) or withdraw (off) this cell's relay to a linked cell: two linked cells that
    both have the offer may link with each other through this cell (`connect --via`)."""
    if state not in ("on", "off"):
        raise typer.BadParameter(f"{state!r}: use on or off")
    body = {"offered": state == "on"}
    _link(call("PUT", f"/api/cells/{cell}/relay-offer", as_json, json=body), as_json)


@app.command()
def disconnect(
    cell: Annotated[str, typer.Argument(help="The linked cell's name")], as_json: JsonOpt = False
) -> None:
    """End the link with a cell; the other cell is told and removes its side too."""
    call("DELETE", f"/api/cells/{cell}", as_json)
    out({"disconnected": cell}, as_json, f"disconnected {cell}; telling it to remove its side")


def _cells(journal: str | None, as_json: bool) -> None:
    if journal is not None:
        resp = call("GET", "/api/cells/journal", as_json, params={"cell": journal})
        entries = read_list(resp, JournalEntryOut, as_json)
        out(entries, as_json, show.journal_text(dump(entries), journal))
        return
    cells = read_list(call("GET", "/api/cells", as_json), CellOut, as_json)
    out(cells, as_json, show.cells_text(dump(cells)))


JournalOpt = Annotated[
    str | None, typer.Option("--journal", help="Show the journal of link events with CELL")
]


@app.command("cells")
def cells_cmd(
    action: Annotated[
        str | None, typer.Argument(help="list (the default) or publish-devices CELL on|off")
    ] = None,
    args: Annotated[list[str] | None, typer.Argument(help="CELL on|off")] = None,
    journal: JournalOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Linked cells with their state, handshake, traffic and authentication string;
    `cells publish-devices CELL on|off` publishes our devices' names and addresses to CELL
    (off by default), so that its owner may share with one of them."""
    if action == "publish-devices":
        if not args or len(args) != 2 or args[1] not in ("on", "off"):
            raise typer.BadParameter("use `picell cells publish-devices CELL on|off`")
        body = {"published": args[1] == "on"}
        _link(call("PUT", f"/api/cells/{args[0]}/publish-devices", as_json, json=body), as_json)
        return
    if action not in (None, "list") or args:
        raise typer.BadParameter(
            f"unknown action {action!r}; use `picell cells [list]` or "
            "`picell cells publish-devices CELL on|off`"
        )
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
    resp = call("POST", "/api/cells/import", as_json, json={"content": content})
    data = read(resp, ImportOut, as_json)
    human = "\n".join(
        f"imported {i.name}"
        + (f" (unknown fields kept in the journal: {', '.join(i.unknown_fields)})"
           if i.unknown_fields else "")
        for i in data.imported
    ) or "nothing to import"  # fmt: skip
    out(data, as_json, human)


@app.command("route-via")
def route_via(
    peer: Annotated[str, typer.Argument(help="One of this cell's devices")],
    cell: Annotated[str, typer.Argument(help="A linked cell that offers its exit, or none")],
    as_json: JsonOpt = False,
) -> None:
    """Send a device's internet traffic through a linked cell's exit (none: through this cell).
    The device then needs the full-tunnel config printed here."""
    body = {"via_cell": None if cell == "none" else cell}
    resp = call("PUT", f"/api/peers/{peer}/route-via", as_json, json=body)
    data = read(resp, RouteViaOut, as_json)
    out(data, as_json, f"{data.message}\n\n{data.config}")
